//! mesh-proxy's default limits, probed with hand-made frames: oversized headers, HTTP/2
//! settings, a rapid-reset flood, and garbage. After each probe the proxy still serves.

use std::time::Duration;

use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_e2e::ProxyClient;
use mesh_e2e::mesh::{LocalMesh, wait_config};
use mesh_e2e::servers::EchoServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Setup {
    _app: EchoServer,
    _mesh: LocalMesh,
    proxy: mesh_proxy::Proxy,
    addr: std::net::SocketAddr,
}

async fn setup() -> anyhow::Result<Setup> {
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
    let proxy = mesh.proxy(mesh.proxy_config("default/web-1")).await?;
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

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads frames until one of `kind` arrives (its payload) or the connection ends (`None`).
async fn read_until(conn: &mut TcpStream, kind: u8) -> anyhow::Result<Option<Vec<u8>>> {
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut head)).await? {
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).await?;
        if head[3] == kind {
            return Ok(Some(payload));
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
