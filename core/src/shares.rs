//! The companion's share allocation (global scope): which part of one key's limit each
//! proxy may admit locally until its next report.
//!
//! A record per (rule, key, limit) keeps, per proxy that reported the key, its smoothed
//! demand, its grant and when it last reported. On a report from proxy `p`:
//!
//! 1. peers whose proxy is dead (no sync for `3·interval`, told by the caller) or that
//!    did not report the key within the lease are dropped: their shares return;
//! 2. `p`'s demand is updated from what it saw (admitted + rejected) over the span since
//!    it last reported the key ([`Smoothing`]: an average, or a jump on a change beyond
//!    the Poisson noise);
//! 3. every live peer wants `min(1, d·(1 + m) + ε)`. When the wants sum to more than 1
//!    (contended), max-min fair **water-filling** finds the level `L` with
//!    `Σ min(want, L) = 1` and `p`'s target is `min(want_p, L)`: work-conserving, no
//!    per-proxy floor, so a 90/5/5 split wastes only the small proxies' margins. When
//!    they fit, `p` gets its want plus [`headroom`] for the noise of its own demand,
//!    water-filled out of the capacity nobody wants;
//! 4. its grant is `g_p = min(target, 1 − Σ_{q≠p} g_q)`: what the others hold is never
//!    handed out twice, so **the grants of the live peers sum to at most 1 at every
//!    instant**, whatever order reports arrive in. A grant below its target is
//!    *pending*: the proxy reports the key again next interval, by when the others
//!    have shrunk on their own reports.
//!
//! Everything stored is an integer: shares and demands in parts per billion of the
//! limit (demand `1e9` = the limit's rate), times in store-clock milliseconds. The loops
//! allocate nothing and use only `+ − × ÷ min` and an integer square root, so the Lua
//! script that runs this in Redis is a line-by-line port: Lua numbers are exact
//! integers below 2^53, which every stored value and intermediate stays under except
//! the products in [`observed_demand`] and [`expected_hits`] (there Lua may round
//! differently by a part per billion, or one hit).
//! The parameters were chosen with the simulation (`docs/global-limits.md`).

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

/// How a proxy's demand follows what it reports. Counts over one interval are noisy
/// (a proxy seeing 12 requests per interval sees 12 ± 3.5, a quiet key sees 0 or 1),
/// and every wobble of a small proxy's share costs the saturated ones: capacity it
/// gives up stays idle until they report, capacity it needs waits for them. So:
/// - a report within `jump_sigmas` standard deviations of what the demand predicts
///   (Poisson: `(hits − e)² ≤ k²·e`) moves the demand as an average,
///   `d ← (keep·d + x) / (keep + 1)`;
/// - a report beyond it is a real change (the demand moved, stopped or grew):
///   `d ← x` at once, so a share whose demand went elsewhere comes back within one
///   report. A quiet key that saw nothing this interval (`e = 1`, 0 hits) is noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smoothing {
    pub keep: u32,
    pub jump_sigmas: u32,
}

impl Smoothing {
    /// The new demand from the old `d` and the observed `x` (both in parts per 10⁹ of
    /// the limit's rate), `hits` being the count `x` came from and `e` the count `d`
    /// predicted over the same span.
    pub fn next(&self, d: u64, x: u64, hits: u64, e: u64) -> u64 {
        let k = u128::from(self.jump_sigmas);
        let dev = u128::from(hits.abs_diff(e));
        if dev * dev > k * k * u128::from(e.max(1)) {
            return x;
        }
        let keep = u64::from(self.keep);
        (keep * d + x) / (keep + 1)
    }
}

/// The count a demand `d` (parts per 10⁹ of `max` per `window_ms`) predicts over
/// `span_ms`.
pub fn expected_hits(d: u64, max: u64, window_ms: u64, span_ms: u64) -> u64 {
    let num = u128::from(d) * u128::from(max) * u128::from(span_ms);
    let e = num / (u128::from(ONE) * u128::from(window_ms.max(1)));
    u64::try_from(e).unwrap_or(u64::MAX)
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
    /// `z` of [`headroom`].
    pub headroom_sigmas: u32,
}

impl Default for ShareParams {
    /// The values the simulation chose (see `docs/global-limits.md`).
    fn default() -> Self {
        ShareParams {
            margin_ppm: 10_000,
            epsilon: 10_000,
            lease_ms: 600_000,
            max_peers: 256,
            smoothing: Smoothing {
                keep: 3,
                jump_sigmas: 3,
            },
            headroom_sigmas: 1,
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
    /// The span to assume when the key has no record yet: the time since the proxy
    /// created the key's entry (at most what it last reported for the key).
    pub first_span_ms: u64,
    /// The proxy's sync interval.
    pub interval_ms: u64,
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

/// Headroom for a proxy's demand `d` when capacity is free: `z` standard deviations of
/// its count per interval (`per_interval` = requests per interval at the whole limit),
/// `z·√(d / per_interval)`. A share that follows demand exactly runs a bucket that
/// random-walks empty under Poisson arrivals and refuses a client that is within its
/// limit; the headroom that prevents it grows with √demand, so it is large for small
/// demands and small for large ones. Only handed out from capacity no one else wants.
pub fn headroom(d: u64, per_interval: u64, p: &ShareParams) -> u64 {
    let var = u128::from(d.min(DEMAND_CAP)) * u128::from(ONE) / u128::from(per_interval.max(1));
    u64::from(p.headroom_sigmas) * (var.min(u128::from(u64::MAX)) as u64).isqrt()
}

/// Max-min fair level over `wants`: the largest `L` with `Σ min(want, L) ≤ 1`, or 1
/// when the wants fit.
pub fn water_level(wants: impl Iterator<Item = u64> + Clone) -> u64 {
    water_level_of(ONE, wants)
}

/// The largest `L` with `Σ min(want, L) ≤ total`, or `total` when the wants fit. Each
/// round counts the wants at or below the current level as satisfied; the level only
/// rises, so the satisfied set only grows and the loop ends within `wants.len()`
/// rounds.
pub fn water_level_of(total: u64, wants: impl Iterator<Item = u64> + Clone) -> u64 {
    if wants.clone().sum::<u64>() <= total {
        return total;
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
        let next = (total - satisfied.min(total)) / above.max(1);
        if above == 0 || next == level {
            return level.max(next);
        }
        level = next;
    }
}

/// Proxy `me` no longer holds the key (its filter evicted the entry, or reports it
/// released): its record goes, and with it its share.
pub fn release<Id: PartialEq>(peers: &mut Vec<Peer<Id>>, me: &Id) {
    peers.retain(|q| &q.proxy != me);
}

/// The outcome of one report for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub grant: u32,
    /// What fairness gives this proxy; above `grant` while others still hold the
    /// difference. The proxy should then report the key again next interval (the
    /// others shrink on their reports), or the capacity set aside for it stays idle.
    pub target: u32,
}

impl Allocation {
    pub fn pending(&self) -> bool {
        self.grant < self.target
    }
}

/// [`allocate_detailed`], the grant only.
pub fn allocate<Id: PartialEq + Clone>(
    peers: &mut Vec<Peer<Id>>,
    me: &Id,
    report: &Report,
    now_ms: u64,
    is_live: impl Fn(&Id) -> bool,
    p: &ShareParams,
) -> u32 {
    allocate_detailed(peers, me, report, now_ms, is_live, p).grant
}

/// Runs one report of proxy `me` against the record `peers` of a key, updating it in
/// place, and returns `me`'s grant (parts per billion) and target. `is_live` says
/// whether a proxy is live (it synced within `3·interval`); `now_ms` is the store's
/// clock.
pub fn allocate_detailed<Id: PartialEq + Clone>(
    peers: &mut Vec<Peer<Id>>,
    me: &Id,
    report: &Report,
    now_ms: u64,
    is_live: impl Fn(&Id) -> bool,
    p: &ShareParams,
) -> Allocation {
    // A store clock that went backwards keeps records rather than dropping them all.
    peers.retain(|q| is_live(&q.proxy) && q.updated_ms.saturating_add(p.lease_ms) > now_ms);
    let mine = peers.iter().position(|q| &q.proxy == me);
    if mine.is_none() && peers.len() >= p.max_peers {
        // Not stored, so its share could not be subtracted from the others': nothing.
        return Allocation {
            grant: 0,
            target: 0,
        };
    }
    let span = match mine {
        Some(i) => now_ms.saturating_sub(peers[i].updated_ms),
        None => report.first_span_ms,
    };
    let x = observed_demand(report.hits, report.max, report.window_ms, span);
    let demand = mine.map_or(x, |i| {
        let d = peers[i].demand;
        let e = expected_hits(d, report.max, report.window_ms, span);
        p.smoothing.next(d, x, report.hits, e)
    });
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

    let wants = peers.iter().map(|q| want(q.demand, p));
    let sum: u64 = wants.clone().sum();
    let target = if sum > ONE {
        // Contended: max-min fair shares of the whole.
        want(demand, p).min(water_level(wants))
    } else {
        // Room to spare: everyone gets its want, plus noise headroom out of the rest.
        let per_interval = report.max.saturating_mul(report.interval_ms) / report.window_ms.max(1);
        let extra = |q: &Peer<Id>| headroom(q.demand, per_interval, p);
        let level = water_level_of(ONE - sum, peers.iter().map(extra));
        want(demand, p) + extra(&peers[i]).min(level)
    };
    let others: u64 = (peers.iter().enumerate())
        .filter(|&(j, _)| j != i)
        .map(|(_, q)| u64::from(q.grant))
        .sum();
    let grant = target.min(ONE.saturating_sub(others)) as u32;
    peers[i].grant = grant;
    Allocation {
        grant,
        target: target as u32,
    }
}

#[cfg(test)]
mod tests;
