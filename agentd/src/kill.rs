//! The kill switch: revoke all of an agent's network access at once, keep
//! its processes alive, and keep the switch pulled across daemon restarts
//! until someone restores it.
//!
//! The kernel half is one flag in the agent's map entry: the connect and
//! sendmsg hooks refuse everything while it is set, and the cgroup skb hooks
//! drop every packet of the agent's sockets in both directions. The state
//! file makes the switch survive a reboot (pins do not).
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use agentd_ebpf::{AGENT_KILLED, AgentEntry};
use serde::{Deserialize, Serialize};

use crate::{
    audit::rfc3339,
    cgroup,
    daemon::State,
    error::{Error, IoContext as _, Result},
};

/// Who pulled the switch, when and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KillRecord {
    pub reason: String,
    pub by_uid: u32,
    pub by_user: Option<String>,
    pub by_pid: u32,
    pub at: String,
}

/// `state_dir/killed.json`: the agents whose switch is pulled.
#[derive(Debug, Default)]
pub struct KillState {
    path: PathBuf,
    pub killed: BTreeMap<String, KillRecord>,
}

impl KillState {
    /// A missing file means nobody is killed. An unreadable or corrupt one
    /// stops the daemon: guessing could silently lift a kill.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("killed.json");
        let killed = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Refused(format!(
                    "kill state {} is corrupt ({e}); refusing to start rather than lift a kill. \
                     Fix or remove it deliberately",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
        };
        Ok(Self { path, killed })
    }

    /// Writes the file durably: temp file, fsync, rename, fsync directory.
    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.killed).unwrap_or_default();
        let mut f = fs::File::create(&tmp).ctx(|| format!("writing {}", tmp.display()))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.path).ctx(|| format!("replacing {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .ctx(|| format!("syncing {}", dir.display()))?;
        }
        Ok(())
    }
}

/// What one kill or restore did to one agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SwitchOutcome {
    pub agent: String,
    /// The agent was already in the requested state; nothing changed.
    pub unchanged: bool,
    pub processes: usize,
    /// CLOCK_MONOTONIC when the request was received, so a caller can time
    /// what it observes against the request (benchmarks).
    pub received_mono_ns: u64,
    /// Request received -> kernel flag flipped, microseconds.
    pub flip_us: f64,
    /// Established sockets torn down (kill only).
    pub sockets: crate::sockets::AbortReport,
    /// Request received -> state persisted and reply ready, microseconds.
    pub total_us: f64,
}

/// The caller, as the kernel identified it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    /// From the user database, looked up once when the caller connected.
    pub user: Option<String>,
    pub pid: u32,
}

/// Pulls (`kill = true`) or lifts the switch for `targets` (every agent when
/// empty and `all`).
pub fn switch(
    state: &State,
    received: Instant,
    targets: &[String],
    all: bool,
    reason: &str,
    caller: Caller,
    kill: bool,
) -> Result<Vec<SwitchOutcome>> {
    if reason.trim().is_empty() {
        return Err(Error::Refused("a reason is required".into()));
    }
    let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
    let chosen: Vec<_> = if all {
        agents.iter().collect()
    } else {
        if targets.is_empty() {
            return Err(Error::Refused("name an agent or pass --all".into()));
        }
        targets
            .iter()
            .map(|t| {
                agents
                    .iter()
                    .find(|a| &a.name == t)
                    .ok_or_else(|| Error::Refused(format!("unknown agent {t:?}")))
            })
            .collect::<Result<_>>()?
    };
    let by_user = caller.user.clone();
    let mut outcomes = Vec::with_capacity(chosen.len());
    let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    let mut kills = state.kills.lock().unwrap_or_else(|p| p.into_inner());
    // Kernel first: that is what stops traffic.
    for a in &chosen {
        // A bound agent whose cgroup does not exist has nothing in the
        // kernel to flip: the state file alone carries the switch, and the
        // cgroup is armed with it when it appears.
        let waiting = a.bound && a.cgroup_id == 0;
        let mut entry = match maps.agent(a.cgroup_id) {
            Some(e) => e,
            None if waiting => AgentEntry {
                flags: if kills.killed.contains_key(&a.name) {
                    AGENT_KILLED
                } else {
                    0
                },
                ..AgentEntry::default()
            },
            None => {
                return Err(Error::Refused(format!(
                    "agent {} has no kernel state",
                    a.name
                )));
            }
        };
        let was_killed = entry.flags & AGENT_KILLED != 0;
        let unchanged = was_killed == kill;
        if !unchanged && !waiting {
            if kill {
                entry.flags |= AGENT_KILLED;
            } else {
                entry.flags &= !AGENT_KILLED;
            }
            maps.set_agent(a.cgroup_id, entry)?;
        }
        outcomes.push(SwitchOutcome {
            agent: a.name.clone(),
            unchanged,
            processes: 0,
            received_mono_ns: mono_ns_at(received),
            flip_us: received.elapsed().as_secs_f64() * 1e6,
            sockets: Default::default(),
            total_us: 0.0,
        });
    }
    drop(maps);
    // With the flag set nothing new can connect; now cut what is already
    // connected: sockets of the agent's cgroups and sockets its processes
    // hold (even ones created elsewhere).
    if kill {
        for (o, a) in outcomes.iter_mut().zip(&chosen) {
            let pids = cgroup::processes(&a.cgroup_dir).unwrap_or_default();
            o.processes = pids.len();
            o.sockets = crate::sockets::abort(&a.cgroup_dir, pids, received).map_err(|e| {
                Error::Refused(format!(
                    "agent {} is cut off (flag set, packets dropped) but tearing down its sockets failed: {e}",
                    a.name
                ))
            })?;
        }
    }
    // Then the durable record, before the reply.
    for a in &chosen {
        if kill {
            kills
                .killed
                .entry(a.name.clone())
                .or_insert_with(|| KillRecord {
                    reason: reason.to_owned(),
                    by_uid: caller.uid,
                    by_user: by_user.clone(),
                    by_pid: caller.pid,
                    at: rfc3339(SystemTime::now()),
                });
        } else {
            kills.killed.remove(&a.name);
        }
    }
    kills.save()?;
    for (o, a) in outcomes.iter_mut().zip(&chosen) {
        o.processes = cgroup::processes(&a.cgroup_dir)
            .map(|p| p.len())
            .unwrap_or(0);
        o.total_us = received.elapsed().as_secs_f64() * 1e6;
        if !o.unchanged {
            // For a kill: request to the last socket aborted, or to the
            // flag when the agent held no socket.
            let seconds = o.sockets.last_abort_us.max(o.flip_us) / 1e6;
            state
                .metrics
                .kill_switch(&a.name, kill, kill.then_some(seconds));
        }
        state.audit.record_now(
            if kill { "kill" } else { "restore" },
            serde_json::json!({
                "agent": a.name,
                "owner": a.owner,
                "reason": reason,
                "by_uid": caller.uid,
                "by_user": by_user,
                "by_pid": caller.pid,
                "unchanged": o.unchanged,
                "processes": o.processes,
                "sockets_aborted": o.sockets.aborted,
                "sockets_aborted_via_fd": o.sockets.via_fd,
                "sockets_failed": o.sockets.failed,
                "last_abort_us": o.sockets.last_abort_us,
                "flip_us": o.flip_us,
                "total_us": o.total_us,
            }),
        );
    }
    Ok(outcomes)
}

/// CLOCK_MONOTONIC (ns) of an `Instant` (which is CLOCK_MONOTONIC on Linux).
fn mono_ns_at(at: Instant) -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    now.saturating_sub(at.elapsed().as_nanos() as u64)
}
