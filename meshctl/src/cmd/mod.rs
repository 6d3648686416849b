//! One module per subcommand.

use std::path::PathBuf;

use anyhow::bail;

use crate::mesh::LocalDir;

pub mod authz;
pub mod bootstrap;
pub mod check;
pub mod check_cluster;
pub mod dashboard;
pub mod explain;
pub mod inject;
pub mod rollout;
pub mod route;
pub mod route_wait;
pub mod stat;
pub mod status;
pub mod version;

/// meshctl's command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "meshctl",
    version,
    about = "Operate the mesh: bootstrap proxies, inspect and change routing"
)]
pub struct Cli {
    #[command(flatten)]
    pub context: Context,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a bootstrap with which a proxy joins the mesh.
    #[command(subcommand)]
    Bootstrap(bootstrap::Bootstrap),
    /// Traffic shares between a Service's backends: canaries and blue-green switches.
    #[command(subcommand)]
    Route(route::Route),
    /// Run the demo's workload: answers with its name and version, with a set latency and
    /// error rate.
    DemoService(crate::demo_service::DemoService),
    /// Every proxy connected to the controller, and how far each is in sync.
    ProxyStatus(status::ProxyStatusArgs),
    /// A proxy's running config: listeners, routes, clusters, endpoints or its certificate.
    ProxyConfig(status::ProxyConfigArgs),
    /// A live table of workloads by the traffic they serve: rps, success rate, latency.
    Top(stat::TopArgs),
    /// A Service's traffic per route and backend, so a canary's versions show side by side.
    Stat(stat::StatArgs),
    /// The authorization and rate limit policies on each port of a Service, and what they let
    /// in.
    Authz(authz::AuthzArgs),
    /// What the mesh does with one request from a workload: the route, backends, timeouts,
    /// retries, policies, rate limits and endpoints, from the controller's own model.
    Explain(explain::ExplainArgs),
    /// The whole mesh on loopback, walking through a canary release under live traffic.
    Demo(crate::demo::DemoArgs),
    /// The mesh's health by category, each failure with a hint; non-zero exit on failure.
    Check(check::CheckArgs),
    /// Add the mesh's sidecar to the pods of manifests, offline (prints the result).
    Inject(inject::InjectArgs),
    /// Take the mesh's sidecar out of the pods of manifests, probes as they were written.
    Uninject(inject::UninjectArgs),
    /// Install the mesh into the current cluster (or print its objects with --dry-run).
    Install(crate::install::InstallArgs),
    /// Upgrade an installed mesh to this meshctl's version (one minor version at a time).
    Upgrade(crate::install::InstallArgs),
    /// Remove what install created.
    Uninstall(crate::install::UninstallArgs),
    /// This meshctl's version, the control plane's, and the proxies' with how many run each.
    Version(version::VersionArgs),
    /// Print a shell completion script: `source <(meshctl completion bash)`.
    Completion(CompletionArgs),
    /// Open the controller's service graph in a browser (through a port-forward in a cluster).
    Dashboard(dashboard::DashboardArgs),
}

#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Writes the completion script of meshctl's whole command line for `shell`.
pub fn completion(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "meshctl", out);
}

fn current_thread() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Which mesh a command works on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Context {
    /// A local mesh: the directory of manifests its controller watches.
    #[arg(long, global = true, env = mesh_api::consts::env::MESHCTL_LOCAL)]
    pub local: Option<PathBuf>,
    /// The kubeconfig file (default: $KUBECONFIG, then ~/.kube/config; in a pod, its service
    /// account).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
}

impl Context {
    /// A local mesh's context.
    pub fn local(dir: impl Into<PathBuf>) -> Self {
        Self {
            local: Some(dir.into()),
            ..Self::default()
        }
    }

    /// The cluster `--kubeconfig` and `--context` name.
    pub async fn connect(&self) -> anyhow::Result<crate::cluster::Cluster> {
        crate::cluster::Cluster::connect(self.kubeconfig.as_deref(), self.context.as_deref()).await
    }

    /// The namespace a command about workloads works in without `-n`: the kubeconfig context's
    /// (`default` when it names none, and for a local mesh).
    pub fn default_namespace(&self) -> anyhow::Result<String> {
        if self.local.is_some() {
            return Ok("default".into());
        }
        crate::cluster::context_namespace(self.kubeconfig.as_deref(), self.context.as_deref())
    }
}

pub fn run(cmd: Command, cx: &Context) -> anyhow::Result<()> {
    // Checked here, not by clap: its conflicts hold within one command level, and --local may
    // come from the environment.
    if let Some(dir) = &cx.local
        && (cx.kubeconfig.is_some() || cx.context.is_some())
    {
        bail!(
            "--local {} (or {}) names a local mesh, --kubeconfig and --context a cluster: give one",
            dir.display(),
            mesh_api::consts::env::MESHCTL_LOCAL
        );
    }
    match cmd {
        Command::Bootstrap(b) => bootstrap::run(b, &mut std::io::stdout()),
        Command::Route(r) => match (r.in_namespace(&cx.default_namespace()?), &cx.local) {
            (r, Some(dir)) => route::run(r, &LocalDir::new(dir)?, &mut std::io::stdout()),
            // The cluster of the current kubeconfig context. The route code is synchronous;
            // its API calls block on this runtime from inside block_in_place.
            (r, None) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?
                .block_on(async {
                    let mesh = crate::mesh::Cluster(cx.connect().await?);
                    tokio::task::block_in_place(|| route::run(r, &mesh, &mut std::io::stdout()))
                }),
        },
        Command::ProxyStatus(a) => current_thread()?.block_on(async {
            let ctl = status::controller_endpoint(a.controller, cx, &a.namespace).await?;
            status::proxy_status_at(&ctl, a.output, &mut std::io::stdout()).await
        }),
        Command::Top(a) => current_thread()?.block_on(stat::top(&a, cx, &mut std::io::stdout())),
        Command::Explain(a) => {
            current_thread()?.block_on(explain::explain(&a, cx, &mut std::io::stdout()))
        }
        Command::Stat(a) => current_thread()?.block_on(stat::stat(&a, cx, &mut std::io::stdout())),
        Command::Authz(a) => {
            current_thread()?.block_on(authz::authz(&a, cx, &mut std::io::stdout()))
        }
        Command::ProxyConfig(a) if a.controller.is_some() || cx.local.is_some() => {
            current_thread()?.block_on(status::proxy_config(&a, &mut std::io::stdout()))
        }
        Command::ProxyConfig(a) => current_thread()?.block_on(async {
            let cluster = cx.connect().await?;
            let ns = cx.default_namespace()?;
            status::proxy_config_in_cluster(&cluster, &a, &ns, &mut std::io::stdout()).await
        }),
        Command::Inject(a) => inject::run(&a, &mut std::io::stdout(), &mut std::io::stderr()),
        Command::Uninject(a) => {
            inject::run_uninject(&a, &mut std::io::stdout(), &mut std::io::stderr())
        }
        Command::Check(a) => {
            let local = cx.local.as_ref().map(LocalDir::new).transpose()?;
            let checks = if a.is_local(local.is_some()) {
                current_thread()?.block_on(check::run_checks(&a, local.as_ref()))
            } else {
                current_thread()?.block_on(async {
                    let cluster = cx.connect().await?;
                    check_cluster::run_cluster_checks(&a, &cluster).await
                })?
            };
            check::print(&checks, a.output, &mut std::io::stdout())?;
            let failed = checks
                .iter()
                .filter(|c| c.status == check::Status::Fail)
                .count();
            if failed > 0 {
                bail!("{failed} check(s) failed");
            }
            Ok(())
        }
        Command::Demo(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                crate::demo::run(&a, &mut std::io::stdout(), &mut std::io::stderr()).await?;
                Ok(())
            }),
        Command::Install(a) | Command::Upgrade(a) if a.dry_run => {
            crate::install::dry_run(&a, &mut std::io::stdout())
        }
        Command::Install(a) => current_thread()?.block_on(async {
            let cluster = cx.connect().await?;
            crate::install::apply(&cluster, &a, false, &mut std::io::stdout()).await?;
            Ok(())
        }),
        Command::Upgrade(a) => current_thread()?.block_on(async {
            let cluster = cx.connect().await?;
            crate::install::apply(&cluster, &a, true, &mut std::io::stdout()).await?;
            Ok(())
        }),
        Command::Uninstall(a) => current_thread()?.block_on(async {
            let cluster = cx.connect().await?;
            crate::install::uninstall(&cluster, &a, &mut std::io::stdout()).await?;
            Ok(())
        }),
        Command::Version(a) => {
            current_thread()?.block_on(version::run(&a, cx, &mut std::io::stdout()))
        }
        Command::Dashboard(a) => {
            current_thread()?.block_on(dashboard::run(&a, cx, &mut std::io::stdout()))
        }
        Command::Completion(a) => {
            completion(a.shell, &mut std::io::stdout());
            Ok(())
        }
        Command::DemoService(d) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (name, version) = (d.name.clone(), d.version.clone());
                // Listening before it answers: a SIGTERM once it listens is a clean stop.
                let terminated = mesh_api::process::termination();
                let running = d.start().await?;
                println!("{name} {version} listening on {}", running.addr);
                terminated.await;
                Ok(())
            })
        }
    }
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod cli_tests;
