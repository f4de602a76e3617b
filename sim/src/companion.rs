//! The simulated companion: a liveness registry and one share record per key, run by
//! `core::shares`.

use std::collections::HashMap;

use meshlimit_core::shares::{self, Peer};

use crate::proxy::{Answer, SentReport};
use crate::world::Config;

pub(crate) struct Companion {
    pub(crate) records: HashMap<u32, Vec<Peer<u16>>>,
    pub(crate) last_seen: Vec<Option<u64>>,
}

/// Runs one scenario.
impl Companion {
    pub(crate) fn handle(&mut self, cfg: &Config, r: &SentReport, now: u64) -> Answer {
        let now_ms = now / 1_000_000;
        self.last_seen[r.proxy as usize] = Some(now);
        let ttl = 3 * cfg.interval_ns;
        let seen = &self.last_seen;
        let is_live = |q: &u16| seen[*q as usize].is_some_and(|t| now < t + ttl);
        let n_live = (0..seen.len() as u16).filter(|q| is_live(q)).count() as u32;
        let limit = cfg.limit;
        let grants = r
            .entries
            .iter()
            .map(|&(client, admitted, rejected, span_ms)| {
                let report = shares::Report {
                    hits: u64::from(admitted) + u64::from(rejected),
                    max: limit.max,
                    window_ms: limit.window_secs * 1000,
                    first_span_ms: u64::from(span_ms),
                    interval_ms: cfg.interval_ns / 1_000_000,
                };
                let peers = self.records.entry(client).or_default();
                let a = shares::allocate_detailed(
                    peers,
                    &r.proxy,
                    &report,
                    now_ms,
                    is_live,
                    &cfg.shares,
                );
                (client, a.grant, a.pending(), admitted)
            })
            .collect();
        Answer {
            proxy: r.proxy,
            life: r.life,
            sent_ns: r.sent_ns,
            n_live,
            grants,
        }
    }
}
