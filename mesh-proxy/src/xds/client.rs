//! The ADS stream: requests out, responses into the [`Cache`], snapshots into the [`Store`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Node, node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use futures::StreamExt;
use futures::channel::mpsc;
use mesh_api::consts::node_metadata;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::cache::{Cache, Incoming, Type, resource_name};
use super::on_demand::{OnDemand, Request};
use super::servers::{After, Servers, WORKED_AFTER};
use crate::config::{Config, XdsApi};
use crate::identity::MeshTls;
use crate::metrics::{Metrics, XdsLabels, XdsTypeLabels};
use crate::state::Store;

/// Per type: what was last applied or refused, for `/config_dump`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    pub resources: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    /// The controller replica the stream is (or was last) open to.
    pub controller: Option<SocketAddr>,
    pub streams_opened: u64,
    pub last_stream_error: Option<String>,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// Where this proxy's listeners are, for the node metadata.
#[derive(Clone, Debug)]
pub struct ListenerPorts {
    pub transparent: bool,
    pub outbound_http: SocketAddr,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

#[derive(Debug)]
pub struct XdsClient {
    targets: Vec<String>,
    api: XdsApi,
    node: Node,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    pub status: Arc<Mutex<XdsStatus>>,
    /// xDS over mesh TLS: this proxy's identity, and the controller's it must find.
    tls: Option<(Arc<MeshTls>, Arc<rustls::ClientConfig>)>,
    /// Destinations looked up on demand (`--scoped`).
    on_demand: Option<Arc<OnDemand>>,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("{0}")]
    Servers(#[from] super::servers::Error),
    #[error("{addr} does not make a URI: {source}")]
    Uri {
        addr: SocketAddr,
        source: tonic::transport::Error,
    },
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the controller closed the stream")]
    Closed,
}

fn string_value(s: String) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s)),
    }
}

/// How long connecting to one replica may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an incomplete config may wait for the rest before it is served anyway.
const WARMING_LIMIT: Duration = Duration::from_secs(1);

impl XdsClient {
    pub fn new(
        config: &Config,
        ports: &ListenerPorts,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        tls: Option<(Arc<MeshTls>, Arc<rustls::ClientConfig>)>,
        on_demand: Option<Arc<OnDemand>>,
    ) -> Self {
        let workload = config
            .workload
            .clone()
            .map(|w| (node_metadata::WORKLOAD, w));
        let gateway = config.gateway.iter().flat_map(|g| {
            [
                (node_metadata::GATEWAY, g.clone()),
                (node_metadata::GATEWAY_ADDR, config.gateway_addr.to_string()),
            ]
        });
        let fields = [
            (node_metadata::SCOPED, on_demand.is_some().to_string()),
            (node_metadata::TRANSPARENT, ports.transparent.to_string()),
            (
                node_metadata::OUTBOUND_HTTP_ADDR,
                ports.outbound_http.to_string(),
            ),
            (
                node_metadata::OUTBOUND_PORT,
                ports.outbound_port.to_string(),
            ),
            (node_metadata::INBOUND_PORT, ports.inbound_port.to_string()),
            (node_metadata::MTLS, (!config.identity_off).to_string()),
            (node_metadata::ADMIN_ADDR, ports.admin.to_string()),
            (node_metadata::METRICS_ADDR, ports.metrics.to_string()),
        ]
        .into_iter()
        .chain(workload)
        .chain(gateway)
        .map(|(k, v)| (k.to_string(), string_value(v)))
        .collect();
        let node = Node {
            id: config.node.clone(),
            cluster: config
                .node
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            metadata: Some(Struct { fields }),
            user_agent_name: "mesh-proxy".into(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            )),
            ..Default::default()
        };
        Self {
            targets: config.xds.clone(),
            api: config.xds_api,
            node,
            store,
            metrics,
            status: Arc::default(),
            tls,
            on_demand,
        }
    }

    /// Runs until the task is dropped.
    pub async fn run(self) {
        let mut cache = match self.on_demand {
            Some(_) => Cache::scoped(),
            None => Cache::default(),
        };
        let mut lookups = self.on_demand.as_ref().and_then(|od| od.requests());
        let mut publisher = Publisher::default();
        let mut servers = Servers::new(self.targets.clone());
        loop {
            let addr = match servers.pick().await {
                Ok(a) => a,
                Err(e) => {
                    let delay = servers.unresolved();
                    self.down(&StreamError::Servers(e), delay);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            if let Ok(mut s) = self.status.lock() {
                s.streams_opened += 1;
            }
            let opened = Instant::now();
            let mut got_response = false;
            let result = match self.api {
                XdsApi::Delta => {
                    let mut stream = Stream {
                        cache: &mut cache,
                        publisher: &mut publisher,
                        lookups: lookups.as_mut(),
                    };
                    self.delta(addr, &mut stream, &mut got_response).await
                }
                XdsApi::Sotw => {
                    self.sotw(addr, &mut cache, &mut publisher, &mut got_response)
                        .await
                }
            };
            self.metrics.xds_connected.set(0);
            let err = match result {
                Ok(()) => StreamError::Closed,
                Err(e) => e,
            };
            let worked = got_response && opened.elapsed() >= WORKED_AFTER;
            match servers.ended(addr, worked) {
                After::Now => self.down(&err, Duration::ZERO),
                After::Wait(delay) => {
                    self.down(&err, delay);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn down(&self, err: &StreamError, retry: Duration) {
        if let Ok(mut s) = self.status.lock() {
            s.connected = false;
            s.last_stream_error = Some(err.to_string());
        }
        warn!(error = %err, retry_ms = retry.as_millis() as u64, "xDS stream down; serving the last good config");
    }

    async fn channel(&self, addr: SocketAddr) -> Result<Channel, StreamError> {
        if let Some((mesh, config)) = &self.tls {
            // The controller wants a client certificate: wait for the first one.
            while !mesh.identity.has_valid_svid() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return Ok(mesh_api::tls::grpc::channel(
                addr.to_string(),
                config.clone(),
                CONNECT_TIMEOUT,
            ));
        }
        Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| StreamError::Uri { addr, source })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(mesh_api::tls::grpc::KEEPALIVE_INTERVAL)
            .keep_alive_timeout(mesh_api::tls::grpc::KEEPALIVE_TIMEOUT)
            .connect()
            .await
            .map_err(|source| StreamError::Connect { addr, source })
    }

    fn connected(&self, addr: SocketAddr) {
        self.metrics.xds_connected.set(1);
        if let Ok(mut s) = self.status.lock() {
            s.connected = true;
            s.controller = Some(addr);
        }
        info!(controller = %addr, api = ?self.api, "xDS stream open");
    }

    fn record(&self, ty: Type, cache: &Cache, result: &Result<(), String>) {
        let label = if result.is_ok() { "ack" } else { "nack" };
        self.metrics
            .xds_updates
            .get_or_create(&XdsLabels {
                xds_type: ty.short(),
                result: label,
            })
            .inc();
        if let Ok(mut s) = self.status.lock() {
            let t = s.types.entry(ty.short()).or_default();
            t.resources = cache.names(ty).len();
            match result {
                Ok(()) => t.acks += 1,
                Err(e) => {
                    t.nacks += 1;
                    t.last_nack = Some(e.clone());
                }
            }
        }
        if let Err(e) = result {
            warn!(xds_type = ty.short(), error = %e, "NACK");
        }
    }

    /// The next response of a type we know, with that type (`None`: the controller closed the
    /// stream). Meanwhile an incomplete config that waited long enough is published, and a
    /// response of an unknown type is refused with `refuse(type_url, nonce)`.
    async fn next<T: Response, R>(
        &self,
        inbound: &mut tonic::Streaming<T>,
        cache: &mut Cache,
        publisher: &mut Publisher,
        tx: &mpsc::UnboundedSender<R>,
        refuse: impl Fn(String, String, RpcStatus) -> R,
    ) -> Result<Option<(Type, T)>, StreamError> {
        loop {
            let resp = tokio::select! {
                msg = inbound.message() => match msg? {
                    Some(r) => r,
                    None => return Ok(None),
                },
                () = publisher.wait() => {
                    publisher.expire(cache, &self.store, &self.metrics);
                    if let Some(od) = &self.on_demand {
                        od.notify();
                    }
                    continue;
                }
            };
            let url = resp.type_url().to_string();
            match Type::from_url(&url) {
                Some(ty) => return Ok(Some((ty, resp))),
                None => {
                    let detail = nack(format!("type {url} is not supported"));
                    let _ = tx.unbounded_send(refuse(url, resp.nonce().to_string(), detail));
                }
            }
        }
    }

    async fn delta(
        &self,
        addr: SocketAddr,
        stream: &mut Stream<'_>,
        got_response: &mut bool,
    ) -> Result<(), StreamError> {
        let Stream {
            cache,
            publisher,
            lookups,
        } = stream;
        let channel = self.channel(addr).await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        let (tx, rx) = mpsc::unbounded::<DeltaDiscoveryRequest>();
        let mut subs: BTreeMap<Type, BTreeSet<String>> = BTreeMap::new();
        // CDS before LDS, as Envoy does, so clusters are known when routes name them. Scoped,
        // the wildcard ("*") comes with the names subscribed to on top of it.
        for ty in [Type::Cluster, Type::Listener] {
            let names: BTreeSet<String> = match (&self.on_demand, ty) {
                (None, _) => BTreeSet::new(),
                (Some(_), Type::Cluster) => cache.wanted(ty).clone(),
                (Some(od), _) => od.names().into_iter().collect(),
            };
            let subscribe = match &self.on_demand {
                Some(_) => std::iter::once("*".to_string())
                    .chain(names.iter().cloned())
                    .collect(),
                None => Vec::new(),
            };
            let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: ty.url(),
                resource_names_subscribe: subscribe,
                initial_resource_versions: cache.versions(ty),
                ..Default::default()
            });
            subs.insert(ty, names);
        }
        for ty in Type::BY_NAME {
            let wanted = cache.wanted(ty).clone();
            if !wanted.is_empty() {
                let versions = cache.versions(ty);
                let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: ty.url(),
                    resource_names_subscribe: wanted.iter().cloned().collect(),
                    initial_resource_versions: versions
                        .into_iter()
                        .filter(|(k, _)| wanted.contains(k))
                        .collect(),
                    ..Default::default()
                });
                subs.insert(ty, wanted);
            }
        }
        let mut inbound = client.delta_aggregated_resources(rx).await?.into_inner();
        self.connected(addr);
        loop {
            let refuse = |type_url, response_nonce, detail| DeltaDiscoveryRequest {
                type_url,
                response_nonce,
                error_detail: Some(detail),
                ..Default::default()
            };
            let next = self.next(&mut inbound, cache, publisher, &tx, refuse);
            // A destination to look up arrives between responses; `next` is cancel-safe.
            let event = match lookups.as_mut() {
                Some(l) => tokio::select! {
                    r = next => r?.map(Event::Response),
                    req = l.next() => req.map(Event::Lookup),
                },
                None => next.await?.map(Event::Response),
            };
            let (ty, resp) = match event {
                None => return Ok(()),
                Some(Event::Lookup(req)) => {
                    let held = subs.entry(Type::Listener).or_default();
                    let (subscribe, unsubscribe) = match req {
                        Request::Lookup(dst) => {
                            let name = mesh_api::consts::xds::address_listener(dst);
                            debug!(%dst, "looking up a destination");
                            (held.insert(name.clone()).then_some(name), Vec::new())
                        }
                        // The controller answers with the removal of what it no longer
                        // sends (it may still send one to the whole workload): what the
                        // proxy holds is always what the controller says.
                        Request::Forget(gone) => {
                            let names: Vec<String> = gone
                                .into_iter()
                                .map(mesh_api::consts::xds::address_listener)
                                .filter(|n| held.remove(n))
                                .collect();
                            (None, names)
                        }
                    };
                    if subscribe.is_some() || !unsubscribe.is_empty() {
                        let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                            node: Some(self.node.clone()),
                            type_url: Type::Listener.url(),
                            resource_names_subscribe: subscribe.into_iter().collect(),
                            resource_names_unsubscribe: unsubscribe,
                            ..Default::default()
                        });
                    }
                    continue;
                }
                Some(Event::Response(r)) => r,
            };
            *got_response = true;
            let mut removed = resp.removed_resources.clone();
            let mut updated = Vec::with_capacity(resp.resources.len());
            for r in resp.resources {
                match r.resource {
                    Some(body) => updated.push(Incoming {
                        name: r.name,
                        version: r.version,
                        body,
                    }),
                    None => removed.push(r.name),
                }
            }
            debug!(
                xds_type = ty.short(),
                updated = updated.len(),
                removed = removed.len(),
                "delta response"
            );
            // Listeners it held that the controller removed (not: names it says do not exist).
            let held_before: BTreeSet<&String> = match (&self.on_demand, ty) {
                (Some(_), Type::Listener) => {
                    removed.iter().filter(|n| cache.holds(ty, n)).collect()
                }
                _ => BTreeSet::new(),
            };
            let result = cache
                .apply(ty, &updated, &removed)
                .map_err(|e| e.to_string());
            if result.is_ok() {
                cache.note_revision(ty, &resp.system_version_info);
            }
            self.record(ty, cache, &result);
            if let (Some(_), Type::Cluster, Ok(())) = (&self.on_demand, ty, &result) {
                cache.note_wildcard(&updated, &removed, subs.entry(ty).or_default());
            }
            if let (Some(od), Type::Listener, Ok(())) = (&self.on_demand, ty, &result) {
                let address = |n: &String| mesh_api::consts::xds::parse_address_listener(n);
                for a in updated.iter().filter_map(|r| address(&r.name)) {
                    od.present(a);
                }
                for n in &removed {
                    match address(n) {
                        Some(a) if held_before.contains(n) => od.gone(a),
                        Some(a) => od.absent(a),
                        None => {}
                    }
                }
            }
            // Run the config before acknowledging it: an ACK tells the controller (and
            // whoever watches it) that the proxy routes by what it sent.
            publisher.offer(cache, &self.store, &self.metrics);
            let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: result.err().map(nack),
                ..Default::default()
            });
            // Routes first: dropping one changes the clusters wanted, and those the endpoints.
            for ty in [Type::Route, Type::Cluster, Type::Endpoint, Type::Secret] {
                let had = subs.entry(ty).or_default();
                let Some(wanted) = cache.subscription_change(ty, had) else {
                    continue;
                };
                let _ = tx.unbounded_send(DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: ty.url(),
                    resource_names_subscribe: wanted.difference(had).cloned().collect(),
                    resource_names_unsubscribe: had.difference(&wanted).cloned().collect(),
                    ..Default::default()
                });
                cache.retain_subscribed(ty, &wanted);
                *had = wanted;
            }
            publisher.offer(cache, &self.store, &self.metrics);
            if let Some(od) = &self.on_demand {
                od.notify();
            }
        }
    }

    async fn sotw(
        &self,
        addr: SocketAddr,
        cache: &mut Cache,
        publisher: &mut Publisher,
        got_response: &mut bool,
    ) -> Result<(), StreamError> {
        let channel = self.channel(addr).await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024);
        let (tx, rx) = mpsc::unbounded::<DiscoveryRequest>();
        #[derive(Default)]
        struct TypeState {
            version: String,
            nonce: String,
            names: BTreeSet<String>,
        }
        let mut state: BTreeMap<Type, TypeState> = BTreeMap::new();
        for ty in [Type::Cluster, Type::Listener] {
            let _ = tx.unbounded_send(DiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: ty.url(),
                ..Default::default()
            });
        }
        for ty in Type::BY_NAME {
            let wanted = cache.wanted(ty).clone();
            if !wanted.is_empty() {
                let _ = tx.unbounded_send(DiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: ty.url(),
                    resource_names: wanted.iter().cloned().collect(),
                    ..Default::default()
                });
                state.entry(ty).or_default().names = wanted;
            }
        }
        let mut inbound = client.stream_aggregated_resources(rx).await?.into_inner();
        self.connected(addr);
        loop {
            let refuse = |type_url, response_nonce, detail| DiscoveryRequest {
                type_url,
                response_nonce,
                error_detail: Some(detail),
                ..Default::default()
            };
            let Some((ty, resp)) = self
                .next(&mut inbound, cache, publisher, &tx, refuse)
                .await?
            else {
                return Ok(());
            };
            *got_response = true;
            let mut updated = Vec::with_capacity(resp.resources.len());
            let mut decode_error = None;
            for body in resp.resources {
                match resource_name(ty, &body) {
                    Ok(name) => updated.push(Incoming {
                        name,
                        version: resp.version_info.clone(),
                        body,
                    }),
                    Err(e) => decode_error = Some(e),
                }
            }
            let result = match decode_error {
                Some(e) => Err(e),
                None => {
                    let removed = if ty.wildcard() {
                        cache.full_state_removals(ty, &updated)
                    } else {
                        Vec::new()
                    };
                    cache
                        .apply(ty, &updated, &removed)
                        .map_err(|e| e.to_string())
                }
            };
            if result.is_ok() {
                cache.note_revision(ty, &resp.version_info);
            }
            self.record(ty, cache, &result);
            // Run the config before acknowledging it (see the delta stream).
            publisher.offer(cache, &self.store, &self.metrics);
            let st = state.entry(ty).or_default();
            st.nonce = resp.nonce.clone();
            if result.is_ok() {
                st.version = resp.version_info.clone();
            }
            let _ = tx.unbounded_send(DiscoveryRequest {
                version_info: st.version.clone(),
                resource_names: st.names.iter().cloned().collect(),
                type_url: resp.type_url,
                response_nonce: resp.nonce,
                error_detail: result.err().map(nack),
                ..Default::default()
            });
            for ty in Type::BY_NAME {
                let st = state.entry(ty).or_default();
                if &st.names == cache.wanted(ty) {
                    continue;
                }
                let wanted = cache.wanted(ty).clone();
                let _ = tx.unbounded_send(DiscoveryRequest {
                    node: Some(self.node.clone()),
                    version_info: st.version.clone(),
                    resource_names: wanted.iter().cloned().collect(),
                    type_url: ty.url(),
                    response_nonce: st.nonce.clone(),
                    ..Default::default()
                });
                cache.retain(ty, &wanted);
                st.names = wanted;
            }
            publisher.offer(cache, &self.store, &self.metrics);
        }
    }
}

/// What a Delta stream works on, kept across streams.
struct Stream<'a> {
    cache: &'a mut Cache,
    publisher: &'a mut Publisher,
    /// Destinations to look up (scoped).
    lookups: Option<&'a mut mpsc::UnboundedReceiver<Request>>,
}

/// What a Delta stream waits for.
enum Event<T> {
    Response((Type, T)),
    Lookup(Request),
}

/// What the stream loop needs of either kind of response.
trait Response {
    fn type_url(&self) -> &str;
    fn nonce(&self) -> &str;
}

impl Response for DeltaDiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn nonce(&self) -> &str {
        &self.nonce
    }
}

impl Response for DiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }

    fn nonce(&self) -> &str {
        &self.nonce
    }
}

fn nack(message: String) -> RpcStatus {
    RpcStatus {
        // INVALID_ARGUMENT
        code: 3,
        message,
        details: Vec::new(),
    }
}

/// Decides when the cache becomes the running snapshot.
#[derive(Debug, Default)]
struct Publisher {
    published: bool,
    incomplete_since: Option<Instant>,
}

impl Publisher {
    fn publish(&mut self, cache: &mut Cache, store: &Store, metrics: &Metrics) {
        let snapshot = cache.snapshot(metrics);
        metrics.config_generation.set(snapshot.generation as i64);
        debug!(generation = snapshot.generation, "config published");
        store.publish(snapshot);
        // After the snapshot runs: a reader that sees revision R for a type knows requests
        // are served by that type's resources of R or later.
        for (ty, r) in cache.revisions() {
            metrics
                .config_revision
                .get_or_create(&XdsTypeLabels {
                    xds_type: ty.short(),
                })
                .set(r as i64);
        }
        self.published = true;
        self.incomplete_since = None;
    }

    fn offer(&mut self, cache: &mut Cache, store: &Store, metrics: &Metrics) {
        if !cache.changed() {
            return;
        }
        if cache.complete() {
            self.publish(cache, store, metrics);
        } else if self.published && self.incomplete_since.is_none() {
            self.incomplete_since = Some(Instant::now());
        }
    }

    /// Resolves when an incomplete update has waited long enough.
    async fn wait(&self) {
        match self.incomplete_since {
            Some(at) => tokio::time::sleep_until((at + WARMING_LIMIT).into()).await,
            None => std::future::pending().await,
        }
    }

    fn expire(&mut self, cache: &mut Cache, store: &Store, metrics: &Metrics) {
        warn!("serving a config with missing routes or endpoints after waiting for them");
        self.publish(cache, store, metrics);
    }
}
