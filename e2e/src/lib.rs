//! Harness for end-to-end and interop tests: in-process HTTP backends, a small HTTP/1.1 client
//! that talks through a proxy, and helpers to find and run peers (Envoy, Python gRPC).

pub mod authz;
pub mod cluster;
pub mod dns;
pub mod endpointslices;
pub mod h2;
pub mod identity;
pub mod kind;
pub mod kubelet;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod servers;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Reports a measured figure: on stderr, and appended to `<target dir>/e2e-figures.txt`,
/// which `scripts/test` prints after the tests (a passing test's stderr is not shown).
pub fn figure(line: &str) {
    use std::io::Write;
    eprintln!("{line}");
    let dir = target_dir();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("e2e-figures.txt"))
    {
        // One write: suites in other processes append to the same file at the same time.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// Bytes in MiB, for figures.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The `p` quantile (0 to 1) of `v`, nearest rank; NaN for none.
pub fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// A process's resident memory in MiB (`VmRSS`), 0 once it is gone, for figures.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The target directory the tests run from (`<target>/debug/deps/<test>`), for files a
/// person may want to look at after the run.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
}

/// The workspace root (this crate lives in `<root>/e2e`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Finds a peer program: `$env_var`, else `<root>/.venv/bin/<name>`. Without it the test is
/// skipped, unless `MESH_REQUIRE_PEERS` is set (as `.ci/run` and `scripts/test` do), in which
/// case it fails.
pub fn peer(env_var: &str, name: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env_var)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin").join(name));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("MESH_REQUIRE_PEERS").is_none(),
        "{name} not found at {} (set {env_var}, or run scripts/test which installs it)",
        path.display()
    );
    eprintln!(
        "SKIPPED: {name} not found at {}; run scripts/test to install peers",
        path.display()
    );
    None
}

/// Finds a system program on `PATH` (curl, h2load); skipped or failing like [`peer`].
pub fn system_peer(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_some() {
        return found;
    }
    assert!(
        std::env::var_os("MESH_REQUIRE_PEERS").is_none(),
        "{name} not found on PATH (scripts/install-peers installs it)"
    );
    eprintln!("SKIPPED: {name} not found on PATH; run scripts/test which installs it");
    None
}

/// Runs a program to completion with a deadline; returns stdout, stderr and success.
pub async fn run_peer(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<(String, String, bool)> {
    let mut cmd = Command::new(program);
    cmd.args(args).kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| {
            format!(
                "{} {args:?} did not finish in {timeout:?}",
                program.display()
            )
        })?
        .with_context(|| format!("running {}", program.display()))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    ))
}

/// A port free right now on 127.0.0.1, and not handed out before by this process. The kernel
/// may give a port it just released again, so a caller that takes several before binding any
/// could get one twice (a proxy's metrics and inbound listeners once were given the same).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("an ephemeral port");
        if given.insert(port) {
            return port;
        }
    }
}

/// An HTTP/1.1 server that answers every request with its name, counting requests.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Backend {
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let (n, h) = (name.to_string(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (n, h) = (n.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let body = Full::new(Bytes::from(n.clone()));
                        async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(body)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            name: name.to_string(),
            addr,
            hits,
            task: Arc::new(task),
        })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

/// An HTTP/1.1 client that sends absolute-form requests through an HTTP proxy, reusing one
/// connection and reconnecting when it closes.
#[derive(Debug)]
pub struct ProxyClient {
    proxy: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl ProxyClient {
    pub fn new(proxy: SocketAddr) -> Self {
        Self {
            proxy,
            sender: None,
        }
    }

    /// `GET http://<host><path>` with extra headers; returns status and body.
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, String)> {
        let (status, _, body) = self.get_full(host, path, headers).await?;
        Ok((status, body))
    }

    /// Like [`ProxyClient::get`], with the response headers.
    pub async fn get_full(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(u16, http::HeaderMap, String)> {
        self.send("GET", host, path, headers, Bytes::new()).await
    }

    /// Any request, with a body; returns status, response headers and body.
    pub async fn send(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(u16, http::HeaderMap, String)> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.proxy)
                .await
                .with_context(|| format!("connecting to proxy {}", self.proxy))?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            bail!("no connection")
        };
        sender.ready().await?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{host}{path}"))
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = match sender.send_request(req.body(Full::new(body))?).await {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let status = resp.status().as_u16();
        let head = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, head, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A child process killed when dropped, with its output in a file for post-mortems.
#[derive(Debug)]
pub struct Peer {
    pub child: Child,
    pub log: PathBuf,
}

impl Peer {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Self { child, log })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts Envoy (`bin`) with `bootstrap` (written to `dir/envoy.yaml`, its log to
/// `dir/envoy.log`), one worker, and waits up to 30 s until its admin at `admin` says ready;
/// the error carries Envoy's log.
pub async fn start_envoy(
    bin: &Path,
    bootstrap: &serde_json::Value,
    dir: &Path,
    admin: SocketAddr,
) -> anyhow::Result<Peer> {
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, serde_norway::to_string(bootstrap)?)?;
    let envoy = Peer::spawn(
        Command::new(bin).arg("-c").arg(&file).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "warning",
        ]),
        dir.join("envoy.log"),
    )?;
    if let Err(e) = eventually(Duration::from_secs(30), "Envoy to be ready", || async {
        http_get(admin, "/ready").await.filter(|(s, _)| *s == 200)
    })
    .await
    {
        bail!("{e}\nEnvoy log:\n{}", envoy.log_text());
    }
    Ok(envoy)
}

/// Polls `check` every 10 ms until it returns `Some` or `timeout` passes. For peers in other
/// processes, whose state can only be observed from outside.
/// `check` may borrow what it captures for the future it returns (`async || client.get()`).
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes `request` as raw bytes (so nothing normalizes it on the way), reads until the
/// connection closes, and returns the response's status code, or 0 when it closed without one.
pub async fn raw_exchange<S>(mut s: S, request: &str) -> anyhow::Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .context("no answer in 5 s")??;
    Ok(String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Fetches a path from an HTTP server with a fresh connection; `None` on any failure.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get_with_token(addr, path, None).await
}

/// [`http_get`] with `Authorization: Bearer <token>` when a token is given.
pub async fn http_get_with_token(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header("host", addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::new())).ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Services `reviews`, `reviews-v1` and `reviews-v2` (port 9080), and EndpointSlices putting
/// v1 and v2 at `127.0.0.1:<v1_port>` and `127.0.0.1:<v2_port>`.
pub fn reviews_manifests(v1_port: u16, v2_port: u16) -> String {
    use mesh_controller::testing::{service_yaml, slice_yaml};
    [
        service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
        service_yaml("default", "reviews-v1", "10.96.0.11", &[("http", 9080)]),
        service_yaml("default", "reviews-v2", "10.96.0.12", &[("http", 9080)]),
        slice_yaml("default", "reviews-v1", "http", v1_port, &["127.0.0.1"]),
        slice_yaml("default", "reviews-v2", "http", v2_port, &["127.0.0.1"]),
    ]
    .join("---\n")
}

/// The `reviews` HTTPRoute the tests edit: `x-canary: yes` goes to v2, the rest is split
/// `v1`/`v2` between `reviews-v1` and `reviews-v2` (all on port 9080).
pub fn reviews_route(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews, namespace: default}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews, port: 9080}}]
  rules:
  - matches: [{{headers: [{{name: x-canary, value: 'yes'}}]}}]
    backendRefs: [{{name: reviews-v2, port: 9080}}]
  - backendRefs: [{{name: reviews-v1, port: 9080, weight: {v1}}}, {{name: reviews-v2, port: 9080, weight: {v2}}}]
"
    )
}

/// Sends `n` requests to `reviews:9080` and counts answers by body (a backend's name), or by
/// status or error for failures.
pub async fn spread(
    client: &mut ProxyClient,
    n: usize,
    headers: &[(&str, &str)],
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for _ in 0..n {
        let key = match client.get("reviews:9080", "/", headers).await {
            Ok((200, body)) => body,
            Ok((status, body)) => format!("status {status}: {}", body.trim()),
            Err(e) => format!("error {e}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// Runs `start` on a one-thread runtime of its own and keeps what it started until the runtime
/// is dropped (then every task and socket goes at once, as when a process dies). Returns the
/// runtime and what `report` reads from the started thing.
pub fn own_runtime<S, T, E, F>(
    start: F,
    report: impl FnOnce(&S) -> T + Send + 'static,
) -> anyhow::Result<(tokio::runtime::Runtime, T)>
where
    F: std::future::Future<Output = Result<S, E>> + Send + 'static,
    S: Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        match start.await {
            Ok(started) => {
                let _ = tx.send(Ok(report(&started)));
                std::future::pending::<()>().await;
                drop(started);
            }
            Err(e) => {
                let _ = tx.send(Err(anyhow::anyhow!("{e}")));
            }
        }
    });
    let value = rx.recv_timeout(Duration::from_secs(20))??;
    Ok((rt, value))
}

/// Writes a file atomically (write then rename), as editors and `kubectl`-style tools do.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Manifests as a cluster with the chart's CRDs (Gateway API standard channel, `mesh.dev`)
/// stores them on `kubectl apply`: pruned and defaulted by the API server's rules
/// ([`mesh_api::schema`]); and the paths of the fields it pruned. A document the API server
/// would refuse is an error naming it.
pub fn as_a_cluster_stores(yaml: &str) -> anyhow::Result<(String, Vec<String>)> {
    let crds = mesh_api::crds::chart_crds();
    let mut docs = Vec::new();
    let mut pruned = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let mut v: serde_json::Value =
            serde::Deserialize::deserialize(doc).with_context(|| format!("document {i}"))?;
        if v.is_null() {
            continue;
        }
        let report = mesh_api::schema::admit_in(&mut v, &crds)
            .with_context(|| format!("document {i}: a kind the cluster does not serve"))?;
        if !report.errors.is_empty() {
            let why: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            bail!("document {i} is refused: {}", why.join("; "));
        }
        pruned.extend(report.pruned);
        docs.push(serde_norway::to_string(&v)?);
    }
    Ok((docs.join("---\n"), pruned))
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_port_never_gives_a_port_twice() {
        let ports: Vec<u16> = (0..500).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}
