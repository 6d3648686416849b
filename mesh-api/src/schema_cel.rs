//! `x-kubernetes-validations` rules, evaluated as kube-apiserver evaluates them: `self` is the
//! field's value after pruning and defaulting, a rule that evaluates to `false` is an invalid
//! field with the rule's `message` (or `failed rule: <rule>`), at the rule's `fieldPath` below
//! the field when it names one.
//!
//! The `cel` crate brings CEL's standard library and macros (`has`, `all`, `exists`,
//! `exists_one`, `filter`, `map`, `size`, `matches`, `startsWith`, `contains`, `duration`, ...),
//! the strings extension Kubernetes also enables (`split`, `substring`, `lowerAscii`, ...), and
//! Kubernetes' `isIP` is added here. What cannot be evaluated is never guessed: a rule that
//! compares against the stored object (`oldSelf`, a transition rule, which the API server only
//! evaluates on updates), that does not compile, or that calls a function none of these define
//! is reported as skipped, with the reason.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

/// What one rule said about one value.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Holds,
    Fails,
    /// The evaluation failed (a key read without `has`): the API server refuses the write.
    Error(String),
    /// Not evaluated, and why.
    Skipped(String),
}

static ENV: LazyLock<Result<Arc<cel::Env>, String>> = LazyLock::new(|| {
    let mut env = cel::Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .map_err(|e| format!("the CEL strings extension: {e}"))?;
    Ok(Arc::new(env))
});

/// A rule compiled, or why it cannot be evaluated here.
type Compiled = Result<Arc<cel::Program>, String>;

/// Rules by source, compiled and checked once (the same few hundred rules are met on every
/// write).
static PROGRAMS: LazyLock<Mutex<HashMap<String, Compiled>>> = LazyLock::new(Default::default);

/// The environment and `rule` compiled, or why the rule cannot be evaluated here: a transition
/// rule, one that does not compile, one calling a function not [`DEFINED`].
fn evaluable(rule: &str) -> Result<(Arc<cel::Env>, Arc<cel::Program>), String> {
    let env = ENV.clone()?;
    let mut cache = PROGRAMS.lock().unwrap_or_else(|e| e.into_inner());
    let program = cache
        .entry(rule.to_owned())
        .or_insert_with(|| {
            if rule.contains("oldSelf") {
                return Err(
                    "a transition rule (oldSelf), evaluated by the API server on updates only"
                        .into(),
                );
            }
            let program = env
                .compile(rule)
                .map_err(|e| format!("does not compile here: {e}"))?;
            match undefined(&program) {
                Some(f) => Err(format!("calls {f}, which is not defined here")),
                None => Ok(Arc::new(program)),
            }
        })
        .clone()?;
    Ok((env, program))
}

/// The functions a rule may call here: CEL's standard library, the strings extension, and
/// Kubernetes' `isIP`. (Macros such as `has` and `all` are expanded when a rule compiles.)
const DEFINED: &[&str] = &[
    // The standard library.
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "duration",
    "timestamp",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "type",
    "dyn",
    "max",
    "min",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    // The strings extension.
    "charAt",
    "indexOf",
    "lastIndexOf",
    "join",
    "lowerAscii",
    "upperAscii",
    "trim",
    "replace",
    "split",
    "substring",
    "format",
    "reverse",
    "strings.quote",
    // Kubernetes' IP library, as far as the Gateway API uses it.
    "isIP",
];

/// The first function `program` calls that is not [`DEFINED`] here.
fn undefined(program: &cel::Program) -> Option<String> {
    program
        .references()
        .functions()
        .into_iter()
        .filter(|f| f.starts_with(|c: char| c.is_ascii_alphabetic()))
        .find(|f| !DEFINED.contains(f))
        .map(str::to_owned)
}

/// Why `rule` cannot be evaluated here, or `None` when it can (whatever the value).
pub fn unevaluable(rule: &str) -> Option<String> {
    evaluable(rule).err()
}

/// Kubernetes' `isIP(string)`: an IPv4 or IPv6 address, no zone.
fn is_ip(s: Arc<String>) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
}

/// A JSON value as CEL reads it: integers are `int` (signed, as the API server's CEL types them
/// from the schema), other numbers `double`.
fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => cel::Value::Map(cel::objects::Map {
            map: Arc::new(
                map.iter()
                    .map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v)))
                    .collect(),
            ),
        }),
    }
}

/// Evaluates `rule` with `self` bound to `value`.
pub fn check(rule: &str, value: &Value) -> Outcome {
    let (env, program) = match evaluable(rule) {
        Ok(compiled) => compiled,
        Err(why) => return Outcome::Skipped(why),
    };
    let mut context = cel::Context::with_env(env);
    context.add_variable_from_value("self", to_cel(value));
    if let Err(e) = context.add_function("isIP", is_ip) {
        return Outcome::Skipped(format!("declaring isIP: {e}"));
    }
    match program.execute(&context) {
        Ok(cel::Value::Bool(true)) => Outcome::Holds,
        Ok(cel::Value::Bool(false)) => Outcome::Fails,
        Ok(other) => Outcome::Error(format!("evaluates to {other:?}, not a bool")),
        // The functions are known to be defined (see `unevaluable`): a wrong type, a key read
        // without `has`, ... The API server refuses the write then too.
        Err(e) => Outcome::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rules_of_the_gateway_api_kinds_evaluate() {
        let filters = json!([{"type": "URLRewrite", "urlRewrite": {}}, {"type": "CORS"}]);
        for (rule, value, want) in [
            (
                "self.filter(f, f.type == 'URLRewrite').size() <= 1",
                filters.clone(),
                Outcome::Holds,
            ),
            (
                "self.all(f, has(f.urlRewrite) || f.type != 'URLRewrite')",
                filters.clone(),
                Outcome::Holds,
            ),
            (
                "self.exists_one(f, f.type == 'CORS') && size(self) == 3",
                filters,
                Outcome::Fails,
            ),
            (
                "self.all(key, key.split('/')[0].size() < 253)",
                json!({"a/b": "1", "c": "2"}),
                Outcome::Holds,
            ),
            (
                "self.all(h, !isIP(h))",
                json!(["a.example", "10.0.0.1"]),
                Outcome::Fails,
            ),
            (
                "self.all(h, h.contains('*') ? (h.startsWith('*.') && h.substring(2).matches('^[a-z.]+$')) : true)",
                json!(["*.example.com", "x.example"]),
                Outcome::Holds,
            ),
            (
                "!(has(self.request) && has(self.backendRequest) && duration(self.request) != duration('0s') && duration(self.backendRequest) > duration(self.request))",
                json!({"request": "1s", "backendRequest": "2s"}),
                Outcome::Fails,
            ),
            (
                "self.type in ['Exact', 'PathPrefix'] || self.type == 'RegularExpression'",
                json!({"type": "Exact"}),
                Outcome::Holds,
            ),
            // Integers are signed, as the API server types them.
            (
                "self.port + 1 == 9081 && self.weight < 0.5",
                json!({"port": 9080, "weight": 0.25}),
                Outcome::Holds,
            ),
        ] {
            assert_eq!(check(rule, &value), want, "{rule} on {value}");
        }
    }

    #[test]
    fn what_cannot_be_evaluated_is_skipped_with_the_reason() {
        for (rule, needle) in [
            ("self == oldSelf", "transition rule"),
            ("self.x ==", "does not compile"),
            ("url(self).getHost() == 'a'", "not defined here"),
        ] {
            match check(rule, &json!({"x": 1})) {
                Outcome::Skipped(why) => assert!(why.contains(needle), "{rule}: {why}"),
                o => panic!("{rule}: {o:?}"),
            }
        }
    }
}
