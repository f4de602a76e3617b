//! Strict scope: one request decided by the companion, atomically in its store, while
//! the filter holds the request (`POST /v1/strict`). The callout carries the rule's
//! limits and the client's fingerprint, like a report does, so the filter's
//! configuration stays the one source of truth; this module builds it and reads the
//! answer into the [`Decision`] the rest of the filter already knows how to answer.

use crate::config::Rule;
use crate::gcra::Decision;
use crate::protocol::{StrictAnswer, MAX_ANSWER_BYTES};
use crate::sync::SyncFailure;

/// The body of the strict check of one hit of `rule` for the client `fingerprint`: a
/// [`crate::protocol::StrictRequest`], written straight into one buffer (it is built on the request
/// path). A rule id is `[A-Za-z0-9_.-]` (the configuration refuses anything else), so it
/// needs no JSON escaping.
pub fn request_body(rule: &Rule, fingerprint: u64) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(64 + rule.id.len() + 48 * rule.limits.len());
    let _ = write!(
        out,
        r#"{{"rule":"{}","key":"{fingerprint:016x}","limits":["#,
        rule.id
    );
    for (i, l) in rule.limits.iter().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        let _ = write!(
            out,
            r#"{comma}{{"window_secs":{},"max":{},"burst":{}}}"#,
            l.window_secs, l.max, l.burst
        );
    }
    out.extend_from_slice(br#"],"hits":1}"#);
    out
}

/// The companion's decision, from the callout's status and body, checked against the
/// rule it was asked about (the headers must describe one of its limits).
pub fn parse_answer(status: u32, body: &[u8], rule: &Rule) -> Result<Decision, SyncFailure> {
    if status != 200 {
        return Err(SyncFailure::Status(status));
    }
    if body.len() > MAX_ANSWER_BYTES {
        return Err(SyncFailure::Oversized(body.len()));
    }
    // Read strictly (objects only, nothing after them), the failure naming its field.
    let a: StrictAnswer = crate::json::parse(body).map_err(SyncFailure::Invalid)?;
    if a.tightest >= rule.limits.len() {
        return Err(SyncFailure::Invalid(
            "tightest: not an index of the rule's limits".into(),
        ));
    }
    let ms = |v: u64| v.saturating_mul(1_000_000);
    let limit = &rule.limits[a.tightest];
    Ok(Decision {
        allowed: a.allowed,
        tightest: a.tightest,
        remaining: a.remaining.min(limit.burst),
        reset_ns: ms(a.reset_ms).min(limit.depth_ns),
        // A refusal waits at least a millisecond (Retry-After rounds it up to 1 s).
        retry_after_ns: if a.allowed {
            0
        } else {
            ms(a.retry_after_ms).max(1_000_000)
        },
        changed: false,
    })
}

/// What a strict rule's place in a chain decides before its callout: admitted, with
/// nothing left to describe, so any other rule charged describes the headers until
/// the answer comes.
pub const PROVISIONAL: Decision = Decision {
    allowed: true,
    tightest: 0,
    remaining: u64::MAX,
    reset_ns: 0,
    retry_after_ns: 0,
    changed: false,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::protocol::{LimitSpec, StrictRequest};
    use crate::testing::test;

    fn rule() -> Rule {
        let json = br#"{"service":{"cluster":"c","token":"t"},"rules":[{"id":"pay","match":{"path":"/pay"},"scope":"strict","limits":[{"window":"1s","max":5},{"window":"1m","max":100,"burst":20}]}]}"#;
        parse(json).unwrap().rules.remove(0)
    }

    #[test]
    fn the_request_carries_the_rules_limits_and_the_fingerprint() {
        let r = rule();
        let body = request_body(&r, 0x00ab_cdef_0123_4567);
        let req: StrictRequest = crate::json::parse(&body).unwrap();
        // Byte for byte what serde writes for it, so the companion reads what it expects.
        assert_eq!(body, serde_json::to_vec(&req).unwrap());
        assert!(req.validate().is_ok());
        assert_eq!(req.rule, "pay");
        assert_eq!(req.key, "00abcdef01234567");
        assert_eq!(req.hits, 1);
        assert_eq!(
            req.limits,
            [
                LimitSpec {
                    window_secs: 1,
                    max: 5,
                    burst: 5
                },
                LimitSpec {
                    window_secs: 60,
                    max: 100,
                    burst: 20
                }
            ]
        );
    }

    #[test]
    fn answers_become_decisions_and_bad_ones_failures() {
        let r = rule();
        let ok =
            br#"{"allowed":true,"tightest":1,"remaining":7,"reset_ms":9000,"retry_after_ms":0}"#;
        let d = parse_answer(200, ok, &r).unwrap();
        assert!(d.allowed);
        assert_eq!(
            (d.tightest, d.remaining, d.reset_ns, d.retry_after_ns),
            (1, 7, 9_000_000_000, 0)
        );
        let no =
            br#"{"allowed":false,"tightest":0,"remaining":0,"reset_ms":1000,"retry_after_ms":200}"#;
        let d = parse_answer(200, no, &r).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, 200_000_000);
        assert_eq!(crate::headers::retry_after_secs(d.retry_after_ns), 1);
        // Numbers beyond the rule's own are cut to it: the headers never claim more.
        let big = br#"{"allowed":true,"tightest":0,"remaining":99999,"reset_ms":99999999,"retry_after_ms":0}"#;
        let d = parse_answer(200, big, &r).unwrap();
        assert_eq!((d.remaining, d.reset_ns), (5, 1_000_000_000));
        for (status, body, want) in [
            (503, &b"{}"[..], "status 503"),
            (504, b"", "status 504"),
            (401, b"{}", "401: the companion refused the token"),
            (200, b"{\"allowed\":", "an invalid answer"),
            (200, b"[true,0,0,0,0]", "expected a JSON object"),
            (
                200,
                br#"{"allowed":"yes","tightest":0,"remaining":1,"reset_ms":1,"retry_after_ms":0}"#,
                "allowed: invalid type",
            ),
            (
                200,
                br#"{"allowed":true,"tightest":0,"remaining":1,"reset_ms":1,"retry_after_ms":0} {}"#,
                "trailing characters",
            ),
            (
                200,
                br#"{"allowed":true,"tightest":2,"remaining":1,"reset_ms":1,"retry_after_ms":0}"#,
                "tightest: not an index",
            ),
            (
                200,
                br#"{"allowed":true,"tightest":0,"remaining":1,"reset_ms":1,"retry_after_ms":0,"x":1}"#,
                "unknown field",
            ),
        ] {
            let e = parse_answer(status, body, &r).unwrap_err().to_string();
            assert!(e.contains(want), "{status} {body:?}: {e}");
        }
        let huge = vec![b' '; MAX_ANSWER_BYTES + 1];
        assert!(matches!(
            parse_answer(200, &huge, &r),
            Err(SyncFailure::Oversized(_))
        ));
    }
}
