//! A real HTTP server standing where the companion would, answering as a test script
//! says: valid answers of a fixed shape, or every way an answer can go wrong (a status
//! other than 200, garbage, an oversized body, the wrong number of entries, no answer in
//! time). The filter's failure handling is tested against it.
//!
//! It can also answer as a *reference companion* built from the core's own parts: the
//! share allocation `meshlimit_core::shares::allocate_detailed` per (rule, key, limit)
//! with a registry of live proxies ([`SyncBehaviour::Allocate`]), and one exact GCRA
//! (`meshlimit_core::gcra::check`) per strict key behind a lock
//! ([`StrictBehaviour::Exact`]). That is the allocation the companion's Rust and Lua
//! stores implement (their parity is tested in `redis-service/`), so the filter's sync
//! loop, grants and strict path can be measured end to end through real Envoys here;
//! the same scenarios against the `meshlimit-service` binary run in its own tests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use meshlimit_core::gcra;
use meshlimit_core::protocol::{KeyGrant, StrictAnswer, StrictRequest, SyncAnswer, SyncReport};
use meshlimit_core::shares::{self, Peer as SharePeer, ShareParams};
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
    /// Allocates shares as the companion does (`shares::allocate_detailed` with the
    /// default parameters, proxies live for 3 of their intervals after each report),
    /// with this lease.
    Allocate { lease_ms: u64 },
}

/// How the peer answers `POST /v1/strict`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StrictBehaviour {
    Allow,
    Refuse {
        retry_after_ms: u64,
    },
    Status(u16),
    Garbage,
    Slow(Duration, Box<StrictBehaviour>),
    /// Decides each check with one exact GCRA per (rule, key) on the peer's clock,
    /// under one lock: atomic, as the companion's store is.
    Exact,
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
    started: Instant,
    allocator: Mutex<Allocator>,
    /// `tat`s per (rule, key) of [`StrictBehaviour::Exact`].
    strict_tats: Mutex<HashMap<(String, String), Vec<u64>>>,
}

/// The reference companion's state: one share record per (rule, key, limit index) and
/// when each proxy last reported (it is live for 3 of its intervals after that).
#[derive(Default)]
struct Allocator {
    records: HashMap<(String, String, usize), Vec<SharePeer<String>>>,
    seen: HashMap<String, (u64, u64)>,
}

impl Allocator {
    fn answer(&mut self, report: &SyncReport, now_ms: u64, lease_ms: u64) -> SyncAnswer {
        self.seen
            .insert(report.proxy_id.clone(), (now_ms, report.interval_ms));
        let seen = &self.seen;
        let is_live = |p: &String| seen.get(p).is_some_and(|&(t, i)| now_ms < t + 3 * i);
        let proxies = seen.values().filter(|&&(t, i)| now_ms < t + 3 * i).count() as u32;
        let params = ShareParams {
            lease_ms,
            ..ShareParams::default()
        };
        let entries = (report.entries.iter())
            .map(|e| {
                let mut grant = KeyGrant {
                    shares: Vec::with_capacity(e.limits.len()),
                    pending: false,
                    used: Vec::new(),
                };
                for (i, l) in e.limits.iter().enumerate() {
                    let peers = (self.records)
                        .entry((e.rule.clone(), e.key.clone(), i))
                        .or_default();
                    if e.release {
                        shares::release(peers, &report.proxy_id);
                        grant.shares.push(0);
                        continue;
                    }
                    let r = shares::Report {
                        hits: e.admitted + e.rejected,
                        max: l.max,
                        window_ms: l.window_secs * 1000,
                        first_span_ms: e.span_ms,
                        interval_ms: report.interval_ms,
                    };
                    let a = shares::allocate_detailed(
                        peers,
                        &report.proxy_id,
                        &r,
                        now_ms,
                        is_live,
                        &params,
                    );
                    grant.shares.push(a.grant);
                    grant.pending |= a.pending();
                }
                grant
            })
            .collect();
        SyncAnswer {
            entries,
            proxies: proxies.max(1),
            lease_ms,
            degraded: false,
        }
    }
}

/// The peer, on a free loopback port, on its own runtime thread; stopped on Drop.
pub struct Peer {
    pub port: u16,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl Peer {
    pub fn start(sync: SyncBehaviour, strict: StrictBehaviour) -> Peer {
        Peer::start_on(0, sync, strict)
    }

    /// On `port` (0: a free one): a peer started again where a dropped one listened
    /// stands for a companion that came back.
    pub fn start_on(port: u16, sync: SyncBehaviour, strict: StrictBehaviour) -> Peer {
        // SO_REUSEADDR: the connections a dropped peer closed linger in TIME_WAIT on
        // this port.
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("peer socket");
        socket.set_reuse_address(true).unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        socket.bind(&addr.into()).expect("bind peer");
        socket.listen(1024).expect("listen");
        let std_listener: std::net::TcpListener = socket.into();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            sync: Mutex::new(sync),
            strict: Mutex::new(strict),
            received: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            stricts: AtomicU64::new(0),
            started: Instant::now(),
            allocator: Mutex::new(Allocator::default()),
            strict_tats: Mutex::new(HashMap::new()),
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
            Ok(answer_sync(b, &body, &state).await)
        }
        "/v1/strict" => {
            state.stricts.fetch_add(1, Ordering::SeqCst);
            let b = state.strict.lock().unwrap().clone();
            Ok(answer_strict(b, &body, &state).await)
        }
        "/healthz" => Ok(respond(200, "ok")),
        _ => Ok(respond(
            404,
            r#"{"error":"not_found","detail":"no such path"}"#,
        )),
    }
}

async fn answer_sync(mut b: SyncBehaviour, body: &[u8], state: &State) -> Response<Full<Bytes>> {
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
        SyncBehaviour::Allocate { lease_ms } => {
            let Some(report) = report.filter(|r| r.validate().is_ok()) else {
                return respond(400, r#"{"error":"invalid_body","detail":"not a report"}"#);
            };
            let now_ms = state.started.elapsed().as_millis() as u64;
            let a = (state.allocator.lock().unwrap()).answer(&report, now_ms, lease_ms);
            respond(200, serde_json::to_vec(&a).unwrap())
        }
        SyncBehaviour::Slow(..) => unreachable!("unwrapped above"),
    }
}

/// One exact decision for a strict check, as the companion's store makes it.
fn decide_exactly(req: &StrictRequest, state: &State) -> StrictAnswer {
    let limits: Vec<_> = (req.limits.iter())
        .map(|l| l.limit().expect("the filter sent a valid limit"))
        .collect();
    let now = state.started.elapsed().as_nanos() as u64 + 1;
    let mut tats = state.strict_tats.lock().unwrap();
    let t =
        (tats.entry((req.rule.clone(), req.key.clone()))).or_insert_with(|| vec![0; limits.len()]);
    let d = gcra::check(&limits, t, now, req.hits);
    let ms = |ns: u64| ns.div_ceil(1_000_000);
    StrictAnswer {
        allowed: d.allowed,
        tightest: d.tightest,
        remaining: d.remaining,
        reset_ms: ms(d.reset_ns),
        retry_after_ms: ms(d.retry_after_ns),
    }
}

async fn answer_strict(
    mut b: StrictBehaviour,
    body: &[u8],
    state: &State,
) -> Response<Full<Bytes>> {
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
        StrictBehaviour::Exact => {
            let req = serde_json::from_slice::<StrictRequest>(body).ok();
            let Some(req) = req.filter(|r| r.validate().is_ok()) else {
                return respond(400, r#"{"error":"invalid_body","detail":"not a check"}"#);
            };
            respond(
                200,
                serde_json::to_vec(&decide_exactly(&req, state)).unwrap(),
            )
        }
        StrictBehaviour::Slow(..) => unreachable!("unwrapped above"),
    }
}
