//! A request body that can be sent again: it streams from the client while recording what
//! passes, up to a limit, so a retry can replay the recorded part and go on reading. Once the
//! body outgrows the limit the recording is dropped and no retry is possible. Nothing waits
//! for the whole body before the first try, so streaming requests (gRPC) are not delayed.
//!
//! Only the newest copy may read: a copy made for a retry supersedes the older ones, which
//! then fail (their connection is being abandoned anyway).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::upstream::BoxError;

#[derive(Debug)]
struct Shared<B> {
    source: B,
    limit: usize,
    chunks: Vec<Bytes>,
    len: usize,
    /// The body outgrew the limit: the recording is gone.
    overflowed: bool,
    /// The client's body ended (with these trailers, if any).
    ended: bool,
    trailers: Option<HeaderMap>,
    /// The copy allowed to read.
    generation: u64,
}

/// One try's view of the request body.
#[derive(Debug)]
pub struct ReplayBody<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
    generation: u64,
    /// Recorded chunks this copy has yielded.
    pos: usize,
    trailers_sent: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was taken over by a retry")]
struct Superseded;

impl<B> ReplayBody<B> {
    pub fn new(source: B, limit: usize) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source,
                limit,
                chunks: Vec::new(),
                len: 0,
                overflowed: false,
                ended: false,
                trailers: None,
                generation: 0,
            })),
            generation: 0,
            pos: 0,
            trailers_sent: false,
        }
    }

    /// A copy for the next try, or `None` when the body outgrew the limit.
    pub fn replay(&self) -> Option<Self> {
        let mut s = self.shared.lock().ok()?;
        if s.overflowed {
            return None;
        }
        s.generation += 1;
        Some(Self {
            shared: self.shared.clone(),
            generation: s.generation,
            pos: 0,
            trailers_sent: false,
        })
    }

    /// Whether a retry could still send this body again.
    pub fn can_replay(&self) -> bool {
        self.shared.lock().is_ok_and(|s| !s.overflowed)
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Ok(mut s) = this.shared.lock() else {
            return Poll::Ready(Some(Err("request body lock poisoned".into())));
        };
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(chunk) = s.chunks.get(this.pos) {
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        if s.ended {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !s.overflowed {
                            if s.len + data.len() > s.limit {
                                s.overflowed = true;
                                s.chunks = Vec::new();
                            } else {
                                s.len += data.len();
                                s.chunks.push(data.clone());
                                this.pos = s.chunks.len();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            s.trailers = Some(t.clone());
                            s.ended = true;
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.shared.lock().is_ok_and(|s| {
            s.generation == self.generation
                && self.pos >= s.chunks.len()
                && ((s.ended && (self.trailers_sent || s.trailers.is_none()))
                    || (!s.ended && s.source.is_end_stream()))
        })
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use http_body_util::{BodyExt, StreamBody};

    type Source = StreamBody<mpsc::UnboundedReceiver<Result<Frame<Bytes>, std::io::Error>>>;

    fn source() -> (
        mpsc::UnboundedSender<Result<Frame<Bytes>, std::io::Error>>,
        Source,
    ) {
        let (tx, rx) = mpsc::unbounded();
        (tx, StreamBody::new(rx))
    }

    async fn collect(b: ReplayBody<Source>) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let c = b.collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn a_retry_replays_what_was_read_and_reads_on() {
        let (tx, src) = source();
        let handle = ReplayBody::new(src, 1024);
        let mut first = handle.replay().expect("copy");
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"hello "))))
            .expect("send");
        // The first try reads one chunk, then fails before the rest arrives.
        let frame = first.frame().await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "hello ");
        let second = handle.replay().expect("still replayable");
        // The old copy is superseded.
        assert!(first.frame().await.expect("frame").is_err());
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"world"))))
            .expect("send");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("value"));
        tx.unbounded_send(Ok(Frame::trailers(trailers)))
            .expect("send");
        drop(tx);
        let (body, t) = collect(second).await.expect("body");
        assert_eq!(body, b"hello world");
        assert_eq!(t.expect("trailers")["grpc-status"], "0");
        // A third try gets all of it again, trailers included.
        let (body, t) = collect(handle.replay().expect("copy")).await.expect("body");
        assert_eq!(body, b"hello world");
        assert!(t.is_some());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_but_cannot_be_replayed() {
        let (tx, src) = source();
        let handle = ReplayBody::new(src, 8);
        let first = handle.replay().expect("copy");
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
            .expect("send");
        drop(tx);
        let (body, _) = collect(first).await.expect("body");
        assert_eq!(body, b"0123456789");
        assert!(!handle.can_replay());
        assert!(handle.replay().is_none());
    }
}
