//! Every object `meshctl install` applies, in the order it applies them. The Helm chart in
//! `deploy/charts/mesh` renders the same objects from the same values; a test keeps the two
//! equal object by object.

use mesh_api::consts::{identity, ports};
use mesh_api::inject::InjectSettings;
use serde_json::{Value, json};

use super::values::Values;

/// Name of the mutating webhook configuration.
pub const WEBHOOK_CONFIG: &str = "mesh-sidecar-injector";
/// Label every object of the install carries (uninstall and check find them by it).
pub use mesh_api::crds::PART_OF;
/// Where workload and controller pods mount the CA's root and their token for mesh-ca.
const ROOT_DIR: &str = "/var/run/secrets/mesh";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// mesh-ca's working copy of its Secret.
const CA_DIR: &str = "/var/run/mesh-ca";
/// The unprivileged user the control plane runs as (distroless `nonroot`).
const NONROOT_UID: i64 = 65532;

/// What to include besides the control plane.
#[derive(Clone, Copy, Debug)]
pub struct Include {
    pub gateway_api_crds: bool,
}

/// The install's objects, CRDs first, then in dependency order.
pub fn objects(v: &Values, ns: &str, include: Include) -> anyhow::Result<Vec<Value>> {
    if ns != identity::SYSTEM_NAMESPACE {
        anyhow::bail!(
            "namespace {ns:?}: the control plane runs in {}, where proxies expect the \
             identities of the controller and mesh-ca; leave out --mesh-namespace (and unset \
             MESH_NAMESPACE)",
            identity::SYSTEM_NAMESPACE
        );
    }
    let mut out = Vec::new();
    if include.gateway_api_crds {
        for crd in mesh_api::crds::gateway_api_crds() {
            out.push(serde_json::to_value(crd)?);
        }
    }
    for crd in mesh_api::crds::mesh_crds() {
        out.push(serde_json::to_value(crd)?);
    }
    out.push(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": labels(None)}
    }));
    let ca = identity::CA_SERVICE_ACCOUNT;
    let ctl = identity::CONTROLLER_SERVICE_ACCOUNT;
    for sa in [ca, ctl] {
        out.push(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta(sa, Some(ns), sa)
        }));
    }
    out.extend(rbac(ns, v.gateway.deployments));
    out.push(service(
        ns,
        ca,
        &[
            ("grpc-ca", ports::CA, ports::CA),
            ("http-admin", ports::CA_ADMIN, ports::CA_ADMIN),
        ],
    ));
    out.push(service(
        ns,
        ctl,
        &[
            ("grpc-xds", ports::CONTROLLER_XDS, ports::CONTROLLER_XDS),
            ("https-webhook", 443, ports::CONTROLLER_WEBHOOK),
            (
                "http-admin",
                ports::CONTROLLER_ADMIN,
                ports::CONTROLLER_ADMIN,
            ),
        ],
    ));
    out.push(xds_headless_service(ns));
    if v.network_policy.enabled {
        out.extend(network_policies(v, ns));
    }
    out.push(ca_deployment(v, ns));
    out.push(controller_deployment(v, ns));
    out.push(webhook_config(v, ns));
    out.extend(monitoring(v, ns));
    Ok(out)
}

/// The Grafana dashboards the chart ships (`deploy/charts/mesh/dashboards/`), by name.
pub const DASHBOARDS: [(&str, &str); 3] = [
    (
        "mesh-overview",
        include_str!("../../../deploy/charts/mesh/dashboards/mesh-overview.json"),
    ),
    (
        "mesh-service",
        include_str!("../../../deploy/charts/mesh/dashboards/mesh-service.json"),
    ),
    (
        "mesh-workload",
        include_str!("../../../deploy/charts/mesh/dashboards/mesh-workload.json"),
    ),
];

/// Objects for the Prometheus Operator and Grafana, as `monitoring` in the values asks.
fn monitoring(v: &Values, ns: &str) -> Vec<Value> {
    let m = &v.monitoring;
    let with = |extra: &std::collections::BTreeMap<String, String>| {
        let mut l = labels(None);
        for (k, val) in extra {
            l[k.as_str()] = json!(val);
        }
        l
    };
    let monitor = |kind: &str, name: &str, extra, spec| {
        json!({"apiVersion": "monitoring.coreos.com/v1", "kind": kind,
            "metadata": {"name": name, "namespace": ns, "labels": with(extra)}, "spec": spec})
    };
    let mut out = Vec::new();
    if m.service_monitor.enabled {
        out.push(monitor(
            "ServiceMonitor",
            "mesh-control-plane",
            &m.service_monitor.labels,
            json!({
                "selector": {"matchExpressions": [{"key": "app.kubernetes.io/name",
                    "operator": "In", "values": [identity::CA_SERVICE_ACCOUNT,
                        identity::CONTROLLER_SERVICE_ACCOUNT]}]},
                "endpoints": [{"port": "http-admin", "path": "/metrics",
                    "interval": m.service_monitor.interval}]
            }),
        ));
    }
    if m.pod_monitor.enabled {
        out.push(monitor(
            "PodMonitor",
            "mesh-proxies",
            &m.pod_monitor.labels,
            json!({
                "namespaceSelector": {"any": true},
                "selector": {"matchLabels": {mesh_api::consts::labels::PROXY: "true"}},
                "podMetricsEndpoints": [{"port": mesh_api::inject::METRICS_PORT_NAME,
                    "path": "/metrics", "interval": m.pod_monitor.interval}]
            }),
        ));
    }
    if m.dashboards.enabled {
        for (name, text) in DASHBOARDS {
            out.push(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": format!("{name}-dashboard"), "namespace": ns,
                    "labels": with(&m.dashboards.labels)},
                "data": {format!("{name}.json"): text}
            }));
        }
    }
    out
}

fn labels(component: Option<&str>) -> Value {
    let mut l = json!({
        PART_OF.0: PART_OF.1,
        "app.kubernetes.io/version": super::values::APP_VERSION,
    });
    if let Some(c) = component {
        l["app.kubernetes.io/name"] = json!(c);
    }
    l
}

fn meta(name: &str, ns: Option<&str>, component: &str) -> Value {
    let mut m = json!({"name": name, "labels": labels(Some(component))});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

/// Least privilege: what each component's code calls, nothing more (e2e/tests/rbac.rs runs the
/// binaries against these roles and fails on a missing or an unused grant).
fn rbac(ns: &str, gateway_deployments: bool) -> Vec<Value> {
    let ca = identity::CA_SERVICE_ACCOUNT;
    let ctl = identity::CONTROLLER_SERVICE_ACCOUNT;
    // Watches (a list, then a watch) feed the index; nothing is read one by one.
    let watch = ["list", "watch"];
    let mut cluster_roles = [
        (
            ca,
            vec![
                // Workloads authenticate with their service account tokens.
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
            ],
        ),
        (
            ctl,
            vec![
                rule(&[""], &["namespaces", "services", "pods"], &watch),
                rule(&["discovery.k8s.io"], &["endpointslices"], &watch),
                // A Gateway listener's certificates: the watch asks only for Secrets of type
                // kubernetes.io/tls (a field selector; RBAC cannot narrow a list by type).
                rule(&[""], &["secrets"], &watch),
                // Route, Gateway and GatewayClass status is written over what a get returns.
                rule(
                    &["gateway.networking.k8s.io"],
                    &["httproutes", "grpcroutes", "gateways", "gatewayclasses"],
                    &["get", "list", "watch"],
                ),
                // Which routes may send to a Service of another namespace.
                rule(&["gateway.networking.k8s.io"], &["referencegrants"], &watch),
                // Their status, from the replica holding the Lease.
                rule(
                    &["gateway.networking.k8s.io"],
                    &[
                        "httproutes/status",
                        "grpcroutes/status",
                        "gateways/status",
                        "gatewayclasses/status",
                    ],
                    &["patch"],
                ),
                // Rollouts set their route's weights (server-side apply), from the same replica.
                rule(
                    &["gateway.networking.k8s.io"],
                    &["httproutes", "grpcroutes"],
                    &["patch"],
                ),
                rule(
                    &["mesh.dev"],
                    &[
                        "authorizationpolicies",
                        "trafficpolicies",
                        "ratelimitpolicies",
                        "faultinjections",
                        "rollouts",
                    ],
                    &watch,
                ),
                rule(&["mesh.dev"], &["rollouts/status"], &["patch"]),
                // Who may read the debug API: a caller's token, and RBAC on its user.
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
                // An Event per rollout decision.
                rule(&[""], &["events"], &["create"]),
                // The CA's root, copied into each namespace whose pods get sidecars.
                rule(&[""], &["configmaps"], &["get", "create", "update"]),
                // The injector's caBundle, kept equal to the CA's root.
                json!({"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"], "resourceNames": [WEBHOOK_CONFIG], "verbs": ["get", "update"]}),
            ],
        ),
    ];
    if gateway_deployments {
        // Each Gateway's proxies: their Deployment, Service and ServiceAccount, read (someone
        // else's of the same name is not taken over) and server-side applied from the Lease
        // holder (an apply that creates is a create too).
        let verbs = ["get", "create", "patch"];
        let gateways = [
            rule(&[""], &["serviceaccounts", "services"], &verbs),
            rule(&["apps"], &["deployments"], &verbs),
        ];
        cluster_roles[1].1.extend(gateways);
    }
    // The CA keeps its signing key in a Secret of its namespace and publishes its root in a
    // ConfigMap there.
    let ca_rules = vec![
        rule(&[""], &["secrets", "configmaps"], &["create"]),
        json!({"apiGroups": [""], "resources": ["secrets"], "resourceNames": [ca], "verbs": ["get"]}),
        json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["mesh-ca-root"], "verbs": ["get", "update"]}),
    ];
    let mut out = vec![reader_role()];
    for (name, rules) in cluster_roles {
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta(&format!("mesh-system:{name}"), None, name),
            "rules": rules
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": meta(&format!("mesh-system:{name}"), None, name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("mesh-system:{name}")},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
        }));
    }
    // The controller's leader election.
    let ctl_rules = vec![
        rule(&["coordination.k8s.io"], &["leases"], &["create"]),
        json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [ctl], "verbs": ["get", "update"]}),
    ];
    for (name, rules) in [(ca, ca_rules), (ctl, ctl_rules)] {
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta(name, Some(ns), name),
            "rules": rules
        }));
        out.push(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta(name, Some(ns), name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]
        }));
    }
    out
}

/// Who may read the mesh (the controller's debug API, `meshctl stat`, `authz`, `check`,
/// `proxy-status`), bound with a RoleBinding in the control plane's namespace: its debug API
/// for a caller's token, and a port-forward to a controller pod for meshctl.
fn reader_role() -> Value {
    use identity::{DEBUG_GROUP, DEBUG_RESOURCE, DEBUG_VERB, READER_ROLE};
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": READER_ROLE, "labels": labels(None)},
        "rules": [
            rule(&[DEBUG_GROUP], &[DEBUG_RESOURCE], &[DEBUG_VERB]),
            rule(&[""], &["pods"], &["get", "list"]),
            // create: SPDY and WebSockets (API servers from 1.35); get: WebSockets before.
            rule(&[""], &["pods/portforward"], &["get", "create"]),
            // kubectl port-forward deploy/mesh-controller reads the Deployment first.
            json!({"apiGroups": ["apps"], "resources": ["deployments"],
                "resourceNames": [identity::CONTROLLER_SERVICE_ACCOUNT], "verbs": ["get"]}),
        ]
    })
}

/// The NetworkPolicies `networkPolicy.enabled` makes, by name only (to find and delete).
pub fn network_policy_stubs(ns: &str) -> Vec<Value> {
    [
        identity::CONTROLLER_SERVICE_ACCOUNT,
        identity::CA_SERVICE_ACCOUNT,
    ]
    .into_iter()
    .map(|name| {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": ns}})
    })
    .collect()
}

/// The monitoring objects the values leave out (`monitoring.*.enabled` false), by name: an
/// install deletes those an earlier one created, as `helm upgrade` would.
pub fn monitoring_stubs(v: &Values, ns: &str) -> Vec<(Value, &'static str)> {
    let m = &v.monitoring;
    let mut out = Vec::new();
    let meta = |name: &str| json!({"name": name, "namespace": ns});
    if !m.service_monitor.enabled {
        out.push((
            json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                "metadata": meta("mesh-control-plane")}),
            "monitoring.serviceMonitor.enabled is false",
        ));
    }
    if !m.pod_monitor.enabled {
        out.push((
            json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                "metadata": meta("mesh-proxies")}),
            "monitoring.podMonitor.enabled is false",
        ));
    }
    if !m.dashboards.enabled {
        for (name, _) in DASHBOARDS {
            out.push((
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": meta(&format!("{name}-dashboard"))}),
                "monitoring.dashboards.enabled is false",
            ));
        }
    }
    out
}

/// Who may reach the control plane's pods (`networkPolicy` in the values): the injector from
/// anywhere (the API server calls it, and it is not a pod a rule can name), xDS from pods with
/// sidecars, the CA from those and the controller, the admin ports from the monitoring
/// namespace. The kubelet's probes and port-forwards are not subject to NetworkPolicy.
fn network_policies(v: &Values, ns: &str) -> Vec<Value> {
    let ctl = identity::CONTROLLER_SERVICE_ACCOUNT;
    let ca = identity::CA_SERVICE_ACCOUNT;
    let port = |p: u16| json!({"protocol": "TCP", "port": p});
    let meshed = json!({"namespaceSelector": {},
        "podSelector": {"matchLabels": {mesh_api::consts::labels::PROXY: "true"}}});
    let monitoring = json!({"namespaceSelector": {"matchLabels":
        {"kubernetes.io/metadata.name": v.network_policy.monitoring_namespace}}});
    let policy = |name: &str, ingress: Vec<Value>| {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta(name, Some(ns), name),
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "policyTypes": ["Ingress"],
                "ingress": ingress
            }
        })
    };
    vec![
        policy(
            ctl,
            vec![
                json!({"ports": [port(ports::CONTROLLER_WEBHOOK)]}),
                json!({"from": [meshed], "ports": [port(ports::CONTROLLER_XDS)]}),
                json!({"from": [monitoring], "ports": [port(ports::CONTROLLER_ADMIN)]}),
            ],
        ),
        policy(
            ca,
            vec![
                json!({"from": [meshed, {"podSelector": {"matchLabels": {"app.kubernetes.io/name": ctl}}}],
                    "ports": [port(ports::CA)]}),
                json!({"from": [monitoring], "ports": [port(ports::CA_ADMIN)]}),
            ],
        ),
    ]
}

fn service(ns: &str, name: &str, ports: &[(&str, u16, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|&(n, port, target)| {
            json!({"name": n, "port": port, "targetPort": target, "protocol": "TCP"})
        })
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(name, Some(ns), name),
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": ports
        }
    })
}

/// `mesh-controller-xds`: every ready controller replica's address under one name, for
/// sidecars to resolve and fail over between (a ClusterIP hides the replicas behind one).
fn xds_headless_service(ns: &str) -> Value {
    let ctl = identity::CONTROLLER_SERVICE_ACCOUNT;
    let mut s = service(
        ns,
        ctl,
        &[("grpc-xds", ports::CONTROLLER_XDS, ports::CONTROLLER_XDS)],
    );
    s["metadata"]["name"] = json!(identity::CONTROLLER_XDS_SERVICE);
    s["spec"]["clusterIP"] = json!("None");
    s
}

fn container_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": NONROOT_UID,
        "runAsGroup": NONROOT_UID,
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]}
    })
}

fn probe(path: &str, port: u16) -> Value {
    json!({"httpGet": {"path": path, "port": port}, "periodSeconds": 5})
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

#[allow(clippy::too_many_arguments)]
fn deployment(
    v: &Values,
    ns: &str,
    name: &str,
    replicas: u32,
    args: Vec<String>,
    log_level: &str,
    ports: Vec<Value>,
    admin_port: u16,
    resources: Value,
    mounts: Value,
    volumes: Value,
) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, Some(ns), name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "template": {
                "metadata": {"labels": labels(Some(name))},
                "spec": {
                    "serviceAccountName": name,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": name,
                        "image": v.image(name),
                        "imagePullPolicy": v.image.pull_policy,
                        "args": args,
                        "env": [
                            {"name": mesh_api::consts::env::LOG, "value": log_level},
                            {"name": mesh_api::consts::env::LOG_FORMAT, "value": "json"},
                            env_field("POD_NAMESPACE", "metadata.namespace")
                        ],
                        "ports": ports,
                        "readinessProbe": probe("/ready", admin_port),
                        "livenessProbe": probe("/live", admin_port),
                        "resources": resources,
                        "securityContext": container_security(),
                        "volumeMounts": mounts
                    }],
                    "volumes": volumes
                }
            }
        }
    });
    // No empty lists: the chart leaves them out.
    let spec = &mut d["spec"]["template"]["spec"];
    if volumes_empty(&spec["volumes"]) {
        if let Some(s) = spec.as_object_mut() {
            s.remove("volumes");
        }
        if let Some(c) = spec["containers"][0].as_object_mut() {
            c.remove("volumeMounts");
        }
    }
    d
}

fn volumes_empty(v: &Value) -> bool {
    v.as_array().is_none_or(Vec::is_empty)
}

fn ca_deployment(v: &Values, ns: &str) -> Value {
    let name = identity::CA_SERVICE_ACCOUNT;
    let args = vec![
        "serve".to_owned(),
        "--kubernetes".to_owned(),
        format!("--secret={name}"),
        format!("--dir={CA_DIR}"),
        format!("--trust-domain={}", v.trust_domain),
        format!("--default-lifetime={}", v.ca.cert_lifetime),
    ];
    deployment(
        v,
        ns,
        name,
        1,
        args,
        v.ca.log_level.as_str(),
        vec![
            json!({"name": "grpc-ca", "containerPort": ports::CA}),
            json!({"name": "http-admin", "containerPort": ports::CA_ADMIN}),
        ],
        ports::CA_ADMIN,
        json!(v.ca.resources),
        json!([{"name": "ca-state", "mountPath": CA_DIR}]),
        // The Secret mirrored for the CA to load: in memory, never on the node's disk.
        json!([{"name": "ca-state", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}]),
    )
}

/// What the injector gives sidecars, for a control plane in `ns` (the controller's flags and
/// `meshctl inject` both come from here).
pub fn inject_settings(v: &Values, ns: &str) -> InjectSettings {
    InjectSettings {
        proxy_image: v.image("mesh-proxy"),
        init_image: v.image("mesh-proxy-init"),
        xds_addr: identity::xds_addr(ns),
        ca_addr: identity::ca_addr(ns),
        trust_domain: v.trust_domain.clone(),
        proxy_uid: mesh_api::inject::PROXY_UID,
        log_level: v.proxy.log_level.as_str().into(),
        resources: json!(v.proxy.resources),
        tracing_endpoint: v.proxy.tracing.endpoint.clone(),
        tracing_sampling: v.proxy.tracing.sampling,
        access_log: v.proxy.access_log,
        prometheus_annotations: v.proxy.prometheus_annotations,
    }
}

fn controller_deployment(v: &Values, ns: &str) -> Value {
    let name = identity::CONTROLLER_SERVICE_ACCOUNT;
    let s = inject_settings(v, ns);
    let mut args = vec![
        format!("--trust-domain={}", v.trust_domain),
        format!(
            "--mtls-mode={}",
            json!(v.mtls_mode).as_str().unwrap_or_default()
        ),
        format!(
            "--authz-default={}",
            json!(v.authz_default).as_str().unwrap_or_default()
        ),
        format!("--ca-addr={}", s.ca_addr),
        format!("--ca-root={ROOT_DIR}/ca.crt"),
        format!("--ca-token-file={TOKEN_DIR}/mesh-ca-token"),
        format!("--webhook-addr=0.0.0.0:{}", ports::CONTROLLER_WEBHOOK),
        format!("--inject-proxy-image={}", s.proxy_image),
        format!("--inject-init-image={}", s.init_image),
        format!("--inject-xds-addr={}", s.xds_addr),
        format!("--inject-ca-addr={}", s.ca_addr),
        format!("--inject-proxy-log-level={}", s.log_level),
        format!("--inject-tracing-endpoint={}", s.tracing_endpoint),
        format!("--inject-tracing-sampling={}", s.tracing_sampling),
        format!("--inject-access-log={}", s.access_log),
        format!(
            "--inject-prometheus-annotations={}",
            s.prometheus_annotations
        ),
        // Keys sorted, as Helm's toJson writes them.
        format!("--inject-proxy-resources={}", s.resources),
        format!("--gateway-deployments={}", v.gateway.deployments),
    ];
    if v.gateway.deployments {
        args.push(format!(
            "--gateway-service-type={}",
            json!(v.gateway.service_type).as_str().unwrap_or_default()
        ));
    }
    let mut d = deployment(
        v,
        ns,
        name,
        v.controller.replicas,
        args,
        v.controller.log_level.as_str(),
        vec![
            json!({"name": "grpc-xds", "containerPort": ports::CONTROLLER_XDS}),
            json!({"name": "https-webhook", "containerPort": ports::CONTROLLER_WEBHOOK}),
            json!({"name": "http-admin", "containerPort": ports::CONTROLLER_ADMIN}),
        ],
        ports::CONTROLLER_ADMIN,
        json!(v.controller.resources),
        json!([
            {"name": "mesh-token", "mountPath": TOKEN_DIR, "readOnly": true},
            {"name": "mesh-ca-root", "mountPath": ROOT_DIR, "readOnly": true}
        ]),
        json!([
            {"name": "mesh-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "mesh-ca", "expirationSeconds": 3600, "path": "mesh-ca-token"}}]}},
            {"name": "mesh-ca-root", "configMap": {"name": "mesh-ca-root"}}
        ]),
    );
    if let Some(env) = d["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut() {
        env.push(env_field("POD_NAME", "metadata.name"));
    }
    d
}

fn webhook_config(v: &Values, ns: &str) -> Value {
    let name = identity::CONTROLLER_SERVICE_ACCOUNT;
    let label = mesh_api::consts::labels::INJECT;
    let hook = |hook_name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": hook_name,
            "clientConfig": {"service": {"name": name, "namespace": ns, "path": "/inject", "port": 443}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": v.webhook.failure_policy,
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10
        })
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": meta(WEBHOOK_CONFIG, None, name),
        "webhooks": [
            // A namespace labelled enabled: every pod not labelled disabled.
            hook(
                "namespace.inject.mesh.dev",
                json!({"matchLabels": {label: "enabled"}}),
                json!({"matchExpressions": [{"key": label, "operator": "NotIn", "values": ["disabled"]}]})
            ),
            // Elsewhere (but not in a namespace labelled disabled): pods labelled enabled.
            hook(
                "pod.inject.mesh.dev",
                json!({"matchExpressions": [{"key": label, "operator": "NotIn", "values": ["enabled", "disabled"]}]}),
                json!({"matchLabels": {label: "enabled"}})
            )
        ]
    })
}

/// `kind/namespace/name` of an object, for messages and for comparing object sets.
pub fn key(o: &Value) -> String {
    let s = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or("");
    match s("/metadata/namespace") {
        "" => format!("{}/{}", s("/kind"), s("/metadata/name")),
        ns => format!("{}/{ns}/{}", s("/kind"), s("/metadata/name")),
    }
}
