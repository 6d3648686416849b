//! Envoy v3 builders of the translation: clusters and their endpoint assignments, routes,
//! filters and filter chains, mesh TLS. Pure functions of the model's pieces; what is cached
//! and how the layers are assembled is [`super::translate`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiConfigSource, ApiVersion, CidrRange, ConfigSource,
    GrpcService, HeaderValue, HeaderValueOption, Http2ProtocolOptions, Locality, Metadata,
    PathConfigSource, RuntimeFractionalPercent, SocketAddress, TransportSocket, WatchedDirectory,
    address, api_config_source, config_source, grpc_service, header_value_option, socket_address,
    transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route,
    RouteAction as PbRouteAction, RouteMatch, WeightedCluster, header_matcher,
    query_parameter_matcher, redirect_action, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{FaultDelay, fault_delay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort, HttpFault, fault_abort,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, TlsParameters, UpstreamTlsContext, common_tls_context,
    subject_alt_name_matcher, tls_parameters,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{BoolValue, Struct, Value, value};
use mesh_api::consts::xds as names;
use prost::Name;

use super::pb::{any, network_filter, pb_duration, u32v};
use super::resources::{Resource, ResourceType};
use super::translate::SdsSource;
use crate::index::fault::{AbortCode, Fault};
use crate::index::routes::{HeaderModifier, PathMatch, PathModifier, StrMatch};
use crate::index::traffic::{Balancer, HashKey};
use crate::index::{Model, PodModel, Protocol, RouteAction, RouteEntry};

// ---- small builders ---------------------------------------------------------------------------

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

pub(super) fn socket_address(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(
            any(&Router::default()),
        )),
        ..Default::default()
    }
}

/// Envoy's fault filter, empty: its faults come per route, as Istio sends it. Optional, so a
/// proxy or gRPC client older than fault injection skips it rather than refusing the listener
/// while a controller upgrade rolls out.
fn fault_filter() -> HttpFilter {
    HttpFilter {
        name: FAULT_FILTER.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            &HttpFault::default(),
        ))),
        is_optional: true,
        ..Default::default()
    }
}

/// The fault filter's name, which keys a route's fault config.
const FAULT_FILTER: &str = "envoy.filters.http.fault";

/// A route's fault, in Envoy's form (percentages in millionths).
fn http_fault(f: &Fault) -> HttpFault {
    let share = |per_million: u32| {
        Some(FractionalPercent {
            numerator: per_million,
            denominator: fractional_percent::DenominatorType::Million as i32,
        })
    };
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelay {
            percentage: share(d.per_million),
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(pb_duration(
                d.fixed,
            ))),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbort {
            percentage: share(a.per_million),
            error_type: Some(match a.code {
                AbortCode::HttpStatus(s) => fault_abort::ErrorType::HttpStatus(u32::from(s)),
                AbortCode::GrpcStatus(s) => fault_abort::ErrorType::GrpcStatus(s),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(super) fn hcm(stat_prefix: &str, route_config: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_config.to_string(),
        })),
        http_filters: vec![fault_filter(), router_filter()],
        ..Default::default()
    }
}

pub(super) fn hcm_filter(stat_prefix: &str, route_config: &str) -> Filter {
    network_filter(
        "envoy.filters.network.http_connection_manager",
        &hcm(stat_prefix, route_config),
    )
}

/// An inbound HCM: policy filters before the router, and the path normalized as policies
/// expect it (dot segments, merged slashes, encoded slashes refused).
pub(super) fn inbound_hcm_filter(
    stat_prefix: &str,
    route_config: &str,
    policy: Vec<HttpFilter>,
) -> Filter {
    let mut h = hcm(stat_prefix, route_config);
    h.normalize_path = Some(BoolValue { value: true });
    h.merge_slashes = true;
    h.path_with_escaped_slashes_action =
        http_connection_manager::PathWithEscapedSlashesAction::RejectRequest as i32;
    h.http_filters.splice(0..0, policy);
    network_filter("envoy.filters.network.http_connection_manager", &h)
}

pub(super) fn tcp_filter(stat_prefix: &str, cluster: &str) -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        },
    )
}

pub(super) fn listener_filter<M: prost::Message + Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

/// How long a connection to an endpoint may take, unless a TrafficPolicy says (Linkerd's
/// outbound default: in a cluster a pod answers in milliseconds, and a dead one should be
/// noticed and ejected fast).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

fn eds_cluster(name: &str, protocol: Protocol) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(CONNECT_TIMEOUT)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        ..Default::default()
    };
    if protocol.is_http2() {
        set_upstream_protocol(&mut c, true);
    }
    c
}

/// Pins a cluster's upstream HTTP version (else Envoy uses HTTP/1.1, mesh-proxy the client's).
pub(super) fn set_upstream_protocol(c: &mut Cluster, http2: bool) {
    use http_protocol_options::explicit_http_config::ProtocolConfig;
    let config = if http2 {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else {
        ProtocolConfig::HttpProtocolOptions(Default::default())
    };
    let opts = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(config),
                },
            ),
        ),
        ..Default::default()
    };
    c.typed_extension_protocol_options.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        any(&opts),
    );
}

/// Endpoint metadata for an endpoint backed by a known pod: its namespace and workload (for
/// metrics); behind a mesh-proxy, also its mesh identity (the SVID that mesh TLS to it must
/// find), and whether it may be spoken to over HTTP/2 (`proxy`).
/// A string `Value`.
fn text(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

/// The field of endpoint metadata a cluster's TLS variant matches endpoints by.
const IDENTITY: &str = "identity";

/// Endpoint metadata Envoy's `transport_socket_matches` read.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

fn peer_metadata(pod: &PodModel, identity: Option<&mesh_api::SpiffeId>, h2: bool) -> Metadata {
    let mut fields = BTreeMap::from([
        ("namespace".to_string(), text(&pod.namespace)),
        ("workload".to_string(), text(&pod.workload)),
    ]);
    if let Some(identity) = identity {
        fields.insert("identity".to_string(), text(identity.as_str()));
        if h2 {
            fields.insert(
                "proxy".to_string(),
                Value {
                    kind: Some(value::Kind::BoolValue(true)),
                },
            );
        }
    }
    let mut filter_metadata: std::collections::HashMap<String, Struct> = [(
        names::ENDPOINT_METADATA.to_string(),
        Struct {
            fields: fields.into_iter().collect(),
        },
    )]
    .into();
    if let Some(identity) = identity {
        filter_metadata.insert(
            TRANSPORT_SOCKET_MATCH.to_string(),
            Struct {
                fields: [(IDENTITY.to_string(), text(identity.as_str()))].into(),
            },
        );
    }
    Metadata {
        filter_metadata,
        ..Default::default()
    }
}

/// `meta(endpoint)`: the endpoint's metadata, for endpoints behind a mesh-proxy. Ready
/// endpoints are priority 0; terminating ones that still serve come after them at priority 1
/// (or 0 when none is ready), so clients send them nothing while a ready endpoint is usable, as
/// Kubernetes intends, and in-flight requests finish.
fn load_assignment(
    cluster: &str,
    endpoints: &[crate::index::Endpoint],
    meta: impl Fn(&crate::index::Endpoint) -> Option<Metadata>,
) -> ClusterLoadAssignment {
    let group = |terminating: bool, priority: u32| LocalityLbEndpoints {
        locality: Some(Locality::default()),
        // gRPC clients drop localities without a weight.
        load_balancing_weight: u32v(1),
        lb_endpoints: endpoints
            .iter()
            .filter(|e| e.terminating == terminating)
            .map(|e| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
                    address: Some(socket_address(e.addr.ip(), e.addr.port())),
                    ..Default::default()
                })),
                load_balancing_weight: u32v(1),
                metadata: meta(e),
                ..Default::default()
            })
            .collect(),
        priority,
        ..Default::default()
    };
    let ready = group(false, 0);
    let mut groups = vec![];
    if endpoints.iter().any(|e| e.terminating) {
        let next = u32::from(!ready.lb_endpoints.is_empty());
        if next == 1 {
            groups.push(ready);
        }
        groups.push(group(true, next));
    } else {
        groups.push(ready);
    }
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: groups,
        ..Default::default()
    }
}

/// Whether a pod runs a mesh-proxy (the injector labels it `mesh.dev/proxy: "true"`).
pub(crate) fn is_proxied(p: &PodModel) -> bool {
    p.labels
        .get(mesh_api::consts::labels::PROXY)
        .is_some_and(|v| v == "true")
}

pub(super) fn static_cluster(name: &str, addr: Option<SocketAddr>) -> Cluster {
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(load_assignment(
            name,
            &addr
                .map(|addr| crate::index::Endpoint {
                    addr,
                    pod: None,
                    peer: None,
                    terminating: false,
                    hostname: None,
                })
                .into_iter()
                .collect::<Vec<_>>(),
            |_| None,
        )),
        ..Default::default()
    }
}

/// The passthrough and blackhole clusters every proxy gets.
pub(super) fn fixed_clusters() -> Vec<(ResourceType, Arc<Resource>)> {
    let passthrough = Cluster {
        name: names::PASSTHROUGH_CLUSTER.into(),
        connect_timeout: Some(pb_duration(Duration::from_secs(5))),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    vec![
        (
            ResourceType::Cluster,
            Resource::new(names::PASSTHROUGH_CLUSTER, &passthrough),
        ),
        (
            ResourceType::Cluster,
            Resource::new(
                names::BLACKHOLE_CLUSTER,
                &static_cluster(names::BLACKHOLE_CLUSTER, None),
            ),
        ),
    ]
}

// ---- routes -----------------------------------------------------------------------------------

pub(super) fn string_matcher(m: &StrMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match m {
            StrMatch::Exact(v) => string_matcher::MatchPattern::Exact(v.clone()),
            StrMatch::Regex(r) => string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            }),
        }),
        ignore_case: false,
    }
}

pub(super) fn header_matcher(name: &str, m: &StrMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(m),
        )),
        ..Default::default()
    }
}

/// Envoy route matches for one Gateway API match. A Gateway API prefix matches whole path
/// segments, so `/api` becomes an exact `/api` and a prefix `/api/`, in that order; both forms
/// are understood by Envoy and by gRPC clients alike.
fn route_matches(entry: &RouteEntry) -> Vec<RouteMatch> {
    let m = &entry.matches;
    let mut headers: Vec<HeaderMatcher> = m
        .headers
        .iter()
        .map(|(name, v)| header_matcher(name, v))
        .collect();
    if let Some(method) = &m.method {
        headers.push(header_matcher(":method", &StrMatch::Exact(method.clone())));
    }
    let query_parameters: Vec<QueryParameterMatcher> = m
        .query
        .iter()
        .map(|(name, v)| QueryParameterMatcher {
            name: name.clone(),
            query_parameter_match_specifier: Some(
                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(string_matcher(
                    v,
                )),
            ),
        })
        .collect();
    let paths = match &m.path {
        PathMatch::Exact(p) => vec![route_match::PathSpecifier::Path(p.clone())],
        PathMatch::Prefix(p) if p == "/" => vec![route_match::PathSpecifier::Prefix("/".into())],
        PathMatch::Prefix(p) => vec![
            route_match::PathSpecifier::Path(p.clone()),
            route_match::PathSpecifier::Prefix(format!("{p}/")),
        ],
        PathMatch::Regex(r) => vec![route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })],
    };
    paths
        .into_iter()
        .map(|path| RouteMatch {
            path_specifier: Some(path),
            headers: headers.clone(),
            query_parameters: query_parameters.clone(),
            ..Default::default()
        })
        .collect()
}

fn header_options(m: &HeaderModifier) -> Vec<HeaderValueOption> {
    let opt = |h: &crate::index::routes::Header,
               action: header_value_option::HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: h.name.clone(),
                value: h.value.clone(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    m.set
        .iter()
        .map(|h| {
            opt(
                h,
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
            )
        })
        .chain(m.add.iter().map(|h| {
            opt(
                h,
                header_value_option::HeaderAppendAction::AppendIfExistsOrAdd,
            )
        }))
        .collect()
}

fn forward_action(entry: &RouteEntry, backends: &[crate::index::WeightedBackend]) -> PbRouteAction {
    let cluster_of = |b: &crate::index::WeightedBackend| {
        b.cluster
            .clone()
            .unwrap_or_else(|| names::BLACKHOLE_CLUSTER.to_string())
    };
    let specifier = match backends {
        [only] if only.request_headers.is_empty() && only.response_headers.is_empty() => {
            route_action::ClusterSpecifier::Cluster(cluster_of(only))
        }
        _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: backends
                .iter()
                .map(|b| weighted_cluster::ClusterWeight {
                    name: cluster_of(b),
                    weight: u32v(b.weight),
                    request_headers_to_add: header_options(&b.request_headers),
                    request_headers_to_remove: b.request_headers.remove.clone(),
                    response_headers_to_add: header_options(&b.response_headers),
                    response_headers_to_remove: b.response_headers.remove.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let mut action = PbRouteAction {
        cluster_specifier: Some(specifier),
        // No timeout in the route means none at all (Envoy would default to 15 s).
        timeout: Some(pb_duration(entry.timeout.unwrap_or_default())),
        retry_policy: Some(super::traffic::retry_policy(
            entry.retry.as_ref(),
            entry.backend_timeout,
        )),
        hash_policy: hash_policies(backends.iter().filter_map(|b| b.hash.as_ref())),
        request_mirror_policies: entry
            .mirrors
            .iter()
            .map(|(cluster, per_million)| route_action::RequestMirrorPolicy {
                cluster: cluster.clone(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: *per_million,
                        denominator: fractional_percent::DenominatorType::Million as i32,
                    }),
                    runtime_key: String::new(),
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if let Some(rw) = &entry.rewrite {
        if let Some(host) = &rw.hostname {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(host.clone()),
            );
        }
        match &rw.path {
            Some(PathModifier::Full(full)) => {
                action.regex_rewrite = Some(RegexMatchAndSubstitute {
                    pattern: Some(RegexMatcher {
                        regex: "^/.*$".into(),
                        ..Default::default()
                    }),
                    substitution: full.clone(),
                });
            }
            Some(PathModifier::Prefix(_)) | None => {}
        }
    }
    action
}

/// The prefix rewrite for one Envoy match: the exact half of a segment prefix swaps the whole
/// path, the `/prefix/` half keeps its slash.
/// The `prefix_rewrite` of a URLRewrite's `ReplacePrefixMatch`, for one of its Envoy matches.
fn prefix_rewrite(entry: &RouteEntry, m: &RouteMatch) -> Option<String> {
    let Some(PathModifier::Prefix(to)) = entry.rewrite.as_ref().and_then(|r| r.path.as_ref())
    else {
        return None;
    };
    Some(replace_prefix(to, m))
}

/// What a `ReplacePrefixMatch` of `to` replaces the matched prefix with, for one Envoy match
/// (a segment prefix `/a` is two: `path: /a` and `prefix: /a/`, whose trailing `/` stays).
fn replace_prefix(to: &str, m: &RouteMatch) -> String {
    let to = to.trim_end_matches('/');
    match m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(ref p)) if p.ends_with('/') => format!("{to}/"),
        _ if to.is_empty() => "/".into(),
        _ => to.to_string(),
    }
}

/// A route's hash policies: one per distinct key its backends hash by.
fn hash_policies<'a>(keys: impl Iterator<Item = &'a HashKey>) -> Vec<route_action::HashPolicy> {
    let mut seen: Vec<&HashKey> = Vec::new();
    for k in keys {
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen.into_iter().map(super::traffic::hash_policy).collect()
}

/// The routes of a Service port: its route entries, or, with none, one route to the
/// Service itself (`default_cluster`) with the port's own retry and hash key, if any.
///
/// `listener_port` is the port requests come to when it is not the well-known port of their
/// scheme (a Gateway listener's): a redirect that names neither scheme nor port goes to it,
/// as the Gateway API asks, whatever port the client's Host named (and Envoy would drop it
/// with a new host).
pub(super) fn envoy_routes(
    entries: &[RouteEntry],
    default_cluster: &str,
    port: Option<&crate::index::PortModel>,
    listener_port: Option<u16>,
) -> Vec<Route> {
    if entries.is_empty() {
        // A Service port's (outbound) route; an inbound one has only the app to go to.
        let retry = port.map(|p| super::traffic::retry_policy(p.retry.as_ref(), None));
        return vec![default_route(default_cluster, retry, port)];
    }
    let mut out = Vec::new();
    for entry in entries {
        for m in route_matches(entry) {
            let action = match &entry.action {
                RouteAction::Forward(backends) => {
                    let mut a = forward_action(entry, backends);
                    if let Some(p) = prefix_rewrite(entry, &m) {
                        a.prefix_rewrite = p;
                    }
                    route::Action::Route(a)
                }
                RouteAction::Redirect(r) => {
                    use redirect_action::RedirectResponseCode as Code;
                    let code = match r.status {
                        301 => Code::MovedPermanently,
                        303 => Code::SeeOther,
                        307 => Code::TemporaryRedirect,
                        308 => Code::PermanentRedirect,
                        _ => Code::Found,
                    };
                    let path = match &r.path {
                        Some(PathModifier::Full(p)) => Some(
                            redirect_action::PathRewriteSpecifier::PathRedirect(p.clone()),
                        ),
                        Some(PathModifier::Prefix(to)) => {
                            Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(
                                replace_prefix(to, &m),
                            ))
                        }
                        None => None,
                    };
                    route::Action::Redirect(RedirectAction {
                        host_redirect: r.hostname.clone().unwrap_or_default(),
                        // A new scheme without a port goes to its well-known port (the Gateway
                        // API's rule); with neither, the request's port stays.
                        port_redirect: r
                            .port
                            .or(match r.scheme.as_deref() {
                                Some("https") => Some(443),
                                Some("http") => Some(80),
                                _ => listener_port,
                            })
                            .map(u32::from)
                            .unwrap_or_default(),
                        scheme_rewrite_specifier: r
                            .scheme
                            .clone()
                            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
                        path_rewrite_specifier: path,
                        response_code: code as i32,
                        ..Default::default()
                    })
                }
                RouteAction::Fail(status) => route::Action::DirectResponse(DirectResponseAction {
                    status: u32::from(*status),
                    ..Default::default()
                }),
            };
            out.push(Route {
                name: entry.source.clone(),
                r#match: Some(m),
                action: Some(action),
                request_headers_to_add: header_options(&entry.request_headers),
                request_headers_to_remove: entry.request_headers.remove.clone(),
                response_headers_to_add: header_options(&entry.response_headers),
                response_headers_to_remove: entry.response_headers.remove.clone(),
                typed_per_filter_config: entry
                    .fault
                    .iter()
                    .map(|f| (FAULT_FILTER.to_string(), any(&http_fault(f))))
                    .collect(),
                ..Default::default()
            });
        }
    }
    out
}

/// The one route of a port without route entries: everything to `cluster`, with `retry` and
/// the port's hash key, if any.
fn default_route(
    cluster: &str,
    retry: Option<RetryPolicy>,
    port: Option<&crate::index::PortModel>,
) -> Route {
    let hash = port
        .and_then(|p| p.traffic.as_ref())
        .and_then(|t| match &t.balancer {
            Balancer::Hash(k) => Some(k),
            _ => None,
        });
    Route {
        name: "default".into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(PbRouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
            timeout: Some(pb_duration(Duration::ZERO)),
            retry_policy: retry,
            hash_policy: hash_policies(hash.into_iter()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The route to the cluster `name` of one endpoint: the port's own retry, but not the default
/// retry of failed connections and refused streams, which would have nowhere else to go.
pub(super) fn one_endpoint_routes(name: &str, p: &crate::index::PortModel) -> Vec<Route> {
    let retry = p
        .retry
        .as_ref()
        .map(|r| super::traffic::retry_policy(Some(r), None));
    vec![default_route(name, retry, Some(p))]
}

/// A Service port's EDS cluster `name` (with the port's traffic policy) and its assignment of
/// `endpoints`, which carry their pod's identity and workload.
/// A port's cluster and endpoints, and the cluster's upstream mesh TLS variant, if any.
pub(super) type PortClusters = ([(ResourceType, Arc<Resource>); 2], Option<Arc<Resource>>);

/// A port's cluster and its endpoints; and, when an endpoint has a mesh identity, the
/// cluster's variant with upstream mesh TLS to each such endpoint (matched by its identity in
/// the endpoint metadata `envoy.transport_socket_match`; the others stay plaintext), for
/// Envoys that originate mesh TLS.
pub(super) fn cluster_and_endpoints(
    model: &Model,
    p: &crate::index::PortModel,
    name: &str,
    endpoints: &[crate::index::Endpoint],
) -> PortClusters {
    let mut c = eds_cluster(name, p.protocol);
    super::traffic::apply_cluster_policy(
        &mut c,
        p.traffic.as_deref().unwrap_or(&Default::default()),
    );
    let cla = load_assignment(name, endpoints, |e| {
        let pod = e.peer.as_deref()?;
        let id = is_proxied(pod).then(|| model.pod_identity(pod)).flatten();
        // HTTP/2 only to declared HTTP/1 ports: the peer's inbound then pins HTTP/1.1 to the
        // app, whatever it receives.
        Some(peer_metadata(
            pod,
            id.as_ref(),
            p.protocol == Protocol::Http,
        ))
    });
    let identities: BTreeSet<String> = endpoints
        .iter()
        .filter_map(|e| e.peer.as_deref())
        .filter(|pod| is_proxied(pod))
        .filter_map(|pod| model.pod_identity(pod))
        .map(|id| id.to_string())
        .collect();
    let tls = (!identities.is_empty()).then(|| {
        let mut t = c.clone();
        t.transport_socket_matches = identities
            .iter()
            .enumerate()
            .map(|(i, id)| cluster::TransportSocketMatch {
                // Envoy puts the name in stats: short, the identity is in the match.
                name: format!("mtls-{i}"),
                r#match: Some(Struct {
                    fields: [(IDENTITY.to_string(), text(id))].into(),
                }),
                transport_socket: Some(upstream_mesh_tls(id)),
            })
            .collect();
        Resource::new(name, &t)
    });
    (
        [
            (ResourceType::Cluster, Resource::new(name, &c)),
            (ResourceType::Endpoint, Resource::new(name, &cla)),
        ],
        tls,
    )
}

/// The filter chains of one port by its protocol: HTTP, TCP, or, undeclared, both, told apart
/// by `http_inspector` (so a server-speaks-first protocol is passed through, not parsed).
pub(super) fn port_chains(
    name: &str,
    protocol: Protocol,
    matching: FilterChainMatch,
    http: impl FnOnce() -> Vec<Filter>,
    tcp: impl FnOnce() -> Vec<Filter>,
) -> Vec<FilterChain> {
    let chain = |kind: &str, app: Vec<String>, filters: Vec<Filter>| FilterChain {
        name: format!("{name}/{kind}"),
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: app,
            ..matching.clone()
        }),
        filters,
        ..Default::default()
    };
    match protocol {
        Protocol::Tcp => vec![chain("tcp", vec![], tcp())],
        Protocol::Http | Protocol::Http2 | Protocol::Grpc => vec![chain("http", vec![], http())],
        Protocol::Unknown => vec![
            chain("http", vec!["http/1.1".into(), "h2c".into()], http()),
            chain("tcp", vec![], tcp()),
        ],
    }
}

pub(super) fn cidr(ip: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: u32v(if ip.is_ipv4() { 32 } else { 128 }),
    }
}

/// The transport socket that terminates mesh TLS: TLS 1.3, a client SVID required, the
/// proxy's own SVID and trust bundle (SDS `default` and `ROOTCA`, as Istio names them).
/// The SDS config of secret `name` from `source`.
pub(super) fn sds_secret(name: &str, source: &SdsSource) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(match source {
            SdsSource::Dir(dir) => ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(
                    config_source::ConfigSourceSpecifier::PathConfigSource(PathConfigSource {
                        path: format!("{dir}/{name}.yaml"),
                        // Secrets are replaced by renaming into the directory.
                        watched_directory: Some(WatchedDirectory {
                            path: dir.into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                ),
                ..Default::default()
            },
            SdsSource::Agent => ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                // As the bootstrap's own: one subscription per secret, whoever names it.
                initial_fetch_timeout: Some(pb_duration(Duration::ZERO)),
                config_source_specifier: Some(
                    config_source::ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
                        api_type: api_config_source::ApiType::Grpc as i32,
                        transport_api_version: ApiVersion::V3 as i32,
                        grpc_services: vec![GrpcService {
                            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                                grpc_service::EnvoyGrpc {
                                    cluster_name: names::SDS_CLUSTER.into(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                ),
                ..Default::default()
            },
            SdsSource::Ads => ads(),
        }),
    }
}

/// Upstream mesh TLS to an endpoint of SPIFFE ID `id`, with the secrets from the agent: TLS
/// 1.3 (Envoy's client default stops at 1.2), the SVID presented, the peer checked against the
/// trust bundle and its URI SAN against `id`, as mesh-proxy pins it. No ALPN: Envoy offers its
/// pool's protocol (h2 or http/1.1), and none for TCP.
fn upstream_mesh_tls(id: &str) -> TransportSocket {
    let agent = SdsSource::Agent;
    let ctx = UpstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
                tls_maximum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            tls_certificate_sds_secret_configs: vec![sds_secret(names::SDS_SVID, &agent)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                                san_type: subject_alt_name_matcher::SanType::Uri as i32,
                                matcher: Some(StringMatcher {
                                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                                        id.to_string(),
                                    )),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds_secret(
                            names::SDS_ROOTS,
                            &agent,
                        )),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: names::TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

pub(super) fn mesh_tls_socket(source: &SdsSource) -> TransportSocket {
    let sds = |name: &str| sds_secret(name, source);
    let ctx = DownstreamTlsContext {
        require_client_certificate: Some(BoolValue { value: true }),
        common_tls_context: Some(CommonTlsContext {
            tls_params: Some(TlsParameters {
                tls_minimum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
                ..Default::default()
            }),
            tls_certificate_sds_secret_configs: vec![sds(names::SDS_SVID)],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    names::SDS_ROOTS,
                )),
            ),
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    TransportSocket {
        name: names::TLS_TRANSPORT_SOCKET.into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(&ctx))),
    }
}

/// A plaintext chain's mesh TLS twin: matches TLS, terminates it, and tells HTTP versions
/// apart by the negotiated ALPN (`h2`) instead of detection (`h2c`).
pub(super) fn mesh_tls_chain(plain: &FilterChain, tls: &TransportSocket) -> FilterChain {
    let mut c = plain.clone();
    c.name = format!("{}/mtls", plain.name);
    let m = c.filter_chain_match.get_or_insert_with(Default::default);
    m.transport_protocol = "tls".into();
    for p in &mut m.application_protocols {
        if p == "h2c" {
            *p = "h2".into();
        }
    }
    c.transport_socket = Some(tls.clone());
    c
}

/// A chain that takes plaintext only (beside mesh TLS chains, in PERMISSIVE mode).
pub(super) fn raw_chain(mut c: FilterChain) -> FilterChain {
    c.filter_chain_match
        .get_or_insert_with(Default::default)
        .transport_protocol = "raw_buffer".into();
    c
}
