//! Proves the harness: a request passes through Envoy and the filter to the upstream,
//! and a configuration the filter refuses keeps Envoy from starting.

use meshlimit_e2e::{Envoy, Request, Upstream};

#[test]
fn request_passes_through_envoy_and_filter() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        r#"{"rules":[{"id":"api","match":{"path":"/api/*"},"limits":[{"window":"1m","max":100}]}]}"#,
        &upstream,
    );
    let resp = envoy.send(&Request::get("/api/hello").header("x-api-key", "smoke"));
    assert_eq!(resp.status, 200, "body: {}", resp.body_str());
    let body = resp.json();
    assert_eq!(body["upstream"], "ok");
    assert_eq!(body["path"], "/api/hello");
    assert_eq!(body["method"], "GET");
    assert_eq!(upstream.hits(), 1);
    assert!(envoy.stat("http.ingress.downstream_rq_2xx").unwrap_or(0) >= 1);
}

#[test]
fn refused_config_keeps_envoy_from_starting() {
    let upstream = Upstream::start();
    let err = Envoy::try_start(
        r#"{"rules":[{"id":"a","match":{"path":"/x"},"limits":[{"window":"5x","max":1}]}]}"#,
        &upstream,
    )
    .err()
    .expect("Envoy started with a configuration the filter must refuse");
    assert!(err.contains("Failed to configure"), "log:\n{err}");
}
