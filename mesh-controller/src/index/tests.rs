use super::*;
use crate::testing::{obj, service_yaml, slice_yaml, split_yaml};

fn mesh() -> Index {
    let mut idx = Index::new("cluster.local");
    for (name, ip, eps) in [
        ("reviews", "10.96.0.10", vec!["10.0.0.1"]),
        ("reviews-v1", "10.96.0.11", vec!["10.0.1.1", "10.0.1.2"]),
        ("reviews-v2", "10.96.0.12", vec!["10.0.2.1"]),
    ] {
        idx.apply(obj(&service_yaml("default", name, ip, &[("http", 9080)])))
            .expect("svc");
        idx.apply(obj(&slice_yaml("default", name, "http", 9080, &eps)))
            .expect("slice");
    }
    idx
}

fn port<'a>(m: &'a Model, name: &str) -> &'a PortModel {
    &m.services[&SvcKey::new("default", name)].ports[0]
}

fn weights(entry: &RouteEntry) -> Vec<(Option<String>, u32)> {
    match &entry.action {
        RouteAction::Forward(b) => b.iter().map(|b| (b.cluster.clone(), b.weight)).collect(),
        other => panic!("not a forward: {other:?}"),
    }
}

#[test]
fn endpoints_follow_slices_and_readiness() {
    let mut idx = mesh();
    let m = idx.model();
    let eps: Vec<String> = port(&m, "reviews-v1")
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(eps, vec!["10.0.1.1:9080", "10.0.1.2:9080"]);
    // One endpoint turns unready: it leaves the model.
    idx.apply(obj(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: reviews-v1-abc, labels: {kubernetes.io/service-name: reviews-v1}}\naddressType: IPv4\nports: [{name: http, port: 9080}]\nendpoints: [{addresses: [10.0.1.1], conditions: {ready: false}}, {addresses: [10.0.1.2]}]\n",
    ))
    .expect("slice");
    let m = idx.model();
    let eps: Vec<String> = port(&m, "reviews-v1")
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(eps, vec!["10.0.1.2:9080"]);
    idx.delete(&ObjKey {
        kind: Kind::EndpointSlice,
        namespace: "default".into(),
        name: "reviews-v1-abc".into(),
    });
    assert!(
        idx.model().services[&SvcKey::new("default", "reviews-v1")].ports[0]
            .endpoints
            .is_empty()
    );
}

#[test]
fn split_resolves_to_weighted_clusters() {
    let mut idx = mesh();
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 90), ("reviews-v2", 10)],
    )))
    .expect("route");
    let m = idx.model();
    let routes = &port(&m, "reviews").routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(
        weights(&routes[0]),
        vec![
            (
                Some("outbound|9080||reviews-v1.default.svc.cluster.local".into()),
                90
            ),
            (
                Some("outbound|9080||reviews-v2.default.svc.cluster.local".into()),
                10
            )
        ]
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    // Backends themselves have no routes of their own.
    assert!(port(&m, "reviews-v1").routes.is_empty());
}

#[test]
fn zero_weight_backends_stay_in_the_route_and_all_zero_fails() {
    let mut idx = mesh();
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 0), ("reviews-v2", 100)],
    )))
    .expect("route");
    let m = idx.model();
    // v1 stays at weight 0, so proxies keep its endpoints for the moment it gets traffic.
    assert_eq!(
        weights(&port(&m, "reviews").routes[0]),
        vec![
            (
                Some("outbound|9080||reviews-v1.default.svc.cluster.local".into()),
                0
            ),
            (
                Some("outbound|9080||reviews-v2.default.svc.cluster.local".into()),
                100
            )
        ]
    );
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 0), ("reviews-v2", 0)],
    )))
    .expect("route");
    let m = idx.model();
    assert_eq!(port(&m, "reviews").routes[0].action, RouteAction::Fail(500));
}

#[test]
fn missing_backend_keeps_its_share_as_errors() {
    let mut idx = mesh();
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 50), ("ghost", 50)],
    )))
    .expect("route");
    let m = idx.model();
    assert_eq!(
        weights(&port(&m, "reviews").routes[0]),
        vec![
            (
                Some("outbound|9080||reviews-v1.default.svc.cluster.local".into()),
                50
            ),
            (None, 50)
        ]
    );
    assert_eq!(m.errors.len(), 1);
    assert_eq!(m.errors[0].field, "spec.rules[0].backendRefs[1]");
    assert!(
        m.errors[0].reason.contains("default/ghost not found"),
        "{:?}",
        m.errors
    );
    // The backend appears: the route heals without being touched.
    idx.apply(obj(&service_yaml(
        "default",
        "ghost",
        "10.96.0.13",
        &[("http", 9080)],
    )))
    .expect("svc");
    let m = idx.model();
    assert!(m.errors.is_empty());
    assert!(
        weights(&port(&m, "reviews").routes[0])
            .iter()
            .all(|(c, _)| c.is_some())
    );
}

#[test]
fn wrong_backend_port_and_missing_parent_are_reported() {
    let mut idx = mesh();
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 1)],
    )
    .replace("port: 9080, weight", "port: 1234, weight")))
        .expect("route");
    idx.apply(obj(&split_yaml(
        "default",
        "orphan",
        "nothing",
        80,
        &[("reviews-v1", 1)],
    )))
    .expect("route");
    let m = idx.model();
    let reasons: Vec<_> = m
        .errors
        .iter()
        .map(|e| (e.object.name.as_str(), e.field.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                "orphan",
                "spec.parentRefs[0]",
                "parent Service default/nothing not found"
            ),
            (
                "r",
                "spec.rules[0].backendRefs[0]",
                "backend Service default/reviews-v1 has no port 1234"
            ),
        ]
    );
    assert_eq!(port(&m, "reviews").routes[0].action, RouteAction::Fail(500));
}

#[test]
fn precedence_across_routes_and_rules() {
    let mut idx = mesh();
    let head = |name: &str, created: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, creationTimestamp: '{created}'}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: reviews}}]\n  rules:\n"
        )
    };
    // Newer route with a long prefix and an older route with an exact match and a header match.
    idx.apply(obj(&format!(
        "{}  - matches: [{{path: {{type: PathPrefix, value: /api/v1}}}}]\n    backendRefs: [{{name: reviews-v1, port: 9080}}]\n  - backendRefs: [{{name: reviews-v1, port: 9080}}]\n",
        head("newer", "2026-01-02T00:00:00Z")
    )))
    .expect("route");
    idx.apply(obj(&format!(
        "{}  - matches: [{{path: {{type: Exact, value: /api}}}}, {{headers: [{{name: x-canary, value: 'yes'}}]}}]\n    backendRefs: [{{name: reviews-v2, port: 9080}}]\n  - backendRefs: [{{name: reviews-v2, port: 9080}}]\n",
        head("older", "2026-01-01T00:00:00Z")
    )))
    .expect("route");
    let m = idx.model();
    let order: Vec<&str> = port(&m, "reviews")
        .routes
        .iter()
        .map(|e| e.source.as_str())
        .collect();
    assert_eq!(
        order,
        vec![
            "HTTPRoute/default/older rule 0", // Exact /api
            "HTTPRoute/default/newer rule 0", // Prefix /api/v1
            "HTTPRoute/default/older rule 0", // Prefix / with a header
            "HTTPRoute/default/older rule 1", // Prefix /, older route wins the tie
            "HTTPRoute/default/newer rule 1",
        ]
    );
}

#[test]
fn consumer_routes_apply_to_their_namespace_only() {
    let mut idx = mesh();
    let route = split_yaml("web", "r", "reviews", 9080, &[("reviews-v2", 1)]).replace(
        "kind: Service, name: reviews,",
        "kind: Service, name: reviews, namespace: default,",
    );
    let mut o = obj(&route);
    // The backend is in the route's namespace; give it one there.
    idx.apply(obj(&service_yaml(
        "web",
        "reviews-v2",
        "10.96.1.12",
        &[("http", 9080)],
    )))
    .expect("svc");
    if let Object::HttpRoute(r) = &mut o {
        r.metadata.namespace = Some("web".into());
    }
    idx.apply(o).expect("route");
    let m = idx.model();
    let p = port(&m, "reviews");
    assert!(p.routes.is_empty());
    let web = &p.consumer_routes["web"];
    assert_eq!(
        weights(&web[0]),
        vec![(
            Some("outbound|9080||reviews-v2.web.svc.cluster.local".into()),
            1
        )]
    );
}

#[test]
fn unchanged_services_keep_their_arc_and_revision_counts_changes() {
    let mut idx = mesh();
    let rx = idx.subscribe();
    let before = idx.model();
    let rev = *rx.borrow();
    // Re-applying an identical object is not a change.
    idx.apply(obj(&service_yaml(
        "default",
        "reviews",
        "10.96.0.10",
        &[("http", 9080)],
    )))
    .expect("svc");
    assert_eq!(*rx.borrow(), rev);
    idx.apply(obj(&slice_yaml(
        "default",
        "reviews-v2",
        "http",
        9080,
        &["10.0.2.9"],
    )))
    .expect("slice");
    assert_eq!(*rx.borrow(), rev + 1);
    let after = idx.model();
    let same = |n: &str| {
        Arc::ptr_eq(
            &before.services[&SvcKey::new("default", n)],
            &after.services[&SvcKey::new("default", n)],
        )
    };
    assert!(same("reviews") && same("reviews-v1"));
    assert!(!same("reviews-v2"));
}

#[test]
fn reset_replaces_a_kind_and_keeps_refused_objects() {
    let mut idx = mesh();
    idx.apply(obj(&split_yaml(
        "default",
        "a",
        "reviews",
        9080,
        &[("reviews-v1", 1)],
    )))
    .expect("route");
    let mut bad = obj(&split_yaml(
        "default",
        "a",
        "reviews",
        9080,
        &[("reviews-v2", 1)],
    ));
    if let Object::HttpRoute(r) = &mut bad
        && let Some(rules) = r.spec.rules.as_mut()
    {
        rules[0].backend_refs.as_mut().expect("refs")[0].weight = Some(-5);
    }
    let errs = idx.reset(Kind::HTTPRoute, vec![bad]);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].1.field, "spec.rules[0].backendRefs[0].weight");
    // The last good version of route "a" stays in force.
    let m = idx.model();
    assert_eq!(
        weights(&port(&m, "reviews").routes[0])[0].0.as_deref(),
        Some("outbound|9080||reviews-v1.default.svc.cluster.local")
    );
    // A relist without it deletes it.
    idx.reset(Kind::HTTPRoute, vec![]);
    assert!(port(&idx.model(), "reviews").routes.is_empty());
}

#[test]
fn services_selecting_a_pod() {
    let mut idx = mesh();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v1-0, labels: {app: reviews-v1}}\nspec: {serviceAccountName: reviews, containers: [{name: app, ports: [{name: http, containerPort: 9080}]}]}\nstatus: {podIP: 10.0.1.1}\n"))
        .expect("pod");
    let m = idx.model();
    let pod = &m.pods[&("default".to_string(), "reviews-v1-0".to_string())];
    assert_eq!(pod.service_account, "reviews");
    assert_eq!(pod.named_ports.get("http"), Some(&9080));
    let names: Vec<_> = m
        .services_selecting(pod)
        .map(|s| s.key.name.clone())
        .collect();
    assert_eq!(names, vec!["reviews-v1"]);
}

#[test]
fn incremental_models_equal_a_fresh_build() {
    // A sequence of edits, with a model built after each; the end result must be what an index
    // given only the final objects builds from scratch.
    let svc = |n: &str, ip: &str| obj(&service_yaml("default", n, ip, &[("http", 9080)]));
    let steps: Vec<Vec<Object>> = vec![
        vec![
            svc("front", "10.96.0.1"),
            obj(&split_yaml(
                "default",
                "r",
                "front",
                9080,
                &[("a", 50), ("b", 50)],
            )),
        ],
        vec![svc("a", "10.96.0.2")],
        vec![obj(&slice_yaml("default", "a", "http", 80, &["10.0.0.1"]))],
        vec![
            svc("b", "10.96.0.3"),
            obj(&slice_yaml("default", "b", "http", 80, &["10.0.0.2"])),
        ],
        vec![obj(&split_yaml(
            "default",
            "r",
            "front",
            9080,
            &[("a", 10), ("b", 90)],
        ))],
        vec![obj(&split_yaml(
            "default",
            "r2",
            "ghost",
            9080,
            &[("a", 1)],
        ))],
    ];
    let deletes = [ObjKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "a".into(),
    }];
    let mut inc = Index::new("cluster.local");
    let mut all: Vec<Object> = Vec::new();
    for step in steps {
        for o in step {
            all.retain(|x| x.key() != o.key());
            all.push(o.clone());
            inc.apply(o).expect("valid");
        }
        inc.model();
    }
    for d in &deletes {
        inc.delete(d);
        all.retain(|x| &x.key() != d);
    }
    let got = inc.model();
    let mut fresh = Index::new("cluster.local");
    for o in all {
        fresh.apply(o).expect("valid");
    }
    let want = fresh.model();
    assert_eq!(got.services, want.services);
    assert_eq!(got.errors, want.errors);
    // Deleting backend "a" turned its share into a reported error.
    assert!(
        got.errors
            .iter()
            .any(|e| e.reason.contains("default/a not found")),
        "{:?}",
        got.errors
    );
    assert!(
        got.errors
            .iter()
            .any(|e| e.reason.contains("default/ghost not found")),
        "{:?}",
        got.errors
    );
}

#[test]
fn a_service_listing_a_port_twice_is_refused() {
    let mut idx = Index::new("cluster.local");
    let doc: serde_json::Value = serde_norway::from_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}",
    )
    .expect("yaml");
    let err = idx
        .apply(crate::objects::parse_doc(doc, "default").expect("parses"))
        .expect_err("duplicate");
    assert_eq!(err.field, "spec.ports[1].port");
}

#[test]
fn a_rule_gets_its_fault_and_fails_while_the_fault_does_not_resolve() {
    let mut idx = mesh();
    let route = |kind: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews, port: 9080}}]
  rules:
  - filters: [{{type: ExtensionRef, extensionRef: {{group: mesh.dev, kind: {kind}, name: flaky}}}}]
    backendRefs: [{{name: reviews-v1, port: 9080}}]
"
        )
    };
    let fault = |status: u16| {
        obj(&format!(
            "apiVersion: mesh.dev/v1alpha1
kind: FaultInjection
metadata: {{name: flaky, namespace: default}}
spec: {{abort: {{httpStatus: {status}, percent: 10}}}}
"
        ))
    };
    idx.apply(obj(&route("FaultInjection"))).expect("route");
    // Not there yet: the rule answers 500, and the route says why.
    let m = idx.model();
    let entry = &port(&m, "reviews").routes[0];
    assert_eq!(
        (&entry.action, &entry.fault),
        (&RouteAction::Fail(500), &None)
    );
    assert_eq!(m.errors.len(), 1, "{:?}", m.errors);
    assert_eq!(m.errors[0].field, "spec.rules[0].filters[0].extensionRef");
    assert!(
        m.errors[0]
            .reason
            .contains("FaultInjection default/flaky not found")
    );
    // It appears, then changes: the route follows without being touched.
    for status in [503, 502] {
        idx.apply(fault(status)).expect("fault");
        let m = idx.model();
        let entry = &port(&m, "reviews").routes[0];
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert!(matches!(entry.action, RouteAction::Forward(_)));
        let abort = entry
            .fault
            .as_ref()
            .and_then(|f| f.abort.clone())
            .expect("an abort");
        assert_eq!(
            (abort.code, abort.per_million),
            (fault::AbortCode::HttpStatus(status), 100_000)
        );
    }
    // A bad version is refused and the last good one stays.
    let err = idx.apply(fault(99)).expect_err("refused");
    assert_eq!(err.field, "spec.abort.httpStatus");
    assert!(port(&idx.model(), "reviews").routes[0].fault.is_some());
    // Deleted: the rule fails again.
    idx.delete(&ObjKey {
        kind: Kind::FaultInjection,
        namespace: "default".into(),
        name: "flaky".into(),
    });
    assert_eq!(
        port(&idx.model(), "reviews").routes[0].action,
        RouteAction::Fail(500)
    );
    // Another kind of extension never resolves.
    idx.apply(obj(&route("Lua"))).expect("route");
    let m = idx.model();
    assert_eq!(port(&m, "reviews").routes[0].action, RouteAction::Fail(500));
    assert_eq!(m.errors[0].condition.reason(), "InvalidKind");
}

/// A route may send to a Service of another namespace only while a ReferenceGrant there lets
/// routes of its kind and namespace refer to it; granting or revoking dirties the route's
/// parent, so the model follows without the route being touched.
#[test]
fn a_backend_in_another_namespace_resolves_only_while_a_grant_allows_it() {
    let mut idx = mesh();
    idx.apply(obj(&service_yaml(
        "payments",
        "ledger",
        "10.96.2.10",
        &[("http", 9080)],
    )))
    .expect("svc");
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 1)],
    )
    .replace(
        "{name: reviews-v1, port: 9080, weight: 1}",
        "{name: reviews-v1, port: 9080, weight: 1}, {name: ledger, namespace: payments, port: 9080, weight: 1}",
    )))
    .expect("route");
    let ledger = Some("outbound|9080||ledger.payments.svc.cluster.local".to_string());
    let refused = |m: &Model| {
        m.errors
            .iter()
            .filter(|e| e.condition == model::RefProblem::RefNotPermitted)
            .map(|e| (e.field.clone(), e.reason.clone()))
            .collect::<Vec<_>>()
    };
    let m = idx.model();
    assert_eq!(weights(&port(&m, "reviews").routes[0])[1], (None, 1));
    assert_eq!(
        refused(&m),
        vec![(
            "spec.rules[0].backendRefs[1]".to_string(),
            "backend payments/ledger is in another namespace, and no ReferenceGrant in payments lets HTTPRoutes of default refer to it".to_string()
        )]
    );
    let grant = |from_kind: &str, from_ns: &str, to: &str| {
        obj(&format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: g, namespace: payments}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: {from_ns}}}]\n  to: [{to}]\n"
        ))
    };
    // Grants that do not fit change nothing: another kind, another namespace, another name,
    // and one in the route's namespace instead of the backend's.
    for g in [
        grant("GRPCRoute", "default", "{group: '', kind: Service}"),
        grant("HTTPRoute", "web", "{group: '', kind: Service}"),
        grant(
            "HTTPRoute",
            "default",
            "{group: '', kind: Service, name: cards}",
        ),
        obj(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: default}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: '', kind: Service}]\n",
        ),
    ] {
        idx.apply(g).expect("grant");
        let m = idx.model();
        assert_eq!(refused(&m).len(), 1, "{:?}", m.errors);
    }
    idx.apply(grant(
        "HTTPRoute",
        "default",
        "{group: '', kind: Service, name: ledger}",
    ))
    .expect("grant");
    let m = idx.model();
    assert!(refused(&m).is_empty(), "{:?}", m.errors);
    assert_eq!(weights(&port(&m, "reviews").routes[0])[1], (ledger, 1));
    // Revoked: the share is a failure again.
    idx.delete(&ObjKey {
        kind: Kind::ReferenceGrant,
        namespace: "payments".into(),
        name: "g".into(),
    });
    let m = idx.model();
    assert_eq!(refused(&m).len(), 1, "{:?}", m.errors);
    assert_eq!(weights(&port(&m, "reviews").routes[0])[1], (None, 1));
}
