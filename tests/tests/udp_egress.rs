//! UDP from inside an agent: unconnected sends, connected sockets used with
//! an explicit destination, sendmmsg batches and protocol-specific rules.
use agentd_tests::*;

fn config(env: &TestEnv, rules: &str) {
    env.write_config(&format!(
        "[[agent]]\nname = \"udp\"\nowner = \"test@example.com\"\nallow = [ {rules} ]\n"
    ));
}

#[test]
fn udp_sendto_allowed_and_denied_address() {
    if !require_root("udp_sendto_allowed_and_denied_address") {
        return;
    }
    let allowed = UdpSink::bind("127.0.0.1:0");
    let denied = UdpSink::bind("127.0.0.1:0");
    let allowed6 = UdpSink::bind("[::1]:0");
    let denied6 = UdpSink::bind("[::1]:0");
    let mut env = TestEnv::new("udp_sendto");
    config(
        &env,
        &format!(
            r#"{{ cidr = "127.0.0.1/32", ports = [{}], protocol = "udp" }}, {{ cidr = "::1/128", ports = [{}], protocol = "udp" }}"#,
            allowed.port(),
            allowed6.port()
        ),
    );
    env.start_daemon();

    assert_ok(&env.probe("udp", &["udp", &allowed.addr.to_string()]));
    assert_eq!(allowed.received(QUIET), vec![b"probe".to_vec()]);
    assert_eperm(&env.probe("udp", &["udp", &denied.addr.to_string()]));
    assert!(denied.received(QUIET).is_empty());

    // IPv4-mapped IPv6 from an IPv6 socket is judged by the IPv4 rules.
    let mapped = |p: u16| format!("[::ffff:127.0.0.1]:{p}");
    assert_ok(&env.probe("udp", &["udp", &mapped(allowed.port())]));
    assert_eq!(allowed.received(QUIET).len(), 1);
    assert_eperm(&env.probe("udp", &["udp", &mapped(denied.port())]));
    assert!(denied.received(QUIET).is_empty());

    assert_ok(&env.probe("udp", &["udp", &allowed6.addr.to_string()]));
    assert_eq!(allowed6.received(QUIET).len(), 1);
    assert_eperm(&env.probe("udp", &["udp", &denied6.addr.to_string()]));
    assert!(denied6.received(QUIET).is_empty());
}

#[test]
fn udp_connected_then_sendto_denied() {
    if !require_root("udp_connected_then_sendto_denied") {
        return;
    }
    let allowed = UdpSink::bind("127.0.0.1:0");
    let denied = UdpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("udp_connected");
    config(
        &env,
        &format!(
            r#"{{ cidr = "127.0.0.1/32", ports = [{}], protocol = "udp" }}"#,
            allowed.port()
        ),
    );
    env.start_daemon();

    // A socket connected to an allowed address must not become a way to
    // send anywhere with an explicit destination.
    let v = env.probe(
        "udp",
        &[
            "udpconn",
            &allowed.addr.to_string(),
            &denied.addr.to_string(),
        ],
    );
    assert_ok(&v["connect"]);
    assert_eperm(&v["sendto"]);
    assert_eq!(allowed.received(QUIET), vec![b"connected".to_vec()]);
    assert!(
        denied.received(QUIET).is_empty(),
        "sendto on a connected socket escaped"
    );

    // Connecting the UDP socket to a denied address is refused outright.
    let v = env.probe(
        "udp",
        &[
            "udpconn",
            &denied.addr.to_string(),
            &denied.addr.to_string(),
        ],
    );
    assert_eperm(&v["connect"]);
    assert!(denied.received(QUIET).is_empty());
}

#[test]
fn sendmmsg_mixing_allowed_and_denied() {
    if !require_root("sendmmsg_mixing_allowed_and_denied") {
        return;
    }
    let allowed = UdpSink::bind("127.0.0.1:0");
    let denied = UdpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("sendmmsg");
    config(
        &env,
        &format!(
            r#"{{ cidr = "127.0.0.1/32", ports = [{}], protocol = "udp" }}"#,
            allowed.port()
        ),
    );
    env.start_daemon();

    // Each message of the batch is judged: the first reaches the allowed
    // sink, the batch stops at the denied one, nothing reaches the denied sink.
    let a = allowed.addr.to_string();
    let d = denied.addr.to_string();
    let v = env.probe("udp", &["sendmmsg", &a, &d, &a]);
    assert_eq!(v["sent"], 1, "{v}");
    assert_eq!(allowed.received(QUIET), vec![b"mmsg0".to_vec()]);
    assert!(denied.received(QUIET).is_empty());

    // A batch that starts with a denied message fails with EPERM.
    let v = env.probe("udp", &["sendmmsg", &d, &a]);
    assert_eperm(&v);
    assert!(denied.received(QUIET).is_empty());
    assert!(allowed.received(QUIET).is_empty());
}

#[test]
fn tcp_only_rule_refuses_udp() {
    if !require_root("tcp_only_rule_refuses_udp") {
        return;
    }
    let tcp = TcpSink::bind("127.0.0.1:0");
    // Same port number for UDP on the same address.
    let udp = UdpSink::bind(&tcp.addr.to_string());
    let mut env = TestEnv::new("tcp_only");
    config(
        &env,
        &format!(
            r#"{{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }}"#,
            tcp.port()
        ),
    );
    env.start_daemon();

    assert_ok(&env.probe("udp", &["tcp", &tcp.addr.to_string()]));
    assert_eq!(tcp.accepted(QUIET).len(), 1);
    assert_eperm(&env.probe("udp", &["udp", &udp.addr.to_string()]));
    assert!(udp.received(QUIET).is_empty());
}
