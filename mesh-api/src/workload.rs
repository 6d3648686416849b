//! The workload a pod belongs to: what metrics, the edges and the service graph name a
//! caller or a destination by (bounded, unlike pod names).

use std::collections::BTreeMap;

/// A pod label that names its workload, over what its owner says.
pub const LABEL: &str = "mesh.dev/workload";

/// The label a Deployment's ReplicaSets put on their pods (the ReplicaSet is named
/// `<deployment>-<hash>`).
const TEMPLATE_HASH: &str = "pod-template-hash";

/// The workload of a pod: the `mesh.dev/workload` label; else its controlling owner (a
/// ReplicaSet made by a Deployment counts as the Deployment); else its `generateName` without
/// the trailing `-`; else its own name.
///
/// `owner` is the controlling owner reference's `(kind, name)`.
pub fn name(
    labels: &BTreeMap<String, String>,
    owner: Option<(&str, &str)>,
    generate_name: Option<&str>,
    pod_name: &str,
) -> String {
    if let Some(w) = labels.get(LABEL).filter(|w| !w.is_empty()) {
        return w.clone();
    }
    if let Some((kind, owner)) = owner {
        if kind == "ReplicaSet"
            && let Some(hash) = labels.get(TEMPLATE_HASH)
            && let Some(deployment) = owner.strip_suffix(hash.as_str())
            && let Some(deployment) = deployment.strip_suffix('-')
            && !deployment.is_empty()
        {
            return deployment.to_string();
        }
        return owner.to_string();
    }
    match generate_name.map(|g| g.trim_end_matches('-')) {
        Some(g) if !g.is_empty() => g.to_string(),
        _ => pod_name.to_string(),
    }
}

/// [`name`] from a pod's `metadata` as JSON (the admission webhook's view of it).
pub fn name_from_json(meta: &serde_json::Value) -> String {
    let labels: BTreeMap<String, String> = meta
        .get("labels")
        .and_then(|l| serde_json::from_value(l.clone()).ok())
        .unwrap_or_default();
    let owner = meta
        .get("ownerReferences")
        .and_then(serde_json::Value::as_array)
        .and_then(|refs| {
            refs.iter()
                .find(|r| r.get("controller").and_then(serde_json::Value::as_bool) == Some(true))
        })
        .and_then(|r| Some((r.get("kind")?.as_str()?, r.get("name")?.as_str()?)));
    let str_of = |k: &str| meta.get(k).and_then(serde_json::Value::as_str);
    name(
        &labels,
        owner,
        str_of("generateName"),
        str_of("name").unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_deployments_pods_belong_to_the_deployment() {
        let l = labels(&[("pod-template-hash", "7d4b9c")]);
        let got = name(
            &l,
            Some(("ReplicaSet", "reviews-v1-7d4b9c")),
            Some("reviews-v1-7d4b9c-"),
            "reviews-v1-7d4b9c-x2x9z",
        );
        assert_eq!(got, "reviews-v1");
        // A bare ReplicaSet (no Deployment hash) is its own workload.
        assert_eq!(
            name(&BTreeMap::new(), Some(("ReplicaSet", "rs")), None, "rs-abc"),
            "rs"
        );
    }

    #[test]
    fn other_owners_label_and_fallbacks() {
        let none = BTreeMap::new();
        assert_eq!(
            name(&none, Some(("StatefulSet", "db")), Some("db-"), "db-0"),
            "db"
        );
        assert_eq!(name(&none, None, Some("job-"), "job-x1"), "job");
        assert_eq!(name(&none, None, None, "lonely"), "lonely");
        let l = labels(&[(LABEL, "checkout"), ("pod-template-hash", "1")]);
        assert_eq!(
            name(&l, Some(("ReplicaSet", "co-1")), None, "co-1-a"),
            "checkout"
        );
    }

    #[test]
    fn from_admission_json() {
        let meta = serde_json::json!({
            "generateName": "ratings-5f6d8-",
            "labels": {"pod-template-hash": "5f6d8"},
            "ownerReferences": [
                {"kind": "Other", "name": "x"},
                {"kind": "ReplicaSet", "name": "ratings-5f6d8", "controller": true}
            ]
        });
        assert_eq!(name_from_json(&meta), "ratings");
    }
}
