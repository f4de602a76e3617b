//! Per request: find the rule, the client, take a token, answer 429 or let the request
//! through and put the rate-limit headers on its response.
//!
//! Host calls on the request path, for a request that matches a rule keyed by
//! `x-api-key` and is admitted: `:path`, `:method` (only if a rule matching the path
//! names methods), the key header(s) until one is present (the `ip` source reads the
//! `source.address` property), the clock, one shared-data get, one CAS set; then three
//! `add` calls on the response for the `X-RateLimit-*` headers. A request no rule
//! matches costs one host call (`:path`).

use std::rc::Rc;

use meshlimit_core::config::HeaderMode;
use meshlimit_core::gcra::Decision;
use meshlimit_core::headers::{self, num, Num, RateLimitValue};
use meshlimit_core::matching;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, MapType};

use crate::buckets;
use crate::metrics::{self, Counter};
use crate::root::Plugin;

pub struct RateLimitHttp {
    plugin: Rc<Plugin>,
    /// Set when a rule matched: what to put on the response.
    outcome: Option<Outcome>,
}

#[derive(Clone, Copy)]
struct Outcome {
    rule: usize,
    decision: Decision,
    now_ns: u64,
    /// The 429 was sent by this filter; its headers are already on it.
    replied: bool,
}

impl RateLimitHttp {
    pub fn new(plugin: Rc<Plugin>) -> Self {
        RateLimitHttp {
            plugin,
            outcome: None,
        }
    }
}

fn request_header(name: &str) -> Option<Vec<u8>> {
    hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

impl RateLimitHttp {
    fn client_ip(&self) -> Option<Vec<u8>> {
        if let Some(hop) = self.plugin.config.xff_hop {
            if let Some(xff) = request_header("x-forwarded-for") {
                if let Some(ip) = matching::xff_hop(&xff, hop) {
                    return Some(ip.to_vec());
                }
            }
        }
        let addr = hostcalls::get_property(vec!["source", "address"]).ok()??;
        Some(matching::strip_port(&addr).to_vec())
    }
}

impl Outcome {
    /// The response headers of this outcome, formatted on the stack.
    fn headers<'p>(&self, plugin: &'p Plugin) -> RateLimitHeaders<'p> {
        let o = self;
        let rule = &plugin.config.rules[o.rule];
        let limit = &rule.limits[o.decision.tightest.min(rule.limits.len() - 1)];
        let d = &o.decision;
        RateLimitHeaders {
            mode: plugin.config.headers,
            limit: num(limit.max),
            remaining: num(d.remaining),
            reset: num(headers::reset_epoch_secs(o.now_ns, d.reset_ns)),
            policy: &plugin.policies[o.rule],
            ratelimit: headers::ratelimit_header(&rule.id, limit, d.remaining, d.reset_ns),
        }
    }
}

struct RateLimitHeaders<'a> {
    mode: HeaderMode,
    limit: Num,
    remaining: Num,
    reset: Num,
    policy: &'a str,
    ratelimit: RateLimitValue,
}

impl RateLimitHeaders<'_> {
    /// The (name, value) pairs the configured header style asks for.
    fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
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

impl Context for RateLimitHttp {}

impl HttpContext for RateLimitHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let config = &self.plugin.config;
        let Some(path) = request_header(":path") else {
            return Action::Continue;
        };
        let Some(rule_index) = matching::find_rule(
            &config.rules,
            &path,
            || request_header(":method"),
            request_header,
        ) else {
            return Action::Continue;
        };
        let rule = &config.rules[rule_index];
        // `client_ip` is only called when the rule's key sources reach `ip`.
        let client = matching::client_id(rule, request_header, || self.client_ip());
        let Some((source, id)) = client else {
            metrics::count(Counter::NoClientKey);
            return Action::Continue;
        };
        let fingerprint = matching::fingerprint(rule, source, &id);
        let now_ns = now_ns();
        let decision = buckets::take(rule, fingerprint, config.sets, now_ns);
        let mut outcome = Outcome {
            rule: rule_index,
            decision,
            now_ns,
            replied: false,
        };
        if decision.allowed {
            metrics::count(Counter::Allowed);
        } else if rule.shadow {
            metrics::count(Counter::ShadowRejected);
        } else {
            metrics::count(Counter::Rejected);
            let retry = headers::retry_after_secs(decision.retry_after_ns);
            let retry_s = num(retry);
            let body = headers::rejection_body(&rule.id, retry);
            outcome.replied = true;
            // Set before replying: the local reply passes through on_http_response_headers.
            self.outcome = Some(outcome);
            let plugin = Rc::clone(&self.plugin);
            let rl = outcome.headers(&plugin);
            let mut reply: Vec<(&str, &str)> = Vec::with_capacity(7);
            reply.push(("retry-after", retry_s.as_str()));
            reply.push(("content-type", "application/json"));
            reply.extend(rl.pairs());
            let _ = hostcalls::send_http_response(429, reply, Some(body.as_bytes()));
            return Action::Pause;
        }
        self.outcome = Some(outcome);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(o) = self.outcome else {
            return Action::Continue;
        };
        if o.replied || self.plugin.config.headers == HeaderMode::None {
            return Action::Continue;
        }
        for (k, v) in o.headers(&self.plugin).pairs() {
            let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, k, v);
        }
        Action::Continue
    }
}
