use super::*;
use crate::global::{admit, apply_grant};
use crate::testing::test;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const HALF: u32 = SHARE_ONE / 2;

fn limit() -> Limit {
    Limit::new(1, 100, 100).unwrap()
}

fn p() -> TriggerParams {
    TriggerParams::for_interval(S)
}

/// A key granted `share` until `expiry`, last reported at `reported`, with `admitted`
/// since and a bucket `fill` full (fraction).
fn granted(share: u32, expiry: u64, reported: u64, admitted: u32) -> KeyState {
    let mut s = KeyState::new(share, 0);
    s.expiry_ns = expiry;
    s.reported_ms = clock_ms(reported);
    s.admitted = admitted;
    s
}

/// Takes `n` tokens at `now` at the granted share; returns the last admission.
fn take(tats: &mut [u64], state: &mut KeyState, n: u64, now: u64) -> Admission {
    let mut last = Admission::Open;
    for _ in 0..n {
        last = admit(&[limit()], tats, state, ShareSource::Granted, HALF, now, 1);
    }
    last
}

#[test]
fn new_and_rejected_keys_are_candidates() {
    let now = 100 * S;
    let mut tats = [0];
    let mut state = KeyState::new(HALF, 0);
    let src = ShareSource::NewKey(HALF);
    let a = admit(&[limit()], &mut tats, &mut state, src, HALF, now, 1);
    assert_eq!(
        reasons(&[limit()], &tats, &state, src, a, HALF, now, &p()),
        NEW
    );
    let a = admit(&[limit()], &mut tats, &mut state, src, HALF, now, 1000);
    assert_eq!(
        reasons(&[limit()], &tats, &state, src, a, HALF, now, &p()),
        NEW | REJECTED
    );
    let c = ShareSource::Closed;
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &state,
            c,
            Admission::Closed,
            HALF,
            now,
            &p()
        ),
        NEW | REJECTED
    );
}

#[test]
fn hot_means_near_the_share_and_draining_the_bucket() {
    let now = 100 * S;
    // Half share (50 tokens, 50/s), reported 1 s ago.
    let mut state = granted(HALF, now + 30 * S, now - S, 0);
    let mut tats = [0];
    // 20 requests at once: rate 20/s < θ·50/s, bucket 60 % full: quiet.
    let a = take(&mut tats, &mut state, 20, now);
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &state,
            ShareSource::Granted,
            a,
            HALF,
            now,
            &p()
        ),
        0
    );
    // 10 more: 30 admitted over 1 s ≥ 25/s and the bucket is 40 % full: hot.
    let a = take(&mut tats, &mut state, 10, now);
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &state,
            ShareSource::Granted,
            a,
            HALF,
            now,
            &p()
        ),
        HOT
    );
    // The same drain after 60 s without a report: 30/60 s is far below the share.
    let mut quiet = granted(HALF, now + 30 * S, now - 60 * S, 0);
    let mut tats = [0];
    let a = take(&mut tats, &mut quiet, 30, now);
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &quiet,
            ShareSource::Granted,
            a,
            HALF,
            now,
            &p()
        ),
        0
    );
    // A fast key whose bucket stays full (share well above demand) is not hot either.
    let mut roomy = granted(SHARE_ONE, now + 30 * S, now - S, 90);
    let mut tats = [0];
    let a = take(&mut tats, &mut roomy, 1, now);
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &roomy,
            ShareSource::Granted,
            a,
            HALF,
            now,
            &p()
        ),
        0
    );
}

#[test]
fn renew_only_used_keys_near_the_end_of_their_grant() {
    let now = 100 * S;
    let why = |expiry: u64, used: u64| {
        let mut state = granted(HALF, expiry, now - 20 * S, 0);
        let mut tats = [0];
        let a = take(&mut tats, &mut state, used, now);
        reasons(
            &[limit()],
            &tats,
            &state,
            ShareSource::Granted,
            a,
            HALF,
            now,
            &p(),
        )
    };
    assert_eq!(why(now + 2 * S, 1), RENEW);
    assert_eq!(why(now + 3 * S, 1), 0, "not yet within two intervals");
    assert_eq!(
        why(now + 2 * S, 0),
        0,
        "unused since its report: let it lapse"
    );
}

#[test]
fn candidates_dedup_merge_and_drop_when_full() {
    let mut set = CandidateSet::with_capacity(3);
    assert!(set.add(1, 42, NEW, 0));
    assert!(set.add(1, 42, REJECTED, 2));
    assert!(set.add(1, 42, REJECTED, 3));
    assert!(
        set.add(2, 42, HOT, 0),
        "same fingerprint, other rule: another key"
    );
    assert!(set.add(1, 43, RENEW, 0));
    assert!(set.add(1, 44, 0, 0), "no reason: nothing to add");
    assert_eq!(set.len(), 3);
    assert!(!set.add(1, 45, NEW, 0));
    assert!(set.add(1, 42, HOT, 0), "a held key still merges when full");
    assert_eq!(set.dropped(), 1);
    let mut got = Vec::new();
    set.drain(|c| got.push(c));
    got.sort_by_key(|c| (c.rule, c.fingerprint));
    assert_eq!(
        got,
        vec![
            Candidate {
                rule: 1,
                fingerprint: 42,
                rejected: 5,
                reasons: NEW | REJECTED | HOT
            },
            Candidate {
                rule: 1,
                fingerprint: 43,
                rejected: 0,
                reasons: RENEW
            },
            Candidate {
                rule: 2,
                fingerprint: 42,
                rejected: 0,
                reasons: HOT
            },
        ]
    );
    assert!(set.is_empty());
    // Colliding fingerprints (same low bits) all find a slot; refilled after a drain.
    for round in 0..3 {
        for i in 0..3u64 {
            assert!(set.add(0, i << 40, NEW, 0), "round {round}");
        }
        assert_eq!(set.len(), 3);
        let mut n = 0;
        set.drain(|_| n += 1);
        assert_eq!(n, 3);
    }
}

#[test]
fn tracked_keys_follow_their_grants_and_hand_back_unused_shares() {
    let tp = TrackedParams {
        capacity: 2,
        ..TrackedParams::default()
    };
    assert_eq!(tp.quiet(3), SHARE_ONE / 30);
    assert_eq!(tp.quiet(0), SHARE_ONE / 10, "n unknown counts as 1");
    let mut tracked = TrackedKeys::default();
    tracked.update(0, 1, &[HALF], false, tp.quiet(3), &tp);
    tracked.update(0, 2, &[tp.quiet(3)], false, tp.quiet(3), &tp);
    let keys = |t: &TrackedKeys| t.iter().collect::<Vec<_>>();
    assert_eq!(
        keys(&tracked),
        vec![(0, 1, false)],
        "quiet shares are not tracked"
    );
    tracked.update(0, 3, &[tp.quiet(3), HALF], false, tp.quiet(3), &tp);
    tracked.update(0, 4, &[HALF], false, tp.quiet(3), &tp);
    assert_eq!((tracked.len(), tracked.dropped), (2, 1));
    tracked.update(0, 1, &[0], false, tp.quiet(3), &tp);
    // A grant of 0 below its target is tracked, as pending, until it is not.
    tracked.update(0, 5, &[0], true, tp.quiet(3), &tp);
    assert_eq!(keys(&tracked), vec![(0, 3, false), (0, 5, true)]);
    tracked.update(0, 5, &[0], false, tp.quiet(3), &tp);
    assert_eq!(keys(&tracked), vec![(0, 3, false)]);

    let now = 100 * S;
    // Due every interval while the grant lasts, used or not.
    assert!(tracked_due(
        Some(&granted(HALF, now + 30 * S, now - S, 49)),
        now
    ));
    assert!(tracked_due(
        Some(&granted(HALF, now + 30 * S, now - 3 * S, 0)),
        now
    ));
    // Evicted from the table: report (with nothing) so the companion frees the share.
    assert!(tracked_due(None, now));
    // Expired: the companion has dropped it already.
    assert!(!tracked_due(Some(&granted(HALF, now, now - 3 * S, 0)), now));
}

#[test]
fn a_reported_key_starts_a_new_span() {
    // After a grant is applied, the reported count is gone and the span restarts: the
    // first requests after a report do not look hot.
    let now = 100 * S;
    let mut state = KeyState::new(HALF, 0);
    let mut tats = [0];
    for _ in 0..40 {
        admit(
            &[limit()],
            &mut tats,
            &mut state,
            ShareSource::NewKey(HALF),
            HALF,
            now,
            1,
        );
    }
    apply_grant(
        &[limit()],
        &mut tats,
        &mut state,
        &[HALF],
        now + 30 * S,
        40,
        clock_ms(now),
        HALF,
        now,
    );
    let later = now + 100 * MS;
    let a = take(&mut tats, &mut state, 1, later);
    assert_eq!(state.admitted, 1);
    assert_eq!(
        reasons(
            &[limit()],
            &tats,
            &state,
            ShareSource::Granted,
            a,
            HALF,
            later,
            &p()
        ),
        0
    );
}
