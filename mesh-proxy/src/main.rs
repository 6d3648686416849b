use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mesh_api::logging::{LogFormat, Output};
use mesh_proxy::admin::LogControl;
use mesh_proxy::{Config, Proxy};

fn main() -> anyhow::Result<()> {
    // `mesh-proxy init`: the init container's iptables rules, then exit.
    if std::env::args().nth(1).as_deref() == Some("init") {
        let args = mesh_proxy::init::InitArgs::parse_from(std::env::args().skip(1));
        return mesh_proxy::init::run(&args, &mut std::io::stdout());
    }
    // `mesh-proxy agent`: SVIDs for a stock Envoy, as SDS files.
    if std::env::args().nth(1).as_deref() == Some("agent") {
        let args = mesh_proxy::agent::AgentArgs::parse_from(std::env::args().skip(1));
        init_logging(args.log_format)?;
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(mesh_proxy::agent::run(args));
    }
    let config = Config::parse();
    let log = init_logging(config.log_format)?;
    let workers = config.worker_threads();
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(run(config, log))
}

fn init_logging(format: LogFormat) -> anyhow::Result<Arc<LogControl>> {
    let (initial, reload) = mesh_api::logging::init(format, Output::Stdout)?;
    Ok(Arc::new(LogControl::new(&initial, move |filter: &str| {
        reload.set(filter)
    })))
}

async fn run(config: Config, log: Arc<LogControl>) -> anyhow::Result<()> {
    // Listening before anything is served: a SIGTERM once the admin port answers is drained.
    let terminated = mesh_api::process::termination();
    let proxy = Proxy::start(config, Some(log))
        .await
        .context("starting mesh-proxy")?;
    tokio::select! {
        () = terminated => tracing::info!("SIGTERM: draining"),
        () = proxy.shutdown_requested() => tracing::info!("/shutdown: draining"),
    }
    if !proxy.drain().await {
        tracing::warn!("drain deadline passed with connections still open");
    }
    Ok(())
}
