//! The controller's view of the traffic: edges and top from the proxies' metrics, and the
//! service graph page rendered by headless Chromium.

use std::collections::BTreeSet;
use std::time::Duration;

use mesh_e2e::mesh::{LocalMesh, PairOptions};
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, eventually, http_get, system_peer};

/// Runs headless Chromium on `url` with `args`; returns its stdout.
async fn chromium(args: &[&str], url: &str) -> anyhow::Result<String> {
    let Some(bin) = system_peer("chromium") else {
        anyhow::bail!("chromium not found")
    };
    let profile = tempfile::tempdir()?;
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .args([
                "--headless",
                // The tests run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                &format!("--user-data-dir={}", profile.path().display()),
            ])
            .args(args)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The values of `attr` on the elements whose `class` starts with `class`.
fn attrs(dom: &str, class: &str, attr: &str) -> BTreeSet<String> {
    dom.split('<')
        .filter(|tag| tag.contains(&format!("class=\"{class}")))
        .filter_map(|tag| {
            let at = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
            let end = tag[at..].find('"')? + at;
            Some(tag[at..end].replace("&amp;", "&"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_top_and_the_graph_page_in_chromium() -> anyhow::Result<()> {
    if system_peer("chromium").is_none() {
        return Ok(());
    }
    let app = EchoServer::start("echo").await?;
    let mesh = LocalMesh::start_with(|c| {
        c.stats_interval = Duration::from_millis(200);
        c.stats_window = Duration::from_secs(10);
    })
    .await?;
    let pair = mesh
        .sidecar_pair_with(PairOptions {
            port_name: "http",
            app_port: app.addr.port(),
            ..Default::default()
        })
        .await?;
    let admin = mesh.controller.admin_addr;
    // Counted from the first scrape of each proxy on.
    eventually(Duration::from_secs(10), "both proxies scraped", || async {
        let (_, body) = http_get(admin, "/debug/edges").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["proxies_scraped"] == 2).then_some(())
    })
    .await?;
    // The client's traffic through both proxies, and a caller outside the mesh straight to
    // the server's proxy.
    let mut client = ProxyClient::new(pair.outbound);
    let mut outsider = ProxyClient::new(pair.server.inbound_addr.expect("inbound listener"));
    for _ in 0..20 {
        assert_eq!(client.get("echo", "/", &[]).await?.0, 200);
    }
    for _ in 0..5 {
        assert_eq!(outsider.get("echo", "/", &[]).await?.0, 200);
    }
    let pairs = |v: &serde_json::Value| -> BTreeSet<(String, String)> {
        v["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let w = |s: &serde_json::Value| {
                    format!(
                        "{}/{}",
                        s["namespace"].as_str().unwrap_or(""),
                        s["workload"].as_str().unwrap_or("")
                    )
                };
                (w(&e["src"]), w(&e["dst"]))
            })
            .collect()
    };
    let want: BTreeSet<(String, String)> = [
        ("default/client", "default/echo"),
        ("unknown/unknown", "default/echo"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let edges = eventually(
        Duration::from_secs(10),
        "both edges at /debug/edges",
        || async {
            let (_, body) = http_get(admin, "/debug/edges").await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (pairs(&v) == want).then_some(v)
        },
    )
    .await?;
    let client_edge = edges["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["src"]["workload"] == "client")
        .expect("client edge");
    assert_eq!(client_edge["requests"], 20.0, "{edges}");
    assert_eq!(client_edge["success_rate"], 1.0);
    assert!(
        client_edge["p99_ms"].as_f64().is_some_and(|p| p > 0.0),
        "{edges}"
    );
    let (_, top) = http_get(admin, "/debug/top").await.expect("top");
    let top: serde_json::Value = serde_json::from_str(&top)?;
    assert_eq!(top["workloads"][0]["workload"], "echo", "{top}");
    assert_eq!(top["workloads"][0]["requests"], 25.0, "{top}");
    let (code, body) = http_get(admin, "/debug/stat?service=default")
        .await
        .expect("stat");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"default\""), "{body}");
    let (code, _) = http_get(admin, "/debug/stat?service=default/nope")
        .await
        .expect("stat");
    assert_eq!(code, 404);
    // One Service of the model, with the revision it is from (what `route split --wait` reads).
    let (code, body) = http_get(admin, "/debug/service?service=default/echo")
        .await
        .expect("service");
    assert_eq!(code, 200, "{body}");
    let svc: serde_json::Value = serde_json::from_str(&body)?;
    assert!(svc["revision"].as_u64().is_some_and(|r| r > 0), "{svc}");
    assert_eq!(svc["service"]["key"], "default/echo", "{svc}");
    assert!(svc["service"]["ports"][0]["routes"].is_array(), "{svc}");
    let (code, _) = http_get(admin, "/debug/service?service=default")
        .await
        .expect("service");
    assert_eq!(code, 400);
    let (code, body) = http_get(admin, "/debug/service?service=default/nope")
        .await
        .expect("service");
    assert_eq!(code, 404);
    assert!(
        body.contains("is not in the mesh's configuration"),
        "{body}"
    );

    // The page: a node per workload, an edge per caller pair, once its script has run.
    let url = format!("http://{admin}/graph?refresh=500");
    let dom = chromium(&["--virtual-time-budget=5000", "--dump-dom"], &url).await?;
    let nodes = attrs(&dom, "node", "data-id");
    assert_eq!(
        nodes,
        ["default/client", "default/echo", "unknown/unknown"]
            .map(String::from)
            .into(),
        "{dom}"
    );
    let sources = attrs(&dom, "edge", "data-src");
    let targets = attrs(&dom, "edge", "data-dst");
    assert_eq!(
        sources,
        ["default/client", "unknown/unknown"]
            .map(String::from)
            .into()
    );
    assert_eq!(targets, ["default/echo".to_string()].into());
    assert!(dom.contains("rps · 100.0 %"), "edge labels: {dom}");
    assert!(dom.contains("3 workloads, 2 edges"), "{dom}");

    let shot = mesh_e2e::target_dir().join("service-graph.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            "--virtual-time-budget=5000",
            "--window-size=900,500",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    )
    .await?;
    let png = std::fs::read(&shot)?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // A blank page compresses to almost nothing; three boxes, arrows and text do not.
    assert!(png.len() > 10_000, "screenshot is {} bytes", png.len());
    mesh_e2e::figure(&format!(
        "service graph: 3 nodes and 2 edges rendered by headless Chromium; screenshot {} ({} bytes)",
        shot.display(),
        png.len()
    ));
    Ok(())
}
