//! `agentd reload` and SIGHUP: new rules switch in one step under a connect
//! loop, invalid configs change nothing, added agents work at once, removed
//! agents with live processes stay contained until they are empty.
use std::{
    fs,
    net::TcpListener,
    time::{Duration, Instant},
};

use agentd_tests::*;
use serde_json::Value;

/// A loopback port nothing listens on: an allowed connect is refused by
/// the peer (ECONNREFUSED), a denied one fails with EPERM.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(name: &str, cidr: &str, port: u16) -> String {
    format!(
        "[[agent]]\nname = \"{name}\"\nowner = \"t@example.com\"\nallow = [ {{ cidr = \"{cidr}\", ports = [{port}], protocol = \"tcp\" }} ]\n\n"
    )
}

#[test]
fn rules_switch_in_one_step_under_a_connect_loop() {
    if !require_root("rules_switch_in_one_step_under_a_connect_loop") {
        return;
    }
    let (p1, p2) = (closed_port(), closed_port());
    let mut env = TestEnv::new("reload_switch");
    env.write_config(&agent("crm", "127.0.0.1/32", p1));
    env.start_daemon();
    let mut probe = ProbeProcess::exec(&env, "crm");
    // Old rules allow only the first destination, new rules only the last;
    // the two in between are allowed by neither (a mix would allow one).
    probe.start_op(&format!(
        "rounds 2500 127.0.0.1:{p1} 127.0.0.1:{p2} 127.0.0.2:{p1} 127.0.0.2:{p2}"
    ));
    std::thread::sleep(Duration::from_millis(800));
    env.write_config(&agent("crm", "127.0.0.2/32", p2));
    let reply = env.agentd_json(&["reload"]);
    assert_eq!(reply["changed"], serde_json::json!(["crm"]), "{reply}");
    let result = probe.result();
    let rounds: Vec<&str> = result["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let (mut old, mut new, mut during) = (0, 0, 0);
    let mut switched = false;
    for (i, r) in rounds.iter().enumerate() {
        match *r {
            "addd" => {
                assert!(!switched, "round {i}: old rules after the new ones applied");
                old += 1;
            }
            "ddda" => {
                switched = true;
                new += 1;
            }
            // The switch fell between this round's first and last connect.
            "adda" => {
                assert!(!switched, "round {i}: old rules after the new ones");
                switched = true;
                during += 1;
            }
            other => panic!(
                "round {i} was {other:?}: judged by a mix of rules, by none, or not at all \
                 (a = allowed, d = denied, o = other error)"
            ),
        }
    }
    assert!(old > 100 && new > 100, "{old} old, {new} new rounds");
    assert!(during <= 1);
    eprintln!(
        "reload under load: {} rounds ({old} old, {during} straddling, {new} new), took {} µs",
        rounds.len(),
        reply["took_us"]
    );
    let rec = env.wait_audit("for the reload", |v| v["event"] == "reload");
    assert_eq!(rec["result"], "ok");
}

#[test]
fn an_invalid_config_changes_nothing_and_sighup_applies_a_valid_one() {
    if !require_root("an_invalid_config_changes_nothing_and_sighup_applies_a_valid_one") {
        return;
    }
    let (p1, p2) = (closed_port(), closed_port());
    let mut env = TestEnv::new("reload_invalid");
    env.write_config(&agent("crm", "127.0.0.1/32", p1));
    env.start_daemon();
    let before = env.agentd_json(&["status", "crm"]);

    // A bad CIDR in a new agent, past the [daemon] section.
    env.write_config(&format!(
        "{}{}",
        agent("crm", "127.0.0.2/32", p2),
        agent("erp", "10.0.0.300/8", 443)
    ));
    let out = env.agentd(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let config = env.config.display().to_string();
    assert!(err.contains(&format!("{config}:")), "{err}");
    assert!(err.contains("agent[1].allow[0].cidr"), "{err}");
    let line: usize = err
        .split(&format!("{config}:"))
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line number in {err}"));
    let text = fs::read_to_string(&env.config).unwrap();
    assert!(text.lines().nth(line - 1).unwrap().contains("10.0.0.300/8"));
    // Exactly as before: same rules, no new agent, the old rule still works.
    let after = env.agentd_json(&["status", "crm"]);
    assert_eq!(before["rules"], after["rules"]);
    let list = env.agentd_json(&["list"]);
    assert_eq!(list["agents"].as_array().unwrap().len(), 1);
    assert!(!env.agent_cgroup("erp").exists());
    let r = env.probe("crm", &["tcp", &format!("127.0.0.1:{p1}")]);
    assert_eq!(
        r["errno"],
        libc::ECONNREFUSED,
        "old rule no longer applies: {r}"
    );
    assert_eperm(&env.probe("crm", &["tcp", &format!("127.0.0.2:{p2}")]));
    let rec = env.wait_audit("for the refused reload", |v| {
        v["event"] == "reload" && v["result"] == "error"
    });
    assert!(rec["error"].as_str().unwrap().contains("cidr"));

    // SIGHUP with a valid file: applied, on record.
    env.write_config(&agent("crm", "127.0.0.2/32", p2));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(env.daemon_pid().unwrap() as i32, libc::SIGHUP) };
    env.wait_audit("for the SIGHUP reload", |v| {
        v["event"] == "reload" && v["result"] == "ok"
    });
    assert_eperm(&env.probe("crm", &["tcp", &format!("127.0.0.1:{p1}")]));
    let r = env.probe("crm", &["tcp", &format!("127.0.0.2:{p2}")]);
    assert_eq!(r["errno"], libc::ECONNREFUSED, "new rule not applied: {r}");
    assert!(env.daemon_pid().is_some());
    assert_eq!(env.agentd_json(&["status", "crm"])["state"], "active");
}

#[test]
fn added_agents_work_and_removed_ones_stay_contained_until_empty() {
    if !require_root("added_agents_work_and_removed_ones_stay_contained_until_empty") {
        return;
    }
    let (p1, p2) = (closed_port(), closed_port());
    let mut env = TestEnv::new("reload_add_remove");
    env.write_config(&format!(
        "{}{}",
        agent("crm", "127.0.0.1/32", p1),
        agent("erp", "127.0.0.1/32", p2)
    ));
    env.start_daemon();
    let mut erp = ProbeProcess::exec(&env, "erp");
    let to_p2 = format!("tcp 127.0.0.1:{p2}");
    assert_eq!(erp.op(&to_p2)["errno"], libc::ECONNREFUSED);

    env.write_config(&format!(
        "{}{}",
        agent("crm", "127.0.0.1/32", p1),
        agent("hr", "127.0.0.1/32", p1)
    ));
    let reply = env.agentd_json(&["reload"]);
    assert_eq!(reply["added"], serde_json::json!(["hr"]));
    assert_eq!(reply["unchanged"], serde_json::json!(["crm"]));
    assert_eq!(reply["contained"][0]["agent"], "erp", "{reply}");
    assert_eq!(reply["contained"][0]["processes"], 1);

    // The added agent is enforced at once.
    let r = env.probe("hr", &["tcp", &format!("127.0.0.1:{p1}")]);
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    assert_eperm(&env.probe("hr", &["tcp", &format!("127.0.0.1:{p2}")]));

    // The removed one keeps its process and loses every destination.
    assert_eperm(&erp.op(&to_p2));
    let list = env.agentd_json(&["list"]);
    assert_eq!(list["contained"][0]["name"], "erp", "{list}");
    assert_eq!(list["contained"][0]["processes"], 1);
    let human = String::from_utf8_lossy(&env.agentd(&["list"]).stdout).into_owned();
    assert!(human.contains("NO network access"), "{human}");

    // Reported until empty, then released.
    drop(erp);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: Value = env.agentd_json(&["list"]);
        if list["contained"].as_array().is_none_or(|c| c.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "erp still contained: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_audit("for the release", |v| {
        v["event"] == "agent_released" && v["agent"] == "erp"
    });
    assert!(
        !env.agent_cgroup("erp").exists(),
        "erp's cgroup left behind"
    );
    assert!(!env.bpffs_dir.join("links").join("erp").exists());
}
