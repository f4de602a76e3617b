use super::*;
use crate::config::Limit;
use crate::gcra;
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
            evicts_active: true
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
            evicts_active: false
        }
    );
    assert_eq!(
        find(&v, 99, &mut tats, later),
        Place::Replace {
            offset: 0,
            len: 17,
            evicts_active: false
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

/// A model of the shared-data table (what Envoy holds), driven exactly as the filter
/// drives it, to check the memory bound and the eviction behaviour with many clients.
struct Table {
    values: Vec<Vec<u8>>,
    evictions: u64,
}

impl Table {
    fn new(sets: u32) -> Self {
        Table {
            values: vec![Vec::new(); sets as usize],
            evictions: 0,
        }
    }

    fn take(&mut self, limits: &[Limit], fp: u64, now: u64) -> bool {
        let set = set_of(fp, self.values.len() as u32) as usize;
        let mut tats = [0u64; 8];
        let state = &mut tats[..limits.len()];
        let place = find(&self.values[set], fp, state, now);
        if !matches!(place, Place::Found { .. }) {
            state.fill(0);
        }
        let d = gcra::check(limits, state, now, 1);
        if d.changed {
            if let Place::Replace {
                evicts_active: true,
                ..
            } = place
            {
                self.evictions += 1;
            }
            let mut out = [0u8; WRITE_MAX];
            self.values[set] = write(&self.values[set], place, fp, state, &mut out).to_vec();
        }
        d.allowed
    }
}

#[test]
fn memory_is_bounded_whatever_the_number_of_clients() {
    // 1M distinct clients through a 512-set table: the table never grows and no value
    // exceeds SET_MAX.
    let limits = [
        Limit::new(1, 10, 10).unwrap(),
        Limit::new(60, 100, 100).unwrap(),
    ];
    let mut t = Table::new(512);
    for i in 0..1_000_000u64 {
        let fp = crate::hash::hash64(9, &i.to_le_bytes());
        assert!(t.take(&limits, fp, 1_000 * S + i * 1_000));
    }
    assert_eq!(t.values.len(), 512);
    assert!(t.values.iter().all(|v| v.len() <= SET_MAX));
    assert!(
        t.values.iter().all(|v| v.len() == WAYS * 25),
        "every set full of 2-limit entries"
    );
}

#[test]
fn clients_up_to_max_clients_keep_exact_counts() {
    // max_clients = 2048 active clients, each sending 8 requests against a 5/h limit,
    // interleaved: every client gets exactly 5, nothing is evicted.
    let limits = [Limit::new(3600, 5, 5).unwrap()];
    let mut t = Table::new(sets_for(2048));
    let now = 1_000 * S;
    let mut admitted = vec![0u32; 2048];
    for round in 0..8 {
        for (c, a) in admitted.iter_mut().enumerate() {
            let fp = crate::hash::hash64(3, format!("client-{c}").as_bytes());
            if t.take(&limits, fp, now + round) {
                *a += 1;
            }
        }
    }
    assert_eq!(t.evictions, 0);
    assert!(admitted.iter().all(|&a| a == 5));
}

#[test]
fn overload_degrades_gracefully() {
    // 4x more active clients than max_clients: evictions happen (and are counted), no
    // client is admitted less than an exact limiter would, and each eviction costs at
    // most one burst of extra admissions.
    let limits = [Limit::new(3600, 3, 3).unwrap()];
    let mut t = Table::new(sets_for(256));
    let now = 1_000 * S;
    let mut admitted = 0u64;
    let clients = 1024u64;
    for round in 0..10 {
        for c in 0..clients {
            let fp = crate::hash::hash64(5, &c.to_le_bytes());
            admitted += t.take(&limits, fp, now + round * 1_000_000 + c) as u64;
        }
    }
    assert!(t.evictions > 0);
    assert!(admitted >= clients * 3);
    assert!(admitted <= clients * 3 + t.evictions * 3);
}
