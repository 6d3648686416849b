//! A local cluster made of network namespaces, for the e2e scenarios (root only): a "node"
//! namespace holds a bridge; each pod is a namespace on it with its own address, a default
//! route through the node and nothing else (no route to the host). The control plane (mesh-ca
//! and mesh-controller) runs in a pod of its own; meshed pods run `mesh-proxy init` (real
//! iptables interception) and mesh-proxy (or Envoy) as UID 1337 next to their app. Services get
//! virtual IPs from 10.96.0.0/16, which only the proxies' interception makes reachable, as
//! kube-proxy would. Processes are the real binaries of this workspace.
//!
//! The API server is `mesh_api`'s fake, in this process, served over HTTP on the node's bridge
//! address (the listening socket is made inside the node's namespace). `meshctl install` puts
//! the chart into it first, so it holds the chart's CRDs (Gateway API standard channel) and
//! RBAC; the controller binary watches it with a kubeconfig whose token is its service account,
//! authorized by the chart's roles as a real API server would. What the platform writes (Pods
//! with their IPs, Services, EndpointSlices, Namespaces) is stored as it is; what a user
//! applies goes through server-side apply and the fake's admission (pruning, validation).
//!
//! Everything is named with [`PREFIX`] and the owning process's PID: dropping the cluster kills
//! its processes and deletes its namespaces, and [`sweep`] removes what a killed run left.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_api::fake_api::{FakeApi, path_of};
use serde_json::{Value, json};

pub use crate::cluster::{App, ServiceDef, Sidecar, Workload};
use crate::cluster::{Cluster, Load};

/// Every network namespace of these clusters starts with this.
pub const PREFIX: &str = "mesh-e2e-";
const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The API server's port on the node.
const API_PORT: u16 = 6443;
/// The controller's token for the API server.
const CONTROLLER_TOKEN: &str = "mesh-controller-token";

/// Where the workspace's binaries are: next to the test executable's `deps/` directory
/// (`cargo test --workspace` builds them; `cargo build --bins` does too).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable has no target directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is missing: build the workspace's binaries first (cargo build --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Whether this process may build such a cluster (root, `ip`, iptables, `setpriv`, and curl,
/// with which it reaches pods' admin ports): an error naming what is missing otherwise, so
/// that a test that needs the cluster fails where it cannot run instead of passing unrun.
pub fn require() -> anyhow::Result<()> {
    let ok = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let missing: Vec<&str> = [
        ("root", root),
        ("ip", ok("ip", &["-V"])),
        ("iptables", ok("iptables-save", &["--version"])),
        ("setpriv", ok("setpriv", &["--version"])),
        ("curl", ok("curl", &["--version"])),
    ]
    .into_iter()
    .filter(|(_, here)| !here)
    .map(|(what, _)| what)
    .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the network-namespace cluster needs root, ip, iptables, setpriv and curl; missing: {} (run scripts/test as root, which installs them)",
        missing.join(", ")
    );
    Ok(())
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Network namespaces of these clusters that exist now.
pub fn namespaces() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

fn owner(ns: &str) -> Option<u32> {
    ns.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The processes in network namespace `ns`.
pub fn pids(ns: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills the processes of network namespace `ns` and deletes it.
fn remove_namespace(ns: &str) {
    for pid in run(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
    {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    // Processes take a moment to go; the namespace stays until they have.
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
    crate::dns::unlink(ns);
}

/// Removes what runs that were killed left behind: namespaces whose owning process is gone.
pub fn sweep() {
    for ns in namespaces() {
        if owner(&ns).is_none_or(|pid| !alive(pid)) {
            remove_namespace(&ns);
        }
    }
    // Their DNS links, when the namespace went first.
    for entry in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX) && owner(&name).is_none_or(|pid| !alive(pid)) {
            crate::dns::unlink(&name);
        }
    }
}

/// A pod: its namespace, address and processes.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub meshed: bool,
    pub sidecar: Sidecar,
    /// The workload that made it: its `generateName` is `<workload>-`, as a controller's
    /// pods' is.
    pub workload: Option<String>,
    procs: Vec<Child>,
}

/// One cluster at a time per process: scenarios measure, and two clusters on 2 cores would
/// measure each other.
static ONE_AT_A_TIME: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Default::default);
static NEXT_CLUSTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Waits for this process's turn to run a cluster (for tests that run one in a child process).
pub async fn turn() -> tokio::sync::OwnedMutexGuard<()> {
    ONE_AT_A_TIME.clone().lock_owned().await
}

/// The cluster. Dropping it removes everything it made.
#[derive(Debug)]
pub struct NetnsCluster {
    _turn: tokio::sync::OwnedMutexGuard<()>,
    id: String,
    /// Unique among this host's interface names, short enough for them (15 characters).
    tag: String,
    node: String,
    pub dir: tempfile::TempDir,
    pods: Vec<Pod>,
    services: Vec<(ServiceDef, Ipv4Addr)>,
    control_plane: Option<Pod>,
    /// The controller's replicas; the first runs in the control-plane pod.
    controllers: Vec<Replica>,
    next_ip: u32,
    next_vip: u32,
    /// Pods killed whose endpoints stay listed.
    dead: Vec<Pod>,
    /// Labels of namespaces, written as Namespace objects.
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The API server, and a cluster admin's client of it.
    pub api: FakeApi,
    admin: meshctl::cluster::Cluster,
    api_server: tokio::task::JoinHandle<()>,
    /// Paths of the platform's objects written last (Namespaces, Pods, Services, slices).
    platform: BTreeSet<String>,
    /// What each named apply made, by path.
    applied: BTreeMap<String, Vec<Value>>,
    /// Runs the pods made from specs ([`Self::run_pod`]).
    kubelet: Option<crate::kubelet::Kubelet>,
    /// Those pods.
    kubelet_pods: Vec<KubeletPod>,
    /// `--scoped` for mesh-proxies started from now on; `None` leaves mesh-proxy's default
    /// (on, as for injected sidecars).
    pub scoped: Option<bool>,
}

/// A controller replica: a Pod object (`mesh-controller-<k>`, so the chart's headless
/// `mesh-controller-xds` lists it) and its process. A killed replica stays listed until the
/// cluster is dropped, as the platform has not noticed yet.
#[derive(Debug)]
struct Replica {
    name: String,
    ip: Ipv4Addr,
    netns: String,
    /// Its own network namespace; `None` for the first, in the control-plane pod.
    pod: Option<Pod>,
    child: Option<Child>,
}

/// Where sidecars find the controller, as injection tells them: every replica under one name.
fn xds_service_addr() -> String {
    use mesh_api::consts::identity;
    identity::xds_addr(identity::SYSTEM_NAMESPACE)
}

/// A pod the kubelet runs from its spec.
#[derive(Debug)]
pub struct KubeletPod {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub run: crate::kubelet::RunningPod,
}

/// A Pod of `meshctl demo-service` named `app`, answering `<app> <version>`, as a Deployment's
/// template would make it: a readiness probe, a preStop sleep so clients learn it is leaving
/// before it stops, and a 5 s grace period; labelled `app: <app>` and `labels`.
pub fn demo_replica(
    ns: &str,
    name: &str,
    app: &str,
    version: &str,
    labels: &[(&str, &str)],
) -> Value {
    let mut all = serde_json::Map::new();
    all.insert("app".into(), app.into());
    for (k, v) in labels {
        all.insert((*k).into(), (*v).into());
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": name, "namespace": ns, "labels": all},
    "spec": {
        "serviceAccountName": app,
        "terminationGracePeriodSeconds": 5,
        "containers": [{
            "name": "app", "image": MESHCTL_IMAGE,
            "args": ["demo-service", "--name", app, "--version", version,
                "--listen", "0.0.0.0:8080"],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"},
                "periodSeconds": 1},
            "lifecycle": {"preStop": {"sleep": {"seconds": 2}}},
        }]}})
}

/// The mesh-proxy image injection names; the kubelet runs this workspace's binary for it.
pub const PROXY_IMAGE: &str = "mesh-e2e/mesh-proxy";
/// The init container's image: the same binary (`mesh-proxy init`), named apart as the chart
/// names it, so that a pod that ran the wrong image for its init step fails here.
pub const INIT_IMAGE: &str = "mesh-e2e/mesh-proxy-init";
/// Images pods may name: `meshctl` (`demo-service`) and the load generator.
pub const MESHCTL_IMAGE: &str = "mesh-e2e/meshctl";
pub const LOAD_IMAGE: &str = "mesh-e2e/load";

impl NetnsCluster {
    /// The node, its bridge, and the control plane (mesh-ca, then mesh-controller), ready.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// [`NetnsCluster::start`], with mesh-ca signing certificates that live `cert_lifetime`
    /// (its default, 24 h, without).
    pub async fn start_with(cert_lifetime: Option<Duration>) -> anyhow::Result<Self> {
        let turn = turn().await;
        sweep();
        let n = std::process::id();
        let k = NEXT_CLUSTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (admin, api) = FakeApi::start();
        let node = format!("{PREFIX}{n}-{k}-node");
        run(&["ip", "netns", "add", &node])?;
        let mut c = Self {
            _turn: turn,
            id: format!("{n}-{k}"),
            tag: format!("m{}{k}", n % 100_000),
            node,
            dir: tempfile::tempdir()?,
            pods: Vec::new(),
            services: Vec::new(),
            control_plane: None,
            controllers: Vec::new(),
            next_ip: 3,
            next_vip: 10,
            namespace_labels: BTreeMap::new(),
            dead: Vec::new(),
            api,
            admin: meshctl::cluster::Cluster::new(admin).with_poll(Duration::from_millis(10)),
            api_server: tokio::spawn(async {}),
            platform: BTreeSet::new(),
            applied: BTreeMap::new(),
            kubelet: None,
            kubelet_pods: Vec::new(),
            scoped: None,
        };
        // Pod processes running as 1337 read their tokens and the root from here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for d in ["ca", "tokens"] {
            std::fs::create_dir(c.dir.path().join(d))?;
        }
        // The cluster DNS's records, there before any pod reads them.
        crate::dns::write(
            &crate::dns::hosts_file(c.dir.path()),
            &crate::dns::records(&c.api.state()),
        )?;
        std::fs::set_permissions(
            c.dir.path().join("tokens"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        c.in_node(&["ip", "link", "add", "br0", "type", "bridge"])?;
        c.in_node(&["ip", "addr", "add", &format!("{NODE_IP}/16"), "dev", "br0"])?;
        c.in_node(&["ip", "link", "set", "br0", "up"])?;
        c.in_node(&["ip", "link", "set", "lo", "up"])?;
        c.start_api_server().await?;
        c.kubelet = Some(crate::kubelet::Kubelet::start(&c.node)?);
        let cp = c.add_netns("mesh-system", "control-plane", CONTROL_PLANE_IP)?;
        c.controllers.push(Replica {
            name: "mesh-controller-0".into(),
            ip: CONTROL_PLANE_IP,
            netns: cp.netns.clone(),
            pod: None,
            child: None,
        });
        c.control_plane = Some(cp);
        c.start_ca(cert_lifetime).await?;
        c.start_controller().await?;
        Ok(c)
    }

    /// Installs the chart into the fake API server as `meshctl install` does, and serves it on
    /// the node at [`API_PORT`] for the controller.
    async fn start_api_server(&mut self) -> anyhow::Result<()> {
        let args = meshctl::install::InstallArgs {
            values: Vec::new(),
            namespace: "mesh-system".into(),
            skip_gateway_api_crds: false,
            dry_run: false,
            output: meshctl::install::Format::Yaml,
            timeout: Duration::from_secs(20),
        };
        meshctl::install::apply(&self.admin, &args, false, &mut Vec::new())
            .await
            .context("meshctl install into the API server")?;
        let listener = listen_in(&self.node, SocketAddr::from((NODE_IP, API_PORT)))?;
        let users = BTreeMap::from([(
            CONTROLLER_TOKEN.to_owned(),
            "system:serviceaccount:mesh-system:mesh-controller".to_owned(),
        )]);
        self.api_server = self
            .api
            .serve_http(tokio::net::TcpListener::from_std(listener)?, users);
        // A port-forward reaches the pod's loopback, as the kubelet's does.
        let prefix = self.netns_prefix();
        self.api.state().port_forwarder = Some(mesh_api::fake_api::PortForwarder(
            std::sync::Arc::new(move |pod: &Value, port: u16| {
                let ip: Ipv4Addr = pod
                    .pointer("/status/podIP")
                    .and_then(Value::as_str)
                    .and_then(|ip| ip.parse().ok())
                    .ok_or_else(|| std::io::Error::other("the pod has no IP"))?;
                connect_in(
                    &pod_netns(&prefix, ip),
                    SocketAddr::from(([127, 0, 0, 1], port)),
                )
                .map_err(std::io::Error::other)
            }),
        ));
        std::fs::write(
            self.dir.path().join("kubeconfig"),
            mesh_api::fake_api::kubeconfig(
                &format!("http://{NODE_IP}:{API_PORT}"),
                CONTROLLER_TOKEN,
                "mesh-system",
            ),
        )?;
        Ok(())
    }

    /// The prefix of this cluster's network namespace names.
    pub fn netns_prefix(&self) -> String {
        format!("{PREFIX}{}-", self.id)
    }

    /// The node's network namespace, outside every pod: where a client outside the cluster
    /// reaches pods from ([`connect_in`] it to connect from there).
    pub fn node_netns(&self) -> &str {
        &self.node
    }

    fn in_node(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", self.node.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `program` with `args` in the node's network namespace, outside every pod, as a
    /// client outside the cluster reaches pods through a node: its output, whatever its exit
    /// status.
    pub fn from_node(&self, program: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", self.node.as_str(), program])
            .args(args)
            .output()?)
    }

    /// A pod namespace at `ip` on the bridge, with lo up and a default route via the node.
    fn add_netns(&mut self, namespace: &str, name: &str, ip: Ipv4Addr) -> anyhow::Result<Pod> {
        let idx = ip.octets()[3] as u32 + 256 * ip.octets()[2] as u32;
        let netns = pod_netns(&self.netns_prefix(), ip);
        // Interface names have at most 15 characters.
        let host_if = format!("{}h{idx}", self.tag);
        run(&["ip", "netns", "add", &netns])?;
        crate::dns::link(&netns, &crate::dns::hosts_file(self.dir.path()))
            .with_context(|| format!("the cluster DNS of {netns}"))?;
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ])?;
        run(&["ip", "link", "set", &host_if, "netns", &self.node])?;
        self.in_node(&["ip", "link", "set", &host_if, "master", "br0"])?;
        self.in_node(&["ip", "link", "set", &host_if, "up"])?;
        let exec = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", netns.as_str()];
            full.extend_from_slice(args);
            run(&full)
        };
        exec(&["ip", "addr", "add", &format!("{ip}/16"), "dev", "eth0"])?;
        exec(&["ip", "link", "set", "eth0", "up"])?;
        exec(&["ip", "link", "set", "lo", "up"])?;
        exec(&["ip", "route", "add", "default", "via", &NODE_IP.to_string()])?;
        Ok(Pod {
            namespace: namespace.into(),
            name: name.into(),
            netns,
            ip,
            labels: BTreeMap::new(),
            service_account: "default".into(),
            meshed: false,
            sidecar: Sidecar::MeshProxy,
            workload: None,
            procs: Vec::new(),
        })
    }

    fn spawn_in(
        netns: &str,
        uid: Option<u32>,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<Child> {
        Self::spawn_with_env(netns, uid, program, args, &[], log)
    }

    fn spawn_with_env(
        netns: &str,
        uid: Option<u32>,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> anyhow::Result<Child> {
        let mut cmd = Command::new("ip");
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.args(["netns", "exec", netns]);
        if let Some(uid) = uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        cmd.arg(program).args(args);
        let out = std::fs::File::create(log)?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null());
        cmd.spawn()
            .with_context(|| format!("starting {} in {netns}", program.display()))
    }

    fn log(&self, what: &str) -> PathBuf {
        self.dir.path().join(format!("{what}.log"))
    }

    /// The last lines of a process's log, for errors.
    pub fn tail(&self, what: &str) -> String {
        let text = std::fs::read_to_string(self.log(what)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `GET http://127.0.0.1:<port><path>` in the network namespace `netns` (the admin
    /// ports, which only their own pod reaches).
    fn get_in(netns: &str, port: u16, path: &str) -> anyhow::Result<String> {
        run(&[
            "ip",
            "netns",
            "exec",
            netns,
            "curl",
            "-sf",
            "--max-time",
            "3",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
    }

    /// `GET http://127.0.0.1:<port><path>` in the control-plane pod.
    pub fn control_plane_get(&self, port: u16, path: &str) -> anyhow::Result<String> {
        let cp = self.control_plane.as_ref().context("no control plane")?;
        Self::get_in(&cp.netns, port, path)
    }

    /// Waits until `/ready` on `port` in `netns` answers; `what` names the log to show if not.
    async fn wait_ready(&self, what: &str, netns: &str, port: u16) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Self::get_in(netns, port, "/ready").is_err() {
            if Instant::now() > deadline {
                bail!("{what} not ready in 20 s:\n{}", self.tail(what));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    async fn start_ca(&mut self, cert_lifetime: Option<Duration>) -> anyhow::Result<()> {
        let dir = self.dir.path().join("ca");
        let mut args = owned(&[
            "serve",
            "--local-tokens",
            "--dir",
            &dir.display().to_string(),
            "--addr",
            "0.0.0.0:15012",
            "--admin-addr",
            "0.0.0.0:15013",
        ]);
        if let Some(l) = cert_lifetime {
            let l = format!("{}s", l.as_secs());
            args.extend(owned(&["--default-lifetime", &l, "--max-lifetime", &l]));
        }
        let child = Self::spawn_in(
            &self.control_plane.as_ref().context("control plane")?.netns,
            None,
            &binary("mesh-ca")?,
            &args,
            &self.log("mesh-ca"),
        )?;
        let cp = self.control_plane.as_mut().context("no control plane")?;
        cp.procs.push(child);
        let netns = cp.netns.clone();
        self.wait_ready("mesh-ca", &netns, 15013).await?;
        // Pods read the root as UID 1337.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }

    /// A local-mesh token for `ns/sa`, in a file pods can read.
    fn token(&self, ns: &str, sa: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join("ca");
        let out = Command::new(binary("mesh-ca")?)
            .args([
                "token",
                "--dir",
                &dir.display().to_string(),
                "-n",
                ns,
                "--service-account",
                sa,
            ])
            .output()?;
        if !out.status.success() {
            bail!("mesh-ca token: {}", String::from_utf8_lossy(&out.stderr));
        }
        let path = self.dir.path().join("tokens").join(format!("{ns}.{sa}"));
        std::fs::write(&path, &out.stdout)?;
        Ok(path)
    }

    /// Starts (or restarts) the controller's first replica and waits until it is ready.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        self.start_replica(0).await
    }

    /// Starts one more controller replica in a pod of its own and waits until it is ready;
    /// returns its index.
    pub async fn add_controller_replica(&mut self) -> anyhow::Result<usize> {
        let k = self.controllers.len();
        anyhow::ensure!(k < 255, "too many controller replicas");
        let name = format!("mesh-controller-{k}");
        let ip = Ipv4Addr::new(10, 244, 255, k as u8);
        let pod = self.add_netns("mesh-system", &name, ip)?;
        self.controllers.push(Replica {
            name,
            ip,
            netns: pod.netns.clone(),
            pod: Some(pod),
            child: None,
        });
        self.start_replica(k).await?;
        Ok(k)
    }

    /// Starts (or restarts) replica `k` as the chart runs it, on the API server through a
    /// kubeconfig; waits until it is ready, then lists its Pod (and so its address under
    /// `mesh-controller-xds`).
    async fn start_replica(&mut self, k: usize) -> anyhow::Result<()> {
        let token = self.token("mesh-system", "mesh-controller")?;
        let d = |p: &str| self.dir.path().join(p).display().to_string();
        let args: Vec<String> = vec![
            "--webhook-addr".into(),
            "0.0.0.0:15017".into(),
            "--xds-addr".into(),
            "0.0.0.0:15010".into(),
            "--admin-addr".into(),
            "0.0.0.0:15014".into(),
            "--ca-addr".into(),
            format!("{CONTROL_PLANE_IP}:15012"),
            "--ca-root".into(),
            d("ca/ca.crt"),
            "--ca-token-file".into(),
            token.display().to_string(),
            "--debounce-max-ms".into(),
            "50".into(),
            // Rollouts judge their steps from these scrapes.
            "--stats-interval".into(),
            "1s".into(),
            // What the chart gives it: the proxy's images (here the names the kubelet runs
            // mesh-proxy for) and addresses, for injection and Gateways' Deployments.
            format!("--inject-proxy-image={PROXY_IMAGE}"),
            format!("--inject-init-image={INIT_IMAGE}"),
            format!("--inject-xds-addr={}", xds_service_addr()),
            format!("--inject-ca-addr={CONTROL_PLANE_IP}:15012"),
        ];
        let replica = self
            .controllers
            .get(k)
            .context("no such controller replica")?;
        let env = [
            ("KUBECONFIG", d("kubeconfig")),
            ("POD_NAME", replica.name.clone()),
        ];
        let log = self.log(&replica.name);
        let (name, netns) = (replica.name.clone(), replica.netns.clone());
        let child =
            Self::spawn_with_env(&netns, None, &binary("mesh-controller")?, &args, &env, &log)?;
        self.controllers[k].child = Some(child);
        self.wait_ready(&name, &netns, 15014).await?;
        self.write_state()
    }

    /// Controller replica `k`'s pod address.
    pub fn replica_ip(&self, k: usize) -> anyhow::Result<Ipv4Addr> {
        self.controllers
            .get(k)
            .map(|r| r.ip)
            .context("no such controller replica")
    }

    /// `GET http://127.0.0.1:<port><path>` in controller replica `k`'s pod.
    pub fn replica_get(&self, k: usize, port: u16, path: &str) -> anyhow::Result<String> {
        let replica = self
            .controllers
            .get(k)
            .context("no such controller replica")?;
        Self::get_in(&replica.netns, port, path)
    }

    /// Running controller replicas, by index.
    pub fn running_replicas(&self) -> Vec<usize> {
        (0..self.controllers.len())
            .filter(|&k| self.controllers[k].child.is_some())
            .collect()
    }

    /// Kills controller replica `k`; its Pod stays listed (the platform has not noticed).
    pub fn kill_controller_replica(&mut self, k: usize) {
        if let Some(mut c) = self.controllers.get_mut(k).and_then(|r| r.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills every controller replica (the proxies keep their last config).
    pub fn kill_controller(&mut self) {
        for k in 0..self.controllers.len() {
            self.kill_controller_replica(k);
        }
    }

    /// What the platform holds for the cluster's pods and Services: Namespaces (with their
    /// labels), Pods (as injection labels them, with their IPs), Services and EndpointSlices.
    fn platform_objects(&self) -> Vec<Value> {
        let mut namespaces: BTreeSet<&str> =
            self.namespace_labels.keys().map(String::as_str).collect();
        namespaces.extend(self.pods.iter().map(|p| p.namespace.as_str()));
        namespaces.extend(self.kubelet_pods.iter().map(|p| p.namespace.as_str()));
        namespaces.extend(self.services.iter().map(|(s, _)| s.namespace.as_str()));
        let mut out: Vec<Value> = namespaces
            .into_iter()
            .filter(|ns| *ns != "mesh-system")
            .map(|ns| {
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns,
                    "labels": self.namespace_labels.get(ns).cloned().unwrap_or_default()}})
            })
            .collect();
        // The controller's replicas, which the chart's Services select.
        for r in &self.controllers {
            out.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": r.name, "namespace": "mesh-system",
                    "labels": {"app.kubernetes.io/name": "mesh-controller"}},
                "spec": {"serviceAccountName": "mesh-controller",
                    "containers": [{"name": "mesh-controller", "image": "mesh-controller"}]},
                "status": {"phase": "Running", "podIP": r.ip.to_string(), "podIPs": [{"ip": r.ip.to_string()}],
                    "conditions": [{"type": "Ready", "status": "True"}]}}));
        }
        // A killed pod stays as it was until the platform notices.
        for p in self.pods.iter().chain(&self.dead) {
            let mut labels = p.labels.clone();
            if p.meshed {
                labels.insert(mesh_api::consts::labels::PROXY.into(), "true".into());
            }
            let generate_name = p.workload.as_ref().map(|w| format!("{w}-"));
            out.push(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": labels,
                    "generateName": generate_name},
                "spec": {"serviceAccountName": p.service_account, "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
                    "conditions": [{"type": "Ready", "status": "True"}]}}));
        }
        for (s, vip) in &self.services {
            out.push(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": {"clusterIP": vip.to_string(), "selector": s.selector,
                    "ports": [{"name": "http", "port": s.port, "targetPort": s.target_port, "appProtocol": "http"}]}}));
        }
        out
    }

    /// Brings the API server's platform objects to [`Self::platform_objects`]: what changed is
    /// written (as the kubelet writes, without admission), what went is deleted; then the
    /// EndpointSlices follow, as the EndpointSlice controller writes them.
    fn write_state(&mut self) -> anyhow::Result<()> {
        let objects = self.platform_objects();
        let paths: BTreeSet<String> = objects.iter().map(path_of).collect();
        let mut state = self.api.state();
        for o in objects {
            crate::endpointslices::put_if_changed(&mut state, o);
        }
        for gone in self.platform.difference(&paths) {
            state.delete(gone);
        }
        crate::endpointslices::sync_platform(&mut state, self.dir.path())
            .context("the cluster's hosts file")?;
        drop(state);
        self.platform = paths;
        Ok(())
    }

    /// The next free pod address.
    fn next_pod_ip(&mut self) -> Ipv4Addr {
        let ip = Ipv4Addr::new(
            10,
            244,
            (self.next_ip / 256) as u8,
            (self.next_ip % 256) as u8,
        );
        self.next_ip += 1;
        ip
    }

    /// Starts a workload's pods (app, then for meshed pods the interception and the proxy);
    /// returns their names once every proxy is ready.
    pub async fn deploy(&mut self, w: &Workload) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for i in 0..w.replicas {
            let ip = self.next_pod_ip();
            let name = format!("{}-{i}", w.name);
            let mut pod = self.add_netns(&w.namespace, &name, ip)?;
            pod.labels = w.labels.clone();
            pod.service_account = w.service_account.clone();
            pod.meshed = w.meshed;
            pod.sidecar = w.sidecar;
            pod.workload = Some(w.name.clone());
            // A pod that fails to start leaves no process and no namespace behind.
            if let Err(e) = self.start_pod(&mut pod, w).await {
                kill_all(&mut pod.procs);
                remove_namespace(&pod.netns);
                return Err(e);
            }
            names.push(name);
            self.pods.push(pod);
        }
        self.write_state()?;
        for name in &names {
            let pod = self.pod(&w.namespace, name)?;
            if pod.meshed {
                self.wait_pod_ready(pod).await?;
            }
        }
        Ok(names)
    }

    /// Starts `pod`'s app, then (meshed) its interception and proxy.
    async fn start_pod(&self, pod: &mut Pod, w: &Workload) -> anyhow::Result<()> {
        let what = format!("{}.{}", pod.namespace, pod.name);
        if let Some(args) = w.app.demo_service_args() {
            pod.procs.push(Self::spawn_in(
                &pod.netns,
                None,
                &binary("meshctl")?,
                &args,
                &self.log(&format!("{what}.app")),
            )?);
        }
        if w.meshed {
            let init = Command::new("ip")
                .args(["netns", "exec", &pod.netns])
                .arg(binary("mesh-proxy")?)
                .args(["init", "--proxy-uid", "1337"])
                .output()?;
            if !init.status.success() {
                bail!(
                    "mesh-proxy init in {}: {}",
                    pod.netns,
                    String::from_utf8_lossy(&init.stderr)
                );
            }
            match w.sidecar {
                Sidecar::MeshProxy => {
                    let proxy = self.mesh_proxy(pod, w)?;
                    pod.procs.push(proxy);
                }
                Sidecar::Envoy => self.envoy(pod, None).await?,
            }
        }
        Ok(())
    }

    /// mesh-proxy for `pod`, as injection runs it (UID 1337, a token for its service account).
    fn mesh_proxy(&self, pod: &Pod, w: &Workload) -> anyhow::Result<Child> {
        let token = self.token(&pod.namespace, &w.service_account)?;
        let mut args: Vec<String> = vec![
            "--node".into(),
            format!("{}/{}", pod.namespace, pod.name),
            "--transparent".into(),
            "true".into(),
        ];
        args.extend([
            "--xds".into(),
            xds_service_addr(),
            "--service-account".into(),
            w.service_account.clone(),
            "--ca-addr".into(),
            format!("{CONTROL_PLANE_IP}:15012"),
            "--ca-root".into(),
            self.dir.path().join("ca/ca.crt").display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
        ]);
        if let Some(scoped) = self.scoped {
            args.extend(["--scoped".into(), scoped.to_string()]);
        }
        // As injection passes the pod's workload.
        args.extend(["--workload".into(), w.name.clone()]);
        Self::spawn_in(
            &pod.netns,
            Some(1337),
            &binary("mesh-proxy")?,
            &args,
            &self.log(&format!("{}.{}.proxy", pod.namespace, pod.name)),
        )
    }

    /// Envoy for `pod` as UID 1337, as its service account: `mesh-proxy agent` keeps its SVID
    /// in SDS files, and Envoy starts once they are there, with the bootstrap `meshctl bootstrap
    /// envoy --xds-tls` writes (the controller serves xDS over mesh TLS only). Everything else
    /// comes over xDS. A sidecar (`gateway` none) runs behind the pod's interception with
    /// `--transparent --sds-dir`; the Gateway `gateway`'s proxy with `--gateway <gateway>
    /// --sds-socket` (the agent serves SDS on a socket too), so that it also originates mesh TLS.
    async fn envoy(&self, pod: &mut Pod, gateway: Option<&str>) -> anyhow::Result<()> {
        let envoy = crate::peer("MESH_ENVOY", "envoy")
            .context("an Envoy proxy needs Envoy (scripts/install-peers installs it)")?;
        let what = format!("{}.{}", pod.namespace, pod.name);
        let sds = self.dir.path().join(format!("sds.{what}"));
        std::fs::create_dir(&sds)?;
        std::os::unix::fs::chown(&sds, Some(1337), Some(1337))?;
        let token = self.token(&pod.namespace, &pod.service_account)?;
        let node = format!("{}/{}", pod.namespace, pod.name);
        let sds_dir = sds.display().to_string();
        let socket = sds.join("agent.sock").display().to_string();
        let mut args = owned(&[
            "agent",
            "--sds-dir",
            &sds_dir,
            "--node",
            &node,
            "--service-account",
            &pod.service_account,
            "--ca-addr",
            &format!("{CONTROL_PLANE_IP}:15012"),
            "--ca-root",
            &self.dir.path().join("ca/ca.crt").display().to_string(),
            "--ca-token-file",
            &token.display().to_string(),
        ]);
        if gateway.is_some() {
            args.extend(owned(&["--sds-socket", &socket]));
        }
        pod.procs.push(Self::spawn_in(
            &pod.netns,
            Some(1337),
            &binary("mesh-proxy")?,
            &args,
            &self.log(&format!("{what}.agent")),
        )?);
        // The SVID files, and the socket for a gateway: what Envoy's bootstrap names.
        let mut wanted = vec![sds.join("default.yaml")];
        if gateway.is_some() {
            wanted.push(PathBuf::from(&socket));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Some(missing) = wanted.iter().find(|f| !f.exists()) {
            let agent = pod.procs.last_mut().context("the agent")?;
            if let Some(status) = agent.try_wait()? {
                bail!(
                    "the agent of {node} exited ({status}):\n{}",
                    self.tail(&format!("{what}.agent"))
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {node} wrote no {} in 20 s:\n{}",
                    missing.display(),
                    self.tail(&format!("{what}.agent"))
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let role = match gateway {
            None => vec!["--transparent", "--sds-dir", &sds_dir],
            Some(g) => vec!["--gateway", g, "--sds-socket", &socket],
        };
        let out = Command::new(binary("meshctl")?)
            .args([
                "bootstrap",
                "envoy",
                "--node",
                &node,
                "--xds",
                &format!("{CONTROL_PLANE_IP}:15010"),
                "--xds-tls",
            ])
            .args(role)
            .output()?;
        if !out.status.success() {
            bail!(
                "meshctl bootstrap envoy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let bootstrap = self.dir.path().join(format!("{what}.envoy.yaml"));
        std::fs::write(&bootstrap, &out.stdout)?;
        let args = owned(&[
            "-c",
            &bootstrap.display().to_string(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warning",
        ]);
        pod.procs.push(Self::spawn_in(
            &pod.netns,
            Some(1337),
            &envoy,
            &args,
            &self.log(&format!("{what}.proxy")),
        )?);
        Ok(())
    }

    /// The cluster admin's client of the API server, for a task that changes objects while
    /// the test does something else (objects applied with it are not tracked by
    /// [`NetnsCluster::apply_manifests`]).
    pub fn admin_client(&self) -> meshctl::cluster::Cluster {
        self.admin.clone()
    }

    /// The `/config_dump` of pod `ns/name`'s mesh-proxy, read from inside the pod.
    pub fn config_dump(&self, ns: &str, name: &str) -> anyhow::Result<Value> {
        let text = self.exec_in_pod(
            ns,
            name,
            &[
                "curl",
                "-sf",
                "--max-time",
                "3",
                "http://127.0.0.1:15000/config_dump",
            ],
        )?;
        Ok(serde_json::from_str(&text)?)
    }

    /// The resident memory of the process running `program` in pod `ns/name` (a workload's,
    /// a kubelet pod's, or `mesh-system/control-plane` for the control plane's).
    pub fn resident_bytes(&self, ns: &str, name: &str, program: &str) -> anyhow::Result<u64> {
        let netns = if (ns, name) == ("mesh-system", "control-plane") {
            &self
                .control_plane
                .as_ref()
                .context("no control plane")?
                .netns
        } else if let Ok(p) = self.pod(ns, name) {
            &p.netns
        } else {
            &self.kubelet_pod(ns, name)?.netns
        };
        pids(netns)
            .into_iter()
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == program)
            })
            .and_then(mesh_proxy::overload::resident_bytes_of)
            .with_context(|| format!("no {program} running in {ns}/{name}"))
    }

    fn pod(&self, ns: &str, name: &str) -> anyhow::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))
    }

    /// Runs `args` in pod `ns/name`'s network namespace, as root (so its connections are
    /// intercepted, as the app's are); returns what it printed.
    pub fn exec_in_pod(&self, ns: &str, name: &str, args: &[&str]) -> anyhow::Result<String> {
        self.exec_in(self.pod(ns, name)?, args)
    }

    fn exec_in(&self, pod: &Pod, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", pod.netns.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// The port of `pod`'s proxy that answers `/ready` and serves its metrics.
    fn proxy_port(pod: &Pod) -> u16 {
        match pod.sidecar {
            Sidecar::MeshProxy => mesh_api::consts::ports::PROXY_METRICS,
            Sidecar::Envoy => mesh_api::consts::ports::PROXY_ADMIN,
        }
    }

    async fn wait_pod_ready(&self, pod: &Pod) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://127.0.0.1:{}/ready", Self::proxy_port(pod));
        while self
            .exec_in(pod, &["curl", "-sf", "--max-time", "2", &url])
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "the proxy of {}/{} is not ready in 30 s:\n{}\nthe controller's log:\n{}",
                    pod.namespace,
                    pod.name,
                    self.tail(&format!("{}.{}.proxy", pod.namespace, pod.name)),
                    self.tail("mesh-controller")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// `kubectl apply --server-side` of `yaml`'s documents, through the API server's
    /// admission; applying the same `name` again deletes what it no longer holds.
    pub async fn apply_manifests(&mut self, name: &str, yaml: &str) -> anyhow::Result<()> {
        let mut docs = Vec::new();
        for (i, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
            let v: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("{name}: document {i}"))?;
            if !v.is_null() {
                docs.push(v);
            }
        }
        for (i, o) in docs.iter().enumerate() {
            self.admin
                .apply(o)
                .await
                .with_context(|| format!("{name}: document {i}"))?;
        }
        let now: BTreeSet<String> = docs.iter().map(path_of).collect();
        for old in self.applied.remove(name).unwrap_or_default() {
            if !now.contains(&path_of(&old)) {
                self.admin.delete(&old).await?;
            }
        }
        self.applied.insert(name.to_owned(), docs);
        // The platform's controllers see what was applied (a Service gets its slice).
        self.write_state()
    }

    /// The controller's view of its proxies (`/debug/proxies`), over every running replica.
    pub fn proxies(&self) -> anyhow::Result<serde_json::Value> {
        let mut all = Vec::new();
        for k in self.running_replicas() {
            all.extend(self.replica_proxies(k)?);
        }
        Ok(Value::Array(all))
    }

    /// The proxies replica `k` serves.
    pub fn replica_proxies(&self, k: usize) -> anyhow::Result<Vec<Value>> {
        let text = self.replica_get(
            k,
            mesh_api::consts::ports::CONTROLLER_ADMIN,
            "/debug/proxies",
        )?;
        match serde_json::from_str(&text)? {
            Value::Array(list) => Ok(list),
            other => bail!("/debug/proxies of replica {k} is not a list: {other}"),
        }
    }

    /// Waits until every proxy has acknowledged the controller's current config.
    pub async fn wait_synced(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ps = self.proxies()?;
            let list = ps.as_array().cloned().unwrap_or_default();
            let meshed = self.pods.iter().filter(|p| p.meshed).count();
            if list.len() >= meshed && list.iter().all(crate::cluster::synced) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("proxies not SYNCED in 20 s: {ps}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills a pod's processes and removes its namespace. With `endpoints`, it also leaves its
    /// Services, as the platform does once it notices.
    pub fn delete_pod(&mut self, ns: &str, name: &str, endpoints: bool) -> anyhow::Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))?;
        let mut pod = self.pods.remove(i);
        kill_all(&mut pod.procs);
        remove_namespace(&pod.netns);
        if endpoints {
            self.write_state()?;
        } else {
            self.dead.push(pod);
        }
        Ok(())
    }

    /// A Service's virtual IP.
    pub fn vip(&self, ns: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
        self.services
            .iter()
            .find(|(s, _)| s.namespace == ns && s.name == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("no Service {ns}/{name}"))
    }

    /// What injection is given here: this workspace's proxy, the control plane's addresses.
    pub fn inject_settings() -> mesh_api::inject::InjectSettings {
        mesh_api::inject::InjectSettings {
            proxy_image: PROXY_IMAGE.into(),
            init_image: INIT_IMAGE.into(),
            xds_addr: xds_service_addr(),
            ca_addr: format!("{CONTROL_PLANE_IP}:15012"),
            trust_domain: "cluster.local".into(),
            proxy_uid: mesh_api::inject::PROXY_UID,
            log_level: "info".into(),
            // The chart's defaults (deploy/charts/mesh/values.yaml, proxy.resources).
            resources: serde_json::json!({
                "requests": {"cpu": "10m", "memory": "32Mi"},
                "limits": {"memory": "256Mi"}
            }),
            tracing_endpoint: String::new(),
            tracing_sampling: 0.0,
            access_log: false,
            prometheus_annotations: true,
        }
    }

    fn node(&self) -> anyhow::Result<crate::kubelet::Node> {
        let ca_dir = self.dir.path().join("ca");
        let mesh_ca = binary("mesh-ca")?;
        // The TokenRequest API's stand-in: mesh-ca's local tokens for the service account.
        let tokens: crate::kubelet::TokenIssuer = std::sync::Arc::new(move |ns, sa, _audience| {
            let out = Command::new(&mesh_ca)
                .args(["token", "--dir"])
                .arg(&ca_dir)
                .args(["-n", ns, "--service-account", sa])
                .output()?;
            if !out.status.success() {
                bail!("mesh-ca token: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(String::from_utf8(out.stdout)?)
        });
        let images = BTreeMap::from([
            (PROXY_IMAGE.to_owned(), binary("mesh-proxy")?),
            (INIT_IMAGE.to_owned(), binary("mesh-proxy")?),
            (MESHCTL_IMAGE.to_owned(), binary("meshctl")?),
            (LOAD_IMAGE.to_owned(), binary("mesh-e2e-load")?),
        ]);
        Ok(crate::kubelet::Node {
            api: self.api.clone(),
            ip: NODE_IP,
            images: std::sync::Arc::new(images),
            tokens,
            dir: self.dir.path().to_owned(),
        })
    }

    /// Pod `pod` of Deployment `ns/deployment`, as its ReplicaSet makes it from the pod template
    /// (waiting up to 30 s for the Deployment, which the controller may still be writing), run
    /// by the kubelet ([`NetnsCluster::run_pod`]).
    pub async fn run_deployment_pod(
        &mut self,
        ns: &str,
        deployment: &str,
        pod: &str,
    ) -> anyhow::Result<String> {
        let path = format!("/apis/apps/v1/namespaces/{ns}/deployments/{deployment}");
        let api = self.api.clone();
        let d = crate::eventually(
            Duration::from_secs(30),
            &format!("Deployment {ns}/{deployment}"),
            || {
                let found = api.state().objects.get(&path).cloned();
                async move { found }
            },
        )
        .await?;
        let template = &d["spec"]["template"];
        let mut metadata = template["metadata"].clone();
        metadata["name"] = json!(pod);
        metadata["namespace"] = json!(ns);
        self.run_pod(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": template["spec"]}),
        )
    }

    /// Pod `ns/pod` running a stock Envoy as a proxy of the Gateway `ns/gateway`, as a user runs
    /// Envoy in the provisioned Deployment's place: under the Gateway's service account
    /// (`<gateway>-gateway`), `mesh-proxy agent` keeping its SVID, and the bootstrap `meshctl
    /// bootstrap envoy --gateway --sds-socket --xds-tls` writes. Returns its address once Envoy
    /// is started (the test waits for it to serve).
    pub async fn run_envoy_gateway(
        &mut self,
        ns: &str,
        gateway: &str,
        pod: &str,
    ) -> anyhow::Result<Ipv4Addr> {
        let ip = self.next_pod_ip();
        let mut p = self.add_netns(ns, pod, ip)?;
        p.service_account = format!("{gateway}-gateway");
        p.labels = [("app".to_owned(), format!("{gateway}-envoy"))].into();
        if let Err(e) = self.envoy(&mut p, Some(gateway)).await {
            kill_all(&mut p.procs);
            remove_namespace(&p.netns);
            return Err(e);
        }
        self.pods.push(p);
        self.write_state()?;
        Ok(ip)
    }

    /// Creates Pod `pod` as the API server would, through the injection webhook's code when its
    /// namespace or its labels ask for injection, and has the kubelet run it. Returns its name.
    pub fn run_pod(&mut self, mut pod: Value) -> anyhow::Result<String> {
        let ns = pod["metadata"]["namespace"]
            .as_str()
            .context("the pod has no metadata.namespace")?
            .to_owned();
        let name = pod["metadata"]["name"]
            .as_str()
            .context("the pod has no metadata.name")?
            .to_owned();
        anyhow::ensure!(
            self.kubelet_pod(&ns, &name).is_err(),
            "pod {ns}/{name} exists"
        );
        let enabled = self
            .namespace_labels
            .entry(ns.clone())
            .or_default()
            .get(mesh_api::consts::labels::INJECT)
            .is_some_and(|v| v == "enabled");
        mesh_api::inject::inject(&mut pod, enabled, &Self::inject_settings())
            .map_err(|e| anyhow::anyhow!("injecting {ns}/{name}: {e}"))?;
        let ip = self.next_pod_ip();
        let node = self.node()?;
        // The pod's Namespace first: the controller publishes the CA root into it.
        self.write_state()?;
        let netns = self.add_netns(&ns, &name, ip)?.netns;
        let kubelet = self.kubelet.as_ref().context("no kubelet")?;
        let run = kubelet.run(node, pod, netns.clone(), ip);
        self.kubelet_pods.push(KubeletPod {
            namespace: ns,
            name: name.clone(),
            netns,
            ip,
            run,
        });
        Ok(name)
    }

    /// A pod the kubelet runs.
    pub fn kubelet_pod(&self, ns: &str, name: &str) -> anyhow::Result<&KubeletPod> {
        self.kubelet_pods
            .iter()
            .find(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))
    }

    fn kubelet_pod_mut(&mut self, ns: &str, name: &str) -> anyhow::Result<&mut KubeletPod> {
        self.kubelet_pods
            .iter_mut()
            .find(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))
    }

    /// Waits until `test` holds for the status of pod `ns/name`, up to `within`.
    pub async fn wait_pod(
        &mut self,
        ns: &str,
        name: &str,
        what: &str,
        within: Duration,
        test: impl Fn(&crate::kubelet::Status) -> bool,
    ) -> anyhow::Result<crate::kubelet::Status> {
        let dir = self.dir.path().to_owned();
        let p = self.kubelet_pod_mut(ns, name)?;
        p.run.wait(what, within, test).await.with_context(|| {
            let logs: Vec<String> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{ns}.{name}.")))
                })
                .map(|f| {
                    let text = std::fs::read_to_string(&f).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    format!(
                        "{}:\n{}",
                        f.display(),
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    )
                })
                .collect();
            format!("pod {ns}/{name}; its logs:\n{}", logs.join("\n"))
        })
    }

    /// Deletes pod `ns/name` gracefully (`kubectl delete pod`): returns at once; the kubelet
    /// stops it in its grace period, and it leaves the API server then.
    pub fn delete_kubelet_pod(&mut self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.kubelet_pod(ns, name)?.run.delete();
        Ok(())
    }

    /// Waits until deleted pod `ns/name` is gone, and removes its network namespace.
    pub async fn wait_gone(&mut self, ns: &str, name: &str) -> anyhow::Result<()> {
        let i = self
            .kubelet_pods
            .iter()
            .position(|p| p.namespace == ns && p.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))?;
        let p = self.kubelet_pods.remove(i);
        let gone = p.run.gone().await;
        remove_namespace(&p.netns);
        gone.with_context(|| format!("pod {ns}/{name}"))
    }

    /// Runs `args` in the node's network namespace (as the kubelet or a node process would).
    pub fn exec_in_node(&self, args: &[&str]) -> anyhow::Result<String> {
        self.in_node(args)
    }

    /// The HTTP status curl gets for `url` from pod `from` (`ns`, `name`), or from the node
    /// without one; 0 when no answer came in 3 s.
    pub fn curl_status(&self, from: Option<(&str, &str)>, url: &str) -> u16 {
        let args = [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            url,
        ];
        match from {
            Some((ns, name)) => self.exec_in_pod(ns, name, &args),
            None => self.exec_in_node(&args),
        }
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }

    /// A Deployment's rolling update, as the Deployment controller does it: pods of the new
    /// template (`make(i)` makes the `i`th) replace the pods `old`, keeping at most `replicas +
    /// max_surge` pods that are not terminating and at least `replicas - max_unavailable` ready
    /// ones; a replaced pod is deleted gracefully and does not count once terminating. Returns
    /// the new pods' names once every old pod is gone.
    pub async fn rolling_update(
        &mut self,
        ns: &str,
        old: &[String],
        replicas: usize,
        max_surge: usize,
        max_unavailable: usize,
        make: impl Fn(usize) -> Value,
    ) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(
            max_surge + max_unavailable > 0,
            "maxSurge and maxUnavailable may not both be 0"
        );
        let mut old: Vec<String> = old.to_vec();
        let mut new: Vec<String> = Vec::new();
        let mut terminating: Vec<String> = Vec::new();
        let ready = |c: &Self, name: &String| {
            c.kubelet_pod(ns, name)
                .is_ok_and(|p| p.run.status.borrow().ready)
        };
        let deadline = Instant::now() + Duration::from_secs(180);
        while !old.is_empty() || new.len() < replicas {
            while new.len() < replicas && old.len() + new.len() < replicas + max_surge {
                let pod = make(new.len());
                new.push(self.run_pod(pod)?);
            }
            // As the Deployment controller scales the old ReplicaSet down: by what keeps
            // `replicas - max_unavailable` available, new pods not yet ready counted out.
            let min_available = replicas.saturating_sub(max_unavailable);
            // Unready old pods go first; a ready one only while enough stay available.
            let unavailable_new = new.iter().filter(|n| !ready(self, n)).count();
            let mut scaled = false;
            while !old.is_empty() && old.len() + new.len() > min_available + unavailable_new {
                let available = old.iter().chain(&new).filter(|n| ready(self, n)).count();
                let k = match old.iter().position(|n| !ready(self, n)) {
                    Some(k) => k,
                    None if available > min_available => 0,
                    None => break,
                };
                let name = old.remove(k);
                self.delete_kubelet_pod(ns, &name)?;
                terminating.push(name);
                scaled = true;
            }
            if !scaled {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the rollout made no progress in 180 s: new {new:?}, old {old:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for name in &new {
            self.wait_pod(ns, name, "Ready", Duration::from_secs(60), |s| s.ready)
                .await?;
        }
        for name in terminating {
            self.wait_gone(ns, &name).await?;
        }
        Ok(new)
    }

    /// A StatefulSet as its controller runs it (`podManagementPolicy: OrderedReady`, the
    /// default): pods `<name>-0` to `<name>-<replicas - 1>` of its template, each created once
    /// the one before is Ready, with `hostname` their own name and `subdomain` its
    /// `serviceName` (so its headless Service gives each a DNS name) and the labels the
    /// controller adds. Returns their names once all are Ready. A selector that does not match
    /// the template is refused as the API server refuses it; `podManagementPolicy: Parallel`
    /// is refused by this stand-in.
    pub async fn run_statefulset(&mut self, sts: &Value) -> anyhow::Result<Vec<String>> {
        let field = |p: &str| {
            sts.pointer(p)
                .with_context(|| format!("StatefulSet: {} is required", &p[1..].replace('/', ".")))
        };
        let ns = field("/metadata/namespace")?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = field("/metadata/name")?
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let service = field("/spec/serviceName")?.clone();
        let template = field("/spec/template")?;
        let replicas = sts.pointer("/spec/replicas").map_or(Some(1), Value::as_u64);
        let replicas = replicas.context("StatefulSet: spec.replicas is not a number")?;
        let labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or_default();
        let selector = field("/spec/selector/matchLabels")?
            .as_object()
            .context("StatefulSet: spec.selector.matchLabels is not a map")?;
        anyhow::ensure!(
            !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "StatefulSet {ns}/{name}: spec.template.metadata.labels: Invalid value: {labels}: `selector` does not match template `labels`"
        );
        if let Some(p) = sts.pointer("/spec/podManagementPolicy")
            && p != "OrderedReady"
        {
            bail!(
                "StatefulSet {ns}/{name}: spec.podManagementPolicy {p}: only OrderedReady is run here"
            );
        }
        let mut names = Vec::new();
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": template.get("metadata").cloned().unwrap_or(json!({})),
                "spec": template.get("spec").cloned().unwrap_or(json!({}))});
            pod["metadata"]["name"] = json!(pod_name);
            pod["metadata"]["namespace"] = json!(ns);
            pod["metadata"]["labels"] = labels.clone();
            pod["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
            pod["metadata"]["labels"]["apps.kubernetes.io/pod-index"] = json!(i.to_string());
            pod["spec"]["hostname"] = json!(pod_name);
            pod["spec"]["subdomain"] = service.clone();
            self.run_pod(pod)?;
            self.wait_pod(&ns, &pod_name, "Ready", Duration::from_secs(60), |s| {
                s.ready
            })
            .await?;
            names.push(pod_name);
        }
        Ok(names)
    }

    /// The EndpointSlice endpoints of Service `ns/svc`, as the API server holds them.
    pub fn slice_endpoints(&self, ns: &str, svc: &str) -> Vec<Value> {
        let path = format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices/{svc}-e2e");
        self.api
            .state()
            .objects
            .get(&path)
            .and_then(|s| s["endpoints"].as_array().cloned())
            .unwrap_or_default()
    }
}

/// A TCP listener bound at `addr` inside network namespace `netns` (see [`in_netns`]).
fn listen_in(netns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    in_netns(netns, || {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding {addr} in {netns}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
}

/// The network namespace of the pod at `ip` in the cluster whose namespaces start with
/// `prefix` ([`NetnsCluster::netns_prefix`]).
fn pod_netns(prefix: &str, ip: Ipv4Addr) -> String {
    let idx = ip.octets()[3] as u32 + 256 * ip.octets()[2] as u32;
    format!("{prefix}p{idx}")
}

/// A TCP connection to `addr` made inside network namespace `netns`, on a thread of its own
/// that entered it (blocking): the socket stays in that namespace whichever thread uses it.
pub fn connect_in(netns: &str, addr: SocketAddr) -> anyhow::Result<std::net::TcpStream> {
    in_netns(netns, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .with_context(|| format!("connecting to {addr} in {netns}"))
    })
}

/// What `make` returns, run on a thread that entered network namespace `netns` (`setns`): a
/// socket it makes stays in that namespace whichever thread uses it.
fn in_netns<T: Send>(
    netns: &str,
    make: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))
        .with_context(|| format!("network namespace {netns}"))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<T> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {netns}"))?;
                make()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {netns} panicked"))?
    })
}

/// Arguments as a process takes them.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn kill_all(procs: &mut Vec<Child>) {
    for p in procs.iter_mut() {
        let _ = p.kill();
    }
    for p in procs.iter_mut() {
        let _ = p.wait();
    }
    procs.clear();
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        self.kill_controller();
        self.api_server.abort();
        for p in std::mem::take(&mut self.kubelet_pods) {
            remove_namespace(&p.netns);
        }
        self.kubelet.take();
        let mut pods = std::mem::take(&mut self.pods);
        pods.extend(self.control_plane.take());
        pods.extend(self.controllers.drain(..).filter_map(|r| r.pod));
        for p in &mut pods {
            kill_all(&mut p.procs);
            remove_namespace(&p.netns);
        }
        remove_namespace(&self.node);
    }
}

impl Cluster for NetnsCluster {
    fn service(&mut self, s: ServiceDef) -> anyhow::Result<String> {
        let vip = Ipv4Addr::new(
            10,
            96,
            (self.next_vip / 256) as u8,
            (self.next_vip % 256) as u8,
        );
        self.next_vip += 1;
        self.services.push((s, vip));
        self.write_state()?;
        Ok(vip.to_string())
    }

    async fn deploy(&mut self, w: &Workload) -> anyhow::Result<Vec<String>> {
        NetnsCluster::deploy(self, w).await
    }

    /// As `kubectl apply --server-side` to the cluster: the API server prunes what the chart's
    /// CRDs lack and refuses what they forbid.
    async fn apply(&mut self, name: &str, yaml: &str) -> anyhow::Result<()> {
        self.apply_manifests(name, yaml).await
    }

    fn label_namespace(&mut self, ns: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let entry = self.namespace_labels.entry(ns.into()).or_default();
        for (k, v) in labels {
            entry.insert(k.to_string(), v.to_string());
        }
        self.write_state()
    }

    async fn wait_synced(&self) -> anyhow::Result<()> {
        NetnsCluster::wait_synced(self).await
    }

    fn proxy_status(&self) -> anyhow::Result<serde_json::Value> {
        self.proxies()
    }

    fn start_load(&self, ns: &str, pod: &str, args: &[&str]) -> anyhow::Result<Load> {
        let pod = self.pod(ns, pod)?;
        // `ip netns exec` runs the load generator in its own process: a signal reaches it.
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .arg(binary("mesh-e2e-load")?)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the load generator")?;
        Ok(Load::new(child, true))
    }

    fn pod_ip(&self, ns: &str, pod: &str) -> anyhow::Result<String> {
        Ok(self.pod(ns, pod)?.ip.to_string())
    }

    fn proxy_metrics(&self, ns: &str, pod: &str) -> anyhow::Result<String> {
        let pod = self.pod(ns, pod)?;
        let path = match pod.sidecar {
            Sidecar::MeshProxy => "/metrics",
            Sidecar::Envoy => "/stats/prometheus",
        };
        let url = format!("http://127.0.0.1:{}{path}", Self::proxy_port(pod));
        self.exec_in(pod, &["curl", "-sf", "--max-time", "3", &url])
    }

    fn kill_pod(&mut self, ns: &str, pod: &str) -> anyhow::Result<()> {
        self.delete_pod(ns, pod, false)
    }

    fn forget_pod(&mut self, ns: &str, pod: &str) -> anyhow::Result<()> {
        self.dead.retain(|p| !(p.namespace == ns && p.name == pod));
        self.write_state()
    }

    fn stop_controller(&mut self) -> anyhow::Result<()> {
        self.kill_controller();
        Ok(())
    }

    async fn start_controller(&mut self) -> anyhow::Result<()> {
        NetnsCluster::start_controller(self).await
    }

    /// meshctl's own command code, as the cluster admin, through the API server's admission.
    async fn meshctl_route(&self, args: &[&str]) -> anyhow::Result<String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            route: meshctl::cmd::route::Route,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(
            std::iter::once("route").chain(args.iter().copied()),
        )?;
        // Over HTTP on loopback, as meshctl reaches an API server: `--wait` port-forwards to
        // the controller, which the in-process client cannot carry.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        const ADMIN_TOKEN: &str = "meshctl-admin";
        let server = self.api.serve_http(
            listener,
            BTreeMap::from([(
                ADMIN_TOKEN.to_owned(),
                mesh_api::fake_api::rbac::ADMIN.to_owned(),
            )]),
        );
        let kubeconfig = self.dir.path().join("admin-kubeconfig");
        std::fs::write(
            &kubeconfig,
            mesh_api::fake_api::kubeconfig(&url, ADMIN_TOKEN, "default"),
        )?;
        let mesh = meshctl::mesh::Cluster(
            meshctl::cluster::Cluster::connect(Some(&kubeconfig), None)
                .await?
                .with_poll(Duration::from_millis(10)),
        );
        // The route code is synchronous; its API calls block on this runtime.
        let out = tokio::task::block_in_place(|| {
            let mut out = Vec::new();
            meshctl::cmd::route::run(cli.route, &mesh, &mut out)?;
            anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
        });
        server.abort();
        out
    }
}
