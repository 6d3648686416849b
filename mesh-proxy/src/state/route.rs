//! Route tables and request matching: the subset of Envoy's RouteConfiguration the controller
//! emits for Gateway API routes (see `docs/reference/proxy.md`).
//!
//! Matching follows Envoy: the virtual host by `Host` / `:authority` (exact, then the longest
//! `*.suffix`, then the longest `prefix.*`, then `*`), then the first route whose match holds.
//! The controller has already put routes in Gateway API precedence order.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use serde::Serialize;

use super::ms;

#[derive(Debug, Serialize)]
pub struct RouteTable {
    pub name: String,
    /// Private: the index holds positions in it.
    vhosts: Vec<Arc<VirtualHost>>,
    pub headers: HeaderOps,
    /// `ignore_port_in_host_matching`: a host's port is left out when virtual hosts are chosen.
    pub ignore_port: bool,
    /// Which virtual host a `Host` names. Shared with the previous version of the table when
    /// each position's domains are the same (a change to routes, the usual one, leaves them):
    /// at mesh scale, reading 90,000 scattered domain strings to hash them again was most of
    /// a route change's cost.
    #[serde(skip)]
    domains: Arc<DomainIndex>,
}

/// Domains to virtual host positions.
#[derive(Debug)]
struct DomainIndex {
    /// Exact domains, as (virtual host, domain) positions found by the lowercase domain's
    /// hash: no domain is stored again (one with upper case is lowercased only to hash it);
    /// read on every request.
    exact: hashbrown::HashTable<(usize, usize)>,
    hasher: foldhash::fast::RandomState,
    suffixes: Vec<(String, usize)>,
    prefixes: Vec<(String, usize)>,
    wildcard: Option<usize>,
}

impl DomainIndex {
    fn new(vhosts: &[Arc<VirtualHost>]) -> Self {
        let hasher = foldhash::fast::RandomState::default();
        let hash = |d: &str| {
            if d.bytes().any(|b| b.is_ascii_uppercase()) {
                hasher.hash_one(d.to_ascii_lowercase())
            } else {
                hasher.hash_one(d)
            }
        };
        let domains = vhosts.iter().map(|vh| vh.domains.len()).sum();
        let mut exact = hashbrown::HashTable::with_capacity(domains);
        let (mut suffixes, mut prefixes, mut wildcard) = (Vec::new(), Vec::new(), None);
        for (i, vh) in vhosts.iter().enumerate() {
            for (j, d) in vh.domains.iter().enumerate() {
                if d == "*" {
                    wildcard.get_or_insert(i);
                } else if let Some(s) = d.strip_prefix('*') {
                    suffixes.push((s.to_ascii_lowercase(), i));
                } else if let Some(p) = d.strip_suffix('*') {
                    prefixes.push((p.to_ascii_lowercase(), i));
                } else {
                    // The first virtual host to name a domain keeps it.
                    let entry = exact.entry(
                        hash(d),
                        |&(v, k): &(usize, usize)| vhosts[v].domains[k].eq_ignore_ascii_case(d),
                        |&(v, k)| hash(&vhosts[v].domains[k]),
                    );
                    if let hashbrown::hash_table::Entry::Vacant(e) = entry {
                        e.insert((i, j));
                    }
                }
            }
        }
        // Longest first, so the first hit is the most specific.
        suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self {
            exact,
            hasher,
            suffixes,
            prefixes,
            wildcard,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    pub headers: HeaderOps,
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    /// Envoy's `envoy.filters.http.fault` for this route (`typed_per_filter_config`); applied
    /// only on connections whose HTTP filters include the fault filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// Faults a route injects into a share of its requests: a delay, then an abort, each drawn on
/// its own.
#[derive(Debug, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Serialize)]
pub struct FaultDelay {
    #[serde(with = "ms")]
    pub fixed: Duration,
    pub share: Share,
}

#[derive(Debug, Serialize)]
pub struct FaultAbort {
    pub code: AbortCode,
    pub share: Share,
}

/// What an abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortCode {
    /// This HTTP status.
    Http(u16),
    /// HTTP 200 with this `grpc-status`, trailers only.
    Grpc(u32),
}

/// A share of requests, in parts per million, drawn as the weighted split's are: any run of
/// consecutive requests gets its share within one request (see [`Draws`]).
#[derive(Debug, Serialize)]
pub struct Share {
    pub per_million: u32,
    #[serde(skip)]
    pub draws: Draws,
}

impl Share {
    pub fn new(per_million: u32) -> Self {
        Share {
            per_million: per_million.min(1_000_000),
            draws: Draws::default(),
        }
    }

    /// A share drawn independently of one made by [`Share::new`].
    pub fn independent(per_million: u32) -> Self {
        Share {
            draws: Draws::second(),
            ..Share::new(per_million)
        }
    }

    /// Whether this request is in the share.
    pub fn hit(&self) -> bool {
        match self.per_million {
            0 => false,
            1_000_000 => true,
            n => self.draws.next(1_000_000) < u64::from(n),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// Only gRPC requests (`content-type: application/grpc...`).
    pub grpc: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    /// `/a` matches `/a`, `/a/...`, `/a?...` but not `/ab`.
    SeparatedPrefix(String),
    Regex(#[serde(with = "regex_str")] Regex),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".into())
    }
}

#[derive(Debug, Serialize)]
pub struct HeaderMatch {
    pub name: HeaderTarget,
    pub value: ValueMatch,
    pub invert: bool,
}

/// What a header matcher looks at: a header, or the `:method` pseudo-header.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderTarget {
    Method,
    Header(#[serde(with = "header_name_str")] HeaderName),
}

#[derive(Debug, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    Present(bool),
    Str(StrMatch),
}

#[derive(Debug, Serialize)]
pub struct StrMatch {
    pub kind: StrKind,
    pub ignore_case: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StrKind {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(#[serde(with = "regex_str")] Regex),
}

impl StrMatch {
    pub fn matches(&self, v: &str) -> bool {
        let fold = |s: &str| {
            if self.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        match &self.kind {
            StrKind::Exact(want) if self.ignore_case => v.eq_ignore_ascii_case(want),
            StrKind::Exact(want) => v == want,
            StrKind::Prefix(p) => fold(v).starts_with(&fold(p)),
            StrKind::Suffix(s) => fold(v).ends_with(&fold(s)),
            StrKind::Contains(s) => fold(v).contains(&fold(s)),
            StrKind::Regex(r) => r.is_match(v),
        }
    }
}

/// Header changes at one level (route config, virtual host, route, weighted cluster).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeaderOps {
    #[serde(with = "header_pairs")]
    pub request_set: Vec<(HeaderName, HeaderValue)>,
    #[serde(with = "header_pairs")]
    pub request_add: Vec<(HeaderName, HeaderValue)>,
    #[serde(with = "header_names")]
    pub request_remove: Vec<HeaderName>,
    #[serde(with = "header_pairs")]
    pub response_set: Vec<(HeaderName, HeaderValue)>,
    #[serde(with = "header_pairs")]
    pub response_add: Vec<(HeaderName, HeaderValue)>,
    #[serde(with = "header_names")]
    pub response_remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.request_set.is_empty()
            && self.request_add.is_empty()
            && self.request_remove.is_empty()
            && self.response_set.is_empty()
            && self.response_add.is_empty()
            && self.response_remove.is_empty()
    }

    pub fn apply_request(&self, h: &mut HeaderMap) {
        apply(
            h,
            &self.request_remove,
            &self.request_set,
            &self.request_add,
        );
    }

    pub fn apply_response(&self, h: &mut HeaderMap) {
        apply(
            h,
            &self.response_remove,
            &self.response_set,
            &self.response_add,
        );
    }
}

fn apply(
    h: &mut HeaderMap,
    remove: &[HeaderName],
    set: &[(HeaderName, HeaderValue)],
    add: &[(HeaderName, HeaderValue)],
) {
    for name in remove {
        h.remove(name);
    }
    for (name, value) in set {
        h.insert(name.clone(), value.clone());
    }
    for (name, value) in add {
        h.append(name.clone(), value.clone());
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Forward(Box<Forward>),
    Redirect(Redirect),
    Direct { status: u16, body: String },
}

#[derive(Debug, Serialize)]
pub struct Forward {
    pub backends: Vec<WeightedBackend>,
    pub total_weight: u64,
    /// Until the response headers arrive, across all tries; `None`: no limit.
    #[serde(with = "opt_ms")]
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// What a ring-hash cluster hashes the request by (`hash_policy`).
    pub hash: Vec<HashPolicy>,
    pub mirrors: Vec<Mirror>,
    pub prefix_rewrite: Option<String>,
    /// What `prefix_rewrite` replaces: the route's path prefix.
    pub matched_prefix: Option<String>,
    #[serde(serialize_with = "regex_rewrite_str")]
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: Option<String>,
    /// Where the next weighted pick lands; see [`Draws`].
    #[serde(skip)]
    pub draws: Draws,
}

/// The draws that split a route's requests between its weighted backends: a Weyl sequence
/// (a random start, then steps of 2^64 divided by the golden ratio) instead of independent
/// random numbers. Every run of consecutive requests, and every arithmetic subsequence of
/// them, is spread evenly over `0..total_weight`, so a 50/50 split of 600 requests is off by
/// a request or two rather than by a dozen, and a client that alternates two kinds of request
/// still sees each kind split by the weights. The random start keeps proxies out of step.
#[derive(Debug)]
pub struct Draws(AtomicU64, u64);

/// 2^64 / golden ratio, odd.
const WEYL_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Draws {
    fn default() -> Self {
        Self(AtomicU64::new(rand::random()), WEYL_STEP)
    }
}

impl Draws {
    /// Draws whose sequence is independent of the default one's: a step of 2^64 divided by
    /// the square root of 2, so pairs of draws from the two spread evenly over the square
    /// (the two steps are rationally independent), and two shares drawn per request, a
    /// fault's delay and abort, combine as independent ones do.
    pub fn second() -> Self {
        Self(AtomicU64::new(rand::random()), 0xB504_F333_F9DE_6485)
    }

    /// The next draw in `0..total`; `total` must not be 0.
    pub fn next(&self, total: u64) -> u64 {
        let x = self.0.fetch_add(self.1, Ordering::Relaxed);
        ((u128::from(x) * u128::from(total)) >> 64) as u64
    }
}

#[derive(Debug, Serialize)]
pub struct WeightedBackend {
    pub cluster: String,
    pub weight: u32,
    pub headers: HeaderOps,
    #[serde(skip)]
    pub metrics: crate::metrics::BackendSlot,
}

#[derive(Debug, Serialize)]
pub struct Mirror {
    pub cluster: String,
    pub per_million: u32,
}

impl Forward {
    /// The backend for a draw `r` in `0..total_weight`.
    pub fn backend_at(&self, mut r: u64) -> Option<&WeightedBackend> {
        for b in &self.backends {
            if r < u64::from(b.weight) {
                return Some(b);
            }
            r -= u64::from(b.weight);
        }
        None
    }

    /// Picks a backend in proportion to the weights.
    pub fn pick(&self) -> Option<&WeightedBackend> {
        match self.backends.as_slice() {
            [only] => Some(only),
            _ if self.total_weight == 0 => None,
            _ => self.backend_at(self.draws.next(self.total_weight)),
        }
    }
}

/// One `hash_policy` of a route.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashPolicy {
    Header {
        #[serde(serialize_with = "header_name_str")]
        name: HeaderName,
        terminal: bool,
    },
    Cookie {
        name: String,
        /// With one, a request without the cookie gets it set on its response.
        #[serde(with = "opt_ms")]
        ttl: Option<Duration>,
        path: Option<String>,
        terminal: bool,
    },
    SourceIp {
        terminal: bool,
    },
}

impl HashPolicy {
    pub fn terminal(&self) -> bool {
        match self {
            HashPolicy::Header { terminal, .. }
            | HashPolicy::Cookie { terminal, .. }
            | HashPolicy::SourceIp { terminal } => *terminal,
        }
    }
}

fn header_name_str<S: serde::Serializer>(n: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_str())
}

#[derive(Clone, Debug, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    /// Retry any 5xx.
    pub on_5xx: bool,
    /// Retry 502, 503, 504.
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_refused_stream: bool,
    pub codes: Vec<u16>,
    /// gRPC statuses retried when a response ends at its headers (`grpc-status` there).
    pub grpc_statuses: Vec<u32>,
    #[serde(with = "opt_ms")]
    pub per_try_timeout: Option<Duration>,
    #[serde(with = "ms")]
    pub backoff_base: Duration,
    #[serde(with = "ms")]
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Whether it retries requests that reached the endpoint, whose bodies a retry must then
    /// replay: anything but a failed connection or a refused stream. (A refused stream is
    /// retried when its body can be sent again without a record: none, or held whole.)
    pub fn retries_sent_requests(&self) -> bool {
        self.attempts > 0
            && (self.on_5xx
                || self.on_gateway_error
                || self.on_reset
                || !self.codes.is_empty()
                || !self.grpc_statuses.is_empty())
    }

    /// Whether it retries a stream the endpoint refused (HTTP/2 `REFUSED_STREAM`).
    pub fn retries_refused_streams(&self) -> bool {
        self.attempts > 0 && self.on_refused_stream
    }

    pub fn retries_status(&self, status: u16) -> bool {
        (self.on_5xx && (500..600).contains(&status))
            || (self.on_gateway_error && matches!(status, 502..=504))
            || self.codes.contains(&status)
    }

    /// Whether a response's headers carry a `grpc-status` this policy retries (a gRPC
    /// failure with no body: trailers only).
    pub fn retries_grpc(&self, headers: &HeaderMap) -> bool {
        !self.grpc_statuses.is_empty()
            && headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|code| self.grpc_statuses.contains(&code))
    }
}

#[derive(Debug, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub status: u16,
    /// The matched prefix (for a prefix rewrite of the redirect path).
    pub matched_prefix: Option<String>,
}

/// What a request looks like to the matcher.
#[derive(Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl RouteTable {
    /// Every cluster its routes send to (backends and mirrors).
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.vhosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .filter_map(|r| match &r.action {
                Action::Forward(f) => Some(f),
                _ => None,
            })
            .flat_map(|f| {
                f.backends
                    .iter()
                    .map(|b| b.cluster.as_str())
                    .chain(f.mirrors.iter().map(|m| m.cluster.as_str()))
            })
    }

    pub fn new(name: String, vhosts: Vec<Arc<VirtualHost>>, headers: HeaderOps) -> Self {
        Self::new_after(name, vhosts, headers, None)
    }

    /// [`RouteTable::new`], sharing `previous`'s domain index when its virtual hosts have the
    /// same domains at the same positions (what the index holds), instead of building it again.
    pub fn new_after(
        name: String,
        vhosts: Vec<Arc<VirtualHost>>,
        headers: HeaderOps,
        previous: Option<&RouteTable>,
    ) -> Self {
        let domains = match previous {
            Some(p)
                if p.vhosts.len() == vhosts.len()
                    && p.vhosts
                        .iter()
                        .zip(&vhosts)
                        .all(|(a, b)| Arc::ptr_eq(a, b) || a.domains == b.domains) =>
            {
                p.domains.clone()
            }
            _ => Arc::new(DomainIndex::new(&vhosts)),
        };
        RouteTable {
            name,
            vhosts,
            headers,
            ignore_port: false,
            domains,
        }
    }

    /// Its virtual hosts, in order.
    pub fn vhosts(&self) -> &[Arc<VirtualHost>] {
        &self.vhosts
    }

    /// The virtual host for a `Host` value (any case, with or without port).
    pub fn vhost(&self, host: &str) -> Option<&VirtualHost> {
        let host = match host.rsplit_once(':') {
            Some((h, port))
                if self.ignore_port
                    && !h.is_empty()
                    && port.bytes().all(|b| b.is_ascii_digit()) =>
            {
                h
            }
            _ => host,
        };
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let index = &*self.domains;
        let idx = index
            .exact
            .find(index.hasher.hash_one(host), |&(v, d)| {
                self.vhosts
                    .get(v)
                    .and_then(|vh| vh.domains.get(d))
                    .is_some_and(|domain| domain.eq_ignore_ascii_case(host))
            })
            .map(|&(v, _)| v)
            .or_else(|| {
                index
                    .suffixes
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                index
                    .prefixes
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(index.wildcard)?;
        self.vhosts.get(idx).map(|vh| &**vh)
    }

    /// The virtual host and the first route that matches.
    pub fn find(&self, host: &str, req: &RequestInfo<'_>) -> Option<(&VirtualHost, &Route)> {
        let vh = self.vhost(host)?;
        vh.routes
            .iter()
            .find(|r| r.matcher.matches(req))
            .map(|r| (vh, r))
    }
}

impl RouteMatch {
    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        self.path_matches(req.path)
            && (!self.grpc || is_grpc(req.headers))
            && self
                .headers
                .iter()
                .all(|h| h.matches(req.headers, req.method))
            && self.query.iter().all(|q| q.matches(req.query))
    }

    fn path_matches(&self, path: &str) -> bool {
        // Byte-wise, so a prefix never splits a UTF-8 character.
        let eq = |a: &[u8], b: &[u8]| {
            if self.case_sensitive {
                a == b
            } else {
                a.eq_ignore_ascii_case(b)
            }
        };
        let path = path.as_bytes();
        let starts = |p: &[u8]| path.len() >= p.len() && eq(&path[..p.len()], p);
        match &self.path {
            PathMatch::Prefix(p) => starts(p.as_bytes()),
            PathMatch::Exact(p) => eq(path, p.as_bytes()),
            PathMatch::SeparatedPrefix(p) => {
                let p = p.as_bytes();
                starts(p) && (path.len() == p.len() || path[p.len()] == b'/')
            }
            PathMatch::Regex(r) => std::str::from_utf8(path).is_ok_and(|s| r.is_match(s)),
        }
    }
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl HeaderMatch {
    pub(crate) fn matches(&self, headers: &HeaderMap, method: &Method) -> bool {
        let joined;
        let value: Option<&str> = match &self.name {
            HeaderTarget::Method => Some(method.as_str()),
            HeaderTarget::Header(name) => {
                let mut values = headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(v), None) => v.to_str().ok(),
                    // Several values match as one, joined with commas (as Envoy does).
                    (Some(_), Some(_)) => {
                        joined = headers
                            .get_all(name)
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect::<Vec<_>>()
                            .join(",");
                        Some(joined.as_str())
                    }
                }
            }
        };
        let hit = match (&self.value, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (ValueMatch::Str(_), None) => return false,
            (ValueMatch::Str(m), Some(v)) => m.matches(v),
        };
        hit != self.invert
    }
}

impl QueryMatch {
    fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == self.name).then_some(v)
            })
        });
        match (&self.value, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (ValueMatch::Str(_), None) => false,
            (ValueMatch::Str(m), Some(v)) => m.matches(v),
        }
    }
}

// ---- serde helpers for /config_dump -------------------------------------------------------------

mod regex_str {
    pub fn serialize<S: serde::Serializer>(r: &regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }
}

mod header_name_str {
    pub fn serialize<S: serde::Serializer>(h: &http::HeaderName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(h.as_str())
    }
}

mod header_pairs {
    use serde::ser::SerializeSeq;

    pub fn serialize<S: serde::Serializer>(
        v: &[(http::HeaderName, http::HeaderValue)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for (k, val) in v {
            seq.serialize_element(&(k.as_str(), String::from_utf8_lossy(val.as_bytes())))?;
        }
        seq.end()
    }
}

mod header_names {
    use serde::ser::SerializeSeq;

    pub fn serialize<S: serde::Serializer>(
        v: &[http::HeaderName],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for k in v {
            seq.serialize_element(k.as_str())?;
        }
        seq.end()
    }
}

pub(crate) mod opt_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

fn regex_rewrite_str<S: serde::Serializer>(
    v: &Option<(Regex, String)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some((r, sub)) => s.collect_seq([r.as_str(), sub.as_str()]),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
mod tests;
