//! The library's one error type. The binary turns it into a message with
//! `anyhow` at the top.
use std::{io, path::PathBuf};

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] Box<ConfigError>),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("no cgroup v2 mount found in /proc/self/mountinfo; agentd needs the unified hierarchy")]
    NoCgroup2,

    #[error("cannot mount bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },

    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),

    #[error("eBPF program {program}: {source}")]
    Program {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error("eBPF map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },

    #[error("pinning {path}: {message}")]
    Pin { path: PathBuf, message: String },

    #[error(
        "pinned map {map} under {dir} has another layout (key {found_key}/value {found_value} bytes, \
         expected {want_key}/{want_value}); it was written by an incompatible agentd. \
         Run `agentd teardown` with the old configuration first"
    )]
    IncompatiblePins {
        map: String,
        dir: PathBuf,
        found_key: u32,
        found_value: u32,
        want_key: u32,
        want_value: u32,
    },

    #[error("policy does not fit: {0}")]
    Capacity(String),

    #[error("control socket {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description of what was being done to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
