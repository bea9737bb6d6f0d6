//! The one expression language: CEL, and structural interpolation of value trees.
//!
//! Guarantee: an expression is parsed only from playbook and rule sources, at load time. Values
//! that come from alerts, earlier steps or humans are data: they are placed into the value tree
//! (or, in a mixed string, concatenated as text) and never parsed as expressions or templates, so
//! `${{`, a quote or a newline inside an alert's title cannot change the shape of a request.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

/// A compiled CEL expression with its source.
#[derive(Clone)]
pub struct Expr {
    source: Arc<str>,
    program: Arc<cel::Program>,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl PartialEq for Expr {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expression `{expr}`: {message}")]
pub struct EvalError {
    pub expr: String,
    pub message: String,
}

/// The one CEL environment: the standard library plus the strings (`join`, `split`, `format`,
/// `lowerAscii`...) and lists (`distinct`, `flatten`, `slice`...) extensions.
fn env() -> Arc<cel::Env> {
    static ENV: std::sync::OnceLock<Arc<cel::Env>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        // Both extensions ship with cel and declare fixed names: they cannot clash.
        let _ = env.add_extension(cel::extensions::strings);
        let _ = env.add_extension(cel::extensions::lists);
        Arc::new(env)
    })
    .clone()
}

/// The longest expression accepted (bounds parse cost).
pub const MAX_EXPR_LEN: usize = 4096;

impl Expr {
    /// Parses `source`; the error names what CEL could not parse.
    pub fn parse(source: &str) -> Result<Expr, String> {
        let trimmed = source.trim();
        if trimmed.is_empty() {
            return Err("empty expression".into());
        }
        if trimmed.len() > MAX_EXPR_LEN {
            return Err(format!("expression longer than {MAX_EXPR_LEN} characters"));
        }
        // The CEL parser is not ours: keep a parser bug from taking the process down.
        let parsed = std::panic::catch_unwind(|| env().compile(trimmed));
        match parsed {
            Ok(Ok(program)) => Ok(Expr {
                source: trimmed.into(),
                program: Arc::new(program),
            }),
            Ok(Err(e)) => Err(format!(
                "cannot parse `{trimmed}`: {}",
                one_line(&e.to_string())
            )),
            Err(_) => Err(format!("cannot parse `{trimmed}`")),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The top-level variable names the expression reads (for validation).
    pub fn variables(&self) -> Vec<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// The variables an expression reads from its scope: [`Expr::variables`] less CEL's type
    /// names (`string`, `map`, ...) and the variables macros bind (`x` in `list.map(x, ...)`).
    pub fn free_variables(&self) -> Vec<String> {
        const TYPES: &[&str] = &[
            "string",
            "map",
            "list",
            "int",
            "uint",
            "double",
            "bool",
            "bytes",
            "null_type",
            "type",
        ];
        let mut bound: Vec<String> = Vec::new();
        let src: &str = &self.source;
        for m in ["map", "filter", "exists", "all", "exists_one"] {
            let pat = format!(".{m}(");
            let mut rest = src;
            while let Some(i) = rest.find(&pat) {
                rest = &rest[i + pat.len()..];
                let var: String = rest
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !var.is_empty() && rest.trim_start()[var.len()..].trim_start().starts_with(',') {
                    bound.push(var);
                }
            }
        }
        self.variables()
            .into_iter()
            .filter(|v| !TYPES.contains(&v.as_str()) && !bound.contains(v))
            .collect()
    }

    /// The `VAR.FIELD == 'literal'` tests joined by `&&` at the top of the expression: when one of
    /// them is false, so is the whole expression (CEL's `&&` is false if either side is false, even
    /// when the other errs). Rule matching uses them as an index.
    pub fn required_equalities(&self, var: &str) -> Vec<(String, String)> {
        use cel::common::ast::{Expr as Ast, LiteralValue};
        fn walk(e: &cel::IdedExpr, var: &str, out: &mut Vec<(String, String)>) {
            let Ast::Call(call) = &e.expr else { return };
            match (call.func_name.as_str(), call.args.as_slice()) {
                ("_&&_", [a, b]) => {
                    walk(a, var, out);
                    walk(b, var, out);
                }
                ("_==_", [a, b]) => {
                    for (sel, lit) in [(a, b), (b, a)] {
                        if let (Ast::Select(s), Ast::Literal(LiteralValue::String(v))) =
                            (&sel.expr, &lit.expr)
                            && !s.test
                            && matches!(&s.operand.expr, Ast::Ident(name) if name == var)
                        {
                            out.push((s.field.clone(), v.inner().to_string()));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(self.program.expression(), var, &mut out);
        out
    }

    /// Evaluates against `scope` and converts the result to JSON.
    pub fn eval(&self, scope: &Scope) -> Result<Value, EvalError> {
        let err = |message: String| EvalError {
            expr: self.source.to_string(),
            message,
        };
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.program.execute(&scope.ctx)
        }))
        .map_err(|_| err("evaluation failed".into()))?
        .map_err(|e| err(one_line(&e.to_string())))?;
        out.json()
            .map_err(|e| err(format!("result is not JSON: {e}")))
    }

    /// Evaluates to a boolean; anything else is an error naming the type.
    pub fn eval_bool(&self, scope: &Scope) -> Result<bool, EvalError> {
        match self.eval(scope)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError {
                expr: self.source.to_string(),
                message: format!("expected a boolean, got {}", type_name(&other)),
            }),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// JSON type name, for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// The variables an expression can read.
pub struct Scope {
    ctx: cel::Context<'static, 'static>,
}

impl Default for Scope {
    fn default() -> Self {
        Scope::new()
    }
}

impl Scope {
    pub fn new() -> Scope {
        Scope {
            ctx: cel::Context::with_env(env()),
        }
    }

    /// Adds (or replaces) a variable holding a JSON value.
    pub fn set(&mut self, name: &str, value: &Value) -> &mut Self {
        // serde_json::Value always converts; a failure here would be a cel bug.
        if self.ctx.add_variable(name.to_string(), value).is_err() {
            self.ctx
                .add_variable_from_value(name.to_string(), cel::Value::Null);
        }
        self
    }
}

const OPEN: &str = "${{";
const CLOSE: &str = "}}";

/// How the text of an expression's result is encoded when it is spliced into a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// Plain text (JSON bodies, headers: the tree is serialized by the format's own serializer).
    Text,
    /// One URL path segment: everything but unreserved characters is percent-encoded, so a `/`,
    /// `?` or `..` from an alert cannot change which resource is addressed.
    PathSegment,
    /// XML character data or attribute value: `&`, `<`, `>`, `"` and `'` are escaped, so an
    /// alert's text cannot open or close an element.
    Xml,
}

/// A value tree with expressions in it, compiled once at load.
#[derive(Clone, Debug, PartialEq)]
pub enum Template {
    /// A value with no expression in it.
    Literal(Value),
    /// A string that is exactly `${{ expr }}`: takes the expression's value, of any type.
    Whole(Expr),
    /// A string mixing text and expressions: always a string.
    Mixed(Vec<Part>),
    List(Vec<Template>),
    Map(Vec<(String, Template)>),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    Expr(Expr),
}

/// A template error, with the path inside the value tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub path: String,
    pub message: String,
}

impl Template {
    /// Compiles a value tree; `path` names where it sits (for errors), e.g. `with`.
    pub fn compile(value: &Value, path: &str) -> Result<Template, Vec<TemplateError>> {
        let mut errors = Vec::new();
        let t = compile_at(value, path, &mut errors);
        if errors.is_empty() {
            Ok(t)
        } else {
            Err(errors)
        }
    }

    /// Every expression in the tree, for validation.
    pub fn exprs(&self) -> Vec<&Expr> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a Expr>) {
        match self {
            Template::Literal(_) => {}
            Template::Whole(e) => out.push(e),
            Template::Mixed(parts) => out.extend(parts.iter().filter_map(|p| match p {
                Part::Expr(e) => Some(e),
                Part::Text(_) => None,
            })),
            Template::List(items) => items.iter().for_each(|t| t.collect(out)),
            Template::Map(entries) => entries.iter().for_each(|(_, t)| t.collect(out)),
        }
    }

    pub fn is_literal(&self) -> bool {
        self.exprs().is_empty()
    }

    /// Renders the tree: each expression's result is placed as a value, never re-parsed.
    pub fn render(&self, scope: &Scope) -> Result<Value, EvalError> {
        self.render_with(scope, Encoding::Text)
    }

    /// Renders with `encoding` applied to expression results spliced into mixed strings.
    pub fn render_with(&self, scope: &Scope, encoding: Encoding) -> Result<Value, EvalError> {
        Ok(match self {
            Template::Literal(v) => v.clone(),
            Template::Whole(e) => {
                let v = e.eval(scope)?;
                match (encoding, v) {
                    (Encoding::Text, v) => v,
                    (_, v) => Value::String(encode(&text_of(&v), encoding)),
                }
            }
            Template::Mixed(parts) => {
                let mut s = String::new();
                for p in parts {
                    match p {
                        Part::Text(t) => s.push_str(t),
                        Part::Expr(e) => s.push_str(&encode(&text_of(&e.eval(scope)?), encoding)),
                    }
                }
                Value::String(s)
            }
            Template::List(items) => Value::Array(
                items
                    .iter()
                    .map(|t| t.render_with(scope, encoding))
                    .collect::<Result<_, _>>()?,
            ),
            Template::Map(entries) => {
                let mut m = serde_json::Map::new();
                for (k, t) in entries {
                    m.insert(k.clone(), t.render_with(scope, encoding)?);
                }
                Value::Object(m)
            }
        })
    }
}

/// The text of a value spliced into a string: strings as they are, null as nothing, others as JSON.
pub fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Escapes text for XML or HTML character data and attribute values: `&`, `<`, `>`, `"` and `'`
/// (as `&#39;`, which both read).
pub fn escape_markup(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn encode(s: &str, encoding: Encoding) -> String {
    match encoding {
        Encoding::Text => s.to_string(),
        Encoding::Xml => escape_markup(s),
        Encoding::PathSegment => {
            let mut out = String::with_capacity(s.len());
            for b in s.bytes() {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            // `.` and `..` alone are path navigation even when unencoded characters: encode them.
            if out == "." || out == ".." {
                out = out.replace('.', "%2E");
            }
            out
        }
    }
}

fn compile_at(value: &Value, path: &str, errors: &mut Vec<TemplateError>) -> Template {
    match value {
        Value::String(s) => match compile_string(s) {
            Ok(t) => t,
            Err(message) => {
                errors.push(TemplateError {
                    path: path.to_string(),
                    message,
                });
                Template::Literal(Value::Null)
            }
        },
        Value::Array(items) => Template::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| compile_at(v, &format!("{path}[{i}]"), errors))
                .collect(),
        ),
        Value::Object(map) => {
            let entries: Vec<(String, Template)> = map
                .iter()
                .map(|(k, v)| (k.clone(), compile_at(v, &format!("{path}.{k}"), errors)))
                .collect();
            if entries
                .iter()
                .all(|(_, t)| matches!(t, Template::Literal(_)))
            {
                Template::Literal(value.clone())
            } else {
                Template::Map(entries)
            }
        }
        other => Template::Literal(other.clone()),
    }
}

/// Splits a string into text and `${{ expr }}` parts. `$${{` is a literal `${{`.
fn compile_string(s: &str) -> Result<Template, String> {
    if !s.contains(OPEN) {
        return Ok(Template::Literal(Value::String(s.to_string())));
    }
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find(OPEN) {
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            text.push_str(&rest[..pos - 1]);
            text.push_str(OPEN);
            rest = &rest[pos + OPEN.len()..];
            continue;
        }
        text.push_str(&rest[..pos]);
        let after = &rest[pos + OPEN.len()..];
        let end = after
            .find(CLOSE)
            .ok_or_else(|| format!("`{OPEN}` without a closing `{CLOSE}`"))?;
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(Part::Expr(Expr::parse(&after[..end])?));
        rest = &after[end + CLOSE.len()..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    match parts.as_slice() {
        [Part::Expr(e)] => Ok(Template::Whole(e.clone())),
        [] => Ok(Template::Literal(Value::String(String::new()))),
        _ if parts.iter().all(|p| matches!(p, Part::Text(_))) => {
            Ok(Template::Literal(Value::String(
                parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => t.as_str(),
                        Part::Expr(_) => "",
                    })
                    .collect(),
            )))
        }
        _ => Ok(Template::Mixed(parts)),
    }
}

/// A duration written as `500ms`, `30s`, `5m`, `2h`, `1d` or a combination like `1h30m`.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    let bad = || format!("`{t}` is not a duration (use e.g. 500ms, 30s, 5m, 2h, 1d)");
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        let unit = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope(alert: Value) -> Scope {
        let mut s = Scope::new();
        s.set("alert", &alert);
        s
    }

    #[test]
    fn whole_expression_keeps_the_type_of_its_value() {
        let t = Template::compile(&json!({"ips": "${{ alert.entities.ips }}", "n": 3}), "with")
            .unwrap();
        let out = t
            .render(&scope(
                json!({"entities": {"ips": ["198.51.100.1", "203.0.113.9"]}}),
            ))
            .unwrap();
        assert_eq!(out, json!({"ips": ["198.51.100.1", "203.0.113.9"], "n": 3}));
    }

    #[test]
    fn alert_text_that_looks_like_a_template_or_json_comes_out_literally() {
        let evil = "x\", \"admin\": true, \"y\": \"${{ 1 + 1 }}\n";
        let t = Template::compile(
            &json!({"short_description": "Alert: ${{ alert.title }}", "title": "${{ alert.title }}"}),
            "with",
        )
        .unwrap();
        let out = t.render(&scope(json!({"title": evil}))).unwrap();
        assert_eq!(out["title"], json!(evil));
        assert_eq!(out["short_description"], json!(format!("Alert: {evil}")));
        assert_eq!(out.as_object().unwrap().len(), 2, "no key was injected");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        let t = Template::compile(&json!("/api/items/${{ alert.id }}"), "path").unwrap();
        let out = t
            .render_with(
                &scope(json!({"id": "../admin?x=1/#"})),
                Encoding::PathSegment,
            )
            .unwrap();
        assert_eq!(out, json!("/api/items/..%2Fadmin%3Fx%3D1%2F%23"));
        let t = Template::compile(&json!("/a/${{ alert.id }}"), "path").unwrap();
        let out = t
            .render_with(&scope(json!({"id": ".."})), Encoding::PathSegment)
            .unwrap();
        assert_eq!(out, json!("/a/%2E%2E"));
    }

    #[test]
    fn doubled_dollar_escapes_a_literal_opening() {
        let t = Template::compile(&json!("price $${{ not an expr }}"), "x").unwrap();
        assert_eq!(
            t.render(&Scope::new()).unwrap(),
            json!("price ${{ not an expr }}")
        );
    }

    #[test]
    fn bad_templates_name_their_path() {
        let err = Template::compile(&json!({"a": ["ok", "${{ 1 + }}"]}), "with").unwrap_err();
        assert_eq!(err[0].path, "with.a[1]");
        let err = Template::compile(&json!({"b": "${{ alert.title"}), "with").unwrap_err();
        assert!(err[0].message.contains("closing"), "{:?}", err);
    }

    #[test]
    fn missing_fields_are_errors_and_has_guards_them() {
        let s = scope(json!({"title": "t"}));
        assert!(Expr::parse("alert.nope == 1").unwrap().eval(&s).is_err());
        assert!(
            !Expr::parse("has(alert.nope) && alert.nope == 1")
                .unwrap()
                .eval_bool(&s)
                .unwrap()
        );
        let e = Expr::parse("alert.title")
            .unwrap()
            .eval_bool(&s)
            .unwrap_err();
        assert!(
            e.message.contains("expected a boolean, got a string"),
            "{e}"
        );
    }

    #[test]
    fn expressions_name_their_variables() {
        let e = Expr::parse("alert.severity in ['High'] && steps.ask.output.choice == 'block'")
            .unwrap();
        let mut v = e.variables();
        v.sort();
        assert_eq!(v, vec!["alert", "steps"]);
    }

    #[test]
    fn string_and_list_extensions_are_available() {
        let s = scope(json!({"ips": ["198.51.100.1", "203.0.113.9", "198.51.100.1"]}));
        let e = Expr::parse("alert.ips.distinct().join(', ')").unwrap();
        assert_eq!(e.eval(&s).unwrap(), json!("198.51.100.1, 203.0.113.9"));
    }

    #[test]
    fn top_level_equalities_are_found() {
        let e = Expr::parse("alert.source == 'guardduty' && ('High' == alert.severity && alert.title.contains('x')) || false").unwrap();
        assert!(
            e.required_equalities("alert").is_empty(),
            "an || at the top hides them"
        );
        let e = Expr::parse("alert.source == 'guardduty' && ('High' == alert.severity && alert.title.contains('x'))").unwrap();
        assert_eq!(
            e.required_equalities("alert"),
            vec![
                ("source".to_string(), "guardduty".to_string()),
                ("severity".to_string(), "High".to_string())
            ]
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(parse_duration_ms("1h30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration_ms("2d").unwrap(), 172_800_000);
        assert!(parse_duration_ms("10").is_err());
        assert!(parse_duration_ms("5 minutes").is_err());
        assert!(parse_duration_ms("99999999999999999999d").is_err());
    }
}
