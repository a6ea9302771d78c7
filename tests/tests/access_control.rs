//! Roles on the control socket, as real users and groups the test creates:
//! each boundary both ways, and every request on record.
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use agentd_tests::*;

struct World {
    env: TestEnv,
    socket_group: TestGroup,
    viewer: TestUser,
    responder: TestUser,
    admin: TestUser,
    launcher: TestUser,
    no_role: TestUser,
    outsider: TestUser,
    // Groups outlive the users that belong to them (dropped last).
    _groups: Vec<TestGroup>,
}

fn world(test: &str) -> World {
    let socket_group = TestGroup::create("s");
    let mon = TestGroup::create("m");
    let sec = TestGroup::create("r");
    let plat = TestGroup::create("p");
    let ops = TestGroup::create("o");
    let viewer = TestUser::create("v", &[&socket_group, &mon]);
    let responder = TestUser::create("r", &[&socket_group, &sec]);
    let admin = TestUser::create("a", &[&socket_group, &plat]);
    let launcher = TestUser::create("l", &[&socket_group, &ops]);
    let no_role = TestUser::create("n", &[&socket_group]);
    let outsider = TestUser::create("x", &[]);
    let mut env = TestEnv::new(test);
    env.write_config(&format!(
        r#"[access]
socket_group = "{sg}"
admins = ["@{plat}"]
responders = ["@{sec}"]
viewers = ["@{mon}"]

[[agent]]
name = "crm"
owner = "test@example.com"
launchers = ["@{ops}"]
allow = [ {{ cidr = "127.0.0.1/32", ports = [9], protocol = "tcp" }} ]
"#,
        sg = socket_group.name,
        plat = plat.name,
        sec = sec.name,
        mon = mon.name,
        ops = ops.name,
    ));
    env.start_daemon();
    World {
        env,
        socket_group,
        viewer,
        responder,
        admin,
        launcher,
        no_role,
        outsider,
        _groups: vec![mon, sec, plat, ops],
    }
}

fn ok(out: &std::process::Output) -> bool {
    out.status.success()
}

fn refused(out: &std::process::Output) -> bool {
    !out.status.success()
        && String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("permission denied")
}

#[test]
fn each_role_may_do_its_job_and_nothing_more() {
    if !require_root("each_role_may_do_its_job_and_nothing_more") {
        return;
    }
    let w = world("access_roles");
    let env = &w.env;

    // The socket: root's, group from config, 0660.
    let meta = std::fs::metadata(&env.socket).unwrap();
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let gid = std::process::Command::new("getent")
        .args(["group", &w.socket_group.name])
        .output()
        .unwrap();
    let gid: u32 = String::from_utf8_lossy(&gid.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(meta.gid(), gid);

    // Not in the socket group: cannot even connect.
    let out = env.agentd_as(&w.outsider, &["list"]);
    assert!(!ok(&out), "outsider listed: {out:?}");

    // In the group but in no role: nothing but ping.
    assert!(refused(&env.agentd_as(&w.no_role, &["list"])));
    assert!(refused(
        &env.agentd_as(&w.no_role, &["kill", "crm", "--reason", "x"])
    ));

    // Viewer: list, not kill.
    let out = env.agentd_as(&w.viewer, &["list", "--json"]);
    assert!(ok(&out), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"crm\""));
    assert!(refused(
        &env.agentd_as(&w.viewer, &["kill", "crm", "--reason", "x"])
    ));

    // Viewer: status and events too; nothing that changes anything.
    assert!(ok(&env.agentd_as(&w.viewer, &["status", "crm"])));
    assert!(ok(&env.agentd_as(&w.viewer, &["events", "--limit", "5"])));
    assert!(refused(&env.agentd_as(&w.viewer, &["reload"])));
    assert!(refused(&env.agentd_as(&w.no_role, &["status", "crm"])));
    assert!(refused(&env.agentd_as(&w.no_role, &["events"])));

    // Responder: list and kill, never restore, reload or adopt.
    assert!(ok(&env.agentd_as(&w.responder, &["list"])));
    let out = env.agentd_as(
        &w.responder,
        &["kill", "crm", "--reason", "INC-7 responder"],
    );
    assert!(ok(&out), "{out:?}");
    assert!(refused(
        &env.agentd_as(&w.responder, &["restore", "crm", "--reason", "x"])
    ));
    assert!(refused(&env.agentd_as(&w.responder, &["reload"])));
    let bystander = ProbeProcess::spawn();
    let pid = bystander.pid.to_string();
    assert!(refused(&env.agentd_as(
        &w.responder,
        &["adopt", "--agent", "crm", "--pid", &pid, "--reason", "x"]
    )));
    assert!(
        !std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .contains(&env.cgroup_root),
        "a refused adopt moved the process"
    );
    let list: serde_json::Value =
        serde_json::from_slice(&env.agentd(&["list", "--json"]).stdout).unwrap();
    assert_eq!(
        list["agents"][0]["killed"], true,
        "the refused restore changed nothing"
    );

    // Admin (through @group): restore, reload, adopt.
    let out = env.agentd_as(&w.admin, &["restore", "crm", "--reason", "INC-7 closed"]);
    assert!(ok(&out), "{out:?}");
    assert!(ok(&env.agentd_as(&w.admin, &["reload"])));
    let out = env.agentd_as(
        &w.admin,
        &[
            "adopt", "--agent", "crm", "--pid", &pid, "--reason", "INC-8",
        ],
    );
    assert!(ok(&out), "{out:?}");
    let list: serde_json::Value =
        serde_json::from_slice(&env.agentd(&["list", "--json"]).stdout).unwrap();
    assert_eq!(list["agents"][0]["killed"], false);

    // Every request is on record, refused ones too, with who and why.
    let refusal = env.wait_audit("refused kill by viewer", |r| {
        r["event"] == "control"
            && r["action"] == "kill"
            && r["result"] == "refused"
            && r["user"] == w.viewer.name.as_str()
    });
    assert!(refusal["uid"].as_u64().unwrap() > 0);
    assert!(refusal["pid"].as_u64().unwrap() > 0);
    assert!(refusal["exe"].as_str().unwrap().ends_with("agentd"));
    assert_eq!(refusal["target"][0], "crm");
    assert!(refusal["error"].as_str().unwrap().contains("may not kill"));
    let done = env.wait_audit("kill by responder", |r| {
        r["event"] == "control"
            && r["action"] == "kill"
            && r["result"] == "ok"
            && r["user"] == w.responder.name.as_str()
    });
    assert_eq!(done["reason"], "INC-7 responder");
    env.wait_audit("list by viewer", |r| {
        r["event"] == "control" && r["action"] == "list" && r["user"] == w.viewer.name.as_str()
    });
}

#[test]
fn launchers_may_exec_their_agent_as_themselves_only() {
    if !require_root("launchers_may_exec_their_agent_as_themselves_only") {
        return;
    }
    let w = world("access_exec");
    let env = &w.env;
    let probe = env.public_probe();

    // A launcher of this agent runs a command in it, as itself.
    let out = env.agentd_as(
        &w.launcher,
        &["exec", "--agent", "crm", "--", &probe, "once", "cgroup"],
    );
    assert!(ok(&out), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(v["cgroup"].as_str().unwrap().ends_with("/crm"), "{v}");
    // ... but never as someone else: that is an admin's call.
    let out = env.agentd_as(
        &w.launcher,
        &[
            "exec", "--agent", "crm", "--user", "root", "--", &probe, "once", "id",
        ],
    );
    assert!(refused(&out), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("another user"));
    // A responder is not a launcher.
    let out = env.agentd_as(
        &w.responder,
        &["exec", "--agent", "crm", "--", &probe, "once", "id"],
    );
    assert!(refused(&out), "{out:?}");
    // An admin may.
    let out = env.agentd_as(
        &w.admin,
        &["exec", "--agent", "crm", "--", &probe, "once", "id"],
    );
    assert!(ok(&out), "{out:?}");
    env.wait_audit("refused exec as root", |r| {
        r["event"] == "control"
            && r["action"] == "exec"
            && r["result"] == "refused"
            && r["user"] == w.launcher.name.as_str()
    });
}

#[test]
fn a_caller_inside_an_agent_is_refused_everything_even_as_root() {
    if !require_root("a_caller_inside_an_agent_is_refused_everything_even_as_root") {
        return;
    }
    let mut env = TestEnv::new("access_inside");
    env.write_config(
        "[[agent]]\nname = \"crm\"\nowner = \"t@example.com\"\n\n[[agent]]\nname = \"erp\"\nowner = \"t@example.com\"\n",
    );
    env.start_daemon();
    let agentd = agentd_bin();
    let socket = env.socket.display().to_string();
    for inner in [
        vec!["list"],
        vec!["status", "crm"],
        vec!["restore", "--all", "--reason", "let me out"],
        vec!["kill", "erp", "--reason", "sabotage"],
        vec!["reload"],
    ] {
        // Root, but running inside agent crm.
        let mut args = vec!["exec", "--agent", "crm", "--", agentd.to_str().unwrap()];
        args.extend(["--socket", &socket]);
        args.extend(&inner);
        let out = env.agentd(&args);
        assert!(
            !out.status.success(),
            "{inner:?} from inside an agent: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("permission denied") && err.contains("inside agent \"crm\""),
            "{inner:?}: {err}"
        );
    }
    let list: serde_json::Value = env.agentd_json(&["list"]);
    assert!(
        list["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["killed"] == false),
        "a refused kill changed state: {list}"
    );
    let rec = env.wait_audit("for the refused kill", |r| {
        r["event"] == "control" && r["action"] == "kill" && r["result"] == "refused"
    });
    assert_eq!(rec["uid"], 0);
    assert!(rec["error"].as_str().unwrap().contains("inside agent"));
}
