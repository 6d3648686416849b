use super::*;
use crate::index::Index;
use crate::testing::{obj, service_yaml, slice_yaml, split_yaml};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

/// One client proxy's page: requests to reviews-v1 and -v2 through the route, by status, and
/// their latency buckets (0.01 s and 0.1 s bounds).
fn client_page(v1: (u64, u64), v2: (u64, u64), fast: (u64, u64)) -> String {
    let mut out = String::new();
    for (backend, workload, (ok, failed), fast) in [
        ("reviews-v1", "reviews-v1", v1, fast.0),
        ("reviews-v2", "reviews-v2", v2, fast.1),
    ] {
        let edge = format!(
            r#"direction="outbound",src_namespace="shop",src_workload="client",src_identity="{CLIENT}",dst_namespace="shop",dst_workload="{workload}",dst_identity="spiffe://cluster.local/ns/shop/sa/reviews",route="HTTPRoute/shop/reviews rule 0",backend="outbound|9080||{backend}.shop.svc.cluster.local""#
        );
        out += &format!(
            "mesh_proxy_requests_total{{{edge},status_class=\"2xx\",grpc_status=\"\"}} {ok}\n"
        );
        out += &format!(
            "mesh_proxy_requests_total{{{edge},status_class=\"5xx\",grpc_status=\"\"}} {failed}\n"
        );
        let all = ok + failed;
        out +=
            &format!("mesh_proxy_request_duration_seconds_bucket{{{edge},le=\"0.01\"}} {fast}\n");
        out += &format!("mesh_proxy_request_duration_seconds_bucket{{{edge},le=\"0.1\"}} {all}\n");
        out += &format!("mesh_proxy_request_duration_seconds_bucket{{{edge},le=\"+Inf\"}} {all}\n");
    }
    out
}

/// reviews-v1's proxy: what it served, from the client and from outside the mesh.
fn server_page(from_client: u64, from_outside: u64) -> String {
    let edge = |src_ns: &str, src: &str, id: &str| {
        format!(
            r#"direction="inbound",src_namespace="{src_ns}",src_workload="{src}",src_identity="{id}",dst_namespace="shop",dst_workload="reviews-v1",dst_identity="spiffe://cluster.local/ns/shop/sa/reviews",route="default",backend="inbound|9080||""#
        )
    };
    format!(
        "mesh_proxy_requests_total{{{},status_class=\"2xx\",grpc_status=\"\"}} {from_client}\nmesh_proxy_requests_total{{{},status_class=\"2xx\",grpc_status=\"\"}} {from_outside}\n",
        edge("shop", "client", CLIENT),
        edge("unknown", "unknown", "unknown")
    )
}

fn model() -> Arc<Model> {
    let mut idx = Index::new("cluster.local");
    for (name, ip) in [
        ("reviews", "10.96.0.10"),
        ("reviews-v1", "10.96.0.11"),
        ("reviews-v2", "10.96.0.12"),
        ("ratings", "10.96.0.13"),
    ] {
        idx.apply(obj(&service_yaml("shop", name, ip, &[("http", 9080)])))
            .expect("svc");
        idx.apply(obj(&slice_yaml("shop", name, "http", 9080, &["10.0.0.1"])))
            .expect("slice");
    }
    idx.apply(obj(&split_yaml(
        "shop",
        "reviews",
        "reviews",
        9080,
        &[("reviews-v1", 90), ("reviews-v2", 10)],
    )))
    .expect("route");
    idx.model()
}

#[test]
fn signals_come_from_the_change_over_the_window() {
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    let t0 = Instant::now();
    stats.ingest("shop/client-0", t0, &client_page((100, 0), (10, 0), (0, 0)));
    stats.ingest("shop/reviews-v1-0", t0, &server_page(100, 0));
    // Ten seconds later: v1 served 180 more (all fine, 90 under 10 ms), v2 20 (10 failed).
    let t1 = t0 + Duration::from_secs(10);
    stats.ingest(
        "shop/client-0",
        t1,
        &client_page((280, 0), (20, 10), (90, 0)),
    );
    stats.ingest("shop/reviews-v1-0", t1, &server_page(280, 40));

    let m = model();
    let stat = stats
        .service(&m, &SvcKey::new("shop", "reviews"))
        .expect("known service");
    assert_eq!(stat.backends.len(), 2, "{stat:?}");
    let v1 = &stat.backends[0];
    assert_eq!(v1.service.as_deref(), Some("shop/reviews-v1"));
    assert_eq!(v1.signals.requests, 180.0);
    assert!((v1.signals.rps - 18.0).abs() < 1e-9);
    assert_eq!(v1.signals.success_rate, Some(1.0));
    // Half under 10 ms, half between 10 and 100: the median sits at the 10 ms bound.
    assert!((v1.signals.p50_ms.expect("p50") - 10.0).abs() < 1e-9);
    let p99 = v1.signals.p99_ms.expect("p99");
    assert!(
        (p99 - (10.0 + 90.0 * (0.99 * 180.0 - 90.0) / 90.0)).abs() < 1e-6,
        "{p99}"
    );
    let v2 = &stat.backends[1];
    assert_eq!(v2.signals.requests, 20.0);
    assert_eq!(v2.signals.success_rate, Some(0.5));
    // A Service nobody routes to has no rows; an unknown one is None.
    let ratings = stats
        .service(&m, &SvcKey::new("shop", "ratings"))
        .expect("known");
    assert!(ratings.backends.is_empty());
    assert!(stats.service(&m, &SvcKey::new("shop", "nope")).is_none());

    let edges = stats.edges();
    let pairs: Vec<(String, String, f64, bool)> = edges
        .iter()
        .map(|e| {
            (
                e.src.workload.clone(),
                e.dst.workload.clone(),
                e.signals.requests,
                e.mtls,
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("client".to_string(), "reviews-v1".to_string(), 180.0, true),
            ("client".to_string(), "reviews-v2".to_string(), 20.0, true),
            ("unknown".to_string(), "reviews-v1".to_string(), 40.0, false),
        ],
        "inbound requests from meshed callers are not counted twice"
    );

    let top = stats.top();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0].workload.workload, "reviews-v1");
    assert_eq!(top[0].signals.requests, 220.0);
}

#[test]
fn a_restarted_proxy_and_the_window_edge() {
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(5));
    let t0 = Instant::now();
    stats.ingest("shop/client-0", t0, &client_page((500, 0), (0, 0), (0, 0)));
    // The proxy restarted: its counters start over, so what it has now is all new.
    let t1 = t0 + Duration::from_secs(2);
    stats.ingest("shop/client-0", t1, &client_page((30, 0), (0, 0), (0, 0)));
    let edges = stats.edges();
    assert_eq!(edges[0].signals.requests, 30.0);
    // Scrapes older than the window are dropped, but one at its start is kept to measure from.
    for i in 2..10u64 {
        stats.ingest(
            "shop/client-0",
            t0 + Duration::from_secs(i * 2),
            &client_page((30 + i * 10, 0), (0, 0), (0, 0)),
        );
    }
    let ring_len = stats.lock()["shop/client-0"].len();
    assert!(
        ring_len <= 4,
        "{ring_len} scrapes kept for a 5 s window at 2 s"
    );
    let e = &stats.edges()[0];
    assert!((e.signals.rps - 5.0).abs() < 1e-9, "{e:?}");
    assert!(stats.top().is_empty(), "no inbound series");
}

#[test]
fn a_proxys_scrapes_share_their_series_and_keep_only_values() {
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    let t0 = Instant::now();
    let one = "mesh_proxy_requests_total{direction=\"outbound\",dst_workload=\"web-a-1\"} 5\n";
    let two = format!(
        "{one}mesh_proxy_requests_total{{direction=\"outbound\",dst_workload=\"web-a-2\"}} 1\n"
    );
    stats.ingest("shop/client-0", t0, one);
    stats.ingest("shop/client-0", t0 + Duration::from_secs(1), &two);
    let scrapes = stats.lock();
    let ring = &scrapes["shop/client-0"];
    let (first, second) = (&ring[0].samples, &ring[1].samples);
    assert_eq!(second.len(), 2);
    // The series both pages have is one allocation; the new one is its own.
    assert!(Arc::ptr_eq(&first[0].0, &second[0].0));
    assert_eq!(second[1].0.label("dst_workload"), "web-a-2");
    assert_eq!(Arc::strong_count(&second[1].0), 1);
    assert_eq!((first[0].1, second[0].1, second[1].1), (5.0, 5.0, 1.0));
}

#[test]
fn quantiles_interpolate_within_buckets() {
    let b = |pairs: &[(f64, f64)]| -> BTreeMap<OrdF64, f64> {
        pairs.iter().map(|(le, n)| (OrdF64(*le), *n)).collect()
    };
    assert_eq!(quantile(0.5, &b(&[])), None);
    assert_eq!(quantile(0.5, &b(&[(0.1, 0.0), (f64::INFINITY, 0.0)])), None);
    let h = b(&[(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)]);
    assert!((quantile(0.5, &h).expect("q") - 0.1).abs() < 1e-12);
    assert!((quantile(0.75, &h).expect("q") - 0.15).abs() < 1e-12);
    // Past the last finite bound, the bound is the answer.
    let h = b(&[(0.1, 10.0), (f64::INFINITY, 20.0)]);
    assert_eq!(quantile(0.99, &h), Some(0.1));
    assert_eq!(
        service_of("outbound|9080||reviews-v1.shop.svc.cluster.local").as_deref(),
        Some("shop/reviews-v1")
    );
    assert_eq!(service_of("inbound|9080||"), None);
}

#[test]
fn clusters_name_their_service() {
    assert_eq!(
        service_of("outbound|9080||reviews.shop.svc.cluster.local").as_deref(),
        Some("shop/reviews")
    );
    assert_eq!(
        service_of("outbound|8080|db-0|db.shop.svc.cluster.local").as_deref(),
        Some("shop/db")
    );
    assert_eq!(
        service_of("outbound|8080|fd00::7|db.shop.svc.cluster.local").as_deref(),
        Some("shop/db")
    );
    assert_eq!(service_of("inbound|8080||"), None);
}

/// A page of one route backend's outbound series: `(grpc_status, count)` with HTTP 200.
fn grpc_page(route: &str, backend: &str, counts: &[(&str, u64)]) -> String {
    counts
        .iter()
        .map(|(g, n)| {
            format!(
                "mesh_proxy_requests_total{{direction=\"outbound\",route=\"{route}\",backend=\"outbound|9080||{backend}.shop.svc.cluster.local\",status_class=\"2xx\",grpc_status=\"{g}\"}} {n}\n"
            )
        })
        .collect()
}

#[test]
fn tallies_count_tracked_routes_from_scrape_to_scrape_and_grpc_errors_fail() {
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    let t0 = Instant::now();
    let route = "GRPCRoute/shop/reviews";
    let page = |ok: u64, unavailable: u64, other: u64| {
        grpc_page(
            &format!("{route} rule 0"),
            "reviews-v2",
            &[("0", ok), ("14", unavailable)],
        ) + &grpc_page("GRPCRoute/shop/other rule 0", "reviews-v2", &[("0", other)])
    };
    // Before the route is tracked nothing is counted.
    stats.ingest("shop/client-0", t0, &page(10, 0, 10));
    stats.track([route.to_string()].into());
    stats.ingest(
        "shop/client-0",
        t0 + Duration::from_secs(1),
        &page(20, 0, 50),
    );
    stats.ingest(
        "shop/client-0",
        t0 + Duration::from_secs(2),
        &page(26, 4, 90),
    );
    let t = stats.tally(route, "shop/reviews-v2");
    assert_eq!((t.requests, t.failures), (20.0, 4.0));
    assert_eq!(t.success_percent(), Some(80.0));
    // A proxy that restarted counts from zero again.
    stats.ingest("shop/client-0", t0 + Duration::from_secs(3), &page(5, 0, 0));
    assert_eq!(stats.tally(route, "shop/reviews-v2").requests, 25.0);
    assert_eq!(
        stats
            .tally("GRPCRoute/shop/other", "shop/reviews-v2")
            .requests,
        0.0
    );
    // No longer tracked: forgotten.
    stats.track(Default::default());
    assert_eq!(stats.tally(route, "shop/reviews-v2").requests, 0.0);
}

/// A proxy's metrics page served once per connection, as mesh-proxy's admin port does.
async fn metrics_server(page: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.0 200 OK\r\n\r\n{page}").as_bytes())
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_lease_holder_scrapes_proxied_pods_that_stream_to_other_replicas() {
    let addr = metrics_server(client_page((5, 0), (5, 0), (5, 5))).await;
    let mut idx = Index::new("cluster.local");
    for pod in [
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: shop, labels: {mesh.dev/proxy: 'true'}}\nspec: {containers: [{name: app}]}\nstatus: {podIP: 127.0.0.1}\n",
        // No proxy: nothing to scrape.
        "apiVersion: v1\nkind: Pod\nmetadata: {name: plain-0, namespace: shop}\nspec: {containers: [{name: app}]}\nstatus: {podIP: 127.0.0.2}\n",
    ] {
        idx.apply(obj(pod)).expect("pod");
    }
    let hub = crate::xds::server::Hub::new(
        idx.model(),
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    );
    let when = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let all = AllPods {
        hub: hub.clone(),
        when: when.clone(),
        port: addr.port(),
    };
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    // Not the Lease holder: only its own streams, of which it has none.
    stats.scrape_all(&hub.status, Some(&all)).await;
    assert_eq!(stats.scraped(), 0);
    when.store(true, std::sync::atomic::Ordering::Relaxed);
    stats.scrape_all(&hub.status, Some(&all)).await;
    assert_eq!(stats.scraped(), 1, "the proxied pod, not the plain one");
}
