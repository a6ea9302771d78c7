//! Reading the audit log back: `agentd events` and the recent denials in
//! `agentd status`. The log is read from its end, block by block, so asking
//! for the last minutes of a large log costs what those minutes hold.
use std::{
    fs::File,
    io,
    os::unix::fs::FileExt as _,
    path::Path,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Records returned when the request names no limit.
pub const DEFAULT_LIMIT: usize = 100;
/// Most records one query returns.
pub const MAX_LIMIT: usize = 10_000;
/// Most bytes one query reads before it stops and says so.
const MAX_SCAN_BYTES: u64 = 512 << 20;
const BLOCK: u64 = 64 << 10;
/// Lines are appended roughly in time order: decisions are written up to a
/// drain interval after they happen, folded ones carry their first time. A
/// backwards scan stops only once it is this far before `since`.
const ORDER_SLACK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
    Audit,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }
    }
}

/// What `agentd events` asks for. Every field narrows the answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Records about this agent: its decisions, and kills, restores and
    /// control requests that target it.
    #[serde(default)]
    pub agent: Option<String>,
    /// Only decisions with this verdict.
    #[serde(default)]
    pub verdict: Option<Verdict>,
    /// Only records of this kind (`connect`, `send`, `control`, `kill`, ...).
    #[serde(default)]
    pub event: Option<String>,
    /// A duration back from now (`10m`, `2h`, `1d`) or an RFC 3339 time.
    #[serde(default)]
    pub since: Option<String>,
    /// The most recent this many matching records (default 100, at most 10 000).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// A filter checked and ready to match records.
#[derive(Debug, Clone)]
pub struct Matcher {
    agent: Option<String>,
    verdict: Option<Verdict>,
    event: Option<String>,
    since: Option<OffsetDateTime>,
    pub limit: usize,
}

/// Parses `--since`: a duration back from `now`, or an RFC 3339 time.
pub fn parse_since(text: &str, now: SystemTime) -> Result<OffsetDateTime, String> {
    let text = text.trim();
    if let Ok(d) = humantime::parse_duration(text) {
        // Further back than the epoch (`--since 99999y`, found by the
        // fuzzer) means "everything", and must not reach a date the time
        // crate cannot hold: that panicked.
        let at = now
            .checked_sub(d)
            .filter(|t| *t >= SystemTime::UNIX_EPOCH)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        return Ok(OffsetDateTime::from(at));
    }
    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
        format!(
            "since {text:?}: expected a duration back from now (30s, 10m, 2h, 1d) or an RFC 3339 \
             time (2026-01-31T12:00:00Z)"
        )
    })
}

impl Matcher {
    pub fn new(filter: &EventFilter, now: SystemTime) -> Result<Self, String> {
        let limit = filter.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!("limit must be between 1 and {MAX_LIMIT}"));
        }
        let since = filter
            .since
            .as_deref()
            .map(|s| parse_since(s, now))
            .transpose()?;
        Ok(Self {
            agent: filter.agent.clone(),
            verdict: filter.verdict,
            event: filter.event.clone(),
            since,
            limit,
        })
    }

    /// Whether the record passes every part of the filter.
    pub fn matches(&self, record: &Value) -> bool {
        if let Some(event) = &self.event
            && record.get("event").and_then(Value::as_str) != Some(event)
        {
            return false;
        }
        if let Some(v) = self.verdict
            && record.get("verdict").and_then(Value::as_str) != Some(v.name())
        {
            return false;
        }
        if let Some(agent) = &self.agent
            && !about_agent(record, agent)
        {
            return false;
        }
        match self.since {
            Some(since) => record_time(record).is_some_and(|t| t >= since),
            None => true,
        }
    }

    /// Whether a backwards scan that reached this record can stop: every
    /// record further back is older than `since`, allowing for the log's
    /// small disorder.
    fn past_since(&self, record: &Value) -> bool {
        match (self.since, record_time(record)) {
            (Some(since), Some(t)) => t < since - ORDER_SLACK,
            _ => false,
        }
    }
}

fn record_time(record: &Value) -> Option<OffsetDateTime> {
    let ts = record.get("ts")?.as_str()?;
    OffsetDateTime::parse(ts, &Rfc3339).ok()
}

/// A decision of the agent, or an action that names it (or every agent).
fn about_agent(record: &Value, agent: &str) -> bool {
    if record.get("agent").and_then(Value::as_str) == Some(agent) {
        return true;
    }
    match record.get("target") {
        Some(Value::String(t)) => t == agent || t == "*",
        Some(Value::Array(ts)) => ts.iter().any(|t| t.as_str() == Some(agent)),
        _ => false,
    }
}

/// The answer to one query, oldest first.
#[derive(Debug, Default)]
pub struct Found {
    /// Each matching record with the line it was read from.
    pub records: Vec<(String, Value)>,
    /// More matched than the limit, or the scan stopped at its byte bound.
    pub truncated: bool,
    pub scanned_bytes: u64,
}

/// The most recent records in the log at `path` that match, oldest first.
pub fn query(path: &Path, m: &Matcher) -> io::Result<Found> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::default()),
        Err(e) => return Err(e),
    };
    let mut lines = Backwards::new(file)?;
    let mut found = Found::default();
    while let Some(line) = lines.next_line()? {
        if lines.scanned > MAX_SCAN_BYTES {
            found.truncated = true;
            break;
        }
        // A torn or foreign line is not a record; skip it.
        let Ok(text) = String::from_utf8(line) else {
            continue;
        };
        let Ok(record) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if m.past_since(&record) {
            break;
        }
        if m.matches(&record) {
            if found.records.len() == m.limit {
                found.truncated = true;
                break;
            }
            found.records.push((text, record));
        }
    }
    found.scanned_bytes = lines.scanned;
    found.records.reverse();
    Ok(found)
}

/// A file's lines, last to first.
struct Backwards {
    file: File,
    /// Everything before this offset is still unread.
    pos: u64,
    /// The start of the earliest block read: possibly a partial line.
    carry: Vec<u8>,
    /// Whole lines of the current block, in file order (popped from the end).
    ready: Vec<Vec<u8>>,
    scanned: u64,
}

impl Backwards {
    fn new(file: File) -> io::Result<Self> {
        let pos = file.metadata()?.len();
        Ok(Self {
            file,
            pos,
            carry: Vec::new(),
            ready: Vec::new(),
            scanned: 0,
        })
    }

    fn next_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(line) = self.ready.pop() {
                return Ok(Some(line));
            }
            if self.pos == 0 {
                let last = std::mem::take(&mut self.carry);
                return Ok((!last.is_empty()).then_some(last));
            }
            let n = BLOCK.min(self.pos);
            self.pos -= n;
            let mut block = vec![0; n as usize];
            self.file.read_exact_at(&mut block, self.pos)?;
            self.scanned += n;
            block.extend_from_slice(&self.carry);
            let mut parts = block.split(|&b| b == b'\n');
            let first = parts.next().unwrap_or_default().to_vec();
            self.ready = parts
                .filter(|p| !p.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            self.carry = first;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn log(lines: &[Value]) -> tempfile_like::Temp {
        let t = tempfile_like::Temp::new();
        let mut f = File::create(&t.0).unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        t
    }

    /// A file removed on drop (no tempfile crate for one test helper).
    mod tempfile_like {
        pub struct Temp(pub std::path::PathBuf);
        impl Temp {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Self(
                    std::env::temp_dir()
                        .join(format!("agentd-query-{}-{n}.jsonl", std::process::id())),
                )
            }
        }
        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn decision(ts: &str, agent: &str, verdict: &str) -> Value {
        serde_json::json!({"ts": ts, "event": "connect", "agent": agent, "verdict": verdict})
    }

    fn matcher(f: EventFilter) -> Matcher {
        Matcher::new(&f, SystemTime::now()).unwrap()
    }

    #[test]
    fn filters_by_agent_verdict_and_kind() {
        let t = log(&[
            decision("2026-01-01T00:00:00Z", "crm", "allow"),
            decision("2026-01-01T00:00:01Z", "crm", "deny"),
            decision("2026-01-01T00:00:02Z", "erp", "deny"),
            serde_json::json!({"ts": "2026-01-01T00:00:03Z", "event": "kill", "agent": "crm"}),
            serde_json::json!({"ts": "2026-01-01T00:00:04Z", "event": "control", "target": ["crm"]}),
            serde_json::json!({"ts": "2026-01-01T00:00:05Z", "event": "control", "target": "*"}),
        ]);
        let crm = query(
            &t.0,
            &matcher(EventFilter {
                agent: Some("crm".into()),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(crm.records.len(), 5);
        let denied = query(
            &t.0,
            &matcher(EventFilter {
                verdict: Some(Verdict::Deny),
                ..Default::default()
            }),
        )
        .unwrap();
        let agents: Vec<_> = denied
            .records
            .iter()
            .map(|r| r.1["agent"].clone())
            .collect();
        assert_eq!(agents, ["crm", "erp"], "oldest first");
        let kills = query(
            &t.0,
            &matcher(EventFilter {
                event: Some("kill".into()),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(kills.records.len(), 1);
    }

    #[test]
    fn limit_keeps_the_most_recent_and_says_it_cut() {
        let lines: Vec<Value> = (0..10)
            .map(|i| decision(&format!("2026-01-01T00:00:{i:02}Z"), "a", "deny"))
            .collect();
        let t = log(&lines);
        let found = query(
            &t.0,
            &matcher(EventFilter {
                limit: Some(3),
                ..Default::default()
            }),
        )
        .unwrap();
        let ts: Vec<_> = found.records.iter().map(|r| r.1["ts"].clone()).collect();
        assert_eq!(
            ts,
            [
                "2026-01-01T00:00:07Z",
                "2026-01-01T00:00:08Z",
                "2026-01-01T00:00:09Z"
            ]
        );
        assert!(found.truncated);
    }

    #[test]
    fn since_reads_back_only_as_far_as_needed() {
        // Lines long enough that the old ones sit in earlier blocks.
        let pad = "x".repeat(1000);
        let mut lines = Vec::new();
        for i in 0..500 {
            let mut d = decision(
                &format!("2020-01-01T00:{:02}:{:02}Z", i / 60, i % 60),
                "a",
                "deny",
            );
            d["pad"] = pad.clone().into();
            lines.push(d);
        }
        lines.push(decision("2026-01-01T00:00:00Z", "a", "deny"));
        let t = log(&lines);
        let found = query(
            &t.0,
            &matcher(EventFilter {
                since: Some("2025-12-31T00:00:00Z".into()),
                ..Default::default()
            }),
        )
        .unwrap();
        assert_eq!(found.records.len(), 1);
        assert!(found.scanned_bytes < 200_000, "{}", found.scanned_bytes);
    }

    #[test]
    fn torn_lines_are_skipped_and_a_missing_log_is_empty() {
        let t = tempfile_like::Temp::new();
        std::fs::write(
            &t.0,
            "{\"ts\":\"2026-01-01T00:00:00Z\",\"event\":\"x\"}\n{\"ts\":\"2026-01-0",
        )
        .unwrap();
        let found = query(&t.0, &matcher(EventFilter::default())).unwrap();
        assert_eq!(found.records.len(), 1);
        std::fs::remove_file(&t.0).unwrap();
        assert!(
            query(&t.0, &matcher(EventFilter::default()))
                .unwrap()
                .records
                .is_empty()
        );
    }

    #[test]
    fn since_accepts_durations_and_times_and_names_what_it_wants() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_since("10m", now).unwrap(),
            OffsetDateTime::from(now - Duration::from_secs(600))
        );
        assert!(parse_since("2026-01-31T12:00:00Z", now).is_ok());
        // Before the epoch, even before year -9999: everything.
        for far in ["20000y", "2000000d 4444day"] {
            assert_eq!(
                parse_since(far, now).unwrap(),
                OffsetDateTime::UNIX_EPOCH,
                "{far}"
            );
        }
        let e = parse_since("yesterday-ish", now).unwrap_err();
        assert!(e.contains("10m"), "{e}");
        assert!(
            Matcher::new(
                &EventFilter {
                    limit: Some(0),
                    ..Default::default()
                },
                now
            )
            .is_err()
        );
    }
}
