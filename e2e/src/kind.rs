//! The kind backend of the e2e scenarios: the same [`Cluster`] operations as `kubectl` and
//! `meshctl` commands against the current kubeconfig context, which `e2e/kind/scenarios`
//! points at a kind cluster with the mesh installed and the images loaded. Workloads are
//! StatefulSets, so pods have the stable names (`client-0`) the scenarios use; the load
//! generator runs in the `mesh-e2e` image.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{Cluster, Load, ServiceDef, Sidecar, Workload, labels_yaml};

/// The cluster of the current kubeconfig context, driven through kubectl and meshctl.
#[derive(Debug)]
pub struct KindCluster {
    /// Image of `meshctl` (the demo app) and of `mesh-e2e-load`, e.g. `local.test/meshctl:e2e`.
    pub meshctl_image: String,
    pub load_image: String,
    pub meshctl: std::path::PathBuf,
    namespaces: Vec<String>,
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program} {args:?}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl args`: its output, or an error with its stderr.
pub fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    run("kubectl", args, None)
}

/// `kubectl apply -f -` of `yaml`.
pub fn apply_yaml(yaml: &str) -> anyhow::Result<()> {
    run("kubectl", &["apply", "-f", "-"], Some(yaml)).map(|_| ())
}

impl KindCluster {
    /// From `MESH_E2E_KIND_IMAGES` (the registry/tag prefix, e.g. `local.test/:e2e` meaning
    /// `local.test/<name>:e2e`) and `MESH_E2E_MESHCTL` (the meshctl binary); `None` when the
    /// kind suite is not what runs.
    pub fn from_env() -> Option<Self> {
        let images = std::env::var("MESH_E2E_KIND_IMAGES").ok()?;
        let (registry, tag) = images.split_once("/:")?;
        Some(Self {
            meshctl_image: format!("{registry}/meshctl:{tag}"),
            load_image: format!("{registry}/mesh-e2e:{tag}"),
            meshctl: std::env::var_os("MESH_E2E_MESHCTL")?.into(),
            namespaces: Vec::new(),
        })
    }

    fn ensure_namespace(&mut self, ns: &str) -> anyhow::Result<()> {
        if !self.namespaces.iter().any(|n| n == ns) {
            apply_yaml(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{mesh.dev/inject: enabled}}}}\n"
            ))?;
            self.namespaces.push(ns.into());
        }
        Ok(())
    }

    fn proxy_status(&self) -> anyhow::Result<serde_json::Value> {
        let out = run(
            &self.meshctl.display().to_string(),
            &["proxy-status", "-o", "json"],
            None,
        )?;
        Ok(serde_json::from_str(&out)?)
    }
}

impl Cluster for KindCluster {
    fn service(&mut self, s: ServiceDef) -> anyhow::Result<String> {
        self.ensure_namespace(&s.namespace)?;
        apply_yaml(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec: {{selector: {}, ports: [{{name: http, port: {}, targetPort: {}, appProtocol: http}}]}}\n",
            s.name,
            s.namespace,
            labels_yaml(&s.selector),
            s.port,
            s.target_port
        ))?;
        Ok(format!("{}.{}.svc.cluster.local", s.name, s.namespace))
    }

    async fn deploy(&mut self, w: &Workload) -> anyhow::Result<Vec<String>> {
        if w.meshed && w.sidecar != Sidecar::MeshProxy {
            bail!(
                "workload {}/{}: the kind backend meshes pods by injection, which adds mesh-proxy; an {:?} sidecar runs on the network-namespace cluster only",
                w.namespace,
                w.name,
                w.sidecar
            );
        }
        self.ensure_namespace(&w.namespace)?;
        let mut pod_labels = w.labels.clone();
        if !w.meshed {
            pod_labels.insert("mesh.dev/inject".into(), "disabled".into());
        }
        let (image, args) = match w.app.demo_service_args() {
            Some(args) => (
                self.meshctl_image.clone(),
                serde_json::to_string(&args).context("the app's arguments")?,
            ),
            // The load generator's image, idle until the scenario execs into it.
            None => (self.load_image.clone(), "[sleep-forever]".into()),
        };
        apply_yaml(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {sa}, namespace: {ns}}}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  serviceName: {name}\n  replicas: {n}\n  podManagementPolicy: Parallel\n  selector: {{matchLabels: {sel}}}\n  template:\n    metadata: {{labels: {labels}}}\n    spec:\n      serviceAccountName: {sa}\n      containers: [{{name: app, image: {image}, imagePullPolicy: Never, args: {args}, ports: [{{containerPort: 8080}}]}}]\n",
            sa = w.service_account,
            ns = w.namespace,
            name = w.name,
            n = w.replicas,
            sel = labels_yaml(&w.labels),
            labels = labels_yaml(&pod_labels),
        ))?;
        kubectl(&[
            "-n",
            &w.namespace,
            "rollout",
            "status",
            &format!("statefulset/{}", w.name),
            "--timeout=180s",
        ])?;
        Ok((0..w.replicas).map(|i| format!("{}-{i}", w.name)).collect())
    }

    async fn apply(&mut self, _name: &str, yaml: &str) -> anyhow::Result<()> {
        apply_yaml(yaml)
    }

    fn label_namespace(&mut self, ns: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        self.ensure_namespace(ns)?;
        let mut args = vec![
            "label".to_owned(),
            "namespace".into(),
            ns.into(),
            "--overwrite".into(),
        ];
        args.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&args).map(|_| ())
    }

    async fn wait_synced(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ps = KindCluster::proxy_status(self)?;
            let all = ps
                .as_array()
                .is_some_and(|l| !l.is_empty() && l.iter().all(crate::cluster::synced));
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("proxies not SYNCED in 60 s: {ps}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn proxy_status(&self) -> anyhow::Result<serde_json::Value> {
        KindCluster::proxy_status(self)
    }

    fn start_load(&self, ns: &str, pod: &str, args: &[&str]) -> anyhow::Result<Load> {
        let child = Command::new("kubectl")
            .args(["-n", ns, "exec", pod, "-c", "app", "--", "mesh-e2e-load"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("kubectl exec")?;
        Ok(Load::new(child, false))
    }

    fn pod_ip(&self, ns: &str, pod: &str) -> anyhow::Result<String> {
        Ok(kubectl(&[
            "-n",
            ns,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={.status.podIP}",
        ])?
        .trim()
        .to_owned())
    }

    fn proxy_metrics(&self, ns: &str, pod: &str) -> anyhow::Result<String> {
        kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{pod}:15020/proxy/metrics"),
        ])
    }

    fn kill_pod(&mut self, ns: &str, pod: &str) -> anyhow::Result<()> {
        kubectl(&[
            "-n",
            ns,
            "delete",
            "pod",
            pod,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ])
        .map(|_| ())
    }

    fn killed_pods_stay_listed(&self) -> bool {
        false
    }

    fn forget_pod(&mut self, _ns: &str, _pod: &str) -> anyhow::Result<()> {
        // Kubernetes takes a deleted pod out of its endpoints itself.
        Ok(())
    }

    fn stop_controller(&mut self) -> anyhow::Result<()> {
        kubectl(&[
            "-n",
            "mesh-system",
            "scale",
            "deployment/mesh-controller",
            "--replicas=0",
        ])?;
        kubectl(&[
            "-n",
            "mesh-system",
            "wait",
            "--for=delete",
            "pod",
            "-l",
            "app.kubernetes.io/name=mesh-controller",
            "--timeout=60s",
        ])
        .map(|_| ())
    }

    async fn meshctl_route(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["route"];
        all.extend_from_slice(args);
        run(&self.meshctl.display().to_string(), &all, None)
    }

    async fn start_controller(&mut self) -> anyhow::Result<()> {
        kubectl(&[
            "-n",
            "mesh-system",
            "scale",
            "deployment/mesh-controller",
            "--replicas=1",
        ])?;
        kubectl(&[
            "-n",
            "mesh-system",
            "rollout",
            "status",
            "deployment/mesh-controller",
            "--timeout=120s",
        ])
        .map(|_| ())
    }
}

impl Drop for KindCluster {
    /// Each scenario starts from a clean slate: its namespaces go.
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"]);
        }
    }
}
