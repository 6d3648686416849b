//! A forwarded request, step by step: backend and cluster, header and URL changes, the
//! body, mirrors, tries (with retries and timeouts), then the response or an upgrade.

use std::time::Instant;

use http::{Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;

use super::super::affinity::{self, Affinity};
use super::super::error::ProxyError;
use super::super::observe::{Counted, Exchange};
use super::super::upstream::{Body, UpstreamBody};
use super::HttpCtx;
use super::attempt::{Template, Tries, Try};
use super::body::{Lingering, ReqBody};
use super::headers::{Levels, strip_hop_by_hop};
use super::retry::Retries;
use super::rewrite::Destination;
use super::timeout::{Deadline, Limits};
use super::{mirror, upgrade};
use crate::state::Snapshot;
use crate::state::route::{Forward, WeightedBackend};

/// What a forwarded request was matched to: the config levels, the route's forward action,
/// and the backend picked.
pub(super) struct Chosen<'a> {
    pub levels: Levels<'a>,
    pub forward: &'a Forward,
    pub backend: &'a WeightedBackend,
}

/// Forwards a request to its chosen backend; `host` is the host the client named.
pub(super) async fn call(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    chosen: Chosen<'_>,
    host: String,
    mut req: Request<Lingering>,
    ex: &mut Exchange,
) -> Result<Response<Body>, ProxyError> {
    let start = Instant::now();
    let Chosen {
        levels,
        forward: f,
        backend,
    } = chosen;
    let cluster = snapshot
        .cluster(&backend.cluster)
        .cloned()
        .ok_or_else(|| ProxyError::NoCluster(backend.cluster.clone()))?;
    let downstream_upgrade = upgrade::requested(&mut req);
    let upgrade = downstream_upgrade.is_some();
    let (mut parts, body) = req.into_parts();
    // The hash key, from the request as the client sent it.
    let affinity = match f.hash.as_slice() {
        [] => Affinity::default(),
        policies => affinity::affinity(policies, &parts.headers, ctx.src),
    };
    // A body that is already over is never read: nothing to count.
    let body = (!body.is_end_stream()).then(|| Counted::new(body, ex.request_body()));
    levels.request(backend, &mut parts.headers, parts.version, upgrade);
    let dest = Destination::new(f, host, &parts)?;
    let mut body = ReqBody::read(body, f, &parts.headers, upgrade).await?;
    // A mirror gets a copy of a body held whole; a recorded one belongs to the tries.
    if !f.mirrors.is_empty() && body.is_whole() {
        mirror::send(ctx, snapshot, f, &parts, &dest, &mut body);
    }
    let source = ctx.shared.source_header.clone();
    let mut template = Template::new(
        parts.method,
        parts.headers,
        f.retry.as_ref(),
        body.replayable(),
        source,
        dest,
    );
    let mut retries = Retries::new(f.retry.as_ref(), &cluster, start);
    if let Some(max) = cluster.max_requests
        && cluster.endpoints.in_flight() >= max
    {
        return Err(ProxyError::TooManyRequests);
    }
    let tries = Tries {
        ctx,
        cluster: &cluster,
        h2: Tries::h2(
            &cluster,
            parts.version,
            upgrade,
            matches!(ctx.kind, super::super::ListenerKind::Gateway(_)),
        ),
        upgrade,
        hash: affinity.hash,
        limits: Limits {
            deadline: f.timeout.map(|t| start + t),
            per_try: f.retry.as_ref().and_then(|p| p.per_try_timeout),
        },
    };
    let result = run(&tries, &mut retries, &mut template, &mut body, ex).await?;
    ex.headers_after = Some(start.elapsed());
    let mut resp = result.last(ctx, &cluster.name)?;
    if upgrade::switch(downstream_upgrade, &mut resp, ctx.dst, &ctx.slot) {
        return Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()));
    }
    Ok(respond(
        resp,
        &levels,
        backend,
        &affinity,
        &tries.limits,
        ex,
    ))
}

/// Tries until a try's result stands: a response, or a failure no retry follows.
async fn run(
    tries: &Tries<'_>,
    retries: &mut Retries<'_>,
    template: &mut Template,
    body: &mut ReqBody,
    ex: &mut Exchange,
) -> Result<Try, ProxyError> {
    let metrics = &tries.ctx.shared.metrics;
    loop {
        let try_body = retries.body(body);
        let (result, ep) = tries.send(retries.avoid, template, try_body, ex).await?;
        match retries.again(&result, ep, tries.cluster, body, &tries.limits, metrics) {
            // Never without the request's headers: the copy rules keep a try that sent them
            // uncopied to results no retry follows, and should they not, it stops here.
            Some(wait) if template.can_try_again() => tokio::time::sleep(wait).await,
            _ => return Ok(result),
        }
    }
}

/// The response to send on: its hop-by-hop headers dropped, the affinity cookie set, the
/// route config's changes made, and its body held to the route's deadline.
fn respond(
    resp: Response<UpstreamBody>,
    levels: &Levels<'_>,
    backend: &WeightedBackend,
    affinity: &Affinity,
    limits: &Limits,
    ex: &mut Exchange,
) -> Response<Body> {
    let (mut p, b) = resp.into_parts();
    strip_hop_by_hop(&mut p.headers, p.version);
    if let Some(c) = &affinity.set_cookie {
        p.headers.append(http::header::SET_COOKIE, c.clone());
    }
    levels.response(Some(backend), &mut p.headers);
    let body = b.map_err(Into::into);
    match limits.deadline {
        // The route timeout covers the response body too, as Envoy's does.
        Some(at) => ex.attach(Response::from_parts(p, Deadline::new(body, at))),
        None => ex.attach(Response::from_parts(p, body)),
    }
}
