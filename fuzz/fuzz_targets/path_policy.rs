//! Path normalization with the authorization matcher, against an app's reading. Policies are
//! the controller's (a DENY of `/admin` and `/admin/*`, and an ALLOW of GET `/api/*` and
//! `/admin/*` for one caller), translated and converted as mesh-proxy gets them. A request
//! target the proxy accepts goes to the app with its normalized path; a lenient app (see
//! `app_reads`) must never read a denied resource in a path the policy let through, and
//! normalizing twice changes nothing.

#![no_main]

use std::sync::{Arc, LazyLock};

use http::{HeaderMap, Method};
use libfuzzer_sys::fuzz_target;
use mesh_controller::index::Index;
use mesh_controller::objects::parse_doc;
use mesh_proxy::policy::{Facts, HttpFacts, decide};
use mesh_proxy::state::Guard;
use serde::Deserialize;

const WORLD: &str = "
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart}}
spec: {serviceAccountName: cart, containers: [{name: app, ports: [{containerPort: 8080}]}]}
status: {podIP: 10.0.1.1}
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: cart}]
  action: Deny
  rules:
  - to: [{paths: ['/admin', '/admin/*']}]
---
apiVersion: mesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-reads, namespace: shop}
spec:
  targetRefs: [{group: '', kind: Service, name: cart}]
  rules:
  - from: [{serviceAccounts: [web]}]
    to: [{methods: [GET], paths: ['/api/*', '/admin/*']}]
";

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The guard of `cart-0`'s port 8080 over mesh TLS, as mesh-proxy converts it.
static GUARD: LazyLock<Arc<Guard>> = LazyLock::new(|| {
    let mut index = Index::new("cluster.local");
    for doc in serde_norway::Deserializer::from_str(WORLD) {
        let doc = serde_json::Value::deserialize(doc).expect("YAML");
        index
            .apply(parse_doc(doc, "default").expect("an object"))
            .expect("applies");
    }
    let config = mesh_e2e::authz::inbound_listener(&mut index, "shop", "cart-0").expect("converts");
    config
        .chains
        .iter()
        .find(|c| c.terminate_tls && c.port == Some(8080))
        .expect("port 8080 over mesh TLS")
        .filter
        .guard()
        .clone()
});

/// Removes dot segments (RFC 3986, 5.2.4) from a path of `/`-separated segments.
fn resolve(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, s) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *s {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// The path a lenient app serves for `path`: as Tomcat and Spring do, `;` parameters are
/// dropped as written; then every escape is decoded once, `\\` taken as `/`, slashes merged
/// and dot segments resolved.
fn app_reads(path: &str) -> String {
    let bare: Vec<&str> = path
        .split('/')
        .map(|s| s.split(';').next().unwrap_or(""))
        .collect();
    let text = mesh_api::path::percent_decode(&bare.join("/")).replace('\\', "/");
    let segments: Vec<&str> = text.split('/').collect();
    let mut merged = String::new();
    for (i, s) in segments.iter().enumerate() {
        if i > 0 && (!s.is_empty() || i + 1 == segments.len()) {
            merged.push('/');
        }
        merged.push_str(s);
    }
    if !merged.starts_with('/') {
        merged.insert(0, '/');
    }
    resolve(&merged)
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = http::uri::PathAndQuery::try_from(data) else {
        return;
    };
    let Ok(normal) = mesh_api::path::normalize(target.path()) else {
        return;
    };
    assert_eq!(
        mesh_api::path::normalize(&normal).as_deref(),
        Ok(&*normal),
        "normalizing twice"
    );
    let read = app_reads(&normal);
    let denied = read == "/admin" || read.starts_with("/admin/");
    let headers = HeaderMap::new();
    for (identity, method) in [(Some(WEB), Method::GET), (None, Method::POST)] {
        let facts = Facts {
            identity,
            port: 8080,
            http: Some(HttpFacts {
                path: &normal,
                method: &method,
                headers: &headers,
            }),
        };
        let decision = decide(&GUARD.rbac, &facts);
        assert!(
            !(decision.allowed && denied),
            "{:?} reaches the app as {read:?} through the DENY (as {normal:?})",
            target.path()
        );
    }
});
