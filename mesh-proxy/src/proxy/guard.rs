//! Inbound policy on the request path: path normalization, then the chain's RBAC filters,
//! then its local rate limit; at a gateway's listener, its local rate limit alone. The chain's
//! policy is read from the current snapshot, so a policy change applies to requests on
//! connections that were open before it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use http::{Request, Uri};
use prometheus_client::metrics::counter::Counter;
use tracing::{debug, info};

use super::error::ProxyError;
use super::{HttpCtx, ListenerKind};
use crate::metrics::{Direction, RateLimitedLabels};
use crate::policy::{self, Facts, HttpFacts, Limiter, RateLimit};
use crate::state::{Guard, ListenerConfig, NetworkFilter, Snapshot};

/// A connection's view of its chain's policy, refreshed when the chain's listener changes.
#[derive(Debug)]
pub struct GuardCache(Mutex<Cached>);

#[derive(Debug)]
struct Cached {
    /// The snapshot generation last looked at.
    generation: u64,
    /// The listener `current` was read from; `None`: the one the connection was accepted on.
    listener: Option<Arc<ListenerConfig>>,
    current: Arc<Current>,
}

/// The chain's policy, as this connection's requests see it.
#[derive(Debug)]
struct Current {
    /// `None`: the connection's filter chain is no longer in the config.
    guard: Option<Arc<Guard>>,
    limiter: Option<Arc<Limiter>>,
    /// This connection's caller in `mesh_proxy_rate_limited_total`, by the bucket that was
    /// empty (total, identity), found on first use.
    limited: [OnceLock<Counter>; 2],
}

impl Current {
    fn new(guard: Option<Arc<Guard>>, limiters: &Limiters) -> Self {
        Current {
            limiter: limiters.get(guard.as_ref().and_then(|g| g.rate_limit.as_ref())),
            guard,
            limited: Default::default(),
        }
    }
}

impl GuardCache {
    /// The policy the connection's chain had when it was accepted.
    pub fn new(generation: u64, guard: Arc<Guard>, limiters: &Limiters) -> Self {
        GuardCache(Mutex::new(Cached {
            generation,
            listener: None,
            current: Arc::new(Current::new(Some(guard), limiters)),
        }))
    }
}

/// Most limits whose state is kept at once (a proxy serves a few).
const MAX_LIMITERS: usize = 256;

/// Rate limiter state by limit name, kept while a limit stays the same across config updates.
#[derive(Debug, Default)]
pub struct Limiters(Mutex<HashMap<String, Arc<Limiter>>>);

impl Limiters {
    pub fn get(&self, limit: Option<&RateLimit>) -> Option<Arc<Limiter>> {
        let limit = limit?;
        let mut all = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = all.get(&limit.name)
            && l.limit == *limit
        {
            return Some(l.clone());
        }
        // Limits renamed or removed leave their state behind: past a bound, drop what no
        // connection holds.
        if all.len() >= MAX_LIMITERS {
            all.retain(|_, l| Arc::strong_count(l) > 1);
        }
        let l = Arc::new(Limiter::new(limit.clone()));
        all.insert(limit.name.clone(), l.clone());
        Some(l)
    }
}

fn current(ctx: &HttpCtx, snapshot: &Snapshot) -> Arc<Current> {
    let mut c = ctx.guard.0.lock().unwrap_or_else(PoisonError::into_inner);
    if c.generation != snapshot.generation {
        c.generation = snapshot.generation;
        let listener = snapshot.listeners.get(&*ctx.kind.xds_name());
        // Only a listener update changes a chain; endpoint updates keep the listener.
        let same = matches!((listener, &c.listener), (Some(a), Some(b)) if Arc::ptr_eq(a, b));
        if !same {
            // No chain (a port no longer served, plaintext in a namespace now STRICT): nothing
            // on this connection is served any more.
            let guard = listener
                .and_then(|l| {
                    l.chains
                        .iter()
                        .chain(l.default_chain.as_ref())
                        .find(|ch| ch.name == ctx.chain)
                })
                .and_then(|ch| match &ch.filter {
                    NetworkFilter::Http { guard, .. } => Some(guard.clone()),
                    NetworkFilter::Tcp { .. } => None,
                });
            c.listener = listener.cloned();
            c.current = Arc::new(Current::new(guard, &ctx.shared.limiters));
        }
    }
    c.current.clone()
}

/// `uri` with its path replaced and its query kept; `None` if that is not a valid URI.
fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// Checks an inbound request (or one a gateway's listener takes): an error is the refusal to
/// send instead of forwarding it. An inbound request's path is replaced by its normalized form,
/// which the app then receives (a gateway's chain has path rules of its own).
pub fn check<B>(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    req: &mut Request<B>,
) -> Result<(), ProxyError> {
    if let ListenerKind::Gateway(_) = ctx.kind {
        // Callers from outside have no mesh identity: they count toward the total only.
        let current = current(ctx, snapshot);
        if current.guard.is_none() {
            return Err(ProxyError::ChainRemoved);
        }
        return match &current.limiter {
            Some(limiter) => limit(ctx, &current, limiter, None),
            None => Ok(()),
        };
    }
    if ctx.kind.direction() != Direction::inbound {
        return Ok(());
    }
    normalize(req)?;
    let current = current(ctx, snapshot);
    let Some(guard) = &current.guard else {
        return Err(ProxyError::ChainRemoved);
    };
    let identity = ctx.peer.as_ref().map(mesh_api::SpiffeId::as_str);
    if !guard.rbac.is_empty() {
        authorize_request(ctx, &guard.rbac, identity, req)?;
    }
    match &current.limiter {
        Some(limiter) => limit(ctx, &current, limiter, identity),
        None => Ok(()),
    }
}

/// Replaces the request's path by its normalized form: the app receives it, and policies see
/// it from here on.
fn normalize<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let path = match mesh_api::path::normalize(req.uri().path()) {
        Ok(Cow::Owned(p)) if p != req.uri().path() => p,
        Ok(_) => return Ok(()),
        Err(e) => {
            debug!(path = req.uri().path(), reason = %e, "malformed path refused");
            return Err(ProxyError::MalformedPath(e.to_string()));
        }
    };
    let uri = with_path(req.uri(), &path)
        .ok_or_else(|| ProxyError::MalformedPath(format!("{path:?} is not a valid path")))?;
    *req.uri_mut() = uri;
    Ok(())
}

fn authorize_request<B>(
    ctx: &HttpCtx,
    rbac: &[policy::Rbac],
    identity: Option<&str>,
    req: &Request<B>,
) -> Result<(), ProxyError> {
    let path = req.uri().path();
    let facts = Facts {
        identity,
        port: ctx.dst.port(),
        http: Some(HttpFacts {
            path,
            method: req.method(),
            headers: req.headers(),
        }),
    };
    authorize(&ctx.shared, rbac, &facts).map_err(|denied| {
        info!(
            caller = identity.unwrap_or("-"),
            method = %req.method(),
            path = %path,
            port = ctx.dst.port(),
            reason = %denied,
            "request denied"
        );
        ProxyError::Denied
    })
}

/// Takes a token from the chain's local rate limit, counting a refusal by the bucket that was
/// empty.
fn limit(
    ctx: &HttpCtx,
    current: &Current,
    limiter: &Limiter,
    identity: Option<&str>,
) -> Result<(), ProxyError> {
    let limited = match limiter.take(identity) {
        Ok(()) => return Ok(()),
        Err(limited) => limited,
    };
    current.limited[usize::from(limited.scope == "identity")]
        .get_or_init(|| {
            ctx.shared
                .metrics
                .rate_limited
                .get_or_create(&RateLimitedLabels {
                    policy: limiter.limit.name.clone(),
                    scope: limited.scope,
                    src_identity: identity.unwrap_or("unknown").to_string(),
                })
                .clone()
        })
        .inc();
    Err(ProxyError::RateLimited {
        retry_after: limited.retry_after,
    })
}

/// Checks an opaque TCP connection against its chain's network RBAC: `false` closes it.
pub fn admit_connection(
    guard: &Guard,
    shared: &super::Shared,
    identity: Option<&str>,
    port: u16,
) -> bool {
    if guard.rbac.is_empty() {
        return true;
    }
    let facts = Facts {
        identity,
        port,
        http: None,
    };
    match authorize(shared, &guard.rbac, &facts) {
        Ok(()) => true,
        Err(denied) => {
            info!(
                caller = identity.unwrap_or("-"),
                port,
                reason = %denied,
                "connection denied"
            );
            false
        }
    }
}

/// Decides, and counts the decision by the policy that made it.
fn authorize<'p>(
    shared: &super::Shared,
    rbac: &'p [policy::Rbac],
    facts: &Facts<'_>,
) -> Result<(), policy::Denied<'p>> {
    let decision = policy::decide(rbac, facts);
    shared.metrics.count_authz(&decision);
    decision.result().map(|_| ())
}
