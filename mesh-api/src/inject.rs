//! Sidecar injection, on the JSON of any object with a pod template (a Pod, a Deployment's
//! `spec.template`, a CronJob's `spec.jobTemplate.spec.template`, ...): the `mesh-init`
//! container that installs the iptables rules, and mesh-proxy as a native sidecar (an init
//! container with `restartPolicy: Always`, ready on `/ready`), with the volumes they need.
//! Working on JSON keeps every field it does not touch as it was. Injecting twice changes
//! nothing. Shared by the admission webhook and `meshctl inject`.

use serde_json::{Map, Value, json};

use crate::consts::{labels, ports};
use crate::probes::{self, AppProbe, AppProbes, Check, Header, Scheme};

/// What the injected containers are given.
#[derive(Clone, Debug)]
pub struct InjectSettings {
    pub proxy_image: String,
    /// The init container's image: `mesh-proxy init` with iptables beside it (the sidecar's
    /// own image has no iptables).
    pub init_image: String,
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
    /// `prometheus.io/*` annotations pointing at the proxy's metrics on injected pods (a pod
    /// whose template has any `prometheus.io/` annotation keeps its own).
    pub prometheus_annotations: bool,
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
/// The name of the proxy container's metrics port (a PodMonitor's `port`).
pub const METRICS_PORT_NAME: &str = "mesh-metrics";

/// The scrape annotations injection adds, for a Prometheus that discovers pods by annotation:
/// the proxy's `/metrics`.
fn scrape_annotations() -> [(&'static str, String); 3] {
    [
        ("prometheus.io/scrape", "true".to_owned()),
        ("prometheus.io/port", ports::PROXY_METRICS.to_string()),
        ("prometheus.io/path", "/metrics".to_owned()),
    ]
}

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

/// An object's kind, and where its pod template is (`None`: it has none).
fn kind_of(obj: &Value) -> Result<(String, Option<&'static [&'static str]>), String> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("the object has no kind")?
        .to_string();
    let path = template_path(&kind);
    Ok((kind, path))
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
    let (kind, path) = kind_of(obj)?;
    let Some(path) = path else {
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
    let hold = bool_annotation(template, labels::HOLD_APP, &kind, &where_)?;
    let rewrite = bool_annotation(template, labels::REWRITE_APP_PROBES, &kind, &where_)?;
    let scoped = bool_annotation(template, labels::SCOPED, &kind, &where_)?;
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
    for list in ["initContainers", "containers", "volumes"] {
        match spec.get(list) {
            None | Some(Value::Array(_)) => {}
            Some(_) => return Err(format!("{kind}: {where_}spec.{list} is not a list")),
        }
    }
    let (checks, originals) = if rewrite {
        rewrite_probes(spec).map_err(|e| format!("{kind}: {where_}{e}"))?
    } else {
        Default::default()
    };
    let inits = spec
        .as_object_mut()
        .ok_or("spec is not an object")?
        .entry("initContainers")
        .or_insert_with(|| json!([]));
    if let Value::Array(list) = inits {
        // First the rules, then the proxy, then the app's own init containers (which may
        // already need the mesh).
        let mut proxy = proxy_container(s, &workload, &["--transparent", "true"], scoped, &checks)?;
        // A native sidecar: an init container that keeps running.
        proxy["restartPolicy"] = json!("Always");
        if hold {
            // Up to 10 minutes for the CA and the controller, checked every second.
            proxy["startupProbe"] = json!({
                "httpGet": {"path": "/ready", "port": ports::PROXY_METRICS},
                "periodSeconds": 1,
                "failureThreshold": 600
            });
        }
        list.insert(0, proxy);
        list.insert(0, init_container(s));
    }
    let volumes = spec
        .as_object_mut()
        .ok_or("spec is not an object")?
        .entry("volumes")
        .or_insert_with(|| json!([]));
    if let Value::Array(list) = volumes {
        list.extend(proxy_volumes());
    }
    let meta = template
        .as_object_mut()
        .ok_or("template is not an object")?
        .entry("metadata")
        .or_insert_with(|| json!({}));
    let meta = meta
        .as_object_mut()
        .ok_or_else(|| format!("{kind}: {where_}metadata is not an object"))?;
    // An app's own scrape settings (any `prometheus.io/` key) are left as they are.
    let scrape = s.prometheus_annotations
        && !meta
            .get("annotations")
            .and_then(Value::as_object)
            .is_some_and(|a| a.keys().any(|k| k.starts_with("prometheus.io/")));
    if !originals.is_empty() || scrape {
        let annotations = metadata_map(meta, "annotations", &kind, &where_)?;
        if !originals.is_empty() {
            let text = serde_json::to_string(&originals).map_err(|e| e.to_string())?;
            annotations.insert(labels::APP_PROBES.into(), json!(text));
        }
        if scrape {
            for (k, v) in scrape_annotations() {
                annotations.insert(k.into(), json!(v));
            }
        }
    }
    metadata_map(meta, "labels", &kind, &where_)?.insert(labels::PROXY.into(), json!("true"));
    Ok(Outcome::Injected)
}

/// The pod template's `metadata.<key>` map (labels, annotations), made when missing; `key:`
/// left empty in YAML is null, so no entries.
fn metadata_map<'a>(
    meta: &'a mut Map<String, Value>,
    key: &str,
    kind: &str,
    where_: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    let v = meta.entry(key).or_insert_with(|| json!({}));
    if v.is_null() {
        *v = json!({});
    }
    v.as_object_mut()
        .ok_or_else(|| format!("{kind}: {where_}metadata.{key} is not an object"))
}

/// What uninjection did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    Uninjected,
    /// Nothing to take out, and why.
    NotInjected(String),
}

/// Takes the sidecar out of the pod template of `obj` (of kind `obj.kind`): the containers,
/// volumes and label injection added, and the app's probes back as they were written (from the
/// `mesh.dev/app-probes` annotation). Lists and maps left empty are removed.
pub fn uninject(obj: &mut Value) -> Result<Removal, String> {
    let (kind, path) = kind_of(obj)?;
    let Some(path) = path else {
        return Ok(Removal::NotInjected(format!(
            "a {kind} has no pod template"
        )));
    };
    let where_ = if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    };
    let mut template = &mut *obj;
    for key in path {
        template = template
            .get_mut(*key)
            .ok_or_else(|| format!("{kind}: {} is missing", path.join(".")))?;
    }
    let spec = template
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("{kind}: {where_}spec is missing or not an object"))?;
    let ours = |c: &Value| {
        c.get("name")
            .is_some_and(|n| n == PROXY_CONTAINER || n == INIT_CONTAINER)
    };
    let injected = spec
        .get("initContainers")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(ours));
    if !injected {
        return Ok(Removal::NotInjected(format!(
            "no {PROXY_CONTAINER} or {INIT_CONTAINER} init container"
        )));
    }
    remove_where(spec, "initContainers", ours);
    remove_where(spec, "volumes", |v| {
        v.get("name")
            .is_some_and(|n| n == "mesh-token" || n == "mesh-ca-root")
    });
    let Some(meta) = template.get_mut("metadata").and_then(Value::as_object_mut) else {
        return Ok(Removal::Uninjected);
    };
    remove_key(meta, "labels", labels::PROXY);
    // The scrape annotations, when they are injection's: all three, pointing at the proxy's
    // port (which an app in a meshed pod cannot serve on: the proxy holds it).
    let ours = scrape_annotations();
    if ours
        .iter()
        .all(|(k, v)| meta.get("annotations").and_then(|a| a.get(*k)) == Some(&json!(v)))
    {
        for (k, _) in &ours {
            remove_key(meta, "annotations", k);
        }
    }
    let kept = remove_key(meta, "annotations", labels::APP_PROBES);
    if meta.is_empty()
        && let Some(t) = template.as_object_mut()
    {
        t.remove("metadata");
    }
    let Some(text) = kept else {
        return Ok(Removal::Uninjected);
    };
    let at = format!(
        "{kind}: {where_}metadata.annotations[{}]",
        labels::APP_PROBES
    );
    let originals: Map<String, Value> = text
        .as_str()
        .and_then(|t| serde_json::from_str(t).ok())
        .ok_or_else(|| format!("{at} is not a JSON object of probes by container"))?;
    let spec = template
        .get_mut("spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("{kind}: {where_}spec is missing"))?;
    for (name, probes) in originals {
        let container = spec
            .iter_mut()
            .filter(|(list, _)| *list == "initContainers" || *list == "containers")
            .filter_map(|(_, cs)| cs.as_array_mut())
            .flatten()
            .find(|c| c.get("name") == Some(&json!(name)))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| format!("{at} names container {name:?}, which the pod does not have"))?;
        for (field, probe) in probes.as_object().into_iter().flatten() {
            container.insert(field.clone(), probe.clone());
        }
    }
    Ok(Removal::Uninjected)
}

/// Removes the items of list `key` of `map` that match, and the list if that empties it.
fn remove_where(map: &mut Map<String, Value>, key: &str, matches: impl Fn(&Value) -> bool) {
    if let Some(list) = map.get_mut(key).and_then(Value::as_array_mut) {
        list.retain(|v| !matches(v));
        if list.is_empty() {
            map.remove(key);
        }
    }
}

/// Removes `entry` of the map at `key` of `map`, and that map if it is left empty.
fn remove_key(map: &mut Map<String, Value>, key: &str, entry: &str) -> Option<Value> {
    let inner = map.get_mut(key)?.as_object_mut()?;
    let removed = inner.remove(entry);
    if inner.is_empty() {
        map.remove(key);
    }
    removed
}

/// A `"true"`/`"false"` annotation of the pod template, `true` when absent; another value is an
/// error naming it.
fn bool_annotation(template: &Value, key: &str, kind: &str, at: &str) -> Result<bool, String> {
    match template
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
    {
        None => Ok(true),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(v) => Err(format!(
            "{kind}: {at}metadata.annotations[{key}] is {v}; expected \"true\" or \"false\""
        )),
    }
}

/// Points every `httpGet`, `tcpSocket` and `grpc` probe of the app's containers at the proxy's
/// health port. Returns what the proxy must check for each health path, and the probes as they
/// were, by container. A probe with a `host` of its own is left alone: the kubelet sends it
/// elsewhere than the pod.
fn rewrite_probes(spec: &mut Value) -> Result<(AppProbes, Map<String, Value>), String> {
    let mut checks = AppProbes::new();
    let mut originals = Map::new();
    // The kubelet probes regular containers and native sidecars (restartable init containers).
    for list in ["initContainers", "containers"] {
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for (i, c) in containers.iter_mut().enumerate() {
            if list == "initContainers"
                && c.get("restartPolicy").and_then(Value::as_str) != Some("Always")
            {
                continue;
            }
            rewrite_container(c, list, i, &mut checks, &mut originals)?;
        }
    }
    Ok((checks, originals))
}

/// Rewrites the probes of container `i` of `list`.
fn rewrite_container(
    c: &mut Value,
    list: &str,
    i: usize,
    checks: &mut AppProbes,
    originals: &mut Map<String, Value>,
) -> Result<(), String> {
    let name = c
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let container_ports = c.get("ports").cloned().unwrap_or(Value::Null);
    let mut kept = Map::new();
    for (field, segment) in probes::KINDS {
        let Some(probe) = c.get_mut(field) else {
            continue;
        };
        let at = format!("spec.{list}[{i}].{field}");
        let Some(check) = check_of(probe, &name, &container_ports, &at)? else {
            continue;
        };
        let timeout_seconds = match probe.get("timeoutSeconds") {
            None => probes::DEFAULT_TIMEOUT_SECONDS,
            Some(t) => t
                .as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .ok_or_else(|| {
                    format!("{at}.timeoutSeconds is {t}; expected a positive integer")
                })?,
        };
        let path = probes::path(&name, segment);
        kept.insert(field.into(), probe.clone());
        if let Some(o) = probe.as_object_mut() {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                o.remove(handler);
            }
            o.insert(
                "httpGet".into(),
                json!({"path": path, "port": ports::PROXY_METRICS, "scheme": "HTTP"}),
            );
        }
        checks.insert(
            path,
            AppProbe {
                check,
                timeout_seconds,
            },
        );
    }
    if !kept.is_empty() {
        originals.insert(name, Value::Object(kept));
    }
    Ok(())
}

/// What the proxy checks for one probe; `None` for a probe it does not take over (`exec`, or a
/// `host` of its own).
fn check_of(
    probe: &Value,
    container: &str,
    container_ports: &Value,
    at: &str,
) -> Result<Option<Check>, String> {
    let has_host = |h: &Value| {
        h.get("host")
            .and_then(Value::as_str)
            .is_some_and(|h| !h.is_empty())
    };
    if let Some(h) = probe.get("httpGet") {
        if has_host(h) {
            return Ok(None);
        }
        let at = format!("{at}.httpGet");
        let scheme = match h.get("scheme").and_then(Value::as_str) {
            None | Some("HTTP") => Scheme::Http,
            Some("HTTPS") => Scheme::Https,
            Some(other) => {
                return Err(format!("{at}.scheme is {other:?}; expected HTTP or HTTPS"));
            }
        };
        let mut http_headers = Vec::new();
        for (j, header) in h
            .get("httpHeaders")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = |f: &str| {
                header
                    .get(f)
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| format!("{at}.httpHeaders[{j}].{f} is missing"))
            };
            http_headers.push(Header {
                name: field("name")?,
                value: field("value")?,
            });
        }
        let path = match h.get("path").and_then(Value::as_str).unwrap_or("") {
            "" => "/".to_string(),
            p if p.starts_with('/') => p.to_string(),
            p => format!("/{p}"),
        };
        return Ok(Some(Check::HttpGet {
            path,
            port: resolve_port(
                h.get("port"),
                container,
                container_ports,
                &format!("{at}.port"),
            )?,
            scheme,
            http_headers,
        }));
    }
    if let Some(t) = probe.get("tcpSocket") {
        if has_host(t) {
            return Ok(None);
        }
        let at = format!("{at}.tcpSocket.port");
        return Ok(Some(Check::TcpSocket {
            port: resolve_port(t.get("port"), container, container_ports, &at)?,
        }));
    }
    if let Some(g) = probe.get("grpc") {
        let port = g
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                format!(
                    "{at}.grpc.port is {}; expected a port number",
                    g.get("port").unwrap_or(&Value::Null)
                )
            })?;
        let service = g
            .get("service")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        return Ok(Some(Check::Grpc { port, service }));
    }
    Ok(None)
}

/// A probe's port as the kubelet resolves it: a number, or the name of one of the container's
/// ports (failing that, a number written as a string).
fn resolve_port(
    port: Option<&Value>,
    container: &str,
    container_ports: &Value,
    at: &str,
) -> Result<u16, String> {
    let valid = |p: u64| u16::try_from(p).ok().filter(|p| *p > 0);
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(valid)
            .ok_or_else(|| format!("{at} is {n}; expected a port from 1 to 65535")),
        Some(Value::String(name)) => container_ports
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
            .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
            .or_else(|| name.parse::<u64>().ok())
            .and_then(valid)
            .ok_or_else(|| {
                format!("{at} is {name:?}, but container {container:?} has no port of that name")
            }),
        Some(other) => Err(format!("{at} is {other}; expected a port number or name")),
        None => Err(format!("{at} is missing")),
    }
}

fn init_container(s: &InjectSettings) -> Value {
    json!({
        "name": INIT_CONTAINER,
        "image": s.init_image,
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
fn proxy_env(s: &InjectSettings, scoped: bool, checks: &AppProbes) -> Result<Value, String> {
    use crate::consts::env as names;
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field(names::POD_IP, "status.podIP"),
        json!({"name": names::LOG, "value": s.log_level}),
        json!({"name": names::PROXY_TRACING_SAMPLING, "value": s.tracing_sampling.to_string()}),
    ];
    if !s.tracing_endpoint.is_empty() {
        env.push(json!({"name": names::PROXY_TRACING_ENDPOINT, "value": s.tracing_endpoint}));
    }
    if s.access_log {
        env.push(json!({"name": names::PROXY_ACCESS_LOG, "value": "-"}));
    }
    if !scoped {
        env.push(json!({"name": names::PROXY_SCOPED, "value": "false"}));
    }
    if !checks.is_empty() {
        let text = serde_json::to_string(checks).map_err(|e| e.to_string())?;
        env.push(json!({"name": names::PROXY_APP_PROBES, "value": text}));
    }
    // The container's memory limit, so that the proxy sheds load before the kernel kills it.
    // Only when there is one: for a container without a limit the downward API gives the
    // node's allocatable memory.
    if s.resources.pointer("/limits/memory").is_some() {
        env.push(json!({
            "name": names::PROXY_MEMORY_LIMIT,
            "valueFrom": {"resourceFieldRef": {
                "containerName": PROXY_CONTAINER,
                "resource": "limits.memory",
                "divisor": "1"
            }}
        }));
    }
    Ok(Value::Array(env))
}

/// The proxy's volumes: a service account token for mesh-ca, and the mesh's CA root.
fn proxy_volumes() -> [Value; 2] {
    [
        json!({
            "name": "mesh-token",
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "mesh-ca", "expirationSeconds": 3600, "path": "mesh-ca-token"}}]}
        }),
        json!({"name": "mesh-ca-root", "configMap": {"name": "mesh-ca-root"}}),
    ]
}

/// The proxy container, in its `role` (`--transparent true` for a sidecar, `--gateway NAME`
/// for a Gateway's proxy), ready on `/ready`.
fn proxy_container(
    s: &InjectSettings,
    workload: &str,
    role: &[&str],
    scoped: bool,
    checks: &AppProbes,
) -> Result<Value, String> {
    let mut args = vec![
        "--node",
        "$(POD_NAMESPACE)/$(POD_NAME)",
        "--service-account",
        "$(SERVICE_ACCOUNT)",
        "--workload",
        workload,
    ];
    args.extend(role);
    args.extend([
        "--xds",
        &s.xds_addr,
        "--ca-addr",
        &s.ca_addr,
        "--ca-root",
        "/var/run/secrets/mesh/ca.crt",
        "--ca-token-file",
        "/var/run/secrets/tokens/mesh-ca-token",
        "--trust-domain",
        &s.trust_domain,
    ]);
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": s.proxy_image,
        "args": args,
        "env": proxy_env(s, scoped, checks)?,
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": ports::PROXY_METRICS}],
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
    if !s.resources.is_null() {
        c["resources"] = s.resources.clone();
    }
    Ok(c)
}

/// The pod template of a Gateway's proxies: mesh-proxy serving Gateway `gateway` (of the
/// pod's namespace) as the pod's only container, under `service_account`, with `pod_labels`, a
/// container port per listener port in `ports`, and the proxy's identity volumes. Its pods
/// are not injected (`mesh.dev/inject: disabled`: the proxy is the pod) but carry a proxy
/// (`mesh.dev/proxy: "true"`, which the control plane's NetworkPolicies admit), and may bind ports
/// below 1024 as the proxy's unprivileged user (`net.ipv4.ip_unprivileged_port_start: 0`, a
/// sysctl of the pod's own network namespace, as Istio's gateways set it).
pub fn gateway_pod_template(
    s: &InjectSettings,
    gateway: &str,
    service_account: &str,
    pod_labels: &Map<String, Value>,
    ports: &[u16],
) -> Result<Value, String> {
    let mut c = proxy_container(
        s,
        gateway,
        &["--gateway", gateway],
        true,
        &AppProbes::default(),
    )?;
    if let Some(list) = c["ports"].as_array_mut() {
        list.extend(
            ports
                .iter()
                .map(|p| json!({"name": format!("gw-{p}"), "containerPort": p})),
        );
    }
    let mut pod_labels = pod_labels.clone();
    pod_labels.insert(labels::INJECT.into(), json!("disabled"));
    // A pod with a mesh proxy, which the control plane's NetworkPolicies let reach xDS and
    // the CA.
    pod_labels.insert(labels::PROXY.into(), json!("true"));
    Ok(json!({
        "metadata": {"labels": pod_labels},
        "spec": {
            "serviceAccountName": service_account,
            "securityContext": {
                "sysctls": [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}],
                "seccompProfile": {"type": "RuntimeDefault"}
            },
            "containers": [c],
            "volumes": proxy_volumes()
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn settings() -> InjectSettings {
        InjectSettings {
            proxy_image: "mesh/mesh-proxy:test".into(),
            init_image: "mesh/mesh-proxy-init:test".into(),
            prometheus_annotations: true,
            xds_addr: "mesh-controller-xds.mesh-system.svc:15010".into(),
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
    fn a_pod_may_give_its_sidecar_every_service() {
        let mut p = pod();
        inject(&mut p, true, &settings()).expect("injects");
        let proxy = &p["spec"]["initContainers"][1];
        assert!(!env_of(proxy).contains_key(crate::consts::env::PROXY_SCOPED));
        let mut p = pod();
        p["metadata"]["annotations"] = json!({labels::SCOPED: "false"});
        inject(&mut p, true, &settings()).expect("injects");
        let proxy = &p["spec"]["initContainers"][1];
        assert_eq!(
            env_of(proxy)[crate::consts::env::PROXY_SCOPED]["value"],
            "false"
        );
        p = pod();
        p["metadata"]["annotations"] = json!({labels::SCOPED: "no"});
        let err = inject(&mut p, true, &settings()).expect_err("a bad value");
        assert!(
            err.contains("metadata.annotations[mesh.dev/scoped] is \"no\""),
            "{err}"
        );
    }

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

    fn probed_pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "labels": {"app": "web"},
                            "annotations": {"team": "shop"}},
               "spec": {"containers": [{"name": "app", "image": "web:1",
                   "ports": [{"name": "http", "containerPort": 8080}],
                   "readinessProbe": {"httpGet": {"path": "healthz", "port": "http",
                       "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                       "periodSeconds": 3, "timeoutSeconds": 2},
                   "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 5},
                   "startupProbe": {"exec": {"command": ["true"]}}},
                  {"name": "grpc", "image": "api:1",
                   "livenessProbe": {"grpc": {"port": 9090, "service": "api"}},
                   "readinessProbe": {"httpGet": {"host": "10.0.0.9", "port": 80}}}],
                  "initContainers": [{"name": "log-shipper", "image": "ship:1",
                      "restartPolicy": "Always",
                      "readinessProbe": {"httpGet": {"port": 2020, "scheme": "HTTPS"}}},
                      {"name": "migrate", "image": "web:1",
                       "readinessProbe": {"tcpSocket": {"port": 1}}}]}})
    }

    fn env_of(proxy: &Value) -> BTreeMap<String, Value> {
        proxy["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e.clone())))
            .collect()
    }

    /// The kubelet's probes reach the proxy's plaintext health port; the proxy is told what each
    /// one checked (named ports resolved), the pod keeps the originals, and uninjection gives
    /// back exactly the pod that was injected.
    #[test]
    fn probes_are_pointed_at_the_proxy_and_uninjection_restores_them() {
        let original = probed_pod();
        let mut p = original.clone();
        assert_eq!(inject(&mut p, true, &settings()), Ok(Outcome::Injected));
        let app = &p["spec"]["containers"][0];
        assert_eq!(
            app["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"},
                   "periodSeconds": 3, "timeoutSeconds": 2})
        );
        assert_eq!(
            app["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/app/livez", "port": 15020, "scheme": "HTTP"},
                   "failureThreshold": 5})
        );
        assert_eq!(
            app["startupProbe"], original["spec"]["containers"][0]["startupProbe"],
            "exec is left alone"
        );
        let grpc = &p["spec"]["containers"][1];
        assert_eq!(
            grpc["livenessProbe"]["httpGet"]["path"],
            "/app-health/grpc/livez"
        );
        assert_eq!(
            grpc["readinessProbe"], original["spec"]["containers"][1]["readinessProbe"],
            "a probe of another host is left alone"
        );
        // The app's own native sidecar is probed by the kubelet too; a plain init container is not.
        assert_eq!(
            p["spec"]["initContainers"][2]["readinessProbe"]["httpGet"]["path"],
            "/app-health/log-shipper/readyz"
        );
        assert_eq!(
            p["spec"]["initContainers"][3]["readinessProbe"],
            json!({"tcpSocket": {"port": 1}})
        );
        let env = env_of(&p["spec"]["initContainers"][1]);
        assert_eq!(
            env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.podIP"
        );
        let checks = probes::parse(
            env["MESH_PROXY_APP_PROBES"]["value"]
                .as_str()
                .expect("probes"),
        )
        .expect("valid");
        let want = |c: Check, t: u32| AppProbe {
            check: c,
            timeout_seconds: t,
        };
        assert_eq!(
            checks,
            AppProbes::from([
                (
                    "/app-health/app/readyz".to_string(),
                    want(
                        Check::HttpGet {
                            path: "/healthz".into(),
                            port: 8080,
                            scheme: Scheme::Http,
                            http_headers: vec![Header {
                                name: "X-Probe".into(),
                                value: "1".into()
                            }]
                        },
                        2
                    )
                ),
                (
                    "/app-health/app/livez".to_string(),
                    want(Check::TcpSocket { port: 8080 }, 1)
                ),
                (
                    "/app-health/grpc/livez".to_string(),
                    want(
                        Check::Grpc {
                            port: 9090,
                            service: "api".into()
                        },
                        1
                    )
                ),
                (
                    "/app-health/log-shipper/readyz".to_string(),
                    want(
                        Check::HttpGet {
                            path: "/".into(),
                            port: 2020,
                            scheme: Scheme::Https,
                            http_headers: vec![]
                        },
                        1
                    )
                ),
            ])
        );
        let kept: Value = serde_json::from_str(
            p["metadata"]["annotations"]["mesh.dev/app-probes"]
                .as_str()
                .expect("annotation"),
        )
        .expect("json");
        assert_eq!(
            kept["app"]["readinessProbe"],
            original["spec"]["containers"][0]["readinessProbe"]
        );
        assert_eq!(p["metadata"]["annotations"]["team"], "shop");
        // Back out.
        let injected = p.clone();
        assert_eq!(uninject(&mut p), Ok(Removal::Uninjected));
        assert_eq!(p, original);
        assert!(matches!(uninject(&mut p), Ok(Removal::NotInjected(_))));
        // A Deployment without any of the lists injection adds to comes back the same too.
        let bare = json!({"kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "app",
                "livenessProbe": {"tcpSocket": {"port": 80}}}]}}}});
        let mut d = bare.clone();
        inject(&mut d, true, &settings()).expect("injects");
        assert_ne!(d, bare);
        uninject(&mut d).expect("uninjects");
        assert_eq!(d, bare);
        // The pod can keep its probes as written.
        let mut p = original.clone();
        p["metadata"]["annotations"]["mesh.dev/rewrite-app-probes"] = json!("false");
        inject(&mut p, true, &settings()).expect("injects");
        assert_eq!(p["spec"]["containers"], original["spec"]["containers"]);
        assert!(!env_of(&p["spec"]["initContainers"][1]).contains_key("MESH_PROXY_APP_PROBES"));
        assert!(
            p["metadata"]["annotations"]
                .get("mesh.dev/app-probes")
                .is_none()
        );
        // A broken annotation is named, not guessed at.
        let mut broken = injected.clone();
        broken["metadata"]["annotations"]["mesh.dev/app-probes"] = json!("{\"gone\": {}}");
        let err = uninject(&mut broken).expect_err("a container that is not there");
        assert!(
            err.contains("metadata.annotations[mesh.dev/app-probes] names container \"gone\""),
            "{err}"
        );
    }

    #[test]
    fn the_proxy_learns_its_memory_limit_only_when_it_has_one() {
        let proxy = |s: &InjectSettings| {
            let mut p = pod();
            inject(&mut p, true, s).expect("injected");
            let sidecar = p["spec"]["initContainers"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == PROXY_CONTAINER).cloned())
                .expect("the sidecar");
            env_of(&sidecar)
        };
        assert!(!proxy(&settings()).contains_key("MESH_PROXY_MEMORY_LIMIT"));
        let mut limited = settings();
        limited.resources = json!({"requests": {"cpu": "10m"}, "limits": {"memory": "128Mi"}});
        assert_eq!(
            proxy(&limited)["MESH_PROXY_MEMORY_LIMIT"]["valueFrom"],
            json!({"resourceFieldRef": {"containerName": PROXY_CONTAINER,
                   "resource": "limits.memory", "divisor": "1"}})
        );
    }

    #[test]
    fn a_probe_port_that_names_no_port_is_an_error_naming_the_field() {
        let mut p = probed_pod();
        p["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!("metrics");
        let err = inject(&mut p, true, &settings()).expect_err("unknown port name");
        assert_eq!(
            err,
            "Pod: spec.containers[0].readinessProbe.httpGet.port is \"metrics\", but container \"app\" has no port of that name"
        );
        let mut p = probed_pod();
        p["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = json!("8081");
        inject(&mut p, true, &settings()).expect("a number written as a string");
        let mut d = json!({"kind": "Deployment", "spec": {"template": {"spec": {"containers": [
            {"name": "app", "livenessProbe": {"httpGet": {"port": 80, "scheme": "FTP"}}}]}}}});
        let err = inject(&mut d, true, &settings()).expect_err("bad scheme");
        assert_eq!(
            err,
            "Deployment: spec.template.spec.containers[0].livenessProbe.httpGet.scheme is \"FTP\"; expected HTTP or HTTPS"
        );
    }

    #[test]
    fn scrape_annotations_point_at_the_proxy_unless_the_pod_has_its_own() {
        let annotations = |p: &Value| p["metadata"]["annotations"].clone();
        let mut p = pod();
        inject(&mut p, true, &settings()).expect("injects");
        assert_eq!(annotations(&p)["prometheus.io/scrape"], "true");
        assert_eq!(annotations(&p)["prometheus.io/port"], "15020");
        assert_eq!(annotations(&p)["prometheus.io/path"], "/metrics");
        uninject(&mut p).expect("uninjects");
        assert_eq!(p["metadata"].get("annotations"), None);
        // The app's own scrape settings stay, through injection and back, whichever it set.
        for theirs in [
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9090"}),
            json!({"prometheus.io/port": "8080"}),
            json!({"prometheus.io/path": "/stats"}),
        ] {
            let mut own = pod();
            own["metadata"]["annotations"] = theirs;
            let mut p = own.clone();
            inject(&mut p, true, &settings()).expect("injects");
            assert_eq!(annotations(&p), annotations(&own));
            uninject(&mut p).expect("uninjects");
            assert_eq!(annotations(&p), annotations(&own));
        }
        // `annotations:` and `labels:` left empty (null) are none.
        let mut p = pod();
        p["metadata"]["annotations"] = Value::Null;
        p["metadata"]["labels"] = Value::Null;
        inject(&mut p, true, &settings()).expect("injects null maps");
        assert_eq!(annotations(&p)["prometheus.io/port"], "15020");
        assert_eq!(p["metadata"]["labels"]["mesh.dev/proxy"], "true");
        // Off: none.
        let mut p = pod();
        let off = InjectSettings {
            prometheus_annotations: false,
            ..settings()
        };
        inject(&mut p, true, &off).expect("injects");
        assert_eq!(p["metadata"].get("annotations"), None);
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
        let init = &p["spec"]["initContainers"][0];
        assert_eq!(init["image"], "mesh/mesh-proxy-init:test");
        let proxy = &p["spec"]["initContainers"][1];
        assert_eq!(proxy["image"], "mesh/mesh-proxy:test");
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
