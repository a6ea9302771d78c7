//! The `agentd` binary: the daemon and the CLI that talks to it.
use std::{path::PathBuf, process::ExitCode};

use agentd::{client, config::Config, daemon, launch, teardown};
use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "Contain AI agents at kernel level: per-agent egress allowlists, audit trail, kill switch"
)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "AGENTD_SOCKET",
        default_value = "/run/agentd/agentd.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: enforce every agent in the config, serve the control socket.
    Daemon {
        #[arg(long, default_value = "/etc/agentd/agentd.toml")]
        config: PathBuf,
    },
    /// Validate a config file; prints the first problem with file, line and key.
    CheckConfig { path: PathBuf },
    /// Run a command inside an agent (its children and threads included).
    Exec {
        #[arg(long)]
        agent: String,
        /// Run as this user (uid, gid and groups from the user database).
        #[arg(long)]
        user: Option<String>,
        #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Every agent with owner, mode, live processes and decision counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cut all of an agent's network access now; its processes keep running.
    Kill {
        /// The agent (or --all).
        agent: Option<String>,
        #[arg(long, conflicts_with = "agent")]
        all: bool,
        /// Why (recorded in the audit log and shown by `list`).
        #[arg(long, required = true)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Lift the kill switch: the agent's allowlist applies again.
    Restore {
        agent: Option<String>,
        #[arg(long, conflicts_with = "agent")]
        all: bool,
        #[arg(long, required = true)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove everything agentd installed (the daemon must be stopped).
    Teardown {
        #[arg(long, default_value = "/etc/agentd/agentd.toml")]
        config: PathBuf,
        /// Kill agent processes that are still running instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agentd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Daemon { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            // The daemon serves where its config says; --socket is for clients.
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(daemon::run(config))
                .context("agentd daemon")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { path } => match Config::load(&path) {
            Ok(c) => {
                let rules: usize = c.agents.iter().map(|a| a.allow.len()).sum();
                println!(
                    "{}: ok ({} agents, {} rules)",
                    path.display(),
                    c.agents.len(),
                    rules
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Exec {
            agent,
            user,
            command,
        } => {
            let err = match launch::exec(&cli.socket, &agent, user.as_deref(), &command) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            eprintln!("agentd exec: {err}");
            // 127 like a shell when the command cannot run at all.
            Ok(ExitCode::from(127))
        }
        Command::List { json } => {
            let reply = client::list(&cli.socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", client::render_list(&reply));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kill {
            agent,
            all,
            reason,
            json,
        } => switch(&cli.socket, true, agent, all, &reason, json),
        Command::Restore {
            agent,
            all,
            reason,
            json,
        } => switch(&cli.socket, false, agent, all, &reason, json),
        Command::Teardown { config, force } => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let report = teardown::teardown(&config, force)?;
            for (agent, n) in &report.killed {
                println!("killed {n} processes of agent {agent}");
            }
            if report.removed_pins {
                println!("removed {}", config.daemon.bpffs_dir.display());
            }
            for dir in &report.removed_cgroups {
                println!("removed cgroup {}", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn switch(
    socket: &std::path::Path,
    kill: bool,
    agent: Option<String>,
    all: bool,
    reason: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !all && agent.is_none() {
        anyhow::bail!("name an agent or pass --all");
    }
    if reason.trim().is_empty() {
        anyhow::bail!("--reason must not be empty");
    }
    let started = std::time::Instant::now();
    let outcomes = client::switch(socket, kill, agent.into_iter().collect(), all, reason)?;
    let round_trip = started.elapsed().as_secs_f64() * 1e6;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "outcomes": outcomes,
                "round_trip_us": round_trip,
            }))?
        );
    } else {
        print!("{}", client::render_switch(kill, &outcomes, round_trip));
    }
    Ok(ExitCode::SUCCESS)
}
