//! Users and groups a test creates (real entries in the user database, so
//! the daemon's role checks see them as it would see people), removed on
//! drop; and running agentd as one of them.
use std::{
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{TestEnv, agentd_bin};

/// Short and unique per process and call: tests run in parallel threads.
fn unique_suffix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A system group created for one test, removed on drop.
pub struct TestGroup {
    pub name: String,
}

impl TestGroup {
    /// `tag` keeps names short (user and group names are at most 32 bytes).
    pub fn create(tag: &str) -> Self {
        let name = format!("agt{}{tag}", unique_suffix());
        let _ = Command::new("groupdel").arg(&name).output();
        let out = Command::new("groupadd")
            .arg(&name)
            .output()
            .expect("groupadd");
        assert!(out.status.success(), "groupadd {name}: {out:?}");
        Self { name }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A system user (no home, no login shell) created for one test, member of
/// `groups`; removed on drop.
pub struct TestUser {
    pub name: String,
}

impl TestUser {
    pub fn create(tag: &str, groups: &[&TestGroup]) -> Self {
        let name = format!("agu{}{tag}", unique_suffix());
        let _ = Command::new("userdel").arg(&name).output();
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-U", "-s", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            let list: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
            cmd.args(["-G", &list.join(",")]);
        }
        let out = cmd.arg(&name).output().expect("useradd");
        assert!(out.status.success(), "useradd {name}: {out:?}");
        Self { name }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

impl TestEnv {
    /// Runs `agentd ARGS` against this test's socket as `user` (real and
    /// effective ids and the user's groups, from the user database).
    pub fn agentd_as(&self, user: &TestUser, args: &[&str]) -> std::process::Output {
        // The user must reach the binary and the socket's directory.
        let bin = self.public_copy(&agentd_bin());
        Command::new("setpriv")
            .args([
                "--reuid",
                &user.name,
                "--regid",
                &user.name,
                "--init-groups",
                "--",
            ])
            .arg(&bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run agentd as user")
    }
}
