//! Which rule applies to a request, and which client it counts against.
//!
//! The adapter hands in the request pieces lazily (a header is only fetched from the
//! host when some rule asks for it), so matching costs as few host calls as the rules
//! need.

use crate::config::{KeySource, PathMatch, Rule};
use crate::hash::Hasher64;

/// The request path without query string or fragment.
pub fn path_only(path: &[u8]) -> &[u8] {
    let end = path
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(path.len());
    &path[..end]
}

pub fn path_matches(m: &PathMatch, path: &[u8]) -> bool {
    match m {
        PathMatch::Exact(p) => path == p.as_bytes(),
        PathMatch::Prefix(p) => path.starts_with(p.as_bytes()),
    }
}

/// The first rule (in priority order) that matches. `method()` returns the request
/// method and `header(name)` a request header (lower-case name); both are called only
/// when some rule needs them, and `method()` at most once.
pub fn find_rule<M, H>(rules: &[Rule], path: &[u8], method: M, mut header: H) -> Option<usize>
where
    M: FnOnce() -> Option<Vec<u8>>,
    H: FnMut(&str) -> Option<Vec<u8>>,
{
    let path = path_only(path);
    let mut method = Lazy::new(method);
    rules.iter().position(|rule| {
        let m = &rule.matcher;
        path_matches(&m.path, path)
            && (m.methods.is_empty()
                || method
                    .get()
                    .is_some_and(|got| m.methods.iter().any(|x| x.as_bytes() == got)))
            && m.headers
                .iter()
                .all(|(name, value)| header(name).is_some_and(|v| v == value.as_bytes()))
    })
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

/// The client id of a request under `rule`: the first key source that is present and
/// non-empty. `header(name)` fetches a header, `ip()` the client address (already
/// stripped of its port). `None` when no source is present: the rule then does not
/// apply to this request.
pub fn client_id<H, I>(rule: &Rule, mut header: H, mut ip: I) -> Option<(SourceIndex, Vec<u8>)>
where
    H: FnMut(&str) -> Option<Vec<u8>>,
    I: FnMut() -> Option<Vec<u8>>,
{
    rule.key.iter().enumerate().find_map(|(i, source)| {
        let v = match source {
            KeySource::Header(name) => header(name),
            KeySource::Ip => ip(),
        }?;
        (!v.is_empty()).then_some((i, v))
    })
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

/// The `hop`-th address from the right of an `x-forwarded-for` value (1 = rightmost),
/// trimmed. `None` if the header has fewer addresses than that.
pub fn xff_hop(xff: &[u8], hop: u32) -> Option<&[u8]> {
    let hop = hop as usize;
    if hop == 0 {
        return None;
    }
    let entry = xff.rsplit(|&b| b == b',').nth(hop - 1)?;
    let entry = entry.trim_ascii();
    (!entry.is_empty()).then_some(entry)
}

#[cfg(test)]
mod tests;
