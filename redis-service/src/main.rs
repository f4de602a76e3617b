//! meshlimit-service: the entry point of the server the library implements. It parses
//! the command line, sets up logging and the runtimes, binds the listener and hands
//! everything to [`server::run`] until SIGTERM or Ctrl-C.

use clap::Parser;
use meshlimit_service::config::Config;
use meshlimit_service::server;
use meshlimit_service::service::Service;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

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
    let (rt, reports) = runtimes(&cfg);
    let result = rt.block_on(serve(cfg, reports.handle().clone()));
    reports.shutdown_background();
    if let Err(e) = result {
        eprintln!("meshlimit-service: {e}");
        std::process::exit(1);
    }
}

/// The runtime that answers checks (and serves HTTP), and the one reports run on (see
/// `http::AppState::reports`).
fn runtimes(cfg: &Config) -> (Runtime, Runtime) {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = cfg.workers {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build().expect("tokio runtime");
    let reports = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.report_workers)
        .thread_name("ml-reports")
        .enable_all()
        .build()
        .expect("tokio runtime for reports");
    (rt, reports)
}

async fn serve(cfg: Config, reports: tokio::runtime::Handle) -> Result<(), String> {
    let options = server::Options::from_config(&cfg, Some(reports.clone()))?;
    let service = Service::start(&cfg, Some(reports)).await?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        "listening on {addr}, store {}, {} rules, algorithm {:?}",
        service.store_name(),
        service.rule_count(),
        service.algorithm()
    );
    // Tests and scripts read this line to learn the port when --listen ends in :0.
    println!("listening on {addr}");
    server::run(listener, service, options, shutdown_signal()).await;
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
