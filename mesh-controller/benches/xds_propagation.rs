//! Benchmark (not a test): time from a manifest change on disk to every simulated proxy's
//! ACK, with N Services and C Delta-xDS clients that subscribe as a transparent sidecar would
//! (CDS and LDS wildcard, EDS for every cluster, RDS for every route), plus the controller's
//! RSS and CPU. The controller runs as its own process (`MESH_CONTROLLER_BIN`, a release build);
//! the clients run here. `scripts/bench-xds` builds and runs it; results go to
//! `docs/benchmarks.md`.
//!
//! With `--scoped`, each client is a scoped sidecar (`mesh.dev/scoped`) that uses
//! [`SCOPED_USES`] Services, `svc-0` (the one that changes) among them: its wildcard is the
//! fixed set, and it subscribes by name to those Services' address listeners, clusters,
//! endpoints and routes, and to the clusters and endpoints of the route's backends. With
//! `--workloads W` as well, the clients are W workloads (`mesh.dev/workload`) whose replicas
//! use the same Services, so what each looks up is learned and sent to the others of its
//! workload; otherwise each is its own.
//!
//! Usage: xds_propagation --services N --clients C --changes M --namespaces K [--scoped]
//! [--workloads W]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use mesh_controller::xds::resources::ResourceType;
use prost::Message;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

struct Args {
    services: usize,
    clients: usize,
    changes: usize,
    namespaces: usize,
    scoped: bool,
    /// Workloads the clients are spread over (`None`: each its own).
    workloads: Option<usize>,
}

/// How many Services a scoped client uses.
const SCOPED_USES: usize = 10;

fn args() -> Args {
    let mut a = Args {
        services: 1000,
        clients: 100,
        changes: 40,
        namespaces: 10,
        scoped: false,
        workloads: None,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let val = || {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", argv[i]))
        };
        match argv[i].as_str() {
            "--services" => a.services = val(),
            "--clients" => a.clients = val(),
            "--changes" => a.changes = val(),
            "--namespaces" => a.namespaces = val(),
            "--workloads" => a.workloads = Some(val()),
            "--scoped" => {
                a.scoped = true;
                i += 1;
                continue;
            }
            // cargo bench passes --bench; ignore flags we do not know.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn svc_ns(i: usize, k: usize) -> (String, String) {
    (format!("svc-{i}"), format!("ns-{}", i % k))
}

fn write_config(dir: &Path, a: &Args) -> std::io::Result<()> {
    for (name, text) in mesh_controller::testing::scale_manifests(a.services, a.namespaces) {
        std::fs::write(dir.join(name), text)?;
    }
    write_marker_slice(dir, a, 0)?;
    write_marker_route(dir, a, 0)
}

/// svc-0's second EndpointSlice: its address carries the change number.
fn write_marker_slice(dir: &Path, a: &Args, k: usize) -> std::io::Result<()> {
    let ns = svc_ns(0, a.namespaces).1;
    atomic(
        dir,
        "marker-slice.yaml",
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-0-marker, namespace: {ns}, labels: {{kubernetes.io/service-name: svc-0}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['10.255.{}.{}']}}]\n",
            k / 256,
            k % 256
        ),
    )
}

/// An HTTPRoute on svc-0 whose first weight carries the change number.
fn write_marker_route(dir: &Path, a: &Args, k: usize) -> std::io::Result<()> {
    let ns = svc_ns(0, a.namespaces).1;
    let (b1, b2) = (
        svc_ns(a.namespaces, a.namespaces).0,
        svc_ns(2 * a.namespaces, a.namespaces).0,
    );
    atomic(
        dir,
        "marker-route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: svc-0, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: svc-0, port: 80}}]\n  rules:\n  - backendRefs: [{{name: {b1}, port: 80, weight: {}}}, {{name: {b2}, port: 80, weight: 10}}]\n",
            1000 + k
        ),
    )
}

fn atomic(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, dir.join(name))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Change {
    Endpoints,
    Route,
}

/// A Delta client that subscribes like a transparent sidecar and reports when it ACKs a
/// response carrying marker `k`.
async fn client(
    id: usize,
    a: Arc<Args>,
    xds: String,
    report: mpsc::UnboundedSender<(usize, Change, usize, Instant)>,
) -> anyhow::Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(xds)
        .await?
        .max_decoding_message_size(256 << 20);
    let (tx, rx) = mpsc::channel(64);
    let mut stream = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let ns = format!("ns-{}", id % a.namespaces);
    let mut fields = std::collections::BTreeMap::new();
    let yes = || Value {
        kind: Some(value::Kind::StringValue("true".into())),
    };
    fields.insert("mesh.dev/transparent".to_string(), yes());
    if a.scoped {
        fields.insert("mesh.dev/scoped".to_string(), yes());
    }
    if let Some(w) = a.workloads {
        // A workload is keyed with its namespace: clients `id` and `id + w` share one when
        // they share a namespace too (w a multiple of --namespaces keeps each whole).
        fields.insert(
            "mesh.dev/workload".to_string(),
            Value {
                kind: Some(value::Kind::StringValue(format!("client-w{}", id % w))),
            },
        );
    }
    // A scoped client's Services: svc-0, the route's two backends, and others of its own.
    let domain = "cluster.local";
    let fqdn = |i: usize| {
        let (name, ns) = svc_ns(i, a.namespaces);
        format!("{name}.{ns}.svc.{domain}")
    };
    let mut uses = BTreeSet::new();
    if a.scoped {
        uses.extend([0, a.namespaces, 2 * a.namespaces]);
        // The replicas of a workload call the same Services; clients of no shared workload
        // each their own.
        let mut k = a.workloads.map_or(id, |w| id % w) * SCOPED_USES;
        while uses.len() < SCOPED_USES.min(a.services) {
            uses.insert(k % a.services);
            k += 1;
        }
    }
    let by_name = |f: &dyn Fn(usize) -> String| -> Vec<String> {
        std::iter::once("*".to_string())
            .chain(uses.iter().map(|i| f(*i)))
            .collect()
    };
    let (lds, cds) = if a.scoped {
        (
            by_name(&|i| format!("{}_80", mesh_controller::testing::scale_ip(i))),
            by_name(&|i| format!("outbound|80||{}", fqdn(i))),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let node = Node {
        id: format!("{ns}/client-{id}"),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    };
    tx.send(DeltaDiscoveryRequest {
        node: Some(node),
        type_url: ResourceType::Cluster.type_url(),
        resource_names_subscribe: cds,
        ..Default::default()
    })
    .await?;
    tx.send(DeltaDiscoveryRequest {
        type_url: ResourceType::Listener.type_url(),
        resource_names_subscribe: lds,
        ..Default::default()
    })
    .await?;
    let marker_ns = svc_ns(0, a.namespaces).1;
    let marker_cluster = format!("outbound|80||svc-0.{marker_ns}.svc.{domain}");
    let marker_route = format!("svc-0.{marker_ns}.svc.{domain}:80");
    let mut eds = BTreeSet::new();
    let mut rds = BTreeSet::new();
    while let Some(resp) = stream.next().await {
        let resp = resp?;
        let now = Instant::now();
        let ty = ResourceType::from_type_url(&resp.type_url);
        let mut new_eds = Vec::new();
        let mut new_rds = Vec::new();
        for r in &resp.resources {
            match ty {
                Some(ResourceType::Cluster)
                    if r.name.starts_with("outbound|") && eds.insert(r.name.clone()) =>
                {
                    new_eds.push(r.name.clone());
                    if let Some(host) = r.name.strip_prefix("outbound|80||")
                        && rds.insert(format!("{host}:80"))
                    {
                        new_rds.push(format!("{host}:80"));
                    }
                }
                Some(ResourceType::Endpoint) if r.name == marker_cluster => {
                    let cla = ClusterLoadAssignment::decode(
                        r.resource
                            .as_ref()
                            .map(|a| a.value.as_slice())
                            .unwrap_or_default(),
                    )?;
                    for ep in cla.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
                        if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &ep.host_identifier
                            && let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) = e.address.as_ref().and_then(|a| a.address.as_ref())
                            && let Some(rest) = sa.address.strip_prefix("10.255.")
                            && let Some((hi, lo)) = rest.split_once('.')
                        {
                            let k = hi.parse::<usize>()? * 256 + lo.parse::<usize>()?;
                            let _ = report.send((id, Change::Endpoints, k, now));
                        }
                    }
                }
                Some(ResourceType::Route) if r.name == marker_route => {
                    let rc = RouteConfiguration::decode(
                        r.resource
                            .as_ref()
                            .map(|a| a.value.as_slice())
                            .unwrap_or_default(),
                    )?;
                    if let Some(route::Action::Route(action)) = rc
                        .virtual_hosts
                        .first()
                        .and_then(|v| v.routes.first())
                        .and_then(|r| r.action.as_ref())
                        && let Some(route_action::ClusterSpecifier::WeightedClusters(w)) =
                            &action.cluster_specifier
                        && let Some(weight) = w.clusters.first().and_then(|c| c.weight)
                    {
                        let _ = report.send((id, Change::Route, weight.value as usize - 1000, now));
                    }
                }
                _ => {}
            }
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if !new_eds.is_empty() {
            tx.send(DeltaDiscoveryRequest {
                type_url: ResourceType::Endpoint.type_url(),
                resource_names_subscribe: new_eds,
                ..Default::default()
            })
            .await?;
        }
        if !new_rds.is_empty() {
            if rds.len() == new_rds.len() {
                new_rds.push("outbound_http".into());
            }
            tx.send(DeltaDiscoveryRequest {
                type_url: ResourceType::Route.type_url(),
                resource_names_subscribe: new_rds,
                ..Default::default()
            })
            .await?;
        }
    }
    Ok(())
}

fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(args());
    let bin = std::env::var_os("MESH_CONTROLLER_BIN")
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("set MESH_CONTROLLER_BIN to a release mesh-controller"))?;
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), &a)?;
    let (xds_port, admin_port) = (free_port(), free_port());
    let mut ctl = tokio::process::Command::new(&bin)
        .args(["--config-dir", &dir.path().display().to_string()])
        .args([
            "--xds-addr",
            &format!("127.0.0.1:{xds_port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .env("MESH_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = ctl.id().unwrap_or_default();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", xds_port))
        .await
        .is_err()
    {
        if let Some(status) = ctl.try_wait()? {
            anyhow::bail!("controller exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load = started.elapsed();
    let rss_loaded = proc_status(pid, "VmRSS:").unwrap_or_default();

    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    let xds = format!("http://127.0.0.1:{xds_port}");
    let t_connect = Instant::now();
    let errors = Arc::new(Mutex::new(Vec::new()));
    for id in 0..a.clients {
        let (a, xds, tx, errors) = (a.clone(), xds.clone(), report_tx.clone(), errors.clone());
        tokio::spawn(async move {
            if let Err(e) = client(id, a, xds, tx).await {
                errors.lock().await.push(format!("client {id}: {e}"));
            }
        });
    }
    // Wait for every client to hold the initial markers (0 for both kinds).
    let mut have: HashMap<(Change, usize), BTreeSet<usize>> = HashMap::new();
    let wait_all = |have: &HashMap<(Change, usize), BTreeSet<usize>>, c: Change, k: usize| {
        have.get(&(c, k)).map_or(0, BTreeSet::len) >= a.clients
    };
    let record = |have: &mut HashMap<(Change, usize), BTreeSet<usize>>,
                  (id, c, k, _t): (usize, Change, usize, Instant)| {
        have.entry((c, k)).or_default().insert(id);
    };
    while !(wait_all(&have, Change::Endpoints, 0) && wait_all(&have, Change::Route, 0)) {
        let msg = tokio::time::timeout(Duration::from_secs(120), report_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("clients gone"))?;
        record(&mut have, msg);
    }
    let initial = t_connect.elapsed();
    let rss_connected = proc_status(pid, "VmRSS:").unwrap_or_default();
    let cpu_before = proc_cpu_secs(pid).unwrap_or_default();

    let mut all_acked: HashMap<Change, Vec<f64>> = HashMap::new();
    let mut per_client: HashMap<Change, Vec<f64>> = HashMap::new();
    for k in 1..=a.changes {
        let change = if k % 2 == 1 {
            Change::Endpoints
        } else {
            Change::Route
        };
        let t0 = Instant::now();
        match change {
            Change::Endpoints => write_marker_slice(dir.path(), &a, k)?,
            Change::Route => write_marker_route(dir.path(), &a, k)?,
        }
        let mut acked = BTreeSet::new();
        let mut last = t0;
        while acked.len() < a.clients {
            let (id, c, kk, t) = tokio::time::timeout(Duration::from_secs(30), report_rx.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "change {k}: only {} of {} clients ACKed in 30 s",
                        acked.len(),
                        a.clients
                    )
                })?
                .ok_or_else(|| anyhow::anyhow!("clients gone"))?;
            if c == change && kk == k && acked.insert(id) {
                let ms = t.duration_since(t0).as_secs_f64() * 1e3;
                per_client.entry(change).or_default().push(ms);
                last = last.max(t);
            }
        }
        all_acked
            .entry(change)
            .or_default()
            .push(last.duration_since(t0).as_secs_f64() * 1e3);
        // Let each change stand alone rather than be merged by the debounce.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let cpu = proc_cpu_secs(pid).unwrap_or_default() - cpu_before;
    let rss_peak = proc_status(pid, "VmHWM:").unwrap_or_default();
    let errs = errors.lock().await.clone();
    anyhow::ensure!(errs.is_empty(), "client errors: {errs:?}");

    println!(
        "services={} clients={} namespaces={} changes={}",
        a.services, a.clients, a.namespaces, a.changes
    );
    println!(
        "controller: config loaded and serving after {:.0} ms; initial config to all clients in {:.0} ms",
        load.as_secs_f64() * 1e3,
        initial.as_secs_f64() * 1e3
    );
    println!(
        "controller RSS: {:.1} MiB loaded, {:.1} MiB with clients connected, {:.1} MiB peak; CPU {:.2} s over {} changes",
        rss_loaded as f64 / 1048576.0,
        rss_connected as f64 / 1048576.0,
        rss_peak as f64 / 1048576.0,
        cpu,
        a.changes
    );
    println!(
        "| change | file write -> every proxy ACKed: p50 | p90 | p99 | max | per proxy p50 | per proxy p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in [Change::Endpoints, Change::Route] {
        let mut v = all_acked.remove(&c).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        let mut pc = per_client.remove(&c).unwrap_or_default();
        pc.sort_by(f64::total_cmp);
        println!(
            "| {c:?} ({} changes) | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            v.len(),
            pct(&v, 50.0),
            pct(&v, 90.0),
            pct(&v, 99.0),
            v.last().copied().unwrap_or(f64::NAN),
            pct(&pc, 50.0),
            pct(&pc, 99.0)
        );
    }
    if let Some(metrics) = fetch_metrics(admin_port).await {
        let get = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum()
        };
        let (sum, count) = (
            get("mesh_controller_model_build_seconds_sum"),
            get("mesh_controller_model_build_seconds_count"),
        );
        let (psum, pcount) = (
            get("mesh_controller_xds_push_latency_seconds_sum"),
            get("mesh_controller_xds_push_latency_seconds_count"),
        );
        println!(
            "inside the controller: model build + shared translation {:.1} ms on average over {count} builds; change seen -> response queued {:.1} ms on average over {pcount} responses",
            sum / count.max(1.0) * 1e3,
            psum / pcount.max(1.0) * 1e3
        );
    }
    let _ = ctl.kill().await;
    Ok(())
}

async fn fetch_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}
