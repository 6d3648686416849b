//! A Gateway of our GatewayClass, served by a stock Envoy 1.40 joined with `meshctl bootstrap
//! envoy --gateway`: HTTP by Host, HTTPS by SNI with the listener's certificate from a Secret,
//! listener isolation, and 404 for a host no listener serves.

use std::time::Duration;

use base64::Engine;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_e2e::{Backend, eventually, free_port, peer, start_envoy, system_peer};
use meshctl::cmd::bootstrap::{EnvoyArgs, envoy};

/// A self-signed certificate for `hosts` and its key, as PEM.
fn self_signed(hosts: &[&str]) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?
            .self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn tls_secret(ns: &str, name: &str, cert: &str, key: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: {name}, namespace: {ns}}}\ndata: {{tls.crt: {}, tls.key: {}}}\n",
        b64(cert),
        b64(key)
    )
}

/// `curl` through the gateway: `(status, body)`; HTTPS with SNI `host` resolved to the gateway
/// and the certificate checked against `ca`.
async fn curl(
    curl: &std::path::Path,
    scheme: &str,
    host: &str,
    port: u16,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<(u16, String)> {
    let mut cmd = tokio::process::Command::new(curl);
    cmd.args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"));
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd
        .arg(format!("{scheme}://{host}:{port}/"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    anyhow::ensure!(
        out.status.success(),
        "curl {scheme}://{host}:{port}/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((code.trim().parse()?, body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_a_gateway_by_host_and_by_sni() -> anyhow::Result<()> {
    let Some(envoy_bin) = peer("MESH_ENVOY", "envoy") else {
        return Ok(());
    };
    let Some(curl_bin) = system_peer("curl") else {
        return Ok(());
    };
    let shop = Backend::start("shop").await?;
    let www = Backend::start("www").await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    let (http, https) = (free_port(), free_port());
    let (shop_cert, shop_key) = self_signed(&["shop.example.com"])?;
    let (any_cert, any_key) = self_signed(&["*.example.com"])?;
    let ca = dir.path().join("shop.pem");
    std::fs::write(&ca, &shop_cert)?;
    let any_ca = dir.path().join("any.pem");
    std::fs::write(&any_ca, &any_cert)?;
    let docs = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        service_yaml("infra", "shop", "10.96.0.10", &[("http", 8080)]),
        slice_yaml("infra", "shop", "http", shop.addr.port(), &["127.0.0.1"]),
        service_yaml("infra", "www", "10.96.0.11", &[("http", 8080)]),
        slice_yaml("infra", "www", "http", www.addr.port(), &["127.0.0.1"]),
        tls_secret("infra", "shop-cert", &shop_cert, &shop_key),
        tls_secret("infra", "any-cert", &any_cert, &any_key),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: http, port: {http}, protocol: HTTP}}\n  - {{name: shop, port: {https}, protocol: HTTPS, hostname: shop.example.com, tls: {{certificateRefs: [{{name: shop-cert}}]}}}}\n  - {{name: any, port: {https}, protocol: HTTPS, hostname: '*.example.com', tls: {{certificateRefs: [{{name: any-cert}}]}}}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [shop.example.com]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: www, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [www.example.com]\n  rules: [{backendRefs: [{name: www, port: 8080}]}]\n".into(),
    ];
    std::fs::write(cfg.join("gateway.yaml"), docs.join("---\n"))?;
    let ctl = Controller::start(Config::local(&cfg)).await?;

    let admin_port = free_port();
    let bootstrap = envoy(&EnvoyArgs {
        admin: format!("127.0.0.1:{admin_port}").parse()?,
        gateway: Some("edge".into()),
        gateway_addr: Some("127.0.0.1".parse()?),
        ..EnvoyArgs::new("infra/edge-0", &ctl.xds_addr.to_string())
    })?;
    let admin = format!("127.0.0.1:{admin_port}").parse()?;
    let envoy_proc = start_envoy(&envoy_bin, &bootstrap, dir.path(), admin).await?;

    // Each host to its route's backend, over HTTP and, by SNI, over HTTPS.
    let served = eventually(Duration::from_secs(10), "the gateway to serve", || async {
        curl(&curl_bin, "http", "shop.example.com", http, None)
            .await
            .ok()
            .filter(|(code, _)| *code == 200)
    })
    .await;
    if let Err(e) = served {
        anyhow::bail!("{e}\nEnvoy log:\n{}", envoy_proc.log_text());
    }
    for (scheme, host, port, ca, want) in [
        ("http", "shop.example.com", http, None, (200, "shop")),
        ("http", "www.example.com", http, None, (200, "www")),
        ("http", "other.org", http, None, (404, "")),
        ("https", "shop.example.com", https, Some(&ca), (200, "shop")),
        (
            "https",
            "www.example.com",
            https,
            Some(&any_ca),
            (200, "www"),
        ),
        // Taken by the wildcard listener, which has no route for it.
        ("https", "api.example.com", https, Some(&any_ca), (404, "")),
    ] {
        let (code, body) = curl(&curl_bin, scheme, host, port, ca.map(|p| p.as_path())).await?;
        assert_eq!((code, body.as_str()), want, "{scheme}://{host}:{port}/");
    }
    // The shop listener presents its own certificate: the wildcard one does not verify it.
    let wrong = curl(&curl_bin, "https", "shop.example.com", https, Some(&any_ca)).await;
    assert!(
        wrong.is_err(),
        "shop.example.com verified with the wildcard's CA: {wrong:?}"
    );
    Ok(())
}
