//! A malformed control request gets an error reply and the daemon keeps
//! serving everyone else.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use agentd_tests::*;

fn raw_request(env: &TestEnv, bytes: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(&env.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The daemon may answer (and close) before reading everything.
    let _ = s.write_all(bytes);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("a reply");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("reply is not JSON: {line:?}"))
}

#[test]
fn bad_requests_get_errors_and_the_daemon_keeps_serving() {
    if !require_root("bad_requests_get_errors_and_the_daemon_keeps_serving") {
        return;
    }
    let mut env = TestEnv::new("control_bad_input");
    env.write_config("[[agent]]\nname = \"quiet\"\nowner = \"o@example.com\"\n");
    env.start_daemon();

    // A client that connects and says nothing does not block anyone.
    let _silent = UnixStream::connect(&env.socket).expect("connect");

    let r = raw_request(&env, b"{not json\n");
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("malformed"), "{r}");

    let r = raw_request(&env, b"{\"cmd\":\"format_disk\"}\n");
    assert_eq!(r["ok"], false, "{r}");

    let r = raw_request(
        &env,
        b"{\"cmd\":\"exec\",\"agent\":\"quiet\",\"argv\":[],\"extra\":1}\n",
    );
    assert_eq!(r["ok"], false, "unknown fields are refused: {r}");

    let mut big = vec![b' '; 70 * 1024];
    big.push(b'\n');
    let r = raw_request(&env, &big);
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("larger than"), "{r}");

    // Disconnecting mid-request.
    {
        let mut s = UnixStream::connect(&env.socket).unwrap();
        s.write_all(b"{\"cmd\":\"li").unwrap();
    }

    let out = env.agentd(&["list", "--json"]);
    assert!(out.status.success(), "daemon stopped serving: {out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["agents"][0]["name"], "quiet");
}

#[test]
fn a_flood_from_one_caller_does_not_starve_another() {
    if !require_root("a_flood_from_one_caller_does_not_starve_another") {
        return;
    }
    let group = TestGroup::create("f");
    let viewer = TestUser::create("f", &[&group]);
    let mut env = TestEnv::new("control_flood");
    env.write_config(&format!(
        "[access]\nsocket_group = \"{g}\"\nviewers = [\"{v}\"]\n\n[[agent]]\nname = \"quiet\"\nowner = \"o@example.com\"\n",
        g = group.name,
        v = viewer.name
    ));
    env.start_daemon();

    // Root opens 300 connections and says nothing on any of them.
    let flood: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&env.socket).expect("connect"))
        .collect();
    // Past the per-caller limit, each is told at once that it is busy.
    std::thread::sleep(Duration::from_millis(500));
    let mut busy = 0;
    let mut held = Vec::new();
    for s in flood {
        s.set_nonblocking(true).unwrap();
        let mut line = String::new();
        match BufReader::new(&s).read_line(&mut line) {
            Ok(n) if n > 0 => {
                let r: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert!(r["error"].as_str().unwrap().starts_with("busy"), "{r}");
                busy += 1;
            }
            _ => held.push(s),
        }
    }
    assert!(busy >= 250, "only {busy} of 300 were turned away");
    assert!(!held.is_empty());

    // Another caller is served while root's silent connections are open.
    let out = env.agentd_as(&viewer, &["list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let mut buf = [0u8; 1];
    let still_open = matches!(
        std::io::Read::read(&mut &held[0], &mut buf),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    );
    assert!(
        still_open,
        "the flood had already timed out: the viewer may have waited for it"
    );

    // The silent ones are answered with a timeout, not left hanging.
    held[0].set_nonblocking(false).unwrap();
    held[0]
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&held[0])
        .read_line(&mut line)
        .expect("timeout reply");
    assert!(line.contains("no request within"), "{line}");
    let rec = env.wait_audit("for the silent client's record", |v| {
        v["event"] == "control"
            && v["action"] == "invalid"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.contains("no request within"))
    });
    assert_eq!(rec["uid"], 0);
    drop(held);
    assert!(env.agentd(&["list"]).status.success());
}
