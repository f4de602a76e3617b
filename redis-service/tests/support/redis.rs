//! Real Redis servers on free loopback ports in temp dirs: one node (plain or TLS only),
//! or a cluster of 3 masters + 3 replicas. Every process is killed on Drop.

use super::{free_port, tempdir, wait_for};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
