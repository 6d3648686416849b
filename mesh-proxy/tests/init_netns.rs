//! `mesh-proxy init` for real, in a network namespace of its own: the rules land in the nat
//! table, and a second run leaves exactly the same rules (no duplicate jumps). Needs root and
//! iptables; without them the test is skipped, unless `MESH_REQUIRE_PEERS` is set (CI).

use std::process::Command;

fn can_run() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let iptables = Command::new("iptables-save")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && iptables {
        return true;
    }
    assert!(
        std::env::var_os("MESH_REQUIRE_PEERS").is_none(),
        "needs root and iptables (scripts/install-peers installs iptables when run as root)"
    );
    eprintln!("SKIPPED: needs root and iptables");
    false
}

/// A network namespace removed when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("mesh-init-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        Self(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .output()
            .expect("ip netns exec runs")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn init_installs_the_rules_once_however_often_it_runs() {
    if !can_run() {
        return;
    }
    let ns = Netns::new();
    let bin = env!("CARGO_BIN_EXE_mesh-proxy");
    let mut saved = Vec::new();
    for _ in 0..2 {
        let out = ns.run(bin, &["init", "--exclude-outbound-ports", "5432"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let save = ns.run("iptables-save", &["-t", "nat"]);
        let rules: Vec<String> = String::from_utf8_lossy(&save.stdout)
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect();
        saved.push(rules);
    }
    let rules = &saved[0];
    for want in [
        "-A PREROUTING -p tcp -j MESH_INBOUND",
        "-A OUTPUT -p tcp -j MESH_OUTPUT",
        "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A MESH_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
    ] {
        assert!(
            rules.iter().any(|r| r == want),
            "missing {want:?} in {rules:#?}"
        );
    }
    assert!(
        rules
            .iter()
            .any(|r| r.contains("--uid-owner 1337") && r.ends_with("-j RETURN")),
        "{rules:#?}"
    );
    assert_eq!(saved[0], saved[1], "a second run changed the rules");
}
