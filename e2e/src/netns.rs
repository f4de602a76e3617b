//! Linux network namespaces, the primitives the three-AZ topology is built from: the
//! `ip` command (iproute2), and entering a namespace from a thread or a child process.
//!
//! A socket belongs to the namespace of the thread that created it, for its whole life,
//! whichever thread uses it later. So a listener made by a thread that entered `az-a`
//! serves `az-a`'s addresses (that is how the in-process upstreams and delaying proxies
//! live inside an AZ), and a child that enters a namespace before `exec` (what
//! `ip netns exec` does) binds and connects there.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Where `ip netns add NAME` mounts the namespace.
pub fn netns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new(&netns_path(name)).exists()
}

/// Namespaces, veths and bridges need root (CAP_NET_ADMIN). Not a skip: a run without
/// root must fail loudly, or CI would go green without the three-AZ tests.
pub fn require_root() {
    // SAFETY: plain syscall without arguments.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the three-AZ tests build network namespaces, veths and a bridge and must run as \
         root (euid is {euid}); CI runs them as root"
    );
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        ip.map(|s| s.success()).unwrap_or(false),
        "`ip` (iproute2) is not on PATH: apt-get install -y iproute2"
    );
}

/// Runs `ip ARGS…`; the error names the command and carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS…` that must succeed (set-up steps: a failure there is a broken machine).
pub fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// stdout of `ip ARGS…` ("" on failure).
pub fn ip_output(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Pids of the processes in a namespace (`ip netns pids`).
pub fn netns_pids(name: &str) -> Vec<i32> {
    ip_output(&["netns", "pids", name])
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Names of the links in the root namespace.
pub fn root_links() -> Vec<String> {
    ip_output(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| {
            // "7: mlaz-a@if6: <BROADCAST,...": the name, without the peer suffix.
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next().unwrap_or(name).to_owned())
        })
        .collect()
}

/// An open handle on a namespace, to enter it.
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    pub fn open(name: &str) -> Netns {
        let file = File::open(netns_path(name))
            .unwrap_or_else(|e| panic!("open network namespace {name}: {e}"));
        Netns {
            name: name.to_owned(),
            file,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into the namespace, for good: call it on a thread made
    /// for that (sockets it creates from now on live in the namespace).
    pub fn enter_this_thread(&self) {
        // SAFETY: setns on a namespace fd we hold open; affects this thread only.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert!(
            rc == 0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Makes `cmd`'s child enter the namespace before `exec` (what `ip netns exec` does,
    /// minus its /sys remount, which none of our processes need). One process stays one
    /// pid, so the harness signals the server itself, not a wrapper. `self` must outlive
    /// the spawn.
    pub fn apply_to(&self, cmd: &mut Command) {
        let fd: RawFd = self.file.as_raw_fd();
        let enter = move || {
            // SAFETY: setns takes an fd and a flag, no pointer; the fd is open in the
            // child until exec closes it (O_CLOEXEC).
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure only calls setns, which is async-signal-safe and touches
        // no memory of the parent.
        unsafe {
            cmd.pre_exec(enter);
        }
    }

    /// Runs `f` on a short-lived thread inside the namespace: for creating sockets there
    /// (a listener made this way keeps serving the namespace from any thread).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter_this_thread();
                f()
            })
            .join()
            .expect("thread inside the namespace panicked")
        })
    }
}
