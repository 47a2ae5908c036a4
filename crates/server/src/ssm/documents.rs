//! CreateDocument, GetDocument, DescribeDocument, ListDocuments, UpdateDocument, DeleteDocument,
//! UpdateDocumentDefaultVersion, ListDocumentVersions: Command documents in JSON or YAML (see
//! crate::run::document).

use super::shapes::*;
use super::tags::tag_list;
use super::{SsmError, SsmResult, check_max_results, epoch, next_token, parse_token, required};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::run::document::content::Format;
use crate::run::document::{self, Loaded, OWNER_AMAZON, default_text};
use serde_json::{Value, json};
use std::sync::Arc;

/// The declared format (JSON when none); TEXT is refused, naming what to do instead.
fn format(given: Option<&str>, code: Code) -> Result<Format, SsmError> {
    match given {
        None => Ok(Format::Json),
        Some(f) => Format::parse(f).map_err(|e| SsmError::new(code, e.message)),
    }
}

fn unsupported(member: &str, given: bool) -> Result<(), SsmError> {
    if given {
        return Err(SsmError::new(
            Code::Validation,
            format!("{member} is not supported by fleetrun."),
        ));
    }
    Ok(())
}

/// SSM's DocumentParameter types are String and StringList; other types show as the one they are
/// passed as.
fn ssm_param_type(ty: document::content::ParamType) -> &'static str {
    if ty.is_list() { "StringList" } else { "String" }
}

fn description(d: &Loaded) -> Value {
    let params: Vec<Value> = d
        .content
        .params
        .iter()
        .map(|p| {
            let mut v = json!({
                "Name": p.name,
                "Type": ssm_param_type(p.ty),
                "Description": p.description,
            });
            if let Some(def) = &p.default {
                v["DefaultValue"] = json!(default_text(def));
            }
            v
        })
        .collect();
    let mut v = json!({
        "Hash": d.version.hash,
        "HashType": "Sha256",
        "Name": d.row.name,
        "Owner": d.row.owner,
        "CreatedDate": epoch(d.row.created_at),
        "Status": "Active",
        "DocumentVersion": d.version.version.to_string(),
        "Description": d.content.description,
        "Parameters": params,
        "PlatformTypes": ["Linux"],
        "DocumentType": d.row.document_type,
        "SchemaVersion": d.version.schema_version,
        "LatestVersion": d.row.latest_version.to_string(),
        "DefaultVersion": d.row.default_version.to_string(),
        "DocumentFormat": d.format.as_str(),
        "Tags": tag_list(&d.row.tags),
    });
    if let Some(label) = &d.version.version_name {
        v["VersionName"] = json!(label);
    }
    v
}

fn identifier(d: &Loaded) -> Value {
    let mut v = json!({
        "Name": d.row.name,
        "CreatedDate": epoch(d.row.created_at),
        "Owner": d.row.owner,
        "PlatformTypes": ["Linux"],
        "DocumentVersion": d.version.version.to_string(),
        "DocumentType": d.row.document_type,
        "SchemaVersion": d.version.schema_version,
        "DocumentFormat": d.format.as_str(),
        "Tags": tag_list(&d.row.tags),
    });
    if let Some(label) = &d.version.version_name {
        v["VersionName"] = json!(label);
    }
    v
}

pub async fn create_document(
    state: &Arc<AppState>,
    p: &Principal,
    req: CreateDocumentRequest,
) -> SsmResult {
    let content = required(req.content, "content")?;
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::ManageDocuments, Resource::Document(&name))?;
    match req.document_type.as_deref() {
        None | Some("Command") => {}
        Some(t) => {
            return Err(SsmError::new(
                Code::InvalidDocumentContent,
                format!(
                    "DocumentType {t} is not supported by fleetrun: only Command documents run."
                ),
            ));
        }
    }
    let format = format(req.document_format.as_deref(), Code::InvalidDocumentContent)?;
    unsupported("Attachments", req.attachments.is_some())?;
    unsupported("Requires", req.requires.is_some())?;
    unsupported("TargetType", req.target_type.is_some())?;
    let tags = super::tags::tags_given(req.tags)?;
    unsupported("DisplayName", req.display_name.is_some())?;
    let d = document::create(
        &state.store,
        &name,
        &content,
        format,
        req.version_name.as_deref(),
        tags,
    )
    .await?;
    Ok(json!({ "DocumentDescription": description(&d) }))
}

pub async fn get_document(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetDocumentRequest,
) -> SsmResult {
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::List, Resource::Document(&name))?;
    let asked = req
        .document_format
        .as_deref()
        .map(|f| format(Some(f), Code::Validation))
        .transpose()?;
    let d = document::load(
        &state.store,
        &name,
        req.document_version.as_deref(),
        req.version_name.as_deref(),
    )
    .await?;
    let mut v = json!({
        "Name": d.row.name,
        "CreatedDate": epoch(d.version.created_at),
        "DocumentVersion": d.version.version.to_string(),
        "Status": "Active",
        "Content": document::content_as(&d, asked.unwrap_or(d.format))?,
        "DocumentType": d.row.document_type,
        "DocumentFormat": asked.unwrap_or(d.format).as_str(),
    });
    if let Some(label) = &d.version.version_name {
        v["VersionName"] = json!(label);
    }
    Ok(v)
}

pub async fn describe_document(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetDocumentRequest,
) -> SsmResult {
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::List, Resource::Document(&name))?;
    let d = document::load(
        &state.store,
        &name,
        req.document_version.as_deref(),
        req.version_name.as_deref(),
    )
    .await?;
    Ok(json!({ "Document": description(&d) }))
}

/// Whether a document's owner matches an `Owner` filter value.
fn owner_matches(d: &Loaded, value: &str) -> bool {
    let amazon = d.row.owner == OWNER_AMAZON;
    match value {
        "Self" | "Private" => !amazon,
        "Amazon" | "Public" => amazon,
        "All" => true,
        other => d.row.owner == other,
    }
}

fn filter_matches(d: &Loaded, key: &str, values: &[String]) -> Result<bool, SsmError> {
    let any = |f: &dyn Fn(&str) -> bool| values.iter().any(|v| f(v));
    Ok(match key {
        "Owner" => any(&|v| owner_matches(d, v)),
        "Name" => any(&|v| d.row.name.starts_with(v)),
        "DocumentType" => any(&|v| d.row.document_type == v),
        "PlatformTypes" => any(&|v| v == "Linux"),
        "SchemaVersion" => any(&|v| d.version.schema_version == v),
        // tag:KEY: the key with one of the values; tag-key: one of the keys.
        k if k.starts_with("tag:") => d
            .row
            .tags
            .get(&k["tag:".len()..])
            .is_some_and(|v| values.contains(v)),
        "tag-key" => any(&|v| d.row.tags.contains_key(v)),
        other => {
            return Err(SsmError::new(
                Code::InvalidFilterKey,
                format!("Filter key {other} is not valid."),
            ));
        }
    })
}

pub async fn list_documents(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListDocumentsRequest,
) -> SsmResult {
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let offset = parse_token(req.next_token.as_deref())?;
    if req.filters.as_ref().is_some_and(|f| f.len() > 6) {
        return Err(SsmError::new(
            Code::Validation,
            "1 validation error detected: Value at 'filters' failed to satisfy constraint: Member must have length less than or equal to 6",
        ));
    }
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for f in req.filters.unwrap_or_default() {
        let key = f.key.unwrap_or_default();
        if key.is_empty() {
            return Err(SsmError::new(
                Code::Validation,
                "1 validation error detected: Value at 'filters.member.key' failed to satisfy constraint: Member must have length greater than or equal to 1",
            ));
        }
        filters.push((key, f.values));
    }
    for f in req.document_filter_list.unwrap_or_default() {
        if !matches!(
            f.key.as_str(),
            "Name" | "Owner" | "PlatformTypes" | "DocumentType"
        ) {
            return Err(SsmError::new(
                Code::InvalidFilterKey,
                format!("Filter key {} is not valid.", f.key),
            ));
        }
        filters.push((f.key, vec![f.value]));
    }
    let mut matching = Vec::new();
    state.authz.filtered(p);
    for d in document::list(&state.store).await? {
        let mut keep = true;
        for (key, values) in &filters {
            keep &= filter_matches(&d, key, values)?;
        }
        keep &= state
            .authz
            .allowed(p, Action::List, Resource::Document(&d.row.name));
        if keep {
            matching.push(d);
        }
    }
    let page: Vec<Value> = matching
        .iter()
        .skip(offset as usize)
        .take(limit as usize)
        .map(identifier)
        .collect();
    let mut out = json!({ "DocumentIdentifiers": page });
    let token = next_token(offset, page.len(), limit);
    if !token.is_null() && (offset as usize + page.len()) < matching.len() {
        out["NextToken"] = token;
    }
    Ok(out)
}

/// Every version of a document, oldest first, a page at a time.
pub async fn list_document_versions(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListDocumentVersionsRequest,
) -> SsmResult {
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::List, Resource::Document(&name))?;
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let offset = parse_token(req.next_token.as_deref())?;
    // Through load: a missing document is SSM's InvalidDocument, a built-in one has one version.
    let latest = document::load(&state.store, &name, Some("$LATEST"), None).await?;
    let entry = |version: &fleetrun_store::VersionRow| {
        let mut v = json!({
            "Name": latest.row.name,
            "DocumentVersion": version.version.to_string(),
            "CreatedDate": epoch(version.created_at),
            "IsDefaultVersion": version.version == latest.row.default_version,
            "DocumentFormat": Format::of(&version.content).as_str(),
            "Status": "Active",
        });
        if let Some(label) = &version.version_name {
            v["VersionName"] = json!(label);
        }
        v
    };
    let page: Vec<Value> = if latest.built_in {
        std::iter::once(&latest.version)
            .filter(|_| offset == 0)
            .map(entry)
            .collect()
    } else {
        let after = i64::try_from(offset).unwrap_or(i64::MAX);
        state
            .store
            .document_versions(&name, after, i64::from(limit))
            .await?
            .iter()
            .map(entry)
            .collect()
    };
    let mut out = json!({ "DocumentVersions": page });
    let more = (offset + page.len() as u64) < u64::try_from(latest.row.latest_version).unwrap_or(0);
    let token = next_token(offset, page.len(), limit);
    if more && !token.is_null() {
        out["NextToken"] = token;
    }
    Ok(out)
}

pub async fn update_document(
    state: &Arc<AppState>,
    p: &Principal,
    req: UpdateDocumentRequest,
) -> SsmResult {
    let content = required(req.content, "content")?;
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::ManageDocuments, Resource::Document(&name))?;
    let format = format(req.document_format.as_deref(), Code::InvalidDocumentContent)?;
    unsupported("Attachments", req.attachments.is_some())?;
    unsupported("TargetType", req.target_type.is_some())?;
    unsupported("DisplayName", req.display_name.is_some())?;
    let d = document::update(
        &state.store,
        &name,
        &content,
        format,
        req.document_version.as_deref(),
        req.version_name.as_deref(),
    )
    .await?;
    Ok(json!({ "DocumentDescription": description(&d) }))
}

pub async fn delete_document(
    state: &Arc<AppState>,
    p: &Principal,
    req: DeleteDocumentRequest,
) -> SsmResult {
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::ManageDocuments, Resource::Document(&name))?;
    if req.document_version.is_some() || req.version_name.is_some() {
        return Err(SsmError::new(
            Code::InvalidDocumentOperation,
            "fleetrun deletes whole documents: leave out DocumentVersion and VersionName.",
        ));
    }
    let _ = req.force;
    document::delete(&state.store, &name).await?;
    Ok(json!({}))
}

pub async fn update_document_default_version(
    state: &Arc<AppState>,
    p: &Principal,
    req: UpdateDocumentDefaultVersionRequest,
) -> SsmResult {
    let name = required(req.name, "name")?;
    state
        .authz
        .require(p, Action::ManageDocuments, Resource::Document(&name))?;
    let version = required(req.document_version, "documentVersion")?;
    let d = document::set_default(&state.store, &name, &version).await?;
    let mut v = json!({
        "Name": d.row.name,
        "DefaultVersion": d.row.default_version.to_string(),
    });
    if let Some(label) = &d.version.version_name {
        v["DefaultVersionName"] = json!(label);
    }
    Ok(json!({ "Description": v }))
}
