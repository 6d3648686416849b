//! Who may read the controller's admin server beyond `/metrics`, `/ready` and `/live` (which
//! scrapes and probes reach on the pod's address): the debug API under `/debug/` and the graph
//! page map every route, policy, identity and live edge of the mesh.
//!
//! - In a cluster ([`Access::Kubernetes`]): a caller that presents a bearer token is judged by
//!   it: a TokenReview must authenticate it for the audience `mesh-controller` (`kubectl
//!   create token SA --audience mesh-controller`, or a projected token; a token of the API
//!   server's own audience is refused, so callers need not send that key, in plaintext, to
//!   15014) and a
//!   SubjectAccessReview must allow its user `get` on `debug` in API group `mesh.dev` in the
//!   controller's namespace (the chart's ClusterRole `mesh-reader`, bound there). A caller
//!   without a token is served only from the pod's loopback: `kubectl port-forward` and
//!   `kubectl exec` land there, and cluster RBAC decides who may use them (`pods/portforward`,
//!   `pods/exec` in the control plane's namespace). So any other pod gets 401, as istiod keeps
//!   its debug endpoints to localhost or a token.
//! - Without Kubernetes (the local mesh, [`Access::Loopback`]): loopback callers only; there
//!   is no API server to check a token with.
//!
//! A loopback caller without a token must also name the server by an IP address or
//! `localhost` (`Host`): a web page whose own name is made to resolve to 127.0.0.1 (DNS
//! rebinding) sends its name, and is refused.
//!
//! Decisions are kept for [`CACHED_FOR`] per token (a graph page polls), keyed by the token's
//! SHA-256, for at most [`CACHED_TOKENS`] tokens; tokens longer than [`MAX_TOKEN`] are refused
//! unread; at most [`CONCURRENT_REVIEWS`] reviews are asked at once, each within
//! [`REVIEW_TIMEOUT`], so callers with made-up tokens cannot flood the API server or the
//! controller's memory.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use mesh_api::consts::identity::{
    CONTROLLER_AUDIENCE, DEBUG_GROUP, DEBUG_RESOURCE, DEBUG_VERB, READER_ROLE,
};

/// How long a token's decision is kept.
pub const CACHED_FOR: Duration = Duration::from_secs(10);
/// Reviews asked of the API server at once.
pub const CONCURRENT_REVIEWS: usize = 4;
/// Tokens whose decisions are kept.
pub const CACHED_TOKENS: usize = 1024;
/// The longest token read (a service account token is about 1 KiB).
pub const MAX_TOKEN: usize = 8 * 1024;
/// How long a review may take, and a caller may wait for its turn to ask one.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The paths everyone who reaches the port may read.
pub fn is_open(path: &str) -> bool {
    matches!(path, "/metrics" | "/ready" | "/live")
}

/// Who may read the debug API.
#[derive(Clone, Debug)]
pub enum Access {
    /// No API server: loopback callers only.
    Loopback,
    /// Loopback callers without a token, and callers whose token cluster RBAC allows.
    Kubernetes(Arc<Reviewer>),
}

/// What a caller gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// 401: no token where one is needed, or one the API server does not authenticate.
    Unauthenticated(String),
    /// 403: a caller that may not read the mesh.
    Forbidden(String),
    /// 503: the API server could not be asked in time; the caller may try again.
    Unavailable(String),
}

/// What a request says about its caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller<'a> {
    /// The connection's peer; `None`: unknown.
    pub peer: Option<SocketAddr>,
    /// `Host`, as sent.
    pub host: Option<&'a str>,
    pub authorization: Option<&'a HeaderValue>,
}

impl Caller<'_> {
    /// On the loopback, naming the server as a local program does (an address or
    /// `localhost`, any port; no `Host` at all, as HTTP/1.0 allows).
    fn is_local(&self) -> bool {
        let loopback = self
            .peer
            .is_some_and(|p| p.ip().to_canonical().is_loopback());
        let named_locally = self.host.is_none_or(|h| {
            let name = match h.rsplit_once(':') {
                // `[::1]:15014`, `127.0.0.1:15014`, `localhost:15014`; `::1` has colons too.
                Some((n, port))
                    if port.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') =>
                {
                    n
                }
                _ => h,
            };
            let name = name.trim_start_matches('[').trim_end_matches(']');
            name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
        });
        loopback && named_locally
    }
}

/// The `Authorization` header, when it is not `Bearer <token>` of a readable length.
#[derive(Debug, thiserror::Error)]
enum BadAuthorization {
    #[error("the authorization header is not `Bearer <token>`")]
    NotBearer,
    #[error("the bearer token is longer than {MAX_TOKEN} bytes: it is not read")]
    TooLong,
}

impl Access {
    /// In a cluster: reviews with `client`, for access in namespace `namespace`.
    pub fn kubernetes(client: kube::Client, namespace: &str) -> Self {
        Self::Kubernetes(Arc::new(Reviewer {
            client,
            namespace: namespace.to_owned(),
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(CONCURRENT_REVIEWS),
        }))
    }

    /// For the startup log.
    pub fn describe(&self) -> String {
        match self {
            Self::Loopback => "loopback callers only (no Kubernetes API to check tokens)".into(),
            Self::Kubernetes(r) => format!(
                "loopback callers without a token, and tokens for audience {CONTROLLER_AUDIENCE} \
                 whose user RBAC allows {DEBUG_VERB} on {DEBUG_RESOURCE}.{DEBUG_GROUP} in \
                 namespace {}",
                r.namespace
            ),
        }
    }

    /// What `caller` gets at `now`.
    pub async fn judge(&self, caller: Caller<'_>, now: Instant) -> Verdict {
        match self {
            Self::Loopback if caller.is_local() => Verdict::Allowed,
            Self::Loopback => Verdict::Forbidden(
                "the controller's debug API is served to loopback callers only, naming it by \
                 address or localhost: this controller reads no Kubernetes API to check a \
                 caller's token with"
                    .into(),
            ),
            Self::Kubernetes(reviewer) => match bearer(caller.authorization) {
                Err(e) => Verdict::Unauthenticated(e.to_string()),
                Ok(Some(token)) => reviewer.review(token, now).await,
                Ok(None) if caller.is_local() => Verdict::Allowed,
                Ok(None) => Verdict::Unauthenticated(format!(
                    "the controller's debug API needs a bearer token for audience \
                     {CONTROLLER_AUDIENCE} that the Kubernetes API server authenticates and \
                     whose user may {DEBUG_VERB} {DEBUG_RESOURCE} in API group {DEBUG_GROUP} in \
                     namespace {} (the ClusterRole {READER_ROLE}, bound there), or a caller on \
                     the pod's loopback (kubectl port-forward, as meshctl does); /metrics, \
                     /ready and /live are open",
                    reviewer.namespace
                )),
            },
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; `Ok(None)` without the header.
fn bearer(authorization: Option<&HeaderValue>) -> Result<Option<&str>, BadAuthorization> {
    let Some(v) = authorization else {
        return Ok(None);
    };
    if v.len() > MAX_TOKEN + "Bearer ".len() {
        return Err(BadAuthorization::TooLong);
    }
    let v = v.to_str().map_err(|_| BadAuthorization::NotBearer)?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(BadAuthorization::NotBearer),
    }
}

/// A token's SHA-256: what the cache keeps instead of the token.
type TokenHash = [u8; 32];

fn hash(token: &str) -> TokenHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// Asks the API server who a token is and whether RBAC lets it read the mesh.
pub struct Reviewer {
    client: kube::Client,
    namespace: String,
    /// Token hash to (decided at, decision).
    cache: Mutex<HashMap<TokenHash, (Instant, Verdict)>>,
    reviews: tokio::sync::Semaphore,
}

impl std::fmt::Debug for Reviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviewer")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Reviewer {
    fn cached(&self, key: &TokenHash, now: Instant) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| now.saturating_duration_since(*at) < CACHED_FOR)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `verdict` for `key`; when full, the expired go first, then the oldest refusal,
    /// then the oldest.
    fn keep(&self, key: TokenHash, verdict: Verdict, now: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHED_TOKENS && !cache.contains_key(&key) {
            cache.retain(|_, (at, _)| now.saturating_duration_since(*at) < CACHED_FOR);
            // Refusals go before decisions that let a caller in, so made-up tokens push out
            // each other, not a reader's.
            if cache.len() >= CACHED_TOKENS
                && let Some(oldest) = cache
                    .iter()
                    .min_by_key(|(_, (at, v))| (*v == Verdict::Allowed, *at))
                    .map(|(k, _)| *k)
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (now, verdict));
    }

    /// Tokens whose decisions are kept now.
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    async fn review(&self, token: &str, now: Instant) -> Verdict {
        let key = hash(token);
        if let Some(v) = self.cached(&key, now) {
            return v;
        }
        // The semaphore is never closed: an error is the wait running out.
        let Ok(Ok(_permit)) = tokio::time::timeout(REVIEW_TIMEOUT, self.reviews.acquire()).await
        else {
            return Verdict::Unavailable(format!(
                "the controller is reviewing {CONCURRENT_REVIEWS} other tokens; try again"
            ));
        };
        // Another caller with the same token may have been answered while this one waited.
        if let Some(v) = self.cached(&key, now) {
            return v;
        }
        let verdict = match tokio::time::timeout(REVIEW_TIMEOUT, self.ask(token)).await {
            Ok(v) => v,
            Err(_) => Verdict::Unavailable(format!(
                "the Kubernetes API server did not review the token in {} s",
                REVIEW_TIMEOUT.as_secs()
            )),
        };
        if !matches!(verdict, Verdict::Unavailable(_)) {
            self.keep(key, verdict.clone(), now);
        }
        verdict
    }

    async fn ask(&self, token: &str) -> Verdict {
        use mesh_api::token_review::{ReviewError, review_token};
        let user = match review_token(&self.client, token, CONTROLLER_AUDIENCE).await {
            Ok(user) => user,
            Err(ReviewError::Backend(e)) => {
                return Verdict::Unavailable(format!("reviewing the token: {e}"));
            }
            Err(refused) => {
                return Verdict::Unauthenticated(format!(
                    "token refused by the Kubernetes API server: {refused} (a token for the \
                     debug API is bound to audience {CONTROLLER_AUDIENCE}: kubectl create token \
                     SA --audience {CONTROLLER_AUDIENCE})"
                ));
            }
        };
        let name = user.username.clone().unwrap_or_default();
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(self.namespace.clone()),
                    verb: Some(DEBUG_VERB.into()),
                    group: Some(DEBUG_GROUP.into()),
                    resource: Some(DEBUG_RESOURCE.into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let decided = match kube::Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&kube::api::PostParams::default(), &sar)
            .await
        {
            Ok(a) => a.status.unwrap_or_default(),
            Err(e) => return Verdict::Unavailable(format!("reviewing {name:?}'s access: {e}")),
        };
        if decided.allowed {
            return Verdict::Allowed;
        }
        let why = decided
            .reason
            .filter(|r| !r.is_empty())
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        Verdict::Forbidden(format!(
            "user {name:?} may not {DEBUG_VERB} {DEBUG_RESOURCE} in API group {DEBUG_GROUP} in \
             namespace {ns}{why}: bind the ClusterRole {READER_ROLE} to it there (kubectl create \
             rolebinding NAME --clusterrole {READER_ROLE} -n {ns} ...)",
            ns = self.namespace
        ))
    }
}

/// The admin server's gate: open paths pass, the rest need what [`Access::judge`] allows.
pub async fn guard(State(access): State<Access>, req: Request, next: Next) -> Response {
    if is_open(req.uri().path()) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let caller = Caller {
        peer: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0),
        // A `Host` that is not text names nothing local; HTTP/2 names the server in the URI.
        host: match headers.get(header::HOST) {
            Some(h) => Some(h.to_str().unwrap_or("")),
            None => req.uri().authority().map(|a| a.as_str()),
        },
        authorization: headers.get(header::AUTHORIZATION),
    };
    match access.judge(caller, Instant::now()).await {
        Verdict::Allowed => next.run(req).await,
        Verdict::Unauthenticated(m) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"mesh-controller\"")],
            format!("{m}\n"),
        )
            .into_response(),
        Verdict::Forbidden(m) => (StatusCode::FORBIDDEN, format!("{m}\n")).into_response(),
        Verdict::Unavailable(m) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{m}\n")).into_response()
        }
    }
}

#[cfg(test)]
#[path = "access_tests.rs"]
mod tests;
