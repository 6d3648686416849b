//! The CA's Prometheus metrics (`mesh_ca_` prefix); `docs/reference/metrics.md` lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct CaMetrics {
    registry: Registry,
    pub issued: Counter,
    pub refused: Family<Refused, Counter>,
    pub roots: Gauge,
    /// When the signing certificate expires (Unix seconds).
    pub signing_not_after: Gauge,
}

impl Default for CaMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mesh_ca");
        let issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            issued.clone(),
        );
        let refused = Family::<Refused, Counter>::default();
        registry.register(
            "certificates_refused",
            "Certificate requests refused, by reason",
            refused.clone(),
        );
        let roots = Gauge::default();
        registry.register(
            "trust_bundle_roots",
            "Roots in the trust bundle handed to workloads",
            roots.clone(),
        );
        let signing_not_after = Gauge::default();
        registry.register(
            "signing_certificate_expiry_seconds",
            "When the signing certificate expires, in Unix seconds",
            signing_not_after.clone(),
        );
        Self {
            registry,
            issued,
            refused,
            roots,
            signing_not_after,
        }
    }
}

impl CaMetrics {
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&Refused { reason }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
