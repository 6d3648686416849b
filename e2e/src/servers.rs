//! Backends for proxy tests: an HTTP/1.1 + h2c echo server that can be told to fail or be
//! stopped and restarted on the same address, and small TCP servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An HTTP server (HTTP/1.1 and h2c) answering with its name, or echoing a request body.
/// Response headers tell what it saw: `x-backend`, `x-seen-version`, `x-seen-host`,
/// `x-seen-path`, `x-seen-xfcc` (the `x-forwarded-client-cert` it got, if any),
/// `x-seen-traceparent`, `x-seen-source-workload` (what arrived of those headers), and for
/// each request header named `x-echo-*`, `x-seen-x-echo-*` with its values joined by `,`.
#[derive(Debug)]
pub struct EchoServer {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    /// Answer 503 to the first request and every n-th after it (0: never).
    fail_every: Arc<AtomicU64>,
    /// Wait this many microseconds before answering.
    delay_us: Arc<AtomicU64>,
    /// The path of every request it got, in order.
    paths: Arc<std::sync::Mutex<Vec<String>>>,
    task: Option<JoinHandle<()>>,
    conns: Arc<tokio::sync::Mutex<tokio::task::JoinSet<()>>>,
}

impl EchoServer {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        Self::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> anyhow::Result<Self> {
        let mut s = Self {
            name: name.to_string(),
            addr,
            hits: Arc::default(),
            fail_every: Arc::default(),
            delay_us: Arc::default(),
            paths: Arc::default(),
            task: None,
            conns: Arc::default(),
        };
        s.listen(false).await?;
        Ok(s)
    }

    /// Listens on its address; `again`: on its own port once more, after [`EchoServer::stop`].
    async fn listen(&mut self, again: bool) -> anyhow::Result<()> {
        // Listening again on its own port: while it was down, the kernel may have given the
        // port to another process's outgoing connection (tests run beside each other), which
        // holds it until that connection ends.
        let wait = if again { 10 } else { 0 };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && self.addr.port() != 0
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => break other?,
            }
        };
        self.addr = listener.local_addr()?;
        let (name, hits, fail, delay) = (
            self.name.clone(),
            self.hits.clone(),
            self.fail_every.clone(),
            self.delay_us.clone(),
        );
        let paths = self.paths.clone();
        let conns = self.conns.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (name, hits, fail, delay) =
                    (name.clone(), hits.clone(), fail.clone(), delay.clone());
                let paths = paths.clone();
                conns.lock().await.spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
                        paths
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(req.uri().path().to_string());
                        let every = fail.load(Ordering::Relaxed);
                        let delay = std::time::Duration::from_micros(delay.load(Ordering::Relaxed));
                        let name = name.clone();
                        async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let version = format!("{:?}", req.version());
                            let host = req
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .or_else(|| {
                                    req.headers()
                                        .get("host")
                                        .and_then(|h| h.to_str().ok())
                                        .map(str::to_string)
                                })
                                .unwrap_or_default();
                            let path = req.uri().path().to_string();
                            let xfcc = req
                                .headers()
                                .get("x-forwarded-client-cert")
                                .and_then(|h| h.to_str().ok())
                                .unwrap_or_default()
                                .to_string();
                            let seen = |h: &str| {
                                req.headers()
                                    .get(h)
                                    .and_then(|h| h.to_str().ok())
                                    .unwrap_or_default()
                                    .to_string()
                            };
                            let traceparent = seen("traceparent");
                            let source = seen("x-mesh-source-workload");
                            let app = seen("x-app");
                            let mut echo: Vec<(String, String)> = Vec::new();
                            for name in req.headers().keys() {
                                if name.as_str().starts_with("x-echo-") {
                                    let values: Vec<&str> = req
                                        .headers()
                                        .get_all(name)
                                        .iter()
                                        .filter_map(|v| v.to_str().ok())
                                        .collect();
                                    echo.push((format!("x-seen-{name}"), values.join(",")));
                                }
                            }
                            let body = match req.into_body().collect().await {
                                Ok(b) => b.to_bytes(),
                                Err(e) => Bytes::from(format!("body error: {e}")),
                            };
                            let status = if every > 0 && (n - 1).is_multiple_of(every) {
                                503
                            } else {
                                200
                            };
                            let out = if body.is_empty() {
                                Bytes::from(name.clone())
                            } else {
                                body
                            };
                            let mut resp = hyper::Response::new(Full::new(out));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status)
                                .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                            let h = resp.headers_mut();
                            for (k, v) in [
                                ("x-backend", name),
                                ("x-seen-version", version),
                                ("x-seen-host", host),
                                ("x-seen-path", path),
                                ("x-seen-xfcc", xfcc),
                                ("x-seen-traceparent", traceparent),
                                ("x-seen-source-workload", source),
                                ("x-seen-app", app),
                            ] {
                                if let Ok(v) = hyper::header::HeaderValue::from_str(&v) {
                                    h.insert(k, v);
                                }
                            }
                            for (k, v) in echo {
                                if let (Ok(k), Ok(v)) = (
                                    hyper::header::HeaderName::from_bytes(k.as_bytes()),
                                    hyper::header::HeaderValue::from_str(&v),
                                ) {
                                    h.insert(k, v);
                                }
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
        Ok(())
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// The path of every request it got, in order.
    pub fn paths(&self) -> Vec<String> {
        self.paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Answer 503 to the first request and every `n`-th after it (0: never).
    pub fn fail_every(&self, n: u64) {
        self.fail_every.store(n, Ordering::Relaxed);
    }

    /// Answer only after `d`: a slower endpoint.
    pub fn set_delay(&self, d: std::time::Duration) {
        self.delay_us.store(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Stops listening and closes every open connection, returning once all are gone: the
    /// endpoint no longer answers anything.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let mut conns = self.conns.lock().await;
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        self.listen(true).await
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Ok(mut conns) = self.conns.try_lock() {
            conns.abort_all();
        }
    }
}

/// Accepts TCP connections on 127.0.0.1 and hands each to `handle` in its own task.
async fn tcp_server<F, Fut>(handle: F) -> anyhow::Result<(SocketAddr, JoinHandle<()>)>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(handle(s));
        }
    });
    Ok((addr, task))
}

/// A TCP server that reads until the client half-closes, then sends back what it read,
/// prefixed, and closes.
pub async fn tcp_echo_after_eof(
    prefix: &'static str,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    tcp_server(move |mut s| async move {
        let mut buf = Vec::new();
        if s.read_to_end(&mut buf).await.is_ok() {
            let _ = s.write_all(prefix.as_bytes()).await;
            let _ = s.write_all(&buf).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// A server-speaks-first TCP server (like MySQL or SMTP): greets each client at once, then
/// echoes what it gets.
pub async fn greeting_server(
    greeting: &'static str,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    tcp_server(move |mut s| async move {
        if s.write_all(greeting.as_bytes()).await.is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    })
    .await
}
