//! The service under test, started with the test rules and a token file: either the real
//! binary as a child process (where the process is the point: signals, exit codes, a
//! runtime of its own), or in this test's runtime through the library's own
//! [`meshlimit_service::server::run`], as the binary does it.

use super::client::Client;
use super::{tempdir, RULES, TOKEN};
use clap::Parser;
use meshlimit_service::config::Config;
use meshlimit_service::server;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub struct Service {
    run: Run,
    pub addr: String,
    pub client: Client,
    pub dir: PathBuf,
}

enum Run {
    Process(Option<Child>),
    /// Stopped (drained and shut down, as on SIGTERM) when `stop` is dropped.
    InProcess {
        _stop: oneshot::Sender<()>,
    },
}

/// A temp dir with the token and rules files, and the arguments that name them.
fn files() -> (PathBuf, Vec<String>) {
    let dir = tempdir("svc");
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.join("rules.json"), RULES).unwrap();
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let args = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        path("token"),
        "--rules".into(),
        path("rules.json"),
    ];
    (dir, args)
}

impl Service {
    /// Starts the real binary with `args` (plus a token file and the test rules).
    pub fn start(args: &[&str]) -> Service {
        let (dir, base) = files();
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshlimit-service"))
            .args(&base)
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
        Service::new(Run::Process(Some(child)), addr, dir)
    }

    /// Runs the service with `args` in this test's runtime (reports on it too), as the
    /// binary would with the same arguments.
    pub async fn in_process(args: &[&str]) -> Service {
        let (dir, base) = files();
        let argv = std::iter::once("meshlimit-service".to_string())
            .chain(base)
            .chain(args.iter().map(|a| a.to_string()));
        let cfg = Config::try_parse_from(argv).expect("arguments");
        cfg.validate().expect("valid arguments");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = server::Options::from_config(&cfg, None).expect("server options");
        let service = meshlimit_service::service::Service::start(&cfg, None)
            .await
            .expect("service");
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(server::run(listener, service, options, async {
            let _ = stopped.await;
        }));
        Service::new(Run::InProcess { _stop: stop }, addr, dir)
    }

    fn new(run: Run, addr: String, dir: PathBuf) -> Service {
        let client = Client::new(&format!("http://{addr}"), Some(TOKEN));
        Service {
            run,
            addr,
            client,
            dir,
        }
    }

    /// SIGTERM to the binary and wait; returns the exit status success.
    pub fn terminate(&mut self) -> bool {
        let Run::Process(child) = &mut self.run else {
            panic!("terminate: the service runs in this process");
        };
        let Some(mut c) = child.take() else {
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
        if let Run::Process(Some(c)) = &mut self.run {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
