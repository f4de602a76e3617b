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
            if est + h > max {
                allowed = false;
                let (cf, pf) = (c as f64, p as f64);
                let wait = if h > max {
                    2.0 * w
                } else if cf + h <= max {
                    ((1.0 - (max - cf - h) / pf) - frac) * w
                } else {
                    (1.0 - frac) * w + (1.0 - (max - h) / cf).max(0.0) * w
                };
                retry = retry.max(wait);
            }
            st.push((key, l.window_secs, l.max, idx, c, p, est));
        }
        let mut rems = Vec::with_capacity(st.len());
        let mut resets = Vec::with_capacity(st.len());
        for (key, w, max, idx, c, p, est) in st {
            let mut est = est;
            if allowed || op.force {
                est += hits as f64;
                m.insert(
                    key,
                    Slot {
                        entry: Entry::Sw {
                            i: idx,
                            c: c + hits,
                            p,
                        },
                        expires_us: now_us + (w * 2_000_000) as f64,
                    },
                );
            }
            let rem = (max as f64 - est + 1e-9).floor().max(0.0) as u64;
            rems.push((rem, w));
            resets.push((idx as u64 + 1) * w);
        }
        let t = tightest(&rems);
        CheckOutcome {
            allowed,
            tightest: t,
            remaining: rems[t].0,
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
        let rems: Vec<(u64, u64)> = limits
            .iter()
            .zip(&tats)
            .map(|(l, &t)| {
                let left = now.saturating_add(l.depth_ns).saturating_sub(t.max(now));
                (left / l.interval_ns, l.window_secs)
            })
            .collect();
        let t = tightest(&rems);
        CheckOutcome {
            allowed: d.allowed,
            tightest: t,
            remaining: rems[t].0,
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
            reset_at: (idx as u64 + 1) * w,
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
}
