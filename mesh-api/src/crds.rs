//! The mesh's own CRDs (group `mesh.dev`, version `v1alpha1`): what the Gateway API lacks.
//! Each attaches to Services or Namespaces with `targetRefs` (Gateway API policy attachment).
//! The reference is `docs/reference/crds.md`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "mesh.dev";
pub const VERSION: &str = "v1alpha1";

/// What a policy attaches to, in the policy's namespace: a Service (group `""`) or a
/// Namespace; a TrafficPolicy also an HTTPRoute or GRPCRoute, a RateLimitPolicy also a Gateway
/// (group `gateway.networking.k8s.io`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// A port name of the Service, a rule name of the route, or a listener name of the
    /// Gateway; absent means all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Allows or denies requests to the targets by the caller's identity and by what it asks for.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    derive = "PartialEq",
    shortname = "authz"
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub target_refs: Vec<PolicyTargetReference>,
    /// `Allow` (the default): requests matching no rule are denied once any Allow policy targets
    /// the workload. `Deny`: requests matching a rule are denied, before Allow policies apply.
    #[serde(default)]
    pub action: AuthorizationAction,
    #[serde(default)]
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
}

/// Fields a policy entry has that this version does not know. They are kept (the schema
/// preserves them, so the API server does not prune them) because ignoring a condition would
/// widen an Allow: the controller makes such an entry match nothing in an Allow policy and
/// everything in a Deny policy, and reports it.
pub type UnknownFields = std::collections::BTreeMap<String, serde_json::Value>;

/// A rule matches when any `from` entry and any `to` entry match (an empty list matches all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationRule {
    #[serde(default)]
    pub from: Vec<AuthorizationSource>,
    #[serde(default)]
    pub to: Vec<AuthorizationOperation>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: UnknownFields,
}

/// Who calls: every field given must match; within a field, any value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationSource {
    /// SPIFFE IDs; a trailing `*` matches any suffix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Service accounts, `namespace/name`, or `name` in the policy's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Caller namespaces (by the namespace in the caller's SPIFFE ID).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// `true`: any caller with a mesh identity; `false`: only callers without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: UnknownFields,
}

/// What is asked for: every field given must match; within a field, any value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AuthorizationOperation {
    /// Destination ports (the pod's port, as a Service's `targetPort` names it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Exact paths, or prefixes ending in `*`; matched against the normalized path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: UnknownFields,
}

/// How clients treat the targets: balancing, connection limits, outlier detection, retry
/// budget and connect timeout for the endpoints of a Service (a port of it with
/// `sectionName`), and retries for the requests of a Service or of an HTTPRoute (a rule of it,
/// by name, with `sectionName`). The Istio DestinationRule's job, plus the retries the Gateway
/// API keeps in its experimental channel. Precedence and reference: `docs/reference/crds.md`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    /// Gateway API duration: how long a connection to an endpoint may take (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub algorithm: LoadBalancerAlgorithm,
    /// With `ConsistentHash`: what a request is hashed by (exactly one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum LoadBalancerAlgorithm {
    /// Power of two choices over peak-EWMA latency (mesh-proxy's default; Envoy least request).
    #[default]
    PeakEwma,
    /// Power of two choices over requests in flight.
    LeastRequest,
    RoundRobin,
    Random,
    /// Requests with the same key go to the same endpoint while it is there (session affinity):
    /// a ring hash.
    ConsistentHash,
}

/// The key of a consistent hash.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHash {
    /// A request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie's value; with a `ttl`, a request without the cookie gets one set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookie>,
    /// The client's address.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    pub name: String,
    /// Gateway API duration; when set, the proxy sets the cookie on a response to a request
    /// that had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Circuit breaking, per client proxy and target: past a limit, a request fails at once with
/// `503` (flag `UO`) instead of queueing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Connections to all endpoints together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Requests on one connection before it is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx answers (or failed connections) before an endpoint is ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 or 504 answers (or failed connections) before an ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// Gateway API duration: how often ejections are reconsidered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Gateway API duration (`10s`, `500ms`): the first ejection's length, doubled for each
    /// ejection before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// How many retries clients may send, as Envoy's retry budget counts them: `percent` of the
/// requests in flight (with `interval`, of the requests sent over that interval), and always
/// `minRetryConcurrency` retries at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub percent: Option<u32>,
    /// Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retry_concurrency: Option<u32>,
    /// Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// Retries of the targets' requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Gateway API duration: each try's own timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Gateway API duration: the first retry's backoff, doubled per retry up to ten times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// HTTP statuses to retry. With none and no `on`: any 5xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Other failures to retry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<RetryOn>,
    /// gRPC statuses to retry (of a response that ends at its headers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grpc_statuses: Vec<GrpcRetryStatus>,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx.
    #[serde(rename = "5xx")]
    FiveXx,
    /// 502, 503, 504.
    GatewayError,
    ConnectFailure,
    /// The connection or stream was reset (refused streams included).
    Reset,
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum GrpcRetryStatus {
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

/// Local (per-proxy) rate limits on the targets' inbound requests, in total and per caller
/// identity: token buckets (GCRA); a refused request gets `429` with `Retry-After`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    pub target_refs: Vec<PolicyTargetReference>,
    pub local: LocalRateLimit,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// All callers together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<u32>,
    /// Requests allowed at once above the rate; defaults to a tenth of `requestsPerSecond`
    /// (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Each caller identity on its own; callers without an identity count only toward the
    /// total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<RateLimitBucket>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitBucket {
    pub requests_per_second: u32,
    /// As `local.burst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// Faults injected into the requests of the HTTPRoute and GRPCRoute rules that name this
/// object in an `ExtensionRef` filter (`group: mesh.dev`, `kind: FaultInjection`, in the
/// route's namespace): a delay, then an abort, each on its own share of requests, made by the
/// caller's proxy before the request leaves it. As Envoy's fault filter, which Envoy sidecars
/// run with the same numbers.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "FaultInjection",
    namespaced,
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Holds a share of requests for a while before they go on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Gateway API duration (`200ms`, `2s`), over 0.
    pub fixed_delay: String,
    /// Share of requests delayed, 0 to 100 (to a ten-thousandth).
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
}

/// Answers a share of requests with an error instead of sending them on. Exactly one of
/// `httpStatus` and `grpcStatus`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The HTTP status answered (a gRPC request gets its gRPC equivalent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    /// The gRPC status code answered (0 to 16), trailers only with HTTP 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 16))]
    pub grpc_status: Option<u32>,
    /// Share of requests aborted, 0 to 100 (to a ten-thousandth).
    #[schemars(range(min = 0, max = 100))]
    pub percent: f64,
}

/// The burst of a limit of `rps` when none is given: 100 ms of traffic, at least 1.
pub fn default_burst(rps: u32) -> u32 {
    (rps / 10).max(1)
}

/// The Gateway API release whose standard channel `meshctl install` installs when a cluster has
/// none (the release the `gateway-api` crate's types were generated from).
pub const GATEWAY_API_BUNDLE_VERSION: &str = "v1.5.1";

/// Every CRD of ours.
pub fn mesh_crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    let mut crds = vec![
        AuthorizationPolicy::crd(),
        TrafficPolicy::crd(),
        RateLimitPolicy::crd(),
        FaultInjection::crd(),
        crate::rollout::Rollout::crd(),
    ];
    label(&mut crds);
    crds
}

/// Label of what the mesh installs, so uninstalling removes exactly that.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "mesh");

fn label(crds: &mut [CustomResourceDefinition]) {
    for crd in crds {
        crd.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(PART_OF.0.into(), PART_OF.1.into());
    }
}

/// Standard-channel kinds the chart leaves out: TLSRoute's CEL rules call `isIP`, which an API
/// server accepts in a CRD only from Kubernetes 1.31 (upstream's v1.5 changelog says so), and
/// the chart supports 1.29; the mesh does not read TLSRoutes.
pub const GATEWAY_API_LEFT_OUT: &[&str] = &["TLSRoute"];

/// The Gateway API's standard channel as upstream releases it (v1.5.1, with the CRDs' CEL rules,
/// defaults and limits; but [`GATEWAY_API_LEFT_OUT`]), read from the verbatim copy in this crate
/// and labelled as the chart's. Routes attach to Services, so no Gateway is needed, but the
/// kinds come as one bundle, as clusters that already run a gateway have them. Parsed once.
pub fn gateway_api_crds() -> Vec<CustomResourceDefinition> {
    static CRDS: std::sync::LazyLock<Vec<CustomResourceDefinition>> =
        std::sync::LazyLock::new(|| {
            let upstream = include_str!("gateway-api-v1.5.1-standard.yaml");
            let mut crds: Vec<CustomResourceDefinition> =
                serde_norway::Deserializer::from_str(upstream)
                    .filter_map(|doc| CustomResourceDefinition::deserialize(doc).ok())
                    .filter(|c| !GATEWAY_API_LEFT_OUT.contains(&c.spec.names.kind.as_str()))
                    .collect();
            label(&mut crds);
            crds
        });
    CRDS.clone()
}

/// Every CRD the chart installs: ours and the Gateway API standard channel's.
pub fn chart_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = mesh_crds();
    crds.extend(gateway_api_crds());
    crds
}

/// CRDs as a YAML stream, the way `deploy/charts/mesh/crds/` holds them.
pub fn crds_yaml(crds: &[CustomResourceDefinition]) -> Result<String, serde_json::Error> {
    let mut out = String::from(
        "# Generated by scripts/generate from mesh-api/src/crds.rs; do not edit by hand.\n",
    );
    for crd in crds {
        out.push_str("---\n");
        // JSON is valid YAML; one object per document keeps diffs readable enough.
        out.push_str(&serde_json::to_string_pretty(crd)?);
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    /// The chart's CRD files are what the types generate; `scripts/generate` rewrites them.
    #[test]
    fn generated_crds_match_deploy() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/charts/mesh/crds");
        for (file, crds) in [
            ("mesh.dev.yaml", mesh_crds()),
            ("gateway-api-standard.yaml", gateway_api_crds()),
        ] {
            let path = dir.join(file);
            crate::generated::check(&path, &crds_yaml(&crds).expect("crds render"));
        }
    }

    /// The vendored file is upstream's whole standard channel: every document a CRD (none lost
    /// to a parse error), of the bundle version and channel the chart says.
    #[test]
    fn the_gateway_api_crds_are_upstreams_standard_channel() {
        let docs = include_str!("gateway-api-v1.5.1-standard.yaml")
            .matches("\nkind: CustomResourceDefinition\n")
            .count();
        let crds = gateway_api_crds();
        assert_eq!(crds.len() + GATEWAY_API_LEFT_OUT.len(), docs);
        let kinds: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "GatewayClass",
                "Gateway",
                "GRPCRoute",
                "HTTPRoute",
                "ReferenceGrant",
                "BackendTLSPolicy",
                "ListenerSet",
            ]
        );
        for crd in &crds {
            let a = crd.metadata.annotations.clone().unwrap_or_default();
            assert_eq!(
                a.get("gateway.networking.k8s.io/bundle-version")
                    .map(String::as_str),
                Some(GATEWAY_API_BUNDLE_VERSION)
            );
            assert_eq!(
                a.get("gateway.networking.k8s.io/channel")
                    .map(String::as_str),
                Some("standard")
            );
        }
    }

    #[test]
    fn crds_are_in_our_group() {
        for crd in mesh_crds() {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.versions[0].name, VERSION);
            assert_eq!(crd.spec.scope, "Namespaced");
        }
        assert_eq!(AuthorizationPolicy::api_version(&()), "mesh.dev/v1alpha1");
    }

    #[test]
    fn authorization_policy_parses_and_defaults_to_allow() {
        let p: AuthorizationPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "a", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "Service", "name": "reviews"}],
                "rules": [{"from": [{"namespaces": ["web"]}], "to": [{"methods": ["GET"]}]}]
            }
        }))
        .expect("parses");
        assert_eq!(p.spec.action, AuthorizationAction::Allow);
        assert_eq!(p.spec.rules[0].from[0].namespaces, vec!["web".to_string()]);
    }
}
