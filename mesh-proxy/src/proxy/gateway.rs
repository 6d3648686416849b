//! A gateway proxy's own listeners (`--gateway`): bound from the controller's
//! `gateway_<port>` Listeners as they come and go, and on an HTTPS port the TLS server name
//! choosing the filter chain, whose certificates (SDS Secrets) the handshake presents.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use mesh_api::consts::xds as names;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::detect::PrefixedIo;
use super::{Chain, ListenerKind, Shared, TLS_HANDSHAKE_TIMEOUT, run_filter, serve};
use crate::state::{EdgeTls, ServerCert, Snapshot};

/// A listener's accept loop, stopped when dropped (with the binder, or the listener).
struct Serving {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds a gateway's listeners as the controller sends them: one that appears is bound on its
/// address and served; one that goes away or moves stops accepting (its open connections
/// finish). A bind that fails is logged, and tried again with the next config and every second.
/// `bound` is set once every listener of a config was bound; with
/// `mesh_proxy_gateway_listeners_unbound` at 0 it is what `/ready` asks.
pub async fn bind_gateway_listeners(shared: Arc<Shared>, bound: Arc<AtomicBool>) {
    let mut serving: HashMap<String, Serving> = HashMap::new();
    // Failing binds already logged at warn level: their retries log at debug level.
    let mut warned: HashMap<String, SocketAddr> = HashMap::new();
    let mut changes = shared.store.changes();
    loop {
        let mut failed: i64 = 0;
        let snapshot = shared.store.load();
        let wanted: HashMap<String, SocketAddr> = snapshot
            .iter()
            .flat_map(|s| s.listeners.iter())
            .filter_map(|(name, l)| Some((name.clone(), l.bind?)))
            .collect();
        let gone: Vec<String> = serving
            .iter()
            .filter(|(name, s)| wanted.get(*name) != Some(&s.addr))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(mut s) = serving.remove(&name) {
                info!(listener = %name, addr = %s.addr, "gateway listener closed");
                s.task.abort();
                // Its socket is closed before another listener binds the port again.
                let _ = (&mut s.task).await;
            }
        }
        warned.retain(|name, _| wanted.contains_key(name));
        for (name, addr) in &wanted {
            let Some(port) = names::parse_gateway_listener(name) else {
                continue;
            };
            if serving.contains_key(name) || shared.drain.is_draining() {
                continue;
            }
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    warned.remove(name);
                    info!(listener = %name, %addr, "gateway listener bound");
                    let task = tokio::spawn(serve(l, ListenerKind::Gateway(port), shared.clone()));
                    serving.insert(name.clone(), Serving { addr: *addr, task });
                }
                Err(e) => {
                    if warned.insert(name.clone(), *addr) == Some(*addr) {
                        debug!(listener = %name, %addr, error = %e, "binding a gateway listener, again");
                    } else {
                        warn!(listener = %name, %addr, error = %e, "binding a gateway listener; trying again every second");
                    }
                    failed += 1;
                }
            }
        }
        shared.metrics.gateway_listeners_unbound.set(failed);
        if let Some(s) = &snapshot {
            bound.store(true, Ordering::Release);
            shared.edge_tls.retain(s);
        }
        drop(snapshot);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)), if failed > 0 => {}
        }
    }
}

/// A gateway's HTTPS port: the TLS server name the client asks for picks the filter chain,
/// whose certificates the handshake then presents, and its ALPN the HTTP version.
pub(super) async fn edge(
    stream: TcpStream,
    at: Chain,
    snapshot: Arc<Snapshot>,
    shared: &Arc<Shared>,
) {
    let deadline = tokio::time::Instant::now() + TLS_HANDSHAKE_TIMEOUT;
    let io = PrefixedIo::new(BytesMut::new(), stream).with_idle_timeout(shared.config.idle_timeout);
    let hello = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let start = match tokio::time::timeout_at(deadline, hello).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            debug!(error = %e, "reading a TLS ClientHello");
            return;
        }
        Err(_) => {
            debug!("no TLS ClientHello in time");
            return;
        }
    };
    // The config of now: a ClientHello may take its time, and the certificates be rotated.
    let snapshot = shared.store.load().unwrap_or(snapshot);
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let chosen = snapshot
        .listeners
        .get(&*at.kind.xds_name())
        .and_then(|l| l.by_server_name(sni.as_deref()))
        .and_then(|c| Some((c.name.clone(), c.filter.clone(), c.edge_tls.clone()?)));
    let Some((name, filter, tls)) = chosen else {
        debug!(?sni, "no filter chain takes this TLS server name; closing");
        return;
    };
    let certs: Vec<Arc<ServerCert>> = tls
        .certificates
        .iter()
        .filter_map(|n| snapshot.secrets.get(n).cloned())
        .collect();
    if certs.is_empty() {
        warn!(chain = %name, certificates = ?tls.certificates, ?sni, "none of the chain's certificates has arrived; closing");
        return;
    }
    // A client that offers none of the chain's protocols goes on without ALPN, as Envoy lets
    // it (rustls would end the handshake).
    let offered: Option<Vec<Vec<u8>>> = hello.alpn().map(|a| a.map(<[u8]>::to_vec).collect());
    let overlap = offered.as_ref().is_none_or(|o| {
        tls.alpn
            .iter()
            .any(|p| o.iter().any(|c| c.as_slice() == p.as_bytes()))
    });
    let tls = if overlap {
        tls
    } else {
        Arc::new(EdgeTls {
            alpn: Vec::new(),
            ..(*tls).clone()
        })
    };
    let generation = snapshot.generation;
    drop(snapshot);
    let config = match shared.edge_tls.config(&tls, certs, generation) {
        Ok(c) => c,
        Err(e) => {
            warn!(chain = %name, certificates = ?tls.certificates, error = %e, "a gateway's TLS server config cannot be made; closing");
            return;
        }
    };
    let stream = match tokio::time::timeout_at(deadline, start.into_stream(config)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, ?sni, chain = %name, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(?sni, chain = %name, "TLS handshake timed out");
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    run_filter(&filter, stream, Chain { name, h2, ..at }, None, shared).await;
}

/// The TLS server configs of a gateway's chains, one per chain's TLS settings (certificate
/// names and ALPN protocols), made again when one of its certificates changes: a config's
/// sessions resume only under the certificates they began with, so once a certificate is
/// rotated every new connection's handshake presents the new one. Those of chains no longer
/// in the config (and their keys) go with the next config.
#[derive(Debug, Default)]
pub struct EdgeConfigs(Mutex<HashMap<EdgeTls, EdgeConfig>>);

#[derive(Debug)]
struct EdgeConfig {
    /// The digests of the certificates' chains, in the chain's order.
    chains: Vec<String>,
    /// The config generation the certificates came from: an older one never replaces it.
    generation: u64,
    config: Arc<rustls::ServerConfig>,
}

impl EdgeConfigs {
    fn config(
        &self,
        tls: &EdgeTls,
        certs: Vec<Arc<ServerCert>>,
        generation: u64,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let chains: Vec<String> = certs.iter().map(|c| c.chain.clone()).collect();
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = held.get(tls);
        if let Some(c) = current.filter(|c| c.chains == chains) {
            return Ok(c.config.clone());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth();
        let mut config = builder.with_cert_resolver(Arc::new(EdgeCerts(
            certs.into_iter().map(|c| c.key.clone()).collect(),
        )));
        config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let config = Arc::new(config);
        if current.is_none_or(|c| c.generation <= generation) {
            held.insert(
                tls.clone(),
                EdgeConfig {
                    chains,
                    generation,
                    config: config.clone(),
                },
            );
        }
        Ok(config)
    }

    /// Keeps only the configs of chains `snapshot` still has.
    fn retain(&self, snapshot: &Snapshot) {
        let live: HashSet<&EdgeTls> = snapshot
            .listeners
            .values()
            .flat_map(|l| l.chains.iter().chain(&l.default_chain))
            .filter_map(|c| c.edge_tls.as_deref())
            .collect();
        let mut held = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|tls, _| {
            live.contains(tls)
                || (tls.alpn.is_empty() && live.iter().any(|l| l.certificates == tls.certificates))
        });
    }
}

/// A chain's certificates: the first whose key can sign with a scheme the client offers (an
/// ECDSA and an RSA certificate serve old and new clients alike).
#[derive(Debug)]
struct EdgeCerts(Vec<Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for EdgeCerts {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let schemes = hello.signature_schemes();
        self.0
            .iter()
            .find(|c| c.key.choose_scheme(schemes).is_some())
            .cloned()
    }
}
