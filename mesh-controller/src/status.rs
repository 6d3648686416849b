//! Status written by one controller replica (the holder of a Lease): HTTPRoute and GRPCRoute
//! `status.parents` for Service parents (GAMMA) and for parents that are Gateways of ours, and
//! the status of our GatewayClasses and Gateways (with their listeners). For each parentRef:
//! `Accepted` (false with `NoMatchingParent` when the Service or its port, or the Gateway's
//! listener, does not exist, `NotAllowedByListeners`, `NoMatchingListenerHostname`,
//! `UnsupportedValue` when the route was refused) and `ResolvedRefs` (false with
//! `BackendNotFound`, `InvalidKind` or `RefNotPermitted`). Entries and conditions of other
//! controllers are kept; a condition keeps its `lastTransitionTime` while its status and reason
//! stay the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::index::gateway::GatewayModel;
use crate::index::routes::RouteSpec;
use crate::index::{Index, Model, ResolveError};
use crate::lease::LeaseLock;
use crate::objects::{Kind, ObjKey};
use crate::provision::Provisioned;
use crate::source::ConfigErrors;
use crate::xds::server::Hub;

/// The `controllerName` of the status entries this controller writes.
pub const CONTROLLER_NAME: &str = "mesh.dev/mesh-controller";

pub use crate::index::model::Cond;

/// What the controller says about one parentRef (by its index in `spec.parentRefs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentStatus {
    pub index: usize,
    pub accepted: Cond,
    pub resolved_refs: Cond,
}

/// The status a route should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Parsed: a status per Service parent.
    Parents(Vec<ParentStatus>),
    /// Refused outright: every Service parent, and every parent that is one of `gateways`
    /// (ours, `namespace/name`), is not accepted, for this reason.
    Refused { why: String, gateways: Vec<String> },
}

fn joined(reasons: Vec<&str>) -> String {
    let mut r: Vec<&str> = reasons;
    r.sort_unstable();
    r.dedup();
    r.join("; ")
}

/// Statuses from the routes the index holds, the references the model could not resolve,
/// and the routes refused outright (by `Kind/namespace/name`).
pub fn desired(
    routes: &[Arc<RouteSpec>],
    errors: &[ResolveError],
    refused: &BTreeMap<ObjKey, String>,
    gateways: &crate::index::gateway::Gateways,
) -> BTreeMap<ObjKey, Desired> {
    let gateway_parents = &gateways.route_parents;
    let mut out = BTreeMap::new();
    for spec in routes {
        let mine: Vec<&ResolveError> = errors.iter().filter(|e| e.object == spec.key).collect();
        let backend: Vec<&ResolveError> = mine
            .iter()
            .copied()
            .filter(|e| e.field.starts_with("spec.rules"))
            .collect();
        let resolved_refs = match backend.first() {
            None => Cond {
                ok: true,
                reason: "ResolvedRefs".into(),
                message: "every backendRef resolves".into(),
            },
            Some(first) => Cond {
                ok: false,
                reason: first.condition.reason().into(),
                message: joined(backend.iter().map(|e| e.reason.as_str()).collect()),
            },
        };
        let on_gateways =
            gateway_parents
                .get(&spec.key)
                .into_iter()
                .flatten()
                .map(|(index, accepted)| ParentStatus {
                    index: *index,
                    accepted: accepted.clone(),
                    resolved_refs: resolved_refs.clone(),
                });
        let parents = spec
            .parents
            .iter()
            .map(|p| {
                let prefix = format!("spec.parentRefs[{}]", p.index);
                let problems: Vec<&str> = mine
                    .iter()
                    .filter(|e| e.field.starts_with(&prefix))
                    .map(|e| e.reason.as_str())
                    .collect();
                let accepted = if problems.is_empty() {
                    Cond {
                        ok: true,
                        reason: "Accepted".into(),
                        message: "routed by the mesh".into(),
                    }
                } else {
                    Cond {
                        ok: false,
                        reason: "NoMatchingParent".into(),
                        message: joined(problems),
                    }
                };
                ParentStatus {
                    index: p.index,
                    accepted,
                    resolved_refs: resolved_refs.clone(),
                }
            })
            .chain(on_gateways)
            .collect();
        out.insert(spec.key.clone(), Desired::Parents(parents));
    }
    for (key, why) in refused {
        out.insert(
            key.clone(),
            Desired::Refused {
                why: why.clone(),
                gateways: gateways.gateways.keys().cloned().collect(),
            },
        );
    }
    out
}

fn is_service_parent(p: &Value) -> bool {
    let group = p
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or("gateway.networking.k8s.io");
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    (group.is_empty() || group == "core") && kind == "Service"
}

/// `namespace/name` of a parentRef that is a Gateway (its namespace defaulting to the route's).
fn gateway_parent(p: &Value, route_namespace: &str) -> Option<String> {
    let group = p
        .get("group")
        .and_then(Value::as_str)
        .unwrap_or(crate::index::grants::GATEWAY_GROUP);
    let kind = p.get("kind").and_then(Value::as_str).unwrap_or("Gateway");
    (group == crate::index::grants::GATEWAY_GROUP && kind == "Gateway").then(|| {
        let ns = p
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or(route_namespace);
        format!(
            "{ns}/{}",
            p.get("name").and_then(Value::as_str).unwrap_or_default()
        )
    })
}

fn condition(kind: &str, c: &Cond, generation: i64, previous: Option<&Value>, now: &str) -> Value {
    let status = if c.ok { "True" } else { "False" };
    // The transition time moves only when the status or the reason does.
    let since = previous
        .filter(|p| p["status"] == status && p["reason"] == c.reason.as_str())
        .and_then(|p| p.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    json!({"type": kind, "status": status, "reason": c.reason, "message": c.message,
           "observedGeneration": generation, "lastTransitionTime": since})
}

/// The `status.parents` a live route should have: other controllers' entries as they are,
/// then ours. `None` when it already has them.
pub fn next_parents(live: &Value, want: &Desired, now: &str) -> Option<Vec<Value>> {
    let generation = live
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let spec_parents = live
        .pointer("/spec/parentRefs")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let current = live
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let route_namespace = live
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let ours_before: Vec<&Value> = current
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    let previous = |parent_ref: &Value, kind: &str| -> Option<Value> {
        ours_before
            .iter()
            .find(|p| p["parentRef"] == *parent_ref)
            .and_then(|p| p["conditions"].as_array())
            .and_then(|cs| cs.iter().find(|c| c["type"] == kind).cloned())
    };
    let entries: Vec<(Value, Cond, Option<Cond>)> = match want {
        Desired::Parents(ps) => ps
            .iter()
            .filter_map(|p| {
                let r = spec_parents.get(p.index)?.clone();
                Some((r, p.accepted.clone(), Some(p.resolved_refs.clone())))
            })
            .collect(),
        Desired::Refused { why, gateways } => spec_parents
            .iter()
            .filter(|p| {
                is_service_parent(p)
                    || gateway_parent(p, &route_namespace).is_some_and(|g| gateways.contains(&g))
            })
            .map(|r| {
                let c = Cond {
                    ok: false,
                    reason: "UnsupportedValue".into(),
                    message: why.clone(),
                };
                (r.clone(), c, None)
            })
            .collect(),
    };
    let mut next: Vec<Value> = current
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    for (parent_ref, accepted, resolved) in entries {
        let mut conditions = vec![condition(
            "Accepted",
            &accepted,
            generation,
            previous(&parent_ref, "Accepted").as_ref(),
            now,
        )];
        if let Some(r) = resolved {
            conditions.push(condition(
                "ResolvedRefs",
                &r,
                generation,
                previous(&parent_ref, "ResolvedRefs").as_ref(),
                now,
            ));
        }
        next.push(
            json!({"parentRef": parent_ref, "controllerName": CONTROLLER_NAME,
                         "conditions": conditions}),
        );
    }
    (next != current).then_some(next)
}

fn api_resource(kind: Kind) -> Option<ApiResource> {
    let (k, plural) = match kind {
        Kind::HTTPRoute => ("HTTPRoute", "httproutes"),
        Kind::GRPCRoute => ("GRPCRoute", "grpcroutes"),
        Kind::Gateway => ("Gateway", "gateways"),
        Kind::GatewayClass => ("GatewayClass", "gatewayclasses"),
        _ => return None,
    };
    Some(ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: k.into(),
        plural: plural.into(),
    })
}

/// Writes the statuses, while this replica holds the Lease.
pub struct StatusWriter {
    pub client: kube::Client,
    pub index: Arc<Mutex<Index>>,
    pub hub: Arc<Hub>,
    pub errors: ConfigErrors,
    pub lease: LeaseLock,
    /// How often the lease is renewed and statuses are compared.
    pub interval: Duration,
    /// Set while this replica holds the Lease (the rollout driver acts only then).
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// Each Gateway's Deployment, Service and ServiceAccount, applied before its status is
    /// written; `None`: Gateways' proxies are run by someone else.
    pub provisioning: Option<crate::provision::Provisioning>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Routes refused outright, from the source's errors (`Kind/namespace/name` sources).
fn refused_routes(errors: &ConfigErrors) -> BTreeMap<ObjKey, String> {
    let mut out = BTreeMap::new();
    for e in errors.all() {
        let mut parts = e.source.splitn(3, '/');
        let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let kind = match kind {
            "HTTPRoute" => Kind::HTTPRoute,
            "GRPCRoute" => Kind::GRPCRoute,
            _ => continue,
        };
        let why = if e.field.is_empty() {
            e.reason.clone()
        } else {
            format!("{}: {}", e.field, e.reason)
        };
        out.insert(
            ObjKey {
                kind,
                namespace: ns.into(),
                name: name.into(),
            },
            why,
        );
    }
    out
}

impl StatusWriter {
    /// Renews the Lease every interval; while leading, writes what changed. Never returns.
    pub async fn run(self) {
        let mut last_revision = None;
        let mut last_served: Option<BTreeSet<String>> = None;
        let mut last_full = Instant::now();
        loop {
            let leading = match self.lease.try_acquire_or_renew(Timestamp::now()).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "renewing the leader lease");
                    false
                }
            };
            self.leading
                .store(leading, std::sync::atomic::Ordering::Relaxed);
            let model = self.hub.model();
            let served = served_gateways(&self.hub.status.snapshot());
            // A full pass now and then repairs statuses someone else changed; a Gateway whose
            // proxies came or went gets its Programmed at once.
            let due = last_revision != Some(model.revision)
                || last_served.as_ref() != Some(&served)
                || last_full.elapsed() > Duration::from_secs(60);
            if leading && due {
                match self.write_all_served(&model, &served).await {
                    // A Gateway whose objects failed to apply: the next tick passes again.
                    Ok((_, false)) => last_revision = None,
                    Ok((n, true)) => {
                        last_revision = Some(model.revision);
                        last_served = Some(served);
                        last_full = Instant::now();
                        if n > 0 {
                            debug!(routes = n, "route statuses written");
                        }
                    }
                    Err(e) => warn!(error = %e, "writing route statuses"),
                }
            } else if !leading {
                last_revision = None;
                last_served = None;
            }
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Writes every route, GatewayClass and Gateway whose status differs, with the Gateways
    /// the proxies connected now serve; returns how many were written.
    pub async fn write_all(&self, model: &Model) -> Result<usize, kube::Error> {
        let served = served_gateways(&self.hub.status.snapshot());
        self.write_all_served(model, &served).await.map(|(n, _)| n)
    }

    /// [`StatusWriter::write_all`], with the Gateways `served`; and whether every Gateway
    /// settled (none failed to apply its objects).
    async fn write_all_served(
        &self,
        model: &Model,
        served: &BTreeSet<String>,
    ) -> Result<(usize, bool), kube::Error> {
        let routes = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .route_specs();
        let want = desired(
            &routes,
            &model.errors,
            &refused_routes(&self.errors),
            &model.gateways,
        );
        let now = Timestamp::now().to_string();
        // One object's failure is logged and leaves the others to be written; the pass then
        // fails with it, so the next one tries again.
        let mut failed = None;
        let mut settled = true;
        let mut written = self
            .write_gateways(model, served, &now, &mut failed, &mut settled)
            .await;
        for (key, d) in want {
            let Some(ar) = api_resource(key.kind) else {
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.namespace, &ar);
            let result = self
                .write_one(&api, &key.name, |live| {
                    next_parents(live, &d, &now).map(|parents| json!({"parents": parents}))
                })
                .await;
            tally(result, &key.to_string(), &mut written, &mut failed);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((written, settled)),
        }
    }

    /// Our GatewayClasses' `Accepted`, and each Gateway's objects and status; `settled`
    /// turns false for a Gateway that is to be tried again soon.
    async fn write_gateways(
        &self,
        model: &Model,
        served: &BTreeSet<String>,
        now: &str,
        failed: &mut Option<kube::Error>,
        settled: &mut bool,
    ) -> usize {
        let mut written = 0;
        let class_api: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &api_resource(Kind::GatewayClass).expect("a resource"),
        );
        // One object's failure is logged and leaves the others (and the routes) to be written.
        for (name, generation) in &model.gateways.classes {
            let result = self
                .write_one(&class_api, name, |live| {
                    class_status(live, *generation, now)
                })
                .await;
            tally(
                result,
                &format!("GatewayClass/{name}"),
                &mut written,
                failed,
            );
        }
        let ar = api_resource(Kind::Gateway).expect("a resource");
        for g in model.gateways.gateways.values() {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &g.namespace, &ar);
            let name = format!("{}/{}", g.namespace, g.name);
            let service_exists = model.services.contains_key(&crate::index::SvcKey::new(
                &g.namespace,
                crate::provision::object_name(&g.name),
            ));
            let result = self
                .write_gateway(&api, g, served.contains(&name), service_exists, now)
                .await
                .map(|(n, done)| {
                    *settled &= done;
                    n
                });
            tally(result, &format!("Gateway/{name}"), &mut written, failed);
        }
        if let Some(p) = &self.provisioning {
            p.retain(|k| model.gateways.gateways.contains_key(k));
        }
        written
    }

    /// Gateway `g`'s objects applied (with provisioning on), then its status; and whether it
    /// settled (false when its objects failed to apply).
    async fn write_gateway(
        &self,
        api: &Api<DynamicObject>,
        g: &GatewayModel,
        served: bool,
        service_exists: bool,
        now: &str,
    ) -> Result<(usize, bool), kube::Error> {
        let Some(live) = read_live(api, &g.name).await? else {
            return Ok((0, true));
        };
        let provisioned = match &self.provisioning {
            // Only for the generation the model read: the next pass applies a newer one.
            Some(p) if generation_of(&live) == g.generation => {
                p.provision(&self.client, g, &live, service_exists).await
            }
            Some(_) => return Ok((0, true)),
            None => Provisioned::Off,
        };
        let settled = match &provisioned {
            Provisioned::Refused(why) | Provisioned::Unusable(why) | Provisioned::Failed(why) => {
                warn!(gateway = %format!("{}/{}", g.namespace, g.name), error = %why, "provisioning a Gateway");
                !matches!(provisioned, Provisioned::Failed(_))
            }
            // A load balancer's address comes when it comes: the next full pass (a minute at
            // most) reads it, rather than every pass of every route each tick meanwhile.
            Provisioned::Applied { .. } | Provisioned::Off => true,
        };
        let written = match gateway_status(g, served, &provisioned, &live, now) {
            Some(status) => self.patch_status(api, &g.name, &live, status).await?,
            None => 0,
        };
        Ok((written, settled))
    }

    /// Reads an object and merge-patches the status `next` makes of it, if any; 1 when
    /// written, 0 when there was nothing to write or it went meanwhile.
    async fn write_one(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        next: impl FnOnce(&Value) -> Option<Value>,
    ) -> Result<usize, kube::Error> {
        let Some(live) = read_live(api, name).await? else {
            return Ok(0);
        };
        match next(&live) {
            Some(status) => self.patch_status(api, name, &live, status).await,
            None => Ok(0),
        }
    }

    /// A merge patch of `status` over the resourceVersion read; 1 when written, 0 when the
    /// object changed meanwhile (the next pass reads it again).
    async fn patch_status(
        &self,
        api: &Api<DynamicObject>,
        name: &str,
        live: &Value,
        status: Value,
    ) -> Result<usize, kube::Error> {
        let patch = json!({
            "metadata": {"resourceVersion": live.pointer("/metadata/resourceVersion")},
            "status": status
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(1),
            // Changed or gone meanwhile: the next pass reads it again.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// The object `name` as the API server has it, as JSON; `None` when it is gone.
async fn read_live(api: &Api<DynamicObject>, name: &str) -> Result<Option<Value>, kube::Error> {
    Ok(api
        .get_opt(name)
        .await?
        .map(|o| serde_json::to_value(&o).unwrap_or_default()))
}

/// Counts a status written, or logs why it was not (`what`: the object) and keeps the first
/// failure, so that one object's failure leaves the others to be written.
fn tally(
    result: Result<usize, kube::Error>,
    what: &str,
    written: &mut usize,
    failed: &mut Option<kube::Error>,
) {
    match result {
        Ok(n) => *written += n,
        Err(e) => {
            warn!(object = what, error = %e, "writing a status");
            failed.get_or_insert(e);
        }
    }
}

/// `conditions` with ours set (each keeping its transition time while status and reason
/// hold) and the others' kept, in the order they were.
fn merged_conditions(
    current: Option<&Value>,
    ours: &[(&str, Cond)],
    generation: i64,
    now: &str,
) -> Vec<Value> {
    let current: Vec<Value> = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<Value> = current
        .iter()
        .filter(|c| !ours.iter().any(|(t, _)| c["type"] == *t))
        .cloned()
        .collect();
    for (kind, c) in ours {
        let previous = current.iter().find(|p| p["type"] == *kind);
        out.push(condition(kind, c, generation, previous, now));
    }
    out
}

fn generation_of(live: &Value) -> i64 {
    live.pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

/// A GatewayClass of ours: `Accepted`, for the `generation` the model read. `None` when it
/// already says so, or when the live class is of another generation (the model will catch up,
/// and the pass after it writes).
pub fn class_status(live: &Value, generation: i64, now: &str) -> Option<Value> {
    if generation_of(live) != generation {
        return None;
    }
    let accepted = Cond {
        ok: true,
        reason: "Accepted".into(),
        message: "served by mesh".into(),
    };
    let current = live.pointer("/status/conditions");
    let conditions = merged_conditions(current, &[("Accepted", accepted)], generation, now);
    (Some(&json!(conditions)) != current).then(|| json!({"conditions": conditions}))
}

/// The Gateways (`namespace/name`) that a connected gateway proxy serves: it has acknowledged
/// a configuration of every type it asked for and refused none since. A push on its way (types
/// not yet acknowledged again) does not count against it, so a Gateway does not flap with
/// every publish; a refused one does.
pub fn served_gateways(proxies: &[crate::xds::status::ProxyStatus]) -> BTreeSet<String> {
    use crate::xds::status::SyncState;
    proxies
        .iter()
        .filter(|p| {
            !p.types.is_empty()
                && p.types
                    .values()
                    .all(|t| !matches!(t.state, SyncState::Nacked) && !t.acked_version.is_empty())
        })
        .filter_map(|p| p.gateway.clone())
        .collect()
}

/// A Gateway's status: `Accepted` and `Programmed`, its addresses, and per listener its
/// conditions, route kinds and attached routes. `Programmed` is true once a gateway proxy has
/// acknowledged the Gateway's configuration (`served`), false with `Pending` before, and false
/// with `Invalid` on a listener that cannot be served. What came of provisioning its objects
/// (`provisioned`) gives its addresses, and may hold `Programmed` false: `Invalid` for
/// objects refused, `Pending` while applying them fails, `AddressNotAssigned` while its load
/// balancer has no address.
/// `None` when it already has this status, or when the live Gateway is of another generation
/// than the model read (the pass after the model catches up writes it).
pub fn gateway_status(
    g: &GatewayModel,
    served: bool,
    provisioned: &Provisioned,
    live: &Value,
    now: &str,
) -> Option<Value> {
    let generation = g.generation;
    if generation_of(live) != generation {
        return None;
    }
    let not_yet = |reason: &str, message: String| Cond {
        ok: false,
        reason: reason.into(),
        message,
    };
    // Addresses are the provisioned Service's; none for a Gateway not provisioned (or no longer),
    // and those written before are kept while applying fails.
    let (addresses, held) = match provisioned {
        Provisioned::Off => (Some(Vec::new()), None),
        Provisioned::Applied { addresses, service } => (
            Some(addresses.clone()),
            addresses.is_empty().then(|| {
                not_yet(
                    "AddressNotAssigned",
                    format!("{service} has no address yet"),
                )
            }),
        ),
        Provisioned::Refused(why) => (Some(Vec::new()), Some(not_yet("Invalid", why.clone()))),
        Provisioned::Unusable(why) => (
            Some(Vec::new()),
            Some(not_yet("AddressNotUsable", why.clone())),
        ),
        Provisioned::Failed(why) => (None, Some(not_yet("Pending", why.clone()))),
    };
    let pending = if served {
        Cond {
            ok: true,
            reason: "Programmed".into(),
            message: "a gateway proxy serves this configuration".into(),
        }
    } else {
        Cond {
            ok: false,
            reason: "Pending".into(),
            message: "no gateway proxy has acknowledged this Gateway's configuration".into(),
        }
    };
    let gateway_programmed = if let Some(held) = held.filter(|_| g.accepted.ok) {
        held
    } else if g.accepted.ok {
        pending.clone()
    } else {
        Cond {
            ok: false,
            reason: "Invalid".into(),
            message: "no listener is valid".into(),
        }
    };
    let conditions = merged_conditions(
        live.pointer("/status/conditions"),
        &[
            ("Accepted", g.accepted.clone()),
            ("Programmed", gateway_programmed),
        ],
        generation,
        now,
    );
    let live_listeners = live
        .pointer("/status/listeners")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let listeners: Vec<Value> = g
        .listeners
        .iter()
        .map(|l| {
            let before = live_listeners
                .iter()
                .find(|x| x["name"] == l.name.as_str())
                .and_then(|x| x.get("conditions"));
            let programmed = if l.programmed.ok {
                pending.clone()
            } else {
                l.programmed.clone()
            };
            let conditions = merged_conditions(
                before,
                &[
                    ("Accepted", l.accepted.clone()),
                    ("ResolvedRefs", l.resolved_refs.clone()),
                    ("Programmed", programmed),
                    ("Conflicted", l.conflicted.clone()),
                ],
                generation,
                now,
            );
            let kinds: Vec<Value> = l
                .supported_kinds
                .iter()
                .map(|k| json!({"group": crate::index::grants::GATEWAY_GROUP, "kind": k.to_string()}))
                .collect();
            json!({"name": l.name, "supportedKinds": kinds,
                   "attachedRoutes": l.attached_routes, "conditions": conditions})
        })
        .collect();
    let mut status = json!({"conditions": conditions, "listeners": listeners});
    if let Some(a) = addresses {
        status["addresses"] = json!(a);
    }
    // What the status has (a Gateway not provisioned here has no addresses to compare).
    let same = ["conditions", "listeners", "addresses"]
        .iter()
        .filter(|k| status.get(**k).is_some())
        .all(|k| live.pointer(&format!("/status/{k}")) == status.get(*k));
    (!same).then_some(status)
}

#[cfg(test)]
mod tests {
    use mesh_api::fake_api::FakeApi;

    use super::*;
    use crate::metrics::Metrics;
    use crate::testing::{obj, service_yaml, split_yaml};

    const ROUTE: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/reviews";

    fn route_json(yaml: &str) -> Value {
        let mut v: Value = serde_norway::from_str(yaml).expect("yaml");
        v["metadata"]["generation"] = json!(3);
        v
    }

    /// An index with Services `reviews` and `reviews-v1` (no `reviews-v2`), a route splitting
    /// to both, the same route in the fake API server, and a writer holding the lease.
    fn setup() -> (StatusWriter, FakeApi, Arc<Mutex<Index>>) {
        let (client, fake) = FakeApi::start();
        fake.install_chart_crds();
        let route = split_yaml(
            "shop",
            "reviews",
            "reviews",
            9080,
            &[("reviews-v1", 90), ("reviews-v2", 10)],
        );
        let mut idx = Index::new("cluster.local");
        for y in [
            service_yaml("shop", "reviews", "10.96.0.10", &[("http", 9080)]),
            service_yaml("shop", "reviews-v1", "10.96.0.11", &[("http", 9080)]),
            route.clone(),
        ] {
            idx.apply(obj(&y)).expect("valid");
        }
        let model = idx.model();
        fake.insert(route_json(&route));
        let index = Arc::new(Mutex::new(idx));
        let metrics = Arc::new(Metrics::new());
        let writer = StatusWriter {
            client: client.clone(),
            index: index.clone(),
            hub: Hub::new(model, metrics.clone()),
            errors: ConfigErrors::new(metrics),
            lease: LeaseLock::new(
                client,
                "mesh-system",
                "mesh-controller",
                "pod-a",
                Duration::from_secs(15),
            ),
            interval: Duration::from_millis(10),
            leading: Arc::default(),
            provisioning: None,
        };
        (writer, fake, index)
    }

    fn conditions(fake: &FakeApi) -> Vec<(String, String, String)> {
        let route = fake.state().objects[ROUTE].clone();
        route["status"]["parents"]
            .as_array()
            .expect("parents")
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
            .map(|c| {
                (
                    c["type"].as_str().unwrap_or("").to_owned(),
                    c["status"].as_str().unwrap_or("").to_owned(),
                    c["reason"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn a_missing_backend_is_reported_and_a_second_pass_writes_nothing() {
        let (writer, fake, _) = setup();
        assert_eq!(
            writer.write_all(&writer.hub.model()).await.expect("write"),
            1
        );
        assert_eq!(
            conditions(&fake),
            [
                ("Accepted".into(), "True".into(), "Accepted".into()),
                (
                    "ResolvedRefs".into(),
                    "False".into(),
                    "BackendNotFound".into()
                )
            ]
        );
        let route = fake.state().objects[ROUTE].clone();
        let entry = &route["status"]["parents"][0];
        assert_eq!(
            entry["parentRef"],
            json!({"group": "", "kind": "Service", "name": "reviews", "port": 9080})
        );
        assert_eq!(entry["conditions"][1]["observedGeneration"], 3);
        assert!(
            entry["conditions"][1]["message"]
                .as_str()
                .unwrap_or("")
                .contains("shop/reviews-v2 not found"),
            "{entry}"
        );
        // Nothing changed: nothing written.
        let writes = fake.writes().len();
        assert_eq!(
            writer.write_all(&writer.hub.model()).await.expect("write"),
            0
        );
        assert_eq!(fake.writes().len(), writes);
    }

    #[tokio::test]
    async fn other_controllers_entries_stay_and_transition_times_hold() {
        let (writer, fake, index) = setup();
        // As the API server stores it: the parent's group and kind filled in.
        let theirs = json!({"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"},
            "controllerName": "example.com/gateway",
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        {
            let mut s = fake.state();
            let r = s.objects.get_mut(ROUTE).expect("route");
            r["status"] = json!({"parents": [theirs.clone()]});
        }
        writer.write_all(&writer.hub.model()).await.expect("write");
        let first = fake.state().objects[ROUTE]["status"]["parents"].clone();
        assert_eq!(first[0], theirs);
        let accepted_since = first[1]["conditions"][0]["lastTransitionTime"].clone();

        // reviews-v2 appears: ResolvedRefs turns true, Accepted keeps its transition time.
        let model = {
            let mut idx = index.lock().expect("index");
            idx.apply(obj(&service_yaml(
                "shop",
                "reviews-v2",
                "10.96.0.12",
                &[("http", 9080)],
            )))
            .expect("valid");
            idx.model()
        };
        tokio::time::sleep(Duration::from_millis(1100)).await;
        writer.write_all(&model).await.expect("write");
        let next = fake.state().objects[ROUTE]["status"]["parents"].clone();
        assert_eq!(next[0], theirs);
        assert_eq!(
            next[1]["conditions"][0]["lastTransitionTime"],
            accepted_since
        );
        assert_eq!(next[1]["conditions"][1]["status"], "True");
        assert_ne!(
            next[1]["conditions"][1]["lastTransitionTime"],
            accepted_since
        );
    }

    #[tokio::test]
    async fn only_the_lease_holder_writes() {
        let (writer, fake, _) = setup();
        // Another replica holds a fresh lease.
        fake.insert(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "mesh-controller", "namespace": "mesh-system"},
            "spec": {"holderIdentity": "pod-b", "leaseDurationSeconds": 3600,
                     "renewTime": Timestamp::now().to_string()}}),
        );
        let task = tokio::spawn(writer.run());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            fake.state().objects[ROUTE].get("status").is_none(),
            "a follower wrote"
        );
        // The holder goes away: this replica takes over and writes.
        fake.state()
            .objects
            .remove("/apis/coordination.k8s.io/v1/namespaces/mesh-system/leases/mesh-controller");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.state().objects[ROUTE].get("status").is_none() {
            assert!(Instant::now() < deadline, "the new leader never wrote");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
    }

    /// The Gateways of `docs` in the index and the fake API server (generation 1), and a
    /// writer that provisions them (LoadBalancer Services unless a Gateway says otherwise;
    /// the CA root `root.pem` of the returned directory).
    fn provisioning(docs: &[&str]) -> (StatusWriter, FakeApi, Arc<Model>, tempfile::TempDir) {
        let (mut writer, fake, index) = setup();
        let dir = tempfile::tempdir().expect("a directory");
        std::fs::write(dir.path().join("root.pem"), "the root").expect("written");
        writer.provisioning = Some(crate::provision::Provisioning::new(
            crate::config::Config::local("/nowhere").inject_settings(),
            crate::provision::ServiceType::LoadBalancer,
            Some(dir.path().join("root.pem")),
        ));
        let class = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh, generation: 1}\nspec: {controllerName: mesh.dev/mesh-controller}\n";
        let mut idx = index.lock().expect("index");
        for d in std::iter::once(&class).chain(docs) {
            let mut v: Value = serde_norway::from_str(d).expect("yaml");
            v["metadata"]["generation"] = json!(1);
            idx.apply(obj(&serde_norway::to_string(&v).expect("yaml")))
                .expect("valid");
            fake.insert(v);
        }
        let model = idx.model();
        drop(idx);
        (writer, fake, model, dir)
    }

    /// The Gateway's conditions as `type=status/reason`, and its addresses.
    fn gateway_state(fake: &FakeApi, ns: &str, name: &str) -> (Vec<String>, Value) {
        let gw = fake.state().objects
            [&format!("/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/gateways/{name}")]
            .clone();
        let conds = crate::testing::condition_strings(&gw["status"]["conditions"]);
        (conds, gw["status"]["addresses"].clone())
    }

    /// A Gateway gets its ServiceAccount, Deployment and Service, owned by it and admitted as
    /// the API server admits them, and the CA root in its namespace; its addresses are its
    /// Service's: none (AddressNotAssigned) until the load balancer has one, the cluster IP for
    /// a Gateway that asks for ClusterIP. A second pass changes nothing.
    #[tokio::test]
    async fn a_gateway_gets_its_deployment_service_and_account_and_their_address() {
        let (writer, fake, model, _root) = provisioning(&[
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {labels: {team: web}, annotations: {example.com/owner: web}}\n  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n  - {name: https, port: 443, protocol: HTTPS, hostname: a.example.com, tls: {certificateRefs: [{name: missing}]}}\n  - {name: https-b, port: 443, protocol: HTTPS, hostname: b.example.com, tls: {certificateRefs: [{name: missing}]}}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: inside, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {annotations: {mesh.dev/service-type: ClusterIP}}\n  listeners: [{name: http, port: 8080, protocol: HTTP}]\n",
        ]);
        writer.write_all(&model).await.expect("write");
        let objects = fake.state().objects.clone();
        let gw_uid = objects["/apis/gateway.networking.k8s.io/v1/namespaces/infra/gateways/edge"]
            ["metadata"]["uid"]
            .clone();
        let deployment = &objects["/apis/apps/v1/namespaces/infra/deployments/edge-gateway"];
        let service = &objects["/api/v1/namespaces/infra/services/edge-gateway"];
        let account = &objects["/api/v1/namespaces/infra/serviceaccounts/edge-gateway"];
        for o in [deployment, service, account] {
            assert_eq!(
                o["metadata"]["ownerReferences"][0]["kind"], "Gateway",
                "{o}"
            );
            assert_eq!(o["metadata"]["ownerReferences"][0]["uid"], gw_uid, "{o}");
            assert_eq!(
                o["metadata"]["ownerReferences"][0]["controller"], true,
                "{o}"
            );
            assert_eq!(o["metadata"]["labels"]["team"], "web", "{o}");
            assert_eq!(
                o["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
                "edge"
            );
            assert_eq!(o["metadata"]["annotations"]["example.com/owner"], "web");
        }
        let pod = &deployment["spec"]["template"];
        assert_eq!(pod["spec"]["serviceAccountName"], "edge-gateway");
        assert_eq!(pod["metadata"]["labels"]["mesh.dev/inject"], "disabled");
        assert_eq!(pod["metadata"]["labels"]["team"], "web");
        assert!(deployment["spec"].get("replicas").is_none(), "{deployment}");
        let args: Vec<&str> = pod["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.windows(2).any(|w| w == ["--gateway", "edge"]),
            "{args:?}"
        );
        assert!(!args.contains(&"--transparent"), "{args:?}");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(
            objects["/api/v1/namespaces/infra/configmaps/mesh-ca-root"]["data"]["ca.crt"],
            "the root"
        );
        assert_eq!(
            service["spec"]["ports"],
            json!([{"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP"},
                   {"name": "https-443", "port": 443, "targetPort": 443, "protocol": "TCP"}])
        );
        assert_eq!(
            service["spec"]["selector"],
            json!({"gateway.networking.k8s.io/gateway-name": "edge"})
        );
        let (conds, addresses) = gateway_state(&fake, "infra", "edge");
        assert!(
            conds.contains(&"Programmed=False/AddressNotAssigned".to_string()),
            "{conds:?}"
        );
        assert_eq!(addresses, json!([]));
        let (conds, addresses) = gateway_state(&fake, "infra", "inside");
        let ip = objects["/api/v1/namespaces/infra/services/inside-gateway"]["spec"]["clusterIP"]
            .clone();
        assert_eq!(addresses, json!([{"type": "IPAddress", "value": ip}]));
        assert!(
            conds.contains(&"Programmed=False/Pending".to_string()),
            "{conds:?}"
        );
        // The load balancer assigns an address: the next pass reports it.
        fake.state()
            .objects
            .get_mut("/api/v1/namespaces/infra/services/edge-gateway")
            .expect("the Service")["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}});
        writer.write_all(&model).await.expect("write");
        let (conds, addresses) = gateway_state(&fake, "infra", "edge");
        assert_eq!(
            addresses,
            json!([{"type": "IPAddress", "value": "203.0.113.7"}])
        );
        assert!(
            conds.contains(&"Programmed=False/Pending".to_string()),
            "{conds:?}"
        );
        // Nothing changed: the applies leave every object as it was, no status is written.
        let versions = || -> Vec<(String, Value)> {
            fake.state()
                .objects
                .iter()
                .map(|(k, v)| (k.clone(), v["metadata"]["resourceVersion"].clone()))
                .collect()
        };
        let before = versions();
        let requests = fake.state().log.len();
        assert_eq!(writer.write_all(&model).await.expect("write"), 0);
        assert_eq!(before, versions());
        // The settled Gateways, as last applied: not a request for their objects.
        let asked: Vec<String> = fake.state().log[requests..]
            .iter()
            .map(|l| format!("{} {}", l.method, l.path))
            .filter(|l| l.contains("-gateway"))
            .collect();
        assert!(asked.is_empty(), "{asked:?}");
    }

    /// A Gateway whose objects cannot be made (an invalid service type, a listener on the
    /// proxy's own port), whose object names are taken by someone else's, or that asks for
    /// addresses of its own is not Programmed, and its status says why, naming the field, value
    /// or object; nothing is applied for it and someone else's object is left as it was.
    #[tokio::test]
    async fn a_gateway_that_cannot_be_provisioned_says_why_in_its_status() {
        let (writer, fake, model, _root) = provisioning(&[
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: mine, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: fixed, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  addresses: [{type: IPAddress, value: 192.0.2.9}]\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: typo, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {annotations: {mesh.dev/service-type: Loadbalancer}}\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: taken, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners: [{name: metrics, port: 15020, protocol: HTTP}]\n",
        ]);
        // Someone's own Service of the name the Gateway's would have.
        fake.insert(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "mine-gateway", "namespace": "infra"},
            "spec": {"clusterIP": "10.96.0.99", "selector": {"app": "theirs"},
                     "ports": [{"port": 80}]}}));
        writer.write_all(&model).await.expect("write");
        for (name, reason, want) in [
            (
                "mine",
                "Invalid",
                "Service infra/mine-gateway exists and is not this Gateway's",
            ),
            (
                "fixed",
                "AddressNotUsable",
                r#"spec.addresses [{"type":"IPAddress","value":"192.0.2.9"}]"#,
            ),
            (
                "typo",
                "Invalid",
                r#"spec.infrastructure.annotations[mesh.dev/service-type] is "Loadbalancer"; expected ClusterIP, NodePort or LoadBalancer"#,
            ),
            (
                "taken",
                "Invalid",
                "listener metrics is on port 15020, the gateway proxy's own",
            ),
        ] {
            let gw = fake.state().objects
                [&format!("/apis/gateway.networking.k8s.io/v1/namespaces/infra/gateways/{name}")]
                .clone();
            let programmed = gw["status"]["conditions"]
                .as_array()
                .expect("conditions")
                .iter()
                .find(|c| c["type"] == "Programmed")
                .cloned()
                .expect("Programmed");
            assert_eq!(programmed["status"], "False");
            assert_eq!(programmed["reason"], reason, "{name}");
            assert_eq!(gw["status"]["addresses"], json!([]), "{name}");
            let message = programmed["message"].as_str().unwrap_or_default();
            assert!(message.contains(want), "{message}");
            assert!(
                !fake.state().objects.contains_key(&format!(
                    "/apis/apps/v1/namespaces/infra/deployments/{name}-gateway"
                )),
                "{name}"
            );
        }
        let theirs = fake.state().objects["/api/v1/namespaces/infra/services/mine-gateway"].clone();
        assert_eq!(theirs["spec"]["selector"], json!({"app": "theirs"}));
        assert!(
            theirs["metadata"].get("ownerReferences").is_none(),
            "{theirs}"
        );
    }

    /// Our GatewayClass is accepted; the Gateway gets its conditions and listeners (route
    /// kinds, attached routes); a route gets an entry for the Gateway parent; a second pass
    /// writes nothing.
    #[tokio::test]
    async fn a_gateway_its_class_and_its_routes_get_their_status() {
        let (writer, fake, index) = setup();
        let docs = [
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh, generation: 1}\nspec: {controllerName: mesh.dev/mesh-controller}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: shop, generation: 2}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n  - {name: udp, port: 53, protocol: UDP}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: front, namespace: shop, generation: 4}\nspec:\n  parentRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n  rules: [{backendRefs: [{name: reviews, port: 9080}]}]\n",
        ];
        let model = {
            let mut idx = index.lock().expect("index");
            for d in docs {
                idx.apply(obj(d)).expect("valid");
                let mut v: Value = serde_norway::from_str(d).expect("yaml");
                v["metadata"]["resourceVersion"] = json!("1");
                fake.insert(v);
            }
            idx.model()
        };
        // The route of setup(), the class, the Gateway and this route.
        assert_eq!(writer.write_all(&model).await.expect("write"), 4);
        let objects = fake.state().objects.clone();
        let o = |p: &str| objects[p].clone();
        let class = o("/apis/gateway.networking.k8s.io/v1/gatewayclasses/mesh");
        assert_eq!(class["status"]["conditions"][0]["type"], "Accepted");
        assert_eq!(class["status"]["conditions"][0]["status"], "True");
        assert_eq!(class["status"]["conditions"][0]["observedGeneration"], 1);
        let gw = o("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/edge");
        let cond = |c: &Value| {
            (
                c["type"].as_str().unwrap_or("").to_owned(),
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        };
        let conds = |v: &Value| {
            v.as_array()
                .expect("conditions")
                .iter()
                .map(cond)
                .collect::<Vec<_>>()
        };
        let t = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(
            conds(&gw["status"]["conditions"]),
            vec![
                t("Accepted", "True", "ListenersNotValid"),
                t("Programmed", "False", "Pending")
            ]
        );
        assert_eq!(gw["status"]["conditions"][0]["observedGeneration"], 2);
        let http = &gw["status"]["listeners"][0];
        assert_eq!(http["name"], "http");
        assert_eq!(http["attachedRoutes"], 1);
        assert_eq!(
            http["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                   {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}])
        );
        assert_eq!(
            conds(&http["conditions"]),
            vec![
                t("Accepted", "True", "Accepted"),
                t("ResolvedRefs", "True", "ResolvedRefs"),
                t("Programmed", "False", "Pending"),
                t("Conflicted", "False", "NoConflicts"),
            ]
        );
        let udp = &gw["status"]["listeners"][1];
        assert_eq!(udp["supportedKinds"], json!([]));
        assert_eq!(
            cond(&udp["conditions"][0]),
            t("Accepted", "False", "UnsupportedProtocol")
        );
        assert_eq!(
            cond(&udp["conditions"][2]),
            t("Programmed", "False", "Invalid")
        );
        let route = o("/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/front");
        let entry = &route["status"]["parents"][0];
        assert_eq!(entry["controllerName"], CONTROLLER_NAME);
        assert_eq!(
            entry["parentRef"],
            json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"})
        );
        assert_eq!(
            conds(&entry["conditions"]),
            vec![
                t("Accepted", "True", "Accepted"),
                t("ResolvedRefs", "True", "ResolvedRefs")
            ]
        );
        assert_eq!(writer.write_all(&model).await.expect("write"), 0);
    }

    /// A Gateway is Programmed while a proxy serving it has acknowledged every type and
    /// refused none; one that never acknowledged a type, or refused one, does not count, and
    /// a push on its way does not count against it.
    #[test]
    fn a_gateway_is_programmed_once_its_proxy_acknowledged_the_current_config() {
        use crate::xds::resources::ResourceType;
        use crate::xds::status::{ProxyStatus, SyncState, TypeStatus};
        let proxy = |gateway: Option<&str>, acked: &str, state: SyncState| ProxyStatus {
            node: "infra/edge-0".into(),
            namespace: "infra".into(),
            name: "edge-0".into(),
            protocol: "delta",
            user_agent: String::new(),
            admin: None,
            metrics: None,
            connected_at_unix: 0,
            gateway: gateway.map(Into::into),
            revision: 7,
            types: [(
                ResourceType::Listener,
                TypeStatus {
                    state,
                    acked_version: acked.into(),
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        };
        let served = served_gateways(&[
            proxy(Some("infra/edge"), "v1", SyncState::Synced),
            // A push on its way, after an acknowledged one: still serving.
            proxy(Some("infra/pushing"), "v1", SyncState::Stale),
            proxy(Some("infra/never"), "", SyncState::Stale),
            proxy(Some("infra/refused"), "v1", SyncState::Nacked),
            proxy(None, "v1", SyncState::Synced),
        ]);
        assert_eq!(
            served.into_iter().collect::<Vec<_>>(),
            vec!["infra/edge", "infra/pushing"]
        );
        let mut idx = Index::new("cluster.local");
        for d in [
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra, generation: 1}\nspec:\n  gatewayClassName: mesh\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
        ] {
            idx.apply(obj(d)).expect("valid");
        }
        let model = idx.model();
        let g = &model.gateways.gateways["infra/edge"];
        let live = json!({"metadata": {"generation": 1}});
        let now = "2026-12-07T00:00:00Z";
        let status = gateway_status(g, true, &Provisioned::Off, &live, now).expect("a status");
        assert_eq!(status["conditions"][1]["type"], "Programmed");
        assert_eq!(status["conditions"][1]["status"], "True");
        assert_eq!(status["listeners"][0]["conditions"][2]["status"], "True");
        let status = gateway_status(g, false, &Provisioned::Off, &live, now).expect("a status");
        assert_eq!(status["conditions"][1]["reason"], "Pending");
        // Provisioned: programmed once served and its Service has an address, which it shows.
        let address = json!({"type": "IPAddress", "value": "203.0.113.7"});
        let applied = |addresses: Vec<Value>| Provisioned::Applied {
            addresses,
            service: "Service infra/edge-gateway (LoadBalancer)".into(),
        };
        let status =
            gateway_status(g, true, &applied(vec![address.clone()]), &live, now).expect("a status");
        assert_eq!(status["conditions"][1]["status"], "True");
        assert_eq!(status["addresses"], json!([address]));
        let status = gateway_status(g, true, &applied(vec![]), &live, now).expect("a status");
        assert_eq!(status["conditions"][1]["reason"], "AddressNotAssigned");
        let failed = Provisioned::Failed("applying Deployment infra/edge-gateway: 403".into());
        let status = gateway_status(g, true, &failed, &live, now).expect("a status");
        assert_eq!(status["conditions"][1]["reason"], "Pending");
        assert!(
            status.get("addresses").is_none(),
            "kept as they were: {status}"
        );
        // The live Gateway moved on: nothing is written for the old generation.
        assert!(
            gateway_status(
                g,
                true,
                &Provisioned::Off,
                &json!({"metadata": {"generation": 2}}),
                now
            )
            .is_none()
        );
    }

    #[test]
    fn a_refused_route_is_not_accepted_on_each_service_parent() {
        let live = json!({"metadata": {"generation": 1, "namespace": "shop"}, "spec": {"parentRefs": [
            {"group": "", "kind": "Service", "name": "reviews"},
            {"name": "some-gateway"},
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}]}});
        let parents = next_parents(
            &live,
            &Desired::Refused {
                why: "spec.rules[0].matches[0].path: invalid regular expression".into(),
                gateways: vec!["shop/edge".into()],
            },
            "2026-11-26T00:00:00Z",
        )
        .expect("a change");
        assert_eq!(
            parents.len(),
            2,
            "another controller's Gateway is not ours: {parents:?}"
        );
        assert_eq!(parents[1]["parentRef"]["name"], "edge");
        assert_eq!(parents[1]["conditions"][0]["reason"], "UnsupportedValue");
        assert_eq!(parents[0]["conditions"][0]["reason"], "UnsupportedValue");
        assert!(
            parents[0]["conditions"][0]["message"]
                .as_str()
                .unwrap_or("")
                .contains("invalid regular expression")
        );
    }
}
