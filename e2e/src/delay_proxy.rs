//! A delaying TCP forwarder, for a slow companion: every chunk read from one side is
//! written to the other `delay` after it arrived, in each direction, without holding
//! back the chunks behind it (a queue per direction, not a sleep per read), so a
//! request/response exchange takes 2 × `delay` more and throughput is not capped. The
//! kernel here has no `netem` qdisc, so latency has to be added in user space.
//!
//! The delay can change while connections are open; it applies to chunks read from then
//! on. When the target refuses the connection, the client's connection is closed at
//! once (what a caller sees of a dead service behind a local proxy).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

type Conns = Arc<Mutex<HashMap<u64, [TcpStream; 2]>>>;

/// A running forwarder; stopped (listener and every connection closed) on Drop.
pub struct DelayProxy {
    /// Where it listens (inside its namespace, if it was given one).
    pub listen: SocketAddr,
    pub target: SocketAddr,
    delay_us: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    conns: Conns,
    accept: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Listens on `listen` and forwards to `target`, both in `netns` when given (its
    /// threads enter the namespace, so its sockets live there).
    pub fn start(netns: Option<&Netns>, listen: SocketAddr, target: SocketAddr) -> DelayProxy {
        let delay_us = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let bind = || TcpListener::bind(listen);
        let listener = match netns {
            Some(ns) => ns.run(bind),
            None => bind(),
        }
        .unwrap_or_else(|e| panic!("delay proxy: bind {listen}: {e}"));
        let listener = Arc::new(listener);
        let listen = listener.local_addr().expect("proxy address");
        let netns_name = netns.map(|n| n.name().to_owned());
        let accept = {
            let (listener, delay_us, accepted, stop, conns) = (
                listener.clone(),
                delay_us.clone(),
                accepted.clone(),
                stop.clone(),
                conns.clone(),
            );
            std::thread::Builder::new()
                .name(format!("delay-proxy-{}", listen.port()))
                .spawn(move || {
                    // Outgoing connections are made from here: they must start in the
                    // namespace too.
                    if let Some(name) = netns_name {
                        Netns::open(&name).enter_this_thread();
                    }
                    accept_loop(&listener, target, &delay_us, &accepted, &stop, &conns)
                })
                .expect("spawn delay proxy thread")
        };
        DelayProxy {
            listen,
            target,
            delay_us,
            accepted,
            stop,
            listener,
            conns,
            accept: Some(accept),
        }
    }

    /// The delay added in each direction from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every open connection (both sides) but keeps listening.
    pub fn drop_connections(&self) {
        for [a, b] in self.conns.lock().unwrap().values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Linux wakes a thread blocked in accept() when its listening socket is shut
        // down (accept then fails with EINVAL).
        // SAFETY: plain syscall on a socket we own (kept open by `self.listener`).
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_connections();
    }
}

fn accept_loop(
    listener: &TcpListener,
    target: SocketAddr,
    delay_us: &Arc<AtomicU64>,
    accepted: &AtomicU64,
    stop: &AtomicBool,
    conns: &Conns,
) {
    let mut next_id = 0u64;
    loop {
        let client = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((client, _)) = client else {
            // E.g. out of file descriptors: do not spin.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let Ok(upstream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
            // Dropping `client` closes it: the caller sees the service is not there.
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            continue;
        };
        conns.lock().unwrap().insert(id, [c2, u2]);
        let tracked = Arc::new(Tracked {
            id,
            conns: conns.clone(),
        });
        for (from, to) in [(&client, &upstream), (&upstream, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                continue;
            };
            pipe(from, to, delay_us.clone(), tracked.clone());
        }
    }
}

/// Removes a connection from the open set when its last pipe thread ends.
struct Tracked {
    id: u64,
    conns: Conns,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.conns.lock().unwrap().remove(&self.id);
    }
}

/// One direction: a reader stamps each chunk with its due time, a writer writes it then.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay_us: Arc<AtomicU64>, tracked: Arc<Tracked>) {
    // None = the reading side ended: pass the half-close on.
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    let reader_tracked = tracked.clone();
    std::thread::spawn(move || {
        let _tracked = reader_tracked;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::SeqCst));
                    if tx.send(Some((due, buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        let _tracked = tracked;
        let result: io::Result<()> = (|| {
            while let Ok(Some((due, bytes))) = rx.recv() {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                to.write_all(&bytes)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                let _ = to.shutdown(Shutdown::Write);
            }
            Err(_) => {
                let _ = to.shutdown(Shutdown::Both);
            }
        }
    });
}
