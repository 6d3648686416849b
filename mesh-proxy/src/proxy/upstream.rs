//! Connections to endpoints: a pool of idle HTTP/1.1 connections and one multiplexed HTTP/2
//! connection per endpoint, kept with the endpoint's balancing state so they outlive config
//! snapshots.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use crate::balance::Endpoint;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The request may have reached the endpoint: the connection or stream was reset.
    #[error("{0}")]
    Reset(hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }
}

#[derive(Default)]
pub struct Pool {
    h1: Mutex<Vec<(http1::SendRequest<Body>, Instant)>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.h1.lock().map_or(0, |v| v.len());
        f.debug_struct("Pool").field("h1_idle", &idle).finish()
    }
}

impl Pool {
    fn take_h1(&self, idle_timeout: Duration) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.h1.lock().ok()?;
        while let Some((tx, since)) = idle.pop() {
            if tx.is_ready() && (idle_timeout.is_zero() || since.elapsed() < idle_timeout) {
                return Some(tx);
            }
        }
        None
    }

    fn put_h1(&self, tx: http1::SendRequest<Body>) {
        if let Ok(mut idle) = self.h1.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push((tx, Instant::now()));
        }
    }
}

/// Opens a TCP connection with a deadline.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(SendError::Connect {
                addr,
                reason: format!("timed out after {}ms", timeout.as_millis()),
            });
        }
        Ok(Err(e)) => {
            return Err(SendError::Connect {
                addr,
                reason: e.to_string(),
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Settings for one request to an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub h2: bool,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Sends a request to an endpoint over a pooled connection, or a new one.
pub async fn send(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendError> {
    if target.h2 {
        let resp = send_h2(ep, target, req).await?;
        Ok(resp.map(|b| UpstreamBody {
            inner: b,
            release: None,
        }))
    } else {
        send_h1(ep, target, req).await
    }
}

pin_project_lite::pin_project! {
    /// A response body from an endpoint. An HTTP/1.1 connection goes back to the pool when
    /// its response body ends; a body dropped before its end takes the connection with it.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        release: Option<(std::sync::Arc<Endpoint>, http1::SendRequest<Body>)>,
    }

    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            use http_body::Body as _;
            let this = this.project();
            // A reader that stopped at the declared length never asked for the end.
            if this.inner.is_end_stream()
                && let Some((ep, tx)) = this.release.take()
            {
                release_h1(&ep, tx);
            }
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
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let done = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if done && let Some((ep, tx)) = this.release.take() {
            release_h1(&ep, tx);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response whose body is already complete (none, or read in full) frees its connection.
fn pooled(
    ep: &std::sync::Arc<Endpoint>,
    tx: http1::SendRequest<Body>,
    resp: Response<Incoming>,
) -> Response<UpstreamBody> {
    use http_body::Body as _;
    if resp.body().is_end_stream() {
        release_h1(ep, tx);
        return resp.map(|b| UpstreamBody {
            inner: b,
            release: None,
        });
    }
    let ep = ep.clone();
    resp.map(|b| UpstreamBody {
        inner: b,
        release: Some((ep, tx)),
    })
}

async fn send_h1(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    mut req: Request<Body>,
) -> Result<Response<UpstreamBody>, SendError> {
    // A pooled connection the endpoint closed meanwhile gives the request back unsent; then
    // it goes on a fresh connection.
    while let Some(mut tx) = ep.pool.take_h1(target.idle_timeout) {
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(pooled(ep, tx, resp)),
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Err(SendError::Reset(e.into_error())),
            },
        }
    }
    let stream = connect(ep.addr, target.connect_timeout).await?;
    let (mut tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(SendError::Reset)?;
    let addr = ep.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(endpoint = %addr, error = %e, "upstream connection ended");
        }
    });
    let resp = tx.send_request(req).await.map_err(SendError::Reset)?;
    Ok(pooled(ep, tx, resp))
}

/// Returns a connection to the pool once it can take the next request (at once, usually, as
/// its response has ended).
fn release_h1(ep: &std::sync::Arc<Endpoint>, mut tx: http1::SendRequest<Body>) {
    if tx.is_ready() {
        ep.pool.put_h1(tx);
        return;
    }
    let ep = ep.clone();
    tokio::spawn(async move {
        if tx.ready().await.is_ok() {
            ep.pool.put_h1(tx);
        }
    });
}

async fn send_h2(
    ep: &std::sync::Arc<Endpoint>,
    target: Target,
    req: Request<Body>,
) -> Result<Response<Incoming>, SendError> {
    let mut tx = {
        let mut slot = ep.pool.h2.lock().await;
        match slot.as_ref() {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let stream = connect(ep.addr, target.connect_timeout).await?;
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(SendError::Reset)?;
                let addr = ep.addr;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                *slot = Some(tx.clone());
                tx
            }
        }
    };
    tx.ready().await.map_err(SendError::Reset)?;
    tx.send_request(req).await.map_err(SendError::Reset)
}
