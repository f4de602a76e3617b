//! Token buckets as GCRA (the generic cell rate algorithm).
//!
//! A bucket of capacity `burst` refilled at `max / window` is fully described by one
//! number, the *theoretical arrival time* `tat`: the instant at which the bucket would be
//! full again. With emission interval `T = window / max` and depth `τ = burst · T`:
//!
//! - a request of `n` hits at `now` computes `tat' = max(tat, now) + n·T`;
//! - it is allowed iff `tat' ≤ now + τ` (the bucket still holds `n` tokens);
//! - tokens left afterwards: `⌊(now + τ − tat') / T⌋`;
//! - the bucket is full (idle) once `tat ≤ now`.
//!
//! So one `u64` per limit, integer math in nanoseconds, no floats, and "refill" is just
//! time passing. Several limits of one rule are checked all-or-nothing: a request takes
//! a token from every limit only if every limit has one.
//!
//! Global scope runs the same bucket at this proxy's share `w` of the limit
//! ([`weighted`], [`check_weighted`]): rate `w·r`, capacity `max(w, 1/n)·burst`.

use crate::config::Limit;

/// What one check decided, and the numbers the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The limit headers describe. Allowed: the one closest to running out (fewest
    /// tokens left; on a tie the one that takes longer to refill). Rejected: the refusing
    /// limit that takes longest to give a token back, the one `Retry-After` comes from.
    pub tightest: usize,
    /// Tokens left in `tightest` after this request.
    pub remaining: u64,
    /// Nanoseconds from `now` until `tightest` is full again.
    pub reset_ns: u64,
    /// Rejected: nanoseconds from `now` until every limit has the tokens asked for.
    /// Allowed: 0.
    pub retry_after_ns: u64,
    /// `tats` changed and must be written back: always when allowed; on a refusal only
    /// when a timestamp was clamped after the clock went backwards.
    pub changed: bool,
}

impl Decision {
    /// Admitted without a bucket: the table could not be updated (contention or a
    /// shared-data failure), and the filter fails open rather than refuse a request it
    /// could not count. Nothing to write; the headers say no token is left.
    pub const UNMETERED: Decision = Decision {
        allowed: true,
        tightest: 0,
        remaining: 0,
        reset_ns: 0,
        retry_after_ns: 0,
        changed: false,
    };
}

/// Checks `hits` against every limit; on success advances `tats` in place, on refusal
/// leaves them untouched (a rejection changes no state, so it needs no write).
///
/// `now` may go backwards (clock adjustments): a `tat` more than one bucket depth ahead
/// of `now` is clamped to `now + τ` (and that clamp is kept, even on a refusal), so a
/// backward jump can never lock a client out for longer than one empty bucket takes to
/// refill.
pub fn check(limits: &[Limit], tats: &mut [u64], now: u64, hits: u64) -> Decision {
    debug_assert_eq!(limits.len(), tats.len());
    let mut allowed = true;
    let mut retry_after_ns = 0u64;
    let mut tightest = 0usize;
    let mut best: Option<(u64, u64)> = None; // (remaining, reset_ns) of tightest
    let mut refusing: Option<(u64, usize, u64, u64)> = None; // (wait, index, remaining, reset_ns)
    let mut next = [0u64; crate::config::MAX_LIMITS_PER_RULE];
    let mut clamped = false;

    for (i, (limit, &tat)) in limits.iter().zip(tats.iter()).enumerate() {
        let horizon = now.saturating_add(limit.depth_ns);
        clamped |= tat > horizon;
        let tat = tat.min(horizon);
        let start = tat.max(now);
        let cost = limit.interval_ns.saturating_mul(hits);
        let new_tat = start.saturating_add(cost);
        // `cost > depth` can never fit, even where saturation at u64::MAX would hide it.
        let ok = cost <= limit.depth_ns && new_tat <= horizon;
        let (remaining, after) = if ok {
            ((horizon - new_tat) / limit.interval_ns, new_tat)
        } else {
            let wait = new_tat.saturating_sub(horizon);
            retry_after_ns = retry_after_ns.max(wait);
            allowed = false;
            let remaining = (horizon - start) / limit.interval_ns;
            if refusing.is_none_or(|(w, ..)| wait > w) {
                refusing = Some((wait, i, remaining, start.saturating_sub(now)));
            }
            (remaining, start)
        };
        next[i] = after;
        let reset_ns = after.saturating_sub(now);
        let tighter = match best {
            None => true,
            Some((r, reset)) => remaining < r || (remaining == r && reset_ns > reset),
        };
        if tighter {
            best = Some((remaining, reset_ns));
            tightest = i;
        }
    }
    if allowed {
        tats.copy_from_slice(&next[..tats.len()]);
        retry_after_ns = 0;
    } else if clamped {
        for (t, l) in tats.iter_mut().zip(limits) {
            *t = (*t).min(now.saturating_add(l.depth_ns));
        }
    }
    let (mut remaining, mut reset_ns) = best.unwrap_or((0, 0));
    if let Some((_, i, left, reset)) = refusing {
        tightest = i;
        remaining = left;
        reset_ns = reset;
    }
    Decision {
        allowed,
        tightest,
        remaining,
        reset_ns,
        retry_after_ns,
        changed: allowed || clamped,
    }
}

/// [`check`], then, if the request was refused, charges `hits` to every limit anyway:
/// the reconciliation of hits a fallback already admitted while the store could not
/// count them. Each bucket takes the hits if it holds them and is otherwise emptied,
/// never charged beyond empty, so a forced charge keeps a client out no longer than one
/// empty bucket takes to refill. Returns what [`check`] decided (what the request would
/// have been told), with `changed` set on a refusal too: the charge is to be written.
pub fn force(limits: &[Limit], tats: &mut [u64], now: u64, hits: u64) -> Decision {
    let mut d = check(limits, tats, now, hits);
    if !d.allowed {
        for (t, l) in tats.iter_mut().zip(limits) {
            let horizon = now.saturating_add(l.depth_ns);
            let cost = l.interval_ns.saturating_mul(hits);
            *t = (*t).clamp(now, horizon).saturating_add(cost).min(horizon);
        }
        d.changed = true;
    }
    d
}

/// Nanoseconds until a bucket that holds `remaining` tokens and is full again in
/// `reset_ns` gains its next token: the `t` of the IETF `RateLimit` field ("time until
/// additional quota is made available"). Tokens come back one per interval, the last
/// one at `reset_ns`, so the next one is due `(burst - remaining - 1)` intervals before
/// that. On a refusal (`remaining` 0) this is exactly the wait `Retry-After` rounds up.
pub fn next_token_ns(limit: &Limit, remaining: u64, reset_ns: u64) -> u64 {
    let later = limit
        .burst
        .saturating_sub(remaining)
        .saturating_sub(1)
        .saturating_mul(limit.interval_ns);
    reset_ns.saturating_sub(later)
}

/// True when every bucket is full again: the entry holds nothing a fresh one would not.
pub fn is_idle(tats: &[u64], now: u64) -> bool {
    tats.iter().all(|&t| t <= now)
}

/// A share of a limit in parts per billion: `SHARE_ONE` is the whole limit. Shares are
/// integers so that table entries stay integer-only, like the timestamps.
pub const SHARE_ONE: u32 = 1_000_000_000;

/// The bucket a proxy runs for its share `share` of `limit` (global scope), as a
/// [`Limit`] that [`check`] understands:
///
/// - rate `share · max / window`: interval `T_w = T / share`;
/// - capacity `c_w = max(share, floor) · burst` tokens, at least one: depth
///   `τ_w = c_w · T_w = τ · max(share, floor) / share`, and `τ_w ≥ T_w`.
///
/// `floor` is the *burst floor*, `1/n` of the live proxies: a key that is quiet on this
/// proxy (small demand-following share) can still take `burst / n` at once. For
/// `share ≥ floor` the depth is exactly `τ`, whatever the share, so a stored `tat`
/// keeps the bucket's fill fraction when the share changes; below the floor use
/// [`rescale`]. Returns `None` for share 0: nothing is admitted.
pub fn weighted(limit: &Limit, share: u32, floor: u32) -> Option<Limit> {
    let share = share.min(SHARE_ONE);
    if share == 0 {
        return None;
    }
    let cap = share.max(floor.min(SHARE_ONE));
    let interval_ns = mul_div(limit.interval_ns, SHARE_ONE, share);
    let depth_ns = mul_div(limit.depth_ns, cap, share).max(interval_ns);
    Some(Limit {
        interval_ns,
        depth_ns,
        ..*limit
    })
}

/// `a · b / c`, saturating at `u64::MAX` (c > 0).
fn mul_div(a: u64, b: u32, c: u32) -> u64 {
    let v = u128::from(a) * u128::from(b) / u128::from(c);
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// [`check`] against each limit at its share (`shares[i]` for `limits[i]`, burst floor
/// `floor`; see [`weighted`]). A share of 0 refuses without touching `tats`, with
/// `retry_after_ns = u64::MAX` ("when a share arrives": the caller bounds it by its
/// sync interval).
pub fn check_weighted(
    limits: &[Limit],
    shares: &[u32],
    floor: u32,
    tats: &mut [u64],
    now: u64,
    hits: u64,
) -> Decision {
    debug_assert_eq!(limits.len(), shares.len());
    let mut at_share = [limits[0]; crate::config::MAX_LIMITS_PER_RULE];
    for (i, (limit, &share)) in limits.iter().zip(shares).enumerate() {
        match weighted(limit, share, floor) {
            Some(l) => at_share[i] = l,
            None => {
                return Decision {
                    allowed: false,
                    tightest: i,
                    remaining: 0,
                    reset_ns: 0,
                    retry_after_ns: u64::MAX,
                    changed: false,
                }
            }
        }
    }
    check(&at_share[..limits.len()], tats, now, hits)
}

/// Depth in time of `limit`'s bucket at `share` (the scale its `tat` is measured in);
/// share 0 has no bucket and reports the unweighted depth `τ`.
pub fn depth_at(limit: &Limit, share: u32, floor: u32) -> u64 {
    weighted(limit, share, floor).map_or(limit.depth_ns, |l| l.depth_ns)
}

/// The `tat` that gives the bucket at share `to` the fill fraction the bucket at share
/// `from` has at `now` (shares with their burst floors). The time until the bucket is
/// full, `tat − now`, scales with the depth; a full bucket stays full. Only needed when
/// a share is below its floor, or under one token: otherwise depths are equal and `tat`
/// is returned as it is.
///
/// Share 0 admits nothing, but the clock keeps running on its `tat`: a bucket leaving
/// share 0 therefore starts **empty** at its new share, or a proxy whose share dips to
/// 0 between two grants would find a free, full bucket each time.
pub fn rescale(limit: &Limit, tat: u64, now: u64, from: (u32, u32), to: (u32, u32)) -> u64 {
    let depth_to = depth_at(limit, to.0, to.1);
    match (from.0, to.0) {
        (_, 0) => return tat,
        (0, _) => return now.saturating_add(depth_to),
        _ => {}
    }
    let depth_from = depth_at(limit, from.0, from.1);
    if depth_from == depth_to || tat <= now {
        return tat;
    }
    let until_full = (tat - now).min(depth_from);
    let scaled = u128::from(until_full) * u128::from(depth_to) / u128::from(depth_from);
    now.saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod weighted_tests;
