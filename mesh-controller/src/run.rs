//! Starting the controller: source, index, publisher, ADS server and admin server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::admin::{AdminState, router};
use crate::config::Config;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::source::dir::{DirError, DirSource, WatchHandle};
use crate::source::{ConfigErrors, kube as kube_source};
use crate::xds::server::{Hub, run_publisher};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "{flag} {addr}: plaintext xDS is served only on loopback; give the controller a CA \
         (--ca-addr, --ca-root) to serve xDS over TLS, or listen on 127.0.0.1"
    )]
    PlaintextNotLoopback {
        flag: &'static str,
        addr: SocketAddr,
    },
    #[error("identity: {0}")]
    Identity(String),
    #[error(
        "--webhook-addr {addr}: the injector needs a certificate from the CA; pass --ca-addr \
         and --ca-root"
    )]
    WebhookWithoutCa { addr: SocketAddr },
    #[error("no source: give --config-dir, or a Kubernetes client")]
    NoSource,
    #[error(
        "--gateway-service-type {0}: Gateways' Services are made only with \
         --gateway-deployments=true; drop one of the two"
    )]
    ServiceTypeWithoutDeployments(&'static str),
}

/// A running controller; dropping it stops everything.
#[derive(Debug)]
pub struct Controller {
    /// The xDS server: TLS when the controller has a CA, else plaintext on loopback.
    pub xds_addr: SocketAddr,
    /// The extra plaintext xDS listener (`--xds-plaintext-addr`).
    pub xds_plaintext_addr: Option<SocketAddr>,
    /// The sidecar injector (`--webhook-addr`).
    pub webhook_addr: Option<SocketAddr>,
    /// The controller's own identity, when it serves xDS over TLS.
    pub identity: Option<Arc<mesh_api::tls::Identity>>,
    pub admin_addr: SocketAddr,
    pub index: Arc<Mutex<Index>>,
    pub hub: Arc<Hub>,
    pub errors: ConfigErrors,
    tasks: Vec<JoinHandle<()>>,
    _watch: Option<WatchHandle>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Controller {
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let client = match &config.config_dir {
            Some(_) => None,
            None => Some(kube::Client::try_default().await?),
        };
        Self::start_with(config, client).await
    }

    /// Starts with this Kubernetes client, the source when `config.config_dir` is unset.
    pub async fn start_with(
        config: Config,
        kube_client: Option<kube::Client>,
    ) -> Result<Self, StartError> {
        if let (false, Some(t)) = (config.gateway_deployments, config.gateway_service_type) {
            return Err(StartError::ServiceTypeWithoutDeployments(t.as_str()));
        }
        let metrics = Arc::new(Metrics::new());
        let mut idx = Index::new(config.cluster_domain.clone());
        idx.set_identity(&config.trust_domain, config.mtls_mode);
        idx.set_authz_default(config.authz_default);
        let index = Arc::new(Mutex::new(idx));
        let errors = ConfigErrors::new(metrics.clone());
        let mut tasks = Vec::new();

        // Load the configuration before serving, so the first push is complete.
        let mut client = None;
        let watch = match &config.config_dir {
            Some(dir) => {
                info!(dir = %dir.display(), "reading manifests from a directory");
                Some(DirSource::new(dir.clone(), index.clone(), errors.clone()).watch()?)
            }
            None => {
                let c = kube_client.ok_or(StartError::NoSource)?;
                client = Some(c.clone());
                let sink = kube_source::Sink::new(index.clone(), errors.clone());
                tasks.extend(kube_source::spawn_watchers(c, &sink));
                let missing = sink
                    .wait_synced(Duration::from_secs(config.sync_timeout_secs))
                    .await;
                if !missing.is_empty() {
                    warn!(
                        ?missing,
                        "serving before these kinds were listed (are their CRDs installed?)"
                    );
                }
                None
            }
        };
        let model = index.lock().unwrap_or_else(|e| e.into_inner()).model();
        let hub = Hub::new(model, metrics.clone());
        let stats = crate::stats::Stats::new(config.stats_interval, config.stats_window);
        // A local mesh has one controller, which drives; in a cluster, the Lease holder.
        let leading = Arc::new(std::sync::atomic::AtomicBool::new(client.is_none()));
        if let Some(client) = &client {
            // Route status comes from one replica: the holder of the Lease.
            let holder = config
                .pod_name
                .clone()
                .unwrap_or_else(|| format!("mesh-controller-{}", std::process::id()));
            let writer = crate::status::StatusWriter {
                client: client.clone(),
                index: index.clone(),
                hub: hub.clone(),
                errors: errors.clone(),
                lease: crate::lease::LeaseLock::new(
                    client.clone(),
                    &config.namespace,
                    mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT,
                    &holder,
                    Duration::from_secs(15),
                ),
                interval: Duration::from_secs(5),
                leading: leading.clone(),
                provisioning: config.gateway_deployments.then(|| {
                    crate::provision::Provisioning::new(
                        config.inject_settings(),
                        config
                            .gateway_service_type
                            .unwrap_or(crate::provision::ServiceType::LoadBalancer),
                        config.ca_root.clone(),
                    )
                }),
            };
            tasks.push(tokio::spawn(writer.run()));
        }
        let store = match (&client, &config.config_dir) {
            (Some(c), _) => Some(crate::rollout::Store::Kube(c.clone())),
            (None, Some(dir)) => Some(crate::rollout::Store::Local(dir.clone())),
            (None, None) => None,
        };
        if let Some(store) = store {
            let mut driver =
                crate::rollout::Driver::new(index.clone(), stats.clone(), store, leading.clone());
            driver.measuring = !config.stats_interval.is_zero();
            tasks.push(tokio::spawn(driver.run()));
        }
        tasks.push(tokio::spawn(hub.learned.clone().forget_unused()));
        let (quiet, max) = config.debounce();
        tasks.push(tokio::spawn(run_publisher(
            index.clone(),
            hub.clone(),
            quiet,
            max,
        )));

        let identity = match (&config.ca_addr, &config.ca_root) {
            (Some(ca_addr), Some(ca_root)) => {
                let (identity, svid) = controller_identity(&config, ca_addr, ca_root)?;
                tasks.push(tokio::spawn(svid.run()));
                Some(identity)
            }
            _ => {
                if !config.xds_addr.ip().is_loopback() {
                    return Err(StartError::PlaintextNotLoopback {
                        flag: "--xds-addr",
                        addr: config.xds_addr,
                    });
                }
                warn!(addr = %config.xds_addr, "no CA: serving plaintext xDS on loopback, proxies' identities unchecked");
                None
            }
        };
        if let Some(addr) = config.xds_plaintext_addr
            && !addr.ip().is_loopback()
        {
            return Err(StartError::PlaintextNotLoopback {
                flag: "--xds-plaintext-addr",
                addr,
            });
        }
        let (xds, xds_addr) = bind("xDS", config.xds_addr).await?;
        let svc = hub.service();
        match &identity {
            Some(identity) => {
                let tls = identity
                    .server_config()
                    .map_err(|e| StartError::Identity(e.to_string()))?;
                let incoming = mesh_api::tls::grpc::incoming(xds, tls);
                tasks.push(serve_xds(incoming, svc.clone()));
            }
            None => tasks.push(serve_xds(plaintext(xds), svc.clone())),
        }
        let xds_plaintext_addr = match config.xds_plaintext_addr {
            Some(addr) => {
                let (l, addr) = bind("plaintext xDS", addr).await?;
                tasks.push(serve_xds(plaintext(l), svc));
                Some(addr)
            }
            None => None,
        };

        let webhook_addr = match (config.webhook_addr, &identity) {
            (None, _) => None,
            (Some(addr), None) => return Err(StartError::WebhookWithoutCa { addr }),
            (Some(addr), Some(identity)) => {
                let (l, addr) = bind("webhook", addr).await?;
                let tls = identity
                    .server_config_no_client_auth(&[
                        mesh_api::tls::ALPN_H2,
                        mesh_api::tls::ALPN_HTTP1,
                    ])
                    .map_err(|e| StartError::Identity(e.to_string()))?;
                tasks.push(crate::webhook::serve(l, tls, config.inject_settings()));
                if let (Some(client), Some(root)) = (&client, &config.ca_root) {
                    let publisher = crate::ca_root::RootPublisher::new(
                        client.clone(),
                        root.clone(),
                        &config.webhook_config,
                        &config.namespace,
                    );
                    tasks.push(tokio::spawn(publisher.run(Duration::from_secs(10))));
                }
                Some(addr)
            }
        };

        if !config.stats_interval.is_zero() {
            // In a cluster the Lease holder also scrapes the proxies other replicas serve.
            let all = client.as_ref().map(|_| crate::stats::AllPods {
                hub: hub.clone(),
                when: leading.clone(),
                port: mesh_api::consts::ports::PROXY_METRICS,
            });
            tasks.push(tokio::spawn(stats.clone().run(hub.status.clone(), all)));
        }
        let (admin, admin_addr) = bind("admin", config.admin_addr).await?;
        let access = match &client {
            Some(c) => crate::access::Access::kubernetes(c.clone(), &config.namespace),
            None => crate::access::Access::Loopback,
        };
        info!(%admin_addr, served_to = %access.describe(), "debug API and graph");
        let app = router(AdminState {
            hub: hub.clone(),
            errors: errors.clone(),
            config: Arc::new(config),
            stats,
            access,
        })
        .into_make_service_with_connect_info::<SocketAddr>();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, app).await {
                warn!(error = %e, "admin server stopped");
            }
        }));
        info!(%xds_addr, ?xds_plaintext_addr, ?webhook_addr, tls = identity.is_some(), %admin_addr, "controller serving");
        Ok(Self {
            xds_addr,
            webhook_addr,
            xds_plaintext_addr,
            identity,
            admin_addr,
            index,
            hub,
            errors,
            tasks,
            _watch: watch,
        })
    }
}

type AdsServer = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer<crate::xds::server::AdsService>;

/// Plaintext xDS connections, with Nagle off as on the TLS ones: a small response written
/// while the last is unacknowledged would otherwise wait for the client's delayed ACK (40 ms).
fn plaintext(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(l).map(|conn| {
        conn.inspect(|c| {
            let _ = c.set_nodelay(true);
        })
    })
}

/// Serves xDS on the connections of `incoming` (plaintext, or mesh TLS).
fn serve_xds<S, IO, IE>(incoming: S, svc: AdsServer) -> JoinHandle<()>
where
    S: futures::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
        {
            warn!(error = %e, "xDS server stopped");
        }
    })
}

/// The controller's identity (`.../ns/mesh-system/sa/mesh-controller`) and what keeps its
/// certificate fresh.
fn controller_identity(
    config: &Config,
    ca_addr: &str,
    ca_root: &std::path::Path,
) -> Result<
    (
        Arc<mesh_api::tls::Identity>,
        Arc<mesh_api::tls::renew::SvidClient>,
    ),
    StartError,
> {
    use mesh_api::consts::identity as ids;
    use mesh_api::tls::renew::{SvidClient, SvidSettings};
    let err = |e: String| StartError::Identity(e);
    let id = mesh_api::SpiffeId::workload(
        &config.trust_domain,
        &config.namespace,
        ids::CONTROLLER_SERVICE_ACCOUNT,
    )
    .map_err(|e| err(format!("--trust-domain {:?}: {e}", config.trust_domain)))?;
    let identity = mesh_api::tls::Identity::new(
        &config.trust_domain,
        SvidClient::read_root(ca_root).map_err(err)?,
        Box::new(|role, r| {
            warn!(?role, reason = r.reason, detail = %r.detail, "xDS client certificate refused");
        }),
    );
    let svid = SvidClient::new(
        SvidSettings {
            id,
            ca_addr: ca_addr.to_string(),
            ca_root: ca_root.to_path_buf(),
            token_file: config.ca_token_file.clone(),
            lifetime: Duration::ZERO,
            // The injector presents this certificate to the API server.
            dns_names: config
                .webhook_addr
                .map(|_| config.webhook_dns_name())
                .into_iter()
                .collect(),
        },
        identity.clone(),
        Box::new(|_| {}),
        Box::new(|_| {}),
    )
    .map_err(err)?;
    Ok((identity, svid))
}

/// Binds a listener and reports the address it got (the port may have been 0).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gateway_service_type_without_gateway_deployments_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("a directory");
        let mut config = Config::local(dir.path());
        config.gateway_deployments = false;
        config.gateway_service_type = Some(crate::provision::ServiceType::ClusterIP);
        match Controller::start(config).await {
            Ok(_) => panic!("started with a flag it would ignore"),
            Err(e) => assert!(
                e.to_string()
                    .starts_with("--gateway-service-type ClusterIP: Gateways' Services are made only with --gateway-deployments=true"),
                "{e}"
            ),
        }
    }
}
