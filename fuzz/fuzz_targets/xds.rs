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
            // From the wire as the proxy takes it: virtual hosts split out undecoded, then the
            // same bytes again with the memo of the first (every one reused). Taken or refused,
            // and taken as the same table, as a whole decode converted host by host.
            let json = |t: &mesh_proxy::state::RouteTable| serde_json::to_value(t).ok();
            let whole = RouteConfiguration::decode(body)
                .ok()
                .and_then(|rc| convert::route_table(&rc).ok());
            let first =
                convert::route_table_reusing("fuzz", body, convert::VhostMemo::default(), None);
            assert_eq!(
                first.as_ref().ok().map(|(t, _)| json(t)),
                whole.as_ref().map(json),
                "the split and a whole decode disagree"
            );
            if let Ok((table, memo)) = first {
                let (again, _) = convert::route_table_reusing("fuzz", body, memo, Some(&table))
                    .expect("taken once, taken again from the memo");
                assert_eq!(
                    json(&table),
                    json(&again),
                    "the memo changed what the bytes mean"
                );
                // The domain index it shared with the first finds what a fresh one finds.
                let fresh = whole.as_ref().expect("taken as a whole decode is");
                for d in fresh.vhosts().iter().flat_map(|v| &v.domains) {
                    assert_eq!(
                        again.vhost(d).map(|v| &v.name),
                        fresh.vhost(d).map(|v| &v.name),
                        "the shared domain index disagrees on {d}"
                    );
                }
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
