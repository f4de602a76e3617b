//! The companion's request bodies, read as its HTTP layer reads them
//! (`redis-service/src/http.rs`): `meshlimit_core::json::check_one_object` for every
//! body, then `json::parse` into the endpoint's type and its `validate` (what
//! `Service::check`/`sync` call), or `config::parse_rules` for `PUT /rate-limits/rules`.
//! Every input is tried as each body: `/rate-limit/check`, `/v1/sync` (today's
//! `SyncRequest` and the global-scope `SyncReport`), `/v1/strict` and the rules.
//!
//! Properties: nothing panics; a body is accepted only if it is one JSON object, with no
//! key repeated in any object and an object wherever the type has a record; an accepted
//! body, serialized again the way the filter sends it, reads back equal and valid (so
//! what one side writes the other reads); rules pass the configuration checks
//! (`meshlimit_fuzz::config_checks`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlimit_core::config;
use meshlimit_core::protocol::{CheckRequest, StrictRequest, SyncReport, SyncRequest};
use meshlimit_core::json::{check_one_object, parse};
use meshlimit_fuzz::config_checks;
use meshlimit_fuzz::json_tree::Tree;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A body as one endpoint reads it: one object, the type, its own validation.
fn read<T: DeserializeOwned>(
    body: &[u8],
    validate: fn(&T) -> Result<(), String>,
) -> Result<T, String> {
    check_one_object(body)?;
    let t: T = parse(body)?;
    validate(&t)?;
    Ok(t)
}

/// Every object in the document at `path` (`*` for every element of an array).
fn objects_at<'a>(tree: &'a Tree, path: &[&str]) -> Vec<&'a Tree> {
    match path.split_first() {
        None => vec![tree],
        Some((&"*", rest)) => tree
            .items()
            .iter()
            .flat_map(|t| objects_at(t, rest))
            .collect(),
        Some((key, rest)) => tree
            .get(key)
            .map(|t| objects_at(t, rest))
            .unwrap_or_default(),
    }
}

fn check_body<T>(body: &[u8], validate: fn(&T) -> Result<(), String>, records: &[&[&str]])
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let t = match read::<T>(body, validate) {
        Ok(t) => t,
        Err(detail) => {
            assert!(!detail.is_empty());
            return;
        }
    };
    let tree = Tree::parse(body).expect("accepted body is one JSON document");
    assert_eq!(tree.duplicate_key(), None, "accepted a repeated key");
    for path in records {
        for o in objects_at(&tree, path) {
            assert!(
                o.is_object(),
                "accepted a record at {path:?} that is not an object"
            );
        }
    }
    let again = serde_json::to_vec(&t).expect("serializes");
    let back = read::<T>(&again, validate).unwrap_or_else(|e| {
        panic!(
            "{}: refused its own serialization: {e}",
            String::from_utf8_lossy(&again)
        )
    });
    assert_eq!(back, t, "round trip changed the body");
}

fuzz_target!(|body: &[u8]| {
    let one = check_one_object(body);
    if let Some(tree) = Tree::parse(body) {
        assert_eq!(
            one.is_ok(),
            tree.is_object(),
            "one JSON document: object or not"
        );
    }
    if one.is_ok() {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        assert_eq!(first, Some(&b'{'));
    }

    check_body::<CheckRequest>(body, CheckRequest::validate, &[&[]]);
    check_body::<SyncRequest>(body, SyncRequest::validate, &[&[], &["entries", "*"]]);
    check_body::<SyncReport>(
        body,
        SyncReport::validate,
        &[&[], &["entries", "*"], &["entries", "*", "limits", "*"]],
    );
    check_body::<StrictRequest>(body, StrictRequest::validate, &[&[], &["limits", "*"]]);

    // PUT /rate-limits/rules: one object, then the filter's own parser.
    if one.is_ok() {
        let rules = config::parse_rules(body);
        let checked = config_checks::check(body);
        assert_eq!(rules.is_ok(), checked.is_ok());
        if let (Ok(r), Ok(c)) = (rules, checked) {
            assert_eq!(r, c.rules);
        }
    }
});
