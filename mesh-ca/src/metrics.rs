//! The CA's Prometheus metrics.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Counters and histograms of the CA, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    issued: Counter,
    refused: Family<ReasonLabels, Counter>,
    signing: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sockmesh_ca");
        let issued = Counter::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        // 50µs .. ~1.6s.
        let signing = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "certificates_issued",
            "Workload certificates issued",
            issued.clone(),
        );
        registry.register(
            "requests_refused",
            "Sign requests refused, by reason",
            refused.clone(),
        );
        registry.register(
            "signing_duration_seconds",
            "Time to check a CSR and sign its certificate",
            signing.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            issued,
            refused,
            signing,
        }
    }

    pub fn issued(&self, took: Duration) {
        self.issued.inc();
        self.signing.observe(took.as_secs_f64());
    }

    pub fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn issued_total(&self) -> u64 {
        self.issued.get()
    }

    pub fn refused_total(&self, reason: &str) -> u64 {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
