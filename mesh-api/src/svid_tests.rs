use std::time::{Duration, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair, date_time_ymd};

use super::*;
use crate::svid_cases::{ID, bad_svids, good_svid, uri};

const TD: &str = "cluster.local";

/// A well-formed SVID's parameters, valid through 2030.
fn good() -> CertificateParams {
    good_svid(date_time_ymd(2026, 1, 1), date_time_ymd(2030, 1, 1))
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
    let cases = bad_svids();
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
