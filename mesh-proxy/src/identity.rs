//! The proxy's mesh identity: an ECDSA P-256 key made in memory, a CSR to mesh-ca, and the
//! SVID it returns, renewed at 50-70 % of its life. While the CA is away the proxy keeps its
//! valid SVID and retries with backoff; an expired SVID is never presented, so mesh TLS fails
//! closed. The TLS configs built here read the current SVID and bundle at each handshake, so a
//! renewal or a root rotation needs no reconfiguration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::SpiffeId;
use mesh_api::ca_proto::certificate_service_client::CertificateServiceClient;
use mesh_api::ca_proto::{AUTHORIZATION, CreateCertificateRequest};
use mesh_api::consts::identity as ids;
use mesh_api::svid::Role;
use mesh_api::tls::{ALPN_H2, ALPN_HTTP1, Bundle, Identity, Refusal};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::metrics::{Direction, Metrics, TlsRefusedLabels};
use crate::xds::client::Backoff;

/// What an upstream mesh TLS connection offers in ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    H2,
    Http1,
    /// Opaque TCP: no ALPN.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Bad(String),
}

/// Mesh TLS for one proxy.
pub struct MeshTls {
    pub id: SpiffeId,
    pub identity: Arc<Identity>,
    /// Trusts the roots of `--ca-root` and of the last bundle received, to reach the CA.
    ca_trust: Arc<Identity>,
    ca_root: Bundle,
    server: tokio_rustls::TlsAcceptor,
    clients: Mutex<HashMap<(SpiffeId, Alpn), tokio_rustls::TlsConnector>>,
    metrics: Arc<Metrics>,
    status: Mutex<RenewalStatus>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// For `/config_dump`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RenewalStatus {
    pub renewals: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Unix seconds.
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    pub next_renewal: Option<u64>,
    pub roots: usize,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
        let id = config
            .spiffe_id()
            .map_err(|e| IdentityError::Bad(e.to_string()))?;
        let path = config
            .ca_root
            .clone()
            .ok_or_else(|| IdentityError::Bad("--ca-root is required".into()))?;
        let pem = std::fs::read_to_string(&path).map_err(|source| IdentityError::File {
            path: path.clone(),
            source,
        })?;
        let ca_root =
            Bundle::from_pem(&pem, &path.display().to_string()).map_err(IdentityError::Bad)?;
        let identity = Identity::new(
            &config.trust_domain,
            ca_root.clone(),
            refusal_hook(metrics.clone()),
        );
        let ca_trust = Identity::new(
            &config.trust_domain,
            ca_root.clone(),
            refusal_hook(metrics.clone()),
        );
        let server = identity
            .server_config()
            .map_err(|e| IdentityError::Bad(e.to_string()))?;
        Ok(Arc::new(Self {
            id,
            identity,
            ca_trust,
            ca_root,
            server: tokio_rustls::TlsAcceptor::from(server),
            clients: Mutex::new(HashMap::new()),
            metrics,
            status: Mutex::new(RenewalStatus::default()),
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

    pub fn status(&self) -> RenewalStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn note(&self, f: impl FnOnce(&mut RenewalStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Gets an SVID, then keeps renewing it. Never returns.
    pub async fn run(self: Arc<Self>, config: Arc<Config>) {
        let ca_id = match SpiffeId::workload(
            &config.trust_domain,
            ids::SYSTEM_NAMESPACE,
            ids::CA_SERVICE_ACCOUNT,
        ) {
            Ok(id) => id,
            Err(e) => {
                error!(error = %e, "the CA's identity in this trust domain is invalid");
                return;
            }
        };
        let Some(target) = config.ca_addr.clone() else {
            return;
        };
        let ca_client = match self.ca_trust.client_config(vec![ca_id], &[ALPN_H2], false) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "TLS client config for the CA");
                return;
            }
        };
        let channel = mesh_api::tls::grpc::channel(target, ca_client, Duration::from_secs(5));
        let mut client = CertificateServiceClient::new(channel);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let asked_at = SystemTime::now();
            match self.renew(&mut client, &config).await {
                Ok(not_after) => {
                    backoff.reset();
                    // Renew at 50-70 % of the life as received (the CA backdates notBefore).
                    let life = not_after
                        .duration_since(asked_at)
                        .unwrap_or(Duration::from_secs(1));
                    let wait = life.mul_f64(rand::random_range(0.5..0.7));
                    self.note(|s| s.next_renewal = Some(unix(SystemTime::now() + wait)));
                    tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
                }
                Err(e) => {
                    self.metrics.svid_renewal_failures.inc();
                    self.note(|s| {
                        s.failures += 1;
                        s.last_error = Some(e.clone());
                    });
                    if self.identity.has_valid_svid() {
                        warn!(error = %e, "certificate renewal failed; keeping the current, still valid certificate");
                    } else {
                        error!(error = %e, "no valid certificate: mesh TLS is refused until the CA answers");
                    }
                    let wait = backoff.next_delay();
                    self.note(|s| s.next_renewal = Some(unix(SystemTime::now() + wait)));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One CSR to the CA; installs the answer. Returns the new SVID's expiry.
    async fn renew(
        &self,
        client: &mut CertificateServiceClient<tonic::transport::Channel>,
        config: &Config,
    ) -> Result<SystemTime, String> {
        let token = std::fs::read_to_string(&config.ca_token_file)
            .map_err(|e| format!("token file {}: {e}", config.ca_token_file.display()))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            self.id.as_str().try_into().map_err(|e| format!("{e}"))?,
        )];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| format!("CSR: {e}"))?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr: csr.der().to_vec(),
            validity_seconds: config.cert_lifetime.as_secs(),
        });
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            format!(
                "token file {}: not a valid header value",
                config.ca_token_file.display()
            )
        })?;
        req.metadata_mut().insert(AUTHORIZATION, value);
        req.set_timeout(Duration::from_secs(10));
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|s| format!("CA: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let chain: Vec<CertificateDer<'static>> = resp
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let roots: Vec<CertificateDer<'static>> = resp
            .trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let bundle = Bundle::new(roots.clone())?;
        let secret = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let current = self
            .identity
            .install(chain, secret, bundle, SystemTime::now())?;
        // The CA may be re-issued from a new root: trust what it says, and the configured root.
        let mut ca_roots = roots;
        for r in self.ca_root.roots() {
            if !ca_roots.contains(r) {
                ca_roots.push(r.clone());
            }
        }
        if let Ok(b) = Bundle::new(ca_roots) {
            self.ca_trust.set_bundle(b);
        }
        self.metrics.svid_renewals.inc();
        self.metrics
            .svid_expiry
            .set(i64::try_from(unix(current.not_after)).unwrap_or(i64::MAX));
        let roots = self.identity.bundle().roots().len();
        self.note(|s| {
            s.renewals += 1;
            s.last_error = None;
            s.not_before = Some(unix(current.not_before));
            s.not_after = Some(unix(current.not_after));
            s.roots = roots;
        });
        info!(
            id = %current.id,
            not_after = unix(current.not_after),
            roots,
            "certificate received"
        );
        Ok(current.not_after)
    }
}
