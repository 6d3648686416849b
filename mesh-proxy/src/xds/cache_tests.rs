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

/// A chain for `addr` alone, routed by RouteConfiguration `route`.
fn address_chain(addr: std::net::SocketAddr, route: &str) -> FilterChain {
    use envoy_types::pb::envoy::config::core::v3::CidrRange;
    use envoy_types::pb::envoy::config::listener::v3::FilterChainMatch;
    let mut chain = http_listener(route).filter_chains.remove(0);
    chain.filter_chain_match = Some(FilterChainMatch {
        destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value {
            value: u32::from(addr.port()),
        }),
        prefix_ranges: vec![CidrRange {
            address_prefix: addr.ip().to_string(),
            prefix_len: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 32 }),
        }],
        ..Default::default()
    });
    chain
}

#[test]
fn scoped_address_listeners_join_the_outbound_listener_with_what_they_name() {
    use mesh_api::consts::xds::{OUTBOUND_LISTENER, address_listener};
    use std::net::SocketAddr;
    let metrics = Metrics::new();
    let mut c = Cache::scoped();
    let outbound = Listener {
        name: OUTBOUND_LISTENER.into(),
        ..Default::default()
    };
    c.apply(Type::Cluster, &[], &[]).expect("cds");
    c.apply(
        Type::Listener,
        &[incoming(OUTBOUND_LISTENER, "1", &outbound)],
        &[],
    )
    .expect("lds");
    assert!(c.complete(), "nothing named yet");
    let vip: SocketAddr = "10.96.0.12:80".parse().expect("an address");
    let name = address_listener(vip);
    let by_address = Listener {
        name: name.clone(),
        bind_to_port: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        filter_chains: vec![address_chain(vip, "reviews:80")],
        ..Default::default()
    };
    c.apply(Type::Listener, &[incoming(&name, "1", &by_address)], &[])
        .expect("an address listener");
    assert!(!c.complete(), "its route is missing");
    let route = RouteConfiguration {
        name: "reviews:80".into(),
        virtual_hosts: vec![envoy_types::pb::envoy::config::route::v3::VirtualHost {
            name: "reviews".into(),
            domains: vec!["*".into()],
            routes: vec![envoy_types::pb::envoy::config::route::v3::Route {
                r#match: Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                    path_specifier: Some(
                        envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier::Prefix(
                            "/".into(),
                        ),
                    ),
                    ..Default::default()
                }),
                action: Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(
                    envoy_types::pb::envoy::config::route::v3::RouteAction {
                        cluster_specifier: Some(
                            envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier::Cluster(
                                "outbound|80||reviews".into(),
                            ),
                        ),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    c.apply(Type::Route, &[incoming("reviews:80", "1", &route)], &[])
        .expect("rds");
    assert_eq!(
        c.wanted(Type::Cluster),
        &["outbound|80||reviews".to_string()].into(),
        "the route's cluster is subscribed to by name"
    );
    assert!(!c.complete(), "its cluster is missing");
    c.apply(
        Type::Cluster,
        &[incoming(
            "outbound|80||reviews",
            "1",
            &eds_cluster("outbound|80||reviews"),
        )],
        &[],
    )
    .expect("cds by name");
    assert!(!c.complete(), "its endpoints are missing");
    c.apply(
        Type::Endpoint,
        &[incoming(
            "outbound|80||reviews",
            "1",
            &cla("outbound|80||reviews", &[9080]),
        )],
        &[],
    )
    .expect("eds");
    assert!(c.complete());
    let s = c.snapshot(&metrics);
    let merged = s.listeners.get(OUTBOUND_LISTENER).expect("outbound");
    assert_eq!(
        merged.chains.len(),
        1,
        "the address's chain joined: {merged:?}"
    );
    match merged.select(vip) {
        crate::state::ChainChoice::Chain(ch) => assert_eq!(ch.port, Some(80)),
        other => panic!("{vip} must find the address's chain: {other:?}"),
    }
    // A cluster the controller does not have completes the config all the same.
    c.apply(Type::Cluster, &[], &["outbound|80||reviews".to_string()])
        .expect("removed");
    assert!(c.complete(), "an absent cluster is not waited for");
}

#[test]
fn an_address_listener_may_match_its_own_address_only() {
    use std::net::SocketAddr;
    let vip: SocketAddr = "10.96.0.12:80".parse().expect("an address");
    let other: SocketAddr = "10.96.0.13:80".parse().expect("an address");
    let mut c = Cache::scoped();
    let hijack = Listener {
        name: "10.96.0.12_80".into(),
        bind_to_port: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        filter_chains: vec![address_chain(other, "x")],
        ..Default::default()
    };
    let e = c
        .apply(
            Type::Listener,
            &[incoming("10.96.0.12_80", "1", &hijack)],
            &[],
        )
        .expect_err("a chain for another address");
    assert!(e.to_string().contains("10.96.0.12:80 alone"), "{e}");
    let bound = Listener {
        name: "10.96.0.12_80".into(),
        filter_chains: vec![address_chain(vip, "x")],
        ..Default::default()
    };
    let e = c
        .apply(
            Type::Listener,
            &[incoming("10.96.0.12_80", "1", &bound)],
            &[],
        )
        .expect_err("a listener that binds");
    assert!(e.to_string().contains("bind_to_port"), "{e}");
}

#[test]
fn clusters_the_wildcard_brought_stay_when_no_longer_subscribed_to_by_name() {
    let mut c = Cache::scoped();
    let wildcard = [
        incoming(
            "PassthroughCluster",
            "1",
            &eds_cluster("PassthroughCluster"),
        ),
        incoming("inbound|8080||", "1", &eds_cluster("inbound|8080||")),
    ];
    c.apply(Type::Cluster, &wildcard, &[]).expect("wildcard");
    c.note_wildcard(&wildcard, &[], &BTreeSet::new());
    let by_name: BTreeSet<String> =
        ["outbound|80||a".to_string(), "inbound|8080||".to_string()].into();
    let named = [incoming(
        "outbound|80||a",
        "1",
        &eds_cluster("outbound|80||a"),
    )];
    c.apply(Type::Cluster, &named, &[]).expect("by name");
    c.note_wildcard(&named, &[], &by_name);
    // Nothing names either any more: the one subscribed by name goes, the wildcard's stay.
    c.retain_subscribed(Type::Cluster, &BTreeSet::new());
    assert_eq!(
        c.names(Type::Cluster),
        [
            "PassthroughCluster".to_string(),
            "inbound|8080||".to_string()
        ]
        .into()
    );
    // A subscription change is the names wanted, whatever the wildcard brought.
    assert_eq!(c.subscription_change(Type::Cluster, &BTreeSet::new()), None);
}

#[test]
fn a_gateways_certificates_are_wanted_by_its_listeners_and_awaited() {
    use crate::state::convert::tests::{edge_chain, gateway_listener, secret_proto, self_signed};
    let metrics = Metrics::new();
    let mut c = Cache::default();
    c.apply(Type::Cluster, &[], &[]).expect("cds");
    let l = gateway_listener(8443, vec![edge_chain(&["a.example.com"], &["infra/a"])]);
    c.apply(Type::Listener, &[incoming("gateway_8443", "1", &l)], &[])
        .expect("lds");
    assert_eq!(c.wanted(Type::Secret), &["infra/a".to_string()].into());
    let route = RouteConfiguration {
        name: "gateway/infra/edge/443/l".into(),
        ..Default::default()
    };
    c.apply(
        Type::Route,
        &[incoming("gateway/infra/edge/443/l", "1", &route)],
        &[],
    )
    .expect("rds");
    assert!(!c.complete(), "the certificate has not arrived");
    let (cert, key) = self_signed("a.example.com");
    let other = rcgen::KeyPair::generate().expect("key").serialize_pem();
    let bad = secret_proto("infra/a", cert.pem(), other);
    let err = c
        .apply(Type::Secret, &[incoming("infra/a", "1", &bad)], &[])
        .expect_err("a key of another certificate");
    assert!(err.to_string().contains("Secret \"infra/a\""), "{err}");
    assert!(!c.complete(), "a refused certificate is not held");
    let good = secret_proto("infra/a", cert.pem(), key);
    c.apply(Type::Secret, &[incoming("infra/a", "2", &good)], &[])
        .expect("sds");
    assert!(c.complete());
    let s = c.snapshot(&metrics);
    assert_eq!(
        s.secrets.get("infra/a").map(|c| c.fingerprint.clone()),
        Some(mesh_api::tls::fingerprint(cert.der()))
    );
    // The listener gone, its certificate is no longer wanted.
    c.apply(Type::Listener, &[], &["gateway_8443".to_string()])
        .expect("lds");
    assert!(c.wanted(Type::Secret).is_empty());
}

/// A virtual host of `domain` whose one route sends everything to `cluster`.
fn vhost_to(domain: &str, cluster: &str) -> envoy_types::pb::envoy::config::route::v3::VirtualHost {
    use envoy_types::pb::envoy::config::route::v3::{
        Route, RouteAction, RouteMatch, VirtualHost, route, route_action, route_match,
    };
    VirtualHost {
        name: domain.into(),
        domains: vec![domain.into()],
        routes: vec![Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.into())),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn a_route_change_converts_only_the_virtual_hosts_it_changes() {
    let mut c = Cache::default();
    let rc = |b: &str| RouteConfiguration {
        name: "outbound_http".into(),
        virtual_hosts: vec![vhost_to("a", "ca"), vhost_to("b", b), vhost_to("c", "cc")],
        ..Default::default()
    };
    c.apply(
        Type::Route,
        &[incoming("outbound_http", "1", &rc("cb"))],
        &[],
    )
    .expect("first version");
    let before = c.routes["outbound_http"].clone();
    c.apply(
        Type::Route,
        &[incoming("outbound_http", "2", &rc("cb2"))],
        &[],
    )
    .expect("second version");
    let after = c.routes["outbound_http"].clone();
    let same: Vec<bool> = before
        .vhosts()
        .iter()
        .zip(after.vhosts())
        .map(|(x, y)| Arc::ptr_eq(x, y))
        .collect();
    assert_eq!(same, [true, false, true], "only b is converted again");
    assert_eq!(after.clusters().collect::<Vec<_>>(), ["ca", "cb2", "cc"]);
    // Its memo holds what the new version has, and goes with it.
    assert_eq!(c.vhost_memos["outbound_http"].len(), 3);
    c.apply(Type::Route, &[], &["outbound_http".into()])
        .expect("removal");
    assert!(c.vhost_memos.is_empty());
}

#[test]
fn virtual_hosts_are_found_wherever_the_encoding_puts_them() {
    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
    // Fields of the configuration between and after its virtual hosts, as another control
    // plane may order them: each a record of its own on the wire.
    let header = |k: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: "1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let part = |m: RouteConfiguration| m.encode_to_vec();
    let mut wire = part(RouteConfiguration {
        virtual_hosts: vec![vhost_to("a", "ca")],
        ..Default::default()
    });
    wire.extend(part(RouteConfiguration {
        name: "rc".into(),
        request_headers_to_add: vec![header("x-one")],
        ..Default::default()
    }));
    wire.extend(part(RouteConfiguration {
        virtual_hosts: vec![vhost_to("b", "cb")],
        ignore_port_in_host_matching: true,
        ..Default::default()
    }));
    let whole = RouteConfiguration::decode(wire.as_slice()).expect("valid");
    assert_eq!(whole.virtual_hosts.len(), 2);
    let (table, memo) =
        convert::route_table_reusing("rc", &wire, convert::VhostMemo::default(), None)
            .expect("taken");
    let expected = convert::route_table(&whole).expect("taken");
    assert_eq!(
        serde_json::to_value(&table).expect("json"),
        serde_json::to_value(&expected).expect("json")
    );
    assert_eq!(table.name, "rc");
    assert!(table.ignore_port);
    assert_eq!(memo.len(), 2);
    // Cut anywhere inside, it is refused with the resource's name, never taken in part.
    for cut in 1..wire.len() {
        if RouteConfiguration::decode(&wire[..cut]).is_ok() {
            continue;
        }
        let err = convert::route_table_reusing("rc", &wire[..cut], memo.clone(), Some(&table))
            .map(|_| ())
            .expect_err("truncated");
        assert_eq!((err.kind, err.name.as_str()), ("RouteConfiguration", "rc"));
    }
}
