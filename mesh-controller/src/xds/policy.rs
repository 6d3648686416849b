//! Policies into an inbound port's filters, as Envoy reads them: RBAC (HTTP and network) and
//! the HTTP local rate limit filter. mesh-proxy reads the same filters, so both data planes
//! decide alike. The reference is `docs/reference/policy.md`.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{RuntimeFractionalPercent, TypedExtensionConfig};
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac as RbacRules, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RateLimit, header_matcher, rate_limit,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    LocalRateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
use envoy_types::pb::envoy::extensions::matching::common_inputs::ssl::v3::UriSanInput;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket, fractional_percent};
use envoy_types::pb::google::protobuf::UInt32Value;
use mesh_api::consts::xds::{RATE_LIMIT_IDENTITY_KEY, RATE_LIMIT_MAX_IDENTITIES};

use super::pb::{any, network_filter, pb_duration};
use crate::index::policy::{
    Authz, AuthzDefault, Bucket, Operation, Pattern, Policies, PortPolicies, RateLimit as Limit,
    Source, Via,
};

/// The name the default of `authenticated` reports its decisions under (no policy's name has
/// no slash).
pub const AUTHENTICATED_DEFAULT: &str = "default:authenticated";

/// What one inbound port enforces, as filters before the HCM's router or before `tcp_proxy`;
/// each kind is built only for a chain that uses it.
#[derive(Debug)]
pub struct PortGuard<'a>(PortPolicies<'a>);

/// The policies on a port of a workload in `namespace`, reached through the Services `via`.
pub fn port_guard<'a>(policies: &'a Policies, namespace: &str, via: &Via<'_>) -> PortGuard<'a> {
    PortGuard(policies.for_port(namespace, via))
}

impl PortGuard<'_> {
    /// The RBAC filters in order, as actions and policies: DENY, then ALLOW or the default's.
    fn rbac(&self, tcp: bool) -> Vec<(rbac::Action, HashMap<String, Policy>)> {
        let p = &self.0;
        let mut filters = Vec::new();
        if !p.deny.is_empty() {
            filters.push((rbac::Action::Deny, policies_of(&p.deny, true, tcp)));
        }
        if !p.allow.is_empty() {
            filters.push((rbac::Action::Allow, policies_of(&p.allow, false, tcp)));
            return filters;
        }
        match p.default {
            AuthzDefault::Allow => {}
            AuthzDefault::Deny => filters.push((rbac::Action::Allow, HashMap::new())),
            AuthzDefault::Authenticated => filters.push((
                rbac::Action::Allow,
                HashMap::from([(
                    AUTHENTICATED_DEFAULT.to_string(),
                    Policy {
                        permissions: vec![perm(permission::Rule::Any(true))],
                        principals: vec![authenticated(None)],
                        ..Default::default()
                    },
                )]),
            )),
        }
        filters
    }

    /// For an HTTP chain: RBAC, then the local rate limit.
    pub fn http_filters(&self) -> Vec<HttpFilter> {
        let mut out: Vec<HttpFilter> = self
            .rbac(false)
            .into_iter()
            .map(|(action, policies)| HttpFilter {
                name: "envoy.filters.http.rbac".into(),
                config_type: Some(http_filter::ConfigType::TypedConfig(any(&HttpRbac {
                    rules: Some(RbacRules {
                        action: action as i32,
                        policies,
                        ..Default::default()
                    }),
                    rules_stat_prefix: stat_prefix(action),
                    ..Default::default()
                }))),
                ..Default::default()
            })
            .collect();
        if let Some(l) = self.0.rate_limit {
            out.push(rate_limit_filter(l));
        }
        out
    }

    /// For an opaque TCP chain: network RBAC.
    pub fn network_filters(&self) -> Vec<Filter> {
        self.rbac(true)
            .into_iter()
            .map(|(action, policies)| {
                network_filter(
                    "envoy.filters.network.rbac",
                    &NetRbac {
                        rules: Some(RbacRules {
                            action: action as i32,
                            policies,
                            ..Default::default()
                        }),
                        stat_prefix: stat_prefix(action),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }
}

fn stat_prefix(action: rbac::Action) -> String {
    match action {
        rbac::Action::Deny => "deny_".into(),
        _ => "allow_".into(),
    }
}

/// The RBAC policies of `authz`, one per rule: `<ns>/<name>` when a policy has one rule,
/// `<ns>/<name>/rules[<i>]` otherwise.
fn policies_of(authz: &[&Authz], deny: bool, tcp: bool) -> HashMap<String, Policy> {
    let mut out = HashMap::new();
    for a in authz {
        for (i, rule) in a.rules.iter().enumerate() {
            let name = if a.rules.len() == 1 {
                a.name.clone()
            } else {
                format!("{}/rules[{i}]", a.name)
            };
            let permissions = if rule.to.is_empty() {
                vec![perm(permission::Rule::Any(true))]
            } else {
                rule.to.iter().map(|o| operation(o, deny, tcp)).collect()
            };
            let principals = if rule.from.is_empty() {
                vec![princ(principal::Identifier::Any(true))]
            } else {
                rule.from.iter().map(source).collect()
            };
            out.insert(
                name,
                Policy {
                    permissions,
                    principals,
                    ..Default::default()
                },
            );
        }
    }
    out
}

fn perm(rule: permission::Rule) -> Permission {
    Permission { rule: Some(rule) }
}

fn princ(id: principal::Identifier) -> Principal {
    Principal {
        identifier: Some(id),
    }
}

fn never_perm() -> Permission {
    perm(permission::Rule::NotRule(Box::new(perm(
        permission::Rule::Any(true),
    ))))
}

fn string(p: string_matcher::MatchPattern) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(p),
        ignore_case: false,
    }
}

fn authenticated(name: Option<StringMatcher>) -> Principal {
    princ(principal::Identifier::Authenticated(
        principal::Authenticated {
            principal_name: name,
        },
    ))
}

fn all_perms(mut and: Vec<Permission>) -> Permission {
    match and.len() {
        0 => perm(permission::Rule::Any(true)),
        1 => and.remove(0),
        _ => perm(permission::Rule::AndRules(permission::Set { rules: and })),
    }
}

fn any_perm(or: Vec<Permission>) -> Permission {
    perm(permission::Rule::OrRules(permission::Set { rules: or }))
}

fn url_path(p: string_matcher::MatchPattern) -> Permission {
    perm(permission::Rule::UrlPath(PathMatcher {
        rule: Some(path_matcher::Rule::Path(string(p))),
    }))
}

/// One `to` entry. On a TCP port (network RBAC) path and method conditions cannot be checked:
/// an Allow entry with them matches nothing, a Deny entry drops them (and matches more).
fn operation(o: &Operation, deny: bool, tcp: bool) -> Permission {
    use string_matcher::MatchPattern as M;
    if o.never || (tcp && !deny && o.is_http()) {
        return never_perm();
    }
    let mut and = Vec::new();
    if let Some(ports) = &o.ports {
        and.push(any_perm(
            ports
                .iter()
                .map(|p| perm(permission::Rule::DestinationPort(u32::from(*p))))
                .collect(),
        ));
    }
    if !tcp {
        if let Some(paths) = &o.paths {
            let mut or: Vec<Permission> =
                paths.iter().flat_map(|p| path_matches(p, deny)).collect();
            if deny {
                // What apps may read as another path, and neither proxy turns into it: `;`
                // parameters (Tomcat reads `/admin;x` as `/admin`), a double escape (decoded
                // twice), and `*` (`OPTIONS *`). mesh-proxy refuses double escapes anyway.
                for tell in [";", "%25"] {
                    or.push(url_path(M::Contains(tell.into())));
                }
                or.push(url_path(M::Exact("*".into())));
            }
            and.push(any_perm(or));
        }
        if let Some(methods) = &o.methods {
            let mut methods = methods.clone();
            // Apps answer HEAD with their GET handler: denying GET denies HEAD too.
            if deny && methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
                methods.push("HEAD".into());
            }
            and.push(any_perm(
                methods
                    .iter()
                    .map(|m| {
                        perm(permission::Rule::Header(HeaderMatcher {
                            name: ":method".into(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(string(
                                    M::Exact(m.clone()),
                                )),
                            ),
                            ..Default::default()
                        }))
                    })
                    .collect(),
            ));
        }
    }
    all_perms(and)
}

/// Whether a policy path character is one requests always carry as written: normalization
/// decodes every other form of it (unreserved characters), and `/` cannot be encoded.
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '/')
}

/// The `url_path` matches of a policy path. A path with characters a request may send raw or
/// percent-encoded (`:`, `@`, non-ASCII...) is matched in every form, as a regex, when it
/// denies; an Allow keeps the written form only (narrower). A Deny of an exact path also denies
/// it with a trailing slash, which many apps serve alike.
fn path_matches(p: &Pattern, deny: bool) -> Vec<Permission> {
    use string_matcher::MatchPattern as M;
    let (v, prefix) = match p {
        Pattern::Exact(v) => (v.as_str(), false),
        Pattern::Prefix(v) => (v.as_str(), true),
    };
    // Policy paths are checked to be normalized: no escape in them hides a `/`.
    let decoded = mesh_api::path::percent_decode(v);
    if deny && !decoded.chars().all(plain) {
        let mut re = String::new();
        for c in decoded.chars() {
            if plain(c) {
                re.push_str(&regex::escape(&c.to_string()));
                continue;
            }
            let mut buf = [0; 4];
            let escaped: String = c
                .encode_utf8(&mut buf)
                .bytes()
                .map(|b| {
                    let hex: String = format!("{b:02X}")
                        .chars()
                        .map(|d| match d {
                            'A'..='F' => format!("[{d}{}]", d.to_ascii_lowercase()),
                            d => d.to_string(),
                        })
                        .collect();
                    format!("%{hex}")
                })
                .collect();
            re.push_str(&format!("(?:{}|{escaped})", regex::escape(&c.to_string())));
        }
        re.push_str(if prefix {
            ".*"
        } else if v.ends_with('/') {
            ""
        } else {
            "/?"
        });
        return vec![url_path(M::SafeRegex(RegexMatcher {
            regex: re,
            ..Default::default()
        }))];
    }
    match p {
        Pattern::Prefix(v) => vec![url_path(M::Prefix(v.clone()))],
        Pattern::Exact(v) if deny && !v.ends_with('/') => vec![
            url_path(M::Exact(v.clone())),
            url_path(M::Exact(format!("{v}/"))),
        ],
        Pattern::Exact(v) => vec![url_path(M::Exact(v.clone()))],
    }
}

/// One `from` entry.
fn source(s: &Source) -> Principal {
    use string_matcher::MatchPattern as M;
    if s.never {
        return princ(principal::Identifier::NotId(Box::new(princ(
            principal::Identifier::Any(true),
        ))));
    }
    let mut and: Vec<Principal> = s
        .ids
        .iter()
        .map(|list| {
            princ(principal::Identifier::OrIds(principal::Set {
                ids: list
                    .iter()
                    .map(|m| match m {
                        // `*`: any identity.
                        Pattern::Prefix(p) if p.is_empty() => authenticated(None),
                        Pattern::Prefix(p) => authenticated(Some(string(M::Prefix(p.clone())))),
                        Pattern::Exact(id) => authenticated(Some(string(M::Exact(id.clone())))),
                    })
                    .collect(),
            }))
        })
        .collect();
    match s.authenticated {
        Some(true) => and.push(authenticated(None)),
        Some(false) => and.push(princ(principal::Identifier::NotId(Box::new(
            authenticated(None),
        )))),
        None => {}
    }
    match and.len() {
        0 => princ(principal::Identifier::Any(true)),
        1 => and.remove(0),
        _ => princ(principal::Identifier::AndIds(principal::Set { ids: and })),
    }
}

fn all_of_it(key: &str) -> Option<RuntimeFractionalPercent> {
    Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: fractional_percent::DenominatorType::Hundred as i32,
        }),
        runtime_key: key.into(),
    })
}

/// A token bucket refilling at `requests_per_second`: as few tokens per fill as keep the fill
/// interval at Envoy's minimum of 50 ms or more.
fn token_bucket(b: &Bucket) -> TokenBucket {
    let rps = u64::from(b.requests_per_second.max(1));
    let tokens = rps.div_ceil(20).max(1);
    let interval = Duration::from_nanos(tokens * 1_000_000_000 / rps);
    TokenBucket {
        max_tokens: b.burst,
        tokens_per_fill: Some(UInt32Value {
            value: u32::try_from(tokens).unwrap_or(u32::MAX),
        }),
        fill_interval: Some(pb_duration(interval)),
    }
}

/// The local rate limit filter of `l` (its buckets named by `l.name`).
pub(super) fn rate_limit_filter(l: &Limit) -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.local_ratelimit".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            &local_rate_limit(l),
        ))),
        ..Default::default()
    }
}

fn local_rate_limit(l: &Limit) -> LocalRateLimit {
    let mut out = LocalRateLimit {
        stat_prefix: l.name.clone(),
        token_bucket: l.total.as_ref().map(token_bucket),
        filter_enabled: all_of_it("mesh.rate_limit.enabled"),
        filter_enforced: all_of_it("mesh.rate_limit.enforced"),
        enable_retry_after_header: true,
        ..Default::default()
    };
    if let Some(b) = &l.per_identity {
        out.descriptors = vec![LocalRateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry {
                key: RATE_LIMIT_IDENTITY_KEY.into(),
                value: String::new(),
            }],
            token_bucket: Some(token_bucket(b)),
            ..Default::default()
        }];
        // The descriptor's value is the peer certificate's URI SAN: its SPIFFE ID.
        out.rate_limits = vec![RateLimit {
            actions: vec![rate_limit::Action {
                action_specifier: Some(rate_limit::action::ActionSpecifier::Extension(
                    TypedExtensionConfig {
                        name: RATE_LIMIT_IDENTITY_KEY.into(),
                        typed_config: Some(any(&UriSanInput {})),
                    },
                )),
            }],
            ..Default::default()
        }];
        out.max_dynamic_descriptors = Some(UInt32Value {
            value: RATE_LIMIT_MAX_IDENTITIES,
        });
    }
    out
}
