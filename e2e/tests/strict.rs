//! Strict scope through real Envoys (`--concurrency 2`): every request of a strict rule
//! waits for one callout to the companion, which decides it atomically in its store;
//! on a failed callout the rule's failure mode decides.

use std::time::Duration;

use meshlimit_e2e::backend::Backend;
use meshlimit_e2e::peer::{Peer, StrictBehaviour, SyncBehaviour};
use meshlimit_e2e::{Envoy, EnvoyOptions, Request, Upstream};

const TOKEN_ENV: &str = "ML_TOKEN";

/// A strict rule on `/pay` (5 a second, `rule`: more of its fields) and a global rule
/// on `/g`, with the companion's cluster at `port`.
fn config(service: &str, rule: &str) -> String {
    format!(
        r#"{{"service":{{"cluster":"meshlimit_service","token_env":"{TOKEN_ENV}","sync_interval_ms":500,"timeout_ms":150{service}}},"rules":[
          {{"id":"pay","match":{{"path":"/pay"}},"key":["header:x-api-key"],"scope":"strict","limits":[{{"window":"1s","max":5}}]{rule}}},
          {{"id":"g","match":{{"path":"/g"}},"key":["header:x-api-key"],"limits":[{{"window":"1m","max":100}}]}}]}}"#
    )
}

fn envoy(plugin_config: &str, peer: &Peer, upstream: &Upstream) -> Envoy {
    Envoy::start_with(
        EnvoyOptions::new(plugin_config)
            .cluster("meshlimit_service", peer.port)
            .node("envoy-strict", "az-s")
            .vm_env(TOKEN_ENV, "test-token")
            .upstream(upstream),
    )
}

fn pay(k: &str) -> Request {
    Request::get("/pay").header("x-api-key", k)
}

fn grant() -> SyncBehaviour {
    SyncBehaviour::Grant {
        share: 500_000_000,
        proxies: 2,
        lease_ms: 60_000,
    }
}

#[test]
fn one_callout_per_strict_request_and_none_for_other_scopes() {
    let peer = Peer::start(grant(), StrictBehaviour::Allow);
    let upstream = Upstream::start();
    let envoy = envoy(&config("", ""), &peer, &upstream);
    let mut c = envoy.client();
    for _ in 0..10 {
        let r = c.send(&pay("k"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
    }
    assert_eq!(peer.stricts(), 10, "one callout per strict request");
    for _ in 0..10 {
        assert_eq!(
            c.send(&Request::get("/g").header("x-api-key", "k")).status,
            200
        );
    }
    assert_eq!(c.send(&Request::get("/elsewhere")).status, 200);
    assert_eq!(
        peer.stricts(),
        10,
        "no callout for a global or unmatched request"
    );
    let strict: Vec<_> = (peer.received().into_iter())
        .filter(|r| r.path == "/v1/strict")
        .collect();
    let req: meshlimit_core::protocol::StrictRequest =
        serde_json::from_slice(&strict[0].body).unwrap();
    assert!(req.validate().is_ok());
    assert_eq!((req.rule.as_str(), req.hits), ("pay", 1));
    assert_eq!(req.limits[0].max, 5);
    assert!(strict
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Bearer test-token")));
    // Every request carried the same fingerprint for one client; another client, another.
    let keys: std::collections::BTreeSet<String> = (strict.iter())
        .map(|r| {
            serde_json::from_slice::<meshlimit_core::protocol::StrictRequest>(&r.body)
                .unwrap()
                .key
        })
        .collect();
    assert_eq!(keys.len(), 1);
    assert_eq!(upstream.hits(), 21);
}

#[test]
fn a_refusal_is_the_usual_429_with_retry_after_from_the_answer() {
    let peer = Peer::start(
        grant(),
        StrictBehaviour::Refuse {
            retry_after_ms: 2500,
        },
    );
    let upstream = Upstream::start();
    let envoy = envoy(&config("", ""), &peer, &upstream);
    let r = envoy.send(&pay("k"));
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    let body: serde_json::Value = serde_json::from_str(&r.body_str()).unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["rule"], "pay");
    assert_eq!(upstream.hits(), 0);
}

/// What a strict rule in each failure mode answers while the companion does not
/// answer in time (or answers garbage, or an error).
#[test]
fn a_failed_check_follows_the_failure_mode() {
    let slow = StrictBehaviour::Slow(Duration::from_millis(600), Box::new(StrictBehaviour::Allow));
    for (failing, why) in [
        (slow, "no answer within timeout_ms"),
        (StrictBehaviour::Status(503), "503"),
        (StrictBehaviour::Garbage, "garbage"),
    ] {
        let peer = Peer::start(grant(), failing);
        let upstream = Upstream::start();
        let modes = ["open", "closed", "local"];
        let envoys: Vec<Envoy> = std::thread::scope(|s| {
            let hs: Vec<_> = (modes.iter())
                .map(|m| {
                    let cfg = config(
                        r#","fallback_share":0.4"#,
                        &format!(r#","failure_mode":"{m}""#),
                    );
                    let (peer, upstream) = (&peer, &upstream);
                    s.spawn(move || envoy(&cfg, peer, upstream))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Six requests at once, each on its own connection: they all arrive within a
        // few milliseconds, so the local bucket cannot refill between them.
        let run = |e: &Envoy| -> Vec<(u16, Option<String>, String, Duration)> {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..6)
                    .map(|_| {
                        s.spawn(|| {
                            let t = std::time::Instant::now();
                            let r = e.send(&pay("k"));
                            let retry = r.header("retry-after").map(str::to_owned);
                            (r.status, retry, r.body_str(), t.elapsed())
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let open = run(&envoys[0]);
        assert!(
            open.iter().all(|r| r.0 == 200),
            "{why}: open admits: {open:?}"
        );
        let closed = run(&envoys[1]);
        for (status, retry, body, _) in &closed {
            assert_eq!(*status, 429, "{why}: closed refuses");
            assert_eq!(retry.as_deref(), Some("1"));
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"], "limiter_unavailable", "{why}: {body}");
        }
        // local: this proxy's bucket at the fallback share 0.4 of 5 a second: 2 a second,
        // capacity the burst floor 1/n = 1/2 of 5 = 2.5, so 2 tokens at once (the third
        // needs 250 ms more).
        let local = run(&envoys[2]);
        let ok = local.iter().filter(|r| r.0 == 200).count();
        assert_eq!(ok, 2, "{why}: local: {local:?}");
        assert!(local.iter().all(|r| r.0 == 200 || r.0 == 429));
        // Never a 5xx, and never held past the timeout (150 ms) by much.
        for r in open.iter().chain(&closed).chain(&local) {
            assert!(r.3 < Duration::from_millis(500), "{why}: {r:?}");
        }
        // Each VM adds its counts on its own tick: wait for all six, then one tick more
        // so that a count beyond them would show too.
        let stat = |e: &Envoy, n: &str| {
            let t = std::time::Instant::now();
            while e.stat(n).unwrap_or(0) < 6 && t.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(1100));
            e.stat(n).unwrap_or(0)
        };
        assert_eq!(
            stat(&envoys[0], "meshlimit_strict_failed_open_total"),
            6,
            "{why}"
        );
        assert_eq!(
            stat(&envoys[1], "meshlimit_strict_failed_closed_total"),
            6,
            "{why}"
        );
        assert_eq!(
            stat(&envoys[2], "meshlimit_strict_failed_local_total"),
            6,
            "{why}"
        );
    }
}

/// Concurrent bursts on two Envoys (`--concurrency 2` each) for one client of a strict
/// rule: the companion decides each request atomically, so the admitted count is the
/// limit exactly, not one more; and a second burst for another client again exactly.
fn concurrent_bursts(backend: &Backend) {
    let upstream = Upstream::start();
    // 20 a minute: a token comes back every 3 s, far longer than a burst takes.
    let rule = r#"{"id":"pay","match":{"path":"/pay"},"key":["header:x-api-key"],"scope":"strict","limits":[{"window":"1m","max":20}]}"#;
    let cfg = format!(
        r#"{{"service":{{"cluster":"meshlimit_service","token_env":"{TOKEN_ENV}","sync_interval_ms":1000,"timeout_ms":500}},"rules":[{rule}]}}"#
    );
    let envoys: Vec<Envoy> = std::thread::scope(|s| {
        let hs: Vec<_> = [("envoy-a", "az-a"), ("envoy-b", "az-b")]
            .into_iter()
            .map(|(id, zone)| {
                let o = EnvoyOptions::new(&cfg)
                    .cluster("meshlimit_service", backend.port())
                    .node(id, zone)
                    .vm_env(TOKEN_ENV, "test-token")
                    .upstream(&upstream);
                s.spawn(move || Envoy::start_with(o))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (round, key) in ["burst-1", "burst-2"].into_iter().enumerate() {
        // 8 connections per Envoy, 10 requests each: 160 requests at once.
        let t = std::time::Instant::now();
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16)
                .map(|i| {
                    let e = &envoys[i % 2];
                    s.spawn(move || {
                        let mut c = e.client();
                        (0..10)
                            .map(|_| c.send(&pay(key)).status)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let took = t.elapsed();
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        let limited = statuses.iter().filter(|&&s| s == 429).count();
        println!(
            "{}: strict burst {round}: 160 requests on 2 Envoys in {took:?}, {ok} admitted, {limited} refused",
            backend.name()
        );
        assert_eq!(ok + limited, 160, "only 200 or 429: {statuses:?}");
        assert!(
            took < Duration::from_secs(3),
            "the burst outlasted a token: {took:?}"
        );
        assert_eq!(ok, 20, "exactly the limit");
    }
    // One callout per request, each answered (the counters reach Envoy on a tick).
    std::thread::sleep(Duration::from_millis(1200));
    let stat = |n: &str| envoys.iter().map(|e| e.stat(n).unwrap_or(0)).sum::<u64>();
    assert_eq!(stat("meshlimit_strict_allowed_total"), 40);
    assert_eq!(stat("meshlimit_strict_rejected_total"), 280);
}

#[test]
fn concurrent_bursts_on_two_envoys_never_exceed_the_limit() {
    concurrent_bursts(&Backend::reference());
}

#[test]
fn concurrent_bursts_on_two_envoys_never_exceed_the_limit_on_the_companion() {
    concurrent_bursts(&Backend::companion("test-token"));
}

/// A cheaper rule before the strict one in its chain sheds a flood locally: what it
/// refuses makes no callout.
#[test]
fn a_rule_before_a_strict_one_sheds_without_a_callout() {
    let peer = Peer::start(grant(), StrictBehaviour::Allow);
    let upstream = Upstream::start();
    let cfg = format!(
        r#"{{"service":{{"cluster":"meshlimit_service","token_env":"{TOKEN_ENV}"}},"rules":[
          {{"id":"shed","priority":1,"match":{{"path":"/pay"}},"key":["header:x-api-key"],"scope":"local","limits":[{{"window":"1m","max":5}}],"continue":true}},
          {{"id":"pay","match":{{"path":"/pay"}},"key":["header:x-api-key"],"scope":"strict","limits":[{{"window":"1m","max":100}}]}}]}}"#
    );
    let envoy = envoy(&cfg, &peer, &upstream);
    let mut c = envoy.client();
    let answers: Vec<_> = (0..10).map(|_| c.send(&pay("flood"))).collect();
    let ok = answers.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 5);
    for r in &answers[5..] {
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["rule"], "shed");
    }
    assert_eq!(
        peer.stricts(),
        5,
        "only what the first rule admitted was checked"
    );
}
