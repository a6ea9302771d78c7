//! Hostname rules: `host = "crm.example.com"` or `host = "*.erp.example.com"`.
//! Names are compared lowercase and without the trailing dot.
use std::fmt;

use serde::Serialize;

use super::{PortRange, Protocol};

/// The name a hostname rule allows. `*.example.com` matches any name ending
/// in `.example.com` (one label or more), never `example.com` itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct HostPattern {
    pub wildcard: bool,
    /// Lowercase, no trailing dot, without the `*.` of a wildcard.
    pub name: String,
}

/// Longest name DNS can carry (RFC 1035, in presentation form).
const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Lowercase and without the trailing dot: how names are compared.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = normalize(text.trim());
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower),
        };
        if name.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "{text:?} is an address; use `cidr = {name:?}` for addresses"
            ));
        }
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(format!(
                "{text:?} is not a host name (1 to {MAX_NAME} characters)"
            ));
        }
        for label in name.split('.') {
            let ok = !label.is_empty()
                && label.len() <= MAX_LABEL
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                let hint = if label.contains('*') {
                    "; `*` may only stand as the first label, as in \"*.example.com\""
                } else {
                    ""
                };
                return Err(format!(
                    "{text:?}: label {label:?} is not valid in a host name \
                     (letters, digits, `-` and `_`, at most {MAX_LABEL}){hint}"
                ));
            }
        }
        if wildcard && !name.contains('.') {
            return Err(format!(
                "{text:?} would allow a whole top-level domain; a wildcard needs at least \
                 two labels after `*.`, as in \"*.example.com\""
            ));
        }
        Ok(Self { wildcard, name })
    }

    /// Whether a normalized query name is allowed by this pattern.
    pub fn matches(&self, qname: &str) -> bool {
        if self.wildcard {
            qname.len() > self.name.len() + 1
                && qname.ends_with(&self.name)
                && qname.as_bytes()[qname.len() - self.name.len() - 1] == b'.'
        } else {
            qname == self.name
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// One validated hostname rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostRule {
    pub host: HostPattern,
    /// `None`: every port.
    pub ports: Option<Vec<PortRange>>,
    pub protocol: Protocol,
    /// Where the rule is written, for the audit log.
    pub line: usize,
}

impl HostRule {
    /// Short human form, e.g. `host *.erp.example.com tcp 443,8443`.
    pub fn describe(&self) -> String {
        format!(
            "host {} {}",
            self.host,
            super::describe_access(self.protocol, self.ports.as_deref())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_matching() {
        let exact = HostPattern::parse("CRM.Example.com.").unwrap();
        assert_eq!(exact.name, "crm.example.com");
        assert!(exact.matches("crm.example.com"));
        assert!(!exact.matches("api.crm.example.com"));
        assert!(!exact.matches("xcrm.example.com"));

        let wild = HostPattern::parse("*.erp.example.com").unwrap();
        assert_eq!(wild.to_string(), "*.erp.example.com");
        assert!(wild.matches("a.erp.example.com"));
        assert!(wild.matches("a.b.erp.example.com"));
        assert!(!wild.matches("erp.example.com"), "not the suffix itself");
        assert!(!wild.matches("xerp.example.com"), "label boundary");
        assert!(!wild.matches("a.erp.example.com.evil.test"));
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for (text, want) in [
            ("10.0.0.1", "use `cidr"),
            ("", "not a host name"),
            ("*.com", "top-level domain"),
            ("a.*.example.com", "first label"),
            ("*", "not valid"),
            ("-bad.example.com", "not valid"),
            ("spa ce.example.com", "not valid"),
            ("a..b", "not valid"),
        ] {
            let err = HostPattern::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(HostPattern::parse(&long).is_err());
    }
}
