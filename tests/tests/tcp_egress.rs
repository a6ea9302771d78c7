//! TCP connects from inside an agent: allowed endpoints work, everything
//! else fails with EPERM and the listener sees nothing.
use agentd_tests::*;

#[test]
fn tcp_ipv4_allowed_and_denied() {
    if !require_root("tcp_ipv4_allowed_and_denied") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let other_port = TcpSink::bind("127.0.0.1:0");
    let other_addr = TcpSink::bind("127.0.0.2:0");
    let mut env = TestEnv::new("tcp_ipv4");
    env.write_config(&format!(
        r#"[[agent]]
name = "erp"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        allowed.port()
    ));
    env.start_daemon();

    assert_ok(&env.probe("erp", &["tcp", &allowed.addr.to_string()]));
    assert_eq!(allowed.accepted(QUIET), vec![b"probe".to_vec()]);

    let v = env.probe("erp", &["tcp", &other_port.addr.to_string()]);
    assert_eperm(&v);
    assert!(
        other_port.accepted(QUIET).is_empty(),
        "denied port reached the listener"
    );

    // Same port number on another loopback address: not covered by /32.
    let v = env.probe("erp", &["tcp", &format!("127.0.0.2:{}", allowed.port())]);
    assert_eperm(&v);
    let v = env.probe("erp", &["tcp", &other_addr.addr.to_string()]);
    assert_eperm(&v);
    assert!(
        other_addr.accepted(QUIET).is_empty(),
        "denied address reached the listener"
    );
}

#[test]
fn tcp_ipv6_allowed_and_denied() {
    if !require_root("tcp_ipv6_allowed_and_denied") {
        return;
    }
    let allowed = TcpSink::bind("[::1]:0");
    let denied = TcpSink::bind("[::1]:0");
    let mut env = TestEnv::new("tcp_ipv6");
    env.write_config(&format!(
        r#"[[agent]]
name = "crm"
owner = "test@example.com"
allow = [ {{ cidr = "::1/128", ports = [{}] }} ]
"#,
        allowed.port()
    ));
    env.start_daemon();

    assert_ok(&env.probe("crm", &["tcp", &allowed.addr.to_string()]));
    assert_eq!(allowed.accepted(QUIET).len(), 1);

    assert_eperm(&env.probe("crm", &["tcp", &denied.addr.to_string()]));
    assert!(denied.accepted(QUIET).is_empty());
}

#[test]
fn ipv4_mapped_ipv6_is_judged_by_ipv4_rules() {
    if !require_root("ipv4_mapped_ipv6_is_judged_by_ipv4_rules") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("mapped");
    // Only an IPv4 rule: the mapped form of the allowed address must pass,
    // the mapped form of anything else must not.
    env.write_config(&format!(
        r#"[[agent]]
name = "mapped"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        allowed.port()
    ));
    env.start_daemon();

    assert_ok(&env.probe(
        "mapped",
        &["tcp", &format!("[::ffff:127.0.0.1]:{}", allowed.port())],
    ));
    assert_eq!(allowed.accepted(QUIET).len(), 1);

    assert_eperm(&env.probe(
        "mapped",
        &["tcp", &format!("[::ffff:127.0.0.1]:{}", denied.port())],
    ));
    assert!(denied.accepted(QUIET).is_empty());
}

#[test]
fn tcp_fast_open_to_denied_address() {
    if !require_root("tcp_fast_open_to_denied_address") {
        return;
    }
    let allowed = TcpSink::bind("127.0.0.1:0");
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("tfo");
    env.write_config(&format!(
        r#"[[agent]]
name = "tfo"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}] }} ]
"#,
        allowed.port()
    ));
    env.start_daemon();

    // sendto(MSG_FASTOPEN) connects without connect(): it must be judged too.
    assert_eperm(&env.probe("tfo", &["tfo", &denied.addr.to_string()]));
    assert!(
        denied.accepted(QUIET).is_empty(),
        "fast open reached a denied listener"
    );

    assert_ok(&env.probe("tfo", &["tfo", &allowed.addr.to_string()]));
    assert_eq!(allowed.accepted(QUIET).len(), 1);
}

#[test]
fn port_ranges() {
    if !require_root("port_ranges") {
        return;
    }
    // Three listeners on consecutive ports, allow a range covering the first two.
    let sinks: Vec<TcpSink> = (0..200).map(|_| TcpSink::bind("127.0.0.1:0")).collect();
    let mut ports: Vec<u16> = sinks.iter().map(TcpSink::port).collect();
    ports.sort();
    let (lo, hi) = (ports[10], ports[20]);
    let mut env = TestEnv::new("ranges");
    env.write_config(&format!(
        r#"[[agent]]
name = "ranges"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.0/8", ports = ["{lo}-{hi}"], protocol = "tcp" }} ]
"#
    ));
    env.start_daemon();
    let sink = |p: u16| sinks.iter().find(|s| s.port() == p).unwrap();

    for p in [lo, ports[15], hi] {
        assert_ok(&env.probe("ranges", &["tcp", &format!("127.0.0.1:{p}")]));
        assert_eq!(sink(p).accepted(QUIET).len(), 1, "port {p} in range");
    }
    for p in [ports[9], ports[21], ports[199]] {
        assert_eperm(&env.probe("ranges", &["tcp", &format!("127.0.0.1:{p}")]));
        assert!(sink(p).accepted(QUIET).is_empty(), "port {p} outside range");
    }
}
