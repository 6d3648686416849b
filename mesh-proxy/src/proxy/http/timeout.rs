//! Timeouts: the route's, over all tries until the response headers and then over the
//! response body too (as Envoy's), and the retry policy's per try.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;

use super::super::Shared;
use super::super::error::ProxyError;
use super::super::upstream::{BoxError, SendError, UpstreamBody};
use super::attempt::Try;
use crate::metrics::TimeoutLabels;

/// The two limits on a try.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    /// The route's: when its timeout runs out.
    pub deadline: Option<Instant>,
    pub per_try: Option<Duration>,
}

impl Limits {
    /// Whether the route's time is up at `now`.
    pub fn over(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| now >= d)
    }

    /// Runs one try's send within whichever limit comes first. (A plain function, not an
    /// `async fn`: one of those would hold `send` twice, as its argument and as what it
    /// awaits, and every future around it would carry the room.)
    pub fn within(
        self,
        send: impl Future<Output = Result<Response<UpstreamBody>, SendError>>,
    ) -> impl Future<Output = Try> {
        use futures::future::{Either, FutureExt};
        let per_try = self.per_try.map(|t| Instant::now() + t);
        let limit = match (self.deadline, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match limit {
            None => Either::Left(send.map(Try::from)),
            Some(at) => {
                let route_deadline = Some(at) == self.deadline;
                Either::Right(
                    tokio::time::timeout_at(at.into(), send).map(move |r| match r {
                        Ok(r) => r.into(),
                        Err(_) if route_deadline => Try::Timeout,
                        Err(_) => Try::PerTryTimeout,
                    }),
                )
            }
        }
    }
}

impl From<Result<Response<UpstreamBody>, SendError>> for Try {
    fn from(r: Result<Response<UpstreamBody>, SendError>) -> Self {
        match r {
            Ok(r) => Try::Response(r),
            Err(e) => Try::Failed(e),
        }
    }
}

/// A last try that timed out, counted in `mesh_proxy_timeouts_total`.
pub(super) fn expired(shared: &Shared, cluster: &str, route_timeout: bool) -> ProxyError {
    let kind = if route_timeout { "route" } else { "per-try" };
    shared
        .metrics
        .timeouts
        .get_or_create(&TimeoutLabels {
            backend: cluster.to_string(),
            kind,
        })
        .inc();
    ProxyError::Timeout
}

pin_project_lite::pin_project! {
    /// A response body cut off, with an error, at the route's deadline.
    pub(super) struct Deadline<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl<B> Deadline<B> {
    pub fn new(inner: B, at: Instant) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(at.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("route timeout while the response was being sent")]
struct ResponseTimeout;

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(ResponseTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A send that never answers, and one that fails at once.
    fn never() -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> {
        std::future::pending()
    }

    fn overflow() -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> {
        std::future::ready(Err(SendError::Overflow))
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_limit_to_run_out_names_the_timeout() {
        let now = Instant::now();
        let per_try_first = Limits {
            deadline: Some(now + Duration::from_secs(10)),
            per_try: Some(Duration::from_secs(1)),
        };
        assert!(matches!(
            per_try_first.within(never()).await,
            Try::PerTryTimeout
        ));
        let route_first = Limits {
            deadline: Some(Instant::now() + Duration::from_secs(1)),
            per_try: Some(Duration::from_secs(10)),
        };
        assert!(matches!(route_first.within(never()).await, Try::Timeout));
        let route_only = Limits {
            deadline: Some(Instant::now() + Duration::from_secs(1)),
            per_try: None,
        };
        assert!(matches!(route_only.within(never()).await, Try::Timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_that_ends_in_time_is_its_result() {
        let none = Limits {
            deadline: None,
            per_try: None,
        };
        assert!(matches!(
            none.within(overflow()).await,
            Try::Failed(SendError::Overflow)
        ));
        let both = Limits {
            deadline: Some(Instant::now() + Duration::from_secs(1)),
            per_try: Some(Duration::from_secs(1)),
        };
        assert!(matches!(
            both.within(overflow()).await,
            Try::Failed(SendError::Overflow)
        ));
    }
}
