//! meshctl against a running local mesh: `route split` and `promote` edit what the controller
//! watches and live traffic follows; `proxy-status` and `proxy-config` read what is running.

use anyhow::Context as _;
use mesh_e2e::mesh::{LocalMesh, wait_config};
use mesh_e2e::{Backend, ProxyClient, reviews_route, spread};
use meshctl::cmd::route::{self, PromoteArgs, Route, SplitArgs, Target};
use meshctl::mesh::LocalDir;

fn target() -> Target {
    Target {
        service: "reviews".into(),
        namespace: Some("default".into()),
        port: None,
    }
}

fn meshctl(mesh: &LocalMesh, r: Route) -> anyhow::Result<String> {
    let mut out = Vec::new();
    route::run(r, &LocalDir::new(&mesh.config_dir)?, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The demo's workload, answering `reviews <version>`.
async fn demo_service(version: &str) -> anyhow::Result<meshctl::demo_service::Running> {
    meshctl::demo_service::DemoService {
        name: "reviews".into(),
        version: version.into(),
        listen: "127.0.0.1:0".parse()?,
        latency: std::time::Duration::ZERO,
        error_rate: 0.0,
        unhealthy_while: None,
        echo: false,
    }
    .start()
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_promote_move_live_traffic() -> anyhow::Result<()> {
    let v1 = demo_service("v1").await?;
    let v2 = demo_service("v2").await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, Some((100, 0))).await?;
    let proxy = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));

    // --wait returns once the proxy applied the split: no waiting after it.
    let wait = || route::WaitArgs {
        wait: true,
        controller: meshctl::cmd::stat::ControllerArgs {
            controller: Some(mesh.controller.admin_addr),
            mesh_namespace: "mesh-system".into(),
        },
        ..Default::default()
    };
    let out = meshctl(
        &mesh,
        Route::Split(SplitArgs {
            target: target(),
            to: vec!["reviews-v1=50".into(), "reviews-v2=50".into()],
            dry_run: false,
            wait: wait(),
            output: meshctl::output::Output::Table,
        }),
    )?;
    assert!(out.contains("written to"), "{out}");
    assert!(
        out.contains("applied by the 1 connected proxy (revision "),
        "{out}"
    );
    let held = proxy.store.load().context("a snapshot")?;
    let w = held.backend_weights("outbound_http", "reviews.default.");
    assert!(
        w.iter().any(|(c, w)| c.contains("reviews-v1") && *w == 50)
            && w.iter().any(|(c, w)| c.contains("reviews-v2") && *w == 50),
        "{w:?}"
    );
    wait_config(&proxy, "both versions' endpoints", |s| {
        s.clusters
            .values()
            .filter(|c| c.name.contains("reviews-v"))
            .all(|c| !c.endpoints.is_empty())
    })
    .await?;
    let got = spread(&mut client, 1000, &[]).await;
    let v2_share = *got.get("reviews v2\n").unwrap_or(&0) as f64 / 10.0;
    assert!((45.0..=55.0).contains(&v2_share), "{got:?}");

    let out = meshctl(
        &mesh,
        Route::Promote(PromoteArgs {
            target: target(),
            backend: "reviews-v2".into(),
            dry_run: false,
            wait: wait(),
            output: meshctl::output::Output::Json,
        }),
    )?;
    // One JSON document: the wait's statuses went to stderr.
    let json: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(json["acknowledged"]["proxies"], 1, "{json}");
    assert!(
        !proxy
            .store
            .load()
            .context("a snapshot")?
            .backend_weights("outbound_http", "reviews.default.")
            .iter()
            .any(|(c, w)| c.contains("reviews-v1") && *w > 0),
        "{json}"
    );
    let got = spread(&mut client, 200, &[]).await;
    assert_eq!(got.get("reviews v2\n"), Some(&200), "{got:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_lists_each_proxy_per_type() -> anyhow::Result<()> {
    use meshctl::cmd::status::{Output, ProxyStatusArgs, proxy_status};
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, None).await?;
    let _p1 = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    let _p2 = mesh.proxy(mesh.proxy_config("shop/cart-0")).await?;
    let args = |output| ProxyStatusArgs {
        controller: Some(mesh.controller.admin_addr),
        namespace: "mesh-system".into(),
        output,
    };
    let text = mesh_e2e::eventually(
        std::time::Duration::from_secs(5),
        "both proxies SYNCED",
        || async {
            let mut out = Vec::new();
            proxy_status(&args(Output::Table), &mut out).await.ok()?;
            let text = String::from_utf8_lossy(&out).into_owned();
            let synced = |node: &str| {
                text.lines()
                    .any(|l| l.starts_with(node) && l.matches("SYNCED").count() >= 3)
            };
            (synced("default/productpage-1") && synced("shop/cart-0")).then_some(text)
        },
    )
    .await?;
    assert!(text.starts_with("NODE"), "{text}");
    let mut out = Vec::new();
    proxy_status(&args(Output::Json), &mut out).await?;
    let json: serde_json::Value = serde_json::from_slice(&out)?;
    assert_eq!(json.as_array().map(Vec::len), Some(2), "{json}");

    // meshctl version: the controller's and both proxies' own, as YAML.
    let version = meshctl::cmd::version::VersionArgs {
        client: false,
        controller: meshctl::cmd::stat::ControllerArgs {
            controller: Some(mesh.controller.admin_addr),
            mesh_namespace: "mesh-system".into(),
        },
        output: Output::Yaml,
    };
    let mut out = Vec::new();
    meshctl::cmd::version::run(&version, &meshctl::cmd::Context::default(), &mut out).await?;
    let v: serde_json::Value = serde_norway::from_slice(&out)?;
    let ours = env!("CARGO_PKG_VERSION");
    assert_eq!(v["client"], ours, "{v}");
    assert_eq!(v["controlPlane"], ours, "{v}");
    assert_eq!(v["proxies"][format!("mesh-proxy {ours}")], 2, "{v}");

    // A controller that is not there: a clear error naming where it looked.
    let gone = ProxyStatusArgs {
        controller: Some("127.0.0.1:1".parse()?),
        namespace: "mesh-system".into(),
        output: Output::Table,
    };
    let err = proxy_status(&gone, &mut Vec::new())
        .await
        .expect_err("no controller");
    assert!(format!("{err:#}").contains("127.0.0.1:1"), "{err:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_reads_a_running_proxy_found_through_the_controller() -> anyhow::Result<()> {
    use meshctl::cmd::status::{Output, ProxyConfigArgs, Section, proxy_config};
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let ca = mesh_e2e::identity::TestCa::start(std::time::Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, None).await?;
    let plain = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    // Ready may come before the manifests are read (the controller starts empty).
    mesh_e2e::mesh::wait_config(&plain, "productpage-1 to hold reviews-v1", |s| {
        s.cluster("outbound|9080||reviews-v1.default.svc.cluster.local")
            .is_some_and(|c| !c.endpoints.is_empty())
    })
    .await?;
    let mut config = mesh.proxy_config("default/secure-0");
    ca.identify(&mut config, "secure")?;
    let _secure = mesh.proxy(config).await?;
    let show = |proxy: &str, section| {
        let args = ProxyConfigArgs {
            proxy: proxy.into(),
            section,
            controller: Some(mesh.controller.admin_addr),
            output: Output::Table,
        };
        async move {
            let mut out = Vec::new();
            proxy_config(&args, &mut out).await?;
            anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
        }
    };
    let listeners = show("productpage-1", Section::Listeners).await?;
    assert!(listeners.contains("outbound_http"), "{listeners}");
    let clusters = show("default/productpage-1", Section::Clusters).await?;
    assert!(
        clusters.contains("outbound|9080||reviews-v1.default.svc.cluster.local"),
        "{clusters}"
    );
    let endpoints = show("productpage-1", Section::Endpoints).await?;
    assert!(endpoints.contains(&v1.addr.to_string()), "{endpoints}");
    let routes = show("productpage-1", Section::Routes).await?;
    assert!(routes.contains("outbound_http"), "{routes}");
    let secrets = show("productpage-1", Section::Secrets).await?;
    assert!(secrets.starts_with("identity off"), "{secrets}");
    let secrets = show("secure-0", Section::Secrets).await?;
    assert!(
        secrets.contains("spiffe://cluster.local/ns/default/sa/secure")
            && secrets.contains("VALID          true"),
        "{secrets}"
    );
    let err = show("nobody", Section::Listeners)
        .await
        .expect_err("unknown");
    assert!(
        err.to_string().contains("\"default/nobody\"")
            && err.to_string().contains("default/productpage-1"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_healthy_mesh_and_hints_at_each_failure() -> anyhow::Result<()> {
    use meshctl::cmd::check::{CheckArgs, Status, run_checks};
    use meshctl::cmd::status::Output;
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let ca = mesh_e2e::identity::TestCa::start(std::time::Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, Some((90, 10))).await?;
    let mut config = mesh.proxy_config("default/productpage-1");
    ca.identify(&mut config, "productpage")?;
    let _proxy = mesh.proxy(config).await?;
    let local = LocalDir::new(&mesh.config_dir)?;
    let args = CheckArgs::local;
    let healthy = args(mesh.controller.admin_addr, ca.admin_addr());
    let checks = mesh_e2e::eventually(
        std::time::Duration::from_secs(5),
        "a clean check",
        || async {
            let checks = run_checks(&healthy, Some(&local)).await;
            checks
                .iter()
                .all(|c| c.status == Status::Ok)
                .then_some(checks)
        },
    )
    .await?;
    let mut out = Vec::new();
    meshctl::cmd::check::print(&checks, Output::Table, &mut out)?;
    let text = String::from_utf8_lossy(&out);
    for line in [
        "✓ controller is ready",
        "✓ proxy default/productpage-1 is SYNCED",
        "✓ mesh-ca is ready",
        "✓ default/productpage-1 is ready; certificate spiffe://cluster.local/ns/default/sa/productpage",
        "Status check results are ✓",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    // Each category's failure, with its hint.
    let fails = |checks: &[meshctl::cmd::check::Check], category: &str| -> Vec<String> {
        checks
            .iter()
            .filter(|c| c.category == category && c.status == Status::Fail)
            .map(|c| format!("{} / {}", c.message, c.hint.clone().unwrap_or_default()))
            .collect()
    };
    mesh.write(
        "broken.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: broken, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n  rules: [{matches: [{path: {type: PathPrefix, value: /x}}], backendRefs: [{name: ratings, port: 9080}]}]\n",
    )?;
    let f = fails(&run_checks(&healthy, Some(&local)).await, "config");
    assert!(
        f.iter()
            .any(|m| m.contains("Service default/ratings does not exist")
                && m.contains("create the Service")),
        "{f:?}"
    );
    // A backend in another namespace needs a ReferenceGrant there, as the controller reads it.
    mesh.write(
        "cross.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ledger, namespace: payments}\nspec: {clusterIP: 10.96.9.9, ports: [{name: http, port: 9080}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: cross, namespace: default}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n  rules: [{matches: [{path: {type: PathPrefix, value: /ledger}}], backendRefs: [{name: ledger, namespace: payments, port: 9080}]}]\n",
    )?;
    let f = fails(&run_checks(&healthy, Some(&local)).await, "config");
    assert!(
        f.iter().any(|m| m.contains(
            "backend payments/ledger is in another namespace, and no ReferenceGrant in payments lets HTTPRoutes of default refer to it"
        ) && m.contains("add a ReferenceGrant")),
        "{f:?}"
    );
    mesh.write(
        "grant.yaml",
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: routes-of-default, namespace: payments}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: '', kind: Service, name: ledger}]\n",
    )?;
    let f = fails(&run_checks(&healthy, Some(&local)).await, "config");
    assert!(!f.iter().any(|m| m.contains("payments/ledger")), "{f:?}");
    mesh.remove("cross.yaml")?;
    mesh.remove("grant.yaml")?;
    // A field the installed schema lacks is named: a cluster would drop it on apply.
    mesh.write(
        "misspelt.yaml",
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: misspelt, namespace: default}\nspec:\n  targetRefs: [{group: '', kind: Service, name: reviews}]\n  outlierDetection: {consecutiveFailure: 5}\n",
    )?;
    let warned: Vec<String> = run_checks(&healthy, Some(&local))
        .await
        .iter()
        .filter(|c| c.category == "config" && c.status == Status::Warn)
        .map(|c| c.message.clone())
        .collect();
    assert!(
        warned
            .iter()
            .any(|m| m.starts_with("TrafficPolicy default/misspelt")
                && m.contains(
                    "spec.outlierDetection.consecutiveFailure is not in the installed schema"
                )),
        "{warned:?}"
    );
    mesh.remove("misspelt.yaml")?;
    mesh.write(
        "copy.yaml",
        &reviews_route(50, 50).replace("name: reviews, namespace", "name: reviews-copy, namespace"),
    )?;
    let f = fails(&run_checks(&healthy, Some(&local)).await, "config");
    assert!(
        f.iter()
            .any(|m| m.contains("claim the same parent default/reviews:9080")
                && m.contains("merge them")),
        "{f:?}"
    );
    // A policy that targets nothing is flagged, by meshctl and by the controller.
    mesh.write(
        "stray.yaml",
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: stray, namespace: default}\nspec:\n  targetRefs: [{group: '', kind: Service, name: ratings}, {group: '', kind: Service, name: reviews, sectionName: grpc}, {group: apps, kind: Service, name: reviews}]\n  rules: [{}]\n",
    )?;
    let checks = run_checks(&healthy, Some(&local)).await;
    let f = fails(&checks, "policy");
    for want in [
        "AuthorizationPolicy default/stray targetRefs[0]: Service default/ratings does not exist: it targets nothing",
        "AuthorizationPolicy default/stray targetRefs[1]: Service default/reviews has no port named \"grpc\": it targets nothing",
        // The controller ignores a reference of another group; so does meshctl.
        "AuthorizationPolicy default/stray targetRefs[2]: \"apps\"/\"Service\" is not a Service or Namespace: it targets nothing",
    ] {
        assert!(f.iter().any(|m| m.contains(want)), "{want:?} not in {f:?}");
    }
    let f = mesh_e2e::eventually(
        std::time::Duration::from_secs(5),
        "the controller to report the stray policy",
        || async {
            let f = fails(&run_checks(&healthy, None).await, "control plane");
            f.iter()
                .any(|m| {
                    m.contains("Service default/ratings not found: the policy targets nothing")
                })
                .then_some(f)
        },
    )
    .await;
    assert!(f.is_ok(), "{f:?}");
    mesh.remove("stray.yaml")?;
    let gone: std::net::SocketAddr = "127.0.0.1:1".parse()?;
    let f = fails(
        &run_checks(&args(gone, ca.admin_addr()), None).await,
        "control plane",
    );
    assert!(
        f.iter().any(|m| m.contains("start mesh-controller")),
        "{f:?}"
    );
    let f = fails(
        &run_checks(&args(mesh.controller.admin_addr, gone), None).await,
        "identity",
    );
    assert!(f.iter().any(|m| m.contains("start mesh-ca")), "{f:?}");
    // A proxy that cannot get a certificate is not ready.
    let mut orphan = mesh.proxy_config("default/orphan-0");
    ca.identify(&mut orphan, "orphan")?;
    orphan.ca_addr = Some(gone.to_string());
    let _orphan = mesh_proxy::Proxy::start(orphan, None).await?;
    let f = mesh_e2e::eventually(
        std::time::Duration::from_secs(5),
        "the orphan to be listed",
        || async {
            let f = fails(&run_checks(&healthy, None).await, "data plane");
            (!f.is_empty()).then_some(f)
        },
    )
    .await?;
    assert!(
        f.iter()
            .any(|m| m.contains("default/orphan-0 is not ready") && m.contains("certificate")),
        "{f:?}"
    );
    Ok(())
}
