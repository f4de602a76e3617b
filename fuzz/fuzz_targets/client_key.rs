//! Who a request is charged to: key headers (one value, a comma inside one value, or a
//! repeated header), the client address (`source.address` with its port stripped), the
//! choice among a rule's key sources, and the chain of rules one request is charged to.
//!
//! The request is modelled as Envoy hands it to the filter: a list of header lines in
//! order (names lower-case), from which the `request.headers.<name>` property joins every
//! value with `,` and the header map answers the first value. Properties:
//! - a key header reads as absent, one value, or repeated exactly as the request holds
//!   zero, one or several lines of it, and the first value is fetched only when the
//!   joined value holds a comma;
//! - a request is charged to a header's value only when that header came exactly once
//!   with that value, never to one of several copies; the first key source reached that
//!   came repeated refuses the request; empty values fall through to the next source;
//! - the port is stripped from every address Envoy formats (`1.2.3.4:5`, `[v6]:5`) and
//!   from nothing else that is an address; arbitrary bytes never panic;
//! - one client id under two key sources is two clients;
//! - the chain of rules charged follows the documented semantics (`continue`, shadow,
//!   the first refusal ends it, at most `MAX_RULES_PER_REQUEST` charged, the headers
//!   describe the limit closest to running out).
#![no_main]

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshlimit_core::config::{
    KeySource, Limit, Matcher, PathMatch, Rule, Scope, MAX_RULES_PER_REQUEST,
};
use meshlimit_core::gcra::Decision;
use meshlimit_core::global::FailureMode;
use meshlimit_core::matching::{
    client_id, decide, fingerprint, strip_port, Applied, ClientKey, HeaderValue, Tally, Verdict,
};

const NAMES: &[&str] = &["x-api-key", "x-user-id", "authorization", "x-other"];

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
enum Source {
    Header(u8),
    Ip,
}

#[derive(Arbitrary, Debug)]
enum Addr<'a> {
    V4(u32, u16),
    V6(u128, u16, u32),
    BareV4(u32),
    BareV6(u128),
    Raw(&'a [u8]),
    Absent,
}

#[derive(Arbitrary, Debug)]
struct ChainRule {
    sources: Vec<Source>,
    matches: bool,
    continues: bool,
    shadow: bool,
    allowed: bool,
    remaining: u8,
    reset_ns: u16,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    headers: Vec<(u8, &'a [u8])>,
    addr: Addr<'a>,
    sources: Vec<Source>,
    chain: Vec<ChainRule>,
}

struct Request<'a> {
    headers: Vec<(&'static str, &'a [u8])>,
    ip: Option<Vec<u8>>,
}

impl Request<'_> {
    fn values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .collect()
    }

    /// What the filter's `key_header` gets from Envoy, through `HeaderValue::from_joined`.
    fn key_header(&self, name: &str) -> HeaderValue {
        let values = self.values(name);
        let joined = (!values.is_empty()).then(|| values.join(&b","[..]));
        let fetched_first = Cell::new(false);
        let v = HeaderValue::from_joined(joined.clone(), || {
            fetched_first.set(true);
            values.first().map(|v| v.to_vec())
        });
        if fetched_first.get() {
            assert!(
                joined.as_ref().is_some_and(|j| j.contains(&b',')),
                "first value fetched without a comma"
            );
        }
        let expected = match values.as_slice() {
            [] => HeaderValue::Absent,
            [one] => HeaderValue::One(one.to_vec()),
            _ => HeaderValue::Repeated,
        };
        assert_eq!(v, expected, "{name}: {values:?}");
        v
    }

    /// The documented choice among key sources, from the request itself.
    fn expected_key(&self, key: &[KeySource]) -> ClientKey {
        for (i, s) in key.iter().enumerate() {
            match s {
                KeySource::Header(name) => match self.values(name).as_slice() {
                    [] => {}
                    [[]] => {}
                    [one] => return ClientKey::Id(i, one.to_vec()),
                    _ => return ClientKey::Repeated(i),
                },
                KeySource::Ip => match &self.ip {
                    Some(ip) if !ip.is_empty() => return ClientKey::Id(i, ip.clone()),
                    _ => {}
                },
            }
        }
        ClientKey::Missing
    }

    fn client(&self, rule: &Rule) -> ClientKey {
        let got = client_id(rule, |n| self.key_header(n), || self.ip.clone());
        assert_eq!(got, self.expected_key(&rule.key));
        got
    }
}

fn key_sources(sources: &[Source]) -> Vec<KeySource> {
    let mut out: Vec<KeySource> = Vec::new();
    for s in sources.iter().take(8) {
        let k = match s {
            Source::Header(i) => KeySource::Header(NAMES[*i as usize % NAMES.len()].into()),
            Source::Ip => KeySource::Ip,
        };
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn rule(i: usize, key: Vec<KeySource>, continues: bool, shadow: bool) -> Rule {
    Rule {
        id: format!("r{i}"),
        priority: 0,
        matcher: Matcher {
            path: PathMatch::Prefix(String::new()),
            case_sensitive: true,
            methods: vec![],
            headers: vec![],
        },
        key,
        limits: vec![Limit::new(60, 10, 10).unwrap()],
        shadow,
        scope: Scope::Local,
        failure_mode: FailureMode::Local,
        continues,
        seed: 0x9e37_79b9_7f4a_7c15 ^ i as u64,
    }
}

/// Envoy's `source.address` and the address it stands for.
fn address(a: &Addr) -> (Option<Vec<u8>>, Option<IpAddr>) {
    let text = |s: String| Some(s.into_bytes());
    match *a {
        Addr::V4(ip, port) => {
            let ip = Ipv4Addr::from(ip);
            let sa = SocketAddr::V4(SocketAddrV4::new(ip, port));
            (text(sa.to_string()), Some(IpAddr::V4(ip)))
        }
        Addr::V6(ip, port, scope) => {
            let ip = Ipv6Addr::from(ip);
            let sa = SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope % 4));
            (text(sa.to_string()), Some(IpAddr::V6(ip)))
        }
        Addr::BareV4(ip) => (text(Ipv4Addr::from(ip).to_string()), None),
        Addr::BareV6(ip) => (text(Ipv6Addr::from(ip).to_string()), None),
        Addr::Raw(b) => (Some(b.to_vec()), None),
        Addr::Absent => (None, None),
    }
}

fuzz_target!(|input: Input| {
    let (addr, ip) = address(&input.addr);
    let stripped = addr.as_deref().map(|a| strip_port(a).to_vec());
    match (&input.addr, &stripped) {
        (Addr::V4(..) | Addr::V6(..), Some(s)) => {
            // A scope id (`%2`) stays with the address; the address itself must be whole.
            let s = std::str::from_utf8(s).expect("ASCII");
            let host = s.split('%').next().unwrap();
            assert_eq!(host.parse::<IpAddr>().ok(), ip, "{addr:?} -> {s:?}");
        }
        (Addr::BareV4(_) | Addr::BareV6(_), Some(s)) => {
            assert_eq!(Some(s), addr.as_ref(), "a bare address lost characters");
        }
        _ => {}
    }

    let request = Request {
        headers: input
            .headers
            .iter()
            .take(16)
            .map(|(k, v)| (NAMES[*k as usize % NAMES.len()], *v))
            .collect(),
        ip: stripped,
    };

    let key = key_sources(&input.sources);
    if !key.is_empty() {
        let r = rule(0, key, false, false);
        if let ClientKey::Id(source, id) = request.client(&r) {
            for other in 0..r.key.len() {
                if other != source {
                    assert_ne!(
                        fingerprint(&r, source, &id),
                        fingerprint(&r, other, &id),
                        "one id under two key sources is one client"
                    );
                }
            }
        }
    }

    // A chain of rules.
    let chain: Vec<&ChainRule> = input.chain.iter().take(12).collect();
    let rules: Vec<Rule> = chain
        .iter()
        .enumerate()
        .map(|(i, c)| rule(i, key_sources(&c.sources), c.continues, c.shadow))
        .collect();
    let decision = |i: usize| Decision {
        allowed: chain[i].allowed,
        tightest: 0,
        remaining: u64::from(chain[i].remaining),
        reset_ns: u64::from(chain[i].reset_ns),
        retry_after_ns: if chain[i].allowed { 0 } else { 1 },
        changed: chain[i].allowed,
    };
    let matching: Vec<usize> = (0..rules.len()).filter(|&i| chain[i].matches).collect();
    let mut charged: Vec<usize> = Vec::new();
    let mut tally = Tally::default();
    let verdict = decide(
        &rules,
        matching.iter().copied(),
        |r| request.client(r),
        |_, r, fp| {
            let i: usize = r.id[1..].parse().unwrap();
            let ClientKey::Id(source, id) = request.expected_key(&r.key) else {
                panic!("{} charged without a client key", r.id);
            };
            assert_eq!(fp, fingerprint(r, source, &id), "charged to another client");
            charged.push(i);
            decision(i)
        },
        &mut tally,
    );

    // The same walk, from the documented semantics.
    let mut want_charged = Vec::new();
    let mut want_tally = Tally::default();
    let mut want: Option<Verdict> = None;
    let mut described: Option<Applied> = None;
    for &i in &matching {
        match request.expected_key(&rules[i].key) {
            ClientKey::Missing => {
                want_tally.no_client_key += 1;
                continue;
            }
            ClientKey::Repeated(source) => {
                want = Some(Verdict::RepeatedKeyHeader { rule: i, source });
                break;
            }
            ClientKey::Id(..) => {}
        }
        want_charged.push(i);
        let d = decision(i);
        if !d.allowed {
            if !rules[i].shadow {
                want = Some(Verdict::Rejected(Applied {
                    rule: i,
                    decision: d,
                }));
                break;
            }
            want_tally.shadow_rejected += 1;
        }
        let tighter = described.is_none_or(|a| {
            d.remaining < a.decision.remaining
                || (d.remaining == a.decision.remaining && d.reset_ns > a.decision.reset_ns)
        });
        if tighter {
            described = Some(Applied {
                rule: i,
                decision: d,
            });
        }
        if !rules[i].continues || want_charged.len() >= MAX_RULES_PER_REQUEST {
            break;
        }
    }
    let want = want.unwrap_or(described.map_or(Verdict::Unlimited, Verdict::Allowed));
    assert!(charged.len() <= MAX_RULES_PER_REQUEST);
    assert_eq!(charged, want_charged, "rules charged");
    assert_eq!(verdict, want);
    assert_eq!(tally, want_tally);
});
