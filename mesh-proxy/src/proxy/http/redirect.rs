//! Answers a route makes without an upstream: redirects and direct responses.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Uri};

use super::super::upstream::{Body, empty, full};
use super::rewrite::replace_prefix;
use crate::state::route::Redirect;

/// A route's direct response.
pub(super) fn direct(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body.to_owned())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// A route's redirect of a request that came as `scheme` to `host` (as the client named it)
/// and `uri`.
pub(super) fn redirect(r: &Redirect, scheme: &str, host: &str, uri: &Uri) -> Response<Body> {
    let (orig_host, orig_port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || host.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    };
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let host = r.host.as_deref().unwrap_or(orig_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => orig_port,
    };
    let port = port.filter(|p| !matches!((scheme, p), ("http", 80) | ("https", 443)));
    let path = match (&r.path, &r.prefix_rewrite, &r.matched_prefix) {
        (Some(p), _, _) => p.clone(),
        (None, Some(to), Some(prefix)) => replace_prefix(uri.path(), prefix, to),
        _ => uri.path().to_string(),
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let location = match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects() {
        let r = Redirect {
            scheme: Some("https".into()),
            host: None,
            port: None,
            path: None,
            prefix_rewrite: Some("/new".into()),
            status: 301,
            matched_prefix: Some("/old".into()),
        };
        let resp = redirect(
            &r,
            "http",
            "shop.example:8080",
            &Uri::from_static("/old/cart?id=1"),
        );
        assert_eq!(resp.status(), 301);
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://shop.example/new/cart?id=1"
        );
        let r = Redirect {
            scheme: None,
            host: Some("other".into()),
            port: Some(8443),
            path: Some("/x".into()),
            prefix_rewrite: None,
            status: 302,
            matched_prefix: None,
        };
        let resp = redirect(&r, "http", "shop:80", &Uri::from_static("/y"));
        assert_eq!(resp.headers()[header::LOCATION], "http://other:8443/x");
    }

    #[test]
    fn a_redirect_without_a_scheme_keeps_the_requests() {
        let r = Redirect {
            scheme: None,
            host: Some("www.example.com".into()),
            port: None,
            path: None,
            prefix_rewrite: None,
            matched_prefix: None,
            status: 302,
        };
        let resp = redirect(&r, "https", "example.com:8443", &Uri::from_static("/a?b=1"));
        assert_eq!(
            resp.headers()[header::LOCATION],
            "https://www.example.com:8443/a?b=1"
        );
        let resp = redirect(&r, "https", "example.com", &Uri::from_static("/"));
        assert_eq!(resp.headers()[header::LOCATION], "https://www.example.com/");
    }
}
