//! What the global- and strict-scope tests run against, behind one face: the real
//! companion (`meshlimit-service`, in-memory store, on loopback) or the reference peer
//! (`crate::peer`: the core's share allocation and an exact GCRA behind a real HTTP
//! server). A scenario written once runs on either; stopping and starting it again
//! stands for a companion that crashed and came back on the same address.

use std::path::PathBuf;
use std::sync::Mutex;

use crate::companion::{Companion, CompanionSpec};
use crate::peer::{Peer, StrictBehaviour, SyncBehaviour};

pub enum Backend {
    Reference {
        port: u16,
        peer: Mutex<Option<Peer>>,
    },
    Companion {
        companion: Box<Companion>,
        dir: PathBuf,
    },
}

impl Backend {
    /// The reference peer allocating shares (lease 10 minutes, the companion's default)
    /// and deciding strict checks exactly.
    pub fn reference() -> Backend {
        let peer = Peer::start(
            SyncBehaviour::Allocate { lease_ms: 600_000 },
            StrictBehaviour::Exact,
        );
        Backend::Reference {
            port: peer.port,
            peer: Mutex::new(Some(peer)),
        }
    }

    /// The real companion with bearer token `token`, on its in-memory store.
    pub fn companion(token: &str) -> Backend {
        let dir = crate::tempdir("e2e-companion");
        let spec = CompanionSpec::loopback("companion", token, dir.clone());
        let companion = Box::new(Companion::start(spec));
        Backend::Companion { companion, dir }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Reference { .. } => "reference peer",
            Backend::Companion { .. } => "meshlimit-service",
        }
    }

    /// The port the filter's companion cluster points at.
    pub fn port(&self) -> u16 {
        match self {
            Backend::Reference { port, .. } => *port,
            Backend::Companion { companion, .. } => companion.spec.port,
        }
    }

    /// The reports the reference peer received; `None` for the companion (it keeps no
    /// such record: use the filter's metrics).
    pub fn reports(&self) -> Option<Vec<meshlimit_core::protocol::SyncReport>> {
        match self {
            Backend::Reference { peer, .. } => peer.lock().unwrap().as_ref().map(Peer::reports),
            Backend::Companion { .. } => None,
        }
    }

    /// Gone: the port refuses connections (SIGKILL for the companion).
    pub fn stop(&self) {
        match self {
            Backend::Reference { peer, .. } => drop(peer.lock().unwrap().take()),
            Backend::Companion { companion, .. } => companion.kill(),
        }
    }

    /// Back on the same port, with no memory of before.
    pub fn start_again(&self) {
        match self {
            Backend::Reference { port, peer } => {
                let again = Peer::start_on(
                    *port,
                    SyncBehaviour::Allocate { lease_ms: 600_000 },
                    StrictBehaviour::Exact,
                );
                *peer.lock().unwrap() = Some(again);
            }
            Backend::Companion { companion, .. } => companion.restart(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Companion { companion, dir } = self {
            companion.kill();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
