//! `agentd events`: the audit log queried, and with `--follow` streamed as
//! it is written, one record per line after the reply.
use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::unix::{OwnedReadHalf, OwnedWriteHalf},
    sync::broadcast::error::RecvError,
};

use super::{EventsReply, Reply, Request, WRITE_TIMEOUT, caller::Caller, send};
use crate::{
    audit::{
        query::{EventFilter, Matcher, query},
        rfc3339,
    },
    daemon::State,
};

/// Live streams served at once (each costs a JSON parse per audit line).
const MAX_FOLLOWERS: usize = 32;
static FOLLOWERS: AtomicUsize = AtomicUsize::new(0);

/// One follower slot, given back when the stream ends.
struct Follower;

impl Follower {
    fn take() -> Option<Self> {
        FOLLOWERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_FOLLOWERS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        FOLLOWERS.fetch_sub(1, Ordering::AcqRel);
    }
}

type Reader = BufReader<tokio::io::Take<OwnedReadHalf>>;

pub(super) async fn events(
    state: Arc<State>,
    caller: Caller,
    filter: EventFilter,
    follow: bool,
    mut reader: Reader,
    mut write: OwnedWriteHalf,
) {
    let req = Request::Events {
        filter: filter.clone(),
        follow,
    };
    let (action, target, _) = super::describe(&req);
    let fail = |result: &str, why: String| {
        caller.audit(
            &state,
            action.name(),
            target.clone(),
            result,
            Some(&why),
            None,
        );
        Reply::err(why)
    };
    if let Err(why) = super::authorize(&req, action, &caller, &state) {
        let Reply { error, .. } = fail("refused", why);
        let why = error.unwrap_or_default();
        send(&mut write, &Reply::err(format!("permission denied: {why}"))).await;
        return;
    }
    let matcher = match Matcher::new(&filter, SystemTime::now()) {
        Ok(m) => m,
        Err(e) => {
            send(&mut write, &fail("error", e)).await;
            return;
        }
    };
    let slot = if follow {
        match Follower::take() {
            Some(s) => Some(s),
            None => {
                let why = format!("busy: {MAX_FOLLOWERS} live streams already open");
                send(&mut write, &fail("error", why)).await;
                return;
            }
        }
    } else {
        None
    };
    // Subscribed before the query, so nothing written in between is missed
    // (what both see is sent once).
    let live = follow.then(|| state.audit.subscribe());
    let path = state.audit.path().to_owned();
    let m = matcher.clone();
    let found = match tokio::task::spawn_blocking(move || query(&path, &m)).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            send(
                &mut write,
                &fail("error", format!("reading the audit log: {e}")),
            )
            .await;
            return;
        }
        Err(e) => {
            send(&mut write, &fail("error", format!("internal error: {e}"))).await;
            return;
        }
    };
    caller.audit(&state, action.name(), target.clone(), "ok", None, None);
    let seen: HashSet<String> = if follow {
        found.records.iter().map(|(line, _)| line.clone()).collect()
    } else {
        HashSet::new()
    };
    let reply = EventsReply {
        events: found.records.into_iter().map(|(_, v)| v).collect(),
        truncated: found.truncated,
        following: follow,
    };
    let data = serde_json::to_value(reply).unwrap_or_default();
    if !send(&mut write, &Reply::ok(data)).await {
        return;
    }
    let Some(mut live) = live else {
        return;
    };
    let _slot = slot;
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            got = live.recv() => match got {
                Ok(line) => {
                    if seen.contains(&*line) {
                        continue;
                    }
                    let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    if matcher.matches(&record) && !write_line(&mut write, line.as_bytes()).await {
                        return;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    // Say so in the stream: a silent gap would read as quiet.
                    let note = serde_json::json!({
                        "ts": rfc3339(SystemTime::now()),
                        "event": "follow_lagged",
                        "missed": missed,
                        "note": "this reader fell behind; the audit log itself has every record",
                    });
                    if !write_line(&mut write, note.to_string().as_bytes()).await {
                        return;
                    }
                }
                Err(RecvError::Closed) => return,
            },
            // The client hung up (or spoke, which it should not): stop.
            _ = reader.read(&mut probe) => return,
        }
    }
}

async fn write_line(write: &mut OwnedWriteHalf, line: &[u8]) -> bool {
    let mut out = Vec::with_capacity(line.len() + 1);
    out.extend_from_slice(line);
    out.push(b'\n');
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await,
        Ok(Ok(()))
    )
}
