//! Connection behaviour a hostile client controls, over real sockets against the real
//! binary: a request head sent slowly or never finished, an idle keep-alive connection,
//! a body that never comes, more connections than allowed, and SIGTERM while such a
//! client holds a connection.

mod support;
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or `max` passes); returns what was
/// read and how long it took.
async fn read_to_close(s: &mut TcpStream, max: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while t.elapsed() < max {
        match tokio::time::timeout(max - t.elapsed(), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&buf).to_string(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_idle_connections_are_closed() {
    let s = Service::start(&["--header-timeout-ms", "500", "--body-timeout-ms", "500"]);
    // Half a request head, then silence: closed after the header timeout, no response.
    let mut half = TcpStream::connect(&s.addr).await.unwrap();
    half.write_all(b"POST /rate-limit/check HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let (got, took) = read_to_close(&mut half, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
        "half-sent head closed after {took:?}"
    );
    assert!(!got.contains("200 OK"), "{got}");

    // A head trickled a byte at a time keeps nothing open longer: the timeout counts
    // from the start of the head, not from the last byte.
    let mut drip = TcpStream::connect(&s.addr).await.unwrap();
    let t = Instant::now();
    let head =
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed_after = None;
    for b in head.iter() {
        if drip.write_all(&[*b]).await.is_err() {
            closed_after = Some(t.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(1), drip.read(&mut probe)).await
        {
            closed_after = Some(t.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("a byte-at-a-time head was served to the end");
    assert!(
        closed_after < Duration::from_millis(2000),
        "{closed_after:?}"
    );

    // Idle keep-alive: one request answered, then nothing sent: closed after the timeout.
    let mut idle = TcpStream::connect(&s.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, took) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2000),
        "idle connection closed after {took:?}"
    );

    // Headers complete, body never sent: 408 with an ErrorBody after the body timeout.
    let mut body = TcpStream::connect(&s.addr).await.unwrap();
    let req = format!(
        "POST /rate-limit/check HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
    );
    body.write_all(req.as_bytes()).await.unwrap();
    let (got, took) = read_to_close(&mut body, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#""error":"request_timeout""#), "{got}");
    assert!(took < Duration::from_millis(2000), "{took:?}");

    // A head over 64 KiB is refused, not buffered.
    let mut big = TcpStream::connect(&s.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let (got, _) = read_to_close(&mut big, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got:.200}");

    // The service is fine.
    assert_eq!(s.client.get("/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_at_once() {
    let s = Service::start(&["--max-connections", "3", "--header-timeout-ms", "60000"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(&s.addr).await.unwrap();
        // Each is really being served (and stays open: keep-alive).
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let t = Instant::now();
    let mut over = TcpStream::connect(&s.addr).await.unwrap();
    let (got, took) = read_to_close(&mut over, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains(r#""error":"overloaded""#), "{got}");
    assert!(took < Duration::from_millis(1000), "refusal took {took:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // One held connection goes away: a new one is served again.
    drop(held.pop());
    wait_for(Duration::from_secs(5), || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{}/healthz", s.addr),
            ])
            .output()
            .map(|o| o.stdout == b"200")
            .unwrap_or(false)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_by_a_slow_client() {
    // Header timeout and grace far longer than the exit we expect.
    let mut s = Service::start(&[
        "--header-timeout-ms",
        "60000",
        "--shutdown-grace-secs",
        "20",
    ]);
    let mut slow = TcpStream::connect(&s.addr).await.unwrap();
    slow.write_all(b"POST /v1/sync HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(&s.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).await.unwrap() > 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    assert!(s.terminate(), "exit status");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} with a slow client open"
    );
}
