//! The companion service (`meshlimit-service`, the real binary) as a child process of
//! the harness, with a bearer token: inside a network namespace on a Redis Cluster (the
//! three-AZ topology), or on loopback with its in-memory store
//! ([`CompanionSpec::loopback`]); and the controls a failure scenario needs: kill,
//! restart, SIGSTOP, SIGCONT.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

use crate::client::{Client, Request, Response};
use crate::netns::Netns;
use crate::process::{wait_until, Proc};

/// The `meshlimit-service` binary: `$MESHLIMIT_SERVICE_BIN`, else the one cargo built
/// next to this test binary (`target/<profile>/`). Panics, naming the build command,
/// when it is missing or older than its sources (a stale companion would test old code).
pub fn companion_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHLIMIT_SERVICE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "MESHLIMIT_SERVICE_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/meshlimit-service
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let release = profile_dir.ends_with("release");
    let build = format!(
        "cargo build -p meshlimit-service --bin meshlimit-service{}",
        if release { " --release" } else { "" }
    );
    let bin = profile_dir.join("meshlimit-service");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("no companion binary at {}: run `{build}`", bin.display()));
    let root = crate::repo_root();
    let newest = ["redis-service/src", "redis-service/lua", "core/src"]
        .iter()
        .filter_map(|d| newest_mtime(&root.join(d)))
        .max();
    if let Some(newest) = newest {
        assert!(
            newest <= built,
            "{} is older than its sources: run `{build}`",
            bin.display()
        );
    }
    bin
}

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// How one companion starts.
#[derive(Clone, Debug)]
pub struct CompanionSpec {
    /// A readable name for logs, e.g. `companion az-a`.
    pub name: String,
    /// The network namespace it runs in; `None`: the test's own (loopback).
    pub netns: Option<String>,
    /// Port it listens on, on every address of its namespace.
    pub port: u16,
    /// Where the test process reaches it (an address of the namespace it can route to).
    pub reach: SocketAddr,
    pub token: String,
    /// Redis Cluster seed URLs; none: the in-memory store.
    pub redis_seeds: Vec<String>,
    pub redis_password: String,
    /// Holds the token and password files and the log.
    pub dir: PathBuf,
}

impl CompanionSpec {
    /// On 127.0.0.1 at a free port, in the test's own network namespace, on the
    /// in-memory store, its token and log under `dir`.
    pub fn loopback(name: &str, token: &str, dir: PathBuf) -> CompanionSpec {
        let port = crate::free_port();
        CompanionSpec {
            name: name.to_owned(),
            netns: None,
            port,
            reach: SocketAddr::from(([127, 0, 0, 1], port)),
            token: token.to_owned(),
            redis_seeds: Vec::new(),
            redis_password: String::new(),
            dir,
        }
    }
}

/// A companion process; its controls take `&self`, so a test can kill or pause it while
/// load runs on other threads.
pub struct Companion {
    pub spec: CompanionSpec,
    netns: Option<Netns>,
    proc: Mutex<Option<Proc>>,
}

impl Companion {
    /// Starts it and waits until it answers `/healthz` (not `/readyz`: whether the store
    /// is reachable is for the caller to wait for, or not).
    pub fn start(spec: CompanionSpec) -> Companion {
        std::fs::create_dir_all(&spec.dir).expect("create companion dir");
        std::fs::write(spec.dir.join("token"), format!("{}\n", spec.token)).unwrap();
        std::fs::write(
            spec.dir.join("redis-password"),
            format!("{}\n", spec.redis_password),
        )
        .unwrap();
        let c = Companion {
            netns: spec.netns.as_deref().map(Netns::open),
            spec,
            proc: Mutex::new(None),
        };
        c.spawn();
        c
    }

    pub fn log_path(&self) -> PathBuf {
        self.spec.dir.join("companion.log")
    }

    fn spawn(&self) {
        let s = &self.spec;
        let mut cmd = Command::new(companion_bin());
        let listen = match s.netns {
            Some(_) => format!("0.0.0.0:{}", s.port),
            None => format!("127.0.0.1:{}", s.port),
        };
        cmd.arg("--listen")
            .arg(listen)
            .arg("--token-file")
            .arg(s.dir.join("token"))
            .env("ML_LOG", "info,redis=warn");
        if !s.redis_seeds.is_empty() {
            cmd.arg("--redis-cluster")
                .arg(s.redis_seeds.join(","))
                .arg("--redis-password-file")
                .arg(s.dir.join("redis-password"));
        }
        let proc = Proc::start(&s.name, cmd, self.netns.as_ref(), &self.log_path());
        *self.proc.lock().unwrap() = Some(proc);
        if let Err(e) = wait_until(
            &format!("{} answers /healthz", s.name),
            Duration::from_secs(15),
            Duration::from_millis(10),
            || self.try_get("/healthz").ok().filter(|r| r.status == 200),
        ) {
            panic!(
                "{e}. Its log:\n{}",
                crate::process::tail(&self.log_path(), 50)
            );
        }
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

    /// SIGKILL (no graceful shutdown: what a crash or an OOM kill looks like).
    pub fn kill(&self) {
        if let Some(mut p) = self.proc.lock().unwrap().take() {
            p.kill();
        }
    }

    /// Kills it if it runs, starts it again with the same flags, waits for `/healthz`.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP: every thread stops; connections are still accepted by the kernel (the
    /// listen backlog) but nothing is answered until [`Companion::resume`].
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Companion::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        self.proc
            .lock()
            .unwrap()
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.spec.name))
            .signal(sig);
    }

    /// A keep-alive client to it, from the test process.
    pub fn client(&self) -> Client {
        Client::to(self.spec.reach)
    }

    fn authorized(&self, req: Request) -> Request {
        req.header("authorization", &format!("Bearer {}", self.spec.token))
    }

    /// GET `path` on a new connection (no token: for `/healthz`, `/readyz`).
    pub fn try_get(&self, path: &str) -> std::io::Result<Response> {
        self.client().try_send(&Request::get(path))
    }

    /// `/readyz`: 200 when the store answers and the service is not degraded.
    pub fn readyz(&self) -> std::io::Result<Response> {
        self.try_get("/readyz")
    }

    pub fn is_ready(&self) -> bool {
        self.readyz().is_ok_and(|r| r.status == 200)
    }

    /// Waits for `/readyz` 200; returns how long it took.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration, String> {
        let t = std::time::Instant::now();
        wait_until(
            &format!("{} ready", self.spec.name),
            timeout,
            Duration::from_millis(20),
            || self.is_ready().then(|| t.elapsed()),
        )
        .map_err(|e| format!("{e}; last /readyz: {}", self.readyz_text()))
    }

    /// Waits for `/readyz` to answer, but not 200 (the store is out of reach).
    pub fn wait_not_ready(&self, timeout: Duration) -> Result<Duration, String> {
        let t = std::time::Instant::now();
        wait_until(
            &format!("{} not ready", self.spec.name),
            timeout,
            Duration::from_millis(20),
            || {
                self.readyz()
                    .is_ok_and(|r| r.status != 200)
                    .then(|| t.elapsed())
            },
        )
        .map_err(|e| format!("{e}; last /readyz: {}", self.readyz_text()))
    }

    fn readyz_text(&self) -> String {
        match self.readyz() {
            Ok(r) => format!("{} {}", r.status, r.body_str()),
            Err(e) => e.to_string(),
        }
    }

    /// POST `path` with a JSON body and the bearer token, on a new connection.
    pub fn post_json(&self, path: &str, body: &Value) -> std::io::Result<Response> {
        let req = self.authorized(
            Request::post(path)
                .header("content-type", "application/json")
                .body(body.to_string()),
        );
        self.client().try_send(&req)
    }

    /// `POST /v1/sync` with `report` (a `meshlimit_core::protocol::SyncReport` as JSON).
    pub fn sync(&self, report: &Value) -> std::io::Result<Response> {
        self.post_json("/v1/sync", report)
    }
}
