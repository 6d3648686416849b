//! Manifests: arbitrary text as YAML documents, read as the controller reads a manifest file
//! (each document an object, or refused with an error naming it), indexed and translated for a
//! pod (`default/web-0` and the first three pods named); then every resource the controller would serve that pod goes through mesh-proxy's
//! conversion, which must take it: the proxy never refuses what its controller sends.

#![no_main]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mesh_controller::index::Index;
use mesh_controller::objects::parse_doc;
use mesh_controller::xds::resources::{ProxyView, ResourceType};
use mesh_controller::xds::translate::{ListenerSettings, ProxyId, Translator};
use mesh_proxy::state::convert;
use prost::Message;
use serde::Deserialize;

/// Each document of `text`, as JSON values; stops at the first that is not YAML.
fn documents(text: &str) -> Vec<serde_json::Value> {
    serde_norway::Deserializer::from_str(text)
        .map_while(|d| serde_json::Value::deserialize(d).ok())
        .collect()
}

/// Decodes `bytes` as `M` and converts it as mesh-proxy does.
fn take<M: Message + Default, T, E: std::fmt::Display>(
    bytes: &[u8],
    convert: fn(&M) -> Result<T, E>,
) -> Result<(), String> {
    let m = M::decode(bytes).map_err(|e| e.to_string())?;
    convert(&m).map(|_| ()).map_err(|e| e.to_string())
}

/// Every resource the view serves a (not scoped) mesh-proxy goes through its conversion: by
/// name, as a wildcard subscription gets it (a name in an earlier layer hides the later
/// ones); those served only by name are proxyless gRPC's API listeners.
fn proxy_takes(view: &ProxyView) {
    for ty in ResourceType::ALL {
        let names: BTreeSet<&str> = view
            .layers
            .iter()
            .flat_map(|layer| layer.iter(ty).map(|r| &*r.name))
            .collect();
        for name in names {
            let Some(r) = view.get_wildcard(ty, name) else {
                continue;
            };
            let bytes = r.any.value.as_slice();
            let taken = match ty {
                ResourceType::Listener => take(bytes, convert::listener),
                ResourceType::Route => take(bytes, convert::route_table),
                ResourceType::Cluster => take(bytes, convert::cluster),
                ResourceType::Endpoint => take(bytes, convert::endpoints),
                // A Gateway's certificates go only to its gateway proxies.
                ResourceType::Secret => Err("a sidecar is served a Secret".to_string()),
            };
            if let Err(e) = taken {
                panic!("mesh-proxy refuses {ty:?} {name} from its controller: {e}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut index = Index::new("cluster.local");
    let mut pods = vec![("default".to_string(), "web-0".to_string())];
    for doc in documents(text) {
        let Ok(obj) = parse_doc(doc.clone(), "default") else {
            continue;
        };
        if doc["kind"] == "Pod"
            && let (Some(ns), Some(name)) = (
                doc["metadata"]["namespace"].as_str().or(Some("default")),
                doc["metadata"]["name"].as_str(),
            )
        {
            pods.push((ns.to_string(), name.to_string()));
        }
        let _ = index.apply(obj);
    }
    let mut translator = Translator::new(index.model());
    for (namespace, name) in pods.into_iter().take(4) {
        for mtls in [false, true] {
            let view = translator.view(&ProxyId {
                namespace: namespace.clone(),
                name: name.clone(),
                settings: ListenerSettings {
                    transparent: true,
                    mtls,
                    outbound_http_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15080),
                    ..Default::default()
                },
            });
            proxy_takes(&view);
        }
    }
});
