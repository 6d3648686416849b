//! `meshctl bootstrap envoy`: an Envoy bootstrap that joins the mesh through ADS alone. A
//! controller serving plaintext xDS (a local mesh) is reached with Envoy's Google gRPC client,
//! and the bootstrap holds no static listener and no static cluster. A controller in a cluster
//! serves xDS over mesh TLS only (`--xds-tls`): then the one static cluster is the controller,
//! reached with the SVID `mesh-proxy agent` keeps in `--sds-dir`. Everything else comes over
//! xDS.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use mesh_api::SpiffeId;
use mesh_api::consts::{env, identity as ids, node_metadata, ports, xds as names};
use serde_json::json;

#[derive(Debug, clap::Subcommand)]
pub enum Bootstrap {
    /// Envoy bootstrap (YAML) for a stock Envoy.
    Envoy(Box<EnvoyArgs>),
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
    /// Port of the transparent outbound listener (default 15001); with `--transparent`.
    #[arg(long, requires = "transparent")]
    pub outbound_port: Option<u16>,
    /// Port of the transparent inbound listener (default 15006); with `--transparent`.
    #[arg(long, requires = "transparent")]
    pub inbound_port: Option<u16>,
    /// IP address the transparent inbound listener binds (default `0.0.0.0`), so that several
    /// pods' proxies can share a host; with `--transparent`.
    #[arg(long, requires = "transparent")]
    pub inbound_addr: Option<std::net::IpAddr>,
    /// Terminate mesh TLS inbound with the SVID and trust bundle in this directory
    /// (`default.yaml` and `ROOTCA.yaml`, SDS DiscoveryResponses an agent keeps current).
    #[arg(long, conflicts_with = "sds_socket")]
    pub sds_dir: Option<std::path::PathBuf>,
    /// Get the SVID and trust bundle over SDS from `mesh-proxy agent --sds-socket` on this Unix
    /// socket (the static cluster `sds-grpc`), and terminate mesh TLS inbound with them.
    #[arg(long)]
    pub sds_socket: Option<std::path::PathBuf>,
    /// Reach the controller over mesh TLS (as a controller with a CA serves xDS), presenting
    /// the SVID from `--sds-dir` or `--sds-socket` and accepting only the controller's
    /// identity.
    #[arg(long)]
    pub xds_tls: bool,
    /// Trust domain of the mesh (the controller's identity is
    /// `spiffe://<this>/ns/mesh-system/sa/mesh-controller`).
    #[arg(long, env = env::TRUST_DOMAIN, default_value = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Serve the Gateway of this name (in the node's namespace) instead of being a sidecar:
    /// its listeners, routes and certificates come over ADS. Over mesh TLS the SVID must be of
    /// the Gateway's service account, `<name>-gateway`.
    #[arg(long, conflicts_with = "transparent")]
    pub gateway: Option<String>,
    /// IP address the Gateway's listeners bind (default `0.0.0.0`); with `--gateway`.
    #[arg(long, requires = "gateway")]
    pub gateway_addr: Option<std::net::IpAddr>,
}

impl EnvoyArgs {
    /// The flags' defaults, for node `node` and controller `xds`.
    pub fn new(node: &str, xds: &str) -> Self {
        EnvoyArgs {
            node: node.into(),
            xds: xds.into(),
            xds_api: "delta".into(),
            admin: SocketAddr::from(([127, 0, 0, 1], ports::PROXY_ADMIN)),
            outbound_http: SocketAddr::from(([127, 0, 0, 1], ports::PROXY_OUTBOUND_HTTP)),
            transparent: false,
            outbound_port: None,
            inbound_port: None,
            inbound_addr: None,
            sds_dir: None,
            sds_socket: None,
            xds_tls: false,
            trust_domain: mesh_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            gateway: None,
            gateway_addr: None,
        }
    }
}

/// The static cluster the bootstrap reaches the controller through under `--xds-tls`.
pub const XDS_CLUSTER: &str = "mesh-xds";

/// The largest xDS response Envoy takes over gRPC's own client, as mesh-proxy does (256 MiB).
const MAX_XDS_MESSAGE: i64 = 256 << 20;

pub fn run(cmd: Bootstrap, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = match cmd {
        Bootstrap::Envoy(args) => {
            serde_norway::to_string(&envoy(&args)?).context("rendering the bootstrap")?
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
    xds_host_port(xds)?;

    let Some((namespace, name)) = node.split_once('/') else {
        bail!("--node {node:?}: expected <namespace>/<name>");
    };
    if namespace.is_empty() || name.is_empty() || name.contains('/') {
        bail!("--node {node:?}: expected <namespace>/<name>");
    }
    Ok(namespace)
}

/// `--xds` as host and port.
fn xds_host_port(xds: &str) -> anyhow::Result<(&str, u16)> {
    let Some((host, port)) = xds.rsplit_once(':') else {
        bail!("--xds {xds:?}: expected HOST:PORT");
    };
    match port.parse::<u16>() {
        Ok(p) if !host.is_empty() && p > 0 => Ok((host.trim_matches(['[', ']']), p)),
        _ => bail!("--xds {xds:?}: expected HOST:PORT with a port of 1..=65535"),
    }
}

/// Where Envoy's secrets come from.
enum Secrets {
    /// Files in this directory, watched for the renames the agent makes.
    Dir(String),
    /// The agent's SDS socket, through the static cluster [`names::SDS_CLUSTER`].
    Socket,
}

impl Secrets {
    /// The SDS config of secret `name`.
    fn secret(&self, name: &str) -> serde_json::Value {
        let source = match self {
            Secrets::Dir(dir) => json!({
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": format!("{dir}/{name}.yaml"),
                    "watched_directory": {"path": dir},
                },
            }),
            Secrets::Socket => json!({
                "resource_api_version": "V3",
                // Nothing that needs the secret starts before the agent answers.
                "initial_fetch_timeout": "0s",
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": names::SDS_CLUSTER}}],
                },
            }),
        };
        json!({"name": name, "sds_config": source})
    }
}

/// The static cluster that reaches the agent's SDS socket (HTTP/2 over a Unix socket).
fn sds_cluster(socket: &str) -> serde_json::Value {
    json!({
        "name": names::SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": names::SDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
    })
}

/// The controller as a static cluster over mesh TLS: HTTP/2, TLS 1.3, Envoy's SVID from
/// `secrets`, and only the controller's SPIFFE ID accepted.
fn xds_cluster(
    xds: &str,
    secrets: &Secrets,
    controller: &SpiffeId,
) -> anyhow::Result<serde_json::Value> {
    let (host, port) = xds_host_port(xds)?;
    let kind = if host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    Ok(json!({
        "name": XDS_CLUSTER,
        "type": kind,
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port},
            }}}]}],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "transport_socket": {
            "name": names::TLS_TRANSPORT_SOCKET,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    // Envoy's client default tops out at TLS 1.2; the controller speaks 1.3.
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_3",
                        "tls_maximum_protocol_version": "TLSv1_3",
                    },
                    "alpn_protocols": ["h2"],
                    "tls_certificate_sds_secret_configs": [secrets.secret(names::SDS_SVID)],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [{
                                "san_type": "URI",
                                "matcher": {"exact": controller.as_str()},
                            }],
                        },
                        "validation_context_sds_secret_config": secrets.secret(names::SDS_ROOTS),
                    },
                },
            },
        },
    }))
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
    let transparent = [
        (
            node_metadata::OUTBOUND_PORT,
            args.outbound_port.map(|p| p.to_string()),
        ),
        (
            node_metadata::INBOUND_PORT,
            args.inbound_port.map(|p| p.to_string()),
        ),
        (
            node_metadata::INBOUND_ADDR,
            args.inbound_addr.map(|a| a.to_string()),
        ),
    ];
    for (key, value) in transparent {
        match value {
            Some(_) if !args.transparent => {
                bail!("{key} is a transparent listener's setting: add --transparent")
            }
            Some(v) => metadata[key] = json!(v),
            None => {}
        }
    }
    if let Some(g) = &args.gateway {
        metadata[node_metadata::GATEWAY] = json!(g);
    }
    if let Some(a) = args.gateway_addr {
        metadata[node_metadata::GATEWAY_ADDR] = json!(a.to_string());
    }
    let mut secrets = None;
    let mut clusters = Vec::new();
    if let Some(dir) = &args.sds_dir {
        let dir =
            std::path::absolute(dir).with_context(|| format!("--sds-dir {}", dir.display()))?;
        let dir = dir.to_string_lossy().into_owned();
        metadata[node_metadata::MTLS] = json!("true");
        metadata[node_metadata::SDS_DIR] = json!(dir);
        secrets = Some(Secrets::Dir(dir));
    }
    if let Some(socket) = &args.sds_socket {
        let socket = std::path::absolute(socket)
            .with_context(|| format!("--sds-socket {}", socket.display()))?;
        metadata[node_metadata::MTLS] = json!("true");
        metadata[node_metadata::SDS_AGENT] = json!("true");
        clusters.push(sds_cluster(&socket.to_string_lossy()));
        secrets = Some(Secrets::Socket);
    }
    let grpc_service = match (args.xds_tls, &secrets) {
        (true, Some(secrets)) => {
            let controller = SpiffeId::workload(
                &args.trust_domain,
                ids::SYSTEM_NAMESPACE,
                ids::CONTROLLER_SERVICE_ACCOUNT,
            )
            .with_context(|| format!("--trust-domain {:?}", args.trust_domain))?;
            clusters.push(xds_cluster(&args.xds, secrets, &controller)?);
            json!({"envoy_grpc": {"cluster_name": XDS_CLUSTER}, "timeout": "5s"})
        }
        (true, None) => {
            bail!("--xds-tls needs --sds-dir or --sds-socket (the SVID Envoy presents)")
        }
        // gRPC's own client refuses a message over 4 MiB unless told otherwise, and the
        // Host-routed RouteConfiguration of a 10,000-Service mesh is larger: Envoy closed the
        // stream on it, again and again, and never routed.
        (false, _) => json!({
            "google_grpc": {
                "target_uri": args.xds,
                "stat_prefix": "mesh_xds",
                "channel_args": {"args": {
                    "grpc.max_receive_message_length": {"int_value": MAX_XDS_MESSAGE},
                }},
            },
            "timeout": "5s",
        }),
    };
    let static_resources = (!clusters.is_empty()).then(|| json!({"clusters": clusters}));
    let mut bootstrap = json!({
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
                "grpc_services": [grpc_service],
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
    });
    if let Some(r) = static_resources {
        bootstrap["static_resources"] = r;
    }
    Ok(bootstrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(node: &str, xds: &str) -> EnvoyArgs {
        EnvoyArgs::new(node, xds)
    }

    #[test]
    fn transparent_listener_settings_go_to_the_node_metadata() {
        let mut a = args("shop/web-0", "10.0.0.1:15010");
        a.inbound_port = Some(8080);
        let err = envoy(&a).expect_err("needs --transparent").to_string();
        assert!(err.contains("add --transparent"), "{err}");
        a.transparent = true;
        a.inbound_addr = Some("127.0.0.2".parse().expect("ip"));
        a.outbound_port = Some(16001);
        let md = &envoy(&a).expect("bootstrap")["node"]["metadata"];
        assert_eq!(md[node_metadata::INBOUND_PORT], "8080");
        assert_eq!(md[node_metadata::INBOUND_ADDR], "127.0.0.2");
        assert_eq!(md[node_metadata::OUTBOUND_PORT], "16001");
        assert_eq!(md[node_metadata::TRANSPARENT], "true");
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
        let grpc = &b["dynamic_resources"]["ads_config"]["grpc_services"][0]["google_grpc"];
        assert_eq!(grpc["target_uri"], "10.0.0.1:15010");
        assert_eq!(
            grpc["channel_args"]["args"]["grpc.max_receive_message_length"]["int_value"],
            MAX_XDS_MESSAGE,
            "a large mesh's config fits"
        );
        assert_eq!(b["dynamic_resources"]["lds_config"]["ads"], json!({}));
        assert_eq!(
            b["node"]["metadata"][node_metadata::OUTBOUND_HTTP_ADDR],
            "127.0.0.1:15080"
        );
    }

    #[test]
    fn xds_tls_reaches_the_controller_as_a_static_cluster_on_the_agents_svid() {
        let mut a = args("shop/web-0", "mesh-controller.mesh-system.svc:15010");
        a.sds_dir = Some("/etc/mesh/sds".into());
        a.xds_tls = true;
        let b = envoy(&a).expect("bootstrap");
        let grpc = &b["dynamic_resources"]["ads_config"]["grpc_services"][0];
        assert_eq!(grpc["envoy_grpc"]["cluster_name"], XDS_CLUSTER);
        assert!(grpc.get("google_grpc").is_none());
        let clusters = b["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        assert_eq!(clusters.len(), 1);
        let c = &clusters[0];
        assert_eq!(c["type"], "STRICT_DNS");
        let sock = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
            ["socket_address"];
        assert_eq!(sock["address"], "mesh-controller.mesh-system.svc");
        assert_eq!(sock["port_value"], 15010);
        let tls = &c["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(tls["alpn_protocols"], json!(["h2"]));
        assert_eq!(
            tls["tls_certificate_sds_secret_configs"][0]["sds_config"]["path_config_source"]["path"],
            "/etc/mesh/sds/default.yaml"
        );
        let v = &tls["combined_validation_context"];
        assert_eq!(
            v["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"]["exact"],
            "spiffe://cluster.local/ns/mesh-system/sa/mesh-controller"
        );
        assert_eq!(
            v["validation_context_sds_secret_config"]["name"],
            names::SDS_ROOTS
        );
        assert_eq!(b["node"]["metadata"][node_metadata::MTLS], "true");

        // An IP address needs no DNS; without an SVID there is nothing to present.
        a.xds = "10.0.0.1:15010".into();
        let b = envoy(&a).expect("bootstrap");
        assert_eq!(b["static_resources"]["clusters"][0]["type"], "STATIC");
        a.sds_dir = None;
        let err = envoy(&a).expect_err("no sds dir").to_string();
        assert!(
            err.contains("--xds-tls needs --sds-dir or --sds-socket"),
            "{err}"
        );
    }

    #[test]
    fn an_sds_socket_is_reached_through_a_static_cluster_for_every_secret() {
        let mut a = args("shop/web-0", "10.0.0.1:15010");
        a.sds_socket = Some("/run/mesh/sds.sock".into());
        a.xds_tls = true;
        let b = envoy(&a).expect("bootstrap");
        let clusters = b["static_resources"]["clusters"]
            .as_array()
            .expect("clusters");
        let declared: Vec<&str> = clusters.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(declared, [names::SDS_CLUSTER, XDS_CLUSTER]);
        assert_eq!(
            clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["pipe"]["path"],
            "/run/mesh/sds.sock"
        );
        let tls = &clusters[1]["transport_socket"]["typed_config"]["common_tls_context"];
        let source = &tls["tls_certificate_sds_secret_configs"][0]["sds_config"];
        assert_eq!(
            source["api_config_source"]["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            names::SDS_CLUSTER
        );
        let md = &b["node"]["metadata"];
        assert_eq!(md[node_metadata::SDS_AGENT], "true");
        assert_eq!(md[node_metadata::MTLS], "true");
        assert!(md.get(node_metadata::SDS_DIR).is_none());
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
