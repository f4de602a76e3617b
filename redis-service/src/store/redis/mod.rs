//! Redis (one node) and Redis Cluster behind the [`Store`] trait.
//!
//! Every operation is one Lua script call ([`scripts`]: `lua/*.lua`, loaded with
//! `SCRIPT LOAD`, run with `EVALSHA`) over keys that share one hash tag, so it is
//! atomic and touches one slot. A batch is split by node and sent as one pipeline per
//! node, concurrently ([`batch`]): a batch costs one round trip per node. The backends
//! are [`single`] (one node) and [`cluster`] (slot map, masters, recovery); both speak
//! through the connections [`connection`] sets up.
//!
//! Reports, their registry step and records, are [`sync`]'s. Checks and strict checks
//! on one side, reports (`/v1/sync`) on the other, never share a connection: each node
//! has one for checks (strict checks, and the short commands: pings, slot maps,
//! reconciliation) and one for reports. A connection is one ordered stream, so a check sent behind a 10 000-entry
//! report on the same connection would wait for the whole report; on its own connection
//! it waits at most for the one script call Redis is running when it arrives (Redis
//! serves its clients in turn, a read's worth of commands each), which [`SYNC_CHUNK`]
//! keeps short. The report connections are created on the reports' runtime
//! ([`RedisOptions::report_runtime`]), so that their I/O is driven there too, away from
//! the workers that answer checks.

mod batch;
mod cluster;
mod connection;
mod scripts;
mod single;
mod sync;

pub use connection::RedisOptions;
pub use scripts::SYNC_CHUNK;

use super::{CheckOp, CheckOutcome, ItemResult, Store, StoreError, StrictOp, SyncOp, SyncOutcome};
use crate::config::Algorithm;
use crate::keys::KeyMaker;
use async_trait::async_trait;
use batch::Lane;
use cluster::Cluster;
use connection::connection_info;
use meshlimit_core::protocol::StrictAnswer;
use meshlimit_core::shares::ShareParams;
use redis::Value;
use scripts::{check_outcome, Call};
use single::Single;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct RedisStore {
    keys: KeyMaker,
    backend: Backend,
    round_trips: AtomicU64,
}

enum Backend {
    Single(Single),
    Cluster(Cluster),
}

impl Backend {
    fn options(&self) -> &RedisOptions {
        match self {
            Backend::Single(s) => s.options(),
            Backend::Cluster(c) => c.options(),
        }
    }

    /// Indices of `keys` grouped by the node that serves them.
    fn group_by_node(&self, keys: &[String]) -> Vec<Vec<usize>> {
        match self {
            Backend::Single(_) => vec![(0..keys.len()).collect()],
            Backend::Cluster(c) => c.group_by_node(keys),
        }
    }

    async fn run(
        &self,
        calls: &[Call],
        lane: Lane,
        round_trips: &AtomicU64,
    ) -> Vec<ItemResult<Value>> {
        if calls.is_empty() {
            return Vec::new();
        }
        match self {
            Backend::Single(s) => s.run(calls, lane, round_trips).await,
            Backend::Cluster(c) => c.run(calls, lane, round_trips).await,
        }
    }
}

impl RedisStore {
    /// One node at `url`. Nothing is connected yet (see [`Store::start`]).
    pub fn single(url: &str, opts: RedisOptions, keys: KeyMaker) -> Result<Self, String> {
        let info = connection_info(url, &opts)?;
        Ok(RedisStore::new(
            Backend::Single(Single::new(info, opts)),
            keys,
        ))
    }

    /// A cluster found through any of `seeds`. Nothing is connected yet.
    pub fn cluster(seeds: &[String], opts: RedisOptions, keys: KeyMaker) -> Result<Self, String> {
        if seeds.is_empty() {
            return Err("no cluster seed nodes".into());
        }
        let seeds = seeds
            .iter()
            .map(|s| connection_info(s.trim(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RedisStore::new(
            Backend::Cluster(Cluster::new(seeds, opts)),
            keys,
        ))
    }

    fn new(backend: Backend, keys: KeyMaker) -> Self {
        RedisStore {
            keys,
            backend,
            round_trips: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        match self.backend {
            Backend::Single(_) => "redis",
            Backend::Cluster(_) => "redis-cluster",
        }
    }

    /// Connects and loads the scripts (cluster: reads the slot map and connects to every
    /// master). Failing here is not final: every call connects again as needed.
    async fn start(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Single(s) => s.connection(Lane::Check).await.map(|_| ()),
            Backend::Cluster(c) => c.connect().await,
        }
    }

    async fn check(&self, algo: Algorithm, ops: &[CheckOp]) -> Vec<ItemResult<CheckOutcome>> {
        let calls: Vec<Call> = ops
            .iter()
            .map(|op| Call::check(&self.keys, algo, op))
            .collect();
        // Reconciliation (forced calls) travels with the checks too: it runs while the
        // service is degraded, when no check uses the store, and must not queue behind
        // reports (it is what ends degraded mode).
        self.backend
            .run(&calls, Lane::Check, &self.round_trips)
            .await
            .into_iter()
            .map(|r| r.and_then(check_outcome))
            .collect()
    }

    async fn sync(
        &self,
        proxy: &str,
        interval_ms: u64,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Result<SyncOutcome, StoreError> {
        self.sync_report(proxy, interval_ms, ops, params).await
    }

    async fn add_counts(&self, ops: &[SyncOp]) -> Vec<ItemResult<()>> {
        self.add_record_counts(ops).await
    }

    async fn strict(&self, op: &StrictOp) -> ItemResult<StrictAnswer> {
        self.strict_check(op).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Single(s) => s.ping().await,
            Backend::Cluster(c) => c.ping().await,
        }
    }

    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }
}
