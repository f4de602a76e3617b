//! meshlimit companion service: keeps the global counts that every proxy shares, in an
//! embedded store, Redis, or Redis Cluster, and answers the filter's batched reports
//! (`/v1/sync`) and the seed's synchronous check (`/rate-limit/check`).
//!
//! The binary (`src/main.rs`) only wires these modules together ([`server::run`] is the
//! accept loop); the bench command and the
//! integration tests reuse [`client`] to speak HTTP to a running service.

pub mod auth;
pub mod client;
pub mod config;
pub mod fallback;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod service;
pub mod shares;
pub mod store;
