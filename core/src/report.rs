//! Which keys a proxy reports to the companion (global scope), and the bounded sets
//! that hold them between syncs.
//!
//! A key far below its share cannot break the global limit (the shares sum to at most
//! 1), so a report carries only keys whose state moved:
//! - **new**: no valid grant (it runs at `1/n` until its first one);
//! - **rejected**: this request was refused (demand beyond the share);
//! - **hot**: admitted near its share *and* draining its bucket: the rate since the
//!   key's last report is at least `θ` × the share's rate, and the bucket is less than
//!   half full. Shares follow demand closely (work-conserving), so the rate test alone
//!   holds for nearly every used key; the bucket (at least `burst/n` deep) only drains
//!   when demand outgrows the share;
//! - **renew**: the grant ends within `renew_within` and the key was used since;
//! - **tracked** (chosen by the leader, not the request path): keys holding a share
//!   above `quiet`, every interval (with whatever they used, possibly nothing), so a
//!   share whose demand moved away goes back within an interval instead of a lease;
//!   and keys whose grant came back below their target (*pending*: the others still
//!   held the difference), so they collect it next interval.
//!
//! The request path calls [`reasons`] with what it has in hand and adds the key to its
//! VM's [`CandidateSet`]: fixed capacity, no allocation after construction.

use std::collections::BTreeMap;

use crate::config::Limit;
use crate::gcra::{self, Decision, SHARE_ONE};
use crate::global::{Admission, KeyState, ShareSource};

pub const NEW: u8 = 1;
pub const REJECTED: u8 = 2;
pub const HOT: u8 = 4;
pub const RENEW: u8 = 8;
pub const TRACKED: u8 = 16;
/// Part of a report that failed: sent again with the next one.
pub const RETRY: u8 = 32;
/// The entry of a key holding a grant was evicted from the table: report it once so
/// the companion drops this proxy's record of it (and its share) at once.
pub const RELEASE: u8 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerParams {
    /// The sync interval `I`.
    pub interval_ns: u64,
    /// `θ`, per mille of the share's rate.
    pub hot_permille: u32,
    /// A grant ending within this long is renewed (if the key was used).
    pub renew_within_ns: u64,
}

impl TriggerParams {
    /// The values the simulation chose (`docs/global-limits.md`).
    pub fn for_interval(interval_ns: u64) -> TriggerParams {
        TriggerParams {
            interval_ns,
            hot_permille: 500,
            renew_within_ns: 2 * interval_ns,
        }
    }
}

/// The clock in milliseconds, mod 2³² (the entry's `reported_ms`).
pub fn clock_ms(now_ns: u64) -> u32 {
    (now_ns / 1_000_000) as u32
}

/// Time since the key's last report, at least `I` (so a key reported a moment ago is
/// not hot from its first requests). Wraps after 49 days: a key unreported that long
/// may look recent and be reported once more, which costs one entry.
fn span_since_report(state: &KeyState, now: u64, interval_ns: u64) -> u64 {
    (u64::from(state.span_ms(now)) * 1_000_000).max(interval_ns)
}

/// `admitted / span ≥ permille/1000 · share · max / window` for `limit`.
fn rate_at_least(limit: &Limit, admitted: u32, span_ns: u64, share: u32, permille: u32) -> bool {
    let lhs = u128::from(admitted) * u128::from(limit.interval_ns) * u128::from(SHARE_ONE) * 1000;
    lhs >= u128::from(permille) * u128::from(share) * u128::from(span_ns)
}

/// Why this key should be in the next report after this request's decision (a set of
/// the flags above; 0 = not a candidate). `state` and `tats` are as after
/// [`crate::global::admit`].
#[allow(
    clippy::too_many_arguments,
    reason = "the decision's inputs as the request path has them; a struct would be built for this call alone"
)]
pub fn reasons(
    limits: &[Limit],
    tats: &[u64],
    state: &KeyState,
    source: ShareSource,
    admission: Admission,
    floor: u32,
    now: u64,
    p: &TriggerParams,
) -> u8 {
    let mut why = match admission {
        Admission::Bucket(Decision { allowed: false, .. }) | Admission::Closed => REJECTED,
        _ => 0,
    };
    if source != ShareSource::Granted {
        return why | NEW;
    }
    if state.expiry_ns <= now.saturating_add(p.renew_within_ns) && state.admitted > 0 {
        why |= RENEW;
    }
    let span = span_since_report(state, now, p.interval_ns);
    let hot = limits
        .iter()
        .zip(tats)
        .enumerate()
        .any(|(i, (limit, &tat))| {
            let share = state.shares[i];
            let half_empty = tat > now.saturating_add(gcra::depth_at(limit, share, floor) / 2);
            half_empty && rate_at_least(limit, state.admitted, span, share, p.hot_permille)
        });
    if hot {
        why |= HOT;
    }
    why
}

/// One key waiting for the next report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Candidate {
    /// Index of the rule in the configuration.
    pub rule: u16,
    pub fingerprint: u64,
    /// Rejections since the key was added (rejections write nothing to the table, so
    /// this is where they are counted).
    pub rejected: u32,
    /// Flags; 0 marks a free slot.
    pub reasons: u8,
}

/// The keys one VM will hand to the next report, deduplicated by (rule, fingerprint):
/// open addressing in a table allocated once, twice the capacity so probes stay short.
/// When `capacity` keys are held, new ones are dropped and counted
/// (`meshlimit_report_dropped_total`); a dropped key is picked up again on a later
/// request, since its state still triggers.
pub struct CandidateSet {
    slots: Box<[Candidate]>,
    len: usize,
    capacity: usize,
    dropped: u64,
}

impl CandidateSet {
    pub fn with_capacity(capacity: usize) -> CandidateSet {
        let size = (capacity.max(1) * 2).next_power_of_two();
        CandidateSet {
            slots: vec![Candidate::default(); size].into_boxed_slice(),
            len: 0,
            capacity: capacity.max(1),
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys dropped because the set was full, since it was created.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds (or merges into) the key's candidate; false if it was dropped.
    pub fn add(&mut self, rule: u16, fingerprint: u64, reasons: u8, rejected: u32) -> bool {
        if reasons == 0 {
            return true;
        }
        let mask = self.slots.len() - 1;
        let mut i = (fingerprint ^ u64::from(rule).rotate_left(32)) as usize & mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.reasons == 0 {
                if self.len >= self.capacity {
                    self.dropped += 1;
                    return false;
                }
                *slot = Candidate {
                    rule,
                    fingerprint,
                    rejected,
                    reasons,
                };
                self.len += 1;
                return true;
            }
            if slot.rule == rule && slot.fingerprint == fingerprint {
                slot.reasons |= reasons;
                slot.rejected = slot.rejected.saturating_add(rejected);
                return true;
            }
            i = (i + 1) & mask;
        }
    }

    /// Hands every candidate to `f` and empties the set.
    pub fn drain(&mut self, mut f: impl FnMut(Candidate)) {
        if self.len == 0 {
            return;
        }
        for slot in self.slots.iter_mut().filter(|s| s.reasons != 0) {
            f(std::mem::take(slot));
        }
        self.len = 0;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedParams {
    /// A share above `1 / (quiet_divisor · n)` is tracked (`n` live proxies): what the
    /// untracked shares of one key can strand, if their proxies stop using it, is then
    /// at most `1 / quiet_divisor` of its limit, for at most a lease.
    pub quiet_divisor: u32,
    /// Most tracked keys per proxy (beyond it, a share returns through its lease).
    pub capacity: usize,
}

impl TrackedParams {
    /// The quiet level for `n` live proxies.
    pub fn quiet(&self, n: u32) -> u32 {
        SHARE_ONE / self.quiet_divisor.max(1).saturating_mul(n.max(1))
    }
}

impl Default for TrackedParams {
    fn default() -> Self {
        TrackedParams {
            quiet_divisor: 10,
            capacity: 4096,
        }
    }
}

/// The leader's tracked keys: (rule, fingerprint) → (the largest share it holds,
/// whether its grant is below its target).
#[derive(Debug, Default)]
pub struct TrackedKeys {
    keys: BTreeMap<(u16, u64), (u32, bool)>,
    /// Keys not tracked because the set was full.
    pub dropped: u64,
}

impl TrackedKeys {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// (rule, fingerprint, pending) of every tracked key.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64, bool)> + '_ {
        self.iter_after(None)
    }

    /// (rule, fingerprint, pending) of every tracked key once, starting after `after`
    /// and wrapping round. A report carries at most its cap of keys, tracked ones last:
    /// when they do not all fit, the next report goes on after the last one this one
    /// carried (`after`), instead of carrying the same first keys every time while the
    /// rest keep shares they no longer use for a whole lease.
    pub fn iter_after(
        &self,
        after: Option<(u16, u64)>,
    ) -> impl Iterator<Item = (u16, u64, bool)> + '_ {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        // No cursor: (0, 0) splits the set into all keys above it, then (0, 0) itself.
        let at = after.unwrap_or((0, 0));
        (self.keys.range((Excluded(at), Unbounded)))
            .chain(self.keys.range((Unbounded, Included(at))))
            .map(|(&(r, f), &(_, pending))| (r, f, pending))
    }

    /// Bytes of one tracked key in [`TrackedKeys::encode`].
    pub const ENCODED_LEN: usize = 15;

    /// The set as bytes, to keep it in shared data between syncs (so that a new
    /// leader carries on with the keys the last one tracked): per key `rule (2) ‖
    /// fingerprint (8) ‖ share (4) ‖ pending (1)`, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.keys.len() * Self::ENCODED_LEN);
        for (&(rule, fp), &(share, pending)) in &self.keys {
            out.extend_from_slice(&rule.to_le_bytes());
            out.extend_from_slice(&fp.to_le_bytes());
            out.extend_from_slice(&share.to_le_bytes());
            out.push(u8::from(pending));
        }
        out
    }

    /// The set [`TrackedKeys::encode`] wrote, at most `capacity` keys of it; a partial
    /// record at the end is ignored.
    pub fn decode(bytes: &[u8], capacity: usize) -> TrackedKeys {
        let mut keys = BTreeMap::new();
        for r in bytes.chunks_exact(Self::ENCODED_LEN).take(capacity) {
            let rule = u16::from_le_bytes([r[0], r[1]]);
            let mut fp = [0u8; 8];
            fp.copy_from_slice(&r[2..10]);
            let share = u32::from_le_bytes([r[10], r[11], r[12], r[13]]);
            keys.insert((rule, u64::from_le_bytes(fp)), (share, r[14] != 0));
        }
        TrackedKeys { keys, dropped: 0 }
    }

    /// After a grant: tracked iff some share is above the quiet level `quiet` (see
    /// [`TrackedParams::quiet`]), or the grant is below its target (`pending`: report it
    /// again next interval to collect the rest).
    pub fn update(
        &mut self,
        rule: u16,
        fingerprint: u64,
        shares: &[u32],
        pending: bool,
        quiet: u32,
        p: &TrackedParams,
    ) {
        let top = shares.iter().copied().max().unwrap_or(0);
        if top <= quiet && !pending {
            self.keys.remove(&(rule, fingerprint));
        } else if self.keys.len() < p.capacity || self.keys.contains_key(&(rule, fingerprint)) {
            self.keys.insert((rule, fingerprint), (top, pending));
        } else {
            self.dropped += 1;
        }
    }
}

/// Whether the leader adds a tracked key to this interval's report: every interval
/// while its grant lasts (with whatever it used, possibly nothing), and once more when
/// its entry is gone (evicted: so the companion releases the share). The simulation
/// tried reporting only keys whose use fell below a fraction of their share: 8 % fewer
/// entries, but shares then lag the small wobbles of demand and accuracy drops (Zipf,
/// 20k clients: 0.981 against 0.994).
pub fn tracked_due(state: Option<&KeyState>, now: u64) -> bool {
    state.is_none_or(|s| s.expiry_ns > now)
}

#[cfg(test)]
mod tests;
