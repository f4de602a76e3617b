//! Every proxy-wasm host call the filter makes, and nothing else: the one place where the
//! filter talks to Envoy. [`root`](crate::root), [`http`](crate::http) and
//! [`metrics`](crate::metrics) call these functions; the core reaches shared data only
//! through [`EnvoySharedData`], this crate's one implementation of
//! [`meshlimit_core::host::SharedData`].
//!
//! Each function is one host call (the request path counts them: README, "Host calls per
//! request"). Failures the filter has no use for read as absent values; the SDK panics on
//! statuses it does not expect (for shared data: any but ok, not found and CAS
//! mismatch). Log lines go through the `log` crate, which
//! the SDK hands to Envoy's log.

use std::time::{Duration, UNIX_EPOCH};

use meshlimit_core::host::{Cas, SharedData, SharedDataError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

/// Envoy's shared data of this plugin's `vm_id`: one get or one set per call.
pub struct EnvoySharedData;

impl SharedData for EnvoySharedData {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<Cas>), SharedDataError> {
        hostcalls::get_shared_data(key).map_err(|_| SharedDataError::Other)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> Result<(), SharedDataError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|status| match status {
            Status::CasMismatch => SharedDataError::CasMismatch,
            _ => SharedDataError::Other,
        })
    }
}

// --- the request ----------------------------------------------------------------------

/// The first value of a request header (Envoy's header map answers only the first of a
/// repeated header), or of a pseudo-header such as `:path`.
pub fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

/// Every value of a request header joined with `,`: the `request.headers.<name>`
/// property.
pub fn request_header_joined(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_property(vec!["request", "headers", name])
        .ok()
        .flatten()
}

/// The `source.address` property: the client address Envoy computed, with its port.
pub fn source_address() -> Option<Vec<u8>> {
    hostcalls::get_property(vec!["source", "address"])
        .ok()
        .flatten()
}

/// Envoy's clock in nanoseconds since the Unix epoch (0 if it cannot be read).
pub fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Answers the request from the filter (Envoy then skips the upstream). The handler
/// returns `Action::Pause` after it.
pub fn send_response(status: u32, headers: Vec<(&str, &str)>, body: &[u8]) {
    let _ = hostcalls::send_http_response(status, headers, Some(body));
}

/// Adds a header to the response.
pub fn add_response_header(name: &str, value: &str) {
    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, value);
}

/// Lets a request paused in `on_http_request_headers` go on (after a strict check).
pub fn resume_request() {
    let _ = hostcalls::resume_http_request();
}

// --- callouts to the companion ------------------------------------------------------

/// Sends an HTTP request to an Envoy cluster; its answer arrives in the calling
/// context's `on_http_call_response` with the returned token. `Err` at once when Envoy
/// has no such cluster (or refuses the headers).
pub fn dispatch_http_call(
    cluster: &str,
    headers: Vec<(&str, &str)>,
    body: &[u8],
    timeout: Duration,
) -> Result<u32, ()> {
    hostcalls::dispatch_http_call(cluster, headers, Some(body), Vec::new(), timeout).map_err(|_| ())
}

/// `:status` of the callout answer being delivered (Envoy's own 503 for a refused
/// connection, 504 after the timeout); 0 if it has none or it does not parse.
pub fn http_call_status() -> u32 {
    hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The body of the callout answer being delivered, `size` bytes of it.
pub fn http_call_body(size: usize) -> Vec<u8> {
    hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}

// --- the VM ---------------------------------------------------------------------------

/// The plugin configuration as Envoy holds it (empty when there is none).
pub fn plugin_configuration() -> Vec<u8> {
    hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// A property of the proxy, e.g. `["xds", "node", "id"]` (the bootstrap's `node.id`).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// An environment variable of the VM (Envoy's `vm_config.environment_variables`,
/// Istio's `vmConfig.env`), read through WASI; `None` when unset or not UTF-8.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A random number from the host (WASI `random_get`, through the standard library's
/// hash seeds), for the per-start nonce of this Envoy.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ns());
    h.finish()
}

/// Asks Envoy to call `on_tick` of this VM's root context every `period`.
pub fn set_tick_period(period: Duration) {
    let _ = hostcalls::set_tick_period(period);
}

/// Defines (or finds: the same name gives the same metric) an Envoy counter.
pub fn define_counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

/// Adds `n` to an Envoy counter.
pub fn increment_counter(id: u32, n: u64) {
    let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
}

/// Defines (or finds) an Envoy gauge.
pub fn define_gauge(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Gauge, name).ok()
}

/// Sets an Envoy gauge.
pub fn set_gauge(id: u32, value: u64) {
    let _ = hostcalls::record_metric(id, value);
}
