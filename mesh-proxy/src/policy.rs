//! Inbound policy: Envoy's RBAC (HTTP and network filters) and local rate limits, as the
//! controller sends them in a filter chain. Evaluated per request (HTTP) or per connection
//! (TCP), on the normalized path. The reference is `docs/reference/policy.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::state::route::{HeaderMatch, StrMatch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RbacAction {
    Allow,
    Deny,
}

/// One RBAC filter: ALLOW lets through what some policy matches, DENY refuses it.
#[derive(Debug, Serialize)]
pub struct Rbac {
    pub action: RbacAction,
    /// By name, in name order (as Envoy's map is evaluated: the first match names the result).
    pub policies: Vec<(String, Policy)>,
}

/// Matches when any permission and any principal match.
#[derive(Debug, Default, Serialize)]
pub struct Policy {
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
    /// The counter of the decisions it makes (its filter's action), found on first use.
    #[serde(skip)]
    pub decisions: OnceLock<Counter>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    /// The normalized path, without the query.
    Path(StrMatch),
    Header(HeaderMatch),
    DestinationPort(u16),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// A caller with a verified certificate; with a matcher, its URI SAN must match.
    Authenticated(Option<StrMatch>),
    Header(HeaderMatch),
}

/// What a decision is made on.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The caller's SPIFFE ID, when it proved one over mesh TLS.
    pub identity: Option<&'a str>,
    /// The port the caller connected to (the original destination).
    pub port: u16,
    /// HTTP only: absent for opaque TCP, where path and header conditions never match.
    pub http: Option<HttpFacts<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HttpFacts<'a> {
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

impl Permission {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(all) => all.iter().all(|p| p.matches(f)),
            Permission::Or(any) => any.iter().any(|p| p.matches(f)),
            Permission::Not(p) => !p.matches(f),
            Permission::Path(m) => f.http.is_some_and(|h| m.matches(h.path)),
            Permission::Header(m) => f.http.is_some_and(|h| m.matches(h.headers, h.method)),
            Permission::DestinationPort(p) => f.port == *p,
        }
    }
}

impl Principal {
    fn matches(&self, f: &Facts<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(all) => all.iter().all(|p| p.matches(f)),
            Principal::Or(any) => any.iter().any(|p| p.matches(f)),
            Principal::Not(p) => !p.matches(f),
            Principal::Authenticated(None) => f.identity.is_some(),
            Principal::Authenticated(Some(m)) => f.identity.is_some_and(|id| m.matches(id)),
            Principal::Header(m) => f.http.is_some_and(|h| m.matches(h.headers, h.method)),
        }
    }
}

impl Policy {
    fn matches(&self, f: &Facts<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(f))
            && self.principals.iter().any(|p| p.matches(f))
    }
}

/// Why a request or connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied<'p> {
    /// The DENY policy that matched, or `None`: no ALLOW policy matched.
    pub policy: Option<&'p str>,
}

impl std::fmt::Display for Denied<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.policy {
            Some(p) => write!(f, "denied by policy {p}"),
            None => f.write_str("no ALLOW policy matched"),
        }
    }
}

/// A decision and the policy that made it: the DENY policy that matched, the ALLOW policy that
/// let the request through, or none (nothing matched an ALLOW filter, or no filter named one).
#[derive(Clone, Copy, Debug)]
pub struct Decision<'p> {
    pub allowed: bool,
    pub by: Option<(&'p str, &'p Policy)>,
}

impl<'p> Decision<'p> {
    /// `Ok` names the ALLOW policy that let the request through, if one did.
    pub fn result(self) -> Result<Option<&'p str>, Denied<'p>> {
        let name = self.by.map(|(n, _)| n);
        if self.allowed {
            Ok(name)
        } else {
            Err(Denied { policy: name })
        }
    }
}

/// Runs the RBAC filters in order, as Envoy does: a DENY filter refuses what one of its
/// policies matches, an ALLOW filter what none of its policies matches.
pub fn decide<'p>(filters: &'p [Rbac], f: &Facts<'_>) -> Decision<'p> {
    let mut allowed_by = None;
    for rbac in filters {
        let hit = rbac
            .policies
            .iter()
            .find(|(_, p)| p.matches(f))
            .map(|(n, p)| (n.as_str(), p));
        match (rbac.action, hit) {
            (RbacAction::Deny, Some(by)) => {
                return Decision {
                    allowed: false,
                    by: Some(by),
                };
            }
            (RbacAction::Deny, None) => {}
            (RbacAction::Allow, None) => {
                return Decision {
                    allowed: false,
                    by: None,
                };
            }
            (RbacAction::Allow, Some(by)) => allowed_by = Some(by),
        }
    }
    Decision {
        allowed: true,
        by: allowed_by,
    }
}

/// A rate: `per_second` requests a second, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// A limit as configured: its name (the filter's stat prefix), the total rate and the rate of
/// each caller identity.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateLimit {
    pub name: String,
    pub total: Option<Rate>,
    pub per_identity: Option<Rate>,
}

/// A GCRA token bucket: the theoretical arrival time of the next request, in nanoseconds since
/// the limiter's epoch. One atomic, no lock.
#[derive(Debug)]
struct Gcra {
    tat: AtomicU64,
}

impl Gcra {
    fn new() -> Self {
        Gcra {
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one request at `now` (ns), or says how long until one would be allowed.
    fn take(&self, rate: Rate, now: u64) -> Result<(), Duration> {
        let interval = (1e9 / rate.per_second.max(1e-9)) as u64;
        let tolerance = interval.saturating_mul(u64::from(rate.burst.max(1)) - 1);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > tolerance {
                return Err(Duration::from_nanos(start - now - tolerance));
            }
            match self.tat.compare_exchange_weak(
                tat,
                start.saturating_add(interval),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }
}

/// Most caller identities one limiter tracks; past it, buckets that are full again are
/// dropped, and a caller beyond it shares the `overflow` bucket.
const MAX_IDENTITIES: usize = mesh_api::consts::xds::RATE_LIMIT_MAX_IDENTITIES as usize;

/// The state of one [`RateLimit`]: kept across config updates while the limit is unchanged.
#[derive(Debug)]
pub struct Limiter {
    pub limit: RateLimit,
    epoch: Instant,
    total: Gcra,
    identities: RwLock<HashMap<String, Arc<Gcra>>>,
    overflow: Gcra,
}

/// Why a request was limited, and when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// `total` or `identity`.
    pub scope: &'static str,
    pub retry_after: Duration,
}

impl Limiter {
    pub fn new(limit: RateLimit) -> Self {
        Limiter {
            limit,
            epoch: Instant::now(),
            total: Gcra::new(),
            identities: RwLock::default(),
            overflow: Gcra::new(),
        }
    }

    /// Takes one request from `identity`. A caller without one counts only toward the total
    /// (as in Envoy, whose per-identity descriptor needs a peer certificate). A request refused
    /// by its identity's bucket takes nothing from the total.
    pub fn take(&self, identity: Option<&str>) -> Result<(), Limited> {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let (Some(rate), Some(key)) = (self.limit.per_identity, identity) {
            // A known caller costs a shared lookup; only a new one the write lock, a key and
            // maybe a sweep.
            let known = self
                .identities
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(key)
                .cloned();
            let bucket = known.or_else(|| {
                let mut ids = self
                    .identities
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(g) = ids.get(key) {
                    return Some(g.clone());
                }
                if ids.len() >= MAX_IDENTITIES {
                    ids.retain(|_, g| g.tat.load(Ordering::Relaxed) > now);
                }
                (ids.len() < MAX_IDENTITIES).then(|| {
                    let g = Arc::new(Gcra::new());
                    ids.insert(key.to_string(), g.clone());
                    g
                })
            });
            bucket
                .as_deref()
                .unwrap_or(&self.overflow)
                .take(rate, now)
                .map_err(|retry_after| Limited {
                    scope: "identity",
                    retry_after,
                })?;
        }
        if let Some(rate) = self.limit.total {
            self.total.take(rate, now).map_err(|retry_after| Limited {
                scope: "total",
                retry_after,
            })?;
        }
        Ok(())
    }
}

/// The `Retry-After` value for a wait: whole seconds, rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
