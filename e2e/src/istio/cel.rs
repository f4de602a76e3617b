//! The CEL rules of a CRD schema (`x-kubernetes-validations`), as a custom keyword of the
//! `jsonschema` validator: the validator walks schema and instance together, and on every
//! node that carries rules this keyword evaluates each rule with the `cel` crate, `self`
//! bound to the node, and fails with the rule's `message` when it does not hold. A rule
//! that does not compile fails the schema's compilation: nothing is skipped.
//!
//! What no crate provides is the part of Kubernetes' CEL environment the Istio rules use
//! beyond CEL's standard library and its `strings` extension (`substring`): the URL
//! functions `isURL`, `url` and `getScheme` (apimachinery's `library.URLs`), defined here.

use std::collections::HashMap;
use std::sync::Arc;

use cel::extractors::This;
use cel::{Context, Env, ExecutionError, Program};
use jsonschema::paths::Location;
use jsonschema::{Keyword, ValidationError};
use serde_json::{Map, Value};

/// The schema key holding the rules.
pub const VALIDATIONS: &str = "x-kubernetes-validations";

/// The rules of one schema node, compiled.
pub struct CelRules {
    env: Arc<Env>,
    rules: Vec<Rule>,
}

struct Rule {
    /// What the API server answers when the rule does not hold: the rule's `message`,
    /// else `failed rule: <rule>`.
    message: String,
    /// What it names when the rule cannot be evaluated: the `message`, else the rule.
    name: String,
    program: Program,
}

impl CelRules {
    /// The keyword factory for [`jsonschema::ValidationOptions::with_keyword`].
    pub fn factory<'a>(
        _parent: &'a Map<String, Value>,
        rules: &'a Value,
        _at: Location,
    ) -> Result<Box<dyn for<'i> Keyword<'i>>, ValidationError<'a>> {
        Self::compile(rules)
            .map(|r| Box::new(r) as Box<dyn for<'i> Keyword<'i>>)
            .map_err(ValidationError::custom)
    }

    /// Compiles `[{rule, message?}, ...]`.
    pub fn compile(rules: &Value) -> Result<Self, String> {
        let mut env = Env::stdlib();
        cel::extensions::strings(&mut env).map_err(|e| format!("the strings extension: {e:?}"))?;
        let mut compiled = Vec::new();
        for r in rules.as_array().into_iter().flatten() {
            let source = r["rule"]
                .as_str()
                .ok_or_else(|| format!("{VALIDATIONS} entry without a rule: {r}"))?;
            let program = env
                .compile(source)
                .map_err(|e| format!("CEL rule {source:?} does not compile: {e}"))?;
            // The API server's wording (apiextensions-apiserver, CEL validation).
            let (message, name) = match r["message"].as_str().map(str::trim) {
                Some(m) => (m.to_owned(), m.to_owned()),
                None => (format!("failed rule: {source}"), source.trim().to_owned()),
            };
            compiled.push(Rule {
                message,
                name,
                program,
            });
        }
        Ok(Self {
            env: Arc::new(env),
            rules: compiled,
        })
    }

    /// The messages of the rules `this` breaks, and of those that cannot be evaluated on
    /// it (`<error> evaluating rule: <message>`, as the API server words it: a
    /// `duration()` of something that is no duration is such an error).
    pub fn failures(&self, this: &Value) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            match self.holds(rule, this) {
                Ok(true) => {}
                Ok(false) => out.push(rule.message.clone()),
                Err(e) => out.push(format!("{e} evaluating rule: {}", rule.name)),
            }
        }
        out
    }

    fn holds(&self, rule: &Rule, this: &Value) -> Result<bool, String> {
        let mut context = Context::with_env(Arc::clone(&self.env));
        kubernetes_library(&mut context)?;
        context.add_variable_from_value("self", to_cel(this));
        match rule.program.execute(&context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("the rule gave {other:?}, not a bool")),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl<'i> Keyword<'i> for CelRules {
    fn validate(&self, instance: &'i Value) -> Result<(), ValidationError<'i>> {
        match self.failures(instance).into_iter().next() {
            Some(message) => Err(ValidationError::custom(message)),
            None => Ok(()),
        }
    }

    fn is_valid(&self, instance: &'i Value) -> bool {
        self.failures(instance).is_empty()
    }

    fn iter_errors(
        &self,
        instance: &'i Value,
    ) -> Box<dyn Iterator<Item = ValidationError<'i>> + 'i> {
        let errors: Vec<ValidationError<'i>> = self
            .failures(instance)
            .into_iter()
            .map(ValidationError::custom)
            .collect();
        Box::new(errors.into_iter())
    }
}

/// A JSON value as the API server hands it to CEL: integers are `int` (the schemas'
/// `type: integer`), other numbers `double`.
pub fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => a.iter().map(to_cel).collect::<Vec<_>>().into(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), to_cel(v)))
            .collect::<HashMap<String, cel::Value>>()
            .into(),
    }
}

/// apimachinery's URL library, the part the Istio rules call: `isURL(string)`,
/// `url(string)` and `<url>.getScheme()`. A URL value is kept as its text (checked by
/// `url`), which is all `getScheme` needs.
fn kubernetes_library(context: &mut Context<'_, '_>) -> Result<(), String> {
    let declare = |e: cel::DeclarationError| format!("the Kubernetes URL library: {e:?}");
    context
        .add_function("isURL", |s: Arc<String>| request_uri_scheme(&s).is_some())
        .map_err(declare)?;
    context
        .add_function("url", |s: Arc<String>| match request_uri_scheme(&s) {
            Some(_) => Ok(cel::Value::String(s)),
            None => Err(ExecutionError::function_error(
                "url",
                format!("URL parse error during conversion from string: {s}"),
            )),
        })
        .map_err(declare)?;
    context
        .add_function("getScheme", |This(s): This<Arc<String>>| {
            request_uri_scheme(&s).unwrap_or_default()
        })
        .map_err(declare)?;
    Ok(())
}

/// The scheme of `s` when Go's `url.ParseRequestURI` (which Kubernetes' `isURL` and
/// `url` call) accepts it: an absolute URI whose scheme is followed by a hierarchical
/// part (`oci://host/x`, `file:///x`, not `host:5000/x`), or an absolute path (scheme
/// ""). Go lower-cases the scheme, and so does the `url` crate.
pub fn request_uri_scheme(s: &str) -> Option<String> {
    if s.starts_with('/') {
        return (!s.contains(|c: char| c.is_whitespace() || c.is_control())).then(String::new);
    }
    let u = url::Url::parse(s).ok()?;
    (!u.cannot_be_a_base()).then(|| u.scheme().to_owned())
}
