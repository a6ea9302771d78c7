//! cgroup v2: where the hierarchy is mounted, and each agent's directory in
//! it. An agent's cgroup is its identity: the kernel judges a socket by the
//! cgroup it was created in.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::error::{Error, IoContext as _, Result};

/// Finds the cgroup v2 mount point from a mountinfo text. Hybrid hosts mount
/// it at `/sys/fs/cgroup/unified`, unified ones at `/sys/fs/cgroup`.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The cgroup v2 mount of this host.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").ctx(|| "reading /proc/self/mountinfo".into())?;
    find_cgroup2_mount(&text).ok_or(Error::NoCgroup2)
}

/// Where agentd's cgroups live: `<mount>/<cgroup_root>`.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    pub mount: PathBuf,
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn new(cgroup_root: &str) -> Result<Self> {
        let mount = cgroup2_mount()?;
        let root = mount.join(cgroup_root);
        Ok(Self { mount, root })
    }

    pub fn agent_dir(&self, agent: &str) -> PathBuf {
        self.root.join(agent)
    }

    /// The agent's cgroup directory: the bound one, or its own under the root.
    pub fn dir_of(&self, agent: &crate::config::Agent) -> PathBuf {
        match &agent.cgroup {
            Some(bound) => self.mount.join(bound),
            None => self.agent_dir(&agent.name),
        }
    }

    /// Creates the agent's cgroup if missing and returns its id.
    pub fn ensure_agent(&self, agent: &str) -> Result<u64> {
        let dir = self.agent_dir(agent);
        fs::create_dir_all(&dir).ctx(|| format!("creating cgroup {}", dir.display()))?;
        cgroup_id(&dir)
    }

    /// This path relative to the mount, as /proc/PID/cgroup shows it.
    pub fn relative(&self, dir: &Path) -> String {
        let rel = dir.strip_prefix(&self.mount).unwrap_or(dir);
        format!("/{}", rel.display())
    }
}

/// Checks a bound cgroup path from the config and returns it relative to
/// the cgroup v2 mount. `/system.slice/x.service` (as /proc/PID/cgroup
/// shows it) and `system.slice/x.service` are the same.
pub fn bound_path(text: &str, cgroup_root: &str) -> std::result::Result<String, String> {
    let rel = text.trim_start_matches('/');
    let path = Path::new(rel);
    let plain = !rel.is_empty()
        && !rel.ends_with('/')
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(format!(
            "{text:?} is not a cgroup path below the cgroup v2 mount (e.g. \"system.slice/crm-agent.service\")"
        ));
    }
    if path.starts_with(cgroup_root) {
        return Err(format!(
            "{text:?} is inside daemon.cgroup_root ({cgroup_root:?}), where agentd makes its own cgroups"
        ));
    }
    Ok(rel.to_owned())
}

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the
/// inode number of the cgroup's directory.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir)
        .ctx(|| format!("stat {}", dir.display()))?
        .ino())
}

/// Every process in the cgroup and its descendants.
pub fn processes(dir: &Path) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    collect_processes(dir, &mut out, 0)?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn collect_processes(dir: &Path, out: &mut Vec<u32>, depth: u32) -> Result<()> {
    // Bounded: cgroup trees are shallow; a deeper one is not ours to walk.
    if depth > 32 {
        return Ok(());
    }
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        Ok(text) => out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("reading {}", procs.display())),
    }
    let entries = fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_processes(&entry.path(), out, depth + 1)?;
        }
    }
    Ok(())
}

/// Moves a whole process (all its threads) into the cgroup.
pub fn move_process(dir: &Path, pid: u32) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .ctx(|| format!("opening {}", procs.display()))?;
    f.write_all(pid.to_string().as_bytes())
        .ctx(|| format!("moving pid {pid} into {}", dir.display()))
}

/// The cgroup v2 path of a process, as in /proc/PID/cgroup (`0::/path`).
pub fn process_cgroup(pid: u32) -> Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&path).ctx(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or_else(|| Error::Refused(format!("pid {pid} has no cgroup v2 membership")))
}

/// Kills every process in the cgroup (cgroup.kill) and waits, bounded, until
/// it is empty.
pub fn kill_all(dir: &Path, timeout: Duration) -> Result<()> {
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").ctx(|| format!("writing {}", kill.display()))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if processes(dir)?.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(Error::Refused(format!(
        "processes in {} did not exit within {timeout:?}",
        dir.display()
    )))
}

/// Removes a cgroup directory and its (empty) children, deepest first.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir).ctx(|| format!("removing cgroup {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_unified_mount_on_hybrid_host() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_mount_with_optional_fields_and_escapes() {
        let text = "29 23 0:26 / /sys/fs/my\\040cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/my cgroup"))
        );
    }

    #[test]
    fn bound_paths_are_plain_relative_and_outside_the_root() {
        assert_eq!(
            bound_path("/system.slice/crm.service", "agentd").unwrap(),
            "system.slice/crm.service"
        );
        assert_eq!(bound_path("a/b", "agentd").unwrap(), "a/b");
        for bad in ["", "/", "a/../b", "./a", "a/", "agentd/x", "agentd"] {
            assert!(bound_path(bad, "agentd").is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            find_cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }
}
