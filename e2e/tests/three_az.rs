//! The three-AZ topology (`meshlimit_e2e::topology`), proven with real everything: three
//! network namespaces, an Envoy with the filter, a companion and an upstream in each, one
//! Redis Cluster (3 masters + 3 replicas) over the three, partitions, failovers, paused
//! and delayed companions, load from the test process, and a clean teardown.
//!
//! The filter does not sync with the companion yet, so its rules here are local; what
//! this proves is the infrastructure the global-limit scenarios run on.
//!
//! Needs root (namespaces); fails, rather than skips, without it.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use meshlimit_e2e::netns::{self, ip_ok, Netns};
use meshlimit_e2e::topology::{
    cleanup_leftovers, leftovers, Az, MachineLock, Topology, TopologyOptions, COMPANION_ROUTE,
};
use meshlimit_e2e::{load, process, Request};
use serde_json::json;

/// 50 per hour per client: a load on a fresh client gets exactly 50 through, per Envoy.
const CONFIG: &str =
    r#"{"rules":[{"id":"api","match":{"path":"/api/*"},"limits":[{"window":"1h","max":50}]}]}"#;

fn key(path: &str, k: &str) -> Request {
    Request::get(path).header("x-api-key", k)
}

fn hits(topo: &Topology) -> Vec<u64> {
    Az::ALL.iter().map(|&az| topo.upstream(az).hits()).collect()
}

/// GET through the AZ's Envoy to its companion (Envoy -> delay proxy -> companion).
fn via_envoy_to_companion(topo: &Topology, az: Az, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = topo
        .envoy(az)
        .client()
        .try_send(&Request::get(&format!(
            "{COMPANION_ROUTE}{}",
            path.trim_start_matches('/')
        )))
        .unwrap_or_else(|e| panic!("{}: {e}", az.name()));
    (r.status, t.elapsed())
}

fn report(proxy: &str, zone: &str, fingerprint: &str, admitted: u64) -> serde_json::Value {
    json!({"proxy_id": proxy, "zone": zone, "interval_ms": 1000, "entries": [
        {"rule": "smoke", "key": fingerprint,
         "limits": [{"window_secs": 3600, "max": 1000000, "burst": 1000000}],
         "admitted": admitted, "rejected": 0, "span_ms": 1000}]})
}

#[test]
fn three_az_topology() {
    let topo = Topology::start(TopologyOptions::new(CONFIG));
    let b = &topo.bring_up;
    eprintln!(
        "bring-up {:?}: network {:?}, Redis Cluster formed {:?}, companions ready {:?} later, \
         slowest Envoy {:?} (in parallel with Redis)",
        b.total, b.network, b.redis_cluster, b.companions, b.envoys
    );
    // The suite holds ~8 scenarios, each with its own topology, inside the CI budget.
    assert!(
        b.total < Duration::from_secs(20),
        "bring-up took {:?}",
        b.total
    );

    each_envoy_serves_through_the_filter_to_its_own_upstream(&topo);
    load_counts_are_exact_per_az(&topo);
    every_companion_syncs_keys_on_all_three_masters(&topo);
    each_envoy_reaches_its_own_companion(&topo);
    delayed_and_paused_companions_show_their_latency(&topo);
    redis_master_killed_replica_promoted(&topo);
    partitioned_az_loses_the_cluster_but_not_its_clients(&topo);

    let pids = topo.pids();
    assert_eq!(
        pids.len(),
        3 + 3 + 6,
        "every process ran until teardown: {pids:?}"
    );
    let left = topo.shutdown();
    assert!(left.is_empty(), "left after teardown: {left:#?}");
    for (name, pid) in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) still runs"
        );
    }
}

/// What a killed run leaves behind (a namespace with a process in it, the bridge) is
/// reported by the teardown check and removed by the cleanup every topology starts with.
#[test]
fn leftovers_of_a_killed_run_are_found_and_removed() {
    netns::require_root();
    let _lock = MachineLock::acquire();
    cleanup_leftovers();
    ip_ok(&["netns", "add", "az-b"]);
    ip_ok(&["link", "add", "mlbr0", "type", "bridge"]);
    let inode = std::fs::metadata(netns::netns_path("az-b")).unwrap().ino();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let mut child = process::spawn(cmd, Some(&Netns::open("az-b"))).expect("spawn sleep");
    let pid = child.id();
    assert_eq!(netns::netns_pids("az-b"), vec![pid as i32]);
    let tracked = [("sleep".to_owned(), pid)];
    let left = leftovers(&tracked, &[inode]);
    for want in ["namespace az-b", "link mlbr0", "process sleep"] {
        assert!(
            left.iter().any(|l| l.starts_with(want)),
            "{want} not in {left:?}"
        );
    }
    assert!(
        left.iter()
            .any(|l| l.contains("(sleep) in a topology namespace")),
        "{left:?}"
    );
    cleanup_leftovers();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    let left = leftovers(&tracked, &[inode]);
    assert!(left.is_empty(), "{left:?}");
}

fn each_envoy_serves_through_the_filter_to_its_own_upstream(topo: &Topology) {
    for az in Az::ALL {
        let before = hits(topo);
        let r = topo.envoy(az).send(&key("/api/hello", "smoke-first"));
        assert_eq!(r.status, 200, "{}: {}", az.name(), r.body_str());
        assert_eq!(r.json()["upstream"], "ok");
        // The filter decided it: a fresh client of a 50/h rule has 49 left.
        assert_eq!(r.header("x-ratelimit-limit"), Some("50"), "{}", az.name());
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some("49"),
            "{}",
            az.name()
        );
        let after = hits(topo);
        for other in Az::ALL {
            let want = before[other.index()] + u64::from(other == az);
            assert_eq!(
                after[other.index()],
                want,
                "a request to {}'s Envoy reached {}'s upstream",
                az.name(),
                other.name()
            );
        }
        let (status, body) = topo.envoy(az).admin("/ready");
        assert_eq!((status, body.trim()), (200, "LIVE"));
    }
}

/// Paced load at all three Envoys at once: with local limits each Envoy admits exactly
/// 50 of a fresh client's requests, whatever the interleaving.
fn load_counts_are_exact_per_az(topo: &Topology) {
    let loads = Az::ALL
        .map(|az| {
            topo.load(az, |i| key(&format!("/api/load/{i}"), "load-client"))
                .rate(300.0)
                .connections(4)
        })
        .to_vec();
    let reports = load::run(loads, Duration::from_secs(1));
    for (az, r) in Az::ALL.iter().zip(&reports) {
        eprintln!("load {}", r.summary());
        assert_eq!(
            r.sent,
            300,
            "{}: paced load sends rate x duration",
            az.name()
        );
        assert_eq!(r.errors, 0, "{}: {:?}", az.name(), r.first_error);
        assert_eq!(r.other_total(), 0, "{}", az.name());
        assert_eq!((r.ok, r.limited), (50, 250), "{}", az.name());
        let timeline_total: u64 = r.timeline.iter().map(|b| b.ok + b.limited + b.other).sum();
        assert_eq!(timeline_total, r.sent);
        assert!(r.latency(0.5) <= r.latency(0.99) && r.latency(0.99) <= r.latency(1.0));
        assert!(r.latency(0.5) > Duration::ZERO);
    }
}

/// Each companion writes to every master (keys are placed by slot) and they all share
/// one cluster: a count one companion writes is the count the next one reads.
fn every_companion_syncs_keys_on_all_three_masters(topo: &Topology) {
    for az in Az::ALL {
        let ready = topo.companion(az).readyz().expect("readyz");
        assert_eq!(ready.status, 200, "{}: {}", az.name(), ready.body_str());
        assert_eq!(ready.json()["ready"], true);
    }
    let redis = topo.redis();
    let masters: Vec<usize> = (0..3).collect();
    let dbsize = |m: usize| -> u64 {
        redis
            .cli(m, &["DBSIZE"])
            .expect("DBSIZE")
            .trim()
            .parse()
            .expect("a number")
    };
    // The proxy's first report also creates the liveness registry (one key on one
    // master): a heartbeat first, so each report below adds only its key's record.
    let r = topo
        .companion(Az::A)
        .sync(
            &json!({"proxy_id": "envoy-az-a", "zone": "az-a", "interval_ms": 1000,
                      "entries": []}),
        )
        .expect("heartbeat");
    assert_eq!(r.status, 200, "{}", r.body_str());
    // Fingerprints until every master got at least one key from companion az-a.
    let mut on_master: Vec<(String, usize)> = Vec::new();
    let mut covered = BTreeSet::new();
    for n in 0..64u64 {
        let fp = format!("{:016x}", 0x5eed_0000_0000_0000u64 + n * 0x9e37_79b9);
        let before: Vec<u64> = masters.iter().map(|&m| dbsize(m)).collect();
        let r = topo
            .companion(Az::A)
            .sync(&report("envoy-az-a", "az-a", &fp, 1))
            .expect("sync");
        assert_eq!(r.status, 200, "{}", r.body_str());
        let j = r.json();
        assert_eq!(j["degraded"], false, "{j}");
        assert_eq!(j["entries"][0]["used"], json!([1]), "{j}");
        let grew: Vec<usize> = masters
            .iter()
            .copied()
            .filter(|&m| dbsize(m) > before[m])
            .collect();
        assert_eq!(grew.len(), 1, "one key lands on one master: {grew:?}");
        covered.insert(grew[0]);
        on_master.push((fp, grew[0]));
        if covered.len() == 3 {
            break;
        }
    }
    assert_eq!(covered.len(), 3, "64 keys never reached every master");
    // One key per master: the other two companions add to it and read the sum.
    let mut seen = BTreeSet::new();
    for (fp, m) in on_master.iter().filter(|(_, m)| seen.insert(*m)) {
        for (k, az) in [Az::B, Az::C].into_iter().enumerate() {
            let proxy = format!("envoy-{}", az.name());
            let r = topo
                .companion(az)
                .sync(&report(&proxy, az.name(), fp, 10))
                .expect("sync");
            assert_eq!(r.status, 200, "{}", r.body_str());
            let j = r.json();
            assert_eq!(j["degraded"], false, "{j}");
            let want = 1 + 10 * (k as u64 + 1);
            assert_eq!(
                j["entries"][0]["used"],
                json!([want]),
                "{} reads the count of a key on master {m}: {j}",
                az.name()
            );
        }
    }
    // Without the token the companion refuses (the topology runs it as shipped).
    let r = topo
        .companion(Az::A)
        .client()
        .send(&Request::post("/v1/sync").body("{}"));
    assert_eq!(r.status, 401);
    eprintln!(
        "sync: keys on all three masters through every companion ({} keys tried)",
        on_master.len()
    );
}

/// Each Envoy's `meshlimit_service` cluster is its own AZ's companion: killing az-b's
/// companion breaks az-b's path only; a restart mends it.
fn each_envoy_reaches_its_own_companion(topo: &Topology) {
    for az in Az::ALL {
        let (status, _) = via_envoy_to_companion(topo, az, "/healthz");
        assert_eq!(status, 200, "{}", az.name());
    }
    topo.companion(Az::B).kill();
    assert!(!topo.companion(Az::B).is_running());
    for az in Az::ALL {
        let (status, _) = via_envoy_to_companion(topo, az, "/healthz");
        let want = if az == Az::B { 503 } else { 200 };
        assert_eq!(status, want, "{} with az-b's companion dead", az.name());
    }
    let t = Instant::now();
    topo.companion(Az::B).restart();
    let ready = topo
        .companion(Az::B)
        .wait_ready(Duration::from_secs(10))
        .unwrap();
    eprintln!(
        "companion az-b restarted: healthy after {:?}, ready {:?} after that",
        t.elapsed() - ready,
        ready
    );
    let (status, _) = via_envoy_to_companion(topo, Az::B, "/healthz");
    assert_eq!(status, 200);
}

fn delayed_and_paused_companions_show_their_latency(topo: &Topology) {
    // Delay: 150 ms each way between az-a's Envoy and its companion.
    let delay = Duration::from_millis(150);
    let (_, fast) = via_envoy_to_companion(topo, Az::A, "/healthz");
    topo.proxy(Az::A).set_delay(delay);
    // A new Envoy connection pays the delay too; time a few requests.
    let mut slow = Vec::new();
    for _ in 0..3 {
        let (status, took) = via_envoy_to_companion(topo, Az::A, "/healthz");
        assert_eq!(status, 200);
        slow.push(took);
    }
    let direct = {
        let t = Instant::now();
        assert_eq!(
            topo.companion(Az::A).try_get("/healthz").unwrap().status,
            200
        );
        t.elapsed()
    };
    topo.proxy(Az::A).set_delay(Duration::ZERO);
    let (_, fast_again) = via_envoy_to_companion(topo, Az::A, "/healthz");
    eprintln!(
        "delay proxy at {delay:?} each way: Envoy->companion {fast:?} before, {slow:?} delayed, \
         {fast_again:?} after; test->companion directly {direct:?}"
    );
    for took in &slow {
        assert!(*took >= 2 * delay, "{took:?} < 2 x {delay:?}");
        assert!(*took < 2 * delay + Duration::from_millis(250), "{took:?}");
    }
    assert!(
        direct < Duration::from_millis(100),
        "the delay is the proxy's: {direct:?}"
    );
    assert!(fast_again < Duration::from_millis(100), "{fast_again:?}");
    assert!(topo.proxy(Az::A).accepted() > 0);

    // SIGSTOP: a request through az-c's Envoy waits until SIGCONT, then completes.
    let pause = Duration::from_millis(800);
    topo.companion(Az::C).pause();
    let (status, took, answered, resumed) = std::thread::scope(|s| {
        let req = s.spawn(|| {
            let (status, took) = via_envoy_to_companion(topo, Az::C, "/healthz");
            (status, took, Instant::now())
        });
        std::thread::sleep(pause);
        assert!(!req.is_finished(), "a paused companion answered");
        // The other AZs do not notice.
        let (status, took) = via_envoy_to_companion(topo, Az::A, "/healthz");
        assert_eq!(status, 200);
        assert!(took < Duration::from_millis(100), "{took:?}");
        let resumed = Instant::now();
        topo.companion(Az::C).resume();
        let (status, took, answered) = req.join().unwrap();
        (status, took, answered, resumed)
    });
    eprintln!(
        "companion az-c SIGSTOPped for {pause:?}: the request through Envoy took {took:?}, \
         answered {:?} after SIGCONT",
        answered - resumed
    );
    assert_eq!(status, 200);
    assert!(answered >= resumed, "answered while stopped");
    assert!(
        answered - resumed < Duration::from_millis(300),
        "{:?}",
        answered - resumed
    );
    assert!(took > pause - Duration::from_millis(100), "{took:?}");
}

fn redis_master_killed_replica_promoted(topo: &Topology) {
    let redis = topo.redis();
    let killed = topo.kill_redis_master(Az::A);
    assert_eq!(redis.nodes[killed.node].spec.netns, "az-a");
    assert_eq!(killed.replicas.len(), 1, "{killed:?}");
    let replica = killed.replicas[0];
    assert_eq!(
        redis.nodes[replica].spec.netns, "az-b",
        "az-a's master has its replica in az-b"
    );
    let failover = topo
        .wait_redis_failover(&killed, Duration::from_secs(20))
        .unwrap();
    assert_eq!(failover.promoted, replica);
    let ready = topo.wait_companions_ready(Duration::from_secs(20)).unwrap();
    eprintln!(
        "Redis master az-a killed: replica {} promoted after {:?}, cluster ok after {:?}, \
         every companion ready {:?} later",
        redis.nodes[replica].spec.name, failover.promoted_after, failover.cluster_ok_after, ready
    );
    // Every companion still writes to every slot range (the promoted master included).
    for az in Az::ALL {
        let fp = format!("{:016x}", 0xfa11_0000u64 + az.index() as u64);
        let r = topo
            .companion(az)
            .sync(&report("envoy-failover", az.name(), &fp, 1))
            .unwrap();
        assert_eq!(r.json()["degraded"], false, "{}", r.body_str());
    }
    // The old master comes back as a replica of its successor.
    redis.restart(killed.node).unwrap();
    redis.wait_ok(Duration::from_secs(20)).unwrap();
    let promoted_id = redis.node_id(replica).unwrap();
    let view = redis.view_from(killed.node).unwrap();
    let old = view
        .iter()
        .find(|v| v.addr == redis.nodes[killed.node].addr())
        .unwrap();
    assert!(!old.master, "{old:?}");
    assert_eq!(old.master_id.as_deref(), Some(promoted_id.as_str()));
    let promoted = view
        .iter()
        .find(|v| v.addr == redis.nodes[replica].addr())
        .unwrap();
    assert!(
        promoted.master && !promoted.slots.is_empty(),
        "{promoted:?}"
    );
    assert_eq!(redis.master_in("az-a"), None, "az-a holds no master now");
}

/// az-c cut off: its companion loses the cluster while the test still reaches az-c;
/// the other two AZs promote az-c's master's replica (in az-a) and carry on; after the
/// heal az-c's old master follows its successor and every companion is ready again.
fn partitioned_az_loses_the_cluster_but_not_its_clients(topo: &Topology) {
    topo.wait_companions_ready(Duration::from_secs(20)).unwrap();
    let redis = topo.redis();
    let lost = topo
        .partition_with_master(Az::C)
        .expect("az-c holds a master");
    let degraded = topo
        .companion(Az::C)
        .wait_not_ready(Duration::from_secs(10))
        .unwrap();
    let r = topo.companion(Az::C).readyz().unwrap();
    assert_eq!(r.status, 503, "{}", r.body_str());
    assert_eq!(r.json()["ready"], false);
    // The test still reaches az-c: its Envoy (through the filter), admin and companion.
    let r = topo
        .envoy(Az::C)
        .send(&key("/api/partitioned", "smoke-partition"));
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(topo.envoy(Az::C).admin("/ready").0, 200);
    assert_eq!(
        topo.companion(Az::C).try_get("/healthz").unwrap().status,
        200
    );
    let (status, _) = via_envoy_to_companion(topo, Az::C, "/healthz");
    assert_eq!(status, 200);

    let failover = topo
        .wait_majority_failover(Az::C, &lost, Duration::from_secs(20))
        .unwrap();
    assert_eq!(
        redis.nodes[failover.promoted].spec.netns, "az-a",
        "az-c's master has its replica in az-a"
    );
    let majority_ready = Instant::now();
    for az in [Az::A, Az::B] {
        topo.companion(az)
            .wait_ready(Duration::from_secs(20))
            .unwrap();
    }
    let majority_ready = majority_ready.elapsed();
    assert!(
        !topo.companion(Az::C).is_ready(),
        "az-c's companion is ready while cut off"
    );
    eprintln!(
        "az-c partitioned: its companion not ready after {degraded:?}; the others promoted {} \
         after {:?} (agreed after {:?}), companions az-a and az-b ready {majority_ready:?} later",
        redis.nodes[failover.promoted].spec.name,
        failover.promoted_after,
        failover.cluster_ok_after
    );

    topo.heal(Az::C);
    let healed = Instant::now();
    redis.wait_ok(Duration::from_secs(30)).unwrap();
    let cluster_ok = healed.elapsed();
    topo.wait_companions_ready(Duration::from_secs(30)).unwrap();
    eprintln!(
        "az-c healed after a {:?} cut: cluster ok {cluster_ok:?} later, every companion ready {:?} after the heal",
        healed - lost.at,
        healed.elapsed()
    );
    let promoted_id = redis.node_id(failover.promoted).unwrap();
    let view = redis.view_from(lost.node).unwrap();
    let old = view
        .iter()
        .find(|v| v.addr == redis.nodes[lost.node].addr())
        .unwrap();
    assert!(
        !old.master,
        "az-c's old master rejoined as a replica: {old:?}"
    );
    assert_eq!(old.master_id.as_deref(), Some(promoted_id.as_str()));
    let r = topo
        .companion(Az::C)
        .sync(&report("envoy-az-c", "az-c", "00000000000c0c0c", 1))
        .unwrap();
    assert_eq!(r.json()["degraded"], false, "{}", r.body_str());
}
