//! meshlimit companion service: keeps the global counts that every proxy shares, in an
//! embedded store, Redis, or Redis Cluster, and answers the filter's batched reports
//! (`/v1/sync`) and a synchronous check (`/rate-limit/check`) for gateways that want
//! one.
//!
//! The binary (`src/main.rs`) parses the command line and calls [`server::run`] with a
//! [`service::Service`] set up by [`service::Service::start`]: the decisions live in
//! [`service`] and [`fallback`], the stores behind the [`store::Store`] trait, the HTTP
//! routes in [`http`].

pub mod auth;
pub mod config;
pub mod fallback;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod server;
pub mod service;
pub mod shares;
pub mod store;
