//! A Gateway's infrastructure, as Istio and Envoy Gateway provision theirs: for each Gateway of
//! ours, in its namespace, a ServiceAccount, a Deployment of mesh-proxy serving the Gateway, and
//! a Service in front of it, all named `<gateway>-gateway` (the service account is the
//! identity the controller gives the Gateway's certificates to). The Lease holder applies them
//! server-side (field manager [`FIELD_MANAGER`], forced) on a status pass when the Gateway
//! changed, and at least every [`REAPPLY`] to repair what someone else changed (a pass that
//! finds a Gateway as it last applied it, settled, sends nothing); each is owned by
//! its Gateway, so the API server's garbage collector deletes them with it. An object of one of
//! those names that the Gateway does not own (someone else's) is never taken over: the Gateway
//! is refused, naming it. The CA root the pods mount (ConfigMap `mesh-ca-root`) is put in the
//! Gateway's namespace too, whatever its injection label.
//!
//! - The Deployment leaves `replicas` to whoever scales it (1 when created). Its pods are not
//!   injected: mesh-proxy with `--gateway` is the pod, with the injector's image, addresses
//!   and proxy settings, and its own SVID.
//! - The Service selects the pods by `gateway.networking.k8s.io/gateway-name`, with a port for
//!   each listener port the gateway serves; its type is the Gateway's
//!   `spec.infrastructure.annotations["mesh.dev/service-type"]` (`ClusterIP`, `NodePort` or
//!   `LoadBalancer`), else `--gateway-service-type`.
//! - `spec.infrastructure.labels` and `annotations` go on all three and on the pods, as the
//!   Gateway API asks of generated resources.
//!
//! The Gateway's `status.addresses` are its Service's: the load balancer's once it has one
//! (until then `Programmed` is false, `AddressNotAssigned`), the cluster IP for the other types.
//! A Gateway that asks for addresses of its own (`spec.addresses`) is not provisioned:
//! `Programmed` false, `AddressNotUsable`.

use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use mesh_api::consts::ports;
use mesh_api::inject::InjectSettings;
use serde_json::{Map, Value, json};

use crate::index::gateway::{GatewayModel, ListenerProtocol};

/// The field manager of the Gateways' objects.
pub const FIELD_MANAGER: &str = "mesh-controller-gateway";

/// The Gateway's `spec.infrastructure.annotations` key that chooses its Service's type.
pub const SERVICE_TYPE_ANNOTATION: &str = "mesh.dev/service-type";

/// The label that selects a Gateway's pods (the Gateway API's own, GEP-1762).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A Gateway's Service type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum ServiceType {
    #[value(name = "ClusterIP")]
    ClusterIP,
    #[value(name = "NodePort")]
    NodePort,
    #[value(name = "LoadBalancer")]
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::ClusterIP, Self::NodePort, Self::LoadBalancer]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// How long objects applied for a Gateway that has not changed are left before they are
/// applied again.
pub const REAPPLY: std::time::Duration = std::time::Duration::from_secs(60);

/// What the controller gives the Gateways it provisions.
#[derive(Clone, Debug)]
pub struct Provisioning {
    /// The proxy's image, addresses and settings: the injector's.
    pub proxy: InjectSettings,
    /// The Service type of a Gateway that does not choose one.
    pub service_type: ServiceType,
    /// The CA root (`--ca-root`), published as `mesh-ca-root` in each Gateway's namespace;
    /// `None` without a CA.
    pub ca_root: Option<std::path::PathBuf>,
    /// What was last applied for each Gateway (`namespace/name`), and when.
    applied: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Remembered>>>,
}

/// A Gateway as it was last applied, settled.
#[derive(Debug)]
struct Remembered {
    fingerprint: u64,
    at: std::time::Instant,
    outcome: Provisioned,
}

/// What would be sent for a Gateway: its objects (or why not), the addresses it asks for, the
/// CA root, and whether its Service is there (one deleted by someone else is made again at
/// once, not a minute later).
fn fingerprint(
    made: &Made,
    root: Option<&Result<String, String>>,
    g: &GatewayModel,
    live: &Value,
    service_exists: bool,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match made {
        Ok(o) => o
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .hash(&mut h),
        Err(why) => why.hash(&mut h),
    }
    g.accepted.ok.hash(&mut h);
    live.pointer("/spec/addresses")
        .map(Value::to_string)
        .hash(&mut h);
    root.map(|r| r.as_deref().unwrap_or_default()).hash(&mut h);
    service_exists.hash(&mut h);
    h.finish()
}

/// A Gateway's objects, or why it cannot have them ([`objects`]).
type Made = Result<[Value; 3], String>;

impl Provisioning {
    pub fn new(
        proxy: InjectSettings,
        service_type: ServiceType,
        ca_root: Option<std::path::PathBuf>,
    ) -> Self {
        Self {
            proxy,
            service_type,
            ca_root,
            applied: Default::default(),
        }
    }

    /// Gateway `g`'s objects applied, unless the same were applied less than
    /// [`REAPPLY`] ago with its Service's address known and the Service is still there
    /// (`service_exists`, as the controller's watch sees it): then that outcome again, with no
    /// request to the API server.
    pub async fn provision(
        &self,
        client: &kube::Client,
        g: &GatewayModel,
        live: &Value,
        service_exists: bool,
    ) -> Provisioned {
        let key = format!("{}/{}", g.namespace, g.name);
        // Made and read once: what the fingerprint hashes is what is applied.
        let made = objects(g, live, self);
        let root = self
            .ca_root
            .as_ref()
            .map(|f| std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())));
        let fp = fingerprint(&made, root.as_ref(), g, live, service_exists);
        let lock = || self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = lock().get(&key)
            && r.fingerprint == fp
            && r.at.elapsed() < REAPPLY
        {
            return r.outcome.clone();
        }
        let outcome = apply(client, g, live, made, root).await;
        let settled =
            matches!(&outcome, Provisioned::Applied { addresses, .. } if !addresses.is_empty());
        if settled {
            lock().insert(
                key,
                Remembered {
                    fingerprint: fp,
                    at: std::time::Instant::now(),
                    outcome: outcome.clone(),
                },
            );
        } else {
            lock().remove(&key);
        }
        outcome
    }

    /// Forgets the Gateways (`namespace/name`) that `keep` leaves out: deleted, or no longer
    /// ours.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| keep(k));
    }
}

/// What provisioning made of a Gateway, for its status.
#[derive(Clone, Debug, PartialEq)]
pub enum Provisioned {
    /// Not provisioned by this controller (`--gateway-deployments=false`).
    Off,
    /// Its objects are applied; the Gateway API addresses its Service has (none: a load
    /// balancer not assigned yet), and the Service (`namespace/name`, type) for the message.
    Applied {
        addresses: Vec<Value>,
        service: String,
    },
    /// Refused: why, naming the field.
    Refused(String),
    /// The Gateway asks for addresses (`spec.addresses`) that a provisioned Service cannot
    /// take: why.
    Unusable(String),
    /// Applying failed (the API server's answer); tried again on the next pass.
    Failed(String),
}

/// The name of a Gateway's Deployment, Service and ServiceAccount.
pub fn object_name(gateway: &str) -> String {
    mesh_api::consts::identity::gateway_service_account(gateway)
}

/// The ServiceAccount, Deployment and Service of Gateway `g` (`live`: the Gateway as the API
/// server has it, for its UID and `spec.infrastructure`), or why it cannot have them.
pub fn objects(g: &GatewayModel, live: &Value, p: &Provisioning) -> Result<[Value; 3], String> {
    let name = object_name(&g.name);
    let what = format!("Gateway {}/{}", g.namespace, g.name);
    if !crate::objects::is_dns_label(&name, true) {
        return Err(format!(
            "{what}: its Service would be named {name:?}, which is not a DNS label (at most 63 lowercase letters, digits and '-', starting with a letter); rename the Gateway or set --gateway-deployments=false and run its proxy yourself"
        ));
    }
    let uid = live
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{what}: no metadata.uid to own its objects by"))?;
    let strings = |key: &str| -> Result<Map<String, Value>, String> {
        let Some(v) = live.pointer(&format!("/spec/infrastructure/{key}")) else {
            return Ok(Map::new());
        };
        let map = v
            .as_object()
            .ok_or_else(|| format!("{what}: spec.infrastructure.{key} is {v}; expected a map"))?;
        match map.iter().find(|(_, v)| !v.is_string()) {
            Some((k, v)) => Err(format!(
                "{what}: spec.infrastructure.{key}.{k} is {v}; expected a string"
            )),
            None => Ok(map.clone()),
        }
    };
    let (infra_labels, annotations) = (strings("labels")?, strings("annotations")?);
    let service_type = match annotations.get(SERVICE_TYPE_ANNOTATION) {
        None => p.service_type,
        Some(v) => v.as_str().and_then(ServiceType::parse).ok_or_else(|| {
            format!(
                "{what}: spec.infrastructure.annotations[{SERVICE_TYPE_ANNOTATION}] is {v}; expected ClusterIP, NodePort or LoadBalancer"
            )
        })?,
    };
    let mut served: Vec<(u16, ListenerProtocol)> = g
        .listeners
        .iter()
        .filter_map(|l| l.protocol.map(|p| (l.port, p)))
        .collect();
    served.sort_by_key(|(port, _)| *port);
    served.dedup_by_key(|(port, _)| *port);
    if served.is_empty() {
        return Err(format!(
            "{what}: no listener of a protocol the gateway serves (HTTP, HTTPS)"
        ));
    }
    if let Some((port, _)) = served
        .iter()
        .find(|(port, _)| [ports::PROXY_ADMIN, ports::PROXY_METRICS].contains(port))
    {
        let l = g.listeners.iter().find(|l| l.port == *port);
        return Err(format!(
            "{what}: listener {} is on port {port}, the gateway proxy's own (admin {}, metrics and /ready {}); choose another port",
            l.map(|l| l.name.as_str()).unwrap_or_default(),
            ports::PROXY_ADMIN,
            ports::PROXY_METRICS
        ));
    }
    let mut labels = infra_labels;
    labels.insert(GATEWAY_NAME_LABEL.into(), json!(g.name));
    let mut metadata = json!({
        "name": name,
        "namespace": g.namespace,
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": g.name,
            "uid": uid,
            "controller": true
        }]
    });
    if !annotations.is_empty() {
        metadata["annotations"] = json!(annotations);
    }
    let selector = json!({GATEWAY_NAME_LABEL: g.name});
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata});
    let port_numbers: Vec<u16> = served.iter().map(|(port, _)| *port).collect();
    let mut template =
        mesh_api::inject::gateway_pod_template(&p.proxy, &g.name, &name, &labels, &port_numbers)?;
    // The Service's type is not the pods' business: changing it restarts nothing.
    let mut pod_annotations = annotations.clone();
    pod_annotations.remove(SERVICE_TYPE_ANNOTATION);
    if !pod_annotations.is_empty() {
        template["metadata"]["annotations"] = json!(pod_annotations);
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {"selector": {"matchLabels": selector}, "template": template}
    });
    let service_ports: Vec<Value> = served
        .iter()
        .map(|(port, protocol)| {
            let scheme = match protocol {
                ListenerProtocol::Http => "http",
                ListenerProtocol::Https => "https",
            };
            json!({"name": format!("{scheme}-{port}"), "port": port, "targetPort": port,
                   "protocol": "TCP"})
        })
        .collect();
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {"type": service_type.as_str(), "selector": selector, "ports": service_ports}
    });
    Ok([account, deployment, service])
}

/// A Service's addresses as a Gateway's `status.addresses`: its load balancer's for type
/// `LoadBalancer` (none until assigned), else its cluster IPs (`clusterIPs`, or `clusterIP`
/// as older servers write it).
pub fn addresses(service: &Value) -> Vec<Value> {
    let of = |v: &Value| -> Option<Value> {
        if let Some(ip) = v.get("ip").and_then(Value::as_str) {
            return Some(json!({"type": "IPAddress", "value": ip}));
        }
        v.get("hostname")
            .and_then(Value::as_str)
            .map(|h| json!({"type": "Hostname", "value": h}))
    };
    if service.pointer("/spec/type").and_then(Value::as_str) == Some("LoadBalancer") {
        return service
            .pointer("/status/loadBalancer/ingress")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(of)
            .collect();
    }
    let ips: Vec<&str> = match service
        .pointer("/spec/clusterIPs")
        .and_then(Value::as_array)
    {
        Some(list) => list.iter().filter_map(Value::as_str).collect(),
        None => service
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .into_iter()
            .collect(),
    };
    ips.into_iter()
        .filter(|ip| *ip != "None" && !ip.is_empty())
        .map(|ip| json!({"type": "IPAddress", "value": ip}))
        .collect()
}

/// Whether `o` (as the API server has it) is owned by the object of `uid`.
fn owned_by(o: &Value, uid: &str) -> bool {
    o.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
}

/// Applies Gateway `g`'s objects `made` (`live`: the Gateway as read), after publishing the CA
/// root `root` (its PEM, or why the file did not read) in its namespace; what came of it.
async fn apply(
    client: &kube::Client,
    g: &GatewayModel,
    live: &Value,
    made: Made,
    root: Option<Result<String, String>>,
) -> Provisioned {
    if !g.accepted.ok {
        return Provisioned::Refused("no listener is valid".into());
    }
    if let Some(asked) = live
        .pointer("/spec/addresses")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    {
        return Provisioned::Unusable(format!(
            "Gateway {}/{}: spec.addresses {}: the controller gives a Gateway its Service's address and cannot take one asked for; remove spec.addresses, or set --gateway-deployments=false and run its proxy and Service yourself",
            g.namespace,
            g.name,
            Value::Array(asked.clone())
        ));
    }
    let objects = match made {
        Ok(o) => o,
        Err(why) => return Provisioned::Refused(why),
    };
    let uid = live
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut apis = Vec::new();
    for o in &objects {
        let (api_version, kind) = (
            o["apiVersion"].as_str().unwrap_or_default(),
            o["kind"].as_str().unwrap_or_default(),
        );
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &g.namespace, &ar);
        let name = o["metadata"]["name"].as_str().unwrap_or_default();
        // Someone else's object of that name is theirs: refuse rather than take it over.
        match api.get_opt(name).await {
            Ok(Some(existing)) => {
                let existing = serde_json::to_value(&existing).unwrap_or_default();
                if !owned_by(&existing, uid) {
                    return Provisioned::Refused(format!(
                        "{kind} {}/{name} exists and is not this Gateway's (it has no ownerReference to Gateway {}): delete or rename it, or set --gateway-deployments=false and run the Gateway's proxy yourself",
                        g.namespace, g.name
                    ));
                }
            }
            Ok(None) => {}
            Err(e) => {
                return Provisioned::Failed(format!("reading {kind} {}/{name}: {e}", g.namespace));
            }
        }
        apis.push((api, kind, name));
    }
    if let Some(root) = root {
        let published = match root {
            Ok(pem) => {
                let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
                    Api::namespaced(client.clone(), &g.namespace);
                mesh_api::root_configmap::ensure(&cms, &g.namespace, &pem)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            return Provisioned::Failed(format!(
                "publishing the CA root (ConfigMap {}/{}) its pods mount: {e}",
                g.namespace,
                mesh_api::root_configmap::NAME
            ));
        }
    }
    let mut service = Value::Null;
    for ((api, kind, name), o) in apis.iter().zip(&objects) {
        match api.patch(name, &params, &Patch::Apply(o)).await {
            Ok(applied) => {
                if *kind == "Service" {
                    service = serde_json::to_value(&applied).unwrap_or_default();
                }
            }
            Err(e) => {
                return Provisioned::Failed(format!("applying {kind} {}/{name}: {e}", g.namespace));
            }
        }
    }
    Provisioned::Applied {
        addresses: addresses(&service),
        service: format!(
            "Service {}/{} ({})",
            g.namespace,
            object_name(&g.name),
            service
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or_default()
        ),
    }
}
