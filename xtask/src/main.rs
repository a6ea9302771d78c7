//! `cargo xtask`: build, run, test and benchmark agentd. Installs what a
//! fresh machine lacks (rust-src for nightly, bpf-linker) and says so.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;

/// The bpf-linker release that works with these machines' nightly LLVM.
const BPF_LINKER_VERSION: &str = "0.10.4";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites and build the eBPF programs and the daemon.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `agentd daemon` with the example config (needs root).
    Run {
        #[arg(long, default_value = "config/agentd.toml")]
        config: PathBuf,
        #[arg(long)]
        release: bool,
    },
    /// Build and run every unit and integration test (integration tests need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. `--test tcp_egress`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the control request decoder and the config parser (nightly,
    /// cargo-fuzz, installed when missing); reports each target's first failing input.
    Fuzz {
        /// How long each target explores.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: control_request and config).
        targets: Vec<String>,
    },
    /// Build, then tell agentd's story on loopback: mock ERP/CRM, a sample
    /// agent, a blocked exfil attempt, the kill switch mid-stream, metrics,
    /// restore; cleans up everything it made (needs root).
    Demo,
    /// Benchmarks on the real kernel (root), side by side in one run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace root")?;
    match cli.command {
        Cmd::Build { release } => {
            build(release)?;
        }
        Cmd::Run { config, release } => {
            let bin = build(release)?;
            let err = exec_daemon(&bin, &config);
            bail!("starting {}: {err}", bin.display());
        }
        Cmd::Test { args } => test(&args)?,
        Cmd::Fuzz { seconds, targets } => {
            ensure_prerequisites()?;
            fuzz::fuzz(&targets, fuzz::Budget::Seconds(seconds))?;
        }
        Cmd::Demo => {
            let bin = build(false)?;
            demo::run(&bin, &build_demo_agent()?)?;
        }
        Cmd::Bench { which } => {
            let bin = build(true)?;
            bench::run(which, &bin)?;
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// rust-src for the nightly toolchain (eBPF builds `core` from source) and
/// the pinned bpf-linker.
fn ensure_prerequisites() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("the nightly toolchain is required to build the eBPF programs (rustup toolchain list shows none)")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly (needed to build eBPF programs)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    ensure_cargo_tool(
        "bpf-linker",
        BPF_LINKER_VERSION,
        Command::new("bpf-linker").arg("--version"),
        "about two minutes",
    )?;
    Ok(())
}

/// Tools the ops-kit tests drive, and the Debian package that ships each.
const TEST_TOOLS: [(&str, &str); 2] = [("promtool", "prometheus"), ("systemd-analyze", "systemd")];

/// Installs the ops-kit tests' tools with apt when missing. In CI a tool
/// that cannot be installed is an error (the tests must run, not skip).
fn ensure_test_tools(ci: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> = TEST_TOOLS
        .iter()
        .filter(|(tool, _)| output(Command::new(tool).arg("--version")).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} (for the ops-kit tests)",
        missing.join(", ")
    );
    let install = || {
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let result = install().or_else(|_| {
        // A fresh machine may have no package lists yet.
        run(Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .and_then(|()| install())
    });
    match result {
        Ok(()) => Ok(()),
        Err(e) if ci => Err(e.context(format!("installing {}", missing.join(", ")))),
        Err(e) => {
            eprintln!(
                "xtask: could not install {}: {e:#}; those tests will skip",
                missing.join(", ")
            );
            Ok(())
        }
    }
}

/// `cargo install`s `krate` at `version` unless `probe` prints that version.
pub(crate) fn ensure_cargo_tool(
    krate: &str,
    version: &str,
    probe: &mut Command,
    takes: &str,
) -> anyhow::Result<()> {
    let found = output(probe).unwrap_or_default();
    if found.contains(version) {
        return Ok(());
    }
    let found = if found.is_empty() {
        "none"
    } else {
        found.trim()
    };
    eprintln!("xtask: installing {krate} {version} (found: {found}); takes {takes}");
    run(Command::new("cargo").args(["install", krate, "--version", version, "--locked"]))
}

/// Builds the daemon (and, through its build script, the eBPF programs).
fn build(release: bool) -> anyhow::Result<PathBuf> {
    ensure_prerequisites()?;
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "agentd", "--bin", "agentd"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let bin = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("agentd");
    Ok(bin)
}

/// The demo's sample agent (a binary of the tests crate).
fn build_demo_agent() -> anyhow::Result<PathBuf> {
    run(Command::new("cargo").args([
        "build",
        "--package",
        "agentd-tests",
        "--bin",
        "agentd-demo-agent",
    ]))?;
    Ok(workspace_root().join("target/debug/agentd-demo-agent"))
}

fn exec_daemon(bin: &Path, config: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    eprintln!(
        "xtask: {} daemon --config {}",
        bin.display(),
        config.display()
    );
    Command::new(bin)
        .args(["daemon", "--config"])
        .arg(config)
        .exec()
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let bin = build(false)?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    // SAFETY-free check: integration tests need root and BPF.
    let root = output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0");
    if !root {
        if ci {
            bail!("integration tests must run as root in CI (they load BPF programs)");
        }
        eprintln!("xtask: not root: integration tests will report themselves skipped");
    }
    if root {
        ensure_test_tools(ci)?;
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--workspace", "--exclude", "agentd-ebpf"])
        .args(args)
        .env("AGENTD_BIN", &bin);
    run(&mut cmd)?;
    if args.is_empty() {
        // The fuzz targets are code too: build them and replay their seeds
        // and saved corpus under the sanitizer, so `cargo xtask fuzz` keeps
        // working. Exploring is `cargo xtask fuzz`'s job, not CI's.
        fuzz::fuzz(&[], fuzz::Budget::Replay)?;
        // The demo is documented as working on a fresh machine: prove it.
        if root {
            demo::run(&bin, &build_demo_agent()?)?;
        }
    }
    Ok(())
}
