use std::collections::HashMap;

use http::{HeaderMap, HeaderValue, Method};

use super::*;

fn str_exact(v: &str) -> ValueMatch {
    ValueMatch::Str(StrMatch {
        kind: StrKind::Exact(v.into()),
        ignore_case: false,
    })
}

fn route(name: &str, matcher: RouteMatch) -> Route {
    Route {
        name: name.into(),
        matcher,
        action: Action::Direct {
            status: 200,
            body: name.into(),
        },
        headers: HeaderOps::default(),
        fault: None,
    }
}

fn path(p: PathMatch) -> RouteMatch {
    RouteMatch {
        path: p,
        case_sensitive: true,
        ..Default::default()
    }
}

fn table() -> RouteTable {
    let routes = vec![
        route("exact", path(PathMatch::Exact("/api".into()))),
        route("segment", path(PathMatch::SeparatedPrefix("/v1".into()))),
        route(
            "regex",
            path(PathMatch::Regex(
                Regex::new("^(?:/items/[0-9]+)$").expect("regex"),
            )),
        ),
        route(
            "header",
            RouteMatch {
                headers: vec![HeaderMatch {
                    name: HeaderTarget::Header(HeaderName::from_static("x-canary")),
                    value: str_exact("yes"),
                    invert: false,
                }],
                ..path(PathMatch::Prefix("/".into()))
            },
        ),
        route(
            "method-and-query",
            RouteMatch {
                headers: vec![HeaderMatch {
                    name: HeaderTarget::Method,
                    value: str_exact("POST"),
                    invert: false,
                }],
                query: vec![QueryMatch {
                    name: "debug".into(),
                    value: str_exact("1"),
                }],
                ..path(PathMatch::Prefix("/".into()))
            },
        ),
        route(
            "not-internal",
            RouteMatch {
                headers: vec![HeaderMatch {
                    name: HeaderTarget::Header(HeaderName::from_static("x-internal")),
                    value: ValueMatch::Present(true),
                    invert: true,
                }],
                ..path(PathMatch::Prefix("/public".into()))
            },
        ),
        route(
            "grpc",
            RouteMatch {
                grpc: true,
                ..path(PathMatch::Prefix("/".into()))
            },
        ),
        route(
            "insensitive",
            RouteMatch {
                case_sensitive: false,
                ..path(PathMatch::Prefix("/CASE".into()))
            },
        ),
        route("default", path(PathMatch::Prefix("/".into()))),
    ];
    RouteTable::new(
        "t".into(),
        [
            VirtualHost {
                name: "reviews".into(),
                domains: vec![
                    "reviews".into(),
                    "reviews:9080".into(),
                    "*.reviews.svc".into(),
                ],
                routes,
                headers: HeaderOps::default(),
            },
            VirtualHost {
                name: "prefix".into(),
                domains: vec!["api.*".into()],
                routes: vec![route("api-any", path(PathMatch::Prefix("/".into())))],
                headers: HeaderOps::default(),
            },
            VirtualHost {
                name: "catch-all".into(),
                domains: vec!["*".into()],
                routes: vec![route("fallback", path(PathMatch::Prefix("/".into())))],
                headers: HeaderOps::default(),
            },
        ]
        .into_iter()
        .map(Arc::new)
        .collect(),
        HeaderOps::default(),
    )
}

fn find(
    t: &RouteTable,
    host: &str,
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
) -> String {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::try_from(*k).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let info = RequestInfo {
        method: &method,
        path,
        query,
        headers: &h,
    };
    t.find(host, &info)
        .map(|(_, r)| r.name.clone())
        .unwrap_or_else(|| "none".into())
}

/// Host, method, target, headers, the route that should match.
type Case<'a> = (&'a str, Method, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn matching() {
    let t = table();
    let get = Method::GET;
    let cases: &[Case] = &[
        ("reviews", get.clone(), "/api", &[], "exact"),
        ("reviews:9080", get.clone(), "/api/", &[], "default"),
        ("REVIEWS:9080", get.clone(), "/api", &[], "exact"),
        ("reviews", get.clone(), "/v1", &[], "segment"),
        ("reviews", get.clone(), "/v1/x", &[], "segment"),
        ("reviews", get.clone(), "/v10", &[], "default"),
        ("reviews", get.clone(), "/items/42", &[], "regex"),
        ("reviews", get.clone(), "/items/42x", &[], "default"),
        (
            "reviews",
            get.clone(),
            "/",
            &[("x-canary", "yes")],
            "header",
        ),
        (
            "reviews",
            get.clone(),
            "/",
            &[("x-canary", "no")],
            "default",
        ),
        (
            "reviews",
            Method::POST,
            "/?a=b&debug=1",
            &[],
            "method-and-query",
        ),
        ("reviews", Method::POST, "/?debug=2", &[], "default"),
        ("reviews", get.clone(), "/?debug=1", &[], "default"),
        ("reviews", get.clone(), "/public/x", &[], "not-internal"),
        (
            "reviews",
            get.clone(),
            "/public/x",
            &[("x-internal", "1")],
            "default",
        ),
        (
            "reviews",
            Method::POST,
            "/pkg.Svc/Call",
            &[("content-type", "application/grpc+proto")],
            "grpc",
        ),
        ("reviews", get.clone(), "/case/x", &[], "insensitive"),
        ("a.reviews.svc", get.clone(), "/api", &[], "exact"),
        ("api.example.com", get.clone(), "/", &[], "api-any"),
        ("elsewhere", get.clone(), "/", &[], "fallback"),
        // A multi-byte character at the prefix boundary must not panic.
        ("reviews", get.clone(), "/v\u{e9}", &[], "default"),
    ];
    for (host, method, target, headers, want) in cases {
        assert_eq!(
            find(&t, host, method.clone(), target, headers),
            *want,
            "{method} {host}{target} {headers:?}"
        );
    }
}

#[test]
fn no_catch_all_means_no_route() {
    let t = RouteTable::new(
        "t".into(),
        vec![Arc::new(VirtualHost {
            name: "only".into(),
            domains: vec!["only".into()],
            routes: vec![route("r", path(PathMatch::Prefix("/".into())))],
            headers: HeaderOps::default(),
        })],
        HeaderOps::default(),
    );
    assert_eq!(find(&t, "other", Method::GET, "/", &[]), "none");
}

#[test]
fn string_matchers() {
    let m = |kind, ignore_case| StrMatch { kind, ignore_case };
    assert!(m(StrKind::Prefix("ab".into()), false).matches("abc"));
    assert!(!m(StrKind::Prefix("AB".into()), false).matches("abc"));
    assert!(m(StrKind::Prefix("AB".into()), true).matches("abc"));
    assert!(m(StrKind::Suffix("bc".into()), false).matches("abc"));
    assert!(m(StrKind::Contains("b".into()), false).matches("abc"));
    assert!(m(StrKind::Exact("ABC".into()), true).matches("abc"));
    assert!(!m(StrKind::Exact("ABC".into()), false).matches("abc"));
}

/// A forward to `clusters` with their weights.
fn weighted(clusters: &[(&str, u32)]) -> Forward {
    Forward {
        backends: clusters
            .iter()
            .map(|&(cluster, weight)| WeightedBackend {
                cluster: cluster.into(),
                weight,
                headers: HeaderOps::default(),
                metrics: Default::default(),
            })
            .collect(),
        hash: Vec::new(),
        total_weight: clusters.iter().map(|&(_, w)| u64::from(w)).sum(),
        timeout: None,
        retry: None,
        mirrors: vec![],
        prefix_rewrite: None,
        matched_prefix: None,
        regex_rewrite: None,
        host_rewrite: None,
        draws: Default::default(),
    }
}

#[test]
fn weighted_pick_follows_weights() {
    let f = weighted(&[("v1", 90), ("zero", 0), ("v2", 10)]);
    let at = |r| f.backend_at(r).map(|b| b.cluster.as_str());
    assert_eq!(at(0), Some("v1"));
    assert_eq!(at(89), Some("v1"));
    assert_eq!(at(90), Some("v2"));
    assert_eq!(at(99), Some("v2"));
    assert_eq!(at(100), None);
}

/// Counts of `pick` over `n` requests, taking every `stride`-th one.
fn pick_counts(f: &Forward, n: usize, stride: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n * stride {
        let b = f.pick().expect("a backend");
        if i % stride == 0 {
            *counts.entry(b.cluster.clone()).or_default() += 1;
        }
    }
    counts
}

#[test]
fn weighted_picks_stay_close_to_the_weights_over_short_runs() {
    for weights in [
        [50, 50, 0],
        [90, 10, 0],
        [1, 99, 0],
        [33, 33, 34],
        [7, 0, 3],
    ] {
        let total: u32 = weights.iter().sum();
        // Several proxies (random starts), runs as short as a demo step, and a client that
        // sends every second or third request of a different kind.
        for _ in 0..50 {
            let f = weighted(&[("a", weights[0]), ("b", weights[1]), ("c", weights[2])]);
            for (n, stride) in [(100, 1), (600, 1), (300, 2), (200, 3)] {
                let counts = pick_counts(&f, n, stride);
                for (c, w) in ["a", "b", "c"].iter().zip(weights) {
                    let got = counts.get(*c).copied().unwrap_or(0) as f64;
                    let want = n as f64 * f64::from(w) / f64::from(total);
                    assert!(
                        (got - want).abs() <= 4.0,
                        "weights {weights:?}, {n} picks every {stride}: {c} got {got}, want {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn header_ops_apply_in_order() {
    let mut ops = HeaderOps::default();
    ops.request_remove.push(HeaderName::from_static("x-drop"));
    ops.request_set.push((
        HeaderName::from_static("x-set"),
        HeaderValue::from_static("new"),
    ));
    ops.request_add.push((
        HeaderName::from_static("x-add"),
        HeaderValue::from_static("2"),
    ));
    let mut h = HeaderMap::new();
    h.insert("x-drop", HeaderValue::from_static("1"));
    h.insert("x-set", HeaderValue::from_static("old"));
    h.insert("x-add", HeaderValue::from_static("1"));
    ops.apply_request(&mut h);
    assert!(!h.contains_key("x-drop"));
    assert_eq!(h["x-set"], "new");
    assert_eq!(h.get_all("x-add").iter().count(), 2);
}

#[test]
fn a_hosts_port_is_left_out_only_where_the_table_says() {
    let vh = |name: &str, domain: &str| VirtualHost {
        name: name.into(),
        domains: vec![domain.into()],
        routes: vec![],
        headers: HeaderOps::default(),
    };
    let mut t = RouteTable::new(
        "t".into(),
        vec![
            vh("a", "a.example.com").into(),
            vh("any", "*.example.com").into(),
        ],
        HeaderOps::default(),
    );
    let name = |t: &RouteTable, host: &str| t.vhost(host).map(|v| v.name.clone());
    assert_eq!(name(&t, "a.example.com:8080"), None);
    t.ignore_port = true;
    assert_eq!(name(&t, "a.example.com:8080").as_deref(), Some("a"));
    assert_eq!(name(&t, "b.example.com:443").as_deref(), Some("any"));
    assert_eq!(name(&t, "A.example.com").as_deref(), Some("a"));
}

#[test]
fn the_first_virtual_host_to_name_a_domain_keeps_it_in_any_case() {
    let vh = |name: &str, domains: &[&str]| {
        Arc::new(VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
            routes: vec![route(name, path(PathMatch::Prefix("/".into())))],
            headers: HeaderOps::default(),
        })
    };
    // Enough domains that the index's hashes, not luck, find each.
    let mut vhosts: Vec<_> = (0..2000)
        .map(|i| {
            vh(
                &format!("v{i}"),
                &[&format!("svc-{i}.ns"), &format!("SVC-{i}.ns:80")],
            )
        })
        .collect();
    vhosts.push(vh("late", &["Svc-7.NS", "late"]));
    let t = RouteTable::new("t".into(), vhosts, HeaderOps::default());
    let name = |host: &str| t.vhost(host).map(|v| v.name.clone());
    assert_eq!(
        name("svc-7.ns").as_deref(),
        Some("v7"),
        "the first keeps it"
    );
    assert_eq!(name("SVC-7.Ns").as_deref(), Some("v7"));
    assert_eq!(
        name("svc-1999.ns:80").as_deref(),
        Some("v1999"),
        "an upper-case domain"
    );
    assert_eq!(name("late").as_deref(), Some("late"));
    assert_eq!(name("svc-2000.ns"), None);
}

#[test]
fn a_new_version_shares_the_domain_index_only_where_each_positions_domains_stay() {
    let vh = |name: &str, domains: &[String]| {
        Arc::new(VirtualHost {
            name: name.into(),
            domains: domains.to_vec(),
            routes: vec![route(name, path(PathMatch::Prefix("/".into())))],
            headers: HeaderOps::default(),
        })
    };
    let domains = |i: usize| vec![format!("svc-{i}"), format!("*.w{i}"), format!("p{i}.*")];
    let before: Vec<_> = (0..100)
        .map(|i| vh(&format!("v{i}"), &domains(i)))
        .collect();
    let first = RouteTable::new("t".into(), before.clone(), HeaderOps::default());
    let name = |t: &RouteTable, host: &str| t.vhost(host).map(|v| v.name.clone());

    // One virtual host's routes change, its domains do not: shared. A domain changes, a
    // virtual host comes in (every later position moves) or goes: built again. Either way,
    // every host (any case, with a port) is found where a table built from nothing finds it.
    let mut routes_changed = before.clone();
    routes_changed[7] = vh("v7-new", &domains(7));
    let mut domain_changed = before.clone();
    domain_changed[7] = vh("v7", &[String::from("other")]);
    let mut inserted = before.clone();
    inserted.insert(3, vh("new", &domains(1000)));
    let mut removed = before.clone();
    removed.remove(3);
    for (next, shared) in [
        (routes_changed.clone(), true),
        (domain_changed, false),
        (inserted, false),
        (removed, false),
    ] {
        let t = RouteTable::new_after("t".into(), next.clone(), HeaderOps::default(), Some(&first));
        assert_eq!(Arc::ptr_eq(&first.domains, &t.domains), shared);
        let fresh = RouteTable::new("t".into(), next, HeaderOps::default());
        for i in (0..100).chain([1000]) {
            for host in [
                format!("svc-{i}"),
                format!("SVC-{i}"),
                format!("svc-{i}:80"),
                format!("x.w{i}"),
                format!("p{i}.x"),
                "other".into(),
            ] {
                assert_eq!(name(&t, &host), name(&fresh, &host), "{host}");
            }
        }
    }
    // The shared index leads to the new virtual host.
    let t = RouteTable::new_after(
        "t".into(),
        routes_changed,
        HeaderOps::default(),
        Some(&first),
    );
    assert_eq!(name(&t, "svc-7").as_deref(), Some("v7-new"));
    assert_eq!(name(&t, "a.w7").as_deref(), Some("v7-new"));
}
