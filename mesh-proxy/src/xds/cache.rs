//! What the proxy holds of the control plane's resources, and how a response becomes a new
//! snapshot. Pure: the client feeds it decoded responses and sends what it answers.
//!
//! A response is converted in full before anything changes, so a NACKed response leaves the
//! running config as it was. A snapshot is published only when it is complete (every
//! RouteConfiguration a listener names and the endpoints of every EDS cluster are here), so a
//! new route never points at a cluster whose endpoints have not arrived.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret as PbSecret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;

use crate::balance::EndpointSet;
use crate::metrics::{BackendCounter, Metrics};
use crate::state::convert::{self, ConvertError};
use crate::state::{
    Cluster, ClusterDef, ClusterKind, EndpointDef, ListenerConfig, NetworkFilter, RouteTable,
    ServerCert, Snapshot,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Type {
    Cluster,
    Endpoint,
    Listener,
    Route,
    /// A gateway's certificates (SDS over ADS).
    Secret,
}

impl Type {
    pub const ALL: [Type; 5] = [
        Type::Cluster,
        Type::Endpoint,
        Type::Listener,
        Type::Route,
        Type::Secret,
    ];

    /// The types subscribed to by name, in the order a change ripples through them: routes
    /// name clusters, clusters endpoints; listeners name certificates.
    pub const BY_NAME: [Type; 3] = [Type::Route, Type::Endpoint, Type::Secret];

    pub fn url(self) -> String {
        match self {
            Type::Cluster => PbCluster::type_url(),
            Type::Endpoint => ClusterLoadAssignment::type_url(),
            Type::Listener => Listener::type_url(),
            Type::Route => RouteConfiguration::type_url(),
            Type::Secret => PbSecret::type_url(),
        }
    }

    pub fn from_url(url: &str) -> Option<Type> {
        Type::ALL.into_iter().find(|t| t.url() == url)
    }

    pub fn short(self) -> &'static str {
        match self {
            Type::Cluster => "CDS",
            Type::Endpoint => "EDS",
            Type::Listener => "LDS",
            Type::Route => "RDS",
            Type::Secret => "SDS",
        }
    }

    /// LDS and CDS are subscribed to as wildcards; RDS and EDS by name.
    pub fn wildcard(self) -> bool {
        matches!(self, Type::Cluster | Type::Listener)
    }
}

/// One resource of a response: its name, version and encoded body.
#[derive(Clone, Debug)]
pub struct Incoming {
    pub name: String,
    pub version: String,
    pub body: Any,
}

#[derive(Debug)]
enum Converted {
    Listener(Arc<ListenerConfig>),
    Route(Arc<RouteTable>, convert::VhostMemo),
    Cluster(Box<ClusterDef>),
    Endpoints(Vec<EndpointDef>),
    Secret(Arc<ServerCert>),
}

/// The name a resource carries inside itself (state-of-the-world responses have no other).
pub fn resource_name(ty: Type, any: &Any) -> Result<String, String> {
    let bytes = any.value.as_slice();
    let name = match ty {
        Type::Listener => Listener::decode(bytes).map(|l| l.name),
        Type::Route => convert::route_config_name(bytes),
        Type::Cluster => PbCluster::decode(bytes).map(|c| c.name),
        Type::Endpoint => ClusterLoadAssignment::decode(bytes).map(|c| c.cluster_name),
        Type::Secret => PbSecret::decode(bytes).map(|s| s.name),
    };
    name.map_err(|e| format!("cannot decode {}: {e}", any.type_url))
}

/// `memos`: the virtual hosts of the RouteConfigurations held, which a new version of one
/// takes and reuses where they are unchanged (a refused version leaves none: the next is
/// converted in full); `routes`: the tables held, whose domain index a new version shares
/// where its domains are the same.
fn convert_one(
    ty: Type,
    r: &Incoming,
    memos: &mut HashMap<String, convert::VhostMemo>,
    routes: &imbl::HashMap<String, Arc<RouteTable>>,
) -> Result<Converted, ConvertError> {
    let bad = |e: prost::DecodeError| ConvertError {
        kind: ty.short(),
        name: r.name.clone(),
        field: "resource".into(),
        problem: format!("cannot decode: {e}"),
    };
    if r.body.type_url != ty.url() {
        return Err(ConvertError {
            kind: ty.short(),
            name: r.name.clone(),
            field: "resource.type_url".into(),
            problem: format!("{} in a {} response", r.body.type_url, ty.short()),
        });
    }
    let bytes = r.body.value.as_slice();
    Ok(match ty {
        Type::Listener => Converted::Listener(Arc::new(convert::listener(
            &Listener::decode(bytes).map_err(bad)?,
        )?)),
        Type::Route => {
            let memo = memos.remove(&r.name).unwrap_or_default();
            let previous = routes.get(&r.name).map(|t| &**t);
            let (table, memo) = convert::route_table_reusing(&r.name, bytes, memo, previous)?;
            Converted::Route(Arc::new(table), memo)
        }
        Type::Cluster => Converted::Cluster(Box::new(convert::cluster(
            &PbCluster::decode(bytes).map_err(bad)?,
        )?)),
        Type::Endpoint => Converted::Endpoints(convert::endpoints(
            &ClusterLoadAssignment::decode(bytes).map_err(bad)?,
        )?),
        Type::Secret => Converted::Secret(Arc::new(convert::secret(
            &PbSecret::decode(bytes).map_err(bad)?,
        )?)),
    })
}

#[derive(Debug, Default)]
pub struct Cache {
    versions: BTreeMap<Type, BTreeMap<String, String>>,
    listeners: BTreeMap<String, Arc<ListenerConfig>>,
    routes: imbl::HashMap<String, Arc<RouteTable>>,
    /// Per RouteConfiguration held, its virtual hosts by their encoding.
    vhost_memos: HashMap<String, convert::VhostMemo>,
    cluster_defs: BTreeMap<String, ClusterDef>,
    /// EDS service name -> the clusters that take their endpoints from it.
    eds_users: HashMap<String, BTreeSet<String>>,
    /// RouteConfigurations the listeners name, and EDS names the clusters use.
    routes_wanted: BTreeSet<String>,
    endpoints_wanted: BTreeSet<String>,
    endpoints: HashMap<String, Vec<EndpointDef>>,
    /// Certificates the listeners present, and those held.
    secrets_wanted: BTreeSet<String>,
    secrets: imbl::HashMap<String, Arc<ServerCert>>,
    clusters: imbl::HashMap<String, Arc<Cluster>>,
    /// Clusters whose definition or endpoints changed since the last assembly.
    dirty: BTreeSet<String>,
    /// Destinations are looked up on demand: clusters are subscribed to by name as well, and a
    /// config is complete only with every cluster its chains and routes name.
    scoped: bool,
    /// Clusters the listeners and routes name (kept when scoped).
    clusters_wanted: BTreeSet<String>,
    /// Names asked for that the controller said do not exist.
    clusters_absent: BTreeSet<String>,
    /// Clusters the wildcard brought (fixed and inbound ones), never subscribed to by name.
    clusters_wildcard: BTreeSet<String>,
    /// The outbound listener with the chains of every address listener added.
    outbound: Option<Arc<ListenerConfig>>,
    received: BTreeSet<Type>,
    generation: u64,
    changed: bool,
    /// Per type, the control plane's revision of the newest response applied (its version,
    /// when that is a number, as this mesh's controller sends).
    revisions: BTreeMap<Type, u64>,
}

impl Cache {
    /// A cache for a proxy that looks destinations up on demand.
    pub fn scoped() -> Self {
        Self {
            scoped: true,
            ..Self::default()
        }
    }

    /// Notes the control plane's version of a response of `ty` just applied; one that is not a
    /// number (another control plane's) is not a revision and leaves it as it was.
    pub fn note_revision(&mut self, ty: Type, version: &str) {
        if let Ok(r) = version.parse() {
            self.revisions.insert(ty, r);
        }
    }

    /// Per type, the control plane's revision of the newest response applied.
    pub fn revisions(&self) -> impl Iterator<Item = (Type, u64)> + '_ {
        self.revisions.iter().map(|(t, r)| (*t, *r))
    }

    /// Versions held of one type, as `initial_resource_versions` on a new Delta stream.
    pub fn versions(&self, ty: Type) -> HashMap<String, String> {
        self.versions
            .get(&ty)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Whether a resource of `ty` named `name` is held.
    pub fn holds(&self, ty: Type, name: &str) -> bool {
        self.versions.get(&ty).is_some_and(|m| m.contains_key(name))
    }

    pub fn names(&self, ty: Type) -> BTreeSet<String> {
        self.versions
            .get(&ty)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies one response: `updated` resources, `removed` names. Nothing changes on error
    /// but the memo of converted virtual hosts of each route in the response (a cache: that
    /// route's next version is converted in full).
    pub fn apply(
        &mut self,
        ty: Type,
        updated: &[Incoming],
        removed: &[String],
    ) -> Result<(), ConvertError> {
        let converted = updated
            .iter()
            .map(|r| convert_one(ty, r, &mut self.vhost_memos, &self.routes).map(|c| (r, c)))
            .collect::<Result<Vec<_>, _>>()?;
        for name in removed {
            let versions = self.versions.entry(ty).or_default();
            if versions.remove(name).is_some() {
                self.changed = true;
            }
            match ty {
                Type::Listener => {
                    self.listeners.remove(name);
                }
                Type::Route => {
                    self.routes.remove(name);
                    self.vhost_memos.remove(name);
                }
                Type::Cluster => {
                    if let Some(old) = self.cluster_defs.remove(name) {
                        self.forget_eds_user(&old);
                    }
                    self.dirty.insert(name.clone());
                    if self.clusters_wanted.contains(name) {
                        self.clusters_absent.insert(name.clone());
                    }
                }
                Type::Endpoint => {
                    self.endpoints.remove(name);
                    self.mark_eds_dirty(name);
                }
                Type::Secret => {
                    self.secrets.remove(name);
                }
            }
        }
        for (r, c) in converted {
            let versions = self.versions.entry(ty).or_default();
            versions.insert(r.name.clone(), r.version.clone());
            self.changed = true;
            match c {
                Converted::Listener(l) => {
                    self.listeners.insert(r.name.clone(), l);
                }
                Converted::Route(t, memo) => {
                    self.routes.insert(r.name.clone(), t);
                    self.vhost_memos.insert(r.name.clone(), memo);
                }
                Converted::Cluster(def) => {
                    self.clusters_absent.remove(&r.name);
                    if self.cluster_defs.get(&r.name) != Some(&*def) {
                        self.dirty.insert(r.name.clone());
                        if let ClusterKind::Eds { service_name } = &def.kind {
                            self.eds_users
                                .entry(service_name.clone())
                                .or_default()
                                .insert(r.name.clone());
                        }
                        if let Some(old) = self.cluster_defs.insert(r.name.clone(), *def) {
                            self.forget_eds_user(&old);
                        }
                    }
                }
                Converted::Endpoints(eps) => {
                    self.endpoints.insert(r.name.clone(), eps);
                    self.mark_eds_dirty(&r.name);
                }
                Converted::Secret(cert) => {
                    self.secrets.insert(r.name.clone(), cert);
                }
            }
        }
        self.received.insert(ty);
        self.refresh_wanted(ty);
        Ok(())
    }

    /// Drops resources no longer subscribed to (RDS and EDS names).
    pub fn retain(&mut self, ty: Type, keep: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .names(ty)
            .into_iter()
            .filter(|n| !keep.contains(n))
            .collect();
        if !gone.is_empty() {
            // Cannot fail: nothing to convert.
            let _ = self.apply(ty, &[], &gone);
        }
    }

    /// State of the world for LDS and CDS: what the response does not name is gone.
    pub fn full_state_removals(&self, ty: Type, present: &[Incoming]) -> Vec<String> {
        let names: BTreeSet<&str> = present.iter().map(|r| r.name.as_str()).collect();
        self.names(ty)
            .into_iter()
            .filter(|n| !names.contains(n.as_str()))
            .collect()
    }

    fn mark_eds_dirty(&mut self, service: &str) {
        if let Some(users) = self.eds_users.get(service) {
            self.dirty.extend(users.iter().cloned());
        }
    }

    /// Drops a replaced or removed cluster definition from the EDS reverse map, unless the
    /// cluster still uses that service name.
    fn forget_eds_user(&mut self, old: &ClusterDef) {
        let ClusterKind::Eds { service_name } = &old.kind else {
            return;
        };
        let still = matches!(
            self.cluster_defs.get(&old.name).map(|d| &d.kind),
            Some(ClusterKind::Eds { service_name: s }) if s == service_name
        );
        if still {
            return;
        }
        if let Some(users) = self.eds_users.get_mut(service_name) {
            users.remove(&old.name);
            if users.is_empty() {
                self.eds_users.remove(service_name);
            }
        }
    }

    /// RouteConfiguration names the listeners use.
    pub fn wanted_routes(&self) -> BTreeSet<String> {
        self.routes_wanted.clone()
    }

    /// EDS names the clusters use.
    pub fn wanted_endpoints(&self) -> BTreeSet<String> {
        self.endpoints_wanted.clone()
    }

    /// The names to subscribe to for RDS and EDS, and when scoped for CDS (on top of its
    /// wildcard); empty for LDS, whose names come from [`super::on_demand`].
    pub fn wanted(&self, ty: Type) -> &BTreeSet<String> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        match ty {
            Type::Route => &self.routes_wanted,
            Type::Endpoint => &self.endpoints_wanted,
            Type::Secret => &self.secrets_wanted,
            Type::Cluster if self.scoped => &self.clusters_wanted,
            Type::Listener | Type::Cluster => &NONE,
        }
    }

    /// The names to hold a subscription to for `ty` ([`Cache::wanted`]), when that is not
    /// what `had` holds already. Clusters the wildcard brings are subscribed to by name too
    /// when something names them, so naming one again always fetches it fresh.
    pub fn subscription_change(
        &self,
        ty: Type,
        had: &BTreeSet<String>,
    ) -> Option<BTreeSet<String>> {
        let wanted = self.wanted(ty);
        (had != wanted).then(|| wanted.clone())
    }

    /// Records which clusters of a CDS response came with the wildcard: those not among the
    /// names subscribed to (kept when their names are no longer subscribed to).
    pub fn note_wildcard(
        &mut self,
        updated: &[Incoming],
        removed: &[String],
        by_name: &BTreeSet<String>,
    ) {
        for r in updated.iter().filter(|r| !by_name.contains(&r.name)) {
            self.clusters_wildcard.insert(r.name.clone());
        }
        for name in removed {
            self.clusters_wildcard.remove(name);
        }
    }

    /// Drops what a subscription no longer names; for CDS, what the wildcard brought stays.
    pub fn retain_subscribed(&mut self, ty: Type, by_name: &BTreeSet<String>) {
        if ty != Type::Cluster {
            return self.retain(ty, by_name);
        }
        let keep: BTreeSet<String> = by_name.union(&self.clusters_wildcard).cloned().collect();
        self.retain(ty, &keep);
    }

    /// Recomputes what listeners and clusters reference; only they change it, so endpoint
    /// and route updates (the frequent ones) do not pay for it.
    fn refresh_wanted(&mut self, ty: Type) {
        match ty {
            Type::Listener => {
                self.routes_wanted = self
                    .filters()
                    .filter_map(|f| match f {
                        NetworkFilter::Http { route, .. } => Some(route.clone()),
                        NetworkFilter::Tcp { .. } => None,
                    })
                    .collect();
                self.secrets_wanted = self
                    .listeners
                    .values()
                    .flat_map(|l| l.chains.iter().chain(l.default_chain.iter()))
                    .filter_map(|c| c.edge_tls.as_ref())
                    .flat_map(|t| t.certificates.iter().cloned())
                    .collect();
            }
            Type::Cluster => self.endpoints_wanted = self.eds_users.keys().cloned().collect(),
            Type::Route | Type::Endpoint | Type::Secret => {}
        }
        if ty == Type::Listener {
            self.outbound = self.merged_outbound();
        }
        if self.scoped && matches!(ty, Type::Listener | Type::Route) {
            let chains = self.filters().filter_map(|f| match f {
                NetworkFilter::Tcp { cluster, .. } => Some(cluster.as_str()),
                NetworkFilter::Http { .. } => None,
            });
            let routes = self.routes.values().flat_map(|r| r.clusters());
            self.clusters_wanted = chains.chain(routes).map(str::to_owned).collect();
            let wanted = &self.clusters_wanted;
            self.clusters_absent.retain(|c| wanted.contains(c));
        }
    }

    /// The terminal filter of every chain of every listener.
    fn filters(&self) -> impl Iterator<Item = &NetworkFilter> {
        self.listeners
            .values()
            .flat_map(|l| l.chains.iter().chain(l.default_chain.iter()))
            .map(|c| &c.filter)
    }

    /// `virtualOutbound` with the filter chains of every address listener added; `None` when
    /// there are none (the listener runs as sent).
    fn merged_outbound(&self) -> Option<Arc<ListenerConfig>> {
        let base = self
            .listeners
            .get(mesh_api::consts::xds::OUTBOUND_LISTENER)?;
        let mut extra = self
            .listeners
            .iter()
            .filter(|(name, _)| mesh_api::consts::xds::parse_address_listener(name).is_some())
            .peekable();
        extra.peek()?;
        let mut chains = base.chains.clone();
        chains.extend(extra.flat_map(|(_, l)| l.chains.iter().cloned()));
        Some(Arc::new(ListenerConfig {
            name: base.name.clone(),
            bind: None,
            chains,
            default_chain: base.default_chain.clone(),
        }))
    }

    /// Whether every type arrived and everything referenced is here.
    pub fn complete(&self) -> bool {
        self.received.contains(&Type::Listener)
            && self.received.contains(&Type::Cluster)
            && self
                .routes_wanted
                .iter()
                .all(|r| self.routes.contains_key(r))
            && self
                .endpoints_wanted
                .iter()
                .all(|e| self.endpoints.contains_key(e))
            && self
                .secrets_wanted
                .iter()
                .all(|s| self.secrets.contains_key(s))
            && (!self.scoped
                || self
                    .clusters_wanted
                    .iter()
                    .all(|c| self.cluster_defs.contains_key(c) || self.clusters_absent.contains(c)))
    }

    /// Whether anything changed since the last snapshot.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// A snapshot of what is held now; clusters are rebuilt only where they changed, and keep
    /// their endpoints' balancing state.
    pub fn snapshot(&mut self, metrics: &Metrics) -> Snapshot {
        for name in std::mem::take(&mut self.dirty) {
            let Some(def) = self.cluster_defs.get(&name) else {
                self.clusters.remove(&name);
                continue;
            };
            let eps: &[EndpointDef] = match &def.kind {
                ClusterKind::Eds { service_name } => self
                    .endpoints
                    .get(service_name)
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                ClusterKind::Static => &def.static_endpoints,
                ClusterKind::OriginalDst => &[],
            };
            let budget = self
                .clusters
                .get(&name)
                .map(|c| c.budget.clone())
                .unwrap_or_default();
            let breaker = match self.clusters.get(&name) {
                Some(old) if old.breaker.limits == def.limits => old.breaker.clone(),
                old => {
                    // Connections opened under other limits hold no permit of the new ones;
                    // they are not reused (upstream.rs), and the idle ones go now.
                    for ep in old.iter().flat_map(|c| c.endpoints.endpoints()) {
                        ep.pool.clear();
                    }
                    Arc::new(crate::breaker::Breaker::new(def.limits.clone()))
                }
            };
            let set = match self.clusters.get(&name) {
                Some(old)
                    if old.endpoints.same_endpoints(eps)
                        && old.endpoints.outlier() == &def.outlier
                        && old.endpoints.balancer() == def.balancer =>
                {
                    old.endpoints.clone()
                }
                Some(old) => Arc::new(old.endpoints.update(eps, def.outlier.clone(), def.balancer)),
                None => Arc::new(EndpointSet::new(
                    eps,
                    def.outlier.clone(),
                    def.balancer,
                    BackendCounter::new(&metrics.ejections, &name),
                )),
            };
            self.clusters.insert(
                name.clone(),
                Arc::new(Cluster {
                    name: name.clone(),
                    kind: def.kind.clone(),
                    protocol: def.protocol,
                    connect_timeout: def.connect_timeout,
                    outlier: def.outlier.clone(),
                    max_requests: def.max_requests,
                    limits: def.limits.clone(),
                    endpoints: set,
                    budget,
                    breaker,
                    dynamic: Default::default(),
                }),
            );
        }
        self.generation += 1;
        self.changed = false;
        let mut listeners = self.listeners.clone();
        if let Some(outbound) = &self.outbound {
            listeners.insert(outbound.name.clone(), outbound.clone());
        }
        Snapshot {
            generation: self.generation,
            listeners,
            routes: self.routes.clone(),
            clusters: self.clusters.clone(),
            secrets: self.secrets.clone(),
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
