//! Real parts for the integration tests: `redis-server` processes ([`redis`]), the
//! service itself ([`service`]: the binary, or in-process), an HTTP client for it
//! ([`client`], shared with the bench command), free ports and temp dirs ([`machine`]),
//! and the contracts every store keeps ([`contracts`]). Each test file uses a part of
//! it.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses only part of the shared support code"
)]

pub mod client;
mod contracts;
mod machine;
mod redis;
mod service;

pub use client::Client;
pub use contracts::*;
pub use machine::{free_port, tempdir};
pub use redis::*;
pub use service::Service;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-123";

pub const RULES: &str = r#"{"rules":[
  {"id":"api","match":{"path":"/api/*"},"limits":[{"window":"2s","max":5},{"window":"1h","max":8}]},
  {"id":"big","match":{"path":"/big/*"},"limits":[{"window":"1h","max":50}]},
  {"id":"short","match":{"path":"/short/*"},"limits":[{"window":"1s","max":3}]},
  {"id":"many","match":{"path":"/many/*"},"limits":[{"window":"1h","max":1000000}]},
  {"id":"retry","match":{"path":"/retry/*"},"limits":[{"window":"2s","max":2}]}
]}"#;

pub fn wait_for(max: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < max {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("condition not met within {max:?}");
}

/// A unique client id per test run, so reruns against one Redis do not collide.
pub fn uniq(tag: &str) -> String {
    format!(
        "{tag}-{}-{}-{}",
        std::process::id(),
        machine::SEQ.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

pub async fn check(c: &Client, client_id: &str, rule: &str, hits: u64) -> serde_json::Value {
    let r = c
        .post_json(
            "/rate-limit/check",
            &serde_json::json!({"client_id": client_id, "rule_id": rule, "hits": hits}),
        )
        .await
        .expect("check request");
    assert_eq!(r.status, 200, "check: {}", r.text());
    r.json()
}

/// `metric` value from /metrics (first line starting with it).
pub async fn metric(c: &Client, prefix: &str) -> f64 {
    let r = c.get("/metrics").await.expect("metrics");
    r.text()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `n` checks with `conc` in flight, spread over `clients`; returns how many passed.
pub async fn hammer(
    clients: &[Client],
    client_id: &str,
    rule: &str,
    n: usize,
    conc: usize,
) -> usize {
    use futures::stream::{self, StreamExt};
    let allowed = stream::iter(0..n)
        .map(|i| {
            let c = clients[i % clients.len()].clone();
            let id = client_id.to_string();
            let rule = rule.to_string();
            async move { check(&c, &id, &rule, 1).await["allowed"] == true }
        })
        .buffer_unordered(conc)
        .filter(|a| futures::future::ready(*a))
        .count()
        .await;
    allowed
}
