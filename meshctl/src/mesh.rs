//! Where meshctl reads and writes the mesh's configuration. Commands use the [`Mesh`] trait; a
//! local mesh is a directory of manifests ([`LocalDir`]), which its controller watches. The
//! Kubernetes API is the other backend (with the install).

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_norway::Value;

/// A Service as meshctl needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// `(port, name)`.
    pub ports: Vec<(u16, String)>,
}

/// An HTTPRoute, kept as a YAML value so that fields meshctl does not know survive an edit.
#[derive(Clone, Debug)]
pub struct RouteDoc {
    pub namespace: String,
    pub name: String,
    pub value: Value,
    /// Where it came from (a file and a document index), or `None` for a new one.
    pub origin: Option<(PathBuf, usize)>,
}

/// A Rollout, kept as a YAML value (as [`RouteDoc`]), with the status its controller wrote.
#[derive(Clone, Debug)]
pub struct RolloutDoc {
    pub doc: RouteDoc,
    pub status: Option<mesh_api::rollout::RolloutStatus>,
}

impl RolloutDoc {
    /// The typed spec; an error names the Rollout and the field.
    pub fn spec(&self) -> anyhow::Result<mesh_api::rollout::RolloutSpec> {
        let spec = self.doc.value.get("spec").cloned().unwrap_or_default();
        serde_path_to_error::deserialize(spec).map_err(|e| {
            anyhow::anyhow!(
                "Rollout {}/{}: field spec.{}: {}",
                self.doc.namespace,
                self.doc.name,
                e.path(),
                e.inner()
            )
        })
    }
}

pub trait Mesh {
    fn services(&self) -> anyhow::Result<Vec<ServiceRef>>;
    fn routes(&self) -> anyhow::Result<Vec<RouteDoc>>;
    /// Writes a route back where it came from, or somewhere new; says where.
    fn save_route(&self, route: &RouteDoc) -> anyhow::Result<String>;
    fn rollouts(&self) -> anyhow::Result<Vec<RolloutDoc>>;
    /// Writes a Rollout's manifest back where it came from, or somewhere new; says where.
    fn save_rollout(&self, rollout: &RouteDoc) -> anyhow::Result<String>;
    /// The admin endpoints of the controllers serving this mesh (each replica serves its own
    /// proxies): `--controller` when given.
    fn controllers(
        &self,
        w: &crate::cmd::route::WaitArgs,
    ) -> anyhow::Result<Vec<crate::admin::Endpoint>>;
}

/// A local mesh: a directory of YAML manifests (recursively, `*.yaml`/`*.yml`, hidden files
/// skipped, as the controller reads it).
#[derive(Debug, Clone)]
pub struct LocalDir {
    pub dir: PathBuf,
}

use mesh_api::route_doc::{meta, str_at};

impl LocalDir {
    pub fn new(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        if !dir.is_dir() {
            bail!(
                "--local {}: not a directory; pass the directory of manifests the controller \
                 watches (its --config-dir), or unset {}",
                dir.display(),
                mesh_api::consts::env::MESHCTL_LOCAL
            );
        }
        Ok(Self { dir })
    }

    /// Every document of every manifest file, with where it is.
    fn all(&self) -> anyhow::Result<Docs> {
        let mut out = Vec::new();
        for p in mesh_api::route_doc::manifest_files(&self.dir)? {
            for (i, v) in mesh_api::route_doc::read_docs(&p)?.into_iter().enumerate() {
                out.push((p.clone(), i, v));
            }
        }
        Ok(out)
    }
}

/// A policy of ours (AuthorizationPolicy, RateLimitPolicy), as its manifest says.
#[derive(Clone, Debug)]
pub struct PolicyDoc {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub value: Value,
}

/// What a local directory declares, read once.
#[derive(Clone, Debug)]
pub struct Manifests {
    pub services: Vec<ServiceRef>,
    pub routes: Vec<RouteDoc>,
    pub policies: Vec<PolicyDoc>,
    /// ReferenceGrants that read, by the namespace they share from.
    pub grants: Vec<(String, mesh_controller::index::grants::Grant)>,
    /// What a cluster with the chart's CRDs would make of each document.
    pub admission: Vec<Admitted>,
}

/// One document as a cluster with the chart's CRDs would read it on `kubectl apply`: the
/// fields it would drop and why it would refuse it.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// `Kind namespace/name (file)`.
    pub who: String,
    /// Paths of fields the installed schema does not have (`spec.rules[0].retry`).
    pub dropped: Vec<String>,
    pub refused: Vec<String>,
}

fn admission_of(all: &Docs) -> Vec<Admitted> {
    let crds = mesh_api::crds::chart_crds();
    let mut out = Vec::new();
    for (path, _, v) in all {
        let Ok(mut obj) = serde_json::to_value(v) else {
            continue;
        };
        let kind = str_at(v, &["kind"]).unwrap_or_default().to_string();
        let (namespace, name) = meta(v);
        let who = format!("{kind} {namespace}/{name} ({})", path.display());
        // A kind this does not model (an Ingress, another CRD) is not checked here.
        let Some(report) = mesh_api::schema::admit_in(&mut obj, &crds) else {
            continue;
        };
        if report.pruned.is_empty() && report.errors.is_empty() {
            continue;
        }
        out.push(Admitted {
            who,
            dropped: report.pruned,
            refused: report.errors.iter().map(ToString::to_string).collect(),
        });
    }
    out
}

impl LocalDir {
    /// The Services, HTTPRoutes and policies of the directory, from one read of its files.
    pub fn manifests(&self) -> anyhow::Result<Manifests> {
        let all = self.all()?;
        Ok(Manifests {
            services: services_in(&all),
            policies: policies_in(&all),
            grants: grants_in(&all),
            admission: admission_of(&all),
            routes: routes_in(all),
        })
    }
}

/// The documents of a directory, with where each is.
type Docs = Vec<(PathBuf, usize, Value)>;

fn services_in(all: &Docs) -> Vec<ServiceRef> {
    all.iter()
        .filter(|(_, _, v)| str_at(v, &["kind"]) == Some("Service"))
        .map(|(_, _, v)| service_ref(v))
        .collect()
}

fn routes_in(all: Docs) -> Vec<RouteDoc> {
    docs_of(all, "gateway.networking.k8s.io/", "HTTPRoute")
}

/// The documents of one kind (`apiVersion` starting with `group`).
fn docs_of(all: Docs, group: &str, kind: &str) -> Vec<RouteDoc> {
    let mut out = Vec::new();
    for (path, i, v) in all {
        let ours = str_at(&v, &["apiVersion"]).is_some_and(|a| a.starts_with(group));
        if !ours || str_at(&v, &["kind"]) != Some(kind) {
            continue;
        }
        let (namespace, name) = meta(&v);
        out.push(RouteDoc {
            namespace,
            name,
            value: v,
            origin: Some((path, i)),
        });
    }
    out
}

/// The ReferenceGrants, read as the controller reads them; one that does not read is left out
/// here (the admission check names what is wrong with it).
fn grants_in(all: &Docs) -> Vec<(String, mesh_controller::index::grants::Grant)> {
    use mesh_controller::objects::{Object, parse_doc};
    all.iter()
        .filter(|(_, _, v)| str_at(v, &["kind"]) == Some("ReferenceGrant"))
        .filter_map(|(_, _, v)| {
            let doc = serde_json::to_value(v).ok()?;
            let Ok(Object::ReferenceGrant(g)) =
                parse_doc(doc, mesh_controller::source::dir::DEFAULT_NAMESPACE)
            else {
                return None;
            };
            let namespace = g.metadata.namespace.clone().unwrap_or_default();
            Some((
                namespace,
                mesh_controller::index::grants::Grant::read(&g).ok()?,
            ))
        })
        .collect()
}

/// The AuthorizationPolicies and RateLimitPolicies.
fn policies_in(all: &Docs) -> Vec<PolicyDoc> {
    all.iter()
        .filter(|(_, _, v)| {
            str_at(v, &["apiVersion"]).is_some_and(|a| a.starts_with("mesh.dev/"))
                && matches!(
                    str_at(v, &["kind"]),
                    Some("AuthorizationPolicy" | "RateLimitPolicy")
                )
        })
        .map(|(_, _, v)| {
            let (namespace, name) = meta(v);
            PolicyDoc {
                kind: str_at(v, &["kind"]).unwrap_or_default().to_string(),
                namespace,
                name,
                value: v.clone(),
            }
        })
        .collect()
}

/// A Service manifest as meshctl needs it.
fn service_ref(v: &Value) -> ServiceRef {
    let (namespace, name) = meta(v);
    let ports = v
        .get("spec")
        .and_then(|s| s.get("ports"))
        .and_then(Value::as_sequence)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| {
                    let port = u16::try_from(p.get("port")?.as_u64()?).ok()?;
                    let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
                    Some((port, name.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    ServiceRef {
        namespace,
        name,
        ports,
    }
}

impl Mesh for LocalDir {
    fn controllers(
        &self,
        w: &crate::cmd::route::WaitArgs,
    ) -> anyhow::Result<Vec<crate::admin::Endpoint>> {
        Ok(vec![crate::cmd::status::local_controller(
            w.controller.controller,
        )])
    }

    fn services(&self) -> anyhow::Result<Vec<ServiceRef>> {
        Ok(services_in(&self.all()?))
    }

    fn routes(&self) -> anyhow::Result<Vec<RouteDoc>> {
        Ok(routes_in(self.all()?))
    }

    fn save_route(&self, route: &RouteDoc) -> anyhow::Result<String> {
        self.save_doc(route)
    }

    fn rollouts(&self) -> anyhow::Result<Vec<RolloutDoc>> {
        docs_of(self.all()?, "mesh.dev/", "Rollout")
            .into_iter()
            .map(|doc| {
                let status = mesh_controller::rollout::store::read_local_status(
                    &self.dir,
                    &doc.namespace,
                    &doc.name,
                )?;
                Ok(RolloutDoc { doc, status })
            })
            .collect()
    }

    fn save_rollout(&self, rollout: &RouteDoc) -> anyhow::Result<String> {
        self.save_doc(rollout)
    }
}

impl LocalDir {
    /// Writes a document back where it came from, or to `meshctl-<ns>-<name>.yaml`.
    fn save_doc(&self, route: &RouteDoc) -> anyhow::Result<String> {
        use mesh_api::route_doc::{replace_doc, write_docs};
        let path = match &route.origin {
            Some((path, index)) => {
                if !replace_doc(path, *index, route.value.clone())? {
                    bail!(
                        "{} changed while meshctl was editing it; run it again",
                        path.display()
                    );
                }
                path.clone()
            }
            None => {
                let path = self
                    .dir
                    .join(format!("meshctl-{}-{}.yaml", route.namespace, route.name));
                write_docs(&path, std::slice::from_ref(&route.value))?;
                path
            }
        };
        Ok(path.display().to_string())
    }
}

/// A mesh in a Kubernetes cluster: Services and HTTPRoutes read from the API server, routes
/// written with server-side apply (field manager `meshctl`). The [`Mesh`] calls block, so they
/// must run inside `tokio::task::block_in_place` on a multi-threaded runtime.
#[derive(Debug, Clone)]
pub struct Cluster(pub crate::cluster::Cluster);

fn yaml(v: serde_json::Value) -> anyhow::Result<Value> {
    Ok(serde_norway::to_value(v)?)
}

impl Cluster {
    fn block<T>(
        &self,
        f: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::runtime::Handle::try_current()
            .context("meshctl runs cluster calls inside a Tokio runtime")?
            .block_on(f)
    }
}

impl Mesh for Cluster {
    /// Every ready controller pod, through port-forwards.
    fn controllers(
        &self,
        w: &crate::cmd::route::WaitArgs,
    ) -> anyhow::Result<Vec<crate::admin::Endpoint>> {
        match w.controller.controller {
            Some(a) => Ok(vec![crate::admin::Endpoint::Direct(a)]),
            None => self.block(crate::cmd::status::cluster_controllers(
                &self.0,
                &w.controller.mesh_namespace,
            )),
        }
    }

    fn services(&self) -> anyhow::Result<Vec<ServiceRef>> {
        let items = self.block(self.0.list("v1", "Service", ""))?;
        items
            .into_iter()
            .map(|v| Ok(service_ref(&yaml(v)?)))
            .collect()
    }

    fn routes(&self) -> anyhow::Result<Vec<RouteDoc>> {
        let items = self.block(self.0.list("gateway.networking.k8s.io/v1", "HTTPRoute", ""))?;
        items
            .into_iter()
            .map(|v| {
                let value = yaml(v)?;
                let (namespace, name) = meta(&value);
                Ok(RouteDoc {
                    namespace,
                    name,
                    value,
                    origin: None,
                })
            })
            .collect()
    }

    fn save_route(&self, route: &RouteDoc) -> anyhow::Result<String> {
        self.apply_doc("HTTPRoute", route)
    }

    fn rollouts(&self) -> anyhow::Result<Vec<RolloutDoc>> {
        let items = self.block(self.0.list("mesh.dev/v1alpha1", "Rollout", ""))?;
        items
            .into_iter()
            .map(|v| {
                let status = v
                    .get("status")
                    .cloned()
                    .map(serde_json::from_value)
                    .transpose()
                    .context("a Rollout's status")?;
                let value = yaml(v)?;
                let (namespace, name) = meta(&value);
                Ok(RolloutDoc {
                    doc: RouteDoc {
                        namespace,
                        name,
                        value,
                        origin: None,
                    },
                    status,
                })
            })
            .collect()
    }

    fn save_rollout(&self, rollout: &RouteDoc) -> anyhow::Result<String> {
        self.apply_doc("Rollout", rollout)
    }
}

impl Cluster {
    /// Server-side applies a document as meshctl; says what happened.
    fn apply_doc(&self, kind: &str, route: &RouteDoc) -> anyhow::Result<String> {
        let mut v: serde_json::Value = serde_json::to_value(&route.value)?;
        // What the server keeps is not ours to apply.
        if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for k in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
            ] {
                m.remove(k);
            }
            m.insert("namespace".into(), route.namespace.clone().into());
        }
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        let applied = self.block(self.0.apply(&v))?;
        Ok(format!(
            "{kind} {}/{} ({}, server-side apply as {})",
            route.namespace,
            route.name,
            applied.as_str(),
            crate::cluster::FIELD_MANAGER
        ))
    }
}
