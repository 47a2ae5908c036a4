//! `fleetrun documents create|list|show|update|set-default|delete`: Command documents (SSM schema
//! 1.2, 2.0 or 2.2, JSON or YAML) and their numbered versions, for `fleetrun send --document`.

use super::Ctx;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use fleetrun_proto::api::{CreateDocument, Document, SetDefaultVersion, UpdateDocument};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Create a document (version 1) from a JSON or YAML file
    Create(CreateArgs),
    /// List documents at their default versions
    List,
    /// Print a version's content (the default version unless --version); -o json adds its facts
    // `--version` names a document version here, not fleetrun's.
    #[command(disable_version_flag = true)]
    Show(ShowArgs),
    /// Add a version from a JSON or YAML file (it becomes the latest, not the default)
    #[command(disable_version_flag = true)]
    Update(UpdateArgs),
    /// Make a version the one sends use by default
    SetDefault(SetDefaultArgs),
    /// Delete a document with all its versions
    Delete(NameArg),
}

/// How a document file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DocFormat {
    /// JSON
    Json,
    /// YAML
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The document's name: 3 to 128 of a-z A-Z 0-9 _ - . (AWS-, amazon and amzn prefixes are reserved)
    #[arg(value_name = "NAME")]
    name: String,
    /// The document's JSON or YAML (`-` for stdin)
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// How the file is written [default: by its extension (.yaml, .yml), else JSON if it is JSON, else YAML]
    #[arg(long, value_name = "FORMAT")]
    document_format: Option<DocFormat>,
    /// A label for this version
    #[arg(long, value_name = "LABEL")]
    version_name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The document's name
    #[arg(value_name = "NAME")]
    name: String,
    /// Which version: a number, $LATEST or $DEFAULT [default: $DEFAULT]
    #[arg(long, value_name = "N|$LATEST|$DEFAULT")]
    version: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    /// The document's name
    #[arg(value_name = "NAME")]
    name: String,
    /// The new version's JSON or YAML (`-` for stdin)
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// How the file is written [default: by its extension (.yaml, .yml), else JSON if it is JSON, else YAML]
    #[arg(long, value_name = "FORMAT")]
    document_format: Option<DocFormat>,
    /// Refuse unless this is still the latest version: its number or $LATEST [default: $LATEST]
    #[arg(long, value_name = "N|$LATEST")]
    version: Option<String>,
    /// A label for the new version
    #[arg(long, value_name = "LABEL")]
    version_name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SetDefaultArgs {
    /// The document's name
    #[arg(value_name = "NAME")]
    name: String,
    /// The version number to make the default
    #[arg(value_name = "VERSION")]
    document_version: String,
}

#[derive(Debug, clap::Args)]
pub struct NameArg {
    /// The document's name
    #[arg(value_name = "NAME")]
    name: String,
}

pub async fn run(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Create(args) => create(ctx, args).await,
        Cmd::List => list(ctx).await,
        Cmd::Show(args) => show(ctx, args).await,
        Cmd::Update(args) => update(ctx, args).await,
        Cmd::SetDefault(args) => set_default(ctx, args).await,
        Cmd::Delete(args) => delete(ctx, args).await,
    }
}

async fn create(ctx: &Ctx, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let (content, format) = read_document(&args.file, args.document_format)?;
    let d = ctx
        .client()?
        .create_document(&CreateDocument {
            name: args.name,
            content: serde_json::Value::String(content),
            version_name: args.version_name,
            document_format: Some(format.into()),
        })
        .await?;
    print_version(ctx, &d)
}

async fn list(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let docs = ctx.client()?.documents().await?;
    if ctx.format == Format::Json {
        render::print_json(&docs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NAME",
        "OWNER",
        "DEFAULT",
        "LATEST",
        "SCHEMA",
        "PARAMETERS",
        "CREATED",
        "DESCRIPTION",
    ]);
    for d in &docs {
        t.add_row(vec![
            d.name.clone(),
            d.owner.clone(),
            d.default_version.clone(),
            d.latest_version.clone(),
            d.schema_version.clone(),
            render::or_dash(&parameters(d)),
            render::ago(&d.created_at),
            render::first_line(&d.description, 60),
        ]);
    }
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}

async fn show(ctx: &Ctx, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let d = ctx
        .client()?
        .document(&args.name, args.version.as_deref())
        .await?;
    if ctx.format == Format::Json {
        render::print_json(&d)?;
        return Ok(ExitCode::SUCCESS);
    }
    // The content alone, as stored: `fleetrun documents show NAME > doc.json` gives a file to update.
    let Some(content) = d.content else {
        bail!("the server sent document {} without its content", d.name);
    };
    render::emit(&content)?;
    if !content.ends_with('\n') {
        render::emit("\n")?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn update(ctx: &Ctx, args: UpdateArgs) -> anyhow::Result<ExitCode> {
    let (content, format) = read_document(&args.file, args.document_format)?;
    let d = ctx
        .client()?
        .update_document(
            &args.name,
            &UpdateDocument {
                content: serde_json::Value::String(content),
                document_version: args.version,
                version_name: args.version_name,
                document_format: Some(format.into()),
            },
        )
        .await?;
    print_version(ctx, &d)
}

async fn set_default(ctx: &Ctx, args: SetDefaultArgs) -> anyhow::Result<ExitCode> {
    let d = ctx
        .client()?
        .set_default_document_version(
            &args.name,
            &SetDefaultVersion {
                document_version: args.document_version,
            },
        )
        .await?;
    print_version(ctx, &d)
}

async fn delete(ctx: &Ctx, args: NameArg) -> anyhow::Result<ExitCode> {
    ctx.client()?.delete_document(&args.name).await?;
    // The API answers 204 with no body; scripts have the exit status.
    if ctx.format == Format::Table {
        render::emit(&format!("document {} deleted\n", args.name))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One document version as a table row, or the Document body with `-o json`.
fn print_version(ctx: &Ctx, d: &Document) -> anyhow::Result<ExitCode> {
    if ctx.format == Format::Json {
        render::print_json(d)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = render::table(&[
        "NAME",
        "VERSION",
        "VERSION NAME",
        "DEFAULT",
        "LATEST",
        "SCHEMA",
        "PARAMETERS",
    ]);
    t.add_row(vec![
        d.name.clone(),
        d.document_version.clone(),
        render::or_dash(d.version_name.as_deref().unwrap_or("")),
        d.default_version.clone(),
        d.latest_version.clone(),
        d.schema_version.clone(),
        render::or_dash(&parameters(d)),
    ]);
    render::print_table(&t)?;
    Ok(ExitCode::SUCCESS)
}

/// The parameters' names, optional ones (those with a default) marked `?`: `names,greeting?`.
fn parameters(d: &Document) -> String {
    let names: Vec<String> = d
        .parameters
        .iter()
        .map(|p| match p.default_value {
            Some(_) => format!("{}?", p.name),
            None => p.name.clone(),
        })
        .collect();
    names.join(",")
}

/// The most a document file may hold before it is sent (the server's limit is 64 KB; this only
/// keeps a wrong file from being read whole).
const DOCUMENT_FILE_MAX: u64 = 1 << 20;

/// A document file (`-` is stdin) and its format: UTF-8, sent as the text it is so its hash is the
/// file's. The format is `given`, else the extension's, else JSON when the text is JSON, else YAML
/// (the server checks YAML; a JSON syntax error costs one line and no request).
fn read_document(path: &Path, given: Option<DocFormat>) -> anyhow::Result<(String, &'static str)> {
    let mut bytes = Vec::new();
    let what = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(DOCUMENT_FILE_MAX + 1)
            .read_to_end(&mut bytes)
            .context("cannot read the document from stdin")?;
        "the document on stdin".to_owned()
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(DOCUMENT_FILE_MAX + 1).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read document file {}", path.display()))?;
        format!("document file {}", path.display())
    };
    if bytes.len() as u64 > DOCUMENT_FILE_MAX {
        bail!("{what} is over {DOCUMENT_FILE_MAX} bytes; a document holds at most 64 KB");
    }
    let text = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{what} is not UTF-8"))?;
    let by_extension = match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => Some(DocFormat::Yaml),
        Some("json") => Some(DocFormat::Json),
        _ => None,
    };
    let is_json = serde_json::from_str::<serde::de::IgnoredAny>(&text);
    let format = given.or(by_extension).unwrap_or(if is_json.is_ok() {
        DocFormat::Json
    } else {
        DocFormat::Yaml
    });
    if format == DocFormat::Json
        && let Err(e) = is_json
    {
        bail!("{what} is not JSON: {e} (a YAML document takes --document-format yaml)");
    }
    Ok((
        text,
        match format {
            DocFormat::Json => "JSON",
            DocFormat::Yaml => "YAML",
        },
    ))
}
