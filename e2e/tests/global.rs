//! Global scope through real Envoys (`--concurrency 2`) on loopback: the `service`
//! block's refusals, and the filter syncing with the companion.

use meshlimit_e2e::{free_port, Envoy, EnvoyOptions, Upstream};

const TOKEN_ENV: &str = "ML_TOKEN";
const CLUSTER: &str = "meshlimit_service";

/// A configuration with a service block (`service`: its fields after `cluster`) and
/// one rule on `/g` (`rule`: its fields after `limits`).
fn config(service: &str, rule: &str) -> String {
    format!(
        r#"{{"service":{{"cluster":"{CLUSTER}"{service}}},"rules":[{{"id":"g","match":{{"path":"/g"}},"key":["header:x-api-key"],"limits":[{{"window":"1m","max":5}}]{rule}}}]}}"#
    )
}

/// Envoy with the companion's cluster (at `port`), a node id and zone, and the token in
/// the VM environment.
fn options(plugin_config: &str, port: u16) -> EnvoyOptions {
    EnvoyOptions::new(plugin_config)
        .cluster(CLUSTER, port)
        .node("envoy-test", "az-t")
        .vm_env(TOKEN_ENV, "test-token")
}

#[test]
fn a_bad_service_block_is_refused_with_one_line_naming_the_field() {
    let upstream = Upstream::start();
    let port = free_port();
    let env = format!(r#","token_env":"{TOKEN_ENV}""#);
    let cases: Vec<(EnvoyOptions, &str)> = vec![
        (
            EnvoyOptions::new(&config(&env, "")).node("e", "z").vm_env(TOKEN_ENV, "t"),
            r#"configuration refused: service.cluster: Envoy has no cluster "meshlimit_service" (a callout to it was refused)"#,
        ),
        (
            EnvoyOptions::new(&config(&env, ""))
                .cluster(CLUSTER, port)
                .node("e", "z"),
            r#"configuration refused: service.token_env: the VM environment variable "ML_TOKEN" is not set"#,
        ),
        (
            EnvoyOptions::new(&config(&env, ""))
                .cluster(CLUSTER, port)
                .node("e", "z")
                .vm_env(TOKEN_ENV, ""),
            r#"configuration refused: service.token_env: the VM environment variable "ML_TOKEN" is empty"#,
        ),
        (
            EnvoyOptions::new(&config(&env, ""))
                .cluster(CLUSTER, port)
                .vm_env(TOKEN_ENV, "t"),
            "configuration refused: service.proxy_id: not set, and Envoy has no node.id to use instead",
        ),
        (
            options(&config(r#","token":"t","sync_interval_ms":0"#, ""), port),
            "configuration refused: service.sync_interval_ms: 0 is out of range 100..=60000",
        ),
        (
            options(&config(r#","token":"t","sync_interval_ms":90000"#, ""), port),
            "configuration refused: service.sync_interval_ms: 90000 is out of range 100..=60000",
        ),
        (
            options(&config(r#","token":"t","timeout_ms":1000"#, ""), port),
            "configuration refused: service.timeout_ms: 1000 is out of range 1..1000",
        ),
        (
            options(&config(r#","token":"t","token_env":"ML_TOKEN""#, ""), port),
            "configuration refused: service.token: set either token or token_env, not both",
        ),
        (
            options(&config("", ""), port),
            "configuration refused: service: the companion needs its bearer token",
        ),
        (
            options(&config(r#","token":"t","fallback_share":2"#, ""), port),
            "configuration refused: service.fallback_share: 2 is out of range (0, 1]",
        ),
        (
            options(
                r#"{"rules":[{"id":"g","match":{"path":"/g"},"limits":[{"window":"1m","max":5}],"scope":"global"}]}"#,
                port,
            ),
            r#"configuration refused: rules[0].scope: "global" needs the companion: add a "service" block"#,
        ),
        (
            options(&config(r#","token":"t""#, r#","scope":"strict","continue":true"#), port),
            "configuration refused: rules[0].continue: a strict rule ends its chain",
        ),
        (
            options(&config(r#","token":"t""#, r#","failure_mode":"ajar""#), port),
            "configuration refused: rules[0].failure_mode: unknown variant `ajar`",
        ),
    ];
    // Several Envoys at once: each refusal costs a V8 start.
    let logs: Vec<Result<Envoy, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (cases.iter())
            .map(|(o, _)| {
                let o = o.clone().upstream(&upstream);
                s.spawn(move || Envoy::try_start_with(o))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((_, line), log) in cases.iter().zip(logs) {
        let log = log
            .err()
            .unwrap_or_else(|| panic!("Envoy started; wanted {line:?}"));
        let hits: Vec<&str> = (log.lines())
            .filter(|l| l.contains("configuration refused"))
            .collect();
        assert!(!hits.is_empty(), "wanted {line:?} in:\n{log}");
        // Every VM refuses the same way, one line each (main thread and workers).
        assert!(
            hits.iter().all(|h| h.contains(line)),
            "wanted {line:?} in {hits:#?}"
        );
        assert_eq!(
            hits.len(),
            log.matches("configuration refused").count(),
            "one line per refusal"
        );
        assert!(!log.contains("test-token"), "the token reached the log");
        assert!(log.contains("Failed to configure"), "{log}");
    }
}

#[test]
fn a_good_service_block_starts() {
    let upstream = Upstream::start();
    // The token in the VM environment, the id and zone from the node; nothing listens
    // at the companion's port yet.
    let o = options(
        &config(&format!(r#","token_env":"{TOKEN_ENV}""#), ""),
        free_port(),
    );
    let envoy = Envoy::start_with(o.upstream(&upstream));
    assert!(!envoy.log().contains("configuration refused"));
    assert!(!envoy.log().contains("test-token"));
}

mod scripted {
    use super::*;
    use meshlimit_e2e::peer::{Peer, StrictBehaviour, SyncBehaviour};
    use meshlimit_e2e::Request;
    use std::time::{Duration, Instant};

    const HALF: u32 = 500_000_000;

    fn grant(share: u32) -> SyncBehaviour {
        SyncBehaviour::Grant {
            share,
            proxies: 2,
            lease_ms: 60_000,
        }
    }

    /// Waits until `f` holds, polling; panics with `what` after `timeout`.
    fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < timeout, "{what}: not after {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn one_report_per_proxy_per_interval_with_the_token_and_the_hot_keys() {
        let peer = Peer::start(grant(HALF), StrictBehaviour::Allow);
        let upstream = Upstream::start();
        let cfg = config(
            &format!(r#","token_env":"{TOKEN_ENV}","sync_interval_ms":250,"timeout_ms":100"#),
            "",
        );
        let envoy = Envoy::start_with(options(&cfg, peer.port).upstream(&upstream));
        // The heartbeats of start-up (one per VM), then one report per interval.
        wait_for("first reports", Duration::from_secs(5), || {
            peer.syncs() >= 6
        });
        let mut c = envoy.client();
        for _ in 0..20 {
            c.send(&Request::get("/g").header("x-api-key", "hot"));
        }
        let before = peer.syncs();
        std::thread::sleep(Duration::from_secs(2));
        let during = peer.syncs() - before;
        assert!(
            (7..=9).contains(&during),
            "{during} reports in 2 s at 250 ms"
        );
        let received = peer.received();
        assert!(received
            .iter()
            .all(|r| r.authorization.as_deref() == Some("Bearer test-token")));
        let reports = peer.reports();
        let ids: std::collections::BTreeSet<&str> =
            reports.iter().map(|r| r.proxy_id.as_str()).collect();
        assert_eq!(ids.len(), 1, "one id for every VM: {ids:?}");
        let id = ids.iter().next().unwrap();
        assert!(
            id.starts_with("envoy-test/") && id.len() == "envoy-test/".len() + 8,
            "{id}"
        );
        assert!(reports
            .iter()
            .all(|r| r.zone == "az-t" && r.interval_ms == 250));
        let hot: Vec<_> = reports
            .iter()
            .flat_map(|r| r.entries.iter())
            .filter(|e| e.rule == "g")
            .collect();
        assert!(!hot.is_empty(), "the hot key was reported");
        let admitted: u64 = hot.iter().map(|e| e.admitted).sum();
        let rejected: u64 = hot.iter().map(|e| e.rejected).sum();
        println!(
            "reports: {}, hot key entries: {}, admitted {admitted}, rejected {rejected}",
            reports.len(),
            hot.len()
        );
        assert!(envoy.stat("meshlimit_sync_ok_total").unwrap_or(0) >= 6);
    }
}
