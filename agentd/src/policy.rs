//! The policy compiler: an agent's allow rules in, kernel map entries out.
//! Pure (no kernel), so it is unit-tested on its own.
//!
//! The kernel answers with one longest-prefix-match lookup, so each prefix's
//! entry must already hold everything that applies to it: the compiler folds
//! every rule whose CIDR contains a prefix into that prefix's port sets. Any
//! rule that matches an address has a CIDR containing the longest matching
//! prefix, so the longest match alone decides exactly like "any rule matches".
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agentd_ebpf::{
    PORTS_PER_BLOCK, PROTO_TCP, PROTO_UDP, PortBlock, PortBlockKey, Rule4Key, Rule6Key, RuleValue,
    TCP_ALL_PORTS, TCP_SOME_PORTS, UDP_ALL_PORTS, UDP_SOME_PORTS,
};
use aya::maps::lpm_trie::Key;
use ipnet::IpNet;

use crate::config::{PortRange, Protocol, Rule};

/// Which ports of one protocol a prefix allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Ports {
    #[default]
    Nothing,
    /// Sorted, merged, non-empty.
    Some(Vec<PortRange>),
    All,
}

impl Ports {
    fn from_rule(ports: Option<&[PortRange]>) -> Self {
        match ports {
            None => Self::All,
            Some(p) => Self::Some(merge(p.to_vec())),
        }
    }

    fn union(&self, other: &Self) -> Self {
        match (self, other) {
            (Self::All, _) | (_, Self::All) => Self::All,
            (Self::Nothing, x) | (x, Self::Nothing) => x.clone(),
            (Self::Some(a), Self::Some(b)) => {
                let merged = merge(a.iter().chain(b).copied().collect());
                if merged
                    == [PortRange {
                        first: 1,
                        last: 65535,
                    }]
                {
                    Self::All
                } else {
                    Self::Some(merged)
                }
            }
        }
    }

    pub fn allows(&self, port: u16) -> bool {
        match self {
            Self::Nothing => false,
            Self::All => true,
            Self::Some(r) => r.iter().any(|r| r.contains(port)),
        }
    }
}

/// Sorts ranges and merges overlapping or adjacent ones.
fn merge(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(r.last);
            }
            _ => out.push(r),
        }
    }
    out
}

/// What one prefix allows, per protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Access {
    pub tcp: Ports,
    pub udp: Ports,
}

impl Access {
    /// What one rule's `ports` and `protocol` allow.
    pub fn of(ports: Option<&[PortRange]>, protocol: Protocol) -> Self {
        let ports = Ports::from_rule(ports);
        Self {
            tcp: if protocol.covers_tcp() {
                ports.clone()
            } else {
                Ports::Nothing
            },
            udp: if protocol.covers_udp() {
                ports
            } else {
                Ports::Nothing
            },
        }
    }

    /// The kernel's flags for this access (`TCP_ALL_PORTS`, ...).
    pub fn flags(&self) -> u32 {
        let tcp = match self.tcp {
            Ports::All => TCP_ALL_PORTS,
            Ports::Some(_) => TCP_SOME_PORTS,
            Ports::Nothing => 0,
        };
        let udp = match self.udp {
            Ports::All => UDP_ALL_PORTS,
            Ports::Some(_) => UDP_SOME_PORTS,
            Ports::Nothing => 0,
        };
        tcp | udp
    }

    /// Whether a port set (bitmaps) is needed: some ports, not all.
    pub fn needs_port_set(&self) -> bool {
        matches!(self.tcp, Ports::Some(_)) || matches!(self.udp, Ports::Some(_))
    }

    /// The bitmap blocks of this access as port set `port_set` of
    /// generation `policy_id`.
    pub fn port_blocks(&self, policy_id: u32, port_set: u32) -> Vec<(PortBlockKey, PortBlock)> {
        let mut out = Vec::new();
        for (proto, ports) in [(PROTO_TCP, &self.tcp), (PROTO_UDP, &self.udp)] {
            if let Ports::Some(ranges) = ports {
                out.extend(port_blocks(policy_id, port_set, proto, ranges));
            }
        }
        out
    }

    pub fn union(&self, other: &Self) -> Self {
        Self {
            tcp: self.tcp.union(&other.tcp),
            udp: self.udp.union(&other.udp),
        }
    }
}

/// An agent's rules after folding: one entry per distinct prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub prefixes: Vec<(IpNet, Access)>,
}

impl CompiledPolicy {
    pub fn compile(rules: &[Rule]) -> Self {
        // 1. Rules with the same prefix share one entry.
        let mut by_prefix: HashMap<IpNet, Access> = HashMap::new();
        for rule in rules {
            let access = Access::of(rule.ports.as_deref(), rule.protocol);
            let entry = by_prefix.entry(rule.cidr).or_default();
            *entry = entry.union(&access);
        }
        // 2. Fold every containing prefix into each prefix.
        let mut prefixes: Vec<(IpNet, Access)> = by_prefix
            .iter()
            .map(|(net, own)| {
                let mut access = own.clone();
                for len in (0..net.prefix_len()).rev() {
                    let Ok(sup) = IpNet::new(net.addr(), len) else {
                        continue;
                    };
                    if let Some(outer) = by_prefix.get(&sup.trunc()) {
                        access = access.union(outer);
                    }
                }
                (*net, access)
            })
            .collect();
        prefixes.sort_by_key(|p| p.0);
        Self { prefixes }
    }

    /// What the kernel will answer: the longest matching prefix decides.
    pub fn allows(&self, addr: IpAddr, port: u16, tcp: bool) -> bool {
        let best = self
            .prefixes
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len());
        best.is_some_and(|(_, a)| {
            if tcp {
                a.tcp.allows(port)
            } else {
                a.udp.allows(port)
            }
        })
    }

    /// The map entries for this policy under generation `policy_id`.
    pub fn entries(&self, policy_id: u32) -> MapEntries {
        let policy = policy_id.to_be_bytes();
        let mut out = MapEntries::default();
        let mut sets: HashMap<&Access, u32> = HashMap::new();
        for (net, access) in &self.prefixes {
            let port_set = if access.needs_port_set() {
                let next = sets.len() as u32;
                *sets.entry(access).or_insert_with(|| {
                    out.port_blocks.extend(access.port_blocks(policy_id, next));
                    next
                })
            } else {
                0
            };
            let value = RuleValue {
                port_set,
                flags: access.flags(),
            };
            let plen = u32::from(net.prefix_len()) + 32;
            match net {
                IpNet::V4(n) => out.v4.push((
                    Key::new(
                        plen,
                        Rule4Key {
                            policy,
                            addr: n.network().octets(),
                        },
                    ),
                    value,
                )),
                IpNet::V6(n) => out.v6.push((
                    Key::new(
                        plen,
                        Rule6Key {
                            policy,
                            addr: n.network().octets(),
                        },
                    ),
                    value,
                )),
            }
        }
        out
    }
}

/// Kernel map entries for one policy generation.
#[derive(Default)]
pub struct MapEntries {
    pub v4: Vec<(Key<Rule4Key>, RuleValue)>,
    pub v6: Vec<(Key<Rule6Key>, RuleValue)>,
    pub port_blocks: Vec<(PortBlockKey, PortBlock)>,
}

/// The bitmap blocks covering `ranges`, one per 512 ports that hold any.
fn port_blocks(
    policy_id: u32,
    port_set: u32,
    proto: u8,
    ranges: &[PortRange],
) -> Vec<(PortBlockKey, PortBlock)> {
    let mut blocks: std::collections::BTreeMap<u16, PortBlock> = Default::default();
    for r in ranges {
        for port in u32::from(r.first)..=u32::from(r.last) {
            let block = blocks.entry((port / PORTS_PER_BLOCK) as u16).or_default();
            let within = port % PORTS_PER_BLOCK;
            block.bits[(within / 64) as usize] |= 1u64 << (within % 64);
        }
    }
    blocks
        .into_iter()
        .map(|(block, bits)| {
            (
                PortBlockKey {
                    policy_id,
                    port_set,
                    proto,
                    _pad: 0,
                    block,
                },
                bits,
            )
        })
        .collect()
}

/// Finds the configured rule behind an allow verdict, for the audit log,
/// without scanning the rules: one hash probe per distinct prefix length.
#[derive(Debug, Clone, Default)]
pub struct RuleIndex {
    by_prefix: HashMap<IpNet, Vec<usize>>,
    /// Distinct prefix lengths per family, longest first.
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl RuleIndex {
    pub fn new(rules: &[Rule]) -> Self {
        let mut idx = Self::default();
        for (i, r) in rules.iter().enumerate() {
            idx.by_prefix.entry(r.cidr).or_default().push(i);
            let lens = match r.cidr {
                IpNet::V4(_) => &mut idx.v4_lens,
                IpNet::V6(_) => &mut idx.v6_lens,
            };
            if !lens.contains(&r.cidr.prefix_len()) {
                lens.push(r.cidr.prefix_len());
            }
        }
        idx.v4_lens.sort_unstable_by(|a, b| b.cmp(a));
        idx.v6_lens.sort_unstable_by(|a, b| b.cmp(a));
        idx
    }

    /// The most specific rule allowing the destination, as an index into
    /// the rules the index was built from.
    pub fn find(&self, rules: &[Rule], addr: IpAddr, port: u16, tcp: bool) -> Option<usize> {
        let lens = if addr.is_ipv4() {
            &self.v4_lens
        } else {
            &self.v6_lens
        };
        lens.iter().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.by_prefix
                .get(&net)?
                .iter()
                .copied()
                .find(|&i| rules[i].matches(addr, port, tcp))
        })
    }
}

/// Decodes the address of an event (network byte order) into an `IpAddr`.
pub fn event_addr(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == agentd_ebpf::AF_INET {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

#[cfg(test)]
mod tests;
