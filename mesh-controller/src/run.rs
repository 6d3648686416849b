//! Starting the controller: source, index, publisher, ADS server and admin server.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
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
}

/// A running controller; dropping it stops everything.
#[derive(Debug)]
pub struct Controller {
    pub xds_addr: SocketAddr,
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
        let metrics = Arc::new(Metrics::new());
        let mut idx = Index::new(config.cluster_domain.clone());
        idx.set_identity(&config.trust_domain, config.mtls_mode);
        let index = Arc::new(Mutex::new(idx));
        let errors = ConfigErrors::new(metrics.clone());
        let mut tasks = Vec::new();

        // Load the configuration before serving, so the first push is complete.
        let watch = match &config.config_dir {
            Some(dir) => {
                info!(dir = %dir.display(), "reading manifests from a directory");
                Some(DirSource::new(dir.clone(), index.clone(), errors.clone()).watch()?)
            }
            None => {
                let client = kube::Client::try_default().await?;
                let sink = kube_source::Sink::new(index.clone(), errors.clone());
                tasks.extend(kube_source::spawn_watchers(client, &sink));
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
        let (quiet, max) = config.debounce();
        tasks.push(tokio::spawn(run_publisher(
            index.clone(),
            hub.clone(),
            quiet,
            max,
        )));

        let (xds, xds_addr) = bind("xDS", config.xds_addr).await?;
        let svc = hub.service();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds);
            if let Err(e) = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
            {
                warn!(error = %e, "xDS server stopped");
            }
        }));

        let (admin, admin_addr) = bind("admin", config.admin_addr).await?;
        let app = router(AdminState {
            hub: hub.clone(),
            errors: errors.clone(),
            config: Arc::new(config),
        });
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, app).await {
                warn!(error = %e, "admin server stopped");
            }
        }));
        info!(%xds_addr, %admin_addr, "controller serving");
        Ok(Self {
            xds_addr,
            admin_addr,
            index,
            hub,
            errors,
            tasks,
            _watch: watch,
        })
    }
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
