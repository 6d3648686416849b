//! meshctl's readers of what proxies and the controller answer: arbitrary text as Prometheus
//! exposition (`meshctl check`, the controller's scrape of proxies), and, when it is JSON, as
//! the controller's stat and authz answers rendered as tables. Nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let samples = mesh_api::prom::parse(text);
    if let Some(first) = text.split_whitespace().next() {
        let _ = mesh_api::prom::sample(text, first);
    }
    drop(samples);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let mut out = Vec::new();
        let _ = meshctl::cmd::stat::write_stat(&v, "default", &mut out);
        let _ = meshctl::cmd::authz::write_authz(&v, &mut out);
    }
});
