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
    let v = ratelimit_header(&rule.id, &rule.limits[1], 97, 1_500_000_000);
    assert_eq!(v.as_str(), r#""api_default-1m";r=97;t=2"#);
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
    let v = ratelimit_header(&id, &rule_limit(), u64::MAX, u64::MAX);
    assert!(v.as_str().ends_with(&format!("t={}", ceil_secs(u64::MAX))));
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
