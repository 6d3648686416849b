//! Load balancing: power of two choices over peak-EWMA latency (the default), with outlier
//! ejection; or, as a cluster's `lb_policy` says, least request (two choices over requests in
//! flight), round robin, random, or a ring hash of a key the route computes (session
//! affinity). Ejected endpoints are skipped by all of them.
//!
//! Each endpoint keeps an exponentially weighted moving average of its response times that
//! jumps up at once on a slow response and decays over [`DECAY`]; its cost is that average
//! times one plus its requests in flight. A pick draws two endpoints at random and takes the
//! cheaper, which sends little to a slow or overloaded endpoint without herding everyone to
//! the single best one. A failure never lowers an endpoint's estimate, and 5xx answers and
//! timeouts raise a failure rate that multiplies its cost (forgiven over [`DECAY`]), so an
//! endpoint that fails fast gets less traffic, not more.
//!
//! After `consecutive_failures` failures in a row (5xx or a failed connection), or
//! `consecutive_unreachable` connection attempts in a row that it refused or left unanswered
//! (by default one: like Linkerd, an endpoint that cannot be connected to takes no requests
//! for a while), an endpoint is ejected for `base_ejection` times two to the number of ejections before it, up to
//! `max_ejection`, with jitter; once that passes it takes traffic again, competing like a new
//! endpoint, and one success forgives its history. At most `max_ejection_percent` of a cluster (and always at least one
//! endpoint) is ejected at a time, counted within a priority; if every endpoint is ejected,
//! all of them are used.
//!
//! Endpoints come in priorities (the `priority` of their EDS locality; the controller puts
//! terminating endpoints that still serve at 1): every pick is among the endpoints of the
//! lowest priority that has one not ejected, so a higher priority gets nothing while a lower
//! one can serve.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use crate::metrics::BackendCounter;
use crate::state::{EndpointDef, ms};

/// How fast latency estimates forget.
pub const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint nothing is known about yet.
pub const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Weight of each answer in the failure rate.
const FAIL_ALPHA: f64 = 0.2;
/// How much a failure rate of 1 multiplies an endpoint's cost.
const FAIL_PENALTY: f64 = 10.0;

/// How a cluster picks among its endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    #[default]
    PeakEwma,
    LeastRequest,
    RoundRobin,
    Random,
    /// A ring of points per endpoint; a request's hash picks the next point clockwise.
    RingHash,
}

/// Points on the ring per endpoint, and at least this many in all (Envoy's default minimum).
const RING_POINTS_PER_ENDPOINT: usize = 128;
const RING_MIN: usize = 1024;

/// A stable 64-bit hash (FNV-1a, then a finalizer that spreads nearby inputs).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierConfig {
    /// 5xx answers, timeouts and failed connections in a row that eject; `None`: not enforced.
    pub consecutive_failures: Option<u32>,
    /// Gateway errors (502, 503, 504, timeouts) and failed connections in a row that eject;
    /// any other answer breaks the run. `None`: not enforced.
    pub consecutive_gateway: Option<u32>,
    /// Connection attempts in a row the endpoint refused or left unanswered (TCP or mesh TLS)
    /// that eject; with `split_local`, failed and reset connections of any kind (Envoy's
    /// local-origin failures). Any answer breaks the run. `None`: not enforced.
    pub consecutive_unreachable: Option<u32>,
    /// Envoy's `split_external_local_origin_errors`: failed and reset connections count toward
    /// `consecutive_unreachable` only, not as failures.
    pub split_local: bool,
    /// Ejections grow by `base_ejection` each time (Envoy's rule), not double.
    pub linear: bool,
    /// Ejections end on these ticks (Envoy's `interval`); `None`: when their time is up.
    #[serde(with = "crate::state::route::opt_ms")]
    pub interval: Option<Duration>,
    #[serde(with = "ms")]
    pub base_ejection: Duration,
    #[serde(with = "ms")]
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    /// When a cluster sets no outlier detection (Linkerd's failure accrual, roughly).
    fn default() -> Self {
        Self {
            consecutive_failures: Some(7),
            consecutive_gateway: None,
            consecutive_unreachable: Some(1),
            split_local: false,
            linear: false,
            interval: None,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 50,
        }
    }
}

fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct Ewma {
    rtt_ns: f64,
    /// Moving share of recent answers that were 5xx or timeouts; forgiven over [`DECAY`].
    fail_rate: f64,
    stamp: Instant,
    /// Until the first response, the estimate is [`DEFAULT_RTT`].
    observed: bool,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub mesh_proxy: bool,
    /// Mesh TLS to this endpoint must find this SPIFFE ID.
    pub identity: Option<mesh_api::SpiffeId>,
    /// Who runs there, for metrics.
    pub peer: Arc<crate::metrics::Peer>,
    pending: AtomicU32,
    ewma: Mutex<Ewma>,
    consecutive_failures: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_unreachable: AtomicU32,
    /// Nanoseconds since [`base`]; 0 when not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
    /// Connections to this endpoint.
    pub pool: crate::proxy::upstream::Pool,
}

impl Endpoint {
    fn new(def: &EndpointDef) -> Self {
        Self {
            addr: def.addr,
            mesh_proxy: def.mesh_proxy,
            identity: def.identity.clone(),
            peer: def.peer.clone(),
            pending: AtomicU32::new(0),
            ewma: Mutex::new(Ewma {
                rtt_ns: DEFAULT_RTT.as_nanos() as f64,
                fail_rate: 0.0,
                stamp: Instant::now(),
                observed: false,
            }),
            consecutive_failures: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_unreachable: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            pool: Default::default(),
        }
    }

    /// Forgets its runs of failures.
    fn reset_runs(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_unreachable.store(0, Ordering::Relaxed);
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos(now) < until
    }

    /// A candidate for a pick: not ejected, and not the endpoint a retry avoids.
    fn usable(&self, now: Instant, avoid: Option<SocketAddr>) -> bool {
        !self.is_ejected(now) && Some(self.addr) != avoid
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Cost of sending one more request here; `None` before the first response.
    fn cost(&self, now: Instant) -> Option<f64> {
        let (rtt, fail) = match self.ewma.lock() {
            Ok(mut e) if e.observed => {
                decay(&mut e, now);
                (e.rtt_ns, e.fail_rate)
            }
            _ => return None,
        };
        Some(rtt * f64::from(self.pending() + 1) * (1.0 + FAIL_PENALTY * fail))
    }

    /// Whether `self` is a better pick than `other`. An endpoint nothing is known about yet
    /// competes on requests in flight only, so a new endpoint is neither shunned nor flooded.
    fn cheaper_than(&self, other: &Endpoint, now: Instant) -> bool {
        match (self.cost(now), other.cost(now)) {
            (Some(a), Some(b)) => a < b,
            _ => match self.pending().cmp(&other.pending()) {
                std::cmp::Ordering::Less => true,
                std::cmp::Ordering::Greater => false,
                std::cmp::Ordering::Equal => rand::random(),
            },
        }
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        if let Ok(mut e) = self.ewma.lock() {
            let rtt = rtt.as_nanos() as f64;
            if !e.observed || rtt > e.rtt_ns {
                e.observed = true;
                // Peak: a slow response counts at once.
                e.rtt_ns = rtt;
                e.stamp = now;
            } else {
                let w = decay_weight(&e, now);
                e.rtt_ns = e.rtt_ns * w + rtt * (1.0 - w);
                e.stamp = now;
            }
        }
    }

    /// The estimate in milliseconds, for `/config_dump`.
    pub fn ewma_ms(&self) -> f64 {
        self.ewma.lock().map_or(0.0, |e| e.rtt_ns / 1e6)
    }
}

fn decay_weight(e: &Ewma, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(e.stamp).as_secs_f64();
    (-elapsed / DECAY.as_secs_f64()).exp()
}

fn decay(e: &mut Ewma, now: Instant) {
    let w = decay_weight(e, now);
    e.rtt_ns *= w;
    e.fail_rate *= w;
    e.stamp = now;
}

/// The endpoints of one cluster.
#[derive(Debug)]
pub struct EndpointSet {
    /// Sorted by priority.
    endpoints: Vec<Arc<Endpoint>>,
    /// The priority of each endpoint.
    priorities: Vec<u32>,
    /// The endpoints of each priority, lowest first (one range when all share one).
    tiers: Vec<Range<usize>>,
    outlier: OutlierConfig,
    balancer: Balancer,
    /// `(point, endpoint index)`, sorted, for [`Balancer::RingHash`].
    ring: Vec<(u64, usize)>,
    /// The next endpoint of [`Balancer::RoundRobin`].
    next: AtomicUsize,
    ejections: BackendCounter,
    /// Requests in flight to any endpoint of this set (for the circuit breaker).
    in_flight: AtomicU32,
}

impl Serialize for EndpointSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            addr: SocketAddr,
            priority: u32,
            mesh_proxy: bool,
            identity: Option<&'a str>,
            pending: u32,
            ewma_ms: f64,
            ejected: bool,
        }
        let now = Instant::now();
        s.collect_seq(
            self.endpoints
                .iter()
                .zip(&self.priorities)
                .map(|(e, p)| View {
                    addr: e.addr,
                    priority: *p,
                    mesh_proxy: e.mesh_proxy,
                    identity: e.identity.as_ref().map(|i| i.as_str()),
                    pending: e.pending(),
                    ewma_ms: e.ewma_ms(),
                    ejected: e.is_ejected(now),
                }),
        )
    }
}

/// The result of a request, as the balancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx or a timeout: the endpoint answered badly. Counts toward ejection and raises
    /// the endpoint's failure rate, which makes it a costlier pick. `gateway`: a 502, 503,
    /// 504 or a timeout.
    ServerError {
        gateway: bool,
    },
    /// The connection failed or was reset: counts toward ejection only, so a dead endpoint
    /// keeps its share of (retried) tries until it is ejected, which is fast.
    ConnectFailure,
    /// The endpoint refused a connection or left it unanswered (TCP or mesh TLS): a
    /// [`Outcome::ConnectFailure`] that also counts toward `consecutive_unreachable`.
    Unreachable,
}

/// A request in flight to an endpoint; finishing it feeds the latency estimate and the
/// outlier detector. Dropped without finishing (cancelled): only the in-flight count changes.
#[derive(Debug)]
pub struct InFlight {
    pub endpoint: Arc<Endpoint>,
    set: Arc<EndpointSet>,
    start: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
        self.set.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn finish(self, outcome: Outcome) {
        let now = Instant::now();
        let mut rtt = now.saturating_duration_since(self.start);
        let ep = &self.endpoint;
        match outcome {
            Outcome::Success => {
                ep.reset_runs();
                ep.ejections.store(0, Ordering::Relaxed);
            }
            // Failures of tries that were under way when it was ejected say nothing new, and
            // would undo the fresh start its ejection gave it.
            _ if ep.is_ejected(now) => return,
            Outcome::ServerError { .. } | Outcome::ConnectFailure | Outcome::Unreachable => {
                // A failure never makes an endpoint look faster than it was.
                let current = ep
                    .ewma
                    .lock()
                    .map_or(0.0, |e| if e.observed { e.rtt_ns } else { 0.0 });
                rtt = rtt.max(Duration::from_nanos(current as u64));
                let o = &self.set.outlier;
                // With Envoy's split local-origin errors, failed and reset connections count
                // apart from the endpoint's answers; otherwise toward both, and unreachable
                // endpoints toward their own run too.
                let local = matches!(outcome, Outcome::ConnectFailure | Outcome::Unreachable);
                let (n, g) = if local && o.split_local {
                    (0, 0)
                } else {
                    let n = ep.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let gateway = !matches!(outcome, Outcome::ServerError { gateway: false });
                    let g = if gateway {
                        ep.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                    } else {
                        ep.consecutive_gateway.store(0, Ordering::Relaxed);
                        0
                    };
                    (n, g)
                };
                let u = if outcome == Outcome::Unreachable || (local && o.split_local) {
                    ep.consecutive_unreachable.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    // Any answer, even a bad one, shows the endpoint can be reached.
                    if !local {
                        ep.consecutive_unreachable.store(0, Ordering::Relaxed);
                    }
                    0
                };
                if o.consecutive_failures.is_some_and(|t| n >= t)
                    || o.consecutive_gateway.is_some_and(|t| g >= t)
                    || o.consecutive_unreachable.is_some_and(|t| u >= t)
                {
                    self.set.eject(ep, now);
                    if ep.is_ejected(now) {
                        // It comes back as a new endpoint: this failure is not its latency.
                        return;
                    }
                }
            }
        }
        if let Ok(mut e) = ep.ewma.lock() {
            let failed = f64::from(u8::from(matches!(outcome, Outcome::ServerError { .. })));
            e.fail_rate = e.fail_rate * (1.0 - FAIL_ALPHA) + failed * FAIL_ALPHA;
        }
        ep.observe(rtt, now);
    }
}

impl EndpointSet {
    pub fn new(
        defs: &[EndpointDef],
        outlier: OutlierConfig,
        balancer: Balancer,
        ejections: BackendCounter,
    ) -> Self {
        Self::assemble(
            defs.iter()
                .map(|d| (Arc::new(Endpoint::new(d)), d.priority))
                .collect(),
            outlier,
            balancer,
            ejections,
        )
    }

    fn assemble(
        mut endpoints: Vec<(Arc<Endpoint>, u32)>,
        outlier: OutlierConfig,
        balancer: Balancer,
        ejections: BackendCounter,
    ) -> Self {
        endpoints.sort_by_key(|(_, p)| *p);
        let (endpoints, priorities): (Vec<_>, Vec<_>) = endpoints.into_iter().unzip();
        let tiers = priorities
            .chunk_by(|a, b| a == b)
            .scan(0, |start, chunk| {
                let r = *start..*start + chunk.len();
                *start = r.end;
                Some(r)
            })
            .collect();
        let ring = if balancer == Balancer::RingHash && !endpoints.is_empty() {
            let per = RING_POINTS_PER_ENDPOINT.max(RING_MIN.div_ceil(endpoints.len()));
            let mut ring: Vec<(u64, usize)> = endpoints
                .iter()
                .enumerate()
                .flat_map(|(i, e)| {
                    (0..per).map(move |k| (hash64(format!("{}_{k}", e.addr).as_bytes()), i))
                })
                .collect();
            ring.sort_unstable();
            ring
        } else {
            Vec::new()
        };
        Self {
            endpoints,
            priorities,
            tiers,
            outlier,
            balancer,
            ring,
            next: AtomicUsize::new(rand::random_range(0..usize::from(u16::MAX))),
            ejections,
            in_flight: AtomicU32::new(0),
        }
    }

    pub fn balancer(&self) -> Balancer {
        self.balancer
    }

    /// A set with new endpoints that keeps the state of those it had before.
    pub fn update(&self, defs: &[EndpointDef], outlier: OutlierConfig, balancer: Balancer) -> Self {
        let endpoints = defs
            .iter()
            .map(|d| {
                self.endpoints
                    .iter()
                    .find(|e| {
                        e.addr == d.addr && e.mesh_proxy == d.mesh_proxy && e.identity == d.identity
                    })
                    .cloned()
                    .map_or_else(
                        || (Arc::new(Endpoint::new(d)), d.priority),
                        |e| (e, d.priority),
                    )
            })
            .collect();
        Self::assemble(endpoints, outlier, balancer, self.ejections.clone())
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Whether `defs` (in priority order, as the EDS conversion gives them) are the endpoints
    /// this set holds, so it can be kept as it is.
    pub fn same_endpoints(&self, defs: &[EndpointDef]) -> bool {
        self.endpoints.len() == defs.len()
            && self
                .endpoints
                .iter()
                .zip(&self.priorities)
                .zip(defs)
                .all(|((e, p), d)| {
                    e.addr == d.addr && e.mesh_proxy == d.mesh_proxy && *p == d.priority
                })
    }

    /// Requests in flight through this set.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn outlier(&self) -> &OutlierConfig {
        &self.outlier
    }

    /// Picks an endpoint and marks a request in flight to it. `avoid`: an endpoint that just
    /// failed this request (a retry goes elsewhere when it can). `hash`: the request's key,
    /// for a ring hash (without one, a ring hash picks at random).
    pub fn pick(
        self: &Arc<Self>,
        avoid: Option<SocketAddr>,
        hash: Option<u64>,
    ) -> Option<InFlight> {
        let now = Instant::now();
        let tier = self.tier(now);
        let ep = match (self.balancer, hash) {
            (Balancer::PeakEwma, _) => self.choose(&self.endpoints[tier], now, avoid)?,
            (Balancer::RingHash, Some(h)) => self.on_ring(tier, now, avoid, h)?,
            _ => self.simple(&self.endpoints[tier], now, avoid)?,
        };
        ep.pending.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint: ep,
            set: self.clone(),
            start: now,
        })
    }

    /// The endpoints to pick from: those of the lowest priority with one not ejected; the
    /// lowest priority when every endpoint is ejected.
    fn tier(&self, now: Instant) -> Range<usize> {
        match self.tiers.as_slice() {
            [] => 0..0,
            [only] => only.clone(),
            tiers => tiers
                .iter()
                .find(|r| {
                    self.endpoints[(*r).clone()]
                        .iter()
                        .any(|e| !e.is_ejected(now))
                })
                .unwrap_or(&tiers[0])
                .clone(),
        }
    }

    /// The first usable endpoint of `tier` clockwise from `h` on the ring; if none is, the
    /// first of `tier` clockwise.
    fn on_ring(
        &self,
        tier: Range<usize>,
        now: Instant,
        avoid: Option<SocketAddr>,
        h: u64,
    ) -> Option<Arc<Endpoint>> {
        let n = self.ring.len();
        if n == 0 {
            return None;
        }
        let start = self.ring.partition_point(|(p, _)| *p < h) % n;
        let mut clockwise = (0..n)
            .map(|k| self.ring[(start + k) % n].1)
            .filter(|i| tier.contains(i))
            .map(|i| &self.endpoints[i]);
        let first = clockwise.next()?;
        let pick = std::iter::once(first)
            .chain(clockwise)
            .find(|e| e.usable(now, avoid))
            .unwrap_or(first);
        Some(pick.clone())
    }

    /// Least request, round robin, random (and a ring hash without a key): among the usable
    /// endpoints, or all of them when none is.
    fn simple(
        &self,
        endpoints: &[Arc<Endpoint>],
        now: Instant,
        avoid: Option<SocketAddr>,
    ) -> Option<Arc<Endpoint>> {
        let usable: Vec<&Arc<Endpoint>> =
            endpoints.iter().filter(|e| e.usable(now, avoid)).collect();
        let pool: Vec<&Arc<Endpoint>> = if usable.is_empty() {
            endpoints.iter().collect()
        } else {
            usable
        };
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let pick = match self.balancer {
            Balancer::RoundRobin => pool[self.next.fetch_add(1, Ordering::Relaxed) % n],
            Balancer::LeastRequest if n > 1 => {
                let i = rand::random_range(0..n);
                let j = (i + rand::random_range(1..n)) % n;
                match pool[i].pending().cmp(&pool[j].pending()) {
                    std::cmp::Ordering::Greater => pool[j],
                    _ => pool[i],
                }
            }
            _ => pool[rand::random_range(0..n)],
        };
        Some(pick.clone())
    }

    fn choose(
        &self,
        endpoints: &[Arc<Endpoint>],
        now: Instant,
        avoid: Option<SocketAddr>,
    ) -> Option<Arc<Endpoint>> {
        let n = endpoints.len();
        let usable = |e: &Endpoint| e.usable(now, avoid);
        match n {
            0 => return None,
            1 => return endpoints.first().cloned(),
            _ => {}
        }
        // Two distinct endpoints at random; if either is out, the first usable ones from a
        // random start instead.
        let i = rand::random_range(0..n);
        let j = rand::random_range(0..n - 1);
        let j = if j >= i { j + 1 } else { j };
        let (a, b) = if usable(&endpoints[i]) && usable(&endpoints[j]) {
            (i, Some(j))
        } else {
            let start = rand::random_range(0..n);
            let mut found = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&k| usable(&endpoints[k]));
            match (found.next(), found.next()) {
                (Some(a), b) => (a, b),
                (None, _) => {
                    // Nothing usable: everything is ejected (or only the avoided one is
                    // left). Take the cheapest, preferring endpoints that are not ejected.
                    return endpoints
                        .iter()
                        .filter(|e| !e.is_ejected(now))
                        .chain(endpoints.iter())
                        .min_by(|x, y| {
                            let c = |e: &Endpoint| e.cost(now).unwrap_or(0.0);
                            c(x).total_cmp(&c(y))
                        })
                        .cloned();
                }
            }
        };
        let ea = &endpoints[a];
        let pick = match b {
            Some(b) if endpoints[b].cheaper_than(ea, now) => &endpoints[b],
            _ => ea,
        };
        Some(pick.clone())
    }

    fn eject(&self, ep: &Endpoint, now: Instant) {
        if ep.is_ejected(now) {
            return;
        }
        // The limit holds within the endpoint's priority: the last ready endpoint is never
        // ejected in favour of terminating ones.
        let tier = self
            .endpoints
            .iter()
            .position(|e| std::ptr::eq(e.as_ref(), ep))
            .and_then(|i| self.tiers.iter().find(|r| r.contains(&i)))
            .cloned()
            .unwrap_or(0..self.endpoints.len());
        let peers = &self.endpoints[tier];
        let ejected = peers.iter().filter(|e| e.is_ejected(now)).count();
        let n = peers.len();
        let limit = (n * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= limit || n < 2 {
            return;
        }
        let times = ep.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = if self.outlier.linear {
            times.saturating_add(1)
        } else {
            1u32 << times.min(16)
        };
        let backoff = self
            .outlier
            .base_ejection
            .saturating_mul(factor)
            .min(self.outlier.max_ejection.max(self.outlier.base_ejection));
        // Up to a quarter more, so endpoints ejected together do not return together.
        let jitter = backoff.mul_f64(rand::random_range(0.0..0.25));
        let mut until = now + backoff + jitter;
        // With an interval, an ejection ends on the detector's next tick after its time.
        if let Some(tick) = self.outlier.interval.filter(|t| !t.is_zero()) {
            let since = until.saturating_duration_since(base()).as_nanos();
            let t = tick.as_nanos();
            let rounded = since.div_ceil(t) * t;
            until = base() + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX));
        }
        ep.ejected_until.store(nanos(until), Ordering::Relaxed);
        ep.reset_runs();
        // Back on probation when it returns: it competes like a new endpoint instead of
        // carrying the cost of the failures that ejected it.
        if let Ok(mut e) = ep.ewma.lock() {
            e.observed = false;
            e.fail_rate = 0.0;
        }
        self.ejections.inc();
        info!(endpoint = %ep.addr, ejection_ms = (backoff + jitter).as_millis() as u64, "endpoint ejected");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn set(n: u16, outlier: OutlierConfig) -> Arc<EndpointSet> {
        let defs: Vec<EndpointDef> = (0..n)
            .map(|i| EndpointDef::plain(SocketAddr::from(([127, 0, 0, 1], 1000 + i))))
            .collect();
        Arc::new(EndpointSet::new(
            &defs,
            outlier,
            Balancer::PeakEwma,
            Default::default(),
        ))
    }

    #[test]
    fn prefers_the_faster_endpoint() {
        let s = set(2, OutlierConfig::default());
        let slow = s.endpoints[0].addr;
        s.endpoints[0].observe(Duration::from_millis(50), Instant::now());
        s.endpoints[1].observe(Duration::from_millis(1), Instant::now());
        let mut to_slow = 0;
        for _ in 0..1000 {
            let f = s.pick(None, None).expect("endpoint");
            if f.endpoint.addr == slow {
                to_slow += 1;
            }
        }
        // With two endpoints both are drawn every time, so the slow one is never picked.
        assert_eq!(to_slow, 0);
    }

    #[test]
    fn concurrent_load_spreads_over_equal_endpoints() {
        let s = set(3, OutlierConfig::default());
        for e in &s.endpoints {
            e.observe(Duration::from_millis(1), Instant::now());
        }
        // Requests held in flight raise an endpoint's cost, so load spreads.
        let held: Vec<InFlight> = (0..300)
            .map(|_| s.pick(None, None).expect("endpoint"))
            .collect();
        let mut counts = [0u32; 3];
        for f in &held {
            counts[usize::from(f.endpoint.addr.port() - 1000)] += 1;
        }
        for c in counts {
            assert!((80..=120).contains(&c), "uneven: {counts:?}");
        }
    }

    #[test]
    fn new_endpoints_get_traffic() {
        let s = set(2, OutlierConfig::default());
        s.endpoints[0].observe(Duration::from_micros(100), Instant::now());
        let to_new = (0..1000)
            .filter(|_| s.pick(None, None).expect("endpoint").endpoint.addr == s.endpoints[1].addr)
            .count();
        assert!(
            (350..=650).contains(&to_new),
            "new endpoint got {to_new} of 1000"
        );
    }

    #[test]
    fn in_flight_counts_against_an_endpoint() {
        let s = set(2, OutlierConfig::default());
        let held = s.pick(None, None).expect("endpoint");
        for _ in 0..100 {
            let f = s.pick(None, None).expect("endpoint");
            assert_ne!(f.endpoint.addr, held.endpoint.addr);
        }
        drop(held);
        assert!(s.endpoints.iter().all(|e| e.pending() == 0));
    }

    #[test]
    fn ejects_after_consecutive_failures_and_readmits() {
        let outlier = OutlierConfig {
            consecutive_failures: Some(3),
            base_ejection: Duration::from_millis(50),
            max_ejection: Duration::from_secs(1),
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        };
        let s = set(3, outlier);
        let bad = s.endpoints[0].clone();
        for _ in 0..3 {
            let f = InFlight {
                endpoint: bad.clone(),
                set: s.clone(),
                start: Instant::now(),
            };
            bad.pending.fetch_add(1, Ordering::Relaxed);
            s.in_flight.fetch_add(1, Ordering::Relaxed);
            f.finish(Outcome::ConnectFailure);
        }
        assert!(bad.is_ejected(Instant::now()));
        for _ in 0..200 {
            assert_ne!(
                s.pick(None, None).expect("endpoint").endpoint.addr,
                bad.addr
            );
        }
        // Ejection ends after base time (plus at most a quarter of jitter).
        assert!(!bad.is_ejected(Instant::now() + Duration::from_millis(63)));
        // The second ejection lasts twice as long.
        bad.ejected_until.store(0, Ordering::Relaxed);
        s.eject(&bad, Instant::now());
        assert!(bad.is_ejected(Instant::now() + Duration::from_millis(90)));
    }

    #[test]
    fn an_unreachable_endpoint_is_ejected_at_once_unless_configured_otherwise() {
        let finish = |s: &Arc<EndpointSet>, ep: &Arc<Endpoint>, outcome: Outcome| {
            ep.pending.fetch_add(1, Ordering::Relaxed);
            s.in_flight.fetch_add(1, Ordering::Relaxed);
            InFlight {
                endpoint: ep.clone(),
                set: s.clone(),
                start: Instant::now(),
            }
            .finish(outcome);
        };
        // The default: the first refused or unanswered connection ejects.
        let s = set(3, OutlierConfig::default());
        let dead = s.endpoints[0].clone();
        finish(&s, &dead, Outcome::ConnectFailure);
        assert!(!dead.is_ejected(Instant::now()), "a reset is not enough");
        finish(&s, &dead, Outcome::Unreachable);
        assert!(dead.is_ejected(Instant::now()));
        // Envoy's split local-origin failures: a run of them, which an answer (even a 5xx)
        // breaks.
        let s = set(
            3,
            OutlierConfig {
                consecutive_failures: None,
                consecutive_unreachable: Some(2),
                ..OutlierConfig::default()
            },
        );
        let ep = s.endpoints[0].clone();
        finish(&s, &ep, Outcome::Unreachable);
        finish(&s, &ep, Outcome::ServerError { gateway: false });
        finish(&s, &ep, Outcome::Unreachable);
        assert!(!ep.is_ejected(Instant::now()));
        finish(&s, &ep, Outcome::Unreachable);
        assert!(ep.is_ejected(Instant::now()));
        // Envoy's split mode: failed and reset connections count only toward their own run.
        let s = set(
            3,
            OutlierConfig {
                consecutive_failures: Some(2),
                consecutive_unreachable: Some(3),
                split_local: true,
                ..OutlierConfig::default()
            },
        );
        let ep = s.endpoints[0].clone();
        finish(&s, &ep, Outcome::ConnectFailure);
        finish(&s, &ep, Outcome::Unreachable);
        assert!(!ep.is_ejected(Instant::now()), "not as 5xx");
        finish(&s, &ep, Outcome::ConnectFailure);
        assert!(ep.is_ejected(Instant::now()));
        // Counted as failures only.
        let s = set(
            3,
            OutlierConfig {
                consecutive_failures: Some(3),
                consecutive_unreachable: None,
                ..OutlierConfig::default()
            },
        );
        let ep = s.endpoints[0].clone();
        finish(&s, &ep, Outcome::Unreachable);
        finish(&s, &ep, Outcome::Unreachable);
        assert!(!ep.is_ejected(Instant::now()));
        finish(&s, &ep, Outcome::Unreachable);
        assert!(ep.is_ejected(Instant::now()));
    }

    #[test]
    fn never_ejects_beyond_the_limit() {
        let s = set(2, OutlierConfig::default());
        let now = Instant::now();
        s.eject(&s.endpoints[0], now);
        s.eject(&s.endpoints[1], now);
        let ejected = s.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        assert_eq!(ejected, 1);
        // The survivor is still picked, and so is anything when everything is down.
        assert!(s.pick(None, None).is_some());
    }

    #[test]
    fn update_keeps_state() {
        let s = set(2, OutlierConfig::default());
        s.endpoints[0].observe(Duration::from_millis(40), Instant::now());
        let defs = vec![
            EndpointDef::plain(s.endpoints[0].addr),
            EndpointDef::plain(SocketAddr::from(([127, 0, 0, 1], 2000))),
        ];
        let u = s.update(&defs, OutlierConfig::default(), Balancer::PeakEwma);
        assert!(Arc::ptr_eq(&u.endpoints[0], &s.endpoints[0]));
        assert!(u.endpoints[0].ewma_ms() > 30.0);
        assert_eq!(u.endpoints[1].addr.port(), 2000);
        assert!(u.same_endpoints(&defs));
    }

    /// Two ready endpoints at priority 0 and a terminating one at priority 1, under every
    /// balancer: nothing goes to priority 1 until both of priority 0 are ejected, and then
    /// everything does; a priority change alone is a different set.
    #[test]
    fn picks_stay_in_the_lowest_priority_that_can_serve() {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let def = |p: u16, priority: u32| EndpointDef {
            priority,
            ..EndpointDef::plain(addr(p))
        };
        // Given out of order: the set sorts by priority.
        let defs = [def(3000, 1), def(1000, 0), def(2000, 0)];
        for balancer in [
            Balancer::PeakEwma,
            Balancer::LeastRequest,
            Balancer::RoundRobin,
            Balancer::Random,
            Balancer::RingHash,
        ] {
            let s = Arc::new(EndpointSet::new(
                &defs,
                OutlierConfig {
                    max_ejection_percent: 100,
                    ..OutlierConfig::default()
                },
                balancer,
                Default::default(),
            ));
            let picks = |s: &Arc<EndpointSet>| -> HashSet<u16> {
                (0..200u64)
                    .map(|k| {
                        let f = s.pick(None, Some(hash64(&k.to_be_bytes()))).expect("pick");
                        f.endpoint.addr.port()
                    })
                    .collect()
            };
            assert_eq!(picks(&s), HashSet::from([1000, 2000]), "{balancer:?}");
            let now = Instant::now();
            s.eject(&s.endpoints[0], now);
            assert_eq!(
                picks(&s),
                HashSet::from([2000]),
                "{balancer:?}, one ejected"
            );
            s.eject(&s.endpoints[1], now);
            assert_eq!(
                picks(&s),
                HashSet::from([3000]),
                "{balancer:?}, both ejected"
            );
        }
        let s = EndpointSet::new(
            &defs,
            OutlierConfig::default(),
            Balancer::PeakEwma,
            Default::default(),
        );
        let sorted = [def(1000, 0), def(2000, 0), def(3000, 1)];
        assert!(s.same_endpoints(&sorted));
        assert!(!s.same_endpoints(&[def(1000, 0), def(2000, 0), def(3000, 0)]));
        // Once none is ready, a terminating endpoint is all there is.
        let u = Arc::new(s.update(
            &[def(3000, 0)],
            OutlierConfig::default(),
            Balancer::PeakEwma,
        ));
        assert_eq!(u.pick(None, None).expect("pick").endpoint.addr, addr(3000));
        // A retry that avoids the only usable ready endpoint still stays in its priority, even
        // when the terminating endpoint looks cheaper.
        let now = Instant::now();
        let s = Arc::new(EndpointSet::new(
            &[def(1000, 0), def(2000, 0), def(3000, 1)],
            OutlierConfig::default(),
            Balancer::PeakEwma,
            Default::default(),
        ));
        s.eject(&s.endpoints[0], now);
        s.endpoints[1].observe(Duration::from_millis(5), now);
        for _ in 0..100 {
            let f = s.pick(Some(addr(2000)), None).expect("pick");
            assert_ne!(f.endpoint.addr, addr(3000));
        }
        // One ready endpoint and one terminating: the ready one is never ejected.
        let s = EndpointSet::new(
            &[def(1000, 0), def(3000, 1)],
            OutlierConfig::default(),
            Balancer::PeakEwma,
            Default::default(),
        );
        s.eject(&s.endpoints[0], now);
        assert!(!s.endpoints[0].is_ejected(now));
    }
}
