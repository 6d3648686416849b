//! How kube-apiserver reads a custom object against its CRD's structural schema, in the order it
//! does: fields the schema does not name are pruned (unless `x-kubernetes-preserve-unknown-fields`
//! keeps them), `null`s of fields that are not `nullable` are dropped, defaults are filled in,
//! then the value is validated (types, `enum`, bounds, lengths, item counts, `pattern`,
//! `required`, list types). Errors read as the API server's do (`spec.x: Required value`).
//!
//! `x-kubernetes-validations` (CEL) rules are evaluated last, on the pruned and defaulted value
//! ([`schema_cel`](crate::schema_cel)); the few that cannot be evaluated here (transition rules,
//! functions the CEL crate lacks) are listed in [`Report::skipped_rules`] with the reason.
//!
//! Then, for every kind, the API server's hand-written validation ([`crate::schema_builtin`]:
//! names, labels, Service ports, Pod containers, workload selectors, EndpointSlice addresses).
//!
//! The fake API server admits custom objects through this, and `meshctl check` uses it to name
//! the fields of a manifest that a cluster with the installed schema would drop.
//!
//! Hand-written rather than a JSON Schema crate: pruning, defaulting, `nullable`,
//! `x-kubernetes-int-or-string` and list types are Kubernetes' own, and the error paths and
//! words must be the API server's.

use std::collections::BTreeSet;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    ValidationRule,
};
use serde_json::Value;

/// What reading one object found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Paths of fields removed because the schema does not name them (`spec.rules[0].retry`).
    pub pruned: Vec<String>,
    pub errors: Vec<FieldError>,
    /// `path: rule (why)` of each CEL rule met and not evaluated.
    pub skipped_rules: Vec<String>,
    /// CEL rules met, with the final value at their field: evaluated once the schema found no
    /// error, as the API server does.
    pending_rules: Vec<(String, Value, ValidationRule, String)>,
}

/// One invalid field, as the API server words it.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub path: String,
    pub kind: ErrorKind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ErrorKind {
    Required,
    /// The value, and what the schema says about it.
    Invalid(Value, String),
    Unsupported(Value, Vec<Value>),
    TooLong(i64),
    TooMany(usize, i64),
    Duplicate(Value),
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.path;
        match &self.kind {
            ErrorKind::Required => write!(f, "{p}: Required value"),
            ErrorKind::Invalid(v, why) => write!(f, "{p}: Invalid value: {v}: {why}"),
            ErrorKind::Unsupported(v, allowed) => {
                let allowed: Vec<String> = allowed.iter().map(Value::to_string).collect();
                write!(
                    f,
                    "{p}: Unsupported value: {v}: supported values: {}",
                    allowed.join(", ")
                )
            }
            ErrorKind::TooLong(max) => {
                write!(f, "{p}: Too long: may not be more than {max} bytes")
            }
            ErrorKind::TooMany(n, max) => {
                write!(f, "{p}: Too many: {n}: must have at most {max} items")
            }
            ErrorKind::Duplicate(v) => write!(f, "{p}: Duplicate value: {v}"),
        }
    }
}

/// The schema of `version` in a CRD, if it serves that version.
pub fn version_schema<'a>(
    crd: &'a CustomResourceDefinition,
    version: &str,
) -> Option<&'a JSONSchemaProps> {
    crd.spec
        .versions
        .iter()
        .find(|v| v.name == version && v.served)?
        .schema
        .as_ref()?
        .open_api_v3_schema
        .as_ref()
}

/// Reads `obj` (a whole object: `apiVersion`, `kind`, `metadata`, ...) against `schema` as the
/// API server would on a write: `obj` is left pruned and defaulted.
pub fn admit(obj: &mut Value, schema: &JSONSchemaProps) -> Report {
    let mut r = Report::default();
    let Some(map) = obj.as_object_mut() else {
        r.errors.push(FieldError {
            path: "<root>".into(),
            kind: ErrorKind::Invalid(obj.clone(), "must be of type object".into()),
        });
        return r;
    };
    // Every object keeps its type and metadata; metadata keeps only ObjectMeta's fields.
    if let Some(meta) = map.get_mut("metadata") {
        prune_metadata(meta, "metadata", &mut r);
    }
    let props = schema.properties.as_ref();
    let keys: Vec<String> = map.keys().cloned().collect();
    for k in keys {
        if matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&k)) {
            Some(s) => {
                let v = map.get_mut(&k).expect("key listed above");
                if v.is_null() && !s.nullable.unwrap_or(false) {
                    map.remove(&k);
                } else {
                    walk(v, s, &k, &mut r);
                }
            }
            None if schema.x_kubernetes_preserve_unknown_fields == Some(true) => {}
            None => {
                map.remove(&k);
                r.pruned.push(k);
            }
        }
    }
    fill_and_require(map, schema, "", &mut r);
    rules(obj, schema, "", &mut r);
    evaluate_rules(&mut r);
    r
}

/// The fields of `ObjectMeta` a client may write.
const OBJECT_META: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

fn prune_metadata(meta: &mut Value, path: &str, r: &mut Report) {
    if let Some(m) = meta.as_object_mut() {
        m.retain(|k, _| {
            let keep = OBJECT_META.contains(&k.as_str());
            if !keep {
                r.pruned.push(format!("{path}.{k}"));
            }
            keep
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Prunes, defaults and validates `v` (not `null`, or `null` and nullable) at `path`.
fn walk(v: &mut Value, s: &JSONSchemaProps, path: &str, r: &mut Report) {
    if v.is_null() {
        if !s.nullable.unwrap_or(false) {
            invalid(
                r,
                path,
                v,
                format!("{path} in body must be of type {}", type_name(s)),
            );
        }
        return;
    }
    if !type_ok(v, s) {
        let why = format!(
            "{path} in body must be of type {}: {}",
            type_name(s),
            kind_of(v)
        );
        invalid(r, path, v, why);
        return;
    }
    match v {
        Value::Object(map) => {
            if s.x_kubernetes_embedded_resource == Some(true)
                && let Some(meta) = map.get_mut("metadata")
            {
                prune_metadata(meta, &join(path, "metadata"), r);
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = join(path, &k);
                let embedded_meta = s.x_kubernetes_embedded_resource == Some(true)
                    && matches!(k.as_str(), "apiVersion" | "kind" | "metadata");
                let sub = s.properties.as_ref().and_then(|p| p.get(&k)).or(
                    match &s.additional_properties {
                        Some(JSONSchemaPropsOrBool::Schema(a)) => Some(a.as_ref()),
                        _ => None,
                    },
                );
                match sub {
                    Some(sub) => {
                        let cv = map.get_mut(&k).expect("key listed above");
                        if cv.is_null() && !sub.nullable.unwrap_or(false) && s.properties.is_some()
                        {
                            map.remove(&k);
                        } else {
                            walk(cv, sub, &child, r);
                        }
                    }
                    None if embedded_meta
                        || s.x_kubernetes_preserve_unknown_fields == Some(true)
                        || matches!(
                            s.additional_properties,
                            Some(JSONSchemaPropsOrBool::Bool(true))
                        ) => {}
                    None => {
                        map.remove(&k);
                        r.pruned.push(child);
                    }
                }
            }
            fill_and_require(map, s, path, r);
            if let Some(max) = s.max_properties
                && map.len() as i64 > max
            {
                r.errors.push(FieldError {
                    path: path.into(),
                    kind: ErrorKind::TooMany(map.len(), max),
                });
            }
            if let Some(min) = s.min_properties
                && (map.len() as i64) < min
            {
                let why = format!("{path} in body should have at least {min} properties");
                invalid(r, path, &Value::Object(map.clone()), why);
            }
        }
        Value::Array(items) => {
            if let Some(JSONSchemaPropsOrArray::Schema(item)) = &s.items {
                for (i, it) in items.iter_mut().enumerate() {
                    walk(it, item, &format!("{path}[{i}]"), r);
                }
            }
            if let Some(max) = s.max_items
                && items.len() as i64 > max
            {
                r.errors.push(FieldError {
                    path: path.into(),
                    kind: ErrorKind::TooMany(items.len(), max),
                });
            }
            if let Some(min) = s.min_items
                && (items.len() as i64) < min
            {
                let why = format!("{path} in body should have at least {min} items");
                invalid(r, path, &Value::Array(items.clone()), why);
            }
            list_type(items, s, path, r);
        }
        _ => {}
    }
    scalar(v, s, path, r);
    combinators(v, s, path, r);
    rules(v, s, path, r);
}

/// Missing properties that have a default get it; missing required ones are errors.
fn fill_and_require(
    map: &mut serde_json::Map<String, Value>,
    s: &JSONSchemaProps,
    path: &str,
    r: &mut Report,
) {
    for (k, sub) in s.properties.iter().flatten() {
        if !map.contains_key(k)
            && let Some(d) = &sub.default
        {
            let mut d = d.0.clone();
            walk(&mut d, sub, &join(path, k), r);
            map.insert(k.clone(), d);
        }
    }
    for k in s.required.iter().flatten() {
        if !map.contains_key(k) {
            r.errors.push(FieldError {
                path: join(path, k),
                kind: ErrorKind::Required,
            });
        }
    }
}

/// Notes the CEL rules on `s`, with `self` the final `v`, for [`evaluate_rules`].
fn rules(v: &Value, s: &JSONSchemaProps, path: &str, r: &mut Report) {
    for rule in s.x_kubernetes_validations.iter().flatten() {
        r.pending_rules.push((
            path.to_owned(),
            v.clone(),
            rule.clone(),
            type_name(s).to_owned(),
        ));
    }
}

/// The CEL rules noted, evaluated as the API server does: only when the schema found nothing
/// wrong (else one error says they were not checked), each failure at its field (the rule's
/// `fieldPath` below it) with the rule's message.
fn evaluate_rules(r: &mut Report) {
    use crate::schema_cel::{Outcome, check};
    let pending = std::mem::take(&mut r.pending_rules);
    if pending.is_empty() {
        return;
    }
    if !r.errors.is_empty() {
        r.errors.push(FieldError {
            path: "<nil>".into(),
            kind: ErrorKind::Invalid(
                Value::String("object".into()),
                "some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
            ),
        });
        return;
    }
    for (path, v, rule, type_name) in pending {
        let at = match rule.field_path.as_deref() {
            Some(f) if !f.is_empty() => format!("{path}{f}").trim_start_matches('.').to_owned(),
            _ => path.clone(),
        };
        // The API server names the value by its type for anything but a scalar.
        let shown = match &v {
            Value::Object(_) | Value::Array(_) => Value::String(type_name),
            other => other.clone(),
        };
        let failed = |why: String| FieldError {
            path: if at.is_empty() {
                "<nil>".into()
            } else {
                at.clone()
            },
            kind: ErrorKind::Invalid(shown.clone(), why),
        };
        match check(&rule.rule, &v) {
            Outcome::Holds => {}
            Outcome::Fails => r.errors.push(failed(
                rule.message
                    .clone()
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| format!("failed rule: {}", rule.rule)),
            )),
            Outcome::Error(e) => r.errors.push(failed(format!(
                "rule {:?} could not be evaluated: {e}",
                rule.rule
            ))),
            Outcome::Skipped(why) => r.skipped_rules.push(format!(
                "{}: {} ({why})",
                if path.is_empty() { "<root>" } else { &path },
                rule.rule
            )),
        }
    }
}

fn invalid(r: &mut Report, path: &str, v: &Value, why: String) {
    r.errors.push(FieldError {
        path: path.into(),
        kind: ErrorKind::Invalid(v.clone(), why),
    });
}

fn type_name(s: &JSONSchemaProps) -> &str {
    if s.x_kubernetes_int_or_string == Some(true) {
        return "integer,string";
    }
    s.type_.as_deref().unwrap_or("any")
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(v: &Value, s: &JSONSchemaProps) -> bool {
    let int = |v: &Value| {
        v.as_i64().is_some() || v.as_u64().is_some() || v.as_f64().is_some_and(|f| f.fract() == 0.0)
    };
    if s.x_kubernetes_int_or_string == Some(true) {
        return v.is_string() || int(v);
    }
    match s.type_.as_deref() {
        None | Some("") => true,
        Some("object") => v.is_object(),
        Some("array") => v.is_array(),
        Some("string") => v.is_string(),
        Some("boolean") => v.is_boolean(),
        Some("integer") => int(v),
        Some("number") => v.is_number(),
        Some(_) => false,
    }
}

/// `enum`, bounds, lengths and patterns of one value.
fn scalar(v: &Value, s: &JSONSchemaProps, path: &str, r: &mut Report) {
    if let Some(allowed) = &s.enum_ {
        let allowed: Vec<Value> = allowed.iter().map(|j| j.0.clone()).collect();
        if !allowed.contains(v) {
            r.errors.push(FieldError {
                path: path.into(),
                kind: ErrorKind::Unsupported(v.clone(), allowed),
            });
        }
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = s.minimum {
            let exclusive = s.exclusive_minimum == Some(true);
            if n < min || (exclusive && n == min) {
                let than = if exclusive { "" } else { " or equal to" };
                let why = format!("{path} in body should be greater than{than} {min}");
                invalid(r, path, v, why);
            }
        }
        if let Some(max) = s.maximum {
            let exclusive = s.exclusive_maximum == Some(true);
            if n > max || (exclusive && n == max) {
                let than = if exclusive { "" } else { " or equal to" };
                let why = format!("{path} in body should be less than{than} {max}");
                invalid(r, path, v, why);
            }
        }
        if let Some(m) = s.multiple_of
            && m > 0.0
            && (n / m).fract() != 0.0
        {
            invalid(
                r,
                path,
                v,
                format!("{path} in body should be a multiple of {m}"),
            );
        }
    }
    if let Some(text) = v.as_str() {
        if let Some(max) = s.max_length
            && text.chars().count() as i64 > max
        {
            r.errors.push(FieldError {
                path: path.into(),
                kind: ErrorKind::TooLong(max),
            });
        }
        if let Some(min) = s.min_length
            && (text.chars().count() as i64) < min
        {
            let why = format!("{path} in body should be at least {min} chars long");
            invalid(r, path, v, why);
        }
        if let Some(p) = &s.pattern {
            match regex::Regex::new(p) {
                Ok(re) if !re.is_match(text) => {
                    invalid(r, path, v, format!("{path} in body should match '{p}'"));
                }
                Ok(_) => {}
                Err(e) => invalid(
                    r,
                    path,
                    v,
                    format!("the schema's pattern {p:?} does not compile: {e}"),
                ),
            }
        }
    }
}

/// `x-kubernetes-list-type: set` items are unique; `map` items are unique by their keys.
fn list_type(items: &[Value], s: &JSONSchemaProps, path: &str, r: &mut Report) {
    let key_of = |it: &Value| -> Value {
        match s.x_kubernetes_list_type.as_deref() {
            Some("map") => Value::Array(
                s.x_kubernetes_list_map_keys
                    .iter()
                    .flatten()
                    .map(|k| it.get(k).cloned().unwrap_or(Value::Null))
                    .collect(),
            ),
            _ => it.clone(),
        }
    };
    if !matches!(s.x_kubernetes_list_type.as_deref(), Some("set" | "map"))
        && s.unique_items != Some(true)
    {
        return;
    }
    let mut seen = BTreeSet::new();
    for (i, it) in items.iter().enumerate() {
        if !seen.insert(key_of(it).to_string()) {
            r.errors.push(FieldError {
                path: format!("{path}[{i}]"),
                kind: ErrorKind::Duplicate(key_of(it)),
            });
        }
    }
}

/// `allOf`, `anyOf`, `oneOf` and `not`: value validations only (structural schemas put no
/// properties to prune in them).
fn combinators(v: &Value, s: &JSONSchemaProps, path: &str, r: &mut Report) {
    let passes = |sub: &JSONSchemaProps| {
        let mut scratch = Report::default();
        let mut copy = v.clone();
        check_only(&mut copy, sub, path, &mut scratch);
        scratch.errors.is_empty()
    };
    for sub in s.all_of.iter().flatten() {
        let mut copy = v.clone();
        check_only(&mut copy, sub, path, r);
    }
    if let Some(any) = &s.any_of
        && !any.iter().any(passes)
    {
        invalid(
            r,
            path,
            v,
            format!("{path} in body must match at least one schema in anyOf"),
        );
    }
    if let Some(one) = &s.one_of
        && one.iter().filter(|sub| passes(sub)).count() != 1
    {
        invalid(
            r,
            path,
            v,
            format!("{path} in body must match exactly one schema in oneOf"),
        );
    }
    if let Some(not) = &s.not
        && passes(not)
    {
        invalid(
            r,
            path,
            v,
            format!("{path} in body must not match the schema in not"),
        );
    }
}

/// A value validation by a combinator's branch: unknown fields are not pruned by it.
fn check_only(v: &mut Value, s: &JSONSchemaProps, path: &str, r: &mut Report) {
    let mut s = s.clone();
    s.x_kubernetes_preserve_unknown_fields = Some(true);
    let before = r.pruned.len();
    walk(v, &s, path, r);
    r.pruned.truncate(before);
}

/// Reads `obj` as a cluster whose custom kinds are `crds` would on a write: by the CRD of its
/// group and kind, or else as a built-in kind. `None` when neither knows it (the API server
/// would answer 404).
pub fn admit_in(obj: &mut Value, crds: &[CustomResourceDefinition]) -> Option<Report> {
    let api_version = obj.get("apiVersion")?.as_str()?.to_owned();
    let kind = obj.get("kind")?.as_str()?.to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let crd = crds
        .iter()
        .find(|c| c.spec.group == group && c.spec.names.kind == kind);
    match crd {
        Some(crd) => {
            let Some(schema) = version_schema(crd, version) else {
                let mut r = Report::default();
                r.errors.push(FieldError {
                    path: "apiVersion".into(),
                    kind: ErrorKind::Invalid(
                        Value::String(api_version.clone()),
                        format!("the installed {kind} CRD does not serve version {version}"),
                    ),
                });
                return Some(r);
            };
            let mut r = admit(obj, schema);
            crate::schema_builtin::validate(obj, &mut r);
            Some(r)
        }
        None => admit_builtin(obj),
    }
}

/// Reads a built-in object (`v1` Service, `apps/v1` Deployment, ...) as the API server would:
/// through its typed form, so a field of the wrong type is refused and a field the type does not
/// have is pruned. `None` for a kind this does not know (the API server would answer 404).
pub fn admit_builtin(obj: &mut Value) -> Option<Report> {
    let api_version = obj.get("apiVersion")?.as_str()?.to_owned();
    let kind = obj.get("kind")?.as_str()?.to_owned();
    macro_rules! kinds {
        ($($t:ty),* $(,)?) => {
            $(
                if api_version == <$t as k8s_openapi::Resource>::API_VERSION
                    && kind == <$t as k8s_openapi::Resource>::KIND
                {
                    let mut r = typed::<$t>(obj);
                    if r.errors.is_empty() {
                        crate::schema_builtin::validate(obj, &mut r);
                    }
                    return Some(r);
                }
            )*
        };
    }
    use k8s_openapi::api::{
        admissionregistration::v1 as admission, apps::v1 as apps, batch::v1 as batch,
        coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery,
        networking::v1 as networking, policy::v1 as policy, rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
    kinds!(
        core::Namespace,
        core::Service,
        core::Endpoints,
        core::Pod,
        core::ServiceAccount,
        core::ConfigMap,
        core::Event,
        core::Secret,
        discovery::EndpointSlice,
        apps::Deployment,
        apps::StatefulSet,
        apps::DaemonSet,
        batch::Job,
        networking::NetworkPolicy,
        rbac::ClusterRole,
        rbac::ClusterRoleBinding,
        rbac::Role,
        rbac::RoleBinding,
        admission::MutatingWebhookConfiguration,
        admission::ValidatingWebhookConfiguration,
        apiextensions::CustomResourceDefinition,
        coordination::Lease,
        policy::PodDisruptionBudget,
    );
    None
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize + schemars::JsonSchema>(
    obj: &mut Value,
) -> Report {
    let mut r = Report::default();
    // k8s-openapi fills a missing required field with its default; its OpenAPI schema says
    // which fields are required, as the API server's does.
    let schema = schemars::SchemaGenerator::default().into_root_schema_for::<T>();
    let schema = schema.as_value();
    required(obj, schema, schema, "", &mut r);
    if !r.errors.is_empty() {
        return r;
    }
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&*obj);
    match parsed.map(|t| serde_json::to_value(&t)) {
        Ok(Ok(back)) => {
            dropped(obj, &back, "", &mut r.pruned);
            *obj = back;
        }
        Ok(Err(e)) => r.errors.push(FieldError {
            path: "<root>".into(),
            kind: ErrorKind::Invalid(Value::Null, e.to_string()),
        }),
        Err(e) => {
            let path = e.path().to_string();
            let value = pointer_of(obj, &path).cloned().unwrap_or(Value::Null);
            let inner = e.into_inner().to_string();
            let kind = if inner.starts_with("missing field") {
                ErrorKind::Required
            } else {
                ErrorKind::Invalid(value, inner.clone())
            };
            // A missing field's path is its parent's; name the field itself.
            let path = match (&kind, inner.split('`').nth(1)) {
                (ErrorKind::Required, Some(field)) if path == "." => field.to_owned(),
                (ErrorKind::Required, Some(field)) => format!("{path}.{field}"),
                _ => path,
            };
            r.errors.push(FieldError { path, kind });
        }
    }
    r
}

/// Required fields missing from `v`, by a schemars schema (`$ref`s into `root`'s `$defs`).
fn required(v: &Value, s: &Value, root: &Value, path: &str, r: &mut Report) {
    let s = match s.get("$ref").and_then(Value::as_str) {
        Some(reference) => match reference.strip_prefix('#').and_then(|p| root.pointer(p)) {
            Some(target) => target,
            None => return,
        },
        None => s,
    };
    match v {
        Value::Object(map) => {
            for k in s
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(k) = k.as_str()
                    && map.get(k).is_none_or(Value::is_null)
                {
                    r.errors.push(FieldError {
                        path: join(path, k),
                        kind: ErrorKind::Required,
                    });
                }
            }
            for (k, cv) in map {
                let sub = s
                    .pointer(&format!(
                        "/properties/{}",
                        k.replace('~', "~0").replace('/', "~1")
                    ))
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()));
                if let Some(sub) = sub {
                    required(cv, sub, root, &join(path, k), r);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.get("items") {
                for (i, it) in items.iter().enumerate() {
                    required(it, item, root, &format!("{path}[{i}]"), r);
                }
            }
        }
        _ => {}
    }
}

/// The value at a `serde_path_to_error` path (`spec.ports[0].port`).
fn pointer_of<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (name, idx) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if !name.is_empty() {
            cur = cur.get(name)?;
        }
        if let Some(i) = idx {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

/// Paths of fields of `sent` that `kept` does not have (nulls and empty values aside, which a
/// typed round trip drops without loss).
fn dropped(sent: &Value, kept: &Value, path: &str, out: &mut Vec<String>) {
    match (sent, kept) {
        (Value::Object(s), Value::Object(k)) => {
            for (key, v) in s {
                let child = join(path, key);
                match k.get(key) {
                    Some(kv) => dropped(v, kv, &child, out),
                    None if empty(v) => {}
                    None => out.push(child),
                }
            }
        }
        (Value::Array(s), Value::Array(k)) => {
            for (i, (sv, kv)) in s.iter().zip(k).enumerate() {
                dropped(sv, kv, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(empty),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
#[path = "schema_tests.rs"]
mod tests;
