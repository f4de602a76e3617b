//! HTTP/2 over cleartext (h2c, prior knowledge) for tests: Envoy's listener speaks it
//! (`codec_type: AUTO`), and it carries what HTTP/1 cannot, e.g. a lower-case `:method`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A response: status, headers (lower-case names), body.
pub type H2Response = (u16, Vec<(String, String)>, Vec<u8>);

/// One request: method, path, headers.
pub type H2Request<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);

/// Sends `requests` (method, path, headers) one after another on one HTTP/2 connection
/// to `127.0.0.1:port` and returns the responses in order.
pub fn send_h2(port: u16, requests: &[H2Request<'_>]) -> Vec<H2Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("h2 runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect h2c");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        let mut out = Vec::new();
        for (method, path, headers) in requests {
            let method = Method::from_bytes(method.as_bytes()).expect("a method token");
            let mut req = Request::builder()
                .method(method)
                .uri(format!("http://127.0.0.1:{port}{path}"));
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req.body(Empty::<Bytes>::new()).expect("request");
            let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
                .await
                .expect("h2 response in time")
                .expect("h2 response");
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let body = resp
                .into_body()
                .collect()
                .await
                .expect("h2 body")
                .to_bytes()
                .to_vec();
            out.push((status, headers, body));
        }
        out
    })
}
