//! Human-readable output of every CLI command. `--json` prints the reply
//! types themselves (see `control::protocol`); this is the other half.
use std::fmt::Write as _;

use serde_json::Value;

use crate::{
    config::Mode,
    control::{AdoptReply, AgentState, EventsReply, ListReply, StatusReply},
    kill::SwitchOutcome,
    reload::ReloadReport,
};

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

/// `agentd kill` / `agentd restore` for people.
pub fn switch(kill: bool, outcomes: &[SwitchOutcome], round_trip_us: f64) -> String {
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
pub fn list(reply: &ListReply) -> String {
    let mut out = format!(
        "{:<24} {:<28} {:<8} {:>6} {:>10} {:>10} {:>10}  {}\n",
        "AGENT", "OWNER", "MODE", "PROCS", "ALLOWED", "DENIED", "AUDITED", "STATE"
    );
    for a in &reply.agents {
        let mode = mode_name(a.mode);
        let state = if a.killed {
            "KILLED"
        } else if a.enforcing {
            "active"
        } else if a.bound && a.processes == 0 {
            "waiting for cgroup"
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
                "{} killed at {} by {} (uid {}): {:?}\n",
                a.name,
                k.at,
                k.by_user.as_deref().unwrap_or("?"),
                k.by_uid,
                k.reason
            ));
        }
    }
    for c in &reply.contained {
        out.push_str(&format!(
            "{} was removed from the config; {} processes still run in {} with NO network access\n",
            c.name, c.processes, c.cgroup
        ));
    }
    if reply.events_lost > 0 {
        out.push_str(&format!(
            "warning: {} audit events lost (ring buffer full); verdicts and counts above are exact\n",
            reply.events_lost
        ));
    }
    out
}

/// A command line on one line: arguments with spaces, quotes or control
/// characters are quoted and escaped, so a hostile argument cannot forge
/// lines of output.
fn command_line(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty()
                || a.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'')
            {
                format!("{a:?}")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `agentd status NAME` for people.
pub fn status(s: &StatusReply) -> String {
    let mut out = String::new();
    let state = match s.state {
        AgentState::Active => "active",
        AgentState::Killed => "KILLED",
        AgentState::NotEnforcing => "NOT ENFORCING",
        AgentState::Waiting => "waiting: its bound cgroup does not exist; armed when it appears",
    };
    let _ = writeln!(out, "agent:       {}", s.name);
    let _ = writeln!(out, "owner:       {}", s.owner);
    if !s.description.is_empty() {
        let _ = writeln!(out, "description: {}", s.description);
    }
    let _ = writeln!(out, "mode:        {}", mode_name(s.mode));
    let _ = writeln!(
        out,
        "cgroup:      {}{}",
        s.cgroup,
        if s.bound { " (bound)" } else { "" }
    );
    let _ = writeln!(out, "state:       {state}");
    if let Some(k) = &s.kill {
        let _ = writeln!(
            out,
            "  killed at {} by {} (uid {}, pid {}): {:?}",
            k.at,
            k.by_user.as_deref().unwrap_or("?"),
            k.by_uid,
            k.by_pid,
            k.reason
        );
    }
    let _ = writeln!(
        out,
        "decisions:   {} allowed, {} denied, {} audited{}",
        s.counts.allowed,
        s.counts.denied,
        s.counts.audited,
        if s.counts.events_lost > 0 {
            format!(" ({} audit events lost)", s.counts.events_lost)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "\nrules ({}):", s.rules.len());
    if s.rules.is_empty() {
        let _ = writeln!(out, "  (none: every connect is denied)");
    }
    for r in &s.rules {
        let _ = writeln!(out, "  {:<44} line {}", r.rule, r.line);
    }
    if s.rules.iter().any(|r| r.rule.starts_with("host ")) {
        let _ = writeln!(
            out,
            "\nlearned ({} address(es) from allowed names, each allowed until its TTL runs out):",
            s.learned_addresses
        );
        for l in &s.learned {
            let _ = writeln!(
                out,
                "  {:<32} {:<40} {}s left",
                l.name,
                l.addresses.join(", "),
                l.expires_in_s
            );
        }
        if s.learned.len() >= crate::views::MAX_LEARNED_LISTED {
            let _ = writeln!(out, "  (the first {} names)", s.learned.len());
        }
    }
    let _ = writeln!(out, "\nprocesses ({}):", s.processes_total);
    for p in &s.processes {
        let _ = writeln!(
            out,
            "  {:>7}  {:<12} {:<24} {}",
            p.pid,
            p.user
                .clone()
                .or(p.uid.map(|u| u.to_string()))
                .unwrap_or_else(|| "?".into()),
            p.session.as_deref().unwrap_or("-"),
            if p.cmdline.is_empty() {
                "(exited)".to_owned()
            } else {
                command_line(&p.cmdline)
            }
        );
    }
    if s.processes.len() < s.processes_total {
        let _ = writeln!(
            out,
            "  ... and {} more",
            s.processes_total - s.processes.len()
        );
    }
    let _ = writeln!(out, "\nsessions ({}):", s.sessions.len());
    for x in &s.sessions {
        let _ = writeln!(
            out,
            "  {}  {} {} by {} as {}: {}{}{}",
            x.started,
            x.id,
            x.how,
            x.requested_by_user
                .clone()
                .unwrap_or_else(|| format!("uid {}", x.requested_by_uid)),
            x.target_user.as_deref().unwrap_or("?"),
            command_line(&x.command),
            x.reason
                .as_deref()
                .map(|r| format!(" (reason: {r:?})"))
                .unwrap_or_default(),
            if x.alive { "" } else { " [ended]" }
        );
    }
    let _ = writeln!(out, "\nrecent denied attempts ({}):", s.recent_denied.len());
    for e in &s.recent_denied {
        let _ = writeln!(out, "  {}", event(e));
    }
    out
}

fn field<'a>(e: &'a Value, key: &str) -> &'a str {
    e.get(key).and_then(Value::as_str).unwrap_or("")
}

/// One audit record in one line.
pub fn event(e: &Value) -> String {
    let ts = field(e, "ts");
    let kind = field(e, "event");
    if kind == "dns" {
        let answers: Vec<&str> = e
            .get("answers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let why = match e.get("rule").and_then(Value::as_str) {
            Some(rule) => format!("rule {rule}"),
            None => field(e, "reason").to_owned(),
        };
        return format!(
            "{ts} {:<5} {:<16} dns     {} {} {} -> {} [{}] {why}",
            field(e, "verdict").to_uppercase(),
            field(e, "agent"),
            field(e, "transport"),
            field(e, "qtype"),
            field(e, "name").escape_debug(),
            field(e, "rcode"),
            answers.join(" "),
        );
    }
    if let Some(verdict) = e.get("verdict").and_then(Value::as_str) {
        let dst = match (e.get("dst_ip").and_then(Value::as_str), e.get("dst_port")) {
            (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
            (Some(ip), Some(port)) => format!("{ip}:{port}"),
            _ => "-".into(),
        };
        let mut why = match e.get("rule").and_then(Value::as_str) {
            Some(rule) => format!("rule {rule}"),
            None => field(e, "reason").to_owned(),
        };
        if let Some(host) = e.get("host").and_then(Value::as_str) {
            let _ = write!(why, " (host {host})");
        }
        let count = e.get("count").and_then(Value::as_u64).unwrap_or(1);
        return format!(
            "{ts} {:<5} {:<16} {:<7} {} {dst} pid {} ({}) uid {} {why}{}",
            verdict.to_uppercase(),
            e.get("agent").and_then(Value::as_str).unwrap_or("?"),
            kind,
            field(e, "protocol"),
            e.get("pid").unwrap_or(&Value::Null),
            field(e, "comm").escape_debug(),
            e.get("uid").unwrap_or(&Value::Null),
            if count > 1 {
                format!(" x{count}")
            } else {
                String::new()
            }
        );
    }
    let mut out = format!("{ts} {kind}");
    if let Some(obj) = e.as_object() {
        for (k, v) in obj {
            if k == "ts" || k == "event" || v.is_null() {
                continue;
            }
            match v {
                Value::String(s) => {
                    let _ = write!(out, " {k}={s:?}");
                }
                other => {
                    let _ = write!(out, " {k}={other}");
                }
            }
        }
    }
    out
}

/// `agentd events` for people.
pub fn events(reply: &EventsReply) -> String {
    let mut out = String::new();
    for e in &reply.events {
        out.push_str(&event(e));
        out.push('\n');
    }
    if reply.truncated {
        out.push_str("(older matching records not shown; see --limit and --since)\n");
    }
    out
}

/// `agentd reload` for people.
pub fn reload(r: &ReloadReport) -> String {
    let mut out = format!("reloaded {} in {:.1} ms\n", r.config, r.took_us / 1e3);
    let list = |names: &[String]| {
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(", ")
        }
    };
    let _ = writeln!(out, "  added:     {}", list(&r.added));
    let _ = writeln!(
        out,
        "  changed:   {} (new rules switched in one step each)",
        list(&r.changed)
    );
    let _ = writeln!(out, "  updated:   {}", list(&r.updated));
    let _ = writeln!(out, "  removed:   {}", list(&r.removed));
    let _ = writeln!(out, "  unchanged: {}", list(&r.unchanged));
    for c in &r.contained {
        let _ = writeln!(
            out,
            "  {} was removed but {} processes still run: kept with NO network access until they exit",
            c.agent, c.processes
        );
    }
    if !r.restart_needed.is_empty() {
        let _ = writeln!(
            out,
            "  not applied until agentd restarts: {}",
            r.restart_needed.join(", ")
        );
    }
    out
}

/// `agentd adopt` for people.
pub fn adopt(r: &AdoptReply) -> String {
    let mut out = format!(
        "pid {} ({} threads) is now in agent {} ({}), session {}\n",
        r.pid, r.threads, r.agent, r.cgroup, r.session
    );
    if r.killed {
        out.push_str("warning: the agent is KILLED: the process has no network access\n");
    }
    if r.sockets_before > 0 {
        let _ = writeln!(
            out,
            "warning: {} TCP/UDP sockets were open before the move; they keep their old cgroup, \
             so the agent's rules do not judge them (agentd kill still cuts them)",
            r.sockets_before
        );
    }
    out
}
