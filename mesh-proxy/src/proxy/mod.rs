//! The data path: accept -> original destination -> filter chain (detecting the protocol
//! when chains differ by it) -> HTTP (hyper, HTTP/1 and HTTP/2) or opaque TCP.
//!
//! Every step is a function short enough to read at once: no function here is over 80 lines
//! (`clippy.toml`).

#![deny(clippy::too_many_lines)]

pub mod affinity;
pub mod detect;
pub mod error;
pub mod gateway;
pub mod guard;
pub mod http;
pub mod observe;
pub mod replay;
pub mod tcp;
pub mod upstream;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_api::consts::xds as names;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument, debug, info_span, warn};

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::identity::MeshTls;
use crate::metrics::{Direction, ListenerLabels, ListenerNameLabels, Metrics};
use crate::state::{
    ChainChoice, Detected, FilterChain, ListenerConfig, NetworkFilter, Snapshot, Store,
};

use crate::trace::Tracing;
use crate::xds::on_demand::{self, Lookup};
use detect::{PrefixedIo, detect};

/// The proxy's listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// Transparent outbound (iptables REDIRECT from the app).
    Outbound,
    /// Transparent inbound (iptables REDIRECT to the app).
    Inbound,
    /// Explicit HTTP proxy that routes by Host.
    OutboundHttp,
    /// A Gateway's listener on this port (a gateway proxy).
    Gateway(u16),
}

impl ListenerKind {
    pub fn xds_name(self) -> Cow<'static, str> {
        match self {
            ListenerKind::Outbound => names::OUTBOUND_LISTENER.into(),
            ListenerKind::Inbound => names::INBOUND_LISTENER.into(),
            ListenerKind::OutboundHttp => names::OUTBOUND_HTTP_LISTENER.into(),
            ListenerKind::Gateway(port) => names::gateway_listener(port).into(),
        }
    }

    pub fn direction(self) -> Direction {
        match self {
            ListenerKind::Inbound => Direction::inbound,
            _ => Direction::outbound,
        }
    }
}

/// What an HTTP connection knows about itself.
#[derive(Debug)]
pub struct HttpCtx {
    /// The connection's place under `--max-connections`, held as long as the connection:
    /// an upgraded one (WebSocket) outlives its HTTP exchange in a tunnel that holds it too.
    pub slot: ConnSlot,
    pub shared: Arc<Shared>,
    /// The RouteConfiguration its filter chain names.
    pub route: String,
    /// The connection's original destination.
    pub dst: SocketAddr,
    /// The client's address (for a hash by source IP).
    pub src: Option<SocketAddr>,
    /// Inbound over mesh TLS: the client's SPIFFE ID (for policy and metrics).
    pub peer: Option<mesh_api::SpiffeId>,
    /// Inbound: the `x-forwarded-client-cert` value given to the app (`By=<this
    /// proxy>;URI=<peer>`), when the client proved an identity.
    pub xfcc: Option<hyper::header::HeaderValue>,
    /// Inbound: the callers seen on this connection.
    pub callers: observe::CallerCache,
    /// The listener (and so the direction) and filter chain the connection is on, for its
    /// current policy.
    pub kind: ListenerKind,
    pub chain: String,
    pub guard: guard::GuardCache,
    /// The chain has the fault injection filter: routes' faults apply.
    pub faults: bool,
    /// What is done to a request's path before it is routed (outside the inbound side).
    pub paths: crate::state::PathRules,
    /// The client is the connection's peer: `x-forwarded-for` and `x-forwarded-proto` say so.
    pub remote_address: bool,
    /// The connection came over a gateway's TLS: its requests' scheme is `https`.
    pub https: bool,
}

/// A connection's place among its listener's `--max-connections`.
pub type ConnSlot = Arc<tokio::sync::OwnedSemaphorePermit>;

/// Tracks open connections so that a drain can wait for them.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<bool>,
    tracker: Mutex<Option<mpsc::Sender<()>>>,
    done: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

impl Default for Drain {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(1);
        Self {
            signal: watch::channel(false).0,
            tracker: Mutex::new(Some(tx)),
            done: tokio::sync::Mutex::new(rx),
        }
    }
}

/// Held by each connection; the drain ends when all are dropped.
#[derive(Debug)]
pub struct ConnGuard(#[allow(dead_code)] Option<mpsc::Sender<()>>);

impl Drain {
    pub fn guard(&self) -> ConnGuard {
        ConnGuard(self.tracker.lock().ok().and_then(|t| t.clone()))
    }

    pub fn watch(&self) -> watch::Receiver<bool> {
        self.signal.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Stops accepting, asks connections to finish, and waits for them up to `deadline`.
    /// Returns how many were still open when it gave up.
    pub async fn drain(&self, deadline: Duration) -> bool {
        self.signal.send_replace(true);
        if let Ok(mut t) = self.tracker.lock() {
            t.take();
        }
        let mut done = self.done.lock().await;
        tokio::time::timeout(deadline, async { while done.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub server: auto::Builder<TokioExecutor>,
    pub drain: Drain,
    /// Addresses the proxy listens on: traffic sent to them is never passed through.
    pub own: Vec<SocketAddr>,
    /// Mesh TLS; `None` when the proxy runs with identity off.
    pub tls: Option<Arc<MeshTls>>,
    /// Spans and trace propagation; `None` leaves trace headers alone.
    pub tracing: Option<Arc<Tracing>>,
    /// Where access log lines go; `None`: off.
    pub access_log: Option<AccessLog>,
    /// What this proxy sends in `x-mesh-source-workload`.
    pub source_header: Option<hyper::header::HeaderValue>,
    /// Local rate limit state, shared by the connections of a chain.
    pub limiters: guard::Limiters,
    /// Destinations looked up on demand (`--scoped`).
    pub on_demand: Option<Arc<crate::xds::on_demand::OnDemand>>,
    /// With `--memory-limit`: whether new requests are shed.
    pub overload: Option<Arc<crate::overload::Overload>>,
    /// A gateway's TLS server configs.
    pub edge_tls: gateway::EdgeConfigs,
}

impl Shared {
    pub fn new(config: Arc<Config>, store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Some(config.header_read_timeout).filter(|d| !d.is_zero()))
            .max_buf_size(config.max_header_bytes.max(8192));
        server
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(config.h2_max_streams)
            // As upstream: a request body that its app does not read holds back no other
            // stream of the connection (another proxy's, carrying other clients' requests).
            .initial_stream_window_size(upstream::multiplex::STREAM_WINDOW)
            .initial_connection_window_size(upstream::multiplex::connection_window(
                config.h2_max_streams,
            ))
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .max_local_error_reset_streams(1024)
            .max_pending_accept_reset_streams(20)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let source_header = config
            .telemetry
            .then(|| observe::source_value(&metrics.me))
            .flatten();
        Self {
            config,
            store,
            server,
            drain: Drain::default(),
            own: Vec::new(),
            tls: None,
            tracing: None,
            access_log: None,
            source_header,
            limiters: guard::Limiters::default(),
            on_demand: None,
            overload: None,
            edge_tls: gateway::EdgeConfigs::default(),
            metrics,
        }
    }

    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.own
            .iter()
            .any(|a| a.port() == dst.port() && (a.ip() == dst.ip() || a.ip().is_unspecified()))
    }
}

/// Resolves once the drain starts.
async fn drained(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Accepts connections until the drain starts, `--max-connections` open at once: one more is
/// closed as soon as it is accepted (its client learns at once, by the end of the stream or a
/// reset when it had sent bytes, rather than waiting in the kernel's queue) and counted.
pub async fn serve(listener: TcpListener, kind: ListenerKind, shared: Arc<Shared>) {
    let mut draining = shared.drain.watch();
    let slots = Arc::new(Semaphore::new(shared.config.max_connections as usize));
    let over_limit = shared
        .metrics
        .connections_over_limit
        .get_or_create(&ListenerNameLabels {
            listener: kind.xds_name().into_owned(),
        })
        .clone();
    loop {
        let accepted = tokio::select! {
            biased;
            () = drained(&mut draining) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    over_limit.inc();
                    debug!(%peer, listener = %kind.xds_name(), "connection over the limit closed");
                    drop(stream);
                    continue;
                };
                let guard = shared.drain.guard();
                let shared = shared.clone();
                let span = info_span!("conn", listener = %kind.xds_name(), %peer);
                tokio::spawn(
                    async move {
                        connection(stream, kind, &shared, Arc::new(permit)).await;
                        drop(guard);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                // Out of file descriptors and the like: back off a little, keep serving.
                warn!(error = %e, listener = %kind.xds_name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The destination the client meant: from the config override, the kernel (after an
/// iptables REDIRECT), or the socket itself.
fn original_dst(stream: &TcpStream, kind: ListenerKind, config: &Config) -> Option<SocketAddr> {
    let fixed = match kind {
        ListenerKind::Outbound => config.outbound_orig_dst,
        ListenerKind::Inbound => config.inbound_orig_dst,
        ListenerKind::OutboundHttp | ListenerKind::Gateway(_) => return stream.local_addr().ok(),
    };
    if fixed.is_some() {
        return fixed;
    }
    let sock = socket2::SockRef::from(stream);
    let from_kernel = match stream.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    from_kernel
        .ok()
        .and_then(|a| a.as_socket())
        .or_else(|| stream.local_addr().ok())
}

struct Active<'a> {
    metrics: &'a Metrics,
    labels: ListenerLabels,
}

impl<'a> Active<'a> {
    fn new(metrics: &'a Metrics, kind: ListenerKind, protocol: &'static str) -> Self {
        let labels = ListenerLabels {
            listener: kind.xds_name().into_owned(),
            protocol,
        };
        metrics.connections.get_or_create(&labels).inc();
        metrics.active_connections.get_or_create(&labels).inc();
        Self { metrics, labels }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.metrics
            .active_connections
            .get_or_create(&self.labels)
            .dec();
    }
}

async fn connection(
    mut stream: TcpStream,
    kind: ListenerKind,
    shared: &Arc<Shared>,
    slot: ConnSlot,
) {
    let _ = stream.set_nodelay(true);
    let src = stream.peer_addr().ok();
    let Some(dst) = original_dst(&stream, kind, &shared.config) else {
        return;
    };
    let transparent = matches!(kind, ListenerKind::Outbound | ListenerKind::Inbound);
    if transparent && shared.is_own_listener(dst) {
        warn!(%dst, "connection reached a transparent listener without redirection; closing");
        return;
    }
    let lookups = shared
        .on_demand
        .as_ref()
        .filter(|_| kind == ListenerKind::Outbound);
    // While the connection is open (its lookup included), its destination is in use and not
    // let go as idle.
    let _in_use = lookups.map(|od| od.in_use(dst));
    let Some(snapshot) = config_for(&mut stream, dst, lookups, shared).await else {
        return;
    };
    let Some(listener) = snapshot.listeners.get(&*kind.xds_name()) else {
        debug!("no config for this listener; closing");
        return;
    };
    // Only a gateway's listeners terminate TLS of their own: a sidecar's many chains are not
    // looked through on every connection.
    if matches!(kind, ListenerKind::Gateway(_)) && listener.edge_tls() {
        let at = Chain {
            kind,
            slot,
            name: String::new(),
            generation: snapshot.generation,
            dst,
            src,
            h2: false,
            https: true,
        };
        // Boxed: its TLS (the ClientHello read, the handshake) inline would make every
        // sidecar connection's task that size (copied when spawned and when it ends).
        return Box::pin(gateway::edge(stream, at, snapshot, shared)).await;
    }
    let Some((chain, prefix, candidates)) = choose_chain(&mut stream, listener, dst, shared).await
    else {
        return;
    };
    let h2 = if prefix.is_empty()
        && !chain.terminate_tls
        && matches!(chain.filter, NetworkFilter::Http { .. })
    {
        // A chain taken without reading first (the port's only chain, or its default).
        detect::starts_h2(&stream, shared.config.detect_timeout).await
    } else {
        prefix.starts_with(detect::H2_PREFACE)
    };
    let io = PrefixedIo::new(prefix, stream).with_idle_timeout(shared.config.idle_timeout);
    let on = Chain {
        kind,
        slot,
        name: chain.name.clone(),
        generation: snapshot.generation,
        dst,
        src,
        h2,
        https: false,
    };
    if !chain.terminate_tls {
        let filter = chain.filter.clone();
        drop(snapshot);
        return run_filter(&filter, io, on, None, shared).await;
    }
    // Boxed, as the gateway's path: TLS inline would make every connection's task that size.
    let Some((stream, peer, alpn)) = Box::pin(accept_tls(io, dst, shared)).await else {
        return;
    };
    let Some((name, inner)) = pick_after_tls(&snapshot, kind, &candidates, alpn) else {
        debug!(%dst, ?alpn, "no filter chain for this mesh TLS connection; closing");
        return;
    };
    drop(snapshot);
    let on = Chain {
        name,
        h2: alpn == Some(Detected::H2c),
        ..on
    };
    Box::pin(run_filter(&inner, stream, on, peer, shared)).await;
}

/// The config to serve a connection to `dst` with: the current one, waited for a while when
/// there is none yet, and with `lookups`, once a destination it lacks was looked up. `None`:
/// the connection is closed (or, when the lookup timed out, refused).
async fn config_for(
    stream: &mut TcpStream,
    dst: SocketAddr,
    lookups: Option<&Arc<on_demand::OnDemand>>,
    shared: &Arc<Shared>,
) -> Option<Arc<Snapshot>> {
    let snapshot = match shared.store.load() {
        Some(s) => s,
        // Connections that arrive before the first config wait for it, a while.
        None => tokio::time::timeout(Duration::from_secs(10), shared.store.ready())
            .await
            .ok()?,
    };
    let Some(od) = lookups.filter(|_| !on_demand::holds(&snapshot, &names::address_listener(dst)))
    else {
        return Some(snapshot);
    };
    let found = od.lookup(dst, &shared.store, on_demand::WAIT).await;
    shared
        .metrics
        .lookups
        .get_or_create(&crate::metrics::LookupLabels {
            result: found.label(),
        })
        .inc();
    if found == Lookup::TimedOut {
        warn!(%dst, "the config of this destination did not arrive in time; refusing");
        refuse_unconfigured(stream, dst, shared).await;
        return None;
    }
    Some(shared.store.load().unwrap_or(snapshot))
}

/// The filter chain a connection lands on, the bytes read to detect its protocol, and the
/// chains that stay candidates until mesh TLS shows its ALPN. `None`: closed.
async fn choose_chain<'l>(
    stream: &mut TcpStream,
    listener: &'l ListenerConfig,
    dst: SocketAddr,
    shared: &Shared,
) -> Option<(&'l FilterChain, BytesMut, Vec<&'l FilterChain>)> {
    match listener.select(dst) {
        ChainChoice::Chain(c) => Some((c, BytesMut::new(), Vec::new())),
        ChainChoice::Detect(chains) => {
            let (proto, buf) = match detect(stream, shared.config.detect_timeout).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "reading the first bytes");
                    return None;
                }
            };
            let Some(c) = listener.pick(&chains, proto) else {
                if proto != Detected::Tls {
                    debug!(%dst, "plaintext refused: this port takes mesh TLS only");
                }
                return None;
            };
            Some((c, buf, chains))
        }
        ChainChoice::None => {
            debug!(%dst, "no filter chain matches; closing");
            None
        }
    }
}

/// Terminates mesh TLS: the connection, the client's SPIFFE ID, and the protocol its ALPN
/// names. `None`: the handshake failed or timed out, or this proxy has no identity.
async fn accept_tls<I>(
    io: I,
    dst: SocketAddr,
    shared: &Shared,
) -> Option<(
    tokio_rustls::server::TlsStream<I>,
    Option<mesh_api::SpiffeId>,
    Option<Detected>,
)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(tls) = shared.tls.clone() else {
        warn!(%dst, "a filter chain terminates mesh TLS, but this proxy runs with identity off; closing");
        return None;
    };
    let accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(io)).await;
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tls.handshake_done(Direction::inbound, false);
            debug!(error = %e, "mesh TLS handshake failed");
            return None;
        }
        Err(_) => {
            tls.handshake_done(Direction::inbound, false);
            debug!("mesh TLS handshake timed out");
            return None;
        }
    };
    tls.handshake_done(Direction::inbound, true);
    let conn = stream.get_ref().1;
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| mesh_api::tls::peer_id(der));
    if let Some(p) = &peer {
        shared
            .metrics
            .inbound_peers
            .get_or_create(&crate::metrics::PeerLabels {
                peer: p.to_string(),
            })
            .inc();
    }
    let alpn = match conn.alpn_protocol() {
        Some(mesh_api::tls::ALPN_H2) => Some(Detected::H2c),
        Some(mesh_api::tls::ALPN_HTTP1) => Some(Detected::Http1),
        _ => None,
    };
    Some((stream, peer, alpn))
}

/// A destination whose config did not arrive: an HTTP/1 client is told so with a 503 that
/// says why; any other connection is closed.
async fn refuse_unconfigured(stream: &mut TcpStream, dst: SocketAddr, shared: &Arc<Shared>) {
    use tokio::io::AsyncWriteExt;
    let Ok((Detected::Http1, _)) = detect(stream, shared.config.detect_timeout).await else {
        return;
    };
    let body = format!(
        "the mesh's configuration for {dst} did not arrive within {} ms\n",
        on_demand::WAIT.as_millis()
    );
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Where a connection landed: its listener, filter chain (by name, in the snapshot of this
/// generation) and original destination.
pub(crate) struct Chain {
    kind: ListenerKind,
    slot: ConnSlot,
    name: String,
    generation: u64,
    dst: SocketAddr,
    /// The client's address.
    src: Option<SocketAddr>,
    /// The connection is known to be HTTP/2 (its first bytes, or its ALPN).
    h2: bool,
    /// Over a gateway's TLS.
    https: bool,
}

/// How long a client has to finish a mesh TLS handshake.
pub(crate) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The chain, and so the filter, for a terminated mesh TLS connection.
fn pick_after_tls(
    snapshot: &Snapshot,
    kind: ListenerKind,
    candidates: &[&FilterChain],
    alpn: Option<Detected>,
) -> Option<(String, NetworkFilter)> {
    let listener = snapshot.listeners.get(&*kind.xds_name())?;
    listener
        .pick_alpn(candidates, alpn)
        .map(|c| (c.name.clone(), c.filter.clone()))
}

pub(crate) async fn run_filter<I>(
    filter: &NetworkFilter,
    io: I,
    on: Chain,
    peer: Option<mesh_api::SpiffeId>,
    shared: &Arc<Shared>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (kind, dst) = (on.kind, on.dst);
    match filter {
        NetworkFilter::Http {
            route,
            guard,
            faults,
            paths,
            remote_address,
        } => {
            let _active = Active::new(&shared.metrics, kind, "http");
            let xfcc = match (&peer, &shared.tls) {
                (Some(p), Some(tls)) => {
                    hyper::header::HeaderValue::from_str(&format!("By={};URI={p}", tls.id)).ok()
                }
                _ => None,
            };
            let ctx = Arc::new(HttpCtx {
                slot: on.slot.clone(),
                shared: shared.clone(),
                route: route.clone(),
                dst,
                src: on.src,
                peer,
                xfcc,
                callers: Default::default(),
                kind,
                chain: on.name,
                guard: guard::GuardCache::new(on.generation, guard.clone(), &shared.limiters),
                faults: *faults,
                paths: *paths,
                remote_address: *remote_address,
                https: on.https,
            });
            if on.h2 {
                // Boxed: hyper spawns each HTTP/2 stream's future as a task, and moves a
                // task's future several times on the way in and out; a box makes each of
                // those moves a pointer's instead of the whole request path's state. Over
                // HTTP/1.1 the future is moved once, into the connection's own box, so a
                // box of its own would only add an allocation.
                let svc = move |req| Box::pin(http::handle(ctx.clone(), req));
                serve_http(io, hyper::service::service_fn(svc), shared).await;
            } else {
                let svc = move |req| http::handle(ctx.clone(), req);
                serve_http(io, hyper::service::service_fn(svc), shared).await;
            }
        }
        NetworkFilter::Tcp { cluster, guard } => {
            let id = peer.as_ref().map(mesh_api::SpiffeId::as_str);
            if !guard::admit_connection(guard, shared, id, dst.port()) {
                return;
            }
            let _active = Active::new(&shared.metrics, kind, "tcp");
            tcp::relay(shared, cluster, kind.direction(), peer.as_ref(), dst, io).await;
        }
    }
}

async fn serve_http<I, S>(io: I, svc: S, shared: &Arc<Shared>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<upstream::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
    TokioExecutor: hyper_util::server::conn::auto::HttpServerConnExec<S::Future, upstream::Body>,
{
    let conn = shared
        .server
        .serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut draining = shared.drain.watch();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "HTTP connection ended");
            }
        }
        () = drained(&mut draining) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
