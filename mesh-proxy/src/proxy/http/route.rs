//! Route match: the connection's route table, the virtual host by the request's host, the
//! route by its matches; then the route's action.

use http::{Request, Response};

use super::super::error::ProxyError;
use super::super::guard;
use super::super::observe::Exchange;
use super::super::upstream::Body;
use super::HttpCtx;
use super::body::Lingering;
use super::call::Chosen;
use super::headers::{Levels, host};
use super::redirect::{direct, redirect};
use crate::metrics::Direction;
use crate::state::route::{Action, RequestInfo};

/// The answer to a request: checked by the chain's policy, routed, then forwarded or
/// answered by its route.
pub(super) async fn serve(
    ctx: &HttpCtx,
    mut req: Request<Lingering>,
    ex: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    if ctx.shared.overload.as_ref().is_some_and(|o| o.shedding()) {
        ctx.shared.metrics.overload_shed.inc();
        return Err(ProxyError::Overloaded);
    }
    let host = host(&mut req)?;
    let snapshot = ctx.shared.store.load().ok_or(ProxyError::NoConfig)?;
    // Paths first, as Envoy's connection manager fixes them before any filter: a redirect or a
    // refused path takes no token from a gateway's rate limit. (Inbound, the guard normalizes.)
    if ctx.kind.direction() != Direction::inbound
        && let Some(redirect) = super::paths::apply(ctx.paths, &mut req)?
    {
        return Ok(redirect);
    }
    guard::check(ctx, &snapshot, &mut req)?;
    if ctx.remote_address {
        super::paths::forwarded(ctx.src, ctx.https, req.headers_mut());
    }
    let table = snapshot
        .route(&ctx.route)
        .cloned()
        .ok_or_else(|| ProxyError::NoRouteConfig(ctx.route.clone()))?;
    let info = RequestInfo {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let (vh, route) = table
        .find(&host, &info)
        .ok_or_else(|| ProxyError::NoRoute(host.clone()))?;
    ex.route(&route.name);
    let levels = Levels {
        table: &table,
        vh,
        route,
    };
    let answer = match &route.action {
        Action::Forward(forward) => {
            // The backend is chosen first, so an aborted request counts against it, as any
            // other answer does.
            let backend = forward.pick().ok_or(ProxyError::AllWeightsZero)?;
            let slot = backend
                .metrics
                .get(ctx.kind.direction(), &route.name, &backend.cluster);
            ex.backend = Some(slot.clone());
            Answer::Call(Chosen {
                levels,
                forward,
                backend,
            })
        }
        Action::Redirect(r) => {
            let scheme = if ctx.https { "https" } else { "http" };
            Answer::Local(redirect(r, scheme, &host, req.uri()))
        }
        Action::Direct { status, body } => Answer::Local(direct(*status, body)),
    };
    if ctx.faults
        && let Some(f) = &route.fault
    {
        super::fault::inject(f, req.headers(), ex).await?;
    }
    match answer {
        Answer::Call(chosen) => super::call::call(ctx, &snapshot, chosen, host, req, ex).await,
        Answer::Local(mut resp) => {
            levels.response(None, resp.headers_mut());
            Ok(resp)
        }
    }
}

/// What a route does with a request: forward it, or answer it here.
enum Answer<'a> {
    Call(Chosen<'a>),
    Local(Response<Body>),
}
