//! SPIFFE IDs and SVIDs: arbitrary text as a SPIFFE ID, arbitrary DER as a peer's leaf
//! certificate, for both roles. Nothing panics; a parsed ID prints back as itself and parses
//! again; an accepted leaf names an ID of the trust domain.

#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mesh_api::SpiffeId;
use mesh_api::svid::{Role, check_leaf};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(id) = SpiffeId::parse(text)
    {
        let again = SpiffeId::parse(id.as_str()).expect("a parsed ID parses again");
        assert_eq!(again, id);
        let _ = id.namespace_and_account();
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for role in [Role::Client, Role::Server] {
        if let Ok(id) = check_leaf(data, role, "cluster.local", None, now) {
            assert_eq!(id.trust_domain(), "cluster.local");
        }
    }
    let _ = mesh_api::tls::peer_id(data);
});
