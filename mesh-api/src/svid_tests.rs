use std::time::{Duration, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, date_time_ymd,
};

use super::*;

const TD: &str = "cluster.local";
const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

/// A well-formed SVID's parameters, valid through 2030.
fn good() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri(ID)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = date_time_ymd(2026, 1, 1);
    p.not_after = date_time_ymd(2030, 1, 1);
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5 string"))
}

fn der(p: CertificateParams) -> Vec<u8> {
    let key = KeyPair::generate().expect("key");
    p.self_signed(&key).expect("signs").der().to_vec()
}

/// 2027-01-01, inside the good validity.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_798_761_600)
}

fn check(p: CertificateParams, role: Role) -> Result<SpiffeId, SvidError> {
    check_leaf(&der(p), role, TD, None, now())
}

#[test]
fn a_good_svid_passes_for_both_roles() {
    for role in [Role::Client, Role::Server] {
        let id = check(good(), role).expect("valid");
        assert_eq!(id.as_str(), ID);
    }
    let want = SpiffeId::parse(ID).expect("id");
    assert!(check_leaf(&der(good()), Role::Server, TD, Some(&want), now()).is_ok());
}

#[test]
fn each_bad_certificate_has_its_own_reason() {
    let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(2100));
    type Mutate = Box<dyn Fn(&mut CertificateParams)>;
    let cases: Vec<(&str, Role, Mutate)> = vec![
        (
            "expired",
            Role::Server,
            Box::new(|p| {
                p.not_before = date_time_ymd(2020, 1, 1);
                p.not_after = date_time_ymd(2021, 1, 1);
            }),
        ),
        (
            "not_yet_valid",
            Role::Server,
            Box::new(|p| p.not_before = date_time_ymd(2029, 1, 1)),
        ),
        (
            "trust_domain",
            Role::Server,
            Box::new(|p| {
                p.subject_alt_names = vec![uri("spiffe://other.domain/ns/default/sa/reviews")];
            }),
        ),
        (
            "many_uri_sans",
            Role::Server,
            Box::new(|p| {
                p.subject_alt_names =
                    vec![uri(ID), uri("spiffe://cluster.local/ns/default/sa/other")];
            }),
        ),
        (
            "leaf_is_ca",
            Role::Server,
            Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
        ),
        (
            "key_cert_sign",
            Role::Server,
            Box::new(|p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ];
            }),
        ),
        (
            "no_uri_san",
            Role::Server,
            Box::new(|p| {
                p.subject_alt_names = vec![SanType::DnsName("reviews".try_into().expect("dns"))];
            }),
        ),
        (
            "missing_client_auth",
            Role::Client,
            Box::new(|p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }),
        ),
        (
            "spiffe_id_too_long",
            Role::Server,
            Box::new(move |p| p.subject_alt_names = vec![uri(&long)]),
        ),
        (
            "spiffe_id_empty_path",
            Role::Server,
            Box::new(|p| p.subject_alt_names = vec![uri("spiffe://cluster.local")]),
        ),
        (
            "bad_spiffe_id",
            Role::Server,
            Box::new(|p| p.subject_alt_names = vec![uri("spiffe://cluster.local/ns//sa/x")]),
        ),
        (
            "missing_server_auth",
            Role::Server,
            Box::new(|p| {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }),
        ),
        (
            "no_digital_signature",
            Role::Server,
            Box::new(|p| {
                p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
            }),
        ),
    ];
    for (want, role, mutate) in cases {
        let mut p = good();
        mutate(&mut p);
        let err = check(p, role).expect_err(want);
        assert_eq!(err.reason(), want, "{err}");
    }
    // Over 2,048 bytes and an empty path are refused for what they are.
    let mut p = good();
    p.subject_alt_names = vec![uri("spiffe://cluster.local")];
    assert!(matches!(
        check(p, Role::Server),
        Err(SvidError::BadId(SpiffeIdError::EmptyPath(_)))
    ));
    let mut p = good();
    p.subject_alt_names = vec![uri(&format!("spiffe://cluster.local/{}", "a".repeat(2100)))];
    assert!(matches!(
        check(p, Role::Server),
        Err(SvidError::BadId(SpiffeIdError::TooLong { .. }))
    ));
}

#[test]
fn the_wrong_identity_for_the_destination_is_refused() {
    let want = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/ratings").expect("id");
    let err = check_leaf(&der(good()), Role::Server, TD, Some(&want), now()).expect_err("wrong");
    assert_eq!(err.reason(), "wrong_identity");
    assert_eq!(
        err.to_string(),
        "peer is spiffe://cluster.local/ns/default/sa/reviews, expected spiffe://cluster.local/ns/default/sa/ratings"
    );
}

#[test]
fn garbage_is_a_parse_error() {
    let err = check_leaf(b"not a certificate", Role::Server, TD, None, now()).expect_err("garbage");
    assert_eq!(err.reason(), "parse");
}
