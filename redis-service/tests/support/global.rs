//! The global-scope contracts every store keeps, run against a running service over
//! HTTP with the wire types the filter sends: shares of a key (Σ ≤ 1, water-filling,
//! pending, release, the global count), liveness (a proxy that stops reporting loses its
//! shares after three intervals; `proxies` counts the live) and strict checks (exactly
//! the limit under concurrency, all-or-nothing over several limits).

use super::client::Client;
use futures::stream::{self, StreamExt};
use meshlimit_core::gcra::SHARE_ONE;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static KEYS: AtomicU64 = AtomicU64::new(1);

/// A fingerprint no other test (or earlier run against the same Redis) uses.
pub fn fresh_key() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = KEYS.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}",
        t ^ (n << 48) ^ u64::from(std::process::id()) << 32
    )
}

/// A unique proxy id (the filter's `node.id/nonce` shape).
pub fn fresh_proxy(name: &str) -> String {
    format!("{name}/{}", fresh_key().get(8..).unwrap_or_default())
}

pub fn limit(window_secs: u64, max: u64, burst: u64) -> Value {
    json!({"window_secs": window_secs, "max": max, "burst": burst})
}

/// One reported key.
pub fn entry(key: &str, limits: &[Value], admitted: u64, rejected: u64, span_ms: u64) -> Value {
    json!({"rule": "g", "key": key, "limits": limits, "admitted": admitted,
           "rejected": rejected, "span_ms": span_ms})
}

pub fn release(key: &str, limits: &[Value]) -> Value {
    json!({"rule": "g", "key": key, "limits": limits, "admitted": 0, "span_ms": 1,
           "release": true})
}

/// `POST /v1/sync`; the answer, which must be 200 and valid for the report.
pub async fn sync(c: &Client, proxy: &str, interval_ms: u64, entries: Vec<Value>) -> Value {
    let body = json!({"proxy_id": proxy, "zone": "az-1", "interval_ms": interval_ms,
                      "entries": entries});
    let r = c.post_json("/v1/sync", &body).await.expect("sync request");
    assert_eq!(r.status, 200, "sync: {}", r.text());
    let report: meshlimit_core::protocol::SyncReport =
        serde_json::from_value(body).expect("a report");
    let answer: meshlimit_core::protocol::SyncAnswer =
        serde_json::from_slice(&r.body).expect("an answer of the wire type");
    answer
        .validate_for(&report)
        .expect("an answer the filter accepts");
    r.json()
}

/// The first share of the first entry.
pub fn share(a: &Value) -> u64 {
    a["entries"][0]["shares"][0].as_u64().unwrap()
}

/// Three proxies report one contended key 90/5/5 (twice the limit in all) every 100 ms:
/// their latest shares never sum above the whole, and water-filling gives the small ones
/// what they want (about 0.101 each: demand + 1 % + ε) and the busy one the rest (about
/// 0.798), not a floor each. A fourth proxy arriving with the busy one's demand is
/// pending (the others still hold the capacity it is owed); the busy one releasing the
/// key lets it collect. The global count is what they all admitted.
pub async fn shares_contract(c: &Client) {
    let key = fresh_key();
    let lim = [limit(1, 1000, 1000)];
    let (a, b, d) = (fresh_proxy("a"), fresh_proxy("b"), fresh_proxy("d"));
    let cc = fresh_proxy("c");
    let mut latest = [0u64; 3];
    for round in 0..14 {
        for (i, (p, hits)) in [(&a, 180), (&b, 10), (&cc, 10)].into_iter().enumerate() {
            let j = sync(c, p, 100, vec![entry(&key, &lim, hits, 0, 100)]).await;
            latest[i] = share(&j);
            let sum: u64 = latest.iter().sum();
            assert!(
                sum <= u64::from(SHARE_ONE),
                "round {round}: shares {latest:?}"
            );
            assert_eq!(j["degraded"], false, "{j}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f = |s: u64| s as f64 / 1e9;
    println!(
        "90/5/5 at twice the limit: shares {:.4} {:.4} {:.4}",
        f(latest[0]),
        f(latest[1]),
        f(latest[2])
    );
    assert!((0.74..=0.86).contains(&f(latest[0])), "{latest:?}");
    for s in &latest[1..] {
        assert!((0.07..=0.14).contains(&f(*s)), "{latest:?}");
    }
    assert!(
        latest.iter().sum::<u64>() >= 980_000_000,
        "work-conserving: {latest:?}"
    );

    // A newcomer with the busy proxy's demand: owed about (1 - 0.2) / 2, held elsewhere.
    let j = sync(c, &d, 100, vec![entry(&key, &lim, 180, 0, 100)]).await;
    let first = share(&j);
    assert_eq!(j["entries"][0]["pending"], true, "{j}");
    assert!(
        first <= u64::from(SHARE_ONE) - latest.iter().sum::<u64>() + 1,
        "{j}"
    );
    // The busy proxy gives the key up: its share is back at once.
    let j = sync(c, &a, 100, vec![release(&key, &lim)]).await;
    assert_eq!(share(&j), 0, "{j}");
    assert_eq!(j["entries"][0]["pending"], false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let j = sync(c, &d, 100, vec![entry(&key, &lim, 180, 0, 100)]).await;
    assert!(
        f(share(&j)) > 0.7,
        "the released share goes to the newcomer: {j}"
    );

    // The global count: a long window, two proxies.
    let key = fresh_key();
    let hour = [limit(3600, 100, 100), limit(60, 50, 10)];
    sync(c, &a, 1000, vec![entry(&key, &hour, 7, 3, 1000)]).await;
    let j = sync(c, &b, 1000, vec![entry(&key, &hour, 5, 0, 1000)]).await;
    assert_eq!(j["entries"][0]["used"], json!([12, 12]), "{j}");
    // A rule listing one limit twice: one record, the same share in both places.
    let twice = [limit(60, 50, 10), limit(60, 50, 10)];
    let j = sync(c, &a, 1000, vec![entry(&fresh_key(), &twice, 1, 0, 1000)]).await;
    let s = &j["entries"][0]["shares"];
    assert_eq!(s[0], s[1], "{j}");
}

/// Proxies `a` and `b` (interval 200 ms) share a key, each far over the limit; `b` stops
/// reporting: three of its
/// intervals later it is no longer counted live and its share is `a`'s to take; before
/// that it still is. An empty report is a heartbeat. `base` is the number of other
/// proxies live in the store (0 on a fresh one).
pub async fn liveness_contract(c: &Client, base: u64) {
    let key = fresh_key();
    let lim = [limit(1, 1000, 1000)];
    let (a, b) = (fresh_proxy("live-a"), fresh_proxy("live-b"));
    let j = sync(c, &a, 200, vec![]).await;
    assert_eq!(j["proxies"], base + 1, "a heartbeat counts: {j}");
    assert_eq!(j["entries"], json!([]));
    for _ in 0..4 {
        sync(c, &a, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
        let j = sync(c, &b, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
        assert_eq!(j["proxies"], base + 2, "{j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both want the whole limit: about half each.
    let j = sync(c, &a, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
    assert!(share(&j) < 600_000_000, "{j}");
    // b is silent for less than three intervals: still live, still holding its share.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let j = sync(c, &a, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
    assert_eq!(j["proxies"], base + 2, "{j}");
    assert!(share(&j) < 600_000_000, "b still holds its share: {j}");
    // Past three intervals: dead, and its share is back.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let j = sync(c, &a, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
    assert_eq!(j["proxies"], base + 1, "{j}");
    assert!(share(&j) > 950_000_000, "a dead proxy's share returns: {j}");
    // b comes back: a newcomer again, live again.
    let j = sync(c, &b, 200, vec![entry(&key, &lim, 2000, 0, 200)]).await;
    assert_eq!(j["proxies"], base + 2, "{j}");
}

/// `POST /v1/strict`; the status and the body.
pub async fn strict(c: &Client, key: &str, limits: &[Value], hits: u64) -> (u16, Value) {
    let body = json!({"rule": "pay", "key": key, "limits": limits, "hits": hits});
    let r = c
        .post_json("/v1/strict", &body)
        .await
        .expect("strict request");
    let j = r.json();
    if r.status == 200 {
        let req: meshlimit_core::protocol::StrictRequest = serde_json::from_value(body).unwrap();
        let a: meshlimit_core::protocol::StrictAnswer =
            serde_json::from_slice(&r.body).expect("an answer of the wire type");
        a.validate_for(&req).expect("an answer the filter accepts");
    }
    (r.status, j)
}

/// `n` strict requests for one key, `conc` in flight, spread over `clients`: how many
/// were admitted, and the statuses other than 200.
pub async fn strict_burst(
    clients: &[Client],
    key: &str,
    limits: &[Value],
    n: usize,
    conc: usize,
) -> (usize, Vec<u16>) {
    let results: Vec<(u16, bool)> = stream::iter(0..n)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            let (key, limits) = (key.to_string(), limits.to_vec());
            async move {
                let (s, j) = strict(&c, &key, &limits, 1).await;
                (s, s == 200 && j["allowed"] == true)
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let admitted = results.iter().filter(|(_, a)| *a).count();
    let other = results
        .iter()
        .filter(|(s, _)| *s != 200)
        .map(|(s, _)| *s)
        .collect();
    (admitted, other)
}

/// Strict checks admit exactly the limit under concurrency (spread over `clients`, which
/// may be several service instances on one store), all-or-nothing over several limits
/// with honest headers, and refuse what can never fit.
pub async fn strict_contract(clients: &[Client]) {
    let c = &clients[0];
    let key = fresh_key();
    let l = [limit(3600, 50, 50)];
    let (admitted, other) = strict_burst(clients, &key, &l, 300, 48).await;
    assert!(other.is_empty(), "statuses {other:?}");
    assert_eq!(admitted, 50, "exactly the limit under concurrency");

    // Two limits: the second (3 per hour) refuses first, and the refusal takes nothing
    // from the first (5 per hour): after three, a request for the first alone still has
    // 5 - 3 = 2 left.
    let key = fresh_key();
    let two = [limit(3600, 5, 5), limit(3600, 3, 3)];
    for i in 0..3 {
        let (s, j) = strict(c, &key, &two, 1).await;
        assert_eq!((s, j["allowed"].clone()), (200, json!(true)), "{i}: {j}");
    }
    let (_, j) = strict(c, &key, &two, 1).await;
    assert_eq!(j["allowed"], false, "{j}");
    assert_eq!(j["tightest"], 1, "{j}");
    assert_eq!(j["remaining"], 0, "{j}");
    let retry = j["retry_after_ms"].as_u64().unwrap();
    assert!((1_190_000..=1_200_000).contains(&retry), "{j}");
    let (_, j) = strict(c, &key, &two[..1], 1).await;
    assert_eq!(j["allowed"], true, "{j}");
    assert_eq!(j["remaining"], 1, "{j}");
    // A bucket that is full again needs no wait: 1 per second, burst 1.
    let key = fresh_key();
    let fast = [limit(1, 1, 1)];
    assert_eq!(strict(c, &key, &fast, 1).await.1["allowed"], true);
    let (_, j) = strict(c, &key, &fast, 1).await;
    assert_eq!(j["allowed"], false);
    let wait = j["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{j}");
    tokio::time::sleep(Duration::from_millis(wait + 20)).await;
    assert_eq!(strict(c, &key, &fast, 1).await.1["allowed"], true);

    // More than a bucket holds: refused as a bad request, not forever.
    let (s, j) = strict(c, &fresh_key(), &[limit(60, 10, 5)], 6).await;
    assert_eq!(s, 400, "{j}");
    assert!(j["detail"].as_str().unwrap().starts_with("hits: 6"), "{j}");
}
