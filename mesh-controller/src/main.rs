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
    // Listening before anything is served, so a SIGTERM during start (which waits for the
    // first sync) is a clean stop.
    let terminated = mesh_api::process::termination();
    tokio::pin!(terminated);
    let _controller = tokio::select! {
        c = Controller::start(config) => c.context("starting mesh-controller")?,
        () = &mut terminated => {
            tracing::info!("SIGTERM while starting: stopping");
            return Ok(());
        }
    };
    terminated.await;
    tracing::info!("shutting down");
    Ok(())
}
