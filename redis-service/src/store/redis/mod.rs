//! Redis (one node) and Redis Cluster behind the [`Store`] trait.
//!
//! Every operation is one Lua script call ([`scripts`]: `lua/*.lua`, loaded with
//! `SCRIPT LOAD`, run with `EVALSHA`) over keys that share one hash tag, so it is
//! atomic and touches one slot. A batch is split by node and sent as one pipeline per
//! node, concurrently ([`batch`]): a batch costs one round trip per node. The backends
//! are [`single`] (one node) and [`cluster`] (slot map, masters, recovery); both speak
//! through the connections [`connection`] sets up.
//!
//! Checks and reports (`/v1/sync`) never share a connection: each node has one for
//! checks (and the short commands: pings, slot maps, reconciliation) and one for
//! reports. A connection is one ordered stream, so a check sent behind a 10 000-entry
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

pub use connection::RedisOptions;
pub use scripts::SYNC_CHUNK;

use super::{CheckOp, CheckOutcome, ItemResult, Store, StoreError, SyncOp, SyncOutcome};
use crate::config::Algorithm;
use crate::keys::KeyMaker;
use crate::shares::ShareParams;
use async_trait::async_trait;
use batch::{all_failed, Lane};
use cluster::Cluster;
use connection::connection_info;
use redis::Value;
use scripts::{check_outcome, sync_outcome, Call};
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
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Vec<ItemResult<SyncOutcome>> {
        if ops.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = ops
            .iter()
            .map(|op| self.keys.sw_key(&op.tag, op.window_secs))
            .collect();
        let per_call = self.backend.options().sync_chunk.max(1);
        let mut calls = Vec::new();
        // Per call, the indices of the entries it carries.
        let mut owners: Vec<Vec<usize>> = Vec::new();
        for group in self.backend.group_by_node(&keys) {
            for chunk in group.chunks(per_call) {
                calls.push(Call::sync(proxy, chunk, ops, &keys, params));
                owners.push(chunk.to_vec());
            }
        }
        let mut out = all_failed(ops.len(), &StoreError::Failed("no reply".into()));
        let replies = self
            .backend
            .run(&calls, Lane::Reports, &self.round_trips)
            .await;
        for (r, owner) in replies.into_iter().zip(owners) {
            let e = match r {
                Ok(Value::Array(items)) if items.len() == owner.len() => {
                    for (item, i) in items.into_iter().zip(owner) {
                        out[i] = sync_outcome(item);
                    }
                    continue;
                }
                Ok(Value::ServerError(e)) => StoreError::Failed(format!("{e:?}")),
                Ok(v) => StoreError::Failed(format!("unexpected sync reply {v:?}")),
                Err(e) => e,
            };
            for i in owner {
                out[i] = Err(e.clone());
            }
        }
        out
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
