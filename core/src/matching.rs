//! Which rules apply to a request, and which client each counts it against.
//!
//! Rules are tried in priority order against the request's path in normal form
//! ([`crate::path`]). A rule *applies* when it matches and the request carries one of its
//! key sources; a rule that matches but finds no key is passed over (counted in
//! `meshlimit_no_client_key_total`), so leaving a header out never escapes the rules
//! below it. The first rule that applies is the last one unless it has `continue`; then
//! the next rule that applies is charged too (at most
//! [`crate::config::MAX_RULES_PER_REQUEST`] per request).
//!
//! The adapter hands in the request pieces lazily (a header is only fetched from the
//! host when some rule asks for it), so matching costs as few host calls as the rules
//! need.

use crate::config::{KeySource, Matcher, PathMatch, Rule, MAX_RULES_PER_REQUEST};
use crate::gcra::Decision;
use crate::hash::Hasher64;
use crate::path::starts_with_ignore_case;

pub use crate::path::path_only;

/// Whether a path in normal form matches a rule's path. An exact path also matches with
/// one trailing slash added or removed (`/login` and `/login/`), since frameworks that
/// ignore a trailing slash route both to one handler.
pub fn path_matches(m: &Matcher, path: &[u8]) -> bool {
    let eq = |a: &[u8], b: &[u8]| {
        if m.case_sensitive {
            a == b
        } else {
            a.eq_ignore_ascii_case(b)
        }
    };
    match &m.path {
        PathMatch::Exact(p) => eq(trim_slash(path), trim_slash(p.as_bytes())),
        PathMatch::Prefix(p) if m.case_sensitive => path.starts_with(p.as_bytes()),
        PathMatch::Prefix(p) => starts_with_ignore_case(path, p.as_bytes()),
    }
}

fn trim_slash(p: &[u8]) -> &[u8] {
    match p.strip_suffix(b"/") {
        Some(t) if !t.is_empty() => t,
        _ => p,
    }
}

/// Whether a request method is one of a rule's (upper-cased) methods. Methods compare
/// case-insensitively: over HTTP/2 `:method: post` reaches upstreams that treat it as
/// POST. `HEAD` matches a rule listing `GET`, because common frameworks (Go's ServeMux,
/// Flask, Express, Spring) run the GET handler for it.
pub fn method_matches(methods: &[String], got: &[u8]) -> bool {
    methods.iter().any(|m| {
        m.as_bytes().eq_ignore_ascii_case(got) || (m == "GET" && got.eq_ignore_ascii_case(b"HEAD"))
    })
}

/// The rules whose match (path, methods, headers) fits the request, in priority order,
/// as indices into `rules`. `path` is in normal form. `method()` returns the request
/// method and `header(name)` a request header (lower-case name); both are called only
/// when some rule needs them, and `method()` at most once.
pub fn matching_rules<'a, M, H>(
    rules: &'a [Rule],
    path: &'a [u8],
    method: M,
    header: H,
) -> MatchingRules<'a, M, H>
where
    M: FnOnce() -> Option<Vec<u8>>,
    H: FnMut(&str) -> Option<Vec<u8>>,
{
    MatchingRules {
        rules,
        path,
        next: 0,
        method: Lazy::new(method),
        header,
    }
}

/// Iterator of [`matching_rules`].
pub struct MatchingRules<'a, M: FnOnce() -> Option<Vec<u8>>, H> {
    rules: &'a [Rule],
    path: &'a [u8],
    next: usize,
    method: Lazy<M>,
    header: H,
}

impl<M, H> Iterator for MatchingRules<'_, M, H>
where
    M: FnOnce() -> Option<Vec<u8>>,
    H: FnMut(&str) -> Option<Vec<u8>>,
{
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        while self.next < self.rules.len() {
            let i = self.next;
            self.next += 1;
            let m = &self.rules[i].matcher;
            let fits = path_matches(m, self.path)
                && (m.methods.is_empty()
                    || self
                        .method
                        .get()
                        .is_some_and(|got| method_matches(&m.methods, got)))
                && m.headers.iter().all(|(name, value)| {
                    (self.header)(name).is_some_and(|v| v == value.as_bytes())
                });
            if fits {
                return Some(i);
            }
        }
        None
    }
}

/// The first rule (in priority order) that matches; see [`matching_rules`].
pub fn find_rule<M, H>(rules: &[Rule], path: &[u8], method: M, header: H) -> Option<usize>
where
    M: FnOnce() -> Option<Vec<u8>>,
    H: FnMut(&str) -> Option<Vec<u8>>,
{
    matching_rules(rules, path, method, header).next()
}

/// A value computed on first use.
struct Lazy<F: FnOnce() -> Option<Vec<u8>>> {
    init: Option<F>,
    value: Option<Vec<u8>>,
}

impl<F: FnOnce() -> Option<Vec<u8>>> Lazy<F> {
    fn new(init: F) -> Self {
        Lazy {
            init: Some(init),
            value: None,
        }
    }
    fn get(&mut self) -> Option<&[u8]> {
        if let Some(f) = self.init.take() {
            self.value = f();
        }
        self.value.as_deref()
    }
}

/// Where a request's client id came from: the index into the rule's `key` list.
/// It is part of the fingerprint, so API key `abc` and user `abc` are different clients.
pub type SourceIndex = usize;

/// The 64-bit fingerprint of (rule, key source, client id). Client ids of any length
/// become 8 bytes here; the raw id is never stored.
pub fn fingerprint(rule: &Rule, source: SourceIndex, client_id: &[u8]) -> u64 {
    let mut h = Hasher64::new(rule.seed);
    h.write_u64(source as u64);
    h.write(client_id);
    h.finish()
}

/// A key header as the request carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Absent,
    One(Vec<u8>),
    /// The header came more than once. Envoy forwards every copy and upstreams differ in
    /// which one they read (the first, the last, all joined), so no id can be charged
    /// that is surely the one the upstream sees: the filter refuses the request.
    Repeated,
}

impl HeaderValue {
    /// Tells one header from several, from what Envoy offers a filter: `joined`, every
    /// value of the header joined with `,` (the `request.headers.<name>` property), and
    /// `first()`, the first value alone (the header map). A `,` in `joined` is either a
    /// repeated header or a comma inside one value; only then is `first()` fetched to
    /// tell which, so the common case costs one host call.
    pub fn from_joined<F: FnOnce() -> Option<Vec<u8>>>(joined: Option<Vec<u8>>, first: F) -> Self {
        match joined {
            None => HeaderValue::Absent,
            Some(v) if !v.contains(&b',') => HeaderValue::One(v),
            Some(v) => match first() {
                Some(f) if f == v => HeaderValue::One(v),
                _ => HeaderValue::Repeated,
            },
        }
    }
}

/// Who a request counts against under one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKey {
    /// The first key source present and non-empty, and its value.
    Id(SourceIndex, Vec<u8>),
    /// None of the rule's key sources is present: the rule does not apply.
    Missing,
    /// The key source reached first came as a repeated header: refuse the request.
    Repeated(SourceIndex),
}

/// The client id of a request under `rule`: the first key source that is present and
/// non-empty. `header(name)` fetches a key header, `ip()` the client address (already
/// stripped of its port).
pub fn client_id<H, I>(rule: &Rule, mut header: H, mut ip: I) -> ClientKey
where
    H: FnMut(&str) -> HeaderValue,
    I: FnMut() -> Option<Vec<u8>>,
{
    for (i, source) in rule.key.iter().enumerate() {
        let v = match source {
            KeySource::Header(name) => match header(name) {
                HeaderValue::Absent => None,
                HeaderValue::One(v) => Some(v),
                HeaderValue::Repeated => return ClientKey::Repeated(i),
            },
            KeySource::Ip => ip(),
        };
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            return ClientKey::Id(i, v);
        }
    }
    ClientKey::Missing
}

/// A rule that applied to a request and what its buckets decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Index into the configuration's rules.
    pub rule: usize,
    pub decision: Decision,
}

/// What the filter does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No rule applied: the request passes untouched, without headers.
    Unlimited,
    /// Every rule that applied admitted it (or only refused it in shadow mode). The
    /// headers describe this one: of all the limits charged, the closest to running out.
    Allowed(Applied),
    /// This rule refused it: answer 429 with its headers. Rules before it in the chain
    /// were charged; rules after it were not.
    Rejected(Applied),
    /// The key source this rule reached first came as a repeated header: answer 400.
    RepeatedKeyHeader { rule: usize, source: SourceIndex },
}

/// Events counted per rule rather than per request.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Rules that matched but found none of their key sources (passed over).
    pub no_client_key: u32,
    /// Shadow rules that would have refused the request.
    pub shadow_rejected: u32,
}

/// Applies the rules `matching` yields (in priority order) to one request: each rule
/// that finds its client key is charged with `take(index, rule, fingerprint)`; a rule without
/// `continue` ends the chain; a refusal (outside shadow mode) ends it at once, so later
/// rules are not charged. At most [`MAX_RULES_PER_REQUEST`] rules are charged (the
/// configuration guarantees no chain is longer).
pub fn decide<C, T>(
    rules: &[Rule],
    matching: impl Iterator<Item = usize>,
    mut client: C,
    mut take: T,
    tally: &mut Tally,
) -> Verdict
where
    C: FnMut(&Rule) -> ClientKey,
    T: FnMut(usize, &Rule, u64) -> Decision,
{
    let mut described: Option<Applied> = None;
    let mut charged = 0;
    for i in matching {
        let rule = &rules[i];
        let (source, id) = match client(rule) {
            ClientKey::Id(source, id) => (source, id),
            ClientKey::Missing => {
                tally.no_client_key += 1;
                continue;
            }
            ClientKey::Repeated(source) => {
                return Verdict::RepeatedKeyHeader { rule: i, source };
            }
        };
        let decision = take(i, rule, fingerprint(rule, source, &id));
        charged += 1;
        if !decision.allowed {
            if !rule.shadow {
                return Verdict::Rejected(Applied { rule: i, decision });
            }
            tally.shadow_rejected += 1;
        }
        let tighter = described.is_none_or(|a| {
            let (d, o) = (&decision, &a.decision);
            d.remaining < o.remaining || (d.remaining == o.remaining && d.reset_ns > o.reset_ns)
        });
        if tighter {
            described = Some(Applied { rule: i, decision });
        }
        if !rule.continues || charged >= MAX_RULES_PER_REQUEST {
            break;
        }
    }
    described.map_or(Verdict::Unlimited, Verdict::Allowed)
}

/// Removes the port from an Envoy `source.address` (`1.2.3.4:5678`, `[::1]:5678`).
pub fn strip_port(addr: &[u8]) -> &[u8] {
    if let Some(rest) = addr.strip_prefix(b"[") {
        // [v6]:port
        return match rest.iter().position(|&b| b == b']') {
            Some(end) => &rest[..end],
            None => addr,
        };
    }
    // v4:port has exactly one ':'; a bare v6 address has several and no port.
    let colons = addr.iter().filter(|&&b| b == b':').count();
    if colons == 1 {
        let end = addr.iter().position(|&b| b == b':').unwrap_or(addr.len());
        &addr[..end]
    } else {
        addr
    }
}

#[cfg(test)]
mod tests;
