//! agentd's kernel programs. They are attached to each agent's cgroup and
//! decide every TCP connect, connected-UDP connect and unconnected UDP send of
//! the sockets in it against that agent's allowlist, and steer the agent's
//! DNS to agentd's resolver (`steer`).
//!
//! On the host this file is an empty binary so that `cargo clippy/test
//! --workspace` work; the real build is for the bpf target (aya-build).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod steer;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
