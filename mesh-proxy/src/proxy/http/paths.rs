//! What a chain's HTTP connection manager does to a request before it is routed, outside the
//! inbound side (whose path `super::super::guard` normalizes for policies): the path rules of
//! a gateway (escaped slashes, normalization) and, with `use_remote_address`, the forwarded
//! headers that tell the backend who the client is.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};

use super::super::error::ProxyError;
use super::super::upstream::{Body, empty};
use crate::state::{EscapedSlashes, PathRules};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Applies `rules` to the request's path: `Some` is the answer instead of routing it (a
/// redirect to the path without escaped slashes); a path that cannot be normalized is 400.
pub(super) fn apply<B>(
    rules: PathRules,
    req: &mut Request<B>,
) -> Result<Option<Response<Body>>, ProxyError> {
    // A sidecar's outbound chains ask for nothing: no scan of the path per request.
    if rules == PathRules::default() {
        return Ok(None);
    }
    let path = req.uri().path();
    let escaped = has_escaped_slash(path);
    let mut out: Cow<'_, str> = Cow::Borrowed(path);
    if escaped {
        match rules.escaped_slashes {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => {
                return Err(ProxyError::MalformedPath(
                    mesh_api::path::PathError::EscapedSlash.to_string(),
                ));
            }
            EscapedSlashes::UnescapeAndRedirect | EscapedSlashes::UnescapeAndForward => {
                out = Cow::Owned(unescape_slashes(path));
            }
        }
    }
    if rules.normalize {
        out = match mesh_api::path::normalize(&out) {
            Ok(p) => Cow::Owned(p.into_owned()),
            Err(e) => return Err(ProxyError::MalformedPath(e.to_string())),
        };
    }
    if out == path {
        return Ok(None);
    }
    let target = match req.uri().query() {
        Some(q) => format!("{out}?{q}"),
        None => out.into_owned(),
    };
    if escaped && rules.escaped_slashes == EscapedSlashes::UnescapeAndRedirect {
        // As Envoy: the client asks again for the path it means, so every hop sees that one.
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        let location = HeaderValue::from_str(&target)
            .map_err(|_| ProxyError::MalformedPath(format!("{target:?} is not a valid path")))?;
        resp.headers_mut().insert(header::LOCATION, location);
        return Ok(Some(resp));
    }
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|_| ProxyError::MalformedPath(format!("{target:?} is not a valid path")))?,
    );
    *req.uri_mut() = http::Uri::from_parts(parts)
        .map_err(|_| ProxyError::MalformedPath(format!("{target:?} is not a valid path")))?;
    Ok(None)
}

/// `%2F` or `%5C`, in either case.
fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f')
            || w[0] == b'%' && w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c')
    })
}

/// `%2F` and `%5C` decoded to `/` and `\`, nothing else.
fn unescape_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3);
        match code.map(str::to_ascii_uppercase).as_deref() {
            Some("2F") => out.push('/'),
            Some("5C") => out.push('\\'),
            _ => {
                out.push('%');
                rest = &rest[i + 1..];
                continue;
            }
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    out
}

/// The client is the connection's peer `src` (`use_remote_address`): its address is appended
/// to `x-forwarded-for`, and `x-forwarded-proto` is the scheme it came over.
pub(super) fn forwarded(src: Option<std::net::SocketAddr>, https: bool, headers: &mut HeaderMap) {
    if let Some(src) = src {
        let ip = src.ip().to_canonical().to_string();
        // Every line the client sent, in order, then its address (as Envoy appends).
        let prior: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        let joined = if prior.is_empty() {
            ip
        } else {
            format!("{}, {ip}", prior.join(", "))
        };
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rules: PathRules, target: &str) -> Result<(String, Option<String>), ProxyError> {
        let mut req = Request::builder().uri(target).body(()).expect("request");
        let answer = apply(rules, &mut req)?;
        let location = answer.map(|r| {
            assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
            r.headers()[header::LOCATION]
                .to_str()
                .expect("ascii")
                .to_string()
        });
        Ok((req.uri().to_string(), location))
    }

    #[test]
    fn escaped_slashes_as_the_chain_says() {
        let rules = |escaped_slashes| PathRules {
            normalize: true,
            escaped_slashes,
        };
        let redirect = rules(EscapedSlashes::UnescapeAndRedirect);
        assert_eq!(
            run(redirect, "/admin%2fx/../y?q=1").expect("redirected"),
            (
                "/admin%2fx/../y?q=1".to_string(),
                Some("/admin/y?q=1".to_string())
            )
        );
        assert_eq!(
            run(redirect, "//a/./b%41").expect("normalized"),
            ("/a/bA".to_string(), None),
            "no escaped slash: normalized and forwarded"
        );
        assert_eq!(
            run(rules(EscapedSlashes::UnescapeAndForward), "/a%5Cb").expect("forwarded"),
            ("/a/b".to_string(), None)
        );
        assert!(matches!(
            run(rules(EscapedSlashes::Reject), "/a%2Fb"),
            Err(ProxyError::MalformedPath(_))
        ));
        let keep = PathRules::default();
        assert_eq!(
            run(keep, "/a%2Fb//c").expect("kept"),
            ("/a%2Fb//c".to_string(), None),
            "no rules: the path goes as it came"
        );
        assert!(matches!(
            run(redirect, "/a/%00"),
            Err(ProxyError::MalformedPath(_))
        ));
    }

    #[test]
    fn the_client_is_appended_to_x_forwarded_for_and_the_scheme_said() {
        let client = Some("203.0.113.7:5000".parse().expect("addr"));
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("ftp"));
        forwarded(client, true, &mut h);
        assert_eq!(
            h[X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 203.0.113.7"
        );
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        let mut h = HeaderMap::new();
        forwarded(client, false, &mut h);
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
    }

    #[test]
    fn only_escaped_slashes_are_unescaped() {
        assert_eq!(unescape_slashes("/a%2F%2fb%5c%41%"), "/a//b\\%41%");
        assert!(has_escaped_slash("/x%5c"));
        assert!(!has_escaped_slash("/x%25%2"));
    }
}
