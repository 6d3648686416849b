//! Authorization evaluated without a network: the inbound listener the controller serves a
//! pod, as mesh-proxy converts it from the wire. `tests/authz_table.rs` and the `path_policy`
//! fuzz target decide requests with its guards.

use envoy_types::pb::envoy::config::listener::v3::Listener;
use mesh_controller::index::Index;
use mesh_controller::xds::resources::ResourceType;
use mesh_controller::xds::translate::{ListenerSettings, ProxyId, Translator};
use mesh_proxy::state::ListenerConfig;
use prost::Message;

/// The inbound listener of pod `namespace/name` (transparent, with mesh TLS) in `index`'s
/// model, as mesh-proxy takes it.
pub fn inbound_listener(
    index: &mut Index,
    namespace: &str,
    name: &str,
) -> anyhow::Result<ListenerConfig> {
    let view = Translator::new(index.model()).view(&ProxyId {
        namespace: namespace.into(),
        name: name.into(),
        settings: ListenerSettings {
            transparent: true,
            mtls: true,
            ..Default::default()
        },
    });
    let res = view
        .get(
            ResourceType::Listener,
            mesh_api::consts::xds::INBOUND_LISTENER,
        )
        .ok_or_else(|| anyhow::anyhow!("no inbound listener for {namespace}/{name}"))?;
    let listener = Listener::decode(res.any.value.as_slice())?;
    Ok(mesh_proxy::state::convert::listener(&listener)?)
}
