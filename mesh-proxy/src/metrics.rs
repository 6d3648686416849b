//! The proxy's Prometheus metrics, all under `mesh_proxy_`. The reference is
//! `docs/reference/metrics.md`.
//!
//! The request path never builds label sets: each route backend keeps its handles in a
//! [`BackendSlot`], filled on first use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
}

impl Direction {
    /// `(source, destination)` of a request this proxy (`me`) sends (outbound) to `other`, or
    /// receives (inbound) from it.
    pub fn ends<'a>(self, me: &'a Peer, other: &'a Peer) -> (&'a Peer, &'a Peer) {
        match self {
            Direction::outbound => (me, other),
            Direction::inbound => (other, me),
        }
    }
}

/// One end of a request or connection: the workload, its namespace and its mesh identity.
/// Bounded by design: never a pod or an address.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Peer {
    pub namespace: String,
    pub workload: String,
    /// SPIFFE ID, or `unknown` (plaintext, identity off, or a peer outside the mesh).
    pub identity: String,
    /// Of the three above, computed once: a request looks its edge up by peer.
    #[serde(skip)]
    hash: u64,
}

impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
            || (self.hash == other.hash
                && self.namespace == other.namespace
                && self.workload == other.workload
                && self.identity == other.identity)
    }
}

impl Eq for Peer {}

impl std::hash::Hash for Peer {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// What a label says when the proxy cannot know.
pub const UNKNOWN: &str = "unknown";

impl Peer {
    pub fn new(namespace: &str, workload: &str, identity: Option<&mesh_api::SpiffeId>) -> Self {
        let or_unknown = |s: &str| {
            if s.is_empty() {
                UNKNOWN.to_string()
            } else {
                s.to_string()
            }
        };
        let (namespace, workload) = (or_unknown(namespace), or_unknown(workload));
        let identity = identity.map_or_else(|| UNKNOWN.to_string(), ToString::to_string);
        let mut h = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&(&namespace, &workload, &identity), &mut h);
        Peer {
            hash: std::hash::Hasher::finish(&h),
            namespace,
            workload,
            identity,
        }
    }

    /// A peer known only by its SPIFFE ID (its namespace comes from it).
    pub fn from_identity(id: &mesh_api::SpiffeId) -> Self {
        let ns = id
            .namespace_and_account()
            .map(|(ns, _)| ns)
            .unwrap_or_default();
        Peer::new(ns, "", Some(id))
    }

    /// The shared "nothing known" peer.
    pub fn unknown() -> Arc<Peer> {
        static UNKNOWN_PEER: OnceLock<Arc<Peer>> = OnceLock::new();
        UNKNOWN_PEER
            .get_or_init(|| Arc::new(Peer::new("", "", None)))
            .clone()
    }
}

/// Who called whom: the direction and both ends, labels every request and TCP series has.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ends {
    pub direction: Direction,
    pub src_namespace: String,
    pub src_workload: String,
    pub src_identity: String,
    pub dst_namespace: String,
    pub dst_workload: String,
    pub dst_identity: String,
}

impl Ends {
    fn new(direction: Direction, src: &Peer, dst: &Peer) -> Self {
        Ends {
            direction,
            src_namespace: src.namespace.clone(),
            src_workload: src.workload.clone(),
            src_identity: src.identity.clone(),
            dst_namespace: dst.namespace.clone(),
            dst_workload: dst.workload.clone(),
            dst_identity: dst.identity.clone(),
        }
    }
}

/// Who called whom, through which route and backend: the labels every request series has.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabels {
    #[prometheus(flatten)]
    pub ends: Ends,
    pub route: String,
    pub backend: String,
}

impl EdgeLabels {
    fn new(direction: Direction, src: &Peer, dst: &Peer, route: &str, backend: &str) -> Self {
        EdgeLabels {
            ends: Ends::new(direction, src, dst),
            route: route.to_string(),
            backend: backend.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub edge: EdgeLabels,
    /// `1xx` .. `5xx`, or `error` when no response came back.
    pub status_class: &'static str,
    /// The gRPC status code (`0` .. `16`), empty for a response that is not gRPC.
    pub grpc_status: &'static str,
}

/// Labels of opaque TCP connections: the edge without a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    pub ends: Ends,
    pub backend: String,
}

impl TcpLabels {
    pub fn new(direction: Direction, src: &Peer, dst: &Peer, backend: &str) -> Self {
        TcpLabels {
            ends: Ends::new(direction, src, dst),
            backend: backend.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub backend: String,
    /// `route` (the route's timeout) or `per-try`.
    pub kind: &'static str,
}

/// An authorization decision, by the policy that made it: the DENY policy that matched, the
/// ALLOW policy that let the request in, or `none` (no policy decided: nothing matched an ALLOW
/// filter, or every filter let it through without a named policy).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub policy: String,
    /// `allow` or `deny`.
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// The limit's name: `<namespace>/<RateLimitPolicy>`.
    pub policy: String,
    /// `total` or `identity`: the bucket that was empty.
    pub scope: &'static str,
    pub src_identity: String,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

/// One backend's series of a counter family, created when first counted: a scrape carries a
/// series for each backend that has something to count, not a zero for each of thousands
/// (10,000 backends made every scrape of an idle proxy about 1 MB).
#[derive(Clone, Debug, Default)]
pub struct BackendCounter {
    family: Family<BackendLabels, Counter>,
    labels: BackendLabels,
}

impl BackendCounter {
    pub fn new(family: &Family<BackendLabels, Counter>, backend: &str) -> Self {
        Self {
            family: family.clone(),
            labels: BackendLabels {
                backend: backend.to_string(),
            },
        }
    }

    pub fn inc(&self) {
        self.family.get_or_create(&self.labels).inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerNameLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
    /// `http` or `tcp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// `found`, `absent`, `timed_out` or `over_limit`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsTypeLabels {
    pub xds_type: &'static str,
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

/// Upper bounds of the latency buckets, in microseconds (0.5 ms to 10 s); `+Inf` follows.
const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram with the buckets above that records without a lock: an observation
/// is two atomic adds (its bucket and the sum; the count is the buckets' total). The
/// library's histogram takes a mutex per observation, on every request.
#[derive(Clone, Debug, Default)]
pub struct Latency(Arc<LatencyInner>);

#[derive(Debug, Default)]
struct LatencyInner {
    /// Per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound is at least `d` (Prometheus' `le`).
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b * 1_000 < ns);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let bounds = LATENCY_BUCKETS_US
            .iter()
            .map(|&us| us as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.0.buckets)
            .map(|(b, n)| (b, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// This proxy's own workload: the source of what it sends, the destination of what it
    /// receives.
    pub me: Arc<Peer>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EdgeLabels, Latency>,
    pub request_bytes: Family<EdgeLabels, Counter>,
    pub response_bytes: Family<EdgeLabels, Counter>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    pub timeouts: Family<TimeoutLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    /// `authz` by no named policy, denied and allowed; each policy keeps its own handle.
    authz_unnamed: [OnceLock<Counter>; 2],
    pub rate_limited: Family<RateLimitedLabels, Counter>,
    pub retries: Family<ReasonLabels, Counter>,
    pub retries_denied: Family<ReasonLabels, Counter>,
    pub ejections: Family<BackendLabels, Counter>,
    pub connections: Family<ListenerLabels, Counter>,
    pub active_connections: Family<ListenerLabels, Gauge>,
    pub connections_over_limit: Family<ListenerNameLabels, Counter>,
    pub xds_updates: Family<XdsLabels, Counter>,
    pub xds_connected: Gauge,
    pub lookups: Family<LookupLabels, Counter>,
    pub config_generation: Gauge,
    pub config_revision: Family<XdsTypeLabels, Gauge>,
    pub gateway_listeners_unbound: Gauge,
    pub tls_refused: Family<TlsRefusedLabels, Counter>,
    pub tls_handshakes: Family<TlsLabels, Counter>,
    pub tls_handshake_failures: Family<TlsLabels, Counter>,
    pub inbound_peers: Family<PeerLabels, Counter>,
    pub svid_renewals: Counter,
    pub svid_renewal_failures: Counter,
    pub svid_expiry: Gauge,
    pub access_log_dropped: Counter,
    pub resident_memory: Gauge,
    pub overload_shedding: Gauge,
    pub overload_shed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Registers a family (or metric) under `name` and hands it back.
fn reg<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Metrics of a proxy whose own workload is not known (tests).
    pub fn new() -> Self {
        Self::for_peer(Peer::new("", "", None))
    }

    pub fn for_peer(me: Peer) -> Self {
        let mut r = Registry::with_prefix("mesh_proxy");
        Self {
            me: Arc::new(me),
            requests: reg(
                &mut r,
                "requests",
                "HTTP requests, counted when the response ends, by edge, status class and gRPC status",
                Family::default(),
            ),
            latency: reg(
                &mut r,
                "request_duration_seconds",
                "Time from the request to the response headers, retries included",
                Family::default(),
            ),
            request_bytes: reg(
                &mut r,
                "request_bytes",
                "Request body bytes received from the client",
                Family::default(),
            ),
            response_bytes: reg(
                &mut r,
                "response_bytes",
                "Response body bytes sent to the client",
                Family::default(),
            ),
            tcp_opened: reg(
                &mut r,
                "tcp_connections_opened",
                "Opaque TCP connections opened to an endpoint",
                Family::default(),
            ),
            tcp_closed: reg(
                &mut r,
                "tcp_connections_closed",
                "Opaque TCP connections closed",
                Family::default(),
            ),
            tcp_sent: reg(
                &mut r,
                "tcp_sent_bytes",
                "Opaque TCP bytes from the client to the endpoint",
                Family::default(),
            ),
            tcp_received: reg(
                &mut r,
                "tcp_received_bytes",
                "Opaque TCP bytes from the endpoint to the client",
                Family::default(),
            ),
            timeouts: reg(
                &mut r,
                "timeouts",
                "Requests cut by a timeout, by backend and kind (route, per-try)",
                Family::default(),
            ),
            authz: reg(
                &mut r,
                "authz_requests",
                "Inbound requests and TCP connections checked by RBAC, by deciding policy and decision",
                Family::default(),
            ),
            authz_unnamed: [const { OnceLock::new() }; 2],
            rate_limited: reg(
                &mut r,
                "rate_limited",
                "Inbound requests refused by a local rate limit (429), by limit, bucket and caller",
                Family::default(),
            ),
            retries: reg(
                &mut r,
                "retries",
                "Retries sent, by reason",
                Family::default(),
            ),
            retries_denied: reg(
                &mut r,
                "retries_denied",
                "Retries not sent because the retry budget was spent or the body was too large",
                Family::default(),
            ),
            ejections: reg(
                &mut r,
                "endpoint_ejections",
                "Endpoints ejected by outlier detection",
                Family::default(),
            ),
            connections: reg(
                &mut r,
                "connections",
                "Connections accepted, by listener and protocol",
                Family::default(),
            ),
            active_connections: reg(
                &mut r,
                "active_connections",
                "Connections open now, by listener and protocol",
                Family::default(),
            ),
            connections_over_limit: reg(
                &mut r,
                "connections_over_limit",
                "Connections closed as soon as accepted because their listener held --max-connections",
                Family::default(),
            ),
            xds_updates: reg(
                &mut r,
                "xds_updates",
                "xDS responses applied (ack) or refused (nack), by type",
                Family::default(),
            ),
            xds_connected: reg(
                &mut r,
                "xds_connected",
                "1 while the xDS stream to the controller is up",
                Gauge::default(),
            ),
            lookups: reg(
                &mut r,
                "on_demand_lookups",
                "Connections to a destination the proxy held no config for (--scoped), by outcome",
                Family::default(),
            ),
            config_generation: reg(
                &mut r,
                "config_generation",
                "Generation of the running config snapshot",
                Gauge::default(),
            ),
            config_revision: reg(
                &mut r,
                "config_revision",
                "Per xDS type, the controller's model revision of the newest response the running config holds",
                Family::default(),
            ),
            gateway_listeners_unbound: reg(
                &mut r,
                "gateway_listeners_unbound",
                "A gateway's listeners that the config names and that could not be bound",
                Gauge::default(),
            ),
            tls_refused: reg(
                &mut r,
                "tls_peer_refused",
                "Peer certificates refused in mesh TLS, by direction and reason",
                Family::default(),
            ),
            tls_handshakes: reg(
                &mut r,
                "tls_handshakes",
                "Mesh TLS handshakes completed",
                Family::default(),
            ),
            tls_handshake_failures: reg(
                &mut r,
                "tls_handshake_failures",
                "Mesh TLS handshakes that failed (a refused peer, no valid SVID, a plaintext peer)",
                Family::default(),
            ),
            inbound_peers: reg(
                &mut r,
                "inbound_mtls_connections",
                "Mesh TLS connections accepted, by the client's SPIFFE ID",
                Family::default(),
            ),
            svid_renewals: reg(
                &mut r,
                "svid_renewals",
                "Workload certificates received from the CA",
                Counter::default(),
            ),
            svid_renewal_failures: reg(
                &mut r,
                "svid_renewal_failures",
                "Certificate requests to the CA that failed",
                Counter::default(),
            ),
            svid_expiry: reg(
                &mut r,
                "svid_expiry_seconds",
                "When the workload certificate expires, in Unix seconds (0: none yet)",
                Gauge::default(),
            ),
            access_log_dropped: reg(
                &mut r,
                "access_log_dropped",
                "Access log lines dropped because the writer was behind by a full queue",
                Counter::default(),
            ),
            resident_memory: reg(
                &mut r,
                "resident_memory_bytes",
                "Resident memory at the last reading (read every 250 ms with --memory-limit set)",
                Gauge::default(),
            ),
            overload_shedding: reg(
                &mut r,
                "overload_shedding",
                "1 while new requests are shed for memory pressure (--memory-limit)",
                Gauge::default(),
            ),
            overload_shed: reg(
                &mut r,
                "overload_shed_requests",
                "Requests answered 503 because of memory pressure (--memory-limit)",
                Counter::default(),
            ),
            registry: r,
        }
    }

    /// Counts an authorization decision under the policy that made it, through the handle
    /// `decision.by` keeps (its label never changes: a policy belongs to one filter).
    pub fn count_authz(&self, decision: &crate::policy::Decision<'_>) {
        let (policy, slot) = match decision.by {
            Some((name, p)) => (name, &p.decisions),
            None => ("none", &self.authz_unnamed[usize::from(decision.allowed)]),
        };
        slot.get_or_init(|| {
            self.authz
                .get_or_create(&AuthzLabels {
                    policy: policy.to_string(),
                    decision: if decision.allowed { "allow" } else { "deny" },
                })
                .clone()
        })
        .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The TCP series of one connection's edge.
    pub fn tcp(&self, labels: &TcpLabels) -> TcpMetrics {
        TcpMetrics {
            opened: self.tcp_opened.get_or_create(labels).clone(),
            closed: self.tcp_closed.get_or_create(labels).clone(),
            sent: self.tcp_sent.get_or_create(labels).clone(),
            received: self.tcp_received.get_or_create(labels).clone(),
        }
    }
}

/// The handles of one TCP edge.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
}

/// `status_class` values, by `status / 100 - 1`, then `error`.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];
/// `grpc_status` values: empty (not gRPC), then the codes 0..=16.
const GRPC: [&str; 18] = [
    "", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// The handles of one edge (a route backend in one direction, to or from one peer).
#[derive(Debug)]
pub struct EdgeMetrics {
    labels: EdgeLabels,
    /// By `class * GRPC.len() + grpc index`.
    statuses: [OnceLock<Counter>; CLASSES.len() * GRPC.len()],
    pub latency: Latency,
    pub request_bytes: Counter,
    pub response_bytes: Counter,
}

impl EdgeMetrics {
    fn new(metrics: &Metrics, labels: EdgeLabels) -> Self {
        EdgeMetrics {
            latency: metrics.latency.get_or_create(&labels).clone(),
            request_bytes: metrics.request_bytes.get_or_create(&labels).clone(),
            response_bytes: metrics.response_bytes.get_or_create(&labels).clone(),
            statuses: [const { OnceLock::new() }; CLASSES.len() * GRPC.len()],
            labels,
        }
    }

    /// Counts a response with this HTTP status (`None`: none came back) and gRPC status.
    pub fn count(&self, metrics: &Metrics, status: Option<u16>, grpc: Option<u8>) {
        let class = match status {
            Some(s @ 100..=599) => usize::from(s / 100 - 1),
            _ => CLASSES.len() - 1,
        };
        let g = match grpc {
            Some(c) if usize::from(c) + 1 < GRPC.len() => usize::from(c) + 1,
            // A code outside the spec is reported as UNKNOWN (2).
            Some(_) => 3,
            None => 0,
        };
        self.statuses[class * GRPC.len() + g]
            .get_or_init(|| {
                metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        edge: self.labels.clone(),
                        status_class: CLASSES[class],
                        grpc_status: GRPC[g],
                    })
                    .clone()
            })
            .inc();
    }
}

/// The metric handles of one route backend in one direction, by the peer at the other end.
#[derive(Debug)]
pub struct BackendMetrics {
    pub direction: Direction,
    pub route: String,
    pub backend: String,
    edges: RwLock<HashMap<Arc<Peer>, Arc<EdgeMetrics>>>,
}

impl BackendMetrics {
    /// The edge to (outbound) or from (inbound) `peer`.
    pub fn edge(&self, metrics: &Metrics, peer: &Arc<Peer>) -> Arc<EdgeMetrics> {
        if let Some(e) = self
            .edges
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(peer)
        {
            return e.clone();
        }
        let (src, dst) = self.direction.ends(&metrics.me, peer);
        let labels = EdgeLabels::new(self.direction, src, dst, &self.route, &self.backend);
        self.edges
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.clone())
            .or_insert_with(|| Arc::new(EdgeMetrics::new(metrics, labels)))
            .clone()
    }
}

/// Where a route backend keeps its handles, one per direction.
#[derive(Debug, Default)]
pub struct BackendSlot([OnceLock<Arc<BackendMetrics>>; 2]);

impl BackendSlot {
    pub fn get(&self, direction: Direction, route: &str, backend: &str) -> &Arc<BackendMetrics> {
        self.0[direction as usize].get_or_init(|| {
            Arc::new(BackendMetrics {
                direction,
                route: route.to_string(),
                backend: backend.to_string(),
                edges: RwLock::default(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_edge_class_and_grpc_status_without_rebuilding_labels() {
        let id = mesh_api::SpiffeId::workload("cluster.local", "shop", "client").expect("id");
        let m = Metrics::for_peer(Peer::new("shop", "client", Some(&id)));
        let slot = BackendSlot::default();
        let h = slot.get(
            Direction::outbound,
            "default/reviews",
            "outbound|9080||reviews-v2",
        );
        let v2_id = mesh_api::SpiffeId::workload("cluster.local", "shop", "reviews").expect("id");
        let v2 = Arc::new(Peer::new("shop", "reviews-v2", Some(&v2_id)));
        let e = h.edge(&m, &v2);
        e.count(&m, Some(200), None);
        e.count(&m, Some(204), None);
        e.count(&m, Some(503), None);
        e.count(&m, None, None);
        e.count(&m, Some(200), Some(14));
        e.count(&m, Some(200), Some(99));
        assert!(Arc::ptr_eq(&e, &h.edge(&m, &Arc::new((*v2).clone()))));
        assert!(Arc::ptr_eq(h, slot.get(Direction::outbound, "x", "y")));
        let text = m.encode();
        let edge = r#"direction="outbound",src_namespace="shop",src_workload="client",src_identity="spiffe://cluster.local/ns/shop/sa/client",dst_namespace="shop",dst_workload="reviews-v2",dst_identity="spiffe://cluster.local/ns/shop/sa/reviews",route="default/reviews",backend="outbound|9080||reviews-v2""#;
        for (rest, n) in [
            (r#"status_class="2xx",grpc_status="""#, 2),
            (r#"status_class="5xx",grpc_status="""#, 1),
            (r#"status_class="error",grpc_status="""#, 1),
            (r#"status_class="2xx",grpc_status="14""#, 1),
            (r#"status_class="2xx",grpc_status="2""#, 1),
        ] {
            let series = format!("mesh_proxy_requests_total{{{edge},{rest}}}");
            assert_eq!(
                mesh_api::prom::count(&text, &series),
                n,
                "{series} in\n{text}"
            );
        }
    }

    #[test]
    fn latency_buckets_are_cumulative_with_le_bounds_and_an_exact_sum() {
        let m = Metrics::new();
        let slot = BackendSlot::default();
        let e = slot
            .get(Direction::inbound, "r", "b")
            .edge(&m, &Peer::unknown());
        for us in [500, 501, 1_000, 7_000, 20_000_000] {
            e.latency.observe(Duration::from_micros(us));
        }
        let samples = mesh_api::prom::parse(&m.encode());
        let bucket = |le: &str| {
            samples
                .iter()
                .find(|s| {
                    s.name == "mesh_proxy_request_duration_seconds_bucket" && s.label("le") == le
                })
                .map(|s| s.value)
        };
        // 500 us is in the 0.5 ms bucket (le is inclusive); 501 us is not.
        assert_eq!(bucket("0.0005"), Some(1.0));
        assert_eq!(bucket("0.001"), Some(3.0));
        assert_eq!(bucket("0.005"), Some(3.0));
        assert_eq!(bucket("0.01"), Some(4.0));
        assert_eq!(bucket("10.0"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        let one = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
        assert_eq!(one("mesh_proxy_request_duration_seconds_count"), Some(5.0));
        let sum = one("mesh_proxy_request_duration_seconds_sum").expect("sum");
        assert!((sum - 20.009_001).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn peers_default_to_unknown() {
        let p = Peer::new("", "", None);
        assert_eq!(
            (p.namespace.as_str(), p.workload.as_str()),
            (UNKNOWN, UNKNOWN)
        );
        let id = mesh_api::SpiffeId::workload("cluster.local", "shop", "sa").expect("id");
        let p = Peer::from_identity(&id);
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.workload, UNKNOWN);
        assert_eq!(p.identity, id.to_string());
    }
}
