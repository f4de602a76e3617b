//! HTTP routes (axum). Bodies are read by hand (bounded, then parsed with field paths)
//! so every refusal is a JSON `ErrorBody` naming the problem, never axum's plain text.

use crate::auth::Auth;
use crate::service::{ApiError, Service};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use meshlimit_core::protocol::{CheckRequest, ErrorBody, SyncRequest, MAX_BODY_BYTES};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub svc: Arc<Service>,
    pub auth: Auth,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json(
            status,
            &ErrorBody {
                error: self.code.to_string(),
                detail: self.detail,
            },
        )
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/rate-limit/check", post(check))
        .route("/v1/sync", post(sync))
        .route("/rate-limits/rules", put(put_rules))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/healthz",
            get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "ok"})) }),
        )
        // Health endpoints carry no secret and are what orchestrator probes call, which
        // do not hold the token.
        .route("/readyz", get(readyz))
        .merge(protected)
        .fallback(|| async { ApiError::new(404, "not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !st.auth.allows(h) {
        let mut r = ApiError::new(
            401,
            "unauthorized",
            "Authorization: Bearer <token> missing or wrong",
        )
        .into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

async fn count_requests(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint: &'static str = match req.uri().path() {
        "/rate-limit/check" => "check",
        "/v1/sync" => "sync",
        "/rate-limits/rules" => "rules",
        "/metrics" => "metrics",
        "/readyz" => "readyz",
        "/healthz" => "healthz",
        _ => "other",
    };
    let r = next.run(req).await;
    st.svc.metrics.request(endpoint, r.status().as_u16());
    r
}

/// Reads at most `MAX_BODY_BYTES` and parses it, naming the offending field.
async fn body_json<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = read_body(body).await?;
    parse_json(&bytes)
}

async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "payload_too_large",
                format!("body: larger than {MAX_BODY_BYTES} bytes"),
            )
        })
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let detail = if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        };
        ApiError::new(400, "bad_request", detail)
    })
}

async fn check(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body: CheckRequest = body_json(req.into_body()).await?;
    let r = st.svc.check(&body).await?;
    // 200 whether allowed or not: the decision is the payload. The headers are the ones a
    // gateway would copy to its client.
    let mut resp = json(StatusCode::OK, &r);
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", r.limit.into());
    h.insert("x-ratelimit-remaining", r.remaining.into());
    h.insert("x-ratelimit-reset", r.reset_at.into());
    if let Some(s) = r.retry_after {
        h.insert(header::RETRY_AFTER, s.into());
    }
    Ok(resp)
}

async fn sync(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body: SyncRequest = body_json(req.into_body()).await?;
    let r = st.svc.sync(&body).await?;
    Ok(json(StatusCode::OK, &r))
}

async fn put_rules(State(st): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let bytes = read_body(req.into_body()).await?;
    // Validated whole before anything changes; one error refuses the whole set.
    let rules = meshlimit_core::config::parse_rules(&bytes)
        .map_err(|e| ApiError::new(400, "invalid_rules", e.to_string()))?;
    let n = st.svc.replace_rules(rules);
    tracing::info!("rules replaced: {n} rules");
    Ok(json(StatusCode::OK, &serde_json::json!({ "rules": n })))
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut r = Response::new(Body::from(st.svc.render_metrics()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

async fn readyz(State(st): State<AppState>) -> Response {
    let store = st.svc.store.name();
    match st.svc.ready().await {
        Ok(()) => json(
            StatusCode::OK,
            &serde_json::json!({"ready": true, "store": store, "degraded": false}),
        ),
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({
                "ready": false,
                "store": store,
                "degraded": st.svc.fallback.is_degraded(),
                "detail": e,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse_json::<CheckRequest>(br#"{"client_id":"a","rule_id":5}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.detail.starts_with("rule_id:"), "{}", e.detail);
        let e = parse_json::<SyncRequest>(br#"{"proxy_id":"p","span_ms":1,"entries":[{"rule":"r","key":"k","window_secs":1,"max":1,"admitted":-3}]}"#).unwrap_err();
        assert!(e.detail.starts_with("entries[0].admitted:"), "{}", e.detail);
    }
}
