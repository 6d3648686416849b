//! Bad SVIDs for tests: each a change to a good SVID (valid 2026 through 2030, or around now),
//! with the reason it must be refused for and the role it is checked in.

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
    date_time_ymd,
};

use crate::svid::Role;

pub const ID: &str = "spiffe://cluster.local/ns/default/sa/reviews";

pub type Mutate = Box<dyn Fn(&mut CertificateParams)>;

pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("ia5 string"))
}

/// A well-formed SVID for [`ID`], valid between the two times.
pub fn good_svid(
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri(ID)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    p
}

pub fn bad_svids() -> Vec<(&'static str, Role, Mutate)> {
    let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(2100));
    vec![
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
    ]
}
