//! The cluster DNS of the network-namespace cluster: a hosts file that every pod reads as its
//! `/etc/hosts` (`ip netns exec`, which starts every pod's processes, bind-mounts
//! `/etc/netns/<namespace>/hosts` there, and that is a link to the cluster's file). It holds the
//! A records CoreDNS's `kubernetes` plugin serves: a ClusterIP Service's name to its VIP; a
//! headless Service's name to its ready endpoints; and `<hostname>.<service>.<ns>.svc` to an
//! endpoint of a headless Service that has a `hostname` (a StatefulSet's pods). Each name also
//! answers as `name.ns.svc` and `name.ns`; there are no search domains.
//!
//! The file is rewritten in place (a bind mount holds on to its inode), only when its records
//! change. glibc reads it on every lookup.

use std::path::{Path, PathBuf};

use mesh_api::fake_api::State;
use serde_json::Value;

/// The cluster domain.
pub const DOMAIN: &str = "cluster.local";

/// The cluster's hosts file in the cluster's directory `dir`.
pub fn hosts_file(dir: &Path) -> PathBuf {
    dir.join("hosts")
}

/// The records the API server's Services and EndpointSlices call for, as a hosts file.
pub fn records(state: &State) -> String {
    let mut lines = vec![
        "127.0.0.1 localhost".to_owned(),
        "::1 localhost ip6-localhost ip6-loopback".to_owned(),
    ];
    let line = |ip: &str, name: &str, ns: &str| {
        format!("{ip} {name}.{ns}.svc.{DOMAIN} {name}.{ns}.svc {name}.{ns}")
    };
    let of_kind = |k: &'static str| state.objects.values().filter(move |o| o["kind"] == k);
    for svc in of_kind("Service") {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        match svc.pointer("/spec/clusterIP").and_then(Value::as_str) {
            Some("None") => {}
            Some(ip) if !ip.is_empty() => {
                lines.push(line(ip, name, ns));
                continue;
            }
            _ => continue,
        }
        let endpoints = of_kind("EndpointSlice")
            .filter(|s| {
                s["metadata"]["namespace"] == ns
                    && s.pointer("/metadata/labels/kubernetes.io~1service-name")
                        .and_then(Value::as_str)
                        == Some(name)
            })
            .filter_map(|s| s["endpoints"].as_array())
            .flatten()
            .filter(|e| e.pointer("/conditions/ready") != Some(&Value::Bool(false)));
        for e in endpoints {
            let host = e["hostname"].as_str();
            for ip in e["addresses"].as_array().into_iter().flatten() {
                let ip = ip.as_str().unwrap_or_default();
                lines.push(line(ip, name, ns));
                if let Some(h) = host {
                    lines.push(line(ip, &format!("{h}.{name}"), ns));
                }
            }
        }
    }
    lines.join("\n") + "\n"
}

/// Writes `text` to the hosts file `path` in place, unless it holds that already.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let old = std::fs::read(path).unwrap_or_default();
    if old == text.as_bytes() {
        return Ok(());
    }
    // Written over and then cut to length, never replaced (the pods' bind mounts hold on to
    // this inode) nor truncated first (a lookup in between would find no record at all).
    // What is left of a longer old text is blanked in the same write, so a lookup never reads
    // an old record after a new text.
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(old.len().max(bytes.len()), b'\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    std::io::Write::write_all(&mut f, &bytes)?;
    f.set_len(text.len() as u64)
}

/// Where `ip netns exec` looks for network namespace `netns`'s own `/etc` files.
fn etc_of(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// Makes the cluster's hosts file `hosts` the `/etc/hosts` of processes started in `netns`.
pub fn link(netns: &str, hosts: &Path) -> std::io::Result<()> {
    let etc = etc_of(netns);
    std::fs::create_dir_all(&etc)?;
    let link = etc.join("hosts");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(hosts, link)
}

/// Removes what [`link`] made for `netns`.
pub fn unlink(netns: &str) {
    let _ = std::fs::remove_dir_all(etc_of(netns));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn services_headless_endpoints_and_hostnames_get_records() {
        let mut state = State::default();
        state.put(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "cart", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}}));
        state.put(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}));
        state.put(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x", "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4", "ports": [{"port": 5432}],
            "endpoints": [
                {"addresses": ["10.244.0.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.244.0.6"], "hostname": "db-1", "conditions": {"ready": false}},
                {"addresses": ["10.244.0.7"]},
            ]}),
        );
        let text = records(&state);
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                "10.96.0.7 cart.shop.svc.cluster.local cart.shop.svc cart.shop",
                "10.244.0.5 db.shop.svc.cluster.local db.shop.svc db.shop",
                "10.244.0.5 db-0.db.shop.svc.cluster.local db-0.db.shop.svc db-0.db.shop",
                "10.244.0.7 db.shop.svc.cluster.local db.shop.svc db.shop",
            ],
            "an unready endpoint has no record"
        );
    }

    #[test]
    fn the_file_is_rewritten_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = hosts_file(dir.path());
        write(&path, "a\n").expect("write");
        let inode = std::fs::metadata(&path).expect("stat").ino();
        write(&path, "b\n").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "b\n");
        assert_eq!(std::fs::metadata(&path).expect("stat").ino(), inode);
    }
}
