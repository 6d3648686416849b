//! The agent's SDS server: Envoy's SVID (`default`) and trust bundle (`ROOTCA`) over gRPC on a
//! Unix socket, as Istio's agent serves them. Each stream gets the secrets it names, and
//! again after every renewal; `meshctl bootstrap envoy --sds-socket` declares the static
//! cluster that reaches the socket.

use std::collections::BTreeSet;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use mesh_api::consts::xds;
use prost::{Message, Name};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// The secrets of one renewal; `version` moves with each.
#[derive(Debug)]
pub struct Secrets {
    pub version: u64,
    pub svid: Secret,
    pub roots: Secret,
}

fn inline(pem: String) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(pem)),
        ..Default::default()
    })
}

impl Secrets {
    /// From the PEM of a renewal.
    pub fn new(version: u64, pems: super::Pems) -> Self {
        let super::Pems { chain, key, roots } = pems;
        Secrets {
            version,
            svid: Secret {
                name: xds::SDS_SVID.into(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(chain),
                    private_key: inline(key),
                    ..Default::default()
                })),
            },
            roots: Secret {
                name: xds::SDS_ROOTS.into(),
                r#type: Some(secret::Type::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: inline(roots),
                        ..Default::default()
                    },
                )),
            },
        }
    }

    /// The answer to a request for `names` (names it does not hold are left out).
    fn response(&self, names: &BTreeSet<String>, nonce: u64) -> DiscoveryResponse {
        let resources = [&self.svid, &self.roots]
            .into_iter()
            .filter(|s| names.contains(&s.name))
            .map(|s| Any {
                type_url: Secret::type_url(),
                value: s.encode_to_vec(),
            })
            .collect();
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            type_url: Secret::type_url(),
            nonce: nonce.to_string(),
            ..Default::default()
        }
    }
}

/// The service; `current` is `None` until the first SVID arrives.
#[derive(Debug)]
pub struct Sds {
    current: watch::Receiver<Option<Arc<Secrets>>>,
}

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Responses<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Responses<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "the agent serves SDS state of the world (StreamSecrets) only",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(serve_stream(req.into_inner(), self.current.clone(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let names = req.into_inner().resource_names.into_iter().collect();
        let current = self.current.borrow().clone();
        match current {
            Some(s) => Ok(Response::new(s.response(&names, 0))),
            None => Err(Status::unavailable("no SVID yet")),
        }
    }
}

/// One SDS stream: answers each new set of names, and every renewal, until it ends.
async fn serve_stream(
    mut requests: Streaming<DiscoveryRequest>,
    mut current: watch::Receiver<Option<Arc<Secrets>>>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    let mut names = BTreeSet::new();
    let mut sent = None;
    let mut nonce = 0;
    loop {
        tokio::select! {
            r = requests.next() => match r {
                Some(Ok(r)) => {
                    if let Some(e) = &r.error_detail {
                        warn!(names = ?r.resource_names, error = %e.message, "Envoy refused a secret");
                    }
                    let asked: BTreeSet<String> = r.resource_names.into_iter().collect();
                    if asked != names {
                        names = asked;
                        sent = None;
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "SDS stream ended");
                    return;
                }
                // The client closed its side: it still gets renewals until it goes.
                None => {
                    serve_renewals(names, sent, nonce, current, tx).await;
                    return;
                }
            },
            changed = current.changed() => if changed.is_err() {
                return;
            },
        }
        if !send_due(&names, &mut sent, &mut nonce, &mut current, &tx).await {
            return;
        }
    }
}

/// After the client half-closed: renewals for the names it asked for, until it goes.
async fn serve_renewals(
    names: BTreeSet<String>,
    mut sent: Option<u64>,
    mut nonce: u64,
    mut current: watch::Receiver<Option<Arc<Secrets>>>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
) {
    loop {
        tokio::select! {
            changed = current.changed() => if changed.is_err() {
                return;
            },
            () = tx.closed() => return,
        }
        if !send_due(&names, &mut sent, &mut nonce, &mut current, &tx).await {
            return;
        }
    }
}

/// Sends the current secrets of `names` unless this version went already or holds none of
/// them (an empty answer is not sent: Envoy can take it for a removal); `false` once the
/// client is gone.
async fn send_due(
    names: &BTreeSet<String>,
    sent: &mut Option<u64>,
    nonce: &mut u64,
    current: &mut watch::Receiver<Option<Arc<Secrets>>>,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> bool {
    let Some(secrets) = current.borrow_and_update().clone() else {
        return true;
    };
    if *sent == Some(secrets.version) {
        return true;
    }
    *nonce += 1;
    let response = secrets.response(names, *nonce);
    if response.resources.is_empty() {
        return true;
    }
    *sent = Some(secrets.version);
    tx.send(Ok(response)).await.is_ok()
}

/// Serves SDS on the Unix socket `path` (a stale one is replaced; mode 0600, as it hands out a
/// private key) until the process ends.
pub async fn serve(
    path: &Path,
    current: watch::Receiver<Option<Arc<Secrets>>>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("--sds-socket {}", path.display());
    // A socket left by an agent before this one is replaced; anything else there is not ours.
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).with_context(what)?,
        Ok(_) => anyhow::bail!("{}: exists and is not a socket", what()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(what),
    }
    // Made 0600 from the start, so nobody connects in between and reads the key: the umask
    // is narrowed around the bind (the agent is single-threaded, nothing else creates a file
    // meanwhile) and restored.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(what)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(what)?;
    tonic::transport::Server::builder()
        .add_service(SecretDiscoveryServiceServer::new(Sds { current }))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
        .with_context(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stream_gets_what_it_names_and_every_renewal() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("sds.sock");
        let (tx, rx) = watch::channel(None);
        let server = tokio::spawn({
            let path = path.clone();
            async move { serve(&path, rx).await }
        });
        let secrets = |v: u64| {
            Some(Arc::new(Secrets::new(
                v,
                super::super::Pems {
                    chain: format!("chain {v}"),
                    key: format!("key {v}"),
                    roots: format!("roots {v}"),
                },
            )))
        };
        tx.send_replace(secrets(1));
        // A client over the socket, as Envoy's static cluster reaches it.
        let channel = loop {
            let path = path.clone();
            let connected = tonic::transport::Endpoint::from_static("http://agent")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        tokio::net::UnixStream::connect(path)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
                .await;
            match connected {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (req_tx, req_rx) = mpsc::channel(4);
        let ask = DiscoveryRequest {
            resource_names: vec![xds::SDS_SVID.into()],
            type_url: Secret::type_url(),
            ..Default::default()
        };
        req_tx.send(ask.clone()).await.expect("send");
        let mut responses = client
            .stream_secrets(ReceiverStream::new(req_rx))
            .await
            .expect("stream")
            .into_inner();
        let first = responses.next().await.expect("an answer").expect("ok");
        assert_eq!(first.version_info, "1");
        assert_eq!(first.resources.len(), 1, "only the secret it named");
        let svid = Secret::decode(first.resources[0].value.as_slice()).expect("secret");
        assert_eq!(svid.name, xds::SDS_SVID);
        // The ACK brings nothing new; a renewal does.
        req_tx
            .send(DiscoveryRequest {
                version_info: "1".into(),
                response_nonce: first.nonce.clone(),
                ..ask
            })
            .await
            .expect("ack");
        tx.send_replace(secrets(2));
        let second = responses.next().await.expect("an answer").expect("ok");
        assert_eq!(second.version_info, "2");
        let Some(secret::Type::TlsCertificate(c)) =
            Secret::decode(second.resources[0].value.as_slice())
                .expect("secret")
                .r#type
        else {
            panic!("a TLS certificate");
        };
        assert_eq!(
            c.certificate_chain.and_then(|d| d.specifier),
            Some(data_source::Specifier::InlineString("chain 2".into()))
        );
        server.abort();
    }
}
