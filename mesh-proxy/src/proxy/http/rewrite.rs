//! URL changes: the route's path rewrite (prefix or regex) and Host rewrite, and the request
//! target each upstream protocol is sent.

use http::header::{self, HeaderValue};
use http::{Uri, request};

use super::super::error::ProxyError;
use crate::state::route::Forward;

/// Where a forwarded request goes, after the route's URL changes.
pub(super) struct Destination {
    /// The origin-form target, for HTTP/1.1.
    pub origin: Uri,
    /// The host, for HTTP/2's `:authority`.
    pub host: String,
    /// The `Host` header for HTTP/1.1: the client's unless rewritten or missing.
    pub host_value: HeaderValue,
}

impl Destination {
    /// `host`: the host the client named. The request's headers have had their changes.
    pub fn new(f: &Forward, mut host: String, parts: &request::Parts) -> Result<Self, ProxyError> {
        if let Some(h) = &f.host_rewrite {
            host = h.clone();
        }
        // The client's own target when nothing rewrites it (no copy).
        let rewritten = rewrite_path(f, parts.uri.path());
        let origin: Uri = match (&rewritten, parts.uri.scheme()) {
            (None, None) => parts.uri.clone(),
            _ => {
                let path = rewritten.as_deref().unwrap_or(parts.uri.path());
                let target = match parts.uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                Uri::try_from(target).map_err(|_| ProxyError::InvalidTarget)?
            }
        };
        let host_value = match parts.headers.get(header::HOST) {
            Some(v) if f.host_rewrite.is_none() => v.clone(),
            _ => HeaderValue::from_str(&host).map_err(|_| ProxyError::InvalidHost)?,
        };
        Ok(Destination {
            origin,
            host,
            host_value,
        })
    }

    /// The absolute-form target, for HTTP/2.
    pub fn absolute(&self) -> Result<Uri, ProxyError> {
        let pq = self.origin.path_and_query().map_or("/", |p| p.as_str());
        Uri::try_from(format!("http://{}{pq}", self.host)).map_err(|_| ProxyError::InvalidH2Host)
    }
}

/// The path after a route's rewrite, if it has one.
fn rewrite_path(f: &Forward, path: &str) -> Option<String> {
    if let (Some(to), Some(prefix)) = (&f.prefix_rewrite, &f.matched_prefix) {
        return Some(replace_prefix(path, prefix, to));
    }
    if let Some((re, sub)) = &f.regex_rewrite {
        return Some(re.replace_all(path, sub.as_str()).into_owned());
    }
    None
}

/// `path` with its `prefix` replaced by `to`; `/` rather than nothing.
pub(super) fn replace_prefix(path: &str, prefix: &str, to: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or("");
    let out = format!("{to}{rest}");
    if out.is_empty() { "/".into() } else { out }
}
