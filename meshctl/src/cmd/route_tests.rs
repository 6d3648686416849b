//! `meshctl route` against a local mesh directory: the example's canary edited in place, a new
//! route when there is none, and every refusal leaving the directory as it was.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::mesh::LocalDir;
use serde_norway::Value;

/// The example's manifests (`examples/reviews`: Services and the canary route) in a fresh
/// directory.
pub(crate) fn example() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/reviews");
    for f in ["services.yaml", "route.yaml"] {
        std::fs::copy(src.join(f), dir.path().join(f)).expect("copy");
    }
    dir
}

/// Every file's bytes, to see that nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect()
}

fn target(service: &str) -> Target {
    Target {
        service: service.into(),
        namespace: Some("default".into()),
        port: None,
    }
}

fn to(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn run_cmd(dir: &Path, route: Route) -> anyhow::Result<String> {
    let mut out = Vec::new();
    run(route, &LocalDir::new(dir)?, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn a_split_edits_the_catch_all_rule_of_the_existing_route() {
    let dir = example();
    let out = run_cmd(
        dir.path(),
        Route::Split(SplitArgs {
            target: target("reviews"),
            to: to(&["reviews-v1=50", "reviews-v2=50"]),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Table,
        }),
    )
    .expect("split");
    assert!(out.contains("HTTPRoute default/reviews rule 2"), "{out}");
    assert!(
        out.contains("reviews-v1") && out.contains("90 %") && out.contains("50 %"),
        "{out}"
    );
    // Still one route, its header rule untouched, the split rule changed.
    let mesh = LocalDir::new(dir.path()).expect("dir");
    let routes = mesh.routes().expect("routes");
    assert_eq!(routes.len(), 1);
    let rs = rules(&routes[0].value);
    assert_eq!(weights(&rs[0]), [("reviews-v2".to_string(), 1)]);
    assert_eq!(
        weights(&rs[1]),
        [
            ("reviews-v1".to_string(), 50),
            ("reviews-v2".to_string(), 50)
        ]
    );
    assert_eq!(
        rs[1]
            .get("timeouts")
            .and_then(|t| t.get("request"))
            .and_then(Value::as_str),
        Some("5s"),
        "fields meshctl does not know survive"
    );

    // Promote: all to v2, v1 kept at 0.
    let out = run_cmd(
        dir.path(),
        Route::Promote(PromoteArgs {
            target: target("reviews"),
            backend: "reviews-v2".into(),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Table,
        }),
    )
    .expect("promote");
    assert!(out.contains("100 %"), "{out}");
    let routes = mesh.routes().expect("routes");
    assert_eq!(
        weights(&rules(&routes[0].value)[1]),
        [("reviews-v2".to_string(), 1), ("reviews-v1".to_string(), 0)]
    );
    let shown = run_cmd(
        dir.path(),
        Route::Show(ShowArgs {
            target: target("reviews"),
            output: crate::output::Output::Table,
        }),
    )
    .expect("show");
    assert!(
        shown.contains("rule 1 (some requests, by match): reviews-v2 100 %"),
        "{shown}"
    );
    assert!(
        shown.contains("rule 2: reviews-v2 100 %, reviews-v1 0 %"),
        "{shown}"
    );
    // The same as data: -o json and -o yaml parse, and say what the table says.
    for output in [crate::output::Output::Json, crate::output::Output::Yaml] {
        let text = run_cmd(
            dir.path(),
            Route::Show(ShowArgs {
                target: target("reviews"),
                output,
            }),
        )
        .expect("show");
        let v: serde_json::Value = serde_norway::from_str(&text).expect("parses");
        assert_eq!(v["service"], "default/reviews", "{text}");
        assert_eq!(v["rules"][1]["allRequests"], true, "{text}");
        assert_eq!(
            v["rules"][1]["backends"][0]["backend"], "reviews-v2",
            "{text}"
        );
        assert_eq!(v["rules"][1]["backends"][0]["share"], 100.0, "{text}");
        assert_eq!(v["rules"][0]["allRequests"], false, "{text}");
    }
    let text = run_cmd(
        dir.path(),
        Route::Split(SplitArgs {
            target: target("reviews"),
            to: to(&["reviews-v1=75", "reviews-v2=25"]),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Json,
        }),
    )
    .expect("split");
    let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["rule"], 2, "{text}");
    let backend = |name: &str| {
        v["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["backend"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(backend("reviews-v2")["before"]["share"], 100.0, "{text}");
    assert_eq!(backend("reviews-v2")["after"]["weight"], 25, "{text}");
    assert_eq!(backend("reviews-v1")["after"]["share"], 75.0, "{text}");
    // A dry run checks everything, shows the route's change as a diff and writes nothing.
    let values = || -> Vec<_> {
        mesh.routes()
            .expect("routes")
            .into_iter()
            .map(|r| r.value)
            .collect()
    };
    let before = values();
    let text = run_cmd(
        dir.path(),
        Route::Split(SplitArgs {
            target: target("reviews"),
            to: to(&["reviews-v1=10", "reviews-v2=90"]),
            dry_run: true,
            wait: Default::default(),
            output: crate::output::Output::Table,
        }),
    )
    .expect("dry run");
    assert!(text.contains("dry run: nothing written"), "{text}");
    assert!(
        text.contains("-      weight: 75") && text.contains("+      weight: 10"),
        "{text}"
    );
    assert_eq!(values(), before, "nothing written");
}

#[test]
fn without_a_route_split_writes_a_new_one_attached_to_the_service() {
    let dir = example();
    std::fs::remove_file(dir.path().join("route.yaml")).expect("rm");
    let out = run_cmd(
        dir.path(),
        Route::Split(SplitArgs {
            target: target("reviews"),
            to: to(&["reviews-v1=90", "reviews-v2=10"]),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Table,
        }),
    )
    .expect("split");
    assert!(out.contains("meshctl-default-reviews-split.yaml"), "{out}");
    let mesh = LocalDir::new(dir.path()).expect("dir");
    let routes = mesh.routes().expect("routes");
    assert_eq!(routes.len(), 1);
    assert!(attaches(&routes[0], "default", "reviews", 9080));
    assert_eq!(
        weights(&rules(&routes[0].value)[0]),
        [
            ("reviews-v1".to_string(), 90),
            ("reviews-v2".to_string(), 10)
        ]
    );
}

#[test]
fn refusals_name_the_input_and_leave_the_directory_untouched() {
    let dir = example();
    let before = snapshot(dir.path());
    let split = |args: &[&str], port: Option<u16>| {
        run_cmd(
            dir.path(),
            Route::Split(SplitArgs {
                target: Target {
                    port,
                    ..target("reviews")
                },
                to: to(args),
                dry_run: false,
                wait: Default::default(),
                output: crate::output::Output::Table,
            }),
        )
        .expect_err("refused")
        .to_string()
    };
    let cases = [
        (
            split(&["reviews-v9=10", "reviews-v1=90"], None),
            "Service default/reviews-v9 not found",
        ),
        (split(&["reviews-v1=100"], Some(1234)), "has no port 1234"),
        (split(&["reviews-v1=-5"], None), "weight -5 is negative"),
        (split(&["reviews-v1=99999999999"], None), "is over 1000000"),
        (split(&["reviews-v1=1.5"], None), "not a whole number"),
        (
            split(&["reviews-v1=0", "reviews-v2=0"], None),
            "every weight is 0",
        ),
        (
            split(&["reviews-v1=1", "reviews-v1=2"], None),
            "listed twice",
        ),
        (split(&["reviews-v1"], None), "expected <backend>=<weight>"),
    ];
    for (err, want) in &cases {
        assert!(err.contains(want), "{err:?} should say {want:?}");
    }
    let err = run_cmd(
        dir.path(),
        Route::Split(SplitArgs {
            target: target("nope"),
            to: to(&["reviews-v1=1"]),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Table,
        }),
    )
    .expect_err("unknown service")
    .to_string();
    assert!(err.contains("Service default/nope not found"), "{err}");
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused command changed the directory"
    );
}

/// `meshctl route` against a cluster (the fake API server): the route is read from and
/// written to the API with server-side apply; a refusal writes nothing.
mod cluster {
    use mesh_api::fake_api::FakeApi;
    use serde_json::json;

    use super::super::*;
    use crate::mesh::Cluster;

    const ROUTE: &str =
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/reviews-split";

    fn target() -> Target {
        Target {
            service: "reviews".into(),
            namespace: Some("shop".into()),
            port: None,
        }
    }

    fn run_in_place(r: Route, mesh: &Cluster) -> anyhow::Result<String> {
        let mut out = Vec::new();
        tokio::task::block_in_place(|| run(r, mesh, &mut out))?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn split_to(to: &[&str]) -> Route {
        Route::Split(SplitArgs {
            target: target(),
            to: to.iter().map(|s| s.to_string()).collect(),
            dry_run: false,
            wait: Default::default(),
            output: crate::output::Output::Table,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_and_promote_apply_the_route_and_a_missing_backend_writes_nothing() {
        let (client, fake) = FakeApi::start();
        fake.install_chart_crds();
        for name in ["reviews", "reviews-v1", "reviews-v2"] {
            fake.insert(json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"ports": [{"name": "http", "port": 9080}]}}));
        }
        let mesh = Cluster(crate::cluster::Cluster::new(client));

        let e = run_in_place(split_to(&["reviews-v1=90", "reviews-v3=10"]), &mesh)
            .expect_err("a missing backend");
        assert!(format!("{e:#}").contains("reviews-v3"), "{e:#}");
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());

        let out =
            run_in_place(split_to(&["reviews-v1=90", "reviews-v2=10"]), &mesh).expect("split");
        assert!(
            out.contains("HTTPRoute shop/reviews-split (created, server-side apply as meshctl)"),
            "{out}"
        );
        let writes = fake.writes();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0].path, ROUTE);
        assert_eq!(writes[0].content_type, "application/apply-patch+yaml");
        assert!(writes[0].query.contains("fieldManager=meshctl"));
        // Stored as the API server keeps it: each backend's group and kind defaulted.
        let stored = fake.state().objects[ROUTE].clone();
        assert_eq!(
            stored["spec"]["rules"][0]["backendRefs"],
            json!([{"group": "", "kind": "Service", "name": "reviews-v1", "port": 9080, "weight": 90},
                   {"group": "", "kind": "Service", "name": "reviews-v2", "port": 9080, "weight": 10}])
        );

        // Promote reads the route back from the cluster and edits it in place.
        let out = run_in_place(
            Route::Promote(PromoteArgs {
                target: target(),
                backend: "reviews-v2".into(),
                dry_run: false,
                wait: Default::default(),
                output: crate::output::Output::Table,
            }),
            &mesh,
        )
        .expect("promote");
        assert!(out.contains("configured"), "{out}");
        let stored = fake.state().objects[ROUTE].clone();
        assert_eq!(
            stored["spec"]["rules"][0]["backendRefs"],
            json!([{"group": "", "kind": "Service", "name": "reviews-v2", "port": 9080, "weight": 1},
                   {"group": "", "kind": "Service", "name": "reviews-v1", "port": 9080, "weight": 0}])
        );
        // Show lists it.
        let out = run_in_place(
            Route::Show(ShowArgs {
                target: target(),
                output: crate::output::Output::Table,
            }),
            &mesh,
        )
        .expect("show");
        assert!(
            out.contains("reviews-split") && out.contains("reviews-v2"),
            "{out}"
        );
    }
}
