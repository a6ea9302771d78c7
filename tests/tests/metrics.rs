//! `/metrics` on the real kernel: decision counters compared exactly with
//! known traffic, the kill switch's gauge, counters and histogram, the
//! health gauge dropping when a program is detached behind agentd's back,
//! and no endpoint at all with `metrics_listen = ""`.
use std::{fs, os::fd::AsRawFd as _, path::Path};

use agentd_tests::{scrape::*, *};

const QUIET_MS: u64 = 300;

fn quiet() -> std::time::Duration {
    std::time::Duration::from_millis(QUIET_MS)
}

/// Starts a daemon serving metrics on a free loopback port.
fn env_with_metrics(test: &str, agents: &str) -> (TestEnv, String) {
    let mut env = TestEnv::new(test);
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    env.metrics_listen = addr.clone();
    env.write_config(agents);
    env.start_daemon();
    (env, addr)
}

fn connections(s: &Scrape, agent: &str, verdict: &str, protocol: &str) -> f64 {
    s.value(
        "agentd_connections_total",
        &[
            ("agent", agent),
            ("verdict", verdict),
            ("protocol", protocol),
        ],
    )
    .unwrap_or_else(|| panic!("no connections_total for {agent} {verdict} {protocol}"))
}

#[test]
fn counts_match_known_traffic_exactly() {
    if !require_root("counts_match_known_traffic_exactly") {
        return;
    }
    let open = TcpSink::bind("127.0.0.1:0");
    let closed = TcpSink::bind("127.0.0.1:0");
    let udp_open = UdpSink::bind("127.0.0.1:0");
    let udp_closed = UdpSink::bind("127.0.0.1:0");
    let watched = TcpSink::bind("127.0.0.1:0");
    let (env, addr) = env_with_metrics(
        "metrics_counts",
        &format!(
            r#"[[agent]]
name = "crm"
owner = "crm-team"
allow = [
  {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }},
  {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "udp" }},
]

[[agent]]
name = "erp"
owner = "erp-team"
mode = "audit"
allow = []
"#,
            open.port(),
            udp_open.port()
        ),
    );
    // Before any traffic every series exists at zero.
    let before = Scrape::get(&addr);
    for verdict in ["allowed", "denied", "audited"] {
        for protocol in ["tcp", "udp"] {
            assert_eq!(connections(&before, "crm", verdict, protocol), 0.0);
        }
    }
    assert_eq!(
        before.value("agentd_policy_rules", &[("agent", "crm")]),
        Some(2.0)
    );
    assert_eq!(
        before.value("agentd_policy_rules", &[("agent", "erp")]),
        Some(0.0)
    );

    let mut crm = ProbeProcess::exec(&env, "crm");
    for _ in 0..3 {
        assert_ok(&crm.op(&format!("tcp 127.0.0.1:{}", open.port())));
    }
    for _ in 0..2 {
        assert_eperm(&crm.op(&format!("tcp 127.0.0.1:{}", closed.port())));
    }
    for _ in 0..4 {
        assert_ok(&crm.op(&format!("udp 127.0.0.1:{}", udp_open.port())));
    }
    assert_eperm(&crm.op(&format!("udp 127.0.0.1:{}", udp_closed.port())));
    let mut erp = ProbeProcess::exec(&env, "erp");
    for _ in 0..5 {
        assert_ok(&erp.op(&format!("tcp 127.0.0.1:{}", watched.port())));
    }
    assert_eq!(open.accepted(quiet()).len(), 3);
    assert!(
        closed.accepted(quiet()).is_empty(),
        "a denied connect got through"
    );
    assert_eq!(udp_open.received(quiet()).len(), 4);
    assert!(
        udp_closed.received(quiet()).is_empty(),
        "a denied datagram got through"
    );
    assert_eq!(
        watched.accepted(quiet()).len(),
        5,
        "audit mode lets traffic through"
    );

    let s = Scrape::get(&addr);
    assert_eq!(connections(&s, "crm", "allowed", "tcp"), 3.0);
    assert_eq!(connections(&s, "crm", "denied", "tcp"), 2.0);
    assert_eq!(connections(&s, "crm", "allowed", "udp"), 4.0);
    assert_eq!(connections(&s, "crm", "denied", "udp"), 1.0);
    assert_eq!(connections(&s, "crm", "audited", "tcp"), 0.0);
    assert_eq!(connections(&s, "erp", "audited", "tcp"), 5.0);
    assert_eq!(connections(&s, "erp", "denied", "tcp"), 0.0);
    assert_eq!(
        s.value("agentd_agent_processes", &[("agent", "crm")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("agentd_agent_processes", &[("agent", "erp")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("agentd_enforcement_healthy", &[("agent", "crm")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("agentd_agent_killed", &[("agent", "crm")]),
        Some(0.0)
    );
    assert_eq!(s.value("agentd_events_lost_total", &[]), Some(0.0));
    assert_eq!(
        s.value(
            "agentd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // Labels are agent names and fixed words only: no address, port or pid.
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            assert!(
                !v.contains("127.0.0.1") && !v.contains(&open.port().to_string()),
                "{}: label {k}={v} carries an address or port",
                sample.metric
            );
        }
    }
    // The control requests this test made are counted too.
    let listed = s
        .value(
            "agentd_control_requests_total",
            &[("action", "exec"), ("result", "ok")],
        )
        .unwrap_or(0.0);
    assert_eq!(listed, 2.0, "two exec requests");
}

#[test]
fn kill_and_restore_show_in_gauge_counters_and_histogram() {
    if !require_root("kill_and_restore_show_in_gauge_counters_and_histogram") {
        return;
    }
    let sink = TcpSink::bind("127.0.0.1:0");
    let (env, addr) = env_with_metrics(
        "metrics_kill",
        &format!(
            r#"[[agent]]
name = "crm"
owner = "crm-team"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
            sink.port()
        ),
    );
    let mut probe = ProbeProcess::exec(&env, "crm");
    assert_ok(&probe.op(&format!("open 127.0.0.1:{}", sink.port())));
    let kill = |args: &[&str]| {
        let out = env.agentd(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    kill(&["kill", "crm", "--reason", "metrics test"]);
    let s = Scrape::get(&addr);
    assert_eq!(
        s.value("agentd_agent_killed", &[("agent", "crm")]),
        Some(1.0)
    );
    let killed = |s: &Scrape, action: &str| {
        s.value(
            "agentd_kill_switch_actions_total",
            &[("agent", "crm"), ("action", action)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(killed(&s, "kill"), 1.0);
    assert_eq!(killed(&s, "restore"), 0.0);
    assert_eq!(
        s.value("agentd_kill_duration_seconds_count", &[]),
        Some(1.0)
    );
    let took = s.value("agentd_kill_duration_seconds_sum", &[]).unwrap();
    assert!(took > 0.0 && took < 5.0, "kill took {took} s");
    // A second kill changes nothing and is not counted as an action.
    kill(&["kill", "crm", "--reason", "again"]);
    kill(&["restore", "crm", "--reason", "cleared"]);
    let s = Scrape::get(&addr);
    assert_eq!(
        s.value("agentd_agent_killed", &[("agent", "crm")]),
        Some(0.0)
    );
    assert_eq!(killed(&s, "kill"), 1.0);
    assert_eq!(killed(&s, "restore"), 1.0);
    assert_eq!(
        s.value("agentd_kill_duration_seconds_count", &[]),
        Some(1.0)
    );
    drop(probe);
}

/// The bpf(2) syscall with `attr` as the leading part of `union bpf_attr`.
///
/// # Safety
/// `attr` must be laid out as the kernel expects for `cmd`, and any pointer
/// in it valid for the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> libc::c_long {
    // SAFETY: upheld by the caller.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
}

/// BPF_LINK_DETACH on a pinned link: what an attacker with root (or a
/// careless tool) could do. The link stays pinned; the program is gone
/// from the cgroup.
fn detach_link(pin: &Path) {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkDetachAttr {
        link_fd: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes()).expect("pin path");
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: get is the leading part of bpf_attr that BPF_OBJ_GET reads;
    // pathname points at a NUL-terminated string alive across the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just returned this fd to us; OwnedFd closes it.
    let link = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: attr is the leading part of bpf_attr BPF_LINK_DETACH reads.
    let rc = unsafe { bpf(BPF_LINK_DETACH, &mut attr) };
    assert_eq!(
        rc,
        0,
        "BPF_LINK_DETACH: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn health_drops_when_a_program_is_detached_behind_agentds_back() {
    if !require_root("health_drops_when_a_program_is_detached_behind_agentds_back") {
        return;
    }
    let (env, addr) = env_with_metrics(
        "metrics_health",
        r#"[[agent]]
name = "crm"
owner = "crm-team"
allow = []

[[agent]]
name = "erp"
owner = "erp-team"
allow = []
"#,
    );
    let s = Scrape::get(&addr);
    assert_eq!(
        s.value("agentd_enforcement_healthy", &[("agent", "crm")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("agentd_enforcement_healthy", &[("agent", "erp")]),
        Some(1.0)
    );
    let pin = agentd::bpffs::agent_links_dir(&env.bpffs_dir, "crm").join("agentd_connect4");
    detach_link(&pin);
    let s = Scrape::get(&addr);
    assert_eq!(
        s.value("agentd_enforcement_healthy", &[("agent", "crm")]),
        Some(0.0),
        "health still 1 with connect4 detached"
    );
    assert_eq!(
        s.value("agentd_enforcement_healthy", &[("agent", "erp")]),
        Some(1.0)
    );
}

/// TCP sockets the process listens on (socket inodes of its fds that
/// /proc/net/tcp{,6} lists in state LISTEN).
fn listening_tcp(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .flatten()
    {
        if let Ok(target) = fs::read_link(fd.path()) {
            let t = target.to_string_lossy().into_owned();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(f[1].to_owned());
            }
        }
    }
    out
}

#[test]
fn empty_metrics_listen_serves_nothing() {
    if !require_root("empty_metrics_listen_serves_nothing") {
        return;
    }
    let mut env = TestEnv::new("metrics_off");
    assert!(env.metrics_listen.is_empty());
    env.write_config("[[agent]]\nname = \"crm\"\nowner = \"crm-team\"\nallow = []\n");
    env.start_daemon();
    let pid = env.daemon_pid().expect("daemon running");
    assert_eq!(
        listening_tcp(pid),
        Vec::<String>::new(),
        "the daemon listens on TCP"
    );
    // The same check sees the endpoint when it is configured.
    let (on, _addr) = env_with_metrics(
        "metrics_on",
        "[[agent]]\nname = \"crm\"\nowner = \"crm-team\"\nallow = []\n",
    );
    let pid = on.daemon_pid().expect("daemon running");
    assert_eq!(
        listening_tcp(pid).len(),
        1,
        "one listening socket: /metrics"
    );
}
