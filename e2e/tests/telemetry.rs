//! Observability across two proxies over mesh TLS: golden metrics with exact counts and
//! consistent histograms, spans at an OTLP receiver with parent/child links across the hops,
//! `traceparent` at the app, and access log lines.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use mesh_api::prom::{Sample, parse};
use mesh_e2e::identity::TestCa;
use mesh_e2e::mesh::{LocalMesh, PairOptions};
use mesh_e2e::otlp::OtlpReceiver;
use mesh_e2e::servers::EchoServer;
use mesh_e2e::{ProxyClient, eventually, http_get};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// The samples of `name` whose labels include every pair of `want`.
fn select<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && want.iter().all(|(k, v)| s.label(k) == *v))
        .collect()
}

fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    select(samples, name, want).iter().map(|s| s.value).sum()
}

/// A histogram's buckets never decrease, its `+Inf` bucket is its count, and its sum lies
/// between what its lowest and highest populated buckets allow.
fn check_histogram(samples: &[Sample], name: &str, want: &[(&str, &str)], count: f64) {
    let mut buckets: Vec<(f64, f64)> = select(samples, &format!("{name}_bucket"), want)
        .iter()
        .map(|s| {
            let le = match s.label("le") {
                "+Inf" => f64::INFINITY,
                le => le.parse().expect("le is a number"),
            };
            (le, s.value)
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.len() > 10, "{name} {want:?}: {buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "{name} buckets decrease: {buckets:?}"
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(count), "{name} +Inf");
    assert_eq!(total(samples, &format!("{name}_count"), want), count);
    let sum = total(samples, &format!("{name}_sum"), want);
    // Every observation is at most the upper bound of the bucket it first appears in.
    let mut upper = 0.0;
    let mut prev = 0.0;
    for (le, n) in &buckets {
        if le.is_finite() {
            upper += (n - prev) * le;
        } else {
            upper += (n - prev) * 1e9;
        }
        prev = *n;
    }
    assert!(
        sum > 0.0 && sum <= upper,
        "{name}: sum {sum}, at most {upper}"
    );
}

/// A proxy's metrics, parsed.
async fn scrape(addr: std::net::SocketAddr) -> Vec<Sample> {
    parse(&http_get(addr, "/metrics").await.expect("metrics").1)
}

/// The labels of the client-to-echo edge as the proxy on one side reports it.
fn edge(direction: &'static str) -> [(&'static str, &'static str); 8] {
    [
        ("direction", direction),
        ("src_namespace", "default"),
        ("src_workload", "client"),
        ("src_identity", CLIENT_ID),
        ("dst_namespace", "default"),
        ("dst_workload", "echo"),
        ("dst_identity", SERVER_ID),
        ("grpc_status", ""),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_metrics_traces_and_access_logs_across_two_proxies() -> anyhow::Result<()> {
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let app = EchoServer::start("echo").await?;
    let otlp = OtlpReceiver::start().await?;
    let logs = tempfile::tempdir()?;
    let mesh = LocalMesh::start().await?;
    let endpoint = otlp.endpoint();
    let log_dir = logs.path().to_path_buf();
    // 0 %: only requests that arrive sampled are traced (parent-based).
    let tweak = move |c: &mut mesh_proxy::Config| {
        c.tracing_endpoint = Some(endpoint.clone());
        c.tracing_sampling = 0.0;
        let (_, pod) = c.node_parts().expect("node");
        c.access_log = Some(log_dir.join(format!("{pod}.log")));
    };
    let pair = mesh
        .sidecar_pair_with(PairOptions {
            port_name: "http",
            app_port: app.addr.port(),
            ca: Some(&ca),
            tweak: Some(&tweak),
            ..Default::default()
        })
        .await?;
    let mut client = ProxyClient::new(pair.outbound);
    eventually(Duration::from_secs(10), "a first answer over mTLS", || {
        let mut c = ProxyClient::new(pair.outbound);
        async move { matches!(c.get("echo", "/warmup", &[]).await, Ok((200, _))).then_some(()) }
    })
    .await?;
    // A request is counted when its response ends, on each side: the server's proxy may count
    // the warm-up after the client has its answer. The baseline is taken once both have.
    let (before_client, before_server) = eventually(
        Duration::from_secs(10),
        "both proxies counting the warm-up",
        || async {
            let c = scrape(pair.client.metrics_addr).await;
            let s = scrape(pair.server.metrics_addr).await;
            // 2xx only: a warm-up refused before the server was reached counts on one side.
            let served =
                |v: &[Sample]| total(v, "mesh_proxy_requests_total", &[("status_class", "2xx")]);
            (served(&c) >= 1.0 && served(&c) == served(&s)).then_some((c, s))
        },
    )
    .await?;

    // 10 traced GETs, 5 untraced GETs, 4 POSTs of 1000 bytes, then 3 answered 503.
    let mut sent_traces = Vec::new();
    let mut app_traceparents = Vec::new();
    let mut response_bytes = 0u64;
    for i in 0..10u32 {
        let trace_id = format!("{:032x}", 0xabc0_0000u64 + u64::from(i));
        let tp = format!("00-{trace_id}-{:016x}-01", 0x100 + i);
        let (code, head, body) = client
            .get_full("echo", "/traced", &[("traceparent", &tp)])
            .await?;
        assert_eq!(code, 200);
        response_bytes += body.len() as u64;
        sent_traces.push(trace_id);
        app_traceparents.push(head["x-seen-traceparent"].to_str()?.to_string());
        assert_eq!(
            head["x-seen-source-workload"], "",
            "the app never sees the header"
        );
    }
    for _ in 0..5 {
        let (code, head, body) = client.get_full("echo", "/untraced", &[]).await?;
        assert_eq!(code, 200);
        response_bytes += body.len() as u64;
        let tp = head["x-seen-traceparent"].to_str()?.to_string();
        assert!(
            tp.starts_with("00-") && tp.ends_with("-00"),
            "unsampled, still propagated: {tp}"
        );
    }
    let payload = Bytes::from(vec![b'x'; 1000]);
    for _ in 0..4 {
        let (code, _, body) = client
            .send("POST", "echo", "/upload", &[], payload.clone())
            .await?;
        assert_eq!((code, body.len()), (200, 1000));
        response_bytes += 1000;
    }
    app.fail_every(1);
    for _ in 0..3 {
        let (code, _, body) = client.get_full("echo", "/fail", &[]).await?;
        assert_eq!(code, 503);
        response_bytes += body.len() as u64;
    }

    // Metrics: exact counts on both sides of the edge, by status class.
    let (client_edge, server_edge) = (edge("outbound"), edge("inbound"));
    let delta = |before: &[Sample], after: &[Sample], name: &str, want: &[(&str, &str)]| {
        total(after, name, want) - total(before, name, want)
    };
    // The last answers are counted on each side as their responses end: read once both
    // proxies have counted all 22 (the assertions below then hold them to their classes).
    let (after_client, after_server) = eventually(
        Duration::from_secs(10),
        "both proxies counting every request",
        || async {
            let c = scrape(pair.client.metrics_addr).await;
            let s = scrape(pair.server.metrics_addr).await;
            let all = |b: &[Sample], a: &[Sample]| delta(b, a, "mesh_proxy_requests_total", &[]);
            (all(&before_client, &c) >= 22.0 && all(&before_server, &s) >= 22.0).then_some((c, s))
        },
    )
    .await?;
    for (side, before, after, edge) in [
        ("client", &before_client, &after_client, &client_edge[..]),
        ("server", &before_server, &after_server, &server_edge[..]),
    ] {
        let with = |class: &'static str| {
            let mut w = edge.to_vec();
            w.push(("status_class", class));
            w
        };
        assert_eq!(
            delta(before, after, "mesh_proxy_requests_total", &with("2xx")),
            19.0,
            "{side} 2xx:\n{after:#?}"
        );
        assert_eq!(
            delta(before, after, "mesh_proxy_requests_total", &with("5xx")),
            3.0,
            "{side} 5xx"
        );
        let edge_only: Vec<_> = edge
            .iter()
            .copied()
            .filter(|(k, _)| *k != "grpc_status")
            .collect();
        assert_eq!(
            delta(before, after, "mesh_proxy_request_bytes_total", &edge_only),
            4000.0,
            "{side} request bytes"
        );
        assert_eq!(
            delta(before, after, "mesh_proxy_response_bytes_total", &edge_only),
            response_bytes as f64,
            "{side} response bytes"
        );
        let count = total(
            after,
            "mesh_proxy_request_duration_seconds_count",
            &edge_only,
        );
        // The warm-up requests are in the histogram too.
        let warm = total(
            before,
            "mesh_proxy_request_duration_seconds_count",
            &edge_only,
        );
        assert_eq!(count - warm, 22.0, "{side} latency observations");
        check_histogram(
            after,
            "mesh_proxy_request_duration_seconds",
            &edge_only,
            count,
        );
    }
    // No raw path or address ever becomes a label.
    for s in after_client.iter().chain(&after_server) {
        for v in s.labels.values() {
            assert!(
                !v.contains("/traced") && !v.contains("127.0.0.1"),
                "unbounded label on {s:?}"
            );
        }
    }

    // Traces: each traced request has the client's span (child of the caller's) and the
    // server's (child of the client's), and the app got the server's span as its parent.
    let spans = eventually(Duration::from_secs(10), "spans at the receiver", || {
        let spans = otlp.spans();
        async move { (spans.len() >= 20).then_some(spans) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}: {:#?}", otlp.spans()))?;
    let by_trace: BTreeMap<&str, Vec<_>> = spans.iter().fold(BTreeMap::new(), |mut m, s| {
        m.entry(s.trace_id.as_str())
            .or_insert_with(Vec::new)
            .push(s);
        m
    });
    assert_eq!(
        by_trace.len(),
        10,
        "only sampled requests are traced: {spans:#?}"
    );
    for (i, trace_id) in sent_traces.iter().enumerate() {
        let t = &by_trace[trace_id.as_str()];
        let client_span = t.iter().find(|s| s.kind == 3).expect("a CLIENT span");
        let server_span = t.iter().find(|s| s.kind == 2).expect("a SERVER span");
        assert_eq!(client_span.parent_span_id, format!("{:016x}", 0x100 + i));
        assert_eq!(server_span.parent_span_id, client_span.span_id, "{t:#?}");
        assert_eq!(
            app_traceparents[i],
            format!("00-{trace_id}-{}-01", server_span.span_id)
        );
        assert_eq!(client_span.resource["service.name"], "client");
        assert_eq!(server_span.resource["service.name"], "echo");
        assert_eq!(server_span.resource["k8s.namespace.name"], "default");
        assert_eq!(server_span.attributes["http.response.status_code"], "200");
        assert_eq!(server_span.attributes["mesh.source.workload"], "client");
    }

    // Access logs: one JSON line per request on each side.
    let lines = |pod: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(logs.path().join(format!("{pod}.log")))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let (client_log, server_log) = eventually(Duration::from_secs(5), "access log lines", || {
        let (c, s) = (lines("client-0"), lines("echo-0"));
        async move { (c.len() >= 23 && s.len() >= 23).then_some((c, s)) }
    })
    .await?;
    let fails: Vec<_> = server_log.iter().filter(|l| l["path"] == "/fail").collect();
    assert_eq!(fails.len(), 3);
    assert_eq!(fails[0]["response_code"], 503);
    assert_eq!(fails[0]["direction"], "inbound");
    assert_eq!(fails[0]["source_principal"], CLIENT_ID);
    let upload = client_log
        .iter()
        .find(|l| l["method"] == "POST")
        .expect("a POST line");
    assert_eq!(upload["bytes_received"], 1000);
    assert_eq!(upload["bytes_sent"], 1000);
    assert_eq!(upload["destination_workload"], "echo");
    assert_eq!(upload["response_flags"], "-");
    assert!(
        upload["upstream_host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:"))
    );
    let traced = client_log
        .iter()
        .find(|l| l["path"] == "/traced")
        .expect("a traced line");
    assert_eq!(traced["trace_id"], sent_traces[0].as_str());
    for key in [
        "start_time",
        "protocol",
        "duration",
        "authority",
        "route_name",
        "upstream_cluster",
    ] {
        assert!(!traced[key].is_null(), "{key} in {traced}");
    }
    Ok(())
}

/// OpenMetrics when asked for, Prometheus text 0.0.4 otherwise; both parse to the same samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_in_both_formats() -> anyhow::Result<()> {
    let mesh = LocalMesh::start().await?;
    let proxy = mesh.proxy(mesh.proxy_config("default/web-0")).await?;
    let get = |accept: &'static str| {
        let url = format!("http://{}/metrics", proxy.metrics_addr);
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "-D", "-", "-H", &format!("accept: {accept}"), &url])
                .output()
                .await?;
            anyhow::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    let om = get("application/openmetrics-text;version=1.0.0,text/plain;q=0.5").await?;
    let text = get("text/plain").await?;
    assert!(om.contains("application/openmetrics-text"), "{om}");
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.contains("# TYPE mesh_proxy_xds_updates counter"), "{om}");
    assert!(text.contains("text/plain; version=0.0.4"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE mesh_proxy_xds_updates_total counter"),
        "{text}"
    );
    let names = |t: &str| -> Vec<String> {
        let mut n: Vec<String> = parse(t).into_iter().map(|s| s.name).collect();
        n.dedup();
        n
    };
    assert_eq!(names(&om), names(&text));
    Ok(())
}

/// `--telemetry false`: requests still flow, and nothing per request is recorded or added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_off_records_and_propagates_nothing() -> anyhow::Result<()> {
    let app = EchoServer::start("echo").await?;
    let mesh = LocalMesh::start().await?;
    let off = |c: &mut mesh_proxy::Config| c.telemetry = false;
    let pair = mesh
        .sidecar_pair_with(PairOptions {
            port_name: "http",
            app_port: app.addr.port(),
            tweak: Some(&off),
            ..Default::default()
        })
        .await?;
    let mut client = ProxyClient::new(pair.outbound);
    for _ in 0..3 {
        let (code, head, _) = client.get_full("echo", "/", &[]).await?;
        assert_eq!(code, 200);
        assert_eq!(head["x-seen-traceparent"], "");
        assert_eq!(head["x-seen-source-workload"], "");
    }
    for proxy in [&pair.client, &pair.server] {
        let text = proxy.metrics.encode();
        assert!(!text.contains("mesh_proxy_requests_total{"), "{text}");
        assert!(text.contains("mesh_proxy_connections_total{"), "{text}");
    }
    Ok(())
}

/// Labels Prometheus adds to every series of a target found by the chart's ServiceMonitor or
/// PodMonitor: a dashboard may select and group by these as well as by what the process exports.
const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "container",
    "service",
    "endpoint",
    "job",
    "instance",
];

/// What one PromQL expression reads: each selector's metric and the labels its matchers name,
/// and the labels its aggregations and vector matchings group by.
#[derive(Default)]
struct Reads {
    selectors: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

fn reads(e: &promql_parser::parser::Expr, r: &mut Reads) {
    use promql_parser::parser::Expr;
    let mut selector = |v: &promql_parser::parser::VectorSelector| {
        let labels = v
            .matchers
            .matchers
            .iter()
            .chain(v.matchers.or_matchers.iter().flatten())
            .map(|m| m.name.clone())
            .filter(|n| n != "__name__")
            .collect();
        r.selectors
            .push((v.name.clone().unwrap_or_default(), labels));
    };
    match e {
        Expr::VectorSelector(v) => selector(v),
        Expr::MatrixSelector(m) => selector(&m.vs),
        Expr::Aggregate(a) => {
            if let Some(m) = &a.modifier {
                r.grouping.extend(m.labels().labels.iter().cloned());
            }
            reads(&a.expr, r);
            if let Some(p) = &a.param {
                reads(p, r);
            }
        }
        Expr::Binary(b) => {
            if let Some(m) = b.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                r.grouping.extend(m.labels().labels.iter().cloned());
            }
            reads(&b.lhs, r);
            reads(&b.rhs, r);
        }
        Expr::Unary(u) => reads(&u.expr, r),
        Expr::Paren(p) => reads(&p.expr, r),
        Expr::Subquery(s) => reads(&s.expr, r),
        Expr::Call(c) => c.args.args.iter().for_each(|a| reads(a, r)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// Checks one dashboard query against the series scraped live: every selector names a metric
/// some process exported with every label its matchers use, and every label it groups by or
/// its legend shows is one of its metrics' (or a scrape target's).
fn check_query(
    at: &str,
    query: &str,
    legend: &str,
    live: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    // Grafana's interval variables are durations only once Grafana fills them in.
    let promql = query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m");
    let expr = match promql_parser::parser::parse(&promql) {
        Ok(e) => e,
        Err(e) => return vec![format!("{at}: {query:?} does not parse: {e}")],
    };
    let mut r = Reads::default();
    reads(&expr, &mut r);
    let mut problems = Vec::new();
    let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
    if r.selectors.is_empty() {
        problems.push(format!("{at}: {query:?} reads no metric"));
    }
    for (name, labels) in &r.selectors {
        let Some(exported) = live.get(name) else {
            problems.push(format!("{at}: no process exported {name:?}"));
            continue;
        };
        known.extend(exported.iter().cloned());
        for l in labels {
            if !exported.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                problems.push(format!("{at}: {name} has no label {l:?}"));
            }
        }
    }
    let legend_labels = legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_owned()));
    for l in r.grouping.iter().cloned().chain(legend_labels) {
        if !known.contains(&l) {
            problems.push(format!(
                "{at}: label {l:?} is on none of the metrics it reads"
            ));
        }
    }
    problems
}

/// The chart's Grafana dashboards (`deploy/charts/mesh/dashboards/`) ask only for metrics and
/// labels that a running proxy, controller and CA export: each query of each panel and
/// variable, read by a PromQL parser, against the series scraped from a live mesh after
/// traffic over mesh TLS. A metric renamed or a label dropped fails here, not in a user's Grafana.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_dashboards_ask_only_for_series_a_live_mesh_exports() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let app = EchoServer::start("echo").await?;
    let mesh = LocalMesh::start().await?;
    let pair = mesh
        .sidecar_pair_with(PairOptions {
            port_name: "http",
            app_port: app.addr.port(),
            ca: Some(&ca),
            ..Default::default()
        })
        .await?;
    eventually(Duration::from_secs(10), "a first answer over mTLS", || {
        let mut c = ProxyClient::new(pair.outbound);
        async move { matches!(c.get("echo", "/warmup", &[]).await, Ok((200, _))).then_some(()) }
    })
    .await?;
    let mut client = ProxyClient::new(pair.outbound);
    for _ in 0..5 {
        assert_eq!(client.get("echo", "/ok", &[]).await?.0, 200);
    }
    app.fail_every(1);
    assert_eq!(client.get("echo", "/fail", &[]).await?.0, 503);

    let mut live: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for addr in [
        pair.client.metrics_addr,
        pair.server.metrics_addr,
        mesh.controller.admin_addr,
        ca.admin_addr(),
    ] {
        for s in scrape(addr).await {
            live.entry(s.name).or_default().extend(s.labels.into_keys());
        }
    }
    let dir = mesh_e2e::workspace_root().join("deploy/charts/mesh/dashboards");
    let mut problems = Vec::new();
    let mut names = Vec::new();
    let mut queries = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("a file name")?
            .to_owned();
        let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{name}: not JSON"))?;
        names.push(name.trim_end_matches(".json").to_owned());
        for panel in board["panels"].as_array().into_iter().flatten() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                let at = format!(
                    "{name}: panel {:?}",
                    panel["title"].as_str().unwrap_or_default()
                );
                let query = t["expr"].as_str().unwrap_or_default();
                let legend = t["legendFormat"].as_str().unwrap_or_default();
                problems.extend(check_query(&at, query, legend, &live));
                queries += 1;
            }
        }
        for var in board["templating"]["list"].as_array().into_iter().flatten() {
            let Some(q) = var["query"]["query"].as_str() else {
                continue;
            };
            // label_values(SELECTOR, LABEL): the selector and the label it lists.
            let at = format!(
                "{name}: variable {:?}",
                var["name"].as_str().unwrap_or_default()
            );
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .and_then(|q| q.rsplit_once(','));
            let Some((selector, label)) = inner else {
                problems.push(format!("{at}: {q:?} is not label_values(SELECTOR, LABEL)"));
                continue;
            };
            let legend = format!("{{{{{}}}}}", label.trim());
            problems.extend(check_query(&at, selector, &legend, &live));
            queries += 1;
        }
    }
    names.sort();
    let shipped: Vec<&str> = meshctl::install::manifests::DASHBOARDS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(names, shipped, "the chart's dashboards and meshctl's");
    assert!(queries >= 30, "{queries} queries");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
