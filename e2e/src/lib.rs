//! End-to-end harness for meshlimit: a real Envoy (from `scripts/install-envoy.sh`)
//! running the real filter wasm, in front of an in-process demo upstream, driven by a
//! small HTTP client that can send any bytes. [`topology`] builds three AZs on one
//! machine (network namespaces, a Redis Cluster, a companion and an Envoy per AZ) for the
//! global-limit scenarios. [`peer`] is a scripted companion (valid answers, every kind
//! of bad one, or a reference allocation) and [`backend`] runs a global- or strict-scope
//! scenario on it or on the real companion. [`istio`] checks the Istio manifests against the Istio CRD
//! schemas, as the API server would.
//!
//! ```no_run
//! use meshlimit_e2e::*;
//! let upstream = Upstream::start();
//! let envoy = Envoy::start(r#"{"rules":[{"id":"api","match":{"path":"/api/*"},
//!     "limits":[{"window":"1m","max":5}]}]}"#, &upstream);
//! let resp = envoy.send(&Request::get("/api/x").header("x-api-key", "k"));
//! assert_eq!(resp.status, 200);
//! assert_eq!(upstream.hits(), 1);
//! ```

use std::path::PathBuf;

pub mod backend;
pub mod client;
pub mod companion;
pub mod delay_proxy;
pub mod envoy;
pub mod h2;
pub mod istio;
pub mod lb;
pub mod load;
/// Free loopback ports (never one handed out twice, nor one whose +10 000 cluster-bus
/// port is taken) and fresh temp dirs: the companion's tests' one implementation.
#[path = "../../redis-service/tests/support/machine.rs"]
pub mod machine;
pub mod netns;
pub mod peer;
pub mod process;
pub mod redis_cluster;
pub mod topology;
pub mod upstream;

pub use client::{send_concurrent, send_raw, Client, Request, Response};
pub use envoy::{Envoy, EnvoyOptions, SHIPPED_PATH_OPTIONS};
pub use h2::send_h2;
pub use lb::LoadBalancer;
pub use load::{Load, LoadReport, LoadRun};
pub use machine::{free_port, tempdir};
pub use topology::{Az, Topology, TopologyOptions};
pub use upstream::Upstream;

/// The repository root (the workspace directory holding `e2e/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e has a parent directory")
        .to_path_buf()
}

/// `$ENVOY_BIN`, else `.tools/bin/envoy`; panics when neither exists.
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin/envoy"));
    assert!(
        path.is_file(),
        "no Envoy binary at {}: run scripts/install-envoy.sh (or set ENVOY_BIN)",
        path.display()
    );
    path
}

/// `$MESHLIMIT_WASM`, else `target/meshlimit.wasm` (the release build trimmed by
/// `scripts/build-filter.sh`); panics when missing.
pub fn filter_wasm() -> PathBuf {
    let path = std::env::var_os("MESHLIMIT_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/meshlimit.wasm"));
    assert!(
        path.is_file(),
        "no filter wasm at {}: build it with scripts/build-filter.sh (or set MESHLIMIT_WASM)",
        path.display()
    );
    path
}
