//! Typed access to the pinned policy maps: the agents map, the rule tries,
//! the port bitmaps and the decision counters.
use std::collections::{HashMap as StdHashMap, HashSet};

use agentd_ebpf::{
    AgentCounters, AgentEntry, LearnedKey, LearnedValue, MAX_AGENTS, PortBlock, PortBlockKey,
    ResolverPorts, Rule4Key, Rule6Key, RuleValue, map_names,
};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    util::nr_cpus,
};

use crate::{
    error::{Error, Result},
    policy::MapEntries,
};

fn map_err(map: &str) -> impl Fn(MapError) -> Error + '_ {
    move |source| Error::Map {
        map: map.into(),
        source,
    }
}

pub struct PolicyMaps {
    agents: HashMap<MapData, u64, AgentEntry>,
    rules_v4: LpmTrie<MapData, Rule4Key, RuleValue>,
    rules_v6: LpmTrie<MapData, Rule6Key, RuleValue>,
    ports: HashMap<MapData, PortBlockKey, PortBlock>,
    counters: PerCpuArray<MapData, AgentCounters>,
    identity: IdentityMap,
    learned: HashMap<MapData, LearnedKey, LearnedValue>,
    resolvers: Array<MapData, ResolverPorts>,
}

#[expect(
    deprecated,
    reason = "cgroup local storage keyed by the attach cgroup is what identifies an agent in sock_addr hooks"
)]
type IdentityMap = aya::maps::CgroupStorage<MapData, u64>;

/// Summed decision counts of one agent.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Counts {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub events_lost: u64,
}

/// Decision counts indexed by protocol: 0 tcp, 1 udp, 2 other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountsByProtocol {
    pub allowed: [u64; 3],
    pub denied: [u64; 3],
    pub audited: [u64; 3],
    pub events_lost: u64,
}

impl PolicyMaps {
    /// Takes the maps out of the loaded object; the ring buffer is returned
    /// separately for the event reader.
    pub fn take(ebpf: &mut Ebpf) -> Result<(Self, RingBuf<MapData>)> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Refused(format!("map {name} missing from object")))
        };
        let agents =
            HashMap::try_from(take(map_names::AGENTS)?).map_err(map_err(map_names::AGENTS))?;
        let rules_v4 =
            LpmTrie::try_from(take(map_names::RULES_V4)?).map_err(map_err(map_names::RULES_V4))?;
        let rules_v6 =
            LpmTrie::try_from(take(map_names::RULES_V6)?).map_err(map_err(map_names::RULES_V6))?;
        let ports =
            HashMap::try_from(take(map_names::PORTS)?).map_err(map_err(map_names::PORTS))?;
        let counters = PerCpuArray::try_from(take(map_names::COUNTERS)?)
            .map_err(map_err(map_names::COUNTERS))?;
        let events =
            RingBuf::try_from(take(map_names::EVENTS)?).map_err(map_err(map_names::EVENTS))?;
        let identity = IdentityMap::try_from(take(map_names::IDENTITY)?)
            .map_err(map_err(map_names::IDENTITY))?;
        let learned =
            HashMap::try_from(take(map_names::LEARNED)?).map_err(map_err(map_names::LEARNED))?;
        let resolvers =
            Array::try_from(take(map_names::RESOLVERS)?).map_err(map_err(map_names::RESOLVERS))?;
        Ok((
            Self {
                agents,
                rules_v4,
                rules_v6,
                ports,
                counters,
                identity,
                learned,
                resolvers,
            },
            events,
        ))
    }

    /// Every agent entry in the kernel, keyed by cgroup id.
    pub fn agents(&self) -> Result<StdHashMap<u64, AgentEntry>> {
        self.agents
            .iter()
            .map(|r| r.map_err(map_err(map_names::AGENTS)))
            .collect()
    }

    pub fn agent(&self, cgroup_id: u64) -> Option<AgentEntry> {
        self.agents.get(&cgroup_id, 0).ok()
    }

    /// One map update: the kernel sees the old entry or the new one.
    pub fn set_agent(&mut self, cgroup_id: u64, entry: AgentEntry) -> Result<()> {
        self.agents
            .insert(cgroup_id, entry, 0)
            .map_err(map_err(map_names::AGENTS))
    }

    pub fn remove_agent(&mut self, cgroup_id: u64) -> Result<()> {
        gone_is_fine(self.agents.remove(&cgroup_id), map_names::AGENTS)
    }

    /// Tells the programs attached to `cgroup_id` for `attach_type` which
    /// agent they serve. Until this is written they deny everything.
    pub fn set_identity(&mut self, cgroup_id: u64, attach_type: u32) -> Result<()> {
        let key = aya::maps::cgroup_storage::CgroupStorageKey::new(cgroup_id, attach_type);
        self.identity
            .insert(key, cgroup_id, 0)
            .map_err(map_err(map_names::IDENTITY))
    }

    /// Writes one policy generation's entries. Nothing refers to them until
    /// an agent entry is switched to this generation.
    pub fn write_generation(&mut self, entries: &MapEntries) -> Result<()> {
        for (k, v) in &entries.port_blocks {
            self.ports
                .insert(k, v, 0)
                .map_err(|e| capacity(map_names::PORTS, e))?;
        }
        for (k, v) in &entries.v4 {
            self.rules_v4
                .insert(k, v, 0)
                .map_err(|e| capacity(map_names::RULES_V4, e))?;
        }
        for (k, v) in &entries.v6 {
            self.rules_v6
                .insert(k, v, 0)
                .map_err(|e| capacity(map_names::RULES_V6, e))?;
        }
        Ok(())
    }

    /// Allows a learned address (see `dns::learned`); replaces any entry.
    pub fn set_learned(&mut self, key: &LearnedKey, value: &LearnedValue) -> Result<()> {
        self.learned
            .insert(key, value, 0)
            .map_err(|e| capacity(map_names::LEARNED, e))
    }

    pub fn remove_learned(&mut self, key: &LearnedKey) -> Result<()> {
        gone_is_fine(self.learned.remove(key), map_names::LEARNED)
    }

    /// Every learned entry, by generation (at start: what a previous daemon
    /// allowed, the ground truth a restored name must agree with). One walk
    /// of the map, however many agents there are.
    pub fn learned_by_generation(&self) -> StdHashMap<u32, Vec<(LearnedKey, LearnedValue)>> {
        let mut by: StdHashMap<u32, Vec<_>> = StdHashMap::new();
        for (k, v) in self.learned.iter().filter_map(|e| e.ok()) {
            by.entry(k.policy_id).or_default().push((k, v));
        }
        by
    }

    /// Where the agent's DNS is steered; all zero: not steered.
    pub fn set_resolver(&mut self, agent_id: u32, ports: ResolverPorts) -> Result<()> {
        self.resolvers
            .set(agent_id, ports, 0)
            .map_err(map_err(map_names::RESOLVERS))
    }

    /// Deletes every rule and port entry of generations not in `live`. Safe
    /// at any time: no agent entry refers to them.
    pub fn collect_garbage(&mut self, live: &HashSet<u32>) -> Result<usize> {
        let dead = |p: [u8; 4]| !live.contains(&u32::from_be_bytes(p));
        let v4: Vec<Key<Rule4Key>> = self
            .rules_v4
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| dead(k.data().policy))
            .collect();
        let v6: Vec<Key<Rule6Key>> = self
            .rules_v6
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| dead(k.data().policy))
            .collect();
        let ports: Vec<PortBlockKey> = self
            .ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(&k.policy_id))
            .collect();
        let learned: Vec<LearnedKey> = self
            .learned
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !live.contains(&k.policy_id))
            .collect();
        let n = v4.len() + v6.len() + ports.len() + learned.len();
        for k in &learned {
            let _ = self.learned.remove(k);
        }
        for k in &v4 {
            let _ = self.rules_v4.remove(k);
        }
        for k in &v6 {
            let _ = self.rules_v6.remove(k);
        }
        for k in &ports {
            let _ = self.ports.remove(k);
        }
        Ok(n)
    }

    /// Summed over CPUs and protocols.
    pub fn counts(&self, agent_id: u32) -> Result<Counts> {
        let c = self.counts_by_protocol(agent_id)?;
        Ok(Counts {
            allowed: c.allowed.iter().sum(),
            denied: c.denied.iter().sum(),
            audited: c.audited.iter().sum(),
            events_lost: c.events_lost,
        })
    }

    /// Summed over CPUs, by protocol (tcp, udp, other).
    pub fn counts_by_protocol(&self, agent_id: u32) -> Result<CountsByProtocol> {
        let values = self
            .counters
            .get(&agent_id, 0)
            .map_err(map_err(map_names::COUNTERS))?;
        let mut c = CountsByProtocol::default();
        for v in values.iter() {
            for p in 0..3 {
                c.allowed[p] += v.allowed[p];
                c.denied[p] += v.denied[p];
                c.audited[p] += v.audited[p];
            }
            c.events_lost += v.events_lost;
        }
        Ok(c)
    }

    /// Events lost across every agent slot.
    pub fn total_events_lost(&self) -> Result<u64> {
        let mut lost = 0;
        for v in self.counters.iter() {
            let v = v.map_err(map_err(map_names::COUNTERS))?;
            lost += v.iter().map(|c| c.events_lost).sum::<u64>();
        }
        Ok(lost)
    }

    /// Zeroes an agent slot before it is given to a new agent.
    pub fn reset_counts(&mut self, agent_id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| Error::Io {
            context: "counting CPUs".into(),
            source: e,
        })?;
        let zero = PerCpuValues::try_from(vec![AgentCounters::default(); cpus]).map_err(|e| {
            Error::Io {
                context: "building per-CPU values".into(),
                source: e,
            }
        })?;
        self.counters
            .set(agent_id, zero, 0)
            .map_err(map_err(map_names::COUNTERS))
    }
}

/// A delete whose key was already gone did what was asked.
fn gone_is_fine(result: std::result::Result<(), MapError>, map: &str) -> Result<()> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(map_err(map)(e)),
    }
}

fn capacity(map: &str, e: MapError) -> Error {
    match &e {
        MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
            Error::Capacity(format!("map {map} is full"))
        }
        _ => map_err(map)(e),
    }
}

/// The lowest agent id not in use.
pub fn free_agent_id(used: &HashSet<u32>) -> Option<u32> {
    (0..MAX_AGENTS).find(|id| !used.contains(id))
}
