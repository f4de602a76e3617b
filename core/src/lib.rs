//! The pure core of meshlimit: everything the filter and the companion service decide,
//! with no host calls, so it is unit-tested natively and (with `wasm-bindgen-test`)
//! inside wasm.
//!
//! - [`config`]: the plugin configuration (JSON), validated with field paths in errors.
//! - [`path`]: request paths in normal form, so every spelling of a path meets its rule.
//! - [`matching`]: which rules a request falls under, and where its client id comes from.
//! - [`gcra`]: token buckets as GCRA (one timestamp per limit), multi-limit all-or-nothing.
//! - [`table`]: the fixed-size table of bucket entries kept in Envoy shared data, and the
//!   compare-and-swap loop every token take goes through.
//! - [`host`]: what the core needs from the proxy (shared data with CAS), as small traits
//!   the filter implements once and the tests implement in memory.
//! - [`headers`]: which rate-limit headers a response gets and their values (`X-RateLimit-*`,
//!   IETF `RateLimit`/`RateLimit-Policy`), `Retry-After` and the 429 body.
//! - [`hash`]: a stable 64-bit hash for client ids (the same in every VM and process).
//! - [`protocol`]: the filter ⇄ companion wire types (`/v1/sync`, `/rate-limit/check`).
//! - Global scope (`docs/global-limits.md`): [`global`] (a key's share state in its
//!   table entry, which share applies, admission at a share), [`report`] (which keys a
//!   proxy reports, the bounded candidate and tracked sets), [`shares`] (the
//!   companion's work-conserving share allocation).
//! - [`json`]: records are read from JSON objects only (never arrays by position),
//!   choices from strings only; the companion's body parsing.

pub mod config;
pub mod gcra;
pub mod global;
pub mod hash;
pub mod headers;
pub mod host;
pub mod json;
pub mod matching;
pub mod path;
pub mod protocol;
pub mod report;
pub mod shares;
pub mod table;

/// The unit tests run natively with `cargo test` and, unchanged, inside wasm
/// (`wasm32-unknown-unknown` under Node, via `wasm-bindgen-test`): every test module
/// imports this `test` attribute, which is the standard one natively and
/// `wasm_bindgen_test` in wasm. See `scripts/test.sh`.
#[cfg(test)]
pub(crate) mod testing {
    #[cfg(not(target_arch = "wasm32"))]
    pub use core::prelude::v1::test;
    #[cfg(target_arch = "wasm32")]
    pub use wasm_bindgen_test::wasm_bindgen_test as test;
}
