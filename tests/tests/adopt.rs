//! `agentd adopt`: a process that already runs is moved, every thread of
//! it, into an agent; from then on its connects (and its later children's)
//! are the agent's.
use std::fs;

use agentd_tests::*;
use serde_json::Value;

fn cgroup_of_task(pid: u32, tid: i64) -> String {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn adopt_moves_every_thread_and_its_children_follow() {
    if !require_root("adopt_moves_every_thread_and_its_children_follow") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("adopt");
    env.write_config(&format!(
        r#"[[agent]]
name = "crm"
owner = "t@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]

[[agent]]
name = "erp"
owner = "t@example.com"
allow = []
"#,
        allowed.port()
    ));
    env.start_daemon();

    // Outside any agent, nothing judges it.
    let mut p = ProbeProcess::spawn();
    let to_denied = format!("tcp 127.0.0.1:{}", denied.port());
    assert_ok(&p.op(&to_denied));
    assert_eq!(denied.accepted(QUIET).len(), 1);
    let tids: Vec<i64> = p.op("threads 4")["tids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(tids.len(), 4);

    let reply = env.agentd_json(&[
        "adopt",
        "--agent",
        "crm",
        "--pid",
        &p.pid.to_string(),
        "--reason",
        "incident 7: contain the running bot",
    ]);
    assert_eq!(reply["pid"], p.pid);
    assert_eq!(reply["threads"], 5, "main thread and four more: {reply}");
    let want = format!("/{}/crm", env.cgroup_root);
    assert_eq!(reply["cgroup"], want.as_str());
    assert_eq!(reply["killed"], false);
    for tid in tids.iter().copied().chain([p.pid as i64]) {
        assert_eq!(cgroup_of_task(p.pid, tid), want, "thread {tid}");
    }
    assert_eq!(p.op("cgroup")["cgroup"], want.as_str());

    // Now judged as the agent: the denied destination is refused and its
    // listener sees nothing; the allowed one works; a child follows.
    assert_eperm(&p.op(&to_denied));
    assert_eperm(&p.op(&format!("child {to_denied}")));
    assert!(
        denied.accepted(QUIET).is_empty(),
        "a denied connect got through"
    );
    assert_ok(&p.op(&format!("tcp 127.0.0.1:{}", allowed.port())));
    assert_eq!(allowed.accepted(QUIET).len(), 1);

    // On record, and in status.
    let rec = env.wait_audit("for the adoption", |v| {
        v["event"] == "session_start" && v["how"] == "adopt"
    });
    assert_eq!(rec["pid"], p.pid);
    assert_eq!(rec["reason"], "incident 7: contain the running bot");
    assert_eq!(rec["requested_by_user"], "root");
    let status = env.agentd_json(&["status", "crm"]);
    let sessions = status["sessions"].as_array().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s["how"] == "adopt" && s["pid"] == p.pid && s["alive"] == true),
        "{status}"
    );
    assert!(
        status["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["pid"] == p.pid)
    );

    // What adopt refuses, each with a reason and nothing moved.
    let refusals: [(&[&str], &str); 4] = [
        (
            &["--agent", "crm", "--pid", &p.pid.to_string()],
            "already in agent",
        ),
        (
            &["--agent", "erp", "--pid", &p.pid.to_string()],
            "belongs to agent",
        ),
        (&["--agent", "crm", "--pid", "1"], "cannot be adopted"),
        (
            &["--agent", "nope", "--pid", &std::process::id().to_string()],
            "unknown agent",
        ),
    ];
    for (args, why) in refusals {
        let mut all = vec!["adopt"];
        all.extend_from_slice(args);
        all.extend(["--reason", "test", "--json"]);
        let out = env.agentd(&all);
        assert!(!out.status.success(), "{all:?} was accepted");
        let err: Value = serde_json::from_slice(&out.stdout).expect("JSON error");
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(why), "{all:?}: {msg}");
    }
    assert_eq!(
        p.op("cgroup")["cgroup"],
        want.as_str(),
        "still where adopt put it"
    );
    let gone = env.agentd(&[
        "adopt", "--agent", "crm", "--pid", "4194303", "--reason", "x",
    ]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no such process"));
    let empty = env.agentd(&["adopt", "--agent", "crm", "--pid", "2", "--reason", " "]);
    assert!(!empty.status.success());
}
