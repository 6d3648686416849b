//! Connections to endpoints: a pool of idle HTTP/1.1 connections and one multiplexed HTTP/2
//! connection per endpoint, kept with the endpoint's balancing state so they outlive config
//! snapshots. A new connection takes a permit of the cluster's [`Breaker`] (its
//! `max_connections`) for its life; with none free, the request waits in the cluster's
//! queue of pending requests for a permit or an idle connection, or fails at once when the
//! queue is full. A connection that has carried `max_requests_per_connection` requests goes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::balance::Endpoint;
use crate::breaker::Breaker;
use crate::identity::{Alpn, MeshTls};

pub(crate) mod multiplex;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of these bytes.
pub fn full(b: Bytes) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with nothing in it.
pub fn empty() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 64;

/// Why there is no connection to an endpoint, as outlier detection and retries see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The endpoint refused it or left it unanswered (refused, reset, no route, timed out,
    /// the mesh TLS handshake unanswered): it ejects.
    Unreachable,
    /// Anything else on the endpoint's side (a mesh TLS handshake it failed): a failure.
    Failed,
    /// This proxy could not try (no valid certificate of its own, no TLS configuration, no
    /// file descriptor or local port left): the endpoint is not charged, and another endpoint
    /// would fare no better.
    Local,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection. `waited`: the failure of an attempt another request made while this
    /// one waited for it, which charged the endpoint once already.
    #[error("connecting to {addr}: {reason}")]
    Connect {
        addr: SocketAddr,
        reason: String,
        fault: Fault,
        waited: bool,
    },
    /// The request may have reached the endpoint: the connection or stream was reset.
    /// (Said with its causes: hyper's message alone is "connection error" whatever the
    /// reason, and the h2 codec's error may wrap an I/O error.)
    #[error("{}", Causes(.0.as_ref()))]
    Reset(BoxError),
    /// The cluster's connections and its queue of pending requests are full.
    #[error("upstream overflow: no connection free and too many requests waiting for one")]
    Overflow,
}

/// An error and its sources, as "error: source: source's source".
struct Causes<'a>(&'a (dyn std::error::Error + 'static));

/// `e`'s sources, nearest first.
fn sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(e.source(), |s| s.source())
}

/// `e`, then its sources.
fn and_sources<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::once(e).chain(sources(e))
}

impl std::fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        sources(self.0).try_for_each(|e| write!(f, ": {e}"))
    }
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }

    /// Whether the endpoint refused the stream (HTTP/2 `REFUSED_STREAM`), which says it
    /// processed nothing of the request, or no stream was opened for it: it is safe to send
    /// again, whatever its method.
    pub fn is_refused(&self) -> bool {
        let SendError::Reset(e) = self else {
            return false;
        };
        if e.is::<multiplex::Unopened>() {
            return true;
        }
        and_sources(e.as_ref())
            .find_map(|s| s.downcast_ref::<h2::Error>())
            .is_some_and(|h2| h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    }

    /// Why there was no connection, for a connect failure.
    pub fn fault(&self) -> Option<Fault> {
        match self {
            SendError::Connect { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    /// What the endpoint is charged with for this failure: nothing for an overflow, a local
    /// failure, or an attempt another request made (and was charged for).
    pub fn outcome(&self) -> Option<crate::balance::Outcome> {
        use crate::balance::Outcome;
        match self {
            SendError::Overflow => None,
            SendError::Connect { fault, waited, .. } => match fault {
                _ if *waited => None,
                Fault::Local => None,
                Fault::Unreachable => Some(Outcome::Unreachable),
                Fault::Failed => Some(Outcome::ConnectFailure),
            },
            SendError::Reset(_) => Some(Outcome::ConnectFailure),
        }
    }

    fn connect(addr: SocketAddr, reason: String, fault: Fault) -> Self {
        SendError::Connect {
            addr,
            reason,
            fault,
            waited: false,
        }
    }
}

/// A pooled connection's sender, how many requests it has carried, and the breaker whose
/// permit it holds (a connection of older limits is not reused under new ones).
type H1 = (http1::SendRequest<Body>, u32, Arc<Breaker>);

/// A multiplexed connection, and its breaker.
type H2 = (multiplex::Connection, Arc<Breaker>);

#[derive(Default)]
pub struct Pool {
    h1: Mutex<Vec<(H1, Instant)>>,
    /// The multiplexed connections: more than one only while load needs them, and at most one
    /// idle.
    h2: tokio::sync::Mutex<Vec<H2>>,
    /// Woken when an HTTP/1.1 connection comes back idle.
    returned: tokio::sync::Notify,
    /// The last attempt at a multiplexed connection, when it failed: when, why, and how.
    h2_failed: Mutex<Option<(Instant, String, Fault)>>,
}

impl Pool {
    /// Records how the last attempt at the multiplexed connection ended.
    fn h2_attempted<T>(&self, result: &Result<T, SendError>) {
        if let Ok(mut last) = self.h2_failed.lock() {
            *last = match result {
                Err(SendError::Connect { reason, fault, .. }) => {
                    Some((Instant::now(), reason.clone(), *fault))
                }
                _ => None,
            };
        }
    }

    /// The failure of an attempt at the multiplexed connection made since `since`, when the
    /// last attempt failed.
    fn h2_failed_since(&self, addr: SocketAddr, since: Instant) -> Option<SendError> {
        let last = self.h2_failed.lock().ok()?;
        let (at, reason, fault) = last.as_ref()?;
        (*at >= since).then(|| SendError::Connect {
            addr,
            reason: reason.clone(),
            fault: *fault,
            waited: true,
        })
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.h1.lock().map_or(0, |v| v.len());
        f.debug_struct("Pool").field("h1_idle", &idle).finish()
    }
}

impl Pool {
    fn take_h1(&self, idle_timeout: Duration, breaker: &Arc<Breaker>) -> Option<H1> {
        let mut idle = self.h1.lock().ok()?;
        while let Some(((tx, used, b), since)) = idle.pop() {
            if tx.is_ready()
                && Arc::ptr_eq(&b, breaker)
                && (idle_timeout.is_zero() || since.elapsed() < idle_timeout)
            {
                return Some((tx, used, b));
            }
        }
        None
    }

    /// Drops every pooled connection (they close when their last user is done).
    pub(crate) fn clear(&self) {
        if let Ok(mut idle) = self.h1.lock() {
            idle.clear();
        }
        if let Ok(mut h2) = self.h2.try_lock() {
            h2.clear();
        }
    }

    fn put_h1(&self, tx: H1) {
        if let Ok(mut idle) = self.h1.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push((tx, Instant::now()));
        }
        self.returned.notify_one();
    }
}

/// Who a failed `connect(2)` is down to.
fn fault_of(e: &std::io::Error) -> Fault {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::TimedOut
        | K::HostUnreachable
        | K::NetworkUnreachable => Fault::Unreachable,
        // Out of local ports or file descriptors.
        K::AddrNotAvailable | K::AddrInUse => Fault::Local,
        _ if matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS)
        ) =>
        {
            Fault::Local
        }
        _ => Fault::Failed,
    }
}

/// Opens a TCP connection by `deadline`.
pub async fn connect(addr: SocketAddr, deadline: Instant) -> Result<TcpStream, SendError> {
    let stream = match tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(SendError::connect(
                addr,
                "timed out".into(),
                Fault::Unreachable,
            ));
        }
        Ok(Err(e)) => return Err(SendError::connect(addr, e.to_string(), fault_of(&e))),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A connection to an endpoint: plaintext, or mesh TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Connects to `ep`: mesh TLS when it has a mesh identity and this proxy holds one (the
/// server's SVID must be that identity), else plaintext.
pub async fn connect_endpoint(
    ep: &Endpoint,
    tls: Option<&Arc<MeshTls>>,
    alpn: Alpn,
    timeout: Duration,
) -> Result<Conn, SendError> {
    // One deadline for the TCP connection and the mesh TLS handshake, as Envoy's
    // `connect_timeout` bounds both.
    let deadline = Instant::now() + timeout;
    let stream = connect(ep.addr, deadline).await?;
    let (Some(tls), Some(id)) = (tls, ep.identity.as_ref()) else {
        return Ok(Conn::Plain(stream));
    };
    let Some(connector) = tls.connector(id, alpn) else {
        return Err(SendError::connect(
            ep.addr,
            "no TLS client config".into(),
            Fault::Local,
        ));
    };
    let name = rustls::pki_types::ServerName::IpAddress(ep.addr.ip().into());
    // Boxed: a TLS client connection inline would make every future that opens a connection
    // (a request's try, a relayed connection's task) that much larger.
    let handshake = Box::pin(connector.connect(name, stream));
    match tokio::time::timeout_at(deadline.into(), handshake).await {
        Ok(Ok(s)) => {
            tls.handshake_done(crate::metrics::Direction::outbound, true);
            Ok(Conn::Tls(Box::new(s)))
        }
        Ok(Err(e)) => {
            tls.handshake_done(crate::metrics::Direction::outbound, false);
            // An endpoint that closes the handshake is as good as unanswered; one that
            // presents the wrong certificate (or one this proxy cannot check) is a failure.
            // (tokio-rustls: a TLS error is InvalidData; the peer hanging up is
            // UnexpectedEof; a client connection that could not be set up is Other.)
            use std::io::ErrorKind as K;
            let fault = match e.kind() {
                K::InvalidData => Fault::Failed,
                K::UnexpectedEof | K::WriteZero | K::BrokenPipe => Fault::Unreachable,
                K::Other => Fault::Local,
                _ => fault_of(&e),
            };
            Err(SendError::connect(ep.addr, format!("mesh TLS: {e}"), fault))
        }
        Err(_) => {
            tls.handshake_done(crate::metrics::Direction::outbound, false);
            Err(SendError::connect(
                ep.addr,
                format!(
                    "mesh TLS handshake not done {}ms after the connection began",
                    timeout.as_millis()
                ),
                Fault::Unreachable,
            ))
        }
    }
}

/// Settings for one request to an endpoint.
#[derive(Clone, Debug)]
pub struct Target {
    pub h2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// This proxy's mesh TLS, when it has an identity.
    pub tls: Option<Arc<MeshTls>>,
    /// The cluster's connection limits.
    pub breaker: Arc<Breaker>,
    /// The cluster's endpoints, whose idle connections a request waiting for a connection
    /// closes (they hold permits nobody uses).
    pub peers: Arc<crate::balance::EndpointSet>,
}

impl Target {
    /// A request to an endpoint of `cluster`, over HTTP/2 when `h2`.
    pub fn new(shared: &super::Shared, cluster: &crate::state::Cluster, h2: bool) -> Self {
        Target {
            h2,
            connect_timeout: cluster.connect_timeout,
            idle_timeout: shared.config.idle_timeout,
            tls: shared.tls.clone(),
            breaker: cluster.breaker.clone(),
            peers: cluster.endpoints.clone(),
        }
    }

    fn max_requests(&self) -> Option<u32> {
        self.breaker.limits.max_requests_per_connection
    }

    fn close_idle_except(&self, ep: &Arc<Endpoint>) {
        for e in self.peers.endpoints() {
            if !Arc::ptr_eq(e, ep) {
                e.pool.clear();
            }
        }
    }

    /// Joins the queue for a connection permit: idle connections elsewhere in the cluster are
    /// closed to free theirs; a full queue is an overflow.
    fn wait_in_line(&self, ep: &Arc<Endpoint>) -> Result<crate::breaker::Pending, SendError> {
        let line = self.breaker.wait_in_line().ok_or(SendError::Overflow)?;
        self.close_idle_except(ep);
        Ok(line)
    }
}

/// Sends a request to an endpoint over a pooled connection, or a new one. The request is
/// taken from `req` only as it is sent: one that no connection took (none could be had, or
/// the future was dropped first) is still there, for the caller's next try.
pub async fn send(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    req: &mut Option<Request<Body>>,
) -> Result<Response<UpstreamBody>, SendError> {
    // Fail closed: without a valid SVID of its own the proxy sends no mesh traffic, not even
    // on connections opened while it had one.
    if let (Some(tls), Some(_)) = (&target.tls, &ep.identity)
        && !tls.identity.has_valid_svid()
    {
        ep.pool.clear();
        return Err(SendError::connect(
            ep.addr,
            "this proxy holds no valid certificate: mesh TLS refused".into(),
            Fault::Local,
        ));
    }
    if target.h2 {
        let resp = send_h2(ep, target, req).await?;
        Ok(resp.map(|b| UpstreamBody {
            inner: Inner::H2(b),
            release: None,
        }))
    } else {
        send_h1(ep, target, req).await
    }
}

/// A response body from an endpoint. An HTTP/1.1 connection goes back to the pool when its
/// response body ends; a body dropped before its end takes the connection with it.
pub struct UpstreamBody {
    inner: Inner,
    release: Option<(std::sync::Arc<Endpoint>, H1)>,
}

enum Inner {
    H1(Incoming),
    H2(multiplex::RecvBody),
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        use http_body::Body as _;
        // A reader that stopped at the declared length never asked for the end.
        if self.is_end_stream()
            && let Some((ep, tx)) = self.release.take()
        {
            release_h1(&ep, tx);
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::H2(b) => Pin::new(b).poll_frame(cx),
            Inner::H1(b) => {
                let polled = Pin::new(&mut *b).poll_frame(cx);
                let done = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => b.is_end_stream(),
                    _ => false,
                };
                if done && let Some((ep, tx)) = this.release.take() {
                    release_h1(&ep, tx);
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

/// A response whose body is already complete (none, or read in full) frees its connection.
fn pooled(
    ep: &std::sync::Arc<Endpoint>,
    tx: H1,
    resp: Response<Incoming>,
) -> Response<UpstreamBody> {
    use http_body::Body as _;
    let release = if resp.body().is_end_stream() {
        release_h1(ep, tx);
        None
    } else {
        Some((ep.clone(), tx))
    };
    resp.map(|b| UpstreamBody {
        inner: Inner::H1(b),
        release,
    })
}

/// `req`'s request, taken to be sent now.
fn take(req: &mut Option<Request<Body>>, addr: SocketAddr) -> Result<Request<Body>, SendError> {
    req.take()
        .ok_or_else(|| SendError::connect(addr, "no request left to send".into(), Fault::Local))
}

async fn send_h1(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    req: &mut Option<Request<Body>>,
) -> Result<Response<UpstreamBody>, SendError> {
    let mut in_line = None;
    // A request waits for a connection no longer than one takes to open.
    let deadline = tokio::time::Instant::now() + target.connect_timeout;
    let permit = loop {
        // A pooled connection the endpoint closed meanwhile gives the request back unsent;
        // then it goes on another, or a fresh one.
        while let Some((mut tx, used, b)) = ep.pool.take_h1(target.idle_timeout, &target.breaker) {
            match tx.try_send_request(take(req, ep.addr)?).await {
                Ok(resp) => return Ok(pooled(ep, (tx, used + 1, b), resp)),
                Err(mut e) => match e.take_message() {
                    Some(r) => *req = Some(r),
                    None => return Err(SendError::Reset(e.into_error().into())),
                },
            }
        }
        match target.breaker.connection() {
            Ok(permit) => break permit,
            Err(_) => {
                if in_line.is_none() {
                    in_line = Some(target.wait_in_line(ep)?);
                }
                tokio::select! {
                    permit = target.breaker.connection_freed() => break permit,
                    () = ep.pool.returned.notified() => {}
                    () = tokio::time::sleep_until(deadline) => return Err(SendError::Overflow),
                }
            }
        }
    };
    drop(in_line);
    // Boxed: opening a connection is the rare case, and its future (a TLS handshake's) would
    // otherwise make every request's future that much bigger, and slower to move.
    let mut tx = Box::pin(open_h1(ep, &target, permit)).await?;
    let resp = tx
        .send_request(take(req, ep.addr)?)
        .await
        .map_err(|e| SendError::Reset(e.into()))?;
    Ok(pooled(ep, (tx, 1, target.breaker.clone()), resp))
}

/// How much an HTTP/1.1 connection to an endpoint reads ahead at most.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// A new HTTP/1.1 connection to `ep`, run by a task of its own that holds `permit`.
async fn open_h1(
    ep: &Endpoint,
    target: &Target,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<http1::SendRequest<Body>, SendError> {
    let stream =
        connect_endpoint(ep, target.tls.as_ref(), Alpn::Http1, target.connect_timeout).await?;
    // A response its client does not read waits in the app's socket, not here: hyper would
    // read up to 400 KiB of it ahead; 64 KiB also bounds a response's headers, as the
    // listeners bound a request's by default.
    let (tx, conn) = http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| SendError::Reset(e.into()))?;
    drive(ep.addr, permit, conn.with_upgrades());
    Ok(tx)
}

/// Runs a connection to its end; it holds its breaker permit, if any, while it lives.
fn drive<F>(addr: SocketAddr, permit: Option<tokio::sync::OwnedSemaphorePermit>, conn: F)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.await {
            debug!(endpoint = %addr, error = %e, "upstream connection ended");
        }
    });
}

/// A connection that has carried its `max_requests_per_connection` is dropped instead, which
/// closes it; so is one that requests wait for while the cluster is at `max_connections`,
/// so that its permit goes to them (whichever endpoint they picked).
fn release_h1(ep: &std::sync::Arc<Endpoint>, (mut tx, used, breaker): H1) {
    if breaker
        .limits
        .max_requests_per_connection
        .is_some_and(|m| used >= m)
        || breaker.pending() > 0
    {
        return;
    }
    if tx.is_ready() {
        ep.pool.put_h1((tx, used, breaker));
        return;
    }
    let ep = ep.clone();
    tokio::spawn(async move {
        if tx.ready().await.is_ok() {
            ep.pool.put_h1((tx, used, breaker));
        }
    });
}

async fn send_h2(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    req: &mut Option<Request<Body>>,
) -> Result<Response<multiplex::RecvBody>, SendError> {
    // A connection that turns out closed or gone away leaves the request unsent: it goes
    // on a new one, once (the endpoint may be shutting down: its next one fails to open).
    let mut closed = None;
    for _ in 0..2 {
        match h2_connection(ep, &target).await?.send(req, ep.addr).await? {
            multiplex::Sent::Response(resp) => return Ok(resp),
            multiplex::Sent::Closed(e) => closed = Some(e),
        }
    }
    // Twice: nothing was sent, as when no connection could be had; a failure (not an
    // unreachable endpoint, which would be ejected at once: this one answers, going away).
    let reason = closed.map_or_else(String::new, |e| e.to_string());
    Err(SendError::connect(
        ep.addr,
        format!("HTTP/2 connection gone away: {reason}"),
        Fault::Failed,
    ))
}

/// A multiplexed connection to the endpoint for one request, with a stream reserved on it:
/// the busiest of the endpoint's connections that has a stream to spare (so that load packs
/// into as few as it needs, and the others drain), or a new one when none has. When the
/// cluster's breaker allows no new connection, or opening one fails, the least busy there is,
/// where the request waits for a stream, as it did on the one connection there used to be.
/// Connections that ended, were told to go away, took their last request or hold an older
/// breaker's permit leave the pool, as does every idle one but one; each closes once its
/// streams end.
async fn h2_connection(
    ep: &std::sync::Arc<Endpoint>,
    target: &Target,
) -> Result<multiplex::Connection, SendError> {
    let max = target.max_requests();
    let prune = |conns: &mut Vec<H2>| {
        conns.retain_mut(|(c, b)| c.open_for(max) && Arc::ptr_eq(b, &target.breaker));
        let mut idle = 0;
        conns.retain(|(c, _)| {
            idle += usize::from(c.streams() == 0);
            c.streams() > 0 || idle == 1
        });
    };
    let spare = |conns: &[H2]| {
        conns
            .iter()
            .filter(|(c, _)| c.has_spare_stream())
            .max_by_key(|(c, _)| c.streams())
            .map(|(c, _)| c.reserve())
    };
    let least_busy = |conns: &[H2]| {
        conns
            .iter()
            .min_by_key(|(c, _)| c.streams())
            .map(|(c, _)| c.reserve())
    };
    let asked = Instant::now();
    {
        let mut conns = ep.pool.h2.lock().await;
        prune(&mut conns);
        if let Some(conn) = spare(&conns) {
            return Ok(conn);
        }
    }
    // A permit first, without holding the pool: others may reuse it meanwhile.
    let permit = match target.breaker.connection() {
        Ok(p) => p,
        Err(_) => {
            // No new connection: a stream on one there is, when it frees.
            let mut conns = ep.pool.h2.lock().await;
            prune(&mut conns);
            if let Some(conn) = least_busy(&conns) {
                return Ok(conn);
            }
            drop(conns);
            let _in_line = target.wait_in_line(ep)?;
            tokio::time::timeout(target.connect_timeout, target.breaker.connection_freed())
                .await
                .map_err(|_| SendError::Overflow)?
        }
    };
    let mut conns = ep.pool.h2.lock().await;
    prune(&mut conns);
    // Another request opened one meanwhile: the permit goes back.
    if let Some(conn) = spare(&conns) {
        return Ok(conn);
    }
    // An attempt that failed while this request waited for the pool answers it too: trying
    // again in turn would keep each waiting request a connect timeout longer than the one
    // before it.
    if let Some(e) = ep.pool.h2_failed_since(ep.addr, asked) {
        return least_busy(&conns).ok_or(e);
    }
    // Boxed, as for HTTP/1.1: the rare case, and a big future.
    match Box::pin(open_h2(ep, target, permit)).await {
        Ok(conn) => {
            let reserved = conn.reserve();
            conns.push((conn, target.breaker.clone()));
            Ok(reserved)
        }
        // The endpoint answers on the connections it has: a request waits there.
        Err(e) => least_busy(&conns).ok_or(e),
    }
}

/// A new HTTP/2 connection to `ep`, run by a task of its own that holds `permit`.
async fn open_h2(
    ep: &Endpoint,
    target: &Target,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<multiplex::Connection, SendError> {
    let stream = connect_endpoint(ep, target.tls.as_ref(), Alpn::H2, target.connect_timeout).await;
    ep.pool.h2_attempted(&stream);
    multiplex::Connection::handshake(stream?, ep.addr, permit)
        .await
        .map_err(|e| SendError::Reset(e.into()))
}

#[cfg(test)]
mod tests {
    use super::{Causes, SendError, empty};
    use std::sync::Arc;
    use std::time::Duration;

    /// Far longer than any exchange here takes: a test that waits this long failed.
    pub(super) const TEST_TIMEOUT: Duration = Duration::from_secs(30);

    /// An endpoint address for connections made without it (over a `duplex`).
    pub(super) fn addr() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1))
    }

    /// The error of a request whose stream an HTTP/2 server resets with `reason` before
    /// answering.
    async fn reset_with(reason: h2::Reason) -> SendError {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server)
                .await
                .expect("h2 server handshake");
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                respond.send_reset(reason);
            }
        });
        let addr = addr();
        let conn = super::multiplex::Connection::handshake(client, addr, None)
            .await
            .expect("h2 client handshake");
        let req = http::Request::builder()
            .uri("http://app/")
            .body(empty())
            .expect("request");
        tokio::time::timeout(TEST_TIMEOUT, conn.send(&mut Some(req), addr))
            .await
            .expect("answered in time")
            .expect_err("reset")
    }

    /// The one endpoint at `addr`, and a target of its cluster (over HTTP/2 when `h2`).
    fn endpoint_at(
        addr: std::net::SocketAddr,
    ) -> (
        Arc<crate::balance::Endpoint>,
        impl Fn(bool) -> super::Target,
    ) {
        use crate::balance::{Balancer, EndpointSet, OutlierConfig};
        use crate::state::{ClusterLimits, EndpointDef};
        let peers = Arc::new(EndpointSet::new(
            &[EndpointDef::plain(addr)],
            OutlierConfig::default(),
            Balancer::PeakEwma,
            Default::default(),
        ));
        let ep = peers.endpoints()[0].clone();
        let breaker = Arc::new(crate::breaker::Breaker::new(ClusterLimits::default()));
        let target = move |h2| super::Target {
            h2,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            tls: None,
            breaker: breaker.clone(),
            peers: peers.clone(),
        };
        (ep, target)
    }

    pub(super) fn get() -> http::Request<super::Body> {
        http::Request::builder()
            .uri("http://app/")
            .header("x-app", "1")
            .body(empty())
            .expect("request")
    }

    #[tokio::test]
    async fn a_request_no_connection_took_stays_with_the_caller() {
        // A port nothing listens on: every connection is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let (ep, target) = endpoint_at(addr);
        for h2 in [false, true] {
            let mut req = Some(get());
            let e = super::send(&ep, target(h2), &mut req)
                .await
                .expect_err("nothing listens");
            assert!(e.is_connect(), "{e}");
            let back = req.expect("the request is still the caller's");
            assert_eq!(back.headers()["x-app"], "1", "h2: {h2}");
        }
    }

    #[tokio::test]
    async fn a_connection_whose_streams_are_all_taken_makes_room_on_another() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        // Each connection takes one stream at a time, and answers with a body it never ends,
        // as an app streaming to a client that does not read.
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_concurrent_streams(1)
                        .handshake::<_, bytes::Bytes>(io)
                        .await
                        .expect("handshake");
                    let mut open = Vec::new();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let body = respond
                            .send_response(http::Response::new(()), false)
                            .expect("response");
                        open.push(body);
                    }
                });
            }
        });
        let (ep, target) = endpoint_at(addr);
        let (mut one, mut two) = (Some(get()), Some(get()));
        let first = tokio::time::timeout(TEST_TIMEOUT, super::send(&ep, target(true), &mut one))
            .await
            .expect("first: in time")
            .expect("the first request is answered");
        let second = tokio::time::timeout(TEST_TIMEOUT, super::send(&ep, target(true), &mut two))
            .await
            .expect("the second request does not wait behind the first's stream")
            .expect("the second request is answered");
        assert_eq!(second.status(), http::StatusCode::OK);
        assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 2);
        drop(first);
    }

    #[tokio::test]
    async fn a_request_finding_its_connection_gone_away_goes_on_a_new_one() {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // The first connection answers its request after a GOAWAY (h2 writes it first),
            // and ends the answer's body only once the second request has been answered.
            let (io, _) = listener.accept().await.expect("accept");
            let mut first = h2::server::handshake(io).await.expect("handshake");
            let (_, mut respond) = first.accept().await.expect("a stream").expect("a request");
            first.graceful_shutdown();
            let mut body = respond
                .send_response(http::Response::new(()), false)
                .expect("response");
            let first = tokio::spawn(async move { while first.accept().await.is_some() {} });
            let (io, _) = listener.accept().await.expect("a second connection");
            let mut second = h2::server::handshake(io).await.expect("handshake");
            let (_, mut respond) = second.accept().await.expect("a stream").expect("a request");
            respond
                .send_response(http::Response::new(()), true)
                .expect("response");
            tokio::spawn(async move { while second.accept().await.is_some() {} });
            let _ = finished.await;
            body.send_data(bytes::Bytes::from_static(b"done"), true)
                .expect("body");
            let _ = first.await;
        });
        let (ep, target) = endpoint_at(addr);
        let (mut one, mut two) = (Some(get()), Some(get()));
        let first = super::send(&ep, target(true), &mut one);
        let a = tokio::time::timeout(TEST_TIMEOUT, first)
            .await
            .expect("first: in time")
            .expect("the first request is answered");
        let second = super::send(&ep, target(true), &mut two);
        let b = tokio::time::timeout(TEST_TIMEOUT, second)
            .await
            .expect("second: in time")
            .expect("the second request is answered, on a new connection");
        assert_eq!(b.status(), http::StatusCode::OK);
        let _ = finish.send(());
        let body = tokio::time::timeout(TEST_TIMEOUT, a.into_body().collect())
            .await
            .expect("first body: in time")
            .expect("first body")
            .to_bytes();
        assert_eq!(
            body, "done",
            "the first request's answer ends after the GOAWAY"
        );
        server.await.expect("server");
    }

    #[tokio::test]
    async fn only_a_refused_stream_is_refused() {
        let refused = reset_with(h2::Reason::REFUSED_STREAM).await;
        assert!(refused.is_refused(), "{refused}");
        for reason in [h2::Reason::CANCEL, h2::Reason::INTERNAL_ERROR] {
            let other = reset_with(reason).await;
            assert!(!other.is_refused(), "{other}");
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn an_error_is_said_with_its_causes() {
        let e = Outer(std::io::Error::other("GOAWAY: ENHANCE_YOUR_CALM"));
        assert_eq!(Causes(&e).to_string(), "outer: GOAWAY: ENHANCE_YOUR_CALM");
        let alone = std::io::Error::other("refused");
        assert_eq!(Causes(&alone).to_string(), "refused");
    }
}
