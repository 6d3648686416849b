//! A cluster's circuit breakers, as Envoy's: connections to all endpoints together
//! (`max_connections`, a semaphore whose permits the connections hold), requests waiting for
//! one (`max_pending_requests`), and retries in flight (`max_retries`, or a retry budget:
//! `percent` of the requests in flight, or of those sent over `interval`, and always
//! `min_concurrency`). Past a limit a request fails at once (`503`, flag `UO`). The state
//! outlives config snapshots while the limits stay the same.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::retry::{BudgetConfig, RetryBudget};
use crate::state::ClusterLimits;

/// Every connection the cluster may have is open.
#[derive(Debug)]
pub struct Full;

#[derive(Debug)]
pub struct Breaker {
    pub limits: ClusterLimits,
    connections: Option<Arc<Semaphore>>,
    pending: AtomicU32,
    retries: AtomicU32,
    /// Requests sent over the budget's interval, when it has one.
    window: Option<RetryBudget>,
}

/// What a request waiting for a connection holds; dropping it leaves the queue.
#[derive(Debug)]
pub struct Pending(Arc<Breaker>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight; dropping it ends it.
#[derive(Debug)]
pub struct RetrySlot(Arc<Breaker>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Breaker {
    pub fn new(limits: ClusterLimits) -> Self {
        let window = limits
            .retry_budget
            .as_ref()
            .and_then(|b| b.interval.map(|i| (b, i)))
            .map(|(b, i)| {
                RetryBudget::new(BudgetConfig {
                    ratio: b.percent / 100.0,
                    min_per_sec: 0,
                    window_secs: u32::try_from(i.as_secs().max(1)).unwrap_or(u32::MAX),
                })
            });
        Self {
            connections: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            limits,
            pending: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            window,
        }
    }

    /// A permit for one more connection: `Ok(None)` when connections are not limited,
    /// `Err(Full)` when none is free now.
    pub fn connection(&self) -> Result<Option<OwnedSemaphorePermit>, Full> {
        match &self.connections {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| Full),
        }
    }

    /// Waits for a connection permit (the caller races this against a connection coming
    /// back to the pool).
    pub async fn connection_freed(&self) -> Option<OwnedSemaphorePermit> {
        match &self.connections {
            None => None,
            Some(s) => s.clone().acquire_owned().await.ok(),
        }
    }

    /// Joins the queue of requests waiting for a connection, unless it is full.
    pub fn wait_in_line(self: &Arc<Self>) -> Option<Pending> {
        let max = self.limits.max_pending_requests.unwrap_or(u32::MAX);
        let n = self.pending.fetch_add(1, Ordering::Relaxed);
        let slot = Pending(self.clone());
        (n < max).then_some(slot)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Counts a request (its first try) for a budget over an interval.
    pub fn deposit(&self, now: Instant) {
        if let Some(w) = &self.window {
            w.deposit(now);
        }
    }

    /// Whether the cluster's own limits decide retries (else the proxy's default budget).
    pub fn limits_retries(&self) -> bool {
        self.limits.retry_budget.is_some() || self.limits.max_retries.is_some()
    }

    /// A retry in flight, if the budget or `max_retries` has room; `in_flight`: the cluster's
    /// requests in flight.
    pub fn retry(self: &Arc<Self>, in_flight: u32, now: Instant) -> Option<RetrySlot> {
        let n = self.retries.fetch_add(1, Ordering::Relaxed);
        let slot = RetrySlot(self.clone());
        let allowed = match &self.limits.retry_budget {
            Some(b) => {
                let base = match &self.window {
                    Some(w) => w.requests(now) as f64,
                    None => f64::from(in_flight + self.pending()),
                };
                f64::from(n) < (b.percent / 100.0 * base).max(f64::from(b.min_concurrency))
            }
            None => n < self.limits.max_retries.unwrap_or(u32::MAX),
        };
        allowed.then_some(slot)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::EnvoyRetryBudget;

    #[test]
    fn limits_refuse_past_them_and_free_on_drop() {
        let b = Arc::new(Breaker::new(ClusterLimits {
            max_connections: Some(1),
            max_pending_requests: Some(1),
            max_retries: Some(1),
            ..Default::default()
        }));
        let held = b.connection().expect("one free").expect("limited");
        assert!(b.connection().is_err(), "the only permit is held");
        let first = b.wait_in_line().expect("room in the queue");
        assert!(b.wait_in_line().is_none(), "the queue holds one");
        drop(first);
        assert!(b.wait_in_line().is_some());
        drop(held);
        assert!(b.connection().is_ok());

        let now = Instant::now();
        let r = b.retry(10, now).expect("one retry");
        assert!(b.retry(10, now).is_none(), "max_retries 1");
        drop(r);
        assert!(b.retry(10, now).is_some());
    }

    #[test]
    fn a_budget_scales_with_the_requests_in_flight() {
        let b = Arc::new(Breaker::new(ClusterLimits {
            retry_budget: Some(EnvoyRetryBudget {
                percent: 25.0,
                min_concurrency: 2,
                interval: None,
            }),
            ..Default::default()
        }));
        let now = Instant::now();
        // 2 always; 25 % of 20 in flight is 5.
        let held: Vec<_> = (0..5).map_while(|_| b.retry(20, now)).collect();
        assert_eq!(held.len(), 5);
        drop(held);
        let held: Vec<_> = (0..5).map_while(|_| b.retry(0, now)).collect();
        assert_eq!(held.len(), 2);

        let over_time = Arc::new(Breaker::new(ClusterLimits {
            retry_budget: Some(EnvoyRetryBudget {
                percent: 50.0,
                min_concurrency: 0,
                interval: Some(Duration::from_secs(10)),
            }),
            ..Default::default()
        }));
        for _ in 0..10 {
            over_time.deposit(now);
        }
        // In flight at most half the 10 requests sent over the interval, whatever is in
        // flight now; and as retries end, more may go.
        let kept: Vec<_> = (0..10).filter_map(|_| over_time.retry(0, now)).collect();
        assert_eq!(kept.len(), 5, "half of the 10 requests sent");
        drop(kept);
        let again: Vec<_> = (0..10).filter_map(|_| over_time.retry(0, now)).collect();
        assert_eq!(
            again.len(),
            5,
            "the budget caps retries in flight, not retries sent"
        );
    }
}
