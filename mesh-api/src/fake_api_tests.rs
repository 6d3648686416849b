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

#[tokio::test]
async fn over_http_a_token_is_its_service_account_and_rbac_decides() {
    use kube::api::WatchEvent;
    let (admin, fake) = FakeApi::start();
    fake.insert(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "read", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]}));
    fake.insert(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "read", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "shop"}]}),
    );
    fake.insert(cm(json!({"x": "1"})));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("http://{}", listener.local_addr().expect("addr"));
    let _serving = fake.serve_http(
        listener,
        BTreeMap::from([(
            "t1".to_owned(),
            "system:serviceaccount:shop:reader".to_owned(),
        )]),
    );
    let client = |token: &str| {
        let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig(&server, token, "default"))
            .expect("kubeconfig");
        async move {
            let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .expect("config");
            kube::Client::try_from(config).expect("client")
        }
    };
    let reader = client("t1").await;
    let cms: Api<ConfigMap> = Api::default_namespaced(reader.clone());
    let got = cms.get("c").await.expect("granted");
    assert_eq!(got.data.unwrap_or_default()["x"], "1");
    let other: Api<ConfigMap> = Api::namespaced(reader, "kube-system");
    match other.list(&Default::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        r => panic!("no grant in kube-system, got {r:?}"),
    }
    let stranger: Api<ConfigMap> = Api::default_namespaced(client("nope").await);
    match stranger.get("c").await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 401, "{e:?}"),
        r => panic!("an unknown token, got {r:?}"),
    }
    // A watch streams over the connection: a change made after it started arrives.
    let rv = got.metadata.resource_version.clone().expect("rv");
    let events = cms.watch(&Default::default(), &rv).await.expect("watch");
    tokio::pin!(events);
    Api::<ConfigMap>::default_namespaced(admin)
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "2"}})),
        )
        .await
        .expect("patched");
    let event = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_stream::StreamExt::next(&mut events),
    )
    .await
    .expect("an event in 5 s");
    match event {
        Some(Ok(WatchEvent::Modified(c))) => assert_eq!(c.data.unwrap_or_default()["x"], "2"),
        e => panic!("expected the change, got {e:?}"),
    }
}

#[tokio::test]
async fn objects_get_uids_as_the_server_gives_them() {
    let (client, fake) = FakeApi::start();
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let uid = |c: &ConfigMap| c.metadata.uid.clone().expect("a uid");
    let sent: ConfigMap = serde_json::from_value(cm(json!({"x": "1"}))).expect("cm");
    let mut with_uid = sent.clone();
    with_uid.metadata.uid = Some("mine".into());
    // A create's answer names the UID the server gave; one the client sent is not taken.
    let made = api
        .create(&PostParams::default(), &with_uid)
        .await
        .expect("created");
    let first = uid(&made);
    assert_ne!(first, "mine");
    // Every change keeps it.
    let patched = api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "2"}})),
        )
        .await
        .expect("merged");
    let applied = api
        .patch(
            "c",
            &PatchParams::apply("a").force(),
            &Patch::Apply(cm(json!({"x": "3"}))),
        )
        .await
        .expect("applied");
    let replaced = api
        .replace("c", &PostParams::default(), &sent)
        .await
        .expect("replaced");
    for c in [
        &patched,
        &applied,
        &replaced,
        &api.get("c").await.expect("read"),
    ] {
        assert_eq!(uid(c), first);
    }
    // Writes that name another UID are refused.
    let err = api
        .replace("c", &PostParams::default(), &with_uid)
        .await
        .expect_err("another uid");
    assert!(err.to_string().contains("Precondition failed"), "{err}");
    let err = api
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"uid": "mine"}})),
        )
        .await
        .expect_err("another uid");
    assert!(err.to_string().contains("field is immutable"), "{err}");
    // Made again under the same name: another object.
    fake.state()
        .delete("/api/v1/namespaces/default/configmaps/c")
        .expect("existed");
    let again = api
        .create(&PostParams::default(), &sent)
        .await
        .expect("created again");
    assert_ne!(uid(&again), first);
}

#[tokio::test]
async fn reviews_name_a_tokens_groups_and_rbac_decides_a_subjects_access() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let (admin, fake) = FakeApi::start();
    fake.state()
        .tokens
        .insert("t".into(), Token::new("ops", "tool", API_AUDIENCE));
    fake.insert(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "read"},
        "rules": [{"apiGroups": ["mesh.dev"], "resources": ["debug"], "verbs": ["get"]}]}),
    );
    fake.insert(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "read", "namespace": "mesh-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "read"},
        "subjects": [{"kind": "Group", "name": "system:serviceaccounts:ops"}]}),
    );
    // A token of the API server's audience, reviewed without audiences.
    let tr = TokenReview {
        spec: TokenReviewSpec {
            token: Some("t".into()),
            audiences: None,
        },
        ..Default::default()
    };
    let got = Api::<TokenReview>::all(admin.clone())
        .create(&PostParams::default(), &tr)
        .await
        .expect("token review");
    let user = got.status.and_then(|s| s.user).expect("authenticated");
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:ops:tool")
    );
    let groups = user.groups.unwrap_or_default();
    assert!(
        groups.contains(&"system:serviceaccounts:ops".to_owned()),
        "{groups:?}"
    );
    let review = |groups: Vec<String>, namespace: &str| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some("system:serviceaccount:ops:tool".into()),
            groups: Some(groups),
            resource_attributes: Some(ResourceAttributes {
                group: Some("mesh.dev".into()),
                resource: Some("debug".into()),
                verb: Some("get".into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let sars = Api::<SubjectAccessReview>::all(admin);
    let decide = |r: SubjectAccessReview| {
        let sars = sars.clone();
        async move {
            sars.create(&PostParams::default(), &r)
                .await
                .expect("review")
                .status
                .expect("status")
        }
    };
    let allowed = decide(review(groups.clone(), "mesh-system")).await;
    assert!(allowed.allowed, "{allowed:?}");
    assert_eq!(
        allowed.reason.as_deref(),
        Some(
            "RBAC: allowed by RoleBinding \"read/mesh-system\" of ClusterRole \"read\" to Group \"system:serviceaccounts:ops\""
        )
    );
    assert!(
        !decide(review(groups, "shop")).await.allowed,
        "bound in mesh-system only"
    );
    assert!(
        !decide(review(Vec::new(), "mesh-system")).await.allowed,
        "without the group"
    );
}

/// Field selectors as kube-apiserver takes them: Secrets by `type`, any kind by name and
/// namespace, and a 400 naming a field the server does not index.
#[tokio::test]
async fn field_selectors_select_what_the_server_indexes_and_refuse_the_rest() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::ListParams;
    let (client, fake) = FakeApi::start();
    for (name, kind) in [("cert", "kubernetes.io/tls"), ("token", "Opaque")] {
        fake.insert(json!({"apiVersion": "v1", "kind": "Secret", "type": kind,
                           "metadata": {"name": name, "namespace": "default"}}));
    }
    let api: Api<Secret> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Secret>| -> Vec<String> {
        l.items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect()
    };
    let tls = api
        .list(&ListParams::default().fields("type=kubernetes.io/tls"))
        .await
        .expect("list by type");
    assert_eq!(names(tls), vec!["cert"]);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=token"))
        .await
        .expect("list by name");
    assert_eq!(names(by_name), vec!["token"]);
    let err = api
        .list(&ListParams::default().fields("data.x=1"))
        .await
        .expect_err("an unindexed field");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 400 && e.message.contains("field label not supported: data.x")),
        "{err}"
    );
    // `type` is a Secret's field only.
    let cms: Api<ConfigMap> = Api::all(client);
    assert!(
        cms.list(&ListParams::default().fields("type=x"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn an_object_written_at_one_version_is_read_and_written_at_another() {
    use futures::StreamExt;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent};
    let (client, fake) = FakeApi::start();
    fake.install_chart_crds();
    let at = |version: &str| {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", version, "ReferenceGrant");
        Api::<DynamicObject>::namespaced_with(
            client.clone(),
            "shop",
            &ApiResource::from_gvk_with_plural(&gvk, "referencegrants"),
        )
    };
    let grant = json!({"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "g", "namespace": "shop"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "infra"}],
                 "to": [{"group": "", "kind": "Service"}]}});
    at("v1beta1")
        .patch("g", &PatchParams::apply("a"), &Patch::Apply(&grant))
        .await
        .expect("created at v1beta1");
    let listed = at("v1")
        .list(&ListParams::default())
        .await
        .expect("list at v1");
    let versions: Vec<String> = listed
        .items
        .iter()
        .map(|o| {
            o.types
                .as_ref()
                .map(|t| t.api_version.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(versions, ["gateway.networking.k8s.io/v1"]);
    let got = at("v1").get("g").await.expect("get at v1");
    assert_eq!(
        got.types.map(|t| t.api_version),
        Some("gateway.networking.k8s.io/v1".to_string())
    );
    let mut events = at("v1")
        .watch(&kube::api::WatchParams::default(), "0")
        .await
        .expect("watch at v1")
        .boxed();
    let Some(Ok(WatchEvent::Added(o))) = events.next().await else {
        panic!("the grant, added");
    };
    assert_eq!(o.metadata.name.as_deref(), Some("g"));
    // An apply at v1 changes the one object, where it is stored.
    let mut at_v1 = grant.clone();
    at_v1["apiVersion"] = json!("gateway.networking.k8s.io/v1");
    at_v1["metadata"]["labels"] = json!({"team": "shop"});
    at("v1")
        .patch("g", &PatchParams::apply("a"), &Patch::Apply(&at_v1))
        .await
        .expect("applied at v1");
    let stored: Vec<String> = fake
        .state()
        .objects
        .keys()
        .filter(|k| k.contains("/referencegrants/"))
        .cloned()
        .collect();
    assert_eq!(
        stored,
        ["/apis/gateway.networking.k8s.io/v1beta1/namespaces/shop/referencegrants/g"]
    );
    // A status write at v1, and a create of the same name: the one object, where it is stored.
    at("v1")
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"seen": true}})),
        )
        .await
        .expect("status at v1");
    let dup = at("v1")
        .create(
            &PostParams::default(),
            &serde_json::from_value(at_v1.clone()).expect("object"),
        )
        .await
        .expect_err("the name is taken at another version");
    assert!(
        matches!(&dup, kube::Error::Api(e) if e.code == 409),
        "{dup}"
    );
    let again = at("v1beta1").get("g").await.expect("get at v1beta1");
    assert_eq!(
        again
            .metadata
            .labels
            .unwrap_or_default()
            .get("team")
            .map(String::as_str),
        Some("shop")
    );
}
