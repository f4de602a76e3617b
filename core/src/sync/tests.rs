use super::*;
use crate::config;
use crate::global::RuleParams;
use crate::host::memory::MemorySharedData;
use crate::protocol::KeyGrant;
use crate::report::TriggerParams;
use crate::testing::test;

const S: u64 = 1_000_000_000;
const INTERVAL: u64 = S / 2;
/// Enough sets that no key of these tests is evicted.
const SETS: u32 = 1024;

fn rules() -> Vec<Rule> {
    let cfg = config::parse(
        br#"{"service":{"cluster":"companion","token":"t","sync_interval_ms":500,"timeout_ms":100},
            "rules":[{"id":"api","match":{"path":"/api/*"},"key":["header:x-api-key"],
                      "limits":[{"window":"1s","max":20}]}]}"#,
    )
    .unwrap();
    cfg.rules
}

fn store() -> MemorySharedData {
    let shared = MemorySharedData::default();
    table::create(&shared, SETS);
    create_keys(&shared);
    shared
}

fn who(rules: &[Rule]) -> Reporter<'_> {
    Reporter {
        rules,
        sets: SETS,
        proxy_id: "p/00000001",
        zone: "az-a",
        interval_ms: 500,
    }
}

/// Synced at `now` with 3 live proxies.
fn synced(now: u64) -> SyncView {
    SyncView {
        last_ok_sent_ns: Some(now),
        proxy_ttl_ns: 3 * INTERVAL,
        n_live: 3,
    }
}

/// One request of key `fp` on rule 0, as the request path takes it.
fn hit(shared: &MemorySharedData, rules: &[Rule], fp: u64, now: u64) -> global::KeyDecision {
    let sync = synced(now);
    let p = RuleParams {
        mode: global::FailureMode::Local,
        fallback_share: None,
        trigger: TriggerParams::for_interval(INTERVAL),
    };
    let limits = &rules[0].limits;
    table::take_global(
        shared,
        limits,
        0,
        fp,
        SETS,
        now,
        || global::fresh_state(&sync, &p, now),
        |tats, state| global::decide(limits, tats, state, &sync, &p, now),
    )
    .unwrap()
    .outcome
}

/// Key `i`'s fingerprint: its set is chosen by the high half.
fn fp(i: u64) -> u64 {
    (i << 32) | i
}

fn candidate(fp: u64, reasons: u8, rejected: u32) -> Candidate {
    Candidate {
        rule: 0,
        fingerprint: fp,
        rejected,
        reasons,
    }
}

#[test]
fn the_proxy_state_round_trips_and_a_short_record_reads_as_never_synced() {
    let st = ProxyState {
        last_ok_sent_ns: 7 * S,
        n_live: 3,
        lease_ms: 600_000,
        last_sent_ns: 8 * S,
        report_cap: 250,
    };
    assert_eq!(ProxyState::decode(&st.encode()), st);
    assert_eq!(
        ProxyState::decode(&st.encode()[..28]),
        ProxyState::default()
    );
    assert_eq!(ProxyState::default().report_cap(), REPORT_ENTRIES);
}

#[test]
fn urgency_puts_refused_and_draining_keys_first_and_tracked_keys_last() {
    use crate::report::{HOT, NEW, REJECTED, RELEASE, RENEW, RETRY, TRACKED};
    assert_eq!(urgency(REJECTED | NEW), 0);
    assert_eq!(urgency(HOT | TRACKED), 0);
    assert_eq!(urgency(RENEW), 1);
    assert_eq!(urgency(TRACKED | RETRY), 1);
    assert_eq!(urgency(RELEASE), 1);
    assert_eq!(urgency(NEW), 2);
    assert_eq!(urgency(TRACKED), 3);
}

#[test]
fn a_capped_report_carries_the_most_urgent_keys_and_hands_back_the_rest() {
    let rules = rules();
    let shared = store();
    let now = 100 * S;
    // Ten new keys, one request each, then key 99 refused (its 1/3 of a burst of 20
    // is 6 requests).
    for i in 1..=10 {
        assert_eq!(hit(&shared, &rules, fp(i), now).reasons, report::NEW);
    }
    let mut refused = 0;
    for _ in 0..10 {
        let d = hit(&shared, &rules, fp(99), now);
        if d.reasons & report::REJECTED != 0 {
            refused += 1;
        }
    }
    assert!(refused > 0);
    let mut outbox: Vec<Candidate> = (1..=10).map(|i| candidate(fp(i), report::NEW, 0)).collect();
    outbox.push(candidate(fp(99), report::NEW | report::REJECTED, refused));
    let (pending, leftover) = build_report(
        &shared,
        &who(&rules),
        outbox,
        &TrackedKeys::default(),
        None,
        4,
        now,
    );
    assert_eq!(pending.keys.len(), 4);
    assert_eq!(
        pending.keys[0].fingerprint,
        fp(99),
        "the refused key goes first"
    );
    assert_eq!(pending.keys[0].rejected, refused);
    assert_eq!(pending.report.entries[0].key, key_hex(fp(99)));
    // The outbox's order among equals: keys 1, 2, 3 went, 4..=10 wait.
    let sent: Vec<u64> = pending.keys[1..].iter().map(|k| k.fingerprint).collect();
    assert_eq!(sent, [fp(1), fp(2), fp(3)]);
    let waiting: Vec<u64> = leftover.iter().map(|c| c.fingerprint).collect();
    assert_eq!(waiting, (4..=10).map(fp).collect::<Vec<u64>>());
    assert!(leftover.iter().all(|c| c.reasons == report::NEW));
}

#[test]
fn the_report_cap_halves_on_failures_down_to_its_floor_and_doubles_on_answers() {
    let rules = rules();
    let shared = store();
    let now = 100 * S;
    for i in 1..=300 {
        hit(&shared, &rules, fp(i), now);
    }
    let outbox: Vec<Candidate> = (1..=300)
        .map(|i| candidate(fp(i), report::NEW, 0))
        .collect();
    let cap = read_proxy(&shared).report_cap();
    assert_eq!(cap, REPORT_ENTRIES);
    let (pending, leftover) = build_report(
        &shared,
        &who(&rules),
        outbox,
        &TrackedKeys::default(),
        None,
        cap,
        now,
    );
    assert_eq!((pending.keys.len(), leftover.len()), (300, 0));

    // It failed: the next carries half of what this one did, and so on down to the floor.
    assert_eq!(requeue(&shared, &pending), 0);
    assert_eq!(read_proxy(&shared).report_cap(), 150);
    let outbox = take_outbox(&shared);
    assert_eq!(outbox.len(), 300);
    assert!(outbox.iter().all(|c| c.reasons & report::RETRY != 0));
    let (pending, leftover) = build_report(
        &shared,
        &who(&rules),
        outbox,
        &TrackedKeys::default(),
        None,
        read_proxy(&shared).report_cap(),
        now,
    );
    assert_eq!((pending.keys.len(), leftover.len()), (150, 150));
    requeue(&shared, &pending);
    assert_eq!(read_proxy(&shared).report_cap(), 75);
    requeue(&shared, &pending);
    assert_eq!(read_proxy(&shared).report_cap(), MIN_REPORT_ENTRIES);
    requeue(&shared, &pending);
    assert_eq!(read_proxy(&shared).report_cap(), MIN_REPORT_ENTRIES);

    // A failed heartbeat leaves it; each valid answer doubles it, up to the maximum.
    let heartbeat = Pending {
        report: SyncReport {
            proxy_id: "p/00000001".into(),
            zone: "az-a".into(),
            interval_ms: 500,
            entries: Vec::new(),
        },
        keys: Vec::new(),
        sent_ns: now,
    };
    requeue(&shared, &heartbeat);
    assert_eq!(read_proxy(&shared).report_cap(), MIN_REPORT_ENTRIES);
    let answer = SyncAnswer {
        proxies: 3,
        lease_ms: 600_000,
        degraded: false,
        entries: Vec::new(),
    };
    let mut caps = Vec::new();
    for _ in 0..7 {
        apply_answer(
            &shared,
            &who(&rules),
            &heartbeat,
            &answer,
            &mut TrackedKeys::default(),
            &TrackedParams::default(),
            now,
        );
        caps.push(read_proxy(&shared).report_cap());
    }
    assert_eq!(caps, [128, 256, 512, 1024, 2000, 2000, 2000]);
}

#[test]
fn an_answer_applies_its_grants_and_subtracts_what_was_reported() {
    let rules = rules();
    let shared = store();
    let now = 100 * S;
    for _ in 0..3 {
        hit(&shared, &rules, fp(5), now);
    }
    let (pending, _) = build_report(
        &shared,
        &who(&rules),
        vec![candidate(fp(5), report::NEW, 0)],
        &TrackedKeys::default(),
        None,
        REPORT_ENTRIES,
        now,
    );
    assert_eq!(pending.report.entries[0].admitted, 3);
    // One more request while the report is in flight.
    hit(&shared, &rules, fp(5), now + 1_000_000);
    let answer = SyncAnswer {
        proxies: 3,
        lease_ms: 600_000,
        degraded: false,
        entries: vec![KeyGrant {
            shares: vec![SHARE_ONE / 2],
            pending: false,
            used: Vec::new(),
        }],
    };
    let mut tracked = TrackedKeys::default();
    let applied = apply_answer(
        &shared,
        &who(&rules),
        &pending,
        &answer,
        &mut tracked,
        &TrackedParams::default(),
        now + 2_000_000,
    );
    assert_eq!((applied.grants, applied.missing), (1, 0));
    let (_, state) = table::read_global(&shared, 1, fp(5), SETS).unwrap();
    assert_eq!(state.shares[0], SHARE_ONE / 2);
    assert_eq!(state.expiry_ns, now + 600 * S);
    assert_eq!(
        state.admitted, 1,
        "the request in flight is left for the next report"
    );
    // Half the limit is above the quiet level: the key is tracked.
    assert_eq!(tracked.len(), 1);
    let st = read_proxy(&shared);
    assert_eq!((st.n_live, st.last_ok_sent_ns), (3, now));
}

#[test]
fn one_vm_leads_until_its_lease_runs_out() {
    let shared = store();
    let now = 100 * S;
    assert!(hold_lease(&shared, 1, now, S));
    assert!(!hold_lease(&shared, 2, now + S / 2, S));
    assert!(hold_lease(&shared, 1, now + S / 2, S), "the leader renews");
    assert!(!hold_lease(&shared, 2, now + S, S));
    assert!(
        hold_lease(&shared, 2, now + 2 * S, S),
        "an expired lease is taken"
    );
    assert!(!hold_lease(&shared, 1, now + 2 * S, S));
}

#[test]
fn the_outbox_merges_by_key_and_drops_beyond_its_capacity() {
    let shared = store();
    let dropped = merge_into_outbox(
        &shared,
        &[candidate(1, report::NEW, 0), candidate(2, report::NEW, 0)],
        3,
    );
    assert_eq!(dropped, 0);
    let dropped = merge_into_outbox(
        &shared,
        &[
            candidate(1, report::REJECTED, 4),
            candidate(3, report::NEW, 0),
            candidate(4, report::NEW, 0),
        ],
        3,
    );
    assert_eq!(dropped, 1);
    let out = take_outbox(&shared);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], candidate(1, report::NEW | report::REJECTED, 4));
    assert!(take_outbox(&shared).is_empty());
}

#[test]
fn the_start_nonce_is_the_first_vms() {
    let shared = store();
    assert_eq!(nonce(&shared, 7), 7);
    assert_eq!(nonce(&shared, 9), 7);
    assert_eq!(wire_proxy_id("envoy-a", 7), "envoy-a/00000007");
}

#[test]
fn tracked_keys_beyond_the_cap_take_turns_instead_of_starving() {
    let rules = rules();
    let shared = store();
    let now = 100 * S;
    let params = TrackedParams::default();
    let mut tracked = TrackedKeys::default();
    for i in 1..=10 {
        tracked.update(0, fp(i), &[SHARE_ONE / 2], false, params.quiet(3), &params);
    }
    // Each report carries 4 of the 10 (none has an entry: each goes as a release), from
    // where the last one stopped, round and round.
    let mut carried = Vec::new();
    for _ in 0..3 {
        let (pending, leftover) = build_report(
            &shared,
            &who(&rules),
            Vec::new(),
            &tracked,
            load_tracked_cursor(&shared),
            4,
            now,
        );
        assert!(leftover.is_empty(), "tracked keys are not handed back");
        save_tracked_cursor(&shared, &pending);
        carried.push(
            pending
                .keys
                .iter()
                .map(|k| k.fingerprint)
                .collect::<Vec<u64>>(),
        );
    }
    let ids = |v: &[u64]| v.iter().map(|f| f & 0xffff_ffff).collect::<Vec<u64>>();
    assert_eq!(ids(&carried[0]), [1, 2, 3, 4]);
    assert_eq!(ids(&carried[1]), [5, 6, 7, 8]);
    assert_eq!(ids(&carried[2]), [9, 10, 1, 2]);

    // A report that carries no plain tracked key leaves the cursor where it was; a bad
    // record reads as none (from the first key again).
    let heartbeat = build_report(
        &shared,
        &who(&rules),
        Vec::new(),
        &TrackedKeys::default(),
        None,
        4,
        now,
    )
    .0;
    save_tracked_cursor(&shared, &heartbeat);
    assert_eq!(load_tracked_cursor(&shared), Some((0, fp(2))));
    shared.set(TRACKED_CURSOR_KEY, b"short", None).unwrap();
    assert_eq!(load_tracked_cursor(&shared), None);
}
