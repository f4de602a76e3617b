//! Command line and environment. Every flag has an `ML_*` environment variable so the
//! service runs the same from a shell, systemd or a Kubernetes Deployment.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
pub enum Algorithm {
    /// Sliding window counter: two counters per (client, window), the previous window's
    /// count weighted by how much of it still overlaps the sliding window.
    SlidingWindow,
    /// Token bucket as GCRA: one timestamp per (client, limit), burst = bucket capacity.
    TokenBucket,
}

/// What a request gets when the store does not answer within the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailMode {
    /// Decide from a local in-memory store enforcing `--fallback-share` of each limit,
    /// and reconcile what it admitted into the store when the store is back.
    Fallback,
    /// Admit everything (still counted, and reconciled later).
    Open,
    /// Refuse everything.
    Closed,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "meshlimit-service", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "ML_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// Rules file (`{"rules": [...]}`, the filter's plugin configuration shape) for
    /// `/rate-limit/check`. Without it the service starts with no rules (sync still works).
    #[arg(long, env = "ML_RULES")]
    pub rules: Option<PathBuf>,

    /// One Redis node: `redis://[user:pass@]host:port[/db]` or `rediss://` for TLS.
    #[arg(long, env = "ML_REDIS_URL", conflicts_with = "redis_cluster")]
    pub redis_url: Option<String>,

    /// Redis Cluster seed nodes, comma separated (`redis://h1:p1,redis://h2:p2`).
    #[arg(long, env = "ML_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,

    /// Redis ACL user name (overrides the URL's).
    #[arg(long, env = "ML_REDIS_USERNAME")]
    pub redis_username: Option<String>,

    /// File holding the Redis password (overrides the URL's). Preferred to
    /// `ML_REDIS_PASSWORD` because files do not leak through `ps` or crash dumps.
    #[arg(long, env = "ML_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,

    /// Redis password (overrides the URL's).
    #[arg(long, env = "ML_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// With `rediss://`: do not verify the server certificate at all (test setups only).
    #[arg(long, env = "ML_REDIS_TLS_INSECURE")]
    pub redis_tls_insecure: bool,

    /// With `rediss://`: PEM file of the CA to trust for the Redis servers' certificates.
    #[arg(long, env = "ML_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Prefix of every Redis key.
    #[arg(long, env = "ML_KEY_PREFIX", default_value = "ml")]
    pub key_prefix: String,

    /// File holding the bearer token clients must send (`Authorization: Bearer <t>`).
    #[arg(long, env = "ML_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// The bearer token itself (prefer `--token-file`).
    #[arg(long, env = "ML_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Run without a token. Only for local experiments; refused unless given explicitly.
    #[arg(long, env = "ML_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// File holding the key of the HMAC that turns client ids into store keys. Without
    /// it, a fixed-key SHA-256 is used (still no raw id stored, but guessable ids can be
    /// confirmed by anyone who can read Redis).
    #[arg(long, env = "ML_CLIENT_HASH_KEY_FILE")]
    pub client_hash_key_file: Option<PathBuf>,

    /// Algorithm of `/rate-limit/check`.
    #[arg(
        long,
        env = "ML_ALGORITHM",
        value_enum,
        default_value = "sliding-window"
    )]
    pub algorithm: Algorithm,

    /// Deadline of one store call; past it the request is answered per `--on-store-error`.
    #[arg(long, env = "ML_STORE_TIMEOUT_MS", default_value_t = 50)]
    pub store_timeout_ms: u64,

    /// Deadline of one `/v1/sync` batch (up to 10 000 entries, one pipeline per node).
    #[arg(long, env = "ML_SYNC_TIMEOUT_MS", default_value_t = 1000)]
    pub sync_timeout_ms: u64,

    /// What to answer when the store fails or is too slow.
    #[arg(
        long,
        env = "ML_ON_STORE_ERROR",
        value_enum,
        default_value = "fallback"
    )]
    pub on_store_error: FailMode,

    /// Share of each limit this instance enforces alone while degraded (1/N for N
    /// service instances), in (0, 1].
    #[arg(long, env = "ML_FALLBACK_SHARE", default_value_t = 1.0)]
    pub fallback_share: f64,

    /// How often a degraded service probes the store (and reconciles when it answers).
    #[arg(long, env = "ML_PROBE_INTERVAL_MS", default_value_t = 500)]
    pub probe_interval_ms: u64,

    /// How long a proxy's share stays valid; a proxy that has not reported a key for this
    /// long loses its share (it returns to the pool). About 3 sync intervals.
    #[arg(long, env = "ML_SHARE_TTL_MS", default_value_t = 3000)]
    pub share_ttl_ms: u64,

    /// Part of each key's quota split evenly among active proxies rather than by demand,
    /// so that no active proxy starves, in [0, 1].
    #[arg(long, env = "ML_SHARE_FLOOR", default_value_t = 0.05)]
    pub share_floor: f64,

    /// Part of each key's quota kept unallocated so a proxy that appears gets a share at
    /// once rather than after the incumbents' next report; costs that fraction of
    /// under-admission in steady state. In [0, 0.5].
    #[arg(long, env = "ML_SHARE_HEADROOM", default_value_t = 0.0)]
    pub share_headroom: f64,

    /// Most reconciliation entries (counts owed to the store) kept while degraded; past
    /// it the entry charged least recently is dropped, counted in
    /// `meshlimit_reconcile_dropped_total`.
    #[arg(long, env = "ML_MAX_PENDING", default_value_t = 1_000_000)]
    pub max_pending: usize,

    /// A connection must send a complete request head (request line and headers) within
    /// this many milliseconds of being ready for one (accepted, or its previous response
    /// sent), else it is closed: bounds slow headers and idle keep-alive connections.
    #[arg(long, env = "ML_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    pub header_timeout_ms: u64,

    /// Longest a client may take to send a request body (up to 4 MiB); past it 408.
    #[arg(long, env = "ML_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,

    /// Most client connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "ML_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Threads that parse and run `/v1/sync` reports, apart from the workers that
    /// answer checks (so a large report never holds up a check).
    #[arg(long, env = "ML_REPORT_WORKERS", default_value_t = 1)]
    pub report_workers: usize,

    /// Reports (`/v1/sync`) handled at once; one more is answered 503 (`overloaded`,
    /// `Retry-After: 1`) without being read.
    #[arg(long, env = "ML_MAX_REPORTS_IN_FLIGHT", default_value_t = 2)]
    pub max_reports_in_flight: usize,

    /// Sync entries per script call (see `SYNC_CHUNK` in `src/store/redis/scripts.rs`); for
    /// measuring the trade-off, not for tuning in production.
    #[arg(long, env = "ML_SYNC_ENTRIES_PER_CALL", default_value_t = crate::store::redis::SYNC_CHUNK, hide = true)]
    pub sync_entries_per_call: usize,

    /// Seconds to wait for in-flight requests on SIGTERM before exiting.
    #[arg(long, env = "ML_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Worker threads (default: one per core).
    #[arg(long, env = "ML_WORKERS")]
    pub workers: Option<usize>,
}

impl Config {
    pub fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms.max(1))
    }

    pub fn sync_timeout(&self) -> Duration {
        Duration::from_millis(self.sync_timeout_ms.max(1))
    }

    /// Checks what clap cannot express; one line naming the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.fallback_share > 0.0 && self.fallback_share <= 1.0) {
            return Err("--fallback-share: must be in (0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.share_floor) {
            return Err("--share-floor: must be in [0, 1]".into());
        }
        if !(0.0..=0.5).contains(&self.share_headroom) {
            return Err("--share-headroom: must be in [0, 0.5]".into());
        }
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err("--header-timeout-ms / --body-timeout-ms: must be > 0".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections: must be > 0".into());
        }
        if !(1..=1000).contains(&self.sync_entries_per_call) {
            return Err("--sync-entries-per-call: must be in 1..=1000".into());
        }
        if self.max_reports_in_flight == 0 {
            return Err("--max-reports-in-flight: must be > 0".into());
        }
        if self.report_workers == 0 {
            return Err("--report-workers: must be > 0".into());
        }
        if self.share_ttl_ms == 0 {
            return Err("--share-ttl-ms: must be > 0".into());
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 32
            || self.key_prefix.contains(['{', '}'])
        {
            return Err("--key-prefix: 1..=32 bytes without '{' or '}'".into());
        }
        if self.token.is_none() && self.token_file.is_none() && !self.insecure_no_auth {
            return Err(
                "no bearer token: give --token-file (or ML_TOKEN), or --insecure-no-auth".into(),
            );
        }
        Ok(())
    }

    /// The bearer token, trimmed of the trailing newline files usually have.
    pub fn load_token(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.token_file {
            let t = std::fs::read_to_string(p)
                .map_err(|e| format!("--token-file {}: {e}", p.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                return Err(format!("--token-file {}: empty", p.display()));
            }
            return Ok(Some(t));
        }
        match &self.token {
            Some(t) if t.trim().is_empty() => Err("ML_TOKEN: empty".into()),
            Some(t) => Ok(Some(t.trim().to_string())),
            None => Ok(None),
        }
    }

    pub fn load_redis_password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.redis_password_file {
            let t = std::fs::read_to_string(p)
                .map_err(|e| format!("--redis-password-file {}: {e}", p.display()))?;
            return Ok(Some(t.trim_end_matches(['\r', '\n']).to_string()));
        }
        Ok(self.redis_password.clone())
    }

    pub fn load_redis_ca(&self) -> Result<Option<Vec<u8>>, String> {
        match &self.redis_ca_file {
            Some(p) => std::fs::read(p)
                .map(Some)
                .map_err(|e| format!("--redis-ca-file {}: {e}", p.display())),
            None => Ok(None),
        }
    }

    pub fn load_client_hash_key(&self) -> Result<Vec<u8>, String> {
        match &self.client_hash_key_file {
            Some(p) => {
                let k = std::fs::read(p)
                    .map_err(|e| format!("--client-hash-key-file {}: {e}", p.display()))?;
                if k.len() < 16 {
                    return Err("--client-hash-key-file: at least 16 bytes".into());
                }
                Ok(k)
            }
            None => Ok(b"meshlimit client id v1".to_vec()),
        }
    }
}
