//! xDS conversion: arbitrary bytes as a Listener, RouteConfiguration, Cluster or
//! ClusterLoadAssignment (the first byte picks which), decoded as from the wire and converted
//! by mesh-proxy. A resource is taken or refused with an error; nothing panics.

#![no_main]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use libfuzzer_sys::fuzz_target;
use mesh_proxy::state::convert;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((kind, body)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(l) = Listener::decode(body) {
                let _ = convert::listener(&l);
            }
        }
        1 => {
            if let Ok(rc) = RouteConfiguration::decode(body) {
                let _ = convert::route_table(&rc);
            }
        }
        2 => {
            if let Ok(c) = Cluster::decode(body) {
                let _ = convert::cluster(&c);
            }
        }
        _ => {
            if let Ok(cla) = ClusterLoadAssignment::decode(body) {
                let _ = convert::endpoints(&cla);
            }
        }
    }
});
