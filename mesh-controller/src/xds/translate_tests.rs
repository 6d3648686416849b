use std::time::Duration;

use super::*;
use crate::index::Index;
use crate::testing::{obj, service_yaml, slice_yaml, split_yaml};
use crate::xds::pb::pb_duration;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, LbEndpoint, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::{route, route_action, route_match};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use prost::Message;

fn index() -> Index {
    let mut idx = Index::new("cluster.local");
    for (ns, name, ip, ports) in [
        ("default", "reviews", "10.96.0.10", vec![("http", 9080)]),
        ("default", "reviews-v1", "10.96.0.11", vec![("http", 9080)]),
        ("default", "reviews-v2", "10.96.0.12", vec![("http", 9080)]),
        (
            "default",
            "web",
            "10.96.0.30",
            vec![("http", 80), ("grpc-admin", 9000)],
        ),
        ("shop", "cart", "10.96.1.10", vec![("http", 8080)]),
        ("shop", "db", "10.96.1.11", vec![("tcp-pg", 5432)]),
    ] {
        idx.apply(obj(&service_yaml(ns, name, ip, &ports)))
            .expect("svc");
    }
    idx.apply(obj(&slice_yaml(
        "default",
        "reviews-v1",
        "http",
        9081,
        &["10.0.1.1", "10.0.1.2"],
    )))
    .expect("slice");
    idx
}

fn decode<M: Message + Default>(r: &Resource) -> M {
    M::decode(r.any.value.as_slice()).expect("decodes")
}

fn proxy(ns: &str, transparent: bool) -> ProxyId {
    ProxyId {
        namespace: ns.into(),
        name: "client-0".into(),
        settings: ListenerSettings {
            transparent,
            ..Default::default()
        },
    }
}

/// A transparent proxy that looks its destinations up on demand.
fn scoped(ns: &str) -> ProxyId {
    let mut p = proxy(ns, true);
    p.settings.scoped = true;
    p
}

fn outbound_http(view: &ProxyView) -> RouteConfiguration {
    decode(
        view.get(ResourceType::Route, names::OUTBOUND_HTTP_ROUTE)
            .expect("outbound_http route"),
    )
}

/// The RouteConfiguration of Service reviews' port 9080.
fn reviews_routes(view: &ProxyView) -> RouteConfiguration {
    decode(
        view.get(
            ResourceType::Route,
            "reviews.default.svc.cluster.local:9080",
        )
        .expect("reviews' route configuration"),
    )
}

fn vhost<'a>(rc: &'a RouteConfiguration, name: &str) -> &'a VirtualHost {
    rc.virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vhost {name}"))
}

#[test]
fn host_names_on_the_explicit_listener() {
    let mut idx = index();
    let mut t = Translator::new(idx.model());
    let rc = outbound_http(&t.view(&proxy("default", false)));
    let reviews = vhost(&rc, "reviews.default.svc.cluster.local:9080");
    assert_eq!(
        reviews.domains,
        vec![
            "reviews.default.svc.cluster.local:9080",
            "reviews.default.svc:9080",
            "reviews.default:9080",
            "reviews:9080",
            "reviews.default.svc.cluster.local",
            "reviews.default.svc",
            "reviews.default",
            "reviews",
            "10.96.0.10:9080",
            "10.96.0.10",
        ]
    );
    // Two ports: the bare names belong to port 80 only.
    let web80 = vhost(&rc, "web.default.svc.cluster.local:80");
    assert!(web80.domains.contains(&"web".to_string()));
    let web9000 = vhost(&rc, "web.default.svc.cluster.local:9000");
    assert!(
        !web9000.domains.iter().any(|d| !d.contains(':')),
        "{:?}",
        web9000.domains
    );
    // Short names only for the proxy's own namespace; TCP ports are not on the HTTP listener.
    let cart = vhost(&rc, "cart.shop.svc.cluster.local:8080");
    assert!(
        !cart
            .domains
            .iter()
            .any(|d| d.starts_with("cart:") || d == "cart"),
        "{:?}",
        cart.domains
    );
    assert!(rc.virtual_hosts.iter().all(|v| !v.name.starts_with("db.")));
    let shop = outbound_http(&t.view(&proxy("shop", false)));
    assert!(
        vhost(&shop, "cart.shop.svc.cluster.local:8080")
            .domains
            .contains(&"cart:8080".to_string())
    );
    // No domain appears twice in one RouteConfiguration (Envoy would refuse it).
    let mut all: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
}

#[test]
fn routes_become_envoy_routes_in_order() {
    let mut idx = index();
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    timeouts: {request: 3s}
    backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: ghost, port: 9080, weight: 10}]
  - backendRefs: [{name: reviews-v2, port: 9080}]
"))
        .expect("route");
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", false));
    let rc = reviews_routes(&view);
    let routes = &rc.virtual_hosts[0].routes;
    let paths: Vec<_> = routes
        .iter()
        .map(|r| r.r#match.as_ref().and_then(|m| m.path_specifier.clone()))
        .collect();
    assert_eq!(
        paths,
        vec![
            Some(route_match::PathSpecifier::Path("/api".into())),
            Some(route_match::PathSpecifier::Prefix("/api/".into())),
            Some(route_match::PathSpecifier::Prefix("/".into())),
        ]
    );
    let Some(route::Action::Route(a)) = &routes[0].action else {
        panic!("forward")
    };
    assert_eq!(
        a.timeout,
        Some(PbDuration {
            seconds: 3,
            nanos: 0
        })
    );
    let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
        panic!("weighted")
    };
    let split: Vec<(String, u32)> = w
        .clusters
        .iter()
        .map(|c| (c.name.clone(), c.weight.map(|w| w.value).unwrap_or(0)))
        .collect();
    assert_eq!(
        split,
        vec![
            (
                "outbound|9080||reviews-v1.default.svc.cluster.local".into(),
                90
            ),
            (names::BLACKHOLE_CLUSTER.into(), 10)
        ]
    );
    let Some(route::Action::Route(a)) = &routes[2].action else {
        panic!("forward")
    };
    assert_eq!(
        a.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster(
            "outbound|9080||reviews-v2.default.svc.cluster.local".into()
        ))
    );
    assert_eq!(
        a.timeout,
        Some(PbDuration::default()),
        "no timeout means none, not Envoy's 15 s"
    );
}

#[test]
fn clusters_endpoints_and_api_listeners() {
    let mut idx = index();
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", false));
    let cla: ClusterLoadAssignment = decode(
        view.get(
            ResourceType::Endpoint,
            "outbound|9080||reviews-v1.default.svc.cluster.local",
        )
        .expect("cla"),
    );
    assert_eq!(
        cla.endpoints[0].load_balancing_weight,
        u32v(1),
        "gRPC drops localities without weight"
    );
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    let cluster: Cluster = decode(
        view.get(
            ResourceType::Cluster,
            "outbound|9000||web.default.svc.cluster.local",
        )
        .expect("cluster"),
    );
    assert!(
        cluster
            .typed_extension_protocol_options
            .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
        "grpc port speaks HTTP/2 upstream"
    );
    // API listeners are there by name but not in a wildcard.
    assert!(
        view.get(
            ResourceType::Listener,
            "reviews.default.svc.cluster.local:9080"
        )
        .is_some()
    );
    let wildcard: Vec<&str> = view
        .wildcard(ResourceType::Listener)
        .keys()
        .copied()
        .collect();
    assert_eq!(wildcard, vec![names::OUTBOUND_HTTP_LISTENER]);
    let api: Listener = decode(
        view.get(
            ResourceType::Listener,
            "reviews.default.svc.cluster.local:9080",
        )
        .expect("api"),
    );
    let hcm = HttpConnectionManager::decode(
        api.api_listener
            .and_then(|a| a.api_listener)
            .expect("hcm")
            .value
            .as_slice(),
    )
    .expect("hcm");
    assert_eq!(
        hcm.http_filters.last().map(|f| f.name.as_str()),
        Some("envoy.filters.http.router"),
        "gRPC needs the router filter"
    );
}

#[test]
fn unchanged_services_reuse_their_resources() {
    let mut idx = index();
    let mut t = Translator::new(idx.model());
    let before = t.view(&proxy("default", false));
    idx.apply(obj(&slice_yaml(
        "default",
        "reviews-v1",
        "http",
        9081,
        &["10.0.1.1"],
    )))
    .expect("slice");
    t.update(idx.model());
    let after = t.view(&proxy("default", false));
    let get = |v: &ProxyView, ty, n: &str| v.get(ty, n).expect(n).clone();
    let v2 = "outbound|9080||reviews-v2.default.svc.cluster.local";
    let v1 = "outbound|9080||reviews-v1.default.svc.cluster.local";
    assert!(Arc::ptr_eq(
        &get(&before, ResourceType::Endpoint, v2),
        &get(&after, ResourceType::Endpoint, v2)
    ));
    assert_ne!(
        get(&before, ResourceType::Endpoint, v1).version,
        get(&after, ResourceType::Endpoint, v1).version
    );
    assert_eq!(
        get(&before, ResourceType::Cluster, v1).version,
        get(&after, ResourceType::Cluster, v1).version,
        "same bytes, same version"
    );
}

/// The destination ports of the inbound listener's filter chains in `view`, in order.
fn inbound_ports(view: &ProxyView) -> Vec<u32> {
    let inbound: Listener = decode(
        view.get(ResourceType::Listener, names::INBOUND_LISTENER)
            .expect("inbound"),
    );
    inbound
        .filter_chains
        .iter()
        .filter_map(|c| c.filter_chain_match.as_ref()?.destination_port)
        .map(|p| p.value)
        .collect()
}

#[test]
fn no_service_hands_inbound_traffic_to_the_sidecars_own_ports() {
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: default, labels: {app: web}}\nspec: {containers: [{name: app, ports: [{name: admin, containerPort: 15020}]}]}\nstatus: {podIP: 10.0.9.9}\n")).expect("pod");
    // Straight at the admin port, at the outbound listener, and by a name that resolves to
    // the metrics port: none is served; the app's own port is.
    let svc = service_yaml(
        "default",
        "web",
        "10.96.0.30",
        &[("http", 80), ("tcp-a", 81), ("tcp-b", 82), ("tcp-c", 83)],
    )
    .replace(
        "{name: 'http', port: 80, protocol: TCP}",
        "{name: 'http', port: 80, protocol: TCP, targetPort: 8080}",
    )
    .replace(
        "{name: 'tcp-a', port: 81, protocol: TCP}",
        "{name: 'tcp-a', port: 81, protocol: TCP, targetPort: 15000}",
    )
    .replace(
        "{name: 'tcp-b', port: 82, protocol: TCP}",
        "{name: 'tcp-b', port: 82, protocol: TCP, targetPort: 15001}",
    )
    .replace(
        "{name: 'tcp-c', port: 83, protocol: TCP}",
        "{name: 'tcp-c', port: 83, protocol: TCP, targetPort: admin}",
    );
    assert!(svc.contains("targetPort: admin"), "{svc}");
    idx.apply(obj(&svc)).expect("svc");
    let model = idx.model();
    let said: Vec<String> = model
        .errors
        .iter()
        .map(|e| format!("{} {}: {}", e.object, e.field, e.reason))
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(
        said[0]
            .contains("spec.ports[\"tcp-a\"].targetPort: 15000 is one of the sidecar's own ports"),
        "{said:?}"
    );
    let mut t = Translator::new(model);
    let view = t.view(&proxy("default", true));
    assert_eq!(inbound_ports(&view), vec![8080]);
    for p in mesh_api::consts::ports::SIDECAR {
        assert!(
            view.get(ResourceType::Cluster, &format!("inbound|{p}||"))
                .is_none()
        );
    }
}

#[test]
fn transparent_proxies_get_filter_chains_per_vip_and_inbound_ports() {
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: default, labels: {app: web}}\nspec: {containers: [{name: app, ports: [{name: http, containerPort: 8000}]}]}\nstatus: {podIP: 10.0.9.9}\n")).expect("pod");
    let mut svc = service_yaml(
        "default",
        "web",
        "10.96.0.30",
        &[("http", 80), ("grpc-admin", 9000)],
    );
    svc = svc.replace(
        "{name: 'http', port: 80, protocol: TCP}",
        "{name: 'http', port: 80, protocol: TCP, targetPort: http}",
    );
    idx.apply(obj(&svc)).expect("svc");
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", true));
    let out: Listener = decode(
        view.get(ResourceType::Listener, names::OUTBOUND_LISTENER)
            .expect("outbound"),
    );
    let chain = out
        .filter_chains
        .iter()
        .find(|c| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| m.prefix_ranges[0].address_prefix == "10.96.1.11")
        })
        .expect("db chain");
    assert_eq!(
        chain.filters[0].name, "envoy.filters.network.tcp_proxy",
        "declared TCP"
    );
    assert_eq!(
        chain
            .filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port),
        u32v(5432)
    );
    assert!(
        out.default_filter_chain.is_some(),
        "unknown destinations pass through"
    );
    assert_eq!(
        inbound_ports(&view),
        vec![8000, 9000],
        "named targetPort resolved through the pod's container ports"
    );
    assert!(view.get(ResourceType::Cluster, "inbound|8000||").is_some());
    // A split routes the same way through the transparent listener's route config.
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v2", 1)],
    )))
    .expect("route");
    t.update(idx.model());
    let view = t.view(&proxy("default", true));
    let rc = reviews_routes(&view);
    assert_eq!(rc.virtual_hosts[0].routes.len(), 1);
}

#[test]
fn consumer_routes_get_their_own_route_config() {
    let mut idx = index();
    idx.apply(obj(&service_yaml(
        "shop",
        "reviews-canary",
        "10.96.1.50",
        &[("http", 9080)],
    )))
    .expect("svc");
    let route = split_yaml("shop", "r", "reviews", 9080, &[("reviews-canary", 1)]).replace(
        "name: reviews, port",
        "name: reviews, namespace: default, port",
    );
    idx.apply(obj(&route)).expect("route");
    let mut t = Translator::new(idx.model());
    let shop = outbound_http(&t.view(&proxy("shop", false)));
    let default = outbound_http(&t.view(&proxy("default", false)));
    let first_cluster =
        |rc: &RouteConfiguration| match &vhost(rc, "reviews.default.svc.cluster.local:9080").routes
            [0]
        .action
        {
            Some(route::Action::Route(a)) => a.cluster_specifier.clone(),
            other => panic!("{other:?}"),
        };
    assert_eq!(
        first_cluster(&shop),
        Some(route_action::ClusterSpecifier::Cluster(
            "outbound|9080||reviews-canary.shop.svc.cluster.local".into()
        ))
    );
    assert_eq!(
        first_cluster(&default),
        Some(route_action::ClusterSpecifier::Cluster(
            "outbound|9080||reviews.default.svc.cluster.local".into()
        ))
    );
    assert!(
        t.view(&proxy("shop", true))
            .get(
                ResourceType::Route,
                "reviews.default.svc.cluster.local:9080@shop"
            )
            .is_some()
    );
}

#[test]
fn a_shared_vip_belongs_to_the_first_service_only() {
    let mut idx = index();
    // A hand-written manifest reusing reviews' VIP (Kubernetes would not allow it).
    idx.apply(obj(&service_yaml(
        "default",
        "zz-copy",
        "10.96.0.10",
        &[("http", 9080)],
    )))
    .expect("svc");
    let mut t = Translator::new(idx.model());
    let rc = outbound_http(&t.view(&proxy("default", false)));
    assert!(
        vhost(&rc, "reviews.default.svc.cluster.local:9080")
            .domains
            .contains(&"10.96.0.10:9080".to_string())
    );
    assert!(
        !vhost(&rc, "zz-copy.default.svc.cluster.local:9080")
            .domains
            .iter()
            .any(|d| d.starts_with("10.96.0.10"))
    );
    let view = t.view(&proxy("default", true));
    let out: Listener = decode(
        view.get(ResourceType::Listener, names::OUTBOUND_LISTENER)
            .expect("outbound"),
    );
    let on_vip = out
        .filter_chains
        .iter()
        .filter(|c| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| m.prefix_ranges[0].address_prefix == "10.96.0.10")
        })
        .count();
    assert_eq!(
        on_vip, 1,
        "one chain for the VIP, so Envoy sees no duplicate match"
    );
    // Transparent proxies route by destination address and get no Host-routed listener.
    assert!(
        view.get(ResourceType::Listener, names::OUTBOUND_HTTP_LISTENER)
            .is_none()
    );
    assert!(
        view.get(ResourceType::Route, names::OUTBOUND_HTTP_ROUTE)
            .is_none()
    );
}

/// The filter chains of a transparent view's outbound listener that match `ip`/32 (or /128)
/// and `port`.
fn outbound_chains(view: &ProxyView, ip: &str, port: u32) -> Vec<FilterChain> {
    let out: Listener = decode(
        view.get(ResourceType::Listener, names::OUTBOUND_LISTENER)
            .expect("outbound"),
    );
    out.filter_chains
        .into_iter()
        .filter(|c| {
            c.filter_chain_match.as_ref().is_some_and(|m| {
                m.prefix_ranges.first().is_some_and(|r| {
                    r.address_prefix == ip
                        && matches!(r.prefix_len, Some(UInt32Value { value: 32 | 128 }))
                }) && m.destination_port == u32v(port)
            })
        })
        .collect()
}

/// Every resource a view serves, by type and name, with its version.
fn everything(view: &ProxyView) -> BTreeMap<(ResourceType, String), String> {
    let mut out = BTreeMap::new();
    for ty in ResourceType::ALL {
        for (name, r) in view.wildcard(ty) {
            out.insert((ty, name.to_string()), r.version.clone());
        }
        for r in view.named_only.iter().flat_map(|l| l.iter(ty)) {
            out.insert((ty, format!("named {}", r.name)), r.version.clone());
        }
    }
    out
}

#[test]
fn incremental_translation_equals_a_fresh_one() {
    let mut idx = index();
    let mut t = Translator::new(idx.model());
    let proxies = [
        proxy("default", false),
        proxy("default", true),
        proxy("shop", true),
        scoped("shop"),
    ];
    for p in &proxies {
        t.view(p);
    }
    // VIP moves, a Service goes, a route arrives, endpoints change.
    idx.apply(obj(&service_yaml(
        "default",
        "aa-first",
        "10.96.0.10",
        &[("http", 9080)],
    )))
    .expect("svc");
    idx.delete(&crate::objects::ObjKey {
        kind: crate::objects::Kind::Service,
        namespace: "shop".into(),
        name: "db".into(),
    });
    idx.apply(obj(&split_yaml(
        "default",
        "r",
        "reviews",
        9080,
        &[("reviews-v1", 3), ("reviews-v2", 1)],
    )))
    .expect("route");
    idx.apply(obj(&slice_yaml(
        "default",
        "reviews-v2",
        "http",
        9082,
        &["10.0.2.2"],
    )))
    .expect("slice");
    let model = idx.model();
    t.update(model.clone());
    let changes = t.view(&proxies[0]).changes.clone();
    let mut fresh = Translator::new(model);
    for p in &proxies {
        assert_eq!(everything(&t.view(p)), everything(&fresh.view(p)), "{p:?}");
    }
    // Only what changed is reported: reviews-v1's cluster bytes did not change.
    let clusters: Vec<String> = changes
        .by_type
        .get(&ResourceType::Cluster)
        .into_iter()
        .flatten()
        .map(|n| n.to_string())
        .collect();
    assert!(
        !clusters.contains(&"outbound|9080||reviews-v1.default.svc.cluster.local".to_string()),
        "{clusters:?}"
    );
    assert!(
        clusters.contains(&"outbound|5432||db.shop.svc.cluster.local".to_string()),
        "removal reported: {clusters:?}"
    );
}

#[test]
fn peers_running_mesh_proxy_are_marked_and_inbound_protocols_pinned() {
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web, mesh.dev/proxy: 'true'}}\nspec: {containers: [{name: app}]}\nstatus: {podIP: 10.0.3.1}\n")).expect("pod");
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: default, labels: {app: web}}\nspec: {containers: [{name: app}]}\nstatus: {podIP: 10.0.3.2}\n")).expect("pod");
    for (port_name, port) in [("http", 80), ("grpc-admin", 9000)] {
        idx.apply(obj(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-{port}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: '{port_name}', port: {port}, protocol: TCP}}]\nendpoints:\n- {{addresses: ['10.0.3.1'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: web-0, namespace: default}}}}\n- {{addresses: ['10.0.3.2'], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: web-1, namespace: default}}}}\n"
        )))
        .expect("slice");
    }
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", true));
    // (HTTP/2 to its proxy, its mesh identity) per endpoint.
    let marked = |cluster: &str| -> Vec<(bool, Option<String>)> {
        use envoy_types::pb::google::protobuf::value::Kind;
        let cla: ClusterLoadAssignment =
            decode(view.get(ResourceType::Endpoint, cluster).expect("cla"));
        cla.endpoints[0]
            .lb_endpoints
            .iter()
            .map(|e| {
                let f = e
                    .metadata
                    .as_ref()
                    .and_then(|m| m.filter_metadata.get("mesh.dev"))
                    .map(|s| s.fields.clone())
                    .unwrap_or_default();
                let proxy = matches!(
                    f.get("proxy").and_then(|v| v.kind.clone()),
                    Some(Kind::BoolValue(true))
                );
                let id = match f.get("identity").and_then(|v| v.kind.clone()) {
                    Some(Kind::StringValue(s)) => Some(s),
                    _ => None,
                };
                (proxy, id)
            })
            .collect()
    };
    // Only the pod running mesh-proxy has an identity (its service account, `default` when
    // unset); HTTP/2 to it only on the declared HTTP/1 port.
    let web0 = Some("spiffe://cluster.local/ns/default/sa/default".to_string());
    assert_eq!(
        marked("outbound|80||web.default.svc.cluster.local"),
        [(true, web0.clone()), (false, None)]
    );
    assert_eq!(
        marked("outbound|9000||web.default.svc.cluster.local"),
        [(false, web0), (false, None)]
    );

    // The web pod's own proxy pins what its app speaks on each port.
    let view = t.view(&ProxyId {
        name: "web-0".into(),
        ..proxy("default", true)
    });
    let protocol = |cluster: &str| -> Option<String> {
        let c: Cluster = decode(view.get(ResourceType::Cluster, cluster).expect("cluster"));
        c.typed_extension_protocol_options
            .values()
            .next()
            .map(|a| format!("{:?}", HttpProtocolOptions::decode(a.value.as_slice())))
    };
    assert!(protocol("inbound|80||").is_some_and(|p| p.contains("HttpProtocolOptions(")));
    assert!(protocol("inbound|9000||").is_some_and(|p| p.contains("Http2ProtocolOptions(")));
}

#[test]
fn inbound_chains_follow_the_mtls_mode_of_the_namespace() {
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Namespace\nmetadata: {name: secure, labels: {mesh.dev/mtls-mode: STRICT}}\n")).expect("ns");
    idx.apply(obj("apiVersion: v1\nkind: Namespace\nmetadata: {name: odd, labels: {mesh.dev/mtls-mode: sometimes}}\n")).expect("ns");
    for ns in ["default", "secure"] {
        idx.apply(obj(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\nspec: {{clusterIP: 10.96.9.{}, selector: {{app: web}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n", if ns == "default" { 1 } else { 2 }))).expect("svc");
        idx.apply(obj(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: {ns}, labels: {{app: web}}}}\nspec: {{containers: [{{name: app}}]}}\nstatus: {{podIP: 10.0.4.{}}}\n", if ns == "default" { 1 } else { 2 }))).expect("pod");
    }
    let model = idx.model();
    assert!(
        model
            .errors
            .iter()
            .any(|e| e.object.name == "odd" && e.reason.contains("\"sometimes\"")),
        "{:?}",
        model.errors
    );
    let mut t = Translator::new(model);
    let mut inbound = |ns: &str, mtls: bool| -> Listener {
        let view = t.view(&ProxyId {
            namespace: ns.into(),
            name: "web-0".into(),
            settings: ListenerSettings {
                transparent: true,
                mtls,
                ..Default::default()
            },
        });
        decode(
            view.get(ResourceType::Listener, names::INBOUND_LISTENER)
                .expect("inbound"),
        )
    };
    let shape = |l: &Listener| -> Vec<(String, String, bool)> {
        l.filter_chains
            .iter()
            .map(|c| {
                let m = c.filter_chain_match.clone().unwrap_or_default();
                (
                    c.name.clone(),
                    m.transport_protocol,
                    c.transport_socket.is_some(),
                )
            })
            .collect()
    };
    // PERMISSIVE (the mesh default): mesh TLS and plaintext, and the passthrough.
    let l = inbound("default", true);
    assert_eq!(
        shape(&l),
        [
            (
                "inbound|8080/http/mtls".to_string(),
                "tls".to_string(),
                true
            ),
            (
                "inbound|8080/http".to_string(),
                "raw_buffer".to_string(),
                false
            ),
        ]
    );
    assert!(l.default_filter_chain.is_some());
    // STRICT: mesh TLS only, nothing for plaintext.
    let l = inbound("secure", true);
    assert_eq!(
        shape(&l),
        [(
            "inbound|8080/http/mtls".to_string(),
            "tls".to_string(),
            true
        )]
    );
    assert!(l.default_filter_chain.is_none());
    // A proxy without identity cannot terminate mesh TLS: plaintext only, as before.
    let l = inbound("secure", false);
    assert_eq!(
        shape(&l),
        [("inbound|8080/http".to_string(), String::new(), false)]
    );
    assert!(l.default_filter_chain.is_some());
}

#[test]
fn a_node_must_match_its_client_certificate() {
    use crate::xds::server::check_node;
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default}\nspec: {serviceAccountName: web, containers: [{name: app}]}\nstatus: {podIP: 10.0.5.1}\n")).expect("pod");
    let model = idx.model();
    let id = |s: &str| mesh_api::SpiffeId::parse(s).expect("id");
    let node = |ns: &str, name: &str| ProxyId {
        name: name.into(),
        ..proxy(ns, true)
    };
    let web = id("spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(check_node(&node("default", "web-0"), &web, &model), Ok(()));
    // A pod not (yet) known: the namespace is what can be checked.
    assert_eq!(check_node(&node("default", "web-9"), &web, &model), Ok(()));
    let err = check_node(&node("kube-system", "coredns-0"), &web, &model).expect_err("namespace");
    assert!(err.contains("namespace \"kube-system\""), "{err}");
    let other = id("spiffe://cluster.local/ns/default/sa/other");
    let err = check_node(&node("default", "web-0"), &other, &model).expect_err("account");
    assert!(err.contains("service account \"web\""), "{err}");
    let not_workload = id("spiffe://cluster.local/something/else");
    assert!(check_node(&node("default", "web-0"), &not_workload, &model).is_err());
}

/// Endpoint identity and metadata come from Pods: whether a Pod arrives before or after the
/// EndpointSlice naming it (a relist, a label change), the Service's xDS ends the same.
#[test]
fn a_pod_after_its_slice_gives_the_same_xds_as_before_it() {
    let pod = |sa: &str, proxied: bool| {
        obj(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: default, labels: {{app: web, mesh.dev/proxy: '{proxied}'}}}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: app}}]}}\nstatus: {{podIP: 10.0.3.1}}\n"
        ))
    };
    let slice = obj(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-80, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n- {addresses: ['10.0.3.1'], conditions: {ready: true}, targetRef: {kind: Pod, name: web-0, namespace: default}}\n",
    );
    let client = proxy("default", true);
    // Slice first, translated, then the Pod.
    let mut late = index();
    late.apply(slice.clone()).expect("slice");
    let mut t = Translator::new(late.model());
    t.view(&client);
    late.apply(pod("web", true)).expect("pod");
    t.update(late.model());
    // Pod first.
    let mut early = index();
    early.apply(pod("web", true)).expect("pod");
    early.apply(slice).expect("slice");
    let mut fresh = Translator::new(early.model());
    assert_eq!(
        everything(&t.view(&client)),
        everything(&fresh.view(&client))
    );
    let identity = |t: &mut Translator| {
        let cla: ClusterLoadAssignment = decode(
            t.view(&client)
                .get(
                    ResourceType::Endpoint,
                    "outbound|80||web.default.svc.cluster.local",
                )
                .expect("cla"),
        );
        format!("{:?}", cla.endpoints[0].lb_endpoints[0].metadata)
    };
    assert!(identity(&mut t).contains("spiffe://cluster.local/ns/default/sa/web"));
    // A Pod change alone (its service account) reaches the endpoint too.
    late.apply(pod("web-v2", true)).expect("pod");
    t.update(late.model());
    assert!(identity(&mut t).contains("spiffe://cluster.local/ns/default/sa/web-v2"));
    // And so does its removal.
    late.delete(&crate::objects::ObjKey {
        kind: crate::objects::Kind::Pod,
        namespace: "default".into(),
        name: "web-0".into(),
    });
    t.update(late.model());
    assert!(!identity(&mut t).contains("spiffe://"));
}

/// The same objects give the same resource versions, build after build: maps (RBAC policies,
/// endpoint metadata) encode in one order whatever order their hash seeds iterate them in.
#[test]
fn the_same_model_gives_the_same_versions() {
    let build = || {
        let mut idx = index();
        idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web, mesh.dev/proxy: 'true'}}\nspec: {serviceAccountName: web, containers: [{name: app, ports: [{name: http, containerPort: 80}]}]}\nstatus: {podIP: 10.0.3.1}\n")).expect("pod");
        idx.apply(obj("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-80, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n- {addresses: ['10.0.3.1'], conditions: {ready: true}, targetRef: {kind: Pod, name: web-0, namespace: default}}\n")).expect("slice");
        idx.apply(obj("apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web, namespace: default}\nspec: {targetRefs: [{kind: Service, name: web}], rules: [{from: [{namespaces: [a]}]}, {from: [{namespaces: [b]}]}, {from: [{namespaces: [c]}]}]}\n")).expect("authz");
        let mut t = Translator::new(idx.model());
        let server = ProxyId {
            name: "web-0".into(),
            ..proxy("default", true)
        };
        let mut all = everything(&t.view(&server));
        all.extend(everything(&t.view(&proxy("default", true))));
        all
    };
    let first = build();
    assert!(first.contains_key(&(ResourceType::Listener, "virtualInbound".to_string())));
    for i in 0..8 {
        assert_eq!(build(), first, "build {i}");
    }
}

/// Terminating endpoints that still serve come after the ready ones (priority 1), so no new
/// request goes to them while a ready one is there; once none is ready, they are all there is.
/// Endpoints that no longer serve are gone.
#[test]
fn terminating_endpoints_are_a_lower_priority_until_none_is_ready() {
    let slice_named = |name: &str, eps: &[(&str, &str)]| {
        let eps: Vec<String> = eps
            .iter()
            .map(|(ip, c)| format!("- {{addresses: ['{ip}'], conditions: {c}}}"))
            .collect();
        obj(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints:\n{}\n",
            eps.join("\n")
        ))
    };
    let slice = |eps: &[(&str, &str)]| slice_named("web-80", eps);
    let priorities = |idx: &mut Index| -> Vec<(u32, Vec<String>)> {
        let mut t = Translator::new(idx.model());
        let cla: ClusterLoadAssignment = decode(
            t.view(&proxy("default", true))
                .get(
                    ResourceType::Endpoint,
                    "outbound|80||web.default.svc.cluster.local",
                )
                .expect("cla"),
        );
        cla.endpoints
            .iter()
            .map(|l| {
                let addrs = l
                    .lb_endpoints
                    .iter()
                    .filter_map(|e| match &e.host_identifier {
                        Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => {
                            match ep.address.as_ref()?.address.as_ref()? {
                                address::Address::SocketAddress(sa) => Some(sa.address.clone()),
                                _ => None,
                            }
                        }
                        _ => None,
                    })
                    .collect();
                (l.priority, addrs)
            })
            .collect()
    };
    let mut idx = index();
    idx.apply(slice(&[
        (
            "10.0.3.1",
            "{ready: true, serving: true, terminating: false}",
        ),
        (
            "10.0.3.2",
            "{ready: false, serving: true, terminating: true}",
        ),
        (
            "10.0.3.3",
            "{ready: false, serving: false, terminating: true}",
        ),
        ("10.0.3.4", "{ready: false}"),
        ("10.0.3.5", "{}"),
    ]))
    .expect("slice");
    assert_eq!(
        priorities(&mut idx),
        [
            (0, vec!["10.0.3.1".to_string(), "10.0.3.5".to_string()]),
            (1, vec!["10.0.3.2".to_string()])
        ]
    );
    idx.apply(slice(&[
        (
            "10.0.3.2",
            "{ready: false, serving: true, terminating: true}",
        ),
        (
            "10.0.3.3",
            "{ready: false, serving: false, terminating: true}",
        ),
    ]))
    .expect("slice");
    assert_eq!(priorities(&mut idx), [(0, vec!["10.0.3.2".to_string()])]);
    // Slices overlap while they change: an address ready in one and terminating in another is
    // listed once, as ready.
    idx.apply(slice_named(
        "web-80-b",
        &[(
            "10.0.3.2",
            "{ready: true, serving: true, terminating: false}",
        )],
    ))
    .expect("slice");
    assert_eq!(priorities(&mut idx), [(0, vec!["10.0.3.2".to_string()])]);
}

#[test]
fn headless_endpoints_get_their_own_chains_clusters_and_identity() {
    let mut idx = index();
    for (i, ip) in ["10.0.5.1", "10.0.5.2"].iter().enumerate() {
        idx.apply(obj(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: db-{i}, namespace: shop, labels: {{app: db, mesh.dev/proxy: 'true'}}}}\nspec: {{serviceAccountName: db, hostname: db-{i}, subdomain: db, containers: [{{name: app}}]}}\nstatus: {{podIP: {ip}}}\n"))).expect("pod");
    }
    // Two headless Services over the same pods: `db` owns their addresses, `zz-db` only once
    // `db` is gone.
    for name in ["db", "zz-db"] {
        idx.apply(obj(&service_yaml("shop", name, "None", &[("http", 8080)])
            .replace("{app: zz-db}", "{app: db}")))
            .expect("svc");
        idx.apply(obj(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, namespace: shop, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- {{addresses: ['10.0.5.1'], hostname: db-0, conditions: {{ready: true}}, targetRef: {{kind: Pod, name: db-0, namespace: shop}}}}\n- {{addresses: ['10.0.5.2'], hostname: db-1, conditions: {{ready: true}}, targetRef: {{kind: Pod, name: db-1, namespace: shop}}}}\n"
        )))
        .expect("slice");
    }
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", true));
    let chains_to = |view: &ProxyView, ip: &str| -> Vec<String> {
        outbound_chains(view, ip, 8080)
            .iter()
            .map(|c| {
                let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
                    panic!("{c:?}")
                };
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
                match hcm.route_specifier {
                    Some(http_connection_manager::RouteSpecifier::Rds(r)) => r.route_config_name,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    };
    let db0 = "outbound|8080|db-0|db.shop.svc.cluster.local";
    assert_eq!(
        chains_to(&view, "10.0.5.1"),
        [db0],
        "one chain, of the owner"
    );
    assert_eq!(
        chains_to(&view, "10.0.5.2"),
        ["outbound|8080|db-1|db.shop.svc.cluster.local"]
    );
    // Its route goes to a cluster of that endpoint alone, with its pod's identity.
    let rc: RouteConfiguration = decode(view.get(ResourceType::Route, db0).expect("route"));
    assert!(
        format!("{rc:?}").contains(&format!("Cluster({db0:?})")),
        "{rc:?}"
    );
    // No default retry of failed connections: there is no other endpoint to go to.
    match &rc.virtual_hosts[0].routes[0].action {
        Some(route::Action::Route(a)) => assert_eq!(a.retry_policy, None),
        other => panic!("{other:?}"),
    }
    assert!(view.get(ResourceType::Cluster, db0).is_some());
    let cla: ClusterLoadAssignment = decode(view.get(ResourceType::Endpoint, db0).expect("cla"));
    let eps: Vec<&LbEndpoint> = cla.endpoints.iter().flat_map(|l| &l.lb_endpoints).collect();
    assert_eq!(eps.len(), 1);
    let meta = format!("{:?}", eps[0].metadata);
    assert!(
        meta.contains("spiffe://cluster.local/ns/shop/sa/db"),
        "{meta}"
    );
    assert!(format!("{:?}", eps[0].host_identifier).contains("10.0.5.1"));
    assert!(
        view.get(
            ResourceType::Cluster,
            "outbound|8080|db-0|zz-db.shop.svc.cluster.local"
        )
        .is_none(),
        "no cluster for an address another Service owns"
    );

    // `db` stops listing db-1: `zz-db` takes that address over, as a fresh translation would.
    idx.apply(obj("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: db-x, namespace: shop, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- {addresses: ['10.0.5.1'], hostname: db-0, conditions: {ready: true}, targetRef: {kind: Pod, name: db-0, namespace: shop}}\n")).expect("slice");
    t.update(idx.model());
    let view = t.view(&proxy("default", true));
    assert_eq!(chains_to(&view, "10.0.5.1"), [db0]);
    assert_eq!(
        chains_to(&view, "10.0.5.2"),
        ["outbound|8080|db-1|zz-db.shop.svc.cluster.local"]
    );
    let fresh = Translator::new(idx.model()).view(&proxy("default", true));
    assert_eq!(everything(&view), everything(&fresh));

    // `db` goes: `zz-db` takes its addresses over, as a fresh translation would have it.
    idx.delete(&obj(&service_yaml("shop", "db", "None", &[("http", 8080)])).key());
    t.update(idx.model());
    let view = t.view(&proxy("default", true));
    assert_eq!(
        chains_to(&view, "10.0.5.1"),
        ["outbound|8080|db-0|zz-db.shop.svc.cluster.local"]
    );
    assert!(view.get(ResourceType::Cluster, db0).is_none());
    let fresh = Translator::new(idx.model()).view(&proxy("default", true));
    assert_eq!(everything(&view), everything(&fresh));
}

#[test]
fn a_vip_outranks_an_endpoint_listing_its_address() {
    let mut idx = index();
    // A selectorless headless Service whose slice lists reviews' VIP and port (an alias).
    idx.apply(obj(
        "apiVersion: v1\nkind: Service\nmetadata: {name: aa-alias, namespace: default}\nspec: {clusterIP: None, ports: [{name: http, port: 9080}]}\n",
    ))
    .expect("svc");
    idx.apply(obj(&slice_yaml(
        "default",
        "aa-alias",
        "http",
        9080,
        &["10.96.0.10"],
    )))
    .expect("slice");
    let mut t = Translator::new(idx.model());
    let on_vip = |t: &mut Translator| -> Vec<String> {
        outbound_chains(&t.view(&proxy("default", true)), "10.96.0.10", 9080)
            .into_iter()
            .map(|c| c.name)
            .collect()
    };
    assert_eq!(
        on_vip(&mut t),
        ["reviews.default.svc.cluster.local:9080/http"],
        "one chain, the VIP's, though the alias comes first by name"
    );
    // Without reviews, the alias's endpoint gets it.
    idx.delete(
        &obj(&service_yaml(
            "default",
            "reviews",
            "10.96.0.10",
            &[("http", 9080)],
        ))
        .key(),
    );
    t.update(idx.model());
    assert_eq!(
        on_vip(&mut t),
        ["outbound|9080|10.96.0.10|aa-alias.default.svc.cluster.local/http"]
    );
    let fresh = Translator::new(idx.model()).view(&proxy("default", true));
    assert_eq!(
        everything(&t.view(&proxy("default", true))),
        everything(&fresh)
    );
}

#[test]
fn outbound_routes_retry_failed_connections_by_default_and_connect_within_a_second() {
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web}}\nspec: {containers: [{name: app, ports: [{name: http, containerPort: 8000}]}]}\nstatus: {podIP: 10.0.9.9}\n")).expect("pod");
    let mut t = Translator::new(idx.model());
    let view = t.view(&ProxyId {
        name: "web-0".into(),
        ..proxy("default", true)
    });
    let retry_of = |name: &str| -> Option<envoy_types::pb::envoy::config::route::v3::RetryPolicy> {
        let rc: RouteConfiguration = decode(view.get(ResourceType::Route, name).expect(name));
        match &rc.virtual_hosts[0].routes[0].action {
            Some(route::Action::Route(a)) => a.retry_policy.clone(),
            other => panic!("{other:?}"),
        }
    };
    let default = retry_of("reviews.default.svc.cluster.local:9080").expect("a default retry");
    assert_eq!(default.retry_on, "connect-failure,refused-stream");
    assert_eq!(default.num_retries, u32v(2));
    assert_eq!(
        default.retry_host_predicate[0].name,
        super::super::traffic::PREVIOUS_HOSTS
    );
    // The pod's own inbound route has only its app to go to.
    let inbound = view
        .wildcard(ResourceType::Route)
        .into_iter()
        .find(|(name, _)| name.starts_with("inbound|"))
        .map(|(name, _)| name.to_string())
        .expect("an inbound route");
    assert_eq!(retry_of(&inbound), None);
    let c: Cluster = decode(
        view.get(
            ResourceType::Cluster,
            "outbound|9080||reviews.default.svc.cluster.local",
        )
        .expect("cluster"),
    );
    assert_eq!(c.connect_timeout, Some(pb_duration(Duration::from_secs(1))));
}

#[test]
fn a_scoped_proxy_holds_the_fixed_set_and_gets_each_address_by_name() {
    let mut idx = index();
    let route = split_yaml("shop", "r", "reviews", 9080, &[("reviews-v1", 1)]).replace(
        "name: reviews, port",
        "name: reviews, namespace: default, port",
    );
    idx.apply(obj(&route)).expect("a consumer route");
    let mut t = Translator::new(idx.model());
    let view = t.view(&scoped("default"));
    let names = |ty| -> Vec<String> { view.wildcard(ty).keys().map(|n| n.to_string()).collect() };
    assert_eq!(
        names(ResourceType::Listener),
        [names::INBOUND_LISTENER, names::OUTBOUND_LISTENER],
        "no per-address listener comes with the wildcard"
    );
    assert_eq!(
        names(ResourceType::Cluster),
        [names::BLACKHOLE_CLUSTER, names::PASSTHROUGH_CLUSTER]
    );
    let outbound: Listener = decode(
        view.get(ResourceType::Listener, names::OUTBOUND_LISTENER)
            .expect("outbound"),
    );
    assert!(outbound.filter_chains.is_empty(), "{outbound:?}");
    // By name: the chains of one address, as a full proxy's outbound listener has them.
    let by_address: Listener = decode(
        view.get(ResourceType::Listener, "10.96.0.10_9080")
            .expect("reviews' address"),
    );
    assert_eq!(by_address.bind_to_port, Some(BoolValue { value: false }));
    let full = t.view(&proxy("default", true));
    assert_eq!(
        by_address.filter_chains,
        outbound_chains(&full, "10.96.0.10", 9080)
    );
    assert!(!by_address.filter_chains.is_empty());
    for (ty, name) in [
        (
            ResourceType::Cluster,
            "outbound|9080||reviews.default.svc.cluster.local",
        ),
        (
            ResourceType::Endpoint,
            "outbound|9080||reviews-v1.default.svc.cluster.local",
        ),
        (
            ResourceType::Route,
            "reviews.default.svc.cluster.local:9080",
        ),
    ] {
        assert!(view.get(ty, name).is_some(), "{name} by name");
        assert!(
            view.get_wildcard(ty, name).is_none(),
            "{name} not in the wildcard"
        );
    }
    assert!(
        view.get(ResourceType::Listener, "10.96.9.9_80").is_none(),
        "nothing at an address outside the mesh"
    );
    // A namespace with its own routes for reviews gets its own chains at that address.
    let shop = t.view(&scoped("shop"));
    assert!(
        shop.wildcard(ResourceType::Listener)
            .keys()
            .all(|n| names::parse_address_listener(n).is_none()),
        "its own address listeners are served by name too"
    );
    let chain: Listener = decode(
        shop.get(ResourceType::Listener, "10.96.0.10_9080")
            .expect("reviews' address, from shop"),
    );
    assert_eq!(
        chain.filter_chains,
        outbound_chains(&t.view(&proxy("shop", true)), "10.96.0.10", 9080)
    );
    let hcm_route = |c: &FilterChain| -> String {
        let hcm: HttpConnectionManager = match &c.filters[0].config_type {
            Some(filter::ConfigType::TypedConfig(a)) => {
                HttpConnectionManager::decode(a.value.as_slice()).expect("hcm")
            }
            other => panic!("{other:?}"),
        };
        match hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(r)) => r.route_config_name,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        hcm_route(&chain.filter_chains[0]),
        "reviews.default.svc.cluster.local:9080@shop"
    );
    assert_eq!(
        hcm_route(&by_address.filter_chains[0]),
        "reviews.default.svc.cluster.local:9080"
    );
}

#[test]
fn a_scoped_proxy_is_given_its_dependencies_and_learned_addresses_up_front() {
    let mut idx = index();
    idx.apply(obj(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client-0, namespace: default, annotations: {mesh.dev/dependencies: 'reviews, shop/db Not_A_Name'}}\nspec: {containers: [{name: app, image: x}]}\n",
    ))
    .expect("pod");
    idx.apply(obj(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {mesh.dev/dependencies: 'default/web, ./x'}}\n",
    ))
    .expect("ns");
    let model = idx.model();
    let reasons: Vec<(String, String, String)> = model
        .errors
        .iter()
        .map(|e| (e.object.to_string(), e.field.clone(), e.reason.clone()))
        .collect();
    let field = "metadata.annotations[\"mesh.dev/dependencies\"]".to_string();
    for (object, entry) in [
        ("Namespace/shop", "./x"),
        ("Pod/default/client-0", "Not_A_Name"),
    ] {
        assert!(
            reasons.iter().any(|(o, f, r)| o == object
                && *f == field
                && r.starts_with(&format!("{entry:?} is not a Service"))),
            "{object}: {reasons:?}"
        );
    }
    let mut t = Translator::new(model);
    let addresses = |view: &ProxyView| -> Vec<String> {
        view.wildcard(ResourceType::Listener)
            .keys()
            .filter(|n| names::parse_address_listener(n).is_some())
            .map(|n| n.to_string())
            .collect()
    };
    // The pod's own annotation: reviews, and db of another namespace.
    let view = t.view(&scoped("default"));
    assert_eq!(addresses(&view), ["10.96.0.10_9080", "10.96.1.11_5432"]);
    assert_eq!(
        view.get_wildcard(ResourceType::Listener, "10.96.0.10_9080"),
        view.get(ResourceType::Listener, "10.96.0.10_9080"),
        "the same listener a lookup gets"
    );
    // Another pod of the namespace has none; in shop the namespace names web's two ports.
    let mut other = scoped("default");
    other.name = "other-0".into();
    assert!(addresses(&t.view(&other)).is_empty());
    assert_eq!(
        addresses(&t.view(&scoped("shop"))),
        ["10.96.0.30_80", "10.96.0.30_9000"]
    );
    // What the workload learned comes too; an address nothing owns is left out.
    let learned = BTreeSet::from([
        "10.96.1.10:8080".parse().expect("cart"),
        "10.96.9.9:80".parse().expect("nothing there"),
    ]);
    assert_eq!(
        addresses(&t.view_learned(&other, &learned)),
        ["10.96.1.10_8080"]
    );
    // A full proxy is given everything anyway, and no address listener.
    assert!(addresses(&t.view_learned(&proxy("default", true), &learned)).is_empty());
}

#[test]
fn pods_of_the_same_services_share_one_inbound_layer() {
    let mut idx = index();
    for (name, app) in [("web-1", "web"), ("web-2", "web"), ("cart-1", "cart")] {
        let ns = if app == "cart" { "shop" } else { "default" };
        idx.apply(obj(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\n"
        )))
        .expect("pod");
    }
    let mut t = Translator::new(idx.model());
    let inbound = |t: &mut Translator, ns: &str, name: &str| -> Arc<Resources> {
        let mut p = proxy(ns, true);
        p.name = name.into();
        t.view(&p).layers[0].clone()
    };
    let (a, b) = (
        inbound(&mut t, "default", "web-1"),
        inbound(&mut t, "default", "web-2"),
    );
    assert!(Arc::ptr_eq(&a, &b), "two pods of web share one layer");
    let cart = inbound(&mut t, "shop", "cart-1");
    assert!(!Arc::ptr_eq(&a, &cart));
    let inbound_ports = |l: &Resources| -> Vec<String> {
        l.iter(ResourceType::Cluster)
            .map(|r| r.name.to_string())
            .collect()
    };
    assert_eq!(inbound_ports(&a), ["inbound|80||", "inbound|9000||"]);
    assert_eq!(inbound_ports(&cart), ["inbound|8080||"]);
    // A new model: built again, and still shared.
    idx.apply(obj(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {mesh.dev/mtls-mode: STRICT}}\n",
    ))
    .expect("ns");
    t.update(idx.model());
    let c = inbound(&mut t, "default", "web-1");
    assert!(!Arc::ptr_eq(&a, &c), "rebuilt for the new model");
    assert!(Arc::ptr_eq(&c, &inbound(&mut t, "default", "web-2")));
}

#[test]
fn a_rules_fault_goes_to_envoys_fault_filter_per_route() {
    use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{HttpFault, fault_abort};
    let mut idx = index();
    for doc in [
        "apiVersion: mesh.dev/v1alpha1
kind: FaultInjection
metadata: {name: flaky, namespace: default}
spec:
  delay: {fixedDelay: 1500ms, percent: 2.5}
  abort: {grpcStatus: 14, percent: 10}
",
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /flaky}}]
    filters: [{type: ExtensionRef, extensionRef: {group: mesh.dev, kind: FaultInjection, name: flaky}}]
    backendRefs: [{name: reviews-v1, port: 9080}]
  - backendRefs: [{name: reviews-v1, port: 9080}]
",
    ] {
        idx.apply(obj(doc)).expect("applies");
    }
    let mut t = Translator::new(idx.model());
    let view = t.view(&proxy("default", true));
    let rc = reviews_routes(&view);
    let routes = &rc.virtual_hosts[0].routes;
    let any = &routes[0].typed_per_filter_config["envoy.filters.http.fault"];
    let f = HttpFault::decode(any.value.as_slice()).expect("HTTPFault");
    let delay = f.delay.expect("delay");
    assert_eq!(delay.percentage.map(|p| p.numerator), Some(25_000));
    let abort = f.abort.expect("abort");
    assert_eq!(
        abort.error_type,
        Some(fault_abort::ErrorType::GrpcStatus(14))
    );
    assert_eq!(abort.percentage.map(|p| p.numerator), Some(100_000));
    let last = routes.last().expect("the catch-all rule");
    assert!(
        last.typed_per_filter_config.is_empty(),
        "only the rule that names it"
    );
    // Every outbound HCM carries the (empty) fault filter before the router, so per-route
    // faults apply.
    let chains = outbound_chains(&view, "10.96.0.10", 9080);
    let Some(filter::ConfigType::TypedConfig(any)) = &chains[0].filters[0].config_type else {
        panic!("typed hcm");
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
    let names: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        ["envoy.filters.http.fault", "envoy.filters.http.router"]
    );
}

#[test]
fn envoys_fed_by_the_agent_get_clusters_with_upstream_mesh_tls() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::UpstreamTlsContext;
    let mut idx = index();
    idx.apply(obj("apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web, mesh.dev/proxy: 'true'}}\nspec: {serviceAccountName: web, containers: [{name: app}]}\nstatus: {podIP: 10.0.3.1}\n")).expect("pod");
    idx.apply(obj("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-80, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 80, protocol: TCP}]\nendpoints:\n- {addresses: ['10.0.3.1'], conditions: {ready: true}, targetRef: {kind: Pod, name: web-0, namespace: default}}\n- {addresses: ['10.0.3.2'], conditions: {ready: true}}\n")).expect("slice");
    let mut t = Translator::new(idx.model());
    let cluster = "outbound|80||web.default.svc.cluster.local";
    let id = "spiffe://cluster.local/ns/default/sa/web";
    let clusters = |t: &mut Translator, settings: ListenerSettings| -> Cluster {
        let view = t.view(&ProxyId {
            settings,
            ..proxy("default", false)
        });
        decode(view.get(ResourceType::Cluster, cluster).expect("cluster"))
    };
    let agent_fed = ListenerSettings {
        mtls: true,
        sds: SdsSource::Agent,
        ..Default::default()
    };
    let c = clusters(&mut t, agent_fed);
    assert_eq!(c.transport_socket_matches.len(), 1, "one per identity");
    let m = &c.transport_socket_matches[0];
    assert_eq!(m.name, "mtls-0");
    assert!(format!("{:?}", m.r#match).contains(id), "{m:?}");
    let tls = UpstreamTlsContext::decode(
        m.transport_socket
            .as_ref()
            .and_then(|t| t.config_type.as_ref())
            .map(|filter_any| match filter_any {
                envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a) => a.value.clone(),
            })
            .unwrap_or_default()
            .as_slice(),
    )
    .expect("UpstreamTlsContext");
    let text = format!("{tls:?}");
    assert!(
        text.contains(id) && text.contains(names::SDS_CLUSTER),
        "{text}"
    );
    // Endpoints are matched by identity; one without stays plaintext.
    let view = t.view(&proxy("default", false));
    let cla: ClusterLoadAssignment =
        decode(view.get(ResourceType::Endpoint, cluster).expect("cla"));
    let matched: Vec<bool> = cla.endpoints[0]
        .lb_endpoints
        .iter()
        .map(|e| {
            e.metadata.as_ref().is_some_and(|m| {
                m.filter_metadata
                    .contains_key("envoy.transport_socket_match")
            })
        })
        .collect();
    assert_eq!(matched, [true, false]);
    // mesh-proxy (secrets over ADS) and Envoys reading files get the plain cluster.
    for settings in [
        ListenerSettings {
            mtls: true,
            ..Default::default()
        },
        ListenerSettings {
            mtls: true,
            sds: SdsSource::Dir("/etc/mesh/sds".into()),
            ..Default::default()
        },
    ] {
        assert!(
            clusters(&mut t, settings)
                .transport_socket_matches
                .is_empty()
        );
    }
}

#[test]
fn host_routed_proxies_of_a_namespace_share_one_route_configuration() {
    let mut idx = index();
    let mut t = Translator::new(idx.model());
    let at = |ns: &str, port: u16| {
        let mut p = proxy(ns, false);
        p.settings.outbound_http_addr = SocketAddr::from(([127, 0, 0, 1], port));
        p
    };
    let route = |t: &mut Translator, p: &ProxyId| {
        t.view(p)
            .get(ResourceType::Route, names::OUTBOUND_HTTP_ROUTE)
            .expect("outbound_http route")
            .clone()
    };
    let listener_port = |t: &mut Translator, p: &ProxyId| {
        let l: Listener = decode(
            t.view(p)
                .get(ResourceType::Listener, names::OUTBOUND_HTTP_LISTENER)
                .expect("outbound_http listener"),
        );
        l.address
    };
    let (one, two, shop) = (at("default", 4001), at("default", 4002), at("shop", 4001));
    // Two listener addresses in one namespace: one RouteConfiguration, each its own listener.
    assert!(Arc::ptr_eq(&route(&mut t, &one), &route(&mut t, &two)));
    assert_ne!(listener_port(&mut t, &one), listener_port(&mut t, &two));
    // Another namespace sees other names (its own short ones).
    assert_ne!(route(&mut t, &one).version, route(&mut t, &shop).version);
    // A change to a virtual host reaches both, still shared.
    let before = route(&mut t, &one);
    idx.apply(obj(&service_yaml(
        "default",
        "new",
        "10.96.0.40",
        &[("http", 80)],
    )))
    .expect("svc");
    t.update(idx.model());
    let after = route(&mut t, &two);
    assert_ne!(before.version, after.version);
    assert!(Arc::ptr_eq(&after, &route(&mut t, &one)));
    assert!(
        outbound_http(&t.view(&one))
            .virtual_hosts
            .iter()
            .any(|v| v.name == "new.default.svc.cluster.local:80")
    );
}
