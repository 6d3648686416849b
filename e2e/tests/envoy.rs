//! A stock Envoy 1.40, started with nothing but `meshctl bootstrap envoy`, routes through its
//! explicit outbound HTTP listener as HTTPRoutes in a watched directory say.

use std::time::{Duration, Instant};

use mesh_api::consts::xds as names;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_controller::xds::status::SyncState;
use mesh_e2e::{
    Backend, ProxyClient, eventually, free_port, http_get, peer, reviews_route, spread,
    start_envoy, write_atomic,
};
use meshctl::cmd::bootstrap::{EnvoyArgs, envoy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_httproutes_from_a_directory() -> anyhow::Result<()> {
    let Some(envoy_bin) = peer("MESH_ENVOY", "envoy") else {
        return Ok(());
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mesh_controller=info")
        .with_test_writer()
        .try_init();

    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    std::fs::write(
        cfg.join("services.yaml"),
        [
            service_yaml("default", "reviews", "10.96.0.10", &[("http", 9080)]),
            service_yaml("default", "reviews-v1", "10.96.0.11", &[("http", 9080)]),
            service_yaml("default", "reviews-v2", "10.96.0.12", &[("http", 9080)]),
        ]
        .join("---\n"),
    )?;
    std::fs::write(
        cfg.join("reviews-v1.yaml"),
        slice_yaml(
            "default",
            "reviews-v1",
            "http",
            v1.addr.port(),
            &["127.0.0.1"],
        ),
    )?;
    std::fs::write(
        cfg.join("reviews-v2.yaml"),
        slice_yaml(
            "default",
            "reviews-v2",
            "http",
            v2.addr.port(),
            &["127.0.0.1"],
        ),
    )?;
    let route_file = cfg.join("route.yaml");
    std::fs::write(&route_file, reviews_route(90, 10))?;

    let ctl = Controller::start(Config::local(&cfg)).await?;

    let http_port = free_port();
    let admin_port = free_port();
    let bootstrap = envoy(&EnvoyArgs {
        admin: format!("127.0.0.1:{admin_port}").parse()?,
        outbound_http: format!("127.0.0.1:{http_port}").parse()?,
        ..EnvoyArgs::new("default/envoy-client", &ctl.xds_addr.to_string())
    })?;
    let admin = format!("127.0.0.1:{admin_port}").parse()?;
    let envoy = start_envoy(&envoy_bin, &bootstrap, dir.path(), admin).await?;
    let mut client = ProxyClient::new(format!("127.0.0.1:{http_port}").parse()?);

    // 90/10 over 2,000 requests.
    let counts = spread(&mut client, 2000, &[]).await;
    let (n1, n2) = (
        counts.get("reviews-v1").copied().unwrap_or(0),
        counts.get("reviews-v2").copied().unwrap_or(0),
    );
    assert_eq!(
        n1 + n2,
        2000,
        "every request answered by a backend: {counts:?}"
    );
    let share = n2 as f64 * 100.0 / 2000.0;
    println!("90/10 split over 2000 requests: v1={n1} v2={n2} (v2 {share:.1}%)");
    assert!(
        (share - 10.0).abs() <= 3.0,
        "v2 share {share:.1}% is not within 10±3%: {counts:?}"
    );

    // The header rule sends matching requests only to v2.
    let counts = spread(&mut client, 200, &[("x-canary", "yes")]).await;
    assert_eq!(counts.get("reviews-v2"), Some(&200), "{counts:?}");

    // Every short and long host form, and the VIP, reach the service.
    for host in [
        "reviews.default:9080",
        "reviews.default.svc:9080",
        "reviews.default.svc.cluster.local:9080",
        "10.96.0.10:9080",
        "reviews",
    ] {
        let (status, body) = client.get(host, "/", &[("x-canary", "yes")]).await?;
        assert_eq!((status, body.as_str()), (200, "reviews-v2"), "host {host}");
    }

    // A malformed edit is refused with file and field; the last good route stays in force.
    write_atomic(
        &route_file,
        &reviews_route(90, 10).replace("weight: 10}", "weight: -10}"),
    )?;
    let reported = eventually(
        Duration::from_secs(5),
        "the bad manifest to be reported",
        || async {
            let (_, body) = http_get(ctl.admin_addr, "/debug/config-errors").await?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["manifests"].as_array().filter(|a| !a.is_empty()).cloned()
        },
    )
    .await?;
    assert!(
        reported[0]["source"]
            .as_str()
            .unwrap_or_default()
            .ends_with("route.yaml"),
        "{reported:?}"
    );
    assert_eq!(
        reported[0]["field"], "spec.rules[1].backendRefs[1].weight",
        "{reported:?}"
    );
    let counts = spread(&mut client, 400, &[]).await;
    assert!(
        counts.get("reviews-v2").copied().unwrap_or(0) > 0
            && counts.get("reviews-v1").copied().unwrap_or(0) > 300,
        "last good 90/10 still in force: {counts:?}"
    );

    // 0/100: measure from the write until Envoy has acknowledged the new routes and serves them.
    let before = route_version(&ctl);
    let t0 = Instant::now();
    write_atomic(&route_file, &reviews_route(0, 100))?;
    let acked = eventually(
        Duration::from_secs(5),
        "Envoy to ACK the new routes",
        || async {
            acked_route_version(&ctl)
                .filter(|v| Some(v) != before.as_ref())
                .map(|_| t0.elapsed())
        },
    )
    .await?;
    let counts = spread(&mut client, 200, &[]).await;
    let served = t0.elapsed();
    println!(
        "weights 0/100: Envoy ACKed {:.1} ms after the file write; first check of 200 requests done at {:.1} ms",
        acked.as_secs_f64() * 1e3,
        served.as_secs_f64() * 1e3
    );
    assert_eq!(counts.get("reviews-v2"), Some(&200), "{counts:?}");
    assert!(
        acked < Duration::from_secs(1),
        "the edit took {acked:?} to reach Envoy"
    );

    // Back to 50/50, then v2's EndpointSlice goes: v2 gets no more traffic.
    write_atomic(&route_file, &reviews_route(50, 50))?;
    eventually(Duration::from_secs(5), "50/50 in force", || async {
        let mut c = ProxyClient::new(format!("127.0.0.1:{http_port}").parse().ok()?);
        let counts = spread(&mut c, 100, &[]).await;
        (counts.get("reviews-v1").copied().unwrap_or(0) > 20).then_some(())
    })
    .await?;
    std::fs::remove_file(cfg.join("reviews-v2.yaml"))?;
    eventually(
        Duration::from_secs(5),
        "v2's endpoints to be gone",
        || async {
            let v = serde_json::to_value(ctl.hub.model()).ok()?;
            let eps = v["services"]["default/reviews-v2"]["ports"][0]["endpoints"]
                .as_array()?
                .len();
            (eps == 0).then_some(())
        },
    )
    .await?;
    // Let Envoy apply it: wait for its EDS ACK.
    eventually(
        Duration::from_secs(5),
        "Envoy to ACK the endpoint removal",
        || async {
            let s = ctl.hub.status.snapshot();
            let eds = s
                .first()?
                .types
                .get(&mesh_controller::xds::resources::ResourceType::Endpoint)?
                .clone();
            (eds.state == SyncState::Synced
                && eds.acked_version == ctl.hub.model().revision.to_string())
            .then_some(())
        },
    )
    .await?;
    let hits = v2.hits();
    let counts = spread(&mut client, 200, &[]).await;
    assert_eq!(
        v2.hits(),
        hits,
        "v2 got traffic after its EndpointSlice was deleted: {counts:?}"
    );
    assert!(
        counts.get("reviews-v1").copied().unwrap_or(0) > 50,
        "{counts:?}"
    );
    drop(envoy);
    Ok(())
}

fn route_version(ctl: &Controller) -> Option<String> {
    ctl.hub
        .status
        .snapshot()
        .first()?
        .types
        .get(&mesh_controller::xds::resources::ResourceType::Route)
        .map(|t| t.acked_version.clone())
}

fn acked_route_version(ctl: &Controller) -> Option<String> {
    let s = ctl.hub.status.snapshot();
    let t = s
        .first()?
        .types
        .get(&mesh_controller::xds::resources::ResourceType::Route)?
        .clone();
    (t.state == SyncState::Synced).then_some(t.acked_version)
}

/// The serial number (hex) of the first certificate of the SVID in an SDS file the agent wrote.
fn svid_serial(file: &std::path::Path) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let pem = v["resources"][0]["tls_certificate"]["certificate_chain"]["inline_string"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("{}: no certificate chain", file.display()))?;
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())?;
    let cert = block.parse_x509()?;
    Ok(cert.raw_serial_as_string().replace(':', ""))
}

/// A cluster's controller serves xDS over mesh TLS only. `mesh-proxy agent` gets Envoy an SVID
/// from mesh-ca and serves it over SDS on a Unix socket (and writes it as SDS files, where the
/// test reads each renewal's serial); `meshctl bootstrap envoy --xds-tls --sds-socket` then
/// joins, the controller checking the node against the certificate, and takes the inbound
/// mesh TLS listener whose secrets come from the same socket. Certificates living 6 s are
/// renewed by the agent and taken up by Envoy without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_joins_a_tls_controller_on_the_agents_svid_and_takes_its_renewals()
-> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(envoy_bin) = peer("MESH_ENVOY", "envoy") else {
        return Ok(());
    };
    let ca = mesh_e2e::identity::TestCa::start(Duration::from_secs(6)).await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    std::fs::write(
        cfg.join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web}}\nspec: {serviceAccountName: web, containers: [{name: app}]}\nstatus: {podIP: 10.0.0.9}\n",
    )?;
    // A Service of the pod, so its inbound listener has a mesh TLS chain.
    std::fs::write(
        cfg.join("web.yaml"),
        [
            service_yaml("default", "web", "10.96.0.9", &[("http", 8080)]),
            slice_yaml("default", "web", "http", 8080, &["10.0.0.9"]),
        ]
        .join("---\n"),
    )?;
    let mut config = Config::local(&cfg);
    config.ca_addr = Some(ca.addr().to_string());
    config.ca_root = Some(ca.path("ca.crt"));
    config.ca_token_file = ca.token_file("mesh-system", "mesh-controller")?;
    let ctl = Controller::start(config).await?;
    let identity = ctl.identity.clone().expect("TLS xDS");
    mesh_e2e::identity::wait_for_svid(&identity, "the controller").await?;

    let sds = dir.path().join("sds");
    let socket = dir.path().join("sds.sock");
    let agent = mesh_e2e::Peer::spawn(
        ca.agent_command("default/web-0", "web")?
            .arg("--sds-dir")
            .arg(&sds)
            .arg("--sds-socket")
            .arg(&socket),
        dir.path().join("agent.log"),
    )?;
    let svid_file = sds.join("default.yaml");
    let first = eventually(Duration::from_secs(10), "the agent's SVID", || async {
        svid_serial(&svid_file).ok()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent log:\n{}", agent.log_text()))?;
    for f in [
        sds.join("default.yaml"),
        sds.join("ROOTCA.yaml"),
        socket.clone(),
    ] {
        let mode = std::fs::metadata(&f)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }

    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let bootstrap = envoy(&EnvoyArgs {
        admin,
        outbound_http: format!("127.0.0.1:{}", free_port()).parse()?,
        transparent: true,
        inbound_addr: Some("127.0.0.9".parse()?),
        inbound_port: Some(free_port()),
        outbound_port: Some(free_port()),
        sds_socket: Some(socket.clone()),
        xds_tls: true,
        ..EnvoyArgs::new("default/web-0", &ctl.xds_addr.to_string())
    })?;
    let envoy_proc = start_envoy(&envoy_bin, &bootstrap, dir.path(), admin).await?;
    let synced = eventually(Duration::from_secs(20), "Envoy synced over TLS", || async {
        let (_, body) = http_get(ctl.admin_addr, "/debug/proxies").await?;
        let ps: serde_json::Value = serde_json::from_str(&body).ok()?;
        mesh_e2e::cluster::proxy_of(&ps, "default", "web-0")
            .is_some_and(mesh_e2e::cluster::synced)
            .then_some(())
    })
    .await;
    if let Err(e) = synced {
        anyhow::bail!("{e}\nEnvoy log:\n{}", envoy_proc.log_text());
    }
    // The inbound listener Envoy took terminates mesh TLS with the socket's secrets.
    let (_, listeners) = http_get(admin, "/config_dump?resource=dynamic_listeners")
        .await
        .ok_or_else(|| anyhow::anyhow!("Envoy's config dump"))?;
    // From the first mention of virtualInbound to that of the next listener.
    let inbound = listeners
        .split_once("virtualInbound")
        .map(|(_, rest)| rest.split("virtualOutbound").next().unwrap_or(rest))
        .unwrap_or_default();
    assert!(
        inbound.contains("DownstreamTlsContext") && inbound.contains(names::SDS_CLUSTER),
        "virtualInbound without mesh TLS from the agent's socket:\n{listeners}"
    );

    // Two renewals, each in Envoy's certificates (its `/certs`) soon after the agent wrote it.
    let mut serials = vec![first];
    let started = Instant::now();
    while serials.len() < 3 {
        let last = serials.last().cloned().unwrap_or_default();
        let next = eventually(Duration::from_secs(10), "a renewal", || async {
            svid_serial(&svid_file).ok().filter(|s| *s != last)
        })
        .await?;
        eventually(
            Duration::from_secs(5),
            "Envoy to load the renewed SVID",
            || async {
                let (_, certs) = http_get(admin, "/certs").await?;
                certs
                    .to_ascii_lowercase()
                    .contains(&next.to_ascii_lowercase())
                    .then_some(())
            },
        )
        .await?;
        serials.push(next);
    }
    mesh_e2e::figure(&format!(
        "Envoy on the agent's SVID: joined the TLS controller; {} renewals taken up in {:.1} s (6 s certificates)",
        serials.len() - 1,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}
