//! The agent's side of the integration tests: run inside an agent (through
//! `agentd exec` or moved into its cgroup), it tries network operations and
//! prints one JSON line per operation with the result and the errno.
//!
//!   agentd-probe once OP ARGS...     one operation
//!   agentd-probe serve               operations read line by line from stdin
//!
//! Operations:
//!   tcp ADDR                 connect, send "probe", close
//!   open ADDR                open a TCP stream and keep it
//!   write TEXT               write TEXT on the open stream
//!   race N TCP UDP MS        N threads connecting, writing and sending for MS ms
//!   hold                     create a TCP socket now and keep it
//!   heldtcp ADDR             connect the held socket
//!   tcploop N ADDR           N connects; counts of successes, EPERM and other errors
//!   udp ADDR                 unconnected sendto
//!   udpconn ADDR1 ADDR2      connect to ADDR1 and send, then sendto ADDR2 on the same socket
//!   tfo ADDR                 TCP Fast Open: sendto(MSG_FASTOPEN) without connect
//!   sendmmsg ADDR...         one unconnected UDP socket, one sendmmsg with a message per ADDR
//!   raw                      open a raw ICMP socket
//!   rounds MS ADDR...        for MS ms, connect to each ADDR in turn; one letter per
//!                            connect, one string per round: a = allowed (connected or
//!                            refused by the peer), d = EPERM (denied by policy), o = other
//!   threads N                start N idle threads; their thread ids
//!   cgroup                   this process's cgroup v2 path
//!   id                       uid and gid
//!   escape CGROUP_DIR        try to move itself into CGROUP_DIR
//!   child OP ARGS...         run `once OP ARGS...` in a child process and relay its line
//!   dns SERVER NAME TYPE HOW one DNS query (HOW: udp, udp-unconnected, tcp): the answer,
//!                            the reply's source and the socket's peer
//!   resolve NAME             getaddrinfo (glibc's resolver, as any program uses it)
//!   resolve-tcp NAME PORT    getaddrinfo, then at once connect to the first address
//!   ns RESOLV NSSWITCH OP..  OP in a private mount namespace whose /etc/resolv.conf and
//!                            /etc/nsswitch.conf are the given files
use std::{
    io::{BufRead as _, Write as _},
    mem::{size_of, zeroed},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use serde_json::{Value, json};

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn fail(e: std::io::Error) -> Value {
    json!({"ok": false, "errno": errno_of(&e), "error": e.to_string()})
}

fn parse(addr: &str) -> Result<SocketAddr, Value> {
    addr.parse()
        .map_err(|e| json!({"ok": false, "errno": -1, "error": format!("bad address {addr}: {e}")}))
}

fn udp_socket_for(addr: &SocketAddr) -> std::io::Result<UdpSocket> {
    match addr {
        SocketAddr::V4(_) => UdpSocket::bind("0.0.0.0:0"),
        SocketAddr::V6(_) => UdpSocket::bind("[::]:0"),
    }
}

/// A raw sockaddr for libc calls.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

thread_local! {
    /// A TCP socket created by `hold`, connected later by `heldtcp`.
    static HELD: std::cell::Cell<i32> = const { std::cell::Cell::new(-1) };
    /// An established stream opened by `open`, written by `write`.
    static STREAM: std::cell::RefCell<Option<TcpStream>> = const { std::cell::RefCell::new(None) };
}

fn op(args: &[String]) -> Value {
    let Some((name, rest)) = args.split_first() else {
        return json!({"ok": false, "errno": -1, "error": "no operation"});
    };
    let arg = |i: usize| rest.get(i).map(String::as_str).unwrap_or("");
    match name.as_str() {
        "tcp" => {
            let addr = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    let _ = s.write_all(b"probe");
                    json!({"ok": true})
                }
                Err(e) => fail(e),
            }
        }
        "tcploop" => {
            let n: u64 = arg(0).parse().unwrap_or(0);
            let addr = match parse(arg(1)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            let (mut ok, mut eperm, mut other) = (0u64, 0u64, 0u64);
            for _ in 0..n {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => other += 1,
                }
            }
            json!({"ok": true, "attempts": n, "succeeded": ok, "eperm": eperm, "other": other})
        }
        "open" => {
            let addr = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(s) => {
                    STREAM.with(|st| *st.borrow_mut() = Some(s));
                    json!({"ok": true})
                }
                Err(e) => fail(e),
            }
        }
        "write" => STREAM.with(|st| match st.borrow_mut().as_mut() {
            None => json!({"ok": false, "errno": -1, "error": "no open stream"}),
            Some(s) => match s.write_all(arg(0).as_bytes()).and_then(|()| s.flush()) {
                Ok(()) => json!({"ok": true}),
                Err(e) => fail(e),
            },
        }),
        "race" => {
            let threads: usize = arg(0).parse().unwrap_or(1);
            let (tcp, udp) = match (parse(arg(1)), parse(arg(2))) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(v), _) | (_, Err(v)) => return v,
            };
            let millis: u64 = arg(3).parse().unwrap_or(1000);
            let deadline = std::time::Instant::now() + Duration::from_millis(millis);
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let (mut ok, mut refused) = (0u64, 0u64);
                        let udp_sock = UdpSocket::bind("0.0.0.0:0").ok();
                        let mut stream: Option<TcpStream> = None;
                        while std::time::Instant::now() < deadline {
                            if stream.is_none() {
                                match TcpStream::connect_timeout(&tcp, Duration::from_millis(200)) {
                                    Ok(s) => stream = Some(s),
                                    Err(_) => refused += 1,
                                }
                            }
                            if let Some(s) = stream.as_mut() {
                                if s.write_all(&[b'x'; 64]).is_ok() {
                                    ok += 1;
                                } else {
                                    refused += 1;
                                    stream = None;
                                }
                            }
                            match udp_sock.as_ref().map(|u| u.send_to(&[b'y'; 64], udp)) {
                                Some(Ok(_)) => ok += 1,
                                _ => refused += 1,
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        (ok, refused)
                    })
                })
                .collect();
            let (mut ok, mut refused) = (0, 0);
            for w in workers {
                if let Ok((a, b)) = w.join() {
                    ok += a;
                    refused += b;
                }
            }
            json!({"ok": true, "succeeded": ok, "refused": refused})
        }
        "hold" => {
            // SAFETY: plain socket syscall; the fd is kept for `heldtcp`.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd < 0 {
                return fail(std::io::Error::last_os_error());
            }
            HELD.with(|h| h.set(fd));
            json!({"ok": true})
        }
        "heldtcp" => {
            let addr = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            let fd = HELD.with(|h| h.replace(-1));
            if fd < 0 {
                return json!({"ok": false, "errno": -1, "error": "no held socket"});
            }
            let (ss, len) = sockaddr(&addr);
            // SAFETY: fd is ours; ss is a valid sockaddr of `len` bytes.
            let rc = unsafe { libc::connect(fd, (&raw const ss).cast(), len) };
            let result = if rc < 0 {
                fail(std::io::Error::last_os_error())
            } else {
                json!({"ok": true})
            };
            unsafe { libc::close(fd) };
            result
        }
        "udp" => {
            let addr = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            match udp_socket_for(&addr).and_then(|s| s.send_to(b"probe", addr)) {
                Ok(_) => json!({"ok": true}),
                Err(e) => fail(e),
            }
        }
        "udpconn" => {
            let (a, b) = match (parse(arg(0)), parse(arg(1))) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(v), _) | (_, Err(v)) => return v,
            };
            let sock = match udp_socket_for(&a) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let connected = sock.connect(a).and_then(|()| sock.send(b"connected"));
            let sendto = sock.send_to(b"sendto", b);
            json!({
                "ok": connected.is_ok() && sendto.is_ok(),
                "connect": connected.map(|_| json!({"ok": true})).unwrap_or_else(fail),
                "sendto": sendto.map(|_| json!({"ok": true})).unwrap_or_else(fail),
            })
        }
        "tfo" => {
            let addr = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            let family = if addr.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            };
            // SAFETY: plain socket syscalls on a fd we own and close.
            unsafe {
                let fd = libc::socket(family, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return fail(std::io::Error::last_os_error());
                }
                let (ss, len) = sockaddr(&addr);
                let msg = b"fastopen";
                let rc = libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_FASTOPEN,
                    (&raw const ss).cast(),
                    len,
                );
                let result = if rc < 0 {
                    fail(std::io::Error::last_os_error())
                } else {
                    json!({"ok": true, "sent": rc})
                };
                libc::close(fd);
                result
            }
        }
        "sendmmsg" => {
            let addrs: Vec<SocketAddr> = match rest.iter().map(|a| parse(a)).collect() {
                Ok(a) => a,
                Err(v) => return v,
            };
            let Some(first) = addrs.first() else {
                return json!({"ok": false, "errno": -1, "error": "no addresses"});
            };
            let sock = match udp_socket_for(first) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let mut names: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
                addrs.iter().map(sockaddr).collect();
            let payloads: Vec<Vec<u8>> = (0..addrs.len())
                .map(|i| format!("mmsg{i}").into_bytes())
                .collect();
            let mut iovs: Vec<libc::iovec> = payloads
                .iter()
                .map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut _,
                    iov_len: p.len(),
                })
                .collect();
            // SAFETY: every pointer refers to a live local buffer above.
            let mut msgs: Vec<libc::mmsghdr> = (0..addrs.len())
                .map(|i| {
                    let mut h: libc::mmsghdr = unsafe { zeroed() };
                    h.msg_hdr.msg_name = (&raw mut names[i].0).cast();
                    h.msg_hdr.msg_namelen = names[i].1;
                    h.msg_hdr.msg_iov = &raw mut iovs[i];
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            // SAFETY: msgs is a valid array of initialised mmsghdr.
            let rc = unsafe {
                libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0)
            };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                json!({"ok": false, "sent": 0, "errno": errno_of(&e), "error": e.to_string()})
            } else {
                // sendmmsg stops at the first failing message; ask for the
                // rest one by one to see that each is refused, not skipped.
                json!({"ok": true, "sent": rc})
            }
        }
        "raw" => {
            // SAFETY: plain socket syscall; the fd is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
            if fd < 0 {
                fail(std::io::Error::last_os_error())
            } else {
                unsafe { libc::close(fd) };
                json!({"ok": true})
            }
        }
        "rounds" => {
            let ms: u64 = arg(0).parse().unwrap_or(0);
            let addrs: Vec<SocketAddr> = match rest[1.min(rest.len())..]
                .iter()
                .map(|a| parse(a))
                .collect::<Result<_, _>>()
            {
                Ok(a) => a,
                Err(v) => return v,
            };
            let deadline = std::time::Instant::now() + Duration::from_millis(ms.min(60_000));
            let mut rounds = Vec::new();
            // Bounded in time and in count.
            while std::time::Instant::now() < deadline && rounds.len() < 200_000 {
                let round: String = addrs
                    .iter()
                    .map(
                        |a| match TcpStream::connect_timeout(a, Duration::from_secs(1)) {
                            Ok(_) => 'a',
                            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => 'a',
                            Err(e) if e.raw_os_error() == Some(libc::EPERM) => 'd',
                            Err(_) => 'o',
                        },
                    )
                    .collect();
                rounds.push(round);
            }
            json!({"ok": true, "rounds": rounds})
        }
        "threads" => {
            let n: usize = arg(0).parse().unwrap_or(0).min(64);
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..n {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let _ = tx.send(unsafe { libc::gettid() });
                    loop {
                        std::thread::park();
                    }
                });
            }
            let tids: Vec<i32> = (0..n)
                .filter_map(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
                .collect();
            json!({"ok": true, "tids": tids})
        }
        "cgroup" => {
            let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            let path = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("")
                .to_owned();
            json!({"ok": true, "cgroup": path})
        }
        "id" => {
            // SAFETY: getters without preconditions.
            let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
            json!({"ok": true, "uid": uid, "gid": gid})
        }
        "escape" => {
            let target = format!("{}/cgroup.procs", arg(0));
            match std::fs::write(&target, std::process::id().to_string()) {
                Ok(()) => json!({"ok": true}),
                Err(e) => fail(e),
            }
        }
        "child" => {
            let exe = std::env::current_exe().expect("own path");
            match std::process::Command::new(exe)
                .arg("once")
                .args(rest)
                .output()
            {
                Ok(out) => {
                    let line = String::from_utf8_lossy(&out.stdout);
                    let mut v: Value = serde_json::from_str(line.trim()).unwrap_or_else(
                        |_| json!({"ok": false, "errno": -1, "error": "child printed no JSON"}),
                    );
                    v["child_pid"] = json!(std::process::id());
                    v
                }
                Err(e) => fail(e),
            }
        }
        "dns" => {
            let server = match parse(arg(0)) {
                Ok(a) => a,
                Err(v) => return v,
            };
            agentd_tests::dns::query(server, arg(1), arg(2), arg(3))
        }
        "resolve" => match getaddrinfo(arg(0)) {
            Ok(addrs) => json!({"ok": true, "addrs": addrs}),
            Err(e) => json!({"ok": false, "errno": -1, "error": e}),
        },
        "resolve-tcp" => {
            let addrs = match getaddrinfo(arg(0)) {
                Ok(a) => a,
                Err(e) => return json!({"ok": false, "errno": -1, "error": e}),
            };
            let port: u16 = arg(1).parse().unwrap_or(0);
            let Some(ip) = addrs
                .first()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            else {
                return json!({"ok": false, "errno": -1, "error": "no address"});
            };
            let addr = SocketAddr::new(ip, port);
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(mut s) => {
                    let _ = s.write_all(b"probe");
                    json!({"ok": true, "addr": addr.to_string()})
                }
                Err(e) => {
                    let mut v = fail(e);
                    v["addr"] = json!(addr.to_string());
                    v
                }
            }
        }
        "ns" => match private_resolver_files(arg(0), arg(1)) {
            Ok(()) => op(&rest[2..]),
            Err(e) => fail(e),
        },
        other => json!({"ok": false, "errno": -1, "error": format!("unknown operation {other}")}),
    }
}

/// glibc's getaddrinfo, through std (the path every program's name lookups
/// take): the addresses, or the resolver's error.
fn getaddrinfo(name: &str) -> Result<Vec<String>, String> {
    use std::net::ToSocketAddrs as _;
    (name, 0u16)
        .to_socket_addrs()
        .map(|it| it.map(|a| a.ip().to_string()).collect())
        .map_err(|e| e.to_string())
}

/// A private mount namespace where /etc/resolv.conf and /etc/nsswitch.conf
/// are the test's files: the machine's own resolver is never asked.
fn private_resolver_files(resolv: &str, nsswitch: &str) -> std::io::Result<()> {
    use std::ffi::CString;
    let check = |rc: i32| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let c = |s: &str| CString::new(s).map_err(std::io::Error::other);
    // SAFETY: plain syscalls with valid NUL-terminated strings.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c("/")?.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        for (file, target) in [
            (resolv, "/etc/resolv.conf"),
            (nsswitch, "/etc/nsswitch.conf"),
        ] {
            check(libc::mount(
                c(file)?.as_ptr(),
                c(target)?.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))?;
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdout = std::io::stdout();
    match args.first().map(String::as_str) {
        Some("once") => {
            let v = op(&args[1..]);
            println!("{v}");
        }
        Some("serve") => {
            let stdin = std::io::stdin();
            println!("{}", json!({"ok": true, "ready": std::process::id()}));
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                if words.is_empty() {
                    continue;
                }
                let v = op(&words);
                let mut out = stdout.lock();
                let _ = writeln!(out, "{v}");
                let _ = out.flush();
            }
        }
        _ => {
            eprintln!("usage: agentd-probe once OP ARGS... | agentd-probe serve");
            std::process::exit(2);
        }
    }
}
