//! The embedded store: the default when no Redis is configured (demo, single node), and
//! the local fallback while Redis is unreachable. The same arithmetic as the Lua scripts
//! in `lua/`, on this process's clock in integer nanoseconds (Unix time), with expired
//! keys dropped by a background task the store owns.

use super::{CheckOp, CheckOutcome, ItemResult, Store, StoreError, StrictOp, SyncOp, SyncOutcome};
use crate::config::Algorithm;
use crate::keys::KeyMaker;
use crate::liveness::Registry;
use async_trait::async_trait;
use meshlimit_core::config::Limit;
use meshlimit_core::gcra;
use meshlimit_core::protocol::StrictAnswer;
use meshlimit_core::shares::ShareParams;
use parking_lot::Mutex;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Keys one embedded store keeps at most (the store, and the fallback, each).
pub const MAX_KEYS: usize = 4_000_000;

/// How often the background task drops expired keys. Expired keys are already ignored
/// on read; the sweep only returns their memory, so every few seconds is plenty.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

const SHARDS: usize = 64;
const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// Slack on "fits" (see `lua/sliding_window.lua`): at the exact time a retry is told to
/// come back, the estimate is exactly `max - hits`, which float rounding could otherwise
/// put a hair above.
const SW_EPS: f64 = 1e-9;

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Whole Unix seconds of `ns`, rounded down.
pub fn unix_secs(ns: u64) -> u64 {
    ns / NS_PER_SEC
}

/// A sliding window's stored counts: the window they belong to (its index since the
/// epoch), its count so far, and the count of the window before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct WindowCounts {
    index: u64,
    current: u64,
    previous: u64,
}

enum Value {
    Window(WindowCounts),
    /// GCRA theoretical arrival time, Unix nanoseconds.
    Tat(u64),
    /// One reported key and limit: its global count and its peers (see `sync`).
    Record(sync::Record),
}

struct Entry {
    value: Value,
    expires_ns: u64,
}

type Shard = HashMap<String, Entry>;

struct Shards {
    shards: Vec<Mutex<Shard>>,
    /// Which proxies are live (see `crate::liveness`). Locked after a shard's lock when
    /// both are held, never before.
    registry: Mutex<Registry>,
}

impl Shards {
    /// Drops expired keys; returns how many are left.
    fn sweep(&self, now: u64) -> usize {
        let mut left = 0;
        for s in &self.shards {
            let mut m = s.lock();
            m.retain(|_, e| e.expires_ns > now);
            left += m.len();
        }
        self.registry.lock().sweep(now / NS_PER_MS);
        left
    }
}

pub struct MemoryStore {
    keys: KeyMaker,
    shared: Arc<Shards>,
    /// Most keys kept; past it a check sweeps expired keys and, if still full, refuses
    /// (the caller then treats it as a store failure) rather than growing without bound.
    max_keys: usize,
    sweeping: AtomicBool,
}

/// One sliding window at `now`: its length, its index since the epoch, and how far
/// into it `now` is.
#[derive(Debug, Clone, Copy)]
struct WindowAt {
    secs: u64,
    len_ns: u64,
    index: u64,
    elapsed_ns: u64,
}

impl WindowAt {
    fn new(window_secs: u64, now: u64) -> Self {
        let len_ns = window_secs.saturating_mul(NS_PER_SEC).max(1);
        WindowAt {
            secs: window_secs,
            len_ns,
            index: now / len_ns,
            elapsed_ns: now % len_ns,
        }
    }

    /// Part of the window gone by, in [0, 1).
    fn frac(&self) -> f64 {
        self.elapsed_ns as f64 / self.len_ns as f64
    }

    /// `stored` as of this window: a stored window one step behind becomes the previous
    /// one, an older (or expired) one counts nothing.
    fn counts(&self, stored: Option<WindowCounts>) -> WindowCounts {
        let fresh = WindowCounts {
            index: self.index,
            ..WindowCounts::default()
        };
        match stored {
            Some(s) if s.index == self.index => s,
            Some(s) if s.index + 1 == self.index => WindowCounts {
                previous: s.current,
                ..fresh
            },
            _ => fresh,
        }
    }

    /// The sliding-window estimate of requests in the last window: the previous
    /// window's count weighted by the part of it the sliding window still covers, plus
    /// the current count.
    fn estimate(&self, c: WindowCounts) -> f64 {
        c.previous as f64 * (1.0 - self.frac()) + c.current as f64
    }

    /// Seconds until `hits` more fit under `max` with counts `c`, if nothing else is
    /// counted meanwhile (only asked when they do not fit now).
    fn wait_secs(&self, c: WindowCounts, max: u64, hits: u64) -> f64 {
        let (w, frac) = (self.secs as f64, self.frac());
        let (max, h, cur, prev) = (max as f64, hits as f64, c.current as f64, c.previous as f64);
        if h > max {
            2.0 * w
        } else if cur + h <= max {
            // The previous window's weight falls linearly until they fit.
            ((1.0 - (max - cur - h) / prev) - frac) * w
        } else {
            // Only in the next window, where this window's count is the decaying one.
            (1.0 - frac) * w + (1.0 - (max - h) / cur).max(0.0) * w
        }
    }

    /// Unix second when the limit is full again (its estimate back to 0): the second
    /// window boundary ahead while the current window holds a count, the next one when
    /// only the previous does.
    fn full_at(&self, c: WindowCounts, now: u64) -> u64 {
        if c.current > 0 {
            (self.index + 2) * self.secs
        } else if c.previous > 0 {
            (self.index + 1) * self.secs
        } else {
            now.div_ceil(NS_PER_SEC)
        }
    }

    /// When a key written now expires: two windows on (after that it counts nothing).
    fn expiry(&self, now: u64) -> u64 {
        now.saturating_add(self.len_ns.saturating_mul(2))
    }
}

/// What one limit of a check says, for choosing the limit an answer describes.
#[derive(Debug, Clone, Copy)]
struct LimitState<W> {
    remaining: u64,
    /// How long this limit keeps the request out (0 when it has room); only compared
    /// with the other limits of the same check.
    wait: W,
    window_secs: u64,
}

/// Index of the limit a check answer describes: admitted, the one with the fewest left;
/// refused, the one that takes longest to let the request through. Ties: the longer
/// window (it takes longer to refill).
fn describe<W: PartialOrd + Copy>(allowed: bool, limits: &[LimitState<W>]) -> usize {
    let mut best = 0;
    for (i, l) in limits.iter().enumerate() {
        let b = &limits[best];
        let (better, tie) = if allowed {
            (l.remaining < b.remaining, l.remaining == b.remaining)
        } else {
            (l.wait > b.wait, l.wait == b.wait)
        };
        if better || (tie && l.window_secs > b.window_secs) {
            best = i;
        }
    }
    best
}

fn stored_counts(m: &Shard, key: &str, now: u64) -> Option<WindowCounts> {
    match m.get(key) {
        Some(Entry {
            value: Value::Window(c),
            expires_ns,
        }) if *expires_ns > now => Some(*c),
        _ => None,
    }
}

/// Writes the buckets' `tat`s back; a bucket that is full again (`tat <= now`) needs no
/// key.
fn store_tats(m: &mut Shard, keys: &[String], tats: &[u64], now: u64) {
    for (k, &tat) in keys.iter().zip(tats) {
        if tat > now {
            let e = Entry {
                value: Value::Tat(tat),
                expires_ns: tat,
            };
            m.insert(k.clone(), e);
        }
    }
}

fn stored_tat(m: &Shard, key: &str, now: u64) -> u64 {
    match m.get(key) {
        Some(Entry {
            value: Value::Tat(t),
            expires_ns,
        }) if *expires_ns > now => *t,
        _ => 0,
    }
}

impl MemoryStore {
    /// An empty store of at most `max_keys` keys. Expired keys are swept once
    /// [`Store::start`] has started the store's background task.
    pub fn new(keys: KeyMaker, max_keys: usize) -> Self {
        MemoryStore {
            keys,
            shared: Arc::new(Shards {
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                registry: Mutex::new(Registry::default()),
            }),
            max_keys: max_keys.max(SHARDS),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Starts the task that sweeps expired keys every `every` (once: `None` when it
    /// runs already); it ends by itself when the store is dropped. Must run inside a
    /// tokio runtime.
    pub fn start_sweeping(&self, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return None;
        }
        let shards: Weak<Shards> = Arc::downgrade(&self.shared);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shards) = shards.upgrade() else {
                    return;
                };
                shards.sweep(now_ns());
            }
        }))
    }

    fn shard(&self, tag: &str) -> &Mutex<Shard> {
        // All keys of one tag in one shard: one lock makes a multi-window check atomic.
        let mut h = DefaultHasher::new();
        tag.hash(&mut h);
        &self.shared.shards[(h.finish() as usize) % SHARDS]
    }

    fn full(&self, m: &mut Shard, now: u64) -> bool {
        let per_shard = self.max_keys / SHARDS;
        if m.len() < per_shard {
            return false;
        }
        m.retain(|_, e| e.expires_ns > now);
        m.len() >= per_shard
    }

    /// One check at `now` (Unix nanoseconds).
    pub fn check_one(&self, algo: Algorithm, op: &CheckOp, now: u64) -> ItemResult<CheckOutcome> {
        let mut m = self.shard(&op.tag).lock();
        if self.full(&mut m, now) {
            return Err(StoreError::Failed("in-memory store is full".into()));
        }
        Ok(match algo {
            Algorithm::SlidingWindow => self.sw_check(&mut m, op, now),
            Algorithm::TokenBucket => self.tb_check(&mut m, op, now),
        })
    }

    fn sw_check(&self, m: &mut Shard, op: &CheckOp, now: u64) -> CheckOutcome {
        struct Limit {
            key: String,
            max: u64,
            window: WindowAt,
            counts: WindowCounts,
            wait_secs: f64,
        }
        let hits = op.hits;
        let mut allowed = true;
        let mut retry_secs = 0.0f64;
        let mut limits = Vec::with_capacity(op.limits.len());
        for l in &op.limits {
            let key = self.keys.sw_key(&op.tag, l.window_secs);
            let window = WindowAt::new(l.window_secs, now);
            let counts = window.counts(stored_counts(m, &key, now));
            let mut wait_secs = 0.0;
            if window.estimate(counts) + hits as f64 > l.max as f64 + SW_EPS {
                allowed = false;
                wait_secs = window.wait_secs(counts, l.max, hits);
                retry_secs = retry_secs.max(wait_secs);
            }
            limits.push(Limit {
                key,
                max: l.max,
                window,
                counts,
                wait_secs,
            });
        }
        let mut states = Vec::with_capacity(limits.len());
        let mut resets = Vec::with_capacity(limits.len());
        for mut l in limits {
            if allowed || op.force {
                l.counts.current += hits;
                m.insert(
                    l.key,
                    Entry {
                        value: Value::Window(l.counts),
                        expires_ns: l.window.expiry(now),
                    },
                );
            }
            let est = l.window.estimate(l.counts);
            states.push(LimitState {
                remaining: (l.max as f64 - est + SW_EPS).floor().max(0.0) as u64,
                wait: l.wait_secs,
                window_secs: l.window.secs,
            });
            resets.push(l.window.full_at(l.counts, now));
        }
        let t = describe(allowed, &states);
        CheckOutcome {
            allowed,
            tightest: t,
            remaining: states[t].remaining,
            reset_at: resets[t],
            retry_after_ms: if allowed {
                0
            } else {
                (retry_secs * 1000.0).ceil() as u64
            },
        }
    }

    /// Token bucket with the filter's own GCRA (`meshlimit_core::gcra`); the Lua script
    /// does the same math on the Redis clock.
    fn tb_check(&self, m: &mut Shard, op: &CheckOp, now: u64) -> CheckOutcome {
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
        let mut tats: Vec<u64> = keys.iter().map(|k| stored_tat(m, k, now)).collect();
        // Each limit on its own, from the timestamps before the check: how long it keeps
        // this request out (what the headers name the tightest limit by).
        let waits: Vec<u64> = limits
            .iter()
            .zip(&tats)
            .map(|(l, &t)| {
                gcra::check(std::slice::from_ref(l), &mut [t], now, op.hits).retry_after_ns
            })
            .collect();
        // Reconciliation charges what a fallback already admitted, even over the limit.
        let d = if op.force {
            gcra::force(&limits, &mut tats, now, op.hits)
        } else {
            gcra::check(&limits, &mut tats, now, op.hits)
        };
        if d.changed {
            store_tats(m, &keys, &tats, now);
        }
        let states: Vec<LimitState<u64>> = limits
            .iter()
            .zip(&tats)
            .zip(&waits)
            .map(|((l, &t), &wait)| {
                let left = now.saturating_add(l.depth_ns).saturating_sub(t.max(now));
                LimitState {
                    remaining: left / l.interval_ns,
                    wait,
                    window_secs: l.window_secs,
                }
            })
            .collect();
        let t = describe(d.allowed, &states);
        CheckOutcome {
            allowed: d.allowed,
            tightest: t,
            remaining: states[t].remaining,
            reset_at: tats[t].max(now).div_ceil(NS_PER_SEC),
            retry_after_ms: d.retry_after_ns.div_ceil(NS_PER_MS),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn start(&self) -> Result<(), StoreError> {
        self.start_sweeping(SWEEP_EVERY);
        Ok(())
    }

    async fn check(&self, algo: Algorithm, ops: &[CheckOp]) -> Vec<ItemResult<CheckOutcome>> {
        let now = now_ns();
        ops.iter().map(|op| self.check_one(algo, op, now)).collect()
    }

    async fn sync(
        &self,
        proxy: &str,
        interval_ms: u64,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Result<SyncOutcome, StoreError> {
        self.sync_at(proxy, interval_ms, ops, params, now_ns())
    }

    async fn add_counts(&self, ops: &[SyncOp]) -> Vec<ItemResult<()>> {
        let now = now_ns();
        ops.iter().map(|op| self.add_counts_one(op, now)).collect()
    }

    async fn strict(&self, op: &StrictOp) -> ItemResult<StrictAnswer> {
        self.strict_one(op, now_ns())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

mod strict;
mod sync;

#[cfg(test)]
mod tests;
