//! The certificate service: authenticate the caller, sign its CSR for the identity it proved,
//! answer with the chain and the trust bundle. Also the CA's own serving certificate, issued
//! from the same authority so workloads can check they reach the real CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mesh_api::SpiffeId;
use mesh_api::ca_proto::certificate_service_server::CertificateService;
use mesh_api::ca_proto::{AUTHORIZATION, CreateCertificateRequest, CreateCertificateResponse};
use mesh_api::consts::identity;
use mesh_api::tls::{Bundle, Identity};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::authority::{Authority, CaError};
use crate::metrics::CaMetrics;

/// The CA's running state, shared by the gRPC service, the reloader and the admin server.
#[derive(Debug)]
pub struct Ca {
    authority: ArcSwap<Authority>,
    pub auth: Authenticator,
    pub metrics: CaMetrics,
    pub default_lifetime: Duration,
    /// The CA's own SVID, presented to workloads.
    pub serving: Arc<Identity>,
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

impl Ca {
    pub fn new(
        authority: Authority,
        auth: Authenticator,
        default_lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let bundle = Bundle::new(authority.bundle().to_vec()).map_err(CaError::Bundle)?;
        let serving = Identity::new(
            authority.trust_domain(),
            bundle,
            Box::new(|_, _| {}), // The CA checks no peer certificates.
        );
        let ca = Arc::new(Self {
            authority: ArcSwap::from_pointee(authority),
            auth,
            metrics: CaMetrics::default(),
            default_lifetime,
            serving,
        });
        ca.observe();
        ca.issue_serving()?;
        Ok(ca)
    }

    pub fn authority(&self) -> Arc<Authority> {
        self.authority.load_full()
    }

    /// The CA's own SPIFFE ID.
    pub fn id(&self) -> Result<SpiffeId, CaError> {
        let td = self.authority.load().trust_domain().to_string();
        SpiffeId::workload(
            &td,
            identity::SYSTEM_NAMESPACE,
            identity::CA_SERVICE_ACCOUNT,
        )
        .map_err(|e| CaError::Identity(e.to_string()))
    }

    /// Swaps in another authority (a reloaded directory: a new signing key, roots added or
    /// removed) and re-issues the CA's own certificate from it.
    pub fn replace(&self, authority: Authority) -> Result<(), CaError> {
        self.authority.store(Arc::new(authority));
        self.observe();
        self.issue_serving()
    }

    fn observe(&self) {
        let a = self.authority.load();
        self.metrics
            .roots
            .set(i64::try_from(a.bundle().len()).unwrap_or(i64::MAX));
        self.metrics
            .signing_not_after
            .set(unix_secs(a.signing_not_after()));
    }

    /// Issues the CA's serving certificate (a fresh key, the default lifetime). Besides its
    /// SPIFFE ID it names its Service, `mesh-ca.NAMESPACE.svc` (the address sidecars dial), so
    /// that standard TLS clients can check it by name.
    pub fn issue_serving(&self) -> Result<(), CaError> {
        let id = self.id()?;
        let service = format!(
            "{}.{}.svc",
            identity::CA_SERVICE_ACCOUNT,
            identity::SYSTEM_NAMESPACE
        );
        let (key, csr) =
            mesh_api::tls::renew::key_and_csr(&id, &[service]).map_err(CaError::Key)?;
        let authority = self.authority.load();
        let now = SystemTime::now();
        let issued = authority.sign(&csr, &id, self.default_lifetime, now)?;
        let bundle = Bundle::new(authority.bundle().to_vec()).map_err(CaError::Bundle)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        self.serving
            .install(issued.chain, key, bundle, now)
            .map_err(CaError::Identity)?;
        Ok(())
    }

    /// When the CA's own certificate should be renewed: half its life from now.
    pub fn serving_renew_in(&self) -> Duration {
        self.serving
            .current()
            .and_then(|c| {
                let life = c.not_after.duration_since(c.not_before).ok()?;
                let renew_at = c.not_before + life / 2;
                Some(
                    renew_at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO),
                )
            })
            .unwrap_or(Duration::from_secs(1))
    }
}

/// The gRPC face of [`Ca`].
#[derive(Debug, Clone)]
pub struct CaService(pub Arc<Ca>);

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let ca = &self.0;
        let token = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let id = match ca.auth.authenticate(token.as_deref()).await {
            Ok(id) => id,
            Err(e) => {
                ca.metrics.refuse(e.reason());
                warn!(error = %e, "certificate request refused");
                return Err(match e {
                    crate::auth::AuthError::Backend(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                });
            }
        };
        let req = request.into_inner();
        let lifetime = match req.validity_seconds {
            0 => ca.default_lifetime,
            s => Duration::from_secs(s),
        };
        let authority = ca.authority.load();
        let issued = match authority.sign(&req.csr, &id, lifetime, SystemTime::now()) {
            Ok(i) => i,
            Err(e) => {
                let (reason, status) = match &e {
                    CaError::BadCsr(_) => ("bad_csr", Status::invalid_argument(e.to_string())),
                    CaError::CsrIdentity { .. } => (
                        "identity_mismatch",
                        Status::permission_denied(e.to_string()),
                    ),
                    CaError::TrustDomain { .. } => {
                        ("trust_domain", Status::permission_denied(e.to_string()))
                    }
                    _ => ("sign_failed", Status::internal(e.to_string())),
                };
                ca.metrics.refuse(reason);
                warn!(%id, error = %e, reason, "certificate request refused");
                return Err(status);
            }
        };
        ca.metrics.issued.inc();
        info!(%id, lifetime_s = lifetime.min(authority.max_lifetime()).as_secs(), "issued");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: authority.bundle().iter().map(|c| c.to_vec()).collect(),
            not_after: unix_secs(issued.not_after),
            spiffe_id: id.to_string(),
        }))
    }
}
