//! The ADS server against a real tonic client: SotW and Delta, ACK/NACK bookkeeping, pushes on
//! change, removals, and refusal of a malformed node.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use mesh_controller::config::Config;
use mesh_controller::run::Controller;
use mesh_controller::testing::{service_yaml, slice_yaml};
use mesh_controller::xds::resources::ResourceType;
use mesh_controller::xds::status::SyncState;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const CLA: ResourceType = ResourceType::Endpoint;

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        ..Default::default()
    })
}

async fn controller() -> (tempfile::TempDir, Controller) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("svc.yaml"),
        [
            service_yaml("default", "a", "10.96.0.1", &[("http", 80)]),
            service_yaml("default", "b", "10.96.0.2", &[("http", 80)]),
            slice_yaml("default", "a", "http", 8080, &["10.0.0.1"]),
        ]
        .join("---\n"),
    )
    .expect("write");
    let ctl = Controller::start(Config::local(dir.path()))
        .await
        .expect("controller");
    (dir, ctl)
}

async fn client(ctl: &Controller) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    AggregatedDiscoveryServiceClient::connect(format!("http://{}", ctl.xds_addr))
        .await
        .expect("connect")
}

/// A SotW stream: where to send requests, and its responses.
async fn sotw_stream(
    ctl: &Controller,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(8);
    let resp = client(ctl)
        .await
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    (tx, resp)
}

/// A Delta stream: where to send requests, and its responses.
async fn delta_stream(
    ctl: &Controller,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    let resp = client(ctl)
        .await
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    (tx, resp)
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a response in time")
        .expect("stream open")
        .expect("not an error")
}

fn names(r: &DiscoveryResponse) -> Vec<String> {
    use prost::Message;
    r.resources
        .iter()
        .map(|a| match ResourceType::from_type_url(&a.type_url) {
            Some(ResourceType::Cluster) => {
                envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                    .expect("cluster")
                    .name
            }
            Some(ResourceType::Endpoint) => {
                envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                    a.value.as_slice(),
                )
                .expect("cla")
                .cluster_name
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn status_of(
    ctl: &Controller,
    ty: ResourceType,
) -> Option<mesh_controller::xds::status::TypeStatus> {
    ctl.hub.status.snapshot().first()?.types.get(&ty).cloned()
}

async fn wait_state(ctl: &Controller, ty: ResourceType, state: SyncState) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while status_of(ctl, ty).map(|s| s.state) != Some(state) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{ty:?} never became {state:?}: {:?}", status_of(ctl, ty)));
}

#[tokio::test]
async fn sotw_ack_nack_and_push_on_change() {
    let (dir, ctl) = controller().await;
    let (tx, mut resp) = sotw_stream(&ctl).await;

    // Wildcard CDS.
    tx.send(DiscoveryRequest {
        node: node("default/p1"),
        type_url: ResourceType::Cluster.type_url(),
        ..Default::default()
    })
    .await
    .expect("send");
    let cds = next(&mut resp).await;
    let mut got = names(&cds);
    got.sort();
    assert_eq!(
        got,
        vec![
            "BlackHoleCluster",
            "PassthroughCluster",
            "outbound|80||a.default.svc.cluster.local",
            "outbound|80||b.default.svc.cluster.local"
        ]
    );
    tx.send(DiscoveryRequest {
        type_url: cds.type_url.clone(),
        version_info: cds.version_info.clone(),
        response_nonce: cds.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    wait_state(&ctl, ResourceType::Cluster, SyncState::Synced).await;

    // EDS by name; NACK it.
    let a = "outbound|80||a.default.svc.cluster.local".to_string();
    tx.send(DiscoveryRequest {
        type_url: CLA.type_url(),
        resource_names: vec![a.clone(), "nope".into()],
        ..Default::default()
    })
    .await
    .expect("send");
    let eds = next(&mut resp).await;
    assert_eq!(
        names(&eds),
        vec![a.clone()],
        "only what exists of what was asked"
    );
    tx.send(DiscoveryRequest {
        type_url: eds.type_url.clone(),
        version_info: String::new(),
        resource_names: vec![a.clone(), "nope".into()],
        response_nonce: eds.nonce.clone(),
        error_detail: Some(RpcStatus {
            code: 3,
            message: "endpoint a: unsupported field".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .expect("nack");
    wait_state(&ctl, CLA, SyncState::Nacked).await;
    assert_eq!(
        status_of(&ctl, CLA).and_then(|s| s.error).as_deref(),
        Some("endpoint a: unsupported field")
    );
    assert!(
        ctl.hub
            .metrics
            .encode()
            .contains("mesh_controller_xds_nacks_total{xds_type=\"EDS\"} 1")
    );

    // A stale nonce is ignored (no response), and a change pushes a new EDS response.
    tx.send(DiscoveryRequest {
        type_url: CLA.type_url(),
        resource_names: vec![a.clone()],
        response_nonce: "stale".into(),
        ..Default::default()
    })
    .await
    .expect("send");
    let asked = vec![a.clone(), "nope".to_string()];
    std::fs::write(
        dir.path().join("more.yaml"),
        slice_yaml("default", "a", "http", 8080, &["10.0.0.2"]).replace("a-abc", "a-def"),
    )
    .expect("write");
    let pushed = next(&mut resp).await;
    assert_eq!(
        pushed.type_url,
        CLA.type_url(),
        "the stale request got no answer; the change did"
    );
    assert_ne!(pushed.version_info, eds.version_info);
    use prost::Message;
    let cla = envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
        pushed.resources[0].value.as_slice(),
    )
    .expect("cla");
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    tx.send(DiscoveryRequest {
        type_url: CLA.type_url(),
        version_info: pushed.version_info.clone(),
        resource_names: asked,
        response_nonce: pushed.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
    wait_state(&ctl, CLA, SyncState::Synced).await;
    assert_eq!(
        status_of(&ctl, CLA).map(|s| s.acked_version),
        Some(pushed.version_info)
    );
}

/// Acknowledges a Delta response.
async fn delta_ack(tx: &mpsc::Sender<DeltaDiscoveryRequest>, resp: &DeltaDiscoveryResponse) {
    tx.send(DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("ack");
}

async fn delta_next(s: &mut Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    next(s).await
}

#[tokio::test]
async fn delta_sends_only_changes_and_removals() {
    let (dir, ctl) = controller().await;
    let (tx, mut resp) = delta_stream(&ctl).await;
    let b = "outbound|80||b.default.svc.cluster.local";

    // Wildcard CDS, telling the server the client already holds b's current cluster.
    let mut known = std::collections::HashMap::new();
    let view = ctl.hub.view(
        &mesh_controller::xds::server::proxy_id(&Node {
            id: "default/d1".into(),
            ..Default::default()
        })
        .expect("id"),
    );
    known.insert(
        b.to_string(),
        view.get(ResourceType::Cluster, b)
            .expect("b")
            .version
            .clone(),
    );
    tx.send(DeltaDiscoveryRequest {
        node: node("default/d1"),
        type_url: ResourceType::Cluster.type_url(),
        initial_resource_versions: known,
        ..Default::default()
    })
    .await
    .expect("send");
    let first = delta_next(&mut resp).await;
    let mut got: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            "BlackHoleCluster",
            "PassthroughCluster",
            "outbound|80||a.default.svc.cluster.local"
        ],
        "b is already known"
    );
    delta_ack(&tx, &first).await;

    // Service b goes: its cluster is removed.
    std::fs::write(
        dir.path().join("svc.yaml"),
        service_yaml("default", "a", "10.96.0.1", &[("http", 80)]),
    )
    .expect("write");
    let removal = delta_next(&mut resp).await;
    assert!(removal.resources.is_empty());
    assert_eq!(removal.removed_resources, vec![b.to_string()]);
    delta_ack(&tx, &removal).await;
    wait_state(&ctl, ResourceType::Cluster, SyncState::Synced).await;

    // Subscribing to an EDS name by name; unsubscribing sends nothing back.
    let a = "outbound|80||a.default.svc.cluster.local";
    tx.send(DeltaDiscoveryRequest {
        type_url: CLA.type_url(),
        resource_names_subscribe: vec![a.into()],
        ..Default::default()
    })
    .await
    .expect("send");
    let eds = delta_next(&mut resp).await;
    assert_eq!(
        eds.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(ctl.hub.status.snapshot()[0].protocol, "delta");
}

#[tokio::test]
async fn malformed_node_is_refused_naming_the_field() {
    let (_dir, ctl) = controller().await;
    let (tx, mut resp) = sotw_stream(&ctl).await;
    tx.send(DiscoveryRequest {
        node: node("a/b/c"),
        type_url: ResourceType::Cluster.type_url(),
        ..Default::default()
    })
    .await
    .expect("send");
    let err = tokio::time::timeout(Duration::from_secs(10), resp.next())
        .await
        .expect("answer")
        .expect("item")
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("node.id \"a/b/c\""),
        "{}",
        err.message()
    );
    assert!(ctl.hub.status.snapshot().is_empty());
}

#[tokio::test]
async fn sotw_empty_list_after_names_means_nothing_and_unknown_types_are_ignored() {
    let (_dir, ctl) = controller().await;
    let (tx, mut resp) = sotw_stream(&ctl).await;
    let api = "a.default.svc.cluster.local:80".to_string();
    let lds = ResourceType::Listener.type_url();
    // A type this controller does not serve: ignored, the stream stays up.
    tx.send(DiscoveryRequest {
        node: node("default/grpc-client"),
        type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into(),
        ..Default::default()
    })
    .await
    .expect("send");
    tx.send(DiscoveryRequest {
        type_url: lds.clone(),
        resource_names: vec![api.clone()],
        ..Default::default()
    })
    .await
    .expect("send");
    let first = next(&mut resp).await;
    assert_eq!(
        first.type_url, lds,
        "the unknown type got no answer and did not end the stream"
    );
    assert_eq!(first.resources.len(), 1, "only the API listener asked for");
    // The client drops its last name: nothing, not the wildcard set.
    tx.send(DiscoveryRequest {
        type_url: lds.clone(),
        version_info: first.version_info.clone(),
        response_nonce: first.nonce.clone(),
        ..Default::default()
    })
    .await
    .expect("send");
    let emptied = next(&mut resp).await;
    assert!(
        emptied.resources.is_empty(),
        "{} resources",
        emptied.resources.len()
    );
}

#[tokio::test]
async fn delta_reports_missing_names_and_resends_endpoints_of_changed_clusters() {
    let (dir, ctl) = controller().await;
    let (tx, mut resp) = delta_stream(&ctl).await;
    let a = "outbound|80||a.default.svc.cluster.local";
    tx.send(DeltaDiscoveryRequest {
        node: node("default/d2"),
        type_url: ResourceType::Cluster.type_url(),
        ..Default::default()
    })
    .await
    .expect("send");
    let cds = delta_next(&mut resp).await;
    delta_ack(&tx, &cds).await;
    tx.send(DeltaDiscoveryRequest {
        type_url: CLA.type_url(),
        resource_names_subscribe: vec![a.into(), "ghost".into()],
        ..Default::default()
    })
    .await
    .expect("send");
    let eds = delta_next(&mut resp).await;
    assert_eq!(
        eds.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert_eq!(
        eds.removed_resources,
        vec!["ghost".to_string()],
        "a missing name is reported as such"
    );
    delta_ack(&tx, &eds).await;

    // Service a's port becomes gRPC: its cluster changes (HTTP/2 upstream), its endpoints do
    // not; Envoy warms the new cluster and waits for endpoints, so they are sent again.
    std::fs::write(
        dir.path().join("svc.yaml"),
        [
            service_yaml("default", "a", "10.96.0.1", &[("grpc", 80)]),
            service_yaml("default", "b", "10.96.0.2", &[("http", 80)]),
            slice_yaml("default", "a", "grpc", 8080, &["10.0.0.1"]),
        ]
        .join("---\n"),
    )
    .expect("write");
    let cds2 = delta_next(&mut resp).await;
    assert_eq!(cds2.type_url, ResourceType::Cluster.type_url());
    assert!(cds2.resources.iter().any(|r| r.name == a));
    let eds2 = delta_next(&mut resp).await;
    assert_eq!(eds2.type_url, CLA.type_url());
    assert_eq!(
        eds2.resources
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec![a]
    );
}

/// A node asking for destinations by address, with its settings in the metadata.
fn scoped_node(id: &str, transparent: bool) -> Option<Node> {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    Some(Node {
        id: id.into(),
        metadata: Some(Struct {
            fields: [
                (
                    "mesh.dev/transparent".to_string(),
                    s(&transparent.to_string()),
                ),
                ("mesh.dev/scoped".to_string(), s("true")),
            ]
            .into(),
        }),
        ..Default::default()
    })
}

/// Subscribes a Delta stream to one more listener by name.
async fn subscribe_listener(tx: &mpsc::Sender<DeltaDiscoveryRequest>, name: &str) {
    tx.send(DeltaDiscoveryRequest {
        type_url: ResourceType::Listener.type_url(),
        resource_names_subscribe: vec![name.into()],
        ..Default::default()
    })
    .await
    .expect("send");
}

#[tokio::test]
async fn a_scoped_delta_stream_gets_an_address_by_name_and_hears_of_one_that_is_not_there() {
    let (_dir, ctl) = controller().await;
    let (tx, mut resp) = delta_stream(&ctl).await;
    tx.send(DeltaDiscoveryRequest {
        node: scoped_node("default/s1", true),
        type_url: ResourceType::Listener.type_url(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .expect("send");
    let first = delta_next(&mut resp).await;
    let mut got: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    got.sort();
    assert_eq!(
        got,
        ["virtualInbound", "virtualOutbound"],
        "no Service up front"
    );
    delta_ack(&tx, &first).await;
    // a's VIP, then an address no Service has.
    subscribe_listener(&tx, "10.96.0.1_80").await;
    let found = delta_next(&mut resp).await;
    let got: Vec<&str> = found.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["10.96.0.1_80"]);
    assert!(found.removed_resources.is_empty(), "{found:?}");
    delta_ack(&tx, &found).await;
    subscribe_listener(&tx, "10.96.9.9_80").await;
    let absent = delta_next(&mut resp).await;
    assert!(absent.resources.is_empty(), "{absent:?}");
    assert_eq!(absent.removed_resources, ["10.96.9.9_80"]);
}

#[tokio::test]
async fn scoped_needs_transparent_and_delta() {
    let (_dir, ctl) = controller().await;
    let refused = |r: Result<DeltaDiscoveryResponse, tonic::Status>| {
        r.expect_err("refused").message().to_string()
    };
    let (tx, mut resp) = delta_stream(&ctl).await;
    tx.send(DeltaDiscoveryRequest {
        node: scoped_node("default/s2", false),
        type_url: ResourceType::Listener.type_url(),
        ..Default::default()
    })
    .await
    .expect("send");
    let e = refused(resp.next().await.expect("an answer"));
    assert!(
        e.contains("mesh.dev/scoped") && e.contains("transparent"),
        "{e}"
    );
    let (tx, mut resp) = sotw_stream(&ctl).await;
    tx.send(DiscoveryRequest {
        node: scoped_node("default/s3", true),
        type_url: ResourceType::Listener.type_url(),
        ..Default::default()
    })
    .await
    .expect("send");
    let e = resp
        .next()
        .await
        .expect("an answer")
        .expect_err("refused")
        .message()
        .to_string();
    assert!(e.contains("mesh.dev/scoped") && e.contains("Delta"), "{e}");
}

/// A scoped proxy in a namespace with its own route for a Service gets that route's chains at
/// the Service's address, by name, and hears when the route goes (the namespace's named layer
/// is compared whole on each publish).
#[tokio::test]
async fn a_scoped_proxy_hears_when_its_namespaces_own_route_goes() {
    let (dir, ctl) = controller().await;
    std::fs::write(
        dir.path().join("shop.yaml"),
        [
            service_yaml("shop", "c", "10.96.1.1", &[("http", 80)]),
            mesh_controller::testing::split_yaml("shop", "r", "a", 80, &[("c", 1)])
                .replace("name: a, port", "name: a, namespace: default, port"),
        ]
        .join("---\n"),
    )
    .expect("write");
    let (tx, mut resp) = delta_stream(&ctl).await;
    // Once the route is read, the shop variant of a's address listener differs from the shared.
    let shared = ctl
        .hub
        .view(
            &mesh_controller::xds::server::proxy_id(&scoped_node("default/x", true).expect("node"))
                .expect("id"),
        )
        .get(ResourceType::Listener, "10.96.0.1_80")
        .expect("a's address")
        .version
        .clone();
    let shop_id =
        mesh_controller::xds::server::proxy_id(&scoped_node("shop/s1", true).expect("node"))
            .expect("id");
    tokio::time::timeout(Duration::from_secs(10), async {
        while ctl
            .hub
            .view(&shop_id)
            .get(ResourceType::Listener, "10.96.0.1_80")
            .is_some_and(|r| r.version == shared)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the consumer route read");
    tx.send(DeltaDiscoveryRequest {
        node: scoped_node("shop/s1", true),
        type_url: ResourceType::Listener.type_url(),
        resource_names_subscribe: vec!["*".into(), "10.96.0.1_80".into()],
        ..Default::default()
    })
    .await
    .expect("send");
    let first = delta_next(&mut resp).await;
    let own = first
        .resources
        .iter()
        .find(|r| r.name == "10.96.0.1_80")
        .expect("a's address, shop's variant");
    assert_ne!(own.version, shared);
    delta_ack(&tx, &first).await;
    std::fs::remove_file(dir.path().join("shop.yaml")).expect("remove");
    let pushed = delta_next(&mut resp).await;
    let now = pushed
        .resources
        .iter()
        .find(|r| r.name == "10.96.0.1_80")
        .unwrap_or_else(|| panic!("a push of a's address: {pushed:?}"));
    assert_eq!(now.version, shared, "back to the shared chains");
}

/// A pod of workload `client` in `default`.
fn client_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{mesh.dev/workload: client}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\n"
    )
}

/// Opens a scoped Delta stream for `node` subscribed to LDS `*` plus `names`, and returns it
/// with the names of its first response.
async fn scoped_lds(
    ctl: &Controller,
    node: &str,
    names: &[&str],
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
    Vec<String>,
) {
    let (tx, mut resp) = delta_stream(ctl).await;
    tx.send(DeltaDiscoveryRequest {
        node: scoped_node(node, true),
        type_url: ResourceType::Listener.type_url(),
        resource_names_subscribe: std::iter::once("*")
            .chain(names.iter().copied())
            .map(str::to_owned)
            .collect(),
        ..Default::default()
    })
    .await
    .expect("send");
    let first = delta_next(&mut resp).await;
    delta_ack(&tx, &first).await;
    let mut got: Vec<String> = first.resources.iter().map(|r| r.name.clone()).collect();
    got.sort();
    (tx, resp, got)
}

/// What one pod of a workload looked up, every pod of it is given up front; a name a proxy
/// lets go is removed, unless its wildcard still carries it.
#[tokio::test]
async fn a_workload_learns_what_its_proxies_looked_up() {
    let (dir, ctl) = controller().await;
    std::fs::write(
        dir.path().join("pods.yaml"),
        [
            client_pod("client-1"),
            client_pod("client-2"),
            client_pod("client-3"),
        ]
        .join("---\n"),
    )
    .expect("write");
    let workload: (String, String) = ("default".into(), "client".into());
    let holders = |addr: &str| {
        ctl.hub
            .learned
            .holders(&workload, addr.parse().expect("an address"))
    };
    let id = |node: &str| {
        mesh_controller::xds::server::proxy_id(&scoped_node(node, true).expect("node")).expect("id")
    };
    wait_until("the pods read", || {
        ctl.hub.workload(&id("default/client-2"), None) == Some(workload.clone())
    })
    .await;
    // client-1 looks up a's VIP and an address with nothing there.
    let (tx1, mut resp1, got) =
        scoped_lds(&ctl, "default/client-1", &["10.96.0.1_80", "10.96.9.9_80"]).await;
    assert_eq!(got, ["10.96.0.1_80", "virtualInbound", "virtualOutbound"]);
    // client-2, of the same workload, starts with a's VIP; the absent address is not learned.
    let (tx2, mut resp2, got) = scoped_lds(&ctl, "default/client-2", &[]).await;
    assert_eq!(got, ["10.96.0.1_80", "virtualInbound", "virtualOutbound"]);
    // Another workload does not.
    let (_tx3, _resp3, got) = scoped_lds(&ctl, "default/other-0", &[]).await;
    assert_eq!(got, ["virtualInbound", "virtualOutbound"]);
    // client-2 also looks b up: client-1 is sent b, with its wildcard.
    subscribe_listener(&tx2, "10.96.0.2_80").await;
    let b = delta_next(&mut resp2).await;
    assert_eq!(b.resources.len(), 1, "{b:?}");
    delta_ack(&tx2, &b).await;
    let pushed = delta_next(&mut resp1).await;
    let got: Vec<&str> = pushed.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["10.96.0.2_80"]);
    delta_ack(&tx1, &pushed).await;
    // client-2 uses a too (it subscribes by name; it holds it already: nothing is sent).
    subscribe_listener(&tx2, "10.96.0.1_80").await;
    wait_until("both hold a", || holders("10.96.0.1:80") == 2).await;
    // client-1 lets a go as idle: client-2 still holds it, so client-1 keeps it.
    let unsubscribe = |name: &str| DeltaDiscoveryRequest {
        type_url: ResourceType::Listener.type_url(),
        resource_names_unsubscribe: vec![name.into()],
        ..Default::default()
    };
    tx1.send(unsubscribe("10.96.0.1_80")).await.expect("send");
    // Once the controller let go of client-1's hold, its answer (if any) was sent.
    wait_until("client-1 let go of a", || holders("10.96.0.1:80") == 1).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), resp1.next())
            .await
            .is_err(),
        "client-1 keeps a, which its workload uses"
    );
    // client-2 lets it go too: no pod uses it, and both are told it is gone.
    tx2.send(unsubscribe("10.96.0.1_80")).await.expect("send");
    for resp in [&mut resp1, &mut resp2] {
        let gone = delta_next(resp).await;
        assert_eq!(gone.removed_resources, ["10.96.0.1_80"], "{gone:?}");
    }
    // client-2's pod goes away: what it held (b) is remembered for the pod that replaces it.
    drop((tx2, resp2));
    wait_until("client-2 let go of b", || holders("10.96.0.2:80") == 0).await;
    let (_tx3, mut resp3, got) = scoped_lds(&ctl, "default/client-3", &[]).await;
    assert_eq!(got, ["10.96.0.2_80", "virtualInbound", "virtualOutbound"]);
    // A Service comes to the address client-1 asked for in vain: learned, and client-3 is
    // sent it too.
    assert_eq!(holders("10.96.9.9:80"), 0);
    std::fs::write(
        dir.path().join("late.yaml"),
        service_yaml("default", "late", "10.96.9.9", &[("http", 80)]),
    )
    .expect("write");
    let late = delta_next(&mut resp1).await;
    let got: Vec<&str> = late.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["10.96.9.9_80"], "{late:?}");
    wait_until("client-1 holds the late one", || {
        holders("10.96.9.9:80") == 1
    })
    .await;
    let late = delta_next(&mut resp3).await;
    let got: Vec<&str> = late.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(got, ["10.96.9.9_80"], "{late:?}");
}

/// Waits, up to 10 s, until `check` holds.
async fn wait_until(what: &str, check: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never: {what}"));
}
