//! A small HTTP client for the integration tests and the bench command
//! (`src/bin/bench.rs` includes this file), on hyper with a keep-alive connection pool.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

impl Client {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
            http: HyperClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(256)
                .build(conn),
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Self {
        Client {
            token: token.map(str::to_string),
            ..self.clone()
        }
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        self.request_with(method, path, &[], body).await
    }

    /// A request with `headers` added; a `content-type` or `authorization` among them
    /// replaces the default one (JSON, and the client's token).
    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Reply, String> {
        let has = |name: &str| headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(name));
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if !has("content-type") {
            b = b.header("content-type", "application/json");
        }
        if let (Some(t), false) = (&self.token, has("authorization")) {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (h, v) in headers {
            b = b.header(*h, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, String> {
        self.request(Method::GET, path, None).await
    }

    pub async fn post_json(&self, path: &str, v: &serde_json::Value) -> Result<Reply, String> {
        self.request(
            Method::POST,
            path,
            Some(serde_json::to_vec(v).unwrap_or_default()),
        )
        .await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Result<Reply, String> {
        self.request(Method::POST, path, Some(body)).await
    }

    pub async fn put_raw(&self, path: &str, body: Vec<u8>) -> Result<Reply, String> {
        self.request(Method::PUT, path, Some(body)).await
    }
}
