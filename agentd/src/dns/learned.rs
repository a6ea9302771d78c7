//! Addresses agentd's resolver learned for agents' hostname rules: what the
//! kernel's learned-address map holds, and why.
//!
//! Each address remembers the names (and rules) it was answered for, each
//! with its own expiry. The kernel entry carries the union of those rules'
//! ports and the latest expiry; the kernel checks that expiry itself, and
//! the sweeper narrows or removes entries as single names expire.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use agentd_ebpf::{AF_INET, AF_INET6, LearnedKey, LearnedValue};

use crate::{
    config::HostRule,
    control::LearnedInfo,
    dns::{
        names::HostMatcher,
        saved::{Saved, SavedName},
    },
    error::{Error, Result},
    maps::PolicyMaps,
    policy::{Access, MapEntries},
};

/// Port sets of learned entries are numbered from here within a generation,
/// clear of the compiled rules' port sets (at most one per prefix).
const PORT_SET_BASE: u32 = 1 << 24;
/// Addresses one agent may have learned at once; past this, answers that
/// would add more are refused (SERVFAIL) rather than evicting others.
pub const MAX_PER_AGENT: usize = 16_384;
/// Names one address may be learned through at once.
const MAX_NAMES_PER_ADDR: usize = 64;
/// How long an address that left the map is still named in the audit log
/// (a connect decided just before expiry is logged just after).
const RECENT: Duration = Duration::from_secs(120);

/// Now on the clock the kernel compares expiries against.
pub fn now_ns() -> u64 {
    crate::events::kernel_now_ns().unwrap_or(0)
}

#[derive(Debug, Clone)]
struct Source {
    name: String,
    rule: usize,
    access: Access,
    expires_ns: u64,
}

/// One agent's learned addresses under one policy generation.
#[derive(Debug, Clone, Default)]
pub struct AgentLearned {
    policy_id: u32,
    addrs: HashMap<IpAddr, Vec<Source>>,
    port_sets: HashMap<Access, u32>,
}

impl AgentLearned {
    fn new(policy_id: u32) -> Self {
        Self {
            policy_id,
            ..Self::default()
        }
    }

    /// This state re-judged by `hosts` and written under generation
    /// `policy_id` (nothing points at it yet). Names no rule allows are
    /// dropped; ports follow the rules.
    fn rejudge(
        &self,
        maps: &mut PolicyMaps,
        policy_id: u32,
        hosts: &[HostRule],
    ) -> Result<AgentLearned> {
        let mut staged = AgentLearned::new(policy_id);
        let matcher = HostMatcher::new(hosts);
        for (addr, sources) in &self.addrs {
            for s in sources {
                let grants: Vec<(usize, Access)> = matcher
                    .matching(&s.name)
                    .into_iter()
                    .map(|i| (i, Access::of(hosts[i].ports.as_deref(), hosts[i].protocol)))
                    .collect();
                staged.add(*addr, &s.name, &grants, s.expires_ns);
            }
            staged.write(maps, *addr)?;
        }
        staged.addrs.retain(|_, s| !s.is_empty());
        Ok(staged)
    }

    fn key(&self, addr: IpAddr) -> LearnedKey {
        let mut bytes = [0u8; 16];
        let family = match addr {
            IpAddr::V4(a) => {
                bytes[..4].copy_from_slice(&a.octets());
                AF_INET
            }
            IpAddr::V6(a) => {
                bytes = a.octets();
                AF_INET6
            }
        };
        LearnedKey {
            policy_id: self.policy_id,
            family,
            _pad: [0; 3],
            addr: bytes,
        }
    }

    /// Writes the kernel entry for `addr` from its sources (removes it when
    /// none is left).
    fn write(&mut self, maps: &mut PolicyMaps, addr: IpAddr) -> Result<()> {
        let key = self.key(addr);
        let Some(sources) = self.addrs.get(&addr).filter(|s| !s.is_empty()) else {
            return maps.remove_learned(&key);
        };
        let access = sources
            .iter()
            .fold(Access::default(), |a, s| a.union(&s.access));
        let expires_ns = sources.iter().map(|s| s.expires_ns).max().unwrap_or(0);
        let port_set = if access.needs_port_set() {
            match self.port_sets.get(&access) {
                Some(&set) => set,
                None => {
                    let set = PORT_SET_BASE + self.port_sets.len() as u32;
                    maps.write_generation(&MapEntries {
                        port_blocks: access.port_blocks(self.policy_id, set),
                        ..MapEntries::default()
                    })?;
                    self.port_sets.insert(access.clone(), set);
                    set
                }
            }
        } else {
            0
        };
        maps.set_learned(
            &key,
            &LearnedValue {
                port_set,
                flags: access.flags(),
                expires_ns,
            },
        )
    }

    /// Adds (or extends) `name`'s claim on `addr` for each granting rule.
    fn add(&mut self, addr: IpAddr, name: &str, grants: &[(usize, Access)], expires_ns: u64) {
        let sources = self.addrs.entry(addr).or_default();
        for (rule, access) in grants {
            if let Some(s) = sources
                .iter_mut()
                .find(|s| s.rule == *rule && s.name == name)
            {
                s.expires_ns = s.expires_ns.max(expires_ns);
            } else if sources.len() < MAX_NAMES_PER_ADDR {
                sources.push(Source {
                    name: name.to_owned(),
                    rule: *rule,
                    access: access.clone(),
                    expires_ns,
                });
            }
        }
    }
}

/// The address a kernel entry is for.
fn addr_of(key: &LearnedKey) -> Option<IpAddr> {
    match key.family {
        AF_INET => Some(IpAddr::from(<[u8; 4]>::try_from(&key.addr[..4]).ok()?)),
        AF_INET6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

/// Every agent's learned addresses.
#[derive(Debug, Default)]
pub struct Learned {
    agents: HashMap<String, AgentLearned>,
    /// (agent, address) -> names, for addresses that recently left the map.
    recent: HashMap<(String, IpAddr), (Vec<String>, Instant)>,
    /// Changed since last saved (see `dns::saved`).
    dirty: bool,
}

impl Learned {
    /// Allows `addrs` (each with its expiry) for `agent` under `policy_id`,
    /// through the rules in `grants`, in the kernel first and then here.
    pub fn learn(
        &mut self,
        maps: &mut PolicyMaps,
        agent: &str,
        policy_id: u32,
        name: &str,
        grants: &[(usize, Access)],
        addrs: &[(IpAddr, u64)],
    ) -> Result<()> {
        let entry = self
            .agents
            .entry(agent.to_owned())
            .or_insert_with(|| AgentLearned::new(policy_id));
        if entry.policy_id != policy_id {
            // A generation this table never staged (the agent was set up
            // afresh): what was learned before belongs to the old one.
            *entry = AgentLearned::new(policy_id);
        }
        let new = addrs
            .iter()
            .filter(|(a, _)| !entry.addrs.contains_key(a))
            .count();
        if entry.addrs.len() + new > MAX_PER_AGENT {
            return Err(Error::Capacity(format!(
                "agent {agent} already has {} learned addresses (limit {MAX_PER_AGENT})",
                entry.addrs.len()
            )));
        }
        self.dirty = true;
        for &(addr, expires_ns) in addrs {
            entry.add(addr, name, grants, expires_ns);
            entry.write(maps, addr)?;
        }
        Ok(())
    }

    /// Drops expired claims: entries narrow to what is left, or go.
    pub fn sweep(&mut self, maps: &mut PolicyMaps) {
        let now = now_ns();
        let wall = Instant::now();
        for (agent, learned) in &mut self.agents {
            let changed: Vec<IpAddr> = learned
                .addrs
                .iter()
                .filter(|(_, s)| s.iter().any(|s| s.expires_ns <= now))
                .map(|(a, _)| *a)
                .collect();
            self.dirty |= !changed.is_empty();
            for addr in changed {
                let Some(sources) = learned.addrs.get_mut(&addr) else {
                    continue;
                };
                let mut names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
                names.dedup();
                sources.retain(|s| s.expires_ns > now);
                if sources.is_empty() {
                    learned.addrs.remove(&addr);
                    self.recent.insert((agent.clone(), addr), (names, wall));
                }
                if let Err(e) = learned.write(maps, addr) {
                    // The kernel ignores the entry past its expiry anyway.
                    tracing::warn!(agent = %agent, %addr, error = %e, "updating an expired learned address failed");
                }
            }
        }
        self.recent
            .retain(|_, (_, at)| wall.duration_since(*at) < RECENT);
    }

    /// The agent's learned state re-judged by new rules and written under
    /// generation `policy_id` (nothing points at it yet). Names no rule
    /// allows any more are dropped; ports follow the new rules.
    pub fn stage(
        &self,
        maps: &mut PolicyMaps,
        agent: &str,
        policy_id: u32,
        hosts: &[HostRule],
    ) -> Result<AgentLearned> {
        match self.agents.get(agent) {
            Some(current) => current.rejudge(maps, policy_id, hosts),
            None => Ok(AgentLearned::new(policy_id)),
        }
    }

    /// Makes a staged set the agent's, once the agent points at its generation.
    pub fn commit(&mut self, agent: &str, staged: AgentLearned) {
        self.agents.insert(agent.to_owned(), staged);
        self.dirty = true;
    }

    /// Forgets an agent (removed, or no hostname rules left). Its kernel
    /// entries go with its generation.
    pub fn forget(&mut self, agent: &str) {
        self.dirty |= self.agents.remove(agent).is_some();
    }

    /// Carries what a previous daemon learned for `agent` into generation
    /// `policy_id`, before the agent points at it. `names` come from the
    /// saved file, `kernel` is the previous generation's entries: a name
    /// is restored for an address only if the kernel still allows that
    /// address, until the earlier of the two expiries, and only if the
    /// agent's rules (`hosts`) still allow the name. On error nothing is
    /// left in `policy_id`.
    pub fn restore(
        &mut self,
        maps: &mut PolicyMaps,
        agent: &str,
        policy_id: u32,
        hosts: &[HostRule],
        names: &[SavedName],
        kernel: &[(LearnedKey, LearnedValue)],
    ) -> Result<()> {
        let now = now_ns();
        let allowed: HashMap<IpAddr, u64> = kernel
            .iter()
            .filter_map(|(k, v)| Some((addr_of(k)?, v.expires_ns)))
            .collect();
        let mut previous = AgentLearned::new(0);
        for n in names.iter().take(MAX_PER_AGENT * MAX_NAMES_PER_ADDR) {
            let Some(&until) = allowed.get(&n.addr) else {
                continue;
            };
            let expires_ns = n.expires_ns.min(until);
            if expires_ns > now {
                previous.addrs.entry(n.addr).or_default().push(Source {
                    name: n.name.clone(),
                    rule: 0,
                    access: Access::default(),
                    expires_ns,
                });
            }
        }
        match previous.rejudge(maps, policy_id, hosts) {
            Ok(staged) => {
                self.commit(agent, staged);
                Ok(())
            }
            Err(e) => {
                let written = AgentLearned::new(policy_id);
                for addr in previous.addrs.keys() {
                    let _ = maps.remove_learned(&written.key(*addr));
                }
                Err(e)
            }
        }
    }

    /// Every agent's names and addresses, if anything changed since the
    /// last call (the sweeper saves them; see `dns::saved`).
    pub fn changed(&mut self) -> Option<Saved> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        Some(self.saved())
    }

    /// The last [`Learned::changed`] could not be saved: try again next time.
    pub fn mark_unsaved(&mut self) {
        self.dirty = true;
    }

    /// Every agent's names and addresses, as saved across a restart.
    pub fn saved(&self) -> Saved {
        let agents = self
            .agents
            .iter()
            .map(|(agent, l)| {
                // One claim per (address, name), whatever rules granted it:
                // a restart re-judges the name against the rules of the day.
                let mut claims: BTreeMap<(IpAddr, &str), u64> = BTreeMap::new();
                for (addr, sources) in &l.addrs {
                    for s in sources {
                        let e = claims.entry((*addr, &s.name)).or_default();
                        *e = (*e).max(s.expires_ns);
                    }
                }
                let names = claims
                    .into_iter()
                    .map(|((addr, name), expires_ns)| SavedName {
                        name: name.to_owned(),
                        addr,
                        expires_ns,
                    })
                    .collect();
                (agent.clone(), names)
            })
            .collect();
        Saved { agents }
    }

    /// The names `addr` was learned through for `agent`, live or recently
    /// expired; empty if none.
    pub fn names_for(&self, agent: &str, addr: IpAddr) -> Vec<String> {
        let mut names: Vec<String> = self
            .agents
            .get(agent)
            .and_then(|l| l.addrs.get(&addr))
            .map(|s| s.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        if names.is_empty()
            && let Some((n, _)) = self.recent.get(&(agent.to_owned(), addr))
        {
            names = n.clone();
        }
        names.dedup();
        names
    }

    /// The live claim (name, rule index) allowing this connect, if any.
    pub fn grant_for(
        &self,
        agent: &str,
        addr: IpAddr,
        port: u16,
        tcp: bool,
    ) -> Option<(String, usize)> {
        let sources = self.agents.get(agent)?.addrs.get(&addr)?;
        sources
            .iter()
            .find(|s| {
                if tcp {
                    s.access.tcp.allows(port)
                } else {
                    s.access.udp.allows(port)
                }
            })
            .map(|s| (s.name.clone(), s.rule))
    }

    /// The agent's names with the addresses each allows now, by name, at
    /// most `limit` of them (for `status`).
    pub fn listing(&self, agent: &str, limit: usize) -> Vec<LearnedInfo> {
        let Some(l) = self.agents.get(agent) else {
            return Vec::new();
        };
        let now = now_ns();
        let mut names: BTreeMap<&str, (Vec<IpAddr>, u64)> = BTreeMap::new();
        for (addr, sources) in &l.addrs {
            for s in sources.iter().filter(|s| s.expires_ns > now) {
                let (addrs, until) = names.entry(&s.name).or_default();
                if !addrs.contains(addr) {
                    addrs.push(*addr);
                }
                *until = (*until).max(s.expires_ns);
            }
        }
        names
            .into_iter()
            .take(limit)
            .map(|(name, (mut addrs, until))| {
                addrs.sort();
                LearnedInfo {
                    name: name.to_owned(),
                    addresses: addrs.iter().map(IpAddr::to_string).collect(),
                    expires_in_s: (until - now).div_ceil(1_000_000_000),
                }
            })
            .collect()
    }

    /// Learned addresses per agent (for status and metrics).
    pub fn count(&self, agent: &str) -> usize {
        self.agents.get(agent).map_or(0, |l| l.addrs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_one_claim_per_address_and_name_and_only_when_changed() {
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let any = Access::default();
        let mut agent = AgentLearned::new(7);
        agent.add(
            addr,
            "crm.example.com",
            &[(0, any.clone()), (2, any.clone())],
            100,
        );
        agent.add(addr, "crm.example.com", &[(0, any.clone())], 300);
        agent.add(addr, "alias.example.com", &[(1, any)], 50);
        let mut learned = Learned::default();
        assert!(learned.changed().is_none());
        learned.commit("erp", agent);
        let saved = learned.changed().expect("changed");
        assert!(learned.changed().is_none(), "saved once per change");
        let claim = |name: &str, expires_ns| SavedName {
            name: name.into(),
            addr,
            expires_ns,
        };
        assert_eq!(
            saved.agents["erp"],
            vec![
                claim("alias.example.com", 50),
                claim("crm.example.com", 300)
            ]
        );
        learned.mark_unsaved();
        assert_eq!(learned.changed(), Some(saved));
    }
}
