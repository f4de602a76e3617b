//! The scenarios the tests assert and the binary prints.

use std::fmt::Write as _;

use meshlimit_core::config::Limit;
use meshlimit_core::gcra::SHARE_ONE;

use crate::world::{Clients, Config, Outcome, Phase};

pub const S: u64 = 1_000_000_000;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub cfg: Config,
    pub phases: Vec<Phase>,
    pub clients: Clients,
    /// Report sizes are measured from here on (after the first sight of every key).
    pub steady_from_ns: u64,
    /// For one-client scenarios: the error bound that applies.
    pub bound: Option<Bound>,
}

impl Scenario {
    pub fn run(&self) -> Outcome {
        crate::world::run(&self.cfg, &self.phases, &self.clients)
    }
}

/// 100 per second, burst 100, synced every second, for 60 s.
pub fn base() -> Config {
    Config::new(Limit::new(1, 100, 100).expect("valid limit"), S, 60 * S)
}

fn steady(rates: &[f64]) -> Vec<Phase> {
    vec![Phase {
        start_ns: 0,
        rates: rates.iter().map(|&r| Some(r)).collect(),
    }]
}

fn one(name: &str, mut cfg: Config, phases: Vec<Phase>) -> Scenario {
    cfg.fallback_share = Some(SHARE_ONE / phases[0].rates.len() as u32);
    Scenario {
        name: name.into(),
        cfg,
        phases,
        clients: Clients::One,
        steady_from_ns: 10 * S,
        bound: None,
    }
}

/// Attaches the bound for `n` proxies, the proxies below their fair part at these
/// rates, and the events the scenario has.
fn bounded(mut s: Scenario, n: usize, unsat: &[f64], f: impl FnOnce(&mut Bound)) -> Scenario {
    let mut b = Bound::for_config(&s.cfg, n);
    b.unsaturated = unsat.to_vec();
    f(&mut b);
    s.bound = Some(b);
    s
}

/// One client at 3× its limit on each of 3 proxies.
pub fn uniform() -> Scenario {
    let rates = [300.0, 300.0, 300.0];
    let s = one("uniform, 3 proxies, 9× the limit", base(), steady(&rates));
    bounded(s, 3, &[], |_| {})
}

/// 90/5/5 at `times` the limit in total.
pub fn skewed(times: f64) -> Scenario {
    let r = 100.0 * times;
    let name = format!("90/5/5 at {times}× the limit");
    let s = one(&name, base(), steady(&[0.9 * r, 0.05 * r, 0.05 * r]));
    // The small proxies are below their fair third unless the total is over 6.7×.
    let small = if 0.05 * r < 100.0 / 3.0 {
        vec![0.05 * r; 2]
    } else {
        vec![]
    };
    bounded(s, 3, &small, |_| {})
}

/// 2.5× the limit, 90 % on proxy 0, moving to proxy 1 at 30 s.
pub fn shift() -> Scenario {
    let phases = vec![
        Phase {
            start_ns: 0,
            rates: vec![Some(225.0), Some(12.5), Some(12.5)],
        },
        Phase {
            start_ns: 30 * S,
            rates: vec![Some(12.5), Some(225.0), Some(12.5)],
        },
    ];
    let s = one("demand shift 90 % p0 → p1 at 30 s, 2.5×", base(), phases);
    // What moves is p0's share: the limit less the small proxies' shares.
    bounded(s, 3, &[12.5, 12.5], |b| b.shifts = vec![0.75])
}

/// Two proxies at 2× the limit each; a third joins at 30 s and takes a third.
pub fn join() -> Scenario {
    let phases = vec![
        Phase {
            start_ns: 0,
            rates: vec![Some(200.0), Some(200.0), None],
        },
        Phase {
            start_ns: 30 * S,
            rates: vec![Some(133.3), Some(133.3), Some(133.3)],
        },
    ];
    let s = one("a third proxy joins at 30 s, 4×", base(), phases);
    bounded(s, 3, &[], |b| b.joins = 1.0)
}

/// Three proxies at 1.5× the limit each; proxy 2 dies at 30 s, its traffic moves.
pub fn leave() -> Scenario {
    let phases = vec![
        Phase {
            start_ns: 0,
            rates: vec![Some(150.0); 3],
        },
        Phase {
            start_ns: 30 * S,
            rates: vec![Some(225.0), Some(225.0), None],
        },
    ];
    let s = one("proxy 2 dies at 30 s, 4.5×", base(), phases);
    bounded(s, 3, &[], |b| b.deaths = vec![1.0 / 3.0])
}

/// `clients` clients with Zipf(1) popularity, `rate` requests per second in total
/// spread evenly over `proxies`.
pub fn zipf(proxies: usize, clients: usize, rate: f64, secs: u64) -> Scenario {
    let mut cfg = base();
    cfg.duration_ns = secs * S;
    Scenario {
        name: format!("{clients} clients Zipf(1), {proxies} proxies, {rate} req/s"),
        cfg,
        phases: steady(&vec![rate / proxies as f64; proxies]),
        clients: Clients::Zipf { n: clients, s: 1.0 },
        steady_from_ns: secs * S / 2,
        bound: None,
    }
}

/// 10k active clients (0.5 req/s each), of which 10 are hot (3× their limit).
pub fn hot_and_quiet(proxies: usize, clients: usize, hot: usize) -> Scenario {
    let hot_rate = hot as f64 * 300.0;
    let quiet_rate = (clients - hot) as f64 * 0.5;
    let total = hot_rate + quiet_rate;
    let mut cfg = base();
    cfg.duration_ns = 120 * S;
    Scenario {
        name: format!("{clients} active clients, {hot} hot, {proxies} proxies"),
        cfg,
        phases: steady(&vec![total / proxies as f64; proxies]),
        clients: Clients::HotAndQuiet {
            n: clients,
            hot,
            hot_fraction: hot_rate / total,
        },
        steady_from_ns: 60 * S,
        bound: None,
    }
}

/// One client at `times` its limit in total, spread evenly over `n` proxies.
pub fn uniform_n(n: usize, times: f64) -> Scenario {
    let name = format!("uniform, {n} proxies, {times}× the limit");
    one(&name, base(), steady(&vec![100.0 * times / n as f64; n]))
}

/// The error bound of `docs/global-limits.md` for one key, as `admitted − ideal`:
///
/// ```text
/// −[ (1 − 1/n)·B + r·(I + RTT) + N          onset of a key (burst split, first report), rounding
///  + m·U·S + η·Σ_q √(λ_q / I)·S               margins and Poisson noise of unsaturated proxies
///  + Σ_shifts Δ·r·2·(I + RTT)                 demand moving between proxies
///  + Σ_deaths g·r·(4·I + RTT) ]               a dead proxy's share, until the companion drops it
///   ≤ admitted − ideal ≤
///  B + N + J·(r·(I + RTT) + B)/n              buckets' capacity; one token per proxy; proxies
///                                             starting a key at 1/n while others hold theirs
/// ```
#[derive(Debug, Clone, Default)]
pub struct Bound {
    /// Limit rate (per second) and burst.
    pub r: f64,
    pub b: f64,
    /// Live proxies.
    pub n: f64,
    /// Sync interval and round trip, seconds; length of the run `S`.
    pub interval: f64,
    pub rtt: f64,
    pub secs: f64,
    /// Margin `m`.
    pub margin: f64,
    /// Request rates at proxies below their fair part while the key is contended.
    pub unsaturated: Vec<f64>,
    /// Demand moves, as fractions of the limit.
    pub shifts: Vec<f64>,
    /// Shares of proxies that died.
    pub deaths: Vec<f64>,
    /// Proxies that started the key while others held grants.
    pub joins: f64,
}

/// Noise constant of the bound, fitted to the simulation (see the docs): per second,
/// an unsaturated proxy at `λ` requests per second costs at most `η·√(λ / I)`.
pub const ETA: f64 = 0.3;

impl Bound {
    pub fn for_config(cfg: &Config, n: usize) -> Bound {
        Bound {
            r: cfg.limit.max as f64 / cfg.limit.window_secs as f64,
            b: cfg.limit.burst as f64,
            n: n as f64,
            interval: cfg.interval_ns as f64 / 1e9,
            rtt: 2.0 * cfg.one_way_ns as f64 / 1e9,
            secs: cfg.duration_ns as f64 / 1e9,
            margin: f64::from(cfg.shares.margin_ppm) / 1e6,
            ..Bound::default()
        }
    }

    /// (lowest, highest) `admitted − ideal`.
    pub fn range(&self) -> (f64, f64) {
        let lag = self.interval + self.rtt;
        let onset = (1.0 - 1.0 / self.n) * self.b + self.r * lag;
        let unsat: f64 = self.unsaturated.iter().sum();
        let noise: f64 = self
            .unsaturated
            .iter()
            .map(|l| (l / self.interval).sqrt())
            .sum();
        let steady = (self.margin * unsat + ETA * noise) * self.secs;
        let shifts: f64 = self.shifts.iter().map(|d| d * self.r * 2.0 * lag).sum();
        let deaths: f64 = (self.deaths.iter())
            .map(|g| g * self.r * (4.0 * self.interval + self.rtt))
            .sum();
        let lower = -(onset + self.n + steady + shifts + deaths);
        let upper = self.b + self.n + self.joins * (self.r * lag + self.b) / self.n;
        (lower, upper)
    }

    pub fn holds(&self, admitted: u64, ideal: u64) -> bool {
        let (lo, hi) = self.range();
        let err = admitted as f64 - ideal as f64;
        lo <= err && err <= hi
    }
}

/// `s` with sync interval `interval_ns` and one-way delay `one_way_ns`, its bound
/// recomputed.
pub fn with_timing(mut s: Scenario, interval_ns: u64, one_way_ns: u64) -> Scenario {
    s.cfg.interval_ns = interval_ns;
    s.cfg.trigger = meshlimit_core::report::TriggerParams::for_interval(interval_ns);
    s.cfg.one_way_ns = one_way_ns;
    if let Some(b) = &mut s.bound {
        b.interval = interval_ns as f64 / 1e9;
        b.rtt = 2.0 * one_way_ns as f64 / 1e9;
    }
    let _ = write!(
        s.name,
        ", I={}ms, RTT={}ms",
        interval_ns / 1_000_000,
        2 * one_way_ns / 1_000_000
    );
    s
}
