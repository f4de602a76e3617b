//! HTTP routes (axum). Bodies go through one extractor, [`StrictJson`], so every
//! refusal is a JSON `ErrorBody` naming the problem, and every other 4xx/5xx (a wrong
//! method, an unknown path, ...) is given one by [`json_errors`] on the way out.

use crate::auth::Auth;
use crate::service::{ApiError, Service};
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use meshlimit_core::protocol::{CheckRequest, ErrorBody, SyncRequest, MAX_BODY_BYTES};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct AppState {
    pub svc: Arc<Service>,
    pub auth: Auth,
    /// Where `/v1/sync` reports are parsed and run: a runtime of their own, so that a
    /// 10 000-entry report's CPU work (JSON, key hashing, building script calls) never
    /// sits on a worker that has checks waiting. `None` runs them in place (tests).
    pub reports: Option<tokio::runtime::Handle>,
    /// Longest a client may take to send a request body.
    pub body_timeout: Duration,
    /// Reports being read or run at once; one more is answered 503 before its body is
    /// read, so reports that come faster than the store takes them do not pile up (in
    /// memory, and in front of each other past their deadlines).
    pub reports_in_flight: Arc<tokio::sync::Semaphore>,
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
    json_bytes(
        status,
        serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec()),
    )
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
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
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Gives every 4xx/5xx that is not already JSON (axum's own 405, anything a layer
/// answers) the `ErrorBody` shape, keeping its status and headers.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let r = next.run(req).await;
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let (mut parts, _) = r.into_parts();
    let detail = match status {
        // axum adds the `Allow` header outside this layer.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("{path}: method {method} not allowed (the Allow header lists those that are)")
        }
        s => format!("{path}: {}", s.canonical_reason().unwrap_or("error")),
    };
    let body = ErrorBody {
        error: error_code(status).to_string(),
        detail,
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Response::from_parts(parts, Body::from(bytes))
}

/// The `error` code of a status the service does not answer with a code of its own.
fn error_code(s: StatusCode) -> &'static str {
    match s.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        431 => "headers_too_large",
        500 => "internal",
        503 => "unavailable",
        s if s < 500 => "client_error",
        _ => "server_error",
    }
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // Two Authorization headers are refused outright: which one a proxy in front of us
    // would have checked or forwarded is anyone's guess.
    let mut all = req.headers().get_all(header::AUTHORIZATION).iter();
    let h = match (all.next(), all.next()) {
        (Some(v), None) => Some(v.as_bytes()),
        _ => None,
    };
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

/// A request body that is one JSON object: `Content-Type: application/json`, at most
/// `MAX_BODY_BYTES`, sent within the body timeout, an object at the top (not an array,
/// not a bare value) and nothing but whitespace after it. The bytes are kept for a
/// parser of its own (the rules) or a typed parse elsewhere ([`parse_strict`]).
pub struct JsonObject(pub Bytes);

/// A body parsed strictly into `T`: everything [`JsonObject`] checks, then `T`'s own
/// rules (the wire types refuse unknown and duplicate fields, and arrays in place of
/// objects), every error naming the field.
pub struct StrictJson<T>(pub T);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        require_json_content_type(req.headers())?;
        let body = req.into_body();
        let bytes =
            match tokio::time::timeout(st.body_timeout, axum::body::to_bytes(body, MAX_BODY_BYTES))
                .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(_)) => {
                    return Err(ApiError::new(
                        413,
                        "payload_too_large",
                        format!("body: larger than {MAX_BODY_BYTES} bytes"),
                    ))
                }
                Err(_) => {
                    return Err(ApiError::new(
                        408,
                        "request_timeout",
                        format!("body: not received within {:?}", st.body_timeout),
                    ))
                }
            };
        check_one_object(&bytes)?;
        Ok(JsonObject(bytes))
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &AppState) -> Result<Self, ApiError> {
        let JsonObject(bytes) = JsonObject::from_request(req, st).await?;
        parse_strict(&bytes).map(StrictJson)
    }
}

/// `application/json`, parameters (`; charset=utf-8`) allowed. Requiring it also keeps
/// browsers from posting here cross-origin without a preflight.
fn require_json_content_type(h: &HeaderMap) -> Result<(), ApiError> {
    let ok = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            415,
            "unsupported_media_type",
            "content-type: must be application/json",
        ))
    }
}

/// One JSON object and nothing after it (whitespace aside); see
/// [`meshlimit_core::json::check_one_object`].
fn check_one_object(bytes: &[u8]) -> Result<(), ApiError> {
    meshlimit_core::json::check_one_object(bytes).map_err(|d| ApiError::new(400, "bad_request", d))
}

/// Parses one JSON document into `T`, naming the offending field; trailing bytes are an
/// error. See [`meshlimit_core::json::parse`].
pub fn parse_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    meshlimit_core::json::parse(bytes).map_err(|d| ApiError::new(400, "bad_request", d))
}

async fn check(
    State(st): State<AppState>,
    StrictJson(body): StrictJson<CheckRequest>,
) -> Result<Response, ApiError> {
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
    let Ok(permit) = st.reports_in_flight.clone().try_acquire_owned() else {
        let mut r = ApiError::new(
            503,
            "overloaded",
            "too many reports in progress; send this one's counts with the next report",
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(r);
    };
    let JsonObject(bytes) = JsonObject::from_request(req, &st).await?;
    let svc = st.svc.clone();
    let work = async move {
        let _permit = permit;
        let req: SyncRequest = parse_strict(&bytes)?;
        let r = svc.sync(&req).await?;
        Ok::<_, ApiError>(serde_json::to_vec(&r).unwrap_or_default())
    };
    let body = match &st.reports {
        Some(rt) => rt
            .spawn(work)
            .await
            .map_err(|e| ApiError::new(500, "internal", format!("report task: {e}")))??,
        None => work.await?,
    };
    Ok(json_bytes(StatusCode::OK, body))
}

async fn put_rules(
    State(st): State<AppState>,
    JsonObject(bytes): JsonObject,
) -> Result<Response, ApiError> {
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
        let e = parse_strict::<CheckRequest>(br#"{"client_id":"a","rule_id":5}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.detail.starts_with("rule_id:"), "{}", e.detail);
        let e = parse_strict::<SyncRequest>(br#"{"proxy_id":"p","span_ms":1,"entries":[{"rule":"r","key":"k","window_secs":1,"max":1,"admitted":-3}]}"#).unwrap_err();
        assert!(e.detail.starts_with("entries[0].admitted:"), "{}", e.detail);
    }

    #[test]
    fn one_object_and_nothing_after_it() {
        let ok = br#" {"client_id":"a","rule_id":"r"} "#;
        assert!(check_one_object(ok).is_ok());
        assert!(parse_strict::<CheckRequest>(ok).is_ok());
        for bad in [
            &br#"{"client_id":"a","rule_id":"r"} {"client_id":"b","rule_id":"r"}"#[..],
            br#"{"client_id":"a","rule_id":"r"}x"#,
            br#"{"client_id":"a","rule_id":"r"},"hits":5}"#,
            br#"{"client_id":"a","rule_id":"r"}]"#,
        ] {
            let e = parse_strict::<CheckRequest>(bad).unwrap_err();
            assert!(e.detail.contains("trailing characters"), "{e:?}");
            let e = check_one_object(bad).unwrap_err();
            assert!(e.detail.contains("trailing characters"), "{e:?}");
        }
        for bad in [&b"[]"[..], b"[{\"rules\":[]}]", b"\"x\"", b"1", b"", b"  "] {
            let e = check_one_object(bad).unwrap_err();
            assert_eq!(e.detail, "body: must be one JSON object", "{bad:?}");
        }
        let e = parse_strict::<CheckRequest>(br#"["a","r",1]"#).unwrap_err();
        assert!(e.detail.contains("invalid type: sequence"), "{e:?}");
    }

    #[test]
    fn content_type_must_be_json() {
        let mut h = HeaderMap::new();
        assert_eq!(require_json_content_type(&h).unwrap_err().status, 415);
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ok));
            assert!(require_json_content_type(&h).is_ok(), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "multipart/form-data",
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(bad));
            assert_eq!(
                require_json_content_type(&h).unwrap_err().status,
                415,
                "{bad}"
            );
        }
    }
}
