//! Enforcement lives in the kernel: it holds when the daemon is killed,
//! a restarted daemon re-adopts it without attaching twice, and teardown
//! refuses to leave live agents uncontained.
use std::{fs, path::Path};

use agentd_tests::*;

/// Ids of the programs attached directly to `cgroup` for `attach_type`,
/// asked of the kernel (BPF_PROG_QUERY).
fn attached(cgroup: &Path, attach_type: u32) -> Vec<u32> {
    let dir = fs::File::open(cgroup).expect("open cgroup");
    agentd::programs::attached_programs(&dir, attach_type).expect("BPF_PROG_QUERY")
}

/// connect4, connect6, sendmsg4, sendmsg6, sock_create, ingress, egress.
const ATTACH_TYPES: [u32; 7] = [10, 11, 14, 15, 2, 0, 1];

#[test]
fn kill9_keeps_enforcement_and_restart_readopts() {
    if !require_root("kill9_keeps_enforcement_and_restart_readopts") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let denied_udp = UdpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("kill9");
    env.write_config(&format!(
        r#"[[agent]]
name = "sturdy"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        allowed.port()
    ));
    env.start_daemon();
    let cgroup = env.agent_cgroup("sturdy");
    let before: Vec<Vec<u32>> = ATTACH_TYPES.iter().map(|t| attached(&cgroup, *t)).collect();
    assert!(
        before.iter().all(|ids| ids.len() == 1),
        "one program per hook: {before:?}"
    );

    // An agent process that lives through the daemon's death.
    let mut agent = ProbeProcess::spawn();
    agent.join(&cgroup);
    assert_ok(&agent.op(&format!("tcp {}", allowed.addr)));
    assert_eq!(allowed.accepted(QUIET).len(), 1);

    env.kill9_daemon();
    assert_eperm(&agent.op(&format!("tcp {}", denied.addr)));
    assert_eperm(&agent.op(&format!("udp {}", denied_udp.addr)));
    assert!(denied.accepted(QUIET).is_empty());
    assert!(denied_udp.received(QUIET).is_empty());
    assert_ok(&agent.op(&format!("tcp {}", allowed.addr)));
    assert_eq!(
        allowed.accepted(QUIET).len(),
        1,
        "allowed path must keep working"
    );

    env.start_daemon();
    let after: Vec<Vec<u32>> = ATTACH_TYPES.iter().map(|t| attached(&cgroup, *t)).collect();
    assert_eq!(
        before, after,
        "restart must re-adopt the same attachments, not add more"
    );
    assert!(
        env.daemon_log().contains("adopted=1"),
        "{}",
        env.daemon_log()
    );
    assert_eperm(&agent.op(&format!("tcp {}", denied.addr)));
    assert!(denied.accepted(QUIET).is_empty());

    // A clean stop keeps enforcement too.
    env.stop_daemon();
    assert_eperm(&agent.op(&format!("tcp {}", denied.addr)));
    assert!(denied.accepted(QUIET).is_empty());
}

#[test]
fn teardown_refuses_live_agents_unless_forced() {
    if !require_root("teardown_refuses_live_agents_unless_forced") {
        return;
    }
    let mut env = TestEnv::new("teardown");
    env.write_config("[[agent]]\nname = \"busy\"\nowner = \"test@example.com\"\n");
    env.start_daemon();
    let cgroup = env.agent_cgroup("busy");
    let agent = ProbeProcess::spawn();
    agent.join(&cgroup);
    let config = env.config.to_str().unwrap().to_owned();

    // Not while the daemon runs.
    let out = env.agentd(&["teardown", "--config", &config]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running"),
        "{out:?}"
    );
    env.stop_daemon();

    // Not while an agent process lives.
    let out = env.agentd(&["teardown", "--config", &config]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&agent.pid.to_string()),
        "{out:?}"
    );
    assert!(
        env.bpffs_dir.exists() && cgroup.exists(),
        "refused teardown removed something"
    );

    let out = env.agentd(&["teardown", "--force", "--config", &config]);
    assert!(out.status.success(), "{out:?}");
    assert!(!env.bpffs_dir.exists(), "pins left behind");
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(
        !Path::new(&format!("/proc/{}", agent.pid))
            .join("cgroup")
            .exists()
            || {
                // The process was killed; its /proc entry may linger as a zombie until reaped.
                fs::read_to_string(format!("/proc/{}/stat", agent.pid))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
            }
    );
}

#[test]
fn restart_with_changed_config_switches_rules_and_contains_removed_agents() {
    if !require_root("restart_with_changed_config_switches_rules_and_contains_removed_agents") {
        return;
    }
    let first = TcpSink::bind("127.0.0.1:0");
    let second = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("restart_changed");
    let agents = |keep: u16, with_old: bool| {
        let mut s = format!(
            "[[agent]]\nname = \"kept\"\nowner = \"t@example.com\"\nallow = [ {{ cidr = \"127.0.0.1/32\", ports = [{keep}], protocol = \"tcp\" }} ]\n"
        );
        if with_old {
            s.push_str(&format!(
                "\n[[agent]]\nname = \"retired\"\nowner = \"t@example.com\"\nallow = [ {{ cidr = \"127.0.0.1/32\", ports = [{}], protocol = \"tcp\" }} ]\n",
                first.port()
            ));
        }
        s
    };
    env.write_config(&agents(first.port(), true));
    env.start_daemon();
    let mut kept = ProbeProcess::spawn();
    kept.join(&env.agent_cgroup("kept"));
    let mut retired = ProbeProcess::spawn();
    retired.join(&env.agent_cgroup("retired"));
    assert_ok(&kept.op(&format!("tcp {}", first.addr)));
    assert_ok(&retired.op(&format!("tcp {}", first.addr)));
    assert_eq!(first.accepted(QUIET).len(), 2);

    // New rules for "kept", "retired" gone from the config.
    env.stop_daemon();
    env.write_config(&agents(second.port(), false));
    env.start_daemon();

    assert_eperm(&kept.op(&format!("tcp {}", first.addr)));
    assert_ok(&kept.op(&format!("tcp {}", second.addr)));
    // A removed agent that still has processes keeps no access at all.
    assert_eperm(&retired.op(&format!("tcp {}", first.addr)));
    assert_eperm(&retired.op(&format!("tcp {}", second.addr)));
    assert!(first.accepted(QUIET).is_empty());
    assert_eq!(second.accepted(QUIET).len(), 1);
    assert!(
        env.daemon_log()
            .contains("kept contained with no network access"),
        "{}",
        env.daemon_log()
    );

    // Once its processes are gone, a restart releases it.
    drop(retired);
    env.stop_daemon();
    env.start_daemon();
    assert!(
        !env.agent_cgroup("retired").exists(),
        "empty removed agent not released"
    );
    assert!(!env.bpffs_dir.join("links/retired").exists());
}

#[test]
fn a_second_daemon_on_the_same_state_is_refused() {
    if !require_root("a_second_daemon_on_the_same_state_is_refused") {
        return;
    }
    let mut env = TestEnv::new("second_daemon");
    env.write_config("[[agent]]\nname = \"one\"\nowner = \"o@example.com\"\n");
    env.start_daemon();
    let out = std::process::Command::new(agentd_bin())
        .args(["daemon", "--config", env.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another agentd daemon"),
        "{out:?}"
    );
    // The first one still serves, and SIGHUP does not kill it.
    let pid = env.daemon_pid().expect("daemon running");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        env.agentd(&["list"]).status.success(),
        "daemon died: {}",
        env.daemon_log()
    );
}
