//! The service's decisions, independent of HTTP: rules, store calls under a deadline,
//! the switch to the fallback, and the probe that switches back. [`Service::start`]
//! sets it all up from the command line and owns the probe's task.

use crate::config::{Algorithm, Config};
use crate::fallback::Fallback;
use crate::keys::{KeyMaker, Namespace};
use crate::metrics::{Gauges, Metrics};
use crate::shares::{ShareParams, MAX_PEERS};
use crate::store::{self, CheckOp, CheckOutcome, Store, StoreError, StoreLimit, SyncOp};
use axum::http::StatusCode;
use meshlimit_core::config::Rule;
use meshlimit_core::protocol::{CheckRequest, CheckResponse, SyncGrant, SyncRequest, SyncResponse};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Longest the store may take to connect at start; past it the service starts degraded
/// and the probe connects it later.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline of one pass writing pending counts back, and the least deadline of the
/// probe's ping (a store coming back may be slow at first).
const RECONCILE_DEADLINE: Duration = Duration::from_secs(2);

/// The least deadline of `/readyz`'s ping.
const READY_PING_DEADLINE: Duration = Duration::from_millis(500);

/// The least probe interval.
const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// A report's span: the one a span of 0 stands for, and the longest one believed.
const DEFAULT_SPAN_MS: u64 = 1000;
const MAX_SPAN_MS: u64 = 86_400_000;

/// Who decided: the metrics' `source` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The store (Redis, or the embedded store).
    Store,
    /// The local fallback, enforcing `--fallback-share` of each limit.
    Fallback,
    /// Admitted without a count (`--on-store-error open`).
    FailOpen,
    /// Refused (`--on-store-error closed`, or a full fallback table).
    FailClosed,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::Store => "store",
            Source::Fallback => "fallback",
            Source::FailOpen => "fail_open",
            Source::FailClosed => "fail_closed",
        }
    }
}

/// An error for the client: HTTP status, short code, detail naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }
}

pub struct Service {
    algorithm: Algorithm,
    rules: RwLock<Arc<HashMap<String, Rule>>>,
    store: Arc<dyn Store>,
    fallback: Fallback,
    metrics: Metrics,
    keys: KeyMaker,
    share: ShareParams,
    deadline: Duration,
    sync_deadline: Duration,
    /// When the store last answered anything (nanoseconds since `epoch`).
    last_answer_ns: AtomicU64,
    epoch: Instant,
    /// The probe's task (see [`Service::start`]), stopped by [`Service::shutdown`].
    probe: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Service {
    /// Sets up what `cfg` asks for (the rules file, the store, the fallback), starts the
    /// store (connecting to Redis; a store that cannot be reached within
    /// [`CONNECT_TIMEOUT`] leaves the service degraded, answering from the fallback) and
    /// the probe, every `--probe-interval-ms`. `reports` is the runtime report
    /// connections are driven on (`None`: the caller's). Inside the runtime.
    pub async fn start(
        cfg: &Config,
        reports: Option<tokio::runtime::Handle>,
    ) -> Result<Arc<Service>, String> {
        let keys = KeyMaker::new(&cfg.key_prefix, &cfg.load_client_hash_key()?);
        let rules = match &cfg.rules {
            Some(p) => {
                let bytes =
                    std::fs::read(p).map_err(|e| format!("--rules {}: {e}", p.display()))?;
                meshlimit_core::config::parse_rules(&bytes)
                    .map_err(|e| format!("--rules {}: {e}", p.display()))?
            }
            None => Vec::new(),
        };
        let store = store::from_config(cfg, keys.clone(), reports)?;
        let fallback = Fallback::from_config(cfg, keys.clone());
        let svc = Arc::new(Service::new(cfg, rules, store, fallback, keys));
        svc.fallback.start();
        let started = tokio::time::timeout(CONNECT_TIMEOUT, svc.store.start())
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("connect timed out".into())));
        if let Err(e) = started {
            // Start even when the store is down: degraded, then the probe brings it back.
            tracing::warn!("store not reachable at start, starting degraded: {e}");
            svc.fallback.enter_degraded(&e.to_string());
        }
        svc.start_probe(Duration::from_millis(cfg.probe_interval_ms).max(MIN_PROBE_INTERVAL));
        Ok(svc)
    }

    /// The parts, as they are: nothing is started (see [`Service::start`]).
    fn new(
        cfg: &Config,
        rules: Vec<Rule>,
        store: Arc<dyn Store>,
        fallback: Fallback,
        keys: KeyMaker,
    ) -> Self {
        Service {
            algorithm: cfg.algorithm,
            rules: RwLock::new(Arc::new(index(rules))),
            store,
            fallback,
            metrics: Metrics::default(),
            keys,
            share: ShareParams {
                ttl_ms: cfg.share_ttl_ms,
                floor: cfg.share_floor,
                max_peers: MAX_PEERS,
                headroom: cfg.share_headroom,
            },
            deadline: cfg.store_timeout(),
            sync_deadline: cfg.sync_timeout(),
            last_answer_ns: AtomicU64::new(0),
            epoch: Instant::now(),
            probe: Mutex::new(None),
        }
    }

    /// Runs [`Service::probe`] every `every` until [`Service::shutdown`] (or until the
    /// service is dropped: the task holds no strong reference).
    fn start_probe(self: &Arc<Self>, every: Duration) {
        let svc: Weak<Service> = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(svc) = svc.upgrade() else { return };
                svc.probe().await;
            }
        });
        if let Some(old) = self.probe.lock().replace(task) {
            old.abort();
        }
    }

    /// Stops the probe, then one last attempt to write what the fallback owes.
    pub async fn shutdown(&self) {
        if let Some(probe) = self.probe.lock().take() {
            probe.abort();
        }
        self.flush().await;
    }

    /// The algorithm of `/rate-limit/check`.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The store's name, as `/readyz` and `meshlimit_store_info` give it.
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Answering from the fallback because the store is not usable.
    pub fn is_degraded(&self) -> bool {
        self.fallback.is_degraded()
    }

    /// Counts one HTTP request and its status (`meshlimit_requests_total`).
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        self.metrics.request(endpoint, status);
    }

    /// Replaces all rules at once (the caller has validated the whole set).
    pub fn replace_rules(&self, rules: Vec<Rule>) -> usize {
        let n = rules.len();
        *self.rules.write() = Arc::new(index(rules));
        n
    }

    /// Rules loaded for `/rate-limit/check`.
    pub fn rule_count(&self) -> usize {
        self.rules.read().len()
    }

    /// The item that failed is answered by the fallback either way. Only an unreachable
    /// store (connection, deadline) switches the whole service to degraded mode; an
    /// error about one item (e.g. a script refused while its slot migrates) does not
    /// stop the others from using the store. What the fallback admits is written back
    /// by the probe in both cases.
    ///
    /// A report that is merely slow (`from_report`, `StoreError::Slow`) does not switch
    /// either: reports queue behind each other when they come faster than the store
    /// takes them, and that must not send every check to the fallback. A store that is
    /// really gone refuses connections (which does switch) or fails checks too.
    fn store_failed(&self, e: &StoreError, from_report: bool) {
        self.metrics.store_error(e.kind());
        match e {
            StoreError::Slow(_) if from_report => {
                tracing::debug!("a report's store call was slow: {e}")
            }
            StoreError::Unavailable(_) | StoreError::Slow(_) => {
                if self.fallback.enter_degraded(&e.to_string()) {
                    tracing::warn!("store failing, answering from the fallback: {e}");
                }
            }
            StoreError::Failed(_) => tracing::debug!("store refused one item: {e}"),
        }
    }

    /// `/rate-limit/check`: the store's decision within the check deadline, else the
    /// fallback's.
    pub async fn check(&self, req: &CheckRequest) -> Result<CheckResponse, ApiError> {
        req.validate().map_err(ApiError::bad_request)?;
        let rule = self
            .rules
            .read()
            .get(&req.rule_id)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "unknown_rule",
                    format!("rule_id: no rule {:?} is loaded", req.rule_id),
                )
            })?;
        let hits = req.hits.unwrap_or(1);
        // More hits than a limit holds could never be admitted, and no retry time would
        // be true: say so instead of refusing forever.
        for l in &rule.limits {
            let holds = match self.algorithm {
                Algorithm::SlidingWindow => l.max,
                Algorithm::TokenBucket => l.burst,
            };
            if hits > holds {
                return Err(ApiError::bad_request(format!(
                    "hits: {hits} is more than rule {:?} ever admits at once ({holds} per {} s)",
                    rule.id, l.window_secs
                )));
            }
        }
        let op = CheckOp {
            tag: self.keys.tag(Namespace::Check, &rule.id, &req.client_id),
            limits: rule.limits.iter().map(StoreLimit::from).collect(),
            hits,
            force: false,
        };
        let (o, source) = match self.check_op(op.clone()).await {
            Some(o) => (o, Source::Store),
            None => self.fallback.check(self.algorithm, &op, &self.metrics),
        };
        self.metrics.decision("check", o.allowed, source, 1);
        let limit = rule.limits.get(o.tightest).map_or(0, |l| l.max);
        Ok(CheckResponse {
            allowed: o.allowed,
            remaining: o.remaining,
            reset_at: o.reset_at,
            limit,
            retry_after: (!o.allowed).then(|| o.retry_after_ms.div_ceil(1000).max(1)),
        })
    }

    fn store_answered(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.last_answer_ns.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether the store has answered anything (a check, a report) within the last
    /// check deadline.
    fn store_answered_lately(&self) -> bool {
        let last = Duration::from_nanos(self.last_answer_ns.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last) < self.deadline
    }

    /// The store's answer, or None when the fallback must decide.
    async fn check_op(&self, op: CheckOp) -> Option<CheckOutcome> {
        if self.fallback.is_degraded() {
            return None;
        }
        let t = Instant::now();
        let r = tokio::time::timeout(self.deadline, self.store.check(self.algorithm, &[op])).await;
        self.metrics
            .store_latency
            .observe(t.elapsed().as_secs_f64());
        match r {
            Ok(mut v) => match v.pop() {
                Some(Ok(o)) => {
                    self.store_answered();
                    Some(o)
                }
                Some(Err(e)) => {
                    self.store_failed(&e, false);
                    None
                }
                None => None,
            },
            // One late answer while the store goes on answering other calls is a
            // blip (on a shared machine, a scheduling delay): this check is answered by
            // the fallback, the service stays. Only a store that has said nothing for a
            // whole deadline switches it, so one slow call cannot send every check to the
            // fallback until the next probe.
            Err(_) if self.store_answered_lately() => {
                self.metrics.store_error("late");
                tracing::debug!("a check missed its deadline of {:?}", self.deadline);
                None
            }
            Err(_) => {
                self.store_failed(
                    &StoreError::Slow(format!("no answer within {:?}", self.deadline)),
                    false,
                );
                None
            }
        }
    }

    /// `/v1/sync`: each entry added to its global count and the proxy's share allocated,
    /// by the store within the report deadline, else by the fallback.
    pub async fn sync(&self, req: &SyncRequest) -> Result<SyncResponse, ApiError> {
        req.validate().map_err(ApiError::bad_request)?;
        self.metrics.sync_batch.observe(req.entries.len() as f64);
        // A zero span would make every rate infinite; treat it as one second.
        let span_ms = if req.span_ms == 0 {
            DEFAULT_SPAN_MS
        } else {
            req.span_ms.min(MAX_SPAN_MS)
        };
        let ops: Vec<SyncOp> = req
            .entries
            .iter()
            .map(|e| SyncOp {
                tag: self.keys.tag(Namespace::Sync, &e.rule, &e.key),
                window_secs: e.window_secs,
                max: e.max,
                admitted: e.admitted,
                rate: (e.admitted + e.rejected) as f64 * 1000.0 / span_ms as f64,
            })
            .collect();
        let mut results: Vec<Option<crate::store::SyncOutcome>> = vec![None; ops.len()];
        // Reports try the store even while checks are degraded: they have a deadline and
        // a connection of their own, so a slow check period does not turn every report
        // into counts owed (which the probe would then have to write back before checks
        // could use the store again), and a store that is gone fails them fast anyway.
        if !ops.is_empty() {
            let t = Instant::now();
            let r = tokio::time::timeout(
                self.sync_deadline,
                self.store.sync(&req.proxy_id, &ops, &self.share),
            )
            .await;
            self.metrics
                .store_latency
                .observe(t.elapsed().as_secs_f64());
            match r {
                Ok(v) => {
                    for (slot, item) in results.iter_mut().zip(v) {
                        match item {
                            Ok(o) => {
                                self.store_answered();
                                *slot = Some(o)
                            }
                            Err(e) => self.store_failed(&e, true),
                        }
                    }
                }
                // Answered from the fallback; the service stays as it is (see
                // `store_failed`).
                Err(_) => {
                    self.metrics.store_error("sync_deadline");
                    tracing::debug!(
                        "sync report missed its deadline of {:?}",
                        self.sync_deadline
                    );
                }
            }
        }
        let mut degraded = false;
        let mut from_store = 0u64;
        let mut entries = Vec::with_capacity(ops.len());
        for ((e, op), r) in req.entries.iter().zip(&ops).zip(results) {
            let o = match r {
                Some(o) => {
                    from_store += 1;
                    o
                }
                None => {
                    degraded = true;
                    self.fallback
                        .sync(&req.proxy_id, op, &self.share, &self.metrics)
                }
            };
            entries.push(SyncGrant {
                rule: e.rule.clone(),
                key: e.key.clone(),
                window_secs: e.window_secs,
                weight: o.weight,
                used: o.used,
                remaining: o.remaining,
                reset_at: o.reset_at,
            });
        }
        self.metrics
            .decision("sync", true, Source::Store, from_store);
        self.metrics.decision(
            "sync",
            true,
            Source::Fallback,
            entries.len() as u64 - from_store,
        );
        Ok(SyncResponse {
            entries,
            ttl_ms: self.share.ttl_ms,
            degraded,
        })
    }

    /// `/readyz`: the store answers (within the deadline) and we are not degraded. The
    /// error says why not: the store's own words where it gave any (`NOAUTH ...`, a
    /// refused connection, a deadline).
    pub async fn ready(&self) -> Result<(), String> {
        if let Some((reason, for_how_long)) = self.fallback.reason() {
            return Err(format!(
                "degraded for {:.1} s, answering from the local fallback: {reason}",
                for_how_long.as_secs_f64()
            ));
        }
        match tokio::time::timeout(self.deadline.max(READY_PING_DEADLINE), self.store.ping()).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("store ping timed out".into()),
        }
    }

    /// One probe step: while degraded, ping; when the store answers, reconcile and clear.
    /// Not degraded, it writes back what items that failed alone still owe.
    async fn probe(&self) {
        if !self.fallback.is_degraded() {
            // Items that failed alone (not a store outage) still owe their counts.
            if self.fallback.pending_len() > 0 {
                if let Err(e) = self
                    .fallback
                    .reconcile(self.store.as_ref(), RECONCILE_DEADLINE, &self.metrics)
                    .await
                {
                    tracing::warn!("reconciliation incomplete: {e}");
                }
            }
            return;
        }
        let ping =
            tokio::time::timeout(self.deadline.max(RECONCILE_DEADLINE), self.store.ping()).await;
        match ping {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("probe: {e}");
                self.fallback.still_degraded(&e.to_string());
                return;
            }
            Err(_) => {
                tracing::debug!("probe: ping timed out");
                self.fallback.still_degraded("store ping timed out");
                return;
            }
        }
        match self
            .fallback
            .reconcile(
                self.store.as_ref(),
                self.deadline.max(RECONCILE_DEADLINE),
                &self.metrics,
            )
            .await
        {
            Ok(n) => {
                if self.fallback.leave_degraded() {
                    tracing::info!("store is back; reconciled {n} pending entries");
                }
                // Requests that raced the switch may have added more; write those too.
                let _ = self
                    .fallback
                    .reconcile(self.store.as_ref(), RECONCILE_DEADLINE, &self.metrics)
                    .await;
            }
            Err(e) => {
                tracing::warn!("reconciliation incomplete: {e}");
                self.fallback
                    .still_degraded(&format!("writing back pending counts: {e}"));
            }
        }
    }

    /// On shutdown: one last attempt to write what the fallback owes.
    async fn flush(&self) {
        if self.fallback.pending_len() > 0 {
            match self
                .fallback
                .reconcile(self.store.as_ref(), RECONCILE_DEADLINE, &self.metrics)
                .await
            {
                Ok(n) => tracing::info!("flushed {n} pending entries"),
                Err(e) => tracing::warn!("shutdown flush incomplete: {e}"),
            }
        }
    }

    /// `/metrics`: the Prometheus text.
    pub fn render_metrics(&self) -> String {
        let (degraded_transitions, degraded_seconds) = self.fallback.degraded_totals();
        self.metrics.render(&Gauges {
            degraded: self.fallback.is_degraded(),
            degraded_transitions,
            degraded_seconds,
            pending: self.fallback.pending_len(),
            round_trips: self.store.round_trips(),
            rules: self.rule_count(),
            store: self.store.name(),
        })
    }
}

fn index(rules: Vec<Rule>) -> HashMap<String, Rule> {
    rules.into_iter().map(|r| (r.id.clone(), r)).collect()
}
