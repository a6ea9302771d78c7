//! Hostname rules: agents' DNS is steered in the kernel to agentd's
//! resolver, names their rules allow are answered and their addresses
//! allowed before the answer arrives, every other name is refused without
//! leaving the host. The agents run with a resolv.conf (in a private mount
//! namespace) naming an address where no DNS server listens, so only the
//! kernel's steering can make resolution work.
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use agentd_tests::{
    dns::{DnsServer, STUB, answers},
    *,
};
use serde_json::Value;

const NXDOMAIN: u64 = 3;
const REFUSED: u64 = 5;

/// The test's resolver files, for the probe's `ns` operation.
struct ResolverFiles {
    resolv: PathBuf,
    nsswitch: PathBuf,
}

impl ResolverFiles {
    fn write(env: &TestEnv) -> Self {
        let resolv = env.dir.join("resolv.conf");
        let nsswitch = env.dir.join("nsswitch.conf");
        fs::write(
            &resolv,
            "nameserver 127.0.0.153\noptions timeout:2 attempts:1\n",
        )
        .expect("resolv.conf");
        fs::write(&nsswitch, "hosts: dns\n").expect("nsswitch.conf");
        Self { resolv, nsswitch }
    }

    /// Runs a probe operation in `agent` with these files as its resolver.
    fn probe(&self, env: &TestEnv, agent: &str, op: &[&str]) -> Value {
        let mut args = vec![
            "ns",
            self.resolv.to_str().unwrap(),
            self.nsswitch.to_str().unwrap(),
        ];
        args.extend(op);
        env.probe(agent, &args)
    }
}

/// The audit record of an A query for `name`. glibc asks A and AAAA in
/// parallel, so which of the two is logged first varies from run to run.
fn dns_record(env: &TestEnv, name: &str, verdict: &str) -> Value {
    env.wait_audit(&format!("dns {name} A {verdict}"), |v| {
        v["event"] == "dns" && v["name"] == name && v["qtype"] == "A" && v["verdict"] == verdict
    })
}

#[test]
fn allowed_names_resolve_and_connect_others_are_refused() {
    if !require_root("allowed_names_resolve_and_connect_others_are_refused") {
        return;
    }
    let crm = TcpSink::bind("127.0.0.20:0");
    let crm_other_port = TcpSink::bind("127.0.0.20:0");
    let api = TcpSink::bind("127.0.0.21:0");
    let cdn = TcpSink::bind("127.0.0.22:0");
    let evil = TcpSink::bind("127.0.0.66:0");
    let upstream = DnsServer::start(
        "127.0.0.1",
        &[
            ("crm.test", 300, "127.0.0.20"),
            ("api.erp.test", 300, "127.0.0.21"),
            ("erp.test", 300, "127.0.0.21"),
            ("evil.test", 300, "127.0.0.66"),
            ("alias.crm.test", 300, "CNAME edge.cdn.test"),
            ("edge.cdn.test", 300, "127.0.0.22"),
        ],
    );
    let mut env = TestEnv::new("dns_allowed");
    let files = ResolverFiles::write(&env);
    env.write_config(&format!(
        r#"[dns]
upstream = ["{}"]

[[agent]]
name = "erp"
owner = "test@example.com"
allow = [
  {{ host = "crm.test", ports = [{}], protocol = "tcp" }},
  {{ host = "*.erp.test", ports = [{}] }},
  {{ host = "alias.crm.test", ports = [{}] }},
]
"#,
        upstream.addr,
        crm.port(),
        api.port(),
        cdn.port()
    ));
    env.start_daemon();

    // An allowed name's address is not reachable before it is resolved.
    assert_eperm(&env.probe("erp", &["tcp", &crm.addr.to_string()]));
    assert!(crm.accepted(QUIET).is_empty(), "reached before resolving");

    // glibc's resolver (getaddrinfo), then at once a connect: allowed.
    let v = files.probe(
        &env,
        "erp",
        &["resolve-tcp", "crm.test", &crm.port().to_string()],
    );
    assert_ok(&v);
    assert_eq!(v["addr"], crm.addr.to_string());
    assert_eq!(crm.accepted(QUIET), vec![b"probe".to_vec()]);
    let rec = dns_record(&env, "crm.test", "allow");
    assert!(answers(&rec).contains(&"127.0.0.20".to_owned()), "{rec}");
    assert!(
        rec["rule"]
            .as_str()
            .unwrap_or("")
            .contains("host crm.test tcp")
    );
    // The connect carries the name it was learned from.
    let conn = env.wait_audit("connect to crm.test", |v| {
        v["event"] == "connect" && v["dst_ip"] == "127.0.0.20" && v["verdict"] == "allow"
    });
    assert_eq!(conn["host"], "crm.test", "{conn}");
    assert_eq!(conn["reason"], "host_rule", "{conn}");
    // Only the rule's port and protocol.
    assert_eperm(&env.probe("erp", &["tcp", &crm_other_port.addr.to_string()]));
    assert!(crm_other_port.accepted(QUIET).is_empty());

    // A name no rule allows: the configured refusal, and the upstream
    // never sees it.
    let v = files.probe(&env, "erp", &["dns", STUB, "evil.test", "A", "udp"]);
    assert_eq!(v["rcode"], NXDOMAIN, "{v}");
    assert!(answers(&v).is_empty());
    let v = files.probe(&env, "erp", &["resolve", "evil.test"]);
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        !upstream.was_asked("evil.test"),
        "refused name reached upstream"
    );
    let rec = dns_record(&env, "evil.test", "deny");
    assert_eq!(rec["agent"], "erp");
    assert_eq!(rec["rcode"], "NXDOMAIN", "{rec}");
    // Responders see it where they look for refusals.
    let out = env.agentd(&["events", "--agent", "erp", "--verdict", "deny"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("DENY") && l.contains(" dns ") && l.contains("evil.test")),
        "{text}"
    );
    assert_eperm(&env.probe("erp", &["tcp", &evil.addr.to_string()]));
    assert!(evil.accepted(QUIET).is_empty());

    // Wildcards: any name below, never the domain itself.
    let v = files.probe(
        &env,
        "erp",
        &["resolve-tcp", "api.erp.test", &api.port().to_string()],
    );
    assert_ok(&v);
    assert_eq!(api.accepted(QUIET).len(), 1);
    let v = files.probe(&env, "erp", &["dns", STUB, "erp.test", "A", "udp"]);
    assert_eq!(v["rcode"], NXDOMAIN, "{v}");
    assert!(!upstream.was_asked("erp.test"));

    // The reply comes from the server the agent asked: source address of a
    // connected and of an unconnected socket, and getpeername.
    for how in ["udp", "udp-unconnected"] {
        let v = files.probe(&env, "erp", &["dns", STUB, "crm.test", "A", how]);
        assert_eq!(answers(&v), vec!["127.0.0.20"], "{how}: {v}");
        assert_eq!(v["from"], STUB, "{how}: {v}");
    }
    let v = files.probe(&env, "erp", &["dns", STUB, "crm.test", "A", "udp"]);
    assert_eq!(v["peer"], STUB, "{v}");

    // DNS over TCP: steered too, peer shown as the server asked.
    let v = files.probe(&env, "erp", &["dns", STUB, "crm.test", "A", "tcp"]);
    assert_eq!(answers(&v), vec!["127.0.0.20"], "{v}");
    assert_eq!(v["peer"], STUB, "{v}");
    assert!(upstream.asked().contains(&("crm.test".to_owned(), "tcp")));

    // A CNAME chain: the allowed name's target is asked for by agentd and
    // its address allowed; the agent never needs the target's name.
    let v = files.probe(
        &env,
        "erp",
        &["resolve-tcp", "alias.crm.test", &cdn.port().to_string()],
    );
    assert_ok(&v);
    assert_eq!(cdn.accepted(QUIET).len(), 1);
    assert!(upstream.was_asked("edge.cdn.test"));
}

#[test]
fn learned_addresses_expire_with_their_ttl() {
    if !require_root("learned_addresses_expire_with_their_ttl") {
        return;
    }
    let short = TcpSink::bind("127.0.0.24:0");
    let upstream = DnsServer::start(
        "127.0.0.1",
        &[
            ("short.test", 1, "127.0.0.24"),
            ("long.test", 86_400, "127.0.0.25"),
        ],
    );
    let mut env = TestEnv::new("dns_ttl");
    env.write_config(&format!(
        r#"[dns]
upstream = ["{}"]
min_ttl = "1s"
max_ttl = "2s"

[[agent]]
name = "erp"
owner = "test@example.com"
allow = [ {{ host = "short.test" }}, {{ host = "long.test" }} ]
"#,
        upstream.addr
    ));
    env.start_daemon();

    // Answers never promise more than max_ttl: an agent must not cache an
    // address past the time it stays allowed.
    let v = env.probe("erp", &["dns", STUB, "long.test", "A", "udp"]);
    assert_eq!(answers(&v), vec!["127.0.0.25"], "{v}");
    assert!(
        v["ttls"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_u64() <= Some(2)),
        "TTL not clamped: {v}"
    );

    let mut agent = ProbeProcess::exec(&env, "erp");
    let v = agent.op(&format!("dns {STUB} short.test A udp"));
    assert_eq!(answers(&v), vec!["127.0.0.24"], "{v}");
    let resolved = Instant::now();
    assert_ok(&agent.op(&format!("open {}", short.addr)));
    let mut held = short
        .accept_one(Duration::from_secs(2))
        .expect("connection");

    // Within a few seconds of the TTL (1s) the address is no longer allowed.
    let deadline = resolved + Duration::from_secs(6);
    let denied_after = loop {
        let v = agent.op(&format!("tcp {}", short.addr));
        if v["errno"] == EPERM {
            break resolved.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "still allowed 6s after a 1s TTL: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        denied_after >= Duration::from_millis(900),
        "denied before the TTL ran out ({denied_after:?})"
    );
    // Connects that succeeded while it was allowed reached the sink; drain
    // them, then nothing more arrives.
    let _ = short.accepted(QUIET);
    assert_eperm(&agent.op(&format!("tcp {}", short.addr)));
    assert!(short.accepted(QUIET).is_empty(), "reached after expiry");

    // The established connection is not cut.
    assert_ok(&agent.op("write still-here"));
    assert_eq!(read_for(&mut held, QUIET), b"still-here");
}

#[test]
fn two_agents_asking_the_same_names_get_their_own_answers() {
    if !require_root("two_agents_asking_the_same_names_get_their_own_answers") {
        return;
    }
    let crm = TcpSink::bind("127.0.0.20:0");
    let evil = TcpSink::bind("127.0.0.66:0");
    let upstream = DnsServer::start(
        "127.0.0.1",
        &[
            ("crm.test", 300, "127.0.0.20"),
            ("evil.test", 300, "127.0.0.66"),
        ],
    );
    let mut env = TestEnv::new("dns_two");
    let files = ResolverFiles::write(&env);
    env.write_config(&format!(
        r#"[dns]
upstream = ["{}"]
refuse_with = "refused"

[[agent]]
name = "crm-bot"
owner = "test@example.com"
allow = [ {{ host = "crm.test", ports = [{}] }} ]

[[agent]]
name = "other-bot"
owner = "test@example.com"
allow = [ {{ host = "evil.test", ports = [{}] }} ]
"#,
        upstream.addr,
        crm.port(),
        evil.port()
    ));
    env.start_daemon();

    // other-bot may not resolve crm.test: refused as configured, unasked.
    let v = files.probe(&env, "other-bot", &["dns", STUB, "crm.test", "A", "udp"]);
    assert_eq!(v["rcode"], REFUSED, "{v}");
    assert!(!upstream.was_asked("crm.test"));

    let v = files.probe(
        &env,
        "crm-bot",
        &["resolve-tcp", "crm.test", &crm.port().to_string()],
    );
    assert_ok(&v);
    assert_eq!(crm.accepted(QUIET).len(), 1);
    // What crm-bot learned is crm-bot's alone.
    assert_eperm(&env.probe("other-bot", &["tcp", &crm.addr.to_string()]));
    let v = files.probe(
        &env,
        "other-bot",
        &["resolve-tcp", "crm.test", &crm.port().to_string()],
    );
    assert_eq!(v["ok"], false, "{v}");
    assert!(crm.accepted(QUIET).is_empty(), "other-bot reached crm.test");

    let v = files.probe(
        &env,
        "other-bot",
        &["resolve-tcp", "evil.test", &evil.port().to_string()],
    );
    assert_ok(&v);
    assert_eq!(evil.accepted(QUIET).len(), 1);
    assert_eperm(&env.probe("crm-bot", &["tcp", &evil.addr.to_string()]));
    let v = files.probe(&env, "crm-bot", &["dns", STUB, "evil.test", "A", "tcp"]);
    assert_eq!(v["rcode"], REFUSED, "{v}");
    assert!(evil.accepted(QUIET).is_empty(), "crm-bot reached evil.test");
    let rec = dns_record(&env, "evil.test", "deny");
    assert_eq!(rec["agent"], "crm-bot", "{rec}");
}

#[test]
fn agents_without_hostname_rules_get_no_dns_unless_their_rules_allow_it() {
    if !require_root("agents_without_hostname_rules_get_no_dns_unless_their_rules_allow_it") {
        return;
    }
    let upstream = DnsServer::start("127.0.0.1", &[("crm.test", 300, "127.0.0.20")]);
    let mut env = TestEnv::new("dns_none");
    env.write_config(&format!(
        r#"[dns]
upstream = ["{0}"]

[[agent]]
name = "plain"
owner = "test@example.com"
allow = [ {{ cidr = "127.0.0.20/32" }} ]

[[agent]]
name = "direct"
owner = "test@example.com"
allow = [ {{ cidr = "{1}/32", ports = [{2}], protocol = "udp" }} ]
"#,
        upstream.addr,
        upstream.addr.ip(),
        upstream.addr.port()
    ));
    env.start_daemon();

    // Not steered: judged by its rules like any other traffic, and denied.
    for how in ["udp", "udp-unconnected", "tcp"] {
        assert_eperm(&env.probe("plain", &["dns", STUB, "crm.test", "A", how]));
    }
    // Its rules allow a resolver: it asks it directly.
    let v = env.probe(
        "direct",
        &["dns", &upstream.addr.to_string(), "crm.test", "A", "udp"],
    );
    assert_eq!(answers(&v), vec!["127.0.0.20"], "{v}");
    assert_eq!(upstream.asked(), vec![("crm.test".to_owned(), "udp")]);
    assert!(
        !env.audit().iter().any(|v| v["event"] == "dns"),
        "agentd's resolver answered an agent without hostname rules"
    );
}

#[test]
fn reload_that_drops_a_hostname_rule_revokes_what_it_taught() {
    if !require_root("reload_that_drops_a_hostname_rule_revokes_what_it_taught") {
        return;
    }
    let crm = TcpSink::bind("127.0.0.20:0");
    let api = TcpSink::bind("127.0.0.21:0");
    let upstream = DnsServer::start(
        "127.0.0.1",
        &[
            ("crm.test", 300, "127.0.0.20"),
            ("api.test", 300, "127.0.0.21"),
        ],
    );
    let mut env = TestEnv::new("dns_reload");
    let config = |hosts: &str| {
        format!(
            "[dns]\nupstream = [\"{}\"]\n\n[[agent]]\nname = \"erp\"\nowner = \"t@example.com\"\nallow = [ {hosts} ]\n",
            upstream.addr
        )
    };
    env.write_config(&config(r#"{ host = "crm.test" }, { host = "api.test" }"#));
    env.start_daemon();
    for name in ["crm.test", "api.test"] {
        let v = env.probe("erp", &["dns", STUB, name, "A", "udp"]);
        assert_eq!(answers(&v).len(), 1, "{v}");
    }
    assert_ok(&env.probe("erp", &["tcp", &crm.addr.to_string()]));
    assert_ok(&env.probe("erp", &["tcp", &api.addr.to_string()]));
    assert_eq!(crm.accepted(QUIET).len() + api.accepted(QUIET).len(), 2);

    // crm.test's rule goes: its address with it, at the switch; api.test's
    // address (its rule unchanged) stays without asking again.
    env.write_config(&config(r#"{ host = "api.test" }"#));
    let out = env.agentd(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert_eperm(&env.probe("erp", &["tcp", &crm.addr.to_string()]));
    assert!(crm.accepted(QUIET).is_empty());
    assert_ok(&env.probe("erp", &["tcp", &api.addr.to_string()]));
    assert_eq!(api.accepted(QUIET).len(), 1);
    let v = env.probe("erp", &["dns", STUB, "crm.test", "A", "udp"]);
    assert_eq!(v["rcode"], NXDOMAIN, "{v}");
}

#[test]
fn ipv6_and_ipv4_mapped_servers_are_steered_too() {
    if !require_root("ipv6_and_ipv4_mapped_servers_are_steered_too") {
        return;
    }
    let sink = TcpSink::bind("[::1]:0");
    let upstream = DnsServer::start("127.0.0.1", &[("v6.test", 300, "::1")]);
    let mut env = TestEnv::new("dns_v6");
    env.write_config(&format!(
        r#"[dns]
upstream = ["{}"]

[[agent]]
name = "erp"
owner = "test@example.com"
allow = [ {{ host = "v6.test", ports = [{}], protocol = "tcp" }} ]
"#,
        upstream.addr,
        sink.port()
    ));
    env.start_daemon();

    assert_eperm(&env.probe("erp", &["tcp", &sink.addr.to_string()]));
    for server in ["[::1]:53", "[::ffff:127.0.0.153]:53"] {
        for how in ["udp", "udp-unconnected", "tcp"] {
            let v = env.probe("erp", &["dns", server, "v6.test", "AAAA", how]);
            assert_eq!(answers(&v), vec!["::1"], "{server} {how}: {v}");
            let seen = if how == "tcp" { &v["peer"] } else { &v["from"] };
            assert_eq!(seen, server, "{server} {how}: {v}");
        }
    }
    assert_ok(&env.probe("erp", &["tcp", &sink.addr.to_string()]));
    assert_eq!(sink.accepted(QUIET), vec![b"probe".to_vec()]);
}
