//! The plugin configuration from raw bytes (`meshlimit_core::config::parse`), as Envoy
//! hands it to the filter. Seeded with the shipped configurations and a dictionary of the
//! schema's names and edge values (`fuzz/dict/config.dict`); the properties are in
//! `meshlimit_fuzz::config_checks`: a refusal is one clean log line; an accepted
//! configuration is one JSON document without repeated keys or records read from arrays,
//! and holds every invariant the request path relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = meshlimit_fuzz::config_checks::check(data);
});
