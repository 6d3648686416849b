//! The mesh certificate authority: signs SPIFFE X.509 SVIDs for authenticated workloads.

pub mod authority;

pub use authority::{Authority, CaError, Issued};
