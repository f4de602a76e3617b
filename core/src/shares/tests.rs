use super::*;
use crate::testing::test;

const P: ShareParams = ShareParams {
    margin_ppm: 20_000,
    epsilon: 10_000,
    lease_ms: 60_000,
    max_peers: 256,
    smoothing: Smoothing {
        keep: 1,
        jump_sigmas: 3,
    },
    headroom_sigmas: 0,
};

/// A report of `rate` (fraction of the limit's rate) over one 1 s interval of a limit
/// of 1000 per second.
fn rate(rate: f64) -> Report {
    Report {
        hits: (rate * 1000.0).round() as u64,
        max: 1000,
        window_ms: 1000,
        first_span_ms: 1000,
        interval_ms: 1000,
    }
}

fn live(_: &u32) -> bool {
    true
}

fn sum(peers: &[Peer<u32>]) -> u64 {
    peers.iter().map(|q| u64::from(q.grant)).sum()
}

fn frac(g: u32) -> f64 {
    f64::from(g) / f64::from(SHARE_ONE)
}

/// Every proxy reports `rates[i]` once per second, in order, for `rounds` seconds
/// starting at `t0` ms; returns the grants of the last round.
fn rounds(peers: &mut Vec<Peer<u32>>, rates: &[f64], t0: u64, rounds: u64) -> Vec<u32> {
    let mut g = vec![0; rates.len()];
    for r in 0..rounds {
        for (i, &x) in rates.iter().enumerate() {
            let now = t0 + r * 1000 + i as u64;
            g[i] = allocate(peers, &(i as u32), &rate(x), now, live, &P);
        }
    }
    g
}

#[test]
fn water_level_is_max_min_fair() {
    let one = u64::from(SHARE_ONE);
    assert_eq!(
        water_level([one / 4, one / 4].into_iter()),
        one,
        "wants fit: level 1"
    );
    assert_eq!(water_level([one, one, one, one].into_iter()), one / 4);
    // 0.1 is satisfied; 0.9 is split between the other two.
    let l = water_level([one / 10, one, one].into_iter());
    assert_eq!(l, (one - one / 10) / 2);
    // Cascades: 0.05 and 0.2 satisfied, then 0.75 split over two.
    let l = water_level([one / 20, one / 5, one, one / 5 * 4].into_iter());
    assert_eq!(l, (one - one / 20 - one / 5) / 2);
    let wants = [one / 20, one / 5, one, one / 5 * 4];
    assert!(wants.iter().map(|&w| w.min(l)).sum::<u64>() <= one);
}

#[test]
fn a_single_proxy_gets_what_it_needs_and_the_whole_when_over() {
    let mut peers = Vec::new();
    let g = rounds(&mut peers, &[0.3], 0, 3)[0];
    assert!((frac(g) - (0.3 * 1.02 + 0.00001)).abs() < 1e-6, "{g}");
    let g = rounds(&mut peers, &[5.0], 3000, 1)[0];
    assert_eq!(g, SHARE_ONE);
}

#[test]
fn grants_never_sum_above_one_under_random_reports() {
    // A deterministic walk: 13 proxies join, leave (lease), die (liveness), and change
    // demand from nothing to 4× the limit, reporting at random instants.
    let mut peers: Vec<Peer<u32>> = Vec::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut now = 0u64;
    let mut dead = [false; 13];
    let p = ShareParams {
        lease_ms: 3_000,
        max_peers: 10,
        headroom_sigmas: 1,
        smoothing: ShareParams::default().smoothing,
        ..P
    };
    for step in 0..100_000 {
        let r = next();
        now += r % 300;
        if step % 97 == 0 {
            dead[(r >> 40) as usize % 13] ^= true;
        }
        let who = (r >> 8) as u32 % 13;
        if dead[who as usize] {
            continue;
        }
        let hits = if r % 5 == 0 { 0 } else { (r >> 20) % 4000 };
        let report = Report {
            hits,
            max: 1 + (r >> 50) % 3,
            window_ms: 1000,
            first_span_ms: 1 + (r >> 33) % 2000,
            interval_ms: 1000,
        };
        let g = allocate(&mut peers, &who, &report, now, |q| !dead[*q as usize], &p);
        assert!(g <= SHARE_ONE);
        let live: u64 = (peers.iter())
            .filter(|q| !dead[q.proxy as usize] && q.updated_ms + p.lease_ms > now)
            .map(|q| u64::from(q.grant))
            .sum();
        assert!(
            live <= u64::from(SHARE_ONE),
            "step {step}: grants sum to {live}"
        );
        assert!(peers.len() <= p.max_peers);
    }
}

#[test]
fn skewed_90_5_5_wastes_only_the_small_proxies_margins() {
    // Moderate overload: 2.5× the limit, 90/5/5.
    let mut peers = Vec::new();
    let g = rounds(&mut peers, &[2.25, 0.125, 0.125], 0, 5);
    let used = frac(g[0]) + 0.125 + 0.125;
    let waste = 1.0 - used;
    // Each small proxy holds its demand · (1 + m) + ε: 0.2 % + 0.001 % of the limit.
    assert!(
        waste <= 2.0 * (0.125 * 0.02 + 0.00001) + 1e-6,
        "waste {waste}"
    );
    assert!(waste >= 0.0, "over-allocated: {g:?}");
    assert!(sum(&peers) <= u64::from(SHARE_ONE));
    // Far over the limit (10×): everyone is over the fair third, so it is a third each.
    let mut peers = Vec::new();
    let g = rounds(&mut peers, &[9.0, 0.5, 0.5], 0, 5);
    for gi in g {
        assert!((frac(gi) - 1.0 / 3.0).abs() < 1e-6, "{gi}");
    }
}

#[test]
fn shares_follow_a_demand_shift_within_two_rounds() {
    let mut peers = Vec::new();
    rounds(&mut peers, &[1.8, 0.2], 0, 5);
    // The demand moves: the shrinking proxy reports first in each round, so after one
    // round the grower has what the other released; the fast path means no tail.
    let g = rounds(&mut peers, &[0.2, 1.8], 5000, 1);
    assert!(frac(g[1]) > 0.78, "{g:?}");
    let g = rounds(&mut peers, &[0.2, 1.8], 6000, 1);
    assert!((frac(g[0]) - (0.2 * 1.02 + 0.00001)).abs() < 1e-3, "{g:?}");
    assert!(frac(g[0]) + frac(g[1]) > 0.999, "{g:?}");
    // Reports in the other order: one more round.
    let mut peers = Vec::new();
    rounds(&mut peers, &[0.2, 1.8], 0, 5);
    let g = rounds(&mut peers, &[1.8, 0.2], 5000, 2);
    assert!(
        frac(g[0]) + frac(g[1]) > 0.999 && frac(g[0]) > 0.79,
        "{g:?}"
    );
}

#[test]
fn idle_shares_return_on_report_on_lease_and_on_death() {
    let mut peers = Vec::new();
    rounds(&mut peers, &[0.9, 0.9], 0, 3);
    // a's demand vanishes and it reports so (a tracked key): it keeps only ε.
    let ga = allocate(&mut peers, &0, &rate(0.0), 3000, live, &P);
    assert_eq!(ga, P.epsilon);
    let gb = allocate(&mut peers, &1, &rate(0.9), 3001, live, &P);
    assert!(frac(gb) > 0.9, "{gb}");
    // a stops reporting: after the lease its record is gone.
    let gb = allocate(&mut peers, &1, &rate(5.0), 3001 + P.lease_ms, live, &P);
    assert_eq!((gb, peers.len()), (SHARE_ONE, 1));
    // Death: b's proxy stops syncing; the next report of anyone drops it.
    let gc = allocate(
        &mut peers,
        &2,
        &rate(5.0),
        3002 + P.lease_ms,
        |q| *q != 1,
        &P,
    );
    assert_eq!((gc, peers.len()), (SHARE_ONE, 1));
}

#[test]
fn a_newcomer_gets_what_is_free_at_once_and_its_fair_part_after_one_round() {
    let mut peers = Vec::new();
    rounds(&mut peers, &[0.5], 0, 3);
    // 0.49 is free: the newcomer wanting the whole gets it at once.
    let g = allocate(&mut peers, &1, &rate(3.0), 3000, live, &P);
    assert_eq!(
        u64::from(g),
        u64::from(SHARE_ONE) - u64::from(peers[0].grant)
    );
    // Both over the limit: a half each after everyone reported once.
    let g = rounds(&mut peers, &[3.0, 3.0], 4000, 2);
    assert_eq!(g, vec![SHARE_ONE / 2, SHARE_ONE / 2]);
    // A third proxy joins while the two hold everything: 0 at first (the filter runs it
    // at 1/n until this answer), a third once the others have reported.
    assert_eq!(allocate(&mut peers, &2, &rate(3.0), 6000, live, &P), 0);
    let g = rounds(&mut peers, &[3.0, 3.0, 3.0], 7000, 2);
    assert!(g.iter().all(|&gi| gi == SHARE_ONE / 3), "{g:?}");
}

#[test]
fn bounded_peers_and_garbage_inputs() {
    let p = ShareParams { max_peers: 2, ..P };
    let mut peers = Vec::new();
    allocate(&mut peers, &0, &rate(0.1), 0, live, &p);
    allocate(&mut peers, &1, &rate(0.1), 1, live, &p);
    assert_eq!(allocate(&mut peers, &2, &rate(0.1), 2, live, &p), 0);
    assert_eq!(peers.len(), 2);
    // max 0, span 0, huge hits, a clock that goes backwards: no panic, grant ≤ 1.
    let weird = Report {
        hits: u64::MAX,
        max: 0,
        window_ms: u64::MAX,
        first_span_ms: 0,
        interval_ms: 0,
    };
    let g = allocate(&mut peers, &0, &weird, 0, live, &p);
    assert!(g <= SHARE_ONE);
    assert_eq!(observed_demand(u64::MAX, 1, u64::MAX, 1), DEMAND_CAP);
    assert_eq!(peers.len(), 2, "a clock going backwards keeps the records");
}

#[test]
fn noise_is_averaged_and_real_changes_jump() {
    let sm = Smoothing {
        keep: 3,
        jump_sigmas: 3,
    };
    let one = u64::from(SHARE_ONE);
    // 12 expected, 6 seen: within 3σ (√12 ≈ 3.5), a quarter of the way.
    assert_eq!(sm.next(one, one / 2, 6, 12), (3 * one + one / 2) / 4);
    // 100 expected, 10 seen: the demand moved away, follow at once.
    assert_eq!(sm.next(one, one / 10, 10, 100), one / 10);
    // A quiet key that saw nothing this interval is noise, not a collapse.
    assert_eq!(sm.next(one / 100, 0, 0, 1), one / 100 * 3 / 4);
    assert_eq!(expected_hits(one / 10, 1000, 1000, 2000), 200);
}

#[test]
fn spare_capacity_gives_noise_headroom_and_contention_gives_none() {
    let p = ShareParams {
        headroom_sigmas: 1,
        ..P
    };
    let mut peers = Vec::new();
    // 20 % of a 1000/s limit seen over 1 s: 200 ± 14 per interval, so headroom
    // √(0.2/1000) ≈ 1.4 % of the limit on top of its want.
    let g = allocate(&mut peers, &0, &rate(0.2), 0, live, &p);
    let want = 0.2 * 1.02 + 0.00001;
    assert!(
        (frac(g) - want - (0.2f64 / 1000.0).sqrt()).abs() < 1e-4,
        "{g}"
    );
    assert_eq!(headroom(u64::from(SHARE_ONE) / 5, 1000, &p), 14_142_135);
    // Contended (everyone over the limit): no headroom, exact thirds.
    let mut peers = Vec::new();
    let g = (0..3u64).map(|r| {
        (0..3u32)
            .map(|i| {
                allocate(
                    &mut peers,
                    &i,
                    &rate(2.0),
                    r * 1000 + u64::from(i),
                    live,
                    &p,
                )
            })
            .last()
    });
    assert!(g.last().flatten() == Some(SHARE_ONE / 3));
    // Headroom only comes out of what is free: many small peers share the rest.
    let mut peers = Vec::new();
    for round in 0..3 {
        for i in 0..20u32 {
            allocate(
                &mut peers,
                &i,
                &rate(0.049),
                round * 1000 + u64::from(i),
                live,
                &p,
            );
        }
    }
    assert!(sum(&peers) <= u64::from(SHARE_ONE));
    assert!(
        sum(&peers) > u64::from(SHARE_ONE) * 99 / 100,
        "the spare part is handed out"
    );
}

#[test]
fn a_capped_grant_is_pending_and_a_release_frees_the_share() {
    let mut peers = Vec::new();
    rounds(&mut peers, &[3.0], 0, 3);
    let a = allocate_detailed(&mut peers, &1, &rate(3.0), 3000, live, &P);
    assert_eq!(a.grant, 0);
    assert_eq!(a.target, SHARE_ONE / 2);
    assert!(a.pending());
    // Proxy 0 evicted the key: its record goes at once, not at the end of the lease.
    release(&mut peers, &0);
    let a = allocate_detailed(&mut peers, &1, &rate(3.0), 3500, live, &P);
    assert_eq!((a.grant, a.pending()), (SHARE_ONE, false));
}
