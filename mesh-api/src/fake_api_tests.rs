use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use super::*;

fn cm(data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "c", "namespace": "default"}, "data": data})
}

#[tokio::test]
async fn server_side_apply_keeps_field_ownership_as_the_server_does() {
    let (client, fake) = FakeApi::start();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let apply = |m: &'static str| PatchParams::apply(m);
    api.patch(
        "c",
        &apply("a"),
        &Patch::Apply(cm(json!({"x": "1", "y": "1"}))),
    )
    .await
    .expect("a creates");
    // Another manager changing a's field: a conflict naming both, unless forced.
    let err = api
        .patch("c", &apply("b"), &Patch::Apply(cm(json!({"x": "2"}))))
        .await
        .expect_err("b changes a's x");
    let said = err.to_string();
    assert!(
        said.contains("Apply failed with 1 conflict: conflict with \"a\": .data.x"),
        "{said}"
    );
    // The same value is shared, not a conflict.
    api.patch("c", &apply("b"), &Patch::Apply(cm(json!({"y": "1"}))))
        .await
        .expect("b agrees on y");
    api.patch(
        "c",
        &apply("b").force(),
        &Patch::Apply(cm(json!({"x": "2", "y": "1"}))),
    )
    .await
    .expect("forced");
    // Now b owns x: a applying its old value conflicts with b.
    let err = api
        .patch(
            "c",
            &apply("a"),
            &Patch::Apply(cm(json!({"x": "1", "y": "1"}))),
        )
        .await
        .expect_err("a's x is b's now");
    assert!(
        err.to_string().contains("conflict with \"b\": .data.x"),
        "{err}"
    );
    // a stops applying y, which b shares: y stays. b stops too: y goes.
    api.patch("c", &apply("a"), &Patch::Apply(cm(json!({}))))
        .await
        .expect("a applies nothing");
    let data = api.get("c").await.expect("get").data.unwrap_or_default();
    assert_eq!(data.get("y").map(String::as_str), Some("1"));
    api.patch("c", &apply("b"), &Patch::Apply(cm(json!({"x": "2"}))))
        .await
        .expect("b drops y");
    let data = api.get("c").await.expect("get").data.unwrap_or_default();
    assert_eq!(data.get("y"), None, "{data:?}");
    assert_eq!(data.get("x").map(String::as_str), Some("2"));

    // An update by another writer takes the fields it changes.
    let mut current = api.get("c").await.expect("get");
    current.data = Some([("x".to_string(), "3".to_string())].into());
    api.replace(
        "c",
        &PostParams {
            field_manager: Some("editor".into()),
            ..Default::default()
        },
        &current,
    )
    .await
    .expect("update");
    let err = api
        .patch("c", &apply("b"), &Patch::Apply(cm(json!({"x": "2"}))))
        .await
        .expect_err("the editor owns x");
    assert!(
        err.to_string().contains("conflict with \"editor\""),
        "{err}"
    );
    // Stale and server-owned metadata are refused.
    let mut stale = cm(json!({"x": "3"}));
    stale["metadata"]["resourceVersion"] = json!("1");
    let err = api
        .patch("c", &apply("b"), &Patch::Apply(stale))
        .await
        .expect_err("stale resourceVersion");
    assert!(err.to_string().contains("has been modified"), "{err}");
    let mut managed = cm(json!({}));
    managed["metadata"]["managedFields"] = json!([{"manager": "x"}]);
    let err = api
        .patch("c", &apply("b"), &Patch::Apply(managed))
        .await
        .expect_err("managedFields");
    assert!(
        err.to_string().contains("managedFields must be nil"),
        "{err}"
    );
    assert_eq!(fake.state().objects.len(), 1);
}
