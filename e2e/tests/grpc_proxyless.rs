//! A proxyless gRPC client (Python grpcio, `xds:///` target) reads the controller's xDS
//! directly: LDS (API listener) -> RDS -> CDS -> EDS, and follows a GRPCRoute.

use std::time::Duration;

use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_e2e::{Peer, eventually, free_port, peer, workspace_root};
use meshctl::cmd::bootstrap::{GrpcArgs, grpc};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn echo_server(
    python: &std::path::Path,
    name: &str,
    dir: &std::path::Path,
) -> anyhow::Result<(Peer, u16)> {
    let port = free_port();
    let script = workspace_root().join("e2e/grpc/echo_server.py");
    let peer = Peer::spawn(
        Command::new(python)
            .arg(&script)
            .arg(port.to_string())
            .arg(name),
        dir.join(format!("{name}.log")),
    )?;
    eventually(
        Duration::from_secs(20),
        "the gRPC server to start",
        || async { peer.log_text().contains("ready").then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}", peer.log_text()))?;
    let _ = peer.child.id();
    Ok((peer, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_client_reaches_backends_through_xds() -> anyhow::Result<()> {
    let Some(python) = peer("MESH_PYTHON", "python") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (_v1, p1) = echo_server(&python, "echo-v1", dir.path()).await?;
    let (_v2, p2) = echo_server(&python, "echo-v2", dir.path()).await?;

    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    let grpc_port = [("grpc", 7070)];
    std::fs::write(
        cfg.join("echo.yaml"),
        [
            service_yaml("default", "echo", "10.96.0.20", &grpc_port),
            service_yaml("default", "echo-v1", "10.96.0.21", &grpc_port),
            service_yaml("default", "echo-v2", "10.96.0.22", &grpc_port),
            slice_yaml("default", "echo-v1", "grpc", p1, &["127.0.0.1"]),
            slice_yaml("default", "echo-v2", "grpc", p2, &["127.0.0.1"]),
            "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 7070}]
  rules:
  - matches: [{method: {service: mesh.e2e.Echo, method: Canary}}]
    backendRefs: [{name: echo-v2, port: 7070}]
  - backendRefs: [{name: echo-v1, port: 7070}]
"
            .to_string(),
        ]
        .join("---\n"),
    )?;
    let ctl = Controller::start(Config::local(&cfg)).await?;
    let bootstrap = dir.path().join("grpc-bootstrap.json");
    let doc = grpc(&GrpcArgs {
        node: "default/grpc-client".into(),
        xds: ctl.xds_addr.to_string(),
    })?;
    std::fs::write(&bootstrap, serde_json::to_string(&doc)?)?;

    let client = workspace_root().join("e2e/grpc/xds_client.py");
    let target = "xds:///echo.default.svc.cluster.local:7070";
    let call = |method: &'static str| {
        let mut cmd = Command::new(&python);
        cmd.arg(&client)
            .args([target, method, "5"])
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap);
        cmd
    };
    for (method, want) in [
        ("/mesh.e2e.Echo/Say", "echo-v1 /mesh.e2e.Echo/Say"),
        ("/mesh.e2e.Echo/Canary", "echo-v2 /mesh.e2e.Echo/Canary"),
    ] {
        let out = tokio::time::timeout(Duration::from_secs(60), call(method).output()).await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client failed for {method}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines, vec![want; 5], "{method}");
    }
    // The client really spoke xDS to us and acknowledged every type.
    let node_seen = ctl.hub.metrics.encode();
    assert!(
        node_seen.contains("mesh_controller_xds_pushes_total{xds_type=\"LDS\"}"),
        "{node_seen}"
    );
    let _ = BufReader::new(tokio::io::empty()).lines();
    Ok(())
}
