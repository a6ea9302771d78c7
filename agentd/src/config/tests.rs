use std::path::Path;

use super::*;

const DAEMON_DEFAULTS: &str = "";

fn parse(text: &str) -> Result<Config, Box<ConfigError>> {
    Config::parse(Path::new("/etc/agentd/agentd.toml"), text)
}

fn err(text: &str) -> ConfigError {
    *parse(text).expect_err("config should be refused")
}

#[test]
fn issue_example_parses_with_defaults() {
    let c = parse(
        r#"
[[agent]]
name = "crm-hygiene"
owner = "maria.lopez@example.com"
description = "Deduplicates CRM contacts"
mode = "enforce"
allow = [
  { cidr = "10.20.0.0/16", ports = [443, "8000-8100"], protocol = "tcp" },
  { cidr = "2001:db8::/32", ports = [443] },
  { cidr = "127.0.0.1/32", ports = [5432], protocol = "tcp" },
]
"#,
    )
    .unwrap();
    assert_eq!(c.daemon, DaemonConfig::default());
    assert_eq!(c.daemon.socket, Path::new("/run/agentd/agentd.sock"));
    assert_eq!(c.daemon.cgroup_root, "agentd");
    let a = &c.agents[0];
    assert_eq!(a.mode, Mode::Enforce);
    assert_eq!(a.allow.len(), 3);
    assert_eq!(
        a.allow[0].ports,
        Some(vec![
            PortRange {
                first: 443,
                last: 443
            },
            PortRange {
                first: 8000,
                last: 8100
            }
        ])
    );
    assert_eq!(a.allow[1].protocol, Protocol::Any);
    assert_eq!(a.allow[0].line, 8);
}

#[test]
fn missing_allow_and_ports_mean_nothing_and_everything() {
    let c = parse(
        "[[agent]]\nname = \"a\"\nowner = \"o\"\n\n[[agent]]\nname = \"b\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/8\" } ]\n",
    )
    .unwrap();
    assert!(c.agents[0].allow.is_empty());
    assert_eq!(c.agents[0].mode, Mode::Enforce);
    assert_eq!(c.agents[1].allow[0].ports, None);
}

#[test]
fn empty_file_is_valid_with_no_agents() {
    let c = parse(DAEMON_DEFAULTS).unwrap();
    assert!(c.agents.is_empty());
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = err("[daemon]\nsocket = \"/run/a.sock\"\nsokcet = \"/x\"\n");
    assert_eq!(e.line, 3, "{e}");
    assert_eq!(e.key, "sokcet");
    assert!(
        e.to_string().starts_with("/etc/agentd/agentd.toml:3:"),
        "{e}"
    );
}

#[test]
fn unknown_rule_key() {
    let e = err(
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/8\", port = 443 } ]\n",
    );
    assert_eq!(e.line, 4);
    assert_eq!(e.key, "port");
}

#[test]
fn bad_cidrs() {
    for (cidr, needle) in [
        ("10.0.0.0/33", "not a CIDR"),
        ("300.0.0.0/8", "not a CIDR"),
        ("crm.example.com", "not a CIDR"),
        ("10.20.0.1/16", "host bits"),
        ("2001:db8::1/32", "host bits"),
    ] {
        let e = err(&format!(
            "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [\n  {{ cidr = \"{cidr}\" }},\n]\n"
        ));
        assert_eq!(e.line, 5, "{cidr}: {e}");
        assert_eq!(e.key, "agent[0].allow[0].cidr");
        assert!(e.message.contains(needle), "{cidr}: {e}");
    }
}

#[test]
fn bare_address_is_a_single_host() {
    let c = parse("[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"192.0.2.7\" } ]\n")
        .unwrap();
    assert_eq!(c.agents[0].allow[0].cidr.to_string(), "192.0.2.7/32");
}

#[test]
fn bad_ports() {
    for (ports, needle) in [
        ("[0]", "out of range"),
        ("[65536]", "out of range"),
        ("[-1]", "out of range"),
        ("[\"100-90\"]", "reversed"),
        ("[\"1-70000\"]", "out of range"),
        ("[\"http\"]", "not a port"),
        ("[]", "empty port list"),
    ] {
        let e = err(&format!(
            "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ {{ cidr = \"10.0.0.0/8\", ports = {ports} }} ]\n"
        ));
        assert_eq!(e.key, "agent[0].allow[0].ports", "{ports}: {e}");
        assert_eq!(e.line, 4);
        assert!(e.message.contains(needle), "{ports}: {e}");
    }
}

#[test]
fn bad_protocol_and_mode() {
    let e = err(
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/8\", protocol = \"icmp\" } ]\n",
    );
    assert_eq!(e.line, 4);
    assert!(e.message.contains("icmp"), "{e}");
    let e = err("[[agent]]\nname = \"a\"\nowner = \"o\"\nmode = \"permissive\"\n");
    assert_eq!(e.line, 4);
}

#[test]
fn duplicate_names_and_bad_names() {
    let e = err("[[agent]]\nname = \"a\"\nowner = \"o\"\n[[agent]]\nname = \"a\"\nowner = \"o\"\n");
    assert_eq!((e.line, e.key.as_str()), (5, "agent[1].name"));
    assert!(e.message.contains("duplicate"));
    for bad in [
        "",
        "Upper",
        "-lead",
        "has_underscore",
        "dot.ted",
        &"x".repeat(64),
    ] {
        let e = err(&format!("[[agent]]\nname = \"{bad}\"\nowner = \"o\"\n"));
        assert_eq!(e.key, "agent[0].name", "{bad:?}");
    }
    assert!(valid_agent_name(&"x".repeat(63)));
    assert!(valid_agent_name("0-erp"));
}

#[test]
fn missing_or_empty_owner() {
    let e = err("[[agent]]\nname = \"a\"\n");
    assert_eq!(e.key, "owner");
    assert_eq!(e.line, 1);
    let e = err("[[agent]]\nname = \"a\"\nowner = \"  \"\n");
    assert_eq!((e.line, e.key.as_str()), (3, "agent[0].owner"));
}

#[test]
fn daemon_paths_must_be_absolute_and_cgroup_root_plain() {
    let e = err("[daemon]\nsocket = \"relative.sock\"\n");
    assert_eq!(e.key, "daemon.socket");
    assert_eq!(e.line, 1);
    for root in ["", "/abs", "../up", "a/../b"] {
        let e = err(&format!("[daemon]\ncgroup_root = \"{root}\"\n"));
        assert_eq!(e.key, "daemon.cgroup_root", "{root:?}");
    }
    let c = parse("[daemon]\ncgroup_root = \"system.slice/agentd\"\n").unwrap();
    assert_eq!(c.daemon.cgroup_root, "system.slice/agentd");
}

#[test]
fn unreadable_file_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/agentd.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/agentd.toml: cannot read"),
        "{e}"
    );
}

#[test]
fn access_section_and_launchers() {
    let c = parse(
        "[access]\nsocket_group = \"agentd\"\nadmins = [\"alice\", \"@platform\"]\nresponders = [\"@secops\"]\nviewers = [\"@monitoring\"]\n\n[[agent]]\nname = \"crm\"\nowner = \"o\"\nlaunchers = [\"bob\", \"@crm-ops\"]\n",
    )
    .unwrap();
    assert_eq!(c.access.socket_group.as_deref(), Some("agentd"));
    assert_eq!(c.access.admins, ["alice", "@platform"]);
    assert_eq!(c.access.responders, ["@secops"]);
    assert_eq!(c.access.viewers, ["@monitoring"]);
    assert_eq!(c.agents[0].launchers, ["bob", "@crm-ops"]);
    // Defaults: nobody but root, socket group root's.
    let c = parse("").unwrap();
    assert_eq!(c.access, AccessConfig::default());
}

#[test]
fn bad_access_entries_name_key_and_line() {
    let e = err("[access]\nadmins = [\"alice\",\n  \"al ice\"]\n");
    assert_eq!((e.line, e.key.as_str()), (3, "access.admins[1]"), "{e}");
    let e = err("[access]\nsocket_group = \"@agentd\"\n");
    assert_eq!((e.line, e.key.as_str()), (2, "access.socket_group"), "{e}");
    let e = err("[[agent]]\nname = \"a\"\nowner = \"o\"\nlaunchers = [\"@\"]\n");
    assert_eq!(
        (e.line, e.key.as_str()),
        (4, "agent[0].launchers[0]"),
        "{e}"
    );
    let e = err("[access]\nroot = [\"x\"]\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn bound_cgroups_are_checked_and_named_in_errors() {
    let c = parse(
        "[[agent]]\nname = \"svc\"\nowner = \"o\"\ncgroup = \"/system.slice/crm-agent.service\"\n",
    )
    .unwrap();
    assert_eq!(
        c.agents[0].cgroup.as_deref(),
        Some("system.slice/crm-agent.service")
    );
    let e = err("[[agent]]\nname = \"svc\"\nowner = \"o\"\ncgroup = \"system.slice/../x\"\n");
    assert_eq!((e.line, e.key.as_str()), (4, "agent[0].cgroup"));
    let e = err("[[agent]]\nname = \"svc\"\nowner = \"o\"\ncgroup = \"agentd/svc\"\n");
    assert!(e.message.contains("cgroup_root"), "{e}");
    let e = err(
        "[[agent]]\nname = \"a\"\nowner = \"o\"\ncgroup = \"s/x.service\"\n\n[[agent]]\nname = \"b\"\nowner = \"o\"\ncgroup = \"/s/x.service\"\n",
    );
    assert_eq!((e.line, e.key.as_str()), (9, "agent[1].cgroup"));
    assert!(e.message.contains("already bound"), "{e}");
}

#[test]
fn hostname_rules_and_dns_section_from_the_issue() {
    let c = parse(
        r#"
[dns]
upstream = ["127.0.0.53:53", "::1"]
refuse_with = "refused"
min_ttl = "5s"
max_ttl = "1h"

[[agent]]
name = "crm-hygiene"
owner = "o"
allow = [
  { host = "acme.my.salesforce.com", ports = [443] },
  { host = "*.ERP.example.com.", ports = [443, 8443], protocol = "tcp" },
  { cidr = "10.0.0.0/8" },
]
"#,
    )
    .unwrap();
    assert_eq!(
        c.dns.upstream,
        vec![
            "127.0.0.53:53".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert_eq!(c.dns.refuse_with, Refusal::Refused);
    assert_eq!(c.dns.min_ttl, std::time::Duration::from_secs(5));
    assert_eq!(c.dns.max_ttl, std::time::Duration::from_secs(3600));
    let a = &c.agents[0];
    assert_eq!(a.allow.len(), 1, "cidr rules stay apart");
    assert_eq!(a.hosts.len(), 2);
    assert_eq!(a.hosts[0].host.to_string(), "acme.my.salesforce.com");
    assert_eq!(a.hosts[1].host.to_string(), "*.erp.example.com");
    assert_eq!(a.hosts[1].protocol, Protocol::Tcp);
    assert_eq!(a.hosts[1].line, 13);
    assert_eq!(a.hosts[1].describe(), "host *.erp.example.com tcp 443,8443");

    let d = parse("").unwrap().dns;
    assert_eq!(d, DnsConfig::default());
    assert!(d.upstream.is_empty(), "default: resolv.conf, read at start");
}

#[test]
fn bad_hostname_rules_and_dns_keys_name_line_and_key() {
    let agent =
        |rule: &str| format!("[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [\n  {rule},\n]\n");
    for (text, line, key, want) in [
        (
            agent(r#"{ host = "10.0.0.1" }"#),
            5,
            "agent[0].allow[0].host",
            "use `cidr",
        ),
        (
            agent(r#"{ host = "*.com" }"#),
            5,
            "agent[0].allow[0].host",
            "top-level",
        ),
        (
            agent(r#"{ host = "a.test", cidr = "10.0.0.0/8" }"#),
            5,
            "agent[0].allow[0].host",
            "not both",
        ),
        (
            agent(r#"{ ports = [443] }"#),
            5,
            "agent[0].allow[0]",
            "needs `cidr`",
        ),
        (
            "[dns]\nupstream = [\"resolver.local\"]\n".to_owned(),
            2,
            "dns.upstream[0]",
            "not a server address",
        ),
        (
            "[dns]\nmin_ttl = \"soon\"\n".to_owned(),
            2,
            "dns.min_ttl",
            "not a duration",
        ),
        (
            "[dns]\nmin_ttl = \"2h\"\nmax_ttl = \"1h\"\n".to_owned(),
            3,
            "dns.max_ttl",
            "below min_ttl",
        ),
        (
            "[dns]\nrefuse_with = \"drop\"\n".to_owned(),
            2,
            "dns.refuse_with",
            "expected \"nxdomain\" or \"refused\"",
        ),
        (
            "[dns]\nresolver = \"x\"\n".to_owned(),
            2,
            "resolver",
            "unknown field",
        ),
    ] {
        let e = err(&text);
        assert_eq!(e.line, line, "{text}: {e}");
        assert_eq!(e.key, key, "{text}: {e}");
        assert!(e.message.contains(want), "{text}: {e}");
    }
}
