//! The Kubernetes objects the controller reads, one enum over all kinds, and how a YAML/JSON
//! document becomes one of them (with the path of the field that is wrong when it cannot).

use std::fmt;

use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_api::crds::{AuthorizationPolicy, FaultInjection, RateLimitPolicy, TrafficPolicy};
use mesh_api::rollout::Rollout;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Every kind the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Service,
    EndpointSlice,
    Pod,
    HTTPRoute,
    GRPCRoute,
    AuthorizationPolicy,
    TrafficPolicy,
    RateLimitPolicy,
    FaultInjection,
    Rollout,
    ReferenceGrant,
    GatewayClass,
    Gateway,
    /// TLS Secrets only (`type: kubernetes.io/tls`): a Gateway listener's certificates.
    Secret,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::AuthorizationPolicy,
        Kind::TrafficPolicy,
        Kind::RateLimitPolicy,
        Kind::FaultInjection,
        Kind::Rollout,
        Kind::ReferenceGrant,
        Kind::GatewayClass,
        Kind::Gateway,
        Kind::Secret,
    ];

    /// The `apiVersion` values accepted for this kind.
    fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::Service | Kind::Pod | Kind::Secret => &["v1"],
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            Kind::HTTPRoute
            | Kind::GRPCRoute
            | Kind::ReferenceGrant
            | Kind::GatewayClass
            | Kind::Gateway => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            Kind::AuthorizationPolicy
            | Kind::TrafficPolicy
            | Kind::RateLimitPolicy
            | Kind::FaultInjection
            | Kind::Rollout => &["mesh.dev/v1alpha1"],
        }
    }

    fn from_name(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| format!("{k:?}") == kind)
    }

    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::GatewayClass)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identity of an object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object of a kind the index holds.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    Namespace(Namespace),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    HttpRoute(HttpRoute),
    GrpcRoute(GrpcRoute),
    AuthorizationPolicy(AuthorizationPolicy),
    TrafficPolicy(TrafficPolicy),
    RateLimitPolicy(RateLimitPolicy),
    FaultInjection(FaultInjection),
    Rollout(Rollout),
    ReferenceGrant(ReferenceGrant),
    GatewayClass(GatewayClass),
    Gateway(Gateway),
    Secret(Secret),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::HttpRoute(_) => Kind::HTTPRoute,
            Object::GrpcRoute(_) => Kind::GRPCRoute,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::TrafficPolicy(_) => Kind::TrafficPolicy,
            Object::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Object::FaultInjection(_) => Kind::FaultInjection,
            Object::Rollout(_) => Kind::Rollout,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
            Object::GatewayClass(_) => Kind::GatewayClass,
            Object::Gateway(_) => Kind::Gateway,
            Object::Secret(_) => Kind::Secret,
        }
    }

    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::TrafficPolicy(o) => &o.metadata,
            Object::RateLimitPolicy(o) => &o.metadata,
            Object::FaultInjection(o) => &o.metadata,
            Object::Rollout(o) => &o.metadata,
            Object::ReferenceGrant(o) => &o.metadata,
            Object::GatewayClass(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &mut o.metadata,
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Pod(o) => &mut o.metadata,
            Object::HttpRoute(o) => &mut o.metadata,
            Object::GrpcRoute(o) => &mut o.metadata,
            Object::AuthorizationPolicy(o) => &mut o.metadata,
            Object::TrafficPolicy(o) => &mut o.metadata,
            Object::RateLimitPolicy(o) => &mut o.metadata,
            Object::FaultInjection(o) => &mut o.metadata,
            Object::Rollout(o) => &mut o.metadata,
            Object::ReferenceGrant(o) => &mut o.metadata,
            Object::GatewayClass(o) => &mut o.metadata,
            Object::Gateway(o) => &mut o.metadata,
            Object::Secret(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ObjKey {
        let m = self.meta();
        let kind = self.kind();
        ObjKey {
            kind,
            namespace: if kind.is_namespaced() {
                m.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

/// Why a document is not an object the controller can use. `field` is a path into the document
/// (`spec.rules[0].backendRefs[1].weight`), empty when the document as a whole is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}{reason}", if field.is_empty() { String::new() } else { format!("field {field}: ") })]
pub struct DocError {
    pub field: String,
    pub reason: String,
}

impl DocError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// What can be read of a document's identity even when the rest of it is wrong; used to keep the
/// last good version of that object in force.
pub fn doc_identity(doc: &serde_json::Value, default_namespace: &str) -> Option<ObjKey> {
    let kind = Kind::from_name(doc.get("kind")?.as_str()?)?;
    let meta = doc.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_string();
    let namespace = if kind.is_namespaced() {
        meta.get("namespace")
            .and_then(|n| n.as_str())
            .unwrap_or(default_namespace)
            .to_string()
    } else {
        String::new()
    };
    Some(ObjKey {
        kind,
        namespace,
        name,
    })
}

/// Turns one parsed document into an object. Namespaced objects without a namespace get
/// `default_namespace`, as `kubectl apply` does.
pub fn parse_doc(doc: serde_json::Value, default_namespace: &str) -> Result<Object, DocError> {
    let api_version = doc
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .ok_or_else(|| DocError::new("apiVersion", "missing or not a string"))?
        .to_string();
    let kind_name = doc
        .get("kind")
        .and_then(|v| v.as_str())
        .ok_or_else(|| DocError::new("kind", "missing or not a string"))?
        .to_string();
    let kind = Kind::from_name(&kind_name).ok_or_else(|| {
        DocError::new(
            "kind",
            format!(
                "unsupported kind {kind_name:?}; supported: {}",
                Kind::ALL.map(|k| k.to_string()).join(", ")
            ),
        )
    })?;
    if !kind.api_versions().contains(&api_version.as_str()) {
        return Err(DocError::new(
            "apiVersion",
            format!(
                "{api_version:?} is not served for kind {kind}; use {}",
                kind.api_versions().join(" or ")
            ),
        ));
    }
    let mut obj = match kind {
        Kind::Namespace => Object::Namespace(typed(doc)?),
        Kind::Service => Object::Service(typed(doc)?),
        Kind::EndpointSlice => Object::EndpointSlice(typed(doc)?),
        Kind::Pod => Object::Pod(typed(doc)?),
        Kind::HTTPRoute => Object::HttpRoute(typed(doc)?),
        Kind::GRPCRoute => Object::GrpcRoute(typed(doc)?),
        Kind::AuthorizationPolicy => Object::AuthorizationPolicy(typed(doc)?),
        Kind::TrafficPolicy => Object::TrafficPolicy(typed(doc)?),
        Kind::RateLimitPolicy => Object::RateLimitPolicy(typed(doc)?),
        Kind::FaultInjection => Object::FaultInjection(typed(doc)?),
        Kind::Rollout => Object::Rollout(typed(doc)?),
        Kind::ReferenceGrant => Object::ReferenceGrant(typed(doc)?),
        Kind::GatewayClass => Object::GatewayClass(typed(doc)?),
        Kind::Gateway => Object::Gateway(typed(doc)?),
        Kind::Secret => Object::Secret(typed(doc)?),
    };
    let meta = obj.meta_mut();
    match meta.name.as_deref() {
        None | Some("") => return Err(DocError::new("metadata.name", "missing")),
        // Service and Namespace names become DNS labels (and parts of xDS names): no dots.
        Some(name) if kind == Kind::Service => validate_label(name, "metadata.name", true)?,
        Some(name) if kind == Kind::Namespace => validate_label(name, "metadata.name", false)?,
        Some(name) => validate_dns_label(name, "metadata.name", 253)?,
    }
    if kind.is_namespaced() {
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some(default_namespace.to_string());
        }
        if let Some(ns) = meta.namespace.as_deref() {
            validate_label(ns, "metadata.namespace", false)?;
        }
    }
    Ok(obj)
}

fn typed<T: DeserializeOwned>(doc: serde_json::Value) -> Result<T, DocError> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        DocError::new(field, e.into_inner().to_string())
    })
}

/// A DNS label (RFC 1123; with `letter_first`, RFC 1035 as Service names need): lowercase
/// letters, digits and '-', at most 63 characters, starting and ending with a letter or digit.
pub(crate) fn is_dns_label(value: &str, letter_first: bool) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && value
            .starts_with(|c: char| c.is_ascii_lowercase() || (!letter_first && c.is_ascii_digit()))
        && value.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// [`is_dns_label`], or an error naming the field.
fn validate_label(value: &str, field: &str, letter_first: bool) -> Result<(), DocError> {
    if is_dns_label(value, letter_first) {
        return Ok(());
    }
    Err(DocError::new(
        field,
        format!(
            "{value:?} is not a valid DNS label: lowercase letters, digits and '-', at most 63 characters, starting with a {} and ending with a letter or digit",
            if letter_first {
                "letter"
            } else {
                "letter or digit"
            }
        ),
    ))
}

/// Kubernetes object names: lowercase alphanumerics, '-' and '.', starting and ending alphanumeric.
pub(crate) fn validate_dns_label(value: &str, field: &str, max: usize) -> Result<(), DocError> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ok_ends = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if value.len() > max || !ok_chars || !ok_ends {
        return Err(DocError::new(
            field,
            format!(
                "{value:?} is not a valid name: lowercase letters, digits, '-' and '.', at most {max} characters, starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// A `kubernetes.io/tls` Secret holding the PEM `cert` and `key`.
pub fn tls_secret_yaml(ns: &str, name: &str, cert: &str, key: &str) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/tls\nmetadata: {{name: {name}, namespace: {ns}}}\ndata: {{tls.crt: {}, tls.key: {}}}\n",
        b64(cert),
        b64(key)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> serde_json::Value {
        serde_norway::from_str(yaml).expect("test yaml")
    }

    #[test]
    fn parses_service_with_default_namespace() {
        let obj = parse_doc(
            doc("apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 80}]}"),
            "default",
        )
        .expect("parses");
        assert_eq!(
            obj.key(),
            ObjKey {
                kind: Kind::Service,
                namespace: "default".into(),
                name: "reviews".into()
            }
        );
    }

    #[test]
    fn names_the_bad_field() {
        let err = parse_doc(
            doc("apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: eighty}]}"),
            "default",
        )
        .expect_err("bad port");
        assert_eq!(err.field, "spec.ports[0].port");
    }

    #[test]
    fn rejects_unknown_kind_and_version() {
        let err = parse_doc(
            doc("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}"),
            "d",
        )
        .expect_err("unknown kind");
        assert_eq!(err.field, "kind");
        let err = parse_doc(
            doc("apiVersion: v2\nkind: Service\nmetadata: {name: s}"),
            "d",
        )
        .expect_err("unknown version");
        assert_eq!(err.field, "apiVersion");
        let err = parse_doc(
            doc("apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}"),
            "d",
        )
        .expect_err("bad name");
        assert_eq!(err.field, "metadata.name");
    }

    #[test]
    fn identity_survives_a_bad_spec() {
        let d = doc("apiVersion: v1\nkind: Service\nmetadata: {name: r, namespace: x}\nspec: 7");
        assert!(parse_doc(d.clone(), "default").is_err());
        assert_eq!(
            doc_identity(&d, "default"),
            Some(ObjKey {
                kind: Kind::Service,
                namespace: "x".into(),
                name: "r".into()
            })
        );
    }
}
