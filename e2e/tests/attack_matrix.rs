//! The HTTP/2 and TLS attack matrix. Each attack runs against a mesh-proxy in a process of its
//! own: on a client pod's outbound listener (plaintext, where the pod's app connects) and on a
//! server pod's inbound listener (mesh TLS, the attacker a compromised pod with a valid SVID).
//! For each case the attacked proxy's resident memory is read before the attack, at its peak
//! during it and after it, and must not grow past the case's bound; and another client's
//! requests across both proxies, during the attack and after it, must all succeed. The
//! figures go to the CI log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame as BodyFrame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_e2e::h2::{
    PREFACE, flag, frame, hpack_int, hpack_literal, kind, read_frame, request_block, setting,
};
use mesh_e2e::identity::{TestCa, sign, svid_params, tls_connect_alpn};
use mesh_e2e::mesh::{LocalMesh, ProcessPair, ProxyProcess};
use mesh_e2e::{ProxyClient, figure, mib};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1024 * 1024;

/// How big `/big` answers are.
const BIG: usize = 16 * 1024 * 1024;

/// The app behind the pair: `/big` streams [`BIG`] bytes, `/hold` answers once the request
/// body ended, `/slow` answers after 30 s without reading the body, anything else answers
/// `echo`.
async fn app() -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let chunk = chunk.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/big" => {
                                let chunks = std::iter::repeat_n(chunk, BIG / (64 * 1024))
                                    .map(|c| Ok::<_, std::convert::Infallible>(BodyFrame::data(c)));
                                StreamBody::new(tokio_stream::iter(chunks)).boxed()
                            }
                            "/hold" => {
                                let _ = req.into_body().collect().await;
                                Full::new(Bytes::from_static(b"held")).boxed()
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                drop(req);
                                Full::new(Bytes::from_static(b"slow")).boxed()
                            }
                            _ => Full::new(Bytes::from_static(b"echo")).boxed(),
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((addr, task))
}

/// A byte stream to the attacked listener.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Outbound,
    Inbound,
}

/// Where the attacker connects, and as whom.
struct Target {
    side: Side,
    addr: SocketAddr,
    /// The attacker's SVID (a compromised pod's), for the inbound listener.
    svid: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    /// Where another pod's app sends its requests: across both proxies.
    others: SocketAddr,
}

impl Target {
    /// While an attacker holds what it took: another client's GET, and its POST of 1 MiB,
    /// must each be answered (within 10 s) before the attacker lets go.
    async fn others_served_meanwhile(&self) -> anyhow::Result<()> {
        let mut client = ProxyClient::new(self.others);
        let get = tokio::time::timeout(Duration::from_secs(10), client.get("echo", "/", &[]));
        anyhow::ensure!(
            matches!(get.await, Ok(Ok((200, _)))),
            "another client's GET was not answered while the attack held"
        );
        let body = Bytes::from(vec![b'p'; 1024 * 1024]);
        let post = tokio::time::timeout(
            Duration::from_secs(10),
            client.send("POST", "echo", "/hold", &[], body),
        );
        anyhow::ensure!(
            matches!(post.await, Ok(Ok((200, _, _)))),
            "another client's 1 MiB POST was not answered while the attack held"
        );
        Ok(())
    }
}

impl Target {
    /// A connection speaking what the listener expects below HTTP: TCP, or mesh TLS offering
    /// `alpn`.
    async fn connect(&self, alpn: &[u8]) -> anyhow::Result<Box<dyn Io>> {
        Ok(match self.side {
            Side::Outbound => Box::new(TcpStream::connect(self.addr).await?),
            Side::Inbound => Box::new(
                tls_connect_alpn(
                    self.addr,
                    self.svid.0.clone(),
                    self.svid.1.clone_key(),
                    alpn,
                )
                .await?,
            ),
        })
    }

    /// An HTTP/2 connection past the preface and an empty SETTINGS, with `settings` in it.
    async fn h2(&self, settings: &[[u8; 6]]) -> anyhow::Result<Box<dyn Io>> {
        let mut c = self.connect(mesh_api::tls::ALPN_H2).await?;
        let mut out = PREFACE.to_vec();
        out.extend(frame(kind::SETTINGS, 0, 0, &settings.concat()));
        c.write_all(&out).await?;
        Ok(c)
    }
}

/// What the server did to a connection, seen from the attacker's side.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// GOAWAY with this error code.
    GoAway(u32),
    /// Closed (or reset) without a GOAWAY.
    Closed,
    /// Still open after the wait.
    Open,
}

/// Reads (discarding) until the server sends GOAWAY or closes, for at most `wait`.
async fn end_of(c: &mut Box<dyn Io>, wait: Duration) -> End {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, read_frame(c)).await {
            Err(_) => return End::Open,
            Ok(Err(_)) => return End::Closed,
            Ok(Ok((kind::GOAWAY, _, _, p))) if p.len() >= 8 => {
                return End::GoAway(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes `bytes` in `piece`-sized writes until done or the server stops it (error, or no
/// progress for 2 s); returns how many bytes went out.
async fn write_until_stopped(c: &mut Box<dyn Io>, bytes: &[u8], piece: usize) -> usize {
    let mut sent = 0;
    for p in bytes.chunks(piece) {
        match tokio::time::timeout(Duration::from_secs(2), c.write_all(p)).await {
            Ok(Ok(())) => sent += p.len(),
            _ => break,
        }
    }
    sent
}

/// Header fragments of `block` as one HEADERS frame (`END_STREAM` if `end_stream`) and
/// CONTINUATION frames of at most 16 KiB each.
fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let es = if end_stream { flag::END_STREAM } else { 0 };
    let mut out = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let last = if i + 1 == pieces.len() {
            flag::END_HEADERS
        } else {
            0
        };
        if i == 0 {
            out.extend(frame(kind::HEADERS, es | last, stream, p));
        } else {
            out.extend(frame(kind::CONTINUATION, last, stream, p));
        }
    }
    out
}

/// The attacks.
#[derive(Debug, Clone, Copy)]
enum Attack {
    RapidReset,
    ContinuationFlood,
    HpackTableBomb,
    HpackHugeLiteral,
    SettingsFlood,
    PingFlood,
    WindowUpdateAbuse,
    ZeroWindowReader,
    StreamChurn,
    OversizedFrame,
    DataPastTheWindow,
    Http1NeverReads,
    Http1FastUpload,
    StalledUploads,
    TlsHandshakeFlood,
    MalformedClientHellos,
}

impl Attack {
    const ALL: [Attack; 16] = [
        Attack::RapidReset,
        Attack::ContinuationFlood,
        Attack::HpackTableBomb,
        Attack::HpackHugeLiteral,
        Attack::SettingsFlood,
        Attack::PingFlood,
        Attack::WindowUpdateAbuse,
        Attack::ZeroWindowReader,
        Attack::StreamChurn,
        Attack::OversizedFrame,
        Attack::DataPastTheWindow,
        Attack::Http1NeverReads,
        Attack::Http1FastUpload,
        Attack::StalledUploads,
        Attack::TlsHandshakeFlood,
        Attack::MalformedClientHellos,
    ];

    /// Whether the attack applies to `side` (TLS attacks need a TLS listener).
    fn applies(self, side: Side) -> bool {
        match self {
            Attack::TlsHandshakeFlood | Attack::MalformedClientHellos => side == Side::Inbound,
            _ => true,
        }
    }

    /// How much the attacked proxy's resident memory may grow at its peak.
    fn bound(self) -> u64 {
        match self {
            // 100 stalled responses, each holding up to its stream's window (256 KiB) of
            // data the proxy has read from upstream: 25 MiB.
            Attack::ZeroWindowReader | Attack::StalledUploads => 48 * MIB,
            // 50 stalled connections, each with up to 64 KiB read ahead from the app, 64 KiB
            // waiting to be written and TLS's own buffer: about 10 MiB.
            Attack::Http1NeverReads => 32 * MIB,
            // One connection, or handshakes that leave nothing behind.
            _ => 16 * MIB,
        }
    }

    /// Runs the attack; returns what the server did, in words. Fails when the server did
    /// not defend itself as it must.
    async fn run(self, t: &Target) -> anyhow::Result<String> {
        match self {
            Attack::RapidReset => rapid_reset(t).await,
            Attack::ContinuationFlood => continuation_flood(t).await,
            Attack::HpackTableBomb => hpack_table_bomb(t).await,
            Attack::HpackHugeLiteral => hpack_huge_literal(t).await,
            Attack::SettingsFlood => control_flood(t, kind::SETTINGS).await,
            Attack::PingFlood => control_flood(t, kind::PING).await,
            Attack::WindowUpdateAbuse => window_update_abuse(t).await,
            Attack::ZeroWindowReader => zero_window_reader(t).await,
            Attack::StreamChurn => stream_churn(t).await,
            Attack::OversizedFrame => oversized_frame(t).await,
            Attack::DataPastTheWindow => data_past_the_window(t).await,
            Attack::Http1NeverReads => http1_never_reads(t).await,
            Attack::Http1FastUpload => http1_fast_upload(t).await,
            Attack::StalledUploads => stalled_uploads(t).await,
            Attack::TlsHandshakeFlood => tls_handshake_flood(t).await,
            Attack::MalformedClientHellos => malformed_client_hellos(t).await,
        }
    }
}

/// Thousands of streams opened and reset at once (CVE-2023-44487).
async fn rapid_reset(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let block = request_block(false, "/", "echo");
    let mut out = Vec::new();
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        out.extend(frame(
            kind::HEADERS,
            flag::END_STREAM | flag::END_HEADERS,
            id,
            &block,
        ));
        out.extend(frame(kind::RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let sent = write_until_stopped(&mut c, &out, 16 * 1024).await;
    let end = end_of(&mut c, Duration::from_secs(10)).await;
    // ENHANCE_YOUR_CALM.
    anyhow::ensure!(
        end == End::GoAway(0xb),
        "5,000 reset streams ended as {end:?}"
    );
    Ok(format!("{end:?} after {sent} of {} bytes", out.len()))
}

/// A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION frames.
async fn continuation_flood(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut fragment = Vec::new();
    while fragment.len() < 16 * 1024 - 200 {
        fragment.extend(hpack_literal(b"x-flood", &[b'a'; 100], false));
    }
    let mut out = frame(kind::HEADERS, 0, 1, &request_block(false, "/", "echo"));
    // 64 MiB of header fields, if the server let them in.
    for _ in 0..(64 * MIB as usize / fragment.len()) {
        out.extend(frame(kind::CONTINUATION, 0, 1, &fragment));
    }
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    let end = end_of(&mut c, Duration::from_secs(10)).await;
    anyhow::ensure!(
        sent < out.len() && end != End::Open,
        "the server took {sent} bytes of one header block and kept the connection ({end:?})"
    );
    Ok(format!("{end:?} after {:.1} MB", mb(sent)))
}

/// One 4,000-byte header put in the HPACK dynamic table, then referenced 16,000 times: 64 MB
/// of header fields from 20 KB on the wire.
async fn hpack_table_bomb(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut block = request_block(false, "/", "echo");
    block.extend(hpack_literal(b"x-bomb", &[b'b'; 4000], true));
    // Index 62: the newest entry of the dynamic table.
    let reference = hpack_int(7, 0x80, 62);
    for _ in 0..16_000 {
        block.extend_from_slice(&reference);
    }
    c.write_all(&header_frames(1, &block, true)).await?;
    let outcome = first_answer(&mut c, 1).await;
    anyhow::ensure!(
        !matches!(outcome, Answer::Nothing | Answer::Status(0..400)),
        "the bomb was answered {outcome:?}"
    );
    Ok(format!("{outcome:?}"))
}

/// A header whose value claims to be 1 GiB long, its bytes sent as CONTINUATIONs.
async fn hpack_huge_literal(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut block = request_block(false, "/", "echo");
    block.push(0x00);
    block.extend(hpack_int(7, 0, 6));
    block.extend_from_slice(b"x-huge");
    block.extend(hpack_int(7, 0, 1 << 30));
    let mut out = frame(kind::HEADERS, 0, 1, &block);
    let filler = [b'h'; 16 * 1024];
    for _ in 0..(32 * MIB as usize / filler.len()) {
        out.extend(frame(kind::CONTINUATION, 0, 1, &filler));
    }
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    let end = end_of(&mut c, Duration::from_secs(10)).await;
    anyhow::ensure!(
        sent < out.len() && end != End::Open,
        "the server took {sent} bytes of a 1 GiB literal and kept the connection ({end:?})"
    );
    Ok(format!("{end:?} after {:.1} MB", mb(sent)))
}

/// Three million SETTINGS or PING frames (27 or 51 MB) from a client that does not read the
/// acknowledgements:
/// they must wait in the socket, and the proxy stop reading, rather than pile up in memory.
async fn control_flood(t: &Target, k: u8) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let payload: &[u8] = if k == kind::PING { &[7; 8] } else { &[] };
    let out = frame(k, 0, 0, payload).repeat(3_000_000);
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    anyhow::ensure!(
        sent < out.len(),
        "the proxy read all {} MB of a flood whose answers nobody read",
        out.len() / 1_000_000
    );
    let mut acks = 0usize;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(2), read_frame(&mut c)).await {
            Err(_) => break End::Open,
            Ok(Err(_)) => break End::Closed,
            Ok(Ok((kind::GOAWAY, _, _, p))) if p.len() >= 8 => {
                break End::GoAway(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            Ok(Ok((got, f, _, _))) if got == k && f & flag::ACK != 0 => acks += 1,
            Ok(Ok(_)) => {}
        }
    };
    Ok(format!(
        "{end:?}; {:.1} of {:.1} MB taken, {acks} acknowledgements read afterwards",
        mb(sent),
        mb(out.len())
    ))
}

/// 100,000 WINDOW_UPDATEs on the connection, then one that overflows its window.
async fn window_update_abuse(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut out = frame(kind::WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes()).repeat(100_000);
    out.extend(frame(
        kind::WINDOW_UPDATE,
        0,
        0,
        &0x7fff_ffffu32.to_be_bytes(),
    ));
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    let end = end_of(&mut c, Duration::from_secs(10)).await;
    // FLOW_CONTROL_ERROR.
    anyhow::ensure!(
        end == End::GoAway(0x3) || end == End::Closed,
        "an overflowing window ended as {end:?}"
    );
    Ok(format!("{end:?} after {:.1} MB", mb(sent)))
}

/// A client that sets every stream's window to 0 and asks for 100 big answers it never
/// reads: the answers must wait upstream, not in the proxy.
async fn zero_window_reader(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[setting(0x4, 0)]).await?;
    let block = request_block(false, "/big", "echo");
    let mut out = Vec::new();
    for i in 0..100u32 {
        out.extend(frame(
            kind::HEADERS,
            flag::END_STREAM | flag::END_HEADERS,
            2 * i + 1,
            &block,
        ));
    }
    c.write_all(&out).await?;
    // The answers' heads arrive (200, a body to follow); their bodies cannot.
    let mut heads = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while heads < 100 {
        match tokio::time::timeout_at(deadline, read_frame(&mut c)).await {
            Ok(Ok((kind::HEADERS, f, s, p))) => {
                anyhow::ensure!(
                    status_of(&p) == 200 && f & flag::END_STREAM == 0,
                    "stream {s} was answered {} (flags {f:#x}), not 200 with a body to come",
                    status_of(&p)
                );
                heads += 1;
            }
            Ok(Ok((kind::DATA, _, s, p))) if !p.is_empty() => {
                anyhow::bail!("{} bytes of DATA on stream {s} past a window of 0", p.len())
            }
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    anyhow::ensure!(heads == 100, "{heads} of 100 answers began");
    // Hold the connection, reading nothing, while the app has 1.6 GB to send.
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.others_served_meanwhile().await?;
    Ok(format!(
        "{heads} answers began; 0 bytes of their bodies sent; others served meanwhile"
    ))
}

/// What came back first on a stream.
#[derive(Debug)]
enum Answer {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
    Nothing,
}

/// The status of a response header block (0 if it is not understood): indexed from the
/// HPACK static table, or a literal with `:status`'s name, its three digits plain or
/// Huffman-coded.
fn status_of(block: &[u8]) -> u16 {
    match block.first() {
        Some(0x88) => 200,
        Some(0x89) => 204,
        Some(0x8a) => 206,
        Some(0x8b) => 304,
        Some(0x8c) => 400,
        Some(0x8d) => 404,
        Some(0x8e) => 500,
        Some(0x08 | 0x48) if block.len() >= 2 => {
            let len = usize::from(block[1] & 0x7f);
            let Some(value) = block.get(2..2 + len) else {
                return 0;
            };
            let digits = if block[1] & 0x80 == 0 {
                value.to_vec()
            } else {
                huffman_digits(value)
            };
            std::str::from_utf8(&digits)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// Decodes Huffman-coded decimal digits (RFC 7541, appendix B: `0`-`2` are 5-bit codes
/// 0-2, `3`-`9` 6-bit codes 25-31); stops at anything else, as padding.
fn huffman_digits(bytes: &[u8]) -> Vec<u8> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let code = |at: usize, n: usize| {
        bits.get(at..at + n)
            .map(|b| b.iter().fold(0u8, |acc, bit| acc << 1 | bit))
    };
    let (mut at, mut out) = (0, Vec::new());
    loop {
        match (code(at, 5), code(at, 6)) {
            (Some(c @ 0..=2), _) => {
                out.push(b'0' + c);
                at += 5;
            }
            (_, Some(c @ 25..=31)) => {
                out.push(b'3' + c - 25);
                at += 6;
            }
            _ => return out,
        }
    }
}

#[test]
fn statuses_read_from_header_blocks() {
    assert_eq!(status_of(&[0x88]), 200);
    assert_eq!(status_of(&[0x48, 0x03, b'4', b'3', b'1']), 431);
    // "503" Huffman-coded: 011011 00000 011001, padded with ones to 3 bytes.
    assert_eq!(status_of(&[0x48, 0x83, 0x6c, 0x0c, 0xff]), 503);
}

/// Reads until stream `id` gets an answer (10 s at most).
async fn first_answer(c: &mut Box<dyn Io>, id: u32) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, read_frame(c)).await {
            Err(_) => return Answer::Nothing,
            Ok(Err(_)) => return Answer::Closed,
            Ok(Ok((kind::HEADERS, _, s, p))) if s == id => return Answer::Status(status_of(&p)),
            Ok(Ok((kind::RST_STREAM, _, s, p))) if s == id && p.len() == 4 => {
                return Answer::Reset(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
            }
            Ok(Ok((kind::GOAWAY, _, _, p))) if p.len() >= 8 => {
                return Answer::GoAway(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// 100 streams held open at the concurrency limit, one more refused, then 3,000 requests
/// through the same connection with 100 in flight at all times.
async fn stream_churn(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let hold = request_block(true, "/hold", "echo");
    let mut out = Vec::new();
    for i in 0..101u32 {
        out.extend(frame(kind::HEADERS, flag::END_HEADERS, 2 * i + 1, &hold));
    }
    c.write_all(&out).await?;
    let refused = first_answer(&mut c, 201).await;
    anyhow::ensure!(
        matches!(refused, Answer::Reset(0x7)),
        "the 101st stream got {refused:?}, not REFUSED_STREAM"
    );
    // The 100 held requests end; then the churn.
    let mut out = Vec::new();
    for i in 0..100u32 {
        out.extend(frame(kind::DATA, flag::END_STREAM, 2 * i + 1, &[]));
    }
    c.write_all(&out).await?;
    let get = request_block(false, "/", "echo");
    let (total, mut next, mut done, mut ok) = (3_100u32, 203u32, 0u32, 0u32);
    let mut in_flight = 100u32;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while done < total {
        while in_flight < 100 && (next - 203) / 2 < total - 100 {
            c.write_all(&frame(
                kind::HEADERS,
                flag::END_STREAM | flag::END_HEADERS,
                next,
                &get,
            ))
            .await?;
            next += 2;
            in_flight += 1;
        }
        let (k, f, s, p) = tokio::time::timeout_at(deadline, read_frame(&mut c))
            .await
            .map_err(|_| anyhow::anyhow!("{done} of {total} streams answered in 60 s"))??;
        match k {
            kind::HEADERS if s % 2 == 1 => {
                if status_of(&p) == 200 {
                    ok += 1;
                }
                if f & flag::END_STREAM != 0 {
                    done += 1;
                    in_flight -= 1;
                }
            }
            kind::DATA if f & flag::END_STREAM != 0 => {
                done += 1;
                in_flight -= 1;
            }
            kind::RST_STREAM => {
                done += 1;
                in_flight -= 1;
            }
            kind::GOAWAY => anyhow::bail!("GOAWAY after {done} streams"),
            _ => {}
        }
        // Answers use the connection's window: give it back.
        if k == kind::DATA && !p.is_empty() {
            let n = u32::try_from(p.len())?.to_be_bytes();
            c.write_all(&frame(kind::WINDOW_UPDATE, 0, 0, &n)).await?;
        }
    }
    anyhow::ensure!(ok == total, "{ok} of {total} streams answered 200");
    Ok(format!(
        "the 101st stream refused; {ok} of {total} streams answered 200"
    ))
}

/// A DATA frame of 1 MiB, over the 16 KiB frame size the server allows.
async fn oversized_frame(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut out = frame(
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &request_block(true, "/hold", "echo"),
    );
    out.extend(frame(kind::DATA, flag::END_STREAM, 1, &vec![b'd'; 1 << 20]));
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    let end = end_of(&mut c, Duration::from_secs(10)).await;
    // FRAME_SIZE_ERROR.
    anyhow::ensure!(
        end == End::GoAway(0x6) || end == End::Closed,
        "a 1 MiB frame ended as {end:?}"
    );
    Ok(format!("{end:?} after {:.1} MB", mb(sent)))
}

/// A request body sent past every window the server granted (64 MiB, never waiting).
async fn data_past_the_window(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    let mut out = frame(
        kind::HEADERS,
        flag::END_HEADERS,
        1,
        &request_block(true, "/hold", "echo"),
    );
    let piece = frame(kind::DATA, 0, 1, &[b'd'; 16 * 1024]);
    for _ in 0..(64 * MIB as usize / (16 * 1024)) {
        out.extend_from_slice(&piece);
    }
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    let answer = first_answer(&mut c, 1).await;
    // FLOW_CONTROL_ERROR, on the stream or the connection.
    anyhow::ensure!(
        matches!(
            answer,
            Answer::Reset(0x3) | Answer::GoAway(0x3) | Answer::Closed
        ),
        "a body past the window got {answer:?}"
    );
    Ok(format!("{answer:?} after {:.1} MB", mb(sent)))
}

/// HTTP/1.1 over the listener: an HTTP/1.1 connection (plain, or mesh TLS with ALPN
/// `http/1.1`).
async fn http1(t: &Target) -> anyhow::Result<Box<dyn Io>> {
    t.connect(mesh_api::tls::ALPN_HTTP1).await
}

/// 50 HTTP/1.1 connections each asking for a big answer and never reading it.
async fn http1_never_reads(t: &Target) -> anyhow::Result<String> {
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut c = http1(t).await?;
        c.write_all(b"GET /big HTTP/1.1\r\nhost: echo\r\n\r\n")
            .await?;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    t.others_served_meanwhile().await?;
    Ok(format!(
        "{} connections held, {} MB of answers unread; others served meanwhile",
        held.len(),
        held.len() * BIG / (1024 * 1024)
    ))
}

/// A client uploading 256 MiB as fast as it can to an app that reads none of it.
async fn http1_fast_upload(t: &Target) -> anyhow::Result<String> {
    let mut c = http1(t).await?;
    let total = 256 * MIB as usize;
    c.write_all(
        format!("POST /slow HTTP/1.1\r\nhost: echo\r\ncontent-length: {total}\r\n\r\n").as_bytes(),
    )
    .await?;
    let piece = vec![b'u'; 64 * 1024];
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < total && started.elapsed() < Duration::from_secs(3) {
        match tokio::time::timeout(Duration::from_millis(500), c.write_all(&piece)).await {
            Ok(Ok(())) => sent += piece.len(),
            Ok(Err(e)) => anyhow::bail!("the upload failed after {sent} bytes: {e}"),
            Err(_) => {}
        }
    }
    anyhow::ensure!(
        sent < total,
        "256 MiB went out in 3 s to an app that read nothing: buffered somewhere"
    );
    t.others_served_meanwhile().await?;
    Ok(format!(
        "{:.1} MB accepted before backpressure stopped the client; others served meanwhile",
        mb(sent)
    ))
}

/// 100 uploads on one HTTP/2 connection to an app that reads none of them, each sent as far
/// as its window goes: each stream holds at most its window (256 KiB) in the proxy, and the
/// connection's window is never used up, so the proxy holds at most 25 MiB for it.
async fn stalled_uploads(t: &Target) -> anyhow::Result<String> {
    let mut c = t.h2(&[]).await?;
    // The windows the proxy grants hold once it has its SETTINGS acknowledged.
    loop {
        let (k, f, _, _) = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut c))
            .await
            .map_err(|_| anyhow::anyhow!("no SETTINGS from the proxy"))??;
        if k == kind::SETTINGS && f & flag::ACK == 0 {
            break;
        }
    }
    c.write_all(&frame(kind::SETTINGS, flag::ACK, 0, &[]))
        .await?;
    let block = request_block(true, "/slow", "echo");
    let piece = [b'u'; 16 * 1024];
    let mut out = Vec::new();
    for i in 0..100u32 {
        let id = 2 * i + 1;
        out.extend(frame(kind::HEADERS, flag::END_HEADERS, id, &block));
        // 256 KiB: the stream's window, and the most the proxy grants before the app reads.
        for _ in 0..16 {
            out.extend(frame(kind::DATA, 0, id, &piece));
        }
    }
    let sent = write_until_stopped(&mut c, &out, 64 * 1024).await;
    anyhow::ensure!(
        sent == out.len(),
        "{sent} of {} bytes of uploads taken",
        out.len()
    );
    // Every stream stays open, waiting: nothing refused, reset or answered, and the connection
    // goes on.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(quiet_until, read_frame(&mut c)).await {
            Err(_) => break,
            Ok(Err(e)) => anyhow::bail!("the connection ended: {e}"),
            Ok(Ok((k @ (kind::RST_STREAM | kind::HEADERS | kind::GOAWAY), _, s, p))) => {
                anyhow::bail!("frame {k} on stream {s} ({p:?}) while the uploads waited")
            }
            Ok(Ok(_)) => {}
        }
    }
    t.others_served_meanwhile().await?;
    Ok(format!(
        "100 uploads of 256 KiB held, {:.1} MB in all; others served meanwhile",
        mb(sent)
    ))
}

/// Four clients doing full mesh TLS handshakes back to back for 3 s.
async fn tls_handshake_flood(t: &Target) -> anyhow::Result<String> {
    let count = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (addr, chain, key, count) = (
            t.addr,
            t.svid.0.clone(),
            t.svid.1.clone_key(),
            count.clone(),
        );
        tasks.spawn(async move {
            while Instant::now() < until {
                if tls_connect_alpn(addr, chain.clone(), key.clone_key(), mesh_api::tls::ALPN_H2)
                    .await
                    .is_ok()
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let n = count.load(Ordering::Relaxed);
    Ok(format!("{n} handshakes in 3 s ({} per second)", n / 3))
}

/// ClientHellos no TLS library should accept, each on its own connection, plus 200
/// connections that begin a handshake and never finish it.
async fn malformed_client_hellos(t: &Target) -> anyhow::Result<String> {
    let record = |body: &[u8]| {
        let mut r = vec![0x16, 0x03, 0x01];
        r.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
        r.extend_from_slice(body);
        r
    };
    // A ClientHello with no cipher suites and no extensions.
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[0x11; 32]);
    hello.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]);
    let mut no_suites = vec![0x01, 0x00];
    no_suites.extend_from_slice(&u16::try_from(hello.len())?.to_be_bytes());
    no_suites.extend_from_slice(&hello);
    // A handshake message claiming 16 MB, followed by 128 KB of it.
    let mut huge = vec![0x01, 0xff, 0xff, 0xff];
    huge.extend_from_slice(&[0x22; 16 * 1024 - 4]);
    let mut huge_records = record(&huge);
    for _ in 0..8 {
        huge_records.extend(record(&[0x22; 16 * 1024]));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "plaintext HTTP",
            b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n".to_vec(),
        ),
        ("no cipher suites", record(&no_suites)),
        ("a 16 MB handshake message", huge_records),
        (
            "a record over 16 KiB",
            [&[0x16, 0x03, 0x01, 0xff, 0xff][..], &[0u8; 65535][..]].concat(),
        ),
        (
            "an SSLv2 hello",
            vec![
                0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
            ],
        ),
        ("garbage after a record header", record(&[0xa5; 512])),
        ("a record of the wrong type", {
            let mut r = record(&no_suites);
            r[0] = 0x17;
            r
        }),
    ];
    let mut refused = 0;
    for (what, bytes) in &cases {
        let mut c = TcpStream::connect(t.addr).await?;
        let _ = c.write_all(bytes).await;
        let mut buf = vec![0u8; 4096];
        // An alert, then the end; or the end at once. Nothing else.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) if buf[0] == 0x15 => {}
                    Ok(_) => return false,
                }
            }
        })
        .await;
        anyhow::ensure!(
            matches!(ended, Ok(true)),
            "{what}: the connection was not closed with at most an alert ({ended:?})"
        );
        refused += 1;
    }
    // Half handshakes: the proxy's handshake deadline (10 s) must end them all.
    let mut half = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(t.addr).await?;
        c.write_all(&record(&no_suites)[..20]).await?;
        half.push(c);
    }
    let started = Instant::now();
    for c in &mut half {
        let mut b = [0u8; 64];
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match c.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        anyhow::ensure!(ended.is_ok(), "a half handshake was kept past 15 s");
    }
    Ok(format!(
        "{refused} malformed hellos refused; 200 half handshakes closed after {:.1} s",
        started.elapsed().as_secs_f64()
    ))
}

fn mb(bytes: usize) -> f64 {
    bytes as f64 / 1e6
}

/// Requests of a bystander across both proxies (its app to the client proxy's outbound
/// listener, mesh TLS to the server proxy's inbound one), one after another until stopped.
struct Bystander {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>, Duration)>,
}

impl Bystander {
    fn start(outbound: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
            let mut client = ProxyClient::new(outbound);
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                match tokio::time::timeout(Duration::from_secs(10), client.get("echo", "/", &[]))
                    .await
                {
                    Ok(Ok((200, _))) => ok += 1,
                    Ok(Ok((status, body))) => failed.push(format!("{status} {body}")),
                    Ok(Err(e)) => failed.push(e.to_string()),
                    Err(_) => failed.push("no answer in 10 s".into()),
                }
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed, slowest)
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<(u64, Vec<String>, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// The attacked proxy's resident memory, read every 10 ms until stopped: the peak.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(mesh_proxy::overload::resident_bytes_of(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Runs every attack that applies to `side`, one after another against one pair; fails at
/// the end with every case that failed.
async fn matrix(side: Side) -> anyhow::Result<()> {
    let (app_addr, _app) = app().await?;
    let ca = TestCa::start(Duration::from_secs(3600)).await?;
    let mesh = LocalMesh::start().await?;
    let pair: ProcessPair = mesh.process_pair(&ca, app_addr.port(), &[]).await?;
    let (attacked, addr): (&ProxyProcess, SocketAddr) = match side {
        Side::Outbound => (&pair.client, pair.outbound),
        Side::Inbound => (&pair.server, pair.inbound),
    };
    let target = Target {
        side,
        addr,
        others: pair.outbound,
        svid: sign(
            &svid_params("spiffe://cluster.local/ns/default/sa/attacker"),
            &ca.issuer()?,
        )?,
    };
    let mut failures = Vec::new();
    for attack in Attack::ALL.into_iter().filter(|a| a.applies(side)) {
        let before = attacked.resident_bytes()?;
        let sampler = Sampler::start(attacked.pid);
        let bystander = Bystander::start(pair.outbound);
        let outcome = attack.run(&target).await;
        let (ok, failed, slowest) = bystander.finish().await?;
        let peak = sampler.finish().await?;
        // After the attack: the bystander again, and the memory once the attacker is gone.
        let mut after_ok = 0;
        for _ in 0..5 {
            if let Ok((200, _)) = ProxyClient::new(pair.outbound).get("echo", "/", &[]).await {
                after_ok += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = attacked.resident_bytes()?;
        let growth = peak.saturating_sub(before);
        figure(&format!(
            "attack {side:?} {attack:?}: {}; proxy RSS {:.1} MiB before, {:.1} peak (+{:.1}, bound +{:.0}), {:.1} after; others served {ok} (failed {}) during (slowest {} ms), {after_ok}/5 after",
            outcome.as_deref().unwrap_or("FAILED"),
            mib(before),
            mib(peak),
            mib(growth),
            mib(attack.bound()),
            mib(after),
            failed.len(),
            slowest.as_millis(),
        ));
        let mut problems = Vec::new();
        if let Err(e) = outcome {
            problems.push(format!("{e:#}"));
        }
        if growth > attack.bound() {
            problems.push(format!(
                "memory grew {:.1} MiB, over the bound of {:.0} MiB",
                mib(growth),
                mib(attack.bound())
            ));
        }
        if !failed.is_empty() || ok == 0 {
            problems.push(format!("others' requests failed during it: {failed:?}"));
        }
        if after_ok != 5 {
            problems.push(format!("{after_ok} of 5 requests served after it"));
        }
        if !problems.is_empty() {
            failures.push(format!("{attack:?}: {}", problems.join("; ")));
        }
    }
    anyhow::ensure!(
        failures.is_empty(),
        "on the {side:?} listener:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_listener_withstands_the_attack_matrix() -> anyhow::Result<()> {
    matrix(Side::Outbound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_listener_withstands_the_attack_matrix() -> anyhow::Result<()> {
    matrix(Side::Inbound).await
}
