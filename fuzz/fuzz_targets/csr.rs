//! mesh-ca's signing of a CSR: arbitrary bytes as the CSR of a caller proven to be
//! `ns/shop/sa/cart`. A CSR is refused with an error, or the certificate issued names that
//! identity and at most its own Service's DNS name, whatever the CSR asked for.

#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mesh_api::SpiffeId;
use mesh_ca::authority::Authority;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const CALLER: &str = "spiffe://cluster.local/ns/shop/sa/cart";

static CA: LazyLock<Authority> =
    LazyLock::new(|| Authority::generate("cluster.local", SystemTime::now()).expect("a CA"));

fuzz_target!(|data: &[u8]| {
    let caller = SpiffeId::parse(CALLER).expect("the caller's ID");
    let Ok(issued) = CA.sign(data, &caller, Duration::from_secs(3600), SystemTime::now()) else {
        return;
    };
    let (_, leaf) = X509Certificate::from_der(&issued.chain[0]).expect("an issued certificate");
    let sans = leaf
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("SANs");
    for name in &sans.value.general_names {
        match name {
            GeneralName::URI(u) => assert_eq!(*u, CALLER, "another identity issued"),
            GeneralName::DNSName(d) => assert_eq!(*d, "cart.shop.svc", "another name issued"),
            other => panic!("issued a SAN the caller was never granted: {other:?}"),
        }
    }
});
