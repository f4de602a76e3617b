//! Which proxies are live: the registry the share allocation asks (`core::shares` takes
//! liveness from its caller).
//!
//! Every report, an empty one included (a heartbeat), marks its proxy live until
//! `3·interval_ms` later on the store's clock; a proxy that has not reported since is
//! dead, and the allocation drops its peers from every record it touches, so the shares
//! it held go back within three of its intervals instead of living out the lease. The
//! answer's `proxies` is the live count, which a new key starts from (`1/n`).
//!
//! - The embedded store keeps a [`Registry`] in process (one per store, so the fallback
//!   has its own: the proxies that reported to this instance).
//! - Redis and Redis Cluster keep one sorted set (`KeyMaker::registry_key`: proxy id ->
//!   the store-clock millisecond it stops being live), written by `lua/liveness.lua`
//!   on `TIME`. The script also answers the live count and the ids that died within the
//!   lease; the service passes those to the per-key script (`lua/sync.lua`), which drops
//!   their peers. Ids are kept one lease past their death (after that their peers are
//!   gone by the lease anyway) and then removed. A report costs one round trip for the
//!   registry, before the one pipeline per node of its keys.
//!
//! A proxy id the registry has never seen (a registry lost in a failover that did not
//! replicate it) counts as live in Redis until the lease drops its peers: the
//! conservative side for the sum of shares, which only ever counts more holders.

use std::collections::HashMap;

/// A proxy is live for this many of its intervals after a report.
pub const LIVE_INTERVALS: u64 = 3;

/// Most proxies one registry tracks (live or dead within the lease); a report from one
/// more is a store failure (answered by the fallback), not unbounded memory.
pub const MAX_PROXIES: usize = 100_000;

/// Most recently dead ids passed to the per-key script; past it the oldest deaths are
/// left to the lease. They travel in every `sync.lua` call of a report (up to 128 bytes
/// each, a few hundred calls for a 10 000-entry report), so the bound keeps a churning
/// fleet (every Envoy restart is a new id) from making reports megabytes larger.
pub const MAX_DEAD_PASSED: usize = 256;

/// Until when a report at `now_ms` keeps a proxy with interval `interval_ms` live.
pub fn live_until(now_ms: u64, interval_ms: u64) -> u64 {
    now_ms.saturating_add(LIVE_INTERVALS.saturating_mul(interval_ms))
}

/// The in-process registry: proxy id -> store-clock ms until which it is live.
#[derive(Debug)]
pub struct Registry {
    until: HashMap<String, u64>,
    max: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(MAX_PROXIES)
    }
}

impl Registry {
    /// An empty registry of at most `max` proxies.
    pub fn new(max: usize) -> Self {
        Registry {
            until: HashMap::new(),
            max,
        }
    }

    /// Marks `proxy` live after a report at `now_ms`; the live count after it, or
    /// `None` when the registry is full of live proxies.
    pub fn heartbeat(&mut self, proxy: &str, interval_ms: u64, now_ms: u64) -> Option<u32> {
        let until = live_until(now_ms, interval_ms);
        if let Some(u) = self.until.get_mut(proxy) {
            *u = until;
        } else {
            if self.until.len() >= self.max {
                self.sweep(now_ms);
                if self.until.len() >= self.max {
                    return None;
                }
            }
            self.until.insert(proxy.to_string(), until);
        }
        Some(self.live(now_ms))
    }

    pub fn is_live(&self, proxy: &str, now_ms: u64) -> bool {
        self.until.get(proxy).is_some_and(|&u| u > now_ms)
    }

    /// Proxies live at `now_ms`.
    pub fn live(&self, now_ms: u64) -> u32 {
        let n = self.until.values().filter(|&&u| u > now_ms).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Forgets the dead.
    pub fn sweep(&mut self, now_ms: u64) {
        self.until.retain(|_, &mut u| u > now_ms);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_live_for_three_intervals_after_each_report() {
        let mut r = Registry::default();
        assert_eq!(r.heartbeat("a", 1000, 10_000), Some(1));
        assert_eq!(r.heartbeat("b", 100, 10_000), Some(2));
        assert!(r.is_live("a", 12_999) && !r.is_live("a", 13_000));
        assert!(r.is_live("b", 10_299) && !r.is_live("b", 10_300));
        assert_eq!(r.live(10_300), 1);
        // A report renews it; an unknown id is dead.
        assert_eq!(r.heartbeat("b", 100, 10_300), Some(2));
        assert!(r.is_live("b", 10_599));
        assert!(!r.is_live("c", 0));
        r.sweep(13_000);
        assert!(r.is_empty());
    }

    #[test]
    fn the_registry_is_bounded_and_makes_room_from_the_dead() {
        // The bound is the registry's own (MAX_PROXIES in the stores); a small one here.
        let mut r = Registry::new(1000);
        for i in 0..1000 {
            assert!(r.heartbeat(&format!("p{i}"), 10, 0).is_some());
        }
        assert_eq!(r.heartbeat("one-more", 10, 0), None, "full of live proxies");
        assert_eq!(r.heartbeat("p0", 10, 0), Some(1000), "known ids renew");
        // Once they are dead, a newcomer finds room.
        assert_eq!(r.heartbeat("one-more", 10, 30), Some(1));
        assert_eq!(r.len(), 1);
    }
}
