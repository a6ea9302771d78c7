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

use crate::{
    audit::query::EventFilter,
    control::{AdoptReply, EventsReply, ExecReply, ListReply, Reply, Request, StatusReply},
    reload::ReloadReport,
};

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

/// How long a reply may take. Generous: a kill of an agent with many
/// sockets, or a reload, takes a second or more on a busy host.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one request and decodes the payload of a successful reply.
pub fn call<T: DeserializeOwned>(socket: &Path, req: &Request) -> Result<T, ClientError> {
    let (_, value) = send(socket, req, Some(REPLY_TIMEOUT))?;
    Ok(value)
}

/// Sends a request and reads the reply line; the stream stays open for
/// whatever follows it.
fn send<T: DeserializeOwned>(
    socket: &Path,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<(BufReader<UnixStream>, T), ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(timeout)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(ClientError::Refused(
            "agentd closed the connection without a reply".into(),
        ));
    }
    let reply: Reply = serde_json::from_str(&reply)?;
    if !reply.ok {
        return Err(ClientError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok((
        reader,
        serde_json::from_value(reply.data.unwrap_or_default())?,
    ))
}

pub fn status(socket: &Path, agent: &str) -> Result<StatusReply, ClientError> {
    call(
        socket,
        &Request::Status {
            agent: agent.to_owned(),
        },
    )
}

pub fn reload(socket: &Path) -> Result<ReloadReport, ClientError> {
    call(socket, &Request::Reload)
}

pub fn adopt(
    socket: &Path,
    agent: &str,
    pid: u32,
    reason: &str,
) -> Result<AdoptReply, ClientError> {
    call(
        socket,
        &Request::Adopt {
            agent: agent.to_owned(),
            pid,
            reason: reason.to_owned(),
        },
    )
}

/// Queries the audit log. With `follow`, `on_record` then gets every
/// matching record as it is written, until it returns false or the daemon
/// closes the stream.
pub fn events(
    socket: &Path,
    filter: EventFilter,
    follow: bool,
    mut on_record: impl FnMut(&serde_json::Value) -> bool,
) -> Result<EventsReply, ClientError> {
    let req = Request::Events { filter, follow };
    // A live stream may be quiet for hours: no read timeout then.
    let timeout = (!follow).then_some(REPLY_TIMEOUT);
    let (mut reader, reply): (_, EventsReply) = send(socket, &req, timeout)?;
    for e in &reply.events {
        if !on_record(e) {
            return Ok(reply);
        }
    }
    if reply.following {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
            let record: serde_json::Value = serde_json::from_str(&line)?;
            if !on_record(&record) {
                break;
            }
        }
    }
    Ok(reply)
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
