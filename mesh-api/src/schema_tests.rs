use serde_json::json;

use super::*;
use crate::crds::chart_crds;

fn crd(kind: &str) -> CustomResourceDefinition {
    chart_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("a chart CRD of that kind")
}

fn admit_as(kind: &str, version: &str, mut obj: Value) -> (Value, Report) {
    let crd = crd(kind);
    let schema = version_schema(&crd, version).expect("served version");
    let r = admit(&mut obj, schema);
    (obj, r)
}

fn route(rule: Value) -> Value {
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
           "metadata": {"name": "reviews", "namespace": "default"},
           "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                    "rules": [rule]}})
}

#[test]
fn the_standard_channel_prunes_an_httproute_retry() {
    let rule = json!({"backendRefs": [{"name": "reviews-v1", "port": 9080}],
                      "retry": {"attempts": 3, "codes": [503]}});
    let (obj, r) = admit_as("HTTPRoute", "v1", route(rule));
    assert_eq!(r.pruned, vec!["spec.rules[0].retry".to_string()]);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(obj.pointer("/spec/rules/0/retry").is_none());
    assert_eq!(
        obj.pointer("/spec/rules/0/backendRefs/0/port"),
        Some(&json!(9080))
    );
}

#[test]
fn a_misspelt_field_is_pruned_and_named() {
    let tp = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "t", "namespace": "default", "labells": {"a": "b"}},
        "spec": {"targetRefs": [{"kind": "Service", "name": "reviews"}],
                 "outlierDetection": {"consecutiveFailure": 5, "maxEjectionPercent": 50}}});
    let (obj, r) = admit_as("TrafficPolicy", "v1alpha1", tp);
    assert_eq!(
        r.pruned,
        vec![
            "metadata.labells".to_string(),
            "spec.outlierDetection.consecutiveFailure".to_string()
        ]
    );
    assert_eq!(
        obj.pointer("/spec/outlierDetection"),
        Some(&json!({"maxEjectionPercent": 50}))
    );
}

#[test]
fn preserved_unknown_fields_survive() {
    let p = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "a", "namespace": "default"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "reviews"}],
                 "rules": [{"from": [{"namespaces": ["web"], "ipBlocks": ["10.0.0.0/8"]}],
                            "when": [{"key": "x"}]}]}});
    let (obj, r) = admit_as("AuthorizationPolicy", "v1alpha1", p);
    assert!(r.pruned.is_empty(), "{:?}", r.pruned);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        obj.pointer("/spec/rules/0/from/0/ipBlocks"),
        Some(&json!(["10.0.0.0/8"]))
    );
    assert_eq!(
        obj.pointer("/spec/rules/0/when"),
        Some(&json!([{"key": "x"}]))
    );
    // The schema's defaults are filled in, as the API server stores them.
    assert_eq!(obj.pointer("/spec/action"), Some(&json!("Allow")));
    assert_eq!(obj.pointer("/spec/targetRefs/0/group"), Some(&json!("")));
}

#[test]
fn wrong_types_enums_and_missing_fields_are_refused_in_the_servers_words() {
    let tp = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"loadBalancer": {"algorithm": "LeastConn"},
                 "connectionLimits": {"maxConnections": "ten"}}});
    let (_, r) = admit_as("TrafficPolicy", "v1alpha1", tp);
    let said: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
    assert!(
        said.contains(&"spec.targetRefs: Required value".to_string()),
        "{said:?}"
    );
    assert!(
        said.iter()
            .any(|e| e.starts_with("spec.loadBalancer.algorithm: Unsupported value: \"LeastConn\"")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|e| e
            == "spec.connectionLimits.maxConnections: Invalid value: \"ten\": spec.connectionLimits.maxConnections in body must be of type integer: string"),
        "{said:?}"
    );
    // u32 fields carry a minimum of 0.
    let tp = json!({"apiVersion": "mesh.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "t", "namespace": "default"},
        "spec": {"targetRefs": [], "connectionLimits": {"maxConnections": -1}}});
    let (_, r) = admit_as("TrafficPolicy", "v1alpha1", tp);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(
        r.errors[0]
            .to_string()
            .contains("should be greater than or equal to 0"),
        "{}",
        r.errors[0]
    );
}

#[test]
fn nulls_of_non_nullable_fields_are_dropped_and_defaults_filled() {
    let mut schema: JSONSchemaProps = serde_json::from_value(json!({
        "type": "object",
        "properties": {"spec": {"type": "object", "properties": {
            "mode": {"type": "string", "default": "Auto", "enum": ["Auto", "Off"]},
            "count": {"type": "integer", "maximum": 3},
            "name": {"type": "string", "nullable": true, "pattern": "^[a-z]+$", "maxLength": 4},
            "tags": {"type": "array", "x-kubernetes-list-type": "set", "maxItems": 2,
                     "items": {"type": "string"}},
            "port": {"x-kubernetes-int-or-string": true}
        }}}
    }))
    .expect("schema");
    let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                         "spec": {"count": null, "name": null, "port": "http"}});
    let r = admit(&mut obj, &schema);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        obj["spec"],
        json!({"mode": "Auto", "name": null, "port": "http"})
    );
    let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                         "spec": {"count": 4, "name": "Abcde", "tags": ["a", "a", "b"],
                                  "port": true}});
    let said: Vec<String> = admit(&mut obj, &schema)
        .errors
        .iter()
        .map(ToString::to_string)
        .collect();
    for want in [
        "spec.count: Invalid value: 4: spec.count in body should be less than or equal to 3",
        "spec.name: Too long: may not be more than 4 bytes",
        "spec.name: Invalid value: \"Abcde\": spec.name in body should match '^[a-z]+$'",
        "spec.tags: Too many: 3: must have at most 2 items",
        "spec.tags[1]: Duplicate value: \"a\"",
        "spec.port: Invalid value: true: spec.port in body must be of type integer,string: boolean",
    ] {
        assert!(said.iter().any(|s| s == want), "{want} not in {said:?}");
    }
    // CEL rules are evaluated on the final value; what cannot be is listed as skipped.
    schema
        .properties
        .as_mut()
        .and_then(|p| p.get_mut("spec"))
        .expect("spec")
        .x_kubernetes_validations = Some(vec![
        serde_json::from_value(
            json!({"rule": "self.count < 2", "message": "count must be below 2"}),
        )
        .expect("rule"),
        serde_json::from_value(json!({"rule": "has(self.name)", "fieldPath": ".name"}))
            .expect("rule"),
        serde_json::from_value(json!({"rule": "self == oldSelf"})).expect("rule"),
    ]);
    let mut obj = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                         "spec": {"count": 3}});
    let r = admit(&mut obj, &schema);
    let said: Vec<String> = r.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        said,
        [
            "spec: Invalid value: \"object\": count must be below 2",
            "spec.name: Invalid value: \"object\": failed rule: has(self.name)",
        ]
    );
    assert_eq!(r.skipped_rules.len(), 1, "{:?}", r.skipped_rules);
    assert!(
        r.skipped_rules[0].starts_with("spec: self == oldSelf (a transition rule"),
        "{:?}",
        r.skipped_rules
    );
    let mut ok = json!({"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "x"},
                        "spec": {"count": 1, "name": "ab"}});
    assert!(admit(&mut ok, &schema).errors.is_empty());
}

#[test]
fn built_in_kinds_are_read_through_their_types() {
    let mut svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"ports": [{"port": 9080, "name": "http", "appProtcol": "http"}],
                 "selector": {"app": "reviews"}, "sessionAfinity": "None"}});
    let r = admit_builtin(&mut svc).expect("a known kind");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(
        r.pruned,
        vec![
            "spec.ports[0].appProtcol".to_string(),
            "spec.sessionAfinity".to_string()
        ]
    );
    assert_eq!(svc.pointer("/spec/ports/0/port"), Some(&json!(9080)));

    let mut bad = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "reviews"}, "spec": {"ports": [{"port": "http"}]}});
    let r = admit_builtin(&mut bad).expect("a known kind");
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].path, "spec.ports[0].port");

    let mut slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1"}, "endpoints": []});
    let r = admit_builtin(&mut slice).expect("a known kind");
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert_eq!(r.errors[0].to_string(), "addressType: Required value");

    let mut odd = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}});
    assert!(admit_builtin(&mut odd).is_none());
}

/// Every CEL rule of the chart's CRDs (the Gateway API's, upstream's) compiles here and calls
/// only functions defined here, so admission evaluates it, but the transition rule; a rule that
/// starts calling a function the `cel` crate lacks shows up here. (What they decide is checked
/// by `schema_cel`'s tests and `meshctl/tests/manifests.rs`.)
#[test]
fn every_cel_rule_of_the_chart_crds_can_be_evaluated_but_the_transition_rule() {
    fn collect(s: &JSONSchemaProps, path: &str, out: &mut Vec<(String, String)>) {
        for r in s.x_kubernetes_validations.iter().flatten() {
            out.push((path.to_owned(), r.rule.clone()));
        }
        for (k, sub) in s.properties.iter().flatten() {
            collect(sub, &format!("{path}.{k}"), out);
        }
        if let Some(JSONSchemaPropsOrArray::Schema(i)) = &s.items {
            collect(i, &format!("{path}[]"), out);
        }
        if let Some(JSONSchemaPropsOrBool::Schema(a)) = &s.additional_properties {
            collect(a, &format!("{path}{{}}"), out);
        }
    }
    let mut rules = Vec::new();
    for crd in chart_crds() {
        for v in crd.spec.versions.iter().filter(|v| v.storage) {
            if let Some(s) = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
            {
                collect(
                    s,
                    &format!("{} {}", crd.spec.names.kind, v.name),
                    &mut rules,
                );
            }
        }
    }
    let skipped: Vec<String> = rules
        .iter()
        .filter_map(|(at, rule)| {
            crate::schema_cel::unevaluable(rule).map(|why| format!("{at}: {rule} ({why})"))
        })
        .collect();
    println!(
        "{} CEL rules in the chart's CRDs, {} evaluable, skipped: {skipped:?}",
        rules.len(),
        rules.len() - skipped.len()
    );
    assert!(rules.len() > 100, "{}", rules.len());
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert!(skipped[0].contains("oldSelf"), "{skipped:?}");
}
