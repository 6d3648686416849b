//! `meshctl check` against a cluster: before install (`--pre`), after install, and each
//! injected pod's proxy (`--proxy`). The control plane's admin endpoints are read through the
//! API server's pod proxy, so nothing but a kubeconfig is needed.

use std::time::{SystemTime, UNIX_EPOCH};

use kube::core::ApiResource;
use serde_json::{Value, json};

use super::check::{CheckArgs, Checks, WARN_DAYS, control_plane, days_left, identity};
use crate::admin::Endpoint;
use crate::cluster::{Cluster, crd_established, field, pod_of, rollout_done};
use crate::install::manifests::{self, Include, WEBHOOK_CONFIG};
use crate::install::values::{APP_VERSION, Values};

/// Native sidecars (init containers with `restartPolicy: Always`) are on by default from here.
pub const MIN_KUBERNETES: (u64, u64) = (1, 29);

/// The Kubernetes API reachable, and recent enough. Returns whether it was reached.
pub(crate) async fn api(cluster: &Cluster, c: &mut Checks) -> bool {
    const CAT: &str = "kubernetes";
    match cluster.client().apiserver_version().await {
        Ok(v) => {
            let minor: u64 = v
                .minor
                .trim_end_matches(|ch: char| !ch.is_ascii_digit())
                .parse()
                .unwrap_or(0);
            let major: u64 = v.major.parse().unwrap_or(0);
            c.ok(
                CAT,
                format!("the API server is reachable ({})", v.git_version),
            );
            if (major, minor) >= MIN_KUBERNETES {
                c.ok(
                    CAT,
                    format!("Kubernetes {major}.{minor} runs native sidecars"),
                );
            } else {
                c.fail(
                    CAT,
                    format!(
                        "Kubernetes {major}.{minor} is older than {}.{}: no native sidecars",
                        MIN_KUBERNETES.0, MIN_KUBERNETES.1
                    ),
                    "upgrade the cluster to 1.29 or later (SidecarContainers on by default)",
                );
            }
            true
        }
        Err(e) => {
            c.fail(
                CAT,
                format!("the API server is not reachable: {e}"),
                "check your kubeconfig context (kubectl cluster-info)",
            );
            false
        }
    }
}

/// `(verb, group, resource, namespace)` install needs, from the objects it applies.
pub(crate) fn needed_permissions(
    ns: &str,
) -> anyhow::Result<Vec<(String, String, String, String)>> {
    let values = Values::defaults()?;
    let objects = manifests::objects(
        &values,
        ns,
        Include {
            gateway_api_crds: true,
        },
    )?;
    let mut out: Vec<(String, String, String, String)> = Vec::new();
    for o in objects {
        let api_version = o["apiVersion"].as_str().unwrap_or("");
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let Some((plural, namespaced)) =
            crate::cluster::plural(api_version, o["kind"].as_str().unwrap_or(""))
        else {
            continue;
        };
        let namespace = if namespaced { ns } else { "" };
        for verb in ["create", "patch", "get"] {
            let p = (verb.into(), group.into(), plural.into(), namespace.into());
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    // The optional objects: made when enabled, deleted when not (NetworkPolicies, the
    // dashboards' ConfigMaps). The monitors are the Prometheus Operator's kinds: asked for only
    // where its CRDs are and the values enable them, so not reviewed with the defaults.
    for (group, resource) in [("networking.k8s.io", "networkpolicies"), ("", "configmaps")] {
        for verb in ["create", "patch", "get", "delete"] {
            let p = (verb.into(), group.into(), resource.into(), ns.into());
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// Before install: the API, the permissions install needs (SelfSubjectAccessReview), and
/// namespaces whose Pod Security level forbids the init container's NET_ADMIN.
pub(crate) async fn pre(cluster: &Cluster, ns: &str, c: &mut Checks) -> anyhow::Result<()> {
    if !api(cluster, c).await {
        return Ok(());
    }
    const CAT: &str = "permissions";
    let ar = ApiResource {
        group: "authorization.k8s.io".into(),
        version: "v1".into(),
        api_version: "authorization.k8s.io/v1".into(),
        kind: "SelfSubjectAccessReview".into(),
        plural: "selfsubjectaccessreviews".into(),
    };
    let mut denied = 0;
    let needed = needed_permissions(ns)?;
    for (verb, group, resource, namespace) in &needed {
        let mut attrs = json!({"verb": verb, "group": group, "resource": resource});
        if !namespace.is_empty() {
            attrs["namespace"] = json!(namespace);
        }
        let review = json!({
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "metadata": {},
            "spec": {"resourceAttributes": attrs}
        });
        let answer = cluster.create_review(&ar, &review).await?;
        if answer.pointer("/status/allowed").and_then(Value::as_bool) != Some(true) {
            denied += 1;
            let what = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            let scope = if namespace.is_empty() {
                "cluster-wide".to_owned()
            } else {
                format!("in namespace {namespace}")
            };
            let reason = answer
                .pointer("/status/reason")
                .and_then(Value::as_str)
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            c.fail(
                CAT,
                format!("you may not {verb} {what} {scope}{reason}"),
                &format!(
                    "install needs it: ask a cluster admin for a role allowing {verb} on {what} \
                     (kubectl auth can-i {verb} {what}{})",
                    if namespace.is_empty() {
                        String::new()
                    } else {
                        format!(" -n {namespace}")
                    }
                ),
            );
        }
    }
    if denied == 0 {
        c.ok(
            CAT,
            format!(
                "you may create every object install creates ({} permissions checked)",
                needed.len()
            ),
        );
    }
    const PSA: &str = "pod security";
    let namespaces = cluster.list("v1", "Namespace", "").await?;
    let mut blocked = 0;
    for n in &namespaces {
        let name = field(n, "/metadata/name");
        let level = n
            .pointer("/metadata/labels/pod-security.kubernetes.io~1enforce")
            .and_then(Value::as_str)
            .unwrap_or("privileged");
        let injected = n
            .pointer("/metadata/labels/mesh.dev~1inject")
            .and_then(Value::as_str)
            == Some("enabled");
        if injected && (level == "baseline" || level == "restricted") {
            blocked += 1;
            c.fail(
                PSA,
                format!("namespace {name} enforces Pod Security {level:?}: mesh-init needs NET_ADMIN and NET_RAW"),
                "label the namespace pod-security.kubernetes.io/enforce=privileged, or keep it out of the mesh",
            );
        }
    }
    if blocked == 0 {
        c.ok(
            PSA,
            "no namespace labelled for injection forbids the init container's NET_ADMIN",
        );
    }
    Ok(())
}

fn cert_days(pem: &str) -> Vec<(String, f64)> {
    mesh_api::tls::certs_from_pem(pem, "root")
        .unwrap_or_default()
        .iter()
        .map(|der| {
            let fp = mesh_api::tls::fingerprint(der);
            let not_after = x509_not_after(der);
            (
                fp[..fp.len().min(16)].to_owned(),
                days_left(not_after as f64),
            )
        })
        .collect()
}

fn x509_not_after(der: &[u8]) -> i64 {
    mesh_ca::authority::not_after_unix(der)
}

/// After install: CRDs, the control plane's rollouts, the webhook and its certificate, the
/// CA's roots and signing certificate, and every proxy SYNCED.
pub(crate) async fn installed(cluster: &Cluster, ns: &str, c: &mut Checks) -> anyhow::Result<()> {
    if !api(cluster, c).await {
        return Ok(());
    }
    let values = Values::defaults()?;
    let objects = manifests::objects(
        &values,
        ns,
        Include {
            gateway_api_crds: true,
        },
    )?;

    const CRDS: &str = "crds";
    let mut missing = 0;
    for crd in objects
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
    {
        let name = field(crd, "/metadata/name");
        match cluster.get(crd).await? {
            Some(live) if crd_established(&live).0 => {}
            Some(_) => {
                missing += 1;
                c.fail(
                    CRDS,
                    format!("CRD {name} is not established"),
                    "kubectl describe crd shows why",
                );
            }
            None => {
                missing += 1;
                c.fail(
                    CRDS,
                    format!("CRD {name} is missing"),
                    "run meshctl install",
                );
            }
        }
    }
    if missing == 0 {
        c.ok(CRDS, "the Gateway API and mesh.dev CRDs are established");
    }
    dropped_fields(cluster, c).await?;

    const CP: &str = "control plane";
    match crate::install::installed_version(cluster, ns).await? {
        None => {
            c.fail(
                CP,
                format!("the mesh is not installed in {ns}"),
                "run meshctl install (meshctl check --pre first)",
            );
            return Ok(());
        }
        Some(v) if v != APP_VERSION => c.warn(
            CP,
            format!("the control plane runs {v}, this meshctl is {APP_VERSION}"),
            "use the meshctl of the installed version, or meshctl upgrade",
        ),
        Some(v) => c.ok(CP, format!("the control plane is version {v}")),
    }
    for d in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let name = field(d, "/metadata/name");
        match cluster.get(d).await? {
            Some(live) => {
                let (done, status) = rollout_done(&live);
                if done {
                    c.ok(CP, format!("{name} is ready ({status})"));
                } else {
                    c.fail(
                        CP,
                        format!("{name} is not ready: {status}"),
                        &format!("kubectl -n {ns} describe deployment {name}; kubectl -n {ns} logs deployment/{name}"),
                    );
                }
            }
            None => c.fail(
                CP,
                format!("Deployment {ns}/{name} is missing"),
                "run meshctl install",
            ),
        }
    }
    let controller = pod_of(
        cluster,
        ns,
        mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT,
    )
    .await?;
    if let Some(pod) = &controller {
        let ep = Endpoint::forward(cluster, ns, pod, mesh_api::consts::ports::CONTROLLER_ADMIN);
        if control_plane(&ep, c).await.is_some() {
            super::check::gateways(&ep, c).await;
        }
    }
    let ca_pod = pod_of(cluster, ns, mesh_api::consts::identity::CA_SERVICE_ACCOUNT).await?;
    if let Some(pod) = &ca_pod {
        // A port-forward too: the API server's pod proxy may be kept out by a NetworkPolicy.
        let ep = Endpoint::forward(cluster, ns, pod, mesh_api::consts::ports::CA_ADMIN);
        identity(&ep, c).await;
    }

    const HOOK: &str = "webhook";
    let root_cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": mesh_controller::ca_root::ROOT_CONFIGMAP, "namespace": ns}});
    let root = cluster.get(&root_cm).await?.and_then(|cm| {
        cm.pointer("/data/ca.crt")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let probe = json!({"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration", "metadata": {"name": WEBHOOK_CONFIG}});
    match cluster.get(&probe).await? {
        None => c.fail(
            HOOK,
            format!("MutatingWebhookConfiguration {WEBHOOK_CONFIG} is missing"),
            "run meshctl install",
        ),
        Some(config) => {
            let hooks = config["webhooks"].as_array().cloned().unwrap_or_default();
            for h in &hooks {
                let name = h["name"].as_str().unwrap_or("?");
                let bundle = h
                    .pointer("/clientConfig/caBundle")
                    .and_then(Value::as_str)
                    .and_then(|b| {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.decode(b).ok()
                    })
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                match (bundle, &root) {
                    (None, _) => c.fail(
                        HOOK,
                        format!("webhook {name} has no caBundle: the API server cannot call the injector"),
                        "the controller sets it once mesh-ca published its root; check both are ready",
                    ),
                    (Some(b), Some(r)) if b != *r => c.fail(
                        HOOK,
                        format!("webhook {name}'s caBundle is not the CA root"),
                        "the controller updates it within 10 s; if it stays, check the controller's log",
                    ),
                    (Some(b), _) => {
                        let days = cert_days(&b);
                        match days.iter().map(|(_, d)| *d).fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.min(d)))) {
                            None => c.fail(HOOK, format!("webhook {name}'s caBundle holds no certificate"), "the controller rewrites it from the CA root"),
                            Some(d) if d < 0.0 => c.fail(HOOK, format!("webhook {name}'s caBundle expired"), "rotate the root (docs/reference/identity.md)"),
                            Some(d) if d < WARN_DAYS => c.warn(HOOK, format!("webhook {name}'s caBundle expires in {d:.0} days"), "rotate the root before it expires"),
                            Some(_) => c.ok(HOOK, format!("webhook {name} trusts the CA root")),
                        }
                    }
                }
            }
        }
    }
    if root.is_none() {
        c.fail(
            HOOK,
            format!("ConfigMap {ns}/mesh-ca-root is missing: mesh-ca has not published its root"),
            &format!("kubectl -n {ns} logs deployment/mesh-ca"),
        );
    }
    Ok(())
}

/// What users applied that the installed schemas dropped: each route and mesh.dev policy whose
/// last applied configuration (`kubectl apply`'s annotation) has a field that the installed CRD
/// lacks, read as the API server reads a write (`mesh_api::schema`). An HTTPRoute `retry` on a
/// cluster with the standard channel is the common case: it was silently pruned.
pub(crate) async fn dropped_fields(cluster: &Cluster, c: &mut Checks) -> anyhow::Result<()> {
    use mesh_api::k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    const CAT: &str = "config";
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
    let crds: Vec<CustomResourceDefinition> = cluster
        .list("apiextensions.k8s.io/v1", "CustomResourceDefinition", "")
        .await?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let mut checked = 0;
    let mut dropped = 0;
    for (api_version, kind) in [
        ("gateway.networking.k8s.io/v1", "HTTPRoute"),
        ("gateway.networking.k8s.io/v1", "GRPCRoute"),
        ("mesh.dev/v1alpha1", "AuthorizationPolicy"),
        ("mesh.dev/v1alpha1", "TrafficPolicy"),
        ("mesh.dev/v1alpha1", "RateLimitPolicy"),
        ("mesh.dev/v1alpha1", "FaultInjection"),
    ] {
        // A kind whose CRD is missing was reported above.
        let Ok(items) = cluster.list(api_version, kind, "").await else {
            continue;
        };
        for o in items {
            let applied = o
                .pointer("/metadata/annotations")
                .and_then(|a| a.get(LAST_APPLIED))
                .and_then(Value::as_str)
                .and_then(|t| serde_json::from_str::<Value>(t).ok());
            let Some(mut applied) = applied else {
                continue;
            };
            checked += 1;
            let Some(report) = mesh_api::schema::admit_in(&mut applied, &crds) else {
                continue;
            };
            for path in report.pruned {
                dropped += 1;
                c.warn(
                    CAT,
                    format!(
                        "{kind} {}/{}: {path} was applied but the installed schema has no such field, so the API server dropped it",
                        field(&o, "/metadata/namespace"),
                        field(&o, "/metadata/name")
                    ),
                    "check the field's spelling (docs/reference/crds.md); an HTTPRoute retry needs the experimental channel, or a TrafficPolicy retry",
                );
            }
        }
    }
    if dropped == 0 {
        c.ok(
            CAT,
            format!(
                "{checked} applied routes and policies kept every field they were applied with"
            ),
        );
    }
    Ok(())
}

/// Every injected pod (label `mesh.dev/proxy=true`): ready, its proxy ready with a valid
/// certificate, and the proxy's version the control plane's.
pub(crate) async fn proxies(cluster: &Cluster, c: &mut Checks) -> anyhow::Result<()> {
    const CAT: &str = "proxies";
    let pods = cluster
        .list(
            "v1",
            "Pod",
            &format!("{}=true", mesh_api::consts::labels::PROXY),
        )
        .await?;
    if pods.is_empty() {
        c.warn(
            CAT,
            "no injected pod found",
            "label a namespace mesh.dev/inject=enabled and restart its workloads",
        );
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as f64;
    for p in &pods {
        let ns = field(p, "/metadata/namespace");
        let name = field(p, "/metadata/name");
        let who = format!("{ns}/{name}");
        let statuses = p
            .pointer("/status/initContainerStatuses")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let proxy = statuses
            .iter()
            .find(|s| s["name"] == mesh_api::inject::PROXY_CONTAINER);
        let Some(proxy) = proxy else {
            c.fail(
                CAT,
                format!("{who}: no mesh-proxy container status"),
                "the pod is labelled as injected but has no sidecar; recreate it",
            );
            continue;
        };
        if proxy["ready"] != true {
            c.fail(
                CAT,
                format!("{who}: mesh-proxy is not ready"),
                &format!("kubectl -n {ns} logs {name} -c mesh-proxy"),
            );
            continue;
        }
        let image = proxy["image"].as_str().unwrap_or("");
        let tag = image.rsplit_once(':').map_or("", |(_, t)| t);
        if tag != APP_VERSION && tag.trim_start_matches('v') != APP_VERSION {
            c.warn(
                CAT,
                format!("{who}: mesh-proxy {tag} differs from meshctl {APP_VERSION}"),
                "restart the workload after an upgrade so it gets the current proxy",
            );
        }
        let ep = Endpoint::pod(cluster, ns, name, mesh_api::consts::ports::PROXY_METRICS);
        match ep.text("/metrics").await {
            Ok(m) => match mesh_api::prom::sample(&m, "mesh_proxy_svid_expiry_seconds") {
                Some(t) if t > now => c.ok(
                    CAT,
                    format!(
                        "{who}: proxy ready, certificate valid for {:.1} h",
                        (t - now) / 3600.0
                    ),
                ),
                Some(0.0) => c.warn(
                    CAT,
                    format!("{who}: proxy ready without a certificate (identity off?)"),
                    "see its log; with identity on it waits for mesh-ca",
                ),
                _ => c.fail(
                    CAT,
                    format!("{who}: its certificate expired"),
                    "check that the pod reaches mesh-ca (meshctl check)",
                ),
            },
            Err(e) => c.fail(
                CAT,
                format!("{who}: proxy metrics not readable: {e:#}"),
                "is port 15020 reachable from the API server?",
            ),
        }
    }
    Ok(())
}

/// Runs the checks of a cluster: `--pre`, or after install (and `--proxy`).
pub async fn run_cluster_checks(
    args: &CheckArgs,
    cluster: &Cluster,
) -> anyhow::Result<Vec<super::check::Check>> {
    let mut c = Checks::default();
    if args.pre {
        pre(cluster, &args.namespace, &mut c).await?;
    } else {
        installed(cluster, &args.namespace, &mut c).await?;
        if args.proxy {
            proxies(cluster, &mut c).await?;
        }
    }
    Ok(c.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_api::fake_api::FakeApi;

    use super::super::check::Status;
    use super::*;

    /// A fake API server reached over HTTP as a cluster admin (so port-forwards work), whose
    /// pods' ports answer from its raw paths.
    async fn fake_cluster() -> (Cluster, FakeApi) {
        let (_, fake) = FakeApi::start();
        let client = fake
            .http_client(mesh_api::fake_api::rbac::ADMIN)
            .await
            .expect("client");
        fake.forward_to_raw();
        (
            Cluster::new(client).with_poll(Duration::from_millis(10)),
            fake,
        )
    }

    async fn check_installed(cluster: &Cluster) -> Checks {
        let mut c = Checks::default();
        installed(cluster, "mesh-system", &mut c)
            .await
            .expect("check");
        c
    }

    fn of(c: &Checks, cat: &str, status: Status) -> Vec<String> {
        c.0.iter()
            .filter(|x| x.category == cat && x.status == status)
            .map(|x| format!("{} / {}", x.message, x.hint.clone().unwrap_or_default()))
            .collect()
    }

    #[tokio::test]
    async fn pre_reports_a_denied_permission_with_its_hint() {
        let (cluster, fake) = fake_cluster().await;
        fake.state().denied.push((
            "create".into(),
            "admissionregistration.k8s.io".into(),
            "mutatingwebhookconfigurations".into(),
        ));
        fake.insert(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop",
            "labels": {"mesh.dev/inject": "enabled", "pod-security.kubernetes.io/enforce": "restricted"}}}));
        fake.insert(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ops",
            "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}),
        );
        let mut c = Checks::default();
        pre(&cluster, "mesh-system", &mut c).await.expect("pre");
        assert_eq!(of(&c, "kubernetes", Status::Fail), Vec::<String>::new());
        let denied = of(&c, "permissions", Status::Fail);
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert!(
            denied[0].contains("you may not create mutatingwebhookconfigurations.admissionregistration.k8s.io cluster-wide")
                && denied[0].contains("kubectl auth can-i create mutatingwebhookconfigurations.admissionregistration.k8s.io"),
            "{denied:?}"
        );
        let psa = of(&c, "pod security", Status::Fail);
        assert_eq!(psa.len(), 1, "only the injected namespace: {psa:?}");
        assert!(
            psa[0].contains("namespace shop") && psa[0].contains("NET_ADMIN"),
            "{psa:?}"
        );
        // Every review asked one question about one resource.
        let reviews = fake
            .state()
            .log
            .iter()
            .filter(|l| l.path.ends_with("/selfsubjectaccessreviews"))
            .count();
        assert!(reviews >= 30, "{reviews}");
    }

    #[tokio::test]
    async fn pre_refuses_a_cluster_without_native_sidecars() {
        // In process: kube-rs's HTTP client retries 503s with backoff, for minutes.
        let (client, fake) = FakeApi::start();
        let cluster = Cluster::new(client).with_poll(Duration::from_millis(10));
        let old = json!({"major": "1", "minor": "27+", "gitVersion": "v1.27.3", "gitCommit": "0",
            "gitTreeState": "clean", "buildDate": "2023-01-01T00:00:00Z", "goVersion": "go1.20",
            "compiler": "gc", "platform": "linux/amd64"});
        fake.state().raw.insert("/version".into(), old.to_string());
        let mut c = Checks::default();
        pre(&cluster, "mesh-system", &mut c).await.expect("pre");
        let f = of(&c, "kubernetes", Status::Fail);
        assert!(
            f.len() == 1 && f[0].contains("1.27") && f[0].contains("native sidecars"),
            "{f:?}"
        );

        fake.state().fail_all = Some(503);
        let mut c = Checks::default();
        pre(&cluster, "mesh-system", &mut c).await.expect("pre");
        let f = of(&c, "kubernetes", Status::Fail);
        assert!(f.len() == 1 && f[0].contains("not reachable"), "{f:?}");
    }

    /// An installed mesh on the fake: objects, ready pods, admin endpoints, the CA root.
    async fn installed_mesh(fake: &FakeApi, cluster: &Cluster) -> String {
        let args = crate::install::InstallArgs {
            values: Vec::new(),
            namespace: "mesh-system".into(),
            skip_gateway_api_crds: false,
            dry_run: false,
            output: crate::install::Format::Yaml,
            timeout: Duration::from_secs(5),
        };
        crate::install::apply(cluster, &args, false, &mut Vec::new())
            .await
            .expect("install");
        let ca = mesh_ca::authority::Authority::generate("cluster.local", SystemTime::now())
            .expect("root");
        let root = mesh_ca::secret::certs_pem(ca.bundle());
        fake.insert(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "mesh-ca-root", "namespace": "mesh-system"}, "data": {"ca.crt": root}}));
        {
            use base64::Engine as _;
            let mut state = fake.state();
            let hooks = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector";
            let config = state.objects.get_mut(hooks).expect("webhook config");
            for h in config["webhooks"].as_array_mut().expect("webhooks") {
                h["clientConfig"]["caBundle"] =
                    json!(base64::engine::general_purpose::STANDARD.encode(&root));
            }
        }
        for (name, port) in [("mesh-controller", 15014), ("mesh-ca", 15013)] {
            fake.insert(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("{name}-0"), "namespace": "mesh-system",
                    "labels": {"app.kubernetes.io/name": name}},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
            let base = format!("/api/v1/namespaces/mesh-system/pods/{name}-0:{port}/proxy");
            fake.state()
                .raw
                .insert(format!("{base}/ready"), "ready\n".into());
        }
        let not_after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("now")
            .as_secs()
            + 365 * 86400;
        let fp = mesh_api::tls::fingerprint(&ca.bundle()[0]);
        let mut s = fake.state();
        let ctl = "/api/v1/namespaces/mesh-system/pods/mesh-controller-0:15014/proxy";
        let ca_base = "/api/v1/namespaces/mesh-system/pods/mesh-ca-0:15013/proxy";
        s.raw.insert(
            format!("{ctl}/debug/config-errors"),
            json!({"manifests": [], "references": []}).to_string(),
        );
        s.raw.insert(
            format!("{ctl}/debug/proxies"),
            json!([{"node": "shop/reviews-0", "types": {"cds": {"state": "SYNCED"}}}]).to_string(),
        );
        let ok = |reason: &str| json!({"ok": true, "reason": reason, "message": ""});
        s.raw.insert(
            format!("{ctl}/debug/gateways"),
            json!({"classes": {"mesh": 1}, "gateways": {"shop/edge": {
                "gateway": {"listeners": [{"name": "http", "attached_routes": 1,
                    "accepted": ok("Accepted"), "resolved_refs": ok("ResolvedRefs"),
                    "conflicted": {"ok": false, "reason": "NoConflicts", "message": ""}}]},
                "proxies": ["shop/edge-0"], "served": true}}})
            .to_string(),
        );
        s.raw.insert(
            format!("{ca_base}/metrics"),
            format!("mesh_ca_signing_certificate_expiry_seconds {not_after}\nmesh_ca_trust_bundle_roots 1\n"),
        );
        s.raw.insert(
            format!("{ca_base}/debug/roots"),
            json!([{"sha256": fp, "not_after": not_after, "signing": true}]).to_string(),
        );
        root
    }

    #[tokio::test]
    async fn an_installed_mesh_checks_clean_and_a_missing_ca_bundle_fails() {
        let (cluster, fake) = fake_cluster().await;
        installed_mesh(&fake, &cluster).await;
        let c = check_installed(&cluster).await;
        let fails: Vec<_> = c.0.iter().filter(|x| x.status != Status::Ok).collect();
        assert!(fails.is_empty(), "{fails:#?}");
        for want in ["crds", "control plane", "identity", "webhook"] {
            assert!(!of(&c, want, Status::Ok).is_empty(), "no {want} checks");
        }
        assert_eq!(
            of(&c, "gateways", Status::Ok),
            vec![
                "Gateway shop/edge: every listener valid, 1 route attachments, served by shop/edge-0 / "
            ]
        );
        assert!(
            of(&c, "control plane", Status::Ok)
                .iter()
                .any(|m| m.contains("proxy shop/reviews-0 is SYNCED")),
            "{:?}",
            of(&c, "control plane", Status::Ok)
        );

        {
            let mut state = fake.state();
            // No controller puts it back.
            state.ca_bundle_after = u32::MAX;
            let hooks = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector";
            let config = state.objects.get_mut(hooks).expect("webhook config");
            config["webhooks"][0]["clientConfig"]
                .as_object_mut()
                .expect("clientConfig")
                .remove("caBundle");
        }
        let c = check_installed(&cluster).await;
        let f = of(&c, "webhook", Status::Fail);
        assert!(f.len() == 1 && f[0].contains("has no caBundle"), "{f:?}");
    }

    /// A route applied with `retry` to a cluster with the standard channel lost it: check says
    /// which field of which object, from kubectl's last-applied annotation.
    #[tokio::test]
    async fn a_field_the_api_server_dropped_from_an_applied_route_is_named() {
        let (cluster, fake) = fake_cluster().await;
        installed_mesh(&fake, &cluster).await;
        let applied = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                     "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}],
                                "retry": {"attempts": 2}}]}});
        let mut stored = applied.clone();
        stored["metadata"]["annotations"] = json!({
            "kubectl.kubernetes.io/last-applied-configuration": applied.to_string()});
        if let Some(rule) = stored["spec"]["rules"][0].as_object_mut() {
            rule.remove("retry");
        }
        fake.insert(stored);
        let c = check_installed(&cluster).await;
        let w = of(&c, "config", Status::Warn);
        assert!(
            w.len() == 1
                && w[0].starts_with("HTTPRoute shop/reviews: spec.rules[0].retry was applied"),
            "{w:?}"
        );
    }

    #[tokio::test]
    async fn proxy_status_and_config_reach_the_cluster_through_the_api_server() {
        use super::super::status::{
            Output, ProxyConfigArgs, Section, cluster_controller, proxy_config_in_cluster,
            proxy_status_at,
        };
        let (cluster, fake) = fake_cluster().await;
        let e = cluster_controller(&cluster, "mesh-system")
            .await
            .expect_err("nothing installed");
        assert!(
            e.to_string()
                .contains("no ready mesh-controller pod in namespace mesh-system"),
            "{e}"
        );
        installed_mesh(&fake, &cluster).await;
        let ctl = cluster_controller(&cluster, "mesh-system")
            .await
            .expect("controller");
        assert_eq!(
            ctl.to_string(),
            "pod mesh-system/mesh-controller-0:15014 (port-forward)"
        );
        let mut out = Vec::new();
        proxy_status_at(&ctl, Output::Json, &mut out)
            .await
            .expect("status");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v[0]["node"], "shop/reviews-0");
        // A pod that cannot be forwarded to: the error names it and the port.
        let args = ProxyConfigArgs {
            proxy: "shop/reviews-0".into(),
            section: Section::Clusters,
            controller: None,
            output: Output::Table,
        };
        let e = proxy_config_in_cluster(&cluster, &args, "default", &mut Vec::new())
            .await
            .expect_err("nothing answers on the pod's port");
        let e = format!("{e:#}");
        assert!(
            e.contains("pod shop/reviews-0") && e.contains("port 15000"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn nothing_installed_is_one_clear_failure() {
        let (cluster, _fake) = fake_cluster().await;
        let c = check_installed(&cluster).await;
        let f = of(&c, "control plane", Status::Fail);
        assert!(f.len() == 1 && f[0].contains("not installed"), "{f:?}");
    }

    #[tokio::test]
    async fn proxy_checks_each_injected_pod() {
        let (cluster, fake) = fake_cluster().await;
        let pod = |name: &str, ready: bool, tag: &str| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "labels": {"mesh.dev/proxy": "true"}},
                "status": {"initContainerStatuses": [{"name": "mesh-proxy", "ready": ready,
                    "image": format!("ghcr.io/mesh-dev/mesh-proxy:{tag}")}]}})
        };
        fake.insert(pod("reviews-0", true, APP_VERSION));
        fake.insert(pod("reviews-1", false, APP_VERSION));
        fake.insert(pod("ratings-0", true, "0.0.9"));
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("now")
            .as_secs()
            + 7200;
        for name in ["reviews-0", "ratings-0"] {
            fake.state().raw.insert(
                format!("/api/v1/namespaces/shop/pods/{name}:15020/proxy/metrics"),
                format!("mesh_proxy_svid_expiry_seconds {soon}\n"),
            );
        }
        let mut c = Checks::default();
        proxies(&cluster, &mut c).await.expect("check");
        let ok = of(&c, "proxies", Status::Ok);
        assert!(
            ok.iter()
                .any(|m| m.contains("shop/reviews-0: proxy ready, certificate valid for 2.0 h")),
            "{ok:?}"
        );
        let f = of(&c, "proxies", Status::Fail);
        assert!(
            f.len() == 1 && f[0].contains("shop/reviews-1: mesh-proxy is not ready"),
            "{f:?}"
        );
        let w = of(&c, "proxies", Status::Warn);
        assert!(
            w.len() == 1 && w[0].contains("shop/ratings-0: mesh-proxy 0.0.9 differs"),
            "{w:?}"
        );
    }
}
