//! Degraded mode: what answers while the store does not, and what it owes the store.
//!
//! The first store failure (error or missed deadline) flips the service to degraded;
//! from then on requests do not wait on the store at all (a dead Redis must not cost
//! every request its deadline) and are answered per `--on-store-error`:
//! - `fallback`: an in-memory store enforcing `--fallback-share` of every limit, so N
//!   instances each enforcing 1/N keep the global total near the limit;
//! - `open`: admit; `closed`: refuse.
//!
//! Everything admitted while degraded is added to a bounded pending table. A probe pings
//! the store every `--probe-interval-ms`; when it answers, the pending counts are written
//! with forced (count-even-if-over) script calls, and only then is degraded cleared.
//!
//! When the table is full, the entry charged least recently is dropped to make room
//! (see [`PendingTable`]).

use crate::config::{Algorithm, Config, FailMode};
use crate::keys::KeyMaker;
use crate::metrics::Metrics;
use crate::service::Source;
use crate::shares::ShareParams;
use crate::store::memory::{now_ns, unix_secs, MemoryStore, MAX_KEYS, SWEEP_EVERY};
use crate::store::{CheckOp, CheckOutcome, Store, StoreLimit, SyncOp, SyncOutcome};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pending entries written per store call when reconciling: a few round trips for a
/// long outage's debts, none of them a call big enough to hold Redis up for long.
const RECONCILE_BATCH: usize = 1000;

/// What a degraded decision still has to add to the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub algo: Algorithm,
    pub tag: String,
    pub limits: Vec<StoreLimit>,
}

/// Counts owed to the store, at most `max` entries. Full, it drops the entry charged
/// least recently: a count only matters while its window (sliding window: two windows;
/// token bucket: until the bucket refills) is still open, so the stalest debt is the one
/// most likely to be worthless already, and the table keeps following the traffic of
/// the outage's last minutes rather than freezing on whichever clients came first (a
/// burst of fresh client ids at the start would otherwise make every later debt the one
/// dropped).
pub struct PendingTable {
    max: usize,
    owed: HashMap<Arc<PendingKey>, Owed>,
    /// Last-charge stamp -> key, oldest first.
    by_age: BTreeMap<u64, Arc<PendingKey>>,
    next_stamp: u64,
}

/// What one key owes, and when it was last charged (a stamp of [`PendingTable`]'s, not
/// a time: it only orders the charges).
#[derive(Debug, Clone, Copy)]
struct Owed {
    hits: u64,
    stamp: u64,
}

impl PendingTable {
    pub fn new(max: usize) -> Self {
        PendingTable {
            max,
            owed: HashMap::new(),
            by_age: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.owed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owed.is_empty()
    }

    /// Adds `hits` to `key`; returns how many entries were dropped to make room (0 or 1).
    pub fn charge(&mut self, key: PendingKey, hits: u64) -> u64 {
        if self.max == 0 {
            return 1;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some(owed) = self.owed.get_mut(&key) {
            owed.hits = owed.hits.saturating_add(hits);
            let k = self
                .by_age
                .remove(&owed.stamp)
                .expect("every entry has an age");
            owed.stamp = stamp;
            self.by_age.insert(stamp, k);
            return 0;
        }
        let mut dropped = 0;
        if self.owed.len() >= self.max {
            if let Some((_, oldest)) = self.by_age.pop_first() {
                self.owed.remove(&oldest);
                dropped = 1;
            }
        }
        let key = Arc::new(key);
        self.owed.insert(key.clone(), Owed { hits, stamp });
        self.by_age.insert(stamp, key);
        dropped
    }

    /// Everything owed, oldest charge first; the table is left empty.
    pub fn drain(&mut self) -> Vec<(PendingKey, u64)> {
        let by_age = std::mem::take(&mut self.by_age);
        let mut owed = std::mem::take(&mut self.owed);
        by_age
            .into_values()
            .filter_map(|k| {
                let Owed { hits, .. } = owed.remove(&k)?;
                Some((Arc::try_unwrap(k).unwrap_or_else(|k| (*k).clone()), hits))
            })
            .collect()
    }

    #[cfg(test)]
    fn get(&self, key: &PendingKey) -> Option<u64> {
        self.owed.get(key).map(|o| o.hits)
    }
}

pub struct Fallback {
    mode: FailMode,
    /// Share of each limit this instance enforces alone (`--fallback-share`).
    share: f64,
    local: MemoryStore,
    /// Read on every request; written only together with `log`.
    degraded: AtomicBool,
    log: Mutex<DegradedLog>,
    pending: Mutex<PendingTable>,
}

/// Degraded periods, kept as counters so that a period shorter than a scrape interval
/// still shows (`meshlimit_degraded_transitions_total`, `..._seconds_total`).
#[derive(Default)]
struct DegradedLog {
    since: Option<Instant>,
    /// Time spent degraded in periods that have ended.
    total: Duration,
    transitions: u64,
    /// Why: the store error that started the period, or the latest probe failure.
    reason: String,
}

impl Fallback {
    /// What `--on-store-error`, `--fallback-share` and `--max-pending` ask for.
    pub fn from_config(cfg: &Config, keys: KeyMaker) -> Self {
        Fallback::new(
            cfg.on_store_error,
            cfg.fallback_share,
            MemoryStore::new(keys, MAX_KEYS),
            cfg.max_pending,
        )
    }

    fn new(mode: FailMode, share: f64, local: MemoryStore, max_pending: usize) -> Self {
        Fallback {
            mode,
            share,
            local,
            degraded: AtomicBool::new(false),
            log: Mutex::new(DegradedLog::default()),
            pending: Mutex::new(PendingTable::new(max_pending)),
        }
    }

    /// Starts the upkeep of the local store (its sweep of expired keys); inside the
    /// runtime.
    pub fn start(&self) {
        self.local.start_sweeping(SWEEP_EVERY);
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Enters degraded mode because of `reason`; true when this call flipped the state.
    pub fn enter_degraded(&self, reason: &str) -> bool {
        let mut log = self.log.lock();
        if self.degraded.swap(true, Ordering::AcqRel) {
            return false;
        }
        log.since = Some(Instant::now());
        log.transitions += 1;
        log.reason = reason.to_string();
        true
    }

    /// Leaves degraded mode; true when this call flipped the state.
    pub fn leave_degraded(&self) -> bool {
        let mut log = self.log.lock();
        if !self.degraded.swap(false, Ordering::AcqRel) {
            return false;
        }
        if let Some(t) = log.since.take() {
            log.total += t.elapsed();
        }
        true
    }

    /// While degraded, records the latest reason the store is still not usable (a
    /// probe's error), so `/readyz` tells the current one.
    pub fn still_degraded(&self, reason: &str) {
        let mut log = self.log.lock();
        if self.is_degraded() {
            log.reason = reason.to_string();
        }
    }

    /// Why the service is degraded (empty when it is not).
    pub fn reason(&self) -> Option<(String, Duration)> {
        let log = self.log.lock();
        log.since.map(|t| (log.reason.clone(), t.elapsed()))
    }

    /// Transitions into degraded mode, and seconds spent there (the current period
    /// included), since start.
    pub fn degraded_totals(&self) -> (u64, f64) {
        let log = self.log.lock();
        let open = log.since.map_or(Duration::ZERO, |t| t.elapsed());
        (log.transitions, (log.total + open).as_secs_f64())
    }

    pub fn pending_len(&self) -> usize {
        self.pending.lock().len()
    }

    fn scale(&self, l: &StoreLimit) -> StoreLimit {
        let s = |v: u64| ((v as f64 * self.share).ceil() as u64).max(1);
        StoreLimit {
            window_secs: l.window_secs,
            max: s(l.max),
            burst: s(l.burst),
        }
    }

    fn owe(&self, key: PendingKey, hits: u64, m: &Metrics) {
        let dropped = self.pending.lock().charge(key, hits);
        if dropped > 0 {
            m.reconcile_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Decides one check without the store: the outcome, and who decided it.
    pub fn check(&self, algo: Algorithm, op: &CheckOp, m: &Metrics) -> (CheckOutcome, Source) {
        let (out, src) = match self.mode {
            FailMode::Fallback => {
                let scaled = CheckOp {
                    limits: op.limits.iter().map(|l| self.scale(l)).collect(),
                    ..op.clone()
                };
                match self.local.check_one(algo, &scaled, now_ns()) {
                    Ok(o) => (o, Source::Fallback),
                    // Local table full: refuse rather than grow (bounded memory).
                    Err(_) => (closed(), Source::FailClosed),
                }
            }
            FailMode::Open => (
                CheckOutcome {
                    allowed: true,
                    tightest: 0,
                    remaining: 0,
                    reset_at: unix_secs(now_ns()) + op.limits[0].window_secs,
                    retry_after_ms: 0,
                },
                Source::FailOpen,
            ),
            FailMode::Closed => (closed(), Source::FailClosed),
        };
        if out.allowed {
            self.owe(
                PendingKey {
                    algo,
                    tag: op.tag.clone(),
                    limits: op.limits.clone(),
                },
                op.hits,
                m,
            );
        }
        (out, src)
    }

    /// Answers one sync entry without the store: local count and local shares (among the
    /// proxies that report to this instance), scaled by this instance's share.
    pub fn sync(&self, proxy: &str, op: &SyncOp, p: &ShareParams, m: &Metrics) -> SyncOutcome {
        let scaled_max = self.scale(&StoreLimit {
            window_secs: op.window_secs,
            max: op.max,
            burst: op.max,
        });
        let local_op = SyncOp {
            max: scaled_max.max,
            ..op.clone()
        };
        let now = now_ns();
        let mut out = match self.local.sync_one(proxy, &local_op, p, now) {
            Ok(o) => o,
            Err(_) => SyncOutcome {
                used: 0,
                remaining: 0,
                reset_at: unix_secs(now) + op.window_secs,
                weight: 0.0,
            },
        };
        out.weight = match self.mode {
            FailMode::Fallback => out.weight * self.share,
            FailMode::Open => out.weight,
            FailMode::Closed => 0.0,
        };
        if op.admitted > 0 {
            self.owe(
                PendingKey {
                    algo: Algorithm::SlidingWindow,
                    tag: op.tag.clone(),
                    limits: vec![StoreLimit {
                        window_secs: op.window_secs,
                        max: op.max,
                        burst: op.max,
                    }],
                },
                op.admitted,
                m,
            );
        }
        out
    }

    /// Writes what is owed to the store; what fails stays owed. Ok when all is written.
    pub async fn reconcile(
        &self,
        store: &dyn Store,
        deadline: Duration,
        m: &Metrics,
    ) -> Result<usize, String> {
        let items: Vec<(PendingKey, u64)> = self.pending.lock().drain();
        let total = items.len();
        let mut failed: Vec<(PendingKey, u64)> = Vec::new();
        for algo in [Algorithm::SlidingWindow, Algorithm::TokenBucket] {
            let mine: Vec<&(PendingKey, u64)> =
                items.iter().filter(|(k, _)| k.algo == algo).collect();
            for chunk in mine.chunks(RECONCILE_BATCH) {
                let ops: Vec<CheckOp> = chunk
                    .iter()
                    .map(|(k, hits)| CheckOp {
                        tag: k.tag.clone(),
                        limits: k.limits.clone(),
                        hits: *hits,
                        force: true,
                    })
                    .collect();
                let res = tokio::time::timeout(deadline, store.check(algo, &ops)).await;
                match res {
                    Ok(rs) => {
                        for (r, item) in rs.into_iter().zip(chunk) {
                            match r {
                                Ok(_) => {
                                    m.reconciled.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => failed.push((*item).clone()),
                            }
                        }
                    }
                    Err(_) => failed.extend(chunk.iter().map(|i| (*i).clone())),
                }
            }
        }
        if failed.is_empty() {
            Ok(total)
        } else {
            let n = failed.len();
            for (k, h) in failed {
                self.owe(k, h, m);
            }
            Err(format!("{n} of {total} pending entries not written"))
        }
    }
}

/// A refusal whose retry time cannot be foreseen (the store's return): in a second.
fn closed() -> CheckOutcome {
    CheckOutcome {
        allowed: false,
        tightest: 0,
        remaining: 0,
        reset_at: unix_secs(now_ns()) + 1,
        retry_after_ms: 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> PendingKey {
        PendingKey {
            algo: Algorithm::SlidingWindow,
            tag: format!("c.r.{n}"),
            limits: vec![StoreLimit {
                window_secs: 60,
                max: 10,
                burst: 10,
            }],
        }
    }

    #[test]
    fn full_table_drops_the_entry_charged_least_recently() {
        let mut t = PendingTable::new(3);
        assert_eq!(t.charge(key(1), 1), 0);
        assert_eq!(t.charge(key(2), 2), 0);
        assert_eq!(t.charge(key(3), 3), 0);
        // Charging 1 again makes it the most recent: 2 is now the oldest.
        assert_eq!(t.charge(key(1), 10), 0);
        assert_eq!(t.charge(key(4), 4), 1);
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.get(&key(2)),
            None,
            "the least recently charged is dropped"
        );
        assert_eq!(t.get(&key(1)), Some(11));
        assert_eq!(t.charge(key(5), 5), 1);
        assert_eq!(t.get(&key(3)), None);
        // Oldest charge first, and the table is empty afterwards.
        let drained = t.drain();
        assert_eq!(
            drained
                .iter()
                .map(|(k, h)| (k.tag.as_str(), *h))
                .collect::<Vec<_>>(),
            [("c.r.1", 11), ("c.r.4", 4), ("c.r.5", 5)]
        );
        assert!(t.is_empty());
        assert_eq!(t.charge(key(6), 1), 0);
        assert_eq!(
            PendingTable::new(0).charge(key(1), 1),
            1,
            "size 0 keeps nothing"
        );
    }

    #[test]
    fn fallback_counts_what_it_drops() {
        let f = Fallback::new(
            FailMode::Fallback,
            1.0,
            MemoryStore::new(crate::keys::KeyMaker::new("ml", b"k"), 1000),
            2,
        );
        let m = Metrics::default();
        for n in 0..5 {
            let op = CheckOp {
                tag: format!("c.r.{n}"),
                limits: key(n).limits,
                hits: 1,
                force: false,
            };
            assert!(f.check(Algorithm::SlidingWindow, &op, &m).0.allowed);
        }
        assert_eq!(f.pending_len(), 2);
        assert_eq!(m.reconcile_dropped.load(Ordering::Relaxed), 3);
        let left: Vec<String> = f
            .pending
            .lock()
            .drain()
            .into_iter()
            .map(|(k, _)| k.tag)
            .collect();
        assert_eq!(left, ["c.r.3", "c.r.4"], "the newest debts are kept");
    }
}
