//! The xDS client against a scripted control plane: what it subscribes to, what it ACKs and
//! NACKs (with the resource and field), and that it keeps serving when the control plane goes.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, Rds, http_connection_manager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use mesh_proxy::{Config, Proxy};
use prost::{Message, Name};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// One Delta stream, driven by the test: requests come out of `requests`, responses go in.
struct Fake {
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    responses: Mutex<Option<mpsc::UnboundedReceiver<DeltaDiscoveryResponse>>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Fake {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let tx = self.requests.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                let _ = tx.unbounded_send(r);
            }
        });
        let rx = self
            .responses
            .lock()
            .expect("lock")
            .take()
            .ok_or_else(|| Status::unavailable("one stream only"))?;
        Ok(Response::new(Box::pin(rx.map(Ok))))
    }
}

struct ControlPlane {
    addr: std::net::SocketAddr,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<DeltaDiscoveryResponse>,
    server: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    async fn start() -> Self {
        let (req_tx, requests) = mpsc::unbounded();
        let (responses, resp_rx) = mpsc::unbounded();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = AggregatedDiscoveryServiceServer::new(Fake {
            requests: req_tx,
            responses: Mutex::new(Some(resp_rx)),
        });
        let server = tokio::spawn(async move {
            let incoming = futures::stream::unfold(listener, |l| async move {
                let next = l.accept().await.map(|(s, _)| s);
                Some((next, l))
            });
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        Self {
            addr,
            requests,
            responses,
            server,
        }
    }

    async fn next_request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.next())
            .await
            .expect("a request within 10 s")
            .expect("stream open")
    }

    /// The next request that answers `nonce`.
    async fn answer_to(&mut self, nonce: &str) -> DeltaDiscoveryRequest {
        loop {
            let r = self.next_request().await;
            if r.response_nonce == nonce {
                return r;
            }
        }
    }

    fn send<M: Message + Name>(&self, nonce: &str, resources: &[(&str, M)]) {
        let type_url = M::type_url();
        let resources = resources
            .iter()
            .map(|(name, m)| Resource {
                name: name.to_string(),
                version: "1".into(),
                resource: Some(Any {
                    type_url: type_url.clone(),
                    value: m.encode_to_vec(),
                }),
                ..Default::default()
            })
            .collect();
        self.responses
            .unbounded_send(DeltaDiscoveryResponse {
                type_url,
                resources,
                nonce: nonce.into(),
                ..Default::default()
            })
            .expect("stream open");
    }
}

fn static_cluster(name: &str, port: u32) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "127.0.0.1".into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    port,
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A network filter `name` configured by `config`.
fn typed_filter<M: Message + Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(Any {
            type_url: M::type_url(),
            value: config.encode_to_vec(),
        })),
    }
}

fn http_listener() -> Listener {
    let hcm = HttpConnectionManager {
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            route_config_name: "outbound_http".into(),
            config_source: None,
        })),
        ..Default::default()
    };
    Listener {
        name: "outbound_http".into(),
        filter_chains: vec![FilterChain {
            filters: vec![typed_filter(
                "envoy.filters.network.http_connection_manager",
                &hcm,
            )],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn routes() -> RouteConfiguration {
    RouteConfiguration {
        name: "outbound_http".into(),
        virtual_hosts: vec![VirtualHost {
            name: "app".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                name: "all".into(),
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster("app".into())),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_nacks_and_keeps_serving_without_the_control_plane() {
    let mut cp = ControlPlane::start().await;
    let proxy = Proxy::start(Config::local(cp.addr, "default/web-1"), None)
        .await
        .expect("proxy starts");
    let http_addr = proxy.outbound_http_addr.expect("explicit listener");

    // Wildcard CDS then LDS, with the node and where the listener is.
    let first = cp.next_request().await;
    assert_eq!(first.type_url, Cluster::type_url());
    assert!(first.resource_names_subscribe.is_empty(), "wildcard");
    let node = first.node.expect("node on the first request");
    assert_eq!(node.id, "default/web-1");
    let meta = node.metadata.expect("metadata");
    let addr = &meta.fields["mesh.dev/outbound-http-addr"];
    assert!(format!("{addr:?}").contains(&http_addr.to_string()));
    assert_eq!(cp.next_request().await.type_url, Listener::type_url());

    // A cluster it cannot honour: NACKed, naming resource and field, and nothing applied.
    let dns = Cluster {
        name: "ext".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::StrictDns as i32,
        )),
        ..Default::default()
    };
    cp.send("n1", &[("ext", dns)]);
    let nack = cp.answer_to("n1").await;
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(
        detail.message,
        r#"Cluster "ext": type: STRICT_DNS is not supported (supported: EDS, STATIC, ORIGINAL_DST)"#
    );
    assert!(!proxy.store.is_ready());

    // A complete config: ACKed, and the proxy becomes ready and serves it.
    let backend_port = ok_backend().await.port();
    cp.send(
        "n2",
        &[("app", static_cluster("app", u32::from(backend_port)))],
    );
    assert!(cp.answer_to("n2").await.error_detail.is_none());
    cp.send("n3", &[("outbound_http", http_listener())]);
    let mut subscribed_route = false;
    loop {
        let r = cp.next_request().await;
        if r.type_url == RouteConfiguration::type_url() {
            assert_eq!(r.resource_names_subscribe, ["outbound_http"]);
            subscribed_route = true;
        }
        if r.response_nonce == "n3" {
            assert!(r.error_detail.is_none());
        }
        if subscribed_route {
            break;
        }
    }
    assert!(!proxy.store.is_ready(), "the route is not here yet");
    cp.send("n4", &[("outbound_http", routes())]);
    assert!(cp.answer_to("n4").await.error_detail.is_none());
    tokio::time::timeout(Duration::from_secs(5), proxy.store.ready())
        .await
        .expect("ready once complete");

    let get = || async {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-m", "5", &format!("http://{http_addr}/")])
            .output()
            .await
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(get().await, "ok");

    // The control plane goes away: the last good config keeps serving.
    cp.server.abort();
    drop(cp);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get().await, "ok");
    let text = proxy.metrics.encode();
    assert!(
        text.contains(r#"mesh_proxy_xds_updates_total{xds_type="CDS",result="nack"} 1"#),
        "{text}"
    );
}

/// Two control planes: the proxy streams from one and, when that stream ends, opens one to the
/// other at once (a replica going away), where it subscribes again with what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_to_another_control_plane_when_its_stream_ends() {
    let mut a = ControlPlane::start().await;
    let mut b = ControlPlane::start().await;
    let mut config = Config::local(a.addr, "default/web-1");
    config.xds = vec![a.addr.to_string(), b.addr.to_string()];
    let _proxy = Proxy::start(config, None).await.expect("proxy starts");
    let on_a = tokio::select! {
        _ = a.next_request() => true,
        _ = b.next_request() => false,
    };
    let (on, mut other) = if on_a { (a, b) } else { (b, a) };
    on.send("n1", &[("app", static_cluster("app", 9))]);
    let ControlPlane {
        mut requests,
        responses,
        server,
        ..
    } = on;
    // Acknowledged, then the stream ends.
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), requests.next())
            .await
            .expect("an answer within 10 s")
            .expect("stream open");
        if r.response_nonce == "n1" {
            break;
        }
    }
    drop(responses);
    let first = other.next_request().await;
    assert_eq!(first.type_url, Cluster::type_url());
    assert_eq!(first.node.expect("node").id, "default/web-1");
    assert_eq!(
        first
            .initial_resource_versions
            .get("app")
            .map(String::as_str),
        Some("1"),
        "what it holds, so nothing unchanged is sent again"
    );
    server.abort();
}

/// A scoped proxy subscribes to "*" on CDS and LDS, asks for a destination's address listener
/// on its first connection there, and passes the connection through when the controller says
/// no Service has that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_proxy_asks_for_a_destination_on_its_first_connection() {
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        TcpProxy, tcp_proxy,
    };
    let mut cp = ControlPlane::start().await;
    let dst = ok_backend().await;
    let mut config = Config::local(cp.addr, "default/web-1");
    config.transparent = true;
    config.scoped = Some(true);
    config.outbound_orig_dst = Some(dst);
    let proxy = Proxy::start(config, None).await.expect("proxy starts");
    let cds = cp.next_request().await;
    assert_eq!(cds.type_url, Cluster::type_url());
    assert_eq!(cds.resource_names_subscribe, ["*"]);
    let meta = format!("{:?}", cds.node.expect("node").metadata);
    assert!(meta.contains("mesh.dev/scoped"), "{meta}");
    let lds = cp.next_request().await;
    assert_eq!(lds.type_url, Listener::type_url());
    assert_eq!(lds.resource_names_subscribe, ["*"]);

    // Everything passes through to `app` until looked up.
    let tcp = TcpProxy {
        stat_prefix: "app".into(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("app".into())),
        ..Default::default()
    };
    let outbound = Listener {
        name: "virtualOutbound".into(),
        default_filter_chain: Some(FilterChain {
            filters: vec![typed_filter("envoy.filters.network.tcp_proxy", &tcp)],
            ..Default::default()
        }),
        ..Default::default()
    };
    cp.send(
        "n1",
        &[("app", static_cluster("app", u32::from(dst.port())))],
    );
    assert!(cp.answer_to("n1").await.error_detail.is_none());
    cp.send("n2", &[("virtualOutbound", outbound)]);
    assert!(cp.answer_to("n2").await.error_detail.is_none());
    tokio::time::timeout(Duration::from_secs(5), proxy.store.ready())
        .await
        .expect("ready");

    let outbound_addr = proxy.outbound_addr.expect("transparent outbound listener");
    let get = tokio::spawn(async move {
        tokio::process::Command::new("curl")
            .args(["-sS", "-m", "5", &format!("http://{outbound_addr}/")])
            .output()
            .await
            .expect("curl runs")
    });
    let name = mesh_api::consts::xds::address_listener(dst);
    loop {
        let r = cp.next_request().await;
        if r.type_url == Listener::type_url() && r.resource_names_subscribe.contains(&name) {
            break;
        }
    }
    cp.responses
        .unbounded_send(DeltaDiscoveryResponse {
            type_url: Listener::type_url(),
            removed_resources: vec![name],
            nonce: "n3".into(),
            ..Default::default()
        })
        .expect("stream open");
    let out = get.await.expect("joins");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
    let text = proxy.metrics.encode();
    assert!(
        text.contains(r#"mesh_proxy_on_demand_lookups_total{result="absent"} 1"#),
        "{text}"
    );
}

/// A backend on loopback that answers each connection's first request `200 ok`.
async fn ok_backend() -> std::net::SocketAddr {
    let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = backend.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    addr
}
