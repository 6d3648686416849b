//! The request body: empty, read in full (for mirrors), recorded as it streams (for retries),
//! or streamed as is. One limit holds for both copies.

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

pub(super) enum ReqBody {
    Empty,
    Buffered(Bytes),
    /// The handle copies for each try are made from; it is never read itself.
    Replay(ReplayBody<Counted<Incoming>>),
    Stream(Option<Counted<Incoming>>),
}

impl ReqBody {
    /// How the route needs the body kept: `None` is a request without one.
    pub async fn read(
        body: Option<Counted<Incoming>>,
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
        // Recorded for a retry only when one may follow a try that sent it: a failed
        // connection (the default retry) never read it, but a streamed body cannot be given
        // to a second try, so such a request is not retried.
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
