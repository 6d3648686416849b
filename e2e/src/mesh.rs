//! A local mesh in this process: the real controller watching a temporary directory of
//! manifests, and real `mesh-proxy` instances on ephemeral 127.0.0.1 ports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_controller::run::Controller;
use mesh_proxy::Proxy;
use mesh_proxy::state::Snapshot;

use crate::{eventually, write_atomic};

#[derive(Debug)]
pub struct LocalMesh {
    pub controller: Controller,
    pub dir: tempfile::TempDir,
    pub config_dir: PathBuf,
}

impl LocalMesh {
    /// Starts a controller on an empty manifest directory.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir)?;
        let controller =
            Controller::start(mesh_controller::config::Config::local(&config_dir)).await?;
        Ok(Self {
            controller,
            dir,
            config_dir,
        })
    }

    /// Writes (or replaces) one manifest file.
    pub fn write(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        write_atomic(&self.config_dir.join(file), yaml)
    }

    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.config_dir.join(file))?)
    }

    /// Settings for a proxy of pod `<ns>/<name>` talking to this controller.
    pub fn proxy_config(&self, node: &str) -> mesh_proxy::Config {
        mesh_proxy::Config::local(self.controller.xds_addr, node)
    }

    /// Starts a proxy and waits for its first complete config.
    pub async fn proxy(&self, config: mesh_proxy::Config) -> anyhow::Result<Proxy> {
        let node = config.node.clone();
        let proxy = Proxy::start(config, None)
            .await
            .with_context(|| format!("starting proxy {node}"))?;
        tokio::time::timeout(Duration::from_secs(10), proxy.store.ready())
            .await
            .with_context(|| format!("proxy {node} got no complete config in 10 s"))?;
        Ok(proxy)
    }
}

/// Waits until the proxy runs a config for which `check` holds.
pub async fn wait_config(
    proxy: &Proxy,
    what: &str,
    check: impl Fn(&Snapshot) -> bool,
) -> anyhow::Result<Arc<Snapshot>> {
    eventually(Duration::from_secs(5), what, || {
        let s = proxy.store.load().filter(|s| check(s));
        async move { s }
    })
    .await
}

/// The weights the routes of RouteConfiguration `route` give their backends, by cluster name,
/// in virtual hosts whose name starts with `vhost`.
pub fn weights(s: &Snapshot, route: &str, vhost: &str) -> Vec<(String, u32)> {
    use mesh_proxy::state::Action;
    let Some(t) = s.route(route) else {
        return Vec::new();
    };
    t.vhosts
        .iter()
        .filter(|vh| vh.name.starts_with(vhost))
        .flat_map(|vh| &vh.routes)
        .filter_map(|r| match &r.action {
            Action::Forward(f) => Some(f),
            _ => None,
        })
        .flat_map(|f| f.backends.iter().map(|b| (b.cluster.clone(), b.weight)))
        .collect()
}
