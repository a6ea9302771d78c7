//! The agent is its cgroup: children and grandchildren stay in it, a
//! lowered user cannot leave it, and sockets the hooks never see are refused.
use agentd_tests::*;

fn one_agent(env: &TestEnv, port: u16) {
    env.write_config(&format!(
        r#"[[agent]]
name = "ident"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{port}], protocol = "tcp" }} ]
"#
    ));
}

#[test]
fn children_and_grandchildren_contained() {
    if !require_root("children_and_grandchildren_contained") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("children");
    one_agent(&env, allowed.port());
    env.start_daemon();
    let want = format!("/{}/ident", env.cgroup_root);

    let v = env.probe("ident", &["child", "cgroup"]);
    assert_eq!(v["cgroup"], want.as_str(), "child left the agent: {v}");
    let v = env.probe("ident", &["child", "child", "cgroup"]);
    assert_eq!(v["cgroup"], want.as_str(), "grandchild left the agent: {v}");

    assert_eperm(&env.probe(
        "ident",
        &["child", "child", "tcp", &denied.addr.to_string()],
    ));
    assert!(denied.accepted(QUIET).is_empty());
    assert_ok(&env.probe(
        "ident",
        &["child", "child", "tcp", &allowed.addr.to_string()],
    ));
    assert_eq!(allowed.accepted(QUIET).len(), 1);
}

#[test]
fn user_runs_as_that_user_and_cannot_leave_its_cgroup() {
    if !require_root("user_runs_as_that_user_and_cannot_leave_its_cgroup") {
        return;
    }
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("user");
    one_agent(&env, 9);
    env.start_daemon();

    let v = env.probe_as("ident", Some("nobody"), &["id"]);
    assert_eq!(v["uid"], 65534, "{v}");
    let v = env.probe_as("ident", Some("nobody"), &["cgroup"]);
    assert_eq!(v["cgroup"], format!("/{}/ident", env.cgroup_root).as_str());

    // Moving itself to the root cgroup (or anywhere else) is refused.
    let mount = TestEnv::cgroup_mount();
    let v = env.probe_as(
        "ident",
        Some("nobody"),
        &["escape", mount.to_str().unwrap()],
    );
    assert_eq!(v["ok"], false, "a non-root agent left its cgroup: {v}");
    assert_eperm(&env.probe_as("ident", Some("nobody"), &["tcp", &denied.addr.to_string()]));
    assert!(denied.accepted(QUIET).is_empty());

    let session = env.wait_audit("session_start as nobody", |r| {
        r["event"] == "session_start" && r["target_user"] == "nobody"
    });
    assert_eq!(session["requested_by_uid"], 0);
    assert_eq!(session["agent"], "ident");
    assert_eq!(session["owner"], "test@example.com");
}

#[test]
fn raw_and_icmp_sockets_refused() {
    if !require_root("raw_and_icmp_sockets_refused") {
        return;
    }
    let mut env = TestEnv::new("raw");
    one_agent(&env, 9);
    env.start_daemon();
    // Raw sockets never pass the connect/sendmsg hooks: refused at creation.
    assert_eperm(&env.probe("ident", &["raw"]));
    let rec = env.wait_audit("socket refusal", |r| r["event"] == "socket");
    assert_eq!(rec["verdict"], "deny");
    assert_eq!(rec["reason"], "protocol");
}

#[test]
fn exec_reports_command_status_and_unknown_agent() {
    if !require_root("exec_reports_command_status_and_unknown_agent") {
        return;
    }
    let mut env = TestEnv::new("status");
    one_agent(&env, 9);
    env.start_daemon();
    let out = env.agentd(&["exec", "--agent", "ident", "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = env.agentd(&["exec", "--agent", "nope", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown agent"),
        "{out:?}"
    );
}

#[test]
fn socket_is_judged_by_the_cgroup_it_was_created_in() {
    if !require_root("socket_is_judged_by_the_cgroup_it_was_created_in") {
        return;
    }
    let for_a = TcpSink::bind("127.0.0.1:0");
    let for_b = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("socket_cgroup");
    env.write_config(&format!(
        r#"[[agent]]
name = "agent-a"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]

[[agent]]
name = "agent-b"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        for_a.port(),
        for_b.port()
    ));
    env.start_daemon();

    // A socket made in agent A keeps A's rules after its process moves to B.
    let mut p = ProbeProcess::spawn();
    p.join(&env.agent_cgroup("agent-a"));
    assert_ok(&p.op("hold"));
    p.join(&env.agent_cgroup("agent-b"));
    assert_eperm(&p.op(&format!("heldtcp {}", for_b.addr)));
    assert!(for_b.accepted(QUIET).is_empty());
    assert_ok(&p.op("hold"));
    assert_ok(&p.op(&format!("heldtcp {}", for_b.addr)));
    assert_eq!(for_b.accepted(QUIET).len(), 1);

    assert_ok(&p.op("hold"));
    p.join(&env.agent_cgroup("agent-a"));
    assert_ok(&p.op(&format!("heldtcp {}", for_b.addr)));
    assert_eq!(for_b.accepted(QUIET).len(), 1, "made in B, B's rules apply");
    assert!(for_a.accepted(QUIET).is_empty());
}

#[test]
fn cgroups_below_an_agent_are_the_agent() {
    if !require_root("cgroups_below_an_agent_are_the_agent") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("subcgroup");
    one_agent(&env, allowed.port());
    env.start_daemon();
    // e.g. a service manager inside the agent making its own sub-cgroups.
    let sub = env.agent_cgroup("ident").join("worker");
    std::fs::create_dir(&sub).expect("sub-cgroup");
    let mut p = ProbeProcess::spawn();
    p.join(&sub);
    assert_ok(&p.op(&format!("tcp {}", allowed.addr)));
    assert_eq!(allowed.accepted(QUIET).len(), 1);
    assert_eperm(&p.op(&format!("tcp {}", denied.addr)));
    assert!(denied.accepted(QUIET).is_empty());
    drop(p);
    let _ = std::fs::remove_dir(&sub);
}
