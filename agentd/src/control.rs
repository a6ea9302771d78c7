//! The control socket: one JSON request per connection, one JSON reply
//! (`events --follow` then streams). Callers are identified by the kernel
//! (SO_PEERCRED, SO_PEERPIDFD), never by what they say; every request,
//! allowed, refused or unreadable, is one audit record.
use std::{
    collections::HashMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream, unix::OwnedWriteHalf},
    sync::Semaphore,
};

use crate::{
    access::Action,
    daemon::State,
    error::{Error, IoContext as _, Result},
};

mod admit;
mod caller;
mod follow;
mod protocol;
use caller::{Caller, Peer, caller_name, peer_pidfd};
pub use protocol::*;

/// Requests larger than this are refused unread.
pub const MAX_REQUEST: usize = 64 * 1024;
/// A client that says nothing for this long is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that does not take its reply within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// Connections one uid may hold at once, so that one caller's flood cannot
/// take every slot from a responder who needs one.
const MAX_PER_UID: usize = 32;

/// Binds the socket under a temporary name and renames it into place, so
/// the socket path appears only when the daemon is ready to serve. The
/// socket is root's, mode 0660, group `group` (root's group if none): only
/// root and members of that group can connect at all; roles decide the rest.
pub fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    let gid = socket_gid(group)?;
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

/// The gid the socket belongs to: `group`'s, or root's when there is none.
/// A group that does not exist is an error, never a silent fallback.
pub fn socket_gid(group: Option<&str>) -> Result<nix::unistd::Gid> {
    let Some(name) = group else {
        return Ok(nix::unistd::Gid::from_raw(0));
    };
    Ok(nix::unistd::Group::from_name(name)
        .map_err(|e| Error::Refused(format!("looking up access.socket_group {name:?}: {e}")))?
        .ok_or_else(|| {
            Error::Refused(format!(
                "access.socket_group {name:?}: no such group on this host"
            ))
        })?
        .gid)
}

/// Gives the socket to another group (a reload changed `socket_group`).
pub fn regroup(path: &Path, gid: nix::unistd::Gid) -> Result<()> {
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
        .map_err(|e| Error::Refused(format!("chown {}: {e}", path.display())))
}

/// Accepts connections until the daemon stops. A flood is bounded twice:
/// by the number of connections served at once, and per caller uid.
pub async fn serve(listener: UnixListener, state: Arc<State>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_uid: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                let per_uid = per_uid.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    handle_connection(stream, state, per_uid).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept on control socket failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Holds one of a uid's connection slots until dropped.
struct UidSlot {
    uid: u32,
    table: Arc<Mutex<HashMap<u32, usize>>>,
}

impl UidSlot {
    fn take(table: &Arc<Mutex<HashMap<u32, usize>>>, uid: u32) -> Option<Self> {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(uid).or_insert(0);
        if *n >= MAX_PER_UID {
            return None;
        }
        *n += 1;
        Some(Self {
            uid,
            table: table.clone(),
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.uid);
            }
        }
    }
}

async fn send(write: &mut OwnedWriteHalf, reply: &Reply) -> bool {
    let mut out = serde_json::to_vec(reply).unwrap_or_default();
    out.push(b'\n');
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await,
        Ok(Ok(()))
    )
}

async fn handle_connection(
    stream: UnixStream,
    state: Arc<State>,
    per_uid: Arc<Mutex<HashMap<u32, usize>>>,
) {
    let received = Instant::now();
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
    let Some(_slot) = UidSlot::take(&per_uid, peer.uid) else {
        // Not audited line by line: that would let a flood fill the disk.
        let busy = format!(
            "busy: uid {} already has {MAX_PER_UID} requests in progress; try again",
            peer.uid
        );
        state.metrics.control_request("none", "busy");
        send(&mut write, &Reply::err(busy)).await;
        return;
    };
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
        Ok(Ok(_)) if line.last() != Some(&b'\n') => {
            Err("connection closed in the middle of a request".into())
        }
        Ok(Ok(_)) => decode(&line),
    };
    let caller = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || Caller::identify(peer, pidfd.as_ref(), &state)).await
    };
    let Ok(caller) = caller else {
        send(&mut write, &Reply::err("identifying the caller failed")).await;
        return;
    };
    match request {
        Err(e) => {
            caller.audit(&state, "invalid", None, "refused", Some(&e), None);
            send(&mut write, &Reply::err(e)).await;
        }
        Ok(Request::Events { filter, follow }) => {
            follow::events(state, caller, filter, follow, reader, write).await;
        }
        Ok(req) => {
            // Requests do blocking work (netlink, /proc, map syscalls): off
            // the threads that serve other connections.
            let state = state.clone();
            let reply =
                tokio::task::spawn_blocking(move || dispatch(req, &caller, &state, received))
                    .await
                    .unwrap_or_else(|e| Reply::err(format!("internal error: {e}")));
            send(&mut write, &reply).await;
        }
    }
}

/// Decodes one request line. Public for the fuzzer: nothing a client sends
/// may make it panic.
pub fn decode(line: &[u8]) -> std::result::Result<Request, String> {
    serde_json::from_slice::<Request>(line).map_err(|e| format!("malformed request: {e}"))
}

/// What a request asks, on what, and why: for the check and the record.
fn describe(req: &Request) -> (Action, Option<serde_json::Value>, Option<String>) {
    use serde_json::json;
    match req {
        Request::Ping => (Action::Ping, None, None),
        Request::List => (Action::List, None, None),
        Request::Status { agent } => (Action::Status, Some(json!(agent)), None),
        Request::Events { filter, .. } => (
            Action::Events,
            filter.agent.as_ref().map(|a| json!(a)),
            None,
        ),
        Request::Exec { agent, .. } => (Action::Exec, Some(json!(agent)), None),
        Request::Adopt { agent, reason, .. } => {
            (Action::Adopt, Some(json!(agent)), Some(reason.clone()))
        }
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
        Request::Reload => (Action::Reload, None, None),
    }
}

/// Whether this caller may make this request; the reason if not.
fn authorize(
    req: &Request,
    action: Action,
    caller: &Caller,
    state: &State,
) -> std::result::Result<(), String> {
    // An agent must never steer agentd, whatever its uid.
    if let Some(agent) = &caller.inside {
        return Err(format!("the caller runs inside agent {agent:?}"));
    }
    if caller.gone {
        return Err("the caller exited before it could be identified".into());
    }
    let config = state.config();
    let access = &config.access;
    let allowed = match req {
        Request::Exec { agent, user, .. } => {
            let launchers = config
                .agent(agent)
                .map(|a| a.launchers.as_slice())
                .unwrap_or_default();
            let as_other = user
                .as_deref()
                .is_some_and(|u| caller.who.user.as_deref() != Some(u));
            // A launcher runs commands as itself; only admins pick the user.
            if as_other && !access.allows(&caller.who, Action::Exec) {
                return Err(format!(
                    "only admins may run an agent's command as another user ({})",
                    caller_name(caller)
                ));
            }
            access.may_launch(&caller.who, launchers)
        }
        _ => access.allows(&caller.who, action),
    };
    if allowed {
        return Ok(());
    }
    let role = access
        .role_of(&caller.who)
        .map_or("no role".to_owned(), |r| {
            format!("role {r:?}").to_lowercase()
        });
    Err(format!(
        "{} ({role}) may not {}",
        caller_name(caller),
        action.name()
    ))
}

fn dispatch(req: Request, caller: &Caller, state: &Arc<State>, received: Instant) -> Reply {
    let (action, target, reason) = describe(&req);
    let reason = reason.as_deref();
    if let Err(why) = authorize(&req, action, caller, state) {
        caller.audit(state, action.name(), target, "refused", Some(&why), reason);
        return Reply::err(format!("permission denied: {why}"));
    }
    let reply = match req {
        Request::Ping => Ok(serde_json::json!({"pong": true})),
        Request::List => crate::views::list(state).and_then(to_value),
        Request::Status { agent } => crate::views::status(state, &agent).and_then(to_value),
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
            admit::exec(state, caller, &agent, user, argv).and_then(to_value)
        }
        Request::Adopt { agent, pid, reason } => {
            admit::adopt(state, caller, &agent, pid, &reason).and_then(to_value)
        }
        Request::Reload => crate::reload::reload(state).and_then(to_value),
        // Served by `follow::events` before dispatch.
        Request::Events { .. } => Err(Error::Refused("events is not served here".into())),
    };
    match reply {
        Ok(data) => {
            caller.audit(state, action.name(), target, "ok", None, reason);
            Reply::ok(data)
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
