//! Static checks of the Istio manifests in `istio/`. No Kubernetes can run where these
//! tests run, so nothing is applied to a cluster; instead, for every YAML document in
//! `istio/*.yaml`:
//!
//! 1. its `apiVersion` and `kind` must name a served version of a CustomResourceDefinition
//!    in the Istio CRD schemas at `../shared/schemas/` (beside the repository);
//! 2. `metadata.name` and `metadata.namespace` must be valid Kubernetes names;
//! 3. `spec` is validated against that version's `openAPIV3Schema.properties.spec` with a
//!    JSON-Schema validator. The OpenAPI/Kubernetes bits JSON Schema does not know are
//!    translated the way the API server applies them: `nullable` allows null,
//!    `format: int32/int64/uint32` become bounds, and an object with `properties` refuses
//!    unknown fields unless it has `x-kubernetes-preserve-unknown-fields` (kubectl's
//!    default strict field validation). Other `x-kubernetes-*` keys are dropped;
//! 4. the CEL rules (`x-kubernetes-validations`) on every schema node the manifest
//!    reaches are evaluated by hand-written equivalents in [`eval_cel`]; a rule this file
//!    does not know fails the test instead of being skipped;
//! 5. for a WasmPlugin, `spec.pluginConfig` is marshalled to JSON (what istiod hands the
//!    filter) and must be accepted by the filter's own parser,
//!    `meshlimit_core::config::parse`.
//!
//! The negative tests mutate the real manifests to show each check can fail.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

const COMPANION_CLUSTER: &str = "outbound|8080||meshlimit-service.meshlimit.svc.cluster.local";

// ---------------------------------------------------------------------------------------
// Loading.

/// `../shared/schemas` from the repository root, or `$ISTIO_SCHEMAS` (for a checkout
/// that does not sit beside `shared/`, such as a git worktree).
fn schemas_dir() -> PathBuf {
    std::env::var_os("ISTIO_SCHEMAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| meshlimit_e2e::repo_root().join("../shared/schemas"))
}

/// One CustomResourceDefinition from the schemas directory.
struct Crd {
    file: String,
    group: String,
    kind: String,
    /// `spec.versions[]` as they are.
    versions: Vec<Value>,
}

/// Every YAML document of a file, as JSON values (empty documents left out).
fn yaml_documents(text: &str, origin: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(de).map_err(|e| format!("{origin} document {i}: {e}"))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

fn load_crds(dir: &Path) -> Result<Vec<Crd>, String> {
    if !dir.is_dir() {
        return Err(format!(
            "no Istio CRD schemas at {}: the tests read them from shared/schemas/ beside \
             the repository (../shared/schemas from the repository root), see \
             shared/schemas/README.md; they are not copied into the project",
            dir.display()
        ));
    }
    let mut crds = Vec::new();
    for path in yaml_files(dir)? {
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for doc in yaml_documents(&text, &file)? {
            if doc["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let spec = &doc["spec"];
            crds.push(Crd {
                file: file.clone(),
                group: spec["group"].as_str().unwrap_or_default().to_string(),
                kind: spec["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                versions: spec["versions"].as_array().cloned().unwrap_or_default(),
            });
        }
    }
    if crds.is_empty() {
        return Err(format!(
            "{} holds no CustomResourceDefinition",
            dir.display()
        ));
    }
    Ok(crds)
}

fn crds() -> Vec<Crd> {
    load_crds(&schemas_dir()).unwrap_or_else(|e| panic!("{e}"))
}

/// A manifest document: where it came from and its content.
struct Doc {
    origin: String,
    value: Value,
}

fn manifests() -> Vec<Doc> {
    let dir = meshlimit_e2e::repo_root().join("istio");
    let mut docs = Vec::new();
    for path in yaml_files(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = format!("istio/{}", path.file_name().unwrap().to_string_lossy());
        let values = yaml_documents(&text, &name).unwrap_or_else(|e| panic!("{e}"));
        for (i, value) in values.into_iter().enumerate() {
            docs.push(Doc {
                origin: format!("{name} document {i}"),
                value,
            });
        }
    }
    docs
}

fn manifest_of_kind(kind: &str) -> Value {
    manifests()
        .into_iter()
        .find(|d| d.value["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in istio/*.yaml"))
        .value
}

// ---------------------------------------------------------------------------------------
// Schema lookup and translation.

/// `openAPIV3Schema.properties.spec` of the served CRD version named by `apiVersion`.
fn spec_schema<'a>(crds: &'a [Crd], api_version: &str, kind: &str) -> Result<&'a Value, String> {
    let (group, version) = api_version
        .split_once('/')
        .ok_or_else(|| format!("apiVersion {api_version:?} is not <group>/<version>"))?;
    let crd = crds
        .iter()
        .find(|c| c.group == group && c.kind == kind)
        .ok_or_else(|| {
            format!("no CRD for kind {kind:?} in group {group:?} in the schemas directory")
        })?;
    let v = crd
        .versions
        .iter()
        .find(|v| v["name"] == version)
        .ok_or_else(|| {
            let known: Vec<&str> = crd
                .versions
                .iter()
                .filter_map(|v| v["name"].as_str())
                .collect();
            format!(
                "{kind} has no version {version:?} in {} (known: {known:?})",
                crd.file
            )
        })?;
    if v["served"] != true {
        return Err(format!("{kind} {version} is not served"));
    }
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
    if !spec.is_object() {
        return Err(format!(
            "{}: {version} has no openAPIV3Schema.properties.spec",
            crd.file
        ));
    }
    Ok(spec)
}

/// Translates a Kubernetes structural (OpenAPI v3.0) schema into a JSON Schema (draft 4)
/// that checks what the API server checks, CEL rules aside (see [`cel_errors`]).
fn to_json_schema(s: &Value) -> Value {
    let Value::Object(m) = s else {
        return s.clone();
    };
    let preserve_unknown = m.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let mut out = Map::new();
    let mut bounds: Option<(Value, Value)> = None;
    for (k, v) in m {
        if k.starts_with("x-kubernetes-") || k == "nullable" || k == "description" {
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

// ---------------------------------------------------------------------------------------
// CEL rules (x-kubernetes-validations), evaluated by hand.

/// Walks the schema alongside the instance and evaluates every CEL rule on every node the
/// instance reaches. Errors are `path: message`.
fn cel_errors(schema: &Value, this: &Value, path: &str, out: &mut Vec<String>) {
    for v in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let rule = v["rule"].as_str().unwrap_or_default();
        let message = v["message"].as_str().unwrap_or("CEL rule failed");
        match eval_cel(rule, this) {
            Some(true) => {}
            Some(false) => out.push(format!("{path}: {message}")),
            None => out.push(format!(
                "{path}: CEL rule not evaluated by this test, teach eval_cel: {rule}"
            )),
        }
    }
    match this {
        Value::Object(m) => {
            for (k, v) in m {
                let at = format!("{path}.{k}");
                if let Some(s) = schema["properties"].get(k) {
                    cel_errors(s, v, &at, out);
                } else if schema["additionalProperties"].is_object() {
                    cel_errors(&schema["additionalProperties"], v, &at, out);
                }
            }
        }
        Value::Array(a) if schema["items"].is_object() => {
            for (i, v) in a.iter().enumerate() {
                cel_errors(&schema["items"], v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The CEL rules of the Istio CRDs this project uses, written in Rust. `None`: unknown rule.
fn eval_cel(rule: &str, this: &Value) -> Option<bool> {
    let rule = rule.split_whitespace().collect::<Vec<_>>().join(" ");
    let has = |k: &str| this.get(k).is_some();
    let count = |ks: &[&str]| ks.iter().filter(|k| has(k)).count();
    let s = this.as_str().unwrap_or_default();
    let str_field = |k: &str| this.get(k).and_then(Value::as_str).unwrap_or_default();
    let keys = || {
        this.as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.as_str())
    };
    Some(match rule.as_str() {
        // WasmPlugin
        "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            count(&["selector", "targetRef", "targetRefs"]) <= 1
        }
        r#"isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) && url("http://" + self).getScheme() in ["", "http", "https", "oci", "file"])"# => {
            match s.split_once("://") {
                Some((scheme, rest)) => {
                    ["http", "https", "oci", "file"].contains(&scheme) && !rest.is_empty()
                }
                None => !s.is_empty() && !s.contains(char::is_whitespace),
            }
        }
        r#"(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)"# => {
            str_field("valueFrom") != "HOST" || !has("value")
        }
        "self.size() == 0" => s.is_empty(),
        // Label selectors (all three kinds)
        r#"self.all(key, !key.contains("*"))"# => keys().all(|k| !k.contains('*')),
        "self.all(key, key.size() != 0)" => keys().all(|k| !k.is_empty()),
        r#"!self.contains("*")"# => !s.contains('*'),
        // ServiceEntry
        "(has(self.workloadSelector) ? 1 : 0) + (has(self.endpoints) ? 1 : 0) <= 1" => {
            count(&["workloadSelector", "endpoints"]) <= 1
        }
        r#"!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && !((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))"# => {
            let cidr = this["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a.as_str().unwrap_or_default().contains('/'));
            let res = this.get("resolution").and_then(Value::as_str).unwrap_or("NONE");
            !cidr || ["STATIC", "NONE"].contains(&res)
        }
        r#"((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true"# => {
            this.get("resolution").and_then(Value::as_str).unwrap_or("NONE") != "NONE"
                || !has("endpoints")
        }
        r#"((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? ((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true"# => {
            str_field("resolution") != "DNS_ROUND_ROBIN"
                || this["endpoints"].as_array().map_or(0, Vec::len) <= 1
        }
        "has(self.address) || has(self.network)" => has("address") || has("network"),
        r#"(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true"# => {
            !str_field("address").starts_with("unix://") || !has("ports")
        }
        r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"# => {
            !s.starts_with("unix://") || s[7..].starts_with('/') || s[7..].starts_with('@')
        }
        r#"self.startsWith("unix://") ? !self.endsWith("/") : true"# => {
            !s.starts_with("unix://") || !s.ends_with('/')
        }
        r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"# => {
            keys().all(|k| k.len() < 63 && is_dns_label_chars(k, true))
        }
        "0 < self && self <= 65535" => this.as_u64().is_some_and(|p| (1..=65535).contains(&p)),
        r#"self != "*""# => s != "*",
        "self.all(l1, self.exists_one(l2, l1.number == l2.number))" => {
            let numbers: Vec<&Value> = this
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| &p["number"])
                .collect();
            numbers
                .iter()
                .all(|n| numbers.iter().filter(|m| *m == n).count() == 1)
        }
        // EnvoyFilter
        "(has(self.workloadSelector) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            count(&["workloadSelector", "targetRefs"]) <= 1
        }
        r#"has(self.context) ? ((self.context == "WAYPOINT") ? has(self.waypoint) : !has(self.waypoint)) : !has(self.waypoint)"# => {
            (str_field("context") == "WAYPOINT") == has("waypoint")
        }
        // DestinationRule durations
        "duration(self) >= duration('1ms')" => go_duration_ns(s).is_some_and(|ns| ns >= 1e6),
        _ => return None,
    })
}

/// A Go `time.ParseDuration` string ("200ms", "1h30m", "1.5s") in nanoseconds.
fn go_duration_ns(s: &str) -> Option<f64> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some(0.0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * unit;
    }
    Some(if neg { -total } else { total })
}

fn is_dns_label_chars(s: &str, upper_ok: bool) -> bool {
    let ok = |b: u8| {
        b.is_ascii_digit() || b.is_ascii_lowercase() || (upper_ok && b.is_ascii_uppercase())
    };
    let b = s.as_bytes();
    !b.is_empty() && ok(b[0]) && ok(b[b.len() - 1]) && b.iter().all(|&c| ok(c) || c == b'-')
}

// ---------------------------------------------------------------------------------------
// The checks.

/// Every problem with one manifest document, as `path: message` lines; empty when valid.
fn check_document(crds: &[Crd], doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();

    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    if name.len() > 253
        || !name
            .split('.')
            .all(|l| l.len() <= 63 && is_dns_label_chars(l, false))
    {
        errors.push(format!(
            "metadata.name: {name:?} is not a DNS-1123 subdomain"
        ));
    }
    let namespace = doc["metadata"]["namespace"].as_str().unwrap_or_default();
    if namespace.len() > 63 || !is_dns_label_chars(namespace, false) {
        errors.push(format!(
            "metadata.namespace: {namespace:?} is not a DNS-1123 label (set it explicitly)"
        ));
    }

    let schema = match spec_schema(crds, api_version, kind) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e);
            return errors;
        }
    };
    let spec = &doc["spec"];
    let validator = jsonschema::draft4::new(&to_json_schema(schema))
        .unwrap_or_else(|e| panic!("{kind} {api_version}: translated schema refused: {e}"));
    for e in validator.iter_errors(spec) {
        errors.push(format!(
            "{}: {e}",
            dotted("spec", &e.instance_path().to_string())
        ));
    }
    cel_errors(schema, spec, "spec", &mut errors);

    if kind == "WasmPlugin" {
        if let Err(e) = parse_plugin_config(spec) {
            errors.push(format!("spec.pluginConfig: the filter refuses it: {e}"));
        }
    }
    errors
}

/// `spec` + JSON pointer `/ports/0/name` -> `spec.ports[0].name`, as in the CEL errors.
fn dotted(root: &str, pointer: &str) -> String {
    let mut out = root.to_string();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

/// What istiod hands the filter: `spec.pluginConfig` marshalled to JSON.
fn parse_plugin_config(
    spec: &Value,
) -> Result<meshlimit_core::config::Config, meshlimit_core::config::ConfigError> {
    let json = serde_json::to_vec(&spec["pluginConfig"]).unwrap();
    meshlimit_core::config::parse(&json)
}

fn assert_valid(doc: &Value) {
    let errors = check_document(&crds(), doc);
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

/// Asserts `doc` is refused with a message holding every string of `expect`.
fn assert_refused(doc: &Value, expect: &[&str]) {
    let errors = check_document(&crds(), doc);
    assert!(
        errors.iter().any(|e| expect.iter().all(|x| e.contains(x))),
        "expected an error containing {expect:?}, got {errors:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// Tests: the manifests as they are.

#[test]
fn every_manifest_document_is_valid() {
    let crds = crds();
    let docs = manifests();
    let mut report = Vec::new();
    for d in &docs {
        for e in check_document(&crds, &d.value) {
            report.push(format!("{}: {e}", d.origin));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
    let kinds: Vec<&str> = docs
        .iter()
        .filter_map(|d| d.value["kind"].as_str())
        .collect();
    for kind in [
        "WasmPlugin",
        "ServiceEntry",
        "DestinationRule",
        "EnvoyFilter",
    ] {
        assert!(kinds.contains(&kind), "no {kind} among {kinds:?}");
    }
}

#[test]
fn wasmplugin_is_the_deployment_described() {
    let wp = manifest_of_kind("WasmPlugin");
    assert_eq!(wp["apiVersion"], "extensions.istio.io/v1alpha1");
    assert_eq!(wp["metadata"]["name"], "meshlimit");
    let spec = &wp["spec"];
    assert_eq!(spec["pluginName"], "meshlimit");
    assert_eq!(spec["phase"], "AUTHZ");
    assert_eq!(spec["failStrategy"], "FAIL_OPEN");
    assert_eq!(spec["type"], "HTTP");
    assert!(spec.get("vmConfig").is_none());
    assert!(spec["url"].as_str().unwrap().starts_with("oci://"));

    let config = parse_plugin_config(spec).unwrap_or_else(|e| panic!("pluginConfig: {e}"));
    let ids: Vec<&str> = config.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["login", "search", "api-free", "api", "ceiling"]);
    assert!(spec["pluginConfig"].get("xff_hop").is_none());
    assert_eq!(config.headers, meshlimit_core::config::HeaderMode::Both);
    assert!(config.rules.iter().any(|r| r.shadow));
}

/// The HttpConnectionManager fields the gateway's EnvoyFilter merges in.
fn gateway_listener_patch() -> Value {
    let ef = manifest_of_kind("EnvoyFilter");
    let patches = ef["spec"]["configPatches"]
        .as_array()
        .expect("configPatches");
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert_eq!(p["applyTo"], "NETWORK_FILTER");
    assert_eq!(p["match"]["context"], "GATEWAY");
    assert_eq!(
        p["match"]["listener"]["filterChain"]["filter"]["name"],
        "envoy.filters.network.http_connection_manager"
    );
    assert_eq!(p["patch"]["operation"], "MERGE");
    let tc = p["patch"]["value"]["typed_config"].clone();
    assert_eq!(
        tc["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    tc
}

#[test]
fn the_gateway_listener_gets_the_shipped_path_and_address_settings() {
    let ef = manifest_of_kind("EnvoyFilter");
    let wp = manifest_of_kind("WasmPlugin");
    // The same gateways as the WasmPlugin.
    assert_eq!(
        ef["spec"]["workloadSelector"]["labels"],
        wp["spec"]["selector"]["matchLabels"]
    );
    let tc = gateway_listener_patch();
    // What the e2e tests run Envoy with (SHIPPED_PATH_OPTIONS) and envoy/envoy.yaml sets.
    for (field, value) in meshlimit_e2e::SHIPPED_PATH_OPTIONS {
        let want: Value = serde_json::from_str(value).unwrap();
        assert_eq!(tc[field], want, "{field}");
    }
    assert_eq!(tc["use_remote_address"], true);
    assert_eq!(
        tc["xff_num_trusted_hops"], 1,
        "one cloud load balancer in front"
    );
    // Negative: the schema catches a misspelt context, the CEL rule a stray waypoint.
    let mut bad = ef.clone();
    bad["spec"]["configPatches"][0]["match"]["context"] = json!("GATEWAYS");
    assert_refused(&bad, &["context", "GATEWAYS"]);
    let mut bad = ef.clone();
    bad["spec"]["configPatches"][0]["match"]["waypoint"] = json!({"portNumber": 80});
    assert_refused(&bad, &["configPatches[0].match"]);
}

#[test]
fn envoy_yaml_sets_what_the_filter_relies_on() {
    let path = meshlimit_e2e::repo_root().join("envoy/envoy.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let docs = yaml_documents(&text, "envoy/envoy.yaml").unwrap();
    let hcm = &docs[0]["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"];
    for (field, value) in meshlimit_e2e::SHIPPED_PATH_OPTIONS {
        let want: Value = serde_json::from_str(value).unwrap();
        assert_eq!(hcm[field], want, "envoy.yaml {field}");
    }
    assert_eq!(hcm["use_remote_address"], true);
    assert_eq!(hcm["xff_num_trusted_hops"], 0, "the demo Envoy is the edge");
    // Its plugin configuration is accepted, and the login rule counts per IP.
    let wasm = hcm["http_filters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "envoy.filters.http.wasm")
        .expect("the wasm filter");
    let json = wasm["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let config = meshlimit_core::config::parse(json.as_bytes())
        .unwrap_or_else(|e| panic!("envoy.yaml plugin configuration: {e}"));
    let auth = config.rules.iter().find(|r| r.id == "auth").unwrap();
    assert_eq!(auth.key, [meshlimit_core::config::KeySource::Ip]);
}

#[test]
fn companion_cluster_name_matches_the_manifests_and_their_comment() {
    let se = manifest_of_kind("ServiceEntry");
    let dr = manifest_of_kind("DestinationRule");
    let host = se["spec"]["hosts"][0].as_str().unwrap();
    let http = se["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "HTTP")
        .expect("an HTTP port");
    assert_eq!(
        format!("outbound|{}||{host}", http["number"]),
        COMPANION_CLUSTER
    );
    assert_eq!(dr["spec"]["host"], host);
    let text = std::fs::read_to_string(
        meshlimit_e2e::repo_root().join("istio/serviceentry-companion.yaml"),
    )
    .unwrap();
    assert!(text.contains(COMPANION_CLUSTER));
}

#[test]
fn the_schemas_directory_is_required_with_a_clear_message() {
    let e = load_crds(Path::new("/nonexistent/shared/schemas"))
        .err()
        .expect("a missing directory is an error");
    assert!(
        e.contains("no Istio CRD schemas at /nonexistent/shared/schemas"),
        "{e}"
    );
    assert!(e.contains("shared/schemas/README.md"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Negative tests: each check can fail.

fn wasmplugin_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut wp = manifest_of_kind("WasmPlugin");
    edit(&mut wp);
    wp
}

#[test]
fn schema_refuses_an_unknown_fail_strategy() {
    let wp = wasmplugin_with(|w| w["spec"]["failStrategy"] = json!("SOMETIMES"));
    assert_refused(&wp, &["spec.failStrategy:", "SOMETIMES"]);
}

#[test]
fn schema_refuses_a_string_priority() {
    let wp = wasmplugin_with(|w| w["spec"]["priority"] = json!("high"));
    assert_refused(&wp, &["spec.priority:", "\"high\""]);
    // Still an int32, and nullable.
    let wp = wasmplugin_with(|w| w["spec"]["priority"] = json!(1u64 << 31));
    assert_refused(&wp, &["spec.priority:"]);
    assert_valid(&wasmplugin_with(|w| w["spec"]["priority"] = Value::Null));
}

#[test]
fn schema_refuses_unknown_fields() {
    let wp = wasmplugin_with(|w| w["spec"]["pluginconfig"] = json!({"rules": []}));
    assert_refused(&wp, &["spec:", "pluginconfig"]);
    let wp = wasmplugin_with(|w| w["spec"]["selector"]["matchLabel"] = json!({"a": "b"}));
    assert_refused(&wp, &["spec.selector:", "matchLabel"]);
}

#[test]
fn schema_refuses_a_prefixed_sha256() {
    let digest = "ab".repeat(32);
    assert_valid(&wasmplugin_with(|w| w["spec"]["sha256"] = json!(digest)));
    let wp = wasmplugin_with(|w| w["spec"]["sha256"] = json!(format!("sha256:{digest}")));
    assert_refused(&wp, &["spec.sha256:"]);
}

#[test]
fn cel_rules_are_evaluated() {
    let wp = wasmplugin_with(|w| {
        w["spec"]["targetRefs"] =
            json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "public"}])
    });
    assert_refused(&wp, &["spec:", "only one of targetRefs or selector"]);
    let wp = wasmplugin_with(|w| w["spec"]["url"] = json!("ftp://example.com/m.wasm"));
    assert_refused(&wp, &["spec.url", "url must have schema"]);
    let wp = wasmplugin_with(|w| w["spec"]["selector"]["matchLabels"]["app"] = json!("web-*"));
    assert_refused(&wp, &["matchLabels.app", "wildcard"]);

    let mut dr = manifest_of_kind("DestinationRule");
    dr["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"] = json!("fast");
    assert_refused(&dr, &["connectTimeout", "valid duration"]);
    dr["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"] = json!("500us");
    assert_refused(&dr, &["connectTimeout", "greater than 1ms"]);

    let mut se = manifest_of_kind("ServiceEntry");
    se["spec"]["endpoints"] = json!([{"address": "10.0.0.1"}]);
    assert_refused(&se, &["only one of WorkloadSelector or Endpoints"]);
}

#[test]
fn unknown_kind_or_version_is_refused() {
    let wp = wasmplugin_with(|w| w["apiVersion"] = json!("extensions.istio.io/v1beta9"));
    assert_refused(&wp, &["no version \"v1beta9\""]);
    let wp = wasmplugin_with(|w| w["kind"] = json!("WasmPlugins"));
    assert_refused(&wp, &["no CRD for kind \"WasmPlugins\""]);
}

#[test]
fn filter_parser_refuses_a_bad_window_with_its_field_path() {
    let wp = wasmplugin_with(|w| {
        w["spec"]["pluginConfig"]["rules"][1]["limits"][0]["window"] = json!("5 minutes")
    });
    // The schema cannot see it (pluginConfig is free-form)...
    let crds = crds();
    let errors = check_document(&crds, &wp);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // ...the filter's parser does, and names the field.
    let e = parse_plugin_config(&wp["spec"]).unwrap_err();
    assert_eq!(e.path, "rules[1].limits[0].window");
    assert!(
        errors[0].contains("spec.pluginConfig: the filter refuses it: rules[1].limits[0].window:"),
        "{errors:#?}"
    );
}

#[test]
fn filter_parser_refuses_unknown_or_reserved_plugin_config() {
    // pluginConfig is free-form to the schema (x-kubernetes-preserve-unknown-fields):
    // only the filter's parser sees a misspelt field there.
    let wp = wasmplugin_with(|w| w["spec"]["pluginConfig"]["xff_hops"] = json!(2));
    let errors = check_document(&crds(), &wp);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("spec.pluginConfig: the filter refuses it: xff_hops: unknown field"),
        "{errors:#?}"
    );
    let wp = wasmplugin_with(|w| w["spec"]["pluginConfig"]["rules"][3]["scope"] = json!("global"));
    let e = parse_plugin_config(&wp["spec"]).unwrap_err();
    assert_eq!(e.path, "rules[3].scope");
    assert_refused(&wp, &["rules[3].scope"]);
}

#[test]
fn go_durations() {
    assert_eq!(go_duration_ns("200ms"), Some(200e6));
    assert_eq!(go_duration_ns("1h30m"), Some(5400e9));
    assert_eq!(go_duration_ns("1.5s"), Some(1.5e9));
    assert_eq!(go_duration_ns("0"), Some(0.0));
    assert_eq!(go_duration_ns("5"), None);
    assert_eq!(go_duration_ns("5 s"), None);
    assert_eq!(dotted("spec", "/ports/0/name"), "spec.ports[0].name");
    assert_eq!(dotted("spec", ""), "spec");
    assert_eq!(go_duration_ns(""), None);
}
