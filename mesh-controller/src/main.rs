use anyhow::Context;
use clap::Parser;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    mesh_api::logging::init(config.log_format, mesh_api::logging::Output::Stdout)?;
    mesh_api::process::serve_until_terminated(Controller::start(config))
        .await
        .context("starting mesh-controller")
}
