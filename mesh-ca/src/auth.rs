//! Who is calling: a workload proves its identity with a bearer token.
//!
//! - In Kubernetes, a projected service-account token bound to the CA's audience, checked with
//!   a TokenReview: `system:serviceaccount:<ns>:<sa>` becomes
//!   `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//! - In the local mesh, a token the local mesh issued for the workload: the SPIFFE ID and an
//!   HMAC-SHA256 over it with a key kept beside the CA key (`token.key`, mode 0600).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use mesh_api::SpiffeId;

/// Prefix of local-mesh tokens.
const LOCAL_PREFIX: &str = "mesh-local.v1.";
/// File holding the local-mesh token key in a CA directory.
pub const TOKEN_KEY_FILE: &str = "token.key";
/// Audience a Kubernetes token must be bound to, unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "mesh-ca";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the `authorization` metadata")]
    Missing,
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("token review failed: {0}")]
    Backend(String),
}

impl AuthError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "no_token",
            AuthError::Invalid(_) => "bad_token",
            AuthError::Backend(_) => "token_review_failed",
        }
    }
}

/// Issues and checks local-mesh tokens.
pub struct LocalTokens {
    key: ring::hmac::Key,
    trust_domain: String,
}

impl std::fmt::Debug for LocalTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("LocalTokens")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl LocalTokens {
    pub fn new(secret: &[u8], trust_domain: &str) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            trust_domain: trust_domain.to_string(),
        }
    }

    /// The key kept in `dir/token.key`, created (32 random bytes, mode 0600) if missing; a
    /// file others can read is refused.
    pub fn load_or_generate(
        dir: &std::path::Path,
        trust_domain: &str,
    ) -> Result<Self, crate::CaError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let path = dir.join(TOKEN_KEY_FILE);
        let file_err = |source| crate::CaError::File {
            path: path.clone(),
            source,
        };
        if path.exists() {
            let mode = std::fs::metadata(&path)
                .map_err(file_err)?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(crate::CaError::KeyMode {
                    path,
                    mode: mode & 0o777,
                });
            }
            let secret = std::fs::read(&path).map_err(file_err)?;
            return Ok(Self::new(&secret, trust_domain));
        }
        std::fs::create_dir_all(dir).map_err(file_err)?;
        let secret: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(file_err)?;
        f.write_all(&secret).map_err(file_err)?;
        Ok(Self::new(&secret, trust_domain))
    }

    /// A token proving `id`.
    pub fn issue(&self, id: &SpiffeId) -> String {
        let tag = ring::hmac::sign(&self.key, id.as_str().as_bytes());
        format!(
            "{LOCAL_PREFIX}{}.{}",
            B64.encode(id.as_str()),
            B64.encode(tag.as_ref())
        )
    }

    pub fn verify(&self, token: &str) -> Result<SpiffeId, AuthError> {
        let bad = |why: &str| AuthError::Invalid(format!("local mesh token: {why}"));
        let rest = token
            .strip_prefix(LOCAL_PREFIX)
            .ok_or_else(|| bad("unknown format"))?;
        let (id, tag) = rest.split_once('.').ok_or_else(|| bad("unknown format"))?;
        let id = B64
            .decode(id)
            .map_err(|_| bad("identity is not base64url"))?;
        let tag = B64
            .decode(tag)
            .map_err(|_| bad("signature is not base64url"))?;
        ring::hmac::verify(&self.key, &id, &tag).map_err(|_| bad("signature does not match"))?;
        let id = String::from_utf8(id).map_err(|_| bad("identity is not UTF-8"))?;
        let id = SpiffeId::parse(&id).map_err(|e| bad(&e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(bad(&format!(
                "issued for trust domain {:?}, this CA serves {:?}",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

/// Checks Kubernetes service-account tokens with the TokenReview API.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    trust_domain: String,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str, trust_domain: &str) -> Self {
        Self {
            client,
            audience: audience.to_string(),
            trust_domain: trust_domain.to_string(),
        }
    }

    pub async fn review(&self, token: &str) -> Result<SpiffeId, AuthError> {
        use mesh_api::token_review::{ReviewError, review_token};
        let user = review_token(&self.client, token, &self.audience)
            .await
            .map_err(|e| match e {
                ReviewError::Backend(m) => AuthError::Backend(m),
                refused => AuthError::Invalid(refused.to_string()),
            })?;
        let username = user.username.unwrap_or_default();
        let (ns, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| AuthError::Invalid(format!("{username:?} is not a service account")))?;
        SpiffeId::workload(&self.trust_domain, ns, sa)
            .map_err(|e| AuthError::Invalid(format!("service account {ns}/{sa}: {e}")))
    }
}

/// The ways this CA accepts callers.
#[derive(Debug, Default)]
pub struct Authenticator {
    pub local: Option<LocalTokens>,
    pub kubernetes: Option<TokenReviewer>,
}

impl Authenticator {
    /// The identity `token` proves: a local-mesh token by its signature, any other by
    /// TokenReview.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<SpiffeId, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        if token.starts_with(LOCAL_PREFIX)
            && let Some(local) = &self.local
        {
            return local.verify(token);
        }
        match &self.kubernetes {
            Some(k) => k.review(token).await,
            None => Err(AuthError::Invalid(
                "not a local mesh token, and this CA does not check Kubernetes tokens".into(),
            )),
        }
    }
}

#[cfg(test)]
#[path = "auth_tests.rs"]
mod tests;
