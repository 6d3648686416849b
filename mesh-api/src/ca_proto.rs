//! The certificate service's messages and gRPC client and server, generated from
//! `proto/mesh/ca/v1/ca.proto`.

#![allow(missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("mesh.ca.v1");

/// Metadata key carrying the caller's token, as `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
