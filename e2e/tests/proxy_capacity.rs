//! A proxy at its connection limit, in a process of its own so that its memory is its own:
//! 20,000 HTTP/1.1 keep-alive connections (fewer where the open-file limit cannot hold them),
//! each having had a request answered, then idle; one more refused; and room again once one
//! goes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use mesh_e2e::identity::TestCa;
use mesh_e2e::mesh::LocalMesh;
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, eventually, figure, mib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connections the proxy's outbound listener takes by default (`--max-connections`).
const CONNECTIONS: u64 = 20_000;

/// What the proxy may grow by for each idle keep-alive connection (about 30 KiB measured: the
/// connection's task, hyper's read and write buffers): docs/reference/proxy.md (Safety
/// limits).
const BYTES_PER_CONNECTION: u64 = 40 * 1024;

/// How many connections both ends can hold: 20,000, or as many as the open-file limit leaves
/// room for (less 1,000 for the rest) where its hard limit is lower and this process may not
/// raise it (it lacks CAP_SYS_RESOURCE). Both ends are in processes started from here, which
/// inherit its limit.
fn connections_that_fit() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = CONNECTIONS + 1_000;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want || setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() {
        return Ok(CONNECTIONS);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    anyhow::ensure!(
        hard > 2_000,
        "an open-file limit of {hard} leaves no room for a test of thousands of connections"
    );
    Ok(hard - 1_000)
}

/// A keep-alive connection to `addr` from `source` (one of several loopback addresses, so
/// that 20,000 connections do not run out of ephemeral ports), with one request answered.
async fn keep_alive(addr: SocketAddr, source: [u8; 4]) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut c = socket.connect(addr).await?;
    c.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n").await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"echo") {
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
            .await
            .context("no answer in 30 s")??;
        anyhow::ensure!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_at_its_connection_limit_refuses_one_more_within_its_memory_bound()
-> anyhow::Result<()> {
    // Both ends hold 2,000: more than a soft limit of 1,024 allows.
    let fit = connections_that_fit()?;
    anyhow::ensure!(fit >= 2_000, "room for only {fit} connections");
    at_the_limit(2_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "20,000 connections take a minute through debug builds: scripts/capacity runs it on release builds"]
async fn twenty_thousand_connections_fit_their_memory_bound_and_one_more_is_refused()
-> anyhow::Result<()> {
    at_the_limit(connections_that_fit()?).await
}

/// Fills the outbound listener of a proxy started with `--max-connections <connections>`
/// with keep-alive connections; checks its memory, one more, and room after one goes.
async fn at_the_limit(connections: u64) -> anyhow::Result<()> {
    let max = connections.to_string();
    let app = EchoServer::start("echo").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    // Idle keep-alive connections are closed after the header read timeout: longer than
    // the test.
    let pair = mesh
        .process_pair(
            &ca,
            app.addr.port(),
            &["--header-read-timeout", "10m", "--max-connections", &max],
        )
        .await?;
    let proxy = &pair.client;
    let over_limit = || async {
        let (_, text) = mesh_e2e::http_get(proxy.metrics, "/metrics")
            .await
            .unwrap_or_default();
        mesh_api::prom::count(
            &text,
            &format!(
                "mesh_proxy_connections_over_limit_total{{listener=\"{}\"}}",
                mesh_api::consts::xds::OUTBOUND_LISTENER
            ),
        )
    };
    let before = proxy.resident_bytes()?;
    let started = std::time::Instant::now();
    let mut held = Vec::new();
    // 250 at a time, from four source addresses.
    let total = usize::try_from(connections)?;
    while held.len() < total {
        let mut batch = tokio::task::JoinSet::new();
        for i in held.len()..(held.len() + 250).min(total) {
            let source = [127, 0, 0, 2 + u8::try_from(i % 4)?];
            batch.spawn(keep_alive(pair.outbound, source));
        }
        while let Some(c) = batch.join_next().await {
            let n = held.len();
            held.push(c?.with_context(|| format!("connection {n}"))?);
        }
    }
    let opened = started.elapsed();
    let full = proxy.resident_bytes()?;
    let growth = full.saturating_sub(before);
    let per = growth / connections;
    figure(&format!(
        "capacity: {connections} keep-alive connections (--max-connections {connections}) opened in {:.1} s; proxy RSS {:.1} MiB before, {:.1} MiB with them (+{:.1} MiB, {per} bytes each, bound {BYTES_PER_CONNECTION})",
        opened.as_secs_f64(),
        mib(before),
        mib(full),
        mib(growth)
    ));
    anyhow::ensure!(
        per <= BYTES_PER_CONNECTION,
        "{per} bytes per connection, over the bound of {BYTES_PER_CONNECTION}"
    );
    anyhow::ensure!(over_limit().await == 0, "a connection was refused early");
    // One more: closed as soon as it is accepted.
    let mut extra = TcpStream::connect(pair.outbound).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), extra.read(&mut buf))
        .await
        .context("the connection past the limit was neither closed nor answered")?
        .unwrap_or(0);
    anyhow::ensure!(n == 0, "the connection past the limit got {n} bytes");
    eventually(
        Duration::from_secs(10),
        "the refusal to be counted",
        || async { (over_limit().await == 1).then_some(()) },
    )
    .await?;
    // One goes: a new client is served once the proxy saw it end.
    drop(held.pop());
    eventually(Duration::from_secs(10), "room for a new client", || async {
        ProxyClient::new(pair.outbound)
            .get("echo", "/", &[])
            .await
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .await?;
    // The held connections still work.
    let mut last = held.pop().context("held connections")?;
    last.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n")
        .await?;
    let n = tokio::time::timeout(Duration::from_secs(10), last.read(&mut buf)).await??;
    anyhow::ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(held);
    figure(&format!(
        "capacity: connection {} refused and counted; proxy RSS {:.1} MiB after the clients left",
        connections + 1,
        mib(proxy.resident_bytes()?)
    ));
    Ok(())
}
