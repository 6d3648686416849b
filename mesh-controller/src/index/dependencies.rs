//! The `mesh.dev/dependencies` annotation (`mesh_api::consts::labels::DEPENDENCIES`), on a
//! pod or a namespace: the Services its workloads call, which scoped proxies are then given up
//! front instead of looking each one up on its first connection (as Istio's `Sidecar` egress
//! hosts do, but only as a head start: anything else is still looked up on demand).
//!
//! Entries are separated by commas or whitespace; each is one of:
//! - `name`: the Service `name` in the annotated object's namespace;
//! - `namespace/name`: the Service `name` in `namespace`;
//! - `namespace/*`: every Service in `namespace`; `*` alone is every Service of the object's
//!   own namespace.

use std::collections::BTreeSet;

use serde::Serialize;

use super::model::SvcKey;
use crate::objects::is_dns_label;

/// What one entry names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Dependency {
    Service(SvcKey),
    /// Every Service in this namespace.
    Namespace(String),
}

/// The entries of an annotation `value` on an object in `namespace`, and a reason for each
/// entry that cannot be read (those are left out).
pub fn parse(value: &str, namespace: &str) -> (BTreeSet<Dependency>, Vec<String>) {
    let mut out = BTreeSet::new();
    let mut errors = Vec::new();
    for entry in value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
    {
        let (ns, name) = entry.split_once('/').unwrap_or((namespace, entry));
        let dep = match name {
            "*" if is_dns_label(ns, false) => Some(Dependency::Namespace(ns.to_string())),
            _ if is_dns_label(ns, false) && is_dns_label(name, true) => {
                Some(Dependency::Service(SvcKey::new(ns, name)))
            }
            _ => None,
        };
        match dep {
            Some(d) => {
                out.insert(d);
            }
            None => errors.push(format!(
                "{entry:?} is not a Service as `name`, `namespace/name` or `namespace/*`"
            )),
        }
    }
    (out, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_services_and_namespaces_and_bad_ones_are_reported() {
        let (deps, errors) = parse(
            "reviews, payments/ledger  billing/*\n*,,Bad_Name, a/b/c",
            "shop",
        );
        assert_eq!(
            deps.into_iter().collect::<Vec<_>>(),
            [
                Dependency::Service(SvcKey::new("payments", "ledger")),
                Dependency::Service(SvcKey::new("shop", "reviews")),
                Dependency::Namespace("billing".into()),
                Dependency::Namespace("shop".into()),
            ]
        );
        assert_eq!(
            errors,
            [
                "\"Bad_Name\" is not a Service as `name`, `namespace/name` or `namespace/*`",
                "\"a/b/c\" is not a Service as `name`, `namespace/name` or `namespace/*`",
            ]
        );
        assert_eq!(parse("", "shop"), (BTreeSet::new(), Vec::new()));
    }
}
