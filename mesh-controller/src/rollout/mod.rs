//! Rollouts: the controller moves a route rule's traffic from a stable backend to a candidate
//! step by step, judging each step by what the callers' proxies measured of the candidate (and
//! of the stable backend) since the step began, and rolls back to all on stable when a gate
//! fails. It changes the route where it lives ([`store`]: server-side apply in a cluster, the
//! manifest file in a local mesh), keeps its state in the Rollout's status, and never fights a
//! person: weights it did not set pause the rollout until `meshctl route resume`.
//!
//! One replica drives (the Lease holder). After a restart a rollout resumes at the step its
//! status names; the step's time and measurements start over, since the counts before the
//! restart are gone with the process.

pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use mesh_api::rollout::{
    BackendWeight, Decision, Measured, Rollout, RolloutGates, RolloutPhase, RolloutSpec,
    RolloutStatus, StepHeader,
};
use tracing::{info, warn};

use crate::index::Index;
use crate::index::routes::{MatchSpec, RouteSpec};
use crate::objects::{Kind, ObjKey};
use crate::stats::{Stats, Tally};
pub use store::Store;

/// Time at a step when neither the step nor the spec says.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Candidate requests a step needs before it is judged, when the spec does not say.
pub const DEFAULT_MIN_REQUESTS: u32 = 100;
/// Decisions kept in the status.
const MAX_DECISIONS: usize = 50;
/// How often the measurements of a step are written to the status while nothing else changes.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long a route may show the weights before the last change before that change is made
/// again (it was lost: the controller stopped between writing the status and the route).
const REWRITE_AFTER: Duration = Duration::from_secs(10);

/// The rule a rollout moves, as the index holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleView {
    /// `Kind/namespace/name`, as the proxies' `route` label starts.
    pub route: String,
    pub route_key: ObjKey,
    /// The rule's `name`, when the rollout names one (`targetRef.sectionName`).
    pub section: Option<String>,
    /// 1-based, for messages.
    pub rule_number: usize,
    pub weights: BTreeMap<String, u32>,
    /// The port the backendRefs name.
    pub port: u16,
    /// Whether the route has the rollout's own header rule (`rollout-<name>`).
    pub own_rule: bool,
}

/// The change a rollout makes to its route's rule.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleEdit {
    pub section: Option<String>,
    /// The name of the rollout's own header rule (`rollout-<name>`).
    pub own_rule: String,
    pub weights: Vec<(String, u32)>,
    pub port: u16,
    /// Requests with these headers go to `candidate` (a rule before the split rule); empty
    /// removes that rule.
    pub headers: Vec<StepHeader>,
    pub candidate: String,
}

/// The name of a rollout's header-matched rule in its route.
pub fn own_rule(rollout: &str) -> String {
    format!("rollout-{rollout}")
}

/// Makes `edit` on a route manifest (as YAML, so fields this code does not know stay).
pub fn apply_edit(route: &mut serde_norway::Value, edit: &RuleEdit) -> Result<(), String> {
    use mesh_api::route_doc as doc;
    let rule = match &edit.section {
        Some(name) => doc::rule_named(route, name)
            .ok_or_else(|| format!("the route has no rule named {name:?}"))?,
        None => doc::split_rule_besides(route, Some(&edit.own_rule))
            .ok_or("the route has no rule that matches every request")?,
    };
    if !doc::set_backends(route, rule, &edit.weights, edit.port) {
        return Err(format!("rule {} is not a mapping", rule + 1));
    }
    if edit.headers.is_empty() {
        doc::remove_rule(route, &edit.own_rule);
        return Ok(());
    }
    // The split rule, narrowed to the headers and sent to the candidate alone.
    let mut header_rule = doc::rules(route)[rule].clone();
    let key = |k: &str| serde_norway::Value::String(k.to_string());
    let headers: Vec<serde_norway::Value> = edit
        .headers
        .iter()
        .map(|h| {
            let mut m = serde_norway::Mapping::new();
            m.insert(key("type"), key("Exact"));
            m.insert(key("name"), key(&h.name));
            m.insert(key("value"), key(&h.value));
            serde_norway::Value::Mapping(m)
        })
        .collect();
    let mut matches: Vec<serde_norway::Value> = header_rule
        .get("matches")
        .and_then(serde_norway::Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    if matches.is_empty() {
        matches.push(serde_norway::Value::Mapping(Default::default()));
    }
    for m in &mut matches {
        if let Some(m) = m.as_mapping_mut() {
            let mut all = m
                .get("headers")
                .and_then(serde_norway::Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            all.extend(headers.iter().cloned());
            m.insert(key("headers"), serde_norway::Value::Sequence(all));
        }
    }
    let slot = header_rule
        .as_mapping_mut()
        .ok_or_else(|| format!("rule {} is not a mapping", rule + 1))?;
    slot.insert(key("name"), key(&edit.own_rule));
    slot.insert(key("matches"), serde_norway::Value::Sequence(matches));
    slot.insert(
        key("backendRefs"),
        doc::backend_refs(&[(edit.candidate.clone(), 1)], edit.port),
    );
    doc::insert_rule(route, rule, header_rule);
    Ok(())
}

/// What the driver remembers of a rollout between ticks.
#[derive(Debug)]
struct Memory {
    status: RolloutStatus,
    /// The status as last written, and when.
    persisted: Option<(RolloutStatus, Instant)>,
    /// The counts when the current step's measurement began.
    baseline: Option<Baseline>,
    last_write: Option<Instant>,
    /// Loaded by this process while progressing (a restart, or a new Lease holder): the next
    /// measurement of the step says so.
    restarted: bool,
}

#[derive(Debug)]
struct Baseline {
    started: Instant,
    candidate: Tally,
    stable: Tally,
}

/// Drives every Rollout the index holds, one tick at a time.
pub struct Driver {
    pub index: Arc<Mutex<Index>>,
    pub stats: Arc<Stats>,
    pub store: Store,
    /// Whether this replica drives (holds the Lease); always true in a local mesh.
    pub leading: Arc<AtomicBool>,
    pub tick: Duration,
    /// Whether the controller scrapes the proxies (`--stats-interval` not 0): without it no
    /// step can be judged.
    pub measuring: bool,
    memory: HashMap<ObjKey, Memory>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("tick", &self.tick)
            .field("rollouts", &self.memory.len())
            .finish_non_exhaustive()
    }
}

/// What one tick does to a rollout besides its status.
#[derive(Debug, Default)]
struct Effects {
    edit: Option<RuleEdit>,
    events: Vec<(bool, String, String)>,
}

impl Driver {
    pub fn new(
        index: Arc<Mutex<Index>>,
        stats: Arc<Stats>,
        store: Store,
        leading: Arc<AtomicBool>,
    ) -> Self {
        Self {
            index,
            stats,
            store,
            leading,
            tick: Duration::from_secs(1),
            measuring: true,
            memory: HashMap::new(),
        }
    }

    /// Ticks for as long as the task runs.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.leading.load(Ordering::Relaxed) {
                self.tick(Instant::now()).await;
            } else {
                // Another replica drives; its status is read again on taking over.
                self.memory.clear();
            }
        }
    }

    /// One pass over every rollout, as of `now`.
    pub async fn tick(&mut self, now: Instant) {
        let rollouts = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rollouts();
        let routes: BTreeSet<String> = rollouts
            .iter()
            .map(|r| route_label(r, r.metadata.namespace.as_deref().unwrap_or_default()))
            .collect();
        self.stats.track(routes);
        let keys: BTreeSet<ObjKey> = rollouts.iter().map(|r| key_of(r)).collect();
        let store = &self.store;
        self.memory.retain(|k, _| {
            let keep = keys.contains(k);
            if !keep {
                store.forget(&k.namespace, &k.name);
            }
            keep
        });
        for r in rollouts {
            self.drive(&r, now).await;
        }
    }

    async fn drive(&mut self, rollout: &Rollout, now: Instant) {
        let key = key_of(rollout);
        if !self.memory.contains_key(&key) {
            let status = self.store.load(rollout).await;
            let restarted = status.phase == RolloutPhase::Progressing && !status.weights.is_empty();
            self.memory.insert(
                key.clone(),
                Memory {
                    persisted: Some((status.clone(), now)),
                    status,
                    baseline: None,
                    last_write: None,
                    restarted,
                },
            );
        }
        let (rule, view) = {
            let index = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let rule = resolve_rule(&index, rollout);
            let view = rule.clone().and_then(|mut v| {
                check_backends(&index, rollout, &mut v)?;
                Ok(v)
            });
            (rule.ok(), view)
        };
        let measuring = self.measuring;
        let Some(mem) = self.memory.get_mut(&key) else {
            return;
        };
        let effects = step(rollout, view, rule, mem, &self.stats, measuring, now);
        let generation = rollout.metadata.generation;
        if let Some(edit) = &effects.edit {
            // The status first: whoever reads it next (this replica after a restart, or the
            // next Lease holder) then knows both the weights before and the ones wanted, and
            // does not take the route for a person's change.
            if save(&self.store, rollout, &key, mem, now).await {
                {
                    match self.store.write_route(rollout, edit).await {
                        Ok(()) => mem.last_write = Some(now),
                        Err(e) => {
                            warn!(rollout = %key, error = %e, "setting the route's weights");
                            // The status keeps the weights wanted; they are written again
                            // `REWRITE_AFTER` from now, as the route still shows the ones before.
                            mem.last_write = Some(now);
                            set_condition(
                                &mut mem.status,
                                "Ready",
                                false,
                                "RouteNotWritten",
                                &format!("setting the route's weights: {e}"),
                                generation,
                            );
                        }
                    }
                }
            } else {
                // The route is left as it is until the status can be written.
                mem.last_write = Some(now);
            }
        }
        for (warning, reason, message) in &effects.events {
            info!(rollout = %key, %reason, %message, "rollout");
            self.store.event(rollout, *warning, reason, message).await;
        }
        if persist_due(mem, now) {
            save(&self.store, rollout, &key, mem, now).await;
        }
    }
}

/// Writes a rollout's status; tells whether it was written.
async fn save(
    store: &Store,
    rollout: &Rollout,
    key: &ObjKey,
    mem: &mut Memory,
    now: Instant,
) -> bool {
    match store.save_status(rollout, &mem.status).await {
        Ok(()) => {
            mem.persisted = Some((mem.status.clone(), now));
            true
        }
        Err(e) => {
            warn!(rollout = %key, error = %e, "writing the rollout's status");
            false
        }
    }
}

/// Whether the status is to be written: anything but the step's measurements changed, or they
/// did and `PROGRESS_EVERY` passed since the last write.
fn persist_due(mem: &mut Memory, now: Instant) -> bool {
    let Some((written, at)) = mem.persisted.as_mut() else {
        return true;
    };
    let (was, is) = (written.current.take(), mem.status.current.take());
    let same_besides = *written == mem.status;
    written.current = was;
    mem.status.current = is;
    !same_besides
        || (written.current != mem.status.current && now.duration_since(*at) >= PROGRESS_EVERY)
}

fn key_of(r: &Rollout) -> ObjKey {
    ObjKey {
        kind: Kind::Rollout,
        namespace: r.metadata.namespace.clone().unwrap_or_default(),
        name: r.metadata.name.clone().unwrap_or_default(),
    }
}

/// `Kind/namespace/name` of the route a rollout targets.
fn route_label(r: &Rollout, ns: &str) -> String {
    format!("{}/{ns}/{}", r.spec.target_ref.kind, r.spec.target_ref.name)
}

/// The rule a rollout moves, or why it cannot run.
pub fn resolve(index: &Index, rollout: &Rollout) -> Result<RuleView, String> {
    let mut view = resolve_rule(index, rollout)?;
    check_backends(index, rollout, &mut view)?;
    Ok(view)
}

/// The route and rule a rollout moves, with the port its backendRefs (or its parent) name:
/// enough to put all traffic back on stable, even when a backend is wrong.
pub fn resolve_rule(index: &Index, rollout: &Rollout) -> Result<RuleView, String> {
    let spec = &rollout.spec;
    let ns = rollout.metadata.namespace.clone().unwrap_or_default();
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let t = &spec.target_ref;
    let kind = match (t.group.as_str(), t.kind.as_str()) {
        ("gateway.networking.k8s.io", "HTTPRoute") => Kind::HTTPRoute,
        ("gateway.networking.k8s.io", "GRPCRoute") => Kind::GRPCRoute,
        (g, k) => {
            return Err(format!(
                "spec.targetRef: {g}/{k} is not a route; name an HTTPRoute or GRPCRoute of group gateway.networking.k8s.io"
            ));
        }
    };
    let route_key = ObjKey {
        kind,
        namespace: ns.clone(),
        name: t.name.clone(),
    };
    let route = index
        .route_spec(&route_key)
        .ok_or_else(|| format!("spec.targetRef: {kind} {ns}/{} not found", t.name))?;
    let own = own_rule(&name);
    let rule = find_rule(&route, t.section_name.as_deref(), &own).ok_or_else(|| match &t
        .section_name
    {
        Some(s) => format!(
            "spec.targetRef.sectionName: {kind} {ns}/{} has no rule named {s:?}",
            t.name
        ),
        None => format!(
            "{kind} {ns}/{}: no rule matches every request, so none carries all of its traffic; name the rule with spec.targetRef.sectionName",
            t.name
        ),
    })?;
    let r = &route.rules[rule];
    let mut weights = BTreeMap::new();
    for b in &r.backends {
        if b.namespace != ns {
            return Err(format!(
                "{kind} {ns}/{} rule {}: backend {}/{} is in another namespace; a rollout moves traffic between Services of its own namespace",
                t.name,
                rule + 1,
                b.namespace,
                b.name
            ));
        }
        *weights.entry(b.name.clone()).or_insert(0) += b.weight;
    }
    let port = r
        .backends
        .iter()
        .find(|b| b.name == spec.stable || b.name == spec.candidate)
        .and_then(|b| b.port)
        .or_else(|| r.backends.iter().find_map(|b| b.port))
        .or_else(|| route.parents.iter().find_map(|p| p.port));
    Ok(RuleView {
        route: format!("{kind}/{ns}/{}", t.name),
        route_key,
        section: t.section_name.clone(),
        rule_number: rule + 1,
        weights,
        port: port.unwrap_or_default(),
        own_rule: route
            .rules
            .iter()
            .any(|r| r.name.as_deref() == Some(own.as_str())),
    })
}

/// What must hold of the backends for the rollout to run: both Services exist with one port
/// the rule can name, and no other backend of the rule has traffic. Sets the view's port.
pub fn check_backends(index: &Index, rollout: &Rollout, view: &mut RuleView) -> Result<(), String> {
    let spec = &rollout.spec;
    check_spec(spec)?;
    let ns = rollout.metadata.namespace.clone().unwrap_or_default();
    let t = &spec.target_ref;
    for (b, w) in &view.weights {
        if *b != spec.stable && *b != spec.candidate && *w > 0 {
            return Err(format!(
                "{} {ns}/{} rule {} also sends to {b} (weight {w}); a rollout moves traffic between spec.stable and spec.candidate only: set {b}'s weight to 0",
                t.kind, t.name, view.rule_number
            ));
        }
    }
    let named = (view.port != 0).then_some(view.port);
    let mut chosen: Option<(u16, &str)> = None;
    for (field, svc) in [
        ("spec.stable", &spec.stable),
        ("spec.candidate", &spec.candidate),
    ] {
        let ports = index
            .service_ports(&ns, svc)
            .ok_or_else(|| format!("{field}: Service {ns}/{svc} not found"))?;
        let p = match (named, ports.as_slice()) {
            (Some(p), _) if ports.contains(&p) => p,
            (Some(p), _) => {
                return Err(format!("{field}: Service {ns}/{svc} has no port {p}"));
            }
            (None, [only]) => *only,
            (None, _) => {
                return Err(format!(
                    "{field}: Service {ns}/{svc} has {} ports and the route names none; give the route's parentRef or backendRefs a port",
                    ports.len()
                ));
            }
        };
        match chosen {
            Some((q, other)) if q != p => {
                return Err(format!(
                    "{field}: Service {ns}/{svc}'s port is {p} and {other}'s is {q}; the rule's backendRefs name one port: give the route's parentRef or backendRefs a port both have"
                ));
            }
            _ => chosen = Some((p, svc)),
        }
    }
    view.port = chosen.map_or(0, |(p, _)| p);
    Ok(())
}

/// The rule `section` names, or the last rule that matches every request (leaving out the
/// rollout's own header rule), or the only one.
fn find_rule(route: &RouteSpec, section: Option<&str>, own: &str) -> Option<usize> {
    if let Some(s) = section {
        return route
            .rules
            .iter()
            .position(|r| r.name.as_deref() == Some(s));
    }
    let candidates: Vec<usize> = (0..route.rules.len())
        .filter(|i| route.rules[*i].name.as_deref() != Some(own))
        .collect();
    let all = MatchSpec::default();
    candidates
        .iter()
        .rev()
        .find(|i| {
            let m = &route.rules[**i].matches;
            m.is_empty() || m.contains(&all)
        })
        .copied()
        .or(match candidates.as_slice() {
            [only] => Some(*only),
            _ => None,
        })
}

/// What in a spec is wrong on its own, before the route is looked at.
pub fn check_spec(spec: &RolloutSpec) -> Result<(), String> {
    if spec.stable.is_empty() || spec.candidate.is_empty() {
        return Err("spec.stable and spec.candidate must name Services".into());
    }
    if spec.stable == spec.candidate {
        return Err(format!(
            "spec.candidate {:?} is the stable backend",
            spec.candidate
        ));
    }
    if spec.steps.is_empty() {
        return Err("spec.steps: no steps".into());
    }
    for (i, s) in spec.steps.iter().enumerate() {
        if s.weight > 100 {
            return Err(format!(
                "spec.steps[{i}].weight: {} is over 100 (a percentage)",
                s.weight
            ));
        }
        if s.weight == 0 && s.headers.is_empty() {
            return Err(format!(
                "spec.steps[{i}]: weight 0 and no headers send the candidate nothing to judge"
            ));
        }
        if let Some(d) = &s.interval {
            interval_of(d, &format!("spec.steps[{i}].interval"))?;
        }
        for (j, h) in s.headers.iter().enumerate() {
            if h.name.is_empty() {
                return Err(format!("spec.steps[{i}].headers[{j}].name: empty"));
            }
        }
    }
    if let Some(d) = &spec.interval {
        interval_of(d, "spec.interval")?;
    }
    let g = &spec.gates;
    if let Some(p) = g.min_success_rate
        && !(0.0..=100.0).contains(&p)
    {
        return Err(format!(
            "spec.gates.minSuccessRate: {p} is not a percentage from 0 to 100"
        ));
    }
    if let Some(d) = &g.max_p99 {
        interval_of(d, "spec.gates.maxP99")?;
    }
    if let Some(r) = &g.relative_to_stable {
        if let Some(d) = r.max_success_rate_drop
            && !(0.0..=100.0).contains(&d)
        {
            return Err(format!(
                "spec.gates.relativeToStable.maxSuccessRateDrop: {d} is not from 0 to 100 (percentage points)"
            ));
        }
        if let Some(x) = r.max_p99_ratio
            && !(x > 0.0 && x.is_finite())
        {
            return Err(format!(
                "spec.gates.relativeToStable.maxP99Ratio: {x} is not a positive number"
            ));
        }
    }
    Ok(())
}

fn interval_of(d: &str, field: &str) -> Result<Duration, String> {
    crate::index::routes::duration(d, field).map_err(|e| e.to_string())
}

/// How long step `i` runs.
fn step_interval(spec: &RolloutSpec, i: usize) -> Duration {
    spec.steps
        .get(i)
        .and_then(|s| s.interval.as_deref())
        .or(spec.interval.as_deref())
        .and_then(|d| interval_of(d, "").ok())
        .unwrap_or(DEFAULT_INTERVAL)
}

fn measured(t: &Tally) -> Measured {
    Measured {
        requests: t.requests.round() as u64,
        success_rate: t.success_percent().map(round2),
        p99_ms: t.p99_ms().map(round2),
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Why the candidate fails a gate, judged on at least `min` of its requests; `None` when it
/// passes every gate.
pub fn gate_failure(
    gates: &RolloutGates,
    candidate: &Tally,
    stable: &Tally,
    min: u32,
) -> Option<String> {
    let success = candidate.success_percent()?;
    if let Some(want) = gates.min_success_rate
        && success < want
    {
        return Some(format!(
            "success rate {success:.2} % is below {want} % (minSuccessRate)"
        ));
    }
    let p99 = candidate.p99_ms();
    if let (Some(max), Some(p99)) = (
        gates
            .max_p99
            .as_deref()
            .and_then(|d| interval_of(d, "").ok()),
        p99,
    ) && p99 > max.as_secs_f64() * 1000.0
    {
        return Some(format!(
            "p99 {p99:.1} ms is above {} ms (maxP99)",
            max.as_millis()
        ));
    }
    let rel = gates.relative_to_stable.as_ref()?;
    // Compared only when the stable backend served enough requests in the same step.
    if stable.requests < f64::from(min) {
        return None;
    }
    if let (Some(drop), Some(base)) = (rel.max_success_rate_drop, stable.success_percent())
        && base - success > drop
    {
        return Some(format!(
            "success rate {success:.2} % is {:.2} points below the stable backend's {base:.2} % (maxSuccessRateDrop {drop})",
            base - success
        ));
    }
    if let (Some(ratio), Some(p99), Some(base)) = (rel.max_p99_ratio, p99, stable.p99_ms())
        && base > 0.0
        && p99 > base * ratio
    {
        return Some(format!(
            "p99 {p99:.1} ms is {:.2} times the stable backend's {base:.1} ms (maxP99Ratio {ratio})",
            p99 / base
        ));
    }
    None
}

fn now_rfc3339() -> String {
    Timestamp::now().to_string()
}

/// Sets condition `kind`, keeping its transition time while status and reason stay.
fn set_condition(
    st: &mut RolloutStatus,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    let since = st
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == status && c.reason == reason)
        .map(|c| c.last_transition_time.clone());
    st.conditions.retain(|c| c.type_ != kind);
    st.conditions.push(Condition {
        type_: kind.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since.unwrap_or(Time(Timestamp::now())),
    });
    st.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
}

fn weights_list(w: &[(String, u32)]) -> Vec<BackendWeight> {
    let mut out: Vec<BackendWeight> = w
        .iter()
        .map(|(name, weight)| BackendWeight {
            name: name.clone(),
            weight: *weight,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The backends of a rule that get traffic (a backend listed at 0 is none of a change).
fn live(w: &BTreeMap<String, u32>) -> BTreeMap<&str, u32> {
    w.iter()
        .filter(|(_, w)| **w > 0)
        .map(|(n, w)| (n.as_str(), *w))
        .collect()
}

fn as_map(w: &[BackendWeight]) -> BTreeMap<String, u32> {
    w.iter().map(|b| (b.name.clone(), b.weight)).collect()
}

fn show(w: &BTreeMap<String, u32>) -> String {
    w.iter()
        .map(|(n, w)| format!("{n}={w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rule's backends with the candidate at `percent`: stable and candidate first, others
/// the rule lists kept at 0.
fn split_weights(spec: &RolloutSpec, view: &RuleView, percent: u32) -> Vec<(String, u32)> {
    let mut out = vec![
        (spec.stable.clone(), 100 - percent.min(100)),
        (spec.candidate.clone(), percent.min(100)),
    ];
    for name in view.weights.keys() {
        if *name != spec.stable && *name != spec.candidate {
            out.push((name.clone(), 0));
        }
    }
    out
}

/// The candidate's share of a rule's weights, in percent.
fn share_of(weights: &BTreeMap<String, u32>, candidate: &str) -> u32 {
    let total: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mine = u64::from(weights.get(candidate).copied().unwrap_or(0));
    (mine * 100).checked_div(total).unwrap_or(0) as u32
}

/// An Event reason from a decision's action: `Resumed after restart` -> `ResumedAfterRestart`.
fn reason_of(action: &str) -> String {
    action
        .split(' ')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// Decides what a rollout does this tick: its new status (in `mem`) and the route change and
/// events that go with it. `view` is the rule when everything resolves; `rule` the rule even
/// when a backend is wrong (enough to abort).
#[allow(clippy::too_many_arguments)]
fn step(
    rollout: &Rollout,
    view: Result<RuleView, String>,
    rule: Option<RuleView>,
    mem: &mut Memory,
    stats: &Stats,
    measuring: bool,
    now: Instant,
) -> Effects {
    let spec = &rollout.spec;
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let generation = rollout.metadata.generation;
    let token = rollout
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(mesh_api::consts::labels::RESUME).cloned());
    let mut fx = Effects::default();
    // Said once, at the first measurement right after the load, or not at all; only a tick
    // that waits for the route to show the step's weights hands it on to the next.
    let restarted = std::mem::take(&mut mem.restarted);
    let st = &mut mem.status;
    let decide = |st: &mut RolloutStatus,
                  fx: &mut Effects,
                  action: &str,
                  reason: String,
                  weight: u32,
                  m: (Measured, Measured),
                  warning: bool| {
        st.decisions.push(Decision {
            at: now_rfc3339(),
            step: st.step,
            action: action.into(),
            reason: reason.clone(),
            weight,
            candidate: m.0,
            stable: m.1,
        });
        if st.decisions.len() > MAX_DECISIONS {
            let extra = st.decisions.len() - MAX_DECISIONS;
            st.decisions.drain(..extra);
        }
        fx.events.push((warning, reason_of(action), reason));
    };
    let percent = |i: u32| spec.steps.get(i as usize).map_or(0, |s| s.weight);
    let headers = |i: u32| {
        spec.steps
            .get(i as usize)
            .map(|s| s.headers.clone())
            .unwrap_or_default()
    };
    let edit = |view: &RuleView, weights: Vec<(String, u32)>, headers: Vec<StepHeader>| RuleEdit {
        section: view.section.clone(),
        own_rule: own_rule(&name),
        weights,
        port: view.port,
        headers,
        candidate: spec.candidate.clone(),
    };
    let set_weights = |st: &mut RolloutStatus,
                       fx: &mut Effects,
                       view: &RuleView,
                       w: Vec<(String, u32)>,
                       h: Vec<StepHeader>| {
        st.previous_weights = weights_list(
            &view
                .weights
                .iter()
                .map(|(n, w)| (n.clone(), *w))
                .collect::<Vec<_>>(),
        );
        st.weights = weights_list(&w);
        fx.edit = Some(edit(view, w, h));
    };
    // The weights and header rule of step `i`.
    let to_step = |st: &mut RolloutStatus, fx: &mut Effects, view: &RuleView, i: u32| {
        set_weights(
            st,
            fx,
            view,
            split_weights(spec, view, percent(i)),
            headers(i),
        );
    };

    // A new release: another stable, candidate or release than the status is about.
    let release = rollout.release();
    let start = st.stable != spec.stable || st.candidate != spec.candidate || st.release != release;
    if start {
        *st = RolloutStatus {
            stable: spec.stable.clone(),
            candidate: spec.candidate.clone(),
            release,
            resumed: token.clone(),
            ..Default::default()
        };
        mem.baseline = None;
    }
    st.observed_generation = generation;
    let started = !st.weights.is_empty();

    // A change this rollout made that the route does not show yet.
    let mut lagging = false;
    if let Some(r) = rule.as_ref().filter(|_| started) {
        let want = as_map(&st.weights);
        // The header rule the last change wanted: the step's, while the rollout runs.
        let want_rule = !st.phase.is_done() && !headers(st.step).is_empty();
        let shown = live(&r.weights) == live(&want);
        if shown && r.own_rule == want_rule {
            if !st.previous_weights.is_empty() {
                st.previous_weights.clear();
            }
            if st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "RouteNotWritten")
            {
                let reason = if st.phase.is_done() {
                    format!("{:?}", st.phase)
                } else {
                    "Progressing".into()
                };
                set_condition(
                    st,
                    "Ready",
                    true,
                    &reason,
                    "the route has the weights",
                    generation,
                );
            }
        } else if !paused_by_change(st)
            && (shown
                || (!st.previous_weights.is_empty()
                    && live(&r.weights) == live(&as_map(&st.previous_weights))))
        {
            lagging = true;
            // Made again when it was lost (the write failed, or the controller stopped).
            if mem
                .last_write
                .is_none_or(|t| now.duration_since(t) >= REWRITE_AFTER)
            {
                let h = if want_rule {
                    headers(st.step)
                } else {
                    Vec::new()
                };
                let target = view.as_ref().unwrap_or(r);
                fx.edit = Some(edit(target, want.into_iter().collect(), h));
            }
        }
    }
    if st.phase.is_done() {
        return fx;
    }

    if spec.abort {
        st.current = None;
        st.phase = RolloutPhase::Aborted;
        match (started, view.as_ref().ok().or(rule.as_ref())) {
            (false, _) => {
                decide(
                    st,
                    &mut fx,
                    "Aborted",
                    "spec.abort before it started: the route is left as it is".into(),
                    0,
                    Default::default(),
                    true,
                );
            }
            (true, Some(r)) => {
                let w = split_weights(spec, r, 0);
                set_weights(st, &mut fx, r, w, Vec::new());
                decide(
                    st,
                    &mut fx,
                    "Aborted",
                    format!("spec.abort: all traffic back on {}", spec.stable),
                    0,
                    Default::default(),
                    true,
                );
            }
            (true, None) => {
                // Nothing to write to: the route or its rule is gone.
                let why = view.as_ref().err().cloned().unwrap_or_default();
                decide(
                    st,
                    &mut fx,
                    "Aborted",
                    format!("spec.abort; the route could not be changed: {why}"),
                    0,
                    Default::default(),
                    true,
                );
            }
        }
        set_condition(st, "Ready", true, "Aborted", "aborted", generation);
        set_condition(st, "Paused", false, "Done", "", generation);
        return fx;
    }

    let view = match view {
        Ok(v) => v,
        Err(why) => {
            let noted = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Invalid");
            if !noted {
                // A pause stays a pause (its resume still needs asking for).
                if st.phase != RolloutPhase::Paused {
                    st.phase = RolloutPhase::Invalid;
                }
                st.current = None;
                let w = rule
                    .as_ref()
                    .map_or(0, |r| share_of(&r.weights, &spec.candidate));
                decide(
                    st,
                    &mut fx,
                    "Invalid",
                    why.clone(),
                    w,
                    Default::default(),
                    true,
                );
            }
            set_condition(st, "Ready", false, "Invalid", &why, generation);
            mem.baseline = None;
            return fx;
        }
    };
    let rule_name = format!("{} rule {}", view.route, view.rule_number);

    if !started {
        if spec.paused {
            if st.phase != RolloutPhase::Paused {
                st.phase = RolloutPhase::Paused;
                set_condition(
                    st,
                    "Paused",
                    true,
                    "Paused",
                    "spec.paused: not started",
                    generation,
                );
                set_condition(
                    st,
                    "Ready",
                    true,
                    "Paused",
                    "held before its first step",
                    generation,
                );
                decide(
                    st,
                    &mut fx,
                    "Paused",
                    "spec.paused: not started; the route is left as it is".into(),
                    0,
                    Default::default(),
                    false,
                );
            }
            return fx;
        }
        // The first step's weights.
        st.phase = RolloutPhase::Progressing;
        st.step = 0;
        to_step(st, &mut fx, &view, 0);
        let msg = format!(
            "moving {rule_name} from {} to {}: step 1 of {}, {} % to the candidate",
            spec.stable,
            spec.candidate,
            spec.steps.len(),
            percent(0)
        );
        decide(
            st,
            &mut fx,
            "Started",
            msg,
            percent(0),
            Default::default(),
            false,
        );
        set_condition(
            st,
            "Ready",
            true,
            "Progressing",
            "the rollout runs",
            generation,
        );
        set_condition(st, "Paused", false, "Running", "", generation);
        mem.baseline = None;
        return fx;
    }

    let want = as_map(&st.weights);
    let known = live(&view.weights) == live(&want)
        || (!st.previous_weights.is_empty()
            && live(&view.weights) == live(&as_map(&st.previous_weights)));
    if st
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == "Invalid")
    {
        // It can run again, where it was; a pause stays a pause.
        let paused = st.phase == RolloutPhase::Paused;
        if !paused {
            st.phase = RolloutPhase::Progressing;
        }
        set_condition(
            st,
            "Ready",
            true,
            if paused { "Paused" } else { "Progressing" },
            "the rollout can run",
            generation,
        );
        mem.baseline = None;
        if !paused && known {
            to_step(st, &mut fx, &view, st.step);
            decide(
                st,
                &mut fx,
                "Resumed",
                format!(
                    "the rollout can run again: step {}'s weights set again, its time and measurements start over",
                    st.step + 1
                ),
                percent(st.step),
                Default::default(),
                false,
            );
            return fx;
        }
        // Weights someone else set meanwhile: paused below.
    }

    // Weights someone else set pause the rollout.
    if !lagging && !known && !paused_by_change(st) {
        st.phase = RolloutPhase::Paused;
        st.current = None;
        // What it had written is no longer on its way: only a resume sets it again.
        st.previous_weights.clear();
        // Only a resume asked for after this pause resumes it.
        st.resumed = token.clone();
        let msg = format!(
            "{rule_name} weights changed to {} by someone else (the rollout set {}); run meshctl route resume to continue from step {}, or meshctl route abort",
            show(&view.weights),
            show(&want),
            st.step + 1
        );
        set_condition(st, "Paused", true, "ManualChange", &msg, generation);
        let found = share_of(&view.weights, &spec.candidate);
        decide(st, &mut fx, "Paused", msg, found, Default::default(), true);
        mem.baseline = None;
        return fx;
    }
    if paused_by_change(st) {
        if token.is_none() || token == st.resumed {
            return fx;
        }
        st.resumed = token;
        to_step(st, &mut fx, &view, st.step);
        st.phase = RolloutPhase::Progressing;
        set_condition(st, "Paused", false, "Resumed", "", generation);
        decide(
            st,
            &mut fx,
            "Resumed",
            format!("resumed at step {}: its weights set again", st.step + 1),
            percent(st.step),
            Default::default(),
            false,
        );
        mem.baseline = None;
        return fx;
    }
    if spec.paused {
        if st.phase != RolloutPhase::Paused {
            st.phase = RolloutPhase::Paused;
            st.current = None;
            set_condition(st, "Paused", true, "Paused", "spec.paused", generation);
            decide(
                st,
                &mut fx,
                "Paused",
                format!("spec.paused: held at step {}", st.step + 1),
                percent(st.step),
                Default::default(),
                false,
            );
        }
        mem.baseline = None;
        return fx;
    }
    if st.phase == RolloutPhase::Paused {
        st.phase = RolloutPhase::Progressing;
        set_condition(st, "Paused", false, "Resumed", "", generation);
        decide(
            st,
            &mut fx,
            "Resumed",
            format!(
                "resumed at step {}; its time and measurements start over",
                st.step + 1
            ),
            percent(st.step),
            Default::default(),
            false,
        );
    }
    if !measuring {
        set_condition(
            st,
            "Ready",
            false,
            "NotMeasured",
            "the controller does not scrape the proxies (--stats-interval 0), so no step can be judged",
            generation,
        );
        return fx;
    }
    if lagging {
        // Measured from when the route shows the step's weights.
        mem.baseline = None;
        // Not for a release that starts now: it never ran before the restart.
        mem.restarted = restarted && !start;
        return fx;
    }

    // Measuring the step.
    let tally =
        |svc: &str| stats.tally(&view.route, &format!("{}/{svc}", view.route_key.namespace));
    if mem.baseline.is_none() {
        if restarted {
            decide(
                st,
                &mut fx,
                "Resumed after restart",
                format!(
                    "the controller restarted: step {} is measured again from now",
                    st.step + 1
                ),
                percent(st.step),
                Default::default(),
                false,
            );
        }
        st.step_started_at = Some(now_rfc3339());
        mem.baseline = Some(Baseline {
            started: now,
            candidate: tally(&spec.candidate),
            stable: tally(&spec.stable),
        });
    }
    let Some(baseline) = mem.baseline.as_ref() else {
        return fx;
    };
    let c = tally(&spec.candidate).since(&baseline.candidate);
    let s = tally(&spec.stable).since(&baseline.stable);
    let elapsed = now.duration_since(baseline.started);
    let m = (measured(&c), measured(&s));
    let min = spec.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS);
    let interval = step_interval(spec, st.step as usize);
    let enough = c.requests >= f64::from(min);
    let waiting = if enough {
        format!(
            "{:.0} s of {:.0} s",
            elapsed.as_secs_f64(),
            interval.as_secs_f64()
        )
    } else {
        format!("{} of {min} candidate requests", m.0.requests)
    };
    st.current = Some(Decision {
        at: now_rfc3339(),
        step: st.step,
        action: "Measuring".into(),
        reason: waiting,
        weight: percent(st.step),
        candidate: m.0.clone(),
        stable: m.1.clone(),
    });
    if !enough {
        return fx;
    }
    // The end: all on one side, the header rule gone, the decision and the conditions.
    let end = |st: &mut RolloutStatus,
               fx: &mut Effects,
               percent: u32,
               phase: RolloutPhase,
               msg: String,
               m: (Measured, Measured),
               warning: bool| {
        let w = split_weights(spec, &view, percent);
        set_weights(st, fx, &view, w, Vec::new());
        st.phase = phase;
        st.current = None;
        let action = format!("{phase:?}");
        decide(st, fx, &action, msg.clone(), percent, m, warning);
        set_condition(st, "Ready", true, &action, &msg, generation);
        set_condition(st, "Paused", false, "Done", "", generation);
    };
    if let Some(why) = gate_failure(&spec.gates, &c, &s, min) {
        let msg = format!(
            "step {}: {why}; all traffic back on {}",
            st.step + 1,
            spec.stable
        );
        end(st, &mut fx, 0, RolloutPhase::RolledBack, msg, m, true);
        return fx;
    }
    if elapsed < interval {
        return fx;
    }
    let last = st.step as usize + 1 >= spec.steps.len();
    if last {
        let msg = format!(
            "step {} passed: all traffic on {}",
            st.step + 1,
            spec.candidate
        );
        end(st, &mut fx, 100, RolloutPhase::Promoted, msg, m, false);
        return fx;
    }
    let passed = st.step;
    let next = passed + 1;
    to_step(st, &mut fx, &view, next);
    let msg = format!(
        "step {} passed; step {} of {}: {} % to the candidate",
        passed + 1,
        next + 1,
        spec.steps.len(),
        percent(next)
    );
    // The decision is about the step that passed.
    decide(st, &mut fx, "Advanced", msg, percent(next), m, false);
    st.step = next;
    st.current = None;
    mem.baseline = None;
    fx
}

fn paused_by_change(st: &RolloutStatus) -> bool {
    st.phase == RolloutPhase::Paused
        && st
            .conditions
            .iter()
            .any(|c| c.type_ == "Paused" && c.status == "True" && c.reason == "ManualChange")
}

#[cfg(test)]
mod tests;
