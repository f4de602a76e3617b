use super::*;
use crate::testing::test;

fn err(json: &str) -> String {
    parse(json.as_bytes()).unwrap_err().to_string()
}

fn one_rule(rule_body: &str) -> String {
    format!(
        r#"{{"rules":[{{"id":"r","match":{{"path":"/a"}},"limits":[{{"window":"1m","max":5}}]{rule_body}}}]}}"#
    )
}

#[test]
fn parses_the_documented_example() {
    let json = r#"{
      "rules": [
        {"id": "auth_strict", "priority": 10,
         "match": {"path": "/api/auth/*", "methods": ["POST"]},
         "limits": [{"window": "1m", "max": 5}, {"window": "1h", "max": 20}]},
        {"id": "api_default",
         "match": {"path": "/api/*", "headers": {"X-Tier": "free"}},
         "key": ["header:x-api-key", "header:X-User-Id", "ip"],
         "limits": [{"window": "1s", "max": 10, "burst": 20}, {"window": "1m", "max": 100}],
         "shadow": false}
      ],
      "headers": "x-ratelimit"
    }"#;
    let c = parse(json.as_bytes()).unwrap();
    assert_eq!(c.rules.len(), 2);
    let auth = &c.rules[0];
    assert_eq!(auth.id, "auth_strict");
    assert_eq!(auth.matcher.path, PathMatch::Prefix("/api/auth/".into()));
    assert_eq!(auth.matcher.methods, vec!["POST"]);
    assert_eq!(auth.key, default_key());
    assert_eq!(auth.limits[0].window_secs, 60);
    assert_eq!(auth.limits[0].burst, 5, "burst defaults to max");
    assert_eq!(auth.limits[1].window_secs, 3600);
    let api = &c.rules[1];
    assert_eq!(
        api.matcher.headers,
        vec![("x-tier".to_string(), "free".to_string())]
    );
    assert_eq!(api.key[1], KeySource::Header("x-user-id".into()));
    assert_eq!(api.limits[0].burst, 20);
    assert_eq!(api.limits[0].interval_ns, 100_000_000);
    assert_eq!(api.limits[0].depth_ns, 2_000_000_000);
    assert_eq!(c.headers, HeaderMode::XRatelimit);
    assert_eq!(c.sets, 65_536);
    assert!(c
        .rules
        .iter()
        .all(|r| !r.continues && r.matcher.case_sensitive));
}

#[test]
fn the_readme_example_means_what_readme_says() {
    // The first JSON block of README.md, so the documentation cannot drift from the
    // parser.
    let readme = include_str!("../../../README.md");
    let start = readme.find("```json\n").expect("a JSON example in README") + 8;
    let block = &readme.as_bytes()[start..];
    let end = block.windows(3).position(|w| w == b"```").unwrap();
    let c = parse(&block[..end]).unwrap_or_else(|e| panic!("README: {e}"));
    let ids: Vec<&str> = c.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["login_key", "login_ip", "api_default"]);
    let (key, ip) = (&c.rules[0], &c.rules[1]);
    assert!(key.continues && !ip.continues);
    assert_eq!(key.key, [KeySource::Header("x-api-key".into())]);
    assert_eq!(
        ip.key,
        [KeySource::Ip],
        "the login ceiling counts per address"
    );
    assert_eq!(key.matcher, ip.matcher);
}

#[test]
fn rules_sorted_by_priority_then_file_order() {
    let json = r#"{"rules":[
      {"id":"a","match":{"path":"/a"},"limits":[{"window":"1s","max":1}]},
      {"id":"b","priority":5,"match":{"path":"/b"},"limits":[{"window":"1s","max":1}]},
      {"id":"c","match":{"path":"/c"},"limits":[{"window":"1s","max":1}]},
      {"id":"d","priority":5,"match":{"path":"/d"},"limits":[{"window":"1s","max":1}]},
      {"id":"e","priority":-1,"match":{"path":"/e"},"limits":[{"window":"1s","max":1}]}
    ]}"#;
    let c = parse(json.as_bytes()).unwrap();
    let ids: Vec<&str> = c.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["b", "d", "a", "c", "e"]);
}

#[test]
fn header_modes() {
    for (s, m) in [
        ("x-ratelimit", HeaderMode::XRatelimit),
        ("ietf", HeaderMode::Ietf),
        ("both", HeaderMode::Both),
        ("none", HeaderMode::None),
    ] {
        let json = format!(r#"{{"rules":[],"headers":"{s}"}}"#);
        assert_eq!(parse(json.as_bytes()).unwrap().headers, m);
    }
    assert!(HeaderMode::Both.ietf() && HeaderMode::Both.x_ratelimit());
    assert!(!HeaderMode::None.ietf() && !HeaderMode::None.x_ratelimit());
    assert!(
        err(r#"{"rules":[],"headers":"fancy"}"#).starts_with("headers: unknown variant `fancy`")
    );
}

#[test]
fn windows() {
    assert_eq!(parse_window("1s"), Ok(1));
    assert_eq!(parse_window("90s"), Ok(90));
    assert_eq!(parse_window("5m"), Ok(300));
    assert_eq!(parse_window("2h"), Ok(7200));
    assert_eq!(parse_window("1d"), Ok(86_400));
    assert_eq!(parse_window("366d"), Ok(366 * 86_400));
    for bad in [
        "",
        "s",
        "0s",
        "1",
        "1w",
        "-1s",
        "+1s",
        " 1s",
        "1.5s",
        "1S",
        "99999999999d",
        "367d",
    ] {
        assert!(parse_window(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn every_refusal_names_its_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"rules":[], "extra": 1}"#,
            "extra: unknown field `extra`",
        ),
        (r#"{}"#, "missing field `rules`"),
        (r#"not json"#, "expected ident"),
        (r#"{"rules":{}}"#, "rules: invalid type: map"),
        (
            &one_rule(r#","colour":"red""#),
            "rules[0].colour: unknown field `colour`",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"5x","max":5}]}]}"#,
            "rules[0].limits[0].window: \"5x\" is not a window",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":0}]}]}"#,
            "rules[0].limits[0].max: 0 is out of range",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":-3}]}]}"#,
            "rules[0].limits[0].max: invalid value: integer `-3`",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":5,"burst":0}]}]}"#,
            "rules[0].limits[0].burst: 0 is out of range",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[]}]}"#,
            "rules[0].limits: must hold at least one limit",
        ),
        (
            &one_rule(r#","key":["cookie:sid"]"#),
            "rules[0].key[0]: unknown key source \"cookie:sid\"",
        ),
        (
            &one_rule(r#","key":[]"#),
            "rules[0].key: must name at least one key source",
        ),
        (
            &one_rule(r#","key":["header:"]"#),
            "rules[0].key[0]: \"header:\": not a valid header name",
        ),
        (
            &one_rule(r#","scope":"global""#),
            "rules[0].scope: \"global\" needs the companion: add a \"service\" block",
        ),
        (
            &one_rule(r#","scope":"strict""#),
            "rules[0].scope: \"strict\" needs the companion",
        ),
        (
            &one_rule(r#","scope":"planet""#),
            "rules[0].scope: unknown variant `planet`",
        ),
        (
            &one_rule(r#","shadow":"yes""#),
            "rules[0].shadow: invalid type: string",
        ),
        (
            r#"{"rules":[{"id":"","match":{"path":"/a"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].id: must be 1..=64 characters",
        ),
        (
            r#"{"rules":[{"id":"a b","match":{"path":"/a"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].id: \"a b\" may only hold",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"api"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.path: \"api\" must start with '/'",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a/*/b"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.path: \"/a/*/b\": '*' is only allowed at the end",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","methods":["GE T"]},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.methods[0]: \"GE T\" is not an HTTP method",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","methods":[]},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.methods: must list 1..=16 methods",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","headers":{"bad name":"x"}},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.headers.bad name: not a valid header name",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","host":"x"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.host: unknown field `host`",
        ),
        (
            r#"{"rules":[],"max_clients":3}"#,
            "max_clients: 3 is out of range",
        ),
        (
            r#"{"rules":[],"xff_hop":1}"#,
            "xff_hop: removed: the \"ip\" key source is the client address Envoy computed; set use_remote_address: true",
        ),
        (
            r#"{"rules":[],"max_clients":1048577}"#,
            "max_clients: 1048577 is out of range 16..=1048576: the whole table is created before Envoy opens its listener (measured at 1048576: +0.75-1.9 s",
        ),
        (
            r#"{"rules":[],"failure_mode":"open"}"#,
            "failure_mode: applies to global and strict rules, which need a \"service\" block",
        ),
        (
            &one_rule(r#","failure_mode":"open""#),
            "rules[0].failure_mode: a local rule never asks the companion",
        ),
    ];
    for (json, want) in cases {
        let got = err(json);
        assert!(
            got.starts_with(want) || got.contains(want),
            "for {json}\n  got:  {got}\n  want: {want}"
        );
        assert!(!got.contains('\n'), "one line: {got}");
    }
}

#[test]
fn duplicate_rule_ids_are_refused() {
    let json = r#"{"rules":[
      {"id":"same","match":{"path":"/a"},"limits":[{"window":"1s","max":1}]},
      {"id":"other","match":{"path":"/b"},"limits":[{"window":"1s","max":1}]},
      {"id":"same","match":{"path":"/c"},"limits":[{"window":"1s","max":1}]}
    ]}"#;
    assert_eq!(
        err(json),
        "rules[2].id: duplicate rule id \"same\" (also rules[0].id)"
    );
}

#[test]
fn too_many_rules_and_limits() {
    let rule = |i: usize| {
        format!(r#"{{"id":"r{i}","match":{{"path":"/a"}},"limits":[{{"window":"1s","max":1}}]}}"#)
    };
    let many: Vec<String> = (0..=MAX_RULES).map(rule).collect();
    let json = format!(r#"{{"rules":[{}]}}"#, many.join(","));
    assert_eq!(err(&json), "rules: 257 rules, at most 256 are allowed");
    let ok: Vec<String> = (0..MAX_RULES).map(rule).collect();
    assert!(parse(format!(r#"{{"rules":[{}]}}"#, ok.join(",")).as_bytes()).is_ok());

    let limits = [r#"{"window":"1s","max":1}"#; MAX_LIMITS_PER_RULE + 1].join(",");
    let json = format!(r#"{{"rules":[{{"id":"r","match":{{"path":"/a"}},"limits":[{limits}]}}]}}"#);
    assert_eq!(err(&json), "rules[0].limits: 9 limits, at most 8");
}

#[test]
fn limit_products_stay_in_range() {
    // The largest window with the largest burst still fits: checked, not overflowed.
    let json = r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"366d","max":1,"burst":1000000000}]}]}"#;
    assert!(err(json).starts_with("rules[0].limits[0].burst: burst × (window / max) does not fit"));
    let json = r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"366d","max":1000000000,"burst":1000000000}]}]}"#;
    assert!(parse(json.as_bytes()).is_ok());
}

#[test]
fn seeds_change_with_limits_not_with_order() {
    let a = parse(one_rule("").as_bytes()).unwrap().rules[0].seed;
    let b = parse(one_rule("").as_bytes()).unwrap().rules[0].seed;
    assert_eq!(a, b);
    let other =
        r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":6}]}]}"#;
    assert_ne!(a, parse(other.as_bytes()).unwrap().rules[0].seed);
}

#[test]
fn max_clients_sets_the_table_size() {
    let c = parse(br#"{"rules":[],"max_clients":1000}"#).unwrap();
    assert_eq!(c.sets, 512);
    let c = parse(br#"{"rules":[],"max_clients":1024}"#).unwrap();
    assert_eq!(c.sets, 512);
    let c = parse(br#"{"rules":[],"max_clients":16}"#).unwrap();
    assert_eq!(c.sets, 8);
    let c = parse(br#"{"rules":[],"max_clients":1048576}"#).unwrap();
    assert_eq!(c.sets, 1 << 19);
}

#[test]
fn content_after_the_document_is_refused() {
    // The first document alone would start with no rules: limits silently off.
    let two = r#"{"rules":[]} {"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":5}]}]}"#;
    assert!(
        err(two).starts_with("configuration: content after the JSON document (trailing characters at line 1 column 14)"),
        "{}",
        err(two)
    );
    // What `xff_hop: 0` alone is refused for must not start when smuggled after the end.
    let tail = format!("{},\"xff_hop\":0}}", one_rule(""));
    assert!(err(&tail).starts_with("configuration: content after the JSON document"));
    for junk in ["x", "[]", "0", "\"s\"", "}"] {
        let json = format!(r#"{{"rules":[]}}{junk}"#);
        assert!(
            err(&json).starts_with("configuration: content after the JSON document"),
            "{json}"
        );
    }
    // White space after the document is fine.
    assert!(parse(b"{\"rules\":[]} \n\t ").is_ok());
}

#[test]
fn duplicate_fields_are_refused_everywhere() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"rules":[],"rules":[]}"#,
            "configuration: duplicate field `rules`",
        ),
        (
            r#"{"rules":[],"headers":"none","headers":"both"}"#,
            "configuration: duplicate field `headers`",
        ),
        (
            &one_rule(r#","shadow":false,"shadow":true"#),
            "rules[0]: duplicate field `shadow`",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","path":"/b"},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match: duplicate field `path`",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":5,"max":50}]}]}"#,
            "rules[0].limits[0]: duplicate field `max`",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","headers":{"x-tier":"free","x-tier":"gold"}},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.headers: duplicate header name \"x-tier\" (also \"x-tier\"; header names are case-insensitive)",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","headers":{"X-Tier":"free","x-tier":"gold"}},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.headers: duplicate header name \"x-tier\" (also \"X-Tier\"",
        ),
        (
            &one_rule(r#","key":["header:X-Api-Key","ip","header:x-api-key"]"#),
            "rules[0].key[2]: duplicate key source \"header:x-api-key\" (also rules[0].key[0])",
        ),
        (
            &one_rule(r#","key":["ip","ip"]"#),
            "rules[0].key[1]: duplicate key source \"ip\" (also rules[0].key[0])",
        ),
        (
            r#"{"rules":[{"id":"r","match":{"path":"/a","methods":["POST","post"]},"limits":[{"window":"1m","max":5}]}]}"#,
            "rules[0].match.methods[1]: duplicate method \"post\" (also rules[0].match.methods[0]",
        ),
    ];
    for (json, want) in cases {
        let got = err(json);
        assert!(
            got.starts_with(want),
            "for {json}\n  got:  {got}\n  want: {want}"
        );
        assert!(!got.contains('\n'), "one line: {got}");
    }
}

#[test]
fn one_window_per_rule_so_policy_names_are_unique() {
    let json = r#"{"rules":[{"id":"r","match":{"path":"/a"},"limits":[{"window":"1m","max":5},{"window":"1h","max":50},{"window":"60s","max":10,"burst":2}]}]}"#;
    assert_eq!(
        err(json),
        "rules[0].limits[2].window: \"60s\" is the window of rules[0].limits[0] too: one window per rule (its policy name is \"<id>-<window>\"); use one limit with max and burst"
    );
    // Different rules may use the same window: their names differ by the rule id.
    let c = parse(
        br#"{"rules":[
          {"id":"a","match":{"path":"/a"},"limits":[{"window":"1m","max":5}]},
          {"id":"b","match":{"path":"/a"},"limits":[{"window":"1m","max":5}]}]}"#,
    )
    .unwrap();
    let names: Vec<String> = c
        .rules
        .iter()
        .flat_map(|r| {
            r.limits.iter().map(|l| {
                let mut s = String::new();
                crate::headers::write_policy_name(&mut s, &r.id, l).unwrap();
                s
            })
        })
        .collect();
    assert_eq!(names, ["a-1m", "b-1m"]);
}

#[test]
fn rule_paths_must_be_in_normal_form() {
    let path = |p: &str| {
        format!(
            r#"{{"rules":[{{"id":"r","match":{{"path":"{p}"}},"limits":[{{"window":"1m","max":5}}]}}]}}"#
        )
    };
    let cases = [
        ("/api//auth/*", "/api/auth/*"),
        ("/api/./auth", "/api/auth"),
        ("/api/x/../auth/*", "/api/auth/*"),
        ("/%61pi/*", "/api/*"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a;v=1/b", "/a/b"),
        ("/a%2Fb", "/a/b"),
    ];
    for (given, normal) in cases {
        let got = err(&path(given));
        let want = format!("rules[0].match.path: \"{given}\" is not in normal form");
        assert!(got.starts_with(&want), "{got}");
        assert!(got.ends_with(&format!("write \"{normal}\"")), "{got}");
        assert!(parse(path(normal).as_bytes()).is_ok(), "{normal}");
    }
    assert!(err(&path("/a%zz"))
        .starts_with("rules[0].match.path: \"/a%zz\" has no normal form: BadPercentEncoding"));
    for ok in [
        "*",
        "/",
        "/api/*",
        "/api*",
        "/a/b/",
        "/caf%C3%A9",
        "/a:b@c!",
    ] {
        assert!(parse(path(ok).as_bytes()).is_ok(), "{ok}");
    }
}

#[test]
fn continue_and_case_sensitive() {
    let c = parse(
        br#"{"rules":[
          {"id":"key","priority":2,"match":{"path":"/login","case_sensitive":false},"key":["header:x-api-key"],
           "limits":[{"window":"1m","max":5}],"continue":true},
          {"id":"ip","priority":1,"match":{"path":"/login"},"key":["ip"],"limits":[{"window":"1m","max":20}]}]}"#,
    )
    .unwrap();
    assert!(c.rules[0].continues && !c.rules[0].matcher.case_sensitive);
    assert!(!c.rules[1].continues && c.rules[1].matcher.case_sensitive);
    assert!(err(&one_rule(r#","continue":"yes""#)).starts_with("rules[0].continue: invalid type"));
    // At most MAX_RULES_PER_REQUEST rules apply to one request.
    let rule = |i: usize| {
        format!(
            r#"{{"id":"r{i}","match":{{"path":"/a"}},"limits":[{{"window":"1s","max":1}}],"continue":true}}"#
        )
    };
    let ok: Vec<String> = (0..MAX_RULES_PER_REQUEST - 1).map(rule).collect();
    assert!(parse(format!(r#"{{"rules":[{}]}}"#, ok.join(",")).as_bytes()).is_ok());
    let many: Vec<String> = (0..MAX_RULES_PER_REQUEST).map(rule).collect();
    assert_eq!(
        err(&format!(r#"{{"rules":[{}]}}"#, many.join(","))),
        "rules[7].continue: 8 rules have \"continue\": at most 7 may, so that at most 8 rules apply to one request"
    );
}

/// A configuration with a service block (`service` holds its fields after `cluster`)
/// and one rule (`rule` holds its fields after `limits`).
fn with_service(service: &str, rule: &str) -> String {
    format!(
        r#"{{"service":{{"cluster":"meshlimit_service"{service}}},"rules":[{{"id":"r","match":{{"path":"/a"}},"limits":[{{"window":"1m","max":5}}]{rule}}}]}}"#
    )
}

#[test]
fn service_block_defaults() {
    let c = parse(with_service(r#","token_env":"ML_TOKEN""#, "").as_bytes()).unwrap();
    let s = c.service.as_ref().unwrap();
    assert_eq!(s.cluster, "meshlimit_service");
    assert_eq!(
        s.authority, "meshlimit_service",
        "authority defaults to the cluster"
    );
    assert_eq!(s.token, TokenSource::Env("ML_TOKEN".into()));
    assert_eq!(s.timeout_ms, 200);
    assert_eq!(s.sync_interval_ms, 1000);
    assert_eq!((s.proxy_id.as_deref(), s.zone.as_deref()), (None, None));
    assert_eq!(s.fallback_share, None);
    let r = &c.rules[0];
    assert_eq!(
        r.scope,
        Scope::Global,
        "global is the default with a service"
    );
    assert_eq!(r.failure_mode, FailureMode::Local);
    assert!(c.has_global() && c.uses_service());
    // The token never shows in a debug print (which may reach a log).
    let c = parse(with_service(r#","token":"s3cret""#, "").as_bytes()).unwrap();
    assert!(!format!("{c:?}").contains("s3cret"));
}

#[test]
fn service_block_every_field() {
    let c = parse(
        with_service(
            r#","authority":"ml.example","token":"t0k","timeout_ms":150,"sync_interval_ms":500,"proxy_id":"gw-1","zone":"az-b","fallback_share":0.25"#,
            r#","scope":"strict","failure_mode":"closed""#,
        )
        .as_bytes(),
    )
    .unwrap();
    let s = c.service.as_ref().unwrap();
    assert_eq!(s.authority, "ml.example");
    assert_eq!(s.token, TokenSource::Inline("t0k".into()));
    assert_eq!((s.timeout_ms, s.sync_interval_ms), (150, 500));
    assert_eq!(s.proxy_id.as_deref(), Some("gw-1"));
    assert_eq!(s.zone.as_deref(), Some("az-b"));
    assert_eq!(s.fallback_share, Some(250_000_000));
    assert_eq!(c.rules[0].scope, Scope::Strict);
    assert_eq!(c.rules[0].failure_mode, FailureMode::Closed);
    assert!(!c.has_global() && c.uses_service());
}

#[test]
fn failure_mode_top_level_and_per_rule() {
    let json = r#"{"service":{"cluster":"c","token":"t"},"failure_mode":"open","rules":[
      {"id":"a","match":{"path":"/a"},"limits":[{"window":"1s","max":1}]},
      {"id":"b","match":{"path":"/b"},"limits":[{"window":"1s","max":1}],"failure_mode":"closed"},
      {"id":"c","match":{"path":"/c"},"limits":[{"window":"1s","max":1}],"scope":"local"}]}"#;
    let c = parse(json.as_bytes()).unwrap();
    let modes: Vec<_> = c.rules.iter().map(|r| (r.scope, r.failure_mode)).collect();
    assert_eq!(
        modes,
        [
            (Scope::Global, FailureMode::Open),
            (Scope::Global, FailureMode::Closed),
            (Scope::Local, FailureMode::Local),
        ]
    );
    assert!(c.has_global());
}

#[test]
fn every_service_refusal_names_its_field() {
    let cases: &[(String, &str)] = &[
        (
            r#"{"rules":[],"service":{"token":"t"}}"#.into(),
            "service: missing field `cluster`",
        ),
        (
            with_service(r#","token":"t","colour":1"#, ""),
            "service.colour: unknown field `colour`",
        ),
        (
            with_service(r#","token":"t","token":"u""#, ""),
            "service: duplicate field `token`",
        ),
        (
            r#"{"rules":[],"service":{"cluster":"","token":"t"}}"#.into(),
            "service.cluster: \"\" is not an Envoy cluster name",
        ),
        (
            r#"{"rules":[],"service":{"cluster":"a b","token":"t"}}"#.into(),
            "service.cluster: \"a b\" is not an Envoy cluster name",
        ),
        (
            with_service(r#","token":"t","authority":"""#, ""),
            "service.authority: \"\" is not a host name",
        ),
        (
            with_service("", ""),
            "service: the companion needs its bearer token: set token_env",
        ),
        (
            with_service(r#","token":"t","token_env":"ML_TOKEN""#, ""),
            "service.token: set either token or token_env, not both",
        ),
        (
            with_service(r#","token":"""#, ""),
            "service.token: the token must be 1..=4096 bytes",
        ),
        (
            with_service(r#","token":"two words""#, ""),
            "service.token: the token may only hold printable ASCII without spaces",
        ),
        (
            with_service(r#","token_env":"ML-TOKEN""#, ""),
            "service.token_env: \"ML-TOKEN\" is not an environment variable name",
        ),
        (
            with_service(r#","token_env":"1TOKEN""#, ""),
            "service.token_env: \"1TOKEN\" is not an environment variable name",
        ),
        (
            with_service(r#","token":"t","sync_interval_ms":0"#, ""),
            "service.sync_interval_ms: 0 is out of range 100..=60000",
        ),
        (
            with_service(r#","token":"t","sync_interval_ms":60001"#, ""),
            "service.sync_interval_ms: 60001 is out of range 100..=60000",
        ),
        (
            with_service(r#","token":"t","sync_interval_ms":-5"#, ""),
            "service.sync_interval_ms: invalid value: integer `-5`",
        ),
        (
            with_service(r#","token":"t","timeout_ms":0"#, ""),
            "service.timeout_ms: 0 is out of range 1..1000",
        ),
        (
            with_service(r#","token":"t","timeout_ms":1000"#, ""),
            "service.timeout_ms: 1000 is out of range 1..1000: a sync must be answered or given up before the next one is due",
        ),
        (
            with_service(r#","token":"t","timeout_ms":300,"sync_interval_ms":250"#, ""),
            "service.timeout_ms: 300 is out of range 1..250",
        ),
        (
            with_service(r#","token":"t","proxy_id":"""#, ""),
            "service.proxy_id: must be 1..=119 printable ASCII characters",
        ),
        (
            with_service(&format!(r#","token":"t","proxy_id":"{}""#, "p".repeat(120)), ""),
            "service.proxy_id: must be 1..=119",
        ),
        (
            with_service(r#","token":"t","zone":"a z""#, ""),
            "service.zone: must be at most 64 printable ASCII characters",
        ),
        (
            with_service(r#","token":"t","fallback_share":0"#, ""),
            "service.fallback_share: 0 is out of range (0, 1]",
        ),
        (
            with_service(r#","token":"t","fallback_share":1.5"#, ""),
            "service.fallback_share: 1.5 is out of range (0, 1]",
        ),
        (
            with_service(r#","token":"t","fallback_share":-0.1"#, ""),
            "service.fallback_share: -0.1 is out of range (0, 1]",
        ),
        (
            with_service(r#","token":"t","fallback_share":"half""#, ""),
            "service.fallback_share: invalid type: string",
        ),
        (
            with_service(r#","token":"t""#, r#","failure_mode":"ajar""#),
            "rules[0].failure_mode: unknown variant `ajar`, expected one of `local`, `open`, `closed`",
        ),
        (
            with_service(r#","token":"t""#, r#","scope":"local","failure_mode":"open""#),
            "rules[0].failure_mode: a local rule never asks the companion",
        ),
        (
            with_service(r#","token":"t""#, r#","scope":"strict","shadow":true"#),
            "rules[0].shadow: a strict rule in shadow mode would still hold every request",
        ),
        (
            with_service(r#","token":"t""#, r#","scope":"strict","continue":true"#),
            "rules[0].continue: a strict rule ends its chain",
        ),
    ];
    for (json, want) in cases {
        let got = err(json);
        assert!(
            got.starts_with(want) || got.contains(want),
            "for {json}\n  got:  {got}\n  want: {want}"
        );
        assert!(!got.contains('\n'), "one line: {got}");
    }
    // The edges that are accepted.
    for ok in [
        r#","token":"t","sync_interval_ms":100,"timeout_ms":99"#,
        r#","token":"t","sync_interval_ms":60000,"timeout_ms":59999"#,
        r#","token":"t","fallback_share":1"#,
        r#","token":"t","fallback_share":1e-9"#,
        r#","token":"t","zone":"""#,
    ] {
        parse(with_service(ok, "").as_bytes()).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn the_token_from_the_vm_environment() {
    let c = parse(with_service(r#","token_env":"ML_TOKEN""#, "").as_bytes()).unwrap();
    let s = c.service.unwrap();
    let env = |value: Option<&str>| {
        let value = value.map(str::to_string);
        move |name: &str| {
            assert_eq!(name, "ML_TOKEN");
            value
        }
    };
    assert_eq!(s.resolve_token(env(Some("abc\n"))).unwrap(), "abc");
    let unset = s.resolve_token(env(None)).unwrap_err().to_string();
    assert_eq!(
        unset,
        "service.token_env: the VM environment variable \"ML_TOKEN\" is not set (Envoy: vm_config.environment_variables; Istio: vmConfig.env)"
    );
    let empty = s.resolve_token(env(Some(" "))).unwrap_err().to_string();
    assert_eq!(
        empty,
        "service.token_env: the VM environment variable \"ML_TOKEN\" is empty"
    );
    let bad = s.resolve_token(env(Some("a b"))).unwrap_err().to_string();
    assert!(
        bad.starts_with(
            "service.token_env: the value of \"ML_TOKEN\" may only hold printable ASCII"
        ),
        "{bad}"
    );
    let inline = parse(with_service(r#","token":"t0k""#, "").as_bytes()).unwrap();
    assert_eq!(
        inline
            .service
            .unwrap()
            .resolve_token(|_| panic!("no env read"))
            .unwrap(),
        "t0k"
    );
}

#[test]
fn proxy_identity_from_envoy_or_configured() {
    let s = parse(with_service(r#","token":"t""#, "").as_bytes())
        .unwrap()
        .service
        .unwrap();
    assert_eq!(
        s.resolve_identity(Some(b"envoy-az-a"), Some(b"az-a"))
            .unwrap(),
        ("envoy-az-a".to_string(), "az-a".to_string())
    );
    assert_eq!(
        s.resolve_identity(Some(b"envoy-az-a"), None).unwrap(),
        ("envoy-az-a".to_string(), String::new())
    );
    let none = s.resolve_identity(None, None).unwrap_err();
    assert_eq!(none.path, "service.proxy_id");
    assert!(none.reason.contains("Envoy has no node.id"), "{none}");
    let empty = s.resolve_identity(Some(b""), None).unwrap_err();
    assert_eq!(empty.path, "service.proxy_id");
    let spaced = s.resolve_identity(Some(b"my envoy"), None).unwrap_err();
    assert!(spaced.reason.contains("not usable"), "{spaced}");
    let long = s.resolve_identity(Some(&[b'x'; 120]), None).unwrap_err();
    assert!(long.reason.contains("not usable"), "{long}");
    // A zone Envoy reports that the wire would refuse is left out, not fatal.
    assert_eq!(
        s.resolve_identity(Some(b"e"), Some(&[b'z'; 65])).unwrap().1,
        ""
    );
    let set = parse(with_service(r#","token":"t","proxy_id":"gw-1","zone":"az-c""#, "").as_bytes())
        .unwrap()
        .service
        .unwrap();
    assert_eq!(
        set.resolve_identity(Some(b"ignored"), Some(b"ignored"))
            .unwrap(),
        ("gw-1".to_string(), "az-c".to_string())
    );
}

#[test]
fn scope_changes_the_fingerprint_seed() {
    let local = parse(with_service(r#","token":"t""#, r#","scope":"local""#).as_bytes()).unwrap();
    let global = parse(with_service(r#","token":"t""#, "").as_bytes()).unwrap();
    let strict = parse(with_service(r#","token":"t""#, r#","scope":"strict""#).as_bytes()).unwrap();
    let plain = parse(one_rule("").as_bytes()).unwrap();
    assert_eq!(
        local.rules[0].seed, plain.rules[0].seed,
        "local seeds are unchanged"
    );
    assert_ne!(global.rules[0].seed, local.rules[0].seed);
    assert_ne!(strict.rules[0].seed, global.rules[0].seed);
}

#[test]
fn the_companion_reads_rules_of_any_scope_without_a_service() {
    let rules = parse_rules(one_rule(r#","scope":"global""#).as_bytes()).unwrap();
    assert_eq!(rules[0].scope, Scope::Global);
    assert!(parse(one_rule(r#","scope":"global""#).as_bytes()).is_err());
}

/// Found by fuzzing (`fuzz/corpus/config/crash-d2d9cc75…`, minimized here): serde quotes
/// an unknown field or variant as written, and map keys end up in the field path, so a
/// configuration could put a line break (or an escape sequence) into the one log line a
/// refusal is. Control characters are escaped instead.
#[test]
fn refusals_are_one_line_whatever_the_configuration_holds() {
    for (json, path) in [
        (r#"{"\n":0}"#, "\\n"),
        (
            r#"{"rules":[],"x\r\nconfigured 0 rules":1}"#,
            "x\\r\\nconfigured 0 rules",
        ),
        (r#"{"rules":[],"headers":"ietf\n"}"#, "headers"),
        (r#"{"rules":[],"\u001b[2J":1}"#, "\\u{1b}[2J"),
        (
            r#"{"rules":[{"id":"a","match":{"path":"/","headers":{"x\ny":"v"}},"limits":[{"window":"1m","max":1}]}]}"#,
            "rules[0].match.headers.x\\ny",
        ),
        (r#"{"rules":[],"\u0085":1}"#, "\\u{85}"),
    ] {
        let e = parse(json.as_bytes()).unwrap_err();
        let line = e.to_string();
        assert!(!line.chars().any(char::is_control), "{json}: {line:?}");
        assert_eq!(e.path, path, "{json}: {line}");
    }
    // The first input the fuzzer found, as it found it.
    let found = b"{\"\\n\"\n  \"rules\": [\n    {\"id\": \"login_key\"}]}";
    let line = parse(found).unwrap_err().to_string();
    assert!(line.starts_with("\\n: unknown field `\\n`"), "{line}");
}

/// Found by fuzzing (`fuzz/corpus/config/crash-1376774b…`, the 4 bytes `[[]]`): serde's
/// derive reads a struct from an array by position, so `[[]]` started the filter with no
/// rules (limits silently off) and `PUT /rate-limits/rules` took it too. Records are read
/// from objects only, and the choices (`headers`, `scope`) from strings only.
#[test]
fn records_come_from_objects_and_choices_from_strings() {
    let rule = r#"{"id":"a","match":{"path":"/"},"limits":[{"window":"1m","max":1}]}"#;
    for (json, path) in [
        ("[[]]".to_string(), ""),
        (format!("[[{rule}]]"), ""),
        (
            r#"{"rules":[["a",0,{"path":"/"},null,[{"window":"1m","max":1}]]]}"#.into(),
            "rules[0]",
        ),
        (
            r#"{"rules":[{"id":"a","match":["/"],"limits":[{"window":"1m","max":1}]}]}"#.into(),
            "rules[0].match",
        ),
        (
            r#"{"rules":[{"id":"a","match":{"path":"/"},"limits":[["1m",1]]}]}"#.into(),
            "rules[0].limits[0]",
        ),
        (r#"{"rules":[],"headers":{"ietf":null}}"#.into(), "headers"),
        (r#"{"rules":[],"headers":["ietf"]}"#.into(), "headers"),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule.replace(r#""id":"a""#, r#""id":"a","scope":{"local":null}"#)
            ),
            "rules[0].scope",
        ),
        (
            format!(
                r#"{{"rules":[{}]}}"#,
                rule.replace(r#""id":"a""#, r#""id":"a","failure_mode":{"open":null}"#)
            ),
            "rules[0].failure_mode",
        ),
        (
            r#"{"rules":[],"failure_mode":{"closed":null}}"#.into(),
            "failure_mode",
        ),
        (
            r#"{"rules":[],"service":["meshlimit_service",null,"t"]}"#.into(),
            "service",
        ),
    ] {
        let e = parse(json.as_bytes()).unwrap_err();
        assert_eq!(e.path, path, "{json}: {e}");
        let expected = if path.ends_with("headers")
            || path.ends_with("scope")
            || path.ends_with("failure_mode")
        {
            "expected a string"
        } else {
            "expected a JSON object"
        };
        assert!(e.reason.contains(expected), "{json}: {e}");
    }
    // The same configuration in objects and strings is fine.
    let c = parse(format!(r#"{{"rules":[{rule}],"headers":"ietf"}}"#).as_bytes()).unwrap();
    assert_eq!((c.rules.len(), c.headers), (1, HeaderMode::Ietf));
    assert_eq!(parse_rules(b"[[]]").unwrap_err().path, "");
}

/// Found by fuzzing (`fuzz/corpus/config/crash-35b4de96…`, `"window": "ŗ"`): the window
/// was split one byte before its end, inside a two-byte character, and the parser
/// panicked, which takes the filter's VM down in `on_configure` (and the companion's
/// `PUT /rate-limits/rules` handler with it). Every window that is not `<digits><unit>`
/// is refused with the field named.
#[test]
fn windows_with_multi_byte_characters_are_refused_not_a_panic() {
    for w in [
        "\u{157}",
        "1\u{157}",
        "\u{e9}m",
        "1m\u{e9}",
        "\u{1f600}",
        "\u{661}s",
        "\u{ff11}m",
    ] {
        assert!(parse_window(w).is_err(), "{w:?}");
        let json = one_rule("").replace("\"1m\"", &serde_json::to_string(w).unwrap());
        let e = parse(json.as_bytes()).unwrap_err();
        assert_eq!(e.path, "rules[0].limits[0].window", "{w:?}: {e}");
    }
    let found = include_bytes!(
        "../../../fuzz/corpus/config/crash-35b4de96ba61fef2d0f8168a6d85244bb99cc991"
    );
    assert_eq!(parse(found).unwrap_err().path, "rules[0].limits[1].window");
    // What a window is did not change.
    assert_eq!(parse_window("90s"), Ok(90));
    assert_eq!(parse_window("366d"), Ok(366 * 86_400));
    assert!(parse_window("18446744073709551615s").is_err());
    assert!(parse_window("99999999999d").is_err());
}

#[test]
fn a_strict_rule_may_end_a_chain_a_cheaper_rule_starts() {
    let json = r#"{"service":{"cluster":"c","token":"t"},"rules":[
      {"id":"shed","priority":1,"match":{"path":"/pay"},"limits":[{"window":"1m","max":100}],"continue":true},
      {"id":"pay","match":{"path":"/pay"},"scope":"strict","limits":[{"window":"1m","max":20}]}]}"#;
    let c = parse(json.as_bytes()).unwrap();
    let chain: Vec<_> = c
        .rules
        .iter()
        .map(|r| (r.id.as_str(), r.scope, r.continues))
        .collect();
    assert_eq!(
        chain,
        [("shed", Scope::Global, true), ("pay", Scope::Strict, false)]
    );
}
