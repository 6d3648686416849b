//! The Helm chart and `meshctl install --dry-run` yield the same objects, with default values
//! and with a values file; the chart lints; every object (and an injected workload) validates
//! against the Kubernetes schemas of each version the chart claims.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mesh_e2e::{peer, workspace_root};
use meshctl::install::{Format, InstallArgs, manifests::key};
use serde_json::Value;

/// Kubernetes versions validated: the chart's `kubeVersion` floor (native sidecars on by
/// default) up to the newest schemas kubernetes-validate has.
const KUBERNETES_VERSIONS: [&str; 9] = [
    "1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0",
];

fn chart() -> PathBuf {
    workspace_root().join("deploy/charts/mesh")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docs(yaml: &str) -> BTreeMap<String, Value> {
    use serde::Deserialize;
    let mut out = BTreeMap::new();
    for d in serde_norway::Deserializer::from_str(yaml) {
        let v = Value::deserialize(d).expect("a YAML document");
        if v.is_null() {
            continue;
        }
        assert!(
            out.insert(key(&v), v.clone()).is_none(),
            "{} twice",
            key(&v)
        );
    }
    out
}

fn meshctl_objects(values: Option<&Path>) -> String {
    let args = InstallArgs {
        values: values.map(Path::to_path_buf).into_iter().collect(),
        namespace: "mesh-system".into(),
        skip_gateway_api_crds: false,
        dry_run: true,
        output: Format::Yaml,
        timeout: std::time::Duration::from_secs(1),
    };
    let mut out = Vec::new();
    meshctl::install::dry_run(&args, &mut out).expect("meshctl install --dry-run");
    String::from_utf8(out).expect("utf-8")
}

fn helm_objects(helm: &Path, values: Option<&Path>) -> String {
    let mut cmd = Command::new(helm);
    cmd.args(["template", "mesh"]).arg(chart()).args([
        "--namespace",
        "mesh-system",
        "--include-crds",
    ]);
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    run(&mut cmd)
}

fn assert_same(meshctl: &str, helm: &str) {
    let (a, b) = (docs(meshctl), docs(helm));
    let only = |x: &BTreeMap<String, Value>, y: &BTreeMap<String, Value>| {
        x.keys()
            .filter(|k| !y.contains_key(*k))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        only(&a, &b).is_empty() && only(&b, &a).is_empty(),
        "only from meshctl: {:?}; only from helm: {:?}",
        only(&a, &b),
        only(&b, &a)
    );
    for (k, v) in &a {
        assert!(
            *v == b[k],
            "{k} differs.\nmeshctl:\n{}\nhelm:\n{}",
            serde_json::to_string_pretty(v).unwrap_or_default(),
            serde_json::to_string_pretty(&b[k]).unwrap_or_default()
        );
    }
    assert!(a.len() >= 20, "{} objects", a.len());
}

#[test]
fn helm_template_equals_meshctl_install_dry_run() {
    let Some(helm) = peer("MESH_HELM", "helm") else {
        return;
    };
    assert_same(&meshctl_objects(None), &helm_objects(&helm, None));

    // Every value the templates read, changed.
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join("values.yaml");
    std::fs::write(
        &values,
        "image: {registry: registry.example/mesh, tag: v9, pullPolicy: Always}
trustDomain: prod.example
mtlsMode: STRICT
controller: {replicas: 3, logLevel: debug, resources: {requests: {cpu: 1}}}
ca: {certLifetime: 12h, logLevel: warn, resources: {limits: {memory: 1Gi}}}
proxy: {logLevel: trace, prometheusAnnotations: false, resources: {requests: {cpu: 5m}}}
webhook: {failurePolicy: Ignore}
networkPolicy: {enabled: true, monitoringNamespace: prometheus}
",
    )
    .expect("write values");
    let mut values_text = std::fs::read_to_string(&values).expect("values");
    values_text.push_str(MONITORING_VALUES);
    std::fs::write(&values, values_text).expect("write values");
    let ours = meshctl_objects(Some(&values));
    assert!(
        ours.contains("registry.example/mesh/mesh-proxy:v9")
            && ours.contains("registry.example/mesh/mesh-proxy-init:v9")
            && ours.contains("--inject-prometheus-annotations=false")
            && ours.contains("kind: NetworkPolicy")
            && ours.contains("kubernetes.io/metadata.name: prometheus")
            && ours.contains("kind: ServiceMonitor")
            && ours.contains("kind: PodMonitor"),
        "{ours}"
    );
    assert_same(&ours, &helm_objects(&helm, Some(&values)));
}

/// Every monitoring object on, with labels a Prometheus' selectors and Grafana's sidecar use.
const MONITORING_VALUES: &str = "monitoring:
  serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}
  podMonitor: {enabled: true, interval: 1m30s, labels: {release: prometheus}}
  dashboards: {enabled: true, labels: {grafana_dashboard: \"1\", team: mesh}}
";

/// The ServiceMonitor and PodMonitor the chart renders read, against the Prometheus Operator's
/// CRDs (v0.93.0, in `e2e/testdata/prometheus-operator`), as an API server with those CRDs
/// would: no field pruned, no error. They find what the mesh serves: the Services' and the
/// injected proxy's metrics ports by name. The dashboards' ConfigMaps carry the chart's files.
#[test]
fn monitoring_objects_validate_against_the_prometheus_operator_crds() {
    use mesh_api::k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let Some(helm) = peer("MESH_HELM", "helm") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, MONITORING_VALUES).expect("write values");
    let objects = docs(&helm_objects(&helm, Some(&values)));
    let crds: Vec<CustomResourceDefinition> = ["servicemonitors", "podmonitors"]
        .iter()
        .map(|k| {
            let path = workspace_root().join(format!(
                "e2e/testdata/prometheus-operator/monitoring.coreos.com_{k}.yaml"
            ));
            let text = std::fs::read_to_string(&path).expect("CRD");
            serde_norway::from_str(&text).expect("a CRD")
        })
        .collect();
    let mut seen = Vec::new();
    for (key, obj) in &objects {
        let kind = obj["kind"].as_str().unwrap_or_default();
        if !["ServiceMonitor", "PodMonitor", "ConfigMap"].contains(&kind) {
            continue;
        }
        let mut admitted = obj.clone();
        let report = mesh_api::schema::admit_in(&mut admitted, &crds)
            .unwrap_or_else(|| panic!("{key}: a kind no schema knows"));
        assert!(
            report.errors.is_empty() && report.pruned.is_empty(),
            "{key}: {report:?}"
        );
        assert_eq!(&admitted, obj, "{key}: changed on admission (defaults)");
        assert_eq!(obj["metadata"]["namespace"], "mesh-system", "{key}");
        seen.push(key.clone());
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    let find = |kind: &str| {
        objects
            .values()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let sm = find("ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-admin");
    // The Services it selects have that port.
    for service in ["mesh-ca", "mesh-controller"] {
        let svc = objects
            .values()
            .find(|o| o["kind"] == "Service" && o["metadata"]["name"] == service)
            .unwrap_or_else(|| panic!("no Service {service}"));
        let selected = sm["spec"]["selector"]["matchExpressions"][0]["values"]
            .as_array()
            .is_some_and(|v| v.iter().any(|n| n == service));
        let admin = svc["spec"]["ports"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == "http-admin"));
        assert!(selected && admin, "Service {service}: {svc}");
    }
    let pm = find("PodMonitor");
    assert_eq!(pm["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"][mesh_api::consts::labels::PROXY],
        "true"
    );
    assert_eq!(
        pm["spec"]["podMetricsEndpoints"][0]["port"],
        mesh_api::inject::METRICS_PORT_NAME
    );
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["interval"], "1m30s");
    for (name, text) in meshctl::install::manifests::DASHBOARDS {
        let cm = objects
            .values()
            .find(|o| {
                o["kind"] == "ConfigMap" && o["metadata"]["name"] == format!("{name}-dashboard")
            })
            .unwrap_or_else(|| panic!("no ConfigMap for {name}"));
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(cm["data"][format!("{name}.json")], text, "{name}");
        let board: Value = serde_json::from_str(text).expect("a dashboard's JSON");
        assert_eq!(board["uid"], name);
    }
}

#[test]
fn helm_lints_the_chart_and_its_schema_refuses_bad_values() {
    let Some(helm) = peer("MESH_HELM", "helm") else {
        return;
    };
    run(Command::new(&helm)
        .args(["lint", "--strict", "--namespace", "mesh-system"])
        .arg(chart()));
    // Another release namespace is refused with the reason.
    let out = Command::new(&helm)
        .args(["template", "mesh"])
        .arg(chart())
        .args(["--namespace", "mesh"])
        .output()
        .expect("helm template");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("proxies expect"),
        "{err}"
    );
    let out = Command::new(&helm)
        .args(["template", "mesh"])
        .arg(chart())
        .args(["--namespace", "mesh-system", "--set", "mtlsMode=MAYBE"])
        .output()
        .expect("helm template");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("mtlsMode"), "{err}");
}

#[test]
fn manifests_validate_against_each_kubernetes_version_the_chart_claims() {
    let Some(validate) = peer("MESH_KUBERNETES_VALIDATE", "kubernetes-validate") else {
        return;
    };
    let chart_yaml = std::fs::read_to_string(chart().join("Chart.yaml")).expect("Chart.yaml");
    assert!(
        chart_yaml.contains("kubeVersion: \">=1.29.0-0\""),
        "{chart_yaml}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let install = dir.path().join("install.yaml");
    std::fs::write(&install, meshctl_objects(None)).expect("write");
    // An injected Deployment: the native sidecar and the init container as a cluster sees them.
    let app = dir.path().join("app.yaml");
    std::fs::write(
        &app,
        "apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  template:
    metadata: {labels: {app: reviews}}
    spec:
      serviceAccountName: reviews
      containers: [{name: app, image: reviews:v1, ports: [{containerPort: 8080}]}]
",
    )
    .expect("write");
    let injected = dir.path().join("injected.yaml");
    let mut out = Vec::new();
    let mut errs = Vec::new();
    meshctl::cmd::inject::run(
        &meshctl::cmd::inject::InjectArgs::for_file(&app),
        &mut out,
        &mut errs,
    )
    .expect("meshctl inject");
    assert!(String::from_utf8_lossy(&out).contains("restartPolicy: Always"));
    std::fs::write(&injected, out).expect("write");
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new(&validate)
            .args(["--strict", "--quiet", "-k", version])
            .arg(&install)
            .arg(&injected));
        assert!(
            !out.contains("ERROR") && !out.contains("WARN"),
            "{version}: {out}"
        );
    }
}

/// Each Dockerfile builds, with `-p` alone and the `dist` profile, a binary its crate has, and
/// its image runs that binary as the user the manifests expect; `scripts/build-images` builds
/// every one of them (no Docker engine here: the builds themselves run in the kind suite, and
/// CI checks each crate alone with `cargo check -p`).
#[test]
fn dockerfiles_build_their_crates_binaries_alone_as_the_expected_users() {
    let root = workspace_root();
    // Image name -> (crate, binary, the image's last USER; None: root).
    let expected: BTreeMap<&str, (&str, &str, Option<&str>)> = BTreeMap::from([
        (
            "mesh-proxy",
            ("mesh-proxy", "mesh-proxy", Some("1337:1337")),
        ),
        // The init container runs as root with NET_ADMIN for iptables, and only it.
        ("mesh-proxy-init", ("mesh-proxy", "mesh-proxy", None)),
        (
            "mesh-controller",
            ("mesh-controller", "mesh-controller", Some("65532:65532")),
        ),
        ("mesh-ca", ("mesh-ca", "mesh-ca", Some("65532:65532"))),
        ("meshctl", ("meshctl", "meshctl", Some("65532:65532"))),
        (
            "mesh-e2e",
            ("mesh-e2e", "mesh-e2e-load", Some("65532:65532")),
        ),
    ]);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root.join("deploy/docker")).expect("deploy/docker") {
        let path = entry.expect("an entry").path();
        let Some(image) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".Dockerfile"))
        else {
            continue;
        };
        let &(krate, bin, user) = expected
            .get(image)
            .unwrap_or_else(|| panic!("{}: an image this test does not know", path.display()));
        found.push(image.to_owned());
        let text = std::fs::read_to_string(&path).expect("Dockerfile");
        for want in [
            format!("cargo build --profile dist --locked -p {krate} --bin {bin}"),
            format!("cp target/dist/{bin} /{bin}"),
            format!("COPY --from=build /{bin} /usr/local/bin/{bin}"),
            format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]"),
        ] {
            assert!(text.contains(&want), "{}: no {want:?}", path.display());
        }
        assert!(
            binaries(krate).contains(&bin.to_owned()),
            "{}: crate {krate} has no binary {bin}",
            path.display()
        );
        // The last USER is the image's.
        let last_user = text
            .lines()
            .filter_map(|l| l.strip_prefix("USER "))
            .next_back()
            .map(str::trim);
        assert_eq!(last_user, user, "{}", path.display());
    }
    found.sort();
    assert_eq!(found, expected.keys().copied().collect::<Vec<_>>());
    // The sidecar's image, which every node pulls, has no package manager or iptables.
    let proxy = std::fs::read_to_string(root.join("deploy/docker/mesh-proxy.Dockerfile"))
        .expect("Dockerfile");
    assert!(!proxy.contains("apt-get") && proxy.contains("FROM gcr.io/distroless/"));
    let script = std::fs::read_to_string(root.join("scripts/build-images")).expect("script");
    let built = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("for name in "))
        .and_then(|l| l.strip_suffix("; do"))
        .expect("build-images' loop");
    let mut built: Vec<&str> = built.split_whitespace().collect();
    built.sort_unstable();
    assert_eq!(built, found, "scripts/build-images");
    // The toolchain the images build with is the repository's.
    let toolchain = std::fs::read_to_string(root.join("rust-toolchain.toml")).expect("toolchain");
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .expect("channel")
        .trim_matches('"')
        .rsplit_once('.')
        .map(|(minor, _)| minor.to_owned())
        .expect("a version");
    for image in &found {
        let text = std::fs::read_to_string(root.join(format!("deploy/docker/{image}.Dockerfile")))
            .expect("Dockerfile");
        assert!(
            text.contains(&format!("FROM rust:{channel}-bookworm")),
            "{image}"
        );
    }
    // The manifests run the proxy as the UID its image declares.
    assert_eq!(mesh_api::inject::PROXY_UID, 1337);
}

/// The binary targets of a workspace crate, as cargo sees them.
fn binaries(krate: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(Command::new(cargo).current_dir(workspace_root()).args([
        "metadata",
        "--no-deps",
        "--offline",
        "--format-version",
        "1",
    ]));
    let meta: Value = serde_json::from_str(&out).expect("cargo metadata's JSON");
    let package = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == krate)
        .unwrap_or_else(|| panic!("no crate {krate} in the workspace"));
    package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}
