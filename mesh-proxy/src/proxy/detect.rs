//! Protocol detection from a connection's first bytes: TLS ClientHello, the HTTP/2 preface, an
//! HTTP/1 request line, or else opaque. Bytes read while detecting are replayed to whoever
//! takes the connection next ([`PrefixedIo`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::state::Detected;

pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token we wait for; `OPTIONS` and `CONNECT` are the longest standard ones,
/// extension methods are rarely longer.
const MAX_METHOD: usize = 20;

/// What the bytes so far say.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Known(Detected),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // TLS handshake record, version 3.x.
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Known(Detected::Tls),
            Some(_) => Verdict::Known(Detected::Opaque),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Known(Detected::H2c)
        } else {
            Verdict::NeedMore
        };
    }
    // HTTP/1: a method token (upper-case letters, as every registered method is) then a space.
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD => {}
            b' ' if i > 0 => return Verdict::Known(Detected::Http1),
            _ => return Verdict::Known(Detected::Opaque),
        }
    }
    if buf.len() >= MAX_METHOD {
        Verdict::Known(Detected::Opaque)
    } else {
        Verdict::NeedMore
    }
}

/// Reads until the protocol is known, the client stops sending, or `timeout` passes (then
/// the connection is opaque: a server-speaks-first protocol waits for the server).
pub async fn detect<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> io::Result<(Detected, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf) {
            Verdict::Known(d) => return Ok((d, buf)),
            Verdict::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok((Detected::Opaque, buf)),
            Ok(Ok(0)) => return Ok((Detected::Opaque, buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Whether the client's first bytes are HTTP/2's connection preface, looked at without
/// taking them. `false` if they are anything else, if the first to arrive are fewer than the
/// preface, or if none come within `timeout`: it only decides how the connection's requests
/// are held, not how they are served.
pub async fn starts_h2(stream: &tokio::net::TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut buf)).await,
        Ok(Ok(n)) if buf[..n] == *H2_PREFACE
    )
}

pin_project_lite::pin_project! {
    /// An I/O stream that first yields bytes already read from it, and fails with `TimedOut`
    /// once nothing has moved either way for the idle timeout.
    #[derive(Debug)]
    pub struct PrefixedIo<T> {
        prefix: BytesMut,
        #[pin]
        inner: T,
        idle: Option<Duration>,
        last: Instant,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> PrefixedIo<T> {
    pub fn new(prefix: BytesMut, inner: T) -> Self {
        Self {
            prefix,
            inner,
            idle: None,
            last: Instant::now(),
            timer: None,
        }
    }

    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = Some(idle).filter(|d| !d.is_zero());
        self
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// Called when the inner stream is not ready: has the connection been idle too long? The
/// timer is polled (registering the task's waker) only when armed or re-armed; in between, a
/// registered timer wakes the task by itself, so most calls only read its state.
fn idle_expired(
    idle: Option<Duration>,
    last: Instant,
    timer: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> bool {
    let Some(idle) = idle else {
        return false;
    };
    let deadline = last + idle;
    let sleep = match timer {
        Some(sleep) if !sleep.is_elapsed() => return false,
        Some(sleep) => sleep,
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline.into()))),
    };
    loop {
        if sleep.as_mut().poll(cx).is_pending() {
            return false;
        }
        // The timer was set for an older deadline: activity since then moved it.
        if Instant::now() >= deadline {
            return true;
        }
        sleep.as_mut().reset(deadline.into());
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        match this.inner.poll_read(cx, buf) {
            Poll::Pending => {
                if idle_expired(*this.idle, *this.last, this.timer, cx) {
                    return Poll::Ready(Err(idle_error()));
                }
                Poll::Pending
            }
            ready => {
                if this.idle.is_some() {
                    *this.last = Instant::now();
                }
                ready
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if r.is_ready() && this.idle.is_some() {
            *this.last = Instant::now();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if r.is_ready() && this.idle.is_some() {
            *this.last = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_first_bytes() {
        let cases: &[(&[u8], Option<Detected>)] = &[
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http1)),
            (b"POST ", Some(Detected::Http1)),
            (b"M-SEARCH ", Some(Detected::Http1)),
            (b"GE", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Detected::H2c)),
            (b"PRI * HTTP/2", None),
            (b"PRI\x00", Some(Detected::Opaque)),
            (&[0x16, 0x03, 0x01, 0x02], Some(Detected::Tls)),
            (&[0x16], None),
            (b"\x00\x00\x00\x0a", Some(Detected::Opaque)),
            (b"get / HTTP/1.1", Some(Detected::Opaque)),
            (b" GET", Some(Detected::Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Some(Detected::Opaque)),
        ];
        for (bytes, want) in cases {
            let got = match classify(bytes) {
                Verdict::Known(d) => Some(d),
                Verdict::NeedMore => None,
            };
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let detect =
            tokio::spawn(async move { detect(&mut server, Duration::from_millis(100)).await });
        // A partial method, then silence (as a server-speaks-first client would be).
        client.write_all(b"GE").await.expect("write");
        let (d, buf) = detect.await.expect("join").expect("detect");
        assert_eq!(d, Detected::Opaque);
        assert_eq!(&buf[..], b"GE");
    }

    #[tokio::test]
    async fn an_h2_preface_is_seen_without_taking_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let wait = Duration::from_secs(5);
        for (sent, h2) in [
            (H2_PREFACE, true),
            (&b"GET / HTTP/1.1\r\n\r\n"[..], false),
            (&H2_PREFACE[..10], false),
        ] {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (mut server, _) = listener.accept().await.expect("accept");
            client.write_all(sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            assert_eq!(starts_h2(&server, wait).await, h2, "{sent:?}");
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.expect("read");
            assert_eq!(all, sent, "the bytes are still there to serve");
        }
        // A client that sends nothing: not known, after the timeout.
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert!(!starts_h2(&server, Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn prefix_is_replayed() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut io = PrefixedIo::new(BytesMut::from(&b"hello"[..]), server);
        let mut out = String::new();
        io.read_to_string(&mut out).await.expect("read");
        assert_eq!(out, "hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_time_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io =
            PrefixedIo::new(BytesMut::new(), server).with_idle_timeout(Duration::from_secs(5));
        client.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.expect("read");
        let err = io.read_exact(&mut b).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
