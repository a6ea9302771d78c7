//! A restarted daemon carries what agents learned through their hostname
//! rules into its new policy generations: an agent that cached an address
//! across the restart keeps reaching it, without asking again, as long as
//! its rules still allow the name and the TTL has not run out. The names
//! come from a file in the state directory; the addresses must still be in
//! the kernel's pinned map, so an edited file allows nothing new.
use std::{
    fs,
    time::{Duration, Instant},
};

use agentd_tests::{
    dns::{DnsServer, STUB, answers},
    *,
};
use serde_json::{Value, json};

fn resolve(env: &TestEnv, name: &str) {
    let v = env.probe("erp", &["dns", STUB, name, "A", "udp"]);
    assert_eq!(answers(&v).len(), 1, "{name}: {v}");
}

fn learned_count(env: &TestEnv) -> Value {
    env.agentd_json(&["status", "erp"])["learned_addresses"].clone()
}

#[test]
fn learned_addresses_survive_a_daemon_restart() {
    if !require_root("learned_addresses_survive_a_daemon_restart") {
        return;
    }
    let crm = TcpSink::bind("127.0.0.20:0");
    let port = crm.port();
    let api = TcpSink::bind(&format!("127.0.0.21:{port}"));
    let short = TcpSink::bind(&format!("127.0.0.23:{port}"));
    let late = TcpSink::bind(&format!("127.0.0.24:{port}"));
    let forged = TcpSink::bind(&format!("127.0.0.66:{port}"));
    let upstream = DnsServer::start(
        "127.0.0.1",
        &[
            ("crm.test", 300, "127.0.0.20"),
            ("api.test", 300, "127.0.0.21"),
            ("short.test", 1, "127.0.0.23"),
            ("late.test", 300, "127.0.0.24"),
        ],
    );
    let mut env = TestEnv::new("dns_restart");
    let metrics = format!("127.0.0.1:{}", scrape::free_loopback_port());
    env.metrics_listen = metrics.clone();
    let config = |names: &[&str]| {
        let hosts: Vec<String> = names
            .iter()
            .map(|n| format!("{{ host = \"{n}\", ports = [{port}], protocol = \"tcp\" }}"))
            .collect();
        format!(
            "[dns]\nupstream = [\"{}\"]\nmin_ttl = \"1s\"\n\n[[agent]]\nname = \"erp\"\nowner = \"t@example.com\"\nallow = [ {} ]\n",
            upstream.addr,
            hosts.join(", ")
        )
    };
    env.write_config(&config(&[
        "crm.test",
        "api.test",
        "short.test",
        "late.test",
    ]));
    env.start_daemon();
    for name in ["crm.test", "api.test", "short.test"] {
        resolve(&env, name);
    }
    assert_eq!(learned_count(&env), 3);
    let s = scrape::Scrape::get(&metrics);
    let erp = [("agent", "erp")];
    assert_eq!(s.value("agentd_learned_addresses", &erp), Some(3.0));
    let answered = [
        ("agent", "erp"),
        ("verdict", "allow"),
        ("result", "answered"),
    ];
    assert_eq!(s.value("agentd_dns_queries_total", &answered), Some(3.0));

    // A clean stop. Someone adds a claim to the saved names for an address
    // no answer ever gave. api.test's rule leaves the config, and
    // short.test's TTL (1 s) runs out while the daemon is down.
    env.stop_daemon();
    let saved = env.dir.join("state").join("learned.json");
    let mut doc: Value = serde_json::from_slice(&fs::read(&saved).expect("saved names"))
        .expect("saved names are JSON");
    doc["agents"]["erp"]
        .as_array_mut()
        .expect("erp's names")
        .push(json!({"name": "crm.test", "addr": "127.0.0.66", "expires_ns": u64::MAX}));
    fs::write(&saved, serde_json::to_vec(&doc).unwrap()).expect("edit saved names");
    std::thread::sleep(Duration::from_millis(1_200));
    env.write_config(&config(&["crm.test", "short.test", "late.test"]));
    env.start_daemon();
    let start = env.wait_audit("daemon_start after the restart", |v| {
        v["event"] == "daemon_start" && v["pid"] == env.daemon_pid().unwrap()
    });
    assert_eq!(start["learned_restored"], 1, "{start}");
    assert_eq!(learned_count(&env), 1);
    let s = scrape::Scrape::get(&metrics);
    assert_eq!(s.value("agentd_learned_addresses", &erp), Some(1.0));
    // Responders see which name allows which address, and for how long.
    let status = env.agentd_json(&["status", "erp"]);
    let learned = status["learned"].as_array().expect("learned names");
    assert_eq!(learned.len(), 1, "{status}");
    assert_eq!(learned[0]["name"], "crm.test");
    assert_eq!(learned[0]["addresses"], json!(["127.0.0.20"]));
    assert!(
        learned[0]["expires_in_s"]
            .as_u64()
            .is_some_and(|s| s > 0 && s <= 300)
    );
    let text = String::from_utf8_lossy(&env.agentd(&["status", "erp"]).stdout).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains("crm.test") && l.contains("127.0.0.20") && l.contains("left")),
        "{text}"
    );
    let asked = upstream.asked().len();

    // crm.test's address still works without asking again, named as before.
    assert_ok(&env.probe("erp", &["tcp", &crm.addr.to_string()]));
    assert_eq!(crm.accepted(QUIET), vec![b"probe".to_vec()]);
    let conn = env.wait_audit("connect to crm.test after the restart", |v| {
        v["event"] == "connect" && v["dst_ip"] == "127.0.0.20" && v["verdict"] == "allow"
    });
    assert_eq!(conn["host"], "crm.test", "{conn}");
    assert_eq!(conn["reason"], "host_rule", "{conn}");
    // Its rule gone, api.test's address went with it; short.test's expired.
    for sink in [&api, &short] {
        assert_eperm(&env.probe("erp", &["tcp", &sink.addr.to_string()]));
        assert!(sink.accepted(QUIET).is_empty(), "{} reached", sink.addr);
    }
    // The added claim: the previous daemon never allowed that address.
    assert_eperm(&env.probe("erp", &["tcp", &forged.addr.to_string()]));
    assert!(forged.accepted(QUIET).is_empty(), "forged claim honoured");
    assert_eq!(
        upstream.asked().len(),
        asked,
        "a restored name was asked again"
    );

    // kill -9: what the sweeper saved (within half a second) is restored.
    resolve(&env, "late.test");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_to_string(&saved)
        .unwrap_or_default()
        .contains("late.test")
    {
        assert!(Instant::now() < deadline, "late.test not saved within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    env.kill9_daemon();
    env.start_daemon();
    assert_ok(&env.probe("erp", &["tcp", &late.addr.to_string()]));
    assert_eq!(late.accepted(QUIET), vec![b"probe".to_vec()]);
    assert_ok(&env.probe("erp", &["tcp", &crm.addr.to_string()]));
    assert_eq!(crm.accepted(QUIET).len(), 1);
}
