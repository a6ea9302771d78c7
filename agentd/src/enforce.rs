//! Putting one agent's enforcement in place, switching it to new rules, and
//! retiring it. Shared by daemon start-up and live reload, so both follow
//! the same order: rules are written before anything points at them, and an
//! agent's rules change with one map update.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use agentd_ebpf::{AgentEntry, MODE_AUDIT, MODE_ENFORCE};
use aya::Ebpf;

use crate::{
    cgroup::{self, CgroupTree},
    config::{Agent, Mode, Rule},
    dns::HostRules,
    error::Result,
    maps::PolicyMaps,
    policy::{CompiledPolicy, RuleIndex},
    programs::{self, Attachment},
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
    /// Hostname rules, answered by agentd's resolver.
    pub hosts: Arc<HostRules>,
    pub agent_id: u32,
    pub cgroup_id: u64,
    pub cgroup_dir: PathBuf,
    pub policy_id: u32,
    /// The cgroup is bound (exists apart from agentd): never created or
    /// removed here. A bound cgroup that does not exist has `cgroup_id` 0
    /// until it appears.
    pub bound: bool,
}

pub fn mode_value(mode: Mode) -> u32 {
    match mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// Where the kernel objects live.
pub struct Kernel<'a> {
    pub ebpf: &'a mut Ebpf,
    pub maps: &'a mut PolicyMaps,
    pub bpffs_dir: &'a Path,
    pub cgroups: &'a CgroupTree,
}

/// The id of the agent's cgroup, creating it unless it is bound; `None`
/// for a bound cgroup that does not exist (yet).
pub fn cgroup_of(cgroups: &CgroupTree, agent: &Agent) -> Result<Option<u64>> {
    if agent.cgroup.is_some() {
        Ok(cgroup::cgroup_id(&cgroups.dir_of(agent)).ok())
    } else {
        cgroups.ensure_agent(&agent.name).map(Some)
    }
}

/// Creates (or finds) the agent's cgroup, writes its rules as generation
/// `policy_id`, points the agent at them with `flags`, and attaches (or
/// re-adopts) every hook. Returns the runtime and whether every hook was
/// found already attached. A bound cgroup that does not exist yet is left
/// for the watcher (`bound`) to arm when it appears.
pub fn install(
    k: &mut Kernel<'_>,
    agent: &Agent,
    agent_id: u32,
    policy_id: u32,
    flags: u32,
) -> Result<(AgentRuntime, bool)> {
    let cgroup_dir = k.cgroups.dir_of(agent);
    let Some(cgroup_id) = cgroup_of(k.cgroups, agent)? else {
        return Ok((runtime(agent, agent_id, 0, cgroup_dir, policy_id), false));
    };
    let compiled = CompiledPolicy::compile(&agent.allow);
    k.maps.write_generation(&compiled.entries(policy_id))?;
    k.maps.set_agent(
        cgroup_id,
        AgentEntry {
            agent_id,
            policy_id,
            mode: mode_value(agent.mode),
            flags,
        },
    )?;
    let hooks = programs::attach_or_adopt(k.ebpf, k.bpffs_dir, &agent.name, &cgroup_dir)?;
    for (hook, _) in hooks.iter().filter(|(h, _)| h.identity) {
        k.maps.set_identity(cgroup_id, hook.attach_type)?;
    }
    let adopted = hooks.iter().all(|(_, a)| *a == Attachment::Adopted);
    Ok((
        runtime(agent, agent_id, cgroup_id, cgroup_dir, policy_id),
        adopted,
    ))
}

pub fn runtime(
    agent: &Agent,
    agent_id: u32,
    cgroup_id: u64,
    cgroup_dir: PathBuf,
    policy_id: u32,
) -> AgentRuntime {
    AgentRuntime {
        name: agent.name.clone(),
        owner: agent.owner.clone(),
        description: agent.description.clone(),
        mode: agent.mode,
        rules: agent.allow.clone(),
        rule_index: RuleIndex::new(&agent.allow),
        hosts: HostRules::new(&agent.hosts),
        agent_id,
        cgroup_id,
        cgroup_dir,
        policy_id,
        bound: agent.cgroup.is_some(),
    }
}

/// An agent removed from the config whose processes still run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    pub dir: PathBuf,
    pub bound: bool,
}

/// What became of an agent that left the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retirement {
    /// Empty: hooks detached, entry and cgroup removed.
    Released,
    /// Processes still run: kept under deny-all until the cgroup is empty.
    Contained { processes: usize },
}

/// Retires an agent no longer configured. With processes left it is kept
/// contained (policy generation 0: nothing allowed, killed flag kept);
/// otherwise everything agentd made for it is removed (a bound cgroup
/// itself is not agentd's, and stays).
pub fn retire(
    maps: &mut PolicyMaps,
    bpffs_dir: &Path,
    name: &str,
    cgroup_dir: &Path,
    bound: bool,
) -> Result<Retirement> {
    let procs = if cgroup_dir.exists() {
        cgroup::processes(cgroup_dir)?
    } else {
        Vec::new()
    };
    let cgroup_id = cgroup::cgroup_id(cgroup_dir).ok();
    if procs.is_empty() {
        programs::remove_links(bpffs_dir, name)?;
        if let Some(id) = cgroup_id {
            maps.remove_agent(id)?;
        }
        if !bound {
            let _ = cgroup::remove_tree(cgroup_dir);
        }
        return Ok(Retirement::Released);
    }
    if let Some(id) = cgroup_id {
        let prev = maps.agent(id).unwrap_or_default();
        maps.set_agent(
            id,
            AgentEntry {
                policy_id: DENY_ALL_POLICY,
                mode: MODE_ENFORCE,
                ..prev
            },
        )?;
    }
    tracing::warn!(agent = %name, processes = procs.len(), "agent removed from config still has processes; kept contained with no network access");
    Ok(Retirement::Contained {
        processes: procs.len(),
    })
}
