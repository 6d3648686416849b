//! TrafficPolicies, read once per change and resolved per target while a Service is built:
//!
//! ```text
//!  TrafficPolicy --targetRefs--> Service [port]        -> ClusterPolicy of that port's cluster
//!       |                                                 (balancing, limits, outlier, budget)
//!       +-----------targetRefs--> HTTPRoute/GRPCRoute [rule] -> Retry of that rule's requests
//!       +-----------targetRefs--> Service [port]        -> Retry of requests to it, when no
//!                                                          route rule says
//! ```
//!
//! Precedence, most specific first: for a cluster field, a policy naming the port
//! (`sectionName`) over one naming the whole Service; for retries, the HTTPRoute rule's own
//! `retry` (experimental channel), then a policy on the rule by name, on the route, on the
//! parent Service's port, on the parent Service. Among policies equally specific, the oldest
//! wins, then the first by name (the Gateway API's rule for conflicts). Each field of a cluster
//! policy (`loadBalancer`, `connectionLimits`, `outlierDetection`, `retryBudget`,
//! `connectTimeout`) is taken whole from the first policy that sets it.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mesh_api::crds::{
    GrpcRetryStatus, LoadBalancerAlgorithm, PolicyTargetReference, RetryOn, TrafficPolicy,
};
use serde::Serialize;

use super::routes::Retry;
use crate::objects::{Kind, ObjKey};

/// What clients do with the endpoints of one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterPolicy {
    pub balancer: Balancer,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    pub retry_budget: Option<RetryBudget>,
    pub connect_timeout: Option<Duration>,
    /// `namespace/name` of the policies that set something here.
    pub from: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    #[default]
    PeakEwma,
    LeastRequest,
    RoundRobin,
    Random,
    Hash(HashKey),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    Header(String),
    Cookie {
        name: String,
        ttl: Option<Duration>,
        path: Option<String>,
    },
    SourceIp,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_connections: Option<u32>,
    pub max_pending_requests: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Outlier {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_retry_concurrency: u32,
    /// Count the requests sent over this interval instead of those in flight.
    pub interval: Option<Duration>,
}

/// What a policy attaches to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Service {
        name: String,
        port: Option<String>,
    },
    Route {
        kind: Kind,
        name: String,
        rule: Option<String>,
    },
}

/// One TrafficPolicy, read.
#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub key: ObjKey,
    created: Option<Time>,
    pub targets: Vec<Target>,
    balancer: Option<Balancer>,
    limits: Option<Limits>,
    outlier: Option<Outlier>,
    retry_budget: Option<RetryBudget>,
    connect_timeout: Option<Duration>,
    retry: Option<Retry>,
    /// `(field, reason)` of what cannot be read; that part of the policy does not apply.
    pub errors: Vec<(String, String)>,
}

impl Compiled {
    /// Whether it sets anything a cluster has.
    fn has_cluster_fields(&self) -> bool {
        self.balancer.is_some()
            || self.limits.is_some()
            || self.outlier.is_some()
            || self.retry_budget.is_some()
            || self.connect_timeout.is_some()
    }

    fn name(&self) -> String {
        format!("{}/{}", self.key.namespace, self.key.name)
    }
}

/// A Gateway API duration, as routes read theirs; an unreadable one goes to `errors`.
fn duration(s: &str, field: &str, errors: &mut Vec<(String, String)>) -> Option<Duration> {
    super::routes::duration(s, field)
        .map_err(|e| errors.push((e.field, e.reason)))
        .ok()
}

fn target(t: &PolicyTargetReference) -> Result<Target, String> {
    match (t.group.as_str(), t.kind.as_str()) {
        ("" | "core", "Service") => Ok(Target::Service {
            name: t.name.clone(),
            port: t.section_name.clone(),
        }),
        ("gateway.networking.k8s.io", k @ ("HTTPRoute" | "GRPCRoute")) => Ok(Target::Route {
            kind: if k == "HTTPRoute" {
                Kind::HTTPRoute
            } else {
                Kind::GRPCRoute
            },
            name: t.name.clone(),
            rule: t.section_name.clone(),
        }),
        (g, k) => Err(format!(
            "{g:?}/{k:?} is not a Service or a gateway.networking.k8s.io HTTPRoute or GRPCRoute; this reference is ignored"
        )),
    }
}

/// Reads a TrafficPolicy. What cannot be read is left out and named in `errors`.
pub fn compile(p: &TrafficPolicy, key: &ObjKey) -> Compiled {
    let s = &p.spec;
    let mut errors = Vec::new();
    let mut targets = Vec::new();
    for (i, t) in s.target_refs.iter().enumerate() {
        match target(t) {
            Ok(t) => targets.push(t),
            Err(why) => errors.push((format!("spec.targetRefs[{i}].kind"), why)),
        }
    }
    if s.target_refs.is_empty() {
        errors.push((
            "spec.targetRefs".into(),
            "nothing to attach to: the policy has no effect".into(),
        ));
    }
    let balancer = s.load_balancer.as_ref().and_then(|lb| {
        let hash = lb.consistent_hash.as_ref();
        match (lb.algorithm, hash) {
            (LoadBalancerAlgorithm::ConsistentHash, None) => {
                errors.push((
                    "spec.loadBalancer.consistentHash".into(),
                    "ConsistentHash needs a key: header, cookie or sourceIP; the balancer of the \
                     next policy, or the default, applies"
                        .into(),
                ));
                None
            }
            (LoadBalancerAlgorithm::ConsistentHash, Some(h)) => {
                let mut keys = Vec::new();
                if let Some(name) = &h.header {
                    let field = "spec.loadBalancer.consistentHash.header";
                    match super::routes::header_name(name, field) {
                        Ok(()) => keys.push(HashKey::Header(name.to_ascii_lowercase())),
                        Err(e) => errors.push((field.into(), format!("{}; the key is ignored", e.reason))),
                    }
                }
                if let Some(c) = &h.cookie {
                    let ttl = c.ttl.as_deref().and_then(|t| {
                        duration(t, "spec.loadBalancer.consistentHash.cookie.ttl", &mut errors)
                    });
                    keys.push(HashKey::Cookie {
                        name: c.name.clone(),
                        ttl,
                        path: c.path.clone(),
                    });
                }
                if h.source_ip == Some(true) {
                    keys.push(HashKey::SourceIp);
                }
                match keys.len() {
                    1 => keys.pop().map(Balancer::Hash),
                    n => {
                        errors.push((
                            "spec.loadBalancer.consistentHash".into(),
                            format!("needs exactly one of header, cookie and sourceIP, has {n}; the balancer is left as it was"),
                        ));
                        None
                    }
                }
            }
            (_, Some(_)) => {
                errors.push((
                    "spec.loadBalancer.consistentHash".into(),
                    format!(
                        "only read with algorithm ConsistentHash, not {:?}; it is ignored",
                        lb.algorithm
                    ),
                ));
                Some(simple(lb.algorithm))
            }
            (a, None) => Some(simple(a)),
        }
    });
    let limits = s.connection_limits.as_ref().map(|l| Limits {
        max_connections: l.max_connections,
        max_pending_requests: l.max_pending_requests,
        max_requests: l.max_requests,
        max_retries: l.max_retries,
        max_requests_per_connection: l.max_requests_per_connection,
    });
    let outlier = s.outlier_detection.as_ref().map(|o| Outlier {
        consecutive_5xx: o.consecutive_5xx,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        interval: o
            .interval
            .as_deref()
            .and_then(|d| duration(d, "spec.outlierDetection.interval", &mut errors)),
        base_ejection_time: o
            .base_ejection_time
            .as_deref()
            .and_then(|d| duration(d, "spec.outlierDetection.baseEjectionTime", &mut errors)),
        max_ejection_percent: o.max_ejection_percent.map(|p| p.min(100)),
    });
    let retry_budget = s.retry_budget.as_ref().map(|b| RetryBudget {
        percent: b.percent.unwrap_or(20).min(100),
        min_retry_concurrency: b.min_retry_concurrency.unwrap_or(3),
        interval: b
            .interval
            .as_deref()
            .and_then(|d| duration(d, "spec.retryBudget.interval", &mut errors))
            .filter(|d| !d.is_zero()),
    });
    let connect_timeout = s
        .connect_timeout
        .as_deref()
        .and_then(|d| duration(d, "spec.connectTimeout", &mut errors))
        .filter(|d| !d.is_zero());
    let retry = s.retry.as_ref().and_then(|r| {
        let field = "spec.retry";
        let mut codes = Vec::new();
        for (i, c) in r.codes.iter().enumerate() {
            if (400..=599).contains(c) {
                codes.push(*c);
            } else {
                errors.push((
                    format!("{field}.codes[{i}]"),
                    format!("invalid status code {c}: must be 400..=599; the retry is ignored"),
                ));
                return None;
            }
        }
        let attempts = r.attempts.unwrap_or(1);
        if attempts > 100 {
            errors.push((
                format!("{field}.attempts"),
                format!("invalid attempts {attempts}: must be 0..=100; the retry is ignored"),
            ));
            return None;
        }
        let mut on: Vec<RetryOn> = r.on.clone();
        on.sort();
        on.dedup();
        let mut grpc: Vec<GrpcRetryStatus> = r.grpc_statuses.clone();
        grpc.sort();
        grpc.dedup();
        Some(Retry {
            attempts,
            codes,
            backoff: r
                .backoff
                .as_deref()
                .and_then(|d| duration(d, "spec.retry.backoff", &mut errors)),
            per_try_timeout: r
                .per_try_timeout
                .as_deref()
                .and_then(|d| duration(d, "spec.retry.perTryTimeout", &mut errors))
                .filter(|d| !d.is_zero()),
            on,
            grpc,
            from: Some(format!("TrafficPolicy {}/{}", key.namespace, key.name)),
        })
    });
    let mut c = Compiled {
        key: key.clone(),
        created: p.metadata.creation_timestamp.clone(),
        targets,
        balancer,
        limits,
        outlier,
        retry_budget,
        connect_timeout,
        retry,
        errors,
    };
    let on_routes = c.targets.iter().any(|t| matches!(t, Target::Route { .. }));
    if on_routes && c.has_cluster_fields() {
        c.errors.push((
            "spec.targetRefs".into(),
            "loadBalancer, connectionLimits, outlierDetection, retryBudget and connectTimeout \
             configure a Service's endpoints: on a route they are ignored (target the backend \
             Service)"
                .into(),
        ));
    }
    c
}

fn simple(a: LoadBalancerAlgorithm) -> Balancer {
    match a {
        LoadBalancerAlgorithm::PeakEwma | LoadBalancerAlgorithm::ConsistentHash => {
            Balancer::PeakEwma
        }
        LoadBalancerAlgorithm::LeastRequest => Balancer::LeastRequest,
        LoadBalancerAlgorithm::RoundRobin => Balancer::RoundRobin,
        LoadBalancerAlgorithm::Random => Balancer::Random,
    }
}

/// Policies of one namespace that attach to `matches`, most specific first (`specificity`
/// higher is more specific), then oldest, then by name.
fn ranked<'a>(
    policies: impl Iterator<Item = &'a Compiled>,
    namespace: &str,
    specificity: impl Fn(&Target) -> Option<u8>,
) -> Vec<&'a Compiled> {
    let mut hits: Vec<(u8, &Compiled)> = policies
        .filter(|p| p.key.namespace == namespace)
        .filter_map(|p| {
            p.targets
                .iter()
                .filter_map(&specificity)
                .max()
                .map(|s| (s, p))
        })
        .collect();
    hits.sort_by(|(sa, a), (sb, b)| {
        sb.cmp(sa)
            .then_with(|| match (&a.created, &b.created) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
            .then_with(|| a.key.name.cmp(&b.key.name))
    });
    hits.into_iter().map(|(_, p)| p).collect()
}

fn service_specificity(name: &str, port: &str) -> impl Fn(&Target) -> Option<u8> {
    move |t| match t {
        Target::Service {
            name: n,
            port: None,
        } if n == name => Some(1),
        Target::Service {
            name: n,
            port: Some(p),
        } if n == name && p == port => Some(2),
        _ => None,
    }
}

/// The cluster policy of Service `namespace/name`'s port `port`, if any policy sets one.
pub fn cluster_policy<'a>(
    policies: impl Iterator<Item = &'a Compiled>,
    namespace: &str,
    name: &str,
    port: &str,
) -> Option<ClusterPolicy> {
    let ranked = ranked(policies, namespace, service_specificity(name, port));
    let mut out = ClusterPolicy::default();
    let mut set = false;
    macro_rules! first {
        ($field:ident, $dst:expr) => {
            if let Some(p) = ranked.iter().find(|p| p.$field.is_some()) {
                $dst = p.$field.clone();
                set = true;
                if !out.from.contains(&p.name()) {
                    out.from.push(p.name());
                }
            }
        };
    }
    let mut balancer = None;
    let mut limits = None;
    first!(balancer, balancer);
    first!(limits, limits);
    first!(outlier, out.outlier);
    first!(retry_budget, out.retry_budget);
    first!(connect_timeout, out.connect_timeout);
    out.balancer = balancer.unwrap_or_default();
    out.limits = limits.unwrap_or_default();
    set.then_some(out)
}

/// The retry of a route rule's requests, when the rule itself has none: from a policy on the
/// rule (by name) or on the route, else on the parent Service's port or the Service.
pub fn route_retry<'a>(
    policies: impl Iterator<Item = &'a Compiled> + Clone,
    route: &ObjKey,
    rule: Option<&str>,
    parent: (&str, &str),
    port: &str,
) -> Option<Retry> {
    let on_route = ranked(policies.clone(), &route.namespace, |t| match t {
        Target::Route {
            kind,
            name,
            rule: None,
        } if *kind == route.kind && *name == route.name => Some(1),
        Target::Route {
            kind,
            name,
            rule: Some(r),
        } if *kind == route.kind && *name == route.name && Some(r.as_str()) == rule => Some(2),
        _ => None,
    });
    on_route
        .iter()
        .find_map(|p| p.retry.clone())
        .or_else(|| service_retry(policies, parent.0, parent.1, port))
}

/// The retry of requests to a Service's port, from a policy on it.
pub fn service_retry<'a>(
    policies: impl Iterator<Item = &'a Compiled>,
    namespace: &str,
    name: &str,
    port: &str,
) -> Option<Retry> {
    ranked(policies, namespace, service_specificity(name, port))
        .iter()
        .find_map(|p| p.retry.clone())
}

#[cfg(test)]
#[path = "traffic_tests.rs"]
mod tests;
