//! `demo-upstream --port N`: the demo upstream as a process, for the demo and the bench.
//! Every request gets 200 `{"upstream":"ok","path":...,"method":...}`; `GET /__hits`
//! answers how many requests were served.

use std::sync::Arc;

use meshlimit_e2e::upstream::{serve, UpstreamState};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut port: u16 = 10080;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                port = args
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| usage("--port needs a number"))
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("demo-upstream: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1)
        });
    eprintln!("demo-upstream listening on 127.0.0.1:{port}");
    serve(listener, Arc::new(UpstreamState::default())).await;
}

fn usage(err: &str) -> ! {
    if !err.is_empty() {
        eprintln!("demo-upstream: {err}");
    }
    eprintln!("usage: demo-upstream [--port N]   (default 10080)");
    std::process::exit(if err.is_empty() { 0 } else { 2 })
}
