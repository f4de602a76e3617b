//! Reports, reconciled counts and strict checks in Redis.
//!
//! A report costs two steps: `lua/liveness.lua` on the registry's node (one round trip:
//! the proxy's heartbeat, the live count, the recently dead), then its records, one
//! `lua/sync.lua` call per [`SYNC_CHUNK`](super::SYNC_CHUNK) records of one node, one
//! pipeline per node, concurrently (one round trip per node). The dead ids travel in
//! every call's ARGV, so the per-key script drops their peers without reading the
//! registry (which lives in another slot, often on another node). An empty report (a
//! heartbeat) is the first step alone.

use super::batch::Lane;
use super::scripts::{
    liveness_outcome, record_outcome, strict_outcome, Call, RecordMode, RecordOp, RecordOutcome,
};
use super::RedisStore;
use crate::store::{ItemResult, KeyOutcome, Liveness, StoreError, StrictOp, SyncOp, SyncOutcome};
use meshlimit_core::protocol::StrictAnswer;
use meshlimit_core::shares::ShareParams;
use redis::Value;

impl RedisStore {
    /// A whole report: heartbeat, then the records.
    pub(super) async fn sync_report(
        &self,
        proxy: &str,
        interval_ms: u64,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Result<SyncOutcome, StoreError> {
        let live = self.heartbeat(proxy, interval_ms, params.lease_ms).await?;
        let keys = self
            .sync_records(proxy, interval_ms, &live.dead, ops, params)
            .await;
        Ok(SyncOutcome {
            proxies: live.live,
            keys,
        })
    }

    /// Marks `proxy` live (one `lua/liveness.lua` call, on the report lane).
    pub async fn heartbeat(
        &self,
        proxy: &str,
        interval_ms: u64,
        lease_ms: u64,
    ) -> Result<Liveness, StoreError> {
        let call = Call::liveness(self.keys.registry_key(), proxy, interval_ms, lease_ms);
        let mut r = self
            .backend
            .run(&[call], Lane::Reports, &self.round_trips)
            .await;
        match r.pop() {
            Some(Ok(v)) => liveness_outcome(v),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::Failed("no liveness reply".into())),
        }
    }

    /// The per-key step alone: `ops` of `proxy`, with `dead` the proxies whose peers go
    /// (what [`RedisStore::heartbeat`] answered; the parity test passes its own).
    pub async fn sync_records(
        &self,
        proxy: &str,
        interval_ms: u64,
        dead: &[String],
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Vec<ItemResult<KeyOutcome>> {
        let (records, owners) = self.records(ops, |op| {
            if op.release {
                RecordMode::Release
            } else {
                RecordMode::Allocate
            }
        });
        let results = self
            .run_records(proxy, interval_ms, dead, params, &records, Lane::Reports)
            .await;
        let mut out: Vec<ItemResult<KeyOutcome>> = ops
            .iter()
            .map(|op| {
                Ok(KeyOutcome {
                    shares: Vec::with_capacity(op.limits.len()),
                    pending: false,
                    used: Vec::with_capacity(op.limits.len()),
                })
            })
            .collect();
        // Records come in op order, limits in order, so each op's shares fill in order.
        for (r, &op) in results.into_iter().zip(&owners) {
            let slot = &mut out[op];
            match (r, slot.as_mut()) {
                (Ok(o), Ok(k)) => {
                    k.shares.push(o.grant);
                    k.used.push(o.used);
                    k.pending |= o.grant < o.target;
                }
                (Err(e), Ok(_)) => *slot = Err(e),
                (_, Err(_)) => {}
            }
        }
        out
    }

    /// Reconciliation: what a fallback admitted, added to the records' counts. On the
    /// check lane, like the checks' reconciliation (it is what ends degraded mode).
    pub(super) async fn add_record_counts(&self, ops: &[SyncOp]) -> Vec<ItemResult<()>> {
        let (records, owners) = self.records(ops, |_| RecordMode::Count);
        let results = self
            .run_records("", 1, &[], &ShareParams::default(), &records, Lane::Check)
            .await;
        let mut out: Vec<ItemResult<()>> = ops.iter().map(|_| Ok(())).collect();
        for (r, &op) in results.into_iter().zip(&owners) {
            if let Err(e) = r {
                out[op] = Err(e);
            }
        }
        out
    }

    /// One strict check: one `lua/strict.lua` call on the check lane, so it never waits
    /// behind a report.
    pub(super) async fn strict_check(&self, op: &StrictOp) -> ItemResult<StrictAnswer> {
        let call = Call::strict(&self.keys, op);
        let mut r = self
            .backend
            .run(&[call], Lane::Check, &self.round_trips)
            .await;
        match r.pop() {
            Some(Ok(v)) => strict_outcome(v),
            Some(Err(e)) => Err(e),
            None => Err(StoreError::Failed("no strict reply".into())),
        }
    }

    /// One record per (op, limit), in order, and the op each belongs to.
    fn records(
        &self,
        ops: &[SyncOp],
        mode: impl Fn(&SyncOp) -> RecordMode,
    ) -> (Vec<RecordOp>, Vec<usize>) {
        let mut records = Vec::new();
        let mut owners = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            for l in &op.limits {
                records.push(RecordOp {
                    key: self.keys.record_key(&op.tag, l.window_secs, l.max, l.burst),
                    window_secs: l.window_secs,
                    max: l.max,
                    admitted: op.admitted,
                    hits: op.admitted.saturating_add(op.rejected),
                    first_span_ms: op.span_ms,
                    mode: mode(op),
                });
                owners.push(i);
            }
        }
        (records, owners)
    }

    /// The records grouped by node, [`SYNC_CHUNK`](super::SYNC_CHUNK) per call, one
    /// pipeline per node; one outcome per record.
    async fn run_records(
        &self,
        proxy: &str,
        interval_ms: u64,
        dead: &[String],
        params: &ShareParams,
        records: &[RecordOp],
        lane: Lane,
    ) -> Vec<ItemResult<RecordOutcome>> {
        if records.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
        let per_call = self.backend.options().sync_chunk.max(1);
        let mut calls = Vec::new();
        // Per call, the indices of the records it carries.
        let mut owners: Vec<Vec<usize>> = Vec::new();
        for group in self.backend.group_by_node(&keys) {
            for chunk in group.chunks(per_call) {
                let recs: Vec<&RecordOp> = chunk.iter().map(|&i| &records[i]).collect();
                calls.push(Call::sync(proxy, interval_ms, dead, params, &recs));
                owners.push(chunk.to_vec());
            }
        }
        let mut out: Vec<ItemResult<RecordOutcome>> = (0..records.len())
            .map(|_| Err(StoreError::Failed("no reply".into())))
            .collect();
        let replies = self.backend.run(&calls, lane, &self.round_trips).await;
        for (r, owner) in replies.into_iter().zip(owners) {
            let e = match r {
                Ok(Value::Array(items)) if items.len() == owner.len() => {
                    for (item, i) in items.into_iter().zip(owner) {
                        out[i] = record_outcome(item);
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
}
