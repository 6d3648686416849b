//! Token checks: local-mesh tokens by signature, Kubernetes tokens with a TokenReview against
//! kube-rs's mock client.

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;

const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

#[test]
fn local_tokens_prove_the_identity_they_were_issued_for() {
    let tokens = LocalTokens::new(b"secret", "cluster.local");
    let id = SpiffeId::parse(ID).expect("id");
    let token = tokens.issue(&id);
    assert_eq!(tokens.verify(&token).expect("valid"), id);

    // Another key, a changed identity, garbage: refused, each saying why.
    let other = LocalTokens::new(b"other", "cluster.local");
    let err = other.verify(&token).expect_err("other key");
    assert!(
        err.to_string().contains("signature does not match"),
        "{err}"
    );
    let forged = token.replacen(
        &B64.encode(ID),
        &B64.encode("spiffe://cluster.local/ns/kube-system/sa/admin"),
        1,
    );
    assert!(tokens.verify(&forged).is_err());
    let err = tokens.verify("garbage").expect_err("garbage");
    assert!(err.to_string().contains("unknown format"), "{err}");
    let foreign = LocalTokens::new(b"secret", "other.domain");
    let err = foreign.verify(&token).expect_err("trust domain");
    assert!(err.to_string().contains("trust domain"), "{err}");
}

#[test]
fn the_token_key_file_is_private_and_kept() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let first = LocalTokens::load_or_generate(dir.path(), "cluster.local").expect("created");
    let mode = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE))
        .expect("file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = LocalTokens::load_or_generate(dir.path(), "cluster.local").expect("loaded");
    let id = SpiffeId::parse(ID).expect("id");
    assert_eq!(again.verify(&first.issue(&id)).expect("same key"), id);
    assert!(!format!("{first:?}").contains("key:"));
}

/// Answers one TokenReview with `status`, after checking what was asked.
async fn answer_review(handle: &mut mock::Handle<Request<Body>, Response<Body>>, status: Value) {
    let (req, send) = handle.next_request().await.expect("a request");
    assert_eq!(req.method(), Method::POST);
    assert_eq!(
        req.uri().path(),
        "/apis/authentication.k8s.io/v1/tokenreviews"
    );
    let body = req.into_body().collect_bytes().await.expect("body");
    let review: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(review["spec"]["token"], "sa-token");
    assert_eq!(review["spec"]["audiences"], json!(["mesh-ca"]));
    let mut out = review;
    out["status"] = status;
    send.send_response(
        Response::builder()
            .status(201)
            .body(Body::from(serde_json::to_vec(&out).expect("json")))
            .expect("response"),
    );
}

async fn review(status: Value) -> Result<SpiffeId, AuthError> {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let auth = Authenticator {
        local: Some(LocalTokens::new(b"secret", "cluster.local")),
        kubernetes: Some(TokenReviewer::new(
            client,
            DEFAULT_AUDIENCE,
            "cluster.local",
        )),
    };
    let server = tokio::spawn(async move { answer_review(&mut handle, status).await });
    let got = auth.authenticate(Some("sa-token")).await;
    server.await.expect("mock server");
    got
}

#[tokio::test]
async fn a_reviewed_service_account_token_gives_its_spiffe_id() {
    let got = review(json!({
        "authenticated": true,
        "audiences": ["mesh-ca"],
        "user": {"username": "system:serviceaccount:default:reviews"}
    }))
    .await
    .expect("authenticated");
    assert_eq!(got.as_str(), ID);
}

#[tokio::test]
async fn token_reviews_that_do_not_prove_a_service_account_are_refused() {
    let cases = [
        (
            json!({"authenticated": false, "error": "token has expired"}),
            "token has expired",
        ),
        (
            json!({"authenticated": true, "user": {"username": "system:serviceaccount:default:reviews"}}),
            "not bound to audience",
        ),
        (
            json!({"authenticated": true, "audiences": ["other"], "user": {"username": "system:serviceaccount:default:reviews"}}),
            "not bound to audience",
        ),
        (
            json!({"authenticated": true, "audiences": ["mesh-ca"], "user": {"username": "alice"}}),
            "not a service account",
        ),
    ];
    for (status, want) in cases {
        let err = review(status.clone()).await.expect_err("refused");
        assert!(err.to_string().contains(want), "{status}: {err}");
        assert_eq!(err.reason(), "bad_token");
    }
}

#[tokio::test]
async fn without_a_token_or_a_way_to_check_it_the_caller_is_refused() {
    let auth = Authenticator {
        local: Some(LocalTokens::new(b"secret", "cluster.local")),
        kubernetes: None,
    };
    assert_eq!(
        auth.authenticate(None).await.expect_err("none").reason(),
        "no_token"
    );
    let err = auth
        .authenticate(Some("sa-token"))
        .await
        .expect_err("no k8s");
    assert!(
        err.to_string().contains("does not check Kubernetes"),
        "{err}"
    );
}
