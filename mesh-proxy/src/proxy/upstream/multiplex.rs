//! HTTP/2 to endpoints, on the h2 codec directly. A request's stream is opened, its body sent
//! and its response awaited by the request's own task: hyper's HTTP/2 client hands each request
//! through a channel to a dispatch task and spawns a task for the response and another for the
//! body: the gRPC pair runs 14 % fewer instructions per request without them
//! (docs/benchmarks.md). The connection runs in a task of its own; a second task pings it when
//! streams are open and nothing is read.

use std::error::Error as StdError;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use tracing::debug;

use super::super::http::strip_connection_specific;
use super::{Body, BoxError, SendError};

/// A connection with streams open is looked at this often, and pinged when nothing was read
/// from it since the last look...
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// ...and closed when the answer takes longer than this.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Streams one connection carries at most; the pool opens another past them.
const MAX_STREAMS: u32 = 100;

/// How much of a response's body a stream may hold unread, and (times the streams) the
/// connection's window. Every stream can then fill its window without using up the
/// connection's, so responses that a slow client does not read (up to 256 KiB each) hold back
/// no other stream on the connection: with hyper's 2 MiB stream and 5 MiB connection windows,
/// three such responses stalled everyone.
pub const STREAM_WINDOW: u32 = 256 * 1024;

/// The connection window in which `streams` streams each fill [`STREAM_WINDOW`].
pub fn connection_window(streams: u32) -> u32 {
    // The largest window HTTP/2 allows.
    streams.saturating_mul(STREAM_WINDOW).min(0x7fff_ffff)
}

/// What the requests on one connection share with its tasks.
#[derive(Debug, Default)]
struct State {
    /// Requests sent on it, for `max_requests_per_connection`.
    used: AtomicU32,
    /// Streams open (a response or a request body not done): keep-alive pings only while
    /// there are some, so that servers that count pings on idle connections as abuse (gRPC's
    /// default policy) do not close it.
    open: AtomicUsize,
    /// The connection ended, or said it takes no new streams (GOAWAY).
    closed: AtomicBool,
    /// A response or its data came in since the last look: a connection that is reading
    /// needs no ping to show it is alive.
    read: AtomicBool,
    /// Streams taken: sent, and their request or response not done.
    streams: AtomicUsize,
}

/// A stream, counted in [`State::streams`] until both its request and its response are done.
#[derive(Debug)]
struct Taken(Arc<State>);

impl Taken {
    fn new(state: &Arc<State>) -> Arc<Self> {
        state.streams.fetch_add(1, Ordering::Relaxed);
        Arc::new(Taken(state.clone()))
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open request or response, counted while it lives; it holds its stream's [`Taken`].
#[derive(Debug)]
struct Open {
    state: Arc<State>,
    _taken: Arc<Taken>,
}

impl Open {
    fn new(state: &Arc<State>, taken: &Arc<Taken>) -> Self {
        state.open.fetch_add(1, Ordering::Relaxed);
        Open {
            state: state.clone(),
            _taken: taken.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.state.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A multiplexed connection to an endpoint, as the pool keeps it; a clone the pool hands to
/// a request holds the stream it reserved ([`Connection::reserve`]).
#[derive(Clone, Debug)]
pub struct Connection {
    tx: SendRequest<Bytes>,
    state: Arc<State>,
    taken: Option<Arc<Taken>>,
}

impl Connection {
    /// The HTTP/2 handshake on `io`; the connection is then run by a task that holds `permit`
    /// (a connection permit of the cluster's breaker) until it ends.
    pub async fn handshake<I>(
        io: I,
        addr: SocketAddr,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Connection, h2::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // hyper's client settings, which this connection had before it ran on h2 directly,
        // but for the windows (see STREAM_WINDOW).
        let (tx, mut conn) = h2::client::Builder::new()
            .initial_max_send_streams(MAX_STREAMS as usize)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(connection_window(MAX_STREAMS))
            .max_frame_size(16 * 1024)
            .max_header_list_size(16 * 1024)
            .max_send_buffer_size(1024 * 1024)
            .max_local_error_reset_streams(Some(1024))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let state = Arc::new(State::default());
        let pings = conn.ping_pong();
        let ended = state.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                debug!(endpoint = %addr, error = %e, "upstream connection ended");
            }
            ended.closed.store(true, Ordering::Relaxed);
        });
        if let Some(pings) = pings {
            tokio::spawn(keep_alive(pings, state.clone(), task.abort_handle(), addr));
        }
        Ok(Connection {
            tx,
            state,
            taken: None,
        })
    }

    /// Whether new requests may go on this connection: it has not ended, was not told to go
    /// away (GOAWAY, seen without waiting for a request to fail on it) and has carried fewer
    /// than `max`.
    /// Polls the pool's own handle (it never opens a stream, so it is never left waiting), not a
    /// clone: this runs for every request.
    pub fn open_for(&mut self, max: Option<u32>) -> bool {
        if !self.is_closed() {
            // Ready or pending: the connection takes streams; an error: it no longer does.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Err(_)) = self.tx.poll_ready(&mut cx) {
                self.state.closed.store(true, Ordering::Relaxed);
            }
        }
        !self.is_closed() && max.is_none_or(|m| self.state.used.load(Ordering::Relaxed) < m)
    }

    /// Whether it has a stream to spare: fewer taken than it may carry (100, or fewer if the
    /// endpoint says so). One whose streams are all taken (by responses a slow client does
    /// not read, say) makes the pool open another rather than queue requests behind them.
    pub fn has_spare_stream(&self) -> bool {
        self.streams() < (MAX_STREAMS as usize).min(self.tx.current_max_send_streams())
    }

    /// Streams taken, reserved ones included.
    pub fn streams(&self) -> usize {
        self.state.streams.load(Ordering::Relaxed)
    }

    /// Whether the connection ended or takes no new streams.
    pub fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed)
    }

    /// The connection for one more request: counted, with a stream reserved for it until it
    /// is done (or dropped unsent), so that the pool's choice and the count cannot race.
    pub fn reserve(&self) -> Connection {
        self.state.used.fetch_add(1, Ordering::Relaxed);
        Connection {
            tx: self.tx.clone(),
            state: self.state.clone(),
            taken: Some(Taken::new(&self.state)),
        }
    }

    /// Sends the request in `req`, taken only once the connection can open a stream for it,
    /// and waits for the response headers while it sends the body. A body still streaming
    /// when the response comes is sent on by a task of its own.
    /// A connection that turns out closed or gone away (GOAWAY) is marked so and leaves the
    /// request in `req`: [`Sent::Closed`].
    pub async fn send(
        self,
        req: &mut Option<Request<Body>>,
        addr: SocketAddr,
    ) -> Result<Sent, SendError> {
        let Connection {
            mut tx,
            state,
            taken,
        } = self;
        let taken = taken.unwrap_or_else(|| Taken::new(&state));
        if let Err(e) = poll_fn(|cx| tx.poll_ready(cx)).await {
            state.closed.store(true, Ordering::Relaxed);
            return Ok(Sent::Closed(e));
        }
        let (mut head, body) = super::take(req, addr)?.into_parts();
        // A route's header changes come after the hop-by-hop headers went, and may add one
        // HTTP/2 forbids: the h2 codec would refuse the request.
        strip_connection_specific(&mut head.headers);
        if let Some(len) = body.size_hint().exact()
            && (len != 0
                || !matches!(
                    head.method,
                    Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
                ))
            && !head.headers.contains_key(header::CONTENT_LENGTH)
        {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let eos = body.is_end_stream();
        let (mut response, stream) = tx
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(|e| unopened(e, &state, addr))?;
        drop(tx);
        let open = Open::new(&state, &taken);
        let mut pipe = (!eos).then(|| Pipe {
            body,
            stream,
            first: true,
            held: None,
        });
        let resp = poll_fn(|cx| {
            if let Some(p) = pipe.as_mut()
                && let Poll::Ready(done) = Pin::new(p).poll(cx)
            {
                if let Err(e) = done {
                    debug!(endpoint = %addr, error = %e, "request body not sent");
                }
                pipe = None;
            }
            Pin::new(&mut response).poll(cx)
        })
        .await
        .map_err(|e| SendError::Reset(e.into()))?;
        if let Some(p) = pipe {
            let open = Open::new(&state, &taken);
            tokio::spawn(async move {
                let _open = open;
                if let Err(e) = p.await {
                    debug!(endpoint = %addr, error = %e, "request body not sent");
                }
            });
        }
        state.read.store(true, Ordering::Relaxed);
        let (parts, recv) = resp.into_parts();
        let body = RecvBody::new(recv, &parts.headers, open);
        Ok(Sent::Response(Response::from_parts(parts, body)))
    }
}

/// What came of sending a request on a connection.
#[derive(Debug)]
pub enum Sent {
    Response(Response<RecvBody>),
    /// The connection takes no new streams (it ended, or the endpoint sent GOAWAY); the
    /// request was not taken.
    Closed(h2::Error),
}

/// Pings the connection when streams were open and nothing was read on them for
/// [`KEEP_ALIVE_INTERVAL`], and closes it (ending its task) when an answer takes longer than
/// [`KEEP_ALIVE_TIMEOUT`]: a peer that stopped answering fails its requests instead of
/// holding them. Ends with the connection.
async fn keep_alive(
    mut pings: h2::PingPong,
    state: Arc<State>,
    conn: tokio::task::AbortHandle,
    addr: SocketAddr,
) {
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        if conn.is_finished() {
            return;
        }
        // Taken at every look, so that a read before an idle spell does not count.
        let read = state.read.swap(false, Ordering::Relaxed);
        if state.open.load(Ordering::Relaxed) == 0 || read {
            continue;
        }
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(endpoint = %addr, error = %e, "keep-alive ping not sent");
                return;
            }
            Err(_) => {
                debug!(endpoint = %addr, "keep-alive ping unanswered: connection closed");
                state.closed.store(true, Ordering::Relaxed);
                conn.abort();
                return;
            }
        }
    }
}

/// A request body sent on its stream. The first data goes at once, with the headers (h2
/// buffers it until the stream has send capacity); after that each frame waits for capacity,
/// so a body never runs further ahead of the peer's window than one frame.
struct Pipe {
    body: Body,
    stream: SendStream<Bytes>,
    first: bool,
    /// A data frame waiting for capacity, and whether it ends the body.
    held: Option<(Bytes, bool)>,
}

impl Future for Pipe {
    type Output = Result<(), BoxError>;

    /// A body that fails, or that the codec will not send (trailers HTTP/2 forbids), resets
    /// the stream, so that the endpoint does not wait for the rest.
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = self.pump(cx);
        if let Poll::Ready(Err(e)) = &polled {
            self.stream.send_reset(reason_of(e.as_ref()));
        }
        polled
    }
}

impl Pipe {
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let this = self;
        loop {
            if let Poll::Ready(reason) = this.stream.poll_reset(cx) {
                let reason = reason?;
                return Poll::Ready(Err(h2::Error::from(reason).into()));
            }
            if let Some((data, eos)) = this.held.take() {
                if this.stream.capacity() == 0 {
                    let capacity = this.stream.poll_capacity(cx);
                    this.held = Some((data, eos));
                    match ready!(capacity) {
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Poll::Ready(Err(e.into())),
                        None => return Poll::Ready(Err("stream closed while sending".into())),
                    }
                }
                this.stream.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    this.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let eos = this.body.is_end_stream();
                    if std::mem::take(&mut this.first) || data.is_empty() {
                        this.stream.send_data(data, eos)?;
                        if eos {
                            return Poll::Ready(Ok(()));
                        }
                    } else {
                        this.stream.reserve_capacity(1);
                        this.held = Some((data, eos));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        this.stream.reserve_capacity(0);
                        this.stream.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

/// A stream the codec would not open, once the request was taken: nothing was sent. When the
/// connection failed or went away since it said it was ready (another worker read a GOAWAY),
/// that is a refused stream, safe to retry as the copy rules for refused streams allow; else
/// this proxy is the cause (a request h2 will not send), not the endpoint.
fn unopened(e: h2::Error, state: &State, addr: SocketAddr) -> SendError {
    if e.is_io() || e.is_go_away() || e.is_remote() {
        state.closed.store(true, Ordering::Relaxed);
        return SendError::Reset(Box::new(Unopened(e)));
    }
    SendError::connect(
        addr,
        format!("HTTP/2 stream not opened: {e}"),
        super::Fault::Local,
    )
}

/// A request no stream was opened for, as its connection ended or went away.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 stream not opened: {0}")]
pub struct Unopened(#[source] h2::Error);

/// The reset reason to pass on for a body that failed with `e`: the reason of an HTTP/2 reset
/// behind it (a client that cancelled its stream), else `INTERNAL_ERROR`.
fn reason_of(e: &(dyn StdError + 'static)) -> h2::Reason {
    super::and_sources(e)
        .find_map(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        .unwrap_or(h2::Reason::INTERNAL_ERROR)
}

/// A response body from an HTTP/2 endpoint: data (its flow-control window released as it is
/// taken), then trailers. h2 checks the data against the response's `content-length`.
#[derive(Debug)]
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    /// What is left of the declared length.
    left: Option<u64>,
    /// Counted while the body has more to come.
    open: Option<Open>,
}

impl RecvBody {
    /// The body of a response with `headers` (its declared length).
    fn new(recv: RecvStream, headers: &HeaderMap, open: Open) -> Self {
        let ended = recv.is_end_stream();
        let left = if ended {
            Some(0)
        } else {
            headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        RecvBody {
            recv,
            data_done: false,
            left,
            open: (!ended).then_some(open),
        }
    }

    fn next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if let Some(left) = self.left.as_mut() {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    if let Some(Open { state, .. }) = &self.open
                        && !state.read.load(Ordering::Relaxed)
                    {
                        state.read.store(true, Ordering::Relaxed);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A reset with NO_ERROR after the response says the endpoint needs no more
                // of the request (RFC 9113, 8.1): the response is whole, unless it declared
                // more than came.
                Some(Err(e))
                    if e.reason() == Some(h2::Reason::NO_ERROR)
                        && self.left.is_none_or(|left| left == 0) =>
                {
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.next(cx);
        // The stream is done with once its last frame, or an error, is out.
        let done = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.recv.is_end_stream(),
            Poll::Pending => false,
        };
        if done {
            self.open = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.left
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{TEST_TIMEOUT, addr, get};
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::oneshot;

    fn response(sent: Sent) -> Response<RecvBody> {
        match sent {
            Sent::Response(r) => r,
            Sent::Closed(e) => panic!("connection closed: {e}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_connection_stops_answering_pings_fails() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("handshake");
            let stream = conn.accept().await;
            // Holds the stream unanswered, and reads nothing more: no ping is answered.
            std::future::pending::<()>().await;
            drop((conn, stream));
        });
        let mut conn = Connection::handshake(client, addr(), None)
            .await
            .expect("client handshake");
        let started = tokio::time::Instant::now();
        let sent = tokio::time::timeout(
            10 * KEEP_ALIVE_INTERVAL,
            conn.clone().send(&mut Some(get()), addr()),
        )
        .await
        .expect("the request fails before its timeout");
        let e = sent.expect_err("no answer");
        assert!(
            started.elapsed() >= KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT,
            "failed after {:?}: {e}",
            started.elapsed()
        );
        assert!(
            !conn.open_for(None),
            "a connection that failed its ping is closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_not_pinged() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("handshake");
            let (_req, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            respond
                .send_response(Response::new(()), true)
                .expect("response");
            // Sends the answer, then reads nothing more: a ping would go unanswered.
            tokio::select! {
                _ = conn.accept() => {}
                _ = stopped => {}
            }
            std::future::pending::<()>().await;
            drop(conn);
        });
        let mut conn = Connection::handshake(client, addr(), None)
            .await
            .expect("client handshake");
        let sent = conn.clone().send(&mut Some(get()), addr()).await;
        let resp = response(sent.expect("sent"));
        assert_eq!(resp.status(), http::StatusCode::OK);
        drop(resp);
        let _ = stop.send(());
        tokio::time::sleep(3 * (KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT)).await;
        assert!(
            conn.open_for(None),
            "an idle connection was pinged, and closed"
        );
    }

    #[tokio::test]
    async fn a_body_larger_than_the_window_arrives_whole_with_its_trailers() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        // A stream window of 1 KiB, far less than the body: it goes as the server frees
        // capacity.
        tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(1024)
                .handshake::<_, Bytes>(server)
                .await
                .expect("handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let got = read_all(&mut body).await;
            let trailers = body.trailers().await.expect("trailers");
            let resp = Response::builder()
                .header("x-got", got)
                .header(
                    "x-trailer",
                    trailers
                        .and_then(|t| t.get("x-sum").cloned())
                        .unwrap_or(HeaderValue::from_static("none")),
                )
                .body(())
                .expect("response");
            respond.send_response(resp, true).expect("response sent");
        });
        let conn = Connection::handshake(client, addr(), None)
            .await
            .expect("client handshake");
        let (tx, req) = streamed();
        tokio::spawn(async move {
            for _ in 0..3 {
                let chunk = Bytes::from(vec![b'x'; 3000]);
                tx.send(Ok(Frame::data(chunk))).await.expect("chunk");
            }
            let mut t = HeaderMap::new();
            t.insert("x-sum", HeaderValue::from_static("9000"));
            tx.send(Ok(Frame::trailers(t))).await.expect("trailers");
        });
        let sent = tokio::time::timeout(TEST_TIMEOUT, conn.send(&mut Some(req), addr()))
            .await
            .expect("answered in time");
        let resp = response(sent.expect("sent"));
        assert_eq!(resp.headers()["x-got"], "9000");
        assert_eq!(resp.headers()["x-trailer"], "9000");
    }

    /// How many bytes of data `body` has, read to its end (the endpoint's side).
    async fn read_all(body: &mut RecvStream) -> usize {
        let mut got = 0;
        while let Some(data) = body.data().await {
            let data = data.expect("data");
            got += data.len();
            let _ = body.flow_control().release_capacity(data.len());
        }
        got
    }

    /// A request body fed through a channel: its sender, and the request.
    fn streamed() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Request<Body>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
            .boxed_unsync();
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://app/")
            .body(body)
            .expect("request");
        (tx, req)
    }

    #[tokio::test]
    async fn a_body_still_streaming_when_the_answer_comes_is_sent_on() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        // Answers at once, then reads the whole body and ends the answer with its length.
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut answer = respond
                .send_response(Response::new(()), false)
                .expect("response");
            let mut body = req.into_body();
            let got = read_all(&mut body).await;
            answer
                .send_data(Bytes::from(got.to_string()), true)
                .expect("answer's body");
        });
        let conn = Connection::handshake(client, addr(), None)
            .await
            .expect("client handshake");
        let (tx, req) = streamed();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("chunk");
        let sent = tokio::time::timeout(TEST_TIMEOUT, conn.send(&mut Some(req), addr()))
            .await
            .expect("answered in time");
        let resp = response(sent.expect("sent"));
        // The rest of the body goes after the answer came.
        tx.send(Ok(Frame::data(Bytes::from_static(b"-second"))))
            .await
            .expect("chunk");
        drop(tx);
        let body = tokio::time::timeout(TEST_TIMEOUT, resp.into_body().collect())
            .await
            .expect("the answer ends in time")
            .expect("the answer's body")
            .to_bytes();
        assert_eq!(body, "12");
    }

    #[tokio::test]
    async fn a_body_that_fails_resets_the_stream_with_its_reason() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (first, got_first) = oneshot::channel();
        let (seen, reason) = oneshot::channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("handshake");
            let (req, _respond) = conn.accept().await.expect("a stream").expect("a request");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let _ = first.send(body.data().await.map(|d| d.is_ok()));
            let _ = seen.send(match body.data().await {
                Some(Err(e)) => e.reason(),
                _ => None,
            });
        });
        let conn = Connection::handshake(client, addr(), None)
            .await
            .expect("client handshake");
        let (tx, req) = streamed();
        let sending = tokio::spawn(send_owned(conn.clone(), req));
        tx.send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("chunk");
        let got = tokio::time::timeout(TEST_TIMEOUT, got_first)
            .await
            .expect("the endpoint read in time");
        assert_eq!(got.expect("the endpoint's report"), Some(true));
        // The client's own stream was cancelled: so is the one to the endpoint.
        tx.send(Err(h2::Error::from(h2::Reason::CANCEL).into()))
            .await
            .expect("error");
        let reason = tokio::time::timeout(TEST_TIMEOUT, reason)
            .await
            .expect("the endpoint saw the stream end in time")
            .expect("the endpoint's report");
        assert_eq!(reason, Some(h2::Reason::CANCEL));
        let sent = tokio::time::timeout(TEST_TIMEOUT, sending)
            .await
            .expect("ended in time")
            .expect("the sending task");
        assert!(sent.is_err(), "a reset stream has no answer");
    }

    #[tokio::test]
    async fn a_stream_not_opened_as_its_connection_ended_is_refused_and_closes_it() {
        // An I/O error from h2: a handshake whose peer hung up.
        let (client, server) = tokio::io::duplex(1024);
        drop(client);
        let broken = h2::server::handshake(server)
            .await
            .expect_err("the peer hung up");
        assert!(broken.is_io(), "{broken}");
        let state = State::default();
        let e = unopened(broken, &state, addr());
        assert!(e.is_refused(), "{e}");
        assert!(state.closed.load(Ordering::Relaxed));
        // One the codec would not send on a live connection: this proxy's doing.
        let state = State::default();
        let e = unopened(h2::Error::from(h2::Reason::PROTOCOL_ERROR), &state, addr());
        assert_eq!(e.fault(), Some(super::super::Fault::Local), "{e}");
        assert!(!e.is_refused(), "{e}");
        assert!(!state.closed.load(Ordering::Relaxed));
    }

    /// `conn.send(req)`, for a task of its own.
    async fn send_owned(conn: Connection, req: Request<Body>) -> Result<Sent, SendError> {
        conn.send(&mut Some(req), addr()).await
    }
}
