use super::*;
use crate::index::{Index, Model, RouteAction};
use crate::objects::ObjKey;
use crate::testing::{obj, service_yaml};

#[test]
fn hostnames_intersect_as_the_gateway_api_says() {
    let v = |hs: &[&str]| hs.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    // No listener hostname: the route's; neither: every host.
    assert_eq!(intersect(None, &[]), v(&["*"]));
    assert_eq!(
        intersect(None, &v(&["a.example.com"])),
        v(&["a.example.com"])
    );
    // No route hostnames: the listener's.
    assert_eq!(intersect(Some("*.example.com"), &[]), v(&["*.example.com"]));
    // The more specific of each matching pair; the rest dropped.
    assert_eq!(
        intersect(
            Some("*.example.com"),
            &v(&[
                "a.example.com",
                "a.b.example.com",
                "example.com",
                "other.org",
                "*.example.com",
                "*.b.example.com"
            ])
        ),
        v(&[
            "a.example.com",
            "a.b.example.com",
            "*.example.com",
            "*.b.example.com"
        ])
    );
    assert_eq!(
        intersect(
            Some("very.specific.com"),
            &v(&["*.specific.com", "specific.com"])
        ),
        v(&["very.specific.com"])
    );
    assert_eq!(
        intersect(Some("a.example.com"), &v(&["b.example.com"])),
        v(&[])
    );
    // A wildcard never takes its own suffix.
    assert_eq!(
        intersect(Some("*.example.com"), &v(&["example.com"])),
        v(&[])
    );
}

fn listener(name: &str, port: u16, hostname: Option<&str>) -> ListenerRead {
    ListenerRead {
        name: name.into(),
        port,
        protocol: "HTTP".into(),
        hostname: hostname.map(Into::into),
        tls_mode: None,
        certs: vec![],
        namespaces: Namespaces::All,
        kinds: None,
    }
}

/// A host goes only to the listener a request for it selects: a more specific listener on the
/// same port takes the hosts within its hostname from the others.
#[test]
fn more_specific_listeners_take_their_hosts_from_the_others() {
    let ls = vec![
        listener("any", 80, None),
        listener("wild", 80, Some("*.example.com")),
        listener("exact", 80, Some("foo.example.com")),
        listener("other-port", 8080, Some("*.example.com")),
    ];
    let mut hosts = vec![
        vec![
            "*".into(),
            "foo.example.com".into(),
            "bar.example.com".into(),
            "x.org".into(),
        ],
        vec![
            "*.example.com".into(),
            "foo.example.com".into(),
            "*.a.example.com".into(),
        ],
        vec![],
        vec!["foo.example.com".into()],
    ];
    isolate(&ls, &[true; 4], &mut hosts);
    assert_eq!(
        hosts[0],
        vec!["*", "x.org"],
        "the wildcard listener takes *.example.com"
    );
    assert_eq!(
        hosts[1],
        vec!["*.example.com", "*.a.example.com"],
        "the exact listener takes foo.example.com"
    );
    assert_eq!(
        hosts[2],
        vec!["foo.example.com"],
        "a listener keeps its own host, routes or not"
    );
    assert_eq!(
        hosts[3],
        vec!["foo.example.com", "*.example.com"],
        "another port is apart"
    );
}

fn self_signed(host: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![host.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    (cert.pem(), key.serialize_pem())
}

/// A TLS Secret with a self-signed certificate for `host`.
pub(crate) fn secret_yaml(ns: &str, name: &str, host: &str) -> String {
    let (cert, key) = self_signed(host);
    crate::testing::tls_secret_yaml(ns, name, &cert, &key)
}

pub(crate) const CLASS: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: mesh}\nspec: {controllerName: mesh.dev/mesh-controller}\n";

/// The infra namespace's Gateway: HTTP on 80 for routes of every namespace, HTTPS on 443 for
/// `*.example.com` with its certificate in `certs` (a grant there lets it), and a TCP listener
/// we do not serve.
fn edge() -> Index {
    let mut idx = Index::new("cluster.local");
    for d in [
        CLASS.to_string(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: other}\nspec: {controllerName: example.com/other}\n".into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: shop}}\n".into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: infra}\n".into(),
        service_yaml("shop", "web", "10.96.0.10", &[("http", 8080)]),
        service_yaml("infra", "status", "10.96.0.11", &[("http", 8080)]),
        secret_yaml("certs", "example", "*.example.com"),
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: edge, namespace: certs}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}]\n  to: [{group: '', kind: Secret}]\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra, generation: 3}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}\n  - name: https\n    port: 443\n    protocol: HTTPS\n    hostname: '*.example.com'\n    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {team: shop}}}}\n    tls: {certificateRefs: [{name: example, namespace: certs}]}\n  - {name: tcp, port: 9000, protocol: TCP}\n".into(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: theirs, namespace: infra}\nspec:\n  gatewayClassName: other\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n".into(),
    ] {
        idx.apply(obj(&d)).unwrap_or_else(|e| panic!("{e}: {d}"));
    }
    idx
}

fn route(ns: &str, name: &str, parents: &str, hostnames: &str, backend: &str) -> Object {
    obj(&format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: {parents}\n  hostnames: {hostnames}\n  rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]\n"
    ))
}

use crate::objects::Object;

fn gw(m: &Model) -> &GatewayModel {
    &m.gateways.gateways["infra/edge"]
}

fn parent_status(m: &Model, ns: &str, name: &str) -> Vec<(usize, bool, String)> {
    let key = ObjKey {
        kind: Kind::HTTPRoute,
        namespace: ns.into(),
        name: name.into(),
    };
    m.gateways
        .route_parents
        .get(&key)
        .map(|ps| {
            ps.iter()
                .map(|(i, c)| (*i, c.ok, c.reason.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn routes_attach_to_the_listeners_that_allow_them_and_share_a_hostname() {
    let mut idx = edge();
    for r in [
        // Both listeners: HTTP for any host it names, HTTPS for those under *.example.com.
        route(
            "shop",
            "store",
            "[{name: edge, namespace: infra}]",
            "[store.example.com, store.example.org]",
            "web",
        ),
        // Only the HTTP listener allows infra's routes.
        route("infra", "status", "[{name: edge}]", "[]", "status"),
        // A listener that is not there; a port no listener has.
        route(
            "shop",
            "lost",
            "[{name: edge, namespace: infra, sectionName: grpc}, {name: edge, namespace: infra, port: 8443}]",
            "[]",
            "web",
        ),
        // HTTPS only, and a hostname outside *.example.com.
        route(
            "shop",
            "elsewhere",
            "[{name: edge, namespace: infra, sectionName: https}]",
            "[shop.example.org]",
            "web",
        ),
        // Another controller's Gateway: no status from us.
        route(
            "shop",
            "theirs",
            "[{name: theirs, namespace: infra}]",
            "[]",
            "web",
        ),
    ] {
        idx.apply(r).expect("route");
    }
    let m = idx.model();
    assert_eq!(m.gateways.classes.keys().collect::<Vec<_>>(), vec!["mesh"]);
    assert!(!m.gateways.gateways.contains_key("infra/theirs"));
    assert_eq!(
        parent_status(&m, "shop", "store"),
        vec![(0, true, "Accepted".into())]
    );
    assert_eq!(
        parent_status(&m, "infra", "status"),
        vec![(0, true, "Accepted".into())]
    );
    assert_eq!(
        parent_status(&m, "shop", "lost"),
        vec![
            (0, false, "NoMatchingParent".into()),
            (1, false, "NoMatchingParent".into())
        ]
    );
    assert_eq!(
        parent_status(&m, "shop", "elsewhere"),
        vec![(0, false, "NoMatchingListenerHostname".into())]
    );
    assert!(parent_status(&m, "shop", "theirs").is_empty());
    // infra's route on the HTTPS listener only: not allowed there.
    idx.apply(route(
        "infra",
        "status",
        "[{name: edge, sectionName: https}]",
        "[]",
        "status",
    ))
    .expect("route");
    let m = idx.model();
    assert_eq!(
        parent_status(&m, "infra", "status"),
        vec![(0, false, "NotAllowedByListeners".into())]
    );
    let reasons: Vec<(&str, &str)> = m
        .errors
        .iter()
        .filter(|e| e.field.starts_with("spec.parentRefs"))
        .map(|e| (e.object.name.as_str(), e.reason.as_str()))
        .collect();
    assert!(
        reasons.contains(&("lost", "Gateway infra/edge: no listener named grpc")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&(
            "status",
            "no listener of Gateway infra/edge allows HTTPRoutes from namespace infra"
        )),
        "{reasons:?}"
    );

    let g = gw(&m);
    let l = |name: &str| {
        g.listeners
            .iter()
            .find(|l| l.name == name)
            .expect("listener")
    };
    assert_eq!(l("http").attached_routes, 1, "store");
    assert_eq!(l("https").attached_routes, 1, "store");
    assert_eq!(l("tcp").attached_routes, 0);
    assert!(l("http").valid() && l("https").valid());
    assert_eq!(l("https").certs.len(), 1);
    assert_eq!(
        (l("tcp").accepted.ok, l("tcp").accepted.reason.as_str()),
        (false, "UnsupportedProtocol")
    );
    assert!(l("tcp").supported_kinds.is_empty());
    assert_eq!(
        (g.accepted.ok, g.accepted.reason.as_str()),
        (true, "ListenersNotValid"),
        "one of three listeners is not served"
    );
    // What each port serves: HTTP has store's two hosts; HTTPS the one under its hostname,
    // and its own hostname (for a 404) since no route takes all of it.
    let hosts = |port: u16| -> Vec<(String, usize)> {
        g.ports
            .iter()
            .find(|p| p.port == port)
            .expect("port")
            .vhosts
            .iter()
            .map(|v| (v.hostname.clone(), v.routes.len()))
            .collect()
    };
    assert_eq!(
        hosts(80),
        vec![
            ("store.example.com".into(), 1),
            ("store.example.org".into(), 1)
        ]
    );
    assert_eq!(
        hosts(443),
        vec![("store.example.com".into(), 1), ("*.example.com".into(), 0)]
    );
    assert!(!g.ports.iter().any(|p| p.port == 9000));
    let store = &g.ports[0].vhosts[0].routes[0];
    assert_eq!(
        store.action,
        RouteAction::Forward(vec![crate::index::WeightedBackend {
            cluster: Some("outbound|8080||web.shop.svc.cluster.local".into()),
            weight: 1,
            request_headers: Default::default(),
            response_headers: Default::default(),
            hash: None,
        }])
    );
    assert_eq!(
        m.gateways.secrets.len(),
        1,
        "only the certificates listeners use"
    );
}

#[test]
fn certificates_need_a_grant_across_namespaces_and_a_readable_secret() {
    let mut idx = edge();
    let https = |m: &Model| {
        let l = gw(m)
            .listeners
            .iter()
            .find(|l| l.name == "https")
            .cloned()
            .expect("https");
        (l.resolved_refs.ok, l.resolved_refs.reason, l.programmed.ok)
    };
    assert_eq!(https(&idx.model()), (true, "ResolvedRefs".into(), true));
    idx.delete(&ObjKey {
        kind: Kind::ReferenceGrant,
        namespace: "certs".into(),
        name: "edge".into(),
    });
    let m = idx.model();
    assert_eq!(https(&m), (false, "RefNotPermitted".into(), false));
    assert!(!gw(&m).ports.iter().any(|p| p.port == 443), "not served");
    assert!(m.gateways.secrets.is_empty());
    // In the Gateway's own namespace no grant is needed; the Secret must read.
    idx.apply(obj(&secret_yaml("infra", "example", "*.example.com")
        .replace("tls.key: ", "tls.key: AAAA, x: ")))
        .expect("secret");
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: example}, {name: missing}]}}\n"))
        .expect("gateway");
    let m = idx.model();
    let l = &gw(&m).listeners[0];
    assert_eq!(l.resolved_refs.reason, "InvalidCertificateRef");
    assert!(
        l.resolved_refs.message.contains("tls.key"),
        "{}",
        l.resolved_refs.message
    );
    assert!(
        l.resolved_refs
            .message
            .contains("no Secret infra/missing of type kubernetes.io/tls"),
        "{}",
        l.resolved_refs.message
    );
    assert_eq!(
        (gw(&m).accepted.ok, gw(&m).accepted.reason.as_str()),
        (false, "ListenersNotValid")
    );
    idx.apply(obj(&secret_yaml("infra", "example", "*.example.com")))
        .expect("secret");
    let m = idx.model();
    assert!(
        gw(&m).listeners[0].programmed.ok,
        "one good certificate is enough to serve"
    );
}

/// A host is served by every route of the listener whose hostnames take it in, the route
/// naming it first; a route that attaches nowhere still has its backends resolved (its
/// ResolvedRefs is set either way); an empty `allowedRoutes.kinds` is the default.
#[test]
fn a_host_gets_every_route_that_covers_it_and_unattached_routes_are_resolved() {
    let mut idx = edge();
    for r in [
        route(
            "shop",
            "all",
            "[{name: edge, namespace: infra, sectionName: http}]",
            "[]",
            "web",
        ),
        route(
            "shop",
            "wild",
            "[{name: edge, namespace: infra, sectionName: http}]",
            "['*.example.com']",
            "web",
        ),
        obj(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: cart, namespace: shop}\nspec:\n  parentRefs: [{name: edge, namespace: infra, sectionName: http}]\n  hostnames: [store.example.com]\n  rules: [{matches: [{path: {type: PathPrefix, value: /cart}}], backendRefs: [{name: web, port: 8080}]}]\n",
        ),
        // Attaches nowhere (no such listener), with a backend that does not exist.
        route(
            "shop",
            "lost",
            "[{name: edge, namespace: infra, sectionName: nope}]",
            "[]",
            "ghost",
        ),
    ] {
        idx.apply(r).expect("route");
    }
    let m = idx.model();
    let port = gw(&m).ports.iter().find(|p| p.port == 80).expect("port 80");
    let sources = |host: &str| -> Vec<String> {
        port.vhosts
            .iter()
            .find(|v| v.hostname == host)
            .expect("vhost")
            .routes
            .iter()
            .map(|r| r.source.clone())
            .collect()
    };
    assert_eq!(
        sources("store.example.com"),
        vec![
            "HTTPRoute/shop/cart rule 0",
            "HTTPRoute/shop/wild rule 0",
            "HTTPRoute/shop/all rule 0"
        ]
    );
    assert_eq!(
        sources("*.example.com"),
        vec!["HTTPRoute/shop/wild rule 0", "HTTPRoute/shop/all rule 0"]
    );
    assert_eq!(sources("*"), vec!["HTTPRoute/shop/all rule 0"]);
    assert!(
        m.errors.iter().any(|e| e.object.name == "lost"
            && e.field == "spec.rules[0].backendRefs[0]"
            && e.reason.contains("shop/ghost not found")),
        "{:?}",
        m.errors
    );
    // kinds: [] is the protocol's default.
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {kinds: [], namespaces: {from: All}}}\n"))
        .expect("gateway");
    let m = idx.model();
    assert_eq!(gw(&m).listeners[0].supported_kinds, ROUTE_KINDS.to_vec());
    assert_eq!(gw(&m).listeners[0].attached_routes, 3);
}

/// A more specific listener that cannot be served takes no hosts from the others; a
/// certificate reference of another kind is refused as such, even across namespaces with a
/// grant for that kind.
#[test]
fn an_unservable_listener_takes_no_hosts_and_certificate_kinds_are_checked() {
    let mut idx = edge();
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: maps, namespace: certs}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: infra}]\n  to: [{group: '', kind: ConfigMap}]\n"))
        .expect("grant");
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - name: shop\n    port: 443\n    protocol: HTTPS\n    hostname: shop.example.com\n    allowedRoutes: {namespaces: {from: All}}\n    tls: {certificateRefs: [{kind: ConfigMap, name: example, namespace: certs}]}\n  - name: any\n    port: 443\n    protocol: HTTPS\n    hostname: '*.example.com'\n    allowedRoutes: {namespaces: {from: All}}\n    tls: {certificateRefs: [{name: example, namespace: certs}]}\n"))
        .expect("gateway");
    idx.apply(route(
        "shop",
        "store",
        "[{name: edge, namespace: infra}]",
        "[shop.example.com]",
        "web",
    ))
    .expect("route");
    let m = idx.model();
    let shop = &gw(&m).listeners[0];
    assert_eq!(
        (shop.resolved_refs.reason.as_str(), shop.programmed.ok),
        ("InvalidCertificateRef", false),
        "{}",
        shop.resolved_refs.message
    );
    let port = gw(&m)
        .ports
        .iter()
        .find(|p| p.port == 443)
        .expect("port 443");
    let hosts: Vec<(&str, &str)> = port
        .vhosts
        .iter()
        .map(|v| (v.listener.as_str(), v.hostname.as_str()))
        .collect();
    assert_eq!(
        hosts,
        vec![("any", "shop.example.com"), ("any", "*.example.com")],
        "the wildcard listener serves shop.example.com"
    );
}

/// Listeners of one port and protocol with the same hostname conflict and are not served;
/// a certificate needs an RSA or ECDSA key, and the key of its certificate.
#[test]
fn conflicting_listeners_and_unusable_keys_are_refused() {
    let mut idx = edge();
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: a, port: 80, protocol: HTTP}\n  - {name: b, port: 80, protocol: HTTP}\n  - {name: c, port: 80, protocol: HTTP, hostname: c.example.com}\n"))
        .expect("gateway");
    let m = idx.model();
    let l: Vec<(String, bool, String)> = gw(&m)
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.programmed.ok, l.conflicted.reason.clone()))
        .collect();
    assert_eq!(
        l,
        vec![
            ("a".into(), false, "HostnameConflict".into()),
            ("b".into(), false, "HostnameConflict".into()),
            ("c".into(), true, "NoConflicts".into()),
        ]
    );
    let secret = |name: &str, cert: &str, key: &str| {
        obj(&crate::testing::tls_secret_yaml("infra", name, cert, key))
    };
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
    let ed_cert = rcgen::CertificateParams::new(vec!["a.example.com".to_string()])
        .expect("params")
        .self_signed(&ed)
        .expect("cert");
    let other = rcgen::KeyPair::generate().expect("key");
    idx.apply(secret("ed", &ed_cert.pem(), &ed.serialize_pem()))
        .expect("secret");
    let (good_cert, _) = self_signed("a.example.com");
    idx.apply(secret("mismatched", &good_cert, &other.serialize_pem()))
        .expect("secret");
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: ed, port: 443, protocol: HTTPS, hostname: ed.example.com, tls: {certificateRefs: [{name: ed}]}}\n  - {name: mismatched, port: 443, protocol: HTTPS, hostname: m.example.com, tls: {certificateRefs: [{name: mismatched}]}}\n"))
        .expect("gateway");
    let m = idx.model();
    let why = |name: &str| {
        let l = gw(&m)
            .listeners
            .iter()
            .find(|l| l.name == name)
            .expect("listener");
        (
            l.resolved_refs.reason.clone(),
            l.resolved_refs.message.clone(),
        )
    };
    let (reason, message) = why("ed");
    assert_eq!(reason, "InvalidCertificateRef");
    assert!(message.contains("needs an RSA or ECDSA key"), "{message}");
    let (reason, message) = why("mismatched");
    assert_eq!(reason, "InvalidCertificateRef");
    assert!(
        message.contains("is not the key of the first certificate"),
        "{message}"
    );
}

/// Routes serving one host rank by their own hostname that matched: a name before a wildcard
/// narrowed to that name, whatever their age.
#[test]
fn a_route_naming_the_host_comes_before_a_wildcard_narrowed_to_it() {
    let mut idx = edge();
    idx.apply(obj("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: edge, namespace: infra}\nspec:\n  gatewayClassName: mesh\n  listeners:\n  - {name: http, port: 80, protocol: HTTP, hostname: very.specific.com, allowedRoutes: {namespaces: {from: All}}}\n"))
        .expect("gateway");
    let r = |name: &str, created: &str, hostnames: &str| {
        obj(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop, creationTimestamp: '{created}'}}\nspec:\n  parentRefs: [{{name: edge, namespace: infra}}]\n  hostnames: {hostnames}\n  rules: [{{backendRefs: [{{name: web, port: 8080}}]}}]\n"
        ))
    };
    for o in [
        r(
            "older-wildcard",
            "2026-01-01T00:00:00Z",
            "['*.specific.com', very.specific.com]",
        ),
        r(
            "newer-wildcard",
            "2026-01-02T00:00:00Z",
            "['*.specific.com']",
        ),
        r("newest-name", "2026-01-03T00:00:00Z", "[very.specific.com]"),
    ] {
        idx.apply(o).expect("route");
    }
    let m = idx.model();
    let sources: Vec<String> = gw(&m).ports[0].vhosts[0]
        .routes
        .iter()
        .map(|r| r.source.clone())
        .collect();
    assert_eq!(
        sources,
        vec![
            "HTTPRoute/shop/older-wildcard rule 0",
            "HTTPRoute/shop/newest-name rule 0",
            "HTTPRoute/shop/newer-wildcard rule 0"
        ],
        "each entry once, names first, then by age"
    );
}
