//! Checking an X.509 SVID leaf as the SPIFFE X509-SVID standard says: exactly one URI SAN
//! holding a valid SPIFFE ID in the expected trust domain, not a CA, no certificate signing,
//! digitalSignature, the extended key usage for its role, and inside its validity period. The
//! chain itself (signature up to a trusted root) is checked by the TLS layer; this is what
//! comes after, and each refusal has its own reason for logs and metrics.

use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Which side of the connection the certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A client certificate: needs the clientAuth extended key usage.
    Client,
    /// A server certificate: needs serverAuth.
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate does not parse: {0}")]
    Parse(String),
    #[error("certificate expired at {not_after} (unix seconds)")]
    Expired { not_after: i64 },
    #[error("certificate is not valid before {not_before} (unix seconds)")]
    NotYetValid { not_before: i64 },
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; an SVID has exactly one")]
    ManyUriSans(usize),
    #[error("URI SAN: {0}")]
    BadId(SpiffeIdError),
    #[error("trust domain {got:?} is not the mesh's {want:?}")]
    TrustDomain { got: String, want: String },
    #[error("a leaf SVID must not be a CA (basicConstraints CA=true)")]
    IsCa,
    #[error("a leaf SVID must not have the keyCertSign key usage")]
    KeyCertSign,
    #[error("key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("extended key usage lacks {0}")]
    MissingEku(&'static str),
    #[error("peer is {got}, expected {want}")]
    WrongIdentity { got: String, want: String },
}

impl SvidError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::Parse(_) => "parse",
            SvidError::Expired { .. } => "expired",
            SvidError::NotYetValid { .. } => "not_yet_valid",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::ManyUriSans(_) => "many_uri_sans",
            SvidError::BadId(SpiffeIdError::TooLong { .. }) => "spiffe_id_too_long",
            SvidError::BadId(SpiffeIdError::EmptyPath(_)) => "spiffe_id_empty_path",
            SvidError::BadId(_) => "bad_spiffe_id",
            SvidError::TrustDomain { .. } => "trust_domain",
            SvidError::IsCa => "leaf_is_ca",
            SvidError::KeyCertSign => "key_cert_sign",
            SvidError::NoDigitalSignature => "no_digital_signature",
            SvidError::MissingEku("clientAuth") => "missing_client_auth",
            SvidError::MissingEku(_) => "missing_server_auth",
            SvidError::WrongIdentity { .. } => "wrong_identity",
        }
    }
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Checks a DER leaf certificate presented as an SVID in `trust_domain`, at time `now`, and
/// returns its SPIFFE ID. `expected`: the identity the control plane said the peer has.
pub fn check_leaf(
    der: &[u8],
    role: Role,
    trust_domain: &str,
    expected: Option<&SpiffeId>,
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse(e.to_string()))?;
    let validity = cert.validity();
    let now = unix(now);
    if now < validity.not_before.timestamp() {
        return Err(SvidError::NotYetValid {
            not_before: validity.not_before.timestamp(),
        });
    }
    if now > validity.not_after.timestamp() {
        return Err(SvidError::Expired {
            not_after: validity.not_after.timestamp(),
        });
    }
    let parse = |e: x509_parser::error::X509Error| SvidError::Parse(e.to_string());
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(parse)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::ManyUriSans(many.len())),
    };
    // Parsing refuses an empty path (an SVID names a workload) and IDs over 2,048 bytes.
    let id = SpiffeId::parse(uri).map_err(SvidError::BadId)?;
    if id.trust_domain() != trust_domain {
        return Err(SvidError::TrustDomain {
            got: id.trust_domain().to_string(),
            want: trust_domain.to_string(),
        });
    }
    if cert
        .basic_constraints()
        .map_err(parse)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::IsCa);
    }
    if let Some(ku) = cert.key_usage().map_err(parse)? {
        if ku.value.key_cert_sign() {
            return Err(SvidError::KeyCertSign);
        }
        if !ku.value.digital_signature() {
            return Err(SvidError::NoDigitalSignature);
        }
    } else {
        return Err(SvidError::NoDigitalSignature);
    }
    let eku = cert.extended_key_usage().map_err(parse)?;
    let (needed, has) = match role {
        Role::Client => ("clientAuth", eku.is_some_and(|e| e.value.client_auth)),
        Role::Server => ("serverAuth", eku.is_some_and(|e| e.value.server_auth)),
    };
    if !has {
        return Err(SvidError::MissingEku(needed));
    }
    if let Some(want) = expected
        && want != &id
    {
        return Err(SvidError::WrongIdentity {
            got: id.to_string(),
            want: want.to_string(),
        });
    }
    Ok(id)
}

#[cfg(test)]
#[path = "svid_tests.rs"]
mod tests;
