//! Prints the simulation's tables: `cargo run -p meshlimit-sim --release`.

use meshlimit_sim::scenario::{self, Scenario};

fn row(s: &Scenario) {
    let t = std::time::Instant::now();
    let o = s.run();
    let l = o.limited();
    let (mean, p99, max) = o.report_stats(10 * scenario::S);
    println!(
        "{:<48} {:>9} {:>9} {:>7.4} {:>7.4} {:>7.1} {:>5} {:>6} {:>8.5} {:>5.1}s",
        s.name,
        o.admitted,
        o.ideal,
        o.accuracy(),
        l.admitted as f64 / l.ideal.max(1) as f64,
        mean,
        p99,
        max,
        o.callouts_per_admitted(),
        t.elapsed().as_secs_f64()
    );
}

/// Accuracy of a few scenarios (mean over 3 seeds) for a grid of parameters.
fn tune() {
    use meshlimit_core::shares::Smoothing;
    let grid: Vec<(u32, u32, u32, bool, u32, u32)> = vec![
        (20_000, 3, 0, true, 0, 100),
        (20_000, 3, 0, true, 1, 100),
        (20_000, 3, 0, true, 2, 100),
        (20_000, 3, 0, true, 3, 100),
        (20_000, 3, 0, true, 4, 100),
    ];
    for (margin, keep, jump_sigmas, fast_down, collapse, hold) in grid {
        let mut line = format!("m={margin:>6} keep={keep:<2} k={jump_sigmas} fast={fast_down:<5} z={collapse} hold={hold:<3}");
        let scenarios = [
            scenario::skewed(2.5),
            scenario::skewed(10.0),
            scenario::shift(),
            scenario::join(),
            scenario::leave(),
            scenario::zipf(3, 20_000, 10_000.0, 30),
        ];
        for mut s in scenarios {
            let mut acc = 0.0;
            let mut all = 0.0;
            let mut size = 0.0;
            for seed in 1..=3 {
                s.cfg.seed = seed;
                s.cfg.shares.margin_ppm = margin;
                s.cfg.shares.smoothing = Smoothing {
                    keep,
                    jump_sigmas,
                    fast_down,
                };
                s.cfg.shares.headroom_sigmas = collapse;
                s.cfg.shares.hold_permille = hold;
                let o = s.run();
                let l = o.limited();
                acc += l.admitted as f64 / l.ideal as f64 / 3.0;
                all += o.accuracy() / 3.0;
                size += o.report_stats(10 * scenario::S).0 / 3.0;
            }
            line += &format!("  {acc:.4}/{all:.4}/{size:<4.0}");
        }
        println!("{line}");
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--scale-rate") {
        for k in [1.0, 10.0, 100.0] {
            let mut s = scenario::skewed(2.5);
            let max = (100.0 * k) as u64;
            s.cfg.limit = meshlimit_core::config::Limit::new(1, max, max).unwrap();
            for ph in &mut s.phases {
                for r in ph.rates.iter_mut().flatten() {
                    *r *= k;
                }
            }
            for i in [1u64, 4] {
                s.cfg.interval_ns = i * scenario::S / 4;
                s.cfg.trigger =
                    meshlimit_core::report::TriggerParams::for_interval(s.cfg.interval_ns);
                let o = s.run();
                let d: Vec<i64> = o
                    .timeline
                    .iter()
                    .step_by(5)
                    .map(|&(a, i)| a as i64 - i as i64)
                    .collect();
                println!("×{k} I={}ms acc {:.4} {d:?}", i * 250, o.accuracy());
            }
        }
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("--tune") {
        tune();
        return;
    }
    if let Some(name) = std::env::args().nth(1).filter(|a| a == "--timeline") {
        let _ = name;
        for s in [
            scenario::uniform(),
            scenario::skewed(2.5),
            scenario::shift(),
            scenario::join(),
            scenario::leave(),
        ] {
            let o = s.run();
            let diffs: Vec<i64> = o
                .timeline
                .iter()
                .map(|&(a, i)| a as i64 - i as i64)
                .collect();
            println!("{}: {:?}", s.name, diffs);
        }
        return;
    }
    println!(
        "{:<48} {:>9} {:>9} {:>7} {:>7} {:>7} {:>5} {:>6} {:>8} {:>6}",
        "scenario",
        "admitted",
        "ideal",
        "acc",
        "acc-lim",
        "rep-mean",
        "p99",
        "max",
        "callouts",
        "time"
    );
    for s in [
        scenario::uniform(),
        scenario::skewed(10.0),
        scenario::skewed(2.5),
        scenario::shift(),
        scenario::join(),
        scenario::leave(),
        scenario::zipf(3, 100_000, 30_000.0, 60),
        scenario::hot_and_quiet(3, 10_000, 10),
    ] {
        row(&s);
    }
}
