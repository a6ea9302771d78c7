//! Prometheus metrics. Two kinds:
//! - what happens in the daemon (kill switch actions and their duration,
//!   reloads, control requests): kept here as they happen;
//! - what the kernel knows (decisions per agent, lost events, the kill flag,
//!   whether the programs are attached): read from the kernel at each
//!   scrape, so they are exact even when audit events were lost, and never
//!   a copy of something the daemon merely remembers.
//!
//! Labels carry agent names and fixed words only, never addresses, ports,
//! pids or free text: the number of series is bounded by the agents.
use prometheus::{
    Encoder as _, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder, proto::MetricFamily,
};

use crate::{daemon::State, programs};

pub mod http;

/// The metrics the daemon keeps itself.
pub struct Metrics {
    registry: Registry,
    kill_actions: IntCounterVec,
    kill_duration: Histogram,
    reloads: IntCounterVec,
    control_requests: IntCounterVec,
    dns_queries: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let kill_actions = IntCounterVec::new(
            Opts::new(
                "agentd_kill_switch_actions_total",
                "Kill switch actions that changed an agent's state, by action (kill, restore).",
            ),
            &["agent", "action"],
        )
        .expect("valid metric");
        let kill_duration = Histogram::with_opts(
            HistogramOpts::new(
                "agentd_kill_duration_seconds",
                "Kill request received to the agent's last socket aborted (or the flag set, \
                 when it held none).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "agentd_config_reloads_total",
                "Configuration reloads (reload command or SIGHUP), by result (success, failure).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let control_requests = IntCounterVec::new(
            Opts::new(
                "agentd_control_requests_total",
                "Control socket requests, by action and result (ok, refused, error).",
            ),
            &["action", "result"],
        )
        .expect("valid metric");
        let dns_queries = IntCounterVec::new(
            Opts::new(
                "agentd_dns_queries_total",
                "DNS queries agents sent (steered to agentd's resolver), by verdict (allow, \
                 deny, audit) and result (answered, refused, failed).",
            ),
            &["agent", "verdict", "result"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("agentd_build_info", "agentd's version; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for c in [
            Box::new(kill_actions.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(kill_duration.clone()),
            Box::new(reloads.clone()),
            Box::new(control_requests.clone()),
            Box::new(dns_queries.clone()),
            Box::new(build_info),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Both results exist from the start, so `increase()` sees the first
        // failure.
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        Self {
            registry,
            kill_actions,
            kill_duration,
            reloads,
            control_requests,
            dns_queries,
        }
    }

    /// One query an agent's resolver handled; all three labels bounded.
    pub fn dns_query(&self, agent: &str, verdict: &str, result: &str) {
        self.dns_queries
            .with_label_values(&[agent, verdict, result])
            .inc();
    }

    /// A kill or restore that changed the agent's state; `seconds` for kills.
    pub fn kill_switch(&self, agent: &str, kill: bool, seconds: Option<f64>) {
        let action = if kill { "kill" } else { "restore" };
        self.kill_actions.with_label_values(&[agent, action]).inc();
        if let Some(s) = seconds {
            self.kill_duration.observe(s);
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
    }

    /// `action` is a fixed protocol word (or `invalid`), `result` one of
    /// ok, refused, error: both bounded.
    pub fn control_request(&self, action: &str, result: &str) {
        self.control_requests
            .with_label_values(&[action, result])
            .inc();
    }
}

/// The whole exposition: the daemon's own metrics and a fresh read of the
/// kernel's.
pub fn render(state: &State) -> String {
    let mut families = state.metrics.registry.gather();
    families.extend(kernel_families(state));
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// Per-agent metrics read from the kernel (and the cgroup tree) now.
fn kernel_families(state: &State) -> Vec<MetricFamily> {
    let connections = IntCounterVec::new(
        Opts::new(
            "agentd_connections_total",
            "Connect and send decisions counted in the kernel, by agent, verdict (allowed, \
             denied, audited) and protocol (tcp, udp).",
        ),
        &["agent", "verdict", "protocol"],
    )
    .expect("valid metric");
    let killed = gauge_vec(
        "agentd_agent_killed",
        "1 while the agent's kill switch is pulled (the kernel's flag).",
        &["agent"],
    );
    let processes = gauge_vec(
        "agentd_agent_processes",
        "Processes in the agent's cgroup.",
        &["agent"],
    );
    let rules = gauge_vec(
        "agentd_policy_rules",
        "Allow rules in the agent's policy.",
        &["agent"],
    );
    let healthy = gauge_vec(
        "agentd_enforcement_healthy",
        "1 when the kernel confirms the agent's entry is in place and every hook program is \
         attached to its cgroup; 0 otherwise.",
        &["agent"],
    );
    let learned = gauge_vec(
        "agentd_learned_addresses",
        "Addresses the agent's hostname rules allow now, learned from answers agentd's \
         resolver gave it.",
        &["agent"],
    );
    let lost = IntCounter::with_opts(Opts::new(
        "agentd_events_lost_total",
        "Decisions whose audit event did not fit in the ring buffer (counted in the kernel; \
         the decision itself was made and counted).",
    ))
    .expect("valid metric");

    // The learned lock is taken (and dropped) before the agents and maps
    // locks, in the daemon's lock order.
    let agents = {
        let l = state.dns.learned();
        let agents = state
            .agents
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for a in &agents {
            learned
                .with_label_values(&[a.name.as_str()])
                .set(l.count(&a.name) as i64);
        }
        agents
    };
    let bpffs_dir = state.config().daemon.bpffs_dir.clone();
    let maps = state.maps.lock().unwrap_or_else(|p| p.into_inner());
    for a in &agents {
        let name = a.name.as_str();
        if let Ok(c) = maps.counts_by_protocol(a.agent_id) {
            for (verdict, by_proto) in [
                ("allowed", c.allowed),
                ("denied", c.denied),
                ("audited", c.audited),
            ] {
                for (protocol, n) in [("tcp", by_proto[0]), ("udp", by_proto[1])] {
                    connections
                        .with_label_values(&[name, verdict, protocol])
                        .inc_by(n);
                }
            }
        }
        let entry = maps.agent(a.cgroup_id);
        killed.with_label_values(&[name]).set(i64::from(
            entry.is_some_and(|e| e.flags & agentd_ebpf::AGENT_KILLED != 0),
        ));
        let procs = crate::cgroup::processes(&a.cgroup_dir).map_or(0, |p| p.len());
        processes.with_label_values(&[name]).set(procs as i64);
        rules
            .with_label_values(&[name])
            .set((a.rules.len() + a.hosts.rules.len()) as i64);
        let ok = entry.is_some()
            && a.cgroup_id != 0
            && crate::cgroup::cgroup_id(&a.cgroup_dir).is_ok_and(|id| id == a.cgroup_id)
            && programs::hooks_attached(&bpffs_dir, name, &a.cgroup_dir);
        healthy.with_label_values(&[name]).set(i64::from(ok));
    }
    if let Ok(n) = maps.total_events_lost() {
        lost.inc_by(n);
    }
    drop(maps);

    let mut out = Vec::new();
    for c in [
        Box::new(connections) as Box<dyn prometheus::core::Collector>,
        Box::new(killed),
        Box::new(processes),
        Box::new(rules),
        Box::new(healthy),
        Box::new(learned),
        Box::new(lost),
    ] {
        out.extend(c.collect());
    }
    out
}
