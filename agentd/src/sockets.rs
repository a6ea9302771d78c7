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
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

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
///
/// Reads the `/proc/PID/fd` links (relative to the opened directory, which
/// saves a path walk per descriptor). Nothing here touches the files
/// themselves: duplicating them (pidfd_getfd) would be cheaper per
/// descriptor, but closing the duplicate runs the file's flush, which a
/// hostile agent could make block (a FUSE file) and so stall the kill.
fn socket_inodes(pids: &[u32]) -> HashSet<u32> {
    let mut out = HashSet::new();
    for pid in pids {
        let dir = format!("/proc/{pid}/fd");
        let (Ok(fd_dir), Ok(entries)) = (fs::File::open(&dir), fs::read_dir(&dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(target) = nix::fcntl::readlinkat(&fd_dir, e.file_name().as_os_str()) else {
                continue;
            };
            if let Some(n) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                out.insert(n);
            }
        }
    }
    out
}

/// The ids of a cgroup and every cgroup below it.
fn cgroup_ids(dir: &Path) -> Vec<u64> {
    fn walk(dir: &Path, out: &mut Vec<u64>, depth: u32) {
        if depth > 32 {
            return;
        }
        if let Ok(id) = crate::cgroup::cgroup_id(dir) {
            out.push(id);
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out, depth + 1);
                }
            }
        }
    }
    let mut out = Vec::new();
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
    // Listeners are left alone (the kill's packet drop keeps them silent),
    // and closed or TIME_WAIT entries are not connections. UDP sockets
    // report TCP_CLOSE when unconnected and are torn down in every state.
    let states = if protocol == IPPROTO_TCP {
        StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE
    } else {
        StateFlags::all()
    };
    SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states,
        socket_id,
    })
}

const TCP_SYN_SENT: u8 = 2;

/// `INET_DIAG_REQ_BYTECODE`: a filter program the kernel runs on each
/// socket of a dump, and its two instructions we use.
const INET_DIAG_REQ_BYTECODE: u16 = 1;
const INET_DIAG_BC_JMP: u8 = 1;
const INET_DIAG_BC_CGROUP_COND: u8 = 13;
/// Cgroups one kernel-side filter names at most (a jump spans 16 bits);
/// an agent with more sub-cgroups gets an unfiltered dump, filtered here.
const MAX_FILTER_CGROUPS: usize = 1024;

/// A sock_diag filter that keeps a socket when its cgroup is one of `ids`.
/// Per id: "cgroup == id? fall into a jump to the end (keep) : go on to the
/// next id"; failing the last one jumps past the end (drop).
fn cgroup_filter(ids: &[u64]) -> Vec<u8> {
    /// CGROUP_COND (4-byte op + u64) then JMP (4-byte op).
    const UNIT: usize = 16;
    let len = ids.len() * UNIT;
    let mut bc = Vec::with_capacity(len);
    for (i, id) in ids.iter().enumerate() {
        let remaining = len - i * UNIT;
        let no = if i + 1 == ids.len() {
            remaining + 4
        } else {
            UNIT
        };
        bc.extend([INET_DIAG_BC_CGROUP_COND, 12]);
        bc.extend((no as u16).to_ne_bytes());
        bc.extend(id.to_ne_bytes());
        bc.extend([INET_DIAG_BC_JMP, 4]);
        bc.extend(((remaining - 12) as u16).to_ne_bytes());
    }
    bc
}

/// A socket to destroy, as a dump reported it.
#[derive(Clone)]
struct Target {
    family: u8,
    protocol: u8,
    id: SocketId,
    inode: u32,
    state: u8,
}

/// Every socket of one family and protocol, from the kernel; with `only`,
/// just those whose cgroup is one of these (the kernel filters).
fn dump(
    socket: &Socket,
    family: u8,
    protocol: u8,
    only: Option<&[u64]>,
    out: &mut Vec<Target>,
) -> io::Result<()> {
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let mut req = encode(NLM_F_REQUEST | NLM_F_DUMP, 0, request(family, protocol, id));
    if let Some(ids) = only {
        use netlink_packet_core::Emitable as _;
        let nla = netlink_packet_core::DefaultNla::new(INET_DIAG_REQ_BYTECODE, cgroup_filter(ids));
        let at = req.len();
        req.resize(at + nla.buffer_len(), 0);
        nla.emit(&mut req[at..]);
        let len = req.len() as u32;
        req[..4].copy_from_slice(&len.to_ne_bytes());
    }
    socket.send(&req, 0)?;
    let mut buf = vec![0u8; 1 << 16];
    // Bounded: a dump ends with NLMSG_DONE; this caps a misbehaving one.
    for _ in 0..100_000 {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        for msg in messages(&buf[..n])? {
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    out.push(Target {
                        family,
                        protocol,
                        id: r.header.socket_id,
                        inode: r.header.inode,
                        state: r.header.state,
                    })
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::from_raw_os_error(e.code.map_or(0, |c| -c.get())));
                }
                _ => {}
            }
        }
    }
    Err(io::Error::other("sock_diag dump did not end"))
}

/// Every TCP and UDP socket, IPv4 and IPv6 (see [`dump`]).
fn dump_every_kind(socket: &Socket, only: Option<&[u64]>) -> io::Result<Vec<Target>> {
    let mut out = Vec::new();
    for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
        for family in [AF_INET, AF_INET6] {
            dump(socket, family, protocol, only, &mut out)?;
        }
    }
    Ok(out)
}

/// Destroy requests sent per write: one netlink round trip per socket would
/// make tearing down 10 000 connections take a quarter of a second.
const DESTROY_BATCH: usize = 256;

/// Destroys sockets in batches (many requests per write, then their acks)
/// and returns, per socket, the kernel's answer (0 or -errno).
fn destroy_all(socket: &Socket, targets: &[Target]) -> io::Result<Vec<i32>> {
    let mut results = vec![0i32; targets.len()];
    let mut buf = vec![0u8; 1 << 16];
    for (chunk_no, chunk) in targets.chunks(DESTROY_BATCH).enumerate() {
        let base = chunk_no * DESTROY_BATCH;
        let mut out = Vec::with_capacity(chunk.len() * 96);
        for (i, t) in chunk.iter().enumerate() {
            let destroy = SockDiagDestroy::new(request(t.family, t.protocol, t.id.clone()));
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

/// Destroy workers at most: each reset is sent and delivered to a loopback
/// peer on the destroying CPU, so the work spreads over CPUs.
const MAX_DESTROY_WORKERS: usize = 4;

/// [`destroy_all`] split over one netlink socket per CPU (up to
/// [`MAX_DESTROY_WORKERS`]); results in the order of `targets`.
fn destroy_parallel(targets: &[Target]) -> io::Result<Vec<i32>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_DESTROY_WORKERS);
    if workers < 2 || targets.len() < 2 * DESTROY_BATCH {
        return destroy_all(&connect()?, targets);
    }
    let per = targets.len().div_ceil(workers);
    std::thread::scope(|s| {
        let parts: Vec<_> = targets
            .chunks(per)
            .map(|part| s.spawn(move || destroy_all(&connect()?, part)))
            .collect();
        let mut out = Vec::with_capacity(targets.len());
        for part in parts {
            out.extend(
                part.join()
                    .map_err(|_| io::Error::other("a destroy worker panicked"))??,
            );
        }
        Ok(out)
    })
}

/// Aborts every TCP connection and UDP socket that belongs to the agent:
/// by cgroup (the agent's cgroup and those below it) or held open by one of
/// its processes. Listening sockets are left; the kill's packet drop keeps
/// them silent.
///
/// The kernel lists the sockets of the agent's cgroups (a filtered dump)
/// and they are destroyed at once, over several CPUs, while another thread
/// reads the processes' file descriptors. Only if the processes hold a
/// socket that was not in that list (passed in, inherited, or not TCP/UDP
/// at all) is every socket listed, to find and destroy the TCP/UDP ones.
pub fn abort(cgroup_dir: &Path, pids: Vec<u32>, received: Instant) -> io::Result<AbortReport> {
    let scan = std::thread::spawn(move || socket_inodes(&pids));
    let cgroups = cgroup_ids(cgroup_dir);
    let socket = connect()?;
    let mut report = AbortReport::default();

    let started = Instant::now();
    let mut owned = Vec::new();
    for ids in cgroups.chunks(MAX_FILTER_CGROUPS) {
        owned.extend(dump_every_kind(&socket, Some(ids))?);
    }
    report.dump_us = started.elapsed().as_secs_f64() * 1e6;
    // Connects in flight first: their SYNs are dropped now, so the threads
    // that started them sit blocked until their socket is destroyed.
    owned.sort_by_key(|t| t.protocol != IPPROTO_TCP || t.state != TCP_SYN_SENT);
    let started = Instant::now();
    let first = destroy_parallel(&owned)?;
    report.destroy_us = started.elapsed().as_secs_f64() * 1e6;

    let held = scan.join().unwrap_or_default();
    let known: HashSet<u32> = owned.iter().map(|t| t.inode).collect();
    let mut smuggled = Vec::new();
    if held.iter().any(|inode| !known.contains(inode)) {
        let started = Instant::now();
        smuggled = dump_every_kind(&socket, None)?;
        smuggled.retain(|t| held.contains(&t.inode) && !known.contains(&t.inode));
        report.dump_us += started.elapsed().as_secs_f64() * 1e6;
    }
    let started = Instant::now();
    let second = destroy_all(&socket, &smuggled)?;
    report.destroy_us += started.elapsed().as_secs_f64() * 1e6;

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

/// How many open TCP/UDP sockets (listeners aside) the processes hold.
/// Used when a running process is adopted: sockets it opened before carry
/// their old cgroup, so the agent's hooks never judge them (the kill switch
/// still cuts them, through the processes' descriptors).
pub fn held_inet_sockets(pids: &[u32]) -> io::Result<usize> {
    let held = socket_inodes(pids);
    if held.is_empty() {
        return Ok(0);
    }
    let socket = connect()?;
    Ok(dump_every_kind(&socket, None)?
        .iter()
        .filter(|t| held.contains(&t.inode))
        .count())
}

/// Destroys the sockets of one cgroup whose destination `allowed` rejects
/// (`allowed(address, port, tcp)`); sockets with no destination yet are
/// left. Used when enforcement arrives on a cgroup that existed briefly
/// without it (a bound service's cgroup, recreated): whatever was
/// connected in that gap and the rules do not allow is cut.
pub fn sweep(
    cgroup_id: u64,
    allowed: impl Fn(std::net::IpAddr, u16, bool) -> bool,
) -> io::Result<usize> {
    let socket = connect()?;
    let mut found = dump_every_kind(&socket, Some(&[cgroup_id]))?;
    found.retain(|t| {
        let dst = t.id.destination_address;
        let connected = !dst.is_unspecified() && t.id.destination_port != 0;
        connected && !allowed(dst, t.id.destination_port, t.protocol == IPPROTO_TCP)
    });
    Ok(destroy_all(&socket, &found)?
        .into_iter()
        .filter(|&c| c == 0)
        .count())
}
