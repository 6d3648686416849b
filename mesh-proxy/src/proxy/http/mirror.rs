//! Mirrors: copies of a request sent to other clusters, their answers read and dropped. A
//! copy is always HTTP/1.1, with Envoy's `-shadow` suffix on its Host, and only of a body
//! held whole.

use http::header::{self, HeaderValue};
use http::{Request, request};
use http_body_util::BodyExt;

use super::super::upstream::{self, Target};
use super::HttpCtx;
use super::body::ReqBody;
use super::rewrite::Destination;
use crate::balance::Outcome;
use crate::state::Snapshot;
use crate::state::route::Forward;

/// Sends the route's mirrors their share of copies of the request, in the background.
pub(super) fn send(
    ctx: &HttpCtx,
    snapshot: &Snapshot,
    f: &Forward,
    parts: &request::Parts,
    dest: &Destination,
    body: &mut ReqBody,
) {
    for m in &f.mirrors {
        if m.per_million < 1_000_000 && rand::random_range(0..1_000_000) >= m.per_million {
            continue;
        }
        let Some(cluster) = snapshot.cluster(&m.cluster).cloned() else {
            continue;
        };
        let Some(inflight) = cluster.endpoints.pick(None, None) else {
            continue;
        };
        let mut r = Request::new(body.take());
        *r.method_mut() = parts.method.clone();
        *r.uri_mut() = dest.origin.clone();
        *r.headers_mut() = parts.headers.clone();
        // Envoy marks mirrored traffic by suffixing the host.
        if let Ok(v) = HeaderValue::from_str(&format!("{}-shadow", dest.host)) {
            r.headers_mut().insert(header::HOST, v);
        }
        let target = Target::new(&ctx.shared, &cluster, false);
        tokio::spawn(async move {
            let ep = inflight.endpoint.clone();
            // Charged as the main tries are.
            match upstream::send(&ep, target, &mut Some(r)).await {
                Ok(resp) => {
                    let ok = !resp.status().is_server_error();
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                    inflight.finish(if ok {
                        Outcome::Success
                    } else {
                        Outcome::ServerError { gateway: false }
                    });
                }
                Err(e) => {
                    if let Some(o) = e.outcome() {
                        inflight.finish(o);
                    }
                }
            }
        });
    }
}
