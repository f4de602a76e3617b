//! The bucket at a share `w` of a limit (global scope).
use super::*;
use crate::testing::test;

const S: u64 = 1_000_000_000;
const HALF: u32 = SHARE_ONE / 2;
const THIRD: u32 = SHARE_ONE / 3;
const TENTH: u32 = SHARE_ONE / 10;

fn limit(window_secs: u64, max: u64, burst: u64) -> Limit {
    Limit::new(window_secs, max, burst).unwrap()
}

/// Hammers every `step` ns for `secs` seconds at one share; returns admitted.
fn hammer(l: &Limit, share: u32, floor: u32, tats: &mut [u64], start: u64, secs: u64) -> u64 {
    let step = 1_000_000; // 1 ms
    (0..secs * 1000)
        .filter(|i| check_weighted(&[*l], &[share], floor, tats, start + i * step, 1).allowed)
        .count() as u64
}

fn remaining(l: &Limit, share: u32, floor: u32, tats: &[u64], now: u64) -> u64 {
    // A zero-hit check reads the bucket without changing it.
    let mut t = [tats[0]];
    check_weighted(&[*l], &[share], floor, &mut t, now, 0).remaining
}

#[test]
fn rate_is_share_times_rate_plus_capacity() {
    // 100/s, burst 100, a quarter share (floor 1/4): 25 at once, then 25/s.
    let l = limit(1, 100, 100);
    let q = SHARE_ONE / 4;
    let mut tats = [0];
    assert_eq!(hammer(&l, q, q, &mut tats, 10 * S, 100), 25 + 25 * 100 - 1);
    // The whole share is the plain bucket.
    let mut a = [0];
    let mut b = [0];
    for i in 0..5000u64 {
        let now = 10 * S + i * 3_000_000;
        let x = check_weighted(&[l], &[SHARE_ONE], THIRD, &mut a, now, 1);
        let y = check(&[l], &mut b, now, 1);
        assert_eq!(x, y);
    }
}

#[test]
fn capacity_is_share_of_burst_with_the_floor_and_one_token() {
    let l = limit(1, 100, 100);
    let now = 10 * S;
    assert_eq!(remaining(&l, HALF, THIRD, &[0], now), 50);
    // Below the floor: burst/n, here 33 tokens, refilled at the small share's rate.
    assert_eq!(remaining(&l, TENTH, THIRD, &[0], now), 33);
    let mut tats = [0];
    // 33⅓ tokens of capacity: the third of a token counts once refilled.
    assert_eq!(hammer(&l, TENTH, THIRD, &mut tats, now, 10), 33 + 10 * 10);
    // Never under one token: burst 1 at a tenth still admits one request, then one
    // every 10 intervals.
    let l1 = limit(1, 10, 1);
    let mut tats = [0];
    assert_eq!(hammer(&l1, TENTH, 0, &mut tats, now, 100), 1 + 99);
    assert!(
        weighted(&l1, TENTH, 0).unwrap().depth_ns >= weighted(&l1, TENTH, 0).unwrap().interval_ns
    );
}

#[test]
fn zero_share_admits_nothing_and_changes_nothing() {
    let l = limit(1, 100, 100);
    let mut tats = [12345];
    let d = check_weighted(&[l], &[0], THIRD, &mut tats, 10 * S, 1);
    assert!(!d.allowed && !d.changed);
    assert_eq!(d.retry_after_ns, u64::MAX);
    assert_eq!(tats, [12345]);
    assert!(weighted(&l, 0, SHARE_ONE).is_none());
    // Several limits: a zero share on any one refuses.
    let two = [l, limit(60, 1000, 1000)];
    let mut tats = [0, 0];
    let d = check_weighted(&two, &[HALF, 0], THIRD, &mut tats, 10 * S, 1);
    assert!(!d.allowed);
    assert_eq!((d.tightest, tats), (1, [0, 0]));
}

#[test]
fn share_changes_above_the_floor_keep_the_fill_fraction_as_stored() {
    let l = limit(1, 100, 100);
    let now = 10 * S;
    let mut tats = [0];
    // Half share: 50 tokens; take 25 (half full).
    for _ in 0..25 {
        assert!(check_weighted(&[l], &[HALF], THIRD, &mut tats, now, 1).allowed);
    }
    assert_eq!(remaining(&l, HALF, THIRD, &tats, now), 25);
    // Read at 0.8 and at the floor: still half full, without touching the tat.
    assert_eq!(remaining(&l, SHARE_ONE / 5 * 4, THIRD, &tats, now), 40);
    assert_eq!(remaining(&l, THIRD, THIRD, &tats, now), 16);
    assert_eq!(
        rescale(&l, tats[0], now, (HALF, THIRD), (SHARE_ONE, THIRD)),
        tats[0]
    );
}

#[test]
fn share_changes_below_the_floor_keep_the_fill_fraction_after_rescale() {
    let l = limit(1, 100, 100);
    let now = 10 * S;
    let floor = HALF; // n = 2: capacity 50 for any share up to a half
    let mut tats = [0];
    for _ in 0..25 {
        assert!(check_weighted(&[l], &[TENTH], floor, &mut tats, now, 1).allowed);
    }
    assert_eq!(remaining(&l, TENTH, floor, &tats, now), 25);
    // To a twentieth: same capacity, slower refill. Without rescaling the same time
    // deficit would be a smaller fraction of the deeper bucket (more tokens).
    assert!(remaining(&l, TENTH / 2, floor, &tats, now) > 25);
    let t = rescale(&l, tats[0], now, (TENTH, floor), (TENTH / 2, floor));
    assert_eq!(remaining(&l, TENTH / 2, floor, &[t], now), 25);
    // Up to 0.8 (above the floor): capacity 80, half full.
    let t = rescale(&l, tats[0], now, (TENTH, floor), (SHARE_ONE / 5 * 4, floor));
    assert_eq!(remaining(&l, SHARE_ONE / 5 * 4, floor, &[t], now), 40);
    // A full bucket stays full.
    assert_eq!(
        rescale(&l, now - 1, now, (TENTH, floor), (HALF, floor)),
        now - 1
    );
}

#[test]
fn a_bucket_leaving_share_zero_starts_empty() {
    let l = limit(1, 100, 100);
    let now = 10 * S;
    // Its old tat is long past (a full bucket at any scale) ...
    let t = rescale(&l, 0, now, (0, THIRD), (TENTH, THIRD));
    // ... but share 0 refilled nothing: empty, one token after T/w.
    assert_eq!(remaining(&l, TENTH, THIRD, &[t], now), 0);
    let t_w = weighted(&l, TENTH, THIRD).unwrap().interval_ns;
    assert_eq!(remaining(&l, TENTH, THIRD, &[t], now + t_w), 1);
    // Going to 0 keeps the tat (nothing is admitted there anyway).
    assert_eq!(
        rescale(&l, now + 5, now, (TENTH, THIRD), (0, THIRD)),
        now + 5
    );
}

#[test]
fn clock_going_backwards_at_a_share_waits_at_most_one_token() {
    let l = limit(1, 100, 100);
    let now = 10_000 * S;
    let mut tats = [0];
    assert_eq!(hammer(&l, TENTH, THIRD, &mut tats, now, 0), 0);
    while check_weighted(&[l], &[TENTH], THIRD, &mut tats, now, 1).allowed {}
    let back = now - 3600 * S;
    let d = check_weighted(&[l], &[TENTH], THIRD, &mut tats, back, 1);
    assert!(!d.allowed && d.changed);
    let t_w = weighted(&l, TENTH, THIRD).unwrap().interval_ns;
    assert!(d.retry_after_ns <= t_w, "{} > {t_w}", d.retry_after_ns);
    assert!(check_weighted(&[l], &[TENTH], THIRD, &mut tats, back + t_w, 1).allowed);
    // Extremes do not overflow.
    let mut t = [u64::MAX];
    let _ = check_weighted(&[l], &[1], SHARE_ONE, &mut t, u64::MAX, u64::MAX);
    let _ = rescale(&l, u64::MAX, 0, (1, SHARE_ONE), (SHARE_ONE, 0));
    assert!(weighted(&limit(86_400, 1, 100_000), 1, SHARE_ONE).is_some());
}

#[test]
fn shares_summing_to_one_admit_at_most_rate_plus_two_buckets() {
    // Three proxies at 0.5 / 0.3 / 0.2 (floor 1/3), all hammering for 60 s: the rate
    // part is the limit's rate, the capacity part at most Σ max(w, 1/n)·B ≤ 2B.
    let l = limit(1, 100, 100);
    let shares = [HALF, SHARE_ONE / 10 * 3, SHARE_ONE / 5];
    let mut tats = [[0u64]; 3];
    let mut admitted = 0;
    for i in 0..60_000u64 {
        for (p, &w) in shares.iter().enumerate() {
            if check_weighted(&[l], &[w], THIRD, &mut tats[p], 10 * S + i * 1_000_000, 1).allowed {
                admitted += 1;
            }
        }
    }
    let capacity: u64 = 50 + 33 + 33;
    assert!(admitted <= 100 * 60 + capacity, "{admitted}");
    assert!(admitted >= 100 * 60 + capacity - 3, "{admitted}");
}
