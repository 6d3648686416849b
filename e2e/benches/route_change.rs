//! A route change as a user feels it, with real proxies: the release controller on N Services
//! (`mesh_controller::testing::scale_manifests`, over 10 namespaces, full config: every proxy
//! is given every Service), P real proxies of one kind (mesh-proxy, then Envoy joined with
//! `meshctl bootstrap envoy`), and an HTTPRoute on `svc-0` that splits it between two local
//! backends. Each change flips the split (100/0 to 0/100 and back), so one answer tells which
//! split a proxy routes by. Each proxy is asked continuously through its explicit HTTP
//! listener; per change, the time from the write to each proxy's first answer from the backend
//! that just got the weight.
//!
//! The change is a file rewritten atomically (`--source dir`: the controller reads a
//! directory) or an object replaced in the API server (`--source api`: the fake API served
//! over HTTP, whose watch event the controller follows as it follows a cluster's).
//!
//! Checked while it runs: every answer is a 200; once a proxy answers from the new backend it
//! never answers from the old one until the next change; and, for mesh-proxy, no request sent
//! after the proxy's `mesh_proxy_config_revision` for RDS (read every 2 ms) showed the
//! change's revision (read from the controller's `/debug/service`) is answered by the backend
//! whose weight is 0. Reported: the
//! latency percentiles over the changes (every proxy, and the slowest per change), and each
//! proxy's RSS before the first change, after 10, 50 and all of them.
//!
//! `scripts/bench-route [ARGS]`; the figures and how to read them are in docs/benchmarks.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use mesh_e2e::{
    Backend, Peer, ProxyClient, eventually, free_port, http_get, netns::binary, pct, rss_mib,
};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::watch;

const NAMESPACES: usize = 10;
/// The Service whose route changes, and the host the proxies are asked for.
const HOST: &str = "svc-0.ns-0";
/// The split's two backends.
const BACKENDS: [&str; 2] = ["split-a", "split-b"];
/// Time between one change reaching every proxy and the next change: above the controller's
/// debounce ceiling (100 ms), so that no two changes are merged into one update.
const GAP: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
struct Args {
    /// Services in the mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Proxies of each kind, running at once.
    #[arg(long, default_value_t = 2)]
    proxies: usize,
    /// Route changes, one at a time.
    #[arg(long, default_value_t = 100)]
    changes: usize,
    /// The data planes measured, one after the other.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "mesh-proxy,envoy"
    )]
    peers: Vec<Kind>,
    /// Where the controller reads its config from.
    #[arg(long, value_enum, default_value_t = Source::Dir)]
    source: Source,
    /// Keep the controller's and mesh-proxies' logs in this directory, at the filter in
    /// `MESH_LOG` (else `warn`), to see where a change's time goes. Without it they log
    /// warnings only, whatever `MESH_LOG` says (a debug log slows what is measured). Envoy
    /// logs warnings either way.
    #[arg(long)]
    logs: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    MeshProxy,
    Envoy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Source {
    Dir,
    Api,
}

/// The route with all weight on backend `to` (0 or 1).
fn route(to: usize) -> Value {
    let refs: Vec<Value> = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, b)| json!({"name": b, "port": 80, "weight": if i == to { 100 } else { 0 }}))
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "svc-0", "namespace": "ns-0"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "svc-0", "port": 80}],
            "rules": [{"backendRefs": refs}],
        },
    })
}

/// The split's backends as Services whose one endpoint is a local server.
fn backend_objects(backends: &[Backend]) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        out.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": b.name, "namespace": "ns-0"},
            "spec": {"clusterIP": format!("10.200.0.{}", i + 1), "selector": {"app": b.name},
                "ports": [{"name": "http", "port": 80, "targetPort": b.addr.port()}]},
        }));
        out.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-1", b.name), "namespace": "ns-0",
                "labels": {"kubernetes.io/service-name": b.name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": b.addr.port()}],
            "endpoints": [{"addresses": [b.addr.ip().to_string()], "conditions": {"ready": true}}],
        }));
    }
    out
}

/// How route changes reach the controller.
enum Config {
    Dir(tempfile::TempDir),
    Api {
        fake: mesh_api::fake_api::FakeApi,
        server: tokio::task::JoinHandle<()>,
        kubeconfig: tempfile::NamedTempFile,
    },
}

impl Config {
    async fn new(source: Source, services: usize, backends: &[Backend]) -> anyhow::Result<Self> {
        let scale = mesh_controller::testing::scale_manifests(services, NAMESPACES);
        let backends = backend_objects(backends);
        match source {
            Source::Dir => {
                let dir = tempfile::tempdir()?;
                for (name, text) in scale {
                    std::fs::write(dir.path().join(name), text)?;
                }
                let docs: Vec<String> = backends
                    .iter()
                    .map(serde_json::to_string)
                    .collect::<Result<_, _>>()?;
                std::fs::write(dir.path().join("split.yaml"), docs.join("\n---\n"))?;
                let config = Config::Dir(dir);
                config.set_route(0)?;
                Ok(config)
            }
            Source::Api => {
                let (_, fake) = mesh_api::fake_api::FakeApi::start();
                fake.install_chart_crds();
                for (_, text) in scale {
                    for doc in serde_norway::Deserializer::from_str(&text) {
                        let v: Value = serde::Deserialize::deserialize(doc)?;
                        if !v.is_null() {
                            fake.insert(v);
                        }
                    }
                }
                for v in backends.into_iter().chain([route(0)]) {
                    fake.insert(v);
                }
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let url = format!("http://{}", listener.local_addr()?);
                let token = "bench-controller";
                let server = fake.serve_http(
                    listener,
                    BTreeMap::from([(
                        token.to_owned(),
                        mesh_api::fake_api::rbac::ADMIN.to_owned(),
                    )]),
                );
                let kubeconfig = tempfile::NamedTempFile::new()?;
                std::fs::write(
                    kubeconfig.path(),
                    mesh_api::fake_api::kubeconfig(&url, token, "mesh-system"),
                )?;
                Ok(Config::Api {
                    fake,
                    server,
                    kubeconfig,
                })
            }
        }
    }

    /// Puts all weight on backend `to`.
    fn set_route(&self, to: usize) -> anyhow::Result<()> {
        match self {
            Config::Dir(dir) => {
                mesh_e2e::write_atomic(&dir.path().join("route.yaml"), &route(to).to_string())
            }
            Config::Api { fake, .. } => {
                fake.state().put(route(to));
                Ok(())
            }
        }
    }

    fn controller_args(&self, cmd: &mut Command) {
        match self {
            Config::Dir(dir) => {
                cmd.arg("--config-dir").arg(dir.path());
            }
            Config::Api { kubeconfig, .. } => {
                cmd.env("KUBECONFIG", kubeconfig.path());
            }
        }
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        if let Config::Api { server, .. } = self {
            server.abort();
        }
    }
}

/// A running proxy: its process, where it is asked, and (mesh-proxy) its metrics.
struct Proxy {
    peer: Peer,
    outbound: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.peer.child.id().unwrap_or_default()
    }
}

/// `log`: mesh-proxy's log filter.
async fn start_proxy(
    kind: Kind,
    i: usize,
    xds: SocketAddr,
    dir: &Path,
    log: &str,
) -> anyhow::Result<Proxy> {
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let (outbound, admin) = (local(free_port()), local(free_port()));
    let node = format!("ns-0/bench-{i}");
    let (mut cmd, metrics) = match kind {
        Kind::MeshProxy => {
            let metrics = local(free_port());
            let mut cmd = Command::new(binary("mesh-proxy")?);
            cmd.args(["--node", &node, "--identity-off", "--workers", "1"])
                .args(["--xds", &xds.to_string()])
                .args(["--admin-addr", &admin.to_string()])
                .args(["--metrics-addr", &metrics.to_string()])
                .args(["--outbound-http-addr", &outbound.to_string()])
                .args(["--outbound-addr", &local(free_port()).to_string()])
                .args(["--inbound-addr", &local(free_port()).to_string()])
                .env("MESH_LOG", log);
            (cmd, Some(metrics))
        }
        Kind::Envoy => {
            let envoy = mesh_e2e::peer("MESH_ENVOY", "envoy").context("Envoy is needed")?;
            let boot = std::process::Command::new(binary("meshctl")?)
                .args(["bootstrap", "envoy", "--node", &node])
                .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
                .args(["--outbound-http", &outbound.to_string()])
                .output()?;
            ensure!(
                boot.status.success(),
                "meshctl bootstrap envoy: {}",
                String::from_utf8_lossy(&boot.stderr)
            );
            let file = dir.join(format!("envoy-{i}.yaml"));
            std::fs::write(&file, &boot.stdout)?;
            let mut cmd = Command::new(envoy);
            cmd.arg("-c").arg(&file).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ]);
            (cmd, None)
        }
    };
    let proxy = Proxy {
        peer: Peer::spawn(&mut cmd, dir.join(format!("{kind:?}-{i}.log")))?,
        outbound,
        metrics,
    };
    let ready = eventually(
        Duration::from_secs(180),
        &format!("{kind:?} {i} ready"),
        async || {
            http_get(admin, "/ready")
                .await
                .filter(|(s, _)| *s == 200)
                .map(|_| ())
        },
    )
    .await;
    if let Err(e) = ready {
        bail!("{e}\n{}", proxy.peer.log_text());
    }
    Ok(proxy)
}

/// One answer through a proxy.
#[derive(Clone, Copy, Debug)]
struct Answer {
    sent: Instant,
    got: Instant,
    /// Index into [`BACKENDS`]; `None` for anything else (a status other than 200).
    backend: Option<usize>,
}

/// One read of a mesh-proxy's `mesh_proxy_config_revision`, finished at `at`.
#[derive(Clone, Copy, Debug)]
struct RevisionRead {
    at: Instant,
    revision: u64,
}

/// What a proxy's poller saw.
#[derive(Default)]
struct Seen {
    answers: Vec<Answer>,
    revisions: Vec<RevisionRead>,
    errors: Vec<String>,
}

/// The revision of the routes a mesh-proxy runs.
async fn revision_of(metrics: SocketAddr) -> Option<u64> {
    let (_, text) = http_get(metrics, "/metrics")
        .await
        .filter(|(s, _)| *s == 200)?;
    mesh_api::prom::sample(&text, r#"mesh_proxy_config_revision{xds_type="RDS"}"#).map(|v| v as u64)
}

/// Asks the proxy for [`HOST`] until `stop`; the latest answer goes to `latest`.
async fn poll(
    outbound: SocketAddr,
    stop: Arc<AtomicBool>,
    latest: watch::Sender<Option<Answer>>,
) -> Seen {
    let mut seen = Seen::default();
    let mut client = ProxyClient::new(outbound);
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let backend = match client.get(HOST, "/", &[]).await {
            Ok((200, body)) => BACKENDS.iter().position(|b| *b == body),
            Ok((status, body)) => {
                seen.errors.push(format!("{status}: {body}"));
                None
            }
            Err(e) => {
                seen.errors.push(e.to_string());
                None
            }
        };
        let a = Answer {
            sent,
            got: Instant::now(),
            backend,
        };
        seen.answers.push(a);
        latest.send_replace(Some(a));
        // A pause, so that P pollers leave the two cores to the proxies and the controller.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    seen
}

/// Reads a mesh-proxy's route revision every 2 ms until `stop`, beside the requests (so that
/// both data planes are asked at the same pace).
async fn read_revisions(metrics: SocketAddr, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        match revision_of(metrics).await {
            Some(revision) => seen.revisions.push(RevisionRead {
                at: Instant::now(),
                revision,
            }),
            None => seen.errors.push("metrics unreadable".into()),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen
}

/// Sets `stop` when dropped: the pollers end however `measure` returns.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One change: when it was written, where the weight went, and the controller's revision
/// that holds it.
struct Change {
    at: Instant,
    to: usize,
    revision: u64,
}

/// Reads the controller's revision holding the split on `to`.
async fn controller_revision(admin: SocketAddr, to: usize) -> anyhow::Result<u64> {
    let change = meshctl::cmd::route::Change {
        namespace: "ns-0".into(),
        service: "svc-0".into(),
        port: 80,
        route: "ns-0/svc-0".into(),
        rule: 0,
        before: Vec::new(),
        after: vec![(BACKENDS[to].to_owned(), 100)],
        written: None,
        diff: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match http_get(admin, "/debug/service?service=ns-0/svc-0").await {
            Some((200, body)) => {
                let v: Value = serde_json::from_str(&body)?;
                match meshctl::cmd::route_wait::served(&v, &change) {
                    Ok(r) => return Ok(r),
                    Err(e) => e,
                }
            }
            other => format!("{other:?}"),
        };
        if Instant::now() > deadline {
            bail!("the controller does not hold the split on {to}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What one proxy's answers say about the changes: per change, the delay to the first answer
/// from the new backend; and the answers that broke the split, with why.
fn judge(
    seen: &Seen,
    changes: &[Change],
    metric_checked: bool,
) -> (Vec<Option<f64>>, Vec<String>, usize) {
    let mut delays = Vec::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for (k, c) in changes.iter().enumerate() {
        let end = changes.get(k + 1).map(|n| n.at);
        let during: Vec<&Answer> = seen
            .answers
            .iter()
            .filter(|a| a.got > c.at && end.is_none_or(|e| a.sent < e))
            .collect();
        let Some(first) = during.iter().position(|a| a.backend == Some(c.to)) else {
            broken.push(format!(
                "change {}: never answered from the new backend",
                k + 1
            ));
            delays.push(None);
            continue;
        };
        delays.push(Some(
            during[first].got.duration_since(c.at).as_secs_f64() * 1e3,
        ));
        for a in &during[first..] {
            if a.backend != Some(c.to) {
                broken.push(format!(
                    "change {}: answered by {:?} after answering from the new backend",
                    k + 1,
                    a.backend.map(|b| BACKENDS[b])
                ));
            }
        }
        if metric_checked {
            // From the first read that showed the change's revision on, every request sent
            // must be routed by it.
            let Some(applied) = seen
                .revisions
                .iter()
                .find(|r| r.at > c.at && end.is_none_or(|e| r.at < e) && r.revision >= c.revision)
            else {
                broken.push(format!(
                    "change {}: the proxy never showed revision {}",
                    k + 1,
                    c.revision
                ));
                continue;
            };
            for a in during.iter().filter(|a| a.sent >= applied.at) {
                checked += 1;
                if a.backend != Some(c.to) {
                    broken.push(format!(
                        "change {}: a request sent after the proxy showed revision {} was answered by {:?}",
                        k + 1,
                        applied.revision,
                        a.backend.map(|b| BACKENDS[b])
                    ));
                }
            }
        }
    }
    (delays, broken, checked)
}

async fn measure(
    kind: Kind,
    a: &Args,
    config: &Config,
    xds: SocketAddr,
    admin: SocketAddr,
    dir: &Path,
    first_to: usize,
) -> anyhow::Result<usize> {
    let started = Instant::now();
    let mut proxies = Vec::new();
    for i in 0..a.proxies {
        proxies.push(start_proxy(kind, i, xds, dir, &log_filter(a)).await?);
    }
    println!(
        "{kind:?}: {} proxies ready in {:.1} s",
        a.proxies,
        started.elapsed().as_secs_f64()
    );
    let mut to = first_to;
    for p in &proxies {
        let mut client = ProxyClient::new(p.outbound);
        eventually(
            Duration::from_secs(300),
            &format!("{kind:?} routing {HOST} to {}", BACKENDS[to]),
            async || {
                (client.get(HOST, "/", &[]).await.ok() == Some((200, BACKENDS[to].into())))
                    .then_some(())
            },
        )
        .await?;
    }
    // Let the allocator settle after the initial responses.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss = |ps: &[Proxy]| ps.iter().map(|p| rss_mib(p.pid())).collect::<Vec<_>>();
    let rss_before = rss(&proxies);
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let mut pollers = Vec::new();
    let mut latest = Vec::new();
    for p in &proxies {
        let (tx, rx) = watch::channel(None);
        latest.push(rx);
        let answers = tokio::spawn(poll(p.outbound, stop.clone(), tx));
        let revisions = p
            .metrics
            .map(|m| tokio::spawn(read_revisions(m, stop.clone())));
        pollers.push((answers, revisions));
    }
    let mut changes = Vec::new();
    let mut rss_at = BTreeMap::new();
    for k in 1..=a.changes {
        to = 1 - to;
        let at = Instant::now();
        config.set_route(to)?;
        let revision = controller_revision(admin, to).await?;
        // Only to know when to go on: the delays come from every answer, after the run.
        for (i, rx) in latest.iter_mut().enumerate() {
            tokio::time::timeout(
                Duration::from_secs(30),
                rx.wait_for(|a| a.is_some_and(|a| a.got > at && a.backend == Some(to))),
            )
            .await
            .with_context(|| format!("change {k}: {kind:?} {i} still routes by the old split"))??;
        }
        changes.push(Change { at, to, revision });
        tokio::time::sleep(GAP).await;
        if [10, 50, a.changes].contains(&k) {
            rss_at.insert(k, rss(&proxies));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut delays = Vec::new();
    // Per change, the later of the proxies.
    let mut slowest = vec![Some(0.0f64); changes.len()];
    let mut broken = Vec::new();
    let (mut answers, mut checked) = (0, 0);
    for (i, (asked, revisions)) in pollers.into_iter().enumerate() {
        let mut seen = asked.await?;
        if let Some(r) = revisions {
            let r = r.await?;
            seen.revisions = r.revisions;
            seen.errors.extend(r.errors);
        }
        answers += seen.answers.len();
        for e in seen.errors.iter().take(5) {
            broken.push(format!("{kind:?} {i}: {e}"));
        }
        let (d, b, c) = judge(&seen, &changes, kind == Kind::MeshProxy);
        for (s, d) in slowest.iter_mut().zip(&d) {
            *s = s.zip(*d).map(|(s, d)| s.max(d));
        }
        delays.extend(d.into_iter().flatten());
        broken.extend(b.into_iter().map(|b| format!("{kind:?} {i}: {b}")));
        checked += c;
    }
    let slowest: Vec<f64> = slowest.into_iter().flatten().collect();
    let mib = |v: &[f64]| {
        v.iter()
            .map(|m| format!("{m:.1}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    println!(
        "| {:?} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
        kind,
        a.services,
        changes.len(),
        pct(&delays, 0.5),
        pct(&delays, 0.99),
        delays.iter().copied().fold(0.0, f64::max),
        pct(&slowest, 0.5),
        pct(&slowest, 0.99),
        mib(&rss_before),
        rss_at
            .iter()
            .map(|(k, v)| format!("{k}: {}", mib(v)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let ratio = rss_at
        .values()
        .last()
        .map(|after| {
            after
                .iter()
                .zip(&rss_before)
                .map(|(a, b)| a / b)
                .fold(0.0, f64::max)
        })
        .unwrap_or(f64::NAN);
    println!(
        "{kind:?}: {answers} answers; RSS after {} changes / before, worst proxy: {ratio:.2}x{}",
        changes.len(),
        if kind == Kind::MeshProxy {
            format!(
                "; {checked} requests sent after the proxy showed the change's revision, each checked"
            )
        } else {
            String::new()
        }
    );
    ensure!(
        broken.is_empty(),
        "{} answers broke the split:\n{}",
        broken.len(),
        broken
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(to)
}

/// The log filter of the controller and mesh-proxies: with `--logs`, `MESH_LOG` (else
/// warnings); without, warnings only.
fn log_filter(a: &Args) -> String {
    a.logs
        .as_ref()
        .and_then(|_| std::env::var("MESH_LOG").ok())
        .unwrap_or_else(|| "warn".to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let backends = vec![
        Backend::start(BACKENDS[0]).await?,
        Backend::start(BACKENDS[1]).await?,
    ];
    let config = Config::new(a.source, a.services, &backends).await?;
    let temp = tempfile::tempdir()?;
    let dir = match &a.logs {
        Some(logs) => {
            std::fs::create_dir_all(logs).with_context(|| format!("--logs {}", logs.display()))?;
            logs.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let (xds, admin) = (local(free_port()), local(free_port()));
    let mut cmd = Command::new(binary("mesh-controller")?);
    config.controller_args(&mut cmd);
    let started = Instant::now();
    let mut ctl = Peer::spawn(
        cmd.args(["--xds-addr", &xds.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .env("MESH_LOG", log_filter(&a)),
        dir.join("controller.log"),
    )?;
    let ready = eventually(
        Duration::from_secs(120),
        "the controller serving",
        async || tokio::net::TcpStream::connect(xds).await.ok().map(|_| ()),
    )
    .await;
    if let Err(e) = ready {
        bail!("{e}\n{}", ctl.log_text());
    }
    println!(
        "services={} proxies={} changes={} source={:?}; controller serving after {:.0} ms",
        a.services,
        a.proxies,
        a.changes,
        a.source,
        started.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "| proxy | Services | changes | write -> each proxy routes by it: p50 ms | p99 | max | slowest proxy per change: p50 | p99 | RSS MiB before (per proxy) | after changes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut to = 0;
    let mut failed = Vec::new();
    for kind in &a.peers {
        match measure(*kind, &a, &config, xds, admin, &dir, to).await {
            Ok(now) => to = now,
            Err(e) => {
                failed.push(format!("{kind:?}: {e:#}"));
                // Where the route stands now is not known: put it back on the first backend.
                config.set_route(0)?;
                to = 0;
                controller_revision(admin, 0).await?;
            }
        }
    }
    let _ = ctl.child.kill().await;
    ensure!(failed.is_empty(), "{}", failed.join("\n"));
    Ok(())
}
