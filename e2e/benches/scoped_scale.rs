//! A sidecar at mesh scale, with the release binaries as a cluster runs them: the controller on
//! a directory of N Services (`mesh_controller::testing::scale_manifests`: one HTTP port and
//! two endpoints each, over 10 namespaces), and one transparent mesh-proxy in a network
//! namespace of its own with the pod's iptables rules (`mesh-proxy init`), whose app calls
//! Services it never called before. Every endpoint address is local to the namespace, where
//! one demo service answers them all.
//!
//! For the proxy with `--scoped` and then, for comparison, with every Service: time to ready,
//! its RSS at ready, after calling 10 Services and after 200, and the controller's RSS growth
//! for it; and the latency of a first request to a Service (a new connection, which a scoped
//! proxy looks up) against a second one (a new connection to the same Service), over 200
//! Services.
//!
//! Root only (a network namespace and iptables). `scripts/bench-scale [SERVICES...]`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_e2e::{netns::binary, pct, rss_mib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAMESPACES: usize = 10;
const CALLED: usize = 200;
const FEW: usize = 10;

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// This process's own network namespace, removed when dropped.
struct Netns(String);

impl Netns {
    /// Creates it and moves this thread (and so every thread and process it starts) into it.
    fn enter() -> anyhow::Result<Self> {
        let name = format!("mesh-bench-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns(name);
        let file = std::fs::File::open(format!("/run/netns/{}", ns.0))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        run(&["ip", "link", "set", "lo", "up"])?;
        // Every 10.x address is this host's: the VIPs (intercepted before they get there) and
        // the endpoints (where the demo service answers).
        run(&["ip", "route", "add", "local", "10.0.0.0/8", "dev", "lo"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program` (as `uid`, if given), killed with this process even if it is killed.
fn spawn(program: &Path, args: &[&str], uid: Option<u32>) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig=KILL");
    if let Some(uid) = uid {
        cmd.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    cmd.arg(program);
    let child = cmd
        .args(args)
        .env("MESH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Proc(child))
}

/// One GET of `path` on a new connection; its time to the whole answer, which must be a 200.
async fn get(addr: &str, path: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    let took = started.elapsed();
    if !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "{addr}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        );
    }
    Ok(took)
}

async fn wait_for(
    what: &str,
    within: Duration,
    mut ok: impl AsyncFnMut() -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !ok().await {
        if started.elapsed() > within {
            bail!("{what} not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

async fn http_ok(addr: &str, path: &str) -> bool {
    get(addr, path).await.is_ok()
}

struct Figures {
    ready: Duration,
    rss_ready: f64,
    rss_few: f64,
    rss_called: f64,
    ctl_growth_ready: f64,
    ctl_growth_few: f64,
    first: Vec<f64>,
    second: Vec<f64>,
}

async fn one_proxy(services: usize, scoped: bool, ctl_pid: u32) -> anyhow::Result<Figures> {
    let ctl_before = rss_mib(ctl_pid);
    let proxy = spawn(
        &binary("mesh-proxy")?,
        &[
            "--node",
            "ns-0/app-0",
            "--transparent",
            "true",
            "--scoped",
            &scoped.to_string(),
            "--identity-off",
            "--xds",
            "127.0.0.1:15010",
            "--workers",
            "1",
        ],
        Some(1337),
    )?;
    let pid = proxy.0.id();
    let ready = wait_for("the proxy's /ready", Duration::from_secs(120), async || {
        http_ok("127.0.0.1:15020", "/ready").await
    })
    .await?;
    // Let the allocator settle after the initial responses.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_ready, ctl_ready) = (rss_mib(pid), rss_mib(ctl_pid));
    let vip = |i: usize| format!("{}:80", mesh_controller::testing::scale_ip(i));
    let mut first = Vec::new();
    let (mut rss_few, mut ctl_few) = (0.0, 0.0);
    for i in 1..=CALLED.min(services - 1) {
        first.push(get(&vip(i), "/").await?.as_secs_f64() * 1000.0);
        if i == FEW {
            tokio::time::sleep(Duration::from_millis(200)).await;
            (rss_few, ctl_few) = (rss_mib(pid), rss_mib(ctl_pid));
        }
    }
    let mut second = Vec::new();
    for i in 1..=CALLED.min(services - 1) {
        second.push(get(&vip(i), "/").await?.as_secs_f64() * 1000.0);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_called = rss_mib(pid);
    drop(proxy);
    // The controller notices the stream is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Figures {
        ready,
        rss_ready,
        rss_few,
        rss_called,
        ctl_growth_ready: ctl_ready - ctl_before,
        ctl_growth_few: ctl_few - ctl_before,
        first,
        second,
    })
}

async fn bench(services: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, text) in mesh_controller::testing::scale_manifests(services, NAMESPACES) {
        std::fs::write(dir.path().join(name), text)?;
    }
    let ctl = spawn(
        &binary("mesh-controller")?,
        &[
            "--config-dir",
            &dir.path().display().to_string(),
            "--xds-addr",
            "127.0.0.1:15010",
            "--admin-addr",
            "127.0.0.1:15014",
        ],
        None,
    )?;
    let ctl_pid = ctl.0.id();
    wait_for(
        "the controller's /ready",
        Duration::from_secs(120),
        async || http_ok("127.0.0.1:15014", "/ready").await,
    )
    .await?;
    let _app = spawn(
        &binary("meshctl")?,
        &[
            "demo-service",
            "--name",
            "svc",
            "--version",
            "v1",
            "--listen",
            "0.0.0.0:8080",
        ],
        None,
    )?;
    wait_for("the demo service", Duration::from_secs(10), async || {
        http_ok("127.0.0.1:8080", "/").await
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ctl_loaded = rss_mib(ctl_pid);
    println!(
        "\n{services} Services: controller RSS {ctl_loaded:.1} MiB loaded\n\n\
         | proxy | ready in | RSS at ready | after {FEW} Services | after {CALLED} | controller growth at ready | after {FEW} | first request p50 / p99 / max | second p50 / p99 |\n\
         |---|---|---|---|---|---|---|---|---|"
    );
    for scoped in [true, false] {
        let f = one_proxy(services, scoped, ctl_pid).await?;
        println!(
            "| {} | {:.2} s | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:+.1} MiB | {:+.1} MiB | {:.2} / {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
            if scoped { "scoped" } else { "every Service" },
            f.ready.as_secs_f64(),
            f.rss_ready,
            f.rss_few,
            f.rss_called,
            f.ctl_growth_ready,
            f.ctl_growth_few,
            pct(&f.first, 0.5),
            pct(&f.first, 0.99),
            pct(&f.first, 1.0),
            pct(&f.second, 0.5),
            pct(&f.second, 0.99),
        );
    }
    drop(ctl);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    if let Some(small) = sizes.iter().find(|n| **n <= CALLED) {
        bail!("{small} Services: give more than {CALLED}, the number called");
    }
    let _ns = Netns::enter()?;
    let init = Command::new(binary("mesh-proxy")?)
        .args(["init", "--proxy-uid", "1337"])
        .output()?;
    if !init.status.success() {
        bail!("mesh-proxy init: {}", String::from_utf8_lossy(&init.stderr));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    for n in sizes {
        rt.block_on(bench(n))?;
    }
    Ok(())
}
