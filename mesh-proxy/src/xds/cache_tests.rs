use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, filter};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds, http_connection_manager,
};

use super::*;

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn incoming<M: Message + Name>(name: &str, version: &str, m: &M) -> Incoming {
    Incoming {
        name: name.into(),
        version: version.into(),
        body: any(m),
    }
}

fn eds_cluster(name: &str) -> PbCluster {
    PbCluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    }
}

fn cla(name: &str, ports: &[u16]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: ports
                .iter()
                .map(|p| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "127.0.0.1".into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    u32::from(*p),
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn http_listener(route: &str) -> Listener {
    Listener {
        name: "outbound_http".into(),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "hcm".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    &HttpConnectionManager {
                        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                            route_config_name: route.into(),
                            config_source: None,
                        })),
                        ..Default::default()
                    },
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn complete_only_when_everything_referenced_arrived() {
    let metrics = Metrics::new();
    let mut c = Cache::default();
    c.apply(Type::Cluster, &[incoming("a", "1", &eds_cluster("a"))], &[])
        .expect("cds");
    assert!(!c.complete(), "no listeners yet");
    c.apply(
        Type::Listener,
        &[incoming("outbound_http", "1", &http_listener("rc"))],
        &[],
    )
    .expect("lds");
    assert_eq!(c.wanted_routes(), ["rc".to_string()].into());
    assert_eq!(c.wanted_endpoints(), ["a".to_string()].into());
    assert!(!c.complete(), "route and endpoints missing");
    c.apply(
        Type::Route,
        &[incoming(
            "rc",
            "1",
            &RouteConfiguration {
                name: "rc".into(),
                ..Default::default()
            },
        )],
        &[],
    )
    .expect("rds");
    assert!(!c.complete(), "endpoints missing");
    c.apply(
        Type::Endpoint,
        &[incoming("a", "1", &cla("a", &[1000, 1001]))],
        &[],
    )
    .expect("eds");
    assert!(c.complete());
    let s = c.snapshot(&metrics);
    assert_eq!(s.cluster("a").expect("cluster").endpoints.len(), 2);
    assert!(!c.changed());
}

#[test]
fn a_refused_response_changes_nothing() {
    let metrics = Metrics::new();
    let mut c = Cache::default();
    c.apply(Type::Cluster, &[incoming("a", "1", &eds_cluster("a"))], &[])
        .expect("cds");
    let dns = PbCluster {
        name: "b".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::LogicalDns as i32,
        )),
        ..Default::default()
    };
    // One good and one bad resource: neither is applied, and the old one is not removed.
    let err = c
        .apply(
            Type::Cluster,
            &[
                incoming("c", "2", &eds_cluster("c")),
                incoming("b", "2", &dns),
            ],
            &["a".to_string()],
        )
        .expect_err("refused");
    assert_eq!(err.name, "b");
    assert_eq!(c.names(Type::Cluster), ["a".to_string()].into());
    let s = c.snapshot(&metrics);
    assert!(s.cluster("a").is_some() && s.cluster("c").is_none());
}

#[test]
fn endpoint_updates_keep_balancer_state() {
    let metrics = Metrics::new();
    let mut c = Cache::default();
    c.apply(Type::Cluster, &[incoming("a", "1", &eds_cluster("a"))], &[])
        .expect("cds");
    c.apply(
        Type::Endpoint,
        &[incoming("a", "1", &cla("a", &[1000]))],
        &[],
    )
    .expect("eds");
    let s1 = c.snapshot(&metrics);
    let held = s1
        .cluster("a")
        .expect("a")
        .endpoints
        .pick(None, None)
        .expect("endpoint");
    c.apply(
        Type::Endpoint,
        &[incoming("a", "2", &cla("a", &[1000, 1001]))],
        &[],
    )
    .expect("eds");
    let s2 = c.snapshot(&metrics);
    let eps = s2.cluster("a").expect("a").endpoints.endpoints().to_vec();
    assert_eq!(eps.len(), 2);
    // The same endpoint object, with the request still in flight.
    assert!(Arc::ptr_eq(&eps[0], &held.endpoint));
    assert_eq!(eps[0].pending(), 1);
    // Removing the cluster removes it from the next snapshot.
    c.apply(Type::Cluster, &[], &["a".to_string()])
        .expect("cds");
    assert!(c.snapshot(&metrics).cluster("a").is_none());
}

#[test]
fn state_of_the_world_removals() {
    let mut c = Cache::default();
    c.apply(
        Type::Cluster,
        &[
            incoming("a", "1", &eds_cluster("a")),
            incoming("b", "1", &eds_cluster("b")),
        ],
        &[],
    )
    .expect("cds");
    let present = [incoming("b", "2", &eds_cluster("b"))];
    assert_eq!(
        c.full_state_removals(Type::Cluster, &present),
        ["a".to_string()]
    );
    assert_eq!(
        resource_name(Type::Cluster, &any(&eds_cluster("z"))).expect("name"),
        "z"
    );
}

#[test]
fn endpoints_reach_every_cluster_using_their_service_name() {
    let metrics = Metrics::new();
    let mut c = Cache::default();
    let named = |name: &str, service: &str| PbCluster {
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: None,
            service_name: service.into(),
        }),
        ..eds_cluster(name)
    };
    c.apply(
        Type::Cluster,
        &[
            incoming("a", "1", &named("a", "svc")),
            incoming("b", "1", &named("b", "svc")),
        ],
        &[],
    )
    .expect("cds");
    assert_eq!(c.wanted_endpoints(), ["svc".to_string()].into());
    let _ = c.snapshot(&metrics);
    c.apply(
        Type::Endpoint,
        &[incoming("svc", "1", &cla("svc", &[1000, 1001]))],
        &[],
    )
    .expect("eds");
    let s = c.snapshot(&metrics);
    assert_eq!(s.cluster("a").expect("a").endpoints.len(), 2);
    assert_eq!(s.cluster("b").expect("b").endpoints.len(), 2);
    // Cluster b moves to another service name: svc's updates no longer reach it.
    c.apply(
        Type::Cluster,
        &[incoming("b", "2", &named("b", "other"))],
        &[],
    )
    .expect("cds");
    let _ = c.snapshot(&metrics);
    c.apply(
        Type::Endpoint,
        &[incoming("svc", "2", &cla("svc", &[1000]))],
        &[],
    )
    .expect("eds");
    let s = c.snapshot(&metrics);
    assert_eq!(s.cluster("a").expect("a").endpoints.len(), 1);
    assert_eq!(s.cluster("b").expect("b").endpoints.len(), 0);
}
