//! The fake API server's authorizer: what kube-apiserver's RBAC authorizer decides for a user
//! and its groups, from the Roles, ClusterRoles and bindings stored in the fake. A request's
//! attributes (verb, API group, resource and subresource, namespace, name) are read from its
//! method and path as the server's request-info resolver reads them.

use serde::Serialize;
use serde_json::Value;

/// What RBAC decides on: one request's attributes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// With its subresource: `httproutes/status`.
    pub resource: String,
    /// Empty at the cluster scope.
    pub namespace: String,
    /// Empty for a collection (list, watch, create).
    pub name: String,
}

impl Attributes {
    /// The attributes of a resource request; `None` for a non-resource path (`/version`).
    pub fn of(method: &str, path: &str, query: &str) -> Option<Self> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _version, rest @ ..] => ("", rest),
            ["apis", group, _version, rest @ ..] => (*group, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            // The Namespace object itself is cluster-scoped, in its own namespace.
            ["namespaces", ns] => (*ns, &["namespaces", ns][..]),
            ["namespaces", ns, "status" | "finalize"] => (*ns, rest),
            ["namespaces", ns, rest @ ..] => (*ns, rest),
            rest => ("", rest),
        };
        let (resource, name, sub) = match rest {
            [] => return None,
            [r] => (*r, "", None),
            [r, n] => (*r, *n, None),
            [r, n, s, ..] => (*r, *n, Some(*s)),
        };
        let watch = query
            .split('&')
            .any(|q| q == "watch=true" || q == "watch=1");
        let verb = match (method, name.is_empty()) {
            ("GET", true) if watch => "watch",
            ("GET", true) => "list",
            ("GET", false) => "get",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "deletecollection",
            ("DELETE", false) => "delete",
            _ => return None,
        };
        Some(Self {
            verb: verb.into(),
            group: group.into(),
            resource: match sub {
                Some(s) => format!("{resource}/{s}"),
                None => resource.into(),
            },
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    /// The server's words for a denial.
    pub fn forbidden(&self, user: &str) -> String {
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        let what = if self.name.is_empty() {
            self.resource.clone()
        } else {
            format!("{} {:?}", self.resource, self.name)
        };
        format!(
            "{what} is forbidden: User {user:?} cannot {} resource {:?} in API group {:?} {scope}",
            self.verb, self.resource, self.group
        )
    }
}

/// One RBAC rule, where it applies: every namespace (a ClusterRoleBinding) or one (a
/// RoleBinding), and which binding and role grant it.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// `None`: every namespace and the cluster scope.
    pub namespace: Option<String>,
    /// The binding, role and subject, in the RBAC authorizer's words: `RoleBinding
    /// "name/namespace" of ClusterRole "role" to User "alice"`.
    pub granted_by: String,
    /// `ClusterRole/name` or `Role/namespace/name`, and the rule's index in it.
    pub role: String,
    pub index: usize,
    pub rule: Value,
}

impl Grant {
    pub fn allows(&self, a: &Attributes) -> bool {
        if let Some(ns) = &self.namespace
            && *ns != a.namespace
        {
            return false;
        }
        let list = |k: &str| -> Vec<&str> {
            self.rule[k]
                .as_array()
                .map(|l| l.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default()
        };
        let any = |l: &[&str], want: &str| l.iter().any(|x| *x == "*" || *x == want);
        let names = list("resourceNames");
        any(&list("verbs"), &a.verb)
            && any(&list("apiGroups"), &a.group)
            && any(&list("resources"), &a.resource)
            && (names.is_empty() || (!a.name.is_empty() && names.contains(&a.name.as_str())))
    }
}

/// The group RBAC does not restrict (the API server's superusers).
pub const MASTERS: &str = "system:masters";
/// A cluster admin's user name, as kubeadm's `admin.conf` names it; in [`MASTERS`] here.
pub const ADMIN: &str = "kubernetes-admin";

/// Who a request is made as: a user name and the groups its authenticator put it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub user: String,
    pub groups: Vec<String>,
}

impl Subject {
    /// Service account `namespace/name`, in the groups the API server puts each one in.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self {
            user: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }

    /// An authenticated user by name: a service account's groups for
    /// `system:serviceaccount:NS:NAME`, [`MASTERS`] for [`ADMIN`], `system:authenticated` for
    /// anyone.
    pub fn of_user(user: &str) -> Self {
        if user == ADMIN {
            return Self {
                user: user.into(),
                groups: vec![MASTERS.into(), "system:authenticated".into()],
            };
        }
        match user
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        {
            Some((ns, name)) => Self::service_account(ns, name),
            None => Self {
                user: user.into(),
                groups: vec!["system:authenticated".into()],
            },
        }
    }

    /// Whether a binding's subject (`kind`, `name`, `namespace`) is this one.
    fn is(&self, s: &Value) -> bool {
        let name = s["name"].as_str().unwrap_or("");
        match s["kind"].as_str().unwrap_or("") {
            "ServiceAccount" => {
                self.user
                    == format!(
                        "system:serviceaccount:{}:{name}",
                        s["namespace"].as_str().unwrap_or("")
                    )
            }
            "User" => self.user == name,
            "Group" => self.groups.iter().any(|g| g == name),
            _ => false,
        }
    }
}

/// The rules granted to `subject` by the bindings among `objects`.
pub fn grants(objects: &[&Value], subject: &Subject) -> Vec<Grant> {
    fn of_kind<'a>(objects: &'a [&'a Value], k: &'static str) -> impl Iterator<Item = &'a Value> {
        objects.iter().copied().filter(move |o| o["kind"] == k)
    }
    let meta = |o: &Value, f: &str| o["metadata"][f].as_str().unwrap_or("").to_owned();
    let mut out = Vec::new();
    for kind in ["ClusterRoleBinding", "RoleBinding"] {
        for b in of_kind(objects, kind) {
            let binding_ns = meta(b, "namespace");
            let Some(to) = b["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| subject.is(s))
            else {
                continue;
            };
            let str_of = |k: &str| to[k].as_str().unwrap_or("").to_owned();
            let to = match str_of("kind").as_str() {
                "ServiceAccount" => {
                    let ns = Some(str_of("namespace"))
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| binding_ns.clone());
                    format!("ServiceAccount {:?}", format!("{}/{ns}", str_of("name")))
                }
                kind => format!("{kind} {:?}", str_of("name")),
            };
            let role_kind = b["roleRef"]["kind"].as_str().unwrap_or("");
            let role_name = b["roleRef"]["name"].as_str().unwrap_or("");
            let role = ["ClusterRole", "Role"]
                .into_iter()
                .filter(|k| *k == role_kind)
                .flat_map(|k| of_kind(objects, k))
                .find(|r| {
                    meta(r, "name") == role_name
                        && (role_kind == "ClusterRole" || meta(r, "namespace") == binding_ns)
                });
            let Some(role) = role else { continue };
            let binding = match kind {
                "RoleBinding" => format!("{}/{binding_ns}", meta(b, "name")),
                _ => meta(b, "name"),
            };
            let granted_by = format!("{kind} {binding:?} of {role_kind} {role_name:?} to {to}");
            let id = match role_kind {
                "Role" => format!("Role/{binding_ns}/{role_name}"),
                _ => format!("ClusterRole/{role_name}"),
            };
            for (index, rule) in role["rules"].as_array().into_iter().flatten().enumerate() {
                out.push(Grant {
                    namespace: (kind == "RoleBinding").then(|| binding_ns.clone()),
                    granted_by: granted_by.clone(),
                    role: id.clone(),
                    index,
                    rule: rule.clone(),
                });
            }
        }
    }
    out
}

/// What every authenticated caller may do without a binding of its own (the API server's
/// default `system:basic-user` and `system:discovery` roles): review its own access.
pub fn allowed_to_everyone(a: &Attributes) -> bool {
    a.group == "authorization.k8s.io"
        && matches!(
            a.resource.as_str(),
            "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
        )
        && a.verb == "create"
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn attributes_are_read_from_method_and_path() {
        let a = |m: &str, p: &str, q: &str| Attributes::of(m, p, q).expect("a resource path");
        let got = a(
            "PATCH",
            "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/r/status",
            "",
        );
        assert_eq!(
            (got.verb.as_str(), got.group.as_str(), got.resource.as_str()),
            ("patch", "gateway.networking.k8s.io", "httproutes/status")
        );
        assert_eq!((got.namespace.as_str(), got.name.as_str()), ("shop", "r"));
        assert_eq!(a("GET", "/api/v1/pods", "watch=true").verb, "watch");
        assert_eq!(a("GET", "/api/v1/pods", "").verb, "list");
        let ns = a("GET", "/api/v1/namespaces/shop", "");
        assert_eq!(
            (ns.resource.as_str(), ns.name.as_str(), ns.verb.as_str()),
            ("namespaces", "shop", "get")
        );
        assert_eq!(
            a("POST", "/api/v1/namespaces/x/configmaps", "").verb,
            "create"
        );
        assert!(Attributes::of("GET", "/version", "").is_none());
    }

    #[test]
    fn bindings_grant_their_roles_rules_in_their_scope() {
        let role = json!({"kind": "Role", "metadata": {"name": "r", "namespace": "a"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x"],
                       "verbs": ["get", "update"]}]});
        let binding = json!({"kind": "RoleBinding", "metadata": {"name": "r", "namespace": "a"},
            "roleRef": {"kind": "Role", "name": "r"},
            "subjects": [{"kind": "ServiceAccount", "name": "me", "namespace": "a"}]});
        let g = grants(&[&role, &binding], &Subject::service_account("a", "me"));
        assert_eq!(g.len(), 1);
        let get = |ns: &str, name: &str| Attributes {
            verb: "get".into(),
            group: String::new(),
            resource: "configmaps".into(),
            namespace: ns.into(),
            name: name.into(),
        };
        assert!(g[0].allows(&get("a", "x")));
        assert!(!g[0].allows(&get("a", "y")), "another name");
        assert!(!g[0].allows(&get("b", "x")), "another namespace");
        assert!(grants(&[&role, &binding], &Subject::service_account("a", "you")).is_empty());
        assert_eq!(
            g[0].granted_by,
            "RoleBinding \"r/a\" of Role \"r\" to ServiceAccount \"me/a\""
        );
        assert_eq!(
            get("a", "y").forbidden("system:serviceaccount:a:me"),
            "configmaps \"y\" is forbidden: User \"system:serviceaccount:a:me\" cannot get resource \"configmaps\" in API group \"\" in the namespace \"a\""
        );
    }

    #[test]
    fn users_and_groups_are_bound_by_name() {
        let role = json!({"kind": "ClusterRole", "metadata": {"name": "read"},
            "rules": [{"apiGroups": ["mesh.dev"], "resources": ["debug"], "verbs": ["get"]}]});
        let binding = json!({"kind": "ClusterRoleBinding", "metadata": {"name": "read"},
            "roleRef": {"kind": "ClusterRole", "name": "read"},
            "subjects": [{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "sre"},
                         {"kind": "Group", "name": "system:serviceaccounts:ops"}]});
        let objects = [&role, &binding];
        let bound = |s: Subject| !grants(&objects, &s).is_empty();
        assert!(bound(Subject::of_user("alice")));
        assert!(!bound(Subject::of_user("bob")));
        assert!(bound(Subject {
            user: "bob".into(),
            groups: vec!["sre".into()]
        }));
        assert!(
            bound(Subject::of_user("system:serviceaccount:ops:tool")),
            "a service account is in its namespace's group"
        );
        assert!(!bound(Subject::service_account("web", "tool")));
        assert_eq!(
            grants(&objects, &Subject::of_user("alice"))[0].granted_by,
            "ClusterRoleBinding \"read\" of ClusterRole \"read\" to User \"alice\""
        );
    }
}
