use super::*;
use crate::testing::test;

const S: u64 = 1_000_000_000;

fn limit(window_secs: u64, max: u64, burst: u64) -> Limit {
    Limit::new(window_secs, max, burst).unwrap()
}

/// Runs `n` single-hit requests at `now`, returning how many were admitted.
fn admit_n(limits: &[Limit], tats: &mut [u64], now: u64, n: u64) -> u64 {
    (0..n)
        .filter(|_| check(limits, tats, now, 1).allowed)
        .count() as u64
}

#[test]
fn a_fresh_bucket_admits_exactly_burst() {
    let l = [limit(60, 5, 5)];
    let mut tats = [0];
    let now = 1_000 * S;
    let first = check(&l, &mut tats, now, 1);
    assert!(first.allowed);
    assert_eq!(first.remaining, 4);
    assert_eq!(
        first.reset_ns,
        12 * S,
        "one token takes window/max = 12 s to come back"
    );
    assert_eq!(admit_n(&l, &mut tats, now, 10), 4);
    let refused = check(&l, &mut tats, now, 1);
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    assert_eq!(refused.retry_after_ns, 12 * S);
    assert_eq!(refused.reset_ns, 60 * S);
}

#[test]
fn refill_is_continuous_at_max_per_window() {
    let l = [limit(60, 5, 5)];
    let mut tats = [0];
    let now = 1_000 * S;
    assert_eq!(admit_n(&l, &mut tats, now, 5), 5);
    // 11.9 s later: no token yet. 12 s: exactly one.
    assert!(!check(&l, &mut tats, now + 11_900_000_000, 1).allowed);
    assert!(check(&l, &mut tats, now + 12 * S, 1).allowed);
    assert!(!check(&l, &mut tats, now + 12 * S, 1).allowed);
    // A full window later the bucket is full again: burst, not more.
    assert_eq!(admit_n(&l, &mut tats, now + 200 * S, 10), 5);
    assert!(is_idle(&[tats[0]], now + 260 * S));
    assert!(!is_idle(&[tats[0]], now + 259 * S));
}

#[test]
fn burst_above_max_allows_a_larger_first_burst_then_the_rate() {
    // 10/s with burst 20: 20 at once, then 10 per second.
    let l = [limit(1, 10, 20)];
    let mut tats = [0];
    let now = 50 * S;
    assert_eq!(admit_n(&l, &mut tats, now, 100), 20);
    assert_eq!(admit_n(&l, &mut tats, now + S, 100), 10);
    assert_eq!(admit_n(&l, &mut tats, now + 2 * S, 100), 10);
}

#[test]
fn burst_below_max_smooths() {
    // 60/m with burst 1: one request per second, never two at once.
    let l = [limit(60, 60, 1)];
    let mut tats = [0];
    let now = 50 * S;
    assert_eq!(admit_n(&l, &mut tats, now, 5), 1);
    assert_eq!(admit_n(&l, &mut tats, now + S / 2, 5), 0);
    assert_eq!(admit_n(&l, &mut tats, now + S, 5), 1);
}

#[test]
fn multi_window_is_all_or_nothing() {
    // 3/s and 5/m: the minute limit bites on the second second.
    let l = [limit(1, 3, 3), limit(60, 5, 5)];
    let mut tats = [0, 0];
    let now = 100 * S;
    assert_eq!(admit_n(&l, &mut tats, now, 10), 3);
    let before = tats;
    let d = check(&l, &mut tats, now, 1);
    assert!(!d.allowed && !d.changed);
    assert_eq!(tats, before, "a refusal changes nothing");
    assert_eq!(admit_n(&l, &mut tats, now + S, 10), 2);
    let d = check(&l, &mut tats, now + 2 * S, 1);
    assert!(!d.allowed);
    assert_eq!(d.tightest, 1, "the minute limit is the one that ran out");
    // The second limit refused while the first had tokens: the first must not have
    // been charged.
    let (t0, t1) = (tats[0], tats[1]);
    for _ in 0..5 {
        check(&l, &mut tats, now + 2 * S, 1);
    }
    assert_eq!((tats[0], tats[1]), (t0, t1));
    // The minute limit gets one token back every 12 s.
    assert_eq!(d.retry_after_ns, 12 * S - 2 * S);
}

#[test]
fn headers_describe_the_limit_closest_to_running_out() {
    let l = [limit(1, 10, 10), limit(3600, 4, 4)];
    let mut tats = [0, 0];
    let d = check(&l, &mut tats, 7 * S, 1);
    assert_eq!((d.tightest, d.remaining), (1, 3));
    assert_eq!(d.reset_ns, 900 * S);
    // Equal remaining: the slower to refill wins.
    let l = [limit(1, 2, 2), limit(60, 2, 2)];
    let mut tats = [0, 0];
    let d = check(&l, &mut tats, 7 * S, 1);
    assert_eq!((d.tightest, d.remaining), (1, 1));
}

#[test]
fn hits_above_one() {
    let l = [limit(60, 10, 10)];
    let mut tats = [0];
    assert!(check(&l, &mut tats, S, 7).allowed);
    let d = check(&l, &mut tats, S, 4);
    assert!(!d.allowed);
    assert_eq!(d.remaining, 3);
    assert!(check(&l, &mut tats, S, 3).allowed);
    // More than the bucket holds is never allowed, and says when it would be.
    let mut fresh = [0];
    let d = check(&l, &mut fresh, S, 11);
    assert!(!d.allowed);
    assert_eq!(d.retry_after_ns, 6 * S);
}

#[test]
fn clock_going_backwards_neither_panics_nor_locks_out() {
    let l = [limit(60, 5, 5)];
    let mut tats = [0];
    let now = 10_000 * S;
    assert_eq!(admit_n(&l, &mut tats, now, 5), 5);
    // The clock jumps back an hour: state is clamped to one bucket depth ahead, so the
    // client waits at most one refill period, not an hour.
    let back = now - 3600 * S;
    let d = check(&l, &mut tats, back, 1);
    assert!(!d.allowed);
    assert!(d.changed, "the clamp must be written back");
    assert!(d.retry_after_ns <= 12 * S, "{}", d.retry_after_ns);
    assert!(check(&l, &mut tats, back + 12 * S, 1).allowed);
    // Time zero and u64::MAX do not overflow.
    let mut t = [u64::MAX];
    let _ = check(&l, &mut t, 0, 1);
    let mut t = [0];
    assert!(check(&l, &mut t, u64::MAX - 100 * S, 1).allowed);
    let d = check(&l, &mut [u64::MAX], u64::MAX, u64::MAX);
    assert!(!d.allowed);
}

#[test]
fn long_run_admits_rate_times_time_plus_burst() {
    // Over 10 simulated minutes, hammering every 10 ms: admitted = burst + rate·t.
    let l = [limit(1, 7, 3)];
    let mut tats = [0];
    let start = 5 * S;
    let mut admitted = 0;
    let step = 10_000_000;
    let steps = 60_000; // 600 s
    for i in 0..=steps {
        if check(&l, &mut tats, start + i * step, 1).allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3 + 7 * 600);
}

#[test]
fn a_refusal_describes_the_limit_retry_after_comes_from() {
    // 1 s / 10 still has tokens, 1 min / 3 is spent, 1 h / 5 is not: the minute refuses.
    let l = [limit(1, 10, 10), limit(60, 3, 3), limit(3600, 5, 5)];
    let mut tats = [0, 0, 0];
    for _ in 0..3 {
        assert!(check(&l, &mut tats, 7 * S, 1).allowed);
    }
    let d = check(&l, &mut tats, 7 * S, 1);
    assert!(!d.allowed);
    assert_eq!((d.tightest, d.remaining), (1, 0));
    assert_eq!(d.retry_after_ns, 20 * S);
    assert_eq!(d.reset_ns, 60 * S, "full again in a minute");
    assert_eq!(
        next_token_ns(&l[1], d.remaining, d.reset_ns),
        d.retry_after_ns
    );
    // Two refusing limits: the longer wait is the one described.
    let l = [limit(60, 1, 1), limit(3600, 1, 1)];
    let mut tats = [0, 0];
    assert!(check(&l, &mut tats, 7 * S, 1).allowed);
    let d = check(&l, &mut tats, 7 * S, 1);
    assert_eq!(d.tightest, 1);
    assert_eq!(
        next_token_ns(&l[1], d.remaining, d.reset_ns),
        d.retry_after_ns
    );
    // After an admission: the next token of the tightest limit.
    let l = [limit(60, 3, 3)];
    let mut tats = [0];
    let d = check(&l, &mut tats, 7 * S, 1);
    assert_eq!((d.remaining, d.reset_ns), (2, 20 * S));
    assert_eq!(next_token_ns(&l[0], d.remaining, d.reset_ns), 20 * S);
    let d = check(&l, &mut tats, 7 * S, 1);
    assert_eq!((d.remaining, d.reset_ns), (1, 40 * S));
    assert_eq!(next_token_ns(&l[0], d.remaining, d.reset_ns), 20 * S);
}

#[test]
fn force_takes_what_fits_and_empties_the_rest_never_beyond_empty() {
    let l = [limit(60, 5, 5), limit(3600, 100, 100)];
    let now = 1_000 * S;
    let mut tats = [0, 0];
    assert_eq!(admit_n(&l, &mut tats, now, 2), 2);
    let before = tats;
    // 4 hits: the first limit has 3 tokens, so the request is refused...
    let d = force(&l, &mut tats, now, 4);
    assert!(!d.allowed);
    assert!(d.changed);
    assert_eq!(d.retry_after_ns, 12 * S, "what check tells the request");
    // ...and charged all the same: the first bucket emptied (not 1 below empty), the
    // second takes all 4.
    assert_eq!(tats[0], now + l[0].depth_ns);
    assert_eq!(tats[1], before[1] + 4 * l[1].interval_ns);
    let after = check(&l, &mut tats.clone(), now, 1);
    assert!(!after.allowed);
    assert_eq!(
        after.retry_after_ns,
        12 * S,
        "one token back after one interval, as after an ordinary emptying"
    );
    // Forced again while empty: nothing moves beyond empty.
    let emptied = tats;
    force(&l, &mut tats, now, 4);
    assert_eq!(tats[0], emptied[0]);
    assert_eq!(tats[1], emptied[1] + 4 * l[1].interval_ns);
}

#[test]
fn force_of_hits_that_fit_is_check() {
    let l = [limit(60, 5, 5), limit(3600, 100, 100)];
    let now = 1_000 * S;
    let (mut a, mut b) = ([0, 0], [0, 0]);
    for i in 0..5 {
        let now = now + i * S;
        assert_eq!(force(&l, &mut a, now, 1), check(&l, &mut b, now, 1));
        assert_eq!(a, b);
    }
}
