//! A small blocking HTTP/1.1 client written for tests: it sends exactly the bytes it is
//! given (header values may be any bytes, including non-UTF-8), keeps connections
//! alive, and parses responses with `httparse` (Content-Length, chunked, or until close).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// Responses slower than this fail the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One request. Build with [`Request::get`] / [`Request::post`] / [`Request::new`] and
/// the `header*` methods.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn get(path: &str) -> Request {
        Request::new("GET", path)
    }

    pub fn post(path: &str) -> Request {
        Request::new("POST", path)
    }

    pub fn header(self, name: &str, value: &str) -> Request {
        self.header_bytes(name, value.as_bytes())
    }

    /// Any bytes as the value, sent as they are (e.g. `b"\xff\xfe"`).
    pub fn header_bytes(mut self, name: &str, value: &[u8]) -> Request {
        self.headers.push((name.to_owned(), value.to_vec()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// The request as it goes on the wire. `Host` is added unless given.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        if !self.has_header("host") {
            out.extend_from_slice(b"host: localhost\r\n");
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let needs_length = !self.body.is_empty() || !matches!(self.method.as_str(), "GET" | "HEAD");
        if needs_length && !self.has_header("content-length") {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

/// A parsed response. Header names are lower-case; values are decoded lossily as UTF-8.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Every value of a header, in the order received.
    pub fn header_all(&self, name: &str) -> &[String] {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parses the body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.body_str()))
    }

    fn closes_connection(&self) -> bool {
        self.header_all("connection")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A keep-alive connection to one address; reconnects when the server closed it.
pub struct Client {
    addr: SocketAddr,
    /// The loopback address connections come from (any of 127/8 on Linux): distinct
    /// clients by IP on one machine.
    source: Option<Ipv4Addr>,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    /// To `127.0.0.1:port`.
    pub fn new(port: u16) -> Client {
        Client::to(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    pub fn to(addr: SocketAddr) -> Client {
        Client {
            addr,
            source: None,
            conn: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens the connection now (otherwise the first request does).
    pub fn connect(&mut self) -> io::Result<()> {
        if self.conn.is_none() {
            let stream = match self.source {
                Some(ip) => connect_from(ip, self.addr)?,
                None => connect(self.addr)?,
            };
            self.conn = Some(BufReader::new(stream));
        }
        Ok(())
    }

    /// A client whose connections come from `source` (e.g. `127.0.0.7`).
    pub fn from_source(port: u16, source: Ipv4Addr) -> Client {
        Client {
            source: Some(source),
            ..Client::new(port)
        }
    }

    /// Sends the request and reads the response; panics on I/O errors (a test failure).
    pub fn send(&mut self, req: &Request) -> Response {
        self.try_send(req)
            .unwrap_or_else(|e| panic!("{} {} to {}: {e}", req.method, req.path, self.addr))
    }

    pub fn try_send(&mut self, req: &Request) -> io::Result<Response> {
        let bytes = req.to_bytes();
        let reused = self.conn.is_some();
        match self.exchange(&bytes, req.method == "HEAD") {
            // A kept-alive connection the server closed in between fails before any
            // response byte arrives: the request was not processed, so sending it again
            // on a new connection cannot count it twice.
            Err(e) if reused && e.kind() == io::ErrorKind::UnexpectedEof => {
                self.exchange(&bytes, req.method == "HEAD")
            }
            r => r,
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(&Request::get(path))
    }

    fn exchange(&mut self, bytes: &[u8], head: bool) -> io::Result<Response> {
        if self.conn.is_none() {
            let stream = match self.source {
                Some(ip) => connect_from(ip, self.addr)?,
                None => connect(self.addr)?,
            };
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().unwrap();
        let result = conn
            .get_mut()
            .write_all(bytes)
            .and_then(|_| read_response(conn, head));
        match &result {
            Ok(resp) if !resp.closes_connection() => {}
            _ => self.conn = None,
        }
        result
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Connects to `addr` from the local address `source` (port chosen by the kernel).
pub fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Reads one response. `UnexpectedEof` means the connection closed before the first byte.
pub fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    let mut raw = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut raw)?;
        if n == 0 {
            let msg = if raw.is_empty() {
                "connection closed before a response".to_owned()
            } else {
                format!(
                    "connection closed in headers: {:?}",
                    String::from_utf8_lossy(&raw)
                )
            };
            let kind = if raw.is_empty() {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::InvalidData
            };
            return Err(io::Error::new(kind, msg));
        }
        if raw.ends_with(b"\r\n\r\n") || raw.ends_with(b"\n\n") {
            break;
        }
    }
    let mut header_buf = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Response::new(&mut header_buf);
    parsed
        .parse(&raw)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad response: {e}")))?;
    let status = parsed.code.unwrap_or(0);
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in parsed.headers.iter() {
        headers
            .entry(h.name.to_ascii_lowercase())
            .or_default()
            .push(String::from_utf8_lossy(h.value).into_owned());
    }
    let mut resp = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if head || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(resp);
    }
    if resp
        .header_all("transfer-encoding")
        .iter()
        .any(|v| v.contains("chunked"))
    {
        resp.body = read_chunked(r)?;
    } else if let Some(len) = resp.header("content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad content-length"))?;
        resp.body = vec![0; len];
        r.read_exact(&mut resp.body)?;
    } else {
        r.read_to_end(&mut resp.body)?;
        resp.headers
            .entry("connection".into())
            .or_default()
            .push("close".into());
    }
    Ok(resp)
}

fn read_chunked(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size_hex = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        line.clear();
        r.read_line(&mut line)?;
    }
}

/// Writes `bytes` on a new connection and reads one response: for hostile or malformed
/// input the typed [`Request`] cannot express.
pub fn send_raw(port: u16, bytes: &[u8]) -> io::Result<Response> {
    let stream = connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(bytes)?;
    read_response(&mut reader, false)
}

/// Sends every request at once, each on its own connection and thread (released
/// together by a barrier), and returns the responses in the order of `reqs`.
pub fn send_concurrent(port: u16, reqs: Vec<Request>) -> Vec<Response> {
    let barrier = Arc::new(Barrier::new(reqs.len()));
    let threads: Vec<_> = reqs
        .into_iter()
        .map(|req| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut client = Client::new(port);
                // Connect before the barrier so the requests really overlap.
                client.conn = Some(BufReader::new(
                    connect(client.addr).expect("connect for concurrent request"),
                ));
                barrier.wait();
                client.send(&req)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("concurrent request thread panicked"))
        .collect()
}
