//! The API server's hand-written validation, past what the OpenAPI schemas say: the checks of
//! `k8s.io/apimachinery`'s validation package (names, labels) and of the built-in kinds the mesh
//! and its tests write (Service ports, Pod containers, workload selectors, EndpointSlice
//! addresses), with the API server's words. Object names are checked for every kind, custom
//! ones included, as the API server does.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use crate::schema::{ErrorKind, FieldError, Report};

const DNS1123_LABEL: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1035_LABEL: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const QUALIFIED_NAME: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";

fn whole(re: &str) -> Regex {
    Regex::new(&format!("^(?:{re})$")).unwrap_or_else(|_| Regex::new("^$").expect("empty"))
}

static LABEL: LazyLock<Regex> = LazyLock::new(|| whole(DNS1123_LABEL));
static LABEL_1035: LazyLock<Regex> = LazyLock::new(|| whole(DNS1035_LABEL));
static SUBDOMAIN: LazyLock<Regex> =
    LazyLock::new(|| whole(&format!("{DNS1123_LABEL}(\\.{DNS1123_LABEL})*")));
static QUALIFIED: LazyLock<Regex> = LazyLock::new(|| whole(QUALIFIED_NAME));
static IANA_SVC_NAME: LazyLock<Regex> = LazyLock::new(|| whole("[a-z0-9]([a-z0-9-]*[a-z0-9])?"));

fn invalid(r: &mut Report, path: &str, v: &Value, why: impl Into<String>) {
    r.errors.push(FieldError {
        path: path.into(),
        kind: ErrorKind::Invalid(v.clone(), why.into()),
    });
}

fn required(r: &mut Report, path: &str) {
    r.errors.push(FieldError {
        path: path.into(),
        kind: ErrorKind::Required,
    });
}

/// Which rule an object's name follows.
#[derive(Clone, Copy)]
enum NameRule {
    Subdomain,
    Label,
    Label1035,
    /// RBAC objects: any path segment (`system:controller:x` is fine).
    PathSegment,
}

fn check_name(r: &mut Report, path: &str, name: &str, rule: NameRule) {
    let v = Value::String(name.to_owned());
    match rule {
        NameRule::Subdomain => {
            if name.len() > 253 {
                invalid(r, path, &v, "must be no more than 253 characters");
            } else if !SUBDOMAIN.is_match(name) {
                invalid(
                    r,
                    path,
                    &v,
                    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')",
                );
            }
        }
        NameRule::Label => {
            if name.len() > 63 {
                invalid(r, path, &v, "must be no more than 63 characters");
            } else if !LABEL.is_match(name) {
                invalid(
                    r,
                    path,
                    &v,
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
                );
            }
        }
        NameRule::PathSegment => {
            if name == "." || name == ".." {
                invalid(r, path, &v, format!("may not be '{name}'"));
            } else if let Some(c) = name.chars().find(|c| matches!(c, '/' | '%')) {
                invalid(r, path, &v, format!("may not contain '{c}'"));
            }
        }
        NameRule::Label1035 => {
            if name.len() > 63 {
                invalid(r, path, &v, "must be no more than 63 characters");
            } else if !LABEL_1035.is_match(name) {
                invalid(
                    r,
                    path,
                    &v,
                    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')",
                );
            }
        }
    }
}

/// A label or annotation key: an optional DNS subdomain prefix and `/`, then a name.
fn check_key(r: &mut Report, path: &str, key: &str) {
    let v = Value::String(key.to_owned());
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 253 || !SUBDOMAIN.is_match(p))
    {
        invalid(
            r,
            path,
            &v,
            "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        );
    }
    if name.is_empty() || name.len() > 63 || !QUALIFIED.is_match(name) {
        invalid(
            r,
            path,
            &v,
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with at most 63 characters",
        );
    }
}

fn check_metadata(obj: &Value, kind: &str, r: &mut Report) {
    let meta = &obj["metadata"];
    let rbac = obj["apiVersion"] == "rbac.authorization.k8s.io/v1";
    let rule = match kind {
        "Namespace" => NameRule::Label,
        "Service" => NameRule::Label1035,
        _ if rbac => NameRule::PathSegment,
        _ => NameRule::Subdomain,
    };
    match meta["name"].as_str() {
        Some(n) if !n.is_empty() => check_name(r, "metadata.name", n, rule),
        _ if meta["generateName"].as_str().is_some_and(|g| !g.is_empty()) => {}
        _ => r.errors.push(FieldError {
            path: "metadata.name".into(),
            kind: ErrorKind::Invalid(
                Value::String(String::new()),
                "name or generateName is required".into(),
            ),
        }),
    }
    if let Some(ns) = meta["namespace"].as_str()
        && !ns.is_empty()
    {
        check_name(r, "metadata.namespace", ns, NameRule::Label);
    }
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        let path = format!("metadata.labels[{k}]");
        check_key(r, "metadata.labels", k);
        let Some(value) = v.as_str() else {
            invalid(r, &path, v, "must be of type string");
            continue;
        };
        if !value.is_empty() && (value.len() > 63 || !QUALIFIED.is_match(value)) {
            invalid(
                r,
                &path,
                v,
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?') with at most 63 characters",
            );
        }
    }
    for k in meta["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        // As the API server checks them: lowercased.
        check_key(r, "metadata.annotations", &k.to_lowercase());
    }
}

fn port_in_range(r: &mut Report, path: &str, v: &Value) {
    if !v.as_i64().is_some_and(|p| (1..=65535).contains(&p)) {
        invalid(r, path, v, "must be between 1 and 65535, inclusive");
    }
}

fn check_service(spec: &Value, r: &mut Report) {
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    let headless = spec["clusterIP"] == "None";
    let external = spec["type"] == "ExternalName";
    if ports.is_empty() && !headless && !external {
        required(r, "spec.ports");
    }
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        port_in_range(r, &format!("{at}.port"), &p["port"]);
        match p["name"].as_str() {
            Some(n) if !n.is_empty() => {
                check_name(r, &format!("{at}.name"), n, NameRule::Label);
                if !names.insert(n.to_owned()) {
                    r.errors.push(FieldError {
                        path: format!("{at}.name"),
                        kind: ErrorKind::Duplicate(p["name"].clone()),
                    });
                }
            }
            _ if ports.len() > 1 => required(r, &format!("{at}.name")),
            _ => {}
        }
        // 0 and "" are defaulted to the port, as the API server does.
        match &p["targetPort"] {
            Value::Null => {}
            Value::Number(n) if n.as_i64() == Some(0) => {}
            Value::String(t) if t.is_empty() => {}
            v @ Value::Number(_) => port_in_range(r, &format!("{at}.targetPort"), v),
            v => {
                let s = v.as_str().unwrap_or_default();
                if s.len() > 15 || !IANA_SVC_NAME.is_match(s) || !s.contains(char::is_alphabetic) {
                    invalid(
                        r,
                        &format!("{at}.targetPort"),
                        v,
                        "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), at most 15 characters, with at least one letter",
                    );
                }
            }
        }
    }
}

fn check_pod_spec(spec: &Value, path: &str, r: &mut Report) {
    let containers = spec["containers"].as_array().cloned().unwrap_or_default();
    if containers.is_empty() {
        required(r, &format!("{path}.containers"));
    }
    let mut names = BTreeSet::new();
    for (list, items) in [
        (
            "initContainers",
            spec["initContainers"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        ),
        ("containers", containers),
    ] {
        for (i, c) in items.iter().enumerate() {
            let at = format!("{path}.{list}[{i}]");
            match c["name"].as_str() {
                Some(n) if !n.is_empty() => {
                    check_name(r, &format!("{at}.name"), n, NameRule::Label);
                    if !names.insert(n.to_owned()) {
                        r.errors.push(FieldError {
                            path: format!("{at}.name"),
                            kind: ErrorKind::Duplicate(c["name"].clone()),
                        });
                    }
                }
                _ => required(r, &format!("{at}.name")),
            }
            if c["image"].as_str().is_none_or(|s| s.trim().is_empty()) {
                required(r, &format!("{at}.image"));
            }
        }
    }
}

/// A workload's selector must select its own template (by `matchLabels`; `matchExpressions`
/// are not checked here).
fn check_workload(kind: &str, spec: &Value, r: &mut Report) {
    let labels = &spec["template"]["metadata"]["labels"];
    match spec["selector"]["matchLabels"].as_object() {
        Some(sel) if !sel.is_empty() => {
            if sel.iter().any(|(k, v)| labels.get(k) != Some(v)) {
                invalid(
                    r,
                    "spec.template.metadata.labels",
                    labels,
                    "`selector` does not match template `labels`",
                );
            }
        }
        _ if spec["selector"]["matchExpressions"]
            .as_array()
            .is_some_and(|e| !e.is_empty()) => {}
        _ => invalid(
            r,
            "spec.selector",
            &spec["selector"],
            format!("empty selector is invalid for {}", kind.to_lowercase()),
        ),
    }
    check_pod_spec(&spec["template"]["spec"], "spec.template.spec", r);
}

fn check_endpoint_slice(obj: &Value, r: &mut Report) {
    let family = obj["addressType"].as_str().unwrap_or_default();
    for (i, e) in obj["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let addrs = e["addresses"].as_array().cloned().unwrap_or_default();
        if addrs.is_empty() || addrs.len() > 100 {
            invalid(
                r,
                &format!("endpoints[{i}].addresses"),
                &e["addresses"],
                "must have at least 1 and at most 100 addresses",
            );
        }
        for (j, a) in addrs.iter().enumerate() {
            let s = a.as_str().unwrap_or_default();
            let ok = match family {
                "IPv4" => s.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => s.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => SUBDOMAIN.is_match(s),
            };
            if !ok {
                invalid(
                    r,
                    &format!("endpoints[{i}].addresses[{j}]"),
                    a,
                    format!("must be a valid {family} address"),
                );
            }
        }
    }
    for (i, p) in obj["ports"].as_array().into_iter().flatten().enumerate() {
        if !p["port"].is_null() {
            port_in_range(r, &format!("ports[{i}].port"), &p["port"]);
        }
    }
}

/// Adds what the API server's hand-written validation finds in `obj` (already read through
/// its schema) to `r`.
pub fn validate(obj: &Value, r: &mut Report) {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    check_metadata(obj, kind, r);
    match (api_version, kind) {
        ("v1", "Service") => check_service(&obj["spec"], r),
        ("v1", "Pod") => check_pod_spec(&obj["spec"], "spec", r),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet") => {
            check_workload(kind, &obj["spec"], r)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => check_endpoint_slice(obj, r),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn said(obj: Value) -> Vec<String> {
        let mut r = Report::default();
        validate(&obj, &mut r);
        r.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn names_and_labels_follow_the_api_servers_rules() {
        assert!(said(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a.b-c", "namespace": "shop", "labels": {"app.kubernetes.io/name": "x_y", "v": ""},
                "annotations": {"Example.COM/Note": "upper case is lowered first"}}})).is_empty());
        let errors = said(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"n": 1}}}));
        assert_eq!(
            errors,
            ["metadata.labels[n]: Invalid value: 1: must be of type string"]
        );
        let errors = said(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "Bad_Name", "namespace": "Shop", "labels": {"-x": "ok", "y": "not ok!"}}}));
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            errors[0].starts_with(
                "metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with(
                "metadata.namespace: Invalid value: \"Shop\": a lowercase RFC 1123 label"
            ),
            "{errors:?}"
        );
        assert!(
            errors[2].starts_with("metadata.labels: Invalid value: \"-x\": name part"),
            "{errors:?}"
        );
        assert!(
            errors[3].starts_with("metadata.labels[y]: Invalid value: \"not ok!\": a valid label"),
            "{errors:?}"
        );
        // A Service's name is a DNS-1035 label: no leading digit.
        let errors = said(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "1st", "namespace": "shop"}, "spec": {"ports": [{"port": 80}]}}));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("a DNS-1035 label"), "{errors:?}");
        // RBAC names are path segments.
        assert!(
            said(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "mesh-system:mesh-ca"}})
            )
            .is_empty()
        );
        let errors = said(
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "a/b", "namespace": "shop"}}),
        );
        assert_eq!(
            errors,
            ["metadata.name: Invalid value: \"a/b\": may not contain '/'"]
        );
        let errors = said(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {}}));
        assert_eq!(
            errors,
            ["metadata.name: Invalid value: \"\": name or generateName is required"]
        );
    }

    #[test]
    fn built_in_kinds_get_their_hand_written_checks() {
        let errors = said(
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"ports": [{"name": "http", "port": 0}, {"name": "http", "port": 80, "targetPort": "no_such_name"}, {"port": 81, "targetPort": 0}]}}),
        );
        assert_eq!(
            errors,
            [
                "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
                "spec.ports[1].name: Duplicate value: \"http\"",
                "spec.ports[1].targetPort: Invalid value: \"no_such_name\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-), at most 15 characters, with at least one letter",
                "spec.ports[2].name: Required value",
            ]
        );
        let errors = said(
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "app"}]}}),
        );
        assert_eq!(errors, ["spec.containers[0].image: Required value"]);
        let errors = said(
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"selector": {"matchLabels": {"app": "a"}},
                     "template": {"metadata": {"labels": {"app": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}),
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("`selector` does not match template `labels`"),
            "{errors:?}"
        );
        let errors = said(
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "e"}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["fd00::1"]}], "ports": [{"port": 70000}]}),
        );
        assert_eq!(
            errors,
            [
                "endpoints[1].addresses[0]: Invalid value: \"fd00::1\": must be a valid IPv4 address",
                "ports[0].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
            ]
        );
    }
}
