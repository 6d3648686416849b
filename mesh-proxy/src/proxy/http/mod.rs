//! HTTP requests, as a path of steps. A request is checked by the chain's policy and routed
//! (`route`), and its route's faults are injected (`fault`). A forwarded one (`call`) then has
//! its header and URL changes (`headers`, `rewrite`), its body kept as retries and mirrors need
//! (`body`, `mirror`), its tries (`attempt`) within their timeouts (`timeout`) and retried by
//! the route's policy (`retry`), and its upgrade (`upgrade`) or response. Redirects and direct
//! responses are answered here (`redirect`), and every failure is an error answered in one
//! place (`super::error`).

mod attempt;
mod body;
mod call;
mod fault;
mod headers;
mod mirror;
mod paths;
mod redirect;
mod retry;
mod rewrite;
mod route;
mod timeout;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;

use http::header::HeaderName;
use http::{Request, Response};
use hyper::body::Incoming;

pub use super::HttpCtx;
use super::error::ProxyError;
use super::observe::{self, Exchange};
use super::upstream::Body;
use crate::metrics::{Direction, Peer};
pub(super) use body::Lingering;
pub(super) use headers::strip_connection_specific;

/// The header that tells the app who called; never taken from outside the mesh.
pub const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

pub async fn handle(
    ctx: Arc<HttpCtx>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Whatever answers the request, an HTTP/2 body left unread lingers.
    let version = req.version();
    let mut req = req.map(|b| Lingering::new(b, version));
    if ctx.peer.is_some()
        && let Some(tls) = &ctx.shared.tls
        && !tls.identity.has_valid_svid()
    {
        return Ok(ProxyError::NoValidSvid.response());
    }
    let peer = match ctx.kind.direction() {
        Direction::inbound => {
            // Only this proxy vouches for the caller: whatever arrived is dropped.
            let headers = req.headers_mut();
            headers.remove(XFCC);
            if let Some(v) = &ctx.xfcc {
                headers.insert(XFCC, v.clone());
            }
            observe::caller(
                headers,
                ctx.peer.as_ref(),
                ctx.shared.tls.is_none(),
                &ctx.callers,
            )
        }
        Direction::outbound => {
            // A client outside the mesh vouches for nobody (Envoy's SANITIZE).
            if matches!(ctx.kind, super::ListenerKind::Gateway(_)) {
                req.headers_mut().remove(XFCC);
            }
            Peer::unknown()
        }
    };
    let mut ex = Exchange::start(&ctx.shared, ctx.kind.direction(), peer, &mut req, ctx.dst);
    let resp = match route::serve(&ctx, req, &mut ex).await {
        Ok(r) => r,
        Err(e) => e.respond(&mut ex),
    };
    Ok(ex.respond(resp))
}
