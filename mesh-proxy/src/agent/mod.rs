//! `mesh-proxy agent`: the mesh identity for a stock Envoy. It gets the workload's SVID from
//! mesh-ca as mesh-proxy does (the same token, CSR and renewal at 50-70 % of the life), and
//! serves it with the trust bundle over SDS on the Unix socket `--sds-socket` (see [`sds`]),
//! or writes them as the two SDS files Envoy watches in `--sds-dir`, or both:
//! `default.yaml` (the SVID and key) and `ROOTCA.yaml` (the roots), each a `Secret` in an SDS
//! DiscoveryResponse, the names Istio uses. `meshctl bootstrap envoy --sds-dir` points Envoy at
//! them for mesh TLS inbound and for xDS. Each file is replaced by a rename into the directory,
//! which is what Envoy's directory watch reacts to, so Envoy never reads half a file; the roots
//! go first, so a new SVID never arrives before the root it chains to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_api::SpiffeId;
use mesh_api::consts::{env, xds};
use mesh_api::tls::Identity;
use mesh_api::tls::renew::{Issued, SvidClient, SvidSettings};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tracing::{error, info, warn};

use crate::config::parse_duration;

pub mod sds;

const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "mesh-proxy agent",
    about = "Keep a stock Envoy's SVID and trust bundle current over SDS (a Unix socket, or files)"
)]
pub struct AgentArgs {
    /// The directory to write `default.yaml` and `ROOTCA.yaml` to (created, mode 0700).
    #[arg(long, env = env::PROXY_SDS_DIR, required_unless_present = "sds_socket")]
    pub sds_dir: Option<PathBuf>,
    /// The Unix socket to serve SDS on (mode 0600; a stale one is replaced), for the bootstrap's
    /// static cluster `sds-grpc`.
    #[arg(long, env = env::PROXY_SDS_SOCKET)]
    pub sds_socket: Option<PathBuf>,
    /// The pod, `<namespace>/<name>`; its namespace is the SVID's.
    #[arg(long, env = env::PROXY_NODE)]
    pub node: String,
    /// The workload's service account (its SPIFFE ID is `.../ns/<node namespace>/sa/<this>`).
    #[arg(long, env = env::PROXY_SERVICE_ACCOUNT, default_value = "default")]
    pub service_account: String,
    /// Trust domain of the mesh.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Address of mesh-ca (`host:port`).
    #[arg(long, env = env::PROXY_CA_ADDR)]
    pub ca_addr: String,
    /// PEM file with the root(s) that mesh-ca's own certificate chains to.
    #[arg(long, env = env::PROXY_CA_ROOT)]
    pub ca_root: PathBuf,
    /// File with the token proving this workload's identity to mesh-ca. Read again at every
    /// renewal.
    #[arg(long, env = env::PROXY_CA_TOKEN_FILE, default_value = "/var/run/secrets/tokens/mesh-ca-token")]
    pub ca_token_file: PathBuf,
    /// Certificate lifetime to ask for (`0s`: the CA's default, 24 h).
    #[arg(long, env = env::PROXY_CERT_LIFETIME, value_parser = parse_duration, default_value = "0s")]
    pub cert_lifetime: Duration,
    /// Log format: `text` or `json` (the filter is `MESH_LOG`).
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = mesh_api::logging::LogFormat::Text)]
    pub log_format: mesh_api::logging::LogFormat,
}

impl AgentArgs {
    fn spiffe_id(&self) -> anyhow::Result<SpiffeId> {
        let (namespace, _) = crate::config::node_parts(&self.node)?;
        SpiffeId::workload(&self.trust_domain, namespace, &self.service_account).with_context(
            || {
                format!(
                    "--trust-domain {:?} / --service-account {:?}",
                    self.trust_domain, self.service_account
                )
            },
        )
    }
}

/// PEM blocks of one tag.
fn pem_all(tag: &str, ders: &[&[u8]]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.to_vec())))
        .collect()
}

fn certificates(certs: &[CertificateDer<'static>]) -> String {
    let ders: Vec<&[u8]> = certs.iter().map(|c| c.as_ref()).collect();
    pem_all("CERTIFICATE", &ders)
}

/// What a renewal installed, as PEM: the SVID's chain, its key, and the roots.
#[derive(Debug)]
pub struct Pems {
    pub chain: String,
    pub key: String,
    pub roots: String,
}

impl Pems {
    pub fn of(issued: &Issued<'_>) -> Self {
        Pems {
            chain: certificates(&issued.current.chain),
            key: pem_all("PRIVATE KEY", &[issued.key_pkcs8]),
            roots: certificates(issued.roots),
        }
    }
}

/// The two SDS DiscoveryResponses for what a renewal installed: `(ROOTCA, default)`. JSON is
/// YAML, which is what Envoy reads a `.yaml` file as.
pub fn sds_files(pems: &Pems) -> (String, String) {
    let roots = json!({"resources": [{
        "@type": SECRET_TYPE,
        "name": xds::SDS_ROOTS,
        "validation_context": {"trusted_ca": {"inline_string": pems.roots}},
    }]});
    let svid = json!({"resources": [{
        "@type": SECRET_TYPE,
        "name": xds::SDS_SVID,
        "tls_certificate": {
            "certificate_chain": {"inline_string": pems.chain},
            "private_key": {"inline_string": pems.key},
        },
    }]});
    (roots.to_string(), svid.to_string())
}

/// Writes `text` to `dir/name` by a rename: a new file of a random name, made exclusively and
/// readable by the agent's user alone (it holds a private key), then moved over the old one.
fn replace(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let mut f = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)?;
    f.write_all(text.as_bytes())?;
    f.as_file().sync_all()?;
    f.persist(dir.join(name)).map_err(|e| e.error)?;
    Ok(())
}

/// Writes both files, the roots first.
pub fn write_sds(dir: &Path, roots: &str, svid: &str) -> std::io::Result<()> {
    replace(dir, &format!("{}.yaml", xds::SDS_ROOTS), roots)?;
    replace(dir, &format!("{}.yaml", xds::SDS_SVID), svid)
}

/// Makes `dir` (mode 0700); an existing one it owns is narrowed to 0700 too.
fn sds_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let what = || format!("--sds-dir {}", dir.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(what)?;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        // A volume made by someone else (an emptyDir): the files themselves are 0600.
        warn!(dir = %dir.display(), error = %e, "cannot narrow the SDS directory to 0700");
    }
    Ok(())
}

/// Runs until SIGTERM.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let id = args.spiffe_id()?;
    if let Some(dir) = &args.sds_dir {
        sds_dir(dir)?;
    }
    let root = SvidClient::read_root(&args.ca_root).map_err(anyhow::Error::msg)?;
    let identity = Identity::new(
        &args.trust_domain,
        root,
        Box::new(|_, r| warn!(reason = r.reason, detail = %r.detail, "certificate refused")),
    );
    // The latest files to write: the renewal hook hands them over, a writer retries until they
    // are written (a renewal comes only at half the certificate's life).
    let pending: Arc<std::sync::Mutex<Option<(String, String)>>> = Arc::default();
    let wake = Arc::new(tokio::sync::Notify::new());
    // What the SDS socket serves.
    let (served, serving) = tokio::sync::watch::channel(None);
    let (hand, ring) = (pending.clone(), wake.clone());
    let version = std::sync::atomic::AtomicU64::new(0);
    let svid = SvidClient::new(
        SvidSettings {
            id: id.clone(),
            ca_addr: args.ca_addr.clone(),
            ca_root: args.ca_root.clone(),
            token_file: args.ca_token_file.clone(),
            lifetime: args.cert_lifetime,
            dns_names: Vec::new(),
        },
        identity,
        Box::new(move |issued| {
            let version = version.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let pems = Pems::of(issued);
            if let Ok(mut p) = hand.lock() {
                *p = Some(sds_files(&pems));
            }
            served.send_replace(Some(Arc::new(sds::Secrets::new(version, pems))));
            ring.notify_one();
        }),
        Box::new(|_| {}),
    )
    .map_err(anyhow::Error::msg)?;
    info!(%id, dir = ?args.sds_dir, socket = ?args.sds_socket, "agent started");
    let writer = async move {
        let Some(dir) = args.sds_dir else {
            return std::future::pending().await;
        };
        write_files(&dir, &pending, &wake).await;
    };
    let args_socket = args.sds_socket.clone();
    let socket = async move {
        match &args.sds_socket {
            Some(path) => sds::serve(path, serving).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        // It only returns when it cannot run at all (its TLS settings).
        () = Arc::clone(&svid).run() => Err(anyhow::anyhow!("the SVID client stopped; see the log")),
        () = writer => Ok(()),
        r = socket => r,
        () = mesh_api::process::terminated() => {
            info!("SIGTERM: stopping");
            Ok(())
        }
    };
    if let Some(path) = &args_socket {
        // Envoy should not find a socket nobody serves.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Writes the files of each renewal the hook hands over, retrying every second until written.
async fn write_files(
    dir: &Path,
    pending: &std::sync::Mutex<Option<(String, String)>>,
    wake: &tokio::sync::Notify,
) {
    loop {
        let next = pending.lock().map(|mut p| p.take()).unwrap_or_default();
        let Some((roots, svid)) = next else {
            wake.notified().await;
            continue;
        };
        match write_sds(dir, &roots, &svid) {
            Ok(()) => info!(dir = %dir.display(), "SDS files written"),
            Err(e) => {
                // Envoy keeps the files it has (none before the first write): try again.
                error!(dir = %dir.display(), error = %e, "writing the SDS files; retrying in 1 s");
                if let Ok(mut p) = pending.lock() {
                    p.get_or_insert((roots, svid));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn der(pem_text: &str) -> Vec<u8> {
        pem::parse(pem_text).expect("pem").into_contents()
    }

    #[test]
    fn writes_the_svid_and_roots_as_envoy_secrets_by_rename_for_its_user_only() {
        use std::os::unix::fs::PermissionsExt;
        let root = fake_cert(b"root");
        let leaf = fake_cert(b"leaf");
        let current = mesh_api::tls::Current {
            id: SpiffeId::workload("cluster.local", "shop", "web").expect("id"),
            not_after: SystemTime::now(),
            not_before: SystemTime::now(),
            chain: vec![leaf.clone()],
        };
        let issued = Issued {
            current: &current,
            key_pkcs8: b"key bytes",
            roots: std::slice::from_ref(&root),
        };
        let dir = tempfile::tempdir().expect("dir");
        let (roots, svid) = sds_files(&Pems::of(&issued));
        write_sds(dir.path(), &roots, &svid).expect("written");
        // Written again (a renewal) over the first: replaced, nothing left behind.
        write_sds(dir.path(), &roots, &svid).expect("rewritten");
        let read = |name: &str| -> serde_json::Value {
            let text = std::fs::read_to_string(dir.path().join(name)).expect(name);
            serde_json::from_str(&text).expect("JSON, which Envoy reads as YAML")
        };
        let svid = &read("default.yaml")["resources"][0];
        assert_eq!(svid["@type"], SECRET_TYPE);
        assert_eq!(svid["name"], "default");
        let chain = svid["tls_certificate"]["certificate_chain"]["inline_string"]
            .as_str()
            .expect("chain");
        assert_eq!(der(chain), leaf.as_ref());
        let key = svid["tls_certificate"]["private_key"]["inline_string"]
            .as_str()
            .expect("key");
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        assert_eq!(der(key), b"key bytes");
        let roots = &read("ROOTCA.yaml")["resources"][0];
        assert_eq!(roots["name"], "ROOTCA");
        let ca = roots["validation_context"]["trusted_ca"]["inline_string"]
            .as_str()
            .expect("roots");
        assert_eq!(der(ca), root.as_ref());
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ROOTCA.yaml", "default.yaml"], "no temporary left");
        for n in &names {
            let mode = std::fs::metadata(dir.path().join(n))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{n}");
        }
    }

    /// Bytes standing for a certificate: the files carry them as they are.
    fn fake_cert(b: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from(b.to_vec())
    }

    #[test]
    fn a_bad_node_is_named() {
        use clap::Parser;
        let a = AgentArgs::try_parse_from([
            "agent",
            "--sds-dir",
            "/x",
            "--node",
            "web-0",
            "--ca-addr",
            "h:1",
            "--ca-root",
            "/r",
        ])
        .expect("parses");
        let err = a.spiffe_id().expect_err("no namespace").to_string();
        assert!(
            err.contains("--node / MESH_PROXY_NODE = \"web-0\""),
            "{err}"
        );
    }
}
