use anyhow::Context;
use clap::Parser;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let filter = EnvFilter::try_from_env(mesh_api::consts::env::LOG)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if config.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    mesh_api::process::serve_until_terminated(Controller::start(config))
        .await
        .context("starting mesh-controller")
}
