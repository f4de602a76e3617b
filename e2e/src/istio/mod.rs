//! Static checks of the Istio manifests in `istio/` (the test is
//! `e2e/tests/istio_manifests.rs`). No Kubernetes runs where the tests run, so nothing is
//! applied to a cluster; instead every YAML document in `istio/*.yaml` is checked the way
//! the API server would check it on `kubectl apply`:
//!
//! 1. its `apiVersion` and `kind` name a served version of a CustomResourceDefinition in
//!    the Istio CRD schemas at `../shared/schemas/` (beside the repository);
//! 2. `metadata.name` is a DNS-1123 subdomain and `metadata.namespace` a DNS-1123 label
//!    (set explicitly);
//! 3. `spec` passes that version's `openAPIV3Schema.properties.spec`, validated by the
//!    `jsonschema` crate once [`schema::to_json_schema`] has turned the few OpenAPI and
//!    Kubernetes keywords JSON Schema does not know into ones it does;
//! 4. the CEL rules (`x-kubernetes-validations`) on every schema node the manifest
//!    reaches hold, evaluated by the `cel` crate ([`cel`] adds the Kubernetes library
//!    functions the Istio rules call); a rule that does not compile fails the check;
//! 5. for a WasmPlugin, `spec.pluginConfig` marshalled to JSON (what istiod hands the
//!    filter) is accepted by the filter's own parser, `meshlimit_core::config::parse`.

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::{json, Value};

pub mod cel;
pub mod schema;

/// `$ISTIO_SCHEMAS`, else `../shared/schemas` from the repository root (for a checkout
/// that does not sit beside `shared/`, such as a git worktree, set the variable).
pub fn schemas_dir() -> PathBuf {
    std::env::var_os("ISTIO_SCHEMAS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("../shared/schemas"))
}

/// One CustomResourceDefinition from the schemas directory.
pub struct Crd {
    /// The file it came from, for messages.
    pub file: String,
    pub group: String,
    pub kind: String,
    /// `spec.versions[]` as they are.
    pub versions: Vec<Value>,
}

/// A manifest document: where it came from (`istio/x.yaml document 0`) and its content.
pub struct Doc {
    pub origin: String,
    pub value: Value,
}

/// Every YAML document of a file, as JSON values (empty documents left out).
pub fn yaml_documents(text: &str, origin: &str) -> Result<Vec<Value>, String> {
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

/// Every CustomResourceDefinition in `dir`; an error naming the directory and where the
/// schemas come from when it is missing or holds none.
pub fn load_crds(dir: &Path) -> Result<Vec<Crd>, String> {
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
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for doc in yaml_documents(&text, &file)? {
            if doc["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let spec = &doc["spec"];
            crds.push(Crd {
                file: file.clone(),
                group: spec["group"].as_str().unwrap_or_default().to_owned(),
                kind: spec["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
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

/// The CRDs from [`schemas_dir`]; panics with [`load_crds`]'s message.
pub fn crds() -> Vec<Crd> {
    load_crds(&schemas_dir()).unwrap_or_else(|e| panic!("{e}"))
}

/// Every document of `istio/*.yaml`, in file order.
pub fn manifests() -> Vec<Doc> {
    let dir = crate::repo_root().join("istio");
    let mut docs = Vec::new();
    for path in yaml_files(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = format!(
            "istio/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
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

/// The first document of `kind` in `istio/*.yaml`.
pub fn manifest_of_kind(kind: &str) -> Value {
    manifests()
        .into_iter()
        .find(|d| d.value["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in istio/*.yaml"))
        .value
}

/// `openAPIV3Schema.properties.spec` of the served CRD version named by `apiVersion`.
pub fn spec_schema<'a>(
    crds: &'a [Crd],
    api_version: &str,
    kind: &str,
) -> Result<&'a Value, String> {
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

/// What the API server requires of `metadata` (apimachinery's `IsDNS1123Subdomain` for
/// names, `IsDNS1123Label` for namespaces, each label at most 63 characters); the
/// namespace is required so that no manifest lands wherever `kubectl` happens to point.
fn metadata_schema() -> Value {
    const LABEL: &str = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?";
    json!({
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {
                "type": "string",
                "maxLength": 253,
                "pattern": format!("^{LABEL}(\\.{LABEL})*$"),
            },
            "namespace": {"type": "string", "pattern": format!("^{LABEL}$")},
        },
    })
}

/// Every problem with one manifest document, as `path: message` lines; empty when valid.
pub fn check_document(crds: &[Crd], doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();

    let metadata = jsonschema::draft4::new(&metadata_schema())
        .unwrap_or_else(|e| panic!("the metadata schema: {e}"));
    for e in metadata.iter_errors(&doc["metadata"]) {
        let at = dotted("metadata", e.instance_path().as_str());
        errors.push(format!("{at}: {e}"));
    }

    let schema = match spec_schema(crds, api_version, kind) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e);
            return errors;
        }
    };
    let validator = schema::validator(schema)
        .unwrap_or_else(|e| panic!("{kind} {api_version}: the CRD schema is refused: {e}"));
    for e in validator.iter_errors(&doc["spec"]) {
        let at = dotted("spec", e.instance_path().as_str());
        errors.push(format!("{at}: {e}"));
    }

    if kind == "WasmPlugin" {
        if let Err(e) = parse_plugin_config(&doc["spec"]) {
            errors.push(format!("spec.pluginConfig: the filter refuses it: {e}"));
        }
    }
    errors
}

/// `spec` + JSON pointer `/ports/0/name` -> `spec.ports[0].name`, the way `kubectl`
/// names fields in its errors.
pub fn dotted(root: &str, pointer: &str) -> String {
    let mut out = root.to_owned();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            out.push('.');
            out.push_str(&seg);
        }
    }
    out
}

/// What istiod hands the filter: `spec.pluginConfig` marshalled to JSON, parsed by the
/// filter's own parser.
pub fn parse_plugin_config(
    spec: &Value,
) -> Result<meshlimit_core::config::Config, meshlimit_core::config::ConfigError> {
    let json = serde_json::to_vec(&spec["pluginConfig"]).unwrap_or_default();
    meshlimit_core::config::parse(&json)
}
