//! A simulated HTTP load balancer in front of Envoy, the way cloud L7 balancers work:
//! it accepts the client's connection, appends the client's address to
//! `x-forwarded-for` (keeping whatever the client sent before it), and forwards the
//! request to Envoy over its own connection, which comes from the balancer's address.
//! One request per client connection (it asks Envoy to close after the response and
//! relays everything back): enough to test which address Envoy and the filter see.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use crate::client::connect_from;

/// The balancer, listening on `127.0.0.1:port`; stopped on Drop.
pub struct LoadBalancer {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl LoadBalancer {
    /// Forwards to `127.0.0.1:backend_port` from the address `own` (e.g. `127.0.0.250`).
    pub fn start(backend_port: u16, own: Ipv4Addr) -> LoadBalancer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind load balancer");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let backend = SocketAddr::from(([127, 0, 0, 1], backend_port));
        thread::Builder::new()
            .name(format!("lb-{port}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    thread::spawn(move || {
                        let _ = relay(conn, backend, own);
                    });
                }
            })
            .expect("spawn load balancer");
        LoadBalancer { port, stop }
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn relay(client: TcpStream, backend: SocketAddr, own: Ipv4Addr) -> io::Result<()> {
    let peer = client.peer_addr()?.ip();
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = Vec::new();
    loop {
        let n = reader.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Ok(());
        }
        if head.ends_with(b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut forwarded: Vec<String> = Vec::new();
    let mut xff: Vec<String> = Vec::new();
    let mut length = 0usize;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap_or((line, ""));
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "x-forwarded-for" => xff.push(value.trim().to_owned()),
            "connection" => {}
            _ => {
                if lower == "content-length" {
                    length = value.trim().parse().unwrap_or(0);
                }
                forwarded.push(line.to_owned());
            }
        }
    }
    xff.push(peer.to_string());
    let mut out = format!("{request_line}\r\n");
    for line in forwarded {
        out.push_str(&line);
        out.push_str("\r\n");
    }
    let _ = write!(
        out,
        "x-forwarded-for: {}\r\nconnection: close\r\n\r\n",
        xff.join(", ")
    );
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let mut upstream = connect_from(own, backend)?;
    upstream.write_all(out.as_bytes())?;
    upstream.write_all(&body)?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;
    let mut client = client;
    client.write_all(&response)?;
    client.shutdown(std::net::Shutdown::Both)
}
