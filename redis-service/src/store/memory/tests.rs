use super::*;
use crate::store::StoreLimit;

const US: u64 = 1_000;
const MS: u64 = NS_PER_MS;
const SEC: u64 = NS_PER_SEC;
/// A Unix time on a whole 10 s (and 100 s, 1 h) window boundary.
const T0: u64 = 1_000_000_000 * SEC;

fn store() -> MemoryStore {
    MemoryStore::new(KeyMaker::new("ml", b"k"), 1000)
}

fn op(limits: &[(u64, u64, u64)], hits: u64) -> CheckOp {
    CheckOp {
        tag: "c.r.x".into(),
        limits: limits
            .iter()
            .map(|&(window_secs, max, burst)| StoreLimit {
                window_secs,
                max,
                burst,
            })
            .collect(),
        hits,
        force: false,
    }
}

#[test]
fn sliding_window_multi_limit_all_or_nothing() {
    let s = store();
    // Start of a 10 s window so the previous window weighs nothing.
    let o = op(&[(10, 5, 5), (100, 7, 7)], 1);
    for i in 0..5 {
        let r = s
            .check_one(Algorithm::SlidingWindow, &o, T0 + i * US)
            .unwrap();
        assert!(r.allowed);
        assert_eq!(r.remaining, 4 - i);
    }
    let r = s
        .check_one(Algorithm::SlidingWindow, &o, T0 + 10 * US)
        .unwrap();
    assert!(!r.allowed && r.retry_after_ms > 0 && r.tightest == 0);
    // Next window: the first limit has room but the 100 s one only has 2: all or nothing.
    let t1 = T0 + 20 * SEC;
    let big = op(&[(10, 5, 5), (100, 7, 7)], 3);
    let r = s.check_one(Algorithm::SlidingWindow, &big, t1).unwrap();
    assert!(!r.allowed, "{r:?}");
    assert_eq!((r.tightest, r.remaining), (1, 2));
    let r = s
        .check_one(
            Algorithm::SlidingWindow,
            &op(&[(10, 5, 5), (100, 7, 7)], 2),
            t1,
        )
        .unwrap();
    assert!(r.allowed);
    assert_eq!(r.remaining, 0);
}

#[test]
fn token_bucket_refills() {
    let s = store();
    let o = op(&[(1, 10, 10)], 1);
    for _ in 0..10 {
        assert!(s.check_one(Algorithm::TokenBucket, &o, T0).unwrap().allowed);
    }
    let r = s.check_one(Algorithm::TokenBucket, &o, T0).unwrap();
    assert!(!r.allowed);
    assert_eq!(r.retry_after_ms, 100);
    assert!(
        s.check_one(Algorithm::TokenBucket, &o, T0 + 100 * MS)
            .unwrap()
            .allowed
    );
}

#[test]
fn token_bucket_force_charges_up_to_empty_and_no_further() {
    let s = store();
    // 10/s: 4 used, then a reconciliation of 20 already-admitted hits.
    assert!(
        s.check_one(Algorithm::TokenBucket, &op(&[(1, 10, 10)], 4), T0)
            .unwrap()
            .allowed
    );
    let forced = CheckOp {
        force: true,
        ..op(&[(1, 10, 10)], 20)
    };
    let r = s.check_one(Algorithm::TokenBucket, &forced, T0).unwrap();
    assert!(
        !r.allowed,
        "more than the bucket holds is reported as refused"
    );
    assert_eq!(r.remaining, 0);
    // Charged to empty, not beyond: one token is back after 100 ms.
    let o = op(&[(1, 10, 10)], 1);
    assert!(
        !s.check_one(Algorithm::TokenBucket, &o, T0 + 50 * MS)
            .unwrap()
            .allowed
    );
    assert!(
        s.check_one(Algorithm::TokenBucket, &o, T0 + 100 * MS)
            .unwrap()
            .allowed
    );
}

#[test]
fn token_bucket_force_charges_each_limit_by_what_it_holds() {
    let s = store();
    // 10/s and 100/min: 5 hits fit the minute, not the second (capacity 10, 8 used).
    let limits = [(1, 10, 10), (60, 100, 100)];
    assert!(
        s.check_one(Algorithm::TokenBucket, &op(&limits, 8), T0)
            .unwrap()
            .allowed
    );
    let forced = CheckOp {
        force: true,
        ..op(&limits, 5)
    };
    let r = s.check_one(Algorithm::TokenBucket, &forced, T0).unwrap();
    assert!(!r.allowed, "{r:?}");
    // The second is emptied; the minute takes all 5 (13 of 100 used): a check of 87
    // for the minute alone fits, one of 88 does not.
    let minute = |hits| op(&[(60, 100, 100)], hits);
    assert!(
        !s.check_one(Algorithm::TokenBucket, &minute(88), T0)
            .unwrap()
            .allowed
    );
    assert!(
        s.check_one(Algorithm::TokenBucket, &minute(87), T0)
            .unwrap()
            .allowed
    );
    let second = op(&[(1, 10, 10)], 1);
    assert!(
        !s.check_one(Algorithm::TokenBucket, &second, T0)
            .unwrap()
            .allowed
    );
}

/// Exact retry times: at `now + retry_after_ms` the same request is admitted, 1 ms
/// before it is not; at `reset_at` a request for the whole limit is admitted, 1 ms
/// before it is not.
fn assert_retry_and_reset_are_true(algo: Algorithm, lim: (u64, u64, u64), t0: u64) {
    let s = store();
    let one = op(&[lim], 1);
    let full = op(&[lim], lim.1);
    // Fill up, then the next one is refused.
    let mut r = s.check_one(algo, &one, t0).unwrap();
    while r.allowed {
        r = s.check_one(algo, &one, t0).unwrap();
    }
    assert!(r.retry_after_ms > 0, "{r:?}");
    let retry_at = t0 + r.retry_after_ms * MS;
    // (A refused check changes nothing, so both probes see the same state.)
    assert!(
        !s.check_one(algo, &one, retry_at - MS).unwrap().allowed,
        "{algo:?}: admitted 1 ms before retry_after"
    );
    assert!(
        s.check_one(algo, &one, retry_at).unwrap().allowed,
        "{algo:?}: refused at retry_after"
    );
    // reset_at: the whole limit fits then and not 1 ms before.
    let s = store();
    let r = s.check_one(algo, &one, t0).unwrap();
    assert!(r.allowed);
    let reset = r.reset_at * SEC;
    assert!(reset > t0, "{r:?}");
    assert!(
        !s.check_one(algo, &full, reset - MS).unwrap().allowed,
        "{algo:?}: whole limit fit 1 ms before reset_at"
    );
    assert!(
        s.check_one(algo, &full, reset).unwrap().allowed,
        "{algo:?}: whole limit refused at reset_at"
    );
}

#[test]
fn retry_after_and_reset_at_name_the_time_a_retry_succeeds() {
    // Whole-second starts, 0.2 s into a window, and a start with microseconds and
    // nanoseconds.
    for t0 in [T0, T0 + 200 * MS, T0 + SEC + 234_567 * US + 89] {
        // The retry of a sliding window lands mid-window (the previous count decays).
        assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (10, 5, 5), t0);
        assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (2, 2, 2), t0);
        assert_retry_and_reset_are_true(Algorithm::SlidingWindow, (60, 7, 7), t0);
        // Token bucket: whole-second reset_at is rounded up from the bucket's time,
        // so "1 ms before" holds only when the timestamp is on a whole second.
        if t0 % SEC == 0 {
            assert_retry_and_reset_are_true(Algorithm::TokenBucket, (2, 1, 1), t0);
            assert_retry_and_reset_are_true(Algorithm::TokenBucket, (10, 5, 5), t0);
        }
    }
}

#[test]
fn sliding_window_retry_within_the_window_when_the_previous_count_decays() {
    let s = store();
    // 4 hits late in one window; in the next, halfway, 4 more do not fit (2 + 4 > 5).
    assert!(
        s.check_one(
            Algorithm::SlidingWindow,
            &op(&[(10, 5, 5)], 4),
            T0 + 9_900 * MS
        )
        .unwrap()
        .allowed
    );
    let four = op(&[(10, 5, 5)], 4);
    let r = s
        .check_one(Algorithm::SlidingWindow, &four, T0 + 15 * SEC)
        .unwrap();
    assert!(!r.allowed);
    // The previous 4 weigh 4·(1 − f); 4 more fit once that is 1: f = 0.75, 2.5 s on.
    assert_eq!(r.retry_after_ms, 2500);
    assert!(
        !s.check_one(Algorithm::SlidingWindow, &four, T0 + 17_499 * MS)
            .unwrap()
            .allowed
    );
    assert!(
        s.check_one(Algorithm::SlidingWindow, &four, T0 + 17_500 * MS)
            .unwrap()
            .allowed
    );
}

#[test]
fn a_refusal_describes_the_limit_that_refused() {
    for algo in [Algorithm::SlidingWindow, Algorithm::TokenBucket] {
        let s = store();
        // 5 per second and 6 per hour: after 5, two more are refused by both; the
        // second has more left (1 vs 0) but keeps them out far longer, so the
        // answer describes it (a client waiting for the first would retry in vain).
        let limits = [(1, 5, 5), (3600, 6, 6)];
        assert!(s.check_one(algo, &op(&limits, 5), T0).unwrap().allowed);
        let r = s.check_one(algo, &op(&limits, 2), T0 + 500 * MS).unwrap();
        assert!(!r.allowed);
        assert_eq!(r.remaining, 1, "{algo:?}: {r:?}");
        assert_eq!(r.tightest, 1, "{algo:?}: {r:?}");
        assert!(r.retry_after_ms > 60_000, "{algo:?}: {r:?}");
    }
}

#[test]
fn the_estimate_weighs_the_previous_window_by_what_the_sliding_window_still_covers() {
    // A 10 s window, 2.5 s in: the previous window's 8 count 8 · 0.75 = 6.
    let w = WindowAt::new(10, T0 + 12_500 * MS);
    assert_eq!((w.index, w.elapsed_ns), (T0 / (10 * SEC) + 1, 2_500 * MS));
    let c = w.counts(Some(WindowCounts {
        index: w.index - 1,
        current: 8,
        previous: 100,
    }));
    assert_eq!(
        (c.current, c.previous),
        (0, 8),
        "one window on: current becomes previous"
    );
    assert_eq!(w.estimate(c), 6.0);
    let stale = WindowCounts {
        index: w.index - 2,
        current: 8,
        previous: 8,
    };
    assert_eq!(
        w.counts(Some(stale)),
        w.counts(None),
        "two windows on: nothing counts"
    );
    // Window 0 (the epoch) has no window before it.
    let first = WindowAt::new(10, 3 * SEC);
    assert_eq!(first.counts(None).index, 0);
}

#[test]
fn expired_keys_are_swept_and_the_sweeper_ends_with_the_store() {
    let s = store();
    let now = now_ns();
    assert!(
        s.check_one(Algorithm::SlidingWindow, &op(&[(1, 5, 5)], 1), now)
            .unwrap()
            .allowed
    );
    assert!(
        s.check_one(Algorithm::TokenBucket, &op(&[(1, 5, 5)], 1), now)
            .unwrap()
            .allowed
    );
    assert_eq!(s.shared.sweep(now), 2);
    // The window key lives two windows, the bucket until it is full again (200 ms).
    assert_eq!(s.shared.sweep(now + 300 * MS), 1);
    assert_eq!(s.shared.sweep(now + 2 * SEC + 1), 0);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let s = store();
        let task = s.start_sweeping(Duration::from_secs(1)).expect("started");
        assert!(
            s.start_sweeping(Duration::from_secs(1)).is_none(),
            "only once"
        );
        let weak = Arc::downgrade(&s.shared);
        assert_eq!(weak.strong_count(), 1, "the task holds no strong reference");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!task.is_finished(), "sweeping while the store lives");
        drop(s);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(task.is_finished(), "the task ends with the store");
    });
}
