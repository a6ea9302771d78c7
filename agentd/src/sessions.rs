//! Sessions: each `agentd exec` is one, recorded with who asked for it, apart
//! from the agent's identity. Decisions are attributed to a session by
//! walking the deciding process's ancestry up to a session's first process.
use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub agent: String,
    /// The process `agentd exec` became (the command).
    pub pid: u32,
    pub requested_by_uid: u32,
    pub requested_by_user: Option<String>,
    pub requested_by_pid: u32,
    pub target_uid: u32,
    pub target_user: Option<String>,
    pub command: Vec<String>,
    pub started: String,
    /// `exec` (started by `agentd exec`) or `adopt` (a running process
    /// moved in by `agentd adopt`).
    #[serde(default = "exec_kind")]
    pub how: String,
    /// Why, for adoptions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The process's start time (clock ticks since boot, /proc/PID/stat
    /// field 22): tells a live session's process from a reused pid.
    #[serde(default)]
    pub proc_start: u64,
}

fn exec_kind() -> String {
    "exec".into()
}

impl Session {
    /// Whether the session's first process still runs (same pid, same start).
    pub fn alive(&self) -> bool {
        self.proc_start != 0 && start_time(self.pid) == Some(self.proc_start)
    }
}

#[derive(Default)]
pub struct Sessions {
    /// `state_dir/sessions.jsonl`: sessions survive a daemon restart.
    file: Option<PathBuf>,
    by_pid: HashMap<u32, Session>,
    /// pid -> session id (or none) found by walking ancestry; bounded and
    /// refreshed because pids are reused.
    cache: HashMap<u32, Option<String>>,
    cache_since: Option<Instant>,
    counter: u64,
}

const MAX_CACHE: usize = 65_536;
const MAX_SESSIONS: usize = 65_536;

impl Sessions {
    /// Loads the sessions whose process still runs (same pid and start
    /// time) from `state_dir`, and compacts the file to those.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("sessions.jsonl");
        let mut me = Self {
            file: Some(path.clone()),
            ..Self::default()
        };
        let text = fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines() {
            let Ok(s) = serde_json::from_str::<Session>(line) else {
                continue;
            };
            if s.proc_start != 0 && start_time(s.pid) == Some(s.proc_start) {
                me.by_pid.insert(s.pid, s);
            }
        }
        let kept: String = me
            .by_pid
            .values()
            .filter_map(|s| serde_json::to_string(s).ok())
            .map(|l| l + "\n")
            .collect();
        if let Err(e) = fs::write(&path, kept) {
            tracing::warn!(error = %e, path = %path.display(), "cannot rewrite session state");
        }
        me
    }

    /// The start time of a live process, for [`Session::proc_start`].
    pub fn process_start(pid: u32) -> u64 {
        start_time(pid).unwrap_or(0)
    }

    /// A new session id: time-ordered and unique within this host.
    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        format!(
            "s-{:x}-{:x}-{}",
            now.as_secs(),
            std::process::id(),
            self.counter
        )
    }

    pub fn insert(&mut self, session: Session) {
        if self.by_pid.len() >= MAX_SESSIONS {
            // Forget sessions whose first process is gone.
            self.by_pid
                .retain(|pid, _| fs::metadata(format!("/proc/{pid}")).is_ok());
        }
        self.cache.clear();
        if let Some(path) = &self.file {
            let line = serde_json::to_string(&session).unwrap_or_default() + "\n";
            let appended = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
            if let Err(e) = appended {
                tracing::warn!(error = %e, path = %path.display(), "cannot persist session");
            }
        }
        self.by_pid.insert(session.pid, session);
    }

    /// The agent's sessions, most recent first.
    pub fn of_agent(&self, agent: &str) -> Vec<Session> {
        let mut out: Vec<Session> = self
            .by_pid
            .values()
            .filter(|s| s.agent == agent)
            .cloned()
            .collect();
        out.sort_by(|a, b| b.started.cmp(&a.started).then(b.id.cmp(&a.id)));
        out
    }

    /// The session a process belongs to, if it (or an ancestor, up to 64
    /// generations) started one. Best effort: a process that has already
    /// exited cannot be walked.
    pub fn session_of(&mut self, pid: u32) -> Option<String> {
        let stale = self
            .cache_since
            .is_none_or(|t| t.elapsed().as_secs() >= 5 || self.cache.len() >= MAX_CACHE);
        if stale {
            self.cache.clear();
            self.cache_since = Some(Instant::now());
        }
        if let Some(hit) = self.cache.get(&pid) {
            return hit.clone();
        }
        let mut cur = pid;
        let mut found = None;
        for _ in 0..64 {
            if let Some(s) = self.by_pid.get(&cur) {
                found = Some(s.id.clone());
                break;
            }
            match parent_of(cur) {
                Some(p) if p > 1 => cur = p,
                _ => break,
            }
        }
        self.cache.insert(pid, found.clone());
        found
    }
}

/// The arguments a process shows (/proc/PID/cmdline); empty once it exited.
pub fn process_cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// A process's effective uid and that user's name, where known.
pub fn process_user(pid: u32) -> (Option<u32>, Option<String>) {
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| effective_uid(&s));
    let user = uid.and_then(|u| {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
            .ok()
            .flatten()
            .map(|u| u.name)
    });
    (uid, user)
}

/// The effective uid from /proc/PID/status (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // After "(comm)": field 3 is the first; field 22 is the 20th from here.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The parent pid from /proc/PID/stat (the field after the `(comm)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn effective_uid_is_the_second_field() {
        let status = "Name:\tsh\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(super::effective_uid(status), Some(0));
        assert_eq!(super::effective_uid("Name:\tsh\n"), None);
    }
}
