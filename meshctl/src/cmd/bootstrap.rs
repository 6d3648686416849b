//! `meshctl bootstrap envoy`: an Envoy bootstrap that joins the mesh through ADS alone. The
//! controller is reached with Envoy's Google gRPC client, so the bootstrap holds no static
//! listener and no static cluster: everything else comes over xDS.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use mesh_api::consts::{env, node_metadata, ports};
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub enum Bootstrap {
    /// Envoy bootstrap (YAML) for a stock Envoy.
    Envoy(EnvoyArgs),
    /// gRPC xDS bootstrap (JSON) for proxyless gRPC clients (`GRPC_XDS_BOOTSTRAP`).
    Grpc(GrpcArgs),
}

#[derive(Debug, clap::Args)]
pub struct GrpcArgs {
    /// The client's identity, `<namespace>/<name>`; short host names resolve in that namespace.
    #[arg(long)]
    pub node: String,
    /// Address of the controller's xDS server.
    #[arg(long, env = env::MESHCTL_XDS, default_value_t = format!("127.0.0.1:{}", ports::CONTROLLER_XDS))]
    pub xds: String,
}

#[derive(Debug, clap::Args)]
pub struct EnvoyArgs {
    /// The proxy's identity, `<namespace>/<name>`; the controller serves it the config of that
    /// namespace (and of that pod, when transparent).
    #[arg(long)]
    pub node: String,
    /// Address of the controller's xDS server.
    #[arg(long, env = env::MESHCTL_XDS, default_value_t = format!("127.0.0.1:{}", ports::CONTROLLER_XDS))]
    pub xds: String,
    /// xDS variant: `delta` (incremental) or `sotw` (state of the world).
    #[arg(long, default_value = "delta", value_parser = ["delta", "sotw"])]
    pub xds_api: String,
    /// Where Envoy's admin interface listens.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::PROXY_ADMIN)))]
    pub admin: SocketAddr,
    /// Where the explicit outbound HTTP proxy listener listens (routes by Host).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], ports::PROXY_OUTBOUND_HTTP)))]
    pub outbound_http: SocketAddr,
    /// Also ask for the transparent outbound and inbound listeners (iptables interception).
    #[arg(long)]
    pub transparent: bool,
    /// Terminate mesh TLS inbound with the SVID and trust bundle in this directory
    /// (`default.yaml` and `ROOTCA.yaml`, SDS DiscoveryResponses an agent keeps current).
    #[arg(long)]
    pub sds_dir: Option<std::path::PathBuf>,
}

pub fn run(cmd: Bootstrap, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = match cmd {
        Bootstrap::Envoy(args) => {
            serde_yaml::to_string(&envoy(&args)?).context("rendering the bootstrap")?
        }
        Bootstrap::Grpc(args) => {
            serde_json::to_string_pretty(&grpc(&args)?).context("rendering the bootstrap")? + "\n"
        }
    };
    out.write_all(text.as_bytes())
        .context("writing the bootstrap")
}

/// Checks `--node` (`<namespace>/<name>`) and `--xds` (`HOST:PORT`); returns the namespace.
fn check_node_and_xds<'a>(node: &'a str, xds: &str) -> anyhow::Result<&'a str> {
    let Some((namespace, name)) = node.split_once('/') else {
        bail!("--node {node:?}: expected <namespace>/<name>");
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        bail!("--node {node:?}: expected <namespace>/<name>");
    }
    let Some((host, port)) = xds.rsplit_once(':') else {
        bail!("--xds {xds:?}: expected HOST:PORT");
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("--xds {xds:?}: expected HOST:PORT with a port of 1..=65535");
    }
    Ok(namespace)
}

/// The gRPC xDS bootstrap: the controller as the xDS server, over plaintext (the local mesh).
pub fn grpc(args: &GrpcArgs) -> anyhow::Result<serde_json::Value> {
    check_node_and_xds(&args.node, &args.xds)?;
    Ok(json!({
        "xds_servers": [{
            "server_uri": args.xds,
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": args.node, "locality": {}},
    }))
}

/// The bootstrap as a JSON value (rendered as YAML by the caller).
pub fn envoy(args: &EnvoyArgs) -> anyhow::Result<serde_json::Value> {
    let namespace = check_node_and_xds(&args.node, &args.xds)?;
    let api_type = if args.xds_api == "delta" {
        "DELTA_GRPC"
    } else {
        "GRPC"
    };
    let ads = json!({"ads": {}, "resource_api_version": "V3"});
    let mut metadata = json!({
        node_metadata::TRANSPARENT: args.transparent.to_string(),
        node_metadata::OUTBOUND_HTTP_ADDR: args.outbound_http.to_string(),
    });
    if let Some(dir) = &args.sds_dir {
        let dir =
            std::path::absolute(dir).with_context(|| format!("--sds-dir {}", dir.display()))?;
        metadata[node_metadata::MTLS] = json!("true");
        metadata[node_metadata::SDS_DIR] = json!(dir.to_string_lossy());
    }
    Ok(json!({
        "node": {
            "id": args.node,
            "cluster": namespace,
            "metadata": metadata,
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": api_type,
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{
                    "google_grpc": {"target_uri": args.xds, "stat_prefix": "mesh_xds"},
                    "timeout": "5s",
                }],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "admin": {
            "address": {"socket_address": {
                "address": args.admin.ip().to_string(),
                "port_value": args.admin.port(),
            }},
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(node: &str, xds: &str) -> EnvoyArgs {
        EnvoyArgs {
            node: node.into(),
            xds: xds.into(),
            xds_api: "delta".into(),
            admin: "127.0.0.1:15000".parse().expect("addr"),
            outbound_http: "127.0.0.1:15080".parse().expect("addr"),
            transparent: false,
            sds_dir: None,
        }
    }

    #[test]
    fn joins_through_ads_alone() {
        let b = envoy(&args("shop/web-0", "10.0.0.1:15010")).expect("bootstrap");
        assert!(
            b.get("static_resources").is_none(),
            "no static listeners or clusters"
        );
        assert_eq!(b["node"]["id"], "shop/web-0");
        assert_eq!(
            b["dynamic_resources"]["ads_config"]["api_type"],
            "DELTA_GRPC"
        );
        assert_eq!(
            b["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"]["target_uri"],
            "10.0.0.1:15010"
        );
        assert_eq!(b["dynamic_resources"]["lds_config"]["ads"], json!({}));
        assert_eq!(
            b["node"]["metadata"][node_metadata::OUTBOUND_HTTP_ADDR],
            "127.0.0.1:15080"
        );
    }

    #[test]
    fn grpc_bootstrap_names_the_controller_and_node() {
        let b = grpc(&GrpcArgs {
            node: "shop/client".into(),
            xds: "127.0.0.1:15010".into(),
        })
        .expect("bootstrap");
        assert_eq!(b["xds_servers"][0]["server_uri"], "127.0.0.1:15010");
        assert_eq!(b["xds_servers"][0]["server_features"][0], "xds_v3");
        assert_eq!(b["node"]["id"], "shop/client");
        let err = grpc(&GrpcArgs {
            node: "client".into(),
            xds: "h:1".into(),
        })
        .expect_err("no ns");
        assert!(err.to_string().contains("--node \"client\""), "{err}");
    }

    #[test]
    fn refuses_bad_input_naming_it() {
        for (node, xds, needle) in [
            ("web-0", "h:1", "--node \"web-0\""),
            ("a/b/c", "h:1", "--node \"a/b/c\""),
            ("a/b", "nohostport", "--xds \"nohostport\""),
            ("a/b", "h:99999", "--xds \"h:99999\""),
        ] {
            let err = envoy(&args(node, xds)).expect_err(node).to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
