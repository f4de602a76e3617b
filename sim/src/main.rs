//! Prints the simulation's tables: `cargo run -p meshlimit-sim --release` (add
//! `--scale` for 10 to 50 proxies and up to 1M clients, `--tune` for the parameter
//! search, `--timeline` for admitted − ideal second by second).

use meshlimit_core::shares::Smoothing;
use meshlimit_sim::scenario::{self, Scenario};
use meshlimit_sim::world::Clients;

fn header() {
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>6} | {:>7} | {:>14} | {:>16} | {:>9} |",
        "scenario",
        "admitted",
        "ideal",
        "acc",
        "acc lim",
        "bound",
        "entries mean/p99/max",
        "callouts"
    );
    println!(
        "|{:-<46}|{:->10}|{:->10}|{:->8}|{:->9}|{:->16}|{:->22}|{:->11}|",
        "", "", "", "", "", "", "", ""
    );
}

fn row(s: &Scenario) {
    let o = s.run();
    let l = o.limited();
    let (mean, p99, max) = o.report_stats(s.steady_from_ns);
    let bound = s.bound.as_ref().map_or("—".to_string(), |b| {
        let (lo, hi) = b.range();
        format!("{lo:.0}..+{hi:.0}")
    });
    let limited = match l.ideal {
        0 => "—".to_string(),
        ideal => format!("{:.4}", l.admitted as f64 / ideal as f64),
    };
    println!(
        "| {:<44} | {:>8} | {:>8} | {:>6.4} | {:>7} | {:>14} | {:>20} | {:>9.5} |",
        s.name,
        o.admitted,
        o.ideal,
        o.accuracy(),
        limited,
        bound,
        format!("{mean:.1} / {p99} / {max}"),
        o.callouts_per_admitted(),
    );
}

fn scenarios() -> Vec<Scenario> {
    vec![
        scenario::uniform(),
        scenario::skewed(10.0),
        scenario::skewed(3.0),
        scenario::skewed(2.5),
        scenario::skewed(2.0),
        scenario::shift(),
        scenario::join(),
        scenario::leave(),
        scenario::zipf(3, 100_000, 30_000.0, 60),
        scenario::hot_and_quiet(3, 10_000, 10),
    ]
}

fn scale() {
    // The bound's dependence on the sync interval and the round trip.
    for (i, d) in [(250, 1), (1000, 1), (1000, 50), (4000, 1)] {
        for s in [scenario::shift(), scenario::leave()] {
            row(&scenario::with_timing(s, i * 1_000_000, d * 1_000_000));
        }
    }
    for (n, clients, rate) in [
        (3, 10_000, 10_000.0),
        (10, 10_000, 10_000.0),
        (50, 10_000, 10_000.0),
        (10, 100_000, 30_000.0),
        (50, 100_000, 30_000.0),
        (50, 1_000_000, 100_000.0),
    ] {
        row(&scenario::zipf(n, clients, rate, 30));
    }
    for n in [3, 10, 50] {
        row(&scenario::hot_and_quiet(n, 10_000, 10));
    }
    for n in [3, 10, 50] {
        for t in [0.5, 0.9, 5.0] {
            row(&scenario::uniform_n(n, t));
        }
    }
    // The same at N = 50 with a burst of 4 s of rate: per-proxy buckets deep enough for
    // their Poisson noise.
    for t in [0.5, 0.9, 5.0] {
        let mut s = scenario::uniform_n(50, t);
        s.cfg.limit = meshlimit_core::config::Limit::new(1, 100, 400).expect("valid");
        s.name += ", burst 4×max";
        row(&s);
    }
}

/// Accuracy (mean over 3 seeds) of the scenarios for variations of the parameters.
fn tune() {
    type Knob = (&'static str, fn(&mut Scenario));
    let knobs: Vec<Knob> = vec![
        ("shipped defaults", |_| {}),
        ("margin 0", |s| s.cfg.shares.margin_ppm = 0),
        ("margin 2 %", |s| s.cfg.shares.margin_ppm = 20_000),
        ("margin 5 %", |s| s.cfg.shares.margin_ppm = 50_000),
        ("no smoothing", |s| {
            s.cfg.shares.smoothing = Smoothing {
                keep: 0,
                jump_sigmas: 3,
            }
        }),
        ("halve, jump at 3σ", |s| {
            s.cfg.shares.smoothing = Smoothing {
                keep: 1,
                jump_sigmas: 3,
            }
        }),
        ("keep 7/8, jump at 3σ", |s| {
            s.cfg.shares.smoothing = Smoothing {
                keep: 7,
                jump_sigmas: 3,
            }
        }),
        ("keep 3/4, jump at 2σ", |s| {
            s.cfg.shares.smoothing = Smoothing {
                keep: 3,
                jump_sigmas: 2,
            }
        }),
        ("keep 3/4, jump at 4σ", |s| {
            s.cfg.shares.smoothing = Smoothing {
                keep: 3,
                jump_sigmas: 4,
            }
        }),
        ("no headroom", |s| s.cfg.shares.headroom_sigmas = 0),
        ("headroom 2σ", |s| s.cfg.shares.headroom_sigmas = 2),
        ("θ 0.25", |s| s.cfg.trigger.hot_permille = 250),
        ("θ 0.75", |s| s.cfg.trigger.hot_permille = 750),
        ("quiet 1/(4n)", |s| s.cfg.tracked.quiet_divisor = 4),
        ("quiet 1/(40n)", |s| s.cfg.tracked.quiet_divisor = 40),
        ("pending not re-reported", |s| s.cfg.report_pending = false),
        ("lease 60 s", |s| s.cfg.shares.lease_ms = 60_000),
    ];
    let set = || {
        vec![
            scenario::skewed(2.5),
            scenario::shift(),
            scenario::leave(),
            scenario::uniform_n(3, 0.9),
            scenario::zipf(3, 20_000, 10_000.0, 30),
            scenario::hot_and_quiet(3, 10_000, 10),
        ]
    };
    print!("| {:<24} |", "variation");
    for s in set() {
        print!(" {} |", s.name);
    }
    println!("\n|{:-<26}|{}", "", "---:|".repeat(set().len()));
    for (name, knob) in knobs {
        print!("| {name:<24} |");
        for mut s in set() {
            knob(&mut s);
            let (mut acc, mut size) = (0.0, 0.0);
            for seed in 1..=3 {
                s.cfg.seed = seed;
                let o = s.run();
                acc += o.accuracy() / 3.0;
                size += o.report_stats(s.steady_from_ns).0 / 3.0;
            }
            match s.clients {
                Clients::One => print!(" {acc:.4} |"),
                _ => print!(" {acc:.4} / {size:.1} |"),
            }
        }
        println!();
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--scale") => {
            header();
            scale();
        }
        Some("--tune") => tune(),
        Some("--timeline") => {
            for s in scenarios().into_iter().take(8) {
                let o = s.run();
                let d: Vec<i64> = (o.timeline.iter().step_by(5))
                    .map(|&(a, i)| a as i64 - i as i64)
                    .collect();
                println!("{}: admitted − ideal every 5 s: {d:?}", s.name);
            }
        }
        _ => {
            header();
            for s in scenarios() {
                row(&s);
            }
        }
    }
}
