//! The Kubernetes source: one kube-rs watcher per kind, with backoff, feeding the index. A
//! watcher's initial list (and every relist after a restart) replaces that kind as a whole.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use std::collections::BTreeSet;

use futures::TryStreamExt;
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use mesh_api::crds::{AuthorizationPolicy, FaultInjection, RateLimitPolicy, TrafficPolicy};
use mesh_api::rollout::Rollout;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{ConfigErrors, ManifestError};
use crate::index::Index;
use crate::objects::{DocError, Kind, ObjKey, Object};

/// Applies one watcher event to the index; `buffer` holds an initial list being received.
pub fn apply_event<K>(
    event: watcher::Event<K>,
    kind: Kind,
    wrap: fn(K) -> Object,
    buffer: &mut Vec<Object>,
    sink: &Sink,
) {
    let Sink {
        index,
        errors,
        synced,
    } = sink;
    let report = |key: &ObjKey, e: Option<DocError>| {
        let source = key.to_string();
        let errs = e
            .map(|e| {
                warn!(object = %key, field = %e.field, reason = %e.reason, "object refused");
                vec![ManifestError {
                    source: source.clone(),
                    document: 0,
                    kind: Some(key.kind.to_string()),
                    name: Some(key.name.clone()),
                    field: e.field,
                    reason: e.reason,
                }]
            })
            .unwrap_or_default();
        errors.set(&source, errs);
    };
    let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
    match event {
        watcher::Event::Init => buffer.clear(),
        watcher::Event::InitApply(obj) => buffer.push(wrap(obj)),
        watcher::Event::InitDone => {
            let objects = std::mem::take(buffer);
            let keys: Vec<ObjKey> = objects.iter().map(Object::key).collect();
            let refused = index.reset(kind, objects);
            for key in &keys {
                report(
                    key,
                    refused
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, e)| e.clone()),
                );
            }
            info!(%kind, objects = keys.len(), "listed");
            synced.send_modify(|s| {
                s.insert(kind);
            });
        }
        watcher::Event::Apply(obj) => {
            let obj = wrap(obj);
            let key = obj.key();
            debug!(object = %key, "watch event: applied");
            report(&key, index.apply(obj).err());
        }
        watcher::Event::Delete(obj) => {
            let key = wrap(obj).key();
            debug!(object = %key, "watch event: deleted");
            index.delete(&key);
            report(&key, None);
        }
    }
}

pub async fn watch_kind<K>(api: Api<K>, kind: Kind, wrap: fn(K) -> Object, sink: Sink)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut buffer = Vec::new();
    let stream = watcher(api, watch_config(kind)).default_backoff();
    futures::pin_mut!(stream);
    loop {
        match stream.try_next().await {
            Ok(Some(event)) => apply_event(event, kind, wrap, &mut buffer, &sink),
            Ok(None) => return,
            // The backoff above spaces retries; say why each one happens.
            Err(e) => warn!(%kind, error = %e, "watch failed; retrying"),
        }
    }
}

/// What a kind's watch asks for: Secrets only of the TLS type (the certificates of Gateway
/// listeners), so the controller never holds the cluster's other Secrets; everything else whole.
fn watch_config(kind: Kind) -> watcher::Config {
    match kind {
        Kind::Secret => watcher::Config::default().fields("type=kubernetes.io/tls"),
        _ => watcher::Config::default(),
    }
}

/// Where watch events go: the index, the error report, and the set of kinds listed so far.
#[derive(Clone, Debug)]
pub struct Sink {
    pub index: Arc<Mutex<Index>>,
    pub errors: ConfigErrors,
    pub synced: watch::Sender<BTreeSet<Kind>>,
}

impl Sink {
    pub fn new(index: Arc<Mutex<Index>>, errors: ConfigErrors) -> Self {
        Self {
            index,
            errors,
            synced: watch::Sender::new(BTreeSet::new()),
        }
    }

    /// Waits until every kind has been listed once, or `timeout` passes; returns the kinds
    /// still missing (a CRD that is not installed never lists).
    pub async fn wait_synced(&self, timeout: std::time::Duration) -> Vec<Kind> {
        let mut rx = self.synced.subscribe();
        let all = |s: &BTreeSet<Kind>| Kind::ALL.iter().all(|k| s.contains(k));
        let _ = tokio::time::timeout(timeout, rx.wait_for(all)).await;
        let done = rx.borrow().clone();
        Kind::ALL
            .into_iter()
            .filter(|k| !done.contains(k))
            .collect()
    }
}

/// Starts a watcher per kind. They run until the returned tasks are aborted.
pub fn spawn_watchers(client: Client, sink: &Sink) -> Vec<tokio::task::JoinHandle<()>> {
    macro_rules! watch {
        ($ty:ty, $kind:expr, $variant:path) => {
            tokio::spawn(watch_kind::<$ty>(
                Api::all(client.clone()),
                $kind,
                $variant,
                sink.clone(),
            ))
        };
    }
    vec![
        watch!(Namespace, Kind::Namespace, Object::Namespace),
        watch!(Service, Kind::Service, Object::Service),
        watch!(EndpointSlice, Kind::EndpointSlice, Object::EndpointSlice),
        watch!(Pod, Kind::Pod, Object::Pod),
        watch!(HttpRoute, Kind::HTTPRoute, Object::HttpRoute),
        watch!(GrpcRoute, Kind::GRPCRoute, Object::GrpcRoute),
        watch!(
            AuthorizationPolicy,
            Kind::AuthorizationPolicy,
            Object::AuthorizationPolicy
        ),
        watch!(TrafficPolicy, Kind::TrafficPolicy, Object::TrafficPolicy),
        watch!(
            RateLimitPolicy,
            Kind::RateLimitPolicy,
            Object::RateLimitPolicy
        ),
        watch!(FaultInjection, Kind::FaultInjection, Object::FaultInjection),
        watch!(Rollout, Kind::Rollout, Object::Rollout),
        watch!(ReferenceGrant, Kind::ReferenceGrant, Object::ReferenceGrant),
        watch!(GatewayClass, Kind::GatewayClass, Object::GatewayClass),
        watch!(Gateway, Kind::Gateway, Object::Gateway),
        watch!(Secret, Kind::Secret, Object::Secret),
    ]
}

#[cfg(test)]
#[path = "kube_tests.rs"]
mod tests;
