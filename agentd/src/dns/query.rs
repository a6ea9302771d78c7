//! One query from an agent, start to finish: judge the name, ask upstream,
//! learn the addresses, answer, and put it on the record.
use std::{net::IpAddr, sync::Arc, time::Instant};

use agentd_ebpf::AGENT_KILLED;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use serde::Serialize;

use super::{
    HostRules,
    exchange::{self, Transport},
    learned::now_ns,
};
use crate::{
    config::{Mode, Refusal, host::normalize},
    daemon::State,
    policy::Access,
};

/// A query's line in the audit log (`event = "dns"`).
#[derive(Debug, Serialize)]
struct DnsRecord<'a> {
    agent: &'a str,
    owner: &'a str,
    verdict: &'static str,
    reason: &'static str,
    name: &'a str,
    qtype: String,
    transport: &'static str,
    rcode: String,
    /// Addresses the answer gave (and the agent may now reach).
    answers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    /// How long the addresses stay allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_for_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    took_ms: f64,
}

/// What the resolver needs to know of the agent, read once per query.
struct View {
    owner: String,
    mode: Mode,
    cgroup_id: u64,
    hosts: Arc<HostRules>,
}

fn view(state: &State, agent: &str) -> Option<View> {
    let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
    let a = agents.iter().find(|a| a.name == agent)?;
    Some(View {
        owner: a.owner.clone(),
        mode: a.mode,
        cgroup_id: a.cgroup_id,
        hosts: a.hosts.clone(),
    })
}

/// An answer carrying only a response code, for the question asked.
fn coded(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.queries = query.queries.clone();
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m
}

/// Encodes a reply; over UDP, one larger than the agent can take is sent
/// truncated, and the agent retries over TCP.
fn encode(reply: &Message, query: &Message, transport: Transport) -> Option<Vec<u8>> {
    let bytes = reply.to_vec().ok()?;
    if transport == Transport::Udp && bytes.len() > usize::from(query.max_payload().max(512)) {
        return reply.truncate().to_vec().ok();
    }
    Some(bytes)
}

/// Handles one query from `agent`'s resolver socket; `None`: no reply (the
/// bytes were not a DNS message).
pub(super) async fn answer(
    state: &Arc<State>,
    agent: &str,
    bytes: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let Ok(query) = Message::from_vec(bytes) else {
        state.metrics.dns_query(agent, "none", "malformed");
        return None;
    };
    if query.metadata.message_type != MessageType::Query || query.queries.len() != 1 {
        state.metrics.dns_query(agent, "none", "malformed");
        return encode(&coded(&query, ResponseCode::FormErr), &query, transport);
    }
    if query.metadata.op_code != OpCode::Query {
        state.metrics.dns_query(agent, "none", "malformed");
        return encode(&coded(&query, ResponseCode::NotImp), &query, transport);
    }
    let q: Query = query.queries[0].clone();
    let name = normalize(&q.name.to_ascii());
    let config = state.config();
    let refusal = match config.dns.refuse_with {
        Refusal::Nxdomain => ResponseCode::NXDomain,
        Refusal::Refused => ResponseCode::Refused,
    };
    let mut record = DnsRecord {
        agent,
        owner: "",
        verdict: "deny",
        reason: "no_rule",
        name: &name,
        qtype: q.query_type.to_string(),
        transport: transport.name(),
        rcode: String::new(),
        answers: Vec::new(),
        rule: None,
        allowed_for_s: None,
        error: None,
        took_ms: 0.0,
    };
    let finish = |mut record: DnsRecord<'_>, reply: &Message, result: &str| {
        record.rcode = rcode_name(reply.metadata.response_code);
        record.took_ms = started.elapsed().as_secs_f64() * 1e3;
        state.metrics.dns_query(agent, record.verdict, result);
        state.audit.record_now("dns", &record);
        encode(reply, &query, transport)
    };

    // An agent removed by a reload whose socket is still being closed.
    let Some(view) = view(state, agent) else {
        record.reason = "unknown_agent";
        return finish(record, &coded(&query, ResponseCode::Refused), "refused");
    };
    let owner = view.owner.clone();
    record.owner = &owner;
    let killed = state
        .maps
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .agent(view.cgroup_id)
        .is_some_and(|e| e.flags & AGENT_KILLED != 0);
    if killed {
        // The kernel stops steering a killed agent's DNS; this is for a
        // query that was already on its way.
        record.reason = "killed";
        return finish(record, &coded(&query, ResponseCode::Refused), "refused");
    }
    let matched = view.hosts.matcher.matching(&name);
    if matched.is_empty() && view.mode == Mode::Enforce {
        return finish(record, &coded(&query, refusal), "refused");
    }
    if matched.is_empty() {
        record.verdict = "audit";
    } else {
        record.verdict = "allow";
        record.reason = "rule";
        record.rule = Some(describe(&view.hosts, &matched));
    }

    let upstreams = state.dns.upstreams(&config.dns);
    let mut reply = match exchange::resolve(&upstreams, &query, transport).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(agent, name = %name, error = %e, "upstream DNS failed");
            record.error = Some(e.to_string());
            return finish(record, &coded(&query, ResponseCode::ServFail), "failed");
        }
    };
    let addrs = exchange::addresses(&reply, &q.name);
    record.answers = addrs.iter().map(|(ip, _)| ip.to_string()).collect();
    if !matched.is_empty() && !addrs.is_empty() {
        let (min, max) = (config.dns.min_ttl.as_secs(), config.dns.max_ttl.as_secs());
        if let Err(e) = learn(state, agent, &name, &addrs, (min, max)) {
            tracing::error!(agent, name = %name, error = %e, "cannot allow the answer's addresses; answering SERVFAIL");
            record.error = Some(e.to_string());
            return finish(record, &coded(&query, ResponseCode::ServFail), "failed");
        }
        let longest = addrs.iter().map(|(_, t)| u64::from(*t)).max().unwrap_or(0);
        record.allowed_for_s = Some(longest.clamp(min, max));
    }
    exchange::clamp_ttls(
        &mut reply,
        u32::try_from(config.dns.max_ttl.as_secs()).unwrap_or(u32::MAX),
    );
    reply.metadata.id = query.metadata.id;
    finish(record, &reply, "answered")
}

/// Writes the addresses to the agent's learned-address map for the rules
/// that allow `name` now (read under the learned lock, so a reload that
/// re-stages the learned set cannot slip between reading and writing).
fn learn(
    state: &State,
    agent: &str,
    name: &str,
    addrs: &[(IpAddr, u32)],
    (min, max): (u64, u64),
) -> crate::error::Result<()> {
    let mut learned = state.dns.learned();
    let Some((policy_id, hosts)) = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|a| a.name == agent)
        .map(|a| (a.policy_id, a.hosts.clone()))
    else {
        return Ok(());
    };
    let grants: Vec<(usize, Access)> = hosts
        .matcher
        .matching(name)
        .into_iter()
        .map(|i| {
            let r = &hosts.rules[i];
            (i, Access::of(r.ports.as_deref(), r.protocol))
        })
        .collect();
    if grants.is_empty() {
        return Ok(());
    }
    let now = now_ns();
    let expiring: Vec<(IpAddr, u64)> = addrs
        .iter()
        .map(|(ip, ttl)| {
            let secs = u64::from(*ttl).clamp(min, max);
            (*ip, now.saturating_add(secs.saturating_mul(1_000_000_000)))
        })
        .collect();
    let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    learned.learn(&mut maps, agent, policy_id, name, &grants, &expiring)
}

/// The response code as DNS tools print it (dig's names).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => u16::from(other).to_string(),
    }
}

/// The matching rules as the audit log names them.
fn describe(hosts: &HostRules, matched: &[usize]) -> String {
    matched
        .iter()
        .map(|&i| {
            let r = &hosts.rules[i];
            format!("{} (line {})", r.describe(), r.line)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
