//! `meshctl route split|show|promote`: traffic shares between the backends of a Service, kept in
//! one HTTPRoute attached to it (a GAMMA `parentRef` to the Service). Everything is checked
//! before anything is written: a refused command leaves the mesh as it was.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_api::route_doc::{self as doc, MAX_WEIGHT, rules, split_rule, weights};

use super::rollout::{self, Action};
pub use super::route_wait::{Acked, WaitArgs};
use crate::mesh::{Mesh, RouteDoc, ServiceRef};
use crate::output::{Output, Table};

#[derive(Debug, clap::Subcommand)]
pub enum Route {
    /// Split a Service's traffic between backends by weight (a canary).
    Split(SplitArgs),
    /// Show the routes of a Service and their weights.
    Show(ShowArgs),
    /// Send all of a Service's traffic to one backend (the blue-green switch).
    Promote(PromoteArgs),
    /// Move a Service's traffic to a candidate step by step, judged by the mesh's own
    /// measurements: the controller advances, pauses or rolls back (a Rollout).
    Rollout(super::rollout::RolloutArgs),
    /// Show a Service's rollout: its step, what is measured, what was decided.
    Status(super::rollout::StatusArgs),
    /// Hold a rollout at its step.
    Pause(Target),
    /// Resume a paused rollout (also one paused by a manual change of the weights).
    Resume(Target),
    /// End a rollout: all traffic back on the stable backend.
    Abort(Target),
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The Service whose traffic is split (the route's parent).
    pub service: String,
    /// The Service's namespace (default: the kubeconfig context's; `default` for a local mesh).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The Service port (needed when it has more than one).
    #[arg(long)]
    pub port: Option<u16>,
}

impl Target {
    /// The Service's namespace: `-n`, or `default` when nothing resolved it
    /// ([`Route::in_namespace`] gives the command line's the context's).
    pub fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

impl Route {
    /// The command with its Service's namespace filled in where `-n` was not given.
    pub fn in_namespace(mut self, default: &str) -> Self {
        let target = match &mut self {
            Route::Split(a) => &mut a.target,
            Route::Show(a) => &mut a.target,
            Route::Promote(a) => &mut a.target,
            Route::Rollout(a) => &mut a.target,
            Route::Status(a) => &mut a.target,
            Route::Pause(t) | Route::Resume(t) | Route::Abort(t) => t,
        };
        target.namespace.get_or_insert_with(|| default.to_owned());
        self
    }
}

#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    #[command(flatten)]
    pub target: Target,
    /// `<backend>=<weight>,...`: backends are Services in the same namespace, weights whole
    /// numbers from 0 to 1,000,000 (shares are weight / sum).
    #[arg(long, required = true, value_delimiter = ',')]
    pub to: Vec<String>,
    /// Check everything and show the change to the route as a diff; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub target: Target,
    /// The backend that gets all the traffic.
    pub backend: String,
    /// Check everything and show the change to the route as a diff; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `<name>=<weight>` pairs, checked.
pub fn parse_weights(items: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let Some((name, w)) = item.split_once('=') else {
            bail!("--to {item:?}: expected <backend>=<weight>, e.g. reviews-v2=10");
        };
        let name = name.trim();
        if name.is_empty() {
            bail!("--to {item:?}: the backend name is empty");
        }
        let weight: u32 = match w.trim().parse::<i64>() {
            Ok(n) if n < 0 => bail!("--to {item:?}: weight {n} is negative"),
            Ok(n) if n > i64::from(MAX_WEIGHT) => {
                bail!("--to {item:?}: weight {n} is over {MAX_WEIGHT}")
            }
            Ok(n) => u32::try_from(n).context("weight")?,
            Err(_) => bail!(
                "--to {item:?}: weight {:?} is not a whole number from 0 to {MAX_WEIGHT}",
                w.trim()
            ),
        };
        if out.iter().any(|(n, _)| n == name) {
            bail!("--to: backend {name:?} is listed twice");
        }
        out.push((name.to_string(), weight));
    }
    if out.is_empty() {
        bail!("--to: no backends given");
    }
    if out.iter().all(|(_, w)| *w == 0) {
        bail!("--to: every weight is 0; at least one backend must get traffic");
    }
    Ok(out)
}

/// The Service a command is about (its target): `-n` says where to look.
pub(crate) fn find_service<'a>(
    services: &'a [ServiceRef],
    ns: &str,
    name: &str,
) -> anyhow::Result<&'a ServiceRef> {
    find_in(services, ns, name).with_context(|| {
        format!("Service {ns}/{name} not found; pass -n NAMESPACE if it is in another namespace")
    })
}

/// A backend of the target, which must be in the target's namespace.
pub(crate) fn find_backend<'a>(
    services: &'a [ServiceRef],
    ns: &str,
    name: &str,
) -> anyhow::Result<&'a ServiceRef> {
    find_in(services, ns, name).with_context(|| {
        format!(
            "Service {ns}/{name} not found; backends are Services in the namespace of the \
             Service they split"
        )
    })
}

fn find_in<'a>(services: &'a [ServiceRef], ns: &str, name: &str) -> Option<&'a ServiceRef> {
    services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
}

/// The Service port a command is about.
pub(crate) fn port_of(svc: &ServiceRef, asked: Option<u16>) -> anyhow::Result<u16> {
    let list = || {
        svc.ports
            .iter()
            .map(|(p, n)| {
                if n.is_empty() {
                    p.to_string()
                } else {
                    format!("{p} ({n})")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (asked, svc.ports.as_slice()) {
        (Some(p), ports) if ports.iter().any(|(q, _)| *q == p) => Ok(p),
        (Some(p), _) => bail!(
            "Service {}/{} has no port {p} (ports: {}); pass --port with one of them",
            svc.namespace,
            svc.name,
            list()
        ),
        (None, [(p, _)]) => Ok(*p),
        (None, []) => bail!("Service {}/{} has no ports", svc.namespace, svc.name),
        (None, _) => bail!(
            "Service {}/{} has several ports ({}): say which with --port",
            svc.namespace,
            svc.name,
            list()
        ),
    }
}

fn percent(w: u32, all: &[(String, u32)]) -> String {
    format!("{:.0} %", share(w, all))
}

/// `w`'s share of the weights `all`, in percent (0 when they are all 0).
fn share(w: u32, all: &[(String, u32)]) -> f64 {
    let total: u64 = all.iter().map(|(_, w)| u64::from(*w)).sum();
    if total == 0 {
        return 0.0;
    }
    u64::from(w) as f64 * 100.0 / total as f64
}

/// What a split or promote did: the weights before and after, and where it was written.
#[derive(Debug)]
pub struct Change {
    /// The Service whose traffic it splits, and its port.
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// `namespace/name` of the HTTPRoute, and the rule changed (0-based).
    pub route: String,
    pub rule: usize,
    pub before: Vec<(String, u32)>,
    pub after: Vec<(String, u32)>,
    /// Where the route was written; `None` for a dry run.
    pub written: Option<String>,
    /// The route's manifest before (empty for a new route) and after, as a unified diff.
    pub diff: String,
}

/// Sets the weights of Service `target`'s traffic, checking everything first.
pub fn split(mesh: &dyn Mesh, target: &Target, to: &[(String, u32)]) -> anyhow::Result<Change> {
    change(mesh, target, to, true)
}

/// The change [`split`] makes, checked; written only when `write`.
pub fn change(
    mesh: &dyn Mesh,
    target: &Target,
    to: &[(String, u32)],
    write: bool,
) -> anyhow::Result<Change> {
    let services = mesh.services()?;
    let ns = target.ns();
    let parent = find_service(&services, ns, &target.service)?;
    let port = port_of(parent, target.port)?;
    for (b, _) in to {
        let svc =
            find_backend(&services, ns, b).map_err(|e| anyhow::anyhow!("backend {b:?}: {e}"))?;
        if !svc.ports.iter().any(|(p, _)| *p == port) {
            bail!(
                "backend {b:?}: Service {ns}/{b} has no port {port} (the port of {}); add port \
                 {port} to Service {ns}/{b}",
                target.service
            );
        }
    }
    let attached: Vec<RouteDoc> = mesh
        .routes()?
        .into_iter()
        .filter(|r| attaches(r, ns, &target.service, port))
        .collect();
    let mut route = match attached.as_slice() {
        [] => RouteDoc {
            namespace: ns.to_string(),
            name: format!("{}-split", target.service),
            value: doc::new_split_route(ns, &target.service, port),
            origin: None,
        },
        [one] => one.clone(),
        many => {
            return Err(several_routes(
                many,
                ns,
                &target.service,
                port,
                "edit the one to change by hand",
            ));
        }
    };
    let Some(rule) = split_rule(&route.value) else {
        bail!(
            "HTTPRoute {ns}/{}: every rule has matches, so none carries all of the Service's traffic; add a rule without matches, or edit it by hand",
            route.name
        );
    };
    let before = weights(&rules(&route.value)[rule]);
    let old_text = if attached.is_empty() {
        String::new()
    } else {
        serde_norway::to_string(&route.value)?
    };
    if !doc::set_backends(&mut route.value, rule, to, port) {
        bail!(
            "HTTPRoute {ns}/{}: rule {} is not a mapping",
            route.name,
            rule + 1
        );
    }
    let new_text = serde_norway::to_string(&route.value)?;
    let name = format!("HTTPRoute {ns}/{}", route.name);
    let diff = similar::TextDiff::from_lines(&old_text, &new_text)
        .unified_diff()
        .header(&name, &name)
        .to_string();
    let written = if write {
        Some(mesh.save_route(&route)?)
    } else {
        None
    };
    Ok(Change {
        namespace: ns.to_owned(),
        service: target.service.clone(),
        port,
        route: format!("{ns}/{}", route.name),
        rule,
        before,
        after: to.to_vec(),
        written,
        diff,
    })
}

impl Change {
    /// The change as data (`-o json|yaml`): each backend's weight and share before and after
    /// (`null` where it was not, or is no longer, a backend of the rule).
    pub fn data(&self) -> serde_json::Value {
        let backends: Vec<serde_json::Value> = self
            .names()
            .into_iter()
            .map(|n| {
                let of = |ws: &[(String, u32)]| {
                    ws.iter().find(|(m, _)| m == n).map(|(_, w)| {
                        serde_json::json!({"weight": w, "share": share(*w, ws)})
                    })
                };
                serde_json::json!({"backend": n, "before": of(&self.before), "after": of(&self.after)})
            })
            .collect();
        serde_json::json!({
            "route": self.route,
            "rule": self.rule + 1,
            "backends": backends,
            "written": self.written,
            "diff": self.diff,
        })
    }

    /// The backends before, then those only after.
    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.before.iter().map(|(n, _)| n.as_str()).collect();
        for (n, _) in &self.after {
            if !names.contains(&n.as_str()) {
                names.push(n);
            }
        }
        names
    }
}

pub fn print_change(c: &Change, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "HTTPRoute {} rule {}", c.route, c.rule + 1)?;
    let mut t = Table::new(["BACKEND", "BEFORE", "AFTER"])
        .right(&[1, 2])
        .indent("  ");
    for n in c.names() {
        let share = |ws: &[(String, u32)]| {
            ws.iter()
                .find(|(m, _)| m == n)
                .map_or_else(|| "-".to_string(), |(_, w)| percent(*w, ws))
        };
        t.row([n.to_owned(), share(&c.before), share(&c.after)]);
    }
    t.write(out)?;
    match &c.written {
        Some(w) => writeln!(out, "written to {w}")?,
        None => write!(
            out,
            "dry run: nothing written; the route would change so:\n{}",
            c.diff
        )?,
    }
    Ok(())
}

/// The routes of a Service, one line per rule.
pub fn show(mesh: &dyn Mesh, target: &Target, out: &mut dyn Write) -> anyhow::Result<()> {
    write_show(&show_data(mesh, target)?, out)
}

/// The routes of a Service and each rule's backends with their weights and shares.
pub fn show_data(mesh: &dyn Mesh, target: &Target) -> anyhow::Result<serde_json::Value> {
    let services = mesh.services()?;
    let ns = target.ns();
    let parent = find_service(&services, ns, &target.service)?;
    let port = port_of(parent, target.port)?;
    let mut out = Vec::new();
    for r in mesh
        .routes()?
        .into_iter()
        .filter(|r| attaches(r, ns, &target.service, port))
    {
        for (i, rule) in rules(&r.value).iter().enumerate() {
            let ws = weights(rule);
            let backends: Vec<serde_json::Value> = ws
                .iter()
                .map(|(n, w)| serde_json::json!({"backend": n, "weight": w, "share": share(*w, &ws)}))
                .collect();
            out.push(serde_json::json!({
                "route": format!("{}/{}", r.namespace, r.name),
                "rule": i + 1,
                "allRequests": doc::matches_all(rule),
                "backends": backends,
            }));
        }
    }
    Ok(
        serde_json::json!({"service": format!("{ns}/{}", target.service), "port": port, "rules": out}),
    )
}

fn write_show(v: &serde_json::Value, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(
        out,
        "Service {} port {}",
        v["service"].as_str().unwrap_or_default(),
        v["port"]
    )?;
    let rules = v["rules"].as_array().map_or(&[][..], Vec::as_slice);
    if rules.is_empty() {
        writeln!(
            out,
            "  no HTTPRoute: all traffic goes to the Service itself"
        )?;
    }
    for rule in rules {
        let shares: Vec<String> = rule["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                format!(
                    "{} {:.0} %",
                    b["backend"].as_str().unwrap_or_default(),
                    b["share"].as_f64().unwrap_or_default()
                )
            })
            .collect();
        let matched = if rule["allRequests"] == false {
            " (some requests, by match)"
        } else {
            ""
        };
        writeln!(
            out,
            "  HTTPRoute {} rule {}{matched}: {}",
            rule["route"].as_str().unwrap_or_default(),
            rule["rule"],
            shares.join(", ")
        )?;
    }
    Ok(())
}

pub fn run(route: Route, mesh: &dyn Mesh, out: &mut dyn Write) -> anyhow::Result<()> {
    match route {
        Route::Split(a) => {
            let to = parse_weights(&a.to)?;
            write_and_report(mesh, &a.target, &to, a.dry_run, &a.wait, a.output, out)
        }
        Route::Show(a) => {
            crate::output::print(a.output, &show_data(mesh, &a.target)?, out, write_show)
        }
        Route::Rollout(a) => Ok(write!(out, "{}", rollout::create(mesh, &a)?)?),
        Route::Status(a) => rollout::status(mesh, &a, out, Duration::from_secs(1)),
        Route::Pause(t) => Ok(write!(
            out,
            "{}",
            rollout::control(mesh, &t, Action::Pause)?
        )?),
        Route::Resume(t) => Ok(write!(
            out,
            "{}",
            rollout::control(mesh, &t, Action::Resume)?
        )?),
        Route::Abort(t) => Ok(write!(
            out,
            "{}",
            rollout::control(mesh, &t, Action::Abort)?
        )?),
        Route::Promote(a) => {
            // The other backends stay listed at 0, so a rollback is one more command.
            let services = mesh.services()?;
            let parent = find_service(&services, a.target.ns(), &a.target.service)?;
            let port = port_of(parent, a.target.port)?;
            let mut to = vec![(a.backend.clone(), 1)];
            for r in mesh
                .routes()?
                .iter()
                .filter(|r| attaches(r, a.target.ns(), &a.target.service, port))
            {
                if let Some(i) = split_rule(&r.value) {
                    for (n, _) in weights(&rules(&r.value)[i]) {
                        if n != a.backend && !to.iter().any(|(m, _)| *m == n) {
                            to.push((n, 0));
                        }
                    }
                }
            }
            write_and_report(mesh, &a.target, &to, a.dry_run, &a.wait, a.output, out)
        }
    }
}

/// Split and promote after their checks: the change made (unless a dry run) and reported; with
/// `--wait` the controllers are read before anything is written.
fn write_and_report(
    mesh: &dyn Mesh,
    target: &Target,
    to: &[(String, u32)],
    dry_run: bool,
    w: &WaitArgs,
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let ctls = controllers(mesh, w)?;
    let c = change(mesh, target, to, !dry_run)?;
    report(&ctls, &c, w, output, out)
}

/// Prints change `c`; with `--wait`, also waits until it is served: after the table (which shows
/// what is waited for), or before JSON and YAML, which then say what acknowledged it (the
/// statuses of the wait go to stderr then, so the output stays one document).
fn report(
    ctls: &[super::route_wait::Controller],
    c: &Change,
    w: &WaitArgs,
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if ctls.is_empty() || c.written.is_none() {
        return crate::output::print(output, &c.data(), out, |_, out| print_change(c, out));
    }
    let written = || format!("HTTPRoute {} is written; only --wait failed", c.route);
    if output == Output::Table {
        print_change(c, out)?;
        out.flush()?;
        let acked = super::route_wait::wait_here(ctls, c, w.timeout, out).with_context(written)?;
        writeln!(out, "{}", acked.words())?;
        return Ok(());
    }
    let waited = super::route_wait::wait_here(ctls, c, w.timeout, &mut std::io::stderr());
    let mut data = c.data();
    data["acknowledged"] = match &waited {
        Ok(acked) => acked.data(),
        Err(_) => serde_json::Value::Null,
    };
    crate::output::print(output, &data, out, |_, _| Ok(()))?;
    waited.map(|_| ()).with_context(written)
}

/// The controllers `--wait` asks, found and read before anything is written (none without it).
fn controllers(
    mesh: &dyn Mesh,
    w: &WaitArgs,
) -> anyhow::Result<Vec<super::route_wait::Controller>> {
    if w.wait {
        super::route_wait::before_write(mesh.controllers(w)?)
    } else {
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[path = "route_tests.rs"]
pub(crate) mod tests;

/// The refusal when several HTTPRoutes attach to one Service port; `what_to_do` ends it.
pub(crate) fn several_routes(
    many: &[RouteDoc],
    ns: &str,
    service: &str,
    port: u16,
    what_to_do: &str,
) -> anyhow::Error {
    anyhow::anyhow!(
        "{} HTTPRoutes attach to Service {ns}/{service} port {port} ({}); {what_to_do}",
        many.len(),
        many.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Whether route `r` attaches to Service `ns/name` at `port`.
fn attaches(r: &RouteDoc, ns: &str, name: &str, port: u16) -> bool {
    doc::attaches(&r.value, &r.namespace, ns, name, port)
}
