//! mesh-proxy's default limits, probed with hand-made frames: oversized headers, HTTP/2
//! settings, a rapid-reset flood, and garbage. After each probe the proxy still serves.

use std::time::Duration;

use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_e2e::h2::{PREFACE, frame, read_frame};
use mesh_e2e::mesh::{LocalMesh, wait_config};
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, figure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    _app: EchoServer,
    _mesh: LocalMesh,
    proxy: mesh_proxy::Proxy,
    addr: std::net::SocketAddr,
}

async fn setup() -> anyhow::Result<Setup> {
    setup_with(|_| {}).await
}

/// The setup, with the proxy's config changed by `tweak`.
async fn setup_with(tweak: impl FnOnce(&mut mesh_proxy::Config)) -> anyhow::Result<Setup> {
    let app = EchoServer::start("app").await?;
    let mesh = LocalMesh::start().await?;
    mesh.write(
        "app.yaml",
        &[
            service_yaml("default", "app", "10.96.3.1", &[("http", 80)]),
            slice_yaml("default", "app", "http", app.addr.port(), &["127.0.0.1"]),
        ]
        .join("---\n"),
    )?;
    let mut config = mesh.proxy_config("default/web-1");
    tweak(&mut config);
    let proxy = mesh.proxy(config).await?;
    wait_config(&proxy, "app's endpoints", |s| {
        s.clusters
            .values()
            .any(|c| c.name.contains("app.default") && !c.endpoints.is_empty())
    })
    .await?;
    let addr = proxy.outbound_http_addr.expect("listener");
    Ok(Setup {
        _app: app,
        _mesh: mesh,
        proxy,
        addr,
    })
}

async fn still_serves(addr: std::net::SocketAddr) {
    let mut c = ProxyClient::new(addr);
    let r = c
        .get("app", "/", &[])
        .await
        .expect("the proxy still answers");
    assert_eq!(r, (200, "app".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut conn = TcpStream::connect(s.addr).await?;
    let big = "x".repeat(70 * 1024);
    conn.write_all(format!("GET / HTTP/1.1\r\nhost: app\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    still_serves(s.addr).await;
    Ok(())
}

/// Reads frames until one of `kind` arrives (its payload) or the connection ends (`None`).
async fn read_until(conn: &mut TcpStream, kind: u8) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), read_frame(conn)).await? {
            Ok((k, _, _, payload)) if k == kind => return Ok(Some(payload)),
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_advertise_the_limits() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut conn = TcpStream::connect(s.addr).await?;
    conn.write_all(PREFACE).await?;
    conn.write_all(&frame(0x4, 0, 0, &[])).await?;
    let settings = read_until(&mut conn, 0x4).await?.expect("server SETTINGS");
    let params: Vec<(u16, u32)> = settings
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        params.contains(&(0x3, 100)),
        "MAX_CONCURRENT_STREAMS: {params:?}"
    );
    assert!(
        params.contains(&(0x6, 64 * 1024)),
        "MAX_HEADER_LIST_SIZE: {params:?}"
    );
    assert_eq!(s.proxy.shared.config.h2_max_streams, 100);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_ends_the_connection_not_the_proxy() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut conn = TcpStream::connect(s.addr).await?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // GET / with :authority "app": HPACK indexed :method GET, :scheme http, :path /, then
    // :authority as a literal with an indexed name.
    let block = [0x82, 0x86, 0x84, 0x41, 0x03, b'a', b'p', b'p'];
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        out.extend(frame(0x1, 0x5, id, &block));
        out.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    // The server may close while we write; that is the point.
    let _ = conn.write_all(&out).await;
    let goaway = read_until(&mut conn, 0x7).await?;
    if let Some(p) = goaway {
        // ENHANCE_YOUR_CALM (0xb).
        let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        assert_eq!(code, 0xb, "GOAWAY error code");
    }
    still_serves(s.addr).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_closes_connections_past_its_limit() -> anyhow::Result<()> {
    let s = setup_with(|c| c.max_connections = 3).await?;
    let over = || {
        s.proxy
            .shared
            .metrics
            .connections_over_limit
            .get_or_create(&mesh_proxy::metrics::ListenerNameLabels {
                listener: mesh_api::consts::xds::OUTBOUND_HTTP_LISTENER.into(),
            })
            .get()
    };
    // Three idle connections, each waiting for a request: the listener is full.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(s.addr).await?);
    }
    let mut fourth = TcpStream::connect(s.addr).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), fourth.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "the connection past the limit is closed");
    assert_eq!(over(), 1);
    // One held connection goes: a request finds room once the proxy saw it end.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = ProxyClient::new(s.addr).get("app", "/", &[]).await {
            assert_eq!(r, (200, "app".to_string()));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a connection ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(over() >= 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_sheds_new_requests_with_503() -> anyhow::Result<()> {
    // A limit the proxy is over from the start: its first reading of resident memory sheds.
    let s = setup_with(|c| c.memory_limit = 1024 * 1024).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = exchange(
            s.addr,
            "GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n",
        )
        .await?;
        if status == 503 {
            break text;
        }
        assert_eq!(status, 200, "{text}");
        assert!(std::time::Instant::now() < deadline, "never shed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nx-mesh-proxy: overloaded\r\n"),
        "{text}"
    );
    let m = &s.proxy.shared.metrics;
    assert_eq!(m.overload_shedding.get(), 1);
    assert!(m.overload_shed.get() >= 1);
    assert!(m.resident_memory.get() > 1024 * 1024);
    // The process is alive and reports itself ready.
    let (code, _) = mesh_e2e::http_get(s.proxy.metrics_addr, "/ready")
        .await
        .ok_or_else(|| anyhow::anyhow!("no /ready"))?;
    assert_eq!(code, 200);
    Ok(())
}

/// An app that switches every connection to an echo of its bytes after a `101`.
async fn upgrade_echo() -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && matches!(c.read(&mut b).await, Ok(1)) {
                    head.push(b[0]);
                }
                let switch = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
                if c.write_all(switch).await.is_ok() {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    Ok((addr, task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_keeps_its_place_under_the_limit() -> anyhow::Result<()> {
    let (app, _task) = upgrade_echo().await?;
    let mesh = LocalMesh::start().await?;
    let one = |c: &mut mesh_proxy::Config| c.max_connections = 1;
    let pair = mesh
        .sidecar_pair_with(mesh_e2e::mesh::PairOptions {
            port_name: "http",
            app_port: app.port(),
            tweak: Some(&one),
            ..Default::default()
        })
        .await?;
    let mut tunnel = TcpStream::connect(pair.outbound).await?;
    tunnel
        .write_all(
            b"GET /chat HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tunnel.read(&mut buf)).await??;
        anyhow::ensure!(
            n > 0,
            "closed before the 101: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    tunnel.write_all(b"ping").await?;
    let n = tokio::time::timeout(Duration::from_secs(10), tunnel.read(&mut buf)).await??;
    assert_eq!(&buf[..n], b"ping", "the tunnel echoes");
    // The tunnel still holds the client proxy's only place: another connection is closed.
    let mut other = TcpStream::connect(pair.outbound).await?;
    let n = tokio::time::timeout(Duration::from_secs(10), other.read(&mut buf))
        .await?
        .unwrap_or(0);
    assert_eq!(n, 0, "a second connection while the tunnel is open");
    drop(tunnel);
    Ok(())
}

/// The status of an HTTP/2 GET for `/` with `:authority: app` and these `Host` headers.
async fn h2_status_with_hosts(addr: std::net::SocketAddr, hosts: &[&str]) -> anyhow::Result<u8> {
    let mut conn = TcpStream::connect(addr).await?;
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    // Indexed :method GET, :scheme http, :path /; :authority a literal with an indexed name;
    // each `host` a literal with a literal name, not indexed.
    let mut block = vec![0x82, 0x86, 0x84, 0x41, 0x03, b'a', b'p', b'p'];
    for h in hosts {
        block.extend([0x00, 0x04]);
        block.extend(b"host");
        block.push(u8::try_from(h.len())?);
        block.extend(h.as_bytes());
    }
    out.extend(frame(0x1, 0x5, 1, &block));
    conn.write_all(&out).await?;
    let headers = read_until(&mut conn, 0x1).await?.expect("response HEADERS");
    // The server's `:status` is the first field, indexed (RFC 7541, appendix A): 200 is
    // 0x88, 400 is 0x8c.
    Ok(headers[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_reads_the_host_an_absolute_target_was_routed_by() -> anyhow::Result<()> {
    let s = setup().await?;
    let (status, text) = exchange(
        s.addr,
        "GET http://app/x HTTP/1.1\r\nhost: other\r\nconnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("\r\nx-seen-host: app\r\n"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_host_must_name_the_authority() -> anyhow::Result<()> {
    let s = setup().await?;
    assert_eq!(h2_status_with_hosts(s.addr, &[]).await?, 0x88);
    assert_eq!(h2_status_with_hosts(s.addr, &["APP:80"]).await?, 0x88);
    assert_eq!(h2_status_with_hosts(s.addr, &["other"]).await?, 0x8c);
    assert_eq!(h2_status_with_hosts(s.addr, &["app:81"]).await?, 0x8c);
    assert_eq!(h2_status_with_hosts(s.addr, &["app", "other"]).await?, 0x8c);
    still_serves(s.addr).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_takes_the_proxy_down() -> anyhow::Result<()> {
    let s = setup().await?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let prefixes: [&[u8]; 5] = [
        b"",
        b"GET ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03",
        b"POST / HTTP/1.1\r\n",
    ];
    for i in 0..300 {
        let mut bytes = prefixes[i % prefixes.len()].to_vec();
        let n = (next() % 2048) as usize;
        bytes.extend((0..n).map(|_| next() as u8));
        if let Ok(mut c) = TcpStream::connect(s.addr).await {
            let _ = c.write_all(&bytes).await;
            let _ = c.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut sink)).await;
        }
    }
    still_serves(s.addr).await;
    Ok(())
}

/// A request hidden in another's framing. `{id}` is the case's own suffix.
const SMUGGLED: &str = "GET /smuggled-{id} HTTP/1.1\r\nhost: echo\r\n\r\n";

/// One request-smuggling probe: the bytes a client sends, and what a strict proxy does.
struct Probe {
    name: &'static str,
    bytes: String,
    expect: Expect,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// 400, and nothing reaches the app.
    Refused,
    /// 400 for a body whose framing turns out malformed: the request's head may have reached
    /// the app already (a proxy streams bodies), but nothing more.
    BadBody,
    /// Refused, or one request reaches the app.
    RefusedOrOne,
}

/// The corpus: conflicting or malformed framing (`Content-Length` against
/// `Transfer-Encoding`, duplicated or malformed lengths, unknown codings), obs-fold, bare CR
/// and LF, malformed chunks and malformed heads. Each hides [`SMUGGLED`] where a parser that
/// reads the framing another way would find a second request.
fn smuggling_corpus() -> Vec<Probe> {
    let s = SMUGGLED;
    let n = s.len();
    let chunk = format!("{:x}\r\n{s}\r\n0\r\n\r\n", n);
    let post = "POST /case-{id} HTTP/1.1\r\nhost: echo\r\n";
    let refuse = |name, bytes: String| Probe {
        name,
        bytes,
        expect: Expect::Refused,
    };
    let bad_body = |name, bytes: String| Probe {
        name,
        bytes,
        expect: Expect::BadBody,
    };
    let either = |name, bytes: String| Probe {
        name,
        bytes,
        expect: Expect::RefusedOrOne,
    };
    vec![
        // Content-Length against Transfer-Encoding.
        either(
            "CL.TE",
            format!(
                "{post}content-length: {}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{s}",
                5 + n
            ),
        ),
        either(
            "TE.CL",
            format!("{post}transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n{chunk}"),
        ),
        either(
            "TE.CL, TE first",
            format!("{post}transfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n{chunk}"),
        ),
        refuse(
            "CL.TE, coding not chunked",
            format!("{post}content-length: 0\r\ntransfer-encoding: identity\r\n\r\n{s}"),
        ),
        refuse(
            "TE.TE, chunked then identity",
            format!(
                "{post}transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n{chunk}"
            ),
        ),
        refuse(
            "TE chunked, identity",
            format!("{post}transfer-encoding: chunked, identity\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE xchunked",
            format!("{post}transfer-encoding: xchunked\r\ncontent-length: {n}\r\n\r\n{s}"),
        ),
        refuse(
            "TE chunked-false",
            format!("{post}transfer-encoding: chunked-false\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE space before colon",
            format!("{post}transfer-encoding : chunked\r\ncontent-length: 0\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE obs-fold",
            format!("{post}transfer-encoding:\r\n chunked\r\ncontent-length: 0\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE vertical tab",
            format!("{post}transfer-encoding:\x0bchunked\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE bare CR",
            format!("{post}x-a: b\rtransfer-encoding: chunked\r\n\r\n{chunk}"),
        ),
        refuse(
            "TE on HTTP/1.0",
            format!(
                "POST /case-{{id}} HTTP/1.0\r\nhost: echo\r\ntransfer-encoding: chunked\r\n\r\n{chunk}"
            ),
        ),
        // Content-Length alone.
        refuse(
            "CL twice, different",
            format!("{post}content-length: 0\r\ncontent-length: {n}\r\n\r\n{s}"),
        ),
        refuse(
            "CL list, different",
            format!("{post}content-length: 0, {n}\r\n\r\n{s}"),
        ),
        refuse(
            "CL plus sign",
            format!("{post}content-length: +{n}\r\n\r\n{s}"),
        ),
        refuse(
            "CL negative",
            format!("{post}content-length: -1\r\n\r\n{s}"),
        ),
        refuse(
            "CL hex",
            format!("{post}content-length: 0x{n:x}\r\n\r\n{s}"),
        ),
        refuse(
            "CL inner space",
            format!("{post}content-length: 0 {n}\r\n\r\n{s}"),
        ),
        refuse(
            "CL overflow",
            format!("{post}content-length: 18446744073709551616\r\n\r\n{s}"),
        ),
        refuse(
            "CL space before colon",
            format!("{post}content-length : {n}\r\n\r\n{s}"),
        ),
        refuse(
            "CL obs-fold",
            format!("{post}content-length:\r\n {n}\r\n\r\n{s}"),
        ),
        either(
            "CL leading zeros",
            format!("{post}content-length: 00{n}\r\n\r\n{s}"),
        ),
        either(
            "CL twice, same",
            format!("{post}content-length: {n}\r\ncontent-length: {n}\r\n\r\n{s}"),
        ),
        // Chunks.
        bad_body(
            "chunk size not hex",
            format!("{post}transfer-encoding: chunked\r\n\r\nzz\r\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk size overflow",
            format!(
                "{post}transfer-encoding: chunked\r\n\r\n1{}\r\n{s}\r\n0\r\n\r\n",
                "0".repeat(16)
            ),
        ),
        bad_body(
            "chunk size negative",
            format!("{post}transfer-encoding: chunked\r\n\r\n-{n:x}\r\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk size plus sign",
            format!("{post}transfer-encoding: chunked\r\n\r\n+{n:x}\r\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk size 0x prefix",
            format!("{post}transfer-encoding: chunked\r\n\r\n0x{n:x}\r\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk longer than its size",
            format!("{post}transfer-encoding: chunked\r\n\r\n2\r\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk data without CRLF",
            format!("{post}transfer-encoding: chunked\r\n\r\n1\r\nx0\r\n\r\n{s}"),
        ),
        bad_body(
            "chunk size bare LF",
            format!("{post}transfer-encoding: chunked\r\n\r\n{n:x}\n{s}\r\n0\r\n\r\n"),
        ),
        bad_body(
            "chunk extension bare LF",
            format!("{post}transfer-encoding: chunked\r\n\r\n{n:x};a\nb\r\n{s}\r\n0\r\n\r\n"),
        ),
        // Heads.
        refuse(
            "obs-fold in another header",
            format!("{post}x-a: b\r\n c\r\ncontent-length: 0\r\n\r\n{s}"),
        ),
        refuse(
            "whitespace before the first header",
            format!("POST /case-{{id}} HTTP/1.1\r\n host: echo\r\ncontent-length: 0\r\n\r\n{s}"),
        ),
        refuse(
            "NUL in a header value",
            format!("{post}x-a: b\0c\r\ncontent-length: 0\r\n\r\n{s}"),
        ),
        refuse(
            "space in a header name",
            format!("{post}content length: {n}\r\n\r\n{s}"),
        ),
        refuse(
            "two Host headers",
            format!("{post}host: other\r\ncontent-length: 0\r\n\r\n"),
        ),
        refuse(
            "user info in an absolute-form target",
            "GET http://x@echo/case-{id} HTTP/1.1\r\nhost: echo\r\n\r\n".to_string(),
        ),
        // Routed by the target's authority, which replaces the Host the app reads.
        either(
            "Host against an absolute-form target",
            "GET http://echo/case-{id} HTTP/1.1\r\nhost: other\r\n\r\n".to_string(),
        ),
        refuse(
            "no Host on HTTP/1.1",
            "GET /case-{id} HTTP/1.1\r\ncontent-length: 0\r\n\r\n".to_string(),
        ),
        either(
            "bare LF line ends",
            format!("GET /case-{{id}} HTTP/1.1\nhost: echo\ncontent-length: {n}\n\n{s}"),
        ),
    ]
}

/// The status of the first response on `conn`, and every byte it sent until it closed or
/// went quiet.
async fn exchange(addr: std::net::SocketAddr, bytes: &str) -> anyhow::Result<(u16, String)> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.write_all(bytes.as_bytes()).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // A proxy that read a second request answers it right after the first.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_refused_or_forwarded_as_one_request() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    let inbound = pair.server.inbound_addr.expect("inbound listener");
    let corpus = smuggling_corpus();
    assert!(corpus.len() >= 30, "{} cases", corpus.len());
    let mut problems = Vec::new();
    let (mut refused_n, mut one_n) = (0, 0);
    for (side, addr) in [("outbound", pair.outbound), ("inbound", inbound)] {
        // Each on its own connection, all at once: a second request would follow within
        // the quiet time each waits for.
        let mut probes = tokio::task::JoinSet::new();
        for (i, p) in corpus.iter().enumerate() {
            // As long as `{id}`, so lengths in the bytes hold.
            let id = format!("{}{i:03}", &side[..1]);
            let bytes = p.bytes.replace("{id}", &id);
            probes.spawn(async move { (i, id, exchange(addr, &bytes).await) });
        }
        let mut results = probes.join_all().await;
        results.sort_by_key(|r| r.0);
        let paths = app.paths();
        for ((_, id, result), p) in results.into_iter().zip(&corpus) {
            let (status, text) = result?;
            let case = paths
                .iter()
                .filter(|x| **x == format!("/case-{id}"))
                .count();
            let smuggled = paths
                .iter()
                .filter(|x| **x == format!("/smuggled-{id}"))
                .count();
            let refused = status == 400 && case == 0;
            let ok = smuggled == 0
                && match p.expect {
                    Expect::Refused => refused,
                    Expect::BadBody => status == 400 && case <= 1,
                    Expect::RefusedOrOne => refused || (case == 1 && status != 0),
                };
            if status == 400 {
                refused_n += 1;
            } else {
                one_n += 1;
            }
            if !ok {
                let first = text.lines().next().unwrap_or("nothing");
                problems.push(format!(
                    "{side} {:?}: {first:?}, forwarded {case} + smuggled {smuggled}",
                    p.name
                ));
            }
        }
    }
    figure(&format!(
        "smuggling corpus: {} cases through outbound and inbound: {refused_n} refused with 400, {one_n} forwarded as one request, {} problems",
        corpus.len(),
        problems.len()
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut c = ProxyClient::new(pair.outbound);
    assert_eq!(
        c.get("echo", "/", &[]).await?,
        (200, "echo-app".to_string())
    );
    Ok(())
}
