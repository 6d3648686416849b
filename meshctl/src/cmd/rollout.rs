//! `meshctl route rollout|status|pause|resume|abort`: a Rollout of a Service's traffic to a
//! candidate, which the controller drives step by step and judges by the mesh's own
//! measurements (`docs/reference/crds.md#rollout`). meshctl writes the Rollout (and the route it
//! moves, when the Service has none yet) and reads back the status the controller keeps.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_api::rollout::{
    Decision, Rollout, RolloutGates, RolloutPhase, RolloutSpec, RolloutStatus, RolloutStep,
    StepHeader,
};
use mesh_api::route_doc::{self as doc, rules, weights};
use serde_norway::{Mapping, Value};

use super::route::{Target, find_backend, find_service, port_of, several_routes};
use super::status::Output;
use crate::mesh::{Mesh, RolloutDoc, RouteDoc};

#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    pub target: Target,
    /// The candidate backend (a Service in the same namespace) the traffic moves to.
    #[arg(long)]
    pub to: String,
    /// The stable backend; by default the one backend that has the traffic now.
    #[arg(long)]
    pub from: Option<String>,
    /// The candidate's percent at each step; the last is usually 100.
    #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
    pub steps: Vec<u32>,
    /// Requests with this header (`name=value`) go to the candidate in a first step of their
    /// own, before the weights.
    #[arg(long)]
    pub header: Option<String>,
    /// How long each step runs before it is judged.
    #[arg(long, default_value = "30s")]
    pub interval: String,
    /// Candidate requests a step needs before it is judged.
    #[arg(long, default_value_t = mesh_controller::rollout::DEFAULT_MIN_REQUESTS)]
    pub min_requests: u32,
    /// The candidate's success rate (percent) must stay at least this.
    #[arg(long, value_parser = mesh_api::parse_percent)]
    pub success_rate: Option<f64>,
    /// The candidate's p99 latency must stay at most this (e.g. `300ms`).
    #[arg(long)]
    pub p99: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Keep showing it as it changes, until the rollout ends.
    #[arg(short = 'w', long)]
    pub watch: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The Rollout of a Service: the one named after it, or the one whose route attaches to it.
fn find_rollout(mesh: &dyn Mesh, target: &Target) -> anyhow::Result<RolloutDoc> {
    let ns = target.ns();
    let (mut found, others): (Vec<RolloutDoc>, Vec<RolloutDoc>) = mesh
        .rollouts()?
        .into_iter()
        .filter(|r| r.doc.namespace == *ns)
        .partition(|r| r.doc.name == target.service);
    // Rollouts named otherwise concern the Service when their route attaches to it; routes and
    // Services are read only when there are such rollouts (`status --watch` asks every second).
    if !others.is_empty() {
        let routes = mesh.routes()?;
        // The Service's port, when it can be known; else a route at any port of it counts.
        let ports: Vec<u16> = match target.port {
            Some(p) => vec![p],
            None => mesh
                .services()?
                .iter()
                .find(|s| s.namespace == *ns && s.name == target.service)
                .map(|svc| svc.ports.iter().map(|(p, _)| *p).collect())
                .unwrap_or_default(),
        };
        found.extend(others.into_iter().filter(|r| {
            r.spec().is_ok_and(|spec| {
                routes.iter().any(|route| {
                    route.namespace == *ns
                        && route.name == spec.target_ref.name
                        && ports.iter().any(|p| {
                            doc::attaches(&route.value, &route.namespace, ns, &target.service, *p)
                        })
                })
            })
        }));
    }
    match found.len() {
        0 => bail!(
            "no Rollout of Service {ns}/{}; start one with `meshctl route rollout {} -n {ns} --to \
             <candidate>`",
            target.service,
            target.service
        ),
        1 => Ok(found.remove(0)),
        _ => bail!(
            "{} Rollouts concern Service {ns}/{} ({}); name one: meshctl route status <rollout name>",
            found.len(),
            target.service,
            found
                .iter()
                .map(|r| r.doc.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

/// Creates (or starts over) the Rollout of `target` to `args.to`, writing the route first
/// when the Service has none. Checks everything before writing anything.
pub fn create(mesh: &dyn Mesh, args: &RolloutArgs) -> anyhow::Result<String> {
    let target = &args.target;
    let ns = target.ns();
    let services = mesh.services()?;
    let parent = find_service(&services, ns, &target.service)?;
    let port = port_of(parent, target.port)?;
    let has_port = |name: &str, flag: &str| -> anyhow::Result<()> {
        let svc = find_backend(&services, ns, name).map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        if !svc.ports.iter().any(|(p, _)| *p == port) {
            bail!(
                "{flag}: Service {ns}/{name} has no port {port} (the port of {}); add port {port} \
                 to Service {ns}/{name}",
                target.service
            );
        }
        Ok(())
    };
    has_port(&args.to, "--to")?;
    if args.steps.is_empty() {
        bail!("--steps: no steps");
    }
    if let Some(bad) = args.steps.iter().find(|w| **w > 100) {
        bail!("--steps: {bad} is over 100 (a percentage)");
    }
    mesh_api::duration::parse(&args.interval).map_err(|e| anyhow::anyhow!("--interval: {e}"))?;
    if let Some(p) = &args.p99 {
        mesh_api::duration::parse(p).map_err(|e| anyhow::anyhow!("--p99: {e}"))?;
    }
    let header = match &args.header {
        None => None,
        Some(h) => match h.split_once('=') {
            Some((n, v)) if !n.trim().is_empty() => Some((n.trim(), v.trim())),
            _ => bail!("--header {h:?}: expected <name>=<value>, e.g. x-canary=yes"),
        },
    };
    let name = target.service.clone();
    let own = mesh_controller::rollout::own_rule(&name);

    let rollouts = mesh.rollouts()?;
    let existing = rollouts
        .iter()
        .find(|r| r.doc.namespace == *ns && r.doc.name == name)
        .cloned();
    if let Some(r) = &existing
        && let Some(st) = &r.status
        && matches!(st.phase, RolloutPhase::Progressing | RolloutPhase::Paused)
    {
        bail!(
            "Rollout {ns}/{name} is {:?} at step {} (to {}); end it first with meshctl route abort {}",
            st.phase,
            st.step + 1,
            st.candidate,
            target.service
        );
    }

    let attached: Vec<RouteDoc> = mesh
        .routes()?
        .into_iter()
        .filter(|r| doc::attaches(&r.value, &r.namespace, ns, &target.service, port))
        .collect();
    // The route to write first (when the Service has none), its name, and the stable backend.
    let (route, route_name, stable) = match attached.as_slice() {
        [] => {
            let Some(from) = &args.from else {
                bail!(
                    "Service {ns}/{} has no HTTPRoute, so its traffic goes to the Service itself; say which backend is stable with --from",
                    target.service
                );
            };
            has_port(from, "--from")?;
            let mut route = RouteDoc {
                namespace: ns.to_owned(),
                name: format!("{}-split", target.service),
                value: doc::new_split_route(ns, &target.service, port),
                origin: None,
            };
            doc::set_backends(&mut route.value, 0, &[(from.clone(), 100)], port);
            let route_name = route.name.clone();
            (Some(route), route_name, from.clone())
        }
        [one] => {
            let Some(rule) = doc::split_rule_besides(&one.value, Some(&own)) else {
                bail!(
                    "HTTPRoute {ns}/{}: every rule has matches, so none carries all of the Service's traffic; write the Rollout by hand with spec.targetRef.sectionName",
                    one.name
                );
            };
            let ws = weights(&rules(&one.value)[rule]);
            let stable = match &args.from {
                Some(from) => {
                    has_port(from, "--from")?;
                    from.clone()
                }
                None => {
                    let live: Vec<&(String, u32)> = ws.iter().filter(|(_, w)| *w > 0).collect();
                    match live.as_slice() {
                        [(only, _)] => only.clone(),
                        _ => bail!(
                            "HTTPRoute {ns}/{} rule {} sends to {}; say which backend is stable with --from",
                            one.name,
                            rule + 1,
                            ws.iter()
                                .map(|(n, w)| format!("{n}={w}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                }
            };
            if let Some((other, w)) = ws
                .iter()
                .find(|(n, w)| *n != stable && *n != args.to && *w > 0)
            {
                bail!(
                    "HTTPRoute {ns}/{} rule {} also sends to {other} (weight {w}); a rollout moves traffic between two backends: meshctl route promote {} {stable} first",
                    one.name,
                    rule + 1,
                    target.service
                );
            }
            // The route stays as it is; the controller moves its weights.
            (None, one.name.clone(), stable)
        }
        many => {
            return Err(several_routes(
                many,
                ns,
                &target.service,
                port,
                "write the Rollout by hand, naming one",
            ));
        }
    };
    if stable == args.to {
        bail!("--to {}: that is the stable backend", args.to);
    }
    // Another rollout still moving the same route would take turns with this one.
    let running = |r: &&RolloutDoc| r.status.as_ref().is_none_or(|s| !s.phase.is_done());
    if let Some(other) = rollouts.iter().filter(running).find(|r| {
        r.doc.namespace == *ns
            && r.doc.name != name
            && r.spec()
                .is_ok_and(|s| s.target_ref.kind == "HTTPRoute" && s.target_ref.name == route_name)
    }) {
        bail!(
            "Rollout {ns}/{} moves HTTPRoute {ns}/{route_name} too and has not ended; abort it first (meshctl route abort {})",
            other.doc.name,
            other.doc.name
        );
    }
    let mut steps: Vec<RolloutStep> = header
        .map(|(name, value)| RolloutStep {
            weight: 0,
            headers: vec![StepHeader {
                name: name.into(),
                value: value.into(),
            }],
            interval: None,
        })
        .into_iter()
        .collect();
    steps.extend(args.steps.iter().map(|w| RolloutStep {
        weight: *w,
        ..Default::default()
    }));
    let typed = RolloutSpec {
        target_ref: mesh_api::crds::PolicyTargetReference {
            group: "gateway.networking.k8s.io".into(),
            kind: "HTTPRoute".into(),
            name: route_name.clone(),
            section_name: None,
        },
        stable: stable.clone(),
        candidate: args.to.clone(),
        steps,
        interval: Some(args.interval.clone()),
        min_requests: Some(args.min_requests),
        gates: RolloutGates {
            min_success_rate: args.success_rate,
            max_p99: args.p99.clone(),
            relative_to_stable: None,
        },
        paused: false,
        abort: false,
    };
    // Checked as the controller will check it, before anything is written.
    mesh_controller::rollout::check_spec(&typed).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut object = Rollout::new(&name, typed.clone());
    object.metadata.namespace = Some(ns.to_owned());
    object.metadata.annotations = Some(
        [(
            mesh_api::consts::labels::RELEASE.to_string(),
            k8s_openapi::jiff::Timestamp::now().to_string(),
        )]
        .into(),
    );
    let rollout = RouteDoc {
        namespace: ns.to_owned(),
        name: name.clone(),
        value: serde_norway::to_value(&object)?,
        origin: existing.and_then(|r| r.doc.origin),
    };

    let mut out = String::new();
    if let Some(r) = &route {
        out += &format!("route: {}\n", mesh.save_route(r)?);
    }
    out += &format!("rollout: {}\n", mesh.save_rollout(&rollout)?);
    out += &format!(
        "Rollout {ns}/{name}: {stable} -> {} in {} steps ({}), {} each, judged on at least {} requests; gates: {}\n",
        args.to,
        typed.steps.len(),
        describe_steps(&typed),
        args.interval,
        args.min_requests,
        describe_gates(&typed)
    );
    out += &format!(
        "follow it with: meshctl route status {} -n {ns} --watch\n",
        target.service
    );
    Ok(out)
}

fn describe_steps(spec: &RolloutSpec) -> String {
    spec.steps
        .iter()
        .map(|s| {
            if s.headers.is_empty() {
                format!("{} %", s.weight)
            } else {
                let h: Vec<String> = s
                    .headers
                    .iter()
                    .map(|h| format!("{}: {}", h.name, h.value))
                    .collect();
                format!("{} % + {}", s.weight, h.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_gates(spec: &RolloutSpec) -> String {
    let g = &spec.gates;
    let mut out = Vec::new();
    if let Some(p) = g.min_success_rate {
        out.push(format!("success rate >= {p} %"));
    }
    if let Some(p) = &g.max_p99 {
        out.push(format!("p99 <= {p}"));
    }
    if let Some(r) = &g.relative_to_stable {
        if let Some(d) = r.max_success_rate_drop {
            out.push(format!("success rate at most {d} points below stable"));
        }
        if let Some(x) = r.max_p99_ratio {
            out.push(format!("p99 at most {x} x stable"));
        }
    }
    if out.is_empty() {
        "none (every step passes on time and requests)".into()
    } else {
        out.join(", ")
    }
}

/// Sets `spec.<field>` of the Service's Rollout (pause, abort) or its resume annotation.
pub fn control(mesh: &dyn Mesh, target: &Target, action: Action) -> anyhow::Result<String> {
    let mut r = find_rollout(mesh, target)?;
    let (ns, name) = (r.doc.namespace.clone(), r.doc.name.clone());
    let phase = r.status.as_ref().map(|s| s.phase);
    if phase.is_some_and(RolloutPhase::is_done) {
        bail!(
            "Rollout {ns}/{name} has ended ({:?}); nothing to {}",
            phase.unwrap_or_default(),
            action.verb()
        );
    }
    let spec = r
        .doc
        .value
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .with_context(|| format!("Rollout {ns}/{name}: spec is not a mapping"))?;
    match action {
        Action::Pause => {
            spec.insert(key("paused"), Value::Bool(true));
        }
        Action::Abort => {
            spec.insert(key("abort"), Value::Bool(true));
        }
        Action::Resume => {
            spec.remove("paused");
            let meta = r
                .doc
                .value
                .get_mut("metadata")
                .and_then(Value::as_mapping_mut)
                .with_context(|| format!("Rollout {ns}/{name}: metadata is not a mapping"))?;
            let annotations = meta
                .entry(key("annotations"))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if let Some(a) = annotations.as_mapping_mut() {
                a.insert(
                    key(mesh_api::consts::labels::RESUME),
                    key(&k8s_openapi::jiff::Timestamp::now().to_string()),
                );
            }
        }
    }
    let written = mesh.save_rollout(&r.doc)?;
    Ok(format!(
        "Rollout {ns}/{name}: {} ({written})\n",
        action.done()
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Abort => "abort",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Action::Pause => "pause asked (spec.paused); the weights stay where they are",
            Action::Resume => "resume asked; the step's time and measurements start over",
            Action::Abort => {
                "abort asked (spec.abort); all traffic goes back to the stable backend"
            }
        }
    }
}

fn bar(done: usize, total: usize) -> String {
    const WIDTH: usize = 24;
    let filled = (done * WIDTH).checked_div(total).unwrap_or(0).min(WIDTH);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled))
}

fn show_measured(m: &mesh_api::rollout::Measured) -> String {
    let rate = m
        .success_rate
        .map_or_else(|| "-".into(), |r| format!("{r:.2} %"));
    let p99 = m
        .p99_ms
        .map_or_else(|| "-".into(), |p| format!("{p:.1} ms"));
    format!(
        "{:>8} requests  success {rate:>8}  p99 {p99:>9}",
        m.requests
    )
}

fn decision_line(d: &Decision, out: &mut String) {
    let when = d.at.get(11..19).unwrap_or(&d.at);
    out.push_str(&format!(
        "  {when}  step {:<2} {:<22} {}\n",
        d.step + 1,
        d.action,
        d.reason
    ));
    if d.candidate.requests > 0 || d.stable.requests > 0 {
        out.push_str(&format!(
            "                    candidate {}\n                    stable    {}\n",
            show_measured(&d.candidate),
            show_measured(&d.stable)
        ));
    }
}

/// The rollout as a person reads it: where it is, what is measured, what was decided.
pub fn render(r: &RolloutDoc) -> anyhow::Result<String> {
    let spec = r.spec()?;
    let (ns, name) = (&r.doc.namespace, &r.doc.name);
    let mut out = format!(
        "Rollout {ns}/{name}: {} -> {} ({} {}, steps {})\n",
        spec.stable,
        spec.candidate,
        spec.target_ref.kind,
        spec.target_ref.name,
        describe_steps(&spec)
    );
    out += &format!("  gates: {}\n", describe_gates(&spec));
    let Some(st) = &r.status else {
        out += "  not started: the controller has not written a status yet\n";
        return Ok(out);
    };
    let total = spec.steps.len();
    let passed = match st.phase {
        RolloutPhase::Promoted => total,
        _ => st.step as usize,
    };
    out += &format!(
        "  {:?}  step {} of {}  {} {} of {} steps passed\n",
        st.phase,
        (st.step as usize + 1).min(total),
        total,
        bar(passed, total),
        passed,
        total
    );
    if !st.weights.is_empty() {
        let w: Vec<String> = st
            .weights
            .iter()
            .map(|b| format!("{}={}", b.name, b.weight))
            .collect();
        out += &format!("  weights: {}\n", w.join(", "));
    }
    for c in st.conditions.iter().filter(|c| {
        (c.type_ == "Paused" && c.status == "True") || (c.type_ == "Ready" && c.status == "False")
    }) {
        out += &format!("  {} ({}): {}\n", c.type_, c.reason, c.message);
    }
    if let Some(cur) = &st.current {
        out += &format!("  measuring step {}: {}\n", cur.step + 1, cur.reason);
        out += &format!("    candidate {}\n", show_measured(&cur.candidate));
        out += &format!("    stable    {}\n", show_measured(&cur.stable));
    }
    if !st.decisions.is_empty() {
        out += "  decisions:\n";
        for d in &st.decisions {
            decision_line(d, &mut out);
        }
    }
    Ok(out)
}

fn machine(r: &RolloutDoc, output: Output) -> anyhow::Result<String> {
    let v = serde_json::json!({
        "namespace": r.doc.namespace,
        "name": r.doc.name,
        "spec": serde_json::to_value(r.spec()?)?,
        "status": r.status.clone().map(serde_json::to_value).transpose()?,
    });
    Ok(match output {
        Output::Yaml => serde_norway::to_string(&v)?,
        _ => format!("{}\n", serde_json::to_string_pretty(&v)?),
    })
}

/// `meshctl route status`: once, or with `--watch` every change until the rollout ends.
pub fn status(
    mesh: &dyn Mesh,
    args: &StatusArgs,
    out: &mut dyn Write,
    poll: Duration,
) -> anyhow::Result<()> {
    let mut last: Option<(Option<RolloutStatus>, String)> = None;
    loop {
        let r = find_rollout(mesh, &args.target)?;
        let text = match args.output {
            Output::Table => render(&r)?,
            o => machine(&r, o)?,
        };
        let changed = last
            .as_ref()
            .is_none_or(|(s, t)| *s != r.status || *t != text);
        if changed {
            if args.watch && last.is_some() && args.output == Output::Table {
                writeln!(out, "---")?;
            }
            write!(out, "{text}")?;
            out.flush()?;
        }
        let done = r.status.as_ref().is_some_and(|s| s.phase.is_done());
        if !args.watch || done {
            return Ok(());
        }
        last = Some((r.status, text));
        std::thread::sleep(poll);
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
