//! `meshctl route rollout|status|pause|resume|abort` against a local mesh directory, and once
//! with the local mesh's own controller driving what meshctl wrote.

use std::path::Path;
use std::time::Instant;

use mesh_api::rollout::{Decision, Measured, Rollout};

use super::*;
use crate::cmd::route::tests::example;
use crate::cmd::route::{Route, run};
use crate::mesh::LocalDir;

fn target() -> Target {
    Target {
        service: "reviews".into(),
        namespace: Some("default".into()),
        port: None,
    }
}

fn args(from: Option<&str>, to: &str) -> RolloutArgs {
    RolloutArgs {
        target: target(),
        to: to.into(),
        from: from.map(str::to_string),
        steps: vec![5, 25, 50, 100],
        header: None,
        interval: "30s".into(),
        min_requests: 100,
        success_rate: Some(99.5),
        p99: Some("300ms".into()),
    }
}

fn cmd(dir: &Path, r: Route) -> anyhow::Result<String> {
    let mut out = Vec::new();
    run(r, &LocalDir::new(dir)?, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Runs `r`, which must be refused with an error containing `says`.
fn refused(dir: &Path, r: Route, says: &str) {
    let err = cmd(dir, r).expect_err("refused");
    assert!(err.to_string().contains(says), "{err}");
}

fn written(dir: &Path) -> Rollout {
    let (_, _, v) = mesh_api::route_doc::find_doc(dir, "Rollout", "default", "reviews")
        .expect("read")
        .expect("a Rollout");
    serde_norway::from_value(v).expect("a valid Rollout")
}

#[test]
fn a_rollout_is_written_for_the_controller_with_the_gates_asked_for() {
    let dir = example();
    // The example's route sends to v1 and v2: which is stable must be said.
    refused(
        dir.path(),
        Route::Rollout(args(None, "reviews-v2")),
        "sends to reviews-v1=90, reviews-v2=10; say which backend is stable with --from",
    );
    refused(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v9")),
        "--to: Service default/reviews-v9 not found",
    );
    let mut bad = args(Some("reviews-v1"), "reviews-v2");
    bad.steps = vec![5, 250];
    refused(dir.path(), Route::Rollout(bad), "--steps: 250 is over 100");
    assert!(
        mesh_api::route_doc::find_doc(dir.path(), "Rollout", "default", "reviews")
            .expect("read")
            .is_none(),
        "a refusal writes nothing"
    );

    let mut a = args(Some("reviews-v1"), "reviews-v2");
    a.header = Some("x-canary=yes".into());
    let out = cmd(dir.path(), Route::Rollout(a)).expect("written");
    assert!(out.contains("reviews-v1 -> reviews-v2 in 5 steps"), "{out}");
    let r = written(dir.path());
    assert_eq!(r.spec.target_ref.name, "reviews");
    assert_eq!(r.spec.stable, "reviews-v1");
    assert_eq!(
        r.spec.steps.iter().map(|s| s.weight).collect::<Vec<_>>(),
        [0, 5, 25, 50, 100]
    );
    assert_eq!(r.spec.steps[0].headers[0].name, "x-canary");
    assert_eq!(r.spec.gates.min_success_rate, Some(99.5));
    assert_eq!(r.spec.gates.max_p99.as_deref(), Some("300ms"));
    assert!(
        r.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(mesh_api::consts::labels::RELEASE)
    );

    // While the controller says it runs, a second one is refused.
    let mut st = RolloutStatus {
        phase: RolloutPhase::Progressing,
        step: 2,
        candidate: "reviews-v2".into(),
        ..Default::default()
    };
    write_status(dir.path(), &st);
    refused(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v2")),
        "is Progressing at step 3 (to reviews-v2); end it first with meshctl route abort reviews",
    );
    // Ended: a new one replaces it in the same file.
    st.phase = RolloutPhase::RolledBack;
    write_status(dir.path(), &st);
    cmd(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v2")),
    )
    .expect("again");
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "yaml"))
        .collect();
    assert_eq!(files.len(), 3, "services, route, one rollout");

    // A hand-written rollout of the same route that has not ended: refused too.
    std::fs::write(
        dir.path().join("other.yaml"),
        "apiVersion: mesh.dev/v1alpha1\nkind: Rollout\nmetadata: {name: other, namespace: default}\nspec:\n  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: reviews}\n  stable: reviews-v1\n  candidate: reviews-v2\n  steps: [{weight: 50}]\n",
    )
    .expect("write");
    refused(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v2")),
        "Rollout default/other moves HTTPRoute default/reviews too",
    );
}

fn write_status(dir: &Path, st: &RolloutStatus) {
    let path = mesh_controller::rollout::store::local_status_path(dir, "default", "reviews");
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, serde_json::to_string(st).expect("json")).expect("write");
}

#[test]
fn without_a_route_the_stable_backend_must_be_named_and_the_route_is_written() {
    let dir = example();
    std::fs::remove_file(dir.path().join("route.yaml")).expect("rm");
    refused(
        dir.path(),
        Route::Rollout(args(None, "reviews-v2")),
        "say which backend is stable with --from",
    );
    cmd(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v2")),
    )
    .expect("written");
    let (_, _, route) =
        mesh_api::route_doc::find_doc(dir.path(), "HTTPRoute", "default", "reviews-split")
            .expect("read")
            .expect("a route");
    assert_eq!(
        weights(&rules(&route)[0]),
        [("reviews-v1".to_string(), 100)]
    );
    assert_eq!(written(dir.path()).spec.target_ref.name, "reviews-split");
}

#[test]
fn pause_resume_and_abort_edit_the_rollout_and_status_shows_it() {
    let dir = example();
    refused(
        dir.path(),
        Route::Pause(target()),
        "no Rollout of Service default/reviews",
    );
    cmd(
        dir.path(),
        Route::Rollout(args(Some("reviews-v1"), "reviews-v2")),
    )
    .expect("written");

    let out = cmd(
        dir.path(),
        Route::Status(StatusArgs {
            target: target(),
            watch: false,
            output: Output::Table,
        }),
    )
    .expect("status");
    assert!(out.contains("not started"), "{out}");

    cmd(dir.path(), Route::Pause(target())).expect("pause");
    assert!(written(dir.path()).spec.paused);
    cmd(dir.path(), Route::Resume(target())).expect("resume");
    let r = written(dir.path());
    assert!(!r.spec.paused);
    assert!(
        r.metadata
            .annotations
            .unwrap_or_default()
            .contains_key(mesh_api::consts::labels::RESUME)
    );
    cmd(dir.path(), Route::Abort(target())).expect("abort");
    assert!(written(dir.path()).spec.abort);

    let measured = |requests, rate| Measured {
        requests,
        success_rate: Some(rate),
        p99_ms: Some(4.2),
    };
    let st = RolloutStatus {
        phase: RolloutPhase::Progressing,
        step: 1,
        stable: "reviews-v1".into(),
        candidate: "reviews-v2".into(),
        current: Some(Decision {
            step: 1,
            action: "Measuring".into(),
            reason: "12 s of 30 s".into(),
            candidate: measured(120, 100.0),
            stable: measured(360, 99.9),
            ..Default::default()
        }),
        decisions: vec![Decision {
            at: "2026-12-05T17:00:00Z".into(),
            step: 0,
            action: "Advanced".into(),
            reason: "step 1 passed".into(),
            candidate: measured(100, 100.0),
            ..Default::default()
        }],
        ..Default::default()
    };
    write_status(dir.path(), &st);
    let out = cmd(
        dir.path(),
        Route::Status(StatusArgs {
            target: target(),
            watch: false,
            output: Output::Table,
        }),
    )
    .expect("status");
    assert!(out.contains("Progressing  step 2 of 4"), "{out}");
    assert!(
        out.contains("[######------------------] 1 of 4 steps passed"),
        "{out}"
    );
    assert!(out.contains("measuring step 2: 12 s of 30 s"), "{out}");
    assert!(out.contains("17:00:00  step 1  Advanced"), "{out}");
    let json = cmd(
        dir.path(),
        Route::Status(StatusArgs {
            target: target(),
            watch: false,
            output: Output::Json,
        }),
    )
    .expect("json");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(v["status"]["current"]["candidate"]["requests"], 120);
    assert_eq!(v["spec"]["candidate"], "reviews-v2");

    // Watching one that ended prints it once and returns.
    write_status(
        dir.path(),
        &RolloutStatus {
            phase: RolloutPhase::Promoted,
            ..st
        },
    );
    let out = cmd(
        dir.path(),
        Route::Status(StatusArgs {
            target: target(),
            watch: true,
            output: Output::Table,
        }),
    )
    .expect("status");
    assert!(
        out.contains("Promoted  step 2 of 4  [########################] 4 of 4"),
        "{out}"
    );
}

/// What meshctl writes, the local mesh's controller drives: the route gets the first step's
/// weights and the status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_controller_drives_what_meshctl_wrote() {
    let dir = example();
    let mut config = mesh_controller::config::Config::local(dir.path());
    config.admin_addr = "127.0.0.1:0".parse().expect("addr");
    let _controller = mesh_controller::run::Controller::start(config)
        .await
        .expect("controller");
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        cmd(&d, Route::Rollout(args(Some("reviews-v1"), "reviews-v2")))
    })
    .await
    .expect("join")
    .expect("written");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st =
            mesh_controller::rollout::store::read_local_status(dir.path(), "default", "reviews")
                .expect("readable");
        let (_, _, route) =
            mesh_api::route_doc::find_doc(dir.path(), "HTTPRoute", "default", "reviews")
                .expect("read")
                .expect("route");
        let w = weights(&rules(&route)[1]);
        if st
            .as_ref()
            .is_some_and(|s| s.phase == RolloutPhase::Progressing)
            && w == [
                ("reviews-v1".to_string(), 95),
                ("reviews-v2".to_string(), 5),
            ]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the controller did not start the rollout: {st:?}, weights {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
