//! agentd: contains AI agents at kernel level. Each agent is a cgroup v2
//! directory; eBPF programs attached there decide every connect and send
//! against the agent's allowlist; every decision is an audit line.
//!
//! Reading order for one `connect()`: `agentd-ebpf/src/programs.rs` (the
//! hook and verdict), [`events`] (ring buffer to audit line), [`audit`].
//! Policy: [`config`] -> [`policy`] (pure compiler) -> [`maps`].

pub mod access;
pub mod audit;
pub mod bound;
pub mod bpffs;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dns;
pub mod enforce;
pub mod error;
pub mod events;
pub mod kill;
pub mod launch;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod programs;
pub mod reload;
pub mod render;
pub mod sessions;
pub mod sockets;
pub mod teardown;
pub mod views;

pub use error::{Error, Result};
