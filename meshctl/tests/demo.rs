//! `meshctl demo --json`, the binary as a user runs it: every step's measured shares match the
//! weights the controller set, the controller promotes v2 and rolls v3 back by its gates (whose
//! failures show only in its first step), and every step's peers were verified over mTLS.

use std::process::Command;
use std::time::Instant;

/// `meshctl demo --json --step 3s --rate 200` with `extra` arguments: its report, and how long
/// it took.
fn run_demo(extra: &[&str]) -> (serde_json::Value, std::time::Duration) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--json", "--step", "3s", "--rate", "200"])
        .args(extra)
        .env("MESH_LOG", "error")
        .output()
        .expect("meshctl runs");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    (report, took)
}

#[test]
fn the_demo_walks_the_release_and_measures_it() {
    let (report, took) = run_demo(&["--gateway", "127.0.0.1:0"]);
    assert_eq!(report["entry"], "client");
    assert_eq!(
        report["client_identity"],
        "spiffe://cluster.local/ns/default/sa/productpage"
    );
    let steps = walked_the_release(&report);
    mesh_stat_agrees(&steps);
    // How long it took is reported, not asserted (timings belong to benchmarks).
    eprintln!("demo took {took:?}");
}

/// The mesh's own telemetry in the demo's report agrees: each version with its own success
/// rate and latency.
fn mesh_stat_agrees(steps: &[serde_json::Value]) {
    let backend = |step: &serde_json::Value, svc: &str| -> serde_json::Value {
        step["mesh_stat"]["backends"]
            .as_array()
            .and_then(|b| b.iter().find(|r| r["service"] == svc).cloned())
            .unwrap_or_default()
    };
    for svc in ["default/reviews-v1", "default/reviews-v2"] {
        let row = backend(&steps[2], svc);
        assert_eq!(row["success_rate"], 1.0, "50/50 {svc}: {}", steps[2]);
        assert!(row["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{row}");
    }
    let v3 = backend(&steps[5], "default/reviews-v3");
    let sr = v3["success_rate"].as_f64().unwrap_or(1.0);
    assert!((0.5..=0.9).contains(&sr), "v3 as the proxies saw it: {v3}");
}

/// Every step of the demo's report: the names, each version's share within 5 points of what
/// the controller set, nothing failed but v3, every peer verified over mTLS; the controller
/// promoted v2 through every step and rolled v3 back at its first. The steps.
fn walked_the_release(report: &serde_json::Value) -> Vec<serde_json::Value> {
    let steps = report["steps"].as_array().expect("steps");
    let names: Vec<&str> = steps.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "all traffic on v1",
            "rollout to v2: step 1 of 3, 10 % to it",
            "rollout to v2: step 2 of 3, 50 % to it",
            "rollout to v2: step 3 of 3, 100 % to it",
            "promoted by the gates: all on v2",
            "rollout to v3: step 1 of 3, 10 % to it",
            "rolled back by the gate: all on v2",
        ]
    );
    let share = |step: &serde_json::Value, v: &str| {
        step["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|x| x["version"] == v))
            .and_then(|x| x["share"].as_f64())
            .unwrap_or(0.0)
    };
    // Every step's shares within 5 points of what the controller set; nothing failed but v3.
    for (i, want) in [
        [100.0, 0.0, 0.0],
        [90.0, 10.0, 0.0],
        [50.0, 50.0, 0.0],
        [0.0, 100.0, 0.0],
        [0.0, 100.0, 0.0],
        [0.0, 90.0, 10.0],
        [0.0, 100.0, 0.0],
    ]
    .iter()
    .enumerate()
    {
        let s = &steps[i];
        for (v, w) in ["v1", "v2", "v3"].iter().zip(want) {
            let got = share(s, v);
            assert!(
                (got - w).abs() <= 5.0,
                "step {}: {v} share {got} for weight {w}: {s}",
                i + 1
            );
        }
        if i != 5 {
            assert_eq!(s["success"].as_f64(), Some(100.0), "step {}: {s}", i + 1);
        }
        assert!(
            s["requests"].as_u64().unwrap_or(0) > 0,
            "step {}: {s}",
            i + 1
        );
        assert_eq!(s["mtls_verified"], true, "step {}: {s}", i + 1);
    }
    // v3 failed about 30 % of its requests, and only while it had its first step's share.
    let bad = &steps[5];
    let v3 = bad["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|x| x["version"] == "v3"))
        .expect("v3 answered");
    let v3_success = v3["success"].as_f64().unwrap_or(100.0);
    assert!((50.0..=90.0).contains(&v3_success), "{bad}");
    assert!(bad["success"].as_f64().unwrap_or(0.0) >= 95.0, "{bad}");

    // The controller's decisions: v2 promoted through every step, v3 rolled back by the gate
    // at its first step, on what it measured.
    let rollouts = report["rollouts"].as_array().expect("rollouts");
    let actions = |r: &serde_json::Value| -> Vec<String> {
        r["decisions"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|x| x["action"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(rollouts[0]["phase"], "Promoted");
    assert_eq!(
        actions(&rollouts[0]),
        ["Started", "Advanced", "Advanced", "Promoted"]
    );
    for d in rollouts[0]["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .skip(1)
    {
        assert_eq!(d["candidate"]["successRate"], 100.0, "{d}");
        assert!(
            d["candidate"]["requests"].as_u64().unwrap_or(0) >= 20,
            "{d}"
        );
    }
    assert_eq!(rollouts[1]["phase"], "RolledBack");
    assert_eq!(actions(&rollouts[1]), ["Started", "RolledBack"]);
    let back = &rollouts[1]["decisions"][1];
    assert_eq!(back["step"], 0);
    let rate = back["candidate"]["successRate"].as_f64().unwrap_or(100.0);
    assert!((50.0..=90.0).contains(&rate), "{back}");
    assert!(
        back["candidate"]["requests"].as_u64().unwrap_or(0) >= 20,
        "{back}"
    );
    assert!(
        back["reason"]
            .as_str()
            .unwrap_or("")
            .contains("minSuccessRate"),
        "{back}"
    );
    steps.clone()
}

/// The same release with the load entering through the demo's Gateway over HTTPS: the route
/// the Gateway shares with the mesh moves both, and every version saw the gateway's own
/// identity over mTLS.
#[test]
fn the_demo_release_through_its_gateway() {
    let (report, took) = run_demo(&[
        "--via-gateway",
        "--gateway",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(report["entry"], "gateway");
    assert_eq!(
        report["client_identity"],
        "spiffe://cluster.local/ns/default/sa/edge-gateway"
    );
    assert!(
        report["gateway_url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://localhost:")),
        "{report}"
    );
    let steps = walked_the_release(&report);
    // The gateway's own metrics are in the mesh's telemetry.
    mesh_stat_agrees(&steps);
    eprintln!("demo through the gateway took {took:?}");
}

/// What a release owner does during the canary: `meshctl stat` (and `top`) against the demo's
/// controller shows v1 and v2 side by side, each with its own success rate and latency.
#[test]
fn meshctl_stat_during_the_demos_canary() {
    use std::io::Read;
    let meshctl = env!("CARGO_BIN_EXE_meshctl");
    let mut demo = Command::new(meshctl)
        .args([
            "demo",
            "--json",
            "--step",
            "5s",
            "--rate",
            "200",
            "--admin",
            "127.0.0.1:0",
        ])
        .env("MESH_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("meshctl runs");
    let mut stderr = demo.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    // Progress comes in pieces; wait for the canary's measurement to start.
    let mut seen = String::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !seen
        .contains("step 2: rollout to v2: step 1 of 3, 10 % to it: the client's proxy routes by it")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&chunk),
            Err(_) => {
                let _ = demo.kill();
                panic!("the demo never reached the canary: {seen}");
            }
        }
    }
    let admin = seen
        .split("admin API is at http://")
        .nth(1)
        .and_then(|rest| rest.split(": ").next())
        .map(str::to_string)
        .expect("the demo says where its controller is");
    // Most of the canary's window (3.75 s of its 5 s).
    std::thread::sleep(std::time::Duration::from_secs(4));
    let run = |args: &[&str]| {
        let out = Command::new(meshctl)
            .args(args)
            .args(["--controller", &admin])
            .output()
            .expect("meshctl runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let json: serde_json::Value =
        serde_json::from_str(&run(&["stat", "reviews", "-n", "default", "-o", "json"]))
            .expect("JSON");
    let table = run(&["stat", "reviews", "-n", "default"]);
    let top = run(&["top", "--once"]);
    // The commands that read the controller print the same data as JSON and as YAML, and
    // both parse to the same value.
    for command in [
        &["stat", "reviews", "-n", "default"][..],
        &["top"],
        &["authz", "reviews", "-n", "default"],
        &["proxy-status"],
        &["version"],
    ] {
        let as_json: serde_json::Value =
            serde_json::from_str(&run(&[command, &["-o", "json"]].concat()))
                .unwrap_or_else(|e| panic!("{command:?} -o json: {e}"));
        let as_yaml: serde_json::Value =
            serde_norway::from_str(&run(&[command, &["-o", "yaml"]].concat()))
                .unwrap_or_else(|e| panic!("{command:?} -o yaml: {e}"));
        assert!(
            as_json.is_object() || as_json.is_array(),
            "{command:?}: {as_json}"
        );
        // Live figures move between two reads; the shape (the keys) does not.
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        assert_eq!(keys(&as_json), keys(&as_yaml), "{command:?}");
    }
    let _ = demo.kill();
    let _ = demo.wait();
    let rows = json["backends"].as_array().expect("backends");
    let row = |svc: &str| {
        rows.iter()
            .find(|r| r["service"] == svc)
            .unwrap_or_else(|| panic!("no {svc} in {json}"))
    };
    let (v1, v2) = (row("default/reviews-v1"), row("default/reviews-v2"));
    for r in [v1, v2] {
        assert_eq!(r["success_rate"], 1.0, "{r}");
        for q in ["p50_ms", "p99_ms"] {
            assert!(
                r[q].as_f64().is_some_and(|ms| ms > 0.0 && ms < 1000.0),
                "{q}: {r}"
            );
        }
    }
    let (r1, r2) = (
        v1["rps"].as_f64().unwrap_or(0.0),
        v2["rps"].as_f64().unwrap_or(0.0),
    );
    let share = 100.0 * r2 / (r1 + r2);
    assert!(
        (5.0..=15.0).contains(&share),
        "v2 has {share:.1} % of the rps: {json}"
    );
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name} in\n{table}"))
            .to_string()
    };
    assert!(line("reviews-v1").contains("100.00%"), "{table}");
    assert!(line("reviews-v2").contains("100.00%"), "{table}");
    assert!(
        top.contains("reviews-v1") && top.contains("reviews-v2"),
        "{top}"
    );
    eprintln!("meshctl stat during the canary:\n{table}");
}
