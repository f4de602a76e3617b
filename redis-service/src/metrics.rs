//! Prometheus text exposition, by hand: a handful of counters and two histograms do
//! not justify a metrics framework, and fixed label sets keep cardinality bounded (no
//! client id, rule id or proxy id ever becomes a label).

use crate::service::Source;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit (integer atomics; f64 atomics do not exist).
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if v <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6).max(0.0) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const BATCH_BOUNDS: &[f64] = &[1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0];

pub struct Metrics {
    /// (endpoint, status) -> count
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// (endpoint, decision, source) -> count
    decisions: Mutex<BTreeMap<(&'static str, &'static str, Source), u64>>,
    /// error kind -> count
    store_errors: Mutex<BTreeMap<&'static str, u64>>,
    pub store_latency: Histogram,
    pub sync_batch: Histogram,
    pub reconciled: AtomicU64,
    pub reconcile_dropped: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            decisions: Mutex::new(BTreeMap::new()),
            store_errors: Mutex::new(BTreeMap::new()),
            store_latency: Histogram::new(LATENCY_BOUNDS),
            sync_batch: Histogram::new(BATCH_BOUNDS),
            reconciled: AtomicU64::new(0),
            reconcile_dropped: AtomicU64::new(0),
        }
    }
}

/// Values owned by other parts, read at scrape time.
pub struct Gauges {
    pub degraded: bool,
    pub degraded_transitions: u64,
    pub degraded_seconds: f64,
    pub pending: usize,
    pub round_trips: u64,
    pub rules: usize,
    pub store: &'static str,
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *self.requests.lock().entry((endpoint, status)).or_default() += 1;
    }

    pub fn decision(&self, endpoint: &'static str, allowed: bool, source: Source, n: u64) {
        if n == 0 {
            return;
        }
        let d = if allowed { "allowed" } else { "denied" };
        *self
            .decisions
            .lock()
            .entry((endpoint, d, source))
            .or_default() += n;
    }

    pub fn store_error(&self, kind: &'static str) {
        *self.store_errors.lock().entry(kind).or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut o = String::with_capacity(4096);
        o.push_str("# HELP meshlimit_requests_total HTTP requests by endpoint and status.\n# TYPE meshlimit_requests_total counter\n");
        for ((e, s), n) in self.requests.lock().iter() {
            let _ = writeln!(
                o,
                "meshlimit_requests_total{{endpoint=\"{e}\",status=\"{s}\"}} {n}"
            );
        }
        o.push_str("# HELP meshlimit_decisions_total Decisions (checks, or sync entries) by outcome and by who decided: store, fallback, fail_open, fail_closed.\n# TYPE meshlimit_decisions_total counter\n");
        for ((e, d, s), n) in self.decisions.lock().iter() {
            let _ = writeln!(
                o,
                "meshlimit_decisions_total{{endpoint=\"{e}\",decision=\"{d}\",source=\"{}\"}} {n}",
                s.label()
            );
        }
        o.push_str("# HELP meshlimit_store_errors_total Store calls (items) that failed or missed the deadline.\n# TYPE meshlimit_store_errors_total counter\n");
        for (k, n) in self.store_errors.lock().iter() {
            let _ = writeln!(o, "meshlimit_store_errors_total{{kind=\"{k}\"}} {n}");
        }
        self.store_latency.render(
            &mut o,
            "meshlimit_store_latency_seconds",
            "Latency of one store batch call.",
        );
        self.sync_batch.render(
            &mut o,
            "meshlimit_sync_batch_entries",
            "Entries per /v1/sync report.",
        );
        let _ = write!(
            o,
            "# HELP meshlimit_degraded 1 while answering from the local fallback (store unreachable).\n# TYPE meshlimit_degraded gauge\nmeshlimit_degraded {}\n\
             # HELP meshlimit_degraded_transitions_total Times the service entered degraded mode.\n# TYPE meshlimit_degraded_transitions_total counter\nmeshlimit_degraded_transitions_total {}\n\
             # HELP meshlimit_degraded_seconds_total Seconds spent in degraded mode, the current period included.\n# TYPE meshlimit_degraded_seconds_total counter\nmeshlimit_degraded_seconds_total {:.3}\n\
             # HELP meshlimit_reconcile_pending Counts admitted while degraded, waiting to be written to the store.\n# TYPE meshlimit_reconcile_pending gauge\nmeshlimit_reconcile_pending {}\n\
             # HELP meshlimit_reconciled_total Pending entries written to the store after it came back.\n# TYPE meshlimit_reconciled_total counter\nmeshlimit_reconciled_total {}\n\
             # HELP meshlimit_reconcile_dropped_total Pending entries dropped because the pending table was full.\n# TYPE meshlimit_reconcile_dropped_total counter\nmeshlimit_reconcile_dropped_total {}\n\
             # HELP meshlimit_store_round_trips_total Round trips to the store (one pipeline to one node counts one).\n# TYPE meshlimit_store_round_trips_total counter\nmeshlimit_store_round_trips_total {}\n\
             # HELP meshlimit_rules Rules loaded for /rate-limit/check.\n# TYPE meshlimit_rules gauge\nmeshlimit_rules {}\n\
             # HELP meshlimit_store_info The configured store.\n# TYPE meshlimit_store_info gauge\nmeshlimit_store_info{{store=\"{}\"}} 1\n",
            u8::from(g.degraded),
            g.degraded_transitions,
            g.degraded_seconds,
            g.pending,
            self.reconciled.load(Ordering::Relaxed),
            self.reconcile_dropped.load(Ordering::Relaxed),
            g.round_trips,
            g.rules,
            g.store,
        );
        o
    }
}
