//! The mesh certificate authority: signs SPIFFE X.509 SVIDs for authenticated workloads.
//!
//! - [`authority`]: the signing key and what it signs;
//! - [`auth`]: who is calling (Kubernetes TokenReview, or local-mesh tokens);
//! - [`service`]: the gRPC certificate service;
//! - [`run`]: settings and the running server.

pub mod auth;
pub mod authority;
pub mod cli;
pub mod metrics;
pub mod run;
pub mod secret;
pub mod service;

pub use authority::{Authority, CaError, Issued};
