//! Types shared by every part of the mesh: ports, labels, annotations, environment names,
//! SPIFFE IDs and, behind the `k8s` feature, our CRDs and the Gateway API types; behind
//! `process`, what the binaries share about their lifecycle; behind `ca-proto`, the certificate
//! service's gRPC code.

#[cfg(feature = "backoff")]
pub mod backoff;
#[cfg(feature = "ca-proto")]
pub mod ca_proto;
pub mod consts;
#[cfg(feature = "k8s")]
pub mod crds;
pub mod duration;
#[cfg(feature = "fake-api")]
pub mod fake_api;
#[cfg(any(test, feature = "testing"))]
pub mod generated;
pub mod inject;
#[cfg(feature = "logging")]
pub mod logging;
pub mod path;
pub mod probes;
#[cfg(feature = "process")]
pub mod process;
pub mod prom;
#[cfg(feature = "k8s")]
pub mod rollout;
#[cfg(feature = "k8s")]
pub mod root_configmap;
#[cfg(feature = "k8s")]
pub mod route_doc;
#[cfg(feature = "k8s")]
pub mod schema;
#[cfg(feature = "k8s")]
pub mod schema_builtin;
#[cfg(feature = "k8s")]
pub mod schema_cel;
pub mod spiffe;
#[cfg(feature = "x509")]
pub mod svid;
#[cfg(all(test, feature = "x509"))]
mod svid_cases;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "k8s")]
pub mod token_review;
pub mod workload;

#[cfg(feature = "k8s")]
pub use gateway_api;
#[cfg(feature = "k8s")]
pub use k8s_openapi;
pub use spiffe::{SpiffeId, SpiffeIdError};

/// A percentage from 0 to 100 (`1`, `0.5`, `25%`); an error names the text.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim().trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

/// Whether a proxy can send spans to this collector address: an `http://` URL (OTLP/gRPC in
/// plaintext; TLS to the collector is not supported). The error says why not.
pub fn check_otlp_endpoint(s: &str) -> Result<(), &'static str> {
    if s.starts_with("http://") {
        Ok(())
    } else {
        Err(
            "expected an http:// URL (spans are sent in plaintext gRPC; TLS to the collector is not supported)",
        )
    }
}

/// A JSON merge patch (RFC 7386, also how Helm merges values files): objects merge key by key,
/// `null` deletes a key, anything else replaces.
pub fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    use serde_json::Value;
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(&k);
                } else {
                    merge_patch(t.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p,
    }
}
