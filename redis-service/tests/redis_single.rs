//! Against one real Redis node: atomicity across two service instances, both algorithms,
//! TTLs and memory per key, shares in Lua, ACL auth, NOSCRIPT, Redis stopped and
//! restarted (fallback, then reconciliation), and the shutdown flush.

mod support;
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_limit_under_concurrency_across_two_instances() {
    let redis = RedisNode::start(false);
    for algo in ["sliding-window", "token-bucket"] {
        // Atomicity is the point here, not the deadline (tested on its own below): a
        // generous one keeps a loaded CI machine from sending a late call to the fallback.
        let args = [
            "--redis-url",
            &redis.url(),
            "--algorithm",
            algo,
            "--store-timeout-ms",
            "2000",
        ];
        let a = Service::start(&args);
        let b = Service::start(&args);
        let id = uniq("atomic");
        // "big" is 50 per hour: 400 requests, 64 in flight, alternating instances.
        let allowed = hammer(&[a.client.clone(), b.client.clone()], &id, "big", 400, 64).await;
        assert_eq!(allowed, 50, "{algo}: admitted {allowed}, limit 50");
        // Every decision came from Redis, none from a fallback.
        for s in [&a, &b] {
            assert_eq!(metric(&s.client, "meshlimit_degraded").await, 0.0);
            assert_eq!(
                metric(&s.client, "meshlimit_decisions_total{endpoint=\"check\",decision=\"allowed\",source=\"fallback\"}").await,
                0.0
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_algorithms_multi_window_on_redis() {
    let redis = RedisNode::start(false);
    let sw = Service::start(&["--redis-url", &redis.url(), "--algorithm", "sliding-window"]);
    let tb = Service::start(&["--redis-url", &redis.url(), "--algorithm", "token-bucket"]);
    tokio::join!(
        multi_window_contract(&sw.client),
        multi_window_contract(&tb.client)
    );
    // No raw client id anywhere in Redis.
    let keys = redis.cli(&["--scan", "--pattern", "*"]).unwrap();
    assert!(!keys.is_empty());
    assert!(!keys.contains("mw-"), "raw client id in a key: {keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_and_memory_per_key_is_small() {
    let redis = RedisNode::start(false);
    let sw = Service::start(&["--redis-url", &redis.url(), "--algorithm", "sliding-window"]);
    let tb = Service::start(&["--redis-url", &redis.url(), "--algorithm", "token-bucket"]);
    let id = uniq("ttl");
    check(&sw.client, &id, "short", 1).await;
    check(&tb.client, &id, "short", 1).await;
    let keys: Vec<String> = redis
        .cli(&["--scan", "--pattern", "ml:{c.short.*"])
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(keys.len(), 2, "one key per algorithm and window: {keys:?}");
    for k in &keys {
        let ttl: i64 = redis.cli(&["PTTL", k]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0 && ttl <= 2000, "{k}: ttl {ttl}");
        let mem: u64 = redis
            .cli(&["MEMORY", "USAGE", k])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        println!("MEMORY USAGE {k} = {mem} bytes");
        assert!(mem <= 160, "{k}: {mem} bytes per (client, window)");
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let left = redis
        .cli(&["--scan", "--pattern", "ml:{c.short.*"])
        .unwrap();
    assert!(left.trim().is_empty(), "keys left after their TTL: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_shares_in_redis() {
    let redis = RedisNode::start(false);
    let s = Service::start(&["--redis-url", &redis.url(), "--share-ttl-ms", "2000"]);
    sync_contract(&s.client).await;
    // Two instances see one global count and one share table.
    let t = Service::start(&["--redis-url", &redis.url(), "--share-ttl-ms", "2000"]);
    let body = serde_json::json!({"proxy_id": "x", "span_ms": 1000, "entries": [
        {"rule": "r", "key": "abcdefabcdefabcd", "window_secs": 30, "max": 100, "admitted": 7}]});
    s.client.post_json("/v1/sync", &body).await.unwrap();
    let body2 = serde_json::json!({"proxy_id": "y", "span_ms": 1000, "entries": [
        {"rule": "r", "key": "abcdefabcdefabcd", "window_secs": 30, "max": 100, "admitted": 3}]});
    let j = t.client.post_json("/v1/sync", &body2).await.unwrap().json();
    assert_eq!(j["entries"][0]["used"], 10, "{j}");
    assert_eq!(j["entries"][0]["remaining"], 90);
    // x holds 1.0 until it reports again; y gets only what is free.
    assert_eq!(j["entries"][0]["weight"].as_f64().unwrap(), 0.0, "{j}");
    // One key twice in one report: both counted.
    let e = serde_json::json!({"rule": "r", "key": "d0d0d0d0d0d0d0d0", "window_secs": 30, "max": 100, "admitted": 4});
    let j = s
        .client
        .post_json(
            "/v1/sync",
            &serde_json::json!({"proxy_id": "x", "span_ms": 1000, "entries": [e, e]}),
        )
        .await
        .unwrap()
        .json();
    assert_eq!(j["entries"][1]["used"], 8, "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_and_password() {
    let redis = RedisNode::start(false);
    redis
        .cli(&[
            "ACL",
            "SETUSER",
            "meshlimit",
            "on",
            ">s3cret-pw",
            "~ml:*",
            "+@all",
        ])
        .unwrap();
    redis.cli(&["ACL", "SETUSER", "default", "off"]).unwrap();
    let good = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--redis-username",
        "meshlimit",
        "--redis-password",
        "s3cret-pw",
    ]);
    let id = uniq("acl");
    assert_eq!(check(&good.client, &id, "big", 1).await["remaining"], 49);
    assert_eq!(good.client.get("/readyz").await.unwrap().status, 200);
    let bad = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--redis-username",
        "meshlimit",
        "--redis-password",
        "wrong",
    ]);
    let r = bad.client.get("/readyz").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    // /readyz says why, in the words of the failure (the redis crate reports a refused
    // AUTH as "Password authentication failed").
    let detail = r.json()["detail"].as_str().unwrap_or("").to_lowercase();
    assert!(detail.contains("authentication failed"), "{}", r.text());
    // Still answers, from the fallback.
    assert_eq!(check(&bad.client, &id, "big", 1).await["allowed"], true);
    assert_eq!(metric(&bad.client, "meshlimit_degraded").await, 1.0);
    assert_eq!(
        metric(&bad.client, "meshlimit_degraded_transitions_total").await,
        1.0
    );
    let secs = metric(&bad.client, "meshlimit_degraded_seconds_total").await;
    assert!(secs > 0.0, "degraded seconds {secs}");
    // No password where one is needed: Redis' own NOAUTH comes through.
    let none = Service::start(&["--redis-url", &redis.url(), "--probe-interval-ms", "100"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = none.client.get("/readyz").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["detail"].as_str().unwrap_or("").contains("NOAUTH"),
        "{}",
        r.text()
    );
    assert_eq!(
        metric(&good.client, "meshlimit_degraded_transitions_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_cache_flush_is_survived() {
    let redis = RedisNode::start(false);
    let s = Service::start(&["--redis-url", &redis.url()]);
    let id = uniq("noscript");
    assert_eq!(check(&s.client, &id, "big", 1).await["remaining"], 49);
    redis.cli(&["SCRIPT", "FLUSH"]).unwrap();
    assert_eq!(check(&s.client, &id, "big", 1).await["remaining"], 48);
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fallback_then_reconciliation() {
    let mut redis = RedisNode::start(false);
    let s = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--store-timeout-ms",
        "50",
        "--probe-interval-ms",
        "100",
        "--fallback-share",
        "0.5",
    ]);
    let id = uniq("down");
    assert_eq!(check(&s.client, &id, "big", 10).await["remaining"], 40);
    redis.kill();
    // Every request is still answered, quickly, from the fallback enforcing half of
    // "big" (25 per hour on this instance).
    let mut allowed = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let t = Instant::now();
        if check(&s.client, &id, "big", 1).await["allowed"] == true {
            allowed += 1;
        }
        slowest = slowest.max(t.elapsed());
    }
    assert_eq!(allowed, 25, "fallback enforces its share");
    assert!(
        slowest < Duration::from_millis(500),
        "slowest answer {slowest:?}"
    );
    let r = s.client.get("/readyz").await.unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["degraded"], true);
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 1.0);
    assert!(metric(&s.client, "meshlimit_reconcile_pending").await >= 1.0);
    assert!(metric(&s.client, "meshlimit_store_errors_total").await >= 1.0);

    // Redis comes back empty (no persistence): what the fallback admitted is written back.
    redis.restart();
    wait_for(Duration::from_secs(10), || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/readyz", s.addr),
            ])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false)
    });
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 0.0);
    assert_eq!(metric(&s.client, "meshlimit_reconcile_pending").await, 0.0);
    // 25 reconciled into the empty Redis; this check makes 26 of 50.
    let r = check(&s.client, &id, "big", 1).await;
    assert_eq!(r["remaining"], 24, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_pending_counts() {
    let mut redis = RedisNode::start(false);
    let mut s = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--store-timeout-ms",
        "50",
        // No probe during the test: only the shutdown flush can write the counts.
        "--probe-interval-ms",
        "600000",
    ]);
    let id = uniq("flush");
    assert_eq!(check(&s.client, &id, "big", 1).await["allowed"], true);
    redis.kill();
    for _ in 0..5 {
        assert_eq!(check(&s.client, &id, "big", 1).await["allowed"], true);
    }
    redis.restart();
    assert!(s.terminate(), "exit status");
    let t = Service::start(&["--redis-url", &redis.url()]);
    let r = check(&t.client, &id, "big", 1).await;
    // The first hit died with the old Redis (no persistence); 5 flushed + this one = 6.
    assert_eq!(r["remaining"], 44, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let redis = RedisNode::start_tls();
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = redis.dir.join("ca.pem");
    let s = Service::start(&["--redis-url", &url, "--redis-ca-file", ca.to_str().unwrap()]);
    let id = uniq("tls");
    assert_eq!(s.client.get("/readyz").await.unwrap().status, 200);
    assert_eq!(check(&s.client, &id, "big", 1).await["remaining"], 49);
    assert_eq!(check(&s.client, &id, "big", 1).await["remaining"], 48);
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 0.0);
    // Without the CA the server is not trusted: not ready, answers from the fallback.
    let untrusted = Service::start(&["--redis-url", &url]);
    assert_eq!(untrusted.client.get("/readyz").await.unwrap().status, 503);
    assert_eq!(
        check(&untrusted.client, &id, "big", 1).await["allowed"],
        true
    );
    assert_eq!(metric(&untrusted.client, "meshlimit_degraded").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_shares_match_the_rust_reference() {
    // The same reports to the embedded store (src/shares.rs) and to Redis (lua/sync.lua)
    // must give the same weights.
    let redis = RedisNode::start(false);
    let args = ["--share-ttl-ms", "60000", "--share-headroom", "0.05"];
    let mem = Service::start(&args);
    let url = redis.url();
    let mut rargs = vec!["--redis-url", url.as_str()];
    rargs.extend(args);
    let red = Service::start(&rargs);
    let key = format!("{:016x}", std::process::id());
    let reports = [
        ("a", 90, 0),
        ("b", 10, 5),
        ("a", 50, 40),
        ("c", 0, 0),
        ("b", 300, 100),
        ("a", 10, 0),
        ("c", 7, 0),
        ("b", 0, 0),
        ("a", 1000, 0),
    ];
    for (proxy, admitted, rejected) in reports {
        let body = serde_json::json!({"proxy_id": proxy, "span_ms": 500, "entries": [
            {"rule": "parity", "key": key, "window_secs": 3600, "max": 100000,
             "admitted": admitted, "rejected": rejected}]});
        let m = mem
            .client
            .post_json("/v1/sync", &body)
            .await
            .unwrap()
            .json();
        let r = red
            .client
            .post_json("/v1/sync", &body)
            .await
            .unwrap()
            .json();
        let (wm, wr) = (
            m["entries"][0]["weight"].as_f64().unwrap(),
            r["entries"][0]["weight"].as_f64().unwrap(),
        );
        assert!((wm - wr).abs() < 1e-6, "{proxy}: memory {wm} vs redis {wr}");
        assert_eq!(m["entries"][0]["used"], r["entries"][0]["used"]);
    }
    // Headroom: once shares are steady, a newcomer gets a share at once even though the
    // others still hold theirs.
    for _ in 0..3 {
        for proxy in ["a", "b", "c"] {
            let body = serde_json::json!({"proxy_id": proxy, "span_ms": 500, "entries": [
                {"rule": "parity", "key": key, "window_secs": 3600, "max": 100000, "admitted": 50}]});
            red.client.post_json("/v1/sync", &body).await.unwrap();
        }
    }
    let body = serde_json::json!({"proxy_id": "new", "span_ms": 500, "entries": [
        {"rule": "parity", "key": key, "window_secs": 3600, "max": 100000, "admitted": 1}]});
    let r = red
        .client
        .post_json("/v1/sync", &body)
        .await
        .unwrap()
        .json();
    let w = r["entries"][0]["weight"].as_f64().unwrap();
    assert!(w > 0.01 && w <= 0.05 + 1e-9, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_answers_within_the_deadline() {
    let redis = RedisNode::start(false);
    let s = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--store-timeout-ms",
        "50",
        "--probe-interval-ms",
        "100",
    ]);
    let id = uniq("slow");
    assert_eq!(check(&s.client, &id, "many", 1).await["remaining"], 999_999);
    // Redis stops answering anyone for 1.5 s.
    redis.cli(&["CLIENT", "PAUSE", "1500", "ALL"]).unwrap();
    let t = std::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut n = 0;
    while t.elapsed() < Duration::from_millis(1000) {
        let q = std::time::Instant::now();
        assert_eq!(check(&s.client, &id, "many", 1).await["allowed"], true);
        slowest = slowest.max(q.elapsed());
        n += 1;
    }
    assert!(n >= 5);
    assert!(
        slowest < Duration::from_millis(300),
        "slowest answer {slowest:?} with a 50 ms deadline"
    );
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 1.0);
    // Once Redis answers again the service leaves degraded mode and writes back what the
    // fallback admitted (the call that timed out may also have landed: counted twice at
    // worst, never lost).
    wait_for(Duration::from_secs(10), || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/readyz", s.addr),
            ])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false)
    });
    // The period is over but it shows: one transition, and the time it lasted.
    assert_eq!(metric(&s.client, "meshlimit_degraded").await, 0.0);
    assert!(metric(&s.client, "meshlimit_degraded_transitions_total").await >= 1.0);
    let secs = metric(&s.client, "meshlimit_degraded_seconds_total").await;
    assert!((0.3..10.0).contains(&secs), "degraded for {secs} s");
    let r = check(&s.client, &id, "many", 1).await;
    let used = 1_000_000 - r["remaining"].as_i64().unwrap();
    assert!(
        used == n + 2 || used == n + 3,
        "{n} + 2 hits admitted, Redis counts {used}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_and_reset_at_are_true_on_redis() {
    let redis = RedisNode::start(false);
    let sw = Service::start(&["--redis-url", &redis.url(), "--algorithm", "sliding-window"]);
    let tb = Service::start(&["--redis-url", &redis.url(), "--algorithm", "token-bucket"]);
    tokio::join!(
        retry_contract(&sw.client, true),
        retry_contract(&tb.client, false)
    );
    assert_eq!(
        metric(&sw.client, "meshlimit_degraded_transitions_total").await,
        0.0
    );
}
