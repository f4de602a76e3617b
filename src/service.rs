//! The companion service as this VM calls it: the `service` block with its token read
//! and this proxy's identity filled in, ready to put on a callout.

use std::time::Duration;

use meshlimit_core::config::{ConfigError, Service};

use crate::host;

/// Everything a callout to the companion needs, resolved once per configuration.
pub struct Companion {
    pub cluster: String,
    pub authority: String,
    /// `Bearer <token>`.
    pub authorization: String,
    /// The configured (or Envoy's) id, without the per-start nonce.
    pub proxy_id: String,
    pub zone: String,
    /// The strict check's deadline (`timeout_ms`): it holds a request.
    pub timeout: Duration,
    /// A report's deadline: half the interval, and never less than `timeout_ms`. Reports
    /// are off the request path and can be large (thousands of new keys at once); a
    /// deadline as tight as a strict check's would fail them, and each failed report
    /// comes back larger.
    pub sync_timeout: Duration,
    pub interval: Duration,
    pub fallback_share: Option<u32>,
}

impl Companion {
    /// Reads the token (a VM environment variable, if so configured) and Envoy's node
    /// id and zone; any of them missing is a configuration refusal.
    pub fn resolve(service: &Service) -> Result<Companion, ConfigError> {
        let token = service.resolve_token(host::env_var)?;
        let node_id = host::property(&["xds", "node", "id"]);
        let node_zone = host::property(&["xds", "node", "locality", "zone"]);
        let (proxy_id, zone) =
            service.resolve_identity(node_id.as_deref(), node_zone.as_deref())?;
        Ok(Companion {
            cluster: service.cluster.clone(),
            authority: service.authority.clone(),
            authorization: format!("Bearer {token}"),
            proxy_id,
            zone,
            timeout: Duration::from_millis(service.timeout_ms),
            sync_timeout: Duration::from_millis(
                service.timeout_ms.max(service.sync_interval_ms / 2),
            ),
            interval: Duration::from_millis(service.sync_interval_ms),
            fallback_share: service.fallback_share,
        })
    }

    /// Sends `POST path` with a JSON body, answered within `timeout`; the answer comes
    /// to the calling context.
    pub fn post(&self, path: &str, body: &[u8], timeout: Duration) -> Result<u32, ()> {
        let headers = vec![
            (":method", "POST"),
            (":path", path),
            (":authority", self.authority.as_str()),
            ("content-type", "application/json"),
            ("authorization", self.authorization.as_str()),
        ];
        host::dispatch_http_call(&self.cluster, headers, body, timeout)
    }
}
