//! meshctl: the mesh's command-line tool. The binary is a thin wrapper; commands live here so
//! tests can call them.

pub mod admin;
pub mod cluster;
pub mod cmd;
pub mod demo;
pub mod demo_service;
pub mod install;
pub mod mesh;
pub mod output;
pub mod progress;
