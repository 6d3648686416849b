//! URL changes: the route's path rewrite (prefix or regex) and Host rewrite, and the request
//! target each upstream protocol is sent.

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Uri, request};

use super::super::error::ProxyError;
use crate::state::route::Forward;

/// Where a forwarded request goes, after the route's URL changes. Each try builds its target
/// from this, sharing the client's bytes where nothing changed them.
pub(super) struct Destination {
    /// The origin-form target, for HTTP/1.1.
    pub origin: Uri,
    /// The client's absolute-form `http` target (HTTP/2's, or an HTTP/1.1 proxy request's),
    /// when nothing changed it.
    absolute: Option<Uri>,
    /// The host, for HTTP/2's `:authority`.
    pub host: String,
    /// The rewritten host, else the client's `Host` header; `None` when the client sent
    /// none (HTTP/2): then it is made from `host` when needed.
    host_header: Option<HeaderValue>,
}

impl Destination {
    /// `host`: the host the client named. The request's headers have had their changes.
    pub fn new(f: &Forward, mut host: String, parts: &request::Parts) -> Result<Self, ProxyError> {
        if let Some(h) = &f.host_rewrite {
            host = h.clone();
        }
        let uri = &parts.uri;
        let rewritten = rewrite_path(f, uri.path());
        let origin: Uri = match (&rewritten, uri.scheme()) {
            // The client's own target when nothing rewrites it (no copy).
            (None, None) => uri.clone(),
            (None, Some(_)) => uri
                .path_and_query()
                .cloned()
                .map_or_else(|| Uri::from_static("/"), Uri::from),
            (Some(path), _) => {
                let target = match uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                Uri::try_from(target).map_err(|_| ProxyError::InvalidTarget)?
            }
        };
        let absolute = (rewritten.is_none()
            && uri.scheme() == Some(&Scheme::HTTP)
            && uri.authority().is_some_and(|a| a.as_str() == host)
            && uri.path_and_query().is_some())
        .then(|| uri.clone());
        // A rewritten host is checked here, before anything is sent; one from the client's
        // target is a valid header value already.
        let host_header = match (&f.host_rewrite, parts.headers.get(header::HOST)) {
            (Some(h), _) => Some(HeaderValue::from_str(h).map_err(|_| ProxyError::InvalidHost)?),
            (None, v) => v.cloned(),
        };
        Ok(Destination {
            origin,
            absolute,
            host,
            host_header,
        })
    }

    /// The absolute-form target, for HTTP/2.
    pub fn absolute(&self) -> Result<Uri, ProxyError> {
        if let Some(u) = &self.absolute {
            return Ok(u.clone());
        }
        let mut p = http::uri::Parts::default();
        p.scheme = Some(Scheme::HTTP);
        p.authority =
            Some(Authority::try_from(self.host.as_str()).map_err(|_| ProxyError::InvalidH2Host)?);
        p.path_and_query = Some(
            self.origin
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(p).map_err(|_| ProxyError::InvalidH2Host)
    }

    /// The `Host` header for HTTP/1.1: the client's unless rewritten or missing.
    pub fn host_value(&self) -> Result<HeaderValue, ProxyError> {
        match &self.host_header {
            Some(v) => Ok(v.clone()),
            None => HeaderValue::from_str(&self.host).map_err(|_| ProxyError::InvalidHost),
        }
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::proxy::http) fn forward(
        prefix: Option<(&str, &str)>,
        host: Option<&str>,
    ) -> Forward {
        Forward {
            backends: vec![],
            total_weight: 0,
            timeout: None,
            retry: None,
            hash: vec![],
            mirrors: vec![],
            prefix_rewrite: prefix.map(|(_, to)| to.into()),
            matched_prefix: prefix.map(|(from, _)| from.into()),
            regex_rewrite: None,
            host_rewrite: host.map(Into::into),
            draws: Default::default(),
        }
    }

    fn parts(uri: &str, host: Option<&str>) -> request::Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).expect("request").into_parts().0
    }

    pub(in crate::proxy::http) fn dest(
        f: &Forward,
        uri: &str,
        host: &str,
        header: Option<&str>,
    ) -> Destination {
        Destination::new(f, host.into(), &parts(uri, header)).expect("destination")
    }

    #[test]
    fn each_protocol_gets_its_target_form() {
        let plain = forward(None, None);
        // HTTP/1.1 in: origin form as sent, absolute form built for HTTP/2.
        let d = dest(&plain, "/a?b=1", "svc:80", Some("svc:80"));
        assert_eq!(d.origin, "/a?b=1");
        assert_eq!(
            d.absolute().expect("absolute target"),
            "http://svc:80/a?b=1"
        );
        assert_eq!(d.host_value().expect("host"), "svc:80");
        // HTTP/2 in: its absolute target goes on as it came; HTTP/1.1 gets the origin form
        // and a `Host` header made from `:authority`.
        let d = dest(&plain, "http://svc/a?b=1", "svc", None);
        assert_eq!(d.origin, "/a?b=1");
        assert_eq!(d.absolute().expect("absolute target"), "http://svc/a?b=1");
        assert_eq!(d.host_value().expect("host"), "svc");
        let d = dest(&plain, "http://svc", "svc", None);
        assert_eq!(d.origin, "/");
        assert_eq!(d.absolute().expect("absolute target"), "http://svc/");
    }

    #[test]
    fn rewrites_change_every_target_form() {
        let f = forward(Some(("/old", "/new")), Some("other"));
        for (uri, header) in [("/old/x?q", Some("svc")), ("http://svc/old/x?q", None)] {
            let d = dest(&f, uri, "svc", header);
            assert_eq!(d.origin, "/new/x?q");
            assert_eq!(
                d.absolute().expect("absolute target"),
                "http://other/new/x?q"
            );
            assert_eq!(d.host_value().expect("host"), "other");
        }
    }

    #[test]
    fn a_rewritten_host_that_is_no_host_is_refused() {
        let d = dest(&forward(None, Some("a/b")), "/", "svc", Some("svc"));
        assert!(matches!(d.absolute(), Err(ProxyError::InvalidH2Host)));
        let bad = Destination::new(
            &forward(None, Some("a\nb")),
            "svc".into(),
            &parts("/", None),
        );
        assert!(matches!(bad, Err(ProxyError::InvalidHost)));
    }
}
