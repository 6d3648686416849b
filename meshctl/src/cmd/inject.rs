//! `meshctl inject`: adds the mesh's sidecar to the pods of manifests offline, the same way the
//! admission webhook does (`mesh_api::inject`), like `linkerd inject`. Objects without a pod
//! template pass through unchanged.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use mesh_api::inject::{InjectSettings, Outcome, inject};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The manifest file (`-`: standard input).
    #[arg(short = 'f', long)]
    pub filename: PathBuf,
    /// mesh-proxy's image.
    #[arg(long, default_value = concat!("ghcr.io/mesh-dev/mesh-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// The controller's xDS address as pods reach it.
    #[arg(long, default_value = "mesh-controller.mesh-system.svc:15010")]
    pub xds: String,
    /// mesh-ca's address as pods reach it.
    #[arg(long, default_value = "mesh-ca.mesh-system.svc:15012")]
    pub ca: String,
    #[arg(long, default_value = mesh_api::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The proxy's UID.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: i64,
}

/// Injects into every document; writes the result to `out` and what was done to `report`.
pub fn run(args: &InjectArgs, out: &mut dyn Write, report: &mut dyn Write) -> anyhow::Result<()> {
    let text = if args.filename.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.filename)
            .with_context(|| format!("reading {}", args.filename.display()))?
    };
    let settings = InjectSettings {
        proxy_image: args.proxy_image.clone(),
        xds_addr: args.xds.clone(),
        ca_addr: args.ca.clone(),
        trust_domain: args.trust_domain.clone(),
        proxy_uid: args.proxy_uid,
    };
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let what = || format!("{} document {}", args.filename.display(), i + 1);
        let mut v = serde_json::Value::deserialize(doc).with_context(what)?;
        if v.is_null() {
            continue;
        }
        let name = format!(
            "{} {}",
            v.get("kind").and_then(|k| k.as_str()).unwrap_or("?"),
            v.pointer("/metadata/name")
                .and_then(|n| n.as_str())
                .unwrap_or("?")
        );
        // Asked for explicitly: a pod is injected unless it says disabled.
        match inject(&mut v, true, &settings)
            .map_err(anyhow::Error::msg)
            .with_context(what)?
        {
            Outcome::Injected => writeln!(report, "{name}: injected")?,
            Outcome::AlreadyInjected => writeln!(report, "{name}: already injected")?,
            Outcome::Skipped(why) => writeln!(report, "{name}: skipped: {why}")?,
        }
        docs.push(v);
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            writeln!(out, "---")?;
        }
        write!(out, "{}", serde_yaml::to_string(d)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injects_what_has_pods_and_passes_the_rest() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("app.yaml");
        std::fs::write(
            &file,
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: app, image: web:1}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
        )
        .expect("write");
        let args = InjectArgs {
            filename: file.clone(),
            proxy_image: "mesh-proxy:test".into(),
            xds: "x:1".into(),
            ca: "c:2".into(),
            trust_domain: "cluster.local".into(),
            proxy_uid: 1337,
        };
        let (mut out, mut report) = (Vec::new(), Vec::new());
        run(&args, &mut out, &mut report).expect("inject");
        let report = String::from_utf8_lossy(&report);
        assert!(report.contains("Deployment web: injected"), "{report}");
        assert!(report.contains("Service web: skipped"), "{report}");
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("name: mesh-proxy") && text.contains("restartPolicy: Always"),
            "{text}"
        );
        // Injecting the output again changes nothing.
        std::fs::write(&file, text.as_bytes()).expect("write");
        let (mut again, mut report) = (Vec::new(), Vec::new());
        run(&args, &mut again, &mut report).expect("inject");
        assert_eq!(String::from_utf8_lossy(&again), text);
        assert!(String::from_utf8_lossy(&report).contains("already injected"));
        // A malformed manifest is named.
        std::fs::write(
            &file,
            "kind: Pod\nspec: {initContainers: x, containers: []}\n",
        )
        .expect("write");
        let err = run(&args, &mut Vec::new(), &mut Vec::new()).expect_err("bad");
        assert!(
            format!("{err:#}").contains("document 1") && format!("{err:#}").contains("not a list"),
            "{err:#}"
        );
    }
}
