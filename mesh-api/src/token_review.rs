//! Who a bearer token is, as the API server says (TokenReview), for one audience: mesh-ca's
//! workload tokens and the callers of the controller's debug API.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server could not be asked, or answered nothing readable.
    #[error("{0}")]
    Backend(String),
    /// It did not authenticate the token; its words.
    #[error("{0}")]
    Refused(String),
    /// It authenticated the token without naming the audience asked for: an authenticator that
    /// ignores audiences, so the token may have been meant for someone else (the API server).
    #[error(
        "the token is not bound to audience {0:?} (the API server authenticated it without checking its audience)"
    )]
    AudienceUnchecked(String),
}

/// The user `token` is, if the API server authenticates it for `audience` and says so.
pub async fn review_token(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<UserInfo, ReviewError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let status = kube::Api::<TokenReview>::all(client.clone())
        .create(&kube::api::PostParams::default(), &review)
        .await
        .map_err(|e| ReviewError::Backend(e.to_string()))?
        .status
        .ok_or_else(|| ReviewError::Backend("the TokenReview came back without status".into()))?;
    if status.authenticated != Some(true) {
        return Err(ReviewError::Refused(status.error.unwrap_or_else(|| {
            "the API server did not authenticate it".into()
        })));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(ReviewError::AudienceUnchecked(audience.to_owned()));
    }
    status
        .user
        .ok_or_else(|| ReviewError::Backend("the TokenReview names no user".into()))
}
