//! DNS steering: every DNS query an agent with hostname rules sends (TCP or
//! UDP to port 53, whatever server it names) goes to agentd's resolver
//! socket for that agent instead, and the agent still sees the server it
//! asked: replies' source address (`recvmsg`) and `getpeername` are turned
//! back into the original server. glibc drops replies from a source it did
//! not send to, so the second half matters as much as the first.
//!
//! The resolver listens on one socket per agent and protocol, so the socket
//! a query arrives on says which agent asked; nothing in the query can
//! claim another identity.
use agentd_ebpf::{
    AGENT_KILLED, DNS_PORT, MAX_AGENTS, MAX_STEERED, PROTO_TCP, PROTO_UDP, ResolverPorts,
    SteeredDst,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::bpf_get_socket_cookie,
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap},
    programs::SockAddrContext,
};

use crate::programs::{AGENTS, ALLOW, DENY, agent_cgroup, read_user_ip6};

#[map(name = "AGENTD_RESOLVERS")]
static RESOLVERS: Array<ResolverPorts> = Array::pinned(MAX_AGENTS, 0);

#[map(name = "AGENTD_STEERED")]
static STEERED: LruHashMap<u64, SteeredDst> = LruHashMap::pinned(MAX_STEERED, 0);

/// 127.0.0.1 as `user_ip4` holds it (network byte order in memory).
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the four `user_ip6` words.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Recvmsg and getpeername programs must return 1 (they cannot refuse).
const PASS: i32 = 1;

/// What to do with a connect or send.
enum Steer {
    /// DNS from an agent whose DNS agentd answers: to this resolver port
    /// (host byte order).
    To(u16),
    /// Already addressed to the agent's own resolver (an IPv6 socket
    /// connected to a steered mapped server sends through the IPv4 hook with
    /// the rewritten address): let it through as it is.
    Through,
}

/// Whether this connect or send is the agent's DNS. A killed agent's DNS is
/// not steered: it is judged, and denied, like everything else.
/// `to_loopback`: the destination is the resolver's own address.
#[inline(always)]
fn steer(user_port: u32, proto: u32, v6: bool, to_loopback: bool) -> Option<Steer> {
    let port = u16::from_be(user_port as u16);
    if port != DNS_PORT && !to_loopback {
        return None;
    }
    let tcp = proto == u32::from(PROTO_TCP);
    if !tcp && proto != u32::from(PROTO_UDP) {
        return None;
    }
    // SAFETY: plain data, replaced whole by userspace.
    let agent = unsafe { AGENTS.get(&agent_cgroup()) }?;
    if agent.flags & AGENT_KILLED != 0 {
        return None;
    }
    let ports = RESOLVERS.get(agent.agent_id)?;
    let resolver = match (v6, tcp) {
        (false, false) => ports.udp4,
        (false, true) => ports.tcp4,
        (true, false) => ports.udp6,
        (true, true) => ports.tcp6,
    };
    if resolver == 0 {
        None
    } else if to_loopback && port == resolver {
        Some(Steer::Through)
    } else if port == DNS_PORT {
        Some(Steer::To(resolver))
    } else {
        None
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper only reads the context's socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Remembers where the socket meant to go. Without this the reply could not
/// be made to look like it came from there, so failing to remember denies.
#[inline(always)]
fn remember(
    ctx: &SockAddrContext,
    ip: [u32; 4],
    user_port: u32,
    resolver_port: u32,
    v4: bool,
) -> bool {
    let dst = SteeredDst {
        ip,
        port: user_port,
        resolver_port,
        v4: u32::from(v4),
    };
    STEERED.insert(&cookie(ctx), &dst, 0).is_ok()
}

/// Steers an IPv4 DNS connect or send; `None` when it is not one to steer.
#[inline(always)]
pub fn steer4(ctx: &SockAddrContext) -> Option<i32> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: the kernel hands us a valid bpf_sock_addr for this hook.
    let (ip, user_port, proto) = unsafe { ((*sa).user_ip4, (*sa).user_port, (*sa).protocol) };
    let port = match steer(user_port, proto, false, ip == LOOPBACK4)? {
        Steer::To(port) => port,
        Steer::Through => return Some(ALLOW),
    };
    let raw_port = u32::from(port.to_be());
    if !remember(ctx, [ip, 0, 0, 0], user_port, raw_port, true) {
        return Some(DENY);
    }
    // SAFETY: connect4/sendmsg4 may rewrite the destination.
    unsafe {
        (*sa).user_ip4 = LOOPBACK4;
        (*sa).user_port = raw_port;
    }
    Some(ALLOW)
}

/// Steers an IPv6 DNS connect or send. An IPv4-mapped server goes to the
/// IPv4 resolver (as a mapped address), anything else to the IPv6 one.
#[inline(always)]
pub fn steer6(ctx: &SockAddrContext) -> Option<i32> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (ip, user_port, proto) = read_user_ip6(sa);
    let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED;
    let to_loopback = ip == LOOPBACK6 || (mapped && ip[3] == LOOPBACK4);
    let port = match steer(user_port, proto, !mapped, to_loopback)? {
        Steer::To(port) => port,
        Steer::Through => return Some(ALLOW),
    };
    let raw_port = u32::from(port.to_be());
    if !remember(ctx, ip, user_port, raw_port, false) {
        return Some(DENY);
    }
    let to = if mapped {
        [0, 0, MAPPED, LOOPBACK4]
    } else {
        LOOPBACK6
    };
    // SAFETY: connect6/sendmsg6 may rewrite the destination, word by word.
    unsafe {
        (*sa).user_ip6[0] = to[0];
        (*sa).user_ip6[1] = to[1];
        (*sa).user_ip6[2] = to[2];
        (*sa).user_ip6[3] = to[3];
        (*sa).user_port = raw_port;
    }
    Some(ALLOW)
}

/// The original server of a steered socket, if `user_port` is the resolver
/// port it was steered to.
#[inline(always)]
fn original(ctx: &SockAddrContext, user_port: u32) -> Option<SteeredDst> {
    // SAFETY: plain data.
    let dst = unsafe { STEERED.get(&cookie(ctx)) }?;
    (dst.resolver_port as u16 == user_port as u16).then_some(*dst)
}

/// Shows a reply or peer at 127.0.0.1:<resolver port> as the server the
/// socket was steered away from.
#[inline(always)]
fn restore4(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: valid context for recvmsg4/getpeername4.
    let (ip, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    if ip != LOOPBACK4 {
        return;
    }
    if let Some(dst) = original(ctx, user_port) {
        // An IPv4 socket is only ever steered by the IPv4 hooks.
        // SAFETY: recvmsg4/getpeername4 may rewrite the address.
        unsafe {
            (*sa).user_ip4 = dst.ip[0];
            (*sa).user_port = dst.port;
        }
    }
}

#[inline(always)]
fn restore6(ctx: &SockAddrContext) {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    let (ip, user_port, _) = read_user_ip6(sa);
    let from_resolver = ip == LOOPBACK6 || ip == [0, 0, MAPPED, LOOPBACK4];
    if !from_resolver {
        return;
    }
    if let Some(dst) = original(ctx, user_port) {
        // Steered by the IPv4 sendmsg hook (an IPv6 socket sending to a
        // mapped server): show the server in its mapped form.
        let ip = if dst.v4 != 0 {
            [0, 0, MAPPED, dst.ip[0]]
        } else {
            dst.ip
        };
        // SAFETY: recvmsg6/getpeername6 may rewrite the address.
        unsafe {
            (*sa).user_ip6[0] = ip[0];
            (*sa).user_ip6[1] = ip[1];
            (*sa).user_ip6[2] = ip[2];
            (*sa).user_ip6[3] = ip[3];
            (*sa).user_port = dst.port;
        }
    }
}

#[cgroup_sock_addr(recvmsg4)]
pub fn agentd_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    PASS
}

#[cgroup_sock_addr(recvmsg6)]
pub fn agentd_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    PASS
}

#[cgroup_sock_addr(getpeername4)]
pub fn agentd_getpeername4(ctx: SockAddrContext) -> i32 {
    restore4(&ctx);
    PASS
}

#[cgroup_sock_addr(getpeername6)]
pub fn agentd_getpeername6(ctx: SockAddrContext) -> i32 {
    restore6(&ctx);
    PASS
}
