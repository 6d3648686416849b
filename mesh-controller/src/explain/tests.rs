//! `explain` on a table of requests over the cases the e2e tables cover: routing by header,
//! path, query and method, weights, redirects, a missing backend, consumer routes, hosts in
//! every form, a Service without routes, passthrough, Allow and Deny policies with the rule
//! that decided, namespace defaults, malformed paths, and rate limits.

use super::*;
use crate::index::Index;
use crate::testing::obj;

const TD: &str = "spiffe://cluster.local";

fn pod(ns: &str, name: &str, workload: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {workload}, mesh.dev/workload: {workload}, mesh.dev/proxy: 'true'}}}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn service(ns: &str, name: &str, ip: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: {ip}, selector: {{{selector}}}, ports: [{{name: http, port: 9080, targetPort: 8080}}]}}\n"
    )
}

fn slice(ns: &str, svc: &str, pods: &[(&str, &str)]) -> String {
    let eps: Vec<String> = pods
        .iter()
        .map(|(p, ip)| {
            format!("{{addresses: ['{ip}'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: {p}, namespace: {ns}}}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

fn model() -> std::sync::Arc<Model> {
    let mut idx = Index::new("cluster.local");
    let docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n".to_string(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n".to_string(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: vault, labels: {mesh.dev/authz-default: deny}}\n".to_string(),
        pod("web", "productpage-0", "productpage", "productpage", "10.0.0.5"),
        pod("shop", "reviews-v1-0", "reviews-v1", "reviews", "10.0.1.1"),
        pod("shop", "reviews-v2-0", "reviews-v2", "reviews", "10.0.1.2"),
        pod("shop", "ratings-0", "ratings", "ratings", "10.0.2.1"),
        pod("shop", "details-0", "details", "details", "10.0.2.9"),
        pod("vault", "secrets-0", "secrets", "secrets", "10.0.3.1"),
        service("shop", "reviews", "10.96.0.10", "app: reviews"),
        service("shop", "reviews-v1", "10.96.0.11", "app: reviews-v1"),
        service("shop", "reviews-v2", "10.96.0.12", "app: reviews-v2"),
        service("shop", "ratings", "10.96.0.20", "app: ratings"),
        service("vault", "secrets", "10.96.0.30", "app: secrets"),
        slice("shop", "reviews-v1", &[("reviews-v1-0", "10.0.1.1")]),
        slice("shop", "reviews-v2", &[("reviews-v2-0", "10.0.1.2")]),
        slice("shop", "ratings", &[("ratings-0", "10.0.2.1")]),
        slice("vault", "secrets", &[("secrets-0", "10.0.3.1")]),
        // The producer route of reviews: a header canary, an API path to v2 with a timeout,
        // a redirect, a rule whose backend is missing, a POST-only rule, and the catch-all
        // split 90/10 with retries.
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n  rules:\n  - matches: [{headers: [{name: x-canary, value: 'yes'}]}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n  - matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: v, value: '2'}]}]\n    backendRefs: [{name: reviews-v2, port: 9080}]\n    timeouts: {request: 2s}\n  - matches: [{path: {type: Exact, value: /old}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]\n  - matches: [{path: {type: PathPrefix, value: /beta}}]\n    backendRefs: [{name: reviews-v9, port: 9080}]\n  - matches: [{path: {type: PathPrefix, value: /write}, method: POST}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n  - backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: reviews-v2, port: 9080, weight: 10}]\n".to_string(),
        // `cart` selects two versions; a policy on cart-v2 only lets GET in.
        pod("shop", "cart-v1-0", "cart-v1", "cart", "10.0.4.1").replace("app: cart-v1", "app: cart, version: v1"),
        pod("shop", "cart-v2-0", "cart-v2", "cart", "10.0.4.2").replace("app: cart-v2", "app: cart, version: v2"),
        service("shop", "cart", "10.96.0.40", "app: cart"),
        service("shop", "cart-v2", "10.96.0.41", "app: cart, version: v2"),
        slice("shop", "cart", &[("cart-v1-0", "10.0.4.1"), ("cart-v2-0", "10.0.4.2")]),
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: cart-v2-reads, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: cart-v2}]\n  rules: [{to: [{methods: [GET]}]}]\n".to_string(),
        // A route that rewrites /legacy to /admin on ratings' own route... for callers in shop
        // it is the producer route of `gateway`, sending to ratings.
        service("shop", "gateway", "10.96.0.50", "app: none"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: gateway, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: gateway, port: 9080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /legacy}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /admin}}}]\n    backendRefs: [{name: ratings, port: 9080}]\n".to_string(),
        // An opaque TCP Service, and a pod without a proxy.
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: 10.96.0.60, selector: {app: db}, ports: [{name: tcp-db, port: 5432, targetPort: 8080}]}\n".to_string(),
        pod("shop", "db-0", "db", "db", "10.0.5.1"),
        slice("shop", "db", &[("db-0", "10.0.5.1")]).replace("name: http,", "name: tcp-db,"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: legacy-0, namespace: web, labels: {mesh.dev/workload: legacy}}\nspec: {serviceAccountName: legacy, containers: [{name: app}]}\nstatus: {podIP: 10.0.0.9}\n".to_string(),
        // Callers in web route ratings by their own route (a consumer route), whose backend in
        // another namespace no ReferenceGrant allows: 500.
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: pin, namespace: web}\nspec:\n  parentRefs: [{group: '', kind: Service, name: ratings, namespace: shop, port: 9080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /v1}}]\n    backendRefs: [{name: ratings, namespace: shop, port: 9080}]\n".to_string(),
        // ratings: only reviews may call, and only GET; a Deny on /admin for everyone; a
        // rate limit; a TrafficPolicy.
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: ratings-readers, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: ratings}]\n  rules:\n  - from: [{serviceAccounts: [reviews]}]\n    to: [{methods: [GET]}]\n  - from: [{serviceAccounts: [details]}]\n    to: [{paths: ['/public/*']}]\n".to_string(),
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  action: Deny\n  targetRefs: [{kind: Namespace, name: shop}]\n  rules: [{to: [{paths: ['/admin', '/admin/*', '/a:b']}]}]\n".to_string(),
        "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: ratings-limit, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: ratings}]\n  local: {requestsPerSecond: 100, perIdentity: {requestsPerSecond: 10}}\n".to_string(),
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: v1-rr, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: reviews-v1}]\n  loadBalancer: {algorithm: RoundRobin}\n".to_string(),
    ];
    for d in docs {
        idx.apply(obj(&d)).unwrap_or_else(|e| panic!("{e}: {d}"));
    }
    idx.model()
}

/// What one request should come to.
struct Case {
    name: &'static str,
    from: &'static str,
    method: &'static str,
    url: &'static str,
    headers: &'static [(&'static str, &'static str)],
    /// `forward`, `redirect 301`, `status 404`, ... or `passthrough`.
    outcome: &'static str,
    /// The rule that matched (or came closest, with a 404), as a prefix.
    rule: Option<&'static str>,
    /// `service=share` of each backend.
    backends: &'static [(&'static str, f64)],
    /// `Some((allowed, text the deciding policy contains))` for the first backend.
    authz: Option<(bool, &'static str)>,
    rate_limit: Option<&'static str>,
}

fn outcome(o: &Outcome) -> String {
    match o {
        Outcome::Forward => "forward".into(),
        Outcome::Redirect { status } => format!("redirect {status}"),
        Outcome::Status { status } => format!("status {status}"),
        Outcome::Passthrough => "passthrough".into(),
    }
}

const FROM_WEB: &str = "web/productpage";
const FROM_REVIEWS: &str = "shop/reviews-v1";

#[rustfmt::skip]
const CASES: &[Case] = &[
    Case { name: "catch-all split", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: Some((true, "the default (allow)")), rate_limit: None },
    Case { name: "header canary", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/", headers: &[("X-Canary", "yes")],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 0"), backends: &[("shop/reviews-v2", 100.0)],
        authz: Some((true, "default")), rate_limit: None },
    Case { name: "header with another value", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/", headers: &[("x-canary", "no")],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: None, rate_limit: None },
    Case { name: "path and query", from: FROM_WEB, method: "GET", url: "http://reviews.shop.svc.cluster.local:9080/api/list?v=2", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 1"), backends: &[("shop/reviews-v2", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "path without the query", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/api/list", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: None, rate_limit: None },
    Case { name: "a prefix is whole segments", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/apiary?v=2", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: None, rate_limit: None },
    Case { name: "redirect", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/old", headers: &[],
        outcome: "redirect 301", rule: Some("HTTPRoute/shop/reviews rule 2"), backends: &[], authz: None, rate_limit: None },
    Case { name: "missing backend", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/beta/x", headers: &[],
        outcome: "status 500", rule: Some("HTTPRoute/shop/reviews rule 3"), backends: &[], authz: None, rate_limit: None },
    Case { name: "method match", from: FROM_WEB, method: "POST", url: "http://reviews.shop:9080/write", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 4"), backends: &[("shop/reviews-v1", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "method mismatch falls through", from: FROM_WEB, method: "GET", url: "http://reviews.shop:9080/write", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: None, rate_limit: None },
    Case { name: "short name from the Service's namespace", from: FROM_REVIEWS, method: "GET", url: "http://reviews:9080/", headers: &[("x-canary", "yes")],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 0"), backends: &[("shop/reviews-v2", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "ClusterIP", from: FROM_WEB, method: "GET", url: "http://10.96.0.10:9080/", headers: &[("x-canary", "yes")],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 0"), backends: &[("shop/reviews-v2", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "short name from another namespace is not a Service", from: FROM_WEB, method: "GET", url: "http://reviews:9080/", headers: &[],
        outcome: "passthrough", rule: None, backends: &[], authz: None, rate_limit: None },
    Case { name: "a port the Service lacks", from: FROM_WEB, method: "GET", url: "http://reviews.shop:80/", headers: &[],
        outcome: "passthrough", rule: None, backends: &[], authz: None, rate_limit: None },
    Case { name: "no route: the Service itself", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((true, "AuthorizationPolicy shop/ratings-readers/rules[0] (Allow)")), rate_limit: Some("shop/ratings-limit") },
    Case { name: "Allow rule by method", from: FROM_REVIEWS, method: "POST", url: "http://ratings:9080/", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "no rule of the Allow policies (shop/ratings-readers) matched")), rate_limit: Some("shop/ratings-limit") },
    Case { name: "consumer route for the caller's namespace", from: FROM_WEB, method: "GET", url: "http://ratings.shop:9080/v1/x", headers: &[],
        outcome: "status 500", rule: Some("HTTPRoute/web/pin rule 0"), backends: &[], authz: None, rate_limit: None },
    Case { name: "consumer route: nothing matches, closest named", from: FROM_WEB, method: "GET", url: "http://ratings.shop:9080/public/x", headers: &[],
        outcome: "status 404", rule: Some("HTTPRoute/web/pin rule 0"), backends: &[], authz: None, rate_limit: None },
    Case { name: "allowed by a path rule on the normalized path", from: "shop/details", method: "PUT", url: "http://ratings:9080/x/../public/a", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((true, "AuthorizationPolicy shop/ratings-readers/rules[1] (Allow)")), rate_limit: Some("shop/ratings-limit") },
    Case { name: "no Allow rule for that caller and path", from: "shop/details", method: "GET", url: "http://ratings:9080/private", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "no rule of the Allow policies (shop/ratings-readers) matched")), rate_limit: Some("shop/ratings-limit") },
    Case { name: "Deny wins over Allow", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/admin", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "AuthorizationPolicy shop/no-admin (Deny)")), rate_limit: Some("shop/ratings-limit") },
    Case { name: "Deny of an exact path covers its trailing slash", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/admin/", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "shop/no-admin")), rate_limit: None },
    Case { name: "Deny sees the normalized path", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/x/..//admin/keys", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "shop/no-admin")), rate_limit: None },
    Case { name: "namespace default deny", from: FROM_WEB, method: "GET", url: "http://secrets.vault:9080/", headers: &[],
        outcome: "forward", rule: None, backends: &[("vault/secrets", 100.0)],
        authz: Some((false, "the default (deny)")), rate_limit: None },
    Case { name: "authorized on the path the route rewrote", from: FROM_REVIEWS, method: "GET", url: "http://gateway:9080/legacy/keys", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/gateway rule 0"), backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "AuthorizationPolicy shop/no-admin (Deny)")), rate_limit: None },
    Case { name: "a Deny path matches its percent-encoded form", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/a%3Ab", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: Some((false, "shop/no-admin")), rate_limit: None },
    Case { name: "an encoded slash is refused by the destination", from: FROM_REVIEWS, method: "GET", url: "http://ratings:9080/admin%2Fkeys", headers: &[],
        outcome: "status 400", rule: None, backends: &[("shop/ratings", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "methods are compared as sent", from: FROM_REVIEWS, method: "post", url: "http://reviews:9080/write", headers: &[],
        outcome: "forward", rule: Some("HTTPRoute/shop/reviews rule 5"), backends: &[("shop/reviews-v1", 90.0), ("shop/reviews-v2", 10.0)],
        authz: None, rate_limit: None },
    Case { name: "an opaque TCP port is not routed by HTTP", from: FROM_REVIEWS, method: "GET", url: "http://db:5432/old", headers: &[],
        outcome: "forward", rule: None, backends: &[("shop/db", 100.0)],
        // On TCP a Deny's path condition cannot be seen and is dropped: the port is denied.
        authz: Some((false, "AuthorizationPolicy shop/no-admin (Deny)")), rate_limit: None },
    Case { name: "a caller without a proxy has no identity and no routes", from: "web/legacy", method: "GET", url: "http://reviews.shop:9080/", headers: &[("x-canary", "yes")],
        outcome: "forward", rule: None, backends: &[("shop/reviews", 100.0)],
        authz: None, rate_limit: None },
    Case { name: "not a Service at all", from: FROM_WEB, method: "GET", url: "http://example.com/", headers: &[],
        outcome: "passthrough", rule: None, backends: &[], authz: None, rate_limit: None },
];

#[test]
fn explain_answers_each_request_as_the_model_routes_and_guards_it() {
    let m = model();
    assert!(CASES.len() >= 20);
    for c in CASES {
        let req = Request {
            from: c.from.into(),
            method: c.method.into(),
            url: c.url.into(),
            headers: c
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let e = explain(&m, &req).unwrap_or_else(|err| panic!("{}: {err}", c.name));
        let words = e.words.join("\n");
        assert_eq!(outcome(&e.outcome), c.outcome, "{}:\n{words}", c.name);
        let rule = e
            .matched
            .as_ref()
            .or(e.closest.as_ref())
            .map(|r| r.rule.as_str());
        match c.rule {
            Some(want) => assert_eq!(rule, Some(want), "{}:\n{words}", c.name),
            None => assert_eq!(rule, None, "{}:\n{words}", c.name),
        }
        let got: Vec<(String, f64)> = e
            .backends
            .iter()
            .map(|b| (b.service.clone().unwrap_or_default(), b.share))
            .collect();
        let want: Vec<(String, f64)> = c
            .backends
            .iter()
            .map(|(s, p)| (s.to_string(), *p))
            .collect();
        assert_eq!(got, want, "{}:\n{words}", c.name);
        if let Some((allowed, by)) = c.authz {
            let a = e.backends[0]
                .authz
                .first()
                .unwrap_or_else(|| panic!("{}: no authz", c.name));
            assert_eq!(a.allowed, allowed, "{}:\n{words}", c.name);
            assert!(
                a.by.contains(by),
                "{}: {:?} does not name {by:?}",
                c.name,
                a.by
            );
        }
        if let Some(limit) = c.rate_limit {
            let l = e.backends[0]
                .rate_limit
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no rate limit", c.name));
            assert_eq!(l.policy, limit, "{}", c.name);
            assert_eq!(l.requests_per_second, Some(100));
            assert_eq!(l.per_identity_requests_per_second, Some(10));
        }
    }
}

#[test]
fn the_answer_names_what_came_closest_and_the_caller() {
    let m = model();
    let e = explain(
        &m,
        &Request {
            from: FROM_WEB.into(),
            method: "GET".into(),
            url: "http://ratings.shop:9080/public/x".into(),
            headers: vec![],
        },
    )
    .expect("explained");
    assert_eq!(
        e.caller.identity.as_deref(),
        Some(&*format!("{TD}/ns/web/sa/productpage"))
    );
    let closest = e.closest.expect("closest");
    assert_eq!(closest.missed, ["a path under \"/v1\", not \"/public/x\""]);
    assert!(
        e.words
            .iter()
            .any(|w| w.contains("no rule matches: the caller's proxy answers 404"))
    );

    let e = explain(
        &m,
        &Request {
            from: FROM_WEB.into(),
            method: "GET".into(),
            url: "http://reviews.shop:9080/".into(),
            headers: vec![],
        },
    )
    .expect("explained");
    let v1 = &e.backends[0];
    assert_eq!(v1.endpoints, ["10.0.1.1:8080 (shop/reviews-v1-0)"]);
    assert!(
        v1.traffic_policy
            .as_ref()
            .is_some_and(|t| t.to_string().contains("round_robin")),
        "{v1:?}"
    );
    assert!(e.backends[1].traffic_policy.is_none());
}

#[test]
fn endpoints_that_decide_differently_are_told_apart() {
    let m = model();
    let e = explain(
        &m,
        &Request {
            from: FROM_REVIEWS.into(),
            method: "POST".into(),
            url: "http://cart:9080/".into(),
            headers: vec![],
        },
    )
    .expect("explained");
    let decisions: Vec<(Vec<String>, bool)> = e.backends[0]
        .authz
        .iter()
        .map(|a| (a.endpoints.clone(), a.allowed))
        .collect();
    assert_eq!(
        decisions,
        [
            (vec!["10.0.4.1:8080 (shop/cart-v1-0)".to_string()], true),
            (vec!["10.0.4.2:8080 (shop/cart-v2-0)".to_string()], false),
        ],
        "{:#?}",
        e.words
    );
    // IPv6 hosts, and a query without a path.
    assert!(parse_url("http://[fd00::1]/x").is_ok_and(|u| u.host == "fd00::1" && u.port == 80));
    assert!(parse_url("http://[fd00::1]:81/x").is_ok_and(|u| u.port == 81));
    assert!(
        parse_url("http://reviews?x=1")
            .is_ok_and(|u| u.path == "/" && u.query.as_deref() == Some("x=1"))
    );
}

#[test]
fn bad_input_is_named() {
    let m = model();
    let req = |from: &str, method: &str, url: &str| Request {
        from: from.into(),
        method: method.into(),
        url: url.into(),
        headers: vec![],
    };
    assert_eq!(
        explain(&m, &req("productpage", "GET", "http://reviews.shop:9080/")).err(),
        Some(ExplainError::From("productpage".into()))
    );
    assert_eq!(
        explain(&m, &req("web/nobody", "GET", "http://reviews.shop:9080/")).err(),
        Some(ExplainError::NoWorkload("web/nobody".into()))
    );
    assert!(matches!(
        explain(&m, &req(FROM_WEB, "GET", "https://reviews.shop/")),
        Err(ExplainError::Url(..))
    ));
    assert!(matches!(
        explain(&m, &req(FROM_WEB, "GET", "http://reviews.shop:99999/")),
        Err(ExplainError::Url(..))
    ));
    assert!(matches!(
        explain(&m, &req(FROM_WEB, "G E T", "http://reviews.shop:9080/")),
        Err(ExplainError::Method(..))
    ));
}
