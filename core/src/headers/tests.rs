use std::collections::HashMap;

use super::*;
use crate::config::parse;
use crate::testing::test;

const S: u64 = NANOS;

#[test]
fn seconds_round_up() {
    assert_eq!(ceil_secs(0), 0);
    assert_eq!(ceil_secs(1), 1);
    assert_eq!(ceil_secs(S), 1);
    assert_eq!(ceil_secs(S + 1), 2);
    assert_eq!(retry_after_secs(0), 1, "Retry-After is never 0");
    assert_eq!(retry_after_secs(12 * S), 12);
    assert_eq!(retry_after_secs(11 * S + 1), 12);
    assert_eq!(
        reset_epoch_secs(1_700_000_000 * S + 5, 60 * S),
        1_700_000_061
    );
    assert_eq!(reset_epoch_secs(1_700_000_000 * S, 0), 1_700_000_000);
    assert_eq!(reset_epoch_secs(u64::MAX, u64::MAX), ceil_secs(u64::MAX));
}

#[test]
fn windows_print_in_their_largest_exact_unit() {
    let w = |secs| {
        let mut s = String::new();
        write_window(&mut s, secs).unwrap();
        s
    };
    assert_eq!(w(1), "1s");
    assert_eq!(w(90), "90s");
    assert_eq!(w(60), "1m");
    assert_eq!(w(7200), "2h");
    assert_eq!(w(86_400), "1d");
    assert_eq!(w(5400), "90m");
}

#[test]
fn ietf_policy_and_ratelimit_values() {
    let c = parse(
        br#"{"rules":[{"id":"api_default","match":{"path":"/api/*"},
            "limits":[{"window":"1s","max":10,"burst":20},{"window":"1m","max":100}]}]}"#,
    )
    .unwrap();
    let rule = &c.rules[0];
    assert_eq!(
        policy_header(rule),
        r#""api_default-1s";q=10;w=1, "api_default-1m";q=100;w=60"#
    );
    // 100 a minute: a token every 0.6 s. 97 left and full again in 1.5 s: the tokens
    // still missing come back at 0.3 s, 0.9 s and 1.5 s, so the next one in 0.3 s.
    let v = ratelimit_header(&rule.id, &rule.limits[1], 97, 1_500_000_000);
    assert_eq!(v.as_str(), r#""api_default-1m";r=97;t=1"#);
    // 3 a minute, all spent: full again in 60 s, but a token is back in 20 s.
    let l = crate::config::Limit::new(60, 3, 3).unwrap();
    let v = ratelimit_header("hdr", &l, 0, 60 * S);
    assert_eq!(v.as_str(), r#""hdr-1m";r=0;t=20"#);
    assert_eq!(
        ratelimit_header("hdr", &l, 2, 20 * S).as_str(),
        r#""hdr-1m";r=2;t=20"#
    );
}

#[test]
fn rejection_body_is_json() {
    let body = rejection_body("auth_strict", 45);
    assert_eq!(
        body.as_str(),
        r#"{"error":"rate_limited","rule":"auth_strict","retry_after":45}"#
    );
    let parsed: serde_json::Value = serde_json::from_slice(body.as_bytes()).unwrap();
    assert_eq!(parsed["retry_after"], 45);
    // The longest rule id and number still fit.
    let id = "a".repeat(crate::config::MAX_ID_LEN);
    let body = rejection_body(&id, u64::MAX);
    assert!(serde_json::from_slice::<serde_json::Value>(body.as_bytes()).is_ok());
    let v = ratelimit_header(&id, &rule_limit(), 0, u64::MAX);
    assert!(
        v.as_str()
            .ends_with(&format!(";r=0;t={}", ceil_secs(u64::MAX))),
        "{}",
        v.as_str()
    );
    let v = ratelimit_header(&id, &rule_limit(), u64::MAX, u64::MAX);
    assert!(
        v.as_str().ends_with(&format!(";r={};t=0", u64::MAX)),
        "{}",
        v.as_str()
    );
}

fn rule_limit() -> crate::config::Limit {
    crate::config::Limit::new(86_400 * 366, 1, 1).unwrap()
}

#[test]
fn stack_strings_refuse_overflow_instead_of_growing() {
    let mut s = StackStr::<4>::new();
    assert!(s.write_str("abcd").is_ok());
    assert!(s.write_str("e").is_err());
    assert_eq!(s.as_str(), "abcd");
    assert_eq!(num(0).as_str(), "0");
    assert_eq!(num(u64::MAX).as_str(), "18446744073709551615");
}

/// Parses `RateLimit-Policy` and `RateLimit` as structured fields (RFC 9651) and checks
/// them against draft-ietf-httpapi-ratelimit-headers-10/-11: Lists of Items whose bare
/// item is a String, `q` (required, non-negative Integer) and `w` (positive Integer) on
/// policies, `r` (required, non-negative Integer) and `t` (non-negative Integer) on the
/// service limit, which names a listed policy. With a `Retry-After`, `t` must not name a
/// later time. Returns (policy name, r, t) of the `RateLimit` item.
pub(crate) fn check_ietf_fields(
    policy: &str,
    ratelimit: &str,
    retry_after: Option<u64>,
) -> (String, i64, i64) {
    use sfv::{BareItem, List, ListEntry, Parser};
    let items = |field: &str, value: &str| -> Vec<sfv::Item> {
        let list: List = Parser::new(value)
            .parse()
            .unwrap_or_else(|e| panic!("{field}: {value:?} is not an SF List: {e}"));
        assert!(!list.is_empty(), "{field}: empty list");
        list.into_iter()
            .map(|e| match e {
                ListEntry::Item(i) => i,
                ListEntry::InnerList(_) => panic!("{field}: inner list in {value:?}"),
            })
            .collect()
    };
    let int = |item: &sfv::Item, key: &str| -> Option<i64> {
        item.params.get(key).map(|v| match v {
            BareItem::Integer(n) => i64::from(*n),
            other => panic!("parameter {key} is not an Integer: {other:?}"),
        })
    };
    let name = |item: &sfv::Item| match &item.bare_item {
        BareItem::String(s) => s.as_str().to_owned(),
        other => panic!("item is not a String: {other:?}"),
    };
    let mut names = Vec::new();
    for p in items("RateLimit-Policy", policy) {
        let q = int(&p, "q").expect("q is required");
        assert!(q >= 0, "q {q}");
        let w = int(&p, "w").expect("w");
        assert!(w > 0, "w {w}");
        let n = name(&p);
        assert!(!names.contains(&n), "policy names are unique: {policy}");
        names.push(n);
    }
    let limits = items("RateLimit", ratelimit);
    assert_eq!(limits.len(), 1, "one service limit: {ratelimit}");
    let l = &limits[0];
    let n = name(l);
    assert!(
        names.contains(&n),
        "{n} is not among the policies {names:?}"
    );
    let r = int(l, "r").expect("r is required");
    let t = int(l, "t").expect("t");
    assert!(r >= 0 && t >= 0, "{ratelimit}");
    if let Some(retry) = retry_after {
        assert!(
            t <= retry as i64,
            "Retry-After {retry} is earlier than t={t} ({ratelimit})"
        );
    }
    (n, r, t)
}

#[test]
fn ietf_fields_follow_the_drafts_grammar_and_agree_with_retry_after() {
    use crate::gcra::check;
    let c = parse(
        br#"{"rules":[{"id":"auth","match":{"path":"/a"},
            "limits":[{"window":"1m","max":5},{"window":"1h","max":20},{"window":"1s","max":3,"burst":4}]}]}"#,
    )
    .unwrap();
    let rule = &c.rules[0];
    let policy = policy_header(rule);
    let mut tats = [0u64; 3];
    let mut now = 1_700_000_000 * S;
    let mut refusals = 0;
    // Admit and refuse through every state for a while, checking every answer.
    for step in 0..400u64 {
        now += (step % 7) * S / 5;
        let d = check(&rule.limits, &mut tats, now, 1);
        let limit = &rule.limits[d.tightest];
        let v = ratelimit_header(&rule.id, limit, d.remaining, d.reset_ns);
        let retry = (!d.allowed).then(|| retry_after_secs(d.retry_after_ns));
        let (name, r, t) = check_ietf_fields(&policy, v.as_str(), retry);
        assert_eq!(r as u64, d.remaining);
        if let Some(retry) = retry {
            refusals += 1;
            // On a 429, the item is the limit Retry-After comes from: same second.
            assert_eq!(t as u64, retry, "step {step}: {}", v.as_str());
            assert_eq!(r, 0);
            let mut expect = String::new();
            write_policy_name(&mut expect, &rule.id, limit).unwrap();
            assert_eq!(name, expect);
        } else {
            assert!(t >= 1, "tokens are missing after an admission: t ≥ 1");
        }
    }
    assert!(refusals > 50, "the loop reached refusals ({refusals})");
}

// catch_unwind needs unwinding, which wasm32-unknown-unknown does not have: native only.
#[cfg(not(target_arch = "wasm32"))]
#[test]
fn the_grammar_check_can_fail() {
    let policy = r#""a-1m";q=5;w=60"#;
    let bad = [
        (policy, r#""a-1m";r=1;t=70"#, Some(12)), // t later than Retry-After
        (policy, r#"a-1m;r=1;t=1"#, None),        // a Token, not a String
        (policy, r#""b-1m";r=1;t=1"#, None),      // not a listed policy
        (policy, r#""a-1m";r=1.5;t=1"#, None),    // not an Integer
        (policy, r#""a-1m";t=1"#, None),          // r missing
        (
            r#""a-1m";q=5;w=60, "a-1m";q=9;w=60"#,
            r#""a-1m";r=1;t=1"#,
            None,
        ), // duplicate name
        (policy, r#""a-1m";r=1;t=1,"#, None),     // not a List
    ];
    for (p, r, retry) in bad {
        let caught = std::panic::catch_unwind(|| check_ietf_fields(p, r, retry));
        assert!(caught.is_err(), "{p} / {r} should fail");
    }
}

fn two_limit_rule() -> crate::config::Config {
    parse(
        br#"{"rules":[{"id":"api","match":{"path":"/api/*"},
            "limits":[{"window":"1s","max":10},{"window":"1m","max":100}]}]}"#,
    )
    .unwrap()
}

#[test]
fn rate_limit_headers_follow_the_configured_style_and_the_tightest_limit() {
    use crate::gcra::check;
    let c = two_limit_rule();
    let rule = &c.rules[0];
    let policy = policy_header(rule);
    let now = 1_700_000_000 * S;
    // The 1 s limit full, the minute (a token per 0.6 s) full again in 56.4 s: after
    // this request 5 tokens are left there and 9 in the second, so the headers describe
    // the minute.
    let mut tats = [0, now + 56_400_000_000];
    let d = check(&rule.limits, &mut tats, now, 1);
    assert!(d.allowed);
    assert_eq!((d.tightest, d.remaining), (1, 5));
    let names = |mode| -> Vec<&'static str> {
        RateLimitHeaders::new(mode, rule, &policy, &d, now)
            .pairs()
            .map(|(k, _)| k)
            .collect()
    };
    let x = [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ];
    let ietf = ["ratelimit-policy", "ratelimit"];
    assert_eq!(names(HeaderMode::XRatelimit), x);
    assert_eq!(names(HeaderMode::Ietf), ietf);
    assert_eq!(names(HeaderMode::Both), [&x[..], &ietf[..]].concat());
    assert!(names(HeaderMode::None).is_empty());

    let h = RateLimitHeaders::new(HeaderMode::Both, rule, &policy, &d, now);
    let values: HashMap<&str, &str> = h.pairs().collect();
    assert_eq!(values["x-ratelimit-limit"], "100");
    assert_eq!(values["x-ratelimit-remaining"], "5");
    let reset = reset_epoch_secs(now, d.reset_ns).to_string();
    assert_eq!(values["x-ratelimit-reset"], reset);
    assert_eq!(values["ratelimit-policy"], policy);
    let (name, r, _) = check_ietf_fields(&policy, values["ratelimit"], None);
    assert_eq!((name.as_str(), r), ("api-1m", 5));

    // A decision naming a limit the rule does not have (a fail-open take names 0, but
    // nothing else guards it) describes the rule's last limit, never panics.
    let odd = Decision {
        tightest: 7,
        ..Decision::UNMETERED
    };
    let h = RateLimitHeaders::new(HeaderMode::XRatelimit, rule, &policy, &odd, now);
    assert_eq!(h.pairs().next(), Some(("x-ratelimit-limit", "100")));
}

#[test]
fn a_rejection_carries_retry_after_then_its_body_type_then_the_rate_limit_headers() {
    use crate::gcra::check;
    let c = parse(
        br#"{"rules":[{"id":"login","match":{"path":"/login"},
            "limits":[{"window":"1m","max":2}]}]}"#,
    )
    .unwrap();
    let rule = &c.rules[0];
    let policy = policy_header(rule);
    let now = 1_700_000_000 * S;
    let mut tats = [0u64; 1];
    check(&rule.limits, &mut tats, now, 1);
    check(&rule.limits, &mut tats, now, 1);
    let d = check(&rule.limits, &mut tats, now + S / 2, 1);
    assert!(!d.allowed);
    let rejection = Rejection::new(&rule.id, &d);
    // 30 s until a token is back, minus the half second already waited: 30 rounded up.
    let headers = |mode| {
        let rate_limit = RateLimitHeaders::new(mode, rule, &policy, &d, now + S / 2);
        rejection
            .headers(&rate_limit)
            .map(|(k, v)| (k, v.to_owned()))
            .collect::<Vec<_>>()
    };
    let reset = reset_epoch_secs(now + S / 2, d.reset_ns).to_string();
    assert_eq!(
        headers(HeaderMode::XRatelimit),
        [
            ("retry-after", "30".to_owned()),
            ("content-type", "application/json".to_owned()),
            ("x-ratelimit-limit", "2".to_owned()),
            ("x-ratelimit-remaining", "0".to_owned()),
            ("x-ratelimit-reset", reset),
        ]
    );
    let ietf = headers(HeaderMode::Ietf);
    assert_eq!(ietf.len(), 4);
    let (_, r, t) = check_ietf_fields(&ietf[2].1, &ietf[3].1, Some(30));
    assert_eq!((r, t), (0, 30));
    assert_eq!(
        headers(HeaderMode::None).len(),
        2,
        "Retry-After is always sent"
    );
    let body: serde_json::Value = serde_json::from_slice(rejection.body()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": "rate_limited", "rule": "login", "retry_after": 30})
    );
}

#[test]
fn the_closed_failure_mode_says_the_limiter_is_unavailable() {
    let r = super::Rejection::unavailable("pay");
    assert_eq!(
        std::str::from_utf8(r.body()).unwrap(),
        r#"{"error":"limiter_unavailable","rule":"pay","retry_after":1}"#
    );
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["retry_after"], 1);
}
