//! The mesh control plane: sources (a directory of manifests, or the Kubernetes API) feed one
//! synchronous index; translation turns its model into Envoy v3 resources per proxy; the ADS
//! server pushes them; the admin server shows who is in sync.

pub mod access;
pub mod admin;
pub mod ca_root;
pub mod config;
pub mod explain;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod objects;
pub mod provision;
pub mod rollout;
pub mod run;
pub mod source;
pub mod stats;
pub mod status;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod webhook;
pub mod xds;
