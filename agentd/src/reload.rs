//! `agentd reload` and SIGHUP: re-read the config file and apply it.
//!
//! Everything that can fail is done before anything the kernel judges by
//! changes: the new file is parsed and validated, changed agents' rules are
//! written as new generations beside the live ones, added agents are set up
//! (rolled back if a later one fails). Only then does each changed agent
//! switch to its new generation, with one map update: a connect is judged by
//! the old rules or the new ones, never a mix and never none. The old
//! generations are deleted after a grace period, once no program can still
//! be reading them.
use std::{
    collections::HashSet,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use agentd_ebpf::AgentEntry;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Agent, Config},
    control,
    daemon::{State, killed_flag},
    enforce::{self, AgentRuntime, Kernel, Retirement, mode_value},
    error::{Error, Result},
    maps::free_agent_id,
    policy::CompiledPolicy,
};

/// Longer than any program run that could still hold an old generation.
pub(crate) const GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadReport {
    pub config: String,
    pub added: Vec<String>,
    /// Rules or mode changed (switched in one step each).
    pub changed: Vec<String>,
    /// Only owner, description or launchers changed.
    pub updated: Vec<String>,
    pub unchanged: Vec<String>,
    /// Removed and empty: everything agentd made for them is gone.
    pub removed: Vec<String>,
    /// Removed but processes still run: kept with no network access, and
    /// listed by `agentd list` until the last one exits.
    pub contained: Vec<Contained>,
    /// `[daemon]` keys that changed: they take effect at the next restart.
    pub restart_needed: Vec<String>,
    pub took_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Contained {
    pub agent: String,
    pub processes: usize,
}

/// Re-reads the config and applies it; the outcome is logged and on record.
pub fn reload(state: &Arc<State>) -> Result<ReloadReport> {
    let started = Instant::now();
    // Reloads never overlap, and reload alone attaches programs.
    let mut ebpf = state.ebpf.lock().unwrap_or_else(|p| p.into_inner());
    let old = state.config();
    let result = Config::load(&old.path)
        .map_err(Error::from)
        .and_then(|new| apply(state, &mut ebpf, &old, new));
    drop(ebpf);
    if result.is_ok() {
        // New bound agents: watch for their cgroups, arm the ones present.
        crate::bound::remember(state);
        crate::bound::check(state);
        // Resolver sockets for agents that gained hostname rules; steering
        // removed from those that lost them.
        if let Err(e) = crate::dns::sync(state) {
            tracing::error!(error = %e, "updating agents' resolvers after reload failed; their DNS is refused until the next reload");
        }
    }
    state.metrics.reload(result.is_ok());
    match &result {
        Ok(report) => {
            let mut report = report.clone();
            report.took_us = started.elapsed().as_secs_f64() * 1e6;
            tracing::info!(
                added = ?report.added, changed = ?report.changed, removed = ?report.removed,
                contained = report.contained.len(), "configuration reloaded"
            );
            state.audit.record_now(
                "reload",
                serde_json::json!({"result": "ok", "report": report}),
            );
            return Ok(report);
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the running policy is unchanged");
            state.audit.record_now(
                "reload",
                serde_json::json!({
                    "result": "error",
                    "error": e.to_string(),
                    "config": old.path,
                    "note": "the running policy is unchanged",
                }),
            );
        }
    }
    result
}

/// What to do with each agent.
struct Plan<'a> {
    added: Vec<&'a Agent>,
    /// New rules or mode, with the generation they are written as.
    switched: Vec<(&'a Agent, u32)>,
    updated: Vec<&'a Agent>,
    unchanged: Vec<&'a Agent>,
    removed: Vec<AgentRuntime>,
}

fn plan<'a>(
    old: &Config,
    new: &'a Config,
    running: &[AgentRuntime],
    state: &State,
) -> Result<Plan<'a>> {
    for (i, agent) in new.agents.iter().enumerate() {
        if let Some(was) = old.agent(&agent.name)
            && was.cgroup != agent.cgroup
        {
            return Err(Error::Refused(format!(
                "{}: agent[{i}].cgroup: agent {:?} cannot move to another cgroup while it runs; \
                 remove it, reload, then add it back",
                new.path.display(),
                agent.name
            )));
        }
    }
    let mut p = Plan {
        added: Vec::new(),
        switched: Vec::new(),
        updated: Vec::new(),
        unchanged: Vec::new(),
        removed: Vec::new(),
    };
    for agent in &new.agents {
        match old.agent(&agent.name) {
            None => p.added.push(agent),
            Some(was)
                if was.allow != agent.allow
                    || was.hosts != agent.hosts
                    || was.mode != agent.mode =>
            {
                let id = state.next_policy.fetch_add(1, Ordering::Relaxed);
                p.switched.push((agent, id));
            }
            Some(was) if was != agent => p.updated.push(agent),
            Some(_) => p.unchanged.push(agent),
        }
    }
    p.removed = running
        .iter()
        .filter(|r| new.agent(&r.name).is_none())
        .cloned()
        .collect();
    Ok(p)
}

/// `[daemon]` keys whose new value differs from the running one.
fn daemon_changes(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(&old.daemon).unwrap_or_default(),
        serde_json::to_value(&new.daemon).unwrap_or_default(),
    );
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Vec::new();
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, _)| format!("daemon.{k}"))
        .collect()
}

fn apply(
    state: &State,
    ebpf: &mut aya::Ebpf,
    old: &Config,
    mut new: Config,
) -> Result<ReloadReport> {
    let mut report = ReloadReport {
        config: new.path.display().to_string(),
        restart_needed: daemon_changes(old, &new),
        ..ReloadReport::default()
    };
    // Paths and mounts stay as the daemon started with them.
    new.daemon = old.daemon.clone();
    let gid = control::socket_gid(new.access.socket_group.as_deref())?;
    let running = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let plan = plan(old, &new, &running, state)?;
    let bpffs_dir = old.daemon.bpffs_dir.clone();

    // Held to the end: the resolver cannot learn into a generation being
    // replaced (what it learned is carried into the new one below).
    let mut learned = state.dns.learned();

    // 1. New generations for changed agents, beside the live ones, with the
    // addresses they learned re-judged by their new hostname rules. Nothing
    // points at them yet; on failure they are collected as garbage.
    let written: Vec<(&Agent, u32)> = plan.switched.clone();
    let mut staged = Vec::with_capacity(written.len());
    {
        let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        for (agent, policy_id) in &written {
            let compiled = CompiledPolicy::compile(&agent.allow);
            let written = maps
                .write_generation(&compiled.entries(*policy_id))
                .and_then(|()| learned.stage(&mut maps, &agent.name, *policy_id, &agent.hosts));
            match written {
                Ok(s) => staged.push((agent.name.clone(), s)),
                Err(e) => {
                    collect_unused(&mut maps);
                    return Err(e);
                }
            }
        }
    }

    // 2. Added agents: cgroup, rules, entry, hooks. Undone if one fails.
    let mut installed: Vec<AgentRuntime> = Vec::new();
    for agent in &plan.added {
        match install(state, ebpf, &bpffs_dir, agent) {
            Ok(runtime) => installed.push(runtime),
            Err(e) => {
                let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
                for r in &installed {
                    let _ = enforce::retire(&mut maps, &bpffs_dir, &r.name, &r.cgroup_dir, r.bound);
                }
                collect_unused(&mut maps);
                return Err(Error::Refused(format!(
                    "setting up new agent {}: {e}; nothing was changed",
                    agent.name
                )));
            }
        }
    }

    // 3. The switch: one map update per changed agent. The kill flag is
    // read and written under the same lock the kill switch takes.
    let mut agents = state.agents.write().unwrap_or_else(|p| p.into_inner());
    {
        let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        for (agent, policy_id) in &written {
            // A bound cgroup that does not exist yet is armed with the
            // new rules when it appears.
            let Some(r) = agents
                .iter()
                .find(|r| r.name == agent.name && r.cgroup_id != 0)
            else {
                continue;
            };
            let prev = maps.agent(r.cgroup_id).unwrap_or(AgentEntry {
                agent_id: r.agent_id,
                ..AgentEntry::default()
            });
            maps.set_agent(
                r.cgroup_id,
                AgentEntry {
                    policy_id: *policy_id,
                    mode: mode_value(agent.mode),
                    ..prev
                },
            )?;
        }
        // 4. Removed agents: released if empty, else contained.
        for r in &plan.removed {
            match enforce::retire(&mut maps, &bpffs_dir, &r.name, &r.cgroup_dir, r.bound)? {
                Retirement::Released => report.removed.push(r.name.clone()),
                Retirement::Contained { processes } => {
                    state
                        .retired
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            r.name.clone(),
                            enforce::Retired {
                                dir: r.cgroup_dir.clone(),
                                bound: r.bound,
                            },
                        );
                    report.contained.push(Contained {
                        agent: r.name.clone(),
                        processes,
                    });
                }
            }
        }
    }

    // 5. What the daemon knows, in the new config's order.
    let mut next = Vec::with_capacity(new.agents.len());
    for agent in &new.agents {
        let runtime = if let Some(r) = installed.iter().find(|r| r.name == agent.name) {
            r.clone()
        } else if let Some(r) = agents.iter().find(|r| r.name == agent.name) {
            let policy_id = written
                .iter()
                .find(|(a, _)| a.name == agent.name)
                .map_or(r.policy_id, |(_, id)| *id);
            enforce::runtime(
                agent,
                r.agent_id,
                r.cgroup_id,
                r.cgroup_dir.clone(),
                policy_id,
            )
        } else {
            continue;
        };
        next.push(runtime);
    }
    *agents = next;
    drop(agents);
    for (name, s) in staged {
        learned.commit(&name, s);
    }
    for r in &plan.removed {
        learned.forget(&r.name);
    }
    drop(learned);
    report.added = plan.added.iter().map(|a| a.name.clone()).collect();
    report.changed = written.iter().map(|(a, _)| a.name.clone()).collect();
    report.updated = plan.updated.iter().map(|a| a.name.clone()).collect();
    report.unchanged = plan.unchanged.iter().map(|a| a.name.clone()).collect();
    let regroup = new.access.socket_group != old.access.socket_group;
    let removed_any = !plan.removed.is_empty();
    state.set_config(new);
    if regroup {
        control::regroup(&old.daemon.socket, gid)?;
    }

    // 6. Old generations go once no program can still be walking them
    // (the daemon's housekeeping does it, so the reply need not wait).
    if !report.changed.is_empty() || removed_any {
        *state.gc_due.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + GRACE);
    }
    Ok(report)
}

/// Sets up one added agent with a fresh agent id and generation.
fn install(
    state: &State,
    ebpf: &mut aya::Ebpf,
    bpffs_dir: &std::path::Path,
    agent: &Agent,
) -> Result<AgentRuntime> {
    let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    let used: HashSet<u32> = maps.agents()?.values().map(|e| e.agent_id).collect();
    let agent_id = free_agent_id(&used).ok_or_else(|| Error::Capacity("too many agents".into()))?;
    maps.reset_counts(agent_id)?;
    // Killed before, removed, added back: still killed (fail closed).
    let flags = {
        let mut kills = state.kills.lock().unwrap_or_else(|p| p.into_inner());
        killed_flag(&mut kills, &agent.name, None)
    };
    let policy_id = state.next_policy.fetch_add(1, Ordering::Relaxed);
    let mut kernel = Kernel {
        ebpf,
        maps: &mut maps,
        bpffs_dir,
        cgroups: &state.cgroups,
    };
    let (runtime, _) = enforce::install(&mut kernel, agent, agent_id, policy_id, flags)?;
    Ok(runtime)
}

/// Deletes old generations once their grace period is over. Called by the
/// daemon's housekeeping; takes the reload lock so that it never deletes a
/// generation a reload has just written and not yet switched to.
pub fn collect_when_due(state: &State) {
    let due = *state.gc_due.lock().unwrap_or_else(|p| p.into_inner());
    if due.is_none_or(|at| Instant::now() < at) {
        return;
    }
    let _reload = state.ebpf.lock().unwrap_or_else(|p| p.into_inner());
    collect_unused(&mut state.maps.lock().unwrap_or_else(|p| p.into_inner()));
    *state.gc_due.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Deletes every generation no agent entry points at.
fn collect_unused(maps: &mut crate::maps::PolicyMaps) {
    let live: HashSet<u32> = match maps.agents() {
        Ok(a) => a.values().map(|e| e.policy_id).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing agents for garbage collection failed");
            return;
        }
    };
    if let Err(e) = maps.collect_garbage(&live) {
        tracing::warn!(error = %e, "collecting old policy generations failed");
    }
}
