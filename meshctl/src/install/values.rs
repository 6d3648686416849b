//! The install's settings: the chart's `values.yaml`, built in, with a user's values file
//! merged over it. `meshctl install --values FILE` and `helm install -f FILE` take the same
//! keys; an unknown key or a bad value is an error that names it.

use std::path::Path;

use anyhow::{Context as _, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The chart's default values, the one place defaults are written.
pub const DEFAULT_VALUES: &str = include_str!("../../../deploy/charts/mesh/values.yaml");
/// The chart's version and the images' default tag.
pub const APP_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Values of the mesh chart")]
pub struct Values {
    pub image: Image,
    /// The SPIFFE trust domain.
    #[schemars(regex(pattern = r"^[a-z0-9._-]{1,255}$"))]
    pub trust_domain: String,
    /// Mesh-wide mTLS between proxies.
    pub mtls_mode: MtlsMode,
    /// What workloads do with a request no ALLOW policy decides.
    pub authz_default: AuthzDefault,
    pub controller: Controller,
    pub ca: Ca,
    pub proxy: Proxy,
    pub webhook: Webhook,
    pub network_policy: NetworkPolicy,
    pub gateway: Gateway,
    pub monitoring: Monitoring,
}

/// Objects for the Prometheus Operator and Grafana.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitoring {
    /// A ServiceMonitor for the controller's and mesh-ca's `/metrics`.
    pub service_monitor: Monitor,
    /// A PodMonitor for every sidecar's `/metrics`, in every namespace.
    pub pod_monitor: Monitor,
    pub dashboards: Dashboards,
}

/// A ServiceMonitor or PodMonitor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitor {
    pub enabled: bool,
    /// How often Prometheus scrapes, like `30s` or `1m`.
    #[schemars(regex(
        pattern = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
    ))]
    pub interval: String,
    /// Labels the Prometheus' monitor selector selects.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Grafana dashboards as ConfigMaps for Grafana's dashboard sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dashboards {
    pub enabled: bool,
    /// Labels the sidecar looks for (its `label` setting; `grafana_dashboard` by default).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What the controller gives each Gateway of the mesh's GatewayClass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gateway {
    /// A Deployment of mesh-proxy serving it, a Service and a ServiceAccount
    /// (`<gateway>-gateway`); false: you run each Gateway's proxy yourself.
    pub deployments: bool,
    /// The type of a Gateway's Service, unless its `spec.infrastructure.annotations`
    /// choose one (`mesh.dev/service-type`).
    pub service_type: ServiceType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// NetworkPolicies for the control plane's pods.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Apply them (the cluster's network plugin must enforce NetworkPolicy).
    pub enabled: bool,
    /// The namespace whose pods may scrape the control plane's admin ports (metrics).
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub monitoring_namespace: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Image {
    /// Images are REGISTRY/mesh-proxy, REGISTRY/mesh-proxy-init, REGISTRY/mesh-controller and
    /// REGISTRY/mesh-ca.
    #[schemars(length(min = 1))]
    pub registry: String,
    /// Empty: the chart's appVersion.
    pub tag: String,
    pub pull_policy: PullPolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthzDefault {
    /// Allow it.
    Allow,
    /// Deny it: only what an ALLOW policy names gets in.
    Deny,
    /// Allow callers with a mesh identity only.
    Authenticated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    Permissive,
    Strict,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Controller {
    #[schemars(range(min = 1))]
    pub replicas: u32,
    pub log_level: LogLevel,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ca {
    /// Lifetime of the workload certificates mesh-ca signs, like `24h` or `90m`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub cert_lifetime: String,
    pub log_level: LogLevel,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    pub log_level: LogLevel,
    pub tracing: Tracing,
    /// JSON access log lines on each sidecar's stdout.
    pub access_log: bool,
    /// `prometheus.io/*` scrape annotations on injected pods (a pod with any `prometheus.io/` annotation keeps its own).
    pub prometheus_annotations: bool,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    /// The OTLP/gRPC collector spans go to, `http://HOST:4317`; empty: trace context is
    /// propagated, nothing is exported.
    #[schemars(regex(pattern = r"^(http://.+)?$"))]
    pub endpoint: String,
    /// Percentage of new traces sampled; a request that arrives with a decision keeps it.
    #[schemars(range(min = 0, max = 100))]
    pub sampling: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Webhook {
    pub failure_policy: FailurePolicy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicy {
    Fail,
    Ignore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// A container's `resources`: quantities by resource name, as Kubernetes takes them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub requests: std::collections::BTreeMap<String, Quantity>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: std::collections::BTreeMap<String, Quantity>,
}

/// A Kubernetes quantity (`100m`, `128Mi`, `1`), kept as written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Quantity {
    Text(String),
    Number(serde_json::Number),
}

impl Values {
    /// The chart's defaults.
    pub fn defaults() -> anyhow::Result<Self> {
        Self::merged(&[])
    }

    /// The defaults with `files` merged over them in order, like `helm -f A -f B`.
    pub fn from_files(files: &[&Path]) -> anyhow::Result<Self> {
        let mut layers = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading values file {}", f.display()))?;
            let v: Value = serde_norway::from_str(&text)
                .with_context(|| format!("values file {}: not YAML", f.display()))?;
            layers.push((f.display().to_string(), v));
        }
        Self::merged(&layers)
    }

    fn merged(layers: &[(String, Value)]) -> anyhow::Result<Self> {
        let mut v: Value =
            serde_norway::from_str(DEFAULT_VALUES).context("the chart's values.yaml")?;
        for (_, layer) in layers {
            // Helm's merge of values files.
            mesh_api::merge_patch(&mut v, layer.clone());
        }
        let what = layers
            .last()
            .map_or_else(|| "the chart's values.yaml".to_owned(), |(n, _)| n.clone());
        let values: Values = serde_path_to_error::deserialize(v)
            .map_err(|e| anyhow::anyhow!("values ({what}): {}: {}", e.path(), e.inner()))?;
        values.check()?;
        Ok(values)
    }

    /// What the types cannot say.
    fn check(&self) -> anyhow::Result<()> {
        if let Err(e) = mesh_api::SpiffeId::workload(&self.trust_domain, "ns", "sa") {
            bail!("values: trustDomain {:?}: {e}", self.trust_domain);
        }
        let m = &self.network_policy.monitoring_namespace;
        let dns_label = m.len() <= 63
            && m.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !m.starts_with('-')
            && !m.ends_with('-')
            && !m.is_empty();
        if !dns_label {
            bail!(
                "values: networkPolicy.monitoringNamespace {m:?}: not a namespace name (lower-case letters, digits and '-', at most 63)"
            );
        }
        for (field, m) in [
            ("serviceMonitor", &self.monitoring.service_monitor),
            ("podMonitor", &self.monitoring.pod_monitor),
        ] {
            if !prometheus_duration(&m.interval) {
                bail!(
                    "values: monitoring.{field}.interval {:?}: not a Prometheus duration (like 30s, 1m or 1h30m)",
                    m.interval
                );
            }
        }
        if let Err(e) = mesh_api::duration::parse(&self.ca.cert_lifetime) {
            bail!("values: ca.certLifetime {:?}: {e}", self.ca.cert_lifetime);
        }
        let t = &self.proxy.tracing;
        if !(0.0..=100.0).contains(&t.sampling) {
            bail!(
                "values: proxy.tracing.sampling {}: not a percentage from 0 to 100",
                t.sampling
            );
        }
        if !t.endpoint.is_empty()
            && let Err(e) = mesh_api::check_otlp_endpoint(&t.endpoint)
        {
            bail!("values: proxy.tracing.endpoint {:?}: {e}", t.endpoint);
        }
        for (field, r) in [
            ("controller", &self.controller.resources),
            ("ca", &self.ca.resources),
            ("proxy", &self.proxy.resources),
        ] {
            for (kind, map) in [("requests", &r.requests), ("limits", &r.limits)] {
                for (name, q) in map {
                    if let Quantity::Text(t) = q
                        && !quantity_ok(t)
                    {
                        bail!("values: {field}.resources.{kind}.{name} {t:?} is not a quantity");
                    }
                }
            }
        }
        Ok(())
    }

    /// The images' tag: `image.tag`, or the chart's appVersion.
    pub fn tag(&self) -> &str {
        if self.image.tag.is_empty() {
            APP_VERSION
        } else {
            &self.image.tag
        }
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}:{}", self.image.registry, self.tag())
    }
}

/// The Prometheus Operator's `Duration` (its CRDs' pattern): units from years to milliseconds,
/// each at most once and in that order, or `0`.
fn prometheus_duration(t: &str) -> bool {
    static PATTERN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
        )
        .expect("a valid pattern")
    });
    PATTERN.is_match(t)
}

fn quantity_ok(t: &str) -> bool {
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    number.parse::<f64>().is_ok()
        && [
            "", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
        ]
        .contains(&suffix)
}

/// `values.schema.json` of the chart, from these types (helm checks values against it).
pub fn schema_json() -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string_pretty(&schemars::schema_for!(Values))?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let v = Values::defaults().expect("defaults");
        assert_eq!(v.trust_domain, "cluster.local");
        assert_eq!(v.mtls_mode, MtlsMode::Permissive);
        assert_eq!(
            v.image("mesh-proxy"),
            format!("ghcr.io/mesh-dev/mesh-proxy:{APP_VERSION}")
        );
    }

    fn with(yaml: &str) -> anyhow::Result<Values> {
        Values::merged(&[(
            "extra.yaml".into(),
            serde_norway::from_str(yaml).expect("yaml"),
        )])
    }

    #[test]
    fn a_file_overrides_only_what_it_sets() {
        let v = with("mtlsMode: STRICT\ncontroller: {replicas: 3}\n").expect("valid");
        assert_eq!(v.mtls_mode, MtlsMode::Strict);
        assert_eq!(v.controller.replicas, 3);
        assert_eq!(v.controller.log_level, LogLevel::Info);
        assert!(!v.controller.resources.requests.is_empty());
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = with("controller: {replica: 3}\n")
            .expect_err("unknown key")
            .to_string();
        assert!(e.contains("extra.yaml") && e.contains("replica"), "{e}");
        let e = with("mtlsMode: MAYBE\n").expect_err("bad mode").to_string();
        assert!(e.contains("mtlsMode") && e.contains("MAYBE"), "{e}");
        let e = with("trustDomain: 'Not A Domain'\n")
            .expect_err("bad domain")
            .to_string();
        assert!(e.contains("trustDomain"), "{e}");
        let e = with("ca: {certLifetime: forever}\n")
            .expect_err("bad lifetime")
            .to_string();
        assert!(e.contains("ca.certLifetime"), "{e}");
        let e = with("proxy: {resources: {limits: {memory: lots}}}\n")
            .expect_err("bad quantity")
            .to_string();
        assert!(e.contains("proxy.resources.limits.memory"), "{e}");
        let e = with("proxy: {tracing: {sampling: 150}}\n")
            .expect_err("bad sampling")
            .to_string();
        assert!(e.contains("proxy.tracing.sampling 150"), "{e}");
        for bad in ["Monitoring", "", "a_b", "-x"] {
            let e = with(&format!(
                "networkPolicy: {{monitoringNamespace: '{bad}'}}\n"
            ))
            .expect_err("bad namespace")
            .to_string();
            assert!(
                e.contains("networkPolicy.monitoringNamespace"),
                "{bad}: {e}"
            );
        }
        let e = with("proxy: {tracing: {endpoint: 'https://collector:4317'}}\n")
            .expect_err("TLS endpoint")
            .to_string();
        assert!(
            e.contains("proxy.tracing.endpoint") && e.contains("https://collector"),
            "{e}"
        );
        let v = with("proxy: {tracing: {endpoint: 'http://collector:4317', sampling: 0.5}, accessLog: true}\n")
            .expect("valid");
        assert_eq!(v.proxy.tracing.sampling, 0.5);
        assert!(v.proxy.access_log);
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "128Mi", "1", "0.5", "2Gi", "1k"] {
            assert!(quantity_ok(ok), "{ok}");
        }
        for bad in ["", "lots", "1 Gi", "Mi", "1XB"] {
            assert!(!quantity_ok(bad), "{bad}");
        }
    }

    /// The chart's `values.schema.json` is what these types generate.
    #[test]
    fn chart_schema_matches_the_types() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/charts/mesh/values.schema.json");
        mesh_api::generated::check(&path, &schema_json().expect("schema"));
    }
}
