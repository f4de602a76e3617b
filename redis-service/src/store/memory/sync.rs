//! Reports in the embedded store: per (rule, key, limit) one [`Record`], the global
//! sliding-window count and the peers of `meshlimit_core::shares`, allocated by the
//! core's own `allocate_detailed` (the reference `lua/sync.lua` is a port of), with
//! liveness from the store's registry.

use super::{Entry, MemoryStore, Value, WindowAt, WindowCounts, NS_PER_MS, SW_EPS};
use crate::store::{ItemResult, KeyOutcome, StoreError, SyncOp, SyncOutcome};
use meshlimit_core::shares::{allocate_detailed, release, Peer, Report, ShareParams};

/// One reported key and limit.
#[derive(Debug, Clone, Default)]
pub(in crate::store) struct Record {
    pub counts: WindowCounts,
    pub peers: Vec<Peer<String>>,
}

impl MemoryStore {
    /// One report of `proxy` at `now` (Unix nanoseconds): its heartbeat, then each op.
    pub fn sync_at(
        &self,
        proxy: &str,
        interval_ms: u64,
        ops: &[SyncOp],
        params: &ShareParams,
        now: u64,
    ) -> Result<SyncOutcome, StoreError> {
        let now_ms = now / NS_PER_MS;
        let proxies = self
            .shared
            .registry
            .lock()
            .heartbeat(proxy, interval_ms, now_ms)
            .ok_or_else(|| StoreError::Failed("liveness registry is full".into()))?;
        let me = proxy.to_string();
        let keys = ops
            .iter()
            .map(|op| self.sync_one(&me, interval_ms, op, params, now))
            .collect();
        Ok(SyncOutcome { proxies, keys })
    }

    fn sync_one(
        &self,
        me: &String,
        interval_ms: u64,
        op: &SyncOp,
        params: &ShareParams,
        now: u64,
    ) -> ItemResult<KeyOutcome> {
        let now_ms = now / NS_PER_MS;
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        let registry = &self.shared.registry;
        let mut out = KeyOutcome {
            shares: Vec::with_capacity(op.limits.len()),
            pending: false,
            used: Vec::with_capacity(op.limits.len()),
        };
        for l in &op.limits {
            let window = WindowAt::new(l.window_secs, now);
            let key = self.keys.record_key(&op.tag, l.window_secs, l.max, l.burst);
            let rec = record(&mut m, key, &window, params, now).ok_or_else(not_a_record)?;
            rec.counts.current = rec.counts.current.saturating_add(op.admitted);
            out.used
                .push((window.estimate(rec.counts) + SW_EPS).floor() as u64);
            if op.release {
                release(&mut rec.peers, me);
                out.shares.push(0);
                continue;
            }
            let report = Report {
                hits: op.admitted.saturating_add(op.rejected),
                max: l.max,
                window_ms: l.window_secs.saturating_mul(1000),
                first_span_ms: op.span_ms,
                interval_ms,
            };
            let is_live = |id: &String| id == me || registry.lock().is_live(id, now_ms);
            let a = allocate_detailed(&mut rec.peers, me, &report, now_ms, is_live, params);
            out.shares.push(a.grant);
            out.pending |= a.pending();
        }
        Ok(out)
    }

    /// Adds what a fallback admitted to the records' counts (reconciliation).
    pub(super) fn add_counts_one(&self, op: &SyncOp, now: u64) -> ItemResult<()> {
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        for l in &op.limits {
            let window = WindowAt::new(l.window_secs, now);
            let key = self.keys.record_key(&op.tag, l.window_secs, l.max, l.burst);
            let rec = record(&mut m, key, &window, &ShareParams::default(), now)
                .ok_or_else(not_a_record)?;
            rec.counts.current = rec.counts.current.saturating_add(op.admitted);
        }
        Ok(())
    }
}

/// The record at `key`, as of `window` (a fresh one when absent or expired), kept for
/// two windows or the lease, whichever is longer.
fn record<'a>(
    m: &'a mut super::Shard,
    key: String,
    window: &WindowAt,
    params: &ShareParams,
    now: u64,
) -> Option<&'a mut Record> {
    let keep = window
        .expiry(now)
        .max(now.saturating_add(params.lease_ms.saturating_mul(NS_PER_MS)));
    let e = m.entry(key).or_insert_with(|| Entry {
        value: Value::Record(Record::default()),
        expires_ns: 0,
    });
    if e.expires_ns <= now || !matches!(e.value, Value::Record(_)) {
        e.value = Value::Record(Record::default());
    }
    e.expires_ns = e.expires_ns.max(keep);
    match &mut e.value {
        Value::Record(r) => {
            r.counts = window.counts(Some(r.counts));
            Some(r)
        }
        _ => None,
    }
}

fn not_a_record() -> StoreError {
    StoreError::Failed("a record key holds another kind of value".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyMaker;
    use crate::store::StoreLimit;

    const MS: u64 = NS_PER_MS;

    fn op(hits: u64, release: bool) -> SyncOp {
        SyncOp {
            tag: "s.g.k".into(),
            limits: vec![StoreLimit {
                window_secs: 1,
                max: 100,
                burst: 100,
            }],
            admitted: hits,
            rejected: 0,
            span_ms: 100,
            release,
        }
    }

    fn share(s: &MemoryStore, proxy: &str, hits: u64, now: u64) -> (u32, u32, bool) {
        let p = ShareParams::default();
        let o = s.sync_at(proxy, 100, &[op(hits, false)], &p, now).unwrap();
        let k = o.keys[0].clone().unwrap();
        (k.shares[0], o.proxies, k.pending)
    }

    #[test]
    fn a_dead_proxys_share_returns_after_three_intervals_on_the_store_clock() {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let t0 = 1_700_000_000_000 * MS;
        // Both far over the limit: the whole split in two, never more than the whole.
        let mut now = t0;
        let (mut a, mut b) = (0, 0);
        for _ in 0..5 {
            a = share(&s, "a", 1000, now).0;
            b = share(&s, "b", 1000, now + MS).0;
            assert!(a + b <= 1_000_000_000, "{a} + {b}");
            now += 100 * MS;
        }
        assert!(a.abs_diff(b) < 10_000_000, "{a} / {b}");
        // b silent: live until three of its intervals (300 ms) after its last report.
        let last_b = now - 100 * MS + MS;
        let (a_share, live, _) = share(&s, "a", 300, last_b + 299 * MS);
        assert_eq!(live, 2);
        assert!(a_share < 600_000_000, "{a_share}");
        let (a_share, live, pending) = share(&s, "a", 1000, last_b + 300 * MS);
        assert_eq!(live, 1);
        assert!(a_share > 990_000_000 && !pending, "{a_share}");
        // A release gives the share back at once and answers 0.
        let p = ShareParams::default();
        let o = s
            .sync_at("a", 100, &[op(0, true)], &p, last_b + 301 * MS)
            .unwrap();
        assert_eq!(o.keys[0].clone().unwrap().shares, vec![0]);
        let (c, _, _) = share(&s, "c", 1000, last_b + 302 * MS);
        assert!(c > 990_000_000, "{c}");
    }
}
