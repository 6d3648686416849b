//! HTTPRoute and GRPCRoute, validated and turned into one protocol-neutral form ([`RouteSpec`]),
//! and the Gateway API precedence between the rules attached to the same Service port.
//!
//! The generated Gateway API types have a distinct Rust type per place a filter or match may
//! appear (route rule, backend, HTTP, gRPC) with identical shapes; each is read through serde into
//! the one internal shape here, so there is one validator per concept.

use std::cmp::Ordering;
use std::str::FromStr;
use std::time::Duration;

use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::grants::GATEWAY_GROUP;
use crate::objects::{DocError, ObjKey};

/// Largest weight the Gateway API allows on a backendRef.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A route, validated, with its references still unresolved.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSpec {
    pub key: ObjKey,
    pub created: Option<Time>,
    /// Service parents (GAMMA).
    pub parents: Vec<ParentRef>,
    /// Gateway parents (north-south); whether a Gateway is ours is decided when it resolves.
    pub gateway_parents: Vec<GatewayParentRef>,
    /// `spec.hostnames`, lowercased: the hosts it serves on a Gateway's listeners.
    pub hostnames: Vec<String>,
    pub rules: Vec<RuleSpec>,
}

/// A `parentRefs` entry of kind Gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayParentRef {
    pub namespace: String,
    pub name: String,
    /// A listener's name.
    pub section_name: Option<String>,
    pub port: Option<u16>,
    /// Index in `spec.parentRefs`.
    pub index: usize,
}

/// A `parentRefs` entry of kind Service (GAMMA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentRef {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
    /// Index in `spec.parentRefs`, to name the field in errors.
    pub index: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RuleSpec {
    /// The rule's `name`, which a policy's `sectionName` may name.
    pub name: Option<String>,
    pub matches: Vec<MatchSpec>,
    pub backends: Vec<BackendRef>,
    pub filters: Filters,
    pub timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StrMatch {
    Exact(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MatchSpec {
    pub path: PathMatch,
    pub headers: Vec<(String, StrMatch)>,
    pub query: Vec<(String, StrMatch)>,
    pub method: Option<String>,
}

impl Default for MatchSpec {
    fn default() -> Self {
        Self {
            path: PathMatch::Prefix("/".into()),
            headers: vec![],
            query: vec![],
            method: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub namespace: String,
    pub name: String,
    pub port: Option<u16>,
    pub weight: u32,
    /// Why this reference can never resolve (a kind other than Service, no port), if so. One in
    /// another namespace resolves when a ReferenceGrant there allows it.
    pub invalid: Option<(super::model::RefProblem, String)>,
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    /// Index in the rule's `backendRefs`, to name the field in errors.
    pub index: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderModifier {
    #[serde(default)]
    pub add: Vec<Header>,
    #[serde(default)]
    pub set: Vec<Header>,
    #[serde(default)]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub request_headers: HeaderModifier,
    pub response_headers: HeaderModifier,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
    pub fault: Option<FaultRef>,
}

/// A rule's `ExtensionRef` filter: a FaultInjection in the route's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultRef {
    pub name: String,
    /// The filter's field (`spec.rules[i].filters[j]`), for errors.
    pub field: String,
    /// Why it can never resolve (it names another kind), if so.
    pub invalid: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    pub status: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub backend: BackendRef,
    /// Share of requests mirrored, in millionths.
    pub per_million: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Option<Duration>,
    /// Each try's timeout (a TrafficPolicy's; a route's `backendRequest` timeout wins).
    pub per_try_timeout: Option<Duration>,
    /// Failures retried besides `codes`; none given (and no codes): any 5xx, failed
    /// connections and resets.
    pub on: Vec<mesh_api::crds::RetryOn>,
    pub grpc: Vec<mesh_api::crds::GrpcRetryStatus>,
    /// The TrafficPolicy it came from; `None`: the route rule's own `retry`.
    pub from: Option<String>,
}

// ---- the shapes read through serde -------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    filters: Option<Vec<RawFilter>>,
    #[serde(default)]
    backend_refs: Option<Vec<RawBackendRef>>,
    #[serde(default)]
    timeouts: Option<RawTimeouts>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTimeouts {
    request: Option<String>,
    backend_request: Option<String>,
}

#[derive(Deserialize)]
struct RawRetry {
    attempts: Option<i64>,
    backoff: Option<String>,
    codes: Option<Vec<i64>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFilter {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModifier>,
    response_header_modifier: Option<HeaderModifier>,
    request_redirect: Option<RawRedirect>,
    url_rewrite: Option<RawRewrite>,
    request_mirror: Option<RawMirror>,
    extension_ref: Option<RawExtensionRef>,
}

#[derive(Deserialize)]
struct RawExtensionRef {
    group: String,
    kind: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathModifier {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRedirect {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<RawPathModifier>,
    port: Option<i64>,
    status_code: Option<i64>,
}

#[derive(Deserialize)]
struct RawRewrite {
    hostname: Option<String>,
    path: Option<RawPathModifier>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFraction {
    numerator: i64,
    denominator: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMirror {
    backend_ref: RawBackendRef,
    percent: Option<i64>,
    fraction: Option<RawFraction>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBackendRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i64>,
    weight: Option<i64>,
    #[serde(default)]
    filters: Option<Vec<RawFilter>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawParentRef {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i64>,
    section_name: Option<String>,
}

#[derive(Deserialize)]
struct RawStrMatch {
    name: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawHttpMatch {
    path: Option<RawPath>,
    #[serde(default)]
    headers: Vec<RawStrMatch>,
    #[serde(default)]
    query_params: Vec<RawStrMatch>,
    method: Option<String>,
}

#[derive(Deserialize)]
struct RawPath {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Deserialize)]
struct RawGrpcMatch {
    method: Option<RawGrpcMethod>,
    #[serde(default)]
    headers: Vec<RawStrMatch>,
}

#[derive(Deserialize)]
struct RawGrpcMethod {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

fn reshape<T: DeserializeOwned>(v: impl Serialize, field: &str) -> Result<T, DocError> {
    let value = serde_json::to_value(v).map_err(|e| DocError::new(field, e.to_string()))?;
    serde_json::from_value(value).map_err(|e| DocError::new(field, e.to_string()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Http,
    Grpc,
}

impl RouteSpec {
    pub fn from_http(route: &HttpRoute, key: ObjKey) -> Result<Self, DocError> {
        let parents =
            reshape::<Option<Vec<RawParentRef>>>(&route.spec.parent_refs, "spec.parentRefs")?;
        let rules = reshape::<Option<Vec<RawRule>>>(&route.spec.rules, "spec.rules")?;
        Self::build(
            key,
            route.metadata.creation_timestamp.clone(),
            parents,
            route.spec.hostnames.clone().unwrap_or_default(),
            rules,
            Flavor::Http,
        )
    }

    pub fn from_grpc(route: &GrpcRoute, key: ObjKey) -> Result<Self, DocError> {
        let parents =
            reshape::<Option<Vec<RawParentRef>>>(&route.spec.parent_refs, "spec.parentRefs")?;
        let rules = reshape::<Option<Vec<RawRule>>>(&route.spec.rules, "spec.rules")?;
        Self::build(
            key,
            route.metadata.creation_timestamp.clone(),
            parents,
            route.spec.hostnames.clone().unwrap_or_default(),
            rules,
            Flavor::Grpc,
        )
    }

    fn build(
        key: ObjKey,
        created: Option<Time>,
        raw_parents: Option<Vec<RawParentRef>>,
        hostnames: Vec<String>,
        raw_rules: Option<Vec<RawRule>>,
        flavor: Flavor,
    ) -> Result<Self, DocError> {
        let mut parents = Vec::new();
        let mut gateway_parents = Vec::new();
        for (i, p) in raw_parents.unwrap_or_default().into_iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            // A parent's group defaults to the Gateway API's and its kind to Gateway, as the
            // API server fills them in: a Service parent must say `group: ""`.
            let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
            let kind = p.kind.as_deref().unwrap_or("Gateway");
            if kind == "Service" && !is_service_ref(Some(group), Some(kind)) {
                return Err(DocError::new(
                    format!("{field}.group"),
                    format!(
                        "kind Service in group {group:?}{}: a Service parent needs group \"\" (the core group)",
                        if p.group.is_none() {
                            " (the default)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            let port = p
                .port
                .map(|port| to_port(port, &format!("{field}.port")))
                .transpose()?;
            if group == GATEWAY_GROUP && kind == "Gateway" {
                gateway_parents.push(GatewayParentRef {
                    namespace: p.namespace.unwrap_or_else(|| key.namespace.clone()),
                    name: p.name,
                    section_name: p.section_name.filter(|s| !s.is_empty()),
                    port,
                    index: i,
                });
                continue;
            }
            // Other kinds of parent (a ListenerSet, another group's) are not ours.
            if !is_service_ref(Some(group), Some(kind)) {
                continue;
            }
            parents.push(ParentRef {
                namespace: p.namespace.unwrap_or_else(|| key.namespace.clone()),
                name: p.name,
                port,
                index: i,
            });
        }
        let mut rules = Vec::new();
        for (i, raw) in raw_rules.unwrap_or_default().into_iter().enumerate() {
            rules.push(rule(
                raw,
                &format!("spec.rules[{i}]"),
                &key.namespace,
                flavor,
            )?);
        }
        Ok(Self {
            key,
            created,
            parents,
            gateway_parents,
            hostnames: hostnames.iter().map(|h| h.to_ascii_lowercase()).collect(),
            rules,
        })
    }
}

fn is_service_ref(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core")) && kind.unwrap_or("Service") == "Service"
}

fn to_port(port: i64, field: &str) -> Result<u16, DocError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| DocError::new(field, format!("invalid port {port}: must be 1..=65535")))
}

/// A Gateway API duration (`500ms`, `1h30m`).
pub(crate) fn duration(s: &str, field: &str) -> Result<Duration, DocError> {
    let d = gateway_api::Duration::from_str(s)
        .map_err(|e| DocError::new(field, format!("invalid duration {s:?}: {e}")))?;
    Ok(Duration::from_millis(
        d.as_millis().try_into().unwrap_or(u64::MAX),
    ))
}

fn regex(re: &str, field: &str) -> Result<String, DocError> {
    regex::Regex::new(re)
        .map_err(|e| DocError::new(field, format!("invalid regular expression {re:?}: {e}")))?;
    Ok(re.to_string())
}

fn str_match(m: RawStrMatch, field: &str) -> Result<(String, StrMatch), DocError> {
    if m.name.is_empty() {
        return Err(DocError::new(format!("{field}.name"), "must not be empty"));
    }
    let value = match m.kind.as_deref().unwrap_or("Exact") {
        "Exact" => StrMatch::Exact(m.value),
        "RegularExpression" => StrMatch::Regex(regex(&m.value, &format!("{field}.value"))?),
        other => {
            return Err(DocError::new(
                format!("{field}.type"),
                format!("unsupported match type {other:?}: use Exact or RegularExpression"),
            ));
        }
    };
    Ok((m.name, value))
}

/// `name` at `field` is an HTTP header name (an RFC 9110 token, as the Gateway API's
/// `HTTPHeaderName` pattern says and as the proxies parse it).
pub(crate) fn header_name(name: &str, field: &str) -> Result<(), DocError> {
    match hyper::header::HeaderName::from_bytes(name.as_bytes()) {
        Ok(_) => Ok(()),
        Err(_) => Err(DocError::new(
            field,
            format!(
                "invalid header name {name:?}: a header name is letters, digits and !#$%&'*+-.^_`|~"
            ),
        )),
    }
}

fn header_match(m: RawStrMatch, field: &str) -> Result<(String, StrMatch), DocError> {
    header_name(&m.name, &format!("{field}.name"))?;
    str_match(m, field)
}

fn http_match(v: serde_json::Value, field: &str) -> Result<MatchSpec, DocError> {
    let raw: RawHttpMatch =
        serde_json::from_value(v).map_err(|e| DocError::new(field, e.to_string()))?;
    let path = match raw.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.unwrap_or_else(|| "/".into());
            let pfield = format!("{field}.path.value");
            let kind = p.kind.unwrap_or_else(|| "PathPrefix".into());
            if kind != "RegularExpression" && !value.starts_with('/') {
                return Err(DocError::new(
                    pfield,
                    format!("path {value:?} must start with '/'"),
                ));
            }
            match kind.as_str() {
                "Exact" => PathMatch::Exact(value),
                "PathPrefix" => {
                    // Gateway API prefixes match whole path segments; a trailing '/' is ignored.
                    let trimmed = value.trim_end_matches('/');
                    PathMatch::Prefix(if trimmed.is_empty() {
                        "/".into()
                    } else {
                        trimmed.into()
                    })
                }
                "RegularExpression" => PathMatch::Regex(regex(&value, &pfield)?),
                other => {
                    return Err(DocError::new(
                        format!("{field}.path.type"),
                        format!(
                            "unsupported path match type {other:?}: use Exact, PathPrefix or RegularExpression"
                        ),
                    ));
                }
            }
        }
    };
    let headers = raw
        .headers
        .into_iter()
        .enumerate()
        .map(|(i, h)| header_match(h, &format!("{field}.headers[{i}]")))
        .collect::<Result<_, _>>()?;
    let query = raw
        .query_params
        .into_iter()
        .enumerate()
        .map(|(i, h)| str_match(h, &format!("{field}.queryParams[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(MatchSpec {
        path,
        headers,
        query,
        method: raw.method,
    })
}

fn grpc_match(v: serde_json::Value, field: &str) -> Result<MatchSpec, DocError> {
    let raw: RawGrpcMatch =
        serde_json::from_value(v).map_err(|e| DocError::new(field, e.to_string()))?;
    let path = match raw.method {
        None => PathMatch::Prefix("/".into()),
        Some(m) => {
            let mfield = format!("{field}.method");
            match (m.kind.as_deref().unwrap_or("Exact"), m.service, m.method) {
                (_, None, None) => {
                    return Err(DocError::new(
                        mfield,
                        "one of service or method must be set",
                    ));
                }
                ("Exact", Some(s), Some(me)) => PathMatch::Exact(format!("/{s}/{me}")),
                ("Exact", Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                ("Exact", None, Some(me)) => {
                    PathMatch::Regex(format!("/[^/]+/{}", regex::escape(&me)))
                }
                ("RegularExpression", s, me) => {
                    let s = s.unwrap_or_else(|| "[^/]+".into());
                    let me = me.unwrap_or_else(|| "[^/]+".into());
                    PathMatch::Regex(regex(&format!("/{s}/{me}"), &mfield)?)
                }
                (other, _, _) => {
                    return Err(DocError::new(
                        format!("{mfield}.type"),
                        format!(
                            "unsupported method match type {other:?}: use Exact or RegularExpression"
                        ),
                    ));
                }
            }
        }
    };
    let headers = raw
        .headers
        .into_iter()
        .enumerate()
        .map(|(i, h)| header_match(h, &format!("{field}.headers[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(MatchSpec {
        path,
        headers,
        query: vec![],
        // gRPC is always POST; gRPC clients do not match on pseudo-headers, so none is added.
        method: None,
    })
}

fn path_modifier(p: RawPathModifier, field: &str) -> Result<PathModifier, DocError> {
    match (p.kind.as_str(), p.replace_full_path, p.replace_prefix_match) {
        ("ReplaceFullPath", Some(full), _) => Ok(PathModifier::Full(full)),
        ("ReplacePrefixMatch", _, Some(prefix)) => Ok(PathModifier::Prefix(prefix)),
        ("ReplaceFullPath", None, _) => Err(DocError::new(
            format!("{field}.replaceFullPath"),
            "required by type ReplaceFullPath",
        )),
        ("ReplacePrefixMatch", _, None) => Err(DocError::new(
            format!("{field}.replacePrefixMatch"),
            "required by type ReplacePrefixMatch",
        )),
        (other, _, _) => Err(DocError::new(
            format!("{field}.type"),
            format!("unsupported path modifier {other:?}"),
        )),
    }
}

fn header_modifier(m: HeaderModifier, field: &str) -> Result<HeaderModifier, DocError> {
    for (list, name) in [(&m.add, "add"), (&m.set, "set")] {
        for (i, h) in list.iter().enumerate() {
            header_name(&h.name, &format!("{field}.{name}[{i}].name"))?;
            if hyper::header::HeaderValue::from_str(&h.value).is_err() {
                return Err(DocError::new(
                    format!("{field}.{name}[{i}].value"),
                    format!(
                        "invalid header value {:?}: no control characters but tab",
                        h.value
                    ),
                ));
            }
        }
    }
    for (i, n) in m.remove.iter().enumerate() {
        header_name(n, &format!("{field}.remove[{i}]"))?;
    }
    Ok(m)
}

fn backend_ref(
    raw: RawBackendRef,
    field: &str,
    route_ns: &str,
    index: usize,
    flavor: Flavor,
) -> Result<BackendRef, DocError> {
    let weight = match raw.weight {
        None => 1,
        Some(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
        Some(w) => {
            return Err(DocError::new(
                format!("{field}.weight"),
                format!(
                    "invalid weight {w} for backend {}: must be 0..={MAX_WEIGHT}",
                    raw.name
                ),
            ));
        }
    };
    let port = raw
        .port
        .map(|p| to_port(p, &format!("{field}.port")))
        .transpose()?;
    let namespace = raw.namespace.unwrap_or_else(|| route_ns.to_string());
    use super::model::RefProblem;
    let invalid = if !is_service_ref(raw.group.as_deref(), raw.kind.as_deref()) {
        Some((
            RefProblem::InvalidKind,
            format!(
                "backend kind {}/{} is not supported: only Services",
                raw.group.unwrap_or_default(),
                raw.kind.unwrap_or_default()
            ),
        ))
    } else if port.is_none() {
        Some((
            RefProblem::BackendNotFound,
            format!(
                "backend {} has no port; a Service backendRef needs one",
                raw.name
            ),
        ))
    } else {
        None
    };
    let mut request_headers = HeaderModifier::default();
    let mut response_headers = HeaderModifier::default();
    for (i, f) in raw.filters.unwrap_or_default().into_iter().enumerate() {
        let ffield = format!("{field}.filters[{i}]");
        let filters = filters_of(vec![f], &ffield, route_ns, flavor)?;
        if filters.redirect.is_some()
            || filters.rewrite.is_some()
            || !filters.mirrors.is_empty()
            || filters.fault.is_some()
        {
            return Err(DocError::new(
                ffield,
                "only RequestHeaderModifier and ResponseHeaderModifier are supported on a backendRef",
            ));
        }
        merge(&mut request_headers, filters.request_headers);
        merge(&mut response_headers, filters.response_headers);
    }
    Ok(BackendRef {
        namespace,
        name: raw.name,
        port,
        weight,
        invalid,
        request_headers,
        response_headers,
        index,
    })
}

fn merge(into: &mut HeaderModifier, from: HeaderModifier) {
    into.add.extend(from.add);
    into.set.extend(from.set);
    into.remove.extend(from.remove);
}

/// Reads a list of filters; `field` names the list (its entries get `[i]`) or, for a single
/// backend filter, the entry itself.
fn filters_of(
    raw: Vec<RawFilter>,
    field: &str,
    route_ns: &str,
    flavor: Flavor,
) -> Result<Filters, DocError> {
    let single = raw.len() == 1 && field.ends_with(']');
    let mut out = Filters::default();
    for (i, f) in raw.into_iter().enumerate() {
        let ffield = if single {
            field.to_string()
        } else {
            format!("{field}[{i}]")
        };
        let missing = |name: &str| {
            DocError::new(
                format!("{ffield}.{name}"),
                format!("required by type {}", f.kind),
            )
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => {
                let m = f
                    .request_header_modifier
                    .clone()
                    .ok_or_else(|| missing("requestHeaderModifier"))?;
                merge(
                    &mut out.request_headers,
                    header_modifier(m, &format!("{ffield}.requestHeaderModifier"))?,
                );
            }
            "ResponseHeaderModifier" => {
                let m = f
                    .response_header_modifier
                    .clone()
                    .ok_or_else(|| missing("responseHeaderModifier"))?;
                merge(
                    &mut out.response_headers,
                    header_modifier(m, &format!("{ffield}.responseHeaderModifier"))?,
                );
            }
            "RequestRedirect" if flavor == Flavor::Http => {
                let r = f
                    .request_redirect
                    .ok_or_else(|| missing("requestRedirect"))?;
                let rfield = format!("{ffield}.requestRedirect");
                let status = match r.status_code.unwrap_or(302) {
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    s => {
                        return Err(DocError::new(
                            format!("{rfield}.statusCode"),
                            format!("invalid redirect status {s}: use 301, 302, 303, 307 or 308"),
                        ));
                    }
                };
                if let Some(s) = r
                    .scheme
                    .as_deref()
                    .filter(|s| !matches!(*s, "http" | "https"))
                {
                    return Err(DocError::new(
                        format!("{rfield}.scheme"),
                        format!("invalid scheme {s:?}: use http or https"),
                    ));
                }
                out.redirect = Some(Redirect {
                    scheme: r.scheme,
                    hostname: r.hostname,
                    port: r
                        .port
                        .map(|p| to_port(p, &format!("{rfield}.port")))
                        .transpose()?,
                    path: r
                        .path
                        .map(|p| path_modifier(p, &format!("{rfield}.path")))
                        .transpose()?,
                    status,
                });
            }
            "URLRewrite" if flavor == Flavor::Http => {
                let r = f.url_rewrite.ok_or_else(|| missing("urlRewrite"))?;
                let rfield = format!("{ffield}.urlRewrite");
                out.rewrite = Some(Rewrite {
                    hostname: r.hostname,
                    path: r
                        .path
                        .map(|p| path_modifier(p, &format!("{rfield}.path")))
                        .transpose()?,
                });
            }
            "RequestMirror" => {
                let m = f.request_mirror.ok_or_else(|| missing("requestMirror"))?;
                let mfield = format!("{ffield}.requestMirror");
                let per_million = match (m.percent, m.fraction) {
                    (Some(p), _) if (0..=100).contains(&p) => p as u32 * 10_000,
                    (Some(p), _) => {
                        return Err(DocError::new(
                            format!("{mfield}.percent"),
                            format!("invalid percent {p}: must be 0..=100"),
                        ));
                    }
                    (None, Some(fr)) => {
                        let den = fr.denominator.unwrap_or(100);
                        if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                            return Err(DocError::new(
                                format!("{mfield}.fraction"),
                                format!("invalid fraction {}/{den}", fr.numerator),
                            ));
                        }
                        (fr.numerator * 1_000_000 / den) as u32
                    }
                    (None, None) => 1_000_000,
                };
                let mut backend = backend_ref(
                    m.backend_ref,
                    &format!("{mfield}.backendRef"),
                    route_ns,
                    0,
                    flavor,
                )?;
                backend.weight = 1;
                out.mirrors.push(Mirror {
                    backend,
                    per_million,
                });
            }
            "ExtensionRef" => {
                let r = f.extension_ref.ok_or_else(|| missing("extensionRef"))?;
                if out.fault.is_some() {
                    return Err(DocError::new(
                        ffield,
                        "a rule takes one ExtensionRef filter (one FaultInjection)",
                    ));
                }
                let invalid = (r.group != "mesh.dev" || r.kind != "FaultInjection").then(|| {
                    format!(
                        "ExtensionRef names {}/{} {:?}: only mesh.dev/FaultInjection is supported",
                        r.group, r.kind, r.name
                    )
                });
                out.fault = Some(FaultRef {
                    name: r.name,
                    field: format!("{ffield}.extensionRef"),
                    invalid,
                });
            }
            other => {
                return Err(DocError::new(
                    format!("{ffield}.type"),
                    format!(
                        "filter type {other:?} is not supported here; supported: RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, ExtensionRef{}",
                        if flavor == Flavor::Http {
                            ", RequestRedirect, URLRewrite"
                        } else {
                            ""
                        }
                    ),
                ));
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err(DocError::new(
            field,
            "RequestRedirect and URLRewrite cannot be used together",
        ));
    }
    Ok(out)
}

fn rule(raw: RawRule, field: &str, route_ns: &str, flavor: Flavor) -> Result<RuleSpec, DocError> {
    let matches = match raw.matches {
        None => vec![MatchSpec::default()],
        Some(list) if list.is_empty() => vec![MatchSpec::default()],
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let mfield = format!("{field}.matches[{i}]");
                match flavor {
                    Flavor::Http => http_match(m, &mfield),
                    Flavor::Grpc => grpc_match(m, &mfield),
                }
            })
            .collect::<Result<_, _>>()?,
    };
    let filters = filters_of(
        raw.filters.unwrap_or_default(),
        &format!("{field}.filters"),
        route_ns,
        flavor,
    )?;
    let backends = raw
        .backend_refs
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, b)| backend_ref(b, &format!("{field}.backendRefs[{i}]"), route_ns, i, flavor))
        .collect::<Result<Vec<_>, _>>()?;
    if filters.redirect.is_some() && !backends.is_empty() {
        return Err(DocError::new(
            format!("{field}.backendRefs"),
            "a rule with a RequestRedirect filter must not have backendRefs",
        ));
    }
    let (timeout, backend_timeout) = match raw.timeouts {
        None => (None, None),
        Some(t) => {
            let tfield = format!("{field}.timeouts");
            let req = t
                .request
                .as_deref()
                .map(|s| duration(s, &format!("{tfield}.request")))
                .transpose()?;
            let be = t
                .backend_request
                .as_deref()
                .map(|s| duration(s, &format!("{tfield}.backendRequest")))
                .transpose()?;
            if let (Some(r), Some(b)) = (req, be)
                && !r.is_zero()
                && b > r
            {
                return Err(DocError::new(
                    format!("{tfield}.backendRequest"),
                    format!("backendRequest {b:?} must not exceed request {r:?}"),
                ));
            }
            // Zero means "no timeout" in the Gateway API.
            (req.filter(|d| !d.is_zero()), be.filter(|d| !d.is_zero()))
        }
    };
    let retry = match raw.retry {
        None => None,
        Some(r) => {
            let rfield = format!("{field}.retry");
            let attempts = match r.attempts.unwrap_or(1) {
                a @ 0..=100 => a as u32,
                a => {
                    return Err(DocError::new(
                        format!("{rfield}.attempts"),
                        format!("invalid attempts {a}: must be 0..=100"),
                    ));
                }
            };
            let mut codes = Vec::new();
            for (i, c) in r.codes.unwrap_or_default().into_iter().enumerate() {
                if !(400..=599).contains(&c) {
                    return Err(DocError::new(
                        format!("{rfield}.codes[{i}]"),
                        format!("invalid status code {c}: must be 400..=599"),
                    ));
                }
                codes.push(c as u16);
            }
            let backoff = r
                .backoff
                .as_deref()
                .map(|s| duration(s, &format!("{rfield}.backoff")))
                .transpose()?;
            Some(Retry {
                attempts,
                codes,
                backoff,
                per_try_timeout: None,
                on: Vec::new(),
                grpc: Vec::new(),
                from: None,
            })
        }
    };
    Ok(RuleSpec {
        name: raw.name.clone(),
        matches,
        backends,
        filters,
        timeout,
        backend_timeout,
        retry,
    })
}

/// The Gateway API's precedence between matches attached to the same parent: exact path, then
/// regular expression and prefix by length, then method, then most headers, then most query
/// parameters. `Ordering::Less` means `a` is tried first. Ties go to the older route, then to
/// `namespace/name` order, then rule and match order (the caller's stable sort keeps those).
pub fn match_precedence(a: &MatchSpec, b: &MatchSpec) -> Ordering {
    fn rank(p: &PathMatch) -> (u8, usize) {
        match p {
            PathMatch::Exact(s) => (3, s.len()),
            PathMatch::Regex(s) => (2, s.len()),
            PathMatch::Prefix(s) => (1, s.len()),
        }
    }
    rank(&b.path)
        .cmp(&rank(&a.path))
        .then(b.method.is_some().cmp(&a.method.is_some()))
        .then(b.headers.len().cmp(&a.headers.len()))
        .then(b.query.len().cmp(&a.query.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{Kind, Object, parse_doc};

    fn route(yaml: &str) -> Result<RouteSpec, DocError> {
        let doc: serde_json::Value = serde_norway::from_str(yaml).expect("yaml");
        match parse_doc(doc, "default").expect("parses") {
            Object::HttpRoute(r) => {
                let key = ObjKey {
                    kind: Kind::HTTPRoute,
                    namespace: "default".into(),
                    name: "r".into(),
                };
                RouteSpec::from_http(&r, key)
            }
            Object::GrpcRoute(r) => {
                let key = ObjKey {
                    kind: Kind::GRPCRoute,
                    namespace: "default".into(),
                    name: "r".into(),
                };
                RouteSpec::from_grpc(&r, key)
            }
            other => panic!("not a route: {other:?}"),
        }
    }

    const HEAD: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{kind: Service, group: '', name: reviews, port: 9080}]\n";

    #[test]
    fn reads_matches_filters_and_backends() {
        let r = route(&format!(
            "{HEAD}  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /api/}}, headers: [{{name: x-user, value: a}}], method: GET}}]\n    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-a, value: b}}]}}}}]\n    timeouts: {{request: 2s, backendRequest: 500ms}}\n    retry: {{attempts: 2, codes: [503]}}\n    backendRefs: [{{name: reviews-v1, port: 9080, weight: 90}}, {{name: reviews-v2, port: 9080, weight: 10}}]\n"
        ))
        .expect("valid");
        assert_eq!(
            r.parents,
            vec![ParentRef {
                namespace: "default".into(),
                name: "reviews".into(),
                port: Some(9080),
                index: 0
            }]
        );
        let rule = &r.rules[0];
        assert_eq!(rule.matches[0].path, PathMatch::Prefix("/api".into()));
        assert_eq!(rule.matches[0].method.as_deref(), Some("GET"));
        assert_eq!(
            rule.matches[0].headers,
            vec![("x-user".into(), StrMatch::Exact("a".into()))]
        );
        assert_eq!(rule.filters.request_headers.set[0].name, "x-a");
        assert_eq!(rule.timeout, Some(Duration::from_secs(2)));
        assert_eq!(rule.backend_timeout, Some(Duration::from_millis(500)));
        assert_eq!(
            rule.retry,
            Some(Retry {
                attempts: 2,
                codes: vec![503],
                backoff: None,
                per_try_timeout: None,
                on: Vec::new(),
                grpc: Vec::new(),
                from: None,
            })
        );
        assert_eq!(
            rule.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            vec![90, 10]
        );
        assert!(rule.backends.iter().all(|b| b.invalid.is_none()));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (
                "  rules: [{backendRefs: [{name: a, port: 80, weight: 1000001}]}]\n",
                "spec.rules[0].backendRefs[0].weight",
            ),
            (
                "  rules: [{backendRefs: [{name: a, port: 80, weight: -1}]}]\n",
                "spec.rules[0].backendRefs[0].weight",
            ),
            (
                "  rules: [{backendRefs: [{name: a, port: 0}]}]\n",
                "spec.rules[0].backendRefs[0].port",
            ),
            (
                "  rules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]\n",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "  rules: [{matches: [{path: {type: Exact, value: nope}}]}]\n",
                "spec.rules[0].matches[0].path.value",
            ),
            (
                "  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]\n",
                "spec.rules[0].timeouts.backendRequest",
            ),
            (
                "  rules: [{timeouts: {request: soon}}]\n",
                "spec.rules[0].timeouts.request",
            ),
            (
                "  rules: [{retry: {codes: [200]}}]\n",
                "spec.rules[0].retry.codes[0]",
            ),
            (
                "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]}]\n",
                "spec.rules[0].filters[0].requestRedirect.statusCode",
            ),
            (
                "  rules: [{filters: [{type: ExtensionRef}]}]\n",
                "spec.rules[0].filters[0].extensionRef",
            ),
            (
                "  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: mesh.dev, kind: FaultInjection, name: a}}, {type: ExtensionRef, extensionRef: {group: mesh.dev, kind: FaultInjection, name: b}}]}]\n",
                "spec.rules[0].filters[1]",
            ),
            (
                "  rules: [{backendRefs: [{name: b, port: 80, filters: [{type: ExtensionRef, extensionRef: {group: mesh.dev, kind: FaultInjection, name: a}}]}]}]\n",
                "spec.rules[0].backendRefs[0].filters[0]",
            ),
            (
                "  rules: [{filters: [{type: CORS}]}]\n",
                "spec.rules[0].filters[0].type",
            ),
            // Header names and values the proxies could not parse (found by fuzzing: the
            // controller served a match on `x-19!(canary`, and mesh-proxy refused the route).
            (
                "  rules: [{matches: [{headers: [{name: 'x-19!(canary', value: 'yes'}]}]}]\n",
                "spec.rules[0].matches[0].headers[0].name",
            ),
            (
                "  rules: [{matches: [{headers: [{name: '', value: 'yes'}]}]}]\n",
                "spec.rules[0].matches[0].headers[0].name",
            ),
            (
                "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'a b', value: c}]}}]}]\n",
                "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            ),
            (
                "  rules: [{filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x, value: \"a\\nb\"}]}}]}]\n",
                "spec.rules[0].filters[0].responseHeaderModifier.add[0].value",
            ),
            (
                "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {remove: [ok, ':path']}}]}]\n",
                "spec.rules[0].filters[0].requestHeaderModifier.remove[1]",
            ),
        ];
        for (rules, field) in cases {
            let err = route(&format!("{HEAD}{rules}")).expect_err(rules);
            assert_eq!(err.field, field, "{rules}: {err}");
        }
    }

    #[test]
    fn unresolvable_backends_are_marked_not_refused() {
        let r = route(&format!(
            "{HEAD}  rules: [{{backendRefs: [{{name: a, namespace: other, port: 80}}, {{name: b, kind: Pod, port: 80}}, {{name: c}}]}}]\n"
        ))
        .expect("valid");
        let why: Vec<_> = r.rules[0]
            .backends
            .iter()
            .map(|b| b.invalid.clone().map(|(_, why)| why).unwrap_or_default())
            .collect();
        assert_eq!(
            why[0], "",
            "another namespace is resolved against ReferenceGrants"
        );
        assert!(why[1].contains("only Services"), "{why:?}");
        assert!(why[2].contains("no port"), "{why:?}");
    }

    #[test]
    fn gateway_and_service_parents_are_told_apart() {
        let r = route("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  hostnames: [Shop.Example.com]\n  parentRefs: [{name: gw}, {group: '', kind: Service, name: s}, {name: edge, namespace: infra, sectionName: https, port: 443}, {group: gateway.networking.k8s.io, kind: ListenerSet, name: ls}]\n").expect("valid");
        assert_eq!(r.parents.len(), 1);
        assert_eq!(r.parents[0].name, "s");
        assert_eq!(r.parents[0].index, 1);
        assert_eq!(
            r.gateway_parents,
            vec![
                GatewayParentRef {
                    namespace: "default".into(),
                    name: "gw".into(),
                    section_name: None,
                    port: None,
                    index: 0
                },
                GatewayParentRef {
                    namespace: "infra".into(),
                    name: "edge".into(),
                    section_name: Some("https".into()),
                    port: Some(443),
                    index: 2
                },
            ]
        );
        assert_eq!(r.hostnames, vec!["shop.example.com"]);
    }

    /// The API server fills a parent's group in with the Gateway API's: `kind: Service` alone
    /// is no Service, and saying so beats serving nothing.
    #[test]
    fn a_service_parent_without_the_core_group_is_an_error_naming_it() {
        for (parent, needle) in [
            (
                "{kind: Service, name: s}",
                "\"gateway.networking.k8s.io\" (the default)",
            ),
            (
                "{group: gateway.networking.k8s.io, kind: Service, name: s}",
                "\"gateway.networking.k8s.io\":",
            ),
        ] {
            let err = route(&format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: gw}}, {parent}]\n"))
                .expect_err(parent)
                .to_string();
            assert!(err.contains("spec.parentRefs[1].group"), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn grpc_methods_become_paths() {
        let r = route("apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{group: '', kind: Service, name: s}]\n  rules:\n  - matches: [{method: {service: pkg.Echo, method: Say}}, {method: {service: pkg.Echo}}]\n").expect("valid");
        let paths: Vec<_> = r.rules[0].matches.iter().map(|m| m.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathMatch::Exact("/pkg.Echo/Say".into()),
                PathMatch::Prefix("/pkg.Echo".into())
            ]
        );
    }

    #[test]
    fn precedence_follows_the_spec() {
        let m = |path: PathMatch, method: bool, headers: usize, query: usize| MatchSpec {
            path,
            method: method.then(|| "GET".to_string()),
            headers: (0..headers)
                .map(|i| (format!("h{i}"), StrMatch::Exact("v".into())))
                .collect(),
            query: (0..query)
                .map(|i| (format!("q{i}"), StrMatch::Exact("v".into())))
                .collect(),
        };
        // Each pair: the first must be tried before the second.
        let cases = [
            (
                m(PathMatch::Exact("/a".into()), false, 0, 0),
                m(PathMatch::Prefix("/a/b/c".into()), true, 3, 3),
            ),
            (
                m(PathMatch::Prefix("/a/b".into()), false, 0, 0),
                m(PathMatch::Prefix("/a".into()), true, 3, 3),
            ),
            (
                m(PathMatch::Prefix("/a".into()), true, 0, 0),
                m(PathMatch::Prefix("/a".into()), false, 3, 3),
            ),
            (
                m(PathMatch::Prefix("/a".into()), false, 2, 0),
                m(PathMatch::Prefix("/a".into()), false, 1, 3),
            ),
            (
                m(PathMatch::Prefix("/a".into()), false, 1, 1),
                m(PathMatch::Prefix("/a".into()), false, 1, 0),
            ),
            (
                m(PathMatch::Regex("/x.*".into()), false, 0, 0),
                m(PathMatch::Prefix("/".into()), false, 0, 0),
            ),
        ];
        for (first, second) in cases {
            assert_eq!(
                match_precedence(&first, &second),
                Ordering::Less,
                "{first:?} before {second:?}"
            );
            assert_eq!(match_precedence(&second, &first), Ordering::Greater);
        }
    }
}
