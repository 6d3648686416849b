//! A small in-memory Kubernetes API server behind kube-rs's mock client, for tests: objects
//! by path, creates and updates (with resourceVersion conflicts), server-side apply with field
//! ownership (a field another manager owns and the apply changes is a 409 conflict unless
//! forced; what a manager stops applying goes unless another owns it; a changed object gets a
//! new resourceVersion, an unchanged one keeps it), deletes, watches that stream changes from
//! a resourceVersion (410 Gone once [`FakeApi::compact_and_end_watches`] has forgotten it),
//! CRDs that become Established and Deployments that roll out after a few reads, Services
//! given a cluster IP when written without one (no node ports, no load balancer), and
//! SelfSubjectAccessReviews answered from a list of denied permissions. Every request is
//! logged.
//!
//! Writes are admitted as kube-apiserver admits them ([`crate::schema`]): a custom object needs
//! its CRD stored here (else 404, as for a kind the server does not serve), is pruned and
//! defaulted by that CRD's structural schema and refused with 422 when invalid; a built-in
//! object goes through its k8s-openapi type (unknown fields pruned, wrong types refused); a kind
//! neither knows gets 404. Pruned fields are answered as the server's `fieldValidation` says:
//! `Warn` (the default) keeps the write and sends a `Warning` header per field (also kept in
//! [`State::warnings`]), `Strict` refuses it, `Ignore` says nothing. [`FakeApi::insert`] stores
//! as it is given: what another writer left.
//!
//! Objects have UIDs as the API server gives them: a new one on each create (a UID a client
//! sends with a create is dropped), kept by every change; a write that names another UID is
//! refused (409 for an update, 422 for a patch or apply). [`FakeApi::insert`] keeps a UID it is
//! given, and gives one to an object without.
//!
//! An API group's objects are one set at every version, as the API server serves a CRD with
//! several versions and no conversion webhook: a list, watch or get at one version sees the
//! objects written at another, with that version's `apiVersion`, and a write at another
//! version changes the object where it is stored (which keeps the version it was created
//! at).
//!
//! [`FakeApi::start`]'s client is a cluster admin. [`FakeApi::client_as`] gives a client whose
//! requests are made as a service account and authorized by the RBAC objects stored here
//! ([`rbac`]): a request no rule allows gets 403, as a real cluster answers a missing grant
//! (a server-side apply that creates its object needs `create` as well as `patch`).
//! TokenReviews are answered from [`State::tokens`] (with the groups the API server gives each
//! user), SubjectAccessReviews by the same RBAC objects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::client::Body;
use serde_json::{Value, json};

use crate::schema;

#[path = "fake_rbac.rs"]
pub mod rbac;

/// Response bodies: whole ones, and watch streams.
type FakeBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;
type Resp = Response<FakeBody>;

fn full(bytes: Vec<u8>) -> FakeBody {
    Full::new(Bytes::from(bytes)).boxed_unsync()
}

/// A watch's events as they come.
fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Resp {
    use tokio_stream::StreamExt;
    let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(frames).boxed_unsync())
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

/// One change, as a watch sends it.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    path: String,
    kind: &'static str,
    object: Value,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// `system:serviceaccount:NS:NAME` for a [`FakeApi::client_as`] client; empty for the admin.
    pub user: String,
    /// Its RBAC attributes; `None` for a non-resource path.
    pub attributes: Option<rbac::Attributes>,
    /// Refused by RBAC.
    pub forbidden: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub objects: BTreeMap<String, Value>,
    pub log: Vec<Logged>,
    rv: u64,
    /// UIDs given out to new objects so far.
    uids: u64,
    /// Reads of a CRD before it reports Established.
    pub established_after: u32,
    /// Reads of a Deployment before its replicas are available.
    pub rollout_after: u32,
    /// Reads of a MutatingWebhookConfiguration before its caBundle is set (as the controller
    /// would).
    pub ca_bundle_after: u32,
    reads: BTreeMap<String, u32>,
    /// `(verb, group, resource)` that SelfSubjectAccessReviews deny.
    pub denied: Vec<(String, String, String)>,
    /// Requests answered with this error status instead (API server unreachable, ...).
    pub fail_all: Option<u16>,
    /// Bodies served as they are at these paths (`/version`, a pod's port through the proxy).
    pub raw: BTreeMap<String, String>,
    /// `unknown field "spec.x"` for each field a write lost to pruning, as the API server's
    /// `Warning` headers say it.
    pub warnings: Vec<String>,
    /// Tokens TokenReviews authenticate (and requests over HTTP, for [`API_AUDIENCE`]).
    pub tokens: BTreeMap<String, Token>,
    /// Where a pod's port-forward connects; `None`: port-forwards fail.
    pub port_forwarder: Option<PortForwarder>,
    /// The token authenticator ignores audiences (a webhook that is not audience-aware):
    /// TokenReviews authenticate any known token and name no audience.
    pub audience_unaware: bool,
    /// Changes since the last compaction, which watches replay from their resourceVersion.
    events: Vec<Event>,
    /// A watch from a resourceVersion before this gets 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch (the server closes them at times).
    watch_generation: u64,
    /// Watches answered 410 Gone.
    pub expired_watches: u32,
    /// Server-side apply's field ownership: per object path, per field manager, the fields it
    /// last applied or changed.
    managed: BTreeMap<String, BTreeMap<String, BTreeSet<Field>>>,
    changed: Option<tokio::sync::watch::Sender<()>>,
}

/// A service account token, as the API server knows one it issued.
#[derive(Clone, Debug, Default)]
pub struct Token {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub user: String,
    /// The audiences it is bound to.
    pub audiences: Vec<String>,
    /// When it expires (a projected token's `expirationSeconds` after its issue); `None`: never,
    /// as a legacy Secret-based token.
    pub expires: Option<std::time::SystemTime>,
    /// The pod it is bound to: once that pod is gone, so is the token, as for a projected
    /// token; a pod made again under the same name (a StatefulSet's) is another pod.
    pub pod: Option<BoundPod>,
}

/// The pod a token is bound to, as the API server records it: by name and UID.
#[derive(Clone, Debug)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Token {
    /// A token of service account `ns/sa` for `audience`, bound to no pod, never expiring.
    pub fn new(ns: &str, sa: &str, audience: &str) -> Self {
        Self {
            user: format!("system:serviceaccount:{ns}:{sa}"),
            audiences: vec![audience.to_owned()],
            ..Self::default()
        }
    }
}

/// The port-forward subprotocol the fake speaks (kube-rs offers v5 and v4).
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

/// Connects to a port on a pod's loopback (the pod's object, the port), as the kubelet does
/// for a port-forward: a test whose pods run somewhere sets one in [`State::port_forwarder`].
#[derive(Clone)]
pub struct PortForwarder(pub Arc<Connect>);

/// A connection to a port of a pod (its object).
pub type Connect = dyn Fn(&Value, u16) -> std::io::Result<std::net::TcpStream> + Send + Sync;

impl std::fmt::Debug for PortForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortForwarder")
    }
}

/// One port-forward's bytes between the WebSocket and the pod's connection, until either ends.
/// A connection that failed is reported on the error channel, in the API server's words.
async fn forward_port<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    port: u16,
    conn: std::io::Result<tokio::net::TcpStream>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message;
    let [lo, hi] = port.to_le_bytes();
    for ch in [0u8, 1] {
        if ws.send(Message::binary(vec![ch, lo, hi])).await.is_err() {
            return;
        }
    }
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            let mut m = vec![1u8];
            m.extend(format!("error forwarding port {port} to pod: {e}").into_bytes());
            let _ = ws.send(Message::binary(m)).await;
            let _ = ws.close(None).await;
            return;
        }
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&0) => {
                    if conn.write_all(&b[1..]).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            n = conn.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut m = Vec::with_capacity(n + 1);
                    m.push(0u8);
                    m.extend_from_slice(&buf[..n]);
                    if ws.send(Message::binary(m)).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = ws.close(None).await;
}

/// The audience of the API server's own tokens (`kubectl create token` without `--audience`),
/// which a TokenReview without audiences asks for.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Clone, Debug)]
pub struct FakeApi(pub Arc<Mutex<State>>);

impl FakeApi {
    /// A client talking to a new fake, and the fake. Needs a Tokio runtime.
    pub fn start() -> (kube::Client, FakeApi) {
        let version = json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0",
            "gitCommit": "0", "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"});
        let fake = FakeApi(Arc::new(Mutex::new(State {
            established_after: 2,
            rollout_after: 2,
            ca_bundle_after: 1,
            raw: BTreeMap::from([("/version".to_owned(), version.to_string())]),
            ..State::default()
        })));
        let client = fake.serve(None);
        (client, fake)
    }

    /// A client of this fake whose requests are made as service account `namespace/name`,
    /// authorized by the RBAC objects stored here. Needs a Tokio runtime.
    pub fn client_as(&self, namespace: &str, name: &str) -> kube::Client {
        self.serve(Some(format!("system:serviceaccount:{namespace}:{name}")))
    }

    fn serve(&self, user: Option<String>) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Resp>();
        let state = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let state = state.clone();
                let user = user.clone();
                // Each request on its own task: a parked watch must not hold up the rest.
                tokio::spawn(async move {
                    let resp = state.handle(req, user.as_deref()).await;
                    send.send_response(resp);
                });
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Serves this fake over plaintext HTTP/1.1 on `listener`, as an API server a process
    /// reaches with a kubeconfig ([`kubeconfig`]). A request's bearer token names its user
    /// through `users` (token to `system:serviceaccount:NS:NAME`, or any user name:
    /// [`rbac::ADMIN`] is a cluster admin), or is one of [`State::tokens`] valid for
    /// [`API_AUDIENCE`]; the RBAC objects stored here authorize it as for
    /// [`FakeApi::client_as`]; a request without a known token gets 401, as from an API server
    /// that lets no anonymous request in. A pod's `portforward` is served as the API server
    /// serves it to kube-rs (a WebSocket, one port per request) to where
    /// [`State::port_forwarder`] connects. Serves until the task is aborted.
    pub fn serve_http(
        &self,
        listener: tokio::net::TcpListener,
        users: BTreeMap<String, String>,
    ) -> tokio::task::JoinHandle<()> {
        let fake = self.clone();
        let users = Arc::new(users);
        tokio::spawn(async move {
            // Connections end with the server: aborting it drops the set, which aborts them.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of descriptors, say: the server stays up, as kube-apiserver's does.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                while connections.try_join_next().is_some() {}
                let (fake, users) = (fake.clone(), users.clone());
                let svc = hyper::service::service_fn(move |req| {
                    let (fake, users) = (fake.clone(), users.clone());
                    async move { Ok::<_, std::convert::Infallible>(fake.serve_one(req, &users).await) }
                });
                connections.spawn(async move {
                    // A client that goes away mid-watch ends its connection; nothing to do.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        })
    }

    async fn serve_one(
        &self,
        req: Request<hyper::body::Incoming>,
        users: &BTreeMap<String, String>,
    ) -> Resp {
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let user = token.and_then(|token| {
            users.get(token).cloned().or_else(|| {
                let s = self.state();
                let api = [API_AUDIENCE.to_owned()];
                s.authenticate(token, &api)
                    .ok()
                    .map(|(t, _)| t.user.clone())
            })
        });
        let Some(user) = user else {
            return status(401, "Unauthorized", "Unauthorized");
        };
        if req.uri().path().ends_with("/portforward") {
            return self.port_forward(req, &user);
        }
        let (parts, body) = req.into_parts();
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(400, "BadRequest", &format!("reading the body: {e}")),
        };
        self.handle(
            Request::from_parts(parts, Body::from(bytes.to_vec())),
            Some(&user),
        )
        .await
    }

    /// A pod's port-forward: the WebSocket upgrade kube-rs asks for, then the bytes of one
    /// port between it and [`State::port_forwarder`]'s connection, framed as the API server
    /// frames them (`v4.channel.k8s.io`: a channel byte, data on channel 0, errors on 1, each
    /// channel's first frame the port number).
    fn port_forward(&self, mut req: Request<hyper::body::Incoming>, user: &str) -> Resp {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        // A WebSocket upgrade is a GET; RBAC asks for `create`, as for SPDY.
        let Some(attributes) = rbac::Attributes::of("POST", &path, "") else {
            return status(404, "NotFound", &format!("{path} not found"));
        };
        let pod_path = path.trim_end_matches("/portforward").to_owned();
        let (pod, forwarder) = {
            let mut s = self.state();
            let entry = Logged {
                method: req.method().to_string(),
                path: path.clone(),
                query: query.clone(),
                content_type: String::new(),
                user: String::new(),
                attributes: Some(attributes.clone()),
                forbidden: false,
            };
            if let Some(refused) = s.record(Some(user), entry) {
                return refused;
            }
            (s.objects.get(&pod_path).cloned(), s.port_forwarder.clone())
        };
        let Some(pod) = pod else {
            return status(
                404,
                "NotFound",
                &format!("pods {:?} not found", attributes.name),
            );
        };
        let ports: Vec<&str> = query
            .split('&')
            .filter_map(|q| q.strip_prefix("ports="))
            .flat_map(|p| p.split("%2C").flat_map(|p| p.split(',')))
            .collect();
        let port = match ports.as_slice() {
            [p] => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return status(400, "BadRequest", &format!("invalid port {p:?}")),
            },
            _ => {
                return status(
                    400,
                    "BadRequest",
                    "the fake API server forwards one port per request",
                );
            }
        };
        let headers = req.headers();
        let offered = headers
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let key = headers.get(http::header::SEC_WEBSOCKET_KEY).cloned();
        let (Some(key), true) = (
            key,
            offered
                .split(',')
                .any(|p| p.trim() == PORT_FORWARD_PROTOCOL),
        ) else {
            return status(
                400,
                "BadRequest",
                &format!("a port-forward is a WebSocket upgrade offering {PORT_FORWARD_PROTOCOL}"),
            );
        };
        let Some(forwarder) = forwarder else {
            return status(
                500,
                "InternalError",
                "this fake API server has no port_forwarder: its pods run nowhere",
            );
        };
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                hyper_util::rt::TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            let connect = tokio::task::spawn_blocking(move || (forwarder.0)(&pod, port));
            let conn = match connect.await {
                Ok(Ok(c)) => c
                    .set_nonblocking(true)
                    .and_then(|()| tokio::net::TcpStream::from_std(c)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(std::io::Error::other(e)),
            };
            forward_port(ws, port, conn).await;
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header(
                http::header::SEC_WEBSOCKET_ACCEPT,
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
            )
            .header(http::header::SEC_WEBSOCKET_PROTOCOL, PORT_FORWARD_PROTOCOL)
            .body(full(Vec::new()))
            .unwrap_or_else(|_| Response::new(full(Vec::new())))
    }

    /// A client of this fake over HTTP ([`FakeApi::serve_http`] on a loopback port of its
    /// own) as `user` ([`rbac::ADMIN`]: a cluster admin); the client kube-rs makes from a
    /// kubeconfig, so port-forwards work. Needs a Tokio runtime.
    pub async fn http_client(&self, user: &str) -> std::io::Result<kube::Client> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let server = format!("http://{}", listener.local_addr()?);
        let token = format!("token-of-{user}");
        // The server ends with the runtime.
        drop(self.serve_http(listener, BTreeMap::from([(token.clone(), user.to_owned())])));
        let kc = kube::config::Kubeconfig::from_yaml(&kubeconfig(&server, &token, "default"))
            .map_err(std::io::Error::other)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(std::io::Error::other)?;
        kube::Client::try_from(config).map_err(std::io::Error::other)
    }

    /// Pods whose ports answer from [`State::raw`]: a port-forward's GET of `path` on port
    /// `port` of pod `ns/name` gets what is stored at
    /// `/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy{path}` (the path with its query; 404
    /// without), as the pod's proxy path would; a port with nothing stored refuses the
    /// connection. Needs a Tokio runtime.
    pub fn forward_to_raw(&self) {
        let fake = self.clone();
        let rt = tokio::runtime::Handle::current();
        let forward = move |pod: &Value, port: u16| -> std::io::Result<std::net::TcpStream> {
            let m = |k: &str| pod["metadata"][k].as_str().unwrap_or("").to_owned();
            let base = format!(
                "/api/v1/namespaces/{}/pods/{}:{port}/proxy",
                m("namespace"),
                m("name")
            );
            let prefix = format!("{base}/");
            if !fake.state().raw.keys().any(|k| k.starts_with(&prefix)) {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.set_nonblocking(true)?;
            let addr = listener.local_addr()?;
            let fake = fake.clone();
            rt.spawn(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let body = fake.state().raw.get(&format!("{base}{path}")).cloned();
                    let resp = match body {
                        Some(b) => Response::new(full(b.into_bytes())),
                        None => status(404, "NotFound", &format!("{path} not found")),
                    };
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
            std::net::TcpStream::connect(addr)
        };
        self.state().port_forwarder = Some(PortForwarder(Arc::new(forward)));
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().expect("fake API state")
    }

    /// Stores the chart's CRDs (ours and the Gateway API standard channel), Established, as
    /// `meshctl install` leaves a cluster.
    pub fn install_chart_crds(&self) {
        for crd in crate::crds::chart_crds() {
            let mut v = serde_json::to_value(&crd).unwrap_or_default();
            v["status"] = json!({"conditions": [{"type": "Established", "status": "True"}]});
            self.insert(v);
        }
    }

    /// Stores `o` as if someone else had created it (not admitted: tests use it for state a
    /// cluster's other writers leave).
    pub fn insert(&self, o: Value) {
        self.state().put(o);
    }

    /// What etcd compaction and a dropped connection do to watches: every open watch ends and
    /// history is forgotten, so a client that watches again from where it was gets 410 Gone
    /// and must list again. `change` runs first, under the same lock, so watchers miss it.
    pub fn compact_and_end_watches(&self, change: impl FnOnce(&mut State)) {
        let mut s = self.state();
        change(&mut s);
        s.compacted = s.rv;
        s.events.clear();
        s.watch_generation += 1;
        s.notify();
    }

    pub fn writes(&self) -> Vec<Logged> {
        self.state()
            .log
            .iter()
            .filter(|l| l.method != "GET")
            .cloned()
            .collect()
    }

    async fn handle(&self, req: Request<Body>, user: Option<&str>) -> Resp {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        match self.answer(parts, &bytes, user) {
            Some(resp) => resp,
            None => self.watch(&path, &query),
        }
    }

    /// A watch: the collection's changes after the request's resourceVersion (every object
    /// as ADDED without one), then each change as it happens, one JSON event per line, until
    /// [`FakeApi::compact_and_end_watches`]. From a resourceVersion older than the last
    /// compaction: one ERROR event with a 410 Status, as the API server answers.
    fn watch(&self, path: &str, query: &str) -> Resp {
        if let Some(refused) = unsupported_field(path, query) {
            return refused;
        }
        let from: Option<u64> = query
            .split('&')
            .find_map(|q| q.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .filter(|v| *v != 0);
        let selector = label_selector(query);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
        let line = |e: Value| {
            let mut l = serde_json::to_vec(&e).unwrap_or_default();
            l.push(b'\n');
            Bytes::from(l)
        };
        let (mut last, generation, mut changed) = {
            let mut s = self.state();
            let changed = s.subscribe();
            match from {
                Some(rv) if rv < s.compacted => {
                    let gone = json!({"type": "ERROR", "object": {"kind": "Status",
                        "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {rv} ({})", s.compacted)}});
                    let _ = tx.try_send(line(gone));
                    s.expired_watches += 1;
                    return stream_response(rx);
                }
                Some(rv) => (rv, s.watch_generation, changed),
                None => {
                    for o in s.collection(path, &selector) {
                        let _ = tx.try_send(line(json!({"type": "ADDED", "object": o})));
                    }
                    (s.rv, s.watch_generation, changed)
                }
            }
        };
        let state = self.clone();
        let path = path.to_owned();
        tokio::spawn(async move {
            loop {
                let batch: Vec<Bytes> = {
                    let s = state.state();
                    if s.watch_generation != generation {
                        return;
                    }
                    let batch = s
                        .events
                        .iter()
                        .filter(|e| e.rv > last && same_collection(&e.path, &path))
                        .filter(|e| matches_labels(&e.object, &selector))
                        .map(|e| {
                            let o = at_version_of(e.object.clone(), &path);
                            line(json!({"type": e.kind, "object": o}))
                        })
                        .collect();
                    last = s.rv;
                    batch
                };
                for b in batch {
                    if tx.send(b).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        stream_response(rx)
    }

    /// The response to a request, `None` for a watch.
    fn answer(
        &self,
        parts: http::request::Parts,
        bytes: &[u8],
        user: Option<&str>,
    ) -> Option<Resp> {
        let method = parts.method.to_string();
        let path = parts.uri.path().to_owned();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut s = self.state();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let logged = Logged {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            user: String::new(),
            attributes: rbac::Attributes::of(&method, &path, &query),
            forbidden: false,
        };
        if let Some(refused) = s.record(user, logged.clone()) {
            return Some(refused);
        }
        if let Some(code) = s.fail_all {
            return Some(status(
                code,
                "InternalError",
                "the fake API server fails every request",
            ));
        }
        let body: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
        let (prefix_len, rest) = split(path.strip_suffix("/status").unwrap_or(&path));
        let is_list = rest.len() % 2 == 1 && prefix_len > 0;
        let asked = path.clone();
        let path = if is_list || method == "POST" {
            path
        } else {
            s.stored_path(&path)
        };
        // An apply that creates the object is authorized as a create too, as the API server
        // does (its log shows both): `patch` alone creates nothing.
        if method == "PATCH"
            && content_type.starts_with("application/apply-patch")
            && !s.objects.contains_key(&path)
            && let (Some(u), Some(a)) = (user, &logged.attributes)
        {
            let create = rbac::Attributes {
                verb: "create".into(),
                ..a.clone()
            };
            let entry = Logged {
                attributes: Some(create),
                ..logged.clone()
            };
            if let Some(refused) = s.record(Some(u), entry) {
                return Some(refused);
            }
        }
        let body = match body {
            // Written where the object is stored, at its stored version.
            Value::Object(mut m) if path != asked && m.contains_key("apiVersion") => {
                if let Some(v) = split_version(&path) {
                    m.insert("apiVersion".into(), json!(v));
                }
                Value::Object(m)
            }
            b => b,
        };
        Some(match method.as_str() {
            "GET"
                if query
                    .split('&')
                    .any(|q| q == "watch=true" || q == "watch=1") =>
            {
                return None;
            }
            "GET" if s.raw.contains_key(&path) => Response::builder()
                .status(StatusCode::OK)
                .body(full(s.raw[&path].clone().into_bytes()))
                .unwrap_or_else(|_| Response::new(full(Vec::new()))),
            "GET" if is_list => s.list(&path, &query),
            "GET" => s.get(path.trim_end_matches("/status"), &asked),
            "PATCH" if content_type.starts_with("application/merge-patch+json") => {
                s.merge(path.trim_end_matches("/status"), body, &query)
            }
            "PATCH" => s.apply(&path, body, &query),
            "DELETE" => match s.delete(&path) {
                Some(_) => respond(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                ),
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            "POST" if path.ends_with("/selfsubjectaccessreviews") => s.review(body),
            "POST" if path == "/apis/authentication.k8s.io/v1/tokenreviews" => s.token_review(body),
            "POST" if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
                s.subject_review(body)
            }
            "POST" => s.create(&path, body, &query),
            "PUT" => s.replace(&path, body, &query),
            _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
        })
    }
}

/// `o` as a request at `path` sees it: with the `apiVersion` of the path's API group version.
fn at_version_of(mut o: Value, path: &str) -> Value {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let ["apis", group, version, ..] = segs.as_slice() {
        o["apiVersion"] = json!(format!("{group}/{version}"));
    }
    o
}

/// `(length of the /api/v1 or /apis/GROUP/VERSION prefix in segments, the rest)`.
fn split(path: &str) -> (usize, Vec<&str>) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let n = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return (0, segs),
    };
    if segs.len() < n {
        return (0, segs);
    }
    (n, segs[n..].to_vec())
}

/// Whether the object at `p` is in the collection at `collection` (every namespace's, or one's).
/// The API a path is of, from its first `n` segments: `/api/v1`, or `/apis/<group>` at any
/// version.
fn api_of(path: &str, n: usize) -> Vec<&str> {
    let mut v: Vec<&str> = path.trim_matches('/').split('/').take(n).collect();
    if v.first() == Some(&"apis") {
        v.truncate(2);
    }
    v
}

/// `<group>/<version>` of an `/apis/...` path.
fn split_version(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["apis", group, version, ..] => Some(format!("{group}/{version}")),
        _ => None,
    }
}

fn same_collection(p: &str, collection: &str) -> bool {
    let (n, rest) = split(collection);
    let (ns, plural) = match rest.as_slice() {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(*ns), *plural),
        _ => return false,
    };
    let (m, r) = split(p);
    let same_api = m == n && api_of(p, m) == api_of(collection, n);
    same_api
        && match (r.as_slice(), ns) {
            ([pl, _], None) => *pl == plural,
            (["namespaces", _, pl, _], None) => *pl == plural,
            (["namespaces", n, pl, _], Some(want)) => *pl == plural && *n == want,
            _ => false,
        }
}

/// The `key=value` terms of a request's `labelSelector`, and of its `fieldSelector` (as
/// `field:key`).
fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|q| {
            q.strip_prefix("labelSelector=")
                .map(|s| ("", s))
                .or_else(|| q.strip_prefix("fieldSelector=").map(|s| ("field:", s)))
        })
        .flat_map(|(prefix, sel)| {
            percent_decode(sel)
                .split(',')
                .filter_map(|t| {
                    t.split_once('=').map(|(k, v)| {
                        (
                            format!("{prefix}{}", k.trim_end_matches('=')),
                            v.trim_start_matches('=').to_owned(),
                        )
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A 400 for a `fieldSelector` on a field the API server does not index for the collection
/// (every kind has `metadata.name` and `metadata.namespace`; Secrets also `type`), as
/// kube-apiserver refuses it.
fn unsupported_field(path: &str, query: &str) -> Option<Resp> {
    let plural = path.rsplit('/').next().unwrap_or_default();
    label_selector(query).into_iter().find_map(|(k, _)| {
        let field = k.strip_prefix("field:")?;
        let known = matches!(field, "metadata.name" | "metadata.namespace")
            || (plural == "secrets" && field == "type");
        (!known).then(|| {
            status(
                400,
                "BadRequest",
                &format!("field label not supported: {field}"),
            )
        })
    })
}

/// Whether `o` matches a selector's terms: labels, and `metadata.name` / `metadata.namespace`
/// from a `fieldSelector`.
fn matches_labels(o: &Value, selector: &[(String, String)]) -> bool {
    selector.iter().all(|(k, v)| {
        let have = match k.strip_prefix("field:") {
            Some("metadata.name") => o.pointer("/metadata/name"),
            Some("metadata.namespace") => o.pointer("/metadata/namespace"),
            Some("type") => o.pointer("/type"),
            Some(_) => return false,
            None => o.pointer("/metadata/labels").and_then(|l| l.get(k)),
        };
        have.and_then(Value::as_str) == Some(v.as_str())
    })
}

/// A query value decoded as a form would be (`+` is a space).
fn percent_decode(s: &str) -> String {
    crate::path::percent_decode(&s.replace('+', " "))
}

impl State {
    /// A list: objects of the collection (every namespace's, or one's), filtered by a
    /// `labelSelector` of `key=value` terms.
    fn list(&mut self, path: &str, query: &str) -> Resp {
        if let Some(refused) = unsupported_field(path, query) {
            return refused;
        }
        let items = self.collection(path, &label_selector(query));
        respond(
            StatusCode::OK,
            &json!({"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
        )
    }

    /// The objects of a collection path that match a label selector.
    fn collection(&self, path: &str, selector: &[(String, String)]) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(p, _)| same_collection(p, path))
            .map(|(_, o)| at_version_of(o.clone(), path))
            .filter(|o| matches_labels(o, selector))
            .collect()
    }

    /// Where the object a request names is stored: `path`, or the same object's path at
    /// another version of its API group (with `/status` kept).
    fn stored_path(&self, path: &str) -> String {
        let (object, sub) = match path.strip_suffix("/status") {
            Some(o) => (o, "/status"),
            None => (path, ""),
        };
        if self.objects.contains_key(object) || !object.starts_with("/apis/") {
            return path.to_owned();
        }
        let segs: Vec<&str> = object.trim_matches('/').split('/').collect();
        if segs.len() < 4 {
            return path.to_owned();
        }
        let (group, rest) = (segs[1], segs[3..].join("/"));
        self.objects
            .keys()
            .find(|k| {
                let ks: Vec<&str> = k.trim_matches('/').split('/').collect();
                ks.len() == segs.len() && ks[1] == group && ks[3..].join("/") == rest
            })
            .map_or_else(|| path.to_owned(), |k| format!("{k}{sub}"))
    }

    /// Stores `o` as another writer would (not admitted), with a new resourceVersion.
    pub fn put(&mut self, mut o: Value) {
        self.rv += 1;
        o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let path = self.stored_path(&path_of(&o));
        if let Some(v) = split_version(&path) {
            o["apiVersion"] = json!(v);
        }
        self.store(path, o);
    }

    /// Stores an object and tells watches; returns it as stored. An object without a UID
    /// keeps the stored one's, or gets a new one when there is none (the API's writes check
    /// and drop UIDs before).
    fn store(&mut self, path: String, mut o: Value) -> Value {
        let kind = if self.objects.contains_key(&path) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if uid_of(&o).is_none() {
            let uid = match self.objects.get(&path).and_then(uid_of) {
                Some(u) => u.to_owned(),
                None => {
                    self.uids += 1;
                    format!("00000000-0000-4000-8000-{:012x}", self.uids)
                }
            };
            o["metadata"]["uid"] = json!(uid);
        }
        self.events.push(Event {
            rv: self.rv,
            path: path.clone(),
            kind,
            object: o.clone(),
        });
        self.objects.insert(path, o.clone());
        self.notify();
        o
    }

    /// Deletes the object at `path` and tells watches.
    pub fn delete(&mut self, path: &str) -> Option<Value> {
        let o = self.objects.remove(path)?;
        self.managed.remove(path);
        self.rv += 1;
        let mut gone = o.clone();
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.events.push(Event {
            rv: self.rv,
            path: path.to_owned(),
            kind: "DELETED",
            object: gone,
        });
        self.notify();
        Some(o)
    }

    fn subscribe(&mut self) -> tokio::sync::watch::Receiver<()> {
        self.changed
            .get_or_insert_with(|| tokio::sync::watch::Sender::new(()))
            .subscribe()
    }

    fn notify(&self) {
        if let Some(c) = &self.changed {
            c.send_replace(());
        }
    }

    /// The object at `path`, as a request at `asked` (the same object at another version)
    /// sees it.
    fn get(&mut self, path: &str, asked: &str) -> Resp {
        let reads = {
            let r = self.reads.entry(path.to_owned()).or_insert(0);
            *r += 1;
            *r
        };
        let (established_after, rollout_after, ca_bundle_after) = (
            self.established_after,
            self.rollout_after,
            self.ca_bundle_after,
        );
        let Some(o) = self.objects.get_mut(path) else {
            return status(404, "NotFound", &format!("{path} not found"));
        };
        match o["kind"].as_str() {
            Some("CustomResourceDefinition") if reads > established_after => {
                o["status"] = json!({"conditions": [{"type": "Established", "status": "True"}]});
            }
            // The controller sets the injector's caBundle once it runs.
            Some("MutatingWebhookConfiguration") if reads > ca_bundle_after => {
                for h in o["webhooks"].as_array_mut().into_iter().flatten() {
                    if h.pointer("/clientConfig/caBundle").is_none() {
                        h["clientConfig"]["caBundle"] = json!("Y2EgYnVuZGxl");
                    }
                }
            }
            Some("Deployment") if reads > rollout_after => {
                let n = o.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
                o["status"]["availableReplicas"] = n.clone();
                o["status"]["readyReplicas"] = n;
            }
            _ => {}
        }
        respond(StatusCode::OK, &at_version_of(o.clone(), asked))
    }

    fn apply(&mut self, path: &str, mut applied: Value, query: &str) -> Resp {
        let old = self.objects.get(path).cloned();
        if let Some(refused) = uid_changed(path, old.as_ref(), &applied) {
            return refused;
        }
        // An apply that creates: the server names the object, as for a create.
        if old.is_none()
            && let Some(m) = applied.get_mut("metadata").and_then(Value::as_object_mut)
        {
            m.remove("uid");
        }
        let Some(manager) = query_value(query, "fieldManager") else {
            return status(
                400,
                "BadRequest",
                "PATCH, application/apply-patch+yaml: fieldManager is required",
            );
        };
        if applied
            .pointer("/metadata/managedFields")
            .is_some_and(|m| !m.is_null())
        {
            return status(400, "BadRequest", "metadata.managedFields must be nil");
        }
        if let Some(sent) = applied.pointer("/metadata/resourceVersion")
            && Some(sent)
                != old
                    .as_ref()
                    .and_then(|o| o.pointer("/metadata/resourceVersion"))
        {
            return status(
                409,
                "Conflict",
                &format!("{path}: the object has been modified"),
            );
        }
        // Fields other managers own and this apply would change: a conflict, unless forced.
        let force = query_value(query, "force").as_deref() == Some("true");
        let mine = leaves(&applied);
        let current = old.as_ref().map(leaves).unwrap_or_default();
        let owners = self.managed.get(path).cloned().unwrap_or_default();
        let conflicts: Vec<String> = owners
            .iter()
            .filter(|(m, _)| **m != manager)
            .flat_map(|(m, fields)| {
                fields
                    .iter()
                    .filter(|f| {
                        mine.get(*f)
                            .is_some_and(|v| current.get(*f).is_some_and(|c| c != v))
                    })
                    .map(move |f| format!("conflict with {m:?}: {}", show(f)))
            })
            .collect();
        if !conflicts.is_empty() && !force {
            return status(
                409,
                "Conflict",
                &format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    conflicts.join(", ")
                ),
            );
        }
        // Server-side apply, roughly: the applied fields over the stored object, so fields
        // another manager set (a webhook's caBundle) survive.
        let mut body = old.clone().unwrap_or(Value::Null);
        if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        ssa_merge(&mut body, &applied);
        // What this manager applied before and leaves out now goes, unless another owns it.
        let before_mine = owners.get(&manager).cloned().unwrap_or_default();
        for f in before_mine.iter().filter(|f| !mine.contains_key(*f)) {
            let shared = owners
                .iter()
                .any(|(m, fields)| *m != manager && fields.contains(f));
            if !shared {
                remove_field(&mut body, f);
            }
        }
        let warnings = match self.admit(path, &mut body, query) {
            Ok(w) => w,
            Err(refused) => return *refused,
        };
        let comparable = |o: &Value| {
            let mut o = o.clone();
            if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
                m.remove("generation");
            }
            if let Some(m) = o.as_object_mut() {
                m.remove("status");
            }
            o
        };
        let unchanged = old
            .as_ref()
            .is_some_and(|o| comparable(o) == comparable(&body));
        if let Some(o) = &old
            && unchanged
        {
            self.own(path, &manager, mine.keys().cloned().collect(), force);
            return warn(respond(StatusCode::OK, o), &warnings);
        }
        self.rv += 1;
        self.reads.remove(path);
        let generation = old
            .as_ref()
            .and_then(|o| o.pointer("/metadata/generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
            + 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        body["metadata"]["generation"] = json!(generation);
        match body["kind"].as_str() {
            Some("CustomResourceDefinition") => {
                body["status"] =
                    json!({"conditions": [{"type": "Established", "status": "False"}]});
            }
            Some("Deployment") => {
                let n = body.pointer("/spec/replicas").cloned().unwrap_or(json!(1));
                body["status"] = json!({"observedGeneration": generation, "replicas": n,
                    "updatedReplicas": n, "availableReplicas": 0});
            }
            _ => {}
        }
        let body = self.store(path.to_owned(), body);
        self.own(path, &manager, mine.keys().cloned().collect(), force);
        let code = if old.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        warn(respond(code, &body), &warnings)
    }

    /// `manager` owns `fields` of the object at `path` (an apply: all it owns; with `force`,
    /// taken from the others). Others keep what they share with it unforced.
    fn own(&mut self, path: &str, manager: &str, fields: BTreeSet<Field>, force: bool) {
        let owners = self.managed.entry(path.to_owned()).or_default();
        if force {
            for (m, theirs) in owners.iter_mut() {
                if m != manager {
                    theirs.retain(|f| !fields.contains(f));
                }
            }
        }
        owners.insert(manager.to_owned(), fields);
    }

    /// An update (not an apply) by `manager`: the fields it changed become its own alone.
    fn own_changes(&mut self, path: &str, query: &str, old: Option<&Value>, new: &Value) {
        let manager = query_value(query, "fieldManager").unwrap_or_else(|| "unknown".into());
        let before = old.map(leaves).unwrap_or_default();
        let changed: BTreeSet<Field> = leaves(new)
            .into_iter()
            .filter(|(f, v)| before.get(f) != Some(v))
            .map(|(f, _)| f)
            .collect();
        let owners = self.managed.entry(path.to_owned()).or_default();
        for theirs in owners.values_mut() {
            theirs.retain(|f| !changed.contains(f));
        }
        owners.entry(manager).or_default().extend(changed);
    }

    fn create(&mut self, collection: &str, mut body: Value, query: &str) -> Resp {
        let name = body
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let path = format!("{collection}/{name}");
        // The same object written at another version of its group is there too.
        if self.objects.contains_key(&self.stored_path(&path)) {
            return status(409, "AlreadyExists", &format!("{path} already exists"));
        }
        // The namespace comes from the path, as the API server fills it in.
        let (_, rest) = split(collection);
        if let ["namespaces", ns, _] = rest.as_slice() {
            body["metadata"]["namespace"] = json!(ns);
        }
        let warnings = match self.admit(&path, &mut body, query) {
            Ok(w) => w,
            Err(refused) => return *refused,
        };
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        // The server names a new object; a UID sent with it is not taken.
        if let Some(m) = body["metadata"].as_object_mut() {
            m.remove("uid");
        }
        let body = self.store(path.clone(), body);
        self.own_changes(&path, query, None, &body);
        warn(respond(StatusCode::CREATED, &body), &warnings)
    }

    /// An update: refused when its resourceVersion is not the stored one.
    fn replace(&mut self, path: &str, mut body: Value, query: &str) -> Resp {
        let Some(old) = self.objects.get(path) else {
            return status(404, "NotFound", &format!("{path} not found"));
        };
        let rv = |o: &Value| o.pointer("/metadata/resourceVersion").cloned();
        if let Some(sent) = rv(&body)
            && Some(&sent) != rv(old).as_ref()
        {
            return status(
                409,
                "Conflict",
                &format!("{path}: the object has been modified"),
            );
        }
        if let Some(sent) = uid_of(&body)
            && Some(sent) != uid_of(old)
        {
            return status(
                409,
                "Conflict",
                &format!(
                    "Precondition failed: UID in precondition: {sent}, UID in object meta: {}",
                    uid_of(old).unwrap_or_default()
                ),
            );
        }
        let warnings = match self.admit(path, &mut body, query) {
            Ok(w) => w,
            Err(refused) => return *refused,
        };
        self.rv += 1;
        body["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let old = self.objects.get(path).cloned();
        let body = self.store(path.to_owned(), body);
        self.own_changes(path, query, old.as_ref(), &body);
        warn(respond(StatusCode::OK, &body), &warnings)
    }

    /// A JSON merge patch (RFC 7386), refused when it names another resourceVersion.
    fn merge(&mut self, path: &str, patch: Value, query: &str) -> Resp {
        let Some(old) = self.objects.get(path).cloned() else {
            return status(404, "NotFound", &format!("{path} not found"));
        };
        if let Some(sent) = patch.pointer("/metadata/resourceVersion")
            && Some(sent) != old.pointer("/metadata/resourceVersion")
        {
            return status(
                409,
                "Conflict",
                &format!("{path}: the object has been modified"),
            );
        }
        if let Some(refused) = uid_changed(path, Some(&old), &patch) {
            return refused;
        }
        let mut new = old;
        crate::merge_patch(&mut new, patch);
        let warnings = match self.admit(path, &mut new, query) {
            Ok(w) => w,
            Err(refused) => return *refused,
        };
        self.rv += 1;
        new["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let old = self.objects.get(path).cloned();
        let new = self.store(path.to_owned(), new);
        self.own_changes(path, query, old.as_ref(), &new);
        warn(respond(StatusCode::OK, &new), &warnings)
    }

    /// Admits a write of `body` at `path` as the API server would (see the module doc): prunes
    /// and defaults it in place, and gives the warnings to send, or the refusal.
    fn admit(
        &mut self,
        path: &str,
        body: &mut Value,
        query: &str,
    ) -> Result<Vec<String>, Box<Resp>> {
        let (n, rest) = split(path);
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version) = match (n, segs.as_slice()) {
            (2, [_, v, ..]) => ("", *v),
            (3, [_, g, v, ..]) => (*g, *v),
            _ => {
                return Err(Box::new(status(
                    404,
                    "NotFound",
                    &format!("{path}: not a resource path"),
                )));
            }
        };
        let plural = match rest.as_slice() {
            ["namespaces", _, plural, ..] | [plural, ..] => *plural,
            _ => "",
        };
        let what = format!(
            "{}.{group} {:?}",
            body["kind"].as_str().unwrap_or(plural),
            body.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        let crd = self.objects.values().find(|o| {
            o["kind"] == "CustomResourceDefinition"
                && o.pointer("/spec/group").and_then(Value::as_str) == Some(group)
                && o.pointer("/spec/names/plural").and_then(Value::as_str) == Some(plural)
        });
        let report = match crd {
            Some(crd) => {
                let crd: CustomResourceDefinition =
                    serde_json::from_value(crd.clone()).map_err(|e| {
                        Box::new(status(500, "InternalError", &format!("stored CRD: {e}")))
                    })?;
                let Some(schema) = schema::version_schema(&crd, version) else {
                    return Err(Box::new(status(
                        404,
                        "NotFound",
                        &format!("{what}: the CRD does not serve version {version}"),
                    )));
                };
                let mut report = schema::admit(body, schema);
                crate::schema_builtin::validate(body, &mut report);
                report
            }
            None => schema::admit_builtin(body).ok_or_else(|| {
                Box::new(status(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource ({path})"),
                ))
            })?,
        };
        if !report.errors.is_empty() {
            let causes: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
            return Err(Box::new(status(
                422,
                "Invalid",
                &format!("{what} is invalid: [{}]", causes.join(", ")),
            )));
        }
        if body["kind"] == "Service" {
            self.cluster_ip(path, body).map_err(|e| {
                Box::new(status(422, "Invalid", &format!("{what} is invalid: {e}")))
            })?;
        }
        let unknown: Vec<String> = report
            .pruned
            .iter()
            .map(|p| format!("unknown field {p:?}"))
            .collect();
        let validation = query
            .split('&')
            .find_map(|q| q.strip_prefix("fieldValidation="))
            .unwrap_or("Warn");
        match validation {
            "Strict" if !unknown.is_empty() => Err(Box::new(status(
                400,
                "BadRequest",
                &format!("{what}: strict decoding error: {}", unknown.join(", ")),
            ))),
            "Ignore" => Ok(Vec::new()),
            _ => {
                self.warnings.extend(unknown.iter().cloned());
                Ok(unknown)
            }
        }
    }

    /// A Service's virtual IP, as the API server allocates it (a valid Service, its `spec` an
    /// object): the stored one when a write leaves it out, and an error when a write changes
    /// it (it is immutable); else the one given, or the lowest free address from 10.96.128.1 on
    /// (tests write their own below that); none for `ExternalName`. `clusterIPs` follows.
    fn cluster_ip(&self, path: &str, body: &mut Value) -> Result<(), String> {
        let Some(spec) = body.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        if spec.get("type").and_then(Value::as_str) == Some("ExternalName") {
            return Ok(());
        }
        let given = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned);
        let stored = self
            .objects
            .get(path)
            .and_then(|o| o.pointer("/spec/clusterIP"))
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty())
            .map(str::to_owned);
        if let (Some(g), Some(s)) = (&given, &stored)
            && g != s
        {
            return Err(format!(
                "spec.clusterIP: Invalid value: {g:?}: field is immutable (it is {s:?})"
            ));
        }
        let ip = given.or(stored).unwrap_or_else(|| {
            let taken: BTreeSet<&str> = self
                .objects
                .values()
                .filter(|o| o["kind"] == "Service")
                .filter_map(|o| o.pointer("/spec/clusterIP").and_then(Value::as_str))
                .collect();
            (u32::from(std::net::Ipv4Addr::new(10, 96, 128, 1))..)
                .map(|n| std::net::Ipv4Addr::from(n).to_string())
                .find(|ip| !taken.contains(ip.as_str()))
                .unwrap_or_default()
        });
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
        Ok(())
    }

    /// Whether RBAC lets `user` (`system:serviceaccount:NS:NAME`) make a request.
    fn authorized(&self, user: &str, a: &rbac::Attributes) -> bool {
        if rbac::allowed_to_everyone(a) {
            return true;
        }
        self.decide(&rbac::Subject::of_user(user), a).is_some()
    }

    /// What lets `subject` do `a`: `Some(None)` for a member of [`rbac::MASTERS`] (allowed
    /// before RBAC is asked), `Some(grant)` for the first RBAC rule that allows it; `None`:
    /// nothing does.
    fn decide(&self, subject: &rbac::Subject, a: &rbac::Attributes) -> Option<Option<rbac::Grant>> {
        if subject.groups.iter().any(|g| g == rbac::MASTERS) {
            return Some(None);
        }
        let objects: Vec<&Value> = self.objects.values().collect();
        rbac::grants(&objects, subject)
            .into_iter()
            .find(|g| g.allows(a))
            .map(Some)
    }

    /// Logs a request (`user`: `None` for the admin's client) and decides it as RBAC does:
    /// `Some(403)` when no rule lets the user do it.
    fn record(&mut self, user: Option<&str>, mut entry: Logged) -> Option<Resp> {
        let refused = match (user, &entry.attributes) {
            (Some(u), Some(a)) if !self.authorized(u, a) => {
                Some(status(403, "Forbidden", &a.forbidden(u)))
            }
            _ => None,
        };
        entry.user = user.unwrap_or("").to_owned();
        entry.forbidden = refused.is_some();
        self.log.push(entry);
        refused
    }

    /// A token for the service account of pod `ns/name`, bound to the pod as it is now (its
    /// UID), for `audience`, expiring at `expires`: what the kubelet asks the API server for to
    /// project into the pod. `None` when there is no such pod (or it has no UID: an object
    /// written into [`State::objects`] directly).
    pub fn pod_token(
        &self,
        ns: &str,
        name: &str,
        audience: &str,
        expires: std::time::SystemTime,
    ) -> Option<Token> {
        let pod = self
            .objects
            .get(&format!("/api/v1/namespaces/{ns}/pods/{name}"))?;
        let sa = pod
            .pointer("/spec/serviceAccountName")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let uid = uid_of(pod)?;
        Some(Token {
            expires: Some(expires),
            pod: Some(BoundPod {
                namespace: ns.to_owned(),
                name: name.to_owned(),
                uid: uid.to_owned(),
            }),
            ..Token::new(ns, sa, audience)
        })
    }

    /// The token `token` is, if it is valid for one of `asked`, and the audiences it is valid
    /// for; else the error the API server's service account authenticator gives (claims.go):
    /// only a known token, not expired, whose pod (if bound to one) still exists with the UID
    /// the token names, bound to one of the audiences asked for.
    fn authenticate(&self, token: &str, asked: &[String]) -> Result<(&Token, Vec<String>), String> {
        // The UID of the pod now at a bound token's pod's name (`None`: no such pod).
        let uid_now = |p: &BoundPod| {
            let path = format!("/api/v1/namespaces/{}/pods/{}", p.namespace, p.name);
            self.objects.get(&path).map(|pod| uid_of(pod).unwrap_or(""))
        };
        let t = self
            .tokens
            .get(token)
            .ok_or_else(|| "invalid bearer token".to_owned())?;
        if t.expires.is_some_and(|e| e <= std::time::SystemTime::now()) {
            return Err("invalid bearer token, token has expired".into());
        }
        if let Some(pod) = &t.pod {
            match uid_now(pod) {
                None => {
                    return Err(
                        "invalid bearer token, service account token has been invalidated".into(),
                    );
                }
                Some(now) if pod.uid.is_empty() || now != pod.uid => {
                    return Err(format!(
                        "invalid bearer token, pod UID ({now}) does not match service account pod ref claim ({})",
                        pod.uid
                    ));
                }
                Some(_) => {}
            }
        }
        let audiences: Vec<String> = asked
            .iter()
            .filter(|a| t.audiences.contains(a))
            .cloned()
            .collect();
        if audiences.is_empty() {
            return Err("token audiences do not match".into());
        }
        Ok((t, audiences))
    }

    /// A TokenReview, answered from [`State::tokens`] as [`State::authenticate`] decides (any
    /// known token, naming no audience, with [`State::audience_unaware`]); a pod-bound token's
    /// user carries the pod's name and UID, as the API server's does.
    fn token_review(&mut self, mut body: Value) -> Resp {
        let token = body
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .unwrap_or("");
        let asked: Vec<String> = body
            .pointer("/spec/audiences")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // Without audiences, the API server's own.
        let asked = if asked.is_empty() {
            vec![API_AUDIENCE.to_owned()]
        } else {
            asked
        };
        let unaware = self.audience_unaware;
        let answer = match self.tokens.get(token) {
            Some(t) if unaware => Ok((t, Vec::new())),
            _ => self.authenticate(token, &asked),
        };
        body["status"] = match answer {
            Ok((t, audiences)) => {
                let mut user = json!({"username": t.user,
                    "groups": rbac::Subject::of_user(&t.user).groups});
                if let Some(p) = &t.pod {
                    user["extra"] = json!({"authentication.kubernetes.io/pod-name": [p.name],
                        "authentication.kubernetes.io/pod-uid": [p.uid]});
                }
                json!({"authenticated": true, "user": user, "audiences": audiences})
            }
            Err(e) => json!({"authenticated": false, "error": e}),
        };
        respond(StatusCode::CREATED, &body)
    }

    /// A SubjectAccessReview: what RBAC decides for the user and groups of its spec, in the
    /// authorizer's words when it allows (on a denial RBAC gives no reason).
    fn subject_review(&mut self, mut body: Value) -> Resp {
        let spec = &body["spec"];
        let subject = rbac::Subject {
            user: spec["user"].as_str().unwrap_or("").to_owned(),
            groups: spec["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        };
        if subject.user.is_empty() && subject.groups.is_empty() {
            return status(
                422,
                "Invalid",
                "SubjectAccessReview.authorization.k8s.io \"\" is invalid: spec.user: Invalid value: \"\": at least one of user or group must be specified",
            );
        }
        let Some(attrs) = spec.get("resourceAttributes").filter(|a| a.is_object()) else {
            return status(
                422,
                "Invalid",
                "the fake API server reviews spec.resourceAttributes only",
            );
        };
        let f = |k: &str| attrs[k].as_str().unwrap_or("").to_owned();
        let sub = f("subresource");
        let a = rbac::Attributes {
            verb: f("verb"),
            group: f("group"),
            resource: match sub.is_empty() {
                true => f("resource"),
                false => format!("{}/{sub}", f("resource")),
            },
            namespace: f("namespace"),
            name: f("name"),
        };
        body["status"] = match self.decide(&subject, &a) {
            Some(None) => json!({"allowed": true}),
            Some(Some(g)) => {
                json!({"allowed": true, "reason": format!("RBAC: allowed by {}", g.granted_by)})
            }
            None => json!({"allowed": false}),
        };
        respond(StatusCode::CREATED, &body)
    }

    fn review(&mut self, mut body: Value) -> Resp {
        let attrs = body
            .pointer("/spec/resourceAttributes")
            .cloned()
            .unwrap_or_default();
        let f = |k: &str| {
            attrs
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let denied = self
            .denied
            .iter()
            .any(|(v, g, r)| *v == f("verb") && *g == f("group") && *r == f("resource"));
        body["status"] = json!({"allowed": !denied});
        respond(StatusCode::CREATED, &body)
    }
}

/// One field of an object: map keys, and `[name]` for an item of a list keyed by `name`.
type Field = Vec<String>;

/// A query parameter's decoded value.
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .find_map(|q| q.strip_prefix(key)?.strip_prefix('='))
        .map(percent_decode)
}

/// The leaf fields of an object and their values, as server-side apply tracks them: the
/// object's identity (`apiVersion`, `kind`, name, namespace) and its status left out.
fn leaves(o: &Value) -> BTreeMap<Field, Value> {
    fn walk(v: &Value, at: &mut Field, out: &mut BTreeMap<Field, Value>) {
        let named = |l: &[Value]| !l.is_empty() && l.iter().all(|i| i.get("name").is_some());
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, cv) in m {
                    at.push(k.clone());
                    walk(cv, at, out);
                    at.pop();
                }
            }
            Value::Array(l) if named(l) => {
                for item in l {
                    at.push(format!("[{}]", item["name"].as_str().unwrap_or("")));
                    walk(item, at, out);
                    at.pop();
                }
            }
            _ => {
                out.insert(at.clone(), v.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(o, &mut Vec::new(), &mut out);
    out.retain(|f, _| {
        let first = f.first().map(String::as_str);
        let server_meta = first == Some("metadata")
            && f.get(1).is_some_and(|k| {
                matches!(
                    k.as_str(),
                    "name"
                        | "namespace"
                        | "resourceVersion"
                        | "generation"
                        | "uid"
                        | "creationTimestamp"
                )
            });
        !(matches!(first, Some("apiVersion" | "kind" | "status")) || server_meta)
    });
    out
}

/// A field as the API server names it in a conflict: `.spec.rules[name=x].weight`.
fn show(f: &Field) -> String {
    f.iter()
        .map(|s| match s.strip_prefix('[') {
            Some(name) => format!("[name={}", name),
            None => format!(".{s}"),
        })
        .collect()
}

/// Removes one leaf field from `o` (a named list item once it has nothing left but its name).
fn remove_field(o: &mut Value, f: &Field) {
    let Some((last, parents)) = f.split_last() else {
        return;
    };
    let mut cur = o;
    for seg in parents {
        let next = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(name) => cur
                .as_array_mut()
                .and_then(|l| l.iter_mut().find(|i| i["name"] == name)),
            None => cur.get_mut(seg),
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

/// `applied` over `base`: maps merge key by key, lists of objects with a `name` merge item by
/// item (items `applied` leaves out are dropped: they were its own), anything else replaces.
fn ssa_merge(base: &mut Value, applied: &Value) {
    let named = |l: &[Value]| !l.is_empty() && l.iter().all(|i| i.get("name").is_some());
    match (base, applied) {
        (Value::Object(b), Value::Object(a)) => {
            for (k, v) in a {
                match b.get_mut(k) {
                    Some(bv) => ssa_merge(bv, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(a)) if named(a) && named(b) => {
            let mut merged = Vec::new();
            for item in a {
                let mut next = b
                    .iter()
                    .find(|x| x.get("name") == item.get("name"))
                    .cloned()
                    .unwrap_or(Value::Null);
                ssa_merge(&mut next, item);
                merged.push(next);
            }
            *b = merged;
        }
        (b, a) => *b = a.clone(),
    }
}

/// The REST path of an object (the fake keys objects by it).
pub fn path_of(o: &Value) -> String {
    let s = |p: &str| {
        o.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let api_version = s("/apiVersion");
    let kind = s("/kind");
    let lower = kind.to_lowercase();
    let plural = match lower.as_str() {
        "endpoints" => lower,
        k if k.ends_with('y') && !k.ends_with("ay") && !k.ends_with("ey") && !k.ends_with("oy") => {
            format!("{}ies", &k[..k.len() - 1])
        }
        k if k.ends_with('s') => format!("{k}es"),
        k => format!("{k}s"),
    };
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    match s("/metadata/namespace").as_str() {
        "" => format!("{prefix}/{plural}/{}", s("/metadata/name")),
        ns => format!("{prefix}/namespaces/{ns}/{plural}/{}", s("/metadata/name")),
    }
}

fn respond(code: StatusCode, v: &Value) -> Resp {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

/// `resp` with a `Warning` header (code 299, as the API server sends them) per warning.
fn warn(mut resp: Resp, warnings: &[String]) -> Resp {
    for w in warnings {
        let text = format!("299 - {w:?}");
        if let Ok(v) = http::HeaderValue::from_str(&text) {
            resp.headers_mut().append(http::header::WARNING, v);
        }
    }
    resp
}

/// A kubeconfig for a process that reaches [`FakeApi::serve_http`] at `server`
/// (`http://host:port`) with `token`, in namespace `namespace`.
pub fn kubeconfig(server: &str, token: &str, namespace: &str) -> String {
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        "current-context": "fake",
    })
    .to_string()
}

/// An object's UID.
fn uid_of(o: &Value) -> Option<&str> {
    o.pointer("/metadata/uid").and_then(Value::as_str)
}

/// The refusal of a patch or apply of the object `old` at `path` that names another UID.
fn uid_changed(path: &str, old: Option<&Value>, sent: &Value) -> Option<Resp> {
    let (sent, old) = (uid_of(sent)?, uid_of(old?)?);
    (sent != old).then(|| {
        status(
            422,
            "Invalid",
            &format!("{path}: metadata.uid: Invalid value: \"{sent}\": field is immutable"),
        )
    })
}

fn status(code: u16, reason: &str, message: &str) -> Resp {
    respond(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": reason, "message": message, "code": code}),
    )
}

#[cfg(test)]
#[path = "fake_api_tests.rs"]
mod tests;
