//! The proxy's front end: arbitrary bytes on a connection to a client sidecar's outbound
//! listener or a server sidecar's inbound listener (the first byte picks), as the smuggling
//! corpus sends them: protocol detection, HTTP/1.1 and HTTP/2 parsing, path normalization,
//! routing and forwarding to an app. The pair runs in-process, so a panic anywhere in it is a
//! crash; a connection may be answered or closed, nothing more, and every 256 inputs a request
//! through the pair must still reach the app (a connection that leaked its place under the
//! listener's limit, or a wedged pair, shows there).

#![no_main]

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mesh_e2e::ProxyClient;
use mesh_e2e::mesh::{LocalMesh, SidecarPair};
use mesh_e2e::servers::EchoServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

struct World {
    runtime: Runtime,
    _app: EchoServer,
    _mesh: LocalMesh,
    pair: SidecarPair,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let (app, mesh, pair) = runtime.block_on(async {
        let app = EchoServer::start("echo").await.expect("the app");
        let mesh = LocalMesh::start().await.expect("the local mesh");
        let pair = mesh
            .sidecar_pair("http", None, app.addr.port())
            .await
            .expect("a sidecar pair");
        (app, mesh, pair)
    });
    World {
        runtime,
        _app: app,
        _mesh: mesh,
        pair,
    }
});

/// Sends `bytes`, ends the sending side and reads what comes back until the proxy closes or
/// goes quiet.
async fn exchange(addr: SocketAddr, bytes: &[u8]) {
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        panic!("the proxy at {addr} no longer accepts connections");
    };
    let _ = conn.write_all(bytes).await;
    let _ = conn.shutdown().await;
    let mut sink = [0u8; 16 * 1024];
    let quiet = Duration::from_millis(300);
    while let Ok(Ok(n)) = tokio::time::timeout(quiet, conn.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// A request through the pair reaches the app, within a few seconds (connections of earlier
/// inputs may still be winding down).
async fn still_served(outbound: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match ProxyClient::new(outbound).get("echo", "/", &[]).await {
            Ok((200, _)) => return,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the pair no longer serves: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static INPUTS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let Some((side, bytes)) = data.split_first() else {
        return;
    };
    let w = &*WORLD;
    let addr = if side % 2 == 0 {
        w.pair.outbound
    } else {
        w.pair.server.inbound_addr.expect("an inbound listener")
    };
    w.runtime.block_on(exchange(addr, bytes));
    if INPUTS.fetch_add(1, Ordering::Relaxed) % 256 == 255 {
        w.runtime.block_on(still_served(w.pair.outbound));
    }
});
