//! Builders of test manifests, as YAML text (what a user writes) and as parsed objects.

use crate::objects::{Object, parse_doc};

/// Parses one YAML document into an object, or panics: test input only.
pub fn obj(yaml: &str) -> Object {
    let doc: serde_json::Value = serde_yaml::from_str(yaml).expect("test yaml parses");
    parse_doc(doc, "default").expect("test object is valid")
}

/// A ClusterIP Service with the given `(name, port)` ports, selecting `app: <name>`.
pub fn service_yaml(ns: &str, name: &str, ip: &str, ports: &[(&str, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(pname, port)| format!("{{name: '{pname}', port: {port}, protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  ports: [{}]\n",
        ports.join(", ")
    )
}

/// An EndpointSlice of Service `svc` with one port and ready endpoints at `ips`.
pub fn slice_yaml(ns: &str, svc: &str, port_name: &str, port: u16, ips: &[&str]) -> String {
    let eps: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{addresses: ['{ip}'], conditions: {{ready: true}}}}"))
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-abc\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: [{{name: '{port_name}', port: {port}, protocol: TCP}}]\nendpoints: [{}]\n",
        eps.join(", ")
    )
}

/// An HTTPRoute attached to Service `parent` splitting between `(backend, weight)` on `port`.
pub fn split_yaml(ns: &str, name: &str, parent: &str, port: u16, split: &[(&str, u32)]) -> String {
    let backends: Vec<String> = split
        .iter()
        .map(|(b, w)| format!("{{name: {b}, port: {port}, weight: {w}}}"))
        .collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {parent}, port: {port}}}]\n  rules:\n  - backendRefs: [{}]\n",
        backends.join(", ")
    )
}
