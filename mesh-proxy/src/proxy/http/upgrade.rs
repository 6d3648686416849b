//! Protocol upgrades (WebSocket and the like): an HTTP/1.1 request asking for one is sent
//! over HTTP/1.1 with its `Connection` and `Upgrade` headers, and after a `101` from the
//! endpoint the proxy copies bytes between the two connections.

use std::net::SocketAddr;

use http::header;
use http::{Request, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::super::ConnSlot;
use super::super::upstream::UpstreamBody;

/// The client's side of the upgrade, when `req` asks for one.
pub(super) fn requested<B>(req: &mut Request<B>) -> Option<OnUpgrade> {
    let asked = req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            });
    asked.then(|| hyper::upgrade::on(req))
}

/// After a `101` to a request that asked for an upgrade (`down`): starts the tunnel, which
/// holds the connection's `slot` while it runs, and says so. The `101` goes to the client as
/// the endpoint sent it, with no header changes.
pub(super) fn switch(
    down: Option<OnUpgrade>,
    resp: &mut Response<UpstreamBody>,
    dst: SocketAddr,
    slot: &ConnSlot,
) -> bool {
    match down {
        Some(down) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            tunnel(down, hyper::upgrade::on(resp), dst, slot.clone());
            true
        }
        _ => false,
    }
}

/// After a 101 from both sides, copies bytes between the client and the endpoint.
fn tunnel(down: OnUpgrade, up: OnUpgrade, dst: SocketAddr, slot: ConnSlot) {
    tokio::spawn(async move {
        let _slot = slot;
        let (down, up) = match tokio::try_join!(down, up) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, %dst, "upgrade failed");
                return;
            }
        };
        let mut down = TokioIo::new(down);
        let mut up = TokioIo::new(up);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            debug!(error = %e, %dst, "upgraded connection ended");
        }
    });
}
