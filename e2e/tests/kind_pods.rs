//! The scenarios of `tests/kubelet.rs` on a real cluster: probes under STRICT, the app held
//! until its proxy is ready, a rolling restart under load, and a StatefulSet behind a headless
//! Service. Ignored here (no Docker can run a cluster); `e2e/kind/scenarios` runs them with
//! `--ignored` and sets `MESH_E2E_KIND_IMAGES`, without which they fail.
//!
//! Apps run `meshctl demo-service` (a distroless image); what needs a shell (touching a file,
//! a `curl` at start) runs in `curlimages/curl`, which the kind suite already pulls.

use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_e2e::cluster::{Cluster, Workload};
use mesh_e2e::kind::{KindCluster, apply_yaml, kubectl};
use serde_json::Value;

const NS: &str = "pods";
const CURL_IMAGE: &str = "curlimages/curl:8.11.1";

fn kind() -> anyhow::Result<KindCluster> {
    KindCluster::from_env().ok_or_else(|| {
        anyhow::anyhow!(
            "MESH_E2E_KIND_IMAGES and MESH_E2E_MESHCTL are not set: run e2e/kind/scenarios"
        )
    })
}

/// Namespace [`NS`] with injection on and mTLS `mode`.
fn namespace(c: &mut KindCluster, mode: &str) -> anyhow::Result<()> {
    c.label_namespace(NS, &[("mesh.dev/mtls-mode", mode)])
}

fn pod_json(name: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&kubectl(&[
        "-n", NS, "get", "pod", name, "-o", "json",
    ])?)?)
}

/// The name of the one pod labelled `app=<app>`.
fn pod_of(app: &str) -> anyhow::Result<String> {
    Ok(kubectl(&[
        "-n",
        NS,
        "get",
        "pod",
        "-l",
        &format!("app={app}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?
    .trim()
    .to_owned())
}

fn wait(args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["-n", NS, "wait"];
    all.extend_from_slice(args);
    all.push("--timeout=120s");
    kubectl(&all).map(|_| ())
}

/// Service `web` (9080 to 8080) and a Deployment of `replicas` demo apps behind it, with a
/// readiness probe on `/healthz` (503 while `/flags/unhealthy` exists) and a liveness probe on
/// `/`; a `flags` container (curl's image) can touch that file. `strategy`, `preStop`: as
/// the rolling-restart scenario sets them.
fn web(c: &KindCluster, replicas: u32, pre_stop: bool) -> anyhow::Result<()> {
    let lifecycle = if pre_stop {
        "\n          lifecycle: {preStop: {sleep: {seconds: 2}}}"
    } else {
        ""
    };
    apply_yaml(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec: {{selector: {{app: web}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: web, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {NS}}}
spec:
  replicas: {replicas}
  strategy: {{type: RollingUpdate, rollingUpdate: {{maxSurge: 1, maxUnavailable: 0}}}}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      serviceAccountName: web
      terminationGracePeriodSeconds: 5
      volumes: [{{name: flags, emptyDir: {{}}}}]
      containers:
        - name: app
          image: {image}
          imagePullPolicy: Never
          args: [demo-service, --name, web, --listen, '0.0.0.0:8080', --unhealthy-while, /flags/unhealthy]
          ports: [{{name: http, containerPort: 8080}}]
          volumeMounts: [{{name: flags, mountPath: /flags}}]
          readinessProbe: {{httpGet: {{path: /healthz, port: http}}, periodSeconds: 1, failureThreshold: 1}}
          livenessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1, failureThreshold: 3}}{lifecycle}
        - name: flags
          image: {CURL_IMAGE}
          command: [sleep, infinity]
          volumeMounts: [{{name: flags, mountPath: /flags}}]
",
        image = c.meshctl_image
    ))?;
    kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=180s",
    ])
    .map(|_| ())
}

/// Waits until Service `svc`'s EndpointSlice endpoints have the `ready` conditions `want` (the
/// EndpointSlice controller writes them a moment after the pod changes).
async fn wait_endpoints_ready(svc: &str, want: &[bool]) -> anyhow::Result<()> {
    let want: Vec<Value> = want.iter().map(|b| Value::Bool(*b)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let have = endpoints_ready(svc)?;
        if have == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{svc}'s endpoints are ready {have:?} after 30 s, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `ready` conditions of Service `svc`'s EndpointSlice endpoints.
fn endpoints_ready(svc: &str) -> anyhow::Result<Vec<Value>> {
    let slices: Value = serde_json::from_str(&kubectl(&[
        "-n",
        NS,
        "get",
        "endpointslices",
        "-l",
        &format!("kubernetes.io/service-name={svc}"),
        "-o",
        "json",
    ])?)?;
    Ok(slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["endpoints"].as_array())
        .flatten()
        .map(|e| e["conditions"]["ready"].clone())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kind cluster: e2e/kind/scenarios runs it with --ignored"]
async fn kind_probes_under_strict() -> anyhow::Result<()> {
    let mut c = kind()?;
    namespace(&mut c, "STRICT")?;
    web(&c, 1, false)?;
    let pod = pod_of("web")?;
    let spec = pod_json(&pod)?;
    let app = spec["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "app"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        app["readinessProbe"]["httpGet"]["path"], "/app-health/app/readyz",
        "{app}"
    );
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 15020, "{app}");
    wait_endpoints_ready("web", &[true]).await?;
    // Plaintext from a pod outside the mesh: refused at the app's port (curl's status 000:
    // no answer), answered at the proxy's health port.
    let ip = spec["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let outsider = |url: &str| -> anyhow::Result<String> {
        let script =
            format!("echo status=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 3 {url})");
        let out = kubectl(&[
            "-n",
            NS,
            "run",
            "outsider",
            "--rm",
            "-i",
            "--restart=Never",
            "--labels=mesh.dev/inject=disabled",
            &format!("--image={CURL_IMAGE}"),
            "--command",
            "--",
            "sh",
            "-c",
            &script,
        ])?;
        out.lines()
            .find_map(|l| l.strip_prefix("status="))
            .map(str::to_owned)
            .with_context(|| format!("no status from the outsider pod: {out}"))
    };
    assert_eq!(
        outsider(&format!("http://{ip}:8080/"))?,
        "000",
        "STRICT let plaintext through"
    );
    assert_eq!(
        outsider(&format!("http://{ip}:15020/app-health/app/readyz"))?,
        "200"
    );
    // The app fails its health path: unready, out of its Service's endpoints.
    kubectl(&[
        "-n",
        NS,
        "exec",
        &pod,
        "-c",
        "flags",
        "--",
        "touch",
        "/flags/unhealthy",
    ])?;
    let failed = Instant::now();
    wait(&["--for=condition=Ready=false", &format!("pod/{pod}")])?;
    let unready_after = failed.elapsed();
    wait_endpoints_ready("web", &[false]).await?;
    kubectl(&[
        "-n",
        NS,
        "exec",
        &pod,
        "-c",
        "flags",
        "--",
        "rm",
        "/flags/unhealthy",
    ])?;
    wait(&["--for=condition=Ready", &format!("pod/{pod}")])?;
    mesh_e2e::figure(&format!(
        "kind: probes under STRICT: Ready through the rewritten probes, unready {:.1} s after the health path failed, plaintext to the app port refused",
        unready_after.as_secs_f64()
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kind cluster: e2e/kind/scenarios runs it with --ignored"]
async fn kind_an_app_calling_out_at_start_succeeds_on_its_first_try() -> anyhow::Result<()> {
    let mut c = kind()?;
    namespace(&mut c, "PERMISSIVE")?;
    web(&c, 1, false)?;
    let mut ok = 0;
    for i in 0..20 {
        let name = format!("caller-{i}");
        apply_yaml(&format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: caller}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {CURL_IMAGE}
      command: [sh, -c, 'if curl -sf --max-time 5 http://web.{NS}.svc.cluster.local:9080/ >/dev/null; then echo first-try-ok; else echo first-try-failed; fi; sleep 3600']
"
        ))?;
        wait(&["--for=condition=Ready", &format!("pod/{name}")])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = loop {
            let log = kubectl(&["-n", NS, "logs", &name, "-c", "app"])?;
            if log.contains("first-try") || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ok += u32::from(log.contains("first-try-ok"));
        kubectl(&["-n", NS, "delete", "pod", &name, "--wait=false"])?;
    }
    mesh_e2e::figure(&format!(
        "kind: an app calling out at start: {ok} of 20 first tries answered"
    ));
    assert_eq!(ok, 20);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kind cluster: e2e/kind/scenarios runs it with --ignored"]
async fn kind_a_rolling_restart_under_load_fails_nothing() -> anyhow::Result<()> {
    let mut c = kind()?;
    namespace(&mut c, "PERMISSIVE")?;
    web(&c, 3, true)?;
    let client = c.deploy(&Workload::idle(NS, "client", true)).await?;
    c.wait_synced().await?;
    let load = c.start_load(
        NS,
        &client[0],
        &[
            "--url",
            &format!("http://web.{NS}.svc.cluster.local:9080/"),
            "--rate",
            "200",
            "--duration",
            "40s",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    kubectl(&["-n", NS, "rollout", "restart", "deployment/web"])?;
    kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=35s",
    ])?;
    let took = started.elapsed();
    let r = load.finish().await?;
    mesh_e2e::figure(&format!(
        "kind: rolling restart of 3 replicas (maxSurge 1, maxUnavailable 0, grace 5 s, preStop sleep 2 s) in {:.1} s under 200 rps: {} requests, {} failed ({})",
        took.as_secs_f64(),
        r["sent"],
        r["failed"],
        r["errors"]
    ));
    assert_eq!(r["failed"], 0, "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a kind cluster: e2e/kind/scenarios runs it with --ignored"]
async fn kind_a_statefulset_behind_a_headless_service_is_reached_pod_by_pod() -> anyhow::Result<()>
{
    let mut c = kind()?;
    namespace(&mut c, "STRICT")?;
    apply_yaml(&format!(
        "apiVersion: v1
kind: Service
metadata: {{name: db, namespace: {NS}}}
spec: {{clusterIP: None, selector: {{app: db}}, ports: [{{name: http, port: 8080, targetPort: 8080}}]}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: db, namespace: {NS}}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {NS}}}
spec:
  serviceName: db
  replicas: 3
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:
      serviceAccountName: db
      containers:
        - name: app
          image: {image}
          imagePullPolicy: Never
          env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
          args: [demo-service, --name, $(POD_NAME), --listen, '0.0.0.0:8080']
          readinessProbe: {{httpGet: {{path: /healthz, port: 8080}}, periodSeconds: 1}}
",
        image = c.meshctl_image
    ))?;
    kubectl(&[
        "-n",
        NS,
        "rollout",
        "status",
        "statefulset/db",
        "--timeout=180s",
    ])?;
    let client = c.deploy(&Workload::idle(NS, "client", true)).await?;
    c.wait_synced().await?;
    let server_id = format!("spiffe://cluster.local/ns/{NS}/sa/db");
    for pod in ["db-0", "db-1", "db-2"] {
        let url = format!("http://{pod}.db.{NS}.svc.cluster.local:8080/");
        let r = c.twenty_requests(NS, &client[0], &url).await?;
        assert_eq!(r["by_body"][format!("{pod} v1")], 20, "{url}: {r}");
        let backend = format!("outbound|8080|{pod}|db.{NS}.svc.cluster.local");
        let ids: Vec<String> =
            mesh_e2e::cluster::sent_through(&c.proxy_metrics(NS, &client[0])?, &backend)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
        assert!(
            !ids.is_empty() && ids.iter().all(|id| *id == server_id),
            "{backend}: {ids:?}"
        );
    }
    mesh_e2e::figure(&format!(
        "kind: StatefulSet of 3 behind a headless Service under STRICT: db-0, db-1, db-2 answered 20 of 20 by name, each with {server_id} proved"
    ));
    Ok(())
}
