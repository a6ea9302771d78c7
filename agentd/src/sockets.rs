//! Tearing down a killed agent's established sockets with sock_diag
//! (`SOCK_DESTROY`, CONFIG_INET_DIAG_DESTROY): TCP peers get a reset, the
//! agent's own calls on the socket fail with ECONNABORTED.
//!
//! A socket belongs to the agent if the kernel reports its cgroup as one of
//! the agent's cgroups, or if one of the agent's processes holds it (a
//! socket passed in over a unix socket or inherited from before launch has
//! another cgroup, and no cgroup hook would ever see it).
use std::{collections::HashSet, fs, io, path::Path, time::Instant};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID` (Linux 5.8+): the socket's cgroup id, always sent.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// TCP states that are not connections to tear down.
const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;

/// What the teardown did.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AbortReport {
    pub aborted: usize,
    /// Of those, sockets found only through a process's file descriptors.
    pub via_fd: usize,
    pub failed: usize,
    /// Request received -> last socket aborted, microseconds (0 if none).
    pub last_abort_us: f64,
    /// Time listing the kernel's sockets (sock_diag dumps), microseconds.
    pub dump_us: f64,
    /// Time destroying the agent's sockets, microseconds.
    pub destroy_us: f64,
}

/// The inode numbers of every socket the processes hold open.
pub fn socket_inodes(pids: &[u32]) -> HashSet<u32> {
    let mut out = HashSet::new();
    for pid in pids {
        let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(target) = fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if let Some(n) = t
                    .strip_prefix("socket:[")
                    .and_then(|r| r.strip_suffix(']'))
                    .and_then(|n| n.parse().ok())
                {
                    out.insert(n);
                }
            }
        }
    }
    out
}

/// The ids of a cgroup and every cgroup below it.
pub fn cgroup_ids(dir: &Path) -> HashSet<u64> {
    fn walk(dir: &Path, out: &mut HashSet<u64>, depth: u32) {
        if depth > 32 {
            return;
        }
        if let Ok(id) = crate::cgroup::cgroup_id(dir) {
            out.insert(id);
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out, depth + 1);
                }
            }
        }
    }
    let mut out = HashSet::new();
    walk(dir, &mut out, 0);
    out
}

fn connect() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

/// One netlink message, serialized.
fn encode<T: netlink_packet_core::NetlinkSerializable>(
    flags: u16,
    sequence: u32,
    payload: T,
) -> Vec<u8>
where
    NetlinkPayload<T>: From<T>,
{
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = sequence;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The netlink messages in one received datagram.
fn messages(buf: &[u8]) -> io::Result<Vec<NetlinkMessage<SockDiagMessage>>> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < buf.len() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[offset..])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = msg.header.length as usize;
        out.push(msg);
        if len == 0 {
            break;
        }
        offset += len;
    }
    Ok(out)
}

fn request(family: u8, protocol: u8, socket_id: SocketId) -> SockDiagMessage {
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id,
    })
}

/// Every socket of one family and protocol, from the kernel.
fn dump(socket: &Socket, family: u8, protocol: u8) -> io::Result<Vec<InetResponse>> {
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let flags = NLM_F_REQUEST | NLM_F_DUMP;
    socket.send(&encode(flags, 0, request(family, protocol, id)), 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    // Bounded: a dump ends with NLMSG_DONE; this caps a misbehaving one.
    for _ in 0..100_000 {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for msg in messages(&buf[..n])? {
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => out.push(*r),
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::from_raw_os_error(e.code.map_or(0, |c| -c.get())));
                }
                _ => {}
            }
        }
    }
    Err(io::Error::other("sock_diag dump did not end"))
}

/// Destroy requests sent per write: one netlink round trip per socket would
/// make tearing down 10 000 connections take a quarter of a second.
const DESTROY_BATCH: usize = 256;

/// Destroys sockets in batches (many requests per write, then their acks)
/// and returns, per socket, the kernel's answer (0 or -errno).
fn destroy_all(socket: &Socket, targets: &[(u8, u8, SocketId)]) -> io::Result<Vec<i32>> {
    let mut results = vec![0i32; targets.len()];
    let mut buf = vec![0u8; 1 << 16];
    for (chunk_no, chunk) in targets.chunks(DESTROY_BATCH).enumerate() {
        let base = chunk_no * DESTROY_BATCH;
        let mut out = Vec::with_capacity(chunk.len() * 96);
        for (i, (family, protocol, id)) in chunk.iter().enumerate() {
            let destroy = SockDiagDestroy::new(request(*family, *protocol, id.clone()));
            out.extend(encode(
                NLM_F_REQUEST | NLM_F_ACK,
                (base + i) as u32,
                destroy,
            ));
        }
        socket.send(&out, 0)?;
        let mut acked = 0;
        // Bounded: one ack per request.
        while acked < chunk.len() {
            let n = socket.recv(&mut &mut buf[..], 0)?;
            for msg in messages(&buf[..n])? {
                if let NetlinkPayload::Error(e) = msg.payload {
                    let seq = msg.header.sequence_number as usize;
                    if let Some(r) = results.get_mut(seq) {
                        *r = e.code.map_or(0, |c| c.get());
                    }
                    acked += 1;
                }
            }
        }
    }
    Ok(results)
}

fn cgroup_of(r: &InetResponse) -> Option<u64> {
    use netlink_packet_core::Nla as _;
    r.nlas.iter().find_map(|nla| match nla {
        Nla::Other(d) if d.kind() == INET_DIAG_CGROUP_ID && d.value_len() == 8 => {
            let mut v = [0u8; 8];
            d.emit_value(&mut v);
            Some(u64::from_ne_bytes(v))
        }
        _ => None,
    })
}

/// Aborts every TCP connection and UDP socket that belongs to the agent:
/// by cgroup (the agent's cgroup and those below it) or held open by one of
/// its processes. Listening sockets are left; the kill's packet drop keeps
/// them silent.
///
/// One sock_diag dump serves both: sockets in the agent's cgroups are
/// destroyed at once while another thread reads the processes' file
/// descriptors; sockets outside the cgroups that those processes hold
/// (smuggled in) are then destroyed from the same dump.
pub fn abort(cgroup_dir: &Path, pids: Vec<u32>, received: Instant) -> io::Result<AbortReport> {
    let scan = std::thread::spawn(move || socket_inodes(&pids));
    let cgroups = cgroup_ids(cgroup_dir);
    let socket = connect()?;
    let dump_start = Instant::now();
    let mut by_cgroup = Vec::new();
    let mut others: std::collections::HashMap<u32, (u8, u8, SocketId)> = Default::default();
    for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
        for family in [AF_INET, AF_INET6] {
            for r in dump(&socket, family, protocol)? {
                let state = r.header.state;
                if protocol == IPPROTO_TCP
                    && matches!(state, TCP_LISTEN | TCP_TIME_WAIT | TCP_CLOSE)
                {
                    continue;
                }
                if cgroup_of(&r).is_some_and(|c| cgroups.contains(&c)) {
                    by_cgroup.push((family, protocol, r.header.socket_id));
                } else {
                    others.insert(r.header.inode, (family, protocol, r.header.socket_id));
                }
            }
        }
    }
    let mut report = AbortReport {
        dump_us: dump_start.elapsed().as_secs_f64() * 1e6,
        ..AbortReport::default()
    };
    let destroy_start = Instant::now();
    let first = destroy_all(&socket, &by_cgroup)?;
    let inodes = scan.join().unwrap_or_default();
    let smuggled: Vec<_> = others
        .into_iter()
        .filter(|(inode, _)| inodes.contains(inode))
        .map(|(_, target)| target)
        .collect();
    let second = destroy_all(&socket, &smuggled)?;
    report.destroy_us = destroy_start.elapsed().as_secs_f64() * 1e6;
    let tagged = first
        .into_iter()
        .map(|c| (c, false))
        .chain(second.into_iter().map(|c| (c, true)));
    for (code, via_fd) in tagged {
        match code {
            0 => {
                report.aborted += 1;
                report.via_fd += usize::from(via_fd);
            }
            // Gone in the meantime: nothing left to cut.
            c if c == -libc::ENOENT => {}
            c => {
                tracing::error!(errno = -c, "could not abort an agent socket");
                report.failed += 1;
            }
        }
    }
    if report.aborted > 0 {
        report.last_abort_us = received.elapsed().as_secs_f64() * 1e6;
    }
    Ok(report)
}
