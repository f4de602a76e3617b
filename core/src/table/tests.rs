use std::cell::{Cell, RefCell};

use super::*;
use crate::config::Limit;
use crate::host::memory::MemorySharedData;
use crate::testing::test;

const S: u64 = 1_000_000_000;

#[test]
fn keys_are_fixed_size_hex() {
    let mut buf = [0u8; KEY_LEN];
    assert_eq!(set_key(0, &mut buf), "rl:00000000");
    assert_eq!(set_key(0xdead_beef, &mut buf), "rl:deadbeef");
    assert_eq!(set_key(65_535, &mut buf), "rl:0000ffff");
    assert_eq!(init_marker_key(1024), "rl-init:00000400");
    assert_eq!(sets_for(100_000), 65_536);
    assert_eq!(sets_for(16), 8);
    for fp in [0u64, u64::MAX, 0x1234_5678_9abc_def0] {
        assert!(set_of(fp, 1024) < 1024);
    }
}

fn entry_value(entries: &[(u64, &[u64])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (fp, tats) in entries {
        let mut out = [0u8; WRITE_MAX];
        v = write(&v, Place::Append, *fp, tats, &mut out).to_vec();
    }
    v
}

#[test]
fn entries_round_trip() {
    let now = 100 * S;
    let v = entry_value(&[(1, &[now + S]), (42, &[now + S, now - S]), (7, &[5])]);
    assert_eq!(v.len(), 17 + 25 + 17);
    let mut tats = [0u64; 2];
    assert_eq!(find(&v, 42, &mut tats, now), Place::Found { offset: 17 });
    assert_eq!(tats, [now + S, now - S]);
    // Update in place keeps the other entries.
    let mut out = [0u8; WRITE_MAX];
    let v2 = write(&v, Place::Found { offset: 17 }, 42, &[9, 9], &mut out).to_vec();
    assert_eq!(v2.len(), v.len());
    assert_eq!(find(&v2, 42, &mut tats, now), Place::Found { offset: 17 });
    assert_eq!(tats, [9, 9]);
    let mut one = [0u64; 1];
    assert_eq!(find(&v2, 7, &mut one, now), Place::Found { offset: 42 });
    assert_eq!(one, [5]);
    // Same fingerprint but a different number of limits is not this entry (the rule
    // changed): it goes elsewhere.
    let mut three = [0u64; 3];
    assert!(!matches!(
        find(&v2, 42, &mut three, now),
        Place::Found { .. }
    ));
}

#[test]
fn fresh_entries_fill_free_ways_then_idle_ones_then_evict_the_least_loss() {
    let now = 100 * S;
    let mut tats = [0u64; 1];
    assert_eq!(find(&[], 9, &mut tats, now), Place::Append);
    // Seven active entries: room left.
    let active: Vec<(u64, Vec<u64>)> = (0..7).map(|i| (i, vec![now + (i + 1) * S])).collect();
    let refs: Vec<(u64, &[u64])> = active.iter().map(|(f, t)| (*f, t.as_slice())).collect();
    let v = entry_value(&refs);
    assert_eq!(find(&v, 99, &mut tats, now), Place::Append);
    // Eight: full; the one closest to full (fp 0, 1 s of slack) is evicted.
    let mut out = [0u8; WRITE_MAX];
    let full = write(&v, Place::Append, 7, &[now + 50 * S], &mut out).to_vec();
    assert_eq!(
        find(&full, 99, &mut tats, now),
        Place::Replace {
            offset: 0,
            len: 17,
            evicted: Evicted {
                active: true,
                grant_of: None
            }
        }
    );
    // Later, when fp 3 is idle (all buckets full again) and others are not, an idle
    // entry is reused first, without eviction, even if the set is not full.
    let later = now + 4 * S;
    assert_eq!(
        find(&full, 99, &mut tats, later),
        Place::Replace {
            offset: 0,
            len: 17,
            evicted: Evicted::default()
        }
    );
    assert_eq!(
        find(&v, 99, &mut tats, later),
        Place::Replace {
            offset: 0,
            len: 17,
            evicted: Evicted::default()
        },
        "idle entries are reused before the set grows"
    );
}

#[test]
fn malformed_values_are_free_space_and_never_panic() {
    let mut tats = [0u64; 2];
    assert_eq!(find(&[], 1, &mut tats, 0), Place::Append);
    for garbage in [
        &[0u8][..],
        &[9u8; 5][..],
        &[1u8, 2, 3][..],
        &[200u8; 40][..],
        &[1u8; 17 + 3][..],
    ] {
        let place = find(garbage, 1, &mut tats, 0);
        let mut out = [0u8; WRITE_MAX];
        let v = write(garbage, place, 1, &[4, 5], &mut out).to_vec();
        assert_eq!(
            find(&v, 1, &mut tats, 0),
            Place::Found {
                offset: v.len() - 25
            },
            "{garbage:?}"
        );
        assert_eq!(tats, [4, 5]);
    }
    // An over-long value is cut, not copied past the buffer.
    let huge = vec![1u8; 10_000];
    let place = find(&huge, 1, &mut tats, 0);
    let mut out = [0u8; WRITE_MAX];
    assert!(write(&huge, place, 1, &[4, 5], &mut out).len() <= WRITE_MAX);
}

impl MemorySharedData {
    /// A store holding a created table of `sets` sets, counters at zero.
    fn with_table(sets: u32) -> Self {
        let shared = MemorySharedData::default();
        create(&shared, sets);
        shared.gets.set(0);
        shared.sets.set(0);
        shared
    }

    fn set_value(&self, set: u32) -> Vec<u8> {
        let mut key = [0u8; KEY_LEN];
        self.value(set_key(set, &mut key))
            .expect("the table created every set")
    }

    /// The stored timestamps of a client, if it has an entry.
    fn tats_of(&self, fingerprint: u64, limits: usize, sets: u32) -> Option<Vec<u64>> {
        let mut tats = vec![0u64; limits];
        let value = self.set_value(set_of(fingerprint, sets));
        matches!(find(&value, fingerprint, &mut tats, 0), Place::Found { .. }).then_some(tats)
    }
}

fn allowed(shared: &MemorySharedData, limits: &[Limit], fp: u64, sets: u32, now: u64) -> bool {
    take(shared, limits, fp, sets, now)
        .expect("no failure injected")
        .decision
        .allowed
}

#[test]
fn create_makes_every_set_once_and_keeps_what_is_there() {
    let shared = MemorySharedData::default();
    create(&shared, 8);
    assert_eq!(shared.values.borrow().len(), 9, "8 sets and the marker");
    for set in 0..8 {
        assert_eq!(shared.set_value(set), Vec::<u8>::new());
    }
    assert!(shared.value(&init_marker_key(8)).is_some());
    // Another VM of the same proxy configures next: the marker says it is done.
    let writes = shared.sets.get();
    let limits = [Limit::new(60, 5, 5).unwrap()];
    assert!(allowed(&shared, &limits, 42, 8, S));
    create(&shared, 8);
    assert_eq!(shared.sets.get(), writes + 1, "only the take wrote");
    assert!(shared.tats_of(42, 1, 8).is_some(), "the entry survived");
    // A table of another size is created beside it, and a set that already holds
    // entries is not emptied (a VM that saw no marker yet while others wrote).
    let kept = shared.set_value(set_of(42, 8));
    let mut key = [0u8; KEY_LEN];
    shared
        .set(set_key(3, &mut key), b"\x01stateful", None)
        .unwrap();
    create(&shared, 16);
    assert_eq!(shared.set_value(3), b"\x01stateful");
    assert_eq!(shared.set_value(set_of(42, 8)), kept);
    assert_eq!(shared.set_value(15), Vec::<u8>::new());
}

#[test]
fn a_take_reads_once_and_writes_once_and_a_refusal_writes_nothing() {
    let shared = MemorySharedData::with_table(8);
    let limits = [Limit::new(60, 2, 2).unwrap()];
    let now = 1_000 * S;
    assert!(allowed(&shared, &limits, 7, 8, now));
    assert_eq!((shared.gets.get(), shared.sets.get()), (1, 1));
    assert!(allowed(&shared, &limits, 7, 8, now));
    let refused = take(&shared, &limits, 7, 8, now).unwrap();
    assert!(!refused.decision.allowed);
    assert_eq!((shared.gets.get(), shared.sets.get()), (3, 2));
}

#[test]
fn a_writer_between_get_and_set_makes_the_take_decide_again() {
    // Two workers, one client with one token left: the other worker takes it between
    // this worker's read and its CAS. Deciding on the stale read would admit twice.
    let sets = 8;
    let limits = [Limit::new(3600, 2, 2).unwrap()];
    let now = 1_000 * S;
    let shared = MemorySharedData::with_table(sets);
    assert!(allowed(&shared, &limits, 5, sets, now));
    shared.then_between(move |other| assert!(allowed(other, &limits, 5, sets, now)));
    let taken = take(&shared, &limits, 5, sets, now).unwrap();
    assert!(
        !taken.decision.allowed,
        "the last token went to the other worker"
    );
    assert_eq!(shared.mismatches.get(), 1, "the stale CAS was refused");
    // Get, then the other worker's get and set, then the stale CAS, then the re-read
    // (which refuses and writes nothing).
    assert_eq!((shared.gets.get(), shared.sets.get()), (4, 3));

    // Another client of the same set, written in between: both entries are kept.
    let (a, b) = (1u64 << 32, 2u64 << 32 | 1);
    assert_eq!(set_of(a, 1), set_of(b, 1));
    let shared = MemorySharedData::with_table(1);
    shared.then_between(move |other| assert!(allowed(other, &limits, b, 1, now)));
    assert!(allowed(&shared, &limits, a, 1, now));
    assert_eq!(shared.mismatches.get(), 1);
    let ahead = now + 1_800 * S;
    assert_eq!(shared.tats_of(a, 1, 1), Some(vec![ahead]));
    assert_eq!(shared.tats_of(b, 1, 1), Some(vec![ahead]));
}

#[test]
fn concurrent_writers_never_admit_more_than_the_limit() {
    // Four clients of one set, each sending 40 requests against 20 an hour, while another
    // worker's request for a random one of them lands between most reads and their CAS.
    // Every client is admitted exactly 20 times, whoever's request it was.
    let limits = [Limit::new(3600, 20, 20).unwrap()];
    let clients: Vec<u64> = (0..4).map(|c| c << 32 | 0xabc).collect();
    let shared = MemorySharedData::with_table(1);
    let admitted = std::rc::Rc::new(RefCell::new(vec![0u32; clients.len()]));
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let now = 1_000 * S;
    for round in 0..40 {
        for c in 0..clients.len() {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if rng >> 62 != 0 {
                let other = (rng >> 40) as usize % clients.len();
                let (fp, admitted) = (clients[other], admitted.clone());
                shared.then_between(move |s| {
                    if allowed(s, &limits, fp, 1, now + round) {
                        admitted.borrow_mut()[other] += 1;
                    }
                });
            }
            if allowed(&shared, &limits, clients[c], 1, now + round) {
                admitted.borrow_mut()[c] += 1;
            }
        }
    }
    assert!(
        shared.mismatches.get() > 20,
        "{} mismatches",
        shared.mismatches.get()
    );
    assert_eq!(*admitted.borrow(), vec![20; clients.len()]);
}

#[test]
fn contention_past_the_retry_bound_gives_up_and_failures_are_reported() {
    let limits = [Limit::new(60, 100, 100).unwrap()];
    let now = 1_000 * S;
    // A write lands between every read and its CAS: after MAX_CAS_ATTEMPTS the take
    // gives up (the filter then fails open) instead of spinning.
    let shared = MemorySharedData::with_table(8);
    let key = {
        let mut key = [0u8; KEY_LEN];
        set_key(set_of(9, 8), &mut key).to_owned()
    };
    let interfere = |shared: &MemorySharedData, times: usize| {
        for _ in 0..times {
            let key = key.clone();
            shared.then_between(move |s| s.set(&key, &[], None).unwrap());
        }
    };
    interfere(&shared, MAX_CAS_ATTEMPTS);
    assert_eq!(
        take(&shared, &limits, 9, 8, now),
        Err(UpdateError::Contended)
    );
    assert_eq!(shared.gets.get() as usize, MAX_CAS_ATTEMPTS);
    assert_eq!(shared.tats_of(9, 1, 8), None, "nothing was taken");
    // One fewer and the last attempt wins.
    interfere(&shared, MAX_CAS_ATTEMPTS - 1);
    assert!(allowed(&shared, &limits, 9, 8, now));
    assert!(shared.tats_of(9, 1, 8).is_some());

    // A failed read or a failed write ends the take at once, with no retry.
    let shared = MemorySharedData::with_table(8);
    shared.failing_gets.set(1);
    assert_eq!(
        take(&shared, &limits, 9, 8, now),
        Err(UpdateError::SharedData)
    );
    shared.failing_sets.set(1);
    assert_eq!(
        take(&shared, &limits, 9, 8, now),
        Err(UpdateError::SharedData)
    );
    assert_eq!((shared.gets.get(), shared.sets.get()), (2, 1));
    assert_eq!(shared.tats_of(9, 1, 8), None);
    assert!(
        allowed(&shared, &limits, 9, 8, now),
        "and the next take works"
    );
}

#[test]
fn update_keeps_or_stores_what_the_attempt_decides() {
    let shared = MemorySharedData::with_table(8);
    let mut key = [0u8; KEY_LEN];
    let key = set_key(0, &mut key);
    let seen = update(&shared, key, |value, _| Attempt::Keep(value.len())).unwrap();
    assert_eq!((seen, shared.sets.get()), (0, 0), "kept: no write");
    let stored = update(&shared, key, |value, out| {
        out[..3].copy_from_slice(b"abc");
        Attempt::Store {
            len: 3,
            outcome: value.len(),
        }
    });
    assert_eq!(stored, Ok(0));
    assert_eq!(shared.value(key).unwrap(), b"abc");
    // A length past the buffer is cut to it, not a panic in the VM.
    let stored = update(&shared, key, |_, _| Attempt::Store {
        len: WRITE_MAX + 10,
        outcome: (),
    });
    assert_eq!(stored, Ok(()));
    assert_eq!(shared.value(key).unwrap().len(), WRITE_MAX);
}

/// A take that evicted an active entry says so (the filter counts it); the test table
/// counts them.
fn take_counting(
    shared: &MemorySharedData,
    limits: &[Limit],
    fp: u64,
    sets: u32,
    now: u64,
    evictions: &mut u64,
) -> bool {
    let taken = take(shared, limits, fp, sets, now).expect("no failure injected");
    *evictions += u64::from(taken.evicted_active);
    taken.decision.allowed
}

#[test]
fn memory_is_bounded_whatever_the_number_of_clients() {
    // 1M distinct clients through a 512-set table: the table never grows and no value
    // exceeds SET_MAX.
    let limits = [
        Limit::new(1, 10, 10).unwrap(),
        Limit::new(60, 100, 100).unwrap(),
    ];
    let shared = MemorySharedData::with_table(512);
    let mut evictions = 0;
    for i in 0..1_000_000u64 {
        let fp = crate::hash::hash64(9, &i.to_le_bytes());
        assert!(take_counting(
            &shared,
            &limits,
            fp,
            512,
            1_000 * S + i * 1_000,
            &mut evictions
        ));
    }
    let values = shared.values.borrow();
    assert_eq!(values.len(), 512 + 1, "512 sets and the marker");
    let sets: Vec<Vec<u8>> = (0..512).map(|s| shared.set_value(s)).collect();
    assert!(sets.iter().all(|v| v.len() <= SET_MAX));
    assert!(
        sets.iter().all(|v| v.len() == WAYS * 25),
        "every set full of 2-limit entries"
    );
    assert!(evictions > 0);
}

#[test]
fn clients_up_to_max_clients_keep_exact_counts() {
    // max_clients = 2048 active clients, each sending 8 requests against a 5/h limit,
    // interleaved: every client gets exactly 5, nothing is evicted.
    let limits = [Limit::new(3600, 5, 5).unwrap()];
    let sets = sets_for(2048);
    let shared = MemorySharedData::with_table(sets);
    let now = 1_000 * S;
    let mut admitted = vec![0u32; 2048];
    let mut evictions = 0;
    for round in 0..8 {
        for (c, a) in admitted.iter_mut().enumerate() {
            let fp = crate::hash::hash64(3, format!("client-{c}").as_bytes());
            if take_counting(&shared, &limits, fp, sets, now + round, &mut evictions) {
                *a += 1;
            }
        }
    }
    assert_eq!(evictions, 0);
    assert!(admitted.iter().all(|&a| a == 5));
}

#[test]
fn overload_degrades_gracefully() {
    // 4x more active clients than max_clients: evictions happen (and are counted), no
    // client is admitted less than an exact limiter would, and each eviction costs at
    // most one burst of extra admissions.
    let limits = [Limit::new(3600, 3, 3).unwrap()];
    let sets = sets_for(256);
    let shared = MemorySharedData::with_table(sets);
    let now = 1_000 * S;
    let mut admitted = 0u64;
    let mut evictions = 0;
    let clients = 1024u64;
    for round in 0..10 {
        for c in 0..clients {
            let fp = crate::hash::hash64(5, &c.to_le_bytes());
            let t = now + round * 1_000_000 + c;
            admitted += take_counting(&shared, &limits, fp, sets, t, &mut evictions) as u64;
        }
    }
    assert!(evictions > 0);
    assert!(admitted >= clients * 3);
    assert!(admitted <= clients * 3 + evictions * 3);
}

// --- global entries ----------------------------------------------------------------

use crate::gcra::SHARE_ONE;
use crate::global::{self, FailureMode, KeyState, RuleParams, SyncView};
use crate::report::{self, TriggerParams};

fn granted(share: u32, expiry_ns: u64) -> KeyState {
    KeyState {
        shares: [share; crate::config::MAX_LIMITS_PER_RULE],
        expiry_ns,
        admitted: 0,
        reported_ms: 0,
    }
}

#[test]
fn global_entries_round_trip_beside_local_ones() {
    let now = 100 * S;
    let state = KeyState {
        admitted: 7,
        ..granted(SHARE_ONE / 3, now + 60 * S)
    };
    let mut out = [0u8; WRITE_MAX];
    let v = write(&[], Place::Append, 1, &[now], &mut out).to_vec();
    let mut out = [0u8; WRITE_MAX];
    let v = write_global(&v, Place::Append, 42, &[now + S, now], &state, 3, &mut out).to_vec();
    assert_eq!(v.len(), 17 + entry_len(2, true));
    assert_eq!(
        entry_len(1, true),
        17 + 20 + 2,
        "37 bytes of state and the rule"
    );
    let mut tats = [0u64; 2];
    let (place, found) = find_global(&v, 42, &mut tats, now);
    assert_eq!(place, Place::Found { offset: 17 });
    let found = found.unwrap();
    assert_eq!(
        found.shares[..2],
        state.shares[..2],
        "the shares of its 2 limits"
    );
    assert_eq!(
        (found.expiry_ns, found.admitted, found.reported_ms),
        (state.expiry_ns, 7, 0)
    );
    assert_eq!(tats, [now + S, now]);
    // The local lookup of the same fingerprint does not take the global entry for its
    // own, nor the other way round (a rule whose scope changed starts afresh).
    assert!(!matches!(find(&v, 42, &mut tats, now), Place::Found { .. }));
    let mut one = [0u64; 1];
    assert!(!matches!(
        find_global(&v, 1, &mut one, now).0,
        Place::Found { .. }
    ));
    assert_eq!(find(&v, 1, &mut one, now), Place::Found { offset: 0 });
    // A global entry whose trailer does not decode (a share above the whole limit) is
    // rewritten in place like a fresh one.
    let mut bad = v.clone();
    let trailer = 17 + 9 + 16;
    bad[trailer..trailer + 4].copy_from_slice(&(SHARE_ONE + 1).to_le_bytes());
    let (place, found) = find_global(&bad, 42, &mut tats, now);
    assert_eq!(found, None);
    assert!(matches!(place, Place::Replace { offset: 17, .. }));
}

#[test]
fn an_evicted_grant_is_handed_back_and_idle_keys_without_one_go_first() {
    let now = 100 * S;
    let mut v = Vec::new();
    // Eight entries: fp 0 idle holding a grant (rule 5), fp 1 idle without one, the
    // rest active.
    for fp in 0..8u64 {
        let mut out = [0u8; WRITE_MAX];
        let (tat, state) = match fp {
            0 => (now - S, granted(SHARE_ONE / 2, now + 60 * S)),
            1 => (now - S, granted(SHARE_ONE / 2, 0)),
            _ => (now + fp * S, granted(SHARE_ONE / 2, now + 60 * S)),
        };
        let rule = if fp == 0 { 5 } else { 1 };
        v = write_global(&v, Place::Append, fp << 32, &[tat], &state, rule, &mut out).to_vec();
    }
    let len = entry_len(1, true);
    let mut tats = [0u64; 1];
    let (place, _) = find_global(&v, 99 << 32, &mut tats, now);
    assert_eq!(
        place,
        Place::Replace {
            offset: len,
            len,
            evicted: Evicted::default()
        },
        "the idle entry without a grant goes first"
    );
    // Without it, the idle one with a grant: its share is handed back.
    let mut out = [0u8; WRITE_MAX];
    let v = write_global(
        &v,
        place,
        99 << 32,
        &[now + 9 * S],
        &granted(1, 0),
        1,
        &mut out,
    )
    .to_vec();
    let (place, _) = find_global(&v, 98 << 32, &mut tats, now);
    assert_eq!(
        place,
        Place::Replace {
            offset: 0,
            len,
            evicted: Evicted {
                active: false,
                grant_of: Some((5, 0))
            }
        }
    );
    // An idle entry holding a grant is kept while the set has room.
    let mut out = [0u8; WRITE_MAX];
    let one = write_global(
        &[],
        Place::Append,
        0,
        &[now - S],
        &granted(1, now + S),
        2,
        &mut out,
    );
    assert_eq!(find_global(one, 7, &mut tats, now).0, Place::Append);
}

fn params(mode: FailureMode) -> RuleParams {
    RuleParams {
        mode,
        fallback_share: None,
        trigger: TriggerParams::for_interval(S),
    }
}

fn take_g(
    shared: &MemorySharedData,
    limits: &[Limit],
    fp: u64,
    sync: &SyncView,
    p: &RuleParams,
    now: u64,
) -> global::KeyDecision {
    take_global(
        shared,
        limits,
        0,
        fp,
        1,
        now,
        || global::fresh_state(sync, p, now),
        |tats, state| global::decide(limits, tats, state, sync, p, now),
    )
    .unwrap()
    .outcome
}

#[test]
fn a_global_take_costs_one_get_and_one_cas_and_follows_the_share() {
    let shared = MemorySharedData::with_table(1);
    let limits = [Limit::new(60, 40, 40).unwrap()];
    let now = 1_000 * S;
    let sync = sync_at(now);
    let p = params(FailureMode::Local);
    // A new key starts at 1/2 of the limit: 20 of its burst of 40, then refused.
    let mut admitted = 0;
    for i in 0..25 {
        let d = take_g(&shared, &limits, 9, &sync, &p, now);
        assert_eq!(d.source, global::ShareSource::NewKey(SHARE_ONE / 2));
        assert_ne!(
            d.reasons & report::NEW,
            0,
            "a new key is a report candidate"
        );
        if matches!(d.admission, global::Admission::Bucket(x) if x.allowed) {
            admitted += 1;
        } else {
            assert_ne!(d.reasons & report::REJECTED, 0, "request {i}");
        }
    }
    assert_eq!(admitted, 20);
    assert_eq!(
        (shared.gets.get(), shared.sets.get()),
        (25, 20),
        "a refusal writes nothing"
    );
    let (tats, state) = read_global(&shared, 1, 9, 1).unwrap();
    assert_eq!(state.admitted, 20);
    assert_eq!(state.shares[0], SHARE_ONE / 2);
    assert!(tats[0] > now);
    // The leader applies a grant of 3/4 where the entry is: the next requests run at it.
    let found = update_global(&shared, 1, 9, 1, |tats, state| {
        global::apply_grant(
            &limits,
            tats,
            state,
            &[3 * (SHARE_ONE / 4)],
            now + 600 * S,
            20,
            report::clock_ms(now),
            SHARE_ONE / 2,
            now,
        )
    })
    .unwrap();
    assert!(found);
    let (_, state) = read_global(&shared, 1, 9, 1).unwrap();
    assert_eq!((state.admitted, state.expiry_ns), (0, now + 600 * S));
    let later = now + 2 * S; // 2 s at 3/4 of 40 a minute: one token back
    let d = take_g(&shared, &limits, 9, &sync_at(later), &p, later);
    assert_eq!(d.source, global::ShareSource::Granted);
    assert!(matches!(d.admission, global::Admission::Bucket(x) if x.allowed));
    // A key that is not in the table is not created by a grant.
    assert!(!update_global(&shared, 1, 1234, 1, |_, _| panic!("not found")).unwrap());
}

fn sync_at(now: u64) -> SyncView {
    SyncView {
        last_ok_sent_ns: Some(now),
        proxy_ttl_ns: 3 * S,
        n_live: 2,
    }
}

#[test]
fn the_failure_modes_at_the_table() {
    let shared = MemorySharedData::with_table(1);
    let limits = [Limit::new(60, 40, 40).unwrap()];
    let now = 1_000 * S;
    let gone = SyncView {
        last_ok_sent_ns: Some(now - 10 * S),
        proxy_ttl_ns: 3 * S,
        n_live: 2,
    };
    // open: admitted without a bucket, nothing written.
    let d = take_g(&shared, &limits, 1, &gone, &params(FailureMode::Open), now);
    assert_eq!(d.admission, global::Admission::Open);
    assert_eq!(d.by_failure_mode(), Some(FailureMode::Open));
    // closed: refused, nothing written, a rejected candidate.
    let d = take_g(
        &shared,
        &limits,
        2,
        &gone,
        &params(FailureMode::Closed),
        now,
    );
    assert_eq!(d.admission, global::Admission::Closed);
    assert_ne!(d.reasons & report::REJECTED, 0);
    assert_eq!(shared.sets.get(), 0);
    // local: 1/n of the last known n (2): 20 of 40.
    let p = params(FailureMode::Local);
    let ok = (0..30)
        .filter(|_| {
            let d = take_g(&shared, &limits, 3, &gone, &p, now);
            assert_eq!(d.by_failure_mode(), Some(FailureMode::Local));
            matches!(d.admission, global::Admission::Bucket(x) if x.allowed)
        })
        .count();
    assert_eq!(ok, 20);
    // With a fallback share set, that share's rate (the burst floor stays 1/n): 6 s at
    // 1/4 of 40 a minute bring one token back, where 1/2 brings two.
    let p = RuleParams {
        fallback_share: Some(SHARE_ONE / 4),
        ..params(FailureMode::Local)
    };
    let burst = |fp: u64, p: &RuleParams, at: u64| {
        (0..30)
            .filter(|_| {
                let d = take_g(&shared, &limits, fp, &gone, p, at);
                matches!(d.admission, global::Admission::Bucket(x) if x.allowed)
            })
            .count()
    };
    assert_eq!(burst(4, &p, now), 20);
    assert_eq!(burst(4, &p, now + 6 * S), 1);
    assert_eq!(burst(3, &params(FailureMode::Local), now + 6 * S), 2);
}

#[test]
fn concurrent_global_takes_never_admit_more_than_the_share() {
    // Another worker's take lands between most reads and their CAS: the key at 1/2 of
    // a burst of 40 admits exactly 20, whoever's request it was.
    let limits = [Limit::new(3600, 40, 40).unwrap()];
    let now = 1_000 * S;
    let sync = SyncView {
        last_ok_sent_ns: Some(now),
        proxy_ttl_ns: 3 * S,
        n_live: 2,
    };
    let p = params(FailureMode::Local);
    let shared = MemorySharedData::with_table(1);
    let admitted = std::rc::Rc::new(Cell::new(0u32));
    let is_allowed =
        |d: global::KeyDecision| matches!(d.admission, global::Admission::Bucket(x) if x.allowed);
    for round in 0..40 {
        let a = admitted.clone();
        if round % 3 != 0 {
            shared.then_between(move |s| {
                if is_allowed(take_g(s, &limits, 77, &sync, &p, now)) {
                    a.set(a.get() + 1);
                }
            });
        }
        if is_allowed(take_g(&shared, &limits, 77, &sync, &p, now)) {
            admitted.set(admitted.get() + 1);
        }
    }
    assert!(shared.mismatches.get() > 5);
    assert_eq!(admitted.get(), 20);
    assert_eq!(read_global(&shared, 1, 77, 1).unwrap().1.admitted, 20);
}
