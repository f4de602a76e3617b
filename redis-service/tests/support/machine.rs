//! What the tests take from the machine: free loopback ports and fresh temp dirs, both
//! unique within the test binary (its tests run in parallel).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Tells apart the temp dirs and ids one test process makes.
pub(super) static SEQ: AtomicU32 = AtomicU32::new(0);

/// A new, empty directory `meshlimit-<tag>-<pid>-<n>` under the system's temp dir.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "meshlimit-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A loopback port nobody listens on, never handed out twice by this process. A Redis
/// Cluster node also listens on its port + 10 000 (the cluster bus), so that one is
/// free too, and the port is below 55 000 to leave room for it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if p < 55000
            && !given.contains(&p)
            && !given.contains(&(p + 10000))
            && !given.contains(&p.wrapping_sub(10000))
            && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            given.push(p);
            return p;
        }
    }
}
