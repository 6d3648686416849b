//! Every answer the proxy makes itself in place of an upstream's: why (the variant and its
//! message), the status, Envoy's response flag for the access log and metrics, and any
//! header the answer carries, all decided here.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use tracing::debug;

use super::observe::Exchange;
use super::upstream::{Body, SendError, empty, full};
use crate::state::route::AbortCode;

/// Marks the proxy's own answers: `local`, or `overflow` for a circuit breaker's.
pub const MARK: HeaderName = HeaderName::from_static("x-mesh-proxy");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Inbound over mesh TLS while this proxy's own certificate is not valid: fail closed, on
    /// connections opened while it was valid too.
    #[error("this proxy holds no valid certificate: mesh TLS refused")]
    NoValidSvid,
    #[error("proxy has no config yet")]
    NoConfig,
    #[error("no route configuration {0:?}")]
    NoRouteConfig(String),
    #[error("request has no Host")]
    MissingHost,
    /// RFC 9112 section 3.2: more than one Host is refused, as the hosts could be read
    /// differently further on.
    #[error("request has more than one Host")]
    DuplicateHost,
    /// Resident memory passed 95 % of `--memory-limit`: new requests are shed.
    #[error("proxy overloaded: memory pressure")]
    Overloaded,
    /// RFC 9113 section 8.3.1: an HTTP/2 request whose `Host` names another host or port
    /// than its `:authority` is malformed; routed by one, the app would read the other.
    #[error("Host differs from :authority")]
    HostMismatch,
    /// RFC 9110 section 4.2.4: user info in a target's authority is treated as an error
    /// (it serves to obscure the host).
    #[error("request target has user info")]
    UserInfo,
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("every backend of the route has weight 0")]
    AllWeightsZero,
    #[error("cluster {0:?} not found")]
    NoCluster(String),
    /// The request target after a rewrite is not a valid URI.
    #[error("invalid request target")]
    InvalidTarget,
    /// The request's Host, or the one a rewrite set, is not a valid host.
    #[error("invalid Host")]
    InvalidHost,
    /// The host cannot be an HTTP/2 `:authority`.
    #[error("invalid Host for an HTTP/2 upstream")]
    InvalidH2Host,
    /// The request's body broke off, or its framing (chunks) was malformed: the client's
    /// fault, never charged to the endpoint nor retried. The connection cannot go on.
    #[error("request body malformed or ended early")]
    RequestBody,
    /// The cluster's `max_requests` are in flight.
    #[error("upstream overflow: too many requests in flight")]
    TooManyRequests,
    /// The cluster's connections and its queue of pending requests are full.
    #[error("upstream overflow: no connection free and too many requests waiting for one")]
    NoConnectionFree,
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("upstream connect error: {0}")]
    Connect(SendError),
    #[error("upstream reset: {0}")]
    Reset(SendError),
    /// The route's timeout or the per-try timeout of the last try fired.
    #[error("upstream request timeout")]
    Timeout,
    /// Inbound: a path that cannot be normalized (`%2F`, `..` above the root, and the like).
    #[error("malformed path: {0}")]
    MalformedPath(String),
    /// The connection's filter chain left the config: nothing on it is served any more.
    #[error("this connection's filter chain was removed: reconnect")]
    ChainRemoved,
    #[error("RBAC: access denied")]
    Denied,
    #[error("local_rate_limited")]
    RateLimited { retry_after: Duration },
    /// The route's fault injection aborted the request (after delaying it, if `delayed`).
    /// A gRPC request (`grpc`) is answered as gRPC, whatever the code, as Envoy does.
    #[error("fault filter abort")]
    FaultAbort {
        code: AbortCode,
        delayed: bool,
        grpc: bool,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError as E;
        match self {
            E::MissingHost
            | E::DuplicateHost
            | E::HostMismatch
            | E::UserInfo
            | E::InvalidTarget
            | E::InvalidHost
            | E::InvalidH2Host
            | E::RequestBody
            | E::MalformedPath(_) => StatusCode::BAD_REQUEST,
            E::Denied => StatusCode::FORBIDDEN,
            E::NoRoute(_) => StatusCode::NOT_FOUND,
            E::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            E::AllWeightsZero => StatusCode::INTERNAL_SERVER_ERROR,
            E::Reset(_) => StatusCode::BAD_GATEWAY,
            E::Timeout => StatusCode::GATEWAY_TIMEOUT,
            E::FaultAbort { code, grpc, .. } => match code {
                AbortCode::Http(s) if !grpc => {
                    StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                }
                _ => StatusCode::OK,
            },
            E::NoValidSvid
            | E::NoConfig
            | E::NoRouteConfig(_)
            | E::NoCluster(_)
            | E::TooManyRequests
            | E::NoConnectionFree
            | E::NoHealthyUpstream
            | E::Connect(_)
            | E::ChainRemoved
            | E::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Envoy's response flag for it, `-` for none.
    pub fn flag(&self) -> &'static str {
        use ProxyError as E;
        match self {
            E::NoConfig | E::NoRouteConfig(_) | E::NoRoute(_) | E::ChainRemoved => "NR",
            E::NoCluster(_) => "NC",
            E::TooManyRequests | E::NoConnectionFree => "UO",
            // Envoy's overload manager.
            E::Overloaded => "OM",
            E::NoHealthyUpstream => "UH",
            E::Connect(_) => "UF",
            E::Reset(_) => "UC",
            E::Timeout => "UT",
            E::MalformedPath(_) | E::RequestBody => "DPE",
            E::Denied => "RBAC",
            E::RateLimited { .. } => "RL",
            // Envoy's: fault injected, after a delay injected.
            E::FaultAbort { delayed: false, .. } => "FI",
            E::FaultAbort { delayed: true, .. } => "DI,FI",
            E::NoValidSvid
            | E::MissingHost
            | E::DuplicateHost
            | E::HostMismatch
            | E::UserInfo
            | E::AllWeightsZero
            | E::InvalidTarget
            | E::InvalidHost
            | E::InvalidH2Host => "-",
        }
    }

    /// The answer to send, with its flag noted on the exchange.
    pub fn respond(self, ex: &mut Exchange) -> Response<Body> {
        let flag = self.flag();
        if flag != "-" {
            ex.flags = flag;
        }
        debug!(error = %self, flag, "answered by the proxy");
        self.response()
    }

    /// The answer: the message as plain text, marked as the proxy's own.
    pub fn response(&self) -> Response<Body> {
        let body = match self {
            // Envoy's fault filter answers gRPC trailers only, and HTTP with its bare message.
            ProxyError::FaultAbort { grpc: true, .. } => empty(),
            ProxyError::FaultAbort { .. } => full(Bytes::from(self.to_string())),
            _ => full(Bytes::from(format!("{self}\n"))),
        };
        let mut r = Response::new(body);
        *r.status_mut() = self.status();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert(MARK, HeaderValue::from_static("local"));
        match self {
            ProxyError::TooManyRequests | ProxyError::NoConnectionFree => {
                h.insert(MARK, HeaderValue::from_static("overflow"));
            }
            ProxyError::Overloaded => {
                // The client is to go elsewhere: an HTTP/1.1 connection ends with the answer.
                h.insert(MARK, HeaderValue::from_static("overloaded"));
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::ChainRemoved | ProxyError::RequestBody => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::FaultAbort {
                code, grpc: true, ..
            } => {
                // A trailers-only gRPC answer, as Envoy's fault filter sends it.
                let status = match code {
                    AbortCode::Grpc(s) => *s,
                    AbortCode::Http(s) => grpc_status_of_http(*s),
                };
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert("grpc-status", HeaderValue::from(status));
                h.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
            }
            ProxyError::RateLimited { retry_after } => {
                h.insert(
                    header::RETRY_AFTER,
                    crate::policy::retry_after_secs(*retry_after).into(),
                );
            }
            _ => {}
        }
        r
    }
}

/// The gRPC status for an HTTP status, as gRPC's HTTP mapping (and Envoy) give it.
fn grpc_status_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

impl From<SendError> for ProxyError {
    /// A failed last try.
    fn from(e: SendError) -> Self {
        match e {
            SendError::Overflow => ProxyError::NoConnectionFree,
            e if e.is_connect() => ProxyError::Connect(e),
            e => ProxyError::Reset(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_their_status_flag_and_headers() {
        let r = ProxyError::RateLimited {
            retry_after: Duration::from_millis(1500),
        }
        .response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[MARK], "local");
        let r = ProxyError::TooManyRequests.response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[MARK], "overflow");
        assert_eq!(ProxyError::TooManyRequests.flag(), "UO");
        let r = ProxyError::ChainRemoved.response();
        assert_eq!(r.headers()[header::CONNECTION], "close");
        assert_eq!(ProxyError::MissingHost.flag(), "-");
        assert_eq!(ProxyError::Timeout.status(), 504);
        let abort = |code, grpc| ProxyError::FaultAbort {
            code,
            delayed: true,
            grpc,
        };
        let r = abort(AbortCode::Http(503), false).response();
        assert_eq!(
            (r.status(), &r.headers()[header::CONTENT_TYPE]),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                &HeaderValue::from_static("text/plain; charset=utf-8")
            )
        );
        assert_eq!(abort(AbortCode::Http(503), false).flag(), "DI,FI");
        // A gRPC request is answered as gRPC, trailers only, whatever the code.
        let r = abort(AbortCode::Http(503), true).response();
        assert_eq!(
            (r.status(), &r.headers()["grpc-status"]),
            (StatusCode::OK, &HeaderValue::from(14))
        );
        let r = abort(AbortCode::Grpc(4), true).response();
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
        // And a gRPC status on plain HTTP is a 200, as Envoy sends it.
        assert_eq!(abort(AbortCode::Grpc(4), false).status(), StatusCode::OK);
    }
}
