//! meshlimit: a proxy-wasm rate-limit filter for Envoy and Istio.
//!
//! This crate is the thin adapter between Envoy and the pure core (`meshlimit-core`),
//! which decides everything:
//! - [`http`]: per request, match a rule, find the client, take tokens from the bucket
//!   table, answer 429 (or 400) or add the rate-limit headers to the response;
//! - [`root`]: per VM, the configuration, the bucket table set-up, metrics flushing on
//!   ticks;
//! - [`host`]: every proxy-wasm host call, including the shared data the core's bucket
//!   table (`meshlimit_core::table`) reads and CAS-writes through;
//! - [`metrics`]: counters kept in the VM and flushed to Envoy once per tick.

mod host;
mod http;
mod metrics;
mod root;
mod service;
mod sync;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::default())
    });
}}
