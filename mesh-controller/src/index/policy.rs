//! AuthorizationPolicy and RateLimitPolicy, checked and compiled into what translation needs.
//!
//! Checking errs on the safe side: a value or field the controller cannot understand makes an
//! Allow policy narrower (the entry holding it matches nothing) and a Deny policy wider (the
//! condition holding it matches anything). Each such case is reported at
//! `/debug/config-errors`, naming the object, field and value.

use std::collections::BTreeMap;

use mesh_api::crds::{
    AuthorizationAction, AuthorizationOperation, AuthorizationPolicy, AuthorizationSource,
    PolicyTargetReference, RateLimitPolicy, UnknownFields, default_burst,
};
use serde::Serialize;

use super::model::{RefProblem, ResolveError};
use crate::objects::{Kind, ObjKey, is_dns_label};

/// What a namespace's workloads do with a request no ALLOW policy decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthzDefault {
    /// Allow it (with no policy, a workload takes every request).
    #[default]
    Allow,
    /// Deny it: only what an ALLOW policy names gets in.
    Deny,
    /// Allow callers with a mesh identity, deny the rest.
    Authenticated,
}

impl AuthzDefault {
    pub fn parse(s: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(s, true).ok()
    }
}

/// What a policy attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every workload in the policy's namespace.
    Namespace,
    /// The workloads a Service selects; with a port name, only that port.
    Service { name: String, port: Option<String> },
    /// A Gateway of the policy's namespace (RateLimitPolicy only): the requests its listeners
    /// take; with a listener name, only that listener's.
    Gateway {
        name: String,
        listener: Option<String>,
    },
}

/// A condition on a SPIFFE ID, or on the normalized path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

/// A pattern's text without its ending `*`, and whether it had one (a prefix); `what` names
/// the pattern in the error for a `*` elsewhere.
fn split_star<'v>(v: &'v str, what: &str) -> Result<(&'v str, bool), String> {
    let (body, prefix) = match v.strip_suffix('*') {
        Some(b) => (b, true),
        None => (v, false),
    };
    if body.contains('*') {
        return Err(format!("`*` may only end a {what}"));
    }
    Ok((body, prefix))
}

/// Who calls. An entry with `never` matches nobody (an Allow entry with something the
/// controller cannot read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    /// Conditions on the caller's SPIFFE ID, all of which must hold, each a list of
    /// alternatives: identities, service accounts, namespaces (those given).
    pub ids: Vec<Vec<Pattern>>,
    pub authenticated: Option<bool>,
    pub never: bool,
}

/// What is asked for; as [`Source`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub ports: Option<Vec<u16>>,
    pub paths: Option<Vec<Pattern>>,
    pub methods: Option<Vec<String>>,
    pub never: bool,
}

impl Operation {
    /// Whether it asks anything of HTTP (path or method).
    pub fn is_http(&self) -> bool {
        self.paths.is_some() || self.methods.is_some()
    }
}

/// A rule: any `from` and any `to` (empty: anyone, anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Authz {
    /// `<namespace>/<name>`, the name proxies report decisions under.
    pub name: String,
    pub action: AuthorizationAction,
    pub targets: Vec<Target>,
    /// Rules that can match; an Allow rule with something unreadable at rule level is left out.
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    /// `<namespace>/<name>`.
    pub name: String,
    pub targets: Vec<Target>,
    pub total: Option<Bucket>,
    pub per_identity: Option<Bucket>,
}

/// Every policy of a namespace, and its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespacePolicies {
    pub authz: Vec<Authz>,
    pub rate_limits: Vec<RateLimit>,
}

/// The policy part of the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policies {
    pub default: AuthzDefault,
    /// Namespaces that set their own default (`mesh.dev/authz-default`).
    pub namespace_defaults: BTreeMap<String, AuthzDefault>,
    pub by_namespace: BTreeMap<String, NamespacePolicies>,
}

impl Policies {
    pub fn default_for(&self, namespace: &str) -> AuthzDefault {
        self.namespace_defaults
            .get(namespace)
            .copied()
            .unwrap_or(self.default)
    }

    /// What applies to a workload port in `namespace` reached through the Services `via`
    /// (name, port name): Namespace-wide policies and those of any of these Services.
    pub fn for_port<'a>(&'a self, namespace: &str, via: &Via<'_>) -> PortPolicies<'a> {
        let ns = self.by_namespace.get(namespace);
        let authz = || {
            ns.into_iter()
                .flat_map(|n| &n.authz)
                .filter(|a| applies(&a.targets, via))
        };
        let limits: Vec<&RateLimit> = ns
            .into_iter()
            .flat_map(|n| &n.rate_limits)
            .filter(|l| applies(&l.targets, via))
            .collect();
        // One rate limit per port: the first (by name) that targets one of the Services, else
        // the first Namespace-wide one.
        let by_service = |l: &&&RateLimit| {
            l.targets.iter().any(|t| {
                matches!(t, Target::Service { .. }) && applies(std::slice::from_ref(t), via)
            })
        };
        let rate_limit = limits.iter().find(by_service).or(limits.first()).copied();
        PortPolicies {
            default: self.default_for(namespace),
            deny: authz()
                .filter(|a| a.action == AuthorizationAction::Deny)
                .collect(),
            allow: authz()
                .filter(|a| a.action == AuthorizationAction::Allow)
                .collect(),
            rate_limit,
            rate_limits_not_applied: limits
                .iter()
                .filter(|l| rate_limit.is_none_or(|r| r.name != l.name))
                .map(|l| l.name.as_str())
                .collect(),
        }
    }
}

/// A Service, by name and port name, through which a workload port is reached.
pub type ViaService<'a> = (&'a str, &'a str);

/// The Services through which a workload port is reached.
pub type Via<'a> = [ViaService<'a>];

/// Whether a policy with these targets applies to a port reached through `via`.
pub fn applies(targets: &[Target], via: &Via<'_>) -> bool {
    targets.iter().any(|t| match t {
        Target::Namespace => true,
        Target::Service { name, port } => via
            .iter()
            .any(|(s, p)| s == name && port.as_deref().is_none_or(|want| want == *p)),
        // A Gateway's listeners are no workload's port.
        Target::Gateway { .. } => false,
    })
}

impl Policies {
    /// The rate limit of Gateway `namespace/gateway` on a chain taking the requests of
    /// `listeners`: the first (by name) that targets one of those listeners, else the first
    /// that targets the whole Gateway.
    pub fn for_gateway<'a>(
        &'a self,
        namespace: &str,
        gateway: &str,
        listeners: &[&str],
    ) -> Option<&'a RateLimit> {
        let limits = || {
            self.by_namespace
                .get(namespace)
                .into_iter()
                .flat_map(|n| &n.rate_limits)
        };
        let targets = |l: &RateLimit, specific: bool| {
            l.targets.iter().any(|t| match t {
                // A listener's own limit only where its chain takes its requests alone (an HTTP
                // listener sharing its port is refused as a target).
                Target::Gateway { name, listener } if name == gateway => match listener {
                    Some(want) => specific && listeners == [want.as_str()],
                    None => !specific,
                },
                _ => false,
            })
        };
        limits()
            .find(|l| targets(l, true))
            .or_else(|| limits().find(|l| targets(l, false)))
    }
}

/// The policies one inbound port enforces.
#[derive(Debug, Serialize)]
pub struct PortPolicies<'a> {
    /// The default in the port's namespace; it decides only when no ALLOW policy applies.
    pub default: AuthzDefault,
    pub deny: Vec<&'a Authz>,
    pub allow: Vec<&'a Authz>,
    pub rate_limit: Option<&'a RateLimit>,
    /// Other rate limits that target the port: only one is enforced.
    pub rate_limits_not_applied: Vec<&'a str>,
}

/// Reports into the model's errors for one object.
struct Report<'a> {
    key: &'a ObjKey,
    errors: &'a mut Vec<ResolveError>,
}

impl Report<'_> {
    fn push(&mut self, field: String, reason: String) {
        self.errors.push(ResolveError {
            object: self.key.clone(),
            field,
            reason,
            condition: RefProblem::NotARoute,
        });
    }

    /// Reports the unknown fields of an `entry` (or rule) and reads them in the safe direction:
    /// a Deny ignores them, an Allow entry with any matches `nothing` (returns `true`).
    fn unknown(
        &mut self,
        at: &str,
        unknown: &UnknownFields,
        deny: bool,
        entry: &str,
        nothing: &str,
    ) -> bool {
        let effect = if deny {
            format!("the condition is ignored, so the Deny {entry} matches more")
        } else {
            format!("the Allow {entry} matches {nothing}")
        };
        for k in unknown.keys() {
            self.push(
                format!("{at}.{k}"),
                format!("unknown field {k:?}: {effect}"),
            );
        }
        !deny && !unknown.is_empty()
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, false))
}

/// What a target reference of a policy in `namespace` attaches to; `Err` is why it attaches
/// to nothing: the field of the reference at fault (`name`, `kind`) and the reason.
pub fn target(
    t: &PolicyTargetReference,
    namespace: &str,
    gateways: bool,
) -> Result<Target, (&'static str, String)> {
    match (t.group.as_str(), t.kind.as_str()) {
        (crate::index::grants::GATEWAY_GROUP, "Gateway") if gateways => Ok(Target::Gateway {
            name: t.name.clone(),
            listener: t.section_name.clone(),
        }),
        (crate::index::grants::GATEWAY_GROUP, "Gateway") => Err((
            "kind",
            "an AuthorizationPolicy cannot target a Gateway: it decides who reaches a workload, by mesh identities that callers from outside do not have; target the Services behind the Gateway"
                .into(),
        )),
        ("" | "core", "Service") => Ok(Target::Service {
            name: t.name.clone(),
            port: t.section_name.clone(),
        }),
        ("" | "core", "Namespace") if t.name == namespace => Ok(Target::Namespace),
        ("" | "core", "Namespace") => Err((
            "name",
            format!(
                "{:?}: a policy can only target its own namespace ({namespace:?})",
                t.name
            ),
        )),
        (g, k) => Err((
            "kind",
            format!(
                "{g:?}/{k:?} is not a Service{}",
                if gateways {
                    ", Namespace or Gateway"
                } else {
                    " or Namespace"
                }
            ),
        )),
    }
}

/// The targets of a policy in `namespace`; `gateways`: whether it may target a Gateway.
fn targets(
    refs: &[PolicyTargetReference],
    namespace: &str,
    gateways: bool,
    r: &mut Report<'_>,
) -> Vec<Target> {
    let mut out = Vec::new();
    for (i, t) in refs.iter().enumerate() {
        match target(t, namespace, gateways) {
            Ok(t) => out.push(t),
            Err((field, why)) => r.push(
                format!("spec.targetRefs[{i}].{field}"),
                format!("{why}; this reference is ignored"),
            ),
        }
    }
    out
}

/// Reads a list whose values may be unreadable: in an Allow policy a bad value is dropped (and
/// a list left empty matches nothing); in a Deny policy it makes the whole condition match
/// anything. `None` is "anything".
fn alternatives<T>(
    values: &[String],
    at: &str,
    deny: bool,
    r: &mut Report<'_>,
    read: impl Fn(&str) -> Result<T, String>,
) -> (Option<Vec<T>>, bool) {
    if values.is_empty() {
        return (None, false);
    }
    let mut out = Vec::new();
    let mut bad = false;
    for (i, v) in values.iter().enumerate() {
        match read(v) {
            Ok(m) => out.push(m),
            Err(why) => {
                bad = true;
                let effect = if deny {
                    "the Deny policy matches any value here"
                } else {
                    "the value is left out of the Allow policy"
                };
                r.push(format!("{at}[{i}]"), format!("{v:?}: {why}; {effect}"));
            }
        }
    }
    match (bad, deny) {
        (true, true) => (None, false),
        (_, false) if out.is_empty() => (Some(out), true),
        _ => (Some(out), false),
    }
}

fn source(
    s: &AuthorizationSource,
    at: &str,
    policy_ns: &str,
    trust_domain: &str,
    deny: bool,
    r: &mut Report<'_>,
) -> Source {
    let never = r.unknown(at, &s.unknown, deny, "entry", "nobody");
    let (identities, n1) = alternatives(
        &s.identities,
        &format!("{at}.identities"),
        deny,
        r,
        id_pattern,
    );
    let (accounts, n2) = alternatives(
        &s.service_accounts,
        &format!("{at}.serviceAccounts"),
        deny,
        r,
        |v| {
            let (ns, sa) = v.split_once('/').unwrap_or((policy_ns, v));
            if !is_dns_label(ns, false) || !is_dns_subdomain(sa) {
                return Err("not a service account (`namespace/name` or `name`)".into());
            }
            Ok(Pattern::Exact(format!(
                "spiffe://{trust_domain}/ns/{ns}/sa/{sa}"
            )))
        },
    );
    let (namespaces, n3) = alternatives(&s.namespaces, &format!("{at}.namespaces"), deny, r, |v| {
        if !is_dns_label(v, false) {
            return Err("not a namespace name".into());
        }
        Ok(Pattern::Prefix(format!(
            "spiffe://{trust_domain}/ns/{v}/sa/"
        )))
    });
    // Identities, service accounts and namespaces each narrow the caller: all must hold.
    Source {
        ids: [identities, accounts, namespaces]
            .into_iter()
            .flatten()
            .collect(),
        authenticated: s.authenticated,
        never: never || n1 || n2 || n3,
    }
}

fn id_pattern(v: &str) -> Result<Pattern, String> {
    if v == "*" {
        return Ok(Pattern::Prefix(String::new()));
    }
    let (body, prefix) = split_star(v, "pattern")?;
    if !body.starts_with("spiffe://") {
        return Err("not a SPIFFE ID (spiffe://...)".into());
    }
    if !prefix {
        mesh_api::SpiffeId::parse(body).map_err(|e| e.to_string())?;
        return Ok(Pattern::Exact(body.into()));
    }
    Ok(Pattern::Prefix(body.into()))
}

fn operation(o: &AuthorizationOperation, at: &str, deny: bool, r: &mut Report<'_>) -> Operation {
    let never = r.unknown(at, &o.unknown, deny, "entry", "nothing");
    // 0 is not a port: in a Deny the ports condition then matches any port, in an Allow the
    // value is left out (and a list of only 0 matches nothing).
    let mut ports = (!o.ports.is_empty()).then(|| o.ports.clone());
    let mut no_port = false;
    if let Some(i) = o.ports.iter().position(|p| *p == 0) {
        let effect = if deny {
            "the Deny policy matches any port here"
        } else {
            "the value is left out of the Allow policy"
        };
        r.push(
            format!("{at}.ports[{i}]"),
            format!("0 is not a port; {effect}"),
        );
        if deny {
            ports = None;
        } else if let Some(p) = ports.as_mut() {
            p.retain(|p| *p != 0);
            no_port = p.is_empty();
        }
    }
    let (paths, n1) = alternatives(&o.paths, &format!("{at}.paths"), deny, r, path_cond);
    let (methods, n2) = alternatives(&o.methods, &format!("{at}.methods"), deny, r, |v| {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
        {
            return Err("not an HTTP method".into());
        }
        // Methods are case-sensitive and standard ones upper case: `get` means GET.
        Ok(v.to_ascii_uppercase())
    });
    Operation {
        ports,
        paths,
        methods,
        never: never || n1 || n2 || no_port,
    }
}

/// A policy path: exact, or a prefix ending in `*`; as a request path would be after
/// normalization, or a Deny would never see the requests it names.
fn path_cond(v: &str) -> Result<Pattern, String> {
    let (body, prefix) = split_star(v, "path")?;
    if body.contains(';') {
        return Err("`;` parameters cannot be matched".into());
    }
    if !body.starts_with('/') {
        return Err("a path starts with /".into());
    }
    let normal = mesh_api::path::normalize(body)
        .map_err(|e| format!("{e}"))?
        .into_owned();
    if normal != body {
        return Err(format!(
            "not in normal form (requests are matched as {normal:?})"
        ));
    }
    Ok(if prefix {
        Pattern::Prefix(normal)
    } else {
        Pattern::Exact(normal)
    })
}

/// Checks and compiles an AuthorizationPolicy; what it cannot read goes to `errors`.
pub fn authz(
    p: &AuthorizationPolicy,
    key: &ObjKey,
    trust_domain: &str,
    errors: &mut Vec<ResolveError>,
) -> Authz {
    let mut r = Report { key, errors };
    let spec = &p.spec;
    let deny = spec.action == AuthorizationAction::Deny;
    let targets = targets(&spec.target_refs, &key.namespace, false, &mut r);
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if r.unknown(&at, &rule.unknown, deny, "rule", "nothing") {
            continue;
        }
        let from: Vec<Source> = rule
            .from
            .iter()
            .enumerate()
            .map(|(j, s)| {
                source(
                    s,
                    &format!("{at}.from[{j}]"),
                    &key.namespace,
                    trust_domain,
                    deny,
                    &mut r,
                )
            })
            .collect();
        let to: Vec<Operation> = rule
            .to
            .iter()
            .enumerate()
            .map(|(j, o)| operation(o, &format!("{at}.to[{j}]"), deny, &mut r))
            .collect();
        rules.push(Rule { from, to });
    }
    Authz {
        name: format!("{}/{}", key.namespace, key.name),
        action: spec.action,
        targets,
        rules,
    }
}

/// Checks and compiles a RateLimitPolicy.
pub fn rate_limit(
    p: &RateLimitPolicy,
    key: &ObjKey,
    errors: &mut Vec<ResolveError>,
) -> Option<RateLimit> {
    let mut r = Report { key, errors };
    let l = &p.spec.local;
    let targets = targets(&p.spec.target_refs, &key.namespace, true, &mut r);
    let mut bucket = |rps: Option<u32>, burst: Option<u32>, at: &str| -> Option<Bucket> {
        let rps = rps?;
        if rps == 0 {
            r.push(
                format!("{at}.requestsPerSecond"),
                "0: a limit of 0 would refuse everything; use an AuthorizationPolicy to deny"
                    .into(),
            );
            return None;
        }
        let burst = burst.unwrap_or_else(|| default_burst(rps));
        if burst == 0 {
            r.push(format!("{at}.burst"), "0: at least 1; 1 is used".into());
        }
        Some(Bucket {
            requests_per_second: rps,
            burst: burst.max(1),
        })
    };
    let total = bucket(l.requests_per_second, l.burst, "spec.local");
    let per_identity = l.per_identity.as_ref().and_then(|b| {
        bucket(
            Some(b.requests_per_second),
            b.burst,
            "spec.local.perIdentity",
        )
    });
    if total.is_none() && per_identity.is_none() {
        r.push(
            "spec.local".into(),
            "neither requestsPerSecond nor perIdentity: the policy limits nothing".into(),
        );
        return None;
    }
    if total.is_none() && targets.iter().any(|t| matches!(t, Target::Gateway { .. })) {
        r.push(
            "spec.local.perIdentity".into(),
            "callers at a Gateway have no mesh identity, so perIdentity alone limits nothing there; give requestsPerSecond".into(),
        );
    }
    Some(RateLimit {
        name: format!("{}/{}", key.namespace, key.name),
        targets,
        total,
        per_identity,
    })
}

/// A Gateway's listeners as a policy checks its target: `(name, port, protocol)`.
pub type GatewayListeners = Vec<(String, u16, String)>;

/// Policies that target nothing: no reference readable, or a Service that does not exist, or
/// a port it does not have; or a Gateway that does not exist (`gateway_listeners` of a name is
/// `None`), a listener it does not have, or an HTTP listener sharing its port with others (one
/// chain takes all their requests, so a limit of one would count the others').
pub fn check_targets(
    key: &ObjKey,
    targets: &[Target],
    service_ports: impl Fn(&str) -> Option<Vec<String>>,
    gateway_listeners: impl Fn(&str) -> Option<GatewayListeners>,
    errors: &mut Vec<ResolveError>,
) {
    let mut r = Report { key, errors };
    if targets.is_empty() {
        r.push(
            "spec.targetRefs".into(),
            "nothing to attach to: the policy has no effect".into(),
        );
    }
    for (i, t) in targets.iter().enumerate() {
        if let Target::Gateway { name, listener } = t {
            let Some(listeners) = gateway_listeners(name) else {
                r.push(
                    format!("spec.targetRefs[{i}]"),
                    format!(
                        "Gateway {}/{name} not found (or not of a GatewayClass of mesh): the policy targets nothing",
                        key.namespace
                    ),
                );
                continue;
            };
            let Some(want) = listener else { continue };
            match listeners.iter().find(|(n, _, _)| n == want) {
                None => r.push(
                    format!("spec.targetRefs[{i}].sectionName"),
                    format!(
                        "Gateway {}/{name} has no listener named {want:?}: the policy targets nothing",
                        key.namespace
                    ),
                ),
                Some((_, _, protocol)) if protocol != "HTTP" && protocol != "HTTPS" => {
                    r.push(
                        format!("spec.targetRefs[{i}].sectionName"),
                        format!(
                            "listener {want:?} of Gateway {}/{name} is {protocol}: the gateway limits the HTTP requests of HTTP and HTTPS listeners only; the policy targets nothing there",
                            key.namespace
                        ),
                    );
                }
                Some((_, port, protocol))
                    if protocol == "HTTP"
                        && listeners
                            .iter()
                            .any(|(n, p, pr)| n != want && p == port && pr == "HTTP") =>
                {
                    r.push(
                        format!("spec.targetRefs[{i}].sectionName"),
                        format!(
                            "listener {want:?} of Gateway {}/{name} shares port {port} with other HTTP listeners, whose requests one limit would count together: target the Gateway (every listener) or give the listener a port of its own; the reference is ignored",
                            key.namespace
                        ),
                    );
                }
                Some(_) => {}
            }
            continue;
        }
        let Target::Service { name, port } = t else {
            continue;
        };
        match (service_ports(name), port) {
            (None, _) => r.push(
                format!("spec.targetRefs[{i}]"),
                format!(
                    "Service {}/{name} not found: the policy targets nothing",
                    key.namespace
                ),
            ),
            (Some(ports), Some(p)) if !ports.contains(p) => r.push(
                format!("spec.targetRefs[{i}].sectionName"),
                format!(
                    "Service {}/{name} has no port named {p:?}: the policy targets nothing",
                    key.namespace
                ),
            ),
            _ => {}
        }
    }
}

/// Whether a kind is one of the policies this module reads.
pub fn is_policy(kind: Kind) -> bool {
    matches!(kind, Kind::AuthorizationPolicy | Kind::RateLimitPolicy)
}

/// A Service's authorization and rate limits, per port, for `meshctl authz`.
#[derive(Debug, Serialize)]
pub struct ServiceAuthz<'a> {
    pub service: String,
    pub ports: Vec<PortAuthz<'a>>,
    /// What the controller could not read in the policies listed here.
    pub problems: Vec<&'a ResolveError>,
}

#[derive(Debug, Serialize)]
pub struct PortAuthz<'a> {
    pub name: &'a str,
    pub port: u16,
    pub protocol: super::Protocol,
    #[serde(flatten)]
    pub policies: PortPolicies<'a>,
}

/// What applies to each port of Service `key` (through it, or namespace-wide); `None` when the
/// model has no such Service. A pod that other Services select also gets theirs.
pub fn service_authz<'a>(model: &'a super::Model, key: &super::SvcKey) -> Option<ServiceAuthz<'a>> {
    let svc = model.services.get(key)?;
    let ports: Vec<PortAuthz<'a>> = svc
        .ports
        .iter()
        .map(|p| PortAuthz {
            name: &p.name,
            port: p.port,
            protocol: p.protocol,
            policies: model
                .policies
                .for_port(&key.namespace, &[(key.name.as_str(), p.name.as_str())]),
        })
        .collect();
    let named: std::collections::BTreeSet<&str> = ports
        .iter()
        .flat_map(|p| {
            let pp = &p.policies;
            pp.deny
                .iter()
                .chain(&pp.allow)
                .map(|a| a.name.as_str())
                .chain(pp.rate_limit.map(|l| l.name.as_str()))
                .chain(pp.rate_limits_not_applied.iter().copied())
        })
        .collect();
    let problems = model
        .errors
        .iter()
        .filter(|e| is_policy(e.object.kind))
        .filter(|e| named.contains(format!("{}/{}", e.object.namespace, e.object.name).as_str()))
        .collect();
    Some(ServiceAuthz {
        service: key.to_string(),
        ports,
        problems,
    })
}
