//! A Command document's content: parsing and validation (SSM schema 1.2, 2.0 and 2.2, in JSON or
//! YAML), done once when a document is created or updated, and again when a stored version is run.

use super::DocError;
use crate::errors::Code;
use fleetrun_proto::api::PLUGIN_RUN_SHELL_SCRIPT;
use regex::Regex;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Most bytes of a document's content (SSM: 64 KB).
pub const DOCUMENT_MAX: usize = 64 * 1024;
/// The platform of every fleetrun node.
pub const PLATFORM: &str = "Linux";
const PLATFORMS: [&str; 3] = ["Windows", "Linux", "MacOS"];

/// A parameter's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// One string.
    String,
    /// A list of strings.
    StringList,
    /// `true` or `false`.
    Boolean,
    /// An integer.
    Integer,
    /// A JSON object.
    StringMap,
    /// A list of JSON objects.
    MapList,
}

impl ParamType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "String" => ParamType::String,
            "StringList" => ParamType::StringList,
            "Boolean" => ParamType::Boolean,
            "Integer" => ParamType::Integer,
            "StringMap" => ParamType::StringMap,
            "MapList" => ParamType::MapList,
            _ => return None,
        })
    }
    /// Its name in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "String",
            ParamType::StringList => "StringList",
            ParamType::Boolean => "Boolean",
            ParamType::Integer => "Integer",
            ParamType::StringMap => "StringMap",
            ParamType::MapList => "MapList",
        }
    }
    /// Whether values are lists.
    pub fn is_list(self) -> bool {
        matches!(self, ParamType::StringList | ParamType::MapList)
    }
}

/// One declared parameter.
#[derive(Clone, Debug)]
pub struct ParamDef {
    /// Name.
    pub name: String,
    /// Type.
    pub ty: ParamType,
    /// Description.
    pub description: String,
    /// Default, as written in the document (None: required).
    pub default: Option<Value>,
    /// Allowed values (empty: any).
    pub allowed_values: Vec<String>,
    /// Pattern every value must match whole, as written and compiled.
    pub allowed_pattern: Option<(String, Regex)>,
    /// List bounds.
    pub min_items: Option<u64>,
    /// List bounds.
    pub max_items: Option<u64>,
    /// Length bounds of each string, in characters.
    pub min_chars: Option<u64>,
    /// Length bounds of each string, in characters.
    pub max_chars: Option<u64>,
}

/// One step (a 2.x `mainSteps` item, or a 1.2 `runtimeConfig` plugin property).
#[derive(Clone, Debug)]
pub struct Step {
    /// Name (1.2: the property's `id`, or the plugin name).
    pub name: String,
    /// Action (plugin), e.g. `aws:runShellScript`.
    pub action: String,
    /// The platform its precondition requires, if it has one.
    pub platform: Option<String>,
    /// The inputs (for runnable steps: `runCommand`, `workingDirectory`, `timeoutSeconds`).
    pub inputs: Map<String, Value>,
}

impl Step {
    /// Whether it runs on a fleetrun node (else it is skipped).
    pub fn runs(&self) -> bool {
        self.action == PLUGIN_RUN_SHELL_SCRIPT
            && self.platform.as_deref().is_none_or(|p| p == PLATFORM)
    }
}

/// A validated document.
#[derive(Clone, Debug)]
pub struct Content {
    /// `1.2`, `2.0` or `2.2`.
    pub schema_version: String,
    /// Description.
    pub description: String,
    /// Parameters, by name.
    pub params: Vec<ParamDef>,
    /// Steps, in order.
    pub steps: Vec<Step>,
}

fn bad(message: impl Into<String>) -> DocError {
    DocError::new(Code::InvalidDocumentContent, message)
}

/// How a document is written (SSM's `DocumentFormat`; TEXT is for document types fleetrun does
/// not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// JSON, the default.
    Json,
    /// YAML.
    Yaml,
}

impl Format {
    /// `JSON` or `YAML` (as SSM spells them); anything else is an error naming the choices.
    pub fn parse(s: &str) -> Result<Format, DocError> {
        match s {
            "JSON" => Ok(Format::Json),
            "YAML" => Ok(Format::Yaml),
            other => Err(bad(format!(
                "DocumentFormat {other} is not one fleetrun runs: use JSON or YAML."
            ))),
        }
    }
    /// Its SSM name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::Yaml => "YAML",
        }
    }
    /// The format of stored text: JSON when it is JSON, else YAML (only text that parsed in its
    /// declared format is ever stored, and JSON text means the same read as YAML).
    pub fn of(text: &str) -> Format {
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// What a YAML document may cost to read: far above any real document (64 KB at most), far
/// below what an alias bomb would expand to.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 100_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_depth: 32,
            max_nodes: 50_000,
            max_documents: 1,
            max_total_scalar_bytes: 1 << 20,
        },
        duplicate_keys: serde_saphyr::options::DuplicateKeyPolicy::Error,
    }
}

/// The document's text read as a value, in the format it is written in.
pub fn to_value(text: &str, format: Format) -> Result<Value, DocError> {
    if text.len() > DOCUMENT_MAX {
        return Err(DocError::new(
            Code::MaxDocumentSizeExceeded,
            format!(
                "The document is {} bytes; the limit is {DOCUMENT_MAX} bytes.",
                text.len()
            ),
        ));
    }
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "The document is not valid JSON ({e}); a YAML document needs DocumentFormat YAML."
            ))
        }),
        Format::Yaml => {
            let mut v: Value =
                serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
                    let e = e.to_string().replace('\n', " ");
                    bad(format!("The document is not valid YAML ({e})."))
                })?;
            // `schemaVersion: 2.2` unquoted reads as a number in YAML; SSM takes it as the string.
            if let Some(n @ Value::Number(_)) = v.get("schemaVersion") {
                let text = n.to_string();
                v["schemaVersion"] = Value::String(text);
            }
            Ok(v)
        }
    }
}

/// A document's value written in `format` (GetDocument of a format other than the stored one).
pub fn render(value: &Value, format: Format) -> Result<String, DocError> {
    match format {
        Format::Json => serde_json::to_string_pretty(value).map_err(|e| bad(e.to_string())),
        Format::Yaml => serde_saphyr::to_string(value).map_err(|e| bad(e.to_string())),
    }
}

/// Parses and validates stored content (in the format [`Format::of`] finds).
pub fn parse(text: &str) -> Result<Content, DocError> {
    parse_as(text, Format::of(text))
}

/// Parses and validates content written in `format`.
pub fn parse_as(text: &str, format: Format) -> Result<Content, DocError> {
    let value = to_value(text, format)?;
    let Value::Object(top) = value else {
        return Err(bad("The document must be an object (a mapping in YAML)."));
    };
    let schema_version = match top.get("schemaVersion") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("schemaVersion must be a string such as \"2.2\".")),
        None => return Err(bad("The document has no schemaVersion.")),
    };
    if !matches!(schema_version.as_str(), "1.2" | "2.0" | "2.2") {
        return Err(DocError::new(
            Code::InvalidDocumentSchemaVersion,
            format!(
                "schemaVersion {schema_version} is not a Command document schema: use 1.2, 2.0 or 2.2."
            ),
        ));
    }
    let v1 = schema_version == "1.2";
    for key in top.keys() {
        let known = match key.as_str() {
            "schemaVersion" | "description" | "parameters" => true,
            "runtimeConfig" => v1,
            "mainSteps" => !v1,
            _ => false,
        };
        if !known {
            return Err(bad(format!(
                "Key {key:?} is not allowed at the top of a schema {schema_version} document."
            )));
        }
    }
    let description = match top.get("description") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad("description must be a string.")),
    };
    let params = match top.get("parameters") {
        None => Vec::new(),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(name, def)| param_def(name, def))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("parameters must be an object.")),
    };
    let steps = if v1 {
        runtime_config(top.get("runtimeConfig"))?
    } else {
        main_steps(top.get("mainSteps"), schema_version == "2.2")?
    };
    let mut names = HashSet::new();
    for step in &steps {
        if !names.insert(step.name.as_str()) {
            return Err(bad(format!(
                "Step name {:?} is used more than once.",
                step.name
            )));
        }
        if step.action != PLUGIN_RUN_SHELL_SCRIPT
            && step.platform.as_deref().is_none_or(|p| p == PLATFORM)
        {
            return Err(bad(format!(
                "Step {:?}: action {} does not run on fleetrun nodes (Linux); only {PLUGIN_RUN_SHELL_SCRIPT} runs. Give the step a precondition for the platform it is for.",
                step.name, step.action
            )));
        }
        if step.runs() {
            check_shell_inputs(step)?;
        }
        let declared: HashSet<&str> = params.iter().map(|p: &ParamDef| p.name.as_str()).collect();
        let mut used = Vec::new();
        collect_refs(&Value::Object(step.inputs.clone()), &mut used);
        if let Some(u) = used.iter().find(|u| !declared.contains(u.as_str())) {
            return Err(bad(format!(
                "Step {:?} uses {{{{ {u} }}}}, which is not a parameter of the document.",
                step.name
            )));
        }
    }
    Ok(Content {
        schema_version,
        description,
        params,
        steps,
    })
}

fn param_def(name: &str, def: &Value) -> Result<ParamDef, DocError> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(bad(format!(
            "Parameter name {name:?} is not valid: use letters, digits and _."
        )));
    }
    let Value::Object(def) = def else {
        return Err(bad(format!("Parameter {name:?} must be an object.")));
    };
    let p = |m: String| bad(format!("Parameter {name:?}: {m}"));
    for key in def.keys() {
        if !matches!(
            key.as_str(),
            "type"
                | "description"
                | "default"
                | "allowedValues"
                | "allowedPattern"
                | "displayType"
                | "minItems"
                | "maxItems"
                | "minChars"
                | "maxChars"
        ) {
            return Err(p(format!("{key:?} is not a parameter attribute.")));
        }
    }
    let ty = match def.get("type") {
        Some(Value::String(t)) => ParamType::parse(t).ok_or_else(|| {
            p(format!(
                "type {t:?} is not one of String, StringList, Boolean, Integer, StringMap, MapList."
            ))
        })?,
        _ => return Err(p("type is missing.".into())),
    };
    let text = |key: &str| -> Result<Option<String>, DocError> {
        match def.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(p(format!("{key} must be a string."))),
        }
    };
    let count = |key: &str| -> Result<Option<u64>, DocError> {
        match def.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| p(format!("{key} must be a non-negative integer."))),
        }
    };
    let allowed_values = match def.get("allowedValues") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                _ => Err(p("allowedValues must be a list of strings.".into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(p("allowedValues must be a list of strings.".into())),
    };
    let allowed_pattern = match text("allowedPattern")? {
        None => None,
        Some(src) => {
            let rx = Regex::new(&format!("^(?:{src})$")).map_err(|e| {
                p(format!(
                    "allowedPattern is not a valid regular expression: {e}"
                ))
            })?;
            Some((src, rx))
        }
    };
    let def = ParamDef {
        name: name.to_owned(),
        ty,
        description: text("description")?.unwrap_or_default(),
        default: def.get("default").cloned(),
        allowed_values,
        allowed_pattern,
        min_items: count("minItems")?,
        max_items: count("maxItems")?,
        min_chars: count("minChars")?,
        max_chars: count("maxChars")?,
    };
    if let Some(d) = &def.default {
        let values = super::params::default_values(&def, d).map_err(&p)?;
        super::params::check_values(&def, &values)
            .map_err(|m| p(format!("the default is not valid: {m}")))?;
    }
    Ok(def)
}

fn runtime_config(v: Option<&Value>) -> Result<Vec<Step>, DocError> {
    let Some(Value::Object(plugins)) = v else {
        return Err(bad(
            "A schema 1.2 document needs a runtimeConfig object of plugins.",
        ));
    };
    let mut steps = Vec::new();
    for (plugin, config) in plugins {
        let props = match config.get("properties") {
            Some(Value::Array(a)) => a.clone(),
            Some(o @ Value::Object(_)) => vec![o.clone()],
            _ => {
                return Err(bad(format!(
                    "Plugin {plugin} needs properties (an object or a list of objects)."
                )));
            }
        };
        for (i, prop) in props.into_iter().enumerate() {
            let Value::Object(mut inputs) = prop else {
                return Err(bad(format!("Plugin {plugin}: properties must be objects.")));
            };
            let name = match inputs.remove("id") {
                Some(Value::String(id)) => id,
                None if i == 0 => plugin.clone(),
                None => format!("{i}.{plugin}"),
                Some(_) => return Err(bad(format!("Plugin {plugin}: id must be a string."))),
            };
            steps.push(Step {
                name,
                action: plugin.clone(),
                platform: None,
                inputs,
            });
        }
    }
    if steps.is_empty() {
        return Err(bad("runtimeConfig has no plugin to run."));
    }
    Ok(steps)
}

fn main_steps(v: Option<&Value>, preconditions: bool) -> Result<Vec<Step>, DocError> {
    let Some(Value::Array(items)) = v else {
        return Err(bad("The document needs mainSteps, a list of steps."));
    };
    if items.is_empty() {
        return Err(bad("mainSteps is empty."));
    }
    let mut steps = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Value::Object(step) = item else {
            return Err(bad(format!("mainSteps[{i}] must be an object.")));
        };
        let name = match step.get("name") {
            Some(Value::String(n))
                if !n.is_empty()
                    && n.len() <= 128
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) =>
            {
                n.clone()
            }
            Some(Value::String(n)) => {
                return Err(bad(format!(
                    "mainSteps[{i}]: name {n:?} is not valid: use 1 to 128 letters, digits, _, - and ."
                )));
            }
            _ => return Err(bad(format!("mainSteps[{i}] has no name."))),
        };
        let s = |m: String| bad(format!("Step {name:?}: {m}"));
        for key in step.keys() {
            if !matches!(
                key.as_str(),
                "action" | "name" | "inputs" | "precondition" | "description"
            ) {
                return Err(s(format!("{key:?} is not a step attribute.")));
            }
        }
        let action = match step.get("action") {
            Some(Value::String(a)) if !a.is_empty() => a.clone(),
            _ => return Err(s("action is missing.".into())),
        };
        let inputs = match step.get("inputs") {
            Some(Value::Object(m)) => m.clone(),
            None => Map::new(),
            Some(_) => return Err(s("inputs must be an object.".into())),
        };
        let platform = match step.get("precondition") {
            None => None,
            Some(_) if !preconditions => {
                return Err(s("preconditions need schemaVersion 2.2.".into()));
            }
            Some(pre) => Some(precondition(pre).map_err(s)?),
        };
        steps.push(Step {
            name,
            action,
            platform,
            inputs,
        });
    }
    Ok(steps)
}

/// `{"StringEquals": ["platformType", "Linux"]}`: the platform it names.
fn precondition(v: &Value) -> Result<String, String> {
    let form =
        "the precondition must be {\"StringEquals\": [\"platformType\", \"Windows|Linux|MacOS\"]}";
    let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
        return Err(form.into());
    };
    let Some(Value::Array(pair)) = obj.get("StringEquals") else {
        return Err(form.into());
    };
    let strs: Vec<&str> = pair.iter().filter_map(Value::as_str).collect();
    match strs.as_slice() {
        ["platformType", p] | [p, "platformType"] if pair.len() == 2 && PLATFORMS.contains(p) => {
            Ok((*p).to_owned())
        }
        _ => Err(form.into()),
    }
}

fn check_shell_inputs(step: &Step) -> Result<(), DocError> {
    let s = |m: String| bad(format!("Step {:?}: {m}", step.name));
    for key in step.inputs.keys() {
        if !matches!(
            key.as_str(),
            "runCommand" | "workingDirectory" | "timeoutSeconds"
        ) {
            return Err(s(format!(
                "{key:?} is not an input of {PLUGIN_RUN_SHELL_SCRIPT} (runCommand, workingDirectory, timeoutSeconds)."
            )));
        }
    }
    match step.inputs.get("runCommand") {
        Some(Value::String(_)) => {}
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {}
        Some(_) => {
            return Err(s(
                "runCommand must be a non-empty list of strings (or one string).".into(),
            ));
        }
        None => return Err(s("runCommand is missing.".into())),
    }
    if !matches!(
        step.inputs.get("workingDirectory"),
        None | Some(Value::String(_))
    ) {
        return Err(s("workingDirectory must be a string.".into()));
    }
    match step.inputs.get("timeoutSeconds") {
        None | Some(Value::String(_)) => {}
        Some(Value::Number(n)) if n.as_u64().is_some() => {}
        Some(_) => {
            return Err(s(
                "timeoutSeconds must be a number of seconds (or a string).".into(),
            ));
        }
    }
    Ok(())
}

/// Names of the `{{ name }}` references in every string of `v`.
fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.extend(super::params::references(s)),
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        Value::Object(m) => m.values().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}
