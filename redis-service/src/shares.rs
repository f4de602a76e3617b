//! Share ("weight") allocation: which part of one key's limit each proxy may admit
//! locally until its next report.
//!
//! Every key (rule, client, window) keeps, per proxy, a demand estimate (requests per
//! second seen, admitted + rejected, smoothed) and the grant it was last given, with the
//! time of its last report. On a report from proxy `p`:
//!
//! 1. peers not heard from for `ttl_ms` are dropped: idle proxies' shares return to the
//!    pool;
//! 2. `p`'s demand becomes `d_p = (d_p_old + rate) / 2` (just `rate` when new);
//! 3. its target is `t_p = (1 − h)·((1 − f)·d_p / Σd + f / n)` (`n` live proxies, `f`
//!    the floor, `h` the headroom, 0 by default): demand-proportional, plus an even part
//!    so no active proxy starves; `(1 − h)/n` when nobody has demand. A new proxy's
//!    target is its demand-based share plus `f/n`, never the whole;
//! 4. its grant is `g_p = min(t_p, 1 − Σ_{q≠p} g_q)`: what the others currently hold
//!    is never handed out twice, so **the grants of all live proxies sum to at most 1**
//!    at every instant, whatever order reports arrive in.
//!
//! Because a proxy can only shrink the others' grants by waiting for them to report,
//! shares converge to a demand change within two report intervals (the growing proxy
//! waits for the shrinking one to report, then reports itself). The same steps run in
//! `lua/sync.lua` for Redis; this module is the reference, used by the in-memory store
//! and unit-tested here.

use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peer {
    /// Smoothed demand, requests per second.
    pub demand: f64,
    /// Share last granted, in [0, 1].
    pub grant: f64,
    /// Store-clock milliseconds of its last report.
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShareParams {
    pub ttl_ms: u64,
    pub floor: f64,
    /// Most proxies tracked per key; a newcomer beyond it is not stored and gets share 0
    /// (bounds memory and the script's work).
    pub max_peers: usize,
    /// Part of the limit never handed out in steady state, so that a proxy that appears
    /// gets at least this much at once (instead of waiting one report interval for the
    /// incumbents to shrink). Costs the same fraction of under-admission.
    pub headroom: f64,
}

/// Most proxies tracked per key (see [`ShareParams::max_peers`]).
pub const MAX_PEERS: usize = 256;

/// Runs one report of proxy `me` (with `rate` requests/s of demand) against `peers`,
/// updating them in place, and returns `me`'s grant.
pub fn allocate(
    peers: &mut HashMap<String, Peer>,
    me: &str,
    rate: f64,
    now_ms: u64,
    p: &ShareParams,
) -> f64 {
    let rate = if rate.is_finite() && rate > 0.0 {
        rate
    } else {
        0.0
    };
    peers.retain(|_, q| q.updated_ms.saturating_add(p.ttl_ms) > now_ms);
    let known = peers.contains_key(me);
    let demand = match peers.get(me) {
        Some(q) => (q.demand + rate) / 2.0,
        None => rate,
    };
    let n = peers.len() + usize::from(!known);
    let mut sum_d = demand;
    let mut others = 0.0;
    for (id, q) in peers.iter() {
        if id != me {
            sum_d += q.demand;
            others += q.grant;
        }
    }
    let floor = p.floor.clamp(0.0, 1.0);
    let target = if sum_d > 0.0 {
        (1.0 - floor) * demand / sum_d + floor / n as f64
    } else {
        1.0 / n as f64
    } * (1.0 - p.headroom.clamp(0.0, 1.0));
    if !known && peers.len() >= p.max_peers {
        // Not tracked, so whatever it got would not be subtracted from the others'
        // grants: it gets nothing, which keeps the sum bound.
        return 0.0;
    }
    let grant = target.min(1.0 - others).clamp(0.0, 1.0);
    peers.insert(
        me.to_string(),
        Peer {
            demand,
            grant,
            updated_ms: now_ms,
        },
    );
    grant
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(peers: &HashMap<String, Peer>) -> f64 {
        peers.values().map(|q| q.grant).sum()
    }

    const P: ShareParams = ShareParams {
        ttl_ms: 3000,
        floor: 0.1,
        max_peers: MAX_PEERS,
        headroom: 0.0,
    };

    #[test]
    fn single_proxy_gets_everything() {
        let mut peers = HashMap::new();
        assert_eq!(allocate(&mut peers, "a", 10.0, 0, &P), 1.0);
        assert_eq!(allocate(&mut peers, "a", 0.0, 100, &P), 1.0);
    }

    #[test]
    fn sum_never_exceeds_one_under_random_reports() {
        // A deterministic pseudo-random walk: proxies join, leave, change demand.
        let mut peers = HashMap::new();
        let mut x: u64 = 0x1234_5678;
        let mut now = 0u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let who = format!("p{}", x % 13);
            let rate = ((x >> 8) % 1000) as f64 * if x.is_multiple_of(5) { 0.0 } else { 1.0 };
            now += (x >> 20) % 400;
            let g = allocate(&mut peers, &who, rate, now, &P);
            assert!((0.0..=1.0).contains(&g));
            let live: f64 = peers
                .values()
                .filter(|q| q.updated_ms + P.ttl_ms > now)
                .map(|q| q.grant)
                .sum();
            assert!(live <= 1.0 + 1e-9, "sum of grants {live} > 1");
        }
    }

    #[test]
    fn shares_follow_demand() {
        let mut peers = HashMap::new();
        // a sees 900 req/s, b 100 req/s; report in turns until steady.
        let (mut ga, mut gb) = (0.0, 0.0);
        for i in 0..10 {
            ga = allocate(&mut peers, "a", 900.0, i * 1000, &P);
            gb = allocate(&mut peers, "b", 100.0, i * 1000 + 500, &P);
        }
        // targets: 0.9*0.9+0.05 = 0.86, 0.9*0.1+0.05 = 0.14
        assert!((ga - 0.86).abs() < 0.01, "a got {ga}");
        assert!((gb - 0.14).abs() < 0.01, "b got {gb}");
        assert!(sum(&peers) <= 1.0 + 1e-9);

        // Demand flips. Smoothing halves the gap each report, so after four rounds
        // demand is (156, 844): b's target is 0.9 * 0.844 + 0.05 = 0.81.
        for i in 10..14 {
            ga = allocate(&mut peers, "a", 100.0, i * 1000, &P);
            gb = allocate(&mut peers, "b", 900.0, i * 1000 + 500, &P);
        }
        assert!(gb > 0.8 && ga < 0.2, "after flip a={ga} b={gb}");
    }

    #[test]
    fn newcomer_is_not_starved_and_idle_share_returns() {
        let mut peers = HashMap::new();
        for i in 0..5 {
            allocate(&mut peers, "a", 1000.0, i * 1000, &P);
        }
        // b arrives with little demand while a holds (nearly) everything.
        let first = allocate(&mut peers, "b", 1.0, 5000, &P);
        assert!(first >= 0.0);
        allocate(&mut peers, "a", 1000.0, 6000, &P);
        let later = allocate(&mut peers, "b", 1.0, 6500, &P);
        // The floor guarantees at least f/n = 0.05.
        assert!(later >= 0.05 - 1e-9, "b starved: {later}");

        // a goes idle: after the TTL its grant is back in the pool and b gets it all.
        let g = allocate(&mut peers, "b", 1.0, 6500 + P.ttl_ms + 1, &P);
        assert_eq!(g, 1.0);
        assert_eq!(peers.len(), 1);
    }

    #[test]
    fn headroom_gives_a_newcomer_a_share_at_once() {
        let p = ShareParams {
            headroom: 0.05,
            ..P
        };
        let mut peers = HashMap::new();
        for i in 0..5 {
            allocate(&mut peers, "a", 1000.0, i * 1000, &p);
        }
        assert!((sum(&peers) - 0.95).abs() < 1e-9);
        let b = allocate(&mut peers, "b", 1000.0, 5000, &p);
        assert!((b - 0.05).abs() < 1e-9, "b got {b}");
        // Without headroom the newcomer waits for a's next report.
        let mut peers = HashMap::new();
        allocate(&mut peers, "a", 1000.0, 0, &P);
        assert_eq!(allocate(&mut peers, "b", 1000.0, 1, &P), 0.0);
        allocate(&mut peers, "a", 1000.0, 1000, &P);
        assert!(allocate(&mut peers, "b", 1000.0, 1001, &P) >= 0.5 - 1e-9);
    }

    #[test]
    fn no_demand_splits_evenly_and_peers_are_bounded() {
        let mut peers = HashMap::new();
        let p = ShareParams { max_peers: 3, ..P };
        allocate(&mut peers, "a", 0.0, 0, &p);
        allocate(&mut peers, "b", 0.0, 1, &p);
        allocate(&mut peers, "a", 0.0, 2, &p);
        let gb = allocate(&mut peers, "b", 0.0, 3, &p);
        assert!((gb - 0.5).abs() < 1e-9);
        allocate(&mut peers, "c", 0.0, 4, &p);
        let gd = allocate(&mut peers, "d", 0.0, 5, &p);
        assert_eq!(peers.len(), 3, "d must not be stored");
        assert_eq!(gd, 0.0);
        // Garbage rates are demand 0, not NaN.
        let g = allocate(&mut peers, "a", f64::NAN, 6, &p);
        assert!(g.is_finite());
    }
}
