//! The HTTP API against the embedded store: auth, every bad input, rules replacement,
//! both algorithms with multi-window limits, sync shares, metrics, graceful shutdown.
//! Served in this process through the library's `server::run`, except where the
//! process is the point (SIGTERM and the exit status: the binary).

mod support;
use serde_json::json;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_required_except_health() {
    let s = Service::in_process(&[]).await;
    let anon = s.client.with_token(None);
    let wrong = s.client.with_token(Some("test-token-12"));
    let body = json!({"client_id": "a", "rule_id": "api"});
    for c in [&anon, &wrong] {
        let r = c.post_json("/rate-limit/check", &body).await.unwrap();
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.json()["error"], "unauthorized");
        assert_eq!(c.get("/metrics").await.unwrap().status, 401);
        let r = c
            .post_json(
                "/v1/sync",
                &json!({"proxy_id": "p", "span_ms": 1, "entries": []}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401);
        let r = c
            .put_raw("/rate-limits/rules", RULES.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 401);
    }
    assert_eq!(anon.get("/healthz").await.unwrap().status, 200);
    let r = anon.get("/readyz").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["store"], "memory");
    let r = s
        .client
        .post_json("/rate-limit/check", &body)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_named_4xx() {
    let s = Service::in_process(&[]).await;
    let c = &s.client;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/rate-limit/check", b"{not json".to_vec(), 400, "line 1"),
        ("/rate-limit/check", br#"{"client_id":1,"rule_id":"api"}"#.to_vec(), 400, "client_id"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"api","hits":-1}"#.to_vec(), 400, "hits"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"api","hits":0}"#.to_vec(), 400, "hits"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"api","hits":1000001}"#.to_vec(), 400, "hits"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"api","hits":1e30}"#.to_vec(), 400, "hits"),
        ("/rate-limit/check", br#"{"client_id":"","rule_id":"api"}"#.to_vec(), 400, "client_id"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"api","x":1}"#.to_vec(), 400, "unknown field"),
        ("/rate-limit/check", br#"{"client_id":"a","rule_id":"nope"}"#.to_vec(), 404, "rule_id"),
        ("/rate-limit/check", format!(r#"{{"client_id":"{}","rule_id":"api"}}"#, "x".repeat(2000)).into_bytes(), 400, "client_id"),
        ("/rate-limit/check", vec![b' '; 5 * 1024 * 1024], 413, "body"),
        ("/v1/sync", br#"{"proxy_id":"p","span_ms":1000,"entries":[{"rule":"r","key":"00000000000000ab","window_secs":0,"max":1,"admitted":1}]}"#.to_vec(), 400, "entries[0].window_secs"),
        ("/v1/sync", br#"{"proxy_id":"p","span_ms":1000,"entries":[{"rule":"r","key":"00000000000000ab","window_secs":1,"max":1,"admitted":"3"}]}"#.to_vec(), 400, "entries[0].admitted"),
        ("/v1/sync", br#"{"proxy_id":"","span_ms":1000,"entries":[]}"#.to_vec(), 400, "proxy_id"),
        ("/v1/sync", br#"{"proxy_id":"p","span_ms":1000,"entries":[{"rule":"r","key":"00000000000000ab","window_secs":1,"max":1,"admitted":2000000}]}"#.to_vec(), 400, "admitted"),
    ];
    for (path, body, status, needle) in cases {
        // The server answers 413 before reading a too-large body and closes the
        // connection; the client may still be writing and see a reset instead of the
        // answer. Try a few times: one 413 must come through.
        let mut reply = None;
        for _ in 0..5 {
            if let Ok(r) = c.post_raw(path, body.clone()).await {
                reply = Some(r);
                break;
            }
        }
        let r = reply.unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!(r.status, status, "{path}: {}", r.text());
        let j = r.json();
        assert!(
            j["error"].is_string(),
            "{path}: not a JSON error: {}",
            r.text()
        );
        assert!(
            j["detail"].as_str().unwrap_or("").contains(needle),
            "{path}: detail {:?} lacks {needle:?}",
            j["detail"]
        );
    }
    // Too many entries in one sync.
    let entry = json!({"rule":"r","key":"00000000000000ab","window_secs":1,"max":1,"admitted":0});
    let big = json!({"proxy_id":"p","span_ms":1000,"entries": vec![entry; 10_001]});
    let r = c.post_json("/v1/sync", &big).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .starts_with("entries: 10001"));
    // The service survived all of it.
    assert_eq!(c.get("/healthz").await.unwrap().status, 200);
    assert!(
        metric(
            c,
            "meshlimit_requests_total{endpoint=\"check\",status=\"400\"}"
        )
        .await
            >= 8.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_replaced_whole_or_not_at_all() {
    let s = Service::in_process(&[]).await;
    let c = &s.client;
    let id = uniq("rules");
    // An invalid set (second rule broken) changes nothing.
    let bad = r#"{"rules":[{"id":"fresh","match":{"path":"/x"},"limits":[{"window":"1m","max":1}]},
                  {"id":"broken","match":{"path":"/y"},"limits":[{"window":"1parsec","max":1}]}]}"#;
    let r = c
        .put_raw("/rate-limits/rules", bad.as_bytes().to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("rules[1].limits[0].window"));
    // Found by fuzzing: a window whose last character takes two bytes panicked the
    // parser (the request died without an answer), and a rule given as an array was read
    // by position. Both are a 400 naming the field, and change nothing.
    for (body, field) in [
        (
            r#"{"rules":[{"id":"fresh","match":{"path":"/x"},"limits":[{"window":"ŗ","max":1}]}]}"#,
            "rules[0].limits[0].window",
        ),
        (
            r#"{"rules":[["fresh",0,{"path":"/x"},null,[{"window":"1m","max":1}]]]}"#,
            "rules[0]",
        ),
    ] {
        let r = c
            .put_raw("/rate-limits/rules", body.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_rules");
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.starts_with(&format!("{field}: ")), "{detail}");
    }
    assert_eq!(check(c, &id, "api", 1).await["allowed"], true);
    let r = c
        .post_json(
            "/rate-limit/check",
            &json!({"client_id": id, "rule_id": "fresh"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // A valid set replaces everything: "api" is gone, "fresh" is there.
    let good =
        r#"{"rules":[{"id":"fresh","match":{"path":"/x"},"limits":[{"window":"1m","max":1}]}]}"#;
    let r = c
        .put_raw("/rate-limits/rules", good.as_bytes().to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["rules"], 1);
    assert_eq!(check(c, &id, "fresh", 1).await["allowed"], true);
    assert_eq!(check(c, &id, "fresh", 1).await["allowed"], false);
    let r = c
        .post_json(
            "/rate-limit/check",
            &json!({"client_id": id, "rule_id": "api"}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "unknown_rule");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_multi_window_in_memory() {
    let s = Service::in_process(&["--algorithm", "sliding-window"]).await;
    multi_window_contract(&s.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_multi_window_in_memory() {
    let s = Service::in_process(&["--algorithm", "token-bucket"]).await;
    multi_window_contract(&s.client).await;
    // Refill: "short" is 3 per second, burst 3; a token comes back every 333 ms.
    let id = uniq("tb");
    for _ in 0..3 {
        assert_eq!(check(&s.client, &id, "short", 1).await["allowed"], true);
    }
    let r = check(&s.client, &id, "short", 1).await;
    assert_eq!(r["allowed"], false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(check(&s.client, &id, "short", 1).await["allowed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_shares_follow_demand_in_memory() {
    let s = Service::in_process(&["--share-ttl-ms", "2000"]).await;
    sync_contract(&s.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_metrics_render() {
    let mut s = Service::start(&[]);
    let id = uniq("m");
    check(&s.client, &id, "api", 1).await;
    let text = s.client.get("/metrics").await.unwrap().text();
    for m in [
        "meshlimit_requests_total{endpoint=\"check\",status=\"200\"} 1",
        "meshlimit_decisions_total{endpoint=\"check\",decision=\"allowed\",source=\"store\"} 1",
        "meshlimit_store_latency_seconds_count 1",
        "meshlimit_degraded 0",
        "meshlimit_store_info{store=\"memory\"} 1",
    ] {
        assert!(text.contains(m), "metrics lack {m}:\n{text}");
    }
    assert!(s.terminate(), "service did not exit 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_parsed_as_strictly_as_the_filter_parses_them() {
    // PUT /rate-limits/rules uses the filter's parser: a second document after the first
    // or a repeated field is refused, not half-applied.
    let s = Service::in_process(&[]).await;
    let c = &s.client;
    for (body, want) in [
        (
            r#"{"rules":[]} {"rules":[{"id":"x","match":{"path":"/x"},"limits":[{"window":"1m","max":1}]}]}"#,
            // Refused by the service's strict JSON layer before the filter's parser.
            "trailing characters",
        ),
        (
            r#"{"rules":[{"id":"x","match":{"path":"/x","headers":{"a":"1","A":"2"}},"limits":[{"window":"1m","max":1}]}]}"#,
            "rules[0].match.headers: duplicate header name",
        ),
    ] {
        let r = c
            .put_raw("/rate-limits/rules", body.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
        let detail = r.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(want), "{detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_one_json_object_parsed_strictly() {
    let s = Service::in_process(&[]).await;
    let c = &s.client;
    let id = uniq("strict");
    let check_body = format!(r#"{{"client_id":"{id}","rule_id":"api"}}"#);
    let key = "00000000000000cd";
    let entry = format!(r#"{{"rule":"r","key":"{key}","window_secs":60,"max":100,"admitted":7}}"#);
    let sync_body = format!(r#"{{"proxy_id":"p","span_ms":1000,"entries":[{entry}]}}"#);
    let cases: Vec<(&str, String, &str)> = vec![
        // Fields by position: refused at the top and inside.
        (
            "/rate-limit/check",
            format!(r#"["{id}","api",1]"#),
            "must be one JSON object",
        ),
        (
            "/v1/sync",
            format!(r#"["p","",1000,[{entry}]]"#),
            "must be one JSON object",
        ),
        (
            "/v1/sync",
            format!(
                r#"{{"proxy_id":"p","span_ms":1000,"entries":[["r","{key}",60,100,null,7,0]]}}"#
            ),
            "entries[0]: invalid type: sequence",
        ),
        // Anything after the document.
        (
            "/rate-limit/check",
            format!("{check_body} {check_body}"),
            "trailing characters",
        ),
        (
            "/rate-limit/check",
            format!(r#"{check_body},"hits":5}}"#),
            "trailing characters",
        ),
        ("/v1/sync", format!("{sync_body}x"), "trailing characters"),
        (
            "/v1/sync",
            format!("{sync_body}{sync_body}"),
            "trailing characters",
        ),
        // A field twice.
        (
            "/rate-limit/check",
            format!(r#"{{"client_id":"{id}","rule_id":"api","client_id":"other"}}"#),
            "duplicate field `client_id`",
        ),
        // Not a fingerprint.
        (
            "/v1/sync",
            sync_body.replace(key, "00000000000000CD"),
            "entries[0].key: must be 16 lower-case hex digits",
        ),
    ];
    for (path, body, needle) in cases {
        let r = c.post_raw(path, body.clone().into_bytes()).await.unwrap();
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(r.json()["error"], "bad_request", "{}", r.text());
        let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
        assert!(
            detail.contains(needle),
            "{path} {body}: {detail:?} lacks {needle:?}"
        );
    }
    // Nothing of it was applied: the first real check and report are the first counted.
    assert_eq!(check(c, &id, "api", 1).await["remaining"], 4);
    let r = c
        .post_raw("/v1/sync", sync_body.into_bytes())
        .await
        .unwrap();
    assert_eq!(r.json()["entries"][0]["used"], 7, "{}", r.text());

    // PUT /rate-limits/rules: this layer refuses what is not one object; the rules
    // themselves are the config parser's to judge. Either way nothing changes.
    let one =
        r#"{"rules":[{"id":"fresh","match":{"path":"/x"},"limits":[{"window":"1m","max":1}]}]}"#;
    for body in [
        format!("[{one}]"),
        format!("{one} {{\"rules\":[]}}"),
        "\"rules\"".to_string(),
    ] {
        let r = c
            .put_raw("/rate-limits/rules", body.clone().into_bytes())
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(
            r.json()["detail"].as_str().unwrap().starts_with("body: "),
            "{}",
            r.text()
        );
    }
    assert_eq!(metric(c, "meshlimit_rules").await, 5.0);
    assert_eq!(check(c, &id, "api", 1).await["remaining"], 3);

    // Only JSON: a form post (what `curl -d` and a browser send) is 415.
    for ct in ["application/x-www-form-urlencoded", "text/plain"] {
        let r = c
            .request_with(
                hyper::Method::POST,
                "/rate-limit/check",
                &[("content-type", ct)],
                Some(check_body.clone().into_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 415, "{ct}: {}", r.text());
        assert_eq!(r.json()["error"], "unsupported_media_type");
    }
    assert_eq!(check(c, &id, "api", 1).await["remaining"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_has_a_json_body() {
    use hyper::Method;
    let s = Service::in_process(&[]).await;
    let c = &s.client;
    let cases: Vec<(Method, &str, u16, &str)> = vec![
        (Method::GET, "/rate-limit/check", 405, "method_not_allowed"),
        (Method::DELETE, "/v1/sync", 405, "method_not_allowed"),
        (
            Method::POST,
            "/rate-limits/rules",
            405,
            "method_not_allowed",
        ),
        (Method::POST, "/healthz", 405, "method_not_allowed"),
        (Method::PUT, "/metrics", 405, "method_not_allowed"),
        (Method::GET, "/nope", 404, "not_found"),
        (Method::POST, "/v1/sync/", 404, "not_found"),
        (Method::POST, "//v1/sync", 404, "not_found"),
        (Method::POST, "/V1/SYNC", 404, "not_found"),
    ];
    for (m, path, status, code) in cases {
        let r = c
            .request(m.clone(), path, Some(b"{}".to_vec()))
            .await
            .unwrap();
        assert_eq!(r.status, status, "{m} {path}: {}", r.text());
        assert_eq!(
            r.headers.get("content-type").unwrap(),
            "application/json",
            "{m} {path}"
        );
        let j = r.json();
        assert_eq!(j["error"], code, "{m} {path}: {}", r.text());
        assert!(
            j["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            r.text()
        );
        if status == 405 {
            assert!(
                r.headers.contains_key("allow"),
                "{m} {path}: no Allow header"
            );
        }
    }
    // Refused for a missing token before any of that, also as JSON.
    let r = c
        .with_token(None)
        .request(Method::POST, "/rate-limit/check", Some(b"[]".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("unauthorized"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_in_any_case_but_one_header_only() {
    use hyper::Method;
    let s = Service::in_process(&[]).await;
    let anon = s.client.with_token(None);
    let body = json!({"client_id": uniq("case"), "rule_id": "api"}).to_string();
    for scheme in ["Bearer", "bearer", "BEARER", "bEARER"] {
        let auth = format!("{scheme} {TOKEN}");
        let r = anon
            .request_with(
                Method::POST,
                "/rate-limit/check",
                &[("authorization", &auth)],
                Some(body.clone().into_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
    }
    let wrong_case_token = format!("Bearer {}", TOKEN.to_uppercase());
    let good = format!("Bearer {TOKEN}");
    for headers in [
        vec![("authorization", wrong_case_token.as_str())],
        vec![
            ("authorization", good.as_str()),
            ("authorization", good.as_str()),
        ],
        vec![
            ("authorization", good.as_str()),
            ("authorization", "Bearer x"),
        ],
    ] {
        let r = anon
            .request_with(
                Method::POST,
                "/rate-limit/check",
                &headers,
                Some(body.clone().into_bytes()),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_and_reset_at_are_true_in_memory() {
    let sw = Service::in_process(&["--algorithm", "sliding-window"]).await;
    let tb = Service::in_process(&["--algorithm", "token-bucket"]).await;
    tokio::join!(
        retry_contract(&sw.client, true),
        retry_contract(&tb.client, false)
    );
    // More hits than the limit holds: no retry time would be true, so 400.
    let r = sw
        .client
        .post_json(
            "/rate-limit/check",
            &json!({"client_id": "x", "rule_id": "retry", "hits": 3}),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .starts_with("hits: 3 is more than"));
}
