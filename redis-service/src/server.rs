//! The server: [`run`] serves a [`Service`] on a listener until told to stop, then
//! drains and shuts the service down. The accept loop serves HTTP/1.1 connections with
//! hyper, with the limits a service exposed to hostile clients needs, and a graceful
//! shutdown that a stalled client cannot hold up.
//!
//! - **Header read timeout**: a connection must deliver a complete request head within
//!   `header_timeout` of being ready for one (just accepted, or the previous response
//!   sent); otherwise hyper closes it. This bounds a slowloris (a header sent a byte at
//!   a time) and an idle keep-alive connection alike.
//! - **Connections**: at most `max_connections` at once. One more is accepted, told
//!   `503` with an `ErrorBody`, and closed at once, so that a client learns it was
//!   refused instead of waiting in the kernel's backlog behind connections that may
//!   take a whole header timeout to go away.
//! - **Header size**: a request head (request line and headers) larger than
//!   `MAX_HEAD_BYTES` is refused by hyper (431, connection closed) rather than buffered.
//! - **Shutdown**: when `shutdown` resolves, no new connection is accepted, connections
//!   with no request in the application (idle, or a head still arriving) are closed at
//!   once, and in-flight requests get `grace` to finish and be answered.
//!
//! axum's own `serve` has no header read timeout, hence this loop.

use crate::auth::Auth;
use crate::config::Config;
use crate::http::{router, AppState};
use crate::service::Service;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

/// Largest request head (request line and headers) read, bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How the server treats its clients.
#[derive(Clone)]
pub struct Options {
    /// The bearer token every endpoint but the health checks requires.
    pub auth: Auth,
    pub limits: Limits,
    /// Longest a client may take to send a request body.
    pub body_timeout: Duration,
    /// Reports (`/v1/sync`) handled at once.
    pub max_reports_in_flight: usize,
    /// The runtime reports are parsed and run on (`None`: the serving one).
    pub reports: Option<tokio::runtime::Handle>,
}

impl Options {
    /// What `cfg` asks for (reading the token file it names).
    pub fn from_config(
        cfg: &Config,
        reports: Option<tokio::runtime::Handle>,
    ) -> Result<Self, String> {
        Ok(Options {
            auth: Auth::new(cfg.load_token()?.as_deref()),
            limits: Limits {
                header_timeout: Duration::from_millis(cfg.header_timeout_ms),
                max_connections: cfg.max_connections,
                grace: Duration::from_secs(cfg.shutdown_grace_secs),
            },
            body_timeout: Duration::from_millis(cfg.body_timeout_ms),
            max_reports_in_flight: cfg.max_reports_in_flight,
            reports,
        })
    }
}

/// Connection limits of the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// How long in-flight requests may still run after the shutdown signal.
    pub grace: Duration,
}

/// Serves `service` on `listener` until `shutdown` resolves; then lets in-flight
/// requests finish (within the grace period) and shuts the service down (its probe
/// stopped, what it owes the store written one last time).
pub async fn run(
    listener: TcpListener,
    service: Arc<Service>,
    options: Options,
    shutdown: impl Future<Output = ()>,
) {
    let app = router(AppState {
        svc: service.clone(),
        auth: options.auth,
        reports: options.reports,
        body_timeout: options.body_timeout,
        reports_in_flight: Arc::new(Semaphore::new(options.max_reports_in_flight)),
    });
    let limits = options.limits;
    let drained = serve(listener, app, limits, async {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await;
    if !drained {
        tracing::warn!("in-flight requests still running after {:?}", limits.grace);
    }
    service.shutdown().await;
}

/// Counts a connection's requests from the moment the application has them until their
/// response body is dropped (sent or abandoned).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains. Returns true when
/// every connection was done within the grace period.
async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // `stop` tells every connection to wind down; each holds a `done` sender, so the
    // channel closes when the last one has gone (the shape of tokio mini-redis).
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let sock = tokio::select! {
            r = listener.accept() => match r {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of file descriptors and the like: wait for some to close
                    // instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refuse(sock, limits.max_connections);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let app = TowerToHyperService::new(app.clone());
        let counted = in_flight.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::enter(&counted);
            let response = hyper::service::Service::call(&app, req);
            async move {
                let r = response.await?;
                // The guard lives as long as the response body.
                Ok::<_, std::convert::Infallible>(r.map(move |b| {
                    axum::body::Body::new(b.map_frame(move |f| {
                        let _ = &guard;
                        f
                    }))
                }))
            }
        });
        let conn = http.serve_connection(TokioIo::new(sock), service);
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let _done = done;
            let _permit = permit;
            tokio::pin!(conn);
            tokio::select! {
                // Errors here are the client's (a reset, a header timeout).
                _ = conn.as_mut() => return,
                _ = stop.changed() => {}
            }
            // Nothing in flight (idle, or a request head still arriving): nothing is
            // owed to this client, close now. hyper's own graceful shutdown would wait
            // for a head that may never come.
            if in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_tx);
    tokio::time::timeout(limits.grace, done_rx.recv())
        .await
        .is_ok()
}

/// Tells a connection over the limit why, without waiting on it: a fresh socket's send
/// buffer takes the few bytes at once, and a client that cannot take them loses nothing
/// it was promised.
fn refuse(sock: TcpStream, limit: usize) {
    let body =
        format!(r#"{{"error":"overloaded","detail":"too many connections (at most {limit})"}}"#);
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.try_write(resp.as_bytes());
    tracing::debug!("connection refused: {limit} open");
}
