//! A Gateway of our GatewayClass, served by a stock Envoy 1.40 joined with `meshctl bootstrap
//! envoy --gateway` and by mesh-proxy with `--gateway`, giving the same answers: on the
//! network-namespace cluster with clients outside every pod, the conformance cases and a
//! certificate rotated under load; and, each proxy on its own loopback address, HTTP by Host,
//! HTTPS by SNI with the listener's certificate from a Secret, listener isolation, 404 for a
//! host no listener serves, a listener on a taken port, a rate limit on a listener and the
//! gateway's telemetry.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_controller::testing::{service_yaml, slice_yaml, tls_secret_yaml as tls_secret};
use mesh_e2e::cluster::{App, Cluster, ServiceDef, Sidecar, Workload};
use mesh_e2e::netns::{self, NetnsCluster};
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

/// The controller on a directory (`dir/config`) of `files` (name, YAML).
async fn controller(dir: &std::path::Path, files: &[(&str, String)]) -> anyhow::Result<Controller> {
    let cfg = dir.join("config");
    std::fs::create_dir_all(&cfg)?;
    for (name, text) in files {
        std::fs::write(cfg.join(name), text)?;
    }
    let mut config = Config::local(&cfg);
    // Its proxies' metrics scraped often, so that the service graph shows the tests' requests.
    config.stats_interval = Duration::from_millis(250);
    Ok(Controller::start(config).await?)
}

/// Which proxy serves the Gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    Envoy,
    MeshProxy,
}

/// A proxy of the Gateway `gateway` of namespace `infra`, joined to the controller as pod
/// `infra/<gateway>-<n>`, its listeners on `ip`: a stock Envoy (`meshctl bootstrap envoy
/// --gateway`) or mesh-proxy (`--gateway`), both plaintext to the controller and backends.
struct GatewayProxy {
    serving: Serving,
    ip: std::net::IpAddr,
    envoy: Option<mesh_e2e::Peer>,
    _proxy: Option<mesh_proxy::Proxy>,
}

impl GatewayProxy {
    /// `envoy_bin`: Envoy, for [`Serving::Envoy`].
    async fn start(
        serving: Serving,
        envoy_bin: Option<&std::path::Path>,
        ctl: &Controller,
        dir: &std::path::Path,
        gateway: &str,
        ip: std::net::IpAddr,
    ) -> anyhow::Result<Self> {
        let (envoy, proxy) = match serving {
            Serving::Envoy => {
                let envoy_bin = envoy_bin.context("Envoy as the gateway needs Envoy")?;
                let admin_port = free_port();
                let bootstrap = envoy(&EnvoyArgs {
                    admin: format!("127.0.0.1:{admin_port}").parse()?,
                    gateway: Some(gateway.into()),
                    gateway_addr: Some(ip),
                    ..EnvoyArgs::new(&format!("infra/{gateway}-0"), &ctl.xds_addr.to_string())
                })?;
                let admin = format!("127.0.0.1:{admin_port}").parse()?;
                let log_dir = dir.join(format!("envoy-{ip}"));
                std::fs::create_dir_all(&log_dir)?;
                (
                    Some(start_envoy(envoy_bin, &bootstrap, &log_dir, admin).await?),
                    None,
                )
            }
            Serving::MeshProxy => {
                let mut pc = mesh_proxy::Config::local(ctl.xds_addr, &format!("infra/{gateway}-1"));
                pc.gateway = Some(gateway.into());
                pc.gateway_addr = ip;
                (None, Some(mesh_proxy::Proxy::start(pc, None).await?))
            }
        };
        Ok(Self {
            serving,
            ip,
            envoy,
            _proxy: proxy,
        })
    }

    /// What to show when it does not serve: Envoy's log (mesh-proxy logs with the test).
    fn log_text(&self) -> String {
        match &self.envoy {
            Some(e) => format!("Envoy log:\n{}", e.log_text()),
            None => "mesh-proxy's log is the test's output".into(),
        }
    }
}

/// The proxies of the Gateway: mesh-proxy on `ips.0`, and Envoy on `ips.1` when it is here
/// (`MESH_REQUIRE_PEERS` makes its absence fail). Each test has loopback addresses of its own,
/// so that no other test's proxy can take its ports (Envoy binds with SO_REUSEPORT).
async fn proxies(
    ctl: &Controller,
    dir: &std::path::Path,
    gateway: &str,
    ips: (&str, &str),
) -> anyhow::Result<Vec<GatewayProxy>> {
    let envoy_bin = peer("MESH_ENVOY", "envoy");
    let mut out = vec![
        GatewayProxy::start(Serving::MeshProxy, None, ctl, dir, gateway, ips.0.parse()?).await?,
    ];
    if let Some(bin) = &envoy_bin {
        out.push(
            GatewayProxy::start(Serving::Envoy, Some(bin), ctl, dir, gateway, ips.1.parse()?)
                .await?,
        );
    }
    Ok(out)
}

/// A port free on every one of `ips` (each test's gateway proxies listen on their own).
fn port_on(ips: &[&str]) -> u16 {
    loop {
        let first =
            std::net::TcpListener::bind(format!("{}:0", ips[0])).expect("an ephemeral port");
        let port = first.local_addr().expect("bound").port();
        let rest: Result<Vec<_>, _> = ips[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind(format!("{ip}:{port}")))
            .collect();
        if rest.is_ok() {
            return port;
        }
    }
}

/// `curl` through the gateway: `(status, body)`; HTTPS with SNI `host` resolved to the gateway
/// and the certificate checked against `ca`; the HTTP version is `2` when ALPN chose h2.
async fn curl(
    curl: &std::path::Path,
    scheme: &str,
    (host, ip, port): (&str, std::net::IpAddr, u16),
    ca: Option<&std::path::Path>,
) -> anyhow::Result<(u16, String, String)> {
    let mut cmd = tokio::process::Command::new(curl);
    cmd.args([
        "-sS",
        "--max-time",
        "5",
        "-w",
        "\n%{http_version} %{http_code}",
    ])
    .arg("--resolve")
    .arg(format!("{host}:{port}:{ip}"));
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd
        .arg(format!("{scheme}://{host}:{port}/"))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, code) = last.split_once(' ').unwrap_or(("", last));
    anyhow::ensure!(
        out.status.success(),
        "curl {scheme}://{host}:{port}/ at {ip}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((code.trim().parse()?, body.to_string(), version.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mesh_proxy_serve_a_gateway_by_host_and_by_sni() -> anyhow::Result<()> {
    let Some(curl_bin) = system_peer("curl") else {
        return Ok(());
    };
    const IPS: (&str, &str) = ("127.0.0.11", "127.0.0.12");
    let shop = Backend::start("shop").await?;
    let www = Backend::start("www").await?;
    let dir = tempfile::tempdir()?;
    let (http, https) = (port_on(&[IPS.0, IPS.1]), port_on(&[IPS.0, IPS.1]));
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
        // A Gateway whose certificate is missing, for `meshctl check`.
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: broken, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: https, port: 1, protocol: HTTPS, tls: {certificateRefs: [{name: missing}]}}\n".to_string(),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: http, port: {http}, protocol: HTTP}}\n  - {{name: shop, port: {https}, protocol: HTTPS, hostname: shop.example.com, tls: {{certificateRefs: [{{name: shop-cert}}]}}}}\n  - {{name: any, port: {https}, protocol: HTTPS, hostname: '*.example.com', tls: {{certificateRefs: [{{name: any-cert}}]}}}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [shop.example.com]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: www, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [www.example.com]\n  rules: [{backendRefs: [{name: www, port: 8080}]}]\n".into(),
    ];
    let ctl = controller(dir.path(), &[("gateway.yaml", docs.join("---\n"))]).await?;
    let proxies = proxies(&ctl, dir.path(), "edge", IPS).await?;

    // Each host to its route's backend, over HTTP and, by SNI, over HTTPS (ALPN h2, as curl
    // offers it), from either proxy.
    for gp in &proxies {
        let ip = gp.ip;
        // Each listener warms apart (the HTTPS one waits for its certificates too).
        let served = eventually(Duration::from_secs(10), "the gateway to serve", || async {
            let plain = curl(&curl_bin, "http", ("shop.example.com", ip, http), None).await;
            let tls = curl(
                &curl_bin,
                "https",
                ("shop.example.com", ip, https),
                Some(&ca),
            )
            .await;
            (plain.is_ok_and(|r| r.0 == 200) && tls.is_ok_and(|r| r.0 == 200)).then_some(())
        })
        .await;
        if let Err(e) = served {
            anyhow::bail!("{:?}: {e}\n{}", gp.serving, gp.log_text());
        }
        for (scheme, host, port, ca, want) in [
            ("http", "shop.example.com", http, None, (200, "shop", "1.1")),
            ("http", "www.example.com", http, None, (200, "www", "1.1")),
            ("http", "other.org", http, None, (404, "", "1.1")),
            (
                "https",
                "shop.example.com",
                https,
                Some(&ca),
                (200, "shop", "2"),
            ),
            (
                "https",
                "www.example.com",
                https,
                Some(&any_ca),
                (200, "www", "2"),
            ),
            // Taken by the wildcard listener, which has no route for it.
            (
                "https",
                "api.example.com",
                https,
                Some(&any_ca),
                (404, "", "2"),
            ),
        ] {
            let (code, body, version) =
                curl(&curl_bin, scheme, (host, ip, port), ca.map(|p| p.as_path())).await?;
            // A backend's body is its name; the proxy's own 404 says why in mesh-proxy's
            // words and in none in Envoy's, and is no backend's.
            let body = if code == 404 && !["shop", "www"].contains(&body.as_str()) {
                ""
            } else {
                body.as_str()
            };
            assert_eq!(
                (code, body, version.as_str()),
                want,
                "{:?}: {scheme}://{host}:{port}/",
                gp.serving
            );
        }
        // The shop listener presents its own certificate: the wildcard one does not verify it.
        let wrong = curl(
            &curl_bin,
            "https",
            ("shop.example.com", ip, https),
            Some(&any_ca),
        )
        .await;
        assert!(
            wrong
                .as_ref()
                .is_err_and(|e| format!("{e:#}").contains("SSL certificate problem")),
            "{:?}: shop.example.com verified with the wildcard's CA: {wrong:?}",
            gp.serving
        );
    }

    // The gateway's requests are edges of the service graph, from the Gateway's workload
    // (mesh-proxy's; the controller scrapes the metrics its proxies report, and counts what
    // they sent since it first scraped them).
    let mesh_ip = proxies[0].ip;
    let edges = eventually(Duration::from_secs(10), "the gateway's edges", || async {
        curl(&curl_bin, "http", ("shop.example.com", mesh_ip, http), None)
            .await
            .ok()?;
        let (_, body) = mesh_e2e::http_get(ctl.admin_addr, "/debug/edges").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["edges"]
            .as_array()?
            .iter()
            .find(|e| {
                e["src"]["workload"] == "edge"
                    && e["src"]["namespace"] == "infra"
                    && e["requests"].as_f64().is_some_and(|n| n > 0.0)
            })
            .cloned()
    })
    .await?;
    println!("the gateway in the service graph: {edges}");

    // meshctl check: the served Gateway is fine; the broken one fails with a hint and has no
    // proxy.
    use meshctl::cmd::check::{CheckArgs, Status, run_checks};
    let args = CheckArgs::local(ctl.admin_addr, "127.0.0.1:1".parse()?);
    let gateway_checks =
        |checks: Vec<meshctl::cmd::check::Check>| -> Vec<(Status, String, String)> {
            checks
                .into_iter()
                .filter(|c| c.category == "gateways")
                .map(|c| (c.status, c.message, c.hint.unwrap_or_default()))
                .collect()
        };
    let checks = eventually(Duration::from_secs(5), "edge to be served", || async {
        let g = gateway_checks(run_checks(&args, None).await);
        g.iter()
            .any(|(s, m, _)| {
                *s == Status::Ok
                    && m.starts_with("Gateway infra/edge: every listener valid")
                    && m.contains("served by")
                    && m.contains("infra/edge-0")
                    && m.contains("infra/edge-1")
            })
            .then_some(g)
    })
    .await?;
    assert!(
        checks.iter().any(|(s, m, h)| *s == Status::Fail
            && m.starts_with("Gateway infra/broken listener https: InvalidCertificateRef:")
            && m.contains("no Secret infra/missing")
            && h.contains("create the Secret")),
        "{checks:?}"
    );
    assert!(
        checks.iter().any(|(s, m, h)| *s == Status::Warn
            && m == "Gateway infra/broken: no gateway proxy is connected, so nothing serves it"
            && h.contains("--gateway broken")),
        "{checks:?}"
    );
    Ok(())
}

/// One request to the gateway and what it must get.
struct Case {
    /// The upstream conformance test it re-expresses (`conformance/tests/<file>.go`).
    from: &'static str,
    /// Which listener port (an index into the ports the test picked).
    port: usize,
    method: &'static str,
    host: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    /// Response headers that must be there (the backend's name is `x-demo-service`), and what
    /// the backend saw as `x-seen-host`, `x-seen-path` and `x-seen-<header>`; `{port}` stands
    /// for the port the request went to, and `{scheme}` for its scheme.
    want: &'static [(&'static str, &'static str)],
    /// Response headers that must not be.
    absent: &'static [&'static str],
}

/// How a case's requests reach the gateway: plain HTTP, or HTTPS with the case's host as SNI
/// and the gateway's certificate checked against a CA file (ALPN offers h2, which both
/// proxies choose).
#[derive(Clone, Copy)]
enum Scheme<'a> {
    Http,
    Https(&'a std::path::Path),
}

impl Scheme<'_> {
    fn name(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https(_) => "https",
        }
    }
}

/// curl's arguments to reach the gateway at `ip:port` for `host` over `scheme` (the
/// certificate checked against the CA file over HTTPS).
fn curl_to(scheme: Scheme<'_>, (ip, port): (Ipv4Addr, u16), host: &str) -> Vec<String> {
    let mut args = vec!["--resolve".to_string(), format!("{host}:{port}:{ip}")];
    if let Scheme::Https(ca) = scheme {
        args.extend(["--cacert".into(), ca.display().to_string()]);
    }
    args
}

/// curl with `args` in the cluster's node's network namespace, outside every pod: its output;
/// killed, and an error, when it has not ended `within`.
async fn curl_from_node(
    c: &NetnsCluster,
    args: &[String],
    within: Duration,
) -> anyhow::Result<std::process::Output> {
    // `ip netns exec` enters the namespace and execs curl: the child is curl itself.
    let run = tokio::process::Command::new("ip")
        .args(["netns", "exec", c.node_netns(), "curl"])
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(within, run).await {
        Ok(out) => Ok(out?),
        Err(_) => anyhow::bail!("curl {args:?} did not end in {within:?}"),
    }
}

/// `curl -i` from the cluster's node to the gateway at `ip:port`: the status, the response
/// headers (names lowercased), and what the echo backend saw (`meshctl demo-service --echo`'s
/// JSON) as `x-seen-host`, `x-seen-path` and `x-seen-<header>` (values joined by commas).
async fn exchange(
    cluster: &NetnsCluster,
    scheme: Scheme<'_>,
    to: (Ipv4Addr, u16),
    c: &Case,
) -> anyhow::Result<(u16, BTreeMap<String, String>)> {
    let mut args = curl_to(scheme, to, c.host);
    args.extend(["-sS", "-i", "--max-time", "5", "-X", c.method].map(String::from));
    for (k, v) in c.headers {
        args.extend(["-H".into(), format!("{k}: {v}")]);
    }
    args.push(format!("{}://{}:{}{}", scheme.name(), c.host, to.1, c.path));
    let out = curl_from_node(cluster, &args, Duration::from_secs(10)).await?;
    anyhow::ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let first = lines.next().unwrap_or_default();
    anyhow::ensure!(
        matches!(scheme, Scheme::Http) || first.starts_with("HTTP/2 "),
        "over HTTPS ALPN chose {first:?}, want h2"
    );
    let status = Some(first)
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if let Ok(seen) = serde_json::from_str::<serde_json::Value>(body) {
        for k in ["host", "path"] {
            if let Some(v) = seen[k].as_str() {
                headers.insert(format!("x-seen-{k}"), v.to_string());
            }
        }
        for (k, values) in seen["headers"].as_object().into_iter().flatten() {
            let values: Vec<&str> = values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .collect();
            headers.insert(format!("x-seen-{k}"), values.join(","));
        }
    }
    Ok((status, headers))
}

/// A redirect's `Location` as the suite compares it: the well-known port of its scheme and no
/// port are the same.
fn location(l: &str) -> String {
    let (scheme, rest) = l.split_once("://").unwrap_or(("", l));
    let default = if scheme == "https" { ":443/" } else { ":80/" };
    format!("{scheme}://{}", rest.replacen(default, "/", 1))
}

/// Cases of the upstream Gateway API conformance suite (HTTPRoute and Gateway, core and the
/// extended features mesh serves), re-expressed on the network-namespace cluster: the Gateway
/// `infra/gw` served at once by the pod of the Deployment the controller provisions for it
/// (mesh-proxy) and by a pod running a stock Envoy in its place, both configured by the
/// controller, and every case asked of both with curl from the cluster's node, outside every
/// pod: listener selection by `allowedRoutes`, hostname intersection, path, header, query and
/// method matching across routes, request and response header modifiers, redirects (host,
/// status, path, scheme, port), rewrites, cross-namespace backends with and without a
/// ReferenceGrant, invalid backends, and weights; each over HTTP and over HTTPS with SNI and
/// h2. The backends are meshed echo servers (`meshctl demo-service --echo`), reached over mesh
/// TLS; the routes' status conditions are the suite's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mesh_proxy_as_the_gateway_answer_the_conformance_cases_from_outside()
-> anyhow::Result<()> {
    netns::require()?;
    let envoy_bin = peer("MESH_ENVOY", "envoy");
    let mut c = NetnsCluster::start().await?;
    // STRICT: a backend answers the gateway over mesh TLS only.
    for ns in ["infra", "app", "web"] {
        c.label_namespace(ns, &[("mesh.dev/mtls-mode", "STRICT")])?;
    }
    c.label_namespace("app", &[("gateway-conformance", "backend")])?;
    for (ns, name) in BACKENDS {
        echo_backend(&mut c, ns, name).await?;
    }
    let mut docs = vec![
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
    ];
    // Ports: 0 every namespace, 1 the same namespace only, 2 namespaces labelled
    // gateway-conformance: backend, 3 a listener for *.wildcard.io and one for
    // very.specific.com on the same port; 4 to 7 the same listeners over HTTPS (`<name>-tls`),
    // with one certificate for every host the cases ask for.
    let ports: [u16; 8] = [8000, 8001, 8002, 8003, 8443, 8444, 8445, 8446];
    let listeners = [
        ("all", "allowedRoutes: {namespaces: {from: All}}"),
        ("same", "allowedRoutes: {namespaces: {from: Same}}"),
        (
            "backends",
            "allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {gateway-conformance: backend}}}}",
        ),
        (
            "wildcard",
            "hostname: '*.wildcard.io', allowedRoutes: {namespaces: {from: All}}",
        ),
        (
            "specific",
            "hostname: very.specific.com, allowedRoutes: {namespaces: {from: All}}",
        ),
    ];
    let mut gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {annotations: {mesh.dev/service-type: ClusterIP}}\n  listeners:\n".to_string();
    for (i, (name, rest)) in listeners.iter().enumerate() {
        let port = i.min(3);
        gateway += &format!(
            "  - {{name: {name}, port: {}, protocol: HTTP, {rest}}}\n",
            ports[port]
        );
        gateway += &format!(
            "  - {{name: {name}-tls, port: {}, protocol: HTTPS, tls: {{certificateRefs: [{{name: conformance-cert}}]}}, {rest}}}\n",
            ports[port + 4]
        );
    }
    docs.push(gateway);
    let (cert, key) = self_signed(&["*.example.com", "*.wildcard.io", "very.specific.com"])?;
    docs.push(tls_secret("infra", "conformance-cert", &cert, &key));
    let route = |ns: &str, name: &str, section: &str, hostnames: &str, rules: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: gw, namespace: infra, sectionName: {section}}}, {{name: gw, namespace: infra, sectionName: {section}-tls}}]\n  hostnames: {hostnames}\n  rules:\n{rules}"
        )
    };
    for r in [
        // httproute-matching, httproute-exact-path-matching, httproute-path-match-order,
        // httproute-header-matching, httproute-query-param-matching, httproute-method-matching.
        route(
            "infra",
            "matching",
            "all",
            "[match.example.com]",
            "  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: Exact, value: /exact}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /v2/example}}]\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n  - matches: [{queryParams: [{name: animal, value: whale}]}]\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n  - matches: [{method: POST}]\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n",
        ),
        // httproute-matching-across-routes: a second route for the same host.
        route(
            "infra",
            "matching-2",
            "all",
            "[match.example.com]",
            "  - matches: [{path: {type: Exact, value: /across}}]\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n",
        ),
        // httproute-request-header-modifier, httproute-response-header-modifier.
        route(
            "infra",
            "headers",
            "all",
            "[headers.example.com]",
            "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-echo-set, value: set}], add: [{name: x-echo-add, value: added}], remove: [x-echo-remove]}\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: x-header-set, value: set}], remove: [x-demo-version]}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
        // httproute-redirect-host-and-status, -path, -scheme, -port, -port-and-scheme.
        route(
            "infra",
            "redirects",
            "all",
            "[redirect.example.com]",
            "  - matches: [{path: {type: PathPrefix, value: /hostname}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]\n  - matches: [{path: {type: PathPrefix, value: /full}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}}]\n  - matches: [{path: {type: PathPrefix, value: /prefix}}]\n    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]\n  - matches: [{path: {type: PathPrefix, value: /scheme}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n  - matches: [{path: {type: PathPrefix, value: /port}}]\n    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]\n  - matches: [{path: {type: PathPrefix, value: /both}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, port: 8443}}]\n",
        ),
        // httproute-rewrite-host, httproute-rewrite-path.
        route(
            "infra",
            "rewrites",
            "all",
            "[rewrite.example.com]",
            "  - matches: [{path: {type: PathPrefix, value: /one}}]\n    filters: [{type: URLRewrite, urlRewrite: {hostname: one.example.org}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /full/one}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
        // httproute-weight: 3 to 1, and 0.
        route(
            "infra",
            "weights",
            "all",
            "[weights.example.com]",
            "  - backendRefs: [{name: infra-backend-v1, port: 8080, weight: 3}, {name: infra-backend-v2, port: 8080, weight: 1}, {name: infra-backend-v3, port: 8080, weight: 0}]\n",
        ),
        // httproute-invalid-cross-namespace-parent-ref: a route of app on the Same listener.
        route(
            "app",
            "not-allowed",
            "same",
            "[cross.example.com]",
            "  - backendRefs: [{name: app-backend-v1, port: 8080}]\n",
        ),
        // The listener's own namespace is allowed there.
        route(
            "infra",
            "allowed",
            "same",
            "[same.example.com]",
            "  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
        // httproute-cross-namespace: app is selected by the listener's selector, web is not.
        route(
            "app",
            "selected",
            "backends",
            "[app.example.com]",
            "  - backendRefs: [{name: app-backend-v1, port: 8080}]\n",
        ),
        route(
            "web",
            "not-selected",
            "backends",
            "[web.example.com]",
            "  - backendRefs: [{name: web-backend, port: 8080}]\n",
        ),
        // httproute-reference-grant and httproute-invalid-cross-namespace-backend-ref.
        route(
            "infra",
            "granted",
            "all",
            "[granted.example.com]",
            "  - backendRefs: [{name: app-backend-v1, namespace: app, port: 8080}]\n",
        ),
        route(
            "infra",
            "not-granted",
            "all",
            "[not-granted.example.com]",
            "  - backendRefs: [{name: web-backend, namespace: web, port: 8080}]\n",
        ),
        // httproute-invalid-nonexistent-backendref, -backendref-unknown-kind,
        // httproute-omitted-backendrefs: 500.
        route(
            "infra",
            "missing",
            "all",
            "[invalid.example.com]",
            "  - matches: [{path: {type: PathPrefix, value: /missing}}]\n    backendRefs: [{name: nowhere, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /none}}]\n",
        ),
        route(
            "infra",
            "unknown-kind",
            "all",
            "[invalid.example.com]",
            "  - matches: [{path: {type: PathPrefix, value: /kind}}]\n    backendRefs: [{group: unknown.example.com, kind: Unknown, name: infra-backend-v1, port: 8080}]\n",
        ),
        // httproute-hostname-intersection, httproute-listener-hostname-matching.
        route(
            "infra",
            "wild",
            "wildcard",
            "['*.wildcard.io', other.org]",
            "  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
        route(
            "infra",
            "exact-wild",
            "wildcard",
            "[exact.wildcard.io]",
            "  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n",
        ),
        route(
            "infra",
            "specific",
            "specific",
            "['*.specific.com']",
            "  - backendRefs: [{name: infra-backend-v3, port: 8080}]\n",
        ),
    ] {
        docs.push(r);
    }
    docs.push("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: infra-routes, namespace: app}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}]\n  to: [{group: '', kind: Service, name: app-backend-v1}]\n".into());
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("conformance.pem");
    std::fs::write(&ca, &cert)?;
    #[rustfmt::skip]
    let cases = [
        Case { from: "httproute-matching", port: 0, method: "GET", host: "match.example.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v1")], absent: &[] },
        Case { from: "httproute-exact-path-matching", port: 0, method: "GET", host: "match.example.com", path: "/exact", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v2")], absent: &[] },
        Case { from: "httproute-exact-path-matching", port: 0, method: "GET", host: "match.example.com", path: "/exact/more", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v1")], absent: &[] },
        Case { from: "httproute-matching", port: 0, method: "GET", host: "match.example.com", path: "/v2", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v2")], absent: &[] },
        Case { from: "httproute-matching", port: 0, method: "GET", host: "match.example.com", path: "/v2abc", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v1")], absent: &[] },
        Case { from: "httproute-header-matching", port: 0, method: "GET", host: "match.example.com", path: "/", headers: &[("version", "two")], status: 200, want: &[("x-demo-service", "infra-backend-v2")], absent: &[] },
        Case { from: "httproute-path-match-order", port: 0, method: "GET", host: "match.example.com", path: "/v2/example", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v3")], absent: &[] },
        Case { from: "httproute-query-param-matching", port: 0, method: "GET", host: "match.example.com", path: "/?animal=whale", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v3")], absent: &[] },
        Case { from: "httproute-method-matching", port: 0, method: "POST", host: "match.example.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v3")], absent: &[] },
        Case { from: "httproute-matching-across-routes", port: 0, method: "GET", host: "match.example.com", path: "/across", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v3")], absent: &[] },
        Case { from: "httproute-request-header-modifier", port: 0, method: "GET", host: "headers.example.com", path: "/", headers: &[("x-echo-set", "original"), ("x-echo-add", "original"), ("x-echo-remove", "gone")], status: 200, want: &[("x-seen-x-echo-set", "set"), ("x-seen-x-echo-add", "original,added"), ("x-header-set", "set")], absent: &["x-seen-x-echo-remove", "x-demo-version"] },
        Case { from: "httproute-redirect-host-and-status", port: 0, method: "GET", host: "redirect.example.com", path: "/hostname", headers: &[], status: 301, want: &[("location", "{scheme}://example.org:{port}/hostname")], absent: &[] },
        Case { from: "httproute-redirect-path", port: 0, method: "GET", host: "redirect.example.com", path: "/full/x", headers: &[], status: 302, want: &[("location", "{scheme}://redirect.example.com:{port}/full-path-replacement")], absent: &[] },
        // The listener's port, whatever the Host says.
        Case { from: "httproute-redirect-path", port: 0, method: "GET", host: "redirect.example.com", path: "/full/x", headers: &[("host", "redirect.example.com")], status: 302, want: &[("location", "{scheme}://redirect.example.com:{port}/full-path-replacement")], absent: &[] },
        Case { from: "httproute-redirect-path", port: 0, method: "GET", host: "redirect.example.com", path: "/prefix/x", headers: &[], status: 302, want: &[("location", "{scheme}://redirect.example.com:{port}/replacement-prefix/x")], absent: &[] },
        Case { from: "httproute-redirect-scheme", port: 0, method: "GET", host: "redirect.example.com", path: "/scheme", headers: &[], status: 302, want: &[("location", "https://redirect.example.com/scheme")], absent: &[] },
        Case { from: "httproute-redirect-port", port: 0, method: "GET", host: "redirect.example.com", path: "/port", headers: &[], status: 302, want: &[("location", "{scheme}://redirect.example.com:8083/port")], absent: &[] },
        Case { from: "httproute-redirect-port-and-scheme", port: 0, method: "GET", host: "redirect.example.com", path: "/both", headers: &[], status: 302, want: &[("location", "https://redirect.example.com:8443/both")], absent: &[] },
        Case { from: "httproute-rewrite-host", port: 0, method: "GET", host: "rewrite.example.com", path: "/one", headers: &[], status: 200, want: &[("x-seen-host", "one.example.org"), ("x-seen-path", "/one")], absent: &[] },
        Case { from: "httproute-rewrite-path", port: 0, method: "GET", host: "rewrite.example.com", path: "/prefix/one/two", headers: &[], status: 200, want: &[("x-seen-path", "/one/two")], absent: &[] },
        Case { from: "httproute-rewrite-path", port: 0, method: "GET", host: "rewrite.example.com", path: "/full/one/two", headers: &[], status: 200, want: &[("x-seen-path", "/one")], absent: &[] },
        Case { from: "httproute-invalid-cross-namespace-parent-ref", port: 1, method: "GET", host: "cross.example.com", path: "/", headers: &[], status: 404, want: &[], absent: &["x-demo-service"] },
        Case { from: "httproute-simple-same-namespace", port: 1, method: "GET", host: "same.example.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v1")], absent: &[] },
        Case { from: "httproute-cross-namespace", port: 2, method: "GET", host: "app.example.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "app-backend-v1")], absent: &[] },
        Case { from: "httproute-cross-namespace", port: 2, method: "GET", host: "web.example.com", path: "/", headers: &[], status: 404, want: &[], absent: &["x-demo-service"] },
        Case { from: "httproute-reference-grant", port: 0, method: "GET", host: "granted.example.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "app-backend-v1")], absent: &[] },
        Case { from: "httproute-invalid-cross-namespace-backend-ref", port: 0, method: "GET", host: "not-granted.example.com", path: "/", headers: &[], status: 500, want: &[], absent: &["x-demo-service"] },
        Case { from: "httproute-invalid-nonexistent-backendref", port: 0, method: "GET", host: "invalid.example.com", path: "/missing", headers: &[], status: 500, want: &[], absent: &[] },
        Case { from: "httproute-invalid-backendref-unknown-kind", port: 0, method: "GET", host: "invalid.example.com", path: "/kind", headers: &[], status: 500, want: &[], absent: &[] },
        Case { from: "httproute-omitted-backendrefs", port: 0, method: "GET", host: "invalid.example.com", path: "/none", headers: &[], status: 500, want: &[], absent: &[] },
        Case { from: "httproute-hostname-intersection", port: 3, method: "GET", host: "a.wildcard.io", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v1")], absent: &[] },
        Case { from: "httproute-hostname-intersection", port: 3, method: "GET", host: "exact.wildcard.io", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v2")], absent: &[] },
        Case { from: "httproute-hostname-intersection", port: 3, method: "GET", host: "other.org", path: "/", headers: &[], status: 404, want: &[], absent: &["x-demo-service"] },
        Case { from: "httproute-hostname-intersection", port: 3, method: "GET", host: "wildcard.io", path: "/", headers: &[], status: 404, want: &[], absent: &["x-demo-service"] },
        Case { from: "httproute-listener-hostname-matching", port: 3, method: "GET", host: "very.specific.com", path: "/", headers: &[], status: 200, want: &[("x-demo-service", "infra-backend-v3")], absent: &[] },
    ];
    c.apply("conformance", &docs.join("---\n")).await?;
    let gateways = gateway_proxies(&mut c, "gw", envoy_bin.is_some()).await?;
    let mut failures = route_conditions(&c).await;
    // The backends' proxies count the mesh TLS connections each peer identity made.
    let from_gateway = |c: &NetnsCluster| -> anyhow::Result<Vec<u64>> {
        BACKENDS
            .iter()
            .map(|(ns, name)| {
                Ok(mesh_api::prom::count(
                    &c.proxy_metrics(ns, &format!("{name}-0"))?,
                    "mesh_proxy_inbound_mtls_connections_total{peer=\"spiffe://cluster.local/ns/infra/sa/gw-gateway\"}",
                ))
            })
            .collect()
    };
    for gw in &gateways {
        let before = from_gateway(&c)?;
        for (scheme, ports) in [
            (Scheme::Http, &ports[..4]),
            (Scheme::Https(&ca), &ports[4..]),
        ] {
            let mine = conformance(&c, gw, scheme, ports, &cases).await?;
            mesh_e2e::figure(&format!(
                "gateway conformance cases through {:?} over {}, curl from the node: {} of {} as the suite expects",
                gw.serving,
                scheme.name(),
                cases.len() + 1 - mine.len(),
                cases.len() + 1
            ));
            failures.extend(
                mine.into_iter()
                    .map(|f| format!("{:?} over {}: {f}", gw.serving, scheme.name())),
            );
        }
        // Every backend a case reaches (all but web's, which no route lets the gateway reach)
        // saw the gateway's identity; STRICT refused anything else.
        let mtls: BTreeMap<&str, u64> = BACKENDS
            .iter()
            .zip(from_gateway(&c)?.into_iter().zip(before))
            .map(|((_, name), (after, before))| (*name, after.saturating_sub(before)))
            .collect();
        mesh_e2e::figure(&format!(
            "{:?} as the gateway: mesh TLS connections from spiffe://cluster.local/ns/infra/sa/gw-gateway per backend {mtls:?}",
            gw.serving
        ));
        let unreached: Vec<&&str> = mtls
            .iter()
            .filter(|(name, n)| **name != "web-backend" && **n == 0)
            .map(|(name, _)| name)
            .collect();
        if !unreached.is_empty() {
            failures.push(format!(
                "{:?}: no mesh TLS connection from the gateway's identity reached {unreached:?}",
                gw.serving
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The conformance backends (namespace, name), each a Service and one meshed echo pod.
const BACKENDS: [(&str, &str); 5] = [
    ("infra", "infra-backend-v1"),
    ("infra", "infra-backend-v2"),
    ("infra", "infra-backend-v3"),
    ("app", "app-backend-v1"),
    ("web", "web-backend"),
];

/// A proxy of the Gateway on the network-namespace cluster: which, its pod's address, and the
/// name of its log.
struct Gateway {
    serving: Serving,
    ip: Ipv4Addr,
    log: String,
}

/// The proxies of the Gateway `infra/<gateway>`, once running: the pod of the Deployment the
/// controller provisioned for it (mesh-proxy), and with `envoy` a pod running a stock Envoy in
/// its place.
async fn gateway_proxies(
    c: &mut NetnsCluster,
    gateway: &str,
    envoy: bool,
) -> anyhow::Result<Vec<Gateway>> {
    let pod = format!("{gateway}-gateway-0");
    c.run_deployment_pod("infra", &format!("{gateway}-gateway"), &pod)
        .await?;
    c.wait_pod("infra", &pod, "Ready", Duration::from_secs(60), |s| s.ready)
        .await?;
    let mut gateways = vec![Gateway {
        serving: Serving::MeshProxy,
        ip: c.kubelet_pod("infra", &pod)?.ip,
        log: format!("infra.{pod}.{}", mesh_api::inject::PROXY_CONTAINER),
    }];
    if envoy {
        let pod = format!("{gateway}-envoy-0");
        gateways.push(Gateway {
            serving: Serving::Envoy,
            ip: c.run_envoy_gateway("infra", gateway, &pod).await?,
            log: format!("infra.{pod}.proxy"),
        });
    }
    c.wait_synced().await?;
    Ok(gateways)
}

/// Service `ns/name` (port 8080) and its one meshed pod, `meshctl demo-service --echo`.
async fn echo_backend(c: &mut NetnsCluster, ns: &str, name: &str) -> anyhow::Result<()> {
    let labels: BTreeMap<String, String> = [("app".to_owned(), name.to_owned())].into();
    c.service(ServiceDef {
        namespace: ns.into(),
        name: name.into(),
        selector: labels.clone(),
        port: 8080,
        target_port: 8080,
    })?;
    c.deploy(&Workload {
        namespace: ns.into(),
        name: name.into(),
        service_account: name.into(),
        labels,
        replicas: 1,
        meshed: true,
        sidecar: Sidecar::MeshProxy,
        app: App::Echo { name: name.into() },
    })
    .await?;
    Ok(())
}

/// The routes' status conditions the suite checks (`Type=Status/Reason` on each parent): what
/// is otherwise after 20 s.
async fn route_conditions(c: &NetnsCluster) -> Vec<String> {
    const WANT: [(&str, &str, &[&str]); 8] = [
        // httproute-invalid-cross-namespace-parent-ref, httproute-cross-namespace.
        (
            "app",
            "not-allowed",
            &["Accepted=False/NotAllowedByListeners"],
        ),
        (
            "web",
            "not-selected",
            &["Accepted=False/NotAllowedByListeners"],
        ),
        (
            "app",
            "selected",
            &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
        ),
        // httproute-reference-grant, httproute-invalid-cross-namespace-backend-ref.
        (
            "infra",
            "granted",
            &["Accepted=True/Accepted", "ResolvedRefs=True/ResolvedRefs"],
        ),
        (
            "infra",
            "not-granted",
            &[
                "Accepted=True/Accepted",
                "ResolvedRefs=False/RefNotPermitted",
            ],
        ),
        // httproute-invalid-nonexistent-backendref, httproute-invalid-backendref-unknown-kind.
        (
            "infra",
            "missing",
            &[
                "Accepted=True/Accepted",
                "ResolvedRefs=False/BackendNotFound",
            ],
        ),
        (
            "infra",
            "unknown-kind",
            &["Accepted=True/Accepted", "ResolvedRefs=False/InvalidKind"],
        ),
        // httproute-hostname-intersection: `*.specific.com` meets `very.specific.com`.
        ("infra", "specific", &["Accepted=True/Accepted"]),
    ];
    let admin = c.admin_client();
    let read = |ns: &'static str, name: &'static str| {
        let admin = admin.clone();
        async move {
            let o = serde_json::json!({"apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute", "metadata": {"name": name, "namespace": ns}});
            let got = admin
                .get(&o)
                .await
                .map_err(|e| format!("reading it: {e:#}"))?
                .unwrap_or_default();
            Ok::<_, String>(
                got["status"]["parents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| mesh_controller::testing::condition_strings(&p["conditions"]))
                    .collect::<Vec<_>>(),
            )
        }
    };
    // Each route has two parents (a listener and its HTTPS twin); each must hold the conditions.
    let wrong = || async {
        let mut wrong = Vec::new();
        for (ns, name, want) in WANT {
            let parents = match read(ns, name).await {
                Ok(p) => p,
                Err(e) => {
                    wrong.push(format!("HTTPRoute {ns}/{name}: {e}"));
                    continue;
                }
            };
            if parents.len() != 2
                || !parents
                    .iter()
                    .all(|p| want.iter().all(|w| p.iter().any(|c| c == w)))
            {
                wrong.push(format!(
                    "HTTPRoute {ns}/{name}: {parents:?}, want {want:?} on both parents"
                ));
            }
        }
        wrong
    };
    match eventually(Duration::from_secs(20), "the routes' status", || async {
        wrong().await.is_empty().then_some(())
    })
    .await
    {
        Ok(()) => Vec::new(),
        Err(_) => wrong().await,
    }
}

/// Whether a listener of `hostname` takes requests for `host` (an exact name, or `*.` and any
/// labels before the suffix).
fn takes(hostname: &str, host: &str) -> bool {
    match hostname.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => hostname == host,
    }
}

/// The conformance `cases` (and httproute-weight) through one proxy of the Gateway, whose
/// listeners over `scheme` are `ports`: what went otherwise than the suite expects. Over HTTPS,
/// a case whose host no listener of its port takes (port 3's listeners have hostnames) finds
/// no certificate: the handshake is refused, where HTTP answers 404.
async fn conformance(
    c: &NetnsCluster,
    gw: &Gateway,
    scheme: Scheme<'_>,
    ports: &[u16],
    cases: &[Case],
) -> anyhow::Result<Vec<String>> {
    let ip = gw.ip;
    // Every port serves (a case of each that a backend answers).
    for (i, port) in ports.iter().enumerate() {
        let probe = cases
            .iter()
            .find(|c| c.port == i && c.status == 200)
            .expect("a case answered 200 on each port");
        let served = eventually(Duration::from_secs(20), "the gateway to serve", || async {
            exchange(c, scheme, (ip, *port), probe)
                .await
                .ok()
                .filter(|(code, _)| *code == 200)
        })
        .await;
        if let Err(e) = served {
            anyhow::bail!(
                "{:?}, port {port}: {e}\nits log:\n{}",
                gw.serving,
                c.tail(&gw.log)
            );
        }
    }
    let mut failures = Vec::new();
    for case in cases {
        let port = ports[case.port];
        let what = format!(
            "{} {} {}://{}:{port}{}",
            case.from,
            case.method,
            scheme.name(),
            case.host,
            case.path
        );
        let refused = matches!(scheme, Scheme::Https(_))
            && case.port == 3
            && !["*.wildcard.io", "very.specific.com"]
                .iter()
                .any(|h| takes(h, case.host));
        let (status, headers) = match exchange(c, scheme, (ip, port), case).await {
            Ok(_) if refused => {
                failures.push(format!("{what}: answered, want the handshake refused"));
                continue;
            }
            // curl's "SSL connect error", not a timeout or any other failure.
            Err(e) if refused && format!("{e:#}").contains("(35)") => continue,
            Err(e) if refused => {
                failures.push(format!("{what}: {e:#}, want the handshake refused"));
                continue;
            }
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{what}: {e:#}"));
                continue;
            }
        };
        let mut wrong = Vec::new();
        if status != case.status {
            wrong.push(format!("status {status}, want {}", case.status));
        }
        for (k, v) in case.want {
            let want = v
                .replace("{port}", &port.to_string())
                .replace("{scheme}", scheme.name());
            let have = headers.get(*k).map(|h| {
                if *k == "location" {
                    location(h)
                } else {
                    h.clone()
                }
            });
            if have.as_deref() != Some(want.as_str()) {
                wrong.push(format!("{k}: {have:?}, want {want:?}"));
            }
        }
        for k in case.absent {
            if let Some(v) = headers.get(*k) {
                wrong.push(format!("{k}: {v:?}, want none"));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{what}: {}", wrong.join("; ")));
        }
    }
    // httproute-weight: each backend within 8 points of its share, none to a weight of 0.
    // Envoy draws each request at random: over 400 at 3:1, 8 points is 3.7 standard
    // deviations (a false failure in about 2 of 10,000 runs); mesh-proxy spreads them evenly.
    // One curl, one connection, 400 requests.
    let total = 400;
    let url = format!("{}://weights.example.com:{}/", scheme.name(), ports[0]);
    let mut args = curl_to(scheme, (ip, ports[0]), "weights.example.com");
    args.extend(["-sS", "--max-time", "5", "-w", "%header{x-demo-service}\\n"].map(String::from));
    for _ in 0..total {
        args.extend(["-o".into(), "/dev/null".into(), url.clone()]);
    }
    let out = curl_from_node(c, &args, Duration::from_secs(120)).await?;
    // A failed transfer prints an empty line, and its error on stderr.
    let mut counts: BTreeMap<String, u32> = Default::default();
    for backend in String::from_utf8_lossy(&out.stdout).lines() {
        *counts.entry(backend.to_string()).or_default() += 1;
    }
    let errors = String::from_utf8_lossy(&out.stderr);
    if !errors.trim().is_empty() {
        failures.push(format!("httproute-weight: curl: {}", errors.trim()));
    }
    let share = |b: &str| f64::from(counts.get(b).copied().unwrap_or(0)) * 100.0 / f64::from(total);
    mesh_e2e::figure(&format!(
        "httproute-weight 3:1:0 over {total} {} requests through {:?}: {counts:?}",
        scheme.name(),
        gw.serving
    ));
    if (share("infra-backend-v1") - 75.0).abs() > 8.0
        || (share("infra-backend-v2") - 25.0).abs() > 8.0
        || counts.len() != 2
    {
        failures.push(format!(
            "httproute-weight: {counts:?}, want 75 % and 25 % within 8 points, none elsewhere"
        ));
    }
    Ok(failures)
}

/// A request's start and end (since the load began), and its status and the certificate
/// presented.
type Outcome = (Duration, Duration, anyhow::Result<(u16, Vec<u8>)>);

/// One HTTPS request with SNI `host` on a new connection to `addr` from the node's network
/// namespace `node`: the status and the certificate the gateway presented.
async fn tls_get(
    node: &str,
    addr: std::net::SocketAddr,
    host: &'static str,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = node.to_string();
    let tcp = tokio::task::spawn_blocking(move || netns::connect_in(&node, addr)).await??;
    tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpStream::from_std(tcp)?;
    let name = rustls::pki_types::ServerName::try_from(host)?;
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let cert = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let status = String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, cert))
}

/// A listener's certificate Secret replaced through the API server under 200 HTTPS requests a
/// second from the cluster's node, each on a new connection, to each of the Gateway's proxies
/// in turn (the provisioned Deployment's mesh-proxy, then a stock Envoy in a pod of its own):
/// no request fails, and once a handshake presents the new certificate, every later one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_handshakes_and_no_request_fails_from_outside()
-> anyhow::Result<()> {
    use std::sync::Arc;
    use std::time::Instant;
    netns::require()?;
    let envoy_bin = peer("MESH_ENVOY", "envoy");
    let mut c = NetnsCluster::start().await?;
    echo_backend(&mut c, "infra", "shop").await?;
    // One certificate to start with, and one for each proxy's rotation.
    let certs = (0..3)
        .map(|_| self_signed(&["shop.example.com"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let https = 8443;
    let manifests = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  infrastructure: {{annotations: {{mesh.dev/service-type: ClusterIP}}}}\n  listeners:\n  - {{name: shop, port: {https}, protocol: HTTPS, hostname: shop.example.com, tls: {{certificateRefs: [{{name: shop-cert}}]}}}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
    ];
    c.apply("edge", &manifests.join("---\n")).await?;
    let secret = |(cert, key): &(String, String)| tls_secret("infra", "shop-cert", cert, key);
    c.apply("shop-cert", &secret(&certs[0])).await?;
    let gateways = gateway_proxies(&mut c, "edge", envoy_bin.is_some()).await?;

    // The client trusts every certificate, and notes which one each handshake presented.
    let der = |pem: &str| -> anyhow::Result<Vec<u8>> {
        use rustls::pki_types::pem::PemObject;
        Ok(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
    };
    let ders = certs
        .iter()
        .map(|(cert, _)| der(cert))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut roots = rustls::RootCertStore::empty();
    for d in &ders {
        roots.add(rustls::pki_types::CertificateDer::from(d.clone()))?;
    }
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let node = c.node_netns().to_string();
    let mut failures = Vec::new();
    for (i, gw) in gateways.iter().enumerate() {
        let (old, new) = (ders[i].as_slice(), ders[i + 1].as_slice());
        let addr = std::net::SocketAddr::from((gw.ip, https));
        // It serves, with the certificate of the Secret as it is.
        let serving = eventually(Duration::from_secs(20), "the HTTPS listener", || {
            let (tls, node) = (tls.clone(), node.clone());
            async move {
                tls_get(&node, addr, "shop.example.com", tls)
                    .await
                    .ok()
                    .filter(|(s, cert)| *s == 200 && cert == old)
            }
        })
        .await;
        if let Err(e) = serving {
            anyhow::bail!("{:?}: {e}\nits log:\n{}", gw.serving, c.tail(&gw.log));
        }
        // 200 requests a second for 6 s; the Secret is replaced after 2 s.
        let start = Instant::now();
        let load = tokio::spawn(tls_load(node.clone(), addr, tls.clone(), start));
        tokio::time::sleep_until((start + Duration::from_secs(2)).into()).await;
        let rotated_at = start.elapsed();
        if let Err(e) = c.apply("shop-cert", &secret(&certs[i + 1])).await {
            load.abort();
            failures.push(format!("{:?}: replacing the Secret: {e:#}", gw.serving));
            break;
        }
        let results = load.await?;
        failures.extend(judge_rotation(gw.serving, &results, rotated_at, (old, new)));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// 1200 HTTPS requests for `shop.example.com` to `addr` from the node's network namespace
/// `node`, 200 a second from `start`, each on a new connection: their outcomes.
async fn tls_load(
    node: String,
    addr: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    start: std::time::Instant,
) -> Vec<Outcome> {
    use std::sync::{Arc, Mutex};
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1200u32 {
        let due = start + Duration::from_millis(u64::from(i) * 5);
        tokio::time::sleep_until(due.into()).await;
        let (tls, results, node) = (tls.clone(), results.clone(), node.clone());
        tasks.spawn(async move {
            let began = start.elapsed();
            let r = match tokio::time::timeout(
                Duration::from_secs(5),
                tls_get(&node, addr, "shop.example.com", tls),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("no answer in 5 s")),
            };
            let done = start.elapsed();
            results
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((began, done, r));
        });
    }
    while tasks.join_next().await.is_some() {}
    std::mem::take(
        &mut *results
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// What went otherwise than a rotation from certificate `old` to `new` (DER) at `rotated_at`
/// must go: every request answered 200, handshakes with the old certificate before, and none
/// begun after the first with the new one presenting the old.
fn judge_rotation(
    serving: Serving,
    results: &[Outcome],
    rotated_at: Duration,
    (old_der, new_der): (&[u8], &[u8]),
) -> Vec<String> {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, _, r)| match r {
            Ok((200, _)) => None,
            Ok((s, _)) => Some(format!("status {s}")),
            Err(e) => Some(format!("{e:#}")),
        })
        .collect();
    // The first handshake that presented the new certificate, by when it completed.
    let first_new = results
        .iter()
        .filter(|(_, _, r)| matches!(r, Ok((_, c)) if c == new_der))
        .map(|(_, done, _)| *done)
        .min();
    let old_after = first_new.map_or(0, |t| {
        results
            .iter()
            .filter(|(began, _, r)| *began > t && matches!(r, Ok((_, c)) if c == old_der))
            .count()
    });
    let old = results
        .iter()
        .filter(|(_, _, r)| matches!(r, Ok((_, c)) if c == old_der))
        .count();
    mesh_e2e::figure(&format!(
        "certificate rotation under 200 rps from the node (a new connection each) through {serving:?}: {} requests, {} failed, {old} handshakes with the old certificate, the new one first {} ms after the Secret was replaced",
        results.len(),
        failed.len(),
        first_new.map_or(-1, |t| (t.as_millis() as i64)
            - (rotated_at.as_millis() as i64)),
    ));
    let mut wrong = Vec::new();
    if results.len() != 1200 {
        wrong.push(format!(
            "{} of 1200 requests have an outcome",
            results.len()
        ));
    }
    if !failed.is_empty() {
        wrong.push(format!(
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        ));
    }
    if old == 0 {
        wrong.push("no handshake before the rotation".into());
    }
    if first_new.is_none() {
        wrong.push("no handshake presented the new certificate".into());
    }
    if old_after > 0 {
        wrong.push(format!(
            "{old_after} handshakes begun after the new certificate was seen presented the old one"
        ));
    }
    wrong
        .into_iter()
        .map(|w| format!("{serving:?}: {w}"))
        .collect()
}

/// A gateway listener whose address is taken: mesh-proxy says so (`/ready` 503 naming why,
/// `mesh_proxy_gateway_listeners_unbound` 1), keeps trying, and binds and serves it once the
/// address is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_listener_on_a_taken_port_fails_ready_until_it_binds() -> anyhow::Result<()> {
    let shop = Backend::start("shop").await?;
    let dir = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.17:0")?;
    let port = taken.local_addr()?.port();
    let docs = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        service_yaml("infra", "shop", "10.96.0.10", &[("http", 8080)]),
        slice_yaml("infra", "shop", "http", shop.addr.port(), &["127.0.0.1"]),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: http, port: {port}, protocol: HTTP}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
    ];
    let ctl = controller(dir.path(), &[("gateway.yaml", docs.join("---\n"))]).await?;
    let mut pc = mesh_proxy::Config::local(ctl.xds_addr, "infra/edge-1");
    pc.gateway = Some("edge".into());
    pc.gateway_addr = "127.0.0.17".parse()?;
    let proxy = mesh_proxy::Proxy::start(pc, None).await?;
    let unbound = || async {
        let (_, text) = mesh_e2e::http_get(proxy.metrics_addr, "/metrics").await?;
        text.lines()
            .find_map(|l| l.strip_prefix("mesh_proxy_gateway_listeners_unbound "))
            .map(str::to_string)
    };
    eventually(Duration::from_secs(10), "the bind to fail", || async {
        (unbound().await.as_deref() == Some("1")).then_some(())
    })
    .await?;
    let ready = mesh_e2e::http_get(proxy.metrics_addr, "/ready").await;
    assert_eq!(
        ready,
        Some((
            503,
            "a gateway listener could not be bound (see the log)\n".to_string()
        ))
    );
    drop(taken);
    let addr: std::net::SocketAddr = format!("127.0.0.17:{port}").parse()?;
    eventually(
        Duration::from_secs(10),
        "the listener to be bound",
        || async {
            let ready = mesh_e2e::http_get(proxy.metrics_addr, "/ready").await;
            let served = mesh_e2e::http_get(addr, "/").await;
            (ready.map(|r| r.0) == Some(200) && served.map(|r| r.0) == Some(200)).then_some(())
        },
    )
    .await?;
    assert_eq!(unbound().await.as_deref(), Some("0"));
    Ok(())
}

/// RateLimitPolicies on a Gateway: one naming the whole Gateway (1 a second, a burst of 3) and
/// one naming its HTTPS listener far above the test's rate. Ten quick HTTP requests get 429
/// (with `Retry-After`) for what the HTTP port's bucket does not hold, from Envoy and mesh-proxy
/// alike; ten HTTPS requests all pass: the policy naming the listener wins on its chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_on_a_gateway_refuses_what_its_bucket_does_not_hold() -> anyhow::Result<()> {
    let Some(curl_bin) = system_peer("curl") else {
        return Ok(());
    };
    const IPS: (&str, &str) = ("127.0.0.18", "127.0.0.19");
    let shop = Backend::start("shop").await?;
    let dir = tempfile::tempdir()?;
    let (http, https) = (port_on(&[IPS.0, IPS.1]), port_on(&[IPS.0, IPS.1]));
    let (cert, key) = self_signed(&["shop.example.com"])?;
    let ca = dir.path().join("shop.pem");
    std::fs::write(&ca, &cert)?;
    let limit = |name: &str, section: &str, rps: u32, burst: u32| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: infra}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: edge{section}}}]\n  local: {{requestsPerSecond: {rps}, burst: {burst}}}\n"
        )
    };
    let docs = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        service_yaml("infra", "shop", "10.96.0.10", &[("http", 8080)]),
        slice_yaml("infra", "shop", "http", shop.addr.port(), &["127.0.0.1"]),
        tls_secret("infra", "shop-cert", &cert, &key),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: http, port: {http}, protocol: HTTP}}\n  - {{name: https, port: {https}, protocol: HTTPS, hostname: shop.example.com, tls: {{certificateRefs: [{{name: shop-cert}}]}}}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [shop.example.com]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
        limit("edge-all", "", 1, 3),
        limit("edge-https", ", sectionName: https", 1000, 1000),
    ];
    let ctl = controller(dir.path(), &[("edge.yaml", docs.join("---\n"))]).await?;
    let proxies = proxies(&ctl, dir.path(), "edge", IPS).await?;
    let mut failures = Vec::new();
    for gp in &proxies {
        let ip = gp.ip;
        // `curl -i`: the status and the `retry-after` header, if any.
        let ask = |scheme: &'static str| {
            let port = if scheme == "https" { https } else { http };
            let (curl_bin, ca) = (curl_bin.clone(), ca.clone());
            async move {
                let out = tokio::process::Command::new(&curl_bin)
                    .args(["-sS", "-i", "--max-time", "5", "--cacert"])
                    .arg(&ca)
                    .arg("--resolve")
                    .arg(format!("shop.example.com:{port}:{ip}"))
                    .arg(format!("{scheme}://shop.example.com:{port}/"))
                    .output()
                    .await
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let code: u16 = text.split(' ').nth(1)?.parse().ok()?;
                let retry_after = text
                    .lines()
                    .any(|l| l.to_ascii_lowercase().starts_with("retry-after:"));
                Some((code, retry_after))
            }
        };
        // Each listener serves (the HTTPS one once its certificate is there); the HTTP one
        // within its bucket.
        let served = eventually(Duration::from_secs(10), "the gateway to serve", || async {
            (ask("https").await.is_some_and(|c| c.0 == 200)
                && ask("http").await.is_some_and(|c| c.0 == 200))
            .then_some(())
        })
        .await;
        if let Err(e) = served {
            anyhow::bail!("{:?}: {e}\n{}", gp.serving, gp.log_text());
        }
        let mut codes = std::collections::BTreeMap::<(&str, u16, bool), u32>::new();
        for scheme in ["http", "https"] {
            for _ in 0..10 {
                let (code, retry_after) = ask(scheme).await.unwrap_or((0, false));
                *codes.entry((scheme, code, retry_after)).or_default() += 1;
            }
        }
        println!(
            "ten requests of each through {:?} (scheme, status, retry-after): {codes:?}",
            gp.serving
        );
        let n = |scheme, code, retry_after| {
            codes
                .get(&(scheme, code, retry_after))
                .copied()
                .unwrap_or(0)
        };
        // The HTTP bucket held 2 after the warm-up, and refills 1 a second: most of the ten
        // plaintext requests (sent within a fraction of a second) are refused, each with
        // Retry-After.
        if n("http", 429, true) < 5
            || n("http", 200, false) + n("http", 429, true) != 10
            || n("https", 200, false) != 10
        {
            failures.push(format!(
                "{:?}: {codes:?}, want at least 5 of the HTTP requests refused (429 with Retry-After, the rest 200) and every HTTPS one 200",
                gp.serving
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The gateway's telemetry is a sidecar's: one request through mesh-proxy serving a Gateway is
/// counted in `mesh_proxy_requests_total` with the edge labels a sidecar's outbound request
/// has (direction, both ends' namespace and workload, the route and the backend, the status
/// class), traced under the caller's span with the gateway's workload as `service.name`, and
/// written as an access log line of the sidecar's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_metrics_traces_and_access_log_carry_a_sidecars_labels() -> anyhow::Result<()> {
    let Some(curl_bin) = system_peer("curl") else {
        return Ok(());
    };
    const IP: &str = "127.0.0.20";
    let otlp = mesh_e2e::otlp::OtlpReceiver::start().await?;
    let shop = Backend::start("shop").await?;
    let dir = tempfile::tempdir()?;
    let http = port_on(&[IP]);
    let docs = [
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n".to_string(),
        service_yaml("infra", "shop", "10.96.0.10", &[("http", 8080)]),
        // The backend's endpoint names its Pod, which names its workload, as in a cluster.
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: shop-0, namespace: infra, labels: {{kubernetes.io/service-name: shop}}}}\naddressType: IPv4\nports: [{{name: http, port: {}, protocol: TCP}}]\nendpoints: [{{addresses: ['127.0.0.1'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: shop-0, namespace: infra}}}}]\n", shop.addr.port()),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: shop-0, namespace: infra, labels: {app: shop, mesh.dev/workload: shop}}\nspec: {serviceAccountName: shop, containers: [{name: app}]}\nstatus: {podIP: 127.0.0.1}\n".into(),
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: infra}}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {{name: http, port: {http}, protocol: HTTP}}\n"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  rules: [{backendRefs: [{name: shop, port: 8080}]}]\n".into(),
    ];
    let ctl = controller(dir.path(), &[("edge.yaml", docs.join("---\n"))]).await?;
    let log = dir.path().join("edge.log");
    let mut pc = mesh_proxy::Config::local(ctl.xds_addr, "infra/edge-0");
    pc.gateway = Some("edge".into());
    pc.gateway_addr = IP.parse()?;
    pc.tracing_endpoint = Some(otlp.endpoint());
    // Only requests that arrive sampled are traced (parent-based).
    pc.tracing_sampling = 0.0;
    pc.access_log = Some(log.clone());
    let proxy = mesh_proxy::Proxy::start(pc, None).await?;
    let ip: std::net::IpAddr = IP.parse()?;
    eventually(Duration::from_secs(10), "the gateway to serve", || async {
        curl(&curl_bin, "http", ("shop.example.com", ip, http), None)
            .await
            .ok()
            .filter(|r| r.0 == 200)
    })
    .await?;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let out = tokio::process::Command::new(&curl_bin)
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("traceparent: 00-{trace_id}-b7ad6b7169203331-01"))
        .arg(format!("http://{IP}:{http}/traced"))
        .output()
        .await?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");

    let samples = mesh_api::prom::parse(&proxy.metrics.encode());
    let counted: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "mesh_proxy_requests_total" && s.label("status_class") == "2xx")
        .collect();
    println!("the gateway's requests: {counted:#?}");
    let labels = |s: &mesh_api::prom::Sample| {
        s.labels
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    let sidecar: std::collections::BTreeSet<String> = [
        "direction",
        "src_namespace",
        "src_workload",
        "src_identity",
        "dst_namespace",
        "dst_workload",
        "dst_identity",
        "route",
        "backend",
        "status_class",
        "grpc_status",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let edge = counted
        .iter()
        .find(|s| s.label("src_workload") == "edge")
        .unwrap_or_else(|| panic!("no request counted from the gateway's workload: {counted:#?}"));
    assert_eq!(labels(edge), sidecar, "{edge:?}");
    for (k, v) in [
        ("direction", "outbound"),
        ("src_namespace", "infra"),
        ("dst_namespace", "infra"),
        ("dst_workload", "shop"),
        ("route", "HTTPRoute/infra/shop rule 0"),
        ("backend", "outbound|8080||shop.infra.svc.cluster.local"),
    ] {
        assert_eq!(edge.label(k), v, "{k} of {edge:?}");
    }
    assert!(
        edge.value >= 2.0,
        "the warm-up and the traced request: {edge:?}"
    );

    let span = eventually(Duration::from_secs(10), "the gateway's span", || {
        let spans = otlp.spans();
        async move { spans.into_iter().find(|s| s.trace_id == trace_id) }
    })
    .await?;
    println!("the gateway's span: {span:#?}");
    assert_eq!(span.parent_span_id, "b7ad6b7169203331");
    assert_eq!(span.resource["service.name"], "edge");
    assert_eq!(span.resource["k8s.namespace.name"], "infra");
    assert_eq!(span.attributes["http.response.status_code"], "200");
    assert_eq!(span.attributes["mesh.source.workload"], "edge");
    assert_eq!(span.attributes["mesh.destination.workload"], "shop");
    assert_eq!(span.attributes["mesh.route"], "HTTPRoute/infra/shop rule 0");

    let line = eventually(Duration::from_secs(5), "the access log line", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|l| l["path"] == "/traced")
        }
    })
    .await?;
    println!("the gateway's access log line: {line}");
    assert_eq!(line["trace_id"], trace_id);
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["source_workload"], "edge");
    assert_eq!(line["destination_workload"], "shop");
    for key in [
        "start_time",
        "method",
        "protocol",
        "duration",
        "authority",
        "direction",
        "route_name",
        "upstream_cluster",
        "upstream_host",
        "response_flags",
        "bytes_received",
        "bytes_sent",
    ] {
        assert!(!line[key].is_null(), "{key} in {line}");
    }
    drop(shop);
    Ok(())
}
