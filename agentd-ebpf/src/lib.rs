//! The ABI between agentd's kernel programs and its daemon.
//!
//! Every type that crosses the kernel boundary (map keys, map values, ring
//! buffer records) is defined here once, `#[repr(C)]` with explicit padding,
//! so the eBPF side and userspace can never disagree about a layout. The
//! `user` feature adds the userspace half (`aya::Pod`).
#![no_std]

/// Bumped whenever a layout below changes. The daemon refuses to adopt pinned
/// maps written with another version instead of misreading them.
pub const ABI_VERSION: u32 = 3;

/// Agents are numbered densely from 0; the counters array has one slot per
/// agent plus [`UNKNOWN_AGENT`].
pub const MAX_AGENTS: u32 = 4096;
/// Counter slot and event `agent_id` for a socket whose cgroup carries our
/// programs but is not (or no longer) in the agents map: always denied.
pub const UNKNOWN_AGENT: u32 = MAX_AGENTS;

/// Capacity of each LPM trie (IPv4 and IPv6). Twice the supported 100 000
/// rules per family so that a full policy can be staged beside the live one.
pub const MAX_PREFIXES: u32 = 1 << 18;
/// Capacity of the port bitmap map (512 ports per block).
pub const MAX_PORT_BLOCKS: u32 = 1 << 17;
/// Ring buffer size in bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;
/// Capacity of the learned-address map (addresses agentd's resolver wrote
/// for hostname rules), twice the supported 65 536 so a reload can stage a
/// full set beside the live one.
pub const MAX_LEARNED: u32 = 1 << 17;
/// Sockets whose DNS is steered to agentd at once (least recently used
/// entries go first; only a socket that is still waiting for its reply
/// needs its entry).
pub const MAX_STEERED: u32 = 1 << 16;
/// The DNS port: connects and sends to it are steered to agentd's resolver.
pub const DNS_PORT: u16 = 53;

/// Names of the pinned maps, shared so userspace opens exactly what the
/// programs declare.
pub mod map_names {
    pub const AGENTS: &str = "AGENTD_AGENTS";
    pub const RULES_V4: &str = "AGENTD_RULES_V4";
    pub const RULES_V6: &str = "AGENTD_RULES_V6";
    pub const PORTS: &str = "AGENTD_PORTS";
    pub const COUNTERS: &str = "AGENTD_COUNTERS";
    pub const EVENTS: &str = "AGENTD_EVENTS";
    pub const IDENTITY: &str = "AGENTD_IDENTITY";
    pub const LEARNED: &str = "AGENTD_LEARNED";
    pub const RESOLVERS: &str = "AGENTD_RESOLVERS";
    pub const STEERED: &str = "AGENTD_STEERED";
}

/// Agent mode values (`AgentEntry::mode`).
pub const MODE_ENFORCE: u32 = 0;
/// The call is allowed and logged with the verdict it would have had.
pub const MODE_AUDIT: u32 = 1;

/// `AgentEntry::flags`: the kill switch is pulled; everything is denied.
pub const AGENT_KILLED: u32 = 1;

/// Value of the agents map, keyed by cgroup id (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentEntry {
    pub agent_id: u32,
    /// Which generation of rules in the tries applies. Changing rules means
    /// writing a new generation beside the live one and then replacing this
    /// entry: one map update, so no decision ever sees a mix.
    pub policy_id: u32,
    pub mode: u32,
    pub flags: u32,
}

/// LPM trie key data for IPv4. The prefix length counts the 32 policy bits
/// plus the CIDR's length, so one trie serves every policy generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule4Key {
    /// `policy_id` in big-endian byte order (the trie matches bytes from the front).
    pub policy: [u8; 4],
    /// Address in network byte order.
    pub addr: [u8; 4],
}

/// LPM trie key data for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule6Key {
    pub policy: [u8; 4],
    pub addr: [u8; 16],
}

/// `RuleValue::flags`: every TCP port is allowed for this prefix.
pub const TCP_ALL_PORTS: u32 = 1 << 0;
/// Some TCP ports are allowed: look them up in the port bitmap.
pub const TCP_SOME_PORTS: u32 = 1 << 1;
pub const UDP_ALL_PORTS: u32 = 1 << 2;
pub const UDP_SOME_PORTS: u32 = 1 << 3;

/// Value of both LPM tries. The policy compiler folds every rule whose CIDR
/// contains this prefix into it, so the longest match alone is the answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    pub port_set: u32,
    pub flags: u32,
}

/// Key of the learned-address map: an address agentd's resolver answered
/// for a hostname rule, under the policy generation it was written for (a
/// reload re-writes the learned set for the new generation, so the switch
/// stays one map update).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub policy_id: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 uses the first 4 bytes, the rest are zero.
    pub addr: [u8; 16],
}

/// Value of the learned-address map: which ports (a port set of the same
/// generation, as in [`RuleValue`]) and until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    pub port_set: u32,
    pub flags: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) after which the
    /// kernel ignores the entry, whether or not the daemon has removed it.
    pub expires_ns: u64,
}

/// Where an agent's DNS goes: agentd's per-agent resolver sockets on
/// 127.0.0.1 and ::1, ports in host byte order, 0 for none. Indexed by
/// agent id. An agent with no entry (all zero) has no DNS steering: its
/// DNS is judged by its rules like any other traffic.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolverPorts {
    pub udp4: u16,
    pub tcp4: u16,
    pub udp6: u16,
    pub tcp6: u16,
}

/// What a steered socket originally asked for, so that replies and
/// `getpeername` show the server the agent believes it talks to. Values are
/// exactly as the socket-address hook saw them (`user_ip4` in `ip[0]`, or
/// the four `user_ip6` words; `user_port`), keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeredDst {
    pub ip: [u32; 4],
    pub port: u32,
    /// The resolver port it was steered to, as written to `user_port`.
    pub resolver_port: u32,
    /// 1: `ip[0]` is an IPv4 address as an IPv4 hook saw it (an IPv6 socket
    /// sending to a mapped address runs the IPv4 sendmsg hook), 0: `ip` is
    /// as an IPv6 hook saw it.
    pub v4: u32,
}

/// Protocol numbers as the kernel reports them.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Ports per bitmap block.
pub const PORTS_PER_BLOCK: u32 = 512;

/// Key of the port bitmap hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortBlockKey {
    /// The policy generation this bitmap belongs to.
    pub policy_id: u32,
    pub port_set: u32,
    pub proto: u8,
    pub _pad: u8,
    /// `port / PORTS_PER_BLOCK`.
    pub block: u16,
}

/// 512 ports, bit `port % 64` of word `(port % 512) / 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortBlock {
    pub bits: [u64; 8],
}

/// Per-agent decision counters, kept in a per-CPU array so they are exact even
/// when events are lost. Index 0 is TCP, 1 is UDP, 2 is any other protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentCounters {
    pub allowed: [u64; 3],
    pub denied: [u64; 3],
    pub audited: [u64; 3],
    /// Decisions whose event did not fit in the ring buffer.
    pub events_lost: u64,
    /// Packets of the agent's sockets dropped while it is killed (both ways).
    pub packets_dropped: u64,
}

/// Which hook made the decision.
pub const KIND_CONNECT: u8 = 1;
pub const KIND_SENDMSG: u8 = 2;
pub const KIND_SOCKET: u8 = 3;

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// Audit mode: would have been denied, was allowed.
pub const VERDICT_AUDIT: u8 = 3;

/// Why the verdict was reached (for the audit log).
pub const REASON_RULE: u8 = 1;
pub const REASON_NO_RULE: u8 = 2;
pub const REASON_KILLED: u8 = 3;
pub const REASON_UNKNOWN_AGENT: u8 = 4;
pub const REASON_PROTOCOL: u8 = 5;
/// Allowed by an address agentd's resolver learned for a hostname rule.
pub const REASON_HOST: u8 = 6;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// One decision, as carried by the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) at decision time.
    /// Not the "fast" clocks: on some VMs (seen on Firecracker) those drift
    /// from the timekeeper that userspace reads, by minutes.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub agent_id: u32,
    /// Thread group id (the process id userspace sees).
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: u8,
    pub verdict: u8,
    pub reason: u8,
    /// IP protocol number (6 TCP, 17 UDP, others for refused socket types).
    pub protocol: u8,
    /// `AF_INET` or `AF_INET6` as the destination is judged: an IPv4-mapped
    /// IPv6 destination is reported as IPv4.
    pub family: u8,
    /// Socket type for `KIND_SOCKET` events (SOCK_RAW, ...), else 0.
    pub sock_type: u8,
    /// Destination port in host byte order.
    pub dst_port: u16,
    pub _pad: [u8; 4],
    /// Destination address in network byte order; IPv4 uses the first 4 bytes.
    pub dst_addr: [u8; 16],
    pub comm: [u8; 16],
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are #[repr(C)] plain data with explicit padding and
    // no invalid bit patterns.
    unsafe impl aya::Pod for AgentEntry {}
    unsafe impl aya::Pod for Rule4Key {}
    unsafe impl aya::Pod for Rule6Key {}
    unsafe impl aya::Pod for RuleValue {}
    unsafe impl aya::Pod for PortBlockKey {}
    unsafe impl aya::Pod for PortBlock {}
    unsafe impl aya::Pod for AgentCounters {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for LearnedValue {}
    unsafe impl aya::Pod for ResolverPorts {}
    unsafe impl aya::Pod for SteeredDst {}
}

// Layouts are part of the ABI: catch accidental changes at compile time.
const _: () = {
    assert!(core::mem::size_of::<AgentEntry>() == 16);
    assert!(core::mem::size_of::<Rule4Key>() == 8);
    assert!(core::mem::size_of::<Rule6Key>() == 20);
    assert!(core::mem::size_of::<RuleValue>() == 8);
    assert!(core::mem::size_of::<PortBlockKey>() == 12);
    assert!(core::mem::size_of::<PortBlock>() == 64);
    assert!(core::mem::size_of::<AgentCounters>() == 88);
    assert!(core::mem::size_of::<Event>() == 80);
    assert!(core::mem::size_of::<LearnedKey>() == 24);
    assert!(core::mem::size_of::<LearnedValue>() == 16);
    assert!(core::mem::size_of::<ResolverPorts>() == 8);
    assert!(core::mem::size_of::<SteeredDst>() == 28);
};
