//! The command line as a user meets it: every subcommand's shared flags, and `--kubeconfig`
//! with `--context` reaching the cluster they name.

use std::collections::BTreeMap;

use clap::CommandFactory as _;
use serde_json::json;

use super::{Cli, Context};

/// Every leaf subcommand by its path (`route split`), with its arguments.
fn leaves(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Command)>) {
    let subs: Vec<&clap::Command> = cmd.get_subcommands().collect();
    if subs.is_empty() {
        out.push((path.trim().to_owned(), cmd.clone()));
    }
    // clap's own `help` subcommands are not meshctl's.
    for s in subs.into_iter().filter(|s| s.get_name() != "help") {
        leaves(s, &format!("{path} {}", s.get_name()), out);
    }
}

fn long(cmd: &clap::Command, name: &str) -> Option<clap::Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(name))
        .cloned()
}

/// Commands that print what they found, with `-o table|json|yaml`.
const PRINTING: [&str; 13] = [
    "proxy-status",
    "proxy-config",
    "top",
    "stat",
    "authz",
    "explain",
    "demo",
    "check",
    "route split",
    "route show",
    "route promote",
    "route status",
    "version",
];

/// Commands whose output is something else, and why they have no `-o table|json|yaml`.
const OTHER_OUTPUT: [(&str, &str); 13] = [
    ("dashboard", "prints the URL it opens"),
    (
        "bootstrap envoy",
        "a bootstrap file as Envoy reads it (YAML)",
    ),
    ("bootstrap grpc", "a bootstrap file as gRPC reads it (JSON)"),
    (
        "inject",
        "prints the manifests it read, injected, in their own format",
    ),
    ("uninject", "prints the manifests it read, uninjected"),
    ("install", "-o yaml|json of the objects with --dry-run"),
    ("upgrade", "-o yaml|json of the objects with --dry-run"),
    ("uninstall", "says what it removed"),
    (
        "route rollout",
        "one line; route status -o shows the rollout",
    ),
    ("route pause", "one line; route status -o shows the rollout"),
    (
        "route resume",
        "one line; route status -o shows the rollout",
    ),
    ("route abort", "one line; route status -o shows the rollout"),
    ("demo-service", "a server: it prints its address"),
];

/// Commands that reach the control plane, with `--mesh-namespace`.
const CONTROL_PLANE: [&str; 14] = [
    "dashboard",
    "route split",
    "route promote",
    "proxy-status",
    "top",
    "stat",
    "authz",
    "explain",
    "check",
    "inject",
    "install",
    "upgrade",
    "uninstall",
    "version",
];

#[test]
fn every_subcommand_takes_the_shared_flags() {
    Cli::command().debug_assert();
    let mut cli = Cli::command();
    cli.build();
    let mut all = Vec::new();
    leaves(&cli, "", &mut all);
    let names: Vec<&str> = all.iter().map(|(p, _)| p.as_str()).collect();
    for listed in PRINTING
        .iter()
        .chain(OTHER_OUTPUT.iter().map(|(c, _)| c))
        .chain(CONTROL_PLANE.iter())
    {
        assert!(names.contains(listed), "no command {listed:?} in {names:?}");
    }
    for (path, cmd) in &all {
        let help = cmd.clone().render_long_help().to_string();
        for global in ["--local", "--kubeconfig", "--context"] {
            assert!(help.contains(global), "meshctl {path}: no {global}\n{help}");
        }
        if path == "completion" {
            continue;
        }
        let output = long(cmd, "output");
        let values = |a: &clap::Arg| -> Vec<String> {
            a.get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect()
        };
        if PRINTING.contains(&path.as_str()) {
            let o = output.unwrap_or_else(|| panic!("meshctl {path}: no -o"));
            assert_eq!(o.get_short(), Some('o'), "meshctl {path}");
            assert_eq!(values(&o), ["table", "json", "yaml"], "meshctl {path}");
        } else {
            assert!(
                OTHER_OUTPUT.iter().any(|(c, _)| c == path),
                "meshctl {path}: neither a printing command nor one listed with its reason"
            );
        }
        // --namespace is the workload's (-n); the control plane's is --mesh-namespace.
        if let Some(ns) = long(cmd, "namespace") {
            assert_eq!(
                ns.get_short(),
                Some('n'),
                "meshctl {path}: --namespace without -n"
            );
        }
        assert_eq!(
            long(cmd, "mesh-namespace").is_some(),
            CONTROL_PLANE.contains(&path.as_str()),
            "meshctl {path}: --mesh-namespace"
        );
    }
}

#[test]
fn a_local_mesh_and_a_kubeconfig_context_are_not_both_taken() {
    use clap::Parser as _;
    for argv in [
        ["meshctl", "--local", "d", "version", "--context", "x"],
        ["meshctl", "--context", "x", "version", "--local", "d"],
    ] {
        let cli = Cli::try_parse_from(argv).expect("parses");
        let err = super::run(cli.command, &cli.context).expect_err("both");
        assert!(err.to_string().contains("give one"), "{err}");
    }
}

#[test]
fn completion_scripts_name_the_subcommands() {
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut out = Vec::new();
        super::completion(shell, &mut out);
        let text = String::from_utf8(out).expect("utf-8");
        for word in ["proxy-status", "mesh-namespace", "kubeconfig"] {
            assert!(text.contains(word), "{shell:?}: no {word}");
        }
    }
}

/// Two fake API servers, each holding one Service, behind one kubeconfig file with a context
/// for each (the first current, the second with namespace `shop`): `--context` and the
/// current context each reach their own server and namespace, and an unknown context is
/// named with those the file has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_and_context_reach_the_cluster_they_name() {
    use mesh_api::fake_api::{FakeApi, rbac};
    let mut clusters = Vec::new();
    let mut users = Vec::new();
    let mut contexts = Vec::new();
    for (name, ns, service) in [("one", "default", "alpha"), ("two", "shop", "beta")] {
        let (client, fake) = FakeApi::start();
        crate::cluster::Cluster::new(client)
            .apply(&json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": service, "namespace": ns},
                "spec": {"ports": [{"port": 80}]}}))
            .await
            .expect("a Service");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = format!("http://{}", listener.local_addr().expect("addr"));
        let token = format!("token-{name}");
        drop(fake.serve_http(
            listener,
            BTreeMap::from([(token.clone(), rbac::ADMIN.to_owned())]),
        ));
        clusters.push(json!({"name": name, "cluster": {"server": server}}));
        users.push(json!({"name": name, "user": {"token": token}}));
        contexts.push(json!({"name": format!("ctx-{name}"),
            "context": {"cluster": name, "user": name, "namespace": ns}}));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    let file = json!({"apiVersion": "v1", "kind": "Config", "clusters": clusters,
        "users": users, "contexts": contexts, "current-context": "ctx-one"});
    std::fs::write(&path, serde_norway::to_string(&file).expect("yaml")).expect("write");
    // Whether the cluster holds Service ns/name.
    async fn has(cluster: &crate::cluster::Cluster, name: &str, ns: &str) -> bool {
        let service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}});
        cluster.get(&service).await.expect("get").is_some()
    }
    let cx = |context: Option<&str>| Context {
        local: None,
        kubeconfig: Some(path.clone()),
        context: context.map(str::to_owned),
    };

    let current = cx(None);
    assert_eq!(current.default_namespace().expect("namespace"), "default");
    let one = current.connect().await.expect("the current context");
    assert!(has(&one, "alpha", "default").await);
    assert!(!has(&one, "beta", "shop").await);

    let second = cx(Some("ctx-two"));
    assert_eq!(second.default_namespace().expect("namespace"), "shop");
    let two = second.connect().await.expect("ctx-two");
    assert!(has(&two, "beta", "shop").await);
    assert!(!has(&two, "alpha", "default").await);

    let err = cx(Some("ctx-three"))
        .default_namespace()
        .expect_err("unknown");
    let text = format!("{err:#}");
    assert!(
        text.contains("\"ctx-three\"") && text.contains("ctx-two"),
        "{text}"
    );
    assert!(cx(Some("ctx-three")).connect().await.is_err());
    // A local mesh needs no kubeconfig.
    assert_eq!(
        Context::local("/nowhere").default_namespace().expect("ns"),
        "default"
    );
}
