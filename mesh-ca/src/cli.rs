//! mesh-ca's command line (`mesh-ca serve|token|init`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mesh_api::consts::env;
use mesh_api::spiffe::DEFAULT_TRUST_DOMAIN;

use crate::run::CaConfig;

#[derive(Debug, Parser)]
#[command(name = "mesh-ca", version, about = "The mesh certificate authority")]
pub struct Cli {
    /// Log format: text or json (the filter is `MESH_LOG`); logs go to stderr.
    #[arg(long, global = true, env = env::LOG_FORMAT, value_enum,
          default_value_t = mesh_api::logging::LogFormat::Text)]
    pub log_format: mesh_api::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the certificate service.
    Serve(CaConfig),
    /// Print a local-mesh token proving a workload's identity (for `mesh-proxy --ca-token`).
    Token {
        /// The CA directory (its `token.key` signs the token).
        #[arg(long, env = env::CA_DIR)]
        dir: PathBuf,
        #[arg(long, env = env::TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        service_account: String,
    },
    /// Create a new self-signed root in an empty directory (the first step of a rotation).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, env = env::TRUST_DOMAIN, default_value = DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}
