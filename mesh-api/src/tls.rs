//! Mesh TLS: a workload's current SVID and trust bundle, both swappable at any moment, and
//! rustls configs built on them. Every peer certificate goes through [`Identity::verify`]:
//! first the SVID rules ([`check_leaf`]), then the chain to one of the bundle's roots, then
//! the identity the caller expects. A refusal has a reason for logs and metrics, reported to
//! the hook given to [`Identity::new`]. Server names play no part: peers are named by their
//! SPIFFE ID, never by DNS.

#[cfg(feature = "grpc-tls")]
pub mod grpc;
#[cfg(feature = "ca-client")]
pub mod renew;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::spiffe::SpiffeId;
use crate::svid::{Role, SvidError, check_leaf};

/// ALPN of mesh HTTP/2 and HTTP/1.1; a mesh TLS connection without ALPN carries opaque TCP.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a peer certificate was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{detail}")]
pub struct Refusal {
    /// Short label for metrics: `expired`, `untrusted_root`, `wrong_identity`, ...
    pub reason: &'static str,
    pub detail: String,
}

impl From<SvidError> for Refusal {
    fn from(e: SvidError) -> Self {
        Refusal {
            reason: e.reason(),
            detail: e.to_string(),
        }
    }
}

/// Called for every refused peer certificate: the side that checked it, and why.
pub type RefusalHook = Box<dyn Fn(Role, &Refusal) + Send + Sync>;

/// Roots a workload trusts.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl Bundle {
    /// A bundle of DER roots; one that is not a usable root certificate is an error naming it.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, String> {
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(i, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("trust bundle root #{i}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { roots, anchors })
    }

    /// Reads PEM certificates (a `ca.crt` or a bundle file).
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, String> {
        Self::new(certs_from_pem(pem, what)?)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// A certificate's SHA-256 fingerprint, lowercase hex: how roots are named in status output.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The DER certificates in a PEM text; `what` names it in errors.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    for (i, block) in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
        let block = block.map_err(|e| format!("{what}: PEM block #{i}: {e}"))?;
        if block.label == "CERTIFICATE" {
            out.push(CertificateDer::from(block.contents));
        }
    }
    if out.is_empty() {
        return Err(format!("{what}: no CERTIFICATE in it"));
    }
    Ok(out)
}

/// A server certificate of its own (a gateway's, from a `kubernetes.io/tls` Secret): the PEM
/// chain, leaf first, and the PEM private key of the leaf; `names` are the two fields' names
/// in errors. RSA and ECDSA keys only, what Envoy serves too.
pub fn server_certified_key(
    cert_pem: &str,
    key_pem: &str,
    names: [&str; 2],
) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    let [crt, key_name] = names;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{crt}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{crt} holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{key_name}: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{key_name}: {e}"))?;
    use rustls::SignatureAlgorithm as A;
    if !matches!(signer.algorithm(), A::RSA | A::ECDSA) {
        return Err(format!(
            "{key_name}: a {:?} key; a gateway's certificate needs an RSA or ECDSA key",
            signer.algorithm()
        ));
    }
    let certified = CertifiedKey::new(certs, signer);
    if let Err(rustls::Error::InconsistentKeys(_)) = certified.keys_match() {
        return Err(format!(
            "{key_name} is not the key of the first certificate in {crt}"
        ));
    }
    Ok(certified)
}

/// The SVID a workload holds now.
#[derive(Debug, Clone)]
pub struct Current {
    pub id: SpiffeId,
    pub not_after: SystemTime,
    pub not_before: SystemTime,
    pub chain: Vec<CertificateDer<'static>>,
}

/// A workload's identity: its SVID and key (absent until the CA answered), and its roots.
pub struct Identity {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    bundle: ArcSwap<Bundle>,
    key: ArcSwapOption<CertifiedKey>,
    current: ArcSwapOption<Current>,
    on_refused: RefusalHook,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain)
            .field(
                "current",
                &self.current.load().as_ref().map(|c| c.id.clone()),
            )
            .field("roots", &self.bundle.load().roots.len())
            .finish_non_exhaustive()
    }
}

fn unix_time(t: UnixTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.as_secs())
}

impl Identity {
    pub fn new(trust_domain: &str, bundle: Bundle, on_refused: RefusalHook) -> Arc<Self> {
        Arc::new(Self {
            trust_domain: trust_domain.to_string(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            bundle: ArcSwap::from_pointee(bundle),
            key: ArcSwapOption::empty(),
            current: ArcSwapOption::empty(),
            on_refused,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Installs a new SVID (leaf first) with its PKCS#8 key, and the bundle that came with it.
    /// The leaf must itself pass the SVID checks and chain to the new bundle.
    pub fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Bundle,
        now: SystemTime,
    ) -> Result<Current, String> {
        let leaf = chain
            .first()
            .ok_or("the CA sent an empty certificate chain")?;
        let id = check_leaf(leaf, Role::Server, &self.trust_domain, None, now)
            .map_err(|e| format!("the CA's certificate: {e}"))?;
        let (not_before, not_after) = validity(leaf)?;
        verify_chain(
            &self.provider,
            &bundle,
            leaf,
            &chain[1..],
            now,
            Role::Server,
        )
        .map_err(|e| format!("the CA's certificate: {}", e.detail))?;
        let signer = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("private key: {e}"))?;
        let certified = CertifiedKey::new(chain.clone(), signer);
        let current = Current {
            id,
            not_after,
            not_before,
            chain,
        };
        self.bundle.store(Arc::new(bundle));
        self.key.store(Some(Arc::new(certified)));
        self.current.store(Some(Arc::new(current.clone())));
        Ok(current)
    }

    /// Replaces the roots alone (a CA connection that brought a bundle but no new SVID).
    pub fn set_bundle(&self, bundle: Bundle) {
        self.bundle.store(Arc::new(bundle));
    }

    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.load_full()
    }

    pub fn current(&self) -> Option<Arc<Current>> {
        self.current.load_full()
    }

    /// The SVID, if there is one and it has not expired: an expired one is never presented,
    /// so mesh TLS fails closed.
    fn key_now(&self) -> Option<Arc<CertifiedKey>> {
        let current = self.current.load();
        let current = current.as_ref()?;
        if SystemTime::now() > current.not_after {
            return None;
        }
        self.key.load_full()
    }

    /// Whether a valid SVID is held now.
    pub fn has_valid_svid(&self) -> bool {
        self.key_now().is_some()
    }

    /// Checks a peer certificate, leaf first: the SVID rules, the chain to a trusted root,
    /// then that it is one of `expected` (unless empty). Reports refusals to the hook.
    pub fn verify(
        &self,
        role: Role,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: &[SpiffeId],
        now: SystemTime,
    ) -> Result<SpiffeId, Refusal> {
        let checked = self.check(role, end_entity, intermediates, expected, now);
        if let Err(r) = &checked {
            (self.on_refused)(role, r);
        }
        checked
    }

    fn check(
        &self,
        role: Role,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: &[SpiffeId],
        now: SystemTime,
    ) -> Result<SpiffeId, Refusal> {
        let id = check_leaf(end_entity, role, &self.trust_domain, None, now)?;
        let bundle = self.bundle.load();
        verify_chain(
            &self.provider,
            &bundle,
            end_entity,
            intermediates,
            now,
            role,
        )?;
        if !expected.is_empty() && !expected.contains(&id) {
            let want = expected
                .iter()
                .map(SpiffeId::as_str)
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(SvidError::WrongIdentity {
                got: id.to_string(),
                want,
            }
            .into());
        }
        Ok(id)
    }

    /// A server config for mesh TLS: TLS 1.3, a client SVID required, ALPN h2 and http/1.1
    /// (a client offering neither speaks opaque TCP).
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = self
            .builder_server()?
            .with_client_cert_verifier(Arc::new(ClientVerifier {
                identity: self.clone(),
            }))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(Arc::new(config))
    }

    /// A server config that asks no client certificate (the CA's own service, where callers
    /// prove themselves with a token instead).
    pub fn server_config_no_client_auth(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut config = self
            .builder_server()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    fn builder_server(
        &self,
    ) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, rustls::Error>
    {
        rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
    }

    /// A client config for mesh TLS to a peer that must be one of `expected` (any SVID of the
    /// trust domain if empty), presenting this workload's SVID (if `present`) and offering
    /// `alpn`.
    pub fn client_config(
        self: &Arc<Self>,
        expected: Vec<SpiffeId>,
        alpn: &[&[u8]],
        present: bool,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                identity: self.clone(),
                expected,
            }));
        let mut config = if present {
            builder.with_client_cert_resolver(Arc::new(Resolver(self.clone())))
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    fn signature_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
}

/// The leaf's validity period.
fn validity(der: &[u8]) -> Result<(SystemTime, SystemTime), String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("certificate does not parse: {e}"))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// The SPIFFE ID of a certificate that was already verified (the peer of a finished
/// handshake).
pub fn peer_id(der: &[u8]) -> Option<SpiffeId> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => SpiffeId::parse(u).ok(),
        _ => None,
    })
}

fn verify_chain(
    provider: &CryptoProvider,
    bundle: &Bundle,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: SystemTime,
    role: Role,
) -> Result<(), Refusal> {
    let refused = |reason, detail: String| Refusal { reason, detail };
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| refused("parse", format!("certificate does not parse: {e}")))?;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let usage = match role {
        Role::Client => webpki::KeyUsage::client_auth(),
        Role::Server => webpki::KeyUsage::server_auth(),
    };
    cert.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &bundle.anchors,
        intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        // No root by that name, or one by that name that did not sign it (roots of a
        // rotation may share a name): either way, no trusted root.
        webpki::Error::UnknownIssuer
        | webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => refused(
            "untrusted_root",
            format!(
                "certificate does not chain to any of the {} trusted root(s) ({e})",
                bundle.anchors.len()
            ),
        ),
        other => refused("chain", format!("certificate chain: {other}")),
    })
}

fn refused(r: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(r),
    )))
}

/// The refusal inside a handshake error, if a mesh verifier made it.
pub fn refusal_of(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) =
            err.downcast_ref::<rustls::Error>()
        {
            return o.0.downcast_ref::<Refusal>().cloned();
        }
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        cur = err.source();
    }
    None
}

/// Presents the current SVID on both sides.
#[derive(Debug)]
struct Resolver(Arc<Identity>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.key_now()
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.key_now()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server verifier that accepts any certificate but still checks the handshake's signatures
/// with `provider`'s algorithms: for HTTPS probes of an app (the kubelet does not verify
/// either) and for tests about what a server refuses. Never for mesh TLS.
#[derive(Debug)]
pub struct AnyServerCert(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The handshake signature checks both verifiers share: TLS 1.3 only, with the provider's
/// algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("mesh TLS is TLS 1.3 only".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.identity.tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.identity.signature_schemes()
        }
    };
}

#[derive(Debug)]
struct ClientVerifier {
    identity: Arc<Identity>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.identity
            .verify(Role::Client, end_entity, intermediates, &[], unix_time(now))
            .map(|_| ClientCertVerified::assertion())
            .map_err(refused)
    }

    signature_checks!();
}

#[derive(Debug)]
struct ServerVerifier {
    identity: Arc<Identity>,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.identity
            .verify(
                Role::Server,
                end_entity,
                intermediates,
                &self.expected,
                unix_time(now),
            )
            .map(|_| ServerCertVerified::assertion())
            .map_err(refused)
    }

    signature_checks!();
}

#[cfg(test)]
#[path = "tls_tests.rs"]
mod tests;
