//! Running the CA: its settings, the TLS certificate service, the admin server, and the
//! watch on the CA directory that picks up a new signing key or a changed trust bundle.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use mesh_api::ca_proto::certificate_service_server::CertificateServiceServer;
use mesh_api::consts::{env, ports};
use mesh_api::spiffe::DEFAULT_TRUST_DOMAIN;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::auth::{Authenticator, DEFAULT_AUDIENCE, LocalTokens, TokenReviewer};
use crate::authority::{Authority, CaError};
use crate::service::{Ca, CaService};

/// A duration (`90s`, `15m`, `24h`, see [`mesh_api::duration::parse`]) above zero.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = mesh_api::duration::parse(s)?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

#[derive(Clone, Debug, clap::Args)]
pub struct CaConfig {
    /// Directory with the signing certificate and key (`ca.crt`, `ca.key`, created on first
    /// start), optional extra roots (`trust-bundle.pem`) and the local token key.
    #[arg(long, env = env::CA_DIR)]
    pub dir: PathBuf,

    /// Trust domain of every SPIFFE ID this CA signs.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Address of the certificate service (gRPC over TLS).
    #[arg(long, env = env::CA_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::CA)))]
    pub addr: SocketAddr,

    /// Address of the metrics and readiness server.
    #[arg(long, env = env::CA_ADMIN_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::CA_ADMIN)))]
    pub admin_addr: SocketAddr,

    /// Lifetime of a certificate whose request names none.
    #[arg(long, default_value = "24h", value_parser = parse_secs)]
    pub default_lifetime: Duration,

    /// No certificate lives longer than this, whatever its request asks.
    #[arg(long, default_value = "24h", value_parser = parse_secs)]
    pub max_lifetime: Duration,

    /// Accept tokens the local mesh issued (`mesh-ca token`).
    #[arg(long)]
    pub local_tokens: bool,

    /// Check Kubernetes service-account tokens with TokenReview.
    #[arg(long)]
    pub kubernetes: bool,

    /// Audience a Kubernetes token must be bound to.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,

    /// How often the CA directory is checked for changes (a rotation step).
    #[arg(long, default_value = "2s", value_parser = parse_secs)]
    pub reload_interval: Duration,
}

impl CaConfig {
    /// An in-process CA on ephemeral loopback ports taking local-mesh tokens.
    pub fn local(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            default_lifetime: crate::authority::DEFAULT_LIFETIME,
            max_lifetime: crate::authority::DEFAULT_LIFETIME,
            local_tokens: true,
            kubernetes: false,
            audience: DEFAULT_AUDIENCE.into(),
            reload_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("Kubernetes client (for --kubernetes): {0}")]
    Kube(kube::Error),
    #[error("no way to authenticate callers: pass --local-tokens and/or --kubernetes")]
    NoAuth,
    #[error("TLS: {0}")]
    Tls(rustls::Error),
}

/// A running CA; dropping it stops it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca: Arc<Ca>,
    tasks: Vec<JoinHandle<()>>,
    /// Ends the certificate service: it stops accepting and closes its connections once
    /// their requests are answered.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a directory holds, to notice changes.
fn dir_stamp(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for f in [
        crate::authority::CERT_FILE,
        crate::authority::KEY_FILE,
        crate::authority::BUNDLE_FILE,
    ] {
        out.extend(std::fs::read(dir.join(f)).unwrap_or_default());
        out.push(0);
    }
    out
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

impl Running {
    pub async fn start(config: CaConfig) -> Result<Self, StartError> {
        let authority =
            Authority::load_or_generate(&config.dir, &config.trust_domain, SystemTime::now())?
                .with_max_lifetime(config.max_lifetime);
        // What was loaded, so that the reloader sees any later change.
        let stamp = dir_stamp(&config.dir);
        if !(config.local_tokens || config.kubernetes) {
            return Err(StartError::NoAuth);
        }
        let auth = Authenticator {
            local: if config.local_tokens {
                Some(LocalTokens::load_or_generate(
                    &config.dir,
                    &config.trust_domain,
                )?)
            } else {
                None
            },
            kubernetes: if config.kubernetes {
                let client = kube::Client::try_default()
                    .await
                    .map_err(StartError::Kube)?;
                Some(TokenReviewer::new(
                    client,
                    &config.audience,
                    &config.trust_domain,
                ))
            } else {
                None
            },
        };
        let ca = Ca::new(authority, auth, config.default_lifetime)?;
        let mut tasks = Vec::new();

        let listener = bind("certificate service", config.addr).await?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            what: "certificate service",
            addr: config.addr,
            source,
        })?;
        let tls = ca
            .serving
            .server_config_no_client_auth()
            .map_err(StartError::Tls)?;
        let svc = CertificateServiceServer::new(CaService(ca.clone()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Not kept in `tasks`: aborting it would leave its connections open.
        tokio::spawn(async move {
            let incoming = mesh_api::tls::grpc::incoming(listener, tls);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
            {
                warn!(error = %e, "certificate service stopped");
            }
        });

        let admin = bind("admin", config.admin_addr).await?;
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            what: "admin",
            addr: config.admin_addr,
            source,
        })?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/debug/roots", get(roots))
            .route("/ready", get(|| async { "ready\n" }))
            .route("/live", get(|| async { "live\n" }))
            .with_state(ca.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, app).await {
                warn!(error = %e, "admin server stopped");
            }
        }));

        tasks.push(tokio::spawn(reload_loop(ca.clone(), config.clone(), stamp)));
        tasks.push(tokio::spawn(renew_serving(ca.clone())));
        info!(%addr, %admin_addr, dir = %config.dir.display(), "mesh-ca serving");
        Ok(Self {
            addr,
            admin_addr,
            ca,
            tasks,
            stop: Some(stop),
        })
    }
}

async fn metrics(State(ca): State<Arc<Ca>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ca.metrics.encode(),
    )
}

#[derive(serde::Serialize)]
struct RootView {
    sha256: String,
    /// Unix seconds.
    not_after: i64,
    /// The root new certificates chain to.
    signing: bool,
}

/// The trust bundle: each root's fingerprint and expiry, and which one signs now.
async fn roots(State(ca): State<Arc<Ca>>) -> impl IntoResponse {
    let authority = ca.authority();
    let signing = authority
        .signing_root()
        .map(|r| mesh_api::tls::fingerprint(r));
    let view: Vec<RootView> = authority
        .bundle()
        .iter()
        .map(|r| {
            let sha256 = mesh_api::tls::fingerprint(r);
            RootView {
                signing: signing.as_deref() == Some(sha256.as_str()),
                not_after: crate::authority::not_after_unix(r),
                sha256,
            }
        })
        .collect();
    axum::Json(view)
}

/// Picks up a changed CA directory: a rotation step, or a plugged-in key.
async fn reload_loop(ca: Arc<Ca>, config: CaConfig, mut stamp: Vec<u8>) {
    loop {
        tokio::time::sleep(config.reload_interval).await;
        let now = dir_stamp(&config.dir);
        if now == stamp {
            continue;
        }
        stamp = now;
        match Authority::load(&config.dir, &config.trust_domain) {
            Ok(a) => {
                let roots = a.bundle().len();
                match ca.replace(a.with_max_lifetime(config.max_lifetime)) {
                    Ok(()) => info!(roots, "CA directory changed: reloaded"),
                    Err(e) => warn!(error = %e, "reloaded CA cannot issue; keeping on"),
                }
            }
            Err(e) => {
                warn!(error = %e, "CA directory changed but does not load; keeping the previous CA")
            }
        }
    }
}

/// Keeps the CA's own serving certificate fresh.
async fn renew_serving(ca: Arc<Ca>) {
    loop {
        tokio::time::sleep(ca.serving_renew_in().max(Duration::from_secs(1))).await;
        if let Err(e) = ca.issue_serving() {
            warn!(error = %e, "renewing the CA's serving certificate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_must_be_more_than_zero() {
        assert_eq!(parse_secs("15m"), Ok(Duration::from_secs(900)));
        assert!(
            parse_secs("0s")
                .expect_err("zero")
                .contains("more than zero")
        );
        assert!(parse_secs("3d").expect_err("unit").contains("\"d\""));
    }
}
