//! `route split|promote --wait`: returns once every controller replica has read the route as
//! it was written (its model holds the rule with the new weights, at some revision) and every
//! proxy connected to it has applied and acknowledged that revision. A proxy whose
//! configuration does not hold the Service's routes acknowledges the revision as well (it is
//! told nothing new), so "every proxy" is every client of the Service and none is missed.

use std::collections::BTreeSet;
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
        serde_json::json!({
            "proxies": self.proxies(),
            "seconds": self.took.as_secs_f64(),
            "controllers": self.replicas,
        })
    }
}

/// A controller replica `--wait` asks, and the refusals its proxies held before the route was
/// written (those, and only those, are not the change's).
#[derive(Debug, Clone)]
pub struct Controller {
    pub endpoint: Endpoint,
    refused: BTreeSet<Refusal>,
}

/// A type a stream refused: `(node, connected_at_unix, type, nonce)`.
type Refusal = (String, u64, String, String);

/// A proxy stream: `(node, connected_at_unix)`.
type Stream = (String, u64);

/// Runs `f` to its end on the calling thread: inside a multi-threaded runtime (as the cluster's
/// calls run) or on a runtime of its own.
fn block_here<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            bail!("--wait needs a multi-threaded Tokio runtime to block on, or none")
        }
        Ok(rt) => tokio::task::block_in_place(|| rt.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f),
    }
}

/// Each controller at `endpoints` with what its proxies refuse now: read before anything is
/// written, so a controller that cannot be read stops the command first.
pub fn before_write(endpoints: Vec<Endpoint>) -> anyhow::Result<Vec<Controller>> {
    block_here(async {
        let mut out = Vec::new();
        for endpoint in endpoints {
            let proxies = endpoint.json("/debug/proxies").await.with_context(|| {
                format!(
                    "reading proxy status from the controller at {endpoint} for --wait (nothing is \
                     written); {}",
                    crate::admin::CONTROLLER_HINT
                )
            })?;
            let refused = proxies
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .flat_map(refusals)
                .collect();
            out.push(Controller { endpoint, refused });
        }
        Ok(out)
    })
}

/// The types proxy `p` (an entry of `/debug/proxies`) refuses now.
fn refusals(p: &Value) -> Vec<Refusal> {
    let (node, since) = stream_of(p);
    p["types"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, t)| t["state"] == "NACKED")
        .map(|(ty, t)| {
            (
                node.clone(),
                since,
                ty.clone(),
                t["sent_nonce"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn stream_of(p: &Value) -> Stream {
    (
        p["node"].as_str().unwrap_or("?").to_owned(),
        p["connected_at_unix"].as_u64().unwrap_or_default(),
    )
}

/// [`wait`] on the calling thread, with a spinner.
pub fn wait_here(
    ctls: &[Controller],
    c: &Change,
    timeout: Duration,
    out: &mut dyn Write,
) -> anyhow::Result<Acked> {
    block_here(async {
        let progress = Progress::spinner();
        wait(ctls, c, timeout, &progress, out).await
    })
}

/// Waits until every controller of `ctls` serves change `c` and every proxy of each applied
/// it. Each look reads, replica by replica, the Service as the model holds it and the proxies'
/// state; the wait ends at a look where every proxy of every replica is done and was done at
/// the look before (a scoped proxy acknowledges routes before it asks for a backend they newly
/// name; a proxy that moved to another replica is a new stream there). The revision waited for
/// is, per replica, the first one seen holding the change, or a lower one after the controller
/// restarted (its revisions start again).
pub async fn wait(
    ctls: &[Controller],
    c: &Change,
    timeout: Duration,
    progress: &Progress,
    out: &mut dyn Write,
) -> anyhow::Result<Acked> {
    let started = Instant::now();
    let deadline = started
        .checked_add(timeout)
        .with_context(|| format!("--timeout {timeout:?}: too long"))?;
    let poll = if ctls
        .iter()
        .all(|c| matches!(c.endpoint, Endpoint::Direct(_)))
    {
        POLL
    } else {
        POLL_FORWARDED
    };
    let mut held: Vec<Option<u64>> = vec![None; ctls.len()];
    let mut done_before: BTreeSet<(usize, Stream)> = BTreeSet::new();
    let mut last = String::new();
    loop {
        let mut done_now = BTreeSet::new();
        let mut replicas = Vec::new();
        let mut pending = None;
        for (i, ctl) in ctls.iter().enumerate() {
            let looked = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                look(ctl, c, &mut held[i]),
            )
            .await;
            match looked {
                Ok(Ok(streams)) => {
                    replicas.push(Replica {
                        controller: ctl.endpoint.to_string(),
                        revision: held[i].unwrap_or_default(),
                        proxies: streams.len(),
                    });
                    done_now.extend(streams.into_iter().map(|s| (i, s)));
                }
                Ok(Err(Pending::Fails(e))) => return Err(e),
                Ok(Err(Pending::Yet(why))) => {
                    pending = Some(why);
                    break;
                }
                Err(_) => {
                    pending = Some(format!("the controller at {} did not answer", ctl.endpoint));
                    break;
                }
            }
        }
        let why = match pending {
            None if done_now.is_subset(&done_before) => {
                return Ok(Acked {
                    replicas,
                    took: started.elapsed(),
                });
            }
            None => format!(
                "{} proxies acknowledged the change; looking once more",
                done_now.len()
            ),
            Some(why) => why,
        };
        done_before = done_now;
        if Instant::now() >= deadline {
            bail!("after {timeout:?}: {why}; `meshctl proxy-status` shows each proxy's state");
        }
        if why != last {
            progress.status(out, &why)?;
            last = why;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Why one look at a controller did not end the wait.
enum Pending {
    /// Not yet: what is missing.
    Yet(String),
    /// Never: the wait fails with this.
    Fails(anyhow::Error),
}

/// What a failed read of controller `ctl` means for the wait: a refusal (4xx, a forbidden
/// port-forward) ends it; anything else (a port-forward that failed once, a 5xx) is asked again
/// until the deadline.
fn failed_read(ctl: &Endpoint, e: anyhow::Error) -> Pending {
    let refused = crate::cluster::is_forbidden(&e) || crate::admin::is_client_error(&e);
    if refused {
        Pending::Fails(e.context(format!("the controller at {ctl} refused --wait's read")))
    } else {
        Pending::Yet(format!("the controller at {ctl} did not answer: {e:#}"))
    }
}

/// One look at controller `ctl`: every proxy stream of it when all of them serve the change.
async fn look(
    ctl: &Controller,
    c: &Change,
    held: &mut Option<u64>,
) -> Result<Vec<Stream>, Pending> {
    let endpoint = &ctl.endpoint;
    let rule = format!("HTTPRoute {} rule {}", c.route, c.rule + 1);
    let path = format!("/debug/service?service={}/{}", c.namespace, c.service);
    let v = match endpoint.json(&path).await {
        Ok(v) => v,
        // A Service the controller has not read yet (just created) is waited for as well.
        Err(e) if crate::admin::names_unknown_service(&e) => {
            return Err(Pending::Yet(format!(
                "Service {}/{} is not in the configuration of the controller at {endpoint} yet",
                c.namespace, c.service
            )));
        }
        Err(e) if crate::admin::is_not_found(&e) => {
            return Err(Pending::Fails(e.context(format!(
                "the controller at {endpoint} has no /debug/service: it is older than this \
                 meshctl; upgrade the control plane, or leave out --wait"
            ))));
        }
        Err(e) => return Err(failed_read(endpoint, e)),
    };
    let revision = served(&v, c).map_err(|why| {
        Pending::Yet(format!(
            "waiting for the controller at {endpoint} to read {rule}: {why}"
        ))
    })?;
    let r = match *held {
        Some(h) if revision >= h => h,
        _ => revision,
    };
    *held = Some(r);
    let proxies = endpoint
        .json("/debug/proxies")
        .await
        .map_err(|e| failed_read(endpoint, e))?;
    let Some(list) = proxies.as_array() else {
        return Err(Pending::Yet(format!(
            "the controller at {endpoint} answered /debug/proxies with no list"
        )));
    };
    let mut behind = Vec::new();
    for p in list {
        match acknowledged(p, r, &ctl.refused) {
            Ok(true) => {}
            Ok(false) => behind.push(stream_of(p).0),
            Err(e) => {
                return Err(Pending::Fails(anyhow::anyhow!(
                    "proxy {} refused configuration sent since the change was written ({e}); \
                     `meshctl proxy-status` shows each proxy's state",
                    stream_of(p).0
                )));
            }
        }
    }
    if behind.is_empty() {
        return Ok(list.iter().map(stream_of).collect());
    }
    let more = if behind.len() > 3 { ", ..." } else { "" };
    behind.truncate(3);
    Err(Pending::Yet(format!(
        "{}/{} proxies of the controller at {endpoint} applied revision {r}; waiting for {}{more}",
        list.len() - behind.len().min(list.len()),
        list.len(),
        behind.join(", ")
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

/// Whether proxy `p` (an entry of `/debug/proxies`) serves `revision` or later: it has its
/// listeners, and every type it was sent is acknowledged (or, while a later response is on its
/// way, was acknowledged at `revision` or later). A type it refuses is an error unless it
/// refused it before the change was written (`refused`) and was sent nothing since.
pub fn acknowledged(p: &Value, revision: u64, refused: &BTreeSet<Refusal>) -> Result<bool, String> {
    let (node, since) = stream_of(p);
    let Some(types) = p["types"].as_object() else {
        return Ok(false);
    };
    // A stream that has just opened, or a client that asks for listeners only once its clusters
    // are warm (Envoy over SotW), has not got its routes yet.
    if !types.contains_key("LDS") {
        return Ok(false);
    }
    let version = |t: &Value, k: &str| t[k].as_str().and_then(|v| v.parse::<u64>().ok());
    let mut done = p["revision"].as_u64().is_some_and(|r| r >= revision);
    for (ty, t) in types {
        match t["state"].as_str() {
            Some("SYNCED") => {}
            // The stream handles an ACK and a publish one at a time, so an acknowledged version
            // at or past `revision` was acknowledged for content of that revision.
            Some("STALE") if version(t, "acked_version").is_some_and(|a| a >= revision) => {}
            Some("NACKED") => {
                let nonce = t["sent_nonce"].as_str().unwrap_or_default();
                let key = (node.clone(), since, ty.clone(), nonce.to_owned());
                if !refused.contains(&key) {
                    return Err(format!(
                        "{ty} sent at revision {}: {}",
                        t["sent_version"].as_str().unwrap_or("?"),
                        t["error"].as_str().unwrap_or("no reason given")
                    ));
                }
            }
            _ => done = false,
        }
    }
    Ok(done)
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

    fn proxy(revision: u64, rds: &str, sent: &str) -> serde_json::Value {
        json!({"node": "default/a", "connected_at_unix": 100, "revision": revision, "types": {
            "CDS": {"state": "SYNCED", "sent_version": sent, "acked_version": sent},
            "LDS": {"state": "SYNCED", "sent_version": sent, "acked_version": sent},
            "RDS": {"state": rds, "sent_version": sent, "sent_nonce": "n1",
                    "acked_version": "5", "error": "bad route"},
        }})
    }

    #[test]
    fn a_proxy_counts_once_it_applied_the_revision_and_fails_on_a_new_refusal() {
        let none = BTreeSet::new();
        assert_eq!(acknowledged(&proxy(7, "SYNCED", "7"), 7, &none), Ok(true));
        assert_eq!(acknowledged(&proxy(8, "SYNCED", "8"), 7, &none), Ok(true));
        assert_eq!(acknowledged(&proxy(6, "SYNCED", "6"), 7, &none), Ok(false));
        // A response on its way: done only if the type was acknowledged at the revision.
        assert_eq!(acknowledged(&proxy(7, "STALE", "7"), 7, &none), Ok(false));
        assert_eq!(acknowledged(&proxy(8, "STALE", "8"), 5, &none), Ok(true));
        // A refusal is the change's unless the stream held it before the change was written.
        assert_eq!(
            acknowledged(&proxy(7, "NACKED", "6"), 7, &none),
            Err("RDS sent at revision 6: bad route".into())
        );
        let before = BTreeSet::from([(
            "default/a".to_owned(),
            100,
            "RDS".to_owned(),
            "n1".to_owned(),
        )]);
        assert_eq!(acknowledged(&proxy(7, "NACKED", "6"), 7, &before), Ok(true));
        assert_eq!(
            acknowledged(&proxy(6, "NACKED", "6"), 7, &before),
            Ok(false)
        );
        // A stream just opened, or one with clusters but no listeners yet, is not done.
        let fresh = json!({"node": "default/b", "revision": 9, "types": {}});
        assert_eq!(acknowledged(&fresh, 7, &none), Ok(false));
        let warming = json!({"node": "default/b", "revision": 9, "types": {
            "CDS": {"state": "SYNCED", "sent_version": "9"}}});
        assert_eq!(acknowledged(&warming, 7, &none), Ok(false));
    }

    /// A controller's admin API answering what the test sets, counting the looks at it.
    #[derive(Clone, Default)]
    struct Stub {
        answers: std::sync::Arc<std::sync::Mutex<(serde_json::Value, serde_json::Value)>>,
        looks: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    }

    impl Stub {
        async fn start(&self) -> std::net::SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let stub = self.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let stub = stub.clone();
                    let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let stub = stub.clone();
                        async move {
                            let (service, proxies) = stub.answers.lock().expect("lock").clone();
                            let body = if req.uri().path() == "/debug/proxies" {
                                stub.looks.send_modify(|n| *n += 1);
                                proxies
                            } else {
                                service
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body.to_string())),
                            ))
                        }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                    );
                }
            });
            addr
        }

        fn set(&self, service: serde_json::Value, proxies: serde_json::Value) {
            *self.answers.lock().expect("lock") = (service, proxies);
        }

        /// Until the wait has looked at the proxies `n` more times.
        async fn looked(&self, n: u64) {
            let mut rx = self.looks.subscribe();
            let from = *rx.borrow_and_update();
            rx.wait_for(|l| *l >= from + n).await.expect("stub");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wait_ends_once_every_proxy_applied_the_revision_holding_the_change() {
        let c = change(&[("reviews-v1", 50), ("reviews-v2", 50)]);
        let old = answer(4, forward(&[("reviews-v1", 90), ("reviews-v2", 10)]));
        let new = |r| answer(r, forward(&[("reviews-v1", 50), ("reviews-v2", 50)]));
        let stub = Stub::default();
        stub.set(old.clone(), json!([proxy(4, "SYNCED", "4")]));
        let addr = stub.start().await;
        let ctls = vec![Controller {
            endpoint: Endpoint::Direct(addr),
            refused: BTreeSet::new(),
        }];
        let progress = Progress::hidden();
        let mut out = Vec::new();
        let waited = wait(&ctls, &c, Duration::from_secs(20), &progress, &mut out);
        let drive = async {
            // The model without the change, then with it and the proxy behind, then applied.
            stub.looked(0).await;
            stub.set(new(5), json!([proxy(4, "SYNCED", "4")]));
            stub.looked(2).await;
            stub.set(new(6), json!([proxy(6, "SYNCED", "6")]));
        };
        let (acked, ()) = tokio::join!(waited, drive);
        let acked = acked.expect("applied");
        assert_eq!(acked.replicas[0].revision, 5);
        assert_eq!(acked.replicas[0].proxies, 1);
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("0/1 proxies of the controller"), "{out}");
        assert!(out.contains("looking once more"), "{out}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_refusal_fails_the_wait_and_one_held_before_does_not() {
        let c = change(&[("reviews-v1", 50), ("reviews-v2", 50)]);
        let new = answer(6, forward(&[("reviews-v1", 50), ("reviews-v2", 50)]));
        let stub = Stub::default();
        stub.set(new, json!([proxy(6, "NACKED", "6")]));
        let addr = stub.start().await;
        let progress = Progress::hidden();
        let fresh = vec![Controller {
            endpoint: Endpoint::Direct(addr),
            refused: BTreeSet::new(),
        }];
        let e = wait(
            &fresh,
            &c,
            Duration::from_secs(20),
            &progress,
            &mut Vec::new(),
        )
        .await
        .expect_err("refused");
        assert!(
            format!("{e:#}").contains("RDS sent at revision 6: bad route"),
            "{e:#}"
        );
        let known = vec![Controller {
            endpoint: Endpoint::Direct(addr),
            refused: refusals(&proxy(6, "NACKED", "6")).into_iter().collect(),
        }];
        let acked = wait(
            &known,
            &c,
            Duration::from_secs(20),
            &progress,
            &mut Vec::new(),
        )
        .await
        .expect("an old refusal is not the change's");
        assert_eq!(acked.replicas[0].proxies, 1);
    }
}
