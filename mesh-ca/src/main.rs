use anyhow::Context;
use clap::Parser;
use mesh_api::SpiffeId;
use mesh_ca::auth::LocalTokens;
use mesh_ca::cli::{Cli, Command};
use mesh_ca::run::Running;

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
