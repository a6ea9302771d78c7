//! The names behind agents' learned addresses, kept in
//! `state_dir/learned.json` so a restarted daemon can carry them into its
//! new policy generations: an agent that cached an address across the
//! restart keeps reaching it until its TTL runs out.
//!
//! The file only supplies names. What is restored is what the kernel's
//! pinned learned-address map still allows for the agent's previous
//! generation, re-judged by the agent's current hostname rules, with the
//! earlier of the two expiries: a stale or edited file cannot allow an
//! address the previous daemon did not. A missing or unreadable file
//! restores nothing (agents re-resolve: fail closed).
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::error::{IoContext as _, Result};

/// One name's claim on one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedName {
    pub name: String,
    pub addr: IpAddr,
    /// CLOCK_MONOTONIC_COARSE, as the kernel compares it.
    pub expires_ns: u64,
}

/// Every agent's claims, by agent name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub agents: BTreeMap<String, Vec<SavedName>>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("learned.json")
}

impl Saved {
    /// What the previous daemon saved; empty if nothing usable was.
    pub fn load(state_dir: &Path) -> Self {
        let path = path(state_dir);
        let unusable = |e: &dyn std::fmt::Display| {
            tracing::warn!(path = %path.display(), error = %e, "learned names unreadable; agents with hostname rules re-resolve");
            Self::default()
        };
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| unusable(&e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => unusable(&e),
        }
    }

    /// Replaces the file whole (temporary file, then rename), so a reader
    /// sees the old content or the new. Not synced to disk: the names are
    /// only useful while the pinned maps last, and those do not outlive a
    /// reboot.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = path(state_dir);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .ctx(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).ctx(|| format!("replacing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_a_corrupt_or_missing_file() {
        let dir = std::env::temp_dir().join(format!("agentd-saved-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(Saved::load(&dir), Saved::default());
        let mut saved = Saved::default();
        saved.agents.insert(
            "erp".into(),
            vec![SavedName {
                name: "crm.example.com".into(),
                addr: "2001:db8::1".parse().unwrap(),
                expires_ns: 42,
            }],
        );
        saved.save(&dir).unwrap();
        assert_eq!(Saved::load(&dir), saved);
        fs::write(path(&dir), b"{not json").unwrap();
        assert_eq!(Saved::load(&dir), Saved::default());
        fs::remove_dir_all(&dir).unwrap();
    }
}
