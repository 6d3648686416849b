//! `route split|promote --wait`: returns once every controller replica has read the route as
//! it was written (its model holds the rule with the new weights, at some revision) and every
//! proxy connected to it has applied and acknowledged that revision. A proxy whose
//! configuration does not hold the Service's routes acknowledges the revision as well (it is
//! told nothing new), so "every proxy" is every client of the Service and none is missed.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::route::Change;
use super::stat::ControllerArgs;
use crate::admin::Endpoint;
use crate::progress::Progress;

/// How often the controller is asked: directly, or through the API server (a port-forward
/// each time).
const POLL: Duration = Duration::from_millis(50);
const POLL_FORWARDED: Duration = Duration::from_millis(250);

/// `--timeout`'s default.
const TIMEOUT: &str = "60s";

#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Return only once every controller replica has read the route as written and every
    /// proxy connected to it has applied and acknowledged it.
    #[arg(long, conflicts_with = "dry_run")]
    pub wait: bool,
    /// With --wait: how long to wait, like 30s.
    #[arg(long, default_value = TIMEOUT, value_parser = parse_duration, requires = "wait")]
    pub timeout: Duration,
    /// With --wait: the controller asked.
    #[command(flatten)]
    pub controller: ControllerArgs,
}

impl Default for WaitArgs {
    /// No wait; the other fields as the command line's defaults.
    fn default() -> Self {
        Self {
            wait: false,
            timeout: parse_duration(TIMEOUT).unwrap_or(Duration::from_secs(60)),
            controller: ControllerArgs {
                controller: None,
                mesh_namespace: mesh_api::consts::identity::SYSTEM_NAMESPACE.to_owned(),
            },
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_api::duration::parse(s).map_err(|e| e.to_string())
}

/// What one controller replica served the change at, and how many of its proxies applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub controller: String,
    pub revision: u64,
    pub proxies: usize,
}

/// What `--wait` saw, replica by replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub replicas: Vec<Replica>,
    pub took: Duration,
}

impl Acked {
    fn proxies(&self) -> usize {
        self.replicas.iter().map(|r| r.proxies).sum()
    }

    /// The line a table ends with.
    pub fn words(&self) -> String {
        let took = self.took.as_secs_f64();
        let at = match self.replicas.as_slice() {
            [one] => format!("revision {}", one.revision),
            many => format!("{} controller replicas", many.len()),
        };
        match self.proxies() {
            0 => {
                format!("served by the controller ({at}) after {took:.2} s; no proxy is connected")
            }
            1 => format!("applied by the 1 connected proxy ({at}) after {took:.2} s"),
            n => format!("applied by all {n} connected proxies ({at}) after {took:.2} s"),
        }
    }

    pub fn data(&self) -> Value {
        let replicas: Vec<Value> = self
            .replicas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "controller": r.controller,
                    "revision": r.revision,
                    "proxies": r.proxies,
                })
            })
            .collect();
        serde_json::json!({
            "proxies": self.proxies(),
            "seconds": self.took.as_secs_f64(),
            "controllers": replicas,
        })
    }
}

/// [`wait`] on the calling thread, with a spinner: inside a multi-threaded runtime (as the
/// cluster's calls run) or on a runtime of its own.
pub fn wait_here(
    ctls: &[Endpoint],
    c: &Change,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<Acked> {
    let waited = async {
        let progress = Progress::spinner();
        wait(ctls, c, timeout, &progress, out).await
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            bail!("--wait needs a multi-threaded Tokio runtime to block on, or none")
        }
        Ok(rt) => tokio::task::block_in_place(|| rt.block_on(waited)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(waited),
    }
}

/// Waits until every controller at `ctls` serves change `c` and every proxy of each
/// acknowledged it.
pub async fn wait(
    ctls: &[Endpoint],
    c: &Change,
    timeout: Duration,
    progress: &Progress,
    out: &mut dyn Write,
) -> anyhow::Result<Acked> {
    let started = Instant::now();
    let deadline = started
        .checked_add(timeout)
        .with_context(|| format!("--timeout {timeout:?}: too long"))?;
    let mut replicas = Vec::new();
    for ctl in ctls {
        replicas.push(wait_one(ctl, c, deadline, timeout, progress, out).await?);
    }
    Ok(Acked {
        replicas,
        took: started.elapsed(),
    })
}

/// Why one look at a controller did not end the wait.
enum Pending {
    /// Not yet: what is missing.
    Yet(String),
    /// Never: the wait fails with this.
    Fails(anyhow::Error),
}

/// The wait on one controller replica: each look reads the Service as its model holds it and
/// the proxies' state. The revision waited for is the first one seen holding the change, or a
/// lower one after the controller restarted (its revisions start again).
async fn wait_one(
    ctl: &Endpoint,
    c: &Change,
    deadline: Instant,
    timeout: Duration,
    progress: &Progress,
    out: &mut dyn Write,
) -> anyhow::Result<Replica> {
    let poll = match ctl {
        Endpoint::Direct(_) => POLL,
        _ => POLL_FORWARDED,
    };
    let mut held: Option<u64> = None;
    // Every proxy looked done at the last look: a scoped proxy acknowledges routes before it
    // asks for a backend they newly name, so done must be seen twice in a row.
    let mut done_before = false;
    let mut last = String::new();
    loop {
        let why = match look(ctl, c, &mut held).await {
            Ok(proxies) if done_before => {
                return Ok(Replica {
                    controller: ctl.to_string(),
                    revision: held.unwrap_or_default(),
                    proxies,
                });
            }
            Ok(proxies) => {
                done_before = true;
                format!(
                    "{proxies} of {proxies} proxies acknowledged revision {}",
                    held.unwrap_or_default()
                )
            }
            Err(Pending::Yet(why)) => {
                done_before = false;
                why
            }
            Err(Pending::Fails(e)) => return Err(e),
        };
        if Instant::now() >= deadline {
            bail!(
                "after {timeout:?}, at the controller at {ctl}: {why}; `meshctl proxy-status` shows each proxy's state"
            );
        }
        if why != last {
            progress.status(out, &why)?;
            last = why;
        }
        tokio::time::sleep(poll).await;
    }
}

/// One look at controller `ctl`: the number of its proxies when all of them serve the change.
async fn look(ctl: &Endpoint, c: &Change, held: &mut Option<u64>) -> Result<usize, Pending> {
    let rule = format!("HTTPRoute {} rule {}", c.route, c.rule + 1);
    let path = format!("/debug/service?service={}/{}", c.namespace, c.service);
    let v = match ctl.json(&path).await {
        Ok(v) => v,
        // A Service the controller has not read yet (just created) is waited for as well.
        Err(e) if crate::admin::is_not_found(&e) && crate::admin::names_unknown_service(&e) => {
            return Err(Pending::Yet(format!(
                "Service {}/{} is not in its configuration yet",
                c.namespace, c.service
            )));
        }
        Err(e) if crate::admin::is_not_found(&e) => {
            return Err(Pending::Fails(e.context(format!(
                "the controller at {ctl} has no /debug/service: it is older than this meshctl; \
                 upgrade the control plane, or leave out --wait"
            ))));
        }
        // Asked again until the deadline: a port-forward may fail once.
        Err(e) => {
            return Err(Pending::Yet(format!(
                "the controller did not answer: {e:#}"
            )));
        }
    };
    let revision = served(&v, c)
        .map_err(|why| Pending::Yet(format!("waiting for the controller to read {rule}: {why}")))?;
    let r = match *held {
        Some(h) if revision >= h => h,
        _ => revision,
    };
    *held = Some(r);
    let proxies = ctl
        .json("/debug/proxies")
        .await
        .map_err(|e| Pending::Yet(format!("the controller did not answer: {e:#}")))?;
    let list = proxies.as_array().map_or(&[][..], Vec::as_slice);
    let mut behind = Vec::new();
    for p in list {
        let node = p["node"].as_str().unwrap_or("?");
        match acknowledged(p, r) {
            Ok(true) => {}
            Ok(false) => behind.push(node),
            Err(e) => {
                return Err(Pending::Fails(anyhow::anyhow!(
                    "proxy {node} refused the configuration holding the change ({e}); \
                     `meshctl proxy-status` shows each proxy's state"
                )));
            }
        }
    }
    if behind.is_empty() {
        return Ok(list.len());
    }
    let some = behind
        .iter()
        .take(3)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let more = if behind.len() > 3 { ", ..." } else { "" };
    Err(Pending::Yet(format!(
        "{}/{} proxies acknowledged revision {r}; waiting for {some}{more}",
        list.len() - behind.len(),
        list.len()
    )))
}

/// The revision of `/debug/service`'s answer `v` when its model holds change `c`'s rule with
/// the weights written (backends at weight 0 stay in a route, so only those above 0 are
/// compared); otherwise what differs.
pub fn served(v: &Value, c: &Change) -> Result<u64, String> {
    let revision = v["revision"]
        .as_u64()
        .ok_or_else(|| "its answer has no revision".to_owned())?;
    let port = v["service"]["ports"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p["port"].as_u64() == Some(u64::from(c.port)))
        })
        .ok_or_else(|| {
            format!(
                "Service {}/{} has no port {}",
                c.namespace, c.service, c.port
            )
        })?;
    // The model numbers rules from 0, as the route's list.
    let source = format!("HTTPRoute/{} rule {}", c.route, c.rule);
    let entries: Vec<&Value> = port["routes"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|e| e["source"] == source.as_str())
        .collect();
    if entries.is_empty() {
        return Err(format!("no such rule on port {} yet", c.port));
    }
    let mut want: Vec<(String, u64)> = c
        .after
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|(b, w)| (b.clone(), u64::from(*w)))
        .collect();
    want.sort();
    // Each match of a rule is an entry of its own, all with the rule's backends.
    for e in entries {
        let mut got = Vec::new();
        for b in e["action"]["Forward"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            let weight = b["weight"].as_u64().unwrap_or(0);
            if weight == 0 {
                continue;
            }
            let Some(name) = b["cluster"]
                .as_str()
                .and_then(|cl| backend_of(cl, &c.namespace))
            else {
                return Err(format!("a backend of weight {weight} does not resolve"));
            };
            got.push((name.to_owned(), weight));
        }
        got.sort();
        if got != want {
            let show = |ws: &[(String, u64)]| {
                ws.iter()
                    .map(|(b, w)| format!("{b}={w}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(format!("it has {} (not yet {})", show(&got), show(&want)));
        }
    }
    Ok(revision)
}

/// The Service name in a cluster name `outbound|<port>||<name>.<namespace>.svc.<domain>`.
fn backend_of<'a>(cluster: &'a str, namespace: &str) -> Option<&'a str> {
    let host = cluster.split_once("||")?.1;
    let (name, rest) = host.split_once('.')?;
    rest.starts_with(&format!("{namespace}.svc."))
        .then_some(name)
}

/// Whether proxy `p` (an entry of `/debug/proxies`) serves `revision` or later with every
/// type acknowledged; an error when it refused a response of that revision or later. A
/// refusal of an earlier response is past once the proxy serves the revision: that type did
/// not change since (the controller resends a type only when it changes).
pub fn acknowledged(p: &Value, revision: u64) -> Result<bool, String> {
    let at = p["revision"].as_u64().is_some_and(|r| r >= revision);
    let types = p["types"].as_object();
    // A stream that has just opened has been sent nothing yet.
    let mut synced = types.is_some_and(|t| !t.is_empty());
    for (ty, t) in types.into_iter().flatten() {
        match t["state"].as_str() {
            Some("SYNCED") => {}
            Some("NACKED") => {
                let sent = t["sent_version"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok());
                if let Some(sent) = sent.filter(|s| *s >= revision) {
                    return Err(format!(
                        "{ty} at revision {sent}: {}",
                        t["error"].as_str().unwrap_or("no reason given")
                    ));
                }
                synced &= at;
            }
            _ => synced = false,
        }
    }
    Ok(synced && at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(after: &[(&str, u32)]) -> Change {
        Change {
            namespace: "default".into(),
            service: "reviews".into(),
            port: 9080,
            route: "default/reviews".into(),
            rule: 2,
            before: Vec::new(),
            after: after.iter().map(|(b, w)| (b.to_string(), *w)).collect(),
            written: Some("route.yaml".into()),
            diff: String::new(),
        }
    }

    /// `/debug/service` as the controller answers it: port 9080 with rule 2 of the route
    /// forwarding to `backends`, after another route's rule.
    fn answer(revision: u64, action: serde_json::Value) -> serde_json::Value {
        json!({"revision": revision, "service": {"key": "default/reviews", "ports": [
            {"port": 9080, "routes": [
                {"source": "HTTPRoute/default/other rule 2", "action": {"Fail": 500}},
                {"source": "HTTPRoute/default/reviews rule 2", "action": action},
            ]},
        ]}})
    }

    fn forward(backends: &[(&str, u32)]) -> serde_json::Value {
        let list: Vec<_> = backends
            .iter()
            .map(|(b, w)| {
                json!({"cluster": format!("outbound|9080||{b}.default.svc.cluster.local"), "weight": w, "hash": null})
            })
            .collect();
        json!({ "Forward": list })
    }

    #[test]
    fn the_rule_is_served_once_its_weights_are_those_written() {
        let c = change(&[("reviews-v1", 50), ("reviews-v2", 50), ("reviews-v3", 0)]);
        let now = answer(
            7,
            forward(&[("reviews-v2", 50), ("reviews-v1", 50), ("reviews-v3", 0)]),
        );
        assert_eq!(served(&now, &c), Ok(7));
        let before = answer(6, forward(&[("reviews-v1", 90), ("reviews-v2", 10)]));
        let why = served(&before, &c).expect_err("old weights");
        assert!(why.contains("reviews-v1=90,reviews-v2=10"), "{why}");
        let missing = json!({"revision": 5, "service": {"ports": [{"port": 9080, "routes": []}]}});
        assert_eq!(
            served(&missing, &c),
            Err("no such rule on port 9080 yet".into())
        );
        // Every weight at 0: the rule answers 500 and nothing is compared.
        assert_eq!(
            served(
                &answer(8, json!({"Fail": 500})),
                &change(&[("reviews-v1", 0)])
            ),
            Ok(8)
        );
        // An unresolved backend with weight is not what was written.
        let unresolved = answer(9, json!({"Forward": [{"cluster": null, "weight": 50}]}));
        assert!(served(&unresolved, &c).is_err());
    }

    #[test]
    fn a_cluster_name_gives_its_service_only_in_the_namespace() {
        assert_eq!(
            backend_of(
                "outbound|80||reviews-v1.default.svc.cluster.local",
                "default"
            ),
            Some("reviews-v1")
        );
        assert_eq!(
            backend_of("outbound|80||reviews-v1.shop.svc.cluster.local", "default"),
            None
        );
        assert_eq!(backend_of("reviews-v1", "default"), None);
    }

    #[test]
    fn a_proxy_counts_once_it_acknowledged_the_revision_and_fails_on_a_refusal_of_it() {
        let proxy = |revision: u64, rds: &str, sent: &str| {
            json!({"node": "default/a", "revision": revision, "types": {
                "CDS": {"state": "SYNCED", "sent_version": sent},
                "RDS": {"state": rds, "sent_version": sent, "error": "bad route"},
            }})
        };
        assert_eq!(acknowledged(&proxy(7, "SYNCED", "7"), 7), Ok(true));
        assert_eq!(acknowledged(&proxy(8, "SYNCED", "8"), 7), Ok(true));
        assert_eq!(acknowledged(&proxy(6, "SYNCED", "6"), 7), Ok(false));
        assert_eq!(acknowledged(&proxy(7, "STALE", "7"), 7), Ok(false));
        // A refusal of an older revision may still be followed by the new one; once the proxy
        // serves the revision, that type did not change since and the refusal is past.
        assert_eq!(acknowledged(&proxy(6, "NACKED", "6"), 7), Ok(false));
        assert_eq!(acknowledged(&proxy(7, "NACKED", "6"), 7), Ok(true));
        assert_eq!(
            acknowledged(&proxy(7, "NACKED", "7"), 7),
            Err("RDS at revision 7: bad route".into())
        );
        // A stream just opened has been sent nothing.
        let fresh = json!({"node": "default/b", "revision": 9, "types": {}});
        assert_eq!(acknowledged(&fresh, 7), Ok(false));
    }
}
