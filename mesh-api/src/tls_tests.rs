use std::sync::Mutex;

use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::{ClientConnection, ServerConnection};

use super::*;
use crate::svid_cases::{ID, bad_svids, good_svid, uri};

const TD: &str = "cluster.local";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2040, 1, 1);
    let der = p.self_signed(&key).expect("root").der().clone();
    Ca {
        issuer: Issuer::new(p, key),
        der,
    }
}

/// A well-formed SVID valid from an hour ago to an hour from now.
fn good() -> CertificateParams {
    let now = time::OffsetDateTime::now_utc();
    good_svid(
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    )
}

fn issue(ca: &Ca, p: &CertificateParams) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().expect("key");
    let leaf = p.signed_by(&key, &ca.issuer).expect("signs");
    (
        vec![leaf.der().clone(), ca.der.clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

type Seen = Arc<Mutex<Vec<(Role, &'static str)>>>;

fn identity(roots: &[&Ca]) -> (Arc<Identity>, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let bundle = Bundle::new(roots.iter().map(|c| c.der.clone()).collect()).expect("bundle");
    let id = Identity::new(
        TD,
        bundle,
        Box::new(move |role, r| log.lock().expect("lock").push((role, r.reason))),
    );
    (id, seen)
}

#[test]
fn each_bad_peer_certificate_is_refused_for_its_own_reason() {
    let root = ca("root");
    let other = ca("other root");
    let (id, seen) = identity(&[&root]);
    let cases = bad_svids();
    let now = SystemTime::now();
    for (want, role, mutate) in &cases {
        let mut p = good();
        mutate(&mut p);
        let (chain, _) = issue(&root, &p);
        let err = id
            .verify(*role, &chain[0], &chain[1..], &[], now)
            .expect_err(want);
        assert_eq!(err.reason, *want, "{err}");
    }
    // A good SVID from a root nobody trusts.
    let (chain, _) = issue(&other, &good());
    let err = id
        .verify(Role::Client, &chain[0], &chain[1..], &[], now)
        .expect_err("untrusted");
    assert_eq!(err.reason, "untrusted_root", "{err}");
    // A good SVID of another workload than the destination should be.
    let (chain, _) = issue(&root, &good());
    let ratings = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/ratings").expect("id");
    let err = id
        .verify(Role::Server, &chain[0], &chain[1..], &[ratings], now)
        .expect_err("wrong identity");
    assert_eq!(err.reason, "wrong_identity", "{err}");
    // And the good one passes, for either role.
    for role in [Role::Client, Role::Server] {
        let got = id
            .verify(role, &chain[0], &chain[1..], &[], now)
            .expect("valid");
        assert_eq!(got.as_str(), ID);
    }
    let reasons: Vec<&str> = seen.lock().expect("lock").iter().map(|s| s.1).collect();
    assert_eq!(
        reasons.len(),
        cases.len() + 2,
        "every refusal reported: {reasons:?}"
    );
}

/// Runs a handshake between two in-memory connections.
fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), String> {
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).map_err(|e| e.to_string())?;
        }
        if !buf.is_empty() {
            server.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            server
                .process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).map_err(|e| e.to_string())?;
        }
        if !buf.is_empty() {
            client.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            client
                .process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err("handshake did not finish".into())
}

fn workload(root: &Ca, roots: &[&Ca], sa: &str) -> (Arc<Identity>, Seen) {
    let (identity, seen) = identity(roots);
    let mut p = good();
    p.subject_alt_names = vec![uri(&format!("spiffe://cluster.local/ns/default/sa/{sa}"))];
    let (chain, key) = issue(root, &p);
    let bundle = identity.bundle().as_ref().clone();
    identity
        .install(chain, key, bundle, SystemTime::now())
        .expect("installs");
    (identity, seen)
}

fn connect(
    client: &Arc<Identity>,
    server: &Arc<Identity>,
    expect: &str,
) -> (Result<(), String>, Option<SpiffeId>) {
    let expected = vec![SpiffeId::parse(expect).expect("id")];
    let cc = client
        .client_config(expected, &[ALPN_H2], true)
        .expect("client config");
    let sc = server.server_config().expect("server config");
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut c = ClientConnection::new(cc, name).expect("client");
    let mut s = ServerConnection::new(sc).expect("server");
    let r = handshake(&mut c, &mut s);
    let peer = s
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|der| peer_id(der));
    (r, peer)
}

#[test]
fn mutual_tls_names_both_sides_and_refuses_the_wrong_server() {
    let root = ca("root");
    let (productpage, _) = workload(&root, &[&root], "productpage");
    let (reviews, seen) = workload(&root, &[&root], "reviews");
    let (r, peer) = connect(&productpage, &reviews, ID);
    r.expect("handshake");
    assert_eq!(
        peer.map(|p| p.to_string()).as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/productpage")
    );
    assert!(seen.lock().expect("lock").is_empty());

    let (r, _) = connect(
        &productpage,
        &reviews,
        "spiffe://cluster.local/ns/default/sa/ratings",
    );
    let err = r.expect_err("wrong server identity");
    assert!(
        err.contains("expected spiffe://cluster.local/ns/default/sa/ratings"),
        "{err}"
    );
}

#[test]
fn a_client_from_an_untrusted_root_is_refused_and_counted() {
    let root = ca("root");
    let other = ca("other");
    let (intruder, _) = workload(&other, &[&root, &other], "productpage");
    let (reviews, seen) = workload(&root, &[&root], "reviews");
    let (r, _) = connect(&intruder, &reviews, ID);
    assert!(r.is_err());
    assert_eq!(
        seen.lock().expect("lock").as_slice(),
        &[(Role::Client, "untrusted_root")]
    );
}

#[test]
fn an_expired_svid_is_never_presented() {
    let root = ca("root");
    let (identity, _) = identity(&[&root]);
    let mut p = good();
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let (chain, key) = issue(&root, &p);
    let bundle = identity.bundle().as_ref().clone();
    identity
        .install(chain, key, bundle, SystemTime::now())
        .expect("installs");
    assert!(identity.has_valid_svid());
    std::thread::sleep(Duration::from_millis(2100));
    assert!(!identity.has_valid_svid());
}

#[test]
fn install_refuses_a_certificate_outside_the_bundle() {
    let root = ca("root");
    let other = ca("other");
    let (identity, _) = identity(&[&root]);
    let (chain, key) = issue(&other, &good());
    let bundle = identity.bundle().as_ref().clone();
    let err = identity
        .install(chain, key, bundle, SystemTime::now())
        .expect_err("untrusted");
    assert!(err.contains("does not chain"), "{err}");
    assert!(!identity.has_valid_svid());
}
