//! Documents, shared by the native API and the SSM-compatible API: the built-in AWS-RunShellScript,
//! custom Command documents with numbered versions, and what a send of a document runs.
//!
//! `content.rs` parses and validates a document; `params.rs` checks a send's parameters and renders
//! the script. The agent never sees a document: the server sends it the rendered script.

pub mod content;
pub mod params;

use crate::errors::Code;
use content::{Content, Format};
use fleetrun_proto::api::{DOCUMENT_RUN_SHELL_SCRIPT, Document, DocumentParameter};
use fleetrun_proto::time::{now_ms, rfc3339};
use fleetrun_store::{Added, Created, DocumentRow, Store, StoreError, VersionRow};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// AWS-RunShellScript as SSM defines it (schema 1.2).
pub const RUN_SHELL_SCRIPT_CONTENT: &str = r#"{
  "schemaVersion": "1.2",
  "description": "Run a shell script or specify the commands to run.",
  "parameters": {
    "commands": {
      "type": "StringList",
      "description": "(Required) Specify a shell script or a command to run.",
      "minItems": 1,
      "displayType": "textarea"
    },
    "workingDirectory": {
      "type": "String",
      "default": "",
      "description": "(Optional) The path to the working directory on your instance.",
      "maxChars": 4096
    },
    "executionTimeout": {
      "type": "String",
      "default": "3600",
      "description": "(Optional) The time in seconds for a command to complete before it is considered to have failed. Default is 3600 (1 hour). Maximum is 172800 (48 hours).",
      "allowedPattern": "([1-9][0-9]{0,4})|(1[0-6][0-9]{4})|(17[0-1][0-9]{3})|(172[0-7][0-9]{2})|(172800)"
    }
  },
  "runtimeConfig": {
    "aws:runShellScript": {
      "properties": [
        {
          "id": "0.aws:runShellScript",
          "runCommand": "{{ commands }}",
          "workingDirectory": "{{ workingDirectory }}",
          "timeoutSeconds": "{{ executionTimeout }}"
        }
      ]
    }
  }
}
"#;

/// Owner of built-in documents.
pub const OWNER_AMAZON: &str = "Amazon";
/// Owner of the documents operators create: the one account a fleetrun server is (an
/// account-shaped id, as SSM shows owners).
pub const OWNER_SELF: &str = "000000000000";
/// When the built-in documents were "created" (2017-07-14), epoch ms.
const BUILT_IN_CREATED_MS: i64 = 1_500_000_000_000;

/// A refusal: its kind and a message naming the problem.
#[derive(Debug, Clone)]
pub struct DocError {
    /// `DocumentNotFound`, `InvalidDocumentContent`, `InvalidParameters`, ...
    pub code: Code,
    /// One line.
    pub message: String,
}

impl DocError {
    /// An error.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        DocError {
            code,
            message: message.into(),
        }
    }
}

/// Why a document operation failed.
#[derive(Debug)]
pub enum Error {
    /// Bad input.
    Invalid(DocError),
    /// Storage failed.
    Store(StoreError),
}

impl From<DocError> for Error {
    fn from(e: DocError) -> Self {
        Error::Invalid(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl From<Error> for crate::errors::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(e) => crate::errors::Error::new(e.code, e.message),
            Error::Store(e) => e.into(),
        }
    }
}

impl<D> From<Error> for crate::errors::Answered<D> {
    fn from(e: Error) -> Self {
        crate::errors::Error::from(e).into()
    }
}

fn invalid(code: Code, message: impl Into<String>) -> Error {
    Error::Invalid(DocError::new(code, message))
}

/// One version of a document, parsed.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The document.
    pub row: DocumentRow,
    /// The version.
    pub version: VersionRow,
    /// Its content, validated.
    pub content: Content,
    /// How the version is written.
    pub format: Format,
    /// Whether fleetrun ships it.
    pub built_in: bool,
}

impl Loaded {
    /// The native API's view (with the content when `with_content`).
    pub fn to_api(&self, with_content: bool) -> Document {
        Document {
            name: self.row.name.clone(),
            document_type: self.row.document_type.clone(),
            document_format: self.format.as_str().into(),
            owner: self.row.owner.clone(),
            document_version: self.version.version.to_string(),
            version_name: self.version.version_name.clone(),
            default_version: self.row.default_version.to_string(),
            latest_version: self.row.latest_version.to_string(),
            schema_version: self.version.schema_version.clone(),
            description: self.version.description.clone(),
            hash: self.version.hash.clone(),
            parameters: self
                .content
                .params
                .iter()
                .map(|p| DocumentParameter {
                    name: p.name.clone(),
                    param_type: p.ty.as_str().into(),
                    description: p.description.clone(),
                    default_value: p.default.as_ref().map(default_text),
                })
                .collect(),
            built_in: self.built_in,
            created_at: rfc3339(self.row.created_at),
            content: with_content.then(|| self.version.content.clone()),
        }
    }
}

/// A default as SSM's DocumentParameter shows it: strings as they are, anything else as JSON.
pub fn default_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn built_in(name: &str) -> Option<Loaded> {
    if name != DOCUMENT_RUN_SHELL_SCRIPT {
        return None;
    }
    let content = content::parse(RUN_SHELL_SCRIPT_CONTENT).ok()?;
    Some(Loaded {
        row: DocumentRow {
            name: name.to_owned(),
            document_type: "Command".into(),
            document_format: "JSON".into(),
            owner: OWNER_AMAZON.into(),
            default_version: 1,
            latest_version: 1,
            created_at: BUILT_IN_CREATED_MS,
            tags: Default::default(),
        },
        version: VersionRow {
            version: 1,
            version_name: None,
            content: RUN_SHELL_SCRIPT_CONTENT.into(),
            hash: sha256_hex(RUN_SHELL_SCRIPT_CONTENT),
            schema_version: content.schema_version.clone(),
            description: content.description.clone(),
            created_at: BUILT_IN_CREATED_MS,
        },
        content,
        format: Format::Json,
        built_in: true,
    })
}

/// Parses a version selector: `$DEFAULT` (or none), `$LATEST` or a number.
fn pick_version(row: &DocumentRow, selector: Option<&str>) -> Result<i64, Error> {
    match selector.unwrap_or("$DEFAULT") {
        "$DEFAULT" => Ok(row.default_version),
        "$LATEST" => Ok(row.latest_version),
        n => n
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 1 && !n.starts_with('0') && !n.starts_with('+'))
            .ok_or_else(|| {
                invalid(
                    Code::InvalidDocumentVersion,
                    format!("{n:?} is not a document version: use a number, $LATEST or $DEFAULT."),
                )
            }),
    }
}

/// Loads a version of a document (built-in or stored): by selector (`$DEFAULT` when none), or by
/// version label.
pub async fn load(
    store: &Store,
    name: &str,
    selector: Option<&str>,
    version_name: Option<&str>,
) -> Result<Loaded, Error> {
    let no_version = |v: &str| {
        invalid(
            Code::InvalidDocumentVersion,
            format!("Document {name} has no version {v}."),
        )
    };
    if let Some(b) = built_in(name) {
        if let Some(label) = version_name {
            return Err(no_version(label));
        }
        let v = pick_version(&b.row, selector)?;
        return if v == 1 {
            Ok(b)
        } else {
            Err(no_version(&v.to_string()))
        };
    }
    let Some(row) = store.get_document(name).await? else {
        return Err(invalid(
            Code::DocumentNotFound,
            format!("Document with name {name} does not exist."),
        ));
    };
    let mut v = pick_version(&row, selector)?;
    if let Some(label) = version_name {
        match store.document_version_by_name(name, label).await? {
            Some(n) if selector.is_none() || n == v => v = n,
            _ => return Err(no_version(label)),
        }
    }
    let Some(version) = store.get_document_version(name, v).await? else {
        return Err(no_version(&v.to_string()));
    };
    let format = Format::of(&version.content);
    let content = content::parse_as(&version.content, format)?;
    Ok(Loaded {
        row,
        version,
        content,
        format,
        built_in: false,
    })
}

/// Every document (built-in first, then by name) at its default version.
pub async fn list(store: &Store) -> Result<Vec<Loaded>, Error> {
    let mut out: Vec<Loaded> = built_in(DOCUMENT_RUN_SHELL_SCRIPT).into_iter().collect();
    for (row, version) in store.list_documents().await? {
        let format = Format::of(&version.content);
        match content::parse_as(&version.content, format) {
            Ok(content) => out.push(Loaded {
                row,
                version,
                content,
                format,
                built_in: false,
            }),
            Err(e) => {
                tracing::warn!(document = %row.name, "stored document does not parse: {}", e.message)
            }
        }
    }
    Ok(out)
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok = (3..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
    if !ok {
        return Err(invalid(
            Code::Validation,
            format!(
                "1 validation error detected: Value '{name}' at 'name' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_\\-.]{{3,128}}$"
            ),
        ));
    }
    let lower = name.to_ascii_lowercase();
    if ["aws-", "amazon", "amzn"]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return Err(invalid(
            Code::Validation,
            format!(
                "Document name {name} is not valid: names starting with AWS-, aws-, amazon or amzn are reserved."
            ),
        ));
    }
    Ok(())
}

fn check_version_name(label: Option<&str>) -> Result<(), Error> {
    if let Some(l) = label
        && !((1..=128).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
    {
        return Err(invalid(
            Code::Validation,
            format!(
                "1 validation error detected: Value '{l}' at 'versionName' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_\\-.]{{1,128}}$"
            ),
        ));
    }
    Ok(())
}

fn new_version(text: &str, content: &Content, version_name: Option<&str>) -> VersionRow {
    VersionRow {
        version: 0,
        version_name: version_name.map(str::to_owned),
        content: text.to_owned(),
        hash: sha256_hex(text),
        schema_version: content.schema_version.clone(),
        description: content.description.clone(),
        created_at: now_ms(),
    }
}

/// Creates a document (version 1) from `text` written in `format`.
pub async fn create(
    store: &Store,
    name: &str,
    text: &str,
    format: Format,
    version_name: Option<&str>,
    tags: BTreeMap<String, String>,
) -> Result<Loaded, Error> {
    check_name(name)?;
    check_version_name(version_name)?;
    let content = checked(text, format)?;
    let row = DocumentRow {
        name: name.to_owned(),
        document_type: "Command".into(),
        document_format: format.as_str().into(),
        owner: OWNER_SELF.into(),
        default_version: 1,
        latest_version: 1,
        created_at: now_ms(),
        tags,
    };
    match store
        .insert_document(&row, &new_version(text, &content, version_name))
        .await?
    {
        Created::Ok => {}
        Created::Exists => {
            return Err(invalid(
                Code::DocumentAlreadyExists,
                format!("A document named {name} already exists."),
            ));
        }
        Created::LimitExceeded => {
            return Err(invalid(
                Code::DocumentLimitExceeded,
                format!(
                    "There are {} documents, the most a server keeps.",
                    fleetrun_store::DOCUMENTS_MAX
                ),
            ));
        }
    }
    load(store, name, Some("1"), None).await
}

/// Parses new content in its declared format. (YAML text that is also JSON is stored as it is and
/// read back as JSON: [`Format::of`] decides on load, and both read the same.)
fn checked(text: &str, format: Format) -> Result<Content, Error> {
    Ok(content::parse_as(text, format)?)
}

/// A loaded version's content written in `format`: as stored when it is already, else converted.
pub fn content_as(d: &Loaded, format: Format) -> Result<String, Error> {
    if d.format == format {
        return Ok(d.version.content.clone());
    }
    let value = content::to_value(&d.version.content, d.format)?;
    Ok(content::render(&value, format)?)
}

fn refuse_built_in(name: &str, what: &str) -> Result<(), Error> {
    if built_in(name).is_some() {
        return Err(invalid(
            Code::InvalidDocumentOperation,
            format!("You can't {what} {name}: it is owned by Amazon (built in)."),
        ));
    }
    Ok(())
}

/// Adds a version (`text` written in `format`): `expected` must be `$LATEST` (or none) or the
/// latest version's number.
pub async fn update(
    store: &Store,
    name: &str,
    text: &str,
    format: Format,
    expected: Option<&str>,
    version_name: Option<&str>,
) -> Result<Loaded, Error> {
    refuse_built_in(name, "update")?;
    check_version_name(version_name)?;
    let expected = match expected {
        None | Some("$LATEST") => None,
        Some(n) => match n.parse::<i64>() {
            Ok(v) if v >= 1 => Some(v),
            _ => {
                return Err(invalid(
                    Code::InvalidDocumentVersion,
                    format!(
                        "Document version {n} can't be updated: give $LATEST or the latest version number."
                    ),
                ));
            }
        },
    };
    let content = checked(text, format)?;
    let version = match store
        .add_document_version(name, expected, &new_version(text, &content, version_name))
        .await?
    {
        Added::Ok(v) => v,
        Added::Missing => {
            return Err(invalid(
                Code::DocumentNotFound,
                format!("Document with name {name} does not exist."),
            ));
        }
        Added::NotLatest(latest) => {
            return Err(invalid(
                Code::InvalidDocumentVersion,
                format!(
                    "Document version {} is not the latest version of {name} ({latest}).",
                    expected.unwrap_or_default()
                ),
            ));
        }
        Added::Duplicate(v) => {
            return Err(invalid(
                Code::DuplicateDocumentContent,
                format!("The content is the same as version {v} of {name}."),
            ));
        }
        Added::DuplicateVersionName => {
            return Err(invalid(
                Code::DuplicateDocumentVersionName,
                format!(
                    "A version of {name} is already named {}.",
                    version_name.unwrap_or_default()
                ),
            ));
        }
        Added::LimitExceeded => {
            return Err(invalid(
                Code::DocumentVersionLimitExceeded,
                format!(
                    "{name} has {} versions, the most a document keeps.",
                    fleetrun_store::VERSIONS_MAX
                ),
            ));
        }
    };
    load(store, name, Some(&version.to_string()), None).await
}

/// Deletes a document with all its versions.
pub async fn delete(store: &Store, name: &str) -> Result<(), Error> {
    refuse_built_in(name, "delete")?;
    if !store.delete_document(name).await? {
        return Err(invalid(
            Code::DocumentNotFound,
            format!("Document with name {name} does not exist."),
        ));
    }
    Ok(())
}

/// Makes a version the default.
pub async fn set_default(store: &Store, name: &str, version: &str) -> Result<Loaded, Error> {
    refuse_built_in(name, "change the default version of")?;
    let Some(row) = store.get_document(name).await? else {
        return Err(invalid(
            Code::DocumentNotFound,
            format!("Document with name {name} does not exist."),
        ));
    };
    let v = match version {
        "$LATEST" | "$DEFAULT" => None,
        n => pick_version(&row, Some(n)).ok(),
    }
    .ok_or_else(|| {
        invalid(
            Code::InvalidDocumentVersion,
            format!("{version:?} is not a version number of {name}."),
        )
    })?;
    if !store.set_default_document_version(name, v).await? {
        return Err(invalid(
            Code::InvalidDocumentVersion,
            format!("Document {name} has no version {v}."),
        ));
    }
    load(store, name, Some(&v.to_string()), None).await
}

/// What a send of a document runs.
pub struct Prepared {
    /// The version that runs.
    pub document: Loaded,
    /// Every parameter's value (defaults filled in).
    pub values: BTreeMap<String, Vec<String>>,
    /// The script.
    pub rendered: params::Rendered,
}

/// Loads the document of a send, checks its parameters and renders the script.
pub async fn prepare(
    store: &Store,
    name: &str,
    selector: Option<&str>,
    given: &BTreeMap<String, Vec<String>>,
) -> Result<Prepared, Error> {
    let document = load(store, name, selector, None).await?;
    let values = params::resolve(name, &document.content, given)?;
    let rendered = params::render(&document.content, &values)?;
    Ok(Prepared {
        document,
        values,
        rendered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_document_parses() {
        let b = built_in(DOCUMENT_RUN_SHELL_SCRIPT).expect("built in");
        assert_eq!(b.content.schema_version, "1.2");
        let names: Vec<&str> = b.content.params.iter().map(|p| p.name.as_str()).collect();
        // In the document's own order (serde_json keeps object order: cedar-policy turns on preserve_order).
        assert_eq!(names, ["commands", "workingDirectory", "executionTimeout"]);
        assert_eq!(b.content.steps.len(), 1);
        assert!(b.content.steps[0].runs());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("my-doc_1.x").is_ok());
        for bad in [
            "ab",
            "has space",
            "AWS-Mine",
            "aws-mine",
            "AmazonThing",
            "x/y",
        ] {
            match check_name(bad) {
                Err(Error::Invalid(e)) => assert_eq!(e.code, Code::Validation, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_content_is_refused_with_the_problem_named() {
        let code = |s: &str| content::parse(s).map(|_| ()).unwrap_err();
        let e = code("not json");
        assert_eq!(e.code, Code::InvalidDocumentContent);
        assert!(
            code(r#"{"schemaVersion":"0.3","mainSteps":[]}"#).code
                == Code::InvalidDocumentSchemaVersion
        );
        let e = code(
            r#"{"schemaVersion":"2.2","mainSteps":[{"action":"aws:runPowerShellScript","name":"p","inputs":{"runCommand":["x"]}}]}"#,
        );
        assert!(
            e.message.contains("aws:runPowerShellScript"),
            "{}",
            e.message
        );
        let e = code(
            r#"{"schemaVersion":"2.2","mainSteps":[{"action":"aws:runShellScript","name":"s","inputs":{"runCommand":["echo {{ nope }}"]}}]}"#,
        );
        assert!(e.message.contains("nope"), "{}", e.message);
        let e = code(
            r#"{"schemaVersion":"2.2","parameters":{"p":{"type":"Float"}},"mainSteps":[{"action":"aws:runShellScript","name":"s","inputs":{"runCommand":["x"]}}]}"#,
        );
        assert!(e.message.contains("Float"), "{}", e.message);
        let e = code(
            r#"{"schemaVersion":"2.2","parameters":{"p":{"type":"String","default":"x","allowedValues":["y"]}},"mainSteps":[{"action":"aws:runShellScript","name":"s","inputs":{"runCommand":["x"]}}]}"#,
        );
        assert!(e.message.contains("default"), "{}", e.message);
        let e = code(
            r#"{"schemaVersion":"2.2","mainSteps":[{"action":"aws:runShellScript","name":"s","inputs":{"runCommand":["x"]}},{"action":"aws:runShellScript","name":"s","inputs":{"runCommand":["y"]}}]}"#,
        );
        assert!(e.message.contains("more than once"), "{}", e.message);
        let e = code(
            r#"{"schemaVersion":"2.2","mainSteps":[{"action":"aws:runShellScript","name":"s","precondition":{"StringEquals":["platformType","Solaris"]},"inputs":{"runCommand":["x"]}}]}"#,
        );
        assert!(e.message.contains("precondition"), "{}", e.message);
        let e = code(
            r#"{"schemaVersion":"2.2","mainSteps":[{"action":"aws:runShellScript","name":"s","inputs":{"commands":["x"]}}]}"#,
        );
        assert!(e.message.contains("\"commands\""), "{}", e.message);
        let big = format!(
            r#"{{"schemaVersion":"2.2","description":"{}","mainSteps":[]}}"#,
            "x".repeat(70_000)
        );
        assert_eq!(code(&big).code, Code::MaxDocumentSizeExceeded);
    }

    #[test]
    fn yaml_documents_parse_convert_and_refuse_bombs() {
        let yaml = "schemaVersion: 2.2\ndescription: d\nmainSteps:\n  - action: aws:runShellScript\n    name: step\n    inputs:\n      runCommand: [echo hi]\n";
        let c = content::parse_as(yaml, Format::Yaml).unwrap();
        // Unquoted, the version reads as a number: it is taken as the string SSM means.
        assert_eq!(c.schema_version, "2.2");
        assert_eq!(Format::of(yaml), Format::Yaml);
        // Converted to JSON and back, the same document.
        let value = content::to_value(yaml, Format::Yaml).unwrap();
        let json = content::render(&value, Format::Json).unwrap();
        assert_eq!(Format::of(&json), Format::Json);
        assert_eq!(content::parse(&json).unwrap().steps[0].name, "step");
        let back = content::render(&value, Format::Yaml).unwrap();
        assert_eq!(content::to_value(&back, Format::Yaml).unwrap(), value);
        // YAML given as JSON is refused, naming the way out.
        let e = content::parse_as(yaml, Format::Json).unwrap_err();
        assert!(e.message.contains("DocumentFormat YAML"), "{}", e.message);
        // A billion laughs stops at the budget, quickly, with the reason named.
        let mut bomb = String::from("schemaVersion: '2.2'\na: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..9u8 {
            let (prev, this) = ((b'a' + i) as char, (b'b' + i) as char);
            let refs = vec![format!("*{prev}"); 10].join(", ");
            bomb.push_str(&format!("{this}: &{this} [{refs}]\n"));
        }
        bomb.push_str("mainSteps: []\n");
        let e = content::parse_as(&bomb, Format::Yaml).unwrap_err();
        assert_eq!(e.code, Code::InvalidDocumentContent);
        assert!(e.message.contains("not valid YAML"), "{}", e.message);
        // A key given twice is an error, not a silent choice.
        let dup = "schemaVersion: '2.2'\nschemaVersion: '2.0'\nmainSteps: []\n";
        let e = content::parse_as(dup, Format::Yaml).unwrap_err();
        assert!(e.message.contains("not valid YAML"), "{}", e.message);
        assert_eq!(
            Format::parse("TEXT").unwrap_err().code,
            Code::InvalidDocumentContent
        );
    }
}
