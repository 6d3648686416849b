//! `meshctl explain`: what the mesh does with one request from one workload, read from the
//! model the controller builds every proxy's xDS from: the Service and port the host resolves
//! to, the route rule that matches (in the order the routes are sent, consumer routes first
//! for the caller's namespace) or what came closest, the backends and their shares, timeouts
//! and retries, the TrafficPolicy, the destination's authorization decision for the caller's
//! identity (evaluated as the inbound RBAC filters built from the same policies decide), the
//! rate limit, and the endpoints that could be picked.

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
    /// The endpoints it holds for (pods reached through the same Services on the same port
    /// decide alike).
    pub endpoints: Vec<String>,
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
    /// The authorization decision at its endpoints' proxies, one per group of endpoints that
    /// decide alike; endpoints without a proxy make none.
    pub authz: Vec<AuthzDecision>,
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
    /// The rule's FaultInjection, read.
    pub fault: Option<std::sync::Arc<crate::index::fault::Fault>>,
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
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let tail = tail.split_once('#').map_or(tail, |(t, _)| t);
    let path_query = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("port {p:?} is not a number from 1 to 65535")))
    };
    let (host, port) = match authority.strip_prefix('[') {
        // An IPv6 address, and maybe a port after it.
        Some(v6) => {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("no ] after [ in the host"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None if after.is_empty() => (host, 80),
                None => return Err(bad("expected :port after the ]")),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, port_of(p)?),
            None => (authority, 80),
        },
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (path_query.clone(), None),
    };
    Ok(Parsed {
        host: host.to_ascii_lowercase(),
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

/// Whether an `Operation` matches, as `xds::policy::operation` builds it: on an opaque TCP
/// port an Allow entry that asks for a path or method matches nothing and a Deny entry's path
/// and method conditions are dropped; a Deny matches more on HTTP (an exact path with a
/// trailing slash, the path percent-decoded, paths with `;` or `%25`, `*`, and HEAD for GET).
fn operation_matches(
    o: &Operation,
    deny: bool,
    tcp: bool,
    port: u16,
    path: &str,
    method: &str,
) -> bool {
    if o.never || (tcp && !deny && o.is_http()) {
        return false;
    }
    if let Some(ports) = &o.ports
        && !ports.contains(&port)
    {
        return false;
    }
    if tcp {
        return true;
    }
    if let Some(paths) = &o.paths {
        let decoded = decode_but_slash(path);
        let hit = paths.iter().any(|p| {
            pattern_matches(p, path)
                || (deny
                    && (pattern_matches(p, &decoded)
                        || matches!(p, Pattern::Exact(v) if !v.ends_with('/') && (path == format!("{v}/") || decoded == format!("{v}/")))))
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

/// A normalized path with its remaining escapes decoded, but `%2F`: a Deny's path is matched
/// in every form of the characters a request may send raw or encoded (`:`, `@`, non-ASCII...),
/// while `/` is matched only as written (`xds::policy::path_matches`).
fn decode_but_slash(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) if h * 16 + l != u32::from(b'/') => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    tcp: bool,
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
                        .any(|o| operation_matches(o, deny, tcp, port, path, method)))
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

/// How one endpoint's proxy guards the port a backend reaches: `None` when its pod runs no
/// proxy (or is not known), else the inbound protocol and the Services (with port names) that
/// reach the port, as the pod's inbound listener is built (`translate::targets`).
type Guard = Option<(crate::index::Protocol, Vec<(String, String)>)>;

fn guard_of(model: &Model, e: &crate::index::Endpoint) -> Guard {
    let pod = e
        .peer
        .as_ref()
        .filter(|p| crate::xds::build::is_proxied(p))?;
    crate::xds::translate::targets(model, Some(pod)).remove(&e.addr.port())
}

/// The path the destination sees: the matched rule's rewrite applied (`ReplaceFullPath`, or
/// `ReplacePrefixMatch` on a PathPrefix match).
fn rewritten(e: &RouteEntry, path: &str) -> String {
    use crate::index::routes::PathModifier;
    match e.rewrite.as_ref().and_then(|r| r.path.as_ref()) {
        Some(PathModifier::Full(p)) => p.clone(),
        Some(PathModifier::Prefix(new)) => match &e.matches.path {
            PathMatch::Prefix(old) => {
                let old = old.trim_end_matches('/');
                let rest = path.get(old.len()..).unwrap_or_default();
                let new = new.trim_end_matches('/');
                match (new.is_empty(), rest.is_empty()) {
                    (true, true) => "/".into(),
                    (true, false) => rest.to_string(),
                    (false, _) => format!("{new}{rest}"),
                }
            }
            _ => path.to_string(),
        },
        None => path.to_string(),
    }
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
    // As sent: the proxies compare `:method` exactly (`get` is not `GET`).
    let method = req.method.clone();
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
    // Without a proxy the caller has no mesh identity and no outbound routing of the mesh.
    let proxied = crate::xds::build::is_proxied(pod);
    let identity = proxied
        .then(|| model.pod_identity(pod).map(|i| i.to_string()))
        .flatten();
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
        fault: None,
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
    if !proxied {
        words.push(format!(
            "{ns}/{workload} runs no mesh proxy: its requests reach Services through the platform, with no route, timeout or retry of the mesh, and arrive without a mesh identity"
        ));
    }
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
        _ if !proxied => (&[], "none: the caller has no proxy".into()),
        _ if svc.cluster_ip.is_none() => (
            &[],
            "none: a headless Service, whose callers reach its pods by their own addresses".into(),
        ),
        _ if port.protocol == crate::index::Protocol::Tcp => (
            &[],
            "none: an opaque TCP port, which the caller's proxy forwards to the Service's endpoints".into(),
        ),
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
    // The path the destination gets: the request's, or the matched rule's rewrite of it.
    let mut forwarded_path = url.path.clone();
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
            let to = rewritten(e, &url.path);
            if to != url.path {
                words.push(format!("the caller's proxy rewrites the path to {to:?}"));
            }
            forwarded_path = to;
            out.timeout_ms = ms(e.timeout);
            out.backend_timeout_ms = ms(e.backend_timeout);
            out.retry = e
                .retry
                .as_ref()
                .map(|r| serde_json::to_value(r).unwrap_or_default());
            out.mirrors = e.mirrors.clone();
            out.fault = e.fault.clone();
            if let Some(f) = &e.fault {
                words.push(describe_fault(f));
            }
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
                        "the rule cannot be served (no usable backend, or a filter that does not resolve): the caller's proxy answers {status}"
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
    let normalized = mesh_api::path::normalize(&forwarded_path).map(|p| p.into_owned());
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
            authz: Vec::new(),
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
        // The endpoints that decide alike: same port, same Services reaching it, same
        // inbound protocol (as each pod's inbound listener is built).
        let mut groups: Vec<(Guard, u16, Vec<String>)> = Vec::new();
        for (e, shown) in bp.endpoints.iter().zip(&b.endpoints) {
            let g = guard_of(model, e);
            let port = e.addr.port();
            match groups.iter_mut().find(|(h, p, _)| *h == g && *p == port) {
                Some((_, _, list)) => list.push(shown.clone()),
                None => groups.push((g, port, vec![shown.clone()])),
            }
        }
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
        for (guard, pod_port, endpoints) in groups {
            let at = if b.endpoints.len() > 1 {
                format!(" at {}", endpoints.join(", "))
            } else {
                String::new()
            };
            let Some((protocol, via)) = guard else {
                words.push(format!(
                    "  no mesh proxy guards port {pod_port}{at}: no policy or rate limit of the mesh applies there"
                ));
                continue;
            };
            let tcp = protocol == crate::index::Protocol::Tcp;
            let via_refs: Vec<(&str, &str)> =
                via.iter().map(|(s, p)| (s.as_str(), p.as_str())).collect();
            let policies = model.policies.for_port(&bs.key.namespace, &via_refs);
            let path = match (&normalized, tcp) {
                (_, true) => String::new(),
                (Ok(p), false) => p.clone(),
                (Err(e), false) => {
                    words.push(format!("  its proxy{at} refuses the path with 400: {e}"));
                    out.outcome = Outcome::Status { status: 400 };
                    continue;
                }
            };
            let (allowed, by) = decide(
                &policies,
                identity.as_deref(),
                tcp,
                pod_port,
                &path,
                &method,
            );
            words.push(format!(
                "  its proxy{at} {} the request ({by}, on port {pod_port}{})",
                if allowed { "allows" } else { "denies with 403" },
                if tcp {
                    ", an opaque TCP port: paths and methods are not seen".to_string()
                } else {
                    format!(", path {path:?}")
                }
            ));
            b.authz.push(AuthzDecision {
                endpoints,
                allowed,
                by,
                port: pod_port,
                path,
            });
            match policies.rate_limit {
                Some(_) if tcp => words.push("  no rate limit on an opaque TCP port".into()),
                Some(l) => {
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
                None => {}
            }
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

/// A rule's faults, in words: what the caller's proxy does to a share of requests.
fn describe_fault(f: &crate::index::fault::Fault) -> String {
    use crate::index::fault::AbortCode;
    let pct = |per_million: u32| f64::from(per_million) / 10_000.0;
    let delay = f.delay.as_ref().map(|d| {
        format!(
            "delays {:.2} % of requests by {} ms",
            pct(d.per_million),
            d.fixed.as_millis()
        )
    });
    let abort = f.abort.as_ref().map(|a| {
        let code = match a.code {
            AbortCode::HttpStatus(s) => format!("HTTP {s}"),
            AbortCode::GrpcStatus(s) => format!("gRPC status {s}"),
        };
        format!("aborts {:.2} % with {code}", pct(a.per_million))
    });
    let what: Vec<String> = delay.into_iter().chain(abort).collect();
    format!(
        "fault injection: the caller's proxy {} (each drawn on its own, the delay first)",
        what.join(", then ")
    )
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
