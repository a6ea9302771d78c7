//! The control socket: one JSON request per connection, one JSON reply.
//! Callers are identified by the kernel (SO_PEERCRED), never by what they say.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    access::Action,
    audit::rfc3339,
    cgroup,
    daemon::State,
    error::{Error, IoContext as _, Result},
    maps::Counts,
    sessions::Session,
};

mod caller;
use caller::{Caller, Peer, caller_name, peer_pidfd};

/// Requests larger than this are refused unread.
pub const MAX_REQUEST: usize = 64 * 1024;
/// A client that says nothing for this long is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    List,
    Exec {
        agent: String,
        user: Option<String>,
        argv: Vec<String>,
    },
    Kill {
        agents: Vec<String>,
        all: bool,
        reason: String,
    },
    Restore {
        agents: Vec<String>,
        all: bool,
        reason: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentSummary {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub mode: crate::config::Mode,
    pub cgroup: String,
    pub processes: usize,
    pub rules: usize,
    pub enforcing: bool,
    pub killed: bool,
    /// Who pulled the switch, when and why.
    pub kill: Option<crate::kill::KillRecord>,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListReply {
    pub agents: Vec<AgentSummary>,
    /// Decisions whose audit event was lost (ring buffer full), all agents.
    pub events_lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecReply {
    pub session: String,
    /// The cgroup (relative to the cgroup v2 mount) the caller was moved into.
    pub cgroup: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub killed: bool,
}

/// The envelope of every reply: `ok`, and either `error` or the payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl Reply {
    fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }
}

/// Binds the socket under a temporary name and renames it into place, so
/// the socket path appears only when the daemon is ready to serve. The
/// socket is root's, mode 0660, group `group` (root's group if none): only
/// root and members of that group can connect at all; roles decide the rest.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let gid = match group {
        None => nix::unistd::Gid::from_raw(0),
        Some(name) => {
            nix::unistd::Group::from_name(name)
                .map_err(|e| {
                    Error::Refused(format!("looking up access.socket_group {name:?}: {e}"))
                })?
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "access.socket_group {name:?}: no such group on this host"
                    ))
                })?
                .gid
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("agentd.sock"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|source| Error::Control {
        path: path.to_owned(),
        source,
    })?;
    nix::unistd::chown(&tmp, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
        .map_err(|e| Error::Refused(format!("chown {}: {e}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o660))
        .ctx(|| format!("chmod {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("moving control socket into {}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move { handle_connection(stream, state).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on control socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_connection(stream: UnixStream, state: Arc<State>) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid().unwrap_or(0) as u32,
        },
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials on control connection");
            return;
        }
    };
    // A handle on the caller process itself (Linux 6.5+), so that what we
    // read about it by pid (cgroup, executable) can be confirmed to be
    // about the same process and not a successor that reused the pid.
    let pidfd = peer_pidfd(&stream);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let request = match read {
        Err(_) => Err(format!("no request within {READ_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("reading request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Err(format!("request larger than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(0)) => Err("connection closed before a request".into()),
        Ok(Ok(_)) => {
            serde_json::from_slice::<Request>(&line).map_err(|e| format!("malformed request: {e}"))
        }
    };
    let caller = Caller::identify(peer, pidfd.as_ref(), &state);
    let reply = match request {
        Err(e) => {
            caller.audit(&state, "invalid", None, "refused", Some(&e), None);
            Reply::err(e)
        }
        Ok(req) => dispatch(req, &caller, &state, std::time::Instant::now()),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(READ_TIMEOUT, write.write_all(&out)).await;
}

fn dispatch(req: Request, caller: &Caller, state: &State, received: std::time::Instant) -> Reply {
    let (action, target, reason) = match &req {
        Request::Ping => (Action::Ping, None, None),
        Request::List => (Action::List, None, None),
        Request::Exec { agent, .. } => (Action::Exec, Some(serde_json::json!(agent)), None),
        Request::Kill {
            agents,
            all,
            reason,
        } => (
            Action::Kill,
            Some(targets(agents, *all)),
            Some(reason.clone()),
        ),
        Request::Restore {
            agents,
            all,
            reason,
        } => (
            Action::Restore,
            Some(targets(agents, *all)),
            Some(reason.clone()),
        ),
    };
    let reason = reason.as_deref();
    let refuse = |why: String| {
        caller.audit(
            state,
            action.name(),
            target.clone(),
            "refused",
            Some(&why),
            reason,
        );
        Reply::err(format!("permission denied: {why}"))
    };
    // An agent must never steer agentd, whatever its uid.
    if let Some(agent) = &caller.inside {
        return refuse(format!("the caller runs inside agent {agent:?}"));
    }
    if caller.gone {
        return refuse("the caller exited before it could be identified".into());
    }
    let access = &state.config.access;
    let allowed = match &req {
        Request::Exec { agent, user, .. } => {
            let launchers = state
                .config
                .agent(agent)
                .map(|a| a.launchers.as_slice())
                .unwrap_or_default();
            let as_other = user
                .as_deref()
                .is_some_and(|u| caller.who.user.as_deref() != Some(u));
            // A launcher runs commands as itself; only admins pick the user.
            if as_other && !access.allows(&caller.who, Action::Exec) {
                return refuse(format!(
                    "only admins may run an agent's command as another user ({})",
                    caller_name(caller)
                ));
            }
            access.may_launch(&caller.who, launchers)
        }
        _ => access.allows(&caller.who, action),
    };
    if !allowed {
        let role = access
            .role_of(&caller.who)
            .map_or("no role".to_owned(), |r| {
                format!("role {r:?}").to_lowercase()
            });
        return refuse(format!(
            "{} ({role}) may not {}",
            caller_name(caller),
            action.name()
        ));
    }
    let reply = match req {
        Request::Ping => Ok(serde_json::json!({"pong": true})),
        Request::List => list(state).and_then(to_value),
        Request::Kill {
            agents,
            all,
            reason,
        }
        | Request::Restore {
            agents,
            all,
            reason,
        } => {
            let by = crate::kill::Caller {
                uid: caller.peer.uid,
                user: caller.who.user.clone(),
                pid: caller.peer.pid,
            };
            let kill = action == Action::Kill;
            crate::kill::switch(state, received, &agents, all, &reason, by, kill).and_then(to_value)
        }
        Request::Exec { agent, user, argv } => {
            exec(state, caller, &agent, user, argv).and_then(to_value)
        }
    };
    match reply {
        Ok(data) => {
            caller.audit(state, action.name(), target, "ok", None, reason);
            Reply {
                ok: true,
                error: None,
                data: Some(data),
            }
        }
        Err(e) => {
            let e = e.to_string();
            caller.audit(state, action.name(), target, "error", Some(&e), reason);
            Reply::err(e)
        }
    }
}

fn to_value(v: impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Refused(format!("encoding the reply: {e}")))
}

fn targets(agents: &[String], all: bool) -> serde_json::Value {
    if all {
        serde_json::json!("*")
    } else {
        serde_json::json!(agents)
    }
}

fn list(state: &State) -> Result<ListReply> {
    let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
    let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(agents.len());
    for a in agents.iter() {
        let entry = maps.agent(a.cgroup_id);
        out.push(AgentSummary {
            name: a.name.clone(),
            owner: a.owner.clone(),
            description: a.description.clone(),
            mode: a.mode,
            cgroup: state.cgroups.relative(&a.cgroup_dir),
            processes: cgroup::processes(&a.cgroup_dir)
                .map(|p| p.len())
                .unwrap_or(0),
            rules: a.rules.len(),
            enforcing: entry.is_some(),
            killed: entry.is_some_and(|e| e.flags & agentd_ebpf::AGENT_KILLED != 0),
            kill: state
                .kills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .killed
                .get(&a.name)
                .cloned(),
            counts: maps.counts(a.agent_id)?,
        });
    }
    Ok(ListReply {
        agents: out,
        events_lost: maps.total_events_lost()?,
    })
}

fn exec(
    state: &State,
    caller: &Caller,
    agent: &str,
    user: Option<String>,
    argv: Vec<String>,
) -> Result<ExecReply> {
    let peer = caller.peer;
    if argv.is_empty() {
        return Err(Error::Refused("no command given".into()));
    }
    let (cgroup_dir, killed) = {
        let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
        let a = agents
            .iter()
            .find(|a| a.name == agent)
            .ok_or_else(|| Error::Refused(format!("unknown agent {agent:?}")))?;
        let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
        let killed = maps
            .agent(a.cgroup_id)
            .is_none_or(|e| e.flags & agentd_ebpf::AGENT_KILLED != 0);
        (a.cgroup_dir.clone(), killed)
    };
    let (uid, gid, groups, target_user) = match &user {
        None => (peer.uid, peer.gid, Vec::new(), caller.who.user.clone()),
        Some(name) => {
            let u = nix::unistd::User::from_name(name)
                .map_err(|e| Error::Refused(format!("looking up user {name:?}: {e}")))?
                .ok_or_else(|| Error::Refused(format!("no such user {name:?}")))?;
            let cname = std::ffi::CString::new(name.as_str())
                .map_err(|_| Error::Refused("user name contains NUL".into()))?;
            let groups = nix::unistd::getgrouplist(&cname, u.gid)
                .map_err(|e| Error::Refused(format!("groups of {name:?}: {e}")))?;
            (
                u.uid.as_raw(),
                u.gid.as_raw(),
                groups.into_iter().map(|g| g.as_raw()).collect(),
                Some(name.clone()),
            )
        }
    };
    if peer.pid == 0 {
        return Err(Error::Refused("caller pid unknown".into()));
    }
    // The caller becomes the command: move it (every thread) into the agent
    // before it execs, then confirm with the kernel that it is there.
    cgroup::move_process(&cgroup_dir, peer.pid)?;
    let want = state.cgroups.relative(&cgroup_dir);
    let now = cgroup::process_cgroup(peer.pid)?;
    if now != want {
        return Err(Error::Refused(format!(
            "pid {} is in {now}, not {want}, after the move",
            peer.pid
        )));
    }
    let mut sessions = state.sessions.lock().unwrap_or_else(|p| p.into_inner());
    let session = Session {
        id: sessions.next_id(),
        agent: agent.to_owned(),
        pid: peer.pid,
        requested_by_uid: peer.uid,
        requested_by_user: caller.who.user.clone(),
        requested_by_pid: peer.pid,
        target_uid: uid,
        target_user,
        command: argv,
        started: rfc3339(SystemTime::now()),
        proc_start: crate::sessions::Sessions::process_start(peer.pid),
    };
    let owner = {
        let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
        agents
            .iter()
            .find(|a| a.name == agent)
            .map(|a| a.owner.clone())
    };
    state.audit.record_now(
        "session_start",
        serde_json::json!({
            "agent": agent,
            "owner": owner,
            "session": session.id,
            "pid": session.pid,
            "requested_by_uid": session.requested_by_uid,
            "requested_by_user": session.requested_by_user,
            "requested_by_pid": session.requested_by_pid,
            "target_uid": uid,
            "target_user": session.target_user,
            "command": session.command,
            "killed": killed,
        }),
    );
    let reply = ExecReply {
        session: session.id.clone(),
        cgroup: want,
        uid,
        gid,
        groups,
        killed,
    };
    sessions.insert(session);
    Ok(reply)
}
