//! Load command for a running meshlimit-service (see `redis-service/bench.sh`, which starts
//! the stores and the service and runs this against each).
//!
//! meshlimit-bench --url http://127.0.0.1:8080 --token T --mode check|sync|mixed
//!                 [--seconds 10] [--concurrency 8] [--clients 10000] [--batch 1000]
//!                 [--rule bench] [--report-rate 1]
//!
//! Prints requests/s, keys/s (checks: one key per request; sync: entries per request),
//! latency p50/p99/max, and store round trips per request (from /metrics).
//!
//! `mixed`: checks as in `check` mode while `/v1/sync` reports of `--batch` entries are
//! sent at `--report-rate` per second (open loop, as proxies report: a slow answer does
//! not delay the next report). Prints the checks' latency and the share of them answered
//! by the fallback rather than the store, and the reports' latency.

// The integration tests' client; the bench uses part of it.
#[path = "../../tests/support/client.rs"]
#[allow(dead_code, reason = "the bench uses only part of the tests' client")]
mod client;

use client::Client;
use serde_json::json;
use std::time::{Duration, Instant};

struct Args {
    url: String,
    token: Option<String>,
    mode: String,
    seconds: u64,
    concurrency: usize,
    clients: u64,
    batch: usize,
    rule: String,
    report_rate: f64,
}

fn parse() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8080".into(),
        token: std::env::var("ML_TOKEN").ok(),
        mode: "check".into(),
        seconds: 10,
        concurrency: 8,
        clients: 10_000,
        batch: 1000,
        rule: "bench".into(),
        report_rate: 1.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v(),
            "--token" => a.token = Some(v()),
            "--mode" => a.mode = v(),
            "--seconds" => a.seconds = v().parse().expect("--seconds"),
            "--concurrency" => a.concurrency = v().parse().expect("--concurrency"),
            "--clients" => a.clients = v().parse().expect("--clients"),
            "--batch" => a.batch = v().parse().expect("--batch"),
            "--rule" => a.rule = v(),
            "--report-rate" => a.report_rate = v().parse().expect("--report-rate"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

async fn metric(c: &Client, name: &str) -> f64 {
    let Ok(r) = c.get("/metrics").await else {
        return 0.0;
    };
    r.text()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn round_trips(c: &Client) -> f64 {
    metric(c, "meshlimit_store_round_trips_total ").await
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let a = parse();
    let c = Client::new(&a.url, a.token.as_deref());
    if a.mode == "mixed" {
        return mixed(&c, &a).await;
    }
    let keys_per_req = if a.mode == "sync" { a.batch } else { 1 };
    // Warm-up: connections, script cache, JIT-free but cache-warm paths.
    let warm = Instant::now() + Duration::from_secs(1);
    run(&c, &a, warm, 0).await;
    let rt0 = round_trips(&c).await;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(a.seconds);
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let c = c.clone();
            let a = Args { ..clone_args(&a) };
            tokio::spawn(async move { run(&c, &a, deadline, w as u64).await })
        })
        .collect();
    let mut lat: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rt = round_trips(&c).await - rt0;
    lat.sort_unstable();
    let n = lat.len() as f64;
    println!(
        "mode={} concurrency={} batch={} requests={} errors={} req/s={:.0} keys/s={:.0} p50={:.3}ms p99={:.3}ms max={:.3}ms round_trips/req={:.2}",
        a.mode,
        a.concurrency,
        keys_per_req,
        lat.len(),
        errors,
        n / secs,
        n * keys_per_req as f64 / secs,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        if n > 0.0 { rt / n } else { 0.0 },
    );
}

fn clone_args(a: &Args) -> Args {
    Args {
        url: a.url.clone(),
        token: a.token.clone(),
        mode: a.mode.clone(),
        seconds: a.seconds,
        concurrency: a.concurrency,
        clients: a.clients,
        batch: a.batch,
        rule: a.rule.clone(),
        report_rate: a.report_rate,
    }
}

/// One report body of `batch` entries over `clients` keys, the `n`-th of a series.
fn report(a: &Args, n: u64) -> Vec<u8> {
    let entries: Vec<_> = (0..a.batch as u64)
        .map(|i| {
            let k = (n.wrapping_mul(a.batch as u64) + i) % a.clients.max(1);
            json!({"rule": a.rule, "key": format!("{k:016x}"), "window_secs": 60,
                   "max": 1000, "admitted": 3, "rejected": 0})
        })
        .collect();
    serde_json::to_vec(
        &json!({"proxy_id": format!("bench-{}", n % 8), "zone": "az1",
                               "span_ms": 1000, "entries": entries}),
    )
    .unwrap()
}

async fn mixed(c: &Client, a: &Args) {
    // Bodies built before the clock starts: the bench client's JSON work must not stand
    // in for the service's.
    let bodies: Vec<Vec<u8>> = (0..8).map(|n| report(a, n)).collect();
    let check_a = Args {
        mode: "check".into(),
        ..clone_args(a)
    };
    let warm = Instant::now() + Duration::from_secs(1);
    run(c, &check_a, warm, 0).await;
    let src = |s: &str| {
        format!(
            "meshlimit_decisions_total{{endpoint=\"check\",decision=\"allowed\",source=\"{s}\"}}"
        )
    };
    let (store0, fb0) = (
        metric(c, &src("store")).await,
        metric(c, &src("fallback")).await,
    );
    let deg0 = metric(c, "meshlimit_degraded_transitions_total").await;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(a.seconds);
    let reporter = {
        let c = c.clone();
        let period = Duration::from_secs_f64(1.0 / a.report_rate.max(0.001));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut sent = Vec::new();
            let mut n = 0usize;
            loop {
                tick.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let body = bodies[n % bodies.len()].clone();
                n += 1;
                let c = c.clone();
                sent.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let ok = matches!(c.post_raw("/v1/sync", body).await, Ok(r) if r.status == 200
                        && r.json()["degraded"] == false);
                    (t.elapsed().as_micros().min(u32::MAX as u128) as u32, ok)
                }));
            }
            let mut lat = Vec::new();
            let mut bad = 0;
            for s in sent {
                let (l, ok) = s.await.unwrap();
                lat.push(l);
                bad += u64::from(!ok);
            }
            (lat, bad)
        })
    };
    let tasks: Vec<_> = (0..a.concurrency)
        .map(|w| {
            let c = c.clone();
            let a = clone_args(&check_a);
            tokio::spawn(async move { run(&c, &a, deadline, w as u64).await })
        })
        .collect();
    let mut lat: Vec<u32> = Vec::new();
    let mut errors = 0u64;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let secs = t0.elapsed().as_secs_f64();
    let (mut rlat, rbad) = reporter.await.unwrap();
    let store = metric(c, &src("store")).await - store0;
    let fb = metric(c, &src("fallback")).await - fb0;
    let deg = metric(c, "meshlimit_degraded_transitions_total").await - deg0;
    lat.sort_unstable();
    rlat.sort_unstable();
    println!(
        "mode=mixed check_concurrency={} checks={} errors={} checks/s={:.0} check_p50={:.3}ms check_p99={:.3}ms check_max={:.3}ms \
         from_fallback={:.2}% degraded_transitions={} reports={} batch={} report_rate={}/s reports_not_ok={} report_p50={:.1}ms report_p99={:.1}ms",
        a.concurrency,
        lat.len(),
        errors,
        lat.len() as f64 / secs,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        if store + fb > 0.0 { 100.0 * fb / (store + fb) } else { 0.0 },
        deg,
        rlat.len(),
        a.batch,
        a.report_rate,
        rbad,
        pct(&rlat, 0.50),
        pct(&rlat, 0.99),
    );
}

/// Sends requests until `deadline`; latencies in microseconds, and the error count.
async fn run(c: &Client, a: &Args, deadline: Instant, worker: u64) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(100_000);
    let mut errors = 0;
    let mut i: u64 = worker.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    while Instant::now() < deadline {
        let body = if a.mode == "sync" {
            let entries: Vec<_> = (0..a.batch)
                .map(|_| {
                    i = i.wrapping_add(1);
                    json!({"rule": a.rule, "key": format!("{:016x}", i % a.clients),
                           "window_secs": 60, "max": 1000, "admitted": 3, "rejected": 0})
                })
                .collect();
            json!({"proxy_id": format!("bench-{worker}"), "zone": "az1", "span_ms": 1000, "entries": entries})
        } else {
            i = i.wrapping_add(1);
            json!({"client_id": format!("client-{}", i % a.clients), "rule_id": a.rule})
        };
        let path = if a.mode == "sync" {
            "/v1/sync"
        } else {
            "/rate-limit/check"
        };
        let bytes = serde_json::to_vec(&body).unwrap();
        let t = Instant::now();
        match c.post_raw(path, bytes).await {
            Ok(r) if r.status == 200 => {
                lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32)
            }
            _ => errors += 1,
        }
    }
    (lat, errors)
}
