//! `POST /v1/sync`: a proxy's report (an empty one is its heartbeat) answered with its
//! shares of every reported key's limits, from the store within the report deadline,
//! else from the fallback (`degraded: true`).
//!
//! Per (rule, key, limit) the store keeps one record: the global sliding-window count
//! (`used`) and the peers of `meshlimit_core::shares` (each proxy's demand, grant and
//! last report). The allocation is the core's (`allocate_detailed`; `lua/sync.lua` in
//! Redis is its port), with liveness from the store's registry (`crate::liveness`).

use crate::keys::Namespace;
use crate::service::{ApiError, Service, Source};
use crate::store::{KeyOutcome, StoreLimit, SyncOp};
use meshlimit_core::protocol::{KeyGrant, SyncAnswer, SyncReport};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// One reported key as the store sees it: its distinct limits, and for each limit the
/// filter listed, which of them it is (a rule may list one limit twice; it gets one
/// record, and both places the same share).
fn to_op(svc: &Service, e: &meshlimit_core::protocol::ReportedKey) -> (SyncOp, Vec<usize>) {
    let mut limits: Vec<StoreLimit> = Vec::with_capacity(e.limits.len());
    let mut at = Vec::with_capacity(e.limits.len());
    for l in &e.limits {
        let l = StoreLimit {
            window_secs: l.window_secs,
            max: l.max,
            burst: l.burst,
        };
        let i = match limits.iter().position(|x| *x == l) {
            Some(i) => i,
            None => {
                limits.push(l);
                limits.len() - 1
            }
        };
        at.push(i);
    }
    let op = SyncOp {
        tag: svc.keys.tag(Namespace::Sync, &e.rule, &e.key),
        limits,
        admitted: e.admitted,
        rejected: e.rejected,
        // The filter's span is only believed up to a lease: a longer one would only make
        // a new record's first demand smaller (and the script's products larger).
        span_ms: e.span_ms.clamp(1, svc.share.lease_ms),
        release: e.release,
    };
    (op, at)
}

impl Service {
    /// `/v1/sync`.
    pub async fn sync(&self, req: &SyncReport) -> Result<SyncAnswer, ApiError> {
        req.validate().map_err(ApiError::bad_request)?;
        let m = &self.metrics;
        let n = req.entries.len();
        m.sync_reports.fetch_add(1, Ordering::Relaxed);
        m.sync_entries.fetch_add(n as u64, Ordering::Relaxed);
        m.sync_batch.observe(n as f64);
        let (ops, places): (Vec<SyncOp>, Vec<Vec<usize>>) =
            req.entries.iter().map(|e| to_op(self, e)).unzip();
        let releases = ops.iter().filter(|o| o.release).count() as u64;
        m.sync_releases.fetch_add(releases, Ordering::Relaxed);

        // Reports try the store even while checks are degraded: they have a deadline and
        // a connection of their own, so a slow check period does not turn every report
        // into counts owed (which the probe would then have to write back before checks
        // could use the store again), and a store that is gone fails them fast anyway.
        let t = Instant::now();
        let r = tokio::time::timeout(
            self.sync_deadline,
            self.store
                .sync(&req.proxy_id, req.interval_ms, &ops, &self.share),
        )
        .await;
        m.store_latency.sync.observe(t.elapsed().as_secs_f64());
        let (mut proxies, mut results): (Option<u32>, Vec<Option<KeyOutcome>>) = match r {
            Ok(Ok(o)) => {
                self.store_answered();
                let keys = o
                    .keys
                    .into_iter()
                    .map(|k| k.map_err(|e| self.store_failed(&e, true)).ok())
                    .collect();
                (Some(o.proxies), keys)
            }
            Ok(Err(e)) => {
                self.store_failed(&e, true);
                (None, vec![None; n])
            }
            // Answered from the fallback; the service stays as it is (see
            // `Service::store_failed`).
            Err(_) => {
                m.store_error("sync_deadline");
                tracing::debug!(
                    "sync report missed its deadline of {:?}",
                    self.sync_deadline
                );
                (None, vec![None; n])
            }
        };
        if let Some(p) = proxies {
            m.live_proxies.store(u64::from(p), Ordering::Relaxed);
        }
        let missing: Vec<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
        let degraded = proxies.is_none() || !missing.is_empty();
        if degraded {
            let fops: Vec<SyncOp> = missing.iter().map(|&i| ops[i].clone()).collect();
            let (local, outs) =
                self.fallback
                    .sync(&req.proxy_id, req.interval_ms, &fops, &self.share, m);
            // The fallback knows only the proxies that report to this instance, while the
            // others keep the shares the store gave them. So a share from the fallback is
            // at most 1/n, n the larger of the live count the store last told and the
            // fallback's own: the degraded proxies together take no more than their
            // fair part (docs/global-limits.md, "degraded companion").
            let last_known =
                u32::try_from(m.live_proxies.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
            let n_cap = last_known.max(local).max(1);
            let cap = meshlimit_core::gcra::SHARE_ONE / n_cap;
            for (&i, mut o) in missing.iter().zip(outs) {
                for s in &mut o.shares {
                    *s = (*s).min(cap);
                }
                results[i] = Some(o);
            }
            let p = proxies.get_or_insert(n_cap);
            *p = (*p).max(n_cap);
        }
        m.decision("sync", true, Source::Store, (n - missing.len()) as u64);
        m.decision("sync", true, Source::Fallback, missing.len() as u64);
        let entries = results
            .into_iter()
            .zip(&places)
            .map(|(k, at)| {
                let k = k.unwrap_or(KeyOutcome {
                    shares: Vec::new(),
                    pending: false,
                    used: Vec::new(),
                });
                KeyGrant {
                    shares: at
                        .iter()
                        .map(|&i| k.shares.get(i).copied().unwrap_or(0))
                        .collect(),
                    pending: k.pending,
                    used: at
                        .iter()
                        .map(|&i| k.used.get(i).copied().unwrap_or(0))
                        .collect(),
                }
            })
            .collect();
        Ok(SyncAnswer {
            entries,
            proxies: proxies.unwrap_or(1).max(1),
            lease_ms: self.share.lease_ms,
            degraded,
        })
    }
}
