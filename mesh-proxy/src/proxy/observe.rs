//! One request's telemetry: its metrics, its span and its access log line, all recorded once,
//! when the response body ends or is dropped (so gRPC status from trailers and the bytes sent
//! are known).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header};
use http_body::{Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, Status};

use super::Shared;
use super::upstream::{Body, BoxError};
use crate::access_log::{Entry, rfc3339};
use crate::metrics::{BackendMetrics, Direction, Peer};
use crate::trace::{self, Format, TraceContext};

/// The header a client proxy names its workload in (`<namespace>/<workload>`), for the
/// server proxy's metrics; trusted only over mesh TLS, never passed to an app.
pub const SOURCE_WORKLOAD: HeaderName = HeaderName::from_static("x-mesh-source-workload");

/// What a caller is worked out from: the source header, the client's identity and whether
/// the proxy runs with identity off.
type CallerKey = (Option<HeaderValue>, Option<mesh_api::SpiffeId>, bool);

/// What an HTTP connection remembers of its callers, inbound: the last answer (a connection
/// almost always carries one caller, with one identity).
#[derive(Debug, Default)]
pub struct CallerCache(std::sync::Mutex<Option<(CallerKey, Arc<Peer>)>>);

/// The caller of an inbound request: the workload the client proxy named (when the mesh TLS
/// identity vouches for its namespace, or the proxy runs without identity), else what the
/// identity alone says, else unknown. The header is removed either way.
pub fn caller(
    headers: &mut HeaderMap,
    peer: Option<&mesh_api::SpiffeId>,
    identity_off: bool,
    cache: &CallerCache,
) -> Arc<Peer> {
    let named = headers.remove(SOURCE_WORKLOAD);
    let mut cached = cache
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(((v, id, off), p)) = cached.as_ref()
        && *v == named
        && id.as_ref() == peer
        && *off == identity_off
    {
        return p.clone();
    }
    let p = resolve_caller(named.as_ref(), peer, identity_off);
    *cached = Some(((named, peer.cloned(), identity_off), p.clone()));
    p
}

fn resolve_caller(
    named: Option<&HeaderValue>,
    peer: Option<&mesh_api::SpiffeId>,
    identity_off: bool,
) -> Arc<Peer> {
    let from_identity = || peer.map_or_else(Peer::unknown, |id| Arc::new(Peer::from_identity(id)));
    let Some((ns, workload)) = named
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split_once('/'))
    else {
        return from_identity();
    };
    let trusted = match peer {
        Some(id) => id
            .namespace_and_account()
            .is_ok_and(|(id_ns, _)| id_ns == ns),
        None => identity_off,
    };
    if !trusted {
        return from_identity();
    }
    Arc::new(Peer::new(ns, workload, peer))
}

/// The value this proxy sends in [`SOURCE_WORKLOAD`].
pub fn source_value(me: &Peer) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{}/{}", me.namespace, me.workload)).ok()
}

/// A request being served, and what is known about it so far.
#[derive(Debug)]
pub struct Exchange {
    shared: Arc<Shared>,
    direction: Direction,
    start: Instant,
    /// Outbound: the endpoint's workload, once one was picked; inbound: the caller.
    pub peer: Arc<Peer>,
    /// The route backend the request went to, when it was forwarded.
    pub backend: Option<Arc<BackendMetrics>>,
    /// Time to the response headers.
    pub headers_after: Option<Duration>,
    pub status: Option<u16>,
    grpc: Option<u8>,
    /// Made when the request has a body to count.
    request_body: Option<Arc<BodyTally>>,
    response_bytes: u64,
    /// Envoy's response flags, `-` for none.
    pub flags: &'static str,
    /// Boxed, as the access log entry: an exchange is moved a few times per request.
    span: Option<Box<opentelemetry_sdk::trace::Span>>,
    /// The trace context sent on (`traceparent` to the next hop).
    pub trace: Option<TraceContext>,
    log: Option<Box<Entry>>,
    /// Moved into a response body already ([`Exchange::attach`]): nothing left to record.
    moved: bool,
}

impl Exchange {
    /// Starts the telemetry of `req`: takes its trace context (and writes this proxy's into
    /// it), and notes what the access log needs.
    pub fn start<B>(
        shared: &Arc<Shared>,
        direction: Direction,
        peer: Arc<Peer>,
        req: &mut Request<B>,
        local: SocketAddr,
    ) -> Self {
        let mut span = None;
        let mut trace = None;
        if let Some(tracing) = &shared.tracing {
            let parent = trace::extract(req.headers());
            let (s, next) = tracing.start(direction, parent.as_ref().map(|(c, _)| c));
            trace::inject(
                req.headers_mut(),
                &next,
                parent.map(|(_, f)| f).or(Some(Format::W3c)),
            );
            trace = Some(next);
            span = s.map(Box::new);
        }
        let log = shared.access_log.as_ref().map(|_| {
            let h = req.headers();
            let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            Box::new(Entry {
                start_time: rfc3339(SystemTime::now()),
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
                protocol: format!("{:?}", req.version()),
                x_forwarded_for: text(&HeaderName::from_static("x-forwarded-for")),
                user_agent: text(&header::USER_AGENT),
                request_id: text(&HeaderName::from_static("x-request-id")),
                authority: req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| text(&header::HOST)),
                downstream_local_address: local.to_string(),
                direction: match direction {
                    Direction::inbound => "inbound",
                    Direction::outbound => "outbound",
                },
                trace_id: trace.as_ref().map(trace::trace_id_hex),
                ..Default::default()
            })
        });
        if let Some(s) = span.as_mut() {
            s.update_name(format!("{} {}", req.method(), req.uri().path()));
            s.set_attributes([
                KeyValue::new("http.request.method", req.method().to_string()),
                KeyValue::new("url.path", req.uri().path().to_string()),
                KeyValue::new("network.protocol.version", format!("{:?}", req.version())),
            ]);
        }
        let mut ex = Exchange::blank(shared, direction, Instant::now(), peer);
        (ex.span, ex.trace, ex.log) = (span, trace, log);
        ex
    }

    /// An exchange that knows only who and when, and has recorded nothing.
    fn blank(shared: &Arc<Shared>, direction: Direction, start: Instant, peer: Arc<Peer>) -> Self {
        Exchange {
            shared: shared.clone(),
            direction,
            start,
            peer,
            backend: None,
            headers_after: None,
            status: None,
            grpc: None,
            request_body: None,
            response_bytes: 0,
            flags: "-",
            span: None,
            trace: None,
            log: None,
            moved: false,
        }
    }

    /// Per-request telemetry is on (`--telemetry`) and still here; off, nothing is recorded.
    fn on(&self) -> bool {
        self.shared.config.telemetry && !self.moved
    }

    /// The tally of the request's body, for a request that has one.
    pub fn request_body(&mut self) -> Arc<BodyTally> {
        self.request_body.get_or_insert_with(Arc::default).clone()
    }

    /// Whether the request's body broke off or its framing was malformed: the client's
    /// fault, not the endpoint's.
    pub fn request_body_failed(&self) -> bool {
        self.request_body
            .as_ref()
            .is_some_and(|t| t.failed.load(Ordering::Relaxed))
    }

    /// Notes the upstream that answered (access log and span).
    pub fn upstream(&mut self, cluster: &str, addr: SocketAddr) {
        if let Some(l) = self.log.as_mut() {
            l.upstream_cluster = Some(cluster.to_string());
            l.upstream_host = Some(addr.to_string());
        }
        if let Some(s) = self.span.as_mut() {
            s.set_attributes([
                KeyValue::new("mesh.backend", cluster.to_string()),
                KeyValue::new("server.address", addr.ip().to_string()),
                KeyValue::new("server.port", i64::from(addr.port())),
            ]);
        }
    }

    /// Notes the route a request matched (access log and span).
    pub fn route(&mut self, route: &str) {
        if let Some(l) = self.log.as_mut() {
            l.route_name = Some(route.to_string());
        }
        if let Some(s) = self.span.as_mut() {
            s.set_attribute(KeyValue::new("mesh.route", route.to_string()));
        }
    }

    /// Wraps the response: its status now, its gRPC status and bytes as the body goes. A
    /// response whose body carries the exchange already ([`Exchange::attach`]) passes as is.
    pub fn respond(self, resp: Response<Body>) -> Response<Body> {
        if !self.on() {
            return resp;
        }
        self.wrap(resp)
    }

    /// [`Exchange::respond`] for an upstream's body, which is boxed once, together with the
    /// wrapper, instead of boxed and then wrapped. The exchange moves into the body; what is
    /// left behind records nothing.
    pub fn attach<B>(&mut self, resp: Response<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        if !self.on() {
            return resp.map(http_body_util::BodyExt::boxed_unsync);
        }
        let mut left = Exchange::blank(&self.shared, self.direction, self.start, self.peer.clone());
        left.moved = true;
        std::mem::replace(self, left).wrap(resp)
    }

    fn wrap<B>(mut self, resp: Response<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        self.status = Some(resp.status().as_u16());
        if self.headers_after.is_none() {
            self.headers_after = Some(self.start.elapsed());
        }
        // A trailers-only gRPC answer has its status in the headers.
        self.grpc = grpc_status(resp.headers());
        resp.map(|inner| {
            http_body_util::BodyExt::boxed_unsync(Observed {
                inner,
                exchange: self,
            })
        })
    }

    fn bytes_received(&self) -> u64 {
        self.request_body
            .as_ref()
            .map_or(0, |b| b.bytes.load(Ordering::Relaxed))
    }

    fn record(&mut self) {
        if !self.on() {
            return;
        }
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        let status = match self.flags {
            // No response reached the client from upstream: counted as an error.
            "UF" | "UC" => None,
            _ => self.status,
        };
        let latency = self.headers_after.unwrap_or_else(|| self.start.elapsed());
        if let Some(backend) = &self.backend {
            let edge = backend.edge(metrics, &self.peer);
            edge.count(metrics, status, self.grpc);
            edge.latency.observe(latency);
            edge.request_bytes.inc_by(self.bytes_received());
            edge.response_bytes.inc_by(self.response_bytes);
        }
        if let Some(mut span) = self.span.take() {
            if let Some(s) = self.status {
                span.set_attribute(KeyValue::new("http.response.status_code", i64::from(s)));
            }
            if let Some(g) = self.grpc {
                span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(g)));
            }
            let (src, dst) = self.direction.ends(&metrics.me, &self.peer);
            span.set_attributes([
                KeyValue::new("mesh.source.workload", src.workload.clone()),
                KeyValue::new("mesh.destination.workload", dst.workload.clone()),
                KeyValue::new("mesh.response_flags", self.flags),
            ]);
            if status.is_none_or(|s| s >= 500) {
                span.set_status(Status::error(self.flags));
            }
            span.end();
        }
        if let (Some(mut l), Some(out)) = (self.log.take(), &shared.access_log) {
            let (src, dst) = self.direction.ends(&metrics.me, &self.peer);
            l.response_code = self.status.unwrap_or(0);
            l.response_flags = self.flags.to_string();
            l.grpc_status = self.grpc;
            l.bytes_received = self.bytes_received();
            l.bytes_sent = self.response_bytes;
            l.duration = self.start.elapsed().as_millis() as u64;
            l.upstream_service_time = self
                .backend
                .as_ref()
                .and(self.headers_after)
                .map(|d| d.as_millis() as u64);
            l.source_workload = src.workload.clone();
            l.source_namespace = src.namespace.clone();
            l.source_principal = src.identity.clone();
            l.destination_workload = dst.workload.clone();
            l.destination_namespace = dst.namespace.clone();
            l.destination_principal = dst.identity.clone();
            out.log(*l);
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.record();
    }
}

fn grpc_status(h: &HeaderMap) -> Option<u8> {
    h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

pin_project_lite::pin_project! {
    /// A response body that counts its bytes and reads a gRPC status from its trailers; its
    /// exchange is recorded when it is dropped.
    struct Observed<B> {
        #[pin]
        inner: B,
        exchange: Exchange,
    }
}

impl<B: http_body::Body<Data = Bytes, Error = BoxError>> http_body::Body for Observed<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.exchange.response_bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref()
                    && let Some(g) = grpc_status(t)
                {
                    this.exchange.grpc = Some(g);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                // The response broke off after its headers.
                this.exchange.flags = "UC";
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a request's body did: the bytes it carried, and whether it failed.
#[derive(Debug, Default)]
pub struct BodyTally {
    bytes: AtomicU64,
    failed: AtomicBool,
}

pin_project_lite::pin_project! {
    /// A request body that counts its bytes, and notes when it fails.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        tally: Arc<BodyTally>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, tally: Arc<BodyTally>) -> Self {
        Counted { inner, tally }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.tally
                        .bytes
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(_))) => this.tally.failed.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{BackendSlot, Metrics};
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn counted_when_the_body_ends_with_the_grpc_status_of_its_trailers() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let metrics = Arc::new(Metrics::for_peer(Peer::new("shop", "client", None)));
        let shared = Arc::new(Shared::new(
            Arc::new(crate::Config::local(any, "shop/client-0")),
            Arc::default(),
            metrics.clone(),
        ));
        let slot = BackendSlot::default();
        let mut req = Request::new(());
        let mut ex = Exchange::start(&shared, Direction::outbound, Peer::unknown(), &mut req, any);
        ex.backend = Some(
            slot.get(Direction::outbound, "grpc", "outbound|50051||greeter")
                .clone(),
        );
        ex.peer = Arc::new(Peer::new("shop", "greeter", None));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("14"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let resp = ex.respond(Response::new(body.boxed_unsync()));
        let series = |m: &Metrics| mesh_api::prom::parse(&m.encode());
        assert!(
            !series(&metrics)
                .iter()
                .any(|s| s.name == "mesh_proxy_requests_total"),
            "nothing is counted before the response ends"
        );
        let got = resp.into_body().collect().await.expect("body");
        assert_eq!(
            got.trailers().map(|t| t["grpc-status"].clone()),
            Some(HeaderValue::from_static("14"))
        );
        let samples = series(&metrics);
        let requests: Vec<_> = samples
            .iter()
            .filter(|s| s.name == "mesh_proxy_requests_total")
            .collect();
        assert_eq!(requests.len(), 1, "{samples:?}");
        assert_eq!(
            (
                requests[0].label("status_class"),
                requests[0].label("grpc_status")
            ),
            ("2xx", "14")
        );
        assert_eq!(requests[0].label("dst_workload"), "greeter");
        assert_eq!(requests[0].value, 1.0);
        let bytes = samples
            .iter()
            .find(|s| s.name == "mesh_proxy_response_bytes_total")
            .expect("response bytes");
        assert_eq!(bytes.value, 5.0);
    }

    #[test]
    fn the_caller_is_believed_only_when_its_identity_vouches() {
        let cache = CallerCache::default();
        let id = mesh_api::SpiffeId::workload("cluster.local", "shop", "client").expect("id");
        let mut h = HeaderMap::new();
        h.insert(SOURCE_WORKLOAD, HeaderValue::from_static("shop/client"));
        let p = caller(&mut h, Some(&id), false, &cache);
        assert_eq!(
            (p.namespace.as_str(), p.workload.as_str()),
            ("shop", "client")
        );
        assert!(h.is_empty(), "the header never reaches the app");
        // Another namespace than the certificate's: only the identity counts.
        h.insert(SOURCE_WORKLOAD, HeaderValue::from_static("bank/teller"));
        let p = caller(&mut h, Some(&id), false, &cache);
        assert_eq!(
            (p.namespace.as_str(), p.workload.as_str()),
            ("shop", "unknown")
        );
        // Plaintext from outside the mesh: nothing is believed.
        h.insert(SOURCE_WORKLOAD, HeaderValue::from_static("shop/client"));
        let p = caller(&mut h, None, false, &cache);
        assert_eq!(p.workload, "unknown");
        assert!(h.is_empty());
        // With identity off (benchmarks, plaintext meshes) the name is taken as given.
        h.insert(SOURCE_WORKLOAD, HeaderValue::from_static("shop/client"));
        assert_eq!(caller(&mut h, None, true, &cache).workload, "client");
    }
}
