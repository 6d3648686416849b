//! The index: every object the sources deliver, kept in memory, and the resolved [`Model`] built
//! from them. Synchronous and free of I/O: sources call [`Index::apply`], [`Index::delete`] and
//! [`Index::reset`]; anyone may [`Index::subscribe`] to the revision counter and call
//! [`Index::model`] after a change.
//!
//! A change marks the Services it can affect dirty (an EndpointSlice its Service; a route its
//! parents; a Service itself and the parents of routes that use it as a backend), and the next
//! model rebuilds only those, sharing every other Service's `Arc` with the previous model.
//!
//! ```text
//!  HTTPRoute/GRPCRoute --parentRefs--> Service port <--kubernetes.io/service-name-- EndpointSlice
//!        |                                 |                                           |
//!        +--backendRefs--> Service port    +--selector--> Pod (inbound, named ports)   +--> ready endpoints
//! ```

pub mod dependencies;
pub mod fault;
pub mod gateway;
pub mod grants;
pub mod model;
pub mod policy;
pub mod routes;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::watch;

pub use self::model::{
    Cond, Endpoint, Model, MtlsMode, PodModel, PortModel, Protocol, ResolveError, RouteAction,
    RouteEntry, ServiceModel, SvcKey, WeightedBackend,
};
use self::routes::{BackendRef, RouteSpec, match_precedence};
use crate::objects::{DocError, Kind, ObjKey, Object};

/// Consumer routes of one Service port, by client namespace.
type ConsumerRoutes = BTreeMap<String, Arc<Vec<RouteEntry>>>;

#[derive(Clone, Debug, PartialEq)]
struct ServiceInfo {
    cluster_ip: Option<IpAddr>,
    ports: Vec<ServicePort>,
    selector: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq)]
struct ServicePort {
    name: String,
    port: u16,
    target_port: Option<IntOrString>,
    app_protocol: Option<String>,
}

/// A Pod's namespace and name.
type PodKey = (String, String);

/// `namespace/name` as a [`PodKey`].
fn pod_key(pod: &str) -> Option<PodKey> {
    pod.split_once('/')
        .map(|(ns, name)| (ns.to_string(), name.to_string()))
}

#[derive(Clone, Debug, PartialEq)]
struct SliceInfo {
    service: SvcKey,
    ports: Vec<(String, u16)>,
    /// Ready endpoints and terminating ones still serving.
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
struct SliceEndpoint {
    ip: IpAddr,
    /// `namespace/name` of the Pod behind it.
    pod: Option<String>,
    terminating: bool,
    /// Its DNS label under a headless Service (`web-0` of `web-0.web.ns.svc`).
    hostname: Option<String>,
}

/// All objects, by kind, plus the revision counter and what changed since the last model.
#[derive(Debug)]
pub struct Index {
    cluster_domain: String,
    trust_domain: String,
    mtls_default: MtlsMode,
    authz_default: policy::AuthzDefault,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Namespaces' `mesh.dev/dependencies` annotations, as written.
    namespace_dependencies: HashMap<String, String>,
    services: HashMap<SvcKey, ServiceInfo>,
    slices: HashMap<ObjKey, SliceInfo>,
    pods: Arc<HashMap<PodKey, Arc<PodModel>>>,
    routes: HashMap<ObjKey, Arc<RouteSpec>>,
    /// Our policy CRDs.
    policies: HashMap<ObjKey, Object>,
    /// TrafficPolicies, read.
    traffic: HashMap<ObjKey, Arc<traffic::Compiled>>,
    /// FaultInjections, read.
    faults: HashMap<ObjKey, Arc<fault::Fault>>,
    /// Routes by the FaultInjections their rules name (including ones that do not exist).
    routes_by_fault: HashMap<ObjKey, HashSet<ObjKey>>,
    /// Rollouts: the rollout driver's input; they change nothing in the model.
    rollouts: HashMap<ObjKey, Arc<mesh_api::rollout::Rollout>>,
    /// ReferenceGrants, read, by their key (whose namespace is the one they share from).
    grants: HashMap<ObjKey, Arc<grants::Grant>>,
    /// GatewayClasses by name.
    classes: HashMap<String, gateway::ClassRead>,
    gateways: HashMap<ObjKey, Arc<gateway::GatewayRead>>,
    /// TLS Secrets by `(namespace, name)`, or why one does not read.
    secrets: HashMap<(String, String), Result<Arc<gateway::TlsSecret>, String>>,
    /// Routes with a Gateway parent.
    gateway_routes: BTreeSet<ObjKey>,
    slices_by_service: HashMap<SvcKey, HashSet<ObjKey>>,
    /// EndpointSlices by the Pods their endpoints name: a Pod change dirties their Services.
    slices_by_pod: HashMap<PodKey, HashSet<ObjKey>>,
    /// Routes by the Services they attach to (including ones that do not exist).
    routes_by_parent: HashMap<SvcKey, HashSet<ObjKey>>,
    /// Routes by the Services they send or mirror to.
    routes_by_backend: HashMap<SvcKey, HashSet<ObjKey>>,
    /// Unresolved references, by the parent Service being built when they were found.
    errors: HashMap<SvcKey, Vec<ResolveError>>,
    /// What could not be read in Pods' annotations.
    pod_errors: HashMap<PodKey, Vec<ResolveError>>,
    dirty: HashSet<SvcKey>,
    revision: watch::Sender<u64>,
    last_model: Option<Arc<Model>>,
}

impl SliceInfo {
    /// The Pods its endpoints name.
    fn pods(&self) -> HashSet<PodKey> {
        self.endpoints
            .iter()
            .filter_map(|e| e.pod.as_deref().and_then(pod_key))
            .collect()
    }
}

impl Index {
    pub fn new(cluster_domain: impl Into<String>) -> Self {
        Self {
            cluster_domain: cluster_domain.into(),
            trust_domain: mesh_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            mtls_default: MtlsMode::default(),
            authz_default: policy::AuthzDefault::default(),
            namespaces: HashMap::new(),
            namespace_dependencies: HashMap::new(),
            services: HashMap::new(),
            slices: HashMap::new(),
            pods: Arc::default(),
            routes: HashMap::new(),
            policies: HashMap::new(),
            traffic: HashMap::new(),
            faults: HashMap::new(),
            routes_by_fault: HashMap::new(),
            rollouts: HashMap::new(),
            grants: HashMap::new(),
            classes: HashMap::new(),
            gateways: HashMap::new(),
            secrets: HashMap::new(),
            gateway_routes: BTreeSet::new(),
            slices_by_service: HashMap::new(),
            slices_by_pod: HashMap::new(),
            routes_by_parent: HashMap::new(),
            routes_by_backend: HashMap::new(),
            errors: HashMap::new(),
            pod_errors: HashMap::new(),
            dirty: HashSet::new(),
            revision: watch::Sender::new(0),
            last_model: None,
        }
    }

    /// A receiver that sees the revision change after every effective update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    fn bump(&self) {
        self.revision.send_modify(|r| *r += 1);
    }

    /// Adds or replaces an object. A refused object leaves the previous version in force.
    pub fn apply(&mut self, obj: Object) -> Result<(), DocError> {
        if self.apply_quiet(obj)? {
            self.bump();
        }
        Ok(())
    }

    /// Applies without bumping the revision; tells whether anything changed.
    fn apply_quiet(&mut self, obj: Object) -> Result<bool, DocError> {
        let key = obj.key();
        Ok(match obj {
            Object::Namespace(ns) => {
                let labels = ns.metadata.labels.unwrap_or_default();
                let deps = ns
                    .metadata
                    .annotations
                    .and_then(|mut a| a.remove(mesh_api::consts::labels::DEPENDENCIES));
                let deps_changed = match deps {
                    Some(d) => {
                        self.namespace_dependencies
                            .insert(key.name.clone(), d.clone())
                            != Some(d)
                    }
                    None => self.namespace_dependencies.remove(&key.name).is_some(),
                };
                (self.namespaces.insert(key.name, labels.clone()) != Some(labels)) | deps_changed
            }
            Object::Service(svc) => {
                let info = service_info(&svc)?;
                self.set_service(SvcKey::new(key.namespace, key.name), Some(info))
            }
            Object::EndpointSlice(slice) => {
                let info = slice_info(&slice, &key.namespace)?;
                self.set_slice(key, info)
            }
            Object::Pod(pod) => {
                let (info, errors) = pod_model(&pod, &key)?;
                let info = Arc::new(info);
                let k = (key.namespace, key.name);
                let errors_changed = if errors.is_empty() {
                    self.pod_errors.remove(&k).is_some()
                } else {
                    self.pod_errors.insert(k.clone(), errors.clone()) != Some(errors)
                };
                if self.pods.get(&k) == Some(&info) {
                    errors_changed
                } else {
                    self.pod_changed(&k);
                    Arc::make_mut(&mut self.pods).insert(k, info);
                    true
                }
            }
            Object::HttpRoute(r) => {
                let spec = Arc::new(RouteSpec::from_http(&r, key.clone())?);
                self.set_route(key, Some(spec))
            }
            Object::GrpcRoute(r) => {
                let spec = Arc::new(RouteSpec::from_grpc(&r, key.clone())?);
                self.set_route(key, Some(spec))
            }
            Object::FaultInjection(f) => {
                let compiled = Arc::new(fault::compile(&f)?);
                self.set_fault(key, Some(compiled))
            }
            Object::ReferenceGrant(g) => {
                let grant = Arc::new(grants::Grant::read(&g)?);
                self.set_grant(key, Some(grant))
            }
            Object::GatewayClass(c) => {
                let read = gateway::ClassRead::read(&c);
                self.classes.insert(key.name, read.clone()) != Some(read)
            }
            Object::Gateway(g) => {
                let read = Arc::new(gateway::GatewayRead::read(&g)?);
                self.gateways.insert(key, read.clone()) != Some(read)
            }
            Object::Secret(s) => {
                let k = (key.namespace, key.name);
                match gateway::read_secret(&s) {
                    None => self.secrets.remove(&k).is_some(),
                    Some(read) => {
                        let read = read.map(Arc::new);
                        self.secrets.insert(k, read.clone()) != Some(read)
                    }
                }
            }
            // Not part of the model: the revision stays.
            Object::Rollout(r) => {
                self.rollouts.insert(key, Arc::new(r));
                false
            }
            obj @ (Object::AuthorizationPolicy(_)
            | Object::TrafficPolicy(_)
            | Object::RateLimitPolicy(_)) => {
                let same = match (self.policies.get(&key), &obj) {
                    (Some(Object::AuthorizationPolicy(a)), Object::AuthorizationPolicy(b)) => {
                        a == b
                    }
                    (Some(Object::TrafficPolicy(a)), Object::TrafficPolicy(b)) => a == b,
                    (Some(Object::RateLimitPolicy(a)), Object::RateLimitPolicy(b)) => a == b,
                    _ => false,
                };
                if let Object::TrafficPolicy(p) = &obj
                    && !same
                {
                    let compiled = Arc::new(traffic::compile(p, &key));
                    self.set_traffic(key.clone(), Some(compiled));
                }
                self.policies.insert(key, obj);
                !same
            }
        })
    }

    /// Sets or removes a TrafficPolicy: the Services its old and new versions target are
    /// dirty, with the parents of routes that send to them (routes carry a backend's hash key),
    /// and the parents of the routes it targets.
    fn set_traffic(&mut self, key: ObjKey, compiled: Option<Arc<traffic::Compiled>>) {
        let old = match &compiled {
            Some(c) => self.traffic.insert(key.clone(), c.clone()),
            None => self.traffic.remove(&key),
        };
        let targets: Vec<traffic::Target> = old
            .iter()
            .chain(compiled.iter())
            .flat_map(|c| c.targets.clone())
            .collect();
        for t in targets {
            match t {
                traffic::Target::Service { name, .. } => {
                    let svc = SvcKey::new(&key.namespace, &name);
                    let routes = self.routes_by_backend.get(&svc).into_iter().flatten();
                    dirty_parents(&mut self.dirty, &self.routes, routes);
                    self.dirty.insert(svc);
                }
                traffic::Target::Route { kind, name, .. } => {
                    let route = ObjKey {
                        kind,
                        namespace: key.namespace.clone(),
                        name,
                    };
                    dirty_parents(&mut self.dirty, &self.routes, [&route]);
                }
            }
        }
    }

    /// Sets or removes a FaultInjection; the parents of the routes naming it are dirty.
    fn set_fault(&mut self, key: ObjKey, fault: Option<Arc<fault::Fault>>) -> bool {
        let changed = match fault {
            Some(f) => self.faults.insert(key.clone(), f.clone()) != Some(f),
            None => self.faults.remove(&key).is_some(),
        };
        if changed {
            let routes = self.routes_by_fault.get(&key).into_iter().flatten();
            dirty_parents(&mut self.dirty, &self.routes, routes);
        }
        changed
    }

    /// Sets or removes a Service; it and the parents of routes that send to it are dirty.
    fn set_service(&mut self, key: SvcKey, info: Option<ServiceInfo>) -> bool {
        let changed = match info {
            Some(info) => self.services.insert(key.clone(), info.clone()) != Some(info),
            None => self.services.remove(&key).is_some(),
        };
        if changed {
            let routes = self.routes_by_backend.get(&key).into_iter().flatten();
            dirty_parents(&mut self.dirty, &self.routes, routes);
            self.dirty.insert(key);
        }
        changed
    }

    /// A Pod was added, changed or removed: the Services of the slices naming it are dirty.
    fn pod_changed(&mut self, pod: &PodKey) {
        for slice in self.slices_by_pod.get(pod).into_iter().flatten() {
            if let Some(info) = self.slices.get(slice) {
                self.dirty.insert(info.service.clone());
            }
        }
    }

    /// Sets or removes an EndpointSlice (`None`: it names no Service, so it feeds nothing).
    fn set_slice(&mut self, key: ObjKey, info: Option<SliceInfo>) -> bool {
        let old = self.slices.get(&key);
        if old == info.as_ref() {
            return false;
        }
        if let Some(old) = old {
            let svc = old.service.clone();
            self.dirty.insert(svc.clone());
            link(&mut self.slices_by_service, svc, &key, false);
            for pod in old.pods() {
                link(&mut self.slices_by_pod, pod, &key, false);
            }
        }
        match info {
            Some(info) => {
                self.dirty.insert(info.service.clone());
                link(
                    &mut self.slices_by_service,
                    info.service.clone(),
                    &key,
                    true,
                );
                for pod in info.pods() {
                    link(&mut self.slices_by_pod, pod, &key, true);
                }
                self.slices.insert(key, info);
            }
            None => {
                self.slices.remove(&key);
            }
        }
        true
    }

    /// Sets or removes a ReferenceGrant: every route that sends or mirrors to a Service of the
    /// grant's namespace may now resolve differently, so their parents are dirty.
    fn set_grant(&mut self, key: ObjKey, grant: Option<Arc<grants::Grant>>) -> bool {
        if self.grants.get(&key) == grant.as_ref() {
            return false;
        }
        let routes: Vec<ObjKey> = self
            .routes_by_backend
            .iter()
            .filter(|(svc, _)| svc.namespace == key.namespace)
            .flat_map(|(_, routes)| routes.iter().cloned())
            .collect();
        dirty_parents(&mut self.dirty, &self.routes, &routes);
        match grant {
            Some(g) => self.grants.insert(key, g),
            None => self.grants.remove(&key),
        };
        true
    }

    /// Whether a ReferenceGrant in `to_namespace` lets `from` refer to `to`.
    fn granted(
        &self,
        from: grants::Referrer<'_>,
        to_namespace: &str,
        to: grants::Target<'_>,
    ) -> bool {
        self.grants
            .iter()
            .any(|(k, g)| k.namespace == to_namespace && g.allows(from, to))
    }

    /// Sets or removes a route; its old and new parents are dirty.
    fn set_route(&mut self, key: ObjKey, spec: Option<Arc<RouteSpec>>) -> bool {
        let old = self.routes.get(&key).cloned();
        if old == spec {
            return false;
        }
        for (r, add) in [(old, false), (spec.clone(), true)] {
            let Some(r) = r else { continue };
            for p in &r.parents {
                let pk = SvcKey::new(&p.namespace, &p.name);
                self.dirty.insert(pk.clone());
                link(&mut self.routes_by_parent, pk, &key, add);
            }
            for b in route_backends(&r) {
                link(&mut self.routes_by_backend, b, &key, add);
            }
            for f in route_faults(&r) {
                link(&mut self.routes_by_fault, f, &key, add);
            }
        }
        if spec.as_ref().is_some_and(|s| !s.gateway_parents.is_empty()) {
            self.gateway_routes.insert(key.clone());
        } else {
            self.gateway_routes.remove(&key);
        }
        match spec {
            Some(s) => self.routes.insert(key, s),
            None => self.routes.remove(&key),
        };
        true
    }

    /// Removes an object; unknown keys are ignored.
    pub fn delete(&mut self, key: &ObjKey) {
        if self.delete_quiet(key) {
            self.bump();
        }
    }

    fn delete_quiet(&mut self, key: &ObjKey) -> bool {
        match key.kind {
            Kind::Namespace => {
                let deps = self.namespace_dependencies.remove(&key.name).is_some();
                self.namespaces.remove(&key.name).is_some() | deps
            }
            Kind::Service => self.set_service(SvcKey::new(&key.namespace, &key.name), None),
            Kind::EndpointSlice => self.set_slice(key.clone(), None),
            Kind::Pod => {
                let k = (key.namespace.clone(), key.name.clone());
                let had_errors = self.pod_errors.remove(&k).is_some();
                if !self.pods.contains_key(&k) {
                    return had_errors;
                }
                self.pod_changed(&k);
                Arc::make_mut(&mut self.pods).remove(&k).is_some()
            }
            Kind::HTTPRoute | Kind::GRPCRoute => self.set_route(key.clone(), None),
            Kind::TrafficPolicy => {
                self.set_traffic(key.clone(), None);
                self.policies.remove(key).is_some()
            }
            Kind::AuthorizationPolicy | Kind::RateLimitPolicy => {
                self.policies.remove(key).is_some()
            }
            Kind::FaultInjection => self.set_fault(key.clone(), None),
            Kind::ReferenceGrant => self.set_grant(key.clone(), None),
            Kind::GatewayClass => self.classes.remove(&key.name).is_some(),
            Kind::Gateway => self.gateways.remove(key).is_some(),
            Kind::Secret => self
                .secrets
                .remove(&(key.namespace.clone(), key.name.clone()))
                .is_some(),
            Kind::Rollout => {
                self.rollouts.remove(key);
                false
            }
        }
    }

    /// Replaces every object of `kind` with `objects` (a watch's relist). Objects that are refused
    /// are returned with their reason; their previous versions stay in force.
    pub fn reset(&mut self, kind: Kind, objects: Vec<Object>) -> Vec<(ObjKey, DocError)> {
        let mut errors = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut changed = false;
        for obj in objects.into_iter().filter(|o| o.kind() == kind) {
            let key = obj.key();
            seen.insert(key.clone());
            match self.apply_quiet(obj) {
                Ok(c) => changed |= c,
                Err(e) => errors.push((key, e)),
            }
        }
        for key in self.keys(kind) {
            if !seen.contains(&key) {
                changed |= self.delete_quiet(&key);
            }
        }
        if changed {
            self.bump();
        }
        errors
    }

    /// Applies and deletes in one step, so watchers see one revision for the whole batch.
    pub fn apply_batch(
        &mut self,
        apply: Vec<Object>,
        delete: &[ObjKey],
    ) -> Vec<(ObjKey, DocError)> {
        let mut errors = Vec::new();
        let mut changed = false;
        for key in delete {
            changed |= self.delete_quiet(key);
        }
        for obj in apply {
            let key = obj.key();
            match self.apply_quiet(obj) {
                Ok(c) => changed |= c,
                Err(e) => errors.push((key, e)),
            }
        }
        if changed {
            self.bump();
        }
        errors
    }

    /// The keys of every object of `kind` held.
    pub(crate) fn keys(&self, kind: Kind) -> Vec<ObjKey> {
        let key = |namespace: &str, name: &str| ObjKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match kind {
            Kind::Namespace => self.namespaces.keys().map(|n| key("", n)).collect(),
            Kind::Service => self
                .services
                .keys()
                .map(|k| key(&k.namespace, &k.name))
                .collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().map(|(ns, n)| key(ns, n)).collect(),
            Kind::HTTPRoute | Kind::GRPCRoute => self
                .routes
                .keys()
                .filter(|k| k.kind == kind)
                .cloned()
                .collect(),
            Kind::Rollout => self.rollouts.keys().cloned().collect(),
            Kind::FaultInjection => self.faults.keys().cloned().collect(),
            Kind::ReferenceGrant => self.grants.keys().cloned().collect(),
            Kind::GatewayClass => self.classes.keys().map(|n| key("", n)).collect(),
            Kind::Gateway => self.gateways.keys().cloned().collect(),
            Kind::Secret => self.secrets.keys().map(|(ns, n)| key(ns, n)).collect(),
            _ => self
                .policies
                .keys()
                .filter(|k| k.kind == kind)
                .cloned()
                .collect(),
        }
    }

    /// Every route held (HTTPRoute and GRPCRoute), for their status.
    pub fn route_specs(&self) -> Vec<Arc<RouteSpec>> {
        self.routes.values().cloned().collect()
    }

    /// One route, as read.
    pub fn route_spec(&self, key: &ObjKey) -> Option<Arc<RouteSpec>> {
        self.routes.get(key).cloned()
    }

    /// Whether Service `namespace/name` exists, and its ports.
    pub fn service_ports(&self, namespace: &str, name: &str) -> Option<Vec<u16>> {
        self.services
            .get(&SvcKey::new(namespace, name))
            .map(|s| s.ports.iter().map(|p| p.port).collect())
    }

    /// Every Rollout held, as its source last gave it.
    pub fn rollouts(&self) -> Vec<Arc<mesh_api::rollout::Rollout>> {
        self.rollouts.values().cloned().collect()
    }

    /// How many objects of each kind are held.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        Kind::ALL
            .into_iter()
            .map(|k| (k, self.keys(k).len()))
            .collect()
    }

    /// The trust domain of workload identities and the mesh-wide mTLS mode.
    pub fn set_identity(&mut self, trust_domain: &str, mtls_default: MtlsMode) {
        self.trust_domain = trust_domain.to_string();
        self.mtls_default = mtls_default;
        // Every Service's resources depend on it: build the next model from scratch.
        self.last_model = None;
        self.bump();
    }

    /// What workloads do with requests no ALLOW policy decides, unless their namespace says.
    pub fn set_authz_default(&mut self, d: policy::AuthzDefault) {
        self.authz_default = d;
        self.bump();
    }

    /// Namespaces that set their own value with `label`. A value `parse` cannot read is an
    /// error (its reason from `unreadable`), and the namespace gets `fallback`, if any.
    fn namespace_labels<T>(
        &self,
        label: &str,
        parse: impl Fn(&str) -> Option<T>,
        unreadable: impl Fn(&str) -> String,
        fallback: impl Fn() -> Option<T>,
        errors: &mut Vec<ResolveError>,
    ) -> BTreeMap<String, T> {
        let mut out = BTreeMap::new();
        for (ns, labels) in &self.namespaces {
            let Some(v) = labels.get(label) else {
                continue;
            };
            let value = parse(v).or_else(|| {
                errors.push(ResolveError {
                    object: ObjKey {
                        kind: Kind::Namespace,
                        namespace: String::new(),
                        name: ns.clone(),
                    },
                    field: format!("metadata.labels[{label:?}]"),
                    reason: unreadable(v),
                    condition: model::RefProblem::NotARoute,
                });
                fallback()
            });
            if let Some(value) = value {
                out.insert(ns.clone(), value);
            }
        }
        out
    }

    /// Namespaces that set their own mTLS mode; a label with another value is an error.
    fn mtls_namespaces(&self, errors: &mut Vec<ResolveError>) -> BTreeMap<String, MtlsMode> {
        self.namespace_labels(
            mesh_api::consts::labels::MTLS_MODE,
            MtlsMode::parse,
            |v| format!("{v:?} is not STRICT or PERMISSIVE; the mesh default applies"),
            || None,
            errors,
        )
    }

    /// Namespaces' `mesh.dev/dependencies`; entries that cannot be read go to `errors`.
    fn namespace_dependencies(
        &self,
        errors: &mut Vec<ResolveError>,
    ) -> BTreeMap<String, BTreeSet<dependencies::Dependency>> {
        let mut out = BTreeMap::new();
        for (ns, value) in &self.namespace_dependencies {
            let (deps, bad) = dependencies::parse(value, ns);
            let object = ObjKey {
                kind: Kind::Namespace,
                namespace: String::new(),
                name: ns.clone(),
            };
            errors.extend(
                bad.into_iter()
                    .map(|reason| dependencies_error(&object, reason)),
            );
            if !deps.is_empty() {
                out.insert(ns.clone(), deps);
            }
        }
        out
    }

    /// The listeners of Gateway `ns/name` of one of our classes, as a policy's target sees them.
    fn gateway_listeners(&self, ns: &str, name: &str) -> Option<policy::GatewayListeners> {
        let g = self.gateways.get(&ObjKey {
            kind: Kind::Gateway,
            namespace: ns.into(),
            name: name.into(),
        })?;
        self.classes.get(&g.class).filter(|c| c.ours)?;
        Some(
            g.listeners
                .iter()
                .map(|l| {
                    let passthrough = l.tls_mode.as_deref() == Some("Passthrough");
                    let protocol = if passthrough {
                        format!("{} Passthrough", l.protocol)
                    } else {
                        l.protocol.clone()
                    };
                    (l.name.clone(), l.port, protocol)
                })
                .collect(),
        )
    }

    /// Every policy, checked and compiled; what cannot be read goes to `errors`.
    fn policies(&self, errors: &mut Vec<ResolveError>) -> policy::Policies {
        let mut out = policy::Policies {
            default: self.authz_default,
            namespace_defaults: self.namespace_labels(
                mesh_api::consts::labels::AUTHZ_DEFAULT,
                policy::AuthzDefault::parse,
                |v| format!("{v:?} is not allow, deny or authenticated; deny applies"),
                // Unreadable: the strictest default, never a wider one.
                || Some(policy::AuthzDefault::Deny),
                errors,
            ),
            ..Default::default()
        };
        let service_ports = |ns: &str, name: &str| {
            self.services
                .get(&SvcKey::new(ns, name))
                .map(|s| s.ports.iter().map(|p| p.name.clone()).collect())
        };
        let mut keys: Vec<&ObjKey> = self.policies.keys().collect();
        keys.sort();
        for key in keys {
            let entry = out.by_namespace.entry(key.namespace.clone()).or_default();
            let targets = match &self.policies[key] {
                Object::AuthorizationPolicy(p) => {
                    entry
                        .authz
                        .push(policy::authz(p, key, &self.trust_domain, errors));
                    entry.authz.last().map(|a| &a.targets)
                }
                Object::RateLimitPolicy(p) => policy::rate_limit(p, key, errors).and_then(|l| {
                    entry.rate_limits.push(l);
                    entry.rate_limits.last().map(|l| &l.targets)
                }),
                _ => None,
            };
            if let Some(targets) = targets {
                policy::check_targets(
                    key,
                    targets,
                    |n| service_ports(&key.namespace, n),
                    |n| self.gateway_listeners(&key.namespace, n),
                    errors,
                );
            }
        }
        let mut keys: Vec<&ObjKey> = self.traffic.keys().collect();
        keys.sort();
        for key in keys {
            self.traffic_errors(&self.traffic[key], errors);
        }
        out
    }

    /// A TrafficPolicy's unreadable fields, and targets that do not exist.
    fn traffic_errors(&self, c: &traffic::Compiled, errors: &mut Vec<ResolveError>) {
        let mut push = |field: String, reason: String| {
            errors.push(ResolveError {
                object: c.key.clone(),
                field,
                reason,
                condition: model::RefProblem::NotARoute,
            });
        };
        for (field, reason) in &c.errors {
            push(field.clone(), reason.clone());
        }
        for (i, t) in c.targets.iter().enumerate() {
            match t {
                traffic::Target::Service { name, port } => {
                    match (
                        self.services.get(&SvcKey::new(&c.key.namespace, name)),
                        port,
                    ) {
                        (None, _) => push(
                            format!("spec.targetRefs[{i}]"),
                            format!(
                                "Service {}/{name} not found: the policy targets nothing",
                                c.key.namespace
                            ),
                        ),
                        (Some(s), Some(p)) if !s.ports.iter().any(|sp| sp.name == *p) => push(
                            format!("spec.targetRefs[{i}].sectionName"),
                            format!(
                                "Service {}/{name} has no port named {p:?}: the policy targets nothing",
                                c.key.namespace
                            ),
                        ),
                        _ => {}
                    }
                }
                traffic::Target::Route { kind, name, rule } => {
                    let key = ObjKey {
                        kind: *kind,
                        namespace: c.key.namespace.clone(),
                        name: name.clone(),
                    };
                    match (self.routes.get(&key), rule) {
                        (None, _) => push(
                            format!("spec.targetRefs[{i}]"),
                            format!("{key} not found: the policy targets nothing"),
                        ),
                        (Some(r), Some(n))
                            if !r.rules.iter().any(|ru| ru.name.as_deref() == Some(n)) =>
                        {
                            push(
                                format!("spec.targetRefs[{i}].sectionName"),
                                format!(
                                    "{key} has no rule named {n:?}: the policy targets nothing"
                                ),
                            )
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Resolves everything into a [`Model`], rebuilding only the Services a change marked dirty;
    /// the others keep the `Arc` of the previous model.
    pub fn model(&mut self) -> Arc<Model> {
        let revision = self.revision();
        if let Some(m) = &self.last_model
            && m.revision == revision
        {
            return m.clone();
        }
        let (mut services, keys): (imbl::OrdMap<SvcKey, Arc<ServiceModel>>, Vec<SvcKey>) =
            match &self.last_model {
                Some(prev) => (prev.services.clone(), self.dirty.drain().collect()),
                None => {
                    self.dirty.clear();
                    let keys = self
                        .services
                        .keys()
                        .chain(self.routes_by_parent.keys())
                        .cloned()
                        .collect::<HashSet<_>>();
                    (imbl::OrdMap::new(), keys.into_iter().collect())
                }
            };
        for key in keys {
            let mut errors = Vec::new();
            match self.services.get(&key) {
                Some(info) => {
                    let svc = self.build_service(&key, info, &mut errors);
                    let same = services.get(&key).is_some_and(|old| **old == svc);
                    if !same {
                        services.insert(key.clone(), Arc::new(svc));
                    }
                }
                None => {
                    services.remove(&key);
                    for route in self.routes_by_parent.get(&key).into_iter().flatten() {
                        let Some(spec) = self.routes.get(route) else {
                            continue;
                        };
                        for p in spec
                            .parents
                            .iter()
                            .filter(|p| p.namespace == key.namespace && p.name == key.name)
                        {
                            errors.push(ResolveError {
                                object: spec.key.clone(),
                                field: format!("spec.parentRefs[{}]", p.index),
                                reason: format!("parent Service {key} not found"),
                                condition: model::RefProblem::NoMatchingParent,
                            });
                        }
                    }
                }
            }
            if errors.is_empty() {
                self.errors.remove(&key);
            } else {
                self.errors.insert(key, errors);
            }
        }
        let mut errors: Vec<ResolveError> = self
            .errors
            .values()
            .chain(self.pod_errors.values())
            .flatten()
            .cloned()
            .collect();
        let mtls_namespaces = Arc::new(self.mtls_namespaces(&mut errors));
        let namespace_dependencies = Arc::new(self.namespace_dependencies(&mut errors));
        let policies = Arc::new(self.policies(&mut errors));
        let gateways = Arc::new(self.gateway_models(&mut errors));
        errors.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
        // A route on a Service and a Gateway reports an unresolved backend once.
        errors.dedup();
        let model = Arc::new(Model {
            revision,
            cluster_domain: self.cluster_domain.clone(),
            trust_domain: self.trust_domain.clone(),
            mtls_default: self.mtls_default,
            mtls_namespaces,
            namespace_dependencies,
            policies,
            services,
            pods: self.pods.clone(),
            gateways,
            errors,
        });
        self.last_model = Some(model.clone());
        model
    }

    /// The Gateways of our classes: listeners and their status, routes attached (their
    /// references resolved; what does not resolve, or does not attach, goes to `errors`), and
    /// per port the hosts each listener serves with their routes. A Gateway equal to the last
    /// model's keeps its `Arc`.
    fn gateway_models(&self, errors: &mut Vec<ResolveError>) -> gateway::Gateways {
        let mut out = gateway::Gateways {
            classes: self
                .classes
                .iter()
                .filter(|(_, c)| c.ours)
                .map(|(n, c)| (n.clone(), c.generation))
                .collect(),
            ..Default::default()
        };
        let granted = |from: grants::Referrer<'_>, ns: &str, to: grants::Target<'_>| {
            self.granted(from, ns, to)
        };
        let secret_ok =
            |ns: &str, name: &str| match self.secrets.get(&(ns.to_string(), name.to_string())) {
                None => Err(format!("no Secret {ns}/{name} of type kubernetes.io/tls")),
                Some(Err(why)) => Err(why.clone()),
                Some(Ok(_)) => Ok(()),
            };
        // Ours, in key order.
        let mut ours: BTreeMap<ObjKey, Building> = BTreeMap::new();
        for (key, g) in &self.gateways {
            if !out.classes.contains_key(&g.class) {
                continue;
            }
            let listeners: Vec<_> = g
                .listeners
                .iter()
                .map(|l| {
                    let m = gateway::listener_model(
                        &key.namespace,
                        l,
                        &g.listeners,
                        &granted,
                        &secret_ok,
                    );
                    (l.clone(), m)
                })
                .collect();
            let n = listeners.len();
            ours.insert(
                key.clone(),
                Building {
                    read: g.clone(),
                    listeners,
                    by_host: vec![BTreeMap::new(); n],
                    attached: vec![BTreeSet::new(); n],
                },
            );
        }
        let no_labels = BTreeMap::new();
        for route_key in &self.gateway_routes {
            let Some(spec) = self.routes.get(route_key) else {
                continue;
            };
            let mut entries: Option<Vec<(usize, usize, RouteEntry)>> = None;
            for p in &spec.gateway_parents {
                let gw_key = ObjKey {
                    kind: Kind::Gateway,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                };
                // A Gateway that is not ours (or not there) is another controller's to answer.
                let Some(Building {
                    listeners,
                    by_host,
                    attached,
                    ..
                }) = ours.get_mut(&gw_key)
                else {
                    continue;
                };
                // Resolved once, attached or not: ResolvedRefs is set either way.
                let entries = entries.get_or_insert_with(|| {
                    let mut e = self.rule_entries(spec, errors);
                    for (ri, _, entry) in &mut e {
                        self.fill_retry(spec, *ri, entry, ("", ""), "");
                    }
                    e
                });
                let labels = self
                    .namespaces
                    .get(&spec.key.namespace)
                    .unwrap_or(&no_labels);
                let accepted = match gateway::attach(spec, p, &p.namespace, listeners, labels) {
                    Err((condition, reason)) => {
                        errors.push(ResolveError {
                            object: spec.key.clone(),
                            field: format!("spec.parentRefs[{}]", p.index),
                            reason: reason.clone(),
                            condition,
                        });
                        Cond {
                            ok: false,
                            reason: condition.reason().into(),
                            message: reason,
                        }
                    }
                    Ok(on) => {
                        for (li, hosts) in on {
                            attached[li].insert(spec.key.clone());
                            for (h, rank) in hosts {
                                let list = by_host[li].entry(h).or_default();
                                for (ri, mi, e) in entries.iter() {
                                    list.push((rank, (spec.clone(), *ri, *mi, e.clone())));
                                }
                            }
                        }
                        Cond {
                            ok: true,
                            reason: "Accepted".into(),
                            message: format!("attached to Gateway {}/{}", p.namespace, p.name),
                        }
                    }
                };
                out.route_parents
                    .entry(spec.key.clone())
                    .or_default()
                    .push((p.index, accepted));
            }
        }
        let previous = self.last_model.as_ref().map(|m| m.gateways.clone());
        for (key, building) in ours {
            let model = self.finish_gateway(&key, building, &mut out.secrets);
            let name = format!("{}/{}", key.namespace, key.name);
            let kept = previous
                .as_ref()
                .and_then(|p| p.gateways.get(&name))
                .filter(|old| ***old == model)
                .cloned();
            out.gateways
                .insert(name, kept.unwrap_or_else(|| Arc::new(model)));
        }
        out
    }

    /// A Gateway once its routes are attached: routes counted per listener, hosts isolated,
    /// per port the virtual hosts of its servable listeners (their certificates into
    /// `secrets`), and the Gateway's `Accepted`.
    fn finish_gateway(
        &self,
        key: &ObjKey,
        b: Building,
        secrets: &mut BTreeMap<(String, String), Arc<gateway::TlsSecret>>,
    ) -> gateway::GatewayModel {
        use gateway::{GatewayPort, ListenerRead, VirtualHost};
        let Building {
            read,
            mut listeners,
            by_host,
            attached,
        } = b;
        {
            for (i, (_, m)) in listeners.iter_mut().enumerate() {
                m.attached_routes = u32::try_from(attached[i].len()).unwrap_or(u32::MAX);
            }
            let reads: Vec<ListenerRead> = listeners.iter().map(|(l, _)| l.clone()).collect();
            let mut hosts: Vec<Vec<String>> = by_host
                .iter()
                .map(|b| b.keys().cloned().collect())
                .collect();
            let servable: Vec<bool> = listeners.iter().map(|(_, m)| m.programmed.ok).collect();
            gateway::isolate(&reads, &servable, &mut hosts);
            let mut ports: BTreeMap<u16, GatewayPort> = BTreeMap::new();
            for (i, (l, m)) in listeners.iter().enumerate() {
                let Some(protocol) = m.protocol.filter(|_| m.programmed.ok) else {
                    continue;
                };
                for c in &m.certs {
                    let k = (c.namespace.clone(), c.name.clone());
                    if let Some(Ok(s)) = self.secrets.get(&k) {
                        secrets.insert(k, s.clone());
                    }
                }
                let port = ports.entry(l.port).or_insert_with(|| GatewayPort {
                    port: l.port,
                    protocol,
                    vhosts: Vec::new(),
                });
                for h in &hosts[i] {
                    // Every route of the listener whose hostnames take in this host, ranked by
                    // the route's own hostname that matched (the most characters of a name,
                    // then of a wildcard, then none), each entry once at its best rank; then
                    // the routes' precedence.
                    let mut best: BTreeMap<EntryId<'_>, (gateway::HostRank, &Entry)> =
                        BTreeMap::new();
                    for (_, items) in by_host[i]
                        .iter()
                        .filter(|(from, _)| gateway::covers(from, h))
                    {
                        for (rank, e) in items {
                            let slot = best.entry((&e.0.key, e.1, e.2)).or_insert((*rank, e));
                            if *rank > slot.0 {
                                *slot = (*rank, e);
                            }
                        }
                    }
                    let mut ranked: Vec<(gateway::HostRank, &Entry)> = best.into_values().collect();
                    ranked.sort_by(|(ra, a), (rb, b)| rb.cmp(ra).then_with(|| precedence(a, b)));
                    let routes = ranked
                        .into_iter()
                        .map(|(_, (_, _, _, e))| e.clone())
                        .collect();
                    port.vhosts.push(VirtualHost {
                        listener: l.name.clone(),
                        hostname: h.clone(),
                        routes,
                    });
                }
            }
            for p in ports.values_mut() {
                p.vhosts
                    .sort_by(|a, b| gateway::host_order(&a.hostname, &b.hostname));
            }
            let valid = listeners.iter().filter(|(_, m)| m.valid()).count();
            let accepted = match (valid, listeners.len()) {
                (0, _) => Cond {
                    ok: false,
                    reason: "ListenersNotValid".into(),
                    message: "no listener is valid".into(),
                },
                (v, n) if v < n => Cond {
                    ok: true,
                    reason: "ListenersNotValid".into(),
                    message: format!("{} of {n} listeners are not valid", n - v),
                },
                _ => Cond {
                    ok: true,
                    reason: "Accepted".into(),
                    message: "accepted by mesh".into(),
                },
            };
            gateway::GatewayModel {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                class: read.class.clone(),
                generation: read.generation,
                accepted,
                listeners: listeners.into_iter().map(|(_, m)| m).collect(),
                ports: ports.into_values().collect(),
            }
        }
    }

    /// Resolves one Service: ready endpoints per port and the routes attached to it, in
    /// precedence order. Unresolved references of those routes go to `errors`.
    fn build_service(
        &self,
        key: &SvcKey,
        info: &ServiceInfo,
        errors: &mut Vec<ResolveError>,
    ) -> ServiceModel {
        // Ready endpoints per port name.
        let mut endpoints: HashMap<&str, Vec<Endpoint>> = HashMap::new();
        for slice in self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
        {
            // Each endpoint's pod, looked up once for all the slice's ports.
            let peers: Vec<Option<Arc<PodModel>>> = slice
                .endpoints
                .iter()
                .map(|e| {
                    e.pod
                        .as_deref()
                        .and_then(pod_key)
                        .and_then(|k| self.pods.get(&k).cloned())
                })
                .collect();
            for (port_name, port) in &slice.ports {
                let eps = endpoints.entry(port_name.as_str()).or_default();
                for (e, peer) in slice.endpoints.iter().zip(&peers) {
                    eps.push(Endpoint {
                        addr: SocketAddr::new(e.ip, *port),
                        pod: e.pod.clone(),
                        peer: peer.clone(),
                        terminating: e.terminating,
                        hostname: e.hostname.clone(),
                    });
                }
            }
        }

        // Route entries per port; consumer routes per client namespace.
        let mut producer: HashMap<u16, Entries> = HashMap::new();
        let mut consumer: HashMap<(u16, String), Entries> = HashMap::new();
        for spec in self
            .routes_by_parent
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.routes.get(k))
        {
            for parent in spec
                .parents
                .iter()
                .filter(|p| p.namespace == key.namespace && p.name == key.name)
            {
                let ports: Vec<u16> = match parent.port {
                    Some(p) if info.ports.iter().any(|sp| sp.port == p) => vec![p],
                    Some(p) => {
                        errors.push(ResolveError {
                            object: spec.key.clone(),
                            field: format!("spec.parentRefs[{}].port", parent.index),
                            reason: format!("parent Service {key} has no port {p}"),
                            condition: model::RefProblem::NoMatchingParent,
                        });
                        continue;
                    }
                    None => info.ports.iter().map(|sp| sp.port).collect(),
                };
                for (ri, mi, entry) in self.rule_entries(spec, errors) {
                    for &port in &ports {
                        let mut entry = entry.clone();
                        let port_name = info
                            .ports
                            .iter()
                            .find(|sp| sp.port == port)
                            .map_or("", |sp| sp.name.as_str());
                        self.fill_retry(
                            spec,
                            ri,
                            &mut entry,
                            (&key.namespace, &key.name),
                            port_name,
                        );
                        let item = (spec.clone(), ri, mi, entry);
                        if spec.key.namespace == parent.namespace {
                            producer.entry(port).or_default().push(item);
                        } else {
                            consumer
                                .entry((port, spec.key.namespace.clone()))
                                .or_default()
                                .push(item);
                        }
                    }
                }
            }
        }
        let order = |entries: Entries| Arc::new(in_precedence(entries));
        let mut consumer_by_port: HashMap<u16, ConsumerRoutes> = HashMap::new();
        for ((port, ns), entries) in consumer {
            consumer_by_port
                .entry(port)
                .or_default()
                .insert(ns, order(entries));
        }
        let ports = info
            .ports
            .iter()
            .map(|sp| {
                let mut eps = endpoints.remove(sp.name.as_str()).unwrap_or_default();
                // One endpoint per address (slices may overlap while they change): the ready
                // one when an address is both ready and terminating.
                eps.sort_by_key(|e| (e.addr, e.terminating));
                eps.dedup_by_key(|e| e.addr);
                let (target_port, target_port_name) = match &sp.target_port {
                    None => (Some(sp.port), None),
                    Some(IntOrString::Int(p)) => (u16::try_from(*p).ok(), None),
                    Some(IntOrString::String(s)) => (None, Some(s.clone())),
                };
                if let Some(t) =
                    target_port.filter(|t| mesh_api::consts::ports::SIDECAR.contains(t))
                {
                    errors.push(ResolveError {
                        object: ObjKey {
                            kind: Kind::Service,
                            namespace: key.namespace.clone(),
                            name: key.name.clone(),
                        },
                        field: format!("spec.ports[{:?}].targetPort", sp.name),
                        reason: format!(
                            "{t} is one of the sidecar's own ports: meshed pods do not serve it inbound"
                        ),
                        condition: model::RefProblem::NotARoute,
                    });
                }
                PortModel {
                    port: sp.port,
                    name: sp.name.clone(),
                    protocol: Protocol::from_port(sp.app_protocol.as_deref(), &sp.name),
                    target_port,
                    target_port_name,
                    endpoints: Arc::new(eps),
                    routes: producer.remove(&sp.port).map(&order).unwrap_or_default(),
                    consumer_routes: consumer_by_port.remove(&sp.port).unwrap_or_default(),
                    traffic: traffic::cluster_policy(
                        self.traffic.values().map(Arc::as_ref),
                        &key.namespace,
                        &key.name,
                        &sp.name,
                    )
                    .map(Arc::new),
                    retry: traffic::service_retry(
                        self.traffic.values().map(Arc::as_ref),
                        &key.namespace,
                        &key.name,
                        &sp.name,
                    ),
                }
            })
            .collect();
        ServiceModel {
            key: key.clone(),
            cluster_ip: info.cluster_ip,
            ports,
            selector: info.selector.clone(),
        }
    }

    /// The hash key a backend Service port's TrafficPolicy balances by, if it hashes.
    fn backend_hash(&self, b: &BackendRef) -> Option<traffic::HashKey> {
        let svc = self.services.get(&SvcKey::new(&b.namespace, &b.name))?;
        let port = svc.ports.iter().find(|p| Some(p.port) == b.port)?;
        match traffic::cluster_policy(
            self.traffic.values().map(Arc::as_ref),
            &b.namespace,
            &b.name,
            &port.name,
        )?
        .balancer
        {
            traffic::Balancer::Hash(k) => Some(k),
            _ => None,
        }
    }

    /// The cluster a route's backend sends to, or why it has none.
    fn resolve_backend(
        &self,
        route: &ObjKey,
        b: &BackendRef,
    ) -> Result<String, (model::RefProblem, String)> {
        use model::RefProblem::{BackendNotFound, RefNotPermitted};
        if let Some(why) = &b.invalid {
            return Err(why.clone());
        }
        let from = grants::Referrer {
            group: grants::GATEWAY_GROUP,
            kind: &route.kind.to_string(),
            namespace: &route.namespace,
        };
        let to = grants::Target {
            group: "",
            kind: "Service",
            name: &b.name,
        };
        if b.namespace != route.namespace && !self.granted(from, &b.namespace, to) {
            return Err((
                RefNotPermitted,
                format!(
                    "backend {}/{} is in another namespace, and no ReferenceGrant in {} lets {}s of {} refer to it",
                    b.namespace, b.name, b.namespace, route.kind, route.namespace
                ),
            ));
        }
        let key = SvcKey::new(&b.namespace, &b.name);
        let Some(port) = b.port else {
            return Err((BackendNotFound, format!("backend {key} has no port")));
        };
        match self.services.get(&key) {
            None => Err((BackendNotFound, format!("backend Service {key} not found"))),
            Some(svc) if !svc.ports.iter().any(|p| p.port == port) => Err((
                BackendNotFound,
                format!("backend Service {key} has no port {port}"),
            )),
            Some(_) => Ok(model::cluster_name(&key, port, &self.cluster_domain)),
        }
    }

    /// The rule's FaultInjection, if it names one; an error (noted) when it does not resolve.
    fn resolve_fault(
        &self,
        spec: &RouteSpec,
        rule: &routes::RuleSpec,
        errors: &mut Vec<ResolveError>,
    ) -> Result<Option<Arc<fault::Fault>>, ()> {
        let Some(f) = &rule.filters.fault else {
            return Ok(None);
        };
        let key = ObjKey {
            kind: Kind::FaultInjection,
            namespace: spec.key.namespace.clone(),
            name: f.name.clone(),
        };
        let (condition, reason) = match (&f.invalid, self.faults.get(&key)) {
            (None, Some(fault)) => return Ok(Some(fault.clone())),
            (Some(why), _) => (model::RefProblem::InvalidKind, why.clone()),
            (None, None) => (
                model::RefProblem::BackendNotFound,
                format!(
                    "FaultInjection {}/{} not found (or refused: see /debug/config-errors); the rule answers 500",
                    key.namespace, key.name
                ),
            ),
        };
        errors.push(ResolveError {
            object: spec.key.clone(),
            field: f.field.clone(),
            reason,
            condition,
        });
        Err(())
    }

    /// One entry per match of each rule of a route, its references resolved (what does not
    /// resolve goes to `errors`), with the rule and match index; a retry only if the rule sets
    /// one (the parent's default is the caller's).
    /// Gives `entry` (of rule `ri` of `spec`) the retry of a policy on the route, its rule, or
    /// the parent Service `parent`'s port `port` (none for a Gateway), when the rule sets none.
    fn fill_retry(
        &self,
        spec: &RouteSpec,
        ri: usize,
        entry: &mut RouteEntry,
        parent: (&str, &str),
        port: &str,
    ) {
        if entry.retry.is_none() {
            entry.retry = traffic::route_retry(
                self.traffic.values().map(Arc::as_ref),
                &spec.key,
                spec.rules[ri].name.as_deref(),
                parent,
                port,
            );
        }
    }

    fn rule_entries(
        &self,
        spec: &RouteSpec,
        errors: &mut Vec<ResolveError>,
    ) -> Vec<(usize, usize, RouteEntry)> {
        let mut out = Vec::new();
        for (ri, rule) in spec.rules.iter().enumerate() {
            // A fault that does not resolve fails the rule, as the Gateway API asks of an
            // ExtensionRef filter.
            let (action, fault) = match self.resolve_fault(spec, rule, errors) {
                Ok(fault) => (self.resolve_action(spec, ri, rule, errors), fault),
                Err(()) => (RouteAction::Fail(500), None),
            };
            let mirrors = rule
                .filters
                .mirrors
                .iter()
                .filter_map(|m| {
                    self.resolve_backend(&spec.key, &m.backend)
                        .ok()
                        .map(|c| (c, m.per_million))
                })
                .collect::<Vec<_>>();
            for (mi, m) in rule.matches.iter().enumerate() {
                out.push((
                    ri,
                    mi,
                    RouteEntry {
                        source: format!(
                            "{}/{}/{} rule {ri}",
                            spec.key.kind, spec.key.namespace, spec.key.name
                        ),
                        matches: m.clone(),
                        action: action.clone(),
                        request_headers: rule.filters.request_headers.clone(),
                        response_headers: rule.filters.response_headers.clone(),
                        rewrite: rule.filters.rewrite.clone(),
                        mirrors: mirrors.clone(),
                        timeout: rule.timeout,
                        backend_timeout: rule.backend_timeout,
                        retry: rule.retry.clone(),
                        fault: fault.clone(),
                    },
                ));
            }
        }
        out
    }

    fn resolve_action(
        &self,
        spec: &RouteSpec,
        ri: usize,
        rule: &routes::RuleSpec,
        errors: &mut Vec<ResolveError>,
    ) -> RouteAction {
        if let Some(r) = &rule.filters.redirect {
            return RouteAction::Redirect(r.clone());
        }
        let mut backends = Vec::new();
        for b in &rule.backends {
            let cluster = match self.resolve_backend(&spec.key, b) {
                Ok(c) => Some(c),
                Err((condition, reason)) => {
                    errors.push(ResolveError {
                        object: spec.key.clone(),
                        field: format!("spec.rules[{ri}].backendRefs[{}]", b.index),
                        reason,
                        condition,
                    });
                    None
                }
            };
            // A backend at weight 0 stays in the route: proxies keep its endpoints warm, so
            // moving traffic to it (a blue-green switch, a rollback) takes effect the moment
            // the new weights arrive.
            let hash = self.backend_hash(b);
            backends.push(WeightedBackend {
                cluster,
                weight: b.weight,
                request_headers: b.request_headers.clone(),
                response_headers: b.response_headers.clone(),
                hash,
            });
        }
        // No backends, all weights zero, or none of the weighted ones resolves: the Gateway
        // API asks for a 500.
        let mut live = backends.iter().filter(|b| b.weight > 0).peekable();
        if live.peek().is_none() || live.all(|b| b.cluster.is_none()) {
            return RouteAction::Fail(500);
        }
        RouteAction::Forward(backends)
    }
}

/// A Gateway of ours while routes attach to it.
struct Building {
    read: Arc<gateway::GatewayRead>,
    listeners: Vec<(gateway::ListenerRead, gateway::ListenerModel)>,
    /// Per listener, the entries attached, by host.
    by_host: Vec<BTreeMap<String, Vec<Ranked>>>,
    /// Per listener, the routes attached.
    attached: Vec<BTreeSet<ObjKey>>,
}

/// Route entries with where each comes from.
type Entries = Vec<Entry>;

/// An entry attached to a Gateway host, with the rank of the route hostname it came by.
type Ranked = (gateway::HostRank, Entry);

/// Which entry it is: the route, rule and match index.
type EntryId<'a> = (&'a ObjKey, usize, usize);

/// One route entry with where it comes from (the route, rule and match index).
type Entry = (Arc<RouteSpec>, usize, usize, RouteEntry);

/// The Gateway API's precedence between two entries: the match, then the older route, then
/// `namespace/name`, then rule and match order.
fn precedence((sa, ra, ma, ea): &Entry, (sb, rb, mb, eb): &Entry) -> std::cmp::Ordering {
    match_precedence(&ea.matches, &eb.matches)
        .then_with(|| match (&sa.created, &sb.created) {
            (Some(a), Some(b)) => a.cmp(b),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        })
        .then_with(|| (&sa.key.namespace, &sa.key.name).cmp(&(&sb.key.namespace, &sb.key.name)))
        .then(sa.key.kind.cmp(&sb.key.kind))
        .then(ra.cmp(rb))
        .then(ma.cmp(mb))
}

/// Route entries in [`precedence`] order.
fn in_precedence(mut entries: Entries) -> Vec<RouteEntry> {
    entries.sort_by(precedence);
    entries.into_iter().map(|(_, _, _, e)| e).collect()
}

/// Marks dirty the parent Services of each of `routes`.
fn dirty_parents<'a>(
    dirty: &mut HashSet<SvcKey>,
    all: &HashMap<ObjKey, Arc<RouteSpec>>,
    routes: impl IntoIterator<Item = &'a ObjKey>,
) {
    for route in routes {
        for p in all.get(route).into_iter().flat_map(|r| &r.parents) {
            dirty.insert(SvcKey::new(&p.namespace, &p.name));
        }
    }
}

/// Adds `item` to the set under `key`, or removes it (and the set once it is empty).
fn link<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, HashSet<ObjKey>>,
    key: K,
    item: &ObjKey,
    add: bool,
) {
    if add {
        map.entry(key).or_default().insert(item.clone());
    } else if let Some(set) = map.get_mut(&key) {
        set.remove(item);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

/// Every FaultInjection a route's rules name.
fn route_faults(spec: &RouteSpec) -> HashSet<ObjKey> {
    spec.rules
        .iter()
        .filter_map(|r| r.filters.fault.as_ref())
        .filter(|f| f.invalid.is_none())
        .map(|f| ObjKey {
            kind: Kind::FaultInjection,
            namespace: spec.key.namespace.clone(),
            name: f.name.clone(),
        })
        .collect()
}

/// Every Service a route sends or mirrors to.
fn route_backends(spec: &RouteSpec) -> HashSet<SvcKey> {
    spec.rules
        .iter()
        .flat_map(|r| {
            r.backends
                .iter()
                .chain(r.filters.mirrors.iter().map(|m| &m.backend))
        })
        .map(|b| SvcKey::new(&b.namespace, &b.name))
        .collect()
}

fn service_info(svc: &Service) -> Result<ServiceInfo, DocError> {
    let spec = svc.spec.clone().unwrap_or_default();
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(ip) => Some(ip.parse().map_err(|_| {
            DocError::new("spec.clusterIP", format!("{ip:?} is not an IP address"))
        })?),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        // The mesh carries TCP only; UDP and SCTP ports are not its business.
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                DocError::new(
                    format!("spec.ports[{i}].port"),
                    format!("invalid port {}", p.port),
                )
            })?;
        let name = p.name.clone().unwrap_or_default();
        // Two ports with one number (or name) would give Envoy duplicate matches.
        if let Some(dup) = ports.iter().find(|sp: &&ServicePort| sp.port == port) {
            return Err(DocError::new(
                format!("spec.ports[{i}].port"),
                format!("port {port} is listed twice (also as {:?})", dup.name),
            ));
        }
        if ports.iter().any(|sp| sp.name == name) {
            return Err(DocError::new(
                format!("spec.ports[{i}].name"),
                format!("port name {name:?} is used twice"),
            ));
        }
        ports.push(ServicePort {
            name,
            port,
            target_port: p.target_port,
            app_protocol: p.app_protocol,
        });
    }
    Ok(ServiceInfo {
        cluster_ip,
        ports,
        selector: spec.selector,
    })
}

/// `None` when the slice names no Service (it then feeds nothing).
fn slice_info(slice: &EndpointSlice, namespace: &str) -> Result<Option<SliceInfo>, DocError> {
    let Some(svc) = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(mesh_api::consts::labels::ENDPOINTSLICE_SERVICE_NAME))
    else {
        return Ok(None);
    };
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Some(port) = p.port else { continue };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                DocError::new(format!("ports[{i}].port"), format!("invalid port {port}"))
            })?;
        ports.push((p.name.clone().unwrap_or_default(), port));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        // As the EndpointSlice API says: `ready` unset means ready; `serving` unset means as
        // `ready`. A terminating endpoint is never ready, but may still be serving: kept,
        // marked, for use only when no ready endpoint is left.
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let serving = c.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        if !(ready || serving && terminating) {
            continue;
        }
        let pod = ep
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .map(|r| {
                format!(
                    "{}/{}",
                    r.namespace.as_deref().unwrap_or(namespace),
                    r.name.as_deref().unwrap_or_default()
                )
            });
        for (j, a) in ep.addresses.iter().enumerate() {
            let ip = a.parse().map_err(|_| {
                DocError::new(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IP address"),
                )
            })?;
            endpoints.push(SliceEndpoint {
                ip,
                pod: pod.clone(),
                terminating: !ready,
                hostname: ep.hostname.clone().filter(|h| !h.is_empty()),
            });
        }
    }
    Ok(Some(SliceInfo {
        service: SvcKey::new(namespace, svc.clone()),
        ports,
        endpoints,
    }))
}

/// A `mesh.dev/dependencies` entry of `object` that cannot be read.
fn dependencies_error(object: &ObjKey, reason: String) -> ResolveError {
    ResolveError {
        object: object.clone(),
        field: format!(
            "metadata.annotations[{:?}]",
            mesh_api::consts::labels::DEPENDENCIES
        ),
        reason: format!("{reason}; the entry is left out"),
        condition: model::RefProblem::NotARoute,
    }
}

/// A Pod as the model keeps it, and what could not be read in its annotations (the rest of
/// the Pod still applies).
fn pod_model(pod: &Pod, key: &ObjKey) -> Result<(PodModel, Vec<ResolveError>), DocError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let ip =
        match pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
            None | Some("") => None,
            Some(ip) => Some(ip.parse().map_err(|_| {
                DocError::new("status.podIP", format!("{ip:?} is not an IP address"))
            })?),
        };
    let mut named_ports = BTreeMap::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for p in c.ports.iter().flatten() {
            if let (Some(name), Ok(port)) = (&p.name, u16::try_from(p.container_port)) {
                named_ports.insert(name.clone(), port);
            }
        }
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let workload = mesh_api::workload::name(
        &labels,
        owner.map(|o| (o.kind.as_str(), o.name.as_str())),
        pod.metadata.generate_name.as_deref(),
        &key.name,
    );
    let (dependencies, bad) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(mesh_api::consts::labels::DEPENDENCIES))
        .map(|v| dependencies::parse(v, &key.namespace))
        .unwrap_or_default();
    let errors = bad
        .into_iter()
        .map(|reason| dependencies_error(key, reason))
        .collect();
    let model = PodModel {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        ip,
        workload,
        labels,
        service_account: spec
            .service_account_name
            .unwrap_or_else(|| "default".into()),
        named_ports,
        dependencies,
    };
    Ok((model, errors))
}

#[cfg(test)]
mod tests;
