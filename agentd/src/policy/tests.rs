use std::net::IpAddr;

use super::*;
use crate::config::Protocol;

fn rule(cidr: &str, ports: Option<&[(u16, u16)]>, protocol: Protocol) -> Rule {
    Rule {
        cidr: cidr.parse().unwrap(),
        ports: ports.map(|p| {
            p.iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect()
        }),
        protocol,
        line: 1,
    }
}

/// What the configuration means, rule by rule: the reference the compiled
/// (longest-prefix) form must agree with.
fn any_rule_allows(rules: &[Rule], addr: IpAddr, port: u16, tcp: bool) -> bool {
    rules.iter().any(|r| r.matches(addr, port, tcp))
}

#[test]
fn nested_prefixes_inherit_outer_ports() {
    // The /16 would shadow the /8's port 443 if the compiler did not fold.
    let rules = [
        rule("10.0.0.0/8", Some(&[(443, 443)]), Protocol::Tcp),
        rule("10.1.0.0/16", Some(&[(80, 80)]), Protocol::Tcp),
    ];
    let p = CompiledPolicy::compile(&rules);
    let a: IpAddr = "10.1.2.3".parse().unwrap();
    assert!(p.allows(a, 443, true));
    assert!(p.allows(a, 80, true));
    assert!(!p.allows(a, 80, false));
    assert!(!p.allows("10.2.0.1".parse().unwrap(), 80, true));
}

#[test]
fn protocols_and_all_ports() {
    let rules = [
        rule("192.0.2.0/24", None, Protocol::Udp),
        rule("192.0.2.7/32", Some(&[(443, 443)]), Protocol::Any),
    ];
    let p = CompiledPolicy::compile(&rules);
    let host: IpAddr = "192.0.2.7".parse().unwrap();
    assert!(p.allows(host, 53, false));
    assert!(p.allows(host, 443, true));
    assert!(!p.allows(host, 80, true));
    let e = p.entries(5);
    assert_eq!(e.v4.len(), 2);
    let v =
        e.v4.iter()
            .find(|(k, _)| k.prefix_len() == 32 + 32)
            .unwrap()
            .1;
    assert_eq!(v.flags, TCP_SOME_PORTS | UDP_ALL_PORTS);
}

#[test]
fn same_prefix_rules_merge() {
    let rules = [
        rule("10.0.0.0/8", Some(&[(1, 100)]), Protocol::Tcp),
        rule("10.0.0.0/8", Some(&[(101, 65535)]), Protocol::Tcp),
    ];
    let p = CompiledPolicy::compile(&rules);
    assert_eq!(p.prefixes.len(), 1);
    assert_eq!(
        p.prefixes[0].1.tcp,
        Ports::All,
        "1-100 + 101-65535 is every port"
    );
}

#[test]
fn entries_encode_policy_prefix_and_port_bits() {
    let rules = [rule(
        "10.20.0.0/16",
        Some(&[(443, 443), (8000, 8100)]),
        Protocol::Tcp,
    )];
    let e = CompiledPolicy::compile(&rules).entries(0x0102_0304);
    assert_eq!(e.v4.len(), 1);
    let (key, value) = &e.v4[0];
    assert_eq!(key.prefix_len(), 48);
    assert_eq!(key.data().policy, [1, 2, 3, 4]);
    assert_eq!(key.data().addr, [10, 20, 0, 0]);
    assert_eq!(value.flags, TCP_SOME_PORTS);
    // 443 is in block 0; 8000-8100 span blocks 15 (7680-8191).
    let blocks: Vec<u16> = e.port_blocks.iter().map(|(k, _)| k.block).collect();
    assert_eq!(blocks, vec![0, 15]);
    let (_, b0) = &e.port_blocks[0];
    assert_ne!(b0.bits[443 / 64] & (1 << (443 % 64)), 0);
    assert_eq!(b0.bits[442 / 64] & (1 << (442 % 64)), 0);
    let bit = |b: &PortBlock, port: u32| b.bits[((port % 512) / 64) as usize] >> (port % 64) & 1;
    let (_, b15) = &e.port_blocks[1];
    assert_eq!(bit(b15, 7999), 0);
    assert_eq!(bit(b15, 8000), 1);
    assert_eq!(bit(b15, 8100), 1);
    assert_eq!(bit(b15, 8101), 0);
    assert!(
        e.port_blocks
            .iter()
            .all(|(k, _)| k.policy_id == 0x0102_0304 && k.proto == PROTO_TCP)
    );
}

#[test]
fn identical_port_sets_share_bitmaps() {
    let rules: Vec<Rule> = (0..50)
        .map(|i| {
            rule(
                &format!("10.{i}.0.0/16"),
                Some(&[(443, 443)]),
                Protocol::Tcp,
            )
        })
        .collect();
    let e = CompiledPolicy::compile(&rules).entries(1);
    assert_eq!(e.v4.len(), 50);
    assert_eq!(e.port_blocks.len(), 1);
}

#[test]
fn ipv6_entries() {
    let rules = [rule("2001:db8::/32", Some(&[(443, 443)]), Protocol::Any)];
    let e = CompiledPolicy::compile(&rules).entries(2);
    assert_eq!(e.v6.len(), 1);
    assert_eq!(e.v6[0].0.prefix_len(), 64);
    assert_eq!(&e.v6[0].0.data().addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
    assert_eq!(e.port_blocks.len(), 2, "one block per protocol");
}

/// A small deterministic generator: no extra dependency, same cases every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn longest_match_agrees_with_rule_semantics_on_random_policies() {
    let mut rng = Lcg(42);
    for _ in 0..200 {
        let n = 1 + rng.next() % 12;
        let rules: Vec<Rule> = (0..n)
            .map(|_| {
                let len = (rng.next() % 33) as u8;
                let addr =
                    std::net::Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
                let net = ipnet::Ipv4Net::new(addr, len).unwrap().trunc();
                let ports = match rng.next() % 3 {
                    0 => None,
                    _ => {
                        let a = 1 + (rng.next() % 2000) as u16;
                        let b = a + (rng.next() % 700) as u16;
                        Some(vec![PortRange { first: a, last: b }])
                    }
                };
                let protocol =
                    [Protocol::Tcp, Protocol::Udp, Protocol::Any][(rng.next() % 3) as usize];
                Rule {
                    cidr: IpNet::V4(net),
                    ports,
                    protocol,
                    line: 1,
                }
            })
            .collect();
        let p = CompiledPolicy::compile(&rules);
        for _ in 0..200 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(
                0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
            ));
            let port = 1 + (rng.next() % 2800) as u16;
            let tcp = rng.next().is_multiple_of(2);
            assert_eq!(
                p.allows(addr, port, tcp),
                any_rule_allows(&rules, addr, port, tcp),
                "{addr}:{port} tcp={tcp} rules={rules:?}"
            );
        }
    }
}

#[test]
fn hundred_thousand_rules_compile() {
    let rules: Vec<Rule> = (0..100_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 | (i << 8));
            rule(&format!("{a}/24"), Some(&[(443, 443)]), Protocol::Tcp)
        })
        .collect();
    let e = CompiledPolicy::compile(&rules).entries(1);
    assert_eq!(e.v4.len(), 100_000);
    assert_eq!(e.port_blocks.len(), 1);
}

#[test]
fn rule_index_finds_the_most_specific_allowing_rule() {
    let rules = [
        rule("10.0.0.0/8", Some(&[(443, 443)]), Protocol::Tcp),
        rule("10.1.0.0/16", Some(&[(80, 80)]), Protocol::Tcp),
        rule("2001:db8::/32", None, Protocol::Udp),
    ];
    let idx = RuleIndex::new(&rules);
    let a: IpAddr = "10.1.2.3".parse().unwrap();
    assert_eq!(idx.find(&rules, a, 80, true), Some(1));
    assert_eq!(idx.find(&rules, a, 443, true), Some(0));
    assert_eq!(idx.find(&rules, a, 22, true), None);
    assert_eq!(
        idx.find(&rules, "2001:db8::9".parse().unwrap(), 53, false),
        Some(2)
    );
    assert_eq!(
        idx.find(&rules, "2001:db8::9".parse().unwrap(), 53, true),
        None
    );
}
