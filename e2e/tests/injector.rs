//! The sidecar injector as the Kubernetes API server calls it: HTTPS to
//! `mesh-controller.mesh-system.svc`, its certificate checked against the CA root (the
//! webhook's caBundle) by standard WebPKI rules, an AdmissionReview posted.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use mesh_controller::run::Controller;
use mesh_e2e::identity::TestCa;
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Posts `body` to `/inject` over TLS as the API server would (verifying `name` against
/// `root_pem`); returns the status code and the body.
async fn post(
    addr: std::net::SocketAddr,
    name: &str,
    root_pem: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for c in mesh_api::tls::certs_from_pem(root_pem, "root").map_err(anyhow::Error::msg)? {
        roots.add(c)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_owned())?, tcp)
        .await
        .context("handshake")?;
    let head = format!(
        "POST /inject HTTP/1.1\r\nhost: {name}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut out)).await??;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_serves_reviews_over_tls_with_a_certificate_for_its_service()
-> anyhow::Result<()> {
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let dir = tempfile::tempdir()?;
    // Without a CA there is no certificate to serve the injector with.
    let mut bare = mesh_controller::config::Config::local(dir.path());
    bare.webhook_addr = Some("127.0.0.1:0".parse()?);
    let err = Controller::start(bare).await.expect_err("no CA");
    assert!(err.to_string().contains("--webhook-addr"), "{err}");

    let mut config = mesh_controller::config::Config::local(dir.path());
    config.ca_addr = Some(ca.addr().to_string());
    config.ca_root = Some(ca.path("ca.crt"));
    config.ca_token_file = ca.token_file("mesh-system", "mesh-controller")?;
    config.webhook_addr = Some("127.0.0.1:0".parse()?);
    config.inject_proxy_image = "registry.example/mesh-proxy:v9".into();
    config.inject_init_image = "registry.example/mesh-proxy-init:v9".into();
    config.inject_proxy_resources = Some(json!({"limits": {"memory": "64Mi"}}));
    let controller = Controller::start(config).await?;
    let addr = controller.webhook_addr.context("webhook address")?;
    let identity = controller.identity.clone().context("identity")?;
    mesh_e2e::identity::wait_for_svid(&identity, "the controller").await?;
    let root = std::fs::read_to_string(ca.path("ca.crt"))?;

    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "e911857d-c318-11e8-bbad-025000000001", "operation": "CREATE",
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "reviews-v1-0", "namespace": "shop"},
                "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "image": "reviews:1"}]}}}
    });
    let (code, body) = post(
        addr,
        "mesh-controller.mesh-system.svc",
        &root,
        &serde_json::to_vec(&review)?,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let resp: Value = serde_json::from_str(&body)?;
    assert_eq!(
        resp["response"]["uid"],
        "e911857d-c318-11e8-bbad-025000000001"
    );
    assert_eq!(resp["response"]["allowed"], true);
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().context("a patch")?)?;
    let patch = String::from_utf8(patch)?;
    for want in [
        "\"image\":\"registry.example/mesh-proxy:v9\"",
        "\"image\":\"registry.example/mesh-proxy-init:v9\"",
        "\"restartPolicy\":\"Always\"",
        "64Mi",
        "mesh-init",
    ] {
        assert!(patch.contains(want), "{want} not in {patch}");
    }

    // A malformed review: 400 with the reason, and the injector keeps serving.
    let (code, body) = post(
        addr,
        "mesh-controller.mesh-system.svc",
        &root,
        b"{\"kind\": \"Pod\"}",
    )
    .await?;
    assert_eq!(code, 400);
    assert!(body.contains("not an AdmissionReview"), "{body}");

    // The certificate is for the controller's Service only.
    let err = post(addr, "mesh-ca.mesh-system.svc", &root, b"{}")
        .await
        .expect_err("another name");
    assert!(format!("{err:#}").contains("handshake"), "{err:#}");
    Ok(())
}
