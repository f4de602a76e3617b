//! Three availability zones on one machine, for the global-limit scenarios: network
//! namespaces `az-a`, `az-b`, `az-c`, each with an Envoy running the filter, a
//! companion, and a local upstream; one Redis Cluster of three masters and three
//! replicas spread over the three (one master and another master's replica in each);
//! inter-AZ traffic over a bridge that a partition cuts, and a separate point-to-point
//! link per AZ from the test process, so the test still reaches every Envoy, admin and
//! companion while an AZ is cut off.
//!
//! ```text
//!                       root namespace: the test process (load, admin, controls)
//!           10.77.1.1 mlcl-a           10.77.2.1 mlcl-b      10.77.3.1 mlcl-c
//!                   | client links, never cut  |                     |
//!   +---------------+------+  +----------------+-----+  +------------+---------+
//!   | az-a       10.77.1.2 |  | az-b       10.77.2.2 |  | az-c       10.77.3.2 |
//!   |  Envoy :10000 (admin |  |  Envoy :10000 (admin |  |  Envoy :10000 (admin |
//!   |    :9901) -> upstream|  |    :9901) -> upstream|  |    :9901) -> upstream|
//!   |  meshlimit_service = |  |  meshlimit_service = |  |  meshlimit_service = |
//!   |   delay proxy :8180  |  |   delay proxy :8180  |  |   delay proxy :8180  |
//!   |   -> companion :8080 |  |   -> companion :8080 |  |   -> companion :8080 |
//!   |  redis master A :7000|  |  redis master B :7000|  |  redis master C :7000|
//!   |  replica of C   :7001|  |  replica of A   :7001|  |  replica of B   :7001|
//!   |            10.77.0.1 |  |            10.77.0.2 |  |            10.77.0.3 |
//!   +-----------+----------+  +-----------+----------+  +-----------+----------+
//!               | mlaz-a                  | mlaz-b                  | mlaz-c
//!               +-------------------------+-------------------------+
//!            mlbr0: the inter-AZ bridge (Redis; companions to Redis)
//! ```
//!
//! Envoy's `meshlimit_service` cluster is its own AZ's companion, through the delaying
//! proxy (zero delay until a test sets one) unless [`TopologyOptions::direct_companion`].
//! The namespaces have no route out of the machine.
//!
//! ```no_run
//! use std::time::Duration;
//! use meshlimit_e2e::topology::{Az, Topology, TopologyOptions};
//! use meshlimit_e2e::{load, Request};
//!
//! let topo = Topology::start(TopologyOptions::new(
//!     r#"{"rules":[{"id":"api","match":{"path":"/api/*"},"limits":[{"window":"1s","max":100}]}]}"#,
//! ));
//! let loads = Az::ALL.map(|az| {
//!     topo.load(az, |_| Request::get("/api/x").header("x-api-key", "hot"))
//!         .rate(300.0)
//!         .connections(4)
//! });
//! let run = load::LoadRun::start(loads.to_vec(), Duration::from_secs(10));
//! std::thread::sleep(Duration::from_secs(3));
//! topo.partition(Az::C);
//! std::thread::sleep(Duration::from_secs(3));
//! topo.heal(Az::C);
//! for report in run.join() {
//!     println!("{}", report.summary());
//! }
//! assert!(topo.shutdown().is_empty());
//! ```

use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::companion::{Companion, CompanionSpec};
use crate::delay_proxy::DelayProxy;
use crate::envoy::{Envoy, EnvoyOptions};
use crate::load::Load;
use crate::netns::{self, ip_ok, Netns};
use crate::redis_cluster::{ClusterOptions, Failover, LostMaster, NodeSpec, RedisCluster};
use crate::upstream::Upstream;
use crate::Request;

mod network;

use network::AzNetwork;
pub use network::{cleanup_leftovers, leftovers, MachineLock};

pub const ENVOY_PORT: u16 = 10000;
pub const ENVOY_ADMIN_PORT: u16 = 9901;
pub const COMPANION_PORT: u16 = 8080;
pub const COMPANION_PROXY_PORT: u16 = 8180;
pub const REDIS_MASTER_PORT: u16 = 7000;
pub const REDIS_REPLICA_PORT: u16 = 7001;
/// Redis `cluster-node-timeout`: a master's replica is promoted about twice this after
/// the master is lost (README, "Three AZs on one machine").
const REDIS_NODE_TIMEOUT_MS: u64 = 1000;
/// The Envoy cluster of the AZ's companion, for the filter's `service.cluster`.
pub const SERVICE_CLUSTER: &str = "meshlimit_service";
/// The VM environment variable holding the companion's bearer token, for the filter's
/// `service` block (Istio passes tokens to plugins the same way, `vmConfig.env`).
pub const TOKEN_ENV: &str = "MESHLIMIT_SERVICE_TOKEN";
/// A test-only route on every Envoy to its companion (`/__companion/healthz` is the
/// companion's `/healthz`), to prove and time the Envoy → companion path.
pub const COMPANION_ROUTE: &str = "/__companion/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Az {
    A,
    B,
    C,
}

impl Az {
    pub const ALL: [Az; 3] = [Az::A, Az::B, Az::C];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The namespace name, also Envoy's `node.locality.zone`: `az-a`.
    pub fn name(self) -> &'static str {
        ["az-a", "az-b", "az-c"][self.index()]
    }

    fn letter(self) -> char {
        ['a', 'b', 'c'][self.index()]
    }

    fn number(self) -> u8 {
        self.index() as u8 + 1
    }

    /// Its address on the inter-AZ bridge (Redis, companion to companion).
    pub fn bridge_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, self.number())
    }

    /// Its end of the client link: Envoy's listener and admin, reachable from the test.
    pub fn client_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.number(), 2)
    }

    /// The test process's end of the client link.
    pub fn host_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.number(), 1)
    }

    /// Root-side end of the inter-AZ link (a bridge port): what a partition takes down.
    pub fn az_link(self) -> String {
        format!("mlaz-{}", self.letter())
    }

    /// Root-side end of the client link.
    pub fn client_link(self) -> String {
        format!("mlcl-{}", self.letter())
    }

    /// The AZ whose master this AZ's replica follows (each AZ holds one master and the
    /// previous AZ's replica, so losing one AZ loses one master and one replica, never a
    /// master together with its replica).
    pub fn replicates(self) -> Az {
        Az::ALL[(self.index() + 2) % 3]
    }
}

/// What to bring up.
#[derive(Clone)]
pub struct TopologyOptions {
    /// The filter's plugin configuration (JSON) for every Envoy.
    pub plugin_config: String,
    /// Envoy reaches its companion through a [`DelayProxy`] (zero delay until set).
    pub via_delay_proxy: bool,
}

impl TopologyOptions {
    pub fn new(plugin_config: &str) -> TopologyOptions {
        TopologyOptions {
            plugin_config: plugin_config.to_owned(),
            via_delay_proxy: true,
        }
    }

    /// Envoy talks to its companion directly (no delaying proxy in between).
    pub fn direct_companion(mut self) -> Self {
        self.via_delay_proxy = false;
        self
    }
}

/// One AZ's processes. Dropped in field order: the proxy first, the upstream last.
pub struct Zone {
    pub az: Az,
    pub proxy: Option<DelayProxy>,
    pub envoy: Envoy,
    pub companion: Companion,
    pub upstream: Upstream,
}

/// How long each part of the bring-up took.
#[derive(Clone, Debug, Default)]
pub struct BringUp {
    pub network: Duration,
    /// From the network being up to every Redis node in the formed cluster.
    pub redis_cluster: Duration,
    /// From the cluster being formed to every companion answering `/readyz` 200.
    pub companions: Duration,
    /// Slowest Envoy, from the network being up to ready (in parallel with Redis).
    pub envoys: Duration,
    pub total: Duration,
}

/// The running topology. Everything is torn down on Drop (processes, links,
/// namespaces); when the test is panicking the logs of every process are printed first
/// and the directory holding them is kept.
pub struct Topology {
    zones: Vec<Zone>,
    redis: RedisCluster,
    /// The companions' bearer token.
    pub token: String,
    pub bring_up: BringUp,
    base: Base,
}

impl Topology {
    /// Builds the whole topology; panics with the logs of every process when a part does
    /// not come up. Needs root.
    pub fn start(opts: TopologyOptions) -> Topology {
        netns::require_root();
        let t0 = Instant::now();
        let base = Base::new();
        let network = t0.elapsed();
        let token = random_hex(16);
        let redis_password = random_hex(16);
        let t_net = Instant::now();
        // The Envoys (V8 compiling the filter is the slowest part of the bring-up) start
        // while Redis forms its cluster and the companions start on it.
        let (envoys, redis, companions, redis_cluster, companions_time) = std::thread::scope(|s| {
            let envoys = Az::ALL.map(|az| {
                let (opts, base, token) = (&opts, &base, &token);
                s.spawn(move || {
                    let (upstream, envoy) = start_envoy(az, opts, token, base);
                    (upstream, envoy, t_net.elapsed())
                })
            });
            let redis = start_redis(&redis_password, &base);
            let redis_cluster = t_net.elapsed();
            let t_companions = Instant::now();
            let companions = Az::ALL
                .map(|az| {
                    let spec = companion_spec(az, &token, &redis, &redis_password, &base);
                    base.register_log(&spec.name, &spec.dir.join("companion.log"));
                    s.spawn(move || Companion::start(spec))
                })
                .map(|h| h.join().expect("companion start panicked"));
            for c in &companions {
                c.wait_ready(Duration::from_secs(20))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            let companions_time = t_companions.elapsed();
            let envoys = envoys.map(|h| h.join().expect("Envoy start panicked"));
            (envoys, redis, companions, redis_cluster, companions_time)
        });
        let envoys_time = envoys.iter().map(|e| e.2).max().unwrap_or_default();
        let zones: Vec<Zone> = Az::ALL
            .into_iter()
            .zip(companions)
            .zip(envoys)
            .map(|((az, companion), (upstream, envoy, _))| Zone {
                az,
                proxy: opts.via_delay_proxy.then(|| start_delay_proxy(az)),
                envoy,
                companion,
                upstream,
            })
            .collect();
        let bring_up = BringUp {
            network,
            redis_cluster,
            companions: companions_time,
            envoys: envoys_time,
            total: t0.elapsed(),
        };
        Topology {
            zones,
            redis,
            token,
            bring_up,
            base,
        }
    }

    pub fn zone(&self, az: Az) -> &Zone {
        &self.zones[az.index()]
    }

    pub fn envoy(&self, az: Az) -> &Envoy {
        &self.zone(az).envoy
    }

    pub fn companion(&self, az: Az) -> &Companion {
        &self.zone(az).companion
    }

    pub fn upstream(&self, az: Az) -> &Upstream {
        &self.zone(az).upstream
    }

    /// The delaying proxy between the AZ's Envoy and its companion.
    pub fn proxy(&self, az: Az) -> &DelayProxy {
        self.zone(az)
            .proxy
            .as_ref()
            .expect("started with direct_companion(): no delay proxy")
    }

    pub fn redis(&self) -> &RedisCluster {
        &self.redis
    }

    /// Where the topology keeps configs and logs.
    pub fn dir(&self) -> &Path {
        &self.base.dir
    }

    /// Cuts the AZ off the inter-AZ bridge: its packets to the other AZs are dropped
    /// silently (like a real partition: connects and requests time out, nothing is
    /// refused). Its client link stays up.
    pub fn partition(&self, az: Az) {
        ip_ok(&["link", "set", &az.az_link(), "down"]);
    }

    /// Undoes [`Topology::partition`].
    pub fn heal(&self, az: Az) {
        ip_ok(&["link", "set", &az.az_link(), "up"]);
    }

    /// SIGKILLs the Redis master currently in `az`.
    pub fn kill_redis_master(&self, az: Az) -> LostMaster {
        self.redis.kill_master_in(az.name())
    }

    /// Waits until a replica took over from a killed master and the cluster is whole.
    pub fn wait_redis_failover(
        &self,
        killed: &LostMaster,
        timeout: Duration,
    ) -> Result<Failover, String> {
        self.redis.wait_failover(killed, timeout)
    }

    /// Partitions `az` and records the Redis master it held (if any) as lost, so that
    /// [`Topology::wait_majority_failover`] can time its replacement.
    pub fn partition_with_master(&self, az: Az) -> Option<LostMaster> {
        let lost = self
            .redis
            .master_in(az.name())
            .map(|m| self.redis.losing_master(m));
        self.partition(az);
        lost
    }

    /// Waits until the nodes outside `cut` promoted a replica of `lost` (cut off with
    /// `cut`) and agree on it.
    pub fn wait_majority_failover(
        &self,
        cut: Az,
        lost: &LostMaster,
        timeout: Duration,
    ) -> Result<Failover, String> {
        let judges: Vec<usize> = (0..self.redis.nodes.len())
            .filter(|&i| self.redis.nodes[i].spec.netns != cut.name())
            .collect();
        self.redis.wait_failover_seen_by(lost, &judges, timeout)
    }

    /// Waits until every companion answers `/readyz` 200; returns how long it took.
    pub fn wait_companions_ready(&self, timeout: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        for az in Az::ALL {
            self.companion(az)
                .wait_ready(timeout.saturating_sub(t.elapsed()))?;
        }
        Ok(t.elapsed())
    }

    /// Load on the AZ's Envoy (one connection, unpaced: set rate and connections).
    pub fn load(&self, az: Az, request: impl Fn(u64) -> Request + Send + Sync + 'static) -> Load {
        Load::new(az.name(), self.envoy(az).addr(), request)
    }

    /// (name, pid) of every process the topology runs.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut v = Vec::new();
        for z in &self.zones {
            if let Some(p) = z.envoy.pid() {
                v.push((format!("envoy {}", z.az.name()), p));
            }
            if let Some(p) = z.companion.pid() {
                v.push((z.companion.spec.name.clone(), p));
            }
        }
        for n in &self.redis.nodes {
            if let Some(p) = n.pid() {
                v.push((format!("redis {}", n.spec.name), p));
            }
        }
        v
    }

    /// Prints the last `lines` lines of every process's log to stderr.
    pub fn print_logs(&self, lines: usize) {
        self.base.print_logs(lines);
    }

    /// Tears everything down and reports what is left, if anything: namespaces, links,
    /// the topology's processes, and any process or thread still inside one of its
    /// namespaces. Empty means clean.
    pub fn shutdown(self) -> Vec<String> {
        let pids = self.pids();
        let inodes = self.base.netns_inodes.clone();
        drop(self);
        // Threads of the delaying proxies end as their sockets close; give them a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let left = leftovers(&pids, &inodes);
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The AZ's upstream (inside its namespace) and its Envoy in front of it.
fn start_envoy(az: Az, opts: &TopologyOptions, token: &str, base: &Base) -> (Upstream, Envoy) {
    let upstream = Upstream::start_in(&Netns::open(az.name()));
    let envoy_opts = envoy_options(az, opts, &upstream, token, base);
    let dir = envoy_opts.dir.clone().expect("an envoy dir");
    base.register_log(&format!("envoy {}", az.name()), &dir.join("envoy.log"));
    let envoy = Envoy::try_start_with(envoy_opts)
        .unwrap_or_else(|log| panic!("Envoy in {} did not become ready:\n{log}", az.name()));
    (upstream, envoy)
}

fn start_redis(password: &str, base: &Base) -> RedisCluster {
    let specs = redis_specs();
    for spec in &specs {
        let log = base
            .dir
            .join(format!("redis-{}", spec.name))
            .join("redis.log");
        base.register_log(&format!("redis {}", spec.name), &log);
    }
    let cluster = ClusterOptions {
        password: password.to_owned(),
        node_timeout_ms: REDIS_NODE_TIMEOUT_MS,
    };
    RedisCluster::start(specs, cluster, &base.dir)
        .unwrap_or_else(|e| panic!("Redis Cluster did not form: {e}"))
}

/// Listens on every address of the AZ (Envoy uses the loopback, the test the client
/// link) and forwards to the companion.
fn start_delay_proxy(az: Az) -> DelayProxy {
    DelayProxy::start(
        Some(&Netns::open(az.name())),
        SocketAddr::from(([0, 0, 0, 0], COMPANION_PROXY_PORT)),
        SocketAddr::from(([127, 0, 0, 1], COMPANION_PORT)),
    )
}

fn envoy_options(
    az: Az,
    opts: &TopologyOptions,
    upstream: &Upstream,
    token: &str,
    base: &Base,
) -> EnvoyOptions {
    let config = &opts.plugin_config;
    let service_port = if opts.via_delay_proxy {
        COMPANION_PROXY_PORT
    } else {
        COMPANION_PORT
    };
    let token = token.to_owned();
    EnvoyOptions::new(config)
        .concurrency(2)
        .upstream(upstream)
        .listen(az.client_ip(), ENVOY_PORT, ENVOY_ADMIN_PORT)
        .netns(az.name())
        .dir(base.dir.join(format!("envoy-{}", az.name())))
        .cluster(SERVICE_CLUSTER, service_port)
        .tweak(move |b| {
            b["node"] = json!({
                "id": format!("envoy-{}", az.name()),
                "cluster": "meshlimit-e2e",
                "locality": {"zone": az.name()},
            });
            let hcm = &mut b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
                ["typed_config"];
            if let Some(filters) = hcm["http_filters"].as_array_mut() {
                for f in filters
                    .iter_mut()
                    .filter(|f| f["name"] == "envoy.filters.http.wasm")
                {
                    f["typed_config"]["config"]["vm_config"]["environment_variables"] =
                        json!({"key_values": {TOKEN_ENV: token}});
                }
            }
            let route = json!({
                "match": {"prefix": COMPANION_ROUTE},
                "route": {"cluster": SERVICE_CLUSTER, "prefix_rewrite": "/", "timeout": "10s"},
            });
            if let Some(routes) = hcm["route_config"]["virtual_hosts"][0]["routes"].as_array_mut() {
                routes.insert(0, route);
            }
        })
}

/// Masters 0..3 in az-a, az-b, az-c; then one replica per AZ, of the previous AZ's master.
fn redis_specs() -> Vec<NodeSpec> {
    let mut specs: Vec<NodeSpec> = Az::ALL
        .iter()
        .map(|az| NodeSpec {
            name: format!("{}-master", az.name()),
            netns: az.name().to_owned(),
            ip: az.bridge_ip(),
            port: REDIS_MASTER_PORT,
            replica_of: None,
        })
        .collect();
    for az in Az::ALL {
        specs.push(NodeSpec {
            name: format!("{}-replica-of-{}", az.name(), az.replicates().name()),
            netns: az.name().to_owned(),
            ip: az.bridge_ip(),
            port: REDIS_REPLICA_PORT,
            replica_of: Some(az.replicates().index()),
        });
    }
    specs
}

fn companion_spec(
    az: Az,
    token: &str,
    redis: &RedisCluster,
    redis_password: &str,
    base: &Base,
) -> CompanionSpec {
    CompanionSpec {
        name: format!("companion {}", az.name()),
        netns: Some(az.name().to_owned()),
        port: COMPANION_PORT,
        reach: SocketAddr::from((az.client_ip(), COMPANION_PORT)),
        token: token.to_owned(),
        redis_seeds: redis.seeds(),
        redis_password: redis_password.to_owned(),
        dir: base.dir.join(format!("companion-{}", az.name())),
    }
}

/// The parts that outlive everything else: the lock, the network, the log directory.
/// Built first, dropped last (so a failed bring-up still prints logs and cleans up).
struct Base {
    dir: PathBuf,
    logs: Mutex<Vec<(String, PathBuf)>>,
    netns_inodes: Vec<u64>,
    net: Option<AzNetwork>,
    _lock: MachineLock,
}

impl Base {
    fn new() -> Base {
        let lock = MachineLock::acquire();
        cleanup_leftovers();
        let dir = std::env::temp_dir().join(format!("meshlimit-three-az-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create topology dir");
        let net = AzNetwork::create();
        let netns_inodes = Az::ALL
            .iter()
            .map(|az| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(netns::netns_path(az.name()))
                    .expect("namespace exists")
                    .ino()
            })
            .collect();
        Base {
            dir,
            logs: Mutex::new(Vec::new()),
            netns_inodes,
            net: Some(net),
            _lock: lock,
        }
    }

    fn register_log(&self, name: &str, path: &Path) {
        self.logs
            .lock()
            .unwrap()
            .push((name.to_owned(), path.to_owned()));
    }

    fn print_logs(&self, lines: usize) {
        for (name, path) in self.logs.lock().unwrap().iter() {
            eprintln!(
                "----- {name}: last {lines} lines of {} -----\n{}",
                path.display(),
                crate::process::tail(path, lines)
            );
        }
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        // Processes are gone by now (Topology's other fields drop first).
        if std::thread::panicking() {
            self.print_logs(60);
            eprintln!("three-AZ logs and configs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if let Some(net) = self.net.take() {
            net.teardown();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
