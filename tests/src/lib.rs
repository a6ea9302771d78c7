//! Harness for agentd's integration tests. Every kernel object a test makes
//! (cgroups, pins, sockets, processes) is owned by a guard here, so a failing
//! assertion still cleans up. Network targets are loopback only.
use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod dns;
pub mod scrape;
mod users;

pub use users::{TestGroup, TestUser};

pub const EPERM: i64 = libc::EPERM as i64;

/// Integration tests need root and BPF. Outside CI a non-root run skips
/// them loudly; in CI (`CI=true`) a skip is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: integration tests must run as root in CI");
    }
    eprintln!("SKIPPED {test}: needs root (run `sudo cargo xtask test`)");
    false
}

/// The agentd binary under test: `AGENTD_BIN` (set by `cargo xtask test`),
/// else the workspace's debug build.
pub fn agentd_bin() -> PathBuf {
    std::env::var_os("AGENTD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agentd"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);
/// Daemon start-up is serialised within a test binary: the first daemon may
/// mount bpffs, and two mounting at once would stack two filesystems.
static STARTUP: Mutex<()> = Mutex::new(());

/// One test's private world: its own cgroup root, pin directory, control
/// socket, state directory and audit log. Dropping it stops the daemon and
/// removes everything (`agentd teardown --force`, then the directories).
pub struct TestEnv {
    pub name: String,
    pub dir: PathBuf,
    pub cgroup_root: String,
    pub bpffs_dir: PathBuf,
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    pub config: PathBuf,
    /// `daemon.metrics_listen`: empty (no endpoint) unless a test sets it,
    /// so that parallel daemons do not compete for one port.
    pub metrics_listen: String,
    daemon: Option<Child>,
}

impl TestEnv {
    pub fn new(test: &str) -> Self {
        let id = format!(
            "agentd-test-{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            test.replace('_', "-")
        );
        let dir = std::env::temp_dir().join(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("test dir");
        Self {
            name: test.to_owned(),
            cgroup_root: id.clone(),
            bpffs_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            socket: dir.join("agentd.sock"),
            audit_log: dir.join("audit.jsonl"),
            config: dir.join("agentd.toml"),
            metrics_listen: String::new(),
            dir,
            daemon: None,
        }
    }

    /// The `[daemon]` section pointing at this test's private paths.
    pub fn daemon_section(&self) -> String {
        format!(
            "[daemon]\nsocket = {:?}\nstate_dir = {:?}\naudit_log = {:?}\ncgroup_root = {:?}\nbpffs_dir = {:?}\nmetrics_listen = {:?}\n\n",
            self.socket,
            self.dir.join("state"),
            self.audit_log,
            self.cgroup_root,
            self.bpffs_dir,
            self.metrics_listen
        )
    }

    /// Writes the config: this test's `[daemon]` section plus `agents`.
    pub fn write_config(&self, agents: &str) {
        fs::write(&self.config, format!("{}{agents}", self.daemon_section())).expect("config");
    }

    pub fn cgroup_mount() -> PathBuf {
        let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        text.lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
            })
            .expect("cgroup v2 mount")
    }

    pub fn agent_cgroup(&self, agent: &str) -> PathBuf {
        Self::cgroup_mount().join(&self.cgroup_root).join(agent)
    }

    /// Starts the daemon and waits (bounded) for its control socket, which
    /// appears only once enforcement is in place.
    pub fn start_daemon(&mut self) {
        self.start_daemon_with_env(&[]);
    }

    /// Starts the daemon with extra environment variables and waits until
    /// its control socket exists.
    pub fn start_daemon_with_env(&mut self, vars: &[(&str, &str)]) {
        let _guard = STARTUP.lock().unwrap_or_else(|p| p.into_inner());
        assert!(self.daemon.is_none(), "daemon already running");
        let log = fs::File::create(self.dir.join("daemon.log")).expect("log");
        let child = Command::new(agentd_bin())
            .args(["daemon", "--config"])
            .arg(&self.config)
            .envs(vars.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn agentd daemon");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(status) = self.daemon.as_mut().unwrap().try_wait().expect("wait") {
                self.daemon = None;
                panic!(
                    "agentd exited early ({status}):\n{}",
                    fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "agentd not ready within 30s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait.
    pub fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// `kill -9`: the daemon gets no chance to clean anything up.
    pub fn kill9_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Runs `agentd ARGS` against this test's socket.
    pub fn agentd(&self, args: &[&str]) -> std::process::Output {
        Command::new(agentd_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run agentd")
    }

    /// Runs `agentd ARGS --json`, which must succeed, and parses its output.
    pub fn agentd_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.agentd(&all);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "agentd {all:?} failed ({}): stdout={stdout} stderr={}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("agentd {all:?} printed no JSON ({e}): {stdout}"))
    }

    /// Runs the probe inside `agent` through `agentd exec` and returns its
    /// JSON result.
    pub fn probe(&self, agent: &str, op: &[&str]) -> Value {
        self.probe_as(agent, None, op)
    }

    pub fn probe_as(&self, agent: &str, user: Option<&str>, op: &[&str]) -> Value {
        let mut args = vec!["exec", "--agent", agent];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        // A lowered user must be able to reach the binary: use a copy in
        // this test's world-readable directory, not the build tree (which
        // may sit under a private home directory).
        let probe = if user.is_some() {
            self.public_probe()
        } else {
            probe_bin().to_owned()
        };
        args.extend(["--", &probe, "once"]);
        args.extend(op);
        let out = self.agentd(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
            panic!(
                "probe {op:?} in {agent} printed no JSON (status {}): stdout={stdout} stderr={}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn public_probe(&self) -> String {
        self.public_copy(Path::new(probe_bin()))
            .to_string_lossy()
            .into_owned()
    }

    /// A copy of a binary in this test's world-readable directory, which
    /// lowered users can reach (the build tree may sit under a private home).
    fn public_copy(&self, src: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let dst = self.dir.join(src.file_name().expect("binary name"));
        if !dst.exists() {
            fs::copy(src, &dst).expect("copy binary");
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        }
        dst
    }

    /// Every audit record so far.
    pub fn audit(&self) -> Vec<Value> {
        fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded) until an audit record satisfies `pred`.
    pub fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.audit().into_iter().find(|v| pred(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "no audit record {what} within 10s; log:\n{}",
                fs::read_to_string(&self.audit_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        self.kill9_daemon();
        if self.config.exists() {
            let _ = Command::new(agentd_bin())
                .args(["teardown", "--force", "--config"])
                .arg(&self.config)
                .arg("--socket")
                .arg(&self.socket)
                .output();
        }
        // Belt and braces if the config never got written or teardown failed.
        let _ = fs::remove_dir_all(&self.bpffs_dir);
        let root = Self::cgroup_mount().join(&self.cgroup_root);
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let _ = fs::write(e.path().join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(20));
                let _ = fs::remove_dir(e.path());
            }
        }
        let _ = fs::remove_dir(&root);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The probe binary, built by cargo next to the test executables
/// (`target/<profile>/agentd-probe`; tests run from `target/<profile>/deps`).
pub fn probe_bin() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(Path::parent).expect("target dir");
        let probe = dir.join("agentd-probe");
        assert!(
            probe.exists(),
            "{} missing: build the agentd-tests binaries",
            probe.display()
        );
        probe.to_string_lossy().into_owned()
    })
}

/// A TCP listener outside every agent that records what reaches it.
pub struct TcpSink {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl TcpSink {
    pub fn bind(addr: &str) -> Self {
        let listener = TcpListener::bind(addr).expect("bind tcp sink");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        Self { listener, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The next connection, kept open (for streams that outlive one op).
    pub fn accept_one(&self, wait: Duration) -> Option<std::net::TcpStream> {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Ok((s, _)) = self.listener.accept() {
                s.set_nonblocking(false).ok();
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Connections accepted within `wait`, with whatever each sent.
    pub fn accepted(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match self.listener.accept() {
                Ok((mut s, _)) => {
                    s.set_read_timeout(Some(Duration::from_millis(200))).ok();
                    let mut buf = Vec::new();
                    let _ = s.read_to_end(&mut buf);
                    out.push(buf);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        out
    }
}

/// A UDP socket outside every agent that records the datagrams reaching it.
pub struct UdpSink {
    socket: UdpSocket,
    pub addr: SocketAddr,
}

impl UdpSink {
    pub fn bind(addr: &str) -> Self {
        let socket = UdpSocket::bind(addr).expect("bind udp sink");
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let addr = socket.local_addr().expect("addr");
        Self { socket, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn received(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.socket.recv_from(&mut buf) {
                out.push(buf[..n].to_vec());
            }
        }
        out
    }
}

/// Whatever arrives on an open stream within `wait` (stops at EOF/reset).
pub fn read_for(stream: &mut std::net::TcpStream, wait: Duration) -> Vec<u8> {
    read_until_end(stream, wait).0
}

/// Reads an open stream until it ends, bounded by `wait`: what arrived and
/// how it ended (`None`: still open at the deadline or closed cleanly).
pub fn read_until_end(
    stream: &mut std::net::TcpStream,
    wait: Duration,
) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .ok();
        match stream.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return (out, Some(e.kind())),
        }
    }
    (out, None)
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z") && !s.contains(") X"))
        .unwrap_or(false)
}

/// How long a sink is watched to show that nothing arrived.
pub const QUIET: Duration = Duration::from_millis(300);

/// Asserts a probe result is the kernel's EPERM refusal.
#[track_caller]
pub fn assert_eperm(v: &Value) {
    assert_eq!(v["ok"], false, "expected a refusal, got {v}");
    assert_eq!(v["errno"], EPERM, "expected EPERM, got {v}");
}

#[track_caller]
pub fn assert_ok(v: &Value) {
    assert_eq!(v["ok"], true, "expected success, got {v}");
}

/// A long-lived probe (`agentd-probe serve`) taking operations on stdin.
/// Killed on drop.
pub struct ProbeProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl ProbeProcess {
    /// Starts a probe outside any agent; move it with [`ProbeProcess::join`].
    pub fn spawn() -> Self {
        let mut cmd = Command::new(probe_bin());
        cmd.arg("serve");
        Self::start(cmd)
    }

    /// Starts a probe inside `agent` through `agentd exec` (a session).
    pub fn exec(env: &TestEnv, agent: &str) -> Self {
        let mut cmd = Command::new(agentd_bin());
        cmd.arg("--socket").arg(&env.socket).args([
            "exec",
            "--agent",
            agent,
            "--",
            probe_bin(),
            "serve",
        ]);
        Self::start(cmd)
    }

    fn start(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn probe");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).expect("probe ready");
        let pid = child.id();
        Self {
            child,
            stdin,
            stdout,
            pid,
        }
    }

    /// Moves the probe into a cgroup, as the kernel sees membership.
    pub fn join(&self, cgroup_dir: &Path) {
        fs::write(cgroup_dir.join("cgroup.procs"), self.pid.to_string()).expect("join cgroup");
    }

    pub fn op(&mut self, op: &str) -> Value {
        self.start_op(op);
        self.result()
    }

    /// Starts a long operation; [`ProbeProcess::result`] waits for it.
    pub fn start_op(&mut self, op: &str) {
        writeln!(self.stdin, "{op}").expect("probe stdin");
        self.stdin.flush().expect("flush");
    }

    pub fn result(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("probe stdout");
        serde_json::from_str(line.trim()).unwrap_or_else(|_| panic!("probe said {line:?}"))
    }
}

impl Drop for ProbeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
