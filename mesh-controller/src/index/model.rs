//! The resolved view of the mesh that translation reads: every Service port with its ready
//! endpoints and its ordered routes. Built by [`super::Index::model`]; parts that did not change
//! since the previous model are the same `Arc`s, so translation can reuse its work for them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::routes::{HeaderModifier, MatchSpec, Redirect, Retry, Rewrite};
use crate::objects::ObjKey;

/// `namespace/name` of a Service (serialized in that form, so it can key a JSON map).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub namespace: String,
    pub name: String,
}

impl SvcKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl Serialize for SvcKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for SvcKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a port speaks, from `appProtocol` or the port name's prefix (as Istio reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Protocol {
    /// Not declared: detected per connection.
    Unknown,
    Http,
    /// HTTP/2 without TLS (`kubernetes.io/h2c`).
    Http2,
    Grpc,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    pub fn from_port(app_protocol: Option<&str>, name: &str) -> Self {
        let declared = app_protocol.unwrap_or_else(|| name.split('-').next().unwrap_or(""));
        match declared.to_ascii_lowercase().as_str() {
            "http" | "http1" | "https" => Protocol::Http,
            "kubernetes.io/h2c" | "h2c" | "http2" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "tcp" | "tls" | "mysql" | "mongo" | "redis" | "postgres" | "kubernetes.io/ws"
            | "kubernetes.io/wss" => Protocol::Tcp,
            _ => Protocol::Unknown,
        }
    }

    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `namespace/name` of the Pod behind it, when the EndpointSlice says.
    pub pod: Option<String>,
    /// That Pod as the index holds it (identity, labels, workload), so a Pod change changes
    /// the Service it backs.
    #[serde(skip)]
    pub peer: Option<Arc<PodModel>>,
    /// Not ready but still serving, its Pod on the way out (EndpointSlice `serving` and
    /// `terminating`): used only while no ready endpoint is there.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
    /// Its DNS label under a headless Service (EndpointSlice `hostname`: a StatefulSet pod's
    /// name), which names its per-endpoint cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Where a weighted share of a route's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedBackend {
    /// Cluster name, or `None` when the reference does not resolve: that share gets a 500.
    pub cluster: Option<String>,
    pub weight: u32,
    #[serde(skip)]
    pub request_headers: HeaderModifier,
    #[serde(skip)]
    pub response_headers: HeaderModifier,
    /// What the backend's TrafficPolicy hashes requests by (session affinity): a route
    /// carries it, since Envoy reads the hash key from the route.
    pub hash: Option<super::traffic::HashKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum RouteAction {
    Forward(Vec<WeightedBackend>),
    Redirect(Redirect),
    /// A direct response with this status (a rule with no usable backend).
    Fail(u16),
}

/// One match of one rule, resolved: Envoy tries these in order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteEntry {
    /// The route and rule it came from, for logs and `/debug`.
    pub source: String,
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    pub action: RouteAction,
    #[serde(skip)]
    pub request_headers: HeaderModifier,
    #[serde(skip)]
    pub response_headers: HeaderModifier,
    pub rewrite: Option<Rewrite>,
    /// `(cluster, share in millionths)`.
    pub mirrors: Vec<(String, u32)>,
    pub timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    /// The rule's FaultInjection, read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Arc<super::fault::Fault>>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PortModel {
    pub port: u16,
    pub name: String,
    pub protocol: Protocol,
    /// The Service's `targetPort` as a number, when it is one.
    pub target_port: Option<u16>,
    /// The Service's `targetPort` as a container port name, when it is one.
    pub target_port_name: Option<String>,
    /// Ready endpoints, and terminating ones still serving, sorted.
    pub endpoints: Arc<Vec<Endpoint>>,
    /// Routes from the Service's own namespace (producer routes), in precedence order. Empty: all
    /// traffic goes to the Service itself.
    pub routes: Arc<Vec<RouteEntry>>,
    /// Routes from other namespaces, which apply only to clients in that namespace (GAMMA
    /// consumer routes), in precedence order.
    pub consumer_routes: BTreeMap<String, Arc<Vec<RouteEntry>>>,
    /// What TrafficPolicies say of this port's endpoints.
    pub traffic: Option<Arc<super::traffic::ClusterPolicy>>,
    /// The retry of requests no route takes (a TrafficPolicy on the Service).
    pub retry: Option<super::routes::Retry>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceModel {
    pub key: SvcKey,
    pub cluster_ip: Option<IpAddr>,
    pub ports: Vec<PortModel>,
    #[serde(skip)]
    pub selector: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodModel {
    pub namespace: String,
    pub name: String,
    pub ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// The workload it belongs to (`mesh_api::workload::name`), for metrics.
    pub workload: String,
    /// Container ports by name, to resolve named `targetPort`s.
    pub named_ports: BTreeMap<String, u16>,
    /// What its `mesh.dev/dependencies` annotation names.
    pub dependencies: BTreeSet<super::dependencies::Dependency>,
}

/// A reference that could not be resolved: the route still applies, without that part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResolveError {
    pub object: ObjKey,
    pub field: String,
    pub reason: String,
    /// The Gateway API condition reason it puts in the route's status.
    #[serde(skip)]
    pub condition: RefProblem,
}

/// One Gateway API condition as the controller wants it: its status (`ok`), reason and message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cond {
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

/// What is wrong with a reference, as a Gateway API route condition reason: a parent problem
/// makes `Accepted` false, a backend problem `ResolvedRefs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RefProblem {
    /// The parent Service (or its port) does not exist, or no listener of the parent Gateway
    /// has the `sectionName` or `port` asked for.
    NoMatchingParent,
    /// No listener the parentRef names lets the route attach (namespace or kind).
    NotAllowedByListeners,
    /// No listener the route may attach to shares a hostname with it.
    NoMatchingListenerHostname,
    /// The backend Service (or its port) does not exist.
    #[default]
    BackendNotFound,
    /// The backend is not a Service.
    InvalidKind,
    /// The backend is in another namespace, and no ReferenceGrant there allows it.
    RefNotPermitted,
    /// Not a route's reference (a namespace label).
    NotARoute,
}

impl RefProblem {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoMatchingParent => "NoMatchingParent",
            Self::NotAllowedByListeners => "NotAllowedByListeners",
            Self::NoMatchingListenerHostname => "NoMatchingListenerHostname",
            Self::BackendNotFound => "BackendNotFound",
            Self::InvalidKind => "InvalidKind",
            Self::RefNotPermitted => "RefNotPermitted",
            Self::NotARoute => "",
        }
    }
}

/// Whether a proxy's inbound side takes plaintext besides mesh TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Mesh TLS and plaintext (clients outside the mesh still reach the workload).
    #[default]
    #[value(name = "PERMISSIVE", alias = "permissive")]
    Permissive,
    /// Mesh TLS only: plaintext is refused.
    #[value(name = "STRICT", alias = "strict")]
    Strict,
}

impl MtlsMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "STRICT" => Some(MtlsMode::Strict),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Model {
    /// Index revision this model was built from.
    pub revision: u64,
    pub cluster_domain: String,
    /// Trust domain of workload SPIFFE IDs.
    pub trust_domain: String,
    /// The mesh-wide mTLS mode, and namespaces that set their own (`mesh.dev/mtls-mode`).
    pub mtls_default: MtlsMode,
    pub mtls_namespaces: Arc<BTreeMap<String, MtlsMode>>,
    /// Namespaces' `mesh.dev/dependencies`, read.
    pub namespace_dependencies: Arc<BTreeMap<String, BTreeSet<super::dependencies::Dependency>>>,
    /// Authorization and rate limit policies, and the authorization defaults.
    pub policies: Arc<super::policy::Policies>,
    /// A persistent map: models share the unchanged part of it.
    pub services: imbl::OrdMap<SvcKey, Arc<ServiceModel>>,
    #[serde(skip)]
    pub pods: Arc<HashMap<(String, String), Arc<PodModel>>>,
    /// Gateways of our GatewayClasses, and what attached to them.
    pub gateways: Arc<super::gateway::Gateways>,
    pub errors: Vec<ResolveError>,
}

impl Model {
    /// The mTLS mode of proxies in `namespace`.
    pub fn mtls_mode(&self, namespace: &str) -> MtlsMode {
        self.mtls_namespaces
            .get(namespace)
            .copied()
            .unwrap_or(self.mtls_default)
    }

    /// The SPIFFE ID of a pod's workload.
    pub fn pod_identity(&self, pod: &PodModel) -> Option<mesh_api::SpiffeId> {
        mesh_api::SpiffeId::workload(&self.trust_domain, &pod.namespace, &pod.service_account).ok()
    }

    /// `outbound|<port>||<name>.<namespace>.svc.<domain>`, as Istio names clusters.
    pub fn cluster_name(&self, svc: &SvcKey, port: u16) -> String {
        cluster_name(svc, port, &self.cluster_domain)
    }

    pub fn endpoint_cluster_name(&self, svc: &SvcKey, port: u16, endpoint: &str) -> String {
        endpoint_cluster_name(svc, port, endpoint, &self.cluster_domain)
    }

    pub fn fqdn(&self, svc: &SvcKey) -> String {
        format!("{}.{}.svc.{}", svc.name, svc.namespace, self.cluster_domain)
    }

    /// Services whose selector picks this pod.
    pub fn services_selecting<'a>(
        &'a self,
        pod: &'a PodModel,
    ) -> impl Iterator<Item = &'a Arc<ServiceModel>> + 'a {
        let from = SvcKey::new(pod.namespace.clone(), String::new());
        self.services
            .range(from..)
            .take_while(move |(k, _)| k.namespace == pod.namespace)
            .map(|(_, s)| s)
            .filter(move |s| {
                s.selector.as_ref().is_some_and(|sel| {
                    !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                })
            })
    }
}

pub fn cluster_name(svc: &SvcKey, port: u16, domain: &str) -> String {
    endpoint_cluster_name(svc, port, "", domain)
}

/// The cluster of one endpoint of a headless Service: `outbound|<port>|<endpoint>|<fqdn>`
/// (with `endpoint` empty, the Service port's own).
pub fn endpoint_cluster_name(svc: &SvcKey, port: u16, endpoint: &str, domain: &str) -> String {
    format!(
        "outbound|{port}|{endpoint}|{}.{}.svc.{domain}",
        svc.name, svc.namespace
    )
}
