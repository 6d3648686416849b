//! Session affinity: the key a route's `hash_policy` computes from a request, for a cluster
//! balanced by ring hash. A header's value, a cookie's (set on the response when the request
//! had none and the policy gives it a lifetime), or the client's address; several policies'
//! keys combine as Envoy combines them, and a `terminal` one that yields a key ends the list.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, header};

use crate::balance::hash64;
use crate::state::route::HashPolicy;

/// A request's hash, and the cookie to set on its response.
#[derive(Debug, Default)]
pub struct Affinity {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

pub fn affinity(policies: &[HashPolicy], headers: &HeaderMap, src: Option<SocketAddr>) -> Affinity {
    let mut out = Affinity::default();
    for p in policies {
        let key: Option<u64> = match p {
            HashPolicy::Header { name, .. } => {
                // Every value of the header, in order.
                let mut values = headers.get_all(name).iter().peekable();
                values.peek().is_some().then(|| {
                    let joined: Vec<&[u8]> = values.map(HeaderValue::as_bytes).collect();
                    hash64(&joined.concat())
                })
            }
            HashPolicy::Cookie {
                name, ttl, path, ..
            } => match cookie(headers, name) {
                Some(v) => Some(hash64(v.as_bytes())),
                None => ttl.map(|ttl| {
                    let value = format!("{:016x}", rand::random::<u64>());
                    // A zero ttl makes a session cookie, as Envoy's; part of a second counts
                    // as a second.
                    let mut c = format!("{name}={value}");
                    if !ttl.is_zero() {
                        c.push_str(&format!("; Max-Age={}", ttl.as_millis().div_ceil(1000)));
                    }
                    if let Some(path) = path {
                        c.push_str(&format!("; Path={path}"));
                    }
                    c.push_str("; HttpOnly");
                    out.set_cookie = HeaderValue::from_str(&c).ok();
                    hash64(value.as_bytes())
                }),
            },
            HashPolicy::SourceIp { .. } => src.map(|a| hash64(a.ip().to_string().as_bytes())),
        };
        if let Some(k) = key {
            out.hash = Some(match out.hash {
                Some(h) => h.rotate_left(1) ^ k,
                None => k,
            });
            if p.terminal() {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn keys_come_from_headers_cookies_and_the_client() {
        let by_header = [HashPolicy::Header {
            name: http::HeaderName::from_static("x-user"),
            terminal: false,
        }];
        let a = affinity(&by_header, &headers(&[("x-user", "ann")]), None).hash;
        let b = affinity(&by_header, &headers(&[("x-user", "bob")]), None).hash;
        assert!(a.is_some() && a != b);
        assert_eq!(
            a,
            affinity(&by_header, &headers(&[("x-user", "ann")]), None).hash
        );
        assert_eq!(affinity(&by_header, &headers(&[]), None).hash, None);

        let by_cookie = [HashPolicy::Cookie {
            name: "sticky".into(),
            ttl: Some(Duration::from_secs(60)),
            path: Some("/".into()),
            terminal: false,
        }];
        let first = affinity(&by_cookie, &headers(&[]), None);
        let set = first.set_cookie.expect("a new cookie");
        let set = set.to_str().expect("ascii");
        assert!(set.ends_with("; Max-Age=60; Path=/; HttpOnly"), "{set}");
        let value = set
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v)
            .expect("value");
        // The client sends it back: same key, and no new cookie.
        let again = affinity(
            &by_cookie,
            &headers(&[("cookie", &format!("a=1; sticky={value}"))]),
            None,
        );
        assert_eq!(again.hash, first.hash);
        assert!(again.set_cookie.is_none());

        let by_ip = [HashPolicy::SourceIp { terminal: true }];
        let src = |s: &str| Some(s.parse::<SocketAddr>().expect("addr"));
        assert_eq!(
            affinity(&by_ip, &headers(&[]), src("10.0.0.1:1000")).hash,
            affinity(&by_ip, &headers(&[]), src("10.0.0.1:2000")).hash
        );
    }
}
