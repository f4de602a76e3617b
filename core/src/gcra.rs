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

#[cfg(test)]
mod tests;
