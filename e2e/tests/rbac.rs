//! The chart's RBAC against what the binaries call. `meshctl install` puts the chart into the
//! fake API server as a cluster admin; then mesh-ca and mesh-controller run their real startup
//! against it, each through a client that is its service account and is authorized by the
//! stored Roles, ClusterRoles and bindings, as a real API server authorizes it. Every request
//! is recorded with its RBAC attributes.
//!
//! The test fails when a call is forbidden (a grant is missing), when a rule grants a verb,
//! resource or name no call used (a grant is too wide), or when any one rule could be removed
//! without forbidding a call. The injector webhook runs in the controller and calls no API.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use mesh_api::fake_api::rbac::{Attributes, Grant, Subject, grants};
use mesh_api::fake_api::{FakeApi, Logged};
use mesh_ca::run::{CaConfig, Running};
use mesh_controller::run::Controller;
use serde_json::{Value, json};

const NS: &str = "mesh-system";
const CONTROLLER_TOKEN: &str = "controller-token";

async fn install(admin: &kube::Client) -> anyhow::Result<()> {
    let cluster =
        meshctl::cluster::Cluster::new(admin.clone()).with_poll(Duration::from_millis(10));
    let args = meshctl::install::InstallArgs {
        values: Vec::new(),
        namespace: NS.into(),
        skip_gateway_api_crds: false,
        dry_run: false,
        output: meshctl::install::Format::Yaml,
        timeout: Duration::from_secs(10),
    };
    meshctl::install::apply(&cluster, &args, false, &mut Vec::new()).await?;
    Ok(())
}

/// What the mesh's workloads leave in a cluster: two namespaces with sidecars (one with a stale
/// copy of the CA's root), a Service with an HTTPRoute and a GRPCRoute, and a Rollout of each
/// route to a candidate Service.
fn workloads(fake: &FakeApi) {
    for (ns, stale) in [("shop", true), ("web", false)] {
        fake.insert(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"mesh.dev/inject": "enabled"}}}));
        if stale {
            fake.insert(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "mesh-ca-root", "namespace": ns},
                "data": {"ca.crt": "an old root"}}));
        }
    }
    fake.insert(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 9080}]}}));
    fake.insert(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews-v2", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.11", "ports": [{"name": "http", "port": 9080}]}}));
    fake.insert(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": "mesh", "generation": 1},
        "spec": {"controllerName": "mesh.dev/mesh-controller"}}),
    );
    fake.insert(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "edge", "namespace": "shop", "generation": 1},
        "spec": {"gatewayClassName": "mesh", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}));
    for kind in ["HTTPRoute", "GRPCRoute"] {
        fake.insert(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": "reviews", "namespace": "shop", "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
                     "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}}));
        fake.insert(json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": format!("reviews-{}", kind.to_lowercase()), "namespace": "shop", "generation": 1},
            "spec": {"targetRef": {"group": "gateway.networking.k8s.io", "kind": kind, "name": "reviews"},
                     "stable": "reviews", "candidate": "reviews-v2", "steps": [{"weight": 10}]}}));
    }
}

fn ca_config(dir: &std::path::Path) -> CaConfig {
    let mut c = CaConfig::local(dir);
    c.local_tokens = false;
    c.kubernetes = true;
    c.secret = Some("mesh-ca".into());
    c.namespace = NS.into();
    c
}

/// The requests one service account made.
fn made_by(log: &[Logged], sa: &str) -> Vec<Attributes> {
    let user = format!("system:serviceaccount:{NS}:{sa}");
    log.iter()
        .filter(|l| l.user == user)
        .filter_map(|l| l.attributes.clone())
        .collect()
}

/// Each `(group, resource, verb, name)` a rule grants, `*` for any name.
fn elements(g: &Grant) -> Vec<(String, String, String, String)> {
    let list = |k: &str| -> Vec<String> {
        g.rule[k]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let names = match list("resourceNames") {
        n if n.is_empty() => vec!["*".to_owned()],
        n => n,
    };
    let mut out = Vec::new();
    for group in list("apiGroups") {
        for resource in list("resources") {
            for verb in list("verbs") {
                for name in &names {
                    out.push((group.clone(), resource.clone(), verb.clone(), name.clone()));
                }
            }
        }
    }
    out
}

/// What the service account's grants allow of its calls, and what they grant unused.
fn audit(objects: &[&Value], sa: &str, calls: &[Attributes]) -> Vec<String> {
    let grants = grants(objects, &Subject::service_account(NS, sa));
    let mut problems = Vec::new();
    for a in calls {
        if !grants.iter().any(|g| g.allows(a)) {
            problems.push(format!("{sa}: no rule allows {a:?}"));
        }
    }
    for g in &grants {
        for (group, resource, verb, name) in elements(g) {
            let used = calls.iter().any(|a| {
                a.group == group
                    && a.resource == resource
                    && a.verb == verb
                    && (name == "*" || a.name == name)
                    && g.allows(a)
            });
            if !used {
                problems.push(format!(
                    "{sa}: {} rule {} grants {verb} {group:?}/{resource} {name:?}, which no call used",
                    g.role, g.index
                ));
            }
        }
        // Without this rule some call is forbidden: no rule is redundant.
        let others: Vec<&Grant> = grants.iter().filter(|o| *o != g).collect();
        if calls.iter().all(|a| others.iter().any(|o| o.allows(a))) {
            problems.push(format!(
                "{sa}: {} rule {} can be removed and every call is still allowed",
                g.role, g.index
            ));
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_allows_every_call_and_grants_nothing_unused() -> anyhow::Result<()> {
    let (admin, fake) = FakeApi::start();
    install(&admin).await?;
    workloads(&fake);
    fake.state().tokens.insert(
        CONTROLLER_TOKEN.into(),
        mesh_api::fake_api::Token::new(NS, "mesh-controller", "mesh-ca"),
    );

    // mesh-ca on a fresh cluster: it creates its Secret and root ConfigMap. A second start
    // finds them, and updates a root ConfigMap someone changed.
    let ca_dir = tempfile::tempdir()?;
    let ca_client = fake.client_as(NS, "mesh-ca");
    drop(Running::start_with(ca_config(ca_dir.path()), Some(ca_client.clone())).await?);
    {
        let mut s = fake.state();
        let root = s
            .objects
            .get_mut(&format!("/api/v1/namespaces/{NS}/configmaps/mesh-ca-root"))
            .context("mesh-ca published no root")?;
        root["data"] = json!({"ca.crt": "edited"});
    }
    let ca_dir = tempfile::tempdir()?;
    let ca = Running::start_with(ca_config(ca_dir.path()), Some(ca_client)).await?;

    // mesh-controller as its service account, proving itself to mesh-ca with a Kubernetes
    // token (TokenReview, as mesh-ca's service account).
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("token");
    std::fs::write(&token, CONTROLLER_TOKEN)?;
    let mut config = mesh_controller::config::Config::local(dir.path());
    config.config_dir = None;
    config.ca_addr = Some(ca.addr.to_string());
    config.ca_root = Some(ca_dir.path().join("ca.crt"));
    config.ca_token_file = token;
    config.webhook_addr = Some("127.0.0.1:0".parse()?);
    config.pod_name = Some("mesh-controller-0".into());
    let controller =
        Controller::start_with(config, Some(fake.client_as(NS, "mesh-controller"))).await?;
    let identity = controller.identity.clone().context("identity")?;
    mesh_e2e::identity::wait_for_svid(&identity, "the controller").await?;
    let root = std::fs::read_to_string(ca_dir.path().join("ca.crt"))?;
    // A caller of its debug API with a token: a TokenReview and a SubjectAccessReview.
    let reader = reader_token(&fake, "alice", true);
    let (code, body) = debug_get(controller.admin_addr, "/debug/proxies", Some(&reader)).await?;
    anyhow::ensure!(code == 200, "a reader's token: {code} {body}");

    // Everything the controller does in a cluster: both routes' status, a Gateway's status and
    // objects, the Lease taken and renewed, the root in each injected namespace, the
    // injector's caBundle, both rollouts started (their routes' weights, their status, an
    // Event each).
    mesh_e2e::eventually(Duration::from_secs(30), "the controller's writes", || async {
        let s = fake.state();
        let o = |p: &str| s.objects.get(p).cloned().unwrap_or_default();
        let statuses = ["httproutes", "grpcroutes"].iter().all(|k| {
            o(&format!(
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/{k}/reviews"
            ))
            .pointer("/status/parents/0")
            .is_some()
        });
        let gateways = o("/apis/gateway.networking.k8s.io/v1/gatewayclasses/mesh")
            .pointer("/status/conditions/0")
            .is_some()
            && o("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/edge")
                .pointer("/status/listeners/0")
                .is_some()
            // Its proxies' Deployment, Service and ServiceAccount, applied before its status.
            && ["apis/apps/v1/namespaces/shop/deployments", "api/v1/namespaces/shop/services", "api/v1/namespaces/shop/serviceaccounts"]
                .iter()
                .all(|c| s.objects.contains_key(&format!("/{c}/edge-gateway")));
        let roots = ["shop", "web"].iter().all(|ns| {
            o(&format!("/api/v1/namespaces/{ns}/configmaps/mesh-ca-root"))
                .pointer("/data/ca.crt")
                .and_then(Value::as_str)
                == Some(root.as_str())
        });
        let bundle = o("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector")
            .pointer("/webhooks/0/clientConfig/caBundle")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let renewed = s.log.iter().any(|l| {
            l.method == "PUT" && l.path.ends_with("/leases/mesh-controller")
        });
        let root_b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(root.as_bytes())
        };
        let rollouts = ["httproute", "grpcroute"].iter().all(|k| {
            o(&format!("/apis/mesh.dev/v1alpha1/namespaces/shop/rollouts/reviews-{k}"))
                .pointer("/status/phase")
                .and_then(Value::as_str)
                == Some("Progressing")
        }) && ["httproutes", "grpcroutes"].iter().all(|k| {
            o(&format!(
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/{k}/reviews"
            ))
            .pointer("/spec/rules/0/backendRefs/1/weight")
                == Some(&json!(10))
        }) && s.objects.keys().filter(|p| p.starts_with("/api/v1/namespaces/shop/events/")).count() >= 2;
        (statuses
            && gateways
            && roots
            && renewed
            && rollouts
            && bundle.as_deref() == Some(root_b64.as_str()))
        .then_some(())
    })
    .await?;
    drop(controller);
    drop(ca);

    let log = fake.state().log.clone();
    let forbidden: Vec<String> = log
        .iter()
        .filter(|l| l.forbidden)
        .map(|l| format!("{} {} {} ({})", l.user, l.method, l.path, l.query))
        .collect();
    assert!(
        forbidden.is_empty(),
        "forbidden calls:\n{}",
        forbidden.join("\n")
    );
    let objects: Vec<Value> = fake.state().objects.values().cloned().collect();
    let objects: Vec<&Value> = objects.iter().collect();
    let mut problems = Vec::new();
    let mut counted = Vec::new();
    for sa in ["mesh-controller", "mesh-ca"] {
        let calls = made_by(&log, sa);
        anyhow::ensure!(!calls.is_empty(), "{sa} made no call");
        let kinds: BTreeSet<(String, String, String)> = calls
            .iter()
            .map(|a| (a.verb.clone(), a.group.clone(), a.resource.clone()))
            .collect();
        counted.push(format!(
            "{sa} {} calls of {} kinds, {} rules",
            calls.len(),
            kinds.len(),
            grants(&objects, &Subject::service_account(NS, sa)).len()
        ));
        problems.extend(audit(&objects, sa, &calls));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    mesh_e2e::figure(&format!(
        "rbac: every call allowed, every rule needed: {}",
        counted.join("; ")
    ));
    Ok(())
}

/// A token of user `user` (not a service account) for the controller's audience; with
/// `bound`, a RoleBinding in the control plane's namespace gives it the chart's reader role.
fn reader_token(fake: &FakeApi, user: &str, bound: bool) -> String {
    let token = format!("{user}-token");
    fake.state().tokens.insert(
        token.clone(),
        mesh_api::fake_api::Token {
            user: user.into(),
            audiences: vec![mesh_api::consts::identity::CONTROLLER_AUDIENCE.into()],
            ..Default::default()
        },
    );
    if bound {
        let role = mesh_api::consts::identity::READER_ROLE;
        fake.insert(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{role}-{user}"), "namespace": NS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}));
    }
    token
}

/// `GET path` of a controller's admin server, with `token` as a bearer token.
async fn debug_get(
    admin: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    mesh_e2e::http_get_with_token(admin, path, token)
        .await
        .with_context(|| format!("GET http://{admin}{path}: no answer"))
}

/// The chart's reader role is what it takes to read the mesh: a user bound to it reads the
/// controller's debug API with a token and runs `meshctl stat`, `authz` and `check` as itself
/// (a port-forward to the controller's pod); a user without it is refused both ways, in words
/// that name the role. A caller on the controller's loopback without a token (a port-forward)
/// is let in; a made-up token is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_role_lets_its_users_read_the_mesh_and_no_one_else() -> anyhow::Result<()> {
    let (admin, fake) = FakeApi::start();
    install(&admin).await?;
    workloads(&fake);
    let dir = tempfile::tempdir()?;
    let mut config = mesh_controller::config::Config::local(dir.path());
    config.config_dir = None;
    let controller =
        Controller::start_with(config, Some(fake.client_as(NS, "mesh-controller"))).await?;
    let addr = controller.admin_addr;
    // The controller's pod, ready, whose port-forward reaches its admin server.
    fake.insert(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "mesh-controller-0", "namespace": NS,
            "labels": {"app.kubernetes.io/name": "mesh-controller"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}}));
    fake.state().port_forwarder = Some(mesh_api::fake_api::PortForwarder(std::sync::Arc::new(
        move |_pod, port| match port {
            mesh_api::consts::ports::CONTROLLER_ADMIN => std::net::TcpStream::connect(addr),
            _ => Err(std::io::ErrorKind::ConnectionRefused.into()),
        },
    )));
    let alice = reader_token(&fake, "alice", true);
    let bob = reader_token(&fake, "bob", false);
    let stat = "/debug/stat?service=shop/reviews";
    mesh_e2e::eventually(Duration::from_secs(20), "reviews in the model", || async {
        let (code, _) = debug_get(addr, stat, None).await.ok()?;
        (code == 200).then_some(())
    })
    .await?;

    let (code, body) = debug_get(addr, stat, Some(&alice)).await?;
    assert_eq!(code, 200, "{body}");
    let (code, body) = debug_get(addr, stat, Some(&bob)).await?;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("\"bob\"") && body.contains("mesh-reader"),
        "{body}"
    );
    let (code, body) = debug_get(addr, "/graph", Some("made-up")).await?;
    assert_eq!(code, 401, "{body}");

    let as_user = |user: &'static str| {
        let fake = fake.clone();
        async move {
            let client = fake.http_client(user).await?;
            anyhow::Ok(meshctl::cluster::Cluster::new(client).with_poll(Duration::from_millis(10)))
        }
    };
    let alice = as_user("alice").await?;
    let ctl = meshctl::cmd::status::cluster_controller(&alice, NS).await?;
    let stat = meshctl::cmd::stat::fetch_stat(&ctl, "shop", "reviews").await?;
    assert_eq!(stat["service"], "shop/reviews", "{stat}");
    let authz =
        meshctl::cmd::stat::fetch_service(&ctl, "/debug/authz", "policies", "shop", "reviews")
            .await?;
    assert!(authz.is_object(), "{authz}");
    let args = meshctl::cmd::check::CheckArgs {
        controller: None,
        ca_admin: None,
        pre: false,
        proxy: false,
        namespace: NS.into(),
        output: meshctl::cmd::status::Output::Table,
    };
    let forbidden: Vec<String> = fake
        .state()
        .log
        .iter()
        .filter(|l| l.user == "alice" && l.forbidden)
        .map(|l| format!("{} {}", l.method, l.path))
        .collect();
    assert!(forbidden.is_empty(), "{forbidden:?}");
    // check also reads the install's cluster-wide objects (CRDs, the webhook): an admin's
    // credentials, and the same port-forward to the controller.
    let admin_user = as_user(mesh_api::fake_api::rbac::ADMIN).await?;
    let checks = meshctl::cmd::check_cluster::run_cluster_checks(&args, &admin_user).await?;
    let control_plane: Vec<&str> = checks
        .iter()
        .filter(|c| c.category == "control plane")
        .map(|c| c.message.as_str())
        .collect();
    assert!(
        control_plane.iter().any(|m| m.contains(
            "controller is ready at pod mesh-system/mesh-controller-0:15014 (port-forward)"
        )),
        "{control_plane:?}"
    );

    let bob = as_user("bob").await?;
    let e = meshctl::cmd::status::cluster_controller(&bob, NS)
        .await
        .expect_err("bob may not list the control plane's pods");
    let e = format!("{e:#}");
    assert!(
        e.contains("mesh-reader") && e.contains("-n mesh-system") && e.contains("pods"),
        "{e}"
    );
    // Bob may list pods there, but not port-forward.
    fake.insert(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pods", "namespace": NS},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]}),
    );
    fake.insert(
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "bob-pods", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pods"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"}]}),
    );
    let ctl = meshctl::cmd::status::cluster_controller(&bob, NS).await?;
    let e = meshctl::cmd::stat::fetch_stat(&ctl, "shop", "reviews")
        .await
        .expect_err("bob may not port-forward");
    let e = format!("{e:#}");
    assert!(
        e.contains("pods/portforward") && e.contains("mesh-reader"),
        "{e}"
    );
    Ok(())
}

/// The audit itself, on a small role of its own: a call no rule allows, a grant no call uses,
/// and each rule removed in turn, are all reported. (On the chart's roles, the test above
/// fails for any rule that could go, so removing one from the chart fails it.)
#[test]
fn removing_any_rule_forbids_a_call() {
    let role = json!({"kind": "ClusterRole", "metadata": {"name": "r"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["l"],
         "verbs": ["get"]}]});
    let binding = json!({"kind": "ClusterRoleBinding", "metadata": {"name": "r"},
        "roleRef": {"kind": "ClusterRole", "name": "r"},
        "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": NS}]});
    let call = |verb: &str, group: &str, resource: &str, name: &str| Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        namespace: String::new(),
        name: name.into(),
    };
    let calls = vec![
        call("list", "", "pods", ""),
        call("watch", "", "pods", ""),
        call("get", "coordination.k8s.io", "leases", "l"),
    ];
    assert!(audit(&[&role, &binding], "sa", &calls).is_empty());
    // A call the rules do not cover, and a grant no call uses.
    let mut more = calls.clone();
    more.push(call("create", "", "pods", ""));
    let p = audit(&[&role, &binding], "sa", &more);
    assert!(p.iter().any(|m| m.contains("no rule allows")), "{p:?}");
    let p = audit(&[&role, &binding], "sa", &calls[1..]);
    assert!(p.iter().any(|m| m.contains("grants list")), "{p:?}");
    // Each rule removed in turn: a call is forbidden.
    for i in 0..2 {
        let mut fewer = role.clone();
        fewer["rules"].as_array_mut().expect("rules").remove(i);
        let p = audit(&[&fewer, &binding], "sa", &calls);
        assert!(
            p.iter().any(|m| m.contains("no rule allows")),
            "rule {i}: {p:?}"
        );
    }
}
