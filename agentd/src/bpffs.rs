//! bpffs: where agentd pins its maps and links so enforcement outlives the
//! daemon. Many hosts do not mount it; the daemon mounts it itself.
use std::{
    fs,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use crate::error::{Error, IoContext as _, Result};

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on a bpffs, mounting one at its parent when the
/// parent is not already on bpffs (e.g. `/sys/fs/bpf` left unmounted).
pub fn ensure(dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(dir) {
        fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .map_err(|source| Error::MountBpffs {
            path: parent.to_owned(),
            source,
        })?;
        tracing::info!(path = %parent.display(), "mounted bpffs");
    }
    for sub in ["", "maps", "links"] {
        let d = dir.join(sub);
        fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
    }
    Ok(())
}

pub fn maps_dir(dir: &Path) -> PathBuf {
    dir.join("maps")
}

/// `links/<agent>/<program>`: one pinned link per hook per agent.
pub fn agent_links_dir(dir: &Path, agent: &str) -> PathBuf {
    dir.join("links").join(agent)
}

/// Agents that have pinned links, whether or not the config still names them.
pub fn pinned_agents(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir.join("links")) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}
