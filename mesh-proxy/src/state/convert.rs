//! From Envoy v3 protos to the proxy's own config types. What the proxy cannot honour is an
//! error naming the resource and the field, which the xDS client sends back as a NACK.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster as PbCluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderValueOption, Metadata, TransportSocket, address, data_source,
    header_value_option, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain as PbFilterChain, Listener, filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RedirectAction, RetryPolicy as PbRetry, Route as PbRoute, RouteConfiguration,
    VirtualHost as PbVhost, header_matcher, query_parameter_matcher, redirect_action, route,
    route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, common_tls_context,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use http::{HeaderName, HeaderValue};
use prost::{Message, Name};
use regex::Regex;

use super::route::{
    Action, Forward, HashPolicy, HeaderMatch, HeaderOps, HeaderTarget, Mirror, PathMatch,
    QueryMatch, Redirect, RetryPolicy, Route, RouteMatch, RouteTable, StrKind, StrMatch,
    ValueMatch, VirtualHost, WeightedBackend,
};
use super::{
    Cidr, ClusterDef, ClusterKind, ClusterLimits, Detected, EdgeTls, EndpointDef, EnvoyRetryBudget,
    EscapedSlashes, FilterChain, Guard, ListenerConfig, NetworkFilter, PathRules, Transport,
    UpstreamProtocol,
};
use crate::balance::{Balancer, OutlierConfig};
use crate::metrics::Peer;

/// Why a resource was refused: `<Kind> "<name>": <field>: <problem>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: {field}: {problem}")]
pub struct ConvertError {
    pub kind: &'static str,
    pub name: String,
    pub field: String,
    pub problem: String,
}

/// Builds errors for one resource, with a field path.
struct Ctx<'a> {
    kind: &'static str,
    name: &'a str,
}

impl Ctx<'_> {
    /// The first of `fields` (set, name, why) that is set, as an error at `<at>.<name>`.
    fn refuse_set<'f>(
        &self,
        at: &str,
        fields: impl IntoIterator<Item = (bool, &'f str, &'f str)>,
    ) -> Result<()> {
        match fields.into_iter().find(|(set, _, _)| *set) {
            Some((_, name, why)) => Err(self.err(format!("{at}.{name}"), why)),
            None => Ok(()),
        }
    }

    fn err(&self, field: impl Into<String>, problem: impl Into<String>) -> ConvertError {
        ConvertError {
            kind: self.kind,
            name: self.name.to_string(),
            field: field.into(),
            problem: problem.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

mod fault;
mod policy;

/// Listener names the proxy serves, and how it binds them.
pub const LISTENERS: [&str; 3] = [
    mesh_api::consts::xds::OUTBOUND_LISTENER,
    mesh_api::consts::xds::INBOUND_LISTENER,
    mesh_api::consts::xds::OUTBOUND_HTTP_LISTENER,
];

const LISTENER_FILTERS: [&str; 3] = [
    "envoy.filters.listener.original_dst",
    "envoy.filters.listener.http_inspector",
    "envoy.filters.listener.tls_inspector",
];

pub fn duration(d: &PbDuration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

/// A fraction as `(numerator, whole)`: `whole` is 100, 10,000 or 1,000,000; `field` names the
/// fraction in an unknown denominator's error.
fn fraction(cx: &Ctx<'_>, field: String, f: &FractionalPercent) -> Result<(u32, u32)> {
    use fractional_percent::DenominatorType as D;
    let whole = match D::try_from(f.denominator) {
        Ok(D::Hundred) => 100,
        Ok(D::TenThousand) => 10_000,
        Ok(D::Million) => 1_000_000,
        Err(_) => return Err(cx.err(field, "unknown denominator")),
    };
    Ok((f.numerator, whole))
}

fn dur(cx: &Ctx<'_>, field: &str, d: Option<&PbDuration>) -> Result<Option<Duration>> {
    d.map(|d| duration(d).ok_or_else(|| cx.err(field, format!("negative duration {d:?}"))))
        .transpose()
}

fn decode<M: Message + Name + Default>(cx: &Ctx<'_>, field: &str, any: &Any) -> Result<M> {
    if any.type_url != M::type_url() {
        return Err(cx.err(
            field,
            format!(
                "type {} is not supported here (expected {})",
                any.type_url,
                M::type_url()
            ),
        ));
    }
    M::decode(any.value.as_slice()).map_err(|e| cx.err(field, format!("cannot decode: {e}")))
}

// ---- listeners ---------------------------------------------------------------------------------

/// Converts a Listener, and returns the RouteConfigurations it names.
pub fn listener(l: &Listener) -> Result<ListenerConfig> {
    let cx = Ctx {
        kind: "Listener",
        name: &l.name,
    };
    let address = mesh_api::consts::xds::parse_address_listener(&l.name);
    let gateway = mesh_api::consts::xds::parse_gateway_listener(&l.name);
    if !LISTENERS.contains(&l.name.as_str()) && address.is_none() && gateway.is_none() {
        return Err(cx.err(
            "name",
            format!(
                "mesh-proxy serves only the listeners {}, those of one address, <ip>_<port>, and a gateway's, gateway_<port>",
                LISTENERS.join(", ")
            ),
        ));
    }
    let bind = gateway.map(|port| gateway_bind(&cx, l, port)).transpose()?;
    if l.api_listener.is_some() {
        return Err(cx.err(
            "api_listener",
            "API listeners are for gRPC clients, not mesh-proxy",
        ));
    }
    if l.filter_chain_matcher.is_some() {
        return Err(cx.err(
            "filter_chain_matcher",
            "not supported; use filter_chain_match",
        ));
    }
    for (i, f) in l.listener_filters.iter().enumerate() {
        if !LISTENER_FILTERS.contains(&f.name.as_str()) {
            return Err(cx.err(
                format!("listener_filters[{i}].name"),
                format!("unsupported listener filter {:?}", f.name),
            ));
        }
    }
    let chains = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| filter_chain(&cx, &format!("filter_chains[{i}]"), c, bind.is_some()))
        .collect::<Result<Vec<_>>>()?;
    let default_chain = l
        .default_filter_chain
        .as_ref()
        .map(|c| filter_chain(&cx, "default_filter_chain", c, bind.is_some()))
        .transpose()?;
    if let Some(addr) = address {
        address_listener(&cx, l, addr, &chains, default_chain.is_some())?;
    }
    if bind.is_some() {
        gateway_chains(&cx, l, &chains, default_chain.as_ref())?;
    }
    Ok(ListenerConfig {
        name: l.name.clone(),
        bind,
        chains,
        default_chain,
    })
}

/// A gateway's listener chooses a chain by the TLS server name alone (an HTTPS port) or has
/// one plaintext chain (an HTTP port), guarded by a local rate limit at most (callers from
/// outside have no identity for RBAC to decide by).
fn gateway_chains(
    cx: &Ctx<'_>,
    l: &Listener,
    chains: &[FilterChain],
    default_chain: Option<&FilterChain>,
) -> Result<()> {
    if !l.additional_addresses.is_empty() {
        return Err(cx.err(
            "additional_addresses",
            "a gateway's listener binds its address only",
        ));
    }
    if !l.socket_options.is_empty() {
        return Err(cx.err("socket_options", "not supported"));
    }
    let all = chains
        .iter()
        .map(|c| ("filter_chains", c))
        .chain(default_chain.map(|c| ("default_filter_chain", c)));
    let edge = chains
        .iter()
        .chain(default_chain)
        .any(|c| c.edge_tls.is_some());
    let mut names = std::collections::BTreeSet::new();
    for (i, (at, c)) in all.enumerate() {
        let at = if at == "filter_chains" {
            format!("filter_chains[{i}]")
        } else {
            at.to_string()
        };
        if edge && c.edge_tls.is_none() {
            return Err(cx.err(
                format!("{at}.transport_socket"),
                "a listener that terminates a gateway's TLS does so on every chain",
            ));
        }
        let matched = [
            (c.port.is_some(), "destination_port"),
            (!c.prefixes.is_empty(), "prefix_ranges"),
            (!c.app_protocols.is_empty(), "application_protocols"),
        ];
        cx.refuse_set(
            &format!("{at}.filter_chain_match"),
            matched.map(|(set, field)| {
                (
                    set,
                    field,
                    "a gateway's chains are chosen by TLS server name alone",
                )
            }),
        )?;
        let mine: std::collections::BTreeSet<&String> = c.server_names.iter().collect();
        // A chain naming none takes every name: two would be the same match.
        let key: Vec<String> = if mine.is_empty() {
            vec![String::new()]
        } else {
            mine.into_iter().cloned().collect()
        };
        for n in &key {
            if edge && !names.insert(n.clone()) {
                return Err(cx.err(
                    format!("{at}.filter_chain_match.server_names"),
                    if n.is_empty() {
                        "another chain also matches every server name".to_string()
                    } else {
                        format!("{n:?} is matched by another chain too")
                    },
                ));
            }
        }
        if !c.filter.guard().rbac.is_empty() {
            return Err(cx.err(
                format!("{at}.filters"),
                "RBAC filters are enforced on virtualInbound only, not at a gateway",
            ));
        }
    }
    if !edge && chains.len() + usize::from(default_chain.is_some()) > 1 {
        return Err(cx.err("filter_chains", "a gateway's plaintext port has one chain"));
    }
    Ok(())
}

/// Where a gateway's listener binds: its `address`, on the port its name says.
fn gateway_bind(cx: &Ctx<'_>, l: &Listener, port: u16) -> Result<SocketAddr> {
    if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
        return Err(cx.err("bind_to_port", "a gateway's listener binds its address"));
    }
    let addr = socket_addr(cx, "address", l.address.as_ref())?;
    if addr.port() != port {
        return Err(cx.err(
            "address",
            format!("{addr}: the listener of port {port} binds that port"),
        ));
    }
    Ok(addr)
}

/// An address's listener adds filter chains to the outbound listener for that address alone:
/// it binds nothing, and each chain matches exactly that address and port, so no other traffic
/// can be taken by it.
fn address_listener(
    cx: &Ctx<'_>,
    l: &Listener,
    addr: std::net::SocketAddr,
    chains: &[FilterChain],
    has_default: bool,
) -> Result<()> {
    if l.bind_to_port.as_ref().map(|b| b.value) != Some(false) {
        return Err(cx.err(
            "bind_to_port",
            "a listener of one address must set bind_to_port false",
        ));
    }
    if has_default {
        return Err(cx.err(
            "default_filter_chain",
            "a listener of one address has filter chains only",
        ));
    }
    if !l.listener_filters.is_empty() {
        return Err(cx.err(
            "listener_filters",
            "a listener of one address has filter chains only",
        ));
    }
    let exact = Cidr {
        addr: addr.ip(),
        len: if addr.is_ipv4() { 32 } else { 128 },
    };
    for (i, c) in chains.iter().enumerate() {
        if c.port != Some(addr.port()) || c.prefixes != [exact] {
            return Err(cx.err(
                format!("filter_chains[{i}].filter_chain_match"),
                format!("must match {addr} alone (destination_port and one prefix_ranges entry)"),
            ));
        }
    }
    Ok(())
}

/// A transport socket that terminates mesh TLS: a DownstreamTlsContext requiring a client
/// certificate, with the proxy's own SVID and trust bundle (SDS secrets `default` and
/// `ROOTCA`, served by the proxy itself from mesh-ca) and nothing else.
fn downstream_tls(cx: &Ctx<'_>, at: &str, ts: &TransportSocket) -> Result<()> {
    use mesh_api::consts::xds::{SDS_ROOTS, SDS_SVID};
    let (field, ctx) = tls_context(cx, at, ts)?;
    if ctx.require_client_certificate.map(|b| b.value) != Some(true) {
        return Err(cx.err(
            format!("{field}.require_client_certificate"),
            "mesh TLS is mutual: it must be true",
        ));
    }
    let common = ctx.common_tls_context.unwrap_or_default();
    if !common.tls_certificates.is_empty() {
        return Err(cx.err(
            format!("{field}.common_tls_context.tls_certificates"),
            format!("inline certificates are not supported; the proxy presents its own SVID (SDS secret {SDS_SVID:?})"),
        ));
    }
    for (i, sds) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        if sds.name != SDS_SVID {
            return Err(cx.err(
                format!("{field}.common_tls_context.tls_certificate_sds_secret_configs[{i}].name"),
                format!(
                    "{:?}: only the proxy's own SVID, {SDS_SVID:?}, is supported",
                    sds.name
                ),
            ));
        }
    }
    use common_tls_context::ValidationContextType as V;
    let roots = match &common.validation_context_type {
        None => None,
        Some(V::ValidationContextSdsSecretConfig(sds)) => Some(sds.name.as_str()),
        Some(V::CombinedValidationContext(c)) => c
            .validation_context_sds_secret_config
            .as_ref()
            .map(|s| s.name.as_str()),
        Some(_) => Some(""),
    };
    if let Some(name) = roots
        && name != SDS_ROOTS
    {
        return Err(cx.err(
            format!("{field}.common_tls_context.validation_context"),
            format!("only the mesh trust bundle, SDS secret {SDS_ROOTS:?}, is supported"),
        ));
    }
    Ok(())
}

/// A gateway's TLS: a DownstreamTlsContext presenting certificates of its own, fetched over
/// ADS as SDS Secrets, offering `h2` and `http/1.1` in ALPN, asking clients for no certificate.
fn edge_tls(cx: &Ctx<'_>, at: &str, ts: &TransportSocket) -> Result<EdgeTls> {
    use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
    let (field, ctx) = tls_context(cx, at, ts)?;
    if ctx.require_client_certificate.is_some_and(|b| b.value) {
        return Err(cx.err(
            format!("{field}.require_client_certificate"),
            "client certificates at a gateway are not supported",
        ));
    }
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::downstream_tls_context::SessionTicketKeysType as K;
    let ticket_keys = match &ctx.session_ticket_keys_type {
        None => None,
        Some(K::SessionTicketKeys(_)) => Some("session_ticket_keys"),
        Some(K::SessionTicketKeysSdsSecretConfig(_)) => {
            Some("session_ticket_keys_sds_secret_config")
        }
        // mesh-proxy issues no stateless tickets: `true` says what it does.
        Some(K::DisableStatelessSessionResumption(true)) => None,
        Some(K::DisableStatelessSessionResumption(false)) => {
            Some("disable_stateless_session_resumption")
        }
    };
    let refused = [
        (ctx.require_sni.is_some_and(|b| b.value), "require_sni"),
        (ticket_keys.is_some(), ticket_keys.unwrap_or_default()),
        (ctx.ocsp_staple_policy != 0, "ocsp_staple_policy"),
        (
            ctx.full_scan_certs_on_sni_mismatch.is_some(),
            "full_scan_certs_on_sni_mismatch",
        ),
        (
            ctx.disable_stateful_session_resumption,
            "disable_stateful_session_resumption",
        ),
        (ctx.session_timeout.is_some(), "session_timeout"),
        (ctx.prefer_client_ciphers, "prefer_client_ciphers"),
    ];
    cx.refuse_set(
        &field,
        refused.map(|(set, name)| (set, name, "not supported")),
    )?;
    let common = ctx.common_tls_context.unwrap_or_default();
    let at = format!("{field}.common_tls_context");
    // Deprecated fields still come from control planes that set them: refused by name too.
    #[allow(deprecated)]
    let refused = [
        (
            !common.tls_certificates.is_empty(),
            "tls_certificates",
            "inline certificates are not supported; send them as SDS Secrets over ADS",
        ),
        (
            common.tls_params.is_some(),
            "tls_params",
            "not supported (TLS 1.2 and 1.3, rustls's cipher suites)",
        ),
        (
            common.validation_context_type.is_some(),
            "validation_context",
            "client certificates at a gateway are not supported",
        ),
        (
            common.tls_certificate_provider_instance.is_some(),
            "tls_certificate_provider_instance",
            "not supported",
        ),
        (
            common.custom_handshaker.is_some(),
            "custom_handshaker",
            "not supported",
        ),
        (
            common.custom_tls_certificate_selector.is_some(),
            "custom_tls_certificate_selector",
            "not supported (the first certificate whose key signs with a scheme the client offers is presented)",
        ),
        (
            common.tls_certificate_certificate_provider.is_some(),
            "tls_certificate_certificate_provider",
            "not supported",
        ),
        (
            common
                .tls_certificate_certificate_provider_instance
                .is_some(),
            "tls_certificate_certificate_provider_instance",
            "not supported",
        ),
        (common.key_log.is_some(), "key_log", "not supported"),
    ];
    cx.refuse_set(&at, refused)?;
    let mut certificates = Vec::new();
    for (i, sds) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        let field = format!("{at}.tls_certificate_sds_secret_configs[{i}]");
        let ads = sds
            .sds_config
            .as_ref()
            .and_then(|c| c.config_source_specifier.as_ref())
            .is_some_and(|s| matches!(s, ConfigSourceSpecifier::Ads(_)));
        if !ads {
            return Err(cx.err(
                format!("{field}.sds_config"),
                "a gateway's certificates come over ADS",
            ));
        }
        if sds.name.is_empty() {
            return Err(cx.err(format!("{field}.name"), "empty"));
        }
        certificates.push(sds.name.clone());
    }
    if certificates.is_empty() {
        return Err(cx.err(
            format!("{at}.tls_certificate_sds_secret_configs"),
            "no certificate to present",
        ));
    }
    for (i, p) in common.alpn_protocols.iter().enumerate() {
        if !matches!(p.as_str(), "h2" | "http/1.1" | "http/1.0") {
            return Err(cx.err(
                format!("{at}.alpn_protocols[{i}]"),
                format!("{p:?} is not served (supported: h2, http/1.1, http/1.0)"),
            ));
        }
    }
    Ok(EdgeTls {
        certificates,
        alpn: common.alpn_protocols.clone(),
    })
}

/// A DownstreamTlsContext transport socket's context, and the field it is at.
fn tls_context(
    cx: &Ctx<'_>,
    at: &str,
    ts: &TransportSocket,
) -> Result<(String, DownstreamTlsContext)> {
    use mesh_api::consts::xds::TLS_TRANSPORT_SOCKET;
    if ts.name != TLS_TRANSPORT_SOCKET {
        return Err(cx.err(
            format!("{at}.name"),
            format!(
                "{:?} is not supported (supported: {TLS_TRANSPORT_SOCKET})",
                ts.name
            ),
        ));
    }
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        return Err(cx.err(format!("{at}.typed_config"), "missing"));
    };
    let field = format!("{at}.typed_config");
    if any.type_url != DownstreamTlsContext::type_url() {
        return Err(cx.err(
            &field,
            format!("expected a DownstreamTlsContext, got {}", any.type_url),
        ));
    }
    let ctx: DownstreamTlsContext = decode(cx, &field, any)?;
    Ok((field, ctx))
}

/// Converts a filter chain; `gateway`: of a gateway's listener, whose TLS chains present the
/// gateway's certificates (not mesh TLS) and may match server names.
fn filter_chain(cx: &Ctx<'_>, at: &str, c: &PbFilterChain, gateway: bool) -> Result<FilterChain> {
    let (terminate_tls, edge) = match &c.transport_socket {
        Some(ts) if gateway => (
            false,
            Some(Arc::new(edge_tls(
                cx,
                &format!("{at}.transport_socket"),
                ts,
            )?)),
        ),
        Some(ts) => {
            downstream_tls(cx, &format!("{at}.transport_socket"), ts)?;
            (true, None)
        }
        None => (false, None),
    };
    let m = c.filter_chain_match.clone().unwrap_or_default();
    let server_names = server_names(cx, at, &m.server_names, gateway)?;
    let unsupported = [
        (!m.source_prefix_ranges.is_empty(), "source_prefix_ranges"),
        (
            !m.direct_source_prefix_ranges.is_empty(),
            "direct_source_prefix_ranges",
        ),
        (!m.source_ports.is_empty(), "source_ports"),
        (m.source_type != 0, "source_type"),
        (!m.address_suffix.is_empty(), "address_suffix"),
        (
            !matches!(m.transport_protocol.as_str(), "" | "raw_buffer" | "tls"),
            "transport_protocol",
        ),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(cx.err(
            format!("{at}.filter_chain_match.{field}"),
            "this match criterion is not supported",
        ));
    }
    let port = m
        .destination_port
        .map(|p| {
            u16::try_from(p.value).map_err(|_| {
                cx.err(
                    format!("{at}.filter_chain_match.destination_port"),
                    format!("{} is not a port", p.value),
                )
            })
        })
        .transpose()?;
    let prefixes = m
        .prefix_ranges
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("{at}.filter_chain_match.prefix_ranges[{i}]");
            let addr: IpAddr = r.address_prefix.parse().map_err(|_| {
                cx.err(
                    &field,
                    format!("{:?} is not an IP address", r.address_prefix),
                )
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = r.prefix_len.map_or(0, |l| l.value);
            if len > max {
                return Err(cx.err(&field, format!("prefix length {len} is over {max}")));
            }
            Ok(Cidr {
                addr,
                len: len as u8,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let transport = match m.transport_protocol.as_str() {
        "raw_buffer" => Transport::Raw,
        "tls" => Transport::Tls,
        _ => Transport::Any,
    };
    if (terminate_tls || edge.is_some()) && transport != Transport::Tls {
        return Err(cx.err(
            format!("{at}.filter_chain_match.transport_protocol"),
            "a chain that terminates TLS must match transport_protocol \"tls\"",
        ));
    }
    if !server_names.is_empty() && edge.is_none() {
        return Err(cx.err(
            format!("{at}.filter_chain_match.server_names"),
            "only a chain that terminates a gateway's TLS matches server names",
        ));
    }
    let app_protocols = m
        .application_protocols
        .iter()
        .enumerate()
        .map(|(i, p)| match p.as_str() {
            "http/1.1" | "http/1.0" => Ok(Detected::Http1),
            // `h2c` is detected in plaintext, `h2` negotiated in ALPN: both are HTTP/2.
            "h2c" | "h2" => Ok(Detected::H2c),
            other => Err(cx.err(
                format!("{at}.filter_chain_match.application_protocols[{i}]"),
                format!("{other:?} cannot be detected (supported: http/1.1, h2c, h2)"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let Some((last, rbac_filters)) = c.filters.split_last() else {
        return Err(cx.err(format!("{at}.filters"), "no network filter"));
    };
    let mut rbac = Vec::new();
    for (i, f) in rbac_filters.iter().enumerate() {
        let field = format!("{at}.filters[{i}].typed_config");
        let any = match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) if any.type_url == NetRbac::type_url() => {
                any
            }
            _ => {
                return Err(cx.err(
                    field,
                    "before the terminal filter (http_connection_manager or tcp_proxy), only network RBAC filters are supported",
                ));
            }
        };
        let r: NetRbac = decode(cx, &field, any)?;
        if let Some(r) = policy::rbac(cx, &field, r.rules.as_ref(), r.matcher.is_some())? {
            rbac.push(r);
        }
    }
    let filter = network_filter(
        cx,
        &format!("{at}.filters[{}]", rbac_filters.len()),
        last,
        Guard {
            rbac,
            rate_limit: None,
        },
    )?;
    Ok(FilterChain {
        name: c.name.clone(),
        prefixes,
        port,
        transport,
        terminate_tls,
        server_names,
        edge_tls: edge,
        app_protocols,
        filter,
    })
}

/// A gateway chain's TLS server names: host names or `*.suffix` wildcards, lowercase.
fn server_names(cx: &Ctx<'_>, at: &str, names: &[String], gateway: bool) -> Result<Vec<String>> {
    if !names.is_empty() && !gateway {
        return Err(cx.err(
            format!("{at}.filter_chain_match.server_names"),
            "matched on a gateway's listeners only",
        ));
    }
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let host = n.strip_prefix("*.").unwrap_or(n);
            let valid = !host.is_empty()
                && host.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if valid {
                Ok(n.to_ascii_lowercase())
            } else {
                Err(cx.err(
                    format!("{at}.filter_chain_match.server_names[{i}]"),
                    format!("{n:?} is not a host name or a *.suffix wildcard"),
                ))
            }
        })
        .collect()
}

/// The terminal filter, enforcing `guard` (the network RBAC filters before it) and, for HTTP,
/// the HTTP filters' policies after it.
fn network_filter(cx: &Ctx<'_>, at: &str, f: &Filter, mut guard: Guard) -> Result<NetworkFilter> {
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        return Err(cx.err(format!("{at}.typed_config"), "missing"));
    };
    let field = format!("{at}.typed_config");
    if any.type_url == HttpConnectionManager::type_url() {
        let hcm: HttpConnectionManager = decode(cx, &field, any)?;
        let route = match &hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                rds.route_config_name.clone()
            }
            _ => {
                return Err(cx.err(
                    format!("{field}.route_specifier"),
                    "only rds is supported (inline and scoped routes are not)",
                ));
            }
        };
        let mut faults = false;
        for (i, h) in hcm.http_filters.iter().enumerate() {
            let at = format!("{field}.http_filters[{i}].typed_config");
            let typed = match &h.config_type {
                Some(http_filter::ConfigType::TypedConfig(a)) => Some(a),
                _ => None,
            };
            match typed {
                Some(a)
                    if a.type_url
                        .ends_with("envoy.extensions.filters.http.router.v3.Router") => {}
                Some(a) if a.type_url == HttpRbac::type_url() => {
                    let r: HttpRbac = decode(cx, &at, a)?;
                    if r.shadow_rules.is_some() || r.shadow_matcher.is_some() {
                        return Err(cx.err(&at, "shadow rules are not supported"));
                    }
                    if let Some(r) = policy::rbac(cx, &at, r.rules.as_ref(), r.matcher.is_some())? {
                        guard.rbac.push(r);
                    }
                }
                Some(a) if a.type_url == HttpFault::type_url() => {
                    fault::chain_filter(cx, &at, a)?;
                    faults = true;
                }
                Some(a) if a.type_url == LocalRateLimit::type_url() => {
                    let l: LocalRateLimit = decode(cx, &at, a)?;
                    if guard.rate_limit.is_some() {
                        return Err(cx.err(&at, "only one local rate limit filter is supported"));
                    }
                    guard.rate_limit = policy::local_rate_limit(cx, &at, &l)?;
                }
                _ if h.is_optional => {}
                _ => {
                    return Err(cx.err(
                        format!("{field}.http_filters[{i}]"),
                        format!("unsupported HTTP filter {:?}", h.name),
                    ));
                }
            }
        }
        Ok(NetworkFilter::Http {
            route,
            guard: Arc::new(guard),
            faults,
            paths: path_rules(cx, &field, &hcm)?,
            remote_address: hcm.use_remote_address.is_some_and(|b| b.value),
        })
    } else if any.type_url == TcpProxy::type_url() {
        let tcp: TcpProxy = decode(cx, &field, any)?;
        match tcp.cluster_specifier {
            Some(tcp_proxy::ClusterSpecifier::Cluster(cluster)) => Ok(NetworkFilter::Tcp {
                cluster,
                guard: Arc::new(guard),
            }),
            _ => Err(cx.err(
                format!("{field}.cluster_specifier"),
                "only a single cluster is supported",
            )),
        }
    } else {
        Err(cx.err(
            field,
            format!("unsupported network filter {} ({:?})", any.type_url, f.name),
        ))
    }
}

/// An HTTP connection manager's path handling; mesh-proxy normalizes and merges slashes in one
/// step, so it takes both or neither.
fn path_rules(cx: &Ctx<'_>, at: &str, hcm: &HttpConnectionManager) -> Result<PathRules> {
    use http_connection_manager::PathWithEscapedSlashesAction as A;
    let refused = [
        (
            hcm.xff_num_trusted_hops != 0,
            "xff_num_trusted_hops",
            "not supported: with use_remote_address the client is the connection's peer",
        ),
        (hcm.skip_xff_append, "skip_xff_append", "not supported"),
        (
            hcm.forward_client_cert_details != 0,
            "forward_client_cert_details",
            "only SANITIZE: the inbound side sets x-forwarded-client-cert itself, and a gateway drops a client's",
        ),
    ];
    cx.refuse_set(at, refused)?;
    let normalize = hcm.normalize_path.is_some_and(|b| b.value);
    if normalize != hcm.merge_slashes {
        return Err(cx.err(
            format!("{at}.merge_slashes"),
            "mesh-proxy merges slashes as it normalizes a path: set normalize_path and merge_slashes together",
        ));
    }
    let escaped_slashes = match A::try_from(hcm.path_with_escaped_slashes_action) {
        Ok(A::ImplementationSpecificDefault | A::KeepUnchanged) => EscapedSlashes::Keep,
        Ok(A::RejectRequest) => EscapedSlashes::Reject,
        Ok(A::UnescapeAndRedirect) => EscapedSlashes::UnescapeAndRedirect,
        Ok(A::UnescapeAndForward) => EscapedSlashes::UnescapeAndForward,
        Err(_) => {
            return Err(cx.err(
                format!("{at}.path_with_escaped_slashes_action"),
                format!("{} is not an action", hcm.path_with_escaped_slashes_action),
            ));
        }
    };
    if normalize && escaped_slashes == EscapedSlashes::Keep {
        return Err(cx.err(
            format!("{at}.path_with_escaped_slashes_action"),
            "with normalize_path, say what happens to %2F and %5C (REJECT_REQUEST, UNESCAPE_AND_REDIRECT or UNESCAPE_AND_FORWARD): mesh-proxy does not normalize around them",
        ));
    }
    Ok(PathRules {
        normalize,
        escaped_slashes,
    })
}

/// A gateway's certificate: an SDS Secret holding a `tls_certificate` with its chain and key
/// inline (PEM).
pub fn secret(
    sec: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> Result<super::ServerCert> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type as T;
    let cx = Ctx {
        kind: "Secret",
        name: &sec.name,
    };
    let Some(T::TlsCertificate(tc)) = &sec.r#type else {
        return Err(cx.err(
            "tls_certificate",
            "mesh-proxy takes only certificates (with their key) as Secrets",
        ));
    };
    let inline =
        |field: &str, d: Option<&envoy_types::pb::envoy::config::core::v3::DataSource>| match d
            .and_then(|d| d.specifier.as_ref())
        {
            Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
            Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone())
                .map_err(|_| cx.err(format!("tls_certificate.{field}"), "not PEM text")),
            _ => Err(cx.err(
                format!("tls_certificate.{field}"),
                "expected inline PEM (inline_string or inline_bytes)",
            )),
        };
    let refused = [
        (tc.pkcs12.is_some(), "pkcs12"),
        (tc.watched_directory.is_some(), "watched_directory"),
        (tc.private_key_provider.is_some(), "private_key_provider"),
        (tc.password.is_some(), "password"),
        (tc.ocsp_staple.is_some(), "ocsp_staple"),
        (
            !tc.signed_certificate_timestamp.is_empty(),
            "signed_certificate_timestamp",
        ),
    ];
    cx.refuse_set(
        "tls_certificate",
        refused.map(|(set, name)| {
            (
                set,
                name,
                "not supported (a PEM chain and an unencrypted PEM key)",
            )
        }),
    )?;
    let chain = inline("certificate_chain", tc.certificate_chain.as_ref())?;
    let key = inline("private_key", tc.private_key.as_ref())?;
    let certified =
        mesh_api::tls::server_certified_key(&chain, &key, ["certificate_chain", "private_key"])
            .map_err(|e| cx.err("tls_certificate", e))?;
    let fingerprint = certified
        .cert
        .first()
        .map(|c| mesh_api::tls::fingerprint(c))
        .unwrap_or_default();
    let whole: Vec<u8> = certified.cert.iter().flat_map(|c| c.to_vec()).collect();
    Ok(super::ServerCert {
        fingerprint,
        chain: mesh_api::tls::fingerprint(&whole),
        key: Arc::new(certified),
    })
}

// ---- routes ------------------------------------------------------------------------------------

/// A RouteConfiguration's virtual hosts as converted, by their encoding: what its next version
/// reuses, so that a change to one virtual host converts that one alone.
/// (Hashed with foldhash: SipHash over the megabytes of a large configuration took longer than
/// converting what changed.)
pub type VhostMemo = HashMap<Box<[u8]>, Arc<VirtualHost>, foldhash::fast::RandomState>;

/// A decoded RouteConfiguration as a table, every virtual host converted (what
/// [`route_table_reusing`] must agree with: the fuzz target compares them).
pub fn route_table(rc: &RouteConfiguration) -> Result<RouteTable> {
    let cx = Ctx {
        kind: "RouteConfiguration",
        name: &rc.name,
    };
    let vhosts = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| vhost(&cx, &format!("virtual_hosts[{i}]"), vh).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    route_table_of(&cx, rc, vhosts, None)
}

/// The RouteConfiguration encoded in `bytes` as a table, and the memo of its virtual hosts for
/// the next version. A virtual host encoded as in `memo` (the previous version's, taken: an
/// error leaves none, and the next version is converted in full) is moved from there without
/// being decoded: the controller encodes an unchanged one to the same bytes, so a change to one
/// Service's routes costs that Service's conversion, not the port's (10,000 virtual hosts
/// take about 70 ms to convert). The table shares `previous`'s domain index where the domains
/// at each position are the same ([`RouteTable::new_after`]).
/// `name` is the resource's, for an error in decoding it.
pub fn route_table_reusing(
    name: &str,
    bytes: &[u8],
    mut memo: VhostMemo,
    previous: Option<&RouteTable>,
) -> Result<(RouteTable, VhostMemo)> {
    let undecodable = |e: prost::DecodeError| ConvertError {
        kind: "RouteConfiguration",
        name: name.to_owned(),
        field: "resource".into(),
        problem: format!("cannot decode: {e}"),
    };
    let (rest, raw_vhosts) = split_vhosts(bytes).map_err(undecodable)?;
    let rc = RouteConfiguration::decode(rest.as_slice()).map_err(undecodable)?;
    let cx = Ctx {
        kind: "RouteConfiguration",
        name: &rc.name,
    };
    let mut next = VhostMemo::with_capacity_and_hasher(raw_vhosts.len(), Default::default());
    let mut vhosts = Vec::with_capacity(raw_vhosts.len());
    for (i, raw) in raw_vhosts.into_iter().enumerate() {
        let vh = if let Some((key, vh)) = memo.remove_entry(raw.body) {
            next.insert(key, vh.clone());
            vh
        } else if let Some(vh) = next.get(raw.body) {
            // The same virtual host twice in this version.
            vh.clone()
        } else {
            let at = format!("virtual_hosts[{i}]");
            let pb = PbVhost::decode_length_delimited(raw.with_len)
                .map_err(|e| cx.err(&at, format!("cannot decode: {e}")))?;
            let vh = Arc::new(vhost(&cx, &at, &pb)?);
            next.insert(raw.body.into(), vh.clone());
            vh
        };
        vhosts.push(vh);
    }
    route_table_of(&cx, &rc, vhosts, previous).map(|t| (t, next))
}

/// A RouteConfiguration's encoding split into its virtual hosts' encodings (field 2) and the
/// rest. Walks the wire format with prost's own decoding functions (what its generated code
/// calls), so the virtual hosts are found without decoding them.
fn split_vhosts(
    bytes: &[u8],
) -> std::result::Result<(Vec<u8>, Vec<RawVhost<'_>>), prost::DecodeError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    const VIRTUAL_HOSTS: u32 = 2;
    let mut buf = bytes;
    let mut rest = Vec::new();
    let mut vhosts = Vec::new();
    while !buf.is_empty() {
        let field = buf;
        let (tag, wire) = decode_key(&mut buf)?;
        if tag == VIRTUAL_HOSTS && wire == WireType::LengthDelimited {
            let with_len = buf;
            // Checks the length against what is left, and moves `buf` past the field.
            skip_field(wire, tag, &mut buf, DecodeContext::default())?;
            let mut body = with_len;
            decode_varint(&mut body)?;
            let end = with_len.len() - buf.len();
            vhosts.push(RawVhost {
                with_len: &with_len[..end],
                body: &body[..body.len() - buf.len()],
            });
        } else {
            skip_field(wire, tag, &mut buf, DecodeContext::default())?;
            rest.extend_from_slice(&field[..field.len() - buf.len()]);
        }
    }
    Ok((rest, vhosts))
}

/// One virtual host's encoding inside a RouteConfiguration's.
struct RawVhost<'a> {
    /// With its length in front: decoded as a field of the configuration is (one level of
    /// nesting deeper, as far as prost's recursion limit goes), so that the split refuses
    /// exactly what a whole decode refuses.
    with_len: &'a [u8],
    /// Its own bytes: the memo's key.
    body: &'a [u8],
}

/// The name of the RouteConfiguration encoded in `bytes`, without decoding its virtual hosts
/// (state-of-the-world responses carry names only inside resources).
pub fn route_config_name(bytes: &[u8]) -> std::result::Result<String, prost::DecodeError> {
    let (rest, _) = split_vhosts(bytes)?;
    RouteConfiguration::decode(rest.as_slice()).map(|rc| rc.name)
}

fn route_table_of(
    cx: &Ctx<'_>,
    rc: &RouteConfiguration,
    vhosts: Vec<Arc<VirtualHost>>,
    previous: Option<&RouteTable>,
) -> Result<RouteTable> {
    let headers = header_ops(
        cx,
        "",
        &rc.request_headers_to_add,
        &rc.request_headers_to_remove,
        &rc.response_headers_to_add,
        &rc.response_headers_to_remove,
    )?;
    let mut table = RouteTable::new_after(rc.name.clone(), vhosts, headers, previous);
    table.ignore_port = rc.ignore_port_in_host_matching;
    Ok(table)
}

fn vhost(cx: &Ctx<'_>, at: &str, vh: &PbVhost) -> Result<VirtualHost> {
    if vh.require_tls != 0 {
        return Err(cx.err(format!("{at}.require_tls"), "not supported"));
    }
    if let Some(name) = vh
        .typed_per_filter_config
        .iter()
        .find(|(_, any)| !fault::is_optional(any))
        .map(|(name, _)| name)
    {
        return Err(cx.err(
            format!("{at}.typed_per_filter_config[{name:?}]"),
            "not supported on a virtual host (set it per route, or mark it optional)",
        ));
    }
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_entry(cx, &format!("{at}.routes[{i}]"), r))
        .collect::<Result<Vec<_>>>()?;
    Ok(VirtualHost {
        name: vh.name.clone(),
        domains: vh.domains.clone(),
        routes,
        headers: header_ops(
            cx,
            &format!("{at}."),
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
        )?,
    })
}

fn route_entry(cx: &Ctx<'_>, at: &str, r: &PbRoute) -> Result<Route> {
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| cx.err(format!("{at}.match"), "missing"))?;
    let mat = &format!("{at}.match");
    let case_sensitive = m.case_sensitive.is_none_or(|b| b.value);
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::PathSeparatedPrefix(p)) => {
            PathMatch::SeparatedPrefix(p.clone())
        }
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            PathMatch::Regex(full_regex(cx, &format!("{mat}.safe_regex"), re)?)
        }
        Some(_) => {
            return Err(cx.err(
                format!("{mat}.path_specifier"),
                "supported: prefix, path, path_separated_prefix, safe_regex",
            ));
        }
        None => return Err(cx.err(format!("{mat}.path_specifier"), "missing")),
    };
    let unsupported = [
        (m.runtime_fraction.is_some(), "runtime_fraction"),
        (!m.cookies.is_empty(), "cookies"),
        (m.tls_context.is_some(), "tls_context"),
        (!m.dynamic_metadata.is_empty(), "dynamic_metadata"),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(cx.err(format!("{mat}.{field}"), "not supported"));
    }
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_match(cx, &format!("{mat}.headers[{i}]"), h))
        .collect::<Result<Vec<_>>>()?;
    let query = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let field = format!("{mat}.query_parameters[{i}]");
            let value = match &q.query_parameter_match_specifier {
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)) => {
                    ValueMatch::Str(str_match(cx, &format!("{field}.string_match"), s)?)
                }
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(b)) => {
                    ValueMatch::Present(*b)
                }
                None => ValueMatch::Present(true),
            };
            Ok(QueryMatch {
                name: q.name.clone(),
                value,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let matcher = RouteMatch {
        path,
        case_sensitive,
        headers,
        query,
        grpc: m.grpc.is_some(),
    };
    let action = match &r.action {
        Some(route::Action::Route(a)) => {
            Action::Forward(Box::new(forward(cx, &format!("{at}.route"), a, &matcher)?))
        }
        Some(route::Action::Redirect(rd)) => {
            Action::Redirect(redirect(cx, &format!("{at}.redirect"), rd, &matcher)?)
        }
        Some(route::Action::DirectResponse(d)) => {
            let status = u16::try_from(d.status)
                .ok()
                .filter(|s| (100..600).contains(s))
                .ok_or_else(|| {
                    cx.err(
                        format!("{at}.direct_response.status"),
                        format!("{} is not an HTTP status", d.status),
                    )
                })?;
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(data_source::Specifier::InlineString(s)) => s.clone(),
                Some(data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8_lossy(b).into_owned()
                }
                Some(_) => {
                    return Err(cx.err(
                        format!("{at}.direct_response.body"),
                        "only inline bodies are supported",
                    ));
                }
            };
            Action::Direct { status, body }
        }
        _ => {
            return Err(cx.err(
                format!("{at}.action"),
                "supported: route, redirect, direct_response",
            ));
        }
    };
    Ok(Route {
        name: r.name.clone(),
        matcher,
        action,
        headers: header_ops(
            cx,
            &format!("{at}."),
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        )?,
        fault: fault::per_route(cx, at, &r.typed_per_filter_config)?,
    })
}

/// The prefix a route's path match fixes, for prefix rewrites.
fn matched_prefix(m: &RouteMatch) -> Option<String> {
    match &m.path {
        PathMatch::Prefix(p) | PathMatch::Exact(p) | PathMatch::SeparatedPrefix(p) => {
            Some(p.clone())
        }
        PathMatch::Regex(_) => None,
    }
}

fn forward(
    cx: &Ctx<'_>,
    at: &str,
    a: &envoy_types::pb::envoy::config::route::v3::RouteAction,
    m: &RouteMatch,
) -> Result<Forward> {
    let backends = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => vec![WeightedBackend {
            cluster: c.clone(),
            weight: 1,
            headers: HeaderOps::default(),
            metrics: Default::default(),
        }],
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let field = format!("{at}.weighted_clusters.clusters[{i}]");
                if c.name.is_empty() {
                    return Err(cx.err(format!("{field}.name"), "empty cluster name"));
                }
                Ok(WeightedBackend {
                    cluster: c.name.clone(),
                    weight: c.weight.map_or(0, |w| w.value),
                    headers: header_ops(
                        cx,
                        &format!("{field}."),
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    )?,
                    metrics: Default::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?,
        _ => {
            return Err(cx.err(
                format!("{at}.cluster_specifier"),
                "supported: cluster, weighted_clusters",
            ));
        }
    };
    let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
    let hash = a
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, h)| hash_policy(cx, &format!("{at}.hash_policy[{i}]"), h))
        .collect::<Result<Vec<_>>>()?;
    let unsupported = [
        (a.hedge_policy.is_some(), "hedge_policy"),
        (a.path_rewrite_policy.is_some(), "path_rewrite_policy"),
        (
            a.retry_policy_typed_config.is_some(),
            "retry_policy_typed_config",
        ),
    ];
    if let Some((_, field)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(cx.err(format!("{at}.{field}"), "not supported"));
    }
    // Envoy's default route timeout is 15 s; zero disables it.
    let timeout = match dur(cx, &format!("{at}.timeout"), a.timeout.as_ref())? {
        None => Some(Duration::from_secs(15)),
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
    };
    let retry = a
        .retry_policy
        .as_ref()
        .map(|p| retry_policy(cx, &format!("{at}.retry_policy"), p))
        .transpose()?
        .filter(|p| p.attempts > 0 || p.per_try_timeout.is_some());
    let mirrors = a
        .request_mirror_policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let per_million = match p
                .runtime_fraction
                .as_ref()
                .and_then(|f| f.default_value.as_ref())
            {
                None => 1_000_000,
                Some(f) => {
                    let field = format!("{at}.request_mirror_policies[{i}].runtime_fraction");
                    let (numerator, whole) = fraction(cx, field, f)?;
                    numerator.saturating_mul(1_000_000 / whole).min(1_000_000)
                }
            };
            Ok(Mirror {
                cluster: p.cluster.clone(),
                per_million,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let regex_rewrite = a
        .regex_rewrite
        .as_ref()
        .map(|r| {
            let field = format!("{at}.regex_rewrite");
            let re = r
                .pattern
                .as_ref()
                .ok_or_else(|| cx.err(format!("{field}.pattern"), "missing"))?;
            let re = Regex::new(&re.regex)
                .map_err(|e| cx.err(format!("{field}.pattern.regex"), format!("invalid: {e}")))?;
            Ok((re, envoy_substitution(&r.substitution)))
        })
        .transpose()?;
    let host_rewrite = match &a.host_rewrite_specifier {
        None => None,
        Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
        Some(_) => {
            return Err(cx.err(
                format!("{at}.host_rewrite_specifier"),
                "only host_rewrite_literal is supported",
            ));
        }
    };
    Ok(Forward {
        matched_prefix: matched_prefix(m),
        backends,
        total_weight,
        timeout,
        retry,
        hash,
        mirrors,
        prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
        regex_rewrite,
        host_rewrite,
        draws: Default::default(),
    })
}

/// One `hash_policy`: a header (without `regex_rewrite`), a cookie (without attributes), or
/// the source IP.
fn hash_policy(cx: &Ctx<'_>, at: &str, h: &route_action::HashPolicy) -> Result<HashPolicy> {
    use route_action::hash_policy::PolicySpecifier as P;
    let terminal = h.terminal;
    match &h.policy_specifier {
        Some(P::Header(hd)) if hd.regex_rewrite.is_none() => {
            let name = HeaderName::from_bytes(hd.header_name.to_ascii_lowercase().as_bytes())
                .map_err(|_| {
                    cx.err(
                        format!("{at}.header.header_name"),
                        format!("{:?} is not a header name", hd.header_name),
                    )
                })?;
            Ok(HashPolicy::Header { name, terminal })
        }
        Some(P::Cookie(c)) if c.attributes.is_empty() => Ok(HashPolicy::Cookie {
            name: c.name.clone(),
            ttl: dur(cx, &format!("{at}.cookie.ttl"), c.ttl.as_ref())?,
            path: (!c.path.is_empty()).then(|| c.path.clone()),
            terminal,
        }),
        Some(P::ConnectionProperties(p)) if p.source_ip => Ok(HashPolicy::SourceIp { terminal }),
        _ => Err(cx.err(
            at,
            "supported: header (without regex_rewrite), cookie (without attributes), \
             connection_properties.source_ip",
        )),
    }
}

/// Envoy writes capture groups as `\1`; the regex crate as `${1}`.
fn envoy_substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

fn retry_policy(cx: &Ctx<'_>, at: &str, p: &PbRetry) -> Result<RetryPolicy> {
    let mut policy = RetryPolicy {
        attempts: p.num_retries.map_or(1, |n| n.value),
        on_5xx: false,
        on_gateway_error: false,
        on_connect_failure: false,
        on_reset: false,
        on_refused_stream: false,
        codes: Vec::new(),
        grpc_statuses: Vec::new(),
        per_try_timeout: dur(
            cx,
            &format!("{at}.per_try_timeout"),
            p.per_try_timeout.as_ref(),
        )?
        .filter(|d| !d.is_zero()),
        backoff_base: Duration::from_millis(25),
        backoff_max: Duration::from_millis(250),
    };
    for token in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        match token {
            "5xx" => policy.on_5xx = true,
            "gateway-error" => policy.on_gateway_error = true,
            "connect-failure" => policy.on_connect_failure = true,
            "reset" | "reset-before-request" => policy.on_reset = true,
            "refused-stream" => policy.on_refused_stream = true,
            "retriable-status-codes" => {}
            "cancelled" => policy.grpc_statuses.push(1),
            "deadline-exceeded" => policy.grpc_statuses.push(4),
            "resource-exhausted" => policy.grpc_statuses.push(8),
            "internal" => policy.grpc_statuses.push(13),
            "unavailable" => policy.grpc_statuses.push(14),
            other => {
                return Err(cx.err(
                    format!("{at}.retry_on"),
                    format!(
                        "{other:?} is not supported (supported: 5xx, gateway-error, \
                         connect-failure, reset, refused-stream, retriable-status-codes, \
                         cancelled, deadline-exceeded, resource-exhausted, internal, \
                         unavailable)"
                    ),
                ));
            }
        }
    }
    if p.retry_on.contains("retriable-status-codes") {
        policy.codes = p
            .retriable_status_codes
            .iter()
            .map(|&c| {
                u16::try_from(c)
                    .ok()
                    .filter(|c| (100..600).contains(c))
                    .ok_or_else(|| {
                        cx.err(
                            format!("{at}.retriable_status_codes"),
                            format!("{c} is not an HTTP status"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
    }
    if let Some(b) = &p.retry_back_off {
        if let Some(base) = dur(
            cx,
            &format!("{at}.retry_back_off.base_interval"),
            b.base_interval.as_ref(),
        )? {
            policy.backoff_base = base;
            policy.backoff_max = base * 10;
        }
        if let Some(max) = dur(
            cx,
            &format!("{at}.retry_back_off.max_interval"),
            b.max_interval.as_ref(),
        )? {
            policy.backoff_max = max;
        }
    }
    if !p.retriable_headers.is_empty() || !p.retriable_request_headers.is_empty() {
        return Err(cx.err(format!("{at}.retriable_headers"), "not supported"));
    }
    // mesh-proxy always sends a retry to another endpoint when there is one: Envoy's
    // previous-hosts predicate is what it does, any other is refused.
    for (i, h) in p.retry_host_predicate.iter().enumerate() {
        if h.name != "envoy.retry_host_predicates.previous_hosts" {
            return Err(cx.err(
                format!("{at}.retry_host_predicate[{i}]"),
                format!(
                    "{:?} is not supported (supported: envoy.retry_host_predicates.previous_hosts)",
                    h.name
                ),
            ));
        }
    }
    if p.retry_priority.is_some() {
        return Err(cx.err(format!("{at}.retry_priority"), "not supported"));
    }
    Ok(policy)
}

fn redirect(cx: &Ctx<'_>, at: &str, r: &RedirectAction, m: &RouteMatch) -> Result<Redirect> {
    let status = match redirect_action::RedirectResponseCode::try_from(r.response_code) {
        Ok(redirect_action::RedirectResponseCode::MovedPermanently) => 301,
        Ok(redirect_action::RedirectResponseCode::Found) => 302,
        Ok(redirect_action::RedirectResponseCode::SeeOther) => 303,
        Ok(redirect_action::RedirectResponseCode::TemporaryRedirect) => 307,
        Ok(redirect_action::RedirectResponseCode::PermanentRedirect) => 308,
        Err(_) => {
            return Err(cx.err(
                format!("{at}.response_code"),
                format!("unknown code {}", r.response_code),
            ));
        }
    };
    let scheme = match &r.scheme_rewrite_specifier {
        None => None,
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
        Some(redirect_action::SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => Some(s.clone()),
    };
    let (path, prefix_rewrite) = match &r.path_rewrite_specifier {
        None => (None, None),
        Some(redirect_action::PathRewriteSpecifier::PathRedirect(p)) => (Some(p.clone()), None),
        Some(redirect_action::PathRewriteSpecifier::PrefixRewrite(p)) => (None, Some(p.clone())),
        Some(_) => {
            return Err(cx.err(
                format!("{at}.regex_rewrite"),
                "regex redirects are not supported",
            ));
        }
    };
    let port = match r.port_redirect {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| cx.err(format!("{at}.port_redirect"), format!("{p} is not a port")))?,
        ),
    };
    Ok(Redirect {
        scheme,
        host: (!r.host_redirect.is_empty()).then(|| r.host_redirect.clone()),
        port,
        path,
        prefix_rewrite,
        status,
        matched_prefix: matched_prefix(m),
    })
}

/// Envoy's safe_regex must match the whole value.
fn full_regex(cx: &Ctx<'_>, field: &str, re: &RegexMatcher) -> Result<Regex> {
    Regex::new(&format!("^(?:{})$", re.regex)).map_err(|e| {
        cx.err(
            format!("{field}.regex"),
            format!("invalid regex {:?}: {e}", re.regex),
        )
    })
}

fn str_match(cx: &Ctx<'_>, at: &str, s: &StringMatcher) -> Result<StrMatch> {
    let kind = match &s.match_pattern {
        Some(string_matcher::MatchPattern::Exact(v)) => StrKind::Exact(v.clone()),
        Some(string_matcher::MatchPattern::Prefix(v)) => StrKind::Prefix(v.clone()),
        Some(string_matcher::MatchPattern::Suffix(v)) => StrKind::Suffix(v.clone()),
        Some(string_matcher::MatchPattern::Contains(v)) => StrKind::Contains(v.clone()),
        Some(string_matcher::MatchPattern::SafeRegex(re)) => {
            let re = if s.ignore_case {
                RegexMatcher {
                    regex: format!("(?i:{})", re.regex),
                    ..re.clone()
                }
            } else {
                re.clone()
            };
            StrKind::Regex(full_regex(cx, &format!("{at}.safe_regex"), &re)?)
        }
        _ => return Err(cx.err(at, "supported: exact, prefix, suffix, contains, safe_regex")),
    };
    Ok(StrMatch {
        kind,
        ignore_case: s.ignore_case,
    })
}

#[allow(deprecated)] // The deprecated matchers are still sent by some control planes.
fn header_match(cx: &Ctx<'_>, at: &str, h: &HeaderMatcher) -> Result<HeaderMatch> {
    let name = if h.name == ":method" {
        HeaderTarget::Method
    } else {
        HeaderTarget::Header(
            HeaderName::try_from(h.name.to_ascii_lowercase()).map_err(|_| {
                cx.err(
                    format!("{at}.name"),
                    format!("{:?} is not a header name", h.name),
                )
            })?,
        )
    };
    use header_matcher::HeaderMatchSpecifier as S;
    let exact = |v: &str| StrMatch {
        kind: StrKind::Exact(v.to_string()),
        ignore_case: false,
    };
    let value = match &h.header_match_specifier {
        None => ValueMatch::Present(true),
        Some(S::PresentMatch(b)) => ValueMatch::Present(*b),
        Some(S::ExactMatch(v)) => ValueMatch::Str(exact(v)),
        Some(S::PrefixMatch(v)) => ValueMatch::Str(StrMatch {
            kind: StrKind::Prefix(v.clone()),
            ignore_case: false,
        }),
        Some(S::SuffixMatch(v)) => ValueMatch::Str(StrMatch {
            kind: StrKind::Suffix(v.clone()),
            ignore_case: false,
        }),
        Some(S::ContainsMatch(v)) => ValueMatch::Str(StrMatch {
            kind: StrKind::Contains(v.clone()),
            ignore_case: false,
        }),
        Some(S::SafeRegexMatch(re)) => ValueMatch::Str(StrMatch {
            kind: StrKind::Regex(full_regex(cx, &format!("{at}.safe_regex_match"), re)?),
            ignore_case: false,
        }),
        Some(S::StringMatch(s)) => {
            ValueMatch::Str(str_match(cx, &format!("{at}.string_match"), s)?)
        }
        Some(S::RangeMatch(_)) => {
            return Err(cx.err(format!("{at}.range_match"), "not supported"));
        }
    };
    Ok(HeaderMatch {
        name,
        value,
        invert: h.invert_match,
    })
}

#[allow(deprecated)] // `append` is deprecated but still honoured, as Envoy does.
fn header_ops(
    cx: &Ctx<'_>,
    at: &str,
    req_add: &[HeaderValueOption],
    req_remove: &[String],
    resp_add: &[HeaderValueOption],
    resp_remove: &[String],
) -> Result<HeaderOps> {
    let mut ops = HeaderOps::default();
    let name = |field: &str, n: &str| {
        HeaderName::try_from(n.to_ascii_lowercase())
            .map_err(|_| cx.err(field, format!("{n:?} is not a header name")))
    };
    let fill = |field: &str,
                opts: &[HeaderValueOption],
                set: &mut Vec<(HeaderName, HeaderValue)>,
                add: &mut Vec<(HeaderName, HeaderValue)>|
     -> Result<()> {
        for (i, o) in opts.iter().enumerate() {
            let f = format!("{at}{field}[{i}]");
            let h = o
                .header
                .as_ref()
                .ok_or_else(|| cx.err(format!("{f}.header"), "missing"))?;
            let n = name(&format!("{f}.header.key"), &h.key)?;
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                h.raw_value.as_slice()
            };
            let v = HeaderValue::from_bytes(value)
                .map_err(|_| cx.err(format!("{f}.header.value"), "not a valid header value"))?;
            use header_value_option::HeaderAppendAction as A;
            // `append` (deprecated) wins when set, as in Envoy.
            let append = match o.append {
                Some(b) => b.value,
                None => matches!(A::try_from(o.append_action), Ok(A::AppendIfExistsOrAdd)),
            };
            match A::try_from(o.append_action) {
                Ok(A::AddIfAbsent | A::OverwriteIfExists) => {
                    return Err(cx.err(
                        format!("{f}.append_action"),
                        "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD are supported",
                    ));
                }
                _ if append => add.push((n, v)),
                _ => set.push((n, v)),
            }
        }
        Ok(())
    };
    fill(
        "request_headers_to_add",
        req_add,
        &mut ops.request_set,
        &mut ops.request_add,
    )?;
    fill(
        "response_headers_to_add",
        resp_add,
        &mut ops.response_set,
        &mut ops.response_add,
    )?;
    for (i, n) in req_remove.iter().enumerate() {
        ops.request_remove
            .push(name(&format!("{at}request_headers_to_remove[{i}]"), n)?);
    }
    for (i, n) in resp_remove.iter().enumerate() {
        ops.response_remove
            .push(name(&format!("{at}response_headers_to_remove[{i}]"), n)?);
    }
    Ok(ops)
}

// ---- clusters and endpoints --------------------------------------------------------------------

#[allow(deprecated)] // `http2_protocol_options` is deprecated but still honoured.
pub fn cluster(c: &PbCluster) -> Result<ClusterDef> {
    let cx = Ctx {
        kind: "Cluster",
        name: &c.name,
    };
    use cluster::DiscoveryType as D;
    let kind = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => match D::try_from(*t) {
            Ok(D::Eds) => ClusterKind::Eds {
                service_name: c
                    .eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone()),
            },
            Ok(D::Static) => ClusterKind::Static,
            Ok(D::OriginalDst) => ClusterKind::OriginalDst,
            Ok(other) => {
                return Err(cx.err(
                    "type",
                    format!(
                        "{} is not supported (supported: EDS, STATIC, ORIGINAL_DST)",
                        other.as_str_name()
                    ),
                ));
            }
            Err(_) => return Err(cx.err("type", format!("unknown discovery type {t}"))),
        },
        Some(_) => return Err(cx.err("cluster_type", "custom cluster types are not supported")),
        None => ClusterKind::Static,
    };
    use cluster::LbPolicy as L;
    // Peak EWMA is mesh-proxy's own: the mesh's control plane marks it in the cluster's
    // `mesh.dev` metadata over ROUND_ROBIN, which Envoy and gRPC clients read.
    let peak_ewma = c
        .metadata
        .as_ref()
        .and_then(|m| {
            m.filter_metadata
                .get(mesh_api::consts::xds::ENDPOINT_METADATA)
        })
        .and_then(|s| s.fields.get("balancer"))
        .and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s),
            _ => None,
        })
        .is_some_and(|s| s == "peak-ewma");
    let balancer = match L::try_from(c.lb_policy) {
        Ok(L::LeastRequest | L::RoundRobin | L::Random) if peak_ewma => Balancer::PeakEwma,
        Ok(L::LeastRequest) => Balancer::LeastRequest,
        Ok(L::RoundRobin) => Balancer::RoundRobin,
        Ok(L::Random) => Balancer::Random,
        Ok(L::RingHash | L::Maglev) => Balancer::RingHash,
        Ok(L::ClusterProvided) => Balancer::PeakEwma,
        _ => {
            return Err(cx.err(
                "lb_policy",
                format!(
                    "{} is not supported (supported: LEAST_REQUEST, ROUND_ROBIN, RANDOM, \
                     RING_HASH, MAGLEV, CLUSTER_PROVIDED)",
                    L::try_from(c.lb_policy).map_or("unknown", |p| p.as_str_name())
                ),
            ));
        }
    };
    if c.load_balancing_policy.is_some() {
        return Err(cx.err("load_balancing_policy", "not supported: use lb_policy"));
    }
    if c.transport_socket.is_some() || !c.transport_socket_matches.is_empty() {
        return Err(cx.err(
            "transport_socket",
            "not supported: mesh TLS to an endpoint follows its `mesh.dev` `identity` metadata",
        ));
    }
    let mut max_requests_per_connection = c.max_requests_per_connection.map(|v| v.value);
    let mut protocol = if c.http2_protocol_options.is_some() {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Unset
    };
    for (key, any) in &c.typed_extension_protocol_options {
        let field = format!("typed_extension_protocol_options[{key:?}]");
        if any.type_url != HttpProtocolOptions::type_url() {
            return Err(cx.err(field, format!("unsupported {}", any.type_url)));
        }
        let opts: HttpProtocolOptions = decode(&cx, &field, any)?;
        if let Some(n) = opts
            .common_http_protocol_options
            .as_ref()
            .and_then(|o| o.max_requests_per_connection)
        {
            max_requests_per_connection = Some(n.value);
        }
        use http_protocol_options::UpstreamProtocolOptions as U;
        use http_protocol_options::explicit_http_config::ProtocolConfig as P;
        protocol = match opts.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(P::Http2ProtocolOptions(_)) => UpstreamProtocol::Http2,
                Some(P::HttpProtocolOptions(_)) => UpstreamProtocol::Http1,
                _ => {
                    return Err(cx.err(
                        format!("{field}.explicit_http_config"),
                        "supported: http_protocol_options, http2_protocol_options",
                    ));
                }
            },
            Some(U::UseDownstreamProtocolConfig(_)) => UpstreamProtocol::Downstream,
            None => UpstreamProtocol::Unset,
            Some(_) => {
                return Err(cx.err(
                    format!("{field}.upstream_protocol_options"),
                    "auto_config is not supported",
                ));
            }
        };
    }
    let connect_timeout =
        dur(&cx, "connect_timeout", c.connect_timeout.as_ref())?.unwrap_or(Duration::from_secs(5));
    let mut outlier = OutlierConfig::default();
    if let Some(o) = &c.outlier_detection {
        // Envoy's defaults once a cluster has outlier detection: 5 consecutive 5xx, enforced;
        // gateway failures counted but not enforced; 30 s growing by 30 s per ejection, at
        // most 300 s; at most 10 % of the endpoints.
        let enforced = |e: Option<u32>, default: u32| e.unwrap_or(default) > 0;
        let five = enforced(o.enforcing_consecutive_5xx.map(|v| v.value), 100);
        let gateway = enforced(o.enforcing_consecutive_gateway_failure.map(|v| v.value), 0);
        // Failed connections count as 5xx, unless split out as local-origin failures.
        let split = o.split_external_local_origin_errors;
        let local = split
            && enforced(
                o.enforcing_consecutive_local_origin_failure
                    .map(|v| v.value),
                100,
            );
        outlier = OutlierConfig {
            consecutive_failures: five.then(|| o.consecutive_5xx.map_or(5, |n| n.value).max(1)),
            consecutive_gateway: gateway
                .then(|| o.consecutive_gateway_failure.map_or(5, |n| n.value).max(1)),
            consecutive_unreachable: local.then(|| {
                o.consecutive_local_origin_failure
                    .map_or(5, |n| n.value)
                    .max(1)
            }),
            split_local: split,
            linear: true,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 10,
            interval: None,
        };
        outlier.interval = dur(&cx, "outlier_detection.interval", o.interval.as_ref())?;
        if let Some(d) = dur(
            &cx,
            "outlier_detection.base_ejection_time",
            o.base_ejection_time.as_ref(),
        )? {
            outlier.base_ejection = d;
        }
        if let Some(d) = dur(
            &cx,
            "outlier_detection.max_ejection_time",
            o.max_ejection_time.as_ref(),
        )? {
            outlier.max_ejection = d;
        }
        if let Some(p) = o.max_ejection_percent {
            outlier.max_ejection_percent = p.value.min(100);
        }
    }
    let threshold = c
        .circuit_breakers
        .as_ref()
        .and_then(|cb| cb.thresholds.first());
    let max_requests = threshold.and_then(|t| t.max_requests).map(|v| v.value);
    let limits = ClusterLimits {
        max_connections: threshold.and_then(|t| t.max_connections).map(|v| v.value),
        max_pending_requests: threshold
            .and_then(|t| t.max_pending_requests)
            .map(|v| v.value),
        max_retries: threshold.and_then(|t| t.max_retries).map(|v| v.value),
        retry_budget: match threshold.and_then(|t| t.retry_budget.as_ref()) {
            Some(b) => Some(EnvoyRetryBudget {
                percent: b.budget_percent.as_ref().map_or(20.0, |p| p.value),
                min_concurrency: b.min_retry_concurrency.map_or(3, |v| v.value),
                interval: dur(
                    &cx,
                    "circuit_breakers.thresholds[0].retry_budget.budget_interval",
                    b.budget_interval.as_ref(),
                )?
                .filter(|d| !d.is_zero()),
            }),
            None => None,
        },
        max_requests_per_connection: max_requests_per_connection.filter(|n| *n > 0),
    };
    let static_endpoints = match (&kind, &c.load_assignment) {
        (ClusterKind::Static, Some(la)) => endpoints_of(&cx, "load_assignment", la)?,
        _ => Vec::new(),
    };
    Ok(ClusterDef {
        name: c.name.clone(),
        kind,
        protocol,
        connect_timeout,
        outlier,
        balancer,
        max_requests,
        limits,
        static_endpoints,
    })
}

pub fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<EndpointDef>> {
    let cx = Ctx {
        kind: "ClusterLoadAssignment",
        name: &cla.cluster_name,
    };
    endpoints_of(&cx, "", cla)
}

fn endpoints_of(cx: &Ctx<'_>, at: &str, cla: &ClusterLoadAssignment) -> Result<Vec<EndpointDef>> {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    let mut out = Vec::new();
    for (i, loc) in cla.endpoints.iter().enumerate() {
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            let field = format!("{at}endpoints[{i}].lb_endpoints[{j}]");
            if let Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout) =
                HealthStatus::try_from(lb.health_status)
            {
                continue;
            }
            let ep = match &lb.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                _ => return Err(cx.err(format!("{field}.endpoint"), "missing")),
            };
            let addr = socket_addr(
                cx,
                &format!("{field}.endpoint.address"),
                ep.address.as_ref(),
            )?;
            let identity = mesh_identity(cx, &format!("{field}.metadata"), lb.metadata.as_ref())?;
            let meta = |key: &str| mesh_string(lb.metadata.as_ref(), key).unwrap_or_default();
            let peer = Arc::new(Peer::new(
                &meta("namespace"),
                &meta("workload"),
                identity.as_ref(),
            ));
            out.push(EndpointDef {
                addr,
                mesh_proxy: is_mesh_proxy(lb.metadata.as_ref()),
                identity,
                peer,
                priority: loc.priority,
            });
        }
    }
    // Lowest priority first, as the endpoint set holds them (so an unchanged assignment is
    // recognised as one).
    out.sort_by_key(|d| d.priority);
    Ok(out)
}

/// A string in endpoint metadata `filter_metadata["mesh.dev"]` (others are ignored: this
/// only labels metrics).
fn mesh_string(m: Option<&Metadata>, key: &str) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let v = m?
        .filter_metadata
        .get(mesh_api::consts::xds::ENDPOINT_METADATA)?
        .fields
        .get(key)?;
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Endpoint metadata `filter_metadata["mesh.dev"]["proxy"] == true`.
fn is_mesh_proxy(m: Option<&Metadata>) -> bool {
    use envoy_types::pb::google::protobuf::value::Kind;
    m.and_then(|m| {
        m.filter_metadata
            .get(mesh_api::consts::xds::ENDPOINT_METADATA)
    })
    .and_then(|s| s.fields.get("proxy"))
    .is_some_and(|v| matches!(v.kind, Some(Kind::BoolValue(true))))
}

/// Endpoint metadata `filter_metadata["mesh.dev"]["identity"]`: the SPIFFE ID the endpoint's
/// SVID must carry.
fn mesh_identity(
    cx: &Ctx<'_>,
    at: &str,
    m: Option<&Metadata>,
) -> Result<Option<mesh_api::SpiffeId>> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let key = mesh_api::consts::xds::ENDPOINT_METADATA;
    let Some(v) = m
        .and_then(|m| m.filter_metadata.get(key))
        .and_then(|s| s.fields.get("identity"))
    else {
        return Ok(None);
    };
    let field = format!("{at}.filter_metadata[{key:?}].identity");
    match &v.kind {
        Some(Kind::StringValue(s)) => mesh_api::SpiffeId::parse(s)
            .map(Some)
            .map_err(|e| cx.err(field, e.to_string())),
        _ => Err(cx.err(field, "expected a string SPIFFE ID")),
    }
}

fn socket_addr(cx_kind: &Ctx<'_>, field: &str, a: Option<&Address>) -> Result<SocketAddr> {
    let Some(address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(cx_kind.err(field, "expected a socket address"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        cx_kind.err(
            format!("{field}.address"),
            format!(
                "{:?} is not an IP address (DNS names are not supported)",
                sa.address
            ),
        )
    })?;
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            cx_kind.err(format!("{field}.port_value"), format!("{p} is not a port"))
        })?,
        _ => return Err(cx_kind.err(format!("{field}.port_value"), "missing")),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[path = "convert_tests.rs"]
pub(crate) mod tests;
