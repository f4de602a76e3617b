//! meshlimit: a proxy-wasm rate-limit filter for Envoy and Istio.
//!
//! This crate is the thin adapter between Envoy and the pure core (`meshlimit-core`):
//! - [`root`]: configuration, the bucket table set-up, metrics flushing on ticks;
//! - [`http`]: per request, match a rule, find the client, decide, answer 429 or add
//!   rate-limit headers to the response;
//! - [`buckets`]: the table of token buckets in Envoy shared data (read + CAS);
//! - [`metrics`]: counters kept in the VM and flushed to Envoy once per tick.

mod buckets;
mod http;
mod metrics;
mod root;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(root::Root::default())
    });
}}
