//! The daemon: put every agent's enforcement in place (or re-adopt what a
//! previous daemon pinned), then serve the control socket and the audit
//! pipeline. Enforcement lives in the kernel; the daemon can die without
//! opening a gap.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use agentd_ebpf::{AGENT_KILLED, AgentEntry, MODE_AUDIT, MODE_ENFORCE};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    audit::AuditLog,
    bpffs,
    cgroup::{self, CgroupTree},
    config::{Config, Mode, Rule},
    control,
    error::{Error, IoContext as _, Result},
    events,
    kill::KillState,
    maps::{PolicyMaps, free_agent_id},
    policy::{CompiledPolicy, RuleIndex},
    programs::{self, Attachment},
    sessions::Sessions,
};

/// Policy generation 0 is never written: an agent pointed at it may reach
/// nothing. Used for agents removed from the config that still have processes.
pub const DENY_ALL_POLICY: u32 = 0;

/// An agent as the running daemon knows it.
#[derive(Debug, Clone)]
pub struct AgentRuntime {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub mode: Mode,
    pub rules: Vec<Rule>,
    /// Names the rule behind an allow verdict in the audit log.
    pub rule_index: RuleIndex,
    pub agent_id: u32,
    pub cgroup_id: u64,
    pub cgroup_dir: PathBuf,
    pub policy_id: u32,
}

/// What the daemon's tasks share.
pub struct State {
    pub config: Config,
    pub cgroups: CgroupTree,
    pub agents: RwLock<Vec<AgentRuntime>>,
    pub maps: Mutex<PolicyMaps>,
    pub sessions: Mutex<Sessions>,
    pub kills: Mutex<KillState>,
    pub audit: AuditLog,
}

fn mode_value(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let started = Instant::now();
    let cgroups = CgroupTree::new(&config.daemon.cgroup_root)?;
    let bpffs_dir = config.daemon.bpffs_dir.clone();
    bpffs::ensure(&bpffs_dir)?;
    std::fs::create_dir_all(&config.daemon.state_dir)
        .ctx(|| format!("creating {}", config.daemon.state_dir.display()))?;
    // One daemon per state: a second one would fight over maps and socket.
    let _lock = lock_state_dir(&config.daemon.state_dir)?;
    let audit = AuditLog::open(&config.daemon.audit_log)?;
    // Pulled switches survive reboots through this file (pins do not).
    let mut kills = KillState::load(&config.daemon.state_dir)?;

    let mut ebpf = programs::load(&bpffs_dir)?;
    let (mut maps, ring) = PolicyMaps::take(&mut ebpf)?;

    // What a previous daemon left enforcing.
    let existing = maps.agents()?;
    // Orphaned generations (a write cut short) would collide with new ids.
    let live: HashSet<u32> = existing.values().map(|e| e.policy_id).collect();
    maps.collect_garbage(&live)?;
    let first_policy = live.iter().copied().max().unwrap_or(DENY_ALL_POLICY) + 1;
    let mut used_ids: HashSet<u32> = existing.values().map(|e| e.agent_id).collect();

    let mut runtimes = Vec::with_capacity(config.agents.len());
    let mut adopted = 0usize;
    for (policy_id, agent) in (first_policy..).zip(&config.agents) {
        let cgroup_dir = cgroups.agent_dir(&agent.name);
        let cgroup_id = cgroups.ensure_agent(&agent.name)?;
        let previous = existing.get(&cgroup_id).copied();
        let agent_id = match previous {
            Some(p) => p.agent_id,
            None => {
                let id = free_agent_id(&used_ids)
                    .ok_or_else(|| Error::Capacity("too many agents".into()))?;
                used_ids.insert(id);
                maps.reset_counts(id)?;
                id
            }
        };
        // Write the new generation beside the live one, then switch the
        // agent to it in one update.
        let compiled = CompiledPolicy::compile(&agent.allow);
        maps.write_generation(&compiled.entries(policy_id))?;
        maps.set_agent(
            cgroup_id,
            AgentEntry {
                agent_id,
                policy_id,
                mode: mode_value(agent.mode),
                // A pulled kill switch stays pulled across restarts and
                // reboots, from before the first packet.
                flags: killed_flag(&mut kills, &agent.name, previous),
            },
        )?;
        let hooks = programs::attach_or_adopt(&mut ebpf, &bpffs_dir, &agent.name, &cgroup_dir)?;
        for (hook, _) in &hooks {
            maps.set_identity(cgroup_id, hook.attach_type)?;
        }
        if hooks.iter().all(|(_, a)| *a == Attachment::Adopted) {
            adopted += 1;
        }
        runtimes.push(AgentRuntime {
            name: agent.name.clone(),
            owner: agent.owner.clone(),
            description: agent.description.clone(),
            mode: agent.mode,
            rules: agent.allow.clone(),
            rule_index: RuleIndex::new(&agent.allow),
            agent_id,
            cgroup_id,
            cgroup_dir,
            policy_id,
        });
    }

    let retired = retire_removed_agents(&config, &cgroups, &mut maps, &existing, &runtimes)?;

    let live: HashSet<u32> = maps.agents()?.values().map(|e| e.policy_id).collect();
    maps.collect_garbage(&live)?;

    let config_state_dir = config.daemon.state_dir.clone();
    let state = Arc::new(State {
        config,
        cgroups,
        agents: RwLock::new(runtimes),
        maps: Mutex::new(maps),
        sessions: Mutex::new(Sessions::load(&config_state_dir)),
        kills: Mutex::new(kills),
        audit,
    });
    let agent_names: Vec<String> = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|a| a.name.clone())
        .collect();
    state.audit.record_now(
        "daemon_start",
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "config": state.config.path,
            "agents": agent_names,
            "adopted": adopted,
            "retired": retired,
            "setup_ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );

    tokio::spawn(events::run(ring, state.clone()));
    tokio::spawn(events::watch_losses(state.clone()));

    // Ready: every agent's enforcement is in place.
    let socket = state.config.daemon.socket.clone();
    let listener = control::bind(&socket, state.config.access.socket_group.as_deref())?;
    tracing::info!(
        socket = %socket.display(),
        agents = agent_names.len(),
        adopted,
        setup_ms = started.elapsed().as_millis() as u64,
        "agentd ready"
    );
    tokio::spawn(control::serve(listener, state.clone()));

    let mut term = signal(SignalKind::terminate()).ctx(|| "installing SIGTERM handler".into())?;
    let mut int = signal(SignalKind::interrupt()).ctx(|| "installing SIGINT handler".into())?;
    let mut hup = signal(SignalKind::hangup()).ctx(|| "installing SIGHUP handler".into())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // SIGHUP must not kill the daemon (its default action). Live
            // reload is not implemented yet; say so instead of pretending.
            _ = hup.recv() => tracing::warn!(
                "SIGHUP: live reload is not supported yet; restart agentd to apply a new config \
                 (enforcement is kept across restarts)"
            ),
        }
    }
    let _ = std::fs::remove_file(&socket);
    state.audit.record_now(
        "daemon_stop",
        serde_json::json!({"pid": std::process::id(), "enforcement": "kept (pinned)"}),
    );
    tracing::info!("agentd stopping; enforcement stays pinned in the kernel");
    // Drop the program handles without detaching: the pinned links keep
    // them attached.
    drop(ebpf);
    Ok(())
}

/// The killed flag for an agent at start-up: killed if the state file or the
/// pinned kernel state says so (either alone is enough: fail closed).
fn killed_flag(kills: &mut KillState, agent: &str, previous: Option<AgentEntry>) -> u32 {
    let in_kernel = previous.is_some_and(|p| p.flags & AGENT_KILLED != 0);
    if in_kernel && !kills.killed.contains_key(agent) {
        kills.killed.insert(
            agent.to_owned(),
            crate::kill::KillRecord {
                reason: "found killed in the pinned kernel state; the state file had no record"
                    .into(),
                by_uid: 0,
                by_user: None,
                by_pid: 0,
                at: crate::audit::rfc3339(std::time::SystemTime::now()),
            },
        );
        if let Err(e) = kills.save() {
            tracing::error!(error = %e, "cannot record kill state");
        }
    }
    if in_kernel || kills.killed.contains_key(agent) {
        tracing::warn!(
            agent,
            "agent is KILLED: no network access until `agentd restore`"
        );
        AGENT_KILLED
    } else {
        0
    }
}

/// Takes an exclusive lock on `state_dir/agentd.lock` for the daemon's life.
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("agentd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ctx(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        Error::Refused(format!(
            "another agentd daemon holds {} ({e}); refusing to start a second one",
            path.display()
        ))
    })
}

/// Agents that are pinned but no longer configured: released when their
/// cgroup is empty, otherwise kept contained with no access at all.
fn retire_removed_agents(
    config: &Config,
    cgroups: &CgroupTree,
    maps: &mut PolicyMaps,
    existing: &HashMap<u64, AgentEntry>,
    runtimes: &[AgentRuntime],
) -> Result<Vec<String>> {
    let configured: HashSet<u64> = runtimes.iter().map(|a| a.cgroup_id).collect();
    let mut retired = Vec::new();
    for name in bpffs::pinned_agents(&config.daemon.bpffs_dir) {
        if config.agent(&name).is_some() {
            continue;
        }
        let dir = cgroups.agent_dir(&name);
        let procs = if dir.exists() {
            cgroup::processes(&dir)?
        } else {
            Vec::new()
        };
        let cgroup_id = cgroup::cgroup_id(&dir).ok();
        if procs.is_empty() {
            programs::remove_links(&config.daemon.bpffs_dir, &name)?;
            if let Some(id) = cgroup_id {
                maps.remove_agent(id)?;
            }
            let _ = cgroup::remove_tree(&dir);
            retired.push(name);
        } else if let Some(id) = cgroup_id {
            let prev = existing.get(&id).copied().unwrap_or_default();
            maps.set_agent(
                id,
                AgentEntry {
                    policy_id: DENY_ALL_POLICY,
                    mode: MODE_ENFORCE,
                    ..prev
                },
            )?;
            tracing::warn!(agent = %name, processes = procs.len(), "agent removed from config still has processes; kept contained with no network access");
        }
    }
    // Entries whose cgroup is gone entirely.
    let live_dirs: HashSet<u64> = bpffs::pinned_agents(&config.daemon.bpffs_dir)
        .iter()
        .filter_map(|n| cgroup::cgroup_id(&cgroups.agent_dir(n)).ok())
        .collect();
    for id in existing.keys() {
        if !configured.contains(id) && !live_dirs.contains(id) {
            maps.remove_agent(*id)?;
        }
    }
    Ok(retired)
}
