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
use crate::secret::SecretStore;
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

    /// How often the CA directory (and the Secret, with --secret) is checked for changes (a
    /// rotation step).
    #[arg(long, default_value = "2s", value_parser = parse_secs)]
    pub reload_interval: Duration,

    /// Keep the CA in this Secret of --namespace, mirrored into --dir: a root is generated and
    /// stored on first start, and the trust bundle is published in the ConfigMap mesh-ca-root.
    #[arg(long)]
    pub secret: Option<String>,

    /// The namespace of --secret and of the mesh-ca-root ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
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
            secret: None,
            namespace: mesh_api::consts::identity::SYSTEM_NAMESPACE.into(),
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
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
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
        let client = if config.kubernetes || config.secret.is_some() {
            Some(
                kube::Client::try_default()
                    .await
                    .map_err(StartError::Kube)?,
            )
        } else {
            None
        };
        Self::start_with(config, client).await
    }

    /// Starts with this Kubernetes client (for --kubernetes and --secret).
    pub async fn start_with(
        config: CaConfig,
        client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        let store = match (&config.secret, &client) {
            (Some(name), Some(client)) => {
                Some(SecretStore::new(client.clone(), &config.namespace, name))
            }
            _ => None,
        };
        if let Some(store) = &store {
            store.sync_to_dir(&config.dir, &config.trust_domain).await?;
        }
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
            kubernetes: match (&client, config.kubernetes) {
                (Some(client), true) => Some(TokenReviewer::new(
                    client.clone(),
                    &config.audience,
                    &config.trust_domain,
                )),
                _ => None,
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
            .server_config_no_client_auth(&[mesh_api::tls::ALPN_H2])
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

        if let Some(store) = store {
            store.publish_root(ca.authority().bundle()).await?;
            tasks.push(tokio::spawn(secret_loop(ca.clone(), store, config.clone())));
        }
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

/// Mirrors the Secret into the CA directory (where [`reload_loop`] picks changes up) and
/// keeps the published root equal to the trust bundle. Errors are logged and retried.
async fn secret_loop(ca: Arc<Ca>, store: SecretStore, config: CaConfig) {
    loop {
        tokio::time::sleep(config.reload_interval).await;
        if let Err(e) = store.sync_to_dir(&config.dir, &config.trust_domain).await {
            warn!(error = %e, "the CA Secret was not applied; keeping the CA loaded before");
        }
        let bundle = ca.authority().bundle().to_vec();
        match store.publish_root(&bundle).await {
            Ok(true) => info!(roots = bundle.len(), "published the trust bundle"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "publishing the trust bundle"),
        }
    }
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
