//! HTTP requests: route, then forward with timeouts, retries (within the budget), header
//! changes, mirrors and upgrades; or answer locally (redirects, direct responses, errors).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::Shared;
use super::observe::{self, CallerCache, Counted, Exchange, SOURCE_WORKLOAD};
use super::replay::ReplayBody;
use super::upstream::{self, Body, Fault, SendError, Target};
use crate::balance::Outcome;
use crate::metrics::{Direction, Peer, ReasonLabels, TimeoutLabels};
use crate::state::route::{Action, Forward, Redirect, RequestInfo, Route, VirtualHost};
use crate::state::{Cluster, ClusterKind, RouteTable, Snapshot, UpstreamProtocol};

/// Largest request body kept so that the request can be retried or mirrored.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// What an HTTP connection knows about itself.
#[derive(Debug)]
pub struct HttpCtx {
    pub shared: Arc<Shared>,
    /// The RouteConfiguration its filter chain names.
    pub route: String,
    /// The connection's original destination.
    pub dst: SocketAddr,
    /// The client's address (for a hash by source IP).
    pub src: Option<SocketAddr>,
    /// Inbound over mesh TLS: the client's SPIFFE ID (for policy and metrics).
    pub peer: Option<mesh_api::SpiffeId>,
    /// Inbound: the `x-forwarded-client-cert` value given to the app (`By=<this
    /// proxy>;URI=<peer>`), when the client proved an identity.
    pub xfcc: Option<HeaderValue>,
    /// Inbound: the callers seen on this connection.
    pub callers: CallerCache,
    /// The listener (and so the direction) and filter chain the connection is on, for its
    /// current policy.
    pub kind: super::ListenerKind,
    pub chain: String,
    pub guard: super::guard::GuardCache,
}

/// The header that tells the app who called; never taken from outside the mesh.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

pub async fn handle(
    ctx: Arc<HttpCtx>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if ctx.peer.is_some()
        && let Some(tls) = &ctx.shared.tls
        && !tls.identity.has_valid_svid()
    {
        // Fail closed, on connections opened while the certificate was valid too.
        return Ok(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "this proxy holds no valid certificate: mesh TLS refused",
        ));
    }
    let peer = match ctx.kind.direction() {
        Direction::inbound => {
            // Only this proxy vouches for the caller: whatever arrived is dropped.
            let headers = req.headers_mut();
            headers.remove(XFCC);
            if let Some(v) = &ctx.xfcc {
                headers.insert(XFCC, v.clone());
            }
            observe::caller(
                headers,
                ctx.peer.as_ref(),
                ctx.shared.tls.is_none(),
                &ctx.callers,
            )
        }
        Direction::outbound => Peer::unknown(),
    };
    let mut ex = Exchange::start(&ctx.shared, ctx.kind.direction(), peer, &mut req, ctx.dst);
    let resp = route_and_forward(&ctx, req, &mut ex).await;
    Ok(ex.respond(resp))
}

async fn route_and_forward(
    ctx: &HttpCtx,
    mut req: Request<Incoming>,
    ex: &mut Exchange,
) -> Response<Body> {
    let Some(snapshot) = ctx.shared.store.load() else {
        ex.flags = "NR";
        return local(StatusCode::SERVICE_UNAVAILABLE, "proxy has no config yet");
    };
    if let Some(refused) = super::guard::check(ctx, &snapshot, &mut req, ex) {
        return refused;
    }
    let Some(table) = snapshot.route(&ctx.route).cloned() else {
        ex.flags = "NR";
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no route configuration {:?}", ctx.route),
        );
    };
    let Some(host) = authority(&req) else {
        return local(StatusCode::BAD_REQUEST, "request has no Host");
    };
    let info = RequestInfo {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let Some((vh, route)) = table.find(&host, &info) else {
        ex.flags = "NR";
        return local(StatusCode::NOT_FOUND, &format!("no route for {host}"));
    };
    ex.route(&route.name);
    let mut resp = match &route.action {
        Action::Forward(f) => {
            let levels = Levels {
                table: &table,
                vh,
                route,
            };
            forward(ctx, &snapshot, levels, f, host, req, ex).await
        }
        Action::Redirect(r) => redirect(r, &host, req.uri()),
        Action::Direct { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = Response::new(full(Bytes::from(body.clone())));
            *r.status_mut() = status;
            r
        }
    };
    if !matches!(route.action, Action::Forward(_)) {
        route.headers.apply_response(resp.headers_mut());
        vh.headers.apply_response(resp.headers_mut());
        table.headers.apply_response(resp.headers_mut());
    }
    resp
}

/// The config levels a request matched, for header changes (most specific first).
#[derive(Clone, Copy)]
struct Levels<'a> {
    table: &'a RouteTable,
    vh: &'a VirtualHost,
    route: &'a Route,
}

fn authority(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A response the proxy makes itself.
pub fn local(status: StatusCode, message: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(format!("{message}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        HeaderName::from_static("x-mesh-proxy"),
        HeaderValue::from_static("local"),
    );
    r
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Drops hop-by-hop headers, and those the `Connection` header names. `te: trailers` stays:
/// gRPC needs it.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    {
        for name in conn.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Ok(n) = HeaderName::try_from(name.to_ascii_lowercase())
                && n != header::TE
            {
                h.remove(n);
            }
        }
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    if let Some(te) = h.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        h.remove(header::TE);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The request body: empty, read in full (for mirrors), recorded as it streams (for retries),
/// or streamed as is.
enum ReqBody {
    Empty,
    Buffered(Bytes),
    /// The handle copies for each try are made from; it is never read itself.
    Replay(ReplayBody<Counted<Incoming>>),
    Stream(Option<Counted<Incoming>>),
}

impl ReqBody {
    fn replayable(&self) -> bool {
        match self {
            ReqBody::Empty | ReqBody::Buffered(_) => true,
            ReqBody::Replay(r) => r.can_replay(),
            ReqBody::Stream(_) => false,
        }
    }

    /// A copy for another try, made now (which ends the previous try's copy), or `None` when
    /// the body cannot be sent again (it streamed, or outgrew its record).
    fn copy(&mut self) -> Option<Body> {
        match self {
            ReqBody::Stream(_) => None,
            ReqBody::Replay(r) => r.replay().map(|c| c.boxed_unsync()),
            _ => Some(self.take()),
        }
    }

    fn take(&mut self) -> Body {
        match self {
            ReqBody::Empty => empty(),
            ReqBody::Buffered(b) => full(b.clone()),
            ReqBody::Replay(r) => match r.replay() {
                Some(copy) => copy.boxed_unsync(),
                None => empty(),
            },
            ReqBody::Stream(s) => match s.take() {
                Some(b) => b.map_err(Into::into).boxed_unsync(),
                None => empty(),
            },
        }
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The path after a route's rewrite, if it has one.
fn rewrite_path(f: &Forward, path: &str) -> Option<String> {
    if let (Some(to), Some(prefix)) = (&f.prefix_rewrite, &f.matched_prefix) {
        let rest = path.get(prefix.len()..).unwrap_or("");
        let mut out = format!("{to}{rest}");
        if out.is_empty() {
            out.push('/');
        }
        return Some(out);
    }
    if let Some((re, sub)) = &f.regex_rewrite {
        return Some(re.replace_all(path, sub.as_str()).into_owned());
    }
    None
}

/// The outcome of one try.
enum Try {
    Response(Response<upstream::UpstreamBody>),
    Failed(SendError),
    /// The per-try timeout fired.
    PerTryTimeout,
    /// The route's timeout fired.
    Timeout,
}

async fn forward(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    levels: Levels<'_>,
    f: &Forward,
    mut host: String,
    mut req: Request<Incoming>,
    ex: &mut Exchange,
) -> Response<Body> {
    let start = Instant::now();
    let shared = &ctx.shared;
    let Some(backend) = f.pick() else {
        return local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "every backend of the route has weight 0",
        );
    };
    ex.backend = Some(
        backend
            .metrics
            .get(ctx.kind.direction(), &levels.route.name, &backend.cluster)
            .clone(),
    );
    let Some(cluster) = snapshot.cluster(&backend.cluster).cloned() else {
        ex.flags = "NC";
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("cluster {:?} not found", backend.cluster),
        );
    };
    let upgrade = is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // The hash key, from the request as the client sent it.
    let affinity = if f.hash.is_empty() {
        super::affinity::Affinity::default()
    } else {
        super::affinity::affinity(&f.hash, &parts.headers, ctx.src)
    };
    // A body that is already over is never read: nothing to count.
    let body = (!body.is_end_stream()).then(|| Counted::new(body, ex.request_bytes()));

    // Header changes, least specific last so the route config has the final say (Envoy's
    // default order).
    backend.headers.apply_request(&mut parts.headers);
    levels.route.headers.apply_request(&mut parts.headers);
    levels.vh.headers.apply_request(&mut parts.headers);
    levels.table.headers.apply_request(&mut parts.headers);
    let upgrade_headers = upgrade.then(|| {
        (
            parts.headers.get(header::CONNECTION).cloned(),
            parts.headers.get(header::UPGRADE).cloned(),
        )
    });
    strip_hop_by_hop(&mut parts.headers);
    if let Some((conn, up)) = upgrade_headers {
        if let Some(c) = conn {
            parts.headers.insert(header::CONNECTION, c);
        }
        if let Some(u) = up {
            parts.headers.insert(header::UPGRADE, u);
        }
    }
    if let Some(h) = &f.host_rewrite {
        host = h.clone();
    }
    // The origin-form target: the client's own when nothing rewrites it (no copy).
    let rewritten = rewrite_path(f, parts.uri.path());
    let origin: Uri = match (&rewritten, parts.uri.scheme()) {
        (None, None) => parts.uri.clone(),
        _ => {
            let path = rewritten.as_deref().unwrap_or(parts.uri.path());
            let target = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            match Uri::try_from(target) {
                Ok(u) => u,
                Err(_) => return local(StatusCode::BAD_REQUEST, "invalid request target"),
            }
        }
    };
    let absolute = |host: &str| -> Option<Uri> {
        let pq = origin.path_and_query().map_or("/", |p| p.as_str());
        Uri::try_from(format!("http://{host}{pq}")).ok()
    };
    // Host for HTTP/1.1 upstreams: the client's header unless rewritten or missing.
    let host_value = match parts.headers.get(header::HOST) {
        Some(v) if f.host_rewrite.is_none() => v.clone(),
        _ => match HeaderValue::from_str(&host) {
            Ok(v) => v,
            Err(_) => return local(StatusCode::BAD_REQUEST, "invalid Host"),
        },
    };

    let mut body = match body {
        None => ReqBody::Empty,
        // A mirror copy needs the whole body before it is sent.
        Some(body)
            if !f.mirrors.is_empty()
                && !upgrade
                && content_length(&parts.headers).is_some_and(|n| n <= REPLAY_LIMIT as u64) =>
        {
            match body.collect().await {
                Ok(b) => ReqBody::Buffered(b.to_bytes()),
                Err(e) => {
                    debug!(error = %e, "reading the request body");
                    return local(StatusCode::BAD_REQUEST, "request body ended early");
                }
            }
        }
        // Recorded for a retry only when one may follow a try that sent it: a failed
        // connection (the default retry) never read it, but a streamed body cannot be given
        // to a second try, so such a request is not retried.
        Some(body) if f.retry.as_ref().is_some_and(|p| p.retries_sent_requests()) && !upgrade => {
            ReqBody::Replay(ReplayBody::new(body, REPLAY_LIMIT))
        }
        Some(body) => ReqBody::Stream(Some(body)),
    };

    // A mirror gets a copy of a body held whole; a recorded one belongs to the tries.
    if !f.mirrors.is_empty() && matches!(body, ReqBody::Empty | ReqBody::Buffered(_)) {
        mirror(ctx, snapshot, f, &parts, &origin, &host, &mut body);
    }

    // A request for one try. Headers are moved into the only try there can be, and copied
    // when a retry may need them again.
    let may_retry = f.retry.is_some() && body.replayable();
    let mut headers = Some(std::mem::take(&mut parts.headers));
    let source = shared.source_header.clone();
    let mut build = |h2: bool, mesh: bool, body: Body| -> Option<Request<Body>> {
        let mut r = Request::new(body);
        *r.method_mut() = parts.method.clone();
        *r.headers_mut() = if may_retry {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        // The server's proxy learns who calls from this; nobody else gets it.
        match (&source, mesh) {
            (Some(v), true) => r.headers_mut().insert(SOURCE_WORKLOAD, v.clone()),
            _ => r.headers_mut().remove(SOURCE_WORKLOAD),
        };
        if h2 {
            *r.uri_mut() = absolute(&host)?;
            *r.version_mut() = Version::HTTP_2;
            r.headers_mut().remove(header::HOST);
        } else {
            *r.uri_mut() = origin.clone();
            *r.version_mut() = Version::HTTP_11;
            r.headers_mut().insert(header::HOST, host_value.clone());
        }
        Some(r)
    };

    let policy = f.retry.as_ref();
    let deadline = f.timeout.map(|t| start + t);
    if policy.is_some() {
        cluster.budget.deposit(start);
        cluster.breaker.deposit(start);
    }
    let base_h2 = !upgrade
        && match cluster.protocol {
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Downstream => parts.version == Version::HTTP_2,
        };
    if let Some(max) = cluster.max_requests
        && cluster.endpoints.in_flight() >= max
    {
        return overflow(ex, "upstream overflow: too many requests in flight");
    }
    let mut attempt = 0u32;
    let mut avoid = None;
    // The body of the next try, copied when its retry was decided.
    let mut next_body: Option<Body> = None;
    // The retry in flight, against the cluster's max_retries or retry budget.
    let mut retry_slot = None;
    loop {
        let Some(inflight) = pick(&cluster, ctx.dst, avoid, affinity.hash) else {
            ex.flags = "UH";
            return local(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let ep = inflight.endpoint.clone();
        if ctx.kind.direction() == Direction::outbound {
            ex.peer = ep.peer.clone();
        }
        ex.upstream(&cluster.name, ep.addr);
        let h2 = base_h2 || (ep.mesh_proxy && !upgrade);
        let target = Target {
            h2,
            connect_timeout: cluster.connect_timeout,
            idle_timeout: shared.config.idle_timeout,
            tls: shared.tls.clone(),
            breaker: cluster.breaker.clone(),
            peers: cluster.endpoints.clone(),
        };
        let try_body = next_body.take().unwrap_or_else(|| body.take());
        let Some(req) = build(h2, ep.mesh_proxy, try_body) else {
            return local(
                StatusCode::BAD_REQUEST,
                "invalid Host for an HTTP/2 upstream",
            );
        };
        let send = upstream::send(&ep, target, req);
        let try_deadline = policy
            .and_then(|p| p.per_try_timeout)
            .map(|t| Instant::now() + t);
        let limit = match (deadline, try_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match limit {
            None => match send.await {
                Ok(r) => Try::Response(r),
                Err(e) => Try::Failed(e),
            },
            Some(at) => match tokio::time::timeout_at(at.into(), send).await {
                Ok(Ok(r)) => Try::Response(r),
                Ok(Err(e)) => Try::Failed(e),
                Err(_) if Some(at) == deadline => Try::Timeout,
                Err(_) => Try::PerTryTimeout,
            },
        };
        // An overflow, a local failure or another request's failed attempt is not charged to
        // the endpoint (again): it neither failed nor answered.
        let outcome = match &result {
            Try::Response(r) if r.status().is_server_error() => Some(Outcome::ServerError {
                gateway: matches!(r.status().as_u16(), 502..=504),
            }),
            Try::Response(_) => Some(Outcome::Success),
            Try::Failed(e) => e.outcome(),
            Try::PerTryTimeout | Try::Timeout => Some(Outcome::ServerError { gateway: true }),
        };
        match outcome {
            Some(o) => inflight.finish(o),
            None => drop(inflight),
        }
        let reason = policy.and_then(|p| match &result {
            Try::Response(r) if p.retries_status(r.status().as_u16()) => Some("status"),
            Try::Response(r) if p.retries_grpc(r.headers()) => Some("grpc-status"),
            Try::Failed(SendError::Overflow) => None,
            // Another endpoint would fare no better.
            Try::Failed(e) if e.fault() == Some(Fault::Local) => None,
            Try::Failed(e) if e.is_connect() && p.on_connect_failure => Some("connect-failure"),
            Try::Failed(e) if !e.is_connect() && (p.on_reset || p.on_refused_stream) => {
                Some("reset")
            }
            Try::PerTryTimeout if p.on_5xx || p.on_gateway_error => Some("per-try-timeout"),
            _ => None,
        });
        if let (Some(reason), Some(p)) = (reason, policy) {
            let labels = || ReasonLabels {
                backend: cluster.name.clone(),
                reason,
            };
            let now = Instant::now();
            // The next try's body is copied now, while the record is known to hold it: by
            // the time the retry starts, the last try may have read it past what is kept.
            let mut denied = || match body.copy() {
                None => Some("body-not-replayable"),
                Some(copy) => {
                    let denied = admit_retry(&cluster, now, &mut retry_slot);
                    if denied.is_none() {
                        next_body = Some(copy);
                    }
                    denied
                }
            };
            if attempt >= p.attempts || deadline.is_some_and(|d| now >= d) {
                // Out of tries: the last answer stands.
            } else if let Some(denied) = denied() {
                shared
                    .metrics
                    .retries_denied
                    .get_or_create(&ReasonLabels {
                        backend: cluster.name.clone(),
                        reason: denied,
                    })
                    .inc();
            } else {
                shared.metrics.retries.get_or_create(&labels()).inc();
                attempt += 1;
                avoid = Some(ep.addr);
                let step = p
                    .backoff_base
                    .saturating_mul(1 << (attempt - 1).min(10))
                    .min(p.backoff_max);
                let wait = step.mul_f64(rand::random_range(0.0..=1.0));
                match deadline {
                    Some(d) if now + wait >= d => {}
                    _ => {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
        }
        ex.headers_after = Some(start.elapsed());
        return match result {
            Try::Response(mut resp) => {
                if let (Some(down), StatusCode::SWITCHING_PROTOCOLS) =
                    (downstream_upgrade, resp.status())
                {
                    tunnel(down, hyper::upgrade::on(&mut resp), ctx.dst);
                    let (p, b) = resp.into_parts();
                    return Response::from_parts(p, b.map_err(Into::into).boxed_unsync());
                }
                let (mut p, b) = resp.into_parts();
                strip_hop_by_hop(&mut p.headers);
                if let Some(c) = &affinity.set_cookie {
                    p.headers.append(header::SET_COOKIE, c.clone());
                }
                backend.headers.apply_response(&mut p.headers);
                levels.route.headers.apply_response(&mut p.headers);
                levels.vh.headers.apply_response(&mut p.headers);
                levels.table.headers.apply_response(&mut p.headers);
                let body = b.map_err(Into::into);
                match deadline {
                    // The route timeout covers the response body too, as Envoy's does.
                    Some(at) => ex.attach(Response::from_parts(p, Deadline::new(body, at))),
                    None => ex.attach(Response::from_parts(p, body)),
                }
            }
            Try::Failed(SendError::Overflow) => overflow(
                ex,
                "upstream overflow: no connection free and too many requests waiting for one",
            ),
            Try::Failed(e) => {
                ex.flags = if e.is_connect() { "UF" } else { "UC" };
                debug!(error = %e, cluster = %cluster.name, "upstream request failed");
                if e.is_connect() {
                    local(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("upstream connect error: {e}"),
                    )
                } else {
                    local(StatusCode::BAD_GATEWAY, &format!("upstream reset: {e}"))
                }
            }
            timeout @ (Try::PerTryTimeout | Try::Timeout) => {
                ex.flags = "UT";
                let kind = match timeout {
                    Try::Timeout => "route",
                    _ => "per-try",
                };
                shared
                    .metrics
                    .timeouts
                    .get_or_create(&TimeoutLabels {
                        backend: cluster.name.clone(),
                        kind,
                    })
                    .inc();
                local(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        };
    }
}

/// Whether the cluster lets one more retry go: `None` when it does (the retry's slot, if its
/// limits count retries, is kept in `slot` until the next), else why not. The cluster's own
/// `max_retries` or retry budget replace the proxy's default budget.
fn admit_retry(
    cluster: &Cluster,
    now: Instant,
    slot: &mut Option<crate::breaker::RetrySlot>,
) -> Option<&'static str> {
    if !cluster.breaker.limits_retries() {
        return (!cluster.budget.withdraw(now)).then_some("budget");
    }
    // This request's previous retry is over: it does not count against the next.
    *slot = None;
    *slot = cluster.breaker.retry(cluster.endpoints.in_flight(), now);
    slot.is_none().then_some("overflow")
}

/// A circuit breaker's answer: `503`, flag `UO`, marked as the proxy's own.
fn overflow(ex: &mut Exchange, why: &str) -> Response<Body> {
    ex.flags = "UO";
    let mut r = local(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut().insert(
        HeaderName::from_static("x-mesh-proxy"),
        HeaderValue::from_static("overflow"),
    );
    r
}

/// An endpoint of the cluster; for an original-destination cluster, the connection's own.
fn pick(
    cluster: &Arc<Cluster>,
    dst: SocketAddr,
    avoid: Option<SocketAddr>,
    hash: Option<u64>,
) -> Option<crate::balance::InFlight> {
    match cluster.kind {
        ClusterKind::OriginalDst => cluster.original_dst(dst).pick(None, None),
        _ => cluster.endpoints.pick(avoid, hash),
    }
}

pin_project_lite::pin_project! {
    /// A response body cut off, with an error, at the route's deadline.
    struct Deadline<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl<B> Deadline<B> {
    fn new(inner: B, at: Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(at.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("route timeout while the response was being sent")]
struct ResponseTimeout;

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes, Error = upstream::BoxError>,
{
    type Data = Bytes;
    type Error = upstream::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let std::task::Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return std::task::Poll::Ready(frame);
        }
        match this.sleep.poll(cx) {
            std::task::Poll::Ready(()) => {
                std::task::Poll::Ready(Some(Err(Box::new(ResponseTimeout))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Copies of the request to mirror clusters; their answers are dropped.
fn mirror(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    f: &Forward,
    parts: &http::request::Parts,
    uri: &Uri,
    host: &str,
    body: &mut ReqBody,
) {
    for m in &f.mirrors {
        if m.per_million < 1_000_000 && rand::random_range(0..1_000_000) >= m.per_million {
            continue;
        }
        let Some(cluster) = snapshot.cluster(&m.cluster).cloned() else {
            continue;
        };
        let Some(inflight) = cluster.endpoints.pick(None, None) else {
            continue;
        };
        let mut r = Request::new(body.take());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = uri.clone();
        *r.headers_mut() = parts.headers.clone();
        // Envoy marks mirrored traffic by suffixing the host.
        if let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow")) {
            r.headers_mut().insert(header::HOST, v);
        }
        let target = Target {
            h2: false,
            connect_timeout: cluster.connect_timeout,
            idle_timeout: ctx.shared.config.idle_timeout,
            tls: ctx.shared.tls.clone(),
            breaker: cluster.breaker.clone(),
            peers: cluster.endpoints.clone(),
        };
        tokio::spawn(async move {
            let ep = inflight.endpoint.clone();
            let result = upstream::send(&ep, target, r).await;
            // Charged as the main tries are.
            match result {
                Ok(resp) => {
                    let ok = !resp.status().is_server_error();
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                    inflight.finish(if ok {
                        Outcome::Success
                    } else {
                        Outcome::ServerError { gateway: false }
                    });
                }
                Err(e) => {
                    if let Some(o) = e.outcome() {
                        inflight.finish(o);
                    }
                }
            }
        });
    }
}

/// After a 101 from both sides, copies bytes between the client and the endpoint.
fn tunnel(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade, dst: SocketAddr) {
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(down, up) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, %dst, "upgrade failed");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            debug!(error = %e, %dst, "upgraded connection ended");
        }
    });
}

fn redirect(r: &Redirect, host: &str, uri: &Uri) -> Response<Body> {
    let (orig_host, orig_port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || host.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    };
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r.host.as_deref().unwrap_or(orig_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => orig_port,
    };
    let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = match (&r.path, &r.prefix_rewrite, &r.matched_prefix) {
        (Some(p), _, _) => p.clone(),
        (None, Some(to), Some(prefix)) => {
            let rest = uri.path().get(prefix.len()..).unwrap_or("");
            let p = format!("{to}{rest}");
            if p.is_empty() { "/".into() } else { p }
        }
        _ => uri.path().to_string(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-app"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn redirects() {
        let r = Redirect {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            prefix_rewrite: Some("/new".into()),
            status: 301,
            matched_prefix: Some("/old".into()),
        };
        let resp = redirect(&r, "shop.example:8080", &Uri::from_static("/old/cart?id=1"));
        assert_eq!(resp.status(), 301);
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://shop.example/new/cart?id=1"
        );
        let r = Redirect {
            scheme: None,
            host: Some("other".into()),
            port: Some(8443),
            path: Some("/x".into()),
            prefix_rewrite: None,
            status: 302,
            matched_prefix: None,
        };
        let resp = redirect(&r, "shop:80", &Uri::from_static("/y"));
        assert_eq!(resp.headers()[header::LOCATION], "http://other:8443/x");
    }
}
