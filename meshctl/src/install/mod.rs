//! `meshctl install`, `upgrade` and `uninstall`: the chart's objects applied with server-side
//! apply, CRDs first and established before anything uses them, then the control plane in
//! dependency order; then the rollouts are waited for. Running install twice changes nothing.

pub mod manifests;
pub mod values;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::cluster::{Applied, Cluster, ca_bundle_set, crd_established, rollout_done};
use crate::progress::Progress;
use manifests::{Include, PART_OF, key};
use values::{APP_VERSION, Values};

#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// Values files (the chart's keys), merged over the defaults in order.
    #[arg(short = 'f', long = "values")]
    pub values: Vec<PathBuf>,
    /// The control plane's namespace.
    #[arg(long = "mesh-namespace", env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
    /// Leave the Gateway API CRDs alone (by default they are installed when missing).
    #[arg(long)]
    pub skip_gateway_api_crds: bool,
    /// Print the objects instead of applying them (needs no cluster).
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: yaml or json.
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
    /// How long to wait for CRDs and rollouts, like 5m.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// The control plane's namespace.
    #[arg(long = "mesh-namespace", env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
    /// Keep the CRDs (deleting a CRD deletes every object of its kind).
    #[arg(long)]
    pub keep_crds: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Yaml,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_api::duration::parse(s).map_err(|e| e.to_string())
}

/// The objects as a YAML stream or a JSON list.
pub fn render(objects: &[Value], format: Format, out: &mut dyn Write) -> anyhow::Result<()> {
    match format {
        Format::Yaml => {
            for o in objects {
                writeln!(out, "---")?;
                out.write_all(serde_norway::to_string(o)?.as_bytes())?;
            }
        }
        Format::Json => {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
            serde_json::to_writer_pretty(&mut *out, &list)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Applies `o`, the `n`th object of `total`, and says so.
async fn apply_counted(
    cluster: &Cluster,
    o: &Value,
    (n, total): (usize, usize),
    progress: &Progress,
    out: &mut dyn Write,
    report: &mut Report,
) -> anyhow::Result<()> {
    let a = cluster
        .apply(o)
        .await
        .context("`meshctl check --pre` lists what you may not do in the cluster")?;
    progress.line(
        out,
        format_args!("{n:>2}/{total} {} {}", key(o), a.as_str()),
    )?;
    progress.inc();
    report.applied.push((key(o), a));
    Ok(())
}

fn is_crd(o: &Value) -> bool {
    o.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition")
}

fn is_gateway_api_crd(o: &Value) -> bool {
    is_crd(o)
        && o.pointer("/spec/group").and_then(Value::as_str) == Some("gateway.networking.k8s.io")
}

fn ours(live: &Value) -> bool {
    live.pointer(&format!(
        "/metadata/labels/{}",
        PART_OF.0.replace('/', "~1")
    ))
    .and_then(Value::as_str)
        == Some(PART_OF.1)
}

/// The CRD a ServiceMonitor or PodMonitor needs, to look it up; `None` for other kinds.
fn monitor_crd(o: &Value) -> Option<Value> {
    const GROUP: &str = "monitoring.coreos.com";
    let api_version = o["apiVersion"].as_str()?;
    if api_version.split_once('/')?.0 != GROUP {
        return None;
    }
    let (plural, _) = crate::cluster::plural(api_version, o["kind"].as_str()?)?;
    Some(serde_json::json!({"apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{GROUP}")}}))
}

/// With a monitor enabled, the Prometheus Operator's CRD for it must be installed: checked
/// before anything is written, so a cluster without the operator is told so and left as it was.
async fn monitoring_crds_present(cluster: &Cluster, values: &Values) -> anyhow::Result<()> {
    let m = &values.monitoring;
    for (enabled, value, kind) in [
        (
            m.service_monitor.enabled,
            "monitoring.serviceMonitor.enabled",
            "ServiceMonitor",
        ),
        (
            m.pod_monitor.enabled,
            "monitoring.podMonitor.enabled",
            "PodMonitor",
        ),
    ] {
        if !enabled {
            continue;
        }
        let probe = serde_json::json!({"apiVersion": "monitoring.coreos.com/v1", "kind": kind});
        let crd = monitor_crd(&probe).context("a monitor's CRD")?;
        if cluster.get(&crd).await?.is_none() {
            bail!(
                "values: {value} is true, but the cluster has no CRD {}: install the \
                 Prometheus Operator (its CRDs) first, or set {value} to false; nothing was written",
                crd["metadata"]["name"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// The version of the mesh installed in `ns`, from its controller's labels.
pub async fn installed_version(cluster: &Cluster, ns: &str) -> anyhow::Result<Option<String>> {
    let probe = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT, "namespace": ns}
    });
    Ok(cluster.get(&probe).await?.map(|d| {
        d.pointer("/metadata/labels/app.kubernetes.io~1version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned()
    }))
}

/// What an install or upgrade did, by object.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<(String, Applied)>,
    /// Objects left alone, and why.
    pub kept: Vec<(String, String)>,
}

impl Report {
    pub fn changed(&self) -> bool {
        self.applied.iter().any(|(_, a)| *a != Applied::Unchanged)
    }
}

/// Whether `to` may replace `from`: the same version, or the next minor (any patch).
pub fn upgrade_allowed(from: &str, to: &str) -> Result<(), String> {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let mut it = v.trim_start_matches('v').split(['.', '-']);
        Some((
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        ))
    };
    let (Some(f), Some(t)) = (parse(from), parse(to)) else {
        return Err(format!(
            "the installed version {from:?} is not a version meshctl {to} understands; \
             uninstall and install again"
        ));
    };
    if t < f {
        return Err(format!(
            "the cluster runs {from}, newer than this meshctl ({to}); downgrades are not \
             supported: use meshctl {from}"
        ));
    }
    if t.0 != f.0 || t.1 > f.1 + 1 {
        return Err(format!(
            "{from} to {to} skips versions: upgrade one minor version at a time, to {}.{}.x \
             first, so each control plane reads what the one before it wrote",
            f.0,
            f.1 + 1
        ));
    }
    Ok(())
}

/// Applies the install. `upgrade`: the mesh must be installed (at a version it can move from);
/// otherwise it must not be installed at another version. A bar on stderr shows the progress
/// when it is a terminal.
pub async fn apply(
    cluster: &Cluster,
    args: &InstallArgs,
    upgrade: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Report> {
    apply_with(cluster, args, upgrade, out, None).await
}

/// [`apply`], its progress shown by `progress` (by default a bar made once the number of
/// objects is known).
pub async fn apply_with(
    cluster: &Cluster,
    args: &InstallArgs,
    upgrade: bool,
    out: &mut dyn Write,
    progress: Option<Progress>,
) -> anyhow::Result<Report> {
    let paths: Vec<&std::path::Path> = args.values.iter().map(PathBuf::as_path).collect();
    let values = Values::from_files(&paths)?;
    let ns = &args.namespace;
    let installed = installed_version(cluster, ns).await.context(
        "reading the installed version (`meshctl check --pre` says whether the cluster is \
         reachable)",
    )?;
    match (installed, upgrade) {
        (None, true) => bail!("the mesh is not installed in {ns}: use meshctl install"),
        (Some(v), false) if v != APP_VERSION => bail!(
            "the mesh {v} is installed in {ns}; this is meshctl {APP_VERSION}: use meshctl \
             upgrade"
        ),
        (Some(v), true) => upgrade_allowed(&v, APP_VERSION)
            .map_err(|e| anyhow::anyhow!("refusing to upgrade: {e}"))?,
        _ => {}
    }
    let mut objects = manifests::objects(
        &values,
        ns,
        Include {
            gateway_api_crds: !args.skip_gateway_api_crds,
        },
    )?;
    monitoring_crds_present(cluster, &values).await?;
    let mut report = Report::default();
    // Gateway API CRDs someone else installed stay theirs (and their version): if any one of
    // them is there and not ours, none is applied, so a bundle is never mixed.
    let mut foreign = None;
    for probe in objects.iter().filter(|o| is_gateway_api_crd(o)) {
        if let Some(live) = cluster.get(probe).await?
            && !ours(&live)
        {
            foreign = Some(live);
            break;
        }
    }
    if let Some(live) = foreign {
        let version = live
            .pointer("/metadata/annotations/gateway.networking.k8s.io~1bundle-version")
            .and_then(Value::as_str)
            .unwrap_or("unknown version")
            .to_owned();
        objects.retain(|o| {
            if is_gateway_api_crd(o) {
                report
                    .kept
                    .push((key(o), format!("installed already ({version})")));
                false
            } else {
                true
            }
        });
        writeln!(
            out,
            "Gateway API CRDs found ({version}): leaving them as they are"
        )?;
    }
    let total = objects.len();
    let (crds, rest): (Vec<_>, Vec<_>) = objects.into_iter().partition(is_crd);
    let progress = progress.unwrap_or_else(|| Progress::bar(total as u64));
    let mut n = 0;
    for o in &crds {
        n += 1;
        apply_counted(cluster, o, (n, total), &progress, out, &mut report).await?;
    }
    for o in &crds {
        cluster
            .wait_for(o, args.timeout, crd_established, |s| {
                let _ = progress.status(out, &format!("{}: {s}", key(o)));
            })
            .await
            .context(
                "the CRD was not established; `kubectl describe crd` says why, or pass a longer \
                 --timeout",
            )?;
    }
    for o in &rest {
        n += 1;
        apply_counted(cluster, o, (n, total), &progress, out, &mut report).await?;
    }
    // Objects an earlier install enabled go once they are off, as `helm upgrade` drops them.
    let mut off = manifests::monitoring_stubs(&values, ns);
    if !values.network_policy.enabled {
        off.extend(
            manifests::network_policy_stubs(ns)
                .into_iter()
                .map(|s| (s, "networkPolicy.enabled is false")),
        );
    }
    for (stub, why) in off {
        // A monitor can be there only where the Prometheus Operator's CRD is: without it there
        // is nothing to look for (and no permission on its group to ask for).
        if let Some(crd) = monitor_crd(&stub)
            && cluster.get(&crd).await?.is_none()
        {
            continue;
        }
        let live = match cluster.get(&stub).await {
            Ok(live) => live,
            // The monitors' group may be closed to an installer who never enabled them.
            Err(e) if crate::cluster::is_forbidden(&e) => {
                progress.line(
                    out,
                    format_args!(
                        "{}: not read ({why}; no permission to read it, so one an earlier install made stays)",
                        key(&stub)
                    ),
                )?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(live) = live
            && ours(&live)
            && cluster.delete(&live).await?
        {
            progress.line(out, format_args!("{} deleted ({why})", key(&stub)))?;
        }
    }
    for o in rest.iter().filter(|o| o["kind"] == "Deployment") {
        cluster
            .wait_for(o, args.timeout, rollout_done, |s| {
                let _ = progress.status(out, &format!("waiting for {}: {s}", key(o)));
            })
            .await
            .context("the control plane did not roll out; `meshctl check` says why")?;
        progress.line(out, format_args!("        {} rolled out", key(o)))?;
    }
    // The API server calls the injector only once it trusts its certificate.
    for o in rest
        .iter()
        .filter(|o| o["kind"] == "MutatingWebhookConfiguration")
    {
        cluster
            .wait_for(o, args.timeout, ca_bundle_set, |s| {
                let _ = progress.status(out, &format!("waiting for {}: {s}", key(o)));
            })
            .await
            .context(
                "the controller did not set the injector's caBundle; `meshctl check` says why",
            )?;
        progress.line(
            out,
            format_args!("        {}: caBundle set to the CA root", key(o)),
        )?;
    }
    drop(progress);
    let count = |a: Applied| report.applied.iter().filter(|(_, x)| *x == a).count();
    if report.changed() {
        writeln!(
            out,
            "mesh {APP_VERSION} installed in {ns}: {} created, {} configured, {} unchanged",
            count(Applied::Created),
            count(Applied::Configured),
            count(Applied::Unchanged)
        )?;
    } else {
        writeln!(
            out,
            "mesh {APP_VERSION} in {ns}: no change ({} objects already as asked)",
            report.applied.len()
        )?;
    }
    Ok(report)
}

/// Deletes what install made, in reverse order. Gateway API CRDs are deleted only when
/// install created them. Returns the objects deleted.
pub async fn uninstall(
    cluster: &Cluster,
    args: &UninstallArgs,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<String>> {
    let values = Values::defaults()?;
    let mut objects = manifests::objects(
        &values,
        &args.namespace,
        Include {
            gateway_api_crds: true,
        },
    )?;
    objects.reverse();
    let mut deleted = Vec::new();
    // The CA root the controller copied into namespaces.
    let selector = format!("{}={}", PART_OF.0, PART_OF.1);
    for cm in cluster.list("v1", "ConfigMap", &selector).await? {
        if cm.pointer("/metadata/name").and_then(Value::as_str)
            == Some(mesh_controller::ca_root::ROOT_CONFIGMAP)
            && cluster.delete(&cm).await?
        {
            writeln!(out, "{} deleted", key(&cm))?;
            deleted.push(key(&cm));
        }
    }
    for o in &objects {
        if is_crd(o) {
            if args.keep_crds {
                continue;
            }
            if is_gateway_api_crd(o) {
                match cluster.get(o).await? {
                    Some(live) if ours(&live) => {}
                    Some(_) => {
                        writeln!(out, "{}: not installed by meshctl, kept", key(o))?;
                        continue;
                    }
                    None => continue,
                }
            }
        }
        if cluster.delete(o).await? {
            writeln!(out, "{} deleted", key(o))?;
            deleted.push(key(o));
        }
    }
    if deleted.is_empty() {
        writeln!(out, "nothing to delete: the mesh is not installed")?;
    } else {
        writeln!(out, "mesh uninstalled: {} objects deleted", deleted.len())?;
    }
    Ok(deleted)
}

/// `meshctl install --dry-run`: the objects, no cluster needed.
pub fn dry_run(args: &InstallArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let paths: Vec<&std::path::Path> = args.values.iter().map(PathBuf::as_path).collect();
    let values = Values::from_files(&paths)?;
    let objects = manifests::objects(
        &values,
        &args.namespace,
        Include {
            gateway_api_crds: !args.skip_gateway_api_crds,
        },
    )?;
    render(&objects, args.output, out)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
