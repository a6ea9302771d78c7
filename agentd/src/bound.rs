//! Agents bound to cgroups agentd does not own (`cgroup =
//! "system.slice/crm-agent.service"`). systemd removes a service's cgroup
//! when it stops and makes a new one (a new id) when it starts, so
//! enforcement has to follow: a thread blocks on inotify for the new
//! directory and arms it (rules, agent entry, hooks) the moment it appears,
//! before the service's first process has been exec'd. Whatever still slips
//! through the gap (a connection the rules do not allow) is destroyed as
//! soon as enforcement is in place, and the arming is on record with its
//! timing. Housekeeping re-checks every bound cgroup's id twice a second in
//! case an event was missed.
use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, atomic::Ordering},
    time::Instant,
};

use agentd_ebpf::AgentEntry;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::{
    cgroup,
    daemon::{State, killed_flag},
    enforce::mode_value,
    error::{Error, IoContext as _, Result},
    policy::CompiledPolicy,
    programs,
};

/// `state_dir/bound.json`: where bound agents live, so that a daemon that
/// restarts with them gone from its config can still find and contain them.
fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("bound.json")
}

/// Bound agents of earlier configurations: name -> cgroup path.
pub fn recalled(state_dir: &Path) -> BTreeMap<String, String> {
    std::fs::read(record_path(state_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records the bound agents the daemon governs (configured or contained).
pub fn remember(state: &State) {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for a in state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|a| a.bound)
    {
        out.insert(a.name.clone(), rel(state, &a.cgroup_dir));
    }
    for (name, r) in state
        .retired
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, r)| r.bound)
    {
        out.insert(name.clone(), rel(state, &r.dir));
    }
    let path = record_path(&state.config().daemon.state_dir);
    let bytes = serde_json::to_vec_pretty(&out).unwrap_or_default();
    if let Err(e) = std::fs::write(&path, bytes) {
        tracing::error!(error = %e, path = %path.display(), "cannot record bound cgroups");
    }
}

fn rel(state: &State, dir: &Path) -> String {
    state
        .cgroups
        .relative(dir)
        .trim_start_matches('/')
        .to_owned()
}

/// The inotify instance and which parent directory each watch is on.
struct Watcher {
    inotify: Inotify,
    parents: Mutex<HashMap<WatchDescriptor, PathBuf>>,
}

static WATCHER: OnceLock<Arc<Watcher>> = OnceLock::new();

/// Starts the watcher thread (once) and watches every bound cgroup's parent.
pub fn start(state: Arc<State>) -> Result<()> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| Error::Io {
        context: "inotify_init for bound cgroups".into(),
        source: e.into(),
    })?;
    let watcher = Arc::new(Watcher {
        inotify,
        parents: Mutex::default(),
    });
    if WATCHER.set(watcher.clone()).is_err() {
        return Ok(());
    }
    check(&state);
    std::thread::Builder::new()
        .name("agentd-cgroups".into())
        .spawn(move || watch(&watcher, &state))
        .ctx(|| "starting the bound cgroup watcher".into())?;
    Ok(())
}

fn watch(watcher: &Watcher, state: &State) {
    loop {
        let events = match watcher.inotify.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                // Housekeeping's periodic check still re-arms, only slower.
                tracing::error!(error = %e, "bound cgroup watcher stopped; falling back to polling");
                return;
            }
        };
        let seen = Instant::now();
        for ev in events {
            if !ev.mask.contains(AddWatchFlags::IN_CREATE) {
                continue;
            }
            let parent = watcher
                .parents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ev.wd)
                .cloned();
            let (Some(parent), Some(name)) = (parent, ev.name) else {
                continue;
            };
            arm_dir(state, &parent.join(name.as_os_str() as &OsStr), seen);
        }
    }
}

/// Watches the parents of bound cgroups (new ones after a reload, ones that
/// did not exist before) and arms any bound cgroup whose id changed.
/// Called at start, after a reload, and by housekeeping.
pub fn check(state: &State) {
    let bound: Vec<(String, PathBuf, u64)> = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|a| a.bound)
        .map(|a| (a.name.clone(), a.cgroup_dir.clone(), a.cgroup_id))
        .collect();
    if let Some(w) = WATCHER.get() {
        let mut parents = w.parents.lock().unwrap_or_else(|p| p.into_inner());
        for (_, dir, _) in &bound {
            let Some(parent) = dir.parent() else { continue };
            if parents.values().any(|p| p == parent) {
                continue;
            }
            if let Ok(wd) = w.inotify.add_watch(parent, AddWatchFlags::IN_CREATE) {
                parents.insert(wd, parent.to_owned());
            }
        }
    }
    for (_, dir, id) in bound {
        if cgroup::cgroup_id(&dir).is_ok_and(|now| now != id) {
            arm_dir(state, &dir, Instant::now());
        }
    }
}

/// Arms the bound agent whose cgroup is `dir`, if any; logs the outcome.
fn arm_dir(state: &State, dir: &Path, seen: Instant) {
    let name = state
        .agents
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|a| a.bound && a.cgroup_dir == dir)
        .map(|a| a.name.clone());
    let Some(name) = name else { return };
    if let Err(e) = arm(state, &name, seen) {
        tracing::error!(agent = %name, error = %e, "cannot enforce on the agent's new cgroup");
        state.audit.record_now(
            "cgroup_bound",
            serde_json::json!({"agent": name, "result": "error", "error": e.to_string()}),
        );
    }
}

/// Puts enforcement on the agent's (new) cgroup: a fresh rules generation,
/// the agent entry (kill flag from the state file), every hook; then cuts
/// connections made in the gap that the rules do not allow.
fn arm(state: &State, name: &str, seen: Instant) -> Result<()> {
    // The reload lock: rules, entries and hooks change one writer at a time.
    let mut ebpf = state.ebpf.lock().unwrap_or_else(|p| p.into_inner());
    let Some(a) = state.agent(name) else {
        return Ok(());
    };
    let Ok(new_id) = cgroup::cgroup_id(&a.cgroup_dir) else {
        return Ok(()); // Gone again before we got to it.
    };
    if new_id == a.cgroup_id {
        return Ok(());
    }
    let policy_id = state.next_policy.fetch_add(1, Ordering::Relaxed);
    let flags = {
        let mut kills = state.kills.lock().unwrap_or_else(|p| p.into_inner());
        killed_flag(&mut kills, name, None)
    };
    let bpffs_dir = state.config().daemon.bpffs_dir.clone();
    {
        let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.write_generation(&CompiledPolicy::compile(&a.rules).entries(policy_id))?;
        maps.set_agent(
            new_id,
            AgentEntry {
                agent_id: a.agent_id,
                policy_id,
                mode: mode_value(a.mode),
                flags,
            },
        )?;
    }
    let hooks = programs::attach_or_adopt(&mut ebpf, &bpffs_dir, name, &a.cgroup_dir)?;
    {
        let mut maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        for (hook, _) in hooks.iter().filter(|(h, _)| h.identity) {
            maps.set_identity(new_id, hook.attach_type)?;
        }
        if a.cgroup_id != 0 {
            maps.remove_agent(a.cgroup_id)?;
        }
    }
    let armed_us = seen.elapsed().as_secs_f64() * 1e6;
    if let Some(r) = state
        .agents
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .iter_mut()
        .find(|r| r.name == name)
    {
        r.cgroup_id = new_id;
        r.policy_id = policy_id;
    }
    drop(ebpf);
    let killed = flags != 0;
    let swept = crate::sockets::sweep(new_id, |ip, port, tcp| {
        !killed && a.rules.iter().any(|r| r.matches(ip, port, tcp))
    })
    .unwrap_or_else(|e| {
        tracing::error!(agent = %name, error = %e, "sweeping the new cgroup's sockets failed");
        0
    });
    *state.gc_due.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(Instant::now() + crate::reload::GRACE);
    tracing::info!(agent = %name, cgroup_id = new_id, armed_us, swept, "enforcement armed on the agent's new cgroup");
    state.audit.record_now(
        "cgroup_bound",
        serde_json::json!({
            "agent": name,
            "result": "ok",
            "cgroup": rel(state, &a.cgroup_dir),
            "cgroup_id": new_id,
            "previous_cgroup_id": a.cgroup_id,
            "armed_us": armed_us,
            "swept_sockets": swept,
            "killed": killed,
        }),
    );
    Ok(())
}
