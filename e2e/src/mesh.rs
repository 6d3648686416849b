//! A local mesh in this process: the real controller watching a temporary directory of
//! manifests, and real `mesh-proxy` instances on ephemeral 127.0.0.1 ports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_controller::run::Controller;
use mesh_proxy::Proxy;
use mesh_proxy::state::Snapshot;

use crate::{eventually, write_atomic};

#[derive(Debug)]
pub struct LocalMesh {
    pub controller: Controller,
    pub dir: tempfile::TempDir,
    pub config_dir: PathBuf,
}

impl LocalMesh {
    /// Starts a controller on an empty manifest directory.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`LocalMesh::start`], with the controller's settings changed by `tweak`.
    pub async fn start_with(
        tweak: impl FnOnce(&mut mesh_controller::config::Config),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config_dir = dir.path().join("config");
        std::fs::create_dir(&config_dir)?;
        let mut config = mesh_controller::config::Config::local(&config_dir);
        tweak(&mut config);
        let controller = Controller::start(config).await?;
        Ok(Self {
            controller,
            dir,
            config_dir,
        })
    }

    /// A controller on the `reviews` Service and its two versions, whose endpoints are at
    /// `v1` and `v2` on loopback (`reviews.yaml`); with `route`, the `reviews` HTTPRoute
    /// splitting v1/v2 by those weights (`route.yaml`).
    pub async fn reviews(
        v1: std::net::SocketAddr,
        v2: std::net::SocketAddr,
        route: Option<(u32, u32)>,
    ) -> anyhow::Result<Self> {
        let mesh = Self::start().await?;
        mesh.write(
            "reviews.yaml",
            &crate::reviews_manifests(v1.port(), v2.port()),
        )?;
        if let Some((w1, w2)) = route {
            mesh.write("route.yaml", &crate::reviews_route(w1, w2))?;
        }
        Ok(mesh)
    }

    /// Writes (or replaces) one manifest file.
    pub fn write(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        write_atomic(&self.config_dir.join(file), yaml)
    }

    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.config_dir.join(file))?)
    }

    /// Settings for a proxy of pod `<ns>/<name>` talking to this controller.
    pub fn proxy_config(&self, node: &str) -> mesh_proxy::Config {
        mesh_proxy::Config::local(self.controller.xds_addr, node)
    }

    /// Starts a proxy and waits for its first complete config.
    pub async fn proxy(&self, config: mesh_proxy::Config) -> anyhow::Result<Proxy> {
        let node = config.node.clone();
        let proxy = Proxy::start(config, None)
            .await
            .with_context(|| format!("starting proxy {node}"))?;
        tokio::time::timeout(Duration::from_secs(10), proxy.store.ready())
            .await
            .with_context(|| format!("proxy {node} got no complete config in 10 s"))?;
        if let Some(tls) = &proxy.tls {
            crate::identity::wait_for_svid(&tls.identity, &format!("proxy {node}")).await?;
        }
        Ok(proxy)
    }
}

/// Waits until the proxy runs a config for which `check` holds.
pub async fn wait_config(
    proxy: &Proxy,
    what: &str,
    check: impl Fn(&Snapshot) -> bool,
) -> anyhow::Result<Arc<Snapshot>> {
    eventually(Duration::from_secs(5), what, || {
        let s = proxy.store.load().filter(|s| check(s));
        async move { s }
    })
    .await
}

/// The pair's namespace `default`: in mTLS `mode` if given, and naming `echo` in
/// `mesh.dev/dependencies`, so that the client's proxy (scoped, as transparent ones are by
/// default) holds echo's config before its first connection.
pub fn pair_namespace(mode: Option<&str>) -> String {
    let labels = mode
        .map(|m| format!(", labels: {{mesh.dev/mtls-mode: {m}}}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default{labels}, annotations: {{mesh.dev/dependencies: echo}}}}\n"
    )
}

/// A client pod and a server pod, each with a transparent proxy, run without iptables: the
/// client proxy treats every outbound connection as sent to the Service's VIP:80, the server
/// proxy every inbound one as sent to the app's port, and the EndpointSlice lists the server
/// proxy's inbound listener. Traffic crosses both proxies as it would between two pods.
#[derive(Debug)]
pub struct SidecarPair {
    pub client: Proxy,
    pub server: Proxy,
    /// Where the app in the client pod connects (its proxy's outbound listener).
    pub outbound: std::net::SocketAddr,
}

/// The Service VIP and port [`SidecarPair`] uses.
pub const PAIR_VIP: &str = "10.96.1.1";

/// How [`LocalMesh::sidecar_pair_with`] sets up the pair.
#[derive(Default)]
pub struct PairOptions<'a> {
    pub port_name: &'a str,
    pub app_protocol: Option<&'a str>,
    pub app_port: u16,
    /// Both proxies get identities from this CA: the server's pod runs as service account
    /// `echo`, the client as `client`. Without it both run with identity off.
    pub ca: Option<&'a crate::identity::TestCa>,
    /// The service account the server proxy claims, when it should not be its pod's (`echo`).
    pub server_sa: Option<&'a str>,
    /// `mesh.dev/mtls-mode` of the namespace (`STRICT`, `PERMISSIVE`).
    pub mtls_mode: Option<&'a str>,
    /// Settings both proxies get on top (tracing, access logs).
    pub tweak: Option<&'a dyn Fn(&mut mesh_proxy::Config)>,
}

impl std::fmt::Debug for PairOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairOptions")
            .field("port_name", &self.port_name)
            .field("app_port", &self.app_port)
            .field("mtls_mode", &self.mtls_mode)
            .finish_non_exhaustive()
    }
}

impl LocalMesh {
    /// Service `echo` (port 80 named `port_name`, with `app_protocol` if given) in front of one
    /// pod whose app listens on `127.0.0.1:<app_port>`. The pod is labelled as running
    /// mesh-proxy, so its declared HTTP/1 ports are reached over HTTP/2 between the proxies.
    pub async fn sidecar_pair(
        &self,
        port_name: &str,
        app_protocol: Option<&str>,
        app_port: u16,
    ) -> anyhow::Result<SidecarPair> {
        self.sidecar_pair_with(PairOptions {
            port_name,
            app_protocol,
            app_port,
            ..Default::default()
        })
        .await
    }

    pub async fn sidecar_pair_with(&self, o: PairOptions<'_>) -> anyhow::Result<SidecarPair> {
        let (port_name, app_protocol, app_port) = (o.port_name, o.app_protocol, o.app_port);
        self.write("namespace.yaml", &pair_namespace(o.mtls_mode))?;
        let app: std::net::SocketAddr = format!("127.0.0.1:{app_port}").parse()?;
        let mut sc = self.proxy_config("default/echo-0");
        sc.transparent = true;
        sc.inbound_orig_dst = Some(app);
        if let Some(ca) = o.ca {
            ca.identify(&mut sc, o.server_sa.unwrap_or("echo"))?;
        }
        sc.workload = Some("echo".into());
        if let Some(tweak) = o.tweak {
            tweak(&mut sc);
        }
        let server = self.proxy(sc).await?;
        let inbound = server
            .inbound_addr
            .context("server proxy has an inbound listener")?;
        self.write(
            "echo.yaml",
            &echo_manifests(port_name, app_protocol, app_port, inbound.port()),
        )?;
        let client = self
            .pair_client("client", Some("client"), o.ca, o.tweak)
            .await?;
        let outbound = client
            .outbound_addr
            .context("client proxy has an outbound listener")?;
        wait_config(&server, "the server proxy to know its inbound port", |s| {
            s.listeners
                .get(mesh_api::consts::xds::INBOUND_LISTENER)
                .is_some_and(|l| l.chains.iter().any(|c| c.port == Some(app_port)))
        })
        .await?;
        Ok(SidecarPair {
            client,
            server,
            outbound,
        })
    }
}

impl LocalMesh {
    /// A client pod `<sa>-0` of the pair's echo Service with a transparent proxy that sends
    /// every outbound connection to the VIP:80, running as service account `sa` (with an
    /// identity from `ca`, if any): ready once it knows echo's VIP and endpoint.
    pub async fn pair_client(
        &self,
        sa: &str,
        workload: Option<&str>,
        ca: Option<&crate::identity::TestCa>,
        tweak: Option<&dyn Fn(&mut mesh_proxy::Config)>,
    ) -> anyhow::Result<Proxy> {
        let mut cc = self.proxy_config(&format!("default/{sa}-0"));
        cc.transparent = true;
        cc.outbound_orig_dst = Some(format!("{PAIR_VIP}:80").parse()?);
        if let Some(ca) = ca {
            ca.identify(&mut cc, sa)?;
        }
        cc.workload = workload.map(Into::into);
        if let Some(tweak) = tweak {
            tweak(&mut cc);
        }
        let client = self.proxy(cc).await?;
        wait_config(
            &client,
            "the client proxy to know echo's VIP and endpoint",
            |s| {
                s.listeners
                    .get(mesh_api::consts::xds::OUTBOUND_LISTENER)
                    .is_some_and(|l| l.chains.iter().any(|c| c.port == Some(80)))
                    && s.clusters
                        .values()
                        .any(|c| c.name.contains("echo.default") && !c.endpoints.is_empty())
            },
        )
        .await?;
        Ok(client)
    }
}

/// Service `echo` (port 80 named `port_name`, with `app_protocol` if given) whose one pod,
/// `echo-0`, runs its app on `app_port` behind a mesh-proxy whose inbound listener is at
/// `127.0.0.1:<inbound_port>`.
pub fn echo_manifests(
    port_name: &str,
    app_protocol: Option<&str>,
    app_port: u16,
    inbound_port: u16,
) -> String {
    let app_protocol = app_protocol
        .map(|p| format!(", appProtocol: {p}"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  clusterIP: {PAIR_VIP}
  selector: {{app: echo}}
  ports: [{{name: {port_name}, port: 80, targetPort: {app_port}, protocol: TCP{app_protocol}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-0, generateName: echo-, namespace: default, labels: {{app: echo, mesh.dev/proxy: 'true'}}}}
spec: {{serviceAccountName: echo, containers: [{{name: app, ports: [{{containerPort: {app_port}}}]}}]}}
status: {{podIP: 127.0.0.1}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-1, namespace: default, labels: {{kubernetes.io/service-name: echo}}}}
addressType: IPv4
ports: [{{name: {port_name}, port: {inbound_port}, protocol: TCP}}]
endpoints: [{{addresses: ['127.0.0.1'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: echo-0, namespace: default}}}}]
"
    )
}

/// A [`SidecarPair`] in front of `app`'s HTTP port, both proxies with identities from `ca`,
/// in the mTLS `mode` (`STRICT`, `PERMISSIVE`).
pub async fn secure_pair(
    mesh: &LocalMesh,
    ca: &crate::identity::TestCa,
    app: &crate::servers::EchoServer,
    mode: &str,
) -> anyhow::Result<SidecarPair> {
    mesh.sidecar_pair_with(PairOptions {
        port_name: "http",
        app_port: app.addr.port(),
        ca: Some(ca),
        mtls_mode: Some(mode),
        ..Default::default()
    })
    .await
}

/// A mesh-proxy run as its own process, so that the memory it holds can be read apart from
/// the test's; killed when dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    pub peer: crate::Peer,
    pub pid: u32,
    pub admin: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
}

impl ProxyProcess {
    /// Runs `mesh-proxy <args>` with its admin and metrics listeners on free loopback ports
    /// and its output in `log`; waits (up to 20 s) until it says it is ready.
    pub async fn start(args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
        let mut cmd = tokio::process::Command::new(crate::netns::binary("mesh-proxy")?);
        cmd.args(args)
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()]);
        let peer = crate::Peer::spawn(&mut cmd, log)?;
        let pid = peer.child.id().context("mesh-proxy exited at once")?;
        let ready = eventually(
            Duration::from_secs(20),
            "mesh-proxy to be ready",
            || async {
                crate::http_get(admin, "/ready")
                    .await
                    .filter(|(s, _)| *s == 200)
            },
        )
        .await;
        if let Err(e) = ready {
            anyhow::bail!("{e}\nmesh-proxy {args:?}:\n{}", peer.log_text());
        }
        Ok(Self {
            peer,
            pid,
            admin,
            metrics,
        })
    }

    /// The process's resident memory, in bytes; an error (with its log) once it has exited.
    pub fn resident_bytes(&self) -> anyhow::Result<u64> {
        mesh_proxy::overload::resident_bytes_of(self.pid).with_context(|| {
            format!(
                "mesh-proxy (pid {}) is gone:\n{}",
                self.pid,
                self.peer.log_text()
            )
        })
    }
}

/// The [`SidecarPair`] with both proxies in processes of their own, in mTLS mode STRICT
/// with identities from `ca`, in front of the app on `127.0.0.1:<app_port>`.
#[derive(Debug)]
pub struct ProcessPair {
    pub client: ProxyProcess,
    pub server: ProxyProcess,
    /// The client pod's outbound listener, where its app connects.
    pub outbound: std::net::SocketAddr,
    /// The server pod's inbound listener, where other pods' proxies connect.
    pub inbound: std::net::SocketAddr,
}

impl LocalMesh {
    /// Starts a [`ProcessPair`]; `extra` flags go to both proxies. Ready once a request
    /// crosses both.
    pub async fn process_pair(
        &self,
        ca: &crate::identity::TestCa,
        app_port: u16,
        extra: &[&str],
    ) -> anyhow::Result<ProcessPair> {
        let loopback = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let inbound = loopback(crate::free_port());
        let outbound = loopback(crate::free_port());
        self.write("namespace.yaml", &pair_namespace(Some("STRICT")))?;
        self.write(
            "echo.yaml",
            &echo_manifests("http", None, app_port, inbound.port()),
        )?;
        let args = |pod: &str, sa: &str| -> anyhow::Result<Vec<String>> {
            let mut a: Vec<String> = [
                "--xds",
                &self.controller.xds_addr.to_string(),
                "--node",
                &format!("default/{pod}"),
                "--transparent",
                "true",
                "--service-account",
                sa,
                "--workload",
                sa,
                "--ca-addr",
                &ca.addr().to_string(),
                "--ca-root",
                &ca.path("ca.crt").display().to_string(),
                "--ca-token-file",
                &ca.token_file("default", sa)?.display().to_string(),
                "--outbound-http-addr",
                &loopback(crate::free_port()).to_string(),
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            a.extend(extra.iter().map(ToString::to_string));
            Ok(a)
        };
        let mut server_args = args("echo-0", "echo")?;
        server_args.extend([
            "--inbound-addr".into(),
            inbound.to_string(),
            "--inbound-orig-dst".into(),
            loopback(app_port).to_string(),
            "--outbound-addr".into(),
            loopback(crate::free_port()).to_string(),
        ]);
        let server = ProxyProcess::start(&server_args, self.dir.path().join("server.log")).await?;
        let mut client_args = args("client-0", "client")?;
        client_args.extend([
            "--outbound-addr".into(),
            outbound.to_string(),
            "--outbound-orig-dst".into(),
            format!("{PAIR_VIP}:80"),
            "--inbound-addr".into(),
            loopback(crate::free_port()).to_string(),
        ]);
        let client = ProxyProcess::start(&client_args, self.dir.path().join("client.log")).await?;
        let crossed = eventually(
            Duration::from_secs(20),
            "a request across the pair",
            || async {
                crate::ProxyClient::new(outbound)
                    .get("echo", "/", &[])
                    .await
                    .ok()
                    .filter(|(s, _)| *s == 200)
            },
        )
        .await;
        if let Err(e) = crossed {
            anyhow::bail!(
                "{e}\nclient proxy:\n{}\nserver proxy:\n{}",
                client.peer.log_text(),
                server.peer.log_text()
            );
        }
        Ok(ProcessPair {
            client,
            server,
            outbound,
            inbound,
        })
    }
}

/// A controller on its own runtime, so that killing it drops every task and socket it has at
/// once, as a crashed process would.
#[derive(Debug)]
pub struct KillableController {
    pub xds_addr: std::net::SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl KillableController {
    /// Starts on `xds_addr` (port 0: any) watching `config_dir`.
    pub fn start(
        config_dir: &std::path::Path,
        xds_addr: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let mut config = mesh_controller::config::Config::local(config_dir);
        config.xds_addr = xds_addr;
        let (rt, xds_addr) = crate::own_runtime(Controller::start(config), |c| c.xds_addr)?;
        Ok(Self {
            xds_addr,
            rt: Some(rt),
        })
    }

    /// Drops everything at once: listener, streams, tasks.
    pub fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for KillableController {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Open-loop load at a fixed rate through an explicit HTTP proxy, counting outcomes.
#[derive(Debug)]
pub struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<std::collections::BTreeMap<String, u64>>>,
}

impl Load {
    /// `rate` requests per second spread over `workers` connections, `GET http://<host>/`.
    pub fn start(proxy: std::net::SocketAddr, host: &str, rate: u32, workers: u32) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
        let tasks = (0..workers)
            .map(|i| {
                let (host, rx) = (host.to_string(), rx.clone());
                tokio::spawn(async move {
                    let mut out = std::collections::BTreeMap::new();
                    let mut client = crate::ProxyClient::new(proxy);
                    // Stagger the workers over one period.
                    tokio::time::sleep(period.mul_f64(f64::from(i) / f64::from(workers))).await;
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    while !*rx.borrow() {
                        tick.tick().await;
                        let key = match client.get(&host, "/", &[]).await {
                            Ok((200, body)) => body,
                            Ok((status, body)) => format!("status {status}: {}", body.trim()),
                            Err(e) => format!("error: {e}"),
                        };
                        *out.entry(key).or_insert(0) += 1;
                    }
                    out
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops and returns the count of each outcome (a backend's name, or the failure).
    pub async fn finish(self) -> std::collections::BTreeMap<String, u64> {
        self.stop.send_replace(true);
        let mut all = std::collections::BTreeMap::new();
        for t in self.tasks {
            if let Ok(m) = t.await {
                for (k, v) in m {
                    *all.entry(k).or_insert(0) += v;
                }
            }
        }
        all
    }
}

/// Outcomes that are not a backend's name.
pub fn failures(outcomes: &std::collections::BTreeMap<String, u64>) -> u64 {
    outcomes
        .iter()
        .filter(|(k, _)| k.starts_with("status ") || k.starts_with("error"))
        .map(|(_, v)| v)
        .sum()
}
