//! Counters (and two gauges) kept in the VM and flushed to Envoy on each tick.
//!
//! Incrementing an Envoy metric is a host call; doing it per request would add one
//! more crossing to the request path. Each VM instead counts in plain memory and adds
//! its counts to the Envoy counters once per tick (1 s), so `/stats/prometheus` lags by
//! at most one tick.

use std::cell::Cell;

use crate::host;

#[derive(Clone, Copy, Debug)]
pub enum Counter {
    Allowed,
    Rejected,
    ShadowRejected,
    /// An active entry of another client was evicted to make room (table too small).
    Evicted,
    /// The CAS loop gave up under contention and the request was let through.
    FailedOpen,
    /// A request matched a rule but had none of its key sources (the rule was passed
    /// over).
    NoClientKey,
    /// A path with no normal form (invalid percent-encoding, control byte): answered 400.
    BadPath,
    /// A client key header came more than once: answered 400.
    RepeatedKeyHeader,
    /// A global (or strict) rule decided a request by its failure mode `local`, `open`
    /// or `closed`: the companion was unreachable.
    FailureModeLocal,
    FailureModeOpen,
    FailureModeClosed,
    /// Reports to the companion answered with a valid answer, and the others (no
    /// answer in time, a refused connection, a status other than 200, a body that is
    /// not a valid answer for the report).
    SyncOk,
    SyncFailed,
    /// Milliseconds from sending a report to its answer (ok or failed), summed: with
    /// `SyncOk + SyncFailed`, the mean sync latency.
    SyncLatencyMs,
    /// Keys carried by reports that were sent.
    SyncEntries,
    /// The same keys by why they were sent ([`meshlimit_core::sync::urgency`]): refused
    /// or draining their share, waiting (the rest of a target, a renewal, a release, a
    /// failed report's retry), new, tracked. What makes reports large, for an operator.
    SyncEntriesHot,
    SyncEntriesDue,
    SyncEntriesNew,
    SyncEntriesTracked,
    /// Keys not reported because a VM's candidate set or the proxy's outbox was full.
    ReportDropped,
    /// Grants from the companion written to their keys' entries.
    GrantsApplied,
    /// Whole seconds the companion was unreachable (the proxy ran on its failure modes),
    /// counted by the VM that sends the reports.
    FallbackSeconds,
    /// Strict checks the companion answered (admitted, refused), and those it did not
    /// answer (in time, or validly), by the rule's failure mode.
    StrictAllowed,
    StrictRejected,
    StrictFailedOpen,
    StrictFailedClosed,
    StrictFailedLocal,
}

const N: usize = 27;

const COUNTERS: [(Counter, &str); N] = [
    (Counter::Allowed, "meshlimit_allowed_total"),
    (Counter::Rejected, "meshlimit_rejected_total"),
    (Counter::ShadowRejected, "meshlimit_shadow_rejected_total"),
    (Counter::Evicted, "meshlimit_evicted_total"),
    (Counter::FailedOpen, "meshlimit_failed_open_total"),
    (Counter::NoClientKey, "meshlimit_no_client_key_total"),
    (Counter::BadPath, "meshlimit_bad_path_total"),
    (
        Counter::RepeatedKeyHeader,
        "meshlimit_repeated_key_header_total",
    ),
    (
        Counter::FailureModeLocal,
        "meshlimit_failure_mode_local_total",
    ),
    (
        Counter::FailureModeOpen,
        "meshlimit_failure_mode_open_total",
    ),
    (
        Counter::FailureModeClosed,
        "meshlimit_failure_mode_closed_total",
    ),
    (Counter::SyncOk, "meshlimit_sync_ok_total"),
    (Counter::SyncFailed, "meshlimit_sync_failed_total"),
    (Counter::SyncLatencyMs, "meshlimit_sync_latency_ms_total"),
    (Counter::SyncEntries, "meshlimit_sync_entries_total"),
    (Counter::SyncEntriesHot, "meshlimit_sync_entries_hot_total"),
    (Counter::SyncEntriesDue, "meshlimit_sync_entries_due_total"),
    (Counter::SyncEntriesNew, "meshlimit_sync_entries_new_total"),
    (
        Counter::SyncEntriesTracked,
        "meshlimit_sync_entries_tracked_total",
    ),
    (Counter::ReportDropped, "meshlimit_report_dropped_total"),
    (Counter::GrantsApplied, "meshlimit_grants_applied_total"),
    (Counter::FallbackSeconds, "meshlimit_fallback_seconds_total"),
    (Counter::StrictAllowed, "meshlimit_strict_allowed_total"),
    (Counter::StrictRejected, "meshlimit_strict_rejected_total"),
    (
        Counter::StrictFailedOpen,
        "meshlimit_strict_failed_open_total",
    ),
    (
        Counter::StrictFailedClosed,
        "meshlimit_strict_failed_closed_total",
    ),
    (
        Counter::StrictFailedLocal,
        "meshlimit_strict_failed_local_total",
    ),
];

/// Gauges, set on the tick by the VM that sends the reports.
#[derive(Clone, Copy, Debug)]
pub enum Gauge {
    /// Keys whose share is above the quiet level (re-reported every interval): the
    /// shares in use that matter for accuracy.
    TrackedKeys,
    /// Live proxies, as the last answer said.
    LiveProxies,
    /// Most keys the next report may carry: below its maximum while reports fail (it
    /// halves on each failure and doubles on each answer).
    ReportCap,
}

const G: usize = 3;

const GAUGES: [(Gauge, &str); G] = [
    (Gauge::TrackedKeys, "meshlimit_tracked_keys"),
    (Gauge::LiveProxies, "meshlimit_live_proxies"),
    (Gauge::ReportCap, "meshlimit_report_cap"),
];

pub const CONFIG_ERRORS: &str = "meshlimit_config_errors_total";

thread_local! {
    static PENDING: [Cell<u64>; N] = Default::default();
    static IDS: Cell<Option<[u32; N]>> = const { Cell::new(None) };
    static GAUGE_VALUES: [Cell<Option<u64>>; G] = Default::default();
    static GAUGE_IDS: Cell<Option<[u32; G]>> = const { Cell::new(None) };
}

/// Sets a gauge (sent to Envoy on the next flush); no host call.
pub fn set(g: Gauge, value: u64) {
    GAUGE_VALUES.with(|v| v[g as usize].set(Some(value)));
}

/// Counts one event; no host call.
#[inline]
pub fn count(c: Counter) {
    PENDING.with(|p| {
        let cell = &p[c as usize];
        cell.set(cell.get() + 1);
    });
}

/// Counts `n` events; no host call.
#[inline]
pub fn count_n(c: Counter, n: u32) {
    if n > 0 {
        PENDING.with(|p| {
            let cell = &p[c as usize];
            cell.set(cell.get() + u64::from(n));
        });
    }
}

/// Defines the counters in Envoy (idempotent: the same name gives the same metric).
pub fn define() {
    let mut ids = [0u32; N];
    for (i, (_, name)) in COUNTERS.iter().enumerate() {
        match host::define_counter(name) {
            Some(id) => ids[i] = id,
            None => return,
        }
    }
    IDS.with(|c| c.set(Some(ids)));
    let mut gauge_ids = [0u32; G];
    for (i, (_, name)) in GAUGES.iter().enumerate() {
        match host::define_gauge(name) {
            Some(id) => gauge_ids[i] = id,
            None => return,
        }
    }
    GAUGE_IDS.with(|c| c.set(Some(gauge_ids)));
    // Defined up front so that it shows (as 0) before anything goes wrong.
    let _ = host::define_counter(CONFIG_ERRORS);
}

/// Adds the pending counts to Envoy's counters.
pub fn flush() {
    let Some(ids) = IDS.with(|c| c.get()) else {
        return;
    };
    PENDING.with(|p| {
        for (i, cell) in p.iter().enumerate() {
            let n = cell.replace(0);
            if n > 0 {
                host::increment_counter(ids[i], n);
            }
        }
    });
    let Some(gauge_ids) = GAUGE_IDS.with(|c| c.get()) else {
        return;
    };
    GAUGE_VALUES.with(|v| {
        for (i, cell) in v.iter().enumerate() {
            if let Some(value) = cell.take() {
                host::set_gauge(gauge_ids[i], value);
            }
        }
    });
}

/// A refused configuration: counted at once (this is not the request path).
pub fn config_error() {
    if let Some(id) = host::define_counter(CONFIG_ERRORS) {
        host::increment_counter(id, 1);
    }
}
