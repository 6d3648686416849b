//! The signing key and what it signs. An SVID carries exactly one URI SAN (the workload's
//! SPIFFE ID), CA=false, digitalSignature, and both serverAuth and clientAuth, so the same
//! certificate serves a proxy's inbound and outbound sides. The CA decides the identity: a CSR
//! naming any other one is refused, and one naming none gets the authenticated identity.

use std::time::{Duration, SystemTime};

use mesh_api::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate signing request does not parse or its signature is wrong: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR asks for {asked:?}, but the caller is {allowed}")]
    CsrIdentity { asked: Vec<String>, allowed: String },
    #[error("identity {id} is not in trust domain {trust_domain:?}")]
    TrustDomain { id: String, trust_domain: String },
    #[error("signing key or certificate: {0}")]
    Key(rcgen::Error),
    #[error("signing: {0}")]
    Sign(rcgen::Error),
    #[error("{path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    In {
        path: std::path::PathBuf,
        source: Box<CaError>,
    },
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("the private key does not belong to the signing certificate")]
    KeyMismatch,
    #[error("the CA's own identity: {0}")]
    Identity(String),
    #[error("{path}: must not be readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyMode { path: std::path::PathBuf, mode: u32 },
}

/// File names in a CA directory.
pub const CERT_FILE: &str = "ca.crt";
pub const KEY_FILE: &str = "ca.key";
/// Optional: more roots proxies should trust (PEM), the old or new root during a rotation.
pub const BUNDLE_FILE: &str = "trust-bundle.pem";

/// A signed SVID.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the signing certificate.
    pub chain: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// A certificate authority for one trust domain.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then any intermediates up to the root.
    chain: Vec<CertificateDer<'static>>,
    cert_pem: String,
    key_pem: String,
    /// Roots proxies trust: this one first, plus any kept during a rotation.
    bundle: Vec<CertificateDer<'static>>,
    max_lifetime: Duration,
    /// When the signing certificate expires.
    signing_not_after: SystemTime,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.bundle.len())
            .field("max_lifetime", &self.max_lifetime)
            .finish_non_exhaustive()
    }
}

/// Default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a generated root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are signed, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// A certificate's `notAfter` in Unix seconds (0 if it does not parse).
pub fn not_after_unix(der: &[u8]) -> i64 {
    <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(der)
        .map_or(0, |(_, c)| c.validity().not_after.timestamp())
}

fn file_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::File { path, source }
}

/// The certificates in a PEM text, in order.
fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|_| CaError::Key(rcgen::Error::CouldNotParseCertificate))?;
        if block.label == "CERTIFICATE" {
            out.push(CertificateDer::from(block.contents));
        }
    }
    if out.is_empty() {
        return Err(CaError::Key(rcgen::Error::CouldNotParseCertificate));
    }
    Ok(out)
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl Authority {
    /// A new self-signed root (ECDSA P-256) for `trust_domain`.
    pub fn generate(trust_domain: &str, now: SystemTime) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Key)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "mesh");
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mesh root {trust_domain} {:08x}", rand::random::<u32>()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(CaError::Key)?,
        )];
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(now + ROOT_LIFETIME);
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key).map_err(CaError::Key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem(), trust_domain)
    }

    /// A CA from PEM certificates and the PEM private key of the first (persisted, or plugged
    /// in). `cert_pem` is the signing certificate alone when it is a self-signed root, or the
    /// signing intermediate followed by the chain up to and including the root, which becomes
    /// the trust bundle.
    pub fn from_pem(cert_pem: &str, key_pem: &str, trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let chain = pem_certs(cert_pem)?;
        let (Some(signing), Some(root)) = (chain.first(), chain.last()) else {
            return Err(CaError::Key(rcgen::Error::CouldNotParseCertificate));
        };
        let (_, parsed) =
            <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(
                signing,
            )
            .map_err(|_| CaError::Key(rcgen::Error::CouldNotParseCertificate))?;
        // A key from another pair (a rotation caught half-written) would sign certificates
        // that chain nowhere.
        if *parsed.public_key().subject_public_key.data != *key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(signing, key).map_err(CaError::Key)?;
        let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
        let signing_not_after = std::time::UNIX_EPOCH + Duration::from_secs(secs);
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            bundle: vec![root.clone()],
            chain,
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            max_lifetime: DEFAULT_LIFETIME,
            signing_not_after,
        })
    }

    /// Loads the CA kept in `dir`: `ca.crt` (see [`Authority::from_pem`]), `ca.key` (which
    /// others must not be able to read), and, if present, `trust-bundle.pem` with more roots
    /// to trust.
    pub fn load(dir: &std::path::Path, trust_domain: &str) -> Result<Self, CaError> {
        use std::os::unix::fs::PermissionsExt;
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        let mode = std::fs::metadata(&key_path)
            .map_err(file_err(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode {
                path: key_path,
                mode: mode & 0o777,
            });
        }
        let cert = std::fs::read_to_string(&cert_path).map_err(file_err(&cert_path))?;
        let key = std::fs::read_to_string(&key_path).map_err(file_err(&key_path))?;
        let mut ca = Self::from_pem(&cert, &key, trust_domain).map_err(|e| CaError::In {
            path: cert_path,
            source: Box::new(e),
        })?;
        let bundle_path = dir.join(BUNDLE_FILE);
        if bundle_path.exists() {
            let pem = std::fs::read_to_string(&bundle_path).map_err(file_err(&bundle_path))?;
            let roots = pem_certs(&pem).map_err(|e| CaError::In {
                path: bundle_path,
                source: Box::new(e),
            })?;
            for root in roots {
                ca.trust_also(root);
            }
        }
        Ok(ca)
    }

    /// Loads the CA kept in `dir` ([`Authority::load`]), or generates a root and keeps it
    /// there, the key written with mode 0600.
    pub fn load_or_generate(
        dir: &std::path::Path,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if key_path.exists() {
            return Self::load(dir, trust_domain);
        }
        let ca = Self::generate(trust_domain, now)?;
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let mut key = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(file_err(&key_path))?;
        key.write_all(ca.key_pem.as_bytes())
            .map_err(file_err(&key_path))?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(file_err(&cert_path))?;
        Ok(ca)
    }

    /// Caps the lifetime any SVID gets.
    pub fn with_max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max;
        self
    }

    /// Adds a root proxies should trust too (rotation: old and new side by side).
    pub fn trust_also(&mut self, root: CertificateDer<'static>) {
        if !self.bundle.contains(&root) {
            self.bundle.push(root);
        }
    }

    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// When the signing certificate (root or intermediate) expires.
    pub fn signing_not_after(&self) -> SystemTime {
        self.signing_not_after
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root the signing chain ends at (what new certificates chain to).
    pub fn signing_root(&self) -> Option<&CertificateDer<'static>> {
        self.chain.last()
    }

    /// The roots proxies should trust.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The signing certificate and key, PEM, for persisting (the key file must be mode 0600).
    pub fn to_pem(&self) -> (&str, &str) {
        (&self.cert_pem, &self.key_pem)
    }

    /// Signs `csr` (DER) for `identity`, for `lifetime` capped at the maximum.
    pub fn sign(
        &self,
        csr: &[u8],
        identity: &SpiffeId,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        if identity.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                id: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let der = CertificateSigningRequestDer::from(csr.to_vec());
        let mut request =
            CertificateSigningRequestParams::from_der(&der).map_err(CaError::BadCsr)?;
        // The URI SAN must be the caller's identity (or absent). A DNS name is granted only
        // for the caller's own Service, `ACCOUNT.NAMESPACE.svc`: what the API server dials for
        // a webhook served by that account (the controller's injector).
        let own_service = identity
            .namespace_and_account()
            .map(|(ns, sa)| format!("{sa}.{ns}.svc"))
            .ok();
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        let mut refused = Vec::new();
        for san in &request.params.subject_alt_names {
            match san {
                SanType::URI(u) => uris.push(u.as_str().to_string()),
                SanType::DnsName(d) if own_service.as_deref() == Some(d.as_str()) => {
                    dns_names.push(d.clone());
                }
                SanType::DnsName(d) => refused.push(format!("DNS:{}", d.as_str())),
                other => refused.push(format!("{other:?}")),
            }
        }
        if !(uris.is_empty() || uris == [identity.as_str()]) || !refused.is_empty() {
            let mut asked = uris;
            asked.extend(refused);
            return Err(CaError::CsrIdentity {
                asked,
                allowed: match &own_service {
                    Some(svc) => format!("{identity} (and DNS:{svc})"),
                    None => identity.to_string(),
                },
            });
        }
        let lifetime = lifetime.min(self.max_lifetime);
        let not_after = now + lifetime;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            identity.as_str().try_into().map_err(CaError::Sign)?,
        )];
        params
            .subject_alt_names
            .extend(dns_names.into_iter().map(SanType::DnsName));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(serial());
        params.use_authority_key_identifier_extension = true;
        request.params = params;
        let leaf = request.signed_by(&self.issuer).map_err(CaError::Sign)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok(Issued { chain, not_after })
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use mesh_api::svid::{Role, check_leaf};
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_798_761_600)
    }

    fn csr(sans: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans
            .iter()
            .map(|s| SanType::URI((*s).try_into().expect("uri")))
            .collect();
        p.serialize_request(&key).expect("csr").der().to_vec()
    }

    #[test]
    fn a_dns_name_is_granted_only_for_the_callers_own_service() {
        let ca = Authority::generate("cluster.local", now()).expect("ca");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/mesh-system/sa/mesh-controller")
            .expect("id");
        let csr_with = |dns: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::default();
            p.subject_alt_names = vec![
                SanType::URI(id.as_str().try_into().expect("uri")),
                SanType::DnsName(dns.try_into().expect("dns")),
            ];
            p.serialize_request(&key).expect("csr").der().to_vec()
        };
        let issued = ca
            .sign(
                &csr_with("mesh-controller.mesh-system.svc"),
                &id,
                DEFAULT_LIFETIME,
                now(),
            )
            .expect("own service");
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("leaf");
        let sans = leaf
            .subject_alternative_name()
            .expect("extension")
            .expect("SANs")
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect::<Vec<_>>();
        assert!(
            sans.iter()
                .any(|n| n.contains("mesh-controller.mesh-system.svc")),
            "{sans:?}"
        );
        // Still a valid SVID for mesh TLS.
        check_leaf(
            &issued.chain[0],
            Role::Server,
            "cluster.local",
            Some(&id),
            now(),
        )
        .expect("an SVID");
        for other in [
            "mesh-ca.mesh-system.svc",
            "kubernetes.default.svc",
            "example.com",
        ] {
            let e = ca
                .sign(&csr_with(other), &id, DEFAULT_LIFETIME, now())
                .expect_err("another name");
            assert!(e.to_string().contains(&format!("DNS:{other}")), "{e}");
        }
    }

    #[test]
    fn signs_an_svid_that_passes_the_checks_and_chains_to_the_root() {
        let ca = Authority::generate("cluster.local", now()).expect("ca");
        let id = SpiffeId::parse(ID).expect("id");
        for asked in [&[ID][..], &[]] {
            let issued = ca
                .sign(&csr(asked), &id, DEFAULT_LIFETIME, now())
                .expect("signed");
            let leaf = &issued.chain[0];
            for role in [Role::Client, Role::Server] {
                let got = check_leaf(leaf, role, "cluster.local", Some(&id), now()).expect("valid");
                assert_eq!(got, id);
            }
            let (_, leaf) = X509Certificate::from_der(leaf).expect("leaf");
            let (_, root) = X509Certificate::from_der(&ca.bundle()[0]).expect("root");
            leaf.verify_signature(Some(root.public_key()))
                .expect("signed by the root");
            assert_eq!(leaf.issuer(), root.subject());
            assert_eq!(issued.not_after, now() + DEFAULT_LIFETIME);
        }
    }

    #[test]
    fn refuses_other_identities_and_caps_the_lifetime() {
        let ca = Authority::generate("cluster.local", now())
            .expect("ca")
            .with_max_lifetime(Duration::from_secs(3600));
        let id = SpiffeId::parse(ID).expect("id");
        let err = ca
            .sign(
                &csr(&["spiffe://cluster.local/ns/kube-system/sa/admin"]),
                &id,
                DEFAULT_LIFETIME,
                now(),
            )
            .expect_err("another identity");
        assert!(err.to_string().contains("kube-system"), "{err}");
        let err = ca
            .sign(
                &csr(&[ID, "spiffe://cluster.local/ns/default/sa/x"]),
                &id,
                DEFAULT_LIFETIME,
                now(),
            )
            .expect_err("two identities");
        assert!(matches!(err, CaError::CsrIdentity { .. }));
        let foreign = SpiffeId::parse("spiffe://other.domain/ns/default/sa/reviews").expect("id");
        assert!(matches!(
            ca.sign(&csr(&[]), &foreign, DEFAULT_LIFETIME, now()),
            Err(CaError::TrustDomain { .. })
        ));
        assert!(matches!(
            ca.sign(b"garbage", &id, DEFAULT_LIFETIME, now()),
            Err(CaError::BadCsr(_))
        ));
        let issued = ca
            .sign(&csr(&[]), &id, DEFAULT_LIFETIME, now())
            .expect("signed");
        assert_eq!(issued.not_after, now() + Duration::from_secs(3600));
    }

    #[test]
    fn a_ca_directory_is_created_once_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("mesh-ca-test-{}", rand::random::<u64>()));
        let first = Authority::load_or_generate(&dir, "cluster.local", now()).expect("generated");
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = Authority::load_or_generate(&dir, "cluster.local", now()).expect("loaded");
        assert_eq!(first.bundle(), second.bundle(), "the same root both times");
        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err =
            Authority::load_or_generate(&dir, "cluster.local", now()).expect_err("readable key");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plugged_in_intermediate_signs_and_its_root_is_the_bundle() {
        use std::os::unix::fs::PermissionsExt;
        let root_key = KeyPair::generate().expect("key");
        let mut root = CertificateParams::default();
        root.distinguished_name
            .push(DnType::CommonName, "corporate root");
        root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root_cert = root.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root, root_key);
        let int_key = KeyPair::generate().expect("key");
        let mut int = CertificateParams::default();
        int.distinguished_name
            .push(DnType::CommonName, "mesh intermediate");
        int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let int_cert = int.signed_by(&int_key, &root_issuer).expect("intermediate");

        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join(CERT_FILE),
            format!("{}{}", int_cert.pem(), root_cert.pem()),
        )
        .expect("write");
        std::fs::write(dir.path().join(KEY_FILE), int_key.serialize_pem()).expect("write");
        std::fs::set_permissions(
            dir.path().join(KEY_FILE),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let ca = Authority::load(dir.path(), "cluster.local").expect("loads");
        assert_eq!(ca.bundle(), &[root_cert.der().clone()]);
        let id = SpiffeId::parse(ID).expect("id");
        let issued = ca
            .sign(&csr(&[]), &id, DEFAULT_LIFETIME, SystemTime::now())
            .expect("signed");
        assert_eq!(issued.chain.len(), 3, "leaf, intermediate, root");
        let bundle = mesh_api::tls::Bundle::new(ca.bundle().to_vec()).expect("bundle");
        let workload = mesh_api::tls::Identity::new("cluster.local", bundle, Box::new(|_, _| {}));
        let got = workload
            .verify(
                Role::Client,
                &issued.chain[0],
                &issued.chain[1..],
                &[],
                SystemTime::now(),
            )
            .expect("chains to the corporate root");
        assert_eq!(got, id);
    }

    #[test]
    fn a_persisted_ca_signs_for_the_same_root() {
        let ca = Authority::generate("cluster.local", now()).expect("ca");
        let (cert, key) = ca.to_pem();
        assert!(key.contains("PRIVATE KEY"));
        assert!(
            !format!("{ca:?}").contains("PRIVATE"),
            "Debug must not print the key"
        );
        let again = Authority::from_pem(cert, key, "cluster.local").expect("loads");
        let other = Authority::generate("cluster.local", now()).expect("ca");
        assert!(matches!(
            Authority::from_pem(cert, other.to_pem().1, "cluster.local"),
            Err(CaError::KeyMismatch)
        ));
        let id = SpiffeId::parse(ID).expect("id");
        let issued = again
            .sign(&csr(&[]), &id, DEFAULT_LIFETIME, now())
            .expect("signed");
        let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("leaf");
        let (_, root) = X509Certificate::from_der(&ca.bundle()[0]).expect("root");
        leaf.verify_signature(Some(root.public_key()))
            .expect("signed by the original root");
    }
}
