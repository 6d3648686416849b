//! Header changes: the route config's levels (backend, route, virtual host, table) on the
//! request and the response, and the hop-by-hop headers no hop passes on.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Version};

use super::super::error::ProxyError;

use crate::state::RouteTable;
use crate::state::route::{Route, VirtualHost, WeightedBackend};

/// The config levels a request matched, for header changes (most specific first).
#[derive(Clone, Copy)]
pub(super) struct Levels<'a> {
    pub table: &'a RouteTable,
    pub vh: &'a VirtualHost,
    pub route: &'a Route,
}

impl Levels<'_> {
    /// The request's hop-by-hop headers go first, but those of an upgrade stay with it (so a
    /// client cannot name a header the route adds in `Connection` to drop it); then the
    /// header changes, least specific last so the route config has the final say (Envoy's
    /// default order).
    pub fn request(
        &self,
        backend: &WeightedBackend,
        h: &mut HeaderMap,
        version: Version,
        upgrade: bool,
    ) {
        let kept = upgrade.then(|| {
            (
                h.get(header::CONNECTION).cloned(),
                h.get(header::UPGRADE).cloned(),
            )
        });
        strip_hop_by_hop(h, version);
        if let Some((conn, up)) = kept {
            if let Some(c) = conn {
                h.insert(header::CONNECTION, c);
            }
            if let Some(u) = up {
                h.insert(header::UPGRADE, u);
            }
        }
        backend.headers.apply_request(h);
        self.route.headers.apply_request(h);
        self.vh.headers.apply_request(h);
        self.table.headers.apply_request(h);
    }

    /// The response's header changes: a forwarded response's (`backend` given) or one made
    /// here for the route (a redirect, a direct response).
    pub fn response(&self, backend: Option<&WeightedBackend>, h: &mut HeaderMap) {
        if let Some(b) = backend {
            b.headers.apply_response(h);
        }
        self.route.headers.apply_response(h);
        self.vh.headers.apply_response(h);
        self.table.headers.apply_response(h);
    }
}

/// The host the client named: the target's authority, else the `Host` header. Its hosts must
/// agree, so that no hop after this one reads another: one `Host` at most, and one in every
/// HTTP/1.1 request (RFC 9112, 3.2); a host that is a valid authority without user info
/// (RFC 9110, 4.2.4); over HTTP/2 a `Host` naming the `:authority`'s host and port (RFC
/// 9113, 8.3.1). An HTTP/1.1 absolute-form target's authority replaces its `Host`, as a
/// proxy must (RFC 9112, 3.2.2).
pub(super) fn host<B>(req: &mut Request<B>) -> Result<String, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err(ProxyError::DuplicateHost);
    }
    if first.is_none() && req.version() == Version::HTTP_11 {
        return Err(ProxyError::MissingHost);
    }
    let Some(a) = req.uri().authority() else {
        let h = first.ok_or(ProxyError::MissingHost)?;
        return checked(&Authority::try_from(h.as_bytes()).map_err(|_| ProxyError::InvalidHost)?)
            .map(str::to_string);
    };
    let named = checked(a)?.to_string();
    if req.version() >= Version::HTTP_2 {
        let default = default_port(req.uri().scheme());
        if first.is_some_and(|h| !same_host(a, h, default)) {
            return Err(ProxyError::HostMismatch);
        }
    } else if first.is_none_or(|h| h.as_bytes() != named.as_bytes()) {
        let v = HeaderValue::from_str(&named).map_err(|_| ProxyError::InvalidHost)?;
        req.headers_mut().insert(header::HOST, v);
    }
    Ok(named)
}

/// The authority's text, when it is a host a request may name: no user info, a non-empty
/// host (an IPv6 literal only in brackets) and a port of at most five digits that fits 16 bits,
/// or none. `http`'s `Authority` leaves host and port unchecked.
///
/// Plain loops over the bytes: it runs on every request, and `Authority::host` and `str`
/// searches cost several times as much.
fn checked(a: &Authority) -> Result<&str, ProxyError> {
    let text = a.as_str();
    let bytes = text.as_bytes();
    if bytes.contains(&b'@') {
        return Err(ProxyError::UserInfo);
    }
    // The host: an IPv6 literal through its `]`, else up to the first `:` (as
    // `Authority::host` takes it).
    let literal = bytes.first() == Some(&b'[');
    let host_len = if literal {
        bytes.iter().position(|&b| b == b']').map_or(0, |i| i + 1)
    } else {
        bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len())
    };
    let (host, port) = bytes.split_at(host_len);
    let port_ok = match port {
        [] | [b':'] => true,
        [b':', digits @ ..] => {
            digits.len() <= 5
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= u32::from(u16::MAX)
        }
        _ => false,
    };
    let host_ok = if literal {
        host.len() > 2
    } else {
        !host.is_empty() && !host.iter().any(|&b| b == b'[' || b == b']')
    };
    if !(host_ok && port_ok) {
        return Err(ProxyError::InvalidHost);
    }
    Ok(text)
}

fn default_port(scheme: Option<&Scheme>) -> u16 {
    if scheme == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    }
}

/// Whether a `Host` value names the authority's host (in any case) and port (`default` when
/// either leaves it out).
fn same_host(a: &Authority, host: &HeaderValue, default: u16) -> bool {
    Authority::try_from(host.as_bytes()).is_ok_and(|h| {
        checked(&h).is_ok()
            && h.host().eq_ignore_ascii_case(a.host())
            && h.port_u16().unwrap_or(default) == a.port_u16().unwrap_or(default)
    })
}

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Drops hop-by-hop headers, and those the `Connection` header names. `te: trailers` stays:
/// gRPC needs it. Nothing is allocated for a message with at most one `Connection` line: a
/// response from a keep-alive server names `keep-alive` here on every request.
///
/// A message that came over HTTP/2 (`version`) can only have `proxy-authorization` of them:
/// the h2 codec refuses one with a connection-specific header (RFC 9113, 8.2.2: those of
/// `HOP_BY_HOP` but `proxy-authorization`, and a `te` other than `trailers`), so the scan
/// over its names is skipped.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap, version: Version) {
    if version == Version::HTTP_2 {
        h.remove(header::PROXY_AUTHORIZATION);
        return;
    }
    strip(h, HOP_BY_HOP.len());
}

/// Drops the headers HTTP/2 forbids in a request (RFC 9113, 8.2.2), and those the
/// `Connection` header names, as [`strip_hop_by_hop`] drops an HTTP/1.1 message's.
pub(in crate::proxy) fn strip_connection_specific(h: &mut HeaderMap) {
    // All of HOP_BY_HOP but `proxy-authorization`, its last.
    strip(h, HOP_BY_HOP.len() - 1);
}

/// Where `name` is in [`HOP_BY_HOP`], or past its end for `te`: a `match` on the name's text
/// compares its length first, cheaper than comparing it with each name in turn.
fn hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authorization" => Some(5),
        "te" => Some(HOP_BY_HOP.len()),
        _ => None,
    }
}

/// Drops the first `count` of [`HOP_BY_HOP`], the headers a `Connection` line names, and a
/// `te` other than `trailers`.
fn strip(h: &mut HeaderMap, count: usize) {
    // One pass over the names finds which are here (most messages carry none or one), where
    // a removal by name hashes it and probes the map.
    let mut found = [false; HOP_BY_HOP.len() + 1];
    for i in h.keys().filter_map(hop_index) {
        found[i] = true;
    }
    let te = found[HOP_BY_HOP.len()];
    let names = &HOP_BY_HOP[..count];
    // Every `Connection` line counts (RFC 9110, 7.6.1); a second one is rare, and only then
    // are the lines copied.
    if found[0] {
        let mut lines = h.get_all(header::CONNECTION).iter();
        let first = lines.next().cloned();
        let rest: Vec<HeaderValue> = lines.cloned().collect();
        h.remove(header::CONNECTION);
        for line in first.iter().chain(&rest) {
            remove_listed(h, line);
        }
    }
    for (n, _) in names.iter().zip(found).skip(1).filter(|(_, f)| *f) {
        h.remove(n);
    }
    if te {
        let tes = h.get_all(header::TE);
        if !tes
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            h.remove(header::TE);
        } else if tes.iter().any(|v| v != "trailers") {
            // HTTP/2 allows `trailers` alone, and in lower case (RFC 9113, 8.2.2).
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Removes the headers a `Connection` line names, but `te`. A line that is not text, or a
/// name that is no header name, names nothing here; `remove` by `&str` matches any case.
fn remove_listed(h: &mut HeaderMap, line: &HeaderValue) {
    let Ok(line) = line.to_str() else { return };
    for name in line.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !name.eq_ignore_ascii_case(header::TE.as_str()) {
            h.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `host` makes of a request: the host it routes by, and the `Host` left for the
    /// app; or the error's status.
    fn host_of(version: Version, target: &str, hosts: &[&str]) -> Result<(String, String), u16> {
        let mut b = Request::builder().version(version).uri(target);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        let mut req = b.body(()).map_err(|_| 0_u16)?;
        let named = host(&mut req).map_err(|e| e.status().as_u16())?;
        let left = req
            .headers()
            .get(header::HOST)
            .map_or("", |v| v.to_str().unwrap_or("?"));
        Ok((named, left.to_string()))
    }

    #[test]
    fn a_request_names_one_host() {
        let ok = |a: &str, b: &str| Ok((a.to_string(), b.to_string()));
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        assert_eq!(host_of(h1, "/", &["svc:8080"]), ok("svc:8080", "svc:8080"));
        assert_eq!(host_of(h1, "/", &[]), Err(400));
        assert_eq!(host_of(h1, "/", &["a", "b"]), Err(400));
        assert_eq!(host_of(h1, "/", &["a", "a"]), Err(400));
        // An absolute-form target's authority is the host, and the app reads it too.
        assert_eq!(host_of(h1, "http://a/x", &["b"]), ok("a", "a"));
        assert_eq!(host_of(h1, "http://a/x", &[]), Err(400));
        assert_eq!(host_of(Version::HTTP_10, "http://a/x", &[]), ok("a", "a"));
        assert_eq!(host_of(Version::HTTP_10, "/", &["a"]), ok("a", "a"));
        assert_eq!(host_of(Version::HTTP_10, "/", &[]), Err(400));
        // A `Host` routed by is a valid authority, without user info.
        assert_eq!(host_of(h1, "/", &["u@a"]), Err(400));
        assert_eq!(host_of(h1, "/", &["a/b"]), Err(400));
        assert_eq!(host_of(h1, "/", &["a b"]), Err(400));
        assert_eq!(host_of(h1, "/", &["[::1]:80"]), ok("[::1]:80", "[::1]:80"));
        assert_eq!(host_of(h2, "/x", &["u@a"]), Err(400));
        // Host and port checked: `http`'s `Authority` takes these.
        for bad in [
            ":80", "a:abc", "a:99999", "a:65536", "a:123456", "a:+80", "x[::1]", "[a", "[]",
            "[::1]x", "[::1]:8x",
        ] {
            assert_eq!(host_of(h1, "/", &[bad]), Err(400), "{bad}");
        }
        assert_eq!(host_of(h1, "/", &["a:"]), ok("a:", "a:"));
        assert_eq!(host_of(h1, "/", &["a:65535"]), ok("a:65535", "a:65535"));
        assert_eq!(host_of(h1, "/", &["a:080"]), ok("a:080", "a:080"));
        assert_eq!(host_of(h1, "/", &["[::1]:"]), ok("[::1]:", "[::1]:"));
        assert_eq!(
            host_of(h1, "/", &["localhost:8080"]),
            ok("localhost:8080", "localhost:8080")
        );
        assert_eq!(host_of(h2, "http://app/x", &["app:abc"]), Err(400));
        assert_eq!(host_of(h1, "http://a:81/x", &["a:81"]), ok("a:81", "a:81"));
        assert_eq!(host_of(h1, "http://a/x", &["a", "b"]), Err(400));
        assert_eq!(host_of(h1, "http://u@a/x", &["a"]), Err(400));
        assert_eq!(host_of(h1, "a:443", &["a:443"]), ok("a:443", "a:443"));
        // HTTP/2: `:authority`, and a `Host` must name the same host and port.
        assert_eq!(host_of(h2, "http://a/x", &[]), ok("a", ""));
        assert_eq!(host_of(h2, "http://a/x", &["A"]), ok("a", "A"));
        assert_eq!(host_of(h2, "http://a/x", &["a:80"]), ok("a", "a:80"));
        assert_eq!(host_of(h2, "https://a/x", &["a:443"]), ok("a", "a:443"));
        assert_eq!(
            host_of(h2, "http://a:8080/x", &["a:8080"]),
            ok("a:8080", "a:8080")
        );
        assert_eq!(host_of(h2, "http://a/x", &["b"]), Err(400));
        assert_eq!(host_of(h2, "http://a/x", &["a:81"]), Err(400));
        assert_eq!(host_of(h2, "http://a:8080/x", &["a"]), Err(400));
        assert_eq!(host_of(h2, "http://a/x", &["u@a"]), Err(400));
        assert_eq!(host_of(h2, "http://a/x", &["a/b"]), Err(400));
        assert_eq!(host_of(h2, "/x", &["a"]), ok("a", "a"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_index(n), Some(i), "{n}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Private, TE"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, Version::HTTP_11);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-app"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, Version::HTTP_11);
        assert!(h.is_empty());
        // Every `Connection` line counts, and `te` stays only when each of its values is
        // `trailers`.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        h.append(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, Version::HTTP_11);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.append(header::TE, HeaderValue::from_static("Trailers"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, Version::HTTP_11);
        let tes: Vec<_> = h.get_all(header::TE).iter().collect();
        assert_eq!(tes, ["trailers"], "kept, as HTTP/2 allows it");
        // Without a `Connection` header, each hop-by-hop header still goes.
        let mut h = HeaderMap::new();
        for n in &HOP_BY_HOP[1..] {
            h.append(n, HeaderValue::from_static("x"));
            h.append(n, HeaderValue::from_static("y"));
        }
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, Version::HTTP_11);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-app"]);
    }

    #[test]
    fn a_request_to_http2_loses_what_http2_forbids_and_only_that() {
        // As a route's header changes may leave it: every connection-specific header, and
        // what `Connection` names; `te: trailers` and `proxy-authorization` are allowed.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        for n in &HOP_BY_HOP[1..HOP_BY_HOP.len() - 1] {
            h.insert(n, HeaderValue::from_static("x"));
        }
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        strip_connection_specific(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["proxy-authorization", "te"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_connection_specific(&mut h);
        assert!(h.is_empty(), "{h:?}");
        // `Trailers` from an HTTP/1.1 client goes on as the h2 codec accepts it.
        let mut h = HeaderMap::new();
        h.append(header::TE, HeaderValue::from_static("Trailers"));
        h.append(header::TE, HeaderValue::from_static("trailers"));
        strip_connection_specific(&mut h);
        let tes: Vec<_> = h.get_all(header::TE).iter().collect();
        assert_eq!(tes, ["trailers"]);
    }

    /// Whether the h2 codec passes on a request carrying `name: value`, sent as a raw
    /// HEADERS frame (h2's own client would not send a connection-specific header) on stream
    /// 1, followed by a plain request on stream 3: the first request accepted says which.
    async fn h2_passes(name: &str, value: &str) -> bool {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let name_owned = name.to_string();
        let served = tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("h2 handshake");
            let (req, _respond) = conn.accept().await.expect("a request").expect("accepted");
            req.headers().contains_key(name_owned.as_str())
        });
        // GET http://a/ (static table entries and a literal authority).
        let get = [0x82, 0x86, 0x84, 0x41, 1, b'a'];
        // Then the header as a literal without indexing, with a literal name.
        let mut block = get.to_vec();
        block.push(0x00);
        for s in [name, value] {
            block.push(u8::try_from(s.len()).expect("short"));
            block.extend(s.as_bytes());
        }
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        for (stream, block) in [(1, &block[..]), (3, &get[..])] {
            let len = u8::try_from(block.len()).expect("short");
            // HEADERS, END_STREAM | END_HEADERS.
            out.extend([0, 0, len, 1, 5, 0, 0, 0, stream]);
            out.extend(block);
        }
        client.write_all(&out).await.expect("write");
        // The client stays open until the server has answered: at its end of input, h2
        // would accept nothing more.
        let passed = served.await.expect("join");
        drop(client);
        passed
    }

    #[tokio::test]
    async fn over_http2_only_proxy_authorization_is_left_to_strip() {
        // What `strip_hop_by_hop` relies on for HTTP/2: the codec refuses the rest.
        assert!(h2_passes("x-app", "1").await, "the control passes");
        assert!(h2_passes("te", "trailers").await);
        for (name, value) in [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
        ] {
            assert!(!h2_passes(name, value).await, "{name}: {value}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, Version::HTTP_2);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-app"]);
    }

    #[test]
    fn a_client_cannot_drop_a_header_the_route_adds() {
        use crate::state::route::{Action, HeaderOps, Route, VirtualHost, WeightedBackend};
        let adds = |name: &'static str| HeaderOps {
            request_set: vec![(HeaderName::from_static(name), HeaderValue::from_static("1"))],
            ..HeaderOps::default()
        };
        let route = Route {
            name: "r".into(),
            matcher: Default::default(),
            action: Action::Direct {
                status: 200,
                body: String::new(),
            },
            headers: adds("x-route"),
            fault: None,
        };
        let vh = VirtualHost {
            name: "vh".into(),
            domains: vec!["*".into()],
            routes: vec![],
            headers: adds("x-vhost"),
        };
        let table = RouteTable::new("t".into(), vec![], adds("x-table"));
        let backend = WeightedBackend {
            cluster: "c".into(),
            weight: 1,
            headers: adds("x-backend"),
            metrics: Default::default(),
        };
        let levels = Levels {
            table: &table,
            vh: &vh,
            route: &route,
        };
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-route, x-vhost, x-table, x-backend, x-app"),
        );
        h.insert("x-app", HeaderValue::from_static("1"));
        levels.request(&backend, &mut h, Version::HTTP_11, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-backend", "x-route", "x-table", "x-vhost"]);
    }
}
