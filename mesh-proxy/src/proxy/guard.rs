//! Inbound policy on the request path: path normalization, then the chain's RBAC filters,
//! then its local rate limit. The chain's policy is read from the current snapshot, so a
//! policy change applies to requests on connections that were open before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use std::borrow::Cow;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tracing::{debug, info};

use super::http::{HttpCtx, local};
use super::observe::Exchange;
use super::upstream::Body;
use crate::metrics::{AuthzLabels, Direction, RateLimitedLabels};
use crate::policy::{self, Facts, HttpFacts, Limiter, RateLimit};
use crate::state::{Guard, NetworkFilter, Snapshot};

/// A connection's view of its chain's policy, refreshed when the snapshot changes.
#[derive(Debug)]
pub struct GuardCache(Mutex<Current>);

#[derive(Debug, Clone)]
struct Current {
    generation: u64,
    guard: Arc<Guard>,
    limiter: Option<Arc<Limiter>>,
    /// The connection's filter chain is no longer in the config.
    gone: bool,
}

impl GuardCache {
    /// The policy the connection's chain had when it was accepted.
    pub fn new(generation: u64, guard: Arc<Guard>, limiters: &Limiters) -> Self {
        let limiter = limiters.get(guard.rate_limit.as_ref());
        GuardCache(Mutex::new(Current {
            generation,
            guard,
            limiter,
            gone: false,
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

fn current(ctx: &HttpCtx, snapshot: &Snapshot) -> Current {
    let mut c = ctx.guard.0.lock().unwrap_or_else(PoisonError::into_inner);
    if c.generation != snapshot.generation {
        let chain = snapshot.listeners.get(ctx.kind.xds_name()).and_then(|l| {
            l.chains
                .iter()
                .chain(l.default_chain.as_ref())
                .find(|ch| ch.name == ctx.chain)
        });
        match chain.map(|ch| &ch.filter) {
            Some(NetworkFilter::Http { guard, .. }) => {
                c.limiter = ctx.shared.limiters.get(guard.rate_limit.as_ref());
                c.guard = guard.clone();
                c.gone = false;
            }
            // The chain is gone (a port no longer served, plaintext in a namespace now STRICT):
            // nothing on this connection is served any more.
            _ => c.gone = true,
        }
        c.generation = snapshot.generation;
    }
    c.clone()
}

/// Checks an inbound request: `Some` is the refusal to send instead of forwarding it. The
/// request's path is replaced by its normalized form, which the app then receives.
pub fn check(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    req: &mut Request<Incoming>,
    ex: &mut Exchange,
) -> Option<Response<Body>> {
    if ctx.direction != Direction::inbound {
        return None;
    }
    let rewrite = match mesh_api::path::normalize(req.uri().path()) {
        Ok(Cow::Owned(p)) if p != req.uri().path() => Some(p),
        Ok(_) => None,
        Err(e) => {
            ex.flags = "DPE";
            debug!(path = req.uri().path(), reason = %e, "malformed path refused");
            return Some(local(
                StatusCode::BAD_REQUEST,
                &format!("malformed path: {e}"),
            ));
        }
    };
    // The app receives the normalized path, and policies see it from here on.
    if let Some(path) = rewrite {
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        match pq.parse() {
            Ok(pq) => parts.path_and_query = Some(pq),
            Err(_) => {
                ex.flags = "DPE";
                return Some(local(StatusCode::BAD_REQUEST, "malformed path"));
            }
        }
        match http::Uri::from_parts(parts) {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => {
                ex.flags = "DPE";
                return Some(local(StatusCode::BAD_REQUEST, "malformed path"));
            }
        }
    }
    let Current {
        guard,
        limiter,
        gone,
        ..
    } = current(ctx, snapshot);
    if gone {
        ex.flags = "NR";
        let mut r = local(
            StatusCode::SERVICE_UNAVAILABLE,
            "this connection's filter chain was removed: reconnect",
        );
        r.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return Some(r);
    }
    let identity = ctx.peer_id.as_deref();
    let metrics = &ctx.shared.metrics;
    if !guard.rbac.is_empty() {
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
        if let Err(denied) = authorize(&ctx.shared, &guard.rbac, &facts) {
            info!(
                    caller = identity.unwrap_or("-"),
                    method = %req.method(),
                    path = %path,
                    port = ctx.dst.port(),
                    reason = %denied,
                "request denied"
            );
            ex.flags = "RBAC";
            return Some(local(StatusCode::FORBIDDEN, "RBAC: access denied"));
        }
    }
    if let Some(limiter) = limiter
        && let Err(limited) = limiter.take(identity)
    {
        metrics
            .rate_limited
            .get_or_create(&RateLimitedLabels {
                policy: limiter.limit.name.clone(),
                scope: limited.scope,
                src_identity: identity.unwrap_or("unknown").to_string(),
            })
            .inc();
        ex.flags = "RL";
        let mut r = local(StatusCode::TOO_MANY_REQUESTS, "local_rate_limited");
        r.headers_mut().insert(
            header::RETRY_AFTER,
            policy::retry_after_secs(limited.retry_after).into(),
        );
        return Some(r);
    }
    None
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
fn authorize(
    shared: &super::Shared,
    rbac: &[policy::Rbac],
    facts: &Facts<'_>,
) -> Result<(), policy::Denied> {
    let decided = policy::decide(rbac, facts);
    let (policy, decision) = match &decided {
        Ok(by) => (by.unwrap_or("none"), "allow"),
        Err(d) => (d.policy_label(), "deny"),
    };
    shared
        .metrics
        .authz
        .get_or_create(&AuthzLabels {
            policy: policy.to_string(),
            decision,
        })
        .inc();
    decided.map(|_| ())
}
