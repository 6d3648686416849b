//! Routes as manifests: the weights of an HTTPRoute's rule read and changed in a YAML value, so
//! fields this code does not know survive an edit, and a local mesh's directory of manifests
//! read and written the way its controller reads it. `meshctl route` and the controller's
//! rollouts change weights through this one piece of code.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_norway::{Mapping, Value};

/// Gateway API's largest backend weight.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A directory or manifest that could not be read or written; names the path.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {source}")]
    Yaml {
        path: PathBuf,
        document: usize,
        source: serde_norway::Error,
    },
    #[error("writing {path}: {source}")]
    Render {
        path: PathBuf,
        source: serde_norway::Error,
    },
}

/// The manifest files below `dir`, sorted: `*.yaml`/`*.yml`, recursively, hidden files and
/// directories skipped (as the controller's directory source reads them).
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Io {
        what: "reading directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e == "yaml" || e == "yml")
        {
            out.push(p);
        }
    }
    Ok(())
}

/// The YAML documents of a file, empty ones dropped.
pub fn read_docs(path: &Path) -> Result<Vec<Value>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
        let v = Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            path: path.to_path_buf(),
            document: i + 1,
            source,
        })?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Writes `docs` to `path` atomically (a temporary file renamed over it), so a controller
/// watching the directory never reads half a file.
pub fn write_docs(path: &Path, docs: &[Value]) -> Result<(), ManifestError> {
    let mut text = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(
            &serde_norway::to_string(d).map_err(|source| ManifestError::Render {
                path: path.to_path_buf(),
                source,
            })?,
        );
    }
    let tmp = path.with_extension("meshctl-tmp~");
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Io { what, path, source }
    };
    std::fs::write(&tmp, text).map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("writing", path))
}

/// The string at `path` of a document.
pub fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    cur.as_str()
}

/// `(namespace, name)` of a document; the namespace defaults to `default`, as `kubectl apply`
/// does.
pub fn meta(v: &Value) -> (String, String) {
    (
        str_at(v, &["metadata", "namespace"])
            .unwrap_or("default")
            .to_string(),
        str_at(v, &["metadata", "name"])
            .unwrap_or_default()
            .to_string(),
    )
}

/// Whether a route (in namespace `route_ns`) attaches to Service `ns/name` at `port`, or at
/// every port.
pub fn attaches(route: &Value, route_ns: &str, ns: &str, name: &str, port: u16) -> bool {
    let Some(parents) = route
        .get("spec")
        .and_then(|s| s.get("parentRefs"))
        .and_then(Value::as_sequence)
    else {
        return false;
    };
    parents.iter().any(|p| {
        let s = |k: &str| p.get(k).and_then(Value::as_str);
        s("kind") == Some("Service")
            && matches!(s("group"), Some("") | Some("core"))
            && s("name") == Some(name)
            && s("namespace").unwrap_or(route_ns) == ns
            && p.get("port")
                .and_then(Value::as_u64)
                .is_none_or(|q| q == u64::from(port))
    })
}

/// The rules of a route.
pub fn rules(route: &Value) -> &[Value] {
    route
        .get("spec")
        .and_then(|s| s.get("rules"))
        .and_then(Value::as_sequence)
        .map_or(&[], |v| v.as_slice())
}

/// Whether a rule matches every request: it has no `matches`, or one that asks for nothing
/// but the path prefix `/` (what an API server's default for `matches` gives).
pub fn matches_all(rule: &Value) -> bool {
    let Some(matches) = rule.get("matches").and_then(Value::as_sequence) else {
        return true;
    };
    let everything = |m: &Value| {
        let Some(fields) = m.as_mapping() else {
            return false;
        };
        fields.iter().all(|(k, v)| match k.as_str() {
            Some("path") => {
                str_at(v, &["type"]).is_none_or(|t| t == "PathPrefix")
                    && str_at(v, &["value"]).is_none_or(|p| p == "/")
            }
            Some("headers" | "queryParams") => v.as_sequence().is_none_or(|s| s.is_empty()),
            _ => false,
        })
    };
    matches.is_empty() || matches.iter().any(everything)
}

/// The rule a split changes: the last one that matches every request, or the only rule there
/// is.
pub fn split_rule(route: &Value) -> Option<usize> {
    split_rule_besides(route, None)
}

/// [`split_rule`], leaving out the rule named `skip` (a rollout's own header rule).
pub fn split_rule_besides(route: &Value, skip: Option<&str>) -> Option<usize> {
    let rs: Vec<(usize, &Value)> = rules(route)
        .iter()
        .enumerate()
        .filter(|(_, r)| skip.is_none() || r.get("name").and_then(Value::as_str) != skip)
        .collect();
    let catch_all = rs
        .iter()
        .rev()
        .find(|(_, r)| matches_all(r))
        .map(|(i, _)| *i);
    catch_all.or(match rs.as_slice() {
        [(i, _)] => Some(*i),
        _ => None,
    })
}

/// The rule named `name`.
pub fn rule_named(route: &Value, name: &str) -> Option<usize> {
    rules(route)
        .iter()
        .position(|r| r.get("name").and_then(Value::as_str) == Some(name))
}

/// `(backend, weight)` of a rule (a backendRef without weight weighs 1).
pub fn weights(rule: &Value) -> Vec<(String, u32)> {
    rule.get("backendRefs")
        .and_then(Value::as_sequence)
        .map(|refs| {
            refs.iter()
                .map(|b| {
                    let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                    let w = b
                        .get("weight")
                        .and_then(Value::as_u64)
                        .and_then(|w| u32::try_from(w).ok())
                        .unwrap_or(1);
                    (name.to_string(), w)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The port of a rule's backendRefs, when they name one.
pub fn backend_port(rule: &Value) -> Option<u16> {
    rule.get("backendRefs")
        .and_then(Value::as_sequence)?
        .iter()
        .find_map(|b| u16::try_from(b.get("port")?.as_u64()?).ok())
}

fn key(k: &str) -> Value {
    Value::String(k.to_string())
}

/// `backendRefs` sending to `ws` (Services of the route's namespace) at `port`.
pub fn backend_refs(ws: &[(String, u32)], port: u16) -> Value {
    Value::Sequence(
        ws.iter()
            .map(|(name, w)| {
                let mut m = Mapping::new();
                m.insert(key("name"), key(name));
                m.insert(key("port"), Value::Number(port.into()));
                m.insert(key("weight"), Value::Number((*w).into()));
                Value::Mapping(m)
            })
            .collect(),
    )
}

/// The rules of a route, to change.
fn rules_mut(route: &mut Value) -> Option<&mut Vec<Value>> {
    route
        .get_mut("spec")
        .and_then(|s| s.get_mut("rules"))
        .and_then(Value::as_sequence_mut)
}

/// Rule `index` of a route, to change; `None` when there is no such rule or it is not a
/// mapping.
pub fn rule_mut(route: &mut Value, index: usize) -> Option<&mut Mapping> {
    rules_mut(route)?
        .get_mut(index)
        .and_then(Value::as_mapping_mut)
}

/// Sets the backends of rule `index`; false when there is no such rule.
pub fn set_backends(route: &mut Value, index: usize, ws: &[(String, u32)], port: u16) -> bool {
    match rule_mut(route, index) {
        Some(rule) => {
            rule.insert(key("backendRefs"), backend_refs(ws, port));
            true
        }
        None => false,
    }
}

/// Removes the rule named `name`; tells whether there was one.
pub fn remove_rule(route: &mut Value, name: &str) -> bool {
    let Some(rules) = rules_mut(route) else {
        return false;
    };
    let before = rules.len();
    rules.retain(|r| r.get("name").and_then(Value::as_str) != Some(name));
    rules.len() != before
}

/// Puts `rule` before rule `index` (or replaces the rule of the same name, wherever it is).
pub fn insert_rule(route: &mut Value, index: usize, rule: Value) -> bool {
    let name = rule.get("name").and_then(Value::as_str).map(str::to_string);
    let Some(rules) = rules_mut(route) else {
        return false;
    };
    if let Some(at) = name.as_deref().and_then(|n| {
        rules
            .iter()
            .position(|r| r.get("name").and_then(Value::as_str) == Some(n))
    }) {
        rules[at] = rule;
    } else {
        rules.insert(index.min(rules.len()), rule);
    }
    true
}

/// A new HTTPRoute `<service>-split` attached to Service `ns/svc` at `port`, with one rule
/// and no backends yet.
pub fn new_split_route(ns: &str, svc: &str, port: u16) -> Value {
    let name = format!("{svc}-split");
    let mut parent = Mapping::new();
    parent.insert(key("group"), key(""));
    parent.insert(key("kind"), key("Service"));
    parent.insert(key("name"), key(svc));
    parent.insert(key("port"), Value::Number(port.into()));
    let mut rule = Mapping::new();
    rule.insert(key("backendRefs"), Value::Sequence(Vec::new()));
    let mut spec = Mapping::new();
    spec.insert(
        key("parentRefs"),
        Value::Sequence(vec![Value::Mapping(parent)]),
    );
    spec.insert(key("rules"), Value::Sequence(vec![Value::Mapping(rule)]));
    let mut metadata = Mapping::new();
    metadata.insert(key("name"), key(&name));
    metadata.insert(key("namespace"), key(ns));
    let mut route = Mapping::new();
    route.insert(key("apiVersion"), key("gateway.networking.k8s.io/v1"));
    route.insert(key("kind"), key("HTTPRoute"));
    route.insert(key("metadata"), Value::Mapping(metadata));
    route.insert(key("spec"), Value::Mapping(spec));
    Value::Mapping(route)
}

/// Where a manifest of kind `kind` named `ns/name` is in a directory: the file and the
/// document's index in it.
pub fn find_doc(
    dir: &Path,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<Option<(PathBuf, usize, Value)>, ManifestError> {
    for path in manifest_files(dir)? {
        for (i, v) in read_docs(&path)?.into_iter().enumerate() {
            if str_at(&v, &["kind"]) == Some(kind) && meta(&v) == (ns.to_string(), name.to_string())
            {
                return Ok(Some((path, i, v)));
            }
        }
    }
    Ok(None)
}

/// Replaces document `index` of `path` with `value`; false when the file no longer has it.
pub fn replace_doc(path: &Path, index: usize, value: Value) -> Result<bool, ManifestError> {
    let mut all = read_docs(path)?;
    let Some(slot) = all.get_mut(index) else {
        return Ok(false);
    };
    *slot = value;
    write_docs(path, &all)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Value {
        serde_norway::from_str(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]\n  rules:\n  - matches: [{headers: [{name: x, value: y}]}]\n    backendRefs: [{name: reviews-v3, port: 9080}]\n  - backendRefs: [{name: reviews-v1, port: 9080, weight: 90}, {name: reviews-v2, port: 9080, weight: 10}]\n    timeouts: {request: 2s}\n",
        )
        .expect("yaml")
    }

    #[test]
    fn the_split_rule_is_the_last_catch_all_and_its_weights_change_in_place() {
        let mut r = route();
        assert!(attaches(&r, "shop", "shop", "reviews", 9080));
        assert!(!attaches(&r, "shop", "shop", "reviews", 80));
        assert_eq!(split_rule(&r), Some(1));
        // As an API server stores a rule without matches.
        let defaulted: Value = serde_norway::from_str(
            "{matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: a}]}",
        )
        .expect("y");
        assert!(matches_all(&defaulted));
        assert!(!matches_all(&rules(&r)[0]));
        assert_eq!(weights(&rules(&r)[0]), [("reviews-v3".to_string(), 1)]);
        assert_eq!(backend_port(&rules(&r)[1]), Some(9080));
        assert!(set_backends(
            &mut r,
            1,
            &[("reviews-v1".into(), 0), ("reviews-v2".into(), 1)],
            9080
        ));
        assert_eq!(
            weights(&rules(&r)[1]),
            [("reviews-v1".to_string(), 0), ("reviews-v2".to_string(), 1)]
        );
        // The rule's other fields stay.
        assert_eq!(str_at(&rules(&r)[1], &["timeouts", "request"]), Some("2s"));
        assert!(!set_backends(&mut r, 7, &[], 9080));
    }

    #[test]
    fn a_named_rule_is_inserted_once_and_removed() {
        let mut r = route();
        let rule: Value =
            serde_norway::from_str("{name: canary, backendRefs: [{name: reviews-v2}]}").expect("y");
        assert!(insert_rule(&mut r, 1, rule.clone()));
        assert!(insert_rule(&mut r, 0, rule));
        assert_eq!(rules(&r).len(), 3);
        assert_eq!(rule_named(&r, "canary"), Some(1));
        assert!(remove_rule(&mut r, "canary"));
        assert!(!remove_rule(&mut r, "canary"));
        assert_eq!(rules(&r).len(), 2);
    }

    #[test]
    fn documents_are_found_and_replaced_in_their_file() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(dir.path().join(".hidden")).expect("mkdir");
        std::fs::write(
            dir.path().join(".hidden/x.yaml"),
            serde_norway::to_string(&route()).expect("y"),
        )
        .expect("write");
        assert!(
            find_doc(dir.path(), "HTTPRoute", "shop", "r")
                .expect("read")
                .is_none(),
            "hidden directories are skipped"
        );
        let svc: Value =
            serde_norway::from_str("{apiVersion: v1, kind: Service, metadata: {name: reviews}}")
                .expect("y");
        let path = dir.path().join("all.yaml");
        write_docs(&path, &[svc, route()]).expect("write");
        let (p, i, mut v) = find_doc(dir.path(), "HTTPRoute", "shop", "r")
            .expect("read")
            .expect("found");
        assert_eq!((p.clone(), i), (path.clone(), 1));
        set_backends(&mut v, 1, &[("reviews-v2".into(), 1)], 9080);
        assert!(replace_doc(&p, i, v).expect("write"));
        let back = read_docs(&path).expect("read");
        assert_eq!(back.len(), 2);
        assert_eq!(
            weights(&rules(&back[1])[1]),
            [("reviews-v2".to_string(), 1)]
        );
        assert!(!replace_doc(&p, 5, Value::Null).expect("write"));
    }
}
