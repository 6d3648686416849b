//! Builders of test manifests, as YAML text (what a user writes) and as parsed objects.

use crate::objects::{Object, parse_doc};

/// Parses one YAML document into an object, or panics: test input only.
pub fn obj(yaml: &str) -> Object {
    let doc: serde_json::Value = serde_norway::from_str(yaml).expect("test yaml parses");
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

pub use crate::objects::tls_secret_yaml;

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

/// The benchmarks' mesh of `services` Services over `namespaces` namespaces (`svc-<i>` in
/// `ns-<i mod namespaces>`, VIP [`scale_ip`]`(i)`, one HTTP port 80 to 8080, and an
/// EndpointSlice of two endpoints at `scale_ip(services + 2i)` and the next): one file per
/// namespace, as `(file name, YAML)`.
pub fn scale_manifests(services: usize, namespaces: usize) -> Vec<(String, String)> {
    let mut files: Vec<String> = vec![String::new(); namespaces];
    for i in 0..services {
        let (name, ns) = (format!("svc-{i}"), format!("ns-{}", i % namespaces));
        files[i % namespaces].push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: {}, selector: {{app: {name}}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: ['{}']}}, {{addresses: ['{}']}}]\n",
            scale_ip(i),
            scale_ip(services + 2 * i),
            scale_ip(services + 2 * i + 1)
        ));
    }
    files
        .into_iter()
        .enumerate()
        .map(|(j, text)| (format!("ns-{j}.yaml"), text))
        .collect()
}

/// The `i`th address of the benchmarks' mesh, from 10.96.0.0 up.
pub fn scale_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 96 + i / 65536, (i / 256) % 256, i % 256)
}

/// Gateway API conditions (a `status.conditions` list) as `Type=Status/Reason` each, as tests
/// compare them.
pub fn condition_strings(conditions: &serde_json::Value) -> Vec<String> {
    conditions
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "{}={}/{}",
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or("")
            )
        })
        .collect()
}
