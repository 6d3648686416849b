//! `meshctl top` (a live table of workloads by the traffic they serve) and `meshctl stat
//! <service>` (a Service's traffic per route and backend, so a canary's versions show side by
//! side). Both read what the controller measured from the proxies' metrics (`/debug/top`,
//! `/debug/stat`).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::admin::Endpoint;

pub use crate::output::Output;
use crate::output::Table;

/// Where the controller is.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// The controller's admin address (a local mesh). Without it: the cluster of the current
    /// kubeconfig context, through a port-forward to a controller pod (127.0.0.1:15014 with
    /// --local).
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CONTROLLER_ADMIN)]
    pub controller: Option<SocketAddr>,
    /// In a cluster: the control plane's namespace.
    #[arg(long, env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub mesh_namespace: String,
}

pub type StatArgs = ServiceArgs;

/// A command about one Service: `stat`, `authz`.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// The Service's name.
    pub service: String,
    /// The Service's namespace (default: the kubeconfig context's; `default` for a local mesh).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Only workloads in this namespace (default: the kubeconfig context's; `default` for a
    /// local mesh).
    #[arg(short = 'n', long, conflicts_with = "all_namespaces")]
    pub namespace: Option<String>,
    /// Workloads of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Print one table and exit (always so with `-o json` or `-o yaml`).
    #[arg(long)]
    pub once: bool,
    /// How often the table is redrawn.
    #[arg(long, value_parser = mesh_api::duration::parse, default_value = "2s")]
    pub interval: Duration,
}

impl ControllerArgs {
    /// The namespace of a command about workloads: `-n`, else `default` for a local mesh
    /// (`--local`, or a controller named by `--controller`), else the kubeconfig context's.
    pub fn namespace(&self, cx: &super::Context, given: Option<&str>) -> anyhow::Result<String> {
        match given {
            Some(n) => Ok(n.to_owned()),
            None if self.controller.is_some() => Ok("default".into()),
            None => cx.default_namespace(),
        }
    }

    pub async fn endpoint(&self, cx: &super::Context) -> anyhow::Result<Endpoint> {
        super::status::controller_endpoint(self.controller, cx, &self.mesh_namespace).await
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{:.2}%", 100.0 * x))
}

fn ms(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |x| format!("{x:.1}ms"))
}

fn rps(v: &Value) -> String {
    format!("{:.1}", v.as_f64().unwrap_or(0.0))
}

/// Name of a backend as a person reads it: the Service's name when it is one in `namespace`,
/// else `namespace/name`, else the cluster.
fn backend_name(row: &Value, namespace: &str) -> String {
    match row["service"].as_str() {
        Some(s) => match s.split_once('/') {
            Some((ns, name)) if ns == namespace => name.to_string(),
            _ => s.to_string(),
        },
        None => row["backend"].as_str().unwrap_or("?").to_string(),
    }
}

/// The controller's stat of one Service.
pub async fn fetch_stat(ctl: &Endpoint, namespace: &str, service: &str) -> anyhow::Result<Value> {
    fetch_service(ctl, "/debug/stat", "stats", namespace, service).await
}

/// What the controller's per-Service endpoint `path` answers for one Service; `what` names it
/// in the error.
pub async fn fetch_service(
    ctl: &Endpoint,
    path: &str,
    what: &str,
    namespace: &str,
    service: &str,
) -> anyhow::Result<Value> {
    ctl.json(&format!("{path}?service={namespace}/{service}"))
        .await
        .map_err(|e| {
            if crate::admin::names_unknown_service(&e) {
                e.context(format!(
                    "Service {namespace}/{service} is not in the mesh's configuration; check the \
                     name, or pass -n NAMESPACE"
                ))
            } else {
                e.context(format!(
                    "reading the {what} of Service {namespace}/{service} from the controller at \
                     {ctl}; {}",
                    crate::admin::CONTROLLER_HINT
                ))
            }
        })
}

/// A Service's stat as a table: a row per route and backend.
pub fn write_stat(stat: &Value, namespace: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let rows = stat["backends"]
        .as_array()
        .map_or(&[][..], |v| v.as_slice());
    if rows.is_empty() {
        writeln!(
            out,
            "no traffic to {} in the last {} s",
            stat["service"].as_str().unwrap_or("?"),
            stat["window_seconds"]
        )?;
        return Ok(());
    }
    let mut t = Table::new(["ROUTE", "BACKEND", "RPS", "SUCCESS", "P50", "P95", "P99"])
        .right(&[2, 3, 4, 5, 6]);
    for r in rows {
        t.row([
            r["route"].as_str().unwrap_or("?").to_string(),
            backend_name(r, namespace),
            rps(&r["rps"]),
            pct(&r["success_rate"]),
            ms(&r["p50_ms"]),
            ms(&r["p95_ms"]),
            ms(&r["p99_ms"]),
        ]);
    }
    Ok(t.write(out)?)
}

pub async fn stat(a: &StatArgs, cx: &super::Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let ctl = a.controller.endpoint(cx).await?;
    let namespace = a.controller.namespace(cx, a.namespace.as_deref())?;
    let stat = fetch_stat(&ctl, &namespace, &a.service).await?;
    crate::output::print(a.output, &stat, out, |stat, out| {
        writeln!(
            out,
            "{}/{}: traffic from its callers' proxies over the last {} s",
            namespace, a.service, stat["window_seconds"]
        )?;
        write_stat(stat, &namespace, out)
    })
}

fn write_top(top: &Value, namespace: Option<&str>, out: &mut dyn Write) -> anyhow::Result<()> {
    let rows: Vec<&Value> = top["workloads"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| namespace.is_none_or(|ns| w["namespace"] == ns))
        .collect();
    writeln!(
        out,
        "window {} s, {} proxies scraped",
        top["window_seconds"], top["proxies_scraped"]
    )?;
    let mut t = Table::new([
        "NAMESPACE",
        "WORKLOAD",
        "RPS",
        "SUCCESS",
        "P50",
        "P95",
        "P99",
    ])
    .right(&[2, 3, 4, 5, 6]);
    for w in &rows {
        t.row([
            w["namespace"].as_str().unwrap_or("?").to_string(),
            w["workload"].as_str().unwrap_or("?").to_string(),
            rps(&w["rps"]),
            pct(&w["success_rate"]),
            ms(&w["p50_ms"]),
            ms(&w["p95_ms"]),
            ms(&w["p99_ms"]),
        ]);
    }
    t.write(out)?;
    if rows.is_empty() {
        writeln!(out, "(no traffic in the window)")?;
    }
    Ok(())
}

pub async fn top(a: &TopArgs, cx: &super::Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let only = if a.all_namespaces {
        None
    } else {
        Some(a.controller.namespace(cx, a.namespace.as_deref())?)
    };
    let ctl = a.controller.endpoint(cx).await?;
    let read = || async {
        ctl.json("/debug/top").await.with_context(|| {
            format!(
                "reading workload stats from the controller at {ctl}; {}",
                crate::admin::CONTROLLER_HINT
            )
        })
    };
    if a.output != Output::Table {
        let mut top = read().await?;
        if let (Some(ns), Some(list)) = (&only, top["workloads"].as_array_mut()) {
            list.retain(|w| w["namespace"] == ns.as_str());
        }
        return crate::output::print(a.output, &top, out, |t, out| {
            write_top(t, only.as_deref(), out)
        });
    }
    let live = !a.once && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        let top = read().await?;
        if live {
            // Clear the screen and redraw, as top does.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        write_top(&top, only.as_deref(), out)?;
        out.flush()?;
        if a.once {
            return Ok(());
        }
        tokio::time::sleep(a.interval).await;
        if !live {
            writeln!(out)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_name_backends_and_show_missing_figures_as_dashes() {
        let stat = serde_json::json!({
            "service": "shop/reviews", "window_seconds": 30.0,
            "backends": [
                {"route": "HTTPRoute/shop/reviews rule 0", "backend": "outbound|9080||reviews-v1.shop.svc.cluster.local",
                 "service": "shop/reviews-v1", "rps": 9.0, "requests": 270.0, "success_rate": 1.0,
                 "p50_ms": 1.25, "p95_ms": 3.0, "p99_ms": 4.75},
                {"route": "HTTPRoute/shop/reviews rule 0", "backend": "outbound|9080||reviews-v3.shop.svc.cluster.local",
                 "service": "shop/reviews-v3", "rps": 1.0, "requests": 30.0, "success_rate": 0.8,
                 "p50_ms": null, "p95_ms": null, "p99_ms": null}
            ]
        });
        let mut out = Vec::new();
        write_stat(&stat, "shop", &mut out).expect("writes");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ROUTE"), "{text}");
        assert!(
            lines[1].contains("reviews-v1")
                && lines[1].contains("100.00%")
                && lines[1].contains("4.8ms"),
            "{text}"
        );
        assert!(
            lines[2].contains("reviews-v3")
                && lines[2].contains("80.00%")
                && lines[2].trim_end().ends_with('-'),
            "{text}"
        );
        let empty =
            serde_json::json!({"service": "shop/x", "window_seconds": 30.0, "backends": []});
        let mut out = Vec::new();
        write_stat(&empty, "shop", &mut out).expect("writes");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "no traffic to shop/x in the last 30.0 s\n"
        );
        let top = serde_json::json!({"window_seconds": 30.0, "proxies_scraped": 2, "workloads": [
            {"namespace": "shop", "workload": "reviews-v1", "rps": 2.0, "success_rate": 1.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0},
            {"namespace": "bank", "workload": "teller", "rps": 1.0, "success_rate": 1.0, "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0}
        ]});
        let mut out = Vec::new();
        write_top(&top, Some("shop"), &mut out).expect("writes");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("reviews-v1") && !text.contains("teller"),
            "{text}"
        );
    }
}
