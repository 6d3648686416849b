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
pub mod inject;
#[cfg(feature = "process")]
pub mod process;
pub mod prom;
pub mod spiffe;
#[cfg(feature = "x509")]
pub mod svid;
#[cfg(all(test, feature = "x509"))]
mod svid_cases;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "k8s")]
pub use gateway_api;
#[cfg(feature = "k8s")]
pub use k8s_openapi;
pub use spiffe::{SpiffeId, SpiffeIdError};
