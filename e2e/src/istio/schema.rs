//! A Kubernetes structural schema (OpenAPI v3.0, as in a CRD's `openAPIV3Schema`) as a
//! JSON Schema the `jsonschema` crate validates, checking what the API server checks.
//!
//! Most of a structural schema already is JSON Schema (draft 4). What is not, and what
//! [`to_json_schema`] does about it, the way the API server applies it:
//! - `nullable: true` lets a value be null: `type: T` becomes `type: [T, "null"]`;
//! - `format: int32`, `uint32`, `int64` bound a number: they become `minimum`/`maximum`
//!   (JSON Schema's `format` applies to strings only);
//! - an object with `properties` refuses fields it does not list unless it carries
//!   `x-kubernetes-preserve-unknown-fields: true` (what `kubectl` does by default, strict
//!   field validation): such objects get `additionalProperties: false`;
//! - `x-kubernetes-validations` (CEL rules) stay, and a custom keyword of the validator
//!   evaluates them ([`super::cel`]); the other `x-kubernetes-*` keys say how lists and
//!   maps merge and are dropped.

use serde_json::{json, Map, Value};

use super::cel::{CelRules, VALIDATIONS};

/// A validator for instances of `structural` (a CRD's schema of `spec`): its schema
/// keywords and its CEL rules. Fails when the schema, or one of its CEL rules, does not
/// compile.
pub fn validator(structural: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::draft4::options()
        .with_keyword(VALIDATIONS, CelRules::factory)
        .build(&to_json_schema(structural))
        .map_err(|e| e.to_string())
}

/// See the module documentation.
pub fn to_json_schema(s: &Value) -> Value {
    let Value::Object(m) = s else {
        return s.clone();
    };
    let preserve_unknown = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let mut out = Map::new();
    let mut bounds: Option<(Value, Value)> = None;
    for (k, v) in m {
        if (k.starts_with("x-kubernetes-") && k != VALIDATIONS)
            || k == "nullable"
            || k == "description"
        {
            continue;
        }
        let v = match k.as_str() {
            "properties" | "patternProperties" | "definitions" => Value::Object(
                v.as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, s)| (name.clone(), to_json_schema(s)))
                    .collect(),
            ),
            "items" | "additionalProperties" | "not" => match v {
                Value::Array(a) => Value::Array(a.iter().map(to_json_schema).collect()),
                v => to_json_schema(v),
            },
            "allOf" | "anyOf" | "oneOf" => Value::Array(
                v.as_array()
                    .into_iter()
                    .flatten()
                    .map(to_json_schema)
                    .collect(),
            ),
            "format" => {
                bounds = match v.as_str() {
                    Some("int32") => Some((json!(i32::MIN), json!(i32::MAX))),
                    Some("uint32") => Some((json!(0), json!(u32::MAX))),
                    Some("int64") => Some((json!(i64::MIN), json!(i64::MAX))),
                    _ => None,
                };
                if bounds.is_some() {
                    continue;
                }
                v.clone()
            }
            _ => v.clone(),
        };
        out.insert(k.clone(), v);
    }
    if let Some((min, max)) = bounds {
        out.entry("minimum").or_insert(min);
        out.entry("maximum").or_insert(max);
    }
    if m.get("nullable") == Some(&json!(true)) {
        if let Some(t @ Value::String(_)) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        }
    }
    if out.contains_key("properties") && !preserve_unknown {
        out.entry("additionalProperties").or_insert(json!(false));
    }
    Value::Object(out)
}
