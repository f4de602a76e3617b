//! The scenarios the tests assert and the binary prints.

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
    }
}

/// One client at 3× its limit on each of 3 proxies.
pub fn uniform() -> Scenario {
    one(
        "uniform, 3 proxies, 9× the limit",
        base(),
        steady(&[300.0, 300.0, 300.0]),
    )
}

/// 90/5/5 at `times` the limit in total.
pub fn skewed(times: f64) -> Scenario {
    let r = 100.0 * times;
    let name = format!("90/5/5 at {times}× the limit");
    one(&name, base(), steady(&[0.9 * r, 0.05 * r, 0.05 * r]))
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
    one("demand shift 90 % p0 → p1 at 30 s, 2.5×", base(), phases)
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
    one("a third proxy joins at 30 s, 4×", base(), phases)
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
    one("proxy 2 dies at 30 s, 4.5×", base(), phases)
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
    }
}
