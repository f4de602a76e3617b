//! Per request: put the path in normal form, find the rules that apply and their
//! clients, take tokens, answer 429 (or 400 for a request no rule can be applied to) or
//! let the request through and put the rate-limit headers on its response.
//!
//! Host calls on the request path (each is one function of [`crate::host`]), for a
//! request that one rule keyed by `x-api-key` applies to and that is admitted: `:path`,
//! `:method` (only if a rule matching the path names methods), the
//! `request.headers.<name>` property of each key header until one is present (plus the
//! header map's first value when that value holds a comma, to tell a repeated header
//! from a comma inside one), `source.address` once if an `ip` source is reached, the
//! clock, one shared-data get and one CAS set per rule charged; then one `add` per
//! rate-limit header on the response (3 for `x-ratelimit`). A request no rule matches
//! costs one host call (`:path`); with no rules at all, none.

use std::cell::Cell;
use std::rc::Rc;

use meshlimit_core::config::{HeaderMode, Rule, Scope};
use meshlimit_core::gcra::Decision;
use meshlimit_core::global::{self, Admission, FailureMode, RuleParams, SyncView};
use meshlimit_core::headers::{RateLimitHeaders, Rejection};
use meshlimit_core::matching::{self, HeaderValue, Tally, Verdict};
use meshlimit_core::protocol::MAX_ANSWER_BYTES;
use meshlimit_core::report::RELEASE;
use meshlimit_core::sync::SyncFailure;
use meshlimit_core::{path, table};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use crate::host::{self, EnvoySharedData};
use crate::metrics::{self, Counter};
use crate::root::{Plugin, VmState};

pub struct RateLimitHttp {
    plugin: Rc<Plugin>,
    /// Set when a rule applied: what to put on the response.
    outcome: Option<Outcome>,
    /// The strict check this request is paused for.
    strict: Option<StrictCall>,
}

/// A request paused for its strict rule's callout.
struct StrictCall {
    token: u32,
    rule: usize,
    fingerprint: u64,
    /// What the other rules of the chain decided (the headers describe the tighter).
    others: Option<Outcome>,
    now_ns: u64,
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
            strict: None,
        }
    }
}

/// A key header, telling one from several. Envoy's header map answers only the first
/// value of a repeated header, while the `request.headers.<name>` property joins every
/// value with `,`; see `HeaderValue::from_joined`.
fn key_header(name: &str) -> HeaderValue {
    HeaderValue::from_joined(host::request_header_joined(name), || {
        host::request_header(name)
    })
}

/// The client address Envoy computed: the TCP peer, or the trusted `x-forwarded-for` hop
/// under `use_remote_address` and `xff_num_trusted_hops` (README, "Security").
fn client_ip() -> Option<Vec<u8>> {
    let addr = host::source_address()?;
    Some(matching::strip_port(&addr).to_vec())
}

/// Takes a token from every limit of `rule` (index `index`) for the client with
/// `fingerprint`, as its scope says. `closed` is set when the rule refused because its
/// failure mode is `closed` (the 429 then says the limiter is unavailable); `strict`
/// when a strict rule applied: it is decided by its callout, after the other rules.
fn take(
    plugin: &Plugin,
    index: usize,
    rule: &Rule,
    fingerprint: u64,
    now_ns: u64,
    closed: &Cell<Option<usize>>,
    strict: &Cell<Option<(usize, u64)>>,
) -> Decision {
    match (rule.scope, &plugin.vm) {
        (Scope::Strict, Some(_)) => {
            strict.set(Some((index, fingerprint)));
            meshlimit_core::strict::PROVISIONAL
        }
        (Scope::Global, Some(vm)) => {
            let d = take_global(plugin, vm, index, rule, fingerprint, now_ns);
            if d == CLOSED {
                closed.set(Some(index));
            }
            d
        }
        _ => take_local(rule, fingerprint, plugin.config.sets, now_ns),
    }
}

/// The decision `closed` failure mode answers with: refused, retry in a second.
const CLOSED: Decision = Decision {
    allowed: false,
    tightest: 0,
    remaining: 0,
    reset_ns: 1_000_000_000,
    retry_after_ns: 1_000_000_000,
    changed: false,
};

/// A global rule's take: the same one get and one CAS as a local one, on an entry that
/// also holds the key's share; which share applies and whether the key is reported are
/// decided in VM memory (`meshlimit_core::global::decide`), and a key worth reporting
/// goes into this VM's candidate set (no host call, no allocation).
fn take_global(
    plugin: &Plugin,
    vm: &VmState,
    index: usize,
    rule: &Rule,
    fingerprint: u64,
    now: u64,
) -> Decision {
    let sync = vm.sync.get();
    let params = &plugin.rule_params[index];
    let taken = table::take_global(
        &EnvoySharedData,
        &rule.limits,
        index as u16,
        fingerprint,
        plugin.config.sets,
        now,
        || global::fresh_state(&sync, params, now),
        |tats, state| global::decide(&rule.limits, tats, state, &sync, params, now),
    );
    let taken = match taken {
        Ok(t) => t,
        Err(_) => {
            metrics::count(Counter::FailedOpen);
            return Decision::UNMETERED;
        }
    };
    let mut candidates = vm.candidates.borrow_mut();
    if taken.evicted.active {
        metrics::count(Counter::Evicted);
    }
    if let Some((r, f)) = taken.evicted.grant_of {
        candidates.add(r, f, RELEASE, 0);
    }
    let d = taken.outcome;
    match d.by_failure_mode() {
        Some(FailureMode::Local) => metrics::count(Counter::FailureModeLocal),
        Some(FailureMode::Open) => metrics::count(Counter::FailureModeOpen),
        Some(FailureMode::Closed) => metrics::count(Counter::FailureModeClosed),
        None => {}
    }
    let decision = match d.admission {
        Admission::Bucket(mut decision) => {
            // Share 0 has no bucket to wait for: a share may come with the next sync.
            let interval = plugin.rule_params[index].trigger.interval_ns;
            decision.retry_after_ns = decision.retry_after_ns.min(interval.max(1));
            decision
        }
        Admission::Open => Decision::UNMETERED,
        Admission::Closed => CLOSED,
    };
    candidates.add(
        index as u16,
        fingerprint,
        d.reasons,
        u32::from(!decision.allowed),
    );
    decision
}

/// Takes a token from every limit of `rule` for the client with `fingerprint` (one
/// shared-data get, and one CAS when admitted). A take the table cannot make (contention
/// on one set past the retry bound, a shared-data failure) admits: a request the filter
/// could not count is not refused for it, and the counter shows it happened.
fn take_local(rule: &Rule, fingerprint: u64, sets: u32, now_ns: u64) -> Decision {
    match table::take(&EnvoySharedData, &rule.limits, fingerprint, sets, now_ns) {
        Ok(taken) => {
            if taken.evicted_active {
                metrics::count(Counter::Evicted);
            }
            taken.decision
        }
        Err(_) => {
            metrics::count(Counter::FailedOpen);
            Decision::UNMETERED
        }
    }
}

/// Answers 400 with a JSON body: the request has no path in normal form, or a key header
/// came more than once.
fn bad_request(body: &str) -> Action {
    host::send_response(
        400,
        vec![("content-type", "application/json")],
        body.as_bytes(),
    );
    Action::Pause
}

impl Outcome {
    /// The response headers of this outcome, formatted on the stack.
    fn headers<'p>(&self, plugin: &'p Plugin) -> RateLimitHeaders<'p> {
        RateLimitHeaders::new(
            plugin.config.headers,
            &plugin.config.rules[self.rule],
            &plugin.policies[self.rule],
            &self.decision,
            self.now_ns,
        )
    }
}

impl RateLimitHttp {
    /// Answers 429 for `outcome` (its rule refused): `Retry-After`, the rate-limit
    /// headers and a JSON body, which says the limiter is unavailable when the refusal
    /// came from failure mode `closed`.
    fn reject(&mut self, plugin: &Plugin, mut outcome: Outcome, unavailable: bool) -> Action {
        metrics::count(Counter::Rejected);
        let id = &plugin.config.rules[outcome.rule].id;
        let rejection = if unavailable {
            Rejection::unavailable(id)
        } else {
            Rejection::new(id, &outcome.decision)
        };
        outcome.replied = true;
        // Set before replying: the local reply passes through on_http_response_headers.
        self.outcome = Some(outcome);
        let rate_limit = outcome.headers(plugin);
        // Retry-After, content-type and at most 5 rate-limit headers: one allocation.
        let mut reply: Vec<(&str, &str)> = Vec::with_capacity(7);
        reply.extend(rejection.headers(&rate_limit));
        host::send_response(429, reply, rejection.body());
        Action::Pause
    }

    /// Holds the request for the strict rule's callout (`POST /v1/strict`: the rule's
    /// limits and the client's fingerprint). A callout Envoy will not send is a failed
    /// check, decided by the rule's failure mode at once.
    fn check_strict(
        &mut self,
        plugin: &Plugin,
        rule: usize,
        fingerprint: u64,
        others: Option<Outcome>,
        now_ns: u64,
    ) -> Action {
        let Some(companion) = &plugin.companion else {
            return Action::Continue;
        };
        let body = meshlimit_core::strict::request_body(&plugin.config.rules[rule], fingerprint);
        let call = StrictCall {
            token: 0,
            rule,
            fingerprint,
            others,
            now_ns,
        };
        match companion.post("/v1/strict", &body, companion.timeout) {
            Ok(token) => {
                self.strict = Some(StrictCall { token, ..call });
                Action::Pause
            }
            Err(()) => match self.strict_failed(plugin, &call) {
                Some(outcome) => self.finish_strict(plugin, call.others, outcome, false),
                None => self.finish_strict(plugin, call.others, unavailable(rule, now_ns), true),
            },
        }
    }

    /// The strict check failed (no answer in time, an error, an invalid answer): the
    /// rule's failure mode decides. `None`: `closed`, refuse as unavailable.
    fn strict_failed(&self, plugin: &Plugin, call: &StrictCall) -> Option<Outcome> {
        let rule = &plugin.config.rules[call.rule];
        let decision = match rule.failure_mode {
            FailureMode::Open => {
                metrics::count(Counter::StrictFailedOpen);
                metrics::count(Counter::FailureModeOpen);
                Decision::UNMETERED
            }
            FailureMode::Closed => {
                metrics::count(Counter::StrictFailedClosed);
                metrics::count(Counter::FailureModeClosed);
                return None;
            }
            FailureMode::Local => {
                metrics::count(Counter::StrictFailedLocal);
                metrics::count(Counter::FailureModeLocal);
                strict_fallback(plugin, call.rule, rule, call.fingerprint, call.now_ns)
            }
        };
        Some(Outcome {
            rule: call.rule,
            decision,
            now_ns: call.now_ns,
            replied: false,
        })
    }

    /// Ends a strict check: the request goes on (headers for the tighter of the
    /// strict decision and the other rules') or gets its 429.
    fn finish_strict(
        &mut self,
        plugin: &Plugin,
        others: Option<Outcome>,
        strict: Outcome,
        unavailable: bool,
    ) -> Action {
        if !strict.decision.allowed {
            return self.reject(plugin, strict, unavailable);
        }
        metrics::count(Counter::Allowed);
        let tighter = match others {
            Some(o)
                if o.decision.remaining < strict.decision.remaining
                    || (o.decision.remaining == strict.decision.remaining
                        && o.decision.reset_ns > strict.decision.reset_ns) =>
            {
                o
            }
            _ => strict,
        };
        self.outcome = Some(tighter);
        Action::Continue
    }
}

/// The outcome of a strict rule refused by failure mode `closed`.
fn unavailable(rule: usize, now_ns: u64) -> Outcome {
    Outcome {
        rule,
        decision: CLOSED,
        now_ns,
        replied: false,
    }
}

/// A strict rule's check when its callout failed in failure mode `local`: this proxy's
/// bucket at the fallback share (`service.fallback_share`, else `1/n` of the last
/// known number of live proxies, else the whole limit), kept in the table like a
/// global key's (one get, one CAS).
fn strict_fallback(
    plugin: &Plugin,
    index: usize,
    rule: &Rule,
    fingerprint: u64,
    now: u64,
) -> Decision {
    let Some(vm) = &plugin.vm else {
        return Decision::UNMETERED;
    };
    // Decided as if the companion were unreachable: the fallback share applies.
    let sync = SyncView {
        last_ok_sent_ns: None,
        ..vm.sync.get()
    };
    let params = RuleParams {
        mode: FailureMode::Local,
        ..plugin.rule_params[index]
    };
    let taken = table::take_global(
        &EnvoySharedData,
        &rule.limits,
        index as u16,
        fingerprint,
        plugin.config.sets,
        now,
        || global::fresh_state(&sync, &params, now),
        |tats, state| global::decide(&rule.limits, tats, state, &sync, &params, now),
    );
    match taken {
        Ok(t) => match t.outcome.admission {
            Admission::Bucket(d) => d,
            _ => Decision::UNMETERED,
        },
        Err(_) => {
            metrics::count(Counter::FailedOpen);
            Decision::UNMETERED
        }
    }
}

impl Context for RateLimitHttp {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some(call) = self.strict.take_if(|c| c.token == token) else {
            return;
        };
        let plugin = Rc::clone(&self.plugin);
        let rule = &plugin.config.rules[call.rule];
        let status = host::http_call_status();
        let answer = if body_size > MAX_ANSWER_BYTES {
            Err(SyncFailure::Oversized(body_size))
        } else {
            meshlimit_core::strict::parse_answer(status, &host::http_call_body(body_size), rule)
        };
        let action = match answer {
            Ok(decision) => {
                metrics::count(if decision.allowed {
                    Counter::StrictAllowed
                } else {
                    Counter::StrictRejected
                });
                let outcome = Outcome {
                    rule: call.rule,
                    decision,
                    now_ns: host::now_ns(),
                    replied: false,
                };
                self.finish_strict(&plugin, call.others, outcome, false)
            }
            Err(_) => match self.strict_failed(&plugin, &call) {
                Some(outcome) => self.finish_strict(&plugin, call.others, outcome, false),
                None => {
                    let outcome = unavailable(call.rule, call.now_ns);
                    self.finish_strict(&plugin, call.others, outcome, true)
                }
            },
        };
        if action == Action::Continue {
            host::resume_request();
        }
    }
}

impl HttpContext for RateLimitHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let plugin = Rc::clone(&self.plugin);
        let config = &plugin.config;
        if config.rules.is_empty() {
            return Action::Continue;
        }
        let Some(raw_path) = host::request_header(":path") else {
            return Action::Continue;
        };
        // Fetched at most once per request, whichever rules ask for them.
        let mut ip: Option<Option<Vec<u8>>> = None;
        let now = Cell::new(0u64);
        let closed = Cell::new(None);
        let strict = Cell::new(None);
        let mut tally = Tally::default();
        let verdict = path::with_normal(&raw_path, |path| {
            let candidates = matching::matching_rules(
                &config.rules,
                path,
                || host::request_header(":method"),
                host::request_header,
            );
            matching::decide(
                &config.rules,
                candidates,
                |rule| {
                    matching::client_id(rule, key_header, || {
                        ip.get_or_insert_with(client_ip).clone()
                    })
                },
                |index, rule, fingerprint| {
                    if now.get() == 0 {
                        now.set(host::now_ns());
                    }
                    take(
                        &plugin,
                        index,
                        rule,
                        fingerprint,
                        now.get(),
                        &closed,
                        &strict,
                    )
                },
                &mut tally,
            )
        });
        metrics::count_n(Counter::NoClientKey, tally.no_client_key);
        metrics::count_n(Counter::ShadowRejected, tally.shadow_rejected);
        let verdict = match verdict {
            Ok(v) => v,
            Err(_) => {
                metrics::count(Counter::BadPath);
                return bad_request(
                    r#"{"error":"bad_request","reason":"path has no normal form: invalid percent-encoding or a control byte"}"#,
                );
            }
        };
        let applied = match verdict {
            Verdict::Unlimited => return Action::Continue,
            Verdict::RepeatedKeyHeader { .. } => {
                metrics::count(Counter::RepeatedKeyHeader);
                return bad_request(
                    r#"{"error":"bad_request","reason":"a client key header was sent more than once"}"#,
                );
            }
            Verdict::Allowed(a) => {
                if let Some((rule, fingerprint)) = strict.get() {
                    // The other rules admitted it: the strict rule decides, by callout.
                    let others = (a.rule != rule).then_some(Outcome {
                        rule: a.rule,
                        decision: a.decision,
                        now_ns: now.get(),
                        replied: false,
                    });
                    return self.check_strict(&plugin, rule, fingerprint, others, now.get());
                }
                // A request only a shadow rule would have refused counts as that.
                if tally.shadow_rejected == 0 {
                    metrics::count(Counter::Allowed);
                }
                a
            }
            Verdict::Rejected(a) => a,
        };
        let outcome = Outcome {
            rule: applied.rule,
            decision: applied.decision,
            now_ns: now.get(),
            replied: false,
        };
        if !applied.decision.allowed && !config.rules[applied.rule].shadow {
            return self.reject(&plugin, outcome, closed.get() == Some(applied.rule));
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
        for (name, value) in o.headers(&self.plugin).pairs() {
            host::add_response_header(name, value);
        }
        Action::Continue
    }
}
