//! Ways around a limit, tried the way a hostile client would, through a real Envoy
//! (`--concurrency 2`) in front of a real upstream: path spellings (with the shipped
//! listener normalization options and with none of them), method case over HTTP/2,
//! rotating keys against a per-IP ceiling, repeated key headers, and the structured
//! rate-limit fields of real responses.

use std::time::Duration;

use meshlimit_e2e::{send_h2, Envoy, EnvoyOptions, Request, Response, Upstream};

fn wait_stat(envoy: &Envoy, name: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = envoy.stat(name).unwrap_or(0);
        if got >= want || std::time::Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_no_vm_failure(envoy: &Envoy) {
    let log = envoy.log();
    for bad in ["panicked", "Uncaught", "wasm trap", "Function: proxy_on"] {
        assert!(!log.contains(bad), "VM failure ({bad}) in the log:\n{log}");
    }
}

/// The login rule of the shipped configurations' shape: one token per client an hour,
/// so the second request of a client, in whatever spelling, must be refused.
const LOGIN: &str = r#"{"rules":[{"id":"login","match":{"path":"/api/auth/*","methods":["POST"]},
  "key":["header:x-api-key"],"limits":[{"window":"1h","max":1}]}]}"#;

/// Spellings of `/api/auth/login` per class, as sent on the wire (HTTP/1 request line).
const SPELLINGS: &[(&str, &str)] = &[
    ("percent-encoded unreserved", "/%61pi/auth/login"),
    ("percent-encoded unreserved", "/api/%61%75%74%68/l%6Fgin"),
    ("dot segments", "/./api/auth/login"),
    ("dot segments", "/api/x/../auth/login"),
    ("dot segments", "/api/x/%2e%2E/auth/login"),
    ("dot segments", "/../api/auth/./login"),
    ("double slashes", "//api/auth/login"),
    ("double slashes", "/api//auth///login"),
    ("encoded slash", "/api%2Fauth/login"),
    ("encoded slash", "/api%2fauth%2Flogin"),
    ("backslash", "/api\\auth\\login"),
    ("backslash", "/api%5Cauth/login"),
    ("path parameters", "/api;v=1/auth/login"),
    ("path parameters", "/api/auth;jsessionid=1/login"),
    ("path parameters", "/api/x/..;/auth/login"),
    ("trailing slash and query", "/api/auth/login/?next=/"),
    ("mixed", "//%61pi\\x\\..;p/./auth%2F%6cogin?q=1"),
];

/// Sends each spelling after the plain path has spent the client's only token: the
/// spelling must be refused by the filter (429, rule "login") or answered by Envoy
/// itself without reaching the upstream. Returns what happened per spelling.
fn spellings_meet_the_rule(opts: EnvoyOptions, upstream: &Upstream) -> Vec<(String, u16)> {
    let envoy = Envoy::start_with(opts.upstream(upstream));
    let mut seen = Vec::new();
    for (i, (class, spelling)) in SPELLINGS.iter().enumerate() {
        let key = format!("spelling-{i}");
        let mut c = envoy.client();
        let plain = c.send(&Request::post("/api/auth/login").header("x-api-key", &key));
        assert_eq!(plain.status, 200, "the first login of {key}");
        let before = upstream.hits();
        let r = c.send(&Request::post(spelling).header("x-api-key", &key));
        let reached = upstream.hits() - before;
        assert_eq!(
            reached, 0,
            "{class}: {spelling:?} reached the upstream ({}) after the limit was spent",
            r.status
        );
        if r.status == 429 {
            assert_eq!(r.json()["rule"], "login", "{class}: {spelling:?}");
        } else {
            assert!(
                (300..500).contains(&r.status),
                "{class}: {spelling:?}: {} is neither the filter's 429 nor Envoy's own refusal",
                r.status
            );
        }
        seen.push((format!("{class}: {spelling}"), r.status));
    }
    assert_no_vm_failure(&envoy);
    seen
}

#[test]
fn every_spelling_of_a_path_meets_its_rule_without_listener_normalization() {
    let upstream = Upstream::start();
    let seen = spellings_meet_the_rule(EnvoyOptions::new(LOGIN), &upstream);
    eprintln!("no normalization options: {seen:#?}");
    // Envoy forwards every one of these as it is: the filter alone catches them all.
    assert!(seen.iter().all(|(_, s)| *s == 429), "{seen:#?}");
}

#[test]
fn every_spelling_of_a_path_meets_its_rule_with_the_shipped_normalization() {
    let upstream = Upstream::start();
    let seen = spellings_meet_the_rule(EnvoyOptions::new(LOGIN).shipped_path_options(), &upstream);
    eprintln!("shipped normalization options: {seen:#?}");
    // Escaped slashes are redirected by Envoy (UNESCAPE_AND_REDIRECT) to the path the
    // filter counts; everything else reaches the filter.
    for (what, status) in &seen {
        if what.contains("%2F") || what.contains("%2f") {
            assert!(*status == 307 || *status == 429, "{what}: {status}");
        }
    }
}

#[test]
fn the_escaped_slash_redirect_goes_to_the_counted_path() {
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(LOGIN)
            .shipped_path_options()
            .upstream(&upstream),
    );
    let mut c = envoy.client();
    let r = c.send(&Request::post("/api%2Fauth/login").header("x-api-key", "redirected"));
    assert_eq!(r.status, 307, "{:?}", r.headers);
    assert_eq!(r.header("location"), Some("/api/auth/login"));
    assert_eq!(upstream.hits(), 0);
    // Following it is the login, counted.
    let follow = |c: &mut meshlimit_e2e::Client| {
        c.send(&Request::post("/api/auth/login").header("x-api-key", "redirected"))
            .status
    };
    assert_eq!([follow(&mut c), follow(&mut c)], [200, 429]);
    // What the shipped options make of the other spellings before the upstream sees
    // them: the spelling the filter counts.
    for spelling in ["/api\\auth\\login", "/%61pi/./auth//x/../login"] {
        let r = c.send(&Request::post(spelling).header("x-api-key", spelling));
        assert_eq!(r.status, 200, "{spelling}");
        assert_eq!(r.json()["path"], "/api/auth/login", "{spelling}");
    }
}

#[test]
fn a_path_without_normal_form_is_refused_with_400() {
    let upstream = Upstream::start();
    for opts in [
        EnvoyOptions::new(LOGIN),
        EnvoyOptions::new(LOGIN).shipped_path_options(),
    ] {
        let envoy = Envoy::start_with(opts.upstream(&upstream));
        let hits = upstream.hits();
        let mut refused = 0;
        for path in [
            "/api/auth/login%zz",
            "/api/%u0061uth/login",
            "/api/auth%00/login",
            "/api/auth/%0alogin",
            "/%",
        ] {
            let r = envoy.send(&Request::post(path).header("x-api-key", "bad-path"));
            assert!(r.status < 500, "{path}: {}", r.status);
            assert_ne!(r.status, 200, "{path} was let through");
            if r.status == 400 && r.header("content-type") == Some("application/json") {
                let body = r.json();
                assert_eq!(body["error"], "bad_request", "{path}");
                refused += 1;
            }
        }
        assert_eq!(upstream.hits(), hits, "none reached the upstream");
        // With normalize_path Envoy refuses %00 itself (400, no body); the filter refuses
        // the rest.
        assert!(refused >= 4, "the filter refused {refused} paths");
        assert_eq!(
            wait_stat(&envoy, "meshlimit_bad_path_total", refused),
            refused
        );
        // A normal request still works.
        let r = envoy.send(&Request::post("/api/auth/login").header("x-api-key", "fine"));
        assert_eq!(r.status, 200);
        assert_no_vm_failure(&envoy);
    }
}

#[test]
fn method_case_over_http2_and_head_for_get_are_counted() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        r#"{"rules":[
          {"id":"login","match":{"path":"/api/auth/*","methods":["POST"]},"key":["header:x-api-key"],
           "limits":[{"window":"1h","max":2}]},
          {"id":"read","match":{"path":"/items","methods":["GET"]},"key":["header:x-api-key"],
           "limits":[{"window":"1h","max":2}]}]}"#,
        &upstream,
    );
    let key = vec![("x-api-key", "h2-client")];
    let rs = send_h2(
        envoy.port,
        &[
            ("post", "/api/auth/login", key.clone()),
            ("Post", "/api/auth/login", key.clone()),
            ("post", "/api/auth/login", key.clone()),
            ("POST", "/api/auth/login", key.clone()),
        ],
    );
    let statuses: Vec<u16> = rs.iter().map(|r| r.0).collect();
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "lower-case methods are counted"
    );
    // The upstream really got the lower-case method: it is what Envoy forwards.
    let body: serde_json::Value = serde_json::from_slice(&rs[0].2).unwrap();
    assert_eq!(body["method"], "post");
    let rejected: serde_json::Value = serde_json::from_slice(&rs[2].2).unwrap();
    assert_eq!(rejected["rule"], "login");
    // HEAD runs the GET handler in common frameworks: a GET rule counts it.
    let mut c = envoy.client();
    let head = || Request::new("HEAD", "/items").header("x-api-key", "reader");
    let get = || Request::get("/items").header("x-api-key", "reader");
    let s = [
        c.send(&head()).status,
        c.send(&get()).status,
        c.send(&head()).status,
    ];
    assert_eq!(s, [200, 200, 429]);
}

/// README's login example: a per-key limit, then (continue) a per-IP ceiling.
const LOGIN_KEY_AND_IP: &str = r#"{"rules":[
  {"id":"login-key","priority":11,"match":{"path":"/api/auth/*","methods":["POST"]},
   "key":["header:x-api-key"],"limits":[{"window":"1m","max":3}],"continue":true},
  {"id":"login-ip","priority":10,"match":{"path":"/api/auth/*","methods":["POST"]},
   "key":["ip"],"limits":[{"window":"1m","max":5}]}],"headers":"both"}"#;

#[test]
fn a_client_rotating_its_key_still_meets_the_per_ip_ceiling() {
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(LOGIN_KEY_AND_IP)
            .use_remote_address(true)
            .upstream(&upstream),
    );
    let mut c = envoy.client();
    let rs: Vec<Response> = (0..10)
        .map(|i| {
            c.send(&Request::post("/api/auth/login").header("x-api-key", &format!("fresh-{i}")))
        })
        .collect();
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    assert!(rs[5..].iter().all(|r| r.json()["rule"] == "login-ip"));
    assert_eq!(upstream.hits(), 5, "5 of 10 against a ceiling of 5");
    // Leaving the key out does not escape either: the per-key rule is passed over and
    // the ceiling applies.
    let r = c.send(&Request::post("/api/auth/login"));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["rule"], "login-ip");
    assert!(wait_stat(&envoy, "meshlimit_no_client_key_total", 1) >= 1);
}

#[test]
fn a_per_key_refusal_does_not_spend_the_shared_ceiling() {
    let upstream = Upstream::start();
    let envoy = Envoy::start_with(
        EnvoyOptions::new(LOGIN_KEY_AND_IP)
            .use_remote_address(true)
            .upstream(&upstream),
    );
    let mut c = envoy.client();
    let one = |c: &mut meshlimit_e2e::Client, k: &str| {
        c.send(&Request::post("/api/auth/login").header("x-api-key", k))
    };
    // One key: 3 admitted, then refused by its own limit, 6 times.
    let s: Vec<u16> = (0..9).map(|_| one(&mut c, "typo").status).collect();
    assert_eq!(s, [200, 200, 200, 429, 429, 429, 429, 429, 429]);
    let r = one(&mut c, "typo");
    assert_eq!(r.json()["rule"], "login-key");
    // The ceiling was charged 3 times only: two more clients of this address get in.
    assert_eq!(one(&mut c, "colleague").status, 200);
    assert_eq!(one(&mut c, "colleague").status, 200);
    let r = one(&mut c, "colleague");
    assert_eq!(
        (r.status, r.json()["rule"].as_str()),
        (429, Some("login-ip"))
    );
    // Everyone else at this address now meets the ceiling.
    let r = one(&mut envoy.client(), "another");
    assert_eq!(
        (r.status, r.json()["rule"].as_str()),
        (429, Some("login-ip"))
    );
}

#[test]
fn repeated_key_headers_are_refused_and_cannot_rotate() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        r#"{"rules":[{"id":"api","match":{"path":"/api/*"},"key":["header:x-api-key","ip"],
            "limits":[{"window":"1h","max":2}]}]}"#,
        &upstream,
    );
    let mut c = envoy.client();
    // The rotation attack: the victim's key first (what an upstream reading the first
    // value sees), a fresh junk value second.
    for i in 0..6 {
        let r = c.send(
            &Request::get("/api/x")
                .header("x-api-key", "victim")
                .header("x-api-key", &format!("junk-{i}")),
        );
        assert_eq!(r.status, 400, "attempt {i}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["error"], "bad_request");
    }
    // Empty copies, reordered copies: refused too.
    for pair in [("", "victim"), ("victim", ""), ("victim", "victim")] {
        let r = c.send(
            &Request::get("/api/x")
                .header("x-api-key", pair.0)
                .header("x-api-key", pair.1),
        );
        assert_eq!(r.status, 400, "{pair:?}");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(
        wait_stat(&envoy, "meshlimit_repeated_key_header_total", 9),
        9
    );
    // The victim's own bucket was never charged by any of it.
    let v = || Request::get("/api/x").header("x-api-key", "victim");
    assert_eq!(
        [
            c.send(&v()).status,
            c.send(&v()).status,
            c.send(&v()).status
        ],
        [200, 200, 429]
    );
    // One header whose value holds a comma is one key, limited as usual.
    let comma = || Request::get("/api/x").header("x-api-key", "a,b");
    assert_eq!(
        [
            c.send(&comma()).status,
            c.send(&comma()).status,
            c.send(&comma()).status
        ],
        [200, 200, 429]
    );
    // A repeated header no rule keys on changes nothing.
    let r = c.send(
        &Request::get("/api/x")
            .header("x-api-key", "other")
            .header("x-note", "1")
            .header("x-note", "2"),
    );
    assert_eq!(r.status, 200);
    assert_no_vm_failure(&envoy);
}

/// Checks RateLimit-Policy and RateLimit as RFC 9651 structured fields against
/// draft-ietf-httpapi-ratelimit-headers-10/-11 (Lists of String Items; `q`, `w`, `r`,
/// `t` Integers; the item names a listed policy; `t` not after Retry-After). Returns
/// (policy name, r, t).
fn check_ietf_fields(r: &Response) -> (String, i64, i64) {
    use sfv::{BareItem, List, ListEntry, Parser};
    let items = |field: &str| -> Vec<sfv::Item> {
        let values = r.header_all(field);
        assert!(!values.is_empty(), "no {field}: {:?}", r.headers);
        // Several field lines of a List are one List (RFC 9651 §3.1).
        let value = values.join(", ");
        let list: List = Parser::new(&value)
            .parse()
            .unwrap_or_else(|e| panic!("{field}: {value:?} is not an SF List: {e}"));
        list.into_iter()
            .map(|e| match e {
                ListEntry::Item(i) => i,
                ListEntry::InnerList(_) => panic!("{field}: inner list"),
            })
            .collect()
    };
    let int = |item: &sfv::Item, key: &str| match item.params.get(key) {
        Some(BareItem::Integer(n)) => i64::from(*n),
        other => panic!("{key}: not an Integer: {other:?}"),
    };
    let name = |item: &sfv::Item| match &item.bare_item {
        BareItem::String(s) => s.as_str().to_owned(),
        other => panic!("not a String: {other:?}"),
    };
    let mut names = Vec::new();
    for p in items("ratelimit-policy") {
        assert!(int(&p, "q") >= 0 && int(&p, "w") > 0);
        let n = name(&p);
        assert!(!names.contains(&n), "duplicate policy name {n}");
        names.push(n);
    }
    let limits = items("ratelimit");
    assert_eq!(limits.len(), 1);
    let (n, rr, t) = (name(&limits[0]), int(&limits[0], "r"), int(&limits[0], "t"));
    assert!(names.contains(&n), "{n} not in {names:?}");
    assert!(rr >= 0 && t >= 0);
    if let Some(retry) = r.header("retry-after") {
        let retry: i64 = retry.parse().expect("Retry-After is delay-seconds");
        assert!(t <= retry, "Retry-After {retry} earlier than t={t}");
    }
    (n, rr, t)
}

#[test]
fn ratelimit_fields_of_real_responses_follow_the_draft() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(
        r#"{"rules":[{"id":"auth","match":{"path":"/a"},"key":["header:x-api-key"],
            "limits":[{"window":"1m","max":3},{"window":"1h","max":20},{"window":"10s","max":10,"burst":4}]}],
            "headers":"both"}"#,
        &upstream,
    );
    let mut c = envoy.client();
    let mut refused = 0;
    for i in 0..8 {
        let r = c.send(&Request::get("/a").header("x-api-key", "sf"));
        let (name, remaining, t) = check_ietf_fields(&r);
        if r.status == 429 {
            refused += 1;
            // The item is the limit Retry-After comes from: the same second.
            let retry: i64 = r.header("retry-after").unwrap().parse().unwrap();
            assert_eq!(
                (name.as_str(), remaining, t),
                ("auth-1m", 0, retry),
                "request {i}"
            );
            assert!(
                (19..=20).contains(&retry),
                "a minute token every 20 s: {retry}"
            );
        } else {
            assert!(t >= 1, "request {i}: t={t}");
        }
    }
    assert_eq!(refused, 5);
}
