//! App probes on the health port. Injection points the kubelet's `httpGet`, `tcpSocket` and
//! `grpc` probes of the app at `/app-health/<container>/<livez|readyz|startupz>` on the proxy's
//! plaintext port (15020), because under STRICT mTLS the app's own port refuses the kubelet's
//! plaintext. The proxy runs the probe as written against the app, at the pod's IP as the
//! kubelet would, within the probe's `timeoutSeconds`, and answers:
//!
//! - **200** when the probe passes (an HTTP status from 200 to 399, an accepted connection, a
//!   `SERVING` health check);
//! - the app's own status when an HTTP probe gets 400 or above;
//! - **503** when the app cannot be reached, times out or is not serving, with the reason.
//!
//! A redirect counts as a pass: the proxy does not follow it, so the kubelet never sees it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use mesh_api::probes::{AppProbe, Check, Scheme};
use tokio::net::TcpStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The outcome of one probe: the status the kubelet gets, and what happened.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: StatusCode,
    pub detail: String,
}

impl Outcome {
    fn pass(detail: String) -> Self {
        Self {
            status: StatusCode::OK,
            detail,
        }
    }

    fn fail(detail: String) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            detail,
        }
    }
}

/// Runs `probe` against the app at `host`; `user_agent` is the kubelet's, passed on.
pub async fn run(probe: &AppProbe, host: IpAddr, user_agent: Option<&HeaderValue>) -> Outcome {
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds.max(1)));
    let checked = tokio::time::timeout(timeout, async {
        match &probe.check {
            Check::HttpGet {
                path,
                port,
                scheme,
                http_headers,
            } => {
                let addr = SocketAddr::new(host, *port);
                http_get(addr, *scheme, path, http_headers, user_agent).await
            }
            Check::TcpSocket { port } => {
                let addr = SocketAddr::new(host, *port);
                TcpStream::connect(addr)
                    .await
                    .map(|_| Outcome::pass(format!("{addr} accepted the connection")))
                    .map_err(|e| format!("connecting to {addr}: {e}"))
            }
            Check::Grpc { port, service } => grpc(SocketAddr::new(host, *port), service).await,
        }
    })
    .await;
    match checked {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(why)) => Outcome::fail(why),
        Err(_) => Outcome::fail(format!(
            "the app did not answer within the probe's {}s timeout",
            timeout.as_secs()
        )),
    }
}

async fn http_get(
    addr: SocketAddr,
    scheme: Scheme,
    path: &str,
    headers: &[mesh_api::probes::Header],
    user_agent: Option<&HeaderValue>,
) -> Result<Outcome, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let mut req = Request::get(path);
    // The kubelet's defaults, which the probe's own headers replace.
    req = req
        .header(header::HOST, addr.to_string())
        .header(header::ACCEPT, "*/*")
        .header(
            header::USER_AGENT,
            user_agent
                .cloned()
                .unwrap_or(HeaderValue::from_static("kube-probe/mesh-proxy")),
        );
    let mut req = req
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("the probe's path {path:?}: {e}"))?;
    for h in headers {
        let name = header::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|e| format!("header name {:?}: {e}", h.name))?;
        let value = HeaderValue::from_str(&h.value)
            .map_err(|e| format!("header {:?} value {:?}: {e}", h.name, h.value))?;
        req.headers_mut().insert(name, value);
    }
    let status = match scheme {
        Scheme::Http => send(hyper_util::rt::TokioIo::new(tcp), req).await?,
        Scheme::Https => {
            let tls = tokio_rustls::TlsConnector::from(insecure_client())
                .connect(rustls::pki_types::ServerName::from(addr.ip()), tcp)
                .await
                .map_err(|e| format!("TLS to {addr}: {e}"))?;
            send(hyper_util::rt::TokioIo::new(tls), req).await?
        }
    };
    let detail = format!("GET {path} on {addr}: {status}");
    if status.as_u16() < 400 {
        Ok(Outcome::pass(detail))
    } else {
        Ok(Outcome { status, detail })
    }
}

/// One HTTP/1.1 request on `io`; the status of its answer.
async fn send<T>(io: T, req: Request<Empty<bytes::Bytes>>) -> Result<StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP request: {e}"))?;
    let status = resp.status();
    // Read (and drop) the body so the app sees a complete exchange.
    let _ = resp.into_body().collect().await;
    Ok(status)
}

async fn grpc(addr: SocketAddr, service: &str) -> Result<Outcome, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("{addr}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|e| format!("grpc.health.v1.Health/Check on {addr}: {}", e.message()))?;
    let status = answer.into_inner().status();
    let detail = format!(
        "grpc.health.v1.Health/Check {service:?} on {addr}: {}",
        status.as_str_name()
    );
    Ok(if status == ServingStatus::Serving {
        Outcome::pass(detail)
    } else {
        Outcome::fail(detail)
    })
}

/// TLS that accepts the app's certificate unverified, as the kubelet's HTTPS probes do; the
/// handshake's signatures are still checked.
fn insecure_client() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(mesh_api::tls::AnyServerCert(provider.clone()));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| rustls::ClientConfig::builder())
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use axum::Router;
    use axum::routing::get;
    use mesh_api::probes::Header;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn probe(check: Check) -> AppProbe {
        AppProbe {
            check,
            timeout_seconds: 1,
        }
    }

    fn http(path: &str, port: u16) -> AppProbe {
        probe(Check::HttpGet {
            path: path.into(),
            port,
            scheme: Scheme::Http,
            http_headers: vec![Header {
                name: "X-Probe".into(),
                value: "yes".into(),
            }],
        })
    }

    /// An app with `/ok`, `/moved` (302), `/sick` (500), `/slow` (sleeps 3 s), and `/header`,
    /// which passes only with the probe's header and the kubelet's user agent.
    async fn app() -> u16 {
        let router = Router::new()
            .route("/ok", get(|| async { "ok" }))
            .route(
                "/moved",
                get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/elsewhere")]) }),
            )
            .route("/sick", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "late"
                }),
            )
            .route(
                "/header",
                get(|h: http::HeaderMap| async move {
                    let ok = h.get("x-probe").is_some_and(|v| v == "yes")
                        && h.get(header::USER_AGENT)
                            .is_some_and(|v| v == "kube-probe/1.34");
                    if ok {
                        StatusCode::OK
                    } else {
                        StatusCode::BAD_REQUEST
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind((LOCAL, 0))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        port
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_carry_the_apps_failure() {
        let port = app().await;
        let ua = HeaderValue::from_static("kube-probe/1.34");
        let status = |o: Outcome| o.status;
        assert_eq!(status(run(&http("/ok", port), LOCAL, None).await), 200);
        assert_eq!(status(run(&http("/moved", port), LOCAL, None).await), 200);
        assert_eq!(status(run(&http("/sick", port), LOCAL, None).await), 500);
        assert_eq!(
            status(run(&http("/header", port), LOCAL, Some(&ua)).await),
            200
        );
        assert_eq!(status(run(&http("/header", port), LOCAL, None).await), 400);
        let slow = run(&http("/slow", port), LOCAL, None).await;
        assert_eq!(slow.status, 503);
        assert!(
            slow.detail.contains("within the probe's 1s timeout"),
            "{slow:?}"
        );
    }

    #[tokio::test]
    async fn tcp_and_grpc_probes_pass_only_when_the_app_answers() {
        let port = app().await;
        let open = run(&probe(Check::TcpSocket { port }), LOCAL, None).await;
        assert_eq!(open.status, 200, "{open:?}");
        // A port nothing listens on: bind one, note it, close it.
        let closed = {
            let l = std::net::TcpListener::bind((LOCAL, 0)).expect("bind");
            l.local_addr().expect("addr").port()
        };
        let refused = run(&probe(Check::TcpSocket { port: closed }), LOCAL, None).await;
        assert_eq!(refused.status, 503);
        assert!(refused.detail.contains("connecting to"), "{refused:?}");

        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("shop.Cart", tonic_health::ServingStatus::NotServing)
            .await;
        let listener = tokio::net::TcpListener::bind((LOCAL, 0))
            .await
            .expect("bind");
        let grpc_port = listener.local_addr().expect("addr").port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream_of(listener)),
        );
        let check = |service: &str| {
            probe(Check::Grpc {
                port: grpc_port,
                service: service.into(),
            })
        };
        let serving = run(&check(""), LOCAL, None).await;
        assert_eq!(serving.status, 200, "{serving:?}");
        let not = run(&check("shop.Cart"), LOCAL, None).await;
        assert_eq!(not.status, 503);
        assert!(not.detail.contains("NOT_SERVING"), "{not:?}");
        let unknown = run(&check("shop.Nothing"), LOCAL, None).await;
        assert_eq!(unknown.status, 503, "{unknown:?}");
    }

    fn tokio_stream_of(
        listener: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<TcpStream>> {
        futures::stream::unfold(listener, |l| async move {
            let next = l.accept().await.map(|(s, _)| s);
            Some((next, l))
        })
    }
}
