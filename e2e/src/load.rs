//! Load from the test process: several targets at once (one per AZ, say), each at a
//! given request rate over keep-alive connections (one thread each), for a duration.
//! Counts 200 / 429 / other per target, latency percentiles, and a timeline of counts
//! per time bucket (to see an outage and the recovery after it).
//!
//! Paced load is open-loop: request `i` of a target is due at `start + i / rate`, spread
//! round-robin over its connections, and its latency is measured from when it was due,
//! not from when it could be sent. A server that stalls therefore shows the whole stall
//! in the percentiles instead of hiding it by holding the load back (coordinated
//! omission).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::client::{Client, Request};

/// Builds request number `i` (0, 1, 2, … per target): e.g. a client key from `i`.
pub type RequestFn = Arc<dyn Fn(u64) -> Request + Send + Sync>;

/// The class (0..n) request number `i` belongs to, e.g. its client, to count per class.
pub type ClassFn = Arc<dyn Fn(u64) -> usize + Send + Sync>;

/// Load on one target.
#[derive(Clone)]
pub struct Load {
    /// Names the target in reports (e.g. `az-a`).
    pub name: String,
    pub target: SocketAddr,
    /// Requests per second over all connections; None: each connection sends its next
    /// request as soon as it has the previous answer (closed loop, as fast as it goes).
    pub rate: Option<f64>,
    pub connections: usize,
    pub request: RequestFn,
    /// Width of a timeline bucket.
    pub bucket: Duration,
    /// Counts per class as well: how many classes, and which request is in which.
    pub classes: Option<(usize, ClassFn)>,
}

impl Load {
    /// One connection, unpaced, 100 ms buckets.
    pub fn new(
        name: &str,
        target: SocketAddr,
        request: impl Fn(u64) -> Request + Send + Sync + 'static,
    ) -> Load {
        Load {
            name: name.to_owned(),
            target,
            rate: None,
            connections: 1,
            request: Arc::new(request),
            bucket: Duration::from_millis(100),
            classes: None,
        }
    }

    /// Counts answers per class too (`LoadReport::classes`): `class(i)` in `0..n`.
    pub fn classes(
        mut self,
        n: usize,
        class: impl Fn(u64) -> usize + Send + Sync + 'static,
    ) -> Self {
        self.classes = Some((n, Arc::new(class)));
        self
    }

    pub fn rate(mut self, per_second: f64) -> Self {
        assert!(per_second > 0.0, "rate must be > 0");
        self.rate = Some(per_second);
        self
    }

    pub fn connections(mut self, n: usize) -> Self {
        assert!(n > 0, "at least one connection");
        self.connections = n;
        self
    }
}

/// Counts in one timeline bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub ok: u64,
    pub limited: u64,
    /// Other statuses and I/O errors.
    pub other: u64,
}

/// What one target answered.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub name: String,
    /// Requests sent (each got a response or an I/O error).
    pub sent: u64,
    /// 200.
    pub ok: u64,
    /// 429.
    pub limited: u64,
    /// Any other status, by status.
    pub other: BTreeMap<u16, u64>,
    /// Requests that got no response (connection refused, reset, timeout).
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the common start to the last response.
    pub elapsed: Duration,
    /// How far behind its schedule the load ever fell (paced load): if this is large
    /// the generator, not the server, set the pace.
    pub max_lag: Duration,
    pub bucket: Duration,
    pub timeline: Vec<Bucket>,
    /// Counts per class, when the load has classes (`Load::classes`).
    pub classes: Vec<Bucket>,
    /// Microseconds, sorted: from when each request was due.
    latency_us: Vec<u32>,
}

impl LoadReport {
    pub fn other_total(&self) -> u64 {
        self.other.values().sum()
    }

    /// Latency at quantile `q` (0.5, 0.99, 1.0 = max), from when requests were due.
    pub fn latency(&self, q: f64) -> Duration {
        percentile(&self.latency_us, q)
    }

    /// Requests per second actually sent.
    /// Counts over the timeline buckets that start in `[from, to)` (from the common start).
    pub fn between(&self, from: Duration, to: Duration) -> Bucket {
        let w = self.bucket.as_secs_f64();
        let mut sum = Bucket::default();
        for (i, b) in self.timeline.iter().enumerate() {
            let t = Duration::from_secs_f64(i as f64 * w);
            if t >= from && t < to {
                sum.ok += b.ok;
                sum.limited += b.limited;
                sum.other += b.other;
            }
        }
        sum
    }

    pub fn achieved_rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line for test output.
    pub fn summary(&self) -> String {
        format!(
            "{}: sent {} ({:.0}/s) ok {} limited {} other {:?} errors {} | p50 {:?} p99 {:?} max {:?} | max lag {:?}",
            self.name,
            self.sent,
            self.achieved_rate(),
            self.ok,
            self.limited,
            self.other,
            self.errors,
            self.latency(0.5),
            self.latency(0.99),
            self.latency(1.0),
            self.max_lag,
        )
    }
}

fn percentile(sorted: &[u32], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Duration::from_micros(sorted[rank.clamp(1, sorted.len()) - 1] as u64)
}

/// Loads running in the background; [`LoadRun::join`] waits for the end and reports.
pub struct LoadRun {
    threads: Vec<(usize, JoinHandle<ThreadResult>)>,
    loads: Vec<Load>,
    start: Instant,
}

#[derive(Default)]
struct ThreadResult {
    sent: u64,
    ok: u64,
    limited: u64,
    other: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
    last_response: Duration,
    max_lag: Duration,
    timeline: Vec<Bucket>,
    classes: Vec<Bucket>,
    latency_us: Vec<u32>,
}

/// Runs every load at once for `duration` and waits for the reports (in `loads` order).
pub fn run(loads: Vec<Load>, duration: Duration) -> Vec<LoadReport> {
    LoadRun::start(loads, duration).join()
}

impl LoadRun {
    /// Starts every load; they begin together once every connection is open.
    pub fn start(loads: Vec<Load>, duration: Duration) -> LoadRun {
        let total: usize = loads.iter().map(|l| l.connections).sum();
        let ready = Arc::new(Barrier::new(total + 1));
        // Every thread reads the common start time after the barrier.
        let start_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
        let mut threads = Vec::with_capacity(total);
        for (li, load) in loads.iter().enumerate() {
            for k in 0..load.connections {
                let load = load.clone();
                let ready = ready.clone();
                let start_cell = start_cell.clone();
                let t = std::thread::Builder::new()
                    .name(format!("load-{}-{k}", load.name))
                    .spawn(move || {
                        let mut client = Client::to(load.target);
                        // Connect first, so the start is not spent in handshakes; a
                        // failure shows up as the first request's error.
                        let _ = client.connect();
                        ready.wait();
                        let start = *start_cell.get().expect("start set before release");
                        connection_loop(&load, k, client, start, duration)
                    })
                    .expect("spawn load thread");
                threads.push((li, t));
            }
        }
        let start = Instant::now();
        start_cell.set(start).expect("set once");
        ready.wait();
        LoadRun {
            threads,
            loads,
            start,
        }
    }

    /// When the loads started.
    pub fn started(&self) -> Instant {
        self.start
    }

    pub fn join(self) -> Vec<LoadReport> {
        let mut parts: Vec<Vec<ThreadResult>> = self.loads.iter().map(|_| Vec::new()).collect();
        for (li, t) in self.threads {
            parts[li].push(t.join().expect("load thread panicked"));
        }
        self.loads
            .iter()
            .zip(parts)
            .map(|(load, parts)| merge(load, parts))
            .collect()
    }
}

fn connection_loop(
    load: &Load,
    k: usize,
    mut client: Client,
    start: Instant,
    duration: Duration,
) -> ThreadResult {
    let mut r = ThreadResult::default();
    if let Some((n, _)) = &load.classes {
        r.classes = vec![Bucket::default(); *n];
    }
    let conns = load.connections as u64;
    let bucket_us = load.bucket.as_micros().max(1) as u64;
    for j in 0u64.. {
        let i = j * conns + k as u64;
        let due = match load.rate {
            Some(rate) => {
                let at = Duration::from_secs_f64(i as f64 / rate);
                if at >= duration {
                    break;
                }
                start + at
            }
            None => {
                let now = Instant::now();
                if now >= start + duration {
                    break;
                }
                now
            }
        };
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let req = (load.request)(i);
        let sent_at = Instant::now();
        r.max_lag = r.max_lag.max(sent_at.saturating_duration_since(due));
        let result = client.try_send(&req);
        let done = Instant::now();
        r.sent += 1;
        r.last_response = r.last_response.max(done - start);
        let slot = ((due - start).as_micros() as u64 / bucket_us) as usize;
        if r.timeline.len() <= slot {
            r.timeline.resize(slot + 1, Bucket::default());
        }
        let b = &mut r.timeline[slot];
        let mut scratch = Bucket::default();
        let c = match &load.classes {
            Some((_, class)) => r.classes.get_mut(class(i)).expect("class in 0..n"),
            None => &mut scratch,
        };
        match result {
            Ok(resp) => match resp.status {
                200 => {
                    r.ok += 1;
                    b.ok += 1;
                    c.ok += 1;
                }
                429 => {
                    r.limited += 1;
                    b.limited += 1;
                    c.limited += 1;
                }
                s => {
                    *r.other.entry(s).or_default() += 1;
                    b.other += 1;
                    c.other += 1;
                }
            },
            Err(e) => {
                r.errors += 1;
                b.other += 1;
                c.other += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        r.latency_us.push(micros(done - due));
    }
    r
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

fn merge(load: &Load, parts: Vec<ThreadResult>) -> LoadReport {
    let mut rep = LoadReport {
        name: load.name.clone(),
        sent: 0,
        ok: 0,
        limited: 0,
        other: BTreeMap::new(),
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        max_lag: Duration::ZERO,
        bucket: load.bucket,
        timeline: Vec::new(),
        classes: Vec::new(),
        latency_us: Vec::new(),
    };
    for p in parts {
        rep.sent += p.sent;
        rep.ok += p.ok;
        rep.limited += p.limited;
        for (s, n) in p.other {
            *rep.other.entry(s).or_default() += n;
        }
        rep.errors += p.errors;
        if rep.first_error.is_none() {
            rep.first_error = p.first_error;
        }
        rep.elapsed = rep.elapsed.max(p.last_response);
        rep.max_lag = rep.max_lag.max(p.max_lag);
        if rep.timeline.len() < p.timeline.len() {
            rep.timeline.resize(p.timeline.len(), Bucket::default());
        }
        for (a, b) in rep.timeline.iter_mut().zip(&p.timeline) {
            a.ok += b.ok;
            a.limited += b.limited;
            a.other += b.other;
        }
        if rep.classes.len() < p.classes.len() {
            rep.classes.resize(p.classes.len(), Bucket::default());
        }
        for (a, b) in rep.classes.iter_mut().zip(&p.classes) {
            a.ok += b.ok;
            a.limited += b.limited;
            a.other += b.other;
        }
        rep.latency_us.extend(p.latency_us);
    }
    rep.latency_us.sort_unstable();
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_micros(50));
        assert_eq!(percentile(&v, 0.99), Duration::from_micros(99));
        assert_eq!(percentile(&v, 1.0), Duration::from_micros(100));
        assert_eq!(percentile(&v, 0.0), Duration::from_micros(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
