//! What responders look at: `list` (every agent in a line) and `status` (one
//! agent in full). Everything here is read from the kernel, /proc and the
//! audit log at the time of asking, not from what the daemon remembers
//! having done.
use std::time::SystemTime;

use agentd_ebpf::AGENT_KILLED;

use crate::{
    audit::query::{self, EventFilter, Matcher, Verdict},
    cgroup,
    control::{
        AgentState, AgentSummary, ContainedAgent, ListReply, ProcessInfo, RuleInfo, SessionInfo,
        StatusReply,
    },
    daemon::State,
    error::{Error, Result},
    sessions,
};

/// Processes listed by `status` (the total is always given).
pub const MAX_PROCESSES: usize = 256;
/// Names listed with their learned addresses in `status`.
pub const MAX_LEARNED_LISTED: usize = 100;
/// Sessions listed by `status`, most recent first.
pub const MAX_SESSIONS: usize = 50;
/// Denied attempts shown by `status`.
pub const RECENT_DENIED: usize = 10;

pub fn list(state: &State) -> Result<ListReply> {
    let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
    let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    let kills = state.kills.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(agents.len());
    for a in agents.iter() {
        let entry = maps.agent(a.cgroup_id);
        out.push(AgentSummary {
            name: a.name.clone(),
            owner: a.owner.clone(),
            description: a.description.clone(),
            mode: a.mode,
            cgroup: state.cgroups.relative(&a.cgroup_dir),
            bound: a.bound,
            processes: cgroup::processes(&a.cgroup_dir)
                .map(|p| p.len())
                .unwrap_or(0),
            rules: a.rules.len() + a.hosts.rules.len(),
            enforcing: entry.is_some(),
            killed: entry.is_some_and(|e| e.flags & AGENT_KILLED != 0),
            kill: kills.killed.get(&a.name).cloned(),
            counts: maps.counts(a.agent_id)?,
        });
    }
    let contained = state
        .retired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(name, r)| ContainedAgent {
            name: name.clone(),
            cgroup: state.cgroups.relative(&r.dir),
            processes: cgroup::processes(&r.dir).map(|p| p.len()).unwrap_or(0),
        })
        .collect();
    Ok(ListReply {
        agents: out,
        contained,
        events_lost: maps.total_events_lost()?,
    })
}

pub fn status(state: &State, agent: &str) -> Result<StatusReply> {
    let a = state
        .agent(agent)
        .ok_or_else(|| Error::Refused(format!("unknown agent {agent:?}")))?;
    let (entry, counts) = {
        let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        (maps.agent(a.cgroup_id), maps.counts(a.agent_id)?)
    };
    let agent_state = match entry {
        None if a.bound && a.cgroup_id == 0 => AgentState::Waiting,
        None => AgentState::NotEnforcing,
        Some(e) if e.flags & AGENT_KILLED != 0 => AgentState::Killed,
        Some(_) => AgentState::Active,
    };
    let kill = state
        .kills
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .killed
        .get(&a.name)
        .cloned();
    let pids = if a.cgroup_dir.exists() {
        cgroup::processes(&a.cgroup_dir)?
    } else {
        Vec::new()
    };
    let processes = pids
        .iter()
        .take(MAX_PROCESSES)
        .map(|&pid| process_info(state, pid))
        .collect();
    let sessions = state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .of_agent(&a.name)
        .into_iter()
        .take(MAX_SESSIONS)
        .map(|s| SessionInfo {
            alive: s.alive(),
            id: s.id,
            how: s.how,
            pid: s.pid,
            requested_by_uid: s.requested_by_uid,
            requested_by_user: s.requested_by_user,
            target_user: s.target_user,
            command: s.command,
            started: s.started,
            reason: s.reason,
        })
        .collect();
    let denied = Matcher::new(
        &EventFilter {
            agent: Some(a.name.clone()),
            verdict: Some(Verdict::Deny),
            limit: Some(RECENT_DENIED),
            ..EventFilter::default()
        },
        SystemTime::now(),
    )
    .map_err(Error::Refused)?;
    let recent_denied = query::query(state.audit.path(), &denied)
        .map_err(|source| Error::Io {
            context: format!("reading {}", state.audit.path().display()),
            source,
        })?
        .records
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    // One guard, dropped before the reply is built: a second lock of the
    // same mutex within one expression would deadlock.
    let (learned_addresses, learned) = {
        let l = state.dns.learned();
        (l.count(&a.name), l.listing(&a.name, MAX_LEARNED_LISTED))
    };
    Ok(StatusReply {
        name: a.name.clone(),
        owner: a.owner.clone(),
        description: a.description.clone(),
        mode: a.mode,
        cgroup: state.cgroups.relative(&a.cgroup_dir),
        bound: a.bound,
        state: agent_state,
        kill,
        processes_total: pids.len(),
        processes,
        sessions,
        rules: {
            let mut rules: Vec<RuleInfo> = a
                .rules
                .iter()
                .map(|r| (r.describe(), r.line))
                .chain(a.hosts.rules.iter().map(|r| (r.describe(), r.line)))
                .map(|(rule, line)| RuleInfo { rule, line })
                .collect();
            rules.sort_by_key(|r| r.line);
            rules
        },
        learned_addresses,
        learned,
        counts,
        recent_denied,
    })
}

/// What /proc says about one process. A process that exits while we look
/// keeps its pid in the answer with the rest unknown.
fn process_info(state: &State, pid: u32) -> ProcessInfo {
    let (uid, user) = sessions::process_user(pid);
    let cmdline = sessions::process_cmdline(pid);
    let session = state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .session_of(pid);
    ProcessInfo {
        pid,
        uid,
        user,
        cmdline,
        session,
    }
}
