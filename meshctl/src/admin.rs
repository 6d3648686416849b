//! The admin endpoints of the mesh's components as meshctl reads them: directly (a local mesh),
//! through the API server's pod proxy, or through a port-forward.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Where meshctl reads a component's admin endpoints: directly, through the API server's pod
/// proxy, or through a port-forward to the pod (which arrives on the pod's loopback: the
/// controller's debug API answers callers from outside the pod only with a token).
#[derive(Clone, Debug)]
pub enum Endpoint {
    Direct(SocketAddr),
    Pod {
        cluster: crate::cluster::Cluster,
        base: String,
        what: String,
    },
    Forward {
        cluster: crate::cluster::Cluster,
        namespace: String,
        name: String,
        port: u16,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(a) => write!(f, "{a}"),
            Self::Pod { what, .. } => f.write_str(what),
            Self::Forward {
                namespace,
                name,
                port,
                ..
            } => write!(f, "pod {namespace}/{name}:{port} (port-forward)"),
        }
    }
}

impl Endpoint {
    /// Port `port` of pod `ns/name`, through the API server.
    pub fn pod(cluster: &crate::cluster::Cluster, ns: &str, name: &str, port: u16) -> Self {
        Self::Pod {
            cluster: cluster.clone(),
            base: format!("/api/v1/namespaces/{ns}/pods/{name}:{port}/proxy"),
            what: format!("pod {ns}/{name}:{port}"),
        }
    }

    /// Port `port` on the loopback of pod `ns/name`, through a port-forward.
    pub fn forward(cluster: &crate::cluster::Cluster, ns: &str, name: &str, port: u16) -> Self {
        Self::Forward {
            cluster: cluster.clone(),
            namespace: ns.to_owned(),
            name: name.to_owned(),
            port,
        }
    }

    pub async fn text(&self, path: &str) -> anyhow::Result<String> {
        match self {
            Self::Direct(a) => get_text(*a, path).await,
            Self::Pod { cluster, base, .. } => cluster.get_text(&format!("{base}{path}")).await,
            // Only the control plane is reached this way: a refusal says how to be let in.
            Self::Forward {
                cluster,
                namespace,
                name,
                port,
            } => match cluster.port_forward_get(namespace, name, *port, path).await {
                Err(e) if crate::cluster::is_forbidden(&e) => {
                    Err(e.context(crate::cluster::reader_hint(namespace)))
                }
                r => r,
            },
        }
    }

    pub async fn json(&self, path: &str) -> anyhow::Result<Value> {
        match self {
            Self::Direct(a) => get_json(*a, path).await,
            Self::Pod { .. } | Self::Forward { .. } => {
                serde_json::from_str(&self.text(path).await?)
                    .with_context(|| format!("{self}{path}: not JSON"))
            }
        }
    }
}

/// `GET http://<addr><path>` as JSON.
pub async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = get_text(addr, path).await?;
    serde_json::from_str(&body).with_context(|| format!("http://{addr}{path}: not JSON"))
}

/// `GET http://<addr><path>`: the body of a 2xx answer.
pub async fn get_text(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let what = || format!("http://{addr}{path}");
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("{}: timed out connecting", what()))?
    .with_context(|| format!("{}: is it running?", what()))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = tx.send_request(req).await.with_context(what)?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(HttpStatus {
            what: what(),
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        }
        .into());
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// What to do when the controller cannot be read: the end of such errors.
pub const CONTROLLER_HINT: &str =
    "`meshctl check` says whether the controller is up; for a local mesh, pass --controller ADDR";

/// An admin endpoint's answer other than 2xx.
#[derive(Debug)]
pub struct HttpStatus {
    /// What was asked: the URL, or the pod, port and path.
    pub what: String,
    pub status: http::StatusCode,
    pub body: String,
}

impl std::fmt::Display for HttpStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.what, self.status, self.body)
    }
}

impl std::error::Error for HttpStatus {}

/// The status of an admin endpoint's answer other than 2xx, when `e` is one.
pub fn status_of(e: &anyhow::Error) -> Option<http::StatusCode> {
    e.chain()
        .find_map(|c| c.downcast_ref::<HttpStatus>().map(|s| s.status))
}

/// Whether an admin endpoint refused the request (4xx).
pub fn is_client_error(e: &anyhow::Error) -> bool {
    status_of(e).is_some_and(|s| s.is_client_error())
}

/// Whether the controller's answer says the Service asked about is not in its configuration
/// (its own 404, not that of a path it does not have).
pub fn names_unknown_service(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<HttpStatus>()
            .is_some_and(|s| s.body.contains("is not in the mesh's configuration"))
    })
}

/// Whether an admin endpoint answered 404 (directly, through a port-forward, or through the
/// API server's pod proxy).
pub fn is_not_found(e: &anyhow::Error) -> bool {
    status_of(e) == Some(http::StatusCode::NOT_FOUND)
        || e.chain().any(|c| {
            matches!(
                c.downcast_ref::<kube::Error>(),
                Some(kube::Error::Api(s)) if s.code == 404
            )
        })
}
