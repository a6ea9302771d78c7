//! The daemon: put every agent's enforcement in place (or re-adopt what a
//! previous daemon pinned), then serve the control socket and the audit
//! pipeline. Enforcement lives in the kernel; the daemon can die without
//! opening a gap.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, RwLock, atomic::AtomicU32},
    time::{Duration, Instant},
};

use agentd_ebpf::{AGENT_KILLED, AgentEntry};
use aya::Ebpf;
use tokio::signal::unix::{SignalKind, signal};

pub use crate::enforce::{AgentRuntime, DENY_ALL_POLICY};
use crate::{
    audit::AuditLog,
    bpffs,
    cgroup::{self, CgroupTree},
    config::Config,
    control,
    enforce::{self, Kernel, Retired, Retirement},
    error::{Error, IoContext as _, Result},
    events,
    kill::KillState,
    maps::{PolicyMaps, free_agent_id},
    programs,
    sessions::Sessions,
};

/// What the daemon's tasks share.
pub struct State {
    /// Replaced whole by a reload; readers take a snapshot.
    config: RwLock<Arc<Config>>,
    pub cgroups: CgroupTree,
    pub agents: RwLock<Vec<AgentRuntime>>,
    pub maps: Mutex<PolicyMaps>,
    /// The loaded programs, attached to new agents' cgroups by reload. Held
    /// for the whole of a reload: reloads never overlap.
    pub ebpf: Mutex<Ebpf>,
    pub sessions: Mutex<Sessions>,
    pub kills: Mutex<KillState>,
    pub audit: AuditLog,
    /// The next unused policy generation.
    pub next_policy: AtomicU32,
    /// Agents removed from the config whose processes still run, by name:
    /// contained under deny-all and reported until their cgroup is empty.
    pub retired: Mutex<BTreeMap<String, Retired>>,
    /// When the policy generations a reload replaced may be deleted.
    pub gc_due: Mutex<Option<Instant>>,
    pub metrics: crate::metrics::Metrics,
    /// The resolver for agents with hostname rules.
    pub dns: crate::dns::Resolver,
}

impl State {
    /// The configuration in force (a snapshot: a reload replaces it whole).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The running agent of that name, as the daemon knows it now.
    pub fn agent(&self, name: &str) -> Option<AgentRuntime> {
        self.agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|a| a.name == name)
            .cloned()
    }

    pub(crate) fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
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

    // Names behind what agents learned before the restart (see dns::saved).
    let saved = crate::dns::saved::Saved::load(&config.daemon.state_dir);
    let mut learned = crate::dns::learned::Learned::default();
    let previously_learned = if saved.agents.is_empty() {
        HashMap::new()
    } else {
        maps.learned_by_generation()
    };

    let mut runtimes = Vec::with_capacity(config.agents.len());
    let mut adopted = 0usize;
    let mut next_policy = first_policy;
    for agent in &config.agents {
        let cgroup_id = enforce::cgroup_of(&cgroups, agent)?;
        let previous = cgroup_id.and_then(|id| existing.get(&id).copied());
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
        // A pulled kill switch stays pulled across restarts and reboots,
        // from before the first packet.
        let flags = killed_flag(&mut kills, &agent.name, previous);
        let mut kernel = Kernel {
            ebpf: &mut ebpf,
            maps: &mut maps,
            bpffs_dir: &bpffs_dir,
            cgroups: &cgroups,
        };
        // Into the new generation before the agent points at it: an
        // address it cached across the restart keeps working.
        if let (Some(p), Some(names)) = (previous, saved.agents.get(&agent.name))
            && !agent.hosts.is_empty()
        {
            let old = previously_learned
                .get(&p.policy_id)
                .map_or(&[][..], Vec::as_slice);
            if let Err(e) = learned.restore(
                kernel.maps,
                &agent.name,
                next_policy,
                &agent.hosts,
                names,
                old,
            ) {
                tracing::warn!(agent = %agent.name, error = %e, "learned addresses not restored; the agent re-resolves");
            }
        }
        let (runtime, was_adopted) =
            enforce::install(&mut kernel, agent, agent_id, next_policy, flags)?;
        if runtime.cgroup_id == 0 {
            // Not installed (a bound cgroup that is gone): nothing points
            // at the generation, and what was written there is collected.
            learned.forget(&agent.name);
        }
        next_policy += 1;
        adopted += usize::from(was_adopted);
        runtimes.push(runtime);
    }

    let restored: usize = runtimes.iter().map(|r| learned.count(&r.name)).sum();
    let (released, contained) =
        retire_removed_agents(&config, &cgroups, &mut maps, &existing, &runtimes)?;

    let live: HashSet<u32> = maps.agents()?.values().map(|e| e.policy_id).collect();
    maps.collect_garbage(&live)?;

    let config_state_dir = config.daemon.state_dir.clone();
    let retired_names: Vec<&String> = contained.keys().collect();
    let retired_json = serde_json::json!({"released": released, "contained": retired_names});
    let state = Arc::new(State {
        config: RwLock::new(Arc::new(config)),
        cgroups,
        agents: RwLock::new(runtimes),
        maps: Mutex::new(maps),
        ebpf: Mutex::new(ebpf),
        sessions: Mutex::new(Sessions::load(&config_state_dir)),
        kills: Mutex::new(kills),
        audit,
        next_policy: AtomicU32::new(next_policy),
        retired: Mutex::new(contained),
        gc_due: Mutex::new(None),
        metrics: crate::metrics::Metrics::new(),
        dns: crate::dns::Resolver::with_learned(learned),
    });
    let config = state.config();
    let agent_names: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    state.audit.record_now(
        "daemon_start",
        serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
            "config": config.path,
            "agents": agent_names,
            "adopted": adopted,
            "retired": retired_json,
            "learned_restored": restored,
            "setup_ms": started.elapsed().as_secs_f64() * 1e3,
        }),
    );

    crate::bound::remember(&state);
    crate::bound::start(state.clone())?;
    tokio::spawn(events::run(ring, state.clone()));
    tokio::spawn(events::watch_losses(state.clone()));
    tokio::spawn(housekeeping(state.clone()));
    // Agents with hostname rules get their resolver before readiness: an
    // agent started once agentd is ready finds its DNS answered.
    crate::dns::sync(&state)?;
    tokio::spawn(crate::dns::sweep(state.clone()));

    // Bound before readiness: a configured endpoint that cannot be served is
    // a start-up error, not a silent gap in monitoring.
    if let Some(addr) = config.daemon.metrics_listen.0 {
        let listener = crate::metrics::http::bind(addr).await?;
        tracing::info!(listen = %addr, "serving /metrics");
        tokio::spawn(crate::metrics::http::serve(listener, state.clone()));
    }

    // Ready: every agent's enforcement is in place.
    let socket = config.daemon.socket.clone();
    let listener = control::bind(&socket, config.access.socket_group.as_deref())?;
    tracing::info!(
        socket = %socket.display(),
        agents = agent_names.len(),
        adopted,
        setup_ms = started.elapsed().as_millis() as u64,
        "agentd ready"
    );
    tokio::spawn(control::serve(listener, state.clone()));
    // Under systemd (Type=notify), readiness means enforcement is in place
    // and the control socket answers. Outside systemd this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not notify systemd of readiness");
    }

    let mut term = signal(SignalKind::terminate()).ctx(|| "installing SIGTERM handler".into())?;
    let mut int = signal(SignalKind::interrupt()).ctx(|| "installing SIGINT handler".into())?;
    let mut hup = signal(SignalKind::hangup()).ctx(|| "installing SIGHUP handler".into())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let state = state.clone();
                // The outcome is logged and on record either way.
                let _ = tokio::task::spawn_blocking(move || crate::reload::reload(&state)).await;
            }
        }
    }
    let _ = std::fs::remove_file(&socket);
    // Nothing will answer on the resolver ports once we are gone, and
    // another local process could take them: agents' DNS is judged by
    // their rules again (denied unless allowed) until the next start.
    crate::dns::stop(&state);
    crate::dns::save(&state);
    state.audit.record_now(
        "daemon_stop",
        serde_json::json!({"pid": std::process::id(), "enforcement": "kept (pinned)"}),
    );
    tracing::info!("agentd stopping; enforcement stays pinned in the kernel");
    // Drop the program handles without detaching: the pinned links keep
    // them attached.
    drop(state);
    Ok(())
}

/// How often housekeeping runs.
const HOUSEKEEPING: Duration = Duration::from_millis(500);

/// Releases retired agents once their last process is gone, and deletes
/// policy generations a reload replaced once nothing can read them.
async fn housekeeping(state: Arc<State>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    loop {
        tick.tick().await;
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            release_empty(&state);
            crate::bound::check(&state);
            crate::reload::collect_when_due(&state);
        })
        .await;
    }
}

fn release_empty(state: &State) {
    let retired: Vec<(String, Retired)> = state
        .retired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(n, r)| (n.clone(), r.clone()))
        .collect();
    let bpffs_dir = state.config().daemon.bpffs_dir.clone();
    for (name, r) in retired {
        let result = {
            let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
            enforce::retire(&mut maps, &bpffs_dir, &name, &r.dir, r.bound)
        };
        match result {
            Ok(Retirement::Released) => {
                state
                    .retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&name);
                crate::bound::remember(state);
                tracing::info!(agent = %name, "removed agent's last process exited; released");
                state.audit.record_now(
                    "agent_released",
                    serde_json::json!({"agent": name, "why": "removed from the config; its last process exited"}),
                );
            }
            Ok(Retirement::Contained { .. }) => {}
            Err(e) => {
                tracing::error!(agent = %name, error = %e, "releasing a removed agent failed")
            }
        }
    }
}

/// The killed flag for an agent at start-up: killed if the state file or the
/// pinned kernel state says so (either alone is enough: fail closed).
pub(crate) fn killed_flag(kills: &mut KillState, agent: &str, previous: Option<AgentEntry>) -> u32 {
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
/// cgroup is empty, otherwise kept contained with no access at all. Returns
/// the released names and the contained ones with their cgroups.
fn retire_removed_agents(
    config: &Config,
    cgroups: &CgroupTree,
    maps: &mut PolicyMaps,
    existing: &HashMap<u64, AgentEntry>,
    runtimes: &[AgentRuntime],
) -> Result<(Vec<String>, BTreeMap<String, Retired>)> {
    let configured: HashSet<u64> = runtimes.iter().map(|a| a.cgroup_id).collect();
    let mut released = Vec::new();
    let mut contained = BTreeMap::new();
    // Where earlier configurations bound agents to existing cgroups.
    let bound = crate::bound::recalled(&config.daemon.state_dir);
    let dir_of = |name: &str| match bound.get(name) {
        Some(rel) => (cgroups.mount.join(rel), true),
        None => (cgroups.agent_dir(name), false),
    };
    for name in bpffs::pinned_agents(&config.daemon.bpffs_dir) {
        if config.agent(&name).is_some() {
            continue;
        }
        let (dir, is_bound) = dir_of(&name);
        match enforce::retire(maps, &config.daemon.bpffs_dir, &name, &dir, is_bound)? {
            Retirement::Released => released.push(name),
            Retirement::Contained { .. } => {
                contained.insert(
                    name,
                    Retired {
                        dir,
                        bound: is_bound,
                    },
                );
            }
        }
    }
    // Entries whose cgroup is gone entirely.
    let live_dirs: HashSet<u64> = bpffs::pinned_agents(&config.daemon.bpffs_dir)
        .iter()
        .filter_map(|n| cgroup::cgroup_id(&dir_of(n).0).ok())
        .collect();
    for id in existing.keys() {
        if !configured.contains(id) && !live_dirs.contains(id) {
            maps.remove_agent(*id)?;
        }
    }
    Ok((released, contained))
}
