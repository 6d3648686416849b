//! The proxy's settings: flags, each also an environment variable (`mesh_api::consts::env`).
//! The parsed settings are shown at the admin `/config_dump`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesh_api::SpiffeId;
use mesh_api::consts::{env, ports};
use mesh_api::logging::LogFormat;
use mesh_api::probes::AppProbes;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsApi {
    /// Incremental xDS (preferred).
    Delta,
    /// State-of-the-world xDS.
    Sotw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsTls {
    Auto,
    On,
    Off,
}

/// `--xds` by default: a controller on this host (`ports::CONTROLLER_XDS`).
const DEFAULT_XDS: &str = "127.0.0.1:15010";

#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "mesh-proxy", version, about = "The mesh's sidecar proxy")]
pub struct Config {
    /// The controller's xDS servers: `host:port`, comma-separated; a host name may resolve to
    /// several replicas (the chart's headless `mesh-controller-xds`). The proxy streams from one
    /// and moves to the next when it goes away.
    #[arg(long, env = env::PROXY_XDS, value_delimiter = ',',
          value_parser = parse_xds_target, default_value = DEFAULT_XDS)]
    pub xds: Vec<String>,
    /// Who this proxy is: `<namespace>/<name>` of its pod.
    #[arg(long, env = env::PROXY_NODE)]
    pub node: String,
    /// xDS protocol variant.
    #[arg(long, env = env::PROXY_XDS_API, value_enum, default_value_t = XdsApi::Delta)]
    pub xds_api: XdsApi,
    /// iptables redirects the pod's traffic here: serve the transparent outbound and inbound
    /// listeners instead of the explicit HTTP proxy.
    #[arg(long, env = env::PROXY_TRANSPARENT, default_value_t = false, action = clap::ArgAction::Set)]
    pub transparent: bool,
    /// Hold only the destinations this workload uses (with `--transparent`): a connection to
    /// an address the proxy has no config for asks the controller for that address and waits
    /// up to 1 s; an address outside the mesh passes through. Needs `--xds-api delta`.
    /// Default: on with `--transparent true` over Delta xDS ([`Config::scoped`]); the proxy
    /// sets what it runs with at start, so `/config_dump` shows it.
    #[arg(long, env = env::PROXY_SCOPED, action = clap::ArgAction::Set)]
    pub scoped: Option<bool>,
    /// With scoping, a destination looked up is let go once no connection to it was open for
    /// this long; `0` keeps every one for the proxy's life. At least 10 s.
    #[arg(long, env = env::PROXY_SCOPED_IDLE_TIMEOUT, value_parser = parse_duration, default_value = "10m")]
    #[serde(with = "duration_str")]
    pub scoped_idle_timeout: Duration,
    /// Serve the Gateway of this name (in the node's namespace) as its proxy: bind the
    /// listeners the controller sends for it (`gateway_<port>`) instead of the explicit HTTP
    /// proxy, terminate TLS with the Gateway's certificates, and route by its routes. Not with
    /// `--transparent`.
    #[arg(long, env = env::PROXY_GATEWAY)]
    pub gateway: Option<String>,
    /// The IP address a gateway proxy's listeners bind (with `--gateway`).
    #[arg(long, env = env::PROXY_GATEWAY_ADDR, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub gateway_addr: IpAddr,
    /// Admin server (`/config_dump`, `/logging`, `/shutdown`, ...); keep it on localhost.
    #[arg(long, env = env::PROXY_ADMIN_ADDR, default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports::PROXY_ADMIN))]
    pub admin_addr: SocketAddr,
    /// `/metrics`, `/ready` and `/live`, on the pod address.
    #[arg(long, env = env::PROXY_METRICS_ADDR, default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::PROXY_METRICS))]
    pub metrics_addr: SocketAddr,
    /// Transparent outbound listener (with `--transparent`).
    #[arg(long, env = env::PROXY_OUTBOUND_ADDR, default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::PROXY_OUTBOUND))]
    pub outbound_addr: SocketAddr,
    /// Transparent inbound listener (with `--transparent`).
    #[arg(long, env = env::PROXY_INBOUND_ADDR, default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ports::PROXY_INBOUND))]
    pub inbound_addr: SocketAddr,
    /// Explicit outbound HTTP proxy that routes by Host (without `--transparent`).
    #[arg(long, env = env::PROXY_OUTBOUND_HTTP_ADDR, default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ports::PROXY_OUTBOUND_HTTP))]
    pub outbound_http_addr: SocketAddr,
    /// Treat every outbound connection as sent to this address instead of asking the kernel
    /// (`SO_ORIGINAL_DST`); for running the transparent listeners without iptables.
    #[arg(long, env = env::PROXY_OUTBOUND_ORIG_DST)]
    pub outbound_orig_dst: Option<SocketAddr>,
    /// Treat every inbound connection as sent to this address (`<pod ip>:<app port>`).
    #[arg(long, env = env::PROXY_INBOUND_ORIG_DST)]
    pub inbound_orig_dst: Option<SocketAddr>,
    /// Worker threads; 0 means one per core.
    #[arg(long, env = env::PROXY_WORKERS, default_value_t = 0)]
    pub workers: usize,
    /// After SIGTERM, how long in-flight requests and connections may finish.
    #[arg(long, env = env::PROXY_DRAIN_DEADLINE, value_parser = parse_duration, default_value = "25s")]
    #[serde(with = "duration_str")]
    pub drain_deadline: Duration,
    /// How long protocol detection waits for a client's first bytes before treating the
    /// connection as opaque TCP (so server-speaks-first protocols are not stalled).
    #[arg(long, env = env::PROXY_DETECT_TIMEOUT, value_parser = parse_duration, default_value = "100ms")]
    #[serde(with = "duration_str")]
    pub detect_timeout: Duration,
    /// Largest request header block accepted, in bytes (larger: 431).
    #[arg(long, env = env::PROXY_MAX_HEADER_BYTES, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams a client may open per connection.
    #[arg(long, env = env::PROXY_H2_MAX_STREAMS, default_value_t = 100)]
    pub h2_max_streams: u32,
    /// Connections each listener holds open at once; one more is closed as soon as it is
    /// accepted, and counted.
    #[arg(long, env = env::PROXY_MAX_CONNECTIONS, default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// The container's memory limit, in bytes (0: none). Past 95 % of it in resident memory
    /// new requests are answered 503, until it is back under 90 %.
    #[arg(long, env = env::PROXY_MEMORY_LIMIT, default_value_t = 0)]
    pub memory_limit: u64,
    /// Time a client has to send a request's headers (HTTP/1: also how long an idle keep-alive
    /// connection is kept); 0 disables it.
    #[arg(long, env = env::PROXY_HEADER_READ_TIMEOUT, value_parser = parse_duration, default_value = "10s")]
    #[serde(with = "duration_str")]
    pub header_read_timeout: Duration,
    /// A connection with no traffic for this long is closed (client side and pooled upstream);
    /// 0 disables it.
    #[arg(long, env = env::PROXY_IDLE_TIMEOUT, value_parser = parse_duration, default_value = "5m")]
    #[serde(with = "duration_str")]
    pub idle_timeout: Duration,
    /// Address of mesh-ca (`host:port`). Required unless `--identity-off`.
    #[arg(long, env = env::PROXY_CA_ADDR)]
    pub ca_addr: Option<String>,

    /// PEM file with the root(s) that mesh-ca's own certificate chains to (its `ca.crt`).
    #[arg(long, env = env::PROXY_CA_ROOT)]
    pub ca_root: Option<PathBuf>,

    /// File with the token proving this workload's identity to mesh-ca: a projected
    /// service-account token, or a local-mesh token. Read again at every renewal.
    #[arg(long, env = env::PROXY_CA_TOKEN_FILE, default_value = "/var/run/secrets/tokens/mesh-ca-token")]
    pub ca_token_file: PathBuf,

    /// The workload's service account (its SPIFFE ID is `.../ns/<node namespace>/sa/<this>`).
    #[arg(long, env = env::PROXY_SERVICE_ACCOUNT, default_value = "default")]
    pub service_account: String,

    /// The workload this proxy serves (a Deployment's name, say), as metrics, traces and
    /// access logs name it; default: the Gateway's name with `--gateway`, else the pod's name.
    /// The injector sets it.
    #[arg(long, env = env::PROXY_WORKLOAD)]
    pub workload: Option<String>,

    /// Per-request telemetry: request metrics, spans, trace propagation and access logs.
    /// `false` turns all of it off (connection, TLS and xDS metrics stay): for benchmarks and
    /// for workloads where every microsecond counts.
    #[arg(long, env = env::PROXY_TELEMETRY, default_value_t = true, action = clap::ArgAction::Set)]
    pub telemetry: bool,

    /// Where to send spans: an OTLP/gRPC collector (`http://host:4317`). Without it, the
    /// proxy still propagates trace context but exports nothing.
    #[arg(long, env = env::PROXY_TRACING_ENDPOINT)]
    pub tracing_endpoint: Option<String>,

    /// Percentage of new traces to sample (0-100); a request that arrives with a sampling
    /// decision keeps it (parent-based).
    #[arg(long, env = env::PROXY_TRACING_SAMPLING, default_value_t = 1.0, value_parser = mesh_api::parse_percent)]
    pub tracing_sampling: f64,

    /// Access log: off unless set; `-` writes JSON lines to stdout, anything else names a file
    /// they are appended to.
    #[arg(long, env = env::PROXY_ACCESS_LOG)]
    pub access_log: Option<PathBuf>,

    /// The app probes answered on the health port (`/app-health/<container>/<kind>`), as
    /// injection writes them: JSON, each health path with the check it runs against the app.
    #[arg(long, env = env::PROXY_APP_PROBES, value_parser = parse_app_probes, default_value = "{}")]
    pub app_probes: AppProbes,

    /// The pod's IP, where app probes go (as the kubelet sends them); 127.0.0.1 when unset.
    #[arg(long, env = env::POD_IP)]
    pub pod_ip: Option<IpAddr>,

    /// Trust domain of the mesh.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// Certificate lifetime to ask for (`0s`: the CA's default, 24 h).
    #[arg(long, env = env::PROXY_CERT_LIFETIME, value_parser = parse_duration, default_value = "0s")]
    #[serde(with = "duration_str")]
    pub cert_lifetime: Duration,

    /// xDS over mesh TLS: `auto` (with an identity, unless the controller is on a loopback
    /// address, where it serves plaintext), `on` or `off`.
    #[arg(long, env = env::PROXY_XDS_TLS, value_enum, default_value_t = XdsTls::Auto)]
    pub xds_tls: XdsTls,

    /// Run without a mesh identity: no CA, plaintext only, no mutual TLS. For benchmarks and
    /// interop tests; the proxy says so in its log and `/config_dump`.
    #[arg(long, env = env::PROXY_IDENTITY_OFF, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub identity_off: bool,

    /// Log format: `text` or `json` (the level is `MESH_LOG`, and `/logging` changes it live).
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// Settings for a proxy in this process: every listener on an ephemeral 127.0.0.1 port.
    pub fn local(xds: SocketAddr, node: &str) -> Self {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            xds: vec![xds.to_string()],
            node: node.to_string(),
            xds_api: XdsApi::Delta,
            transparent: false,
            scoped: None,
            scoped_idle_timeout: Duration::from_secs(600),
            gateway: None,
            gateway_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            admin_addr: any,
            metrics_addr: any,
            outbound_addr: any,
            inbound_addr: any,
            outbound_http_addr: any,
            outbound_orig_dst: None,
            inbound_orig_dst: None,
            workers: 1,
            drain_deadline: Duration::from_secs(5),
            detect_timeout: Duration::from_millis(100),
            max_header_bytes: 64 * 1024,
            h2_max_streams: 100,
            max_connections: 20_000,
            memory_limit: 0,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            ca_addr: None,
            ca_root: None,
            ca_token_file: PathBuf::new(),
            service_account: "default".into(),
            workload: None,
            telemetry: true,
            tracing_endpoint: None,
            tracing_sampling: 1.0,
            access_log: None,
            app_probes: AppProbes::new(),
            pod_ip: None,
            trust_domain: mesh_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            cert_lifetime: Duration::ZERO,
            xds_tls: XdsTls::Auto,
            // In-process proxies (tests, benchmarks) are plaintext unless given a CA.
            identity_off: true,
            log_format: LogFormat::Text,
        }
    }

    /// This workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> Result<SpiffeId, ConfigError> {
        let (ns, _) = self.node_parts()?;
        SpiffeId::workload(&self.trust_domain, ns, &self.service_account).map_err(|e| {
            ConfigError::Identity(format!(
                "--trust-domain {:?} / --service-account {:?}: {e}",
                self.trust_domain, self.service_account
            ))
        })
    }

    /// Whether xDS goes over mesh TLS (never without an identity).
    pub fn xds_over_tls(&self) -> bool {
        if self.identity_off {
            return false;
        }
        match self.xds_tls {
            XdsTls::On => true,
            XdsTls::Off => false,
            XdsTls::Auto => !self
                .xds
                .iter()
                .all(|t| t.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback())),
        }
    }

    /// Whether destinations are looked up on demand: as `--scoped` says, or by default when
    /// the proxy is transparent and speaks Delta xDS (what scoping is built on).
    pub fn scoped(&self) -> bool {
        self.scoped
            .unwrap_or(self.transparent && self.xds_api == XdsApi::Delta)
    }

    /// Scoping asked for needs what it is built on: transparent listeners and Delta
    /// subscriptions; an idle timeout shorter than a lookup's wait could let go of a
    /// destination being looked up.
    pub fn check_scoped(&self) -> Result<(), ConfigError> {
        let idle = self.scoped_idle_timeout;
        if !idle.is_zero() && idle < MIN_SCOPED_IDLE {
            return Err(ConfigError::ScopedIdle(format!("{}ms", idle.as_millis())));
        }
        if self.scoped != Some(true) {
            return Ok(());
        }
        if !self.transparent {
            return Err(ConfigError::Scoped(
                "needs --transparent true: the explicit HTTP proxy routes by Host and is given every Service",
            ));
        }
        if self.xds_api != XdsApi::Delta {
            return Err(ConfigError::Scoped(
                "needs --xds-api delta: destinations are subscribed to by name",
            ));
        }
        Ok(())
    }

    /// A gateway proxy serves a Gateway's listeners, never the transparent ones; its name is
    /// a Gateway's (a DNS subdomain).
    pub fn check_gateway(&self) -> Result<(), ConfigError> {
        let Some(name) = &self.gateway else {
            return Ok(());
        };
        let subdomain = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !subdomain {
            return Err(ConfigError::Gateway(format!(
                "{name:?} is not a Gateway's name (a lowercase DNS subdomain)"
            )));
        }
        if self.transparent {
            return Err(ConfigError::Gateway(format!(
                "{name:?} with --transparent true: a Gateway's proxy takes traffic on the Gateway's listeners, not redirected by iptables"
            )));
        }
        Ok(())
    }

    /// Checks that the proxy either has what it needs to get an identity or runs without one.
    pub fn check_identity(&self) -> Result<(), ConfigError> {
        if self.identity_off {
            return Ok(());
        }
        if self.ca_addr.is_none() || self.ca_root.is_none() {
            return Err(ConfigError::NoCa);
        }
        self.spiffe_id().map(|_| ())
    }

    /// The node namespace and name.
    pub fn node_parts(&self) -> Result<(&str, &str), ConfigError> {
        node_parts(&self.node)
    }

    /// This proxy as metrics name it: its namespace, workload and (with identity on) SPIFFE ID.
    pub fn peer(&self) -> crate::metrics::Peer {
        let (ns, pod) = self.node_parts().unwrap_or_default();
        // A gateway's proxies are one workload, named as their Gateway.
        let workload = self
            .workload
            .as_deref()
            .or(self.gateway.as_deref())
            .unwrap_or(pod);
        let id = (!self.identity_off)
            .then(|| self.spiffe_id().ok())
            .flatten();
        crate::metrics::Peer::new(ns, workload, id.as_ref())
    }

    /// Worker threads to run: the setting, or one per core.
    pub fn worker_threads(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// `--node`'s namespace and name (`<namespace>/<name>`).
pub fn node_parts(node: &str) -> Result<(&str, &str), ConfigError> {
    match node.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns, name))
        }
        _ => Err(ConfigError::Node(node.to_owned())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--node / {var} = {0:?}: expected <namespace>/<name>", var = env::PROXY_NODE)]
    Node(String),
    #[error(
        "no CA: pass --ca-addr ({addr}) and --ca-root ({root}) to get a mesh identity, or \
         --identity-off ({off}=true) to run plaintext without one",
        addr = env::PROXY_CA_ADDR,
        root = env::PROXY_CA_ROOT,
        off = env::PROXY_IDENTITY_OFF
    )]
    NoCa,
    #[error("identity: {0}")]
    Identity(String),
    #[error("--scoped ({var}=true) {0}", var = env::PROXY_SCOPED)]
    Scoped(&'static str),
    #[error("--gateway ({var}) {0}", var = env::PROXY_GATEWAY)]
    Gateway(String),
    #[error("--scoped-idle-timeout ({var}) {0}: it is 0 (never) or at least 10s", var = env::PROXY_SCOPED_IDLE_TIMEOUT)]
    ScopedIdle(String),
}

pub use mesh_api::duration::parse as parse_duration;

/// One `--xds` target.
fn parse_xds_target(s: &str) -> Result<String, String> {
    crate::xds::servers::parse_target(s).map_err(|e| e.to_string())
}

/// `--app-probes`; the error names the environment variable injection sets.
fn parse_app_probes(s: &str) -> Result<AppProbes, String> {
    mesh_api::probes::parse(s).map_err(|e| format!("{}: {e}", env::PROXY_APP_PROBES))
}

/// The shortest `--scoped-idle-timeout` but 0: well above a lookup's wait.
const MIN_SCOPED_IDLE: Duration = Duration::from_secs(10);

mod duration_str {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoping_is_on_for_transparent_delta_proxies_unless_said_otherwise() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(["mesh-proxy", "--node", "a/b"].iter().chain(args))
                .expect("parses")
        };
        for (args, scoped) in [
            (&[][..], false),
            (&["--transparent", "true"][..], true),
            (&["--transparent", "true", "--xds-api", "sotw"][..], false),
            (&["--transparent", "true", "--scoped", "false"][..], false),
        ] {
            let c = parse(args);
            assert_eq!(c.scoped(), scoped, "{args:?}");
            assert!(c.check_scoped().is_ok(), "{args:?}");
        }
        for (args, says) in [
            (&["--scoped", "true"][..], "--transparent"),
            (
                &[
                    "--transparent",
                    "true",
                    "--xds-api",
                    "sotw",
                    "--scoped",
                    "true",
                ][..],
                "delta",
            ),
            (&["--scoped-idle-timeout", "500ms"][..], "500ms"),
        ] {
            let e = parse(args).check_scoped().expect_err("refused").to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
        assert!(
            parse(&["--scoped-idle-timeout", "0s"])
                .check_scoped()
                .is_ok()
        );
    }

    #[test]
    fn sampling_is_a_percentage() {
        let parse = mesh_api::parse_percent;
        assert_eq!(parse("1"), Ok(1.0));
        assert_eq!(parse("0.5%"), Ok(0.5));
        for bad in ["101", "-1", "lots"] {
            assert!(parse(bad).expect_err(bad).contains(bad));
        }
        let c =
            Config::try_parse_from(["mesh-proxy", "--node", "a/b", "--tracing-sampling", "250"]);
        assert!(c.expect_err("out of range").to_string().contains("250"));
    }

    #[test]
    fn flags_and_env() {
        let c = Config::try_parse_from(["mesh-proxy", "--node", "default/web-1", "--workers", "2"])
            .expect("parses");
        assert_eq!(c.node_parts().expect("node"), ("default", "web-1"));
        assert_eq!(c.worker_threads(), 2);
        assert_eq!(c.admin_addr.port(), ports::PROXY_ADMIN);
        assert_eq!(c.outbound_http_addr.port(), ports::PROXY_OUTBOUND_HTTP);
        assert_eq!(c.drain_deadline, Duration::from_secs(25));
        assert_eq!(
            c.xds,
            [format!("127.0.0.1:{}", ports::CONTROLLER_XDS)],
            "the default --xds is this host's controller"
        );
        assert!(!c.xds_over_tls(), "plaintext to a controller on loopback");
        let replicas = Config::try_parse_from([
            "mesh-proxy",
            "--node",
            "a/b",
            "--xds",
            "10.0.0.1:15010,mesh-controller-xds.mesh-system.svc:15010",
        ])
        .expect("a list of targets");
        assert_eq!(replicas.xds.len(), 2);
        assert!(replicas.xds_over_tls(), "TLS to a controller off this host");
        let e = Config::try_parse_from(["mesh-proxy", "--node", "a/b", "--xds", "10.0.0.1:1,nope"])
            .expect_err("a target without a port");
        assert!(
            e.to_string().contains("--xds") && e.to_string().contains("\"nope\""),
            "{e}"
        );
        let bad = Config {
            node: "nope".into(),
            ..c
        };
        assert!(
            bad.node_parts()
                .expect_err("bad node")
                .to_string()
                .contains("\"nope\"")
        );
    }
}
