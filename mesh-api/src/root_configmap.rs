//! The ConfigMap `mesh-ca-root` that carries the CA's trust bundle: mesh-ca publishes it in its
//! namespace, the controller copies it into every namespace, injected pods mount it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

/// Its name, and the key of the PEM bundle (also the file name proxies read).
pub const NAME: &str = "mesh-ca-root";
pub const KEY: &str = "ca.crt";

/// Creates or updates `mesh-ca-root` through `api` (a namespaced API) so it holds `pem`;
/// returns whether it changed. Losing a create race (409) counts as no change: the winner
/// wrote the same bundle, or the next round repairs it.
pub async fn ensure(api: &Api<ConfigMap>, ns: &str, pem: &str) -> Result<bool, kube::Error> {
    let data = BTreeMap::from([(KEY.to_owned(), pem.to_owned())]);
    match api.get_opt(NAME).await? {
        Some(cm) if cm.data.as_ref() == Some(&data) => Ok(false),
        Some(mut cm) => {
            cm.data = Some(data);
            api.replace(NAME, &PostParams::default(), &cm).await?;
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    namespace: Some(ns.into()),
                    labels: Some(BTreeMap::from([(
                        crate::crds::PART_OF.0.to_owned(),
                        crate::crds::PART_OF.1.to_owned(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}
