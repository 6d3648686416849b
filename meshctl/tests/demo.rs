//! `meshctl demo --json`, the binary as a user runs it: every step's measured shares match its
//! weights, no request fails until the bad version, whose failures show, and the rollback
//! brings the success rate back; every step's peers were verified over mTLS.

use std::process::Command;
use std::time::Instant;

#[test]
fn the_demo_walks_the_release_and_measures_it() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["demo", "--json", "--step", "3s", "--rate", "200"])
        .env("MESH_LOG", "error")
        .output()
        .expect("meshctl runs");
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 6);
    let share = |step: &serde_json::Value, v: &str| {
        step["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|x| x["version"] == v))
            .and_then(|x| x["share"].as_f64())
            .unwrap_or(0.0)
    };
    // Steps 1-4: shares within 5 points of the weights, nothing failed.
    for (i, want) in [[100.0, 0.0], [90.0, 10.0], [50.0, 50.0], [0.0, 100.0]]
        .iter()
        .enumerate()
    {
        let s = &steps[i];
        for (v, w) in ["v1", "v2"].iter().zip(want) {
            let got = share(s, v);
            assert!(
                (got - w).abs() <= 5.0,
                "step {}: {v} share {got} for weight {w}: {s}",
                i + 1
            );
        }
        assert_eq!(s["success"].as_f64(), Some(100.0), "step {}: {s}", i + 1);
        assert!(
            s["requests"].as_u64().unwrap_or(0) >= 400,
            "step {}: {s}",
            i + 1
        );
        assert_eq!(s["mtls_verified"], true, "step {}: {s}", i + 1);
    }
    // Step 5: v3 fails 30 % of its half.
    let bad = &steps[4];
    let v3 = bad["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|x| x["version"] == "v3"))
        .expect("v3 answered");
    let v3_success = v3["success"].as_f64().unwrap_or(100.0);
    assert!((65.0..=75.0).contains(&v3_success), "{bad}");
    assert!(bad["success"].as_f64().unwrap_or(100.0) < 90.0, "{bad}");
    // Step 6: rolled back, all good again.
    assert_eq!(steps[5]["success"].as_f64(), Some(100.0), "{}", steps[5]);
    assert!(
        (share(&steps[5], "v2") - 100.0).abs() <= 5.0,
        "{}",
        steps[5]
    );
    // How long it took is reported, not asserted (timings belong to benchmarks).
    eprintln!("demo took {took:?}");
}
