//! Per VM, off the request path: the sync with the companion (global scope). The
//! pure parts are `meshlimit_core::sync`; this module adds the clock, the tick and the
//! callout.
//!
//! Every VM on every tick merges its candidates into the proxy's outbox, refreshes the
//! sync view its requests decide with, and tries to hold the leader's lease. The leader
//! sends one `POST /v1/sync` per interval (the outbox, its tracked keys, the keys of a
//! failed report; an empty report is the heartbeat) and applies the answer. A failure
//! of any kind (no answer in time, a refused connection, a status other than 200, a
//! body that is too big or not a valid answer for the report) subtracts nothing: the
//! keys go back to the outbox and their counts into the next report. Requests never
//! wait for any of it.

use log::{debug, info, warn};
use meshlimit_core::protocol::{SyncReport, MAX_ANSWER_BYTES};
use meshlimit_core::report::{TrackedKeys, TrackedParams};
use meshlimit_core::sync::{self, Pending, Reporter, SyncFailure};

use crate::host::{self, EnvoySharedData};
use crate::metrics::{self, Counter, Gauge};
use crate::root::Plugin;
use crate::service::Companion;

/// The report this VM is waiting for an answer to.
struct InFlight {
    token: u32,
    pending: Pending,
}

/// One VM's part in the sync.
pub struct Syncer {
    /// This VM, for the leader's lease.
    vm_id: u64,
    /// `proxy_id` on the wire: the configured id and this Envoy's start nonce.
    wire_id: String,
    in_flight: Option<InFlight>,
    last_tick_ns: u64,
    /// Time unreachable not yet counted in whole seconds.
    fallback_carry_ns: u64,
    /// Candidate-set drops already counted.
    drops_counted: u64,
    /// The last report failed (to log a change of state once, not every interval).
    failing: bool,
    tracked_params: TrackedParams,
}

impl Syncer {
    /// Creates the proxy's sync keys (once per proxy), learns the start nonce, and sends
    /// a heartbeat at once: an unknown cluster is refused here (a configuration error),
    /// and the proxy learns the live count before its first requests.
    pub fn start(companion: &Companion, now: u64) -> Result<Syncer, ()> {
        sync::create_keys(&EnvoySharedData);
        let nonce = sync::nonce(&EnvoySharedData, host::random_u64() as u32);
        let mut s = Syncer {
            vm_id: host::random_u64() | 1,
            wire_id: sync::wire_proxy_id(&companion.proxy_id, nonce),
            in_flight: None,
            last_tick_ns: now,
            fallback_carry_ns: 0,
            drops_counted: 0,
            failing: false,
            tracked_params: TrackedParams::default(),
        };
        let heartbeat = Pending {
            report: SyncReport {
                proxy_id: s.wire_id.clone(),
                zone: companion.zone.clone(),
                interval_ms: companion.interval.as_millis() as u64,
                entries: Vec::new(),
            },
            keys: Vec::new(),
            sent_ns: now,
        };
        let token = s.send(companion, heartbeat.clone())?;
        s.in_flight = Some(InFlight {
            token,
            pending: heartbeat,
        });
        Ok(s)
    }

    fn send(&self, companion: &Companion, pending: Pending) -> Result<u32, ()> {
        companion.post(
            "/v1/sync",
            &sync::encode_report(&pending.report),
            companion.sync_timeout,
        )
    }

    fn reporter<'a>(&'a self, plugin: &'a Plugin, companion: &'a Companion) -> Reporter<'a> {
        Reporter {
            rules: &plugin.config.rules,
            sets: plugin.config.sets,
            proxy_id: &self.wire_id,
            zone: &companion.zone,
            interval_ms: companion.interval.as_millis() as u64,
        }
    }

    /// One tick of this VM.
    pub fn tick(&mut self, plugin: &Plugin, now: u64) {
        let (Some(vm), Some(companion)) = (&plugin.vm, &plugin.companion) else {
            return;
        };
        let shared = &EnvoySharedData;
        let interval = companion.interval.as_nanos() as u64;
        {
            let mut candidates = vm.candidates.borrow_mut();
            let dropped = sync::post_candidates(shared, &mut candidates);
            let set_drops = candidates.dropped() - self.drops_counted;
            self.drops_counted = candidates.dropped();
            metrics::count_n(Counter::ReportDropped, (dropped + set_drops) as u32);
        }
        let state = sync::read_proxy(shared);
        let view = state.view(interval);
        vm.sync.set(view);
        let elapsed = now.saturating_sub(self.last_tick_ns);
        self.last_tick_ns = now;
        if !sync::hold_lease(shared, self.vm_id, now, 2 * interval) {
            return;
        }
        if !view.reachable(now) {
            self.fallback_carry_ns += elapsed;
            let secs = self.fallback_carry_ns / 1_000_000_000;
            self.fallback_carry_ns %= 1_000_000_000;
            metrics::count_n(Counter::FallbackSeconds, secs as u32);
        }
        metrics::set(Gauge::LiveProxies, u64::from(state.n_live));
        metrics::set(Gauge::ReportCap, state.report_cap() as u64);
        if self.in_flight.is_some() || !state.due(now, interval) {
            return;
        }
        let outbox = sync::take_outbox(shared);
        let tracked = sync::load_tracked(shared, &self.tracked_params);
        metrics::set(Gauge::TrackedKeys, tracked.len() as u64);
        let (pending, leftover) = sync::build_report(
            shared,
            &self.reporter(plugin, companion),
            outbox,
            &tracked,
            sync::load_tracked_cursor(shared),
            state.report_cap(),
            now,
        );
        sync::save_tracked_cursor(shared, &pending);
        let dropped = sync::merge_into_outbox(shared, &leftover, sync::OUTBOX_CAPACITY);
        metrics::count_n(Counter::ReportDropped, dropped as u32);
        sync::record_sent(shared, now);
        metrics::count_n(Counter::SyncEntries, pending.keys.len() as u32);
        let mut by_urgency = [0u32; 4];
        for k in &pending.keys {
            by_urgency[usize::from(sync::urgency(k.reasons).min(3))] += 1;
        }
        for (c, n) in [
            Counter::SyncEntriesHot,
            Counter::SyncEntriesDue,
            Counter::SyncEntriesNew,
            Counter::SyncEntriesTracked,
        ]
        .into_iter()
        .zip(by_urgency)
        {
            metrics::count_n(c, n);
        }
        match self.send(companion, pending.clone()) {
            Ok(token) => self.in_flight = Some(InFlight { token, pending }),
            Err(()) => self.failed(&pending, "the callout could not be sent"),
        }
    }

    /// The answer to a callout of this VM; false if the token is not this VM's report.
    pub fn on_answer(&mut self, plugin: &Plugin, token: u32, body_size: usize) -> bool {
        if self.in_flight.as_ref().is_none_or(|f| f.token != token) {
            return false;
        }
        let Some(InFlight { pending, .. }) = self.in_flight.take() else {
            return false;
        };
        let now = host::now_ns();
        let latency_ms = now.saturating_sub(pending.sent_ns) / 1_000_000;
        metrics::count_n(Counter::SyncLatencyMs, latency_ms as u32);
        let status = host::http_call_status();
        let answer = if body_size > MAX_ANSWER_BYTES {
            Err(SyncFailure::Oversized(body_size))
        } else {
            sync::parse_answer(status, &host::http_call_body(body_size), &pending)
        };
        let (answer, companion) = match (answer, &plugin.companion) {
            (Ok(a), Some(c)) => (a, c),
            (Err(e), _) => {
                self.failed(&pending, &e.to_string());
                return true;
            }
            (Ok(_), None) => return true,
        };
        let shared = &EnvoySharedData;
        let mut tracked = if pending.keys.is_empty() {
            TrackedKeys::default()
        } else {
            sync::load_tracked(shared, &self.tracked_params)
        };
        let who = self.reporter(plugin, companion);
        let applied = sync::apply_answer(
            shared,
            &who,
            &pending,
            &answer,
            &mut tracked,
            &self.tracked_params,
            now,
        );
        if !pending.keys.is_empty() {
            sync::save_tracked(shared, &tracked);
            metrics::set(Gauge::TrackedKeys, tracked.len() as u64);
        }
        if let Some(vm) = &plugin.vm {
            let interval = companion.interval.as_nanos() as u64;
            vm.sync.set(sync::read_proxy(shared).view(interval));
        }
        metrics::count(Counter::SyncOk);
        metrics::count_n(Counter::GrantsApplied, applied.grants as u32);
        metrics::set(Gauge::LiveProxies, u64::from(answer.proxies));
        if self.failing {
            info!("sync with the companion recovered");
            self.failing = false;
        }
        debug!(
            "sync: {} keys reported, {} grants applied, {} gone, {} live proxies, {latency_ms} ms",
            pending.keys.len(),
            applied.grants,
            applied.missing,
            answer.proxies
        );
        true
    }

    fn failed(&mut self, pending: &Pending, why: &str) {
        metrics::count(Counter::SyncFailed);
        let dropped = sync::requeue(&EnvoySharedData, pending);
        metrics::count_n(Counter::ReportDropped, dropped as u32);
        if !self.failing {
            warn!("sync with the companion failed ({why}); global rules follow their failure_mode until it answers again");
            self.failing = true;
        } else {
            debug!("sync with the companion failed again: {why}");
        }
    }
}
