//! A Gateway's own layer of resources, for the proxies that serve it (mesh-proxy in its gateway
//! role, or a stock Envoy): per port a Listener bound on the gateway proxy's address, an HTTP
//! connection manager per listener routed over RDS, and the certificates of HTTPS listeners as
//! SDS Secrets over ADS. Backends are the mesh's clusters, from the shared layer.
//!
//! - HTTP port: one filter chain; its RouteConfiguration `gateway/<ns>/<name>/<port>` holds the
//!   virtual hosts of every listener on the port (hosts are already isolated per listener).
//! - HTTPS port: a filter chain per listener, matched on the TLS server name (`server_names`:
//!   the listener's hostname; none for a listener without one, which takes the others), with
//!   its certificates and ALPN `h2`, `http/1.1`; its RouteConfiguration
//!   `gateway/<ns>/<name>/<port>/<listener>` holds that listener's virtual hosts only, so a
//!   request meets the routes of the listener its SNI selected.
//! - A virtual host with no routes answers 404 (no route matches), as the spec asks of a host
//!   a listener takes and no route serves.
//! - A RateLimitPolicy that targets the Gateway (or one listener) puts its local rate limit
//!   before the router of each chain it covers, a bucket per chain: named
//!   `<policy namespace>/<policy name>/<port>` on an HTTP port, `.../<port>/<listener>` on
//!   HTTPS.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{FilterChain, FilterChainMatch, Listener};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, Secret, TlsCertificate, secret,
};

use super::build::{envoy_routes, hcm, listener_filter, sds_secret, socket_address};
use super::pb::{any, network_filter};
use super::resources::{Resource, ResourceType, Resources};
use super::translate::SdsSource;
use crate::index::Model;
use crate::index::gateway::{GatewayModel, GatewayPort, ListenerProtocol, VirtualHost as Vhost};
use crate::index::policy::RateLimit;
use mesh_api::consts::xds as names;

/// The listener of a Gateway port.
pub fn listener_name(port: u16) -> String {
    names::gateway_listener(port)
}

/// The RouteConfiguration of an HTTP port, or of one HTTPS listener.
pub fn route_name(g: &GatewayModel, port: u16, listener: Option<&str>) -> String {
    match listener {
        None => format!("gateway/{}/{}/{port}", g.namespace, g.name),
        Some(l) => format!("gateway/{}/{}/{port}/{l}", g.namespace, g.name),
    }
}

/// The SDS name of a certificate Secret: `<namespace>/<name>`.
pub fn secret_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The resources of Gateway `g`, with its listeners bound on `bind`.
pub fn gateway_resources(model: &Model, g: &GatewayModel, bind: IpAddr) -> Resources {
    let mut out = Resources::default();
    for port in &g.ports {
        let chains = match port.protocol {
            ListenerProtocol::Http => {
                let name = route_name(g, port.port, None);
                let rc = route_config(&name, port, port.vhosts.iter());
                out.insert(ResourceType::Route, Resource::new(&name, &rc));
                let listeners: Vec<&str> = g
                    .listeners
                    .iter()
                    .filter(|l| l.port == port.port && l.protocol == Some(ListenerProtocol::Http))
                    .map(|l| l.name.as_str())
                    .collect();
                let limit = model
                    .policies
                    .for_gateway(&g.namespace, &g.name, &listeners)
                    .map(|l| (l, port.port.to_string()));
                vec![FilterChain {
                    name: name.clone(),
                    filters: vec![network_filter(
                        "envoy.filters.network.http_connection_manager",
                        &gateway_hcm(&name, limit),
                    )],
                    ..Default::default()
                }]
            }
            ListenerProtocol::Https => https_chains(model, g, port, &mut out),
        };
        let name = listener_name(port.port);
        let listener = Listener {
            name: name.clone(),
            address: Some(socket_address(bind, port.port)),
            listener_filters: if port.protocol == ListenerProtocol::Https {
                vec![listener_filter(
                    "envoy.filters.listener.tls_inspector",
                    &TlsInspector::default(),
                )]
            } else {
                vec![]
            },
            filter_chains: chains,
            ..Default::default()
        };
        out.insert(ResourceType::Listener, Resource::new(&name, &listener));
    }
    out
}

/// An HTTPS port's chains, one per listener (most specific server name first), and their
/// routes and certificates into `out`.
fn https_chains(
    model: &Model,
    g: &GatewayModel,
    port: &GatewayPort,
    out: &mut Resources,
) -> Vec<FilterChain> {
    let mut listeners: Vec<&crate::index::gateway::ListenerModel> = g
        .listeners
        .iter()
        .filter(|l| l.port == port.port && l.protocol == Some(ListenerProtocol::Https))
        .filter(|l| l.programmed.ok)
        .collect();
    listeners.sort_by(|a, b| {
        crate::index::gateway::host_order(
            a.hostname.as_deref().unwrap_or("*"),
            b.hostname.as_deref().unwrap_or("*"),
        )
    });
    let mut chains = Vec::new();
    for l in listeners {
        let name = route_name(g, port.port, Some(&l.name));
        let rc = route_config(
            &name,
            port,
            port.vhosts.iter().filter(|v| v.listener == l.name),
        );
        out.insert(ResourceType::Route, Resource::new(&name, &rc));
        for c in &l.certs {
            let sname = secret_name(&c.namespace, &c.name);
            if let Some(s) = model
                .gateways
                .secrets
                .get(&(c.namespace.clone(), c.name.clone()))
            {
                let secret = Secret {
                    name: sname.clone(),
                    r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                        certificate_chain: Some(inline(&s.cert_pem)),
                        private_key: Some(inline(&s.key_pem)),
                        ..Default::default()
                    })),
                };
                out.insert(ResourceType::Secret, Resource::new(&sname, &secret));
            }
        }
        let tls = DownstreamTlsContext {
            common_tls_context: Some(CommonTlsContext {
                tls_certificate_sds_secret_configs: l
                    .certs
                    .iter()
                    .map(|c| sds_secret(&secret_name(&c.namespace, &c.name), &SdsSource::Ads))
                    .collect(),
                alpn_protocols: vec!["h2".into(), "http/1.1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        chains.push(FilterChain {
            name: name.clone(),
            filter_chain_match: Some(FilterChainMatch {
                server_names: l.hostname.iter().cloned().collect(),
                transport_protocol: "tls".into(),
                ..Default::default()
            }),
            filters: vec![network_filter(
                "envoy.filters.network.http_connection_manager",
                &gateway_hcm(
                    &name,
                    model
                        .policies
                        .for_gateway(&g.namespace, &g.name, &[l.name.as_str()])
                        .map(|p| (p, format!("{}/{}", port.port, l.name))),
                ),
            )],
            transport_socket: Some(TransportSocket {
                name: names::TLS_TRANSPORT_SOCKET.into(),
                config_type: Some(transport_socket::ConfigType::TypedConfig(any(&tls))),
            }),
            ..Default::default()
        });
    }
    chains
}

fn inline(pem: &str) -> DataSource {
    DataSource {
        specifier: Some(data_source::Specifier::InlineString(pem.to_string())),
        ..Default::default()
    }
}

/// A gateway's HTTP connection manager, facing clients outside the mesh: routes from RDS
/// `name`; the client's address is the peer's (a client's `x-forwarded-for` is not trusted,
/// so neither are its `x-envoy-*` headers); paths normalized and slashes merged before routes
/// match them, as the sidecars' inbound side does. `limit`: a rate limit before the router,
/// and what its bucket is of (`<port>`, or `<port>/<listener>` for an HTTPS listener).
fn gateway_hcm(name: &str, limit: Option<(&RateLimit, String)>) -> HttpConnectionManager {
    use envoy_types::pb::google::protobuf::BoolValue;
    let mut h = hcm(name, name);
    if let Some((l, of)) = limit {
        let bucket = RateLimit {
            name: format!("{}/{of}", l.name),
            ..l.clone()
        };
        h.http_filters
            .insert(0, super::policy::rate_limit_filter(&bucket));
    }
    h.use_remote_address = Some(BoolValue { value: true });
    h.normalize_path = Some(BoolValue { value: true });
    h.merge_slashes = true;
    // `/admin%2Fx` is redirected to `/admin/x`, so it meets the routes of `/admin/`.
    h.path_with_escaped_slashes_action = envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::PathWithEscapedSlashesAction::UnescapeAndRedirect as i32;
    h
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;

/// A gateway's routes; the Host's port is ignored when virtual hosts are chosen (a Gateway's
/// hostnames have none), and kept in the request.
fn route_config<'a>(
    name: &str,
    port: &GatewayPort,
    vhosts: impl Iterator<Item = &'a Vhost>,
) -> RouteConfiguration {
    let well_known = match port.protocol {
        ListenerProtocol::Http => 80,
        ListenerProtocol::Https => 443,
    };
    let listener_port = (port.port != well_known).then_some(port.port);
    RouteConfiguration {
        name: name.to_string(),
        ignore_port_in_host_matching: true,
        virtual_hosts: vhosts
            .map(|v| VirtualHost {
                name: format!("{}/{}", v.listener, v.hostname),
                domains: vec![v.hostname.clone()],
                // No route: a request for the host gets 404.
                routes: if v.routes.is_empty() {
                    vec![]
                } else {
                    envoy_routes(&v.routes, names::BLACKHOLE_CLUSTER, None, listener_port)
                },
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}
