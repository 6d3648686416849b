//! Release scenarios end to end on the network-namespace cluster: real interception, real
//! processes, mutual TLS. Each prints its measured figures. Root only (CI runs them).

use std::collections::BTreeMap;

use mesh_e2e::netns::{self, App, NetnsCluster, ServiceDef, Workload};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `reviews` (and `reviews-v1`, `reviews-v2`) with two v1 pods and one v2 pod, and a meshed
/// client pod.
async fn reviews(c: &mut NetnsCluster) -> anyhow::Result<std::net::Ipv4Addr> {
    let vip = c.service(ServiceDef {
        namespace: "shop".into(),
        name: "reviews".into(),
        selector: labels(&[("app", "reviews")]),
        port: 9080,
        target_port: 8080,
    })?;
    for v in ["v1", "v2"] {
        c.service(ServiceDef {
            namespace: "shop".into(),
            name: format!("reviews-{v}"),
            selector: labels(&[("app", "reviews"), ("version", v)]),
            port: 9080,
            target_port: 8080,
        })?;
        c.deploy(&Workload {
            namespace: "shop".into(),
            name: format!("reviews-{v}"),
            service_account: "reviews".into(),
            labels: labels(&[("app", "reviews"), ("version", v)]),
            replicas: if v == "v1" { 2 } else { 1 },
            meshed: true,
            app: App::Demo {
                name: "reviews".into(),
                version: v.into(),
            },
        })
        .await?;
    }
    c.deploy(&Workload {
        namespace: "shop".into(),
        name: "client".into(),
        service_account: "client".into(),
        labels: labels(&[("app", "client")]),
        replicas: 1,
        meshed: true,
        app: App::Idle,
    })
    .await?;
    Ok(vip)
}

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews, port: 9080}}]
  rules:
  - backendRefs:
    - {{name: reviews-v1, port: 9080, weight: {v1}}}
    - {{name: reviews-v2, port: 9080, weight: {v2}}}
"
    )
}

fn count(report: &serde_json::Value, body: &str) -> u64 {
    report["by_body"][body].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_90_10_is_measured_within_3_points() -> anyhow::Result<()> {
    if !netns::can_run() {
        return Ok(());
    }
    let mut c = NetnsCluster::start().await?;
    let vip = reviews(&mut c).await?;
    c.apply("route", &split(90, 10))?;
    c.wait_synced().await?;
    let url = format!("http://{vip}:9080/");
    let r = c
        .load(
            "shop",
            "client-0",
            &["--url", &url, "--requests", "2000", "--concurrency", "8"],
        )
        .await?;
    let (v1, v2) = (count(&r, "reviews v1"), count(&r, "reviews v2"));
    let share = 100.0 * v2 as f64 / (v1 + v2).max(1) as f64;
    eprintln!(
        "canary 90/10: {} requests, {} failed, v1 {v1}, v2 {v2}: v2 share {share:.1} % in {} ms",
        r["sent"], r["failed"], r["elapsed_ms"]
    );
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(v1 + v2, 2000, "{r}");
    assert!((7.0..=13.0).contains(&share), "v2 got {share:.1} %: {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cluster_leaves_no_namespace_rule_or_process() -> anyhow::Result<()> {
    if !netns::can_run() {
        return Ok(());
    }
    let mine = format!("{}{}-", netns::PREFIX, std::process::id());
    {
        let mut c = NetnsCluster::start().await?;
        reviews(&mut c).await?;
        assert!(netns::namespaces().iter().any(|n| n.starts_with(&mine)));
    }
    let left: Vec<String> = netns::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&mine))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    // The interception rules lived in the pods' namespaces: the host's table has none.
    let host = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()?;
    let host = String::from_utf8_lossy(&host.stdout);
    assert!(!host.contains("MESH_"), "{host}");
    // No process of ours runs in a namespace that is gone: `ip netns pids` found nothing to
    // kill that survived, and the binaries' processes are children we waited for.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "ppid,args"])
        .output()?;
    let me = std::process::id().to_string();
    let orphans: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with(&me) && l.contains("netns exec"))
        .map(str::to_owned)
        .collect();
    assert!(orphans.is_empty(), "{orphans:?}");
    Ok(())
}
