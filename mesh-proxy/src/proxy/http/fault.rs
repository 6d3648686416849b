//! Fault injection (Envoy's `envoy.filters.http.fault`): a route's delay, then its abort,
//! each on its own share of requests, before the request is forwarded or answered. The
//! delay does not count against the route's timeout, which starts after it, as in Envoy.

use http::HeaderMap;
use http::header::CONTENT_TYPE;

use super::super::error::ProxyError;
use super::super::observe::Exchange;
use crate::state::route::Fault;

/// Delays the request if it is in the delay's share; an error if it is in the abort's.
pub(super) async fn inject(
    fault: &Fault,
    headers: &HeaderMap,
    ex: &mut Exchange,
) -> Result<(), ProxyError> {
    let delayed = match &fault.delay {
        Some(d) if d.share.hit() => {
            tokio::time::sleep(d.fixed).await;
            ex.flags = "DI";
            true
        }
        _ => false,
    };
    match &fault.abort {
        Some(a) if a.share.hit() => Err(ProxyError::FaultAbort {
            code: a.code,
            delayed,
            grpc: is_grpc(headers),
        }),
        _ => Ok(()),
    }
}

/// A gRPC request, as Envoy tells one (grpc-web is not).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v == b"application/grpc" || v.starts_with(b"application/grpc+")
    })
}
