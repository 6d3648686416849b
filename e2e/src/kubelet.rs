//! A kubelet for the network-namespace cluster: it runs a Pod's spec as the kubelet does, so the
//! product code under it (an injected spec, `mesh-proxy init`, the proxy) runs as a cluster
//! would run it.
//!
//! - Init containers run one at a time, in order; one that fails is started again after a
//!   back-off. A native sidecar (an init container with `restartPolicy: Always`) keeps running,
//!   and the next container starts once it has started: at once, or once its startup probe
//!   passes. Regular containers start together once every init container is done.
//! - Probes run on their schedule (`initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`,
//!   `successThreshold`, `failureThreshold`) from the node's address, as the kubelet sends
//!   them: `httpGet` (HTTP; 200 to 399 passes), `tcpSocket` and `exec`. Liveness and readiness
//!   start once the startup probe passed; a failed liveness or startup probe restarts the
//!   container. A container is ready when its readiness probe passes (or, without one, once
//!   started); the Pod is `Ready` when every container is.
//! - Deletion: the Pod gets a `deletionTimestamp`; each regular container runs its `preStop`
//!   (`exec`, `httpGet`, `sleep`) and then gets SIGTERM, and SIGKILL when the grace period
//!   (`terminationGracePeriodSeconds`, 30 s by default) is over; then the native sidecars, in
//!   reverse order, the same way (with at least 2 s more, as the kubelet gives them). Probes go
//!   on meanwhile, so a terminating pod's readiness is still reported.
//! - Containers: the image names a program of this machine ([`Images`]); `command` names one on
//!   the PATH instead. `env` (values, the `fieldRef`s the downward API offers and its
//!   `resourceFieldRef`s of memory) and `$(VAR)`
//!   references in `command`, `args` and `env` are expanded as the kubelet does. Volumes
//!   (`emptyDir`, `configMap` from the API server, projected service account tokens) are
//!   directories bind-mounted at their `mountPath` in the container's own mount namespace; the
//!   container runs as `securityContext.runAsUser`/`runAsGroup`.
//!
//! - The pod's `securityContext.sysctls` of its network namespace (`net.*`) are set in it
//!   before its first container starts.
//!
//! What it does not do it refuses by name when the pod is created (an HTTPS or gRPC probe, a
//! `postStart` hook, `envFrom`, `readinessGates`, a `restartPolicy` other than `Always`, another
//! kind of volume or configMap `items`, a sysctl outside the pod's network namespace), so a
//! spec is never run other than written.
//!
//! Every probe and hook socket is made on the kubelet's own thread, which lives in the node's
//! network namespace: the pod sees them come from the node's address.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_api::fake_api::{FakeApi, path_of};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Image names to the programs that stand for them (their entrypoint).
pub type Images = BTreeMap<String, PathBuf>;

/// Issues a service account token for `(namespace, service account, audience)`.
pub type TokenIssuer = Arc<dyn Fn(&str, &str, &str) -> anyhow::Result<String> + Send + Sync>;

/// What the kubelet needs of the node.
#[derive(Clone)]
pub struct Node {
    pub api: FakeApi,
    pub ip: Ipv4Addr,
    pub images: Arc<Images>,
    pub tokens: TokenIssuer,
    /// Where pods' logs and volumes go.
    pub dir: PathBuf,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("ip", &self.ip)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The kubelet: a thread in the node's network namespace that runs the pods' lifecycles.
#[derive(Debug)]
pub struct Kubelet {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kubelet {
    /// Starts the kubelet's thread in network namespace `node_netns`.
    pub fn start(node_netns: &str) -> anyhow::Result<Self> {
        let ns = std::fs::File::open(format!("/var/run/netns/{node_netns}"))
            .with_context(|| format!("network namespace {node_netns}"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kubelet".into())
            .spawn(move || {
                let started = (|| -> anyhow::Result<tokio::runtime::Runtime> {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .context("entering the node's network namespace")?;
                    Ok(tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?)
                })();
                match started {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let handle = ready_rx
            .recv()
            .context("the kubelet's thread ended at start")??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `pod` (a Pod object, already stored in the API server) in network namespace
    /// `netns` at `ip`. The Pod's status is written to the API server as it changes, and the
    /// EndpointSlices follow.
    pub fn run(&self, node: Node, pod: Value, netns: String, ip: Ipv4Addr) -> RunningPod {
        let (delete, deleted) = watch::channel(false);
        let (status_tx, status) = watch::channel(Status::default());
        let task = self.handle.spawn(async move {
            let mut p = PodRun::new(node, pod, netns, ip, status_tx)?;
            let outcome = p.run(deleted).await;
            p.kill_all();
            p.forget();
            outcome
        });
        RunningPod {
            status,
            delete,
            task,
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod the kubelet runs.
#[derive(Debug)]
pub struct RunningPod {
    pub status: watch::Receiver<Status>,
    delete: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningPod {
    /// Deletes the pod as the API server's graceful deletion does; returns at once.
    pub fn delete(&self) {
        let _ = self.delete.send(true);
    }

    /// Waits until the pod is gone (its containers ended, its Pod object deleted).
    pub async fn gone(self) -> anyhow::Result<()> {
        self.task.await.context("the pod's kubelet task")?
    }

    /// Waits until `test` holds for the pod's status, up to `within`.
    pub async fn wait(
        &mut self,
        what: &str,
        within: Duration,
        test: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if test(&self.status.borrow_and_update()) {
                return Ok(self.status.borrow().clone());
            }
            if self.task.is_finished() {
                bail!("{what}: the pod ended first ({:?})", self.status.borrow());
            }
            if tokio::time::timeout_at(deadline, self.status.changed())
                .await
                .is_err()
            {
                bail!(
                    "{what}: not within {within:?}; the pod is {:?}",
                    self.status.borrow()
                );
            }
        }
    }
}

/// A pod as the kubelet reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub ready: bool,
    /// Restarts, by container.
    pub restarts: BTreeMap<String, u32>,
    /// The last probe failure, by container and probe kind.
    pub last_failure: BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    fn field(self) -> &'static str {
        match self {
            Kind::Startup => "startupProbe",
            Kind::Liveness => "livenessProbe",
            Kind::Readiness => "readinessProbe",
        }
    }
}

/// A probe's schedule and its running counts.
#[derive(Debug)]
struct Probe {
    kind: Kind,
    handler: Value,
    period: Duration,
    timeout: Duration,
    success_threshold: u32,
    failure_threshold: u32,
    initial_delay: Duration,
    next: Option<Instant>,
    successes: u32,
    failures: u32,
}

impl Probe {
    fn parse(kind: Kind, p: &Value, at: &str) -> anyhow::Result<Self> {
        let n = |f: &str, default: u64, min: u64| -> anyhow::Result<u64> {
            match p.get(f) {
                None => Ok(default),
                Some(v) => v
                    .as_u64()
                    .filter(|v| *v >= min)
                    .with_context(|| format!("{at}.{f} is {v}; expected an integer >= {min}")),
            }
        };
        let handlers: Vec<&str> = ["httpGet", "tcpSocket", "exec", "grpc"]
            .into_iter()
            .filter(|h| p.get(*h).is_some())
            .collect();
        if handlers.len() != 1 {
            bail!("{at} has handlers {handlers:?}; expected exactly one");
        }
        if p.get("grpc").is_some() {
            bail!("{at}.grpc: the kubelet stand-in sends no gRPC probes");
        }
        if let Some(scheme) = p.pointer("/httpGet/scheme").filter(|s| *s != "HTTP") {
            bail!("{at}.httpGet.scheme is {scheme}: the kubelet stand-in sends HTTP probes only");
        }
        Ok(Self {
            kind,
            handler: p.clone(),
            period: Duration::from_secs(n("periodSeconds", 10, 1)?),
            timeout: Duration::from_secs(n("timeoutSeconds", 1, 1)?),
            success_threshold: n("successThreshold", 1, 1)? as u32,
            failure_threshold: n("failureThreshold", 3, 1)? as u32,
            initial_delay: Duration::from_secs(n("initialDelaySeconds", 0, 0)?),
            next: None,
            successes: 0,
            failures: 0,
        })
    }
}

#[derive(Debug)]
struct Container {
    name: String,
    spec: Value,
    /// Where it is in the pod spec (`spec.containers[0]`), for errors.
    at: String,
    init: bool,
    sidecar: bool,
    child: Option<Child>,
    started_at: Option<Instant>,
    /// Its startup probe passed (or it has none) since it last started.
    started: bool,
    ready: bool,
    /// An init container that exited 0.
    done: bool,
    restarts: u32,
    /// Not started again before this (crash back-off).
    backoff_until: Option<Instant>,
    /// Killed at this time if it has not ended (after a failed liveness or startup probe).
    kill_at: Option<Instant>,
    probes: Vec<Probe>,
    log: PathBuf,
}

impl Container {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether its process is running; reaps it if it ended.
    fn running(&mut self) -> Option<std::process::ExitStatus> {
        let ended = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if ended.is_some() {
            self.child = None;
            self.started = false;
            self.ready = false;
            self.started_at = None;
        }
        ended
    }
}

struct PodRun {
    node: Node,
    pod: Value,
    ns: String,
    name: String,
    netns: String,
    ip: Ipv4Addr,
    containers: Vec<Container>,
    /// Host directories of the pod's volumes, by name.
    volumes: BTreeMap<String, PathBuf>,
    status: watch::Sender<Status>,
    written: Value,
}

/// A pod's `spec.securityContext.sysctls`.
fn sysctls(pod: &Value) -> impl Iterator<Item = &Value> {
    pod.pointer("/spec/securityContext/sysctls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The kubelet's crash back-off before restart number `restarts + 1`: none for the first, then
/// 10 s doubling up to 5 minutes.
fn backoff(restarts: u32) -> Duration {
    match restarts {
        0 => Duration::ZERO,
        n => Duration::from_secs(10)
            .saturating_mul(1 << (n - 1).min(5))
            .min(Duration::from_secs(300)),
    }
}

impl PodRun {
    fn new(
        node: Node,
        pod: Value,
        netns: String,
        ip: Ipv4Addr,
        status: watch::Sender<Status>,
    ) -> anyhow::Result<Self> {
        let s = |p: &str| pod.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let (ns, name) = (
            s("/metadata/namespace").to_owned(),
            s("/metadata/name").to_owned(),
        );
        for (field, what) in [
            ("/spec/readinessGates", "readinessGates"),
            ("/spec/hostNetwork", "hostNetwork"),
        ] {
            if pod.pointer(field).is_some_and(|v| *v != false) {
                bail!("{ns}/{name}: {what}: not supported by the kubelet stand-in");
            }
        }
        for (i, sysctl) in sysctls(&pod).enumerate() {
            let key = sysctl["name"].as_str().unwrap_or_default();
            if !key.starts_with("net.") || sysctl["value"].as_str().is_none() {
                bail!(
                    "{ns}/{name}: spec.securityContext.sysctls[{i}] {sysctl}: the kubelet stand-in sets the network namespace's own (net.*, a string value) only"
                );
            }
        }
        if let Some(policy) = pod
            .pointer("/spec/restartPolicy")
            .filter(|p| *p != "Always")
        {
            bail!("{ns}/{name}: spec.restartPolicy {policy}: the kubelet stand-in restarts always");
        }
        let mut containers = Vec::new();
        for (list, init) in [("initContainers", true), ("containers", false)] {
            for (i, c) in pod["spec"][list]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = format!("{ns}/{name}: spec.{list}[{i}]");
                let cname = c["name"].as_str().unwrap_or_default().to_owned();
                for (field, what) in [
                    ("/lifecycle/postStart", "runs no postStart hook"),
                    ("/envFrom", "has no envFrom"),
                ] {
                    if c.pointer(field).is_some() {
                        bail!(
                            "{at}{}: the kubelet stand-in {what}",
                            field.replace('/', ".")
                        );
                    }
                }
                let sidecar = init && c["restartPolicy"] == "Always";
                let mut probes = Vec::new();
                for kind in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
                    if let Some(p) = c.get(kind.field()) {
                        if init && !sidecar {
                            bail!("{at}.{}: an init container has no probes", kind.field());
                        }
                        probes.push(Probe::parse(kind, p, &format!("{at}.{}", kind.field()))?);
                    }
                }
                containers.push(Container {
                    log: log_of(&node.dir, &ns, &name, &cname),
                    name: cname,
                    spec: c.clone(),
                    at,
                    init,
                    sidecar,
                    child: None,
                    started_at: None,
                    started: false,
                    ready: false,
                    done: false,
                    restarts: 0,
                    backoff_until: None,
                    kill_at: None,
                    probes,
                });
            }
        }
        Ok(Self {
            node,
            pod,
            ns,
            name,
            netns,
            ip,
            containers,
            volumes: BTreeMap::new(),
            status,
            written: Value::Null,
        })
    }

    async fn run(&mut self, mut deleted: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.write()?;
        self.set_sysctls()?;
        tokio::select! {
            r = self.make_volumes() => r?,
            _ = deleted.wait_for(|d| *d) => {}
        }
        while !*deleted.borrow() {
            self.step().await?;
            self.write()?;
            tokio::select! {
                _ = tokio::time::sleep(self.idle()) => {}
                _ = deleted.changed() => {}
            }
        }
        self.terminate().await
    }

    /// The pod's `securityContext.sysctls`, set in its network namespace before any container
    /// starts (checked to be `net.*` when the pod was taken).
    fn set_sysctls(&self) -> anyhow::Result<()> {
        for sysctl in sysctls(&self.pod) {
            let setting = format!(
                "{}={}",
                sysctl["name"].as_str().unwrap_or_default(),
                sysctl["value"].as_str().unwrap_or_default()
            );
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "sysctl", "-w", &setting])
                .output()?;
            if !out.status.success() {
                bail!(
                    "{}/{}: sysctl {setting}: {}",
                    self.ns,
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(())
    }

    /// How long nothing is due.
    fn idle(&self) -> Duration {
        let now = Instant::now();
        self.containers
            .iter()
            .flat_map(|c| c.probes.iter().filter_map(|p| p.next))
            .map(|t| t.saturating_duration_since(now))
            .chain([Duration::from_millis(50)])
            .min()
            .unwrap_or_default()
    }

    /// One round: containers started, restarted and probed as due.
    async fn step(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for c in &mut self.containers {
            if let (Some(child), Some(at)) = (&c.child, c.kill_at)
                && now >= at
            {
                signal(child.id(), nix::sys::signal::Signal::SIGKILL);
            }
        }
        for i in 0..self.containers.len() {
            if let Some(exit) = self.containers[i].running() {
                let c = &mut self.containers[i];
                c.kill_at = None;
                if c.init && !c.sidecar && exit.success() {
                    c.done = true;
                } else {
                    c.backoff_until = Some(now + backoff(c.restarts));
                    c.restarts += 1;
                }
            }
        }
        // The next container in order may start once those before it are done (init) or
        // started (native sidecars); regular containers all start together after them.
        let mut may = true;
        for i in 0..self.containers.len() {
            let c = &self.containers[i];
            let due = c.child.is_none() && !c.done && c.backoff_until.is_none_or(|t| now >= t);
            // A container that ran before is restarted on its own, whatever the others do.
            let again = c.restarts > 0 && (c.sidecar || !c.init);
            if due && (may || again) {
                self.start(i)?;
            }
            let c = &self.containers[i];
            if c.init && !(c.done || (c.sidecar && c.started)) {
                may = false;
            }
        }
        self.probe_due().await
    }

    async fn probe_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut runs = tokio::task::JoinSet::new();
        for (i, c) in self.containers.iter_mut().enumerate() {
            let (Some(pid), Some(since)) = (c.pid(), c.started_at) else {
                continue;
            };
            let started = c.started;
            for (j, p) in c.probes.iter_mut().enumerate() {
                // Liveness and readiness wait for the startup probe.
                if p.kind != Kind::Startup && !started || p.kind == Kind::Startup && started {
                    continue;
                }
                let next = *p.next.get_or_insert(since + p.initial_delay);
                if now < next {
                    continue;
                }
                p.next = Some(now + p.period);
                let check = Check {
                    handler: p.handler.clone(),
                    container: c.spec.clone(),
                    pod_ip: self.ip,
                    pid,
                    timeout: p.timeout,
                };
                runs.spawn(async move { (i, j, check.run().await) });
            }
        }
        while let Some(done) = runs.join_next().await {
            let (i, j, result) = done?;
            self.record(i, j, result);
        }
        Ok(())
    }

    /// A probe's result: thresholds counted, the container started, readied or restarted.
    fn record(&mut self, i: usize, j: usize, result: Result<(), String>) {
        let c = &mut self.containers[i];
        let p = &mut c.probes[j];
        match &result {
            Ok(()) => {
                p.successes += 1;
                p.failures = 0;
            }
            Err(why) => {
                p.failures += 1;
                p.successes = 0;
                self.status.send_modify(|s| {
                    s.last_failure
                        .insert(format!("{}/{}", c.name, p.kind.field()), why.clone());
                });
            }
        }
        let (kind, ok, failed) = (
            p.kind,
            p.successes >= p.success_threshold,
            p.failures >= p.failure_threshold,
        );
        match kind {
            Kind::Startup if ok => c.started = true,
            Kind::Readiness if ok => c.ready = true,
            Kind::Readiness if failed => c.ready = false,
            Kind::Startup | Kind::Liveness if failed => {
                // Restarted: SIGTERM, SIGKILL after the grace period; the next round after it
                // ended starts it again.
                if let Some(child) = &c.child {
                    signal(child.id(), nix::sys::signal::Signal::SIGTERM);
                    let grace = self.pod["spec"]["terminationGracePeriodSeconds"]
                        .as_u64()
                        .unwrap_or(30);
                    c.kill_at = Some(Instant::now() + Duration::from_secs(grace));
                }
                for p in &mut c.probes {
                    p.next = None;
                    p.successes = 0;
                    p.failures = 0;
                }
            }
            _ => {}
        }
    }

    /// Starts container `i`.
    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let env = self.env(i)?;
        let c = &self.containers[i];
        let expand = |s: &Value| expand(s.as_str().unwrap_or_default(), &env);
        let list = |f: &str| -> Vec<String> {
            c.spec[f]
                .as_array()
                .into_iter()
                .flatten()
                .map(expand)
                .collect()
        };
        let (command, args) = (list("command"), list("args"));
        let (program, mut argv): (PathBuf, Vec<String>) = match command.split_first() {
            Some((p, rest)) => (PathBuf::from(p), rest.to_vec()),
            None => {
                let image = c.spec["image"].as_str().unwrap_or_default();
                let p = self.node.images.get(image).with_context(|| {
                    format!("{}.image {image:?}: no program stands for it", c.at)
                })?;
                (p.clone(), Vec::new())
            }
        };
        argv.extend(args);
        let security = |f: &str| {
            c.spec
                .pointer(&format!("/securityContext/{f}"))
                .or_else(|| self.pod.pointer(&format!("/spec/securityContext/{f}")))
                .and_then(Value::as_u64)
        };
        let (uid, gid) = (security("runAsUser"), security("runAsGroup"));
        // The mounts are made in the mount namespace `ip netns exec` gives the process.
        let mut cmd = Command::new("ip");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["netns", "exec", &self.netns, "sh", "-ec"])
            .arg(
                "while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$2\"; \
                 if [ \"$3\" = ro ]; then mount -o remount,bind,ro \"$2\"; fi; shift 3; done; \
                 shift; exec \"$@\"",
            )
            .arg("sh");
        for m in c.spec["volumeMounts"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or_default();
            let host = self
                .volumes
                .get(name)
                .with_context(|| format!("{}.volumeMounts: no volume {name:?}", c.at))?;
            let host = match m["subPath"].as_str() {
                Some(sub) => host.join(sub),
                None => host.clone(),
            };
            let target = m["mountPath"].as_str().unwrap_or_default();
            // The mount point must exist; it is made on the node as an empty directory.
            std::fs::create_dir_all(target)
                .with_context(|| format!("{}.volumeMounts: making {target}", c.at))?;
            cmd.arg(host).arg(target);
            cmd.arg(if m["readOnly"] == true { "ro" } else { "rw" });
        }
        cmd.arg("--");
        if uid.is_some() || gid.is_some() {
            cmd.arg("setpriv");
            if let Some(u) = uid {
                cmd.arg(format!("--reuid={u}"));
            }
            cmd.arg(format!("--regid={}", gid.or(uid).unwrap_or(0)));
            cmd.args(["--clear-groups", "--"]);
        }
        cmd.arg(&program).args(&argv);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&c.log)?;
        cmd.stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("{}: starting {}", c.at, program.display()))?;
        let c = &mut self.containers[i];
        c.child = Some(child);
        c.started_at = Some(Instant::now());
        c.started = !c.probes.iter().any(|p| p.kind == Kind::Startup);
        c.ready = false;
        c.backoff_until = None;
        for p in &mut c.probes {
            p.next = None;
            p.successes = 0;
            p.failures = 0;
        }
        Ok(())
    }

    /// Container `i`'s environment, `$(VAR)` expanded in order, `fieldRef`s and
    /// `resourceFieldRef`s resolved.
    fn env(&self, i: usize) -> anyhow::Result<Vec<(String, String)>> {
        let c = &self.containers[i];
        let mut out: Vec<(String, String)> = Vec::new();
        for (j, e) in c.spec["env"].as_array().into_iter().flatten().enumerate() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = e.get("value") {
                expand(v.as_str().unwrap_or_default(), &out)
            } else if let Some(path) = e
                .pointer("/valueFrom/fieldRef/fieldPath")
                .and_then(Value::as_str)
            {
                match path {
                    "status.podIP" => self.ip.to_string(),
                    "status.hostIP" => self.node.ip.to_string(),
                    "spec.nodeName" => "node".to_owned(),
                    p => self
                        .pod
                        .pointer(&format!("/{}", p.replace('.', "/")))
                        .and_then(Value::as_str)
                        .unwrap_or(if p == "spec.serviceAccountName" {
                            "default"
                        } else {
                            ""
                        })
                        .to_owned(),
                }
            } else if let Some(r) = e.pointer("/valueFrom/resourceFieldRef") {
                let of = r["containerName"].as_str().unwrap_or(&c.name);
                let spec = self
                    .containers
                    .iter()
                    .find(|o| o.name == of)
                    .map(|o| &o.spec)
                    .with_context(|| {
                        format!(
                            "{}.env[{j}].valueFrom.resourceFieldRef.containerName: no container {of:?}",
                            c.at
                        )
                    })?;
                resource_field(spec, r, node_memory())
                    .with_context(|| format!("{}.env[{j}].valueFrom.resourceFieldRef", c.at))?
            } else if e.get("valueFrom").is_some() {
                bail!(
                    "{}.env[{j}].valueFrom: only fieldRef and resourceFieldRef are supported by the kubelet stand-in",
                    c.at
                );
            } else {
                String::new()
            };
            out.retain(|(k, _)| *k != name);
            out.push((name, value));
        }
        Ok(out)
    }

    /// The pod's volumes as directories on the node.
    async fn make_volumes(&mut self) -> anyhow::Result<()> {
        let sa = self.pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let vols = self.pod["spec"]["volumes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (i, v) in vols.iter().enumerate() {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let at = format!("{}/{}: spec.volumes[{i}]", self.ns, self.name);
            let dir = self
                .node
                .dir
                .join(format!("vol.{}.{}.{name}", self.ns, self.name));
            std::fs::create_dir_all(&dir)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            if v.get("emptyDir").is_some() {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
            } else if let Some(cm) = v.get("configMap") {
                if cm.get("items").is_some() {
                    bail!("{at}.configMap.items: not supported by the kubelet stand-in");
                }
                let cm_name = cm["name"].as_str().unwrap_or_default();
                let path = format!("/api/v1/namespaces/{}/configmaps/{cm_name}", self.ns);
                // As the kubelet, wait for the ConfigMap (the controller publishes the root).
                let deadline = Instant::now() + Duration::from_secs(30);
                let data = loop {
                    let found = self.node.api.state().objects.get(&path).cloned();
                    if let Some(o) = found {
                        break o["data"].clone();
                    }
                    if Instant::now() > deadline {
                        bail!("{at}: ConfigMap {}/{cm_name} not there in 30 s", self.ns);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                for (k, v) in data.as_object().into_iter().flatten() {
                    std::fs::write(dir.join(k), v.as_str().unwrap_or_default())?;
                }
            } else if let Some(sources) = v.pointer("/projected/sources").and_then(Value::as_array)
            {
                for (j, s) in sources.iter().enumerate() {
                    let t = s
                        .get("serviceAccountToken")
                        .with_context(|| format!("{at}.projected.sources[{j}]: only serviceAccountToken is supported by the kubelet stand-in"))?;
                    let audience = t["audience"].as_str().unwrap_or_default();
                    let token = (self.node.tokens)(&self.ns, &sa, audience)?;
                    let file = t["path"].as_str().unwrap_or("token");
                    std::fs::write(dir.join(file), token)?;
                    std::fs::set_permissions(
                        dir.join(file),
                        std::fs::Permissions::from_mode(0o644),
                    )?;
                }
            } else {
                bail!(
                    "{at} ({name}): only emptyDir, configMap and projected service account tokens are supported by the kubelet stand-in"
                );
            }
            self.volumes.insert(name, dir);
        }
        Ok(())
    }

    /// Graceful deletion: preStop and SIGTERM, SIGKILL after the grace period; regular
    /// containers first, then native sidecars in reverse order.
    async fn terminate(&mut self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(
            self.pod["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        );
        self.pod["metadata"]["deletionTimestamp"] = json!(rfc3339_now());
        self.pod["metadata"]["deletionGracePeriodSeconds"] = json!(grace.as_secs());
        self.write()?;
        let deadline = Instant::now() + grace;
        // Regular containers, and an init container still running, first.
        let regular: Vec<usize> = (0..self.containers.len())
            .filter(|i| !self.containers[*i].sidecar)
            .collect();
        self.stop(&regular, deadline).await?;
        let sidecars: Vec<usize> = (0..self.containers.len())
            .rev()
            .filter(|i| self.containers[*i].sidecar)
            .collect();
        for i in sidecars {
            // Sidecars get what is left of the grace period, and at least 2 s.
            let at_least = Instant::now() + Duration::from_secs(2);
            self.stop(&[i], deadline.max(at_least)).await?;
        }
        Ok(())
    }

    /// Stops containers `which`: their preStop hooks, SIGTERM, then SIGKILL at `deadline`.
    /// Probes go on until they have ended.
    async fn stop(&mut self, which: &[usize], deadline: Instant) -> anyhow::Result<()> {
        let mut hooks = tokio::task::JoinSet::new();
        for &i in which {
            let c = &self.containers[i];
            let Some(pid) = c.pid() else { continue };
            let hook = c.spec.pointer("/lifecycle/preStop").cloned();
            let check = hook.map(|handler| Check {
                handler,
                container: c.spec.clone(),
                pod_ip: self.ip,
                pid,
                timeout: deadline.saturating_duration_since(Instant::now()),
            });
            hooks.spawn(async move {
                if let Some(check) = check {
                    // A failed hook is logged by the kubelet; the container is stopped anyway.
                    let _ = check.run().await;
                }
                signal(pid, nix::sys::signal::Signal::SIGTERM);
            });
        }
        let mut signalled = false;
        loop {
            for &i in which {
                self.containers[i].running();
            }
            if which.iter().all(|i| self.containers[*i].child.is_none()) {
                hooks.abort_all();
                return Ok(());
            }
            if Instant::now() >= deadline && !signalled {
                for &i in which {
                    if let Some(pid) = self.containers[i].pid() {
                        signal(pid, nix::sys::signal::Signal::SIGKILL);
                    }
                }
                signalled = true;
            }
            self.probe_due().await?;
            self.write()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill_all(&mut self) {
        for c in &mut self.containers {
            if let Some(mut child) = c.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// The pod is gone: its object leaves the API server, and its endpoints their slices.
    fn forget(&mut self) {
        let mut state = self.node.api.state();
        state.delete(&path_of(&self.pod));
        if let Err(e) = crate::endpointslices::sync_platform(&mut state, &self.node.dir) {
            eprintln!("kubelet: the cluster's hosts file: {e}");
        }
    }

    /// Writes the Pod's status when it changed, and the EndpointSlices after it.
    fn write(&mut self) -> anyhow::Result<()> {
        let status = |c: &Container| {
            let state = match (&c.child, c.done) {
                (Some(_), _) => json!({"running": {}}),
                (None, true) => json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
                (None, false) => {
                    json!({"waiting": {"reason": if c.restarts > 0 { "CrashLoopBackOff" } else { "ContainerCreating" }}})
                }
            };
            json!({"name": c.name, "ready": c.ready, "started": c.started,
                "restartCount": c.restarts, "state": state})
        };
        let inits_done = self
            .containers
            .iter()
            .filter(|c| c.init)
            .all(|c| c.done || (c.sidecar && c.started));
        let ready = inits_done
            && self
                .containers
                .iter()
                .filter(|c| !c.init || c.sidecar)
                .all(|c| c.child.is_some() && c.ready_or_started());
        let running = inits_done
            && self
                .containers
                .iter()
                .filter(|c| !c.init)
                .all(|c| c.child.is_some());
        let cond =
            |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        let mut pod = self.pod.clone();
        pod["status"] = json!({
            "phase": if running || !self.pod["metadata"]["deletionTimestamp"].is_null() { "Running" } else { "Pending" },
            "hostIP": self.node.ip.to_string(),
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "conditions": [cond("Initialized", inits_done), cond("ContainersReady", ready), cond("Ready", ready)],
            "initContainerStatuses": self.containers.iter().filter(|c| c.init).map(status).collect::<Vec<_>>(),
            "containerStatuses": self.containers.iter().filter(|c| !c.init).map(status).collect::<Vec<_>>(),
        });
        // The API server first: whoever sees the new status finds it there.
        if pod != self.written {
            let mut state = self.node.api.state();
            state.put(pod.clone());
            crate::endpointslices::sync_platform(&mut state, &self.node.dir)
                .context("the cluster's hosts file")?;
            self.written = pod;
        }
        self.status.send_if_modified(|s| {
            let restarts = self
                .containers
                .iter()
                .map(|c| (c.name.clone(), c.restarts))
                .collect();
            let new = Status {
                ready,
                restarts,
                last_failure: s.last_failure.clone(),
            };
            let changed = *s != new;
            *s = new;
            changed
        });
        Ok(())
    }
}

impl Container {
    /// Ready by its readiness probe, or, without one, once started.
    fn ready_or_started(&self) -> bool {
        if self.probes.iter().any(|p| p.kind == Kind::Readiness) {
            self.ready
        } else {
            self.started
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `$(VAR)` replaced by VAR's value when `env` has it, `$$` kept as one `$`, as the kubelet
/// expands `command`, `args` and `env` values.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(close) = tail.strip_prefix("$(").and_then(|t| t.find(')')) {
            let name = &tail[2..2 + close];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..3 + close]),
            }
            rest = &tail[3 + close..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A probe or hook to run against a container.
struct Check {
    handler: Value,
    container: Value,
    pod_ip: Ipv4Addr,
    pid: u32,
    timeout: Duration,
}

impl Check {
    async fn run(self) -> Result<(), String> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.handle()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {timeout:?}")),
        }
    }

    fn port(&self, v: &Value) -> Result<u16, String> {
        match v {
            Value::Number(n) => n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or(format!("port {n}")),
            Value::String(name) => self.container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .ok_or(format!("no container port named {name:?}")),
            other => Err(format!("port {other}")),
        }
    }

    async fn handle(&self) -> Result<(), String> {
        let h = &self.handler;
        if let Some(g) = h.get("httpGet") {
            if g["scheme"].as_str().is_some_and(|s| s != "HTTP") {
                return Err(format!(
                    "httpGet scheme {}: the kubelet stand-in sends HTTP only",
                    g["scheme"]
                ));
            }
            let host = g["host"].as_str().filter(|h| !h.is_empty());
            let ip: std::net::IpAddr = match host {
                Some(h) => h.parse().map_err(|_| format!("httpGet host {h:?}"))?,
                None => self.pod_ip.into(),
            };
            let addr = SocketAddr::new(ip, self.port(&g["port"])?);
            let path = g["path"].as_str().unwrap_or("/");
            let headers: Vec<(String, String)> = g["httpHeaders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| {
                    (
                        h["name"].as_str().unwrap_or_default().to_owned(),
                        h["value"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            let status = http_get(addr, path, &headers).await?;
            return if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {path}: {status}"))
            };
        }
        if let Some(t) = h.get("tcpSocket") {
            let addr = SocketAddr::new(self.pod_ip.into(), self.port(&t["port"])?);
            return tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}"));
        }
        if let Some(e) = h.get("exec") {
            let command: Vec<&str> = e["command"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            // In the container's namespaces, as its user.
            let mut cmd = tokio::process::Command::new("nsenter");
            cmd.args([
                "-t",
                &self.pid.to_string(),
                "-m",
                "-n",
                "-S",
                "follow",
                "-G",
                "follow",
                "--",
            ])
            .args(&command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
            let status = cmd
                .status()
                .await
                .map_err(|e| format!("exec {command:?}: {e}"))?;
            return if status.success() {
                Ok(())
            } else {
                Err(format!("exec {command:?}: {status}"))
            };
        }
        if let Some(s) = h.get("sleep") {
            let secs = s["seconds"]
                .as_u64()
                .ok_or("sleep.seconds is not a number")?;
            tokio::time::sleep(Duration::from_secs(secs)).await;
            return Ok(());
        }
        Err(format!(
            "{h}: the kubelet stand-in runs httpGet, tcpSocket, exec and sleep handlers only"
        ))
    }
}

/// A kubelet-style GET: HTTP/1.1, `User-Agent: kube-probe`, the body read and dropped.
async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .header("user-agent", "kube-probe/1.31")
        .header("accept", "*/*");
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tx
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"));
    let out = match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e),
    };
    conn.abort();
    out
}

/// The node's allocatable memory, which the downward API gives for a memory limit not set:
/// this machine's.
fn node_memory() -> u64 {
    mesh_proxy::overload::proc_kb("/proc/meminfo", "MemTotal").unwrap_or(u64::MAX)
}

/// A `resourceFieldRef` of the downward API for a container of spec `spec`, as the kubelet
/// resolves it: `limits.memory` or `requests.memory` in bytes, divided by `divisor` (1 by
/// default) and rounded up; a limit not set is the node's allocatable memory (`node`), a
/// request not set its limit, or 0 without one. CPU and ephemeral storage are refused by name.
fn resource_field(spec: &Value, r: &Value, node: u64) -> anyhow::Result<String> {
    let resource = r["resource"].as_str().unwrap_or_default();
    let (kind, what) = resource
        .split_once('.')
        .filter(|(k, w)| matches!(*k, "limits" | "requests") && *w == "memory")
        .with_context(|| {
            format!("resource {resource:?}: the kubelet stand-in resolves limits.memory and requests.memory only")
        })?;
    let set = |kind: &str| {
        spec.pointer(&format!("/resources/{kind}/{what}"))
            .and_then(Value::as_str)
            .map(|q| quantity(q).with_context(|| format!("resources.{kind}.{what}: {q:?}")))
            .transpose()
    };
    let bytes = match (kind, set("limits")?, set("requests")?) {
        ("requests", _, Some(r)) | ("requests", Some(r), None) | ("limits", Some(r), _) => r,
        // The kubelet fills in a limit not set, not a request.
        ("requests", None, None) => 0,
        _ => u128::from(node),
    };
    let divisor = match r["divisor"].as_str() {
        Some(d) => quantity(d).with_context(|| format!("divisor {d:?}"))?,
        None => 1,
    };
    anyhow::ensure!(
        divisor > 0,
        "divisor {:?}: must be more than 0",
        r["divisor"]
    );
    Ok(bytes.div_ceil(divisor).to_string())
}

/// A Kubernetes quantity (`128Mi`, `1G`, `0.5Gi`, `1e3`, `1000`) as a whole number, rounded
/// up.
fn quantity(q: &str) -> anyhow::Result<u128> {
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    // A decimal exponent (`1e3`, `5E-1`): a power of ten to multiply or divide by.
    let exponent = suffix
        .strip_prefix(['e', 'E'])
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.parse::<i32>()
                .with_context(|| format!("exponent {e:?} is not a whole number"))
        })
        .transpose()?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    anyhow::ensure!(
        !whole.is_empty() || !fraction.is_empty(),
        "no number before {suffix:?}"
    );
    let mantissa: u128 = format!("{whole}{fraction}")
        .parse()
        .with_context(|| format!("{number:?} is not a number"))?;
    let mut scale = 10u128
        .checked_pow(u32::try_from(fraction.len())?)
        .context("too many decimals")?;
    let multiplier: u128 = match (suffix, exponent) {
        (_, Some(e)) if e >= 0 => 10u128
            .checked_pow(e.unsigned_abs())
            .context("exponent too large")?,
        (_, Some(e)) => {
            scale = scale
                .checked_mul(
                    10u128
                        .checked_pow(e.unsigned_abs())
                        .context("exponent too small")?,
                )
                .context("exponent too small")?;
            1
        }
        ("", None) => 1,
        // Fractions of a unit, rounded up in the end.
        ("m" | "u" | "n", None) => {
            let digits = match suffix {
                "m" => 3,
                "u" => 6,
                _ => 9,
            };
            scale = scale
                .checked_mul(10u128.pow(digits))
                .context("too many decimals")?;
            1
        }
        ("k", None) => 1_000,
        ("M", None) => 1_000_000,
        ("G", None) => 1_000_000_000,
        ("T", None) => 1_000_000_000_000,
        ("P", None) => 1_000_000_000_000_000,
        ("E", None) => 1_000_000_000_000_000_000,
        ("Ki", None) => 1 << 10,
        ("Mi", None) => 1 << 20,
        ("Gi", None) => 1 << 30,
        ("Ti", None) => 1 << 40,
        ("Pi", None) => 1 << 50,
        ("Ei", None) => 1 << 60,
        (other, None) => {
            bail!("suffix {other:?}: not one of n u m k M G T P E Ki Mi Gi Ti Pi Ei or an exponent")
        }
    };
    let scaled = mantissa.checked_mul(multiplier).context("too large")?;
    Ok(scaled.div_ceil(scale))
}

/// Where a test finds a pod's container log.
pub fn log_of(dir: &Path, ns: &str, pod: &str, container: &str) -> PathBuf {
    dir.join(format!("{ns}.{pod}.{container}.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_as_the_kubelet_does() {
        let env = vec![
            ("POD_NAME".to_owned(), "web-0".to_owned()),
            ("NS".to_owned(), "shop".to_owned()),
        ];
        assert_eq!(expand("$(NS)/$(POD_NAME)", &env), "shop/web-0");
        assert_eq!(
            expand("$(MISSING) $$(NS) $x $", &env),
            "$(MISSING) $(NS) $x $"
        );
        assert_eq!(expand("a$(NS", &env), "a$(NS");
    }

    #[test]
    fn resolves_memory_as_the_downward_api_does() -> anyhow::Result<()> {
        let spec = serde_json::json!({"resources": {"limits": {"memory": "128Mi"}}});
        let field = |resource: &str, divisor: Option<&str>| {
            let mut r = serde_json::json!({"resource": resource});
            if let Some(d) = divisor {
                r["divisor"] = d.into();
            }
            resource_field(&spec, &r, 8 << 30)
        };
        assert_eq!(field("limits.memory", None)?, "134217728");
        assert_eq!(field("limits.memory", Some("1Mi"))?, "128");
        assert_eq!(field("limits.memory", Some("1G"))?, "1", "rounded up");
        // A request not set is its limit; a limit not set the node's memory.
        assert_eq!(field("requests.memory", None)?, "134217728");
        let none = serde_json::json!({});
        let r = serde_json::json!({"resource": "limits.memory"});
        assert_eq!(
            resource_field(&none, &r, 8 << 30)?,
            (8u64 << 30).to_string()
        );
        let r = serde_json::json!({"resource": "requests.memory"});
        assert_eq!(resource_field(&none, &r, 8 << 30)?, "0");
        assert_eq!(quantity("128m")?, 1, "0.128 bytes, rounded up");
        assert_eq!(quantity("1500m")?, 2);
        let cpu = field("limits.cpu", None).expect_err("cpu");
        assert!(cpu.to_string().contains("limits.cpu"), "{cpu}");
        assert_eq!(quantity("0.5Gi")?, 1 << 29);
        assert_eq!(quantity("1.5")?, 2);
        assert_eq!(quantity("1e3")?, 1000);
        assert_eq!(quantity("15E-1")?, 2);
        assert_eq!(quantity("1E")?, 1_000_000_000_000_000_000, "exa");
        assert!(quantity("Mi").is_err());
        assert!(quantity("1XB").is_err());
        Ok(())
    }

    #[test]
    fn back_off_doubles_to_five_minutes() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(2), Duration::from_secs(20));
        assert_eq!(backoff(9), Duration::from_secs(300));
    }
}
