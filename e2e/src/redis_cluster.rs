//! A real Redis Cluster whose nodes live in network namespaces, formed with explicit
//! placement (which node is a master, which master each replica follows), with AUTH on
//! every node, and the controls a failure scenario needs: kill and restart a node, find
//! the master in a namespace, time a failover (after a kill or a partition).
//!
//! The cluster is formed by hand (config epochs, slot ranges, MEET, REPLICATE) rather
//! than with `redis-cli --cluster create`, which chooses for itself which master each
//! replica follows. Forming takes about 2 s here, bounded by Redis itself: a master
//! reports `cluster_state:ok` no earlier than 2 s after it started.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process::{output_within, wait_until, Proc};

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16384;

/// Where one node runs and what it is at formation.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// A readable name for logs, e.g. `az-a-master`.
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Index (in the spec list) of the master this node replicates; None for a master.
    pub replica_of: Option<usize>,
}

/// How the cluster is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub password: String,
    /// `cluster-node-timeout`: how long a node may be silent before it counts as failed;
    /// failover takes about twice this.
    pub node_timeout_ms: u64,
}

pub struct RedisNode {
    pub spec: NodeSpec,
    pub dir: PathBuf,
    netns: Netns,
    proc: Mutex<Option<Proc>>,
}

impl RedisNode {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.spec.ip, self.spec.port)
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.lock().unwrap().as_ref().and_then(Proc::pid)
    }

    pub fn is_running(&self) -> bool {
        self.proc
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(Proc::is_running)
    }

    fn start(&self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg(self.dir.join("redis.conf"));
        let proc = Proc::start(&self.spec.name, cmd, Some(&self.netns), &self.log_path());
        *self.proc.lock().unwrap() = Some(proc);
    }

    fn kill(&self) {
        if let Some(mut p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }
}

/// Who a node is in the cluster's current view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub addr: String,
    pub master: bool,
    /// Flagged `fail` (or `fail?`) by the node asked.
    pub failed: bool,
    /// For a replica: the id of its master.
    pub master_id: Option<String>,
    /// Slot ranges served (masters).
    pub slots: Vec<(u16, u16)>,
}

/// A master the cluster is losing (killed, or cut off by a partition) and what it
/// served, recorded just before the loss.
#[derive(Clone, Debug)]
pub struct LostMaster {
    pub node: usize,
    /// Its replicas at that moment: one of them should take over.
    pub replicas: Vec<usize>,
    pub slots: Vec<(u16, u16)>,
    /// When it was lost; failover times count from here.
    pub at: Instant,
}

/// What a failover took.
#[derive(Clone, Debug)]
pub struct Failover {
    /// The replica that became master.
    pub promoted: usize,
    /// From the loss until the replica called itself master.
    pub promoted_after: Duration,
    /// From the loss until the judging nodes reported `cluster_state:ok` and agreed on
    /// the new master.
    pub cluster_ok_after: Duration,
}

pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
    pub opts: ClusterOptions,
}

/// Reply prefixes redis-cli prints (exit status 0) for an error reply.
const ERROR_PREFIXES: &[&str] = &[
    "ERR",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "LOADING",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "MISCONF",
    "Could not connect",
];

impl RedisCluster {
    /// Starts every node (in its namespace, data and log under `dir`) and forms the
    /// cluster: masters split the slots evenly in spec order, each replica follows the
    /// master its spec names. Returns when every node reports `cluster_state:ok` and
    /// every replica's link to its master is up.
    pub fn start(
        specs: Vec<NodeSpec>,
        opts: ClusterOptions,
        dir: &Path,
    ) -> Result<RedisCluster, String> {
        require_redis();
        let nodes: Vec<RedisNode> = specs
            .into_iter()
            .map(|spec| {
                let dir = dir.join(format!("redis-{}", spec.name));
                std::fs::create_dir_all(&dir).expect("create redis dir");
                write_config(&dir, &spec, &opts);
                RedisNode {
                    netns: Netns::open(&spec.netns),
                    spec,
                    dir,
                    proc: Mutex::new(None),
                }
            })
            .collect();
        let cluster = RedisCluster { nodes, opts };
        for n in &cluster.nodes {
            n.start();
        }
        cluster.form()?;
        Ok(cluster)
    }

    fn form(&self) -> Result<(), String> {
        let timeout = Duration::from_secs(15);
        for i in 0..self.nodes.len() {
            self.wait_pong(i, timeout)?;
        }
        let masters: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].spec.replica_of.is_none())
            .collect();
        if masters.is_empty() {
            return Err("a cluster needs at least one master".into());
        }
        // Distinct config epochs up front, as `redis-cli --cluster create` does: no epoch
        // collision to resolve after the MEETs.
        for (k, &m) in masters.iter().enumerate() {
            let (lo, hi) = slot_range(k, masters.len());
            self.expect_ok(m, &["CLUSTER", "SET-CONFIG-EPOCH", &(k + 1).to_string()])?;
            self.expect_ok(
                m,
                &["CLUSTER", "ADDSLOTSRANGE", &lo.to_string(), &hi.to_string()],
            )?;
        }
        for i in 1..self.nodes.len() {
            let s = &self.nodes[i].spec;
            self.expect_ok(
                0,
                &["CLUSTER", "MEET", &s.ip.to_string(), &s.port.to_string()],
            )?;
        }
        let ids: Vec<String> = (0..self.nodes.len())
            .map(|i| self.node_id(i))
            .collect::<Result<_, _>>()?;
        // A replica can follow a master only once it knows it (gossip spreads the MEETs).
        wait_until(
            "every node knows every other",
            timeout,
            Duration::from_millis(10),
            || {
                (0..self.nodes.len())
                    .all(|i| {
                        self.view_from(i).is_ok_and(|v| {
                            v.len() == self.nodes.len()
                                && ids.iter().all(|id| v.iter().any(|n| &n.id == id))
                        })
                    })
                    .then_some(())
            },
        )?;
        for i in 0..self.nodes.len() {
            if let Some(m) = self.nodes[i].spec.replica_of {
                self.expect_ok(i, &["CLUSTER", "REPLICATE", &ids[m]])?;
            }
        }
        self.wait_ok(timeout)?;
        wait_until(
            "replicas in sync with their masters",
            timeout,
            Duration::from_millis(10),
            || {
                (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].spec.replica_of.is_some())
                    .all(|i| {
                        self.cli(i, &["INFO", "replication"])
                            .is_ok_and(|r| r.contains("master_link_status:up"))
                    })
                    .then_some(())
            },
        )?;
        // Every node must also see the replicas where the spec put them: clients learn
        // the replicas from any node's CLUSTER SLOTS.
        wait_until(
            "every node agrees on the placement",
            timeout,
            Duration::from_millis(10),
            || {
                (0..self.nodes.len())
                    .all(|i| {
                        self.view_from(i).is_ok_and(|v| {
                            self.nodes.iter().all(|n| {
                                let Some(me) = v.iter().find(|x| x.addr == n.addr()) else {
                                    return false;
                                };
                                match n.spec.replica_of {
                                    None => me.master,
                                    Some(m) => me.master_id.as_deref() == Some(&ids[m]),
                                }
                            })
                        })
                    })
                    .then_some(())
            },
        )?;
        Ok(())
    }

    fn wait_pong(&self, i: usize, timeout: Duration) -> Result<(), String> {
        wait_until(
            &format!("{} answers PING", self.nodes[i].spec.name),
            timeout,
            Duration::from_millis(10),
            || {
                self.cli(i, &["PING"])
                    .is_ok_and(|s| s.trim() == "PONG")
                    .then_some(())
            },
        )
    }

    /// `redis-cli` against node `i`, run inside the node's namespace (so it works while
    /// the node is partitioned from the others), authenticated, bounded to 5 s.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let n = &self.nodes[i];
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", &n.spec.ip.to_string(), "-p", &n.spec.port.to_string()])
            .arg("--no-auth-warning")
            .args(args)
            // Not on the command line, where `ps` would show it.
            .env("REDISCLI_AUTH", &self.opts.password);
        n.netns.apply_to(&mut cmd);
        let out = output_within(cmd, Duration::from_secs(5))
            .map_err(|e| format!("{} redis-cli {}: {e}", n.spec.name, args.join(" ")))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let first = text.trim_start();
        if !out.status.success() || ERROR_PREFIXES.iter().any(|p| first.starts_with(p)) {
            return Err(format!(
                "{} redis-cli {}: {}{}",
                n.spec.name,
                args.join(" "),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(text)
    }

    fn expect_ok(&self, i: usize, args: &[&str]) -> Result<(), String> {
        let r = self.cli(i, args)?;
        if r.trim() == "OK" {
            Ok(())
        } else {
            Err(format!(
                "{} {}: {}",
                self.nodes[i].spec.name,
                args.join(" "),
                r.trim()
            ))
        }
    }

    pub fn node_id(&self, i: usize) -> Result<String, String> {
        Ok(self.cli(i, &["CLUSTER", "MYID"])?.trim().to_owned())
    }

    /// Seed URLs for a cluster client (every node).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisNode::url).collect()
    }

    /// The cluster as node `i` sees it (`CLUSTER NODES`).
    pub fn view_from(&self, i: usize) -> Result<Vec<NodeView>, String> {
        Ok(parse_cluster_nodes(&self.cli(i, &["CLUSTER", "NODES"])?))
    }

    /// The index of the node at `addr` (`ip:port`).
    pub fn index_of(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr() == addr)
    }

    /// The node in `netns` that currently serves slots as master, in the view of the
    /// first running node there is.
    pub fn master_in(&self, netns: &str) -> Option<usize> {
        let view = self.live_view()?;
        view.iter()
            .filter(|v| v.master && !v.failed && !v.slots.is_empty())
            .filter_map(|v| self.index_of(&v.addr))
            .find(|&i| self.nodes[i].spec.netns == netns)
    }

    /// The replicas of node `master`, in the view of a running node.
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let Some(view) = self.live_view() else {
            return Vec::new();
        };
        let Some(id) = view
            .iter()
            .find(|v| v.addr == self.nodes[master].addr())
            .map(|v| v.id.clone())
        else {
            return Vec::new();
        };
        view.iter()
            .filter(|v| v.master_id.as_deref() == Some(id.as_str()))
            .filter_map(|v| self.index_of(&v.addr))
            .collect()
    }

    fn live_view(&self) -> Option<Vec<NodeView>> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .find_map(|i| self.view_from(i).ok())
    }

    /// Records master `node` (its replicas and slots) as lost from now on: call it just
    /// before cutting it off.
    pub fn losing_master(&self, node: usize) -> LostMaster {
        let replicas = self.replicas_of(node);
        let slots = self
            .live_view()
            .and_then(|v| v.into_iter().find(|x| x.addr == self.nodes[node].addr()))
            .map(|v| v.slots)
            .unwrap_or_default();
        LostMaster {
            node,
            replicas,
            slots,
            at: Instant::now(),
        }
    }

    /// SIGKILLs the master currently in `netns`.
    pub fn kill_master_in(&self, netns: &str) -> LostMaster {
        let node = self
            .master_in(netns)
            .unwrap_or_else(|| panic!("no master in {netns}"));
        let lost = self.losing_master(node);
        self.nodes[node].kill();
        lost
    }

    /// Waits for a replica of the lost master to take over and for every running node
    /// to agree; times both from the loss.
    pub fn wait_failover(&self, lost: &LostMaster, timeout: Duration) -> Result<Failover, String> {
        let judges: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect();
        self.wait_failover_seen_by(lost, &judges, timeout)
    }

    /// [`RedisCluster::wait_failover`] as seen by the nodes `judges` only (e.g. the
    /// majority side of a partition: the cut-off nodes cannot agree).
    pub fn wait_failover_seen_by(
        &self,
        lost: &LostMaster,
        judges: &[usize],
        timeout: Duration,
    ) -> Result<Failover, String> {
        let killed = lost;
        let (promoted, promoted_after) = wait_until(
            "a replica of the killed master promoted",
            timeout,
            Duration::from_millis(5),
            || {
                killed
                    .replicas
                    .iter()
                    .copied()
                    .find(|&r| {
                        self.cli(r, &["ROLE"])
                            .is_ok_and(|s| s.lines().next() == Some("master"))
                    })
                    .map(|r| (r, killed.at.elapsed()))
            },
        )?;
        let new_id = self.node_id(promoted)?;
        let rest = timeout.saturating_sub(killed.at.elapsed());
        wait_until(
            "the judging nodes see the promoted master, cluster_state:ok",
            rest,
            Duration::from_millis(5),
            || {
                judges
                    .iter()
                    .filter(|&&i| self.nodes[i].is_running())
                    .all(|&i| {
                        let ok = self
                            .cli(i, &["CLUSTER", "INFO"])
                            .is_ok_and(|s| s.contains("cluster_state:ok"));
                        ok && self.view_from(i).is_ok_and(|v| {
                            v.iter().any(|n| n.id == new_id && n.master && !n.failed)
                        })
                    })
                    .then_some(())
            },
        )?;
        Ok(Failover {
            promoted,
            promoted_after,
            cluster_ok_after: killed.at.elapsed(),
        })
    }

    /// SIGKILLs node `i`.
    pub fn kill(&self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again with its data directory and `nodes.conf`: it rejoins with
    /// its old identity (a replaced master comes back as a replica of its successor).
    pub fn restart(&self, i: usize) -> Result<(), String> {
        self.nodes[i].kill();
        self.nodes[i].start();
        self.wait_pong(i, Duration::from_secs(10))
    }

    /// Every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self, timeout: Duration) -> Result<(), String> {
        wait_until(
            "cluster_state:ok on every running node",
            timeout,
            Duration::from_millis(10),
            || {
                (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].is_running())
                    .all(|i| {
                        self.cli(i, &["CLUSTER", "INFO"])
                            .is_ok_and(|s| s.contains("cluster_state:ok"))
                    })
                    .then_some(())
            },
        )
    }

    /// Pids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(RedisNode::pid).collect()
    }

    /// Kills every node.
    pub fn stop(&self) {
        for n in &self.nodes {
            n.kill();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `k`-th of `n` even slot ranges.
fn slot_range(k: usize, n: usize) -> (u16, u16) {
    let per = SLOTS as usize / n;
    let lo = k * per;
    let hi = if k + 1 == n {
        SLOTS as usize - 1
    } else {
        lo + per - 1
    };
    (lo as u16, hi as u16)
}

/// A config file rather than arguments, so the password never shows in `ps`.
fn write_config(dir: &Path, spec: &NodeSpec, opts: &ClusterOptions) {
    let mut c = String::new();
    let d = dir.display();
    let _ = writeln!(c, "bind {}", spec.ip);
    let _ = writeln!(c, "port {}", spec.port);
    let _ = writeln!(c, "dir {d}");
    // No persistence: a restarted node resyncs from its master.
    let _ = writeln!(c, "save \"\"");
    let _ = writeln!(c, "appendonly no");
    let _ = writeln!(c, "requirepass {}", opts.password);
    let _ = writeln!(c, "masterauth {}", opts.password);
    let _ = writeln!(c, "cluster-enabled yes");
    let _ = writeln!(c, "cluster-config-file {d}/nodes.conf");
    let _ = writeln!(c, "cluster-node-timeout {}", opts.node_timeout_ms);
    let _ = writeln!(c, "cluster-announce-ip {}", spec.ip);
    // A replica whose master was quiet (pings every 10 s by default) would otherwise
    // count as too stale to take over.
    let _ = writeln!(c, "cluster-replica-validity-factor 0");
    let _ = writeln!(c, "repl-ping-replica-period 1");
    // The default waits 5 s before the first full sync to a replica.
    let _ = writeln!(c, "repl-diskless-sync-delay 0");
    std::fs::write(dir.join("redis.conf"), c).expect("write redis.conf");
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch>
/// <link> <slot>...`.
pub fn parse_cluster_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let addr = f[1].split('@').next()?.to_owned();
            let flags = f[2];
            let master_id = (f[3] != "-").then(|| f[3].to_owned());
            let slots = f[8..]
                .iter()
                // Importing/migrating entries look like [slot->-id]; not ranges served.
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|v| (v, v)),
                })
                .collect();
            Some(NodeView {
                id: f[0].to_owned(),
                addr,
                master: flags.contains("master"),
                failed: flags.contains("fail"),
                master_id,
                slots,
            })
        })
        .collect()
}

fn require_redis() {
    for bin in ["redis-server", "redis-cli"] {
        let ok = Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "`{bin}` is not on PATH: the three-AZ topology runs a real Redis Cluster. \
             Run scripts/install-redis.sh (apt-get install -y redis-server redis-tools)."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ranges_cover_every_slot_once() {
        for n in 1..=7 {
            let mut next = 0u32;
            for k in 0..n {
                let (lo, hi) = slot_range(k, n);
                assert_eq!(lo as u32, next, "n={n} k={k}");
                assert!(hi >= lo);
                next = hi as u32 + 1;
            }
            assert_eq!(next, SLOTS as u32);
        }
    }

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
aea4 10.77.0.1:7000@17000 myself,master - 0 1796115966000 1 connected 0-5460
32e1 10.77.0.2:7000@17000 master,fail - 0 1796115966841 2 connected 5461-10922 [5462->-abc]
068a 10.77.0.3:7001@17001 slave 32e1 0 1796115966841 2 connected
";
        let v = parse_cluster_nodes(text);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].addr, "10.77.0.1:7000");
        assert!(v[0].master && !v[0].failed);
        assert_eq!(v[0].slots, vec![(0, 5460)]);
        assert!(v[1].failed);
        assert_eq!(v[1].slots, vec![(5461, 10922)]);
        assert!(!v[2].master);
        assert_eq!(v[2].master_id.as_deref(), Some("32e1"));
    }
}
