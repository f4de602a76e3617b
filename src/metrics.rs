//! Counters kept in the VM and flushed to Envoy on each tick.
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
}

const N: usize = 11;

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
];

pub const CONFIG_ERRORS: &str = "meshlimit_config_errors_total";

thread_local! {
    static PENDING: [Cell<u64>; N] = Default::default();
    static IDS: Cell<Option<[u32; N]>> = const { Cell::new(None) };
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
}

/// A refused configuration: counted at once (this is not the request path).
pub fn config_error() {
    if let Some(id) = host::define_counter(CONFIG_ERRORS) {
        host::increment_counter(id, 1);
    }
}
