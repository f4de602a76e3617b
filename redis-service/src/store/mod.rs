//! The one trait every store implements: the embedded in-memory store (default, and the
//! degraded-mode fallback) and Redis / Redis Cluster.
//!
//! Calls take batches and answer per item, so that one bad slot in a cluster fails only
//! the items that live there, and the caller can send exactly those to the fallback
//! without counting the others twice.

pub mod memory;
pub mod redis;

use self::redis::{RedisOptions, RedisStore};
use crate::config::{Algorithm, Config};
use crate::keys::KeyMaker;
use crate::shares::ShareParams;
use async_trait::async_trait;
use memory::MemoryStore;
use std::fmt;
use std::sync::Arc;

/// One limit as the store sees it (copied out of `meshlimit_core::config::Limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoreLimit {
    pub window_secs: u64,
    pub max: u64,
    pub burst: u64,
}

impl From<&meshlimit_core::config::Limit> for StoreLimit {
    fn from(l: &meshlimit_core::config::Limit) -> Self {
        StoreLimit {
            window_secs: l.window_secs,
            max: l.max,
            burst: l.burst,
        }
    }
}

/// Count `hits` against every limit of one (rule, client), all-or-nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckOp {
    /// Hash tag from [`crate::keys::KeyMaker::tag`].
    pub tag: String,
    pub limits: Vec<StoreLimit>,
    pub hits: u64,
    /// Add the hits whatever the limits say (reconciling counts a fallback already
    /// admitted). The answer still reports the state.
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Index of the tightest limit (fewest left).
    pub tightest: usize,
    pub remaining: u64,
    /// Unix seconds.
    pub reset_at: u64,
    /// Refused: milliseconds until the request could pass.
    pub retry_after_ms: u64,
}

/// One entry of a proxy's report: add `admitted` to the key's global count (sliding
/// window) and allocate this proxy's share.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncOp {
    pub tag: String,
    pub window_secs: u64,
    pub max: u64,
    pub admitted: u64,
    /// Demand (admitted + rejected) per second over the report's span.
    pub rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncOutcome {
    pub used: u64,
    pub remaining: u64,
    pub reset_at: u64,
    pub weight: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Cannot reach the store (connection refused/reset/closed).
    Unavailable(String),
    /// Reached, but no answer in time (a deadline, a response timeout).
    Slow(String),
    /// The store answered with an error (MOVED loop, CLUSTERDOWN, script error, ...).
    Failed(String),
}

impl StoreError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Slow(_) => "slow",
            StoreError::Failed(_) => "failed",
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
            StoreError::Slow(m) => write!(f, "store too slow: {m}"),
            StoreError::Failed(m) => write!(f, "store error: {m}"),
        }
    }
}

pub type ItemResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Connects and starts the store's own upkeep (the embedded store's sweep of expired
    /// keys); called once, inside the runtime, before the first call. An error is not
    /// final: calls connect again as needed, and the service starts degraded.
    async fn start(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn check(&self, algo: Algorithm, ops: &[CheckOp]) -> Vec<ItemResult<CheckOutcome>>;

    async fn sync(
        &self,
        proxy: &str,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Vec<ItemResult<SyncOutcome>>;

    /// Reachable and able to serve (for `/readyz` and the degraded-mode probe).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Store round trips so far (for the bench's "round trips per request").
    fn round_trips(&self) -> u64 {
        0
    }
}

/// The store `cfg` names: one Redis node, a Redis Cluster, or the embedded store.
/// Nothing is connected yet ([`Store::start`] does that). `reports` is the runtime the
/// report connections are driven on (`None`: the caller's).
pub fn from_config(
    cfg: &Config,
    keys: KeyMaker,
    reports: Option<tokio::runtime::Handle>,
) -> Result<Arc<dyn Store>, String> {
    if let Some(url) = &cfg.redis_url {
        let opts = RedisOptions::from_config(cfg, reports)?;
        Ok(Arc::new(RedisStore::single(url, opts, keys)?))
    } else if !cfg.redis_cluster.is_empty() {
        let opts = RedisOptions::from_config(cfg, reports)?;
        Ok(Arc::new(RedisStore::cluster(
            &cfg.redis_cluster,
            opts,
            keys,
        )?))
    } else {
        Ok(Arc::new(MemoryStore::new(keys, memory::MAX_KEYS)))
    }
}
