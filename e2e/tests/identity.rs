//! Identity end to end: a real mesh-ca, the real controller and two mesh-proxies that get
//! SVIDs from it and speak mutual TLS, checked against what the identity issue asks: every bad
//! peer certificate refused for its own reason, STRICT and PERMISSIVE, rotation under load,
//! a CA outage, and a root rotation.

use std::time::{Duration, Instant};

use mesh_e2e::identity::{TestCa, counter, sign, svid_params, tls_probe};
use mesh_e2e::mesh::{Load, LocalMesh, PairOptions, failures, secure_pair};
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, eventually, figure, free_port, http_get, start_envoy};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";

fn renewals(p: &mesh_proxy::Proxy) -> u64 {
    p.tls.as_ref().map_or(0, |t| t.status().renewals)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_sidecars_tells_the_app_who_called() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let mut client = ProxyClient::new(pair.outbound);
    // A caller's claim about itself is dropped; the server proxy says who called.
    let (status, headers, body) = client
        .get_full(
            "echo",
            "/",
            &[(
                "x-forwarded-client-cert",
                "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
            )],
        )
        .await?;
    assert_eq!((status, body.as_str()), (200, "echo-app"));
    assert_eq!(
        headers.get("x-seen-xfcc").and_then(|v| v.to_str().ok()),
        Some(format!("By={SERVER_ID};URI={CLIENT_ID}").as_str())
    );
    let (c, s) = (pair.client.metrics.encode(), pair.server.metrics.encode());
    assert!(
        counter(
            &c,
            "mesh_proxy_tls_handshakes_total{direction=\"outbound\"}"
        ) >= 1
    );
    assert!(counter(&s, "mesh_proxy_tls_handshakes_total{direction=\"inbound\"}") >= 1);
    assert!(
        counter(
            &s,
            &format!("mesh_proxy_inbound_mtls_connections_total{{peer=\"{CLIENT_ID}\"}}")
        ) >= 1,
        "{s}"
    );
    assert!(counter(&c, "mesh_proxy_svid_renewals_total") >= 1);

    // Both say who they are at /config_dump.
    let (code, dump) = http_get(pair.server.admin_addr, "/config_dump")
        .await
        .ok_or_else(|| anyhow::anyhow!("no config_dump"))?;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump)?;
    assert_eq!(dump["identity"]["mode"], "on");
    assert_eq!(dump["identity"]["spiffe_id"], SERVER_ID);
    assert_eq!(dump["identity"]["valid"], true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_caller_makes_the_app_or_metrics_believe_another_identity() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "PERMISSIVE").await?;
    let inbound = pair.server.inbound_addr.expect("inbound listener");
    let forged = [
        (
            "x-forwarded-client-cert",
            "By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
        // The client's own namespace: only its proxy's word on the workload counts.
        ("x-mesh-source-workload", "default/admin"),
    ];
    // Plaintext straight to the pod (PERMISSIVE serves it): nothing of the claim arrives.
    let (status, headers, _) = ProxyClient::new(inbound)
        .get_full("echo", "/", &forged)
        .await?;
    assert_eq!(status, 200);
    let seen = |h: &http::HeaderMap, name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string()
    };
    assert_eq!(seen(&headers, "x-seen-xfcc"), "", "{headers:?}");
    assert_eq!(seen(&headers, "x-seen-source-workload"), "", "{headers:?}");
    // Over mesh TLS from the client's pod: the server's proxy says who called.
    let (status, headers, _) = ProxyClient::new(pair.outbound)
        .get_full("echo", "/", &forged)
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-seen-xfcc").and_then(|v| v.to_str().ok()),
        Some(format!("By={SERVER_ID};URI={CLIENT_ID}").as_str())
    );
    assert_eq!(seen(&headers, "x-seen-source-workload"), "", "{headers:?}");
    // Both are counted, the second as the client's workload its proxy named; neither as the
    // claimed one.
    let server = pair.server.metrics.clone();
    let inbound = |m: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("mesh_proxy_requests_total{") && l.contains("direction=\"inbound\"")
            })
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let lines = eventually(Duration::from_secs(5), "both requests counted", || {
        let lines = inbound(&server.encode());
        async move {
            let n: f64 = lines
                .iter()
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (n >= 2.0 && lines.iter().any(|l| l.contains("src_workload=\"client\"")))
                .then_some(lines)
        }
    })
    .await?;
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("admin") && !l.contains("kube-system")),
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_from_outside_the_mesh_is_refused_in_strict_and_served_in_permissive()
-> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let inbound = pair.server.inbound_addr.expect("inbound listener");
    // An unmeshed client speaks plaintext straight to the pod: refused.
    assert_eq!(
        http_get(inbound, "/").await,
        None,
        "STRICT served plaintext"
    );
    assert_eq!(app.hits(), 0);
    // Through the mesh, fine.
    let (status, _) = ProxyClient::new(pair.outbound)
        .get("echo", "/", &[])
        .await?;
    assert_eq!(status, 200);

    // The namespace goes PERMISSIVE: plaintext is served too, and mesh TLS still works.
    mesh.write(
        "namespace.yaml",
        &mesh_e2e::mesh::pair_namespace(Some("PERMISSIVE")),
    )?;
    let got = eventually(
        Duration::from_secs(5),
        "plaintext to be served",
        || async move {
            http_get(inbound, "/")
                .await
                .filter(|(code, body)| *code == 200 && body == "echo-app")
        },
    )
    .await?;
    assert_eq!(got.1, "echo-app");
    let (status, headers, _) = ProxyClient::new(pair.outbound)
        .get_full("echo", "/", &[])
        .await?;
    assert_eq!(status, 200);
    assert!(
        headers
            .get("x-seen-xfcc")
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.ends_with(CLIENT_ID))),
        "{headers:?}"
    );
    Ok(())
}

fn good_client() -> CertificateParams {
    svid_params(CLIENT_ID)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5"))
}

fn other_root() -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "someone else's root");
    Ok(Issuer::new(p, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_client_certificate_is_refused_for_its_own_reason() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let inbound = pair.server.inbound_addr.expect("inbound listener");
    let issuer = ca.issuer()?;

    // The probe itself works: a good SVID from the mesh CA is served.
    let (chain, key) = sign(&good_client(), &issuer)?;
    let ok = tls_probe(inbound, chain, key).await?;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(2100));
    let past = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    let future = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    type Mutate = Box<dyn Fn(&mut CertificateParams)>;
    let cases: Vec<(&str, Mutate)> = vec![
        (
            "expired",
            Box::new(move |p| {
                p.not_before = past - time::Duration::days(1);
                p.not_after = past;
            }),
        ),
        (
            "not_yet_valid",
            Box::new(move |p| {
                p.not_before = future;
                p.not_after = future + time::Duration::days(1);
            }),
        ),
        (
            "trust_domain",
            Box::new(|p| {
                p.subject_alt_names = vec![uri("spiffe://evil.example/ns/default/sa/client")]
            }),
        ),
        (
            "many_uri_sans",
            Box::new(|p| {
                p.subject_alt_names = vec![
                    uri(CLIENT_ID),
                    uri("spiffe://cluster.local/ns/default/sa/other"),
                ];
            }),
        ),
        (
            "leaf_is_ca",
            Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
        ),
        (
            "key_cert_sign",
            Box::new(|p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }),
        ),
        (
            "no_uri_san",
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::DnsName("client".try_into().expect("dns"))]
            }),
        ),
        (
            "missing_client_auth",
            Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
        ),
        (
            "spiffe_id_too_long",
            Box::new(move |p| p.subject_alt_names = vec![uri(&long)]),
        ),
        (
            "spiffe_id_empty_path",
            Box::new(|p| p.subject_alt_names = vec![uri("spiffe://cluster.local")]),
        ),
    ];
    for (reason, mutate) in &cases {
        let mut p = good_client();
        mutate(&mut p);
        let (chain, key) = sign(&p, &issuer)?;
        let got = tls_probe(inbound, chain, key).await;
        assert!(got.is_err(), "{reason}: served: {got:?}");
    }
    let (chain, key) = sign(&good_client(), &other_root()?)?;
    assert!(
        tls_probe(inbound, chain, key).await.is_err(),
        "untrusted root served"
    );

    let metrics = pair.server.metrics.encode();
    for reason in cases.iter().map(|(r, _)| *r).chain(["untrusted_root"]) {
        let line = format!(
            "mesh_proxy_tls_peer_refused_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        );
        assert_eq!(counter(&metrics, &line), 1, "{line} in\n{metrics}");
    }
    assert_eq!(app.hits(), 1, "only the good probe reached the app");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_svid_of_the_wrong_identity_for_the_destination_is_refused() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    // The pod runs as `echo`, but its proxy holds an SVID for `impostor`.
    let pair = mesh
        .sidecar_pair_with(PairOptions {
            port_name: "http",
            app_port: app.addr.port(),
            ca: Some(&ca),
            server_sa: Some("impostor"),
            mtls_mode: Some("STRICT"),
            ..Default::default()
        })
        .await?;
    let (status, body) = ProxyClient::new(pair.outbound)
        .get("echo", "/", &[])
        .await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(app.hits(), 0);
    let m = pair.client.metrics.encode();
    assert!(
        counter(
            &m,
            "mesh_proxy_tls_peer_refused_total{direction=\"outbound\",reason=\"wrong_identity\"}"
        ) >= 1,
        "{m}"
    );
    Ok(())
}

/// An HTTP/2 (h2c) connection from the app to its proxy, kept open.
async fn h2_conn(
    addr: std::net::SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    Ok(tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_second_certificates_rotate_under_load_without_a_failed_request() -> anyhow::Result<()>
{
    use http_body_util::BodyExt;
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(5)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let (c0, s0) = (renewals(&pair.client), renewals(&pair.server));
    let load = Load::start(pair.outbound, "echo", 200, 8);
    // One long-lived HTTP/2 connection from the app, used every half second throughout.
    let mut h2 = h2_conn(pair.outbound).await?;
    let run = Duration::from_secs(60);
    let start = Instant::now();
    let mut h2_ok = 0;
    while start.elapsed() < run {
        h2.ready().await?;
        let req = hyper::Request::get("http://echo/").body(http_body_util::Empty::new())?;
        let resp = h2.send_request(req).await?;
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await?;
        h2_ok += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let outcomes = load.finish().await;
    let (c, s) = (renewals(&pair.client) - c0, renewals(&pair.server) - s0);
    let total: u64 = outcomes.values().sum();
    let handshakes = counter(
        &pair.client.metrics.encode(),
        "mesh_proxy_tls_handshakes_total{direction=\"outbound\"}",
    );
    figure(&format!(
        "rotation: {total} requests in {run:?}, outcomes {outcomes:?}; renewals client {c}, server {s}; \
         {h2_ok} requests on one app HTTP/2 connection; {handshakes} client-side mesh TLS handshakes"
    ));
    assert_eq!(failures(&outcomes), 0, "{outcomes:?}");
    assert!(
        total >= 10_000,
        "{total} requests: the load did not keep up"
    );
    assert!(c >= 10 && s >= 10, "renewals: client {c}, server {s}");
    assert!(h2_ok >= 100, "{h2_ok}");
    assert!(!h2.is_closed(), "the app's HTTP/2 connection was closed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_outage_is_ridden_out_on_valid_certificates_then_strict_fails_closed()
-> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let mut ca = TestCa::start(Duration::from_secs(12)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let tls = |p: &mesh_proxy::Proxy| p.tls.clone().expect("identity on");
    let (ct, st) = (tls(&pair.client), tls(&pair.server));
    // Stop the CA right after both proxies renewed.
    let (c0, s0) = (renewals(&pair.client), renewals(&pair.server));
    eventually(Duration::from_secs(15), "both proxies to renew", || {
        let done = (renewals(&pair.client) > c0 && renewals(&pair.server) > s0).then_some(());
        async move { done }
    })
    .await?;
    ca.stop();
    let expiries: Vec<_> = [&ct, &st]
        .iter()
        .filter_map(|t| t.identity.current().map(|c| c.not_after))
        .collect();
    let expiry = *expiries.iter().min().expect("certificates");
    let last_expiry = *expiries.iter().max().expect("certificates");
    let stopped = std::time::SystemTime::now();
    let valid_for = expiry.duration_since(stopped).unwrap_or_default();

    // While the certificates are valid, traffic goes on, though renewals fail.
    let load = Load::start(pair.outbound, "echo", 100, 4);
    tokio::time::sleep(valid_for.saturating_sub(Duration::from_millis(1500))).await;
    let during = load.finish().await;
    let failed_renewals = ct.status().failures + st.status().failures;
    figure(&format!(
        "CA outage: certificates valid {valid_for:?} after the CA stopped; {} requests, {} failed; \
         {failed_renewals} failed renewal attempts",
        during.values().sum::<u64>(),
        failures(&during)
    ));
    assert_eq!(failures(&during), 0, "{during:?}");
    assert!(
        failed_renewals >= 2,
        "{failed_renewals} renewal attempts failed"
    );

    // Expired: mesh TLS fails closed; nothing reaches the app in plaintext.
    let left = last_expiry
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(1200)).await;
    assert!(!ct.identity.has_valid_svid() && !st.identity.has_valid_svid());
    let hits = app.hits();
    let mut client = ProxyClient::new(pair.outbound);
    for _ in 0..5 {
        let (status, _) = client.get("echo", "/", &[]).await?;
        assert_ne!(status, 200, "served with expired certificates");
    }
    assert_eq!(app.hits(), hits, "a request reached the app after expiry");
    let inbound = pair.server.inbound_addr.expect("inbound");
    assert_eq!(http_get(inbound, "/").await, None, "plaintext served");

    // The CA is back: proxies recover on their own.
    ca.restart().await?;
    let start = Instant::now();
    eventually(Duration::from_secs(20), "traffic to recover", || async {
        let (status, _) = ProxyClient::new(pair.outbound)
            .get("echo", "/", &[])
            .await
            .ok()?;
        (status == 200).then_some(())
    })
    .await?;
    figure(&format!(
        "CA outage: traffic back {:?} after the CA restarted",
        start.elapsed()
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotates_in_three_steps_under_load() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let old_root = std::fs::read_to_string(ca.path("ca.crt"))?;
    let old_issuer = ca.issuer()?;
    let next = tempfile::tempdir()?;
    mesh_ca::Authority::load_or_generate(
        next.path(),
        "cluster.local",
        std::time::SystemTime::now(),
    )?;
    let new_root = std::fs::read_to_string(next.path().join("ca.crt"))?;
    let new_der = mesh_api::tls::certs_from_pem(&new_root, "new root")
        .map_err(anyhow::Error::msg)?
        .remove(0);
    let proxies = [&pair.client, &pair.server];
    let all = |check: &dyn Fn(&mesh_api::tls::Identity) -> bool| {
        proxies
            .iter()
            .all(|p| p.tls.as_ref().is_some_and(|t| check(&t.identity)))
    };
    let write = |name: &str, text: &str| mesh_e2e::write_atomic(&ca.path(name), text);

    let mut report = Vec::new();
    for step in 1..=3 {
        let load = Load::start(pair.outbound, "echo", 100, 4);
        match step {
            // 1: trust the new root too.
            1 => write("trust-bundle.pem", &new_root)?,
            // 2: sign with the new root, still trusting the old one.
            2 => {
                write("trust-bundle.pem", &old_root)?;
                std::fs::copy(next.path().join("ca.key"), ca.path("ca.key.new"))?;
                std::fs::rename(ca.path("ca.key.new"), ca.path("ca.key"))?;
                write("ca.crt", &new_root)?;
            }
            // 3: stop trusting the old root.
            _ => std::fs::remove_file(ca.path("trust-bundle.pem"))?,
        }
        let want_roots = if step == 3 { 1 } else { 2 };
        eventually(
            Duration::from_secs(15),
            &format!("step {step} to reach both proxies"),
            || {
                let ok = all(&|i| {
                    let chained_to_new = i
                        .current()
                        .is_some_and(|c| c.chain.last() == Some(&new_der));
                    i.bundle().roots().len() == want_roots
                        && i.bundle().roots().contains(&new_der)
                        && (step == 1 || chained_to_new)
                });
                async move { ok.then_some(()) }
            },
        )
        .await?;
        // Let a full lifetime pass on the new state, under load.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let outcomes = load.finish().await;
        report.push((step, outcomes.values().sum::<u64>(), failures(&outcomes)));
        assert_eq!(failures(&outcomes), 0, "step {step}: {outcomes:?}");
    }
    figure(&format!(
        "root rotation (step, requests, failed): {report:?}"
    ));

    // A certificate chained to the removed root is refused now.
    let inbound = pair.server.inbound_addr.expect("inbound");
    let (chain, key) = sign(&good_client(), &old_issuer)?;
    assert!(tls_probe(inbound, chain, key).await.is_err());
    let m = pair.server.metrics.encode();
    assert!(
        counter(
            &m,
            "mesh_proxy_tls_peer_refused_total{direction=\"inbound\",reason=\"untrusted_root\"}"
        ) >= 1,
        "{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_over_tls_checks_each_node_against_its_certificate() -> anyhow::Result<()> {
    use mesh_controller::run::Controller;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: echo-0, namespace: default}\nspec: {serviceAccountName: echo, containers: [{name: app}]}\nstatus: {podIP: 10.0.0.9}\n",
    )?;
    // Without a CA, plaintext xDS only on loopback.
    let mut open = mesh_controller::config::Config::local(dir.path());
    open.xds_addr = "0.0.0.0:0".parse()?;
    let err = Controller::start(open)
        .await
        .expect_err("plaintext on all addresses");
    assert!(err.to_string().contains("only on loopback"), "{err}");

    let mut config = mesh_controller::config::Config::local(dir.path());
    config.ca_addr = Some(ca.addr().to_string());
    config.ca_root = Some(ca.path("ca.crt"));
    config.ca_token_file = ca.token_file("mesh-system", "mesh-controller")?;
    config.xds_plaintext_addr = Some("127.0.0.1:0".parse()?);
    let controller = Controller::start(config).await?;
    let identity = controller.identity.clone().expect("TLS xDS");
    mesh_e2e::identity::wait_for_svid(&identity, "the controller").await?;

    let proxy = |node: &str,
                 sa: Option<&str>,
                 xds: std::net::SocketAddr|
     -> anyhow::Result<mesh_proxy::Config> {
        let mut c = mesh_proxy::Config::local(xds, node);
        if let Some(sa) = sa {
            ca.identify(&mut c, sa)?;
            c.xds_tls = mesh_proxy::config::XdsTls::On;
        }
        Ok(c)
    };
    // A proxy whose certificate matches its node gets its config over TLS.
    let good = mesh_proxy::Proxy::start(
        proxy("default/echo-0", Some("echo"), controller.xds_addr)?,
        None,
    )
    .await?;
    tokio::time::timeout(Duration::from_secs(10), good.store.ready()).await?;

    // Claiming a pod that runs as another service account: refused. (A node in another
    // namespace than its certificate is refused too, as the controller's unit tests show;
    // mesh-proxy itself always asks for its node's namespace.)
    let liar = mesh_proxy::Proxy::start(
        proxy("default/echo-0", Some("client"), controller.xds_addr)?,
        None,
    )
    .await?;
    // Plaintext on the TLS port: no handshake, no config.
    let plain =
        mesh_proxy::Proxy::start(proxy("default/tool", None, controller.xds_addr)?, None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (what, p) in [("liar", &liar), ("plaintext", &plain)] {
        assert!(!p.store.is_ready(), "{what} got a config");
    }
    let (code, m) = http_get(controller.admin_addr, "/metrics")
        .await
        .ok_or_else(|| anyhow::anyhow!("no metrics"))?;
    assert_eq!(code, 200);
    assert!(
        counter(&m, "mesh_controller_xds_node_refused_total") >= 1,
        "{m}"
    );

    // Tools and a stock Envoy use the plaintext loopback listener.
    let tool_addr = controller.xds_plaintext_addr.expect("plaintext listener");
    let tool = mesh_proxy::Proxy::start(proxy("default/tool", None, tool_addr)?, None).await?;
    tokio::time::timeout(Duration::from_secs(10), tool.store.ready()).await?;
    Ok(())
}

/// `mesh-proxy agent --sds-socket` for pod `default/<pod>` as service account `sa`, and the
/// socket it serves, once it serves.
async fn agent(
    ca: &TestCa,
    dir: &std::path::Path,
    pod: &str,
    sa: &str,
) -> anyhow::Result<(mesh_e2e::Peer, std::path::PathBuf)> {
    let socket = dir.join(format!("{pod}.sock"));
    let agent = mesh_e2e::Peer::spawn(
        ca.agent_command(&format!("default/{pod}"), sa)?
            .arg("--sds-socket")
            .arg(&socket),
        dir.join(format!("{pod}-agent.log")),
    )?;
    eventually(Duration::from_secs(10), "the agent's socket", || async {
        socket.exists().then_some(())
    })
    .await?;
    Ok((agent, socket))
}

/// A stock Envoy started with `args`, as the sidecar of its node's pod running as service
/// account `sa`: its SVID over SDS from an agent of its own, its files (bootstrap, log, socket)
/// in a directory of its own under `dir`. Returns the agent and the Envoy.
async fn envoy_sidecar(
    bin: &std::path::Path,
    ca: &TestCa,
    dir: &std::path::Path,
    sa: &str,
    args: meshctl::cmd::bootstrap::EnvoyArgs,
) -> anyhow::Result<(mesh_e2e::Peer, mesh_e2e::Peer)> {
    let pod = args.node.rsplit('/').next().unwrap_or_default().to_string();
    let own = dir.join(&pod);
    std::fs::create_dir_all(&own)?;
    let (agent, socket) = agent(ca, &own, &pod, sa).await?;
    let args = meshctl::cmd::bootstrap::EnvoyArgs {
        sds_socket: Some(socket),
        ..args
    };
    let bootstrap = meshctl::cmd::bootstrap::envoy(&args)?;
    let envoy = start_envoy(bin, &bootstrap, &own, args.admin).await?;
    Ok((agent, envoy))
}

/// SVID updates an Envoy took over SDS (its `sds.default.update_success`).
async fn envoy_renewals(admin: std::net::SocketAddr) -> u64 {
    let (_, stats) = http_get(admin, "/stats?filter=^sds%5C.default%5C.update_success")
        .await
        .unwrap_or_default();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("sds.default.update_success: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Envoy as a full sidecar under STRICT, its SVID from the agent's socket: Envoy to Envoy,
/// Envoy to mesh-proxy and mesh-proxy to Envoy, each at 200 rps while 5 s certificates
/// rotate on every side, with no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mesh_proxy_rotate_five_second_certificates_in_every_direction()
-> anyhow::Result<()> {
    use meshctl::cmd::bootstrap::EnvoyArgs;
    let Some(envoy_bin) = mesh_e2e::peer("MESH_ENVOY", "envoy") else {
        return Ok(());
    };
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(5)).await?;
    let mesh = LocalMesh::start().await?;
    // mesh-proxy: the server of Service echo, and a client.
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    let dir = tempfile::tempdir()?;
    let p = app.addr.port();
    // Envoy: the server of Service echo-envoy (pod 127.0.0.2, its inbound listener on the app's
    // port there, the app behind it on 127.0.0.1), and a client.
    mesh.write(
        "echo-envoy.yaml",
        &format!(
            "apiVersion: v1
kind: Service
metadata: {{name: echo-envoy, namespace: default}}
spec: {{clusterIP: 10.96.1.2, selector: {{app: echo-envoy}}, ports: [{{name: http, port: 80, targetPort: {p}, protocol: TCP}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-envoy-0, namespace: default, labels: {{app: echo-envoy, mesh.dev/proxy: 'true'}}}}
spec: {{serviceAccountName: echo, containers: [{{name: app, ports: [{{containerPort: {p}}}]}}]}}
status: {{podIP: 127.0.0.2}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: echo-envoy-1, namespace: default, labels: {{kubernetes.io/service-name: echo-envoy}}}}
addressType: IPv4
ports: [{{name: http, port: {p}, protocol: TCP}}]
endpoints: [{{addresses: ['127.0.0.2'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: echo-envoy-0, namespace: default}}}}]
"
        ),
    )?;
    let xds = mesh.controller.xds_addr.to_string();
    let server_admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (_server_agent, server) = envoy_sidecar(
        &envoy_bin,
        &ca,
        dir.path(),
        "echo",
        EnvoyArgs {
            admin: server_admin,
            outbound_http: format!("127.0.0.1:{}", free_port()).parse()?,
            transparent: true,
            inbound_addr: Some("127.0.0.2".parse()?),
            inbound_port: Some(p),
            outbound_port: Some(free_port()),
            ..EnvoyArgs::new("default/echo-envoy-0", &xds)
        },
    )
    .await?;
    let client_admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let envoy_out: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let (_client_agent, client) = envoy_sidecar(
        &envoy_bin,
        &ca,
        dir.path(),
        "client",
        EnvoyArgs {
            admin: client_admin,
            outbound_http: envoy_out,
            ..EnvoyArgs::new("default/envoy-client-0", &xds)
        },
    )
    .await?;
    // A mesh-proxy client with the explicit listener the load speaks to.
    let mut cc = mesh.proxy_config("default/mesh-client-0");
    ca.identify(&mut cc, "client")?;
    let mesh_client = mesh.proxy(cc).await?;
    let mesh_out = mesh_client
        .outbound_http_addr
        .ok_or_else(|| anyhow::anyhow!("mesh-proxy client without an explicit listener"))?;
    let directions = [
        ("Envoy to Envoy", envoy_out, "echo-envoy"),
        ("Envoy to mesh-proxy", envoy_out, "echo"),
        ("mesh-proxy to Envoy", mesh_out, "echo-envoy"),
    ];
    for (what, via, host) in directions {
        let ready = eventually(Duration::from_secs(20), what, || async move {
            let mut c = ProxyClient::new(via);
            let (status, body) = c.get(host, "/", &[]).await.ok()?;
            (status == 200 && body == "echo-app").then_some(())
        })
        .await;
        if let Err(e) = ready {
            anyhow::bail!(
                "{e}\nclient Envoy:\n{}\nserver Envoy:\n{}",
                client.log_text(),
                server.log_text()
            );
        }
    }
    let before = (
        envoy_renewals(client_admin).await,
        envoy_renewals(server_admin).await,
        renewals(&mesh_client),
        renewals(&pair.server),
    );
    let loads: Vec<(&str, Load)> = directions
        .iter()
        .map(|(what, via, host)| (*what, Load::start(*via, host, 200, 8)))
        .collect();
    let run = Duration::from_secs(20);
    tokio::time::sleep(run).await;
    let mut figures = Vec::new();
    let mut failed = Vec::new();
    for (what, load) in loads {
        let outcomes = load.finish().await;
        let total: u64 = outcomes.values().sum();
        let bad = failures(&outcomes);
        figures.push(format!("{what} {bad}/{total} failed"));
        if bad > 0 || total < 3_000 {
            failed.push(format!("{what}: {total} requests, {outcomes:?}"));
        }
    }
    let after = (
        envoy_renewals(client_admin).await,
        envoy_renewals(server_admin).await,
        renewals(&mesh_client),
        renewals(&pair.server),
    );
    let renewed = (
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        after.3 - before.3,
    );
    figure(&format!(
        "Envoy as a sidecar (SVID over the agent's SDS socket), STRICT, 5 s certificates, 200 rps each way for {run:?}: {}; renewals Envoy client {}, Envoy server {}, mesh-proxy client {}, mesh-proxy server {}",
        figures.join(", "),
        renewed.0,
        renewed.1,
        renewed.2,
        renewed.3
    ));
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(
        renewed.0 >= 4 && renewed.1 >= 4 && renewed.2 >= 4 && renewed.3 >= 4,
        "renewals (Envoy client, Envoy server, mesh-proxy client, mesh-proxy server): {renewed:?}"
    );
    Ok(())
}
