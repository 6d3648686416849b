//! The demo's workload: an HTTP server (HTTP/1.1 and h2c) that answers with its name and
//! version, after a set latency, failing a set share of requests with 500. Failures are spread
//! evenly (request n fails when the running count of failures due rises), so a 10 % error rate
//! is 10 % over any window, not only on average. `/healthz` answers 200, or 503 while the file
//! `--unhealthy-while` names exists. With `--echo` the body is the request as it arrived (JSON),
//! as the Gateway API conformance suite's echo server answers, to see what routes and filters
//! did to it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoService {
    /// The service's name, in every answer.
    #[arg(long)]
    pub name: String,
    /// Its version, in every answer.
    #[arg(long, default_value = "v1")]
    pub version: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Wait this long before answering (`5ms`, `0`).
    #[arg(long, value_parser = mesh_api::duration::parse, default_value = "0ms")]
    pub latency: Duration,
    /// Share of requests answered 500, from 0 to 1.
    #[arg(long, value_parser = parse_rate, default_value = "0")]
    pub error_rate: f64,
    /// `/healthz` answers 503 while this file exists (to fail a pod's probes on purpose).
    #[arg(long, value_name = "FILE")]
    pub unhealthy_while: Option<std::path::PathBuf>,
    /// Answer with the request as it arrived (JSON: method, path with query, host, headers)
    /// instead of `<name> <version>`.
    #[arg(long)]
    pub echo: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        Ok(r) => Err(format!("--error-rate {r}: must be from 0 to 1")),
        Err(_) => Err(format!("--error-rate {s:?}: not a number from 0 to 1")),
    }
}

/// A running demo service; dropping it stops it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether request number `n` (from 0) fails at `rate`: failures due after n+1 requests
/// minus those due after n.
fn fails(n: u64, rate: f64) -> bool {
    let due = |k: u64| (k as f64 * rate).floor() as u64;
    due(n + 1) > due(n)
}

impl DemoService {
    pub async fn start(self) -> anyhow::Result<Running> {
        if self.name.is_empty() {
            bail!("--name is empty");
        }
        let listener = TcpListener::bind(self.listen).await.with_context(|| {
            format!(
                "--listen {}: cannot listen there; pass --listen with a free address (port 0 \
                     takes any)",
                self.listen
            )
        })?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let me = Arc::new(self);
        let count = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (me, count) = (me.clone(), count.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (me, count) = (me.clone(), count.clone());
                        async move { Ok::<_, std::convert::Infallible>(me.answer(&req, &count).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Running {
            addr,
            requests,
            task,
        })
    }

    async fn answer(
        &self,
        req: &hyper::Request<hyper::body::Incoming>,
        count: &AtomicU64,
    ) -> hyper::Response<Full<Bytes>> {
        let health = req.uri().path() == "/healthz";
        let failed = !health && fails(count.fetch_add(1, Ordering::Relaxed), self.error_rate);
        if !health && !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let unhealthy = health && self.unhealthy_while.as_ref().is_some_and(|f| f.exists());
        let (status, body, json) = if unhealthy {
            (
                503,
                format!("{} {} unhealthy\n", self.name, self.version),
                false,
            )
        } else if failed {
            (
                500,
                format!("{} {} failed\n", self.name, self.version),
                false,
            )
        } else if self.echo && !health {
            (200, echo(&self.name, &self.version, req), true)
        } else {
            (200, format!("{} {}\n", self.name, self.version), false)
        };
        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        if json {
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
        }
        for (k, v) in [
            ("x-demo-service", &self.name),
            ("x-demo-version", &self.version),
        ] {
            if let Ok(v) = hyper::header::HeaderValue::from_str(v) {
                resp.headers_mut().insert(k, v);
            }
        }
        resp
    }
}

/// The request as it arrived, as JSON: the service's name and version, the method, the path
/// with its query, the host (the h2 `:authority`, else `Host`) and every header's values.
fn echo(name: &str, version: &str, req: &hyper::Request<hyper::body::Incoming>) -> String {
    let mut headers = serde_json::Map::new();
    for k in req.headers().keys() {
        let values: Vec<String> = req
            .headers()
            .get_all(k)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(k.as_str().to_owned(), values.into());
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(hyper::header::HOST)?.to_str().ok())
        .unwrap_or_default();
    let body = serde_json::json!({
        "name": name,
        "version": version,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "headers": headers,
    });
    format!("{body}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `svc` started, and an HTTP/1.1 connection to it.
    async fn started(
        svc: DemoService,
    ) -> (
        Running,
        hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>,
    ) {
        let svc = svc.start().await.expect("starts");
        let tcp = tokio::net::TcpStream::connect(svc.addr)
            .await
            .expect("connect");
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        (svc, tx)
    }

    #[test]
    fn failures_are_spread_evenly_at_the_rate() {
        let failed = |rate: f64, n: u64| (0..n).filter(|i| fails(*i, rate)).count();
        assert_eq!(failed(0.0, 1000), 0);
        assert_eq!(failed(1.0, 1000), 1000);
        assert_eq!(failed(0.1, 1000), 100);
        // Any 10 consecutive requests hold exactly one failure at 10 %.
        for start in 0..50 {
            assert_eq!((start..start + 10).filter(|i| fails(*i, 0.1)).count(), 1);
        }
        assert!(
            parse_rate("1.5")
                .expect_err("over 1")
                .contains("from 0 to 1")
        );
        assert!(parse_rate("x").is_err());
    }

    #[tokio::test]
    async fn answers_with_name_and_version_and_fails_its_share() {
        use http_body_util::BodyExt;
        let (svc, mut tx) = started(DemoService {
            name: "reviews".into(),
            version: "v3".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            latency: Duration::from_millis(2),
            error_rate: 0.25,
            unhealthy_while: None,
            echo: false,
        })
        .await;
        let mut statuses = Vec::new();
        for path in ["/", "/", "/", "/", "/healthz"] {
            let req = hyper::Request::get(path)
                .header("host", "reviews")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            let resp = tx.send_request(req).await.expect("response");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert!(String::from_utf8_lossy(&body).starts_with("reviews v3"));
            statuses.push(status);
        }
        assert_eq!(statuses, [200, 200, 200, 500, 200]);
        assert_eq!(svc.requests.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn echo_answers_with_the_request_as_it_arrived() {
        use http_body_util::BodyExt;
        let (svc, mut tx) = started(DemoService {
            name: "echo".into(),
            version: "v1".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            latency: Duration::ZERO,
            error_rate: 0.0,
            unhealthy_while: None,
            echo: true,
        })
        .await;
        let req = hyper::Request::post("/a/b?x=1")
            .header("host", "shop.example.com")
            .header("x-twice", "one")
            .header("x-twice", "two")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["x-demo-service"], "echo");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(seen["name"], "echo");
        assert_eq!(seen["version"], "v1");
        assert_eq!(seen["method"], "POST");
        assert_eq!(seen["path"], "/a/b?x=1");
        assert_eq!(seen["host"], "shop.example.com");
        assert_eq!(
            seen["headers"]["x-twice"],
            serde_json::json!(["one", "two"])
        );
        // Over h2c the host is the `:authority`; `/healthz` stays a health check.
        let tcp = tokio::net::TcpStream::connect(svc.addr)
            .await
            .expect("connect");
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        for (path, want) in [
            ("/x", "\"host\":\"h2.example.com:8080\""),
            ("/healthz", "echo v1\n"),
        ] {
            let req = hyper::Request::get(format!("http://h2.example.com:8080{path}"))
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request");
            let resp = tx.send_request(req).await.expect("response");
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains(want), "{path}: {body}");
        }
    }
}
