//! Benchmarks. Each runs its variants side by side in one run, interleaved,
//! and reports ratios rather than asserting absolute times.
use std::path::Path;

use clap::Subcommand;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// connect+close loop: uncontained vs 10 rules vs 100 000 rules.
    Connect,
    /// kill/restore of an agent holding 10 000 connections.
    Kill,
    /// DNS query latency through agentd's resolver vs straight to the upstream.
    Dns,
}

pub fn run(which: Which, agentd: &Path) -> anyhow::Result<()> {
    let arg = match which {
        Which::Connect => "connect",
        Which::Kill => "kill",
        Which::Dns => "dns",
    };
    match which {
        Which::Connect | Which::Kill | Which::Dns => {
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
                    arg,
                ])
                .env("AGENTD_BIN", agentd)
                .status()?;
            anyhow::ensure!(status.success(), "{arg} benchmark failed: {status}");
            Ok(())
        }
    }
}
