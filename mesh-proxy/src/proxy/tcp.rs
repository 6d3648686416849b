//! Opaque TCP: bytes both ways between the client and an endpoint of the chain's cluster (or
//! the original destination), each direction closed on its own so half-close is honoured.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use super::Shared;
use super::upstream::connect_endpoint;
use crate::balance::Outcome;
use crate::identity::Alpn;
use crate::state::ClusterKind;

pub async fn forward<T>(shared: &Arc<Shared>, cluster: &str, dst: SocketAddr, mut io: T)
where
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
    let mut avoid = None;
    // A failed connect tries one other endpoint before giving up.
    for _ in 0..2 {
        let Some(inflight) = set.pick(avoid) else {
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
            Ok(mut upstream) => {
                inflight.finish(Outcome::Success);
                if let Err(e) = tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
                    debug!(endpoint = %addr, error = %e, "TCP connection ended");
                }
                return;
            }
            Err(e) => {
                inflight.finish(Outcome::ConnectFailure);
                debug!(endpoint = %addr, error = %e, "TCP connect failed");
                avoid = Some(addr);
            }
        }
    }
}
