//! `agentd exec`: ask the daemon to put this process into the agent's cgroup,
//! check that it is there, drop to the target user, then become the command.
use std::{convert::Infallible, ffi::CString, path::Path};

use nix::unistd::{Gid, Uid, execvp, getgid, getuid, setgid, setgroups, setuid};

use crate::{cgroup, client};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(
        "after joining the agent this process is in {actual}, expected {expected}; refusing to run the command"
    )]
    WrongCgroup { actual: String, expected: String },
    #[error("switching to uid {uid}: {source}")]
    Identity {
        uid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot run {command:?}: {source}")]
    Exec {
        command: String,
        #[source]
        source: nix::Error,
    },
    #[error("argument contains a NUL byte")]
    Nul,
    #[error("{0}")]
    Other(String),
}

/// Never returns on success: the process becomes the command.
pub fn exec(
    socket: &Path,
    agent: &str,
    user: Option<&str>,
    argv: &[String],
) -> Result<Infallible, LaunchError> {
    let cargs: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| LaunchError::Nul))
        .collect::<Result<_, _>>()?;
    let reply = client::exec(socket, agent, user, argv)?;
    let actual = cgroup::process_cgroup(std::process::id())
        .map_err(|e| LaunchError::Other(e.to_string()))?;
    if actual != reply.cgroup {
        return Err(LaunchError::WrongCgroup {
            actual,
            expected: reply.cgroup,
        });
    }
    if reply.killed {
        eprintln!(
            "agentd: warning: agent {agent} is KILLED: the command runs with no network access"
        );
    }
    if user.is_some() {
        let identity = |source| LaunchError::Identity {
            uid: reply.uid,
            source,
        };
        let groups: Vec<Gid> = reply.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        // Order matters: groups and gid while still privileged, uid last.
        setgroups(&groups).map_err(identity)?;
        setgid(Gid::from_raw(reply.gid)).map_err(identity)?;
        setuid(Uid::from_raw(reply.uid)).map_err(identity)?;
        if getuid().as_raw() != reply.uid || getgid().as_raw() != reply.gid {
            return Err(LaunchError::Other("identity switch did not take".into()));
        }
    }
    let err = execvp(&cargs[0], &cargs).unwrap_err();
    Err(LaunchError::Exec {
        command: argv[0].clone(),
        source: err,
    })
}
