//! The Kubernetes API as meshctl uses it: objects as JSON, applied with server-side apply
//! (field manager `meshctl`), read and deleted by their `apiVersion`, `kind` and name.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::Value;

/// The field manager of everything meshctl applies.
pub const FIELD_MANAGER: &str = "meshctl";
/// How often waits poll the API server.
const POLL: Duration = Duration::from_millis(250);

/// A connection to a cluster's API server.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    poll: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

/// What applying one object did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Configured => "configured",
            Self::Unchanged => "unchanged",
        }
    }
}

/// The REST resource of the kinds meshctl works with: `(plural, namespaced)`.
pub fn plural(api_version: &str, kind: &str) -> Option<(&'static str, bool)> {
    Some(match (api_version, kind) {
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            ("customresourcedefinitions", false)
        }
        ("v1", "Namespace") => ("namespaces", false),
        ("v1", "ServiceAccount") => ("serviceaccounts", true),
        ("v1", "Service") => ("services", true),
        ("v1", "ConfigMap") => ("configmaps", true),
        ("v1", "Secret") => ("secrets", true),
        ("v1", "Pod") => ("pods", true),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => ("clusterroles", false),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => ("clusterrolebindings", false),
        ("rbac.authorization.k8s.io/v1", "Role") => ("roles", true),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => ("rolebindings", true),
        ("apps/v1", "Deployment") => ("deployments", true),
        ("networking.k8s.io/v1", "NetworkPolicy") => ("networkpolicies", true),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            ("mutatingwebhookconfigurations", false)
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => ("httproutes", true),
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => ("grpcroutes", true),
        (
            "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1",
            "ReferenceGrant",
        ) => ("referencegrants", true),
        ("gateway.networking.k8s.io/v1", "Gateway") => ("gateways", true),
        ("gateway.networking.k8s.io/v1", "GatewayClass") => ("gatewayclasses", false),
        ("mesh.dev/v1alpha1", "AuthorizationPolicy") => ("authorizationpolicies", true),
        ("mesh.dev/v1alpha1", "TrafficPolicy") => ("trafficpolicies", true),
        ("mesh.dev/v1alpha1", "RateLimitPolicy") => ("ratelimitpolicies", true),
        ("mesh.dev/v1alpha1", "FaultInjection") => ("faultinjections", true),
        ("mesh.dev/v1alpha1", "Rollout") => ("rollouts", true),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => ("servicemonitors", true),
        ("monitoring.coreos.com/v1", "PodMonitor") => ("podmonitors", true),
        _ => return None,
    })
}

fn api_resource(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let (plural, namespaced) = plural(api_version, kind)?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some((
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
        },
        namespaced,
    ))
}

/// Where an object lives: its API and its name.
struct Target {
    api: Api<DynamicObject>,
    name: String,
    what: String,
}

/// The namespace of a kubeconfig's context (`kubeconfig` or else `$KUBECONFIG`, then
/// `~/.kube/config`; `context` or else its current one): `default` when the context names none.
/// Without any kubeconfig, a pod's own namespace (its service account's), else `default`.
pub fn context_namespace(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> anyhow::Result<String> {
    const IN_POD: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
    let file = match kubeconfig {
        Some(path) => Some(kube::config::Kubeconfig::read_from(path).with_context(|| {
            format!(
                "--kubeconfig {}: not a kubeconfig; pass a kubeconfig file, or leave \
                         --kubeconfig out for $KUBECONFIG or ~/.kube/config",
                path.display()
            )
        })?),
        None => kube::config::Kubeconfig::read().ok(),
    };
    let Some(file) = file else {
        if context.is_some() {
            bail!(
                "--context {:?}: no kubeconfig found ($KUBECONFIG, ~/.kube/config); pass the file \
                 with --kubeconfig FILE",
                context.unwrap_or_default()
            );
        }
        return Ok(std::fs::read_to_string(IN_POD)
            .ok()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()));
    };
    let name = context
        .map(str::to_owned)
        .or_else(|| file.current_context.clone());
    let Some(name) = name else {
        return Ok("default".into());
    };
    let found = file
        .contexts
        .iter()
        .find(|c| c.name == name)
        .with_context(|| {
            let known: Vec<&str> = file.contexts.iter().map(|c| c.name.as_str()).collect();
            format!(
                "context {name:?} is not in the kubeconfig (it has {known:?}); pass --context \
                 with one of them"
            )
        })?;
    Ok(found
        .context
        .as_ref()
        .and_then(|c| c.namespace.clone())
        .unwrap_or_else(|| "default".into()))
}

/// The first ready pod of a Deployment's selector `app.kubernetes.io/name=NAME`.
pub async fn pod_of(cluster: &Cluster, ns: &str, name: &str) -> anyhow::Result<Option<String>> {
    Ok(pods_of(cluster, ns, name).await?.into_iter().next())
}

/// Every ready pod of a Deployment's selector `app.kubernetes.io/name=NAME`, by name.
pub async fn pods_of(cluster: &Cluster, ns: &str, name: &str) -> anyhow::Result<Vec<String>> {
    let pods = cluster
        .list_in(
            Some(ns),
            "v1",
            "Pod",
            &format!("app.kubernetes.io/name={name}"),
        )
        .await?;
    Ok(pods
        .iter()
        .filter(|p| pod_ready(p))
        .filter_map(|p| p.pointer("/metadata/name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect())
}

fn pod_ready(p: &Value) -> bool {
    p.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The string at `pointer` in `o`, or "".
pub fn field<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

impl Cluster {
    pub fn new(client: kube::Client) -> Self {
        Self { client, poll: POLL }
    }

    /// How often waits poll (tests poll faster).
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// The cluster of a kubeconfig's context: `kubeconfig` (else `$KUBECONFIG`, then
    /// `~/.kube/config`, then the pod's service account) and `context` (else its current one).
    pub async fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> anyhow::Result<Self> {
        let options = kube::config::KubeConfigOptions {
            context: context.map(str::to_owned),
            ..Default::default()
        };
        let hint = "pass --kubeconfig FILE or --context NAME, or --local DIR for a local mesh";
        let config = match kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path).with_context(|| {
                    format!(
                        "--kubeconfig {}: not a kubeconfig; pass a kubeconfig file, or leave \
                         --kubeconfig out for $KUBECONFIG or ~/.kube/config",
                        path.display()
                    )
                })?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("--kubeconfig {}; {hint}", path.display()))?
            }
            None if context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .with_context(|| {
                    format!(
                        "the kubeconfig's context {:?}; {hint}",
                        context.unwrap_or_default()
                    )
                })?,
            None => kube::Config::infer().await.with_context(|| {
                format!("finding the Kubernetes API (kubeconfig or in-cluster config); {hint}")
            })?,
        };
        let client = kube::Client::try_from(config)
            .with_context(|| format!("connecting to the Kubernetes API; {hint}"))?;
        Ok(Self::new(client))
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    fn target(&self, o: &Value) -> anyhow::Result<Target> {
        let api_version = field(o, "/apiVersion");
        let kind = field(o, "/kind");
        let name = field(o, "/metadata/name");
        let ns = field(o, "/metadata/namespace");
        let what = crate::install::manifests::key(o);
        let Some((ar, namespaced)) = api_resource(api_version, kind) else {
            bail!("{what}: meshctl does not handle {api_version} {kind}");
        };
        if name.is_empty() {
            bail!("{what}: metadata.name is empty");
        }
        let api = match (namespaced, ns) {
            (true, "") => bail!("{what}: metadata.namespace is empty"),
            (true, ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            (false, _) => Api::all_with(self.client.clone(), &ar),
        };
        Ok(Target {
            api,
            name: name.into(),
            what,
        })
    }

    /// The object as the cluster has it, `None` when it does not exist.
    pub async fn get(&self, o: &Value) -> anyhow::Result<Option<Value>> {
        let t = self.target(o)?;
        let got = t
            .api
            .get_opt(&t.name)
            .await
            .with_context(|| format!("reading {}", t.what))?;
        got.map(serde_json::to_value)
            .transpose()
            .map_err(Into::into)
    }

    /// A GET of a raw path (a pod's port through the API server's proxy), as text.
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let req = http::Request::get(path).body(Vec::new())?;
        self.client
            .request_text(req)
            .await
            .with_context(|| format!("GET {path}"))
    }

    /// Forwards each connection `listener` accepts to port `port` of pod `ns/name`, through the
    /// API server, for as long as it is polled. A connection that fails (refused by the API
    /// server, or not accepted) is closed and said on stderr; the others go on.
    /// A port-forward to port `port` of pod `ns/name`, and its stream; a refusal (403) is a
    /// [`PortForwardForbidden`].
    async fn open_forward(
        &self,
        ns: &str,
        name: &str,
        port: u16,
    ) -> anyhow::Result<(
        kube::api::Portforwarder,
        impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + use<>,
    )> {
        let what = format!("port-forward to pod {ns}/{name} port {port}");
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client.clone(), ns);
        let mut forward = match pods.portforward(name, &[port]).await {
            Ok(f) => f,
            Err(kube::Error::UpgradeConnection(
                kube::client::UpgradeConnectionError::ProtocolSwitch(code),
            )) if code == http::StatusCode::FORBIDDEN => {
                return Err(PortForwardForbidden {
                    namespace: ns.to_owned(),
                    pod: name.to_owned(),
                }
                .into());
            }
            Err(e) => return Err(e).context(what),
        };
        let stream = forward
            .take_stream(port)
            .with_context(|| format!("{what}: no stream for the port"))?;
        Ok((forward, stream))
    }

    pub async fn forward_connections(
        &self,
        listener: tokio::net::TcpListener,
        ns: &str,
        name: &str,
        port: u16,
    ) -> anyhow::Result<()> {
        loop {
            let mut conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                // Out of descriptors, or a connection reset before it was taken: the next
                // one may do; a pause keeps a full table from spinning.
                Err(e) => {
                    eprintln!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let what = format!("port-forward to pod {ns}/{name} port {port}");
            let (this, ns, name) = (self.clone(), ns.to_owned(), name.to_owned());
            tokio::spawn(async move {
                let forwarded = async {
                    let (forward, mut upstream) = this.open_forward(&ns, &name, port).await?;
                    tokio::io::copy_bidirectional(&mut conn, &mut upstream).await?;
                    drop(upstream);
                    forward.join().await?;
                    anyhow::Ok(())
                };
                if let Err(e) = forwarded.await {
                    eprintln!("{what}: {e:#}");
                }
            });
        }
    }

    /// A GET of `path` on port `port` of pod `ns/name` through a port-forward, which reaches
    /// ports bound to the pod's loopback (the proxy's admin server, the controller's debug
    /// API). A refused port-forward says what the user lacks; a port the pod does not serve,
    /// the API server's words.
    pub async fn port_forward_get(
        &self,
        ns: &str,
        name: &str,
        port: u16,
        path: &str,
    ) -> anyhow::Result<String> {
        use http_body_util::BodyExt;
        let what = format!("port-forward to pod {ns}/{name} port {port}");
        let (mut forward, stream) = self.open_forward(ns, name, port).await?;
        // The API server reports a port it could not connect to on the port's error channel.
        let refused = forward.take_error(port);
        let refused = async move {
            match refused {
                Some(e) => match e.await {
                    Some(e) => e,
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let get = async {
            let (mut tx, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, "localhost")
                .body(http_body_util::Empty::<bytes::Bytes>::new())?;
            let resp = tx.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        let (status, body) = tokio::select! {
            // A refusal and the connection's end come together: the refusal says more.
            biased;
            e = refused => bail!("{what}: {e}"),
            r = tokio::time::timeout(Duration::from_secs(10), get) => r
                .with_context(|| format!("pod {ns}/{name}:{port}{path}: no answer in 10 s"))?
                .with_context(|| format!("pod {ns}/{name}:{port}{path}"))?,
        };
        if !status.is_success() {
            return Err(crate::admin::HttpStatus {
                what: format!("pod {ns}/{name}:{port}{path}"),
                status,
                body: body.trim().to_owned(),
            }
            .into());
        }
        Ok(body)
    }

    /// Every object of a kind in every namespace, filtered by a label selector.
    pub async fn list(
        &self,
        api_version: &str,
        kind: &str,
        label_selector: &str,
    ) -> anyhow::Result<Vec<Value>> {
        self.list_in(None, api_version, kind, label_selector).await
    }

    /// Every object of a kind in namespace `ns` (`None`: in every namespace), filtered by a
    /// label selector.
    pub async fn list_in(
        &self,
        ns: Option<&str>,
        api_version: &str,
        kind: &str,
        label_selector: &str,
    ) -> anyhow::Result<Vec<Value>> {
        let Some((ar, _)) = api_resource(api_version, kind) else {
            bail!("meshctl does not handle {api_version} {kind}");
        };
        let api: Api<DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        let list = api
            .list(&kube::api::ListParams::default().labels(label_selector))
            .await
            .with_context(|| {
                let selected = if label_selector.is_empty() {
                    String::new()
                } else {
                    format!(" ({label_selector})")
                };
                format!("listing {kind}{selected}")
            })?;
        list.items
            .into_iter()
            .map(|o| {
                let mut v = serde_json::to_value(o)?;
                v["apiVersion"] = api_version.into();
                v["kind"] = kind.into();
                Ok(v)
            })
            .collect()
    }

    /// Server-side apply of `o`, taking ownership of its fields from other managers.
    pub async fn apply(&self, o: &Value) -> anyhow::Result<Applied> {
        let t = self.target(o)?;
        let before = t
            .api
            .get_opt(&t.name)
            .await
            .with_context(|| format!("reading {}", t.what))?;
        let after = t
            .api
            .patch(
                &t.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(o),
            )
            .await
            .with_context(|| format!("applying {}", t.what))?;
        Ok(match before {
            None => Applied::Created,
            Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
                Applied::Unchanged
            }
            Some(_) => Applied::Configured,
        })
    }

    /// Deletes `o`; `false` when it was not there.
    pub async fn delete(&self, o: &Value) -> anyhow::Result<bool> {
        let t = self.target(o)?;
        match t.api.delete(&t.name, &DeleteParams::background()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(e).with_context(|| format!("deleting {}", t.what)),
        }
    }

    /// Creates `o` in a cluster-scoped or namespaced collection and returns what the API
    /// server answered (for reviews such as SelfSubjectAccessReview).
    pub async fn create_review(&self, ar: &ApiResource, o: &Value) -> anyhow::Result<Value> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
        let obj: DynamicObject = serde_json::from_value(o.clone())?;
        let got = api
            .create(&PostParams::default(), &obj)
            .await
            .with_context(|| format!("creating a {}", ar.kind))?;
        Ok(serde_json::to_value(got)?)
    }

    /// Polls `o` until `done` says it is, printing what `progress` says whenever it changes.
    /// Gives up after `timeout` with the last progress in the error.
    pub async fn wait_for(
        &self,
        o: &Value,
        timeout: Duration,
        done: impl Fn(&Value) -> (bool, String),
        mut progress: impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let what = crate::install::manifests::key(o);
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let (ok, status) = match self.get(o).await? {
                Some(live) => done(&live),
                None => (false, "not found".to_owned()),
            };
            if ok {
                return Ok(());
            }
            if status != last {
                progress(&status);
                last = status;
            }
            if Instant::now() >= deadline {
                bail!("{what}: not ready after {timeout:?}: {last}");
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Whether a CRD's `Established` condition is true.
pub fn crd_established(crd: &Value) -> (bool, String) {
    let conditions = crd
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let established = conditions
        .iter()
        .any(|c| field(c, "/type") == "Established" && field(c, "/status") == "True");
    let status = if established {
        "established"
    } else {
        "waiting to be established"
    };
    (established, status.to_owned())
}

/// The API server refused a port-forward (403).
#[derive(Debug)]
pub struct PortForwardForbidden {
    pub namespace: String,
    pub pod: String,
}

impl std::fmt::Display for PortForwardForbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "port-forward to pod {}/{}: forbidden: you may not port-forward to pods in namespace {} (pods/portforward)",
            self.namespace, self.pod, self.namespace
        )
    }
}

impl std::error::Error for PortForwardForbidden {}

/// Whether the API server refused a request for want of a grant (403).
pub fn is_forbidden(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<PortForwardForbidden>()
            || matches!(
                c.downcast_ref::<kube::Error>(),
                Some(kube::Error::Api(s)) if s.code == 403
            )
    })
}

/// How a user gets to read the mesh, for a refusal in namespace `ns` (the control plane's).
pub fn reader_hint(ns: &str) -> String {
    let role = mesh_api::consts::identity::READER_ROLE;
    format!(
        "reading the mesh needs the ClusterRole {role} bound to you in namespace {ns} \
         (kubectl create rolebinding {role}-<you> --clusterrole {role} --user <you> -n {ns})"
    )
}

/// Whether every webhook of a webhook configuration has a caBundle (the controller sets it to
/// the CA root once mesh-ca has published it).
pub fn ca_bundle_set(config: &Value) -> (bool, String) {
    let hooks = config
        .get("webhooks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let set = hooks
        .iter()
        .filter(|h| {
            h.pointer("/clientConfig/caBundle")
                .and_then(Value::as_str)
                .is_some_and(|b| !b.is_empty())
        })
        .count();
    (
        !hooks.is_empty() && set == hooks.len(),
        format!("{set}/{} webhooks trust the CA root", hooks.len()),
    )
}

/// Whether a Deployment's rollout is complete: the controller saw the latest spec and every
/// replica is updated and available.
pub fn rollout_done(d: &Value) -> (bool, String) {
    let n = |p: &str| d.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    let want = d
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    let seen = n("/status/observedGeneration") >= n("/metadata/generation");
    let updated = n("/status/updatedReplicas");
    let available = n("/status/availableReplicas");
    let done = seen && updated >= want && available >= want && n("/status/replicas") <= want;
    (
        done,
        format!("{available}/{want} available, {updated}/{want} updated"),
    )
}
