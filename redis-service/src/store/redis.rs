//! Redis (one node) and Redis Cluster.
//!
//! Every operation is one Lua script (`lua/*.lua`, loaded with `SCRIPT LOAD` and run
//! with `EVALSHA`) over keys that share one hash tag, so it is atomic and touches one
//! slot. A batch is split by node: one pipeline per node, sent concurrently, so a batch
//! costs one round trip per node. For that the cluster backend keeps its own slot map
//! (from `CLUSTER SLOTS`) and one multiplexed connection per master; items that come back
//! with `MOVED`/`ASK`/`TRYAGAIN`/`CLUSTERDOWN`/`NOSCRIPT` or from a broken connection are
//! retried one by one through the `redis` crate's cluster client (which follows
//! redirections) while the slot map is refreshed in the background.
//!
//! Checks and reports (`/v1/sync`) never share a connection: each node has a connection
//! for checks (and the short commands: pings, slot maps, reconciliation) and one for
//! reports. A connection is one ordered
//! stream, so a check sent behind a 10 000-entry report on the same connection waits for
//! the whole report; on its own connection it waits at most for the one script call
//! Redis is running when it arrives (Redis serves its clients in turn, a read's worth of
//! commands each), which `SYNC_CHUNK` keeps short. The report connections are created on
//! the reports' runtime (`RedisOptions::report_runtime`), so that their I/O is driven
//! there too, away from the workers that answer checks.

use super::{CheckOp, CheckOutcome, ItemResult, Store, StoreError, SyncOp, SyncOutcome};
use crate::config::Algorithm;
use crate::keys::{slot, KeyMaker};
use crate::shares::ShareParams;
use async_trait::async_trait;
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    Pipeline, Value,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SLIDING_WINDOW_LUA: &str = include_str!("../../lua/sliding_window.lua");
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../lua/token_bucket.lua");
pub const SYNC_LUA: &str = include_str!("../../lua/sync.lua");

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lua {
    SlidingWindow,
    TokenBucket,
    Sync,
}

impl Lua {
    fn src(self) -> &'static str {
        match self {
            Lua::SlidingWindow => SLIDING_WINDOW_LUA,
            Lua::TokenBucket => TOKEN_BUCKET_LUA,
            Lua::Sync => SYNC_LUA,
        }
    }
    fn sha(self) -> &'static str {
        use std::sync::OnceLock;
        static SHAS: OnceLock<[String; 3]> = OnceLock::new();
        let s = SHAS.get_or_init(|| {
            [
                redis::Script::new(SLIDING_WINDOW_LUA)
                    .get_hash()
                    .to_string(),
                redis::Script::new(TOKEN_BUCKET_LUA).get_hash().to_string(),
                redis::Script::new(SYNC_LUA).get_hash().to_string(),
            ]
        });
        &s[self as usize]
    }
    const ALL: [Lua; 3] = [Lua::SlidingWindow, Lua::TokenBucket, Lua::Sync];
}

/// Most sync entries per script call: bounds how long one call holds Redis' single
/// thread, which is how long a check arriving meanwhile on its own connection can wait.
/// Measured (`INFO commandstats` after 10 000-entry reports, release build, Redis 7.0,
/// this 2-core machine under other load): 32 entries per call took 0.48–0.56 ms a call
/// (15–18 µs an entry), 256 took 5.7–7.4 ms (22–29 µs an entry: larger calls are slower
/// per entry too). More calls cost no more round trips (one pipeline per node either way).
pub const SYNC_CHUNK: usize = 32;
/// `lua/sync.lua`: leading ARGV shared by all entries, then ARGV per entry.
const SYNC_COMMON_ARGS: usize = 5;
const SYNC_ENTRY_ARGS: usize = 5;

/// One script call, ready to be sent as `EVALSHA` (or `EVAL` on the retry path).
struct Call {
    lua: Lua,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Sync entries carried (their keys are in `args`); 0 for the check scripts.
    entries: usize,
}

impl Call {
    /// A multi-entry sync call as one call per entry (for the cluster client's retry
    /// path, which routes one slot per command).
    fn split(&self) -> Vec<Call> {
        (0..self.entries)
            .map(|e| {
                let at = SYNC_COMMON_ARGS + e * SYNC_ENTRY_ARGS;
                let mut args = self.args[..SYNC_COMMON_ARGS].to_vec();
                args.extend_from_slice(&self.args[at..at + SYNC_ENTRY_ARGS]);
                Call {
                    lua: self.lua,
                    keys: vec![String::from_utf8_lossy(&self.args[at]).to_string()],
                    args,
                    entries: 1,
                }
            })
            .collect()
    }

    fn slot(&self) -> u16 {
        slot(&self.keys[0])
    }
    fn cmd(&self, by_sha: bool) -> Cmd {
        let mut c = if by_sha {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.lua.sha());
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(self.lua.src());
            c
        };
        c.arg(self.keys.len()).arg(&self.keys);
        for a in &self.args {
            c.arg(&a[..]);
        }
        c
    }
}

#[derive(Clone)]
pub struct RedisOptions {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_insecure: bool,
    /// PEM of the CA that signed the Redis servers' certificates (private CAs); without
    /// it `rediss://` trusts the usual web PKI roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on one connect / one response at the connection level (the caller also
    /// applies its own, shorter, request deadline).
    pub io_timeout: Duration,
    /// Runtime the report connections are created on, so their I/O
    /// is driven there; `None`: the caller's.
    pub report_runtime: Option<tokio::runtime::Handle>,
    /// Sync entries per script call ([`SYNC_CHUNK`] unless measuring).
    pub sync_chunk: usize,
}

/// Which connection a batch travels on (see the module comment).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lane {
    Check,
    Reports,
}

/// Runs `f` on `rt` (where the connections it creates will be driven) or in place.
async fn on_runtime<F>(rt: &Option<tokio::runtime::Handle>, f: F) -> Result<F::Output, StoreError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match rt {
        Some(h) => h
            .spawn(f)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connect task: {e}"))),
        None => Ok(f.await),
    }
}

pub struct RedisStore {
    keys: KeyMaker,
    backend: Backend,
    round_trips: AtomicU64,
}

enum Backend {
    Single(Single),
    Cluster(Cluster),
}

struct Single {
    info: ConnectionInfo,
    opts: RedisOptions,
    /// Created lazily so the service starts (degraded) while Redis is down.
    conn: tokio::sync::RwLock<Option<ConnectionManager>>,
    reports: tokio::sync::RwLock<Option<ConnectionManager>>,
}

#[derive(Clone)]
struct Node {
    addr: (String, u16),
    conn: MultiplexedConnection,
    reports: MultiplexedConnection,
}

impl Node {
    fn lane(&self, lane: Lane) -> MultiplexedConnection {
        match lane {
            Lane::Check => self.conn.clone(),
            Lane::Reports => self.reports.clone(),
        }
    }
}

#[derive(Default)]
struct Topology {
    /// Slot -> index into `nodes`; `u16::MAX` when no master serves it.
    slots: Vec<u16>,
    nodes: Vec<Node>,
}

struct Cluster {
    seeds: Vec<ConnectionInfo>,
    opts: RedisOptions,
    conn: tokio::sync::RwLock<Option<ClusterConnection>>,
    topo: RwLock<Arc<Topology>>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
}

fn conn_info(url: &str, o: &RedisOptions) -> Result<ConnectionInfo, String> {
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("bad Redis URL: {e}"))?;
    if let Some(u) = &o.username {
        info.redis.username = Some(u.clone());
    }
    if let Some(p) = &o.password {
        info.redis.password = Some(p.clone());
    }
    if o.tls_insecure {
        if let ConnectionAddr::TcpTls { insecure, .. } = &mut info.addr {
            *insecure = true;
        }
    }
    Ok(info)
}

fn open_client(info: ConnectionInfo, o: &RedisOptions) -> redis::RedisResult<Client> {
    match (&o.ca_pem, &info.addr) {
        (Some(pem), ConnectionAddr::TcpTls { .. }) => Client::build_with_tls(info, certs(pem)),
        _ => Client::open(info),
    }
}

fn certs(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

fn err_from(e: redis::RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Slow(e.to_string())
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Failed(e.to_string())
    }
}

fn async_cfg(o: &RedisOptions) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(o.io_timeout)
        .set_response_timeout(o.io_timeout)
}

/// Whether an item error means "ask the cluster client, which follows the cluster".
fn retryable(v: &Value) -> bool {
    match v {
        Value::ServerError(e) => matches!(
            e.code(),
            "MOVED"
                | "ASK"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "NOSCRIPT"
                | "MASTERDOWN"
                | "READONLY"
                | "LOADING"
        ),
        _ => false,
    }
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

fn ints(v: Value) -> Result<Vec<i64>, StoreError> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|x| match x {
                Value::Int(i) => Ok(i),
                other => Err(StoreError::Failed(format!(
                    "unexpected script value {other:?}"
                ))),
            })
            .collect(),
        Value::ServerError(e) => Err(StoreError::Failed(format!("{e:?}"))),
        other => Err(StoreError::Failed(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

fn check_outcome(v: Value) -> ItemResult<CheckOutcome> {
    let r = ints(v)?;
    if r.len() != 5 {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    Ok(CheckOutcome {
        allowed: r[0] == 1,
        tightest: r[1].max(0) as usize,
        remaining: r[2].max(0) as u64,
        reset_at: r[3].max(0) as u64,
        retry_after_ms: r[4].max(0) as u64,
    })
}

fn sync_outcome(v: Value) -> ItemResult<SyncOutcome> {
    let r = ints(v)?;
    if r.len() != 4 {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    Ok(SyncOutcome {
        used: r[0].max(0) as u64,
        remaining: r[1].max(0) as u64,
        reset_at: r[2].max(0) as u64,
        weight: (r[3].max(0) as f64 / 1e9).min(1.0),
    })
}

impl RedisStore {
    pub fn single(url: &str, opts: RedisOptions, keys: KeyMaker) -> Result<Self, String> {
        let info = conn_info(url, &opts)?;
        Ok(RedisStore {
            keys,
            backend: Backend::Single(Single {
                info,
                opts,
                conn: tokio::sync::RwLock::new(None),
                reports: tokio::sync::RwLock::new(None),
            }),
            round_trips: AtomicU64::new(0),
        })
    }

    pub fn cluster(seeds: &[String], opts: RedisOptions, keys: KeyMaker) -> Result<Self, String> {
        if seeds.is_empty() {
            return Err("no cluster seed nodes".into());
        }
        let seeds = seeds
            .iter()
            .map(|s| conn_info(s.trim(), &opts))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RedisStore {
            keys,
            backend: Backend::Cluster(Cluster {
                seeds,
                opts,
                conn: tokio::sync::RwLock::new(None),
                topo: RwLock::new(Arc::new(Topology::default())),
                refreshing: AtomicBool::new(false),
                last_refresh: Mutex::new(None),
            }),
            round_trips: AtomicU64::new(0),
        })
    }

    /// Connects (and loads the scripts) now; the service calls this at start and goes
    /// on degraded if it fails.
    pub async fn connect(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Single(s) => s.get(Lane::Check).await.map(|_| ()),
            Backend::Cluster(c) => {
                c.get().await?;
                c.refresh(true).await
            }
        }
    }

    fn check_call(&self, algo: Algorithm, op: &CheckOp) -> Call {
        let mut args: Vec<Vec<u8>> = vec![
            op.hits.to_string().into_bytes(),
            if op.force {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
        ];
        let mut keys = Vec::with_capacity(op.limits.len());
        for l in &op.limits {
            match algo {
                Algorithm::SlidingWindow => {
                    keys.push(self.keys.sw_key(&op.tag, l.window_secs));
                    args.push(l.window_secs.to_string().into_bytes());
                    args.push(l.max.to_string().into_bytes());
                }
                Algorithm::TokenBucket => {
                    keys.push(self.keys.tb_key(&op.tag, l.window_secs, l.max, l.burst));
                    args.push(l.window_secs.to_string().into_bytes());
                    args.push(l.max.to_string().into_bytes());
                    args.push(l.burst.to_string().into_bytes());
                }
            }
        }
        Call {
            lua: match algo {
                Algorithm::SlidingWindow => Lua::SlidingWindow,
                Algorithm::TokenBucket => Lua::TokenBucket,
            },
            keys,
            args,
            entries: 0,
        }
    }

    /// One script call for `entries` (indices into `ops`/`keys`), all on one node.
    fn sync_call(
        &self,
        proxy: &str,
        entries: &[usize],
        ops: &[SyncOp],
        keys: &[String],
        p: &ShareParams,
    ) -> Call {
        let mut args: Vec<Vec<u8>> =
            Vec::with_capacity(SYNC_COMMON_ARGS + entries.len() * SYNC_ENTRY_ARGS);
        args.push(proxy.as_bytes().to_vec());
        args.push(p.ttl_ms.to_string().into_bytes());
        args.push(format!("{:.6}", p.floor).into_bytes());
        args.push(p.max_peers.to_string().into_bytes());
        args.push(format!("{:.6}", p.headroom).into_bytes());
        for &i in entries {
            let op = &ops[i];
            args.push(keys[i].as_bytes().to_vec());
            args.push(op.window_secs.to_string().into_bytes());
            args.push(op.max.to_string().into_bytes());
            args.push(op.admitted.to_string().into_bytes());
            args.push(format!("{:.6}", op.rate).into_bytes());
        }
        Call {
            lua: Lua::Sync,
            keys: vec![keys[entries[0]].clone()],
            args,
            entries: entries.len(),
        }
    }

    /// Indices of `keys` grouped by the node that serves them (one group for one node).
    fn group_by_node(&self, keys: &[String]) -> Vec<Vec<usize>> {
        match &self.backend {
            Backend::Single(_) => vec![(0..keys.len()).collect()],
            Backend::Cluster(c) => {
                let topo = c.topo.read().clone();
                let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
                let mut unknown = Vec::new();
                for (i, k) in keys.iter().enumerate() {
                    match topo.slots.get(slot(k) as usize) {
                        Some(&n) if n != u16::MAX => groups.entry(n).or_default().push(i),
                        // Unknown layout: one call each, the run's retry path places them.
                        _ => unknown.push(vec![i]),
                    }
                }
                groups.into_values().chain(unknown).collect()
            }
        }
    }

    async fn run(&self, calls: Vec<Call>, lane: Lane) -> Vec<ItemResult<Value>> {
        if calls.is_empty() {
            return Vec::new();
        }
        match &self.backend {
            Backend::Single(s) => s.run(&calls, lane, &self.round_trips).await,
            Backend::Cluster(c) => c.run(&calls, lane, &self.round_trips).await,
        }
    }
}

impl Single {
    async fn get(&self, lane: Lane) -> Result<ConnectionManager, StoreError> {
        let slot = match lane {
            Lane::Check => &self.conn,
            Lane::Reports => &self.reports,
        };
        if let Some(c) = slot.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut w = slot.write().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let client = open_client(self.info.clone(), &self.opts).map_err(err_from)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.opts.io_timeout)
            .set_response_timeout(self.opts.io_timeout)
            .set_number_of_retries(1)
            .set_max_delay(200);
        let connect = async move {
            let mut c = ConnectionManager::new_with_config(client, cfg)
                .await
                .map_err(err_from)?;
            load_scripts(&mut c).await?;
            Ok::<_, StoreError>(c)
        };
        let c = match lane {
            Lane::Check => connect.await?,
            Lane::Reports => on_runtime(&self.opts.report_runtime, connect).await??,
        };
        *w = Some(c.clone());
        Ok(c)
    }

    async fn run(&self, calls: &[Call], lane: Lane, rt: &AtomicU64) -> Vec<ItemResult<Value>> {
        let mut conn = match self.get(lane).await {
            Ok(c) => c,
            Err(e) => return calls.iter().map(|_| Err(e.clone())).collect(),
        };
        let mut out = pipeline(&mut conn, calls.iter(), rt).await;
        // A restarted Redis has an empty script cache: load and replay just those items.
        if out.iter().any(|r| matches!(r, Ok(v) if is_noscript(v))) {
            if let Err(e) = load_scripts(&mut conn).await {
                return calls.iter().map(|_| Err(e.clone())).collect();
            }
            let idx: Vec<usize> = (0..calls.len())
                .filter(|&i| matches!(&out[i], Ok(v) if is_noscript(v)))
                .collect();
            let again = pipeline(&mut conn, idx.iter().map(|&i| &calls[i]), rt).await;
            for (i, r) in idx.into_iter().zip(again) {
                out[i] = r;
            }
        }
        out
    }
}

/// A connection to one cluster node with the scripts loaded.
async fn node_connection(
    client: Client,
    cfg: AsyncConnectionConfig,
) -> Result<MultiplexedConnection, StoreError> {
    let mut c = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(err_from)?;
    load_scripts(&mut c).await?;
    Ok(c)
}

async fn load_scripts<C: ConnectionLike + Send>(c: &mut C) -> Result<(), StoreError> {
    let mut p = Pipeline::new();
    for l in Lua::ALL {
        p.cmd("SCRIPT").arg("LOAD").arg(l.src());
    }
    let _: Vec<String> = p.query_async(c).await.map_err(err_from)?;
    Ok(())
}

/// One pipeline of `EVALSHA`s; per item its raw reply (server errors kept as values).
async fn pipeline<'a, C: ConnectionLike + Send>(
    c: &mut C,
    calls: impl Iterator<Item = &'a Call>,
    rt: &AtomicU64,
) -> Vec<ItemResult<Value>> {
    let mut p = Pipeline::new();
    let mut n = 0;
    for call in calls {
        p.add_command(call.cmd(true));
        n += 1;
    }
    rt.fetch_add(1, Ordering::Relaxed);
    match c.req_packed_commands(&p, 0, n).await {
        Ok(vals) if vals.len() == n => vals.into_iter().map(Ok).collect(),
        Ok(_) => (0..n)
            .map(|_| Err(StoreError::Failed("short pipeline reply".into())))
            .collect(),
        Err(e) => {
            let e = err_from(e);
            (0..n).map(|_| Err(e.clone())).collect()
        }
    }
}

/// One call through the cluster client. A multi-entry sync call is split into one call
/// per entry (the client routes one slot per command); the replies are put back together
/// as one array, with `Nil` for an entry that still failed.
async fn retry_call(conn: ClusterConnection, call: &Call, rt: &AtomicU64) -> ItemResult<Value> {
    async fn one(mut conn: ClusterConnection, call: &Call, rt: &AtomicU64) -> ItemResult<Value> {
        // While a slot migrates, a script sent to the importing node after ASK can be
        // refused as touching a "non local key" (Redis 7.0 checks the script's own
        // accesses without the ASKING flag); moving one slot takes milliseconds, so
        // retry a few times. The request deadline bounds all of it.
        let mut attempt = 0u64;
        loop {
            rt.fetch_add(1, Ordering::Relaxed);
            let r = call.cmd(false).query_async::<Value>(&mut conn).await;
            let migrating = match &r {
                Ok(v) => retryable(v),
                Err(e) => {
                    e.code()
                        .is_some_and(|c| matches!(c, "TRYAGAIN" | "ASK" | "MOVED"))
                        || e.to_string().contains("non local key")
                }
            };
            if migrating && attempt < 8 {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                continue;
            }
            return match r {
                Ok(Value::ServerError(e)) => Err(StoreError::Failed(format!("{e:?}"))),
                Ok(v) => Ok(v),
                Err(e) => Err(err_from(e)),
            };
        }
    }
    if call.entries <= 1 {
        return one(conn, call, rt).await;
    }
    let parts = call.split();
    let results = join_all(parts.iter().map(|c| one(conn.clone(), c, rt))).await;
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        if results.iter().all(|r| r.is_err()) {
            return Err(e.clone());
        }
    }
    Ok(Value::Array(
        results
            .into_iter()
            .map(|r| match r {
                Ok(Value::Array(mut v)) if v.len() == 1 => v.pop().unwrap_or(Value::Nil),
                _ => Value::Nil,
            })
            .collect(),
    ))
}

impl Cluster {
    async fn get(&self) -> Result<ClusterConnection, StoreError> {
        if let Some(c) = self.conn.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut w = self.conn.write().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let mut b = redis::cluster::ClusterClientBuilder::new(self.seeds.clone())
            .connection_timeout(self.opts.io_timeout)
            .response_timeout(self.opts.io_timeout)
            .retries(3)
            .min_retry_wait(20)
            .max_retry_wait(200);
        if let Some(u) = &self.opts.username {
            b = b.username(u.clone());
        }
        if let Some(p) = &self.opts.password {
            b = b.password(p.clone());
        }
        if self.opts.tls_insecure {
            b = b.danger_accept_invalid_hostnames(true);
        }
        if let Some(pem) = &self.opts.ca_pem {
            b = b.certs(certs(pem));
        }
        let client = b.build().map_err(err_from)?;
        let c = client.get_async_connection().await.map_err(err_from)?;
        *w = Some(c.clone());
        Ok(c)
    }

    fn node_info(&self, host: &str, port: u16) -> ConnectionInfo {
        let base = &self.seeds[0];
        let addr = match &base.addr {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        ConnectionInfo {
            addr,
            redis: base.redis.clone(),
        }
    }

    /// Re-reads `CLUSTER SLOTS`, connects to new masters and loads the scripts there.
    /// At most one at a time and, unless `force`, at most one per 200 ms.
    async fn refresh(&self, force: bool) -> Result<(), StoreError> {
        {
            let mut last = self.last_refresh.lock();
            if !force && last.is_some_and(|t| t.elapsed() < Duration::from_millis(200)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Reset on drop: the caller's deadline may cancel this future half way, and a
        // flag left set would stop every later refresh.
        struct Reset<'a>(&'a AtomicBool);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _reset = Reset(&self.refreshing);
        self.refresh_inner().await
    }

    /// `CLUSTER SLOTS` from the first node that answers: the masters we know, then the
    /// seed nodes, then the cluster client. Asked directly rather than only through the
    /// cluster client, whose own view may be what is stuck during a failover.
    async fn cluster_slots(&self) -> Result<Value, StoreError> {
        // (Asked on the check connections: a short command, and the one thing a
        // refresh during a busy report must not wait behind.)
        let quick = Duration::from_millis(300);
        let known: Vec<MultiplexedConnection> = self
            .topo
            .read()
            .nodes
            .iter()
            .map(|n| n.conn.clone())
            .collect();
        for mut c in known {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            if let Ok(Ok(v)) = tokio::time::timeout(quick, cmd.query_async::<Value>(&mut c)).await {
                return Ok(v);
            }
        }
        for seed in &self.seeds {
            let Ok(client) = open_client(seed.clone(), &self.opts) else {
                continue;
            };
            let cfg = async_cfg(&self.opts)
                .set_connection_timeout(quick)
                .set_response_timeout(quick);
            let Ok(mut c) = client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
            else {
                continue;
            };
            if let Ok(v) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut c)
                .await
            {
                return Ok(v);
            }
        }
        let mut conn = self.get().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .map_err(err_from)
    }

    async fn refresh_inner(&self) -> Result<(), StoreError> {
        let v = self.cluster_slots().await?;
        let Value::Array(ranges) = v else {
            return Err(StoreError::Failed("CLUSTER SLOTS: not an array".into()));
        };
        let mut slot_addr: Vec<(u16, u16, String, u16)> = Vec::new();
        for r in ranges {
            let Value::Array(f) = r else { continue };
            if f.len() < 3 {
                continue;
            }
            let (Value::Int(a), Value::Int(b), Value::Array(m)) = (&f[0], &f[1], &f[2]) else {
                continue;
            };
            let host = match m.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).to_string(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = m.get(1) else {
                continue;
            };
            slot_addr.push((*a as u16, *b as u16, host, *port as u16));
        }
        let old = self.topo.read().clone();
        let mut nodes: Vec<Node> = Vec::new();
        let mut slots = vec![u16::MAX; 16384];
        for (a, b, host, port) in slot_addr {
            let addr = (host.clone(), port);
            let idx = match nodes.iter().position(|n| n.addr == addr) {
                Some(i) => i,
                None => {
                    let node = match old.nodes.iter().find(|n| n.addr == addr) {
                        Some(n) => n.clone(),
                        None => {
                            let client = open_client(self.node_info(&host, port), &self.opts)
                                .map_err(err_from)?;
                            let cfg = async_cfg(&self.opts);
                            let conn = node_connection(client.clone(), cfg.clone()).await?;
                            let reports =
                                on_runtime(&self.opts.report_runtime, node_connection(client, cfg))
                                    .await??;
                            Node {
                                addr,
                                conn,
                                reports,
                            }
                        }
                    };
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            for s in a..=b.min(16383) {
                slots[s as usize] = idx as u16;
            }
        }
        *self.topo.write() = Arc::new(Topology { slots, nodes });
        Ok(())
    }

    /// Drops a node whose connection broke, so the next refresh reconnects to it.
    fn forget(&self, addr: &(String, u16)) {
        let mut t = self.topo.write();
        if t.nodes.iter().any(|n| &n.addr == addr) {
            let nodes = t
                .nodes
                .iter()
                .filter(|n| &n.addr != addr)
                .cloned()
                .collect::<Vec<_>>();
            // Slots of the dropped node become unknown until the refresh.
            let map: Vec<u16> = t
                .nodes
                .iter()
                .map(|n| {
                    nodes
                        .iter()
                        .position(|m| m.addr == n.addr)
                        .map_or(u16::MAX, |i| i as u16)
                })
                .collect();
            let slots = t
                .slots
                .iter()
                .map(|&s| if s == u16::MAX { s } else { map[s as usize] })
                .collect();
            *t = Arc::new(Topology { slots, nodes });
        }
    }

    async fn run(&self, calls: &[Call], lane: Lane, rt: &AtomicU64) -> Vec<ItemResult<Value>> {
        if self.topo.read().nodes.is_empty() {
            if let Err(e) = self.refresh(false).await {
                return calls.iter().map(|_| Err(e.clone())).collect();
            }
        }
        let topo = self.topo.read().clone();
        let mut groups: HashMap<u16, Vec<usize>> = HashMap::new();
        let mut retry: Vec<usize> = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            match topo.slots.get(c.slot() as usize) {
                Some(&n) if n != u16::MAX => groups.entry(n).or_default().push(i),
                _ => retry.push(i),
            }
        }
        let mut out: Vec<ItemResult<Value>> = (0..calls.len())
            .map(|_| Err(StoreError::Unavailable("not sent".into())))
            .collect();
        let sends = groups.into_iter().map(|(n, idx)| {
            let mut conn = topo.nodes[n as usize].lane(lane);
            async move {
                let r = pipeline(&mut conn, idx.iter().map(|&i| &calls[i]), rt).await;
                (n, idx, r)
            }
        });
        let mut broken = Vec::new();
        for (n, idx, results) in join_all(sends).await {
            for (i, r) in idx.into_iter().zip(results) {
                match &r {
                    Ok(v) if !retryable(v) => out[i] = r,
                    Ok(_) => retry.push(i),
                    // Slow is not broken: the calls may still run, so they are neither
                    // sent again (counted twice) nor is the node dropped (its check
                    // connection with it).
                    Err(StoreError::Unavailable(_)) => {
                        broken.push(n);
                        retry.push(i);
                    }
                    Err(_) => out[i] = r,
                }
            }
        }
        if retry.is_empty() {
            return out;
        }
        broken.dedup();
        for n in broken {
            self.forget(&topo.nodes[n as usize].addr);
        }
        // The redis crate's cluster client follows MOVED/ASK and waits out TRYAGAIN;
        // `EVAL` (not EVALSHA) so a node without our scripts (a promoted replica that was
        // restarted, a new master) needs no extra step.
        let conn = match self.get().await {
            Ok(c) => c,
            Err(e) => {
                for i in retry {
                    out[i] = Err(e.clone());
                }
                return out;
            }
        };
        let again = retry.iter().map(|&i| {
            let conn = conn.clone();
            async move { (i, retry_call(conn, &calls[i], rt).await) }
        });
        let mut timed_out = false;
        for (i, r) in join_all(again).await {
            timed_out |= matches!(&r, Err(StoreError::Slow(_)));
            out[i] = r;
        }
        if timed_out {
            // The cluster client may be wedged on a dead node; start a fresh one next time.
            *self.conn.write().await = None;
        }
        // Learn the new layout for the next batch (also loads scripts on new masters).
        let _ = self.refresh(false).await;
        out
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.refresh(true).await?;
        let topo = self.topo.read().clone();
        if topo.slots.contains(&u16::MAX) {
            return Err(StoreError::Failed("some slots have no master".into()));
        }
        // Every master, concurrently, each with a short bound of its own: a dead node
        // must be noticed (and dropped) rather than eat the whole probe deadline.
        let pings = topo.nodes.iter().map(|n| async move {
            let mut c = n.conn.clone();
            let r = tokio::time::timeout(
                Duration::from_millis(300),
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut c),
            )
            .await;
            (n, r)
        });
        for (n, r) in join_all(pings).await {
            match r {
                Ok(Ok(info)) if info.contains("cluster_state:ok") => {}
                Ok(Ok(_)) => {
                    return Err(StoreError::Failed(format!(
                        "{}:{}: cluster_state is not ok",
                        n.addr.0, n.addr.1
                    )))
                }
                Ok(Err(e)) => {
                    self.forget(&n.addr);
                    return Err(err_from(e));
                }
                Err(_) => {
                    self.forget(&n.addr);
                    return Err(StoreError::Unavailable(format!(
                        "{}:{} does not answer PING",
                        n.addr.0, n.addr.1
                    )));
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    fn name(&self) -> &'static str {
        match self.backend {
            Backend::Single(_) => "redis",
            Backend::Cluster(_) => "redis-cluster",
        }
    }

    async fn check(&self, algo: Algorithm, ops: &[CheckOp]) -> Vec<ItemResult<CheckOutcome>> {
        let calls = ops.iter().map(|op| self.check_call(algo, op)).collect();
        // Reconciliation (forced calls) travels with the checks too: it runs while the
        // service is degraded, when no check uses the store, and must not queue behind
        // reports (it is what ends degraded mode).
        self.run(calls, Lane::Check)
            .await
            .into_iter()
            .map(|r| r.and_then(check_outcome))
            .collect()
    }

    async fn sync(
        &self,
        proxy: &str,
        ops: &[SyncOp],
        params: &ShareParams,
    ) -> Vec<ItemResult<SyncOutcome>> {
        if ops.is_empty() {
            return Vec::new();
        }
        let keys: Vec<String> = ops
            .iter()
            .map(|op| self.keys.sw_key(&op.tag, op.window_secs))
            .collect();
        let mut calls = Vec::new();
        let mut owners: Vec<Vec<usize>> = Vec::new();
        for group in self.group_by_node(&keys) {
            let per_call = match &self.backend {
                Backend::Single(s) => s.opts.sync_chunk,
                Backend::Cluster(c) => c.opts.sync_chunk,
            };
            for chunk in group.chunks(per_call.max(1)) {
                calls.push(self.sync_call(proxy, chunk, ops, &keys, params));
                owners.push(chunk.to_vec());
            }
        }
        let mut out: Vec<ItemResult<SyncOutcome>> = (0..ops.len())
            .map(|_| Err(StoreError::Failed("no reply".into())))
            .collect();
        for (r, owner) in self.run(calls, Lane::Reports).await.into_iter().zip(owners) {
            match r {
                Ok(Value::Array(items)) if items.len() == owner.len() => {
                    for (item, i) in items.into_iter().zip(owner) {
                        out[i] = sync_outcome(item);
                    }
                }
                Ok(other) => {
                    let e = match other {
                        Value::ServerError(e) => StoreError::Failed(format!("{e:?}")),
                        v => StoreError::Failed(format!("unexpected sync reply {v:?}")),
                    };
                    for i in owner {
                        out[i] = Err(e.clone());
                    }
                }
                Err(e) => {
                    for i in owner {
                        out[i] = Err(e.clone());
                    }
                }
            }
        }
        out
    }

    async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Single(s) => {
                let mut c = s.get(Lane::Check).await?;
                let _: String = redis::cmd("PING")
                    .query_async(&mut c)
                    .await
                    .map_err(err_from)?;
                Ok(())
            }
            Backend::Cluster(c) => c.ping().await,
        }
    }

    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }
}
