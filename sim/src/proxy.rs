//! One simulated proxy: the filter's request path for a global key and its leader's
//! report and grant handling, all through `meshlimit-core`.

use std::collections::{HashMap, HashSet};

use meshlimit_core::gcra::SHARE_ONE;
use meshlimit_core::global::{self, FailureMode, KeyState, SyncView};
use meshlimit_core::report::{self, CandidateSet, TrackedKeys};

use crate::world::Config;

const TRAILER: usize = global::trailer_len(1);

pub(crate) struct Entry {
    pub(crate) tats: [u64; 1],
    pub(crate) trailer: [u8; TRAILER],
}

impl Entry {
    fn state(&self) -> KeyState {
        KeyState::decode(&self.trailer, 1).expect("the sim writes valid trailers")
    }
}

pub(crate) struct Proxy {
    pub(crate) running: bool,
    /// Bumped when the arrival rate changes: older arrival events are stale.
    pub(crate) arrivals: u32,
    /// Bumped when the proxy starts or dies: older ticks and answers are stale.
    pub(crate) life: u32,
    pub(crate) rate: f64,
    pub(crate) table: HashMap<u32, Entry>,
    pub(crate) sync: SyncView,
    pub(crate) candidates: CandidateSet,
    pub(crate) tracked: TrackedKeys,
    pub(crate) in_flight: bool,
    pub(crate) ticks: u64,
}

pub(crate) struct SentReport {
    pub(crate) proxy: u16,
    pub(crate) life: u32,
    pub(crate) sent_ns: u64,
    /// (client, admitted reported, rejected reported, span in ms they cover)
    pub(crate) entries: Vec<(u32, u32, u32, u32)>,
}

pub(crate) struct Answer {
    pub(crate) proxy: u16,
    pub(crate) life: u32,
    pub(crate) sent_ns: u64,
    pub(crate) n_live: u32,
    /// (client, grant, pending, admitted reported)
    pub(crate) grants: Vec<(u32, u32, bool, u32)>,
}

fn scale_floor(floor: u32, scale: u32) -> u32 {
    (u64::from(floor) * u64::from(scale)).min(u64::from(SHARE_ONE)) as u32
}

/// One request of `client` at proxy `px`: the filter's request path for a global key.
pub(crate) fn request(cfg: &Config, px: &mut Proxy, client: u32, now: u64) -> bool {
    let limits = [cfg.limit];
    let sync = px.sync;
    let choose = |state: &KeyState| {
        global::choose_share(state, &sync, FailureMode::Local, cfg.fallback_share, now)
    };
    let entry = px.table.entry(client).or_insert_with(|| {
        // A new entry is full at the share it is about to run at.
        let mut trailer = [0u8; TRAILER];
        let share = choose(&KeyState::new(0, now)).share().unwrap_or(0);
        KeyState::new(share, now).encode(1, &mut trailer);
        Entry { tats: [0], trailer }
    });
    let mut state = entry.state();
    let source = choose(&state);
    let floor = scale_floor(global::burst_floor(&px.sync, source), cfg.floor_scale);
    let admission = global::admit(&limits, &mut entry.tats, &mut state, source, floor, now, 1);
    let allowed = match admission {
        global::Admission::Bucket(d) => {
            if d.changed {
                state.encode(1, &mut entry.trailer);
            }
            d.allowed
        }
        global::Admission::Open => true,
        global::Admission::Closed => false,
    };
    let why = report::reasons(
        &limits,
        &entry.tats,
        &state,
        source,
        admission,
        floor,
        now,
        &cfg.trigger,
    );
    px.candidates
        .add(0, u64::from(client), why, u32::from(!allowed));
    allowed
}

/// The leader's report: the candidates, plus tracked keys that are due.
pub(crate) fn build_report(cfg: &Config, px: &mut Proxy, p: u16, now: u64) -> SentReport {
    let mut keys: Vec<(u32, u32)> = Vec::new();
    (px.candidates).drain(|c| keys.push((c.fingerprint as u32, c.rejected)));
    let listed: HashSet<u32> = keys.iter().map(|k| k.0).collect();
    for (_, fp, pending) in px.tracked.iter() {
        let client = fp as u32;
        if listed.contains(&client) {
            continue;
        }
        let state = px.table.get(&client).map(Entry::state);
        if (pending && cfg.report_pending) || report::tracked_due(state.as_ref(), now) {
            keys.push((client, 0));
        }
    }
    let entries = keys
        .into_iter()
        .map(|(client, rejected)| {
            let state = px.table.get(&client).map(Entry::state);
            let admitted = state.map_or(0, |s| s.admitted);
            let span = state.map_or(1, |s| s.span_ms(now));
            (client, admitted, rejected, span)
        })
        .collect();
    SentReport {
        proxy: p,
        life: px.life,
        sent_ns: now,
        entries,
    }
}

/// The leader applies an answer: proxy-level state, then each key's grant.
pub(crate) fn apply_answer(cfg: &Config, px: &mut Proxy, a: &Answer, now: u64) {
    px.in_flight = false;
    px.sync.last_ok_sent_ns = Some(a.sent_ns);
    px.sync.n_live = a.n_live.max(1);
    let floor = scale_floor(SHARE_ONE / px.sync.n_live, cfg.floor_scale);
    let limits = [cfg.limit];
    let expiry = a.sent_ns + cfg.shares.lease_ms * 1_000_000;
    for &(client, grant, pending, reported) in &a.grants {
        let quiet = cfg.tracked.quiet(px.sync.n_live);
        (px.tracked).update(0, u64::from(client), &[grant], pending, quiet, &cfg.tracked);
        let Some(entry) = px.table.get_mut(&client) else {
            continue;
        };
        let mut state = entry.state();
        let sent_ms = report::clock_ms(a.sent_ns);
        global::apply_grant(
            &limits,
            &mut entry.tats,
            &mut state,
            &[grant],
            expiry,
            reported,
            sent_ms,
            floor,
            now,
        );
        state.encode(1, &mut entry.trailer);
    }
}
