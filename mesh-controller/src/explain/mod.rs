//! `meshctl explain`: what the mesh does with one request from one workload, read from the
//! model the controller builds every proxy's xDS from: the Service and port the host resolves
//! to, the route rule that matches (in the order the routes are sent, consumer routes first
//! for the caller's namespace) or what came closest, the backends and their shares, timeouts
//! and retries, the TrafficPolicy, the destination's authorization decision for the caller's
//! identity (evaluated as the inbound RBAC filters built from the same policies decide), the
//! rate limit, and the endpoints that could be picked.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::index::policy::{AuthzDefault, Operation, Pattern, PortPolicies, Source};
use crate::index::routes::{MatchSpec, PathMatch, StrMatch};
use crate::index::{Model, PortModel, RouteAction, RouteEntry, ServiceModel, SvcKey};
use crate::xds::policy::AUTHENTICATED_DEFAULT;

/// A request to explain.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Request {
    /// The calling workload: `namespace/workload`.
    pub from: String,
    pub method: String,
    /// `http://host[:port]/path?query`.
    pub url: String,
    /// `(name, value)`.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// Why a request cannot be explained: names the input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("--from {0:?}: expected <namespace>/<workload>")]
    From(String),
    #[error("--from {0}: no pod of that workload is in the mesh's configuration")]
    NoWorkload(String),
    #[error("url {0:?}: {1}")]
    Url(String, String),
    #[error("method {0:?}: not an HTTP method")]
    Method(String),
}

#[derive(Clone, Debug, Serialize)]
pub struct Caller {
    pub namespace: String,
    pub workload: String,
    /// The SPIFFE ID its proxy proves over mesh TLS.
    pub identity: Option<String>,
    pub pods: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Destination {
    pub service: String,
    pub port: u16,
    pub protocol: crate::index::Protocol,
}

/// A route rule, and what in it decided.
#[derive(Clone, Debug, Serialize)]
pub struct RuleRef {
    /// `Kind/namespace/name rule N` (N counts from 0, as the proxies' `route` label).
    pub rule: String,
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// What of the request the rule's match asks and the request does not have.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missed: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuthzDecision {
    pub allowed: bool,
    /// The policy (and rule, as `ns/name/rules[i]` when it has several) that decided, or the
    /// default.
    pub by: String,
    /// The destination (pod) port and the normalized path it was decided on.
    pub port: u16,
    pub path: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct RateLimitInfo {
    pub policy: String,
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub per_identity_requests_per_second: Option<u32>,
    pub per_identity_burst: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    /// `namespace/name` of the Service, when the backend is one.
    pub service: Option<String>,
    /// The cluster, or `None` when the reference does not resolve (its share gets a 500).
    pub cluster: Option<String>,
    pub weight: u32,
    /// Percent of the rule's requests.
    pub share: f64,
    /// Ready endpoints (and terminating ones still serving) that could be picked.
    pub endpoints: Vec<String>,
    /// What TrafficPolicies say of its endpoints (balancing, limits, outlier detection).
    pub traffic_policy: Option<serde_json::Value>,
    pub authz: Option<AuthzDecision>,
    pub rate_limit: Option<RateLimitInfo>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Forwarded to the backends.
    Forward,
    /// Answered by the caller's proxy with a redirect.
    Redirect { status: u16 },
    /// Answered by the caller's proxy with this status: no rule matched (404), a rule without
    /// a usable backend (500), a path the destination refuses (400).
    Status { status: u16 },
    /// Not a Service of the mesh: passed through to the address asked for.
    Passthrough,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub request: Request,
    pub caller: Caller,
    pub destination: Option<Destination>,
    /// Which routes apply: the caller's namespace's consumer routes, the Service's own, or none.
    pub routes_from: String,
    pub matched: Option<RuleRef>,
    /// With no match: the rule that came closest, and what it missed.
    pub closest: Option<RuleRef>,
    pub outcome: Outcome,
    pub backends: Vec<Backend>,
    pub timeout_ms: Option<u128>,
    pub backend_timeout_ms: Option<u128>,
    pub retry: Option<serde_json::Value>,
    /// `(cluster, share in millionths)` copied to.
    pub mirrors: Vec<(String, u32)>,
    /// The explanation in words, a line each.
    pub words: Vec<String>,
}

struct Parsed {
    host: String,
    port: u16,
    path: String,
    query: Option<String>,
}

fn parse_url(url: &str) -> Result<Parsed, ExplainError> {
    let bad = |why: &str| ExplainError::Url(url.to_string(), why.to_string());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("expected http://host[:port]/path"))?;
    let (authority, path_query) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (path_query, _) = path_query.split_once('#').unwrap_or((path_query, ""));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad(&format!("port {p:?} is not a number from 1 to 65535")))?,
        ),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_query.to_string(), None),
    };
    Ok(Parsed {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
        port,
        path,
        query,
    })
}

/// The Service a host names from namespace `ns`: a ClusterIP, `name`, `name.ns`,
/// `name.ns.svc` or `name.ns.svc.<domain>`.
fn service_for<'m>(model: &'m Model, host: &str, ns: &str) -> Option<&'m ServiceModel> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return model
            .services
            .values()
            .find(|s| s.cluster_ip == Some(ip))
            .map(|s| s.as_ref());
    }
    let suffix = format!(".svc.{}", model.cluster_domain);
    let host = host.strip_suffix(&suffix).unwrap_or(host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    let key = match host.split_once('.') {
        None => SvcKey::new(ns, host),
        Some((name, namespace)) if !namespace.contains('.') => SvcKey::new(namespace, name),
        Some(_) => return None,
    };
    model.services.get(&key).map(|s| s.as_ref())
}

fn str_matches(m: &StrMatch, v: &str) -> bool {
    match m {
        StrMatch::Exact(x) => x == v,
        StrMatch::Regex(re) => {
            regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(v))
        }
    }
}

fn show_str(m: &StrMatch) -> String {
    match m {
        StrMatch::Exact(x) => format!("{x:?}"),
        StrMatch::Regex(re) => format!("~ /{re}/"),
    }
}

/// What of `m` the request misses (empty: it matches), checked as the proxies check a route
/// match: the path as sent, header names without case, several values of a header joined with
/// commas, the first value of a query parameter.
fn missed(
    m: &MatchSpec,
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &[(String, String)],
) -> Vec<String> {
    let mut out = Vec::new();
    let path_ok = match &m.path {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) if p == "/" => true,
        PathMatch::Prefix(p) => {
            let p = p.trim_end_matches('/');
            path == p || path.starts_with(&format!("{p}/"))
        }
        PathMatch::Regex(re) => {
            regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(path))
        }
    };
    if !path_ok {
        let want = match &m.path {
            PathMatch::Exact(p) => format!("path {p:?} exactly"),
            PathMatch::Prefix(p) => format!("a path under {p:?}"),
            PathMatch::Regex(re) => format!("a path matching /{re}/"),
        };
        out.push(format!("{want}, not {path:?}"));
    }
    for (name, want) in &m.headers {
        let values: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        let joined = values.join(",");
        if values.is_empty() {
            out.push(format!(
                "header {name}: {} (the request has none)",
                show_str(want)
            ));
        } else if !str_matches(want, &joined) {
            out.push(format!("header {name}: {}, not {joined:?}", show_str(want)));
        }
    }
    for (name, want) in &m.query {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
        });
        match value {
            None => out.push(format!(
                "query parameter {name}={} (the request has none)",
                show_str(want)
            )),
            Some(v) if !str_matches(want, v) => out.push(format!(
                "query parameter {name}={}, not {v:?}",
                show_str(want)
            )),
            Some(_) => {}
        }
    }
    if let Some(want) = &m.method
        && want != method
    {
        out.push(format!("method {want}, not {method}"));
    }
    out
}

fn pattern_matches(p: &Pattern, v: &str) -> bool {
    match p {
        Pattern::Exact(x) => x == v,
        Pattern::Prefix(x) => v.starts_with(x.as_str()),
    }
}

/// Whether an `Operation` matches, as `xds::policy::operation` builds it (a Deny matches more:
/// an exact path with a trailing slash, paths with `;` or `%25`, `*`, and HEAD for GET).
fn operation_matches(o: &Operation, deny: bool, port: u16, path: &str, method: &str) -> bool {
    if o.never {
        return false;
    }
    if let Some(ports) = &o.ports
        && !ports.contains(&port)
    {
        return false;
    }
    if let Some(paths) = &o.paths {
        let hit = paths.iter().any(|p| {
            pattern_matches(p, path)
                || (deny
                    && matches!(p, Pattern::Exact(v) if !v.ends_with('/') && path == format!("{v}/")))
        }) || (deny && (path.contains(';') || path.contains("%25") || path == "*"));
        if !hit {
            return false;
        }
    }
    if let Some(methods) = &o.methods {
        let head_for_get = deny && method == "HEAD" && methods.iter().any(|m| m == "GET");
        if !methods.iter().any(|m| m == method) && !head_for_get {
            return false;
        }
    }
    true
}

fn source_matches(s: &Source, identity: Option<&str>) -> bool {
    if s.never {
        return false;
    }
    let ids = s.ids.iter().all(|alternatives| {
        identity.is_some_and(|id| alternatives.iter().any(|p| pattern_matches(p, id)))
    });
    let authenticated = match s.authenticated {
        Some(true) => identity.is_some(),
        Some(false) => identity.is_none(),
        None => true,
    };
    ids && authenticated
}

/// The decision the inbound RBAC filters built from `p` make: DENY policies first, then the
/// ALLOW policies (or the namespace's default when none applies). Policies are tried by name,
/// as mesh-proxy tries them, so the one named is the one it reports.
pub fn decide(
    p: &PortPolicies<'_>,
    identity: Option<&str>,
    port: u16,
    path: &str,
    method: &str,
) -> (bool, String) {
    let named = |deny: bool| {
        let list = if deny { &p.deny } else { &p.allow };
        let mut rules: Vec<(String, &crate::index::policy::Rule)> = list
            .iter()
            .flat_map(|a| {
                a.rules.iter().enumerate().map(move |(i, r)| {
                    let name = if a.rules.len() == 1 {
                        a.name.clone()
                    } else {
                        format!("{}/rules[{i}]", a.name)
                    };
                    (name, r)
                })
            })
            .collect();
        rules.sort_by(|a, b| a.0.cmp(&b.0));
        rules
            .into_iter()
            .find(|(_, r)| {
                (r.to.is_empty()
                    || r.to
                        .iter()
                        .any(|o| operation_matches(o, deny, port, path, method)))
                    && (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, identity)))
            })
            .map(|(n, _)| n)
    };
    if let Some(by) = named(true) {
        return (false, format!("AuthorizationPolicy {by} (Deny)"));
    }
    if !p.allow.is_empty() {
        return match named(false) {
            Some(by) => (true, format!("AuthorizationPolicy {by} (Allow)")),
            None => (
                false,
                format!(
                    "no rule of the Allow policies ({}) matched",
                    p.allow
                        .iter()
                        .map(|a| a.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
    }
    match p.default {
        AuthzDefault::Allow => (true, "the default (allow): no Allow policy applies".into()),
        AuthzDefault::Deny => (false, "the default (deny): no Allow policy applies".into()),
        AuthzDefault::Authenticated => (
            identity.is_some(),
            format!(
                "the default (authenticated, {AUTHENTICATED_DEFAULT}): no Allow policy applies"
            ),
        ),
    }
}

/// The workload port a Service port's traffic reaches, and the Services (with port names)
/// that reach it, for the policies that apply there.
fn inbound_of(model: &Model, svc: &ServiceModel, port: &PortModel) -> (u16, Vec<(String, String)>) {
    let endpoint = port.endpoints.first();
    let pod_port = endpoint
        .map(|e| e.addr.port())
        .or(port.target_port)
        .unwrap_or(port.port);
    let mut via: BTreeSet<(String, String)> = BTreeSet::new();
    via.insert((svc.key.name.clone(), port.name.clone()));
    if let Some(pod) = endpoint.and_then(|e| e.peer.as_ref()) {
        for other in model.services_selecting(pod) {
            for p in &other.ports {
                let reaches = p.target_port == Some(pod_port)
                    || p.target_port_name
                        .as_ref()
                        .is_some_and(|n| pod.named_ports.get(n) == Some(&pod_port))
                    || (p.target_port.is_none()
                        && p.target_port_name.is_none()
                        && p.port == pod_port);
                if reaches {
                    via.insert((other.key.name.clone(), p.name.clone()));
                }
            }
        }
    }
    (pod_port, via.into_iter().collect())
}

fn backend_service<'m>(
    model: &'m Model,
    cluster: &str,
) -> Option<(&'m ServiceModel, &'m PortModel)> {
    let rest = cluster.strip_prefix("outbound|")?;
    let mut parts = rest.splitn(3, '|');
    let port: u16 = parts.next()?.parse().ok()?;
    let _endpoint = parts.next()?;
    let host = parts.next()?;
    let mut labels = host.split('.');
    let (name, ns) = (labels.next()?, labels.next()?);
    let svc = model.services.get(&SvcKey::new(ns, name))?;
    let p = svc.ports.iter().find(|p| p.port == port)?;
    Some((svc.as_ref(), p))
}

fn ms(d: Option<std::time::Duration>) -> Option<u128> {
    d.map(|d| d.as_millis())
}

/// Explains `req` from the model.
pub fn explain(model: &Model, req: &Request) -> Result<Explanation, ExplainError> {
    let (ns, workload) = req
        .from
        .split_once('/')
        .filter(|(n, w)| !n.is_empty() && !w.is_empty())
        .ok_or_else(|| ExplainError::From(req.from.clone()))?;
    let method = req.method.to_ascii_uppercase();
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(ExplainError::Method(req.method.clone()));
    }
    let pods: Vec<_> = model
        .pods
        .values()
        .filter(|p| p.namespace == ns && p.workload == workload)
        .collect();
    let Some(pod) = pods.first() else {
        return Err(ExplainError::NoWorkload(req.from.clone()));
    };
    let identity = model.pod_identity(pod).map(|i| i.to_string());
    let caller = Caller {
        namespace: ns.into(),
        workload: workload.into(),
        identity: identity.clone(),
        pods: pods.len(),
    };
    let url = parse_url(&req.url)?;
    let mut words = Vec::new();
    let mut out = Explanation {
        request: req.clone(),
        caller,
        destination: None,
        routes_from: String::new(),
        matched: None,
        closest: None,
        outcome: Outcome::Passthrough,
        backends: Vec::new(),
        timeout_ms: None,
        backend_timeout_ms: None,
        retry: None,
        mirrors: Vec::new(),
        words: Vec::new(),
    };
    words.push(format!(
        "{} {} from {}/{} ({}):",
        method,
        req.url,
        ns,
        workload,
        identity.as_deref().unwrap_or("no mesh identity")
    ));
    let Some(svc) = service_for(model, &url.host, ns) else {
        words.push(format!(
            "{:?} is not a Service of the mesh: the caller's proxy passes the connection through to the address it resolves to, with no route, policy or mTLS of the mesh",
            url.host
        ));
        out.words = words;
        return Ok(out);
    };
    let Some(port) = svc.ports.iter().find(|p| p.port == url.port) else {
        words.push(format!(
            "Service {} has no port {} (ports: {}): the connection is passed through to its address, where nothing of the mesh routes it",
            svc.key,
            url.port,
            svc.ports.iter().map(|p| p.port.to_string()).collect::<Vec<_>>().join(", ")
        ));
        out.words = words;
        return Ok(out);
    };
    out.destination = Some(Destination {
        service: svc.key.to_string(),
        port: port.port,
        protocol: port.protocol,
    });
    words.push(format!(
        "the host resolves to Service {} port {} ({:?})",
        svc.key, port.port, port.protocol
    ));
    let (entries, from): (&[RouteEntry], String) = match port.consumer_routes.get(ns) {
        Some(e) => (
            e,
            format!(
                "routes of namespace {ns} attached to the Service (consumer routes), which its callers use instead of the Service's own"
            ),
        ),
        None if port.routes.is_empty() => (
            &[],
            "no route: all traffic goes to the Service itself".into(),
        ),
        None => (
            &port.routes,
            "the routes attached to the Service in its namespace".into(),
        ),
    };
    out.routes_from = from.clone();
    words.push(format!("routes: {from}"));
    let query = url.query.as_deref();
    let default_cluster = model.cluster_name(&svc.key, port.port);
    let chosen: Option<&RouteEntry> = entries
        .iter()
        .find(|e| missed(&e.matches, &method, &url.path, query, &req.headers).is_empty());
    let backends: Vec<(Option<String>, u32)> = match chosen {
        None if entries.is_empty() => {
            out.retry = port
                .retry
                .as_ref()
                .map(|r| serde_json::to_value(r).unwrap_or_default());
            vec![(Some(default_cluster.clone()), 1)]
        }
        None => {
            let closest = entries
                .iter()
                .map(|e| {
                    (
                        e,
                        missed(&e.matches, &method, &url.path, query, &req.headers),
                    )
                })
                .min_by_key(|(_, m)| m.len());
            if let Some((e, m)) = closest {
                words.push(format!(
                    "no rule matches: the caller's proxy answers 404; closest is {}, which needs {}",
                    e.source,
                    m.join("; ")
                ));
                out.closest = Some(RuleRef {
                    rule: e.source.clone(),
                    matches: e.matches.clone(),
                    missed: m,
                });
            }
            out.outcome = Outcome::Status { status: 404 };
            out.words = words;
            return Ok(out);
        }
        Some(e) => {
            words.push(format!(
                "matches {} ({})",
                e.source,
                describe_match(&e.matches)
            ));
            out.matched = Some(RuleRef {
                rule: e.source.clone(),
                matches: e.matches.clone(),
                missed: Vec::new(),
            });
            out.timeout_ms = ms(e.timeout);
            out.backend_timeout_ms = ms(e.backend_timeout);
            out.retry = e
                .retry
                .as_ref()
                .map(|r| serde_json::to_value(r).unwrap_or_default());
            out.mirrors = e.mirrors.clone();
            match &e.action {
                RouteAction::Forward(b) => {
                    b.iter().map(|b| (b.cluster.clone(), b.weight)).collect()
                }
                RouteAction::Redirect(r) => {
                    words.push(format!(
                        "the caller's proxy answers {} (a redirect{}{}{})",
                        r.status,
                        r.scheme
                            .as_ref()
                            .map(|s| format!(", scheme {s}"))
                            .unwrap_or_default(),
                        r.hostname
                            .as_ref()
                            .map(|h| format!(", host {h}"))
                            .unwrap_or_default(),
                        r.port.map(|p| format!(", port {p}")).unwrap_or_default(),
                    ));
                    out.outcome = Outcome::Redirect { status: r.status };
                    out.words = words;
                    return Ok(out);
                }
                RouteAction::Fail(status) => {
                    words.push(format!(
                        "the rule has no usable backend: the caller's proxy answers {status}"
                    ));
                    for why in rule_problems(model, &e.source) {
                        words.push(format!("  {why}"));
                    }
                    out.outcome = Outcome::Status { status: *status };
                    out.words = words;
                    return Ok(out);
                }
            }
        }
    };
    out.outcome = Outcome::Forward;
    if let Some(t) = out.timeout_ms {
        words.push(format!("request timeout {t} ms"));
    }
    if let Some(t) = out.backend_timeout_ms {
        words.push(format!("per-backend timeout {t} ms"));
    }
    if let Some(r) = &out.retry {
        words.push(format!("retries: {r}"));
    }
    let total: u64 = backends.iter().map(|(_, w)| u64::from(*w)).sum();
    let normalized = mesh_api::path::normalize(&url.path).map(|p| p.into_owned());
    for (cluster, weight) in backends {
        let share = if total == 0 {
            0.0
        } else {
            f64::from(weight) * 100.0 / total as f64
        };
        let target = cluster.as_deref().and_then(|c| backend_service(model, c));
        let mut b = Backend {
            service: target.map(|(s, _)| s.key.to_string()),
            cluster: cluster.clone(),
            weight,
            share: (share * 100.0).round() / 100.0,
            endpoints: Vec::new(),
            traffic_policy: None,
            authz: None,
            rate_limit: None,
        };
        let Some((bs, bp)) = target else {
            words.push(format!(
                "{share:.1} % (weight {weight}): a backend that does not resolve; those requests get 500"
            ));
            if let Some(m) = &out.matched {
                for why in rule_problems(model, &m.rule) {
                    words.push(format!("  {why}"));
                }
            }
            out.backends.push(b);
            continue;
        };
        b.endpoints = bp
            .endpoints
            .iter()
            .map(|e| match &e.pod {
                Some(p) => format!(
                    "{} ({p}{})",
                    e.addr,
                    if e.terminating { ", terminating" } else { "" }
                ),
                None => e.addr.to_string(),
            })
            .collect();
        b.traffic_policy = bp
            .traffic
            .as_ref()
            .map(|t| serde_json::to_value(t.as_ref()).unwrap_or_default());
        let (pod_port, via) = inbound_of(model, bs, bp);
        let via_refs: Vec<(&str, &str)> =
            via.iter().map(|(s, p)| (s.as_str(), p.as_str())).collect();
        let policies = model.policies.for_port(&bs.key.namespace, &via_refs);
        words.push(format!(
            "{share:.1} % (weight {weight}) to Service {} port {}: {} endpoint{}{}",
            bs.key,
            bp.port,
            b.endpoints.len(),
            if b.endpoints.len() == 1 { "" } else { "s" },
            if b.endpoints.is_empty() {
                " (none ready: those requests get 503)".to_string()
            } else {
                format!(" ({})", b.endpoints.join(", "))
            }
        ));
        if let Some(t) = &b.traffic_policy {
            words.push(format!("  TrafficPolicy in force: {t}"));
        }
        match &normalized {
            Err(e) => {
                words.push(format!("  its proxy refuses the path with 400: {e}"));
                out.outcome = Outcome::Status { status: 400 };
            }
            Ok(path) => {
                let (allowed, by) = decide(&policies, identity.as_deref(), pod_port, path, &method);
                words.push(format!(
                    "  its proxy {} the request ({by}, on port {pod_port}, path {path:?})",
                    if allowed { "allows" } else { "denies with 403" }
                ));
                b.authz = Some(AuthzDecision {
                    allowed,
                    by,
                    port: pod_port,
                    path: path.clone(),
                });
            }
        }
        if let Some(l) = policies.rate_limit {
            b.rate_limit = Some(RateLimitInfo {
                policy: l.name.clone(),
                requests_per_second: l.total.as_ref().map(|t| t.requests_per_second),
                burst: l.total.as_ref().map(|t| t.burst),
                per_identity_requests_per_second: l
                    .per_identity
                    .as_ref()
                    .map(|t| t.requests_per_second),
                per_identity_burst: l.per_identity.as_ref().map(|t| t.burst),
            });
            words.push(format!(
                "  rate limited by RateLimitPolicy {}: {}{} (past it, 429 with Retry-After)",
                l.name,
                l.total
                    .as_ref()
                    .map(|t| format!(
                        "{} rps (burst {}) in total per proxy",
                        t.requests_per_second, t.burst
                    ))
                    .unwrap_or_default(),
                l.per_identity
                    .as_ref()
                    .map(|t| format!(
                        "{}{} rps (burst {}) per caller identity",
                        if l.total.is_some() { ", " } else { "" },
                        t.requests_per_second,
                        t.burst
                    ))
                    .unwrap_or_default()
            ));
        }
        out.backends.push(b);
    }
    for (cluster, per_million) in &out.mirrors {
        words.push(format!(
            "mirrored to {cluster} ({:.2} % of requests, answers dropped)",
            f64::from(*per_million) / 10_000.0
        ));
    }
    out.words = words;
    Ok(out)
}

/// What the model could not resolve in the rule `source` names (`Kind/ns/name rule N`).
fn rule_problems(model: &Model, source: &str) -> Vec<String> {
    let Some((route, rule)) = source.rsplit_once(" rule ") else {
        return Vec::new();
    };
    let prefix = format!("spec.rules[{rule}]");
    model
        .errors
        .iter()
        .filter(|e| e.object.to_string() == route && e.field.starts_with(&prefix))
        .map(|e| format!("{}: {}", e.field, e.reason))
        .collect()
}

fn describe_match(m: &MatchSpec) -> String {
    let mut parts = vec![match &m.path {
        PathMatch::Exact(p) => format!("path {p:?}"),
        PathMatch::Prefix(p) => format!("path under {p:?}"),
        PathMatch::Regex(re) => format!("path ~ /{re}/"),
    }];
    for (n, v) in &m.headers {
        parts.push(format!("header {n}: {}", show_str(v)));
    }
    for (n, v) in &m.query {
        parts.push(format!("query {n}={}", show_str(v)));
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests;
