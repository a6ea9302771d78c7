//! The verdict never waits on logging: with nobody draining the ring buffer
//! every call is still refused, the counters stay exact, and the lost audit
//! events are counted and reported.
use std::time::{Duration, Instant};

use agentd_tests::*;

const CALLS: u64 = 70_000;

#[test]
fn full_ring_buffer_keeps_verdicts_and_counts_losses() {
    if !require_root("full_ring_buffer_keeps_verdicts_and_counts_losses") {
        return;
    }
    let denied = TcpSink::bind("127.0.0.1:0");
    let mut env = TestEnv::new("event_loss");
    env.write_config("[[agent]]\nname = \"flood\"\nowner = \"test@example.com\"\n");
    env.start_daemon();
    let mut agent = ProbeProcess::spawn();
    agent.join(&env.agent_cgroup("flood"));

    // No daemon: the 4 MiB ring buffer fills after ~47 000 events.
    env.kill9_daemon();
    let v = agent.op(&format!("tcploop {CALLS} {}", denied.addr));
    assert_eq!(
        v["eperm"], CALLS,
        "every call refused while events were being lost: {v}"
    );
    assert!(denied.accepted(QUIET).is_empty());

    env.start_daemon();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = env.agentd(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("list json");
        let a = &list["agents"][0];
        assert_eq!(a["denied"], CALLS, "kernel counters must be exact: {list}");
        let lost = list["events_lost"].as_u64().unwrap();
        assert!(
            lost > 0,
            "a 70 000-event flood must overflow the buffer: {list}"
        );
        let logged: u64 = env
            .audit()
            .iter()
            .filter(|r| r["event"] == "connect" && r["dst_port"] == denied.port())
            .map(|r| {
                assert_eq!(r["verdict"], "deny");
                r["count"].as_u64().unwrap()
            })
            .sum();
        if logged + lost == CALLS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "logged {logged} + lost {lost} != {CALLS} calls"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_audit("events_lost record", |r| r["event"] == "events_lost");
}
