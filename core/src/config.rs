//! Plugin configuration: the JSON Envoy hands the filter (Istio's `pluginConfig`), and the
//! rules file of the companion service (same `rules` shape).
//!
//! Parsing is two steps. `serde` reads the JSON into `Raw*` structs that refuse unknown
//! fields, duplicate fields (also inside `match.headers`, where names equal after
//! lower-casing are duplicates), arrays in place of objects (`crate::strict`) and
//! anything after the JSON document, with
//! `serde_path_to_error` naming the field path; then [`compile`] checks every value and
//! builds the runtime [`Config`]. Every refusal is one [`ConfigError`] whose `Display` is
//! a single line `path: reason`, which is what the filter logs.

use serde::Deserialize;
use std::fmt;

use crate::gcra::SHARE_ONE;
pub use crate::global::FailureMode;
use crate::hash::Hasher64;

/// More rules than this is a configuration mistake, not a policy (each request may be
/// tried against every rule).
pub const MAX_RULES: usize = 256;
/// Limits per rule; one bucket entry holds one timestamp per limit.
pub const MAX_LIMITS_PER_RULE: usize = 8;
pub const MAX_KEY_SOURCES: usize = 8;
pub const MAX_HEADER_MATCHES: usize = 16;
pub const MAX_METHODS: usize = 16;
pub const MAX_ID_LEN: usize = 64;
pub const MAX_PATH_LEN: usize = 1024;
/// Largest `max` / `burst`: keeps every GCRA product inside u64 nanoseconds.
pub const MAX_COUNT: u64 = 1_000_000_000;
/// Longest window: 366 days.
pub const MAX_WINDOW_SECS: u64 = 366 * 86_400;
pub const DEFAULT_MAX_CLIENTS: u64 = 100_000;
pub const MIN_MAX_CLIENTS: u64 = 16;
/// The whole table (`max_clients / 2` sets, a power of two) is created before Envoy
/// opens its listener. Measured on this project's 2-core machines (README, "State"):
/// about 1.5–3 µs and 93 bytes of Envoy heap per set; at this bound (524,288 sets)
/// +0.75–1.9 s of start-up and 49 MB, at 2,097,152 (1,048,576 sets) +1.6–3.1 s and
/// 98 MB, at 16,777,216 +15.8 s and 779 MB. `cargo test -p meshlimit-e2e --release --test filter -- --ignored --nocapture
/// start_up_cost` prints the figures.
pub const MAX_MAX_CLIENTS: u64 = 1_048_576;
/// At most this many rules apply to one request (each costs one shared-data get and at
/// most one CAS): a configuration with more `continue` rules than this minus one is
/// refused.
pub const MAX_RULES_PER_REQUEST: usize = 8;

/// One configuration refusal: the field path (`rules[1].limits[0].window`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl ConfigError {
    /// Every refusal is built here. Field names, map keys and enum values in the path and
    /// the reason come from the configuration itself (serde quotes an unknown field as
    /// written), so control characters are escaped: a refusal stays the one log line the
    /// filter writes, and a configuration cannot forge further lines in the proxy log.
    fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            path: one_line(path.into()),
            reason: one_line(reason.into()),
        }
    }
}

/// `s` with each control character (`\n`, `\r`, ESC, U+0085, ...) written as its Rust
/// escape (`\n`, `\u{1b}`); unchanged, without a copy, when it holds none.
fn one_line(s: String) -> String {
    if !s.chars().any(char::is_control) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "configuration: {}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// The JSON shape.

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RawConfig {
    rules: Vec<RawRule>,
    #[serde(default)]
    headers: Option<HeaderMode>,
    /// Removed: the client address is the one Envoy computes (`source.address`); refused
    /// with a message saying so.
    #[serde(default)]
    xff_hop: Option<serde_json::Value>,
    #[serde(default)]
    max_clients: Option<u64>,
    /// The companion service that global and strict rules talk to.
    #[serde(default)]
    service: Option<RawService>,
    /// What global and strict rules do while the companion cannot be reached (each rule
    /// may say otherwise).
    #[serde(default)]
    failure_mode: Option<FailureMode>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RawService {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_env: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    sync_interval_ms: Option<u64>,
    #[serde(default)]
    proxy_id: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    fallback_share: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RawRule {
    id: String,
    #[serde(default)]
    priority: i32,
    #[serde(rename = "match")]
    matcher: RawMatch,
    #[serde(default)]
    key: Option<Vec<String>>,
    limits: Vec<RawLimit>,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    failure_mode: Option<FailureMode>,
    #[serde(default, rename = "continue")]
    continues: bool,
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RawMatch {
    path: String,
    #[serde(default)]
    case_sensitive: Option<bool>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    headers: Option<HeaderMatches>,
}

// Each record is read from a JSON object only (`[[]]` is not a configuration with no
// rules, nor `[["id",0,...]]` a rule by position), each choice from a string only.
crate::json::deserialize_strictly!(
    RawConfig, RawService, RawRule, RawMatch, RawLimit, HeaderMode, Scope
);

/// `match.headers`: names to exact values, in file order. A JSON object may repeat a
/// name (serde's maps keep the last one silently); here a repeated name, or two names
/// equal after lower-casing (header names are case-insensitive), is refused.
#[derive(Debug)]
struct HeaderMatches(Vec<(String, String)>);

impl<'de> Deserialize<'de> for HeaderMatches {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Unique;
        impl<'de> serde::de::Visitor<'de> for Unique {
            type Value = HeaderMatches;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of header names to exact values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<HeaderMatches, A::Error> {
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    if let Some((other, _)) =
                        out.iter().find(|(o, _)| o.eq_ignore_ascii_case(&name))
                    {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate header name {name:?} (also {other:?}; header names are case-insensitive)"
                        )));
                    }
                    let value = map.next_value::<String>()?;
                    out.push((name, value));
                }
                Ok(HeaderMatches(out))
            }
        }
        d.deserialize_map(Unique)
    }
}

#[derive(Debug, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RawLimit {
    window: String,
    max: u64,
    #[serde(default)]
    burst: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// The runtime shape.

/// Which rate-limit headers go on responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum HeaderMode {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (epoch seconds).
    #[default]
    XRatelimit,
    /// `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers).
    Ietf,
    Both,
    None,
}

impl HeaderMode {
    pub fn x_ratelimit(self) -> bool {
        matches!(self, HeaderMode::XRatelimit | HeaderMode::Both)
    }
    pub fn ietf(self) -> bool {
        matches!(self, HeaderMode::Ietf | HeaderMode::Both)
    }
}

/// Where a rule's limits are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(remote = "Self", rename_all = "kebab-case")]
pub enum Scope {
    /// This Envoy alone: its workers share one set of buckets.
    #[default]
    Local,
    /// Across every proxy syncing with the companion: each decides locally at its share
    /// of the limit (`docs/global-limits.md`). The default when a `service` is set.
    Global,
    /// Each request waits for the companion's atomic decision in the store (one callout).
    Strict,
}

impl Scope {
    /// The name the configuration spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
            Scope::Strict => "strict",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// From `"/api/*"`: the request path starts with `"/api/"`. `"*"` matches every path.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `header:<name>`; the name is stored lower-cased.
    Header(String),
    /// The client address Envoy computed for the request (`source.address`: the TCP peer,
    /// or the trusted `x-forwarded-for` hop under `use_remote_address` and
    /// `xff_num_trusted_hops`), port removed. See README, "Security".
    Ip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matcher {
    /// In the normal form of [`crate::path`] (configured paths must already be in it).
    pub path: PathMatch,
    /// `false`: the path compares ASCII case-insensitively, for upstreams that route
    /// `/API/Login` to `/api/login`.
    pub case_sensitive: bool,
    /// Upper-cased; empty means any method. Requests compare case-insensitively, and a
    /// rule listing `GET` also matches `HEAD`.
    pub methods: Vec<String>,
    /// Lower-cased names, exact values.
    pub headers: Vec<(String, String)>,
}

/// One limit: `max` requests per `window`, bucket capacity `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub window_secs: u64,
    pub max: u64,
    pub burst: u64,
    /// GCRA emission interval: one token comes back every `interval_ns`.
    pub interval_ns: u64,
    /// Bucket depth in time: `burst * interval_ns`.
    pub depth_ns: u64,
}

impl Limit {
    pub fn new(window_secs: u64, max: u64, burst: u64) -> Option<Limit> {
        if window_secs == 0 || max == 0 || burst == 0 {
            return None;
        }
        let interval_ns = window_secs.checked_mul(1_000_000_000)? / max;
        let depth_ns = interval_ns.checked_mul(burst)?;
        if interval_ns == 0 {
            return None;
        }
        Some(Limit {
            window_secs,
            max,
            burst,
            interval_ns,
            depth_ns,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub priority: i32,
    pub matcher: Matcher,
    pub key: Vec<KeySource>,
    pub limits: Vec<Limit>,
    pub shadow: bool,
    pub scope: Scope,
    /// What the rule does while the companion is unreachable (global and strict rules;
    /// `local` for a local rule, which never asks).
    pub failure_mode: FailureMode,
    /// `continue`: after this rule applies, the next matching rule applies too (a per-key
    /// limit followed by a per-IP ceiling). Without it the first rule that applies is the
    /// last.
    pub continues: bool,
    /// Hash of the rule id and its limits. Seeds every client fingerprint of this rule,
    /// so changing a rule's limits starts its clients on fresh buckets instead of
    /// reading old timestamps with new intervals.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Sorted by priority (higher first), then file order. The first rule that matches
    /// and finds its client key applies; if it has `continue`, so does the next one.
    pub rules: Vec<Rule>,
    pub headers: HeaderMode,
    /// Sets of bucket entries kept in shared data (a power of two); see [`crate::table`].
    pub sets: u32,
    /// The companion service, when global or strict rules need one.
    pub service: Option<Service>,
}

impl Config {
    /// Some rule is global: the filter syncs with the companion every interval.
    pub fn has_global(&self) -> bool {
        self.rules.iter().any(|r| r.scope == Scope::Global)
    }

    /// Some rule talks to the companion (global or strict).
    pub fn uses_service(&self) -> bool {
        self.rules.iter().any(|r| r.scope != Scope::Local)
    }
}

/// Where the companion's bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// In the configuration itself.
    Inline(String),
    /// The name of an environment variable of the VM (Envoy's
    /// `vm_config.environment_variables`, Istio's `vmConfig.env`): the configuration can
    /// then be shown to anyone, and a plugin cannot read files.
    Env(String),
}

impl fmt::Debug for TokenSource {
    // The token itself never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Inline(_) => f.write_str("Inline(..)"),
            TokenSource::Env(name) => write!(f, "Env({name:?})"),
        }
    }
}

/// The companion service block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// The Envoy cluster of the companion (Istio: `outbound|<port>||<host>`).
    pub cluster: String,
    /// `:authority` of the callouts; the cluster name unless set.
    pub authority: String,
    pub token: TokenSource,
    /// How long a callout (sync or strict check) may take before it counts as failed.
    pub timeout_ms: u64,
    /// How often the proxy reports and refreshes its shares.
    pub sync_interval_ms: u64,
    /// Identity of this proxy; `None`: Envoy's `node.id`.
    pub proxy_id: Option<String>,
    /// Its zone; `None`: Envoy's `node.locality.zone`.
    pub zone: Option<String>,
    /// Share (parts per 10⁹) a global key runs at in `local` failure mode; `None`:
    /// `1/n` of the last known number of live proxies.
    pub fallback_share: Option<u32>,
}

pub const DEFAULT_TIMEOUT_MS: u64 = 200;
pub const DEFAULT_SYNC_INTERVAL_MS: u64 = 1000;
/// Shortest sync interval: each interval costs every proxy one callout, and the
/// companion's work grows with proxies × keys ÷ interval.
pub const MIN_SYNC_INTERVAL_MS: u64 = 100;
/// Longest: the companion counts a proxy live for three intervals after a report.
pub const MAX_SYNC_INTERVAL_MS: u64 = crate::protocol::MAX_INTERVAL_MS;
pub const MAX_CLUSTER_LEN: usize = 256;
pub const MAX_TOKEN_LEN: usize = 4096;
/// A configured `proxy_id` leaves room for the per-start nonce the filter appends
/// (`/` and 8 hex digits) within the wire's bound.
pub const MAX_CONFIGURED_PROXY_ID_LEN: usize = crate::protocol::MAX_PROXY_ID_LEN - 9;

impl Service {
    /// The bearer token, reading a `token_env` variable through `env` (`None`: unset).
    /// An unset or empty variable, or a value that cannot go in a header, is refused
    /// like any other configuration mistake.
    pub fn resolve_token(
        &self,
        env: impl FnOnce(&str) -> Option<String>,
    ) -> Result<String, ConfigError> {
        match &self.token {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::Env(name) => {
                let at = "service.token_env";
                let value = env(name).ok_or_else(|| {
                    ConfigError::new(
                        at,
                        format!("the VM environment variable {name:?} is not set (Envoy: vm_config.environment_variables; Istio: vmConfig.env)"),
                    )
                })?;
                let value = value.trim().to_string();
                if value.is_empty() {
                    return Err(ConfigError::new(
                        at,
                        format!("the VM environment variable {name:?} is empty"),
                    ));
                }
                check_token(at, &value, &format!("the value of {name:?}"))?;
                Ok(value)
            }
        }
    }

    /// This proxy's id and zone: the configured ones, else what Envoy says
    /// (`xds.node.id`, `xds.node.locality.zone`). No id at all is refused.
    pub fn resolve_identity(
        &self,
        node_id: Option<&[u8]>,
        node_zone: Option<&[u8]>,
    ) -> Result<(String, String), ConfigError> {
        let id = match &self.proxy_id {
            Some(id) => id.clone(),
            None => {
                let raw = node_id.filter(|v| !v.is_empty()).ok_or_else(|| {
                    ConfigError::new(
                        "service.proxy_id",
                        "not set, and Envoy has no node.id to use instead: set service.proxy_id or the bootstrap's node.id",
                    )
                })?;
                let id = std::str::from_utf8(raw)
                    .ok()
                    .filter(|s| valid_label(s, MAX_CONFIGURED_PROXY_ID_LEN))
                    .ok_or_else(|| {
                        ConfigError::new(
                            "service.proxy_id",
                            format!("not set, and Envoy's node.id is not usable as one (1..={MAX_CONFIGURED_PROXY_ID_LEN} printable ASCII characters, no space): set service.proxy_id"),
                        )
                    })?;
                id.to_string()
            }
        };
        let zone = match &self.zone {
            Some(z) => z.clone(),
            None => node_zone
                .and_then(|z| std::str::from_utf8(z).ok())
                .filter(|z| z.is_empty() || valid_label(z, crate::protocol::MAX_ZONE_LEN))
                .unwrap_or("")
                .to_string(),
        };
        Ok((id, zone))
    }
}

/// 1..=`max` bytes of printable ASCII without space: ids, zones, clusters, authorities.
fn valid_label(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

fn check_token(at: &str, token: &str, what: &str) -> Result<(), ConfigError> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(ConfigError::new(
            at,
            format!("{what} must be 1..={MAX_TOKEN_LEN} bytes"),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            at,
            format!("{what} may only hold printable ASCII without spaces (it goes in an Authorization header)"),
        ));
    }
    Ok(())
}

pub fn default_key() -> Vec<KeySource> {
    vec![
        KeySource::Header("x-api-key".into()),
        KeySource::Header("x-user-id".into()),
        KeySource::Ip,
    ]
}

/// Parses and validates a whole configuration.
pub fn parse(json: &[u8]) -> Result<Config, ConfigError> {
    let raw: RawConfig = from_json(json)?;
    compile(raw, Reader::Filter)
}

/// Parses and validates just a list of rules (the companion's rules file and
/// `PUT /rate-limits/rules`), accepting either `{"rules": [...]}` or a whole plugin
/// configuration.
pub fn parse_rules(json: &[u8]) -> Result<Vec<Rule>, ConfigError> {
    let raw: RawConfig = from_json(json)?;
    compile(raw, Reader::Companion).map(|c| c.rules)
}

/// Who reads a configuration: the companion's rules file names rules of any scope
/// without a `service` block (it *is* the service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Filter,
    Companion,
}

fn from_json<T: for<'de> Deserialize<'de>>(json: &[u8]) -> Result<T, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(json);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        // serde_json appends " at line L column C"; keep it, it helps find the spot.
        ConfigError::new(path, e.into_inner().to_string())
    })?;
    // `{"rules":[]} {"rules":[...]}` must not start with the first document alone.
    de.end().map_err(|e| {
        ConfigError::new(
            "",
            format!("content after the JSON document ({e}): a configuration is one JSON object"),
        )
    })?;
    Ok(value)
}

fn compile(raw: RawConfig, reader: Reader) -> Result<Config, ConfigError> {
    let service = raw.service.map(compile_service).transpose()?;
    let needs_service = reader == Reader::Filter && service.is_none();
    if raw.failure_mode.is_some() && needs_service {
        return Err(ConfigError::new(
            "failure_mode",
            "applies to global and strict rules, which need a \"service\" block (the companion); without one every rule is local",
        ));
    }
    let defaults = RuleDefaults {
        scope: if service.is_some() {
            Scope::Global
        } else {
            Scope::Local
        },
        failure_mode: raw.failure_mode.unwrap_or_default(),
        needs_service,
    };
    if raw.rules.len() > MAX_RULES {
        return Err(ConfigError::new(
            "rules",
            format!("{} rules, at most {MAX_RULES} are allowed", raw.rules.len()),
        ));
    }
    if raw.xff_hop.is_some() {
        return Err(ConfigError::new(
            "xff_hop",
            "removed: the \"ip\" key source is the client address Envoy computed; set use_remote_address: true (and xff_num_trusted_hops: N behind N trusted proxies) on the listener instead (README, \"Security\")",
        ));
    }
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (i, r) in raw.rules.into_iter().enumerate() {
        let rule = compile_rule(&format!("rules[{i}]"), r, &defaults)?;
        if let Some(j) = rules.iter().position(|o: &Rule| o.id == rule.id) {
            return Err(ConfigError::new(
                format!("rules[{i}].id"),
                format!("duplicate rule id {:?} (also rules[{j}].id)", rule.id),
            ));
        }
        rules.push(rule);
    }
    let continuing = rules.iter().filter(|r| r.continues).count();
    if continuing >= MAX_RULES_PER_REQUEST {
        let last = rules.iter().rposition(|r| r.continues).unwrap_or(0);
        return Err(ConfigError::new(
            format!("rules[{last}].continue"),
            format!(
                "{continuing} rules have \"continue\": at most {} may, so that at most {MAX_RULES_PER_REQUEST} rules apply to one request",
                MAX_RULES_PER_REQUEST - 1
            ),
        ));
    }
    // Stable: equal priorities keep file order.
    rules.sort_by_key(|r| std::cmp::Reverse(r.priority));

    let max_clients = raw.max_clients.unwrap_or(DEFAULT_MAX_CLIENTS);
    if !(MIN_MAX_CLIENTS..=MAX_MAX_CLIENTS).contains(&max_clients) {
        return Err(ConfigError::new(
            "max_clients",
            format!(
                "{max_clients} is out of range {MIN_MAX_CLIENTS}..={MAX_MAX_CLIENTS}: the whole table is created before Envoy opens its listener (measured at {MAX_MAX_CLIENTS}: +0.75-1.9 s of start-up and 49 MB of heap; README, \"State\")"
            ),
        ));
    }
    Ok(Config {
        rules,
        headers: raw.headers.unwrap_or_default(),
        sets: crate::table::sets_for(max_clients),
        service,
    })
}

fn compile_service(s: RawService) -> Result<Service, ConfigError> {
    if !valid_label(&s.cluster, MAX_CLUSTER_LEN) {
        return Err(ConfigError::new(
            "service.cluster",
            format!("{:?} is not an Envoy cluster name (1..={MAX_CLUSTER_LEN} printable ASCII characters, no space)", s.cluster),
        ));
    }
    let authority = match s.authority {
        None => s.cluster.clone(),
        Some(a) if valid_label(&a, MAX_CLUSTER_LEN) => a,
        Some(a) => {
            return Err(ConfigError::new(
                "service.authority",
                format!("{a:?} is not a host name (1..={MAX_CLUSTER_LEN} printable ASCII characters, no space)"),
            ))
        }
    };
    let token = match (s.token, s.token_env) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "service.token",
                "set either token or token_env, not both",
            ))
        }
        (None, None) => {
            return Err(ConfigError::new(
                "service",
                "the companion needs its bearer token: set token_env (the name of a VM environment variable holding it) or token",
            ))
        }
        (Some(t), None) => {
            check_token("service.token", &t, "the token")?;
            TokenSource::Inline(t)
        }
        (None, Some(name)) => {
            let valid = (1..=128).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.as_bytes()[0].is_ascii_digit();
            if !valid {
                return Err(ConfigError::new(
                    "service.token_env",
                    format!("{name:?} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 128 characters)"),
                ));
            }
            TokenSource::Env(name)
        }
    };
    let interval = s.sync_interval_ms.unwrap_or(DEFAULT_SYNC_INTERVAL_MS);
    if !(MIN_SYNC_INTERVAL_MS..=MAX_SYNC_INTERVAL_MS).contains(&interval) {
        return Err(ConfigError::new(
            "service.sync_interval_ms",
            format!("{interval} is out of range {MIN_SYNC_INTERVAL_MS}..={MAX_SYNC_INTERVAL_MS}: each interval costs one callout per proxy, and the companion counts a proxy live for three of them"),
        ));
    }
    let timeout = s.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout == 0 || timeout >= interval {
        return Err(ConfigError::new(
            "service.timeout_ms",
            format!("{timeout} is out of range 1..{interval}: a sync must be answered or given up before the next one is due (sync_interval_ms {interval})"),
        ));
    }
    if let Some(id) = &s.proxy_id {
        if !valid_label(id, MAX_CONFIGURED_PROXY_ID_LEN) {
            return Err(ConfigError::new(
                "service.proxy_id",
                format!("must be 1..={MAX_CONFIGURED_PROXY_ID_LEN} printable ASCII characters, no space (the filter appends a per-start nonce)"),
            ));
        }
    }
    if let Some(z) = &s.zone {
        if !z.is_empty() && !valid_label(z, crate::protocol::MAX_ZONE_LEN) {
            return Err(ConfigError::new(
                "service.zone",
                format!(
                    "must be at most {} printable ASCII characters, no space",
                    crate::protocol::MAX_ZONE_LEN
                ),
            ));
        }
    }
    let fallback_share = match s.fallback_share {
        None => None,
        Some(f) if f.is_finite() && f > 0.0 && f <= 1.0 => {
            let parts = (f * f64::from(SHARE_ONE)).round() as u32;
            Some(parts.clamp(1, SHARE_ONE))
        }
        Some(f) => {
            return Err(ConfigError::new(
                "service.fallback_share",
                format!("{f} is out of range (0, 1]: the part of each global limit this proxy enforces while the companion is unreachable"),
            ))
        }
    };
    Ok(Service {
        cluster: s.cluster,
        authority,
        token,
        timeout_ms: timeout,
        sync_interval_ms: interval,
        proxy_id: s.proxy_id,
        zone: s.zone,
        fallback_share,
    })
}

/// What a rule gets when it says nothing.
struct RuleDefaults {
    scope: Scope,
    failure_mode: FailureMode,
    /// A global or strict rule is refused (the filter has no `service` block).
    needs_service: bool,
}

fn compile_rule(at: &str, r: RawRule, defaults: &RuleDefaults) -> Result<Rule, ConfigError> {
    check_id(&format!("{at}.id"), &r.id)?;
    let matcher = compile_match(&format!("{at}.match"), r.matcher)?;
    let key = match r.key {
        None => default_key(),
        Some(sources) => {
            if sources.is_empty() {
                return Err(ConfigError::new(
                    format!("{at}.key"),
                    "must name at least one key source",
                ));
            }
            if sources.len() > MAX_KEY_SOURCES {
                return Err(ConfigError::new(
                    format!("{at}.key"),
                    format!("{} key sources, at most {MAX_KEY_SOURCES}", sources.len()),
                ));
            }
            let mut out: Vec<KeySource> = Vec::with_capacity(sources.len());
            for (k, s) in sources.iter().enumerate() {
                let source = parse_key_source(&format!("{at}.key[{k}]"), s)?;
                if let Some(j) = out.iter().position(|o| *o == source) {
                    return Err(ConfigError::new(
                        format!("{at}.key[{k}]"),
                        format!("duplicate key source {s:?} (also {at}.key[{j}])"),
                    ));
                }
                out.push(source);
            }
            out
        }
    };
    if r.limits.is_empty() {
        return Err(ConfigError::new(
            format!("{at}.limits"),
            "must hold at least one limit",
        ));
    }
    if r.limits.len() > MAX_LIMITS_PER_RULE {
        return Err(ConfigError::new(
            format!("{at}.limits"),
            format!("{} limits, at most {MAX_LIMITS_PER_RULE}", r.limits.len()),
        ));
    }
    let mut limits: Vec<Limit> = Vec::with_capacity(r.limits.len());
    for (k, l) in r.limits.iter().enumerate() {
        let limit = compile_limit(&format!("{at}.limits[{k}]"), l)?;
        // The window names the limit in RateLimit/RateLimit-Policy ("<id>-<window>"): two
        // limits with one window would share a name, and one limit with `max` and
        // `burst` says what two such limits would.
        if let Some(j) = limits
            .iter()
            .position(|o| o.window_secs == limit.window_secs)
        {
            return Err(ConfigError::new(
                format!("{at}.limits[{k}].window"),
                format!(
                    "{:?} is the window of {at}.limits[{j}] too: one window per rule (its policy name is \"<id>-<window>\"); use one limit with max and burst",
                    l.window
                ),
            ));
        }
        limits.push(limit);
    }
    let scope = r.scope.unwrap_or(defaults.scope);
    if scope != Scope::Local && defaults.needs_service {
        return Err(ConfigError::new(
            format!("{at}.scope"),
            format!(
                "{:?} needs the companion: add a \"service\" block, or use \"local\"",
                scope.name()
            ),
        ));
    }
    if scope == Scope::Local && r.failure_mode.is_some() {
        return Err(ConfigError::new(
            format!("{at}.failure_mode"),
            "a local rule never asks the companion, so it has no failure mode (scope is \"local\")",
        ));
    }
    if scope == Scope::Strict && r.shadow {
        return Err(ConfigError::new(
            format!("{at}.shadow"),
            "a strict rule in shadow mode would still hold every request for a callout; measure with scope \"global\" and shadow instead",
        ));
    }
    if scope == Scope::Strict && r.continues {
        return Err(ConfigError::new(
            format!("{at}.continue"),
            "a strict rule ends its chain (it is decided last, by one callout): order the other rules before it",
        ));
    }
    let failure_mode = match scope {
        Scope::Local => FailureMode::Local,
        _ => r.failure_mode.unwrap_or(defaults.failure_mode),
    };
    let mut h = Hasher64::new(0x6d65_7368_6c69_6d74);
    h.write(r.id.as_bytes());
    for l in &limits {
        h.write_u64(l.window_secs);
        h.write_u64(l.max);
        h.write_u64(l.burst);
    }
    // A global or strict rule's clients get other fingerprints than the same rule's in
    // local scope: their table entries have another layout, and a scope change starts
    // them afresh instead of reading one layout as the other.
    if scope != Scope::Local {
        h.write(scope.name().as_bytes());
    }
    Ok(Rule {
        seed: h.finish(),
        id: r.id,
        priority: r.priority,
        matcher,
        key,
        limits,
        shadow: r.shadow,
        scope,
        failure_mode,
        continues: r.continues,
    })
}

fn check_id(at: &str, id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ConfigError::new(
            at,
            format!("must be 1..={MAX_ID_LEN} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(ConfigError::new(
            at,
            format!("{id:?} may only hold letters, digits, '_', '-' and '.'"),
        ));
    }
    Ok(())
}

fn compile_match(at: &str, m: RawMatch) -> Result<Matcher, ConfigError> {
    let p = &m.path;
    if p.len() > MAX_PATH_LEN {
        return Err(ConfigError::new(
            format!("{at}.path"),
            format!("longer than {MAX_PATH_LEN} bytes"),
        ));
    }
    // Requests are matched in their normal form (crate::path); a rule written in another
    // form would never match as written, so it is refused with the form to write.
    let literal = p.strip_suffix('*').unwrap_or(p);
    if p != "*" && literal.starts_with('/') {
        match crate::path::normalize(literal.as_bytes()) {
            Ok(normal) if normal == literal.as_bytes() => {}
            Ok(normal) => {
                let star = if p.ends_with('*') { "*" } else { "" };
                return Err(ConfigError::new(
                    format!("{at}.path"),
                    format!(
                        "{p:?} is not in normal form (requests are matched after percent-decoding, dot-segment removal, merging slashes and dropping ;parameters): write {:?}",
                        format!("{}{star}", String::from_utf8_lossy(&normal))
                    ),
                ));
            }
            Err(e) => {
                return Err(ConfigError::new(
                    format!("{at}.path"),
                    format!("{p:?} has no normal form: {e:?}"),
                ));
            }
        }
    }
    let path = if p == "*" {
        PathMatch::Prefix(String::new())
    } else if !p.starts_with('/') {
        return Err(ConfigError::new(
            format!("{at}.path"),
            format!("{p:?} must start with '/' (or be \"*\")"),
        ));
    } else if let Some(prefix) = p.strip_suffix('*') {
        if prefix.contains('*') {
            return Err(ConfigError::new(
                format!("{at}.path"),
                format!("{p:?}: '*' is only allowed once, at the end"),
            ));
        }
        PathMatch::Prefix(prefix.to_string())
    } else if p.contains('*') {
        return Err(ConfigError::new(
            format!("{at}.path"),
            format!("{p:?}: '*' is only allowed at the end"),
        ));
    } else {
        PathMatch::Exact(p.clone())
    };
    let mut methods = Vec::new();
    if let Some(ms) = m.methods {
        if ms.is_empty() || ms.len() > MAX_METHODS {
            return Err(ConfigError::new(
                format!("{at}.methods"),
                format!("must list 1..={MAX_METHODS} methods (or be left out for any)"),
            ));
        }
        for (k, method) in ms.iter().enumerate() {
            if method.is_empty() || method.len() > 32 || !method.bytes().all(is_token_byte) {
                return Err(ConfigError::new(
                    format!("{at}.methods[{k}]"),
                    format!("{method:?} is not an HTTP method"),
                ));
            }
            let upper = method.to_ascii_uppercase();
            if let Some(j) = methods.iter().position(|o| *o == upper) {
                return Err(ConfigError::new(
                    format!("{at}.methods[{k}]"),
                    format!("duplicate method {method:?} (also {at}.methods[{j}]; methods compare case-insensitively)"),
                ));
            }
            methods.push(upper);
        }
    }
    let mut headers = Vec::new();
    if let Some(HeaderMatches(hs)) = m.headers {
        if hs.len() > MAX_HEADER_MATCHES {
            return Err(ConfigError::new(
                format!("{at}.headers"),
                format!("{} header matches, at most {MAX_HEADER_MATCHES}", hs.len()),
            ));
        }
        for (name, value) in hs {
            if name.is_empty() || name.len() > 128 || !name.bytes().all(is_token_byte) {
                return Err(ConfigError::new(
                    format!("{at}.headers.{name}"),
                    "not a valid header name",
                ));
            }
            headers.push((name.to_ascii_lowercase(), value));
        }
    }
    Ok(Matcher {
        path,
        case_sensitive: m.case_sensitive.unwrap_or(true),
        methods,
        headers,
    })
}

fn parse_key_source(at: &str, s: &str) -> Result<KeySource, ConfigError> {
    if s == "ip" {
        return Ok(KeySource::Ip);
    }
    if let Some(name) = s.strip_prefix("header:") {
        if name.is_empty() || name.len() > 128 || !name.bytes().all(is_token_byte) {
            return Err(ConfigError::new(
                at,
                format!("{s:?}: not a valid header name"),
            ));
        }
        return Ok(KeySource::Header(name.to_ascii_lowercase()));
    }
    Err(ConfigError::new(
        at,
        format!("unknown key source {s:?}: expected \"header:<name>\" or \"ip\""),
    ))
}

fn compile_limit(at: &str, l: &RawLimit) -> Result<Limit, ConfigError> {
    let window_secs =
        parse_window(&l.window).map_err(|r| ConfigError::new(format!("{at}.window"), r))?;
    if l.max == 0 || l.max > MAX_COUNT {
        return Err(ConfigError::new(
            format!("{at}.max"),
            format!("{} is out of range 1..={MAX_COUNT}", l.max),
        ));
    }
    let burst = l.burst.unwrap_or(l.max);
    if burst == 0 || burst > MAX_COUNT {
        return Err(ConfigError::new(
            format!("{at}.burst"),
            format!("{burst} is out of range 1..={MAX_COUNT}"),
        ));
    }
    Limit::new(window_secs, l.max, burst).ok_or_else(|| {
        ConfigError::new(
            format!("{at}.burst"),
            "burst × (window / max) does not fit in 64-bit nanoseconds",
        )
    })
}

/// `"30s"`, `"1m"`, `"2h"`, `"1d"` → seconds.
pub fn parse_window(w: &str) -> Result<u64, String> {
    let bad = || format!("{w:?} is not a window: expected <N>s, <N>m, <N>h or <N>d, N ≥ 1");
    if w.len() < 2 || w.len() > 12 {
        return Err(bad());
    }
    // Split as bytes: the unit is one ASCII letter, and a window whose last character
    // takes several bytes ("ŗ") is refused like any other, not cut inside that character.
    let Some((&unit, digits)) = w.as_bytes().split_last() else {
        return Err(bad());
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let n = digits
        .iter()
        .try_fold(0u64, |n, &d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(bad)?;
    let unit_secs = match unit {
        b's' => 1,
        b'm' => 60,
        b'h' => 3600,
        b'd' => 86_400,
        _ => return Err(bad()),
    };
    let secs = n.checked_mul(unit_secs).ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    if secs > MAX_WINDOW_SECS {
        return Err(format!("{w:?} is longer than the longest window, 366d"));
    }
    Ok(secs)
}

fn is_token_byte(b: u8) -> bool {
    // RFC 9110 tchar.
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests;
