//! Gateways (north-south), as the Gateway API defines them: the GatewayClasses whose
//! `controllerName` is ours, their Gateways' listeners (HTTP and HTTPS), which routes attach to
//! which listener (a parentRef's `sectionName` and `port`, the listener's `allowedRoutes`, the
//! intersection of hostnames), the hosts each listener serves once more specific listeners on
//! the same port have taken theirs (listener isolation), and the conditions the spec asks for
//! on Gateways, listeners and routes.
//!
//! Reading is pure and per object; [`super::Index`] puts the pieces together, since a route's
//! entries come from the same resolution as a Service's.

use std::collections::BTreeMap;

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::{
    Gateway, GatewayListenersAllowedRoutesNamespacesFrom, GatewayListenersTlsMode,
};
use serde::Serialize;

use super::grants::{GATEWAY_GROUP, Referrer, Target};
use super::model::{Cond, RefProblem, RouteEntry};
use super::routes::{GatewayParentRef, RouteSpec};
use crate::objects::{DocError, Kind};

/// The `controllerName` of the GatewayClasses this controller serves.
pub const CONTROLLER_NAME: &str = crate::status::CONTROLLER_NAME;

/// The route kinds a listener of ours takes (HTTP and HTTPS listeners alike).
pub const ROUTE_KINDS: [Kind; 2] = [Kind::HTTPRoute, Kind::GRPCRoute];

/// A GatewayClass: whether it is ours, and the generation its status answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassRead {
    pub ours: bool,
    pub generation: i64,
}

impl ClassRead {
    pub fn read(c: &GatewayClass) -> Self {
        Self {
            ours: c.spec.controller_name == CONTROLLER_NAME,
            generation: c.metadata.generation.unwrap_or(0),
        }
    }
}

/// A Gateway, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRead {
    pub generation: i64,
    pub class: String,
    pub listeners: Vec<ListenerRead>,
}

/// One listener, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerRead {
    pub name: String,
    pub port: u16,
    /// As written: HTTP and HTTPS are ours, anything else is refused in status.
    pub protocol: String,
    /// Lowercased; `None` takes every host.
    pub hostname: Option<String>,
    /// `Terminate` or `Passthrough`, when the listener has `tls`.
    pub tls_mode: Option<String>,
    pub certs: Vec<CertRef>,
    pub namespaces: Namespaces,
    /// `allowedRoutes.kinds` as `(group, kind)`; `None` for the protocol's default.
    pub kinds: Option<Vec<(String, String)>>,
}

/// A listener's `certificateRefs` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertRef {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

/// `allowedRoutes.namespaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespaces {
    Same,
    All,
    Selector(Selector),
}

/// A label selector over namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: BTreeMap<String, String>,
    /// `(key, operator, values)`; operators checked when read.
    expressions: Vec<(String, String, Vec<String>)>,
}

impl Selector {
    /// Whether labels are selected, as Kubernetes label selectors do (all terms must hold).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|(k, op, values)| {
                let have = labels.get(k);
                match op.as_str() {
                    "In" => have.is_some_and(|v| values.contains(v)),
                    "NotIn" => have.is_none_or(|v| !values.contains(v)),
                    "Exists" => have.is_some(),
                    _ => have.is_none(), // DoesNotExist
                }
            })
    }
}

impl GatewayRead {
    /// Reads a Gateway; what the API server's schema lets through and we cannot serve is
    /// refused with the field named.
    pub fn read(gw: &Gateway) -> Result<Self, DocError> {
        let mut listeners = Vec::new();
        for (i, l) in gw.spec.listeners.iter().enumerate() {
            let field = format!("spec.listeners[{i}]");
            let port = u16::try_from(l.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    DocError::new(
                        format!("{field}.port"),
                        format!("{} is not a port (1-65535)", l.port),
                    )
                })?;
            let allowed = l.allowed_routes.as_ref();
            let ns = allowed.and_then(|a| a.namespaces.as_ref());
            let namespaces = match ns.and_then(|n| n.from.as_ref()) {
                None | Some(GatewayListenersAllowedRoutesNamespacesFrom::Same) => Namespaces::Same,
                Some(GatewayListenersAllowedRoutesNamespacesFrom::All) => Namespaces::All,
                Some(GatewayListenersAllowedRoutesNamespacesFrom::Selector) => {
                    let s = ns.and_then(|n| n.selector.as_ref());
                    let mut expressions = Vec::new();
                    for (j, e) in s
                        .and_then(|s| s.match_expressions.as_ref())
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if !matches!(
                            e.operator.as_str(),
                            "In" | "NotIn" | "Exists" | "DoesNotExist"
                        ) {
                            return Err(DocError::new(
                                format!(
                                    "{field}.allowedRoutes.namespaces.selector.matchExpressions[{j}].operator"
                                ),
                                format!(
                                    "{:?} is not a label selector operator (In, NotIn, Exists, DoesNotExist)",
                                    e.operator
                                ),
                            ));
                        }
                        expressions.push((
                            e.key.clone(),
                            e.operator.clone(),
                            e.values.clone().unwrap_or_default(),
                        ));
                    }
                    Namespaces::Selector(Selector {
                        labels: s.and_then(|s| s.match_labels.clone()).unwrap_or_default(),
                        expressions,
                    })
                }
            };
            // An empty list is the protocol's default, as an absent one.
            let kinds = allowed
                .and_then(|a| a.kinds.as_ref())
                .filter(|ks| !ks.is_empty())
                .map(|ks| {
                    ks.iter()
                        .map(|k| {
                            (
                                k.group.clone().unwrap_or_else(|| GATEWAY_GROUP.into()),
                                k.kind.clone(),
                            )
                        })
                        .collect()
                });
            let tls = l.tls.as_ref();
            listeners.push(ListenerRead {
                name: l.name.clone(),
                port,
                protocol: l.protocol.clone(),
                hostname: l.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
                tls_mode: tls.map(|t| match t.mode {
                    Some(GatewayListenersTlsMode::Passthrough) => "Passthrough".into(),
                    _ => "Terminate".into(),
                }),
                certs: tls
                    .and_then(|t| t.certificate_refs.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|c| CertRef {
                        group: c.group.clone().unwrap_or_default(),
                        kind: c.kind.clone().unwrap_or_else(|| "Secret".into()),
                        namespace: c
                            .namespace
                            .clone()
                            .unwrap_or_else(|| gw.metadata.namespace.clone().unwrap_or_default()),
                        name: c.name.clone(),
                    })
                    .collect(),
                namespaces,
                kinds,
            });
        }
        Ok(Self {
            generation: gw.metadata.generation.unwrap_or(0),
            class: gw.spec.gateway_class_name.clone(),
            listeners,
        })
    }
}

/// A listener's protocol, when it is one the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ListenerProtocol {
    Http,
    Https,
}

/// A listener as the gateway serves it, with its status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerModel {
    pub name: String,
    pub port: u16,
    /// `None` when the protocol is not one we serve (the listener is not programmed).
    pub protocol: Option<ListenerProtocol>,
    pub hostname: Option<String>,
    /// Certificates of an HTTPS listener, permitted and of the right kind.
    pub certs: Vec<CertRef>,
    /// Routes accepted on it.
    pub attached_routes: u32,
    /// The route kinds it takes (`allowedRoutes.kinds` that we serve).
    pub supported_kinds: Vec<Kind>,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    pub programmed: Cond,
    /// `Conflicted`: true when another listener takes the same port with another protocol.
    pub conflicted: Cond,
}

impl ListenerModel {
    /// Served: accepted, its references resolved, no conflict.
    pub fn valid(&self) -> bool {
        self.accepted.ok && self.resolved_refs.ok && !self.conflicted.ok
    }
}

/// The hosts of one port that one listener serves, and the routes there, in precedence order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualHost {
    pub listener: String,
    /// A hostname, a `*.suffix` wildcard, or `*` for every host the port's other listeners
    /// leave.
    pub hostname: String,
    pub routes: Vec<RouteEntry>,
}

/// One port of a Gateway.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayPort {
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// Most specific hostname first; a host no virtual host names gets 404.
    pub vhosts: Vec<VirtualHost>,
}

/// A Gateway of ours, resolved.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayModel {
    pub namespace: String,
    pub name: String,
    pub class: String,
    pub generation: i64,
    pub accepted: Cond,
    pub listeners: Vec<ListenerModel>,
    pub ports: Vec<GatewayPort>,
}

/// Everything north-south in a model.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Gateways {
    /// Our GatewayClasses, with the generation their status answers.
    pub classes: BTreeMap<String, i64>,
    /// Gateways of our classes, by `namespace/name`.
    pub gateways: BTreeMap<String, std::sync::Arc<GatewayModel>>,
    /// For each route with a parentRef to a Gateway of ours: that parent's index and whether it
    /// is accepted (a route's `ResolvedRefs` comes from its resolution errors, as for Services).
    #[serde(skip)]
    pub route_parents: BTreeMap<crate::objects::ObjKey, Vec<(usize, Cond)>>,
    /// The certificates the listeners name, by `(namespace, name)` (never served as JSON).
    #[serde(skip)]
    pub secrets: BTreeMap<(String, String), std::sync::Arc<TlsSecret>>,
}

fn cond(ok: bool, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        ok,
        reason: reason.into(),
        message: message.into(),
    }
}

/// A listener's status before routes are counted. `granted` tells whether a ReferenceGrant in
/// a certificate's namespace lets Gateways of `namespace` refer to it; `secret_ok` whether the
/// Secret exists and holds a certificate and key.
pub fn listener_model(
    namespace: &str,
    l: &ListenerRead,
    all: &[ListenerRead],
    granted: &dyn Fn(Referrer<'_>, &str, Target<'_>) -> bool,
    secret_ok: &dyn Fn(&str, &str) -> Result<(), String>,
) -> ListenerModel {
    let protocol = match l.protocol.as_str() {
        "HTTP" => Some(ListenerProtocol::Http),
        "HTTPS" => Some(ListenerProtocol::Https),
        _ => None,
    };
    let accepted = match protocol {
        None => cond(
            false,
            "UnsupportedProtocol",
            format!("protocol {:?} is not served: use HTTP or HTTPS", l.protocol),
        ),
        Some(ListenerProtocol::Https) if l.tls_mode.as_deref() == Some("Passthrough") => cond(
            false,
            "UnsupportedValue",
            "tls.mode Passthrough is not served on an HTTPS listener",
        ),
        Some(_) => cond(true, "Accepted", "listener accepted"),
    };
    // Route kinds: the protocol's default, or those asked for that we serve.
    let mut supported_kinds = Vec::new();
    let mut bad_kinds = Vec::new();
    match &l.kinds {
        None if protocol.is_some() => supported_kinds.extend(ROUTE_KINDS),
        None => {}
        Some(ks) => {
            for (group, kind) in ks {
                match ROUTE_KINDS.iter().find(|k| k.to_string() == *kind) {
                    Some(k) if group == GATEWAY_GROUP && protocol.is_some() => {
                        supported_kinds.push(*k)
                    }
                    _ => bad_kinds.push(format!("{group}/{kind}")),
                }
            }
        }
    }
    let mut certs = Vec::new();
    let mut problems: Vec<(&str, String)> = Vec::new();
    if protocol == Some(ListenerProtocol::Https) {
        for (i, c) in l.certs.iter().enumerate() {
            let what = format!("tls.certificateRefs[{i}] {}/{}", c.namespace, c.name);
            let permitted = c.namespace == namespace
                || granted(
                    Referrer {
                        group: GATEWAY_GROUP,
                        kind: "Gateway",
                        namespace,
                    },
                    &c.namespace,
                    Target {
                        group: &c.group,
                        kind: &c.kind,
                        name: &c.name,
                    },
                );
            if !permitted {
                problems.push((
                    "RefNotPermitted",
                    format!(
                        "{what} is in another namespace, and no ReferenceGrant there lets Gateways of {namespace} refer to it"
                    ),
                ));
            } else if !(matches!(c.group.as_str(), "" | "core") && c.kind == "Secret") {
                problems.push((
                    "InvalidCertificateRef",
                    format!("{what}: {}/{} is not a Secret", c.group, c.kind),
                ));
            } else if let Err(why) = secret_ok(&c.namespace, &c.name) {
                problems.push(("InvalidCertificateRef", format!("{what}: {why}")));
            } else {
                certs.push(c.clone());
            }
        }
        if l.certs.is_empty() {
            problems.push((
                "InvalidCertificateRef",
                "an HTTPS listener needs tls.certificateRefs".into(),
            ));
        }
    }
    if !bad_kinds.is_empty() {
        problems.push((
            "InvalidRouteKinds",
            format!(
                "route kinds not served here: {}; served: HTTPRoute, GRPCRoute",
                bad_kinds.join(", ")
            ),
        ));
    }
    // RefNotPermitted first, as the spec asks, then a certificate's, then the kinds.
    let resolved_refs = [
        "RefNotPermitted",
        "InvalidCertificateRef",
        "InvalidRouteKinds",
    ]
    .iter()
    .find_map(|reason| {
        let msgs: Vec<&str> = problems
            .iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, m)| m.as_str())
            .collect();
        (!msgs.is_empty()).then(|| {
            let all: Vec<&str> = problems.iter().map(|(_, m)| m.as_str()).collect();
            cond(false, reason, all.join("; "))
        })
    })
    .unwrap_or_else(|| cond(true, "ResolvedRefs", "every reference resolves"));
    let others = || all.iter().filter(|o| o.name != l.name && o.port == l.port);
    let conflicted = if let Some(o) = others().find(|o| o.protocol != l.protocol) {
        cond(
            true,
            "ProtocolConflict",
            format!(
                "listener {} takes port {} with protocol {}",
                o.name, o.port, o.protocol
            ),
        )
    } else if let Some(o) = others().find(|o| o.hostname == l.hostname) {
        cond(
            true,
            "HostnameConflict",
            format!(
                "listener {} takes port {} for the same hostname ({})",
                o.name,
                o.port,
                l.hostname.as_deref().unwrap_or("none")
            ),
        )
    } else {
        cond(false, "NoConflicts", "no conflicts")
    };
    let mut m = ListenerModel {
        name: l.name.clone(),
        port: l.port,
        protocol,
        hostname: l.hostname.clone(),
        certs,
        attached_routes: 0,
        supported_kinds,
        accepted,
        resolved_refs,
        programmed: cond(true, "Programmed", "served by the gateway's proxies"),
        conflicted,
    };
    // An HTTPS listener with no usable certificate cannot serve; one with some can.
    let servable = m.accepted.ok
        && !m.conflicted.ok
        && (protocol != Some(ListenerProtocol::Https) || !m.certs.is_empty());
    if !servable {
        m.programmed = cond(
            false,
            "Invalid",
            "the listener is not valid (see its other conditions)",
        );
    }
    m
}

/// Whether `host` (a hostname or a `*.suffix` wildcard) falls within the wildcard `pattern`
/// (`*.example.com`: one or more labels before `example.com`, never `example.com` itself).
fn within_wildcard(pattern: &str, host: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix('*') else {
        return false;
    };
    // A wildcard host within it ends with the same labels (or more of them).
    host.strip_prefix('*').unwrap_or(host).ends_with(suffix)
}

/// The hosts a route serves on a listener: the intersection of the listener's hostname and the
/// route's `hostnames`, the more specific of each matching pair. Empty when none intersects.
/// `*` stands for every host (a listener without hostname and a route without hostnames).
pub fn intersect(listener: Option<&str>, route: &[String]) -> Vec<String> {
    intersect_ranked(listener, route)
        .into_iter()
        .map(|(h, _)| h)
        .collect()
}

/// [`intersect`], each host with the [`hostname_rank`] of the route's hostname it came from
/// (that of `*` for a route without hostnames), the best one when several give the same host.
pub fn intersect_ranked(listener: Option<&str>, route: &[String]) -> Vec<(String, HostRank)> {
    let none = hostname_rank("*");
    match (listener, route.is_empty()) {
        (None, true) => vec![("*".into(), none)],
        (None, false) => route
            .iter()
            .map(|h| (h.clone(), hostname_rank(h)))
            .collect(),
        (Some(l), true) => vec![(l.to_string(), none)],
        (Some(l), false) => {
            let mut out: Vec<(String, HostRank)> = Vec::new();
            for h in route {
                let keep = if h == l || (l.starts_with('*') && within_wildcard(l, h)) {
                    Some(h.as_str())
                } else if h.starts_with('*') && within_wildcard(h, l) {
                    Some(l)
                } else {
                    None
                };
                let Some(k) = keep else { continue };
                let rank = hostname_rank(h);
                match out.iter_mut().find(|(o, _)| o == k) {
                    Some((_, r)) => *r = (*r).max(rank),
                    None => out.push((k.to_string(), rank)),
                }
            }
            out
        }
    }
}

/// Whether the hosts of `pattern` (a name, a `*.suffix` wildcard, or `*` for every host) take
/// in every host of `host`: an equal name, a host within the wildcard, anything for `*`.
pub fn covers(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || host == pattern
        || (pattern.starts_with('*') && within_wildcard(pattern, host))
}

/// A hostname's rank: see [`hostname_rank`].
pub type HostRank = (u8, usize);

/// How a route's hostname ranks among the routes serving one host: the most characters of a
/// name first, then of a wildcard, then no hostname (`*`).
pub fn hostname_rank(host: &str) -> HostRank {
    match host {
        "*" => (0, 0),
        h if h.starts_with('*') => (1, h.len()),
        h => (2, h.len()),
    }
}

/// Virtual hosts most specific first: names, then wildcards (longer first), then `*`.
pub fn host_order(a: &str, b: &str) -> std::cmp::Ordering {
    hostname_rank(b)
        .cmp(&hostname_rank(a))
        .then_with(|| a.cmp(b))
}

/// The listeners (by index) a route attaches to, with the hosts it serves on each and the rank
/// of the route's hostname each comes from.
pub type Attached = Vec<(usize, Vec<(String, HostRank)>)>;

/// Why a route does not attach to a Gateway through `parent`, or the listeners (by index) it
/// attaches to with the hosts it serves on each.
pub fn attach(
    route: &RouteSpec,
    parent: &GatewayParentRef,
    gateway_namespace: &str,
    listeners: &[(ListenerRead, ListenerModel)],
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Attached, (RefProblem, String)> {
    let by_ref: Vec<usize> = listeners
        .iter()
        .enumerate()
        .filter(|(_, (l, _))| {
            parent.section_name.as_ref().is_none_or(|s| *s == l.name)
                && parent.port.is_none_or(|p| p == l.port)
        })
        .map(|(i, _)| i)
        .collect();
    if by_ref.is_empty() {
        let what = match (&parent.section_name, parent.port) {
            (Some(s), Some(p)) => format!("no listener named {s} on port {p}"),
            (Some(s), None) => format!("no listener named {s}"),
            (None, Some(p)) => format!("no listener on port {p}"),
            (None, None) => "no listeners".into(),
        };
        return Err((
            RefProblem::NoMatchingParent,
            format!("Gateway {gateway_namespace}/{}: {what}", parent.name),
        ));
    }
    let allowed: Vec<usize> = by_ref
        .into_iter()
        .filter(|&i| {
            let (l, m) = &listeners[i];
            let ns_ok = match &l.namespaces {
                Namespaces::Same => route.key.namespace == gateway_namespace,
                Namespaces::All => true,
                Namespaces::Selector(s) => s.matches(namespace_labels),
            };
            ns_ok && m.supported_kinds.contains(&route.key.kind)
        })
        .collect();
    if allowed.is_empty() {
        return Err((
            RefProblem::NotAllowedByListeners,
            format!(
                "no listener of Gateway {gateway_namespace}/{} allows {}s from namespace {}",
                parent.name, route.key.kind, route.key.namespace
            ),
        ));
    }
    let attached: Attached = allowed
        .into_iter()
        .map(|i| {
            (
                i,
                intersect_ranked(listeners[i].0.hostname.as_deref(), &route.hostnames),
            )
        })
        .filter(|(_, hosts)| !hosts.is_empty())
        .collect();
    if attached.is_empty() {
        return Err((
            RefProblem::NoMatchingListenerHostname,
            format!(
                "none of the route's hostnames ({}) is a host of a listener of Gateway {gateway_namespace}/{} it may attach to",
                route.hostnames.join(", "),
                parent.name
            ),
        ));
    }
    Ok(attached)
}

/// Drops the hosts a listener would serve that a more specific listener on the same port
/// takes (every request for them selects that one), so a request only meets the routes of the
/// listener it selects. `hosts[i]` are listener `i`'s hosts; listeners with a hostname keep an
/// entry for it even with no route, so that their hosts answer 404 rather than fall through.
/// `servable[i]` says whether listener `i` is served: one that is not takes no host.
pub fn isolate(listeners: &[ListenerRead], servable: &[bool], hosts: &mut [Vec<String>]) {
    for (i, l) in listeners.iter().enumerate() {
        if let Some(h) = &l.hostname
            && !hosts[i].contains(h)
        {
            hosts[i].push(h.clone());
        }
        let mine = hostname_rank(l.hostname.as_deref().unwrap_or("*"));
        let takers: Vec<&str> = listeners
            .iter()
            .zip(servable)
            .filter(|(_, s)| **s)
            .map(|(o, _)| o)
            .filter(|o| o.port == l.port && o.name != l.name)
            .filter(|o| hostname_rank(o.hostname.as_deref().unwrap_or("*")) > mine)
            .filter_map(|o| o.hostname.as_deref())
            .collect();
        hosts[i].retain(|h| !takers.iter().any(|t| covers(t, h)));
    }
}

/// The certificate and key of a TLS Secret, as PEM. Its `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSecret")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A Secret's certificate and key when it is of type `kubernetes.io/tls` (`None` for other
/// types: they are not certificates), or what is wrong with them: `tls.crt` must hold one or
/// more PEM certificates and `tls.key` a PEM private key of a kind rustls signs with.
pub fn read_secret(s: &k8s_openapi::api::core::v1::Secret) -> Option<Result<TlsSecret, String>> {
    if s.type_.as_deref() != Some("kubernetes.io/tls") {
        return None;
    }
    let field = |name: &str| -> Result<String, String> {
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|b| b.0.clone())
            .or_else(|| {
                s.string_data
                    .as_ref()
                    .and_then(|d| d.get(name))
                    .map(|v| v.clone().into_bytes())
            })
            .ok_or_else(|| format!("the Secret has no {name}"))?;
        String::from_utf8(bytes).map_err(|_| format!("{name} is not PEM text"))
    };
    Some((|| {
        let cert_pem = field("tls.crt")?;
        let key_pem = field("tls.key")?;
        mesh_api::tls::server_certified_key(&cert_pem, &key_pem, ["tls.crt", "tls.key"])?;
        Ok(TlsSecret { cert_pem, key_pem })
    })())
}

#[cfg(test)]
pub(crate) mod tests;
