//! The mesh-proxy binary: SIGTERM drains and exits cleanly; bad settings are refused by name.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let admin = free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args([
            "--node",
            "default/web-1",
            "--xds",
            &free_addr(),
            "--workers",
            "1",
            "--admin-addr",
            &admin,
            "--metrics-addr",
            &free_addr(),
            "--outbound-http-addr",
            &free_addr(),
            "--drain-deadline",
            "2s",
            "--identity-off",
        ])
        .env("MESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mesh-proxy starts");
    // Wait until it serves its admin port, so the signal handler is installed.
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&admin).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "admin never came up");
    let pid = child.id().expect("pid").to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .expect("status");
    assert!(status.success(), "{status:?}");
}

/// Runs the binary with `args`, expects it to refuse to start, returns what it said.
async fn refused(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(args)
        .args(["--admin-addr", &free_addr()])
        .env_remove("MESH_PROXY_CA_ADDR")
        .env_remove("MESH_PROXY_IDENTITY_OFF")
        .output()
        .await
        .expect("runs");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn a_bad_node_is_refused_by_name() {
    let err = refused(&["--node", "no-namespace"]).await;
    assert!(
        err.contains("MESH_PROXY_NODE") && err.contains("\"no-namespace\""),
        "{err}"
    );
}

#[tokio::test]
async fn without_a_ca_it_refuses_to_start_unless_identity_is_off() {
    let err = refused(&["--node", "default/web-1"]).await;
    assert!(
        err.contains("--ca-addr") && err.contains("--identity-off"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_log_format_or_a_bad_log_filter_is_refused_by_name() {
    let err = refused(&[
        "--node",
        "default/web-1",
        "--identity-off",
        "--log-format",
        "yaml",
    ])
    .await;
    assert!(
        err.contains("--log-format") && err.contains("'yaml'"),
        "{err}"
    );
    // Were the filter taken, the proxy would run: the wait is bounded so that fails, not hangs.
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["--node", "default/web-1", "--identity-off"])
            .args(["--admin-addr", &free_addr()])
            .env("MESH_LOG", "mesh_proxy=loud")
            .env_remove("MESH_PROXY_CA_ADDR")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("refused at once, not running")
    .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MESH_LOG \"mesh_proxy=loud\": not a log filter"),
        "{err}"
    );
}
