//! `meshctl authz <service>`: the authorization and rate limit policies in force on each port of
//! a Service, and what they let in, as the controller compiled them (`/debug/authz`).

use std::io::Write;

use serde_json::Value;

use super::stat::fetch_service;

pub type AuthzArgs = super::stat::ServiceArgs;

pub async fn authz(a: &AuthzArgs, cx: &super::Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let ctl = a.controller.endpoint(cx).await?;
    let namespace = a.controller.namespace(cx, a.namespace.as_deref())?;
    let v = fetch_service(&ctl, "/debug/authz", "policies", &namespace, &a.service).await?;
    crate::output::print(a.output, &v, out, |v, out| write_authz(v, out))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| match x {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// `parts` joined with `sep`, or `empty` when there are none.
fn join_or(parts: &[String], empty: &str, sep: &str) -> String {
    if parts.is_empty() {
        empty.into()
    } else {
        parts.join(sep)
    }
}

fn alternatives(items: Vec<String>) -> String {
    match items.len() {
        0 => "nothing".into(),
        1 => items.into_iter().next().unwrap_or_default(),
        _ => format!("one of {}", items.join(", ")),
    }
}

/// `{"exact": x}` is `x`, `{"prefix": x}` is `x*`.
fn pattern(m: &Value) -> String {
    if let Some(x) = m["exact"].as_str() {
        x.to_string()
    } else if let Some(x) = m["prefix"].as_str() {
        format!("{x}*")
    } else {
        m.to_string()
    }
}

fn source(s: &Value) -> String {
    if s["never"] == true {
        return "nobody (the entry has a condition the controller cannot read)".into();
    }
    let mut parts: Vec<String> = s["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|list| alternatives(list.as_array().into_iter().flatten().map(pattern).collect()))
        .collect();
    match s["authenticated"].as_bool() {
        Some(true) => parts.push("any caller with a mesh identity".into()),
        Some(false) => parts.push("callers without a mesh identity".into()),
        None => {}
    }
    join_or(&parts, "anyone", " and ")
}

fn operation(o: &Value, deny: bool) -> String {
    if o["never"] == true {
        return "nothing (the entry has a condition the controller cannot read)".into();
    }
    let mut parts = Vec::new();
    if !o["ports"].is_null() {
        parts.push(format!("port {}", alternatives(strs(&o["ports"]))));
    }
    if !o["methods"].is_null() {
        parts.push(format!("method {}", alternatives(strs(&o["methods"]))));
    }
    if let Some(paths) = o["paths"].as_array() {
        let mut p = format!("path {}", alternatives(paths.iter().map(pattern).collect()));
        if deny {
            p.push_str(" (or any path with ; parameters)");
        }
        parts.push(p);
    }
    join_or(&parts, "anything", " and ")
}

fn write_policies(deny: bool, list: &Value, out: &mut dyn Write) -> anyhow::Result<()> {
    let label = if deny { "DENY" } else { "ALLOW" };
    for p in list.as_array().into_iter().flatten() {
        writeln!(out, "  {label:<5} {}", p["name"].as_str().unwrap_or("?"))?;
        let rules = p["rules"].as_array().map_or(&[][..], |r| r.as_slice());
        if rules.is_empty() {
            writeln!(out, "          no rules: matches nothing")?;
        }
        for (i, r) in rules.iter().enumerate() {
            let from: Vec<String> = r["from"]
                .as_array()
                .into_iter()
                .flatten()
                .map(source)
                .collect();
            let to: Vec<String> = r["to"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| operation(o, deny))
                .collect();
            let from = join_or(&from, "anyone", "; or ");
            let to = join_or(&to, "anything", "; or ");
            writeln!(out, "          rule {}: from {from}; asking {to}", i + 1)?;
        }
    }
    Ok(())
}

fn bucket(b: &Value) -> String {
    format!("{} rps (burst {})", b["requests_per_second"], b["burst"])
}

/// The policies of each port, and what they let in, for a person to read.
pub fn write_authz(v: &Value, out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "{}", v["service"].as_str().unwrap_or("?"))?;
    for p in v["ports"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "\nport {} ({}, {})",
            p["name"].as_str().unwrap_or("?"),
            p["port"],
            p["protocol"].as_str().unwrap_or("?")
        )?;
        write_policies(true, &p["deny"], out)?;
        write_policies(false, &p["allow"], out)?;
        let default = p["default"].as_str().unwrap_or("allow");
        let has_deny = p["deny"].as_array().is_some_and(|a| !a.is_empty());
        let has_allow = p["allow"].as_array().is_some_and(|a| !a.is_empty());
        let verdict = match (has_allow, default) {
            (true, _) => {
                "only what an ALLOW rule matches gets in (the default does not apply)".to_string()
            }
            (false, "allow") => "everything else gets in (default: allow)".into(),
            (false, "deny") => "nothing else gets in (default: deny)".into(),
            (false, d) => {
                format!("callers with a mesh identity get in, others do not (default: {d})")
            }
        };
        let lead = if has_deny { "after DENY: " } else { "" };
        writeln!(out, "  => {lead}{verdict}; refused requests get 403")?;
        if let Some(l) = p["rate_limit"].as_object() {
            let mut parts = Vec::new();
            if let Some(t) = l.get("total").filter(|t| !t.is_null()) {
                parts.push(format!("{} in total", bucket(t)));
            }
            if let Some(t) = l.get("per_identity").filter(|t| !t.is_null()) {
                parts.push(format!("{} per caller identity", bucket(t)));
            }
            writeln!(
                out,
                "  rate limit {}: {}; beyond it 429 with Retry-After",
                l.get("name").and_then(Value::as_str).unwrap_or("?"),
                parts.join(", ")
            )?;
        }
        for name in strs(&p["rate_limits_not_applied"]) {
            writeln!(
                out,
                "  rate limit {name} also targets this port and is not applied (one per port)"
            )?;
        }
    }
    let problems = v["problems"].as_array().map_or(&[][..], |a| a.as_slice());
    if !problems.is_empty() {
        writeln!(out, "\nproblems:")?;
        for e in problems {
            writeln!(
                out,
                "  {}/{}/{} {}: {}",
                e["object"]["kind"].as_str().unwrap_or("?"),
                e["object"]["namespace"].as_str().unwrap_or("?"),
                e["object"]["name"].as_str().unwrap_or("?"),
                e["field"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("?")
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_controller::index::Index;
    use mesh_controller::index::SvcKey;
    use mesh_controller::testing::obj;

    #[test]
    fn reads_as_what_the_policies_let_in() {
        let mut idx = Index::new("cluster.local");
        for doc in [
            "apiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web-reads, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  rules:\n  - from: [{serviceAccounts: [web], requestPrincipals: ['*']}, {namespaces: [bank]}]\n    to: [{methods: [GET], paths: ['/api/*']}]\n",
            "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Namespace, name: shop}]\n  action: Deny\n  rules:\n  - to: [{paths: ['/admin']}]\n",
            "apiVersion: mesh.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: hundred, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: cart}]\n  local: {requestsPerSecond: 100, perIdentity: {requestsPerSecond: 10}}\n",
        ] {
            idx.apply(obj(doc)).expect("applies");
        }
        let model = idx.model();
        let v = serde_json::to_value(
            mesh_controller::index::policy::service_authz(&model, &SvcKey::new("shop", "cart"))
                .expect("cart"),
        )
        .expect("json");
        let mut out = Vec::new();
        write_authz(&v, &mut out).expect("writes");
        let text = String::from_utf8(out).expect("utf-8");
        for want in [
            "port http (80, Http)",
            "  DENY  shop/no-admin\n          rule 1: from anyone; asking path /admin (or any path with ; parameters)",
            "  ALLOW shop/web-reads\n          rule 1: from nobody (the entry has a condition the controller cannot read); or spiffe://cluster.local/ns/bank/sa/*; asking method GET and path /api/*",
            "  => after DENY: only what an ALLOW rule matches gets in (the default does not apply); refused requests get 403",
            "  rate limit shop/hundred: 100 rps (burst 10) in total, 10 rps (burst 1) per caller identity; beyond it 429 with Retry-After",
            "problems:\n  AuthorizationPolicy/shop/web-reads spec.rules[0].from[0].requestPrincipals: unknown field",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
    }
}
