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

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::{
    ApiListener, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use mesh_api::consts::{ports, xds as names};
use prost::Name;
use serde::Serialize;

use super::build::{
    cidr, cluster_and_endpoints, envoy_routes, fixed_clusters, hcm, hcm_filter, inbound_hcm_filter,
    listener_filter, mesh_tls_chain, mesh_tls_socket, one_endpoint_routes, port_chains, raw_chain,
    set_upstream_protocol, socket_address, static_cluster, tcp_filter,
};
use super::canonical;
use super::pb::{any, u32v};
use super::resources::{Changes, ProxyView, Resource, ResourceType, Resources, hash_bytes};
use crate::index::{Model, MtlsMode, PodModel, Protocol, RouteEntry, ServiceModel, SvcKey};
use envoy_types::pb::google::protobuf::BoolValue;

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
    /// Where the proxy's mesh TLS secrets come from.
    pub sds: SdsSource,
    /// A transparent proxy that looks destinations up on demand (`node_metadata::SCOPED`).
    pub scoped: bool,
    /// The Gateway of the proxy's namespace it serves (`node_metadata::GATEWAY`): it gets
    /// that Gateway's listeners instead of a sidecar's.
    pub gateway: Option<String>,
    /// Where a gateway proxy binds its listeners.
    pub gateway_addr: IpAddr,
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
            sds: SdsSource::Ads,
            scoped: false,
            gateway: None,
            gateway_addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }
}

/// Where a proxy gets its SVID and trust bundle (SDS secrets `default` and `ROOTCA`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum SdsSource {
    /// Over ADS (mesh-proxy, which holds its own identity).
    Ads,
    /// From files in this directory that an agent keeps current (Envoy).
    Dir(String),
    /// Over gRPC from the agent's socket, through the bootstrap's static cluster (Envoy).
    Agent,
}

impl ListenerSettings {
    /// An Envoy with a mesh identity whose secrets come from the agent's socket: its clusters
    /// carry upstream mesh TLS (mesh-proxy originates it itself, from endpoint metadata).
    pub fn upstream_tls(&self) -> bool {
        self.mtls && self.sds == SdsSource::Agent
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
    /// Its clusters' upstream mesh TLS variants (of those with an endpoint that has an
    /// identity).
    tls_clusters: Vec<Arc<Resource>>,
    api_listeners: Vec<Arc<Resource>>,
    /// The listener of each owned address, with its filter chains (the producer routes), for
    /// proxies that look destinations up on demand.
    address_listeners: Vec<Arc<Resource>>,
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

/// Which shared set a Service's resource belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Shared {
    /// Served to wildcard subscriptions of proxies that are not scoped.
    Global,
    /// API listeners, served only when named.
    Api,
    /// Address listeners, served only when named.
    Address,
    /// Clusters with upstream mesh TLS, in place of the global ones for Envoys that
    /// originate it.
    GlobalTls,
}

impl ServiceResources {
    /// Every shared resource of the Service: `(type, resource, its set)`.
    fn entries(&self) -> impl Iterator<Item = (ResourceType, &Arc<Resource>, Shared)> {
        let api = self.api_listeners.iter().map(|r| (r, Shared::Api));
        let addresses = self.address_listeners.iter().map(|r| (r, Shared::Address));
        let tls = self
            .tls_clusters
            .iter()
            .map(|r| (ResourceType::Cluster, r, Shared::GlobalTls));
        self.global
            .iter()
            .map(|(ty, r)| (*ty, r, Shared::Global))
            .chain(
                api.chain(addresses)
                    .map(|(r, set)| (ResourceType::Listener, r, set)),
            )
            .chain(tls)
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
    Scoped(String, u16),
    Explicit(String, SocketAddr),
}

impl LayerKey {
    fn of(namespace: &str, settings: &ListenerSettings) -> Self {
        if settings.transparent && settings.scoped {
            LayerKey::Scoped(namespace.to_string(), settings.outbound_port)
        } else if settings.transparent {
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
    /// What is served from it only when named (a scoped proxy's address listeners).
    named: Arc<Resources>,
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
    addresses: Resources,
    /// Clusters with upstream mesh TLS, named as the plain ones they stand for, for Envoys
    /// that originate mesh TLS ([`ListenerSettings::upstream_tls`]).
    global_tls: Resources,
    shared: Arc<Resources>,
    shared_api: Arc<Resources>,
    shared_addresses: Arc<Resources>,
    shared_tls: Arc<Resources>,
    /// The clusters every proxy holds (passthrough, blackhole): the whole shared wildcard
    /// layer of a scoped proxy.
    fixed: Arc<Resources>,
    changes: Arc<Changes>,
    /// Services by the address they claim, in name order: the first one owns it.
    claimants: HashMap<SocketAddr, BTreeSet<(u8, SvcKey)>>,
    /// Bumped whenever a piece of the transparent (`chains`) or Host-routed (`vhosts`)
    /// per-namespace layers changes; a layer built at the current epoch is still good.
    chains_epoch: u64,
    vhosts_epoch: u64,
    /// Per-namespace layers, kept while their epoch holds, keyed by what their bytes depend on.
    namespaces: HashMap<LayerKey, NamespaceLayer>,
    /// A namespace's Host-routed RouteConfiguration (megabytes at mesh scale), built at
    /// `vhosts_epoch`: the Host-routed layers of its proxies' several listener addresses
    /// (a laptop mesh's, say) share it.
    http_routes: HashMap<String, (u64, Arc<Resource>)>,
    pods: HashMap<(String, String, ListenerSettings), Arc<Resources>>,
    /// Inbound layers by what they are built from: pods of the same Services share one.
    inbound: HashMap<InboundKey, Arc<Resources>>,
    /// Scoped proxies' dependency layers, by namespace, the pod's declared dependencies and
    /// the learned addresses: the pods of one workload share one.
    dependency_layers: HashMap<DependencyKey, Arc<Resources>>,
    /// Gateways' layers, by `namespace/name` and the address their listeners bind.
    gateway_layers: HashMap<(String, IpAddr), Arc<Resources>>,
}

type DependencyKey = (
    String,
    BTreeSet<crate::index::dependencies::Dependency>,
    BTreeSet<SocketAddr>,
);

/// The ports a pod is reached on through its Services: each with its protocol and the
/// `(Service, port name)` pairs that reach it.
/// A pod's inbound ports: the protocol of each, and the Services (with port names) that reach
/// it.
pub(crate) type Targets = BTreeMap<u16, (Protocol, Vec<(String, String)>)>;

/// What a transparent proxy's own (inbound) layer depends on, besides the model: its
/// namespace, its listener settings and its [`Targets`].
type InboundKey = (String, ListenerSettings, Targets);

impl Translator {
    pub fn new(model: Arc<Model>) -> Self {
        let mut global = Resources::default();
        let mut fixed = Resources::default();
        for (ty, r) in fixed_clusters() {
            global.insert(ty, r.clone());
            fixed.insert(ty, r);
        }
        let mut t = Self {
            model: Arc::new(Model::default()),
            services: BTreeMap::new(),
            global,
            api: Resources::default(),
            global_tls: Resources::default(),
            shared_tls: Arc::default(),
            addresses: Resources::default(),
            shared: Arc::default(),
            shared_api: Arc::default(),
            shared_addresses: Arc::default(),
            fixed: Arc::new(fixed),
            changes: Arc::default(),
            claimants: HashMap::new(),
            chains_epoch: 0,
            vhosts_epoch: 0,
            namespaces: HashMap::new(),
            http_routes: HashMap::new(),
            pods: HashMap::new(),
            inbound: HashMap::new(),
            dependency_layers: HashMap::new(),
            gateway_layers: HashMap::new(),
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
                for (ty, r, set) in res.entries() {
                    next_names.insert((ty, set, r.name.clone()));
                    let layer = self.set_mut(set);
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
                for (ty, r, set) in res.entries() {
                    if !next_names.contains(&(ty, set, r.name.clone())) {
                        // An address listener may have passed to the address's new owner.
                        let layer = self.set_mut(set);
                        if layer
                            .get(ty, &r.name)
                            .is_some_and(|now| now.version == r.version)
                        {
                            layer.remove(ty, &r.name);
                        }
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
        self.shared_addresses = Arc::new(self.addresses.clone());
        self.shared_tls = Arc::new(self.global_tls.clone());
        // Layers whose pieces changed are rebuilt on demand; drop the stale ones now.
        let (chains, vhosts) = (self.chains_epoch, self.vhosts_epoch);
        self.namespaces.retain(|k, l| {
            l.epoch
                == if matches!(k, LayerKey::Explicit(..)) {
                    vhosts
                } else {
                    chains
                }
        });
        self.http_routes.retain(|_, (epoch, _)| *epoch == vhosts);
        self.pods.clear();
        self.inbound.clear();
        self.dependency_layers.clear();
        self.gateway_layers.clear();
    }

    fn set_mut(&mut self, set: Shared) -> &mut Resources {
        match set {
            Shared::Global => &mut self.global,
            Shared::Api => &mut self.api,
            Shared::Address => &mut self.addresses,
            Shared::GlobalTls => &mut self.global_tls,
        }
    }

    /// The per-namespace layer: reused while no piece it is assembled from changed.
    fn namespace_layer(
        &mut self,
        model: &Model,
        namespace: &str,
        settings: &ListenerSettings,
    ) -> (Arc<Resources>, Arc<Resources>) {
        let key = LayerKey::of(namespace, settings);
        let epoch = if settings.transparent {
            self.chains_epoch
        } else {
            self.vhosts_epoch
        };
        if let Some(layer) = self.namespaces.get(&key)
            && layer.epoch == epoch
        {
            return (layer.resources.clone(), layer.named.clone());
        }
        let http_route = || match self.http_routes.get(namespace) {
            Some((at, r)) if *at == epoch => r.clone(),
            _ => {
                let r = outbound_http_route(&self.services, model, namespace);
                self.http_routes
                    .insert(namespace.to_string(), (epoch, r.clone()));
                r
            }
        };
        let (resources, named) =
            namespace_resources(model, &self.services, namespace, settings, http_route);
        let (resources, named) = (Arc::new(resources), Arc::new(named));
        self.namespaces.insert(
            key,
            NamespaceLayer {
                epoch,
                resources: resources.clone(),
                named: named.clone(),
            },
        );
        (resources, named)
    }

    /// Everything `proxy` may be served, for the current model.
    pub fn view(&mut self, proxy: &ProxyId) -> ProxyView {
        self.view_learned(proxy, &BTreeSet::new())
    }

    /// [`Translator::view`]; a scoped proxy's wildcard also carries the destinations its
    /// pod's and namespace's `mesh.dev/dependencies` name and the `learned` ones its workload
    /// looked up.
    pub fn view_learned(&mut self, proxy: &ProxyId, learned: &BTreeSet<SocketAddr>) -> ProxyView {
        if let Some(gateway) = &proxy.settings.gateway {
            return self.gateway_view(proxy, gateway);
        }
        let model = self.model.clone();
        let pod = model
            .pods
            .get(&(proxy.namespace.clone(), proxy.name.clone()))
            .map(|p| p.as_ref());
        let (ns, ns_named) = self.namespace_layer(&model, &proxy.namespace, &proxy.settings);
        let mut layers = vec![ns];
        if proxy.settings.transparent {
            let pod_key = (
                proxy.namespace.clone(),
                proxy.name.clone(),
                proxy.settings.clone(),
            );
            let inbound = match self.pods.get(&pod_key) {
                Some(l) => l.clone(),
                None => {
                    let key = (
                        proxy.namespace.clone(),
                        proxy.settings.clone(),
                        targets(&model, pod),
                    );
                    let layer = self
                        .inbound
                        .entry(key)
                        .or_insert_with_key(|(ns, settings, targets)| {
                            Arc::new(pod_resources(&model, ns, targets, settings))
                        })
                        .clone();
                    self.pods.insert(pod_key, layer.clone());
                    layer
                }
            };
            layers.insert(0, inbound);
        }
        // A scoped proxy's wildcard holds the fixed clusters only; every Service's resources,
        // and each address's listener, are served when it names them.
        // The namespace's own address listeners (its consumer routes') come first, so that
        // they hide the shared ones of the same name.
        let mut shared_layers = 1;
        let (named_only, own_named) = if proxy.settings.transparent && proxy.settings.scoped {
            let declared = pod.map(|p| p.dependencies.clone()).unwrap_or_default();
            let key = (proxy.namespace.clone(), declared, learned.clone());
            let deps = match self.dependency_layers.get(&key) {
                Some(l) => l.clone(),
                None => {
                    let l = Arc::new(self.dependencies(&model, &key, &ns_named));
                    self.dependency_layers.insert(key, l.clone());
                    l
                }
            };
            if !deps.is_empty() {
                layers.push(deps);
            }
            layers.push(self.fixed.clone());
            let tls = proxy
                .settings
                .upstream_tls()
                .then(|| self.shared_tls.clone());
            let named = [ns_named]
                .into_iter()
                .chain(tls)
                .chain([
                    self.shared.clone(),
                    self.shared_addresses.clone(),
                    self.shared_api.clone(),
                ])
                .collect();
            (named, 1)
        } else {
            if proxy.settings.upstream_tls() {
                // Earlier layers hide later ones: the TLS clusters stand for the plain ones.
                layers.push(self.shared_tls.clone());
                shared_layers = 2;
            }
            layers.push(self.shared.clone());
            (vec![self.shared_api.clone()], 0)
        };
        ProxyView {
            revision: model.revision,
            layers,
            named_only,
            own_named,
            shared_layers,
            changes: self.changes.clone(),
        }
    }
}

impl Translator {
    /// What a gateway proxy sees: its Gateway's listeners, routes and certificates (nothing
    /// while the Gateway is not one of ours), then the mesh's clusters (with upstream mesh TLS
    /// for an Envoy that originates it).
    fn gateway_view(&mut self, proxy: &ProxyId, gateway: &str) -> ProxyView {
        let model = self.model.clone();
        let key = (
            format!("{}/{gateway}", proxy.namespace),
            proxy.settings.gateway_addr,
        );
        let own = self
            .gateway_layers
            .entry(key)
            .or_insert_with_key(|(name, addr)| {
                Arc::new(
                    model
                        .gateways
                        .gateways
                        .get(name)
                        .map(|g| super::gateway::gateway_resources(&model, g, *addr))
                        .unwrap_or_default(),
                )
            })
            .clone();
        let mut layers = vec![own];
        let mut shared_layers = 1;
        if proxy.settings.upstream_tls() {
            layers.push(self.shared_tls.clone());
            shared_layers = 2;
        }
        layers.push(self.shared.clone());
        ProxyView {
            revision: model.revision,
            layers,
            named_only: vec![],
            own_named: 0,
            shared_layers,
            changes: self.changes.clone(),
        }
    }

    /// The address listeners a scoped proxy is given up front: those of the Services its
    /// pod's and namespace's `mesh.dev/dependencies` name, and the `learned` addresses, in
    /// the proxy's namespace's version (`ns_named`, with its consumer routes) where it has one.
    fn dependencies(
        &self,
        model: &Model,
        (namespace, declared, learned): &DependencyKey,
        ns_named: &Resources,
    ) -> Resources {
        use crate::index::dependencies::Dependency;
        let named = declared.iter().chain(
            model
                .namespace_dependencies
                .get(namespace)
                .into_iter()
                .flatten(),
        );
        let mut addrs: BTreeSet<SocketAddr> = learned.clone();
        for dep in named {
            let services: Box<dyn Iterator<Item = &ServiceResources>> = match dep {
                Dependency::Service(key) => {
                    Box::new(self.services.get(key).into_iter().map(|(_, r)| &**r))
                }
                Dependency::Namespace(ns) => Box::new(
                    self.services
                        .range(SvcKey::new(ns.as_str(), "")..)
                        .take_while(|(k, _)| k.namespace == *ns)
                        .map(|(_, (_, r))| &**r),
                ),
            };
            for res in services {
                addrs.extend(res.owned.iter().copied());
            }
        }
        let mut out = Resources::default();
        for addr in addrs {
            let name = names::address_listener(addr);
            let found = ns_named
                .get(ResourceType::Listener, &name)
                .or_else(|| self.shared_addresses.get(ResourceType::Listener, &name));
            if let Some(r) = found {
                out.insert(ResourceType::Listener, r.clone());
            }
        }
        out
    }
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
    let endpoints = pod_endpoints(model, svc, &owned);
    let by_address = match svc.cluster_ip {
        None => endpoint_chains(&endpoints),
        Some(_) => vip_chains(model, svc, &owned, None),
    };
    out.chains = concat(&by_address);
    out.address_listeners = by_address
        .iter()
        .map(|(addr, chains)| address_listener(*addr, chains))
        .collect();
    out.vhosts_remote = encoded_vhosts(model, svc, &owned, None, false);
    out.vhosts_local = encoded_vhosts(model, svc, &owned, None, true);
    out.chains_hash = hash_bytes(&out.chains);
    out.vhosts_remote_hash = hash_bytes(&out.vhosts_remote);
    out.vhosts_local_hash = hash_bytes(&out.vhosts_local);
    for p in &svc.ports {
        let cluster = model.cluster_name(&svc.key, p.port);
        let name = service_port_name(model, &svc.key, p.port);
        let (resources, tls) = cluster_and_endpoints(model, p, &cluster, &p.endpoints);
        out.global.extend(resources);
        out.tls_clusters.extend(tls);
        let rc = |rc_name: &str, entries: &[RouteEntry]| RouteConfiguration {
            name: rc_name.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: name.clone(),
                domains: vec!["*".into()],
                routes: envoy_routes(entries, &cluster, Some(p), None),
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
    for (name, p, e) in &endpoints {
        let (p, e) = (*p, *e);
        let (resources, tls) = cluster_and_endpoints(model, p, name, std::slice::from_ref(e));
        out.global.extend(resources);
        out.tls_clusters.extend(tls);
        if p.protocol != Protocol::Tcp {
            let rc = RouteConfiguration {
                name: name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: name.clone(),
                    domains: vec!["*".into()],
                    routes: one_endpoint_routes(name, p),
                    ..Default::default()
                }],
                ..Default::default()
            };
            out.global
                .push((ResourceType::Route, Resource::new(name, &rc)));
        }
    }
    out.owned = owned;
    out
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
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    if svc.cluster_ip.is_some() {
        return out;
    }
    for p in &svc.ports {
        let mut hostnames: HashMap<&str, usize> = HashMap::new();
        for h in p.endpoints.iter().filter_map(|e| e.hostname.as_deref()) {
            *hostnames.entry(h).or_default() += 1;
        }
        for e in p.endpoints.iter() {
            if !owned.contains(&e.addr) || !seen.insert(e.addr) {
                continue;
            }
            // A hostname names the endpoint while it is the only one with it.
            let label = match e.hostname.as_deref() {
                Some(h) if hostnames.get(h) == Some(&1) => h.to_string(),
                _ => e.addr.ip().to_string(),
            };
            out.push((model.endpoint_cluster_name(&svc.key, p.port, &label), p, e));
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
            routes: envoy_routes(entries, &cluster, Some(p), None),
            ..Default::default()
        };
        canonical::encode_field(VIRTUAL_HOSTS_TAG, &vhost, &mut buf);
    }
    buf
}

/// Encoded `Listener.filter_chains` entries, by the destination address they match.
type AddressChains = Vec<(SocketAddr, Vec<u8>)>;

fn concat(chains: &AddressChains) -> Vec<u8> {
    chains.iter().flat_map(|(_, c)| c.iter().copied()).collect()
}

/// The listener of one destination address: its filter chains, bound nowhere.
fn address_listener(addr: SocketAddr, chains: &[u8]) -> Arc<Resource> {
    let name = names::address_listener(addr);
    let mut bytes = canonical::encode(&Listener {
        name: name.clone(),
        address: Some(socket_address(addr.ip(), addr.port())),
        bind_to_port: Some(BoolValue { value: false }),
        ..Default::default()
    });
    bytes.extend_from_slice(chains);
    Resource::from_encoded(&name, Listener::type_url(), bytes)
}

/// A headless Service's `virtualOutbound` filter chains, by each endpoint's address (the same
/// in every namespace).
fn endpoint_chains(
    endpoints: &[(String, &crate::index::PortModel, &crate::index::Endpoint)],
) -> AddressChains {
    let mut out = Vec::new();
    for (name, p, e) in endpoints {
        let mut buf = Vec::new();
        let chains = port_chains(
            name,
            p.protocol,
            FilterChainMatch {
                prefix_ranges: vec![cidr(e.addr.ip())],
                destination_port: u32v(u32::from(e.addr.port())),
                ..Default::default()
            },
            || vec![hcm_filter(name, name)],
            || vec![tcp_filter(name, name)],
        );
        for c in &chains {
            canonical::encode_field(FILTER_CHAINS_TAG, c, &mut buf);
        }
        out.push((e.addr, buf));
    }
    out
}

/// A Service's `virtualOutbound` filter chains by its VIP and port, with the routes of
/// `consumer`'s namespace or the producer's.
fn vip_chains(
    model: &Model,
    svc: &ServiceModel,
    owned: &Owned,
    consumer: Option<&str>,
) -> AddressChains {
    let mut out = Vec::new();
    let Some(vip) = svc.cluster_ip else {
        return out;
    };
    for p in svc
        .ports
        .iter()
        .filter(|p| owned.contains(&SocketAddr::new(vip, p.port)))
    {
        let mut buf = Vec::new();
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
        out.push((SocketAddr::new(vip, p.port), buf));
    }
    out
}

/// Field numbers of the repeated fields the per-namespace layer is assembled from.
const VIRTUAL_HOSTS_TAG: u32 = 2;
const FILTER_CHAINS_TAG: u32 = 3;

/// A namespace's layer for `settings`: what its proxies' wildcard gets, and what is served to
/// them only when named.
/// `http_route` gives the namespace's [`outbound_http_route`], which a Host-routed (not
/// transparent) proxy holds.
fn namespace_resources(
    model: &Model,
    services: &ServiceCache,
    namespace: &str,
    settings: &ListenerSettings,
    http_route: impl FnOnce() -> Arc<Resource>,
) -> (Resources, Resources) {
    let mut out = Resources::default();
    let mut named = Resources::default();
    if settings.transparent && settings.scoped {
        // Chains come by address when asked for; those of Services this namespace has its own
        // routes for replace the shared ones.
        out.insert(
            ResourceType::Listener,
            Resource::new(names::OUTBOUND_LISTENER, &outbound_listener(settings)),
        );
        for (svc, res) in services.values() {
            if svc.cluster_ip.is_some() && has_consumer_routes(svc, namespace) {
                for (addr, chains) in vip_chains(model, svc, &res.owned, Some(namespace)) {
                    named.insert(ResourceType::Listener, address_listener(addr, &chains));
                }
            }
        }
        return (out, named);
    }
    if settings.transparent {
        // A transparent proxy sends by destination address; it needs no Host-routed listener.
        let mut bytes = canonical::encode(&outbound_listener(settings));
        for (svc, res) in services.values() {
            if svc.cluster_ip.is_some() && has_consumer_routes(svc, namespace) {
                bytes.extend(concat(&vip_chains(model, svc, &res.owned, Some(namespace))));
            } else {
                bytes.extend_from_slice(&res.chains);
            }
        }
        out.insert(
            ResourceType::Listener,
            Resource::from_encoded(names::OUTBOUND_LISTENER, Listener::type_url(), bytes),
        );
        return (out, named);
    }
    // Explicit outbound HTTP proxy: one virtual host per Service port, routed by Host.
    out.insert(ResourceType::Route, http_route());
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
    (out, named)
}

/// A namespace's Host-routed RouteConfiguration (`outbound_http`): one virtual host per Service
/// port, as the namespace's consumers see it.
fn outbound_http_route(services: &ServiceCache, model: &Model, namespace: &str) -> Arc<Resource> {
    let head = canonical::encode(&RouteConfiguration {
        name: names::OUTBOUND_HTTP_ROUTE.into(),
        ..Default::default()
    });
    let mut pieces = vec![Cow::Owned(head)];
    for (key, (svc, res)) in services {
        let local = key.namespace == namespace;
        pieces.push(if has_consumer_routes(svc, namespace) {
            Cow::Owned(encoded_vhosts(
                model,
                svc,
                &res.owned,
                Some(namespace),
                local,
            ))
        } else if local {
            Cow::Borrowed(res.vhosts_local.as_slice())
        } else {
            Cow::Borrowed(res.vhosts_remote.as_slice())
        });
    }
    // Megabytes at mesh scale: joined into one allocation of the exact size.
    let bytes = pieces.concat();
    Resource::from_encoded(
        names::OUTBOUND_HTTP_ROUTE,
        RouteConfiguration::type_url(),
        bytes,
    )
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
/// Per port of `pod`: its protocol, and the Services (with port names) that reach it.
/// The inbound ports a pod's proxy serves, as its inbound listener is built.
pub(crate) fn targets(model: &Model, pod: Option<&PodModel>) -> Targets {
    let mut targets = Targets::new();
    if let Some(pod) = pod {
        for svc in model.services_selecting(pod) {
            for p in &svc.ports {
                let target = p.target_port.or_else(|| {
                    p.target_port_name
                        .as_ref()
                        .and_then(|n| pod.named_ports.get(n).copied())
                });
                // The sidecar's own ports are not the app's to serve (consts::ports::SIDECAR).
                if let Some(t) = target.filter(|t| !ports::SIDECAR.contains(t)) {
                    targets
                        .entry(t)
                        .or_insert((p.protocol, Vec::new()))
                        .1
                        .push((svc.key.name.clone(), p.name.clone()));
                }
            }
        }
    }
    targets
}

fn pod_resources(
    model: &Model,
    namespace: &str,
    targets: &Targets,
    settings: &ListenerSettings,
) -> Resources {
    let mut out = Resources::default();
    let mode = model.mtls_mode(namespace);
    let mut chains = Vec::new();
    let tls = settings.mtls.then(|| mesh_tls_socket(&settings.sds));
    for (&port, (protocol, via)) in targets {
        let protocol = *protocol;
        let via: Vec<crate::index::policy::ViaService<'_>> =
            via.iter().map(|(s, p)| (s.as_str(), p.as_str())).collect();
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
                    routes: envoy_routes(&[], &cluster, None, None),
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

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
