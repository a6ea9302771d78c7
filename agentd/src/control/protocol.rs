//! What goes over the control socket: one JSON request line from the client,
//! one JSON reply line back (`events --follow` then streams records, one per
//! line). These types are the `--json` schema of the CLI as well: fields are
//! added, never renamed or removed.
use serde::{Deserialize, Serialize};

use crate::{audit::query::EventFilter, config::Mode, kill::KillRecord, maps::Counts};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Ping,
    List,
    Status {
        agent: String,
    },
    Events {
        #[serde(default)]
        filter: EventFilter,
        /// Keep the connection open and stream matching records as they
        /// are written.
        #[serde(default)]
        follow: bool,
    },
    Exec {
        agent: String,
        user: Option<String>,
        argv: Vec<String>,
    },
    Adopt {
        agent: String,
        pid: u32,
        reason: String,
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
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentSummary {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub mode: Mode,
    pub cgroup: String,
    /// The cgroup exists apart from agentd (a bound service cgroup).
    #[serde(default)]
    pub bound: bool,
    pub processes: usize,
    pub rules: usize,
    pub enforcing: bool,
    pub killed: bool,
    /// Who pulled the switch, when and why.
    pub kill: Option<KillRecord>,
    #[serde(flatten)]
    pub counts: Counts,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListReply {
    pub agents: Vec<AgentSummary>,
    /// Agents removed from the config whose processes still run: no
    /// network at all until the last one exits.
    #[serde(default)]
    pub contained: Vec<ContainedAgent>,
    /// Decisions whose audit event was lost (ring buffer full), all agents.
    pub events_lost: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainedAgent {
    pub name: String,
    pub cgroup: String,
    pub processes: usize,
}

/// Where an agent stands, in one word.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Enforcing its allowlist (or auditing, in audit mode).
    Active,
    /// The kill switch is pulled: no network at all.
    Killed,
    /// The kernel holds no entry for it: agentd is not enforcing here.
    NotEnforcing,
    /// Bound to a cgroup that does not exist now (the service is stopped):
    /// enforcement is armed the moment it appears.
    Waiting,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub uid: Option<u32>,
    pub user: Option<String>,
    /// Arguments as the process shows them (/proc/PID/cmdline).
    pub cmdline: Vec<String>,
    pub session: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    /// How the process came in: `exec` or `adopt`.
    pub how: String,
    pub pid: u32,
    /// Whether that process still runs.
    pub alive: bool,
    pub requested_by_uid: u32,
    pub requested_by_user: Option<String>,
    pub target_user: Option<String>,
    pub command: Vec<String>,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleInfo {
    /// Short form, e.g. `10.20.0.0/16 tcp 443`.
    pub rule: String,
    /// Line in the config file.
    pub line: usize,
}

/// Addresses one allowed name resolved to, allowed now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LearnedInfo {
    pub name: String,
    pub addresses: Vec<String>,
    /// Seconds until the last of them leaves the allow map.
    pub expires_in_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReply {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub mode: Mode,
    pub cgroup: String,
    #[serde(default)]
    pub bound: bool,
    pub state: AgentState,
    pub kill: Option<KillRecord>,
    /// Live processes (at most [`crate::views::MAX_PROCESSES`] listed).
    pub processes: Vec<ProcessInfo>,
    pub processes_total: usize,
    pub sessions: Vec<SessionInfo>,
    pub rules: Vec<RuleInfo>,
    /// Addresses agentd's resolver has answered for the agent's hostname
    /// rules and that are allowed now.
    #[serde(default)]
    pub learned_addresses: usize,
    /// The names behind them, by name (at most
    /// [`crate::views::MAX_LEARNED_LISTED`] listed).
    #[serde(default)]
    pub learned: Vec<LearnedInfo>,
    pub counts: Counts,
    /// The latest denied attempts from the audit log, oldest first, as
    /// `agentd events` prints them.
    pub recent_denied: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventsReply {
    /// Matching audit records, oldest first, exactly as logged.
    pub events: Vec<serde_json::Value>,
    /// More matched than the limit (or the scan reached its bound).
    pub truncated: bool,
    /// Records follow on this connection, one per line.
    pub following: bool,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdoptReply {
    pub session: String,
    pub agent: String,
    pub pid: u32,
    /// Threads of the process, all of which moved with it.
    pub threads: usize,
    pub cgroup: String,
    pub killed: bool,
    /// TCP/UDP sockets the process had open before the move. They keep the
    /// cgroup they were created in, so the agent's rules never judge them
    /// (the kill switch still cuts them, through the process's descriptors).
    pub sockets_before: usize,
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
    pub fn err(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }

    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data: Some(data),
        }
    }
}
