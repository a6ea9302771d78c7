//! The operations kit in `config/`: alert rules (promtool checks and unit
//! tests them), the Grafana dashboard and the rules naming only metrics a
//! running agentd exports, the systemd unit (systemd-analyze, and the
//! READY=1 it waits for arriving once enforcement is in place), shell
//! completions and the man page generated from the CLI definition.
use std::{
    collections::BTreeSet,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agentd_tests::{dns::STUB, scrape::*, *};
use promql_parser::parser::{self, Expr};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("config")
}

/// Whether `tool` runs. Missing outside CI: skipped loudly; in CI: a
/// failure (`cargo xtask test` installs it).
fn require_tool(test: &str, tool: &str, version_arg: &str) -> bool {
    if Command::new(tool).arg(version_arg).output().is_ok() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: {tool} is required in CI (cargo xtask test installs it)");
    }
    eprintln!("SKIPPED {test}: {tool} not installed");
    false
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_and_unit_tests_the_alert_rules() {
    if !require_tool(
        "promtool_checks_and_unit_tests_the_alert_rules",
        "promtool",
        "--version",
    ) {
        return;
    }
    let dir = config_dir().join("prometheus");
    let out = run_ok(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(dir.join("agentd.rules.yml")),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let rules = std::fs::read_to_string(dir.join("agentd.rules.yml")).unwrap();
    for alert in [
        "AgentdDown",
        "AgentdEnforcementUnhealthy",
        "AgentdAgentKilled",
        "AgentdDenyBurst",
        "AgentdEventsLost",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "no {alert}");
    }
    // Each alert fires on the series it is about, with the text expected.
    let out = run_ok(Command::new("promtool").current_dir(&dir).args([
        "test",
        "rules",
        "agentd.rules.test.yml",
    ]));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Metric names a PromQL expression reads.
fn metric_names(expr: &Expr, out: &mut BTreeSet<String>) {
    let selector = |vs: &promql_parser::parser::VectorSelector, out: &mut BTreeSet<String>| {
        if let Some(name) = &vs.name {
            out.insert(name.clone());
        }
        for m in &vs.matchers.matchers {
            if m.name == "__name__" {
                out.insert(m.value.clone());
            }
        }
    };
    match expr {
        Expr::Aggregate(a) => {
            metric_names(&a.expr, out);
            if let Some(p) = &a.param {
                metric_names(p, out);
            }
        }
        Expr::Unary(u) => metric_names(&u.expr, out),
        Expr::Binary(b) => {
            metric_names(&b.lhs, out);
            metric_names(&b.rhs, out);
        }
        Expr::Paren(p) => metric_names(&p.expr, out),
        Expr::Subquery(s) => metric_names(&s.expr, out),
        Expr::VectorSelector(vs) => selector(vs, out),
        Expr::MatrixSelector(ms) => selector(&ms.vs, out),
        Expr::Call(c) => {
            for a in &c.args.args {
                metric_names(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Parses a query as Prometheus would once Grafana has filled in its
/// variables; `label_values(SELECTOR, label)` is Grafana's, around PromQL.
fn names_in_query(query: &str) -> BTreeSet<String> {
    let mut q = query
        .replace("$__rate_interval", "5m")
        .replace("$instance", "host")
        .replace("$agent", "crm");
    if let Some(inner) = q.strip_prefix("label_values(") {
        let (selector, _label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        q = selector.to_owned();
    }
    let expr = parser::parse(&q).unwrap_or_else(|e| panic!("{query:?} is not PromQL: {e}"));
    let mut out = BTreeSet::new();
    metric_names(&expr, &mut out);
    assert!(!out.is_empty(), "{query:?} reads no metric");
    out
}

fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string(config_dir().join("grafana/agentd.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            out.push(t["expr"].as_str().expect("expr").to_owned());
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

fn rule_queries() -> Vec<String> {
    let text = std::fs::read_to_string(config_dir().join("prometheus/agentd.rules.yml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| {
            let e = e.trim();
            assert!(
                !e.starts_with('|') && !e.starts_with('>'),
                "keep each expr on one line"
            );
            e.to_owned()
        })
        .collect()
}

#[test]
fn dashboard_and_rules_name_only_metrics_agentd_exports() {
    if !require_root("dashboard_and_rules_name_only_metrics_agentd_exports") {
        return;
    }
    let mut env = TestEnv::new("ops_names");
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    env.metrics_listen = addr.clone();
    // A hostname rule, so the agent has a resolver. The upstream is never
    // asked: the one name queried below is refused.
    env.write_config(
        "[dns]\nupstream = [\"127.0.0.1:9\"]\n\n[[agent]]\nname = \"crm\"\nowner = \"crm-team\"\nallow = [ { host = \"crm.test\" } ]\n",
    );
    env.start_daemon();
    // Labelled series appear once something happened: a DNS query, a kill,
    // a restore, a reload, a control request.
    let v = env.probe("crm", &["dns", STUB, "other.test", "A", "udp"]);
    assert_eq!(v["rcode"], 3, "refused as NXDOMAIN: {v}");
    for args in [
        &["kill", "crm", "--reason", "names test"][..],
        &["restore", "crm", "--reason", "names test"][..],
        &["reload"][..],
    ] {
        let out = env.agentd(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let exported = Scrape::get(&addr).names();

    let dashboard = dashboard_queries();
    assert!(
        dashboard.len() >= 10,
        "dashboard has {} queries",
        dashboard.len()
    );
    let mut used = BTreeSet::new();
    for q in &dashboard {
        for name in names_in_query(q) {
            assert!(
                exported.contains(&name),
                "dashboard query {q:?} reads {name}, which agentd does not export; it exports {exported:?}"
            );
            used.insert(name);
        }
    }
    // The dashboard shows what the issue asks of it.
    for needed in [
        "agentd_connections_total",
        "agentd_agent_killed",
        "agentd_kill_duration_seconds_bucket",
        "agentd_events_lost_total",
        "agentd_enforcement_healthy",
        "agentd_dns_queries_total",
        "agentd_learned_addresses",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    for q in rule_queries() {
        for name in names_in_query(&q) {
            // `up` is Prometheus's own series for the scrape target.
            assert!(
                name == "up" || exported.contains(&name),
                "rule {q:?} reads {name}, which agentd does not export"
            );
        }
    }
}

#[test]
fn systemd_unit_verifies_and_readiness_means_enforcing() {
    if !require_root("systemd_unit_verifies_and_readiness_means_enforcing")
        || !require_tool(
            "systemd_unit_verifies_and_readiness_means_enforcing",
            "systemd-analyze",
            "--version",
        )
    {
        return;
    }
    let mut env = TestEnv::new("ops_unit");
    // The unit as shipped, pointing at the binary under test.
    let unit = std::fs::read_to_string(config_dir().join("agentd.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    let copy = env.dir.join("agentd.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/agentd", &agentd_bin().display().to_string()),
    )
    .unwrap();
    run_ok(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy),
    );

    // READY=1 reaches the notify socket only once the agent is enforced
    // and the control socket answers.
    let notify_path = env.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    env.write_config("[[agent]]\nname = \"crm\"\nowner = \"crm-team\"\nallow = []\n");
    env.start_daemon_with_env(&[("NOTIFY_SOCKET", notify_path.to_str().unwrap())]);
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("READY=1 within 30 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "got {message:?}");
    let status = env.agentd_json(&["status", "crm"]);
    assert_eq!(status["state"], "active", "{status}");
}

#[test]
fn completions_and_man_pages_come_from_the_cli_definition() {
    let bin = agentd_bin();
    let agentd = |args: &[&str]| run_ok(Command::new(&bin).args(args));
    let bash = agentd(&["completions", "bash"]);
    let script =
        std::env::temp_dir().join(format!("agentd-completion-{}.bash", std::process::id()));
    std::fs::write(&script, &bash).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash");
    let _ = std::fs::remove_file(&script);
    assert!(syntax.status.success(), "bash completion does not parse");
    let zsh = agentd(&["completions", "zsh"]);
    let fish = agentd(&["completions", "fish"]);
    let man = agentd(&["man"]);
    assert!(man.contains(".TH agentd 1"), "{man}");
    for sub in [
        "daemon", "exec", "list", "status", "events", "adopt", "kill", "restore", "reload",
        "teardown",
    ] {
        for (what, text) in [
            ("bash", &bash),
            ("zsh", &zsh),
            ("fish", &fish),
            ("man", &man),
        ] {
            assert!(text.contains(sub), "{what} does not mention {sub}");
        }
        let page = agentd(&["man", sub]);
        assert!(
            page.contains(&format!(".TH agentd\\-{sub} 1"))
                || page.contains(&format!(".TH agentd-{sub} 1")),
            "{page}"
        );
    }
    // Every option of kill is in its page.
    let kill = agentd(&["man", "kill"]);
    for opt in ["\\-\\-reason", "\\-\\-all", "\\-\\-json"] {
        assert!(kill.contains(opt), "kill page lacks {opt}");
    }
    let out = Command::new(&bin)
        .args(["man", "no-such-command"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
