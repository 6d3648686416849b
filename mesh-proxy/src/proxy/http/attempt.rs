//! One try: an endpoint picked, the request built for its protocol, sent within the
//! timeouts, and the endpoint charged with how it went.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Version};

use super::super::error::ProxyError;
use super::super::observe::{Exchange, SOURCE_WORKLOAD};
use super::super::upstream::{self, Body, SendError, Target, UpstreamBody};
use super::HttpCtx;
use super::rewrite::Destination;
use super::timeout::{self, Limits};
use crate::balance::{InFlight, Outcome};
use crate::metrics::Direction;
use crate::state::route::RetryPolicy;
use crate::state::{Cluster, ClusterKind, UpstreamProtocol};

/// The outcome of one try.
pub(super) enum Try {
    Response(Response<UpstreamBody>),
    Failed(SendError),
    /// The per-try timeout fired.
    PerTryTimeout,
    /// The route's timeout fired.
    Timeout,
    /// The request's own body failed (malformed, or cut off by the client), so the try did.
    BodyFailed,
}

impl Try {
    /// What the endpoint is charged with: `None` for an overflow, a local failure or another
    /// request's failed attempt, which neither failed nor answered (again).
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Try::Response(r) if r.status().is_server_error() => Some(Outcome::ServerError {
                gateway: matches!(r.status().as_u16(), 502..=504),
            }),
            Try::Response(_) => Some(Outcome::Success),
            Try::Failed(e) => e.outcome(),
            Try::PerTryTimeout | Try::Timeout => Some(Outcome::ServerError { gateway: true }),
            Try::BodyFailed => None,
        }
    }

    /// The last try's response, or the error it ends in.
    pub fn last(self, ctx: &HttpCtx, cluster: &str) -> Result<Response<UpstreamBody>, ProxyError> {
        match self {
            Try::Response(r) => Ok(r),
            Try::Failed(e) => Err(e.into()),
            Try::PerTryTimeout => Err(timeout::expired(&ctx.shared, cluster, false)),
            Try::Timeout => Err(timeout::expired(&ctx.shared, cluster, true)),
            Try::BodyFailed => Err(ProxyError::RequestBody),
        }
    }
}

/// The request each try sends. Its headers are moved into a try unless a retry may follow
/// once that try has sent them, and then copied. A try that does not send its request (it
/// found no connection) gives them back for the next.
pub(super) struct Template {
    pub method: Method,
    headers: Option<HeaderMap>,
    /// Whether a try over HTTP/1.1, and over HTTP/2, copies the headers.
    copy_h1: bool,
    copy_h2: bool,
    /// This proxy's workload, for the server's proxy.
    source: Option<HeaderValue>,
    pub dest: Destination,
}

impl Template {
    /// Under `retry`, for a body that a retry can send again (`replayable`).
    pub fn new(
        method: Method,
        headers: HeaderMap,
        retry: Option<&RetryPolicy>,
        replayable: bool,
        source: Option<HeaderValue>,
        dest: Destination,
    ) -> Self {
        let retry = retry.filter(|_| replayable);
        // What a retry may follow once the request was sent: a response, a reset, a per-try
        // timeout; and over HTTP/2 a refused stream, whose request the h2 codec has taken. A failed
        // connection is retried too, but its request is given back.
        let sent = retry.is_some_and(RetryPolicy::retries_sent_requests);
        Template {
            method,
            headers: Some(headers),
            copy_h1: sent,
            copy_h2: sent || retry.is_some_and(RetryPolicy::retries_refused_streams),
            source,
            dest,
        }
    }

    /// The request for a try over HTTP/2 (`h2`) or HTTP/1.1, to another mesh proxy (`mesh`)
    /// or not.
    fn build(&mut self, h2: bool, mesh: bool, body: Body) -> Result<Request<Body>, ProxyError> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        let copy = if h2 { self.copy_h2 } else { self.copy_h1 };
        *r.headers_mut() = if copy {
            self.headers.clone().unwrap_or_default()
        } else {
            self.headers.take().unwrap_or_default()
        };
        // The server's proxy learns who calls from this; nobody else gets it.
        match (&self.source, mesh) {
            (Some(v), true) => r.headers_mut().insert(SOURCE_WORKLOAD, v.clone()),
            _ => r.headers_mut().remove(SOURCE_WORKLOAD),
        };
        if h2 {
            *r.uri_mut() = self.dest.absolute()?;
            *r.version_mut() = Version::HTTP_2;
            r.headers_mut().remove(header::HOST);
        } else {
            *r.uri_mut() = self.dest.origin.clone();
            *r.version_mut() = Version::HTTP_11;
            r.headers_mut()
                .insert(header::HOST, self.dest.host_value()?);
        }
        Ok(r)
    }

    /// A try's request that was never sent: its headers serve the next try.
    fn give_back(&mut self, req: Request<Body>) {
        if self.headers.is_none() {
            self.headers = Some(req.into_parts().0.headers);
        }
    }

    /// Whether another try can be made: not once a try sent headers it did not copy, which
    /// the copy rules above keep to tries no retry follows.
    pub fn can_try_again(&self) -> bool {
        self.headers.is_some()
    }
}

/// What every try of a request shares.
pub(super) struct Tries<'a> {
    pub ctx: &'a HttpCtx,
    pub cluster: &'a Arc<Cluster>,
    /// Over HTTP/2 to any endpoint (else only to mesh proxies).
    pub h2: bool,
    pub upgrade: bool,
    /// The request's hash, for a ring-hash cluster.
    pub hash: Option<u64>,
    pub limits: Limits,
}

impl Tries<'_> {
    /// Whether the cluster speaks HTTP/2 to a request of `version`; an upgrade never does. At
    /// a gateway (`edge`) a cluster that names no protocol speaks HTTP/1.1, as Envoy's do: a
    /// client outside the mesh chose HTTP/2 by ALPN with the gateway, not with the backend.
    pub fn h2(cluster: &Cluster, version: Version, upgrade: bool, edge: bool) -> bool {
        !upgrade
            && match cluster.protocol {
                UpstreamProtocol::Http2 => true,
                UpstreamProtocol::Http1 => false,
                UpstreamProtocol::Downstream => version == Version::HTTP_2,
                UpstreamProtocol::Unset => !edge && version == Version::HTTP_2,
            }
    }

    /// One try, to an endpoint other than `avoid` when there is one: its result, and the
    /// endpoint it went to.
    pub async fn send(
        &self,
        avoid: Option<SocketAddr>,
        template: &mut Template,
        body: Body,
        ex: &mut Exchange,
    ) -> Result<(Try, SocketAddr), ProxyError> {
        let inflight = self.pick(avoid).ok_or(ProxyError::NoHealthyUpstream)?;
        let ep = inflight.endpoint.clone();
        if self.ctx.kind.direction() == Direction::outbound {
            ex.peer = ep.peer.clone();
        }
        ex.upstream(&self.cluster.name, ep.addr);
        let h2 = self.h2 || (ep.mesh_proxy && !self.upgrade);
        let mut req = Some(template.build(h2, ep.mesh_proxy, body)?);
        let target = Target::new(&self.ctx.shared, self.cluster, h2);
        let sent = self
            .limits
            .within(upstream::send(&ep, target, &mut req))
            .await;
        if let Some(unsent) = req {
            template.give_back(unsent);
        }
        let result = match sent {
            // However the try ended, the client's body is why.
            Try::Failed(_) | Try::PerTryTimeout | Try::Timeout if ex.request_body_failed() => {
                Try::BodyFailed
            }
            r => r,
        };
        match result.outcome() {
            Some(o) => inflight.finish(o),
            None => drop(inflight),
        }
        Ok((result, ep.addr))
    }

    /// An endpoint of the cluster; for an original-destination cluster, the connection's own.
    fn pick(&self, avoid: Option<SocketAddr>) -> Option<InFlight> {
        match self.cluster.kind {
            ClusterKind::OriginalDst => self.cluster.original_dst(self.ctx.dst).pick(None, None),
            _ => self.cluster.endpoints.pick(avoid, self.hash),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::rewrite::tests::{dest, forward};
    use super::*;

    fn policy(set: impl FnOnce(&mut RetryPolicy)) -> RetryPolicy {
        let mut p = RetryPolicy {
            attempts: 2,
            on_5xx: false,
            on_gateway_error: false,
            on_connect_failure: true,
            on_reset: false,
            on_refused_stream: false,
            codes: Vec::new(),
            grpc_statuses: Vec::new(),
            per_try_timeout: None,
            backoff_base: std::time::Duration::from_millis(25),
            backoff_max: std::time::Duration::from_millis(250),
        };
        set(&mut p);
        p
    }

    #[test]
    fn headers_are_copied_only_when_a_retry_may_follow_a_sent_request() {
        let f = forward(None, None);
        let mut headers = HeaderMap::new();
        headers.insert("x-app", HeaderValue::from_static("1"));
        let template = |p: Option<&RetryPolicy>, replayable: bool| {
            let d = dest(&f, "/a", "svc:80", Some("svc:80"));
            Template::new(Method::GET, headers.clone(), p, replayable, None, d)
        };
        // The controller's default: failed connections and refused streams.
        let default = policy(|p| p.on_refused_stream = true);
        let mut t = template(Some(&default), true);
        // Over HTTP/2 a refused stream's request is gone into the codec: copied.
        let r = t.build(true, false, upstream::empty()).expect("h2");
        assert_eq!(r.headers()["x-app"], "1");
        assert!(t.headers.is_some(), "kept for a refused stream");
        // Over HTTP/1.1 only a failed connection is retried, and its request comes back.
        let r = t.build(false, false, upstream::empty()).expect("h1");
        assert!(t.headers.is_none(), "moved");
        t.give_back(r);
        let again = t.build(false, false, upstream::empty()).expect("again");
        assert_eq!(again.headers()["x-app"], "1");
        assert_eq!(again.headers()[header::HOST], "svc:80");
        // A policy that retries sent requests copies over both.
        let status = policy(|p| p.codes = vec![503]);
        let mut t = template(Some(&status), true);
        t.build(false, false, upstream::empty()).expect("h1");
        t.build(true, false, upstream::empty()).expect("h2");
        assert!(t.headers.is_some());
        // Given back while it holds its own, a template keeps them.
        let mut copy = HeaderMap::new();
        copy.insert("x-app", HeaderValue::from_static("changed"));
        let mut sent = Request::new(upstream::empty());
        *sent.headers_mut() = copy;
        t.give_back(sent);
        let r = t.build(false, false, upstream::empty()).expect("h1");
        assert_eq!(r.headers()["x-app"], "1");
        // Nothing a sent request may be retried for: moved, over both.
        let connect_only = policy(|_| {});
        let refused_no_tries = policy(|p| {
            p.on_refused_stream = true;
            p.attempts = 0;
        });
        for (p, replayable) in [
            (None, true),
            (Some(&status), false),
            (Some(&connect_only), true),
            (Some(&refused_no_tries), true),
        ] {
            for h2 in [false, true] {
                let mut t = template(p, replayable);
                t.build(h2, false, upstream::empty()).expect("try");
                assert!(
                    !t.can_try_again(),
                    "h2 {h2}: {p:?}, replayable {replayable}"
                );
            }
        }
    }
}
