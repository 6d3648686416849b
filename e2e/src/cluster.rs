//! The cluster the e2e scenarios run on, as they see it. The scenarios are written once against
//! [`Cluster`]; the network-namespace backend ([`crate::netns`]) implements it here and in CI,
//! and a kind backend (`e2e/kind/`) where Docker runs.

use std::collections::BTreeMap;

/// What a pod runs.
#[derive(Clone, Debug)]
pub enum App {
    /// `meshctl demo-service` on port 8080, answering `<name> <version>`, and 500 to
    /// `error_rate` of the requests, spread evenly (0.5: every other one).
    Demo {
        name: String,
        version: String,
        error_rate: f64,
    },
    /// `meshctl demo-service --echo` on port 8080, answering with the request as it arrived
    /// (JSON), as the Gateway API conformance suite's echo server does.
    Echo { name: String },
    /// Nothing but (maybe) its proxy: a place to run load from.
    Idle,
}

impl App {
    /// The `meshctl` arguments of its server, listening on 0.0.0.0:8080 (none for `Idle`).
    pub fn demo_service_args(&self) -> Option<Vec<String>> {
        let mut args = vec!["demo-service".to_string()];
        match self {
            App::Demo {
                name,
                version,
                error_rate,
            } => args.extend([
                "--name".into(),
                name.clone(),
                "--version".into(),
                version.clone(),
                "--error-rate".into(),
                error_rate.to_string(),
            ]),
            App::Echo { name } => args.extend(["--name".into(), name.clone(), "--echo".into()]),
            App::Idle => return None,
        }
        args.extend(["--listen".into(), "0.0.0.0:8080".into()]);
        Some(args)
    }
}

/// The proxy beside a meshed pod's app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Sidecar {
    /// mesh-proxy, as injection adds it.
    #[default]
    MeshProxy,
    /// A stock Envoy behind the same interception, with `mesh-proxy agent` keeping its SVID in
    /// files and the bootstrap `meshctl bootstrap envoy --transparent --sds-dir --xds-tls`
    /// writes. It terminates mesh TLS inbound and, its secrets being files the controller
    /// cannot name in shared clusters, speaks plaintext to its upstreams, which PERMISSIVE
    /// servers accept. (With `--sds-socket` instead, Envoy originates mesh TLS too:
    /// `e2e/tests/identity.rs` runs it so under STRICT.)
    Envoy,
}

/// A workload: `replicas` pods of one app, with labels and a service account.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub replicas: usize,
    pub meshed: bool,
    /// Which proxy a meshed pod runs.
    pub sidecar: Sidecar,
    pub app: App,
}

impl Workload {
    /// One pod `<name>-0` in `namespace`, labelled `app: <name>`, with service account
    /// `<name>`, running nothing but (when `meshed`) mesh-proxy: a place to run load from.
    pub fn idle(namespace: &str, name: &str, meshed: bool) -> Self {
        Workload {
            namespace: namespace.into(),
            name: name.into(),
            service_account: name.into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            replicas: 1,
            meshed,
            sidecar: Sidecar::MeshProxy,
            app: App::Idle,
        }
    }
}

/// What a proxy's metrics say it sent through `backend` (a cluster): the `dst_identity` of
/// each `mesh_proxy_requests_total` series (the identity mesh TLS proved, or empty) and its
/// count.
pub fn sent_through(metrics: &str, backend: &str) -> Vec<(String, f64)> {
    mesh_api::prom::parse(metrics)
        .into_iter()
        .filter(|s| s.name == "mesh_proxy_requests_total" && s.label("backend") == backend)
        .map(|s| (s.label("dst_identity").to_owned(), s.value))
        .collect()
}

/// A Service: a virtual IP and port, selecting pods by labels.
#[derive(Clone, Debug)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    pub selector: BTreeMap<String, String>,
    pub port: u16,
    pub target_port: u16,
}

/// The load generator running in a pod (through `ip netns exec` or `kubectl exec`).
#[derive(Debug)]
pub struct Load {
    child: std::process::Child,
    /// Whether the child is the load generator itself, so that a signal reaches it (not so
    /// through `kubectl exec`).
    signalled: bool,
}

impl Load {
    /// `child` is the load generator (`signalled`) or a command that runs it elsewhere.
    pub fn new(child: std::process::Child, signalled: bool) -> Self {
        Load { child, signalled }
    }

    /// Ends the load now where a signal reaches it (else lets it run its course); its report.
    pub async fn stop(self) -> anyhow::Result<serde_json::Value> {
        if self.signalled {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        }
        self.finish().await
    }

    /// Waits for the load to end; its report (the load generator's JSON).
    pub async fn finish(self) -> anyhow::Result<serde_json::Value> {
        let out = tokio::task::spawn_blocking(move || self.child.wait_with_output()).await??;
        if !out.status.success() {
            anyhow::bail!("load generator: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// A cluster with the mesh installed, as the scenarios drive it.
pub trait Cluster {
    /// Creates a Service; returns the address clients use (`ip` or DNS name).
    fn service(&mut self, s: ServiceDef) -> anyhow::Result<String>;
    /// Starts a workload's pods; returns their names once they (and their proxies) are ready.
    fn deploy(
        &mut self,
        w: &Workload,
    ) -> impl std::future::Future<Output = anyhow::Result<Vec<String>>>;
    /// Applies manifests (routes) as `kubectl apply` does; the same `name` again replaces them.
    fn apply(
        &mut self,
        name: &str,
        yaml: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<()>>;
    /// Sets a namespace's labels (`mesh.dev/mtls-mode`).
    fn label_namespace(&mut self, ns: &str, labels: &[(&str, &str)]) -> anyhow::Result<()>;
    /// Waits until every proxy acknowledged the controller's current config.
    fn wait_synced(&self) -> impl std::future::Future<Output = anyhow::Result<()>>;
    /// The controller's view of its proxies (`/debug/proxies`, as `meshctl proxy-status`).
    fn proxy_status(&self) -> anyhow::Result<serde_json::Value>;
    /// The version of xDS type `ty` (`RDS`, ...) the proxy of pod `ns/pod` acknowledged last;
    /// empty when it was sent none (a scoped proxy subscribes to routes as it uses them).
    fn acked(&self, ns: &str, pod: &str, ty: &str) -> anyhow::Result<String> {
        let ps = self.proxy_status()?;
        let proxy = proxy_of(&ps, ns, pod)
            .ok_or_else(|| anyhow::anyhow!("the controller serves no proxy of {ns}/{pod}: {ps}"))?;
        Ok(proxy["types"][ty]["acked_version"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
    /// The model revision the controller last pushed to the proxy of pod `ns/pod` from:
    /// everything of it that concerns the proxy was sent.
    fn served(&self, ns: &str, pod: &str) -> anyhow::Result<u64> {
        let ps = self.proxy_status()?;
        proxy_of(&ps, ns, pod)
            .and_then(|p| p["revision"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("the controller serves no proxy of {ns}/{pod}: {ps}"))
    }
    /// Whether the proxy of pod `ns/pod` acknowledged everything the controller sent it.
    fn synced(&self, ns: &str, pod: &str) -> anyhow::Result<bool> {
        Ok(proxy_of(&self.proxy_status()?, ns, pod).is_some_and(synced))
    }
    /// Starts the load generator in pod `ns/pod` with `args`.
    fn start_load(&self, ns: &str, pod: &str, args: &[&str]) -> anyhow::Result<Load>;
    /// 20 requests, one at a time, from pod `ns/pod` to `url`: the load generator's report.
    fn twenty_requests(
        &self,
        ns: &str,
        pod: &str,
        url: &str,
    ) -> impl std::future::Future<Output = anyhow::Result<serde_json::Value>> {
        let load = self.start_load(
            ns,
            pod,
            &["--url", url, "--requests", "20", "--concurrency", "1"],
        );
        async move { load?.finish().await }
    }
    /// The address of pod `ns/pod`.
    fn pod_ip(&self, ns: &str, pod: &str) -> anyhow::Result<String>;
    /// The proxy metrics of pod `ns/pod` in Prometheus text: mesh-proxy's (port 15020), or
    /// Envoy's `/stats/prometheus` (its admin port).
    fn proxy_metrics(&self, ns: &str, pod: &str) -> anyhow::Result<String>;
    /// Kills pod `ns/pod` as a crash would: its endpoints stay listed until the platform
    /// notices (which the scenarios do not wait for).
    fn kill_pod(&mut self, ns: &str, pod: &str) -> anyhow::Result<()>;
    /// Whether a killed pod's endpoints stay listed until [`Cluster::forget_pod`] (else the
    /// platform takes them out on its own, as Kubernetes does for a deleted pod).
    fn killed_pods_stay_listed(&self) -> bool {
        true
    }
    /// Takes a killed pod out of its Services' endpoints, as the platform does once it noticed.
    fn forget_pod(&mut self, ns: &str, pod: &str) -> anyhow::Result<()>;
    /// Stops the controller; proxies keep their last config.
    fn stop_controller(&mut self) -> anyhow::Result<()>;
    /// Starts the controller again and waits until it is ready.
    fn start_controller(&mut self) -> impl std::future::Future<Output = anyhow::Result<()>>;
    /// `meshctl route <args>` as a user allowed to change routes and rollouts: its output.
    fn meshctl_route(
        &self,
        args: &[&str],
    ) -> impl std::future::Future<Output = anyhow::Result<String>>;
}

/// The entry of pod `ns/pod`'s proxy in a `/debug/proxies` list.
pub fn proxy_of<'a>(
    ps: &'a serde_json::Value,
    ns: &str,
    pod: &str,
) -> Option<&'a serde_json::Value> {
    let node = format!("{ns}/{pod}");
    ps.as_array()?.iter().find(|p| p["node"] == node.as_str())
}

/// Whether a proxy acknowledged every xDS type the controller sent it.
pub fn synced(proxy: &serde_json::Value) -> bool {
    proxy["types"]
        .as_object()
        .is_some_and(|t| t.values().all(|v| v["state"] == "SYNCED"))
}

/// Labels as a YAML flow mapping, for the manifests both backends write.
pub fn labels_yaml(labels: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k:?}: {v:?}"))
        .collect();
    format!("{{{}}}", items.join(", "))
}
