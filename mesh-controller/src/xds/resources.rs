//! Encoded xDS resources with stable versions, and the layered set a proxy sees.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;

/// The resource types the controller serves (serialized as `CDS`, `EDS`, `LDS`, `RDS`,
/// `SDS`). Secrets are a Gateway listener's certificates; a proxy's own SVID never comes from
/// the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Cluster,
    Endpoint,
    Listener,
    Route,
    Secret,
}

impl ResourceType {
    /// In the order a push sends them: clusters and endpoints before the listeners and routes
    /// that use them (make before break).
    pub const ALL: [ResourceType; 5] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Secret,
        ResourceType::Listener,
        ResourceType::Route,
    ];

    pub fn type_url(self) -> String {
        match self {
            ResourceType::Cluster => Cluster::type_url(),
            ResourceType::Endpoint => ClusterLoadAssignment::type_url(),
            ResourceType::Listener => Listener::type_url(),
            ResourceType::Route => RouteConfiguration::type_url(),
            ResourceType::Secret => Secret::type_url(),
        }
    }

    /// The protobuf type name; `type_url` is it behind `type.googleapis.com/`. Spelled out so
    /// that reading every request's type URL allocates nothing.
    fn type_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => "envoy.config.endpoint.v3.ClusterLoadAssignment",
            ResourceType::Listener => "envoy.config.listener.v3.Listener",
            ResourceType::Route => "envoy.config.route.v3.RouteConfiguration",
            ResourceType::Secret => "envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        let name = url.strip_prefix("type.googleapis.com/")?;
        Self::ALL.into_iter().find(|t| t.type_name() == name)
    }

    /// Listeners and clusters may be subscribed to as a wildcard ("everything for me").
    pub fn wildcard_allowed(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    pub fn short(self) -> &'static str {
        match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
            ResourceType::Secret => "SDS",
        }
    }
}

impl Serialize for ResourceType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.short())
    }
}

/// One encoded resource. Its version is a hash of its bytes, so an unchanged resource keeps
/// its version across rebuilds and is never sent twice. The name is shared (`Arc<str>`) with
/// every stream's record of what it holds.
#[derive(Debug, PartialEq)]
pub struct Resource {
    pub name: Arc<str>,
    /// The hash as sent on the wire (16 hex digits).
    pub version: String,
    /// The same hash as a number, for streams' records.
    pub tag: u64,
    pub any: Any,
}

/// The hash of encoded bytes that versions are made of: stable across runs and platforms (a
/// restarted controller gives unchanged resources the same versions), at memory speed over
/// the megabytes of a large mesh's Host-routed RouteConfiguration.
pub fn hash_bytes(b: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(b)
}

impl Resource {
    pub fn new<M: Message + Name>(name: &str, msg: &M) -> Arc<Self> {
        Self::from_encoded(name, M::type_url(), super::canonical::encode(msg))
    }

    /// A resource from bytes already encoded as a message of `type_url`.
    pub fn from_encoded(name: &str, type_url: String, value: Vec<u8>) -> Arc<Self> {
        let tag = hash_bytes(&value);
        Arc::new(Self {
            name: Arc::from(name),
            version: format!("{tag:016x}"),
            tag,
            any: Any { type_url, value },
        })
    }

    /// The tag of a version string this controller sent (a proxy's `initial_resource_versions`);
    /// `None` for anything else.
    pub fn parse_version(version: &str) -> Option<u64> {
        (version.len() == 16)
            .then(|| u64::from_str_radix(version, 16).ok())
            .flatten()
    }
}

/// Resources by type and name, in persistent maps: a clone is O(1) and shares everything, so
/// the shared layer is updated in place and handed to every stream each revision.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    by_type: BTreeMap<ResourceType, imbl::OrdMap<Arc<str>, Arc<Resource>>>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.by_type.values().all(imbl::OrdMap::is_empty)
    }

    pub fn insert(&mut self, ty: ResourceType, res: Arc<Resource>) {
        self.by_type
            .entry(ty)
            .or_default()
            .insert(res.name.clone(), res);
    }

    pub fn remove(&mut self, ty: ResourceType, name: &str) -> Option<Arc<Resource>> {
        self.by_type.get_mut(&ty)?.remove(name)
    }

    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.by_type.get(&ty)?.get(name)
    }

    pub fn iter(&self, ty: ResourceType) -> impl Iterator<Item = &Arc<Resource>> {
        self.by_type.get(&ty).into_iter().flat_map(|m| m.values())
    }
}

/// What changed in the shared layers between two consecutive published revisions, so a stream
/// that saw the first need only look at these names (plus its own small layers).
#[derive(Debug, Default)]
pub struct Changes {
    /// The revision these changes start from.
    pub from: u64,
    pub by_type: BTreeMap<ResourceType, Vec<Arc<str>>>,
}

/// What one proxy sees: shared layers, most specific first. A name found in an earlier layer
/// hides the same name in later ones.
#[derive(Clone, Debug)]
pub struct ProxyView {
    /// Model revision it was built from (the `system_version_info` of Delta responses).
    pub revision: u64,
    /// Layers served to wildcard and named subscriptions.
    pub layers: Vec<Arc<Resources>>,
    /// Resources served only when asked for by name, in order (API listeners for proxyless
    /// gRPC; for a scoped proxy also every Service's resources and the address listeners).
    pub named_only: Vec<Arc<Resources>>,
    /// How many of `named_only`'s first layers are the proxy's own (rebuilt per revision, and
    /// so compared whole by [`ProxyView::candidates`], as the own `layers` are).
    pub own_named: usize,
    /// How many of `layers`' last layers are shared by every proxy of the model (covered by
    /// `changes`, not compared whole): the shared layer, and before it the upstream TLS
    /// clusters for an Envoy that originates mesh TLS.
    pub shared_layers: usize,
    /// How the shared layers and `named_only` differ from the revision before.
    pub changes: Arc<Changes>,
}

impl ProxyView {
    pub fn get(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.layers
            .iter()
            .find_map(|l| l.get(ty, name))
            .or_else(|| self.named_only.iter().find_map(|l| l.get(ty, name)))
    }

    /// A resource a wildcard subscription to `ty` gets, by name.
    pub fn get_wildcard(&self, ty: ResourceType, name: &str) -> Option<&Arc<Resource>> {
        self.layers.iter().find_map(|l| l.get(ty, name))
    }

    /// The names of `ty` that may differ between `prev` (the view a stream last served from)
    /// and this view: `None` when `prev` is not of the revision just before this one (then
    /// everything must be compared).
    pub fn candidates<'a>(&'a self, ty: ResourceType, prev: &'a ProxyView) -> Option<Vec<&'a str>> {
        if self.changes.from != prev.revision || prev.revision == self.revision {
            return None;
        }
        // Every layer but the shared ones is small and rebuilt per revision: all of it,
        // before and after, so removals there are seen too.
        let own = |v: &'a ProxyView| {
            v.layers[..v.layers.len().saturating_sub(v.shared_layers)]
                .iter()
                .chain(&v.named_only[..v.own_named.min(v.named_only.len())])
        };
        let mut names: Vec<&str> = own(self)
            .chain(own(prev))
            .flat_map(|l| l.iter(ty))
            .map(|r| &*r.name)
            .collect();
        names.extend(
            self.changes
                .by_type
                .get(&ty)
                .into_iter()
                .flatten()
                .map(|n| &**n),
        );
        Some(names)
    }

    /// Everything a wildcard subscription to `ty` gets.
    pub fn wildcard(&self, ty: ResourceType) -> BTreeMap<&str, &Arc<Resource>> {
        let mut out = BTreeMap::new();
        for layer in &self.layers {
            for r in layer.iter(ty) {
                out.entry(&*r.name).or_insert(r);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip() {
        for ty in ResourceType::ALL {
            assert_eq!(
                ty.type_url(),
                format!("type.googleapis.com/{}", ty.type_name())
            );
            assert_eq!(ResourceType::from_type_url(&ty.type_url()), Some(ty));
        }
        assert_eq!(
            ResourceType::from_type_url("type.googleapis.com/envoy.Other"),
            None
        );
    }
}
