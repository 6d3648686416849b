//! `mesh-proxy init`: the pod's iptables rules, run once by an init container with NET_ADMIN.
//! Inbound TCP goes to the proxy's inbound listener (15006), outbound TCP to its outbound
//! listener (15001); the proxy's own traffic (its UID) and loopback are left alone, and ports
//! and CIDRs can be excluded. The rules live in chains of their own, rebuilt on each run, and
//! the jumps to them are added only when missing, so running it twice changes nothing.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use mesh_api::consts::ports;

/// Chains in the nat table.
const INBOUND: &str = "MESH_INBOUND";
const IN_REDIRECT: &str = "MESH_IN_REDIRECT";
const OUTPUT: &str = "MESH_OUTPUT";
const REDIRECT: &str = "MESH_REDIRECT";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-nft` if it is there, else `iptables-legacy`, else `iptables`.
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "mesh-proxy init",
    about = "Install the pod's iptables rules that send its traffic through mesh-proxy"
)]
pub struct InitArgs {
    /// UID the proxy runs as: its own connections are not redirected.
    #[arg(long, env = "MESH_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The proxy's transparent inbound listener port.
    #[arg(long, default_value_t = ports::PROXY_INBOUND)]
    pub inbound_port: u16,
    /// The proxy's transparent outbound listener port.
    #[arg(long, default_value_t = ports::PROXY_OUTBOUND)]
    pub outbound_port: u16,
    /// Inbound ports not redirected (comma-separated); the proxy's metrics port always is.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub exclude_inbound_ports: Vec<String>,
    /// Outbound ports not redirected (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub exclude_outbound_ports: Vec<String>,
    /// Outbound destinations not redirected (comma-separated CIDRs, e.g. 169.254.169.254/32).
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Which iptables to use.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
}

fn ports_of(flag: &str, items: &[String]) -> anyhow::Result<Vec<u16>> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("{flag} {s:?}: not a port (1-65535)"))
        })
        .collect()
}

fn cidrs_of(flag: &str, items: &[String]) -> anyhow::Result<Vec<String>> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let (ip, len) = s.split_once('/').unwrap_or((s, ""));
            let ip: IpAddr = ip
                .parse()
                .with_context(|| format!("{flag} {s:?}: not an IP address or CIDR"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len: u8 = if len.is_empty() {
                max
            } else {
                len.parse()
                    .ok()
                    .filter(|l| *l <= max)
                    .with_context(|| format!("{flag} {s:?}: prefix length must be 0-{max}"))?
            };
            if !ip.is_ipv4() {
                bail!("{flag} {s:?}: IPv6 is not supported yet (the rules are IPv4 iptables)");
            }
            Ok(format!("{ip}/{len}"))
        })
        .collect()
}

/// The rules, as `iptables-restore --noflush` input for the mesh's own chains, and the two
/// jumps into them (added separately, only when missing).
#[derive(Debug, PartialEq, Eq)]
pub struct Rules {
    pub restore: String,
    pub jumps: Vec<Vec<String>>,
}

pub fn rules(args: &InitArgs) -> anyhow::Result<Rules> {
    let mut in_excluded = ports_of("--exclude-inbound-ports", &args.exclude_inbound_ports)?;
    in_excluded.push(ports::PROXY_METRICS);
    in_excluded.sort_unstable();
    in_excluded.dedup();
    let out_excluded = ports_of("--exclude-outbound-ports", &args.exclude_outbound_ports)?;
    let cidrs = cidrs_of("--exclude-outbound-cidrs", &args.exclude_outbound_cidrs)?;
    let mut r = String::from("*nat\n");
    for chain in [INBOUND, IN_REDIRECT, OUTPUT, REDIRECT] {
        r.push_str(&format!(":{chain} - [0:0]\n"));
    }
    r.push_str(&format!(
        "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}\n",
        args.inbound_port
    ));
    r.push_str(&format!(
        "-A {REDIRECT} -p tcp -j REDIRECT --to-ports {}\n",
        args.outbound_port
    ));
    for p in &in_excluded {
        r.push_str(&format!("-A {INBOUND} -p tcp --dport {p} -j RETURN\n"));
    }
    r.push_str(&format!("-A {INBOUND} -p tcp -j {IN_REDIRECT}\n"));
    // The proxy's own connections (to apps, peers and the controller) go out as they are.
    r.push_str(&format!(
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN\n",
        args.proxy_uid
    ));
    r.push_str(&format!("-A {OUTPUT} -d 127.0.0.1/32 -j RETURN\n"));
    for p in &out_excluded {
        r.push_str(&format!("-A {OUTPUT} -p tcp --dport {p} -j RETURN\n"));
    }
    for c in &cidrs {
        r.push_str(&format!("-A {OUTPUT} -d {c} -j RETURN\n"));
    }
    r.push_str(&format!("-A {OUTPUT} -j {REDIRECT}\n"));
    r.push_str("COMMIT\n");
    let jump = |chain: &str, target: &str| {
        ["-t", "nat", "-A", chain, "-p", "tcp", "-j", target]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    Ok(Rules {
        restore: r,
        jumps: vec![jump("PREROUTING", INBOUND), jump("OUTPUT", OUTPUT)],
    })
}

fn exists(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `(iptables, iptables-restore)` for the backend.
fn binaries(backend: Backend) -> anyhow::Result<(&'static str, &'static str)> {
    let pick = match backend {
        Backend::Nft => ("iptables-nft", "iptables-nft-restore"),
        Backend::Legacy => ("iptables-legacy", "iptables-legacy-restore"),
        Backend::Auto => {
            if exists("iptables-nft") {
                ("iptables-nft", "iptables-nft-restore")
            } else if exists("iptables-legacy") {
                ("iptables-legacy", "iptables-legacy-restore")
            } else {
                ("iptables", "iptables-restore")
            }
        }
    };
    if !exists(pick.0) {
        bail!(
            "{} not found: install iptables (or choose --backend)",
            pick.0
        );
    }
    Ok(pick)
}

pub fn run(args: &InitArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let rules = rules(args)?;
    if args.dry_run {
        write!(out, "{}", rules.restore)?;
        for j in &rules.jumps {
            writeln!(out, "# unless present: iptables {}", j.join(" "))?;
        }
        return Ok(());
    }
    let (iptables, restore) = binaries(args.backend)?;
    let mut child = Command::new(restore)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.restore.as_bytes())?;
    let done = child.wait_with_output()?;
    if !done.status.success() {
        bail!(
            "{restore} refused the rules: {}",
            String::from_utf8_lossy(&done.stderr).trim()
        );
    }
    for j in &rules.jumps {
        // `-C` checks for the same rule: present means a previous run added it.
        let mut check = j.clone();
        check[2] = "-C".into();
        let present = Command::new(iptables)
            .args(&check)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            continue;
        }
        let added = Command::new(iptables)
            .args(j)
            .output()
            .with_context(|| format!("running {iptables}"))?;
        if !added.status.success() {
            bail!(
                "{iptables} {}: {}",
                j.join(" "),
                String::from_utf8_lossy(&added.stderr).trim()
            );
        }
    }
    writeln!(out, "mesh iptables rules installed with {iptables}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(extra: &[&str]) -> InitArgs {
        let mut argv = vec!["init"];
        argv.extend(extra);
        InitArgs::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn default_rules_redirect_both_ways_and_spare_the_proxy() {
        let r = rules(&args(&[])).expect("rules");
        assert_eq!(
            r.restore,
            "*nat
:MESH_INBOUND - [0:0]
:MESH_IN_REDIRECT - [0:0]
:MESH_OUTPUT - [0:0]
:MESH_REDIRECT - [0:0]
-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MESH_INBOUND -p tcp --dport 15020 -j RETURN
-A MESH_INBOUND -p tcp -j MESH_IN_REDIRECT
-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A MESH_OUTPUT -d 127.0.0.1/32 -j RETURN
-A MESH_OUTPUT -j MESH_REDIRECT
COMMIT
"
        );
        assert_eq!(
            r.jumps[0].join(" "),
            "-t nat -A PREROUTING -p tcp -j MESH_INBOUND"
        );
        assert_eq!(
            r.jumps[1].join(" "),
            "-t nat -A OUTPUT -p tcp -j MESH_OUTPUT"
        );
    }

    #[test]
    fn exclusions_and_ports_are_honoured() {
        let r = rules(&args(&[
            "--proxy-uid",
            "2000",
            "--inbound-port",
            "16006",
            "--exclude-inbound-ports",
            "22,15020",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "169.254.169.254,10.0.0.0/8",
        ]))
        .expect("rules");
        for line in [
            "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
            "-A MESH_INBOUND -p tcp --dport 22 -j RETURN",
            "-A MESH_OUTPUT -m owner --uid-owner 2000 -j RETURN",
            "-A MESH_OUTPUT -p tcp --dport 5432 -j RETURN",
            "-A MESH_OUTPUT -d 169.254.169.254/32 -j RETURN",
            "-A MESH_OUTPUT -d 10.0.0.0/8 -j RETURN",
        ] {
            assert!(r.restore.contains(line), "missing {line:?}:\n{}", r.restore);
        }
        assert_eq!(
            r.restore.matches("--dport 15020").count(),
            1,
            "no duplicate"
        );
    }

    #[test]
    fn bad_input_is_named() {
        let cases = [
            (
                vec!["--exclude-inbound-ports", "ssh"],
                "--exclude-inbound-ports \"ssh\"",
            ),
            (vec!["--exclude-outbound-ports", "70000"], "not a port"),
            (
                vec!["--exclude-outbound-cidrs", "10.0.0.0/40"],
                "prefix length must be 0-32",
            ),
            (
                vec!["--exclude-outbound-cidrs", "nowhere"],
                "not an IP address",
            ),
            (
                vec!["--exclude-outbound-cidrs", "fd00::/8"],
                "IPv6 is not supported",
            ),
        ];
        for (argv, want) in cases {
            let err = rules(&args(&argv)).expect_err("refused").to_string();
            assert!(err.contains(want), "{argv:?}: {err}");
        }
    }

    #[test]
    fn dry_run_prints_the_rules_and_the_jumps() {
        let mut out = Vec::new();
        run(&args(&["--dry-run"]), &mut out).expect("dry run");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("*nat\n"), "{text}");
        assert!(
            text.contains("# unless present: iptables -t nat -A OUTPUT -p tcp -j MESH_OUTPUT"),
            "{text}"
        );
    }
}
