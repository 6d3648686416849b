//! Every protocol mesh-proxy carries, through a client pod's outbound listener and a server
//! pod's inbound listener, driven by clients no one here wrote: curl, h2load, Python grpcio and
//! Python websockets.

use std::time::Duration;

use mesh_e2e::mesh::LocalMesh;
use mesh_e2e::servers::{EchoServer, greeting_server, tcp_echo_after_eof};
use mesh_e2e::{Peer, eventually, free_port, peer, run_peer, system_peer, workspace_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_chunked_and_continue_with_curl() -> anyhow::Result<()> {
    let Some(curl) = system_peer("curl") else {
        return Ok(());
    };
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    let base = format!("http://{}", pair.outbound);

    // Two requests on one connection.
    let (out, err, ok) = run_peer(
        &curl,
        &[
            "-sS",
            "-v",
            "--http1.1",
            "-H",
            "Host: echo",
            &format!("{base}/a"),
            &format!("{base}/b"),
        ],
        &[],
        T,
    )
    .await?;
    assert!(ok, "{err}");
    assert_eq!(out, "echo-appecho-app");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing connection"),
        "{err}"
    );
    assert!(err.contains("x-seen-version: HTTP/1.1"), "{err}");
    assert!(err.contains("x-seen-host: echo"), "{err}");

    // A chunked upload of 100 KiB, and one behind `Expect: 100-continue`.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("body");
    let body: String = (0..100 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    std::fs::write(&file, &body)?;
    let data = format!("@{}", file.display());
    for extra in [
        ["-H", "Transfer-Encoding: chunked"],
        ["-H", "Expect: 100-continue"],
    ] {
        let mut args = vec!["-sS", "-v", "--http1.1", "--data-binary", &data];
        args.extend(extra);
        let url = format!("{base}/upload");
        args.push(&url);
        let (out, err, ok) = run_peer(&curl, &args, &[], T).await?;
        assert!(ok, "{err}");
        assert_eq!(out.len(), body.len(), "{extra:?}: {err}");
        assert!(out == body, "{extra:?}: body changed on the way");
        if extra[1].starts_with("Expect") {
            assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
        }
    }
    assert!(app.hits() >= 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_detected_on_an_undeclared_port_with_curl_and_h2load() -> anyhow::Result<()> {
    let (Some(curl), Some(h2load)) = (system_peer("curl"), system_peer("h2load")) else {
        return Ok(());
    };
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    // The port's name declares nothing, so the proxy detects the protocol.
    let pair = mesh.sidecar_pair("web", None, app.addr.port()).await?;
    let url = format!("http://{}/h2", pair.outbound);
    let (out, err, ok) = run_peer(
        &curl,
        &["-sS", "-v", "--http2-prior-knowledge", &url],
        &[],
        T,
    )
    .await?;
    assert!(ok, "{err}");
    assert_eq!(out, "echo-app");
    assert!(err.contains("< HTTP/2 200"), "{err}");
    // The server pod's app gets HTTP/2 too: the proxies keep the client's protocol.
    assert!(err.contains("x-seen-version: HTTP/2.0"), "{err}");

    let (out, err, ok) = run_peer(
        &h2load,
        &["-n", "2000", "-c", "4", "-m", "10", &url],
        &[],
        T,
    )
    .await?;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(
            "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"
        ),
        "{out}"
    );
    assert!(out.contains("status codes: 2000 2xx"), "{out}");
    // And HTTP/1.1 on the same port is detected as such.
    let (out, _, ok) = run_peer(&curl, &["-sS", "--http1.1", &url], &[], T).await?;
    assert!(ok && out == "echo-app", "{out}");
    Ok(())
}

async fn python_server(
    script: &str,
    args: &[&str],
    dir: &std::path::Path,
) -> anyhow::Result<Option<Peer>> {
    let Some(python) = peer("MESH_PYTHON", "python") else {
        return Ok(None);
    };
    let peer = Peer::spawn(
        Command::new(python)
            .arg(workspace_root().join(script))
            .args(args),
        dir.join("server.log"),
    )?;
    eventually(
        Duration::from_secs(30),
        "the Python server to start",
        || async { peer.log_text().contains("ready").then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {}", peer.log_text()))?;
    Ok(Some(peer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_with_python_grpcio() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let Some(_server) = python_server(
        "e2e/grpc/echo_server.py",
        &[&port.to_string(), "echo-app"],
        dir.path(),
    )
    .await?
    else {
        return Ok(());
    };
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("grpc", None, port).await?;
    let python = peer("MESH_PYTHON", "python").expect("python found above");
    let (out, err, ok) = run_peer(
        &python,
        &[
            &workspace_root()
                .join("e2e/grpc/stream_client.py")
                .to_string_lossy(),
            &pair.outbound.to_string(),
        ],
        &[],
        T,
    )
    .await?;
    assert!(ok, "{out}{err}");
    let want = "unary: echo-app /mesh.e2e.Echo/Say
server-stream: echo-app s 0
server-stream: echo-app s 1
server-stream: echo-app s 2
client-stream: echo-app a+b+c
bidi: echo-app x
bidi: echo-app y
error: NOT_FOUND
";
    assert_eq!(out, want, "{err}");
    // Each call is counted once its response ends, by the gRPC status of its trailers.
    let metrics = pair.client.metrics.clone();
    let by_status = move || {
        let samples = mesh_api::prom::parse(&metrics.encode());
        let n = |code: &str| -> f64 {
            samples
                .iter()
                .filter(|s| s.name == "mesh_proxy_requests_total" && s.label("grpc_status") == code)
                .map(|s| s.value)
                .sum()
        };
        (n("0"), n("5"))
    };
    let counts = eventually(T, "the calls counted by gRPC status", || {
        let c = by_status();
        async move { (c == (4.0, 1.0)).then_some(c) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:?}", by_status()))?;
    assert_eq!(counts, (4.0, 1.0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_with_python_websockets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    let Some(_server) = python_server(
        "e2e/ws/ws_echo.py",
        &["serve", &port.to_string()],
        dir.path(),
    )
    .await?
    else {
        return Ok(());
    };
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, port).await?;
    let python = peer("MESH_PYTHON", "python").expect("python found above");
    let (out, err, ok) = run_peer(
        &python,
        &[
            &workspace_root().join("e2e/ws/ws_echo.py").to_string_lossy(),
            "call",
            &format!("ws://{}/chat", pair.outbound),
            "3",
        ],
        &[],
        T,
    )
    .await?;
    assert!(ok, "{out}{err}");
    assert_eq!(
        out, "message 0\nmessage 1\nmessage 2\nb'\\x00\\x01binary'\n",
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_honours_half_close() -> anyhow::Result<()> {
    let (app, _task) = tcp_echo_after_eof("echo:").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("tcp", None, app.port()).await?;
    let mut s = TcpStream::connect(pair.outbound).await?;
    s.write_all(b"hello over tcp").await?;
    // The server answers only after it sees our FIN, which must cross both proxies while
    // the other direction stays open.
    s.shutdown().await?;
    let mut got = String::new();
    tokio::time::timeout(T, s.read_to_string(&mut got)).await??;
    assert_eq!(got, "echo:hello over tcp");
    // Both proxies count the connection and its bytes, each way.
    for proxy in [&pair.client, &pair.server] {
        let metrics = proxy.metrics.clone();
        let read = move || {
            let samples = mesh_api::prom::parse(&metrics.encode());
            let n = |name: &str| -> f64 {
                samples
                    .iter()
                    .filter(|s| s.name == name)
                    .map(|s| s.value)
                    .sum()
            };
            [
                n("mesh_proxy_tcp_connections_opened_total"),
                n("mesh_proxy_tcp_connections_closed_total"),
                n("mesh_proxy_tcp_sent_bytes_total"),
                n("mesh_proxy_tcp_received_bytes_total"),
            ]
        };
        eventually(T, "the TCP connection counted", || {
            let got = read();
            async move { (got == [1.0, 1.0, 14.0, 19.0]).then_some(()) }
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: {:?}", read()))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_on_an_undeclared_port_is_not_stalled() -> anyhow::Result<()> {
    let (app, _task) = greeting_server("220 hello from the server\r\n").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("db", None, app.port()).await?;
    let mut s = TcpStream::connect(pair.outbound).await?;
    let mut buf = vec![0u8; 64];
    // Detection gives up after its short timeout (100 ms by default) on each proxy: the
    // greeting arrives well within two seconds, never after many.
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"220 hello from the server\r\n");
    s.write_all(b"PING\r\n").await?;
    let n = tokio::time::timeout(T, s.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"PING\r\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_multiplex_http1_traffic_over_one_http2_connection() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    app.set_delay(Duration::from_millis(200));
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    // Eight clients at once, each on its own connection, all in flight together.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let addr = pair.outbound;
            tokio::spawn(async move {
                let mut c = mesh_e2e::ProxyClient::new(addr);
                c.get("echo", "/", &[]).await
            })
        })
        .collect();
    for c in calls {
        let (status, body) = c.await??;
        assert_eq!((status, body.as_str()), (200, "echo-app"));
    }
    let text = pair.server.metrics.encode();
    let inbound: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("mesh_proxy_connections_total{listener=\"virtualInbound\""))
        .collect();
    assert_eq!(
        inbound,
        [r#"mesh_proxy_connections_total{listener="virtualInbound",protocol="http"} 1"#],
        "{text}"
    );
    // The app itself still gets HTTP/1.1, one connection per request in flight.
    assert_eq!(app.hits(), 8);
    Ok(())
}
