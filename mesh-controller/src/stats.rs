//! Golden signals from the proxies' own metrics: the controller scrapes every connected
//! proxy's `/metrics` on an interval, keeps a window of scrapes, and answers from the change
//! over that window. It serves who talks to whom (edges), the busiest workloads (top), and one
//! Service's traffic per route and backend (stat, so a canary's versions show side by side).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh_api::prom::Sample;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use crate::index::{Model, SvcKey};
use crate::xds::status::StatusTable;

const REQUESTS: &str = "mesh_proxy_requests_total";
const BUCKETS: &str = "mesh_proxy_request_duration_seconds_bucket";
/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most a metrics page may hold.
const MAX_PAGE: usize = 16 * 1024 * 1024;

/// Every proxied pod of the model, scraped at `port` while `when` holds. The Lease holder,
/// which drives rollouts, scrapes them all: with several controller replicas each one streams
/// to only some of the proxies, and a rollout's step is judged on all of its callers.
#[derive(Clone)]
pub struct AllPods {
    pub hub: Arc<crate::xds::server::Hub>,
    pub when: Arc<std::sync::atomic::AtomicBool>,
    /// mesh-proxy's metrics port (`ports::PROXY_METRICS`).
    pub port: u16,
}

impl std::fmt::Debug for AllPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllPods")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// One proxy's request series at one moment.
#[derive(Debug)]
struct Scrape {
    at: Instant,
    samples: Vec<(Arc<Series>, f64)>,
}

/// A series' name and labels. A proxy's page repeats the same series at every scrape and only
/// the values change, so the scrapes of one proxy share them: a window of scrapes costs a
/// value per series and scrape, not a copy of every label.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
}

impl Series {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// The scrapes of every connected proxy, newest last.
#[derive(Debug)]
pub struct Stats {
    pub interval: Duration,
    pub window: Duration,
    scrapes: Mutex<HashMap<String, VecDeque<Scrape>>>,
    tallies: Mutex<Tallies>,
}

/// Outbound requests of some routes counted since the controller started (or since the route
/// was tracked), per route and backend Service: what a rollout judges a step by, however long
/// the step is. Only routes [`Stats::track`] names are counted.
#[derive(Debug, Default)]
struct Tallies {
    /// `Kind/namespace/name` of each route counted.
    routes: std::collections::BTreeSet<String>,
    /// By (route, backend Service `namespace/name`).
    counts: HashMap<(String, String), Tally>,
}

/// Requests counted so far: failures and latency buckets with them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub requests: f64,
    pub failures: f64,
    /// Cumulative counts by upper bound (seconds).
    pub buckets: BTreeMap<OrdF64, f64>,
}

impl Tally {
    /// What was counted after `earlier` (a tally of the same series taken before).
    pub fn since(&self, earlier: &Tally) -> Tally {
        Tally {
            requests: (self.requests - earlier.requests).max(0.0),
            failures: (self.failures - earlier.failures).max(0.0),
            buckets: self
                .buckets
                .iter()
                .map(|(le, n)| {
                    let before = earlier.buckets.get(le).copied().unwrap_or(0.0);
                    (*le, (n - before).max(0.0))
                })
                .collect(),
        }
    }

    /// Percent answered without a 5xx or an error; `None` without requests.
    pub fn success_percent(&self) -> Option<f64> {
        (self.requests > 0.0).then(|| 100.0 * (1.0 - self.failures / self.requests))
    }

    pub fn p99_ms(&self) -> Option<f64> {
        quantile(0.99, &self.buckets).map(|s| s * 1000.0)
    }

    fn add(&mut self, d: &Delta<'_>) {
        if d.series.name == REQUESTS {
            self.requests += d.count;
            if failed(d.series) {
                self.failures += d.count;
            }
        } else if let Some(le) = bucket_bound(d.series) {
            *self.buckets.entry(OrdF64(le)).or_default() += d.count;
        }
    }
}

/// Whether a request series counts failures: a 5xx, no answer, or a gRPC status other than
/// OK (which comes in trailers with HTTP 200), as Linkerd classifies gRPC responses.
fn failed(s: &Series) -> bool {
    matches!(s.label("status_class"), "5xx" | "error")
        || !matches!(s.label("grpc_status"), "" | "0")
}

/// The upper bound of a latency bucket series.
fn bucket_bound(s: &Series) -> Option<f64> {
    match s.label("le") {
        "+Inf" => Some(f64::INFINITY),
        le => le.parse().ok(),
    }
}

/// A workload, as the proxies' labels name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Workload {
    pub namespace: String,
    pub workload: String,
}

/// Golden signals over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Signals {
    /// Requests per second.
    pub rps: f64,
    /// Requests seen in the window.
    pub requests: f64,
    /// Share answered without a 5xx or an error; `None` without requests.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Edge {
    pub src: Workload,
    pub dst: Workload,
    /// Both ends proved a mesh identity.
    pub mtls: bool,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkloadStat {
    #[serde(flatten)]
    pub workload: Workload,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStat {
    pub route: String,
    /// The backend cluster.
    pub backend: String,
    /// The Service behind the backend (`namespace/name`), when it is one.
    pub service: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceStat {
    pub service: String,
    pub window_seconds: f64,
    pub backends: Vec<BackendStat>,
}

/// Everything needed to turn counts and buckets into signals.
#[derive(Debug, Default)]
struct Acc {
    rps: f64,
    requests: f64,
    failures: f64,
    /// Cumulative counts by upper bound.
    buckets: BTreeMap<OrdF64, f64>,
    mtls: bool,
}

/// An `f64` that sorts (histogram bounds), by `total_cmp`.
#[derive(Clone, Copy, Debug)]
pub struct OrdF64(pub f64);
impl PartialEq for OrdF64 {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}
impl Eq for OrdF64 {}
impl PartialOrd for OrdF64 {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OrdF64 {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Acc {
    fn signals(&self) -> Signals {
        let q = |q: f64| quantile(q, &self.buckets).map(|s| s * 1000.0);
        Signals {
            rps: self.rps,
            requests: self.requests,
            success_rate: (self.requests > 0.0).then(|| 1.0 - self.failures / self.requests),
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
        }
    }
}

/// The `q` quantile of a histogram given as cumulative counts by upper bound, interpolating
/// linearly inside the bucket it falls in (as Prometheus' `histogram_quantile` does).
pub fn quantile(q: f64, buckets: &BTreeMap<OrdF64, f64>) -> Option<f64> {
    let total = buckets.last_key_value().map(|(_, n)| *n)?;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, n) in buckets {
        if *n >= rank {
            if le.0.is_infinite() {
                // Beyond the last finite bound: the best known is that bound.
                return Some(lower.0);
            }
            let width = n - lower.1;
            let into = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le.0 - lower.0) * into);
        }
        lower = (le.0, *n);
    }
    Some(lower.0)
}

/// A request series' change over the window, per second and in all.
struct Delta<'a> {
    series: &'a Series,
    count: f64,
    per_second: f64,
}

impl Stats {
    pub fn new(interval: Duration, window: Duration) -> Arc<Self> {
        Arc::new(Stats {
            interval,
            window,
            scrapes: Mutex::default(),
            tallies: Mutex::default(),
        })
    }

    /// Scrapes every connected proxy each interval, for as long as the task runs.
    pub async fn run(self: Arc<Self>, status: Arc<StatusTable>, all: Option<AllPods>) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.scrape_all(&status, all.as_ref()).await;
        }
    }

    /// Scrapes the proxies streaming from this replica, and with `all` (while it holds) every
    /// other proxied pod of the model.
    pub async fn scrape_all(&self, status: &StatusTable, all: Option<&AllPods>) {
        let mut targets: Vec<(String, SocketAddr)> = status
            .snapshot()
            .into_iter()
            .filter_map(|p| Some((p.node.clone(), p.metrics?)))
            .collect();
        if let Some(all) = all.filter(|a| a.when.load(std::sync::atomic::Ordering::Relaxed)) {
            let model = all.hub.model();
            let mut extra: Vec<(String, SocketAddr)> = model
                .pods
                .values()
                .filter(|p| crate::xds::build::is_proxied(p))
                .filter_map(|p| {
                    let node = format!("{}/{}", p.namespace, p.name);
                    let addr = SocketAddr::new(p.ip?, all.port);
                    (!targets.iter().any(|(n, _)| *n == node)).then_some((node, addr))
                })
                .collect();
            extra.sort();
            targets.extend(extra);
        }
        let pages = futures::future::join_all(targets.iter().map(|(node, addr)| async move {
            let page = tokio::time::timeout(SCRAPE_TIMEOUT, fetch(*addr)).await;
            match page {
                Ok(Ok(text)) => Some(text),
                Ok(Err(e)) => {
                    debug!(%node, %addr, error = %e, "scraping proxy metrics");
                    None
                }
                Err(_) => {
                    debug!(%node, %addr, "scraping proxy metrics timed out");
                    None
                }
            }
        }))
        .await;
        let now = Instant::now();
        let mut scrapes = self.lock();
        scrapes.retain(|node, _| targets.iter().any(|(n, _)| n == node));
        for ((node, _), page) in targets.into_iter().zip(pages) {
            let Some(page) = page else { continue };
            self.record(&mut scrapes, node, now, request_samples(&page));
        }
    }

    fn record(
        &self,
        scrapes: &mut HashMap<String, VecDeque<Scrape>>,
        node: String,
        at: Instant,
        samples: Vec<Sample>,
    ) {
        let ring = scrapes.entry(node).or_default();
        let samples = share_series(ring.back(), samples);
        if let Some(previous) = ring.back() {
            self.count(previous, &samples);
        }
        ring.push_back(Scrape { at, samples });
        // Keep one scrape at or before the window's start, to measure from.
        while ring.len() > 2 && ring[1].at + self.window <= at {
            ring.pop_front();
        }
    }

    /// Feeds a scrape taken elsewhere (tests, and anything that already holds the page).
    pub fn ingest(&self, node: &str, at: Instant, page: &str) {
        let mut scrapes = self.lock();
        self.record(&mut scrapes, node.to_string(), at, request_samples(page));
    }

    /// How many proxies have been scraped at least once (and are still connected).
    pub fn scraped(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Scrape>>> {
        self.scrapes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every series' change between each proxy's oldest and newest scrape in the window.
    fn deltas<R>(&self, f: impl FnOnce(Vec<Delta<'_>>) -> R) -> R {
        let scrapes = self.lock();
        let mut out = Vec::new();
        for ring in scrapes.values() {
            let (Some(old), Some(new)) = (ring.front(), ring.back()) else {
                continue;
            };
            let secs = new.at.duration_since(old.at).as_secs_f64();
            if ring.len() < 2 || secs <= 0.0 {
                continue;
            }
            out.extend(increments(&old.samples, &new.samples, secs));
        }
        f(out)
    }

    /// Adds what a proxy counted between two scrapes to the tallies of tracked routes.
    fn count(&self, previous: &Scrape, samples: &[(Arc<Series>, f64)]) {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        if tallies.routes.is_empty() {
            return;
        }
        for d in increments(&previous.samples, samples, 1.0) {
            if d.series.label("direction") != "outbound" {
                continue;
            }
            let Some((route, _)) = d.series.label("route").split_once(" rule ") else {
                continue;
            };
            let Some(service) = service_of(d.series.label("backend")) else {
                continue;
            };
            if !tallies.routes.contains(route) {
                continue;
            }
            tallies
                .counts
                .entry((route.to_string(), service))
                .or_default()
                .add(&d);
        }
    }

    /// Counts the requests of these routes (`Kind/namespace/name`) from now on; routes no
    /// longer named are forgotten.
    pub fn track(&self, routes: std::collections::BTreeSet<String>) {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        tallies.counts.retain(|(r, _), _| routes.contains(r));
        tallies.routes = routes;
    }

    /// What the callers' proxies counted for `route`'s requests to Service `service`
    /// (`namespace/name`) since the route was tracked.
    pub fn tally(&self, route: &str, service: &str) -> Tally {
        let tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        tallies
            .counts
            .get(&(route.to_string(), service.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Adds up the series `key` maps, per key.
    fn aggregate<K: Ord>(&self, key: impl Fn(&Series) -> Option<K>) -> BTreeMap<K, Acc> {
        self.deltas(|deltas| {
            let mut out: BTreeMap<K, Acc> = BTreeMap::new();
            for d in deltas {
                let Some(k) = key(d.series) else { continue };
                let acc = out.entry(k).or_default();
                if d.series.name == REQUESTS {
                    acc.rps += d.per_second;
                    acc.requests += d.count;
                    if failed(d.series) {
                        acc.failures += d.count;
                    }
                    acc.mtls |= d.series.label("src_identity").starts_with("spiffe://")
                        && d.series.label("dst_identity").starts_with("spiffe://");
                } else if let Some(le) = bucket_bound(d.series) {
                    *acc.buckets.entry(OrdF64(le)).or_default() += d.count;
                }
            }
            out
        })
    }

    /// Who talks to whom: from the callers' proxies (outbound), and from the callees' for
    /// callers outside the mesh (inbound, source `unknown`).
    pub fn edges(&self) -> Vec<Edge> {
        let end = |s: &Series, side: &str| Workload {
            namespace: s.label(&format!("{side}_namespace")).to_string(),
            workload: s.label(&format!("{side}_workload")).to_string(),
        };
        self.aggregate(|s| {
            let outbound = s.label("direction") == "outbound";
            let unknown_caller =
                s.label("direction") == "inbound" && s.label("src_workload") == "unknown";
            (outbound || unknown_caller).then(|| (end(s, "src"), end(s, "dst")))
        })
        .into_iter()
        .map(|((src, dst), acc)| Edge {
            src,
            dst,
            mtls: acc.mtls,
            signals: acc.signals(),
        })
        .collect()
    }

    /// Each workload as its own proxies see what it serves (inbound), busiest first.
    pub fn top(&self) -> Vec<WorkloadStat> {
        let mut rows: Vec<WorkloadStat> = self
            .aggregate(|s| {
                (s.label("direction") == "inbound").then(|| Workload {
                    namespace: s.label("dst_namespace").to_string(),
                    workload: s.label("dst_workload").to_string(),
                })
            })
            .into_iter()
            .map(|(workload, acc)| WorkloadStat {
                workload,
                signals: acc.signals(),
            })
            .collect();
        rows.sort_by(|a, b| b.signals.rps.total_cmp(&a.signals.rps));
        rows
    }

    /// The traffic callers send to Service `svc`, per route and backend, as their proxies saw
    /// it (outbound): the routes attached to the Service, or its own default route.
    pub fn service(&self, model: &Model, svc: &SvcKey) -> Option<ServiceStat> {
        let s = model.services.get(svc)?;
        let mut routes = std::collections::BTreeSet::new();
        let id = format!("{}/{}", svc.namespace, svc.name);
        for p in &s.ports {
            routes.extend(p.routes.iter().map(|r| r.source.clone()));
            routes.extend(
                p.consumer_routes
                    .values()
                    .flat_map(|rs| rs.iter().map(|r| r.source.clone())),
            );
        }
        let backends = self
            .aggregate(|smp| {
                let route = smp.label("route");
                let backend = smp.label("backend");
                // Its default route goes to its own clusters (one per port, or for a headless
                // Service also one per endpoint).
                let ours = routes.contains(route)
                    || (route == "default" && service_of(backend).as_ref() == Some(&id));
                (smp.label("direction") == "outbound" && ours)
                    .then(|| (route.to_string(), backend.to_string()))
            })
            .into_iter()
            .map(|((route, backend), acc)| BackendStat {
                service: service_of(&backend),
                route,
                backend,
                signals: acc.signals(),
            })
            .collect();
        Some(ServiceStat {
            service: id,
            window_seconds: self.window.as_secs_f64(),
            backends,
        })
    }
}

/// Every series' change from `old` to `new` (one proxy's scrapes, `secs` apart).
fn increments<'a>(
    old: &[(Arc<Series>, f64)],
    new: &'a [(Arc<Series>, f64)],
    secs: f64,
) -> Vec<Delta<'a>> {
    let before: HashMap<&Series, f64> = old.iter().map(|(s, v)| (&**s, *v)).collect();
    new.iter()
        .filter_map(|(s, value)| {
            let count = match before.get(&**s) {
                // A counter that went down was reset (the proxy restarted).
                Some(b) if b <= value => value - b,
                _ => *value,
            };
            (count > 0.0).then(|| Delta {
                series: s,
                count,
                per_second: count / secs,
            })
        })
        .collect()
}

/// A new scrape's samples, each naming the series of the proxy's `previous` scrape that has
/// the same name and labels (a series the page did not have before gets its own).
fn share_series(previous: Option<&Scrape>, samples: Vec<Sample>) -> Vec<(Arc<Series>, f64)> {
    let known: HashMap<(&str, &BTreeMap<String, String>), &Arc<Series>> = previous
        .into_iter()
        .flat_map(|p| &p.samples)
        .map(|(s, _)| ((s.name.as_str(), &s.labels), s))
        .collect();
    samples
        .into_iter()
        .map(|s| {
            let seen = known
                .get(&(s.name.as_str(), &s.labels))
                .map(|k| Arc::clone(k));
            let series = seen.unwrap_or_else(|| {
                Arc::new(Series {
                    name: s.name,
                    labels: s.labels,
                })
            });
            (series, s.value)
        })
        .collect()
}

/// The series of a metrics page the stats are made of: request counts and latency buckets.
fn request_samples(page: &str) -> Vec<Sample> {
    mesh_api::prom::parse(page)
        .into_iter()
        .filter(|s| s.name == REQUESTS || s.name == BUCKETS)
        .collect()
}

/// `namespace/name` of the Service an outbound cluster (`outbound|<port>||<name>.<ns>.svc.<domain>`,
/// or one endpoint's `outbound|<port>|<endpoint>|<name>.<ns>.svc.<domain>`) reaches.
fn service_of(cluster: &str) -> Option<String> {
    let host = cluster.strip_prefix("outbound|")?.splitn(3, '|').nth(2)?;
    let mut parts = host.split('.');
    let (name, ns) = (parts.next()?, parts.next()?);
    (parts.next() == Some("svc")).then(|| format!("{ns}/{name}"))
}

/// `GET /metrics` over HTTP/1.0 (the server closes when done, so the page is what was read).
async fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    (&mut s).take(MAX_PAGE as u64).read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "answered {:?}",
            head.lines().next().unwrap_or_default()
        )));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests;
