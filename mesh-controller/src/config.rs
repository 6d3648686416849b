//! The controller's settings: flags, each also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mesh_api::consts::{env, ports};
use mesh_api::logging::LogFormat;
use serde::Serialize;

use crate::index::MtlsMode;
use crate::index::policy::AuthzDefault;

#[derive(Clone, Debug, clap::Parser, Serialize)]
#[command(
    name = "mesh-controller",
    version,
    about = "The mesh control plane: Kubernetes manifests in, Envoy v3 xDS out"
)]
pub struct Config {
    /// Read manifests from this directory (local mode) instead of the Kubernetes API; changes to
    /// its files apply live.
    #[arg(long, env = env::CONTROLLER_CONFIG_DIR)]
    pub config_dir: Option<PathBuf>,

    /// Address of the xDS (ADS) gRPC server: TLS with client certificates when a CA is set
    /// (`--ca-addr`, `--ca-root`); without one, plaintext, and then only on a loopback address.
    #[arg(long, env = env::CONTROLLER_XDS_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::CONTROLLER_XDS)))]
    pub xds_addr: SocketAddr,

    /// Also serve plaintext xDS here, for tools and a stock Envoy on the same host; loopback
    /// addresses only.
    #[arg(long, env = env::CONTROLLER_XDS_PLAINTEXT_ADDR)]
    pub xds_plaintext_addr: Option<SocketAddr>,

    /// mesh-ca (`host:port`): the controller gets its own certificate there and serves xDS
    /// over TLS, checking each proxy's certificate against its node.
    #[arg(long, env = env::CONTROLLER_CA_ADDR)]
    pub ca_addr: Option<String>,

    /// PEM root(s) mesh-ca's own certificate chains to.
    #[arg(long, env = env::CONTROLLER_CA_ROOT)]
    pub ca_root: Option<std::path::PathBuf>,

    /// The token proving the controller's identity (`.../ns/mesh-system/sa/mesh-controller`).
    #[arg(long, env = env::CONTROLLER_CA_TOKEN_FILE, default_value = "/var/run/secrets/tokens/mesh-ca-token")]
    pub ca_token_file: std::path::PathBuf,

    /// Address of the metrics and debug HTTP server.
    #[arg(long, env = env::CONTROLLER_ADMIN_ADDR, default_value_t = SocketAddr::from(([0, 0, 0, 0], ports::CONTROLLER_ADMIN)))]
    pub admin_addr: SocketAddr,

    /// A burst of changes is pushed once no further change came for this long (milliseconds).
    /// Default: 10 for the Kubernetes API; 0 for a config directory, whose watch takes the
    /// file events of one save as one change already.
    #[arg(long, env = "MESH_DEBOUNCE_QUIET_MS")]
    pub debounce_quiet_ms: Option<u64>,

    /// A burst of changes is pushed at most this long after its first change (milliseconds).
    #[arg(long, env = env::CONTROLLER_DEBOUNCE_MS, default_value_t = 100)]
    pub debounce_max_ms: u64,

    /// How often the controller scrapes every connected proxy's metrics (edges, top, stat and
    /// the service graph); 0 turns scraping off.
    #[arg(long, env = env::CONTROLLER_STATS_INTERVAL, value_parser = mesh_api::duration::parse, default_value = "5s")]
    pub stats_interval: Duration,

    /// The span rates, success rates and latencies are measured over.
    #[arg(long, env = env::CONTROLLER_STATS_WINDOW, value_parser = mesh_api::duration::parse, default_value = "30s")]
    pub stats_window: Duration,

    /// DNS suffix of the cluster.
    #[arg(long, env = env::CONTROLLER_CLUSTER_DOMAIN, default_value = mesh_api::consts::xds::CLUSTER_DOMAIN)]
    pub cluster_domain: String,

    /// How long to wait for the first list of every kind before serving (Kubernetes mode).
    #[arg(long, env = "MESH_SYNC_TIMEOUT_SECS", default_value_t = 30)]
    pub sync_timeout_secs: u64,

    /// Trust domain of workload SPIFFE IDs.
    #[arg(long, env = env::TRUST_DOMAIN, default_value = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// The mesh-wide mTLS mode of proxies with an identity: PERMISSIVE (mesh TLS and
    /// plaintext) or STRICT (mesh TLS only). A namespace label `mesh.dev/mtls-mode` overrides it.
    #[arg(long, env = env::CONTROLLER_MTLS_MODE, value_enum, default_value_t = MtlsMode::Permissive)]
    pub mtls_mode: MtlsMode,

    /// What workloads do with a request no ALLOW policy decides: allow, deny, or
    /// authenticated (callers with a mesh identity only). A namespace label
    /// `mesh.dev/authz-default` overrides it.
    #[arg(long, env = env::CONTROLLER_AUTHZ_DEFAULT, value_enum, default_value_t = AuthzDefault::Allow)]
    pub authz_default: AuthzDefault,

    /// Log format: text or json.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The controller's namespace: its identity (`ns/NAMESPACE/sa/mesh-controller`) and its
    /// Service's DNS name, which the injector's certificate carries.
    #[arg(long, env = "POD_NAMESPACE", default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,

    /// Serve the sidecar injector (HTTPS, `POST /inject`) here; needs the CA (--ca-addr,
    /// --ca-root), which issues the certificate for `mesh-controller.NAMESPACE.svc`. Also keeps
    /// the caBundle of the MutatingWebhookConfiguration --webhook-config equal to --ca-root and
    /// copies the CA root into every namespace as the ConfigMap mesh-ca-root.
    #[arg(long, env = "MESH_CONTROLLER_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,

    /// This replica's name, its identity in the leader Lease (`mesh-controller` in
    /// --namespace) that decides which replica writes route status.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The MutatingWebhookConfiguration whose caBundle the controller keeps current.
    #[arg(long, default_value = "mesh-sidecar-injector")]
    pub webhook_config: String,

    /// Injection: mesh-proxy's image.
    #[arg(long, default_value = concat!("ghcr.io/mesh-dev/mesh-proxy:", env!("CARGO_PKG_VERSION")))]
    pub inject_proxy_image: String,

    /// Injection: the init container's image (`mesh-proxy init` and iptables).
    #[arg(long, default_value = concat!("ghcr.io/mesh-dev/mesh-proxy-init:", env!("CARGO_PKG_VERSION")))]
    pub inject_init_image: String,

    /// Injection: the controller's xDS address as pods reach it (default
    /// `mesh-controller-xds.NAMESPACE.svc:15010`, a headless Service of every replica).
    #[arg(long)]
    pub inject_xds_addr: Option<String>,

    /// Injection: mesh-ca's address as pods reach it (default `mesh-ca.NAMESPACE.svc:15012`).
    #[arg(long)]
    pub inject_ca_addr: Option<String>,

    /// Injection: the proxy's log filter (refused at start unless it parses, as the proxy would
    /// refuse it).
    #[arg(long, default_value = "info", value_parser = mesh_api::logging::filter_arg)]
    pub inject_proxy_log_level: String,

    /// Injection: the OTLP/gRPC collector sidecars send spans to (`http://HOST:4317`); empty:
    /// traces are propagated, not exported.
    #[arg(long, default_value = "", value_parser = parse_endpoint)]
    pub inject_tracing_endpoint: String,

    /// Injection: percentage of new traces sidecars sample (0-100).
    #[arg(long, default_value_t = 1.0, value_parser = mesh_api::parse_percent)]
    pub inject_tracing_sampling: f64,

    /// Injection: sidecars write JSON access logs to their stdout.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub inject_access_log: bool,

    /// Injection: `prometheus.io/scrape`, `/port` and `/path` annotations on injected pods,
    /// pointing at the sidecar's metrics (a pod with any `prometheus.io/` annotation of its own keeps its own).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub inject_prometheus_annotations: bool,

    /// Injection: the proxy container's resources, as JSON
    /// (`{"requests":{"cpu":"10m"},"limits":{"memory":"256Mi"}}`).
    #[arg(long, value_parser = parse_resources)]
    pub inject_proxy_resources: Option<serde_json::Value>,

    /// Give each Gateway of ours a Deployment of mesh-proxy serving it, a Service and a
    /// ServiceAccount, named `<gateway>-gateway` (with the injection settings above); false:
    /// you run each Gateway's proxy yourself.
    #[arg(long, env = "MESH_CONTROLLER_GATEWAY_DEPLOYMENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub gateway_deployments: bool,

    /// The type of a Gateway's Service (default LoadBalancer), unless the Gateway's
    /// `spec.infrastructure.annotations["mesh.dev/service-type"]` chooses one; only with
    /// --gateway-deployments.
    #[arg(long, env = "MESH_CONTROLLER_GATEWAY_SERVICE_TYPE", value_enum)]
    pub gateway_service_type: Option<crate::provision::ServiceType>,
}

fn parse_resources(s: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("{s:?} is not JSON: {e}"))?;
    let Some(map) = v.as_object() else {
        return Err(format!(
            "{s:?}: expected an object with requests and/or limits"
        ));
    };
    if let Some(k) = map.keys().find(|k| *k != "requests" && *k != "limits") {
        return Err(format!("{s:?}: unknown key {k:?} (requests, limits)"));
    }
    Ok(v)
}

impl Config {
    pub fn debounce(&self) -> (Duration, Duration) {
        let max = Duration::from_millis(self.debounce_max_ms);
        let quiet = self.debounce_quiet_ms.unwrap_or(match self.config_dir {
            Some(_) => 0,
            None => 10,
        });
        (Duration::from_millis(quiet).min(max), max)
    }

    /// Settings for an in-process controller on ephemeral loopback ports.
    pub fn local(config_dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: Some(config_dir.into()),
            xds_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            xds_plaintext_addr: None,
            ca_addr: None,
            ca_root: None,
            ca_token_file: std::path::PathBuf::new(),
            debounce_quiet_ms: None,
            debounce_max_ms: 100,
            stats_interval: Duration::from_secs(5),
            stats_window: Duration::from_secs(30),
            cluster_domain: mesh_api::consts::xds::CLUSTER_DOMAIN.into(),
            sync_timeout_secs: 30,
            trust_domain: mesh_api::spiffe::DEFAULT_TRUST_DOMAIN.into(),
            mtls_mode: MtlsMode::Permissive,
            authz_default: AuthzDefault::Allow,
            log_format: LogFormat::Text,
            namespace: mesh_api::consts::identity::SYSTEM_NAMESPACE.into(),
            webhook_addr: None,
            pod_name: None,
            webhook_config: "mesh-sidecar-injector".into(),
            inject_proxy_image: concat!("ghcr.io/mesh-dev/mesh-proxy:", env!("CARGO_PKG_VERSION"))
                .into(),
            inject_init_image: concat!(
                "ghcr.io/mesh-dev/mesh-proxy-init:",
                env!("CARGO_PKG_VERSION")
            )
            .into(),
            inject_xds_addr: None,
            inject_ca_addr: None,
            inject_proxy_log_level: "info".into(),
            inject_tracing_endpoint: String::new(),
            inject_tracing_sampling: 1.0,
            inject_access_log: false,
            inject_prometheus_annotations: true,
            inject_proxy_resources: None,
            gateway_deployments: true,
            gateway_service_type: None,
        }
    }

    /// What the injector gives sidecars.
    pub fn inject_settings(&self) -> mesh_api::inject::InjectSettings {
        use mesh_api::consts::identity as ids;
        mesh_api::inject::InjectSettings {
            proxy_image: self.inject_proxy_image.clone(),
            init_image: self.inject_init_image.clone(),
            xds_addr: self
                .inject_xds_addr
                .clone()
                .unwrap_or_else(|| ids::xds_addr(&self.namespace)),
            ca_addr: self
                .inject_ca_addr
                .clone()
                .unwrap_or_else(|| ids::ca_addr(&self.namespace)),
            trust_domain: self.trust_domain.clone(),
            proxy_uid: mesh_api::inject::PROXY_UID,
            log_level: self.inject_proxy_log_level.clone(),
            tracing_endpoint: self.inject_tracing_endpoint.clone(),
            tracing_sampling: self.inject_tracing_sampling,
            access_log: self.inject_access_log,
            prometheus_annotations: self.inject_prometheus_annotations,
            resources: self
                .inject_proxy_resources
                .clone()
                .unwrap_or(serde_json::Value::Null),
        }
    }

    /// The DNS name the injector's certificate carries: the controller's Service.
    pub fn webhook_dns_name(&self) -> String {
        format!(
            "{}.{}.svc",
            mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT,
            self.namespace
        )
    }
}
/// `--inject-tracing-endpoint`: empty, or an `http://` URL (what mesh-proxy can send to).
fn parse_endpoint(s: &str) -> Result<String, String> {
    if !s.is_empty() {
        mesh_api::check_otlp_endpoint(s).map_err(|e| format!("{s:?}: {e}"))?;
    }
    Ok(s.to_string())
}
