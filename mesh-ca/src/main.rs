use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_api::SpiffeId;
use mesh_api::consts::env;
use mesh_api::spiffe::DEFAULT_TRUST_DOMAIN;
use mesh_ca::auth::LocalTokens;
use mesh_ca::run::{CaConfig, Running};

#[derive(Debug, Parser)]
#[command(name = "mesh-ca", version, about = "The mesh certificate authority")]
struct Cli {
    /// Log format: text or json (the filter is `MESH_LOG`); logs go to stderr.
    #[arg(long, global = true, env = env::LOG_FORMAT, value_enum,
          default_value_t = mesh_api::logging::LogFormat::Text)]
    log_format: mesh_api::logging::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    mesh_api::logging::init(cli.log_format, mesh_api::logging::Output::Stderr)?;
    match cli.command {
        Command::Serve(config) => {
            mesh_api::process::serve_until_terminated(Running::start(config))
                .await
                .context("starting mesh-ca")?;
        }
        Command::Token {
            dir,
            trust_domain,
            namespace,
            service_account,
        } => {
            let id = SpiffeId::workload(&trust_domain, &namespace, &service_account)
                .context("--namespace/--service-account")?;
            let tokens = LocalTokens::load_or_generate(&dir, &trust_domain)?;
            println!("{}", tokens.issue(&id));
        }
        Command::Init { dir, trust_domain } => {
            if dir.join(mesh_ca::authority::KEY_FILE).exists() {
                anyhow::bail!("{}: already holds a CA key", dir.display());
            }
            let ca = mesh_ca::Authority::load_or_generate(
                &dir,
                &trust_domain,
                std::time::SystemTime::now(),
            )?;
            println!(
                "{}: new root for {}",
                dir.join(mesh_ca::authority::CERT_FILE).display(),
                ca.trust_domain()
            );
        }
    }
    Ok(())
}
