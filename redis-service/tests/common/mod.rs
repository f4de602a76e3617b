//! Real parts for the integration tests: `redis-server` processes (one node, or a 3+3
//! cluster) on free loopback ports in temp dirs, and the service binary itself, spoken
//! to over HTTP. Every process is killed on Drop.
#![allow(
    dead_code,
    reason = "each test binary uses only part of the shared support code"
)]

use meshlimit_service::client::Client;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-123";

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "meshlimit-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn free_port() -> u16 {
    // Tests of one binary run in parallel: never hand out a port twice.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // Cluster nodes also listen on port + 10000: keep both free and below 55535.
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if p < 55000
            && !given.contains(&p)
            && !given.contains(&(p + 10000))
            && !given.contains(&p.wrapping_sub(10000))
            && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            given.push(p);
            return p;
        }
    }
}

pub fn require_redis() {
    for bin in ["redis-server", "redis-cli"] {
        let ok = Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "`{bin}` is not on PATH: these tests start real Redis servers. \
             Run scripts/install-redis.sh (apt-get install -y redis-server redis-tools)."
        );
    }
}

pub struct RedisNode {
    pub port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    cluster: bool,
    /// TLS only (`--port 0 --tls-port`), certificates in `dir` (see [`write_certs`]).
    tls: bool,
}

/// A private CA and a server certificate for localhost / 127.0.0.1, as PEM files
/// `ca.pem`, `server.pem`, `server.key` in `dir`.
pub fn write_certs(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "meshlimit test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}

impl RedisNode {
    pub fn start(cluster: bool) -> RedisNode {
        require_redis();
        let port = free_port();
        let dir = tempdir(&format!("redis-{port}"));
        let mut n = RedisNode {
            port,
            dir,
            child: None,
            cluster,
            tls: false,
        };
        n.spawn();
        n
    }

    /// One node that speaks TLS only, with a certificate from a private CA.
    pub fn start_tls() -> RedisNode {
        require_redis();
        let port = free_port();
        let dir = tempdir(&format!("redis-tls-{port}"));
        write_certs(&dir);
        let mut n = RedisNode {
            port,
            dir,
            child: None,
            cluster: false,
            tls: true,
        };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        if self.tls {
            cmd.arg("--port")
                .arg("0")
                .arg("--tls-port")
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(self.dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(self.dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(self.dir.join("ca.pem"))
                .arg("--tls-auth-clients")
                .arg("no");
        } else {
            cmd.arg("--port").arg(self.port.to_string());
        }
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--protected-mode")
            .arg("no");
        if self.cluster {
            cmd.arg("--cluster-enabled")
                .arg("yes")
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"))
                .arg("--cluster-node-timeout")
                .arg("1000")
                // A replica whose master has been quiet (no writes, pings every 10 s)
                // would otherwise count as too stale to take over.
                .arg("--cluster-replica-validity-factor")
                .arg("0")
                .arg("--repl-ping-replica-period")
                .arg("1")
                // Default waits 5 s before the first full sync to a replica.
                .arg("--repl-diskless-sync-delay")
                .arg("0");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        wait_for(Duration::from_secs(10), || {
            self.cli(&["PING"])
                .map(|s| s.trim() == "PONG")
                .unwrap_or(false)
        });
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("-p").arg(self.port.to_string());
        if self.tls {
            cmd.arg("--tls")
                .arg("--cacert")
                .arg(self.dir.join("ca.pem"));
        }
        let out = cmd.args(args).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).to_string());
        }
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        if s.starts_with("Could not connect") {
            return Err(s);
        }
        Ok(s)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    /// 3 masters + 3 replicas, like production.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisNode> = (0..6).map(|_| RedisNode::start(true)).collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = RedisCluster { nodes };
        c.wait_ok();
        // Replicas must hold the data before a failover test means anything.
        wait_for(Duration::from_secs(30), || {
            c.nodes.iter().all(|n| {
                let r = n.cli(&["INFO", "replication"]).unwrap_or_default();
                r.contains("role:master") || r.contains("master_link_status:up")
            })
        });
        c
    }

    pub fn wait_ok(&self) {
        wait_for(Duration::from_secs(30), || {
            self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .map(|s| s.contains("cluster_state:ok"))
                    .unwrap_or(false)
            })
        });
    }

    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node that is master of `slot`, from a live node's `CLUSTER NODES`.
    pub fn master_of(&self, slot: u16) -> usize {
        self.try_master_of(slot)
            .unwrap_or_else(|| panic!("no master for slot {slot}"))
    }

    pub fn try_master_of(&self, slot: u16) -> Option<usize> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(text) = n.cli(&["CLUSTER", "NODES"]) else {
                continue;
            };
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let port: u16 = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                for r in &f[8..] {
                    let (a, b) = match r.split_once('-') {
                        Some((a, b)) => (a.parse().unwrap_or(1), b.parse().unwrap_or(0)),
                        None => {
                            let v: u16 = r.parse().unwrap_or(u16::MAX);
                            (v, v)
                        }
                    };
                    if (a..=b).contains(&slot) {
                        return self.nodes.iter().position(|x| x.port == port);
                    }
                }
            }
            break;
        }
        None
    }

    pub fn dbsize_total(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .filter(|n| {
                n.cli(&["ROLE"])
                    .map(|r| r.starts_with("master"))
                    .unwrap_or(false)
            })
            .map(|n| {
                n.cli(&["DBSIZE"])
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

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

pub const RULES: &str = r#"{"rules":[
  {"id":"api","match":{"path":"/api/*"},"limits":[{"window":"2s","max":5},{"window":"1h","max":8}]},
  {"id":"big","match":{"path":"/big/*"},"limits":[{"window":"1h","max":50}]},
  {"id":"short","match":{"path":"/short/*"},"limits":[{"window":"1s","max":3}]},
  {"id":"many","match":{"path":"/many/*"},"limits":[{"window":"1h","max":1000000}]},
  {"id":"retry","match":{"path":"/retry/*"},"limits":[{"window":"2s","max":2}]}
]}"#;

pub struct Service {
    child: Option<Child>,
    pub addr: String,
    pub client: Client,
    pub dir: PathBuf,
}

impl Service {
    /// Starts the real binary with `args` (plus a token file and the test rules).
    pub fn start(args: &[&str]) -> Service {
        let dir = tempdir("svc");
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(dir.join("rules.json"), RULES).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshlimit-service"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--token-file")
            .arg(dir.join("token"))
            .arg("--rules")
            .arg(dir.join("rules.json"))
            .arg("--workers")
            .arg("2")
            .args(args)
            .env(
                "ML_LOG",
                std::env::var("ML_TEST_LOG").unwrap_or_else(|_| "warn,redis=error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn meshlimit-service");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listen line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("service did not start: {line:?}"))
            .to_string();
        let client = Client::new(&format!("http://{addr}"), Some(TOKEN));
        Service {
            child: Some(child),
            addr,
            client,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A unique client id per test run, so reruns against one Redis do not collide.
pub fn uniq(tag: &str) -> String {
    format!(
        "{tag}-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
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

/// The multi-window contract shared by both algorithms: "api" is 5 per 2 s and 8 per hour.
pub async fn multi_window_contract(c: &meshlimit_service::client::Client) {
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
pub async fn sync_contract(c: &meshlimit_service::client::Client) {
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
