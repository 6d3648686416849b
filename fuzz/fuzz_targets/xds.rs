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
                // Again with the memo, and after the host-by-host table: other virtual host
                // objects with the same domains, whose domain index it shares.
                let whole = whole.as_ref().expect("taken as the split is");
                let (again, _) = convert::route_table_reusing("fuzz", body, memo, Some(whole))
                    .expect("taken once, taken again from the memo");
                assert_eq!(
                    json(&table),
                    json(&again),
                    "the memo changed what the bytes mean"
                );
                // The shared index finds, in any case, what the split's own index finds.
                for d in table.vhosts().iter().flat_map(|v| &v.domains) {
                    for host in [d.clone(), d.to_ascii_uppercase()] {
                        assert_eq!(
                            again.vhost(&host).map(|v| &v.name),
                            table.vhost(&host).map(|v| &v.name),
                            "the shared domain index disagrees on {host}"
                        );
                    }
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
