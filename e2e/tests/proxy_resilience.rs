//! mesh-proxy under faults: a flaky endpoint hidden by retries, a dead endpoint ejected and
//! readmitted, the controller killed and restarted, and routes edited under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_controller::testing::service_yaml;
use mesh_e2e::mesh::{KillableController, Load, LocalMesh, failures, wait_config};
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, eventually, reviews_manifests, reviews_route};
use mesh_proxy::Proxy;

/// Three endpoints on one port at 127.0.0.2-4, as three pods would be. The port the kernel
/// gives 127.0.0.2 may be taken on the other two addresses (by anything running beside the
/// test): then another port is tried.
async fn three_endpoints() -> anyhow::Result<[EchoServer; 3]> {
    let mut tries = 0;
    loop {
        let a = EchoServer::start_on("pod-a", "127.0.0.2:0".parse()?).await?;
        let port = a.addr.port();
        let others = async {
            let b = EchoServer::start_on("pod-b", SocketAddr::from(([127, 0, 0, 3], port))).await?;
            let c = EchoServer::start_on("pod-c", SocketAddr::from(([127, 0, 0, 4], port))).await?;
            anyhow::Ok((b, c))
        };
        match others.await {
            Ok((b, c)) => return Ok([a, b, c]),
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("port {port} taken on another address ({e:#}); another port");
            }
            Err(e) => return Err(e),
        }
    }
}

fn flaky_manifests(port: u16) -> String {
    format!(
        "{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: flaky-1, namespace: default, labels: {{kubernetes.io/service-name: flaky}}}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints: [{{addresses: ['127.0.0.2', '127.0.0.3', '127.0.0.4'], conditions: {{ready: true}}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: flaky, namespace: default}}
spec:
  parentRefs: [{{group: '', kind: Service, name: flaky, port: 8080}}]
  rules:
  - retry: {{attempts: 3, codes: [503]}}
    backendRefs: [{{name: flaky, port: 8080}}]
",
        service_yaml("default", "flaky", "10.96.2.1", &[("http", 8080)])
    )
}

fn metric(proxy: &Proxy, prefix: &str) -> f64 {
    proxy
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Retry counter `counter` (retries, or retries denied) of `flaky`'s backend for `reason`.
fn flaky_retries(proxy: &Proxy, counter: &str, reason: &str) -> f64 {
    metric(
        proxy,
        &format!(
            "{counter}{{backend=\"outbound|8080||flaky.default.svc.cluster.local\",reason=\"{reason}\"}}"
        ),
    )
}

/// Retries of `flaky` denied because the body could not be sent again.
fn not_replayable(proxy: &Proxy) -> f64 {
    flaky_retries(
        proxy,
        "mesh_proxy_retries_denied_total",
        "body-not-replayable",
    )
}

/// Starts a proxy and waits until it routes `flaky` to its three endpoints.
async fn flaky_proxy(mesh: &LocalMesh) -> anyhow::Result<Proxy> {
    let proxy = mesh.proxy(mesh.proxy_config("default/client-0")).await?;
    wait_config(&proxy, "flaky's route and endpoints", |s| {
        !s.backend_weights("outbound_http", "flaky.default.")
            .is_empty()
            && s.clusters
                .values()
                .any(|c| c.name.contains("flaky.default") && c.endpoints.len() == 3)
    })
    .await?;
    Ok(proxy)
}

/// `flaky` with one endpoint, 127.0.0.2:`port`, and `rule` (YAML, the start of the route's
/// only rule) instead of the retry rule.
fn one_endpoint_manifests(port: u16, rule: &str) -> String {
    flaky_manifests(port)
        .replace("['127.0.0.2', '127.0.0.3', '127.0.0.4']", "['127.0.0.2']")
        .replace("  - retry: {attempts: 3, codes: [503]}", rule)
}

/// A proxy routing `flaky` to one endpoint, `app` at 127.0.0.2, with `rule` (YAML, the first
/// line of the route's only rule) instead of the retry rule.
async fn one_endpoint_proxy(
    mesh: &LocalMesh,
    app: &EchoServer,
    rule: &str,
) -> anyhow::Result<Proxy> {
    one_endpoint_proxy_of(mesh, &one_endpoint_manifests(app.addr.port(), rule)).await
}

async fn one_endpoint_proxy_of(mesh: &LocalMesh, manifests: &str) -> anyhow::Result<Proxy> {
    flaky_proxy_of(mesh, manifests, 1).await
}

/// A proxy with `manifests` (of `flaky`), once it holds `endpoints` endpoints of `flaky`.
async fn flaky_proxy_of(
    mesh: &LocalMesh,
    manifests: &str,
    endpoints: usize,
) -> anyhow::Result<Proxy> {
    mesh.write("flaky.yaml", manifests)?;
    let proxy = mesh.proxy(mesh.proxy_config("default/client-0")).await?;
    wait_config(&proxy, "flaky's endpoints", |s| {
        s.clusters
            .values()
            .any(|c| c.name.contains("flaky.default") && c.endpoints.len() == endpoints)
    })
    .await?;
    Ok(proxy)
}

/// The proxy's latency estimate for each endpoint of `flaky`.
fn ewma_ms(proxy: &Proxy) -> Vec<(SocketAddr, f64)> {
    let Some(s) = proxy.store.load() else {
        return Vec::new();
    };
    s.clusters
        .values()
        .filter(|c| c.name.contains("flaky.default"))
        .flat_map(|c| c.endpoints.endpoints().iter())
        .map(|e| (e.addr, e.ewma_ms()))
        .collect()
}

fn cheapest(ewma: &[(SocketAddr, f64)], addr: SocketAddr) -> bool {
    let Some(&(_, mine)) = ewma.iter().find(|(a, _)| *a == addr) else {
        return false;
    };
    ewma.iter().all(|&(a, v)| a == addr || mine < v)
}

async fn send(client: &mut ProxyClient, n: usize) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = match client.get("flaky:8080", "/", &[]).await {
            Ok((200, body)) => body,
            Ok((s, body)) => format!("status {s}: {}", body.trim()),
            Err(e) => format!("error: {e}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_an_endpoint_failing_half_its_requests() -> anyhow::Result<()> {
    let eps = three_endpoints().await?;
    eps[2].fail_every(2);
    let mesh = LocalMesh::start().await?;
    mesh.write("flaky.yaml", &flaky_manifests(eps[0].addr.port()))?;
    let proxy = flaky_proxy(&mesh).await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    let got = send(&mut client, 1000).await;
    let retries = metric(&proxy, "mesh_proxy_retries_total");
    eprintln!(
        "1000 requests, one endpoint failing every other request: {got:?}; retries {retries}; pod-c saw {}",
        eps[2].hits()
    );
    assert_eq!(
        failures(&got),
        0,
        "{got:?}\n{}",
        proxy
            .metrics
            .encode()
            .lines()
            .filter(|l| l.contains("retr"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // pod-c fails its first request, so once it is tried a retry is needed.
    assert!(eps[2].hits() >= 1, "the flaky endpoint was never tried");
    assert!(
        retries >= 1.0,
        "no retries were needed, so the test proved nothing"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_is_retried_with_the_whole_request() -> anyhow::Result<()> {
    // pod-a answers at 127.0.0.2; nothing listens at .3 on its port. Under the default
    // policy (failed connections, refused streams) a try that picks .3 is retried, on pod-a
    // (a retry avoids the endpoint that failed). Over HTTP/1.1 the proxy moves the request's
    // headers into a try rather than copying them, and a try that found no connection hands
    // them back: the retry must still carry the client's header.
    let app = EchoServer::start_on("pod-a", "127.0.0.2:0".parse()?).await?;
    let manifests = one_endpoint_manifests(
        app.addr.port(),
        "  - matches: [{path: {type: PathPrefix, value: /}}]",
    )
    .replace("['127.0.0.2']", "['127.0.0.2', '127.0.0.3']");
    let mesh = LocalMesh::start().await?;
    let proxy = flaky_proxy_of(&mesh, &manifests, 2).await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    let retried = || flaky_retries(&proxy, "mesh_proxy_retries_total", "connect-failure");
    let mut sent = 0;
    // Until the dead endpoint was tried: the balancer picks between two it knows nothing of
    // at random, and shuns one once it failed.
    while retried() < 1.0 && sent < 200 {
        let (status, headers, body) = client
            .get_full("flaky:8080", "/", &[("x-app", "whole")])
            .await?;
        assert_eq!((status, body.as_str()), (200, "pod-a"));
        assert_eq!(
            headers.get("x-seen-app").map(|v| v.as_bytes()),
            Some(&b"whole"[..]),
            "request {sent} reached the app without the client's header"
        );
        sent += 1;
    }
    let n = retried();
    eprintln!("{sent} requests, {n} retried after a failed connection");
    assert!(
        n >= 1.0,
        "no retry after a failed connection in {sent} requests"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_ejected_and_readmitted_when_it_recovers() -> anyhow::Result<()> {
    let mut eps = three_endpoints().await?;
    // pod-c is the fastest, so the balancer prefers it: its death is felt at once.
    eps[0].set_delay(Duration::from_millis(2));
    eps[1].set_delay(Duration::from_millis(2));
    let mesh = LocalMesh::start().await?;
    mesh.write("flaky.yaml", &flaky_manifests(eps[0].addr.port()))?;
    let proxy = flaky_proxy(&mesh).await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    // Power of two choices never tries an endpoint that costs more than both others, so pod-c
    // must be the cheapest when it dies or its death goes unnoticed (a latency spike on a
    // loaded machine can make it costlier for a while). Warm up until the proxy's own
    // estimates say it is.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let warm = send(&mut client, 100).await;
        assert_eq!(failures(&warm), 0, "{warm:?}");
        let ewma = ewma_ms(&proxy);
        if eps[2].hits() > 0 && cheapest(&ewma, eps[2].addr) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod-c was never the cheapest endpoint in 20 s: {ewma:?}; pod-c saw {}",
            eps[2].hits()
        );
    }

    eps[2].stop().await;
    let down = send(&mut client, 300).await;
    let ejections = metric(&proxy, "mesh_proxy_endpoint_ejections_total");
    eprintln!("pod-c down: {down:?}; ejections {ejections}");
    assert_eq!(
        failures(&down),
        0,
        "retries should hide the dead endpoint: {down:?}"
    );
    assert!(ejections >= 1.0, "the dead endpoint was not ejected");
    assert_eq!(down.get("pod-c"), None);

    let before = eps[2].hits();
    eps[2].restart().await?;
    let recovered_at = Instant::now();
    // Send in rounds until pod-c answers again (traffic, not a timer, shows readmission).
    let deadline = Instant::now() + Duration::from_secs(20);
    while eps[2].hits() == before {
        assert!(
            Instant::now() < deadline,
            "pod-c got no traffic in 20 s after it recovered"
        );
        let r = send(&mut client, 20).await;
        assert_eq!(failures(&r), 0, "{r:?}");
    }
    eprintln!(
        "pod-c got traffic again {:?} after it recovered",
        recovered_at.elapsed()
    );
    Ok(())
}

fn v2_only(s: &mesh_proxy::state::Snapshot) -> bool {
    // Backends at weight 0 stay listed (kept warm): only the weighted ones count.
    let w: Vec<_> = s
        .backend_weights("outbound_http", "reviews.default.")
        .into_iter()
        .filter(|(_, w)| *w > 0)
        .collect();
    !w.is_empty() && w.iter().all(|(c, _)| c.contains("reviews-v2"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_and_restarted_under_load() -> anyhow::Result<()> {
    let v1 = EchoServer::start("reviews-v1").await?;
    let v2 = EchoServer::start("reviews-v2").await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    std::fs::write(
        cfg.join("services.yaml"),
        reviews_manifests(v1.addr.port(), v2.addr.port()),
    )?;
    std::fs::write(cfg.join("route.yaml"), reviews_route(100, 0))?;
    let mut controller = KillableController::start(&cfg, "127.0.0.1:0".parse()?)?;
    let xds = controller.xds_addr;

    let mut pc = mesh_proxy::Config::local(xds, "default/productpage-1");
    pc.workers = 1;
    let proxy = Proxy::start(pc, None).await?;
    tokio::time::timeout(Duration::from_secs(10), proxy.store.ready()).await?;
    let load = Load::start(
        proxy.outbound_http_addr.expect("listener"),
        "reviews:9080",
        200,
        8,
    );

    tokio::time::sleep(Duration::from_secs(5)).await;
    controller.kill();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    controller = KillableController::start(&cfg, xds)?;
    let restarted_at = Instant::now();
    eventually(Duration::from_secs(20), "the proxy to reconnect", || {
        let up = metric(&proxy, "mesh_proxy_xds_connected") == 1.0;
        async move { up.then_some(()) }
    })
    .await?;
    let reconnected = restarted_at.elapsed();
    let written = Instant::now();
    mesh_e2e::write_atomic(&cfg.join("route.yaml"), &reviews_route(0, 100))?;
    wait_config(&proxy, "the route change after the restart", v2_only).await?;
    let applied = written.elapsed();
    let rest = Duration::from_secs(30).saturating_sub(killed_at.elapsed() + Duration::from_secs(5));
    tokio::time::sleep(rest).await;
    let got = load.finish().await;
    let total: u64 = got.values().sum();
    eprintln!(
        "controller down 10 s during a 30 s run at 200 rps: {total} requests, {got:?}; \
         reconnected {reconnected:?} after restart; route change applied {applied:?} after the write"
    );
    assert_eq!(failures(&got), 0, "{got:?}");
    assert!(total >= 5000, "the load generator fell behind: {total}");
    assert!(
        applied < Duration::from_secs(1),
        "route change took {applied:?}"
    );
    drop(controller);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_route_changes_under_load_lose_nothing() -> anyhow::Result<()> {
    let v1 = EchoServer::start("reviews-v1").await?;
    let v2 = EchoServer::start("reviews-v2").await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, Some((100, 0))).await?;
    let proxy = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    // The proxy may be ready before the controller has read the manifests: load starts once
    // it routes reviews.
    wait_config(&proxy, "the reviews route", |s| {
        !s.backend_weights("outbound_http", "reviews.default.")
            .is_empty()
    })
    .await?;
    let generation = proxy.store.load().map_or(0, |s| s.generation);
    let load = Load::start(
        proxy.outbound_http_addr.expect("listener"),
        "reviews:9080",
        200,
        8,
    );
    let splits = [(100, 0), (50, 50), (0, 100), (90, 10), (10, 90)];
    for i in 0..50 {
        let (a, b) = splits[i % splits.len()];
        mesh.write("route.yaml", &reviews_route(a, b))?;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let got = load.finish().await;
    let applied = proxy.store.load().map_or(0, |s| s.generation) - generation;
    eprintln!("50 route edits at 200 rps: {got:?}; {applied} config generations applied");
    assert_eq!(failures(&got), 0, "{got:?}");
    assert!(v1.hits() > 0 && v2.hits() > 0);
    assert!(
        applied >= 25,
        "only {applied} of 50 edits reached the proxy"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_bodies_are_retried_up_to_64_kib() -> anyhow::Result<()> {
    let Some(curl) = mesh_e2e::system_peer("curl") else {
        return Ok(());
    };
    // One endpoint that fails its first request and every other one after it.
    let app = EchoServer::start_on("pod-a", "127.0.0.2:0".parse()?).await?;
    app.fail_every(2);
    let mesh = LocalMesh::start().await?;
    let proxy = one_endpoint_proxy(&mesh, &app, "  - retry: {attempts: 3, codes: [503]}").await?;
    let proxy_url = format!("http://{}", proxy.outbound_http_addr.expect("listener"));
    let dir = tempfile::tempdir()?;
    let post = |size: usize| {
        let file = dir.path().join(format!("body-{size}"));
        let body: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        std::fs::write(&file, &body).map(|_| (file, body))
    };

    let upload = |file: std::path::PathBuf| {
        let (curl, proxy_url) = (curl.clone(), proxy_url.clone());
        async move {
            let data = format!("@{}", file.display());
            let args = [
                "-sS",
                "-x",
                &proxy_url,
                "-H",
                "Transfer-Encoding: chunked",
                "-w",
                "\n%{http_code}",
                "--data-binary",
                &data,
                "http://flaky:8080/upload",
            ];
            let (out, err, ok) =
                mesh_e2e::run_peer(&curl, &args, &[], Duration::from_secs(30)).await?;
            anyhow::ensure!(ok, "curl failed: {err}");
            let (body, status) = out.rsplit_once('\n').unwrap_or((&out, ""));
            anyhow::Ok((body.to_string(), status.to_string()))
        }
    };

    // 1 KiB with no length: streamed, recorded, replayed after the 503.
    let (file, body) = post(1024)?;
    assert_eq!(upload(file).await?, (body, "200".to_string()));
    assert_eq!(app.hits(), 2, "one 503, one retry");

    // 100 KiB: it outgrows the record, so its 503 is not retried.
    let (file, _) = post(100 * 1024)?;
    assert_eq!(upload(file).await?.1, "503");
    assert_eq!(app.hits(), 3, "no retry");
    assert_eq!(not_replayable(&proxy), 1.0);
    Ok(())
}

/// An HTTP/2 app at 127.0.0.2 that refuses every tenth stream (`REFUSED_STREAM`, the first
/// included) and answers the others `200` at once, reading nothing of their bodies; with the
/// count of streams it saw.
async fn refusing_h2_app() -> anyhow::Result<(SocketAddr, Arc<AtomicU32>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await?;
    let addr = listener.local_addr()?;
    let streams = Arc::new(AtomicU32::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut conn = ::h2::server::handshake(tcp).await?;
                while let Some((_req, mut respond)) = conn.accept().await.transpose()? {
                    if seen.fetch_add(1, Ordering::Relaxed).is_multiple_of(10) {
                        respond.send_reset(::h2::Reason::REFUSED_STREAM);
                    } else {
                        respond.send_response(http::Response::new(()), true)?;
                    }
                }
                anyhow::Ok(())
            });
        }
    });
    Ok((addr, streams))
}

/// A route without a retry of its own still retries a stream the endpoint refused, as
/// Istio's default does: `REFUSED_STREAM` says the app processed nothing. A request whose
/// streamed body the refused try took is not retried (nothing recorded it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_streams_are_retried_by_default() -> anyhow::Result<()> {
    let (app, streams) = refusing_h2_app().await?;
    let mesh = LocalMesh::start().await?;
    // A rule without a retry of its own.
    let rule = "  - matches: [{path: {type: PathPrefix, value: /}}]";
    let manifests = one_endpoint_manifests(app.port(), rule).replace(
        "protocol: TCP}",
        "protocol: TCP, appProtocol: kubernetes.io/h2c}",
    );
    let proxy = one_endpoint_proxy_of(&mesh, &manifests).await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    let got = send(&mut client, 100).await;
    let retried = flaky_retries(&proxy, "mesh_proxy_retries_total", "refused-stream");
    assert_eq!(failures(&got), 0, "{got:?}");
    // Every refusal was retried, and nothing else was.
    assert!(retried >= 10.0, "{retried} retries");
    assert_eq!(f64::from(streams.load(Ordering::Relaxed)), 100.0 + retried);

    // One of ten streams is refused; with a body that streamed to the refused try, the
    // refusal stands.
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let (status, _, _) = client
            .send(
                "POST",
                "flaky:8080",
                "/",
                &[],
                bytes::Bytes::from_static(b"body"),
            )
            .await?;
        *answers.entry(status).or_insert(0) += 1;
    }
    assert_eq!(answers, [(200, 9), (502, 1)].into(), "{answers:?}");
    assert_eq!(not_replayable(&proxy), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504() -> anyhow::Result<()> {
    let app = EchoServer::start_on("pod-a", "127.0.0.2:0".parse()?).await?;
    app.set_delay(Duration::from_secs(3));
    let mesh = LocalMesh::start().await?;
    let proxy = one_endpoint_proxy(&mesh, &app, "  - timeouts: {request: 300ms}").await?;
    wait_config(&proxy, "the route with its timeout", |s| {
        s.route("outbound_http").is_some_and(|t| {
            t.vhosts().iter().flat_map(|v| &v.routes).any(|r| {
                matches!(&r.action, mesh_proxy::state::Action::Forward(f)
                    if f.timeout == Some(Duration::from_millis(300)))
            })
        })
    })
    .await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("listener"));
    let started = Instant::now();
    let (status, body) = client.get("flaky:8080", "/", &[]).await?;
    let took = started.elapsed();
    assert_eq!((status, body.trim()), (504, "upstream request timeout"));
    assert!(
        took < Duration::from_secs(3),
        "answered after {took:?}, not at the route timeout"
    );
    Ok(())
}
