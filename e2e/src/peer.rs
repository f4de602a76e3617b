//! A real HTTP server standing where the companion would, answering as a test script
//! says: valid answers of a fixed shape, or every way an answer can go wrong (a status
//! other than 200, garbage, an oversized body, the wrong number of entries, no answer in
//! time). The filter's failure handling is tested against it; what the filter does
//! with real answers is tested against the real companion (`crate::companion`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshlimit_core::protocol::{KeyGrant, StrictAnswer, SyncAnswer, SyncReport};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How the peer answers `POST /v1/sync`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncBehaviour {
    /// A valid answer: every limit of every entry gets `share` (parts per 10⁹).
    Grant {
        share: u32,
        proxies: u32,
        lease_ms: u64,
    },
    /// This status with a JSON error body.
    Status(u16),
    /// A 200 whose body is not JSON.
    Garbage,
    /// A 200 with a valid answer padded past what the filter reads.
    Oversized,
    /// A 200 with one entry more than the report had.
    WrongCount,
    /// Answers nothing for this long, then as `then`.
    Slow(Duration, Box<SyncBehaviour>),
}

/// How the peer answers `POST /v1/strict`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrictBehaviour {
    Allow,
    Refuse { retry_after_ms: u64 },
    Status(u16),
    Garbage,
    Slow(Duration, Box<StrictBehaviour>),
}

/// One request the peer received.
#[derive(Clone, Debug)]
pub struct Received {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

impl Received {
    /// The body as a report (panics if it is not one: the filter sent garbage).
    pub fn report(&self) -> SyncReport {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not a SyncReport ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

struct State {
    sync: Mutex<SyncBehaviour>,
    strict: Mutex<StrictBehaviour>,
    received: Mutex<Vec<Received>>,
    syncs: AtomicU64,
    stricts: AtomicU64,
}

/// The peer, on a free loopback port, on its own runtime thread; stopped on Drop.
pub struct Peer {
    pub port: u16,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl Peer {
    pub fn start(sync: SyncBehaviour, strict: StrictBehaviour) -> Peer {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind peer");
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            sync: Mutex::new(sync),
            strict: Mutex::new(strict),
            received: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            stricts: AtomicU64::new(0),
        });
        let server = state.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("peer-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("peer runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).unwrap();
                    tokio::select! {
                        _ = serve(listener, server) => {}
                        _ = stopped => {}
                    }
                });
                rt.shutdown_background();
            })
            .expect("spawn peer thread");
        Peer {
            port,
            state,
            _stop: stop,
        }
    }

    pub fn set_sync(&self, b: SyncBehaviour) {
        *self.state.sync.lock().unwrap() = b;
    }

    pub fn set_strict(&self, b: StrictBehaviour) {
        *self.state.strict.lock().unwrap() = b;
    }

    /// Syncs received so far.
    pub fn syncs(&self) -> u64 {
        self.state.syncs.load(Ordering::SeqCst)
    }

    pub fn stricts(&self) -> u64 {
        self.state.stricts.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The reports received so far.
    pub fn reports(&self) -> Vec<SyncReport> {
        (self.received().iter())
            .filter(|r| r.path == "/v1/sync")
            .map(Received::report)
            .collect()
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
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

fn respond(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let authorization = (req.headers().get("authorization"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    state.received.lock().unwrap().push(Received {
        path: path.clone(),
        authorization,
        body: body.clone(),
    });
    match path.as_str() {
        "/v1/sync" => {
            state.syncs.fetch_add(1, Ordering::SeqCst);
            let b = state.sync.lock().unwrap().clone();
            Ok(answer_sync(b, &body).await)
        }
        "/v1/strict" => {
            state.stricts.fetch_add(1, Ordering::SeqCst);
            let b = state.strict.lock().unwrap().clone();
            Ok(answer_strict(b).await)
        }
        "/healthz" => Ok(respond(200, "ok")),
        _ => Ok(respond(
            404,
            r#"{"error":"not_found","detail":"no such path"}"#,
        )),
    }
}

async fn answer_sync(mut b: SyncBehaviour, body: &[u8]) -> Response<Full<Bytes>> {
    while let SyncBehaviour::Slow(d, then) = b {
        tokio::time::sleep(d).await;
        b = *then;
    }
    let report: Option<SyncReport> = serde_json::from_slice(body).ok();
    let entries = report.as_ref().map_or(0, |r| r.entries.len());
    let grants = |share: u32| -> Vec<KeyGrant> {
        (report.iter())
            .flat_map(|r| r.entries.iter())
            .map(|e| KeyGrant {
                shares: vec![share; e.limits.len()],
                pending: false,
                used: Vec::new(),
            })
            .collect()
    };
    match b {
        SyncBehaviour::Grant {
            share,
            proxies,
            lease_ms,
        } => {
            let a = SyncAnswer {
                entries: grants(share),
                proxies,
                lease_ms,
                degraded: false,
            };
            respond(200, serde_json::to_vec(&a).unwrap())
        }
        SyncBehaviour::Status(s) => {
            respond(s, r#"{"error":"scripted","detail":"scripted status"}"#)
        }
        SyncBehaviour::Garbage => respond(200, "<html>not an answer</html>"),
        SyncBehaviour::Oversized => {
            let a = SyncAnswer {
                entries: grants(1),
                proxies: 2,
                lease_ms: 60_000,
                degraded: false,
            };
            let mut v = serde_json::to_vec(&a).unwrap();
            // White space after the document: valid JSON, just too much of it.
            v.resize(meshlimit_core::protocol::MAX_ANSWER_BYTES + 1024, b' ');
            respond(200, v)
        }
        SyncBehaviour::WrongCount => {
            let mut g = grants(1);
            g.push(KeyGrant {
                shares: vec![1],
                pending: false,
                used: Vec::new(),
            });
            let a = SyncAnswer {
                entries: g,
                proxies: 2,
                lease_ms: 60_000,
                degraded: false,
            };
            let _ = entries;
            respond(200, serde_json::to_vec(&a).unwrap())
        }
        SyncBehaviour::Slow(..) => unreachable!("unwrapped above"),
    }
}

async fn answer_strict(mut b: StrictBehaviour) -> Response<Full<Bytes>> {
    while let StrictBehaviour::Slow(d, then) = b {
        tokio::time::sleep(d).await;
        b = *then;
    }
    let answer = |allowed: bool, retry_after_ms: u64| StrictAnswer {
        allowed,
        tightest: 0,
        remaining: u64::from(allowed),
        reset_ms: 1000,
        retry_after_ms,
    };
    match b {
        StrictBehaviour::Allow => respond(200, serde_json::to_vec(&answer(true, 0)).unwrap()),
        StrictBehaviour::Refuse { retry_after_ms } => respond(
            200,
            serde_json::to_vec(&answer(false, retry_after_ms)).unwrap(),
        ),
        StrictBehaviour::Status(s) => {
            respond(s, r#"{"error":"scripted","detail":"scripted status"}"#)
        }
        StrictBehaviour::Garbage => respond(200, "{\"allowed\":"),
        StrictBehaviour::Slow(..) => unreachable!("unwrapped above"),
    }
}
