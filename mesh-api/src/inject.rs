//! Sidecar injection, on the JSON of any object with a pod template (a Pod, a Deployment's
//! `spec.template`, a CronJob's `spec.jobTemplate.spec.template`, ...): the `mesh-init`
//! container that installs the iptables rules, and mesh-proxy as a native sidecar (an init
//! container with `restartPolicy: Always`, ready on `/ready`), with the volumes they need.
//! Working on JSON keeps every field it does not touch as it was. Injecting twice changes
//! nothing. Shared by the admission webhook and `meshctl inject`.

use serde_json::{Value, json};

use crate::consts::{labels, ports};

/// What the injected containers are given.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    pub proxy_image: String,
    /// The controller's xDS address, `host:port`.
    pub xds_addr: String,
    /// mesh-ca's address, `host:port`.
    pub ca_addr: String,
    pub trust_domain: String,
    pub proxy_uid: i64,
    /// The proxy's log filter (`MESH_LOG`).
    pub log_level: String,
    /// The proxy container's `resources`; `null` for none.
    pub resources: Value,
    /// The OTLP/gRPC collector proxies send spans to; empty: none.
    pub tracing_endpoint: String,
    /// Percentage of new traces sampled.
    pub tracing_sampling: f64,
    /// JSON access logs on the proxy's stdout.
    pub access_log: bool,
}

/// What injection did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    AlreadyInjected,
    /// Left alone, and why.
    Skipped(String),
}

/// The UID mesh-proxy runs as; the interception rules exempt it.
pub const PROXY_UID: i64 = 1337;

/// Container names the injection adds.
pub const PROXY_CONTAINER: &str = "mesh-proxy";
pub const INIT_CONTAINER: &str = "mesh-init";

/// Where the pod template of an object is; `None` for objects without one.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Whether a pod with these labels, in a namespace that is (or is not) enabled, gets a proxy:
/// the pod's `mesh.dev/inject` decides when set, else the namespace's.
pub fn wanted(pod_labels: Option<&Value>, namespace_enabled: bool) -> Result<(), String> {
    match pod_labels
        .and_then(|l| l.get(labels::INJECT))
        .and_then(Value::as_str)
    {
        Some("enabled") => Ok(()),
        Some("disabled") => Err(format!("the pod says {}: disabled", labels::INJECT)),
        Some(other) => Err(format!(
            "the pod's {} is {other:?}; expected enabled or disabled",
            labels::INJECT
        )),
        None if namespace_enabled => Ok(()),
        None => Err(format!(
            "neither the pod nor its namespace says {}: enabled",
            labels::INJECT
        )),
    }
}

/// Injects into the pod template of `obj` (of kind `obj.kind`).
pub fn inject(
    obj: &mut Value,
    namespace_enabled: bool,
    s: &InjectSettings,
) -> Result<Outcome, String> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("the object has no kind")?
        .to_string();
    let Some(path) = template_path(&kind) else {
        return Ok(Outcome::Skipped(format!("a {kind} has no pod template")));
    };
    let workload = workload_of(obj, path);
    let mut template = &mut *obj;
    for key in path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("{kind}: {} is missing", path.join(".")))?;
    }
    let where_ = if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    };
    if !template.is_object() {
        return Err(format!("{kind}: {where_}is not an object"));
    }
    if let Err(why) = wanted(
        template.get("metadata").and_then(|m| m.get("labels")),
        namespace_enabled,
    ) {
        return Ok(Outcome::Skipped(why));
    }
    let hold = match template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(labels::HOLD_APP))
    {
        None => true,
        Some(v) if v == "true" => true,
        Some(v) if v == "false" => false,
        Some(v) => {
            return Err(format!(
                "{kind}: {where_}metadata.annotations[{}] is {v}; expected \"true\" or \"false\"",
                labels::HOLD_APP
            ));
        }
    };
    let spec = template
        .get_mut("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| format!("{kind}: {where_}spec is missing or not an object"))?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "a hostNetwork pod shares the node's network: its traffic cannot be redirected".into(),
        ));
    }
    let has = |list: &str, spec: &Value| {
        spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name") == Some(&json!(PROXY_CONTAINER)))
        })
    };
    if has("initContainers", spec) || has("containers", spec) {
        return Ok(Outcome::AlreadyInjected);
    }
    for list in ["initContainers", "volumes"] {
        match spec.get(list) {
            None | Some(Value::Array(_)) => {}
            Some(_) => return Err(format!("{kind}: {where_}spec.{list} is not a list")),
        }
    }
    let inits = spec
        .as_object_mut()
        .ok_or("spec is not an object")?
        .entry("initContainers")
        .or_insert_with(|| json!([]));
    if let Value::Array(list) = inits {
        // First the rules, then the proxy, then the app's own init containers (which may
        // already need the mesh).
        list.insert(0, proxy_container(s, &workload, hold));
        list.insert(0, init_container(s));
    }
    let volumes = spec
        .as_object_mut()
        .ok_or("spec is not an object")?
        .entry("volumes")
        .or_insert_with(|| json!([]));
    if let Value::Array(list) = volumes {
        list.push(json!({
            "name": "mesh-token",
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "mesh-ca", "expirationSeconds": 3600, "path": "mesh-ca-token"}}]}
        }));
        list.push(json!({"name": "mesh-ca-root", "configMap": {"name": "mesh-ca-root"}}));
    }
    let meta = template
        .as_object_mut()
        .ok_or("template is not an object")?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let labels_map = meta
        .as_object_mut()
        .ok_or_else(|| format!("{kind}: {where_}metadata is not an object"))?
        .entry("labels")
        .or_insert_with(|| json!({}));
    labels_map
        .as_object_mut()
        .ok_or_else(|| format!("{kind}: {where_}metadata.labels is not an object"))?
        .insert(labels::PROXY.into(), json!("true"));
    Ok(Outcome::Injected)
}

fn init_container(s: &InjectSettings) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": s.proxy_image,
        "args": ["init", "--proxy-uid", s.proxy_uid.to_string()],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    })
}

/// The workload the proxy reports in its metrics: a Pod's from its owner, a pod template's
/// the object's own name (both unless the template's labels name it).
fn workload_of(obj: &Value, path: &[&str]) -> String {
    if path.is_empty() {
        return crate::workload::name_from_json(obj.get("metadata").unwrap_or(&Value::Null));
    }
    let template = path.iter().try_fold(obj, |v, k| v.get(*k));
    let label = template
        .and_then(|t| t.pointer("/metadata/labels"))
        .and_then(|l| l.get(crate::workload::LABEL))
        .and_then(Value::as_str)
        .filter(|w| !w.is_empty());
    let own = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    label.unwrap_or(own).to_string()
}

/// The proxy's environment: who it is, its log filter, and the mesh's telemetry settings.
fn proxy_env(s: &InjectSettings) -> Value {
    use crate::consts::env as names;
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        json!({"name": names::LOG, "value": s.log_level}),
        json!({"name": names::PROXY_TRACING_SAMPLING, "value": s.tracing_sampling.to_string()}),
    ];
    if !s.tracing_endpoint.is_empty() {
        env.push(json!({"name": names::PROXY_TRACING_ENDPOINT, "value": s.tracing_endpoint}));
    }
    if s.access_log {
        env.push(json!({"name": names::PROXY_ACCESS_LOG, "value": "-"}));
    }
    Value::Array(env)
}

/// The native sidecar. With `hold`, a startup probe on `/ready`: the kubelet starts the next
/// container (and so the app) only once it passes, that is once the proxy has its config and
/// its SVID; a readiness probe alone gates nothing at start.
fn proxy_container(s: &InjectSettings, workload: &str, hold: bool) -> Value {
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": s.proxy_image,
        "restartPolicy": "Always",
        "args": [
            "--node", "$(POD_NAMESPACE)/$(POD_NAME)",
            "--service-account", "$(SERVICE_ACCOUNT)",
            "--workload", workload,
            "--transparent", "true",
            "--xds", s.xds_addr,
            "--ca-addr", s.ca_addr,
            "--ca-root", "/var/run/secrets/mesh/ca.crt",
            "--ca-token-file", "/var/run/secrets/tokens/mesh-ca-token",
            "--trust-domain", s.trust_domain
        ],
        "env": proxy_env(s),
        "ports": [{"name": "mesh-metrics", "containerPort": ports::PROXY_METRICS}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": ports::PROXY_METRICS},
            "periodSeconds": 2
        },
        "securityContext": {
            "runAsUser": s.proxy_uid,
            "runAsGroup": s.proxy_uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": [
            {"name": "mesh-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
            {"name": "mesh-ca-root", "mountPath": "/var/run/secrets/mesh", "readOnly": true}
        ]
    });
    if hold {
        // Up to 10 minutes for the CA and the controller, checked every second.
        c["startupProbe"] = json!({
            "httpGet": {"path": "/ready", "port": ports::PROXY_METRICS},
            "periodSeconds": 1,
            "failureThreshold": 600
        });
    }
    if !s.resources.is_null() {
        c["resources"] = s.resources.clone();
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings() -> InjectSettings {
        InjectSettings {
            proxy_image: "mesh/mesh-proxy:test".into(),
            xds_addr: "mesh-controller.mesh-system.svc:15010".into(),
            ca_addr: "mesh-ca.mesh-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            proxy_uid: 1337,
            log_level: "info".into(),
            resources: json!({"requests": {"cpu": "10m"}}),
            tracing_endpoint: "http://otel-collector.observability:4317".into(),
            tracing_sampling: 0.5,
            access_log: true,
        }
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "labels": {"app": "web"}},
               "spec": {"containers": [{"name": "app", "image": "web:1"}],
                        "initContainers": [{"name": "migrate", "image": "web:1"}]}})
    }

    fn names(spec: &Value, list: &str) -> Vec<String> {
        spec[list]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| c["name"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The kubelet starts the app only after a native sidecar's startup probe passes: the proxy
    /// gets one on `/ready` unless the pod opts out; a bad value is an error naming it.
    #[test]
    fn the_app_is_held_until_the_proxy_is_ready_unless_the_pod_opts_out() {
        let mut p = pod();
        inject(&mut p, true, &settings()).expect("injects");
        let probe = &p["spec"]["initContainers"][1]["startupProbe"];
        assert_eq!(probe["httpGet"]["path"], "/ready");
        assert_eq!(probe["httpGet"]["port"], ports::PROXY_METRICS);
        assert_eq!(probe["failureThreshold"], 600);
        let mut p = pod();
        p["metadata"]["annotations"] = json!({labels::HOLD_APP: "false"});
        inject(&mut p, true, &settings()).expect("injects");
        assert!(p["spec"]["initContainers"][1].get("startupProbe").is_none());
        let mut p = pod();
        p["metadata"]["annotations"] = json!({labels::HOLD_APP: "yes"});
        let err = inject(&mut p, true, &settings()).expect_err("a bad value");
        assert!(
            err.contains("metadata.annotations[mesh.dev/hold-app-until-proxy-ready] is \"yes\""),
            "{err}"
        );
    }

    #[test]
    fn a_pod_gets_the_init_container_and_the_native_sidecar_first() {
        let mut p = pod();
        assert_eq!(inject(&mut p, true, &settings()), Ok(Outcome::Injected));
        assert_eq!(
            names(&p["spec"], "initContainers"),
            ["mesh-init", "mesh-proxy", "migrate"]
        );
        assert_eq!(names(&p["spec"], "containers"), ["app"]);
        let proxy = &p["spec"]["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(p["metadata"]["labels"]["mesh.dev/proxy"], "true");
        assert_eq!(p["metadata"]["labels"]["app"], "web", "other labels kept");
        let vols: Vec<&str> = p["spec"]["volumes"]
            .as_array()
            .map(|v| v.iter().filter_map(|x| x["name"].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(vols, ["mesh-token", "mesh-ca-root"]);
        // Telemetry settings and the workload metrics name it by.
        let env: BTreeMap<&str, &Value> = proxy["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?, &e["value"])))
            .collect();
        assert_eq!(
            env["MESH_PROXY_TRACING_ENDPOINT"],
            "http://otel-collector.observability:4317"
        );
        assert_eq!(env["MESH_PROXY_TRACING_SAMPLING"], "0.5");
        assert_eq!(env["MESH_PROXY_ACCESS_LOG"], "-");
        let args: Vec<&str> = proxy["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--workload")
            .expect("--workload");
        assert_eq!(args[at + 1], "web");
        // Twice: nothing changes.
        let once = p.clone();
        assert_eq!(
            inject(&mut p, true, &settings()),
            Ok(Outcome::AlreadyInjected)
        );
        assert_eq!(p, once);
    }

    #[test]
    fn a_deployment_and_a_cronjob_get_it_in_their_pod_template() {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {"template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "app"}]}}}});
        assert_eq!(inject(&mut d, true, &settings()), Ok(Outcome::Injected));
        assert_eq!(
            names(&d["spec"]["template"]["spec"], "initContainers"),
            ["mesh-init", "mesh-proxy"]
        );
        let args = &d["spec"]["template"]["spec"]["initContainers"][1]["args"];
        let at = args
            .as_array()
            .and_then(|a| a.iter().position(|x| x == "--workload"))
            .expect("--workload");
        assert_eq!(
            args[at + 1],
            "web",
            "a Deployment's pods are the Deployment"
        );
        let mut cj = json!({"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template":
            {"spec": {"containers": [{"name": "job"}]}}}}}});
        assert_eq!(inject(&mut cj, true, &settings()), Ok(Outcome::Injected));
        assert!(
            cj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]["mesh.dev/proxy"]
                == "true"
        );
    }

    #[test]
    fn labels_and_host_network_decide_and_bad_objects_are_named() {
        let mut p = pod();
        p["metadata"]["labels"]["mesh.dev/inject"] = json!("disabled");
        assert!(
            matches!(inject(&mut p, true, &settings()), Ok(Outcome::Skipped(w)) if w.contains("disabled"))
        );
        let mut p = pod();
        assert!(
            matches!(inject(&mut p, false, &settings()), Ok(Outcome::Skipped(w)) if w.contains("neither"))
        );
        p["metadata"]["labels"]["mesh.dev/inject"] = json!("enabled");
        assert_eq!(inject(&mut p, false, &settings()), Ok(Outcome::Injected));
        let mut h = pod();
        h["spec"]["hostNetwork"] = json!(true);
        assert!(
            matches!(inject(&mut h, true, &settings()), Ok(Outcome::Skipped(w)) if w.contains("hostNetwork"))
        );
        let mut cm = json!({"kind": "ConfigMap", "data": {}});
        assert!(matches!(
            inject(&mut cm, true, &settings()),
            Ok(Outcome::Skipped(_))
        ));
        let mut bad = json!({"kind": "Deployment", "spec": {}});
        assert_eq!(
            inject(&mut bad, true, &settings()),
            Err("Deployment: spec.template is missing".into())
        );
        let mut bad = json!({"kind": "Pod", "spec": {"containers": [], "initContainers": "x"}});
        assert_eq!(
            inject(&mut bad, true, &settings()),
            Err("Pod: spec.initContainers is not a list".into())
        );
        let mut none = json!({"metadata": {}});
        assert!(inject(&mut none, true, &settings()).is_err());
    }
}
