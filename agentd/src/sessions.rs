//! Sessions: each `agentd exec` is one, recorded with who asked for it, apart
//! from the agent's identity. Decisions are attributed to a session by
//! walking the deciding process's ancestry up to a session's first process.
use std::{
    collections::HashMap,
    fs,
    time::{Instant, SystemTime},
};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
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
}

#[derive(Default)]
pub struct Sessions {
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
        self.by_pid.insert(session.pid, session);
    }

    pub fn all(&self) -> impl Iterator<Item = &Session> {
        self.by_pid.values()
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

/// The parent pid from /proc/PID/stat (the field after the `(comm)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}
