use envoy_types::pb::envoy::config::listener::v3::filter;
use envoy_types::pb::envoy::config::route::v3::route;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use prost::Message;

use super::*;
use crate::index::Index;
use crate::index::gateway::tests::{CLASS, secret_yaml};
use crate::testing::{obj, service_yaml};
use crate::xds::translate::{ListenerSettings, ProxyId, Translator};

fn decode<M: Message + Default>(r: &Resource) -> M {
    M::decode(r.any.value.as_slice()).expect("decodes")
}

fn gateway_proxy(gateway: &str) -> ProxyId {
    ProxyId {
        namespace: "infra".into(),
        name: "edge-0".into(),
        settings: ListenerSettings {
            gateway: Some(gateway.into()),
            gateway_addr: "127.0.0.1".parse().expect("ip"),
            ..Default::default()
        },
    }
}

fn rds_of(chain: &FilterChain) -> String {
    let Some(filter::ConfigType::TypedConfig(any)) = &chain.filters[0].config_type else {
        panic!("no typed config");
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
    match hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(r)) => r.route_config_name,
        other => panic!("not RDS: {other:?}"),
    }
}

/// A gateway proxy gets its Gateway's listeners on its address, an HTTPS chain per listener
/// by server name with that listener's certificate over SDS, a route configuration per HTTP
/// port and per HTTPS listener holding only that listener's hosts, and the certificates; the
/// mesh's clusters come from the shared layer; a sidecar gets none of it.
#[test]
fn a_gateway_proxy_gets_its_gateways_listeners_routes_and_certificates() {
    let mut idx = Index::new("cluster.local");
    for d in [
        CLASS.to_string(),
        service_yaml("infra", "web", "10.96.0.10", &[("http", 8080)]),
        secret_yaml("infra", "shop-cert", "shop.example.com"),
        secret_yaml("infra", "any-cert", "*.example.com"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 8080, protocol: HTTP}\n  - {name: shop, port: 8443, protocol: HTTPS, hostname: shop.example.com, tls: {certificateRefs: [{name: shop-cert}]}}\n  - {name: any, port: 8443, protocol: HTTPS, hostname: '*.example.com', tls: {certificateRefs: [{name: any-cert}]}}\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web, namespace: infra}\nspec:\n  parentRefs: [{name: edge}]\n  hostnames: [shop.example.com, www.example.com]\n  rules: [{backendRefs: [{name: web, port: 8080}]}]\n".into(),
    ] {
        idx.apply(obj(&d)).unwrap_or_else(|e| panic!("{e}: {d}"));
    }
    let mut t = Translator::new(idx.model());
    let view = t.view(&gateway_proxy("edge"));
    let listener = |name: &str| -> Listener {
        decode(view.get(ResourceType::Listener, name).expect("listener"))
    };
    let http = listener("gateway_8080");
    assert_eq!(
        http.address,
        Some(super::super::build::socket_address(
            "127.0.0.1".parse().expect("ip"),
            8080
        ))
    );
    assert_eq!(rds_of(&http.filter_chains[0]), "gateway/infra/edge/8080");
    let https = listener("gateway_8443");
    let chains: Vec<(Vec<String>, String)> = https
        .filter_chains
        .iter()
        .map(|c| {
            (
                c.filter_chain_match
                    .clone()
                    .unwrap_or_default()
                    .server_names,
                rds_of(c),
            )
        })
        .collect();
    assert_eq!(
        chains,
        vec![
            (
                vec!["shop.example.com".to_string()],
                "gateway/infra/edge/8443/shop".to_string()
            ),
            (
                vec!["*.example.com".to_string()],
                "gateway/infra/edge/8443/any".to_string()
            ),
        ]
    );
    let routes = |name: &str| -> Vec<(String, usize)> {
        let rc: RouteConfiguration = decode(view.get(ResourceType::Route, name).expect("route"));
        rc.virtual_hosts
            .iter()
            .map(|v| (v.domains.join(","), v.routes.len()))
            .collect()
    };
    assert_eq!(
        routes("gateway/infra/edge/8080"),
        vec![
            ("shop.example.com".into(), 1),
            ("www.example.com".into(), 1)
        ]
    );
    // Listener isolation by SNI: shop.example.com is the shop listener's alone.
    assert_eq!(
        routes("gateway/infra/edge/8443/shop"),
        vec![("shop.example.com".into(), 1)]
    );
    assert_eq!(
        routes("gateway/infra/edge/8443/any"),
        vec![("www.example.com".into(), 1), ("*.example.com".into(), 0)]
    );
    let rc: RouteConfiguration = decode(
        view.get(ResourceType::Route, "gateway/infra/edge/8080")
            .expect("route"),
    );
    match &rc.virtual_hosts[0].routes[0].action {
        Some(route::Action::Route(a)) => {
            assert_eq!(
            a.cluster_specifier,
            Some(envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier::Cluster(
                "outbound|8080||web.infra.svc.cluster.local".into()
            ))
        )
        }
        other => panic!("{other:?}"),
    }
    let secret: Secret = decode(
        view.get(ResourceType::Secret, "infra/shop-cert")
            .expect("secret"),
    );
    let Some(secret::Type::TlsCertificate(c)) = secret.r#type else {
        panic!("not a certificate");
    };
    assert!(matches!(
        c.private_key.and_then(|k| k.specifier),
        Some(data_source::Specifier::InlineString(k)) if k.contains("PRIVATE KEY")
    ));
    assert!(
        view.get(
            ResourceType::Cluster,
            "outbound|8080||web.infra.svc.cluster.local"
        )
        .is_some()
    );
    assert!(view.get(ResourceType::Listener, "outbound_http").is_none());
    // A sidecar of the same namespace: no gateway listener, and no certificate.
    let sidecar = t.view(&ProxyId {
        namespace: "infra".into(),
        name: "web-0".into(),
        settings: ListenerSettings::default(),
    });
    assert!(
        sidecar
            .get(ResourceType::Listener, "gateway_8080")
            .is_none()
    );
    assert!(
        sidecar
            .get(ResourceType::Secret, "infra/shop-cert")
            .is_none()
    );
    // A Gateway that is not there: nothing of its own.
    let none = t.view(&gateway_proxy("missing"));
    assert!(none.get(ResourceType::Listener, "gateway_8080").is_none());
}

/// A node that names a Gateway: read from its metadata, refused on a transparent proxy or with
/// a name that is no Gateway name, and over TLS only for the Gateway's service account (its
/// certificates and keys come with it).
#[test]
fn a_gateway_node_is_read_and_must_run_as_the_gateways_account() {
    use crate::xds::server::{check_node, proxy_id};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind as ValueKind};
    use mesh_api::consts::node_metadata as md;
    let node = |fields: &[(&str, &str)]| Node {
        id: "infra/edge-0".into(),
        metadata: Some(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(ValueKind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }),
        ..Default::default()
    };
    let p = proxy_id(&node(&[
        (md::GATEWAY, "edge"),
        (md::GATEWAY_ADDR, "127.0.0.1"),
    ]))
    .expect("a gateway node");
    assert_eq!(p.settings.gateway.as_deref(), Some("edge"));
    assert_eq!(p.settings.gateway_addr.to_string(), "127.0.0.1");
    for bad in [
        node(&[(md::GATEWAY, "Edge/x")]),
        node(&[(md::GATEWAY, "")]),
        node(&[(md::GATEWAY, "edge"), (md::TRANSPARENT, "true")]),
        node(&[(md::GATEWAY, "edge"), (md::GATEWAY_ADDR, "nowhere")]),
    ] {
        let err = proxy_id(&bad).expect_err("refused");
        assert!(err.contains("mesh.dev/gateway"), "{err}");
    }
    let model = Index::new("cluster.local").model();
    let id = |s: &str| mesh_api::SpiffeId::parse(s).expect("id");
    assert_eq!(
        check_node(
            &p,
            &id("spiffe://cluster.local/ns/infra/sa/edge-gateway"),
            &model
        ),
        Ok(())
    );
    let err = check_node(&p, &id("spiffe://cluster.local/ns/infra/sa/web"), &model)
        .expect_err("another account");
    assert!(err.contains("service account \"edge-gateway\""), "{err}");
}

/// RateLimitPolicies on a Gateway: a listener's own wins on its chain, the Gateway's covers the
/// rest, a bucket per chain; a listener that shares its HTTP port cannot be named, a Gateway
/// that is not there or a listener it lacks is reported, and an AuthorizationPolicy cannot
/// target a Gateway.
#[test]
fn rate_limits_on_a_gateway_go_on_the_chains_they_name() {
    use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
    let limit = |name: &str, section: &str| {
        format!(
            "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: infra}}\nspec:\n  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: edge{section}}}]\n  local: {{requestsPerSecond: 10}}\n"
        )
    };
    let mut idx = Index::new("cluster.local");
    for d in [
        CLASS.to_string(),
        secret_yaml("infra", "shop-cert", "shop.example.com"),
        secret_yaml("infra", "any-cert", "*.example.com"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 8080, protocol: HTTP}\n  - {name: http-b, port: 8080, protocol: HTTP, hostname: b.example.com}\n  - {name: shop, port: 8443, protocol: HTTPS, hostname: shop.example.com, tls: {certificateRefs: [{name: shop-cert}]}}\n  - {name: any, port: 8443, protocol: HTTPS, hostname: '*.example.com', tls: {certificateRefs: [{name: any-cert}]}}\n  - {name: raw, port: 9000, protocol: TCP}\n".into(),
        limit("all", ""),
        limit("tcp-one", ", sectionName: raw"),
        "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: ids, namespace: infra}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n  local: {perIdentity: {requestsPerSecond: 10}}\n".into(),
        limit("shop-only", ", sectionName: shop"),
        limit("shared", ", sectionName: http-b"),
        limit("nowhere", ", sectionName: missing"),
        "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: other, namespace: infra}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: elsewhere}]\n  local: {requestsPerSecond: 10}\n".into(),
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: edge-authz, namespace: infra}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n  rules: [{}]\n".into(),
    ] {
        idx.apply(obj(&d)).unwrap_or_else(|e| panic!("{e}: {d}"));
    }
    let model = idx.model();
    let mut t = Translator::new(model.clone());
    let view = t.view(&gateway_proxy("edge"));
    let buckets = |listener: &str| -> Vec<Option<String>> {
        let l: Listener = decode(
            view.get(ResourceType::Listener, listener)
                .expect("listener"),
        );
        l.filter_chains
            .iter()
            .map(|c| {
                let Some(filter::ConfigType::TypedConfig(any)) = &c.filters[0].config_type else {
                    panic!("no typed config");
                };
                let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
                hcm.http_filters
                    .iter()
                    .find(|f| f.name == "envoy.filters.http.local_ratelimit")
                    .and_then(|f| match &f.config_type {
                        Some(
                            envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(a),
                        ) => Some(LocalRateLimit::decode(a.value.as_slice()).expect("limit").stat_prefix),
                        _ => None,
                    })
            })
            .collect()
    };
    // The HTTP port's one chain: the Gateway's (http-b shares the port, so its own is not used).
    assert_eq!(buckets("gateway_8080"), vec![Some("infra/all/8080".into())]);
    assert_eq!(
        buckets("gateway_8443"),
        vec![
            Some("infra/shop-only/8443/shop".into()),
            Some("infra/all/8443/any".into())
        ]
    );
    let errors: Vec<String> = model
        .errors
        .iter()
        .map(|e| format!("{} {}: {}", e.object.name, e.field, e.reason))
        .collect();
    for want in [
        "shared spec.targetRefs[0].sectionName: listener \"http-b\" of Gateway infra/edge shares port 8080 with other HTTP listeners",
        "nowhere spec.targetRefs[0].sectionName: Gateway infra/edge has no listener named \"missing\"",
        "other spec.targetRefs[0]: Gateway infra/elsewhere not found",
        "edge-authz spec.targetRefs[0].kind: an AuthorizationPolicy cannot target a Gateway",
        "tcp-one spec.targetRefs[0].sectionName: listener \"raw\" of Gateway infra/edge is TCP",
        "ids spec.local.perIdentity: callers at a Gateway have no mesh identity",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "{want:?} not in {errors:#?}"
        );
    }
}
