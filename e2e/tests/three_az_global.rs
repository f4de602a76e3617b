//! Global limits on three AZs (`meshlimit_e2e::topology`): three Envoys (`--concurrency
//! 2`) with the filter in global and strict scope, a companion per AZ, one Redis Cluster
//! over the three. Each scenario of README's "Global limits on three AZs" runs on one
//! bring-up (each on its own rule, so one scenario's keys do not meet another's), prints
//! its figures, and the test fails at the end with every scenario that missed its bound.
//!
//! Accuracy is what the three Envoys admitted together ÷ what one exact token bucket with
//! the same limit admits on the same merged traffic ([`exact_admits`]: the core's GCRA on
//! the merged schedule of the paced loads).
//!
//! Needs root (namespaces); fails, rather than skips, without it.

use std::time::{Duration, Instant};

use meshlimit_core::config::Limit;
use meshlimit_core::gcra;
use meshlimit_e2e::load::{LoadReport, LoadRun};
use meshlimit_e2e::topology::{Az, Topology, TopologyOptions, SERVICE_CLUSTER, TOKEN_ENV};
use meshlimit_e2e::Request;

/// The filter's sync interval here; proxies count as gone after three of them.
const INTERVAL: Duration = Duration::from_millis(500);
/// The strict callout's deadline.
const TIMEOUT: Duration = Duration::from_millis(250);
/// The accuracy bound of scenarios 1–3 and 6–7 (±3 %).
const BOUND: f64 = 0.03;
/// Accuracy is measured from here on: a new key starts at `1/n` of the burst on every
/// proxy (never the whole limit), so the part of the exact bucket's initial burst that
/// the quiet proxies hold and do not use is not admitted. The whole-run figure, start
/// included, is printed beside it (docs/global-limits.md, the cold-start term).
const SETTLED: Duration = Duration::from_secs(2);

fn config() -> String {
    let rule = |id: &str, extra: &str, window: &str, max: u64| {
        format!(
            r#"{{"id":"{id}","match":{{"path":"/{id}/*"}},"key":["header:x-api-key"],"limits":[{{"window":"{window}","max":{max}}}]{extra}}}"#
        )
    };
    let rules = [
        rule("uniform", "", "1s", 100),
        rule("skewed", "", "1s", 100),
        rule("many", "", "1s", 20),
        rule(
            "strict",
            r#","scope":"strict","failure_mode":"closed""#,
            "1h",
            50,
        ),
        rule(
            "slow-strict",
            r#","scope":"strict","failure_mode":"closed""#,
            "1h",
            1000,
        ),
        rule("fm-local", r#","failure_mode":"local""#, "1s", 60),
        rule("fm-open", r#","failure_mode":"open""#, "1s", 60),
        rule("fm-closed", r#","failure_mode":"closed""#, "1s", 60),
        rule("failover", "", "1s", 30),
        rule("partition", "", "1s", 100),
        rule("slow", "", "1s", 100),
    ];
    format!(
        r#"{{"service":{{"cluster":"{SERVICE_CLUSTER}","token_env":"{TOKEN_ENV}","sync_interval_ms":{},"timeout_ms":{}}},"rules":[{}]}}"#,
        INTERVAL.as_millis(),
        TIMEOUT.as_millis(),
        rules.join(",")
    )
}

fn limit(window_secs: u64, max: u64) -> Limit {
    Limit::new(window_secs, max, max).expect("valid limit")
}

fn keyed(rule: &str, key: &str) -> Request {
    Request::get(&format!("/{rule}/x")).header("x-api-key", key)
}

/// What one exact bucket admits of paced loads `(rate/s, sent)` started together,
/// between `from` and `to` (seconds from the start; earlier requests drain the bucket
/// but are not counted).
fn exact_admits(l: &Limit, loads: &[(f64, u64)], from: f64, to: f64) -> u64 {
    let mut due: Vec<u64> = Vec::new();
    for &(rate, sent) in loads {
        due.extend((0..sent).map(|j| (j as f64 / rate * 1e9) as u64));
    }
    due.sort_unstable();
    let mut tats = [0u64];
    let base = 1_000_000_000_000u64;
    let mut admitted = 0;
    for t in due {
        let d = gcra::check(std::slice::from_ref(l), &mut tats, base + t, 1);
        let s = t as f64 / 1e9;
        if d.allowed && s >= from && s < to {
            admitted += 1;
        }
    }
    admitted
}

fn counter(topo: &Topology, az: Az, name: &str) -> u64 {
    topo.envoy(az).stat(name).unwrap_or(0)
}

fn counters(topo: &Topology, name: &str) -> [u64; 3] {
    Az::ALL.map(|az| counter(topo, az, name))
}

/// Until every Envoy has synced twice and hears of three live proxies.
fn wait_synced(topo: &Topology, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        let ok = counters(topo, "meshlimit_sync_ok_total");
        let live = counters(topo, "meshlimit_live_proxies");
        if ok.iter().all(|&n| n >= 2) && live.iter().all(|&n| n == 3) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > timeout {
            return Err(format!(
                "not synced after {timeout:?}: ok {ok:?}, live {live:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails the scenario unless `cond`.
fn check(failures: &mut Vec<String>, scenario: &str, cond: bool, what: String) {
    let mark = if cond { "ok  " } else { "FAIL" };
    eprintln!("  [{mark}] {what}");
    if !cond {
        failures.push(format!("{scenario}: {what}"));
    }
}

fn no_errors(reports: &[LoadReport]) -> (bool, String) {
    let bad: Vec<String> = reports
        .iter()
        .filter(|r| r.other_total() > 0 || r.errors > 0)
        .map(|r| {
            format!(
                "{}: other {:?} errors {} ({:?})",
                r.name, r.other, r.errors, r.first_error
            )
        })
        .collect();
    (
        bad.is_empty(),
        if bad.is_empty() {
            "no 5xx, no errors".into()
        } else {
            bad.join("; ")
        },
    )
}

fn paced(
    topo: &Topology,
    az: Az,
    rule: &'static str,
    key: &'static str,
    rate: f64,
) -> meshlimit_e2e::load::Load {
    topo.load(az, move |_| keyed(rule, key))
        .rate(rate)
        .connections(3)
}

#[test]
fn global_limits_across_three_azs() {
    let topo = Topology::start(TopologyOptions::new(&config()));
    eprintln!("bring-up {:?}", topo.bring_up.total);
    let synced = wait_synced(&topo, Duration::from_secs(15)).unwrap_or_else(|e| {
        topo.print_logs(40);
        panic!("{e}")
    });
    eprintln!("all three Envoys synced {synced:?} after the bring-up");

    let mut failures = Vec::new();
    // MESHLIMIT_SCENARIOS=5,8 runs only those; every one by default.
    let only = std::env::var("MESHLIMIT_SCENARIOS").unwrap_or_default();
    let run = |n: &str| match only.as_str() {
        "" | "all" => true,
        list => list.split(',').any(|s| s.trim() == n),
    };
    type Scenario = fn(&Topology, &mut Vec<String>);
    let scenarios: [(&str, Scenario); 7] = [
        ("1", accuracy_uniform_and_skewed),
        ("4", strict_never_exceeds),
        ("5", companion_killed),
        ("6", redis_master_killed),
        ("7", az_partition),
        ("8", slow_companion),
        // Last: its 10,000 new keys are the heaviest load on the companions and Redis.
        ("3", many_clients),
    ];
    for (n, scenario) in scenarios {
        if run(n) {
            scenario(&topo, &mut failures);
        }
    }

    if !failures.is_empty() {
        topo.print_logs(30);
    }
    let left = topo.shutdown();
    assert!(left.is_empty(), "left after teardown: {left:#?}");
    assert!(
        failures.is_empty(),
        "scenarios out of bounds:\n{}",
        failures.join("\n")
    );
}

/// Scenarios 1 and 2 at once (their own rules): one client far over its limit on all
/// three Envoys, uniform (150/s each) and 90/5/5 (270, 15, 15 per second), 12 s.
fn accuracy_uniform_and_skewed(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenarios 1-2: accuracy, uniform and 90/5/5, 12 windows of 1 s at 100/s");
    let secs = 12.0;
    let uniform = [150.0, 150.0, 150.0];
    let skewed = [270.0, 15.0, 15.0];
    let mut loads = Vec::new();
    for az in Az::ALL {
        loads.push(paced(topo, az, "uniform", "u-hot", uniform[az.index()]));
    }
    for az in Az::ALL {
        loads.push(paced(topo, az, "skewed", "s-hot", skewed[az.index()]));
    }
    let entries0 = counters(topo, "meshlimit_sync_entries_total");
    let syncs0 = counters(topo, "meshlimit_sync_ok_total");
    let reports = meshlimit_e2e::load::run(loads, Duration::from_secs_f64(secs));
    let (ok, what) = no_errors(&reports);
    check(failures, "scenarios 1-2", ok, what);
    let l = limit(1, 100);
    for (name, rates, part) in [
        ("uniform", uniform, &reports[..3]),
        ("90/5/5", skewed, &reports[3..]),
    ] {
        let sent: Vec<(f64, u64)> = rates
            .iter()
            .zip(part)
            .map(|(&r, rep)| (r, rep.sent))
            .collect();
        let whole_ideal = exact_admits(&l, &sent, 0.0, f64::MAX);
        let whole: u64 = part.iter().map(|r| r.ok).sum();
        let ideal = exact_admits(&l, &sent, SETTLED.as_secs_f64(), f64::MAX);
        let admitted: u64 = part
            .iter()
            .map(|r| r.between(SETTLED, Duration::MAX).ok)
            .sum();
        let acc = admitted as f64 / ideal as f64;
        let per_az: Vec<u64> = part.iter().map(|r| r.ok).collect();
        check(
            failures,
            "scenarios 1-2",
            (acc - 1.0).abs() <= BOUND,
            format!(
                "{name}: from {SETTLED:?} admitted {admitted} of ideal {ideal}: accuracy {acc:.4}; whole run {whole} (per AZ {per_az:?}) of {whole_ideal}: {:.4}",
                whole as f64 / whole_ideal as f64
            ),
        );
    }
    let syncs: u64 = counters(topo, "meshlimit_sync_ok_total")
        .iter()
        .zip(syncs0)
        .map(|(a, b)| a - b)
        .sum();
    let admitted: u64 = reports.iter().map(|r| r.ok).sum();
    // Two rules at 100/s each: 6 reports a second against 200 admitted (scenario 3
    // holds the bound at a realistic admitted rate).
    eprintln!(
        "  callouts per admitted request {:.4} ({syncs} syncs, {admitted} admitted)",
        syncs as f64 / admitted.max(1) as f64
    );
    let entries: u64 = counters(topo, "meshlimit_sync_entries_total")
        .iter()
        .zip(entries0)
        .map(|(a, b)| a - b)
        .sum();
    eprintln!(
        "  entries per report {:.1}",
        entries as f64 / syncs.max(1) as f64
    );
}

/// Scenario 3: 10,000 clients over the three Envoys: 9,990 each sending one request per
/// phase (all must pass), 10 hot ones at 3× their limit (each within the bound). A warm-up
/// phase first (10,000 first sights in 10 s: reports of hundreds of keys, capped and
/// most urgent first, some failing on this machine and shrinking the next), a settle
/// with the hot keys only until nine in ten of the warm-up's shares are back (10–12 s
/// measured, at most 24 s), then the measured phase: every cold client again,
/// and reports carry the keys that matter (the hot ones), not all 10,000.
fn many_clients(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!(
        "scenario 3: 10,000 clients (10 hot at 60/s against 20/s), two phases of 10 s, a settle between"
    );
    const COLD: u64 = 9_990;
    const HOT: u64 = 10;
    let secs = 10.0;
    // Per AZ: 333 cold requests per second (every cold key once per phase over the three
    // AZs) and 20/s per hot key.
    let cold_rate = COLD as f64 / secs / 3.0;
    let hot_rate = 20.0 * HOT as f64;
    let l = limit(1, 20);
    // Between the phases, hot keys only, until the warm-up's shares are back (see
    // below): 2 s at a time, at most SETTLE.
    const SETTLE: Duration = Duration::from_secs(24);
    const SETTLE_STEP: Duration = Duration::from_secs(2);
    for phase in ["warm-up", "measured"] {
        if phase == "measured" {
            // The warm-up's new keys hold the shares their first sight earned until
            // their silence is evidence (reported every interval as tracked keys, the
            // companion's demand falling on each: several seconds at this limit; with
            // other work on the cores, reports fail and shrink, and it takes longer).
            // The hot keys go on meanwhile, until nine in ten of those shares are back
            // (the rest: silences still within noise).
            let before: u64 = counters(topo, "meshlimit_tracked_keys").iter().sum();
            let start = Instant::now();
            let mut after = before;
            while after * 10 > before && start.elapsed() < SETTLE {
                let hot_only: Vec<meshlimit_e2e::Load> = Az::ALL
                    .into_iter()
                    .map(|az| {
                        topo.load(az, |i| keyed("many", &format!("hot-{}", i % HOT)))
                            .rate(hot_rate)
                            .connections(3)
                    })
                    .collect();
                meshlimit_e2e::load::run(hot_only, SETTLE_STEP);
                after = counters(topo, "meshlimit_tracked_keys").iter().sum();
            }
            check(
                failures,
                "scenario 3",
                after * 10 <= before,
                format!(
                    "tracked keys {before} after the warm-up, {after} {:.0?} later (at most {SETTLE:?}; the hot ones: {}): nine in ten shares back",
                    start.elapsed(),
                    3 * HOT
                ),
            );
        }
        let entries0 = counters(topo, "meshlimit_sync_entries_total");
        let syncs0 = counters(topo, "meshlimit_sync_ok_total");
        let failed0: u64 = counters(topo, "meshlimit_sync_failed_total").iter().sum();
        let why0: Vec<u64> = ["hot", "due", "new", "tracked"]
            .iter()
            .map(|w| {
                counters(topo, &format!("meshlimit_sync_entries_{w}_total"))
                    .iter()
                    .sum()
            })
            .collect();
        let mut loads = Vec::new();
        for az in Az::ALL {
            let k = az.index() as u64;
            loads.push(
                topo.load(az, move |i| {
                    keyed("many", &format!("cold-{}", (i * 3 + k) % COLD))
                })
                .rate(cold_rate)
                .connections(3),
            );
        }
        for az in Az::ALL {
            loads.push(
                topo.load(az, |i| keyed("many", &format!("hot-{}", i % HOT)))
                    .rate(hot_rate)
                    .connections(3)
                    .classes(HOT as usize, |i| (i % HOT) as usize),
            );
        }
        let reports = meshlimit_e2e::load::run(loads, Duration::from_secs_f64(secs));
        let (ok, what) = no_errors(&reports);
        check(failures, "scenario 3", ok, format!("{phase}: {what}"));
        let cold_sent: u64 = reports[..3].iter().map(|r| r.sent).sum();
        let cold_ok: u64 = reports[..3].iter().map(|r| r.ok).sum();
        check(
            failures,
            "scenario 3",
            cold_ok == cold_sent,
            format!("{phase}: cold clients admitted {cold_ok} of {cold_sent}"),
        );
        let mut worst: f64 = 0.0;
        let mut accs = Vec::new();
        for h in 0..HOT as usize {
            let sent: Vec<(f64, u64)> = reports[3..]
                .iter()
                .map(|r| {
                    (
                        hot_rate / HOT as f64,
                        r.classes[h].ok + r.classes[h].limited + r.classes[h].other,
                    )
                })
                .collect();
            let ideal = exact_admits(&l, &sent, 0.0, f64::MAX);
            let admitted: u64 = reports[3..].iter().map(|r| r.classes[h].ok).sum();
            // The measured phase finds the hot keys' buckets drained by the warm-up: the
            // exact bucket's initial burst is not there to admit.
            let ideal = if phase == "measured" {
                ideal - l.burst.min(ideal)
            } else {
                ideal
            };
            let acc = admitted as f64 / ideal as f64;
            worst = worst.max((acc - 1.0).abs());
            accs.push(format!("{acc:.3}"));
        }
        if phase == "measured" {
            check(
                failures,
                "scenario 3",
                worst <= BOUND,
                format!(
                    "{phase}: hot clients' accuracy {} (worst off by {:.1} %)",
                    accs.join(" "),
                    worst * 100.0
                ),
            );
        } else {
            eprintln!("  {phase}: hot clients' accuracy {}", accs.join(" "));
        }
        let syncs: u64 = counters(topo, "meshlimit_sync_ok_total")
            .iter()
            .zip(syncs0)
            .map(|(a, b)| a - b)
            .sum();
        let entries: u64 = counters(topo, "meshlimit_sync_entries_total")
            .iter()
            .zip(entries0)
            .map(|(a, b)| a - b)
            .sum();
        let per_report = entries as f64 / syncs.max(1) as f64;
        let why: Vec<String> = ["hot", "due", "new", "tracked"]
            .iter()
            .zip(&why0)
            .map(|(w, before)| {
                let now: u64 = counters(topo, &format!("meshlimit_sync_entries_{w}_total"))
                    .iter()
                    .sum();
                format!("{w} {}", now - before)
            })
            .collect();
        eprintln!(
            "  {phase}: entries sent by why: {} ({} syncs failed)",
            why.join(", "),
            counters(topo, "meshlimit_sync_failed_total")
                .iter()
                .sum::<u64>()
                - failed0
        );
        let admitted: u64 = reports.iter().map(|r| r.ok).sum();
        let per_request = syncs as f64 / admitted.max(1) as f64;
        if phase == "measured" {
            check(
                failures,
                "scenario 3",
                per_request <= 0.01,
                format!("{phase}: callouts per admitted request {per_request:.4} ({syncs} syncs, {admitted} admitted)"),
            );
        }
        if phase == "measured" {
            check(
                failures,
                "scenario 3",
                per_report < 100.0,
                format!(
                    "{phase}: {per_report:.1} entries per report ({entries} in {syncs} reports)"
                ),
            );
        } else {
            eprintln!(
                "  {phase}: {per_report:.1} entries per report ({entries} in {syncs} reports)"
            );
        }
    }
}

/// Scenario 4: concurrent bursts on all three Envoys (8 connections each, as fast as they
/// go) on one client of a strict 50/h limit: together they never admit more than 50.
fn strict_never_exceeds(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenario 4: strict 50/h, bursts of 8 connections on each Envoy for 2 s");
    let failed0 = counters(topo, "meshlimit_strict_failed_closed_total");
    let loads = Az::ALL
        .map(|az| {
            topo.load(az, |_| keyed("strict", "st-burst"))
                .connections(8)
        })
        .to_vec();
    let reports = meshlimit_e2e::load::run(loads, Duration::from_secs(2));
    let (ok, what) = no_errors(&reports);
    check(failures, "scenario 4", ok, what);
    let admitted: u64 = reports.iter().map(|r| r.ok).sum();
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let failed: u64 = counters(topo, "meshlimit_strict_failed_closed_total")
        .iter()
        .zip(failed0)
        .map(|(a, b)| a - b)
        .sum();
    let p99 = reports
        .iter()
        .map(|r| r.latency(0.99))
        .max()
        .unwrap_or_default();
    check(
        failures,
        "scenario 4",
        admitted <= 50 && (failed > 0 || admitted == 50),
        format!("admitted {admitted} of {sent} against 50 ({failed} callouts failed closed), p99 {p99:?}"),
    );
}

/// Scenario 5: the companion killed in az-a mid-load and restarted, then all three:
/// per failure_mode, what az-a (then every AZ) admitted while its companion was gone,
/// no 5xx, and recovery within three intervals of the companion being ready again.
fn companion_killed(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenario 5: companion killed (az-a, then all three), 60/s limits, 90/s per Envoy");
    for (what, victims) in [("az-a", vec![Az::A]), ("all three", Az::ALL.to_vec())] {
        let rate = 90.0;
        let mut loads = Vec::new();
        for rule in ["fm-local", "fm-open", "fm-closed"] {
            for az in Az::ALL {
                let key: &'static str = if what == "az-a" { "fm-1" } else { "fm-2" };
                loads.push(
                    topo.load(az, move |_| keyed(rule, key))
                        .rate(rate)
                        .connections(2),
                );
            }
        }
        let run = LoadRun::start(loads, Duration::from_secs(12));
        let start = run.started();
        std::thread::sleep(Duration::from_secs(3));
        let killed_at = start.elapsed();
        for &az in &victims {
            topo.companion(az).kill();
        }
        std::thread::sleep(Duration::from_secs(4));
        let restarted_at = start.elapsed();
        for &az in &victims {
            topo.companion(az).restart();
        }
        for &az in &victims {
            if let Err(e) = topo.companion(az).wait_ready(Duration::from_secs(10)) {
                failures.push(format!("scenario 5: {e}"));
            }
        }
        let ready_at = start.elapsed();
        let reports = run.join();
        let (ok, w) = no_errors(&reports);
        check(failures, "scenario 5", ok, format!("{what}: {w}"));
        eprintln!(
            "  {what}: killed at {killed_at:.1?}, restarted at {restarted_at:.1?}, ready at {ready_at:.1?}"
        );
        // The outage as the filter sees it: from three intervals after the kill (its
        // last grants and sync view stay valid until then) to the restart.
        let from = killed_at + 3 * INTERVAL + Duration::from_millis(500);
        // Up to a little before the restart: a request due just before it may be answered
        // after the companion is back.
        let to = restarted_at - Duration::from_millis(300);
        let secs = (to - from).as_secs_f64();
        let recovered = ready_at + 3 * INTERVAL;
        for (ri, rule) in ["fm-local", "fm-open", "fm-closed"].iter().enumerate() {
            let part = &reports[ri * 3..ri * 3 + 3];
            let during: Vec<_> = part.iter().map(|r| r.between(from, to)).collect();
            let after: Vec<_> = part
                .iter()
                .map(|r| r.between(recovered, Duration::from_secs(12)))
                .collect();
            let victims_ok: u64 = victims.iter().map(|az| during[az.index()].ok).sum();
            let victims_sent: u64 = victims
                .iter()
                .map(|az| during[az.index()].ok + during[az.index()].limited)
                .sum();
            let total_ok: u64 = during.iter().map(|b| b.ok).sum();
            let rate_during = total_ok as f64 / secs;
            let after_ok: u64 = after.iter().map(|b| b.ok).sum();
            let after_secs = (Duration::from_secs(12).saturating_sub(recovered)).as_secs_f64();
            let after_rate = after_ok as f64 / after_secs.max(1e-9);
            let per_second: Vec<String> = (0..12)
                .map(|t| {
                    let b = part.iter().map(|r| {
                        r.between(Duration::from_secs(t), Duration::from_secs(t + 1))
                            .ok
                    });
                    format!("{:?}", b.collect::<Vec<_>>())
                })
                .collect();
            eprintln!(
                "  {what} {rule}: admitted per second per AZ {}",
                per_second.join(" ")
            );
            eprintln!(
                "  {what} {rule}: during the outage the killed AZs admitted {victims_ok} of {victims_sent}, all AZs {rate_during:.0}/s (limit 60/s); after recovery {after_rate:.0}/s"
            );
            let good = match *rule {
                // Each keeps 1/n of the limit: Σ = the limit, whatever is down.
                "fm-local" => rate_during <= 60.0 * (1.0 + BOUND) + 60.0 / secs,
                "fm-open" => victims_ok == victims_sent,
                _ => victims_ok == 0,
            };
            check(
                failures,
                "scenario 5",
                good,
                format!("{what} {rule}: failure mode as specified"),
            );
            check(
                failures,
                "scenario 5",
                (after_rate / 60.0 - 1.0).abs() <= 0.1,
                format!("{what} {rule}: back at the limit within three intervals of the companion being ready ({after_rate:.0}/s from {recovered:.1?})"),
            );
        }
    }
}

/// Scenario 6: the Redis master in az-a killed under load: its replica takes over, and
/// the limit holds again once it has (6 clients, so that some live on the lost master).
fn redis_master_killed(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenario 6: Redis master of az-a killed; 6 clients at 45/s per Envoy against 30/s");
    const KEYS: u64 = 6;
    let rate = 45.0 * KEYS as f64;
    let loads = Az::ALL
        .map(|az| {
            topo.load(az, |i| keyed("failover", &format!("fo-{}", i % KEYS)))
                .rate(rate)
                .connections(3)
        })
        .to_vec();
    let total = Duration::from_secs(14);
    let run = LoadRun::start(loads, total);
    let start = run.started();
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = start.elapsed();
    let lost = topo.kill_redis_master(Az::A);
    let failover = topo.wait_redis_failover(&lost, Duration::from_secs(15));
    let reports = run.join();
    let (ok, w) = no_errors(&reports);
    check(failures, "scenario 6", ok, w);
    match failover {
        Ok(f) => {
            let back = killed_at + f.cluster_ok_after + 3 * INTERVAL;
            let ok: u64 = reports.iter().map(|r| r.between(back, total).ok).sum();
            let secs = (total - back).as_secs_f64();
            let acc = ok as f64 / (secs * 30.0 * KEYS as f64);
            eprintln!(
                "  replica promoted {:?} and cluster ok {:?} after the kill",
                f.promoted_after, f.cluster_ok_after
            );
            check(
                failures,
                "scenario 6",
                (acc - 1.0).abs() <= BOUND,
                format!("accuracy from three intervals after the failover: {acc:.4} ({ok} in {secs:.1} s)"),
            );
        }
        Err(e) => failures.push(format!("scenario 6: {e}")),
    }
    if let Err(e) = topo.redis().restart(lost.node) {
        failures.push(format!(
            "scenario 6: the killed master did not come back: {e}"
        ));
    }
}

/// Scenario 7: az-c cut off from the others for 10 s, then healed.
fn az_partition(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenario 7: az-c partitioned for 10 s; one client at 150/s per Envoy against 100/s");
    let loads = Az::ALL
        .map(|az| paced(topo, az, "partition", "p-hot", 150.0))
        .to_vec();
    let total = Duration::from_secs(30);
    let run = LoadRun::start(loads, total);
    let start = run.started();
    std::thread::sleep(Duration::from_secs(4));
    let cut_at = start.elapsed();
    topo.partition(Az::C);
    std::thread::sleep(Duration::from_secs(10));
    let healed_at = start.elapsed();
    topo.heal(Az::C);
    // The counts reconcile once every companion reaches the cluster again (az-c's
    // reconnects, the cluster takes its old master back as a replica: 0.3 s after the
    // heal in the runs measured here).
    let not_ready: Vec<String> = Az::ALL
        .into_iter()
        .filter_map(|az| topo.companion(az).wait_ready(Duration::from_secs(12)).err())
        .collect();
    let ready_at = start.elapsed();
    let reports = run.join();
    check(
        failures,
        "scenario 7",
        not_ready.is_empty(),
        format!(
            "every companion ready {:.1?} after the heal{}",
            ready_at - healed_at,
            if not_ready.is_empty() {
                String::new()
            } else {
                format!(": {}", not_ready.join("; "))
            }
        ),
    );
    let (ok, w) = no_errors(&reports);
    check(failures, "scenario 7", ok, w);
    // az-c still reaches its own companion, which answers from its fallback (degraded):
    // at most 1/n of the limit, n the live count it last knew (3). The other two stop
    // hearing of az-c's proxy after three intervals and share the whole limit; their
    // companions also lose master C until its replica (in az-a) takes over. Measured
    // once both are behind them.
    let from = cut_at + Duration::from_secs(5);
    let secs = (healed_at - from).as_secs_f64();
    let ab: u64 = reports[..2]
        .iter()
        .map(|r| r.between(from, healed_at).ok)
        .sum();
    let c = reports[2].between(from, healed_at).ok;
    // The bound: the two still on the cluster hold the limit between them, and az-c,
    // cut off, adds at most its 1/n (the degraded share) on top.
    let ab_rate = ab as f64 / secs;
    let c_rate = c as f64 / secs;
    check(
        failures,
        "scenario 7",
        ab_rate <= 100.0 * (1.0 + BOUND) && c_rate <= 100.0 / 3.0 * (1.0 + BOUND),
        format!(
            "during the partition az-a + az-b admitted {ab_rate:.1}/s (at most 100/s), az-c {c_rate:.1}/s (at most 1/3 of it): together {:.1}/s",
            ab_rate + c_rate
        ),
    );
    let after = ready_at + 6 * INTERVAL;
    let secs = total.saturating_sub(after).as_secs_f64().max(0.5);
    let all: u64 = reports.iter().map(|r| r.between(after, total).ok).sum();
    let acc = all as f64 / (secs * 100.0);
    let per_az: Vec<String> = reports
        .iter()
        .map(|r| format!("{:.1}", r.between(after, total).ok as f64 / secs))
        .collect();
    eprintln!("  after the heal, per AZ per second: {}", per_az.join(" "));
    check(
        failures,
        "scenario 7",
        (acc - 1.0).abs() <= BOUND,
        format!("after the heal (from {after:.1?}, six intervals after every companion was ready): accuracy {acc:.4}"),
    );
}

/// Scenario 8: the companion of az-a paused (SIGSTOP) for 4 s: global requests are not
/// slowed (p99 before and during), strict ones wait `timeout_ms` and then follow
/// their failure mode (closed: 429).
fn slow_companion(topo: &Topology, failures: &mut Vec<String>) {
    eprintln!("scenario 8: companion of az-a paused for 4 s");
    let measure = |label: &str| {
        let loads = vec![
            paced(topo, Az::A, "slow", "sl-hot", 200.0),
            topo.load(Az::A, |i| keyed("slow-strict", &format!("ss-{}", i % 50)))
                .rate(20.0)
                // Each may wait `timeout_ms` while the companion is paused.
                .connections(10),
        ];
        let reports = meshlimit_e2e::load::run(loads, Duration::from_secs(3));
        eprintln!("  {label}: {}", reports[0].summary());
        eprintln!("  {label}: {}", reports[1].summary());
        reports
    };
    let before = measure("before");
    topo.companion(Az::A).pause();
    let paused = Instant::now();
    let during = measure("during");
    let held = paused.elapsed();
    topo.companion(Az::A).resume();
    eprintln!("  paused {held:?}");
    let (p99_before, p99_during) = (before[0].latency(0.99), during[0].latency(0.99));
    check(
        failures,
        "scenario 8",
        p99_during <= p99_before * 2 + Duration::from_millis(5),
        format!("global p99 before {p99_before:?}, during {p99_during:?}"),
    );
    let (ok, w) = no_errors(&[
        before[0].clone(),
        during[0].clone(),
        before[1].clone(),
        during[1].clone(),
    ]);
    check(failures, "scenario 8", ok, w);
    let s = &during[1];
    check(
        failures,
        "scenario 8",
        s.ok == 0 && s.latency(0.5) >= TIMEOUT * 9 / 10 && s.latency(0.99) <= TIMEOUT + Duration::from_millis(150),
        format!(
            "strict while paused: {} admitted of {}, p50 {:?} p99 {:?} (timeout_ms {:?}, failure_mode closed)",
            s.ok,
            s.sent,
            s.latency(0.5),
            s.latency(0.99),
            TIMEOUT
        ),
    );
    check(
        failures,
        "scenario 8",
        before[1].ok == before[1].sent,
        format!(
            "strict before the pause: {} admitted of {}",
            before[1].ok, before[1].sent
        ),
    );
}
