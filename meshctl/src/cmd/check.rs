//! `meshctl check`: the mesh's health by category, in the style of `linkerd check`. Each line is
//! ✓ (fine), ‼ (a warning) or × (a failure, with a hint on how to fix it); any failure makes
//! the exit status non-zero.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::admin::{Endpoint, get_json};
use crate::mesh::{LocalDir, Manifests};
use crate::output::Output;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The controller's admin address (a local mesh; default 127.0.0.1:15014 with --local).
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CONTROLLER_ADMIN)]
    pub controller: Option<SocketAddr>,
    /// mesh-ca's admin address (a local mesh; default 127.0.0.1:15013 with --local).
    #[arg(long, env = mesh_api::consts::env::MESHCTL_CA_ADMIN)]
    pub ca_admin: Option<SocketAddr>,
    /// In a cluster, before install: API version, your permissions, Pod Security.
    #[arg(long, conflicts_with = "proxy")]
    pub pre: bool,
    /// In a cluster, also check every injected pod's proxy.
    #[arg(long)]
    pub proxy: bool,
    /// In a cluster: the control plane's namespace.
    #[arg(long = "mesh-namespace", env = mesh_api::consts::env::MESHCTL_MESH_NAMESPACE,
          default_value = mesh_api::consts::identity::SYSTEM_NAMESPACE)]
    pub namespace: String,
    /// `table` or `json` (`yaml` too).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl CheckArgs {
    /// Checks of a local mesh at these admin addresses.
    pub fn local(controller: SocketAddr, ca_admin: SocketAddr) -> Self {
        Self {
            controller: Some(controller),
            ca_admin: Some(ca_admin),
            pre: false,
            proxy: false,
            namespace: mesh_api::consts::identity::SYSTEM_NAMESPACE.into(),
            output: Output::Table,
        }
    }

    /// Whether these are checks of a local mesh (admin addresses) rather than a cluster.
    pub fn is_local(&self, local_dir: bool) -> bool {
        local_dir || self.controller.is_some() || self.ca_admin.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub category: &'static str,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// A certificate expiring sooner than this is a warning.
pub(crate) const WARN_DAYS: f64 = 60.0;

#[derive(Default)]
pub(crate) struct Checks(pub(crate) Vec<Check>);

impl Checks {
    pub(crate) fn ok(&mut self, category: &'static str, message: impl Into<String>) {
        self.push(category, Status::Ok, message, None);
    }
    pub(crate) fn warn(&mut self, category: &'static str, message: impl Into<String>, hint: &str) {
        self.push(category, Status::Warn, message, Some(hint));
    }
    pub(crate) fn fail(&mut self, category: &'static str, message: impl Into<String>, hint: &str) {
        self.push(category, Status::Fail, message, Some(hint));
    }
    fn push(
        &mut self,
        category: &'static str,
        status: Status,
        message: impl Into<String>,
        hint: Option<&str>,
    ) {
        self.0.push(Check {
            category,
            status,
            message: message.into(),
            hint: hint.map(str::to_string),
        });
    }
}

pub(crate) fn days_left(unix: f64) -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    (unix - now) / 86_400.0
}

/// Whether an HTTPRoute of `from_ns` may send to the Service `to_ns/name`: the same namespace,
/// or a ReferenceGrant in `to_ns` that allows it.
fn granted(
    grants: &[(String, mesh_controller::index::grants::Grant)],
    from_ns: &str,
    to_ns: &str,
    name: &str,
) -> bool {
    use mesh_controller::index::grants::{GATEWAY_GROUP, Referrer, Target};
    let from = Referrer {
        group: GATEWAY_GROUP,
        kind: "HTTPRoute",
        namespace: from_ns,
    };
    let to = Target {
        group: "",
        kind: "Service",
        name,
    };
    from_ns == to_ns
        || grants
            .iter()
            .any(|(ns, g)| ns == to_ns && g.allows(from, to))
}

/// Routes of the local directory: backends exist with the port, weights are valid, and no two
/// routes claim the same parent with the same match.
fn config(local: &LocalDir, c: &mut Checks) {
    // Manifests are YAML.
    use serde_norway::Value;
    const CAT: &str = "config";
    let Manifests {
        services,
        routes,
        policies,
        grants,
        admission,
    } = match local.manifests() {
        Ok(m) => m,
        Err(e) => {
            c.fail(
                CAT,
                format!("manifests do not load: {e:#}"),
                "fix the file named above",
            );
            return;
        }
    };
    c.ok(
        CAT,
        format!(
            "{} Services and {} HTTPRoutes load from {}",
            services.len(),
            routes.len(),
            local.dir.display()
        ),
    );
    let mut problems = 0;
    for a in &admission {
        for field in &a.dropped {
            problems += 1;
            c.warn(
                CAT,
                format!(
                    "{}: {field} is not in the installed schema, so a cluster drops it on apply",
                    a.who
                ),
                "check the field's spelling against docs/reference/crds.md; a field of the Gateway API experimental channel needs its CRDs installed",
            );
        }
        for why in &a.refused {
            problems += 1;
            c.fail(
                CAT,
                format!("{}: a cluster refuses it: {why}", a.who),
                "fix the field named above",
            );
        }
    }
    let mut claims: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for r in &routes {
        let who = format!("HTTPRoute {}/{}", r.namespace, r.name);
        let spec = r.value.get("spec");
        let parents = spec
            .and_then(|s| s.get("parentRefs"))
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        let rules = spec
            .and_then(|s| s.get("rules"))
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for (i, rule) in rules.iter().enumerate() {
            let refs = rule
                .get("backendRefs")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            let mut total = 0u64;
            for b in &refs {
                let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                let ns = b
                    .get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(&r.namespace);
                let port = b.get("port").and_then(Value::as_u64);
                let weight = b.get("weight").and_then(Value::as_i64).unwrap_or(1);
                if !granted(&grants, &r.namespace, ns, name) {
                    problems += 1;
                    c.fail(
                        CAT,
                        format!(
                            "{who} rule {}: backend {ns}/{name} is in another namespace, and no ReferenceGrant in {ns} lets HTTPRoutes of {} refer to it",
                            i + 1,
                            r.namespace
                        ),
                        "add a ReferenceGrant in the backend's namespace (docs/reference/xds.md), or use a Service of the route's namespace",
                    );
                }
                match services
                    .iter()
                    .find(|s| s.namespace == ns && s.name == name)
                {
                    None => {
                        problems += 1;
                        c.fail(
                            CAT,
                            format!(
                                "{who} rule {}: backend Service {ns}/{name} does not exist",
                                i + 1
                            ),
                            "create the Service, or fix the backendRef's name and namespace",
                        );
                    }
                    Some(s)
                        if port
                            .is_some_and(|p| !s.ports.iter().any(|(q, _)| u64::from(*q) == p)) =>
                    {
                        problems += 1;
                        c.fail(
                            CAT,
                            format!(
                                "{who} rule {}: Service {ns}/{name} has no port {}",
                                i + 1,
                                port.unwrap_or_default()
                            ),
                            "set the backendRef's port to one the Service has",
                        );
                    }
                    Some(_) => {}
                }
                if !(0..=1_000_000).contains(&weight) {
                    problems += 1;
                    c.fail(
                        CAT,
                        format!("{who} rule {}: backend {name} has weight {weight}", i + 1),
                        "weights are whole numbers from 0 to 1,000,000",
                    );
                }
                total += u64::try_from(weight.max(0)).unwrap_or(0);
            }
            if !refs.is_empty() && total == 0 {
                problems += 1;
                c.fail(
                    CAT,
                    format!(
                        "{who} rule {}: every backend has weight 0, so its requests fail",
                        i + 1
                    ),
                    "give one backend a weight above 0 (meshctl route split)",
                );
            }
            let matches = serde_json::to_string(&rule.get("matches")).unwrap_or_default();
            for p in &parents {
                let parent = format!(
                    "{}/{}:{}",
                    p.get("namespace")
                        .and_then(Value::as_str)
                        .unwrap_or(&r.namespace),
                    p.get("name").and_then(Value::as_str).unwrap_or_default(),
                    p.get("port")
                        .and_then(Value::as_u64)
                        .map_or("*".into(), |p| p.to_string())
                );
                claims
                    .entry((parent, matches.clone()))
                    .or_default()
                    .push(format!("{who} rule {}", i + 1));
            }
        }
    }
    for ((parent, matches), who) in &claims {
        let owners: std::collections::BTreeSet<&str> = who
            .iter()
            .map(|w| w.rsplit_once(" rule").map_or(w.as_str(), |x| x.0))
            .collect();
        if owners.len() > 1 {
            problems += 1;
            c.fail(
                CAT,
                format!(
                    "{} claim the same parent {parent} and match {matches}",
                    who.join(" and ")
                ),
                "keep one route per parent and match: merge them, or make the matches differ",
            );
        }
    }
    if problems == 0 {
        c.ok(CAT, "every manifest keeps all its fields in the installed schema, every route's backends resolve, weights are valid, no two routes claim the same parent and match");
    }
    policy_targets(&policies, &services, c);
}

/// Every policy attaches to something that exists: a Service (and its port, by name) or its
/// own Namespace. A policy that targets nothing protects nothing.
fn policy_targets(
    policies: &[crate::mesh::PolicyDoc],
    services: &[crate::mesh::ServiceRef],
    c: &mut Checks,
) {
    use mesh_api::crds::PolicyTargetReference;
    use mesh_controller::index::policy::{Target, target};
    const CAT: &str = "policy";
    let mut problems = 0;
    for p in policies {
        let who = format!("{} {}/{}", p.kind, p.namespace, p.name);
        let refs = p.value.get("spec").and_then(|s| s.get("targetRefs"));
        let refs: Vec<PolicyTargetReference> = match refs
            .map(|r| serde_norway::from_value(r.clone()))
            .transpose()
        {
            Ok(r) => r.unwrap_or_default(),
            Err(e) => {
                problems += 1;
                c.fail(
                    CAT,
                    format!("{who} spec.targetRefs: {e}"),
                    "give each reference a kind (Service or Namespace) and a name",
                );
                continue;
            }
        };
        let mut attached = 0;
        for (i, t) in refs.iter().enumerate() {
            // Read as the controller reads it, then checked against the directory's Services.
            let problem = match target(t, &p.namespace, p.kind == "RateLimitPolicy") {
                Err((_, why)) => Some(why),
                Ok(Target::Namespace) => None,
                // Whether the Gateway (and listener) exists is the controller's to say: its
                // errors are checked under "control plane".
                Ok(Target::Gateway { .. }) => None,
                Ok(Target::Service { name, port }) => match services
                    .iter()
                    .find(|s| s.namespace == p.namespace && s.name == name)
                {
                    None => Some(format!("Service {}/{name} does not exist", p.namespace)),
                    Some(s) => port
                        .filter(|sec| !s.ports.iter().any(|(_, n)| n == sec))
                        .map(|sec| {
                            format!("Service {}/{name} has no port named {sec:?}", p.namespace)
                        }),
                },
            };
            match problem {
                Some(why) => {
                    problems += 1;
                    c.fail(
                        CAT,
                        format!("{who} targetRefs[{i}]: {why}: it targets nothing"),
                        "point targetRefs at an existing Service (and port name) or the policy's namespace; a RateLimitPolicy also at a Gateway (and listener name)",
                    );
                }
                None => attached += 1,
            }
        }
        if refs.is_empty() {
            problems += 1;
            c.fail(
                CAT,
                format!("{who} has no targetRefs: it targets nothing"),
                "add targetRefs naming a Service or the policy's namespace",
            );
        } else if attached == 0 {
            c.warn(
                CAT,
                format!("{who} protects nothing"),
                "see the failures above",
            );
        }
    }
    if problems == 0 && !policies.is_empty() {
        c.ok(
            CAT,
            format!(
                "{} policies each target something that exists (a Gateway target is the controller's to check, under \"control plane\")",
                policies.len()
            ),
        );
    }
}

pub(crate) async fn control_plane(ctl: &Endpoint, c: &mut Checks) -> Option<Vec<Value>> {
    const CAT: &str = "control plane";
    if let Err(e) = ctl.text("/ready").await {
        c.fail(
            CAT,
            format!("controller not reachable at {ctl}: {e:#}"),
            "start mesh-controller, or point --controller at its admin address",
        );
        return None;
    }
    c.ok(CAT, format!("controller is ready at {ctl}"));
    match ctl.json("/debug/config-errors").await {
        Ok(errors) => {
            let list: Vec<String> = ["manifests", "references"]
                .iter()
                .flat_map(|k| {
                    errors
                        .get(*k)
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .map(|e| e.to_string())
                .collect();
            if list.is_empty() {
                c.ok(
                    CAT,
                    "controller refused no manifest and found no broken reference",
                );
            } else {
                for e in list {
                    c.fail(
                        CAT,
                        format!("controller reports: {e}"),
                        "fix the object named; the controller applies the rest meanwhile",
                    );
                }
            }
        }
        Err(e) => c.warn(
            CAT,
            format!("config errors not readable: {e:#}"),
            "is the controller a current version?",
        ),
    }
    let proxies = match ctl.json("/debug/proxies").await {
        Ok(p) => p.as_array().cloned().unwrap_or_default(),
        Err(e) => {
            c.fail(
                CAT,
                format!("proxy list not readable: {e:#}"),
                "check the controller's log",
            );
            return None;
        }
    };
    if proxies.is_empty() {
        c.warn(
            CAT,
            "no proxy is connected",
            "start mesh-proxies pointed at the controller's xDS address",
        );
    }
    for p in &proxies {
        let node = p.get("node").and_then(Value::as_str).unwrap_or("?");
        let types = p
            .get("types")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let state = |want: &str| {
            types
                .iter()
                .filter(|(_, t)| t.get("state").and_then(Value::as_str) == Some(want))
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        };
        let (nacked, stale) = (state("NACKED"), state("STALE"));
        if !nacked.is_empty() {
            c.fail(
                CAT,
                format!("proxy {node} refused {}", nacked.join(", ")),
                "see why with `meshctl proxy-status`; the proxy keeps its last good config",
            );
        } else if !stale.is_empty() {
            c.warn(
                CAT,
                format!("proxy {node} has not acknowledged {} yet", stale.join(", ")),
                "run check again in a moment; if it stays, see `meshctl proxy-status`",
            );
        } else {
            c.ok(CAT, format!("proxy {node} is SYNCED"));
        }
    }
    Some(proxies)
}

/// What to do about a listener condition that is not as it should be, by its reason.
fn listener_hint(reason: &str) -> &'static str {
    match reason {
        "UnsupportedProtocol" => "use protocol HTTP or HTTPS",
        "UnsupportedValue" => "terminate TLS on an HTTPS listener (tls.mode Terminate)",
        "RefNotPermitted" => {
            "add a ReferenceGrant in the Secret's namespace from Gateways of the Gateway's namespace to Secrets"
        }
        "InvalidCertificateRef" => {
            "create the Secret (type kubernetes.io/tls, with tls.crt and tls.key) or fix certificateRefs"
        }
        "InvalidRouteKinds" => "allowedRoutes.kinds may name HTTPRoute and GRPCRoute",
        "ProtocolConflict" => "give each protocol a port of its own",
        "HostnameConflict" => "give each listener of a port a hostname of its own",
        _ => "see the Gateway's status",
    }
}

/// Each Gateway of our GatewayClasses, as the controller resolved it: every listener valid,
/// and a gateway proxy serving the current configuration.
pub(crate) async fn gateways(ctl: &Endpoint, c: &mut Checks) {
    const CAT: &str = "gateways";
    let body = match ctl.json("/debug/gateways").await {
        Ok(b) => b,
        Err(e) => {
            c.warn(
                CAT,
                format!("gateways not readable: {e:#}"),
                "is the controller a current version?",
            );
            return;
        }
    };
    let gateways = body
        .get("gateways")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    for (name, entry) in &gateways {
        let g = &entry["gateway"];
        let mut bad = 0;
        for l in g["listeners"].as_array().into_iter().flatten() {
            let listener = l["name"].as_str().unwrap_or("?");
            let conflicted = l["conflicted"]["ok"].as_bool() == Some(true);
            for (cond, ok) in [
                (&l["accepted"], l["accepted"]["ok"].as_bool() == Some(true)),
                (
                    &l["resolved_refs"],
                    l["resolved_refs"]["ok"].as_bool() == Some(true),
                ),
                (&l["conflicted"], !conflicted),
            ] {
                if !ok {
                    bad += 1;
                    let reason = cond["reason"].as_str().unwrap_or("");
                    c.fail(
                        CAT,
                        format!(
                            "Gateway {name} listener {listener}: {reason}: {}",
                            cond["message"].as_str().unwrap_or("")
                        ),
                        listener_hint(reason),
                    );
                }
            }
        }
        let routes: u64 = g["listeners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["attached_routes"].as_u64())
            .sum();
        let proxies: Vec<&str> = entry["proxies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if entry["served"].as_bool() != Some(true) {
            let (ns, gw) = name.split_once('/').unwrap_or(("", name));
            let hint = format!(
                "in a cluster the controller runs it as Deployment {ns}/{gw}-gateway: see its pods (kubectl -n {ns} get pods -l gateway.networking.k8s.io/gateway-name={gw}) and the Gateway's Programmed condition; without one (or with --gateway-deployments=false), run a gateway proxy: mesh-proxy --node {ns}/{gw}-0 --gateway {gw}, or an Envoy from meshctl bootstrap envoy --node {ns}/{gw}-0 --gateway {gw}; see `meshctl proxy-status`"
            );
            c.warn(
                CAT,
                if proxies.is_empty() {
                    format!("Gateway {name}: no gateway proxy is connected, so nothing serves it")
                } else {
                    format!(
                        "Gateway {name}: its proxies ({}) have not acknowledged the current configuration",
                        proxies.join(", ")
                    )
                },
                &hint,
            );
        } else if bad == 0 {
            c.ok(
                CAT,
                format!(
                    "Gateway {name}: every listener valid, {routes} route attachments, served by {}",
                    proxies.join(", ")
                ),
            );
        }
    }
}

/// A GET that only needs a 2xx (`/ready`).
async fn get_json_or_text(addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    crate::admin::get_text(addr, path).await.map(|_| ())
}

/// Checks the CA; returns the fingerprint of the root it signs under now.
pub(crate) async fn identity(ca: &Endpoint, c: &mut Checks) -> Option<String> {
    const CAT: &str = "identity";
    if let Err(e) = ca.text("/ready").await {
        c.fail(
            CAT,
            format!("mesh-ca not reachable at {ca}: {e:#}"),
            "start mesh-ca, or point --ca-admin at its admin address",
        );
        return None;
    }
    c.ok(CAT, format!("mesh-ca is ready at {ca}"));
    let text = match ca.text("/metrics").await {
        Ok(t) => t,
        Err(e) => {
            c.fail(
                CAT,
                format!("mesh-ca metrics not readable: {e:#}"),
                "check mesh-ca's log",
            );
            return None;
        }
    };
    match mesh_api::prom::sample(&text, "mesh_ca_signing_certificate_expiry_seconds").map(days_left)
    {
        Some(d) if d < 0.0 => c.fail(
            CAT,
            format!("the signing certificate expired {:.0} days ago", -d),
            "rotate the root (docs/reference/identity.md, Rotating the root)",
        ),
        Some(d) if d < WARN_DAYS => c.warn(
            CAT,
            format!("the signing certificate expires in {d:.0} days"),
            "rotate the root before it expires (docs/reference/identity.md, Rotating the root)",
        ),
        Some(d) => c.ok(
            CAT,
            format!("the signing certificate is valid for {d:.0} more days"),
        ),
        None => c.fail(
            CAT,
            "mesh-ca does not report its signing certificate",
            "check mesh-ca's version and log",
        ),
    }
    match mesh_api::prom::sample(&text, "mesh_ca_trust_bundle_roots") {
        Some(n) if n >= 2.0 => c.warn(
            CAT,
            format!("the trust bundle holds {n} roots"),
            "a rotation is under way: finish it by removing the old root",
        ),
        Some(n) => c.ok(CAT, format!("the trust bundle holds {n} root")),
        None => c.fail(
            CAT,
            "mesh-ca does not report its trust bundle",
            "check mesh-ca's version and log",
        ),
    }
    let roots = match ca.json("/debug/roots").await {
        Ok(r) => r.as_array().cloned().unwrap_or_default(),
        Err(e) => {
            c.fail(
                CAT,
                format!("mesh-ca's roots not readable: {e:#}"),
                "check mesh-ca's version and log",
            );
            return None;
        }
    };
    let mut signing = None;
    for r in &roots {
        let fp = r.get("sha256").and_then(Value::as_str).unwrap_or_default();
        let short = &fp[..fp.len().min(16)];
        let days = r
            .get("not_after")
            .and_then(Value::as_f64)
            .map_or(0.0, days_left);
        if r.get("signing").and_then(Value::as_bool) == Some(true) {
            signing = Some(fp.to_string());
        }
        if days < 0.0 {
            c.fail(
                CAT,
                format!("root {short}… expired {:.0} days ago", -days),
                "rotate the root (docs/reference/identity.md, Rotating the root)",
            );
        } else if days < WARN_DAYS {
            c.warn(
                CAT,
                format!("root {short}… expires in {days:.0} days"),
                "rotate the root before it expires (docs/reference/identity.md, Rotating the root)",
            );
        } else {
            c.ok(
                CAT,
                format!("root {short}… is valid for {days:.0} more days"),
            );
        }
    }
    signing
}

async fn data_plane(proxies: &[Value], current_root: Option<&str>, c: &mut Checks) {
    const CAT: &str = "data plane";
    for p in proxies {
        let node = p.get("node").and_then(Value::as_str).unwrap_or("?");
        let Some(admin) = p
            .get("admin")
            .and_then(Value::as_str)
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            c.warn(
                CAT,
                format!("{node}: no admin address (not a mesh-proxy?), not checked"),
                "mesh-proxy reports it; other proxies are checked by their own tools",
            );
            continue;
        };
        if let Err(e) = get_json_or_text(admin, "/ready").await {
            c.fail(CAT, format!("{node} is not ready: {e:#}"), "see its /config_dump: it waits for a complete config and, with identity on, a certificate");
            continue;
        }
        let dump = match get_json(admin, "/config_dump").await {
            Ok(d) => d,
            Err(e) => {
                c.fail(
                    CAT,
                    format!("{node}: config_dump not readable: {e:#}"),
                    "check the proxy's log",
                );
                continue;
            }
        };
        let id = dump.get("identity").cloned().unwrap_or(Value::Null);
        match id.get("mode").and_then(Value::as_str) {
            Some("off") => c.warn(
                CAT,
                format!("{node} is ready, with identity off (plaintext)"),
                "give it a CA (--ca-addr, --ca-root) to join mutual TLS",
            ),
            _ if id.get("valid").and_then(Value::as_bool) != Some(true) => c.fail(
                CAT,
                format!(
                    "{node} holds no valid certificate: {}",
                    id.get("last_error")
                        .and_then(Value::as_str)
                        .unwrap_or("no answer from mesh-ca yet")
                ),
                "check that mesh-ca is reachable and the proxy's token is right",
            ),
            _ if current_root.is_some()
                && id.get("issuer_root_sha256").and_then(Value::as_str) != current_root =>
            {
                c.warn(
                    CAT,
                    format!("{node}: its certificate chains to a root mesh-ca no longer signs under"),
                    "it renews onto the current root within its certificate's lifetime; if it stays, check that it reaches mesh-ca",
                )
            }
            _ => {
                let days = id
                    .get("not_after")
                    .and_then(Value::as_f64)
                    .map(days_left)
                    .unwrap_or(0.0);
                c.ok(
                    CAT,
                    format!(
                        "{node} is ready; certificate {} from the current root, valid for {:.1} h, {} trusted root(s)",
                        id.get("spiffe_id").and_then(Value::as_str).unwrap_or("?"),
                        days * 24.0,
                        id.get("roots").and_then(Value::as_u64).unwrap_or(0)
                    ),
                );
            }
        }
    }
}

/// Runs every check.
pub async fn run_checks(args: &CheckArgs, local: Option<&LocalDir>) -> Vec<Check> {
    let mut c = Checks::default();
    match local {
        Some(l) => config(l, &mut c),
        None => c.warn(
            "config",
            "no --local directory: routes not checked",
            "pass --local DIR (the directory the controller watches)",
        ),
    }
    let ctl = Endpoint::Direct(args.controller.unwrap_or(SocketAddr::from((
        [127, 0, 0, 1],
        mesh_api::consts::ports::CONTROLLER_ADMIN,
    ))));
    let ca = Endpoint::Direct(args.ca_admin.unwrap_or(SocketAddr::from((
        [127, 0, 0, 1],
        mesh_api::consts::ports::CA_ADMIN,
    ))));
    let proxies = control_plane(&ctl, &mut c).await;
    if proxies.is_some() {
        gateways(&ctl, &mut c).await;
    }
    let root = identity(&ca, &mut c).await;
    data_plane(
        proxies.as_deref().unwrap_or_default(),
        root.as_deref(),
        &mut c,
    )
    .await;
    c.0
}

pub fn print(checks: &[Check], output: Output, out: &mut dyn Write) -> anyhow::Result<()> {
    crate::output::print(output, checks, out, |checks, out| {
        {
            let mut last = "";
            for ch in checks {
                if ch.category != last {
                    if !last.is_empty() {
                        writeln!(out)?;
                    }
                    writeln!(out, "{}", ch.category)?;
                    writeln!(out, "{}", "-".repeat(ch.category.len()))?;
                    last = ch.category;
                }
                let mark = match ch.status {
                    Status::Ok => "✓",
                    Status::Warn => "‼",
                    Status::Fail => "×",
                };
                writeln!(out, "{mark} {}", ch.message)?;
                if let Some(h) = &ch.hint
                    && ch.status != Status::Ok
                {
                    writeln!(out, "    hint: {h}")?;
                }
            }
            let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
            writeln!(out)?;
            if failed == 0 {
                writeln!(out, "Status check results are ✓")?;
            } else {
                writeln!(out, "Status check results are × ({failed} failed)")?;
            }
        }
        Ok(())
    })
}
