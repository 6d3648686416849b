//! `meshctl inject`: adds the mesh's sidecar to the pods of manifests offline, the same way the
//! admission webhook does (`mesh_api::inject`), like `linkerd inject`; `meshctl uninject` takes
//! it out again, with the app's probes as they were written. Objects without a pod template pass
//! through unchanged.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh_api::inject::{Outcome, Removal, inject, uninject};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The manifest file (`-`: standard input).
    #[arg(short = 'f', long)]
    pub filename: PathBuf,
    /// The install's values files (as given to `meshctl install`): images, trust domain and
    /// proxy settings come from them.
    #[arg(long = "values")]
    pub values: Vec<PathBuf>,
    /// The control plane's namespace.
    #[arg(long = "mesh-namespace", env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
}

impl InjectArgs {
    /// Injecting `file` as the default install would.
    pub fn for_file(file: &Path) -> Self {
        Self {
            filename: file.to_path_buf(),
            values: Vec::new(),
            namespace: mesh_api::consts::identity::SYSTEM_NAMESPACE.into(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct UninjectArgs {
    /// The manifest file (`-`: standard input).
    #[arg(short = 'f', long)]
    pub filename: PathBuf,
}

/// Injects into every document; writes the result to `out` and what was done to `report`.
pub fn run(args: &InjectArgs, out: &mut dyn Write, report: &mut dyn Write) -> anyhow::Result<()> {
    let paths: Vec<&Path> = args.values.iter().map(PathBuf::as_path).collect();
    let values = crate::install::values::Values::from_files(&paths)?;
    let settings = crate::install::manifests::inject_settings(&values, &args.namespace);
    // Asked for explicitly: a pod is injected unless it says disabled.
    each_document(&args.filename, out, report, |v| {
        Ok(match inject(v, true, &settings)? {
            Outcome::Injected => "injected".into(),
            Outcome::AlreadyInjected => "already injected".into(),
            Outcome::Skipped(why) => format!("skipped: {why}"),
        })
    })
}

/// Takes the sidecar out of every document; writes the result to `out` and what was done to
/// `report`.
pub fn run_uninject(
    args: &UninjectArgs,
    out: &mut dyn Write,
    report: &mut dyn Write,
) -> anyhow::Result<()> {
    each_document(&args.filename, out, report, |v| {
        Ok(match uninject(v)? {
            Removal::Uninjected => "uninjected".into(),
            Removal::NotInjected(why) => format!("unchanged: {why}"),
        })
    })
}

/// Reads the YAML documents of `file`, changes each with `change` (which says what it did),
/// and writes them to `out`, a line per document to `report`. An error names the document.
fn each_document(
    file: &Path,
    out: &mut dyn Write,
    report: &mut dyn Write,
    mut change: impl FnMut(&mut serde_json::Value) -> Result<String, String>,
) -> anyhow::Result<()> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let what = || format!("{} document {}", file.display(), i + 1);
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
        let done = change(&mut v)
            .map_err(anyhow::Error::msg)
            .with_context(what)?;
        writeln!(report, "{name}: {done}")?;
        docs.push(v);
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            writeln!(out, "---")?;
        }
        write!(out, "{}", serde_norway::to_string(d)?)?;
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
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: app, image: web:1, readinessProbe: {httpGet: {path: /healthz, port: 8080}}}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
        )
        .expect("write");
        let values = dir.path().join("values.yaml");
        std::fs::write(
            &values,
            "image: {registry: r.example, tag: t1}\nproxy: {logLevel: debug}\n",
        )
        .expect("write");
        let mut args = InjectArgs::for_file(&file);
        args.values.push(values);
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
        // The install's values decide the image and the proxy's settings.
        assert!(text.contains("image: r.example/mesh-proxy:t1"), "{text}");
        assert!(
            text.contains("image: r.example/mesh-proxy-init:t1"),
            "{text}"
        );
        assert!(
            text.contains("value: debug") && text.contains("memory: 256Mi"),
            "{text}"
        );
        assert!(text.contains("path: /app-health/app/readyz"), "{text}");
        // Injecting the output again changes nothing.
        std::fs::write(&file, text.as_bytes()).expect("write");
        let (mut again, mut report) = (Vec::new(), Vec::new());
        run(&args, &mut again, &mut report).expect("inject");
        assert_eq!(String::from_utf8_lossy(&again), text);
        assert!(String::from_utf8_lossy(&report).contains("already injected"));
        // Uninjecting gives back the manifest as written.
        let (mut back, mut report) = (Vec::new(), Vec::new());
        run_uninject(
            &UninjectArgs {
                filename: file.clone(),
            },
            &mut back,
            &mut report,
        )
        .expect("uninject");
        let report = String::from_utf8_lossy(&report);
        assert!(report.contains("Deployment web: uninjected"), "{report}");
        assert!(report.contains("Service web: unchanged"), "{report}");
        let back = String::from_utf8_lossy(&back);
        assert!(
            !back.contains("mesh-proxy")
                && !back.contains("mesh.dev")
                && !back.contains("app-health"),
            "{back}"
        );
        assert!(back.contains("path: /healthz"), "{back}");
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
