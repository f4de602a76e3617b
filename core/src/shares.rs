//! The companion's share allocation (global scope): which part of one key's limit each
//! proxy may admit locally until its next report.
//!
//! A record per (rule, key, limit) keeps, per proxy that reported the key, its smoothed
//! demand, its grant and when it last reported. On a report from proxy `p`:
//!
//! 1. peers whose proxy is dead (no sync for `3·interval`, told by the caller) or that
//!    did not report the key within the lease are dropped: their shares return;
//! 2. `p`'s demand is updated from what it saw (admitted + rejected) over the span since
//!    it last reported the key (see [`Smoothing`]);
//! 3. every live peer wants `min(1, d·(1 + m) + ε)`; when the wants sum to more than 1,
//!    max-min fair **water-filling** finds the level `L` with `Σ min(want, L) = 1`
//!    (otherwise `L = 1`: everyone gets what it wants and the rest stays free for
//!    newcomers and growth). `p`'s target is `min(want_p, L)`;
//! 4. its grant is `g_p = min(target, 1 − Σ_{q≠p} g_q)`: what the others hold is never
//!    handed out twice, so **the grants of the live peers sum to at most 1 at every
//!    instant**, whatever order reports arrive in.
//!
//! No per-proxy floor: a proxy gets what its demand needs (plus the margin), so a 90/5/5
//! split wastes only the margins of the small proxies. A share that grows waits for the
//! shrinking holders to report (the filter re-reports tracked keys every interval).
//!
//! Everything stored is an integer: shares and demands in parts per billion of the
//! limit (demand `1e9` = the limit's rate), times in store-clock milliseconds. The loops
//! allocate nothing and use only `+ − × ÷ min`, so the Lua script that runs this in
//! Redis is a line-by-line port: Lua numbers are exact integers below 2^53, which every
//! stored value and intermediate stays under except the product in
//! [`observed_demand`] (there Lua may round differently by a part per billion).

use crate::gcra::SHARE_ONE;

const ONE: u64 = SHARE_ONE as u64;
/// Highest demand stored: 4× the limit. Any demand above `1/(1+m)` of the limit wants
/// the whole limit anyway; the cap keeps `d·(1 + m)` below 2^53 for the Lua port.
pub const DEMAND_CAP: u64 = 4 * ONE;

/// One proxy's view of one key, as the companion stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer<Id> {
    pub proxy: Id,
    /// Smoothed offered load, parts per billion of the limit's rate.
    pub demand: u64,
    /// Share last granted, parts per billion.
    pub grant: u32,
    /// Store-clock milliseconds of its last report of this key.
    pub updated_ms: u64,
}

/// How a proxy's demand follows what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Smoothing {
    /// `d = x`: the last span only.
    None,
    /// `d = (d + x) / 2`.
    Halve,
    /// `d = (d + x) / 2`, but `d = x` when `x < d / 2`: a collapse (the demand moved to
    /// another proxy, or stopped) hands the share back at once.
    HalveFastDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareParams {
    /// Growth margin `m` above measured demand, parts per million.
    pub margin_ppm: u32,
    /// `ε` added to every want, parts per billion: a live peer with no demand keeps a
    /// trickle (and, through the filter's burst floor, `burst/n` for a burst).
    pub epsilon: u32,
    /// A peer that did not report the key for this long is dropped.
    pub lease_ms: u64,
    /// Most peers per key; a newcomer beyond it gets 0 and is not stored (bounds memory
    /// and the script's work).
    pub max_peers: usize,
    pub smoothing: Smoothing,
}

impl Default for ShareParams {
    /// The values the simulation chose (see `docs/global-limits.md`).
    fn default() -> Self {
        ShareParams {
            margin_ppm: 20_000,
            epsilon: 10_000,
            lease_ms: 60_000,
            max_peers: 256,
            smoothing: Smoothing::HalveFastDown,
        }
    }
}

/// What a proxy reports for one key and limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Requests seen (admitted + rejected) since its last report of the key.
    pub hits: u64,
    /// The limit: `max` per `window_ms`.
    pub max: u64,
    pub window_ms: u64,
    /// The span to assume when the key has no record yet: the proxy's sync interval.
    pub first_span_ms: u64,
}

/// Offered load over `span_ms` in parts per billion of the limit's rate:
/// `hits · window / (max · span)`, capped at [`DEMAND_CAP`].
pub fn observed_demand(hits: u64, max: u64, window_ms: u64, span_ms: u64) -> u64 {
    let den = u128::from(max.max(1)) * u128::from(span_ms.max(1));
    let x = (u128::from(hits) * u128::from(window_ms)).checked_mul(u128::from(ONE));
    x.map_or(DEMAND_CAP, |x| (x / den).min(u128::from(DEMAND_CAP)) as u64)
}

/// What a peer wants: `min(1, d·(1 + m) + ε)`.
pub fn want(demand: u64, p: &ShareParams) -> u64 {
    let grown = demand.min(DEMAND_CAP) * (1_000_000 + u64::from(p.margin_ppm)) / 1_000_000;
    (grown + u64::from(p.epsilon)).min(ONE)
}

/// Max-min fair level over `wants`: the largest `L` with `Σ min(want, L) ≤ 1`, or 1
/// when the wants fit. Each round counts the wants at or below the current level as
/// satisfied; the level only rises, so the satisfied set only grows and the loop ends
/// within `wants.len()` rounds.
pub fn water_level(wants: impl Iterator<Item = u64> + Clone) -> u64 {
    if wants.clone().sum::<u64>() <= ONE {
        return ONE;
    }
    let mut level = 0;
    loop {
        let (mut satisfied, mut above) = (0u64, 0u64);
        for w in wants.clone() {
            if w <= level {
                satisfied += w;
            } else {
                above += 1;
            }
        }
        let next = (ONE - satisfied.min(ONE)) / above.max(1);
        if above == 0 || next == level {
            return level.max(next);
        }
        level = next;
    }
}

/// Runs one report of proxy `me` against the record `peers` of a key, updating it in
/// place, and returns `me`'s grant (parts per billion). `is_live` says whether a
/// proxy is live (it synced within `3·interval`); `now_ms` is the store's clock.
pub fn allocate<Id: PartialEq + Clone>(
    peers: &mut Vec<Peer<Id>>,
    me: &Id,
    report: &Report,
    now_ms: u64,
    is_live: impl Fn(&Id) -> bool,
    p: &ShareParams,
) -> u32 {
    // A store clock that went backwards keeps records rather than dropping them all.
    peers.retain(|q| is_live(&q.proxy) && q.updated_ms.saturating_add(p.lease_ms) > now_ms);
    let mine = peers.iter().position(|q| &q.proxy == me);
    if mine.is_none() && peers.len() >= p.max_peers {
        // Not stored, so its share could not be subtracted from the others': nothing.
        return 0;
    }
    let span = match mine {
        Some(i) => now_ms.saturating_sub(peers[i].updated_ms),
        None => report.first_span_ms,
    };
    let x = observed_demand(report.hits, report.max, report.window_ms, span);
    let demand = match mine.map(|i| peers[i].demand) {
        None => x,
        Some(d) => match p.smoothing {
            Smoothing::None => x,
            Smoothing::HalveFastDown if x < d / 2 => x,
            Smoothing::Halve | Smoothing::HalveFastDown => (d + x) / 2,
        },
    };
    let i = mine.unwrap_or_else(|| {
        peers.push(Peer {
            proxy: me.clone(),
            demand,
            grant: 0,
            updated_ms: now_ms,
        });
        peers.len() - 1
    });
    peers[i].demand = demand;
    peers[i].updated_ms = now_ms;

    let level = water_level(peers.iter().map(|q| want(q.demand, p)));
    let target = want(demand, p).min(level);
    let others: u64 = (peers.iter().enumerate())
        .filter(|&(j, _)| j != i)
        .map(|(_, q)| u64::from(q.grant))
        .sum();
    let grant = target.min(ONE.saturating_sub(others)) as u32;
    peers[i].grant = grant;
    grant
}

#[cfg(test)]
mod tests;
