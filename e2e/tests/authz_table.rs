//! Authorization, evaluated end to end without a network: manifests go through the controller's
//! index and translation into the inbound listener's xDS, mesh-proxy converts that listener as
//! it would from the wire, and its RBAC filters decide each request of the table.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, Method};
use mesh_controller::index::Index;
use mesh_controller::index::policy::AuthzDefault;
use mesh_controller::testing::obj;
use mesh_proxy::policy::{Facts, HttpFacts, decide};
use mesh_proxy::state::Guard;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const BANK: &str = "spiffe://cluster.local/ns/bank/sa/teller";

/// The world every case starts from: namespace `shop` with a pod `cart-0` that Service `cart`
/// reaches on HTTP 8080 and Service `db` on TCP 5432, and Service `web` selecting another pod.
fn world(ns_label: Option<&str>) -> Vec<String> {
    let labels = ns_label
        .map(|v| format!("{{mesh.dev/authz-default: '{v}'}}"))
        .unwrap_or_else(|| "{}".into());
    vec![
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {labels}}}\n"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}\n".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\nspec: {clusterIP: 10.96.0.11, selector: {app: cart}, ports: [{name: tcp-pg, port: 5432, targetPort: 5432}]}\n".into(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.12, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n".into(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: cart-0, namespace: shop, labels: {app: cart}}\nspec: {serviceAccountName: cart, containers: [{name: app, ports: [{containerPort: 8080}, {containerPort: 5432}]}]}\nstatus: {podIP: 10.0.1.1}\n".into(),
    ]
}

/// The guard of each inbound port of `cart-0`, as mesh-proxy reads it from the controller's
/// listener (the mesh TLS chains; plaintext chains carry the same filters).
fn guards(
    policies: &[&str],
    mesh_default: AuthzDefault,
    ns_label: Option<&str>,
) -> BTreeMap<u16, Arc<Guard>> {
    let mut idx = Index::new("cluster.local");
    idx.set_authz_default(mesh_default);
    for doc in world(ns_label)
        .iter()
        .map(String::as_str)
        .chain(policies.iter().copied())
    {
        idx.apply(obj(doc)).expect("test object applies");
    }
    let config = mesh_e2e::authz::inbound_listener(&mut idx, "shop", "cart-0")
        .expect("mesh-proxy takes the inbound listener");
    let mut out = BTreeMap::new();
    for c in config.chains.iter().filter(|c| c.terminate_tls) {
        out.insert(c.port.expect("a port chain"), c.filter.guard().clone());
    }
    assert_eq!(out.keys().copied().collect::<Vec<_>>(), vec![5432, 8080]);
    out
}

/// One request: caller identity, method, path and port (5432 is opaque TCP).
struct Req {
    id: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    port: u16,
    allowed: bool,
}

fn req(id: Option<&'static str>, method: &'static str, path: &'static str, allowed: bool) -> Req {
    Req {
        id,
        method,
        path,
        port: 8080,
        allowed,
    }
}

fn tcp(id: Option<&'static str>, allowed: bool) -> Req {
    Req {
        id,
        method: "",
        path: "",
        port: 5432,
        allowed,
    }
}

struct Case {
    name: &'static str,
    policies: Vec<&'static str>,
    mesh_default: AuthzDefault,
    ns_label: Option<&'static str>,
    requests: Vec<Req>,
}

fn case(name: &'static str, policies: Vec<&'static str>, requests: Vec<Req>) -> Case {
    Case {
        name,
        policies,
        mesh_default: AuthzDefault::Allow,
        ns_label: None,
        requests,
    }
}

const ALLOW_WEB_GET_API: &str = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-reads, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{serviceAccounts: [web]}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n";
const DENY_ADMIN: &str = "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  action: Deny\n  rules:\n  - to: [{paths: ['/admin', '/admin/*']}]\n";

#[test]
fn the_evaluation_table() {
    let cases = vec![
        case(
            "no policy, mesh default allow",
            vec![],
            vec![
                req(Some(WEB), "GET", "/", true),
                req(None, "DELETE", "/anything", true),
                tcp(None, true),
            ],
        ),
        Case {
            mesh_default: AuthzDefault::Deny,
            ..case(
                "mesh default deny",
                vec![],
                vec![req(Some(WEB), "GET", "/", false), tcp(Some(WEB), false)],
            )
        },
        Case {
            mesh_default: AuthzDefault::Authenticated,
            ..case(
                "mesh default authenticated",
                vec![],
                vec![
                    req(Some(WEB), "GET", "/", true),
                    req(None, "GET", "/", false),
                    tcp(Some(BANK), true),
                    tcp(None, false),
                ],
            )
        },
        Case {
            mesh_default: AuthzDefault::Deny,
            ns_label: Some("allow"),
            ..case(
                "a namespace default overrides the mesh's",
                vec![],
                vec![req(None, "GET", "/", true)],
            )
        },
        Case {
            ns_label: Some("sometimes"),
            ..case(
                "an unreadable namespace default denies",
                vec![],
                vec![req(Some(WEB), "GET", "/", false)],
            )
        },
        case(
            "allow by service account, method and path prefix",
            vec![ALLOW_WEB_GET_API],
            vec![
                req(Some(WEB), "GET", "/api/items", true),
                req(Some(WEB), "GET", "/api/", true),
                req(Some(WEB), "POST", "/api/items", false),
                req(Some(WEB), "GET", "/admin", false),
                req(Some(WEB), "GET", "/api", false),
                req(Some(CART), "GET", "/api/items", false),
                req(None, "GET", "/api/items", false),
                // The policy names only the Service's HTTP port's Service: the TCP port keeps the
                // default.
                tcp(Some(BANK), true),
            ],
        ),
        Case {
            mesh_default: AuthzDefault::Authenticated,
            ..case(
                "an applicable ALLOW policy decides, not the default",
                vec![ALLOW_WEB_GET_API],
                vec![
                    req(Some(CART), "GET", "/api/items", false),
                    req(Some(WEB), "GET", "/api/items", true),
                ],
            )
        },
        case(
            "deny by path, exact and prefix",
            vec![DENY_ADMIN],
            vec![
                req(Some(WEB), "GET", "/admin", false),
                req(Some(WEB), "GET", "/admin/users", false),
                req(None, "POST", "/admin/", false),
                req(Some(WEB), "GET", "/administrator", true),
                req(Some(WEB), "GET", "/public", true),
                // `;` parameters are denied wherever a Deny names paths.
                req(Some(WEB), "GET", "/admin;jsessionid=1", false),
                req(Some(WEB), "GET", "/public;v=1", false),
            ],
        ),
        case(
            "deny runs before allow",
            vec![
                ALLOW_WEB_GET_API,
                DENY_ADMIN,
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-admin, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{serviceAccounts: [web]}]\n    to: [{paths: ['/admin']}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/admin", false),
                req(Some(WEB), "GET", "/api/x", true),
            ],
        ),
        case(
            "namespaces and identity prefixes",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: from-shop, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: shop}]\n  rules:\n  - from: [{namespaces: [shop]}, {identities: ['spiffe://cluster.local/ns/bank/sa/tell*']}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/", true),
                req(Some(BANK), "GET", "/", true),
                req(
                    Some("spiffe://cluster.local/ns/bank/sa/auditor"),
                    "GET",
                    "/",
                    false,
                ),
                req(
                    Some("spiffe://other.domain/ns/shop/sa/web"),
                    "GET",
                    "/",
                    false,
                ),
                tcp(Some(CART), true),
                tcp(None, false),
            ],
        ),
        case(
            "all fields of a from entry must hold",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: both, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{namespaces: [shop], serviceAccounts: [web, bank/teller]}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/", true),
                req(Some(BANK), "GET", "/", false),
                req(Some(CART), "GET", "/", false),
            ],
        ),
        case(
            "HTTP conditions never match TCP: ALLOW narrower, DENY wider",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: db}]\n  rules:\n  - to: [{methods: [GET]}]\n",
            ],
            vec![tcp(Some(WEB), false), req(Some(WEB), "POST", "/", true)],
        ),
        case(
            "a TCP deny with a path denies every connection",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin-db, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: db}]\n  action: Deny\n  rules:\n  - from: [{namespaces: [bank]}]\n    to: [{paths: ['/admin']}]\n",
            ],
            vec![tcp(Some(BANK), false), tcp(Some(WEB), true)],
        ),
        case(
            "ports and sectionName",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-8080, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: shop}]\n  rules:\n  - to: [{ports: [8080]}]\n",
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: http-port, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart, sectionName: http}]\n  action: Deny\n  rules:\n  - from: [{authenticated: false}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/", true),
                req(None, "GET", "/", false),
                tcp(Some(WEB), false),
            ],
        ),
        case(
            "an unknown field makes an ALLOW match nobody",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{serviceAccounts: [web], requestPrincipals: ['*']}]\n",
            ],
            vec![req(Some(WEB), "GET", "/", false)],
        ),
        case(
            "an unknown field makes a DENY match more",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: jwt-deny, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  action: Deny\n  rules:\n  - from: [{serviceAccounts: [web], notRequestPrincipals: ['*']}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/", false),
                req(Some(CART), "GET", "/", true),
            ],
        ),
        case(
            "an unreadable value: left out of an ALLOW, any value in a DENY",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{identities: ['spiffe://cluster.local/ns/shop/sa/web', 'web*']}]\n",
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typo-deny, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  action: Deny\n  rules:\n  - from: [{serviceAccounts: ['Bank/Teller!']}]\n    to: [{methods: [DELETE]}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/", true),
                req(Some(WEB), "DELETE", "/", false),
                req(Some(CART), "GET", "/", false),
            ],
        ),
        case(
            "a DENY covers what apps read alike: HEAD for GET, a trailing slash, encoded characters",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-purge, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  action: Deny\n  rules:\n  - to: [{methods: [GET], paths: ['/v1/items:purge', '/caf%C3%A9', '/report']}]\n",
            ],
            vec![
                req(Some(WEB), "GET", "/v1/items:purge", false),
                req(Some(WEB), "GET", "/v1/items%3Apurge", false),
                req(Some(WEB), "GET", "/v1/items%3apurge", false),
                req(Some(WEB), "HEAD", "/v1/items:purge", false),
                req(Some(WEB), "GET", "/caf\u{e9}", false),
                req(Some(WEB), "GET", "/caf%c3%a9", false),
                req(Some(WEB), "GET", "/report/", false),
                req(Some(WEB), "GET", "/reports", true),
                req(Some(WEB), "POST", "/report", true),
                req(Some(WEB), "GET", "*", false),
            ],
        ),
        case(
            "an ALLOW with an encodable character allows the written form only",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: purge, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - to: [{paths: ['/v1/items:purge']}]\n",
            ],
            vec![
                req(Some(WEB), "POST", "/v1/items:purge", true),
                req(Some(WEB), "POST", "/v1/items%3Apurge", false),
            ],
        ),
        case(
            "port 0: a DENY matches any port, an ALLOW nothing",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: zero, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: shop}]\n  action: Deny\n  rules:\n  - from: [{namespaces: [bank]}]\n    to: [{ports: [0]}]\n",
            ],
            vec![
                req(Some(BANK), "GET", "/", false),
                tcp(Some(BANK), false),
                req(Some(WEB), "GET", "/", true),
            ],
        ),
        case(
            "lower-case methods mean the method",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  action: Deny\n  rules:\n  - to: [{methods: [delete]}]\n",
            ],
            vec![
                req(Some(WEB), "DELETE", "/", false),
                req(Some(WEB), "GET", "/", true),
            ],
        ),
        case(
            "an ALLOW policy without rules denies everything",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n",
            ],
            vec![req(Some(WEB), "GET", "/", false)],
        ),
        case(
            "an empty rule allows everything",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: everything, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules: [{}]\n",
            ],
            vec![req(None, "PUT", "/x", true)],
        ),
        case(
            "a policy on another Service does not apply",
            vec![
                "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-only, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: web}]\n",
            ],
            vec![req(Some(CART), "GET", "/", true)],
        ),
    ];
    let mut total = 0;
    for c in &cases {
        let guards = guards(&c.policies, c.mesh_default, c.ns_label);
        for r in &c.requests {
            total += 1;
            let method = Method::from_bytes(r.method.as_bytes()).unwrap_or(Method::GET);
            let headers = HeaderMap::new();
            let facts = Facts {
                identity: r.id,
                port: r.port,
                http: (r.port != 5432).then_some(HttpFacts {
                    path: r.path,
                    method: &method,
                    headers: &headers,
                }),
            };
            let got = decide(&guards[&r.port].rbac, &facts).result();
            assert_eq!(
                got.is_ok(),
                r.allowed,
                "{}: {:?} {} {} on {} -> {got:?}",
                c.name,
                r.id,
                r.method,
                r.path,
                r.port
            );
        }
    }
    assert!(total >= 30, "the table has {total} cases");
    println!(
        "authorization table: {total} cases in {} policy sets",
        cases.len()
    );
}

#[test]
fn what_a_policy_cannot_say_is_reported_with_its_field() {
    let mut idx = Index::new("cluster.local");
    for doc in world(Some("sometimes")) {
        idx.apply(obj(&doc)).expect("applies");
    }
    for doc in [
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: jwt, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}, {group: '', kind: Service, name: gone}]\n  rules:\n  - from: [{requestPrincipals: ['*'], identities: ['web*']}]\n    to: [{paths: ['/a//b', '/x;y'], methods: ['G E T']}]\n",
        "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limit, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart, sectionName: grpc}]\n  local: {requestsPerSecond: 10}\n",
    ] {
        idx.apply(obj(doc)).expect("applies");
    }
    let model = idx.model();
    let got: Vec<String> = model
        .errors
        .iter()
        .map(|e| format!("{} {}: {}", e.object, e.field, e.reason))
        .collect();
    for want in [
        "Namespace/shop metadata.labels[\"mesh.dev/authz-default\"]: \"sometimes\" is not allow, deny or authenticated; deny applies",
        "AuthorizationPolicy/shop/jwt spec.rules[0].from[0].requestPrincipals: unknown field \"requestPrincipals\": the Allow entry matches nobody",
        "AuthorizationPolicy/shop/jwt spec.rules[0].from[0].identities[0]: \"web*\": not a SPIFFE ID (spiffe://...); the value is left out of the Allow policy",
        "AuthorizationPolicy/shop/jwt spec.rules[0].to[0].paths[0]: \"/a//b\": not in normal form (requests are matched as \"/a/b\"); the value is left out of the Allow policy",
        "AuthorizationPolicy/shop/jwt spec.rules[0].to[0].paths[1]: \"/x;y\": `;` parameters cannot be matched; the value is left out of the Allow policy",
        "AuthorizationPolicy/shop/jwt spec.rules[0].to[0].methods[0]: \"G E T\": not an HTTP method; the value is left out of the Allow policy",
        "AuthorizationPolicy/shop/jwt spec.targetRefs[1]: Service shop/gone not found: the policy targets nothing",
        "RateLimitPolicy/shop/limit spec.targetRefs[0].sectionName: Service shop/cart has no port named \"grpc\": the policy targets nothing",
    ] {
        assert!(
            got.iter().any(|g| g == want),
            "missing {want:?} in {got:#?}"
        );
    }
}

#[test]
fn a_rate_limit_reaches_mesh_proxy_with_its_rates() {
    let guards = guards(
        &[
            "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limits, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  local: {requestsPerSecond: 7, perIdentity: {requestsPerSecond: 250, burst: 3}}\n",
        ],
        AuthzDefault::Allow,
        None,
    );
    let limit = guards[&8080]
        .rate_limit
        .as_ref()
        .expect("a limit on the HTTP port");
    assert_eq!(limit.name, "shop/limits");
    let total = limit.total.expect("total");
    let each = limit.per_identity.expect("per identity");
    assert!((total.per_second - 7.0).abs() < 1e-6, "{total:?}");
    assert_eq!(total.burst, 1, "a tenth of 7, at least 1");
    assert!((each.per_second - 250.0).abs() < 1e-6, "{each:?}");
    assert_eq!(each.burst, 3);
    assert!(
        guards[&5432].rate_limit.is_none(),
        "TCP ports are not limited"
    );
}
