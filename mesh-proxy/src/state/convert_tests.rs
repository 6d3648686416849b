use envoy_types::pb::envoy::config::core::v3::{CidrRange, SocketAddress};
use envoy_types::pb::envoy::config::endpoint::v3::{Endpoint, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{FilterChainMatch, ListenerFilter};
use envoy_types::pb::envoy::config::route::v3::{
    RouteAction, RouteMatch as PbRouteMatch, WeightedCluster, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::*;
use crate::state::route::{AbortCode, Share};

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn hcm_filter(route: &str, extra: Vec<HttpFilter>) -> Filter {
    let mut http_filters = extra;
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
            value: vec![],
        })),
        ..Default::default()
    });
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(
            &HttpConnectionManager {
                route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                    route_config_name: route.into(),
                    config_source: None,
                })),
                http_filters,
                ..Default::default()
            },
        ))),
    }
}

fn chain(port: u32, filter: Filter) -> PbFilterChain {
    PbFilterChain {
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(UInt32Value { value: port }),
            prefix_ranges: vec![CidrRange {
                address_prefix: "10.96.0.10".into(),
                prefix_len: Some(UInt32Value { value: 32 }),
            }],
            application_protocols: vec!["http/1.1".into(), "h2c".into()],
            ..Default::default()
        }),
        filters: vec![filter],
        ..Default::default()
    }
}

fn listener(name: &str, chains: Vec<PbFilterChain>) -> Listener {
    Listener {
        name: name.into(),
        filter_chains: chains,
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn accepts_the_controllers_outbound_listener() {
    let l = listener(
        "virtualOutbound",
        vec![chain(9080, hcm_filter("reviews:9080", vec![]))],
    );
    let cfg = super::listener(&l).expect("accepted");
    assert_eq!(cfg.chains.len(), 1);
    let c = &cfg.chains[0];
    assert_eq!(c.port, Some(9080));
    assert_eq!(c.app_protocols, [Detected::Http1, Detected::H2c]);
    assert!(matches!(&c.filter, NetworkFilter::Http { route, .. } if route == "reviews:9080"));
}

#[test]
fn refusals_name_the_resource_and_field() {
    let unknown_filter = HttpFilter {
        name: "envoy.filters.http.lua".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua".into(),
            value: vec![],
        })),
        ..Default::default()
    };
    let cases: Vec<(Listener, &str)> = vec![
        (
            listener(
                "virtualOutbound",
                vec![chain(80, hcm_filter("r", vec![unknown_filter]))],
            ),
            r#"Listener "virtualOutbound": filter_chains[0].filters[0].typed_config.http_filters[0]: unsupported HTTP filter "envoy.filters.http.lua""#,
        ),
        (
            listener("my-gateway", vec![]),
            r#"Listener "my-gateway": name: mesh-proxy serves only the listeners"#,
        ),
        (
            {
                let mut l = listener("virtualInbound", vec![chain(80, hcm_filter("r", vec![]))]);
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .expect("match")
                    .server_names = vec!["a.example".into()];
                l
            },
            r#"Listener "virtualInbound": filter_chains[0].filter_chain_match.server_names"#,
        ),
        (
            {
                let mut l = listener("virtualInbound", vec![chain(80, hcm_filter("r", vec![]))]);
                l.filter_chains[0]
                    .filter_chain_match
                    .as_mut()
                    .expect("match")
                    .application_protocols = vec!["istio-peer-exchange".into()];
                l
            },
            "application_protocols[0]: \"istio-peer-exchange\" cannot be detected",
        ),
    ];
    for (l, want) in cases {
        let err = super::listener(&l).expect_err("refused").to_string();
        assert!(
            err.starts_with(want) || err.contains(want),
            "{err}\nwanted: {want}"
        );
    }
}

fn forward_route(action: RouteAction) -> RouteConfiguration {
    RouteConfiguration {
        name: "reviews:9080".into(),
        virtual_hosts: vec![PbVhost {
            name: "reviews".into(),
            domains: vec!["*".into()],
            routes: vec![PbRoute {
                name: "default/reviews".into(),
                r#match: Some(PbRouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(action)),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn routes_with_weights_retries_and_timeouts() {
    let rc = forward_route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
            WeightedCluster {
                clusters: vec![
                    weighted_cluster::ClusterWeight {
                        name: "v1".into(),
                        weight: Some(UInt32Value { value: 90 }),
                        ..Default::default()
                    },
                    weighted_cluster::ClusterWeight {
                        name: "v2".into(),
                        weight: Some(UInt32Value { value: 10 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        )),
        timeout: Some(PbDuration {
            seconds: 0,
            nanos: 0,
        }),
        retry_policy: Some(PbRetry {
            retry_on: "5xx,connect-failure,refused-stream,reset".into(),
            num_retries: Some(UInt32Value { value: 2 }),
            per_try_timeout: Some(PbDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let t = route_table(&rc).expect("accepted");
    let Action::Forward(f) = &t.vhosts()[0].routes[0].action else {
        panic!("forward");
    };
    assert_eq!(f.total_weight, 100);
    assert_eq!(f.timeout, None, "a zero timeout disables it");
    let r = f.retry.as_ref().expect("retry");
    assert_eq!(r.attempts, 2);
    assert!(r.on_5xx && r.on_connect_failure && r.on_reset && r.on_refused_stream);
    assert_eq!(r.per_try_timeout, Some(Duration::from_secs(1)));

    // gRPC statuses, by Envoy's names.
    let grpc = forward_route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("c".into())),
        retry_policy: Some(PbRetry {
            retry_on: "cancelled,unavailable,resource-exhausted".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let t = route_table(&grpc).expect("gRPC retries");
    let Action::Forward(f) = &t.vhosts()[0].routes[0].action else {
        panic!("a forward");
    };
    let r = f.retry.as_ref().expect("retry");
    assert_eq!(r.grpc_statuses, vec![1, 14, 8]);
    let mut trailers_only = http::HeaderMap::new();
    trailers_only.insert("grpc-status", http::HeaderValue::from_static("14"));
    assert!(r.retries_grpc(&trailers_only));
    trailers_only.insert("grpc-status", http::HeaderValue::from_static("3"));
    assert!(!r.retries_grpc(&trailers_only));

    let bad = forward_route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("c".into())),
        retry_policy: Some(PbRetry {
            retry_on: "5xx,envoy-ratelimited".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = route_table(&bad).expect_err("refused").to_string();
    assert!(
        err.starts_with(r#"RouteConfiguration "reviews:9080": virtual_hosts[0].routes[0].route.retry_policy.retry_on: "envoy-ratelimited""#),
        "{err}"
    );
}

#[test]
fn clusters_and_endpoints() {
    let c = PbCluster {
        name: "outbound|9080||reviews".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        typed_extension_protocol_options: [(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(),
            any(&HttpProtocolOptions {
                upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                Default::default(),
                            ),
                        ),
                    },
                )),
                ..Default::default()
            }),
        )]
        .into(),
        ..Default::default()
    };
    let def = cluster(&c).expect("accepted");
    assert_eq!(def.protocol, UpstreamProtocol::Http2);
    assert_eq!(
        def.kind,
        ClusterKind::Eds {
            service_name: "outbound|9080||reviews".into()
        }
    );

    let dns = PbCluster {
        name: "ext".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        )),
        ..Default::default()
    };
    let err = cluster(&dns).expect_err("refused").to_string();
    assert_eq!(
        err,
        r#"Cluster "ext": type: STRICT_DNS is not supported (supported: EDS, STATIC, ORIGINAL_DST)"#
    );

    let ep = |addr: &str, port: u32| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: addr.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let cla = ClusterLoadAssignment {
        cluster_name: "c".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![ep("10.1.0.1", 9080), ep("10.1.0.2", 9080)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let eps = endpoints(&cla).expect("accepted");
    assert_eq!(eps.len(), 2);
    let bad = ClusterLoadAssignment {
        cluster_name: "c".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![ep("reviews.example", 9080)],
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = endpoints(&bad).expect_err("refused").to_string();
    assert!(
        err.contains("endpoints[0].lb_endpoints[0].endpoint.address.address"),
        "{err}"
    );
    assert!(err.contains("DNS names are not supported"), "{err}");
}

#[test]
fn envoy_substitutions_become_regex_replacements() {
    assert_eq!(envoy_substitution(r"/v2/\1"), "/v2/${1}");
    assert_eq!(envoy_substitution("/$x"), "/$$x");
}

fn mesh_tls_socket(require_client: bool, sds: &str) -> TransportSocket {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, SdsSecretConfig,
    };
    use envoy_types::pb::google::protobuf::BoolValue;
    let ctx = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue {
            value: require_client,
        }),
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: sds.into(),
                sds_config: None,
            }],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                    SdsSecretConfig {
                        name: "ROOTCA".into(),
                        sds_config: None,
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

#[test]
fn mesh_tls_chains_are_accepted_and_anything_else_refused() {
    let mut tls = chain(9080, hcm_filter("r", vec![]));
    let m = tls.filter_chain_match.as_mut().expect("match");
    m.transport_protocol = "tls".into();
    m.application_protocols = vec!["h2".into(), "http/1.1".into()];
    tls.transport_socket = Some(mesh_tls_socket(true, "default"));
    let mut raw = chain(9080, hcm_filter("r", vec![]));
    raw.filter_chain_match
        .as_mut()
        .expect("match")
        .transport_protocol = "raw_buffer".into();
    let l = listener("virtualInbound", vec![tls.clone(), raw]);
    let converted = super::listener(&l).expect("accepted");
    assert_eq!(converted.chains[0].transport, Transport::Tls);
    assert!(converted.chains[0].terminate_tls);
    assert_eq!(
        converted.chains[0].app_protocols,
        [Detected::H2c, Detected::Http1]
    );
    assert_eq!(converted.chains[1].transport, Transport::Raw);
    assert!(!converted.chains[1].terminate_tls);

    let cases = [
        (
            mesh_tls_socket(false, "default"),
            "transport_socket.typed_config.require_client_certificate: mesh TLS is mutual",
        ),
        (
            mesh_tls_socket(true, "my-cert"),
            "tls_certificate_sds_secret_configs[0].name: \"my-cert\": only the proxy's own SVID",
        ),
    ];
    for (socket, want) in cases {
        let mut c = tls.clone();
        c.transport_socket = Some(socket);
        let err = super::listener(&listener("virtualInbound", vec![c]))
            .expect_err("refused")
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    // Terminating TLS on a chain that does not match TLS is a mistake.
    let mut c = tls.clone();
    c.filter_chain_match
        .as_mut()
        .expect("match")
        .transport_protocol = String::new();
    let err = super::listener(&listener("virtualInbound", vec![c]))
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("must match transport_protocol \"tls\""),
        "{err}"
    );
}

#[test]
fn endpoint_identities_come_from_mesh_metadata() {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let ep = |identity: Option<Kind>| LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "10.1.0.1".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(9080)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        metadata: identity.map(|k| Metadata {
            filter_metadata: [(
                "mesh.dev".to_string(),
                Struct {
                    fields: [("identity".to_string(), Value { kind: Some(k) })].into(),
                },
            )]
            .into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let cla = |e: LbEndpoint| ClusterLoadAssignment {
        cluster_name: "c".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![e],
            ..Default::default()
        }],
        ..Default::default()
    };
    let id = "spiffe://cluster.local/ns/default/sa/reviews";
    let eps = endpoints(&cla(ep(Some(Kind::StringValue(id.into()))))).expect("accepted");
    assert_eq!(eps[0].identity.as_ref().map(|i| i.as_str()), Some(id));
    assert_eq!(
        endpoints(&cla(ep(None))).expect("accepted")[0].identity,
        None
    );
    let err = endpoints(&cla(ep(Some(Kind::StringValue("spiffe://x".into())))))
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("metadata.filter_metadata[\"mesh.dev\"].identity"),
        "{err}"
    );
}

#[test]
fn outlier_detection_counts_connection_failures_as_envoy_does() {
    use envoy_types::pb::envoy::config::cluster::v3::OutlierDetection;
    let with = |o: Option<OutlierDetection>| {
        cluster(&PbCluster {
            name: "c".into(),
            outlier_detection: o,
            ..Default::default()
        })
        .expect("cluster")
        .outlier
    };
    // No outlier detection: mesh-proxy's own, which ejects at the first refused connection.
    assert_eq!(with(None).consecutive_unreachable, Some(1));
    // Envoy's: counted as 5xx, unless split out as local-origin failures.
    let envoy = with(Some(OutlierDetection::default()));
    assert_eq!(
        (envoy.consecutive_failures, envoy.consecutive_unreachable),
        (Some(5), None)
    );
    let split = |enforcing: Option<u32>| {
        with(Some(OutlierDetection {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failure: Some(UInt32Value { value: 2 }),
            enforcing_consecutive_local_origin_failure: enforcing
                .map(|value| UInt32Value { value }),
            ..Default::default()
        }))
    };
    let on = split(None);
    assert_eq!(
        (on.consecutive_unreachable, on.split_local),
        (Some(2), true)
    );
    let off = split(Some(0));
    assert_eq!((off.consecutive_unreachable, off.split_local), (None, true));
}

fn fault_filter(f: &HttpFault) -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.fault".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(f))),
        ..Default::default()
    }
}

fn percent(n: u32) -> Option<FractionalPercent> {
    Some(FractionalPercent {
        numerator: n,
        denominator: fractional_percent::DenominatorType::Hundred as i32,
    })
}

fn faulty_route(f: &HttpFault) -> RouteConfiguration {
    let mut rc = forward_route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("v1".into())),
        ..Default::default()
    });
    rc.virtual_hosts[0].routes[0]
        .typed_per_filter_config
        .insert("envoy.filters.http.fault".into(), any(f));
    rc
}

#[test]
fn faults_come_per_route_from_envoys_fault_filter() {
    use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
        FaultDelay as PbDelay, fault_delay,
    };
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
        FaultAbort as PbAbort, fault_abort,
    };
    // The chain's placeholder is what marks its routes' faults as applying.
    let l = listener(
        "virtualOutbound",
        vec![chain(
            80,
            hcm_filter("r", vec![fault_filter(&HttpFault::default())]),
        )],
    );
    let cfg = super::listener(&l).expect("accepted");
    assert!(matches!(
        &cfg.chains[0].filter,
        NetworkFilter::Http { faults: true, .. }
    ));
    let delay = PbDelay {
        percentage: percent(10),
        fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(PbDuration {
            seconds: 0,
            nanos: 200_000_000,
        })),
    };
    let abort = |error_type| PbAbort {
        percentage: percent(25),
        error_type: Some(error_type),
        ..Default::default()
    };
    let f = HttpFault {
        delay: Some(delay),
        abort: Some(abort(fault_abort::ErrorType::GrpcStatus(14))),
        ..Default::default()
    };
    let table = route_table(&faulty_route(&f)).expect("accepted");
    let fault = table.vhosts()[0].routes[0].fault.as_ref().expect("a fault");
    let d = fault.delay.as_ref().expect("a delay");
    assert_eq!(
        (d.fixed, d.share.per_million),
        (Duration::from_millis(200), 100_000)
    );
    let a = fault.abort.as_ref().expect("an abort");
    assert_eq!(
        (a.code, a.share.per_million),
        (AbortCode::Grpc(14), 250_000)
    );

    // Refused, each naming its field: what mesh-proxy does not do, and faults for every
    // route on the chain.
    let refused = [
        (
            HttpFault {
                abort: Some(abort(fault_abort::ErrorType::HttpStatus(99))),
                ..Default::default()
            },
            "abort.http_status: 99 is not an HTTP status",
        ),
        (
            HttpFault {
                abort: Some(abort(fault_abort::ErrorType::HeaderAbort(
                    Default::default(),
                ))),
                ..Default::default()
            },
            "abort: supported: http_status, grpc_status",
        ),
        (
            HttpFault {
                delay: Some(delay),
                max_active_faults: Some(UInt32Value { value: 1 }),
                ..Default::default()
            },
            "max_active_faults: not supported",
        ),
    ];
    for (f, want) in refused {
        let err = route_table(&faulty_route(&f))
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains(r#"typed_per_filter_config["envoy.filters.http.fault"]"#)
                && err.contains(want),
            "{err}\nwanted: {want}"
        );
    }
    let everywhere = HttpFault {
        delay: Some(delay),
        ..Default::default()
    };
    let l = listener(
        "virtualOutbound",
        vec![chain(80, hcm_filter("r", vec![fault_filter(&everywhere)]))],
    );
    let err = super::listener(&l).expect_err("refused").to_string();
    assert!(
        err.contains("faults for every route are not supported"),
        "{err}"
    );
}

#[test]
fn a_fault_share_holds_over_any_run_of_requests() {
    let share = Share::new(100_000);
    let hits = (0..1000).filter(|_| share.hit()).count();
    assert!((99..=101).contains(&hits), "{hits} of 1000 at 10 %");
    assert!(!Share::new(0).hit());
    assert!(Share::new(1_000_000).hit());
}

#[test]
fn a_faults_delay_and_abort_are_drawn_independently() {
    // Half delayed and half aborted: a quarter both, as with independent draws, whatever the
    // two sequences' random starts.
    for _ in 0..20 {
        let (delay, abort) = (Share::new(500_000), Share::independent(500_000));
        let both = (0..10_000)
            .filter(|_| {
                let d = delay.hit();
                let a = abort.hit();
                d && a
            })
            .count();
        assert!(
            (2_400..=2_600).contains(&both),
            "{both} of 10,000 both delayed and aborted, not about 2,500"
        );
    }
}

/// A gateway's HTTPS chain as the controller sends it: server names, its certificates over
/// ADS, ALPN h2 and http/1.1.
pub(crate) fn edge_chain(names: &[&str], certs: &[&str]) -> PbFilterChain {
    use envoy_types::pb::envoy::config::core::v3::{
        AggregatedConfigSource, ConfigSource, config_source,
    };
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        CommonTlsContext, SdsSecretConfig,
    };
    let ads = ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    };
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: certs
                .iter()
                .map(|n| SdsSecretConfig {
                    name: n.to_string(),
                    sds_config: Some(ads.clone()),
                })
                .collect(),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    PbFilterChain {
        filter_chain_match: Some(FilterChainMatch {
            server_names: names.iter().map(|n| n.to_string()).collect(),
            transport_protocol: "tls".into(),
            ..Default::default()
        }),
        filters: vec![hcm_filter("gateway/infra/edge/443/l", vec![])],
        transport_socket: Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
        }),
        ..Default::default()
    }
}

pub(crate) fn gateway_listener(port: u32, chains: Vec<PbFilterChain>) -> Listener {
    Listener {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".into(),
            ..Default::default()
        }],
        ..listener(&format!("gateway_{port}"), chains)
    }
}

#[test]
fn a_gateways_listener_binds_its_address_and_chooses_chains_by_server_name() {
    let l = gateway_listener(
        8443,
        vec![
            edge_chain(&["shop.example.com"], &["infra/shop"]),
            edge_chain(&["*.example.com"], &["infra/any-rsa", "infra/any-ecdsa"]),
            edge_chain(&["*.a.example.com"], &["infra/deep"]),
            edge_chain(&[], &["infra/fallback"]),
        ],
    );
    let c = super::listener(&l).expect("accepted");
    assert_eq!(c.bind, Some("127.0.0.1:8443".parse().expect("addr")));
    assert!(c.edge_tls());
    let edge = c.chains[1].edge_tls.as_ref().expect("edge TLS");
    assert_eq!(edge.certificates, ["infra/any-rsa", "infra/any-ecdsa"]);
    assert_eq!(edge.alpn, ["h2", "http/1.1"]);
    assert!(!c.chains[1].terminate_tls, "not mesh TLS");
    let by = |sni: Option<&str>| {
        c.by_server_name(sni)
            .and_then(|ch| ch.edge_tls.as_ref())
            .map(|t| t.certificates[0].clone())
    };
    for (sni, want) in [
        (Some("shop.example.com"), "infra/shop"),
        (Some("SHOP.example.com."), "infra/shop"),
        (Some("api.example.com"), "infra/any-rsa"),
        (Some("x.y.example.com"), "infra/any-rsa"),
        (Some("x.a.example.com"), "infra/deep"),
        (Some("example.com"), "infra/fallback"),
        (Some("other.org"), "infra/fallback"),
        (None, "infra/fallback"),
    ] {
        assert_eq!(by(sni).as_deref(), Some(want), "{sni:?}");
    }
    // Without a chain that names none, an unknown name (or none) finds no chain.
    let strict = super::listener(&gateway_listener(
        8443,
        vec![edge_chain(&["shop.example.com"], &["infra/shop"])],
    ))
    .expect("accepted");
    assert!(strict.by_server_name(Some("other.org")).is_none());
    assert!(strict.by_server_name(None).is_none());
}

#[test]
fn a_gateways_listener_refuses_what_it_cannot_serve() {
    use envoy_types::pb::google::protobuf::BoolValue;
    let good = edge_chain(&["a.example.com"], &["infra/a"]);
    let tls_of = |c: &PbFilterChain| -> DownstreamTlsContext {
        let Some(transport_socket::ConfigType::TypedConfig(a)) = c
            .transport_socket
            .as_ref()
            .and_then(|t| t.config_type.clone())
        else {
            panic!("a TLS chain");
        };
        DownstreamTlsContext::decode(a.value.as_slice()).expect("decodes")
    };
    let with_tls = |f: &dyn Fn(&mut DownstreamTlsContext)| {
        let mut c = good.clone();
        let mut ctx = tls_of(&c);
        f(&mut ctx);
        c.transport_socket = Some(TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
        });
        c
    };
    let mut wrong_port = gateway_listener(8443, vec![good.clone()]);
    wrong_port.name = "gateway_9443".into();
    let mut no_address = gateway_listener(8443, vec![good.clone()]);
    no_address.address = None;
    let mut plaintext_names = good.clone();
    plaintext_names.transport_socket = None;
    let mut bad_name = good.clone();
    bad_name
        .filter_chain_match
        .as_mut()
        .expect("match")
        .server_names = vec!["a b.example.com".into()];
    let tls_case = |f: &dyn Fn(&mut DownstreamTlsContext), want: &'static str| {
        (gateway_listener(8443, vec![with_tls(f)]), want)
    };
    let cases: Vec<(Listener, &str)> = vec![
        (
            wrong_port,
            "address: 127.0.0.1:8443: the listener of port 9443 binds that port",
        ),
        (no_address, "address: expected a socket address"),
        tls_case(
            &|t| t.require_client_certificate = Some(BoolValue { value: true }),
            "require_client_certificate: client certificates at a gateway are not supported",
        ),
        tls_case(
            &|t| {
                t.common_tls_context
                    .as_mut()
                    .expect("common")
                    .tls_certificate_sds_secret_configs[0]
                    .sds_config = None
            },
            "tls_certificate_sds_secret_configs[0].sds_config: a gateway's certificates come over ADS",
        ),
        (
            gateway_listener(
                8443,
                vec![with_tls(&|t| {
                    t.common_tls_context
                        .as_mut()
                        .expect("common")
                        .alpn_protocols = vec!["spdy/3".into()]
                })],
            ),
            "alpn_protocols[0]: \"spdy/3\" is not served",
        ),
        (
            gateway_listener(8443, vec![plaintext_names.clone()]),
            "server_names: only a chain that terminates a gateway's TLS matches server names",
        ),
        (
            gateway_listener(8443, vec![bad_name]),
            "server_names[0]: \"a b.example.com\" is not a host name",
        ),
        (
            listener("virtualInbound", vec![plaintext_names.clone()]),
            "server_names: matched on a gateway's listeners only",
        ),
    ];
    let mut cases = cases;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        TlsParameters, downstream_tls_context::SessionTicketKeysType,
    };
    cases.extend([
        tls_case(
            &|t| t.require_sni = Some(BoolValue { value: true }),
            "typed_config.require_sni: not supported",
        ),
        tls_case(
            &|t| {
                t.session_ticket_keys_type = Some(
                    SessionTicketKeysType::DisableStatelessSessionResumption(false),
                )
            },
            "typed_config.disable_stateless_session_resumption: not supported",
        ),
        tls_case(
            &|t| t.disable_stateful_session_resumption = true,
            "typed_config.disable_stateful_session_resumption: not supported",
        ),
        tls_case(
            &|t| {
                t.common_tls_context.as_mut().expect("common").tls_params =
                    Some(TlsParameters::default())
            },
            "common_tls_context.tls_params: not supported",
        ),
        tls_case(
            &|t| {
                t.common_tls_context
                    .as_mut()
                    .expect("common")
                    .validation_context_type = Some(
                    common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(
                        Default::default(),
                    ),
                )
            },
            "common_tls_context.validation_context: client certificates at a gateway",
        ),
    ]);
    let mut unbound = gateway_listener(8443, vec![good.clone()]);
    unbound.bind_to_port = Some(BoolValue { value: false });
    let mut on_a_port = good.clone();
    on_a_port
        .filter_chain_match
        .as_mut()
        .expect("match")
        .destination_port = Some(UInt32Value { value: 8443 });
    let mut twice = good.clone();
    twice
        .filter_chain_match
        .as_mut()
        .expect("match")
        .server_names = vec!["b.example.com".into(), "a.example.com".into()];
    let mut guarded = good.clone();
    guarded.filters.insert(
        0,
        Filter {
            name: "envoy.filters.network.rbac".into(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&NetRbac {
                rules: Some(Default::default()),
                ..Default::default()
            }))),
        },
    );
    let mut plaintext = chain(0, hcm_filter("r", vec![]));
    plaintext.filter_chain_match = None;
    cases.extend([
        (unbound, "bind_to_port: a gateway's listener binds its address"),
        (
            gateway_listener(8443, vec![on_a_port]),
            "filter_chain_match.destination_port: a gateway's chains are chosen by TLS server name alone",
        ),
        (
            gateway_listener(8443, vec![good.clone(), twice]),
            "filter_chains[1].filter_chain_match.server_names: \"a.example.com\" is matched by another chain too",
        ),
        (
            gateway_listener(8443, vec![guarded]),
            "filters: RBAC filters are enforced on virtualInbound only, not at a gateway",
        ),
        (
            gateway_listener(8443, vec![good.clone(), plaintext.clone()]),
            "filter_chains[1].transport_socket: a listener that terminates a gateway's TLS does so on every chain",
        ),
        (
            gateway_listener(8080, vec![plaintext.clone(), plaintext]),
            "filter_chains: a gateway's plaintext port has one chain",
        ),
        (
            gateway_listener(
                8443,
                vec![edge_chain(&[], &["infra/a"]), edge_chain(&[], &["infra/b"])],
            ),
            "filter_chains[1].filter_chain_match.server_names: another chain also matches every server name",
        ),
    ]);
    for (l, want) in cases {
        let err = super::listener(&l).expect_err(want).to_string();
        assert!(err.contains(want), "{err}\nwanted: {want}");
    }
}

#[test]
fn path_rules_come_from_the_connection_manager() {
    use http_connection_manager::PathWithEscapedSlashesAction as A;
    let hcm_with = |normalize: bool, merge: bool, action: A| {
        let mut f = hcm_filter("r", vec![]);
        let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type else {
            panic!("typed");
        };
        let mut h = HttpConnectionManager::decode(a.value.as_slice()).expect("decodes");
        h.normalize_path = Some(envoy_types::pb::google::protobuf::BoolValue { value: normalize });
        h.merge_slashes = merge;
        h.path_with_escaped_slashes_action = action as i32;
        h.use_remote_address = Some(envoy_types::pb::google::protobuf::BoolValue { value: true });
        *a = any(&h);
        f
    };
    let convert = |f: Filter| super::listener(&listener("virtualOutbound", vec![chain(80, f)]));
    let l = convert(hcm_with(true, true, A::UnescapeAndRedirect)).expect("accepted");
    let NetworkFilter::Http {
        paths,
        remote_address,
        ..
    } = &l.chains[0].filter
    else {
        panic!("HTTP");
    };
    assert_eq!(
        *paths,
        PathRules {
            normalize: true,
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect
        }
    );
    assert!(remote_address);
    for (f, want) in [
        (
            hcm_with(true, false, A::RejectRequest),
            "merge_slashes: mesh-proxy merges slashes as it normalizes",
        ),
        (
            hcm_with(true, true, A::KeepUnchanged),
            "path_with_escaped_slashes_action: with normalize_path, say what happens",
        ),
        (
            {
                let mut f = hcm_with(true, true, A::RejectRequest);
                let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type else {
                    panic!("typed");
                };
                let mut h = HttpConnectionManager::decode(a.value.as_slice()).expect("decodes");
                h.xff_num_trusted_hops = 1;
                *a = any(&h);
                f
            },
            "xff_num_trusted_hops: not supported",
        ),
    ] {
        let err = convert(f).expect_err(want).to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// An SDS Secret named `name` with a PEM chain and key.
pub(crate) fn secret_proto(
    name: &str,
    chain: String,
    key: String,
) -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
    use envoy_types::pb::envoy::config::core::v3::DataSource;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        Secret, TlsCertificate, secret,
    };
    let inline = |s: String| DataSource {
        specifier: Some(data_source::Specifier::InlineString(s)),
        ..Default::default()
    };
    Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline(chain)),
            private_key: Some(inline(key)),
            ..Default::default()
        })),
    }
}

/// A self-signed certificate for `host`, and its key (PEM).
pub(crate) fn self_signed(host: &str) -> (rcgen::Certificate, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    (cert, key.serialize_pem())
}

#[test]
fn a_secret_is_a_certificate_with_its_key() {
    let (cert, key) = self_signed("a.example.com");
    let other = rcgen::KeyPair::generate().expect("key").serialize_pem();
    let ok = super::secret(&secret_proto("infra/a", cert.pem(), key)).expect("accepted");
    assert_eq!(ok.fingerprint, mesh_api::tls::fingerprint(cert.der()));
    let err = super::secret(&secret_proto("infra/a", cert.pem(), other))
        .expect_err("another key")
        .to_string();
    assert!(
        err.contains("Secret \"infra/a\": tls_certificate: private_key is not the key of the first certificate in certificate_chain"),
        "{err}"
    );
    let err = super::secret(
        &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret {
            name: "infra/b".into(),
            r#type: None,
        },
    )
    .expect_err("no certificate")
    .to_string();
    assert!(err.contains("takes only certificates"), "{err}");
}
