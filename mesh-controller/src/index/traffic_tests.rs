use std::time::Duration;

use super::*;
use crate::index::Index;
use crate::objects::Object;
use crate::testing::{obj, service_yaml};

fn policy(name: &str, created: &str, spec: &str) -> Compiled {
    let o = obj(&format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\nspec: {spec}\n"
    ));
    let Object::TrafficPolicy(p) = &o else {
        panic!("a TrafficPolicy");
    };
    compile(p, &o.key())
}

#[test]
fn unreadable_parts_are_named_and_left_out() {
    let cases = [
        (
            "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: ConsistentHash}}",
            "spec.loadBalancer.consistentHash",
        ),
        (
            "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: x, sourceIP: true}}}",
            "spec.loadBalancer.consistentHash",
        ),
        (
            "{targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}], connectionLimits: {maxConnections: 1}}",
            "spec.targetRefs",
        ),
        (
            "{targetRefs: [{kind: Service, name: a}], outlierDetection: {interval: soon}}",
            "spec.outlierDetection.interval",
        ),
        (
            "{targetRefs: [{kind: Service, name: a}], retry: {codes: [200]}}",
            "spec.retry.codes[0]",
        ),
        (
            "{targetRefs: [{group: apps, kind: Deployment, name: a}]}",
            "spec.targetRefs[0].kind",
        ),
        ("{targetRefs: []}", "spec.targetRefs"),
        // A header name mesh-proxy could not parse would make it refuse the cluster.
        (
            "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: 'x(y'}}}",
            "spec.loadBalancer.consistentHash.header",
        ),
    ];
    for (spec, field) in cases {
        let c = policy("p", "2026-01-01T00:00:00Z", spec);
        assert!(
            c.errors.iter().any(|(f, _)| f == field),
            "{spec}: {:?}",
            c.errors
        );
    }
    let ok = policy(
        "p",
        "2026-01-01T00:00:00Z",
        "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: ConsistentHash, consistentHash: {cookie: {name: s, ttl: 1h}}}, retry: {attempts: 3, perTryTimeout: 250ms, on: [reset, 5xx], grpcStatuses: [unavailable]}}",
    );
    assert!(ok.errors.is_empty(), "{:?}", ok.errors);
}

#[test]
fn the_most_specific_then_oldest_policy_sets_each_cluster_field() {
    let all = [
        policy(
            "young-service",
            "2026-03-01T00:00:00Z",
            "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: Random}, connectTimeout: 2s}",
        ),
        policy(
            "old-service",
            "2026-01-01T00:00:00Z",
            "{targetRefs: [{kind: Service, name: a}], loadBalancer: {algorithm: RoundRobin}, connectionLimits: {maxRequests: 10}}",
        ),
        policy(
            "port",
            "2026-06-01T00:00:00Z",
            "{targetRefs: [{kind: Service, name: a, sectionName: grpc}], connectionLimits: {maxRequests: 5}}",
        ),
        policy(
            "other",
            "2025-01-01T00:00:00Z",
            "{targetRefs: [{kind: Service, name: b}], loadBalancer: {algorithm: LeastRequest}}",
        ),
    ];
    let http = cluster_policy(all.iter(), "shop", "a", "http").expect("policies apply");
    assert_eq!(
        http.balancer,
        Balancer::RoundRobin,
        "the older Service policy"
    );
    assert_eq!(http.limits.max_requests, Some(10));
    assert_eq!(http.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(http.from, vec!["shop/old-service", "shop/young-service"]);
    let grpc = cluster_policy(all.iter(), "shop", "a", "grpc").expect("policies apply");
    assert_eq!(grpc.limits.max_requests, Some(5), "the port's own policy");
    assert_eq!(grpc.balancer, Balancer::RoundRobin);
    assert!(cluster_policy(all.iter(), "web", "a", "http").is_none());
}

#[test]
fn retries_come_from_the_rule_the_route_the_port_then_the_service() {
    let route = ObjKey {
        kind: Kind::HTTPRoute,
        namespace: "shop".into(),
        name: "r".into(),
    };
    let p = |name: &str, target: &str, attempts: u32| {
        policy(
            name,
            "2026-01-01T00:00:00Z",
            &format!("{{targetRefs: [{target}], retry: {{attempts: {attempts}}}}}"),
        )
    };
    let mut all = vec![
        p("service", "{kind: Service, name: a}", 1),
        p("port", "{kind: Service, name: a, sectionName: http}", 2),
        p(
            "route",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}",
            3,
        ),
        p(
            "rule",
            "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}",
            4,
        ),
    ];
    let attempts = |all: &[Compiled], rule: Option<&str>, port: &str| {
        route_retry(all.iter(), &route, rule, ("shop", "a"), port).map(|r| r.attempts)
    };
    assert_eq!(attempts(&all, Some("main"), "http"), Some(4));
    assert_eq!(attempts(&all, Some("other"), "http"), Some(3));
    all.retain(|c| c.key.name != "route");
    assert_eq!(attempts(&all, Some("other"), "http"), Some(2));
    assert_eq!(attempts(&all, None, "grpc"), Some(1));
    all.clear();
    assert_eq!(attempts(&all, None, "http"), None);
}

/// Through the index: a policy on a backend Service reaches the routes of its parents (they
/// carry its hash key), a retry on the route reaches its entries, and the route's own retry
/// wins over any policy.
#[test]
fn the_index_applies_policies_to_ports_routes_and_backends() {
    let mut idx = Index::new("cluster.local");
    for y in [
        service_yaml("shop", "front", "10.96.0.10", &[("http", 80)]),
        service_yaml("shop", "cart", "10.96.0.11", &[("http", 80)]),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: front, port: 80}]\n  rules:\n  - name: main\n    backendRefs: [{name: cart, port: 80}]\n".into(),
    ] {
        idx.apply(obj(&y)).expect("valid");
    }
    let before = idx.model();
    let entry = |m: &crate::index::Model| {
        m.services
            .iter()
            .find(|(k, _)| k.name == "front")
            .map(|(_, s)| s.ports[0].routes[0].clone())
            .expect("front's route")
    };
    assert!(entry(&before).retry.is_none());

    idx.apply(obj(
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: sticky, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: cart}]\n  loadBalancer: {algorithm: ConsistentHash, consistentHash: {header: X-User}}\n  connectionLimits: {maxConnections: 3}\n",
    ))
    .expect("valid");
    idx.apply(obj(
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: retry, namespace: shop}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: main}]\n  retry: {attempts: 2, codes: [503]}\n",
    ))
    .expect("valid");
    let m = idx.model();
    let e = entry(&m);
    let retry = e.retry.as_ref().expect("the policy's retry");
    assert_eq!((retry.attempts, retry.codes.clone()), (2, vec![503]));
    assert_eq!(retry.from.as_deref(), Some("TrafficPolicy shop/retry"));
    let crate::index::RouteAction::Forward(backends) = &e.action else {
        panic!("a forward");
    };
    assert_eq!(backends[0].hash, Some(HashKey::Header("x-user".into())));
    let cart = m
        .services
        .iter()
        .find(|(k, _)| k.name == "cart")
        .map(|(_, s)| s.ports[0].traffic.clone())
        .expect("cart");
    assert_eq!(
        cart.expect("cart's cluster policy").limits.max_connections,
        Some(3)
    );
    assert!(m.errors.is_empty(), "{:?}", m.errors);

    // The route's own retry (experimental channel) wins.
    idx.apply(obj(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: front, port: 80}]\n  rules:\n  - name: main\n    backendRefs: [{name: cart, port: 80}]\n    retry: {attempts: 5}\n",
    ))
    .expect("valid");
    let m = idx.model();
    let retry = entry(&m).retry.expect("a retry");
    assert_eq!((retry.attempts, retry.from), (5, None));

    // A policy naming a rule the route lacks is reported, not silently dropped.
    idx.apply(obj(
        "apiVersion: mesh.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: stray, namespace: shop}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r, sectionName: nope}]\n  retry: {attempts: 1}\n",
    ))
    .expect("valid");
    let m = idx.model();
    assert!(
        m.errors.iter().any(|e| e.object.name == "stray"
            && e.field == "spec.targetRefs[0].sectionName"
            && e.reason.contains("no rule named \"nope\"")),
        "{:?}",
        m.errors
    );
}
