//! Release scenarios end to end, written once against [`Cluster`] and run here on the
//! network-namespace cluster: real interception, real processes, mutual TLS. Each prints its
//! measured figures. Root only (CI runs them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_e2e::cluster::{App, Cluster, Load, ServiceDef, Sidecar, Workload};
use mesh_e2e::netns::{self, NetnsCluster};
use serde_json::Value;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn service(name: &str, selector: &[(&str, &str)]) -> ServiceDef {
    ServiceDef {
        namespace: "shop".into(),
        name: name.into(),
        selector: labels(selector),
        port: 9080,
        target_port: 8080,
    }
}

fn demo(name: &str, version: &str, replicas: usize) -> Workload {
    Workload {
        namespace: "shop".into(),
        name: format!("{name}-{version}"),
        service_account: name.into(),
        labels: labels(&[("app", name), ("version", version)]),
        replicas,
        meshed: true,
        sidecar: Sidecar::MeshProxy,
        app: App::Demo {
            name: name.into(),
            version: version.into(),
            error_rate: 0.0,
        },
    }
}

fn idle(name: &str, meshed: bool) -> Workload {
    Workload::idle("shop", name, meshed)
}

/// `reviews` (and `reviews-v1`, `reviews-v2`): `v1` pods of v1, one of v2, and a meshed client
/// pod `client-0`. Returns the address of `reviews`.
async fn reviews<C: Cluster>(c: &mut C, v1: usize) -> anyhow::Result<String> {
    let addr = c.service(service("reviews", &[("app", "reviews")]))?;
    for (v, n) in [("v1", v1), ("v2", 1)] {
        c.service(service(
            &format!("reviews-{v}"),
            &[("app", "reviews"), ("version", v)],
        ))?;
        c.deploy(&demo("reviews", v, n)).await?;
    }
    c.deploy(&idle("client", true)).await?;
    Ok(addr)
}

/// Applies the `reviews` route and waits until the client's proxy routes by it.
async fn route<C: Cluster>(c: &mut C, yaml: &str) -> anyhow::Result<()> {
    apply_served(c, "route", yaml).await
}

/// Applies `yaml` as `name` and waits until the controller served the client's proxy the
/// revision it caused and the proxy acknowledged what of it concerns it: a proxy that looks
/// destinations up on demand and never called the Service holds nothing of it, and its first
/// request gets the new config. `wait_synced` alone may return before the controller read the
/// change.
async fn apply_served<C: Cluster>(c: &mut C, name: &str, yaml: &str) -> anyhow::Result<()> {
    let before = c.served("shop", "client-0")?;
    c.apply(name, yaml).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.served("shop", "client-0")? == before || !c.synced("shop", "client-0")? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the controller never served the client's proxy the config of:\n{yaml}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.wait_synced().await
}

fn split(v1: u32, v2: u32) -> String {
    mesh_controller::testing::split_yaml(
        "shop",
        "reviews",
        "reviews",
        9080,
        &[("reviews-v1", v1), ("reviews-v2", v2)],
    )
}

/// Load from `client-0` to `url` at 200 requests a second (open loop) for `duration`.
fn at_200_rps<C: Cluster>(c: &C, url: &str, duration: &str) -> anyhow::Result<Load> {
    c.start_load(
        "shop",
        "client-0",
        &[
            "--url",
            url,
            "--rate",
            "200",
            "--duration",
            duration,
            "--concurrency",
            "16",
        ],
    )
}

/// 20 requests, one at a time, from pod `shop/pod` to `url`: the load generator's report.
async fn twenty_requests<C: Cluster>(c: &C, pod: &str, url: &str) -> anyhow::Result<Value> {
    c.twenty_requests("shop", pod, url).await
}

fn count(report: &Value, body: &str) -> u64 {
    report["by_body"][body].as_u64().unwrap_or(0)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---- the scenarios, for any cluster ----

/// Scenario 1: a 90/10 split measured within ±3 points over 2,000 requests.
async fn canary<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = reviews(c, 2).await?;
    route(c, &split(90, 10)).await?;
    let url = format!("http://{addr}:9080/");
    let r = c
        .start_load(
            "shop",
            "client-0",
            &["--url", &url, "--requests", "2000", "--concurrency", "8"],
        )?
        .finish()
        .await?;
    let (v1, v2) = (count(&r, "reviews v1"), count(&r, "reviews v2"));
    let share = 100.0 * v2 as f64 / (v1 + v2).max(1) as f64;
    mesh_e2e::figure(&format!(
        "canary 90/10: {} requests, {} failed, v1 {v1}, v2 {v2}: v2 share {share:.1} % (want 10 ± 3) in {} ms",
        r["sent"], r["failed"], r["elapsed_ms"]
    ));
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(v1 + v2, 2000, "{r}");
    assert!((7.0..=13.0).contains(&share), "v2 got {share:.1} %: {r}");
    Ok(())
}

/// Scenario 2: from 100 % v1 to 100 % v2 under 200 rps: no failed request, and no request
/// sent after the client's proxy acknowledged the change reaches v1. (v2 sits in the route at
/// weight 0 before the switch, so the proxy already has its endpoints and runs the new route
/// the moment it accepts it.)
async fn blue_green<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = reviews(c, 2).await?;
    route(c, &split(1, 0)).await?;
    let generation = |c: &C| -> anyhow::Result<f64> {
        let m = c.proxy_metrics("shop", "client-0")?;
        mesh_api::prom::sample(&m, "mesh_proxy_config_generation")
            .ok_or_else(|| anyhow::anyhow!("no mesh_proxy_config_generation in:\n{m}"))
    };
    let url = format!("http://{addr}:9080/");
    let load = at_200_rps(c, &url, "6s")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Read under load: a proxy that looks destinations up on demand got the route with the
    // first request.
    let acked_before = c.acked("shop", "client-0", "RDS")?;
    let running_before = generation(c)?;
    let switched = Instant::now();
    c.apply("route", &split(0, 1)).await?;
    // When the controller has the client's acknowledgement (seen within a few milliseconds),
    // and when the client's proxy runs the new config.
    let (mut acked_at, mut acked_ms, mut running_ms) = (None, 0, None);
    while acked_at.is_none() || running_ms.is_none() {
        // Every response the change caused (one per route configuration) acknowledged.
        if acked_at.is_none()
            && c.acked("shop", "client-0", "RDS")? != acked_before
            && c.synced("shop", "client-0")?
        {
            acked_at = Some(unix_ms());
            acked_ms = switched.elapsed().as_millis();
        }
        if running_ms.is_none() && generation(c)? > running_before {
            running_ms = Some(switched.elapsed().as_millis());
        }
        anyhow::ensure!(
            switched.elapsed() < Duration::from_secs(5),
            "the client's proxy never took the switch"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked_at = acked_at.unwrap_or_default();
    let r = load.finish().await?;
    let last_v1 = r["last_sent_unix_ms"]["reviews v1"].as_u64().unwrap_or(0);
    mesh_e2e::figure(&format!(
        "blue-green under 200 rps: {} requests, {} failed, v1 {}, v2 {}; after the route was written the client's proxy ran it within {} ms and its acknowledgement was seen within {acked_ms} ms; the last request to v1 was sent {} ms before that",
        r["sent"],
        r["failed"],
        count(&r, "reviews v1"),
        count(&r, "reviews v2"),
        running_ms.unwrap_or_default(),
        acked_at as i64 - last_v1 as i64
    ));
    assert_eq!(r["failed"], 0, "{r}");
    assert!(
        count(&r, "reviews v1") > 0 && count(&r, "reviews v2") > 0,
        "{r}"
    );
    assert!(
        last_v1 <= acked_at,
        "a request sent after the acknowledgement reached v1: {r}"
    );
    Ok(())
}

/// Scenario 3: STRICT mTLS: plaintext from a pod outside the mesh is refused; a meshed client gets
/// through, and the server's proxy names the client's SPIFFE ID.
async fn strict_mtls<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    c.label_namespace("shop", &[("mesh.dev/mtls-mode", "STRICT")])?;
    let addr = reviews(c, 1).await?;
    c.deploy(&idle("outsider", false)).await?;
    c.wait_synced().await?;
    let pod = c.pod_ip("shop", "reviews-v1-0")?;
    let plain = twenty_requests(c, "outsider-0", &format!("http://{pod}:8080/")).await?;
    let meshed = twenty_requests(c, "client-0", &format!("http://{addr}:9080/")).await?;
    let metrics = format!(
        "{}{}",
        c.proxy_metrics("shop", "reviews-v1-0")?,
        c.proxy_metrics("shop", "reviews-v2-0")?
    );
    let client_id = "spiffe://cluster.local/ns/shop/sa/client";
    let seen = mesh_api::prom::count(
        &metrics,
        &format!("mesh_proxy_inbound_mtls_connections_total{{peer=\"{client_id}\"}}"),
    );
    mesh_e2e::figure(&format!(
        "STRICT mTLS: plaintext from outside the mesh {} of 20 refused ({:?}); meshed client {} of 20 answered; the servers saw {seen} mTLS connections from {client_id}",
        plain["failed"], plain["errors"], meshed["ok"]
    ));
    assert_eq!(plain["failed"], 20, "{plain}");
    assert_eq!(meshed["ok"], 20, "{meshed}");
    assert!(
        seen >= 1,
        "no inbound mTLS connection from {client_id}:\n{metrics}"
    );
    Ok(())
}

/// Scenario 4: the controller killed for 30 s under 200 rps: no failed request.
async fn control_plane_loss<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = reviews(c, 2).await?;
    route(c, &split(50, 50)).await?;
    let url = format!("http://{addr}:9080/");
    let load = at_200_rps(c, &url, "36s")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.stop_controller()?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    c.start_controller().await?;
    let r = load.finish().await?;
    c.wait_synced().await?;
    mesh_e2e::figure(&format!(
        "control-plane loss: controller down 30 s of 36 s at 200 rps: {} requests, {} failed, v1 {}, v2 {}",
        r["sent"],
        r["failed"],
        count(&r, "reviews v1"),
        count(&r, "reviews v2")
    ));
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["sent"].as_u64().unwrap_or(0) >= 6000, "{r}");
    Ok(())
}

/// Scenario 5: one of three backend pods killed under load, its endpoint left listed for 3 s
/// (as a platform takes to notice; where the platform takes it out itself, as Kubernetes does
/// for a deleted pod, until then): the client's proxy ejects it, and the requests that fail
/// (at most 20 of 2,000) were all sent before that ejection.
async fn endpoint_loss<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let v1 = c.service(service(
        "reviews-v1",
        &[("app", "reviews"), ("version", "v1")],
    ))?;
    c.deploy(&demo("reviews", "v1", 3)).await?;
    c.deploy(&idle("client", true)).await?;
    c.wait_synced().await?;
    let ejections = |c: &C| -> anyhow::Result<u64> {
        Ok(mesh_api::prom::count(
            &c.proxy_metrics("shop", "client-0")?,
            "mesh_proxy_endpoint_ejections_total{backend=\"outbound|9080||reviews-v1.shop.svc.cluster.local\"}",
        ))
    };
    let before = ejections(c)?;
    let url = format!("http://{v1}:9080/");
    let load = at_200_rps(c, &url, "10s")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed = unix_ms();
    c.kill_pod("shop", "reviews-v1-1")?;
    // Watch for the ejection while the endpoint stays listed. The time seen is at or after
    // the ejection (the metrics are read every 20 ms or so).
    let mut ejected = None;
    while unix_ms() < killed + 3000 {
        if ejections(c)? > before {
            ejected = Some(unix_ms());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(
        (killed + 3000).saturating_sub(unix_ms()),
    ))
    .await;
    let forgotten = unix_ms();
    c.forget_pod("shop", "reviews-v1-1")?;
    let r = load.finish().await?;
    let start = r["start_unix_ms"].as_u64().unwrap_or(0);
    let at = |t: u64| t.saturating_sub(start) as f64 / 1000.0;
    let last_failed = r["last_sent_unix_ms"]["!"].as_u64();
    mesh_e2e::figure(&format!(
        "endpoint loss: 1 of 3 pods killed at {:.2} s of 10 s at 200 rps, ejected by the client's proxy by {}, its endpoint removed at {:.2} s: {} requests, {} failed ({}), the last failed one sent at {}",
        at(killed),
        ejected.map_or("never".to_owned(), |t| format!("{:.2} s", at(t))),
        at(forgotten),
        r["sent"],
        r["failed"],
        r["errors"],
        last_failed.map_or("-".to_owned(), |t| format!("{:.2} s", at(t)))
    ));
    // The endpoint is ejected while listed, and nothing sent after that fails: a dead endpoint
    // costs the requests in flight when it died and those sent to it before its connection
    // attempt failed, not its share of the traffic (about 67 a second).
    let until = if c.killed_pods_stay_listed() {
        ejected.with_context(|| format!("never ejected in the 3 s it stayed listed: {r}"))?
    } else {
        ejected.unwrap_or(forgotten)
    };
    if let Some(t) = last_failed {
        assert!(
            t <= until,
            "a request sent at {:.2} s failed, after the ejection at {:.2} s: {r}",
            at(t),
            at(until)
        );
        assert!(
            t + 500 >= killed,
            "a request sent before the kill failed: {r}"
        );
    }
    assert!(r["failed"].as_u64().unwrap_or(0) <= 20, "{r}");
    assert_eq!(r["sent"], 2000, "{r}");
    Ok(())
}

/// Scenario 6: retries on a cluster with only the Gateway API standard channel. The
/// HTTPRoute's own `retry` is pruned on apply; a TrafficPolicy on the route retries `flaky`,
/// which fails every other request: 0 of 1,000 requests fail, and the app saw each retry.
/// The client pod runs mesh-proxy.
async fn retries_on_the_standard_channel<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    retries_through(c, Sidecar::MeshProxy).await
}

/// Scenario 6 with Envoy as the client pod's sidecar, from the same xDS.
async fn retries_on_the_standard_channel_through_envoy<C: Cluster>(
    c: &mut C,
) -> anyhow::Result<()> {
    if mesh_e2e::peer("MESH_ENVOY", "envoy").is_none() {
        return Ok(());
    }
    retries_through(c, Sidecar::Envoy).await
}

async fn retries_through<C: Cluster>(c: &mut C, sidecar: Sidecar) -> anyhow::Result<()> {
    let addr = c.service(service("flaky", &[("app", "flaky")]))?;
    let mut flaky = demo("flaky", "v1", 1);
    flaky.app = App::Demo {
        name: "flaky".into(),
        version: "v1".into(),
        error_rate: 0.5,
    };
    c.deploy(&flaky).await?;
    let mut client = idle("client", true);
    client.sidecar = sidecar;
    c.deploy(&client).await?;
    let route_yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: flaky, port: 9080}]
  rules:
  - name: all
    backendRefs: [{name: flaky, port: 9080}]
    retry: {attempts: 2, codes: [500]}
";
    let (_, pruned) = mesh_e2e::as_a_cluster_stores(route_yaml)?;
    assert_eq!(pruned, vec!["spec.rules[0].retry".to_string()]);
    route(c, route_yaml).await?;
    let url = format!("http://{addr}:9080/");
    let without = twenty_requests(c, "client-0", &url).await?;
    assert!(
        without["failed"].as_u64().unwrap_or(0) >= 5,
        "the pruned retry still retried: {without}"
    );
    apply_served(
        c,
        "retry",
        "apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: retry, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: flaky, sectionName: all}]
  retry: {attempts: 2, codes: [500]}
---
apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: budget, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: flaky}]
  retryBudget: {percent: 100, minRetryConcurrency: 4}
",
    )
    .await?;
    let r = c
        .start_load(
            "shop",
            "client-0",
            // One at a time: the app's failures alternate exactly, as the issue describes.
            &["--url", &url, "--requests", "1000", "--concurrency", "1"],
        )?
        .finish()
        .await?;
    let metrics = c.proxy_metrics("shop", "client-0")?;
    // Envoy's Prometheus names take the cluster's stat name in (`envoy_cluster_<alt stat
    // name>_upstream_rq_retry{...}`).
    let (prefix, counter) = match sidecar {
        Sidecar::MeshProxy => ("mesh_proxy_", "mesh_proxy_retries_total{"),
        Sidecar::Envoy => ("envoy_cluster_", "_upstream_rq_retry{"),
    };
    let retries: f64 = metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && l.contains(counter) && l.contains("flaky"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    mesh_e2e::figure(&format!(
        "retries on the standard channel, client {sidecar:?}: route retry pruned; with a TrafficPolicy {} requests, {} failed, {retries} retries by the client's proxy, in {} ms",
        r["sent"], r["failed"], r["elapsed_ms"]
    ));
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(count(&r, "flaky v1"), 1000, "{r}");
    assert!(retries >= 450.0, "{retries} retries: {metrics}");
    Ok(())
}

/// Scenario 7: a TrafficPolicy's outlier detection. Service `pool` has a good pod and a pod
/// that fails every request; with round robin and `consecutive5xx: 3`, the bad pod is ejected
/// after its third failure, and the next 200 requests all succeed.
async fn traffic_policy_ejects_a_failing_pod<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = c.service(service("pool", &[("app", "pool")]))?;
    for (version, error_rate) in [("good", 0.0), ("bad", 1.0)] {
        let mut w = demo("pool", version, 1);
        w.app = App::Demo {
            name: "pool".into(),
            version: version.into(),
            error_rate,
        };
        c.deploy(&w).await?;
    }
    c.deploy(&idle("client", true)).await?;
    apply_served(
        c,
        "pool-policy",
        "apiVersion: mesh.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: pool, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: pool}]
  loadBalancer: {algorithm: RoundRobin}
  outlierDetection: {consecutive5xx: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}
",
    )
    .await?;
    let url = format!("http://{addr}:9080/");
    let warm = twenty_requests(c, "client-0", &url).await?;
    let r = c
        .start_load(
            "shop",
            "client-0",
            &["--url", &url, "--requests", "200", "--concurrency", "1"],
        )?
        .finish()
        .await?;
    mesh_e2e::figure(&format!(
        "traffic policy ejection: {} of the first 20 requests failed (the bad pod's 3 in a row eject it), then {} of {} in {} ms",
        warm["failed"], r["failed"], r["sent"], r["elapsed_ms"]
    ));
    assert!(warm["failed"].as_u64().unwrap_or(99) <= 5, "{warm}");
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(count(&r, "pool good"), 200, "{r}");
    Ok(())
}

/// The Rollout of `reviews` as `meshctl route status -o json` shows it: its status.
async fn rollout_status<C: Cluster>(c: &C) -> anyhow::Result<Value> {
    let out = c
        .meshctl_route(&["status", "reviews", "-n", "shop", "-o", "json"])
        .await?;
    let v: Value = serde_json::from_str(&out).with_context(|| format!("status JSON: {out}"))?;
    Ok(v["status"].clone())
}

/// Waits until the rollout's status is `what`; returns it.
async fn wait_rollout<C: Cluster>(
    c: &C,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let st = rollout_status(c).await?;
        if done(&st) {
            return Ok(st);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the rollout was not {what} within {timeout:?}: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn actions(st: &Value) -> Vec<String> {
    st["decisions"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x["action"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `meshctl route rollout reviews --to <candidate>` in five-second steps of 5, 25, 50 and
/// 100 %, each judged on at least 30 of the candidate's requests.
async fn start_rollout<C: Cluster>(c: &C, candidate: &str) -> anyhow::Result<()> {
    c.meshctl_route(&[
        "rollout",
        "reviews",
        "-n",
        "shop",
        "--to",
        candidate,
        "--steps",
        "5,25,50,100",
        "--interval",
        "5s",
        "--min-requests",
        "30",
        "--success-rate",
        "99",
        "--p99",
        "500ms",
    ])
    .await
    .map(|_| ())
}

/// A rollout of `reviews` to `candidate` under 200 rps for up to `secs` seconds, waited for (at
/// most `timeout` seconds) until it ends: its status, how long it took, and the report of the
/// load, stopped then.
async fn rollout_under_load<C: Cluster>(
    c: &C,
    addr: &str,
    candidate: &str,
    secs: u64,
    timeout: u64,
) -> anyhow::Result<(Value, Duration, Value)> {
    let url = format!("http://{addr}:9080/");
    let load = at_200_rps(c, &url, &format!("{secs}s"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    start_rollout(c, candidate).await?;
    let st = wait_rollout(c, "ended", Duration::from_secs(timeout), |s| {
        matches!(
            s["phase"].as_str(),
            Some("Promoted" | "RolledBack" | "Invalid")
        )
    })
    .await?;
    let took = started.elapsed();
    Ok((st, took, load.stop().await?))
}

/// The weights `meshctl route show` reports for the route's rule.
async fn shown<C: Cluster>(c: &C) -> anyhow::Result<String> {
    c.meshctl_route(&["show", "reviews", "-n", "shop"]).await
}

/// Scenario 8: a rollout of a healthy candidate under 200 rps reaches 100 % through its four
/// steps, each judged by the controller on what the client's proxy measured, with no request
/// failed.
async fn rollout_promotes_a_healthy_candidate<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = reviews(c, 1).await?;
    route(c, &split(100, 0)).await?;
    let (st, took, r) = rollout_under_load(c, &addr, "reviews-v2", 45, 42).await?;
    let per_step: Vec<String> = st["decisions"]
        .as_array()
        .map(|d| {
            d.iter()
                .skip(1)
                .map(|x| {
                    format!(
                        "step {}: {} candidate requests, {} %",
                        x["step"].as_u64().unwrap_or(0) + 1,
                        x["candidate"]["requests"],
                        x["candidate"]["successRate"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    mesh_e2e::figure(&format!(
        "rollout of a healthy candidate at 200 rps: {} in {:.1} s ({}); {} requests, {} failed",
        st["phase"],
        took.as_secs_f64(),
        per_step.join("; "),
        r["sent"],
        r["failed"]
    ));
    assert_eq!(st["phase"], "Promoted", "{st:#}");
    assert_eq!(
        actions(&st),
        ["Started", "Advanced", "Advanced", "Advanced", "Promoted"]
    );
    for d in st["decisions"].as_array().into_iter().flatten().skip(1) {
        assert!(
            d["candidate"]["requests"].as_u64().unwrap_or(0) >= 30,
            "{d}"
        );
        assert_eq!(d["candidate"]["successRate"], 100.0, "{d}");
    }
    assert_eq!(r["failed"], 0, "{r}");
    let show = shown(c).await?;
    assert!(show.contains("reviews-v1 0 %, reviews-v2 100 %"), "{show}");
    Ok(())
}

/// Scenario 9: a rollout of a candidate that fails 20 % of its requests is rolled back at its
/// first step's gate: the failed requests are bounded by that step's share (5 %), and the route
/// ends at 100 % stable.
async fn rollout_rolls_back_a_failing_candidate<C: Cluster>(c: &mut C) -> anyhow::Result<()> {
    let addr = c.service(service("reviews", &[("app", "reviews")]))?;
    for (v, error_rate) in [("v1", 0.0), ("v3", 0.2)] {
        c.service(service(
            &format!("reviews-{v}"),
            &[("app", "reviews"), ("version", v)],
        ))?;
        let mut w = demo("reviews", v, 1);
        w.app = App::Demo {
            name: "reviews".into(),
            version: v.into(),
            error_rate,
        };
        c.deploy(&w).await?;
    }
    c.deploy(&idle("client", true)).await?;
    route(
        c,
        &mesh_controller::testing::split_yaml(
            "shop",
            "reviews",
            "reviews",
            9080,
            &[("reviews-v1", 100)],
        ),
    )
    .await?;
    let (st, took, r) = rollout_under_load(c, &addr, "reviews-v3", 20, 18).await?;
    let v3_ok = count(&r, "reviews v3");
    let failed = r["failed"].as_u64().unwrap_or(0);
    let sent = r["sent"].as_u64().unwrap_or(0);
    let back = st["decisions"][1].clone();
    mesh_e2e::figure(&format!(
        "rollout of a candidate failing 20 %: {} after {:.1} s at step {} on {} candidate requests ({} % success); load: {sent} requests, v3 answered {v3_ok}, {failed} failed ({:.2} % of all)",
        st["phase"],
        took.as_secs_f64(),
        back["step"].as_u64().unwrap_or(0) + 1,
        back["candidate"]["requests"],
        back["candidate"]["successRate"],
        failed as f64 * 100.0 / sent.max(1) as f64
    ));
    assert_eq!(st["phase"], "RolledBack", "{st:#}");
    assert_eq!(actions(&st), ["Started", "RolledBack"]);
    assert_eq!(back["step"], 0, "{back}");
    let rate = back["candidate"]["successRate"].as_f64().unwrap_or(100.0);
    assert!(rate < 99.0, "{back}");
    // Bounded by the first step's share: v3 got no more than 5 % of the 200 rps while the
    // rollout ran (half again for requests in flight and the proxy's balancing), and only its
    // own requests failed.
    let v3_all = v3_ok + failed;
    let bound = 0.05 * 200.0 * (took.as_secs_f64() + 1.0) * 1.5;
    assert!(
        (v3_all as f64) <= bound,
        "v3 had {v3_all} requests in {took:?}, over {bound:.0}: {r}"
    );
    assert!(failed > 0 && failed <= v3_all, "{r}");
    let show = shown(c).await?;
    assert!(show.contains("reviews-v1 100 %, reviews-v3 0 %"), "{show}");
    Ok(())
}

/// Scenario 10: a rollout survives a controller restart at the step it was at, and a person's
/// `meshctl route split` during it pauses it with a condition naming the change; the person's
/// weights stay until `abort` puts all traffic back on stable. No request fails.
async fn rollout_resumes_after_a_restart_and_yields_to_a_person<C: Cluster>(
    c: &mut C,
) -> anyhow::Result<()> {
    let addr = reviews(c, 1).await?;
    route(c, &split(100, 0)).await?;
    let url = format!("http://{addr}:9080/");
    let load = at_200_rps(c, &url, "40s")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    start_rollout(c, "reviews-v2").await?;
    let at_two = wait_rollout(c, "at step 2", Duration::from_secs(15), |s| s["step"] == 1).await?;
    assert_eq!(actions(&at_two), ["Started", "Advanced"]);
    c.stop_controller()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.start_controller().await?;
    let resumed = wait_rollout(c, "resumed", Duration::from_secs(15), |s| {
        actions(s).last().map(String::as_str) == Some("Resumed after restart")
    })
    .await?;
    assert_eq!(resumed["step"], 1, "{resumed:#}");
    assert_eq!(resumed["phase"], "Progressing", "{resumed:#}");

    // --wait: through a port-forward to the controller, until every proxy applied the split.
    let split_out = c
        .meshctl_route(&[
            "split",
            "reviews",
            "-n",
            "shop",
            "--to",
            "reviews-v1=50,reviews-v2=50",
            "--wait",
            "--timeout",
            "20s",
        ])
        .await?;
    assert!(
        split_out.contains("applied by all ") || split_out.contains("applied by the 1 "),
        "{split_out}"
    );
    let paused = wait_rollout(c, "paused", Duration::from_secs(10), |s| {
        s["phase"] == "Paused"
    })
    .await?;
    let cond = paused["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Paused"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(cond["reason"], "ManualChange", "{paused:#}");
    let msg = cond["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("weights changed to reviews-v1=50, reviews-v2=50")
            && msg.contains("the rollout set reviews-v1=75, reviews-v2=25"),
        "{msg}"
    );
    // The person's weights stay while it is paused (3 s: three of the driver's ticks).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let show = shown(c).await?;
    assert!(show.contains("reviews-v1 50 %, reviews-v2 50 %"), "{show}");
    assert_eq!(rollout_status(c).await?["phase"], "Paused");

    c.meshctl_route(&["abort", "reviews", "-n", "shop"]).await?;
    let aborted = wait_rollout(c, "aborted", Duration::from_secs(10), |s| {
        s["phase"] == "Aborted"
    })
    .await?;
    let show = shown(c).await?;
    let r = load.stop().await?;
    mesh_e2e::figure(&format!(
        "rollout across a controller restart and a manual split: resumed at step {}, paused by the split ({}), aborted; {} requests, {} failed",
        resumed["step"].as_u64().unwrap_or(0) + 1,
        cond["reason"],
        r["sent"],
        r["failed"]
    ));
    assert_eq!(
        actions(&aborted),
        [
            "Started",
            "Advanced",
            "Resumed after restart",
            "Paused",
            "Aborted"
        ]
    );
    assert!(show.contains("reviews-v1 100 %, reviews-v2 0 %"), "{show}");
    assert_eq!(r["failed"], 0, "{r}");
    Ok(())
}

// ---- on the network-namespace cluster ----

macro_rules! on_netns {
    ($name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> anyhow::Result<()> {
            netns::require()?;
            let mut c = NetnsCluster::start().await?;
            $scenario(&mut c).await
        }
    };
}

on_netns!(canary_90_10_is_measured_within_3_points, canary);
on_netns!(blue_green_switch_under_load_fails_nothing, blue_green);
on_netns!(
    strict_mtls_refuses_plaintext_and_names_the_client,
    strict_mtls
);
on_netns!(
    thirty_seconds_without_the_controller_fail_nothing,
    control_plane_loss
);
on_netns!(
    a_killed_endpoint_fails_requests_only_until_ejected,
    endpoint_loss
);
on_netns!(
    retries_from_a_traffic_policy_survive_the_standard_channel,
    retries_on_the_standard_channel
);
on_netns!(
    retries_from_a_traffic_policy_survive_the_standard_channel_through_envoy,
    retries_on_the_standard_channel_through_envoy
);
on_netns!(
    a_traffic_policy_ejects_a_pod_that_fails_every_request,
    traffic_policy_ejects_a_failing_pod
);
on_netns!(
    a_rollout_promotes_a_healthy_candidate_through_four_steps,
    rollout_promotes_a_healthy_candidate
);
on_netns!(
    a_rollout_rolls_back_a_failing_candidate_at_its_first_gate,
    rollout_rolls_back_a_failing_candidate
);
on_netns!(
    a_rollout_resumes_after_a_restart_and_yields_to_a_manual_split,
    rollout_resumes_after_a_restart_and_yields_to_a_person
);

// ---- on kind: ignored here (no Docker can run a cluster); e2e/kind/scenarios runs them with
// `--ignored` and sets MESH_E2E_KIND_IMAGES, without which they fail ----

macro_rules! on_kind {
    ($name:ident, $scenario:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        #[ignore = "needs a kind cluster: e2e/kind/scenarios runs it with --ignored"]
        async fn $name() -> anyhow::Result<()> {
            let mut c = mesh_e2e::kind::KindCluster::from_env().ok_or_else(|| {
                anyhow::anyhow!(
                    "MESH_E2E_KIND_IMAGES and MESH_E2E_MESHCTL are not set: run e2e/kind/scenarios"
                )
            })?;
            $scenario(&mut c).await
        }
    };
}

on_kind!(kind_canary, canary);
on_kind!(kind_blue_green, blue_green);
on_kind!(kind_strict_mtls, strict_mtls);
on_kind!(kind_control_plane_loss, control_plane_loss);
on_kind!(kind_endpoint_loss, endpoint_loss);
on_kind!(
    kind_retries_on_the_standard_channel,
    retries_on_the_standard_channel
);
on_kind!(
    kind_traffic_policy_ejection,
    traffic_policy_ejects_a_failing_pod
);
on_kind!(kind_rollout_promotes, rollout_promotes_a_healthy_candidate);
on_kind!(
    kind_rollout_rolls_back,
    rollout_rolls_back_a_failing_candidate
);
on_kind!(
    kind_rollout_restart_and_manual_split,
    rollout_resumes_after_a_restart_and_yields_to_a_person
);

/// The cluster's controller is the binary a cluster runs, on its Kubernetes source: it watches
/// the API server as its service account, every call allowed by the chart's RBAC, and writes
/// the route's status back through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_watches_the_api_server_as_its_service_account() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    reviews(&mut c, 1).await?;
    route(&mut c, &split(90, 10)).await?;
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/reviews";
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        let status = c
            .api
            .state()
            .objects
            .get(path)
            .map(|r| r["status"]["parents"][0]["conditions"].clone());
        let accepted = status.as_ref().and_then(|conds| {
            conds
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Accepted")
                .map(|c| c["status"].clone())
        });
        if let Some(a) = accepted {
            break a;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the controller wrote no status to {path}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(accepted, "True");
    let user = "system:serviceaccount:mesh-system:mesh-controller";
    let log: Vec<_> = c
        .api
        .state()
        .log
        .iter()
        .filter(|l| l.user == user)
        .cloned()
        .collect();
    let forbidden: Vec<String> = log
        .iter()
        .filter(|l| l.forbidden)
        .map(|l| format!("{} {}", l.method, l.path))
        .collect();
    let watches = log
        .iter()
        .filter(|l| l.query.contains("watch=true"))
        .count();
    mesh_e2e::figure(&format!(
        "netns cluster API server: the controller made {} requests as its service account ({watches} watches), {} forbidden; the route's Accepted status written back",
        log.len(),
        forbidden.len()
    ));
    assert!(forbidden.is_empty(), "forbidden: {forbidden:?}");
    assert!(watches >= 5, "{log:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cluster_leaves_no_namespace_rule_or_process() -> anyhow::Result<()> {
    netns::require()?;
    let (mine, pids) = {
        let mut c = NetnsCluster::start().await?;
        reviews(&mut c, 1).await?;
        let mine = c.netns_prefix();
        let spaces: Vec<String> = netns::namespaces()
            .into_iter()
            .filter(|n| n.starts_with(&mine))
            .collect();
        assert!(spaces.len() >= 5, "{spaces:?}");
        let pids: Vec<u32> = spaces.iter().flat_map(|n| netns::pids(n)).collect();
        assert!(pids.len() >= 7, "{pids:?}");
        (mine, pids)
    };
    let left: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&mine))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    // Nor their cluster DNS links.
    let links: Vec<String> = std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&mine))
        .collect();
    assert!(links.is_empty(), "/etc/netns entries left: {links:?}");
    // The interception rules lived in the pods' namespaces: the host's table has none.
    let host = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()?;
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(!host.contains("MESH_"), "{host}");
    // Every process the cluster ran is gone (they were children it waited for).
    let alive: Vec<&u32> = pids
        .iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(alive.is_empty(), "processes left: {alive:?}");
    Ok(())
}

/// Two controller replicas, 200 rps between meshed pods, and the replica serving the client
/// killed (a process kill: its pod's address answers with resets, so this is the fast path, not
/// a lost node): no request fails, every proxy it served streams from the other replica again
/// (found through the chart's headless `mesh-controller-xds`, where the killed replica stays
/// listed), and a route change made after the kill reaches the client, which has moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_replica_fails_nothing_and_its_proxies_move_to_the_other()
-> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    c.add_controller_replica().await?;
    let addr = reviews(&mut c, 2).await?;
    route(&mut c, &split(50, 50)).await?;
    let url = format!("http://{addr}:9080/");
    let load = at_200_rps(&c, &url, "12s")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes = |c: &NetnsCluster, k: usize| -> anyhow::Result<Vec<String>> {
        Ok(c.replica_proxies(k)?
            .iter()
            .filter_map(|p| p["node"].as_str().map(str::to_owned))
            .collect())
    };
    let (on0, on1) = (nodes(&c, 0)?, nodes(&c, 1)?);
    let client = "shop/client-0".to_string();
    let (victim, survivor, moved) = if on0.contains(&client) {
        (0, 1, on0)
    } else {
        (1, 0, on1)
    };
    anyhow::ensure!(
        moved.contains(&client),
        "the client's proxy is on neither replica: {:?}",
        c.proxies()?
    );
    let killed = Instant::now();
    c.kill_controller_replica(victim);
    let deadline = killed + Duration::from_secs(10);
    let took = loop {
        let there = c.replica_proxies(survivor)?;
        // Read after the answer: an upper bound.
        let now = Instant::now();
        let all_synced = moved.iter().all(|node| {
            there
                .iter()
                .any(|p| p["node"] == node.as_str() && mesh_e2e::cluster::synced(p))
        });
        if all_synced {
            break now - killed;
        }
        anyhow::ensure!(
            now < deadline,
            "proxies {moved:?} not on replica {survivor} 10 s after replica {victim} was killed: {there:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A route change after the kill: to v2 only, timed to the client's acknowledgement.
    let changed = Instant::now();
    route(&mut c, &split(0, 100)).await?;
    let applied = changed.elapsed();
    let r = load.finish().await?;
    let after = twenty_requests(&c, "client-0", &url).await?;
    mesh_e2e::figure(&format!(
        "controller replica killed: its {} proxies on the other replica ({} there now) and synced in {} ms; \
         a route change after the kill acknowledged by every proxy in {} ms; 12 s at 200 rps: {} requests, {} failed",
        moved.len(),
        nodes(&c, survivor)?.len(),
        took.as_millis(),
        applied.as_millis(),
        r["sent"],
        r["failed"]
    ));
    assert_eq!(r["failed"], 0, "{r}");
    assert!(r["sent"].as_u64().unwrap_or(0) >= 2000, "{r}");
    assert_eq!(count(&after, "reviews v2"), 20, "after the change: {after}");
    Ok(())
}

/// A proxy's admin (`/config_dump`, `/logging`, `/shutdown`) answers only inside its pod: not
/// to another pod at the pod's address, nor through a Service whose `targetPort` names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_admin_answers_only_inside_its_pod() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    let exposed = c.service(ServiceDef {
        target_port: mesh_api::consts::ports::PROXY_ADMIN,
        ..service("exposed", &[("app", "reviews")])
    })?;
    let app = c.service(service("reviews", &[("app", "reviews")]))?;
    c.deploy(&demo("reviews", "v1", 1)).await?;
    c.deploy(&idle("client", true)).await?;
    c.wait_synced().await?;
    let ip = c.pod_ip("shop", "reviews-v1-0")?;
    let status = |pod: &str, url: &str| c.curl_status(Some(("shop", pod)), url);
    assert_eq!(
        status("reviews-v1-0", "http://127.0.0.1:15000/config_dump"),
        200,
        "the admin answers in its own pod"
    );
    assert_eq!(
        status("client-0", &format!("http://{app}:9080/")),
        200,
        "the client reaches the app"
    );
    for url in [
        format!("http://{ip}:15000/config_dump"),
        format!("http://{exposed}:9080/config_dump"),
    ] {
        let got = status("client-0", &url);
        assert_ne!(got, 200, "{url} answered another pod");
    }
    Ok(())
}

/// The controller's debug API and graph answer no pod, meshed or not, at the controller's
/// address (401), while its metrics and probes answer both; through a port-forward, which lands
/// on the controller pod's loopback, meshctl reads them as a user the chart's reader role is
/// bound to, and `meshctl check` sees the controller ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controllers_debug_api_answers_no_pod_and_meshctl_reads_it_through_a_port_forward()
-> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    let reviews = reviews(&mut c, 1).await?;
    c.deploy(&idle("outsider", false)).await?;
    c.wait_synced().await?;
    let ctl = c.replica_ip(0)?;
    let closed = [
        "/debug/proxies",
        "/debug/config-errors",
        "/debug/model",
        "/debug/config",
        "/debug/edges",
        "/debug/top",
        "/debug/stat?service=shop/reviews",
        "/debug/authz?service=shop/reviews",
        "/debug/explain?from=shop/client&url=http://reviews:9080/",
        "/debug/",
        "/graph",
    ];
    let mut seen = Vec::new();
    for pod in ["client-0", "outsider-0"] {
        for path in closed {
            let code = c.curl_status(Some(("shop", pod)), &format!("http://{ctl}:15014{path}"));
            assert_eq!(code, 401, "{pod} got {code} from {path}");
        }
        for path in ["/metrics", "/ready", "/live"] {
            let code = c.curl_status(Some(("shop", pod)), &format!("http://{ctl}:15014{path}"));
            assert_eq!(code, 200, "{pod} got {code} from {path}");
        }
        seen.push(pod);
    }
    // The client reaches the mesh all along.
    let body = c.exec_in_pod(
        "shop",
        "client-0",
        &[
            "curl",
            "-sf",
            "--max-time",
            "3",
            &format!("http://{reviews}:9080/"),
        ],
    )?;
    assert!(body.starts_with("reviews v"), "{body}");

    // A reader, through a port-forward to the controller's pod.
    let role = mesh_api::consts::identity::READER_ROLE;
    c.api.insert(
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding", "metadata": {"name": "reader", "namespace": "mesh-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "reader"}]}),
    );
    let as_user = |user: &'static str| {
        let api = c.api.clone();
        async move { anyhow::Ok(meshctl::cluster::Cluster::new(api.http_client(user).await?)) }
    };
    let reader = as_user("reader").await?;
    let ep = meshctl::cmd::status::cluster_controller(&reader, "mesh-system").await?;
    let stat = meshctl::cmd::stat::fetch_stat(&ep, "shop", "reviews").await?;
    assert_eq!(stat["service"], "shop/reviews", "{stat}");
    let authz =
        meshctl::cmd::stat::fetch_service(&ep, "/debug/authz", "policies", "shop", "reviews")
            .await?;
    assert!(authz["ports"].is_array(), "{authz}");
    let admin = as_user(mesh_api::fake_api::rbac::ADMIN).await?;
    let args = meshctl::cmd::check::CheckArgs {
        controller: None,
        ca_admin: None,
        pre: false,
        proxy: false,
        namespace: "mesh-system".into(),
        output: meshctl::cmd::status::Output::Table,
    };
    let checks = meshctl::cmd::check_cluster::run_cluster_checks(&args, &admin).await?;
    let ready = checks.iter().any(|k| {
        k.message.contains(
            "controller is ready at pod mesh-system/mesh-controller-0:15014 (port-forward)",
        )
    });
    let synced = checks
        .iter()
        .filter(|k| k.message.contains("is SYNCED"))
        .count();
    assert!(ready && synced >= 2, "{checks:#?}");
    mesh_e2e::figure(&format!(
        "controller debug API: {} paths 401 to {seen:?} at {ctl}:15014, /metrics /ready /live 200; through a port-forward: stat, authz as a reader, check as an admin ({synced} proxies SYNCED)",
        closed.len()
    ));
    Ok(())
}

/// A client whose proxy looks its destinations up on demand (`--scoped`), among 20 Services of
/// which it has used none: each first request succeeds, and the proxy then holds exactly the
/// Services used; a route change on one of them reaches it, with a backend it never called
/// (its cluster subscribed to by name); an address outside the mesh passes through; and the
/// pod that replaces it is given what its workload used up front.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_proxy_looks_up_each_service_on_its_first_request() -> anyhow::Result<()> {
    netns::require()?;
    const SERVICES: usize = 20;
    let mut c = NetnsCluster::start().await?;
    c.scoped = Some(true);
    let mut vips = Vec::new();
    for i in 0..SERVICES {
        vips.push(c.service(service(&format!("svc-{i}"), &[("app", "reviews")]))?);
    }
    c.service(service(
        "reviews-v2",
        &[("app", "reviews"), ("version", "v2")],
    ))?;
    for v in ["v1", "v2"] {
        c.deploy(&demo("reviews", v, 1)).await?;
    }
    c.deploy(&idle("client", true)).await?;
    c.wait_synced().await?;
    let dump = |c: &NetnsCluster| c.config_dump("shop", "client-0");
    let held = |d: &Value, what: &str| -> Vec<String> {
        d["snapshot"][what]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let by_address = |d: &Value| -> Vec<String> {
        held(d, "listeners")
            .into_iter()
            .filter(|n| mesh_api::consts::xds::parse_address_listener(n).is_some())
            .collect()
    };
    let before = dump(&c)?;
    assert_eq!(
        by_address(&before),
        Vec::<String>::new(),
        "nothing looked up yet"
    );
    // One request at a time, timed by curl itself: the first to each Service, then a second.
    let timed = |c: &NetnsCluster, vip: &str| -> anyhow::Result<(String, f64)> {
        let out = c.exec_in_pod(
            "shop",
            "client-0",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{http_code} %{time_total}",
                &format!("http://{vip}:9080/"),
            ],
        )?;
        let (code, secs) = out.trim().split_once(' ').context("curl -w output")?;
        Ok((code.to_owned(), secs.parse()?))
    };
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for vip in &vips {
        let (code, t) = timed(&c, vip)?;
        assert_eq!(code, "200", "the first request to {vip}");
        first.push(t * 1000.0);
        let (code, t) = timed(&c, vip)?;
        assert_eq!(code, "200", "the second request to {vip}");
        second.push(t * 1000.0);
    }
    let after = dump(&c)?;
    let mut want: Vec<String> = vips.iter().map(|v| format!("{v}_9080")).collect();
    want.sort();
    let mut got = by_address(&after);
    got.sort();
    assert_eq!(got, want, "the proxy holds exactly the Services it used");
    let clusters = held(&after, "clusters");
    assert!(
        !clusters.iter().any(|n| n.contains("reviews-v2")),
        "a Service never used is not held: {clusters:?}"
    );
    // A route on svc-0 to reviews-v2 only: its cluster comes by name, and the split applies.
    route(
        &mut c,
        &mesh_controller::testing::split_yaml("shop", "r0", "svc-0", 9080, &[("reviews-v2", 1)]),
    )
    .await?;
    let r = twenty_requests(&c, "client-0", &format!("http://{}:9080/", vips[0])).await?;
    assert_eq!(count(&r, "reviews v2"), 20, "{r}");
    // An address outside the mesh (a pod's own) passes through after one lookup.
    let pod = c.pod_ip("shop", "reviews-v1-0")?;
    let out = c.exec_in_pod(
        "shop",
        "client-0",
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            &format!("http://{pod}:8080/"),
        ],
    )?;
    assert!(out.contains("reviews v1"), "{out}");
    // The pod is replaced (a restart, a rollout): the new one of the workload holds what the
    // old one used before its first request, and looks none of it up.
    c.delete_pod("shop", "client-0", true)?;
    c.deploy(&idle("client", true)).await?;
    let fresh = dump(&c)?;
    let mut got = by_address(&fresh);
    got.sort();
    assert_eq!(got, want, "the new pod holds what its workload used");
    let mut restarted = Vec::new();
    for vip in &vips {
        let (code, t) = timed(&c, vip)?;
        assert_eq!(code, "200", "the new pod's first request to {vip}");
        restarted.push(t * 1000.0);
    }
    let lookups: f64 = mesh_api::prom::parse(&c.proxy_metrics("shop", "client-0")?)
        .iter()
        .filter(|s| s.name == "mesh_proxy_on_demand_lookups_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(lookups, 0.0, "the new pod looked up nothing");
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    mesh_e2e::figure(&format!(
        "scoped proxy, {SERVICES} Services never used: first request p50 {:.1} ms, p99 {:.1} ms; second p50 {:.1} ms, p99 {:.1} ms; a new pod of the workload, first request p50 {:.1} ms, p99 {:.1} ms, 0 lookups (curl's total, loopback netns, mTLS)",
        pct(&mut first, 0.5),
        pct(&mut first, 0.99),
        pct(&mut second, 0.5),
        pct(&mut second, 0.99),
        pct(&mut restarted, 0.5),
        pct(&mut restarted, 0.99)
    ));
    Ok(())
}

/// `meshctl explain` agrees with mesh-proxy: for each request of a table over header, path,
/// query and method matches, a redirect, a rule that matches nothing, a rewrite, and Allow and
/// Deny policies (on encoded paths too), what the controller explains (the backend, or the status) is what the client's
/// proxy and the server's proxy then do with the same request, five times over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_what_the_proxies_do() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    let reviews_addr = reviews(&mut c, 1).await?;
    let reviews = reviews_addr.as_str();
    let ratings_addr = c.service(service("ratings", &[("app", "ratings")]))?;
    let ratings = ratings_addr.as_str();
    c.deploy(&demo("ratings", "v1", 1)).await?;
    let details_addr = c.service(service("details", &[("app", "details")]))?;
    let details = details_addr.as_str();
    c.deploy(&demo("details", "v1", 1)).await?;
    let routes = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n  rules:\n  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: v, value: '2'}]}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n  - matches: [{path: {type: Exact, value: /old}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]\n  - matches: [{path: {type: PathPrefix, value: /write}, method: POST}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n  - backendRefs: [{name: reviews-v1, port: 9080}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: details, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: details, port: 9080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: details, port: 9080}]\n  - matches: [{path: {type: PathPrefix, value: /legacy}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /admin}}}]\n    backendRefs: [{name: ratings, port: 9080}]\n---\napiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: ratings-readers, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: ratings}]\n  rules: [{from: [{serviceAccounts: [client]}], to: [{methods: [GET]}]}]\n---\napiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  action: Deny\n  targetRefs: [{kind: Namespace, name: shop}]\n  rules: [{to: [{paths: ['/admin', '/admin/*', '/a:b']}]}]\n";
    apply_served(&mut c, "explained", routes).await?;
    // (method, host, path, header): each sent to the host's address.
    let table: [(&str, &str, &str, Option<&str>); 14] = [
        ("GET", reviews, "/", None),
        ("GET", reviews, "/", Some("x-canary: yes")),
        ("GET", reviews, "/api/list?v=2", None),
        ("GET", reviews, "/api/list", None),
        ("GET", reviews, "/old", None),
        ("POST", reviews, "/write", None),
        ("GET", ratings, "/", None),
        ("POST", ratings, "/", None),
        ("GET", ratings, "/admin", None),
        ("GET", details, "/v1/x", None),
        ("GET", details, "/other", None),
        // Authorized on the path as rewritten, decoded where the Deny's characters may be.
        ("GET", details, "/legacy/keys", None),
        ("GET", ratings, "/a%3Ab", None),
        ("GET", ratings, "/admin%2Fkeys", None),
    ];
    let mut agreed = Vec::new();
    for (method, host, path, header) in table {
        let url = format!("http://{host}:9080{path}");
        let args = meshctl::cmd::explain::ExplainArgs {
            from: "shop/client".into(),
            request: vec![method.into(), url.clone()],
            headers: header.map(str::to_string).into_iter().collect(),
            controller: meshctl::cmd::stat::ControllerArgs {
                controller: None,
                mesh_namespace: "mesh-system".into(),
            },
            output: meshctl::cmd::status::Output::Json,
        };
        let query = meshctl::cmd::explain::query(&args)?;
        let e: Value = serde_json::from_str(&c.replica_get(0, 15014, &query)?)
            .with_context(|| format!("explain {method} {url}"))?;
        // What the explanation says the client gets: a body `<app> <version>`, or a status.
        let expected = match e["outcome"].as_str() {
            Some("forward") => {
                let b = &e["backends"][0];
                anyhow::ensure!(
                    e["backends"].as_array().map(Vec::len) == Some(1) && b["share"] == 100.0,
                    "{method} {url}: the table has one backend per request: {e:#}"
                );
                if b["authz"][0]["allowed"] == false {
                    "status 403".to_string()
                } else {
                    let svc = b["service"].as_str().unwrap_or_default();
                    let name = svc.trim_start_matches("shop/");
                    match name.rsplit_once("-v") {
                        Some((app, v)) => format!("{app} v{v}"),
                        None => format!("{name} v1"),
                    }
                }
            }
            _ => match e["outcome"].as_object().and_then(|o| o.values().next()) {
                Some(o) => format!("status {}", o["status"]),
                None => anyhow::bail!("{method} {url}: unexpected outcome: {e:#}"),
            },
        };
        let mut load = vec![
            "--url",
            url.as_str(),
            "--requests",
            "5",
            "--concurrency",
            "1",
            "--method",
            method,
        ];
        if let Some(h) = header {
            load.extend(["--header", h]);
        }
        let r = c.start_load("shop", "client-0", &load)?.finish().await?;
        let got = if r["ok"].as_u64() == Some(5) {
            r["by_body"]
                .as_object()
                .and_then(|b| (b.len() == 1).then(|| b.keys().next().cloned()).flatten())
                .unwrap_or_default()
        } else {
            r["errors"]
                .as_object()
                .and_then(|b| (b.len() == 1).then(|| b.keys().next().cloned()).flatten())
                .unwrap_or_default()
        };
        assert_eq!(
            got, expected,
            "{method} {url} {header:?}: explain said {e:#}, the proxies did {r}"
        );
        agreed.push(format!(
            "{method} {path}{}: {got}",
            header.map(|h| format!(" [{h}]")).unwrap_or_default()
        ));
    }
    mesh_e2e::figure(&format!(
        "meshctl explain agrees with mesh-proxy on {} requests: {}",
        agreed.len(),
        agreed.join("; ")
    ));
    Ok(())
}

/// Run by [`an_interrupted_run_is_swept_by_the_next`] in a child process (with `--ignored` and
/// `MESH_E2E_HOLD` set): builds a cluster and waits to be killed. Run any other way, it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a helper: an_interrupted_run_is_swept_by_the_next runs it in a child and kills it"]
async fn holds_a_cluster_until_killed() -> anyhow::Result<()> {
    anyhow::ensure!(
        std::env::var_os("MESH_E2E_HOLD").is_some(),
        "MESH_E2E_HOLD is not set: an_interrupted_run_is_swept_by_the_next runs this"
    );
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    reviews(&mut c, 1).await?;
    println!("HOLDING");
    tokio::time::sleep(Duration::from_secs(120)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_is_swept_by_the_next() -> anyhow::Result<()> {
    use std::io::BufRead;
    netns::require()?;
    // The child's cluster takes this process's turn.
    let _turn = netns::turn().await;
    // A run killed with SIGKILL cleans nothing up itself.
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "holds_a_cluster_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("MESH_E2E_HOLD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let held = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("HOLDING"));
    assert!(held, "the child never built its cluster");
    let theirs = format!("{}{}-", netns::PREFIX, child.id());
    let spaces: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&theirs))
        .collect();
    assert!(spaces.len() >= 5, "{spaces:?}");
    let pids: Vec<String> = spaces
        .iter()
        .flat_map(|n| {
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", n])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!pids.is_empty(), "the child's pods run nothing");
    child.kill()?;
    child.wait()?;
    netns::sweep();
    let left: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&theirs))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    // Killed processes may take a moment to be reaped by init.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        assert!(Instant::now() < deadline, "processes left: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh_e2e::figure(&format!(
        "interrupted run: {} namespaces and {} processes of a killed run removed by the next run's sweep",
        spaces.len(),
        pids.len()
    ));
    Ok(())
}

/// The edge into a STRICT mesh: the controller gives the Gateway `infra/edge` its Deployment,
/// Service and ServiceAccount (`edge-gateway`); the kubelet runs a pod of that Deployment as
/// written (mesh-proxy serving the Gateway as its own identity). It terminates HTTPS for
/// `shop.example.com` by SNI with the certificate of a Secret, and redirects HTTP to HTTPS with
/// the standard `RequestRedirect` filter; its requests reach `reviews` in the STRICT namespace
/// `shop` (a ReferenceGrant lets the route name it) over mutual TLS as the gateway's identity,
/// which an AuthorizationPolicy lets in while it refuses the mesh's own client. The Gateway's
/// address is its Service's cluster IP (the Gateway asks for a ClusterIP Service); its
/// listeners are on 80 and 443, which the proxy's unprivileged user binds by the pod's sysctl.
/// curl runs on the node, outside every pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_terminates_https_and_reaches_a_strict_backend_as_itself() -> anyhow::Result<()> {
    netns::require()?;
    let mut c = NetnsCluster::start().await?;
    c.label_namespace("shop", &[("mesh.dev/mtls-mode", "STRICT")])?;
    let addr = reviews(&mut c, 1).await?;
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["shop.example.com".to_string()])?.self_signed(&key)?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("shop.pem");
    std::fs::write(&ca, cert.pem())?;
    let manifests = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {annotations: {mesh.dev/service-type: ClusterIP}}\n  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n  - {name: https, port: 443, protocol: HTTPS, hostname: shop.example.com, tls: {certificateRefs: [{name: shop-cert}]}}\n".into(),
        mesh_controller::testing::tls_secret_yaml("infra", "shop-cert", &cert.pem(), &key.serialize_pem()),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: to-https, namespace: infra}\nspec:\n  parentRefs: [{name: edge, sectionName: http}]\n  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {scheme: https, statusCode: 301}}]\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge, sectionName: https}]\n  hostnames: [shop.example.com]\n  rules: [{backendRefs: [{name: reviews, namespace: shop, port: 9080}]}]\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: edge-routes, namespace: shop}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}]\n  to: [{group: '', kind: Service, name: reviews}]\n".into(),
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: edge-only, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: reviews}]\n  rules:\n  - from: [{serviceAccounts: [infra/edge-gateway]}]\n".into(),
    ];
    c.apply("edge", &manifests.join("---\n")).await?;
    c.run_deployment_pod("infra", "edge-gateway", "edge-gateway-0")
        .await?;
    c.wait_pod(
        "infra",
        "edge-gateway-0",
        "Ready",
        Duration::from_secs(60),
        |s| s.ready,
    )
    .await?;
    c.wait_synced().await?;
    // The Lease holder writes the Gateway API's status: the Gateway accepted and programmed
    // (its proxy acknowledged it), the route accepted with its references resolved.
    let admin = c.admin_client();
    let conditions = |kind: &'static str, name: &'static str| {
        let admin = admin.clone();
        async move {
            let o = serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
                "metadata": {"name": name, "namespace": "infra"}});
            let got = admin.get(&o).await.ok().flatten().unwrap_or_default();
            let conds = match kind {
                "Gateway" => got["status"]["conditions"].clone(),
                _ => got["status"]["parents"][0]["conditions"].clone(),
            };
            conds
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{}={}",
                        c["type"].as_str().unwrap_or(""),
                        c["status"].as_str().unwrap_or("")
                    )
                })
                .collect::<Vec<String>>()
        }
    };
    let status = mesh_e2e::eventually(Duration::from_secs(20), "Gateway API status", || async {
        let gateway = conditions("Gateway", "edge").await;
        let route = conditions("HTTPRoute", "shop").await;
        let ok = ["Accepted=True", "Programmed=True"]
            .iter()
            .all(|c| gateway.iter().any(|g| g == c))
            && ["Accepted=True", "ResolvedRefs=True"]
                .iter()
                .all(|c| route.iter().any(|r| r == c));
        ok.then_some((gateway, route))
    })
    .await;
    if let Err(e) = &status {
        anyhow::bail!(
            "{e}: Gateway {:?}, HTTPRoute {:?}\nthe controller's log:\n{}",
            conditions("Gateway", "edge").await,
            conditions("HTTPRoute", "shop").await,
            c.tail("mesh-controller-0")
        );
    }
    let (gateway_status, route_status) = status?;
    // The Gateway's address: its Service's cluster IP, as the API server allocated it.
    let gateway = admin
        .get(
            &serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "edge", "namespace": "infra"}}),
        )
        .await?
        .unwrap_or_default();
    let service = admin
        .get(&serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "edge-gateway", "namespace": "infra"}}))
        .await?
        .unwrap_or_default();
    assert_eq!(
        gateway["status"]["addresses"],
        serde_json::json!([{"type": "IPAddress", "value": service["spec"]["clusterIP"]}]),
        "{gateway}"
    );
    assert_eq!(
        service["spec"]["ports"],
        serde_json::json!([
            {"name": "http-80", "port": 80, "targetPort": 80, "protocol": "TCP"},
            {"name": "https-443", "port": 443, "targetPort": 443, "protocol": "TCP"}
        ])
    );
    let gw = c.kubelet_pod("infra", "edge-gateway-0")?.ip;
    let curl = |url: &str, port: u16| -> anyhow::Result<(String, String)> {
        let resolve = format!("shop.example.com:{port}:{gw}");
        let ca = ca.display().to_string();
        let out = c.from_node(
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                "-w",
                "\n%{http_code} %{http_version} %{redirect_url}",
                url,
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((body.to_string(), last.trim().to_string()))
    };
    // HTTP is redirected to HTTPS; HTTPS (ALPN h2) reaches reviews, every request.
    let (_, redirect) = curl("http://shop.example.com/reviews?id=1", 80)?;
    let mut answered = BTreeMap::<String, u32>::new();
    for _ in 0..20 {
        let (body, last) = curl("https://shop.example.com/", 443)?;
        *answered
            .entry(format!("{last}: {}", body.trim()))
            .or_default() += 1;
    }
    let client = twenty_requests(&c, "client-0", &format!("http://{addr}:9080/")).await?;
    let gateway_id = "spiffe://cluster.local/ns/infra/sa/edge-gateway";
    let reviews_id = "spiffe://cluster.local/ns/shop/sa/reviews";
    let gateway_metrics = c.exec_in_node(&[
        "curl",
        "-sf",
        "--max-time",
        "3",
        &format!("http://{gw}:15020/metrics"),
    ])?;
    let to_reviews: f64 = mesh_api::prom::parse(&gateway_metrics)
        .into_iter()
        .filter(|s| {
            s.name == "mesh_proxy_requests_total"
                && s.label("dst_identity") == reviews_id
                && s.label("status_class") == "2xx"
        })
        .map(|s| s.value)
        .sum();
    let servers = format!(
        "{}{}",
        c.proxy_metrics("shop", "reviews-v1-0")?,
        c.proxy_metrics("shop", "reviews-v2-0")?
    );
    let from_gateway = mesh_api::prom::count(
        &servers,
        &format!("mesh_proxy_inbound_mtls_connections_total{{peer=\"{gateway_id}\"}}"),
    );
    mesh_e2e::figure(&format!(
        "gateway into STRICT: Gateway {gateway_status:?}, HTTPRoute {route_status:?}; HTTP -> {redirect}; HTTPS from the node {answered:?}; the gateway's proxy counted {to_reviews} 2xx to {reviews_id}; reviews saw {from_gateway} mTLS connections from {gateway_id}; the meshed client got {} of 20 refused ({:?})",
        client["failed"], client["errors"]
    ));
    assert_eq!(redirect, "301 1.1 https://shop.example.com/reviews?id=1");
    let ok: u32 = answered
        .iter()
        .filter(|(k, _)| k.starts_with("200 2: reviews v"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(ok, 20, "{answered:?}");
    assert!(
        to_reviews >= 20.0,
        "the gateway sent {to_reviews} to {reviews_id} over mTLS"
    );
    assert!(
        from_gateway >= 1,
        "reviews saw no mTLS connection from {gateway_id}"
    );
    assert_eq!(client["failed"], 20, "{client}");
    assert_eq!(client["errors"]["status 403"], 20, "{client}");
    Ok(())
}
