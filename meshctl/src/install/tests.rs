use serde::Deserialize;
use serde_json::json;

use super::*;
use mesh_api::fake_api::{FakeApi, path_of};

/// A cluster on a new fake API server, polled fast.
fn fake_cluster() -> (Cluster, FakeApi) {
    let (client, fake) = FakeApi::start();
    (
        Cluster::new(client).with_poll(Duration::from_millis(10)),
        fake,
    )
}

fn args() -> InstallArgs {
    InstallArgs {
        values: Vec::new(),
        namespace: "mesh-system".into(),
        skip_gateway_api_crds: false,
        dry_run: false,
        output: Format::Yaml,
        timeout: Duration::from_secs(10),
    }
}

/// `meshctl uninstall` with its defaults; what it deleted.
async fn uninstall_all(cluster: &Cluster) -> Vec<String> {
    let args = UninstallArgs {
        namespace: "mesh-system".into(),
        keep_crds: false,
    };
    uninstall(cluster, &args, &mut Vec::new())
        .await
        .expect("uninstall")
}

fn expected() -> Vec<Value> {
    manifests::objects(
        &Values::defaults().expect("defaults"),
        "mesh-system",
        Include {
            gateway_api_crds: true,
        },
    )
    .expect("objects")
}

async fn install(cluster: &Cluster) -> (anyhow::Result<Report>, String) {
    let mut out = Vec::new();
    // Statuses as lines of the output, as without a terminal, also when the tests run in one.
    let r = apply_with(cluster, &args(), false, &mut out, Some(Progress::hidden())).await;
    (r, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn install_applies_crds_waits_until_established_then_the_rest_in_order() {
    let (cluster, fake) = fake_cluster();
    let (report, out) = install(&cluster).await;
    let report = report.expect("install");
    let want = expected();
    assert_eq!(report.applied.len(), want.len(), "{out}");
    assert!(
        report.applied.iter().all(|(_, a)| *a == Applied::Created),
        "{out}"
    );

    let log = fake.state().log.clone();
    // Every write is a server-side apply by meshctl, in the manifests' order.
    let patches: Vec<_> = log.iter().filter(|l| l.method == "PATCH").collect();
    let paths: Vec<String> = want.iter().map(path_of).collect();
    assert_eq!(
        patches.iter().map(|l| l.path.clone()).collect::<Vec<_>>(),
        paths
    );
    for p in &patches {
        assert_eq!(p.content_type, "application/apply-patch+yaml", "{p:?}");
        assert!(p.query.contains("fieldManager=meshctl"), "{p:?}");
        assert!(p.query.contains("force=true"), "{p:?}");
    }
    assert!(log.iter().all(|l| l.method == "GET" || l.method == "PATCH"));
    // Nothing but CRDs is applied before every CRD reads Established.
    let first_other = log
        .iter()
        .position(|l| l.method == "PATCH" && !l.path.contains("customresourcedefinitions"))
        .expect("a non-CRD apply");
    let crds: Vec<&String> = paths
        .iter()
        .filter(|p| p.contains("customresourcedefinitions"))
        .collect();
    assert!(crds.len() >= 8, "{crds:?}");
    for crd in crds {
        let established_read = log
            .iter()
            .enumerate()
            .filter(|(_, l)| l.method == "GET" && l.path == *crd)
            .map(|(i, _)| i)
            .max()
            .expect("the CRD was read");
        assert!(
            established_read < first_other,
            "{crd} read after the rest was applied"
        );
        let state = fake.state();
        let live = &state.objects[crd.as_str()];
        assert!(crd_established(live).0, "{crd}");
    }
    // The rollouts were waited for.
    assert!(
        out.contains("Deployment/mesh-system/mesh-controller rolled out"),
        "{out}"
    );
    // And the injector's caBundle, which the controller sets.
    assert!(
        out.contains("MutatingWebhookConfiguration/mesh-sidecar-injector: caBundle set"),
        "{out}"
    );
    let total = want.len();
    assert!(out.contains(&format!("{total}/{total} ")), "{out}");
    assert!(
        out.contains("waiting for Deployment/mesh-system/mesh-ca: 0/1 available"),
        "{out}"
    );
    assert!(out.contains("created"), "{out}");
}

#[tokio::test]
async fn a_second_install_changes_nothing() {
    let (cluster, fake) = fake_cluster();
    install(&cluster).await.0.expect("first install");
    let before = fake.state().objects.clone();
    let (report, out) = install(&cluster).await;
    let report = report.expect("second install");
    assert!(!report.changed(), "{out}");
    assert!(out.contains("no change"), "{out}");
    assert_eq!(fake.state().objects, before);
}

#[tokio::test]
async fn uninstall_deletes_everything_install_made() {
    let (cluster, fake) = fake_cluster();
    // Someone else's object must survive.
    let other = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}});
    fake.insert(other.clone());
    install(&cluster).await.0.expect("install");
    // The controller's copies of the CA root go too; a user's ConfigMap stays.
    let root_copy = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "mesh-ca-root", "namespace": "shop", "labels": {"app.kubernetes.io/part-of": "mesh"}}});
    let users = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "mesh-ca-root", "namespace": "legacy"}});
    fake.insert(root_copy);
    fake.insert(users.clone());
    let made = expected().len() + 1;
    let deleted = uninstall_all(&cluster).await;
    assert_eq!(deleted.len(), made);
    let state = fake.state();
    let mut left: Vec<String> = vec![path_of(&other), path_of(&users)];
    left.sort();
    assert_eq!(
        state.objects.keys().cloned().collect::<Vec<_>>(),
        left,
        "left behind"
    );
    // Deletion runs in reverse: the root copies and the webhook go first, CRDs last.
    let deletes: Vec<&str> = state
        .log
        .iter()
        .filter(|l| l.method == "DELETE")
        .map(|l| l.path.as_str())
        .collect();
    assert!(
        deletes[0].contains("/namespaces/shop/configmaps/mesh-ca-root"),
        "{deletes:?}"
    );
    assert!(
        deletes[1].contains("mutatingwebhookconfigurations"),
        "{deletes:?}"
    );
    assert!(
        deletes
            .last()
            .is_some_and(|p| p.contains("customresourcedefinitions"))
    );
}

#[tokio::test]
async fn one_foreign_gateway_api_crd_keeps_the_whole_bundle_out() {
    let (cluster, fake) = fake_cluster();
    // Someone installed HTTPRoute alone (not GatewayClass, the first of the bundle).
    let mut theirs = expected()
        .into_iter()
        .find(|o| {
            is_gateway_api_crd(o)
                && o.pointer("/metadata/name").and_then(Value::as_str)
                    == Some("httproutes.gateway.networking.k8s.io")
        })
        .expect("the HTTPRoute CRD");
    theirs["metadata"]["labels"] = json!({});
    fake.insert(theirs.clone());
    let (report, out) = install(&cluster).await;
    report.expect("install");
    let writes = fake.writes();
    assert!(
        !writes
            .iter()
            .any(|w| w.path.contains("gateway.networking.k8s.io")),
        "{out}"
    );
}

#[tokio::test]
async fn gateway_api_crds_installed_by_someone_else_are_left_alone() {
    let (cluster, fake) = fake_cluster();
    let theirs: Vec<Value> = expected()
        .into_iter()
        .filter(is_gateway_api_crd)
        .map(|mut crd| {
            crd["metadata"]["labels"] = json!({});
            crd["metadata"]["annotations"]["gateway.networking.k8s.io/bundle-version"] =
                json!("v1.4.0");
            crd
        })
        .collect();
    for crd in &theirs {
        fake.insert(crd.clone());
    }
    let (report, out) = install(&cluster).await;
    let report = report.expect("install");
    assert_eq!(report.kept.len(), theirs.len(), "{out}");
    assert!(out.contains("Gateway API CRDs found (v1.4.0)"), "{out}");
    let writes = fake.writes();
    assert!(
        !writes
            .iter()
            .any(|w| w.path.contains("gateway.networking.k8s.io")),
        "{writes:?}"
    );
    // Uninstall keeps them too.
    uninstall_all(&cluster).await;
    let state = fake.state();
    for crd in &theirs {
        assert!(state.objects.contains_key(&path_of(crd)), "{}", key(crd));
    }
}

fn controller_at(version: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "mesh-controller", "namespace": "mesh-system",
        "labels": {"app.kubernetes.io/version": version}}, "spec": {}})
}

#[tokio::test]
async fn install_over_another_version_points_to_upgrade_and_writes_nothing() {
    let (cluster, fake) = fake_cluster();
    fake.insert(controller_at("0.0.3"));
    let e = install(&cluster)
        .await
        .0
        .expect_err("another version")
        .to_string();
    assert!(e.contains("0.0.3") && e.contains("meshctl upgrade"), "{e}");
    assert!(fake.writes().is_empty());
}

#[tokio::test]
async fn upgrade_refuses_a_skew_and_writes_nothing() {
    let (cluster, fake) = fake_cluster();
    fake.insert(controller_at("9.0.0"));
    let mut out = Vec::new();
    let e = apply(&cluster, &args(), true, &mut out)
        .await
        .expect_err("a downgrade")
        .to_string();
    assert!(
        e.contains("refusing to upgrade") && e.contains("downgrades"),
        "{e}"
    );
    assert!(fake.writes().is_empty());

    let (cluster, fake) = fake_cluster();
    let e = apply(&cluster, &args(), true, &mut out)
        .await
        .expect_err("nothing installed")
        .to_string();
    assert!(e.contains("not installed"), "{e}");
    assert!(fake.writes().is_empty());
}

/// An install whose waits cannot end (`stall` says what never comes), with a short timeout:
/// its error, and the fake.
async fn stalled_install(stall: impl FnOnce(&mut mesh_api::fake_api::State)) -> (String, FakeApi) {
    let (cluster, fake) = fake_cluster();
    stall(&mut fake.state());
    let mut a = args();
    a.timeout = Duration::from_millis(300);
    let e = apply(&cluster, &a, false, &mut Vec::new())
        .await
        .expect_err("the install cannot finish");
    (format!("{e:#}"), fake)
}

#[tokio::test]
async fn a_crd_that_never_establishes_fails_the_install_by_name() {
    let (e, fake) = stalled_install(|s| s.established_after = u32::MAX).await;
    assert!(
        e.contains("CustomResourceDefinition/") && e.contains("not ready"),
        "{e}"
    );
    // Nothing but CRDs was applied.
    assert!(
        fake.writes()
            .iter()
            .all(|w| w.path.contains("customresourcedefinitions"))
    );
}

#[test]
fn upgrade_skew_rules() {
    assert!(upgrade_allowed("0.1.0", "0.1.3").is_ok());
    assert!(upgrade_allowed("0.1.2", "0.2.0").is_ok());
    let e = upgrade_allowed("0.1.0", "0.3.0").expect_err("skips a minor");
    assert!(e.contains("0.2.x first"), "{e}");
    assert!(upgrade_allowed("1.4.0", "2.0.0").is_err());
    let e = upgrade_allowed("0.2.0", "0.1.0").expect_err("downgrade");
    assert!(e.contains("downgrades"), "{e}");
    let e = upgrade_allowed("main", "0.1.0").expect_err("not a version");
    assert!(e.contains("\"main\""), "{e}");
}

#[test]
fn dry_run_prints_every_object() {
    let mut out = Vec::new();
    let mut a = args();
    a.dry_run = true;
    dry_run(&a, &mut out).expect("dry run");
    let text = String::from_utf8(out).expect("utf-8");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .collect();
    assert_eq!(docs, expected());
    a.skip_gateway_api_crds = true;
    a.output = Format::Json;
    let mut out = Vec::new();
    dry_run(&a, &mut out).expect("dry run");
    let list: Value = serde_json::from_slice(&out).expect("json");
    let items = list["items"].as_array().expect("items");
    assert!(!items.iter().any(is_gateway_api_crd));
    assert_eq!(
        items.len(),
        expected().len() - mesh_api::crds::gateway_api_crds().len()
    );
}

#[tokio::test]
async fn an_injector_without_a_ca_bundle_fails_the_install_with_a_hint() {
    let (e, _) = stalled_install(|s| s.ca_bundle_after = u32::MAX).await;
    assert!(
        e.contains("caBundle") && e.contains("meshctl check") && e.contains("0/2 webhooks"),
        "{e}"
    );
}

#[test]
fn another_control_plane_namespace_is_refused_with_the_reason() {
    let mut a = args();
    a.namespace = "mesh".into();
    let e = dry_run(&a, &mut Vec::new()).expect_err("another namespace");
    assert!(e.to_string().contains("proxies expect"), "{e}");
}

/// `check --pre` asks the API server about every permission install and upgrade use: each
/// call they make is one of the (verb, group, resource, namespace) it reviews.
#[tokio::test]
async fn check_pre_reviews_every_permission_install_and_upgrade_use() {
    let (cluster, fake) = fake_cluster();
    install(&cluster).await.0.expect("install");
    apply(&cluster, &args(), true, &mut Vec::new())
        .await
        .expect("upgrade");
    let reviewed = crate::cmd::check_cluster::needed_permissions("mesh-system").expect("list");
    let log = fake.state().log.clone();
    let mut calls = 0;
    for l in &log {
        let Some(a) = &l.attributes else {
            continue;
        };
        calls += 1;
        // A Namespace is cluster-scoped: check reviews it at the cluster scope, which covers
        // the request's own namespace.
        let ns = if a.resource == "namespaces" {
            String::new()
        } else {
            a.namespace.clone()
        };
        let p = (a.verb.clone(), a.group.clone(), a.resource.clone(), ns);
        assert!(
            reviewed.contains(&p),
            "{} {}: {p:?} is not among what check --pre reviews",
            l.method,
            l.path
        );
    }
    assert!(calls > 20, "{calls} calls");
}

/// With `networkPolicy.enabled`, the control plane's pods take connections only on the ports
/// they serve, from whom each serves; without it there is no NetworkPolicy. They apply.
#[tokio::test]
async fn network_policies_open_each_port_to_whom_it_serves() {
    assert!(!expected().iter().any(|o| o["kind"] == "NetworkPolicy"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("values.yaml");
    std::fs::write(
        &file,
        "networkPolicy: {enabled: true, monitoringNamespace: prom}\n",
    )
    .expect("values");
    let v = Values::from_files(&[file.as_path()]).expect("values");
    let mut a = args();
    a.values = vec![file];
    let objects = manifests::objects(
        &v,
        "mesh-system",
        Include {
            gateway_api_crds: false,
        },
    )
    .expect("objects");
    let policy = |name: &str| -> Value {
        objects
            .iter()
            .find(|o| o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no NetworkPolicy {name}"))
    };
    // (port, who): "anyone", "meshed", "monitoring", or "controller".
    let rules = |p: &Value| -> Vec<(u64, Vec<&'static str>)> {
        let ingress = p["spec"]["ingress"].as_array().expect("ingress").clone();
        ingress
            .iter()
            .map(|r| {
                let port = r["ports"][0]["port"].as_u64().expect("port");
                let who = match r["from"].as_array() {
                    None => vec!["anyone"],
                    Some(from) => from
                        .iter()
                        .map(|f| {
                            if f["podSelector"]["matchLabels"]["mesh.dev/proxy"] == "true"
                                && f["namespaceSelector"] == json!({})
                            {
                                "meshed"
                            } else if f["namespaceSelector"]["matchLabels"]
                                ["kubernetes.io/metadata.name"]
                                == "prom"
                            {
                                "monitoring"
                            } else if f["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                                == "mesh-controller"
                                && f.get("namespaceSelector").is_none()
                            {
                                "controller"
                            } else {
                                "?"
                            }
                        })
                        .collect(),
                };
                (port, who)
            })
            .collect()
    };
    assert_eq!(
        rules(&policy("mesh-controller")),
        vec![
            (15017, vec!["anyone"]),
            (15010, vec!["meshed"]),
            (15014, vec!["monitoring"]),
        ]
    );
    assert_eq!(
        rules(&policy("mesh-ca")),
        vec![
            (15012, vec!["meshed", "controller"]),
            (15013, vec!["monitoring"]),
        ]
    );
    for name in ["mesh-controller", "mesh-ca"] {
        assert_eq!(
            policy(name)["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            name
        );
    }
    let (cluster, fake) = fake_cluster();
    apply(&cluster, &a, false, &mut Vec::new())
        .await
        .expect("install");
    let path = |name: &str| {
        format!("/apis/networking.k8s.io/v1/namespaces/mesh-system/networkpolicies/{name}")
    };
    for name in ["mesh-controller", "mesh-ca"] {
        assert_eq!(
            fake.state().objects.get(&path(name)).map(|o| &o["spec"]),
            Some(&policy(name)["spec"]),
            "{name}"
        );
    }
    // Turned off again: an upgrade takes them out, as helm upgrade does.
    let mut out = Vec::new();
    apply(&cluster, &args(), true, &mut out)
        .await
        .expect("upgrade");
    let out = String::from_utf8_lossy(&out);
    for name in ["mesh-controller", "mesh-ca"] {
        assert!(!fake.state().objects.contains_key(&path(name)), "{name}");
        assert!(
            out.contains(&format!("NetworkPolicy/mesh-system/{name} deleted")),
            "{out}"
        );
    }
}

/// A monitor needs the Prometheus Operator's CRD: without it install refuses, naming the
/// value, before writing anything; with it the monitors and dashboards are applied; turned off
/// again, the next install deletes them, as `helm upgrade` would.
#[tokio::test]
async fn monitoring_objects_need_their_crds_and_go_once_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("values.yaml");
    std::fs::write(
        &file,
        "monitoring: {serviceMonitor: {enabled: true}, podMonitor: {enabled: true}, dashboards: {enabled: true}}\n",
    )
    .expect("values");
    let mut on = args();
    on.values = vec![file];
    let (cluster, fake) = fake_cluster();
    let err = apply(&cluster, &on, false, &mut Vec::new())
        .await
        .expect_err("no Prometheus Operator");
    assert!(
        err.to_string()
            .contains("monitoring.serviceMonitor.enabled is true, but the cluster has no CRD servicemonitors.monitoring.coreos.com"),
        "{err}"
    );
    assert!(fake.state().objects.is_empty(), "nothing written");

    for kind in ["servicemonitors", "podmonitors"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../e2e/testdata/prometheus-operator/monitoring.coreos.com_{kind}.yaml"
        ));
        let crd: Value =
            serde_norway::from_str(&std::fs::read_to_string(path).expect("CRD")).expect("YAML");
        cluster.apply(&crd).await.expect("the operator's CRD");
    }
    apply(&cluster, &on, false, &mut Vec::new())
        .await
        .expect("install");
    let paths = [
        "/apis/monitoring.coreos.com/v1/namespaces/mesh-system/servicemonitors/mesh-control-plane",
        "/apis/monitoring.coreos.com/v1/namespaces/mesh-system/podmonitors/mesh-proxies",
        "/api/v1/namespaces/mesh-system/configmaps/mesh-overview-dashboard",
        "/api/v1/namespaces/mesh-system/configmaps/mesh-service-dashboard",
        "/api/v1/namespaces/mesh-system/configmaps/mesh-workload-dashboard",
    ];
    for p in paths {
        assert!(fake.state().objects.contains_key(p), "{p}");
    }
    let mut out = Vec::new();
    apply(&cluster, &args(), false, &mut out)
        .await
        .expect("install without monitoring");
    let out = String::from_utf8_lossy(&out);
    for p in paths {
        assert!(!fake.state().objects.contains_key(p), "{p}");
    }
    assert!(
        out.contains(
            "ServiceMonitor/mesh-system/mesh-control-plane deleted (monitoring.serviceMonitor.enabled is false)"
        ),
        "{out}"
    );
}
