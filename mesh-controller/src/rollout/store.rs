//! Where a rollout's changes go. In a cluster: the route by server-side apply (field manager
//! [`FIELD_MANAGER`], forcing ownership of `spec.rules`), the status by a merge patch of the
//! status subresource, and a Kubernetes Event per decision. In a local mesh: the route's
//! manifest file in the watched directory, and the status in a hidden file below it
//! (`.rollouts/<namespace>/<name>.json`, which the directory source does not read).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use mesh_api::rollout::{MEASURED_FIELDS, Rollout, RolloutStatus, STATUS_FIELDS};
use serde_json::{Value, json};
use tracing::warn;

use super::{RuleEdit, apply_edit};

/// The field manager of the controller's route changes.
pub const FIELD_MANAGER: &str = "mesh-controller-rollout";

/// The hidden directory below a local mesh's manifests where rollout statuses are kept.
pub const LOCAL_STATUS_DIR: &str = ".rollouts";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Manifest(#[from] mesh_api::route_doc::ManifestError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{route}: {reason}")]
    Route { route: String, reason: String },
}

#[derive(Clone)]
pub enum Store {
    Kube(kube::Client),
    /// The directory of manifests a local mesh's controller watches.
    Local(PathBuf),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Kube(_) => f.write_str("Store::Kube"),
            Store::Local(dir) => write!(f, "Store::Local({})", dir.display()),
        }
    }
}

/// Where a local mesh keeps a rollout's status.
pub fn local_status_path(dir: &Path, namespace: &str, name: &str) -> PathBuf {
    dir.join(LOCAL_STATUS_DIR)
        .join(namespace)
        .join(format!("{name}.json"))
}

/// A local rollout's status as the controller last wrote it; `None` when there is none yet.
pub fn read_local_status(
    dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<Option<RolloutStatus>, StoreError> {
    let path = local_status_path(dir, namespace, name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                what: "reading",
                path,
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| StoreError::Io {
            what: "reading",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

fn meta(r: &Rollout) -> (String, String) {
    (
        r.metadata.namespace.clone().unwrap_or_default(),
        r.metadata.name.clone().unwrap_or_default(),
    )
}

fn route_resource(kind: &str) -> ApiResource {
    let plural = if kind == "GRPCRoute" {
        "grpcroutes"
    } else {
        "httproutes"
    };
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

impl Store {
    /// The status a rollout had when this process first saw it.
    pub async fn load(&self, r: &Rollout) -> RolloutStatus {
        match self {
            Store::Kube(_) => r.status.clone().unwrap_or_default(),
            Store::Local(dir) => {
                let (ns, name) = meta(r);
                match read_local_status(dir, &ns, &name) {
                    Ok(s) => s.unwrap_or_default(),
                    Err(e) => {
                        warn!(error = %e, "a rollout's status cannot be read; starting it over");
                        RolloutStatus::default()
                    }
                }
            }
        }
    }

    /// Changes the route's rule as `edit` says.
    pub async fn write_route(&self, r: &Rollout, edit: &RuleEdit) -> Result<(), StoreError> {
        let (ns, _) = meta(r);
        let t = &r.spec.target_ref;
        let route = format!("{} {ns}/{}", t.kind, t.name);
        let refused = |reason: String| StoreError::Route {
            route: route.clone(),
            reason,
        };
        match self {
            Store::Kube(client) => {
                let ar = route_resource(&t.kind);
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
                let live = api.get(&t.name).await?;
                let live = serde_json::to_value(&live).map_err(|e| refused(e.to_string()))?;
                let mut doc: serde_norway::Value =
                    serde_norway::to_value(&live).map_err(|e| refused(e.to_string()))?;
                apply_edit(&mut doc, edit).map_err(refused)?;
                let rules: Value = serde_json::to_value(mesh_api::route_doc::rules(&doc))
                    .map_err(|e| refused(e.to_string()))?;
                let applied = json!({
                    "apiVersion": ar.api_version,
                    "kind": ar.kind,
                    "metadata": {"name": t.name, "namespace": ns},
                    "spec": {"rules": rules},
                });
                api.patch(
                    &t.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&applied),
                )
                .await?;
                Ok(())
            }
            Store::Local(dir) => {
                let Some((path, index, mut doc)) =
                    mesh_api::route_doc::find_doc(dir, &t.kind, &ns, &t.name)?
                else {
                    return Err(refused(format!("no manifest below {}", dir.display())));
                };
                apply_edit(&mut doc, edit).map_err(refused)?;
                if !mesh_api::route_doc::replace_doc(&path, index, doc)? {
                    return Err(refused(format!("{} changed meanwhile", path.display())));
                }
                Ok(())
            }
        }
    }

    pub async fn save_status(&self, r: &Rollout, status: &RolloutStatus) -> Result<(), StoreError> {
        let (ns, name) = meta(r);
        match self {
            Store::Kube(client) => {
                let mut body = serde_json::to_value(status).unwrap_or_default();
                if let Some(o) = body.as_object_mut() {
                    for k in STATUS_FIELDS {
                        o.entry(*k).or_insert(Value::Null);
                    }
                    // A merge patch goes into objects: what a measurement lacks now goes.
                    if let Some(current) = o.get_mut("current").and_then(Value::as_object_mut) {
                        for side in ["candidate", "stable"] {
                            if let Some(m) = current.get_mut(side).and_then(Value::as_object_mut) {
                                for k in MEASURED_FIELDS {
                                    m.entry(*k).or_insert(Value::Null);
                                }
                            }
                        }
                    }
                }
                let api: Api<Rollout> = Api::namespaced(client.clone(), &ns);
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "status": body })),
                )
                .await?;
                Ok(())
            }
            Store::Local(dir) => {
                let path = local_status_path(dir, &ns, &name);
                let io = |what, path: &Path| {
                    let path = path.to_path_buf();
                    move |source| StoreError::Io { what, path, source }
                };
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
                }
                let text = serde_json::to_string_pretty(status).unwrap_or_default();
                let tmp = path.with_extension("json.tmp~");
                std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
                std::fs::rename(&tmp, &path).map_err(io("writing", &path))
            }
        }
    }

    /// Forgets a rollout that is gone (a local mesh's status file).
    pub fn forget(&self, namespace: &str, name: &str) {
        if let Store::Local(dir) = self {
            let _ = std::fs::remove_file(local_status_path(dir, namespace, name));
        }
    }

    /// Reports a decision as a Kubernetes Event on the Rollout (in a cluster; a local mesh has
    /// its decisions in the status and the log).
    pub async fn event(&self, r: &Rollout, warning: bool, reason: &str, message: &str) {
        let Store::Kube(client) = self else {
            return;
        };
        let (ns, name) = meta(r);
        let now = Timestamp::now();
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some(format!(
                    "{}/{}",
                    mesh_api::crds::GROUP,
                    mesh_api::crds::VERSION
                )),
                kind: Some("Rollout".into()),
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid: r.metadata.uid.clone(),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(if warning { "Warning" } else { "Normal" }.into()),
            reporting_component: Some("mesh-controller".into()),
            reporting_instance: Some("mesh-controller".into()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            action: Some(reason.into()),
            count: Some(1),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &ns);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!(rollout = %name, error = %e, "writing an event");
        }
    }
}
