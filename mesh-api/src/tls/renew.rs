//! Getting and renewing an SVID from mesh-ca, for any workload of the mesh (proxies, the
//! controller): an ECDSA P-256 key made in memory, a CSR for the workload's SPIFFE ID, the
//! answer installed in an [`Identity`]. Renewal comes at 50-70 % of the life, with a fresh key.
//! While the CA is away the valid SVID is kept and requests are retried with backoff.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tracing::{error, info, warn};

use super::{ALPN_H2, Bundle, Current, Identity};
use crate::backoff::Backoff;
use crate::ca_proto::certificate_service_client::CertificateServiceClient;
use crate::ca_proto::{AUTHORIZATION, CreateCertificateRequest};
use crate::consts::identity as ids;
use crate::spiffe::SpiffeId;

/// A fresh ECDSA P-256 key, in memory, and a CSR (DER) for `id` and `dns_names`.
pub fn key_and_csr(
    id: &SpiffeId,
    dns_names: &[String],
) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    for d in dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(d.as_str().try_into()?));
    }
    let csr = params.serialize_request(&key)?.der().to_vec();
    Ok((key, csr))
}

/// Where and how a workload gets its SVID.
#[derive(Clone, Debug)]
pub struct SvidSettings {
    pub id: SpiffeId,
    /// mesh-ca, `host:port`.
    pub ca_addr: String,
    /// PEM root(s) the CA's own certificate chains to.
    pub ca_root: PathBuf,
    /// The token proving the identity; read again at every renewal.
    pub token_file: PathBuf,
    /// Lifetime to ask for; zero: the CA's default.
    pub lifetime: Duration,
    /// DNS names to ask for too (the CA grants only `ACCOUNT.NAMESPACE.svc`).
    pub dns_names: Vec<String>,
}

/// For status pages (`/config_dump`).
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
    /// SHA-256 of the root the certificate chains to (the last of the chain the CA sent).
    pub issuer_root_sha256: Option<String>,
}

/// What one renewal installed: the SVID, its private key (PKCS#8 DER) and the trust bundle
/// the CA sent, for an agent that hands them to another process (Envoy's SDS files).
pub struct Issued<'a> {
    pub current: &'a Current,
    pub key_pkcs8: &'a [u8],
    pub roots: &'a [CertificateDer<'static>],
}

impl std::fmt::Debug for Issued<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Issued")
            .field("current", self.current)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

/// Called after each renewal, or each failed attempt.
pub type RenewedHook = Box<dyn Fn(&Issued<'_>) + Send + Sync>;
pub type FailedHook = Box<dyn Fn(&str) + Send + Sync>;

/// Keeps an [`Identity`] supplied with a valid SVID.
pub struct SvidClient {
    settings: SvidSettings,
    identity: Arc<Identity>,
    /// Trusts `ca_root` and the roots of the last bundle received, to reach the CA.
    ca_trust: Arc<Identity>,
    ca_root: Bundle,
    status: Mutex<RenewalStatus>,
    on_renewed: RenewedHook,
    on_failed: FailedHook,
}

impl std::fmt::Debug for SvidClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidClient")
            .field("id", &self.settings.id)
            .field("ca_addr", &self.settings.ca_addr)
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl SvidClient {
    /// Reads the CA root file; the SVID comes from [`SvidClient::run`]. `identity` should
    /// start with the same roots ([`SvidClient::read_root`]).
    pub fn new(
        settings: SvidSettings,
        identity: Arc<Identity>,
        on_renewed: RenewedHook,
        on_failed: FailedHook,
    ) -> Result<Arc<Self>, String> {
        let ca_root = Self::read_root(&settings.ca_root)?;
        let ca_trust = Identity::new(
            identity.trust_domain(),
            ca_root.clone(),
            Box::new(
                |_, r| warn!(reason = r.reason, detail = %r.detail, "mesh-ca's certificate refused"),
            ),
        );
        Ok(Arc::new(Self {
            settings,
            identity,
            ca_trust,
            ca_root,
            status: Mutex::new(RenewalStatus::default()),
            on_renewed,
            on_failed,
        }))
    }

    /// The roots in a PEM file; errors name the file.
    pub fn read_root(path: &std::path::Path) -> Result<Bundle, String> {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Bundle::from_pem(&pem, &path.display().to_string())
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
    pub async fn run(self: Arc<Self>) {
        let td = self.identity.trust_domain().to_string();
        let ca_id = match SpiffeId::workload(&td, ids::SYSTEM_NAMESPACE, ids::CA_SERVICE_ACCOUNT) {
            Ok(id) => id,
            Err(e) => {
                error!(error = %e, "the CA's identity in this trust domain is invalid");
                return;
            }
        };
        let ca_client = match self.ca_trust.client_config(vec![ca_id], &[ALPN_H2], false) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "TLS client config for the CA");
                return;
            }
        };
        let channel = super::grpc::channel(
            self.settings.ca_addr.clone(),
            ca_client,
            Duration::from_secs(5),
        );
        let mut client = CertificateServiceClient::new(channel);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let asked_at = SystemTime::now();
            match self.renew(&mut client).await {
                Ok(not_after) => {
                    backoff.reset();
                    // 50-70 % of the life as received (the CA backdates notBefore).
                    let life = not_after
                        .duration_since(asked_at)
                        .unwrap_or(Duration::from_secs(1));
                    let wait = life.mul_f64(rand::random_range(0.5..0.7));
                    self.note(|s| s.next_renewal = Some(unix(SystemTime::now() + wait)));
                    tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
                }
                Err(e) => {
                    (self.on_failed)(&e);
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
    ) -> Result<SystemTime, String> {
        let s = &self.settings;
        let token = std::fs::read_to_string(&s.token_file)
            .map_err(|e| format!("token file {}: {e}", s.token_file.display()))?;
        let (key, csr) = key_and_csr(&s.id, &s.dns_names).map_err(|e| format!("CSR: {e}"))?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_seconds: s.lifetime.as_secs(),
        });
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            format!(
                "token file {}: not a valid header value",
                s.token_file.display()
            )
        })?;
        req.metadata_mut().insert(AUTHORIZATION, value);
        req.set_timeout(Duration::from_secs(10));
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|st| format!("CA: {:?}: {}", st.code(), st.message()))?
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
        let key_pkcs8 = key.serialize_der();
        let secret = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.clone()));
        let current = self
            .identity
            .install(chain, secret, bundle, SystemTime::now())?;
        // The CA may be re-issued from a new root: trust what it says, and the configured root.
        let sent_roots = roots.clone();
        let mut ca_roots = roots;
        for r in self.ca_root.roots() {
            if !ca_roots.contains(r) {
                ca_roots.push(r.clone());
            }
        }
        if let Ok(b) = Bundle::new(ca_roots) {
            self.ca_trust.set_bundle(b);
        }
        let roots = self.identity.bundle().roots().len();
        self.note(|st| {
            st.renewals += 1;
            st.last_error = None;
            st.not_before = Some(unix(current.not_before));
            st.not_after = Some(unix(current.not_after));
            st.roots = roots;
            st.issuer_root_sha256 = current.chain.last().map(|c| super::fingerprint(c));
        });
        (self.on_renewed)(&Issued {
            current: &current,
            key_pkcs8: &key_pkcs8,
            roots: &sent_roots,
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
