//! Running a document: checking the parameter values of a send against the document, substituting
//! `{{ name }}` and rendering the runnable steps as one shell script.
//!
//! Several runnable steps run one after another, each in its own subshell (as SSM runs each step as
//! its own script: `exit` or `set -e` in one step ends that step only); the first step that exits
//! non-zero ends the script with its exit code, and the steps after it do not run. The script's
//! execution timeout is the sum of the steps' timeouts. Steps whose precondition names another
//! platform than Linux are left out (SSM reports them skipped, which counts as success).

use super::DocError;
use super::content::{Content, ParamDef, ParamType, Step};
use crate::errors::Code;
use fleetrun_proto::limits::{
    EXECUTION_TIMEOUT_DEFAULT, EXECUTION_TIMEOUT_MAX, SCRIPT_MAX, WORKING_DIR_MAX,
};
use serde_json::Value;
use std::collections::BTreeMap;

/// What a node runs: the input of [`crate::run::send`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// Script lines.
    pub commands: Vec<String>,
    /// Working directory ("" for the agent's default).
    pub working_dir: String,
    /// Seconds.
    pub execution_timeout: u64,
    /// Names of the steps that run.
    pub steps: Vec<String>,
}

/// A default, as the list of strings a send would give.
pub(super) fn default_values(def: &ParamDef, d: &Value) -> Result<Vec<String>, String> {
    let wrong = || format!("the default is not a {}.", def.ty.as_str());
    Ok(match (def.ty, d) {
        (ParamType::String, Value::String(s)) => vec![s.clone()],
        (ParamType::StringList, Value::String(s)) => vec![s.clone()],
        (ParamType::StringList, Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(wrong))
            .collect::<Result<_, _>>()?,
        (ParamType::Boolean, Value::Bool(b)) => vec![b.to_string()],
        (ParamType::Boolean, Value::String(s)) if is_bool(s) => vec![s.to_ascii_lowercase()],
        (ParamType::Integer, Value::Number(n)) if n.is_i64() => vec![n.to_string()],
        (ParamType::Integer, Value::String(s)) if s.parse::<i64>().is_ok() => vec![s.clone()],
        (ParamType::StringMap, Value::Object(_)) => vec![d.to_string()],
        (ParamType::MapList, Value::Array(a)) if a.iter().all(Value::is_object) => {
            a.iter().map(Value::to_string).collect()
        }
        _ => return Err(wrong()),
    })
}

fn is_bool(s: &str) -> bool {
    s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false")
}

/// Checks values of a parameter against its declaration; the error says what is wrong.
pub(super) fn check_values(def: &ParamDef, values: &[String]) -> Result<(), String> {
    let ty = def.ty;
    if !ty.is_list() && values.len() != 1 {
        return Err(format!("it takes one {} value.", ty.as_str()));
    }
    let n = values.len() as u64;
    if let Some(min) = def.min_items
        && n < min
    {
        return Err(format!("it needs at least {min} value(s)."));
    }
    if let Some(max) = def.max_items
        && n > max
    {
        return Err(format!("it takes at most {max} value(s)."));
    }
    for v in values {
        match ty {
            ParamType::Boolean if !is_bool(v) => {
                return Err(format!("{v:?} is not true or false."));
            }
            ParamType::Integer if v.trim().parse::<i64>().is_err() => {
                return Err(format!("{v:?} is not an integer."));
            }
            ParamType::StringMap | ParamType::MapList
                if !serde_json::from_str::<Value>(v).is_ok_and(|j| j.is_object()) =>
            {
                return Err(format!("{v:?} is not a JSON object."));
            }
            _ => {}
        }
        let chars = v.chars().count() as u64;
        if let Some(min) = def.min_chars
            && chars < min
        {
            return Err(format!("{v:?} is shorter than {min} characters."));
        }
        if let Some(max) = def.max_chars
            && chars > max
        {
            return Err(format!("a value is longer than {max} characters."));
        }
        if !def.allowed_values.is_empty() && !def.allowed_values.iter().any(|a| a == v) {
            return Err(format!(
                "{v:?} is not one of the allowed values {:?}.",
                def.allowed_values
            ));
        }
        if let Some((src, rx)) = &def.allowed_pattern
            && !rx.is_match(v)
        {
            return Err(format!("{v:?} does not match the allowed pattern {src}."));
        }
    }
    Ok(())
}

/// The values of every parameter of a send: given ones checked, defaults for the others.
pub fn resolve(
    document: &str,
    content: &Content,
    given: &BTreeMap<String, Vec<String>>,
) -> Result<BTreeMap<String, Vec<String>>, DocError> {
    let bad = |m: String| DocError::new(Code::InvalidParameters, m);
    if let Some(k) = given
        .keys()
        .find(|k| !content.params.iter().any(|p| &p.name == *k))
    {
        return Err(bad(format!(
            "Parameter \"{k}\" is not defined in document {document}."
        )));
    }
    let mut out = BTreeMap::new();
    for def in &content.params {
        let values = match given.get(&def.name) {
            Some(v) if !v.is_empty() || def.ty.is_list() => v.clone(),
            _ => match &def.default {
                Some(d) => default_values(def, d)
                    .map_err(|m| bad(format!("Parameter \"{}\": {m}", def.name)))?,
                None => {
                    return Err(bad(format!(
                        "Parameter \"{}\" is required by document {document}.",
                        def.name
                    )));
                }
            },
        };
        check_values(def, &values)
            .map_err(|m| bad(format!("Parameter \"{}\" is not valid: {m}", def.name)))?;
        let values = if def.ty == ParamType::Boolean {
            values.iter().map(|v| v.to_ascii_lowercase()).collect()
        } else {
            values
        };
        out.insert(def.name.clone(), values);
    }
    Ok(out)
}

/// Scans `s` for `{{ name }}` (spaces optional; name of letters, digits and _). Calls `hit` with the
/// byte range and the name of each reference.
fn scan(s: &str, mut hit: impl FnMut(std::ops::Range<usize>, &str)) {
    let b = s.as_bytes();
    let mut i = 0;
    while let Some(off) = s[i..].find("{{") {
        let start = i + off;
        let mut j = start + 2;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        let name_start = j;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
            j += 1;
        }
        let name_end = j;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        if name_end > name_start && s[j..].starts_with("}}") {
            hit(start..j + 2, &s[name_start..name_end]);
            i = j + 2;
        } else {
            i = start + 2;
        }
    }
}

/// Names referenced in `s`.
pub fn references(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    scan(s, |_, name| out.push(name.to_owned()));
    out
}

/// `s` with every reference replaced by its parameter's value (a list's values joined by `sep`).
pub fn substitute(s: &str, values: &BTreeMap<String, Vec<String>>, sep: &str) -> String {
    substitute_within(s, values, sep, usize::MAX).unwrap_or_default()
}

/// Length of `values` joined by `sep`.
fn joined_len(values: &[String], sep: &str) -> usize {
    values.iter().map(String::len).sum::<usize>() + sep.len() * values.len().saturating_sub(1)
}

/// [`substitute`], or `None` when the result would be longer than `max` bytes: the length is
/// computed first, so a short text referring many times to a long value is never built.
fn substitute_within(
    s: &str,
    values: &BTreeMap<String, Vec<String>>,
    sep: &str,
    max: usize,
) -> Option<String> {
    let mut len = s.len();
    scan(s, |range, name| {
        if let Some(v) = values.get(name) {
            len = len.saturating_add(joined_len(v, sep)) - range.len();
        }
    });
    if len > max {
        return None;
    }
    let mut out = String::with_capacity(len);
    let mut last = 0;
    scan(s, |range, name| {
        if let Some(v) = values.get(name) {
            out.push_str(&s[last..range.start]);
            out.push_str(&v.join(sep));
            last = range.end;
        }
    });
    out.push_str(&s[last..]);
    Some(out)
}

/// Bytes of rendered script still allowed (each line costs its length and a newline); rendering
/// stops with an error as soon as the script would pass [`SCRIPT_MAX`].
struct Budget(usize);

impl Budget {
    fn take(&mut self, len: usize) -> Result<(), DocError> {
        match self.0.checked_sub(len.saturating_add(1)) {
            Some(left) => {
                self.0 = left;
                Ok(())
            }
            None => Err(too_big()),
        }
    }
}

fn too_big() -> DocError {
    DocError::new(
        Code::MaxDocumentSizeExceeded,
        format!(
            "the script with its parameters substituted is more than {SCRIPT_MAX} bytes; the limit is {SCRIPT_MAX}"
        ),
    )
}

/// The name `s` refers to when it is nothing but one reference.
fn whole_reference(s: &str) -> Option<String> {
    let t = s.trim();
    let mut found = None;
    scan(t, |range, name| {
        if range == (0..t.len()) {
            found = Some(name.to_owned());
        }
    });
    found
}

/// A step's script lines: a line that is only a reference to a list expands to its values (one
/// line each); a list inside a longer line is its values joined with spaces.
fn step_lines(
    step: &Step,
    values: &BTreeMap<String, Vec<String>>,
    budget: &mut Budget,
) -> Result<Vec<String>, DocError> {
    let items: Vec<&str> = match step.inputs.get("runCommand") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut lines = Vec::new();
    for item in items {
        match whole_reference(item).and_then(|n| values.get(&n)) {
            Some(list) => {
                for v in list {
                    budget.take(v.len())?;
                    lines.push(v.clone());
                }
            }
            None => {
                let line = substitute_within(item, values, " ", budget.0).ok_or_else(too_big)?;
                budget.take(line.len())?;
                lines.push(line);
            }
        }
    }
    Ok(lines)
}

fn input_text(
    step: &Step,
    key: &str,
    values: &BTreeMap<String, Vec<String>>,
) -> Result<Option<String>, DocError> {
    Ok(match step.inputs.get(key) {
        Some(Value::String(s)) => Some(
            substitute_within(s, values, " ", WORKING_DIR_MAX).ok_or_else(|| {
                DocError::new(
                    Code::InvalidParameters,
                    format!(
                        "Step {:?}: {key} is longer than {WORKING_DIR_MAX} bytes with its parameters substituted.",
                        step.name
                    ),
                )
            })?,
        ),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// Renders the runnable steps with the parameter values (from [`resolve`]).
pub fn render(
    content: &Content,
    values: &BTreeMap<String, Vec<String>>,
) -> Result<Rendered, DocError> {
    let bad = |m: String| DocError::new(Code::InvalidParameters, m);
    let mut parts = Vec::new();
    let mut budget = Budget(SCRIPT_MAX);
    for step in content.steps.iter().filter(|s| s.runs()) {
        let lines = step_lines(step, values, &mut budget)?;
        let wd = input_text(step, "workingDirectory", values)?.unwrap_or_default();
        let timeout = match input_text(step, "timeoutSeconds", values)? {
            None => EXECUTION_TIMEOUT_DEFAULT,
            Some(t) if t.trim().is_empty() => EXECUTION_TIMEOUT_DEFAULT,
            Some(t) => match t.trim().parse::<u64>() {
                Ok(n) if (1..=EXECUTION_TIMEOUT_MAX).contains(&n) => n,
                _ => {
                    return Err(bad(format!(
                        "Step {:?}: timeoutSeconds {t:?} is not a number of seconds from 1 to {EXECUTION_TIMEOUT_MAX}.",
                        step.name
                    )));
                }
            },
        };
        if lines.iter().all(|l| l.trim().is_empty()) {
            return Err(bad(format!("Step {:?} has no commands to run.", step.name)));
        }
        parts.push((step.name.clone(), lines, wd, timeout));
    }
    Ok(match parts.len() {
        0 => Rendered {
            commands: vec![
                ": every step of the document is skipped: its precondition names another platform than Linux"
                    .into(),
            ],
            working_dir: String::new(),
            execution_timeout: EXECUTION_TIMEOUT_DEFAULT,
            steps: Vec::new(),
        },
        1 => {
            let (name, lines, wd, timeout) = parts.remove(0);
            Rendered {
                commands: lines,
                working_dir: wd,
                execution_timeout: timeout,
                steps: vec![name],
            }
        }
        _ => {
            let mut commands = Vec::new();
            let mut total = 0u64;
            let mut steps = Vec::new();
            for (name, lines, wd, timeout) in parts {
                commands.push(format!("# step {name}"));
                commands.push("(".into());
                if !wd.is_empty() {
                    if wd.len() > WORKING_DIR_MAX || !wd.starts_with('/') {
                        return Err(bad(format!(
                            "Step {name:?}: workingDirectory {wd:?} must be an absolute path of at most {WORKING_DIR_MAX} bytes."
                        )));
                    }
                    commands.push(format!("cd {} || exit", shell_quote(&wd)));
                }
                commands.extend(lines);
                commands.push(")".into());
                commands.push(
                    "fleetrun_rc=$?; [ \"$fleetrun_rc\" -eq 0 ] || exit \"$fleetrun_rc\"".into(),
                );
                total += timeout;
                steps.push(name);
            }
            Rendered {
                commands,
                working_dir: String::new(),
                execution_timeout: total.min(EXECUTION_TIMEOUT_MAX),
                steps,
            }
        }
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::super::content::parse;
    use super::*;

    fn given(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    const DOC: &str = r#"{
      "schemaVersion": "2.2",
      "description": "test",
      "parameters": {
        "greeting": {"type": "String", "default": "hello", "allowedPattern": "[a-z]+"},
        "names": {"type": "StringList", "minItems": 1},
        "color": {"type": "String", "default": "red", "allowedValues": ["red", "blue"]},
        "loud": {"type": "Boolean", "default": false},
        "count": {"type": "Integer", "default": 2},
        "wd": {"type": "String", "default": "/tmp"}
      },
      "mainSteps": [
        {"action": "aws:runShellScript", "name": "greet",
         "precondition": {"StringEquals": ["platformType", "Linux"]},
         "inputs": {"runCommand": ["echo {{ greeting }} {{color}}", "{{ names }}"], "workingDirectory": "{{ wd }}", "timeoutSeconds": "60"}},
        {"action": "aws:runPowerShellScript", "name": "win",
         "precondition": {"StringEquals": ["platformType", "Windows"]},
         "inputs": {"runCommand": ["Write-Host {{ greeting }}"]}},
        {"action": "aws:runShellScript", "name": "count",
         "inputs": {"runCommand": "echo {{count}} {{ loud }}", "timeoutSeconds": 30}}
      ]
    }"#;

    /// 10,000 references to a 10 KB value would render 100 MB: rendering stops at the script limit,
    /// for references inside a line and for list lines alike, without building the long text.
    #[test]
    fn rendering_stops_at_the_script_limit() {
        let line = "{{p}}".repeat(10_000);
        let doc = format!(
            r#"{{"schemaVersion": "2.2", "description": "amplify",
              "parameters": {{"p": {{"type": "String"}}, "l": {{"type": "StringList", "default": ["x"]}}}},
              "mainSteps": [{{"action": "aws:runShellScript", "name": "s",
                "inputs": {{"runCommand": ["{line}", "{{{{l}}}}"]}}}}]}}"#
        );
        let doc = parse(&doc).unwrap();
        let big = "v".repeat(10_000);
        let v = resolve("D", &doc, &given(&[("p", &[big.as_str()])])).unwrap();
        let e = render(&doc, &v).unwrap_err();
        assert_eq!(e.code, Code::MaxDocumentSizeExceeded);
        assert!(
            e.message.contains(&format!("limit is {SCRIPT_MAX}")),
            "{}",
            e.message
        );

        let many: Vec<&str> = vec!["0123456789"; SCRIPT_MAX / 10];
        let v = resolve("D", &doc, &given(&[("p", &["x"]), ("l", &many)])).unwrap();
        assert_eq!(
            render(&doc, &v).unwrap_err().code,
            Code::MaxDocumentSizeExceeded
        );

        let fits: Vec<&str> = vec!["0123456789"; 1_000];
        let v = resolve("D", &doc, &given(&[("p", &["x"]), ("l", &fits)])).unwrap();
        let r = render(&doc, &v).unwrap();
        assert_eq!(r.commands.len(), 1_001);
        assert!(r.commands.iter().map(|c| c.len() + 1).sum::<usize>() <= SCRIPT_MAX);
    }

    #[test]
    fn parameters_are_checked_and_defaulted() {
        let doc = parse(DOC).unwrap();
        let v = resolve("D", &doc, &given(&[("names", &["a", "b"])])).unwrap();
        assert_eq!(v["greeting"], ["hello"]);
        assert_eq!(v["loud"], ["false"]);
        assert_eq!(v["count"], ["2"]);
        let err = |g: &[(&str, &[&str])]| resolve("D", &doc, &given(g)).unwrap_err();
        let e = err(&[]);
        assert_eq!(e.code, Code::InvalidParameters);
        assert!(e.message.contains("\"names\" is required"), "{}", e.message);
        assert!(
            err(&[("names", &["a"]), ("bogus", &["1"])])
                .message
                .contains("\"bogus\" is not defined")
        );
        assert!(err(&[("names", &[])]).message.contains("at least 1"));
        assert!(
            err(&[("names", &["a"]), ("color", &["green"])])
                .message
                .contains("\"color\"")
        );
        assert!(
            err(&[("names", &["a"]), ("greeting", &["Hi!"])])
                .message
                .contains("allowed pattern")
        );
        assert!(
            err(&[("names", &["a"]), ("greeting", &["a", "b"])])
                .message
                .contains("one String")
        );
        assert!(
            err(&[("names", &["a"]), ("loud", &["yes"])])
                .message
                .contains("true or false")
        );
        assert!(
            err(&[("names", &["a"]), ("count", &["x"])])
                .message
                .contains("not an integer")
        );
        let ok = resolve("D", &doc, &given(&[("names", &["a"]), ("loud", &["TRUE"])])).unwrap();
        assert_eq!(ok["loud"], ["true"]);
    }

    #[test]
    fn steps_render_as_subshells_that_stop_at_the_first_failure() {
        let doc = parse(DOC).unwrap();
        let v = resolve(
            "D",
            &doc,
            &given(&[("names", &["echo a", "echo b"]), ("color", &["blue"])]),
        )
        .unwrap();
        let r = render(&doc, &v).unwrap();
        assert_eq!(r.steps, ["greet", "count"]);
        assert_eq!(r.execution_timeout, 90);
        assert_eq!(r.working_dir, "");
        let script = r.commands.join("\n");
        assert_eq!(
            script,
            "# step greet\n(\ncd '/tmp' || exit\necho hello blue\necho a\necho b\n)\n\
             fleetrun_rc=$?; [ \"$fleetrun_rc\" -eq 0 ] || exit \"$fleetrun_rc\"\n\
             # step count\n(\necho 2 false\n)\n\
             fleetrun_rc=$?; [ \"$fleetrun_rc\" -eq 0 ] || exit \"$fleetrun_rc\""
        );
        assert!(
            !script.contains("Write-Host"),
            "the Windows step is skipped"
        );
    }

    #[test]
    fn the_multi_step_script_stops_at_the_failing_step() {
        let doc = parse(r#"{"schemaVersion":"2.2","mainSteps":[
            {"action":"aws:runShellScript","name":"one","inputs":{"runCommand":["set -e","false","echo not-here"]}},
            {"action":"aws:runShellScript","name":"two","inputs":{"runCommand":["echo two"]}}]}"#).unwrap();
        let r = render(&doc, &BTreeMap::new()).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r.commands.join("\n"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "");
        let doc = parse(r#"{"schemaVersion":"2.2","mainSteps":[
            {"action":"aws:runShellScript","name":"one","inputs":{"runCommand":["echo one","exit 0","echo not-here"]}},
            {"action":"aws:runShellScript","name":"two","inputs":{"runCommand":["echo two; exit 3"]}},
            {"action":"aws:runShellScript","name":"three","inputs":{"runCommand":["echo three"]}}]}"#).unwrap();
        let r = render(&doc, &BTreeMap::new()).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(r.commands.join("\n"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "one\ntwo\n");
    }

    #[test]
    fn one_step_renders_as_its_lines() {
        let doc = parse(super::super::RUN_SHELL_SCRIPT_CONTENT).unwrap();
        let v = resolve(
            "AWS-RunShellScript",
            &doc,
            &given(&[("commands", &["echo {{ x }}", "id"])]),
        )
        .unwrap();
        let r = render(&doc, &v).unwrap();
        assert_eq!(
            r.commands,
            ["echo {{ x }}", "id"],
            "values are not substituted again"
        );
        assert_eq!((r.working_dir.as_str(), r.execution_timeout), ("", 3600));
        let v = resolve(
            "AWS-RunShellScript",
            &doc,
            &given(&[
                ("commands", &["id"]),
                ("workingDirectory", &["/srv"]),
                ("executionTimeout", &["172800"]),
            ]),
        )
        .unwrap();
        let r = render(&doc, &v).unwrap();
        assert_eq!(
            (r.working_dir.as_str(), r.execution_timeout),
            ("/srv", 172_800)
        );
        let e = resolve(
            "AWS-RunShellScript",
            &doc,
            &given(&[("commands", &["id"]), ("executionTimeout", &["172801"])]),
        )
        .unwrap_err();
        assert!(e.message.contains("executionTimeout"), "{}", e.message);
    }

    #[test]
    fn references_are_found_with_or_without_spaces() {
        assert_eq!(
            references("a {{x}} b {{ y_1 }} {{ ssm:p }} {{.State}} {{z"),
            ["x", "y_1"]
        );
        let v = given(&[("x", &["1", "2"]), ("y", &["Y"])]);
        assert_eq!(
            substitute("{{x}}-{{ y }}-{{ q }}", &v, ","),
            "1,2-Y-{{ q }}"
        );
        assert_eq!(whole_reference(" {{ x }} ").as_deref(), Some("x"));
        assert_eq!(whole_reference("{{ x }}{{ y }}"), None);
    }

    #[test]
    fn all_steps_skipped_is_a_no_op() {
        let doc = parse(r#"{"schemaVersion":"2.2","mainSteps":[
            {"action":"aws:runPowerShellScript","name":"w","precondition":{"StringEquals":["platformType","Windows"]},"inputs":{"runCommand":["x"]}}]}"#).unwrap();
        let r = render(&doc, &BTreeMap::new()).unwrap();
        assert!(r.steps.is_empty() && r.commands[0].starts_with(':'));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the references and values: the rendered script never passes the script
            /// limit; past it rendering is refused with MaxDocumentSizeExceeded.
            #[test]
            fn rendering_never_exceeds_the_script_limit(
                refs in 0usize..1_500,
                value_len in 0usize..30_000,
                list in proptest::collection::vec(0usize..5_000, 0..200),
                steps in 1usize..4,
            ) {
                let line = "echo {{p}} ".repeat(refs) + "{{ p}}";
                let step = |i: usize| format!(
                    r#"{{"action": "aws:runShellScript", "name": "s{i}",
                        "inputs": {{"runCommand": ["{line}", "{{{{l}}}}"], "workingDirectory": "/{{{{p}}}}"}}}}"#
                );
                let doc = format!(
                    r#"{{"schemaVersion": "2.2", "description": "p",
                      "parameters": {{"p": {{"type": "String"}}, "l": {{"type": "StringList"}}}},
                      "mainSteps": [{}]}}"#,
                    (0..steps).map(step).collect::<Vec<_>>().join(",")
                );
                let doc = parse(&doc).unwrap();
                let value = "v".repeat(value_len);
                let items: Vec<String> = list.iter().map(|n| "i".repeat(*n)).collect();
                let mut g = BTreeMap::new();
                g.insert("p".to_owned(), vec![value]);
                g.insert("l".to_owned(), items);
                let v = resolve("D", &doc, &g).unwrap();
                match render(&doc, &v) {
                    Ok(r) => {
                        let n: usize = r.commands.iter().map(|c| c.len() + 1).sum();
                        // Multi-step wrappers (a few lines per step) may add to the body's lines.
                        prop_assert!(n <= SCRIPT_MAX + 256 * steps, "{}", n);
                    }
                    Err(e) => prop_assert!(
                        e.code == Code::MaxDocumentSizeExceeded || e.message.contains("workingDirectory"),
                        "{:?}", e
                    ),
                }
            }

            /// Random JSON as a send body: decoding and the body's own checks (targets, rates,
            /// rendering of the built-in document) never panic.
            #[test]
            fn random_send_bodies_never_panic(body in json_value(4)) {
                if let Ok(req) = serde_json::from_value::<fleetrun_proto::api::SendCommand>(body) {
                    if let Some(t) = &req.targets {
                        let _ = fleetrun_proto::targets::TargetExpr::parse(t);
                    }
                    for r in [&req.max_concurrency, &req.max_errors].into_iter().flatten() {
                        let _ = fleetrun_proto::targets::Rate::parse_concurrency(r);
                        let _ = fleetrun_proto::targets::Rate::parse_errors(r);
                    }
                    let doc = parse(super::super::super::RUN_SHELL_SCRIPT_CONTENT).unwrap();
                    let mut g = req.parameters.clone();
                    if !req.commands.is_empty() {
                        g.insert("commands".into(), req.commands.clone());
                    }
                    if let Ok(v) = resolve("AWS-RunShellScript", &doc, &g) {
                        let _ = render(&doc, &v);
                    }
                }
            }
        }

        /// Arbitrary JSON, biased towards a send body's member names.
        fn json_value(depth: u32) -> impl Strategy<Value = serde_json::Value> {
            use serde_json::Value;
            let key = prop_oneof![
                Just("targets".to_owned()),
                Just("node_ids".to_owned()),
                Just("commands".to_owned()),
                Just("parameters".to_owned()),
                Just("max_concurrency".to_owned()),
                Just("max_errors".to_owned()),
                Just("document_name".to_owned()),
                Just("comment".to_owned()),
                any::<String>(),
            ];
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                any::<String>().prop_map(Value::from),
                Just(Value::from("all")),
                Just(Value::from("{{ commands }}")),
            ];
            leaf.prop_recursive(depth, 64, 8, move |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
                    proptest::collection::btree_map(key.clone(), inner, 0..8)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }
    }
}
