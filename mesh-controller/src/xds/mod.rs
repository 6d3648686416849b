//! Envoy v3 xDS: translation of the model into resources, and the ADS server that serves them.

pub(crate) mod build;
pub mod canonical;
pub mod gateway;
pub mod learned;
mod pb;
pub mod policy;
pub mod resources;
pub mod server;
pub mod status;
pub mod traffic;
pub mod translate;
