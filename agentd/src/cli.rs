//! The command line, defined once: the binary parses it, and completions
//! and the man page are generated from it.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::audit::query::Verdict;

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "Contain AI agents at kernel level: per-agent egress allowlists, audit trail, kill switch"
)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "AGENTD_SOCKET",
        default_value = "/run/agentd/agentd.sock"
    )]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VerdictArg {
    Allow,
    Deny,
    Audit,
}

impl From<VerdictArg> for Verdict {
    fn from(v: VerdictArg) -> Self {
        match v {
            VerdictArg::Allow => Verdict::Allow,
            VerdictArg::Deny => Verdict::Deny,
            VerdictArg::Audit => Verdict::Audit,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: enforce every agent in the config, serve the control socket.
    Daemon {
        #[arg(long, default_value = "/etc/agentd/agentd.toml")]
        config: PathBuf,
    },
    /// Validate a config file; prints the first problem with file, line and key.
    CheckConfig {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
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
    /// Move a running process (all its threads) into an agent; its later
    /// children follow.
    Adopt {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        pid: u32,
        /// Why (recorded in the audit log and shown by `status`).
        #[arg(long, required = true)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// Every agent with owner, mode, live processes and decision counts.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One agent in full: identity, state, processes, sessions, rules,
    /// counts and the latest denied attempts.
    Status {
        agent: String,
        #[arg(long)]
        json: bool,
    },
    /// Query the audit log; --follow streams decisions as they happen.
    Events {
        /// Only records about this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only decisions with this verdict.
        #[arg(long, value_enum)]
        verdict: Option<VerdictArg>,
        /// Only records of this kind (connect, send, socket, control, kill, ...).
        #[arg(long)]
        event: Option<String>,
        /// How far back: a duration (30s, 10m, 2h, 1d) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// The most recent this many records (default 100).
        #[arg(long)]
        limit: Option<usize>,
        /// Keep streaming matching records as they are written.
        #[arg(long)]
        follow: bool,
        /// One JSON object per line: the records exactly as logged.
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
    /// Re-read the daemon's config file and apply it atomically (as SIGHUP does).
    Reload {
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
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (e.g. `agentd completions bash >
    /// /etc/bash_completion.d/agentd`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): agentd(1), or agentd-COMMAND(1) for one
    /// command (e.g. `agentd man kill | man -l -`).
    Man {
        /// A command, for its own page.
        command: Option<String>,
    },
}

/// Completions for `shell`, generated from the definition above.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "agentd", out);
}

/// The man page of agentd, or of one of its commands, as roff.
pub fn man_page(command: Option<&str>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let page = match command {
        None => cmd,
        Some(name) => {
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no command {name:?}; `agentd --help` lists them"),
                )
            })?;
            // The page is named agentd-NAME, as git and systemd name theirs.
            let display = format!("agentd-{name}");
            sub.name(display).version(env!("CARGO_PKG_VERSION"))
        }
    };
    match clap_mangen::Man::new(page).render(out) {
        // `agentd man | head`: the reader has seen what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

impl Command {
    /// Whether the output is JSON (errors then are too).
    pub fn json(&self) -> bool {
        match self {
            Command::Daemon { .. }
            | Command::Exec { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => false,
            Command::CheckConfig { json, .. }
            | Command::Adopt { json, .. }
            | Command::List { json }
            | Command::Status { json, .. }
            | Command::Events { json, .. }
            | Command::Kill { json, .. }
            | Command::Restore { json, .. }
            | Command::Reload { json }
            | Command::Teardown { json, .. } => *json,
        }
    }
}
