//! `cargo xtask bench connect`: the cost agentd adds to connect().
//!
//! One run, three variants side by side: a process in a plain cgroup with no
//! programs, an agent with 10 rules, an agent with 100 000 rules. Each
//! variant is a worker process moved into its cgroup that runs a
//! connect+close loop against a loopback listener outside every agent.
//! Rounds are interleaved (A B C A B C ...) so drift hits all variants alike;
//! the median round per variant is reported with its ratio to uncontained.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agentd_tests::TestEnv;

mod dns_bench;
mod kill_bench;

const ROUNDS: usize = 15;
const CONNECTS_PER_ROUND: u32 = 10_000;
const BIG_RULES: u32 = 100_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("connect") => connect_bench(),
        Some("worker") => worker(&args[1], args[2].parse().expect("count")),
        Some("kill") => kill_bench::run(),
        Some("kill-agent") => kill_bench::agent(&args[1], &args[2]),
        Some("dns") => dns_bench::run(),
        Some("dns-worker") => dns_bench::worker(&args[1], args[2].parse().expect("count")),
        _ => {
            eprintln!("usage: agentd-bench connect");
            std::process::exit(2);
        }
    }
}

/// Runs `count` connect+close to `addr` once told to go; prints ns/connect.
fn worker(addr: &str, count: u32) {
    let addr: SocketAddr = addr.parse().expect("addr");
    pin_to_cpu(0);
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("go");
    let start = Instant::now();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    for _ in 0..count {
        let s = TcpStream::connect(addr).expect("connect in benchmark");
        // Close with RST: no TIME_WAIT pile-up, so every round finds free
        // ephemeral ports and rounds stay comparable.
        // SAFETY: valid fd and a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as u32,
            );
        }
        drop(s);
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(count);
    println!("{ns}");
}

/// Pins the calling thread: the worker and the acceptor each get a CPU of
/// their own, so scheduling noise does not swamp a sub-microsecond hook.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % num_cpus(), &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One worker round inside `cgroup`.
fn round(cgroup: &Path, addr: SocketAddr) -> f64 {
    worker_in(
        cgroup,
        &["worker", &addr.to_string(), &CONNECTS_PER_ROUND.to_string()],
    )
    .trim()
    .parse()
    .expect("ns per connect")
}

/// Runs this binary with `args` as a worker inside `cgroup` (joined before
/// it creates any socket), tells it to go, and returns its one output line.
fn worker_in(cgroup: &Path, args: &[&str]) -> String {
    let mut child = Command::new(std::env::current_exe().expect("self"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    // Join the cgroup before the worker creates any socket.
    fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).expect("join cgroup");
    writeln!(child.stdin.as_mut().unwrap(), "go").expect("go");
    let mut out = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut out)
        .expect("result");
    let status = child.wait().expect("wait");
    assert!(
        status.success(),
        "worker {args:?} failed in {}",
        cgroup.display()
    );
    out
}

/// Mean run time of the connect4 program per call while each agent's worker
/// runs, from the kernel's own accounting (`BPF_ENABLE_STATS`).
fn hook_cost(env: &TestEnv, agents: &[(&str, PathBuf)], addr: SocketAddr) -> Vec<f64> {
    use aya::programs::links::{FdLink, PinnedLink};
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable BPF stats");
    let pin = env
        .bpffs_dir
        .join("links")
        .join("ten-rules")
        .join("agentd_connect4");
    let link: FdLink = PinnedLink::from_pin(&pin)
        .expect("pinned connect4 link")
        .into();
    let prog_id = link.info().expect("link info").program_id();
    let sample = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .map(|p| (p.run_time().as_nanos() as f64, p.run_count() as f64))
            .expect("connect4 program loaded")
    };
    agents
        .iter()
        .map(|(_, cg)| {
            let (t0, n0) = sample();
            for _ in 0..ROUNDS {
                round(cg, addr);
            }
            let (t1, n1) = sample();
            (t1 - t0) / (n1 - n0).max(1.0)
        })
        .collect()
}

/// Median ns/connect per variant over interleaved rounds.
fn measure(variants: &[(&str, PathBuf)], addr: SocketAddr, phase: &str) -> Vec<f64> {
    // Warm up caches and the listener once per variant.
    for (_, cg) in variants {
        round(cg, addr);
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..ROUNDS {
        // Rotate the order each round so no variant always runs first.
        for k in 0..variants.len() {
            let i = (r + k) % variants.len();
            results[i].push(round(&variants[i].1, addr));
        }
        eprintln!("bench: {phase}: round {}/{ROUNDS}", r + 1);
    }
    results.iter_mut().map(|r| median(r)).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `count` distinct rules that never match loopback, spread over IPv4 and
/// IPv6, several prefix lengths and port sets, so the tries are large and deep.
fn filler_rules(count: u32) -> String {
    let mut out = String::with_capacity(count as usize * 64);
    for i in 0..count {
        let rule = match i % 4 {
            0 => format!(
                "  {{ cidr = \"10.{}.{}.0/24\", ports = [443], protocol = \"tcp\" }},\n",
                (i >> 16) & 0xff,
                (i >> 8) & 0xff
            ),
            1 => format!(
                "  {{ cidr = \"172.16.{}.{}/32\", ports = [443, \"8000-8100\"] }},\n",
                (i >> 8) & 0xff,
                i & 0xff
            ),
            2 => format!(
                "  {{ cidr = \"2001:db8:{:x}:{:x}::/64\", ports = [443] }},\n",
                i >> 16,
                i & 0xffff
            ),
            _ => format!(
                "  {{ cidr = \"192.168.{}.{}/32\", ports = [{}], protocol = \"udp\" }},\n",
                (i >> 8) & 0xff,
                i & 0xff,
                1 + i % 60000
            ),
        };
        out.push_str(&rule);
    }
    out
}

fn connect_bench() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the benchmark loads BPF: run as root"
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let addr = listener.local_addr().unwrap();
    // A deep backlog: if it overflowed, a dropped SYN would cost a 1 s
    // retransmit and swamp the figure being measured.
    // SAFETY: listen() again on a listening socket only resizes its backlog.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 65_535) };
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            pin_to_cpu(1);
            listener.set_nonblocking(false).unwrap();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = listener.accept() {
                    drop(s);
                }
            }
        })
    };

    let mut env = TestEnv::new("bench_connect");
    let target = format!(
        "  {{ cidr = \"127.0.0.1/32\", ports = [{}], protocol = \"tcp\" }},\n",
        addr.port()
    );
    eprintln!("bench: writing a config with {} rules", BIG_RULES + 10);
    env.write_config(&format!(
        "[[agent]]\nname = \"ten-rules\"\nowner = \"bench\"\nallow = [\n{}{target}]\n\n\
         [[agent]]\nname = \"hundred-k-rules\"\nowner = \"bench\"\nallow = [\n{}{target}]\n",
        filler_rules(9),
        filler_rules(BIG_RULES - 1)
    ));
    let started = Instant::now();
    env.start_daemon();
    let setup = started.elapsed();

    // The uncontained variant: a cgroup at the same depth with no programs.
    let plain_guard = plain_cgroup(&env);
    let plain = plain_guard.0.clone();

    let variants: [(&str, PathBuf); 3] = [
        ("uncontained", plain.clone()),
        ("agent, 10 rules", env.agent_cgroup("ten-rules")),
        ("agent, 100 000 rules", env.agent_cgroup("hundred-k-rules")),
    ];
    // Phase 1: the whole system, daemon reading and logging every decision.
    let with_daemon = measure(&variants, addr, "daemon running");
    let list = env.agentd(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or_default();
    // Phase 2: the kernel path alone. The daemon is killed; enforcement
    // stays pinned, events fill the ring buffer and are then counted as lost.
    env.kill9_daemon();
    let kernel_only = measure(&variants, addr, "daemon stopped");
    // Phase 3: the hook itself, timed by the kernel (BPF run-time stats),
    // one agent at a time so the shared program's figures are that agent's.
    let hook = hook_cost(&env, &variants[1..], addr);
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(addr);
    let _ = acceptor.join();

    println!(
        "connect+close (RST) to a loopback listener; {CONNECTS_PER_ROUND} connects per round, \
         {ROUNDS} interleaved rounds per variant; median round"
    );
    println!(
        "{:<24} {:>14} {:>8} {:>14} {:>8}",
        "variant", "daemon ns/op", "ratio", "kernel ns/op", "ratio"
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        println!(
            "{name:<24} {:>14.0} {:>8.3} {:>14.0} {:>8.3}",
            with_daemon[i],
            with_daemon[i] / with_daemon[0],
            kernel_only[i],
            kernel_only[i] / kernel_only[0]
        );
    }
    for ((name, _), ns) in variants[1..].iter().zip(&hook) {
        println!("connect4 hook run time, {name}: {ns:.0} ns per call (kernel BPF stats)");
    }
    println!(
        "daemon setup with {} rules: {:.0} ms; audit events lost while the daemon ran: {}",
        BIG_RULES + 10,
        setup.as_secs_f64() * 1e3,
        listed["events_lost"]
    );
    drop(env);
}

/// A cgroup beside the test's agents with no programs attached (the
/// uncontained variant), removed on drop.
fn plain_cgroup(env: &TestEnv) -> RemoveOnDrop {
    let plain = TestEnv::cgroup_mount().join(format!("{}-plain", env.cgroup_root));
    fs::create_dir_all(&plain).expect("plain cgroup");
    RemoveOnDrop(plain)
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
        std::thread::sleep(Duration::from_millis(1));
    }
}
