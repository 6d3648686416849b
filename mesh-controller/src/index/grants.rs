//! ReferenceGrants: which objects of other namespaces may refer to a namespace's objects. A
//! grant lives in the namespace of the objects it shares (the target's), as the Gateway API
//! defines it: a route in `shop` may send to a Service in `payments` only if a ReferenceGrant in
//! `payments` lets routes of that kind from `shop` refer to Services (all, or that one by name).

use gateway_api::referencegrants::ReferenceGrant;

use crate::objects::DocError;

/// The Gateway API's group, which routes and Gateways belong to.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// One ReferenceGrant, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    from: Vec<From>,
    to: Vec<To>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct From {
    group: String,
    kind: String,
    namespace: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct To {
    group: String,
    kind: String,
    name: Option<String>,
}

/// What refers (its group and kind, and the namespace it is in).
#[derive(Clone, Copy, Debug)]
pub struct Referrer<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
}

/// What is referred to, in the grant's namespace.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
}

/// The core API group, which the Gateway API writes as "" (and some write as "core").
fn core(group: &str) -> &str {
    if group == "core" { "" } else { group }
}

impl Grant {
    /// Reads a ReferenceGrant; the API server has checked the lists' shapes, so what is left to
    /// refuse is a grant that could never match.
    pub fn read(g: &ReferenceGrant) -> Result<Self, DocError> {
        if g.spec.from.is_empty() {
            return Err(DocError::new(
                "spec.from",
                "must name at least one referrer",
            ));
        }
        if g.spec.to.is_empty() {
            return Err(DocError::new("spec.to", "must name at least one target"));
        }
        Ok(Self {
            from: g
                .spec
                .from
                .iter()
                .map(|f| From {
                    group: core(&f.group).to_string(),
                    kind: f.kind.clone(),
                    namespace: f.namespace.clone(),
                })
                .collect(),
            to: g
                .spec
                .to
                .iter()
                .map(|t| To {
                    group: core(&t.group).to_string(),
                    kind: t.kind.clone(),
                    name: t.name.clone().filter(|n| !n.is_empty()),
                })
                .collect(),
        })
    }

    /// Whether this grant lets `from` refer to `to` (which is in the grant's namespace).
    pub fn allows(&self, from: Referrer<'_>, to: Target<'_>) -> bool {
        self.from.iter().any(|f| {
            f.group == core(from.group) && f.kind == from.kind && f.namespace == from.namespace
        }) && self.to.iter().any(|t| {
            t.group == core(to.group)
                && t.kind == to.kind
                && t.name.as_deref().is_none_or(|n| n == to.name)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(yaml: &str) -> Grant {
        let crate::objects::Object::ReferenceGrant(g) = crate::testing::obj(yaml) else {
            panic!("not a ReferenceGrant");
        };
        Grant::read(&g).expect("read")
    }

    const ROUTE_FROM_SHOP: Referrer<'static> = Referrer {
        group: GATEWAY_GROUP,
        kind: "HTTPRoute",
        namespace: "shop",
    };

    fn service(name: &str) -> Target<'_> {
        Target {
            group: "",
            kind: "Service",
            name,
        }
    }

    #[test]
    fn a_grant_matches_on_every_field_of_from_and_to() {
        let g = grant(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: g, namespace: payments}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: ledger}]
"#,
        );
        assert!(g.allows(ROUTE_FROM_SHOP, service("ledger")));
        assert!(!g.allows(ROUTE_FROM_SHOP, service("cards")), "another name");
        let grpc = Referrer {
            kind: "GRPCRoute",
            ..ROUTE_FROM_SHOP
        };
        assert!(
            !g.allows(grpc, service("ledger")),
            "another kind of referrer"
        );
        let other_ns = Referrer {
            namespace: "web",
            ..ROUTE_FROM_SHOP
        };
        assert!(!g.allows(other_ns, service("ledger")), "another namespace");
        let secret = Target {
            kind: "Secret",
            ..service("ledger")
        };
        assert!(!g.allows(ROUTE_FROM_SHOP, secret), "another kind of target");
    }

    #[test]
    fn a_grant_without_a_name_shares_every_object_of_the_kind() {
        let g = grant(
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: g, namespace: payments}
spec:
  from:
  - {group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}
  - {group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: shop}
  to: [{group: core, kind: Service}]
"#,
        );
        assert!(g.allows(ROUTE_FROM_SHOP, service("ledger")));
        assert!(g.allows(ROUTE_FROM_SHOP, service("cards")));
    }
}
