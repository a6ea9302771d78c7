//! `agentd status` and `agentd events` after known traffic, and `events
//! --follow` seeing a decision as it happens.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use agentd_tests::*;
use serde_json::Value;

fn counts(v: &[Value]) -> u64 {
    v.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum()
}

#[test]
fn status_and_events_tell_what_happened() {
    if !require_root("status_and_events_tell_what_happened") {
        return;
    }
    let sink = TcpSink::bind("127.0.0.1:0");
    let denied_sink = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("status_and_events");
    env.write_config(&format!(
        r#"[[agent]]
name = "crm"
owner = "crm-team@example.com"
description = "CRM hygiene bot"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        sink.port()
    ));
    env.start_daemon();
    let mut probe = ProbeProcess::exec(&env, "crm");
    assert_ok(&probe.op(&format!("tcp 127.0.0.1:{}", sink.port())));
    let denied = format!("tcp 127.0.0.1:{}", denied_sink.port());
    for _ in 0..3 {
        assert_eperm(&probe.op(&denied));
    }
    assert!(
        denied_sink.accepted(QUIET).is_empty(),
        "a denied connect got through"
    );
    env.wait_audit("for the denied connects", |v| {
        v["verdict"] == "deny" && v["dst_port"] == denied_sink.port()
    });

    let s = env.agentd_json(&["status", "crm"]);
    assert_eq!(s["name"], "crm");
    assert_eq!(s["owner"], "crm-team@example.com");
    assert_eq!(s["description"], "CRM hygiene bot");
    assert_eq!(s["mode"], "enforce");
    assert_eq!(s["state"], "active");
    // Kernel counters: exact.
    assert_eq!(s["counts"]["allowed"], 1, "{s}");
    assert_eq!(s["counts"]["denied"], 3, "{s}");
    let procs = s["processes"].as_array().unwrap();
    let me = procs
        .iter()
        .find(|p| p["pid"] == probe.pid)
        .unwrap_or_else(|| panic!("probe pid {} not in {s}", probe.pid));
    assert_eq!(me["user"], "root");
    assert!(me["cmdline"][0].as_str().unwrap().ends_with("agentd-probe"));
    assert!(me["session"].is_string(), "{me}");
    let sessions = s["sessions"].as_array().unwrap();
    assert!(
        sessions.iter().any(|x| x["pid"] == probe.pid
            && x["how"] == "exec"
            && x["alive"] == true
            && x["requested_by_user"] == "root"),
        "{s}"
    );
    let rules = s["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["rule"],
        format!("127.0.0.1/32 tcp {}", sink.port()).as_str()
    );
    let recent = s["recent_denied"].as_array().unwrap();
    assert_eq!(counts(recent), 3, "{s}");
    assert!(recent.iter().all(|e| e["dst_port"] == denied_sink.port()));

    let human = String::from_utf8_lossy(&env.agentd(&["status", "crm"]).stdout).into_owned();
    for want in [
        "crm-team@example.com",
        "active",
        "recent denied attempts (",
        "DENY",
    ] {
        assert!(human.contains(want), "{want:?} missing from:\n{human}");
    }
    assert!(human.contains(&probe.pid.to_string()), "{human}");

    // events: filters narrow, counts add up, records are the log's.
    let out = env.agentd(&["events", "--agent", "crm", "--verdict", "deny", "--json"]);
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect();
    assert!(
        lines
            .iter()
            .all(|e| e["verdict"] == "deny" && e["agent"] == "crm")
    );
    assert_eq!(counts(&lines), 3);
    let allowed = env.agentd(&["events", "--verdict", "allow", "--since", "10m", "--json"]);
    let allowed: Vec<Value> = String::from_utf8_lossy(&allowed.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(counts(&allowed), 1);
    assert_eq!(allowed[0]["dst_port"], sink.port());
    // A window that ended before anything happened holds nothing.
    let old = env.agentd(&[
        "events",
        "--since",
        "2001-01-01T00:00:00Z",
        "--verdict",
        "deny",
    ]);
    assert!(old.status.success());
    let future = env.agentd(&["events", "--since", "2999-01-01T00:00:00Z", "--json"]);
    assert!(future.status.success());
    assert!(future.stdout.is_empty(), "nothing is newer than the future");
    let limited = env.agentd(&["events", "--limit", "2", "--json"]);
    assert_eq!(String::from_utf8_lossy(&limited.stdout).lines().count(), 2);
    let bad = env.agentd(&["events", "--since", "yesterday-ish"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("10m"));
    let human =
        String::from_utf8_lossy(&env.agentd(&["events", "--agent", "crm"]).stdout).into_owned();
    assert!(human.contains("DENY") && human.contains("ALLOW"), "{human}");
    let unknown = env.agentd(&["status", "nope", "--json"]);
    assert!(!unknown.status.success());
    let err: Value = serde_json::from_slice(&unknown.stdout).expect("JSON error");
    assert_eq!(err["ok"], false);
    assert!(err["error"].as_str().unwrap().contains("unknown agent"));
}

#[test]
fn events_follow_sees_a_decision_as_it_happens() {
    if !require_root("events_follow_sees_a_decision_as_it_happens") {
        return;
    }
    let denied_sink = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("events_follow");
    env.write_config(
        r#"[[agent]]
name = "crm"
owner = "t@example.com"
allow = []
"#,
    );
    env.start_daemon();
    let mut probe = ProbeProcess::exec(&env, "crm");
    let mut follower = Command::new(agentd_bin())
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "events",
            "--follow",
            "--agent",
            "crm",
            "--verdict",
            "deny",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn follower");
    let follower_pid = follower.id();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    // Subscribed once its request is on record.
    env.wait_audit("for the follower's request", |v| {
        v["event"] == "control" && v["action"] == "events" && v["pid"] == follower_pid
    });
    let asked = Instant::now();
    assert_eperm(&probe.op(&format!("tcp 127.0.0.1:{}", denied_sink.port())));
    let deadline = Instant::now() + Duration::from_secs(5);
    let seen = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["dst_port"] == denied_sink.port() => break v,
            Ok(_) => continue,
            Err(_) => {
                let _ = follower.kill();
                panic!("the follower saw no decision within 5s");
            }
        }
    };
    let latency = asked.elapsed();
    assert_eq!(seen["verdict"], "deny");
    assert_eq!(seen["agent"], "crm");
    assert_eq!(seen["pid"], probe.pid);
    eprintln!("follow: decision seen {latency:?} after the connect was made");
    // Hanging up ends the stream on the daemon's side too.
    let _ = follower.kill();
    let _ = follower.wait();
    let _ = reader.join();
    // The daemon still serves.
    assert_eq!(env.agentd_json(&["status", "crm"])["state"], "active");
}
