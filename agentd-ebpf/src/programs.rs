use agentd_ebpf::*;

use crate::steer;
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::bpf_ktime_get_coarse_ns,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, map},
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};

// Every map is pinned by name under the daemon's bpffs directory so that the
// kernel keeps enforcing if the daemon dies, and a restarted daemon finds the
// same state.
#[map(name = "AGENTD_AGENTS")]
pub(crate) static AGENTS: HashMap<u64, AgentEntry> = HashMap::pinned(MAX_AGENTS, 0);

#[map(name = "AGENTD_RULES_V4")]
static RULES_V4: LpmTrie<Rule4Key, RuleValue> = LpmTrie::pinned(MAX_PREFIXES, 0);

#[map(name = "AGENTD_RULES_V6")]
static RULES_V6: LpmTrie<Rule6Key, RuleValue> = LpmTrie::pinned(MAX_PREFIXES, 0);

#[map(name = "AGENTD_PORTS")]
static PORTS: HashMap<PortBlockKey, PortBlock> = HashMap::pinned(MAX_PORT_BLOCKS, 0);

#[map(name = "AGENTD_COUNTERS")]
static COUNTERS: PerCpuArray<AgentCounters> = PerCpuArray::pinned(MAX_AGENTS + 1, 0);

#[map(name = "AGENTD_LEARNED")]
static LEARNED: HashMap<LearnedKey, LearnedValue> = HashMap::pinned(MAX_LEARNED, 0);

#[map(name = "AGENTD_EVENTS")]
static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Which agent a running program belongs to. The kernel keeps one value per
/// cgroup the program is attached to (cgroup local storage), and runs our
/// programs for a socket because the socket's cgroup is, or is below, an
/// agent cgroup we attached to: this value is therefore the agent of the
/// socket's cgroup, not of whichever thread happens to use the socket.
/// Userspace writes the agent cgroup's id right after attaching; 0 (not yet
/// written) matches no agent and is denied.
#[expect(
    deprecated,
    reason = "CGRP_STORAGE needs a cgroup pointer these hooks do not have"
)]
#[map(name = "AGENTD_IDENTITY")]
static IDENTITY: aya_ebpf::maps::CgroupStorage<u64> = aya_ebpf::maps::CgroupStorage::pinned();

/// The agent cgroup this program invocation is attached for.
#[inline(always)]
pub(crate) fn agent_cgroup() -> u64 {
    // SAFETY: bpf_get_local_storage always returns valid storage for the
    // attachment that is running.
    unsafe { *IDENTITY.get_ptr_mut() }
}

/// The cgroup hooks' return values.
pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

/// bpf_ringbuf_query / bpf_ringbuf_submit flags (UAPI).
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
/// Wake the daemon once this much is waiting (about 800 events).
const WAKEUP_BYTES: u64 = 64 * 1024;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[derive(Clone, Copy)]
enum Dst {
    V4(u32),
    V6([u32; 4]),
}

struct Decision {
    agent_id: u32,
    verdict: u8,
    reason: u8,
}

#[cgroup_sock_addr(connect4)]
pub fn agentd_connect4(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = steer::steer4(&ctx) {
        return verdict;
    }
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    judge(KIND_CONNECT, Dst::V4(ip), port, proto)
}

#[cgroup_sock_addr(connect6)]
pub fn agentd_connect6(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = steer::steer6(&ctx) {
        return verdict;
    }
    let (dst, port, proto) = read_v6(ctx.sock_addr);
    judge(KIND_CONNECT, dst, port, proto)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn agentd_sendmsg4(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = steer::steer4(&ctx) {
        return verdict;
    }
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let (ip, port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    judge(KIND_SENDMSG, Dst::V4(ip), port, proto)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn agentd_sendmsg6(ctx: SockAddrContext) -> i32 {
    if let Some(verdict) = steer::steer6(&ctx) {
        return verdict;
    }
    let (dst, port, proto) = read_v6(ctx.sock_addr);
    judge(KIND_SENDMSG, dst, port, proto)
}

/// Sockets that the connect/sendmsg hooks never see (raw, ICMP "ping",
/// SCTP, ...) would be a way around the allowlist, so agents may only create
/// TCP and UDP sockets in the inet families.
#[cgroup_sock(sock_create)]
pub fn agentd_sock_create(ctx: SockContext) -> i32 {
    let sk: *mut bpf_sock = ctx.sock;
    // SAFETY: the kernel hands us a valid bpf_sock for this hook.
    let (family, ty, proto) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    if family != AF_INET as u32 && family != AF_INET6 as u32 {
        return ALLOW;
    }
    let tcp_or_udp = (ty == SOCK_STREAM && proto == PROTO_TCP as u32)
        || (ty == SOCK_DGRAM && proto == PROTO_UDP as u32);
    if tcp_or_udp {
        return ALLOW;
    }
    let cgroup_id = agent_cgroup();
    let (agent_id, verdict) = match unsafe { AGENTS.get(&cgroup_id) } {
        Some(a) if a.mode == MODE_AUDIT && a.flags & AGENT_KILLED == 0 => {
            (a.agent_id, VERDICT_AUDIT)
        }
        Some(a) => (a.agent_id, VERDICT_DENY),
        None => (UNKNOWN_AGENT, VERDICT_DENY),
    };
    let d = Decision {
        agent_id,
        verdict,
        reason: REASON_PROTOCOL,
    };
    let dst = if family == AF_INET6 as u32 {
        Dst::V6([0; 4])
    } else {
        Dst::V4(0)
    };
    record(cgroup_id, &d, KIND_SOCKET, proto as u8, ty as u8, dst, 0);
    if verdict == VERDICT_DENY { DENY } else { ALLOW }
}

/// The kill switch's per-packet half: while an agent is killed, every packet
/// to or from its sockets is dropped, so nothing crosses on a connection
/// that was established before the switch was pulled. When the agent is not
/// killed this is one storage read and one hash lookup per packet.
///
/// One exception on the way out: a bare TCP reset (RST set, no payload).
/// The kill tears established connections down with SOCK_DESTROY, and the
/// reset that sends is how the peer learns the connection is gone; dropping
/// it would leave the peer holding a half-open connection (and a later
/// connection from the same port would stall against it). A reset carries
/// no data and can only end a connection, never open or feed one.
#[cgroup_skb(egress)]
pub fn agentd_egress(ctx: SkBuffContext) -> i32 {
    match killed_slot() {
        Some(slot) if !is_bare_tcp_reset(&ctx) => drop_packet(slot),
        _ => ALLOW,
    }
}

#[cgroup_skb(ingress)]
pub fn agentd_ingress(_ctx: SkBuffContext) -> i32 {
    killed_slot().map_or(ALLOW, drop_packet)
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP_U8: u8 = 6;
const TCP_FLAG_RST: u8 = 0x04;

/// Whether the packet (starting at its IP header, as cgroup skb programs
/// see it) is a TCP segment with RST set and no payload. IPv6 extension
/// headers are not walked: the kernel's own resets carry none, and anything
/// unusual is simply not a reset here (and stays dropped).
#[inline(always)]
fn is_bare_tcp_reset(ctx: &SkBuffContext) -> bool {
    let (tcp_off, ip_payload) = match u16::from_be(ctx.skb.protocol() as u16) {
        ETH_P_IP => {
            let Ok(vihl) = ctx.load::<u8>(0) else {
                return false;
            };
            let Ok(proto) = ctx.load::<u8>(9) else {
                return false;
            };
            let Ok(frag) = ctx.load::<u16>(6) else {
                return false;
            };
            let Ok(total) = ctx.load::<u16>(2) else {
                return false;
            };
            // Fragments (offset or more-fragments set) are never resets.
            if proto != IPPROTO_TCP_U8 || u16::from_be(frag) & 0x3fff != 0 {
                return false;
            }
            let ihl = usize::from(vihl & 0x0f) * 4;
            (ihl, usize::from(u16::from_be(total)).saturating_sub(ihl))
        }
        ETH_P_IPV6 => {
            let Ok(next) = ctx.load::<u8>(6) else {
                return false;
            };
            let Ok(plen) = ctx.load::<u16>(4) else {
                return false;
            };
            if next != IPPROTO_TCP_U8 {
                return false;
            }
            (40, usize::from(u16::from_be(plen)))
        }
        _ => return false,
    };
    if tcp_off > 60 {
        return false;
    }
    let Ok(doff) = ctx.load::<u8>(tcp_off + 12) else {
        return false;
    };
    let Ok(flags) = ctx.load::<u8>(tcp_off + 13) else {
        return false;
    };
    flags & TCP_FLAG_RST != 0 && usize::from(doff >> 4) * 4 == ip_payload
}

/// The agent's counter slot if the socket's agent is killed.
#[inline(always)]
fn killed_slot() -> Option<u32> {
    // SAFETY: plain data, replaced whole by userspace.
    let agent = unsafe { AGENTS.get(&agent_cgroup()) }?;
    // No entry (no identity yet, or no longer an agent): connects and sends
    // are refused by the other hooks; there is no kill to enforce here.
    if agent.flags & AGENT_KILLED == 0 {
        return None;
    }
    Some(if agent.agent_id < MAX_AGENTS {
        agent.agent_id
    } else {
        UNKNOWN_AGENT
    })
}

/// Drops a killed agent's packet and counts it.
#[inline(always)]
fn drop_packet(slot: u32) -> i32 {
    if let Some(c) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { (*c).packets_dropped += 1 };
    }
    DENY
}

/// The destination, port and protocol of an IPv6 socket-address hook.
#[inline(always)]
pub(crate) fn read_user_ip6(sa: *mut bpf_sock_addr) -> ([u32; 4], u32, u32) {
    // SAFETY: valid context pointer. user_ip6 must be read as four separate
    // u32 loads (the verifier rejects wider or narrower accesses).
    unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
            (*sa).protocol,
        )
    }
}

#[inline(always)]
fn read_v6(sa: *mut bpf_sock_addr) -> (Dst, u32, u32) {
    let ([a, b, c, d], port, proto) = read_user_ip6(sa);
    // ::ffff:a.b.c.d is an IPv4 destination and is judged by the IPv4 rules.
    if a == 0 && b == 0 && c == u32::from_be(0x0000_ffff) {
        (Dst::V4(d), port, proto)
    } else {
        (Dst::V6([a, b, c, d]), port, proto)
    }
}

/// Decides one connect or send and records it. Never waits on logging.
#[inline(always)]
fn judge(kind: u8, dst: Dst, user_port: u32, proto: u32) -> i32 {
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(user_port as u16);
    let proto = proto as u8;
    let cgroup_id = agent_cgroup();
    let d = decide(cgroup_id, dst, port, proto);
    record(cgroup_id, &d, kind, proto, 0, dst, port);
    if d.verdict == VERDICT_DENY {
        DENY
    } else {
        ALLOW
    }
}

#[inline(always)]
fn decide(cgroup_id: u64, dst: Dst, port: u16, proto: u8) -> Decision {
    // SAFETY: the value is plain data; updates from userspace replace whole
    // elements, so we see either the old or the new entry.
    let Some(agent) = (unsafe { AGENTS.get(&cgroup_id) }) else {
        // Our programs run for this socket, so it belongs to an agent we no
        // longer (or not yet) know: fail closed.
        return Decision {
            agent_id: UNKNOWN_AGENT,
            verdict: VERDICT_DENY,
            reason: REASON_UNKNOWN_AGENT,
        };
    };
    let agent_id = agent.agent_id;
    if agent.flags & AGENT_KILLED != 0 {
        return Decision {
            agent_id,
            verdict: VERDICT_DENY,
            reason: REASON_KILLED,
        };
    }
    let tcp_or_udp = proto == PROTO_TCP || proto == PROTO_UDP;
    let (verdict, reason) = if tcp_or_udp && rule_allows(agent.policy_id, dst, port, proto) {
        (VERDICT_ALLOW, REASON_RULE)
    } else if tcp_or_udp && learned_allows(agent.policy_id, dst, port, proto) {
        (VERDICT_ALLOW, REASON_HOST)
    } else if agent.mode == MODE_AUDIT {
        (VERDICT_AUDIT, REASON_NO_RULE)
    } else if proto == PROTO_TCP || proto == PROTO_UDP {
        (VERDICT_DENY, REASON_NO_RULE)
    } else {
        (VERDICT_DENY, REASON_PROTOCOL)
    };
    Decision {
        agent_id,
        verdict,
        reason,
    }
}

/// One trie lookup and at most one hash lookup, whatever the rule count.
#[inline(always)]
fn rule_allows(policy_id: u32, dst: Dst, port: u16, proto: u8) -> bool {
    let policy = policy_id.to_be_bytes();
    let value = match dst {
        Dst::V4(ip) => {
            let key = Key::new(
                64,
                Rule4Key {
                    policy,
                    addr: ip.to_ne_bytes(),
                },
            );
            RULES_V4.get(&key).copied()
        }
        Dst::V6(_) => {
            let (_, addr) = dst_bytes(dst);
            let key = Key::new(160, Rule6Key { policy, addr });
            RULES_V6.get(&key).copied()
        }
    };
    match value {
        Some(value) => ports_allow(policy_id, value.port_set, value.flags, port, proto),
        None => false,
    }
}

/// Whether agentd's resolver has learned this destination for one of the
/// agent's hostname rules, and the entry has not expired. The kernel checks
/// the expiry itself: a learned address stops working on time even if the
/// daemon is not there to remove it.
#[inline(always)]
fn learned_allows(policy_id: u32, dst: Dst, port: u16, proto: u8) -> bool {
    let (family, addr) = dst_bytes(dst);
    let key = LearnedKey {
        policy_id,
        family,
        _pad: [0; 3],
        addr,
    };
    // SAFETY: plain data, replaced whole by userspace.
    let Some(value) = (unsafe { LEARNED.get(&key) }) else {
        return false;
    };
    // SAFETY: plain helper call.
    if value.expires_ns <= unsafe { bpf_ktime_get_coarse_ns() } {
        return false;
    }
    ports_allow(policy_id, value.port_set, value.flags, port, proto)
}

/// The port half of a rule value: all ports, none, or a bitmap lookup.
#[inline(always)]
fn ports_allow(policy_id: u32, port_set: u32, flags: u32, port: u16, proto: u8) -> bool {
    let (all, some) = if proto == PROTO_TCP {
        (TCP_ALL_PORTS, TCP_SOME_PORTS)
    } else {
        (UDP_ALL_PORTS, UDP_SOME_PORTS)
    };
    if flags & all != 0 {
        return true;
    }
    if flags & some == 0 {
        return false;
    }
    let key = PortBlockKey {
        policy_id,
        port_set,
        proto,
        _pad: 0,
        block: port / PORTS_PER_BLOCK as u16,
    };
    let Some(block) = (unsafe { PORTS.get(&key) }) else {
        return false;
    };
    let within = port as usize % PORTS_PER_BLOCK as usize;
    let word = (within / 64) & 7;
    block.bits[word] & (1u64 << (within % 64)) != 0
}

/// The family and network-order bytes of a destination (IPv4 in the first
/// four bytes), as events and learned-address keys carry it.
#[inline(always)]
fn dst_bytes(dst: Dst) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match dst {
        Dst::V4(ip) => {
            addr[0..4].copy_from_slice(&ip.to_ne_bytes());
            (AF_INET, addr)
        }
        Dst::V6(w) => {
            addr[0..4].copy_from_slice(&w[0].to_ne_bytes());
            addr[4..8].copy_from_slice(&w[1].to_ne_bytes());
            addr[8..12].copy_from_slice(&w[2].to_ne_bytes());
            addr[12..16].copy_from_slice(&w[3].to_ne_bytes());
            (AF_INET6, addr)
        }
    }
}

#[inline(always)]
fn proto_index(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 0,
        PROTO_UDP => 1,
        _ => 2,
    }
}

/// Counts the decision (exact, per CPU) and hands it to the ring buffer. If
/// the buffer is full the loss is counted; the verdict is unaffected.
#[inline(always)]
fn record(cgroup_id: u64, d: &Decision, kind: u8, proto: u8, sock_type: u8, dst: Dst, port: u16) {
    let slot = if d.agent_id < MAX_AGENTS {
        d.agent_id
    } else {
        UNKNOWN_AGENT
    };
    let counters = COUNTERS.get_ptr_mut(slot);
    if let Some(c) = counters {
        let i = proto_index(proto);
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            match d.verdict {
                VERDICT_ALLOW => (*c).allowed[i] += 1,
                VERDICT_AUDIT => (*c).audited[i] += 1,
                _ => (*c).denied[i] += 1,
            }
        }
    }

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        if let Some(c) = counters {
            // SAFETY: as above.
            unsafe { (*c).events_lost += 1 };
        }
        return;
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let (family, dst_addr) = dst_bytes(dst);
    entry.write(Event {
        ts_ns: unsafe { bpf_ktime_get_coarse_ns() },
        cgroup_id,
        agent_id: d.agent_id,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        kind,
        verdict: d.verdict,
        reason: d.reason,
        protocol: proto,
        family,
        sock_type,
        dst_port: port,
        _pad: [0; 4],
        dst_addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    });
    // Waking the daemon for every event costs more than the event: let
    // events accumulate (the daemon also drains on a short timer) and wake
    // it only once a batch is waiting.
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA);
    let flags = if avail >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags);
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot panic at run time; the verifier rejects
    // any path that would reach here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
