//! `agentd.toml`: plain serde structs (the file is the documentation), then a
//! validation pass that turns every problem into an error naming the file,
//! line and key.
use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use crate::access::AccessConfig;
use crate::access::validate_principal;
pub use daemon::DaemonConfig;
use daemon::validate_daemon;
pub use dns::{DnsConfig, Refusal};
use dns::{RawDns, validate_dns};
pub use host::{HostPattern, HostRule};

/// A problem in a configuration file, located precisely enough to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; 0 when the problem is not tied to a place (unreadable file).
    pub line: usize,
    pub column: usize,
    /// Dotted key, e.g. `agent[1].allow[0].cidr`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else if self.key.is_empty() {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: `{}`: {}",
                self.path.display(),
                self.line,
                self.column,
                self.key,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Allow everything, log the verdict each call would have had.
    Audit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    /// TCP and UDP.
    #[default]
    Any,
}

impl Protocol {
    pub fn covers_tcp(self) -> bool {
        matches!(self, Self::Tcp | Self::Any)
    }
    pub fn covers_udp(self) -> bool {
        matches!(self, Self::Udp | Self::Any)
    }
}

/// A port as written: `443` or `"8000-8100"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// Exactly one of `cidr` and `host`.
    #[serde(default)]
    cidr: Option<Spanned<String>>,
    #[serde(default)]
    host: Option<Spanned<String>>,
    #[serde(default)]
    ports: Option<Spanned<Vec<Spanned<RawPort>>>>,
    #[serde(default)]
    protocol: Protocol,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Spanned<String>,
    owner: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
    /// Users and @groups who may `exec` into this agent (admins always can).
    #[serde(default)]
    launchers: Vec<Spanned<String>>,
    /// An existing cgroup (e.g. a systemd service's) to govern instead of
    /// one agentd creates.
    #[serde(default)]
    cgroup: Option<Spanned<String>>,
}

/// `[access]` as written (spans kept for errors).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    socket_group: Option<Spanned<String>>,
    #[serde(default)]
    admins: Vec<Spanned<String>>,
    #[serde(default)]
    responders: Vec<Spanned<String>>,
    #[serde(default)]
    viewers: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_daemon")]
    daemon: Spanned<DaemonConfig>,
    #[serde(default)]
    access: RawAccess,
    #[serde(default = "default_dns")]
    dns: Spanned<RawDns>,
    #[serde(default, rename = "agent")]
    agents: Vec<Spanned<RawAgent>>,
}

fn default_dns() -> Spanned<RawDns> {
    Spanned::new(0..0, RawDns::default())
}

fn default_daemon() -> Spanned<DaemonConfig> {
    Spanned::new(0..0, DaemonConfig::default())
}

/// An inclusive port range, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One validated allow rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Network with host bits cleared.
    pub cidr: IpNet,
    /// `None`: every port.
    pub ports: Option<Vec<PortRange>>,
    pub protocol: Protocol,
    /// Where the rule is written, for the audit log ("which rule matched").
    pub line: usize,
}

impl Rule {
    /// Whether this rule alone allows the destination. Used to name the rule
    /// behind a kernel verdict; the verdict itself is the kernel's.
    pub fn matches(&self, addr: IpAddr, port: u16, tcp: bool) -> bool {
        let proto_ok = if tcp {
            self.protocol.covers_tcp()
        } else {
            self.protocol.covers_udp()
        };
        proto_ok
            && self.cidr.contains(&addr)
            && self
                .ports
                .as_ref()
                .is_none_or(|p| p.iter().any(|r| r.contains(port)))
    }

    /// Short human form, e.g. `10.20.0.0/16 tcp 443,8000-8100`.
    pub fn describe(&self) -> String {
        format!(
            "{} {}",
            self.cidr,
            describe_access(self.protocol, self.ports.as_deref())
        )
    }
}

/// `tcp 443,8000-8100`, `any all-ports`: a rule's protocol and ports.
fn describe_access(protocol: Protocol, ports: Option<&[PortRange]>) -> String {
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => "any",
    };
    let ports = match ports {
        None => "all-ports".to_owned(),
        Some(p) => p
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    format!("{proto} {ports}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    pub name: String,
    pub owner: String,
    pub description: String,
    pub mode: Mode,
    /// Address rules (`cidr`).
    pub allow: Vec<Rule>,
    /// Hostname rules (`host`): addresses agentd's resolver answers for
    /// these names are allowed for as long as their TTL (clamped).
    pub hosts: Vec<HostRule>,
    pub launchers: Vec<String>,
    /// A cgroup that exists apart from agentd (relative to the cgroup v2
    /// mount) and is this agent's identity: agentd attaches to it and
    /// re-attaches when it is recreated, never creates or removes it.
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub path: PathBuf,
    pub daemon: DaemonConfig,
    pub access: AccessConfig,
    pub dns: DnsConfig,
    pub agents: Vec<Agent>,
}

impl Config {
    pub fn agent(&self, name: &str) -> Option<&Agent> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, Box<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Box::new(ConfigError {
                path: path.to_owned(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read: {e}"),
            })
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Box<ConfigError>> {
        let lines = LineIndex::new(text);
        let at = |span: Range<usize>, key: &str, message: String| {
            let (line, column) = lines.locate(span.start);
            Box::new(ConfigError {
                path: path.to_owned(),
                line,
                column,
                key: key.to_owned(),
                message,
            })
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_owned();
            let key = key_in_message(&message).unwrap_or_default();
            at(span, &key, message)
        })?;

        let daemon_span = raw.daemon.span();
        let daemon = raw.daemon.into_inner();
        validate_daemon(&daemon).map_err(|(key, msg)| at(daemon_span, &key, msg))?;
        let principals = |list: Vec<Spanned<String>>, key: &str| {
            list.into_iter()
                .enumerate()
                .map(|(i, e)| {
                    validate_principal(e.get_ref())
                        .map_err(|m| at(e.span(), &format!("{key}[{i}]"), m))?;
                    Ok(e.into_inner())
                })
                .collect::<Result<Vec<_>, Box<ConfigError>>>()
        };
        let access = AccessConfig {
            socket_group: match raw.access.socket_group {
                None => None,
                Some(g) => {
                    if g.get_ref().starts_with('@') {
                        return Err(at(
                            g.span(),
                            "access.socket_group",
                            "a group name, without `@`".into(),
                        ));
                    }
                    validate_principal(g.get_ref())
                        .map_err(|m| at(g.span(), "access.socket_group", m))?;
                    Some(g.into_inner())
                }
            },
            admins: principals(raw.access.admins, "access.admins")?,
            responders: principals(raw.access.responders, "access.responders")?,
            viewers: principals(raw.access.viewers, "access.viewers")?,
        };

        let dns_span = raw.dns.span();
        let dns = validate_dns(raw.dns.into_inner(), dns_span)
            .map_err(|(span, key, msg)| at(span, &key, msg))?;

        let mut names = HashSet::new();
        let mut bound = HashSet::new();
        let mut agents = Vec::with_capacity(raw.agents.len());
        for (i, agent) in raw.agents.into_iter().enumerate() {
            let agent = agent.into_inner();
            let key = |k: &str| format!("agent[{i}].{k}");
            let name = agent.name.get_ref();
            if !valid_agent_name(name) {
                return Err(at(
                    agent.name.span(),
                    &key("name"),
                    format!("{name:?} is not a valid agent name (want [a-z0-9][a-z0-9-]{{0,62}})"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(at(
                    agent.name.span(),
                    &key("name"),
                    format!("duplicate agent name {name:?}"),
                ));
            }
            if agent.owner.get_ref().trim().is_empty() {
                return Err(at(
                    agent.owner.span(),
                    &key("owner"),
                    "owner must name the accountable human".into(),
                ));
            }
            let mut allow = Vec::with_capacity(agent.allow.len());
            let mut hosts = Vec::new();
            for (j, rule) in agent.allow.into_iter().enumerate() {
                let rule_span = rule.span();
                let rule = rule.into_inner();
                let rkey = |k: &str| key(&format!("allow[{j}].{k}"));
                let target = match (&rule.cidr, &rule.host) {
                    (Some(c), None) => Target::Cidr(
                        parse_cidr(c.get_ref()).map_err(|m| at(c.span(), &rkey("cidr"), m))?,
                    ),
                    (None, Some(h)) => Target::Host(
                        HostPattern::parse(h.get_ref())
                            .map_err(|m| at(h.span(), &rkey("host"), m))?,
                    ),
                    (Some(_), Some(h)) => {
                        return Err(at(
                            h.span(),
                            &rkey("host"),
                            "a rule has either `cidr` or `host`, not both".into(),
                        ));
                    }
                    (None, None) => {
                        return Err(at(
                            rule_span,
                            &key(&format!("allow[{j}]")),
                            "a rule needs `cidr` (addresses) or `host` (a name)".into(),
                        ));
                    }
                };
                let ports = match rule.ports {
                    None => None,
                    Some(list) => {
                        if list.get_ref().is_empty() {
                            return Err(at(
                                list.span(),
                                &rkey("ports"),
                                "empty port list; omit `ports` to allow every port".into(),
                            ));
                        }
                        let mut out = Vec::with_capacity(list.get_ref().len());
                        for p in list.into_inner() {
                            let span = p.span();
                            out.push(
                                parse_port(p.get_ref()).map_err(|m| at(span, &rkey("ports"), m))?,
                            );
                        }
                        Some(out)
                    }
                };
                let line = lines.locate(rule_span.start).0;
                match target {
                    Target::Cidr(cidr) => allow.push(Rule {
                        cidr,
                        ports,
                        protocol: rule.protocol,
                        line,
                    }),
                    Target::Host(host) => hosts.push(HostRule {
                        host,
                        ports,
                        protocol: rule.protocol,
                        line,
                    }),
                }
            }
            let launchers = principals(agent.launchers, &key("launchers"))?;
            let cgroup = match agent.cgroup {
                None => None,
                Some(c) => {
                    let path = crate::cgroup::bound_path(c.get_ref(), &daemon.cgroup_root)
                        .map_err(|m| at(c.span(), &key("cgroup"), m))?;
                    if !bound.insert(path.clone()) {
                        return Err(at(
                            c.span(),
                            &key("cgroup"),
                            format!("cgroup {path:?} is already bound to another agent"),
                        ));
                    }
                    Some(path)
                }
            };
            agents.push(Agent {
                name: agent.name.into_inner(),
                owner: agent.owner.into_inner(),
                description: agent.description,
                mode: agent.mode,
                allow,
                hosts,
                launchers,
                cgroup,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            daemon,
            access,
            dns,
            agents,
        })
    }
}

/// What an allow rule names.
enum Target {
    Cidr(IpNet),
    Host(HostPattern),
}

/// `[a-z0-9][a-z0-9-]{0,62}`: safe as a cgroup directory name and a label.
pub fn valid_agent_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = match s.parse() {
        Ok(n) => n,
        // A bare address is a single host.
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(format!(
                    "{s:?} is not a CIDR (e.g. 10.20.0.0/16 or 2001:db8::/32)"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn parse_port(p: &RawPort) -> Result<PortRange, String> {
    fn one(n: i64, what: &str) -> Result<u16, String> {
        if (1..=65535).contains(&n) {
            Ok(n as u16)
        } else {
            Err(format!("{what} {n} is out of range (1-65535)"))
        }
    }
    match p {
        RawPort::Number(n) => {
            let n = one(*n, "port")?;
            Ok(PortRange { first: n, last: n })
        }
        RawPort::Text(s) => {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let parse = |t: &str| {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{s:?} is not a port or a range like \"8000-8100\""))
            };
            let (first, last) = (one(parse(a)?, "port")?, one(parse(b)?, "port")?);
            if first > last {
                return Err(format!("range {s:?} is reversed"));
            }
            Ok(PortRange { first, last })
        }
    }
}

/// Byte offset -> 1-based line and column, in O(log lines) per lookup (a
/// config may hold 100 000 rules).
struct LineIndex {
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self {
            starts,
            len: text.len(),
        }
    }

    fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.len);
        let line = self.starts.partition_point(|&s| s <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }
}

/// serde names the offending key in backquotes ("unknown field `foo`",
/// "missing field `owner`").
fn key_in_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_owned())
}

mod daemon;
mod dns;
pub mod host;
#[cfg(test)]
mod tests;
