//! Static checks of the Istio manifests in `istio/` against the Istio CRD schemas (their
//! OpenAPI schema and CEL rules) and the filter's own parser: what is checked and how is
//! in [`meshlimit_e2e::istio`]. The negative tests mutate the real manifests to show that
//! each check can fail.

use std::path::Path;

use meshlimit_core::config::TokenSource;
use meshlimit_e2e::istio::cel::{request_uri_scheme, CelRules};
use meshlimit_e2e::istio::{
    check_document, crds, dotted, load_crds, manifest_of_kind, manifests, parse_plugin_config,
    schema, spec_schema, yaml_documents,
};
use serde_json::{json, Value};

const COMPANION_CLUSTER: &str = "outbound|8080||meshlimit-service.meshlimit.svc.cluster.local";

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
    assert!(spec["url"].as_str().unwrap().starts_with("oci://"));

    let config = parse_plugin_config(spec).unwrap_or_else(|e| panic!("pluginConfig: {e}"));
    let ids: Vec<&str> = config.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        ["login", "payouts", "search", "api-free", "api", "ceiling"]
    );
    // The companion: the cluster Istio builds for its Service, the token from the
    // proxy's environment (never inline in the manifest), passed to the VM.
    let service = config.service.as_ref().expect("a service block");
    assert_eq!(service.cluster, COMPANION_CLUSTER);
    let TokenSource::Env(var) = &service.token else {
        panic!("the token must come from the environment, not the manifest");
    };
    assert_eq!(
        spec["vmConfig"]["env"],
        json!([{"name": var, "valueFrom": "HOST"}]),
        "the token variable reaches the VM"
    );
    use meshlimit_core::config::Scope;
    let scopes: Vec<Scope> = config.rules.iter().map(|r| r.scope).collect();
    assert_eq!(
        scopes,
        [
            Scope::Global,
            Scope::Strict,
            Scope::Global,
            Scope::Global,
            Scope::Global,
            Scope::Local
        ]
    );
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
    // The companion is a cluster of this file, its token a variable of Envoy's own
    // environment handed to the VM, and the node has the id the filter defaults to.
    let service = config.service.as_ref().expect("a service block");
    let clusters = docs[0]["static_resources"]["clusters"].as_array().unwrap();
    assert!(clusters
        .iter()
        .any(|c| c["name"] == service.cluster.as_str()));
    let TokenSource::Env(var) = &service.token else {
        panic!("the token must come from the environment, not the file");
    };
    let env = &wasm["typed_config"]["config"]["vm_config"]["environment_variables"];
    assert_eq!(env["host_env_keys"], json!([var]));
    assert!(docs[0]["node"]["id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
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

/// One port for the companion: the binary's default `--listen`, the demo's companion,
/// the demo Envoy's `meshlimit_service` cluster, the three-AZ topology, and the Istio
/// ServiceEntry (its port and target port).
#[test]
fn the_companion_port_is_one_everywhere() {
    let out = std::process::Command::new(meshlimit_e2e::companion::companion_bin())
        .arg("--help")
        .output()
        .expect("run meshlimit-service --help");
    let help = String::from_utf8_lossy(&out.stdout);
    let listen = help
        .split("[default: ")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or_else(|| panic!("no default --listen in:\n{help}"));
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();

    let root = meshlimit_e2e::repo_root();
    let envoy = std::fs::read_to_string(root.join("envoy/envoy.yaml")).unwrap();
    let envoy = &yaml_documents(&envoy, "envoy/envoy.yaml").unwrap()[0];
    let cluster = envoy["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "meshlimit_service")
        .expect("the meshlimit_service cluster");
    let endpoint = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
    assert_eq!(endpoint["address"]["socket_address"]["port_value"], port);

    let demo = std::fs::read_to_string(root.join("scripts/demo.sh")).unwrap();
    assert!(
        demo.contains(&format!("\nSERVICE_PORT={port}\n")),
        "scripts/demo.sh"
    );
    assert_eq!(u64::from(meshlimit_e2e::topology::COMPANION_PORT), port);

    let se = manifest_of_kind("ServiceEntry");
    let http = se["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "HTTP")
        .expect("an HTTP port");
    assert_eq!(http["number"], port);
    assert_eq!(http["targetPort"], port);
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
    let wp = wasmplugin_with(|w| w["spec"]["pluginConfig"]["rules"][1]["continue"] = json!(true));
    let e = parse_plugin_config(&wp["spec"]).unwrap_err();
    assert_eq!(e.path, "rules[1].continue");
    assert_refused(&wp, &["rules[1].continue"]);
    let wp = wasmplugin_with(|w| {
        w["spec"]["pluginConfig"]["service"]
            .as_object_mut()
            .unwrap()
            .remove("token_env");
    });
    assert_refused(&wp, &["service: the companion needs its bearer token"]);
}

/// The CEL rules on the schema nodes the manifests reach, evaluated the way the API
/// server evaluates them: `Some(b)` holds or not, `None` cannot be evaluated (which the
/// API server also reports as a failed validation).
#[test]
fn cel_rules_evaluate_as_the_api_server_does() {
    const URL: &str = r#"isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) && url("http://" + self).getScheme() in ["", "http", "https", "oci", "file"])"#;
    const DURATION: &str = "duration(self) >= duration('1ms')";
    const PORT: &str = "0 < self && self <= 65535";
    const LABEL_KEYS: &str = r#"self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))"#;
    const UNIQUE_PORTS: &str = "self.all(l1, self.exists_one(l2, l1.number == l2.number))";
    const UNIX: &str = r#"self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true"#;
    const ONE_OF: &str = "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1";
    const VALUE_FROM: &str =
        r#"(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)"#;
    let cases: &[(&str, Value, Option<bool>)] = &[
        (
            URL,
            json!("oci://ghcr.io/owner/meshlimit:0.1.0"),
            Some(true),
        ),
        (URL, json!("https://example.com/meshlimit.wasm"), Some(true)),
        (
            URL,
            json!("file:///var/local/wasm/meshlimit.wasm"),
            Some(true),
        ),
        // No scheme: read as http:// + the text, as Istio documents.
        (URL, json!("ghcr.io/owner/meshlimit:0.1.0"), Some(true)),
        (URL, json!("ghcr.io:5000/owner/meshlimit"), Some(true)),
        (URL, json!("ftp://example.com/m.wasm"), Some(false)),
        (URL, json!("OCI://ghcr.io/x"), Some(true)),
        (DURATION, json!("10ms"), Some(true)),
        (DURATION, json!("1h30m"), Some(true)),
        (DURATION, json!("1.5s"), Some(true)),
        (DURATION, json!("500us"), Some(false)),
        (DURATION, json!("0"), Some(false)),
        (DURATION, json!("5"), None),
        (DURATION, json!("5 s"), None),
        (DURATION, json!("fast"), None),
        (PORT, json!(8080), Some(true)),
        (PORT, json!(65535), Some(true)),
        (PORT, json!(0), Some(false)),
        (PORT, json!(65536), Some(false)),
        (
            LABEL_KEYS,
            json!({"app": "x", "istio": "ingressgateway"}),
            Some(true),
        ),
        (LABEL_KEYS, json!({"-app": "x"}), Some(false)),
        (LABEL_KEYS, json!({"a".repeat(63): "x"}), Some(false)),
        (
            UNIQUE_PORTS,
            json!([{"number": 80}, {"number": 8080}]),
            Some(true),
        ),
        (
            UNIQUE_PORTS,
            json!([{"number": 80}, {"number": 80}]),
            Some(false),
        ),
        (UNIX, json!("unix:///var/run/s.sock"), Some(true)),
        (UNIX, json!("unix://@abstract"), Some(true)),
        (UNIX, json!("unix://relative.sock"), Some(false)),
        (UNIX, json!("10.0.0.1"), Some(true)),
        (ONE_OF, json!({"selector": {}}), Some(true)),
        (
            ONE_OF,
            json!({"selector": {}, "targetRefs": []}),
            Some(false),
        ),
        (
            VALUE_FROM,
            json!({"valueFrom": "HOST", "value": "x"}),
            Some(false),
        ),
        (
            VALUE_FROM,
            json!({"valueFrom": "INLINE", "value": "x"}),
            Some(true),
        ),
    ];
    for (rule, this, want) in cases {
        let rules = CelRules::compile(&json!([{"rule": rule, "message": "broken"}]))
            .unwrap_or_else(|e| panic!("{e}"));
        let failures = rules.failures(this);
        let got = match failures.as_slice() {
            [] => Some(true),
            [m] if m == "broken" => Some(false),
            [m] => {
                assert!(m.ends_with(" evaluating rule: broken"), "{m}");
                None
            }
            more => panic!("{more:?}"),
        };
        assert_eq!(got, *want, "{rule} on {this}: {failures:?}");
    }
}

#[test]
fn every_cel_rule_of_the_istio_crds_compiles() {
    let crds = crds();
    let mut rules = 0;
    for crd in &crds {
        for v in &crd.versions {
            let version = v["name"].as_str().unwrap_or_default();
            let api_version = format!("{}/{version}", crd.group);
            let Ok(spec) = spec_schema(&crds, &api_version, &crd.kind) else {
                continue;
            };
            rules += spec.to_string().matches("\"rule\"").count();
            schema::validator(spec).unwrap_or_else(|e| panic!("{} {api_version}: {e}", crd.kind));
        }
    }
    assert!(rules > 100, "{rules} rules: not the Istio CRDs?");
}

#[test]
fn a_cel_rule_that_does_not_compile_fails_the_check() {
    let e = CelRules::compile(&json!([{"rule": "self.size( == 0"}]))
        .err()
        .expect("a syntax error is refused");
    assert!(e.contains("does not compile"), "{e}");
    let Err(e) = schema::validator(&json!({
        "type": "object",
        "x-kubernetes-validations": [{"rule": "self.size( == 0"}],
    })) else {
        panic!("a schema with a rule that does not compile is accepted");
    };
    assert!(e.contains("does not compile"), "{e}");
    // A rule without a message fails with the API server's wording.
    let rules = CelRules::compile(&json!([{"rule": "self.size() == 0"}])).unwrap();
    assert_eq!(
        rules.failures(&json!("x")),
        ["failed rule: self.size() == 0"]
    );
}

#[test]
fn metadata_must_name_and_place_the_object() {
    let wp = wasmplugin_with(|w| w["metadata"]["name"] = json!("MeshLimit"));
    assert_refused(&wp, &["metadata.name:", "MeshLimit"]);
    let wp = wasmplugin_with(|w| w["metadata"]["name"] = json!(format!("{}.x", "a".repeat(64))));
    assert_refused(&wp, &["metadata.name:"]);
    let wp = wasmplugin_with(|w| w["metadata"]["name"] = json!(["a"; 128].join(".")));
    assert_refused(&wp, &["metadata.name:"]);
    assert_valid(&wasmplugin_with(|w| {
        w["metadata"]["name"] = json!(format!("{}.b-1", "a".repeat(63)));
    }));
    let wp = wasmplugin_with(|w| w["metadata"]["namespace"] = json!("istio.system"));
    assert_refused(&wp, &["metadata.namespace:", "istio.system"]);
    let wp = wasmplugin_with(|w| {
        w["metadata"].as_object_mut().unwrap().remove("namespace");
    });
    assert_refused(&wp, &["metadata:", "namespace"]);
}

#[test]
fn request_uris_and_dotted_paths() {
    assert_eq!(
        request_uri_scheme("oci://ghcr.io/x").as_deref(),
        Some("oci")
    );
    assert_eq!(request_uri_scheme("HTTPS://x/y").as_deref(), Some("https"));
    assert_eq!(request_uri_scheme("/var/x").as_deref(), Some(""));
    assert_eq!(request_uri_scheme("ghcr.io/x"), None);
    assert_eq!(request_uri_scheme("ghcr.io:5000/x"), None);
    assert_eq!(request_uri_scheme(""), None);
    assert_eq!(dotted("spec", "/ports/0/name"), "spec.ports[0].name");
    assert_eq!(dotted("spec", "/a~1b"), "spec.a/b");
    assert_eq!(dotted("spec", ""), "spec");
}

/// What the deployment ships is what the tests and benchmarks measured: the module
/// `scripts/build-filter.sh` trims (`target/meshlimit.wasm`), never cargo's untrimmed
/// output, wherever istio/ tells how to build, publish or point `url` at the module.
#[test]
fn the_deployment_ships_the_trimmed_module() {
    let dir = meshlimit_e2e::repo_root().join("istio");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut builds = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.display();
        for untrimmed in [
            "meshlimit_filter.wasm",
            "wasm32-wasip1/release",
            "wasm32-wasip1/wasm",
            "cargo build",
        ] {
            assert!(!text.contains(untrimmed), "{name} mentions {untrimmed:?}");
        }
        if text.contains("scripts/build-filter.sh") {
            assert!(text.contains("target/meshlimit.wasm"), "{name}");
            builds += 1;
        }
    }
    assert!(
        builds >= 2,
        "README.md and wasmplugin.yaml tell how to build the module"
    );
}
