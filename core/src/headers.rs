//! Which rate-limit headers a response gets, their values, and the 429 reply, formatted
//! into stack buffers so the request path allocates nothing for them. The filter only
//! hands the pairs to Envoy ([`RateLimitHeaders::pairs`], [`Rejection::headers`]).
//!
//! - `X-RateLimit-Limit` / `-Remaining` / `-Reset`, the de-facto headers most API gateways
//!   send; Reset is a Unix epoch in seconds (when the limit is full again).
//! - `RateLimit-Policy` and `RateLimit` as in draft-ietf-httpapi-ratelimit-headers-10
//!   (and -11): `RateLimit-Policy: "api_default-1s";q=10;w=1, "api_default-1m";q=100;w=60`
//!   and `RateLimit: "api_default-1s";r=7;t=1`: `r` the tokens left, `t` the seconds until
//!   the next token is back ("the time until additional quota is made available"). On a
//!   429 the item describes the limit `Retry-After` comes from, so `t` equals
//!   `Retry-After` and never names a later time (the draft: Retry-After "SHOULD NOT
//!   reference a point in time earlier than the reset parameter").
//! - `Retry-After`: whole seconds until a token is back, at least 1.

use core::fmt::{self, Write};

use crate::config::{HeaderMode, Limit, Rule};
use crate::gcra::Decision;

pub const NANOS: u64 = 1_000_000_000;

/// A fixed-capacity string on the stack. Writes past capacity are cut off (and
/// reported as a `fmt::Error`), never reallocated.
pub struct StackStr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackStr<N> {
    pub fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }
    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, and a cut never splits a char because
        // everything written here is ASCII.
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Default for StackStr<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for StackStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.len;
        if s.len() > room {
            return Err(fmt::Error);
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
        self.len += s.len();
        Ok(())
    }
}

/// Whole seconds, rounded up.
pub fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(NANOS)
}

/// `Retry-After` seconds for a wait of `retry_ns`: rounded up, at least 1.
pub fn retry_after_secs(retry_ns: u64) -> u64 {
    ceil_secs(retry_ns).max(1)
}

/// `X-RateLimit-Reset`: the epoch second at which the limit is full again.
pub fn reset_epoch_secs(now_ns: u64, reset_ns: u64) -> u64 {
    ceil_secs(now_ns.saturating_add(reset_ns))
}

/// Writes a window as the config spells it in its largest exact unit (`60` → `1m`).
pub fn write_window<W: Write>(w: &mut W, secs: u64) -> fmt::Result {
    if secs.is_multiple_of(86_400) {
        write!(w, "{}d", secs / 86_400)
    } else if secs.is_multiple_of(3600) {
        write!(w, "{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        write!(w, "{}m", secs / 60)
    } else {
        write!(w, "{secs}s")
    }
}

/// The policy name of a limit: `<rule id>-<window>`.
pub fn write_policy_name<W: Write>(w: &mut W, rule_id: &str, limit: &Limit) -> fmt::Result {
    w.write_str(rule_id)?;
    w.write_char('-')?;
    write_window(w, limit.window_secs)
}

/// The `RateLimit-Policy` value of a rule: fixed per rule, so built once at configure.
pub fn policy_header(rule: &Rule) -> String {
    let mut s = String::new();
    for (i, l) in rule.limits.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push('"');
        let _ = write_policy_name(&mut s, &rule.id, l);
        let _ = write!(s, "\";q={};w={}", l.max, l.window_secs);
    }
    s
}

/// Long enough for `"<64-char id>-<window>";r=<u64>;t=<u64>`.
pub type RateLimitValue = StackStr<128>;

/// The `RateLimit` value: a limit's remaining tokens and the seconds until its next
/// token (`reset_ns`: until it is full again; see [`crate::gcra::next_token_ns`]). `t`
/// rounds up like `Retry-After`, and is at least 1 while tokens are missing.
pub fn ratelimit_header(
    rule_id: &str,
    limit: &Limit,
    remaining: u64,
    reset_ns: u64,
) -> RateLimitValue {
    let next = crate::gcra::next_token_ns(limit, remaining, reset_ns);
    let t = if remaining < limit.burst {
        retry_after_secs(next)
    } else {
        0
    };
    let mut s = RateLimitValue::new();
    let _ = s.write_char('"');
    let _ = write_policy_name(&mut s, rule_id, limit);
    let _ = write!(s, "\";r={remaining};t={t}");
    s
}

/// Long enough for the body with a 64-char rule id.
pub type BodyValue = StackStr<160>;

/// The 429 body: `{"error":"rate_limited","rule":"<id>","retry_after":N}`. Rule ids are
/// restricted to `[A-Za-z0-9_.-]` by the config, so they need no JSON escaping.
pub fn rejection_body(rule_id: &str, retry_after_secs: u64) -> BodyValue {
    let mut s = BodyValue::new();
    let _ = write!(
        s,
        "{{\"error\":\"rate_limited\",\"rule\":\"{rule_id}\",\"retry_after\":{retry_after_secs}}}"
    );
    s
}

/// Decimal digits of a number, on the stack.
pub type Num = StackStr<20>;

pub fn num(v: u64) -> Num {
    let mut s = Num::new();
    let _ = write!(s, "{v}");
    s
}

/// The rate-limit headers of one decision, in the configured style: what an admitted
/// response gets, and what a 429 carries besides `Retry-After`.
pub struct RateLimitHeaders<'a> {
    mode: HeaderMode,
    limit: Num,
    remaining: Num,
    reset: Num,
    policy: &'a str,
    ratelimit: RateLimitValue,
}

impl<'a> RateLimitHeaders<'a> {
    /// The headers for `decision` on `rule` (whose `RateLimit-Policy` value is `policy`,
    /// see [`policy_header`]), decided at `now_ns`. They describe the decision's
    /// `tightest` limit.
    pub fn new(
        mode: HeaderMode,
        rule: &Rule,
        policy: &'a str,
        decision: &Decision,
        now_ns: u64,
    ) -> Self {
        let limit = &rule.limits[decision.tightest.min(rule.limits.len() - 1)];
        RateLimitHeaders {
            mode,
            limit: num(limit.max),
            remaining: num(decision.remaining),
            reset: num(reset_epoch_secs(now_ns, decision.reset_ns)),
            policy,
            ratelimit: ratelimit_header(&rule.id, limit, decision.remaining, decision.reset_ns),
        }
    }

    /// The (name, value) pairs the configured header style asks for.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let x = self.mode.x_ratelimit();
        let ietf = self.mode.ietf();
        [
            (x, "x-ratelimit-limit", self.limit.as_str()),
            (x, "x-ratelimit-remaining", self.remaining.as_str()),
            (x, "x-ratelimit-reset", self.reset.as_str()),
            (ietf, "ratelimit-policy", self.policy),
            (ietf, "ratelimit", self.ratelimit.as_str()),
        ]
        .into_iter()
        .filter_map(|(on, k, v)| on.then_some((k, v)))
    }
}

/// The 429 a refused request gets: `Retry-After`, a JSON body naming the rule, and the
/// rate-limit headers of the refusal.
pub struct Rejection {
    retry_after: Num,
    body: BodyValue,
}

impl Rejection {
    /// The reply to a refusal of `decision` by the rule `rule_id`.
    pub fn new(rule_id: &str, decision: &Decision) -> Self {
        let retry = retry_after_secs(decision.retry_after_ns);
        Rejection {
            retry_after: num(retry),
            body: rejection_body(rule_id, retry),
        }
    }

    /// The reply of a rule whose failure mode is `closed` while the companion cannot be
    /// reached: retry in a second, and a body that says why, so that a client (and an
    /// operator reading logs) can tell it from a spent limit.
    pub fn unavailable(rule_id: &str) -> Self {
        let mut body = BodyValue::new();
        let _ = write!(
            body,
            "{{\"error\":\"limiter_unavailable\",\"rule\":\"{rule_id}\",\"retry_after\":1}}"
        );
        Rejection {
            retry_after: num(1),
            body,
        }
    }

    /// The reply's headers: `retry-after`, `content-type`, then `rate_limit`'s pairs.
    pub fn headers<'h>(
        &'h self,
        rate_limit: &'h RateLimitHeaders<'_>,
    ) -> impl Iterator<Item = (&'static str, &'h str)> {
        [
            ("retry-after", self.retry_after.as_str()),
            ("content-type", "application/json"),
        ]
        .into_iter()
        .chain(rate_limit.pairs())
    }

    pub fn body(&self) -> &[u8] {
        self.body.as_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests;
