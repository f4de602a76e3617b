//! Strict checks in the embedded store: `meshlimit_core::gcra::check` over the request's
//! limits, all-or-nothing under the shard's lock, on this process's clock.

use super::{stored_tat, MemoryStore, NS_PER_MS};
use crate::store::{ItemResult, StoreError, StrictOp};
use meshlimit_core::config::Limit;
use meshlimit_core::gcra;
use meshlimit_core::protocol::StrictAnswer;

impl MemoryStore {
    /// One strict check at `now` (Unix nanoseconds).
    pub fn strict_one(&self, op: &StrictOp, now: u64) -> ItemResult<StrictAnswer> {
        let limits: Vec<Limit> = op
            .limits
            .iter()
            .map(|l| Limit::new(l.window_secs, l.max, l.burst))
            .collect::<Option<_>>()
            .ok_or_else(|| StoreError::Failed("a strict limit out of range".into()))?;
        let keys: Vec<String> = op
            .limits
            .iter()
            .map(|l| self.keys.tb_key(&op.tag, l.window_secs, l.max, l.burst))
            .collect();
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        let mut tats: Vec<u64> = keys.iter().map(|k| stored_tat(&m, k, now)).collect();
        let d = gcra::check(&limits, &mut tats, now, op.hits);
        if d.changed {
            super::store_tats(&mut m, &keys, &tats, now);
        }
        Ok(StrictAnswer {
            allowed: d.allowed,
            tightest: d.tightest,
            remaining: d.remaining,
            reset_ms: d.reset_ns.div_ceil(NS_PER_MS),
            retry_after_ms: d.retry_after_ns.div_ceil(NS_PER_MS),
        })
    }
}
