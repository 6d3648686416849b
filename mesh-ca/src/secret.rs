//! Keeping the CA in a Kubernetes Secret: on first start a root is generated and stored in the
//! Secret (one replica wins a race; the others read what it wrote); the Secret is mirrored into
//! the CA directory, which the CA loads and reloads as usual, so a rotation is an edit of the
//! Secret (`ca.crt`, `ca.key`, `trust-bundle.pem`). The trust bundle is published in the
//! ConfigMap `mesh-ca-root` of the same namespace for the controller and proxies.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use rustls_pki_types::CertificateDer;
use tracing::info;

use crate::authority::{Authority, BUNDLE_FILE, CERT_FILE, CaError, KEY_FILE};

pub use mesh_api::root_configmap::NAME as ROOT_CONFIGMAP;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{ns}/{name}: {source}")]
    Api {
        ns: String,
        name: String,
        source: Box<kube::Error>,
    },
    #[error("Secret {ns}/{name}: key {key} is missing")]
    Missing {
        ns: String,
        name: String,
        key: String,
    },
    #[error("Secret {ns}/{name}: key {key} is not UTF-8 PEM")]
    NotPem {
        ns: String,
        name: String,
        key: String,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// The CA's Secret and root ConfigMap.
#[derive(Clone)]
pub struct SecretStore {
    secrets: Api<Secret>,
    configmaps: Api<ConfigMap>,
    ns: String,
    name: String,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretStore({}/{})", self.ns, self.name)
    }
}

/// PEM of certificates, in order.
pub fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

impl SecretStore {
    pub fn new(client: kube::Client, ns: &str, name: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), ns),
            configmaps: Api::namespaced(client, ns),
            ns: ns.into(),
            name: name.into(),
        }
    }

    fn api_err(&self, source: kube::Error) -> SecretError {
        SecretError::Api {
            ns: self.ns.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }

    /// The Secret, created with a new root when there is none.
    async fn get_or_create(&self, trust_domain: &str) -> Result<Secret, SecretError> {
        if let Some(s) = self
            .secrets
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_err(e))?
        {
            return Ok(s);
        }
        let ca = Authority::generate(trust_domain, SystemTime::now())?;
        let (cert, key) = ca.to_pem();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.ns.clone()),
                labels: Some(BTreeMap::from([(
                    mesh_api::crds::PART_OF.0.to_owned(),
                    mesh_api::crds::PART_OF.1.to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("mesh.dev/ca".into()),
            data: Some(BTreeMap::from([
                (CERT_FILE.to_owned(), ByteString(cert.as_bytes().to_vec())),
                (KEY_FILE.to_owned(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Default::default()
        };
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(s) => {
                info!(secret = %format!("{}/{}", self.ns, self.name), "generated a root and stored it");
                Ok(s)
            }
            // Another replica stored its root first: use that one.
            Err(kube::Error::Api(e)) if e.code == 409 => self
                .secrets
                .get(&self.name)
                .await
                .map_err(|e| self.api_err(e)),
            Err(e) => Err(self.api_err(e)),
        }
    }

    fn text(&self, s: &Secret, key: &str) -> Result<Option<String>, SecretError> {
        let Some(b) = s.data.as_ref().and_then(|d| d.get(key)) else {
            return Ok(None);
        };
        String::from_utf8(b.0.clone())
            .map(Some)
            .map_err(|_| SecretError::NotPem {
                ns: self.ns.clone(),
                name: self.name.clone(),
                key: key.into(),
            })
    }

    /// Mirrors the Secret (created when missing) into `dir`. Returns whether a file changed.
    pub async fn sync_to_dir(&self, dir: &Path, trust_domain: &str) -> Result<bool, SecretError> {
        let secret = self.get_or_create(trust_domain).await?;
        let missing = |key: &str| SecretError::Missing {
            ns: self.ns.clone(),
            name: self.name.clone(),
            key: key.into(),
        };
        let cert = self
            .text(&secret, CERT_FILE)?
            .ok_or_else(|| missing(CERT_FILE))?;
        let key = self
            .text(&secret, KEY_FILE)?
            .ok_or_else(|| missing(KEY_FILE))?;
        // Refuse a Secret that does not hold a CA before anything is written.
        Authority::from_pem(&cert, &key, trust_domain)?;
        let bundle = self.text(&secret, BUNDLE_FILE)?;
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
        let mut changed = write_if_changed(&dir.join(KEY_FILE), &key, 0o600)?;
        changed |= write_if_changed(&dir.join(CERT_FILE), &cert, 0o644)?;
        let bundle_path = dir.join(BUNDLE_FILE);
        match bundle {
            Some(b) => changed |= write_if_changed(&bundle_path, &b, 0o644)?,
            None if bundle_path.exists() => {
                std::fs::remove_file(&bundle_path).map_err(file_err(&bundle_path))?;
                changed = true;
            }
            None => {}
        }
        Ok(changed)
    }

    /// Publishes `bundle` as the ConfigMap `mesh-ca-root`; returns whether it changed.
    pub async fn publish_root(&self, bundle: &[CertificateDer<'_>]) -> Result<bool, SecretError> {
        mesh_api::root_configmap::ensure(&self.configmaps, &self.ns, &certs_pem(bundle))
            .await
            .map_err(|source| SecretError::Api {
                ns: self.ns.clone(),
                name: ROOT_CONFIGMAP.into(),
                source: Box::new(source),
            })
    }
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError {
    let path = path.display().to_string();
    move |source| SecretError::File { path, source }
}

/// Writes `text` to `path` with `mode` (through a temporary file and a rename, so the CA's
/// reload never sees half a file) unless it already holds it.
fn write_if_changed(path: &Path, text: &str, mode: u32) -> Result<bool, SecretError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(file_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(file_err(path))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use mesh_api::fake_api::FakeApi;
    use serde_json::json;

    use super::*;

    const SECRET: &str = "/api/v1/namespaces/mesh-system/secrets/mesh-ca";
    const ROOT: &str = "/api/v1/namespaces/mesh-system/configmaps/mesh-ca-root";

    #[tokio::test]
    async fn first_start_generates_a_root_and_later_ones_reuse_it() {
        let (client, fake) = FakeApi::start();
        let store = SecretStore::new(client, "mesh-system", "mesh-ca");
        let dir = tempfile::tempdir().expect("dir");
        assert!(
            store
                .sync_to_dir(dir.path(), "cluster.local")
                .await
                .expect("sync")
        );
        let first = Authority::load(dir.path(), "cluster.local").expect("a CA in the dir");
        let stored = fake.state().objects[SECRET].clone();
        assert_eq!(stored["type"], "mesh.dev/ca");

        // Another replica (another directory) gets the same root, and nothing is rewritten.
        let other = tempfile::tempdir().expect("dir");
        assert!(
            store
                .sync_to_dir(other.path(), "cluster.local")
                .await
                .expect("sync")
        );
        let second = Authority::load(other.path(), "cluster.local").expect("a CA");
        assert_eq!(first.signing_root(), second.signing_root());
        assert!(
            !store
                .sync_to_dir(dir.path(), "cluster.local")
                .await
                .expect("sync")
        );
        assert_eq!(fake.state().objects[SECRET], stored);
        assert_eq!(fake.writes().len(), 1, "one create");
    }

    #[tokio::test]
    async fn an_edited_secret_reaches_the_directory_and_a_broken_one_is_refused() {
        let (client, fake) = FakeApi::start();
        let store = SecretStore::new(client, "mesh-system", "mesh-ca");
        let dir = tempfile::tempdir().expect("dir");
        store
            .sync_to_dir(dir.path(), "cluster.local")
            .await
            .expect("sync");
        let old = Authority::load(dir.path(), "cluster.local").expect("CA");

        // Rotation step: a new root signs, the old one stays trusted.
        let new = Authority::generate("cluster.local", SystemTime::now()).expect("root");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (cert, key) = new.to_pem();
        let old_root = certs_pem(old.bundle());
        let mut secret = fake.state().objects[SECRET].clone();
        secret["data"] =
            json!({"ca.crt": b64(cert), "ca.key": b64(key), "trust-bundle.pem": b64(&old_root)});
        fake.insert(secret.clone());
        assert!(
            store
                .sync_to_dir(dir.path(), "cluster.local")
                .await
                .expect("sync")
        );
        let loaded = Authority::load(dir.path(), "cluster.local").expect("CA");
        assert_eq!(loaded.signing_root(), new.signing_root());
        assert_eq!(loaded.bundle().len(), 2);

        // A key that is not the certificate's: refused, the directory keeps the last good CA.
        let (_, other_key) = old.to_pem();
        secret["data"]["ca.key"] = json!(b64(other_key));
        fake.insert(secret.clone());
        let e = store
            .sync_to_dir(dir.path(), "cluster.local")
            .await
            .expect_err("mismatch");
        assert!(matches!(e, SecretError::Ca(CaError::KeyMismatch)), "{e}");
        assert_eq!(
            Authority::load(dir.path(), "cluster.local")
                .expect("CA")
                .signing_root(),
            new.signing_root()
        );
        secret["data"] = json!({"ca.crt": b64(cert)});
        fake.insert(secret);
        let e = store
            .sync_to_dir(dir.path(), "cluster.local")
            .await
            .expect_err("no key");
        assert!(
            e.to_string()
                .contains("mesh-system/mesh-ca: key ca.key is missing"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_ca_started_on_a_secret_serves_its_root_and_publishes_it() {
        let (client, fake) = FakeApi::start();
        let dir = tempfile::tempdir().expect("dir");
        let mut config = crate::run::CaConfig::local(dir.path());
        config.secret = Some("mesh-ca".into());
        let running = crate::run::Running::start_with(config, Some(client))
            .await
            .expect("start");
        let stored = fake.state().objects[SECRET].clone();
        let cert = base64::engine::general_purpose::STANDARD
            .decode(stored["data"]["ca.crt"].as_str().expect("ca.crt"))
            .expect("base64");
        let from_secret =
            mesh_api::tls::certs_from_pem(&String::from_utf8_lossy(&cert), "secret").expect("PEM");
        assert_eq!(running.ca.authority().signing_root(), from_secret.first());
        let published = fake.state().objects[ROOT]["data"]["ca.crt"]
            .as_str()
            .expect("ca.crt")
            .to_owned();
        assert_eq!(
            mesh_api::tls::certs_from_pem(&published, "root").expect("PEM"),
            running.ca.authority().bundle()
        );
    }

    #[tokio::test]
    async fn the_root_is_published_once_and_updated_when_the_bundle_changes() {
        let (client, fake) = FakeApi::start();
        let store = SecretStore::new(client, "mesh-system", "mesh-ca");
        let a = Authority::generate("cluster.local", SystemTime::now()).expect("root");
        let b = Authority::generate("cluster.local", SystemTime::now()).expect("root");
        assert!(store.publish_root(a.bundle()).await.expect("publish"));
        assert!(!store.publish_root(a.bundle()).await.expect("publish"));
        let both: Vec<_> = a.bundle().iter().chain(b.bundle()).cloned().collect();
        assert!(store.publish_root(&both).await.expect("publish"));
        let cm = fake.state().objects[ROOT].clone();
        let pem = cm["data"]["ca.crt"].as_str().expect("ca.crt").to_owned();
        let certs = mesh_api::tls::certs_from_pem(&pem, "root").expect("PEM");
        assert_eq!(certs, both);
        assert_eq!(fake.writes().len(), 2, "a create and an update");
    }
}
