//! The event pipeline: ring buffer -> decoded decision -> audit line.
//! The kernel's verdict never waits on this; when the buffer is full the
//! kernel counts the loss and this reports it.
use std::{
    collections::HashMap,
    mem::size_of,
    sync::Arc,
    time::{Duration, SystemTime},
};

use agentd_ebpf::{
    Event, KIND_CONNECT, KIND_SENDMSG, KIND_SOCKET, PROTO_TCP, PROTO_UDP, REASON_HOST,
    REASON_KILLED, REASON_NO_RULE, REASON_PROTOCOL, REASON_RULE, REASON_UNKNOWN_AGENT,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};
use aya::maps::{MapData, RingBuf};
use nix::time::{ClockId, clock_gettime};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::{daemon::State, policy::event_addr};

/// One decision as written to the audit log.
#[derive(Debug, Serialize)]
pub struct Decision<'a> {
    pub agent: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub session: Option<String>,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub gid: u32,
    pub protocol: String,
    pub dst_ip: Option<String>,
    pub dst_port: Option<u16>,
    /// The config rule that allows this destination (allow verdicts).
    pub rule: Option<String>,
    /// The name agentd's resolver answered this address for (hostname
    /// rules), when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub cgroup_id: u64,
    /// Identical decisions folded into this line (same process, thread,
    /// destination, verdict), exact; `last_ts` is the last one's time.
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ts: Option<String>,
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CONNECT => "connect",
        KIND_SENDMSG => "send",
        KIND_SOCKET => "socket",
        _ => "unknown",
    }
}

fn verdict_name(v: u8) -> &'static str {
    match v {
        VERDICT_ALLOW => "allow",
        VERDICT_AUDIT => "audit",
        VERDICT_DENY => "deny",
        _ => "unknown",
    }
}

fn reason_name(r: u8) -> &'static str {
    match r {
        REASON_RULE => "rule",
        REASON_NO_RULE => "no_rule",
        REASON_KILLED => "killed",
        REASON_UNKNOWN_AGENT => "unknown_agent",
        REASON_PROTOCOL => "protocol",
        REASON_HOST => "host_rule",
        _ => "unknown",
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        255 => "raw".into(),
        n => n.to_string(),
    }
}

/// Wall-clock time of a `bpf_ktime_get_coarse_ns` stamp: the event's age on
/// the same clock, taken from now.
fn wall_time(mono_ns: u64) -> SystemTime {
    let now_wall = SystemTime::now();
    let Some(now_ns) = kernel_now_ns() else {
        return now_wall;
    };
    now_wall - Duration::from_nanos(now_ns.saturating_sub(mono_ns))
}

/// Now on `bpf_ktime_get_coarse_ns`'s clock (CLOCK_MONOTONIC_COARSE): the
/// clock of event stamps and of learned addresses' expiries.
pub fn kernel_now_ns() -> Option<u64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).ok()?;
    Some(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain #[repr(C)] data and the slice is long enough.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// What makes two decisions "identical" for folding: everything in the
/// record except the time.
fn fold_key(ev: &Event) -> Event {
    Event { ts_ns: 0, ..*ev }
}

/// Most events folded per drain; keeps memory bounded under a flood.
const MAX_BATCH: usize = 65_536;

fn write_decision(state: &State, ev: &Event, count: u64, last_boot_ns: u64) {
    let addr = event_addr(ev.family, &ev.dst_addr);
    let is_socket = ev.kind == KIND_SOCKET;
    let tcp = ev.protocol == PROTO_TCP;
    // Read and released before the learned lock, which comes first in the
    // lock order.
    let (agent, owner, mut rule, hosts) = {
        let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
        match agents.iter().find(|a| a.agent_id == ev.agent_id) {
            Some(a) => {
                let rule = match ev.verdict {
                    VERDICT_ALLOW if !is_socket && ev.reason == REASON_RULE => a
                        .rule_index
                        .find(&a.rules, addr, ev.dst_port, tcp)
                        .map(|i| format!("{} (line {})", a.rules[i].describe(), a.rules[i].line)),
                    _ => None,
                };
                (
                    Some(a.name.clone()),
                    Some(a.owner.clone()),
                    rule,
                    Some(a.hosts.clone()),
                )
            }
            None => (None, None, None, None),
        }
    };
    let host = match (&agent, &hosts) {
        (Some(name), Some(hosts)) if !is_socket && !hosts.is_empty() => {
            let learned = state.dns.learned();
            match learned.grant_for(name, addr, ev.dst_port, tcp) {
                Some((host, i)) if ev.reason == REASON_HOST => {
                    let r = &hosts.rules.get(i);
                    rule = r.map(|r| format!("{} (line {})", r.describe(), r.line));
                    Some(host)
                }
                _ => learned.names_for(name, addr).into_iter().next(),
            }
        }
        _ => None,
    };
    let session = state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .session_of(ev.pid);
    let record = Decision {
        agent: agent.as_deref(),
        owner: owner.as_deref(),
        session,
        verdict: verdict_name(ev.verdict),
        reason: reason_name(ev.reason),
        pid: ev.pid,
        tid: ev.tid,
        comm: comm(&ev.comm),
        uid: ev.uid,
        gid: ev.gid,
        protocol: protocol_name(ev.protocol),
        dst_ip: (!is_socket).then(|| addr.to_string()),
        dst_port: (!is_socket).then_some(ev.dst_port),
        rule,
        host,
        cgroup_id: ev.cgroup_id,
        count,
        last_ts: (count > 1).then(|| crate::audit::rfc3339(wall_time(last_boot_ns))),
    };
    state
        .audit
        .record(wall_time(ev.ts_ns), kind_name(ev.kind), &record);
}

/// Drains the ring buffer whenever it has data, until the daemon stops.
pub async fn run(ring: RingBuf<MapData>, state: Arc<State>) {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns
    // the RingBuf, and always reports that same fd.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the event ring buffer; decisions still enforced, not logged");
            return;
        }
    };
    loop {
        // The kernel wakes us only once a batch is waiting; the timeout
        // bounds how long a quiet trickle of events waits for its line.
        match tokio::time::timeout(DRAIN_INTERVAL, fd.readable_mut()).await {
            Ok(Ok(mut guard)) => {
                drain(guard.get_inner_mut(), &state);
                guard.clear_ready();
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "polling the event ring buffer failed");
                return;
            }
            Err(_) => drain(fd.get_mut(), &state),
        }
    }
}

/// Longest an event waits in the ring buffer before it is written.
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);

/// Drains what is there, folding identical decisions with exact counts:
/// under a flood (a connect loop) this is one line per distinct decision per
/// batch instead of one per call.
fn drain(ring: &mut RingBuf<MapData>, state: &State) {
    loop {
        let mut order: Vec<(Event, u64, u64)> = Vec::new();
        let mut index: HashMap<Event, usize> = HashMap::new();
        let mut n = 0;
        while n < MAX_BATCH {
            let Some(item) = ring.next() else { break };
            n += 1;
            let Some(ev) = decode(&item) else { continue };
            match index.entry(fold_key(&ev)) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    let slot = &mut order[*e.get()];
                    slot.1 += 1;
                    slot.2 = ev.ts_ns;
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(order.len());
                    order.push((ev, 1, ev.ts_ns));
                }
            }
        }
        for (ev, count, last) in &order {
            write_decision(state, ev, *count, *last);
        }
        if n > 0 {
            state.audit.flush();
        }
        if n < MAX_BATCH {
            return;
        }
    }
}

/// Reports events the kernel could not queue, from its exact counters.
pub async fn watch_losses(state: Arc<State>) {
    let mut reported = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let total = {
            let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
            maps.total_events_lost().unwrap_or(reported)
        };
        if total > reported {
            tracing::warn!(
                lost = total - reported,
                total,
                "audit events lost: ring buffer full (verdicts unaffected, counters exact)"
            );
            state.audit.record_now(
                "events_lost",
                serde_json::json!({ "lost": total - reported, "total": total }),
            );
            reported = total;
        }
    }
}
