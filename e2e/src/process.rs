//! Child processes of the harness: each in its own process group, dying with the test
//! process even when Drop never runs, optionally inside a network namespace, with its
//! output in a log file the harness prints when a test fails.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Spawns `cmd` in its own process group (a terminal's job-control signals never reach
/// it, and a kill of the group takes its children too), with SIGKILL as its parent-death
/// signal, inside `netns` when given.
pub fn spawn(mut cmd: Command, netns: Option<&Netns>) -> io::Result<Child> {
    cmd.process_group(0);
    let die_with_parent = || {
        // If the test process dies without running Drop, the child dies with it.
        // SAFETY: PR_SET_PDEATHSIG takes a signal number, no pointer.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        Ok(())
    };
    // SAFETY: the closure only calls prctl, which is async-signal-safe and touches no
    // memory of the parent.
    unsafe {
        cmd.pre_exec(die_with_parent);
    }
    if let Some(ns) = netns {
        ns.apply_to(&mut cmd);
    }
    spawn_from_keeper(cmd)
}

type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns from one thread that lives as long as the process. PR_SET_PDEATHSIG fires when
/// the *thread* that forked exits, and test threads end after each test; a keeper thread
/// means a child dies with the process, not with whichever test started it.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn keeper thread");
        Mutex::new(tx)
    });
    let (reply, result) = mpsc::channel();
    keeper.lock().unwrap().send((cmd, reply)).unwrap();
    result.recv().unwrap()
}

/// Opens `path` for appending (a restarted process continues its predecessor's log).
pub fn append_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}

/// A long-running server process with its log file. SIGKILLed (with its group) on Drop.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `cmd` (stdin closed, stdout and stderr appended to `log`).
    pub fn start(name: &str, mut cmd: Command, netns: Option<&Netns>, log: &Path) -> Proc {
        let file = append_log(log);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log fd"))
            .stderr(file);
        let child = spawn(cmd, netns).unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            log: log.to_owned(),
            child: Some(child),
        }
    }

    /// The pid (also the process group id); None once killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` to the process (SIGSTOP and SIGCONT pause and resume every thread).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        // SAFETY: plain syscall on our own child.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert!(
            rc == 0,
            "kill({pid}, {sig}) for {}: {}",
            self.name,
            io::Error::last_os_error()
        );
    }

    /// SIGKILL to the whole group, then reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain syscall; the group id is the child's pid (process_group(0)).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file ("" when missing).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A short command's output, killed if it takes longer than `timeout` (so one wedged
/// `redis-cli` cannot hang a test).
pub fn output_within(mut cmd: Command, timeout: Duration) -> io::Result<std::process::Output> {
    use std::io::Read;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    // Drained on threads: a full pipe would otherwise stall the child until the timeout.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Polls `f` every `every` until it gives `Some`, or fails after `timeout` with `what`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {timeout:?}"));
        }
        std::thread::sleep(every);
    }
}
