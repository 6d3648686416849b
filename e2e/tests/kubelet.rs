//! Pods as the kubelet runs them, on the network-namespace cluster: specs go through the
//! injector, and the cluster's kubelet runs them (containers in order, native sidecars, probes
//! from the node on their schedule, graceful deletion, EndpointSlice conditions). Root only.

use std::time::{Duration, Instant};

use mesh_e2e::cluster::{Cluster, ServiceDef};
use mesh_e2e::netns::{self, MESHCTL_IMAGE, NetnsCluster};
use serde_json::{Value, json};

const NS: &str = "shop";

/// A namespace whose pods get the proxy, under `mtls` mode.
async fn cluster(mtls: &str) -> anyhow::Result<NetnsCluster> {
    let mut c = NetnsCluster::start().await?;
    c.label_namespace(
        NS,
        &[("mesh.dev/inject", "enabled"), ("mesh.dev/mtls-mode", mtls)],
    )?;
    Ok(c)
}

/// Service `name` (port 9080 to the pods' 8080) selecting `app: name`.
fn service(c: &mut NetnsCluster, name: &str) -> anyhow::Result<String> {
    c.service(ServiceDef {
        namespace: NS.into(),
        name: name.into(),
        selector: [("app".to_owned(), name.to_owned())].into(),
        port: 9080,
        target_port: 8080,
    })
}

/// A Pod running `meshctl demo-service` as `app`, with a readiness probe on `/healthz` (which
/// fails while `unhealthy` exists) and a liveness probe on `/`, both every second.
fn web_pod(name: &str, app: &str, unhealthy: &std::path::Path) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
    "spec": {
        "serviceAccountName": app,
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": "app", "image": MESHCTL_IMAGE,
            "args": ["demo-service", "--name", app, "--listen", "0.0.0.0:8080",
                "--unhealthy-while", unhealthy.display().to_string()],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 1, "failureThreshold": 1},
            "livenessProbe": {"httpGet": {"path": "/", "port": 8080},
                "periodSeconds": 1, "failureThreshold": 3},
        }]}})
}

/// Under STRICT, the kubelet's plaintext probes reach the app through the proxy's health port;
/// a failing health path makes the pod unready and takes its endpoint out of service; the app's
/// own port still refuses plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_strict_a_probed_pod_is_ready_through_its_rewritten_probes() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = cluster("STRICT").await?;
    let vip = service(&mut c, "web")?;
    let unhealthy = c.dir.path().join("web-0.unhealthy");
    let start = Instant::now();
    c.run_pod(web_pod("web-0", "web", &unhealthy))?;
    c.wait_pod(NS, "web-0", "Ready", Duration::from_secs(60), |s| s.ready)
        .await?;
    let ready_after = start.elapsed();
    // What the kubelet ran: the injector's rewrite.
    let stored = c
        .api
        .state()
        .objects
        .get(&format!("/api/v1/namespaces/{NS}/pods/web-0"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        stored.pointer("/spec/containers/0/readinessProbe/httpGet"),
        Some(&json!({"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"})),
        "{stored}"
    );
    let endpoint = |c: &NetnsCluster| c.slice_endpoints(NS, "web").first().cloned();
    assert_eq!(
        endpoint(&c).map(|e| e["conditions"]["ready"].clone()),
        Some(json!(true))
    );
    let ip = c.kubelet_pod(NS, "web-0")?.ip;
    let plaintext = c.curl_status(None, &format!("http://{ip}:8080/"));
    let probe_path = c.curl_status(None, &format!("http://{ip}:15020/app-health/app/readyz"));
    assert_eq!(
        plaintext, 0,
        "STRICT let plaintext through to the app's port"
    );
    assert_eq!(probe_path, 200);
    // The injector gave the proxy its container's memory limit through the downward API (the
    // chart's 256Mi): it reads its resident memory, which it does only with a limit.
    let metrics = c.exec_in_node(&[
        "curl",
        "-s",
        "--max-time",
        "3",
        &format!("http://{ip}:15020/metrics"),
    ])?;
    let resident =
        mesh_api::prom::sample(&metrics, "mesh_proxy_resident_memory_bytes").unwrap_or(0.0);
    assert!(
        resident > 0.0,
        "no memory limit reached the proxy:\n{metrics}"
    );
    let client = c
        .deploy(&mesh_e2e::cluster::Workload::idle(NS, "client", true))
        .await?;
    c.wait_synced().await?;
    let through_mesh = |c: &NetnsCluster| {
        c.start_load(
            NS,
            &client[0],
            &[
                "--url",
                &format!("http://{vip}:9080/"),
                "--requests",
                "5",
                "--rate",
                "50",
            ],
        )
    };
    let report = through_mesh(&c)?.finish().await?;
    assert_eq!(report["ok"], 5, "{report}");

    // The app fails its health path: unready, out of service.
    std::fs::write(&unhealthy, "")?;
    let failed_at = Instant::now();
    let status = c
        .wait_pod(NS, "web-0", "unready", Duration::from_secs(20), |s| {
            !s.ready
        })
        .await?;
    let unready_after = failed_at.elapsed();
    assert_eq!(
        endpoint(&c).map(|e| e["conditions"]["ready"].clone()),
        Some(json!(false))
    );
    assert!(
        status
            .last_failure
            .get("app/readinessProbe")
            .is_some_and(|w| w.contains("503")),
        "{status:?}"
    );
    // Liveness is on `/`, still answering: no restart.
    assert_eq!(status.restarts.get("app"), Some(&0), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let unserved = loop {
        let r = through_mesh(&c)?.finish().await?;
        if r["ok"] == 0 {
            break r;
        }
        anyhow::ensure!(Instant::now() < deadline, "still served while unready: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    std::fs::remove_file(&unhealthy)?;
    c.wait_pod(NS, "web-0", "Ready again", Duration::from_secs(20), |s| {
        s.ready
    })
    .await?;
    mesh_e2e::figure(&format!(
        "probes under STRICT: Ready through the rewritten probes {:.1} s after creation; unready {:.1} s after the health path failed (then {} of 5 requests answered); plaintext to the app port refused",
        ready_after.as_secs_f64(),
        unready_after.as_secs_f64(),
        unserved["ok"]
    ));
    Ok(())
}

/// A pod whose app's first act is a request to `web`: `exec curl` once, then sleep.
fn caller_pod(name: &str, url: &str, hold: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": NS, "labels": {"app": "caller"},
        "annotations": {"mesh.dev/hold-app-until-proxy-ready": hold.to_string()}},
    "spec": {
        "serviceAccountName": "caller",
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "app", "image": "none",
            "command": ["sh", "-c", format!(
                "curl -s -o /dev/null -w 'first request: %{{http_code}}\\n' --max-time 5 {url}; exec sleep 3600")],
        }]}})
}

/// `n` caller pods started one after the other (each deleted once it made its request): the
/// status of each one's first request.
async fn starts(
    c: &mut NetnsCluster,
    url: &str,
    hold: bool,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut codes = Vec::new();
    for i in 0..n {
        let name = format!("caller-{}-{i}", if hold { "held" } else { "free" });
        c.run_pod(caller_pod(&name, url, hold))?;
        let log = mesh_e2e::kubelet::log_of(c.dir.path(), NS, &name, "app");
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(code) = text.lines().find_map(|l| l.strip_prefix("first request: ")) {
                break code.trim().to_owned();
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} made no request in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        codes.push(code);
        c.delete_kubelet_pod(NS, &name)?;
        c.wait_gone(NS, &name).await?;
    }
    Ok(codes)
}

/// The app starts only once its proxy is ready: a request at start succeeds on its first try,
/// 20 pod starts out of 20. (Without the hold, the same app's first request is reported.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_calling_out_at_start_succeeds_on_its_first_try() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = cluster("STRICT").await?;
    let vip = service(&mut c, "web")?;
    let never = c.dir.path().join("never");
    c.run_pod(web_pod("web-0", "web", &never))?;
    c.wait_pod(NS, "web-0", "Ready", Duration::from_secs(60), |s| s.ready)
        .await?;
    let url = format!("http://{vip}:9080/");
    let held = starts(&mut c, &url, true, 20).await?;
    let free = starts(&mut c, &url, false, 5).await?;
    let ok = |codes: &[String]| codes.iter().filter(|c| *c == "200").count();
    mesh_e2e::figure(&format!(
        "start order: the first request of an app at start succeeded {} of {} times with the proxy holding it, {} of {} without ({free:?})",
        ok(&held),
        held.len(),
        ok(&free),
        free.len()
    ));
    assert_eq!(ok(&held), 20, "{held:?}");
    Ok(())
}

/// One replica of the `web` Deployment's template, of revision `revision`.
fn web_replica(name: &str, revision: &str) -> Value {
    netns::demo_replica(
        NS,
        name,
        "web",
        revision,
        &[("pod-template-hash", revision)],
    )
}

/// A rolling restart (maxSurge 1, maxUnavailable 0, 5 s grace) of a 3-replica Deployment under
/// 200 rps, through a mesh-proxy client and then an Envoy client: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_nothing() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = cluster("PERMISSIVE").await?;
    let vip = service(&mut c, "web")?;
    let mut pods = Vec::new();
    for i in 0..3 {
        pods.push(c.run_pod(web_replica(&format!("web-r0-{i}"), "r0"))?);
    }
    for p in &pods {
        c.wait_pod(NS, p, "Ready", Duration::from_secs(60), |s| s.ready)
            .await?;
    }
    let mut reports = Vec::new();
    for (round, sidecar) in [
        mesh_e2e::cluster::Sidecar::MeshProxy,
        mesh_e2e::cluster::Sidecar::Envoy,
    ]
    .into_iter()
    .enumerate()
    {
        let client = c
            .deploy(&mesh_e2e::cluster::Workload {
                name: format!("client-{sidecar:?}").to_lowercase(),
                sidecar,
                ..mesh_e2e::cluster::Workload::idle(NS, "client", true)
            })
            .await?;
        c.wait_synced().await?;
        let load = c.start_load(
            NS,
            &client[0],
            &[
                "--url",
                &format!("http://{vip}:9080/"),
                "--rate",
                "200",
                "--duration",
                "15s",
                "--concurrency",
                "16",
            ],
        )?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let started = Instant::now();
        let revision = format!("r{}", round + 1);
        pods = c
            .rolling_update(NS, &pods, 3, 1, 0, |i| {
                web_replica(&format!("web-{revision}-{i}"), &revision)
            })
            .await?;
        let took = started.elapsed();
        let r = load.finish().await?;
        mesh_e2e::figure(&format!(
            "rolling restart through {sidecar:?}: 3 replicas replaced in {:.1} s under 200 rps; {} requests, {} failed ({}), answers by body {}",
            took.as_secs_f64(),
            r["sent"],
            r["failed"],
            r["errors"],
            r["by_body"]
        ));
        let by_body = r["by_body"].clone();
        anyhow::ensure!(
            by_body[format!("web {revision}")].as_u64().unwrap_or(0) > 0,
            "the new pods answered nothing: {r}"
        );
        reports.push((sidecar, r));
    }
    for (sidecar, r) in &reports {
        assert_eq!(r["failed"], 0, "through {sidecar:?}: {r}");
    }
    Ok(())
}

/// A 3-replica StatefulSet behind a headless Service, under STRICT: a meshed client reaches
/// `db-0`, `db-1` and `db-2` by their DNS names; each request goes to the pod it names, over
/// mutual TLS that proved that pod's identity. The client's proxy counts what it sent by the
/// endpoint's own cluster and the identity its server certificate proved; each server's proxy
/// counts the client's mTLS connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_behind_a_headless_service_is_reached_pod_by_pod_under_strict()
-> anyhow::Result<()> {
    netns::require()?;
    let mut c = cluster("STRICT").await?;
    c.apply(
        "db",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec:\n  clusterIP: None\n  selector: {app: db}\n  ports: [{name: http, port: 8080, targetPort: 8080}]\n",
    )
    .await?;
    let pods = c
        .run_statefulset(&json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": NS},
        "spec": {
            "serviceName": "db", "replicas": 3,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "serviceAccountName": "db",
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "app", "image": MESHCTL_IMAGE,
                        "env": [{"name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "args": ["demo-service", "--name", "$(POD_NAME)",
                            "--listen", "0.0.0.0:8080"],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                            "periodSeconds": 1},
                    }]}}}}))
        .await?;
    let client = c
        .deploy(&mesh_e2e::cluster::Workload::idle(NS, "client", true))
        .await?;
    c.wait_synced().await?;
    let server_id = "spiffe://cluster.local/ns/shop/sa/db";
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let mut seen = Vec::new();
    for pod in &pods {
        let url = format!("http://{pod}.db.{NS}.svc.cluster.local:8080/");
        let r = c.twenty_requests(NS, &client[0], &url).await?;
        assert_eq!(r["by_body"][format!("{pod} v1")], 20, "{url}: {r}");
        // What the client's proxy sent to this pod's own cluster, and the identity it proved.
        let backend = format!("outbound|8080|{pod}|db.{NS}.svc.cluster.local");
        let sent = mesh_e2e::cluster::sent_through(&c.proxy_metrics(NS, &client[0])?, &backend);
        assert_eq!(
            sent.iter().map(|(_, v)| v).sum::<f64>(),
            20.0,
            "{backend}: {sent:?}"
        );
        assert!(
            sent.iter().all(|(id, _)| id == server_id),
            "{backend}: {sent:?}"
        );
        // The server's proxy took them over mTLS from the client's identity.
        let ip = c.kubelet_pod(NS, pod)?.ip;
        let server = c.exec_in_node(&[
            "curl",
            "-sf",
            "--max-time",
            "3",
            &format!("http://{ip}:15020/metrics"),
        ])?;
        let mtls = mesh_api::prom::count(
            &server,
            &format!("mesh_proxy_inbound_mtls_connections_total{{peer=\"{client_id}\"}}"),
        );
        assert!(mtls >= 1, "{pod} saw no mTLS connection from {client_id}");
        // STRICT holds: plaintext from the node to the same port is refused.
        assert_eq!(
            c.curl_status(None, &format!("http://{ip}:8080/")),
            0,
            "{pod}"
        );
        seen.push(format!("{pod} 20/20"));
    }
    mesh_e2e::figure(&format!(
        "StatefulSet of 3 behind a headless Service under STRICT: by name {}, each through its own cluster with the server identity {server_id} proved, each server saw mTLS from {client_id}; plaintext refused",
        seen.join(", ")
    ));
    Ok(())
}
