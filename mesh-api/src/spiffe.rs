//! SPIFFE IDs as the SPIFFE-ID standard defines them, and the mesh's workload form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID the standard allows, in bytes.
pub const MAX_LEN: usize = 2048;
/// Longest trust domain the standard allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a string is not a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("spiffe id {0:?} is empty")]
    Empty(String),
    #[error("spiffe id is {len} bytes long: at most {MAX_LEN} are allowed")]
    TooLong { len: usize },
    #[error("spiffe id {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("spiffe id {0:?} has an empty trust domain")]
    EmptyTrustDomain(String),
    #[error("spiffe id {id:?}: trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong { id: String },
    #[error(
        "spiffe id {id:?}: trust domain has {ch:?}; only a-z, 0-9, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar { id: String, ch: char },
    #[error("spiffe id {0:?} has an empty path; a workload id needs one")]
    EmptyPath(String),
    #[error("spiffe id {0:?} has an empty path segment")]
    EmptySegment(String),
    #[error("spiffe id {0:?} has a '.' or '..' path segment")]
    DotSegment(String),
    #[error("spiffe id {id:?}: path has {ch:?}; only a-z, A-Z, 0-9, '.', '-' and '_' are allowed")]
    PathChar { id: String, ch: char },
    #[error("spiffe id {0:?} ends with '/'")]
    TrailingSlash(String),
    #[error(
        "spiffe id {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    NotWorkload(String),
}

/// A validated SPIFFE ID of a workload (its path is never empty).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (the `/` after the trust domain).
    path_at: usize,
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Parses and validates `s`.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty(s.to_string()));
        }
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong { len: s.len() });
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain(s.to_string()));
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong { id: s.to_string() });
        }
        if let Some(ch) = td.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        }) {
            return Err(SpiffeIdError::TrustDomainChar {
                id: s.to_string(),
                ch,
            });
        }
        if path.is_empty() {
            return Err(SpiffeIdError::EmptyPath(s.to_string()));
        }
        if path.ends_with('/') {
            return Err(SpiffeIdError::TrailingSlash(s.to_string()));
        }
        for seg in path[1..].split('/') {
            if seg.is_empty() {
                return Err(SpiffeIdError::EmptySegment(s.to_string()));
            }
            if seg == "." || seg == ".." {
                return Err(SpiffeIdError::DotSegment(s.to_string()));
            }
            if let Some(ch) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(SpiffeIdError::PathChar {
                    id: s.to_string(),
                    ch,
                });
            }
        }
        Ok(Self {
            id: s.to_string(),
            path_at: SCHEME.len() + td.len(),
        })
    }

    /// The mesh identity of a Kubernetes service account.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..self.path_at]
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[self.path_at..]
    }

    /// `(namespace, service account)` when the ID has the mesh's workload form.
    pub fn namespace_and_account(&self) -> Result<(&str, &str), SpiffeIdError> {
        let segs: Vec<&str> = self.path()[1..].split('/').collect();
        match segs.as_slice() {
            ["ns", ns, "sa", sa] => Ok((ns, sa)),
            _ => Err(SpiffeIdError::NotWorkload(self.id.clone())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_round_trip() {
        let id = SpiffeId::workload("cluster.local", "default", "reviews").expect("valid");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/reviews");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/reviews");
        assert_eq!(id.namespace_and_account(), Ok(("default", "reviews")));
        let back: SpiffeId = id.to_string().parse().expect("parses");
        assert_eq!(back, id);
    }

    #[test]
    fn rejects_invalid() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, SpiffeIdError::Empty(_))),
            ("http://td/x", |e| matches!(e, SpiffeIdError::Scheme(_))),
            ("spiffe:///x", |e| {
                matches!(e, SpiffeIdError::EmptyTrustDomain(_))
            }),
            ("spiffe://TD/x", |e| {
                matches!(e, SpiffeIdError::TrustDomainChar { ch: 'T', .. })
            }),
            ("spiffe://td", |e| matches!(e, SpiffeIdError::EmptyPath(_))),
            ("spiffe://td/", |e| {
                matches!(e, SpiffeIdError::TrailingSlash(_))
            }),
            ("spiffe://td/a//b", |e| {
                matches!(e, SpiffeIdError::EmptySegment(_))
            }),
            ("spiffe://td/a/../b", |e| {
                matches!(e, SpiffeIdError::DotSegment(_))
            }),
            ("spiffe://td/a b", |e| {
                matches!(e, SpiffeIdError::PathChar { ch: ' ', .. })
            }),
            (&long, |e| matches!(e, SpiffeIdError::TooLong { .. })),
        ];
        for (input, check) in cases {
            let err = SpiffeId::parse(input).expect_err(input);
            assert!(check(&err), "{input:?} gave {err:?}");
        }
    }

    #[test]
    fn not_workload_form() {
        let id = SpiffeId::parse("spiffe://td/some/other/path").expect("valid id");
        assert!(matches!(
            id.namespace_and_account(),
            Err(SpiffeIdError::NotWorkload(_))
        ));
    }

    #[test]
    fn max_len_is_inclusive() {
        let prefix = "spiffe://td/";
        let s = format!("{prefix}{}", "a".repeat(MAX_LEN - prefix.len()));
        assert_eq!(s.len(), MAX_LEN);
        assert!(SpiffeId::parse(&s).is_ok());
    }
}
