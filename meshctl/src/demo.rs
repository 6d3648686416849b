//! `meshctl demo`: the whole mesh on loopback, in this process, with no root and no cluster.
//!
//! mesh-ca, mesh-controller (watching a fresh directory of manifests), three versions of a
//! `reviews` service each behind its own mesh-proxy, and a client behind its own mesh-proxy
//! sending steady load over mutual TLS. It puts all traffic on v1 (`meshctl route split`), then
//! runs two releases as `meshctl route rollout` does, which the controller drives and judges:
//! v2 is promoted step by step, v3 (failing 30 % of its requests) is rolled back by the gate.
//! It measures each step from live traffic: the share per version, the success rate, p50 and
//! p99, and that the peers were verified over mTLS.
//!
//! A Gateway `edge` (mesh-proxy in its gateway role, as the gateway's own identity) serves
//! `reviews` over HTTPS on 127.0.0.1 with a self-signed certificate for `localhost`, through
//! the same HTTPRoute as the mesh (its parents are the Service and the Gateway), so a release
//! moves both. With `--via-gateway` the load enters through it instead of the client's proxy.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_api::SpiffeId;
use serde::Serialize;

use crate::cmd::route::{self, Target};
use crate::demo_service::DemoService;
use crate::mesh::LocalDir;
use crate::output::{Output, Table};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// `table`: each step as it is measured, for people; `json` or `yaml`: the results at the end
    /// (progress goes to stderr).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The same as `-o json`.
    #[arg(long, conflicts_with = "output")]
    pub json: bool,
    /// How long each step is measured.
    #[arg(long, value_parser = mesh_api::duration::parse, default_value = "4s")]
    pub step: Duration,
    /// Requests per second the client sends.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// The controller's admin address: its debug API, `meshctl stat`/`top --controller` and
    /// the service graph at `/graph`. Taken elsewhere, any free port is used instead.
    #[arg(long, default_value = "127.0.0.1:15014")]
    pub admin: SocketAddr,
    /// Where the Gateway `edge` serves HTTPS (`https://localhost:PORT/`, a self-signed
    /// certificate). Taken elsewhere, any free port is used instead.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub gateway: SocketAddr,
    /// Send the load through the Gateway over HTTPS, as traffic from outside the mesh enters,
    /// instead of through the client's proxy.
    #[arg(long)]
    pub via_gateway: bool,
}

impl DemoArgs {
    /// `-o`, with `--json` as `-o json`.
    pub fn format(&self) -> Output {
        if self.json { Output::Json } else { self.output }
    }
}

/// One version's figures in a step.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStats {
    pub version: String,
    pub requests: u64,
    /// Percent of the step's requests.
    pub share: f64,
    /// Percent answered 2xx.
    pub success: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub name: String,
    /// What the route says: backend -> weight.
    pub weights: BTreeMap<String, u32>,
    pub requests: u64,
    /// Requests that got no answer from any version (errors, 5xx from the proxy itself).
    pub failed: u64,
    pub success: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub versions: Vec<VersionStats>,
    /// The client's mesh TLS handshakes so far, and whether every server saw the client's
    /// SPIFFE ID (and no peer certificate was refused).
    pub mtls_handshakes: u64,
    pub mtls_verified: bool,
    /// What the mesh's own telemetry measured over the step (`meshctl stat reviews`): per
    /// route and backend, from the client proxy's metrics, as the controller aggregated them.
    pub mesh_stat: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Where the load entered: `client` (its sidecar) or `gateway`.
    pub entry: String,
    /// The Gateway's URL, and the file of its certificate (gone with the demo).
    pub gateway_url: String,
    pub gateway_ca: String,
    /// The identity the servers saw: the client's, or the gateway's with `--via-gateway`.
    pub client_identity: String,
    pub server_identity: String,
    /// Where the controller's admin API (and `/graph`) was.
    pub controller_admin: SocketAddr,
    pub steps: Vec<StepReport>,
    /// The releases the controller drove.
    pub rollouts: Vec<RolloutReport>,
    /// `debug` or `release`: which build of meshctl (and so of the proxies it runs) measured
    /// the latencies. A debug build's are several times a release build's.
    pub build: String,
}

/// Which build this meshctl is: the demo's proxies run in it, so its latencies are that build's.
fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// One answer the client got.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// `v1`, `v2`, ... from the answer; `None` when no version answered.
    version: Option<String>,
    ok: bool,
    latency: Duration,
}

const NS: &str = "default";
const VERSIONS: [(&str, f64); 3] = [("v1", 0.0), ("v2", 0.0), ("v3", 0.3)];

/// The Gateway's name, and the route it shares with the mesh.
const GATEWAY: &str = "edge";

/// The mesh's objects: `reviews` and its versions at `servers` (version, app port, inbound
/// port), and the Gateway with an HTTPS listener on `gateway_port` whose certificate and key
/// are `tls`, sharing the HTTPRoute `reviews` (all on v1) with the mesh.
fn manifests(servers: &[(String, u16, u16)], gateway_port: u16, tls: (&str, &str)) -> String {
    let mut docs = vec![
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {{app: reviews}}\n  ports: [{{name: http, port: 9080}}]\n"
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".into(),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {GATEWAY}, namespace: {NS}}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: https, port: {gateway_port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: {GATEWAY}-cert}}]}}}}\n"
        ),
        mesh_controller::objects::tls_secret_yaml(NS, &format!("{GATEWAY}-cert"), tls.0, tls.1),
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: {NS}}}\nspec:\n  parentRefs:\n  - {{group: '', kind: Service, name: reviews, port: 9080}}\n  - {{name: {GATEWAY}}}\n  rules: [{{backendRefs: [{{name: reviews-v1, port: 9080}}]}}]\n"
        ),
    ];
    for (i, (v, app_port, inbound)) in servers.iter().enumerate() {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews-{v}, namespace: {NS}}}\nspec:\n  clusterIP: 10.96.0.{}\n  selector: {{app: reviews, version: {v}}}\n  ports: [{{name: http, port: 9080, targetPort: {app_port}}}]\n",
            11 + i
        ));
        docs.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: reviews-{v}-0, namespace: {NS}, labels: {{app: reviews, version: {v}, mesh.dev/workload: reviews-{v}, mesh.dev/proxy: 'true'}}}}\nspec: {{serviceAccountName: reviews, containers: [{{name: app}}]}}\nstatus: {{podIP: 127.0.0.1}}\n"
        ));
        docs.push(format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: reviews-{v}-0, namespace: {NS}, labels: {{kubernetes.io/service-name: reviews-{v}}}}}\naddressType: IPv4\nports: [{{name: http, port: {inbound}, protocol: TCP}}]\nendpoints: [{{addresses: ['127.0.0.1'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: reviews-{v}-0, namespace: {NS}}}}}]\n"
        ));
    }
    docs.join("---\n")
}

/// Everything the demo runs; dropped at the end, which stops it all.
struct Mesh {
    _dir: tempfile::TempDir,
    config_dir: std::path::PathBuf,
    _ca: mesh_ca::run::Running,
    controller: mesh_controller::run::Controller,
    _services: Vec<crate::demo_service::Running>,
    servers: Vec<mesh_proxy::Proxy>,
    client: mesh_proxy::Proxy,
    /// The Gateway's proxy, where it listens, and its certificate (PEM, and its file).
    gateway: mesh_proxy::Proxy,
    gateway_addr: SocketAddr,
    gateway_cert: String,
    gateway_ca: std::path::PathBuf,
}

/// Where the load enters the mesh.
#[derive(Clone)]
enum Entry {
    /// The client's proxy, over plaintext HTTP (its outbound listener).
    Client(SocketAddr),
    /// The Gateway, over HTTPS to `localhost`, trusting the Gateway's certificate.
    Gateway(SocketAddr, Arc<tokio_rustls::rustls::ClientConfig>),
}

/// A self-signed certificate for `localhost` and 127.0.0.1, and its key, as PEM.
fn self_signed() -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

async fn start_mesh(args: &DemoArgs, progress: &mut dyn Write) -> anyhow::Result<Mesh> {
    let dir = tempfile::tempdir()?;
    let (ca_dir, config_dir) = (dir.path().join("ca"), dir.path().join("config"));
    std::fs::create_dir_all(&config_dir)?;
    writeln!(
        progress,
        "starting mesh-ca, mesh-controller, 3 versions of reviews and 4 mesh-proxies on 127.0.0.1..."
    )?;
    let ca = mesh_ca::run::Running::start(mesh_ca::run::CaConfig::local(&ca_dir))
        .await
        .context("starting mesh-ca")?;
    let mut controller_config = mesh_controller::config::Config::local(&config_dir);
    // A second demo (or anything else) on the port: any free one.
    controller_config.admin_addr = match std::net::TcpListener::bind(args.admin) {
        Ok(_) => args.admin,
        Err(_) => SocketAddr::new(args.admin.ip(), 0),
    };
    // Stats over the last three quarters of each step (the scrape before the window's start
    // is what it measures from), so that no step shows the one before it.
    controller_config.stats_interval = Duration::from_millis(250);
    controller_config.stats_window = (args.step * 3 / 4).max(Duration::from_millis(750));
    let controller = mesh_controller::run::Controller::start(controller_config)
        .await
        .context("starting mesh-controller")?;
    let tokens = mesh_ca::auth::LocalTokens::load_or_generate(&ca_dir, "cluster.local")?;
    let identify = |config: &mut mesh_proxy::Config, sa: &str| -> anyhow::Result<()> {
        let id = SpiffeId::workload("cluster.local", NS, sa)?;
        let token = dir.path().join(format!("{sa}.token"));
        std::fs::write(&token, tokens.issue(&id))?;
        config.identity_off = false;
        config.service_account = sa.into();
        config.ca_addr = Some(ca.addr.to_string());
        config.ca_root = Some(ca_dir.join(mesh_ca::authority::CERT_FILE));
        config.ca_token_file = token;
        Ok(())
    };
    // The Gateway's listener: the asked-for address, or any free port.
    let gateway_addr = match std::net::TcpListener::bind(args.gateway) {
        Ok(l) => l.local_addr()?,
        Err(_) => std::net::TcpListener::bind(SocketAddr::new(args.gateway.ip(), 0))
            .and_then(|l| l.local_addr())
            .with_context(|| format!("a free port on {} for the Gateway", args.gateway.ip()))?,
    };
    let (gateway_cert, gateway_key) = self_signed()?;
    let gateway_ca = dir.path().join(format!("{GATEWAY}.pem"));
    std::fs::write(&gateway_ca, &gateway_cert)?;
    let mut services = Vec::new();
    let mut servers = Vec::new();
    let mut placed = Vec::new();
    for (v, error_rate) in VERSIONS {
        let svc = DemoService {
            name: "reviews".into(),
            version: v.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::from_millis(1),
            error_rate,
            unhealthy_while: None,
            echo: false,
        }
        .start()
        .await?;
        let mut config =
            mesh_proxy::Config::local(controller.xds_addr, &format!("{NS}/reviews-{v}-0"));
        config.transparent = true;
        config.inbound_orig_dst = Some(svc.addr);
        config.workload = Some(format!("reviews-{v}"));
        identify(&mut config, "reviews")?;
        let proxy = mesh_proxy::Proxy::start(config, None).await?;
        let inbound = proxy
            .inbound_addr
            .context("server proxy inbound listener")?;
        placed.push((v.to_string(), svc.addr.port(), inbound.port()));
        services.push(svc);
        servers.push(proxy);
    }
    std::fs::write(
        config_dir.join("reviews.yaml"),
        manifests(&placed, gateway_addr.port(), (&gateway_cert, &gateway_key)),
    )?;
    let mut config = mesh_proxy::Config::local(controller.xds_addr, &format!("{NS}/productpage-0"));
    config.workload = Some("productpage".into());
    identify(&mut config, "productpage")?;
    let client = mesh_proxy::Proxy::start(config, None).await?;
    let mut config = mesh_proxy::Config::local(controller.xds_addr, &format!("{NS}/{GATEWAY}-0"));
    config.gateway = Some(GATEWAY.into());
    config.gateway_addr = gateway_addr.ip();
    identify(
        &mut config,
        &mesh_api::consts::identity::gateway_service_account(GATEWAY),
    )?;
    let gateway = mesh_proxy::Proxy::start(config, None).await?;
    let all: Vec<&mesh_proxy::Proxy> = servers.iter().chain([&client, &gateway]).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for p in all {
        while !(p.store.is_ready() && p.tls.as_ref().is_some_and(|t| t.identity.has_valid_svid())) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "a proxy got no config or certificate in 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Its own readiness: 503 until it has bound every listener of the Gateway.
    while crate::admin::get_text(gateway.metrics_addr, "/ready")
        .await
        .is_err()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the Gateway's proxy did not bind {gateway_addr} in 20 s (is the port taken?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Mesh {
        _dir: dir,
        config_dir,
        _ca: ca,
        controller,
        _services: services,
        servers,
        client,
        gateway,
        gateway_addr,
        gateway_cert,
        gateway_ca,
    })
}

/// Steady load through `entry`, `GET http://reviews:9080/` (or `https://localhost/` through
/// the Gateway), every answer recorded.
fn start_load(
    entry: Entry,
    rate: u32,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let workers = 8u32;
    let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate.max(1)));
    (0..workers)
        .map(|i| {
            let (samples, stop, entry) = (samples.clone(), stop.clone(), entry.clone());
            tokio::spawn(async move {
                tokio::time::sleep(period.mul_f64(f64::from(i) / f64::from(workers))).await;
                let mut tick = tokio::time::interval(period);
                let mut sender = None;
                while !*stop.borrow() {
                    tick.tick().await;
                    let start = Instant::now();
                    // A stalled connection or handshake is a failed request, never a stuck
                    // worker.
                    let got = match tokio::time::timeout(
                        Duration::from_secs(5),
                        get(&entry, &mut sender),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            sender = None;
                            Err(anyhow::anyhow!("no answer in 5 s"))
                        }
                    };
                    let (version, ok) = match got {
                        Ok((status, body)) => {
                            let version = body
                                .split_whitespace()
                                .nth(1)
                                .filter(|_| body.starts_with("reviews "))
                                .map(str::to_string);
                            (version, (200..300).contains(&status))
                        }
                        Err(_) => (None, false),
                    };
                    if let Ok(mut s) = samples.lock() {
                        s.push(Sample {
                            at: start,
                            version,
                            ok,
                            latency: start.elapsed(),
                        });
                    }
                }
            })
        })
        .collect()
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection over `io`, driven by a task of its own.
async fn http1<IO>(io: IO) -> anyhow::Result<Sender>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn get(entry: &Entry, sender: &mut Option<Sender>) -> anyhow::Result<(u16, String)> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        let tx = match entry {
            Entry::Client(addr) => http1(tokio::net::TcpStream::connect(addr).await?).await?,
            Entry::Gateway(addr, tls) => {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")?;
                http1(
                    tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await?,
                )
                .await?
            }
        };
        *sender = Some(tx);
    }
    let tx = sender.as_mut().context("no connection")?;
    tx.ready().await?;
    let host = match entry {
        Entry::Client(_) => "reviews:9080".to_string(),
        Entry::Gateway(addr, _) => format!("localhost:{}", addr.port()),
    };
    let req = hyper::Request::get("/")
        .header("host", host)
        .body(Empty::new())?;
    let resp = match tx.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            *sender = None;
            return Err(e.into());
        }
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn stats(samples: &[Sample]) -> (u64, f64, f64, f64) {
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    lat.sort();
    let ok = samples.iter().filter(|s| s.ok).count();
    let n = samples.len().max(1);
    (
        samples.len() as u64,
        ok as f64 * 100.0 / n as f64,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

/// The candidate's percent at each step of the demo's rollouts.
const ROLLOUT_STEPS: [u32; 3] = [10, 50, 100];

/// One rollout the demo ran, as the controller decided it.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    pub candidate: String,
    /// How it ended: `Promoted` or `RolledBack`.
    pub phase: String,
    /// Every decision, with the measurements the controller made it on.
    pub decisions: Vec<mesh_api::rollout::Decision>,
}

fn print_step(i: usize, s: &StepReport, out: &mut dyn Write) -> anyhow::Result<()> {
    let weights: Vec<String> = s.weights.iter().map(|(b, w)| format!("{b}={w}")).collect();
    writeln!(out)?;
    if i == 0 && build() == "debug" {
        writeln!(
            out,
            "(latencies below are a debug build's, several times a release build's: \
             docs/benchmarks.md has the mesh's own figures)"
        )?;
    }
    writeln!(out, "step {}: {} ({})", i + 1, s.name, weights.join(", "))?;
    let mut t = Table::new([
        "VERSION", "SHARE", "REQUESTS", "SUCCESS", "P50 ms", "P99 ms",
    ])
    .right(&[1, 2, 3, 4, 5])
    .indent("  ");
    for v in &s.versions {
        t.row([
            v.version.clone(),
            format!("{:.1}%", v.share),
            v.requests.to_string(),
            format!("{:.1}%", v.success),
            format!("{:.2}", v.p50_ms),
            format!("{:.2}", v.p99_ms),
        ]);
    }
    t.row([
        "all".to_owned(),
        String::new(),
        s.requests.to_string(),
        format!("{:.1}%", s.success),
        format!("{:.2}", s.p50_ms),
        format!("{:.2}", s.p99_ms),
    ]);
    t.write(out)?;
    writeln!(
        out,
        "  mTLS: {} ({} handshakes from the entry proxy so far)",
        if s.mtls_verified {
            "every peer verified"
        } else {
            "NOT verified"
        },
        s.mtls_handshakes
    )?;
    writeln!(
        out,
        "  the mesh's own telemetry (meshctl stat reviews -n {NS}), from the proxies' metrics:"
    )?;
    let mut table = Vec::new();
    crate::cmd::stat::write_stat(&s.mesh_stat, NS, &mut table)?;
    for line in String::from_utf8_lossy(&table).lines() {
        writeln!(out, "    {line}")?;
    }
    Ok(())
}

fn print_rollout(r: &RolloutReport, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "the controller's decisions on the rollout to {} ({}):",
        r.candidate, r.phase
    )?;
    for d in &r.decisions {
        let measured = if d.candidate.requests > 0 {
            format!(
                " [candidate: {} requests, success {}, p99 {}]",
                d.candidate.requests,
                d.candidate
                    .success_rate
                    .map_or_else(|| "-".into(), |r| format!("{r:.2} %")),
                d.candidate
                    .p99_ms
                    .map_or_else(|| "-".into(), |p| format!("{p:.1} ms"))
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  step {} {}: {}{measured}",
            d.step + 1,
            d.action,
            d.reason
        )?;
    }
    Ok(())
}

/// Whether a proxy routes `reviews` by these shares: the client's (its outbound route), or
/// the Gateway's (its listener's route).
fn applied(
    s: &mesh_proxy::state::Snapshot,
    gateway_port: Option<u16>,
    to: &[(String, u32)],
) -> bool {
    let running = match gateway_port {
        None => s.backend_weights(
            mesh_api::consts::xds::OUTBOUND_HTTP_ROUTE,
            &format!("reviews.{NS}."),
        ),
        Some(port) => s.backend_weights(&format!("gateway/{NS}/{GATEWAY}/{port}/https"), "https/"),
    };
    // Shares, not raw weights: a lone backend may run at weight 1.
    let total: u64 = running.iter().map(|(_, w)| u64::from(*w)).sum();
    let want: u64 = to.iter().map(|(_, w)| u64::from(*w)).sum();
    total > 0
        && to.iter().all(|(backend, w)| {
            let rw: u64 = running
                .iter()
                .filter(|(c, _)| c.contains(&format!("|{backend}.")))
                .map(|(_, w)| u64::from(*w))
                .sum();
            rw * want == u64::from(*w) * total
        })
}

/// Waits until the client's proxy and the Gateway's route by `to`.
async fn wait_applied(mesh: &Mesh, to: &[(String, u32)]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for (p, port, what) in [
        (&mesh.client, None, "the client proxy"),
        (
            &mesh.gateway,
            Some(mesh.gateway_addr.port()),
            "the Gateway's proxy",
        ),
    ] {
        while !p.store.load().is_some_and(|s| applied(&s, port, to)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{what} did not get the new route in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// What the demo measures over one step: its samples from `from` to `until`, the peers'
/// mTLS, and the mesh's own telemetry.
struct Measure<'a> {
    mesh: &'a Mesh,
    samples: &'a Mutex<Vec<Sample>>,
    ctl: crate::admin::Endpoint,
    /// The proxy the load enters by (the client's or the Gateway's).
    entry: &'a mesh_proxy::Proxy,
    /// The entry proxy's identity, which the servers see.
    client_id: &'a SpiffeId,
}

impl Measure<'_> {
    async fn step(
        &self,
        name: String,
        to: &[(String, u32)],
        from: Instant,
        until: Instant,
    ) -> anyhow::Result<StepReport> {
        let window: Vec<Sample> = self
            .samples
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|x| x.at >= from && x.at < until)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (requests, success, p50, p99) = stats(&window);
        let versions = VERSIONS
            .iter()
            .filter_map(|(v, _)| {
                let mine: Vec<Sample> = window
                    .iter()
                    .filter(|s| s.version.as_deref() == Some(*v))
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                let (n, success, p50, p99) = stats(&mine);
                Some(VersionStats {
                    version: v.to_string(),
                    requests: n,
                    share: n as f64 * 100.0 / requests.max(1) as f64,
                    success,
                    p50_ms: p50,
                    p99_ms: p99,
                })
            })
            .collect();
        let client_metrics = self.entry.metrics.encode();
        let handshakes = mesh_api::prom::count(
            &client_metrics,
            "mesh_proxy_tls_handshakes_total{direction=\"outbound\"}",
        );
        let peer_line = format!(
            "mesh_proxy_inbound_mtls_connections_total{{peer=\"{}\"}}",
            self.client_id
        );
        let refused = |m: &str| {
            m.lines()
                .any(|l| l.starts_with("mesh_proxy_tls_peer_refused_total"))
        };
        let weight = |v: &str| {
            to.iter()
                .find(|(b, _)| *b == format!("reviews-{v}"))
                .map_or(0, |(_, w)| *w)
        };
        let verified = handshakes > 0
            && !refused(&client_metrics)
            && self
                .mesh
                .servers
                .iter()
                .zip(VERSIONS)
                .filter(|(_, (v, _))| weight(v) > 0)
                .all(|(p, _)| {
                    let m = p.metrics.encode();
                    mesh_api::prom::count(&m, &peer_line) > 0 && !refused(&m)
                });
        let mesh_stat = crate::cmd::stat::fetch_stat(&self.ctl, NS, "reviews").await?;
        Ok(StepReport {
            mesh_stat,
            name,
            weights: to.iter().cloned().collect(),
            requests,
            failed: window.iter().filter(|s| s.version.is_none()).count() as u64,
            success,
            p50_ms: p50,
            p99_ms: p99,
            versions,
            mtls_handshakes: handshakes,
            mtls_verified: verified,
        })
    }
}

/// The rollout's status, once the controller has taken up the release to `candidate`.
fn rollout_status(
    dir: &std::path::Path,
    candidate: &str,
) -> anyhow::Result<Option<mesh_api::rollout::RolloutStatus>> {
    let st = mesh_controller::rollout::store::read_local_status(dir, NS, "reviews")?;
    Ok(st.filter(|s| s.candidate == candidate && !s.decisions.is_empty()))
}

pub async fn run(
    args: &DemoArgs,
    out: &mut dyn Write,
    progress: &mut dyn Write,
) -> anyhow::Result<DemoReport> {
    // A spinner says what the demo waits for; the lines of both outputs go around it.
    let spin = crate::progress::Progress::spinner();
    let mut progress = spin.around(progress);
    let progress: &mut dyn Write = &mut progress;
    let mut out = spin.around(out);
    let out: &mut dyn Write = &mut out;
    spin.message("starting the mesh");
    let mesh = start_mesh(args, progress).await?;
    let admin = mesh.controller.admin_addr;
    writeln!(
        progress,
        "the controller's admin API is at http://{admin}: the service graph at http://{admin}/graph; meshctl stat reviews -n {NS} --controller {admin}; meshctl top --controller {admin} (open to this machine's users: loopback callers)"
    )?;
    let gateway_url = format!("https://localhost:{}/", mesh.gateway_addr.port());
    writeln!(
        progress,
        "the Gateway {GATEWAY} serves reviews at {gateway_url} (curl --cacert {} {gateway_url}), into the mesh over mTLS as its own identity",
        mesh.gateway_ca.display()
    )?;
    let (entry_proxy, client_sa) = if args.via_gateway {
        (
            &mesh.gateway,
            mesh_api::consts::identity::gateway_service_account(GATEWAY),
        )
    } else {
        (&mesh.client, "productpage".to_string())
    };
    let client_id = SpiffeId::workload("cluster.local", NS, &client_sa)?;
    let server_id = SpiffeId::workload("cluster.local", NS, "reviews")?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let local = LocalDir::new(&mesh.config_dir)?;
    let target = Target {
        service: "reviews".into(),
        namespace: Some(NS.into()),
        port: None,
    };
    let entry = if args.via_gateway {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for c in mesh_api::tls::certs_from_pem(&mesh.gateway_cert, "the Gateway's certificate")
            .map_err(|e| anyhow::anyhow!(e))?
        {
            roots.add(c)?;
        }
        let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
            tokio_rustls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Entry::Gateway(mesh.gateway_addr, Arc::new(tls))
    } else {
        Entry::Client(
            mesh.client
                .outbound_http_addr
                .context("client proxy listener")?,
        )
    };
    let measure = Measure {
        mesh: &mesh,
        samples: &samples,
        ctl: crate::admin::Endpoint::Direct(admin),
        entry: entry_proxy,
        client_id: &client_id,
    };
    let mut steps = Vec::new();
    let mut rollouts = Vec::new();
    let show = |steps: &Vec<StepReport>, out: &mut dyn Write| -> anyhow::Result<()> {
        match steps.last() {
            Some(s) if args.format() == Output::Table => print_step(steps.len() - 1, s, out),
            _ => Ok(()),
        }
    };

    // All traffic on v1, by hand (`meshctl route split`), before the first release.
    let to = vec![("reviews-v1".to_string(), 100)];
    route::split(&local, &target, &to).context("changing the route")?;
    writeln!(progress, "step 1: all traffic on v1 (meshctl route split)")?;
    spin.message("waiting for the proxies to apply the route");
    wait_applied(&mesh, &to).await?;
    let load = start_load(entry, args.rate, samples.clone(), stop_rx.clone());
    writeln!(progress, "  measuring {:?} of live traffic", args.step)?;
    spin.message("measuring live traffic");
    let from = Instant::now();
    tokio::time::sleep(args.step).await;
    steps.push(
        measure
            .step("all traffic on v1".into(), &to, from, Instant::now())
            .await?,
    );
    show(&steps, out)?;

    // Two releases the controller drives and judges: v2 (healthy) and v3 (fails 30 %).
    let min_requests =
        ((f64::from(args.rate) * args.step.as_secs_f64() * 0.05).round() as u32).max(20);
    for candidate in ["reviews-v2", "reviews-v3"] {
        let rollout = crate::cmd::rollout::RolloutArgs {
            target: Target {
                service: "reviews".into(),
                namespace: Some(NS.into()),
                port: None,
            },
            to: candidate.into(),
            from: None,
            steps: ROLLOUT_STEPS.to_vec(),
            header: None,
            interval: match args.step.as_millis() {
                ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
                ms => format!("{ms}ms"),
            },
            min_requests,
            success_rate: Some(99.0),
            p99: Some("250ms".into()),
        };
        writeln!(
            progress,
            "rollout to {candidate}: meshctl route rollout reviews --to {candidate} --steps {} --interval {} --min-requests {min_requests} --success-rate 99 --p99 250ms",
            ROLLOUT_STEPS.map(|s| s.to_string()).join(","),
            rollout.interval
        )?;
        crate::cmd::rollout::create(&local, &rollout).context("writing the rollout")?;
        let deadline = Instant::now() + args.step * 12 + Duration::from_secs(30);
        spin.message(&format!(
            "waiting for the controller to start the rollout to {candidate}"
        ));
        let mut seen = 0;
        let last = loop {
            let st = loop {
                match rollout_status(&mesh.config_dir, candidate)? {
                    Some(st) if st.decisions.len() > seen => break st,
                    _ => {}
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the controller did not take the rollout to {candidate} further"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            seen = st.decisions.len();
            let decision = st.decisions.last().cloned().unwrap_or_default();
            writeln!(
                progress,
                "  the controller: step {} {}: {}",
                decision.step + 1,
                decision.action,
                decision.reason
            )?;
            let to: Vec<(String, u32)> = st
                .weights
                .iter()
                .map(|b| (b.name.clone(), b.weight))
                .collect();
            let name = match st.phase {
                mesh_api::rollout::RolloutPhase::Progressing => format!(
                    "rollout to {}: step {} of {}, {} % to it",
                    candidate.trim_start_matches("reviews-"),
                    st.step + 1,
                    ROLLOUT_STEPS.len(),
                    ROLLOUT_STEPS.get(st.step as usize).copied().unwrap_or(0)
                ),
                mesh_api::rollout::RolloutPhase::Promoted => format!(
                    "promoted by the gates: all on {}",
                    candidate.trim_start_matches("reviews-")
                ),
                mesh_api::rollout::RolloutPhase::RolledBack => format!(
                    "rolled back by the gate: all on {}",
                    st.stable.trim_start_matches("reviews-")
                ),
                other => anyhow::bail!("the rollout to {candidate} ended {other:?}: {st:?}"),
            };
            spin.message("waiting for the proxies to apply the route");
            wait_applied(&mesh, &to).await?;
            let from = Instant::now();
            let done = st.phase.is_done();
            writeln!(
                progress,
                "step {}: {name}: the client's proxy routes by it; measuring {}",
                steps.len() + 1,
                if done {
                    format!("{:?} of live traffic", args.step)
                } else {
                    "until the controller judges the step".into()
                }
            )?;
            if done {
                // The end state, measured like the first step.
                spin.message("measuring live traffic");
                tokio::time::sleep(args.step).await;
            } else {
                spin.message("measuring live traffic until the controller judges the step");
                // Until the controller decides again.
                while rollout_status(&mesh.config_dir, candidate)?
                    .is_none_or(|s| s.decisions.len() == seen)
                {
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the controller did not judge step {} of the rollout to {candidate}",
                        st.step + 1
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            steps.push(measure.step(name, &to, from, Instant::now()).await?);
            show(&steps, out)?;
            if done {
                break st;
            }
        };
        let report = RolloutReport {
            candidate: candidate.into(),
            phase: format!("{:?}", last.phase),
            decisions: last.decisions,
        };
        if args.format() == Output::Table {
            print_rollout(&report, out)?;
        }
        rollouts.push(report);
    }
    stop_tx.send_replace(true);
    for t in load {
        let _ = t.await;
    }
    let report = DemoReport {
        entry: if args.via_gateway {
            "gateway"
        } else {
            "client"
        }
        .into(),
        gateway_url,
        gateway_ca: mesh.gateway_ca.display().to_string(),
        controller_admin: admin,
        client_identity: client_id.to_string(),
        server_identity: server_id.to_string(),
        steps,
        rollouts,
        build: build().into(),
    };
    crate::output::print(args.format(), &report, out, |report, out| {
        writeln!(out)?;
        writeln!(
            out,
            "The controller promoted v2 and rolled v3 back by its gates, from the mesh's own measurements; the load's entry ({}) reached every version over mutual TLS, each version's proxy presenting {}.",
            report.client_identity, report.server_identity
        )?;
        Ok(())
    })?;
    Ok(report)
}
