//! The proxy's mesh identity: its SVID from mesh-ca (kept fresh by
//! [`mesh_api::tls::renew::SvidClient`]), and the TLS acceptor and connectors built on it. The
//! configs read the current SVID and bundle at each handshake, so a renewal or a root rotation
//! needs no reconfiguration. An expired SVID is never presented: mesh TLS fails closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mesh_api::SpiffeId;
use mesh_api::svid::Role;
use mesh_api::tls::renew::{SvidClient, SvidSettings};
use mesh_api::tls::{ALPN_H2, ALPN_HTTP1, Identity, Refusal};
use tracing::warn;

pub use mesh_api::tls::renew::RenewalStatus;

use crate::config::Config;
use crate::metrics::{Direction, Metrics, TlsRefusedLabels};

/// What an upstream mesh TLS connection offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http1,
    /// Opaque TCP: no ALPN.
    None,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(String);

/// Mesh TLS for one proxy.
pub struct MeshTls {
    pub id: SpiffeId,
    pub identity: Arc<Identity>,
    svid: Arc<SvidClient>,
    server: tokio_rustls::TlsAcceptor,
    clients: Mutex<HashMap<(SpiffeId, Alpn), tokio_rustls::TlsConnector>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn refusal_hook(metrics: Arc<Metrics>) -> mesh_api::tls::RefusalHook {
    Box::new(move |role: Role, r: &Refusal| {
        let direction = match role {
            Role::Client => Direction::inbound,
            Role::Server => Direction::outbound,
        };
        metrics
            .tls_refused
            .get_or_create(&TlsRefusedLabels {
                direction,
                reason: r.reason,
            })
            .inc();
        warn!(?direction, reason = r.reason, detail = %r.detail, "peer certificate refused");
    })
}

impl MeshTls {
    /// Reads `--ca-root`; the SVID comes later, from [`MeshTls::run`].
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, IdentityError> {
        let err = |e: String| IdentityError(e);
        let id = config.spiffe_id().map_err(|e| err(e.to_string()))?;
        let ca_root = config
            .ca_root
            .clone()
            .ok_or_else(|| err("--ca-root is required".into()))?;
        let ca_addr = config
            .ca_addr
            .clone()
            .ok_or_else(|| err("--ca-addr is required".into()))?;
        let identity = Identity::new(
            &config.trust_domain,
            SvidClient::read_root(&ca_root).map_err(err)?,
            refusal_hook(metrics.clone()),
        );
        let (renewed, failed) = (metrics.clone(), metrics.clone());
        let svid = SvidClient::new(
            SvidSettings {
                id: id.clone(),
                ca_addr,
                ca_root,
                token_file: config.ca_token_file.clone(),
                lifetime: config.cert_lifetime,
                dns_names: Vec::new(),
            },
            identity.clone(),
            Box::new(move |issued| {
                renewed.svid_renewals.inc();
                let secs = issued
                    .current
                    .not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                renewed
                    .svid_expiry
                    .set(i64::try_from(secs).unwrap_or(i64::MAX));
            }),
            Box::new(move |_| {
                failed.svid_renewal_failures.inc();
            }),
        )
        .map_err(err)?;
        let server = identity.server_config().map_err(|e| err(e.to_string()))?;
        Ok(Arc::new(Self {
            id,
            identity,
            svid,
            server: tokio_rustls::TlsAcceptor::from(server),
            clients: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.server
    }

    /// A connector that presents this proxy's SVID and accepts only `expected` as the server.
    /// Kept per identity, so TLS sessions are resumed.
    pub fn connector(&self, expected: &SpiffeId, alpn: Alpn) -> Option<tokio_rustls::TlsConnector> {
        let key = (expected.clone(), alpn);
        let mut clients = self.clients.lock().ok()?;
        if let Some(c) = clients.get(&key) {
            return Some(c.clone());
        }
        let protos: &[&[u8]] = match alpn {
            Alpn::H2 => &[ALPN_H2],
            Alpn::Http1 => &[ALPN_HTTP1],
            Alpn::None => &[],
        };
        let config = self
            .identity
            .client_config(vec![expected.clone()], protos, true)
            .ok()?;
        let connector = tokio_rustls::TlsConnector::from(config);
        // Identities come and go with endpoints; a bounded cache forgets them.
        if clients.len() >= 4096 {
            clients.clear();
        }
        clients.insert(key, connector.clone());
        Some(connector)
    }

    /// Counts a finished mesh TLS handshake.
    pub fn handshake_done(&self, direction: Direction, ok: bool) {
        let labels = crate::metrics::TlsLabels { direction };
        if ok {
            self.metrics.tls_handshakes.get_or_create(&labels).inc();
        } else {
            self.metrics
                .tls_handshake_failures
                .get_or_create(&labels)
                .inc();
        }
    }

    /// The TLS client config for xDS: this proxy's SVID, and the controller's identity
    /// (`.../ns/mesh-system/sa/mesh-controller`) expected.
    pub fn controller_client(&self) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        use mesh_api::consts::identity as ids;
        let controller = SpiffeId::workload(
            self.identity.trust_domain(),
            ids::SYSTEM_NAMESPACE,
            ids::CONTROLLER_SERVICE_ACCOUNT,
        )
        .map_err(|e| IdentityError(e.to_string()))?;
        self.identity
            .client_config(vec![controller], &[ALPN_H2], true)
            .map_err(|e| IdentityError(e.to_string()))
    }

    pub fn status(&self) -> RenewalStatus {
        self.svid.status()
    }

    /// Gets an SVID, then keeps renewing it. Never returns.
    pub async fn run(self: Arc<Self>) {
        self.svid.clone().run().await;
    }
}
