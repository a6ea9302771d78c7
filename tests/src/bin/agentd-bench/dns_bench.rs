//! `cargo xtask bench dns`: what agentd's resolver adds to a DNS query.
//!
//! Two variants side by side, against the same upstream (the tests' own
//! loopback DNS server): (a) a process in a plain cgroup asking the
//! upstream directly, (b) an agent with hostname rules asking the address
//! in its resolv.conf, steered by the kernel to agentd, which judges the
//! name, asks the upstream, writes the answer's address to the agent's map,
//! logs the query and answers. Each query is what glibc does per lookup: a
//! fresh UDP socket, connect, send, receive. Rounds alternate, with a
//! rotating order; p50 and p99 over all queries of each variant.
use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant},
};

use agentd_tests::{TestEnv, dns::DnsServer};

const ROUNDS: usize = 20;
const QUERIES_PER_ROUND: usize = 500;
/// Where the agent believes its DNS server is; nothing listens there.
const STUB: &str = "127.0.0.153:53";

pub fn run() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the benchmark loads BPF: run as root"
    );
    let upstream = DnsServer::start("127.0.0.1", &[("crm.bench.test", 300, "127.0.0.20")]);
    let mut env = TestEnv::new("bench_dns");
    env.write_config(&format!(
        "[dns]\nupstream = [\"{}\"]\n\n[[agent]]\nname = \"dns\"\nowner = \"bench\"\n\
         allow = [ {{ host = \"*.bench.test\", ports = [443], protocol = \"tcp\" }} ]\n",
        upstream.addr
    ));
    env.start_daemon();
    let plain_guard = super::plain_cgroup(&env);
    let plain = plain_guard.0.clone();

    let direct = upstream.addr.to_string();
    let variants = [
        ("direct to upstream", plain.as_path(), direct.as_str()),
        ("agent, through agentd", &env.agent_cgroup("dns"), STUB),
    ];
    // Warm-up: one short round each.
    for (_, cg, server) in &variants {
        round(cg, server, 50);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..ROUNDS {
        for k in 0..variants.len() {
            let i = (r + k) % variants.len();
            let (_, cg, server) = variants[i];
            samples[i].extend(round(cg, server, QUERIES_PER_ROUND));
        }
        eprintln!("bench: dns: round {}/{ROUNDS}", r + 1);
    }
    let dns_lines = env
        .audit()
        .iter()
        .filter(|v| v["event"] == "dns" && v["verdict"] == "allow")
        .count();
    drop(env);

    println!(
        "A query for an allowed name, fresh connected UDP socket per query (as glibc), \
         {ROUNDS} interleaved rounds of {QUERIES_PER_ROUND} per variant"
    );
    println!(
        "{:<24} {:>10} {:>10} {:>10}",
        "variant", "p50 µs", "p99 µs", "queries"
    );
    let mut p = Vec::new();
    for ((name, _, _), s) in variants.iter().zip(samples.iter_mut()) {
        s.sort_by(f64::total_cmp);
        let (p50, p99) = (pct(s, 0.50), pct(s, 0.99));
        println!("{name:<24} {p50:>10.1} {p99:>10.1} {:>10}", s.len());
        p.push((p50, p99));
    }
    println!(
        "added by agentd: p50 +{:.1} µs (target +300), p99 +{:.1} µs (target +5000); \
         queries on the audit log: {dns_lines}",
        p[1].0 - p[0].0,
        p[1].1 - p[0].1
    );
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// `count` queries from a worker process inside `cgroup`; µs each.
fn round(cgroup: &Path, server: &str, count: usize) -> Vec<f64> {
    super::worker_in(cgroup, &["dns-worker", server, &count.to_string()])
        .split_whitespace()
        .map(|t| t.parse().expect("µs"))
        .collect()
}

/// The worker: `count` queries to `server`, each timed; one line of µs.
pub fn worker(server: &str, count: usize) {
    let server: SocketAddr = server.parse().expect("server");
    let query = agentd_tests::dns::query_bytes("crm.bench.test", "A");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("go");
    let mut out = Vec::with_capacity(count);
    let mut buf = [0u8; 1500];
    for _ in 0..count {
        let start = Instant::now();
        let sock = UdpSocket::bind("0.0.0.0:0").expect("socket");
        sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
        sock.connect(server).expect("connect");
        sock.send(&query).expect("send");
        let (n, _) = sock.recv_from(&mut buf).expect("reply within 5 s");
        assert!(n > 12, "short reply");
        out.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let text: Vec<String> = out.iter().map(|u| format!("{u:.2}")).collect();
    println!("{}", text.join(" "));
}
