//! The proxy's running configuration: immutable snapshots converted from xDS resources.
//!
//! ```text
//! xDS client --convert--> Listener / RouteTable / Cluster / endpoints --assemble--> Snapshot
//!                                                                                    |
//! accept --> ListenerConfig.select(dst, protocol) --> FilterChain --> RouteTable.find(req)
//!        --> Route --> Forward.pick() --> Cluster --> EndpointSet.pick() --> connection pool
//! ```
//!
//! The hot path reads one `Arc<Snapshot>` per connection or request from the [`Store`]; a new
//! snapshot replaces it atomically, and nothing in it is rebuilt per request.

pub mod convert;
pub mod route;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio::sync::watch;

use crate::balance::{Balancer, EndpointSet, OutlierConfig};
use crate::metrics::Peer;
use crate::retry::RetryBudget;
pub use route::{Action, Forward, RouteTable};

/// Everything the proxy serves with, at one moment.
#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Bumped by every published snapshot.
    pub generation: u64,
    pub listeners: BTreeMap<String, Arc<ListenerConfig>>,
    pub routes: imbl::HashMap<String, Arc<RouteTable>>,
    pub clusters: imbl::HashMap<String, Arc<Cluster>>,
    /// A gateway's certificates (SDS Secrets), by name.
    pub secrets: imbl::HashMap<String, Arc<ServerCert>>,
}

/// A certificate the proxy serves as its own (a gateway's): never its key in a dump.
#[derive(Debug, Serialize)]
pub struct ServerCert {
    /// SHA-256 of the leaf, as `meshctl` and `openssl x509 -fingerprint` show it.
    pub fingerprint: String,
    /// SHA-256 of the whole chain: a changed intermediate is another certificate to serve.
    pub chain: String,
    #[serde(skip)]
    pub key: Arc<rustls::sign::CertifiedKey>,
}

impl Snapshot {
    pub fn route(&self, name: &str) -> Option<&Arc<RouteTable>> {
        self.routes.get(name)
    }

    pub fn cluster(&self, name: &str) -> Option<&Arc<Cluster>> {
        self.clusters.get(name)
    }

    /// The weights the routes of RouteConfiguration `route` give their backends, by cluster
    /// name, in virtual hosts whose name starts with `vhost`: what a traffic split runs as.
    pub fn backend_weights(&self, route: &str, vhost: &str) -> Vec<(String, u32)> {
        let Some(t) = self.route(route) else {
            return Vec::new();
        };
        t.vhosts()
            .iter()
            .filter(|vh| vh.name.starts_with(vhost))
            .flat_map(|vh| &vh.routes)
            .filter_map(|r| match &r.action {
                Action::Forward(f) => Some(f),
                _ => None,
            })
            .flat_map(|f| f.backends.iter().map(|b| (b.cluster.clone(), b.weight)))
            .collect()
    }
}

/// Where the hot path gets the current snapshot; `None` until the first complete config.
#[derive(Debug)]
pub struct Store {
    current: ArcSwapOption<Snapshot>,
    ready_tx: watch::Sender<bool>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            ready_tx: watch::channel(false).0,
        }
    }
}

impl Store {
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Some(Arc::new(snapshot)));
        self.ready_tx.send_replace(true);
    }

    pub fn is_ready(&self) -> bool {
        *self.ready_tx.borrow()
    }

    /// Changes with every published config.
    pub fn changes(&self) -> watch::Receiver<bool> {
        self.ready_tx.subscribe()
    }

    /// Waits for the first complete config.
    pub async fn ready(&self) -> Arc<Snapshot> {
        let mut rx = self.ready_tx.subscribe();
        loop {
            if let Some(s) = self.load() {
                return s;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A listener's filter chains.
#[derive(Debug, Serialize)]
pub struct ListenerConfig {
    pub name: String,
    /// A gateway's listener: the address it binds (the proxy's other listeners are bound
    /// from its flags).
    pub bind: Option<SocketAddr>,
    pub chains: Vec<FilterChain>,
    pub default_chain: Option<FilterChain>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detected {
    Http1,
    H2c,
    Tls,
    Opaque,
}

/// `filter_chain_match.transport_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Unset: any connection.
    Any,
    /// `raw_buffer`: plaintext only.
    Raw,
    /// `tls`: connections that open with a TLS ClientHello.
    Tls,
}

impl Transport {
    fn takes(self, proto: Detected) -> bool {
        match self {
            Transport::Any => true,
            Transport::Raw => proto != Detected::Tls,
            Transport::Tls => proto == Detected::Tls,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FilterChain {
    pub name: String,
    pub prefixes: Vec<Cidr>,
    pub port: Option<u16>,
    pub transport: Transport,
    /// The chain terminates mesh TLS (a DownstreamTlsContext requiring a client SVID).
    pub terminate_tls: bool,
    /// TLS server names (SNI) the chain takes: names, or `*.suffix` wildcards; none: any.
    pub server_names: Vec<String>,
    /// The chain terminates TLS with certificates of its own (a gateway's HTTPS listener).
    pub edge_tls: Option<Arc<EdgeTls>>,
    /// `http/1.1`, `h2c` (detected), or on a TLS chain the negotiated ALPN (`h2` is HTTP/2):
    /// the chain only takes connections speaking these.
    pub app_protocols: Vec<Detected>,
    pub filter: NetworkFilter,
}

/// How a gateway's chain terminates TLS: the certificates it presents (SDS Secret names, the
/// first whose key the client can verify wins) and the protocols it offers in ALPN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct EdgeTls {
    pub certificates: Vec<String>,
    pub alpn: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkFilter {
    /// HTTP, routed by the RouteConfiguration of this name.
    Http {
        route: String,
        guard: Arc<Guard>,
        /// The chain has the fault injection filter, so routes' faults apply.
        faults: bool,
        /// What is done to a request's path before it is routed.
        paths: PathRules,
        /// `use_remote_address`: the client is the connection's peer; its address is appended
        /// to `x-forwarded-for`, and `x-forwarded-proto` says how it came.
        remote_address: bool,
    },
    /// Opaque TCP to a cluster.
    Tcp { cluster: String, guard: Arc<Guard> },
}

impl NetworkFilter {
    /// What the chain enforces before this filter.
    pub fn guard(&self) -> &Arc<Guard> {
        match self {
            NetworkFilter::Http { guard, .. } | NetworkFilter::Tcp { guard, .. } => guard,
        }
    }
}

/// What the HTTP connection manager does to a request's path before routes see it (Envoy's
/// `normalize_path` with `merge_slashes`, and `path_with_escaped_slashes_action`). The inbound
/// side normalizes and refuses escaped slashes whatever its chain says: policies match the
/// normalized path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PathRules {
    /// Dot segments resolved, unreserved characters decoded, slashes merged.
    pub normalize: bool,
    pub escaped_slashes: EscapedSlashes,
}

/// `%2F` and `%5C` in a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    /// Left as they are.
    #[default]
    Keep,
    /// Answered 400.
    Reject,
    /// Decoded, and the client redirected (307) to the decoded path.
    UnescapeAndRedirect,
    /// Decoded, and the request forwarded.
    UnescapeAndForward,
}

/// What a chain enforces before its terminal filter: RBAC filters in order (network RBAC
/// first, then the HTTP ones) and a local rate limit (HTTP only).
#[derive(Debug, Default, Serialize)]
pub struct Guard {
    pub rbac: Vec<crate::policy::Rbac>,
    pub rate_limit: Option<crate::policy::RateLimit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The outcome of matching a connection's destination against a listener's chains.
#[derive(Debug)]
pub enum ChainChoice<'a> {
    /// One chain, whatever the client speaks.
    Chain(&'a FilterChain),
    /// Several chains differ by application protocol: detect it, then call [`pick`].
    ///
    /// [`pick`]: ListenerConfig::pick
    Detect(Vec<&'a FilterChain>),
    None,
}

impl ListenerConfig {
    /// Envoy's filter chain match order, for the criteria we emit: destination port (exact
    /// beats unset), then the longest destination prefix, then application protocol.
    pub fn select(&self, dst: SocketAddr) -> ChainChoice<'_> {
        let with_port: Vec<&FilterChain> = self
            .chains
            .iter()
            .filter(|c| c.port == Some(dst.port()))
            .collect();
        let by_port = if with_port.is_empty() {
            self.chains.iter().filter(|c| c.port.is_none()).collect()
        } else {
            with_port
        };
        // Longest prefix; a chain without prefixes matches everything, below any prefix.
        let score = |c: &FilterChain| -> Option<i16> {
            if c.prefixes.is_empty() {
                return Some(-1);
            }
            c.prefixes
                .iter()
                .filter(|p| p.contains(dst.ip()))
                .map(|p| i16::from(p.len))
                .max()
        };
        let best = by_port.iter().filter_map(|c| score(c)).max();
        let Some(best) = best else {
            return match &self.default_chain {
                Some(c) => ChainChoice::Chain(c),
                None => ChainChoice::None,
            };
        };
        let chosen: Vec<&FilterChain> = by_port
            .into_iter()
            .filter(|c| score(c) == Some(best))
            .collect();
        match chosen.as_slice() {
            [] => ChainChoice::None,
            [only]
                if only.app_protocols.is_empty()
                    && only.transport == Transport::Any
                    && !only.terminate_tls =>
            {
                ChainChoice::Chain(only)
            }
            _ => ChainChoice::Detect(chosen),
        }
    }

    /// After detection: among the chains taking this transport, the one listing the detected
    /// protocol, else one listing none; else the default chain if it takes the transport. A
    /// TLS connection goes to a chain matching `tls` before one matching any transport; when
    /// that chain terminates TLS, [`pick_alpn`] then chooses by the negotiated ALPN.
    ///
    /// [`pick_alpn`]: ListenerConfig::pick_alpn
    pub fn pick<'a>(
        &'a self,
        chains: &[&'a FilterChain],
        proto: Detected,
    ) -> Option<&'a FilterChain> {
        let takes = |c: &&&FilterChain| c.transport.takes(proto);
        if proto == Detected::Tls
            && let Some(c) = chains
                .iter()
                .filter(takes)
                .find(|c| c.transport == Transport::Tls)
        {
            return Some(c);
        }
        chains
            .iter()
            .filter(takes)
            .find(|c| c.app_protocols.contains(&proto))
            .or_else(|| {
                chains
                    .iter()
                    .filter(takes)
                    .find(|c| c.app_protocols.is_empty())
            })
            .copied()
            .or(self
                .default_chain
                .as_ref()
                .filter(|c| c.transport.takes(proto)))
    }

    /// Whether the listener terminates a gateway's TLS (chains choose by server name).
    pub fn edge_tls(&self) -> bool {
        self.chains
            .iter()
            .chain(&self.default_chain)
            .any(|c| c.edge_tls.is_some())
    }

    /// A gateway's chain for a TLS server name, as Envoy matches `server_names`: a chain
    /// naming it, else the one whose `*.suffix` wildcard takes it with the longest suffix,
    /// else one naming none, else the default chain.
    pub fn by_server_name(&self, sni: Option<&str>) -> Option<&FilterChain> {
        let tls = || self.chains.iter().filter(|c| c.edge_tls.is_some());
        let named = sni.and_then(|host| {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            tls().find(|c| c.server_names.contains(&host)).or_else(|| {
                tls()
                    .filter_map(|c| {
                        c.server_names
                            .iter()
                            .filter_map(|n| n.strip_prefix('*'))
                            .filter(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
                            .map(str::len)
                            .max()
                            .map(|len| (len, c))
                    })
                    .max_by_key(|(len, _)| *len)
                    .map(|(_, c)| c)
            })
        });
        named
            .or_else(|| tls().find(|c| c.server_names.is_empty()))
            .or_else(|| self.default_chain.as_ref().filter(|c| c.edge_tls.is_some()))
    }

    /// After mesh TLS was terminated: the `tls` chain listing the negotiated protocol
    /// (`None`: no ALPN, opaque TCP), else one listing none.
    pub fn pick_alpn<'a>(
        &'a self,
        chains: &[&'a FilterChain],
        alpn: Option<Detected>,
    ) -> Option<&'a FilterChain> {
        let tls = || chains.iter().filter(|c| c.transport == Transport::Tls);
        alpn.and_then(|p| tls().find(|c| c.app_protocols.contains(&p)))
            .or_else(|| tls().find(|c| c.app_protocols.is_empty()))
            .copied()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
    /// Whatever the client spoke (`use_downstream_protocol_config`).
    Downstream,
    /// The cluster names no protocol: the client's from a sidecar, HTTP/1.1 from a gateway
    /// (as Envoy's default).
    Unset,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterKind {
    /// Endpoints from EDS, under this name.
    Eds {
        service_name: String,
    },
    Static,
    /// Forward to the connection's original destination.
    OriginalDst,
}

/// An upstream cluster with its endpoints and balancer.
#[derive(Debug, Serialize)]
pub struct Cluster {
    pub name: String,
    pub kind: ClusterKind,
    pub protocol: UpstreamProtocol,
    #[serde(with = "ms")]
    pub connect_timeout: Duration,
    pub outlier: OutlierConfig,
    /// Circuit breaker: requests in flight at most.
    pub max_requests: Option<u32>,
    pub limits: ClusterLimits,
    pub endpoints: Arc<EndpointSet>,
    #[serde(skip)]
    pub budget: Arc<RetryBudget>,
    #[serde(skip)]
    pub breaker: Arc<crate::breaker::Breaker>,
    /// ORIGINAL_DST clusters: one endpoint per destination seen, so connections are pooled.
    #[serde(skip)]
    pub dynamic: Mutex<HashMap<SocketAddr, Arc<EndpointSet>>>,
}

/// Destinations an ORIGINAL_DST cluster remembers before it starts over.
const MAX_DYNAMIC: usize = 1024;

impl Cluster {
    /// The endpoint set for one original destination.
    pub fn original_dst(&self, dst: SocketAddr) -> Arc<EndpointSet> {
        let def = [EndpointDef::plain(dst)];
        let Ok(mut map) = self.dynamic.lock() else {
            return Arc::new(
                self.endpoints
                    .update(&def, self.outlier.clone(), Balancer::PeakEwma),
            );
        };
        if map.len() >= MAX_DYNAMIC && !map.contains_key(&dst) {
            map.clear();
        }
        map.entry(dst)
            .or_insert_with(|| {
                Arc::new(
                    self.endpoints
                        .update(&def, self.outlier.clone(), Balancer::PeakEwma),
                )
            })
            .clone()
    }
}

/// A cluster's definition from CDS, before its endpoints are joined in.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterDef {
    pub name: String,
    pub kind: ClusterKind,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub outlier: OutlierConfig,
    pub balancer: Balancer,
    pub max_requests: Option<u32>,
    pub limits: ClusterLimits,
    /// STATIC clusters carry their endpoints inline.
    pub static_endpoints: Vec<EndpointDef>,
}

/// A cluster's circuit breakers beyond `max_requests` (the first threshold of Envoy's
/// `circuit_breakers`), and its connections' request cap.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ClusterLimits {
    /// Connections to all endpoints together.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Retries in flight (without a retry budget).
    pub max_retries: Option<u32>,
    pub retry_budget: Option<EnvoyRetryBudget>,
    /// Requests per upstream connection before it is closed.
    pub max_requests_per_connection: Option<u32>,
}

/// Envoy's retry budget: retries in flight at most `percent` of the requests in flight (with
/// `interval`, of the requests sent over it), and always `min_concurrency`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EnvoyRetryBudget {
    pub percent: f64,
    pub min_concurrency: u32,
    #[serde(with = "route::opt_ms")]
    pub interval: Option<Duration>,
}

/// One endpoint from EDS or a static load assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointDef {
    pub addr: SocketAddr,
    /// The endpoint runs a mesh proxy (endpoint metadata `mesh.dev` / `proxy: true`): talk
    /// HTTP/2 to it and multiplex.
    pub mesh_proxy: bool,
    /// The endpoint's mesh identity (endpoint metadata `mesh.dev` / `identity`): connections
    /// to it are mesh TLS, and its SVID must be this one.
    pub identity: Option<mesh_api::SpiffeId>,
    /// Who runs there (endpoint metadata `mesh.dev` / `namespace`, `workload`), for metrics.
    pub peer: Arc<Peer>,
    /// The `priority` of its locality: picks go to the lowest priority that can serve.
    pub priority: u32,
}

impl EndpointDef {
    /// An endpoint the control plane says nothing more about.
    pub fn plain(addr: SocketAddr) -> Self {
        EndpointDef {
            addr,
            mesh_proxy: false,
            identity: None,
            peer: Peer::unknown(),
            priority: 0,
        }
    }
}

pub(crate) mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(
        name: &str,
        prefix: Option<(&str, u8)>,
        port: Option<u16>,
        app: &[Detected],
    ) -> FilterChain {
        FilterChain {
            name: name.into(),
            prefixes: prefix
                .map(|(a, len)| Cidr {
                    addr: a.parse().expect("ip"),
                    len,
                })
                .into_iter()
                .collect(),
            port,
            transport: Transport::Any,
            terminate_tls: false,
            server_names: Vec::new(),
            edge_tls: None,
            app_protocols: app.to_vec(),
            filter: NetworkFilter::Tcp {
                cluster: name.into(),
                guard: Arc::default(),
            },
        }
    }

    fn name(c: ChainChoice<'_>) -> String {
        match c {
            ChainChoice::Chain(c) => c.name.clone(),
            ChainChoice::Detect(cs) => {
                format!(
                    "detect:{}",
                    cs.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
            ChainChoice::None => "none".into(),
        }
    }

    #[test]
    fn chain_selection() {
        let l = ListenerConfig {
            name: "l".into(),
            bind: None,
            chains: vec![
                chain(
                    "vip-80-http",
                    Some(("10.0.0.1", 32)),
                    Some(80),
                    &[Detected::Http1, Detected::H2c],
                ),
                chain("vip-80-tcp", Some(("10.0.0.1", 32)), Some(80), &[]),
                chain("vip-9080", Some(("10.0.0.1", 32)), Some(9080), &[]),
                chain("net-9080", Some(("10.0.0.0", 8)), Some(9080), &[]),
                chain("any-5432", None, Some(5432), &[]),
                chain("net-any", Some(("10.1.0.0", 16)), None, &[]),
            ],
            default_chain: Some(chain("passthrough", None, None, &[])),
        };
        let cases = [
            ("10.0.0.1:9080", "vip-9080"),
            ("10.0.0.2:9080", "net-9080"),
            ("10.0.0.1:80", "detect:vip-80-http,vip-80-tcp"),
            ("10.0.0.2:80", "passthrough"),
            ("192.168.1.1:5432", "any-5432"),
            ("10.1.2.3:1234", "net-any"),
            ("[::1]:9080", "passthrough"),
        ];
        for (dst, want) in cases {
            assert_eq!(name(l.select(dst.parse().expect("addr"))), want, "{dst}");
        }
        let ChainChoice::Detect(cs) = l.select("10.0.0.1:80".parse().expect("addr")) else {
            panic!("expected detection");
        };
        assert_eq!(
            l.pick(&cs, Detected::H2c).map(|c| c.name.as_str()),
            Some("vip-80-http")
        );
        assert_eq!(
            l.pick(&cs, Detected::Opaque).map(|c| c.name.as_str()),
            Some("vip-80-tcp")
        );
    }

    #[test]
    fn mesh_tls_and_plaintext_chains_are_told_apart() {
        let tls = |name: &str, app: &[Detected]| FilterChain {
            transport: Transport::Tls,
            terminate_tls: true,
            ..chain(name, None, Some(8080), app)
        };
        let raw = |name: &str, app: &[Detected]| FilterChain {
            transport: Transport::Raw,
            ..chain(name, None, Some(8080), app)
        };
        let permissive = ListenerConfig {
            name: "l".into(),
            bind: None,
            chains: vec![
                tls("http/mtls", &[Detected::Http1, Detected::H2c]),
                tls("tcp/mtls", &[]),
                raw("http", &[Detected::Http1, Detected::H2c]),
                raw("tcp", &[]),
            ],
            default_chain: None,
        };
        let dst = "10.0.0.1:8080".parse().expect("addr");
        let ChainChoice::Detect(cs) = permissive.select(dst) else {
            panic!("expected detection");
        };
        let pick =
            |l: &ListenerConfig, cs: &[&FilterChain], p| l.pick(cs, p).map(|c| c.name.clone());
        assert_eq!(
            pick(&permissive, &cs, Detected::Tls).as_deref(),
            Some("http/mtls")
        );
        assert_eq!(
            pick(&permissive, &cs, Detected::Http1).as_deref(),
            Some("http")
        );
        assert_eq!(
            pick(&permissive, &cs, Detected::Opaque).as_deref(),
            Some("tcp")
        );
        // After the handshake, by ALPN: none means opaque TCP.
        let alpn = |a| permissive.pick_alpn(&cs, a).map(|c| c.name.clone());
        assert_eq!(alpn(Some(Detected::H2c)).as_deref(), Some("http/mtls"));
        assert_eq!(alpn(None).as_deref(), Some("tcp/mtls"));

        // STRICT: plaintext finds no chain, even a lone TLS chain is detected first.
        let strict = ListenerConfig {
            name: "l".into(),
            bind: None,
            chains: vec![tls("http/mtls", &[])],
            default_chain: None,
        };
        let ChainChoice::Detect(cs) = strict.select(dst) else {
            panic!("a TLS chain needs detection");
        };
        assert_eq!(pick(&strict, &cs, Detected::Http1), None);
        assert_eq!(
            pick(&strict, &cs, Detected::Tls).as_deref(),
            Some("http/mtls")
        );
    }

    #[test]
    fn cidr() {
        let c = Cidr {
            addr: "10.96.0.0".parse().expect("ip"),
            len: 12,
        };
        assert!(c.contains("10.96.5.1".parse().expect("ip")));
        assert!(!c.contains("10.112.0.1".parse().expect("ip")));
        assert!(
            Cidr {
                addr: "0.0.0.0".parse().expect("ip"),
                len: 0
            }
            .contains("1.2.3.4".parse().expect("ip"))
        );
        assert!(
            Cidr {
                addr: "fd00::".parse().expect("ip"),
                len: 8
            }
            .contains("fd12::1".parse().expect("ip"))
        );
    }
}
