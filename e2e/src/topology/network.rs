//! The topology's network: namespaces, the inter-AZ bridge and the client links
//! (see the diagram in the parent module), their teardown, and the checks that nothing
//! is left behind.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::Az;
use crate::netns::{self, ip, ip_ok};

pub(super) const BRIDGE: &str = "mlbr0";
/// Names of the links inside each namespace.
const NS_AZ_LINK: &str = "mlaz";
const NS_CLIENT_LINK: &str = "mlcl";
/// One topology per machine at a time (fixed namespace names): a second run waits.
const LOCK_PATH: &str = "/run/meshlimit-three-az.lock";

/// Every link name this module creates in the root namespace.
fn root_link_names() -> Vec<String> {
    let mut v = vec![BRIDGE.to_owned()];
    for az in Az::ALL {
        v.push(az.az_link());
        v.push(az.client_link());
    }
    v
}

/// The namespaces and links. [`AzNetwork::teardown`] removes them.
pub(super) struct AzNetwork;

impl AzNetwork {
    pub(super) fn create() -> AzNetwork {
        // From here on, a panic tears down whatever was made.
        let net = AzNetwork;
        let guard = TeardownOnPanic;
        ip_ok(&["link", "add", BRIDGE, "type", "bridge"]);
        ip_ok(&["link", "set", BRIDGE, "up"]);
        for az in Az::ALL {
            let ns = az.name();
            ip_ok(&["netns", "add", ns]);
            ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
            // Inter-AZ link: a bridge port in the root namespace, `mlaz` inside.
            let az_link = az.az_link();
            ip_ok(&[
                "link", "add", &az_link, "type", "veth", "peer", "name", NS_AZ_LINK, "netns", ns,
            ]);
            ip_ok(&["link", "set", &az_link, "master", BRIDGE, "up"]);
            let bridge_addr = format!("{}/24", az.bridge_ip());
            ip_ok(&["-n", ns, "addr", "add", &bridge_addr, "dev", NS_AZ_LINK]);
            ip_ok(&["-n", ns, "link", "set", NS_AZ_LINK, "up"]);
            // Client link: point to point between the test process and the AZ.
            let client_link = az.client_link();
            ip_ok(&[
                "link",
                "add",
                &client_link,
                "type",
                "veth",
                "peer",
                "name",
                NS_CLIENT_LINK,
                "netns",
                ns,
            ]);
            ip_ok(&[
                "addr",
                "add",
                &format!("{}/30", az.host_ip()),
                "dev",
                &client_link,
            ]);
            ip_ok(&["link", "set", &client_link, "up"]);
            let client_addr = format!("{}/30", az.client_ip());
            ip_ok(&["-n", ns, "addr", "add", &client_addr, "dev", NS_CLIENT_LINK]);
            ip_ok(&["-n", ns, "link", "set", NS_CLIENT_LINK, "up"]);
        }
        std::mem::forget(guard);
        net
    }

    pub(super) fn teardown(self) {
        cleanup_leftovers();
    }
}

struct TeardownOnPanic;

impl Drop for TeardownOnPanic {
    fn drop(&mut self) {
        cleanup_leftovers();
    }
}

/// Removes what a previous run left (a killed test process never runs Drop): the
/// processes still in our namespaces, our links, the namespaces. Only names this module
/// creates are touched.
pub fn cleanup_leftovers() {
    for az in Az::ALL {
        if netns::netns_exists(az.name()) {
            for pid in netns::netns_pids(az.name()) {
                // SAFETY: plain syscall; these processes run in a namespace only we create.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
    // Links first: deleting a veth end deletes its peer at once, while a deleted
    // namespace is destroyed (taking its veths along) asynchronously, which would leave
    // the root-side names taken for a moment.
    let present = netns::root_links();
    for link in root_link_names() {
        if present.contains(&link) {
            if let Err(e) = ip(&["link", "del", &link]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
    for az in Az::ALL {
        if netns::netns_exists(az.name()) {
            if let Err(e) = ip(&["netns", "del", az.name()]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// What is left after a teardown: our namespaces, links named `ml*`, the given
/// processes, and any task (process or thread) in a namespace with one of `inodes`.
pub fn leftovers(pids: &[(String, u32)], inodes: &[u64]) -> Vec<String> {
    let mut left = Vec::new();
    for az in Az::ALL {
        if netns::netns_exists(az.name()) {
            left.push(format!("namespace {}", az.name()));
        }
    }
    for link in netns::root_links() {
        if link.starts_with("ml") {
            left.push(format!("link {link}"));
        }
    }
    for (name, pid) in pids {
        if Path::new(&format!("/proc/{pid}")).exists() {
            left.push(format!("process {name} (pid {pid})"));
        }
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("net:[{i}]")).collect();
    for task in tasks() {
        let Ok(target) = std::fs::read_link(task.join("ns/net")) else {
            continue;
        };
        if wanted.iter().any(|w| target.to_string_lossy() == *w) {
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            left.push(format!(
                "task {} ({}) in a topology namespace",
                task.display(),
                comm.trim()
            ));
        }
    }
    left
}

/// Every `/proc/<pid>/task/<tid>` on the machine.
fn tasks() -> Vec<PathBuf> {
    let mut v = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return v;
    };
    for p in procs.flatten() {
        if !p
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        if let Ok(tasks) = std::fs::read_dir(p.path().join("task")) {
            v.extend(tasks.flatten().map(|t| t.path()));
        }
    }
    v
}

/// An exclusive `flock` on [`LOCK_PATH`]: one topology per machine at a time (the
/// namespace names are fixed), across test threads and processes. Held for the
/// topology's life; a second one waits.
pub struct MachineLock {
    _file: File,
}

impl MachineLock {
    pub fn acquire() -> MachineLock {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .unwrap_or_else(|e| panic!("open {LOCK_PATH}: {e}"));
        // SAFETY: flock on a file we hold open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("another three-AZ topology runs on this machine: waiting for it");
            // SAFETY: as above, blocking.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            assert!(
                rc == 0,
                "flock {LOCK_PATH}: {}",
                std::io::Error::last_os_error()
            );
        }
        MachineLock { _file: f }
    }
}
