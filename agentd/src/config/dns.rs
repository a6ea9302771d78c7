//! `[dns]`: how agentd's resolver answers agents with hostname rules.
//! Applied by `reload` like the agents' rules.
use std::{net::SocketAddr, ops::Range, time::Duration};

use serde::{Deserialize, Serialize};
use toml::Spanned;

/// What a name an agent may not resolve gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// "No such name": stub resolvers stop there.
    #[default]
    Nxdomain,
    /// "Refused": some stubs try the next server.
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsConfig {
    /// Servers asked for names agents may resolve, in order; empty: the
    /// nameservers in /etc/resolv.conf, read when the daemon starts.
    pub upstream: Vec<SocketAddr>,
    pub refuse_with: Refusal,
    /// Learned addresses stay allowed at least this long, whatever the TTL.
    #[serde(with = "humantime_text")]
    pub min_ttl: Duration,
    /// ... and at most this long; answers' TTLs are cut to it too, so an
    /// agent never caches an address longer than it stays allowed.
    #[serde(with = "humantime_text")]
    pub max_ttl: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstream: Vec::new(),
            refuse_with: Refusal::Nxdomain,
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
        }
    }
}

mod humantime_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// `[dns]` as written, spans kept for errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    upstream: Vec<Spanned<String>>,
    #[serde(default)]
    refuse_with: Option<Spanned<String>>,
    #[serde(default)]
    min_ttl: Option<Spanned<String>>,
    #[serde(default)]
    max_ttl: Option<Spanned<String>>,
}

/// A problem: where, which key, what.
type Problem = (Range<usize>, String, String);

/// `"127.0.0.53:53"`, `"[::1]:53"`, or a bare address (port 53).
fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    text.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| {
            format!("{text:?} is not a server address (e.g. \"127.0.0.53:53\" or \"[::1]:53\")")
        })
}

fn parse_ttl(s: &Spanned<String>, key: &str) -> Result<Duration, Problem> {
    humantime::parse_duration(s.get_ref()).map_err(|e| {
        (
            s.span(),
            format!("dns.{key}"),
            format!(
                "{:?} is not a duration such as \"5s\" or \"1h\": {e}",
                s.get_ref()
            ),
        )
    })
}

pub(super) fn validate_dns(raw: RawDns, section: Range<usize>) -> Result<DnsConfig, Problem> {
    let defaults = DnsConfig::default();
    let mut upstream = Vec::with_capacity(raw.upstream.len());
    for (i, u) in raw.upstream.iter().enumerate() {
        let addr =
            parse_upstream(u.get_ref()).map_err(|m| (u.span(), format!("dns.upstream[{i}]"), m))?;
        if addr.port() == 0 {
            return Err((
                u.span(),
                format!("dns.upstream[{i}]"),
                "port 0 is not a server port".into(),
            ));
        }
        upstream.push(addr);
    }
    let min_ttl = match &raw.min_ttl {
        Some(s) => parse_ttl(s, "min_ttl")?,
        None => defaults.min_ttl,
    };
    let max_ttl = match &raw.max_ttl {
        Some(s) => parse_ttl(s, "max_ttl")?,
        None => defaults.max_ttl,
    };
    let max_span = raw.max_ttl.as_ref().map_or(section, |s| s.span());
    if max_ttl < Duration::from_secs(1) {
        return Err((
            max_span,
            "dns.max_ttl".into(),
            "must be at least 1s: an address must stay allowed long enough to connect".into(),
        ));
    }
    if min_ttl > max_ttl {
        return Err((
            max_span,
            "dns.max_ttl".into(),
            format!(
                "max_ttl ({}) is below min_ttl ({})",
                humantime::format_duration(max_ttl),
                humantime::format_duration(min_ttl)
            ),
        ));
    }
    let refuse_with = match &raw.refuse_with {
        None => defaults.refuse_with,
        Some(s) => match s.get_ref().as_str() {
            "nxdomain" => Refusal::Nxdomain,
            "refused" => Refusal::Refused,
            other => {
                return Err((
                    s.span(),
                    "dns.refuse_with".into(),
                    format!("{other:?}: expected \"nxdomain\" or \"refused\""),
                ));
            }
        },
    };
    Ok(DnsConfig {
        upstream,
        refuse_with,
        min_ttl,
        max_ttl,
    })
}
