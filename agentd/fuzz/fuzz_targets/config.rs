//! The config parser reads files an operator edits by hand, and `reload`
//! applies them to a running daemon. Properties:
//! - it never panics, and a refusal points inside the file it was given;
//! - for every agent of an accepted config, the map entries the policy
//!   compiler produces, looked up the way the eBPF program looks them up
//!   (longest prefix, then the port bitmap), allow exactly what the agent's
//!   rules allow, and the rule index names a matching rule for every allowed
//!   destination. Destinations probed: each rule's edges and just outside.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use agentd::{
    config::{Config, Rule},
    policy::{CompiledPolicy, MapEntries, RuleIndex},
};
use agentd_ebpf::{
    PORTS_PER_BLOCK, PROTO_TCP, PROTO_UDP, TCP_ALL_PORTS, TCP_SOME_PORTS, UDP_ALL_PORTS,
    UDP_SOME_PORTS,
};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/fuzz/agentd.toml";
const POLICY_ID: u32 = 0x0102_0304;
/// Keeps one input's work bounded: probes grow with rules squared.
const MAX_RULES_CHECKED: usize = 24;

fuzz_target!(|text: &str| {
    match Config::parse(Path::new(PATH), text) {
        Err(e) => {
            assert_eq!(e.path, Path::new(PATH));
            assert!(!e.message.is_empty(), "empty message: {e:?}");
            let lines = text.lines().count().max(1);
            assert!(e.line <= lines + 1, "line {} of {lines}: {e}", e.line);
        }
        Ok(config) => {
            for agent in &config.agents {
                check_compiled(&agent.allow);
            }
        }
    }
});

fn check_compiled(rules: &[Rule]) {
    let rules = &rules[..rules.len().min(MAX_RULES_CHECKED)];
    let compiled = CompiledPolicy::compile(rules);
    let entries = compiled.entries(POLICY_ID);
    let index = RuleIndex::new(rules);
    let mut ports = vec![0u16, 1, 65535];
    for rule in rules {
        for r in rule.ports.iter().flatten() {
            ports.extend([
                r.first.saturating_sub(1),
                r.first,
                r.last,
                r.last.saturating_add(1),
            ]);
        }
    }
    ports.sort_unstable();
    ports.dedup();
    for addr in probes(rules) {
        for &port in &ports {
            for tcp in [true, false] {
                let want = rules.iter().any(|r| r.matches(addr, port, tcp));
                let got = kernel_allows(&entries, addr, port, tcp);
                assert_eq!(
                    got, want,
                    "{addr} port {port} tcp={tcp}: map entries say {got}, rules say {want}; rules {rules:?}"
                );
                match index.find(rules, addr, port, tcp) {
                    Some(i) => assert!(want && rules[i].matches(addr, port, tcp)),
                    None => assert!(!want, "{addr}:{port} allowed but no rule named"),
                }
            }
        }
    }
}

/// Each rule's first and last address and the neighbours just outside.
fn probes(rules: &[Rule]) -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::BROADCAST),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::from(u128::MAX)),
    ];
    for rule in rules {
        match rule.cidr {
            IpNet::V4(n) => {
                let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
                for a in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                    out.push(IpAddr::V4(a.into()));
                }
            }
            IpNet::V6(n) => {
                let (first, last) = (u128::from(n.network()), u128::from(n.broadcast()));
                for a in [first.wrapping_sub(1), first, last, last.wrapping_add(1)] {
                    out.push(IpAddr::V6(a.into()));
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The eBPF program's decision (`rule_allows`), over the entries in memory.
fn kernel_allows(entries: &MapEntries, addr: IpAddr, port: u16, tcp: bool) -> bool {
    let mut key = POLICY_ID.to_be_bytes().to_vec();
    let best = match addr {
        IpAddr::V4(a) => {
            key.extend(a.octets());
            longest(
                entries.v4.iter().map(|(k, v)| {
                    let d = k.data();
                    (k.prefix_len(), [&d.policy[..], &d.addr[..]].concat(), *v)
                }),
                &key,
            )
        }
        IpAddr::V6(a) => {
            key.extend(a.octets());
            longest(
                entries.v6.iter().map(|(k, v)| {
                    let d = k.data();
                    (k.prefix_len(), [&d.policy[..], &d.addr[..]].concat(), *v)
                }),
                &key,
            )
        }
    };
    let Some(value) = best else {
        return false;
    };
    let (all, some, proto) = if tcp {
        (TCP_ALL_PORTS, TCP_SOME_PORTS, PROTO_TCP)
    } else {
        (UDP_ALL_PORTS, UDP_SOME_PORTS, PROTO_UDP)
    };
    if value.flags & all != 0 {
        return true;
    }
    if value.flags & some == 0 {
        return false;
    }
    let block = port / PORTS_PER_BLOCK as u16;
    let Some((_, bits)) = entries.port_blocks.iter().find(|(k, _)| {
        k.policy_id == POLICY_ID
            && k.port_set == value.port_set
            && k.proto == proto
            && k.block == block
    }) else {
        return false;
    };
    let within = u32::from(port) % PORTS_PER_BLOCK;
    bits.bits[(within / 64) as usize] & (1u64 << (within % 64)) != 0
}

/// Longest-prefix match as the kernel's LPM trie does it: the entry whose
/// first `prefix_len` bits equal the key's, longest first.
fn longest<V>(entries: impl Iterator<Item = (u32, Vec<u8>, V)>, key: &[u8]) -> Option<V> {
    entries
        .filter(|(len, data, _)| prefix_matches(data, key, *len))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, v)| v)
}

fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    (0..bits as usize).all(|i| {
        let mask = 0x80u8 >> (i % 8);
        a[i / 8] & mask == b[i / 8] & mask
    })
}
