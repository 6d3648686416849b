//! The EndpointSlice controller of the network-namespace cluster: from the Services and Pods the
//! API server holds, one slice per Service, with the conditions Kubernetes' controller writes
//! (`serving`: the pod's `Ready` condition; `terminating`: the pod has a `deletionTimestamp`;
//! `ready`: serving and not terminating, or always with `publishNotReadyAddresses`), a pod's
//! `hostname` when its `subdomain` is the Service, and named target ports resolved per pod.

use std::collections::BTreeSet;

use mesh_api::fake_api::{State, path_of};
use serde_json::{Value, json};

/// Marks the slices this controller owns (`endpointslice.kubernetes.io/managed-by`).
const MANAGED_BY: &str = "mesh-e2e";

fn condition(pod: &Value, kind: &str) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == kind && c["status"] == "True")
}

fn selects(selector: &serde_json::Map<String, Value>, pod: &Value) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| pod.pointer("/metadata/labels").and_then(|l| l.get(k)) == Some(v))
}

/// A Service port's target in `pod`: a number, or the pod's container port of that name.
fn target_port(port: &Value, pod: &Value) -> Option<u64> {
    match port.get("targetPort").unwrap_or(&port["port"]) {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => ["/spec/containers", "/spec/initContainers"]
            .iter()
            .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
            .flatten()
            .filter_map(|c| c.get("ports").and_then(Value::as_array))
            .flatten()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
}

/// The slice of Service `svc` over `pods`.
fn slice_of(svc: &Value, pods: &[&Value]) -> Value {
    let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = svc["metadata"]["name"].as_str().unwrap_or_default();
    let selector = svc["spec"]["selector"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let publish_not_ready = svc["spec"]["publishNotReadyAddresses"] == true;
    let svc_ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
    let mut ports: Vec<Value> = Vec::new();
    let mut endpoints = Vec::new();
    for pod in pods {
        let ip = pod.pointer("/status/podIP").and_then(Value::as_str);
        let phase = pod.pointer("/status/phase").and_then(Value::as_str);
        let (Some(ip), false) = (ip, matches!(phase, Some("Succeeded" | "Failed"))) else {
            continue;
        };
        if pod["metadata"]["namespace"] != ns || !selects(&selector, pod) {
            continue;
        }
        let resolved: Option<Vec<Value>> = svc_ports
            .iter()
            .map(|p| {
                let mut out = json!({"port": target_port(p, pod)?, "protocol": p.get("protocol").cloned().unwrap_or(json!("TCP"))});
                for f in ["name", "appProtocol"] {
                    if let Some(v) = p.get(f) {
                        out[f] = v.clone();
                    }
                }
                Some(out)
            })
            .collect();
        // One slice per Service: pods that resolve its ports differently are not listed.
        let Some(resolved) = resolved else { continue };
        if ports.is_empty() {
            ports = resolved;
        } else if ports != resolved {
            continue;
        }
        let serving = condition(pod, "Ready");
        let terminating = !pod["metadata"]["deletionTimestamp"].is_null();
        let mut ep = json!({
            "addresses": [ip],
            "conditions": {
                "ready": publish_not_ready || (serving && !terminating),
                "serving": serving,
                "terminating": terminating,
            },
            "targetRef": {"kind": "Pod", "name": pod["metadata"]["name"], "namespace": ns},
        });
        if let Some(h) = pod.pointer("/spec/hostname")
            && pod.pointer("/spec/subdomain").and_then(Value::as_str) == Some(name)
        {
            ep["hostname"] = h.clone();
        }
        endpoints.push(ep);
    }
    if ports.is_empty() {
        ports = svc_ports
            .iter()
            .filter_map(|p| {
                let port = p.get("targetPort").unwrap_or(&p["port"]).as_u64()?;
                Some(json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": port, "protocol": "TCP"}))
            })
            .collect();
    }
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-e2e"), "namespace": ns,
            "labels": {"kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints})
}

/// Stores `o` as a platform writer does, unless the API server holds it as it is already (so
/// watchers see no change that is none): the same but for what the server sets.
pub fn put_if_changed(state: &mut State, o: Value) {
    let unchanged = state.objects.get(&path_of(&o)).is_some_and(|stored| {
        let mut stored = stored.clone();
        if let Some(m) = stored["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("uid");
        }
        stored == o
    });
    if !unchanged {
        state.put(o);
    }
}

/// Runs the platform's controllers after a change in `state`: the slices, then the records of
/// the cluster DNS of the cluster whose directory is `dir` ([`crate::dns`]).
pub fn sync_platform(state: &mut State, dir: &std::path::Path) -> std::io::Result<()> {
    sync(state);
    crate::dns::write(&crate::dns::hosts_file(dir), &crate::dns::records(state))
}

/// Brings the slices in `state` to what its Services and Pods call for: changed ones are
/// written, those of Services that went are deleted.
pub fn sync(state: &mut State) {
    let kind = |o: &Value, k: &str| o["kind"] == k;
    let pods: Vec<&Value> = state.objects.values().filter(|o| kind(o, "Pod")).collect();
    let wanted: Vec<Value> = state
        .objects
        .values()
        .filter(|o| kind(o, "Service") && o.pointer("/spec/selector").is_some())
        .map(|s| slice_of(s, &pods))
        .collect();
    let paths: BTreeSet<String> = wanted.iter().map(path_of).collect();
    let gone: Vec<String> = state
        .objects
        .iter()
        .filter(|(p, o)| {
            kind(o, "EndpointSlice")
                && o.pointer("/metadata/labels/endpointslice.kubernetes.io~1managed-by")
                    == Some(&json!(MANAGED_BY))
                && !paths.contains(*p)
        })
        .map(|(p, _)| p.clone())
        .collect();
    for slice in wanted {
        put_if_changed(state, slice);
    }
    for p in gone {
        state.delete(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, deleting: bool) -> Value {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"hostname": name, "subdomain": "web",
                "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if deleting {
            p["metadata"]["deletionTimestamp"] = json!("2026-12-05T00:00:00Z");
        }
        p
    }

    #[test]
    fn conditions_follow_readiness_and_deletion() {
        let mut state = State::default();
        state.put(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}));
        state.put(pod("web-0", "10.244.0.5", true, false));
        state.put(pod("web-1", "10.244.0.6", false, false));
        state.put(pod("web-2", "10.244.0.7", true, true));
        state.put(pod("web-3", "10.244.0.8", false, true));
        sync(&mut state);
        let slice =
            &state.objects["/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-e2e"];
        assert_eq!(
            slice["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        let conditions: Vec<(&str, &Value, &Value)> = slice["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| {
                (
                    e["addresses"][0].as_str().expect("ip"),
                    &e["conditions"],
                    &e["hostname"],
                )
            })
            .collect();
        let c = |r: bool, s: bool, t: bool| json!({"ready": r, "serving": s, "terminating": t});
        assert_eq!(
            conditions,
            [
                ("10.244.0.5", &c(true, true, false), &json!("web-0")),
                ("10.244.0.6", &c(false, false, false), &json!("web-1")),
                ("10.244.0.7", &c(false, true, true), &json!("web-2")),
                ("10.244.0.8", &c(false, false, true), &json!("web-3")),
            ]
        );
        let rv = slice["metadata"]["resourceVersion"].clone();
        sync(&mut state);
        let again =
            &state.objects["/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-e2e"];
        assert_eq!(
            again["metadata"]["resourceVersion"], rv,
            "unchanged: not written"
        );
        state.delete("/api/v1/namespaces/shop/services/web");
        sync(&mut state);
        assert!(!state.objects.keys().any(|p| p.contains("endpointslices")));
    }
}
