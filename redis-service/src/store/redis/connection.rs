//! How the store connects: the URL with the ACL user and password laid over it, TLS
//! (a private CA, or the web PKI roots), the connection-level timeouts, the runtime a
//! connection's I/O is driven on, and what a `redis` crate error means for the caller.

use crate::config::Config;
use crate::store::StoreError;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisError, Value,
};
use std::time::Duration;

/// The shortest connection-level bound; requests apply their own deadlines on top.
const MIN_IO_TIMEOUT: Duration = Duration::from_millis(100);

/// The cluster client (the retry path, see `cluster::recovery`): attempts per command
/// after the first, and the wait between them. Short, because the request's deadline
/// bounds all of it anyway.
const CLUSTER_CLIENT_RETRIES: u32 = 3;
const CLUSTER_CLIENT_MIN_RETRY_WAIT_MS: u64 = 20;
const CLUSTER_CLIENT_MAX_RETRY_WAIT_MS: u64 = 200;

#[derive(Clone)]
pub struct RedisOptions {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls_insecure: bool,
    /// PEM of the CA that signed the Redis servers' certificates (private CAs); without
    /// it `rediss://` trusts the usual web PKI roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on one connect / one response at the connection level (the caller also
    /// applies its own, shorter, request deadline).
    pub io_timeout: Duration,
    /// Runtime the report connections are created on, so their I/O
    /// is driven there; `None`: the caller's.
    pub report_runtime: Option<tokio::runtime::Handle>,
    /// Sync entries per script call ([`super::SYNC_CHUNK`] unless measuring).
    pub sync_chunk: usize,
}

impl RedisOptions {
    /// The options `cfg` gives (reading the password and CA files it names).
    pub fn from_config(
        cfg: &Config,
        report_runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Self, String> {
        Ok(RedisOptions {
            username: cfg.redis_username.clone(),
            password: cfg.load_redis_password()?,
            tls_insecure: cfg.redis_tls_insecure,
            ca_pem: cfg.load_redis_ca()?,
            // The connection-level bound must let the biggest batch through; each
            // request has its own, shorter, deadline on top.
            io_timeout: Duration::from_millis(cfg.store_timeout_ms.max(cfg.sync_timeout_ms))
                .max(MIN_IO_TIMEOUT),
            report_runtime,
            sync_chunk: cfg.sync_entries_per_call,
        })
    }
}

/// `url` with the options' user, password and TLS verification laid over it.
pub(super) fn connection_info(url: &str, o: &RedisOptions) -> Result<ConnectionInfo, String> {
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("bad Redis URL: {e}"))?;
    if let Some(u) = &o.username {
        info.redis.username = Some(u.clone());
    }
    if let Some(p) = &o.password {
        info.redis.password = Some(p.clone());
    }
    if o.tls_insecure {
        if let ConnectionAddr::TcpTls { insecure, .. } = &mut info.addr {
            *insecure = true;
        }
    }
    Ok(info)
}

/// The connection info of a cluster node at `host:port`, with `base`'s credentials and
/// TLS settings (the nodes of one cluster share them).
pub(super) fn node_connection_info(base: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match &base.addr {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_string(), port),
    };
    ConnectionInfo {
        addr,
        redis: base.redis.clone(),
    }
}

/// A client for one node, trusting the options' CA for `rediss://`.
pub(super) fn client(info: ConnectionInfo, o: &RedisOptions) -> redis::RedisResult<Client> {
    match (&o.ca_pem, &info.addr) {
        (Some(pem), ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(info, certificates(pem))
        }
        _ => Client::open(info),
    }
}

/// The `redis` crate's cluster client over `seeds`: it follows `MOVED`/`ASK` and waits
/// out `TRYAGAIN` by itself, which is what the retry path needs.
pub(super) fn cluster_client(
    seeds: &[ConnectionInfo],
    o: &RedisOptions,
) -> redis::RedisResult<ClusterClient> {
    let mut b = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(o.io_timeout)
        .response_timeout(o.io_timeout)
        .retries(CLUSTER_CLIENT_RETRIES)
        .min_retry_wait(CLUSTER_CLIENT_MIN_RETRY_WAIT_MS)
        .max_retry_wait(CLUSTER_CLIENT_MAX_RETRY_WAIT_MS);
    if let Some(u) = &o.username {
        b = b.username(u.clone());
    }
    if let Some(p) = &o.password {
        b = b.password(p.clone());
    }
    if o.tls_insecure {
        b = b.danger_accept_invalid_hostnames(true);
    }
    if let Some(pem) = &o.ca_pem {
        b = b.certs(certificates(pem));
    }
    b.build()
}

fn certificates(pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.to_vec()),
    }
}

/// Connect and response timeouts of a multiplexed connection.
pub(super) fn async_config(o: &RedisOptions) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(o.io_timeout)
        .set_response_timeout(o.io_timeout)
}

/// Runs `f` on `rt` (where the connections it creates will be driven) or in place.
pub(super) async fn on_runtime<F>(
    rt: &Option<tokio::runtime::Handle>,
    f: F,
) -> Result<F::Output, StoreError>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match rt {
        Some(h) => h
            .spawn(f)
            .await
            .map_err(|e| StoreError::Unavailable(format!("connect task: {e}"))),
        None => Ok(f.await),
    }
}

/// A timeout is a slow store, a broken or refused connection an unavailable one; the
/// rest (a server's error reply, a refused AUTH) is an answer that failed.
impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_timeout() {
            StoreError::Slow(e.to_string())
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Failed(e.to_string())
        }
    }
}

/// The kind of a server's error reply kept as a value (a pipeline's item), `None` for
/// any other value. (The `redis` crate names the kinds of a `RedisError` only, so the
/// reply is turned into one; that happens only for error replies.)
pub(super) fn error_reply_kind(v: &Value) -> Option<ErrorKind> {
    match v {
        Value::ServerError(e) => Some(RedisError::from(e.clone()).kind()),
        _ => None,
    }
}
