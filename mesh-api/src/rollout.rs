//! `Rollout` (group `mesh.dev`, version `v1alpha1`): a release of one route rule's traffic from
//! a stable backend to a candidate, step by step, judged at each step by the mesh's own
//! measurements of the candidate (success rate, p99). The controller drives it; `meshctl route
//! rollout` writes one. The reference is `docs/reference/crds.md`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crds::PolicyTargetReference;

/// Moves the traffic of a route rule from `stable` to `candidate` through `steps`, judging each
/// step by `gates`; rolls back to all on `stable` when a gate fails.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "Rollout",
    namespaced,
    derive = "PartialEq",
    status = "RolloutStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"Candidate","type":"string","jsonPath":".spec.candidate"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// The route, in the rollout's namespace: an HTTPRoute or GRPCRoute (group
    /// `gateway.networking.k8s.io`). `sectionName` names the rule whose backends move; without
    /// it, the route's rule that matches every request (or its only rule).
    pub target_ref: PolicyTargetReference,
    /// The backend (a Service in the rollout's namespace) that has the traffic now.
    pub stable: String,
    /// The backend the traffic moves to.
    pub candidate: String,
    /// The steps, in order; the release is promoted when the last one passes.
    pub steps: Vec<RolloutStep>,
    /// Gateway API duration: how long each step runs before it is judged (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// Requests the candidate must have answered in a step before the step may pass
    /// (default 100). A failing gate rolls back as soon as this many are in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
    #[serde(default)]
    pub gates: RolloutGates,
    /// Holds the rollout at its step: the weights stay, nothing is judged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Ends the rollout: all traffic back on `stable`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abort: bool,
}

/// One step: the candidate's share, and optionally the requests that go to it whatever that
/// share is (header-matched first, then weights).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Percent of the rule's requests the candidate gets, 0 to 100.
    #[schemars(range(max = 100))]
    pub weight: u32,
    /// Requests carrying every one of these headers (exact values) go to the candidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<StepHeader>,
    /// Overrides `spec.interval` for this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepHeader {
    pub name: String,
    pub value: String,
}

/// What the candidate must show in each step, measured by the mesh from the callers' proxies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGates {
    /// Percent of the candidate's requests answered without a 5xx or an error, at least.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_rate: Option<f64>,
    /// Gateway API duration: the candidate's p99 latency, at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99: Option<String>,
    /// The candidate against the stable backend over the same step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_to_stable: Option<RelativeGates>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelativeGates {
    /// Percentage points the candidate's success rate may be below the stable backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_success_rate_drop: Option<f64>,
    /// How many times the stable backend's p99 the candidate's may be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_ratio: Option<f64>,
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RolloutPhase {
    /// Moving, or waiting at a step to be judged.
    #[default]
    Progressing,
    /// Held by `spec.paused`, or by a change someone else made to the route's weights.
    Paused,
    /// The last step passed: all traffic on the candidate.
    Promoted,
    /// A gate failed: all traffic back on the stable backend.
    RolledBack,
    /// `spec.abort`: all traffic back on the stable backend.
    Aborted,
    /// The rollout cannot run as written (the route, the rule or a backend is wrong); the
    /// condition `Ready` says why. Fixing the spec starts it.
    Invalid,
}

/// The status fields, as JSON names: a merge patch of the status sets those a status leaves
/// out to null, so nothing stale stays.
pub const STATUS_FIELDS: &[&str] = &[
    "phase",
    "step",
    "stepStartedAt",
    "stable",
    "candidate",
    "release",
    "weights",
    "previousWeights",
    "current",
    "decisions",
    "resumed",
    "conditions",
    "observedGeneration",
];

/// The fields of [`Measured`], as JSON names (for the same reason as [`STATUS_FIELDS`]).
pub const MEASURED_FIELDS: &[&str] = &["requests", "successRate", "p99Ms"];

impl Rollout {
    /// [`RolloutStatus::release`] of this object.
    pub fn release(&self) -> String {
        let annotation = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::consts::labels::RELEASE))
            .map(String::as_str)
            .unwrap_or_default();
        let uid = self.metadata.uid.as_deref().unwrap_or_default();
        if annotation.is_empty() {
            uid.to_string()
        } else {
            format!("{uid}/{annotation}")
        }
    }
}

impl RolloutPhase {
    /// Whether the rollout is over (the controller no longer changes the route for it).
    pub fn is_done(self) -> bool {
        matches!(
            self,
            RolloutPhase::Promoted | RolloutPhase::RolledBack | RolloutPhase::Aborted
        )
    }
}

/// A backend's weight in the rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BackendWeight {
    pub name: String,
    pub weight: u32,
}

/// What the mesh measured of one backend over a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Measured {
    pub requests: u64,
    /// Percent; absent without requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
}

/// One judgement of a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// RFC 3339.
    pub at: String,
    /// 0-based index into `spec.steps`.
    pub step: u32,
    /// `Started`, `Advanced`, `Promoted`, `RolledBack`, `Paused`, `Resumed`, `Aborted`,
    /// `Resumed after restart`.
    pub action: String,
    pub reason: String,
    /// The candidate's share after the decision, in percent.
    pub weight: u32,
    #[serde(default)]
    pub candidate: Measured,
    #[serde(default)]
    pub stable: Measured,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    #[serde(default)]
    pub phase: RolloutPhase,
    /// 0-based index into `spec.steps`.
    #[serde(default)]
    pub step: u32,
    /// When the current step began (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// The stable and candidate this status is about: a rollout whose spec names others starts
    /// over.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stable: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub candidate: String,
    /// Which release this status is about: the Rollout's `metadata.uid` and its
    /// `mesh.dev/release` annotation (`meshctl route rollout` sets it), so a rollout written
    /// again starts over.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub release: String,
    /// The rule's weights as the controller last set them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<BackendWeight>,
    /// The weights before the last change, while the route may not show it yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_weights: Vec<BackendWeight>,
    /// The candidate and stable measured so far in the current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Decision>,
    /// Every decision, oldest first (the last 50).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<Decision>,
    /// When `meshctl route resume` was last seen (the `mesh.dev/resume` annotation's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<String>,
    /// `Ready` (the rollout runs: status False with the reason when it cannot) and `Paused`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
