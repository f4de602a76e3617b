use super::*;
use crate::testing::test;

const S: u64 = 1_000_000_000;
const THIRD: u32 = SHARE_ONE / 3;
const TENTH: u32 = SHARE_ONE / 10;

fn limit() -> Limit {
    Limit::new(1, 100, 90).unwrap()
}

fn synced(at: u64, n: u32) -> SyncView {
    SyncView {
        last_ok_sent_ns: Some(at),
        proxy_ttl_ns: 3 * S,
        n_live: n,
    }
}

/// Admits single hits until refused; returns how many.
fn drain(tats: &mut [u64], state: &mut KeyState, source: ShareSource, floor: u32, now: u64) -> u64 {
    let mut n = 0;
    while let Admission::Bucket(d) = admit(&[limit()], tats, state, source, floor, now, 1) {
        if !d.allowed {
            break;
        }
        n += 1;
    }
    n
}

#[test]
fn trailer_round_trips_and_has_the_documented_size() {
    assert_eq!(trailer_len(1), 20);
    assert_eq!(trailer_len(MAX_LIMITS_PER_RULE), 48);
    let mut state = KeyState::new(THIRD, 0);
    state.shares[1] = 7;
    state.expiry_ns = u64::MAX - 5;
    state.admitted = 123_456;
    state.reported_ms = u32::MAX;
    let mut buf = [0u8; trailer_len(MAX_LIMITS_PER_RULE)];
    state.encode(2, &mut buf);
    let back = KeyState::decode(&buf[..trailer_len(2)], 2).unwrap();
    assert_eq!(&back.shares[..2], &[THIRD, 7]);
    assert_eq!(
        (back.expiry_ns, back.admitted, back.reported_ms),
        (u64::MAX - 5, 123_456, u32::MAX)
    );
    // Wrong length, no limits, too many, a share above the whole: refused.
    assert!(KeyState::decode(&buf[..trailer_len(2) - 1], 2).is_none());
    assert!(KeyState::decode(&[], 0).is_none());
    assert!(KeyState::decode(&buf, MAX_LIMITS_PER_RULE + 1).is_none());
    let mut bad = [0u8; 20];
    bad[..4].copy_from_slice(&(SHARE_ONE + 1).to_le_bytes());
    assert!(KeyState::decode(&bad, 1).is_none());
}

#[test]
fn which_share_applies() {
    let now = 100 * S;
    let mut granted = KeyState::new(TENTH, 0);
    granted.expiry_ns = now + S;
    let fresh = KeyState::new(0, 0);
    let up = synced(now - S, 4);
    let mode = FailureMode::Local;
    assert_eq!(
        choose_share(&granted, &up, mode, None, now),
        ShareSource::Granted
    );
    // New key, or a grant that expired: 1/n.
    assert_eq!(
        choose_share(&fresh, &up, mode, None, now),
        ShareSource::NewKey(SHARE_ONE / 4)
    );
    assert_eq!(
        choose_share(&granted, &up, mode, None, now + S),
        ShareSource::NewKey(SHARE_ONE / 4)
    );
    // Unreachable for 3 intervals voids even an unexpired grant.
    let down = synced(now - 3 * S, 4);
    let f = Some(TENTH);
    assert_eq!(
        choose_share(&granted, &down, mode, f, now),
        ShareSource::Fallback(TENTH)
    );
    assert_eq!(
        choose_share(&granted, &down, mode, None, now),
        ShareSource::Fallback(SHARE_ONE / 4)
    );
    assert_eq!(
        choose_share(&granted, &down, FailureMode::Open, f, now),
        ShareSource::Open
    );
    assert_eq!(
        choose_share(&granted, &down, FailureMode::Closed, f, now),
        ShareSource::Closed
    );
    // Never synced: n unknown, the fallback share or else the whole limit.
    let never = SyncView {
        last_ok_sent_ns: None,
        proxy_ttl_ns: 3 * S,
        n_live: 0,
    };
    assert_eq!(
        choose_share(&fresh, &never, mode, f, now),
        ShareSource::Fallback(TENTH)
    );
    assert_eq!(
        choose_share(&fresh, &never, mode, None, now),
        ShareSource::Fallback(SHARE_ONE)
    );
    assert_eq!(burst_floor(&never, ShareSource::Fallback(TENTH)), TENTH);
    assert_eq!(burst_floor(&up, ShareSource::Granted), SHARE_ONE / 4);
}

#[test]
fn a_new_key_runs_at_a_fair_share_never_the_whole() {
    let now = 100 * S;
    let mut tats = [0];
    let mut state = KeyState::new(THIRD, 0);
    let src = ShareSource::NewKey(THIRD);
    assert_eq!(
        drain(&mut tats, &mut state, src, THIRD, now),
        30,
        "a third of burst 90"
    );
    assert_eq!(
        (state.admitted, state.expiry_ns, state.shares[0]),
        (30, 0, THIRD)
    );
    // 0.3 s later: a third of 100/s for 0.3 s came back.
    assert_eq!(
        drain(&mut tats, &mut state, src, THIRD, now + 3 * S / 10),
        10
    );
    // A full second: the bucket holds a third of the burst, no more.
    assert_eq!(drain(&mut tats, &mut state, src, THIRD, now + 10 * S), 30);
}

#[test]
fn rejections_write_nothing_and_open_closed_touch_nothing() {
    let now = 100 * S;
    let mut tats = [0];
    let mut state = KeyState::new(THIRD, 0);
    drain(
        &mut tats,
        &mut state,
        ShareSource::NewKey(THIRD),
        THIRD,
        now,
    );
    let (t, s) = (tats, state);
    let a = admit(
        &[limit()],
        &mut tats,
        &mut state,
        ShareSource::NewKey(THIRD),
        THIRD,
        now,
        1,
    );
    assert!(matches!(a, Admission::Bucket(d) if !d.allowed && !d.changed));
    assert_eq!((tats, state), (t, s));
    assert_eq!(
        admit(
            &[limit()],
            &mut tats,
            &mut state,
            ShareSource::Open,
            THIRD,
            now,
            1
        ),
        Admission::Open
    );
    assert_eq!(
        admit(
            &[limit()],
            &mut tats,
            &mut state,
            ShareSource::Closed,
            THIRD,
            now,
            1
        ),
        Admission::Closed
    );
    assert_eq!((tats, state), (t, s));
}

#[test]
fn a_grant_is_applied_with_its_fill_fraction_and_counts_in_flight_survive() {
    let now = 100 * S;
    let floor = SHARE_ONE / 2;
    let mut tats = [0];
    let mut state = KeyState::new(SHARE_ONE / 2, 0);
    // At 1/2 (45 tokens) take 15: two thirds full.
    for _ in 0..15 {
        admit(
            &[limit()],
            &mut tats,
            &mut state,
            ShareSource::NewKey(floor),
            floor,
            now,
            1,
        );
    }
    // The report said 10 (5 more were admitted while it was in flight).
    apply_grant(
        &[limit()],
        &mut tats,
        &mut state,
        &[TENTH],
        now + S,
        10,
        1234,
        floor,
        now,
    );
    assert_eq!(
        (
            state.shares[0],
            state.expiry_ns,
            state.admitted,
            state.reported_ms
        ),
        (TENTH, now + S, 5, 1234)
    );
    // A tenth below the floor 1/2: still 45 tokens of capacity, two thirds full.
    assert_eq!(
        drain(&mut tats, &mut state, ShareSource::Granted, floor, now),
        30
    );
    // The grant expires: back to 1/2 for a new key, rescaled (nearly empty stays so).
    let after = now + S;
    let mut t2 = tats;
    let mut s2 = state;
    let d = admit(
        &[limit()],
        &mut t2,
        &mut s2,
        ShareSource::NewKey(floor),
        floor,
        after,
        1,
    );
    assert!(matches!(d, Admission::Bucket(d) if d.allowed));
    assert_eq!((s2.shares[0], s2.expiry_ns), (floor, 0));
    // One second at a tenth of 100/s refilled 10 tokens of 45; at 1/2 that fraction is
    // 10 tokens too, minus the one just taken.
    assert_eq!(
        drain(&mut t2, &mut s2, ShareSource::NewKey(floor), floor, after),
        9
    );
}

#[test]
fn the_admitted_count_saturates() {
    let mut tats = [0];
    let mut state = KeyState::new(SHARE_ONE, 0);
    state.admitted = u32::MAX - 1;
    let l = [Limit::new(1, 1_000_000, 1_000_000).unwrap()];
    admit(
        &l,
        &mut tats,
        &mut state,
        ShareSource::Granted,
        SHARE_ONE,
        100 * S,
        5,
    );
    assert_eq!(state.admitted, u32::MAX);
    admit(
        &l,
        &mut tats,
        &mut state,
        ShareSource::Granted,
        SHARE_ONE,
        100 * S,
        1 << 40,
    );
    assert_eq!(state.admitted, u32::MAX);
}

#[test]
fn several_limits_are_all_or_nothing_at_a_share() {
    // 10/s burst 10 and 20/min burst 20, at a half share (floor 1/2): 5 and 10 tokens.
    let l = [
        Limit::new(1, 10, 10).unwrap(),
        Limit::new(60, 20, 20).unwrap(),
    ];
    let half = SHARE_ONE / 2;
    let now = 100 * S;
    let mut tats = [0, 0];
    let mut state = KeyState::new(half, now);
    let src = ShareSource::NewKey(half);
    let ok = |a| matches!(a, Admission::Bucket(d) if d.allowed);
    let admitted = (0..20)
        .filter(|_| ok(admit(&l, &mut tats, &mut state, src, half, now, 1)))
        .count();
    assert_eq!(admitted, 5, "the per-second limit at half share");
    // Ten seconds later the second limit (10 tokens at half share) is the one left.
    let later = now + 10 * S;
    let admitted = (0..20)
        .filter(|_| ok(admit(&l, &mut tats, &mut state, src, half, later, 1)))
        .count();
    assert_eq!(
        admitted, 5,
        "the per-minute limit's remaining half-share tokens"
    );
    let before = (tats, state);
    let a = admit(&l, &mut tats, &mut state, src, half, later, 1);
    // Only the per-second limit refuses (the per-minute one still holds a token): the
    // decision describes the refusing limit, the one Retry-After comes from (a token
    // every 0.2 s at half share).
    assert!(matches!(a, Admission::Bucket(d)
        if !d.allowed && d.tightest == 0 && d.retry_after_ns == 200_000_000));
    assert_eq!((tats, state), before, "a refusal charges neither limit");
    let mut buf = [0u8; trailer_len(2)];
    state.encode(2, &mut buf);
    let back = KeyState::decode(&buf, 2).unwrap();
    assert_eq!(back.shares[..2], state.shares[..2]);
    assert_eq!(
        (back.expiry_ns, back.admitted, back.reported_ms),
        (0, 10, state.reported_ms)
    );
}
