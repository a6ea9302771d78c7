//! Which of an agent's hostname rules allow a name: one hash probe for the
//! exact name and one per parent domain for wildcards, whatever the number
//! of rules.
use std::collections::HashMap;

use crate::config::HostRule;

#[derive(Debug, Clone, Default)]
pub struct HostMatcher {
    exact: HashMap<String, Vec<usize>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Vec<usize>>,
}

impl HostMatcher {
    pub fn new(rules: &[HostRule]) -> Self {
        let mut m = Self::default();
        for (i, r) in rules.iter().enumerate() {
            let table = if r.host.wildcard {
                &mut m.wildcard
            } else {
                &mut m.exact
            };
            table.entry(r.host.name.clone()).or_default().push(i);
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// Indices of the rules allowing `qname` (normalized: lowercase, no
    /// trailing dot), in rule order.
    pub fn matching(&self, qname: &str) -> Vec<usize> {
        let mut out: Vec<usize> = self.exact.get(qname).cloned().unwrap_or_default();
        // Every proper parent domain: "a.b.c" -> "b.c", "c".
        for (i, _) in qname.match_indices('.') {
            if let Some(rules) = self.wildcard.get(&qname[i + 1..]) {
                out.extend(rules);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostPattern, Protocol};

    fn rule(host: &str) -> HostRule {
        HostRule {
            host: HostPattern::parse(host).unwrap(),
            ports: None,
            protocol: Protocol::Any,
            line: 1,
        }
    }

    #[test]
    fn matcher_agrees_with_the_patterns() {
        let rules = vec![
            rule("crm.test"),
            rule("*.crm.test"),
            rule("*.b.crm.test"),
            rule("erp.test"),
        ];
        let m = HostMatcher::new(&rules);
        for name in [
            "crm.test",
            "api.crm.test",
            "a.b.crm.test",
            "b.crm.test",
            "erp.test",
            "x.erp.test",
            "test",
            "evil.test",
            "crm.test.evil",
        ] {
            let want: Vec<usize> = (0..rules.len())
                .filter(|&i| rules[i].host.matches(name))
                .collect();
            assert_eq!(m.matching(name), want, "{name}");
        }
        assert_eq!(m.matching("a.b.crm.test"), vec![1, 2]);
    }
}
