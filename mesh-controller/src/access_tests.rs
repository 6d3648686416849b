use mesh_api::fake_api::{API_AUDIENCE, FakeApi, Token};
use serde_json::json;

use super::*;

const NS: &str = "mesh-system";

fn addr(a: &str) -> Option<SocketAddr> {
    Some(a.parse().expect("address"))
}

fn bearer_header(token: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("Bearer {token}")).expect("header")
}

const POD: &str = "10.244.1.7:41000";
const LOCAL: &str = "127.0.0.1:5000";

/// A fake API server where `ops/tool` is bound to a reader role in mesh-system and `web/app`
/// to nothing; tokens `reader` and `other` are theirs, for the controller's audience.
fn cluster() -> (kube::Client, FakeApi) {
    let (client, fake) = FakeApi::start();
    {
        let mut s = fake.state();
        for (token, ns, sa, audience) in [
            ("reader", "ops", "tool", CONTROLLER_AUDIENCE),
            ("other", "web", "app", CONTROLLER_AUDIENCE),
            ("for-the-ca", "ops", "tool", "mesh-ca"),
            ("for-the-api-server", "ops", "tool", API_AUDIENCE),
        ] {
            s.tokens.insert(token.into(), Token::new(ns, sa, audience));
        }
    }
    fake.insert(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": READER_ROLE},
        "rules": [{"apiGroups": [DEBUG_GROUP], "resources": [DEBUG_RESOURCE], "verbs": [DEBUG_VERB]}]}));
    fake.insert(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tool-reads", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER_ROLE},
        "subjects": [{"kind": "ServiceAccount", "name": "tool", "namespace": "ops"}]}));
    (client, fake)
}

fn token_reviews(fake: &FakeApi) -> usize {
    fake.state()
        .log
        .iter()
        .filter(|l| l.path.ends_with("/tokenreviews"))
        .count()
}

/// What a caller at `peer` naming the server `host` with `token` gets at `now`.
async fn judge(
    access: &Access,
    peer: Option<SocketAddr>,
    host: Option<&str>,
    token: Option<&str>,
    now: Instant,
) -> Verdict {
    let h = token.map(bearer_header);
    let caller = Caller {
        peer,
        host,
        authorization: h.as_ref(),
    };
    access.judge(caller, now).await
}

#[tokio::test]
async fn a_token_reads_the_debug_api_only_where_rbac_allows_its_user() {
    let (client, _fake) = cluster();
    let access = Access::kubernetes(client, NS);
    let now = Instant::now();
    let from_pod = |token: Option<&'static str>| {
        let access = access.clone();
        async move { judge(&access, addr(POD), Some("10.96.0.5:15014"), token, now).await }
    };
    assert_eq!(from_pod(Some("reader")).await, Verdict::Allowed);
    match from_pod(Some("other")).await {
        Verdict::Forbidden(m) => {
            assert!(m.contains("\"system:serviceaccount:web:app\""), "{m}");
            assert!(
                m.contains("get debug in API group mesh.dev in namespace mesh-system"),
                "{m}"
            );
            assert!(m.contains(READER_ROLE), "{m}");
        }
        v => panic!("a user without the role: {v:?}"),
    }
    match from_pod(Some("made-up")).await {
        Verdict::Unauthenticated(m) => assert!(m.contains("invalid bearer token"), "{m}"),
        v => panic!("an unknown token: {v:?}"),
    }
    // Tokens for another audience, the API server's included, open nothing here.
    for other in ["for-the-ca", "for-the-api-server"] {
        match from_pod(Some(other)).await {
            Verdict::Unauthenticated(m) => {
                assert!(
                    m.contains("audiences") && m.contains("--audience mesh-controller"),
                    "{m}"
                )
            }
            v => panic!("{other}: {v:?}"),
        }
    }
    match from_pod(None).await {
        Verdict::Unauthenticated(m) => assert!(m.contains("bearer token"), "{m}"),
        v => panic!("another pod without a token: {v:?}"),
    }
    assert_eq!(
        judge(&access, None, None, None, now).await,
        from_pod(None).await
    );
    // The pod's loopback: a port-forward or an exec, which RBAC let in.
    for (peer, host) in [
        (LOCAL, Some("localhost")),
        (LOCAL, Some("LOCALHOST:15014")),
        (LOCAL, Some("127.0.0.1:15014")),
        ("[::1]:5000", Some("[::1]:15014")),
        ("[::1]:5000", Some("[::1]")),
        ("[::1]:5000", Some("::1")),
        (LOCAL, None),
    ] {
        assert_eq!(
            judge(&access, addr(peer), host, None, now).await,
            Verdict::Allowed,
            "{peer} {host:?}"
        );
    }
    // A token is judged wherever it comes from.
    assert!(matches!(
        judge(&access, addr(LOCAL), Some("localhost"), Some("other"), now).await,
        Verdict::Forbidden(_)
    ));
    let basic = HeaderValue::from_static("Basic dXNlcjpwYXNz");
    let caller = Caller {
        peer: addr(POD),
        host: None,
        authorization: Some(&basic),
    };
    assert!(matches!(
        access.judge(caller, now).await,
        Verdict::Unauthenticated(m) if m.contains("Bearer <token>")
    ));
}

#[tokio::test]
async fn a_page_rebound_to_the_loopback_is_refused() {
    let (client, _fake) = cluster();
    let now = Instant::now();
    for access in [Access::Loopback, Access::kubernetes(client, NS)] {
        for host in [
            "attacker.example:15014",
            "attacker.example",
            "localhost.attacker.example",
            "localhost.",
            "",
        ] {
            let v = judge(&access, addr(LOCAL), Some(host), None, now).await;
            assert_ne!(v, Verdict::Allowed, "{access:?} {host}");
        }
    }
}

#[tokio::test]
async fn decisions_are_kept_for_a_while_then_asked_again() {
    let (client, fake) = cluster();
    let access = Access::kubernetes(client, NS);
    let t0 = Instant::now();
    let ask = |at: Instant| judge(&access, addr(POD), None, Some("reader"), at);
    assert_eq!(ask(t0).await, Verdict::Allowed);
    let asked = token_reviews(&fake);
    assert_eq!(asked, 1);
    // The binding goes; the kept decision stands until it is CACHED_FOR old.
    fake.state()
        .objects
        .retain(|_, o| o["kind"] != "RoleBinding");
    assert_eq!(
        ask(t0 + CACHED_FOR - Duration::from_millis(1)).await,
        Verdict::Allowed
    );
    assert_eq!(token_reviews(&fake), asked, "answered from the cache");
    assert!(matches!(ask(t0 + CACHED_FOR).await, Verdict::Forbidden(_)));
    assert_eq!(token_reviews(&fake), asked + 1);
}

#[tokio::test]
async fn made_up_tokens_neither_grow_the_cache_past_its_bound_nor_push_out_a_readers_decision() {
    let (client, fake) = cluster();
    let access = Access::kubernetes(client, NS);
    let Access::Kubernetes(reviewer) = &access else {
        unreachable!("a cluster's access")
    };
    let now = Instant::now();
    assert_eq!(
        judge(&access, addr(POD), None, Some("reader"), now).await,
        Verdict::Allowed
    );
    for i in 0..CACHED_TOKENS + 10 {
        let t = format!("made-up-{i}");
        let later = now + Duration::from_millis(1 + i as u64);
        assert!(matches!(
            judge(&access, addr(POD), None, Some(&t), later).await,
            Verdict::Unauthenticated(_)
        ));
    }
    assert_eq!(reviewer.cached_tokens(), CACHED_TOKENS);
    // Refusals went first: the reader's decision, older than all of them, is still kept.
    let before = token_reviews(&fake);
    let later = now + Duration::from_secs(1);
    assert_eq!(
        judge(&access, addr(POD), None, Some("reader"), later).await,
        Verdict::Allowed
    );
    assert_eq!(token_reviews(&fake), before, "answered from the cache");
    // The newest refusal is kept too; the oldest went.
    let newest = format!("made-up-{}", CACHED_TOKENS + 9);
    assert!(matches!(
        judge(&access, addr(POD), None, Some(&newest), later).await,
        Verdict::Unauthenticated(_)
    ));
    assert_eq!(token_reviews(&fake), before, "answered from the cache");
    assert!(matches!(
        judge(&access, addr(POD), None, Some("made-up-0"), later).await,
        Verdict::Unauthenticated(_)
    ));
    assert_eq!(token_reviews(&fake), before + 1, "asked again");
    // Once expired, decisions go before anything else is pushed out.
    let much_later = now + CACHED_FOR + Duration::from_secs(5);
    assert!(matches!(
        judge(&access, addr(POD), None, Some("another"), much_later).await,
        Verdict::Unauthenticated(_)
    ));
    assert_eq!(
        reviewer.cached_tokens(),
        1,
        "every older decision had expired"
    );
    let before = before + 2;
    // A token too long to be one is refused unread.
    let long = "x".repeat(MAX_TOKEN + 1);
    assert!(matches!(
        judge(&access, addr(POD), None, Some(&long), later).await,
        Verdict::Unauthenticated(m) if m.contains("longer than")
    ));
    assert_eq!(token_reviews(&fake), before, "not reviewed");
}

#[tokio::test]
async fn an_authenticator_that_ignores_audiences_is_not_believed() {
    let (client, fake) = cluster();
    let access = Access::kubernetes(client, NS);
    fake.state().audience_unaware = true;
    match judge(
        &access,
        addr(POD),
        None,
        Some("for-the-api-server"),
        Instant::now(),
    )
    .await
    {
        Verdict::Unauthenticated(m) => assert!(m.contains("without checking its audience"), "{m}"),
        v => panic!("{v:?}"),
    }
}

#[tokio::test]
async fn an_api_server_that_cannot_answer_is_unavailable_and_not_remembered() {
    let (client, fake) = cluster();
    let access = Access::kubernetes(client, NS);
    let now = Instant::now();
    fake.state().fail_all = Some(500);
    assert!(matches!(
        judge(&access, addr(POD), None, Some("reader"), now).await,
        Verdict::Unavailable(m) if m.contains("reviewing the token")
    ));
    fake.state().fail_all = None;
    assert_eq!(
        judge(&access, addr(POD), None, Some("reader"), now).await,
        Verdict::Allowed
    );
}

#[tokio::test]
async fn without_kubernetes_only_loopback_callers_are_served() {
    let now = Instant::now();
    for local in ["127.0.0.1:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
        assert_eq!(
            judge(
                &Access::Loopback,
                addr(local),
                Some("127.0.0.1:15014"),
                None,
                now
            )
            .await,
            Verdict::Allowed,
            "{local}"
        );
    }
    for other in [addr("192.168.1.20:1"), addr("[fe80::1]:1"), None] {
        match judge(&Access::Loopback, other, None, Some("any"), now).await {
            Verdict::Forbidden(m) => assert!(m.contains("loopback callers only"), "{m}"),
            v => panic!("{other:?}: {v:?}"),
        }
    }
}

/// The gate as the admin server wears it (a layer over every route and the fallback): open
/// paths answer a pod, every other path (unknown ones and path tricks too) answers it 401.
#[tokio::test]
async fn the_gate_opens_scrapes_and_probes_to_pods_and_nothing_else() {
    use axum::body::Body;
    use tower::ServiceExt;
    let (client, _fake) = cluster();
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(|| async { "m" }))
        .route("/ready", axum::routing::get(|| async { "r" }))
        .route("/live", axum::routing::get(|| async { "l" }))
        .route("/debug/stat", axum::routing::get(|| async { "s" }))
        .route("/graph", axum::routing::get(|| async { "g" }))
        .layer(axum::middleware::from_fn_with_state(
            Access::kubernetes(client, NS),
            guard,
        ));
    let get = |path: &str, peer: &str| {
        let host = if peer == LOCAL {
            "attacker.example:15014"
        } else {
            "10.96.0.5:15014"
        };
        let req = axum::http::Request::get(path)
            .header("host", host)
            .extension(ConnectInfo(peer.parse::<SocketAddr>().expect("peer")))
            .body(Body::empty())
            .expect("request");
        let app = app.clone();
        async move { app.oneshot(req).await.expect("answer").status().as_u16() }
    };
    for open in ["/metrics", "/ready", "/live"] {
        assert_eq!(get(open, POD).await, 200, "{open}");
    }
    for closed in [
        "/debug/stat",
        "/graph",
        "/debug/",
        "/debug/nope",
        "//metrics",
        "/metrics/",
        "/%6detrics",
        "/ready/../debug/stat",
        "/",
    ] {
        assert_eq!(get(closed, POD).await, 401, "{closed}");
    }
    assert_eq!(get("/debug/stat", LOCAL).await, 401, "a rebinding name");
    assert_eq!(get("/metrics", LOCAL).await, 200);
    // A port-forward: the loopback, naming the server locally.
    let req = axum::http::Request::get("/debug/stat")
        .header("host", "localhost:15014")
        .extension(ConnectInfo(LOCAL.parse::<SocketAddr>().expect("peer")))
        .body(Body::empty())
        .expect("request");
    let local = app.clone().oneshot(req).await.expect("answer").status();
    assert_eq!(local, 200);
}

#[test]
fn scrapes_and_probes_are_open_and_nothing_else() {
    for open in ["/metrics", "/ready", "/live"] {
        assert!(is_open(open), "{open}");
    }
    for closed in [
        "/debug/stat",
        "/graph",
        "/debug/",
        "/metrics/x",
        "/",
        "/nope",
    ] {
        assert!(!is_open(closed), "{closed}");
    }
}

/// An API server that takes the request and never answers: the caller gets 503 once
/// REVIEW_TIMEOUT has passed, and the slot is free again for the next.
#[tokio::test(start_paused = true)]
async fn a_review_the_api_server_never_answers_ends_in_503_within_the_timeout() {
    let (svc, _never_answers) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let access = Access::kubernetes(kube::Client::new(svc, "default"), NS);
    let started = tokio::time::Instant::now();
    // One more than there are slots: a slot kept by a review that timed out would make the
    // last wait for one, and say so.
    let n = CONCURRENT_REVIEWS + 1;
    for i in 0..n {
        let token = format!("t{i}");
        match judge(&access, addr(POD), None, Some(&token), Instant::now()).await {
            Verdict::Unavailable(m) => assert!(m.contains("did not review the token"), "{m}"),
            v => panic!("{v:?}"),
        }
    }
    assert_eq!(started.elapsed(), REVIEW_TIMEOUT * n as u32);
}
