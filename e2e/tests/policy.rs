//! Policy over the wire, on the local mesh: who may call (403 for the others), a corpus of
//! encoded variants of a denied path that must never reach the app, and a local rate limit
//! under three times its rate.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use mesh_e2e::identity::TestCa;
use mesh_e2e::mesh::{Load, LocalMesh, SidecarPair, secure_pair, wait_config};
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, figure, raw_exchange};
use mesh_proxy::state::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the server proxy's inbound chains for `port` enforce what `check` says.
async fn wait_guard(
    pair: &SidecarPair,
    port: u16,
    what: &str,
    check: impl Fn(&mesh_proxy::state::Guard) -> bool,
) -> anyhow::Result<()> {
    let holds = move |s: &Snapshot| {
        s.listeners
            .get(mesh_api::consts::xds::INBOUND_LISTENER)
            .is_some_and(|l| {
                l.chains
                    .iter()
                    .filter(|c| c.port == Some(port))
                    .all(|c| check(c.filter.guard()))
            })
    };
    wait_config(&pair.server, what, holds).await.map(drop)
}

fn counter(p: &mesh_proxy::Proxy, series: &str) -> u64 {
    mesh_e2e::identity::counter(&p.metrics.encode(), series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_the_policy_names_gets_200_and_any_other_403() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair = secure_pair(&mesh, &ca, &app, "STRICT").await?;
    // A second client, running as another service account.
    let intruder = mesh.pair_client("intruder", None, Some(&ca), None).await?;
    let mut client = ProxyClient::new(pair.outbound);
    let mut other = ProxyClient::new(intruder.outbound_addr.context("outbound")?);
    // No policy yet: both get in.
    assert_eq!(client.get("echo", "/", &[]).await?.0, 200);
    assert_eq!(other.get("echo", "/", &[]).await?.0, 200);
    mesh.write(
        "authz.yaml",
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: default}\nspec:\n  targetRefs: [{group: '', kind: Service, name: echo}]\n  rules:\n  - from: [{serviceAccounts: [client]}]\n",
    )?;
    wait_guard(&pair, app.addr.port(), "the ALLOW policy on echo", |g| {
        !g.rbac.is_empty()
    })
    .await?;
    // meshctl authz says what the controller enforces.
    let mut out = Vec::new();
    meshctl::cmd::authz::authz(
        &meshctl::cmd::authz::AuthzArgs {
            service: "echo".into(),
            namespace: Some("default".into()),
            controller: meshctl::cmd::stat::ControllerArgs {
                controller: Some(mesh.controller.admin_addr),
                mesh_namespace: "mesh-system".into(),
            },
            output: meshctl::cmd::stat::Output::Table,
        },
        &meshctl::cmd::Context::local(mesh.config_dir.clone()),
        &mut out,
    )
    .await?;
    let text = String::from_utf8(out)?;
    assert!(
        text.contains("  ALLOW default/only-client\n          rule 1: from spiffe://cluster.local/ns/default/sa/client; asking anything"),
        "{text}"
    );
    let hits = app.hits();
    // The connections opened before the policy see it too.
    let (status, body) = other.get("echo", "/", &[]).await?;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied\n"));
    let (status, body) = client.get("echo", "/", &[]).await?;
    assert_eq!((status, body.as_str()), (200, "echo-app"));
    assert_eq!(
        app.hits(),
        hits + 1,
        "the denied request never reached the app"
    );
    assert_eq!(
        counter(
            &pair.server,
            "mesh_proxy_authz_requests_total{policy=\"default/only-client\",decision=\"allow\"}"
        ),
        1
    );
    assert_eq!(
        counter(
            &pair.server,
            "mesh_proxy_authz_requests_total{policy=\"none\",decision=\"deny\"}"
        ),
        1
    );
    // Removing the policy lets the other caller back in.
    mesh.remove("authz.yaml")?;
    wait_guard(&pair, app.addr.port(), "no policy on echo", |g| {
        g.rbac.is_empty()
    })
    .await?;
    assert_eq!(other.get("echo", "/", &[]).await?.0, 200);
    Ok(())
}

/// How a lenient app could read a path: every escape decoded (twice), `\` as `/`, `;`
/// parameters dropped, dot segments resolved, slashes merged, NUL and what follows cut.
fn lenient_reading(raw: &str) -> String {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let twice = mesh_api::path::percent_decode(&mesh_api::path::percent_decode(path));
    let mut p = twice.replace('\\', "/");
    if let Some(nul) = p.find('\0') {
        p.truncate(nul);
    }
    let mut stack: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        let seg = seg.split(';').next().unwrap_or("");
        match seg {
            "" | "." => {}
            ".." => {
                stack.pop();
            }
            s => stack.push(s),
        }
    }
    format!("/{}", stack.join("/"))
}

/// A small deterministic generator, so that the corpus is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// Encoded variants of `/admin/secret`, each of which a lenient app reads as that path.
fn corpus() -> Vec<String> {
    let mut out = BTreeSet::new();
    let segs = ["admin", "secret"];
    let hand = [
        "/admin/secret",
        "/admin/secret/",
        "//admin/secret",
        "/admin//secret",
        "///admin///secret///",
        "/./admin/./secret",
        "/x/../admin/secret",
        "/admin/x/../secret",
        "/admin/secret/.",
        "/%2e/admin/secret",
        "/x/%2e%2e/admin/secret",
        "/x/%2E%2E/admin/secret",
        "/x/.%2e/admin/secret",
        "/admin%2fsecret",
        "/admin%2Fsecret",
        "/admin%5csecret",
        "/admin%5Csecret",
        "/admin\\secret",
        "/x/..\\admin/secret",
        "/admin;x=1/secret",
        "/admin/secret;jsessionid=1",
        "/admin;/secret;",
        "/public/..;/admin/secret",
        "/public/..;x=1/admin/secret",
        "/admin/secret%00",
        "/admin/secret%00.html",
        "/admin%00/secret",
        "/%2561dmin/secret",
        "/admin/%2573ecret",
        "/admin/secret?x=1",
        "/admin/secret?/../public",
        "/admin/secret#x",
        "/%61dmin/secret",
        "/admin/secre%74",
        "/%61%64%6d%69%6e/%73%65%63%72%65%74",
    ];
    for h in hand {
        out.insert(h.to_string());
    }
    // Every letter encoded alone, in both hex cases.
    for (si, seg) in segs.iter().enumerate() {
        for (ci, c) in seg.bytes().enumerate() {
            for hex in [format!("%{c:02x}"), format!("%{c:02X}")] {
                let mut parts: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
                let mut s = seg.to_string();
                s.replace_range(ci..ci + 1, &hex);
                parts[si] = s;
                out.insert(format!("/{}", parts.join("/")));
            }
        }
    }
    // Random combinations of the tricks above, per segment.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let before = [
        "/",
        "//",
        "/./",
        "/x/../",
        "/%2e/",
        "/x/%2e%2e/",
        "\\",
        "/public/..;/",
    ];
    let after = [
        "", ";p=1", ";", "/", "/.", "%00", "%2f", "%5C", "?q=1", "#f",
    ];
    while out.len() < 600 {
        let mut p = String::new();
        for seg in segs {
            p.push_str(rng.pick(&before));
            for c in seg.bytes() {
                match rng.next() % 4 {
                    0 => p.push_str(&format!("%{c:02x}")),
                    1 => p.push_str(&format!("%{c:02X}")),
                    2 if rng.next().is_multiple_of(8) => p.push_str(&format!("%25{c:02x}")),
                    _ => p.push(c as char),
                }
            }
            if seg == "admin" {
                p.push_str(rng.pick(&[";a", "", "", ";"]));
            }
        }
        p.push_str(rng.pick(&after));
        out.insert(p);
    }
    let out: Vec<String> = out.into_iter().collect();
    for v in &out {
        let read = lenient_reading(v);
        assert!(
            read == "/admin/secret" || read.starts_with("/admin/secret/") || read == "/admin",
            "{v:?} is read as {read:?}, not the denied path"
        );
    }
    out
}

/// Sends `GET <target>` as raw bytes (so nothing normalizes it on the way) and returns the
/// status code, or 0 when the connection closed without an answer.
async fn raw_get(proxy: std::net::SocketAddr, target: &str) -> anyhow::Result<u16> {
    raw_exchange(
        tokio::net::TcpStream::connect(proxy).await?,
        &format!("GET {target} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_encoding_of_a_denied_path_reaches_the_app() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    mesh.write(
        "deny.yaml",
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: default}\nspec:\n  targetRefs: [{group: '', kind: Service, name: echo}]\n  action: Deny\n  rules:\n  - to: [{paths: ['/admin', '/admin/*']}]\n",
    )?;
    wait_guard(&pair, app.addr.port(), "the DENY policy on echo", |g| {
        !g.rbac.is_empty()
    })
    .await?;
    // Controls: the policy does not deny everything.
    assert_eq!(raw_get(pair.outbound, "/public").await?, 200);
    assert_eq!(raw_get(pair.outbound, "/administrator").await?, 200);
    let corpus = corpus();
    let hits = app.hits();
    let mut by_status = std::collections::BTreeMap::new();
    let mut bypasses = Vec::new();
    for v in &corpus {
        let status = raw_get(pair.outbound, v).await?;
        *by_status.entry(status).or_insert(0u32) += 1;
        if !matches!(status, 400 | 403) {
            bypasses.push((v.clone(), status));
        }
    }
    figure(&format!(
        "policy corpus: {} encoded variants of a denied path, answers {by_status:?}, {} bypasses",
        corpus.len(),
        bypasses.len()
    ));
    assert!(corpus.len() >= 500);
    assert!(bypasses.is_empty(), "bypasses: {bypasses:?}");
    assert_eq!(app.hits(), hits, "no variant reached the app");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_allows_its_rate_and_answers_the_rest_429() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    mesh.write(
        "limit.yaml",
        "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: hundred, namespace: default}\nspec:\n  targetRefs: [{group: '', kind: Service, name: echo}]\n  local: {requestsPerSecond: 100}\n",
    )?;
    wait_guard(&pair, app.addr.port(), "the rate limit on echo", |g| {
        g.rate_limit.is_some()
    })
    .await?;
    let load = Load::start(pair.outbound, "echo", 300, 12);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let outcomes = load.finish().await;
    let allowed = outcomes.get("echo-app").copied().unwrap_or(0);
    let limited = outcomes
        .get("status 429: local_rate_limited")
        .copied()
        .unwrap_or(0);
    let offered: u64 = outcomes.values().sum();
    figure(&format!(
        "rate limit: 100 rps allowed, {offered} requests offered in 10 s: {allowed} allowed, {limited} answered 429"
    ));
    assert_eq!(allowed + limited, offered, "nothing else: {outcomes:?}");
    assert!(
        offered >= 2_700,
        "the load offered {offered} requests, not about 3,000"
    );
    assert!(
        (950..=1_050).contains(&allowed),
        "{allowed} allowed, not 1,000 ± 5 %"
    );
    // A refused request says when to come back.
    let mut c = ProxyClient::new(pair.outbound);
    let mut retry_after = None;
    for _ in 0..50 {
        let (status, headers, _) = c.get_full("echo", "/", &[]).await?;
        if status == 429 {
            retry_after = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            break;
        }
    }
    assert_eq!(retry_after.as_deref(), Some("1"));
    let limited_metric = counter(
        &pair.server,
        "mesh_proxy_rate_limited_total{policy=\"default/hundred\",scope=\"total\",src_identity=\"unknown\"}",
    );
    assert!(
        limited_metric >= limited,
        "{limited_metric} counted, {limited} seen"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_chain_is_gone_is_served_no_more() -> anyhow::Result<()> {
    let app = EchoServer::start("echo-app").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh.sidecar_pair("http", None, app.addr.port()).await?;
    let inbound = pair.server.inbound_addr.context("inbound")?;
    // One keep-alive connection straight to the server's inbound listener.
    let mut s = tokio::net::TcpStream::connect(inbound).await?;
    let ask = "GET / HTTP/1.1\r\nHost: echo\r\n\r\n";
    let read_status = async |s: &mut tokio::net::TcpStream| -> anyhow::Result<String> {
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    s.write_all(ask.as_bytes()).await?;
    let first = read_status(&mut s).await?;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // The port is no longer served: the Service goes away.
    mesh.remove("echo.yaml")?;
    wait_config(&pair.server, "the server proxy to drop the port", |s| {
        s.listeners
            .get(mesh_api::consts::xds::INBOUND_LISTENER)
            .is_none_or(|l| l.chains.iter().all(|c| c.port != Some(app.addr.port())))
    })
    .await?;
    let hits = app.hits();
    s.write_all(ask.as_bytes()).await?;
    let second = read_status(&mut s).await?;
    assert!(
        second.starts_with("HTTP/1.1 503") && second.contains("filter chain was removed"),
        "{second}"
    );
    assert_eq!(app.hits(), hits, "nothing reached the app");
    Ok(())
}
