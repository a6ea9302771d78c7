//! Every decision is one JSON line in the audit log; audit mode allows and
//! records the verdict the call would have had.
use agentd_tests::*;

#[test]
fn audit_log_records_allow_and_deny_with_rule() {
    if !require_root("audit_log_records_allow_and_deny_with_rule") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("audit_log");
    env.write_config(&format!(
        r#"[[agent]]
name = "crm-hygiene"
owner = "maria.lopez@example.com"
allow = [
  {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }},
]
"#,
        allowed.port()
    ));
    env.start_daemon();
    let before = std::time::SystemTime::now();
    assert_ok(&env.probe("crm-hygiene", &["tcp", &allowed.addr.to_string()]));
    assert_eperm(&env.probe("crm-hygiene", &["tcp", &denied.addr.to_string()]));

    let port = |p: u16| move |r: &serde_json::Value| r["event"] == "connect" && r["dst_port"] == p;
    let allow = env.wait_audit("allowed connect", port(allowed.port()));
    assert_eq!(allow["verdict"], "allow");
    assert_eq!(allow["agent"], "crm-hygiene");
    assert_eq!(allow["owner"], "maria.lopez@example.com");
    assert_eq!(allow["protocol"], "tcp");
    assert_eq!(allow["dst_ip"], "127.0.0.1");
    assert_eq!(allow["comm"], "agentd-probe");
    assert_eq!(allow["uid"], 0);
    assert!(
        allow["rule"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1/32 tcp"),
        "{allow}"
    );
    assert!(allow["session"].as_str().is_some(), "no session on {allow}");
    // The kernel's timestamp, converted, is the wall-clock time of the call.
    let ts = time::OffsetDateTime::parse(
        allow["ts"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339 ts");
    let ts = std::time::SystemTime::from(ts);
    let after = std::time::SystemTime::now();
    assert!(
        ts + std::time::Duration::from_millis(50) >= before && ts <= after,
        "ts {allow} outside the call's window"
    );
    assert!(allow["pid"].as_u64().unwrap() > 0);

    let deny = env.wait_audit("denied connect", port(denied.port()));
    assert_eq!(deny["verdict"], "deny");
    assert_eq!(deny["reason"], "no_rule");
    assert!(deny["rule"].is_null());

    // Kernel counters agree with what happened.
    let out = env.agentd(&["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &list["agents"][0];
    assert_eq!(a["name"], "crm-hygiene");
    assert_eq!(a["allowed"], 1);
    assert_eq!(a["denied"], 1);
    assert_eq!(a["mode"], "enforce");
}

#[test]
fn audit_mode_allows_and_records_would_be_verdict() {
    if !require_root("audit_mode_allows_and_records_would_be_verdict") {
        return;
    }
    let listed = TcpSink::bind("127.0.0.1:0");
    let unlisted = TcpSink::bind("127.0.0.1:0");
    let unlisted_udp = UdpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("audit_mode");
    env.write_config(&format!(
        r#"[[agent]]
name = "trial"
owner = "li.wei@example.com"
mode = "audit"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        listed.port()
    ));
    env.start_daemon();

    assert_ok(&env.probe("trial", &["tcp", &listed.addr.to_string()]));
    assert_ok(&env.probe("trial", &["tcp", &unlisted.addr.to_string()]));
    assert_ok(&env.probe("trial", &["udp", &unlisted_udp.addr.to_string()]));
    assert_eq!(listed.accepted(QUIET).len(), 1);
    assert_eq!(
        unlisted.accepted(QUIET).len(),
        1,
        "audit mode must not block"
    );
    assert_eq!(unlisted_udp.received(QUIET).len(), 1);

    let r = env.wait_audit("listed", |r| r["dst_port"] == listed.port());
    assert_eq!(r["verdict"], "allow");
    let r = env.wait_audit("unlisted", |r| r["dst_port"] == unlisted.port());
    assert_eq!(r["verdict"], "audit", "would-be deny must be recorded: {r}");
    let r = env.wait_audit("unlisted udp", |r| r["dst_port"] == unlisted_udp.port());
    assert_eq!(r["verdict"], "audit");
    assert_eq!(r["event"], "send");
    assert_eq!(r["protocol"], "udp");
}

#[test]
fn sessions_survive_a_daemon_restart() {
    if !require_root("sessions_survive_a_daemon_restart") {
        return;
    }
    let sink = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("sessions_restart");
    env.write_config(&format!(
        "[[agent]]\nname = \"long\"\nowner = \"o@example.com\"\nallow = [ {{ cidr = \"127.0.0.1/32\", ports = [{}] }} ]\n",
        sink.port()
    ));
    env.start_daemon();
    let mut agent = ProbeProcess::exec(&env, "long");
    let started = env.wait_audit("session_start", |r| r["event"] == "session_start");
    let session = started["session"].as_str().unwrap().to_owned();
    assert_eq!(
        started["pid"], agent.pid,
        "the session's process is the command itself"
    );

    env.kill9_daemon();
    env.start_daemon();
    assert_ok(&agent.op(&format!("tcp {}", sink.addr)));
    let rec = env.wait_audit("connect after restart", |r| r["event"] == "connect");
    assert_eq!(rec["session"], session.as_str(), "{rec}");
}
