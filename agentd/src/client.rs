//! The CLI side of the control socket. Blocking std I/O on purpose: `agentd
//! exec` must stay a single-threaded process so that moving its pid into the
//! agent's cgroup moves all of it.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::de::DeserializeOwned;

use crate::control::{ExecReply, ListReply, Reply, Request};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach agentd at {path}: {source} (is the daemon running? see --socket / AGENTD_SOCKET)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to agentd: {0}")]
    Io(#[from] std::io::Error),
    #[error("agentd sent a reply this client cannot read: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("agentd refused: {0}")]
    Refused(String),
}

/// Sends one request and decodes the payload of a successful reply.
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    let reply: Reply = serde_json::from_str(&reply)?;
    if !reply.ok {
        return Err(ClientError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok(serde_json::from_value(reply.data.unwrap_or_default())?)
}

pub fn list(socket: &Path) -> Result<ListReply, ClientError> {
    call(socket, &Request::List)
}

pub fn ping(socket: &Path) -> Result<serde_json::Value, ClientError> {
    call(socket, &Request::Ping)
}

pub fn exec(
    socket: &Path,
    agent: &str,
    user: Option<&str>,
    argv: &[String],
) -> Result<ExecReply, ClientError> {
    call(
        socket,
        &Request::Exec {
            agent: agent.to_owned(),
            user: user.map(str::to_owned),
            argv: argv.to_vec(),
        },
    )
}

/// Pulls or lifts the kill switch.
pub fn switch(
    socket: &Path,
    kill: bool,
    agents: Vec<String>,
    all: bool,
    reason: &str,
) -> Result<Vec<crate::kill::SwitchOutcome>, ClientError> {
    let reason = reason.to_owned();
    let req = if kill {
        Request::Kill {
            agents,
            all,
            reason,
        }
    } else {
        Request::Restore {
            agents,
            all,
            reason,
        }
    };
    call(socket, &req)
}

/// `agentd kill` / `agentd restore` for people.
pub fn render_switch(
    kill: bool,
    outcomes: &[crate::kill::SwitchOutcome],
    round_trip_us: f64,
) -> String {
    let mut out = String::new();
    for o in outcomes {
        if o.unchanged {
            out.push_str(&format!(
                "{}: already {}; nothing changed",
                o.agent,
                if kill { "killed" } else { "active" }
            ));
            if kill && o.sockets.aborted > 0 {
                out.push_str(&format!(" (swept {} more sockets)", o.sockets.aborted));
            }
            out.push('\n');
        } else if kill {
            out.push_str(&format!(
                "{}: KILLED. Kernel state flipped {:.0} µs after the request; last socket aborted at {:.0} µs; recorded at {:.0} µs.\n\
                 \x20 new connects and sends: refused (EPERM); packets of its sockets: dropped both ways\n\
                 \x20 sockets aborted: {} ({} found through process file descriptors), failed: {}\n\
                 \x20 processes: {} left running for inspection\n",
                o.agent,
                o.flip_us,
                o.sockets.last_abort_us,
                o.total_us,
                o.sockets.aborted,
                o.sockets.via_fd,
                o.sockets.failed,
                o.processes
            ));
        } else {
            out.push_str(&format!(
                "{}: restored; its allowlist applies again ({:.0} µs after the request)\n",
                o.agent, o.flip_us
            ));
        }
    }
    out.push_str(&format!("round trip: {:.0} µs\n", round_trip_us));
    out
}

/// `agentd list` for people.
pub fn render_list(reply: &ListReply) -> String {
    let mut out = format!(
        "{:<24} {:<28} {:<8} {:>6} {:>10} {:>10} {:>10}  {}\n",
        "AGENT", "OWNER", "MODE", "PROCS", "ALLOWED", "DENIED", "AUDITED", "STATE"
    );
    for a in &reply.agents {
        let mode = match a.mode {
            crate::config::Mode::Enforce => "enforce",
            crate::config::Mode::Audit => "audit",
        };
        let state = if a.killed {
            "KILLED"
        } else if a.enforcing {
            "active"
        } else {
            "NOT ENFORCING"
        };
        out.push_str(&format!(
            "{:<24} {:<28} {:<8} {:>6} {:>10} {:>10} {:>10}  {}\n",
            a.name,
            a.owner,
            mode,
            a.processes,
            a.counts.allowed,
            a.counts.denied,
            a.counts.audited,
            state
        ));
    }
    for a in reply.agents.iter().filter(|a| a.killed) {
        if let Some(k) = &a.kill {
            out.push_str(&format!(
                "{} killed at {} by {} (uid {}): {}\n",
                a.name,
                k.at,
                k.by_user.as_deref().unwrap_or("?"),
                k.by_uid,
                k.reason
            ));
        }
    }
    if reply.events_lost > 0 {
        out.push_str(&format!(
            "warning: {} audit events lost (ring buffer full); verdicts and counts above are exact\n",
            reply.events_lost
        ));
    }
    out
}
