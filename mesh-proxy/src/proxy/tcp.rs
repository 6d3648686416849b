//! Opaque TCP: bytes both ways between the client and an endpoint of the chain's cluster (or
//! the original destination), each direction closed on its own so half-close is honoured.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::debug;

use super::Shared;
use super::upstream::connect_endpoint;
use crate::balance::Outcome;
use crate::identity::Alpn;
use crate::metrics::{Direction, Peer, TcpLabels, TcpMetrics};
use crate::state::ClusterKind;

/// `peer`: inbound over mesh TLS, the client's SPIFFE ID (for metrics).
pub async fn relay<T>(
    shared: &Arc<Shared>,
    cluster: &str,
    direction: Direction,
    peer: Option<&mesh_api::SpiffeId>,
    dst: SocketAddr,
    io: T,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(snapshot) = shared.store.load() else {
        return;
    };
    let Some(cluster) = snapshot.cluster(cluster).cloned() else {
        debug!(cluster, "TCP cluster not found; closing");
        return;
    };
    if cluster.kind == ClusterKind::OriginalDst && shared.is_own_listener(dst) {
        debug!(%dst, "connection addressed to the proxy itself; closing");
        return;
    }
    let set = match cluster.kind {
        ClusterKind::OriginalDst => cluster.original_dst(dst),
        _ => cluster.endpoints.clone(),
    };
    // The cluster's max_connections hold for TCP as for HTTP; TCP has no queue to wait in.
    let Ok(_permit) = cluster.breaker.connection() else {
        debug!(cluster = %cluster.name, "upstream overflow: max_connections reached; closing");
        return;
    };
    let mut avoid = None;
    // A failed connect tries one other endpoint before giving up.
    for _ in 0..2 {
        let Some(inflight) = set.pick(avoid, None) else {
            debug!(cluster = %cluster.name, "no endpoint for TCP connection");
            return;
        };
        let addr = inflight.endpoint.addr;
        let connected = connect_endpoint(
            &inflight.endpoint,
            shared.tls.as_ref(),
            Alpn::None,
            cluster.connect_timeout,
        )
        .await;
        match connected {
            Ok(upstream) => {
                let endpoint_peer = inflight.endpoint.peer.clone();
                inflight.finish(Outcome::Success);
                let other = match (direction, peer) {
                    (Direction::outbound, _) => endpoint_peer,
                    (Direction::inbound, Some(id)) => Arc::new(Peer::from_identity(id)),
                    (Direction::inbound, None) => Peer::unknown(),
                };
                let metrics = &shared.metrics;
                let (src, dst) = direction.ends(&metrics.me, &other);
                let m = metrics.tcp(&TcpLabels::new(direction, src, dst, &cluster.name));
                return copy(io, upstream, &m, addr).await;
            }
            Err(e) => {
                debug!(endpoint = %addr, error = %e, "TCP connect failed");
                // Not charged: a local fault (a TCP connect never waits on another's), which
                // another endpoint would fare no better with.
                let Some(o) = e.outcome() else { return };
                inflight.finish(o);
                avoid = Some(addr);
            }
        }
    }
}

/// Copies bytes both ways until both sides are done, counting them as they pass so long
/// connections show up before they end.
async fn copy<T, U>(mut io: T, upstream: U, m: &TcpMetrics, endpoint: SocketAddr)
where
    T: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    m.opened.inc();
    let mut upstream = CountingIo {
        inner: upstream,
        read: m.received.clone(),
        written: m.sent.clone(),
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        debug!(%endpoint, error = %e, "TCP connection ended");
    }
    m.closed.inc();
}

pin_project_lite::pin_project! {
    /// An upstream connection that counts the bytes read from and written to it.
    struct CountingIo<T> {
        #[pin]
        inner: T,
        read: prometheus_client::metrics::counter::Counter,
        written: prometheus_client::metrics::counter::Counter,
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        this.read.inc_by((buf.filled().len() - before) as u64);
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &polled {
            this.written.inc_by(*n as u64);
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
