//! `agentd teardown`: remove everything agentd installed (pinned links and
//! maps, agent cgroups). Refuses while the daemon runs, and while agent
//! processes live unless forced, in which case they are killed first: a
//! security tool never silently leaves an agent running uncontained.
use std::{fs, path::PathBuf, time::Duration};

use crate::{
    bpffs, cgroup,
    cgroup::CgroupTree,
    client,
    config::Config,
    error::{Error, IoContext as _, Result},
};

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub killed: Vec<(String, usize)>,
    pub removed_cgroups: Vec<PathBuf>,
    pub removed_pins: bool,
}

pub fn teardown(config: &Config, force: bool) -> Result<Report> {
    if client::ping(&config.daemon.socket).is_ok() {
        return Err(Error::Refused(format!(
            "agentd is running (control socket {} answers); stop it first",
            config.daemon.socket.display()
        )));
    }
    let tree = CgroupTree::new(&config.daemon.cgroup_root)?;
    // Bound cgroups are the services' own: processes are handled like any
    // agent's, but the directories are never removed.
    let mut bound = crate::bound::recalled(&config.daemon.state_dir);
    for a in &config.agents {
        if let Some(c) = &a.cgroup {
            bound.insert(a.name.clone(), c.clone());
        }
    }
    let dir_of = |name: &str| match bound.get(name) {
        Some(rel) => tree.mount.join(rel),
        None => tree.agent_dir(name),
    };
    // Configured agents, plus any agent directory or pin left from older configs.
    let mut names: Vec<String> = config.agents.iter().map(|a| a.name.clone()).collect();
    names.extend(bpffs::pinned_agents(&config.daemon.bpffs_dir));
    if let Ok(entries) = fs::read_dir(&tree.root) {
        names.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    names.sort();
    names.dedup();

    let mut busy = Vec::new();
    for name in &names {
        let dir = dir_of(name);
        if dir.exists() {
            let procs = cgroup::processes(&dir)?;
            if !procs.is_empty() {
                busy.push((name.clone(), procs));
            }
        }
    }
    if !busy.is_empty() && !force {
        let list: Vec<String> = busy
            .iter()
            .map(|(n, p)| format!("{n} ({} processes: {:?})", p.len(), p))
            .collect();
        return Err(Error::Refused(format!(
            "agent processes are still running: {}; stop them, or pass --force to kill them",
            list.join(", ")
        )));
    }
    let mut report = Report::default();
    for (name, procs) in &busy {
        cgroup::kill_all(&dir_of(name), Duration::from_secs(10))?;
        report.killed.push((name.clone(), procs.len()));
    }
    // Unpinning the links detaches the programs; unpinning the maps frees them.
    if config.daemon.bpffs_dir.exists() {
        fs::remove_dir_all(&config.daemon.bpffs_dir)
            .ctx(|| format!("removing {}", config.daemon.bpffs_dir.display()))?;
        report.removed_pins = true;
    }
    for name in names.iter().filter(|n| !bound.contains_key(*n)) {
        let dir = tree.agent_dir(name);
        if dir.exists() {
            cgroup::remove_tree(&dir)?;
            report.removed_cgroups.push(dir);
        }
    }
    // The root only if nothing else lives there.
    if tree.root.exists() && fs::remove_dir(&tree.root).is_ok() {
        report.removed_cgroups.push(tree.root.clone());
    }
    let _ = fs::remove_file(&config.daemon.socket);
    Ok(report)
}
