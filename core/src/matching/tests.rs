use super::*;
use crate::config::parse;
use crate::testing::test;

fn rules() -> Vec<Rule> {
    parse(
        br#"{"rules":[
      {"id":"auth","priority":10,"match":{"path":"/api/auth/*","methods":["POST"]},
       "limits":[{"window":"1m","max":5}]},
      {"id":"free","match":{"path":"/api/*","headers":{"x-tier":"free"}},
       "limits":[{"window":"1s","max":10}]},
      {"id":"api","match":{"path":"/api/*"},"limits":[{"window":"1s","max":100}]},
      {"id":"health","priority":20,"match":{"path":"/healthz"},"limits":[{"window":"1s","max":1}]},
      {"id":"ip_only","match":{"path":"/ip/*"},"key":["ip"],"limits":[{"window":"1s","max":1}]},
      {"id":"hdr_only","match":{"path":"/h/*"},"key":["header:x-tenant"],"limits":[{"window":"1s","max":1}]}
    ]}"#,
    )
    .unwrap()
    .rules
}

fn find(path: &str, method: &str, headers: &[(&str, &str)]) -> Option<String> {
    let rules = rules();
    let i = find_rule(
        &rules,
        path.as_bytes(),
        || Some(method.as_bytes().to_vec()),
        |name| {
            headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        },
    )?;
    Some(rules[i].id.clone())
}

#[test]
fn paths_methods_headers_and_priority() {
    assert_eq!(
        find("/api/auth/login", "POST", &[]).as_deref(),
        Some("auth")
    );
    assert_eq!(find("/api/auth/login", "GET", &[]).as_deref(), Some("api"));
    assert_eq!(
        find("/api/x", "GET", &[("x-tier", "free")]).as_deref(),
        Some("free")
    );
    assert_eq!(
        find("/api/x", "GET", &[("x-tier", "gold")]).as_deref(),
        Some("api")
    );
    assert_eq!(
        find("/api/x", "GET", &[("x-tier", "FREE")]).as_deref(),
        Some("api"),
        "values are exact"
    );
    assert_eq!(find("/healthz", "GET", &[]).as_deref(), Some("health"));
    assert_eq!(find("/healthz/x", "GET", &[]), None, "exact path");
    assert_eq!(
        find("/api", "GET", &[]),
        None,
        "prefix /api/ needs the slash"
    );
    assert_eq!(find("/other", "GET", &[]), None);
    assert_eq!(find("", "GET", &[]), None);
}

#[test]
fn query_and_fragment_are_ignored() {
    assert_eq!(
        find("/healthz?verbose=1", "GET", &[]).as_deref(),
        Some("health")
    );
    assert_eq!(find("/healthz#x", "GET", &[]).as_deref(), Some("health"));
    assert_eq!(path_only(b"/a?b?c"), b"/a");
}

#[test]
fn method_is_fetched_only_when_a_rule_needs_it() {
    let rules = rules();
    let mut asked = 0;
    let got = find_rule(
        &rules,
        b"/healthz",
        || {
            asked += 1;
            Some(b"GET".to_vec())
        },
        |_| None,
    );
    assert_eq!(got.map(|i| rules[i].id.as_str()), Some("health"));
    assert_eq!(asked, 0);
    let mut asked = 0;
    find_rule(
        &rules,
        b"/api/auth/x",
        || {
            asked += 1;
            Some(b"GET".to_vec())
        },
        |_| None,
    );
    assert_eq!(asked, 1);
}

#[test]
fn api_key_beats_user_beats_ip() {
    let rules = rules();
    let api = rules.iter().find(|r| r.id == "api").unwrap();
    let ip = || Some(b"10.0.0.1".to_vec());
    let hdr = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }
    };
    assert_eq!(
        client_id(api, hdr(&[("x-api-key", "K"), ("x-user-id", "U")]), ip),
        Some((0, b"K".to_vec()))
    );
    assert_eq!(
        client_id(api, hdr(&[("x-user-id", "U")]), ip),
        Some((1, b"U".to_vec()))
    );
    assert_eq!(
        client_id(api, hdr(&[]), ip),
        Some((2, b"10.0.0.1".to_vec()))
    );
    // Empty values count as absent.
    assert_eq!(
        client_id(api, hdr(&[("x-api-key", "")]), ip),
        Some((2, b"10.0.0.1".to_vec()))
    );
    // No source present: the rule does not apply.
    let only = rules.iter().find(|r| r.id == "hdr_only").unwrap();
    assert_eq!(client_id(only, hdr(&[("x-api-key", "K")]), ip), None);
}

#[test]
fn fingerprints_separate_rules_sources_and_ids() {
    let rules = rules();
    let a = &rules[0];
    let b = &rules[1];
    assert_eq!(fingerprint(a, 0, b"k"), fingerprint(a, 0, b"k"));
    assert_ne!(fingerprint(a, 0, b"k"), fingerprint(b, 0, b"k"));
    assert_ne!(
        fingerprint(a, 0, b"abc"),
        fingerprint(a, 1, b"abc"),
        "key abc ≠ user abc"
    );
    // Any length and any bytes give 8 bytes.
    let huge = vec![0xffu8; 10 * 1024];
    assert_ne!(fingerprint(a, 0, &huge), fingerprint(a, 0, &huge[1..]));
}

#[test]
fn ports_and_forwarded_hops() {
    assert_eq!(strip_port(b"1.2.3.4:5678"), b"1.2.3.4");
    assert_eq!(strip_port(b"[::1]:5678"), b"::1");
    assert_eq!(strip_port(b"::1"), b"::1");
    assert_eq!(strip_port(b"1.2.3.4"), b"1.2.3.4");
    assert_eq!(strip_port(b"[broken"), b"[broken");
    let xff = b"203.0.113.9, 10.0.0.1 ,10.0.0.2";
    assert_eq!(xff_hop(xff, 1), Some(&b"10.0.0.2"[..]));
    assert_eq!(xff_hop(xff, 2), Some(&b"10.0.0.1"[..]));
    assert_eq!(xff_hop(xff, 3), Some(&b"203.0.113.9"[..]));
    assert_eq!(xff_hop(xff, 4), None);
    assert_eq!(xff_hop(xff, 0), None);
    assert_eq!(xff_hop(b"a,,b", 2), None, "empty hop");
}
