//! The wire protocol between the filter and the companion service: one set of types,
//! used by both sides, so they cannot drift.
//!
//! `POST /v1/sync` carries a proxy's batched report ([`SyncReport`]): per (rule, client
//! key), what it admitted and rejected since its last report, with the rule's limits
//! themselves so the filter's configuration stays the one source of truth for the
//! limits it enforces. The answer ([`SyncAnswer`]) gives, per entry, this proxy's share
//! of each limit (parts per 10⁹), valid for `lease_ms`, and the number of live proxies.
//! `POST /v1/strict` ([`StrictRequest`]) asks the companion to decide one request.
//!
//! `POST /rate-limit/check` is the seed's synchronous check against the companion's own
//! rules file.
//!
//! Client keys on the wire are fingerprints (16 hex digits of [`crate::hash`]), never raw
//! API keys; the companion hashes them once more before they become Redis keys.

use serde::{Deserialize, Serialize, Serializer};

/// Most entries one sync may carry.
pub const MAX_SYNC_ENTRIES: usize = 10_000;
/// Largest request body the companion reads.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Longest client id accepted by `/rate-limit/check`.
pub const MAX_CLIENT_ID_LEN: usize = 1024;
/// Most hits one check or report may claim.
pub const MAX_HITS: u64 = 1_000_000;
pub const MAX_PROXY_ID_LEN: usize = 128;
pub const MAX_ZONE_LEN: usize = 64;
/// A sync `key` is a client fingerprint: exactly this many lower-case hex digits.
pub const KEY_HEX_DIGITS: usize = 16;

/// Every wire type here is an object and nothing else, at every depth (never fields by
/// position from an array): each derives with `#[serde(remote = "Self")]` and gets its
/// trait impls from this macro, reading through `crate::strict`.
macro_rules! object_only {
    ($($t:ty),* $(,)?) => {$(
        crate::json::deserialize_strictly!($t);
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$t>::serialize(self, s)
            }
        }
    )*};
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct CheckRequest {
    pub client_id: String,
    pub rule_id: String,
    /// Requests to count, default 1.
    #[serde(default)]
    pub hits: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct CheckResponse {
    pub allowed: bool,
    pub remaining: u64,
    /// Unix epoch second when the tightest limit is full again.
    pub reset_at: u64,
    /// `max` of the tightest limit.
    pub limit: u64,
    /// Seconds until a retry can succeed; only on refusals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Every 4xx/5xx body of the companion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct ErrorBody {
    /// Short machine-readable code, e.g. `bad_request`, `unknown_rule`, `unauthorized`.
    pub error: String,
    /// What was wrong, naming the field.
    pub detail: String,
}

object_only!(CheckRequest, CheckResponse, ErrorBody,);

/// A rule id as the plugin configuration allows them (`[A-Za-z0-9_.-]`, 1..=64 bytes):
/// a report names the filter's own rules, so anything else is not from a filter.
fn valid_rule_id(id: &str) -> bool {
    (1..=crate::config::MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A client fingerprint as the filter writes it: 16 lower-case hex digits.
pub fn valid_key(key: &str) -> bool {
    key.len() == KEY_HEX_DIGITS && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl CheckRequest {
    pub fn validate(&self) -> Result<(), String> {
        if self.client_id.is_empty() || self.client_id.len() > MAX_CLIENT_ID_LEN {
            return Err(format!("client_id: must be 1..={MAX_CLIENT_ID_LEN} bytes"));
        }
        if self.rule_id.is_empty() || self.rule_id.len() > crate::config::MAX_ID_LEN {
            return Err("rule_id: must be 1..=64 bytes".into());
        }
        if let Some(h) = self.hits {
            if h == 0 || h > MAX_HITS {
                return Err(format!("hits: out of range 1..={MAX_HITS}"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Global scope: the filter's report (`POST /v1/sync`) and strict check
// (`POST /v1/strict`). One entry per (rule, client key) carrying *all* the rule's limits,
// so the filter's configuration stays the one source of truth for what it enforces.
// Shares are integers in parts per 10⁹ ([`crate::gcra::SHARE_ONE`]), like the table
// entry that stores them.

/// Most limits one entry may carry (a rule's limits).
pub const MAX_ENTRY_LIMITS: usize = crate::config::MAX_LIMITS_PER_RULE;
/// Longest sync interval a proxy may announce (the companion drops a proxy after three).
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Largest answer body the filter reads from the companion; anything larger is refused
/// (counted as a failed sync). 10 000 entries of 8 shares fit with room to spare.
pub const MAX_ANSWER_BYTES: usize = 2 * 1024 * 1024;

/// One limit as the filter enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct LimitSpec {
    pub window_secs: u64,
    pub max: u64,
    pub burst: u64,
}

/// `POST /v1/sync`: one proxy's report; also its heartbeat (an empty report keeps the
/// proxy live and returns the number of live proxies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SyncReport {
    /// The reporting Envoy: its `node.id` and a per-start nonce (`envoy-7f9c/1a2b3c4d`),
    /// so a restarted Envoy, whose table is empty, is a new proxy and its old records die
    /// with the old id.
    pub proxy_id: String,
    /// Its availability zone (`node.locality.zone`), for metrics.
    #[serde(default)]
    pub zone: String,
    /// The proxy's sync interval: the companion counts it live for three of them after
    /// each report.
    pub interval_ms: u64,
    pub entries: Vec<ReportedKey>,
}

/// One (rule, client key) of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ReportedKey {
    pub rule: String,
    /// Client fingerprint, 16 lower-case hex digits.
    pub key: String,
    /// The rule's limits, in the rule's order; the answer's shares follow this order.
    pub limits: Vec<LimitSpec>,
    /// Requests this proxy admitted for the key since its last successful report.
    pub admitted: u64,
    /// Requests it rejected meanwhile (the demand its share did not cover).
    #[serde(default)]
    pub rejected: u64,
    /// Milliseconds the counts cover, as the filter saw it: used when the companion has
    /// no record of this proxy and key yet (otherwise it times the span itself).
    pub span_ms: u64,
    /// The proxy dropped the key (its table entry was evicted): give its share back now.
    #[serde(default, skip_serializing_if = "is_false")]
    pub release: bool,
}

/// The answer to a [`SyncReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SyncAnswer {
    /// One per reported key, in the same order.
    pub entries: Vec<KeyGrant>,
    /// Live proxies (at least 1, the caller): a new key starts at `1/proxies`.
    pub proxies: u32,
    /// How long the grants stay valid, counted from when the report was sent.
    pub lease_ms: u64,
    /// The companion answered from its local fallback (store unreachable).
    #[serde(default)]
    pub degraded: bool,
}

/// This proxy's shares of one key's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct KeyGrant {
    /// Share per limit (parts per 10⁹, in the reported order). The shares all live
    /// proxies hold of one limit sum to at most 10⁹.
    pub shares: Vec<u32>,
    /// Some share is below its target because other proxies still hold the difference:
    /// report the key again next interval to collect it.
    #[serde(default)]
    pub pending: bool,
    /// Requests admitted globally in each limit's current window (informational).
    #[serde(default)]
    pub used: Vec<u64>,
}

/// `POST /v1/strict`: decide one request atomically in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct StrictRequest {
    pub rule: String,
    /// Client fingerprint, 16 lower-case hex digits.
    pub key: String,
    pub limits: Vec<LimitSpec>,
    /// Requests to count, default 1.
    #[serde(default = "one")]
    pub hits: u64,
}

/// The store's decision for a [`StrictRequest`] (GCRA on the store's clock, all limits
/// or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct StrictAnswer {
    pub allowed: bool,
    /// Index of the limit the headers describe (on a refusal: the one that refused
    /// longest).
    pub tightest: usize,
    /// Tokens left in it.
    pub remaining: u64,
    /// Milliseconds until it is full again.
    pub reset_ms: u64,
    /// Refused: milliseconds until a retry can succeed; 0 when allowed.
    pub retry_after_ms: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> u64 {
    1
}

object_only!(
    LimitSpec,
    SyncReport,
    ReportedKey,
    SyncAnswer,
    KeyGrant,
    StrictRequest,
    StrictAnswer,
);

impl LimitSpec {
    /// The limit, or why not.
    pub fn limit(&self) -> Result<crate::config::Limit, String> {
        use crate::config::{Limit, MAX_COUNT, MAX_WINDOW_SECS};
        if self.window_secs == 0 || self.window_secs > MAX_WINDOW_SECS {
            return Err(format!("window_secs: out of range 1..={MAX_WINDOW_SECS}"));
        }
        if self.max == 0 || self.max > MAX_COUNT {
            return Err(format!("max: out of range 1..={MAX_COUNT}"));
        }
        if self.burst == 0 || self.burst > MAX_COUNT {
            return Err(format!("burst: out of range 1..={MAX_COUNT}"));
        }
        Limit::new(self.window_secs, self.max, self.burst)
            .ok_or_else(|| "burst: too large for the window".to_string())
    }
}

impl From<&crate::config::Limit> for LimitSpec {
    fn from(l: &crate::config::Limit) -> Self {
        LimitSpec {
            window_secs: l.window_secs,
            max: l.max,
            burst: l.burst,
        }
    }
}

fn validate_key_and_limits(rule: &str, key: &str, limits: &[LimitSpec]) -> Result<(), String> {
    if !valid_rule_id(rule) {
        return Err("rule: must be 1..=64 characters of [A-Za-z0-9_.-]".into());
    }
    if !valid_key(key) {
        return Err(format!(
            "key: must be {KEY_HEX_DIGITS} lower-case hex digits (a client fingerprint)"
        ));
    }
    if limits.is_empty() || limits.len() > MAX_ENTRY_LIMITS {
        return Err(format!("limits: must hold 1..={MAX_ENTRY_LIMITS} limits"));
    }
    for (i, l) in limits.iter().enumerate() {
        l.limit().map_err(|m| format!("limits[{i}].{m}"))?;
    }
    Ok(())
}

impl SyncReport {
    /// Bounds and shapes of a report; the first problem found, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.proxy_id.is_empty() || self.proxy_id.len() > MAX_PROXY_ID_LEN {
            return Err(format!("proxy_id: must be 1..={MAX_PROXY_ID_LEN} bytes"));
        }
        if self.zone.len() > MAX_ZONE_LEN {
            return Err(format!("zone: longer than {MAX_ZONE_LEN} bytes"));
        }
        if self.interval_ms == 0 || self.interval_ms > MAX_INTERVAL_MS {
            return Err(format!("interval_ms: out of range 1..={MAX_INTERVAL_MS}"));
        }
        if self.entries.len() > MAX_SYNC_ENTRIES {
            return Err(format!(
                "entries: {} entries, at most {MAX_SYNC_ENTRIES}",
                self.entries.len()
            ));
        }
        for (i, e) in self.entries.iter().enumerate() {
            e.validate().map_err(|m| format!("entries[{i}].{m}"))?;
        }
        Ok(())
    }
}

impl ReportedKey {
    pub fn validate(&self) -> Result<(), String> {
        validate_key_and_limits(&self.rule, &self.key, &self.limits)?;
        if self.admitted > MAX_HITS || self.rejected > MAX_HITS {
            return Err(format!("admitted/rejected: at most {MAX_HITS} per report"));
        }
        if self.span_ms == 0 {
            return Err("span_ms: must be at least 1".into());
        }
        Ok(())
    }
}

impl SyncAnswer {
    /// What the filter checks before it applies an answer to `report`: one grant per
    /// entry, one share per limit, shares within the whole, a live count.
    pub fn validate_for(&self, report: &SyncReport) -> Result<(), String> {
        if self.entries.len() != report.entries.len() {
            return Err(format!(
                "entries: {} grants for {} reported keys",
                self.entries.len(),
                report.entries.len()
            ));
        }
        if self.proxies == 0 {
            return Err("proxies: must be at least 1".into());
        }
        if self.lease_ms == 0 {
            return Err("lease_ms: must be at least 1".into());
        }
        for (i, (g, e)) in self.entries.iter().zip(&report.entries).enumerate() {
            if g.shares.len() != e.limits.len() {
                return Err(format!(
                    "entries[{i}].shares: {} shares for {} limits",
                    g.shares.len(),
                    e.limits.len()
                ));
            }
            if g.shares.iter().any(|&s| s > crate::gcra::SHARE_ONE) {
                return Err(format!("entries[{i}].shares: above 10^9 (the whole limit)"));
            }
        }
        Ok(())
    }
}

impl StrictRequest {
    pub fn validate(&self) -> Result<(), String> {
        validate_key_and_limits(&self.rule, &self.key, &self.limits)?;
        if self.hits == 0 || self.hits > MAX_HITS {
            return Err(format!("hits: out of range 1..={MAX_HITS}"));
        }
        Ok(())
    }
}

impl StrictAnswer {
    /// What the filter checks before it trusts an answer for `req`.
    pub fn validate_for(&self, req: &StrictRequest) -> Result<(), String> {
        if self.tightest >= req.limits.len() {
            return Err("tightest: not an index of the request's limits".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test;

    fn reported(rule: &str, key: &str) -> ReportedKey {
        ReportedKey {
            rule: rule.into(),
            key: key.into(),
            limits: vec![LimitSpec {
                window_secs: 60,
                max: 100,
                burst: 100,
            }],
            admitted: 1,
            rejected: 0,
            span_ms: 1000,
            release: false,
        }
    }

    #[test]
    fn report_bounds() {
        let report = SyncReport {
            proxy_id: "envoy-a/1".into(),
            zone: "az1".into(),
            interval_ms: 1000,
            entries: vec![reported("api", "00ff00ff00ff00ff")],
        };
        assert!(report.validate().is_ok());
        let mut bad = report.clone();
        bad.entries[0].limits[0].max = 0;
        assert_eq!(
            bad.validate().unwrap_err(),
            "entries[0].limits[0].max: out of range 1..=1000000000"
        );
        let mut bad = report.clone();
        bad.entries = vec![report.entries[0].clone(); MAX_SYNC_ENTRIES + 1];
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("entries: 10001 entries"));
        let mut bad = report.clone();
        bad.entries[0].admitted = MAX_HITS + 1;
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("entries[0].admitted"));
        let mut bad = report.clone();
        bad.entries[0].span_ms = 0;
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("entries[0].span_ms"));
        let mut bad = report;
        bad.proxy_id = "p".repeat(MAX_PROXY_ID_LEN + 1);
        assert!(bad.validate().unwrap_err().starts_with("proxy_id:"));
        let unknown = r#"{"proxy_id":"a","interval_ms":1,"entries":[],"extra":1}"#;
        assert!(serde_json::from_str::<SyncReport>(unknown).is_err());
    }

    #[test]
    fn sync_key_and_rule_formats() {
        assert!(reported("api.v1_x-y", "0123456789abcdef")
            .validate()
            .is_ok());
        for key in [
            "",
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "0123456789abcd\0f",
            " 123456789abcdef",
            "0x23456789abcdef",
        ] {
            let e = reported("api", key).validate().unwrap_err();
            assert!(
                e.starts_with("key: must be 16 lower-case hex"),
                "{key:?}: {e}"
            );
        }
        for rule in ["", "a\0", "a b", "a{b}", "ü", &"r".repeat(65)] {
            let e = reported(rule, "0123456789abcdef").validate().unwrap_err();
            assert!(e.starts_with("rule: "), "{rule:?}: {e}");
        }
    }

    #[test]
    fn objects_only_never_arrays() {
        // Fields by position would otherwise be accepted, at any depth.
        let top = r#"["envoy-a","",1000,[]]"#;
        let e = serde_json::from_str::<SyncReport>(top)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type: sequence"), "{e}");
        let nested =
            r#"{"proxy_id":"a","interval_ms":1,"entries":[["api","0123456789abcdef",[],1,0,1]]}"#;
        let e = serde_json::from_str::<SyncReport>(nested)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type: sequence"), "{e}");
        let check = r#"["client","rule",1]"#;
        assert!(serde_json::from_str::<CheckRequest>(check).is_err());
        for t in [r#"[[],1,false]"#, r#"[true,1,2,3,null]"#] {
            assert!(serde_json::from_str::<SyncAnswer>(t).is_err(), "{t}");
            assert!(serde_json::from_str::<CheckResponse>(t).is_err(), "{t}");
        }
        assert!(serde_json::from_str::<ErrorBody>(r#"["a","b"]"#).is_err());
        // Objects still work both ways, and a field given twice is refused.
        let ok = r#"{"client_id":"c","rule_id":"r","hits":2}"#;
        let c: CheckRequest = serde_json::from_str(ok).unwrap();
        assert_eq!(c.hits, Some(2));
        assert_eq!(serde_json::to_string(&c).unwrap(), ok);
        let dup = r#"{"client_id":"c","rule_id":"r","client_id":"d"}"#;
        let e = serde_json::from_str::<CheckRequest>(dup)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate field `client_id`"), "{e}");
    }

    #[test]
    fn check_bounds() {
        let ok = CheckRequest {
            client_id: "u".into(),
            rule_id: "r".into(),
            hits: None,
        };
        assert!(ok.validate().is_ok());
        let huge = CheckRequest {
            hits: Some(MAX_HITS + 1),
            ..ok.clone()
        };
        assert!(huge.validate().unwrap_err().starts_with("hits:"));
        let long = CheckRequest {
            client_id: "x".repeat(MAX_CLIENT_ID_LEN + 1),
            ..ok
        };
        assert!(long.validate().unwrap_err().starts_with("client_id:"));
        // Negative hits are a type error at parse time.
        assert!(serde_json::from_str::<CheckRequest>(
            r#"{"client_id":"a","rule_id":"b","hits":-1}"#
        )
        .is_err());
    }

    #[test]
    fn global_wire_types_round_trip_and_bounds() {
        let limit = LimitSpec {
            window_secs: 60,
            max: 100,
            burst: 100,
        };
        let report = SyncReport {
            proxy_id: "envoy-a/0000002a".into(),
            zone: "az-a".into(),
            interval_ms: 1000,
            entries: vec![ReportedKey {
                rule: "api".into(),
                key: "00ff00ff00ff00ff".into(),
                limits: vec![limit],
                admitted: 7,
                rejected: 2,
                span_ms: 1000,
                release: false,
            }],
        };
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("release"), "{json}");
        let back: SyncReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        assert!(report.validate().is_ok());
        let mut bad = report.clone();
        bad.interval_ms = 0;
        assert!(bad.validate().unwrap_err().starts_with("interval_ms:"));
        let mut bad = report.clone();
        bad.entries[0].limits[0].burst = 0;
        assert_eq!(
            bad.validate().unwrap_err(),
            "entries[0].limits[0].burst: out of range 1..=1000000000"
        );
        let mut bad = report.clone();
        bad.entries[0].limits = vec![limit; MAX_ENTRY_LIMITS + 1];
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("entries[0].limits:"));

        let answer: SyncAnswer = serde_json::from_str(
            r#"{"entries":[{"shares":[333333333],"pending":true,"used":[40]}],"proxies":3,"lease_ms":600000}"#,
        )
        .unwrap();
        assert!(answer.validate_for(&report).is_ok());
        assert!(!answer.degraded);
        let mut wrong = answer.clone();
        wrong.entries[0].shares = vec![1, 2];
        assert!(wrong.validate_for(&report).is_err());
        wrong.entries[0].shares = vec![1_000_000_001];
        assert!(wrong.validate_for(&report).is_err());
        let mut wrong = answer.clone();
        wrong.entries.clear();
        assert!(wrong.validate_for(&report).is_err());
        assert!(serde_json::from_str::<SyncAnswer>(r#"[[],3,1,false]"#).is_err());

        let strict: StrictRequest = serde_json::from_str(
            r#"{"rule":"pay","key":"0123456789abcdef","limits":[{"window_secs":1,"max":5,"burst":5}]}"#,
        )
        .unwrap();
        assert_eq!(strict.hits, 1);
        assert!(strict.validate().is_ok());
        let a = StrictAnswer {
            allowed: false,
            tightest: 1,
            remaining: 0,
            reset_ms: 1000,
            retry_after_ms: 200,
        };
        assert!(a.validate_for(&strict).is_err());
    }
}
