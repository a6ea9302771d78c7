//! Reading agentd's `/metrics` back in tests: fetched over HTTP (ureq) and
//! parsed as the Prometheus text format (prometheus-parse).
use std::time::Duration;

use prometheus_parse::{Sample, Value};

/// A port free on loopback right now (bound, read, released), for a
/// daemon's `metrics_listen`.
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral loopback port")
        .port()
}

/// One scrape of `/metrics`.
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// GETs `http://{addr}/metrics`; panics unless it is a 200 with the
    /// Prometheus text content type.
    pub fn get(addr: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut response = agent
            .get(format!("http://{addr}/metrics"))
            .call()
            .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "content type {content_type:?}"
        );
        let text = response
            .body_mut()
            .read_to_string()
            .expect("reading /metrics");
        let samples = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("/metrics parses as the Prometheus text format")
            .samples;
        Self { text, samples }
    }

    /// The value of the one sample named `name` whose labels include
    /// `labels`; None when there is none. Panics when several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.samples.iter().filter(|s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let sample = found.next()?;
        assert!(
            found.next().is_none(),
            "several {name} samples match {labels:?}"
        );
        match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
            Value::Histogram(_) | Value::Summary(_) => {
                panic!("{name} is a histogram or summary; ask for _count or _sum")
            }
        }
    }

    /// Every metric name in the scrape (histograms by their base name and
    /// their `_bucket`, `_sum` and `_count` series).
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for s in &self.samples {
            out.insert(s.metric.clone());
            if matches!(s.value, Value::Histogram(_)) {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{}{suffix}", s.metric));
                }
            }
        }
        out
    }
}
