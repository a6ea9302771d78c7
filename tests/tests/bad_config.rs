//! Bad configuration is refused with the file, line and key, by
//! `check-config` and by the daemon, which then installs nothing.
use agentd_tests::*;

/// Each case: the agents text, the key the error must name, and the line.
const CASES: &[(&str, &str, usize)] = &[
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\ncolour = \"red\"\n",
        "colour",
        4,
    ),
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/33\" } ]\n",
        "agent[0].allow[0].cidr",
        4,
    ),
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [\n  { cidr = \"10.0.0.0/8\", ports = [0] },\n]\n",
        "agent[0].allow[0].ports",
        5,
    ),
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/8\", ports = [70000] } ]\n",
        "agent[0].allow[0].ports",
        4,
    ),
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\nallow = [ { cidr = \"10.0.0.0/8\", ports = [\"90-80\"] } ]\n",
        "agent[0].allow[0].ports",
        4,
    ),
    (
        "[[agent]]\nname = \"a\"\nowner = \"o\"\n\n[[agent]]\nname = \"a\"\nowner = \"p\"\n",
        "agent[1].name",
        6,
    ),
    ("[[agent]]\nname = \"a\"\ndescription = \"x\"\n", "owner", 1),
];

#[test]
fn each_bad_config_is_refused_with_file_line_and_key() {
    if !require_root("each_bad_config_is_refused_with_file_line_and_key") {
        return;
    }
    for (agents, key, line) in CASES {
        let mut env = TestEnv::new("bad_config");
        env.write_config(agents);
        // Lines are counted from the end of the harness's [daemon] section.
        let line = line + env.daemon_section().lines().count();
        let config = env.config.to_str().unwrap().to_owned();
        let out = env.agentd(&["check-config", &config]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{agents}");
        assert!(
            err.contains(&format!("{config}:{line}:")),
            "no file:line in {err:?} for:\n{agents}"
        );
        assert!(err.contains(key), "key {key} not named in {err:?}");

        // The daemon refuses too, and installs nothing.
        let out = std::process::Command::new(agentd_bin())
            .args(["daemon", "--config", &config])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(key));
        assert!(!env.bpffs_dir.exists(), "pins created for a bad config");
        assert!(!env.socket.exists());
        let _ = &mut env;
    }
}

#[test]
fn good_example_config_passes() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/agentd.toml");
    let out = std::process::Command::new(agentd_bin())
        .args(["check-config", config])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}
