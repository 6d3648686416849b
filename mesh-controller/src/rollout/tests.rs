//! The driver against a local mesh directory (its route file rewritten, its status file kept)
//! and, for a cluster, the fake API server; traffic is fed as the proxies' metrics pages, time
//! as explicit instants.

use mesh_api::fake_api::FakeApi;
use serde_json::json;

use super::*;
use crate::testing::{obj, service_yaml, split_yaml};

const ROUTE: &str = "HTTPRoute/shop/reviews rule 1";

/// One client proxy's cumulative counts: per backend, (ok, failed).
#[derive(Default)]
struct Traffic {
    v1: (u64, u64),
    v2: (u64, u64),
}

impl Traffic {
    fn page(&self) -> String {
        let mut out = String::new();
        for (backend, (ok, failed)) in [("reviews-v1", self.v1), ("reviews-v2", self.v2)] {
            let edge = format!(
                r#"direction="outbound",route="{ROUTE}",backend="outbound|9080||{backend}.shop.svc.cluster.local""#
            );
            out += &format!("mesh_proxy_requests_total{{{edge},status_class=\"2xx\"}} {ok}\n");
            out += &format!("mesh_proxy_requests_total{{{edge},status_class=\"5xx\"}} {failed}\n");
            let all = ok + failed;
            out += &format!(
                "mesh_proxy_request_duration_seconds_bucket{{{edge},le=\"0.01\"}} {all}\n"
            );
            out += &format!(
                "mesh_proxy_request_duration_seconds_bucket{{{edge},le=\"+Inf\"}} {all}\n"
            );
        }
        out
    }
}

fn rollout_yaml(extra: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: Rollout\nmetadata: {{name: reviews, namespace: shop}}\nspec:\n  targetRef: {{group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}}\n  stable: reviews-v1\n  candidate: reviews-v2\n  interval: 30s\n  minRequests: 20\n  gates: {{minSuccessRate: 99}}\n{extra}"
    )
}

struct Local {
    dir: tempfile::TempDir,
    index: Arc<Mutex<Index>>,
    stats: Arc<Stats>,
    driver: Driver,
    traffic: Traffic,
    t0: Instant,
    now: Instant,
}

/// A local mesh: reviews, -v1, -v2, a route (with a header rule before its catch-all) all on
/// v1, and a rollout with `steps`.
fn local(steps: &str) -> Local {
    let dir = tempfile::tempdir().expect("tmp");
    let mut index = Index::new("cluster.local");
    for (ip, name) in [
        ("10.96.0.10", "reviews"),
        ("10.96.0.11", "reviews-v1"),
        ("10.96.0.12", "reviews-v2"),
    ] {
        index
            .apply(obj(&service_yaml("shop", name, ip, &[("http", 9080)])))
            .expect("valid");
    }
    let route = split_yaml("shop", "reviews", "reviews", 9080, &[("reviews-v1", 1)]).replace(
        "  rules:\n",
        "  rules:\n  - matches: [{headers: [{name: x-debug, value: '1'}]}]\n    backendRefs: [{name: reviews-v1, port: 9080}]\n",
    );
    std::fs::write(dir.path().join("route.yaml"), &route).expect("write");
    std::fs::write(
        dir.path().join("rollout.yaml"),
        rollout_yaml(&format!("  steps: {steps}\n")),
    )
    .expect("write");
    let index = Arc::new(Mutex::new(index));
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    let driver = Driver::new(
        index.clone(),
        stats.clone(),
        Store::Local(dir.path().to_path_buf()),
        Arc::new(AtomicBool::new(true)),
    );
    let now = Instant::now();
    let l = Local {
        dir,
        index,
        stats,
        driver,
        traffic: Traffic::default(),
        t0: now,
        now,
    };
    l.reload();
    l
}

impl Local {
    /// What the directory source does: the files' objects into the index.
    fn reload(&self) {
        let mut index = self.index.lock().expect("index");
        for f in ["route.yaml", "rollout.yaml"] {
            let text = std::fs::read_to_string(self.dir.path().join(f)).expect("read");
            index.apply(obj(&text)).expect("valid");
        }
    }

    async fn tick(&mut self) -> RolloutStatus {
        self.driver.tick(self.now).await;
        self.reload();
        crate::rollout::store::read_local_status(self.dir.path(), "shop", "reviews")
            .expect("readable")
            .expect("a status")
    }

    /// `secs` of time pass, with `v1` and `v2` requests `(ok, failed)` sent meanwhile, and
    /// a scrape at the end.
    fn pass(&mut self, secs: u64, v1: (u64, u64), v2: (u64, u64)) {
        self.traffic.v1.0 += v1.0;
        self.traffic.v1.1 += v1.1;
        self.traffic.v2.0 += v2.0;
        self.traffic.v2.1 += v2.1;
        self.now += Duration::from_secs(secs);
        self.stats
            .ingest("client-0", self.now, &self.traffic.page());
    }

    fn weights(&self) -> Vec<(String, u32)> {
        let (_, _, route) =
            mesh_api::route_doc::find_doc(self.dir.path(), "HTTPRoute", "shop", "reviews")
                .expect("read")
                .expect("route");
        let rule = mesh_api::route_doc::split_rule_besides(&route, Some("rollout-reviews"))
            .expect("split rule");
        mesh_api::route_doc::weights(&mesh_api::route_doc::rules(&route)[rule])
    }

    fn route(&self) -> serde_norway::Value {
        mesh_api::route_doc::find_doc(self.dir.path(), "HTTPRoute", "shop", "reviews")
            .expect("read")
            .expect("route")
            .2
    }

    fn annotate(&self, key: &str, value: &str) {
        let path = self.dir.path().join("rollout.yaml");
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replace(
            "metadata: {name: reviews, namespace: shop}",
            &format!(
                "metadata: {{name: reviews, namespace: shop, annotations: {{{key}: '{value}'}}}}"
            ),
        );
        std::fs::write(&path, text).expect("write");
        self.reload();
    }
}

impl Local {
    /// Rewrites the Rollout's manifest (as a person editing it) and reloads it.
    fn edit_rollout(&self, f: impl Fn(String) -> String) {
        let path = self.dir.path().join("rollout.yaml");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, f(text)).expect("write");
        self.reload();
    }

    fn service(&self, name: &str, present: bool) {
        let mut index = self.index.lock().expect("index");
        if present {
            index
                .apply(obj(&service_yaml(
                    "shop",
                    name,
                    "10.96.0.12",
                    &[("http", 9080)],
                )))
                .expect("valid");
        } else {
            index.delete(&ObjKey {
                kind: Kind::Service,
                namespace: "shop".into(),
                name: name.into(),
            });
        }
    }

    fn condition(st: &RolloutStatus, kind: &str) -> (String, String) {
        let c = cond(st, kind);
        (c.status.clone(), c.reason.clone())
    }

    /// What a person's `meshctl route split` does: the rule's weights set in the file.
    fn set_route_weights(&self, weights: &[(&str, u32)]) {
        let path = self.dir.path().join("route.yaml");
        let mut route = mesh_api::route_doc::read_docs(&path)
            .expect("read")
            .remove(0);
        mesh_api::route_doc::set_backends(&mut route, 1, &w(weights), 9080);
        mesh_api::route_doc::write_docs(&path, &[route]).expect("write");
        self.reload();
    }
}

/// Condition `kind` of a status, which must be there.
fn cond<'a>(st: &'a RolloutStatus, kind: &str) -> &'a Condition {
    st.conditions
        .iter()
        .find(|c| c.type_ == kind)
        .unwrap_or_else(|| panic!("no condition {kind}: {st:#?}"))
}

fn w(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(n, w)| (n.to_string(), *w)).collect()
}

fn actions(st: &RolloutStatus) -> Vec<String> {
    st.decisions.iter().map(|d| d.action.clone()).collect()
}

#[tokio::test]
async fn a_healthy_candidate_is_promoted_step_by_step() {
    let mut m = local("[{weight: 10}, {weight: 50}, {weight: 100}]");
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Progressing);
    assert_eq!(m.weights(), w(&[("reviews-v1", 90), ("reviews-v2", 10)]));
    // The header rule before the catch-all is not the one that moves.
    assert_eq!(
        mesh_api::route_doc::weights(&mesh_api::route_doc::rules(&m.route())[0]),
        w(&[("reviews-v1", 1)])
    );
    m.pass(1, (0, 0), (0, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 0);
    assert!(st.step_started_at.is_some());

    // Enough requests, but the step's 30 s have not passed.
    m.pass(10, (180, 0), (20, 0));
    let st = m.tick().await;
    assert_eq!((st.phase, st.step), (RolloutPhase::Progressing, 0));
    let current = st.current.clone().expect("measuring");
    assert_eq!(current.candidate.requests, 20);
    assert_eq!(current.candidate.success_rate, Some(100.0));
    assert_eq!(m.weights(), w(&[("reviews-v1", 90), ("reviews-v2", 10)]));

    m.pass(21, (100, 0), (10, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 1);
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));
    let advanced = st.decisions.last().expect("decision");
    assert_eq!((advanced.action.as_str(), advanced.step), ("Advanced", 0));
    assert_eq!(advanced.candidate.requests, 30);
    assert_eq!(advanced.stable.requests, 280);

    for _ in 0..2 {
        m.pass(1, (0, 0), (0, 0));
        m.tick().await;
        m.pass(31, (50, 0), (50, 0));
        m.tick().await;
    }
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Promoted);
    assert_eq!(m.weights(), w(&[("reviews-v1", 0), ("reviews-v2", 100)]));
    assert_eq!(
        actions(&st),
        ["Started", "Advanced", "Advanced", "Promoted"],
        "{st:#?}"
    );
    let ready = cond(&st, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Promoted")
    );

    // Done: traffic no longer moves anything.
    m.pass(40, (0, 0), (100, 100));
    let again = m.tick().await;
    assert_eq!(again.decisions, st.decisions);
    assert_eq!(m.weights(), w(&[("reviews-v1", 0), ("reviews-v2", 100)]));
}

#[tokio::test]
async fn a_failing_candidate_is_rolled_back_as_soon_as_its_requests_are_in() {
    let mut m = local("[{weight: 5}, {weight: 25}, {weight: 50}, {weight: 100}]");
    m.tick().await;
    m.pass(1, (0, 0), (0, 0));
    m.tick().await;
    // 19 requests: not judged yet, however bad.
    m.pass(2, (300, 0), (15, 4));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Progressing);
    // The 20th: judged at once, long before the step's 30 s.
    m.pass(1, (20, 0), (1, 0));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::RolledBack, "{st:#?}");
    assert_eq!(m.weights(), w(&[("reviews-v1", 100), ("reviews-v2", 0)]));
    let last = st.decisions.last().expect("decision");
    assert_eq!(last.action, "RolledBack");
    assert_eq!(last.candidate.requests, 20);
    assert_eq!(last.candidate.success_rate, Some(80.0));
    assert!(last.reason.contains("below 99 %"), "{}", last.reason);
}

#[tokio::test]
async fn a_manual_change_pauses_until_resumed() {
    let mut m = local("[{weight: 10}, {weight: 100}]");
    m.tick().await;
    // What `meshctl route split --to reviews-v1=50,reviews-v2=50` writes.
    m.set_route_weights(&[("reviews-v1", 50), ("reviews-v2", 50)]);
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Paused);
    let paused = cond(&st, "Paused");
    assert_eq!(paused.reason, "ManualChange");
    assert!(
        paused
            .message
            .contains("weights changed to reviews-v1=50, reviews-v2=50"),
        "{}",
        paused.message
    );
    // Paused: the person's weights stay, whatever traffic does.
    m.pass(40, (0, 0), (100, 0));
    m.tick().await;
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));

    m.annotate(mesh_api::consts::labels::RESUME, "2026-12-05T00:00:00Z");
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Progressing);
    assert_eq!(m.weights(), w(&[("reviews-v1", 90), ("reviews-v2", 10)]));
    assert_eq!(actions(&st), ["Started", "Paused", "Resumed"]);
}

#[tokio::test]
async fn a_restarted_controller_resumes_at_the_same_step() {
    let mut m = local("[{weight: 10}, {weight: 50}, {weight: 100}]");
    m.tick().await;
    m.pass(1, (0, 0), (0, 0));
    m.tick().await;
    m.pass(31, (100, 0), (30, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 1);
    // A new process: a new driver over the same directory; the old counts are gone.
    m.driver = Driver::new(
        m.index.clone(),
        m.stats.clone(),
        Store::Local(m.dir.path().to_path_buf()),
        Arc::new(AtomicBool::new(true)),
    );
    m.pass(1, (10, 0), (10, 0));
    let st = m.tick().await;
    assert_eq!((st.phase, st.step), (RolloutPhase::Progressing, 1));
    assert_eq!(
        st.decisions.last().map(|d| d.action.as_str()),
        Some("Resumed after restart")
    );
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));
    // Measured from the restart: the step needs its 30 s and requests again.
    m.pass(10, (50, 0), (50, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 1);
    m.pass(21, (50, 0), (50, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 2);
    assert_eq!(m.t0 + Duration::from_secs(64), m.now);
}

#[tokio::test]
async fn a_header_step_adds_a_rule_for_the_candidate_then_takes_it_away() {
    let mut m = local("[{weight: 0, headers: [{name: x-canary, value: 'yes'}]}, {weight: 50}]");
    m.tick().await;
    let route = m.route();
    let rules = mesh_api::route_doc::rules(&route);
    let own = mesh_api::route_doc::rule_named(&route, "rollout-reviews").expect("header rule");
    assert_eq!(own, 1, "just before the rule that moves");
    assert_eq!(
        mesh_api::route_doc::weights(&rules[own]),
        w(&[("reviews-v2", 1)])
    );
    assert_eq!(
        serde_json::to_value(&rules[own]["matches"]).expect("json"),
        json!([{"headers": [{"type": "Exact", "name": "x-canary", "value": "yes"}]}])
    );
    assert_eq!(m.weights(), w(&[("reviews-v1", 100), ("reviews-v2", 0)]));
    m.pass(1, (0, 0), (0, 0));
    m.tick().await;
    m.pass(31, (100, 0), (20, 0));
    let st = m.tick().await;
    assert_eq!(st.step, 1);
    assert!(mesh_api::route_doc::rule_named(&m.route(), "rollout-reviews").is_none());
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));
}

#[tokio::test]
async fn a_rollout_that_cannot_run_says_why_and_starts_once_fixed() {
    let mut m = local("[{weight: 10}]");
    m.edit_rollout(|t| t.replace("candidate: reviews-v2", "candidate: reviews-v9"));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Invalid);
    let ready = cond(&st, "Ready");
    assert_eq!(ready.status, "False");
    assert!(
        ready
            .message
            .contains("spec.candidate: Service shop/reviews-v9 not found"),
        "{}",
        ready.message
    );
    assert_eq!(m.weights(), w(&[("reviews-v1", 1)]), "nothing written");
    m.edit_rollout(|t| t.replace("candidate: reviews-v9", "candidate: reviews-v2"));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Progressing);
    assert_eq!(m.weights(), w(&[("reviews-v1", 90), ("reviews-v2", 10)]));
}

#[test]
fn gates_judge_the_candidate_alone_and_against_stable() {
    let tally = |ok: f64, failed: f64, p99_bucket: f64| {
        let mut t = Tally {
            requests: ok + failed,
            failures: failed,
            ..Default::default()
        };
        t.buckets
            .insert(crate::stats::OrdF64(p99_bucket), ok + failed);
        t.buckets
            .insert(crate::stats::OrdF64(f64::INFINITY), ok + failed);
        t
    };
    let gates: RolloutGates = serde_json::from_value(json!({
        "minSuccessRate": 95.0, "maxP99": "300ms",
        "relativeToStable": {"maxSuccessRateDrop": 1.0, "maxP99Ratio": 2.0}}))
    .expect("gates");
    let stable = tally(1000.0, 0.0, 0.05);
    assert_eq!(
        gate_failure(&gates, &tally(99.0, 1.0, 0.05), &stable, 20),
        None
    );
    let why = gate_failure(&gates, &tally(90.0, 10.0, 0.05), &stable, 20).expect("fails");
    assert!(why.contains("minSuccessRate"), "{why}");
    let why = gate_failure(&gates, &tally(100.0, 0.0, 0.5), &stable, 20).expect("fails");
    assert!(why.contains("maxP99"), "{why}");
    let why = gate_failure(&gates, &tally(97.0, 3.0, 0.05), &stable, 20).expect("fails");
    assert!(why.contains("maxSuccessRateDrop"), "{why}");
    let why = gate_failure(&gates, &tally(100.0, 0.0, 0.2), &stable, 20).expect("fails");
    assert!(why.contains("maxP99Ratio"), "{why}");
    // Without enough stable requests (the last step), only the absolute gates count.
    assert_eq!(
        gate_failure(&gates, &tally(97.0, 3.0, 0.05), &tally(5.0, 0.0, 0.05), 20),
        None
    );
}

#[tokio::test]
async fn in_a_cluster_the_route_is_applied_the_status_patched_and_events_written() {
    let (client, fake) = FakeApi::start();
    fake.install_chart_crds();
    let mut index = Index::new("cluster.local");
    for (ip, name) in [("10.96.0.11", "reviews-v1"), ("10.96.0.12", "reviews-v2")] {
        index
            .apply(obj(&service_yaml("shop", name, ip, &[("http", 9080)])))
            .expect("valid");
    }
    let route = split_yaml("shop", "reviews", "reviews", 9080, &[("reviews-v1", 1)]);
    let mut rollout: serde_json::Value =
        serde_norway::from_str(&rollout_yaml("  steps: [{weight: 20}, {weight: 100}]\n"))
            .expect("yaml");
    rollout["metadata"]["uid"] = json!("u-1");
    fake.insert(serde_norway::from_str(&route).expect("yaml"));
    index.apply(obj(&route)).expect("valid");
    fake.insert(rollout.clone());
    index
        .apply(crate::objects::parse_doc(rollout, "default").expect("rollout"))
        .expect("valid");
    let index = Arc::new(Mutex::new(index));
    let stats = Stats::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut driver = Driver::new(
        index,
        stats,
        Store::Kube(client),
        Arc::new(AtomicBool::new(true)),
    );
    driver.tick(Instant::now()).await;
    let writes = fake.writes();
    let s = fake.state();
    let live = &s.objects["/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/reviews"];
    assert_eq!(
        live["spec"]["rules"][0]["backendRefs"],
        // As the API server defaults them.
        json!([{"group": "", "kind": "Service", "name": "reviews-v1", "port": 9080, "weight": 80},
               {"group": "", "kind": "Service", "name": "reviews-v2", "port": 9080, "weight": 20}])
    );
    assert!(
        live["spec"]["parentRefs"].is_array(),
        "the rest of the route stays"
    );
    let applied = writes
        .into_iter()
        .find(|w| w.path.ends_with("/httproutes/reviews") && w.method == "PATCH")
        .expect("the route was patched");
    assert!(applied.content_type.starts_with("application/apply-patch"));
    assert!(
        applied
            .query
            .contains(&format!("fieldManager={}", store::FIELD_MANAGER))
            && applied.query.contains("force=true"),
        "{}",
        applied.query
    );
    let ro = &s.objects["/apis/mesh.dev/v1alpha1/namespaces/shop/rollouts/reviews"];
    assert_eq!(ro["status"]["phase"], "Progressing");
    assert_eq!(ro["status"]["release"], "u-1");
    let events: Vec<&serde_json::Value> = s
        .objects
        .iter()
        .filter(|(p, _)| p.starts_with("/api/v1/namespaces/shop/events/"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "Started");
    assert_eq!(events[0]["involvedObject"]["kind"], "Rollout");
}

#[test]
fn every_status_field_is_named_for_the_merge_patch() {
    let full = RolloutStatus {
        step_started_at: Some("t".into()),
        stable: "a".into(),
        candidate: "b".into(),
        release: "r".into(),
        weights: vec![BackendWeight::default()],
        previous_weights: vec![BackendWeight::default()],
        current: Some(Decision::default()),
        decisions: vec![Decision::default()],
        resumed: Some("x".into()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        }],
        observed_generation: Some(1),
        ..Default::default()
    };
    let v = serde_json::to_value(&full).expect("json");
    let mut keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut named = mesh_api::rollout::STATUS_FIELDS.to_vec();
    named.sort_unstable();
    assert_eq!(keys, named);
}

#[tokio::test]
async fn a_route_that_cannot_be_written_is_written_on_a_later_tick() {
    let mut m = local("[{weight: 10}, {weight: 100}]");
    m.tick().await;
    m.pass(1, (0, 0), (0, 0));
    m.tick().await;
    // The rollback's write fails: the route's file is away for a moment.
    let (path, away) = (
        m.dir.path().join("route.yaml"),
        m.dir.path().join("route.away"),
    );
    std::fs::rename(&path, &away).expect("mv");
    m.pass(2, (100, 0), (10, 10));
    m.driver.tick(m.now).await;
    let st = crate::rollout::store::read_local_status(m.dir.path(), "shop", "reviews")
        .expect("readable")
        .expect("a status");
    assert_eq!(st.phase, RolloutPhase::RolledBack);
    assert_eq!(
        Local::condition(&st, "Ready"),
        ("False".into(), "RouteNotWritten".into())
    );
    assert_eq!(
        as_map(&st.weights),
        BTreeMap::from([("reviews-v1".into(), 100), ("reviews-v2".into(), 0)]),
        "the status keeps the weights it wants"
    );
    std::fs::rename(&away, &path).expect("mv back");
    m.reload();
    // Not at once: a refused write is tried again REWRITE_AFTER later.
    m.tick().await;
    assert_eq!(m.weights(), w(&[("reviews-v1", 90), ("reviews-v2", 10)]));
    m.pass(10, (0, 0), (0, 0));
    m.tick().await;
    assert_eq!(m.weights(), w(&[("reviews-v1", 100), ("reviews-v2", 0)]));
    let st = m.tick().await;
    assert_eq!(
        Local::condition(&st, "Ready"),
        ("True".into(), "RolledBack".into()),
        "{st:#?}"
    );
    assert!(st.previous_weights.is_empty());
}

#[tokio::test]
async fn a_resume_asked_before_a_manual_change_does_not_end_the_pause_it_causes() {
    let mut m = local("[{weight: 10}, {weight: 100}]");
    m.tick().await;
    m.edit_rollout(|t| t.replace("  interval: 30s\n", "  interval: 30s\n  paused: true\n"));
    assert_eq!(m.tick().await.phase, RolloutPhase::Paused);
    m.edit_rollout(|t| t.replace("  paused: true\n", ""));
    m.annotate(mesh_api::consts::labels::RESUME, "t1");
    assert_eq!(m.tick().await.phase, RolloutPhase::Progressing);
    // Now a person changes the weights: paused, and t1 does not resume it.
    m.set_route_weights(&[("reviews-v1", 70), ("reviews-v2", 30)]);
    let st = m.tick().await;
    assert_eq!(Local::condition(&st, "Paused").1, "ManualChange");
    assert_eq!(
        st.decisions.last().map(|d| d.weight),
        Some(30),
        "the share found"
    );
    m.pass(2, (0, 0), (0, 0));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Paused);
    assert_eq!(m.weights(), w(&[("reviews-v1", 70), ("reviews-v2", 30)]));
}

#[tokio::test]
async fn an_invalid_rollout_resumes_at_its_step_and_can_be_aborted() {
    let mut m = local("[{weight: 10}, {weight: 50}, {weight: 100}]");
    m.tick().await;
    m.pass(1, (0, 0), (0, 0));
    m.tick().await;
    m.pass(31, (100, 0), (30, 0));
    assert_eq!(m.tick().await.step, 1);
    // The candidate's Service goes away for a while: Invalid, the route left as it is.
    m.service("reviews-v2", false);
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Invalid);
    assert!(st.current.is_none());
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));
    m.service("reviews-v2", true);
    let st = m.tick().await;
    assert_eq!((st.phase, st.step), (RolloutPhase::Progressing, 1));
    assert_eq!(actions(&st).last().map(String::as_str), Some("Resumed"));
    assert_eq!(m.weights(), w(&[("reviews-v1", 50), ("reviews-v2", 50)]));

    // Gone again, and aborted meanwhile: all back on stable all the same.
    m.service("reviews-v2", false);
    assert_eq!(m.tick().await.phase, RolloutPhase::Invalid);
    m.edit_rollout(|t| t.replace("  interval: 30s\n", "  interval: 30s\n  abort: true\n"));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Aborted);
    assert_eq!(m.weights(), w(&[("reviews-v1", 100), ("reviews-v2", 0)]));
}

#[tokio::test]
async fn a_rollout_paused_or_aborted_before_it_starts_leaves_the_route_alone() {
    let mut m = local("[{weight: 10}]");
    m.edit_rollout(|t| t.replace("  interval: 30s\n", "  interval: 30s\n  paused: true\n"));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Paused);
    assert_eq!(m.weights(), w(&[("reviews-v1", 1)]));
    m.edit_rollout(|t| t.replace("  paused: true\n", "  abort: true\n"));
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Aborted);
    assert_eq!(m.weights(), w(&[("reviews-v1", 1)]));
}

#[test]
fn a_step_that_sends_the_candidate_nothing_is_refused() {
    let spec: RolloutSpec = serde_json::from_value(json!({
        "targetRef": {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "r"},
        "stable": "a", "candidate": "b", "steps": [{"weight": 0}, {"weight": 100}]}))
    .expect("spec");
    let err = check_spec(&spec).expect_err("refused");
    assert!(
        err.starts_with("spec.steps[0]: weight 0 and no headers"),
        "{err}"
    );
}

#[tokio::test]
async fn a_lost_write_of_the_header_rule_alone_is_made_again() {
    let mut m = local("[{weight: 0, headers: [{name: x-canary, value: 'yes'}]}, {weight: 100}]");
    // The rule already shows the first step's weights; only the header rule is to come.
    m.set_route_weights(&[("reviews-v1", 100), ("reviews-v2", 0)]);
    let (path, away) = (
        m.dir.path().join("route.yaml"),
        m.dir.path().join("route.away"),
    );
    std::fs::rename(&path, &away).expect("mv");
    m.driver.tick(m.now).await;
    std::fs::rename(&away, &path).expect("mv back");
    m.reload();
    m.pass(10, (0, 0), (0, 0));
    m.tick().await;
    assert!(
        mesh_api::route_doc::rule_named(&m.route(), "rollout-reviews").is_some(),
        "the header rule was written again"
    );
}

#[tokio::test]
async fn a_manual_pause_outlasts_an_invalid_spell() {
    let mut m = local("[{weight: 10}, {weight: 100}]");
    m.tick().await;
    m.set_route_weights(&[("reviews-v1", 60), ("reviews-v2", 40)]);
    assert_eq!(
        Local::condition(&m.tick().await, "Paused").1,
        "ManualChange"
    );
    m.service("reviews-v2", false);
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Paused, "a pause stays a pause");
    assert_eq!(
        Local::condition(&st, "Ready"),
        ("False".into(), "Invalid".into())
    );
    m.service("reviews-v2", true);
    let st = m.tick().await;
    assert_eq!(st.phase, RolloutPhase::Paused);
    assert_eq!(Local::condition(&st, "Ready").0, "True");
    assert_eq!(m.weights(), w(&[("reviews-v1", 60), ("reviews-v2", 40)]));
}
