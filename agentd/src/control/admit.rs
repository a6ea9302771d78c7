//! Bringing processes into an agent: `exec` (the caller becomes the agent's
//! command) and `adopt` (a process that already runs is moved in). Either
//! way the move is one write to `cgroup.procs` (the whole thread group), is
//! confirmed with the kernel afterwards, and starts a session on record.
use std::{fs, path::PathBuf, time::SystemTime};

use agentd_ebpf::AGENT_KILLED;

use super::{AdoptReply, ExecReply, caller::Caller};
use crate::{
    audit::rfc3339,
    cgroup,
    daemon::State,
    error::{Error, Result},
    sessions::{Session, Sessions},
    sockets,
};

/// The agent as a move target.
struct Target {
    cgroup_dir: PathBuf,
    /// Relative to the cgroup v2 mount, as /proc/PID/cgroup shows it.
    cgroup: String,
    owner: String,
    killed: bool,
}

fn target(state: &State, agent: &str) -> Result<Target> {
    let a = state
        .agent(agent)
        .ok_or_else(|| Error::Refused(format!("unknown agent {agent:?}")))?;
    let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    // No entry in the kernel means nothing would judge it: say killed so
    // the launcher warns, and the hooks deny (identity without an agent).
    let killed = maps
        .agent(a.cgroup_id)
        .is_none_or(|e| e.flags & AGENT_KILLED != 0);
    Ok(Target {
        cgroup: state.cgroups.relative(&a.cgroup_dir),
        cgroup_dir: a.cgroup_dir,
        owner: a.owner,
        killed,
    })
}

/// Moves the whole process into the agent and checks with the kernel that
/// every one of its threads is there. Returns the number of threads.
fn move_in(t: &Target, pid: u32) -> Result<usize> {
    cgroup::move_process(&t.cgroup_dir, pid)?;
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| Error::Refused(format!("listing threads of pid {pid}: {e}")))?;
    let mut threads = 0;
    for task in tasks.flatten() {
        let path = task.path().join("cgroup");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let now = text.lines().find_map(|l| l.strip_prefix("0::"));
        // A thread that exited between listing and reading is not a miss.
        if now.is_some_and(|now| now != t.cgroup) {
            return Err(Error::Refused(format!(
                "thread {} of pid {pid} is in {}, not {}, after the move",
                task.file_name().to_string_lossy(),
                now.unwrap_or("?"),
                t.cgroup
            )));
        }
        threads += 1;
    }
    Ok(threads)
}

fn start_session(state: &State, session: Session, owner: &str, killed: bool) {
    state.audit.record_now(
        "session_start",
        serde_json::json!({
            "agent": session.agent,
            "owner": owner,
            "session": session.id,
            "how": session.how,
            "pid": session.pid,
            "requested_by_uid": session.requested_by_uid,
            "requested_by_user": session.requested_by_user,
            "requested_by_pid": session.requested_by_pid,
            "target_uid": session.target_uid,
            "target_user": session.target_user,
            "command": session.command,
            "reason": session.reason,
            "killed": killed,
        }),
    );
    state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(session);
}

fn next_id(state: &State) -> String {
    state
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .next_id()
}

pub(super) fn exec(
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
    let t = target(state, agent)?;
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
    // before it execs.
    move_in(&t, peer.pid)?;
    let session = Session {
        id: next_id(state),
        agent: agent.to_owned(),
        pid: peer.pid,
        requested_by_uid: peer.uid,
        requested_by_user: caller.who.user.clone(),
        requested_by_pid: peer.pid,
        target_uid: uid,
        target_user,
        command: argv,
        started: rfc3339(SystemTime::now()),
        how: "exec".into(),
        reason: None,
        proc_start: Sessions::process_start(peer.pid),
    };
    let reply = ExecReply {
        session: session.id.clone(),
        cgroup: t.cgroup.clone(),
        uid,
        gid,
        groups,
        killed: t.killed,
    };
    start_session(state, session, &t.owner, t.killed);
    Ok(reply)
}

pub(super) fn adopt(
    state: &State,
    caller: &Caller,
    agent: &str,
    pid: u32,
    reason: &str,
) -> Result<AdoptReply> {
    if reason.trim().is_empty() {
        return Err(Error::Refused("a reason is required".into()));
    }
    if pid <= 1 || pid == std::process::id() {
        return Err(Error::Refused(format!(
            "pid {pid} cannot be adopted (init or agentd itself)"
        )));
    }
    let t = target(state, agent)?;
    let current = cgroup::process_cgroup(pid)
        .map_err(|_| Error::Refused(format!("no such process: pid {pid}")))?;
    if current == t.cgroup || current.starts_with(&format!("{}/", t.cgroup)) {
        return Err(Error::Refused(format!(
            "pid {pid} is already in agent {agent:?}"
        )));
    }
    // Moving a process out of another agent could widen what it reaches.
    if let Some(other) = super::caller::agent_at(state, &current) {
        return Err(Error::Refused(format!(
            "pid {pid} belongs to agent {other:?}; agentd does not move processes between agents"
        )));
    }
    let proc_start = Sessions::process_start(pid);
    let sockets_before = sockets::held_inet_sockets(&[pid]).unwrap_or(0);
    let threads = move_in(&t, pid)?;
    // The pid must still be the process we looked at.
    if Sessions::process_start(pid) != proc_start {
        return Err(Error::Refused(format!(
            "pid {pid} exited and was reused during the move; check `agentd status {agent}`"
        )));
    }
    let command = crate::sessions::process_cmdline(pid);
    let (uid, target_user) = crate::sessions::process_user(pid);
    let uid = uid.unwrap_or(u32::MAX);
    let session = Session {
        id: next_id(state),
        agent: agent.to_owned(),
        pid,
        requested_by_uid: caller.peer.uid,
        requested_by_user: caller.who.user.clone(),
        requested_by_pid: caller.peer.pid,
        target_uid: uid,
        target_user,
        command,
        started: rfc3339(SystemTime::now()),
        how: "adopt".into(),
        reason: Some(reason.to_owned()),
        proc_start,
    };
    let reply = AdoptReply {
        session: session.id.clone(),
        agent: agent.to_owned(),
        pid,
        threads,
        cgroup: t.cgroup.clone(),
        killed: t.killed,
        sockets_before,
    };
    start_session(state, session, &t.owner, t.killed);
    Ok(reply)
}
