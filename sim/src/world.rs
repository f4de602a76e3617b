//! The simulated world's event loop: proxies running the filter's global-scope logic
//! from `meshlimit-core` ([`crate::proxy`]: share choice, bucket at a share, report
//! triggers, candidate and tracked sets, grant application, the entry trailer's
//! encoding), one companion running `core::shares` per key ([`crate::companion`]),
//! and ONE exact GCRA on the merged traffic as the yardstick. Time is simulated, in integer nanoseconds; every random draw comes from
//! the scenario's seed, so a run is the same on every machine.
//!
//! Simplifications (said in `docs/global-limits.md`): a proxy is one table and one
//! candidate set (the per-VM sets and the shared outbox merge losslessly up to their
//! caps); tables do not evict; the network delay is constant and nothing is lost.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use meshlimit_core::config::Limit;
use meshlimit_core::gcra;
use meshlimit_core::global::SyncView;
use meshlimit_core::report::{CandidateSet, TrackedKeys, TrackedParams, TriggerParams};
use meshlimit_core::shares::ShareParams;

use crate::companion::Companion;
use crate::proxy::{apply_answer, build_report, request, Answer, Proxy, SentReport};
use crate::rng::{Rng, Zipf};

/// Simulated traffic starts here (a zero `tat` is a full bucket).
pub const T0: u64 = 1_000_000_000_000;
/// The proxies of the first phase start (and sync) this long before the traffic.
pub const WARM_UP_NS: u64 = 5_000_000_000;

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The limit every client has.
    pub limit: Limit,
    pub interval_ns: u64,
    /// One-way delay proxy ⇄ companion.
    pub one_way_ns: u64,
    pub shares: ShareParams,
    pub trigger: TriggerParams,
    pub tracked: TrackedParams,
    pub candidate_capacity: usize,
    pub fallback_share: Option<u32>,
    /// Re-report keys whose grant came back below target (on by default; off to
    /// measure what it buys).
    pub report_pending: bool,
    pub floor_scale: u32,
    pub duration_ns: u64,
    pub seed: u64,
}

impl Config {
    /// The shipped defaults for a limit and a sync interval.
    pub fn new(limit: Limit, interval_ns: u64, duration_ns: u64) -> Config {
        Config {
            limit,
            interval_ns,
            one_way_ns: 1_000_000,
            shares: ShareParams::default(),
            trigger: TriggerParams::for_interval(interval_ns),
            tracked: TrackedParams::default(),
            candidate_capacity: 16_384,
            fallback_share: None,
            report_pending: true,
            floor_scale: 1,
            duration_ns,
            seed: 1,
        }
    }
}

/// Which client each request is for.
#[derive(Debug, Clone)]
pub enum Clients {
    One,
    Zipf {
        n: usize,
        s: f64,
    },
    /// `hot` clients get `hot_fraction` of the requests, the other `n − hot` the rest,
    /// uniformly.
    HotAndQuiet {
        n: usize,
        hot: usize,
        hot_fraction: f64,
    },
}

/// From `start_ns` (relative to the run's start) on, proxy `i` receives `rates[i]`
/// requests per second; `None` = the proxy is not running (not yet joined, or dead).
#[derive(Debug, Clone)]
pub struct Phase {
    pub start_ns: u64,
    pub rates: Vec<Option<f64>>,
}

/// Per-client totals.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientStat {
    pub requests: u64,
    pub admitted: u64,
    pub ideal: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub requests: u64,
    pub admitted: u64,
    pub ideal: u64,
    pub clients: HashMap<u32, ClientStat>,
    /// (ns since the traffic started, entries) of each report sent from then on (a
    /// heartbeat has 0 entries).
    pub reports: Vec<(u64, u32)>,
    pub dropped_candidates: u64,
    pub dropped_tracked: u64,
    /// Cumulative (admitted, ideal) at the end of each simulated second.
    pub timeline: Vec<(u64, u64)>,
}

impl Outcome {
    pub fn accuracy(&self) -> f64 {
        self.admitted as f64 / self.ideal.max(1) as f64
    }

    /// Totals over clients the yardstick limited (it refused some of their requests).
    pub fn limited(&self) -> ClientStat {
        let mut t = ClientStat::default();
        for c in self.clients.values().filter(|c| c.ideal < c.requests) {
            t.requests += c.requests;
            t.admitted += c.admitted;
            t.ideal += c.ideal;
        }
        t
    }

    /// Entries per report: (mean, p99, max), over the reports sent `after_ns` or later.
    pub fn report_stats(&self, after_ns: u64) -> (f64, u32, u32) {
        let mut s: Vec<u32> = (self.reports.iter())
            .filter(|r| r.0 >= after_ns)
            .map(|r| r.1)
            .collect();
        if s.is_empty() {
            return (0.0, 0, 0);
        }
        s.sort_unstable();
        let mean = s.iter().map(|&x| f64::from(x)).sum::<f64>() / s.len() as f64;
        let p99 = s[(s.len() * 99 / 100).min(s.len() - 1)];
        (mean, p99, *s.last().unwrap_or(&0))
    }

    /// Sync callouts per admitted request.
    pub fn callouts_per_admitted(&self) -> f64 {
        self.reports.len() as f64 / self.admitted.max(1) as f64
    }
}

enum Ev {
    Boot,
    Phase(usize),
    Arrival(u16, u32),
    Tick(u16, u32),
    Deliver(Box<SentReport>),
    Answer(Box<Answer>),
}

/// Events in time order; ties in the order they were scheduled.
#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Timed>>,
    seq: u64,
}

struct Timed(u64, u64, Ev);

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

impl Queue {
    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse(Timed(at, self.seq, ev)));
    }

    fn pop(&mut self) -> Option<(u64, Ev)> {
        self.heap.pop().map(|Reverse(Timed(at, _, ev))| (at, ev))
    }
}

pub fn run(cfg: &Config, phases: &[Phase], clients: &Clients) -> Outcome {
    let n = phases[0].rates.len();
    let mut rng = Rng::new(cfg.seed);
    let zipf = match clients {
        Clients::Zipf { n, s } => Some(Zipf::new(*n, *s)),
        _ => None,
    };
    let mut proxies: Vec<Proxy> = (0..n)
        .map(|_| Proxy {
            running: false,
            arrivals: 0,
            life: 0,
            rate: 0.0,
            table: HashMap::new(),
            sync: SyncView {
                last_ok_sent_ns: None,
                proxy_ttl_ns: 3 * cfg.interval_ns,
                n_live: 0,
            },
            candidates: CandidateSet::with_capacity(cfg.candidate_capacity),
            tracked: TrackedKeys::default(),
            in_flight: false,
            ticks: 0,
        })
        .collect();
    let mut companion = Companion {
        records: HashMap::new(),
        last_seen: vec![None; n],
    };
    let mut ideal_tats: HashMap<u32, u64> = HashMap::new();
    let mut out = Outcome::default();
    let limits = [cfg.limit];

    let mut queue = Queue::default();
    // The fleet runs (and syncs) for a while before the traffic starts.
    let boot = Phase {
        start_ns: 0,
        rates: phases[0].rates.iter().map(|r| r.map(|_| 0.0)).collect(),
    };
    queue.push(T0 - WARM_UP_NS, Ev::Boot);
    for (i, ph) in phases.iter().enumerate() {
        queue.push(T0 + ph.start_ns, Ev::Phase(i));
    }
    let end = T0 + cfg.duration_ns;

    while let Some((now, ev)) = queue.pop() {
        if now >= end {
            break;
        }
        while now >= T0 + (out.timeline.len() as u64 + 1) * 1_000_000_000 {
            out.timeline.push((out.admitted, out.ideal));
        }
        match ev {
            Ev::Boot | Ev::Phase(_) => {
                let phase = match ev {
                    Ev::Phase(i) => &phases[i],
                    _ => &boot,
                };
                for (p, rate) in phase.rates.iter().enumerate() {
                    let px = &mut proxies[p];
                    match (px.running, rate) {
                        (false, Some(_)) => {
                            // Starts (or restarts) with empty shared data and syncs at once.
                            px.running = true;
                            px.life += 1;
                            px.table.clear();
                            px.tracked = TrackedKeys::default();
                            px.in_flight = false;
                            px.ticks = 0;
                            px.sync.last_ok_sent_ns = None;
                            px.sync.n_live = 0;
                            queue.push(now, Ev::Tick(p as u16, px.life));
                        }
                        (true, None) => {
                            px.running = false;
                            px.life += 1;
                        }
                        _ => {}
                    }
                    px.rate = rate.unwrap_or(0.0);
                    px.arrivals += 1;
                    if px.rate > 0.0 {
                        let at = now + rng.exp_gap_ns(px.rate);
                        queue.push(at, Ev::Arrival(p as u16, px.arrivals));
                    }
                }
            }
            Ev::Arrival(p, generation) => {
                let px = &mut proxies[p as usize];
                if generation != px.arrivals || !px.running {
                    continue;
                }
                let client = match clients {
                    Clients::One => 0,
                    Clients::Zipf { .. } => zipf.as_ref().map_or(0, |z| z.sample(&mut rng)),
                    Clients::HotAndQuiet {
                        n,
                        hot,
                        hot_fraction,
                    } => {
                        if rng.unit() < *hot_fraction {
                            rng.below(*hot as u64) as u32
                        } else {
                            (*hot as u64 + rng.below((*n - *hot) as u64)) as u32
                        }
                    }
                };
                let admitted = request(cfg, px, client, now);
                let ideal = {
                    let tat = ideal_tats.entry(client).or_insert(0);
                    gcra::check(&limits, std::slice::from_mut(tat), now, 1).allowed
                };
                let c = out.clients.entry(client).or_default();
                c.requests += 1;
                c.admitted += u64::from(admitted);
                c.ideal += u64::from(ideal);
                out.requests += 1;
                out.admitted += u64::from(admitted);
                out.ideal += u64::from(ideal);
                let at = now + rng.exp_gap_ns(px.rate);
                queue.push(at, Ev::Arrival(p, generation));
            }
            Ev::Tick(p, life) => {
                let px = &mut proxies[p as usize];
                if life != px.life {
                    continue;
                }
                // A proxy syncs as soon as it starts, then at its own phase.
                let next = match px.ticks {
                    0 => now + 1 + rng.below(cfg.interval_ns),
                    _ => now + cfg.interval_ns,
                };
                px.ticks += 1;
                queue.push(next, Ev::Tick(p, life));
                if px.in_flight {
                    continue;
                }
                let report = build_report(cfg, px, p, now);
                if now >= T0 {
                    out.reports.push((now - T0, report.entries.len() as u32));
                }
                px.in_flight = true;
                queue.push(now + cfg.one_way_ns, Ev::Deliver(Box::new(report)));
            }
            Ev::Deliver(report) => {
                let answer = companion.handle(cfg, &report, now);
                queue.push(now + cfg.one_way_ns, Ev::Answer(Box::new(answer)));
            }
            Ev::Answer(a) => {
                let px = &mut proxies[a.proxy as usize];
                if a.life == px.life {
                    apply_answer(cfg, px, &a, now);
                }
            }
        }
    }
    for px in &proxies {
        out.dropped_candidates += px.candidates.dropped();
        out.dropped_tracked += px.tracked.dropped;
    }
    out
}
