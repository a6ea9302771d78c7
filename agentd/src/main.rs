//! The `agentd` binary: the daemon and the CLI that talks to it. Every
//! command prints for people by default and, with `--json`, the reply as
//! JSON (errors too: `{"ok": false, "error": ...}`); the exit status says
//! whether it worked.
use std::{path::Path, process::ExitCode};

use agentd::{
    audit::query::EventFilter,
    cli::{Cli, Command},
    client,
    config::Config,
    daemon, launch, render, teardown,
};
use anyhow::Context as _;
use clap::Parser as _;
use serde::Serialize;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.command.json();
    match run(cli) {
        Ok(code) => code,
        Err(e) if json => {
            println!(
                "{}",
                serde_json::json!({"ok": false, "error": format!("{e:#}")})
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("agentd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the reply: as JSON, or rendered for people.
fn show<T: Serialize>(
    json: bool,
    reply: &T,
    human: impl FnOnce(&T) -> String,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(reply)?);
    } else {
        print!("{}", human(reply));
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let socket = cli.socket.as_path();
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
        Command::CheckConfig { path, json } => match Config::load(&path) {
            Ok(c) => {
                let rules: usize = c.agents.iter().map(|a| a.allow.len()).sum();
                let summary = serde_json::json!({
                    "ok": true,
                    "path": path,
                    "agents": c.agents.len(),
                    "rules": rules,
                });
                show(json, &summary, |_| {
                    format!(
                        "{}: ok ({} agents, {rules} rules)\n",
                        path.display(),
                        c.agents.len()
                    )
                })
            }
            Err(e) if json => {
                println!(
                    "{}",
                    serde_json::json!({
                        "ok": false,
                        "error": e.to_string(),
                        "path": e.path,
                        "line": e.line,
                        "column": e.column,
                        "key": e.key,
                        "message": e.message,
                    })
                );
                Ok(ExitCode::FAILURE)
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
            let err = match launch::exec(socket, &agent, user.as_deref(), &command) {
                Ok(never) => match never {},
                Err(e) => e,
            };
            eprintln!("agentd exec: {err}");
            // 127 like a shell when the command cannot run at all.
            Ok(ExitCode::from(127))
        }
        Command::Adopt {
            agent,
            pid,
            reason,
            json,
        } => {
            if reason.trim().is_empty() {
                anyhow::bail!("--reason must not be empty");
            }
            show(
                json,
                &client::adopt(socket, &agent, pid, &reason)?,
                render::adopt,
            )
        }
        Command::List { json } => show(json, &client::list(socket)?, render::list),
        Command::Status { agent, json } => {
            show(json, &client::status(socket, &agent)?, render::status)
        }
        Command::Events {
            agent,
            verdict,
            event,
            since,
            limit,
            follow,
            json,
        } => {
            let filter = EventFilter {
                agent,
                verdict: verdict.map(Into::into),
                event,
                since,
                limit,
            };
            events(socket, filter, follow, json)
        }
        Command::Kill {
            agent,
            all,
            reason,
            json,
        } => switch(socket, true, agent, all, &reason, json),
        Command::Restore {
            agent,
            all,
            reason,
            json,
        } => switch(socket, false, agent, all, &reason, json),
        Command::Reload { json } => show(json, &client::reload(socket)?, render::reload),
        Command::Completions { shell } => {
            agentd::cli::completions(shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { command } => {
            agentd::cli::man_page(command.as_deref(), &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown {
            config,
            force,
            json,
        } => {
            let config = Config::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            let report = teardown::teardown(&config, force)?;
            show(json, &report, |report| {
                let mut out = String::new();
                for (agent, n) in &report.killed {
                    out.push_str(&format!("killed {n} processes of agent {agent}\n"));
                }
                if report.removed_pins {
                    out.push_str(&format!("removed {}\n", config.daemon.bpffs_dir.display()));
                }
                for dir in &report.removed_cgroups {
                    out.push_str(&format!("removed cgroup {}\n", dir.display()));
                }
                out
            })
        }
    }
}

/// `agentd events`: one line per record, for people or as JSON lines (the
/// records exactly as logged), the same with and without --follow.
fn events(
    socket: &Path,
    filter: EventFilter,
    follow: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    let reply = client::events(socket, filter, follow, |record| {
        let mut out = stdout.lock();
        let line = if json {
            record.to_string()
        } else {
            render::event(record)
        };
        // A closed pipe (`| head`) ends the stream quietly.
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    })?;
    if reply.truncated && !json {
        eprintln!("(older matching records not shown; see --limit and --since)");
    }
    Ok(ExitCode::SUCCESS)
}

fn switch(
    socket: &Path,
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
        print!("{}", render::switch(kill, &outcomes, round_trip));
    }
    Ok(ExitCode::SUCCESS)
}
