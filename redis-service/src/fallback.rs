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

use crate::config::{Algorithm, FailMode};
use crate::metrics::Metrics;
use crate::shares::ShareParams;
use crate::store::memory::{now_us, MemoryStore};
use crate::store::{CheckOp, CheckOutcome, Store, StoreLimit, SyncOp, SyncOutcome};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What a degraded decision still has to add to the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub algo: Algorithm,
    pub tag: String,
    pub limits: Vec<StoreLimit>,
}

pub struct Fallback {
    pub mode: FailMode,
    pub share: f64,
    local: MemoryStore,
    degraded: AtomicBool,
    pending: Mutex<HashMap<PendingKey, u64>>,
    max_pending: usize,
}

impl Fallback {
    pub fn new(mode: FailMode, share: f64, local: MemoryStore, max_pending: usize) -> Self {
        Fallback {
            mode,
            share,
            local,
            degraded: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            max_pending,
        }
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Returns true when this call flipped the state.
    pub fn set_degraded(&self, d: bool) -> bool {
        self.degraded.swap(d, Ordering::AcqRel) != d
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
        let mut p = self.pending.lock();
        if let Some(v) = p.get_mut(&key) {
            *v = v.saturating_add(hits);
        } else if p.len() < self.max_pending {
            p.insert(key, hits);
        } else {
            m.reconcile_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decides one check without the store. Returns the outcome and the metrics source.
    pub fn check(
        &self,
        algo: Algorithm,
        op: &CheckOp,
        m: &Metrics,
    ) -> (CheckOutcome, &'static str) {
        let (out, src) = match self.mode {
            FailMode::Fallback => {
                let scaled = CheckOp {
                    limits: op.limits.iter().map(|l| self.scale(l)).collect(),
                    ..op.clone()
                };
                match self.local.check_one(algo, &scaled, now_us()) {
                    Ok(o) => (o, "fallback"),
                    // Local table full: refuse rather than grow (bounded memory).
                    Err(_) => (closed(op), "fail_closed"),
                }
            }
            FailMode::Open => (
                CheckOutcome {
                    allowed: true,
                    tightest: 0,
                    remaining: 0,
                    reset_at: (now_us() / 1e6) as u64 + op.limits[0].window_secs,
                    retry_after_ms: 0,
                },
                "fail_open",
            ),
            FailMode::Closed => (closed(op), "fail_closed"),
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
        let mut out = match self.local.sync_one(proxy, &local_op, p, now_us()) {
            Ok(o) => o,
            Err(_) => SyncOutcome {
                used: 0,
                remaining: 0,
                reset_at: (now_us() / 1e6) as u64 + op.window_secs,
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
        let items: Vec<(PendingKey, u64)> = {
            let mut p = self.pending.lock();
            p.drain().collect()
        };
        let total = items.len();
        let mut failed: Vec<(PendingKey, u64)> = Vec::new();
        for algo in [Algorithm::SlidingWindow, Algorithm::TokenBucket] {
            let mine: Vec<&(PendingKey, u64)> =
                items.iter().filter(|(k, _)| k.algo == algo).collect();
            for chunk in mine.chunks(1000) {
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

    pub fn sweep(&self) {
        self.local.sweep();
    }
}

fn closed(_op: &CheckOp) -> CheckOutcome {
    CheckOutcome {
        allowed: false,
        tightest: 0,
        remaining: 0,
        reset_at: (now_us() / 1e6) as u64 + 1,
        retry_after_ms: 1000,
    }
}
