//! RBAC (HTTP and network) and local rate limit filters into [`Guard`]s.

use std::time::Duration;

use envoy_types::pb::envoy::config::rbac::v3::{
    Permission as PbPermission, Principal as PbPrincipal, Rbac as PbRbac, permission, principal,
    rbac,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::matcher::v3::path_matcher;
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;

use super::{Ctx, Result, dur, fraction, header_match, str_match};
use crate::policy::{Permission, Policy, Principal, Rate, RateLimit, Rbac, RbacAction};

/// The descriptor key whose entries limit each caller identity (the controller sends it with
/// an empty value: one bucket per distinct identity).
pub const IDENTITY_DESCRIPTOR: &str = mesh_api::consts::xds::RATE_LIMIT_IDENTITY_KEY;

/// An RBAC filter's rules; `None` when it has none (it enforces nothing, as in Envoy).
pub(super) fn rbac(
    cx: &Ctx<'_>,
    at: &str,
    rules: Option<&PbRbac>,
    has_matcher: bool,
) -> Result<Option<Rbac>> {
    if has_matcher {
        return Err(cx.err(
            format!("{at}.matcher"),
            "the matcher API is not supported (use rules)",
        ));
    }
    let Some(rules) = rules else {
        return Ok(None);
    };
    let action = match rbac::Action::try_from(rules.action) {
        Ok(rbac::Action::Allow) => RbacAction::Allow,
        Ok(rbac::Action::Deny) => RbacAction::Deny,
        _ => {
            return Err(cx.err(
                format!("{at}.rules.action"),
                format!("{} is not supported (ALLOW or DENY)", rules.action),
            ));
        }
    };
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    for name in names {
        let p = &rules.policies[name];
        let at = format!("{at}.rules.policies[{name:?}]");
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            return Err(cx.err(&at, "CEL conditions are not supported"));
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission_of(cx, &format!("{at}.permissions[{i}]"), x))
            .collect::<Result<Vec<_>>>()?;
        let principals = p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal_of(cx, &format!("{at}.principals[{i}]"), x))
            .collect::<Result<Vec<_>>>()?;
        policies.push((
            name.clone(),
            Policy {
                permissions,
                principals,
                ..Default::default()
            },
        ));
    }
    Ok(Some(Rbac { action, policies }))
}

fn permission_of(cx: &Ctx<'_>, at: &str, p: &PbPermission) -> Result<Permission> {
    use permission::Rule as R;
    let set = |s: &permission::Set, field: &str| {
        s.rules
            .iter()
            .enumerate()
            .map(|(i, x)| permission_of(cx, &format!("{at}.{field}.rules[{i}]"), x))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::AndRules(s)) => Permission::And(set(s, "and_rules")?),
        Some(R::OrRules(s)) => Permission::Or(set(s, "or_rules")?),
        Some(R::NotRule(n)) => {
            Permission::Not(Box::new(permission_of(cx, &format!("{at}.not_rule"), n)?))
        }
        Some(R::Header(h)) => Permission::Header(header_match(cx, &format!("{at}.header"), h)?),
        Some(R::UrlPath(m)) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => {
                Permission::Path(str_match(cx, &format!("{at}.url_path.path"), s)?)
            }
            None => return Err(cx.err(format!("{at}.url_path"), "no path matcher")),
        },
        Some(R::DestinationPort(port)) => {
            Permission::DestinationPort(u16::try_from(*port).map_err(|_| {
                cx.err(
                    format!("{at}.destination_port"),
                    format!("{port} is not a port"),
                )
            })?)
        }
        Some(R::Any(false)) | None => {
            return Err(cx.err(at, "a permission needs a rule (any must be true)"));
        }
        Some(_) => {
            return Err(cx.err(
                at,
                "supported: any, and_rules, or_rules, not_rule, header, url_path, destination_port",
            ));
        }
    })
}

fn principal_of(cx: &Ctx<'_>, at: &str, p: &PbPrincipal) -> Result<Principal> {
    use principal::Identifier as I;
    let set = |s: &principal::Set, field: &str| {
        s.ids
            .iter()
            .enumerate()
            .map(|(i, x)| principal_of(cx, &format!("{at}.{field}.ids[{i}]"), x))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::AndIds(s)) => Principal::And(set(s, "and_ids")?),
        Some(I::OrIds(s)) => Principal::Or(set(s, "or_ids")?),
        Some(I::NotId(n)) => {
            Principal::Not(Box::new(principal_of(cx, &format!("{at}.not_id"), n)?))
        }
        Some(I::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| str_match(cx, &format!("{at}.authenticated.principal_name"), m))
                .transpose()?,
        ),
        Some(I::Header(h)) => Principal::Header(header_match(cx, &format!("{at}.header"), h)?),
        Some(I::Any(false)) | None => {
            return Err(cx.err(at, "a principal needs an identifier (any must be true)"));
        }
        Some(_) => {
            return Err(cx.err(
                at,
                "supported: any, and_ids, or_ids, not_id, authenticated, header",
            ));
        }
    })
}

/// Whether a runtime fraction is all (`true`) or nothing (`false`, also when unset: Envoy's
/// default for the local rate limit is 0 %); a fraction in between is not supported.
fn all_or_nothing(cx: &Ctx<'_>, at: &str, f: Option<&FractionalPercent>) -> Result<bool> {
    let Some(f) = f else {
        return Ok(false);
    };
    let (numerator, whole) = fraction(cx, format!("{at}.denominator"), f)?;
    match numerator {
        0 => Ok(false),
        n if n >= whole => Ok(true),
        n => Err(cx.err(
            format!("{at}.numerator"),
            format!("{n}/{whole}: only 0 % or 100 % is supported"),
        )),
    }
}

/// A local rate limit filter; `None` when it is not enabled and enforced.
pub(super) fn local_rate_limit(
    cx: &Ctx<'_>,
    at: &str,
    l: &LocalRateLimit,
) -> Result<Option<RateLimit>> {
    let enabled = all_or_nothing(
        cx,
        &format!("{at}.filter_enabled.default_value"),
        l.filter_enabled
            .as_ref()
            .and_then(|r| r.default_value.as_ref()),
    )?;
    let enforced = all_or_nothing(
        cx,
        &format!("{at}.filter_enforced.default_value"),
        l.filter_enforced
            .as_ref()
            .and_then(|r| r.default_value.as_ref()),
    )?;
    if !(enabled && enforced) {
        return Ok(None);
    }
    if l.local_rate_limit_per_downstream_connection {
        return Err(cx.err(
            format!("{at}.local_rate_limit_per_downstream_connection"),
            "per-connection buckets are not supported",
        ));
    }
    let bucket = |at: &str,
                  b: Option<&envoy_types::pb::envoy::r#type::v3::TokenBucket>|
     -> Result<Option<Rate>> {
        let Some(b) = b else {
            return Ok(None);
        };
        let tokens = b.tokens_per_fill.as_ref().map_or(1, |t| t.value);
        let every = dur(cx, &format!("{at}.fill_interval"), b.fill_interval.as_ref())?
            .unwrap_or(Duration::ZERO);
        if every < Duration::from_millis(50) || tokens == 0 || b.max_tokens == 0 {
            return Err(cx.err(
                at,
                "needs max_tokens > 0, tokens_per_fill > 0 and a fill_interval of 50ms or more",
            ));
        }
        Ok(Some(Rate {
            per_second: f64::from(tokens) / every.as_secs_f64(),
            burst: b.max_tokens,
        }))
    };
    let total = bucket(&format!("{at}.token_bucket"), l.token_bucket.as_ref())?;
    let mut per_identity = None;
    for (i, d) in l.descriptors.iter().enumerate() {
        let at = format!("{at}.descriptors[{i}]");
        match d.entries.as_slice() {
            [e] if e.key == IDENTITY_DESCRIPTOR && e.value.is_empty() => {
                per_identity = bucket(&format!("{at}.token_bucket"), d.token_bucket.as_ref())?;
            }
            _ => {
                return Err(cx.err(
                    format!("{at}.entries"),
                    format!("only one entry {IDENTITY_DESCRIPTOR:?} with an empty value (a bucket per caller identity) is supported"),
                ));
            }
        }
    }
    Ok(Some(RateLimit {
        name: l.stat_prefix.clone(),
        total,
        per_identity,
    }))
}
