//! Every protocol mesh-proxy carries, through a client pod's outbound listener and a server
//! pod's inbound listener, driven by clients no one here wrote: curl, h2load, Python grpcio and
//! Python websockets.

use anyhow::Context as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mesh_e2e::h2;
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

/// An HTTP/2 app that answers every request at once, without reading its body (so its h2
/// server resets each request stream once the answer is out).
async fn early_answering_h2_app() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"early"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    Ok(addr)
}

async fn write_frame(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    (kind, flags, stream, payload): h2::Frame,
) -> std::io::Result<()> {
    w.write_all(&h2::frame(kind, flags, stream, &payload)).await
}

/// A POST's header block in HPACK literals (no indexing, no Huffman).
fn post_headers(authority: &str, path: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
    ] {
        block.push(0);
        for s in [name, value] {
            block.push(u8::try_from(s.len()).expect("short"));
            block.extend_from_slice(s.as_bytes());
        }
    }
    block
}

/// Sends `batches` x `per_batch` POSTs over one raw HTTP/2 connection to `addr`, each body
/// only after every answer of its batch is in; fails on a GOAWAY, on an answer other than
/// `200`, or when one more request on the connection is not answered.
async fn early_answered_bodies(
    addr: std::net::SocketAddr,
    batches: u32,
    per_batch: u32,
) -> anyhow::Result<()> {
    const END_STREAM: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    let goaway = |answered: u32, payload: &[u8]| {
        anyhow::anyhow!(
            "{addr}: GOAWAY after {answered} answers: {:?}",
            String::from_utf8_lossy(payload.get(8..).unwrap_or_default())
        )
    };
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(h2::PREFACE).await?;
    write_frame(&mut tcp, (0x4, 0, 0, Vec::new())).await?;
    let (mut rx, mut tx) = tcp.into_split();
    let mut answered = 0;
    for batch in 0..batches {
        let streams: Vec<u32> = (0..per_batch)
            .map(|i| (batch * per_batch + i) * 2 + 1)
            .collect();
        for &id in &streams {
            let block = post_headers("echo", "/upload");
            write_frame(&mut tx, (0x1, END_HEADERS, id, block)).await?;
        }
        let mut open: std::collections::HashSet<u32> = streams.iter().copied().collect();
        let mut heads = std::collections::HashSet::new();
        // Streams answered other than `200`, with their bodies.
        let mut failed = std::collections::BTreeMap::new();
        // One deadline for the batch: frames that keep coming (pings) do not extend it.
        let deadline = tokio::time::Instant::now() + T;
        while !open.is_empty() {
            let Ok(frame) = tokio::time::timeout_at(deadline, h2::read_frame(&mut rx)).await else {
                let mut open: Vec<u32> = open.into_iter().collect();
                open.sort_unstable();
                let headed = open.iter().filter(|id| heads.contains(*id)).count();
                anyhow::bail!(
                    "{addr}: batch {batch}: streams {open:?} not ended after {T:?} \
                     ({headed} of them answered with headers)"
                );
            };
            let (kind, flags, id, payload) = frame?;
            // `:status: 200` is the static table's entry 8.
            if kind == 0x1
                && open.contains(&id)
                && heads.insert(id)
                && payload.first() != Some(&0x88)
            {
                failed.insert(id, Vec::new());
            }
            if kind == 0x0
                && let Some(body) = failed.get_mut(&id)
            {
                body.extend_from_slice(&payload);
            }
            match kind {
                0x0 | 0x1 if flags & END_STREAM != 0 => {
                    anyhow::ensure!(open.remove(&id), "{addr}: stream {id} ended twice");
                    answered += 1;
                }
                0x4 if flags & 0x1 == 0 => {
                    write_frame(&mut tx, (0x4, 0x1, 0, Vec::new())).await?;
                }
                0x6 if flags & 0x1 == 0 => write_frame(&mut tx, (0x6, 0x1, 0, payload)).await?,
                0x7 => return Err(goaway(answered, &payload)),
                // A stream reset before its answer ended (after it, a sidecar may reset one
                // whose body it stopped waiting for).
                0x3 if open.contains(&id) => {
                    let code = payload
                        .get(..4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    anyhow::bail!(
                        "{addr}: batch {batch}: stream {id} reset before its answer ended, \
                         code {code:?} ({} streams of the batch still open)",
                        open.len()
                    );
                }
                _ => {}
            }
        }
        if let Some((id, body)) = failed.first_key_value() {
            anyhow::bail!(
                "{addr}: batch {batch}: {} streams not answered 200, stream {id} with {:?}",
                failed.len(),
                String::from_utf8_lossy(body)
            );
        }
        // A moment for a sidecar that resets such streams to have done so (well within the
        // time the sidecars linger for frames), then the bodies.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for &id in &streams {
            write_frame(&mut tx, (0x0, END_STREAM, id, b"late body".to_vec())).await?;
        }
    }
    anyhow::ensure!(
        answered == batches * per_batch,
        "{addr}: {answered} answered"
    );
    // The connection is still up: one more request is answered on it.
    let last = batches * per_batch * 2 + 1;
    write_frame(
        &mut tx,
        (
            0x1,
            END_HEADERS | END_STREAM,
            last,
            post_headers("echo", "/"),
        ),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (kind, flags, id, payload) =
            tokio::time::timeout_at(deadline, h2::read_frame(&mut rx)).await??;
        if kind == 0x7 {
            return Err(goaway(answered, &payload));
        }
        if id == last && matches!(kind, 0x0 | 0x1) && flags & END_STREAM != 0 {
            return Ok(());
        }
    }
}

/// Requests answered before their bodies arrive: the app answers at once, and the client sends
/// each body only after its answer, as a client whose body frames were in flight does. A
/// sidecar that reset such streams at once would soon forget them, and h2 counts frames for
/// forgotten streams as the client's protocol errors, closing the connection after 1,024 of
/// them (`ENHANCE_YOUR_CALM`) and failing every request on it. The client is raw HTTP/2
/// frames, so that it sends the bodies whatever a sidecar says: 1,800 requests in batches of
/// 90 (more reset streams at once than h2 remembers) straight to the server sidecar's inbound
/// listener (as the client's sidecar connects to it), then through the client's sidecar, must
/// all be answered `200` with no GOAWAY, and each connection must carry one more request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answered_http2_bodies_do_not_close_a_sidecars_connections() -> anyhow::Result<()> {
    let app = early_answering_h2_app().await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh
        .sidecar_pair("http", Some("kubernetes.io/h2c"), app.port())
        .await?;
    let inbound = pair.server.inbound_addr.expect("inbound listener");
    early_answered_bodies(inbound, 20, 90)
        .await
        .context("straight to the server's sidecar")?;
    early_answered_bodies(pair.outbound, 20, 90)
        .await
        .context("through the client's sidecar")?;
    Ok(())
}

/// Connections an app has accepted and closed.
#[derive(Default)]
struct Connections {
    accepted: AtomicUsize,
    closed: AtomicUsize,
}

/// An HTTP/1.1 app that answers one request per connection as if it would keep it open (no
/// `Connection: close`), then closes it a moment later, as an app closes idle keep-alive
/// connections.
async fn closing_app() -> anyhow::Result<(std::net::SocketAddr, Arc<Connections>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counts = Arc::new(Connections::default());
    let seen = counts.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            seen.accepted.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(tcp);
                seen.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, counts))
}

/// The server's sidecar keeps its connection to the app for the next request, and the app
/// closes it while it sits idle: the next request goes on a new connection (whether the pool
/// has noticed the close, or the request finds it closed before anything is sent). Every
/// request is answered, each on a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_app_closed_is_not_a_failed_request() -> anyhow::Result<()> {
    let (app, counts) = closing_app().await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.port()).await?;
    let mut client = mesh_e2e::ProxyClient::new(pair.outbound);
    for i in 1..=20 {
        let (status, body) = client.get("echo", "/", &[]).await?;
        assert_eq!((status, body.as_str()), (200, "ok"), "request {i}");
        assert_eq!(counts.accepted.load(Ordering::SeqCst), i, "request {i}");
        eventually(T, "the app closing its connection", || async {
            (counts.closed.load(Ordering::SeqCst) >= i).then_some(())
        })
        .await?;
    }
    Ok(())
}
