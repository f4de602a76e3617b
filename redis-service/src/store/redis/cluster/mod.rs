//! Redis Cluster. The store keeps its own slot map (from `CLUSTER SLOTS`) and two
//! multiplexed connections per master, so a batch is split by master and sent as one
//! pipeline per master, concurrently: one round trip per master. What the slot map
//! cannot place or what comes back redirected goes through the retry path
//! ([`recovery`]) while the slot map is refreshed.

mod recovery;
mod topology;

use super::batch::{all_failed, group_by_node, pipeline, Lane};
use super::connection::{
    async_config, client, cluster_client, node_connection_info, on_runtime, RedisOptions,
};
use super::scripts::{load_all, Call};
use crate::keys::slot;
use crate::store::{ItemResult, StoreError};
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};
use recovery::{needs_cluster_client, through_cluster_client};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionInfo, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use topology::{masters, parse_cluster_slots, Addr, Node, Topology};

/// Least time between two refreshes of the slot map that nothing forced: a burst of
/// redirected items triggers one, not one each.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// Bound on one node's answer to a short command (`CLUSTER SLOTS` in a refresh,
/// `CLUSTER INFO` in a probe): a dead node must be noticed (and dropped) rather than eat
/// the whole deadline of the refresh or the probe.
const QUICK_TIMEOUT: Duration = Duration::from_millis(300);

pub(super) struct Cluster {
    seeds: Vec<ConnectionInfo>,
    opts: RedisOptions,
    /// The `redis` crate's cluster client, for the retry path; created on first use.
    client: tokio::sync::RwLock<Option<ClusterConnection>>,
    topo: RwLock<Arc<Topology>>,
    refreshing: AtomicBool,
    last_refresh: Mutex<Option<Instant>>,
}

impl Cluster {
    pub(super) fn new(seeds: Vec<ConnectionInfo>, opts: RedisOptions) -> Self {
        Cluster {
            seeds,
            opts,
            client: tokio::sync::RwLock::new(None),
            topo: RwLock::new(Arc::new(Topology::default())),
            refreshing: AtomicBool::new(false),
            last_refresh: Mutex::new(None),
        }
    }

    pub(super) fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// Connects the cluster client and reads the slot map (connecting to every master
    /// and loading the scripts there).
    pub(super) async fn connect(&self) -> Result<(), StoreError> {
        self.cluster_client().await?;
        self.refresh(true).await
    }

    async fn cluster_client(&self) -> Result<ClusterConnection, StoreError> {
        if let Some(c) = self.client.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut w = self.client.write().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let c = cluster_client(&self.seeds, &self.opts)?
            .get_async_connection()
            .await?;
        *w = Some(c.clone());
        Ok(c)
    }

    /// Indices of `keys` grouped by the master that serves them; a key whose master is
    /// unknown gets a group of its own (the retry path places it).
    pub(super) fn group_by_node(&self, keys: &[String]) -> Vec<Vec<usize>> {
        let topo = self.topo.read().clone();
        let g = group_by_node(keys.iter().map(|k| topo.node_of(slot(k))));
        g.by_node
            .into_values()
            .chain(g.unrouted.into_iter().map(|i| vec![i]))
            .collect()
    }

    /// Re-reads `CLUSTER SLOTS`, connects to new masters and loads the scripts there.
    /// At most one at a time and, unless `force`, at most one per [`REFRESH_EVERY`].
    async fn refresh(&self, force: bool) -> Result<(), StoreError> {
        {
            let mut last = self.last_refresh.lock();
            if !force && last.is_some_and(|t| t.elapsed() < REFRESH_EVERY) {
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
        let ranges = parse_cluster_slots(self.cluster_slots().await?)?;
        let old = self.topo.read().clone();
        let mut nodes = Vec::new();
        for addr in masters(&ranges) {
            let node = match old.nodes.iter().find(|n| n.addr == addr) {
                Some(n) => n.clone(),
                None => self.connect_node(addr).await?,
            };
            nodes.push(node);
        }
        *self.topo.write() = Arc::new(Topology::new(&ranges, nodes));
        Ok(())
    }

    /// Both connections to a master, the scripts loaded on each; the report connection
    /// is created on the reports' runtime (its I/O is driven there).
    async fn connect_node(&self, addr: Addr) -> Result<Node, StoreError> {
        let client = client(
            node_connection_info(&self.seeds[0], &addr.0, addr.1),
            &self.opts,
        )?;
        let cfg = async_config(&self.opts);
        let check = node_connection(client.clone(), cfg.clone()).await?;
        let reports = on_runtime(&self.opts.report_runtime, node_connection(client, cfg)).await??;
        Ok(Node {
            addr,
            check,
            reports,
        })
    }

    /// `CLUSTER SLOTS` from the first node that answers: the masters we know, then the
    /// seed nodes, then the cluster client. Asked directly rather than only through the
    /// cluster client, whose own view may be what is stuck during a failover. Asked on
    /// the check connections: a short command, and the one thing a refresh during a busy
    /// report must not wait behind.
    async fn cluster_slots(&self) -> Result<Value, StoreError> {
        let known: Vec<MultiplexedConnection> = self
            .topo
            .read()
            .nodes
            .iter()
            .map(|n| n.check.clone())
            .collect();
        for mut c in known {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SLOTS");
            if let Ok(Ok(v)) =
                tokio::time::timeout(QUICK_TIMEOUT, cmd.query_async::<Value>(&mut c)).await
            {
                return Ok(v);
            }
        }
        for seed in &self.seeds {
            let Ok(client) = client(seed.clone(), &self.opts) else {
                continue;
            };
            let cfg = async_config(&self.opts)
                .set_connection_timeout(QUICK_TIMEOUT)
                .set_response_timeout(QUICK_TIMEOUT);
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
        let mut conn = self.cluster_client().await?;
        Ok(redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?)
    }

    /// Drops a node whose connection broke, so the next refresh reconnects to it.
    fn forget(&self, addr: &Addr) {
        let mut t = self.topo.write();
        if let Some(without) = t.without(addr) {
            *t = Arc::new(without);
        }
    }

    /// One pipeline per master for the calls it serves, concurrently; then the retry
    /// path for what was not placed, redirected, or lost with a broken connection.
    pub(super) async fn run(
        &self,
        calls: &[Call],
        lane: Lane,
        round_trips: &AtomicU64,
    ) -> Vec<ItemResult<Value>> {
        if self.topo.read().nodes.is_empty() {
            if let Err(e) = self.refresh(false).await {
                return all_failed(calls.len(), &e);
            }
        }
        let topo = self.topo.read().clone();
        let groups = group_by_node(calls.iter().map(|c| topo.node_of(c.slot())));
        let mut retry = groups.unrouted;
        let mut out = all_failed(calls.len(), &StoreError::Unavailable("not sent".into()));
        let sends = groups.by_node.into_iter().map(|(n, items)| {
            let mut conn = topo.nodes[n].connection(lane);
            async move {
                let r = pipeline(&mut conn, items.iter().map(|&i| &calls[i]), round_trips).await;
                (n, items, r)
            }
        });
        let mut broken = Vec::new();
        for (n, items, results) in join_all(sends).await {
            for (i, r) in items.into_iter().zip(results) {
                match &r {
                    Ok(v) if !needs_cluster_client(v) => out[i] = r,
                    Ok(_) => retry.push(i),
                    // Slow is not broken: the calls may still run, so they are neither
                    // sent again (counted twice) nor is the node dropped (its check
                    // connection with it).
                    Err(StoreError::Unavailable(_)) => {
                        if !broken.contains(&n) {
                            broken.push(n);
                        }
                        retry.push(i);
                    }
                    Err(_) => out[i] = r,
                }
            }
        }
        if retry.is_empty() {
            return out;
        }
        for n in broken {
            self.forget(&topo.nodes[n].addr);
        }
        let conn = match self.cluster_client().await {
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
            async move {
                (
                    i,
                    through_cluster_client(conn, &calls[i], round_trips).await,
                )
            }
        });
        let mut timed_out = false;
        for (i, r) in join_all(again).await {
            timed_out |= matches!(&r, Err(StoreError::Slow(_)));
            out[i] = r;
        }
        if timed_out {
            // The cluster client may be wedged on a dead node; start a fresh one next time.
            *self.client.write().await = None;
        }
        // Learn the new layout for the next batch (also loads scripts on new masters).
        let _ = self.refresh(false).await;
        out
    }

    /// Every slot has a master and every master says `cluster_state:ok`, each within
    /// [`QUICK_TIMEOUT`] (a master that does not answer is dropped from the slot map).
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.refresh(true).await?;
        let topo = self.topo.read().clone();
        if !topo.is_complete() {
            return Err(StoreError::Failed("some slots have no master".into()));
        }
        let pings = topo.nodes.iter().map(|n| async move {
            let mut c = n.check.clone();
            let r = tokio::time::timeout(
                QUICK_TIMEOUT,
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut c),
            )
            .await;
            (n, r)
        });
        for (n, r) in join_all(pings).await {
            let (host, port) = &n.addr;
            match r {
                Ok(Ok(info)) if info.contains("cluster_state:ok") => {}
                Ok(Ok(_)) => {
                    return Err(StoreError::Failed(format!(
                        "{host}:{port}: cluster_state is not ok"
                    )))
                }
                Ok(Err(e)) => {
                    self.forget(&n.addr);
                    return Err(e.into());
                }
                Err(_) => {
                    self.forget(&n.addr);
                    return Err(StoreError::Unavailable(format!(
                        "{host}:{port} does not answer PING"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A connection to one master with the scripts loaded.
async fn node_connection(
    client: Client,
    cfg: AsyncConnectionConfig,
) -> Result<MultiplexedConnection, StoreError> {
    let mut c = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    load_all(&mut c).await?;
    Ok(c)
}
