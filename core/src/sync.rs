//! The proxy's side of the sync with the companion (global scope), off the request
//! path: what the VMs of one Envoy share in shared data to send **one report per proxy
//! per interval**, how that report is built from the keys worth reporting, and how its
//! answer is applied. Everything here goes through [`SharedData`]; the filter adds only
//! the clock, the tick and the callout (`src/sync.rs` of `meshlimit-filter`).
//!
//! Shared-data keys (besides the bucket table), each created empty once
//! ([`create_keys`]) so that every later write is an exact compare-and-swap:
//!
//! | key | holds |
//! |---|---|
//! | [`OUTBOX_KEY`] | candidates every VM merged on its tick, for the next report (bounded: [`OUTBOX_CAPACITY`]) |
//! | [`LEADER_KEY`] | the VM that sends the reports, and until when (a lease renewed on its ticks) |
//! | [`PROXY_KEY`] | the proxy's sync state: when the last successful report was sent, live proxies, the lease, when the last report was sent |
//! | [`TRACKED_KEY`] | the keys the leader re-reports every interval ([`TrackedKeys`]), so a new leader carries on |
//! | [`TRACKED_CURSOR_KEY`] | the last tracked key the last report carried: the next one goes on from there |
//! | [`NONCE_KEY`] | this Envoy's start nonce, appended to its `proxy_id` on the wire |
//!
//! Each VM on its tick: merges its [`CandidateSet`] into the outbox
//! ([`post_candidates`]), refreshes its [`SyncView`] from the proxy state
//! ([`read_proxy`]), and tries to hold the lease ([`hold_lease`]). The leader, once per
//! interval, takes the outbox, adds its tracked keys and builds a [`SyncReport`]
//! ([`build_report`]); on a valid answer it applies each grant to its key's entry
//! ([`apply_answer`]); on any failure it puts the keys back into the outbox
//! ([`requeue`]), and since nothing was subtracted, their counts go in the next report.

use std::collections::{HashMap, HashSet};

use crate::config::{Rule, Scope};
use crate::gcra::SHARE_ONE;
use crate::global::{self, SyncView};
use crate::host::{SharedData, SharedDataError};
use crate::protocol::{LimitSpec, ReportedKey, SyncAnswer, SyncReport, MAX_HITS, MAX_SYNC_ENTRIES};
use crate::report::{self, Candidate, CandidateSet, TrackedKeys, TrackedParams};
use crate::table;

pub const OUTBOX_KEY: &str = "ml-sync:outbox";
pub const LEADER_KEY: &str = "ml-sync:leader";
pub const PROXY_KEY: &str = "ml-sync:proxy";
pub const TRACKED_KEY: &str = "ml-sync:tracked";
/// Where the next report's tracked keys start ([`load_tracked_cursor`]).
pub const TRACKED_CURSOR_KEY: &str = "ml-sync:tracked-cursor";
pub const NONCE_KEY: &str = "ml-sync:nonce";
const KEYS: [&str; 5] = [OUTBOX_KEY, LEADER_KEY, PROXY_KEY, TRACKED_KEY, NONCE_KEY];

/// Most candidates the outbox holds (one report's worth); beyond it new keys are
/// dropped and counted (`meshlimit_report_dropped_total`).
pub const OUTBOX_CAPACITY: usize = MAX_SYNC_ENTRIES;
/// Most keys one report carries; the rest wait in the outbox for the next interval.
/// A burst of new keys (thousands of clients seen for the first time) then drains over
/// a few intervals in reports the companion answers well within the report deadline,
/// instead of one report too large to answer in time, failing, and coming back larger.
pub const REPORT_ENTRIES: usize = 2_000;
/// Fewest keys a report may carry however often reports fail: [`ProxyState::report_cap`]
/// halves on every failure down to this, and doubles on every success back to
/// [`REPORT_ENTRIES`].
pub const MIN_REPORT_ENTRIES: usize = 64;
/// Attempts of one read-modify-write before giving up (only under extreme contention).
const MAX_ATTEMPTS: usize = 64;

/// Creates the sync keys, empty, unless they exist (every VM calls this at configure;
/// two VMs creating one key at once both write it empty, which loses nothing).
pub fn create_keys<S: SharedData + ?Sized>(shared: &S) {
    for key in KEYS {
        if let Ok((None, None)) = shared.get(key) {
            let _ = shared.set(key, &[], None);
        }
    }
}

/// Why a read-modify-write of a sync key did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contended;

/// Read-modify-write of one key, exact across VMs (get, decide, CAS; again on a CAS
/// mismatch). `change` returns the new value (`None`: keep it) and a result.
fn cas_update<S, R>(
    shared: &S,
    key: &str,
    mut change: impl FnMut(&[u8]) -> (Option<Vec<u8>>, R),
) -> Result<R, Contended>
where
    S: SharedData + ?Sized,
{
    for _ in 0..MAX_ATTEMPTS {
        let (value, cas) = shared.get(key).map_err(|_| Contended)?;
        let (new, out) = change(value.as_deref().unwrap_or_default());
        let Some(new) = new else {
            return Ok(out);
        };
        match shared.set(key, &new, cas) {
            Ok(()) => return Ok(out),
            Err(SharedDataError::CasMismatch) => continue,
            Err(SharedDataError::Other) => return Err(Contended),
        }
    }
    Err(Contended)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

// --- the proxy's sync state ------------------------------------------------------

/// What every VM of the proxy needs to know about the sync, in [`PROXY_KEY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyState {
    /// When the last report that got a valid answer was sent (0: never).
    pub last_ok_sent_ns: u64,
    /// Live proxies, as that answer said.
    pub n_live: u32,
    /// How long its grants last.
    pub lease_ms: u64,
    /// When the last report was sent, answered or not: the next is due an interval
    /// later, whichever VM leads by then.
    pub last_sent_ns: u64,
    /// Most keys the next report carries (0: never set, [`REPORT_ENTRIES`]). Additive
    /// increase would take too long to come back after an outage, so both ways are
    /// multiplicative: a failed report halves it (from what that report carried), a
    /// valid answer doubles it. A companion that cannot answer a burst of new keys in
    /// time (its store is slow, the machine is busy) is then sent reports it can answer,
    /// and the backlog drains over a few intervals, most urgent keys first
    /// ([`urgency`]), instead of every report failing at the deadline.
    pub report_cap: u32,
}

impl ProxyState {
    const LEN: usize = 32;

    /// Most keys the next report carries.
    pub fn report_cap(&self) -> usize {
        match self.report_cap {
            0 => REPORT_ENTRIES,
            c => (c as usize).clamp(MIN_REPORT_ENTRIES, REPORT_ENTRIES),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.last_ok_sent_ns.to_le_bytes());
        out.extend_from_slice(&self.n_live.to_le_bytes());
        out.extend_from_slice(&self.lease_ms.to_le_bytes());
        out.extend_from_slice(&self.last_sent_ns.to_le_bytes());
        out.extend_from_slice(&self.report_cap.to_le_bytes());
        out
    }

    fn decode(b: &[u8]) -> ProxyState {
        if b.len() != Self::LEN {
            return ProxyState::default();
        }
        ProxyState {
            last_ok_sent_ns: u64_at(b, 0),
            n_live: u32_at(b, 8),
            lease_ms: u64_at(b, 12),
            last_sent_ns: u64_at(b, 20),
            report_cap: u32_at(b, 28),
        }
    }

    /// The view the request path decides with (`proxy_ttl`: the companion counts this
    /// proxy live for three intervals after a report).
    pub fn view(&self, interval_ns: u64) -> SyncView {
        SyncView {
            last_ok_sent_ns: (self.last_ok_sent_ns > 0).then_some(self.last_ok_sent_ns),
            proxy_ttl_ns: 3 * interval_ns,
            n_live: self.n_live,
        }
    }

    /// A report is due.
    pub fn due(&self, now: u64, interval_ns: u64) -> bool {
        now >= self.last_sent_ns.saturating_add(interval_ns)
    }
}

/// The proxy's sync state (default when unreadable: never synced).
pub fn read_proxy<S: SharedData + ?Sized>(shared: &S) -> ProxyState {
    match shared.get(PROXY_KEY) {
        Ok((Some(v), _)) => ProxyState::decode(&v),
        _ => ProxyState::default(),
    }
}

fn update_proxy<S: SharedData + ?Sized>(shared: &S, f: impl Fn(&mut ProxyState)) -> ProxyState {
    let updated = cas_update(shared, PROXY_KEY, |v| {
        let mut st = ProxyState::decode(v);
        f(&mut st);
        (Some(st.encode()), st)
    });
    updated.unwrap_or_else(|_| read_proxy(shared))
}

/// Notes that a report was sent at `now`.
pub fn record_sent<S: SharedData + ?Sized>(shared: &S, now: u64) {
    update_proxy(shared, |st| st.last_sent_ns = st.last_sent_ns.max(now));
}

// --- leader and nonce ------------------------------------------------------------

/// Whether VM `vm` holds the lease to send reports after this call: it renews its own
/// lease, takes an expired one, and leaves another VM's alone. One VM per proxy sends,
/// so the proxy reports once per interval whatever its number of VMs (every worker
/// and the main-thread VMs tick).
pub fn hold_lease<S: SharedData + ?Sized>(shared: &S, vm: u64, now: u64, lease_ns: u64) -> bool {
    let held = cas_update(shared, LEADER_KEY, |v| {
        let (holder, until) = if v.len() == 16 {
            (u64_at(v, 0), u64_at(v, 8))
        } else {
            (0, 0)
        };
        if holder == vm || until <= now {
            let mut new = Vec::with_capacity(16);
            new.extend_from_slice(&vm.to_le_bytes());
            new.extend_from_slice(&now.saturating_add(lease_ns).to_le_bytes());
            (Some(new), true)
        } else {
            (None, false)
        }
    });
    held.unwrap_or(false)
}

/// This Envoy's start nonce: the first VM to ask stores `fresh`, the others read it.
/// Shared data lives as long as the Envoy process, so a restarted Envoy (whose table is
/// empty) reports as a new proxy and its old records die with the old id.
pub fn nonce<S: SharedData + ?Sized>(shared: &S, fresh: u32) -> u32 {
    let n = cas_update(shared, NONCE_KEY, |v| {
        if v.len() == 4 {
            (None, u32_at(v, 0))
        } else {
            (Some(fresh.to_le_bytes().to_vec()), fresh)
        }
    });
    n.unwrap_or(fresh)
}

/// The id on the wire: the configured one and the start nonce.
pub fn wire_proxy_id(proxy_id: &str, nonce: u32) -> String {
    format!("{proxy_id}/{nonce:08x}")
}

// --- the outbox ------------------------------------------------------------------

const RECORD: usize = 15;

fn decode_candidates(v: &[u8]) -> Vec<Candidate> {
    (v.chunks_exact(RECORD))
        .map(|r| Candidate {
            rule: u16::from_le_bytes([r[0], r[1]]),
            fingerprint: u64_at(r, 2),
            rejected: u32_at(r, 10),
            reasons: r[14],
        })
        .filter(|c| c.reasons != 0)
        .collect()
}

fn encode_candidates(list: &[Candidate]) -> Vec<u8> {
    let mut out = Vec::with_capacity(list.len() * RECORD);
    for c in list {
        out.extend_from_slice(&c.rule.to_le_bytes());
        out.extend_from_slice(&c.fingerprint.to_le_bytes());
        out.extend_from_slice(&c.rejected.to_le_bytes());
        out.push(c.reasons);
    }
    out
}

/// Merges `candidates` into the outbox (dedup by rule and key: flags joined, rejected
/// counts added), at most `capacity` keys in all. Returns how many were dropped (the
/// outbox was full, or could not be written).
pub fn merge_into_outbox<S: SharedData + ?Sized>(
    shared: &S,
    candidates: &[Candidate],
    capacity: usize,
) -> u64 {
    if candidates.is_empty() {
        return 0;
    }
    let merged = cas_update(shared, OUTBOX_KEY, |v| {
        let mut list = decode_candidates(v);
        let mut at: HashMap<(u16, u64), usize> = (list.iter().enumerate())
            .map(|(i, c)| ((c.rule, c.fingerprint), i))
            .collect();
        let mut dropped = 0u64;
        for c in candidates {
            match at.get(&(c.rule, c.fingerprint)) {
                Some(&i) => {
                    list[i].reasons |= c.reasons;
                    list[i].rejected = list[i].rejected.saturating_add(c.rejected);
                }
                None if list.len() < capacity => {
                    at.insert((c.rule, c.fingerprint), list.len());
                    list.push(*c);
                }
                None => dropped += 1,
            }
        }
        (Some(encode_candidates(&list)), dropped)
    });
    merged.unwrap_or(candidates.len() as u64)
}

/// Empties a VM's candidate set into the outbox; returns the keys dropped.
pub fn post_candidates<S: SharedData + ?Sized>(shared: &S, set: &mut CandidateSet) -> u64 {
    if set.is_empty() {
        return 0;
    }
    let mut mine = Vec::with_capacity(set.len());
    set.drain(|c| mine.push(c));
    merge_into_outbox(shared, &mine, OUTBOX_CAPACITY)
}

/// Takes everything in the outbox, leaving it empty.
pub fn take_outbox<S: SharedData + ?Sized>(shared: &S) -> Vec<Candidate> {
    let taken = cas_update(shared, OUTBOX_KEY, |v| {
        if v.is_empty() {
            (None, Vec::new())
        } else {
            (Some(Vec::new()), decode_candidates(v))
        }
    });
    taken.unwrap_or_default()
}

// --- tracked keys ----------------------------------------------------------------

/// The tracked keys the last leader saved.
pub fn load_tracked<S: SharedData + ?Sized>(shared: &S, p: &TrackedParams) -> TrackedKeys {
    match shared.get(TRACKED_KEY) {
        Ok((Some(v), _)) => TrackedKeys::decode(&v, p.capacity),
        _ => TrackedKeys::default(),
    }
}

/// Saves the tracked keys for whichever VM leads next.
pub fn save_tracked<S: SharedData + ?Sized>(shared: &S, tracked: &TrackedKeys) {
    let _ = shared.set(TRACKED_KEY, &tracked.encode(), None);
}

/// The last tracked key a report carried (`rule (2) ‖ fingerprint (8)`, little-endian),
/// where the next report's tracked keys start ([`TrackedKeys::iter_after`]); none before
/// the first report, or after a bad record (it then starts from the first key).
pub fn load_tracked_cursor<S: SharedData + ?Sized>(shared: &S) -> Option<(u16, u64)> {
    let Ok((Some(v), _)) = shared.get(TRACKED_CURSOR_KEY) else {
        return None;
    };
    let v: &[u8; 10] = v.as_slice().try_into().ok()?;
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&v[2..]);
    Some((u16::from_le_bytes([v[0], v[1]]), u64::from_le_bytes(fp)))
}

/// Records where the tracked keys of `pending` ended (the last plain tracked key it
/// carries; a pending one is sent every interval anyway), for the next report; nothing
/// if it carries none.
pub fn save_tracked_cursor<S: SharedData + ?Sized>(shared: &S, pending: &Pending) {
    let plain_tracked =
        |k: &&SentKey| k.reasons & report::TRACKED != 0 && k.reasons & report::RETRY == 0;
    if let Some(last) = pending.keys.iter().rfind(plain_tracked) {
        let mut v = [0u8; 10];
        v[..2].copy_from_slice(&last.rule.to_le_bytes());
        v[2..].copy_from_slice(&last.fingerprint.to_le_bytes());
        let _ = shared.set(TRACKED_CURSOR_KEY, &v, None);
    }
}

// --- the report and its answer ---------------------------------------------------

/// One key of a report as the leader sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentKey {
    pub rule: u16,
    pub fingerprint: u64,
    /// The count reported (subtracted from the entry when the answer is applied).
    pub admitted: u32,
    pub rejected: u32,
    /// Why it was reported (the candidate's flags, [`report::TRACKED`] for a tracked key).
    pub reasons: u8,
}

/// A report on its way: what was sent, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub report: SyncReport,
    /// Same order as `report.entries`.
    pub keys: Vec<SentKey>,
    pub sent_ns: u64,
}

/// Who is reporting.
#[derive(Debug, Clone, Copy)]
pub struct Reporter<'a> {
    pub rules: &'a [Rule],
    pub sets: u32,
    /// The id on the wire ([`wire_proxy_id`]).
    pub proxy_id: &'a str,
    pub zone: &'a str,
    pub interval_ms: u64,
}

/// A fingerprint as the wire writes it: 16 lower-case hex digits.
pub fn key_hex(fingerprint: u64) -> String {
    format!("{fingerprint:016x}")
}

/// How soon a key must be reported (0 first), from why: keys refused or draining
/// their share first (the ones whose share limits what a client gets), then keys
/// waiting for the rest of their target or a renewal, or releasing a share, then new
/// keys (they run at `1/n` meanwhile), then tracked keys (their share only returns to
/// the pool). When a report cannot carry everything, the least urgent wait.
pub fn urgency(reasons: u8) -> u8 {
    if reasons & (report::REJECTED | report::HOT) != 0 {
        0
    } else if reasons & (report::RETRY | report::RENEW | report::RELEASE) != 0 {
        1
    } else if reasons & report::NEW != 0 {
        2
    } else {
        3
    }
}

/// The report of this interval: every key of `outbox` (deduplicated) and every tracked
/// key that is due, each with what its entry counted since its last report (one get
/// per key). A key whose entry is gone but which held a share (an evicted grant, a
/// tracked key) is reported as a release. At most `cap` keys (see
/// [`ProxyState::report_cap`]), the most urgent first ([`urgency`]); the rest of the
/// outbox is handed back for the next report. Tracked keys come in their order after
/// `tracked_after` ([`load_tracked_cursor`]: where the last report's ended), so a
/// tracked set larger than the cap is carried round in turn. An empty report is the
/// heartbeat.
pub fn build_report<S: SharedData + ?Sized>(
    shared: &S,
    who: &Reporter<'_>,
    outbox: Vec<Candidate>,
    tracked: &TrackedKeys,
    tracked_after: Option<(u16, u64)>,
    cap: usize,
    now: u64,
) -> (Pending, Vec<Candidate>) {
    let mut entries = Vec::new();
    let mut keys = Vec::new();
    let mut listed: HashSet<(u16, u64)> = HashSet::new();
    let mut leftover = Vec::new();
    let tracked_keys = (tracked.iter_after(tracked_after)).map(|(rule, fingerprint, pending)| {
        let reasons = report::TRACKED | if pending { report::RETRY } else { 0 };
        Candidate {
            rule,
            fingerprint,
            rejected: 0,
            reasons,
        }
    });
    let mut all: Vec<(bool, Candidate)> = (outbox.into_iter().map(|c| (true, c)))
        .chain(tracked_keys.map(|c| (false, c)))
        .collect();
    // Stable: among equals, the outbox's order (first seen first), then the tracked.
    all.sort_by_key(|(_, c)| urgency(c.reasons));
    for (from_outbox, c) in all {
        let Some(rule) = who.rules.get(usize::from(c.rule)) else {
            continue;
        };
        if rule.scope != Scope::Global || !listed.insert((c.rule, c.fingerprint)) {
            continue;
        }
        let k = rule.limits.len();
        let entry = table::read_global(shared, k, c.fingerprint, who.sets);
        let state = entry.map(|(_, s)| s);
        if !from_outbox {
            // A tracked key: every interval while its grant lasts, again while pending
            // (`RETRY` here), once more when its entry is gone.
            let pending = c.reasons & report::RETRY != 0;
            if !pending && !report::tracked_due(state.as_ref(), now) {
                continue;
            }
        }
        let release = state.is_none() && c.reasons & (report::RELEASE | report::TRACKED) != 0;
        if state.is_none() && !release && c.rejected == 0 {
            // Nothing known about it any more, and nothing to tell.
            continue;
        }
        if entries.len() >= cap {
            if from_outbox {
                leftover.push(c);
            }
            continue;
        }
        let admitted = state.map_or(0, |s| s.admitted.min(MAX_HITS as u32));
        let rejected = c.rejected.min(MAX_HITS as u32);
        entries.push(ReportedKey {
            rule: rule.id.clone(),
            key: key_hex(c.fingerprint),
            limits: rule.limits.iter().map(LimitSpec::from).collect(),
            admitted: u64::from(admitted),
            rejected: u64::from(rejected),
            span_ms: u64::from(state.map_or(1, |s| s.span_ms(now))),
            release,
        });
        keys.push(SentKey {
            rule: c.rule,
            fingerprint: c.fingerprint,
            admitted,
            rejected,
            reasons: c.reasons,
        });
    }
    let report = SyncReport {
        proxy_id: who.proxy_id.to_string(),
        zone: who.zone.to_string(),
        interval_ms: who.interval_ms,
        entries,
    };
    let pending = Pending {
        report,
        keys,
        sent_ns: now,
    };
    (pending, leftover)
}

/// The body of a report (JSON).
pub fn encode_report(report: &SyncReport) -> Vec<u8> {
    serde_json::to_vec(report).unwrap_or_default()
}

/// Why an answer was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncFailure {
    /// Not a 200: Envoy's own 503 when the companion cannot be reached, 504 after the
    /// timeout, or the companion's status (401: the token was refused).
    Status(u32),
    /// Bigger than [`crate::protocol::MAX_ANSWER_BYTES`].
    Oversized(usize),
    /// Not a [`SyncAnswer`], or not one for this report.
    Invalid(String),
}

impl std::fmt::Display for SyncFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncFailure::Status(401) => f.write_str("401: the companion refused the token"),
            SyncFailure::Status(0) => f.write_str("no answer"),
            SyncFailure::Status(s) => write!(f, "status {s}"),
            SyncFailure::Oversized(n) => write!(
                f,
                "an answer of {n} bytes, over the {} the filter reads",
                crate::protocol::MAX_ANSWER_BYTES
            ),
            SyncFailure::Invalid(why) => write!(f, "an invalid answer: {why}"),
        }
    }
}

/// The answer to `pending`, from the callout's status and body.
pub fn parse_answer(
    status: u32,
    body: &[u8],
    pending: &Pending,
) -> Result<SyncAnswer, SyncFailure> {
    if status != 200 {
        return Err(SyncFailure::Status(status));
    }
    if body.len() > crate::protocol::MAX_ANSWER_BYTES {
        return Err(SyncFailure::Oversized(body.len()));
    }
    // Read strictly (objects only, nothing after them), the failure naming its field.
    let answer: SyncAnswer = crate::json::parse(body).map_err(SyncFailure::Invalid)?;
    answer
        .validate_for(&pending.report)
        .map_err(SyncFailure::Invalid)?;
    Ok(answer)
}

/// What applying an answer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Grants written to their entries.
    pub grants: usize,
    /// Keys whose entry was gone (evicted since the report).
    pub missing: usize,
}

/// Applies a valid answer: the proxy state first (reachable, live proxies, lease), then
/// each key's grant to its entry (one get and one CAS each: shares rescaled, expiry
/// `sent + lease`, the reported count subtracted) and to the tracked keys.
pub fn apply_answer<S: SharedData + ?Sized>(
    shared: &S,
    who: &Reporter<'_>,
    pending: &Pending,
    answer: &SyncAnswer,
    tracked: &mut TrackedKeys,
    tracked_params: &TrackedParams,
    now: u64,
) -> Applied {
    let sent = pending.sent_ns;
    let n = answer.proxies.max(1);
    update_proxy(shared, |st| {
        if sent >= st.last_ok_sent_ns {
            st.last_ok_sent_ns = sent;
            st.n_live = n;
            st.lease_ms = answer.lease_ms;
        }
        st.report_cap = (st.report_cap().saturating_mul(2)).min(REPORT_ENTRIES) as u32;
    });
    let floor = SHARE_ONE / n;
    let quiet = tracked_params.quiet(n);
    let expiry = sent.saturating_add(answer.lease_ms.saturating_mul(1_000_000));
    let sent_ms = report::clock_ms(sent);
    let mut applied = Applied::default();
    for ((key, grant), sent_entry) in (pending.keys.iter())
        .zip(&answer.entries)
        .zip(&pending.report.entries)
    {
        let Some(rule) = who.rules.get(usize::from(key.rule)) else {
            continue;
        };
        let k = rule.limits.len();
        if rule.scope != Scope::Global || grant.shares.len() != k {
            continue;
        }
        let found = table::update_global(shared, k, key.fingerprint, who.sets, |tats, state| {
            global::apply_grant(
                &rule.limits,
                tats,
                state,
                &grant.shares,
                expiry,
                key.admitted,
                sent_ms,
                floor,
                now,
            )
        });
        match found {
            Ok(true) => {
                applied.grants += 1;
                tracked.update(
                    key.rule,
                    key.fingerprint,
                    &grant.shares,
                    grant.pending,
                    quiet,
                    tracked_params,
                );
            }
            _ => {
                applied.missing += 1;
                // Gone from the table: a share it still holds is released next
                // interval (a tracked key whose entry is gone is reported once more).
                let keep = !sent_entry.release && grant.shares.iter().any(|&s| s > 0);
                let shares: &[u32] = if keep { &grant.shares } else { &[] };
                tracked.update(
                    key.rule,
                    key.fingerprint,
                    shares,
                    false,
                    quiet,
                    tracked_params,
                );
            }
        }
    }
    applied
}

/// Puts the keys of a report that failed back into the outbox (with their rejected
/// counts; the admitted counts were never subtracted), so the next report carries
/// them, and halves the size of the next report (from what this one carried: see
/// [`ProxyState::report_cap`]). Returns the keys dropped because the outbox was full.
pub fn requeue<S: SharedData + ?Sized>(shared: &S, pending: &Pending) -> u64 {
    let sent = pending.keys.len();
    if sent > 0 {
        // A failed heartbeat says nothing about the size a report can have.
        update_proxy(shared, |st| {
            st.report_cap = (st.report_cap().min(sent) / 2).max(MIN_REPORT_ENTRIES) as u32;
        });
    }
    let again: Vec<Candidate> = (pending.keys.iter())
        .filter(|k| k.reasons & report::TRACKED == 0 || k.rejected > 0)
        .map(|k| Candidate {
            rule: k.rule,
            fingerprint: k.fingerprint,
            rejected: k.rejected,
            reasons: (k.reasons & !report::TRACKED) | report::RETRY,
        })
        .collect();
    merge_into_outbox(shared, &again, OUTBOX_CAPACITY)
}

#[cfg(test)]
mod tests;
