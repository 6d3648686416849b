//! Translation: from the index's [`Model`] and a proxy's identity to Envoy v3 resources.
//!
//! Resources come in three layers so that work is shared between proxies:
//! - global (every proxy): per Service port a Cluster (EDS), its ClusterLoadAssignment, a
//!   RouteConfiguration `<fqdn>:<port>` and, served only when named, an API listener of the same
//!   name for proxyless gRPC. Rebuilt only for Services whose model changed.
//! - per namespace and listener settings: for proxies without interception, the explicit
//!   outbound HTTP listener and its RouteConfiguration (one virtual host per Service port, short
//!   names for the proxy's own namespace); for transparent proxies, the outbound listener with a
//!   filter chain per Service VIP:port. Both are large at scale, so each Service's virtual hosts
//!   and filter chains are encoded once with its global resources and the layer is assembled by
//!   concatenating them (a repeated protobuf field may be written piece by piece).
//! - per pod: the transparent inbound listener with a filter chain per port the pod serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, CidrRange, ConfigSource, HeaderValue,
    HeaderValueOption, Http2ProtocolOptions, Locality, Metadata, PathConfigSource,
    RuntimeFractionalPercent, SocketAddress, TransportSocket, WatchedDirectory, address,
    config_source, header_value_option, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, Route,
    RouteAction as PbRouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
    header_matcher, query_parameter_matcher, redirect_action, route, route_action, route_match,
    weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, TlsParameters, common_tls_context,
    tls_parameters,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value};
use mesh_api::consts::{ports, xds as names};
use prost::Name;
use serde::Serialize;

use super::canonical;
use super::pb::{any, network_filter, pb_duration, u32v};
use super::resources::{Changes, ProxyView, Resource, ResourceType, Resources};
use crate::index::routes::{HeaderModifier, PathMatch, PathModifier, StrMatch};
use crate::index::traffic::{Balancer, HashKey};
use crate::index::{
    Model, MtlsMode, PodModel, Protocol, RouteAction, RouteEntry, ServiceModel, SvcKey,
};

/// Where a proxy wants its listeners; read from its node metadata
/// (`mesh_api::consts::node_metadata`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ListenerSettings {
    /// iptables sends traffic to this proxy: give it the transparent listeners.
    pub transparent: bool,
    pub outbound_http_addr: SocketAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// The proxy holds a mesh identity: its inbound side terminates mesh TLS.
    pub mtls: bool,
    /// Address of the transparent inbound listener.
    pub inbound_addr: IpAddr,
    /// Where Envoy reads its mesh TLS secrets from files; `None`: over ADS.
    pub sds_dir: Option<String>,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        Self {
            transparent: false,
            outbound_http_addr: SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                ports::PROXY_OUTBOUND_HTTP,
            ),
            outbound_port: ports::PROXY_OUTBOUND,
            inbound_port: ports::PROXY_INBOUND,
            mtls: false,
            inbound_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            sds_dir: None,
        }
    }
}

/// Who is asking: from the xDS `Node`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ProxyId {
    pub namespace: String,
    pub name: String,
    pub settings: ListenerSettings,
}

/// Resources built for one Service, and its encoded pieces of the per-namespace layers.
#[derive(Debug, Default)]
struct ServiceResources {
    global: Vec<(ResourceType, Arc<Resource>)>,
    api_listeners: Vec<Arc<Resource>>,
    /// What it owns of the addresses it claims; only the owner of an address gets its filter
    /// chains (and, of a VIP, the `VIP:port` host names).
    owned: Owned,
    /// `virtualOutbound` filter chains (encoded `Listener.filter_chains` entries), with the
    /// producer routes.
    chains: Vec<u8>,
    /// `outbound_http` virtual hosts (encoded `RouteConfiguration.virtual_hosts` entries), with
    /// producer routes: for proxies in other namespaces, and in the Service's own (short names).
    vhosts_remote: Vec<u8>,
    vhosts_local: Vec<u8>,
    chains_hash: u64,
    vhosts_remote_hash: u64,
    vhosts_local_hash: u64,
}

impl ServiceResources {
    /// Every shared resource of the Service: `(type, resource, is an API listener)`.
    fn entries(&self) -> impl Iterator<Item = (ResourceType, &Arc<Resource>, bool)> {
        self.global.iter().map(|(ty, r)| (*ty, r, false)).chain(
            self.api_listeners
                .iter()
                .map(|r| (ResourceType::Listener, r, true)),
        )
    }
}

type ServiceCache = BTreeMap<SvcKey, (Arc<ServiceModel>, Arc<ServiceResources>)>;

/// The addresses a Service claims on the transparent outbound listener: its VIP with each of
/// its ports or, when it is headless, each of its endpoints' (traffic to a pod's own address,
/// `pod-0.name.ns.svc`). Two Services may claim one (a reused VIP, a pod behind two headless
/// Services, a selectorless Service listing another's VIP): a VIP's claim comes first, then
/// name order, as one address can have only one filter chain. Each claim is `(address, rank)`,
/// rank 0 for a VIP's and 1 for an endpoint's.
fn claims(svc: &ServiceModel) -> BTreeSet<(SocketAddr, u8)> {
    let rank = u8::from(svc.cluster_ip.is_none());
    let addrs: BTreeSet<SocketAddr> = match svc.cluster_ip {
        Some(ip) => svc
            .ports
            .iter()
            .map(|p| SocketAddr::new(ip, p.port))
            .collect(),
        None => svc
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|e| e.addr))
            .collect(),
    };
    addrs.into_iter().map(|a| (a, rank)).collect()
}

/// The claimed addresses a Service owns.
type Owned = BTreeSet<SocketAddr>;

/// What a per-namespace layer's bytes depend on: the namespace, and either the transparent
/// outbound port or the explicit listener's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum LayerKey {
    Transparent(String, u16),
    Explicit(String, SocketAddr),
}

impl LayerKey {
    fn of(namespace: &str, settings: &ListenerSettings) -> Self {
        if settings.transparent {
            LayerKey::Transparent(namespace.to_string(), settings.outbound_port)
        } else {
            LayerKey::Explicit(namespace.to_string(), settings.outbound_http_addr)
        }
    }
}

#[derive(Debug)]
struct NamespaceLayer {
    /// The epoch of its pieces it was assembled at.
    epoch: u64,
    resources: Arc<Resources>,
}

fn hash_bytes(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// Builds and caches the layers of [`ProxyView`]s for one model at a time.
#[derive(Debug)]
pub struct Translator {
    model: Arc<Model>,
    services: ServiceCache,
    /// The shared layer, updated in place by `update`, which then snapshots it (an O(1) clone)
    /// into `shared` and `shared_api` for every view of that model.
    global: Resources,
    api: Resources,
    shared: Arc<Resources>,
    shared_api: Arc<Resources>,
    changes: Arc<Changes>,
    /// Services by the address they claim, in name order: the first one owns it.
    claimants: HashMap<SocketAddr, BTreeSet<(u8, SvcKey)>>,
    /// Bumped whenever a piece of the transparent (`chains`) or Host-routed (`vhosts`)
    /// per-namespace layers changes; a layer built at the current epoch is still good.
    chains_epoch: u64,
    vhosts_epoch: u64,
    /// Per-namespace layers, kept while their epoch holds, keyed by what their bytes depend on.
    namespaces: HashMap<LayerKey, NamespaceLayer>,
    pods: HashMap<(String, String, ListenerSettings), Arc<Resources>>,
}

impl Translator {
    pub fn new(model: Arc<Model>) -> Self {
        let mut global = Resources::default();
        for (ty, r) in fixed_clusters() {
            global.insert(ty, r);
        }
        let mut t = Self {
            model: Arc::new(Model::default()),
            services: BTreeMap::new(),
            global,
            api: Resources::default(),
            shared: Arc::default(),
            shared_api: Arc::default(),
            changes: Arc::default(),
            claimants: HashMap::new(),
            chains_epoch: 0,
            vhosts_epoch: 0,
            namespaces: HashMap::new(),
            pods: HashMap::new(),
        };
        t.update(model);
        t
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Moves to a new model: rebuilds the global layer (reusing the resources of every Service
    /// whose model is the same `Arc`) and drops the per-namespace and per-pod layers, which are
    /// rebuilt when a proxy next asks.
    pub fn update(&mut self, model: Arc<Model>) {
        if Arc::ptr_eq(&model, &self.model) {
            return;
        }
        let old = std::mem::replace(&mut self.model, model.clone());
        // Services that changed, from the structural diff of the two persistent maps (shared
        // subtrees are skipped, so this is proportional to the change).
        let mut touched = BTreeSet::new();
        for item in old.services.diff(&model.services) {
            let key = match item {
                imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => k,
                imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
            };
            touched.insert(key.clone());
        }
        // Address ownership: the first claim of an address (a VIP's, then in name order) owns it.
        let mut owners_touched = Vec::new();
        for key in &touched {
            let of = |m: &Model| m.services.get(key).map(|s| claims(s)).unwrap_or_default();
            let (before, after) = (of(&old), of(&model));
            let gone = before.difference(&after).map(|c| (*c, false));
            let came = after.difference(&before).map(|c| (*c, true));
            for ((addr, rank), add) in gone.chain(came) {
                let set = self.claimants.entry(addr).or_default();
                let owner = set.first().map(|(_, k)| k.clone());
                if add {
                    set.insert((rank, key.clone()));
                } else {
                    set.remove(&(rank, key.clone()));
                }
                let new_owner = set.first().map(|(_, k)| k.clone());
                if owner != new_owner {
                    owners_touched.extend(owner.into_iter().chain(new_owner));
                }
                if set.is_empty() {
                    self.claimants.remove(&addr);
                }
            }
        }
        touched.extend(owners_touched);

        let mut changed: BTreeMap<ResourceType, Vec<Arc<str>>> = BTreeMap::new();
        for key in touched {
            let prev = self.services.remove(&key);
            let next = model.services.get(&key).map(|svc| {
                let owned: Owned = claims(svc)
                    .into_iter()
                    .map(|(a, _)| a)
                    .filter(|a| {
                        self.claimants
                            .get(a)
                            .and_then(|s| s.first())
                            .map(|(_, k)| k)
                            == Some(&key)
                    })
                    .collect();
                (svc.clone(), Arc::new(service_resources(&model, svc, owned)))
            });
            let prev_res = prev.as_ref().map(|(_, r)| r.clone());
            let next_res = next.as_ref().map(|(_, r)| r.clone());
            // Pieces of the per-namespace layers.
            let consumer = |s: &Option<(Arc<ServiceModel>, Arc<ServiceResources>)>| {
                s.as_ref()
                    .is_some_and(|(m, _)| m.ports.iter().any(|p| !p.consumer_routes.is_empty()))
            };
            let any_consumer = consumer(&prev) || consumer(&next);
            let hashes = |r: &Option<Arc<ServiceResources>>| {
                r.as_ref()
                    .map(|r| (r.chains_hash, r.vhosts_remote_hash, r.vhosts_local_hash))
            };
            let (hp, hn) = (hashes(&prev_res), hashes(&next_res));
            if any_consumer || hp.map(|h| h.0) != hn.map(|h| h.0) {
                self.chains_epoch += 1;
            }
            if any_consumer || hp.map(|h| (h.1, h.2)) != hn.map(|h| (h.1, h.2)) {
                self.vhosts_epoch += 1;
            }
            // Shared resources: replace those whose bytes changed, drop those that went.
            let mut next_names = std::collections::HashSet::new();
            if let Some(res) = &next_res {
                for (ty, r, is_api) in res.entries() {
                    next_names.insert((ty, is_api, r.name.clone()));
                    let layer = if is_api {
                        &mut self.api
                    } else {
                        &mut self.global
                    };
                    if layer
                        .get(ty, &r.name)
                        .is_some_and(|o| o.version == r.version)
                    {
                        continue;
                    }
                    layer.insert(ty, r.clone());
                    changed.entry(ty).or_default().push(r.name.clone());
                }
            }
            if let Some(res) = &prev_res {
                for (ty, r, is_api) in res.entries() {
                    if !next_names.contains(&(ty, is_api, r.name.clone())) {
                        let layer = if is_api {
                            &mut self.api
                        } else {
                            &mut self.global
                        };
                        layer.remove(ty, &r.name);
                        changed.entry(ty).or_default().push(r.name.clone());
                    }
                }
            }
            if let Some(next) = next {
                self.services.insert(key, next);
            }
        }
        self.changes = Arc::new(Changes {
            from: old.revision,
            by_type: changed,
        });
        self.shared = Arc::new(self.global.clone());
        self.shared_api = Arc::new(self.api.clone());
        // Layers whose pieces changed are rebuilt on demand; drop the stale ones now.
        let (chains, vhosts) = (self.chains_epoch, self.vhosts_epoch);
        self.namespaces.retain(|k, l| {
            l.epoch
                == if matches!(k, LayerKey::Transparent(..)) {
                    chains
                } else {
                    vhosts
                }
        });
        self.pods.clear();
    }

    /// The per-namespace layer: reused while no piece it is assembled from changed.
    fn namespace_layer(
        &mut self,
        model: &Model,
        namespace: &str,
        settings: &ListenerSettings,
    ) -> Arc<Resources> {
        let key = LayerKey::of(namespace, settings);
        let epoch = if settings.transparent {
            self.chains_epoch
        } else {
            self.vhosts_epoch
        };
        if let Some(layer) = self.namespaces.get(&key)
            && layer.epoch == epoch
        {
            return layer.resources.clone();
        }
        let resources = Arc::new(namespace_resources(
            model,
            &self.services,
            namespace,
            settings,
        ));
        self.namespaces.insert(
            key,
            NamespaceLayer {
                epoch,
                resources: resources.clone(),
            },
        );
        resources
    }

    /// Everything `proxy` may be served, for the current model.
    pub fn view(&mut self, proxy: &ProxyId) -> ProxyView {
        let model = self.model.clone();
        let ns = self.namespace_layer(&model, &proxy.namespace, &proxy.settings);
        let mut layers = vec![ns];
        if proxy.settings.transparent {
            let pod = self
                .pods
                .entry((
                    proxy.namespace.clone(),
                    proxy.name.clone(),
                    proxy.settings.clone(),
                ))
                .or_insert_with(|| {
                    let pod = model
                        .pods
                        .get(&(proxy.namespace.clone(), proxy.name.clone()));
                    Arc::new(pod_resources(
                        &model,
                        &proxy.namespace,
                        pod.map(|p| p.as_ref()),
                        &proxy.settings,
                    ))
                })
                .clone();
            layers.insert(0, pod);
        }
        layers.push(self.shared.clone());
        ProxyView {
            revision: model.revision,
            layers,
            named_only: self.shared_api.clone(),
            changes: self.changes.clone(),
        }
    }
}

// ---- small builders ---------------------------------------------------------------------------

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

fn socket_address(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    }
}

fn hcm(stat_prefix: &str, route_config: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config.to_string(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    }
}

fn hcm_filter(stat_prefix: &str, route_config: &str) -> Filter {
    network_filter(
        "envoy.filters.network.http_connection_manager",
        &hcm(stat_prefix, route_config),
    )
}

/// An inbound HCM: policy filters before the router, and the path normalized as policies
/// expect it (dot segments, merged slashes, encoded slashes refused).
fn inbound_hcm_filter(stat_prefix: &str, route_config: &str, policy: Vec<HttpFilter>) -> Filter {
    let mut h = hcm(stat_prefix, route_config);
    h.normalize_path = Some(BoolValue { value: true });
    h.merge_slashes = true;
    h.path_with_escaped_slashes_action =
        http_connection_manager::PathWithEscapedSlashesAction::RejectRequest as i32;
    h.http_filters.splice(0..0, policy);
    network_filter("envoy.filters.network.http_connection_manager", &h)
}

fn tcp_filter(stat_prefix: &str, cluster: &str) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        },
    )
}

fn listener_filter<M: prost::Message + Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

/// How long a connection to an endpoint may take, unless a TrafficPolicy says (Linkerd's
/// outbound default: in a cluster a pod answers in milliseconds, and a dead one should be
/// noticed and ejected fast).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn eds_cluster(name: &str, protocol: Protocol) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(CONNECT_TIMEOUT)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        ..Default::default()
    };
    if protocol.is_http2() {
        set_upstream_protocol(&mut c, true);
    }
    c
}

/// Pins a cluster's upstream HTTP version (else Envoy uses HTTP/1.1, mesh-proxy the client's).
fn set_upstream_protocol(c: &mut Cluster, http2: bool) {
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let config = if http2 {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else {
        ProtocolConfig::HttpProtocolOptions(Default::default())
    };
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(config),
                },
            ),
        ),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        any(&opts),
    );
}

/// Endpoint metadata for an endpoint backed by a known pod: its namespace and workload (for
/// metrics); behind a mesh-proxy, also its mesh identity (the SVID that mesh TLS to it must
/// find), and whether it may be spoken to over HTTP/2 (`proxy`).
fn peer_metadata(pod: &PodModel, identity: Option<&mesh_api::SpiffeId>, h2: bool) -> Metadata {
    let text = |s: &str| Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    };
    let mut fields = BTreeMap::from([
        ("namespace".to_string(), text(&pod.namespace)),
        ("workload".to_string(), text(&pod.workload)),
    ]);
    if let Some(identity) = identity {
        fields.insert("identity".to_string(), text(identity.as_str()));
        if h2 {
            fields.insert(
                "proxy".to_string(),
                Value {
                    kind: Some(value::Kind::BoolValue(true)),
                },
            );
        }
    }
    Metadata {
        filter_metadata: [(
            names::ENDPOINT_METADATA.to_string(),
            Struct {
                fields: fields.into_iter().collect(),
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// `meta(endpoint)`: the endpoint's metadata, for endpoints behind a mesh-proxy. Ready
/// endpoints are priority 0; terminating ones that still serve come after them at priority 1
/// (or 0 when none is ready), so clients send them nothing while a ready endpoint is usable, as
/// Kubernetes intends, and in-flight requests finish.
fn load_assignment(
    cluster: &str,
    endpoints: &[crate::index::Endpoint],
    meta: impl Fn(&crate::index::Endpoint) -> Option<Metadata>,
) -> ClusterLoadAssignment {
    let group = |terminating: bool, priority: u32| LocalityLbEndpoints {
        locality: Some(Locality::default()),
        // gRPC clients drop localities without a weight.
        load_balancing_weight: u32v(1),
        lb_endpoints: endpoints
            .iter()
            .filter(|e| e.terminating == terminating)
            .map(|e| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                    address: Some(socket_address(e.addr.ip(), e.addr.port())),
                    ..Default::default()
                })),
                load_balancing_weight: u32v(1),
                metadata: meta(e),
                ..Default::default()
            })
            .collect(),
        priority,
        ..Default::default()
    };
    let ready = group(false, 0);
    let mut groups = vec![];
    if endpoints.iter().any(|e| e.terminating) {
        let next = u32::from(!ready.lb_endpoints.is_empty());
        if next == 1 {
            groups.push(ready);
        }
        groups.push(group(true, next));
    } else {
        groups.push(ready);
    }
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: groups,
        ..Default::default()
    }
}

/// Whether a pod runs a mesh-proxy (the injector labels it).
fn is_proxied(p: &PodModel) -> bool {
    p.labels
        .get(mesh_api::consts::labels::PROXY)
        .is_some_and(|v| v == "true")
}

fn static_cluster(name: &str, addr: Option<SocketAddr>) -> Cluster {
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(load_assignment(
            name,
            &addr
                .map(|addr| crate::index::Endpoint {
                    addr,
                    pod: None,
                    peer: None,
                    terminating: false,
                    hostname: None,
                })
                .into_iter()
                .collect::<Vec<_>>(),
            |_| None,
        )),
        ..Default::default()
    }
}

/// The passthrough and blackhole clusters every proxy gets.
fn fixed_clusters() -> Vec<(ResourceType, Arc<Resource>)> {
    let passthrough = Cluster {
        name: names::PASSTHROUGH_CLUSTER.into(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    vec![
        (
            ResourceType::Cluster,
            Resource::new(names::PASSTHROUGH_CLUSTER, &passthrough),
        ),
        (
            ResourceType::Cluster,
            Resource::new(
                names::BLACKHOLE_CLUSTER,
                &static_cluster(names::BLACKHOLE_CLUSTER, None),
            ),
        ),
    ]
}

// ---- routes -----------------------------------------------------------------------------------

fn string_matcher(m: &StrMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match m {
            StrMatch::Exact(v) => string_matcher::MatchPattern::Exact(v.clone()),
            StrMatch::Regex(r) => string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            }),
        }),
        ignore_case: false,
    }
}

fn header_matcher(name: &str, m: &StrMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(m),
        )),
        ..Default::default()
    }
}

/// Envoy route matches for one Gateway API match. A Gateway API prefix matches whole path
/// segments, so `/api` becomes an exact `/api` and a prefix `/api/`, in that order; both forms
/// are understood by Envoy and by gRPC clients alike.
fn route_matches(entry: &RouteEntry) -> Vec<RouteMatch> {
    let m = &entry.matches;
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, v)| header_matcher(name, v))
        .collect();
    if let Some(method) = &m.method {
        headers.push(header_matcher(":method", &StrMatch::Exact(method.clone())));
    }
    let query_parameters: Vec<QueryParameterMatcher> = m
        .query
        .iter()
        .map(|(name, v)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(
                    v,
                )),
            ),
        })
        .collect();
    let paths = match &m.path {
        PathMatch::Exact(p) => vec![route_match::PathSpecifier::Path(p.clone())],
        PathMatch::Prefix(p) if p == "/" => vec![route_match::PathSpecifier::Prefix("/".into())],
        PathMatch::Prefix(p) => vec![
            route_match::PathSpecifier::Path(p.clone()),
            route_match::PathSpecifier::Prefix(format!("{p}/")),
        ],
        PathMatch::Regex(r) => vec![route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })],
    };
    paths
        .into_iter()
        .map(|path| RouteMatch {
            path_specifier: Some(path),
            headers: headers.clone(),
            query_parameters: query_parameters.clone(),
            ..Default::default()
        })
        .collect()
}

fn header_options(m: &HeaderModifier) -> Vec<HeaderValueOption> {
    let opt = |h: &crate::index::routes::Header,
               action: header_value_option::HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: h.name.clone(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    m.set
        .iter()
        .map(|h| {
            opt(
                h,
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
            )
        })
        .chain(m.add.iter().map(|h| {
            opt(
                h,
                header_value_option::HeaderAppendAction::AppendIfExistsOrAdd,
            )
        }))
        .collect()
}

fn forward_action(entry: &RouteEntry, backends: &[crate::index::WeightedBackend]) -> PbRouteAction {
    let cluster_of = |b: &crate::index::WeightedBackend| {
        b.cluster
            .clone()
            .unwrap_or_else(|| names::BLACKHOLE_CLUSTER.to_string())
    };
    let specifier = match backends {
        [only] if only.request_headers.is_empty() && only.response_headers.is_empty() => {
            route_action::ClusterSpecifier::Cluster(cluster_of(only))
        }
        _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: backends
                .iter()
                .map(|b| weighted_cluster::ClusterWeight {
                    name: cluster_of(b),
                    weight: u32v(b.weight),
                    request_headers_to_add: header_options(&b.request_headers),
                    request_headers_to_remove: b.request_headers.remove.clone(),
                    response_headers_to_add: header_options(&b.response_headers),
                    response_headers_to_remove: b.response_headers.remove.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let mut action = PbRouteAction {
        cluster_specifier: Some(specifier),
        // No timeout in the route means none at all (Envoy would default to 15 s).
        timeout: Some(pb_duration(entry.timeout.unwrap_or_default())),
        retry_policy: Some(super::traffic::retry_policy(
            entry.retry.as_ref(),
            entry.backend_timeout,
        )),
        hash_policy: hash_policies(backends.iter().filter_map(|b| b.hash.as_ref())),
        request_mirror_policies: entry
            .mirrors
            .iter()
            .map(|(cluster, per_million)| route_action::RequestMirrorPolicy {
                cluster: cluster.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: *per_million,
                        denominator: fractional_percent::DenominatorType::Million as i32,
                    }),
                    runtime_key: String::new(),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if let Some(rw) = &entry.rewrite {
        if let Some(host) = &rw.hostname {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(host.clone()),
            );
        }
        match &rw.path {
            Some(PathModifier::Full(full)) => {
                action.regex_rewrite = Some(RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: "^/.*$".into(),
                        ..Default::default()
                    }),
                    substitution: full.clone(),
                });
            }
            Some(PathModifier::Prefix(_)) | None => {}
        }
    }
    action
}

/// The prefix rewrite for one Envoy match: the exact half of a segment prefix swaps the whole
/// path, the `/prefix/` half keeps its slash.
fn prefix_rewrite(entry: &RouteEntry, m: &RouteMatch) -> Option<String> {
    let Some(PathModifier::Prefix(to)) = entry.rewrite.as_ref().and_then(|r| r.path.as_ref())
    else {
        return None;
    };
    let to = to.trim_end_matches('/');
    Some(match m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(ref p)) if p.ends_with('/') => format!("{to}/"),
        _ if to.is_empty() => "/".into(),
        _ => to.to_string(),
    })
}

/// A route's hash policies: one per distinct key its backends hash by.
fn hash_policies<'a>(keys: impl Iterator<Item = &'a HashKey>) -> Vec<route_action::HashPolicy> {
    let mut seen: Vec<&HashKey> = Vec::new();
    for k in keys {
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen.into_iter().map(super::traffic::hash_policy).collect()
}

/// The routes of a Service port: its route entries, or, with none, one route to the
/// Service itself (`default_cluster`) with the port's own retry and hash key, if any.
fn envoy_routes(
    entries: &[RouteEntry],
    default_cluster: &str,
    port: Option<&crate::index::PortModel>,
) -> Vec<Route> {
    if entries.is_empty() {
        let hash = port
            .and_then(|p| p.traffic.as_ref())
            .and_then(|t| match &t.balancer {
                Balancer::Hash(k) => Some(k),
                _ => None,
            });
        return vec![Route {
            name: "default".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(PbRouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                    default_cluster.to_string(),
                )),
                timeout: Some(pb_duration(Duration::ZERO)),
                // A Service port's (outbound) route; an inbound one has only the app to go to.
                retry_policy: port.map(|p| super::traffic::retry_policy(p.retry.as_ref(), None)),
                hash_policy: hash_policies(hash.into_iter()),
                ..Default::default()
            })),
            ..Default::default()
        }];
    }
    let mut out = Vec::new();
    for entry in entries {
        for m in route_matches(entry) {
            let action = match &entry.action {
                RouteAction::Forward(backends) => {
                    let mut a = forward_action(entry, backends);
                    if let Some(p) = prefix_rewrite(entry, &m) {
                        a.prefix_rewrite = p;
                    }
                    route::Action::Route(a)
                }
                RouteAction::Redirect(r) => {
                    use redirect_action::RedirectResponseCode as Code;
                    let code = match r.status {
                        301 => Code::MovedPermanently,
                        303 => Code::SeeOther,
                        307 => Code::TemporaryRedirect,
                        308 => Code::PermanentRedirect,
                        _ => Code::Found,
                    };
                    let path = match &r.path {
                        Some(PathModifier::Full(p)) => Some(
                            redirect_action::PathRewriteSpecifier::PathRedirect(p.clone()),
                        ),
                        Some(PathModifier::Prefix(_)) => prefix_rewrite(entry, &m)
                            .map(redirect_action::PathRewriteSpecifier::PrefixRewrite),
                        None => None,
                    };
                    route::Action::Redirect(RedirectAction {
                        host_redirect: r.hostname.clone().unwrap_or_default(),
                        port_redirect: r.port.map(u32::from).unwrap_or_default(),
                        scheme_rewrite_specifier: r
                            .scheme
                            .clone()
                            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
                        path_rewrite_specifier: path,
                        response_code: code as i32,
                        ..Default::default()
                    })
                }
                RouteAction::Fail(status) => route::Action::DirectResponse(DirectResponseAction {
                    status: u32::from(*status),
                    ..Default::default()
                }),
            };
            out.push(Route {
                name: entry.source.clone(),
                r#match: Some(m),
                action: Some(action),
                request_headers_to_add: header_options(&entry.request_headers),
                request_headers_to_remove: entry.request_headers.remove.clone(),
                response_headers_to_add: header_options(&entry.response_headers),
                response_headers_to_remove: entry.response_headers.remove.clone(),
                ..Default::default()
            });
        }
    }
    out
}

/// `<fqdn>:<port>`, the name of a Service port's RouteConfiguration and API listener.
pub fn service_port_name(model: &Model, svc: &SvcKey, port: u16) -> String {
    format!("{}:{port}", model.fqdn(svc))
}

fn consumer_route_name(base: &str, ns: &str) -> String {
    format!("{base}@{ns}")
}

fn service_resources(model: &Model, svc: &ServiceModel, owned: Owned) -> ServiceResources {
    let mut out = ServiceResources::default();
    out.chains = encoded_chains(model, svc, &owned, None);
    out.vhosts_remote = encoded_vhosts(model, svc, &owned, None, false);
    out.vhosts_local = encoded_vhosts(model, svc, &owned, None, true);
    out.chains_hash = hash_bytes(&out.chains);
    out.vhosts_remote_hash = hash_bytes(&out.vhosts_remote);
    out.vhosts_local_hash = hash_bytes(&out.vhosts_local);
    for p in &svc.ports {
        let cluster = model.cluster_name(&svc.key, p.port);
        let name = service_port_name(model, &svc.key, p.port);
        out.global
            .extend(cluster_and_endpoints(model, p, &cluster, &p.endpoints));
        let rc = |rc_name: &str, entries: &[RouteEntry]| RouteConfiguration {
            name: rc_name.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: name.clone(),
                domains: vec!["*".into()],
                routes: envoy_routes(entries, &cluster, Some(p)),
                ..Default::default()
            }],
            ..Default::default()
        };
        out.global.push((
            ResourceType::Route,
            Resource::new(&name, &rc(&name, &p.routes)),
        ));
        for (ns, entries) in &p.consumer_routes {
            let cname = consumer_route_name(&name, ns);
            out.global.push((
                ResourceType::Route,
                Resource::new(&cname, &rc(&cname, entries)),
            ));
        }
        let api = Listener {
            name: name.clone(),
            api_listener: Some(ApiListener {
                api_listener: Some(any(&hcm(&name, &name))),
            }),
            ..Default::default()
        };
        out.api_listeners.push(Resource::new(&name, &api));
    }
    // A headless Service's endpoints, each reached by its own address: a cluster of that one
    // endpoint (so the address chosen is the one reached, with its pod's identity), and for
    // HTTP its route, with the port's retry but not the Service's routes, which pick among
    // endpoints.
    for (name, p, e) in pod_endpoints(model, svc, &owned) {
        out.global.extend(cluster_and_endpoints(
            model,
            p,
            &name,
            std::slice::from_ref(e),
        ));
        if p.protocol != Protocol::Tcp {
            let rc = RouteConfiguration {
                name: name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: name.clone(),
                    domains: vec!["*".into()],
                    routes: one_endpoint_routes(&name, p),
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.global
                .push((ResourceType::Route, Resource::new(&name, &rc)));
        }
    }
    out.owned = owned;
    out
}

/// The route to the cluster `name` of one endpoint: the port's own retry, but not the default
/// retry of failed connections, which would have nowhere else to go.
fn one_endpoint_routes(name: &str, p: &crate::index::PortModel) -> Vec<Route> {
    let mut routes = envoy_routes(&[], name, Some(p));
    for r in &mut routes {
        if let Some(route::Action::Route(a)) = &mut r.action {
            a.retry_policy = p
                .retry
                .as_ref()
                .map(|retry| super::traffic::retry_policy(Some(retry), None));
        }
    }
    routes
}

/// A Service port's EDS cluster `name` (with the port's traffic policy) and its assignment of
/// `endpoints`, which carry their pod's identity and workload.
fn cluster_and_endpoints(
    model: &Model,
    p: &crate::index::PortModel,
    name: &str,
    endpoints: &[crate::index::Endpoint],
) -> [(ResourceType, Arc<Resource>); 2] {
    let mut c = eds_cluster(name, p.protocol);
    super::traffic::apply_cluster_policy(
        &mut c,
        p.traffic.as_deref().unwrap_or(&Default::default()),
    );
    let cla = load_assignment(name, endpoints, |e| {
        let pod = e.peer.as_deref()?;
        let id = is_proxied(pod).then(|| model.pod_identity(pod)).flatten();
        // HTTP/2 only to declared HTTP/1 ports: the peer's inbound then pins HTTP/1.1 to the
        // app, whatever it receives.
        Some(peer_metadata(
            pod,
            id.as_ref(),
            p.protocol == Protocol::Http,
        ))
    });
    [
        (ResourceType::Cluster, Resource::new(name, &c)),
        (ResourceType::Endpoint, Resource::new(name, &cla)),
    ]
}

/// The endpoints of a headless Service that it owns, one per address (the first port that
/// reaches it), each with the name of its own cluster:
/// `outbound|<port>|<hostname, or address>|<fqdn>`.
fn pod_endpoints<'a>(
    model: &Model,
    svc: &'a ServiceModel,
    owned: &Owned,
) -> Vec<(
    String,
    &'a crate::index::PortModel,
    &'a crate::index::Endpoint,
)> {
    let fqdn = model.fqdn(&svc.key);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if svc.cluster_ip.is_some() {
        return out;
    }
    for p in &svc.ports {
        let hostnames: Vec<&str> = p
            .endpoints
            .iter()
            .filter_map(|e| e.hostname.as_deref())
            .collect();
        for e in p.endpoints.iter() {
            if !owned.contains(&e.addr) || !seen.insert(e.addr) {
                continue;
            }
            // A hostname names the endpoint while it is the only one with it.
            let label = match e.hostname.as_deref() {
                Some(h) if hostnames.iter().filter(|o| **o == h).count() == 1 => h.to_string(),
                _ => e.addr.ip().to_string(),
            };
            out.push((format!("outbound|{}|{label}|{fqdn}", p.port), p, e));
        }
    }
    out
}

/// The RouteConfiguration a proxy uses for a Service port: the consumer routes of its
/// namespace when it has some, else the producer routes.
fn route_name_for(
    model: &Model,
    svc: &ServiceModel,
    port: &crate::index::PortModel,
    consumer: Option<&str>,
) -> String {
    let base = service_port_name(model, &svc.key, port.port);
    match consumer {
        Some(ns) if port.consumer_routes.contains_key(ns) => consumer_route_name(&base, ns),
        _ => base,
    }
}

/// Whether a proxy in `namespace` sees other routes for this Service than its producers'.
fn has_consumer_routes(svc: &ServiceModel, namespace: &str) -> bool {
    svc.ports
        .iter()
        .any(|p| p.consumer_routes.contains_key(namespace))
}

/// Host names a Service port answers to on the explicit outbound HTTP listener.
fn domains(
    model: &Model,
    svc: &ServiceModel,
    port: u16,
    local: bool,
    owned: &Owned,
) -> Vec<String> {
    let SvcKey {
        namespace: ns,
        name,
    } = &svc.key;
    let mut hosts = vec![
        model.fqdn(&svc.key),
        format!("{name}.{ns}.svc"),
        format!("{name}.{ns}"),
    ];
    if local {
        hosts.push(name.clone());
    }
    let mut out: Vec<String> = hosts.iter().map(|h| format!("{h}:{port}")).collect();
    // A bare host (no port) means port 80; a Service with a single port takes it too.
    let bare = port == 80 || (svc.ports.len() == 1 && !svc.ports.iter().any(|p| p.port == 80));
    if bare {
        out.extend(hosts);
    }
    if let Some(ip) = svc
        .cluster_ip
        .filter(|ip| owned.contains(&SocketAddr::new(*ip, port)))
    {
        out.push(match ip {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        });
        if bare {
            out.push(ip.to_string());
        }
    }
    out
}

/// `outbound_http` virtual hosts of one Service, encoded as `RouteConfiguration.virtual_hosts`
/// entries. `consumer`: the namespace whose consumer routes to use, if any.
fn encoded_vhosts(
    model: &Model,
    svc: &ServiceModel,
    owned: &Owned,
    consumer: Option<&str>,
    local: bool,
) -> Vec<u8> {
    let mut buf = Vec::new();
    for p in &svc.ports {
        if p.protocol == Protocol::Tcp {
            continue;
        }
        let cluster = model.cluster_name(&svc.key, p.port);
        let entries = consumer
            .and_then(|ns| p.consumer_routes.get(ns))
            .unwrap_or(&p.routes);
        let vhost = VirtualHost {
            name: service_port_name(model, &svc.key, p.port),
            domains: domains(model, svc, p.port, local, owned),
            routes: envoy_routes(entries, &cluster, Some(p)),
            ..Default::default()
        };
        canonical::encode_field(VIRTUAL_HOSTS_TAG, &vhost, &mut buf);
    }
    buf
}

/// `virtualOutbound` filter chains of one Service, encoded as `Listener.filter_chains` entries:
/// by its VIP and port, or, headless, by each endpoint's address.
fn encoded_chains(
    model: &Model,
    svc: &ServiceModel,
    owned: &Owned,
    consumer: Option<&str>,
) -> Vec<u8> {
    let mut buf = Vec::new();
    for (name, p, e) in pod_endpoints(model, svc, owned) {
        let chains = port_chains(
            &name,
            p.protocol,
            FilterChainMatch {
                prefix_ranges: vec![cidr(e.addr.ip())],
                destination_port: u32v(u32::from(e.addr.port())),
                ..Default::default()
            },
            || vec![hcm_filter(&name, &name)],
            || vec![tcp_filter(&name, &name)],
        );
        for c in &chains {
            canonical::encode_field(FILTER_CHAINS_TAG, c, &mut buf);
        }
    }
    let Some(vip) = svc.cluster_ip else {
        return buf;
    };
    for p in svc
        .ports
        .iter()
        .filter(|p| owned.contains(&SocketAddr::new(vip, p.port)))
    {
        let cluster = model.cluster_name(&svc.key, p.port);
        let route = route_name_for(model, svc, p, consumer);
        let chains = port_chains(
            &route,
            p.protocol,
            FilterChainMatch {
                prefix_ranges: vec![cidr(vip)],
                destination_port: u32v(u32::from(p.port)),
                ..Default::default()
            },
            || vec![hcm_filter(&cluster, &route)],
            || vec![tcp_filter(&cluster, &cluster)],
        );
        for c in &chains {
            canonical::encode_field(FILTER_CHAINS_TAG, c, &mut buf);
        }
    }
    buf
}

/// The filter chains of one port by its protocol: HTTP, TCP, or, undeclared, both, told apart
/// by `http_inspector` (so a server-speaks-first protocol is passed through, not parsed).
fn port_chains(
    name: &str,
    protocol: Protocol,
    matching: FilterChainMatch,
    http: impl FnOnce() -> Vec<Filter>,
    tcp: impl FnOnce() -> Vec<Filter>,
) -> Vec<FilterChain> {
    let chain = |kind: &str, app: Vec<String>, filters: Vec<Filter>| FilterChain {
        name: format!("{name}/{kind}"),
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: app,
            ..matching.clone()
        }),
        filters,
        ..Default::default()
    };
    match protocol {
        Protocol::Tcp => vec![chain("tcp", vec![], tcp())],
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => vec![chain("http", vec![], http())],
        Protocol::Unknown => vec![
            chain("http", vec!["http/1.1".into(), "h2c".into()], http()),
            chain("tcp", vec![], tcp()),
        ],
    }
}

/// Field numbers of the repeated fields the per-namespace layer is assembled from.
const VIRTUAL_HOSTS_TAG: u32 = 2;
const FILTER_CHAINS_TAG: u32 = 3;

fn namespace_resources(
    model: &Model,
    services: &ServiceCache,
    namespace: &str,
    settings: &ListenerSettings,
) -> Resources {
    let mut out = Resources::default();
    if settings.transparent {
        // A transparent proxy sends by destination address; it needs no Host-routed listener.
        let mut bytes = canonical::encode(&outbound_listener(settings));
        for (svc, res) in services.values() {
            if has_consumer_routes(svc, namespace) {
                bytes.extend(encoded_chains(model, svc, &res.owned, Some(namespace)));
            } else {
                bytes.extend_from_slice(&res.chains);
            }
        }
        out.insert(
            ResourceType::Listener,
            Resource::from_encoded(names::OUTBOUND_LISTENER, Listener::type_url(), bytes),
        );
        return out;
    }
    // Explicit outbound HTTP proxy: one virtual host per Service port, routed by Host.
    let mut bytes = canonical::encode(&RouteConfiguration {
        name: names::OUTBOUND_HTTP_ROUTE.into(),
        ..Default::default()
    });
    for (key, (svc, res)) in services {
        let local = key.namespace == namespace;
        if has_consumer_routes(svc, namespace) {
            bytes.extend(encoded_vhosts(
                model,
                svc,
                &res.owned,
                Some(namespace),
                local,
            ));
        } else if local {
            bytes.extend_from_slice(&res.vhosts_local);
        } else {
            bytes.extend_from_slice(&res.vhosts_remote);
        }
    }
    out.insert(
        ResourceType::Route,
        Resource::from_encoded(
            names::OUTBOUND_HTTP_ROUTE,
            RouteConfiguration::type_url(),
            bytes,
        ),
    );
    let http = Listener {
        name: names::OUTBOUND_HTTP_LISTENER.into(),
        address: Some(socket_address(
            settings.outbound_http_addr.ip(),
            settings.outbound_http_addr.port(),
        )),
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(
                names::OUTBOUND_HTTP_LISTENER,
                names::OUTBOUND_HTTP_ROUTE,
            )],
            ..Default::default()
        }],
        ..Default::default()
    };
    out.insert(
        ResourceType::Listener,
        Resource::new(names::OUTBOUND_HTTP_LISTENER, &http),
    );
    out
}

fn cidr(ip: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: u32v(if ip.is_ipv4() { 32 } else { 128 }),
    }
}

/// `virtualOutbound` without its per-Service filter chains, which are appended encoded.
fn outbound_listener(settings: &ListenerSettings) -> Listener {
    Listener {
        name: names::OUTBOUND_LISTENER.into(),
        address: Some(socket_address(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            settings.outbound_port,
        )),
        listener_filters: vec![
            listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}),
            listener_filter("envoy.filters.listener.http_inspector", &HttpInspector {}),
        ],
        default_filter_chain: Some(FilterChain {
            name: names::PASSTHROUGH_CLUSTER.into(),
            filters: vec![tcp_filter(
                names::PASSTHROUGH_CLUSTER,
                names::PASSTHROUGH_CLUSTER,
            )],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The transparent inbound listener: one chain per port a Service sends to this pod, handing
/// the traffic to the app on localhost; anything else passes through.
fn pod_resources(
    model: &Model,
    namespace: &str,
    pod: Option<&PodModel>,
    settings: &ListenerSettings,
) -> Resources {
    let mut out = Resources::default();
    let mode = model.mtls_mode(namespace);
    // Per pod port: its protocol, and the Services (with port names) that reach it.
    let mut targets: BTreeMap<u16, (Protocol, Vec<crate::index::policy::ViaService<'_>>)> =
        BTreeMap::new();
    if let Some(pod) = pod {
        for svc in model.services_selecting(pod) {
            for p in &svc.ports {
                let target = p.target_port.or_else(|| {
                    p.target_port_name
                        .as_ref()
                        .and_then(|n| pod.named_ports.get(n).copied())
                });
                if let Some(t) = target {
                    targets
                        .entry(t)
                        .or_insert((p.protocol, Vec::new()))
                        .1
                        .push((svc.key.name.as_str(), p.name.as_str()));
                }
            }
        }
    }
    let mut chains = Vec::new();
    let tls = settings
        .mtls
        .then(|| mesh_tls_socket(settings.sds_dir.as_deref()));
    for (port, (protocol, via)) in targets {
        let guard = super::policy::port_guard(&model.policies, namespace, &via);
        let cluster = format!("inbound|{port}||");
        let route = format!("inbound|{port}");
        let mut app = static_cluster(
            &cluster,
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        );
        // A declared protocol is what the app speaks, whatever the peer proxy sent.
        match protocol {
            Protocol::Http => set_upstream_protocol(&mut app, false),
            p if p.is_http2() => set_upstream_protocol(&mut app, true),
            _ => {}
        }
        out.insert(ResourceType::Cluster, Resource::new(&cluster, &app));
        if protocol != Protocol::Tcp {
            let rc = RouteConfiguration {
                name: route.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: route.clone(),
                    domains: vec!["*".into()],
                    routes: envoy_routes(&[], &cluster, None),
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.insert(ResourceType::Route, Resource::new(&route, &rc));
        }
        let plain = port_chains(
            &route,
            protocol,
            FilterChainMatch {
                destination_port: u32v(u32::from(port)),
                ..Default::default()
            },
            || vec![inbound_hcm_filter(&cluster, &route, guard.http_filters())],
            || {
                let mut filters = guard.network_filters();
                filters.push(tcp_filter(&cluster, &cluster));
                filters
            },
        );
        if let Some(tls) = &tls {
            chains.extend(plain.iter().map(|c| mesh_tls_chain(c, tls)));
            if mode == MtlsMode::Permissive {
                chains.extend(plain.into_iter().map(raw_chain));
            }
        } else {
            chains.extend(plain);
        }
    }
    let mut listener_filters = vec![
        listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}),
        listener_filter("envoy.filters.listener.http_inspector", &HttpInspector {}),
    ];
    if settings.mtls {
        // Envoy tells mesh TLS from plaintext (and reads the ALPN) with the TLS inspector.
        listener_filters.push(listener_filter(
            "envoy.filters.listener.tls_inspector",
            &TlsInspector::default(),
        ));
    }
    let listener = Listener {
        name: names::INBOUND_LISTENER.into(),
        address: Some(socket_address(settings.inbound_addr, settings.inbound_port)),
        listener_filters,
        filter_chains: chains,
        // STRICT: plaintext to a port no Service declares is refused too.
        default_filter_chain: (!settings.mtls || mode == MtlsMode::Permissive).then(|| {
            FilterChain {
                name: names::PASSTHROUGH_CLUSTER.into(),
                filters: vec![tcp_filter(
                    names::PASSTHROUGH_CLUSTER,
                    names::PASSTHROUGH_CLUSTER,
                )],
                ..Default::default()
            }
        }),
        ..Default::default()
    };
    out.insert(
        ResourceType::Listener,
        Resource::new(names::INBOUND_LISTENER, &listener),
    );
    out
}

/// The transport socket that terminates mesh TLS: TLS 1.3, a client SVID required, the
/// proxy's own SVID and trust bundle (SDS `default` and `ROOTCA`, as Istio names them).
fn mesh_tls_socket(sds_dir: Option<&str>) -> TransportSocket {
    let sds = |name: &str| SdsSecretConfig {
        name: name.into(),
        sds_config: Some(match sds_dir {
            Some(dir) => ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(
                    config_source::ConfigSourceSpecifier::PathConfigSource(PathConfigSource {
                        path: format!("{dir}/{name}.yaml"),
                        // Secrets are replaced by renaming into the directory.
                        watched_directory: Some(WatchedDirectory {
                            path: dir.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                ),
                ..Default::default()
            },
            None => ads(),
        }),
    };
    let ctx = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            tls_certificate_sds_secret_configs: vec![sds(names::SDS_SVID)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    names::SDS_ROOTS,
                )),
            ),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: names::TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

/// A plaintext chain's mesh TLS twin: matches TLS, terminates it, and tells HTTP versions
/// apart by the negotiated ALPN (`h2`) instead of detection (`h2c`).
fn mesh_tls_chain(plain: &FilterChain, tls: &TransportSocket) -> FilterChain {
    let mut c = plain.clone();
    c.name = format!("{}/mtls", plain.name);
    let m = c.filter_chain_match.get_or_insert_with(Default::default);
    m.transport_protocol = "tls".into();
    for p in &mut m.application_protocols {
        if p == "h2c" {
            *p = "h2".into();
        }
    }
    c.transport_socket = Some(tls.clone());
    c
}

/// A chain that takes plaintext only (beside mesh TLS chains, in PERMISSIVE mode).
fn raw_chain(mut c: FilterChain) -> FilterChain {
    c.filter_chain_match
        .get_or_insert_with(Default::default)
        .transport_protocol = "raw_buffer".into();
    c
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
