//! Who is on the other end of a control connection: the kernel's word
//! (SO_PEERCRED, SO_PEERPIDFD) and the user database's, never the client's.
use std::fs;

use tokio::net::UnixStream;

use crate::{access::Identity, cgroup, daemon::State};

/// Who is asking, from the kernel.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// `SO_PEERPIDFD` (Linux 6.5+): a pidfd for the peer process.
pub(super) fn peer_pidfd(stream: &UnixStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new descriptor we now own.
    (rc == 0 && fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has exited (the pidfd is readable).
fn exited(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsFd as _;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

/// A caller, identified by the kernel and the user database.
pub(super) struct Caller {
    pub peer: Peer,
    pub who: Identity,
    pub exe: Option<String>,
    /// The agent the caller runs inside, if any (unreadable counts as inside).
    pub inside: Option<String>,
    /// The caller exited while we looked it up (its pid may be another's).
    pub gone: bool,
}

impl Caller {
    pub fn identify(peer: Peer, pidfd: Option<&std::os::fd::OwnedFd>, state: &State) -> Self {
        let exe = fs::read_link(format!("/proc/{}/exe", peer.pid))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let inside = caller_agent(state, peer.pid);
        Self {
            peer,
            who: Identity::of_uid(peer.uid),
            exe,
            inside,
            // Checked after the reads by pid: if the caller is still there,
            // they were about the caller.
            gone: pidfd.is_some_and(exited),
        }
    }

    /// One audit event per request: who, what, on what, and how it ended.
    pub fn audit(
        &self,
        state: &State,
        action: &str,
        target: Option<serde_json::Value>,
        result: &str,
        error: Option<&str>,
        reason: Option<&str>,
    ) {
        state.metrics.control_request(action, result);
        state.audit.record_now(
            "control",
            serde_json::json!({
                "action": action,
                "target": target,
                "result": result,
                "error": error,
                "reason": reason,
                "uid": self.peer.uid,
                "user": self.who.user,
                "pid": self.peer.pid,
                "exe": self.exe,
            }),
        );
    }
}

pub(super) fn caller_name(caller: &Caller) -> String {
    caller
        .who
        .user
        .clone()
        .unwrap_or_else(|| format!("uid {}", caller.peer.uid))
}

/// The agent whose cgroup (or a cgroup below it) holds the process, if any.
fn caller_agent(state: &State, pid: u32) -> Option<String> {
    // Unknown membership is treated as inside: fail closed.
    let Ok(path) = cgroup::process_cgroup(pid) else {
        return Some("<unknown: caller's cgroup unreadable>".into());
    };
    agent_at(state, &path)
}

/// The agent a cgroup path (as /proc/PID/cgroup shows it) belongs to: a
/// configured agent's cgroup or one below it, or anything under agentd's
/// cgroup root (agents removed from the config included).
pub(super) fn agent_at(state: &State, path: &str) -> Option<String> {
    let within = |dir: &str| path == dir || path.starts_with(&format!("{dir}/"));
    let agents = state.agents.read().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = agents
        .iter()
        .find(|a| within(&state.cgroups.relative(&a.cgroup_dir)))
    {
        return Some(a.name.clone());
    }
    let root = state.cgroups.relative(&state.cgroups.root);
    let rest = path.strip_prefix(&root)?.strip_prefix('/')?;
    Some(rest.split('/').next().unwrap_or(rest).to_owned())
}
