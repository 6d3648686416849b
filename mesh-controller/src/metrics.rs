//! The controller's Prometheus metrics, all under the `mesh_controller_` prefix. The reference
//! is `docs/reference/metrics.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `CDS`, `EDS`, `LDS` or `RDS`.
    pub xds_type: &'static str,
}

impl TypeLabels {
    pub fn new(ty: crate::xds::resources::ResourceType) -> Self {
        Self {
            xds_type: ty.short(),
        }
    }
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
    .into_iter()
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub pushes: Family<TypeLabels, Counter>,
    pub push_latency: Family<TypeLabels, Histogram>,
    pub nacks: Family<TypeLabels, Counter>,
    pub connected_proxies: Gauge,
    pub rejected_manifests: Gauge,
    pub revision: Gauge,
    pub model_build: Histogram,
    pub node_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_controller");
        let pushes = Family::<TypeLabels, Counter>::default();
        registry.register(
            "xds_pushes",
            "xDS responses sent to proxies",
            pushes.clone(),
        );
        let push_latency = Family::<TypeLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "xds_push_latency_seconds",
            "Time from a configuration change being seen to the xDS response carrying it being sent",
            push_latency.clone(),
        );
        let nacks = Family::<TypeLabels, Counter>::default();
        registry.register("xds_nacks", "xDS responses a proxy rejected", nacks.clone());
        let connected_proxies = Gauge::default();
        registry.register(
            "xds_connected_proxies",
            "Proxies with an open ADS stream",
            connected_proxies.clone(),
        );
        let rejected_manifests = Gauge::default();
        registry.register(
            "config_rejected_manifests",
            "Manifests currently refused (see /debug/config-errors)",
            rejected_manifests.clone(),
        );
        let revision = Gauge::default();
        registry.register(
            "config_revision",
            "Revision of the index last pushed",
            revision.clone(),
        );
        let model_build = Histogram::new(latency_buckets());
        registry.register(
            "model_build_seconds",
            "Time to resolve the index and translate the global xDS resources",
            model_build.clone(),
        );
        let node_refused = Counter::default();
        registry.register(
            "xds_node_refused",
            "xDS streams refused because the node did not match the client certificate",
            node_refused.clone(),
        );
        Self {
            registry,
            node_refused,
            pushes,
            push_latency,
            nacks,
            connected_proxies,
            rejected_manifests,
            revision,
            model_build,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
