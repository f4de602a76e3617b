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
            "rules[0].scope: \"global\" needs the companion",
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
            r#"{"rules":[],"service":{"cluster":"x"}}"#,
            "service: the companion service block is reserved",
        ),
        (
            r#"{"rules":[],"failure_mode":"open"}"#,
            "failure_mode: reserved",
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
    ] {
        let e = parse(json.as_bytes()).unwrap_err();
        assert_eq!(e.path, path, "{json}: {e}");
        let expected = if path.ends_with("headers") || path.ends_with("scope") {
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
