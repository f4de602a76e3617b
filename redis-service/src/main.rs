//! meshlimit-service: wiring only (see the library modules for the parts).

use clap::Parser;
use meshlimit_service::auth::Auth;
use meshlimit_service::config::Config;
use meshlimit_service::fallback::Fallback;
use meshlimit_service::http::{router, AppState};
use meshlimit_service::keys::KeyMaker;
use meshlimit_service::server::{self, Limits};
use meshlimit_service::service::Service;
use meshlimit_service::store::memory::MemoryStore;
use meshlimit_service::store::redis::{RedisOptions, RedisStore};
use meshlimit_service::store::Store;
use std::sync::Arc;
use std::time::Duration;

/// Keys the embedded store (and the fallback) keep at most.
const MEMORY_MAX_KEYS: usize = 4_000_000;

fn main() {
    let cfg = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ML_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,redis=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // rediss:// goes through rustls; pick its crypto provider once for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = cfg.validate() {
        eprintln!("meshlimit-service: {e}");
        std::process::exit(2);
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cfg.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().expect("tokio runtime");
    // Reports get threads of their own (see `AppState::reports`).
    let reports = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.report_workers)
        .thread_name("ml-reports")
        .enable_all()
        .build()
        .expect("tokio runtime for reports");
    let result = rt.block_on(run(cfg, reports.handle().clone()));
    reports.shutdown_background();
    if let Err(e) = result {
        eprintln!("meshlimit-service: {e}");
        std::process::exit(1);
    }
}

async fn run(cfg: Config, reports: tokio::runtime::Handle) -> Result<(), String> {
    let token = cfg.load_token()?;
    let hash_key = cfg.load_client_hash_key()?;
    let keys = KeyMaker::new(&cfg.key_prefix, &hash_key);
    let rules = match &cfg.rules {
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| format!("--rules {}: {e}", p.display()))?;
            meshlimit_core::config::parse_rules(&bytes)
                .map_err(|e| format!("--rules {}: {e}", p.display()))?
        }
        None => Vec::new(),
    };
    let opts = RedisOptions {
        username: cfg.redis_username.clone(),
        password: cfg.load_redis_password()?,
        tls_insecure: cfg.redis_tls_insecure,
        ca_pem: cfg.load_redis_ca()?,
        // The connection-level bound must let the biggest batch through; each request
        // has its own, shorter deadline on top (--store-timeout-ms / --sync-timeout-ms).
        io_timeout: Duration::from_millis(cfg.store_timeout_ms.max(cfg.sync_timeout_ms).max(100)),
        report_runtime: Some(reports.clone()),
        sync_chunk: cfg.sync_entries_per_call,
    };
    let mut memory: Option<Arc<MemoryStore>> = None;
    let (store, redis): (Arc<dyn Store>, Option<Arc<RedisStore>>) =
        if let Some(url) = &cfg.redis_url {
            let s = Arc::new(RedisStore::single(url, opts, keys.clone())?);
            (s.clone(), Some(s))
        } else if !cfg.redis_cluster.is_empty() {
            let s = Arc::new(RedisStore::cluster(&cfg.redis_cluster, opts, keys.clone())?);
            (s.clone(), Some(s))
        } else {
            let m = Arc::new(MemoryStore::new(keys.clone(), MEMORY_MAX_KEYS));
            memory = Some(m.clone());
            (m, None)
        };
    let fallback = Fallback::new(
        cfg.on_store_error,
        cfg.fallback_share,
        MemoryStore::new(keys.clone(), MEMORY_MAX_KEYS),
        cfg.max_pending,
    );
    let svc = Arc::new(Service::new(&cfg, rules, store.clone(), fallback, keys));
    if let Some(r) = &redis {
        // Start even when Redis is down: degraded, then the probe brings it back.
        if let Err(e) = tokio::time::timeout(Duration::from_secs(5), r.connect())
            .await
            .unwrap_or_else(|_| {
                Err(meshlimit_service::store::StoreError::Unavailable(
                    "connect timed out".into(),
                ))
            })
        {
            tracing::warn!("store not reachable at start, starting degraded: {e}");
            svc.fallback.enter_degraded(&e.to_string());
        }
    }

    // The probe also sweeps expired keys of the embedded store and the fallback.
    let probe_svc = svc.clone();
    let interval = Duration::from_millis(cfg.probe_interval_ms.max(10));
    let probe = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            probe_svc.probe().await;
            n += 1;
            // Sweeping walks every key: every ~5 s is plenty (expired keys are already
            // ignored on read; the sweep only returns their memory).
            if n.is_multiple_of((5000 / interval.as_millis().max(1) as u64).max(1)) {
                probe_svc.fallback.sweep();
                if let Some(m) = &memory {
                    m.sweep();
                }
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        "listening on {addr}, store {}, {} rules, algorithm {:?}",
        store.name(),
        svc.rule_count(),
        cfg.algorithm
    );
    // Tests and scripts read this line to learn the port when --listen ends in :0.
    println!("listening on {addr}");

    let app = router(AppState {
        svc: svc.clone(),
        auth: Auth::new(token.as_deref()),
        reports: Some(reports),
        body_timeout: Duration::from_millis(cfg.body_timeout_ms),
        reports_in_flight: Arc::new(tokio::sync::Semaphore::new(cfg.max_reports_in_flight)),
    });
    let limits = Limits {
        header_timeout: Duration::from_millis(cfg.header_timeout_ms),
        max_connections: cfg.max_connections,
        grace: Duration::from_secs(cfg.shutdown_grace_secs),
    };
    let drained = server::run(listener, app, limits, async {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
    })
    .await;
    if !drained {
        tracing::warn!("in-flight requests still running after {:?}", limits.grace);
    }
    probe.abort();
    svc.flush().await;
    tracing::info!("bye");
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
