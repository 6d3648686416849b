//! Envoy 1.40 and mesh-proxy, fed the same xDS for two pods of one workload, decide the same
//! requests alike: callers with different SPIFFE IDs (and none) ask for paths and methods that
//! DENY and ALLOW policies name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_e2e::identity::{TestCa, svid_params, tls_connect};
use mesh_e2e::mesh::wait_config;
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{eventually, figure, free_port, peer, start_envoy};
use mesh_proxy::state::NetworkFilter;
use meshctl::cmd::bootstrap::{EnvoyArgs, envoy};

const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
const TELLER: &str = "spiffe://cluster.local/ns/bank/sa/teller";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fn manifests(app_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{mesh.dev/mtls-mode: PERMISSIVE}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec: {{clusterIP: 10.96.7.7, selector: {{app: echo}}, ports: [{{name: http, port: 80, targetPort: {app_port}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-0, namespace: default, labels: {{app: echo}}}}
spec: {{serviceAccountName: echo, containers: [{{name: app, ports: [{{containerPort: {app_port}}}]}}]}}
status: {{podIP: 127.0.0.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-1, namespace: default, labels: {{app: echo}}}}
spec: {{serviceAccountName: echo, containers: [{{name: app, ports: [{{containerPort: {app_port}}}]}}]}}
status: {{podIP: 127.0.0.3}}
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: guard, namespace: default}}
spec:
  targetRefs: [{{group: '', kind: Service, name: echo}}]
  action: Deny
  rules:
  - to: [{{paths: ['/admin', '/admin/*', '/v1/items:purge']}}]
  - from: [{{namespaces: [bank]}}]
    to: [{{methods: [DELETE]}}]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: callers, namespace: default}}
spec:
  targetRefs: [{{group: '', kind: Service, name: echo}}]
  rules:
  - from: [{{serviceAccounts: [web]}}]
    to: [{{methods: [GET, POST], paths: ['/api/*']}}]
  - from: [{{namespaces: [bank]}}]
    to: [{{methods: [GET, DELETE]}}]
  - from: [{{authenticated: false}}]
    to: [{{paths: ['/public']}}]
  - from: [{{identities: ['spiffe://cluster.local/ns/shop/*']}}]
    to: [{{ports: [{app_port}]}}]
---
apiVersion: mesh.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: roomy, namespace: default}}
spec:
  targetRefs: [{{group: '', kind: Service, name: echo}}]
  local: {{requestsPerSecond: 1000, perIdentity: {{requestsPerSecond: 500}}}}
"
    )
}

/// A client certificate for each caller (`None`: plaintext), signed on first use.
struct Callers {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    certs: std::sync::Mutex<HashMap<String, Svid>>,
}

type Svid = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

impl Callers {
    fn svid(&self, id: &str) -> anyhow::Result<Svid> {
        let mut certs = self.certs.lock().unwrap_or_else(|e| e.into_inner());
        if !certs.contains_key(id) {
            let signed = mesh_e2e::identity::sign(&svid_params(id), &self.issuer)?;
            certs.insert(id.to_string(), signed);
        }
        let (chain, key) = &certs[id];
        Ok((chain.clone(), key.clone_key()))
    }

    /// Sends one request to `addr` as `id` and returns the status, or 0 when the proxy
    /// refused the connection (a peer from another trust domain, at the handshake).
    async fn ask(
        &self,
        addr: SocketAddr,
        id: Option<&str>,
        method: &str,
        path: &str,
    ) -> anyhow::Result<u16> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: echo\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let answer = match id {
            Some(id) => {
                let (chain, key) = self.svid(id)?;
                match tls_connect(addr, chain, key).await {
                    Ok(tls) => status_line(tls, &req).await,
                    Err(e) => Err(e),
                }
            }
            None => status_line(tokio::net::TcpStream::connect(addr).await?, &req).await,
        };
        Ok(answer.unwrap_or(0))
    }
}

/// Sends `request` on `s` and reads the status of the answer's first line, without waiting
/// for the connection's end (Envoy closes it only after its delayed-close timeout, 1 s).
async fn status_line<S>(mut s: S, request: &str) -> anyhow::Result<u16>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut b = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .context("no answer in 5 s")??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&b[..n]);
    }
    Ok(String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Envoy's SVID and trust bundle as an agent would write them: SDS DiscoveryResponses.
fn write_sds(
    dir: &std::path::Path,
    ca: &TestCa,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let cert = svid_params("spiffe://cluster.local/ns/default/sa/echo").signed_by(&key, issuer)?;
    std::fs::write(dir.join("svid.pem"), cert.pem())?;
    std::fs::write(dir.join("svid.key"), key.serialize_pem())?;
    let d = dir.display();
    std::fs::write(
        dir.join("default.yaml"),
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: default\n  tls_certificate:\n    certificate_chain: {{filename: {d}/svid.pem}}\n    private_key: {{filename: {d}/svid.key}}\n"
        ),
    )?;
    std::fs::write(
        dir.join("ROOTCA.yaml"),
        format!(
            "resources:\n- \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret\n  name: ROOTCA\n  validation_context:\n    trusted_ca: {{filename: {}}}\n",
            ca.path("ca.crt").display()
        ),
    )?;
    Ok(())
}

/// Envoy (pod echo-0) and mesh-proxy (pod echo-1, of the same workload) on the same xDS from
/// one controller, in front of one app, both enforcing the manifests' policies.
struct Pair {
    callers: Callers,
    envoy_in: SocketAddr,
    proxy_in: SocketAddr,
    envoy: mesh_e2e::Peer,
    _proxy: mesh_proxy::Proxy,
    _ctl: Controller,
    _app: EchoServer,
    _ca: TestCa,
    _dir: tempfile::TempDir,
}

/// The pair, or `None` (the test skipped) where Envoy is not installed.
async fn pair() -> anyhow::Result<Option<Pair>> {
    let Some(envoy_bin) = peer("MESH_ENVOY", "envoy") else {
        return Ok(None);
    };
    let app = EchoServer::start("echo-app").await?;
    let p = app.addr.port();
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg)?;
    std::fs::write(cfg.join("echo.yaml"), manifests(p))?;
    let ctl = Controller::start(Config::local(&cfg)).await?;

    // Envoy is pod echo-0: its inbound listener on 127.0.0.2 at the app's port, so a
    // connection's local address is the original destination iptables would restore.
    let sds = dir.path().join("sds");
    std::fs::create_dir(&sds)?;
    let issuer = ca.issuer()?;
    write_sds(&sds, &ca, &issuer)?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let bootstrap = envoy(&EnvoyArgs {
        admin,
        outbound_http: format!("127.0.0.1:{}", free_port()).parse()?,
        transparent: true,
        inbound_addr: Some("127.0.0.2".parse()?),
        inbound_port: Some(p),
        outbound_port: Some(free_port()),
        sds_dir: Some(sds.clone()),
        ..EnvoyArgs::new("default/echo-0", &ctl.xds_addr.to_string())
    })?;
    let envoy_proc = start_envoy(&envoy_bin, &bootstrap, dir.path(), admin).await?;
    let envoy_in: SocketAddr = format!("127.0.0.2:{p}").parse()?;

    // mesh-proxy is pod echo-1, of the same workload.
    let mut pc = mesh_proxy::Config::local(ctl.xds_addr, "default/echo-1");
    pc.transparent = true;
    pc.inbound_orig_dst = Some(app.addr);
    ca.identify(&mut pc, "echo")?;
    let proxy = mesh_proxy::Proxy::start(pc, None).await?;
    tokio::time::timeout(Duration::from_secs(10), proxy.store.ready()).await?;
    mesh_e2e::identity::wait_for_svid(&proxy.tls.as_ref().context("tls")?.identity, "mesh-proxy")
        .await?;
    wait_config(&proxy, "mesh-proxy to enforce both policies", |s| {
        s.listeners
            .get(mesh_api::consts::xds::INBOUND_LISTENER)
            .is_some_and(|l| {
                l.chains.iter().any(|c| {
                    matches!(&c.filter, NetworkFilter::Http { guard, .. }
                        if guard.rbac.len() == 2 && guard.rate_limit.is_some())
                })
            })
    })
    .await?;
    let proxy_in = proxy.inbound_addr.context("inbound listener")?;

    let callers = Callers {
        issuer,
        certs: Default::default(),
    };
    // Envoy is ready once the policies are in: a caller only the ALLOW policy lets in.
    if let Err(e) = eventually(
        Duration::from_secs(30),
        "Envoy to serve the policies",
        || async {
            let a = callers.ask(envoy_in, Some(WEB), "GET", "/api/x").await.ok();
            let b = callers.ask(envoy_in, Some(WEB), "GET", "/other").await.ok();
            (a == Some(200) && b == Some(403)).then_some(())
        },
    )
    .await
    {
        anyhow::bail!("{e}\nEnvoy log:\n{}", envoy_proc.log_text());
    }
    Ok(Some(Pair {
        callers,
        envoy_in,
        proxy_in,
        envoy: envoy_proc,
        _proxy: proxy,
        _ctl: ctl,
        _app: app,
        _ca: ca,
        _dir: dir,
    }))
}

/// Refused at the handshake or by RBAC is the same decision.
fn class(status: u16) -> &'static str {
    match status {
        200..=299 => "allowed",
        0 | 403 => "denied",
        400 => "malformed",
        _ => "other",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_mesh_proxy_decide_the_same_requests_alike() -> anyhow::Result<()> {
    let Some(pair) = pair().await? else {
        return Ok(());
    };
    let (callers, envoy_in, proxy_in) = (&pair.callers, pair.envoy_in, pair.proxy_in);
    let requests: &[(Option<&str>, &str, &str)] = &[
        (Some(WEB), "GET", "/api/items"),
        (Some(WEB), "POST", "/api/items"),
        (Some(WEB), "DELETE", "/api/items"),
        (Some(WEB), "GET", "/api"),
        (Some(WEB), "GET", "/"),
        (Some(WEB), "GET", "/admin"),
        (Some(WEB), "GET", "/admin/users"),
        (Some(WEB), "GET", "/api/../admin"),
        (Some(WEB), "GET", "/api//items"),
        (Some(WEB), "GET", "/api/%69tems"),
        (Some(WEB), "GET", "/api/items;x=1"),
        (Some(WEB), "GET", "/api/a%2Fb"),
        (Some(TELLER), "GET", "/anything"),
        (Some(TELLER), "DELETE", "/anything"),
        (Some(TELLER), "POST", "/anything"),
        (Some(TELLER), "GET", "/admin"),
        (Some(CART), "PUT", "/x"),
        (Some(CART), "GET", "/admin/x"),
        (Some(CART), "GET", "/v1/items:purge"),
        (Some(CART), "GET", "/v1/items%3apurge"),
        (Some(CART), "GET", "/v1/items:purged"),
        (Some(CART), "GET", "/x/"),
        (
            Some("spiffe://cluster.local/ns/default/sa/nobody"),
            "GET",
            "/api/items",
        ),
        (Some("spiffe://other.domain/ns/shop/sa/cart"), "GET", "/x"),
        (None, "GET", "/public"),
        (None, "POST", "/public"),
        (None, "GET", "/public/x"),
        (None, "GET", "/api/items"),
        (None, "GET", "/admin"),
        (None, "GET", "/x/../public"),
    ];
    let mut differ = Vec::new();
    let mut statuses = std::collections::BTreeMap::new();
    for (id, method, path) in requests {
        let e = callers.ask(envoy_in, *id, method, path).await?;
        let m = callers.ask(proxy_in, *id, method, path).await?;
        *statuses.entry(m).or_insert(0) += 1;
        if class(e) != class(m) || class(m) == "other" {
            differ.push(format!("{id:?} {method} {path}: Envoy {e}, mesh-proxy {m}"));
        }
    }
    figure(&format!(
        "Envoy and mesh-proxy on the same xDS: {} requests, {} decided differently (mesh-proxy answered {statuses:?})",
        requests.len(),
        differ.len()
    ));
    assert!(
        differ.is_empty(),
        "decided differently:\n{}",
        differ.join("\n")
    );
    assert!(
        statuses.len() >= 3,
        "the set exercises allow, deny and malformed: {statuses:?}"
    );
    drop(pair);
    Ok(())
}

/// The request targets the path fuzzer keeps (its seeds in `fuzz/corpus/path_policy`, and the
/// corpus its runs grew on this machine, if any), the valid ones in a stable order, at most
/// `max`.
fn fuzzed_paths(max: usize) -> Vec<String> {
    let read = |dir: std::path::PathBuf| {
        let mut paths: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .filter_map(|b| String::from_utf8(b).ok())
            // As the fuzzer's own gate, and what fits in a request line.
            .filter(|p| p.starts_with('/') && http::uri::PathAndQuery::try_from(p.as_str()).is_ok())
            .filter(|p| p.bytes().all(|b| b.is_ascii_graphic()))
            .collect();
        paths.sort();
        paths
    };
    // Every seed, then the grown corpus up to `max`.
    let mut paths = read(mesh_e2e::workspace_root().join("fuzz/corpus/path_policy"));
    let seeds = paths.len();
    for p in read(mesh_e2e::target_dir().join("fuzz-corpus/path_policy")) {
        if paths.len() >= max.max(seeds) {
            break;
        }
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

/// The differential of the path fuzzer: every path it keeps, sent by a caller whom the ALLOW
/// policy lets read `/api/*` and the DENY refuses `/admin` and below, to Envoy and mesh-proxy on
/// the same xDS. mesh-proxy may be stricter (a path it refuses as malformed), never more lenient:
/// no path Envoy denies may reach the app through mesh-proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_proxy_lets_through_no_fuzzed_path_that_envoy_denies() -> anyhow::Result<()> {
    let Some(pair) = pair().await? else {
        return Ok(());
    };
    let paths = fuzzed_paths(1_000);
    anyhow::ensure!(paths.len() >= 10, "only {} fuzzed paths", paths.len());
    // Eight callers at a time: each request is a handshake and an answer.
    let pair = std::sync::Arc::new(pair);
    let mut asked = tokio::task::JoinSet::new();
    for (i, chunk) in paths.chunks(paths.len().div_ceil(8)).enumerate() {
        let (pair, chunk) = (pair.clone(), chunk.to_vec());
        asked.spawn(async move {
            let mut out = Vec::new();
            for path in chunk {
                let e = pair
                    .callers
                    .ask(pair.envoy_in, Some(WEB), "GET", &path)
                    .await?;
                let m = pair
                    .callers
                    .ask(pair.proxy_in, Some(WEB), "GET", &path)
                    .await?;
                out.push((path, e, m));
            }
            anyhow::Ok((i, out))
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = asked.join_next().await {
        answers.push(done??);
    }
    answers.sort_by_key(|(i, _)| *i);
    let (mut through, mut stricter, mut alike, mut unclear) = (Vec::new(), 0, 0, Vec::new());
    for (path, e, m) in answers.into_iter().flat_map(|(_, a)| a) {
        match (e, class(e), class(m)) {
            (_, a, b) if a == b => alike += 1,
            // Envoy's RBAC or parser refused it, and mesh-proxy let it through.
            (403 | 400, _, "allowed") => through.push(format!("{path}: Envoy {e}, mesh-proxy {m}")),
            // Envoy answered otherwise (no answer, a rate limit, an error): not a decision.
            (_, _, "allowed") => unclear.push(format!("{path}: Envoy {e}, mesh-proxy {m}")),
            _ => stricter += 1,
        }
    }
    anyhow::ensure!(
        unclear.len() <= paths.len() / 100,
        "Envoy gave no decision for {} paths: {unclear:?}",
        unclear.len()
    );
    figure(&format!(
        "Envoy and mesh-proxy on the fuzzed paths: {} paths, {alike} decided alike, {stricter} refused by mesh-proxy only, {} let through by mesh-proxy only, {} unclear (no decision from Envoy)",
        paths.len(),
        through.len(),
        unclear.len()
    ));
    assert!(
        through.is_empty(),
        "mesh-proxy let through what Envoy refused:\n{}\nEnvoy log:\n{}",
        through.join("\n"),
        pair.envoy.log_text()
    );
    Ok(())
}
