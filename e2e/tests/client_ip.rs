//! Where the `ip` key source comes from, through a real Envoy: it is the client address
//! Envoy computes for the request (the `source.address` property), so which listener
//! settings make it trustworthy is Envoy's business. Clients get distinct addresses by
//! binding their own loopback source (127.0.0.x); a simulated load balancer
//! (`meshlimit_e2e::LoadBalancer`, appending to `x-forwarded-for` like a cloud L7
//! balancer) sits in front where the set-up has one.

use std::net::Ipv4Addr;

use meshlimit_e2e::{Client, Envoy, EnvoyOptions, LoadBalancer, Request, Upstream};

const PER_IP: &str = r#"{"rules":[{"id":"per-ip","match":{"path":"/login"},"key":["ip"],
  "limits":[{"window":"1h","max":2}]}]}"#;

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// `n` requests from `client`, each with a different forged `x-forwarded-for`.
fn forged(client: &mut Client, n: usize, tag: &str) -> Vec<u16> {
    (0..n)
        .map(|i| {
            let xff = format!("198.51.100.{i}, 203.0.113.{i}");
            let r = client.send(&Request::get("/login").header("x-forwarded-for", &xff));
            if r.status == 429 {
                assert_eq!(r.json()["rule"], "per-ip", "{tag}");
            }
            r.status
        })
        .collect()
}

#[test]
fn default_listener_settings_let_a_client_choose_its_ip() {
    // Envoy's default (use_remote_address unset): the client address Envoy computes is
    // the rightmost x-forwarded-for entry the client sent. This is why the shipped
    // configurations set use_remote_address: true (README, "Security").
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(EnvoyOptions::new(PER_IP).upstream(&upstream));
    let mut c = Client::from_source(envoy.port, ip(2));
    assert_eq!(
        forged(&mut c, 5, "default"),
        [200; 5],
        "five forged ids, five buckets"
    );
    // Without the header it is the TCP peer, limited as expected.
    let plain: Vec<u16> = (0..3)
        .map(|_| c.send(&Request::get("/login")).status)
        .collect();
    assert_eq!(plain, [200, 200, 429]);
}

#[test]
fn at_the_edge_ip_is_the_tcp_peer_whatever_the_client_forwards() {
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(PER_IP)
            .use_remote_address(true)
            .upstream(&upstream),
    );
    let mut a = Client::from_source(envoy.port, ip(2));
    let mut b = Client::from_source(envoy.port, ip(3));
    assert_eq!(forged(&mut a, 4, "edge a"), [200, 200, 429, 429]);
    assert_eq!(
        forged(&mut b, 3, "edge b"),
        [200, 200, 429],
        "another address, its own bucket"
    );
    // Envoy appended the real peer to what the upstream got.
    let xff = upstream
        .last_headers()
        .into_iter()
        .find(|(k, _)| k == "x-forwarded-for")
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
    // (the last request that got through was b's second, i = 1)
    assert_eq!(xff.as_deref(), Some("198.51.100.1, 203.0.113.1,127.0.0.3"));
}

#[test]
fn behind_a_load_balancer_ip_is_the_client_the_balancer_saw() {
    // use_remote_address + xff_num_trusted_hops: 1: Envoy trusts the one entry the
    // balancer appended, and nothing a client put before it.
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(PER_IP)
            .use_remote_address(true)
            .xff_num_trusted_hops(1)
            .upstream(&upstream),
    );
    let lb = LoadBalancer::start(envoy.port, ip(250));
    let mut a = Client::from_source(lb.port, ip(2));
    let mut b = Client::from_source(lb.port, ip(3));
    let mut c = Client::from_source(lb.port, ip(4));
    assert_eq!(forged(&mut a, 4, "lb a"), [200, 200, 429, 429]);
    // One client spending its bucket does not lock the others out (they would all share
    // the balancer's address if the hops were counted wrong).
    assert_eq!(forged(&mut b, 3, "lb b"), [200, 200, 429]);
    assert_eq!(forged(&mut c, 1, "lb c"), [200]);
    assert_eq!(upstream.hits(), 5);
}

#[test]
fn behind_a_load_balancer_without_trusted_hops_everyone_is_the_balancer() {
    // The mistake README warns about: Envoy behind a balancer but trusting no hop sees
    // every client as the balancer, and one client's refusals are everyone's.
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(PER_IP)
            .use_remote_address(true)
            .upstream(&upstream),
    );
    let lb = LoadBalancer::start(envoy.port, ip(250));
    let mut a = Client::from_source(lb.port, ip(2));
    let mut b = Client::from_source(lb.port, ip(3));
    assert_eq!(forged(&mut a, 2, "a"), [200, 200]);
    assert_eq!(
        forged(&mut b, 1, "b"),
        [429],
        "b shares a's bucket: the balancer's"
    );
}

#[test]
fn trusted_hops_without_use_remote_address_still_trust_the_client() {
    // xff_num_trusted_hops alone: Envoy takes the second entry from the right of the
    // client's own header (README's table, last row), so the client still chooses.
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(PER_IP)
            .xff_num_trusted_hops(1)
            .upstream(&upstream),
    );
    let mut c = Client::from_source(envoy.port, ip(2));
    assert_eq!(forged(&mut c, 4, "hops only"), [200; 4]);
    // With one entry only, the TCP peer.
    let one = || Request::get("/login").header("x-forwarded-for", "203.0.113.50");
    let s: Vec<u16> = (0..3).map(|_| c.send(&one()).status).collect();
    assert_eq!(s, [200, 200, 429]);
}
