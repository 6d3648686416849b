//! Identity for tests: an in-process mesh-ca on loopback, local-mesh tokens for proxies, and
//! a raw TLS client that presents any certificate (to probe what a proxy refuses).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_api::SpiffeId;
use mesh_ca::auth::LocalTokens;
use mesh_ca::run::{CaConfig, Running};
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

/// A CA for one test, on its own runtime so that stopping it drops every connection at once,
/// as a crashed process would; its directory is kept across restarts.
#[derive(Debug)]
pub struct TestCa {
    pub dir: tempfile::TempDir,
    pub config: CaConfig,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for TestCa {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a CA on a runtime of its own; returns the runtime and the CA's service and admin
/// addresses.
fn run_ca(config: CaConfig) -> anyhow::Result<(tokio::runtime::Runtime, (SocketAddr, SocketAddr))> {
    crate::own_runtime(Running::start(config), |ca| (ca.addr, ca.admin_addr))
}

impl TestCa {
    /// A CA whose certificates live `lifetime` (both the default and the cap).
    pub async fn start(lifetime: Duration) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = CaConfig::local(dir.path());
        config.default_lifetime = lifetime;
        config.max_lifetime = lifetime;
        config.reload_interval = Duration::from_millis(200);
        let (rt, (addr, admin)) = run_ca(config.clone())?;
        // Restarts come back on the same addresses.
        config.addr = addr;
        config.admin_addr = admin;
        Ok(Self {
            dir,
            config,
            rt: Some(rt),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.config.admin_addr
    }

    /// Stops serving, every connection dropped; the directory stays.
    pub fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        // The port may take a moment to be free again.
        for _ in 0..50 {
            match run_ca(self.config.clone()) {
                Ok((rt, _)) => {
                    self.rt = Some(rt);
                    return Ok(());
                }
                Err(e) if e.to_string().contains("binding") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
        anyhow::bail!("the CA's port {} stayed busy", self.config.addr)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A file holding a local-mesh token for `ns/sa`.
    pub fn token_file(&self, ns: &str, sa: &str) -> anyhow::Result<PathBuf> {
        let id = SpiffeId::workload("cluster.local", ns, sa)?;
        let tokens = LocalTokens::load_or_generate(self.dir.path(), "cluster.local")?;
        let token_file = self.dir.path().join(format!("{ns}-{sa}.token"));
        std::fs::write(&token_file, tokens.issue(&id))?;
        Ok(token_file)
    }

    /// `mesh-proxy agent` for pod `node` (`<namespace>/<name>`) as service account `sa`, with
    /// this CA's address, root and a token for it; the caller adds where the secrets go.
    pub fn agent_command(&self, node: &str, sa: &str) -> anyhow::Result<tokio::process::Command> {
        let (ns, _) = node
            .split_once('/')
            .ok_or_else(|| anyhow::anyhow!("node {node:?}: expected <namespace>/<name>"))?;
        let mut cmd = tokio::process::Command::new(crate::netns::binary("mesh-proxy")?);
        cmd.arg("agent")
            .args(["--node", node, "--service-account", sa])
            .args(["--ca-addr", &self.addr().to_string()])
            .arg("--ca-root")
            .arg(self.path("ca.crt"))
            .arg("--ca-token-file")
            .arg(self.token_file(ns, sa)?);
        Ok(cmd)
    }

    /// Gives `config` the identity `<node namespace>/<sa>`: a token for it from this CA's
    /// local-mesh key, the CA's address and root.
    pub fn identify(&self, config: &mut mesh_proxy::Config, sa: &str) -> anyhow::Result<()> {
        let (ns, _) = config.node_parts()?;
        let token_file = self.token_file(ns, sa)?;
        config.identity_off = false;
        config.service_account = sa.to_string();
        config.ca_addr = Some(self.addr().to_string());
        config.ca_root = Some(self.path("ca.crt"));
        config.ca_token_file = token_file;
        Ok(())
    }

    /// The signing key and certificate, to sign certificates no CA would (bad SVIDs).
    pub fn issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let cert = std::fs::read_to_string(self.path("ca.crt"))?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(self.path("ca.key"))?)?;
        Ok(Issuer::from_ca_cert_pem(&cert, key)?)
    }
}

/// A certificate and key made from `params`, signed by `issuer`.
pub fn sign(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    ))
}

/// Waits (up to 10 s) until `identity` holds a valid certificate; `who` names it in the error.
pub async fn wait_for_svid(
    identity: &Arc<mesh_api::tls::Identity>,
    who: &str,
) -> anyhow::Result<()> {
    crate::eventually(
        Duration::from_secs(10),
        &format!("{who} to get a certificate"),
        || {
            let ok = identity.has_valid_svid().then_some(());
            async move { ok }
        },
    )
    .await?;
    Ok(())
}

/// The parameters of a good workload SVID for `id`, valid for the next hour.
pub fn svid_params(id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().expect("ia5"))];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::hours(1);
    p
}

/// Opens mesh TLS (1.3, HTTP/1.1 by ALPN) to `addr` presenting `chain`/`key`, trusting any
/// server: a test client stands for a workload's proxy.
pub async fn tls_connect(
    addr: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_connect_alpn(addr, chain, key, mesh_api::tls::ALPN_HTTP1).await
}

/// Like [`tls_connect`], offering `alpn`.
pub async fn tls_connect_alpn(
    addr: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(mesh_api::tls::AnyServerCert(provider)))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("handshake")
}

/// Opens TLS to `addr` presenting `chain`/`key`, sends an HTTP/1.1 GET and returns what came
/// back (`Err` when the handshake or the exchange failed).
pub async fn tls_probe(
    addr: SocketAddr,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tls_connect(addr, chain, key).await?;
    // In TLS 1.3 the server judges the client's certificate after the client finished, so a
    // refusal shows up as the first read failing or ending.
    tls.write_all(b"GET / HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut out))
        .await
        .context("no answer in 5 s")??;
    if out.is_empty() {
        anyhow::bail!("connection closed without an answer");
    }
    Ok(out)
}

pub use mesh_api::prom::count as counter;
