//! `[daemon]`: where agentd keeps its state and serves its metrics. Every
//! key has a default; changes take effect at the next restart (`reload`
//! reports them).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

fn default_socket() -> PathBuf {
    "/run/agentd/agentd.sock".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/agentd".into()
}
fn default_audit_log() -> PathBuf {
    "/var/log/agentd/audit.jsonl".into()
}
fn default_cgroup_root() -> String {
    "agentd".into()
}
fn default_bpffs_dir() -> PathBuf {
    "/sys/fs/bpf/agentd".into()
}
fn default_metrics_listen() -> MetricsListen {
    MetricsListen(Some(SocketAddr::from(([127, 0, 0, 1], 9464))))
}

/// `metrics_listen`: an address, or `""` for no metrics endpoint. Parsed
/// while the file is read, so a bad address is reported at its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsListen(pub Option<SocketAddr>);

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(Self(None));
        }
        text.parse().map(|a| Self(Some(a))).map_err(|_| {
            serde::de::Error::custom(format!(
                "metrics_listen {text:?}: expected an address and port such as \"127.0.0.1:9464\" \
                 or \"[::1]:9464\", or \"\" to serve no metrics"
            ))
        })
    }
}

impl Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(a) => s.collect_str(&a),
            None => s.serialize_str(""),
        }
    }
}

/// `[daemon]`: where agentd keeps its state. Every key has a default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_audit_log")]
    pub audit_log: PathBuf,
    /// A directory under the cgroup v2 mount holding one cgroup per agent.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: String,
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Where `/metrics` is served (`"127.0.0.1:9464"`); `""` serves nothing.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: MetricsListen,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            state_dir: default_state_dir(),
            audit_log: default_audit_log(),
            cgroup_root: default_cgroup_root(),
            bpffs_dir: default_bpffs_dir(),
            metrics_listen: default_metrics_listen(),
        }
    }
}

pub(super) fn validate_daemon(d: &DaemonConfig) -> Result<(), (String, String)> {
    for (key, path) in [
        ("daemon.socket", &d.socket),
        ("daemon.state_dir", &d.state_dir),
        ("daemon.audit_log", &d.audit_log),
        ("daemon.bpffs_dir", &d.bpffs_dir),
    ] {
        if !path.is_absolute() {
            return Err((
                key.into(),
                format!("{} must be an absolute path", path.display()),
            ));
        }
    }
    let root = Path::new(&d.cgroup_root);
    let relative_and_plain = !d.cgroup_root.is_empty()
        && root.is_relative()
        && root
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !relative_and_plain {
        return Err((
            "daemon.cgroup_root".into(),
            format!(
                "{:?} must be a relative path below the cgroup v2 mount, without `..`",
                d.cgroup_root
            ),
        ));
    }
    Ok(())
}
