//! The audit log: one JSON object per line, appended to `audit_log`.
//! Live readers (`agentd events --follow`) get each line as it is written.
use std::{
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use serde_json::{Map, Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use crate::error::{IoContext as _, Result};

pub mod query;

/// Lines a slow live reader may fall behind before it is told it lost some.
const LIVE_BACKLOG: usize = 4096;

pub struct AuditLog {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
    live: tokio::sync::broadcast::Sender<Arc<str>>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)
            .ctx(|| format!("opening audit log {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            out: Mutex::new(BufWriter::with_capacity(1 << 16, file)),
            live: tokio::sync::broadcast::channel(LIVE_BACKLOG).0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every line recorded from now on, as written.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.live.subscribe()
    }

    /// Appends one record: `ts` and `event` first, then the fields given.
    /// Buffered; call [`AuditLog::flush`] at the end of a batch.
    pub fn record(&self, ts: SystemTime, event: &str, fields: impl Serialize) {
        let mut obj = Map::new();
        obj.insert("ts".into(), Value::String(rfc3339(ts)));
        obj.insert("event".into(), Value::String(event.into()));
        if let Value::Object(extra) = json!(fields) {
            obj.extend(extra);
        }
        let line = Value::Object(obj).to_string();
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A failing disk must not stop enforcement: it is reported and the
        // kernel's counters stay exact.
        if let Err(e) = out
            .write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
        {
            tracing::error!(error = %e, "audit log write failed");
        }
        // Sent under the lock so live readers see lines in file order.
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(line.into());
        }
    }

    /// Records one event now and flushes.
    pub fn record_now(&self, event: &str, fields: impl Serialize) {
        self.record(SystemTime::now(), event, fields);
        self.flush();
    }

    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = out.flush() {
            tracing::error!(error = %e, "audit log flush failed");
        }
    }
}

pub fn rfc3339(ts: SystemTime) -> String {
    OffsetDateTime::from(ts)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
