//! Global scope on real Redis and a real Redis Cluster: the contracts of
//! `support/global.rs` (shares, liveness, strict exactness) through the service, two
//! service instances on one store, the Lua port of `meshlimit_core::shares` against the
//! core itself on many random reports, a store that goes away (sync degraded, strict
//! 503, counts reconciled), and strict checks while a cluster master fails over.

mod support;
use meshlimit_core::shares::{allocate_detailed, release, Peer, Report, ShareParams};
use meshlimit_service::keys::{slot, KeyMaker, Namespace};
use meshlimit_service::store::redis::{RedisOptions, RedisStore, SYNC_CHUNK};
use meshlimit_service::store::{Store, StoreLimit, SyncOp};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_on_redis_across_two_instances() {
    let redis = RedisNode::start(false);
    // Exactness is the point here, not the deadline (a strict check past it is a 503,
    // tested below): a generous one keeps a loaded machine from turning one into a 503.
    let args = ["--redis-url", &redis.url(), "--store-timeout-ms", "2000"];
    let s = Service::start(&args);
    // A fresh registry: nobody else is live.
    liveness_contract(&s.client, 0).await;
    shares_contract(&s.client).await;
    let t = Service::start(&args);
    strict_contract(&[s.client.clone(), t.client.clone()]).await;
    // One record behind both instances: the count is the sum, the shares one table.
    let key = fresh_key();
    let lim = [limit(3600, 1000, 1000)];
    let (a, b) = (fresh_proxy("two-a"), fresh_proxy("two-b"));
    let ja = sync(&s.client, &a, 1000, vec![entry(&key, &lim, 2000, 0, 1000)]).await;
    assert!(share(&ja) > 990_000_000, "alone: {ja}");
    let jb = sync(&t.client, &b, 1000, vec![entry(&key, &lim, 2000, 0, 1000)]).await;
    assert_eq!(jb["entries"][0]["used"], json!([4000]), "{jb}");
    assert!(share(&ja) + share(&jb) <= 1_000_000_000, "{ja} {jb}");
    assert_eq!(jb["entries"][0]["pending"], true, "a still holds it: {jb}");
    // The registry is the store's: both instances count the same proxies.
    let heartbeat = sync(&s.client, &b, 1000, vec![]).await;
    assert_eq!(heartbeat["proxies"], jb["proxies"]);
    // Memory per record: one with a single peer, one with two (the key above).
    let lone = fresh_key();
    sync(&s.client, &a, 1000, vec![entry(&lone, &lim, 5, 0, 1000)]).await;
    let tag = |k: &str| {
        KeyMaker::new("ml", b"meshlimit client id v1").record_key(
            &KeyMaker::new("ml", b"meshlimit client id v1").tag(Namespace::Sync, "g", k),
            3600,
            1000,
            1000,
        )
    };
    let mem = |k: &str| -> u64 {
        redis
            .cli(&["MEMORY", "USAGE", &tag(k)])
            .unwrap()
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let (one, two) = (mem(&lone), mem(&key));
    println!("record memory: {one} B with one peer, {two} B with two");
    assert!(one > 0 && one <= 256 && two <= one + 96, "{one} / {two}");
    // Records carry the limit in their key and expire; the registry is one key.
    let keys = redis.cli(&["--scan", "--pattern", "ml:*"]).unwrap();
    assert!(keys.contains("ml:{live}:proxies"), "{keys}");
    let ttl: i64 = redis
        .cli(&["PTTL", "ml:{live}:proxies"])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(ttl > 600_000, "the registry outlives a lease: {ttl}");
}

/// A tiny deterministic generator (SplitMix64), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The peers of a record as `lua/sync.lua` stored them (`@id` -> "demand grant updated").
async fn stored_peers(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Peer<String>> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(con)
        .await
        .unwrap();
    let mut peers: Vec<Peer<String>> = fields
        .into_iter()
        .filter_map(|(f, v)| {
            let id = f.strip_prefix('@')?.to_string();
            let n: Vec<u64> = v.split(' ').map(|x| x.parse().unwrap()).collect();
            Some(Peer {
                proxy: id,
                demand: n[0],
                grant: u32::try_from(n[1]).unwrap(),
                updated_ms: n[2],
            })
        })
        .collect();
    peers.sort_by(|a, b| a.proxy.cmp(&b.proxy));
    peers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_shares_match_the_core_reference() {
    // Random reports (joins, leaves through the lease and through deaths, releases,
    // demand from nothing to far over the limit, more proxies than a record keeps) run
    // through lua/sync.lua on Redis; before each, the record's peers are read, and the
    // core's allocate_detailed runs on them at the script's own clock (the reporter's
    // `updated_ms` after the call) with the same dead proxies. Grants, pending flags
    // and every stored peer must agree within the documented rounding (a part per 10^9,
    // one hit); for these magnitudes the port is exact.
    let redis = RedisNode::start(false);
    let keys = KeyMaker::new("ml", b"parity hmac key 1234");
    let opts = RedisOptions {
        username: None,
        password: None,
        tls_insecure: false,
        ca_pem: None,
        io_timeout: Duration::from_secs(2),
        report_runtime: None,
        sync_chunk: SYNC_CHUNK,
    };
    let store = RedisStore::single(&redis.url(), opts, keys.clone()).unwrap();
    store.start().await.unwrap();
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // A short lease so records lose peers by it too; a small peer cap so newcomers hit it.
    let params = ShareParams {
        lease_ms: 300,
        max_peers: 4,
        ..ShareParams::default()
    };
    let limits = [(1, 10, 10), (60, 100, 100), (3600, 100_000, 50_000)];
    let tags: Vec<String> = (0..limits.len())
        .map(|i| keys.tag(Namespace::Sync, "parity", &format!("{i:016x}")))
        .collect();
    let proxies: Vec<String> = (0..6).map(|i| format!("proxy-{i}")).collect();
    let mut rng = Rng(0x5eed_0009);
    let (mut steps, mut exact, mut worst) = (0u64, 0u64, 0u64);
    let (mut pending, mut dropped, mut capped, mut released, mut contended) = (0, 0, 0, 0, 0);
    for _ in 0..1500 {
        let k = rng.below(limits.len() as u64) as usize;
        let (w, max, burst) = limits[k];
        let me = &proxies[rng.below(proxies.len() as u64) as usize];
        let admitted = match rng.below(10) {
            0 => 0,
            1..=5 => rng.below(max / 5 + 2),
            6..=8 => rng.below(3 * max + 1),
            _ => rng.below(1_000_000),
        };
        let rejected = if rng.below(3) == 0 {
            rng.below(max + 1)
        } else {
            0
        };
        let dead: Vec<String> = proxies
            .iter()
            .filter(|p| *p != me && rng.below(12) == 0)
            .cloned()
            .collect();
        let interval_ms = [100, 1000, 5000][rng.below(3) as usize];
        let op = SyncOp {
            tag: tags[k].clone(),
            limits: vec![StoreLimit {
                window_secs: w,
                max,
                burst,
            }],
            admitted,
            rejected,
            span_ms: 1 + rng.below(3000),
            release: rng.below(25) == 0,
        };
        if rng.below(4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(60))).await;
        }
        let rkey = keys.record_key(&tags[k], w, max, burst);
        let before = stored_peers(&mut con, &rkey).await;
        let out = store
            .sync_records(me, interval_ms, &dead, std::slice::from_ref(&op), &params)
            .await
            .pop()
            .unwrap()
            .unwrap();
        let after = stored_peers(&mut con, &rkey).await;
        let mut peers = before.clone();
        steps += 1;
        if op.release {
            released += 1;
            release(&mut peers, me);
            assert_eq!(peers, after, "release");
            assert_eq!((out.shares.clone(), out.pending), (vec![0], false));
            exact += 1;
            continue;
        }
        let Some(mine) = after.iter().find(|q| &q.proxy == me) else {
            // Not stored: the record holds max_peers others, and the proxy gets nothing.
            capped += 1;
            assert_eq!((out.shares.clone(), out.pending), (vec![0], false));
            assert!(after.len() <= params.max_peers);
            exact += 1;
            continue;
        };
        let report = Report {
            hits: admitted + rejected,
            max,
            window_ms: w * 1000,
            first_span_ms: op.span_ms,
            interval_ms,
        };
        let a = allocate_detailed(
            &mut peers,
            me,
            &report,
            mine.updated_ms,
            |id| !dead.contains(id),
            &params,
        );
        peers.sort_by(|x, y| x.proxy.cmp(&y.proxy));
        dropped += usize::from(
            before
                .iter()
                .any(|q| !after.iter().any(|l| l.proxy == q.proxy)),
        );
        pending += usize::from(out.pending);
        contended += usize::from(
            peers
                .iter()
                .map(|q| meshlimit_core::shares::want(q.demand, &params))
                .sum::<u64>()
                > 1_000_000_000,
        );
        let grant_diff = u64::from(a.grant.abs_diff(out.shares[0]));
        assert!(
            grant_diff <= 1,
            "grant: core {a:?}, Lua {out:?}; before {before:?}"
        );
        assert_eq!(peers.len(), after.len(), "core {peers:?} vs Lua {after:?}");
        let mut same = grant_diff == 0 && a.pending() == out.pending;
        for (r, l) in peers.iter().zip(&after) {
            assert_eq!((&r.proxy, r.updated_ms), (&l.proxy, l.updated_ms));
            let d = r
                .demand
                .abs_diff(l.demand)
                .max(u64::from(r.grant.abs_diff(l.grant)));
            assert!(d <= 1, "peer: core {r:?}, Lua {l:?}");
            worst = worst.max(d);
            same &= d == 0;
        }
        exact += u64::from(same);
    }
    println!(
        "parity: {steps} reports, {exact} exactly equal (worst difference {worst} ppb); \
         {contended} contended, {pending} pending, {dropped} with peers dropped (death or \
         lease), {capped} over the peer cap, {released} releases"
    );
    // The random walk reached every branch.
    assert!(contended > 50 && pending > 20 && dropped > 50 && capped > 5 && released > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_sync_is_degraded_strict_is_503_then_reconciled() {
    let mut redis = RedisNode::start(false);
    let s = Service::start(&[
        "--redis-url",
        &redis.url(),
        "--store-timeout-ms",
        "50",
        "--sync-timeout-ms",
        "300",
        "--probe-interval-ms",
        "100",
        "--fallback-share",
        "0.5",
    ]);
    let c = &s.client;
    let key = fresh_key();
    let lim = [limit(3600, 1000, 1000)];
    let p = fresh_proxy("down");
    let j = sync(c, &p, 1000, vec![entry(&key, &lim, 5, 0, 1000)]).await;
    assert_eq!(j["degraded"], false);
    let pay = [limit(3600, 10, 10)];
    assert_eq!(strict(c, &fresh_key(), &pay, 1).await.0, 200);
    redis.kill();
    // Reports are answered from the fallback: its own registry and allocation, half of
    // it (--fallback-share 0.5), the count owed.
    let t = Instant::now();
    let j = sync(c, &p, 1000, vec![entry(&key, &lim, 2000, 0, 1000)]).await;
    assert_eq!(j["degraded"], true, "{j}");
    let s0 = share(&j);
    assert!(
        (400_000_000..=500_000_000).contains(&s0),
        "half of a lone proxy's share: {j}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    let hb = sync(c, &p, 1000, vec![]).await;
    assert_eq!(
        (hb["degraded"].clone(), hb["proxies"].clone()),
        (json!(true), json!(1))
    );
    // Strict checks are not guessed: 503, the filter's failure mode decides.
    let t = Instant::now();
    let (status, body) = strict(c, &fresh_key(), &pay, 1).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(
        metric(
            c,
            "meshlimit_strict_decisions_total{outcome=\"unavailable\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric(c, "meshlimit_reconcile_pending").await >= 1.0);

    // Redis comes back empty (no persistence): the 2000 admitted meanwhile are written
    // back into the record's count.
    redis.restart();
    let t = Instant::now();
    loop {
        let r = c.get("/readyz").await.unwrap();
        if r.status == 200 && metric(c, "meshlimit_reconcile_pending").await == 0.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not back: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let j = sync(c, &p, 1000, vec![entry(&key, &lim, 0, 0, 1000)]).await;
    assert_eq!(j["degraded"], false, "{j}");
    assert_eq!(j["entries"][0]["used"], json!([2000]), "{j}");
    assert_eq!(strict(c, &fresh_key(), &pay, 1).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_scope_on_a_cluster_across_two_instances() {
    let cluster = RedisCluster::start();
    let seeds = cluster.seeds();
    let args = ["--redis-cluster", &seeds, "--store-timeout-ms", "2000"];
    let s = Service::start(&args);
    liveness_contract(&s.client, 0).await;
    shares_contract(&s.client).await;
    let t = Service::start(&args);
    strict_contract(&[s.client.clone(), t.client.clone()]).await;
    // Many keys on every master, several limits each: one record per limit, all of a
    // key's records in its slot; the heartbeat is one round trip, the keys one per
    // master.
    let lim = [limit(3600, 100, 100), limit(60, 10, 10)];
    let entries: Vec<_> = (0..300)
        .map(|_| entry(&fresh_key(), &lim, 2, 0, 1000))
        .collect();
    let rt0 = metric(&s.client, "meshlimit_store_round_trips_total").await;
    let j = sync(&s.client, &fresh_proxy("many"), 1000, entries).await;
    let rt = metric(&s.client, "meshlimit_store_round_trips_total").await - rt0;
    assert_eq!(j["degraded"], false);
    assert_eq!(rt, 4.0, "a heartbeat and one pipeline per master");
    for e in j["entries"].as_array().unwrap() {
        assert_eq!(e["used"], json!([2, 2]), "{e}");
        assert_eq!(
            e["shares"][0], e["shares"][1],
            "a lone proxy: the same share of both"
        );
    }
    let rt0 = metric(&s.client, "meshlimit_store_round_trips_total").await;
    sync(&s.client, &fresh_proxy("hb"), 1000, vec![]).await;
    let rt = metric(&s.client, "meshlimit_store_round_trips_total").await - rt0;
    assert_eq!(rt, 1.0, "a heartbeat is one round trip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_checks_while_a_master_fails_over() {
    // Strict traffic on one key whose master is killed: every answer is a decision or a
    // 503 (the filter's failure mode then decides), never another status; admissions
    // beyond the limit are bounded by what the dead master acknowledged and had not yet
    // replicated (Redis replicates asynchronously): at most the requests in flight when
    // it died.
    let mut cluster = RedisCluster::start();
    let seeds = cluster.seeds();
    let s = Service::start(&[
        "--redis-cluster",
        &seeds,
        "--store-timeout-ms",
        "300",
        "--probe-interval-ms",
        "100",
    ]);
    let keys = KeyMaker::new("ml", b"meshlimit client id v1");
    let key = fresh_key();
    let tag = keys.tag(Namespace::Strict, "pay", &key);
    let victim_slot = slot(&keys.tb_key(&tag, 3600, 400, 400));
    let victim = cluster.master_of(victim_slot);
    let lim = [limit(3600, 400, 400)];
    const IN_FLIGHT: usize = 4;
    let stop = Arc::new(AtomicBool::new(false));
    let (admitted, refused, unavailable, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let c = s.client.clone();
            let (key, lim, stop) = (key.clone(), lim.to_vec(), stop.clone());
            let (a, r, u, o) = (
                admitted.clone(),
                refused.clone(),
                unavailable.clone(),
                other.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (status, j) = strict(&c, &key, &lim, 1).await;
                    let n = match (status, j["allowed"].as_bool()) {
                        (200, Some(true)) => &a,
                        (200, Some(false)) => &r,
                        (503, _) => &u,
                        _ => &o,
                    };
                    n.fetch_add(1, Ordering::Relaxed);
                    // About 100 per second: the limit lasts past the failover.
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before_kill = admitted.load(Ordering::Relaxed);
    cluster.nodes[victim].kill();
    let t = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if cluster
            .try_master_of(victim_slot)
            .is_some_and(|m| m != victim)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "replica not promoted"
        );
    }
    let promoted_after = t.elapsed();
    // Decisions again, until the limit is spent.
    let t = Instant::now();
    while refused.load(Ordering::Relaxed) < 20 && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (a, r, u, o) = (
        admitted.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        unavailable.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed),
    );
    println!(
        "strict under failover: {a} admitted ({before_kill} before the kill) of a limit of 400, \
         {r} refused, {u} answered 503; promoted after {promoted_after:?}"
    );
    assert_eq!(o, 0, "only decisions and 503s");
    assert!(r >= 20, "the limit was reached after the failover");
    assert!(u >= 1, "the outage showed as 503s");
    assert!(
        a <= 400 + IN_FLIGHT as u64,
        "{a} admitted: more than the limit and the writes in flight at the kill"
    );
    // Fewer only where a call ran but its answer was lost (answered 503).
    assert!(a + u >= 400, "{a} admitted, {u} unanswered");
}
