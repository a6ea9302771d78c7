//! The kill switch: one command cuts every path an agent has, its processes
//! keep running, and the switch stays pulled until someone restores it.
use agentd_tests::*;

fn two_agents(env: &TestEnv, tcp: u16, udp: u16) {
    env.write_config(&format!(
        r#"[[agent]]
name = "rogue"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{tcp}], protocol = "tcp" }}, {{ cidr = "127.0.0.1/32", ports = [{udp}], protocol = "udp" }} ]

[[agent]]
name = "bystander"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{tcp}], protocol = "tcp" }} ]
"#
    ));
}

#[test]
fn kill_cuts_new_and_established_traffic_and_keeps_the_process() {
    if !require_root("kill_cuts_new_and_established_traffic_and_keeps_the_process") {
        return;
    }
    let server = TcpSink::bind("127.0.0.1:0");
    let udp = UdpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("kill_cuts");
    two_agents(&env, server.port(), udp.port());
    env.start_daemon();

    let mut agent = ProbeProcess::spawn();
    agent.join(&env.agent_cgroup("rogue"));
    assert_ok(&agent.op(&format!("open {}", server.addr)));
    let mut conn = server.accept_one(QUIET * 10).expect("stream accepted");
    assert_ok(&agent.op("write before"));
    assert_eq!(read_for(&mut conn, QUIET), b"before");
    assert_ok(&agent.op(&format!("udp {}", udp.addr)));
    assert_eq!(udp.received(QUIET).len(), 1);

    let out = env.agentd(&["kill", "rogue", "--reason", "INC-4411 exfil attempt"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("KILLED"), "{text}");

    // The established stream was reset by the time `kill` returned: the
    // server sees the reset (not silence, not a clean end) and nothing more.
    // One read, no waiting for it to arrive: it is already there.
    let (data, end) = read_until_end(&mut conn, std::time::Duration::from_millis(1));
    assert!(data.is_empty(), "data crossed a killed agent's stream");
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    // The agent's own calls on it fail.
    assert_eq!(agent.op("write after")["ok"], false);
    // New connects and sends fail, whatever the allowlist says.
    assert_eperm(&agent.op(&format!("tcp {}", server.addr)));
    assert_eperm(&agent.op(&format!("udp {}", udp.addr)));
    assert!(server.accepted(QUIET).is_empty());
    assert!(udp.received(QUIET).is_empty());
    // The process is alive and answering: not frozen, not killed.
    assert!(alive(agent.pid));
    assert_ok(&agent.op("id"));

    // Other agents are untouched.
    let mut other = ProbeProcess::spawn();
    other.join(&env.agent_cgroup("bystander"));
    assert_ok(&other.op(&format!("tcp {}", server.addr)));
    assert_eq!(server.accepted(QUIET).len(), 1);

    // list and the audit log say who, when and why.
    let list: serde_json::Value =
        serde_json::from_slice(&env.agentd(&["list", "--json"]).stdout).unwrap();
    let rogue = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "rogue")
        .unwrap();
    assert_eq!(rogue["killed"], true);
    assert_eq!(rogue["kill"]["reason"], "INC-4411 exfil attempt");
    assert_eq!(rogue["kill"]["by_uid"], 0);
    let rec = env.wait_audit("kill event", |r| r["event"] == "kill");
    assert_eq!(rec["agent"], "rogue");
    assert_eq!(rec["reason"], "INC-4411 exfil attempt");
    assert!(rec["by_pid"].as_u64().unwrap() > 0);
    assert!(rec["flip_us"].as_f64().unwrap() > 0.0);

    // Killing again is not an error, and says so.
    let out = env.agentd(&["kill", "rogue", "--reason", "again"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already killed"));
}

#[test]
fn kill_needs_a_reason_and_a_known_agent() {
    if !require_root("kill_needs_a_reason_and_a_known_agent") {
        return;
    }
    let mut env = TestEnv::new("kill_refusals");
    two_agents(&env, 9, 9);
    env.start_daemon();
    let out = env.agentd(&["kill", "rogue"]);
    assert!(!out.status.success(), "kill without --reason accepted");
    let out = env.agentd(&["kill", "rogue", "--reason", "  "]);
    assert!(!out.status.success(), "blank reason accepted");
    let out = env.agentd(&["kill", "nobody-here", "--reason", "x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown agent"),
        "{out:?}"
    );
    let list: serde_json::Value =
        serde_json::from_slice(&env.agentd(&["list", "--json"]).stdout).unwrap();
    assert!(
        list["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["killed"] == false)
    );
}

#[test]
fn kill_survives_kill9_and_restart_until_restored() {
    if !require_root("kill_survives_kill9_and_restart_until_restored") {
        return;
    }
    let server = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("kill_durable");
    two_agents(&env, server.port(), 9);
    env.start_daemon();
    let mut agent = ProbeProcess::spawn();
    agent.join(&env.agent_cgroup("rogue"));
    assert!(
        env.agentd(&["kill", "--all", "--reason", "drill"])
            .status
            .success()
    );

    env.kill9_daemon();
    assert_eperm(&agent.op(&format!("tcp {}", server.addr)));
    env.start_daemon();
    assert_eperm(&agent.op(&format!("tcp {}", server.addr)));

    // Even with the pinned kernel state gone (a reboot), the state file
    // brings the kill back before any agent process can connect.
    env.stop_daemon();
    drop(agent);
    let out = env.agentd(&["teardown", "--config", env.config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    env.start_daemon();
    let mut agent = ProbeProcess::spawn();
    agent.join(&env.agent_cgroup("rogue"));
    assert_eperm(&agent.op(&format!("tcp {}", server.addr)));
    assert!(server.accepted(QUIET).is_empty());

    let out = env.agentd(&["restore", "rogue", "--reason", "INC-4411 closed"]);
    assert!(out.status.success(), "{out:?}");
    assert_ok(&agent.op(&format!("tcp {}", server.addr)));
    assert_eq!(server.accepted(QUIET).len(), 1);
    let rec = env.wait_audit("restore event", |r| r["event"] == "restore");
    assert_eq!(rec["reason"], "INC-4411 closed");
    // The other agent was killed by --all and is still killed.
    let list: serde_json::Value =
        serde_json::from_slice(&env.agentd(&["list", "--json"]).stdout).unwrap();
    let by = |n: &str| {
        list["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == n)
            .cloned()
            .unwrap()
    };
    assert_eq!(by("rogue")["killed"], false);
    assert_eq!(by("bystander")["killed"], true);
}

#[test]
fn kill_aborts_smuggled_socket() {
    if !require_root("kill_aborts_smuggled_socket") {
        return;
    }
    let server = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("kill_smuggled");
    two_agents(&env, 9, 9);
    env.start_daemon();
    // Opened outside every agent (no hook ever sees it), then carried in.
    let mut agent = ProbeProcess::spawn();
    assert_ok(&agent.op(&format!("open {}", server.addr)));
    let mut conn = server.accept_one(QUIET * 10).expect("accepted");
    agent.join(&env.agent_cgroup("rogue"));
    assert_ok(&agent.op("write smuggled"));
    assert_eq!(
        read_for(&mut conn, QUIET),
        b"smuggled",
        "the socket works before the kill"
    );

    let out = env.agentd(&["kill", "rogue", "--reason", "smuggled socket", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        reply["outcomes"][0]["sockets"]["via_fd"].as_u64().unwrap() >= 1,
        "{reply}"
    );
    let (_, end) = read_until_end(&mut conn, QUIET);
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    assert_eq!(agent.op("write more")["ok"], false);
    assert!(alive(agent.pid));
}

/// Counts every byte that reaches a TCP or UDP server, from server threads.
struct Servers {
    tcp: TcpSink,
    udp: std::sync::Arc<std::net::UdpSocket>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Servers {
    fn start() -> (Self, Vec<std::thread::JoinHandle<()>>) {
        use std::sync::{Arc, atomic::*};
        let tcp = TcpSink::bind("127.0.0.1:0");
        let udp = Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        udp.set_read_timeout(Some(std::time::Duration::from_millis(20)))
            .unwrap();
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        {
            let (udp, bytes, stop) = (udp.clone(), bytes.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = udp.recv(&mut buf) {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }));
        }
        (
            Self {
                tcp,
                udp,
                bytes,
                stop,
            },
            handles,
        )
    }

    /// Accepts `expected` connections (bounded in time) and reads each on
    /// its own thread.
    fn serve_tcp(&self, expected: usize, handles: &mut Vec<std::thread::JoinHandle<()>>) {
        use std::sync::atomic::Ordering;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut accepted = 0;
        while accepted < expected && std::time::Instant::now() < deadline {
            let Some(mut conn) = self.tcp.accept_one(std::time::Duration::from_millis(50)) else {
                continue;
            };
            accepted += 1;
            let (bytes, stop) = (self.bytes.clone(), self.stop.clone());
            handles.push(std::thread::spawn(move || {
                use std::io::Read as _;
                conn.set_read_timeout(Some(std::time::Duration::from_millis(20)))
                    .ok();
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match conn.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => break,
                    }
                }
            }));
        }
    }
}

#[test]
fn race_32_threads_nothing_crosses_after_kill_returns() {
    if !require_root("race_32_threads_nothing_crosses_after_kill_returns") {
        return;
    }
    use std::sync::atomic::Ordering;
    let (servers, mut handles) = Servers::start();
    let mut env = TestEnv::new("kill_race");
    two_agents(
        &env,
        servers.tcp.port(),
        servers.udp.local_addr().unwrap().port(),
    );
    env.start_daemon();
    let mut agent = ProbeProcess::spawn();
    agent.join(&env.agent_cgroup("rogue"));
    let pid = agent.pid;
    let op = format!(
        "race 32 {} {} 3000",
        servers.tcp.addr,
        servers.udp.local_addr().unwrap()
    );
    let racer = std::thread::spawn(move || {
        let v = agent.op(&op);
        (agent, v)
    });
    // Accept the 32 streams while they write.
    servers.serve_tcp(32, &mut handles);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        servers.bytes.load(Ordering::Relaxed) > 0,
        "no traffic before the kill"
    );

    let out = env.agentd(&["kill", "rogue", "--reason", "race"]);
    assert!(out.status.success(), "{out:?}");
    // What was queued before the switch is read within a moment...
    std::thread::sleep(std::time::Duration::from_millis(100));
    let at_kill = servers.bytes.load(Ordering::Relaxed);
    // ...and nothing more arrives while the 32 threads keep trying.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let later = servers.bytes.load(Ordering::Relaxed);
    assert_eq!(
        later,
        at_kill,
        "{} bytes crossed after kill returned",
        later - at_kill
    );

    let (_agent, v) = racer.join().unwrap();
    assert!(v["refused"].as_u64().unwrap() > 0, "{v}");
    assert!(alive(pid));
    servers.stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
}

#[test]
fn exec_into_a_killed_agent_warns_and_is_cut_off() {
    if !require_root("exec_into_a_killed_agent_warns_and_is_cut_off") {
        return;
    }
    let server = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("kill_exec");
    two_agents(&env, server.port(), 9);
    env.start_daemon();
    assert!(
        env.agentd(&["kill", "rogue", "--reason", "x"])
            .status
            .success()
    );
    let out = env.agentd(&[
        "exec",
        "--agent",
        "rogue",
        "--",
        probe_bin(),
        "once",
        "tcp",
        &server.addr.to_string(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KILLED"),
        "{out:?}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eperm(&v);
    assert!(server.accepted(QUIET).is_empty());
}
