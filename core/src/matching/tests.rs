use super::*;
use crate::config::parse;
use crate::gcra::Decision;
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
    let path = crate::path::normalize(path.as_bytes()).unwrap();
    let i = find_rule(
        &rules,
        &path,
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
        find("/healthz/", "GET", &[]).as_deref(),
        Some("health"),
        "an exact path also matches with a trailing slash"
    );
    assert_eq!(
        find("/api", "GET", &[]),
        None,
        "prefix /api/ needs the slash"
    );
    assert_eq!(find("/other", "GET", &[]), None);
    assert_eq!(find("", "GET", &[]), None);
}

#[test]
fn every_spelling_meets_its_rule() {
    for (class, spelling) in crate::path::tests::LOGIN_SPELLINGS {
        assert_eq!(
            find(spelling, "POST", &[]).as_deref(),
            Some("auth"),
            "{class}: {spelling:?}"
        );
    }
    assert_eq!(
        find("/HEALTHZ", "GET", &[]),
        None,
        "case-sensitive by default"
    );
}

#[test]
fn methods_compare_case_insensitively_and_get_covers_head() {
    for m in ["POST", "post", "Post", "pOsT"] {
        assert_eq!(
            find("/api/auth/login", m, &[]).as_deref(),
            Some("auth"),
            "{m}"
        );
    }
    assert_eq!(find("/api/auth/login", "PUT", &[]).as_deref(), Some("api"));
    let get = vec!["GET".to_string()];
    assert!(method_matches(&get, b"HEAD") && method_matches(&get, b"head"));
    assert!(method_matches(&get, b"get"));
    assert!(!method_matches(&get, b"POST"));
    let head = vec!["HEAD".to_string()];
    assert!(!method_matches(&head, b"GET"), "HEAD does not cover GET");
}

#[test]
fn case_insensitive_paths_are_opt_in() {
    let rules = parse(
        br#"{"rules":[
          {"id":"ci","match":{"path":"/api/auth/*","case_sensitive":false},"limits":[{"window":"1m","max":5}]},
          {"id":"exact","match":{"path":"/Login","case_sensitive":false},"limits":[{"window":"1m","max":5}]}]}"#,
    )
    .unwrap()
    .rules;
    let id = |p: &str| {
        let p = crate::path::normalize(p.as_bytes()).unwrap();
        find_rule(&rules, &p, || None, |_| None).map(|i| rules[i].id.as_str())
    };
    assert_eq!(id("/API/Auth/login"), Some("ci"));
    assert_eq!(id("/%41PI/AUTH/x"), Some("ci"));
    assert_eq!(id("/LOGIN/"), Some("exact"));
    assert_eq!(id("/apix"), None);
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
                .map_or(HeaderValue::Absent, |(_, v)| {
                    HeaderValue::One(v.as_bytes().to_vec())
                })
        }
    };
    assert_eq!(
        client_id(api, hdr(&[("x-api-key", "K"), ("x-user-id", "U")]), ip),
        ClientKey::Id(0, b"K".to_vec())
    );
    assert_eq!(
        client_id(api, hdr(&[("x-user-id", "U")]), ip),
        ClientKey::Id(1, b"U".to_vec())
    );
    assert_eq!(
        client_id(api, hdr(&[]), ip),
        ClientKey::Id(2, b"10.0.0.1".to_vec())
    );
    // Empty values count as absent.
    assert_eq!(
        client_id(api, hdr(&[("x-api-key", "")]), ip),
        ClientKey::Id(2, b"10.0.0.1".to_vec())
    );
    // No source present: the rule does not apply.
    let only = rules.iter().find(|r| r.id == "hdr_only").unwrap();
    assert_eq!(
        client_id(only, hdr(&[("x-api-key", "K")]), ip),
        ClientKey::Missing
    );
}

#[test]
fn a_repeated_key_header_is_never_charged() {
    let rules = rules();
    let api = rules.iter().find(|r| r.id == "api").unwrap();
    let repeated = |name: &str| {
        if name == "x-api-key" {
            HeaderValue::Repeated
        } else {
            HeaderValue::Absent
        }
    };
    let mut ip_asked = false;
    let got = client_id(api, repeated, || {
        ip_asked = true;
        Some(b"10.0.0.1".to_vec())
    });
    assert_eq!(got, ClientKey::Repeated(0));
    assert!(!ip_asked, "no fallback to a later source");
    // Repeated but not reached (an earlier source is present): no matter.
    let later = |name: &str| match name {
        "x-api-key" => HeaderValue::One(b"K".to_vec()),
        _ => HeaderValue::Repeated,
    };
    assert_eq!(
        client_id(api, later, || None),
        ClientKey::Id(0, b"K".to_vec())
    );
}

#[test]
fn one_header_is_told_from_several() {
    let v = |s: &str| Some(s.as_bytes().to_vec());
    let mut first_asked = 0;
    assert_eq!(
        HeaderValue::from_joined(v("abc"), || {
            first_asked += 1;
            None
        }),
        HeaderValue::One(b"abc".to_vec())
    );
    assert_eq!(first_asked, 0, "no comma: one host call");
    assert_eq!(
        HeaderValue::from_joined(None, || v("x")),
        HeaderValue::Absent
    );
    // One value holding a comma.
    assert_eq!(
        HeaderValue::from_joined(v("a,b"), || v("a,b")),
        HeaderValue::One(b"a,b".to_vec())
    );
    // Two headers: Envoy's joined value differs from the first one.
    assert_eq!(
        HeaderValue::from_joined(v("a,b"), || v("a")),
        HeaderValue::Repeated
    );
    assert_eq!(
        HeaderValue::from_joined(v(","), || v("")),
        HeaderValue::Repeated
    );
    assert_eq!(
        HeaderValue::from_joined(v("a,"), || v("a")),
        HeaderValue::Repeated
    );
    assert_eq!(
        HeaderValue::from_joined(v("a,b"), || None),
        HeaderValue::Repeated
    );
}

/// Runs `decide` over `rules` for a request with the given key headers and IP, each
/// rule's bucket answering from `allow` (rule id → allowed?). Returns the verdict, the
/// ids charged in order, and the tally.
fn run(
    rules: &[Rule],
    path: &str,
    headers: &[(&str, &str)],
    allow: &dyn Fn(&str) -> bool,
) -> (Verdict, Vec<String>, Tally) {
    let path = crate::path::normalize(path.as_bytes()).unwrap();
    let mut charged = Vec::new();
    let mut tally = Tally::default();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(HeaderValue::Absent, |(_, v)| {
                HeaderValue::One(v.as_bytes().to_vec())
            })
    };
    let verdict = decide(
        rules,
        matching_rules(rules, &path, || Some(b"POST".to_vec()), |_| None),
        |rule| client_id(rule, header, || Some(b"10.0.0.1".to_vec())),
        |_, rule, _fp| {
            charged.push(rule.id.clone());
            let ok = allow(&rule.id);
            Decision {
                allowed: ok,
                tightest: 0,
                remaining: if ok { rule.limits[0].max - 1 } else { 0 },
                reset_ns: 1,
                retry_after_ns: if ok { 0 } else { 5 },
                changed: ok,
            }
        },
        &mut tally,
    );
    (verdict, charged, tally)
}

fn login_rules() -> Vec<Rule> {
    parse(
        br#"{"rules":[
      {"id":"login-key","priority":11,"match":{"path":"/api/auth/*","methods":["POST"]},
       "key":["header:x-api-key"],"limits":[{"window":"1m","max":5}],"continue":true},
      {"id":"login-ip","priority":10,"match":{"path":"/api/auth/*","methods":["POST"]},
       "key":["ip"],"limits":[{"window":"1m","max":20}]},
      {"id":"api","match":{"path":"/api/*"},"key":["header:x-user-id"],"limits":[{"window":"1s","max":10}]},
      {"id":"ceiling","priority":-10,"match":{"path":"*"},"key":["ip"],"limits":[{"window":"1s","max":100}]}
    ]}"#,
    )
    .unwrap()
    .rules
}

#[test]
fn continue_charges_the_next_rule_too() {
    let rules = login_rules();
    let all = |_: &str| true;
    let (v, charged, _) = run(&rules, "/api/auth/login", &[("x-api-key", "k")], &all);
    assert_eq!(charged, ["login-key", "login-ip"]);
    // The headers describe the limit closest to running out: the per-key one (4 left).
    let Verdict::Allowed(a) = v else {
        panic!("{v:?}")
    };
    assert_eq!(rules[a.rule].id, "login-key");
    // A refusal by the per-key limit stops the chain: the per-IP ceiling is not spent.
    let (v, charged, _) = run(&rules, "/api/auth/login", &[("x-api-key", "k")], &|id| {
        id != "login-key"
    });
    assert_eq!(charged, ["login-key"]);
    assert!(matches!(v, Verdict::Rejected(a) if rules[a.rule].id == "login-key"));
    // A fresh key every time is admitted by the per-key rule and meets the ceiling.
    let (v, charged, _) = run(
        &rules,
        "/api/auth/login",
        &[("x-api-key", "fresh")],
        &|id| id != "login-ip",
    );
    assert_eq!(charged, ["login-key", "login-ip"]);
    assert!(matches!(v, Verdict::Rejected(a) if rules[a.rule].id == "login-ip"));
    // Without the key header, the per-key rule is passed over, the per-IP one applies.
    let (v, charged, tally) = run(&rules, "/api/auth/login", &[], &all);
    assert_eq!(charged, ["login-ip"]);
    assert_eq!(tally.no_client_key, 1);
    assert!(matches!(v, Verdict::Allowed(a) if rules[a.rule].id == "login-ip"));
}

#[test]
fn a_rule_without_its_key_falls_through_to_the_next() {
    let rules = login_rules();
    // No x-user-id: the "api" rule does not apply, the ceiling does (it used to let the
    // request through unlimited).
    let (v, charged, tally) = run(&rules, "/api/items", &[], &|_| true);
    assert_eq!(charged, ["ceiling"]);
    assert_eq!(tally.no_client_key, 1);
    assert!(matches!(v, Verdict::Allowed(a) if rules[a.rule].id == "ceiling"));
    // With it, "api" applies and, without continue, is the last.
    let (_, charged, _) = run(&rules, "/api/items", &[("x-user-id", "u")], &|_| true);
    assert_eq!(charged, ["api"]);
    // Nothing applies at all.
    let only_key = parse(
        br#"{"rules":[{"id":"k","match":{"path":"/k"},"key":["header:x-api-key"],"limits":[{"window":"1s","max":1}]}]}"#,
    )
    .unwrap()
    .rules;
    let (v, charged, tally) = run(&only_key, "/k", &[], &|_| true);
    assert_eq!(
        (v, charged.len(), tally.no_client_key),
        (Verdict::Unlimited, 0, 1)
    );
}

#[test]
fn shadow_refusals_continue_and_repeated_keys_stop() {
    let rules = parse(
        br#"{"rules":[
      {"id":"dry","priority":1,"match":{"path":"*"},"limits":[{"window":"1m","max":5}],"shadow":true,"continue":true},
      {"id":"real","match":{"path":"*"},"limits":[{"window":"1m","max":5}]}]}"#,
    )
    .unwrap()
    .rules;
    let (v, charged, tally) = run(&rules, "/x", &[], &|id| id != "dry");
    assert_eq!(charged, ["dry", "real"]);
    assert_eq!(tally.shadow_rejected, 1);
    // The shadow refusal (0 left) is what the headers describe.
    assert!(matches!(v, Verdict::Allowed(a) if rules[a.rule].id == "dry"));
    let mut tally = Tally::default();
    let v = decide(
        &rules,
        matching_rules(&rules, b"/x", || None, |_| None),
        |_| ClientKey::Repeated(0),
        |_, _, _| unreachable!("a repeated key header is never charged"),
        &mut tally,
    );
    assert_eq!(v, Verdict::RepeatedKeyHeader { rule: 0, source: 0 });
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
fn ports_are_removed() {
    assert_eq!(strip_port(b"1.2.3.4:5678"), b"1.2.3.4");
    assert_eq!(strip_port(b"[::1]:5678"), b"::1");
    assert_eq!(strip_port(b"::1"), b"::1");
    assert_eq!(strip_port(b"1.2.3.4"), b"1.2.3.4");
    assert_eq!(strip_port(b"[broken"), b"[broken");
}
