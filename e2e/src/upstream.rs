//! The demo upstream: a small HTTP/1.1 server that answers every request 200 with a short
//! JSON body and counts what it served, so tests can tell how many requests got through
//! Envoy. Used in-process by the harness ([`Upstream`]) and by the `demo-upstream` binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::netns::Netns;

/// What the server remembers; shared between the connections and the harness.
#[derive(Default)]
pub struct UpstreamState {
    hits: AtomicU64,
    /// Headers of the last counted request (name lower-case, value as received).
    last_headers: Mutex<Vec<(String, Vec<u8>)>>,
}

impl UpstreamState {
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Accepts connections forever. `GET /__hits` answers the number of requests served
/// (not counting `/__hits` itself); every other request is counted and answered
/// `{"upstream":"ok","path":...,"method":...}`.
pub async fn serve(listener: TcpListener, state: Arc<UpstreamState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Without this a small response can wait ~40 ms for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<UpstreamState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.uri().path() == "/__hits" {
        state.hits().to_string()
    } else {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        *state.last_headers.lock().unwrap() = headers;
        state.hits.fetch_add(1, Ordering::SeqCst);
        serde_json::json!({
            "upstream": "ok",
            "path": req.uri().path(),
            "method": req.method().as_str(),
        })
        .to_string()
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// The demo upstream running in this process, on its own runtime thread; stopped on Drop.
pub struct Upstream {
    pub port: u16,
    state: Arc<UpstreamState>,
    _stop: oneshot::Sender<()>,
}

impl Upstream {
    /// Starts on a free loopback port.
    pub fn start() -> Upstream {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind upstream");
        Upstream::serve_on(std_listener)
    }

    /// Starts on a free port of the loopback inside a network namespace: the listener is
    /// made there, so it serves that namespace (an AZ's local backend) from this process.
    pub fn start_in(netns: &Netns) -> Upstream {
        let std_listener = netns
            .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap_or_else(|e| panic!("bind upstream in {}: {e}", netns.name()));
        Upstream::serve_on(std_listener)
    }

    fn serve_on(std_listener: std::net::TcpListener) -> Upstream {
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let state = Arc::new(UpstreamState::default());
        let server_state = state.clone();
        // Dropping the sender (with the Upstream) ends block_on, and dropping the runtime
        // closes the listener and every connection.
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("upstream-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("upstream runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    tokio::select! {
                        _ = serve(listener, server_state) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("spawn upstream thread");
        Upstream {
            port,
            state,
            _stop: stop,
        }
    }

    /// Requests served so far (what got through Envoy).
    pub fn hits(&self) -> u64 {
        self.state.hits()
    }

    /// Headers of the last request that reached the upstream, to check what Envoy and
    /// the filter forwarded.
    pub fn last_headers(&self) -> Vec<(String, Vec<u8>)> {
        self.state.last_headers.lock().unwrap().clone()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}
