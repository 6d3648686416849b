//! The certificate service end to end: a CA in-process on loopback, a client over mesh TLS
//! that checks it reaches the CA's identity, local-mesh tokens, refusals and their metrics,
//! and a trust bundle change picked up from the CA directory.

use std::time::{Duration, SystemTime};

use mesh_api::SpiffeId;
use mesh_api::ca_proto::certificate_service_client::CertificateServiceClient;
use mesh_api::ca_proto::{AUTHORIZATION, CreateCertificateRequest};
use mesh_api::tls::{Bundle, Identity};
use mesh_ca::auth::LocalTokens;
use mesh_ca::run::{CaConfig, Running};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::Code;

const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

fn csr(key: &KeyPair, sans: &[&str]) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().expect("uri")))
        .collect();
    p.serialize_request(key).expect("csr").der().to_vec()
}

/// A client that trusts the CA directory's root and expects the CA's own identity.
fn client(
    ca: &Running,
    dir: &std::path::Path,
) -> CertificateServiceClient<tonic::transport::Channel> {
    let pem = std::fs::read_to_string(dir.join("ca.crt")).expect("ca.crt");
    let bundle = Bundle::from_pem(&pem, "ca.crt").expect("bundle");
    let identity = Identity::new("cluster.local", bundle, Box::new(|_, _| {}));
    let ca_id = SpiffeId::parse("spiffe://cluster.local/ns/mesh-system/sa/mesh-ca").expect("id");
    let config = identity
        .client_config(vec![ca_id], &[b"h2"], false)
        .expect("config");
    CertificateServiceClient::new(mesh_api::tls::grpc::channel(
        ca.addr.to_string(),
        config,
        Duration::from_secs(2),
    ))
}

fn request(
    token: Option<&str>,
    csr: Vec<u8>,
    secs: u64,
) -> tonic::Request<CreateCertificateRequest> {
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_seconds: secs,
    });
    if let Some(t) = token {
        req.metadata_mut().insert(
            AUTHORIZATION,
            format!("Bearer {t}").parse().expect("metadata"),
        );
    }
    req
}

async fn metrics(ca: &Running) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(ca.admin_addr)
        .await
        .expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn a_workload_with_a_local_token_gets_an_svid_it_can_use() {
    let dir = tempfile::tempdir().expect("dir");
    let mut config = CaConfig::local(dir.path());
    config.max_lifetime = Duration::from_secs(3600);
    let ca = Running::start(config).await.expect("ca starts");
    let tokens = LocalTokens::load_or_generate(dir.path(), "cluster.local").expect("tokens");
    let id = SpiffeId::parse(ID).expect("id");
    let token = tokens.issue(&id);
    let mut client = client(&ca, dir.path());

    let key = KeyPair::generate().expect("key");
    let resp = client
        .create_certificate(request(Some(&token), csr(&key, &[ID]), 7200))
        .await
        .expect("issued")
        .into_inner();
    assert_eq!(resp.spiffe_id, ID);
    assert_eq!(resp.trust_bundle.len(), 1);
    let chain: Vec<CertificateDer<'static>> = resp
        .cert_chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let bundle = Bundle::new(
        resp.trust_bundle
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
    )
    .expect("bundle");
    // The lifetime asked (2 h) is capped at the CA's maximum (1 h).
    let life = resp.not_after
        - i64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_secs(),
        )
        .expect("secs");
    assert!((3590..=3600).contains(&life), "lifetime {life}s");
    // The workload can install it: a valid SVID chaining to the bundle.
    let workload = Identity::new("cluster.local", bundle.clone(), Box::new(|_, _| {}));
    let current = workload
        .install(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            bundle,
            SystemTime::now(),
        )
        .expect("installs");
    assert_eq!(current.id, id);

    // Refusals: no token, a forged token, a CSR for someone else, garbage.
    let err = client
        .create_certificate(request(None, csr(&key, &[]), 0))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let other = LocalTokens::new(b"not the key", "cluster.local");
    let err = client
        .create_certificate(request(Some(&other.issue(&id)), csr(&key, &[]), 0))
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .create_certificate(request(
            Some(&token),
            csr(&key, &["spiffe://cluster.local/ns/kube-system/sa/admin"]),
            0,
        ))
        .await
        .expect_err("someone else");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("kube-system"), "{}", err.message());
    let err = client
        .create_certificate(request(Some(&token), b"garbage".to_vec(), 0))
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument);

    let m = metrics(&ca).await;
    for line in [
        "mesh_ca_certificates_issued_total 1",
        "mesh_ca_certificates_refused_total{reason=\"no_token\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"bad_token\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"identity_mismatch\"} 1",
        "mesh_ca_certificates_refused_total{reason=\"bad_csr\"} 1",
        "mesh_ca_trust_bundle_roots 1",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
}

#[tokio::test]
async fn a_standard_client_checks_the_ca_by_its_service_name() {
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    let dir = tempfile::tempdir().expect("dir");
    let ca = Running::start(CaConfig::local(dir.path()))
        .await
        .expect("ca starts");
    let pem = std::fs::read_to_string(dir.path().join("ca.crt")).expect("ca.crt");
    let bundle = Bundle::from_pem(&pem, "ca.crt").expect("bundle");
    let mut roots = rustls::RootCertStore::empty();
    for root in bundle.roots() {
        roots.add(root.clone()).expect("root");
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .expect("verifier");
    let current = ca.ca.serving.current().expect("a serving certificate");
    let chain = &current.chain;
    let now = UnixTime::now();
    let check = |name: &'static str| {
        let name = ServerName::try_from(name).expect("name");
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
    };
    check("mesh-ca.mesh-system.svc").expect("the name sidecars dial");
    check("mesh-ca.other.svc").expect_err("another Service");
}

#[tokio::test]
async fn a_root_added_to_the_directory_reaches_workloads() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = Running::start(CaConfig::local(dir.path()))
        .await
        .expect("ca");
    let next = tempfile::tempdir().expect("next root");
    mesh_ca::Authority::load_or_generate(next.path(), "cluster.local", SystemTime::now())
        .expect("new root");
    std::fs::copy(
        next.path().join("ca.crt"),
        dir.path().join("trust-bundle.pem"),
    )
    .expect("add the new root");
    let tokens = LocalTokens::load_or_generate(dir.path(), "cluster.local").expect("tokens");
    let token = tokens.issue(&SpiffeId::parse(ID).expect("id"));
    let mut client = client(&ca, dir.path());
    let key = KeyPair::generate().expect("key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = client
            .create_certificate(request(Some(&token), csr(&key, &[]), 0))
            .await
            .expect("issued")
            .into_inner();
        if resp.trust_bundle.len() == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "bundle never grew");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metrics(&ca).await.contains("mesh_ca_trust_bundle_roots 2"));
}

/// Kubernetes service account tokens, checked by TokenReview against an API server that knows
/// what it issued: a token is believed while it has not expired and its pod still exists, for
/// its own service account only. A token replayed after its pod is gone (or made again under
/// the same name), or after it expired, is refused; so is one of another account asking for
/// this one's identity.
#[tokio::test]
async fn a_kubernetes_token_is_believed_only_while_valid_and_only_for_its_account() {
    use mesh_api::fake_api::{FakeApi, Token};
    // The cluster admin's client: the chart's RBAC for mesh-ca is e2e/tests/rbac.rs's matter.
    let (admin, fake) = FakeApi::start();
    let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reviews-0", "namespace": "default"},
        "spec": {"serviceAccountName": "reviews"}});
    fake.insert(pod.clone());
    let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
    let bound = || {
        fake.state()
            .pod_token("default", "reviews-0", "mesh-ca", in_an_hour)
            .expect("the pod exists")
    };
    let (valid, expired) = (bound(), bound());
    {
        let mut s = fake.state();
        s.tokens.insert("valid".into(), valid);
        s.tokens.insert(
            "expired".into(),
            Token {
                expires: Some(SystemTime::now() - Duration::from_secs(1)),
                ..expired
            },
        );
        s.tokens.insert(
            "other-account".into(),
            Token::new("default", "ratings", "mesh-ca"),
        );
        s.tokens.insert(
            "other-audience".into(),
            Token::new("default", "reviews", "vault"),
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    let mut config = CaConfig::local(dir.path());
    config.local_tokens = false;
    config.kubernetes = true;
    let ca = Running::start_with(config, Some(admin))
        .await
        .expect("ca starts");
    let mut client = client(&ca, dir.path());
    let key = KeyPair::generate().expect("key");
    let ask = |token: &'static str| request(Some(token), csr(&key, &[ID]), 0);

    let resp = client
        .create_certificate(ask("valid"))
        .await
        .expect("a valid token is believed")
        .into_inner();
    assert_eq!(resp.spiffe_id, ID);
    for (token, why) in [
        ("expired", "expired"),
        ("other-audience", "audiences"),
        ("unknown", "invalid bearer token"),
    ] {
        let err = client
            .create_certificate(ask(token))
            .await
            .expect_err(token);
        assert_eq!(err.code(), Code::Unauthenticated, "{token}: {err}");
        assert!(err.message().contains(why), "{token}: {}", err.message());
    }
    let err = client
        .create_certificate(ask("other-account"))
        .await
        .expect_err("another account");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("ratings"), "{}", err.message());
    // The pod goes: its token, replayed, no longer proves anything.
    fake.state()
        .delete("/api/v1/namespaces/default/pods/reviews-0")
        .expect("the pod existed");
    let err = client
        .create_certificate(ask("valid"))
        .await
        .expect_err("replayed after its pod went");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message().contains("token has been invalidated"),
        "{}",
        err.message()
    );
    // A pod of the same name again (as a StatefulSet makes it): another pod, which the old
    // token was not issued to; its own token is believed.
    fake.insert(pod);
    let err = client
        .create_certificate(ask("valid"))
        .await
        .expect_err("replayed for a pod made again under its name");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(
        err.message()
            .contains("does not match service account pod ref claim"),
        "{}",
        err.message()
    );
    let renewed = bound();
    fake.state().tokens.insert("renewed".into(), renewed);
    let resp = client
        .create_certificate(ask("renewed"))
        .await
        .expect("the new pod's token is believed")
        .into_inner();
    assert_eq!(resp.spiffe_id, ID);
}
