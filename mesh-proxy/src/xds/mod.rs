//! The xDS client: one ADS stream to the controller (Delta preferred, state of the world
//! supported), resources converted into snapshots by the [`cache`], ACKs for what is applied
//! and NACKs naming the resource and field for what is not. While the controller is away the
//! last good snapshot keeps serving; the stream is re-opened on the next controller replica at
//! once, and after a round in which every replica failed, with jittered backoff (`servers`).

pub mod cache;
pub mod client;
pub mod on_demand;
pub(crate) mod servers;

pub use client::{XdsClient, XdsStatus};
