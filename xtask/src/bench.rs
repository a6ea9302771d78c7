//! Benchmarks. Each runs its variants side by side in one run, interleaved,
//! and reports ratios rather than asserting absolute times.
use std::path::Path;

use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// connect+close loop: uncontained vs 10 rules vs 100 000 rules.
    Connect,
}

pub fn run(which: Which, agentd: &Path) -> anyhow::Result<()> {
    match which {
        Which::Connect => {
            let status = std::process::Command::new("cargo")
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "--package",
                    "agentd-tests",
                    "--bin",
                    "agentd-bench",
                    "--",
                    "connect",
                ])
                .env("AGENTD_BIN", agentd)
                .status()?;
            anyhow::ensure!(status.success(), "connect benchmark failed: {status}");
            Ok(())
        }
    }
}
