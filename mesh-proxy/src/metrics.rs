//! The proxy's Prometheus metrics, all under `mesh_proxy_`. The reference is
//! `docs/reference/metrics.md`.
//!
//! The request path never builds label sets: each route backend keeps its handles in a
//! [`BackendSlot`], filled on first use.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub route: String,
    pub backend: String,
    /// `1xx` .. `5xx`, or `error` when no response came back.
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub direction: Direction,
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    /// `http` or `tcp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsLabels {
    pub xds_type: &'static str,
    /// `ack` or `nack`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub backend: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsRefusedLabels {
    /// `inbound`: a client's certificate was refused; `outbound`: a server's.
    pub direction: Direction,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The client's SPIFFE ID.
    pub peer: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub retries: Family<ReasonLabels, Counter>,
    pub retries_denied: Family<ReasonLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
    pub connections: Family<ListenerLabels, Counter>,
    pub active_connections: Family<ListenerLabels, Gauge>,
    pub xds_updates: Family<XdsLabels, Counter>,
    pub xds_connected: Gauge,
    pub config_generation: Gauge,
    pub tls_refused: Family<TlsRefusedLabels, Counter>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub tls_handshake_failures: Family<TlsLabels, Counter>,
    pub inbound_peers: Family<PeerLabels, Counter>,
    pub svid_renewals: Counter,
    pub svid_renewal_failures: Counter,
    pub svid_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by direction, route, backend and status class",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        registry.register(
            "request_duration_seconds",
            "Time from the request to the response headers, retries included",
            latency.clone(),
        );
        let retries = Family::<ReasonLabels, Counter>::default();
        registry.register("retries", "Retries sent, by reason", retries.clone());
        let retries_denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "retries_denied",
            "Retries not sent because the retry budget was spent or the body was too large",
            retries_denied.clone(),
        );
        let ejections = Family::<BackendLabels, Counter>::default();
        registry.register(
            "endpoint_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        let connections = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted, by listener and protocol",
            connections.clone(),
        );
        let active_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "active_connections",
            "Connections open now, by listener and protocol",
            active_connections.clone(),
        );
        let xds_updates = Family::<XdsLabels, Counter>::default();
        registry.register(
            "xds_updates",
            "xDS responses applied (ack) or refused (nack), by type",
            xds_updates.clone(),
        );
        let xds_connected = Gauge::default();
        registry.register(
            "xds_connected",
            "1 while the xDS stream to the controller is up",
            xds_connected.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "config_generation",
            "Generation of the running config snapshot",
            config_generation.clone(),
        );
        let tls_refused = Family::<TlsRefusedLabels, Counter>::default();
        registry.register(
            "tls_peer_refused",
            "Peer certificates refused in mesh TLS, by direction and reason",
            tls_refused.clone(),
        );
        let tls_handshakes = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "Mesh TLS handshakes completed",
            tls_handshakes.clone(),
        );
        let tls_handshake_failures = Family::<TlsLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "Mesh TLS handshakes that failed (a refused peer, no valid SVID, a plaintext peer)",
            tls_handshake_failures.clone(),
        );
        let inbound_peers = Family::<PeerLabels, Counter>::default();
        registry.register(
            "inbound_mtls_connections",
            "Mesh TLS connections accepted, by the client's SPIFFE ID",
            inbound_peers.clone(),
        );
        let svid_renewals = Counter::default();
        registry.register(
            "svid_renewals",
            "Workload certificates received from the CA",
            svid_renewals.clone(),
        );
        let svid_renewal_failures = Counter::default();
        registry.register(
            "svid_renewal_failures",
            "Certificate requests to the CA that failed",
            svid_renewal_failures.clone(),
        );
        let svid_expiry = Gauge::default();
        registry.register(
            "svid_expiry_seconds",
            "When the workload certificate expires, in Unix seconds (0: none yet)",
            svid_expiry.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            retries,
            retries_denied,
            ejections,
            connections,
            active_connections,
            xds_updates,
            xds_connected,
            config_generation,
            tls_refused,
            tls_handshakes,
            tls_handshake_failures,
            inbound_peers,
            svid_renewals,
            svid_renewal_failures,
            svid_expiry,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The metric handles of one route backend in one direction.
#[derive(Debug)]
pub struct BackendMetrics {
    pub direction: Direction,
    pub route: String,
    pub backend: String,
    classes: [OnceLock<Counter>; 6],
    pub latency: Histogram,
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

impl BackendMetrics {
    /// Counts a response with this status, or a failure (`None`).
    pub fn count(&self, metrics: &Metrics, status: Option<u16>) {
        let i = match status {
            Some(s @ 100..=599) => usize::from(s / 100 - 1),
            _ => 5,
        };
        self.classes[i]
            .get_or_init(|| {
                metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        direction: self.direction,
                        route: self.route.clone(),
                        backend: self.backend.clone(),
                        status_class: CLASSES[i],
                    })
                    .clone()
            })
            .inc();
    }
}

/// Where a route backend keeps its handles, one per direction.
#[derive(Debug, Default)]
pub struct BackendSlot([OnceLock<Arc<BackendMetrics>>; 2]);

impl BackendSlot {
    pub fn get(
        &self,
        metrics: &Metrics,
        direction: Direction,
        route: &str,
        backend: &str,
    ) -> &Arc<BackendMetrics> {
        self.0[direction as usize].get_or_init(|| {
            let latency = metrics
                .latency
                .get_or_create(&RouteLabels {
                    direction,
                    route: route.to_string(),
                    backend: backend.to_string(),
                })
                .clone();
            Arc::new(BackendMetrics {
                direction,
                route: route.to_string(),
                backend: backend.to_string(),
                classes: Default::default(),
                latency,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_without_rebuilding_labels() {
        let m = Metrics::new();
        let slot = BackendSlot::default();
        let h = slot.get(
            &m,
            Direction::outbound,
            "default/reviews",
            "outbound|9080||reviews-v2",
        );
        h.count(&m, Some(200));
        h.count(&m, Some(204));
        h.count(&m, Some(503));
        h.count(&m, None);
        assert!(Arc::ptr_eq(h, slot.get(&m, Direction::outbound, "x", "y")));
        let text = m.encode();
        assert!(text.contains(
            r#"mesh_proxy_requests_total{direction="outbound",route="default/reviews",backend="outbound|9080||reviews-v2",status_class="2xx"} 2"#
        ), "{text}");
        assert!(text.contains(r#"status_class="5xx"} 1"#));
        assert!(text.contains(r#"status_class="error"} 1"#));
    }
}
