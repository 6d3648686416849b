//! The xDS client: one ADS stream to the controller (Delta preferred, state of the world
//! supported), resources converted into snapshots by the [`cache`], ACKs for what is applied
//! and NACKs naming the resource and field for what is not. While the controller is away the
//! last good snapshot keeps serving; the stream is re-opened with jittered exponential backoff.

pub mod cache;
pub mod client;

pub use client::{XdsClient, XdsStatus};
