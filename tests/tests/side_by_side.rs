//! Two agents with different rules on one host, and a process outside
//! every agent that is not touched at all.
use agentd_tests::*;

#[test]
fn two_agents_with_different_rules_and_an_uncontained_process() {
    if !require_root("two_agents_with_different_rules_and_an_uncontained_process") {
        return;
    }
    let erp = TcpSink::bind("127.0.0.1:0");
    let crm = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("side_by_side");
    env.write_config(&format!(
        r#"[[agent]]
name = "erp-order-status"
owner = "jonas@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]

[[agent]]
name = "crm-hygiene"
owner = "maria@example.com"
allow = [ {{ cidr = "127.0.0.1/32", ports = [{}], protocol = "tcp" }} ]
"#,
        erp.port(),
        crm.port()
    ));
    env.start_daemon();

    assert_ok(&env.probe("erp-order-status", &["tcp", &erp.addr.to_string()]));
    assert_eq!(erp.accepted(QUIET).len(), 1);
    assert_eperm(&env.probe("erp-order-status", &["tcp", &crm.addr.to_string()]));
    assert!(crm.accepted(QUIET).is_empty());

    assert_ok(&env.probe("crm-hygiene", &["tcp", &crm.addr.to_string()]));
    assert_eq!(crm.accepted(QUIET).len(), 1);
    assert_eperm(&env.probe("crm-hygiene", &["tcp", &erp.addr.to_string()]));
    assert!(erp.accepted(QUIET).is_empty());

    // A process in no agent reaches both, directly.
    let mut outside = ProbeProcess::spawn();
    assert_ok(&outside.op(&format!("tcp {}", erp.addr)));
    assert_ok(&outside.op(&format!("tcp {}", crm.addr)));
    assert_eq!(erp.accepted(QUIET).len(), 1);
    assert_eq!(crm.accepted(QUIET).len(), 1);
}
