//! Starting a proxy: bind the listeners, then start the xDS client (which reports where they
//! are), the data path and the admin servers.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::admin::{AdminState, IDENTITY_OFF_WARNING, LogControl, admin_router, metrics_router};
use crate::config::{Config, ConfigError};
use crate::identity::{IdentityError, MeshTls};
use crate::metrics::Metrics;
use crate::proxy::{ListenerKind, Shared, serve};
use crate::state::Store;
use crate::trace::Tracing;
use crate::xds::XdsClient;
use crate::xds::client::ListenerPorts;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tracing(#[from] crate::trace::TracingError),
    #[error(transparent)]
    AccessLog(#[from] crate::access_log::AccessLogError),
    #[error("--memory-limit: resident memory cannot be read from /proc/self/status")]
    NoResidentMemory,
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running proxy; dropping it stops everything.
#[derive(Debug)]
pub struct Proxy {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub outbound_addr: Option<SocketAddr>,
    pub inbound_addr: Option<SocketAddr>,
    pub outbound_http_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    /// Mesh TLS; `None` with identity off.
    pub tls: Option<Arc<MeshTls>>,
    shutdown: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
    listeners: Vec<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.listeners) {
            t.abort();
        }
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Proxy {
    pub async fn start(config: Config, log: Option<Arc<LogControl>>) -> Result<Self, StartError> {
        config.node_parts()?;
        config.check_identity()?;
        config.check_scoped()?;
        config.check_gateway()?;
        // What it runs with, as `/config_dump` shows it.
        let config = Arc::new(Config {
            scoped: Some(config.scoped()),
            ..config
        });
        let store = Arc::new(Store::default());
        let metrics = Arc::new(Metrics::for_peer(config.peer()));
        let tls = if config.identity_off {
            warn!("{IDENTITY_OFF_WARNING}");
            None
        } else {
            Some(MeshTls::new(&config, metrics.clone())?)
        };
        let shutdown = Arc::new(Notify::new());

        let mut data = Vec::new();
        if config.transparent {
            data.push((
                ListenerKind::Outbound,
                bind("outbound", config.outbound_addr).await?,
            ));
            data.push((
                ListenerKind::Inbound,
                bind("inbound", config.inbound_addr).await?,
            ));
        } else if config.gateway.is_none() {
            data.push((
                ListenerKind::OutboundHttp,
                bind("outbound HTTP", config.outbound_http_addr).await?,
            ));
        }
        let admin = bind("admin", config.admin_addr).await?;
        let metrics_listener = bind("metrics", config.metrics_addr).await?;
        let addr_of = |k: ListenerKind| {
            data.iter()
                .find(|(kind, _)| *kind == k)
                .map(|(_, l)| local(l))
        };
        let (outbound_addr, inbound_addr, outbound_http_addr) = (
            addr_of(ListenerKind::Outbound),
            addr_of(ListenerKind::Inbound),
            addr_of(ListenerKind::OutboundHttp),
        );
        let ports = ListenerPorts {
            transparent: config.transparent,
            outbound_http: outbound_http_addr.unwrap_or(config.outbound_http_addr),
            outbound_port: outbound_addr.map_or(config.outbound_addr.port(), |a| a.port()),
            inbound_port: inbound_addr.map_or(config.inbound_addr.port(), |a| a.port()),
            admin: local(&admin),
            metrics: local(&metrics_listener),
        };

        let mut shared = Shared::new(config.clone(), store.clone(), metrics.clone());
        shared.own = data.iter().map(|(_, l)| local(l)).collect();
        shared.tls = tls.clone();
        shared.on_demand = config
            .scoped()
            .then(|| Arc::new(crate::xds::on_demand::OnDemand::default()));
        let (_, pod) = config.node_parts()?;
        if config.telemetry {
            shared.tracing = Some(Arc::new(Tracing::new(
                config.tracing_endpoint.as_deref(),
                config.tracing_sampling,
                &metrics.me,
                pod,
            )?));
            if let Some(path) = &config.access_log {
                shared.access_log =
                    Some(AccessLog::open(path, metrics.access_log_dropped.clone())?);
            }
        }
        crate::overload::raise_file_limit(config.max_connections);
        if config.memory_limit > 0 {
            let resident = crate::overload::resident_bytes().ok_or(StartError::NoResidentMemory)?;
            if resident > config.memory_limit / 20 * 19 {
                warn!(
                    resident,
                    limit = config.memory_limit,
                    "--memory-limit is below what the proxy already uses: every request is shed"
                );
            }
            shared.overload = Some(crate::overload::Overload::new(
                config.memory_limit,
                metrics.resident_memory.clone(),
                metrics.overload_shedding.clone(),
            ));
        }
        let shared = Arc::new(shared);

        let xds_tls = match &tls {
            Some(t) if config.xds_over_tls() => Some((t.clone(), t.controller_client()?)),
            _ => None,
        };
        let xds = XdsClient::new(
            &config,
            &ports,
            store.clone(),
            metrics.clone(),
            xds_tls,
            shared.on_demand.clone(),
        );
        let gateway_bound = config
            .gateway
            .is_some()
            .then(|| Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let state = AdminState {
            gateway_bound: gateway_bound.clone(),
            config: config.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            xds: xds.status.clone(),
            log,
            shutdown: shutdown.clone(),
            tls: tls.clone(),
        };
        let (admin_addr, metrics_addr) = (local(&admin), local(&metrics_listener));
        let mut tasks = vec![tokio::spawn(xds.run())];
        if let Some(od) = &shared.on_demand
            && !config.scoped_idle_timeout.is_zero()
        {
            tasks.push(tokio::spawn(
                od.clone().forget_idle(config.scoped_idle_timeout),
            ));
        }
        if let Some(tls) = &tls {
            tasks.push(tokio::spawn(tls.clone().run()));
        }
        if let Some(o) = &shared.overload {
            tasks.push(tokio::spawn(o.clone().watch()));
        }
        if let Some(bound) = &gateway_bound {
            tasks.push(tokio::spawn(crate::proxy::gateway::bind_gateway_listeners(
                shared.clone(),
                bound.clone(),
            )));
        }
        let admin_app = admin_router(state.clone());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(admin, admin_app).await;
        }));
        let metrics_app = metrics_router(state);
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(metrics_listener, metrics_app).await;
        }));
        let listeners = data
            .into_iter()
            .map(|(kind, l)| tokio::spawn(serve(l, kind, shared.clone())))
            .collect();
        info!(
            node = %config.node,
            xds = %config.xds.join(","),
            ?outbound_addr,
            ?inbound_addr,
            ?outbound_http_addr,
            %admin_addr,
            %metrics_addr,
            "mesh-proxy started"
        );
        Ok(Self {
            admin_addr,
            metrics_addr,
            outbound_addr,
            inbound_addr,
            outbound_http_addr,
            store,
            metrics,
            shared,
            tls,
            shutdown,
            tasks,
            listeners,
        })
    }

    /// Resolves when `/shutdown` is called.
    pub async fn shutdown_requested(&self) {
        self.shutdown.notified().await;
    }

    /// Stops accepting, lets open connections finish up to the drain deadline. Returns
    /// whether every connection finished in time.
    pub async fn drain(&self) -> bool {
        let deadline = self.shared.config.drain_deadline;
        info!(deadline_ms = deadline.as_millis() as u64, "draining");
        let clean = self.shared.drain.drain(deadline).await;
        for l in &self.listeners {
            l.abort();
        }
        if let Some(t) = &self.shared.tracing {
            // The spans of the last requests still go out.
            t.shutdown();
        }
        clean
    }
}
