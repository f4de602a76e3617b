//! The error bound of `docs/global-limits.md`, asserted on the scenarios (run with
//! `cargo test -p meshlimit-sim --release`).

use crate::scenario::{self, Scenario};
use crate::world::Outcome;

/// Runs a one-client scenario under a few seeds; each run must be within its bound.
fn within_bound(s: Scenario) -> Vec<Outcome> {
    let bound = s.bound.clone().expect("one-client scenarios have a bound");
    (1..=4)
        .map(|seed| {
            let mut s = s.clone();
            s.cfg.seed = seed;
            let o = s.run();
            let (lo, hi) = bound.range();
            let err = o.admitted as i64 - o.ideal as i64;
            assert!(
                bound.holds(o.admitted, o.ideal),
                "{} (seed {seed}): admitted − ideal = {err}, bound {lo:.0}..+{hi:.0}",
                s.name
            );
            o
        })
        .collect()
}

fn accuracy_within(outcomes: &[Outcome], lo: f64, hi: f64) {
    for o in outcomes {
        let a = o.accuracy();
        assert!((lo..=hi).contains(&a), "accuracy {a:.4} not in {lo}..{hi}");
    }
}

#[test]
fn uniform_load() {
    accuracy_within(&within_bound(scenario::uniform()), 0.99, 1.01);
}

#[test]
fn skew_90_5_5_far_over_the_limit() {
    accuracy_within(&within_bound(scenario::skewed(10.0)), 0.99, 1.01);
}

#[test]
fn skew_90_5_5_moderate_overload() {
    for times in [2.0, 2.5, 3.0] {
        accuracy_within(&within_bound(scenario::skewed(times)), 0.95, 1.01);
    }
}

#[test]
fn demand_shift_between_proxies() {
    accuracy_within(&within_bound(scenario::shift()), 0.95, 1.01);
}

#[test]
fn a_proxy_joins() {
    accuracy_within(&within_bound(scenario::join()), 0.99, 1.03);
}

#[test]
fn a_proxy_dies() {
    accuracy_within(&within_bound(scenario::leave()), 0.97, 1.01);
}

#[test]
fn the_bound_follows_the_sync_interval_and_the_round_trip() {
    for (interval_ms, one_way_ms) in [(250, 1), (1000, 50), (4000, 1)] {
        let (i, d) = (interval_ms * 1_000_000, one_way_ms * 1_000_000);
        within_bound(scenario::with_timing(scenario::shift(), i, d));
        within_bound(scenario::with_timing(scenario::leave(), i, d));
    }
}

#[test]
fn steady_state_after_the_onset_is_exact_within_margins() {
    // Past the first seconds, a skewed key loses only the small proxies' margins and
    // noise: the slope of admitted − ideal over the last 40 s.
    let s = scenario::skewed(2.5);
    let o = s.run();
    let (a20, i20) = o.timeline[19];
    let (a59, i59) = o.timeline[58];
    let lost = (i59 - i20) as f64 - (a59 - a20) as f64;
    let b = s.bound.expect("bound");
    let per_s = b.margin * 25.0 + scenario::ETA * 2.0 * (12.5f64 / b.interval).sqrt();
    assert!(
        lost <= per_s * 39.0,
        "lost {lost} in 39 s, bound {}",
        per_s * 39.0
    );
}

#[test]
fn zipf_100k_clients() {
    let s = scenario::zipf(3, 100_000, 30_000.0, 60);
    let o = s.run();
    assert!((0.99..=1.01).contains(&o.accuracy()), "{}", o.accuracy());
    let l = o.limited();
    let acc = l.admitted as f64 / l.ideal as f64;
    assert!(
        (0.97..=1.01).contains(&acc),
        "clients over their limit: {acc}"
    );
    // Each of the 20 heaviest clients (far over, spread over all proxies) within the
    // one-client bound.
    let mut b = scenario::Bound::for_config(&s.cfg, 3);
    b.secs = 60.0;
    let (lo, hi) = b.range();
    for k in 0..20u32 {
        let c = o.clients[&k];
        let err = c.admitted as f64 - c.ideal as f64;
        assert!(
            lo <= err && err <= hi,
            "client {k}: {err} not in {lo:.0}..{hi:.0}"
        );
    }
    // Clients under half their limit are (nearly) never refused.
    let zipf = crate::rng::Zipf::new(100_000, 1.0);
    let (mut req, mut adm) = (0u64, 0u64);
    for (k, c) in &o.clients {
        if zipf.p(*k as usize) * 30_000.0 < 50.0 {
            req += c.requests;
            adm += c.admitted;
        }
    }
    assert!(adm as f64 >= 0.995 * req as f64, "{adm} of {req}");
}

#[test]
fn ten_hot_of_10k_active_clients_reports_tens_of_entries() {
    let s = scenario::hot_and_quiet(3, 10_000, 10);
    let o = s.run();
    let (mean, p99, max) = o.report_stats(s.steady_from_ns);
    assert!(
        mean <= 50.0 && p99 <= 100 && max < 1000,
        "{mean} / {p99} / {max}"
    );
    assert!(mean >= 10.0, "the hot keys are reported: {mean}");
    assert!((0.99..=1.01).contains(&o.accuracy()), "{}", o.accuracy());
    assert_eq!(o.dropped_candidates, 0);
}

#[test]
fn runs_are_deterministic() {
    let a = scenario::shift().run();
    let b = scenario::shift().run();
    assert_eq!(
        (a.admitted, a.ideal, a.reports),
        (b.admitted, b.ideal, b.reports)
    );
    let mut s = scenario::shift();
    s.cfg.seed = 2;
    assert_ne!(s.run().admitted, a.admitted, "the seed matters");
}
