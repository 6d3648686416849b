//! gRPC over mesh TLS: a server's incoming connections (handshakes run concurrently, never
//! holding up the accept loop) that tell each request its peer's SPIFFE ID, and a client
//! channel that dials with a mesh TLS client config.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::spiffe::SpiffeId;

/// What a request over mesh TLS knows about its connection (`request.extensions()`).
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub remote: Option<SocketAddr>,
    /// The client's SPIFFE ID; `None` when the server did not ask for a certificate.
    pub peer: Option<SpiffeId>,
}

/// A server-side mesh TLS connection.
#[derive(Debug)]
pub struct TlsIo {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl tonic::transport::server::Connected for TlsIo {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` and yields those that completed a TLS handshake
/// with `config`; failed handshakes are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                // The server is gone: stop accepting.
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| super::peer_id(der));
                let io = TlsIo {
                    inner: tls,
                    info: TlsConnectInfo {
                        remote: Some(remote),
                        peer,
                    },
                };
                let _ = conn_tx.send(Ok(io)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// HTTP/2 pings on every channel [`channel`] makes: a server gone without closing the
/// connection (its node lost) is noticed after at most interval + timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is given up.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A lazily connecting gRPC channel to `target` (`host:port`, resolved at each connect) over
/// mesh TLS with `config` (which decides what server identity is accepted and whether a
/// client SVID is shown).
pub fn channel(
    target: impl Into<String>,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> tonic::transport::Channel {
    let connector = TlsConnector::from(config);
    let target: Arc<str> = target.into().into();
    let dial = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let timed_out = || {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {target}: timed out"),
                )
            };
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(&*target))
                .await
                .map_err(|_| timed_out())??;
            let addr = tcp.peer_addr()?;
            let _ = tcp.set_nodelay(true);
            let tls = connector
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The URI only fills the :authority header; `dial` decides where to connect.
    tonic::transport::Endpoint::from_static("http://mesh.invalid")
        .connect_timeout(connect_timeout)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .connect_with_connector_lazy(dial)
}
