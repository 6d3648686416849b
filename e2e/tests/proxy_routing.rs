//! mesh-proxy routes as the controller's xDS says: weighted splits, header matches, and edits
//! applied while traffic flows.

use mesh_e2e::mesh::{LocalMesh, wait_config};
use mesh_e2e::{Backend, ProxyClient, reviews_route, spread};

async fn reviews_mesh(v1: &Backend, v2: &Backend) -> anyhow::Result<LocalMesh> {
    LocalMesh::reviews(v1.addr, v2.addr, Some((90, 10))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_and_header_match_through_the_explicit_listener() -> anyhow::Result<()> {
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let mesh = reviews_mesh(&v1, &v2).await?;
    let proxy = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    let addr = proxy.outbound_http_addr.expect("explicit listener");
    let mut client = ProxyClient::new(addr);
    // Ready means a complete config, which may predate the route: wait for the split.
    wait_config(&proxy, "the 90/10 split", |s| {
        let w = s.backend_weights("outbound_http", "reviews.default.");
        w.iter().any(|(c, w)| c.contains("reviews-v1") && *w == 90)
            && s.clusters
                .values()
                .filter(|c| c.name.contains("reviews-v"))
                .all(|c| !c.endpoints.is_empty())
            && s.clusters
                .values()
                .filter(|c| c.name.contains("reviews-v"))
                .count()
                == 2
    })
    .await?;

    let got = spread(&mut client, 2000, &[]).await;
    let v2_share = *got.get("reviews-v2").unwrap_or(&0) as f64 / 2000.0 * 100.0;
    eprintln!("90/10 split over 2000 requests: {got:?}; v2 share {v2_share:.1} %");
    assert_eq!(
        got.values().sum::<usize>(),
        got.get("reviews-v1").unwrap_or(&0) + got.get("reviews-v2").unwrap_or(&0),
        "{got:?}"
    );
    assert!(
        (7.0..=13.0).contains(&v2_share),
        "v2 share {v2_share:.1} % is not 10 ± 3: {got:?}"
    );

    let canary = spread(&mut client, 100, &[("x-canary", "yes")]).await;
    assert_eq!(canary.get("reviews-v2"), Some(&100), "{canary:?}");

    // Blue-green: all weight to v2, applied while the client keeps its connection.
    mesh.write("route.yaml", &reviews_route(0, 100))?;
    wait_config(&proxy, "all weight on v2", |s| {
        !s.backend_weights("outbound_http", "reviews.default.")
            .iter()
            .any(|(c, w)| c.contains("reviews-v1") && *w > 0)
    })
    .await?;
    let after = spread(&mut client, 200, &[]).await;
    assert_eq!(after.get("reviews-v2"), Some(&200), "{after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_of_the_world_xds_works_too() -> anyhow::Result<()> {
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let mesh = reviews_mesh(&v1, &v2).await?;
    let mut cfg = mesh.proxy_config("default/productpage-1");
    cfg.xds_api = mesh_proxy::config::XdsApi::Sotw;
    let proxy = mesh.proxy(cfg).await?;
    wait_config(&proxy, "the 90/10 split", |s| {
        s.backend_weights("outbound_http", "reviews.default.")
            .iter()
            .any(|(c, w)| c.contains("reviews-v1") && *w == 90)
    })
    .await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    let got = spread(&mut client, 200, &[]).await;
    assert_eq!(got.values().sum::<usize>(), 200);
    assert!(got.keys().all(|k| k.starts_with("reviews-v")), "{got:?}");
    mesh.write("route.yaml", &reviews_route(0, 100))?;
    wait_config(&proxy, "all weight on v2", |s| {
        let w = s.backend_weights("outbound_http", "reviews.default.");
        !w.is_empty() && !w.iter().any(|(c, w)| c.contains("reviews-v1") && *w > 0)
    })
    .await?;
    let after = spread(&mut client, 100, &[]).await;
    assert_eq!(after.get("reviews-v2"), Some(&100), "{after:?}");
    Ok(())
}

/// The mirror share a proxy runs for `reviews` (millionths), once its routes have one.
fn mirrored(s: &mesh_proxy::state::Snapshot) -> Option<u32> {
    use mesh_proxy::state::route::Action;
    let t = s.route("outbound_http")?;
    t.vhosts()
        .iter()
        .filter(|vh| vh.name.starts_with("reviews.default."))
        .flat_map(|vh| &vh.routes)
        .find_map(|r| match &r.action {
            Action::Forward(f) => f.mirrors.first().map(|m| m.per_million),
            _ => None,
        })
}

/// RequestMirror: the client gets the primary's answers only, while the mirror backend gets a
/// copy of the mirrored share of the requests, without waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_mirror_and_answers_come_from_the_primary() -> anyhow::Result<()>
{
    let v1 = Backend::start("reviews-v1").await?;
    let v2 = Backend::start("reviews-v2").await?;
    let mesh = LocalMesh::reviews(v1.addr, v2.addr, None).await?;
    let route = |percent: u32| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: reviews, port: 9080}}]\n  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: reviews-v2, port: 9080}}, percent: {percent}}}}}]\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n"
        )
    };
    mesh.write("route.yaml", &route(100))?;
    let proxy = mesh
        .proxy(mesh.proxy_config("default/productpage-1"))
        .await?;
    let mut client = ProxyClient::new(proxy.outbound_http_addr.expect("explicit listener"));
    for (percent, n) in [(100u32, 200u64), (50, 400)] {
        mesh.write("route.yaml", &route(percent))?;
        wait_config(&proxy, "the mirror share", |s| {
            mirrored(s) == Some(percent * 10_000)
                && s.clusters
                    .values()
                    .filter(|c| c.name.contains("reviews-v"))
                    .all(|c| !c.endpoints.is_empty())
        })
        .await?;
        let before = v2.hits();
        let got = spread(&mut client, n as usize, &[]).await;
        assert_eq!(got.get("reviews-v1"), Some(&(n as usize)), "{got:?}");
        // Mirrors are sent on their own: wait until the expected share has arrived.
        let want = n * u64::from(percent) / 100;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while v2.hits() - before < want * 85 / 100 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{percent} %: the mirror got {} of {n} requests",
                v2.hits() - before
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Settled: the share is the route's, within 7 points.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let share = (v2.hits() - before) as f64 * 100.0 / n as f64;
        eprintln!("mirror {percent} %: {share:.1} % of {n} requests copied to reviews-v2");
        assert!(
            (share - f64::from(percent)).abs() <= 7.0,
            "{percent} %: {share:.1} % mirrored"
        );
    }
    Ok(())
}
