//! Every manifest the docs and examples show, written through the fake API server with the
//! chart's CRDs installed, as `kubectl apply` would write it to a cluster: none may lose a field
//! to pruning or be refused. A field of the Gateway API experimental channel (HTTPRoute `retry`)
//! in a doc would fail here: the chart installs the standard channel.

use std::path::{Path, PathBuf};

use mesh_api::fake_api::{FakeApi, path_of};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// `(where, document)` for each Kubernetes object in the YAML files and the ```yaml blocks of
/// Markdown files under `docs/` and `examples/`.
fn manifests() -> Vec<(String, Value)> {
    let mut paths = Vec::new();
    files(&root().join("docs"), &mut paths);
    files(&root().join("examples"), &mut paths);
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let shown = p.strip_prefix(root()).unwrap_or(&p).display().to_string();
        let blocks: Vec<(usize, String)> = match p.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => vec![(1, text)],
            Some("md") => {
                let mut blocks = Vec::new();
                let mut current: Option<(usize, String)> = None;
                for (i, line) in text.lines().enumerate() {
                    match &mut current {
                        None if line.trim_start().starts_with("```yaml") => {
                            current = Some((i + 2, String::new()));
                        }
                        Some(_) if line.trim_start().starts_with("```") => {
                            blocks.extend(current.take());
                        }
                        Some((_, b)) => {
                            b.push_str(line);
                            b.push('\n');
                        }
                        None => {}
                    }
                }
                blocks
            }
            _ => Vec::new(),
        };
        for (line, block) in blocks {
            for (i, doc) in serde_norway::Deserializer::from_str(&block).enumerate() {
                let v: Value = serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{shown}:{line} document {i}: {e}"));
                if v.get("apiVersion").is_some() && v.get("kind").is_some() {
                    out.push((format!("{shown}:{line} document {i}"), v));
                }
            }
        }
    }
    out
}

/// Creates `obj` through the client, as `kubectl create` does: a POST to its collection.
async fn create(client: &kube::Client, obj: &Value) -> Result<Value, kube::Error> {
    let path = path_of(obj);
    let collection = path.rsplit_once('/').map_or(path.as_str(), |(c, _)| c);
    let req = http::Request::post(collection)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(obj).unwrap_or_default())
        .expect("a request");
    client.request::<Value>(req).await
}

#[tokio::test]
async fn every_manifest_of_the_docs_and_examples_keeps_all_its_fields() {
    let all = manifests();
    assert!(
        all.len() >= 5,
        "found only {} manifests under docs/ and examples/",
        all.len()
    );
    let mut problems = Vec::new();
    for (at, obj) in &all {
        // Each in a cluster of its own: the docs show the same Service more than once.
        let (client, fake) = FakeApi::start();
        fake.install_chart_crds();
        if let Err(e) = create(&client, obj).await {
            problems.push(format!("{at}: refused: {e}"));
        }
        for w in &fake.state().warnings {
            problems.push(format!("{at}: {w}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "{} manifests of docs/ and examples/ written through the fake API server: 0 pruned, 0 refused",
        all.len()
    );
}

#[tokio::test]
async fn a_misspelt_field_is_pruned_with_a_warning_and_strict_refuses_it() {
    let (client, fake) = FakeApi::start();
    fake.install_chart_crds();
    let route: Value = serde_norway::from_str(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080, wieght: 90}]
    retry: {attempts: 3}
",
    )
    .expect("yaml");
    let stored = create(&client, &route).await.expect("created");
    assert_eq!(
        fake.state().warnings,
        vec![
            "unknown field \"spec.rules[0].backendRefs[0].wieght\"".to_string(),
            "unknown field \"spec.rules[0].retry\"".to_string()
        ]
    );
    assert!(stored.pointer("/spec/rules/0/retry").is_none(), "{stored}");
    assert_eq!(
        stored.pointer("/spec/rules/0/backendRefs/0/name"),
        Some(&Value::from("reviews-v1"))
    );

    // fieldValidation=Strict, as kubectl sends by default: refused, naming the field.
    let mut strict = route.clone();
    strict["metadata"]["name"] = "strict".into();
    let req = http::Request::post(
        "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes?fieldValidation=Strict",
    )
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(serde_json::to_vec(&strict).expect("json"))
    .expect("a request");
    let err = client
        .request::<Value>(req)
        .await
        .expect_err("strict refuses unknown fields");
    assert!(
        err.to_string()
            .contains("unknown field \"spec.rules[0].retry\""),
        "{err}"
    );

    // A wrong type is refused whatever the field validation.
    let mut bad = route;
    bad["metadata"]["name"] = "bad".into();
    bad["spec"]["rules"][0]["backendRefs"][0]["port"] = "http".into();
    let err = create(&client, &bad).await.expect_err("a string port");
    assert!(
        err.to_string()
            .contains("spec.rules[0].backendRefs[0].port: Invalid value: \"http\""),
        "{err}"
    );

    // A custom kind whose CRD is not installed is not served.
    let (client, _) = FakeApi::start();
    let err = create(&client, &bad).await.expect_err("no CRD");
    assert!(err.to_string().contains("could not find"), "{err}");
}

/// The Gateway API's CEL rules are evaluated as the API server evaluates them: a route they
/// forbid is refused (422) at the field, with the rule's message; the same route made right is
/// stored.
#[tokio::test]
async fn a_route_the_gateway_apis_cel_rules_forbid_is_refused_with_their_message() {
    let (client, fake) = FakeApi::start();
    fake.install_chart_crds();
    let mut route: Value = serde_norway::from_str(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
    filters:
    - type: RequestHeaderModifier
      urlRewrite: {hostname: elsewhere.example}
",
    )
    .expect("yaml");
    let err = create(&client, &route).await.expect_err("CEL refuses it");
    let said = err.to_string();
    assert!(
        said.contains("spec.rules[0].filters[0]: Invalid value: \"object\": filter.urlRewrite must be nil if the filter.type is not URLRewrite"),
        "{said}"
    );
    match &err {
        kube::Error::Api(e) => assert_eq!(e.code, 422, "{e:?}"),
        e => panic!("not the API server's refusal: {e:?}"),
    }
    route["spec"]["rules"][0]["filters"][0] = serde_json::json!({"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x", "value": "1"}]}});
    create(&client, &route).await.expect("the rules hold");
}
