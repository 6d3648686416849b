//! The request body: empty, read in full (for mirrors), recorded as it streams (for retries),
//! or streamed as is. One limit holds for both copies. An HTTP/2 request body the upstream
//! stopped reading (it answered early) lingers until the client's end of it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::super::error::ProxyError;
use super::super::observe::Counted;
use super::super::replay::ReplayBody;
use super::super::upstream::{Body, empty, full};
use crate::state::route::Forward;

/// Largest request body kept so that the request can be retried or mirrored.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// How long, how many more bytes, and how long between two frames an HTTP/2 request body is
/// read (and dropped) after nothing needs it any more.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_IDLE: Duration = Duration::from_millis(100);

/// The downstream request body. Over HTTP/2, one dropped before its end (the upstream or the
/// proxy answered early) is read on to the client's end of the stream, for at most
/// [`LINGER`] and [`LINGER_BYTES`] and, once its frames come again, while they keep coming
/// within [`LINGER_IDLE`], instead of being reset at once (one that declares more than
/// [`LINGER_BYTES`] still to come is reset at once). The first frame gets all of [`LINGER`]:
/// a client may send the rest only once it has the answer, and a stream h2 resets is still
/// counted against the connection's concurrent streams until the reset is written, which
/// h2 does only after it has read what is waiting, so a client that ended the stream
/// meanwhile and opened new ones finds them refused (`REFUSED_STREAM`). h2 remembers only
/// so many reset streams; the client's
/// frames already in flight for one it forgot count as the client's protocol errors, and
/// after 1,024 of them h2 closes the whole connection with `ENHANCE_YOUR_CALM`, failing every
/// request on it. Between two sidecars that connection carries all of a client's traffic to
/// a pod, and answers that come before the body (a refusal, a rate limit, a gRPC error before
/// the message is read) are common.
#[derive(Debug)]
pub struct Lingering {
    inner: Option<Incoming>,
    linger: bool,
}

impl Lingering {
    /// `body` of a request of `version`; only HTTP/2 bodies linger.
    pub fn new(body: Incoming, version: http::Version) -> Self {
        Lingering {
            inner: Some(body),
            linger: version == http::Version::HTTP_2,
        }
    }
}

impl http_body::Body for Lingering {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        match self.inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.as_ref().map_or_else(
            || http_body::SizeHint::with_exact(0),
            http_body::Body::size_hint,
        )
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        use http_body::Body as _;
        let Some(mut body) = self.inner.take() else {
            return;
        };
        if !self.linger || body.is_end_stream() || body.size_hint().lower() > LINGER_BYTES as u64 {
            return;
        }
        // What has arrived already is taken here; a body that ends with it needs no task.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut left = LINGER_BYTES;
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => match taken(left, &frame) {
                    Some(l) => left = l,
                    None => return,
                },
                Poll::Ready(_) => return,
                Poll::Pending => break,
            }
        }
        // Dropped outside the runtime (never, in the proxy), the stream is reset at once.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(body, left));
        }
    }
}

/// What is left of the lingering allowance after `frame`, or `None` when the frame goes past
/// it.
fn taken(left: usize, frame: &http_body::Frame<Bytes>) -> Option<usize> {
    left.checked_sub(frame.data_ref().map_or(0, Bytes::len))
}

/// Reads `body` to its end, or until it passes [`LINGER`], `left` more bytes, or
/// [`LINGER_IDLE`] between two frames.
async fn drain(mut body: Incoming, mut left: usize) {
    let read = async {
        let Some(Ok(mut frame)) = body.frame().await else {
            return;
        };
        loop {
            match taken(left, &frame) {
                Some(l) => left = l,
                None => return,
            }
            match tokio::time::timeout(LINGER_IDLE, body.frame()).await {
                Ok(Some(Ok(next))) => frame = next,
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, read).await;
}

pub(super) enum ReqBody {
    Empty,
    Buffered(Bytes),
    /// The handle copies for each try are made from; it is never read itself.
    Replay(ReplayBody<Counted<Lingering>>),
    Stream(Option<Counted<Lingering>>),
}

impl ReqBody {
    /// How the route needs the body kept: `None` is a request without one.
    pub async fn read(
        body: Option<Counted<Lingering>>,
        f: &Forward,
        headers: &HeaderMap,
        upgrade: bool,
    ) -> Result<ReqBody, ProxyError> {
        let Some(body) = body else {
            return Ok(ReqBody::Empty);
        };
        // A mirror copy needs the whole body before it is sent.
        if !f.mirrors.is_empty()
            && !upgrade
            && content_length(headers).is_some_and(|n| n <= REPLAY_LIMIT as u64)
        {
            return match body.collect().await {
                Ok(b) => Ok(ReqBody::Buffered(b.to_bytes())),
                Err(e) => {
                    debug!(error = %e, "reading the request body");
                    Err(ProxyError::RequestBody)
                }
            };
        }
        // Recorded for a retry only when one may follow a try the endpoint processed: a
        // failed connection or a refused stream (the default retry) was not, but a streamed
        // body cannot be given to a second try, so such a request is not retried.
        if f.retry.as_ref().is_some_and(|p| p.retries_sent_requests()) && !upgrade {
            return Ok(ReqBody::Replay(ReplayBody::new(body, REPLAY_LIMIT)));
        }
        Ok(ReqBody::Stream(Some(body)))
    }

    /// Held whole (or there is none), so a mirror can have a copy.
    pub fn is_whole(&self) -> bool {
        matches!(self, ReqBody::Empty | ReqBody::Buffered(_))
    }

    pub fn replayable(&self) -> bool {
        match self {
            ReqBody::Empty | ReqBody::Buffered(_) => true,
            ReqBody::Replay(r) => r.can_replay(),
            ReqBody::Stream(_) => false,
        }
    }

    /// A copy for another try, made now (which ends the previous try's copy), or `None` when
    /// the body cannot be sent again (it streamed, or outgrew its record).
    pub fn copy(&mut self) -> Option<Body> {
        match self {
            ReqBody::Stream(_) => None,
            ReqBody::Replay(r) => r.replay().map(|c| c.boxed_unsync()),
            _ => Some(self.take()),
        }
    }

    pub fn take(&mut self) -> Body {
        match self {
            ReqBody::Empty => empty(),
            ReqBody::Buffered(b) => full(b.clone()),
            ReqBody::Replay(r) => match r.replay() {
                Some(copy) => copy.boxed_unsync(),
                None => empty(),
            },
            ReqBody::Stream(s) => match s.take() {
                Some(b) => b.map_err(Into::into).boxed_unsync(),
                None => empty(),
            },
        }
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lingering_allowance_takes_a_body_of_exactly_its_size_and_then_its_trailers() {
        let data = http_body::Frame::data(Bytes::from(vec![0; 10]));
        assert_eq!(taken(10, &data), Some(0));
        assert_eq!(taken(9, &data), None);
        let trailers = http_body::Frame::<Bytes>::trailers(HeaderMap::new());
        assert_eq!(taken(0, &trailers), Some(0));
    }
}
