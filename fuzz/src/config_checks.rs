//! What must hold for every plugin configuration, accepted or refused. Shared by the
//! byte-level and the structure-aware configuration targets.

use meshlimit_core::config::{
    self, Config, ConfigError, KeySource, PathMatch, Rule, MAX_COUNT, MAX_HEADER_MATCHES,
    MAX_ID_LEN, MAX_KEY_SOURCES, MAX_LIMITS_PER_RULE, MAX_MAX_CLIENTS, MAX_METHODS, MAX_RULES,
    MAX_RULES_PER_REQUEST, MAX_WINDOW_SECS, MIN_MAX_CLIENTS,
};
use meshlimit_core::{gcra, headers, matching, path, table};

use crate::json_tree::Tree;

/// A wall clock in nanoseconds of today's order (2024), for the request-path checks.
const NOW_NS: u64 = 1_700_000_000_000_000_000;

/// Parses `input` as the filter does and checks the result; panics on any violation.
pub fn check(input: &[u8]) -> Result<Config, ConfigError> {
    let result = config::parse(input);
    match &result {
        Ok(c) => {
            check_document(input);
            check_config(c);
        }
        Err(e) => check_error(e),
    }
    result
}

/// A refusal is the one log line the filter writes: a field path and a reason, with no
/// line break or other control character a client-chosen key or value could smuggle
/// into the proxy's log.
pub fn check_error(e: &ConfigError) {
    let line = e.to_string();
    assert!(!e.reason.is_empty(), "refusal without a reason: {line:?}");
    assert!(
        !line.chars().any(char::is_control),
        "refusal is not one clean log line: {line:?}"
    );
}

/// An accepted input is one JSON document with no repeated key in any object, an object
/// wherever the configuration has a record (never an array read by position) and a
/// string wherever it has a choice (or `null`, for an optional field left out).
fn check_document(input: &[u8]) {
    let tree = Tree::parse(input).expect("accepted input is exactly one JSON document");
    assert_eq!(tree.duplicate_key(), None, "accepted a repeated key");
    assert!(
        tree.is_object(),
        "accepted a top level that is not an object"
    );
    // `null` is how JSON leaves an optional field out.
    let is_string = |t: &Tree| matches!(t, Tree::String(_) | Tree::Null);
    if let Some(h) = tree.get("headers") {
        assert!(is_string(h), "accepted headers that is not a string");
    }
    let rules = tree.get("rules").expect("accepted without one \"rules\"");
    for rule in rules.items() {
        assert!(rule.is_object(), "accepted a rule that is not an object");
        if let Some(s) = rule.get("scope") {
            assert!(is_string(s), "accepted a scope that is not a string");
        }
        let m = rule
            .get("match")
            .expect("accepted a rule without one \"match\"");
        assert!(m.is_object(), "accepted a match that is not an object");
        if let Some(h) = m.get("headers") {
            let members = match h {
                Tree::Object(members) => members.as_slice(),
                // Like every optional field, `null` leaves it out (found by fuzzing: the
                // check, not the parser, was wrong).
                Tree::Null => &[],
                _ => panic!("accepted match.headers that is not an object"),
            };
            for (i, (name, _)) in members.iter().enumerate() {
                assert!(
                    !members[..i]
                        .iter()
                        .any(|(o, _)| o.eq_ignore_ascii_case(name)),
                    "accepted header name {name:?} twice (names are case-insensitive)"
                );
            }
        }
        let limits = rule.get("limits").expect("accepted without \"limits\"");
        for l in limits.items() {
            assert!(l.is_object(), "accepted a limit that is not an object");
        }
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_normal_path(p: &str) -> bool {
    path::normalize(p.as_bytes()).is_ok_and(|n| n == p.as_bytes())
}

/// Everything the filter relies on without checking again on the request path.
pub fn check_config(c: &Config) {
    assert!(c.rules.len() <= MAX_RULES);
    assert!(
        c.rules.windows(2).all(|w| w[0].priority >= w[1].priority),
        "rules not in priority order"
    );
    assert!(c.sets.is_power_of_two(), "sets {}", c.sets);
    assert!(
        (table::sets_for(MIN_MAX_CLIENTS)..=table::sets_for(MAX_MAX_CLIENTS)).contains(&c.sets),
        "sets {} outside what max_clients allows",
        c.sets
    );
    let continuing = c.rules.iter().filter(|r| r.continues).count();
    assert!(continuing < MAX_RULES_PER_REQUEST);
    for (i, r) in c.rules.iter().enumerate() {
        assert!(
            !c.rules[..i].iter().any(|o| o.id == r.id),
            "duplicate id {:?}",
            r.id
        );
        check_rule(r);
    }
}

fn check_rule(r: &Rule) {
    assert!(!r.id.is_empty() && r.id.len() <= MAX_ID_LEN);
    assert!(r
        .id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')));
    // The strict check's body is written by hand (it is built per request): it must be
    // the valid request serde would write, for any rule the configuration accepts.
    let body = meshlimit_core::strict::request_body(r, 0x0123_4567_89ab_cdef);
    let req: meshlimit_core::protocol::StrictRequest = meshlimit_core::json::parse(&body)
        .unwrap_or_else(|e| panic!("strict body {}: {e}", String::from_utf8_lossy(&body)));
    assert_eq!(req.validate(), Ok(()));
    assert_eq!(body, serde_json::to_vec(&req).unwrap());

    // The configured path is in normal form, so requests (always normalized) can reach
    // it: an exact path matches itself, a prefix matches what extends it.
    let m = &r.matcher;
    match &m.path {
        PathMatch::Exact(p) => {
            assert!(is_normal_path(p) && !p.contains('*'), "exact path {p:?}");
            assert!(matching::path_matches(m, p.as_bytes()));
        }
        PathMatch::Prefix(p) => {
            assert!(p.is_empty() || is_normal_path(p), "prefix {p:?}");
            assert!(!p.contains('*'), "prefix {p:?}");
            let longer = format!("{p}x");
            assert!(matching::path_matches(m, longer.as_bytes()));
        }
    }
    assert!(m.methods.len() <= MAX_METHODS);
    for (k, method) in m.methods.iter().enumerate() {
        assert!(is_token(method) && *method == method.to_ascii_uppercase());
        assert!(
            !m.methods[..k].contains(method),
            "duplicate method {method:?}"
        );
    }
    assert!(m.headers.len() <= MAX_HEADER_MATCHES);
    for (k, (name, _)) in m.headers.iter().enumerate() {
        assert!(is_token(name) && *name == name.to_ascii_lowercase());
        assert!(!m.headers[..k].iter().any(|(o, _)| o == name));
    }

    assert!(!r.key.is_empty() && r.key.len() <= MAX_KEY_SOURCES);
    for (k, source) in r.key.iter().enumerate() {
        if let KeySource::Header(name) = source {
            assert!(is_token(name) && *name == name.to_ascii_lowercase());
        }
        assert!(!r.key[..k].contains(source), "duplicate key source");
    }

    assert!(!r.limits.is_empty() && r.limits.len() <= MAX_LIMITS_PER_RULE);
    for (k, l) in r.limits.iter().enumerate() {
        assert!((1..=MAX_WINDOW_SECS).contains(&l.window_secs));
        assert!((1..=MAX_COUNT).contains(&l.max) && (1..=MAX_COUNT).contains(&l.burst));
        assert!(l.interval_ns > 0);
        assert_eq!(l.interval_ns, l.window_secs * 1_000_000_000 / l.max);
        assert_eq!(Some(l.depth_ns), l.interval_ns.checked_mul(l.burst));
        assert!(
            !r.limits[..k].iter().any(|o| o.window_secs == l.window_secs),
            "two limits with one window: their policy names collide"
        );
    }
    check_headers(r);
}

/// Runs the rule's buckets once fresh and once empty and checks the headers the filter
/// would send: `RateLimit-Policy` and `RateLimit` are structured-field Lists (RFC 9651)
/// whose names are unique and agree, nothing is cut off by the stack buffers, and on a
/// refusal `t` is not later than `Retry-After`.
fn check_headers(r: &Rule) {
    let policy = headers::policy_header(r);
    let names = sf_items(&policy)
        .into_iter()
        .map(|(name, _)| name)
        .collect::<Vec<_>>();
    assert_eq!(names.len(), r.limits.len(), "{policy}");
    for (i, n) in names.iter().enumerate() {
        assert!(!names[..i].contains(n), "policy names collide: {policy}");
    }

    let mut tats = vec![0u64; r.limits.len()];
    let fresh = gcra::check(&r.limits, &mut tats, NOW_NS, 1);
    assert!(fresh.allowed, "a fresh bucket refused one hit: {r:?}");
    let mut tats: Vec<u64> = r
        .limits
        .iter()
        .map(|l| NOW_NS.saturating_add(l.depth_ns))
        .collect();
    let empty = gcra::check(&r.limits, &mut tats, NOW_NS, 1);
    assert!(!empty.allowed, "an empty bucket admitted a hit: {r:?}");
    assert!(empty.retry_after_ns > 0);

    for d in [fresh, empty] {
        let limit = &r.limits[d.tightest];
        let value = headers::ratelimit_header(&r.id, limit, d.remaining, d.reset_ns);
        let items = sf_items(value.as_str());
        assert_eq!(items.len(), 1, "{}", value.as_str());
        let (name, params) = &items[0];
        assert!(names.contains(name), "{name} not in {policy}");
        let t = params.iter().find(|(k, _)| k == "t").map(|(_, v)| *v);
        let rem = params.iter().find(|(k, _)| k == "r").map(|(_, v)| *v);
        assert_eq!(rem, Some(d.remaining as i64), "{}", value.as_str());
        let t = t.expect("t");
        if !d.allowed {
            let retry = headers::retry_after_secs(d.retry_after_ns);
            assert!(t as u64 <= retry, "t={t} later than Retry-After {retry}");
            let body = headers::rejection_body(&r.id, retry);
            let v: serde_json::Value =
                serde_json::from_slice(body.as_bytes()).expect("429 body is JSON");
            assert_eq!(v["rule"], r.id.as_str());
            assert_eq!(v["retry_after"], retry);
        }
    }
}

/// The items of a structured-field List of Strings with Integer parameters.
fn sf_items(value: &str) -> Vec<(String, Vec<(String, i64)>)> {
    use sfv::{BareItem, List, ListEntry, Parser};
    let list: List = Parser::new(value)
        .parse()
        .unwrap_or_else(|e| panic!("{value:?} is not an SF List: {e}"));
    list.into_iter()
        .map(|e| {
            let ListEntry::Item(item) = e else {
                panic!("inner list in {value:?}");
            };
            let BareItem::String(name) = &item.bare_item else {
                panic!("item is not a String in {value:?}");
            };
            let params = item
                .params
                .iter()
                .map(|(k, v)| match v {
                    BareItem::Integer(n) => (k.as_str().to_owned(), i64::from(*n)),
                    other => panic!("parameter {k:?} is {other:?} in {value:?}"),
                })
                .collect();
            (name.as_str().to_owned(), params)
        })
        .collect()
}
