//! `meshctl proxy-status`: every proxy connected to the controller and, per xDS type, whether
//! it holds what the controller last sent (SYNCED), has not acknowledged it yet (STALE) or
//! refused it (NACKED, with the proxy's reason). Read from the controller's `/debug/proxies`.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct ProxyStatusArgs {
    /// The controller's admin address.
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CONTROLLER_ADMIN, default_value_t = SocketAddr::from(([127, 0, 0, 1], mesh_api::consts::ports::CONTROLLER_ADMIN)))]
    pub controller: SocketAddr,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `GET http://<addr><path>` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let what = || format!("http://{addr}{path}");
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("{}: timed out connecting", what()))?
    .with_context(|| format!("{}: is it running?", what()))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = tx.send_request(req).await.with_context(what)?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{}: {status}: {}",
            what(),
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("{}: not JSON", what()))
}

/// The xDS types, in the order a proxy applies them.
const TYPES: [&str; 4] = ["CDS", "EDS", "LDS", "RDS"];

pub async fn proxy_status(args: &ProxyStatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let proxies = get_json(args.controller, "/debug/proxies")
        .await
        .context("reading proxy status from the controller (--controller)")?;
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(&proxies)?)?,
        Output::Yaml => write!(out, "{}", serde_yaml::to_string(&proxies)?)?,
        Output::Table => {
            let list = proxies.as_array().map_or(&[][..], |v| v.as_slice());
            writeln!(
                out,
                "{:<32} {:<6} {:<12} {:<12} {:<12} {:<12}",
                "NODE", "XDS", TYPES[0], TYPES[1], TYPES[2], TYPES[3]
            )?;
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
                let cells: Vec<String> = TYPES.iter().map(|t| cell(t)).collect();
                writeln!(
                    out,
                    "{:<32} {:<6} {:<12} {:<12} {:<12} {:<12}",
                    node, proto, cells[0], cells[1], cells[2], cells[3]
                )?;
            }
            if list.is_empty() {
                writeln!(out, "(no proxy is connected to the controller)")?;
            }
            for e in errors {
                writeln!(out, "NACK {e}")?;
            }
        }
    }
    Ok(())
}
