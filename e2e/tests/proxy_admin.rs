//! mesh-proxy's admin and metrics servers, and draining.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_e2e::mesh::LocalMesh;
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, http_get};
use mesh_proxy::Proxy;
use mesh_proxy::admin::LogControl;

async fn post(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-w",
            "\n%{http_code}",
            &format!("http://{addr}{path}"),
        ])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    Ok((code.parse()?, body.to_string()))
}

async fn mesh_with_app(app: &EchoServer) -> anyhow::Result<LocalMesh> {
    let mesh = LocalMesh::start().await?;
    mesh.write(
        "app.yaml",
        &[
            service_yaml("default", "app", "10.96.3.1", &[("http", 8080)]),
            slice_yaml("default", "app", "http", app.addr.port(), &["127.0.0.1"]),
        ]
        .join("---\n"),
    )?;
    Ok(mesh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_metrics_endpoints() -> anyhow::Result<()> {
    let app = EchoServer::start("app").await?;
    let mesh = mesh_with_app(&app).await?;
    let filter = Arc::new(Mutex::new(String::new()));
    let seen = filter.clone();
    let log = Arc::new(LogControl::new("info", move |f: &str| {
        if f.contains("!!") {
            return Err("invalid filter".into());
        }
        *seen.lock().map_err(|e| e.to_string())? = f.to_string();
        Ok(())
    }));
    let proxy = Proxy::start(mesh.proxy_config("default/web-1"), Some(log)).await?;
    tokio::time::timeout(Duration::from_secs(10), proxy.store.ready()).await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("listener"));
    // Wait for the app's route, then send one request so the request metrics exist.
    let mut answered = false;
    for _ in 0..200 {
        if let Ok((200, _)) = client.get("app:8080", "/", &[]).await {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered, "the app never answered through the proxy");

    for addr in [proxy.admin_addr, proxy.metrics_addr] {
        assert_eq!(http_get(addr, "/ready").await.map(|r| r.0), Some(200));
        assert_eq!(http_get(addr, "/live").await.map(|r| r.0), Some(200));
        let (code, metrics) = http_get(addr, "/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("mesh_proxy_xds_connected 1"), "{metrics}");
        assert!(
            metrics.contains(r#"mesh_proxy_requests_total{direction="outbound",src_namespace="default",src_workload="web-1",src_identity="unknown",dst_namespace="unknown",dst_workload="unknown",dst_identity="unknown",route="default",backend="outbound|8080||app.default.svc.cluster.local",status_class="2xx",grpc_status=""} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("mesh_proxy_request_duration_seconds_bucket"),
            "{metrics}"
        );
    }
    // Only the admin server has the rest.
    assert_eq!(
        http_get(proxy.metrics_addr, "/config_dump")
            .await
            .map(|r| r.0),
        Some(404)
    );

    let (code, dump) = http_get(proxy.admin_addr, "/config_dump")
        .await
        .expect("dump");
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    assert_eq!(dump["config"]["node"], "default/web-1");
    assert!(
        dump["snapshot"]["listeners"]["outbound_http"].is_object(),
        "{dump}"
    );
    let cluster = &dump["snapshot"]["clusters"]["outbound|8080||app.default.svc.cluster.local"];
    assert_eq!(
        cluster["endpoints"][0]["addr"],
        app.addr.to_string(),
        "{cluster}"
    );
    assert!(
        dump["xds"]["types"]["LDS"]["acks"].as_u64() >= Some(1),
        "{dump}"
    );

    assert_eq!(
        http_get(proxy.admin_addr, "/logging").await,
        Some((200, "info\n".into()))
    );
    let (code, _) = post(proxy.admin_addr, "/logging?level=mesh_proxy=debug").await?;
    assert_eq!(code, 200);
    assert_eq!(*filter.lock().expect("lock"), "mesh_proxy=debug");
    let (code, body) = post(proxy.admin_addr, "/logging?level=!!").await?;
    assert_eq!(code, 400);
    assert!(body.contains("\"!!\""), "{body}");
    let (code, _) = post(proxy.admin_addr, "/logging").await?;
    assert_eq!(code, 400);

    let (code, _) = post(proxy.admin_addr, "/shutdown").await?;
    assert_eq!(code, 200);
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown_requested()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_without_a_control_plane() -> anyhow::Result<()> {
    // Nothing listens there: the proxy starts, serves its admin, and is not ready.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], mesh_e2e::free_port()));
    let proxy = Proxy::start(mesh_proxy::Config::local(dead, "default/web-1"), None).await?;
    assert_eq!(
        http_get(proxy.admin_addr, "/ready").await.map(|r| r.0),
        Some(503)
    );
    assert_eq!(
        http_get(proxy.admin_addr, "/live").await.map(|r| r.0),
        Some(200)
    );
    let (_, dump) = http_get(proxy.admin_addr, "/config_dump")
        .await
        .expect("dump");
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    assert!(dump["snapshot"].is_null());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_requests_in_flight_finish_and_refuses_new_connections() -> anyhow::Result<()> {
    let app = EchoServer::start("app").await?;
    app.set_delay(Duration::from_millis(600));
    let mesh = mesh_with_app(&app).await?;
    let mut cfg = mesh.proxy_config("default/web-1");
    cfg.drain_deadline = Duration::from_secs(5);
    let proxy = Arc::new(mesh.proxy(cfg).await?);
    let listener = proxy.outbound_http_addr.expect("listener");
    let mut warm = ProxyClient::new(listener);
    let mut ok = false;
    for _ in 0..200 {
        if let Ok((200, _)) = warm.get("app:8080", "/", &[]).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok);

    let in_flight = tokio::spawn(async move {
        let mut c = ProxyClient::new(listener);
        c.get("app:8080", "/slow", &[]).await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let p = proxy.clone();
    let drained = tokio::spawn(async move { p.drain().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Draining: no new connections are served.
    let mut late = ProxyClient::new(listener);
    assert!(
        late.get("app:8080", "/", &[]).await.is_err(),
        "a new connection was served while draining"
    );
    // The request in flight completes.
    let (status, body) = in_flight.await??;
    assert_eq!((status, body.as_str()), (200, "app"));
    drop(warm);
    assert!(
        drained.await?,
        "connections were still open at the deadline"
    );
    Ok(())
}
