//! A key's state under a global rule, kept in the filter's table entry, and the
//! request-time decision of which share its bucket runs at.
//!
//! **Entry layout.** A global rule's entry is the local entry (`limits ‖ fingerprint ‖
//! tat per limit`, see [`crate::table`]) followed by a trailer of
//! [`trailer_len`]`(k) = 4·k + 16` bytes, little-endian:
//!
//! | bytes | field | meaning |
//! |---|---|---|
//! | `4·k` | `shares[k]` (u32) | share per limit, parts per 10⁹: the scale of the stored `tat`s |
//! | 8 | `expiry_ns` (u64) | end of the companion's grant; 0 = no grant (the shares are the default or fallback share applied last) |
//! | 4 | `admitted` (u32) | requests admitted since the last successful report (saturating) |
//! | 4 | `reported_ms` (u32) | clock in ms, mod 2³², of the last successful report (or of the entry's creation) |
//!
//! One limit: 17 + 20 = 37 bytes (a local entry is 17); eight limits: 73 + 48 = 121.
//! The get and the CAS the admission already does read and write all of it: global
//! scope costs no extra host call. Rejections are counted in VM memory instead (see
//! [`crate::report::CandidateSet`]), so a rejection still writes nothing.
//!
//! **Invariant:** the `tat`s are always measured at the stored `shares` (see
//! [`gcra::rescale`]); whoever stores other shares rescales them.

use crate::config::{Limit, MAX_LIMITS_PER_RULE};
use crate::gcra::{self, Decision, SHARE_ONE};

/// Trailer bytes for `limits` limits.
pub const fn trailer_len(limits: usize) -> usize {
    4 * limits + 16
}

/// The global part of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    /// Per limit (the first `k` are used).
    pub shares: [u32; MAX_LIMITS_PER_RULE],
    pub expiry_ns: u64,
    pub admitted: u32,
    pub reported_ms: u32,
}

impl KeyState {
    /// A key seen for the first time at `now`, with the share about to be applied
    /// ([`ShareSource::share`]): no grant, full buckets at that share. Its span starts
    /// now, as if reported: its first report's rate covers the time it existed.
    pub fn new(share: u32, now: u64) -> KeyState {
        KeyState {
            shares: [share; MAX_LIMITS_PER_RULE],
            expiry_ns: 0,
            admitted: 0,
            reported_ms: crate::report::clock_ms(now),
        }
    }

    /// Milliseconds since the last report (or the key's creation), at least 1; wraps
    /// after 49 days (a key unreported that long is reported with a short span once).
    pub fn span_ms(&self, now: u64) -> u32 {
        crate::report::clock_ms(now)
            .wrapping_sub(self.reported_ms)
            .max(1)
    }

    /// Writes the trailer for `limits` limits into `out[..trailer_len(limits)]`.
    pub fn encode(&self, limits: usize, out: &mut [u8]) {
        let out = &mut out[..trailer_len(limits)];
        for (i, s) in self.shares[..limits].iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&s.to_le_bytes());
        }
        let at = 4 * limits;
        out[at..at + 8].copy_from_slice(&self.expiry_ns.to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&self.admitted.to_le_bytes());
        out[at + 12..at + 16].copy_from_slice(&self.reported_ms.to_le_bytes());
    }

    /// Parses a trailer of exactly `trailer_len(limits)` bytes; shares above the whole
    /// limit are refused (the entry is then treated as corrupt, like a bad set value).
    pub fn decode(bytes: &[u8], limits: usize) -> Option<KeyState> {
        if limits == 0 || limits > MAX_LIMITS_PER_RULE || bytes.len() != trailer_len(limits) {
            return None;
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut shares = [0; MAX_LIMITS_PER_RULE];
        for (i, s) in shares[..limits].iter_mut().enumerate() {
            *s = u32_at(4 * i);
            if *s > SHARE_ONE {
                return None;
            }
        }
        let at = 4 * limits;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&bytes[at..at + 8]);
        Some(KeyState {
            shares,
            expiry_ns: u64::from_le_bytes(expiry),
            admitted: u32_at(at + 8),
            reported_ms: u32_at(at + 12),
        })
    }
}

/// What a global rule does while it has no valid grant and the companion is
/// unreachable (and a strict rule when its callout fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(remote = "Self", rename_all = "lowercase")]
pub enum FailureMode {
    /// The local bucket at the fallback share.
    #[default]
    Local,
    /// Admit without a bucket.
    Open,
    /// Reject (429, `Retry-After: 1`, a body saying the limiter is unavailable).
    Closed,
}

// A choice, read from a string only (not `{"open":null}`), like the configuration's.
crate::json::deserialize_strictly!(FailureMode);

/// Proxy-level sync state, from VM memory (each VM refreshes it from shared data on its
/// tick): no host call per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncView {
    /// When the last successful sync was *sent* (not answered): the companion saw the
    /// proxy alive at a later instant, so the proxy gives up its grants no later than
    /// the companion drops them.
    pub last_ok_sent_ns: Option<u64>,
    /// How long after that the companion still counts this proxy live: 3 intervals.
    pub proxy_ttl_ns: u64,
    /// Live proxies, as the last answer said; 0 = never told.
    pub n_live: u32,
}

impl SyncView {
    pub fn reachable(&self, now: u64) -> bool {
        self.last_ok_sent_ns
            .is_some_and(|t| now < t.saturating_add(self.proxy_ttl_ns))
    }

    /// `1/n`, or `None` before the first answer.
    pub fn fair_share(&self) -> Option<u32> {
        (self.n_live > 0).then(|| SHARE_ONE / self.n_live)
    }
}

/// Where the share for this request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareSource {
    /// A valid grant: the stored shares.
    Granted,
    /// No valid grant, companion reachable: `1/n` for every limit (never the whole limit,
    /// never zero) until the first grant arrives.
    NewKey(u32),
    /// Unreachable, `local` mode: `fallback_share`, else `1/n` of the last known `n`,
    /// else (never synced) the whole limit.
    Fallback(u32),
    Open,
    Closed,
}

impl ShareSource {
    /// The share a bucket runs at, when it is one for every limit.
    pub fn share(self) -> Option<u32> {
        match self {
            ShareSource::NewKey(s) | ShareSource::Fallback(s) => Some(s),
            _ => None,
        }
    }
}

/// The request-time choice of share (design: a grant is valid while it has not expired
/// **and** the companion is reachable; after 3 intervals without a sync the companion
/// has dropped this proxy's grants too).
pub fn choose_share(
    state: &KeyState,
    sync: &SyncView,
    mode: FailureMode,
    fallback_share: Option<u32>,
    now: u64,
) -> ShareSource {
    let reachable = sync.reachable(now);
    if reachable && state.expiry_ns > now {
        return ShareSource::Granted;
    }
    if reachable {
        return ShareSource::NewKey(sync.fair_share().unwrap_or(SHARE_ONE));
    }
    match mode {
        FailureMode::Local => {
            let share = fallback_share.or(sync.fair_share()).unwrap_or(SHARE_ONE);
            ShareSource::Fallback(share.min(SHARE_ONE))
        }
        FailureMode::Open => ShareSource::Open,
        FailureMode::Closed => ShareSource::Closed,
    }
}

/// The burst floor for the bucket: `1/n`, or the applied share before `n` is known.
pub fn burst_floor(sync: &SyncView, source: ShareSource) -> u32 {
    match (sync.fair_share(), source) {
        (Some(f), _) => f,
        (None, ShareSource::NewKey(s) | ShareSource::Fallback(s)) => s,
        (None, _) => SHARE_ONE,
    }
}

/// What the request path does with a global key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Decided by the bucket; write the entry back when `changed`.
    Bucket(Decision),
    /// `open` mode: admitted without a bucket, nothing to write.
    Open,
    /// `closed` mode: rejected, nothing to write.
    Closed,
}

/// Checks `hits` for a global key at the share `source` says, updating `tats` and
/// `state` in place (write both back iff the decision says `changed`). A share other
/// than the stored one rescales the `tat`s first and is stored with `expiry_ns = 0`
/// when written: the entry keeps the invariant that its `tat`s are at its shares.
pub fn admit(
    limits: &[Limit],
    tats: &mut [u64],
    state: &mut KeyState,
    source: ShareSource,
    floor: u32,
    now: u64,
    hits: u64,
) -> Admission {
    let k = limits.len();
    let mut shares = [0u32; MAX_LIMITS_PER_RULE];
    match source {
        ShareSource::Open => return Admission::Open,
        ShareSource::Closed => return Admission::Closed,
        ShareSource::Granted => shares[..k].copy_from_slice(&state.shares[..k]),
        ShareSource::NewKey(s) | ShareSource::Fallback(s) => shares[..k].fill(s),
    }
    let mut at_share = [0u64; MAX_LIMITS_PER_RULE];
    for i in 0..k {
        let (from, to) = ((state.shares[i], floor), (shares[i], floor));
        at_share[i] = gcra::rescale(&limits[i], tats[i], now, from, to);
    }
    let d = gcra::check_weighted(limits, &shares[..k], floor, &mut at_share[..k], now, hits);
    if d.changed {
        tats.copy_from_slice(&at_share[..k]);
        if source != ShareSource::Granted {
            state.shares[..k].copy_from_slice(&shares[..k]);
            state.expiry_ns = 0;
        }
    }
    if d.allowed {
        let hits = u32::try_from(hits).unwrap_or(u32::MAX);
        state.admitted = state.admitted.saturating_add(hits);
    }
    Admission::Bucket(d)
}

/// How one global rule decides a request, besides the key's own state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleParams {
    pub mode: FailureMode,
    /// `service.fallback_share`.
    pub fallback_share: Option<u32>,
    pub trigger: crate::report::TriggerParams,
}

/// What the request path decided for one global key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDecision {
    pub admission: Admission,
    pub source: ShareSource,
    /// Why the key goes in the next report ([`crate::report`] flags; 0: it does not).
    pub reasons: u8,
}

impl KeyDecision {
    /// The failure mode decided this request (the companion is unreachable).
    pub fn by_failure_mode(&self) -> Option<FailureMode> {
        match self.source {
            ShareSource::Fallback(_) => Some(FailureMode::Local),
            ShareSource::Open => Some(FailureMode::Open),
            ShareSource::Closed => Some(FailureMode::Closed),
            _ => None,
        }
    }
}

/// The state of a key's entry created at `now`: full buckets at the share about to
/// apply (never the whole limit while other proxies may hold grants, never zero).
pub fn fresh_state(sync: &SyncView, p: &RuleParams, now: u64) -> KeyState {
    let blank = KeyState::new(0, now);
    let share = choose_share(&blank, sync, p.mode, p.fallback_share, now).share();
    KeyState::new(share.unwrap_or(0), now)
}

/// One request (one hit) for a global key, all in hand, no host call: which share
/// applies ([`choose_share`]), the bucket at it ([`admit`]) and whether the key goes in
/// the next report ([`crate::report::reasons`]). Returns whether `tats` and `state`
/// changed and must be written back (the one CAS), and the decision.
pub fn decide(
    limits: &[Limit],
    tats: &mut [u64],
    state: &mut KeyState,
    sync: &SyncView,
    p: &RuleParams,
    now: u64,
) -> (bool, KeyDecision) {
    let source = choose_share(state, sync, p.mode, p.fallback_share, now);
    let floor = burst_floor(sync, source);
    let admission = admit(limits, tats, state, source, floor, now, 1);
    let reasons = crate::report::reasons(
        limits, tats, state, source, admission, floor, now, &p.trigger,
    );
    let store = matches!(admission, Admission::Bucket(d) if d.changed);
    (
        store,
        KeyDecision {
            admission,
            source,
            reasons,
        },
    )
}

/// Applies a grant from the companion (the leader, off the request path): rescales the
/// `tat`s to the new shares, stores them with their expiry, takes the reported count
/// off `admitted` (requests admitted while the report was in flight stay) and notes
/// when the report was sent.
#[allow(
    clippy::too_many_arguments,
    reason = "one grant touches each of these; a struct would be built for this call alone"
)]
pub fn apply_grant(
    limits: &[Limit],
    tats: &mut [u64],
    state: &mut KeyState,
    granted: &[u32],
    expiry_ns: u64,
    reported: u32,
    sent_ms: u32,
    floor: u32,
    now: u64,
) {
    for (i, limit) in limits.iter().enumerate() {
        let to = granted[i].min(SHARE_ONE);
        tats[i] = gcra::rescale(limit, tats[i], now, (state.shares[i], floor), (to, floor));
        state.shares[i] = to;
    }
    state.expiry_ns = expiry_ns;
    state.admitted = state.admitted.saturating_sub(reported);
    state.reported_ms = sent_ms;
}

#[cfg(test)]
mod tests;
