//! The ADS server: state-of-the-world and incremental (Delta) streams over one gRPC service.
//!
//! Each stream is a task that waits on two things: the proxy's requests (subscriptions, ACKs,
//! NACKs) and a new published model revision. Either may lead to responses, sent in the order
//! clusters, endpoints, listeners, routes. A resource is sent again only when its version (a hash
//! of its bytes) changed, and a version a proxy NACKed is not sent to it again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    Resource as PbResource,
};
use envoy_types::pb::google::protobuf::value::Kind as ValueKind;
use futures::Stream;
use mesh_api::consts::node_metadata;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::learned::{Learned, WorkloadKey};
use super::resources::{ProxyView, Resource, ResourceType};
use super::status::{ProxyStatus, StatusTable, StreamStatus};
use super::translate::{ListenerSettings, ProxyId, SdsSource, Translator};
use crate::index::{Index, Model};
use crate::metrics::{Metrics, TypeLabels};

/// A model revision ready to serve, and when the change that led to it was first seen.
#[derive(Clone, Copy, Debug)]
pub struct Published {
    pub revision: u64,
    pub changed_at: Instant,
}

/// What every stream shares: the translator, the published revision, the status table.
#[derive(Debug)]
pub struct Hub {
    translator: Mutex<Translator>,
    published: watch::Sender<Published>,
    pub status: Arc<StatusTable>,
    pub metrics: Arc<Metrics>,
    /// What each workload's scoped proxies looked up.
    pub learned: Arc<Learned>,
}

impl Hub {
    pub fn new(model: Arc<Model>, metrics: Arc<Metrics>) -> Arc<Self> {
        let revision = model.revision;
        metrics.revision.set(revision as i64);
        Arc::new(Self {
            translator: Mutex::new(Translator::new(model)),
            published: watch::Sender::new(Published {
                revision,
                changed_at: Instant::now(),
            }),
            status: Arc::default(),
            metrics,
            learned: Arc::default(),
        })
    }

    fn translator(&self) -> std::sync::MutexGuard<'_, Translator> {
        self.translator.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything `proxy` may be served now, with what its workload learned when scoped.
    pub fn view(&self, proxy: &ProxyId) -> ProxyView {
        let learned = match self.workload(proxy, None) {
            Some(w) => self.learned.of(&w),
            None => BTreeSet::new(),
        };
        self.translator().view_learned(proxy, &learned)
    }

    /// The workload whose learned destinations a scoped proxy shares: its pod's; while the
    /// controller does not know the pod, the one its node `declared`
    /// (`node_metadata::WORKLOAD`), else the pod alone. `None` for a proxy that is not scoped.
    pub fn workload(&self, proxy: &ProxyId, declared: Option<&str>) -> Option<WorkloadKey> {
        if !(proxy.settings.transparent && proxy.settings.scoped) {
            return None;
        }
        let model = self.model();
        let name = match model
            .pods
            .get(&(proxy.namespace.clone(), proxy.name.clone()))
        {
            Some(p) => p.workload.clone(),
            None => declared.unwrap_or(&proxy.name).to_string(),
        };
        Some((proxy.namespace.clone(), name))
    }

    pub fn model(&self) -> Arc<Model> {
        self.translator().model().clone()
    }

    /// Makes `model` the one served and wakes every stream.
    pub fn publish(&self, model: Arc<Model>, changed_at: Instant) {
        let revision = model.revision;
        self.translator().update(model);
        self.metrics.revision.set(revision as i64);
        self.published.send_replace(Published {
            revision,
            changed_at,
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.subscribe()
    }

    pub fn service(self: &Arc<Self>) -> AggregatedDiscoveryServiceServer<AdsService> {
        AggregatedDiscoveryServiceServer::new(AdsService { hub: self.clone() })
            .max_decoding_message_size(16 * 1024 * 1024)
    }
}

/// Waits for index changes, lets a burst settle (at most `max` after its first change, or once
/// `quiet` passes with no further change), then builds and publishes the model.
pub async fn run_publisher(
    index: Arc<Mutex<Index>>,
    hub: Arc<Hub>,
    quiet: Duration,
    max: Duration,
) {
    let mut rx = index.lock().unwrap_or_else(|e| e.into_inner()).subscribe();
    // A change between the first model and this subscription must not wait for the next one.
    if *rx.borrow() != hub.published.borrow().revision {
        rx.mark_changed();
    }
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let first = Instant::now();
        let deadline = tokio::time::Instant::from_std(first + max);
        loop {
            let until = (tokio::time::Instant::now() + quiet).min(deadline);
            match tokio::time::timeout_at(until, rx.changed()).await {
                Ok(Ok(())) if tokio::time::Instant::now() < deadline => continue,
                Ok(Err(_)) => return,
                _ => break,
            }
        }
        rx.borrow_and_update();
        let (index, hub2) = (index.clone(), hub.clone());
        let built = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let model = index.lock().unwrap_or_else(|e| e.into_inner()).model();
            for e in &model.errors {
                warn!(object = %e.object, field = %e.field, reason = %e.reason, "unresolved reference");
            }
            hub2.publish(model.clone(), first);
            hub2.metrics.model_build.observe(started.elapsed().as_secs_f64());
            (model.revision, model.services.len(), started.elapsed())
        })
        .await;
        match built {
            Ok((revision, services, took)) => {
                info!(
                    revision,
                    services,
                    build_ms = took.as_millis() as u64,
                    "published"
                );
            }
            Err(e) => warn!(error = %e, "building the model failed"),
        }
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
pub struct AdsService {
    hub: Arc<Hub>,
}

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Ok(Response::new(Box::pin(AdsStream::<Sotw>::spawn(
            self.hub.clone(),
            request,
        ))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(Box::pin(AdsStream::<Delta>::spawn(
            self.hub.clone(),
            request,
        ))))
    }
}

/// Reads the proxy's identity and listener settings from its `Node`.
pub fn proxy_id(node: &Node) -> Result<ProxyId, String> {
    if node.id.is_empty() {
        return Err("node.id is empty: expected <namespace>/<name>".into());
    }
    let (namespace, name) = match node.id.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => (ns, n),
        Some(_) => {
            return Err(format!(
                "node.id {:?} is not of the form <namespace>/<name>",
                node.id
            ));
        }
        None => ("default", node.id.as_str()),
    };
    let mut settings = ListenerSettings::default();
    let fields = node.metadata.as_ref().map(|m| &m.fields);
    let get = |key: &str| -> Option<String> {
        match fields?.get(key)?.kind.as_ref()? {
            ValueKind::StringValue(s) => Some(s.clone()),
            ValueKind::NumberValue(n) => Some(format!("{n}")),
            ValueKind::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    };
    let bad =
        |key: &str, v: &str, want: &str| format!("node.metadata[{key:?}] = {v:?}: expected {want}");
    if let Some(v) = get(node_metadata::TRANSPARENT) {
        settings.transparent = v
            .parse()
            .map_err(|_| bad(node_metadata::TRANSPARENT, &v, "true or false"))?;
    }
    if let Some(v) = get(node_metadata::MTLS) {
        settings.mtls = v
            .parse()
            .map_err(|_| bad(node_metadata::MTLS, &v, "true or false"))?;
    }
    if let Some(v) = get(node_metadata::SCOPED) {
        settings.scoped = v
            .parse()
            .map_err(|_| bad(node_metadata::SCOPED, &v, "true or false"))?;
        if settings.scoped && !settings.transparent {
            return Err(bad(
                node_metadata::SCOPED,
                &v,
                "false: destinations are looked up by address, which needs mesh.dev/transparent \"true\"",
            ));
        }
    }
    if let Some(v) = get(node_metadata::OUTBOUND_HTTP_ADDR) {
        settings.outbound_http_addr = v
            .parse::<SocketAddr>()
            .map_err(|_| bad(node_metadata::OUTBOUND_HTTP_ADDR, &v, "host:port"))?;
    }
    if let Some(v) = get(node_metadata::INBOUND_ADDR) {
        settings.inbound_addr = v
            .parse()
            .map_err(|_| bad(node_metadata::INBOUND_ADDR, &v, "an IP address"))?;
    }
    if let Some(v) = get(node_metadata::SDS_DIR) {
        if !v.starts_with('/') {
            return Err(bad(
                node_metadata::SDS_DIR,
                &v,
                "an absolute directory path",
            ));
        }
        settings.sds = SdsSource::Dir(v.trim_end_matches('/').to_string());
    }
    if let Some(v) = get(node_metadata::SDS_AGENT) {
        let agent: bool = v
            .parse()
            .map_err(|_| bad(node_metadata::SDS_AGENT, &v, "true or false"))?;
        if agent && matches!(settings.sds, SdsSource::Dir(_)) {
            return Err(bad(
                node_metadata::SDS_AGENT,
                &v,
                "false: the secrets come from mesh.dev/sds-dir or from the agent, not both",
            ));
        }
        if agent {
            settings.sds = SdsSource::Agent;
        }
    }
    if let Some(v) = get(node_metadata::GATEWAY) {
        if crate::objects::validate_dns_label(&v, "", 253).is_err() {
            return Err(bad(
                node_metadata::GATEWAY,
                &v,
                "the name of a Gateway in the node's namespace",
            ));
        }
        if settings.transparent {
            return Err(bad(
                node_metadata::GATEWAY,
                &v,
                "no gateway on a transparent proxy: a Gateway's proxy takes traffic on its listeners",
            ));
        }
        settings.gateway = Some(v);
    }
    if let Some(v) = get(node_metadata::GATEWAY_ADDR) {
        settings.gateway_addr = v
            .parse()
            .map_err(|_| bad(node_metadata::GATEWAY_ADDR, &v, "an IP address"))?;
    }
    for (key, slot) in [
        (node_metadata::OUTBOUND_PORT, &mut settings.outbound_port),
        (node_metadata::INBOUND_PORT, &mut settings.inbound_port),
    ] {
        if let Some(v) = get(key) {
            *slot = v.parse().map_err(|_| bad(key, &v, "a port number"))?;
        }
    }
    Ok(ProxyId {
        namespace: namespace.to_string(),
        name: name.to_string(),
        settings,
    })
}

/// What both stream kinds keep once the first request named the node.
struct Session {
    proxy: ProxyId,
    /// A scoped proxy's share in what its workload learned. Before `status`: what it held
    /// is let go before the stream leaves `/debug/proxies`.
    learning: Option<Learning>,
    status: StreamStatus,
    view: ProxyView,
    /// The view served from before the last publish.
    prev: Option<ProxyView>,
    published: watch::Receiver<Published>,
}

/// A scoped proxy's stream: the learned destinations its view was built with, and those it
/// holds by name (let go when the stream ends).
struct Learning {
    learned: Arc<Learned>,
    workload: WorkloadKey,
    /// Ticks when the workload's learned set changes.
    changed: watch::Receiver<u64>,
    /// The set the current view was built with.
    used: BTreeSet<SocketAddr>,
    holding: BTreeSet<SocketAddr>,
}

impl Learning {
    /// Notes the proxy's subscription changes of address listeners; `exists` tells whether
    /// the controller has a listener of that name.
    fn subscribed(
        &mut self,
        subscribe: &[String],
        unsubscribe: &[String],
        exists: impl Fn(&str) -> bool,
    ) {
        let now = Instant::now();
        self.now_existing(subscribe.iter().map(String::as_str), exists);
        let addr = |n: &String| mesh_api::consts::xds::parse_address_listener(n);
        for a in unsubscribe.iter().filter_map(addr) {
            if self.holding.remove(&a) {
                self.learned.release(&self.workload, a, now, false);
            }
        }
    }

    /// Holds the address listeners among `names` that exist and are not held yet: those
    /// subscribed to now, and on a publish those that did not exist when they were asked for
    /// (a Service created at an address a proxy already looked up).
    fn now_existing<'a>(
        &mut self,
        names: impl Iterator<Item = &'a str>,
        exists: impl Fn(&str) -> bool,
    ) {
        let now = Instant::now();
        for name in names {
            if let Some(a) = mesh_api::consts::xds::parse_address_listener(name)
                && !self.holding.contains(&a)
                && exists(name)
            {
                self.holding.insert(a);
                self.learned.hold(&self.workload, a, now);
            }
        }
    }
}

impl Drop for Learning {
    fn drop(&mut self) {
        let now = Instant::now();
        for a in std::mem::take(&mut self.holding) {
            self.learned.release(&self.workload, a, now, true);
        }
    }
}

/// Over TLS, the node a proxy names must be its certificate's: the same namespace and, when
/// the pod is known, the pod's service account.
pub fn check_node(
    proxy: &ProxyId,
    client: &mesh_api::SpiffeId,
    model: &Model,
) -> Result<(), String> {
    let (ns, sa) = client
        .namespace_and_account()
        .map_err(|e| format!("client certificate: {e}"))?;
    if ns != proxy.namespace {
        return Err(format!(
            "node {}/{} is in namespace {:?}, but the client certificate is {client}",
            proxy.namespace, proxy.name, proxy.namespace
        ));
    }
    if let Some(g) = &proxy.settings.gateway {
        let want = mesh_api::consts::identity::gateway_service_account(g);
        if sa != want {
            return Err(format!(
                "node {}/{} asks for Gateway {}/{g}, whose proxies run as service account {want:?}, but the client certificate is {client}",
                proxy.namespace, proxy.name, proxy.namespace
            ));
        }
    }
    if let Some(pod) = model
        .pods
        .get(&(proxy.namespace.clone(), proxy.name.clone()))
        && pod.service_account != sa
    {
        return Err(format!(
            "pod {}/{} runs as service account {:?}, but the client certificate is {client}",
            proxy.namespace, proxy.name, pod.service_account
        ));
    }
    Ok(())
}

/// The client's name and version as its node says: `mesh-proxy 0.1.0` (a version string), or
/// `envoy 1.40.0` (Envoy sends its build's semantic version).
fn user_agent(node: &envoy_types::pb::envoy::config::core::v3::Node) -> String {
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    let version = match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentVersion(v)) => v.clone(),
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .map(|v| format!("{}.{}.{}", v.major_number, v.minor_number, v.patch))
            .unwrap_or_default(),
        None => String::new(),
    };
    format!("{} {version}", node.user_agent_name)
        .trim()
        .to_string()
}

fn metadata_string(node: &Node, key: &str) -> Option<String> {
    node.metadata
        .as_ref()
        .and_then(|m| m.fields.get(key))
        .and_then(|v| match &v.kind {
            Some(ValueKind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

impl Session {
    fn open(
        hub: &Hub,
        node: Option<&Node>,
        client: Option<&mesh_api::SpiffeId>,
        peer: Option<std::net::SocketAddr>,
        protocol: &'static str,
    ) -> Result<Self, Status> {
        let node =
            node.ok_or_else(|| Status::invalid_argument("the first request must carry node"))?;
        let proxy = proxy_id(node).map_err(Status::invalid_argument)?;
        if proxy.settings.scoped && protocol != "delta" {
            return Err(Status::invalid_argument(format!(
                "node.metadata[{:?}] = \"true\" over {protocol}: a scoped proxy subscribes by name on top of its wildcard, which needs Delta xDS",
                node_metadata::SCOPED
            )));
        }
        if let Some(client) = client {
            check_node(&proxy, client, &hub.model()).map_err(|e| {
                hub.metrics.node_refused.inc();
                Status::permission_denied(e)
            })?;
        }
        let mut published = hub.subscribe();
        published.borrow_and_update();
        let declared = metadata_string(node, node_metadata::WORKLOAD);
        let learning = hub.workload(&proxy, declared.as_deref()).map(|workload| {
            let mut changed = hub.learned.changed(&workload);
            changed.borrow_and_update();
            Learning {
                learned: hub.learned.clone(),
                used: hub.learned.of(&workload),
                workload,
                changed,
                holding: BTreeSet::new(),
            }
        });
        let view = hub.translator().view_learned(
            &proxy,
            &learning
                .as_ref()
                .map(|l| l.used.clone())
                .unwrap_or_default(),
        );
        let status = StreamStatus::register(
            hub.status.clone(),
            hub.metrics.clone(),
            ProxyStatus {
                node: node.id.clone(),
                namespace: proxy.namespace.clone(),
                name: proxy.name.clone(),
                protocol,
                user_agent: user_agent(node),
                admin: metadata_string(node, node_metadata::ADMIN_ADDR),
                metrics: metadata_string(node, node_metadata::METRICS_ADDR)
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                    .map(|mut a| {
                        if a.ip().is_unspecified()
                            && let Some(p) = peer
                        {
                            a.set_ip(p.ip());
                        }
                        a
                    }),
                connected_at_unix: StreamStatus::now_unix(),
                gateway: proxy
                    .settings
                    .gateway
                    .as_ref()
                    .map(|g| format!("{}/{g}", proxy.namespace)),
                revision: view.revision,
                types: BTreeMap::new(),
            },
        );
        info!(node = %node.id, protocol, "proxy connected");
        Ok(Self {
            proxy,
            status,
            view,
            prev: None,
            published,
            learning,
        })
    }

    /// The view of the current model, with what the workload learned by now.
    fn refresh(&mut self, hub: &Hub) -> ProxyView {
        if let Some(l) = &mut self.learning {
            l.changed.borrow_and_update();
            l.used = l.learned.of(&l.workload);
        }
        self.rebuild(hub)
    }

    /// The view of the current model with the learned set last read.
    fn rebuild(&self, hub: &Hub) -> ProxyView {
        let none = BTreeSet::new();
        let learned = self.learning.as_ref().map_or(&none, |l| &l.used);
        hub.translator().view_learned(&self.proxy, learned)
    }
}

/// The resource a subscription (wildcard and/or names) gets under `name`, if any.
fn wanted<'a>(
    view: &'a ProxyView,
    wildcard: bool,
    names: &BTreeSet<Arc<str>>,
    ty: ResourceType,
    name: &str,
) -> Option<&'a Arc<Resource>> {
    if names.contains(name) {
        view.get(ty, name)
    } else if wildcard {
        view.get_wildcard(ty, name)
    } else {
        None
    }
}

/// A subscribed name, sharing the resource's own string when the resource exists.
fn intern(view: &ProxyView, ty: ResourceType, name: &str) -> Arc<str> {
    view.get(ty, name)
        .map_or_else(|| Arc::from(name), |r| r.name.clone())
}

fn observe_latency(metrics: &Metrics, ty: ResourceType, changed_at: Option<Instant>) {
    if let Some(t) = changed_at {
        metrics
            .push_latency
            .get_or_create(&TypeLabels::new(ty))
            .observe(t.elapsed().as_secs_f64());
    }
}

#[derive(Default)]
struct SotwType {
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// Name to version tag of what the last response held (also when it was NACKed).
    sent: Option<BTreeMap<Arc<str>, u64>>,
    nonce: String,
}

/// What differs between the two ADS variants; the stream loop around it is shared.
trait Variant: Sized + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;
    type TypeState: Default + Send;
    const NAME: &'static str;

    /// The names `ty` is subscribed to, if the stream subscribed to it.
    fn names(
        types: &HashMap<ResourceType, Self::TypeState>,
        ty: ResourceType,
    ) -> Option<&BTreeSet<Arc<str>>>;

    /// Handles a subscription change, ACK or NACK.
    fn on_request(
        s: &mut AdsStream<Self>,
        req: Self::Request,
    ) -> impl std::future::Future<Output = Result<(), Status>> + Send;

    /// Sends what `ty`'s subscription should get now, if anything (always, with `force`).
    /// `incremental`: the view moved one publish forward, so only changed names need a look.
    /// Returns false when the stream is gone.
    fn respond(
        s: &mut AdsStream<Self>,
        ty: ResourceType,
        force: bool,
        changed_at: Option<Instant>,
        incremental: bool,
    ) -> impl std::future::Future<Output = bool> + Send;
}

/// A request's type, the stream's session, and that type's state.
type Begun<'a, V> = (
    ResourceType,
    &'a mut Session,
    &'a mut <V as Variant>::TypeState,
);

/// One ADS stream: its requests, and pushes when a new model is published.
struct AdsStream<V: Variant> {
    hub: Arc<Hub>,
    tx: mpsc::Sender<Result<V::Response, Status>>,
    peer: Option<SocketAddr>,
    client: Option<mesh_api::SpiffeId>,
    session: Option<Session>,
    types: HashMap<ResourceType, V::TypeState>,
    nonce: u64,
}

impl<V: Variant> AdsStream<V> {
    /// Starts the stream's task; its responses come out of the returned stream.
    fn spawn(
        hub: Arc<Hub>,
        request: Request<Streaming<V::Request>>,
    ) -> ReceiverStream<Result<V::Response, Status>> {
        // Over mesh TLS: the client's SPIFFE ID, which its node must match.
        let tls = request
            .extensions()
            .get::<mesh_api::tls::grpc::TlsConnectInfo>();
        let peer = request.remote_addr().or(tls.and_then(|i| i.remote));
        let client = tls.and_then(|i| i.peer.clone());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut s = AdsStream::<V> {
                hub,
                tx,
                peer,
                client,
                session: None,
                types: HashMap::new(),
                nonce: 0,
            };
            let err = s.run(request.into_inner()).await;
            s.finish(err).await;
        });
        ReceiverStream::new(rx)
    }

    async fn run(&mut self, mut reqs: Streaming<V::Request>) -> Option<Status> {
        loop {
            let (changed, learned) = match self.session.as_mut() {
                Some(s) => (
                    Some(&mut s.published),
                    s.learning.as_mut().map(|l| &mut l.changed),
                ),
                None => (None, None),
            };
            let changed = async {
                match changed {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let learned = async {
                match learned {
                    // The sender lives as long as the hub: an error cannot come.
                    Some(l) => {
                        if l.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                req = reqs.message() => match req {
                    Ok(Some(req)) => {
                        if let Err(e) = V::on_request(self, req).await {
                            return Some(e);
                        }
                    }
                    Ok(None) => return None,
                    Err(e) => {
                        debug!(error = %e, "stream ended");
                        return None;
                    }
                },
                alive = changed => {
                    if !alive {
                        return Some(Status::unavailable("control plane shutting down"));
                    }
                    if !self.on_publish().await {
                        return None;
                    }
                }
                () = learned => {
                    if !self.on_learned().await {
                        return None;
                    }
                }
            }
        }
    }

    /// Opens the session on the first request, and finds the state of the request's type.
    fn begin(
        &mut self,
        node: Option<&Node>,
        type_url: &str,
    ) -> Result<Option<Begun<'_, V>>, Status> {
        if self.session.is_none() {
            self.session = Some(Session::open(
                &self.hub,
                node,
                self.client.as_ref(),
                self.peer,
                V::NAME,
            )?);
        }
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Status::internal("no session"))?;
        // A type we do not serve (ECDS, ...) is ignored rather than failing the stream,
        // which would also cut off the types we do serve.
        let Some(ty) = ResourceType::from_type_url(type_url) else {
            debug!(node = %session.status_node(), type_url, "ignoring a type this controller does not serve");
            return Ok(None);
        };
        Ok(Some((ty, session, self.types.entry(ty).or_default())))
    }

    async fn finish(&mut self, err: Option<Status>) {
        if let Some(e) = err {
            warn!(peer = ?self.peer, variant = V::NAME, error = %e.message(), "closing xDS stream");
            let _ = self.tx.send(Err(e)).await;
        }
    }

    /// A new model: push, in make-before-break order, what changed for each subscribed type.
    async fn on_publish(&mut self) -> bool {
        let Some(session) = self.session.as_mut() else {
            return true;
        };
        let published = *session.published.borrow_and_update();
        let view = session.refresh(&self.hub);
        session.prev = Some(std::mem::replace(&mut session.view, view));
        if let (Some(l), Some(st)) = (
            session.learning.as_mut(),
            V::names(&self.types, ResourceType::Listener),
        ) {
            let view = &session.view;
            l.now_existing(st.iter().map(|n| &**n), |n| {
                view.get(ResourceType::Listener, n).is_some()
            });
        }
        for ty in ResourceType::ALL {
            if self.types.contains_key(&ty)
                && !V::respond(self, ty, false, Some(published.changed_at), true).await
            {
                return false;
            }
        }
        if let Some(session) = &self.session {
            session.status.serving(session.view.revision);
        }
        true
    }

    /// What the proxy's workload learned changed: if its set did, push what that changes.
    async fn on_learned(&mut self) -> bool {
        let Some(session) = self.session.as_mut() else {
            return true;
        };
        let Some(l) = session.learning.as_mut() else {
            return true;
        };
        l.changed.borrow_and_update();
        let now = l.learned.of(&l.workload);
        if now == l.used {
            return true;
        }
        l.used = now;
        let view = session.rebuild(&self.hub);
        session.prev = Some(std::mem::replace(&mut session.view, view));
        // Only listeners differ (what they name is served by name either way); at the same
        // revision every one is compared (few, for a scoped proxy).
        let ty = ResourceType::Listener;
        !self.types.contains_key(&ty) || V::respond(self, ty, false, None, false).await
    }
}

// ---- state of the world ---------------------------------------------------------------------

struct Sotw;

impl Variant for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    type TypeState = SotwType;
    const NAME: &'static str = "sotw";

    fn names(
        types: &HashMap<ResourceType, SotwType>,
        ty: ResourceType,
    ) -> Option<&BTreeSet<Arc<str>>> {
        types.get(&ty).map(|t| &t.names)
    }

    async fn on_request(s: &mut AdsStream<Self>, req: DiscoveryRequest) -> Result<(), Status> {
        let Some((ty, session, st)) = s.begin(req.node.as_ref(), &req.type_url)? else {
            return Ok(());
        };
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.nonce {
                // An answer to a response that has since been superseded.
                return Ok(());
            }
            let error = req.error_detail.as_ref().map(|e| e.message.clone());
            if let Some(e) = &error {
                warn!(node = %session.status_node(), xds_type = ty.short(), error = %e, "NACK");
            }
            session
                .status
                .answered(ty, &req.response_nonce, &req.version_info, error);
        }
        let names: BTreeSet<Arc<str>> = req
            .resource_names
            .iter()
            .map(|n| intern(&session.view, ty, n))
            .collect();
        let first = st.sent.is_none();
        // An empty list means "everything" on the first request (and while it stays the
        // wildcard); after an explicit list it means "nothing".
        let wildcard = ty.wildcard_allowed()
            && (names.contains("*") || (names.is_empty() && (first || st.wildcard)));
        let changed = first || names != st.names || wildcard != st.wildcard;
        st.names = names;
        st.wildcard = wildcard;
        if changed {
            Self::respond(s, ty, true, None, false).await;
        }
        Ok(())
    }

    /// Sends the current set for `ty` if it differs from the last one sent, or if `force`.
    async fn respond(
        s: &mut AdsStream<Self>,
        ty: ResourceType,
        force: bool,
        changed_at: Option<Instant>,
        incremental: bool,
    ) -> bool {
        let Some(session) = s.session.as_ref() else {
            return true;
        };
        let Some(st) = s.types.get_mut(&ty) else {
            return true;
        };
        // After one revision step, look only at what may have changed; SotW then resends the
        // whole set, but only when something in it did change.
        if !force
            && incremental
            && let (Some(prev), Some(sent)) = (session.prev.as_ref(), st.sent.as_ref())
            && let Some(candidates) = session.view.candidates(ty, prev)
        {
            let differs = candidates.iter().any(|name| {
                match (
                    wanted(&session.view, st.wildcard, &st.names, ty, name),
                    sent.get(*name),
                ) {
                    (Some(r), Some(v)) => r.tag != *v,
                    (None, None) => false,
                    _ => true,
                }
            });
            if !differs {
                return true;
            }
        }
        let mut chosen: BTreeMap<&str, &Arc<Resource>> = if st.wildcard {
            session.view.wildcard(ty)
        } else {
            BTreeMap::new()
        };
        for name in &st.names {
            if let Some(r) = session.view.get(ty, name) {
                chosen.insert(&*r.name, r);
            }
        }
        let versions: BTreeMap<Arc<str>, u64> =
            chosen.values().map(|r| (r.name.clone(), r.tag)).collect();
        if !force && st.sent.as_ref() == Some(&versions) {
            return true;
        }
        s.nonce += 1;
        st.nonce = s.nonce.to_string();
        let version = session.view.revision.to_string();
        let resp = DiscoveryResponse {
            version_info: version.clone(),
            resources: chosen.values().map(|r| r.any.clone()).collect(),
            type_url: ty.type_url(),
            nonce: st.nonce.clone(),
            ..Default::default()
        };
        session.status.sent(ty, &version, &st.nonce, versions.len());
        // Clusters that changed are warmed again by Envoy, which then waits for their
        // endpoints: send EDS in full next, even if the endpoints did not change.
        let updated_cluster = ty == ResourceType::Cluster
            && st.sent.as_ref().is_some_and(|old| {
                versions
                    .iter()
                    .any(|(n, v)| old.get(n).is_some_and(|o| o != v))
            });
        st.sent = Some(versions);
        if updated_cluster && let Some(eds) = s.types.get_mut(&ResourceType::Endpoint) {
            eds.sent = None;
        }
        observe_latency(&s.hub.metrics, ty, changed_at);
        s.tx.send(Ok(resp)).await.is_ok()
    }
}

// ---- incremental (Delta) ----------------------------------------------------------------------

struct Delta;

impl Variant for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    type TypeState = DeltaType;
    const NAME: &'static str = "delta";

    fn names(
        types: &HashMap<ResourceType, DeltaType>,
        ty: ResourceType,
    ) -> Option<&BTreeSet<Arc<str>>> {
        types.get(&ty).map(|t| &t.names)
    }

    async fn on_request(s: &mut AdsStream<Self>, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        let Some((ty, session, st)) = s.begin(req.node.as_ref(), &req.type_url)? else {
            return Ok(());
        };
        if !req.response_nonce.is_empty() {
            let error = req.error_detail.as_ref().map(|e| e.message.clone());
            if let Some(e) = &error {
                warn!(node = %session.status_node(), xds_type = ty.short(), error = %e, "NACK");
            }
            let version = session.view.revision.to_string();
            session
                .status
                .answered(ty, &req.response_nonce, &version, error);
            if req.resource_names_subscribe.is_empty() && req.resource_names_unsubscribe.is_empty()
            {
                return Ok(());
            }
        }
        let scoped = session.learning.is_some();
        if ty == ResourceType::Listener
            && let Some(l) = session.learning.as_mut()
        {
            let view = &session.view;
            l.subscribed(
                &req.resource_names_subscribe,
                &req.resource_names_unsubscribe,
                |n| view.get(ty, n).is_some(),
            );
        }
        let first = !st.started;
        st.started = true;
        if first {
            // A version this controller did not write cannot match; it is resent.
            st.known
                .extend(req.initial_resource_versions.iter().map(|(name, v)| {
                    (
                        intern(&session.view, ty, name),
                        Resource::parse_version(v).unwrap_or(0),
                    )
                }));
            if ty.wildcard_allowed() && req.resource_names_subscribe.is_empty() {
                st.wildcard = true;
            }
        }
        for name in req.resource_names_subscribe {
            if name == "*" {
                st.wildcard |= ty.wildcard_allowed();
            } else {
                let name = intern(&session.view, ty, &name);
                st.recheck.insert(name.clone());
                st.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            if name == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(name.as_str());
                // A scoped proxy is told: what it holds stays known, and the response below
                // (which compares everything) removes it unless its wildcard still carries
                // it, in which case it keeps it as it is; so it never guesses what to drop.
                // Others drop what they unsubscribe, as Envoy does, and a name the wildcard
                // carries is then sent again.
                if !scoped {
                    st.known.remove(name.as_str());
                }
            }
        }
        Self::respond(s, ty, first, None, false).await;
        Ok(())
    }

    /// Sends what changed for `ty` since the proxy's known versions; with `force`, also an empty
    /// response (a first request expects an answer).
    async fn respond(
        s: &mut AdsStream<Self>,
        ty: ResourceType,
        force: bool,
        changed_at: Option<Instant>,
        incremental: bool,
    ) -> bool {
        let Some(session) = s.session.as_ref() else {
            return true;
        };
        let Some(st) = s.types.get_mut(&ty) else {
            return true;
        };
        let mut send: Vec<&Arc<Resource>> = Vec::new();
        let mut removed: Vec<Arc<str>> = Vec::new();
        let prev = session.prev.as_ref().filter(|_| incremental && !force);
        match prev.and_then(|p| session.view.candidates(ty, p)) {
            // One revision step: only names that may have changed.
            Some(candidates) => {
                let mut candidates: BTreeSet<&str> = candidates.into_iter().collect();
                candidates.extend(st.recheck.iter().map(|n| &**n));
                for name in candidates {
                    match wanted(&session.view, st.wildcard, &st.names, ty, name) {
                        Some(r) if st.known.get(name) != Some(&r.tag) => send.push(r),
                        Some(_) => {}
                        None => {
                            if let Some((k, _)) = st.known.get_key_value(name) {
                                removed.push(k.clone());
                            } else if st.names.contains(name)
                                && let Some(k) = st.recheck.get(name)
                            {
                                removed.push(k.clone());
                            }
                        }
                    }
                }
            }
            None => {
                let mut desired: BTreeMap<&str, &Arc<Resource>> = if st.wildcard {
                    session.view.wildcard(ty)
                } else {
                    BTreeMap::new()
                };
                for name in &st.names {
                    if let Some(r) = session.view.get(ty, name) {
                        desired.insert(&*r.name, r);
                    }
                }
                send = desired
                    .values()
                    .filter(|r| st.known.get(&*r.name) != Some(&r.tag))
                    .copied()
                    .collect();
                removed = st
                    .known
                    .keys()
                    .chain(st.recheck.iter().filter(|n| st.names.contains(*n)))
                    .filter(|name| !desired.contains_key(&***name))
                    .cloned()
                    .collect();
                removed.sort();
                removed.dedup();
            }
        }
        if send.is_empty() && removed.is_empty() && !force {
            return true;
        }
        st.recheck.clear();
        // Clusters that changed are warmed again by Envoy, which then waits for their
        // endpoints: look at those again on the next EDS response.
        let updated_clusters: Vec<Arc<str>> = if ty == ResourceType::Cluster {
            send.iter()
                .filter(|r| st.known.contains_key(&*r.name))
                .map(|r| r.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        for r in &send {
            st.known.insert(r.name.clone(), r.tag);
        }
        for name in &removed {
            st.known.remove(name);
        }
        let resources: Vec<PbResource> = send
            .iter()
            .map(|r| PbResource {
                name: r.name.to_string(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = removed.iter().map(|n| n.to_string()).collect();
        s.nonce += 1;
        st.nonce = s.nonce.to_string();
        let version = session.view.revision.to_string();
        session.status.sent(ty, &version, &st.nonce, st.known.len());
        observe_latency(&s.hub.metrics, ty, changed_at);
        let resp = DeltaDiscoveryResponse {
            system_version_info: version,
            resources,
            type_url: ty.type_url(),
            removed_resources: removed,
            nonce: st.nonce.clone(),
            ..Default::default()
        };
        if let Some(eds) = s.types.get_mut(&ResourceType::Endpoint) {
            for name in updated_clusters {
                eds.known.remove(&name);
                eds.recheck.insert(name);
            }
        }
        s.tx.send(Ok(resp)).await.is_ok()
    }
}

impl Session {
    fn status_node(&self) -> String {
        format!("{}/{}", self.proxy.namespace, self.proxy.name)
    }
}

#[derive(Default)]
struct DeltaType {
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    /// What the proxy holds: name to version tag.
    known: HashMap<Arc<str>, u64>,
    /// Names to look at on the next response whatever changed: newly subscribed names (sent
    /// in `removed_resources` when they do not exist, as the protocol says) and endpoints of
    /// clusters just re-sent (a warming cluster waits for them).
    recheck: BTreeSet<Arc<str>>,
    nonce: String,
    started: bool,
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType;
    use envoy_types::pb::envoy::config::core::v3::{BuildVersion, Node};
    use envoy_types::pb::envoy::r#type::v3::SemanticVersion;

    #[test]
    fn a_user_agent_names_its_version_as_a_string_or_as_envoys_build() {
        let mut node = Node {
            user_agent_name: "envoy".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(
                BuildVersion {
                    version: Some(SemanticVersion {
                        major_number: 1,
                        minor_number: 40,
                        patch: 0,
                    }),
                    metadata: None,
                },
            )),
            ..Default::default()
        };
        assert_eq!(super::user_agent(&node), "envoy 1.40.0");
        node.user_agent_name = "mesh-proxy".into();
        node.user_agent_version_type = Some(UserAgentVersionType::UserAgentVersion("0.1.0".into()));
        assert_eq!(super::user_agent(&node), "mesh-proxy 0.1.0");
        node.user_agent_version_type = None;
        assert_eq!(super::user_agent(&node), "mesh-proxy");
    }
}
