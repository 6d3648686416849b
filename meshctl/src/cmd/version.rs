//! `meshctl version`: this meshctl's version, the control plane's (the controller's own
//! `/debug/version`), and the versions the connected proxies report (their xDS user agents),
//! with how many run each.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use super::stat::ControllerArgs;
use crate::output::Output;

#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// Only this meshctl's version (nothing is reached).
    #[arg(long)]
    pub client: bool,
    #[command(flatten)]
    pub controller: ControllerArgs,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Versions {
    pub client: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
    /// Each proxy version (`mesh-proxy 0.1.0`, `envoy 1.40.0`) and how many proxies run it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxies: Option<BTreeMap<String, usize>>,
}

/// The versions from a controller's `/debug/version` and `/debug/proxies` answers.
pub fn versions(controller: &Value, proxies: &Value) -> anyhow::Result<Versions> {
    let control_plane = controller["version"]
        .as_str()
        .context("the controller's /debug/version has no version")?
        .to_owned();
    let mut counts = BTreeMap::new();
    for p in proxies.as_array().into_iter().flatten() {
        let agent = p["user_agent"].as_str().unwrap_or_default();
        let agent = if agent.is_empty() { "unknown" } else { agent };
        *counts.entry(agent.to_owned()).or_insert(0) += 1;
    }
    Ok(Versions {
        control_plane: Some(control_plane),
        proxies: Some(counts),
        ..Versions::client()
    })
}

impl Versions {
    /// This meshctl's version alone.
    fn client() -> Self {
        Self {
            client: crate::install::values::APP_VERSION.to_owned(),
            control_plane: None,
            proxies: None,
        }
    }
}

pub async fn run(a: &VersionArgs, cx: &super::Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let v = if a.client {
        Versions::client()
    } else {
        let ctl = a.controller.endpoint(cx).await.context(
            "reaching the control plane (meshctl version --client shows this meshctl's alone)",
        )?;
        let controller = ctl.json("/debug/version").await.with_context(|| {
            format!(
                "reading the version of the controller at {ctl}; `meshctl version --client` \
                     shows this meshctl's alone"
            )
        })?;
        let proxies = ctl.json("/debug/proxies").await.with_context(|| {
            format!(
                "reading the proxies from the controller at {ctl}; `meshctl version --client` \
                     shows this meshctl's alone"
            )
        })?;
        versions(&controller, &proxies)?
    };
    crate::output::print(a.output, &v, out, write_table)
}

fn write_table(v: &Versions, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "client: {}", v.client)?;
    if let Some(c) = &v.control_plane {
        writeln!(out, "control plane: {c}")?;
    }
    if let Some(proxies) = &v.proxies {
        if proxies.is_empty() {
            writeln!(out, "proxies: none connected")?;
        }
        for (agent, n) in proxies {
            writeln!(out, "proxies: {agent} ({n})")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn proxies_are_counted_by_the_version_they_report() {
        let v = versions(
            &json!({"version": "0.1.0"}),
            &json!([{"user_agent": "mesh-proxy 0.1.0"}, {"user_agent": "mesh-proxy 0.1.0"},
                    {"user_agent": "envoy 1.40.0"}, {"user_agent": ""}]),
        )
        .expect("versions");
        assert_eq!(v.control_plane.as_deref(), Some("0.1.0"));
        let proxies = v.proxies.as_ref().expect("proxies");
        assert_eq!(proxies["mesh-proxy 0.1.0"], 2);
        assert_eq!(proxies["envoy 1.40.0"], 1);
        assert_eq!(proxies["unknown"], 1);
        let mut out = Vec::new();
        write_table(&v, &mut out).expect("table");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.contains("control plane: 0.1.0") && text.contains("mesh-proxy 0.1.0 (2)"),
            "{text}"
        );
        assert!(versions(&json!({}), &json!([])).is_err());
    }
}
