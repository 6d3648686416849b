//! Distributed tracing: W3C `traceparent` and B3 propagation, one span per request in each
//! proxy (SERVER inbound, CLIENT outbound), sampled parent-based (a fixed percentage of new
//! traces), exported over OTLP/gRPC. The reference is `docs/reference/proxy.md#tracing`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracerProvider, Span, SpanData, SpanProcessor, Tracer,
    span_processor_with_async_runtime::BatchSpanProcessor,
};

use crate::metrics::{Direction, Peer};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How often finished spans are sent to the collector.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// Which header format a request's trace context came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    /// Single `b3` header.
    B3Single,
    /// `x-b3-*` headers.
    B3Multi,
}

/// A position in a trace: what a request carries from one hop to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// `2 * N` hex digits (either case) as `N` bytes. Written out: `from_str_radix` (checked
/// 128-bit arithmetic) took about 1,100 instructions for a `traceparent`'s 50 digits, this
/// about 160.
fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    use mesh_api::path::hex as nibble;
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// `00-<trace id>-<span id>-<flags>`, built without formatting machinery (once per request).
fn traceparent_value(c: &TraceContext) -> HeaderValue {
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&c.trace_id, &mut v[3..35]);
    hex_into(&c.span_id, &mut v[36..52]);
    if c.sampled {
        v[54] = b'1';
    }
    never_indexed(HeaderValue::from_bytes(&v).unwrap_or_else(|_| HeaderValue::from_static("")))
}

/// A value new with each request, marked so that HTTP/2 sends it as a literal that is never
/// indexed (RFC 7541 6.2.3). Indexed, each one went into the connection's HPACK table on
/// both ends, pushing out the values that do repeat (authority, content type, the caller's
/// workload), and every next one was compared with all of those before it.
fn never_indexed(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}

/// A B3 trace ID: 32 hex digits, or 16 (then padded on the left, as B3 says).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        16 => {
            let low: [u8; 8] = hex_to(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => hex_to(s),
    }
}

fn valid(c: TraceContext) -> Option<TraceContext> {
    (c.trace_id != [0; 16] && c.span_id != [0; 8]).then_some(c)
}

/// A `traceparent` value: version 00 has exactly four fields; later versions may add more
/// after them; `ff` is never valid.
fn traceparent(tp: &str) -> Option<TraceContext> {
    let mut parts = tp.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    hex_to::<1>(version)?;
    let flags = hex_to::<1>(flags)?;
    valid(TraceContext {
        trace_id: hex_to(trace_id)?,
        span_id: hex_to(span_id)?,
        sampled: flags[0] & 1 == 1,
    })
}

/// The trace context a request carries: `traceparent` first, then B3 (single, then multi).
/// Malformed values count as absent, as the W3C spec says.
pub fn extract(h: &HeaderMap) -> Option<(TraceContext, Format)> {
    let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(c) = text(&TRACEPARENT).and_then(traceparent) {
        return Some((c, Format::W3c));
    }
    if let Some(b3) = text(&B3) {
        let parts: Vec<&str> = b3.split('-').collect();
        if parts.len() >= 2
            && let (Some(trace_id), Some(span_id)) = (b3_trace_id(parts[0]), hex_to(parts[1]))
        {
            let sampled = matches!(parts.get(2), Some(&"1") | Some(&"d"));
            if let Some(c) = valid(TraceContext {
                trace_id,
                span_id,
                sampled,
            }) {
                return Some((c, Format::B3Single));
            }
        }
    }
    let trace_id = text(&B3_TRACE_ID).and_then(b3_trace_id)?;
    let span_id = text(&B3_SPAN_ID).and_then(hex_to)?;
    let sampled =
        matches!(text(&B3_SAMPLED), Some("1") | Some("true")) || text(&B3_FLAGS) == Some("1");
    valid(TraceContext {
        trace_id,
        span_id,
        sampled,
    })
    .map(|c| (c, Format::B3Multi))
}

/// Writes `c` (this proxy's span as the parent of the next hop) into the request: always
/// `traceparent`, and B3 in the format the request came with.
pub fn inject(h: &mut HeaderMap, c: &TraceContext, came_as: Option<Format>) {
    h.insert(TRACEPARENT, traceparent_value(c));
    let sampled = if c.sampled { "1" } else { "0" };
    match came_as {
        Some(Format::B3Single) => {
            let v = format!("{}-{}-{sampled}", hex(&c.trace_id), hex(&c.span_id));
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(B3, never_indexed(v));
            }
        }
        Some(Format::B3Multi) => {
            let parent = h.remove(&B3_SPAN_ID);
            for (name, value) in [
                (B3_TRACE_ID, hex(&c.trace_id)),
                (B3_SPAN_ID, hex(&c.span_id)),
            ] {
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(name, never_indexed(v));
                }
            }
            h.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
            match parent {
                Some(p) => h.insert(B3_PARENT_SPAN_ID, never_indexed(p)),
                None => h.remove(&B3_PARENT_SPAN_ID),
            };
        }
        _ => {}
    }
}

/// The proxy's tracer: makes spans, samples, exports.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: Tracer,
    /// The share of new traces sampled, 0 to 1.
    ratio: f64,
    /// Spans go to a collector (otherwise none is made). Dropped last: ends the export
    /// thread, once the provider has flushed.
    export: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Trace settings that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("--tracing-endpoint {endpoint:?}: {reason}")]
pub struct TracingError {
    endpoint: String,
    reason: String,
}

impl Tracing {
    /// A tracer sampling `percent` of new traces (parent-based); spans go to the OTLP/gRPC
    /// collector at `endpoint`, or nowhere.
    pub fn new(
        endpoint: Option<&str>,
        percent: f64,
        me: &Peer,
        pod: &str,
    ) -> Result<Self, TracingError> {
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(me.workload.clone())
            .with_attributes([
                KeyValue::new("service.namespace", me.namespace.clone()),
                KeyValue::new("k8s.namespace.name", me.namespace.clone()),
                KeyValue::new("k8s.pod.name", pod.to_string()),
                KeyValue::new("mesh.workload", me.workload.clone()),
                KeyValue::new("mesh.identity", me.identity.clone()),
            ])
            .build();
        // The sampling decision is made before the SDK sees a request (see `start`): it only
        // makes the spans of sampled ones.
        let mut builder = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource.clone());
        let mut export = None;
        if let Some(endpoint) = endpoint {
            let (processor, stop) =
                export_thread(endpoint, resource.clone()).map_err(|reason| TracingError {
                    endpoint: endpoint.to_string(),
                    reason,
                })?;
            builder = builder.with_span_processor(processor);
            export = Some(stop);
        }
        let provider = builder.build();
        let tracer = provider.tracer("mesh-proxy");
        Ok(Tracing {
            provider,
            tracer,
            ratio: percent / 100.0,
            export,
        })
    }

    /// Starts this proxy's span of a request that came with `parent` (or starts a trace).
    /// Returns the span (for a sampled request) and the context to send on.
    ///
    /// Sampling is parent-based: a parent's decision stands; a new trace is sampled with
    /// probability `ratio`. An unsampled request never reaches the SDK: it gets a span ID
    /// here, to pass on with the decision, and costs a few random numbers.
    pub fn start(
        &self,
        direction: Direction,
        parent: Option<&TraceContext>,
    ) -> (Option<Span>, TraceContext) {
        let mut rng = rand::rng();
        let sampled = match parent {
            Some(p) => p.sampled,
            None if self.ratio >= 1.0 => true,
            None => self.ratio > 0.0 && rand::Rng::random::<f64>(&mut rng) < self.ratio,
        };
        // Without a collector the decision is passed on, and no span is made: nothing would
        // take it.
        if !sampled || self.export.is_none() {
            let trace_id = match parent {
                Some(p) => p.trace_id,
                None => rand::Rng::random::<u128>(&mut rng).max(1).to_be_bytes(),
            };
            let span_id = rand::Rng::random::<u64>(&mut rng).max(1).to_be_bytes();
            let next = TraceContext {
                trace_id,
                span_id,
                sampled,
            };
            return (None, next);
        }
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                if p.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let (kind, name) = match direction {
            Direction::inbound => (SpanKind::Server, "inbound"),
            Direction::outbound => (SpanKind::Client, "outbound"),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, &cx);
        let sc = opentelemetry::trace::Span::span_context(&span);
        let next = TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: true,
        };
        (Some(span), next)
    }

    /// Sends what is buffered and stops exporting.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// Starts the thread spans are exported from: a runtime of its own, so that flushing (which
/// blocks the caller until the export ran) never waits on the thread it blocks.
fn export_thread(
    endpoint: &str,
    resource: opentelemetry_sdk::Resource,
) -> Result<(Buffered, tokio::sync::oneshot::Sender<()>), String> {
    mesh_api::check_otlp_endpoint(endpoint)?;
    let endpoint = endpoint.to_string();
    let (built_tx, built_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("mesh-trace-export".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = built_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .with_timeout(Duration::from_secs(5))
                    .build();
                let built = exporter.map_err(|e| e.to_string()).map(|exporter| {
                    let mut batch = BatchSpanProcessor::builder(exporter, Tokio)
                        .with_batch_config(
                            BatchConfigBuilder::default()
                                .with_scheduled_delay(EXPORT_EVERY)
                                .build(),
                        )
                        .build();
                    // The provider gives its resource to the processors it holds; this one
                    // it never sees.
                    batch.set_resource(&resource);
                    Buffered {
                        spans: Arc::default(),
                        inner: Arc::new(batch),
                    }
                });
                let Ok(buffered) = built else {
                    let _ = built_tx.send(built);
                    return;
                };
                let (spans, inner) = (buffered.spans.clone(), buffered.inner.clone());
                let _ = built_tx.send(Ok(buffered));
                // Hand the buffered spans over from this thread, a few times a second.
                let mut tick = tokio::time::interval(HAND_OVER_EVERY);
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        _ = tick.tick() => hand_over(&spans, &inner),
                        _ = &mut stop_rx => break,
                    }
                }
            });
        })
        .map_err(|e| format!("starting the export thread: {e}"))?;
    let processor = built_rx
        .recv()
        .map_err(|_| "the export thread ended".to_string())??;
    Ok((processor, stop_tx))
}

/// How often spans buffered by the workers are handed to the exporter.
const HAND_OVER_EVERY: Duration = Duration::from_millis(250);
/// Spans a proxy holds for export at most; beyond that new ones are dropped.
const MAX_BUFFERED: usize = 8192;

/// Finished spans wait here, taken under a lock by the workers, until the export thread hands
/// them to the batch processor: a span then costs its worker a push, not a wake-up of another
/// thread.
#[derive(Debug)]
struct Buffered {
    spans: Arc<Mutex<Vec<SpanData>>>,
    inner: Arc<BatchSpanProcessor<Tokio>>,
}

fn hand_over(spans: &Mutex<Vec<SpanData>>, inner: &BatchSpanProcessor<Tokio>) {
    let batch = std::mem::take(&mut *spans.lock().unwrap_or_else(PoisonError::into_inner));
    for s in batch {
        inner.on_end(s);
    }
}

impl SpanProcessor for Buffered {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let mut spans = self.spans.lock().unwrap_or_else(PoisonError::into_inner);
        if spans.len() < MAX_BUFFERED {
            spans.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        hand_over(&self.spans, &self.inner);
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        hand_over(&self.spans, &self.inner);
        self.inner.shutdown_with_timeout(timeout)
    }
}

/// The trace ID as 32 hex digits (access logs).
pub fn trace_id_hex(c: &TraceContext) -> String {
    hex(&c.trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn w3c_round_trip_and_refusals() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let (c, f) = extract(&h).expect("valid");
        assert_eq!(f, Format::W3c);
        assert!(c.sampled);
        assert_eq!(hex(&c.span_id), "00f067aa0ba902b7");
        let mut out = HeaderMap::new();
        inject(&mut out, &c, Some(f));
        assert_eq!(
            out[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(out[TRACEPARENT].is_sensitive(), "never indexed by HPACK");
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-+0f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            let h: HeaderMap = [(TRACEPARENT, HeaderValue::from_static(bad))]
                .into_iter()
                .collect();
            assert_eq!(extract(&h), None, "{bad}");
        }
        // A later version may carry more fields.
        let h = headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more",
        )]);
        assert!(!extract(&h).expect("future version").0.sampled);
    }

    #[test]
    fn b3_single_and_multi() {
        let h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let (c, f) = extract(&h).expect("single");
        assert_eq!((f, c.sampled), (Format::B3Single, true));
        let h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]);
        let (c, f) = extract(&h).expect("multi, 64-bit trace id");
        assert_eq!(f, Format::B3Multi);
        assert_eq!(hex(&c.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(!c.sampled);
        let mut out = h.clone();
        let next = TraceContext {
            span_id: [1, 2, 3, 4, 5, 6, 7, 8],
            ..c
        };
        inject(&mut out, &next, Some(f));
        assert_eq!(out[B3_SPAN_ID], "0102030405060708");
        assert_eq!(out[B3_PARENT_SPAN_ID], "00f067aa0ba902b7");
        for n in [&B3_TRACE_ID, &B3_SPAN_ID, &B3_PARENT_SPAN_ID] {
            assert!(out[n].is_sensitive(), "{n}: never indexed by HPACK");
        }
        assert_eq!(out[B3_SAMPLED], "0");
        assert_eq!(
            out[TRACEPARENT],
            "00-0000000000000000a3ce929d0e0e4736-0102030405060708-00"
        );
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn parent_based_sampling() {
        let me = Peer::new("shop", "web", None);
        let never = Tracing::new(None, 0.0, &me, "web-0").expect("tracer");
        let always = Tracing::new(None, 100.0, &me, "web-0").expect("tracer");
        let (_, root) = never.start(Direction::outbound, None);
        assert!(!root.sampled, "0 % samples no new trace");
        let (span, root) = always.start(Direction::outbound, None);
        assert!(root.sampled);
        assert!(
            span.is_none(),
            "without a collector the decision travels, no span is made"
        );
        // A parent's decision wins over the percentage, both ways.
        let parent = TraceContext {
            trace_id: [7; 16],
            span_id: [9; 8],
            sampled: true,
        };
        let (_, child) = never.start(Direction::inbound, Some(&parent));
        assert!(child.sampled);
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        let (_, child) = always.start(
            Direction::inbound,
            Some(&TraceContext {
                sampled: false,
                ..parent
            }),
        );
        assert!(!child.sampled);
        assert!(Tracing::new(Some("collector:4317"), 1.0, &me, "web-0").is_err());
    }
}
