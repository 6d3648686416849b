//! TrafficPolicy as standard Envoy config: a Service port's [`ClusterPolicy`] on its cluster
//! (`lb_policy`, `circuit_breakers`, `outlier_detection`, `connect_timeout`, the upstream
//! `max_requests_per_connection`), a consistent hash as the routes' `hash_policy`, and retries
//! as routes' `retry_policy`. mesh-proxy reads the same fields (`docs/reference/proxy.md`).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection, circuit_breakers, cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    HttpProtocolOptions as CommonHttpProtocolOptions, Metadata, RoutingPriority,
};
use envoy_types::pb::envoy::config::route::v3::{RetryPolicy, retry_policy, route_action};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Value, value};
use mesh_api::crds::{GrpcRetryStatus, RetryOn};

use super::pb::{any, pb_duration, u32v};
use crate::index::routes::Retry;
use crate::index::traffic::{Balancer, ClusterPolicy, HashKey};

/// The retry host predicate that sends a retry to another endpoint.
pub const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

/// Key of a cluster's `mesh.dev` metadata that tells mesh-proxy to balance by peak EWMA
/// latency; Envoy and gRPC clients have no such balancer and read the cluster's
/// `ROUND_ROBIN` (gRPC's proxyless clients refuse `LEAST_REQUEST` in `lb_policy`).
pub const BALANCER_KEY: &str = "balancer";
pub const PEAK_EWMA: &str = "peak-ewma";

fn set_balancer(c: &mut Cluster, b: &Balancer) {
    use cluster::LbPolicy as L;
    c.lb_policy = match b {
        Balancer::LeastRequest => L::LeastRequest,
        Balancer::PeakEwma | Balancer::RoundRobin => L::RoundRobin,
        Balancer::Random => L::Random,
        Balancer::Hash(_) => L::RingHash,
    } as i32;
    if *b == Balancer::PeakEwma {
        let meta = c.metadata.get_or_insert_with(Metadata::default);
        meta.filter_metadata
            .entry(mesh_api::consts::xds::ENDPOINT_METADATA.to_string())
            .or_default()
            .fields
            .insert(
                BALANCER_KEY.into(),
                Value {
                    kind: Some(value::Kind::StringValue(PEAK_EWMA.into())),
                },
            );
    }
}

/// Applies a Service port's policy to its cluster; the default policy (no TrafficPolicy)
/// only marks peak EWMA for mesh-proxy over round robin for Envoy and gRPC clients.
pub fn apply_cluster_policy(c: &mut Cluster, p: &ClusterPolicy) {
    set_balancer(c, &p.balancer);
    let l = &p.limits;
    let budget = p
        .retry_budget
        .as_ref()
        .map(|b| circuit_breakers::thresholds::RetryBudget {
            budget_percent: Some(Percent {
                value: f64::from(b.percent),
            }),
            min_retry_concurrency: u32v(b.min_retry_concurrency),
            budget_interval: b.interval.map(pb_duration),
        });
    if l.max_connections.is_some()
        || l.max_pending_requests.is_some()
        || l.max_requests.is_some()
        || l.max_retries.is_some()
        || budget.is_some()
    {
        c.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                priority: RoutingPriority::Default as i32,
                max_connections: l.max_connections.and_then(u32v),
                max_pending_requests: l.max_pending_requests.and_then(u32v),
                max_requests: l.max_requests.and_then(u32v),
                max_retries: l.max_retries.and_then(u32v),
                retry_budget: budget,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(o) = &p.outlier {
        let gateway_only = o.consecutive_5xx.is_none() && o.consecutive_gateway_errors.is_some();
        c.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.and_then(u32v),
            // Envoy counts 5xx from 5 in a row unless told not to enforce it.
            enforcing_consecutive_5xx: gateway_only.then(|| u32v(0)).flatten(),
            consecutive_gateway_failure: o.consecutive_gateway_errors.and_then(u32v),
            // Envoy does not enforce gateway failures unless told to.
            enforcing_consecutive_gateway_failure: o
                .consecutive_gateway_errors
                .map(|_| 100)
                .and_then(u32v),
            // Consecutive failures only: no success-rate ejection, which mesh-proxy lacks.
            enforcing_success_rate: u32v(0),
            interval: o.interval.map(pb_duration),
            base_ejection_time: o.base_ejection_time.map(pb_duration),
            max_ejection_percent: o.max_ejection_percent.and_then(u32v),
            ..Default::default()
        });
    }
    if let Some(t) = p.connect_timeout {
        c.connect_timeout = Some(pb_duration(t));
    }
    if let Some(n) = l.max_requests_per_connection {
        set_max_requests_per_connection(c, n);
    }
}

const PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Sets the upstream HTTP protocol options' `max_requests_per_connection`, keeping the
/// protocol choice already there (the client's, when none).
fn set_max_requests_per_connection(c: &mut Cluster, n: u32) {
    let mut opts = c
        .typed_extension_protocol_options
        .get(PROTOCOL_OPTIONS)
        .and_then(|a| prost::Message::decode(a.value.as_slice()).ok())
        // Without options Envoy speaks HTTP/1.1 upstream: say so, rather than change it.
        .unwrap_or_else(|| HttpProtocolOptions {
            upstream_protocol_options: Some(
                http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                    http_protocol_options::ExplicitHttpConfig {
                        protocol_config: Some(
                            http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                                Default::default(),
                            ),
                        ),
                    },
                ),
            ),
            ..Default::default()
        });
    opts.common_http_protocol_options
        .get_or_insert_with(CommonHttpProtocolOptions::default)
        .max_requests_per_connection = u32v(n);
    c.typed_extension_protocol_options
        .insert(PROTOCOL_OPTIONS.into(), any(&opts));
}

/// A route's hash policy for a backend that hashes by `key`.
pub fn hash_policy(key: &HashKey) -> route_action::HashPolicy {
    use route_action::hash_policy::{self as hp, PolicySpecifier as P};
    let specifier = match key {
        HashKey::Header(name) => P::Header(hp::Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        HashKey::Cookie { name, ttl, path } => P::Cookie(hp::Cookie {
            name: name.clone(),
            ttl: ttl.map(pb_duration),
            path: path.clone().unwrap_or_default(),
            ..Default::default()
        }),
        HashKey::SourceIp => P::ConnectionProperties(hp::ConnectionProperties { source_ip: true }),
    };
    route_action::HashPolicy {
        policy_specifier: Some(specifier),
        terminal: false,
    }
}

/// Tries beyond the first of a request that never reached an endpoint, when the route sets no
/// retry of its own.
const DEFAULT_RETRIES: u32 = 2;

/// The retry policy of a route: its retry (a route rule's own, or a TrafficPolicy's), and the
/// route's `backendRequest` timeout as each try's. A route with no retry still retries what
/// is always safe to retry, as Istio's default does: a request whose connection failed, or
/// whose HTTP/2 stream the endpoint refused, never reached the app, so it goes to up to two
/// other endpoints.
pub fn retry_policy(retry: Option<&Retry>, backend_timeout: Option<Duration>) -> RetryPolicy {
    let mut p = RetryPolicy {
        per_try_timeout: backend_timeout
            .or_else(|| retry.and_then(|r| r.per_try_timeout))
            .map(pb_duration),
        num_retries: u32v(retry.map_or(DEFAULT_RETRIES, |r| r.attempts)),
        // A retry goes to another endpoint when there is one, as mesh-proxy's do.
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: PREVIOUS_HOSTS.into(),
            config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                any(&PreviousHostsPredicate {}),
            )),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    };
    let Some(r) = retry else {
        p.retry_on = "connect-failure,refused-stream".into();
        return p;
    };
    let mut on: Vec<&str> = Vec::new();
    if r.on.is_empty() {
        // A route rule's retry, or a policy naming only codes: those codes (any 5xx without
        // codes), failed connections and resets.
        if r.codes.is_empty() && r.grpc.is_empty() {
            on.push("5xx");
        }
        on.extend(["connect-failure", "refused-stream", "reset"]);
    }
    for o in &r.on {
        match o {
            RetryOn::FiveXx => on.push("5xx"),
            RetryOn::GatewayError => on.push("gateway-error"),
            RetryOn::ConnectFailure => on.push("connect-failure"),
            RetryOn::Reset => on.extend(["refused-stream", "reset"]),
        }
    }
    if !r.codes.is_empty() {
        on.insert(0, "retriable-status-codes");
    }
    for g in &r.grpc {
        on.push(match g {
            GrpcRetryStatus::Cancelled => "cancelled",
            GrpcRetryStatus::DeadlineExceeded => "deadline-exceeded",
            GrpcRetryStatus::Internal => "internal",
            GrpcRetryStatus::ResourceExhausted => "resource-exhausted",
            GrpcRetryStatus::Unavailable => "unavailable",
        });
    }
    on.dedup();
    p.retry_on = on.join(",");
    p.retriable_status_codes = r.codes.iter().map(|c| u32::from(*c)).collect();
    if let Some(b) = r.backoff {
        p.retry_back_off = Some(retry_policy::RetryBackOff {
            base_interval: Some(pb_duration(b)),
            max_interval: None,
        });
    }
    p
}
