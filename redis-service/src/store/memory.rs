//! The embedded store: the default when no Redis is configured (demo, single node), and
//! the local fallback while Redis is unreachable. The same arithmetic as the Lua scripts
//! in `lua/`, on this process's clock, with TTLs swept in the background.

use super::{tightest, CheckOp, CheckOutcome, ItemResult, Store, StoreError, SyncOp, SyncOutcome};
use crate::config::Algorithm;
use crate::keys::KeyMaker;
use crate::shares::{allocate, Peer, ShareParams};
use async_trait::async_trait;
use meshlimit_core::config::Limit;
use meshlimit_core::gcra;
use parking_lot::Mutex;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

const SHARDS: usize = 64;

enum Entry {
    /// Sliding window: window index, its count, the previous window's count.
    Sw {
        i: i64,
        c: u64,
        p: u64,
    },
    /// GCRA theoretical arrival time, unix nanoseconds.
    Tb {
        tat_ns: u64,
    },
    Shares(HashMap<String, Peer>),
}

struct Slot {
    entry: Entry,
    expires_us: f64,
}

pub struct MemoryStore {
    keys: KeyMaker,
    shards: Vec<Mutex<HashMap<String, Slot>>>,
    /// Most keys kept; past it a check sweeps expired keys and, if still full, refuses
    /// (the caller then treats it as a store failure) rather than growing without bound.
    max_keys: usize,
}

pub fn now_us() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as f64)
        .unwrap_or(0.0)
}

/// A sliding-window key's (current, previous) counts as of window `idx`: a stored
/// window one step behind becomes the previous one, older or expired ones count 0.
/// Unix second when a sliding-window limit with (current, previous) counts `c`, `p` in
/// window `idx` is full again: its estimate `p·(1 − frac) + c` reaches 0 at the second
/// window boundary ahead while `c > 0`, at the next one when only `p` counts.
fn sw_full_at(c: u64, p: u64, idx: i64, w: u64, now_s: f64) -> u64 {
    if c > 0 {
        (idx as u64 + 2) * w
    } else if p > 0 {
        (idx as u64 + 1) * w
    } else {
        now_s.ceil() as u64
    }
}

/// Slack on "fits" (see `lua/sliding_window.lua`).
const SW_EPS: f64 = 1e-9;

/// Index of the limit a check answer describes: admitted, the one with the fewest left;
/// refused, the one that takes longest to let the request through. Ties: longer window.
/// `rows` are (remaining, wait, window_secs).
fn describe(allowed: bool, rows: &[(u64, f64, u64)]) -> usize {
    if allowed {
        let rems: Vec<(u64, u64)> = rows.iter().map(|&(r, _, w)| (r, w)).collect();
        return tightest(&rems);
    }
    let mut best = 0;
    for (i, &(_, wait, w)) in rows.iter().enumerate() {
        let (_, bwait, bw) = rows[best];
        if wait > bwait || (wait == bwait && w > bw) {
            best = i;
        }
    }
    best
}

fn sw_counts(m: &HashMap<String, Slot>, key: &str, idx: i64, now_us: f64) -> (u64, u64) {
    match m.get(key) {
        Some(Slot {
            entry: Entry::Sw { i, c, p },
            expires_us,
        }) if *expires_us > now_us => {
            if *i == idx {
                (*c, *p)
            } else if *i == idx - 1 {
                (0, *c)
            } else {
                (0, 0)
            }
        }
        _ => (0, 0),
    }
}

impl MemoryStore {
    pub fn new(keys: KeyMaker, max_keys: usize) -> Self {
        MemoryStore {
            keys,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            max_keys: max_keys.max(SHARDS),
        }
    }

    fn shard(&self, tag: &str) -> &Mutex<HashMap<String, Slot>> {
        // All keys of one tag in one shard: one lock makes a multi-window check atomic.
        let mut h = DefaultHasher::new();
        tag.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Drops expired keys; returns how many are left.
    pub fn sweep(&self) -> usize {
        let now = now_us();
        let mut left = 0;
        for s in &self.shards {
            let mut m = s.lock();
            m.retain(|_, v| v.expires_us > now);
            left += m.len();
        }
        left
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn full(&self, m: &mut HashMap<String, Slot>, now: f64) -> bool {
        let per_shard = self.max_keys / SHARDS;
        if m.len() < per_shard {
            return false;
        }
        m.retain(|_, v| v.expires_us > now);
        m.len() >= per_shard
    }

    pub fn check_one(&self, algo: Algorithm, op: &CheckOp, now: f64) -> ItemResult<CheckOutcome> {
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        Ok(match algo {
            Algorithm::SlidingWindow => self.sw_check(&mut m, op, now),
            Algorithm::TokenBucket => self.tb_check(&mut m, op, now),
        })
    }

    fn sw_check(&self, m: &mut HashMap<String, Slot>, op: &CheckOp, now_us: f64) -> CheckOutcome {
        let now = now_us / 1e6;
        let hits = op.hits;
        let mut allowed = true;
        let mut retry = 0.0f64;
        let mut st = Vec::with_capacity(op.limits.len());
        for l in &op.limits {
            let key = self.keys.sw_key(&op.tag, l.window_secs);
            let w = l.window_secs as f64;
            let max = l.max as f64;
            let idx = (now / w).floor() as i64;
            let (c, p) = sw_counts(m, &key, idx, now_us);
            let frac = (now - idx as f64 * w) / w;
            let est = p as f64 * (1.0 - frac) + c as f64;
            let h = hits as f64;
            let mut wait = 0.0;
            if est + h > max + SW_EPS {
                allowed = false;
                let (cf, pf) = (c as f64, p as f64);
                wait = if h > max {
                    2.0 * w
                } else if cf + h <= max {
                    ((1.0 - (max - cf - h) / pf) - frac) * w
                } else {
                    (1.0 - frac) * w + (1.0 - (max - h) / cf).max(0.0) * w
                };
                retry = retry.max(wait);
            }
            st.push((key, l.window_secs, l.max, idx, c, p, est, wait));
        }
        let mut rows = Vec::with_capacity(st.len());
        let mut resets = Vec::with_capacity(st.len());
        for (key, w, max, idx, c, p, est, wait) in st {
            let mut est = est;
            let mut c = c;
            if allowed || op.force {
                est += hits as f64;
                c += hits;
                m.insert(
                    key,
                    Slot {
                        entry: Entry::Sw { i: idx, c, p },
                        expires_us: now_us + (w * 2_000_000) as f64,
                    },
                );
            }
            let rem = (max as f64 - est + 1e-9).floor().max(0.0) as u64;
            rows.push((rem, wait, w));
            resets.push(sw_full_at(c, p, idx, w, now));
        }
        let t = describe(allowed, &rows);
        CheckOutcome {
            allowed,
            tightest: t,
            remaining: rows[t].0,
            reset_at: resets[t],
            retry_after_ms: if allowed {
                0
            } else {
                (retry * 1000.0).ceil() as u64
            },
        }
    }

    /// Token bucket with the filter's own GCRA (`meshlimit_core::gcra`), in integer
    /// nanoseconds; the Lua script does the same math on the Redis clock.
    fn tb_check(&self, m: &mut HashMap<String, Slot>, op: &CheckOp, now_us: f64) -> CheckOutcome {
        let now = (now_us * 1000.0) as u64;
        let limits: Option<Vec<Limit>> = op
            .limits
            .iter()
            .map(|l| Limit::new(l.window_secs, l.max, l.burst))
            .collect();
        let Some(limits) = limits else {
            // Limits are validated before they get here; refuse rather than panic.
            return CheckOutcome {
                allowed: false,
                tightest: 0,
                remaining: 0,
                reset_at: 0,
                retry_after_ms: 0,
            };
        };
        let keys: Vec<String> = op
            .limits
            .iter()
            .map(|l| self.keys.tb_key(&op.tag, l.window_secs, l.max, l.burst))
            .collect();
        let mut tats: Vec<u64> = keys
            .iter()
            .map(|k| match m.get(k) {
                Some(Slot {
                    entry: Entry::Tb { tat_ns },
                    expires_us,
                }) if *expires_us > now_us => *tat_ns,
                _ => 0,
            })
            .collect();
        // Each limit's wait for this request, from the timestamps before the check.
        let waits: Vec<f64> = limits
            .iter()
            .zip(&tats)
            .map(|(l, &t)| {
                let new = t
                    .max(now)
                    .saturating_add(l.interval_ns.saturating_mul(op.hits));
                new.saturating_sub(now.saturating_add(l.depth_ns)) as f64
            })
            .collect();
        let d = gcra::check(&limits, &mut tats, now, op.hits);
        if !d.allowed && op.force {
            // Reconciliation: charge what a fallback already admitted, capped at empty.
            for (t, l) in tats.iter_mut().zip(&limits) {
                let horizon = now.saturating_add(l.depth_ns);
                *t = (*t)
                    .max(now)
                    .saturating_add(l.interval_ns.saturating_mul(op.hits))
                    .min(horizon);
            }
        }
        if d.changed || op.force {
            for (k, &tat_ns) in keys.iter().zip(&tats) {
                if tat_ns > now {
                    let slot = Slot {
                        entry: Entry::Tb { tat_ns },
                        expires_us: tat_ns as f64 / 1000.0,
                    };
                    m.insert(k.clone(), slot);
                }
            }
        }
        let rows: Vec<(u64, f64, u64)> = limits
            .iter()
            .zip(&tats)
            .zip(&waits)
            .map(|((l, &t), &wait)| {
                let left = now.saturating_add(l.depth_ns).saturating_sub(t.max(now));
                (left / l.interval_ns, wait, l.window_secs)
            })
            .collect();
        let t = describe(d.allowed, &rows);
        CheckOutcome {
            allowed: d.allowed,
            tightest: t,
            remaining: rows[t].0,
            reset_at: tats[t].max(now).div_ceil(1_000_000_000),
            retry_after_ms: d.retry_after_ns.div_ceil(1_000_000),
        }
    }

    pub fn sync_one(
        &self,
        proxy: &str,
        op: &SyncOp,
        params: &ShareParams,
        now_us: f64,
    ) -> ItemResult<SyncOutcome> {
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now_us) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        let now = now_us / 1e6;
        let w = op.window_secs;
        let idx = (now / w as f64).floor() as i64;
        let key = self.keys.sw_key(&op.tag, w);
        let (c, p) = sw_counts(&m, &key, idx, now_us);
        let c = c + op.admitted;
        m.insert(
            key,
            Slot {
                entry: Entry::Sw { i: idx, c, p },
                expires_us: now_us + (w * 2_000_000) as f64,
            },
        );
        let frac = (now - idx as f64 * w as f64) / w as f64;
        let used = (p as f64 * (1.0 - frac) + c as f64 + 1e-9).floor() as u64;

        let skey = self.keys.share_key(&op.tag, w);
        let now_ms = (now_us / 1000.0) as u64;
        let slot = m.entry(skey).or_insert_with(|| Slot {
            entry: Entry::Shares(HashMap::new()),
            expires_us: 0.0,
        });
        if slot.expires_us <= now_us {
            slot.entry = Entry::Shares(HashMap::new());
        }
        slot.expires_us = now_us + (params.ttl_ms * 2000) as f64;
        let weight = match &mut slot.entry {
            Entry::Shares(peers) => allocate(peers, proxy, op.rate, now_ms, params),
            _ => 0.0,
        };
        Ok(SyncOutcome {
            used,
            remaining: op.max.saturating_sub(used),
            reset_at: sw_full_at(c, p, idx, w, now),
            // Same rounding as the script: never report more than was granted.
            weight: (weight * 1e9).floor() / 1e9,
        })
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn check(&self, algo: Algorithm, ops: &[CheckOp]) -> Vec<ItemResult<CheckOutcome>> {
        let now = now_us();
        ops.iter().map(|op| self.check_one(algo, op, now)).collect()
    }

    async fn sync(
        &self,
        proxy: &str,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Vec<ItemResult<SyncOutcome>> {
        let now = now_us();
        ops.iter()
            .map(|op| self.sync_one(proxy, op, params, now))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimit;

    fn op(limits: &[(u64, u64, u64)], hits: u64) -> CheckOp {
        CheckOp {
            tag: "c.r.x".into(),
            limits: limits
                .iter()
                .map(|&(window_secs, max, burst)| StoreLimit {
                    window_secs,
                    max,
                    burst,
                })
                .collect(),
            hits,
            force: false,
        }
    }

    #[test]
    fn sliding_window_multi_limit_all_or_nothing() {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        // Start of a 10 s window so the previous window weighs nothing.
        let t0 = 1_000_000_000.0 * 1e6;
        let o = op(&[(10, 5, 5), (100, 7, 7)], 1);
        for i in 0..5 {
            let r = s
                .check_one(Algorithm::SlidingWindow, &o, t0 + i as f64)
                .unwrap();
            assert!(r.allowed);
            assert_eq!(r.remaining, 4 - i);
        }
        let r = s
            .check_one(Algorithm::SlidingWindow, &o, t0 + 10.0)
            .unwrap();
        assert!(!r.allowed && r.retry_after_ms > 0 && r.tightest == 0);
        // Next window: the first limit has room but the 100 s one only has 2: all or nothing.
        let t1 = t0 + 10e6 * 2.0;
        let big = op(&[(10, 5, 5), (100, 7, 7)], 3);
        let r = s.check_one(Algorithm::SlidingWindow, &big, t1).unwrap();
        assert!(!r.allowed, "{r:?}");
        assert_eq!((r.tightest, r.remaining), (1, 2));
        let r = s
            .check_one(
                Algorithm::SlidingWindow,
                &op(&[(10, 5, 5), (100, 7, 7)], 2),
                t1,
            )
            .unwrap();
        assert!(r.allowed);
        assert_eq!(r.remaining, 0);
    }

    #[test]
    fn token_bucket_refills() {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let t0 = 1_000_000_000.0 * 1e6;
        let o = op(&[(1, 10, 10)], 1);
        for _ in 0..10 {
            assert!(s.check_one(Algorithm::TokenBucket, &o, t0).unwrap().allowed);
        }
        let r = s.check_one(Algorithm::TokenBucket, &o, t0).unwrap();
        assert!(!r.allowed);
        assert_eq!(r.retry_after_ms, 100);
        assert!(
            s.check_one(Algorithm::TokenBucket, &o, t0 + 100_000.0)
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn token_bucket_force_charges_up_to_empty_and_no_further() {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let t0 = 1_000_000_000.0 * 1e6;
        // 10/s: 4 used, then a reconciliation of 20 already-admitted hits.
        assert!(
            s.check_one(Algorithm::TokenBucket, &op(&[(1, 10, 10)], 4), t0)
                .unwrap()
                .allowed
        );
        let forced = CheckOp {
            force: true,
            ..op(&[(1, 10, 10)], 20)
        };
        let r = s.check_one(Algorithm::TokenBucket, &forced, t0).unwrap();
        assert!(
            !r.allowed,
            "more than the bucket holds is reported as refused"
        );
        assert_eq!(r.remaining, 0);
        // Charged to empty, not beyond: one token is back after 100 ms.
        let o = op(&[(1, 10, 10)], 1);
        assert!(
            !s.check_one(Algorithm::TokenBucket, &o, t0 + 50_000.0)
                .unwrap()
                .allowed
        );
        assert!(
            s.check_one(Algorithm::TokenBucket, &o, t0 + 100_000.0)
                .unwrap()
                .allowed
        );
    }

    /// Exact retry times: at `now + retry_after_ms` the same request is admitted, 1 ms
    /// before it is not; at `reset_at` a request for the whole limit is admitted, 1 ms
    /// before it is not.
    fn assert_retry_and_reset_are_true(algo: Algorithm, lim: (u64, u64, u64), t0: f64) {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let one = op(&[lim], 1);
        let full = op(&[lim], lim.1);
        let ms = 1000.0;
        // Fill up, then the next one is refused.
        let mut r = s.check_one(algo, &one, t0).unwrap();
        while r.allowed {
            r = s.check_one(algo, &one, t0).unwrap();
        }
        assert!(r.retry_after_ms > 0, "{r:?}");
        let retry_at = t0 + r.retry_after_ms as f64 * ms;
        // (A refused check changes nothing, so both probes see the same state.)
        assert!(
            !s.check_one(algo, &one, retry_at - ms).unwrap().allowed,
            "{algo:?}: admitted 1 ms before retry_after"
        );
        assert!(
            s.check_one(algo, &one, retry_at).unwrap().allowed,
            "{algo:?}: refused at retry_after"
        );
        // reset_at: the whole limit fits then and not 1 ms before.
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let r = s.check_one(algo, &one, t0).unwrap();
        assert!(r.allowed);
        let reset_us = r.reset_at as f64 * 1e6;
        assert!(reset_us > t0, "{r:?}");
        assert!(
            !s.check_one(algo, &full, reset_us - ms).unwrap().allowed,
            "{algo:?}: whole limit fit 1 ms before reset_at"
        );
        assert!(
            s.check_one(algo, &full, reset_us).unwrap().allowed,
            "{algo:?}: whole limit refused at reset_at"
        );
    }

    #[test]
    fn retry_after_and_reset_at_name_the_time_a_retry_succeeds() {
        // Whole-second starts, 0.2 s into a window, and a start with microseconds.
        for t0 in [
            1_000_000_000.0e6,
            1_000_000_000.2e6,
            1_000_000_001.234_567e6,
        ] {
            // The retry of a sliding window lands mid-window (the previous count decays).
            assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (10, 5, 5), t0);
            assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (2, 2, 2), t0);
            assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (60, 7, 7), t0);
            // Token bucket: whole-second reset_at is rounded up from the bucket's time,
            // so "1 ms before" holds only when the timestamp is on a whole second.
            if t0 % 1e6 == 0.0 {
                assert_retry_and_reset_are_true(Algorithm::TokenBucket, (2, 1, 1), t0);
                assert_retry_and_reset_are_true(Algorithm::TokenBucket, (10, 5, 5), t0);
            }
        }
    }

    #[test]
    fn sliding_window_retry_within_the_window_when_the_previous_count_decays() {
        let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
        let w0 = 1_000_000_000.0e6; // a 10 s window boundary
                                    // 4 hits late in one window; in the next, halfway, 4 more do not fit (2 + 4 > 5).
        assert!(
            s.check_one(Algorithm::SlidingWindow, &op(&[(10, 5, 5)], 4), w0 + 9.9e6)
                .unwrap()
                .allowed
        );
        let four = op(&[(10, 5, 5)], 4);
        let r = s
            .check_one(Algorithm::SlidingWindow, &four, w0 + 15e6)
            .unwrap();
        assert!(!r.allowed);
        // The previous 4 weigh 4·(1 − f); 4 more fit once that is 1: f = 0.75, 2.5 s on.
        assert_eq!(r.retry_after_ms, 2500);
        assert!(
            !s.check_one(Algorithm::SlidingWindow, &four, w0 + 17.499e6)
                .unwrap()
                .allowed
        );
        assert!(
            s.check_one(Algorithm::SlidingWindow, &four, w0 + 17.5e6)
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn a_refusal_describes_the_limit_that_refused() {
        for algo in [Algorithm::SlidingWindow, Algorithm::TokenBucket] {
            let s = MemoryStore::new(KeyMaker::new("ml", b"k"), 1000);
            let t0 = 1_000_000_000.0e6;
            // 5 per second and 6 per hour: after 5, two more are refused by both; the
            // second has more left (1 vs 0) but keeps them out far longer, so the
            // answer describes it (a client waiting for the first would retry in vain).
            let limits = [(1, 5, 5), (3600, 6, 6)];
            assert!(s.check_one(algo, &op(&limits, 5), t0).unwrap().allowed);
            let r = s.check_one(algo, &op(&limits, 2), t0 + 0.5e6).unwrap();
            assert!(!r.allowed);
            assert_eq!(r.remaining, 1, "{algo:?}: {r:?}");
            assert_eq!(r.tightest, 1, "{algo:?}: {r:?}");
            assert!(r.retry_after_ms > 60_000, "{algo:?}: {r:?}");
        }
    }
}
