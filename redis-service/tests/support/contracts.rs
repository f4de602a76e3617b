//! The contracts both stores must keep, run against any running service: multi-window
//! limits, shares of a sync key, true retry and reset times, and checks answered while
//! large reports run.

use super::client::Client;
use super::{check, metric, uniq};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The multi-window contract shared by both algorithms: "api" is 5 per 2 s and 8 per hour.
pub async fn multi_window_contract(c: &Client) {
    let id = uniq("mw");
    for i in 0..5 {
        let r = check(c, &id, "api", 1).await;
        assert_eq!(r["allowed"], true, "hit {i}: {r}");
    }
    let r = check(c, &id, "api", 1).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["limit"], 5);
    assert!(r["retry_after"].as_u64().unwrap() >= 1);
    // All-or-nothing: the refused hit was not counted in the hour window either. After the
    // short window frees up, exactly 3 more fit (8 per hour).
    tokio::time::sleep(Duration::from_millis(4100)).await;
    let r = check(c, &id, "api", 4).await;
    assert_eq!(r["allowed"], false, "4 more exceed the hour: {r}");
    assert_eq!(r["limit"], 8);
    assert_eq!(r["remaining"], 3);
    let r = check(c, &id, "api", 3).await;
    assert_eq!(r["allowed"], true, "{r}");
    assert_eq!(r["remaining"], 0);
    assert_eq!(check(c, &id, "api", 1).await["allowed"], false);
}

/// Two proxies report one key; shares follow demand and never sum above 1; an idle
/// proxy's share returns to the pool after the TTL. Used by the Redis tests too.
pub async fn sync_contract(c: &Client) {
    let key = format!(
        "{:016x}",
        uniq("k").len() as u64 ^ std::process::id() as u64 ^ rand_u64()
    );
    let report = |proxy: &str, admitted: u64, rejected: u64| {
        json!({"proxy_id": proxy, "zone": "az1", "span_ms": 1000, "entries": [
            {"rule": "unknown-to-service", "key": key, "window_secs": 60, "max": 1000,
             "admitted": admitted, "rejected": rejected}]})
    };
    let mut wa = 0.0;
    let mut wb = 0.0;
    let mut used = 0;
    for _ in 0..6 {
        let r = c.post_json("/v1/sync", &report("a", 90, 0)).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let j = r.json();
        assert_eq!(j["degraded"], false);
        wa = j["entries"][0]["weight"].as_f64().unwrap();
        let r = c.post_json("/v1/sync", &report("b", 10, 0)).await.unwrap();
        let j = r.json();
        wb = j["entries"][0]["weight"].as_f64().unwrap();
        used = j["entries"][0]["used"].as_u64().unwrap();
        assert!(wa + wb <= 1.0 + 1e-9, "a={wa} b={wb}");
    }
    // Default floor f = 0.05: a = 0.95 * 0.9 + 0.025, b = 0.95 * 0.1 + 0.025.
    assert!(
        (wa - 0.88).abs() < 0.01 && (wb - 0.12).abs() < 0.01,
        "a={wa} b={wb}"
    );
    assert_eq!(used, 600, "global count is the sum of what both admitted");
    // b stops reporting; after the TTL a gets everything.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = c.post_json("/v1/sync", &report("a", 1, 0)).await.unwrap();
    let j = r.json();
    assert_eq!(j["entries"][0]["weight"].as_f64().unwrap(), 1.0, "{j}");
    assert_eq!(j["ttl_ms"], 2000);
}

fn rand_u64() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn sleep_until_unix(t: f64) {
    let d = t - unix_now();
    if d > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(d)).await;
    }
}

/// `retry_after` and `reset_at` name a time at which a retry succeeds, and a retry just
/// before it fails ("retry" is 2 per 2 s). The store runs on this machine's clock (the
/// embedded store) or Redis' `TIME` on the same machine.
///
/// Sliding window: the refused third hit can come back when the first two have decayed
/// enough, 2.9 s later (`retry_after` 3); one second earlier is still refused. A single
/// hit's limit is full again at the second window boundary ahead (`reset_at`); a request
/// for the whole limit 0.25 s earlier is refused. Token bucket: the same, with
/// `reset_at` rounded up to a whole second from the bucket's own time, so "before" is
/// one second before.
pub async fn retry_contract(c: &Client, sliding: bool) {
    // 0.1 s into an even second: the 2 s windows start where this test thinks.
    let now = unix_now();
    sleep_until_unix((now / 2.0).floor() * 2.0 + 2.1).await;
    let a = uniq("retry-a");
    assert_eq!(check(c, &a, "retry", 2).await["allowed"], true);
    let r = check(c, &a, "retry", 1).await;
    let refused_at = unix_now();
    assert_eq!(r["allowed"], false, "{r}");
    let retry = r["retry_after"].as_u64().unwrap() as f64;
    if sliding {
        assert_eq!(retry, 3.0, "{r}");
    }
    sleep_until_unix(refused_at + retry - 1.0 - 0.05).await;
    let early = check(c, &a, "retry", 1).await;
    assert_eq!(
        early["allowed"], false,
        "admitted before retry_after: {early}"
    );
    sleep_until_unix(refused_at + retry).await;
    let on_time = check(c, &a, "retry", 1).await;
    assert_eq!(
        on_time["allowed"], true,
        "refused at retry_after {retry}: {on_time}"
    );

    let b = uniq("retry-b");
    let r = check(c, &b, "retry", 1).await;
    assert_eq!(r["allowed"], true, "{r}");
    let reset = r["reset_at"].as_u64().unwrap() as f64;
    assert!(reset > unix_now(), "{r}");
    sleep_until_unix(reset - if sliding { 0.25 } else { 1.05 }).await;
    let early = check(c, &b, "retry", 2).await;
    assert_eq!(
        early["allowed"], false,
        "whole limit before reset_at {reset}: {early}"
    );
    sleep_until_unix(reset).await;
    let on_time = check(c, &b, "retry", 2).await;
    assert_eq!(
        on_time["allowed"], true,
        "whole limit refused at reset_at {reset}: {on_time}"
    );
}

/// What [`checks_under_reports`] saw.
#[derive(Debug)]
pub struct UnderReports {
    pub checks: u64,
    pub checks_from_fallback: f64,
    pub slowest_check: Duration,
    pub reports: u64,
    /// Reports not answered 200 from the store (`degraded: true` or an error).
    pub reports_not_from_store: u64,
    pub slowest_report: Duration,
    pub degraded_transitions: f64,
}

/// Checks from `conc` workers (one client id each, rule "many") while reports of the
/// largest size a report may have (`MAX_SYNC_ENTRIES`) are sent at `rate` per second for
/// `secs`, open loop (a slow answer does not hold the next report back, as proxies do
/// not wait for each other).
pub async fn checks_under_reports(c: &Client, rate: f64, secs: f64, conc: usize) -> UnderReports {
    use meshlimit_core::protocol::MAX_SYNC_ENTRIES;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    let base = rand_u64() & 0xffff_ffff_0000_0000;
    let bodies: Vec<Vec<u8>> = (0..4u64)
        .map(|b| {
            let entries: Vec<_> = (0..MAX_SYNC_ENTRIES as u64)
                .map(|i| {
                    json!({"rule": "bulk", "key": format!("{:016x}", base + b * 100_000 + i),
                                "window_secs": 60, "max": 1_000_000, "admitted": 1, "rejected": 0})
                })
                .collect();
            serde_json::to_vec(&json!({"proxy_id": format!("bulk-{b}"), "span_ms": 1000,
                                       "entries": entries}))
            .unwrap()
        })
        .collect();
    let src = |s: &str| {
        format!(
            "meshlimit_decisions_total{{endpoint=\"check\",decision=\"allowed\",source=\"{s}\"}}"
        )
    };
    let fb0 = metric(c, &src("fallback")).await;
    let deg0 = metric(c, "meshlimit_degraded_transitions_total").await;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..conc)
        .map(|w| {
            let (c, stop, checks, slowest) =
                (c.clone(), stop.clone(), checks.clone(), slowest_us.clone());
            let id = uniq(&format!("under-{w}"));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = check(&c, &id, "many", 1).await;
                    assert_eq!(r["allowed"], true, "{r}");
                    slowest.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    checks.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut reports = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0;
    while Instant::now() < end {
        tick.tick().await;
        let (c, body) = (c.clone(), bodies[n % bodies.len()].clone());
        n += 1;
        reports.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = match c.post_raw("/v1/sync", body).await {
                Ok(r) => r.status == 200 && r.json()["degraded"] == false,
                Err(_) => false,
            };
            (ok, t.elapsed())
        }));
    }
    let mut not_ok = 0;
    let mut slowest_report = Duration::ZERO;
    let n_reports = reports.len() as u64;
    for r in reports {
        let (ok, took) = r.await.unwrap();
        not_ok += u64::from(!ok);
        slowest_report = slowest_report.max(took);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    UnderReports {
        checks: checks.load(Ordering::Relaxed),
        checks_from_fallback: metric(c, &src("fallback")).await - fb0,
        slowest_check: Duration::from_micros(slowest_us.load(Ordering::Relaxed)),
        reports: n_reports,
        reports_not_from_store: not_ok,
        slowest_report,
        degraded_transitions: metric(c, "meshlimit_degraded_transitions_total").await - deg0,
    }
}

/// The checks' side of [`checks_under_reports`]: every check was answered by the store
/// within its deadline (none by the fallback, the service never degraded), and the
/// reports were real load: all answered from the store in a release build; a debug
/// build parses a 10 000-entry report several times slower, so there at least half.
pub fn assert_checks_unharmed(u: &UnderReports) {
    assert!(u.checks > 100, "{u:?}");
    assert_eq!(
        u.checks_from_fallback, 0.0,
        "checks missed their deadline: {u:?}"
    );
    assert_eq!(u.degraded_transitions, 0.0, "{u:?}");
    if cfg!(debug_assertions) {
        assert!(u.reports_not_from_store * 2 <= u.reports, "{u:?}");
    } else {
        assert_eq!(u.reports_not_from_store, 0, "{u:?}");
    }
}
