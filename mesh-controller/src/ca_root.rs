//! Distributing the CA's root in a cluster: the injector's MutatingWebhookConfiguration gets it
//! as its `caBundle` (so the API server trusts the injector's certificate), and every namespace
//! gets it as the ConfigMap `mesh-ca-root` (which injected pods mount). The root is the file
//! `--ca-root` (the mounted ConfigMap of the CA's namespace), read again every round, so a root
//! rotation spreads by itself. Idempotent, so every controller replica may run it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

pub use mesh_api::root_configmap::NAME as ROOT_CONFIGMAP;
/// Namespaces that never run injected pods.
const SKIPPED: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

#[derive(Clone)]
pub struct RootPublisher {
    client: kube::Client,
    root_file: PathBuf,
    webhook_config: String,
    /// Webhooks of the configuration that point at this Service are the controller's.
    service: (String, String),
}

impl std::fmt::Debug for RootPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPublisher")
            .field("root_file", &self.root_file)
            .field("webhook_config", &self.webhook_config)
            .finish_non_exhaustive()
    }
}

fn wants_root(ns: &Namespace) -> bool {
    let disabled = ns
        .labels()
        .get(mesh_api::consts::labels::INJECT)
        .is_some_and(|v| v == "disabled");
    !disabled && !SKIPPED.contains(&ns.name_any().as_str())
}

impl RootPublisher {
    pub fn new(
        client: kube::Client,
        root_file: PathBuf,
        webhook_config: &str,
        service_namespace: &str,
    ) -> Self {
        Self {
            client,
            root_file,
            webhook_config: webhook_config.into(),
            service: (
                mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT.into(),
                service_namespace.into(),
            ),
        }
    }

    fn root(&self) -> Result<String, String> {
        let pem = std::fs::read_to_string(&self.root_file)
            .map_err(|e| format!("{}: {e}", self.root_file.display()))?;
        mesh_api::tls::certs_from_pem(&pem, &self.root_file.display().to_string())?;
        Ok(pem)
    }

    /// Sets the caBundle of the controller's webhooks to `pem`; returns whether it changed.
    pub async fn patch_ca_bundle(&self, pem: &str) -> Result<bool, kube::Error> {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(mut config) = api.get_opt(&self.webhook_config).await? else {
            return Ok(false);
        };
        let mut changed = false;
        for hook in config.webhooks.iter_mut().flatten() {
            let ours = hook
                .client_config
                .service
                .as_ref()
                .is_some_and(|s| s.name == self.service.0 && s.namespace == self.service.1);
            let want = ByteString(pem.as_bytes().to_vec());
            if ours && hook.client_config.ca_bundle.as_ref() != Some(&want) {
                hook.client_config.ca_bundle = Some(want);
                changed = true;
            }
        }
        if changed {
            api.replace(&self.webhook_config, &PostParams::default(), &config)
                .await?;
            info!(config = %self.webhook_config, "webhook caBundle set to the CA root");
        }
        Ok(changed)
    }

    /// Creates or updates `mesh-ca-root` in `ns`; returns whether it changed.
    pub async fn ensure_configmap(&self, ns: &str, pem: &str) -> Result<bool, kube::Error> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        mesh_api::root_configmap::ensure(&api, ns, pem).await
    }

    /// Puts the root where it belongs, now and whenever a namespace appears or the root file
    /// changes (checked every `interval`). Never returns.
    pub async fn run(self, interval: Duration) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let mut events = watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut known: BTreeMap<String, bool> = BTreeMap::new();
        let mut root = String::new();
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.root() {
                        Ok(pem) if pem != root => {
                            root = pem;
                            let wanted: Vec<String> = known
                                .iter()
                                .filter(|(_, w)| **w)
                                .map(|(n, _)| n.clone())
                                .collect();
                            self.spread(&root, &wanted).await;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "the CA root is unreadable; keeping what was published"),
                    }
                }
                ev = events.next() => {
                    let Some(ev) = ev else { return };
                    match ev {
                        Ok(watcher::Event::Apply(ns) | watcher::Event::InitApply(ns)) => {
                            let name = ns.name_any();
                            let wants = wants_root(&ns);
                            let was = known.insert(name.clone(), wants);
                            if wants && was != Some(true) && !root.is_empty() {
                                self.spread(&root, &[name]).await;
                            }
                        }
                        Ok(watcher::Event::Delete(ns)) => {
                            known.remove(&ns.name_any());
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "watching namespaces"),
                    }
                }
            }
        }
    }

    async fn spread(&self, pem: &str, namespaces: &[String]) {
        match self.patch_ca_bundle(pem).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, config = %self.webhook_config, "setting the webhook caBundle")
            }
        }
        for ns in namespaces {
            match self.ensure_configmap(ns, pem).await {
                Ok(true) => info!(namespace = %ns, "CA root published"),
                Ok(false) => {}
                Err(e) => warn!(namespace = %ns, error = %e, "publishing the CA root"),
            }
        }
    }
}

/// The caBundle as the API sends it (base64 of the PEM), for tests and `meshctl check`.
pub fn ca_bundle_b64(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

#[cfg(test)]
mod tests {
    use mesh_api::fake_api::FakeApi;
    use serde_json::json;

    use super::*;

    const CONFIG: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector";

    fn webhook_config() -> serde_json::Value {
        let hook = |name: &str, svc: &str| {
            json!({"name": name, "clientConfig": {"service": {"name": svc, "namespace": "mesh-system", "path": "/inject"}},
                   "sideEffects": "None", "admissionReviewVersions": ["v1"]})
        };
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
               "metadata": {"name": "mesh-sidecar-injector"},
               "webhooks": [hook("namespace.inject.mesh.dev", "mesh-controller"), hook("other.example", "someone-else")]})
    }

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.self_signed(&key).expect("cert").pem()
    }

    #[tokio::test]
    async fn the_ca_bundle_is_set_on_our_webhooks_only_and_once() {
        let (client, fake) = FakeApi::start();
        // The controller under test is the one that sets it.
        fake.state().ca_bundle_after = u32::MAX;
        fake.insert(webhook_config());
        let dir = tempfile::tempdir().expect("dir");
        let p = RootPublisher::new(
            client,
            dir.path().join("ca.crt"),
            "mesh-sidecar-injector",
            "mesh-system",
        );
        let pem = root_pem();
        assert!(p.patch_ca_bundle(&pem).await.expect("patch"));
        assert!(!p.patch_ca_bundle(&pem).await.expect("patch"));
        let stored = fake.state().objects[CONFIG].clone();
        assert_eq!(
            stored["webhooks"][0]["clientConfig"]["caBundle"],
            ca_bundle_b64(&pem)
        );
        assert!(
            stored["webhooks"][1]["clientConfig"]
                .get("caBundle")
                .is_none()
        );
        assert_eq!(fake.writes().len(), 1);
    }

    #[tokio::test]
    async fn namespaces_get_the_root_except_disabled_and_system_ones() {
        let (client, fake) = FakeApi::start();
        // The controller under test is the one that sets it.
        fake.state().ca_bundle_after = u32::MAX;
        fake.insert(webhook_config());
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("ca.crt");
        let pem = root_pem();
        std::fs::write(&file, &pem).expect("write");
        for (name, label) in [
            ("shop", None),
            ("legacy", Some("disabled")),
            ("kube-system", None),
        ] {
            let mut ns =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            if let Some(l) = label {
                ns["metadata"]["labels"] = json!({"mesh.dev/inject": l});
            }
            fake.insert(ns);
        }
        let p = RootPublisher::new(client, file.clone(), "mesh-sidecar-injector", "mesh-system");
        let task = tokio::spawn(p.run(Duration::from_millis(20)));
        let cm = |ns: &str| format!("/api/v1/namespaces/{ns}/configmaps/mesh-ca-root");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !fake.state().objects.contains_key(&cm("shop")) {
            assert!(
                std::time::Instant::now() < deadline,
                "shop never got the root"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.state().objects[&cm("shop")]["data"]["ca.crt"], pem);
        assert!(!fake.state().objects.contains_key(&cm("legacy")));
        assert!(!fake.state().objects.contains_key(&cm("kube-system")));
        // A rotated root reaches the namespace and the webhook.
        let rotated = format!("{pem}{}", root_pem());
        std::fs::write(&file, &rotated).expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while fake.state().objects[&cm("shop")]["data"]["ca.crt"] != rotated {
            assert!(
                std::time::Instant::now() < deadline,
                "the rotated root never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            fake.state().objects[CONFIG]["webhooks"][0]["clientConfig"]["caBundle"],
            ca_bundle_b64(&rotated)
        );
        task.abort();
    }
}
