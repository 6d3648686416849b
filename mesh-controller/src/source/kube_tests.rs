//! The Kubernetes source against kube-rs's mock client: a verifier checks each request the
//! watcher makes, in order, and answers it.

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::*;

type MockHandle = Handle<Request<Body>, Response<Body>>;

fn client() -> (Client, MockHandle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// `(list path, a valid object of this kind named <name> with resourceVersion <rv>)`.
fn sample(kind: Kind, name: &str, rv: &str) -> (&'static str, Value) {
    let meta = |ns: bool| {
        if ns {
            json!({"name": name, "namespace": "default", "resourceVersion": rv})
        } else {
            json!({"name": name, "resourceVersion": rv})
        }
    };
    match kind {
        Kind::Namespace => (
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": meta(false)}),
        ),
        Kind::Service => (
            "/api/v1/services",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": meta(true), "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}),
        ),
        Kind::EndpointSlice => {
            let mut m = meta(true);
            m["labels"] = json!({"kubernetes.io/service-name": "svc"});
            (
                "/apis/discovery.k8s.io/v1/endpointslices",
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": m, "addressType": "IPv4", "endpoints": []}),
            )
        }
        Kind::Pod => (
            "/api/v1/pods",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta(true), "spec": {"containers": []}}),
        ),
        Kind::HTTPRoute => (
            "/apis/gateway.networking.k8s.io/v1/httproutes",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": meta(true), "spec": {}}),
        ),
        Kind::GRPCRoute => (
            "/apis/gateway.networking.k8s.io/v1/grpcroutes",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute", "metadata": meta(true), "spec": {}}),
        ),
        Kind::AuthorizationPolicy => (
            "/apis/mesh.dev/v1alpha1/authorizationpolicies",
            json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "AuthorizationPolicy", "metadata": meta(true), "spec": {"targetRefs": []}}),
        ),
        Kind::TrafficPolicy => (
            "/apis/mesh.dev/v1alpha1/trafficpolicies",
            json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy", "metadata": meta(true), "spec": {"targetRefs": []}}),
        ),
        Kind::RateLimitPolicy => (
            "/apis/mesh.dev/v1alpha1/ratelimitpolicies",
            json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "RateLimitPolicy", "metadata": meta(true), "spec": {"targetRefs": [], "local": {"requestsPerSecond": 5}}}),
        ),
        Kind::FaultInjection => (
            "/apis/mesh.dev/v1alpha1/faultinjections",
            json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "FaultInjection", "metadata": meta(true), "spec": {"abort": {"httpStatus": 503, "percent": 10}}}),
        ),
        Kind::Rollout => (
            "/apis/mesh.dev/v1alpha1/rollouts",
            json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "Rollout", "metadata": meta(true), "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"}, "stable": "a", "candidate": "b", "steps": [{"weight": 50}]}}),
        ),
        Kind::GatewayClass => (
            "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": meta(false), "spec": {"controllerName": "mesh.dev/mesh-controller"}}),
        ),
        Kind::Gateway => (
            "/apis/gateway.networking.k8s.io/v1/gateways",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": meta(true), "spec": {"gatewayClassName": "mesh", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
        ),
        Kind::Secret => (
            "/api/v1/secrets",
            json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": meta(true), "data": {"tls.crt": "", "tls.key": ""}}),
        ),
        Kind::ReferenceGrant => (
            "/apis/gateway.networking.k8s.io/v1/referencegrants",
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant", "metadata": meta(true), "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "web"}], "to": [{"group": "", "kind": "Service"}]}}),
        ),
    }
}

fn list_body(items: Vec<Value>, rv: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}))
        .expect("json")
}

fn events_body(events: &[(&str, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (ty, obj) in events {
        out.extend(serde_json::to_vec(&json!({"type": ty, "object": obj})).expect("json"));
        out.push(b'\n');
    }
    out
}

/// Takes the next request, checks its path and whether it is a watch (and from which
/// resourceVersion), and answers with `body`.
async fn expect(
    handle: &mut MockHandle,
    path: &str,
    watch_from: Option<&str>,
    status: u16,
    body: Vec<u8>,
) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request for {path}"))
        .expect("client alive");
    assert_eq!(req.method(), http::Method::GET);
    assert_eq!(req.uri().path(), path, "request {}", req.uri());
    let query = req.uri().query().unwrap_or_default().to_string();
    match watch_from {
        Some(rv) => {
            assert!(query.contains("watch=true"), "expected a watch: {query}");
            assert!(
                query.contains(&format!("resourceVersion={rv}")),
                "expected a watch from {rv}: {query}"
            );
        }
        None => assert!(!query.contains("watch=true"), "expected a list: {query}"),
    }
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(body))
            .expect("response"),
    );
}

fn count(sink: &Sink, kind: Kind) -> usize {
    sink.index.lock().expect("lock").counts()[&kind]
}

/// Waits until the index holds exactly the objects of `kind` named `names` (a Rollout changes
/// no revision: it is not part of the model, so the index is watched, not its revision).
async fn wait_holds(sink: &Sink, kind: Kind, names: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut held: Vec<String> = sink
            .index
            .lock()
            .expect("lock")
            .keys(kind)
            .into_iter()
            .map(|k| k.name)
            .collect();
        held.sort();
        if held == names {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{kind}: the index holds {held:?}, not {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_revision(rx: &mut tokio::sync::watch::Receiver<u64>, at_least: u64, what: &str) {
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r >= at_least))
        .await
        .unwrap_or_else(|_| panic!("{what}: the index did not reach revision {at_least}"))
        .expect("index alive");
}

macro_rules! watch_one {
    ($ty:ty, $kind:expr, $variant:path, $client:expr, $sink:expr) => {
        tokio::spawn(watch_kind::<$ty>(
            Api::all($client),
            $kind,
            $variant,
            $sink.clone(),
        ))
    };
}

fn spawn_kind(kind: Kind, client: Client, sink: &Sink) -> tokio::task::JoinHandle<()> {
    match kind {
        Kind::Namespace => watch_one!(Namespace, kind, Object::Namespace, client, sink),
        Kind::Service => watch_one!(Service, kind, Object::Service, client, sink),
        Kind::EndpointSlice => watch_one!(EndpointSlice, kind, Object::EndpointSlice, client, sink),
        Kind::Pod => watch_one!(Pod, kind, Object::Pod, client, sink),
        Kind::HTTPRoute => watch_one!(HttpRoute, kind, Object::HttpRoute, client, sink),
        Kind::GRPCRoute => watch_one!(GrpcRoute, kind, Object::GrpcRoute, client, sink),
        Kind::AuthorizationPolicy => watch_one!(
            AuthorizationPolicy,
            kind,
            Object::AuthorizationPolicy,
            client,
            sink
        ),
        Kind::TrafficPolicy => watch_one!(TrafficPolicy, kind, Object::TrafficPolicy, client, sink),
        Kind::RateLimitPolicy => {
            watch_one!(RateLimitPolicy, kind, Object::RateLimitPolicy, client, sink)
        }
        Kind::FaultInjection => {
            watch_one!(FaultInjection, kind, Object::FaultInjection, client, sink)
        }
        Kind::Rollout => watch_one!(Rollout, kind, Object::Rollout, client, sink),
        Kind::ReferenceGrant => {
            watch_one!(ReferenceGrant, kind, Object::ReferenceGrant, client, sink)
        }
        Kind::GatewayClass => watch_one!(GatewayClass, kind, Object::GatewayClass, client, sink),
        Kind::Gateway => watch_one!(Gateway, kind, Object::Gateway, client, sink),
        Kind::Secret => watch_one!(Secret, kind, Object::Secret, client, sink),
    }
}

#[tokio::test]
async fn each_kind_is_listed_then_watched() {
    for kind in Kind::ALL {
        let (client, mut handle) = client();
        let sink = Sink::new(
            Arc::new(Mutex::new(Index::new("cluster.local"))),
            ConfigErrors::default(),
        );
        let task = spawn_kind(kind, client, &sink);

        let (path, first) = sample(kind, "first", "10");
        let (_, second) = sample(kind, "second", "11");
        expect(
            &mut handle,
            path,
            None,
            200,
            list_body(vec![first.clone()], "10"),
        )
        .await;
        wait_holds(&sink, kind, &["first"]).await;
        assert!(
            sink.synced.borrow().contains(&kind),
            "{kind}: marked as listed"
        );

        // The watch adds one object and deletes the other, then the server closes it.
        let mut deleted = first.clone();
        deleted["metadata"]["resourceVersion"] = json!("12");
        expect(
            &mut handle,
            path,
            Some("10"),
            200,
            events_body(&[("ADDED", second), ("DELETED", deleted)]),
        )
        .await;
        wait_holds(&sink, kind, &["second"]).await;
        assert!(
            sink.errors.all().is_empty(),
            "{kind}: {:?}",
            sink.errors.all()
        );
        // A closed watch is resumed from the last resourceVersion seen.
        expect(&mut handle, path, Some("12"), 200, events_body(&[])).await;
        task.abort();
    }
}

#[tokio::test]
async fn an_expired_watch_relists_and_drops_what_is_gone() {
    let (client, mut handle) = client();
    let sink = Sink::new(
        Arc::new(Mutex::new(Index::new("cluster.local"))),
        ConfigErrors::default(),
    );
    let mut rev = sink.index.lock().expect("lock").subscribe();
    let task = spawn_kind(Kind::Service, client, &sink);
    let path = "/api/v1/services";
    let (_, a) = sample(Kind::Service, "a", "10");
    let (_, b) = sample(Kind::Service, "b", "10");
    expect(
        &mut handle,
        path,
        None,
        200,
        list_body(vec![a.clone(), b], "10"),
    )
    .await;
    wait_revision(&mut rev, 1, "list").await;
    // The watch's history is gone (410): the watcher lists again; b was deleted meanwhile.
    let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410});
    expect(
        &mut handle,
        path,
        Some("10"),
        200,
        events_body(&[("ERROR", gone)]),
    )
    .await;
    expect(&mut handle, path, None, 200, list_body(vec![a], "20")).await;
    wait_revision(&mut rev, 2, "relist").await;
    let model = sink.index.lock().expect("lock").model();
    let names: Vec<String> = model.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, vec!["default/a"]);
    expect(&mut handle, path, Some("20"), 200, events_body(&[])).await;
    task.abort();
}

#[tokio::test]
async fn a_refused_object_is_reported_and_its_last_good_version_kept() {
    let (client, mut handle) = client();
    let errors = ConfigErrors::default();
    let sink = Sink::new(
        Arc::new(Mutex::new(Index::new("cluster.local"))),
        errors.clone(),
    );
    let mut rev = sink.index.lock().expect("lock").subscribe();
    let task = spawn_kind(Kind::HTTPRoute, client, &sink);
    let path = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let (_, mut good) = sample(Kind::HTTPRoute, "r", "10");
    good["spec"] = json!({"rules": [{"backendRefs": [{"name": "a", "port": 80, "weight": 1}]}]});
    expect(
        &mut handle,
        path,
        None,
        200,
        list_body(vec![good.clone()], "10"),
    )
    .await;
    wait_revision(&mut rev, 1, "list").await;
    let mut bad = good.clone();
    bad["metadata"]["resourceVersion"] = json!("11");
    bad["spec"]["rules"][0]["backendRefs"][0]["weight"] = json!(-1);
    expect(
        &mut handle,
        path,
        Some("10"),
        200,
        events_body(&[("MODIFIED", bad)]),
    )
    .await;
    let reported = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let all = errors.all();
            if !all.is_empty() {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("reported");
    assert_eq!(reported[0].source, "HTTPRoute/default/r");
    assert_eq!(reported[0].field, "spec.rules[0].backendRefs[0].weight");
    assert_eq!(
        sink.index.lock().expect("lock").counts()[&Kind::HTTPRoute],
        1,
        "last good version kept"
    );
    task.abort();
}

/// Every watcher against the fake API server, which streams changes and expires history as a
/// real one does: objects written after the list arrive as events, and after a compaction that
/// ends the watches, each watcher's resumed watch gets 410 Gone, relists, and the index loses
/// what was deleted while it was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchers_follow_the_fake_api_server_through_a_compaction() {
    use mesh_api::fake_api::FakeApi;
    let (client, fake) = FakeApi::start();
    fake.install_chart_crds();
    let svc = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default"},
               "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})
    };
    fake.insert(svc("a"));
    let sink = Sink::new(
        Arc::new(Mutex::new(Index::new("cluster.local"))),
        ConfigErrors::default(),
    );
    let tasks = spawn_watchers(client, &sink);
    let missing = sink.wait_synced(Duration::from_secs(10)).await;
    assert!(missing.is_empty(), "never listed: {missing:?}");
    let mut rev = sink.index.lock().expect("lock").subscribe();
    let at = *rev.borrow();

    fake.insert(svc("b"));
    wait_revision(&mut rev, at + 1, "b by a watch event").await;
    assert_eq!(count(&sink, Kind::Service), 2);

    let lists = |fake: &FakeApi| {
        fake.state()
            .log
            .iter()
            .filter(|l| l.path == "/api/v1/services" && !l.query.contains("watch="))
            .count()
    };
    let before = lists(&fake);
    fake.compact_and_end_watches(|s| {
        s.delete("/api/v1/namespaces/default/services/a");
        s.put(svc("c"));
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = sink
            .index
            .lock()
            .expect("lock")
            .model()
            .services
            .keys()
            .map(|k| k.name.clone())
            .collect();
        if names == ["b", "c"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after the compaction the index has {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lists(&fake) > before, "the watcher never listed again");
    assert!(
        fake.state().expired_watches >= 1,
        "no watch resumed from before the compaction"
    );
    for t in tasks {
        t.abort();
    }
}
