//! The mesh's sidecar data plane: an xDS-driven proxy for HTTP/1.1, HTTP/2, gRPC, WebSocket and
//! opaque TCP. It builds on `mesh-api` without its `k8s` feature, so it never compiles kube.

pub mod access_log;
pub mod admin;
pub mod agent;
pub mod app_probe;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod identity;
pub mod init;
pub mod metrics;
pub mod overload;
pub mod policy;
pub mod proxy;
pub mod retry;
pub mod run;
pub mod state;
pub mod trace;
pub mod xds;

pub use config::Config;
pub use run::{Proxy, StartError};
