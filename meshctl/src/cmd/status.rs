//! `meshctl proxy-status`: every proxy connected to the controller and, per xDS type, whether
//! it holds what the controller last sent (SYNCED), has not acknowledged it yet (STALE) or
//! refused it (NACKED, with the proxy's reason). Read from the controller's `/debug/proxies`.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::admin::get_json;

pub use crate::output::Output;
use crate::output::Table;

#[derive(Debug, clap::Args)]
pub struct ProxyStatusArgs {
    /// The controller's admin address (a local mesh). Without it: the cluster of the current
    /// kubeconfig context, through a port-forward to a controller pod.
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CONTROLLER_ADMIN)]
    pub controller: Option<SocketAddr>,
    /// In a cluster: the control plane's namespace.
    #[arg(long = "mesh-namespace", env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The controller's admin endpoints: at `--controller`, or through a port-forward (a ready
/// controller pod in `namespace`).
pub async fn controller_endpoint(
    controller: Option<SocketAddr>,
    cx: &super::Context,
    namespace: &str,
) -> anyhow::Result<crate::admin::Endpoint> {
    if controller.is_some() || cx.local.is_some() {
        return Ok(local_controller(controller));
    }
    let cluster = cx.connect().await?;
    cluster_controller(&cluster, namespace).await
}

/// A local mesh's controller: at `controller`, or its default admin address.
pub fn local_controller(controller: Option<SocketAddr>) -> crate::admin::Endpoint {
    crate::admin::Endpoint::Direct(local_controller_addr(controller))
}

fn local_controller_addr(controller: Option<SocketAddr>) -> SocketAddr {
    controller.unwrap_or(SocketAddr::from((
        [127, 0, 0, 1],
        mesh_api::consts::ports::CONTROLLER_ADMIN,
    )))
}

/// A ready controller pod's admin port, through a port-forward: the user's own credentials
/// decide (`pods/portforward` in the control plane's namespace, which the ClusterRole
/// `mesh-reader` grants where it is bound).
pub async fn cluster_controller(
    cluster: &crate::cluster::Cluster,
    namespace: &str,
) -> anyhow::Result<crate::admin::Endpoint> {
    let mut all = cluster_controllers(cluster, namespace).await?;
    Ok(all.swap_remove(0))
}

/// The ready controller pods in `namespace`, by name; a refusal says how to be let in.
pub async fn controller_pods(
    cluster: &crate::cluster::Cluster,
    namespace: &str,
) -> anyhow::Result<Vec<String>> {
    let name = mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT;
    crate::cluster::pods_of(cluster, namespace, name)
        .await
        .map_err(|e| {
            if crate::cluster::is_forbidden(&e) {
                e.context(crate::cluster::reader_hint(namespace))
            } else {
                e
            }
        })
}

/// Every ready controller pod's admin port (one per replica, each serving its own proxies),
/// through port-forwards; at least one.
pub async fn cluster_controllers(
    cluster: &crate::cluster::Cluster,
    namespace: &str,
) -> anyhow::Result<Vec<crate::admin::Endpoint>> {
    let name = mesh_api::consts::identity::CONTROLLER_SERVICE_ACCOUNT;
    let found = controller_pods(cluster, namespace).await?;
    if found.is_empty() {
        bail!(
            "no ready {name} pod in namespace {namespace}: is the mesh installed (meshctl check)?"
        );
    }
    Ok(found
        .iter()
        .map(|pod| {
            crate::admin::Endpoint::forward(
                cluster,
                namespace,
                pod,
                mesh_api::consts::ports::CONTROLLER_ADMIN,
            )
        })
        .collect())
}

/// The xDS types, in the order a proxy applies them.
const TYPES: [&str; 4] = ["CDS", "EDS", "LDS", "RDS"];

/// `meshctl proxy-status` of a local mesh (`--controller`, default 127.0.0.1:15014).
pub async fn proxy_status(args: &ProxyStatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    proxy_status_at(&local_controller(args.controller), args.output, out).await
}

/// `meshctl proxy-status` from the controller at `ctl`.
pub async fn proxy_status_at(
    ctl: &crate::admin::Endpoint,
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let proxies = ctl.json("/debug/proxies").await.with_context(|| {
        format!(
            "reading proxy status from the controller at {ctl}; {}",
            crate::admin::CONTROLLER_HINT
        )
    })?;
    crate::output::print(output, &proxies, out, |proxies, out| {
        {
            let list = proxies.as_array().map_or(&[][..], |v| v.as_slice());
            let mut t = Table::new(["NODE", "XDS", TYPES[0], TYPES[1], TYPES[2], TYPES[3]]);
            let mut errors = Vec::new();
            for p in list {
                let node = p.get("node").and_then(Value::as_str).unwrap_or("?");
                let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("?");
                let mut cell = |ty: &str| {
                    let Some(t) = p.get("types").and_then(|t| t.get(ty)) else {
                        return "-".to_string();
                    };
                    if let Some(e) = t.get("error").and_then(Value::as_str) {
                        errors.push(format!("{node} {ty}: {e}"));
                    }
                    t.get("state")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                };
                let mut cells = vec![node.to_owned(), proto.to_owned()];
                cells.extend(TYPES.iter().map(|t| cell(t)));
                t.row(cells);
            }
            t.write(out)?;
            if list.is_empty() {
                writeln!(out, "(no proxy is connected to the controller)")?;
            }
            for e in errors {
                writeln!(out, "NACK {e}")?;
            }
        }
        Ok(())
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secrets,
}

#[derive(Debug, clap::Args)]
pub struct ProxyConfigArgs {
    /// The proxy: its node, `<namespace>/<name>` (a bare name is in the kubeconfig context's
    /// namespace in a cluster, in `default` in a local mesh).
    pub proxy: String,
    /// What to show.
    #[arg(value_enum, default_value_t = Section::Listeners)]
    pub section: Section,
    /// The controller's admin address (a local mesh: it knows where each proxy's admin server
    /// is). Without it: the proxy is the pod `<namespace>/<name>` of the current kubeconfig
    /// context's cluster, read through a port-forward to its admin port.
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CONTROLLER_ADMIN)]
    pub controller: Option<SocketAddr>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn arr<'a>(v: &'a Value, k: &str) -> &'a [Value] {
    v.get(k)
        .and_then(Value::as_array)
        .map_or(&[], |a| a.as_slice())
}

/// The part of a proxy's `/config_dump` a section shows.
fn section_of(dump: &Value, section: Section) -> Value {
    let snap = dump.get("snapshot").cloned().unwrap_or(Value::Null);
    match section {
        Section::Listeners => snap.get("listeners").cloned().unwrap_or(Value::Null),
        Section::Routes => snap.get("routes").cloned().unwrap_or(Value::Null),
        Section::Clusters | Section::Endpoints => {
            snap.get("clusters").cloned().unwrap_or(Value::Null)
        }
        Section::Secrets => dump.get("identity").cloned().unwrap_or(Value::Null),
    }
}

/// Values of a JSON object in key order (the dump's maps are objects keyed by name).
fn sorted(v: &Value) -> Vec<&Value> {
    let mut items: Vec<(&String, &Value)> = v
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    items.sort_by(|a, b| a.0.cmp(b.0));
    items.into_iter().map(|(_, v)| v).collect()
}

fn table(section: Section, v: &Value, out: &mut dyn Write) -> anyhow::Result<()> {
    match section {
        Section::Listeners => {
            let mut t = Table::new(["LISTENER", "CHAIN", "PORT", "TRANSPORT", "TLS", "FILTER"]);
            for l in sorted(v) {
                let chains = arr(l, "chains")
                    .iter()
                    .chain(l.get("default_chain").filter(|c| !c.is_null()));
                for c in chains {
                    let port = c
                        .get("port")
                        .and_then(Value::as_u64)
                        .map_or("*".into(), |p| p.to_string());
                    let filter = c
                        .get("filter")
                        .and_then(Value::as_object)
                        .and_then(|f| f.iter().next())
                        .map(|(kind, body)| {
                            let target = body
                                .as_object()
                                .and_then(|b| b.values().next())
                                .and_then(Value::as_str)
                                .unwrap_or("");
                            format!("{kind} {target}")
                        })
                        .unwrap_or_default();
                    let tls = if c.get("terminate_tls").and_then(Value::as_bool) == Some(true) {
                        "mtls"
                    } else {
                        "-"
                    };
                    t.row([
                        s(l, "name").to_owned(),
                        s(c, "name").to_owned(),
                        port,
                        s(c, "transport").to_owned(),
                        tls.to_owned(),
                        filter,
                    ]);
                }
            }
            t.write(out)?;
        }
        Section::Routes => {
            let mut t =
                Table::new(["ROUTE CONFIG", "VIRTUAL HOST", "ROUTES", "DOMAINS"]).right(&[2]);
            for rc in sorted(v) {
                for vh in arr(rc, "vhosts") {
                    let domains: Vec<&str> = arr(vh, "domains")
                        .iter()
                        .filter_map(Value::as_str)
                        .collect();
                    let shown = if domains.len() > 3 {
                        format!("{} (+{} more)", domains[..3].join(", "), domains.len() - 3)
                    } else {
                        domains.join(", ")
                    };
                    t.row([
                        s(rc, "name").to_owned(),
                        s(vh, "name").to_owned(),
                        arr(vh, "routes").len().to_string(),
                        shown,
                    ]);
                }
            }
            t.write(out)?;
        }
        Section::Clusters => {
            let mut t = Table::new(["CLUSTER", "KIND", "PROTOCOL", "ENDPOINTS"]).right(&[3]);
            for c in sorted(v) {
                let kind = match c.get("kind") {
                    Some(Value::String(k)) => k.clone(),
                    Some(Value::Object(m)) => m.keys().next().cloned().unwrap_or_default(),
                    _ => String::new(),
                };
                t.row([
                    s(c, "name").to_owned(),
                    kind,
                    s(c, "protocol").to_owned(),
                    arr(c, "endpoints").len().to_string(),
                ]);
            }
            t.write(out)?;
        }
        Section::Endpoints => {
            let mut t =
                Table::new(["CLUSTER", "ENDPOINT", "EWMA ms", "STATE", "IDENTITY"]).right(&[2]);
            for c in sorted(v) {
                for e in arr(c, "endpoints") {
                    let state = if e.get("ejected").and_then(Value::as_bool) == Some(true) {
                        "EJECTED"
                    } else {
                        "HEALTHY"
                    };
                    let ewma = e
                        .get("ewma_ms")
                        .and_then(Value::as_f64)
                        .map_or("-".into(), |m| format!("{m:.2}"));
                    let id = e.get("identity").and_then(Value::as_str).unwrap_or("-");
                    t.row([
                        s(c, "name").to_owned(),
                        s(e, "addr").to_owned(),
                        ewma,
                        state.to_owned(),
                        id.to_owned(),
                    ]);
                }
            }
            t.write(out)?;
        }
        Section::Secrets => {
            if s(v, "mode") == "off" {
                writeln!(out, "identity off: {}", s(v, "warning"))?;
                return Ok(());
            }
            let secs = |k: &str| {
                v.get(k)
                    .and_then(Value::as_u64)
                    .map_or("-".into(), |t| format!("{t} (unix)"))
            };
            writeln!(out, "SPIFFE ID      {}", s(v, "spiffe_id"))?;
            writeln!(
                out,
                "VALID          {}",
                v.get("valid").and_then(Value::as_bool).unwrap_or(false)
            )?;
            writeln!(out, "NOT BEFORE     {}", secs("not_before"))?;
            writeln!(out, "NOT AFTER      {}", secs("not_after"))?;
            writeln!(out, "NEXT RENEWAL   {}", secs("next_renewal"))?;
            writeln!(
                out,
                "RENEWALS       {} ({} failed)",
                v.get("renewals").and_then(Value::as_u64).unwrap_or(0),
                v.get("failures").and_then(Value::as_u64).unwrap_or(0)
            )?;
            writeln!(
                out,
                "TRUSTED ROOTS  {}",
                v.get("roots").and_then(Value::as_u64).unwrap_or(0)
            )?;
            if let Some(e) = v.get("last_error").and_then(Value::as_str) {
                writeln!(out, "LAST ERROR     {e}")?;
            }
        }
    }
    Ok(())
}

/// A proxy's running config, found through the controller (which knows each proxy's admin
/// address from its node metadata) and read from the proxy's `/config_dump`.
pub async fn proxy_config(args: &ProxyConfigArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let node = if args.proxy.contains('/') {
        args.proxy.clone()
    } else {
        format!("default/{}", args.proxy)
    };
    let controller = local_controller_addr(args.controller);
    let proxies = get_json(controller, "/debug/proxies")
        .await
        .with_context(|| {
            format!(
                "finding the proxy through the controller at {controller}; {}",
                crate::admin::CONTROLLER_HINT
            )
        })?;
    let list = proxies.as_array().map_or(&[][..], |v| v.as_slice());
    let Some(p) = list.iter().find(|p| s(p, "node") == node) else {
        let known: Vec<&str> = list.iter().map(|p| s(p, "node")).collect();
        bail!(
            "no proxy {node:?} is connected to the controller (connected: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let admin: SocketAddr = s(p, "admin").parse().map_err(|_| {
        anyhow::anyhow!(
            "proxy {node:?} does not say where its admin server is (it is not a mesh-proxy?)"
        )
    })?;
    let dump = get_json(admin, "/config_dump").await?;
    print_config(&dump, args, out)
}

/// `meshctl proxy-config` of a pod in a cluster: its proxy's `/config_dump` through a
/// port-forward (the admin server listens on the pod's loopback only).
pub async fn proxy_config_in_cluster(
    cluster: &crate::cluster::Cluster,
    args: &ProxyConfigArgs,
    default_namespace: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let (ns, pod) = args
        .proxy
        .split_once('/')
        .unwrap_or((default_namespace, &args.proxy));
    let text = cluster
        .port_forward_get(
            ns,
            pod,
            mesh_api::consts::ports::PROXY_ADMIN,
            "/config_dump",
        )
        .await
        .map_err(|e| {
            let what = format!(
                "reading the proxy config of pod {ns}/{pod}; `meshctl proxy-status` lists the \
                 proxies as <namespace>/<pod>"
            );
            if crate::cluster::is_forbidden(&e) {
                e.context(format!("{what}; {}", crate::cluster::reader_hint(ns)))
            } else {
                e.context(what)
            }
        })?;
    let dump: Value = serde_json::from_str(&text)
        .with_context(|| format!("pod {ns}/{pod}: /config_dump is not JSON (not a mesh-proxy?)"))?;
    print_config(&dump, args, out)
}

fn print_config(dump: &Value, args: &ProxyConfigArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let part = section_of(dump, args.section);
    crate::output::print(args.output, &part, out, |part, out| {
        table(args.section, part, out)
    })
}
