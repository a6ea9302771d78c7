//! `cargo xtask bench kill`: how fast the kill switch takes an agent holding
//! 10 000 established loopback TCP connections off the network.
//!
//! The agent process opens the connections, then runs a connect loop; the
//! benchmark pulls the switch and restores it 20 times and reports p50/p99
//! of (a) request -> kernel flag flipped, (b) request -> first refused
//! connect seen by the agent, (c) request -> last socket aborted, and the
//! CLI round trip. (a) and (c) are timed by the daemon from the moment it
//! read the request; (b) compares the agent's CLOCK_MONOTONIC stamp of its
//! first EPERM with the daemon's stamp of the request.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agentd_tests::TestEnv;

const CONNECTIONS: usize = 10_000;
const ITERATIONS: usize = 20;

fn mono_ns() -> u64 {
    // SAFETY: clock_gettime writes a timespec we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn raise_nofile() {
    let lim = libc::rlimit {
        rlim_cur: 65_536,
        rlim_max: 65_536,
    };
    // SAFETY: plain setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// The agent: on "open", opens CONNECTIONS streams to `hold`; then runs a
/// connect loop against `probe` (refused by the peer until the kill, by
/// agentd after it) and, on "report", prints the CLOCK_MONOTONIC
/// time of its first refused connect since the last "open".
pub fn agent(hold: &str, probe: &str) {
    raise_nofile();
    let hold: SocketAddr = hold.parse().unwrap();
    let probe: SocketAddr = probe.parse().unwrap();
    let first_refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let armed = Arc::new(AtomicBool::new(false));
    {
        let (first, armed) = (first_refused.clone(), armed.clone());
        std::thread::spawn(move || {
            loop {
                if !armed.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                match TcpStream::connect(probe) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        let _ = first.compare_exchange(
                            0,
                            mono_ns(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    Err(_) => {}
                }
            }
        });
    }
    let mut held: Vec<TcpStream> = Vec::new();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "open" => {
                armed.store(false, Ordering::Relaxed);
                held.clear();
                let mut failed = 0;
                for _ in 0..CONNECTIONS {
                    match TcpStream::connect(hold) {
                        Ok(s) => held.push(s),
                        Err(_) => failed += 1,
                    }
                }
                first_refused.store(0, Ordering::Relaxed);
                armed.store(true, Ordering::Relaxed);
                println!("{} {failed}", held.len());
            }
            "report" => {
                // Give the loop a moment to observe the refusal.
                let deadline = Instant::now() + Duration::from_secs(2);
                while first_refused.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
                armed.store(false, Ordering::Relaxed);
                println!("{}", first_refused.load(Ordering::Relaxed));
            }
            _ => println!("?"),
        }
        let _ = std::io::stdout().flush();
    }
}

/// A loopback TCP socket bound to a free port but not listening (kept open
/// so no one else takes the port), and its address.
fn bound_not_listening() -> (std::os::fd::OwnedFd, SocketAddr) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: plain socket calls on a descriptor we own; the address
    // structs are valid for the lengths passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_in = std::mem::zeroed();
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len), 0);
        let mut got = len;
        libc::getsockname(fd.as_raw_fd(), (&raw mut sa).cast(), &mut got);
        let port = u16::from_be(sa.sin_port);
        (fd, SocketAddr::from(([127, 0, 0, 1], port)))
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

pub fn run() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the benchmark loads BPF: run as root"
    );
    raise_nofile();
    let hold = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: resizing the backlog of our own listener.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&hold), 65_535) };
    // The connect loop aims at an allowed port that is bound but not
    // listening: before the kill each attempt is refused by the peer at
    // once (ECONNREFUSED), after it by agentd (EPERM). A listener there
    // would let the loop block in connect once its backlog filled, and (b)
    // would time the backlog instead of the switch.
    let (_probe, probe_addr) = bound_not_listening();
    let hold_addr = hold.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Acceptors keep the server ends open (the held ones) or drop them.
    let keep = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Blocking accept: an acceptor that naps lets the backlog
            // overflow and a dropped SYN costs a 1 s retransmit.
            let mut kept = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = hold.accept() {
                    kept.push(s);
                }
                // The previous iteration's connections were reset by the
                // kill: let them go.
                if kept.len() > CONNECTIONS + CONNECTIONS / 2 {
                    kept.drain(..kept.len() - CONNECTIONS);
                }
            }
        })
    };

    let mut env = TestEnv::new("bench_kill");
    env.write_config(&format!(
        "[[agent]]\nname = \"target\"\nowner = \"bench\"\nallow = [ {{ cidr = \"127.0.0.1/32\", ports = [{}, {}], protocol = \"tcp\" }} ]\n",
        hold_addr.port(),
        probe_addr.port()
    ));
    env.start_daemon();
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill-agent",
            &hold_addr.to_string(),
            &probe_addr.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(
        env.agent_cgroup("target").join("cgroup.procs"),
        agent.id().to_string(),
    )
    .unwrap();
    let mut to_agent = agent.stdin.take().unwrap();
    let mut from_agent = BufReader::new(agent.stdout.take().unwrap());
    let mut ask = |cmd: &str| {
        writeln!(to_agent, "{cmd}").unwrap();
        let mut line = String::new();
        from_agent.read_line(&mut line).unwrap();
        line.trim().to_owned()
    };

    let (mut flip, mut refused, mut last_abort, mut cli, mut aborted) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let iterations: usize = std::env::var("AGENTD_BENCH_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ITERATIONS);
    for i in 0..iterations {
        let t = Instant::now();
        let opened = ask("open");
        let t_open = t.elapsed();
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let out = env.agentd(&["kill", "target", "--reason", "bench", "--json"]);
        let t_kill = t.elapsed();
        assert!(out.status.success(), "{out:?}");
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let o = &reply["outcomes"][0];
        let t = Instant::now();
        let first: u64 = ask("report").parse().unwrap_or(0);
        let t_report = t.elapsed();
        let received = o["received_mono_ns"].as_u64().unwrap();
        flip.push(o["flip_us"].as_f64().unwrap());
        last_abort.push(o["sockets"]["last_abort_us"].as_f64().unwrap());
        cli.push(reply["round_trip_us"].as_f64().unwrap());
        aborted.push(o["sockets"]["aborted"].as_f64().unwrap());
        if first > 0 {
            refused.push(first.saturating_sub(received) as f64 / 1e3);
        }
        let t = Instant::now();
        let out = env.agentd(&["restore", "target", "--reason", "bench"]);
        assert!(out.status.success(), "{out:?}");
        eprintln!(
            "bench kill: iteration {}/{iterations}: opened {opened} in {t_open:?}, kill {t_kill:?}, report {t_report:?}, restore {:?}, aborted {} (dump {:.0} µs, destroy {:.0} µs)",
            i + 1,
            t.elapsed(),
            o["sockets"]["aborted"],
            o["sockets"]["dump_us"].as_f64().unwrap_or(0.0),
            o["sockets"]["destroy_us"].as_f64().unwrap_or(0.0),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = agent.kill();
    let _ = agent.wait();
    // Wake the blocking acceptors.
    let _ = TcpStream::connect(hold_addr);
    let _ = keep.join();

    println!(
        "kill switch, agent holding {CONNECTIONS} established loopback TCP connections plus a connect loop; {ITERATIONS} kill/restore cycles"
    );
    println!("{:<44} {:>10} {:>10}", "measure (µs)", "p50", "p99");
    for (name, v) in [
        ("(a) request -> kernel state flipped", &mut flip),
        ("(b) request -> first refused connect (agent)", &mut refused),
        ("(c) request -> last socket aborted", &mut last_abort),
        ("CLI round trip", &mut cli),
    ] {
        if v.is_empty() {
            println!("{name:<44} {:>10} {:>10}", "n/a", "n/a");
            continue;
        }
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        println!("{name:<44} {p50:>10.0} {p99:>10.0}");
    }
    println!(
        "sockets aborted per kill: p50 {:.0}",
        percentile(&mut aborted, 0.5)
    );
    drop(env);
}
