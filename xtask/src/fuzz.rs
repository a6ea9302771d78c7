//! `cargo xtask fuzz`: libFuzzer (through cargo-fuzz, nightly) on the inputs
//! agentd takes from others: control requests and config files. The targets
//! live in `agentd/fuzz`; their seeds and dictionaries are committed there.
//! Everything a run writes (corpus, crash artifacts, build) stays under
//! `target/`, so fuzzing never dirties the tree.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// The cargo-fuzz release these machines' nightly builds with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const FUZZ_DIR: &str = "agentd/fuzz";
const TARGET_DIR: &str = "target/fuzz";
const TARGETS: [&str; 2] = ["control_request", "config"];

/// How long each target runs.
pub enum Budget {
    /// Explore for this many seconds per target.
    Seconds(u64),
    /// Only replay the seeds and the saved corpus (what `xtask test` does:
    /// deterministic, and proves the targets still build and pass).
    Replay,
}

pub fn fuzz(targets: &[String], budget: Budget) -> anyhow::Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}; targets: {}", TARGETS.join(", "));
        }
    }
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    ensure_cargo_fuzz()?;
    run(&mut cargo_fuzz("build"))?;
    let mut failed = Vec::new();
    for target in targets {
        let corpus = PathBuf::from("target/fuzz-corpus").join(target);
        let artifacts = PathBuf::from("target/fuzz-artifacts").join(target);
        for dir in [&corpus, &artifacts] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let seeds = Path::new(FUZZ_DIR).join("seeds").join(target);
        let mut cmd = cargo_fuzz("run");
        cmd.arg(target).arg(&corpus).arg(&seeds);
        if target == "config" {
            // The example config is the best-written seed there is.
            cmd.arg("config");
        }
        cmd.arg("--")
            .arg(format!("-dict={FUZZ_DIR}/{target}.dict"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // One input that takes seconds is a finding too (a config or a
            // request that stalls the daemon).
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048");
        match budget {
            Budget::Seconds(s) => cmd.arg(format!("-max_total_time={s}")),
            Budget::Replay => cmd.arg("-runs=0"),
        };
        eprintln!("xtask: fuzzing {target}");
        if let Err(e) = run(&mut cmd) {
            eprintln!(
                "xtask: {target} failed: {e:#}\n  the input is in {}/; replay it with\n  \
                 cargo +nightly fuzz run --fuzz-dir {FUZZ_DIR} --target-dir {TARGET_DIR} \
                 {target} <file>",
                artifacts.display()
            );
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo +nightly fuzz SUB` on agentd's fuzz crate, building under `target/`.
fn cargo_fuzz(sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    // cargo-fuzz's sanitizer and coverage flags need nightly. The eBPF build
    // inside agentd's build script sets its own flags and is not affected.
    cmd.args([
        "+nightly",
        "fuzz",
        sub,
        "--fuzz-dir",
        FUZZ_DIR,
        "--target-dir",
        TARGET_DIR,
    ]);
    cmd
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    crate::ensure_cargo_tool(
        "cargo-fuzz",
        CARGO_FUZZ_VERSION,
        Command::new("cargo").args(["+nightly", "fuzz", "--version"]),
        "under a minute",
    )
}
