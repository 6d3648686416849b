//! `meshctl dashboard`: the controller's service graph (`/graph`) in a browser. In a cluster
//! through a port-forward to a ready controller pod, held until interrupted; with a local mesh's
//! controller (`--local`, `--controller`), at its own address.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context as _;

use super::stat::ControllerArgs;

#[derive(Debug, clap::Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub controller: ControllerArgs,
    /// The local address the port-forward listens on, a loopback one (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub address: SocketAddr,
    /// Print the URL only; do not open a browser.
    #[arg(long)]
    pub no_browser: bool,
}

/// Opens `url` in the desktop's browser; false when there is none to start.
fn open_browser(url: &str) -> bool {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener)
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .is_ok()
}

fn show(url: &str, args: &DashboardArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !args.no_browser && open_browser(url) {
        writeln!(out, "opened {url}")?;
    } else {
        writeln!(out, "the service graph: {url}")?;
    }
    Ok(())
}

/// Serves the port-forward at `listener` (to the controller pod found in the cluster) and says
/// where, until `until` resolves.
pub async fn serve(
    cluster: &crate::cluster::Cluster,
    args: &DashboardArgs,
    listener: tokio::net::TcpListener,
    out: &mut dyn Write,
    until: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let ns = &args.controller.mesh_namespace;
    let name = mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT;
    let pod = super::status::controller_pods(cluster, ns)
        .await?
        .into_iter()
        .next()
        .with_context(|| {
            format!("no ready {name} pod in {ns}: is the mesh installed there? (meshctl check)")
        })?;
    let local = listener.local_addr()?;
    show(&format!("http://{local}/graph"), args, out)?;
    writeln!(
        out,
        "forwarding {local} to pod {ns}/{pod} port {}; Ctrl-C ends it",
        mesh_api::consts::ports::CONTROLLER_ADMIN
    )?;
    tokio::select! {
        r = cluster.forward_connections(listener, ns, &pod, mesh_api::consts::ports::CONTROLLER_ADMIN) => r,
        () = until => Ok(()),
    }
}

pub async fn run(
    args: &DashboardArgs,
    cx: &super::Context,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if args.controller.controller.is_some() || cx.local.is_some() {
        let ctl = super::status::local_controller(args.controller.controller);
        return show(&format!("http://{ctl}/graph"), args, out);
    }
    if !args.address.ip().is_loopback() {
        anyhow::bail!(
            "--address {}: whoever reaches it would use your credentials on the controller's \
             debug API; give a loopback address (127.0.0.1:PORT)",
            args.address
        );
    }
    let cluster = cx.connect().await?;
    let listener = tokio::net::TcpListener::bind(args.address)
        .await
        .with_context(|| {
            format!(
                "--address {}: cannot listen there; pass --address 127.0.0.1:0 for any free port",
                args.address
            )
        })?;
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(&cluster, args, listener, out, interrupted).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_api::fake_api::{FakeApi, rbac};
    use serde_json::json;

    use super::*;

    /// The command's arguments in a cluster (no browser), and the listener they name.
    async fn in_cluster() -> (DashboardArgs, tokio::net::TcpListener) {
        let args = DashboardArgs {
            controller: ControllerArgs {
                controller: None,
                mesh_namespace: "mesh-system".into(),
            },
            address: "127.0.0.1:0".parse().expect("address"),
            no_browser: true,
        };
        let listener = tokio::net::TcpListener::bind(args.address)
            .await
            .expect("bind");
        (args, listener)
    }

    /// In a cluster, the graph page is served at a local address through a port-forward to the
    /// ready controller pod, and the URL is printed when no browser is opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_graph_is_served_locally_through_a_port_forward_to_the_controller() {
        let (_, fake) = FakeApi::start();
        let client = fake.http_client(rbac::ADMIN).await.expect("client");
        fake.forward_to_raw();
        fake.insert(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "mesh-controller-0", "namespace": "mesh-system",
                "labels": {"app.kubernetes.io/name": "mesh-controller"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
        fake.state().raw.insert(
            "/api/v1/namespaces/mesh-system/pods/mesh-controller-0:15014/proxy/graph".into(),
            "<html>the graph</html>".into(),
        );
        let cluster = crate::cluster::Cluster::new(client);
        let (args, listener) = in_cluster().await;
        let local = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut out = Vec::new();
        let serving = serve(&cluster, &args, listener, &mut out, async {
            let _ = stopped.await;
        });
        let asking = async {
            // Twice: each connection is a port-forward of its own.
            for _ in 0..2 {
                let page = tokio::time::timeout(
                    Duration::from_secs(10),
                    crate::admin::get_text(local, "/graph"),
                )
                .await
                .expect("answers in time")
                .expect("the page");
                assert_eq!(page, "<html>the graph</html>");
            }
            stop.send(()).expect("stop");
        };
        let (r, ()) = tokio::join!(serving, asking);
        r.expect("served");
        let out = String::from_utf8_lossy(&out).into_owned();
        assert!(
            out.contains(&format!("the service graph: http://{local}/graph")),
            "{out}"
        );
        assert!(
            out.contains("pod mesh-system/mesh-controller-0 port 15014"),
            "{out}"
        );
    }

    /// Without a ready controller pod: an error that says where it looked and what to run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_controller_pod_it_says_where_it_looked() {
        let (client, _fake) = FakeApi::start();
        let cluster = crate::cluster::Cluster::new(client);
        let (args, listener) = in_cluster().await;
        let err = serve(&cluster, &args, listener, &mut Vec::new(), async {})
            .await
            .expect_err("no pod");
        assert!(
            err.to_string()
                .contains("no ready mesh-controller pod in mesh-system"),
            "{err}"
        );
    }
}
