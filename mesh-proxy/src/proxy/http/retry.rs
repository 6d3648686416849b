//! Retries: which failed tries the route's policy retries, whether the cluster lets one more
//! go (its `max_retries`, or else the retry budget), and the backoff before it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_api::backoff::Backoff;

use super::super::upstream::{Body, Fault, SendError};
use super::attempt::Try;
use super::body::ReqBody;
use super::timeout::Limits;
use crate::breaker::RetrySlot;
use crate::metrics::{Metrics, ReasonLabels};
use crate::state::Cluster;
use crate::state::route::RetryPolicy;

/// A request's retries so far.
pub(super) struct Retries<'a> {
    policy: Option<&'a RetryPolicy>,
    attempt: u32,
    /// The endpoint the last try went to, which the next avoids.
    pub avoid: Option<SocketAddr>,
    /// The body of the next try, copied when its retry was decided.
    next_body: Option<Body>,
    /// The retry in flight, against the cluster's `max_retries`.
    slot: Option<RetrySlot>,
    backoff: Option<Backoff>,
}

impl<'a> Retries<'a> {
    /// A request under `policy` starts: with one, it counts towards what the cluster's
    /// retry budget allows.
    pub fn new(policy: Option<&'a RetryPolicy>, cluster: &Cluster, start: Instant) -> Self {
        if policy.is_some() {
            cluster.budget.deposit(start);
            cluster.breaker.deposit(start);
        }
        Retries {
            policy,
            attempt: 0,
            avoid: None,
            next_body: None,
            slot: None,
            backoff: None,
        }
    }

    /// The body for the next try.
    pub fn body(&mut self, body: &mut ReqBody) -> Body {
        self.next_body.take().unwrap_or_else(|| body.take())
    }

    /// After a try to `ep`: the wait before the next, or `None` when this try's result
    /// stands. A retry is counted (or its denial, by why) when the policy asks for one.
    pub fn again(
        &mut self,
        result: &Try,
        ep: SocketAddr,
        cluster: &Cluster,
        body: &mut ReqBody,
        limits: &Limits,
        metrics: &Metrics,
    ) -> Option<Duration> {
        let p = self.policy?;
        let reason = reason(p, result)?;
        let now = Instant::now();
        if self.attempt >= p.attempts || limits.over(now) {
            // Out of tries: the last answer stands.
            return None;
        }
        let labels = |reason| ReasonLabels {
            backend: cluster.name.clone(),
            reason,
        };
        // The next try's body is copied now, while the record is known to hold it: by the
        // time the retry starts, the last try may have read it past what is kept.
        let Some(copy) = body.copy() else {
            metrics
                .retries_denied
                .get_or_create(&labels("body-not-replayable"))
                .inc();
            return None;
        };
        if let Some(denied) = admit(cluster, now, &mut self.slot) {
            metrics.retries_denied.get_or_create(&labels(denied)).inc();
            return None;
        }
        self.next_body = Some(copy);
        metrics.retries.get_or_create(&labels(reason)).inc();
        self.attempt += 1;
        self.avoid = Some(ep);
        let wait = self
            .backoff
            .get_or_insert_with(|| Backoff::full_jitter(p.backoff_base, p.backoff_max))
            .next_delay();
        // A wait past the route's deadline would only end in its timeout.
        match limits.deadline {
            Some(d) if now + wait >= d => None,
            _ => Some(wait),
        }
    }
}

/// Why the policy retries a try's result, if it does.
fn reason(p: &RetryPolicy, result: &Try) -> Option<&'static str> {
    match result {
        Try::Response(r) if p.retries_status(r.status().as_u16()) => Some("status"),
        Try::Response(r) if p.retries_grpc(r.headers()) => Some("grpc-status"),
        Try::Failed(SendError::Overflow) => None,
        // Another endpoint would fare no better.
        Try::Failed(e) if e.fault() == Some(Fault::Local) => None,
        Try::Failed(e) if e.is_connect() && p.on_connect_failure => Some("connect-failure"),
        Try::Failed(e) if e.is_refused() && p.on_refused_stream => Some("refused-stream"),
        Try::Failed(e) if !e.is_connect() && p.on_reset => Some("reset"),
        Try::PerTryTimeout if p.on_5xx || p.on_gateway_error => Some("per-try-timeout"),
        _ => None,
    }
}

/// Whether the cluster lets one more retry go: `None` when it does (the retry's slot, if its
/// limits count retries, is kept in `slot` until the next), else why not. The cluster's own
/// `max_retries` or retry budget replace the proxy's default budget.
fn admit(cluster: &Cluster, now: Instant, slot: &mut Option<RetrySlot>) -> Option<&'static str> {
    if !cluster.breaker.limits_retries() {
        return (!cluster.budget.withdraw(now)).then_some("budget");
    }
    // This request's previous retry is over: it does not count against the next.
    *slot = None;
    *slot = cluster.breaker.retry(cluster.endpoints.in_flight(), now);
    slot.is_none().then_some("overflow")
}
