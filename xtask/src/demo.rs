//! `cargo xtask demo`: agentd's story in two minutes, on loopback. Mock ERP
//! and CRM endpoints and an exfil sink, the daemon with `config/demo.toml`, a
//! sample agent that works, tries to leak, gets cut off mid-stream by the
//! kill switch, stays alive, and is restored. Everything it makes is removed
//! at the end, also when a step fails.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const CONFIG: &str = "config/demo.toml";
const DEMO_DIR: &str = "/tmp/agentd-demo";
const SOCKET: &str = "/tmp/agentd-demo/agentd.sock";
const AGENT: &str = "sales-assistant";
const ERP: &str = "127.0.0.2:8080";
const CRM: &str = "127.0.0.3:8080";
const CRM_FEED: &str = "127.0.0.3:8081";
const EXFIL: &str = "127.0.0.66:8080";
const METRICS: &str = "127.0.0.5:9464";
/// No step waits longer than this.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(agentd: &Path, demo_agent: &Path) -> anyhow::Result<()> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        bail!("the demo loads BPF programs and makes cgroups: run it as root");
    }
    let mut demo = Demo {
        agentd: agentd.to_owned(),
        stop: Arc::new(AtomicBool::new(false)),
        daemon: None,
        agent: None,
    };
    demo.clean_leftovers();
    let result = demo.story(demo_agent);
    demo.clean_up();
    if result.is_ok() {
        say("\nDone. Everything the demo made is gone (daemon, pins, cgroups, files).");
    }
    result
}

struct Demo {
    agentd: PathBuf,
    stop: Arc<AtomicBool>,
    daemon: Option<Child>,
    agent: Option<Child>,
}

fn say(text: &str) {
    println!("{text}");
}

fn step(n: u32, title: &str) {
    println!("\n== {n}/8  {title}");
}

impl Demo {
    fn story(&mut self, demo_agent: &Path) -> anyhow::Result<()> {
        step(1, "Mock endpoints on loopback");
        let exfil_hits = self.start_endpoints()?;
        say(&format!("   ERP        http://{ERP}  (HTTP API)"));
        say(&format!(
            "   CRM        http://{CRM}  (HTTP API), live feed on {CRM_FEED}"
        ));
        say(&format!(
            "   exfil sink {EXFIL}  (where a compromised agent would send data)"
        ));

        step(2, &format!("Start agentd with {CONFIG}"));
        say(&format!(
            "   {AGENT} may reach the ERP (8080) and the CRM (8080, 8081), nothing else."
        ));
        self.start_daemon()?;
        self.agentd_cmd(&["list"])?;

        step(3, &format!("Run the sample agent inside {AGENT}"));
        say(&format!(
            "   $ agentd exec --agent {AGENT} -- agentd-demo-agent ...   (its own words, prefixed `agent |`)"
        ));
        let lines = self.start_agent(demo_agent)?;
        wait_for(&lines, "the ERP answer", |l| l.starts_with("ERP:"))?;
        wait_for(&lines, "the CRM answer", |l| l.starts_with("CRM:"))?;
        let exfil = wait_for(&lines, "the exfil attempt", |l| l.starts_with("EXFIL:"))?;
        if !exfil.contains("refused") || exfil_hits.load(Ordering::Relaxed) != 0 {
            bail!("the exfil sink was reached: {exfil}");
        }
        say("   The exfil sink saw no connection at all.");

        step(4, "The denied attempt in the audit trail");
        self.wait_for_denied_event()?;
        self.agentd_cmd(&["events", "--agent", AGENT, "--verdict", "deny"])?;

        step(5, "Pull the kill switch while the agent is mid-stream");
        for _ in 0..3 {
            wait_for(&lines, "a feed update", |l| l.starts_with("FEED: update"))?;
        }
        self.agentd_cmd(&["kill", AGENT, "--reason", "demo: suspected exfiltration"])?;
        wait_for(&lines, "the feed being cut", |l| {
            l.contains("connection lost") || l.contains("closed the feed")
        })?;
        wait_for(&lines, "a refused reconnect", |l| {
            l.contains("cannot reach the CRM")
        })?;

        step(6, "The agent is alive, but cut off");
        let pid = self.agent.as_ref().map(Child::id).unwrap_or(0);
        self.agentd_cmd(&["status", AGENT])?;
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            bail!("the agent (pid {pid}) died: the kill switch must leave it running");
        }
        say(&format!(
            "   The agent (pid {pid}) is still running, for inspection; every connect it tries \
             fails with EPERM."
        ));

        step(7, "Key metrics");
        self.show_metrics()?;

        step(8, "Restore");
        self.agentd_cmd(&["restore", AGENT, "--reason", "demo: cleared by secops"])?;
        wait_for(&lines, "the agent reconnecting", |l| {
            l.contains("reconnected")
        })?;
        wait_for(&lines, "a feed update after restore", |l| {
            l.starts_with("FEED: update")
        })?;
        say("   The allowlist applies again: the CRM feed is back.");
        if exfil_hits.load(Ordering::Relaxed) != 0 {
            bail!("the exfil sink was reached during the demo");
        }
        say("   In the whole demo the exfil sink saw no connection.");
        Ok(())
    }

    /// ERP and CRM answer HTTP (tiny_http); the sink counts connections.
    fn start_endpoints(&self) -> anyhow::Result<Arc<AtomicUsize>> {
        for (name, addr) in [("ERP", ERP), ("CRM", CRM)] {
            let server = tiny_http::Server::http(addr)
                .map_err(|e| anyhow::anyhow!("mock {name} on {addr}: {e}"))?;
            let stop = self.stop.clone();
            std::thread::spawn(move || serve(name, server, stop));
        }
        let feed =
            TcpListener::bind(CRM_FEED).with_context(|| format!("CRM feed on {CRM_FEED}"))?;
        feed.set_nonblocking(true)?;
        let stop = self.stop.clone();
        std::thread::spawn(move || serve_feed(&feed, &stop));
        let sink = TcpListener::bind(EXFIL).with_context(|| format!("exfil sink on {EXFIL}"))?;
        sink.set_nonblocking(true)?;
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop, counted) = (self.stop.clone(), hits.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if sink.accept().is_ok() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(hits)
    }

    fn start_daemon(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(DEMO_DIR)?;
        let log = std::fs::File::create(Path::new(DEMO_DIR).join("daemon.log"))?;
        let child = Command::new(&self.agentd)
            .args(["daemon", "--config", CONFIG])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting agentd")?;
        self.daemon = Some(child);
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !Path::new(SOCKET).exists() {
            if let Some(status) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "agentd exited ({status}):\n{}",
                    std::fs::read_to_string(Path::new(DEMO_DIR).join("daemon.log"))
                        .unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("agentd not ready within {STEP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        say("   agentd is ready: enforcement in place, control socket up, /metrics served.");
        Ok(())
    }

    fn start_agent(&mut self, demo_agent: &Path) -> anyhow::Result<mpsc::Receiver<String>> {
        let mut child = Command::new(&self.agentd)
            .args(["--socket", SOCKET, "exec", "--agent", AGENT, "--"])
            .arg(demo_agent)
            .args([
                format!("http://{ERP}"),
                format!("http://{CRM}"),
                CRM_FEED.to_owned(),
                EXFIL.to_owned(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("agentd exec")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        self.agent = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                say(&format!("   agent | {line}"));
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// The audit line is written by the event reader a few ms after the
    /// decision: wait (bounded) until `events` can show it.
    fn wait_for_denied_event(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < deadline {
            let out = Command::new(&self.agentd)
                .args(["--socket", SOCKET, "events", "--agent", AGENT])
                .args(["--verdict", "deny", "--json"])
                .output()?;
            if out.status.success() && !out.stdout.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the denied connect never reached the audit log")
    }

    /// Runs an agentd client command and shows it with its output.
    fn agentd_cmd(&self, args: &[&str]) -> anyhow::Result<()> {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    (*a).to_owned()
                }
            })
            .collect();
        say(&format!("   $ agentd {}", shown.join(" ")));
        let out = Command::new(&self.agentd)
            .args(["--socket", SOCKET])
            .args(args)
            .output()
            .with_context(|| format!("agentd {}", args.join(" ")))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            say(&format!("     {line}"));
        }
        if !out.status.success() {
            bail!(
                "agentd {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn show_metrics(&self) -> anyhow::Result<()> {
        say(&format!(
            "   $ curl -s http://{METRICS}/metrics   (the lines about {AGENT})"
        ));
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let text = http
            .get(format!("http://{METRICS}/metrics"))
            .call()
            .context("scraping /metrics")?
            .body_mut()
            .read_to_string()?;
        let shown = text.lines().filter(|l| {
            let relevant = l.contains(AGENT)
                || l.starts_with("agentd_kill_duration_seconds_count")
                || l.starts_with("agentd_kill_duration_seconds_sum")
                || l.starts_with("agentd_events_lost_total");
            // Counters of verdicts that never happened add nothing here.
            let zero_count = l.starts_with("agentd_connections_total") && l.ends_with(" 0");
            !l.starts_with('#') && relevant && !zero_count
        });
        for line in shown {
            say(&format!("     {line}"));
        }
        Ok(())
    }

    /// A previous demo that was interrupted: stop nothing running, but
    /// remove what it left.
    fn clean_leftovers(&self) {
        if Path::new(DEMO_DIR).exists() || Path::new("/sys/fs/bpf/agentd-demo").exists() {
            let _ = Command::new(&self.agentd)
                .args(["teardown", "--force", "--config", CONFIG])
                .output();
            let _ = std::fs::remove_dir_all(DEMO_DIR);
        }
    }

    fn clean_up(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // Closing its stdin ends the agent; kill it if it lingers.
            drop(agent.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(3);
            while agent.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some(mut daemon) = self.daemon.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &daemon.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while daemon.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
        let teardown = Command::new(&self.agentd)
            .args(["teardown", "--force", "--config", CONFIG])
            .output();
        if let Ok(out) = teardown
            && !out.status.success()
        {
            eprintln!(
                "xtask: demo teardown: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(DEMO_DIR);
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits (bounded) for the agent to say something matching.
fn wait_for(
    lines: &mpsc::Receiver<String>,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if matches(&line) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("waited {STEP_TIMEOUT:?} for {what}; the agent did not get there"),
        }
    }
}

/// One mock HTTP endpoint: small JSON answers.
fn serve(name: &'static str, server: tiny_http::Server, stop: Arc<AtomicBool>) {
    let server = Arc::new(server);
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(request)) = server.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        std::thread::spawn(move || {
            let response = match request.url() {
                "/orders" => text(r#"{"orders":[{"id":1042,"customer":"ACME","total":1200}]}"#),
                "/contacts" => {
                    text(r#"{"contacts":[{"name":"ACME","email":"buyer@acme.example"}]}"#)
                }
                _ => text("not found").with_status_code(404),
            };
            let _ = request.respond(response);
        });
    }
    let _ = name;
}

fn text(body: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    tiny_http::Response::from_string(body)
}

/// The CRM's live feed: each client gets a line every 200 ms until it goes
/// away or the demo ends.
fn serve_feed(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut client, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = client.set_nonblocking(false);
            for n in 1.. {
                if stop.load(Ordering::Relaxed)
                    || client
                        .write_all(format!("update {n} from the CRM\n").as_bytes())
                        .is_err()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }
}
