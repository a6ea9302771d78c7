//! Who may do what on the control socket.
//!
//! Callers are named by the kernel (SO_PEERCRED uid and pid), then by the
//! system's user database: their user name and the names of every group
//! they belong to. Config entries are user names or `@group`. Root is always
//! an admin; a caller who matches no list has no role and may only `ping`.
use serde::{Deserialize, Serialize};

/// `[access]` in the config file. Every key has a default: no group on the
/// socket (root only) and nobody but root in any role.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Group owning the control socket (mode 0660); only its members and
    /// root can connect at all.
    #[serde(default)]
    pub socket_group: Option<String>,
    #[serde(default)]
    pub admins: Vec<String>,
    #[serde(default)]
    pub responders: Vec<String>,
    #[serde(default)]
    pub viewers: Vec<String>,
}

/// Roles, weakest first: each may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Responder,
    Admin,
}

/// What a request asks to do, for the permission check and the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Ping,
    List,
    Status,
    Events,
    Kill,
    Restore,
    Reload,
    Adopt,
    Exec,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::List => "list",
            Self::Status => "status",
            Self::Events => "events",
            Self::Kill => "kill",
            Self::Restore => "restore",
            Self::Reload => "reload",
            Self::Adopt => "adopt",
            Self::Exec => "exec",
        }
    }

    /// The weakest role allowed to do this; `None`: anyone who can connect.
    /// `exec` is special: admins, or the agent's launchers (checked apart).
    pub fn needs(self) -> Option<Role> {
        match self {
            Self::Ping => None,
            Self::List | Self::Status | Self::Events => Some(Role::Viewer),
            // A responder can cut an agent off, never widen what it reaches.
            Self::Kill => Some(Role::Responder),
            Self::Restore | Self::Reload | Self::Adopt | Self::Exec => Some(Role::Admin),
        }
    }
}

/// A caller as the system knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub uid: u32,
    /// From the user database; `None` for a uid with no entry.
    pub user: Option<String>,
    /// Names of the caller's groups (primary and supplementary, from the
    /// user database, not from the caller).
    pub groups: Vec<String>,
}

impl Identity {
    /// Looks the uid up in the user database.
    pub fn of_uid(uid: u32) -> Self {
        let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let mut groups = Vec::new();
        if let Some(u) = &user
            && let Ok(name) = std::ffi::CString::new(u.name.as_str())
            && let Ok(gids) = nix::unistd::getgrouplist(&name, u.gid)
        {
            for gid in gids {
                if let Ok(Some(g)) = nix::unistd::Group::from_gid(gid) {
                    groups.push(g.name);
                }
            }
        }
        Self {
            uid,
            user: user.map(|u| u.name),
            groups,
        }
    }

    /// Whether a config entry (`name` or `@group`) names this caller.
    pub fn matches(&self, entry: &str) -> bool {
        match entry.strip_prefix('@') {
            Some(group) => self.groups.iter().any(|g| g == group),
            None => self.user.as_deref() == Some(entry),
        }
    }

    fn matches_any(&self, entries: &[String]) -> bool {
        entries.iter().any(|e| self.matches(e))
    }
}

impl AccessConfig {
    /// The caller's strongest role, if any. Root is always admin.
    pub fn role_of(&self, who: &Identity) -> Option<Role> {
        if who.uid == 0 || who.matches_any(&self.admins) {
            Some(Role::Admin)
        } else if who.matches_any(&self.responders) {
            Some(Role::Responder)
        } else if who.matches_any(&self.viewers) {
            Some(Role::Viewer)
        } else {
            None
        }
    }

    /// Whether the caller may do `action` (for `exec`, see [`Self::may_launch`]).
    pub fn allows(&self, who: &Identity, action: Action) -> bool {
        match action.needs() {
            None => true,
            Some(need) => self.role_of(who).is_some_and(|r| r >= need),
        }
    }

    /// Whether the caller may `exec` into an agent with these launchers.
    pub fn may_launch(&self, who: &Identity, launchers: &[String]) -> bool {
        self.allows(who, Action::Exec) || who.matches_any(launchers)
    }
}

/// Checks one `name` / `@group` entry: a user or group name as `useradd`
/// accepts them ([A-Za-z0-9_.-], optionally ending in `$`, not starting with
/// `-`), at most 32 characters.
pub fn validate_principal(entry: &str) -> Result<(), String> {
    let name = entry.strip_prefix('@').unwrap_or(entry);
    let body = name.strip_suffix('$').unwrap_or(name);
    let ok = !body.is_empty()
        && name.len() <= 32
        && !body.starts_with('-')
        && body
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{entry:?} is not a user name or @group (want name or @group, [A-Za-z0-9_.-], at most 32 characters)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, user: &str, groups: &[&str]) -> Identity {
        Identity {
            uid,
            user: Some(user.into()),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn access() -> AccessConfig {
        AccessConfig {
            socket_group: Some("agentd".into()),
            admins: vec!["alice".into(), "@platform".into()],
            responders: vec!["@secops".into()],
            viewers: vec!["@monitoring".into()],
        }
    }

    #[test]
    fn roles_from_names_and_groups() {
        let a = access();
        assert_eq!(a.role_of(&who(0, "root", &[])), Some(Role::Admin));
        assert_eq!(a.role_of(&who(1000, "alice", &[])), Some(Role::Admin));
        assert_eq!(
            a.role_of(&who(1001, "bob", &["platform"])),
            Some(Role::Admin)
        );
        assert_eq!(
            a.role_of(&who(1002, "carol", &["secops"])),
            Some(Role::Responder)
        );
        assert_eq!(
            a.role_of(&who(1003, "dave", &["monitoring"])),
            Some(Role::Viewer)
        );
        assert_eq!(a.role_of(&who(1004, "eve", &["agentd"])), None);
        // The strongest matching role wins.
        assert_eq!(
            a.role_of(&who(1005, "frank", &["monitoring", "secops"])),
            Some(Role::Responder)
        );
        // A group entry never matches a user of that name, nor the reverse.
        assert_eq!(a.role_of(&who(1006, "platform", &[])), None);
        assert_eq!(a.role_of(&who(1007, "x", &["alice"])), None);
    }

    #[test]
    fn what_each_role_may_do() {
        let a = access();
        let viewer = who(1, "dave", &["monitoring"]);
        let responder = who(2, "carol", &["secops"]);
        let admin = who(3, "alice", &[]);
        let nobody = who(4, "eve", &[]);
        for (action, v, r, ad, n) in [
            (Action::Ping, true, true, true, true),
            (Action::List, true, true, true, false),
            (Action::Status, true, true, true, false),
            (Action::Events, true, true, true, false),
            (Action::Kill, false, true, true, false),
            (Action::Restore, false, false, true, false),
            (Action::Reload, false, false, true, false),
            (Action::Adopt, false, false, true, false),
            (Action::Exec, false, false, true, false),
        ] {
            assert_eq!(a.allows(&viewer, action), v, "viewer {action:?}");
            assert_eq!(a.allows(&responder, action), r, "responder {action:?}");
            assert_eq!(a.allows(&admin, action), ad, "admin {action:?}");
            assert_eq!(a.allows(&nobody, action), n, "no role {action:?}");
        }
        let launchers = vec!["eve".to_string(), "@ops".to_string()];
        assert!(a.may_launch(&nobody, &launchers));
        assert!(a.may_launch(&who(5, "z", &["ops"]), &launchers));
        assert!(a.may_launch(&admin, &[]));
        assert!(!a.may_launch(&responder, &launchers));
    }

    #[test]
    fn principal_syntax() {
        for ok in ["alice", "@secops", "svc-crm", "a.b_c", "machine$", "@grp$"] {
            assert!(validate_principal(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "@",
            "-rf",
            "a b",
            "al:ice",
            "@@x",
            "x$y",
            &"a".repeat(33),
        ] {
            assert!(validate_principal(bad).is_err(), "{bad:?}");
        }
    }
}
