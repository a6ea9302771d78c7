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
