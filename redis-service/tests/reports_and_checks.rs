//! Checks while the largest reports run, against one real Redis node and a real Redis
//! Cluster: every check must still be answered by the store within its deadline.
//!
//! In a file of their own, and one at a time: the tests of one file run in parallel,
//! and other tests' Redis processes and traffic on the same 2 cores would be load this
//! test did not make (the other files run before or after it, never during).

mod support;
use support::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_not_starved_by_large_reports() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let redis = RedisNode::start(false);
    // The default deadlines: 50 ms per check, 1 s per report.
    let s = Service::start(&["--redis-url", &redis.url()]);
    check(&s.client, &uniq("warm"), "many", 1).await;
    // Reports of 10 000 entries (the most a report may carry), one a second (each proxy
    // reports once a second), for 8 s, with two checks in flight all along.
    let u = checks_under_reports(&s.client, 1.0, 8.0, 2).await;
    println!("one Redis node: {u:?}");
    assert_checks_unharmed(&u);
}

// A debug build cannot make this load on 2 cores with 3 Redis processes (its JSON work
// alone takes longer than a report's deadline): `cargo test --release` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    debug_assertions,
    ignore = "needs a release build: cargo test --release"
)]
async fn checks_are_not_starved_by_large_reports_on_a_cluster() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start();
    let s = Service::start(&["--redis-cluster", &cluster.seeds()]);
    check(&s.client, &uniq("warm"), "many", 1).await;
    // As on one node: 10 000-entry reports (over every master) once a second, checks
    // all along, the default deadlines.
    let u = checks_under_reports(&s.client, 1.0, 8.0, 2).await;
    println!("Redis Cluster: {u:?}");
    assert_checks_unharmed(&u);
}
