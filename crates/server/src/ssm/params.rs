//! PutParameter, GetParameter, GetParameters, GetParametersByPath, DeleteParameter,
//! DeleteParameters, DescribeParameters, GetParameterHistory: SSM's Parameter Store on fleetrun's
//! one parameter store (`run/params.rs` puts, the store keeps rows and versions), so a value put
//! here is the one `{{ssm:NAME}}`, `{{ssm-secure:NAME}}` and `{{param:NAME}}` resolve to.
//!
//! Reading names and metadata is the `list` action, as on the native API; putting and deleting is
//! `manage-params`. A SecureString's value comes back in clear only `WithDecryption` and only to a
//! principal allowed `use-param` on it (who may have it substituted into what it runs, and so print
//! it); otherwise its sealed bytes come back, base64-encoded, as SSM answers with its ciphertext.

use super::shapes::*;
use super::{SsmError, SsmResult, check_max_results, epoch, required};
use crate::AppState;
use crate::access::authz::{Action, Principal, Resource};
use crate::errors::Code;
use crate::run::params::{self, ParamType, PutRequest};
use fleetrun_proto::params::name_error;
use fleetrun_store::{PARAMS_MAX, ParamRow, StoredValue};
use serde_json::{Value, json};
use std::sync::Arc;

/// The one KMS key id fleetrun answers for SecureString values (SSM's default key): they are
/// sealed with the server's secrets key.
const KEY_ID: &str = "alias/aws/ssm";
/// Most levels in a parameter name (SSM's).
const HIERARCHY_MAX: usize = 15;
/// Most names in GetParameters and DeleteParameters (SSM's).
const NAMES_MAX: usize = 10;
/// Most filters in one request (SSM's).
const FILTERS_MAX: usize = 10;
/// Most values of one filter (SSM's model) and their longest (SSM's).
const FILTER_VALUES_MAX: usize = 50;
const FILTER_VALUE_LEN_MAX: usize = 1024;
/// Rows read from the store per step of a filtered listing.
const SCAN_BATCH: i64 = 200;

fn validation(message: String) -> SsmError {
    SsmError::new(
        Code::Validation,
        format!("1 validation error detected: {message}"),
    )
}

/// A name as stored: checked against fleetrun's (and SSM's) name rules.
fn checked_name(name: &str, member: &str) -> Result<(), SsmError> {
    if name.chars().count() > 2048 {
        return Err(validation(format!(
            "Value at '{member}' failed to satisfy constraint: Member must have length less than or equal to 2048"
        )));
    }
    match name_error(name) {
        Some(e) => Err(SsmError::new(Code::InvalidParameterName, e)),
        None => Ok(()),
    }
}

/// A name as PutParameter takes it: also SSM's rules for new names (no `aws`/`ssm` prefix, a
/// hierarchy starts with `/`, at most 15 levels).
fn checked_new_name(name: &str) -> Result<(), SsmError> {
    checked_name(name, "name")?;
    let bare = name.trim_start_matches('/').to_ascii_lowercase();
    if bare.starts_with("aws") || bare.starts_with("ssm") {
        return Err(SsmError::new(
            Code::Validation,
            "Parameter name: can't be prefixed with \"aws\" or \"ssm\" (case-insensitive).",
        ));
    }
    if name.contains('/') && !name.starts_with('/') {
        return Err(SsmError::new(
            Code::Validation,
            format!(
                "Parameter name {name} is not valid: a name with a hierarchy must begin with a forward slash (/)."
            ),
        ));
    }
    let levels = name.trim_start_matches('/').split('/').count();
    if levels > HIERARCHY_MAX {
        return Err(SsmError::new(
            Code::HierarchyLevelLimitExceeded,
            format!("Parameter name {name} has {levels} levels; the most is {HIERARCHY_MAX}."),
        ));
    }
    Ok(())
}

/// A name as the Get operations take it: `NAME`, `NAME:VERSION` or the ARN form
/// (`arn:...:parameter/NAME`); the version when one is selected.
fn parse_selector(given: &str) -> Result<(String, Option<(i64, String)>), SsmError> {
    let mut name = given;
    if let Some(rest) = given.strip_prefix("arn:")
        && let Some(at) = rest.find(":parameter/")
    {
        name = &rest[at + ":parameter".len()..];
        // arn:...:parameter/x names `x`; arn:...:parameter/a/b names `/a/b`.
        if name.matches('/').count() == 1 {
            name = &name[1..];
        }
    }
    let (name, selector) = match name.rsplit_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (name, None),
    };
    checked_name(name, "name")?;
    let version = match selector {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(v) if v >= 1 => Some((v, format!(":{s}"))),
            _ => {
                return Err(SsmError::new(
                    Code::ParameterVersionNotFound,
                    format!(
                        "Systems Manager could not find version {s} of {name}: fleetrun selects versions by number (it keeps no labels)."
                    ),
                ));
            }
        },
    };
    Ok((name.to_owned(), version))
}

fn not_found(name: &str) -> SsmError {
    SsmError::new(
        Code::ParameterNotFound,
        format!("Parameter {name} not found."),
    )
}

/// Standard base64 (with padding) of sealed bytes: what a SecureString shows without decryption.
fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The value a caller sees: plain ones as they are; a secure one in clear when `decrypt` (the
/// caller was allowed `use-param` on it), else its sealed bytes.
fn shown_value(state: &AppState, row: &ParamRow, decrypt: bool) -> Result<String, SsmError> {
    match &row.value {
        StoredValue::Plain(v) => Ok(v.clone()),
        StoredValue::Sealed(nonce, sealed) if !decrypt => {
            Ok(base64(&[nonce.as_slice(), sealed.as_slice()].concat()))
        }
        StoredValue::Sealed(..) => params::open(&state.secret_box, row).ok_or_else(|| {
            SsmError::new(
                Code::InvalidKeyId,
                format!(
                    "The value of {} cannot be decrypted with the server's secrets key (the key changed since it was put).",
                    row.name
                ),
            )
        }),
    }
}

/// Asks `use-param` for every secure row a decrypting read would show in clear; refuses the whole
/// request when one is not allowed.
fn authorize_decryption(
    state: &AppState,
    p: &Principal,
    rows: &[&ParamRow],
    decrypt: bool,
) -> Result<(), SsmError> {
    if !decrypt {
        return Ok(());
    }
    for row in rows {
        if matches!(row.value, StoredValue::Sealed(..)) {
            state
                .authz
                .require(p, Action::UseParam, Resource::Parameter(&row.name))?;
        }
    }
    Ok(())
}

/// A `Parameter` of the Get operations.
fn parameter(
    state: &AppState,
    row: &ParamRow,
    decrypt: bool,
    selector: Option<&str>,
) -> Result<Value, SsmError> {
    let mut v = json!({
        "Name": row.name,
        "Type": ParamType::of(row).as_str(),
        "Value": shown_value(state, row, decrypt)?,
        "Version": row.version,
        "LastModifiedDate": epoch(row.updated_at),
        "DataType": "text",
    });
    if let Some(s) = selector {
        v["Selector"] = json!(s);
    }
    Ok(v)
}

/// What DescribeParameters and GetParameterHistory say of a row beside its value.
fn metadata(row: &ParamRow) -> Value {
    let ty = ParamType::of(row);
    let mut v = json!({
        "Name": row.name,
        "Type": ty.as_str(),
        "LastModifiedDate": epoch(row.updated_at),
        "LastModifiedUser": row.updated_by,
        "Version": row.version,
        "Tier": "Standard",
        "Policies": [],
        "DataType": "text",
    });
    if ty == ParamType::SecureString {
        v["KeyId"] = json!(KEY_ID);
    }
    if !row.description.is_empty() {
        v["Description"] = json!(row.description);
    }
    if !row.allowed_pattern.is_empty() {
        v["AllowedPattern"] = json!(row.allowed_pattern);
    }
    v
}

fn unsupported(member: &str, why: &str) -> SsmError {
    SsmError::new(
        Code::Validation,
        format!("{member} is not supported by fleetrun: {why}"),
    )
}

pub async fn put_parameter(
    state: &Arc<AppState>,
    p: &Principal,
    req: PutParameterRequest,
) -> SsmResult {
    state
        .authz
        .require(p, Action::ManageParams, Resource::Fleet)?;
    let name = required(req.name, "name")?;
    let value = required(req.value, "value")?;
    checked_new_name(&name)?;
    let ty = match req.r#type.as_deref() {
        None => None,
        Some("String") => Some(ParamType::String),
        Some("StringList") => Some(ParamType::StringList),
        Some("SecureString") => Some(ParamType::SecureString),
        Some(other) => {
            return Err(validation(format!(
                "Value '{other}' at 'type' failed to satisfy constraint: Member must satisfy enum value set: [SecureString, StringList, String]"
            )));
        }
    };
    match req.tier.as_deref() {
        None | Some("Standard") | Some("Intelligent-Tiering") => {}
        Some("Advanced") => {
            return Err(unsupported(
                "Tier Advanced",
                "parameters are standard tier (values up to 4 KB).",
            ));
        }
        Some(other) => {
            return Err(validation(format!(
                "Value '{other}' at 'tier' failed to satisfy constraint: Member must satisfy enum value set: [Standard, Advanced, Intelligent-Tiering]"
            )));
        }
    }
    if req.policies.is_some() {
        return Err(unsupported("Policies", "parameters do not expire."));
    }
    let tags = super::tags::tags_given(req.tags)?;
    if !tags.is_empty() && req.overwrite == Some(true) {
        return Err(validation(
            "Invalid request: tags and overwrite can't be used together. To create a parameter with tags, please remove overwrite flag. To update tags for an existing parameter, please use AddTagsToResource or RemoveTagsFromResource.".into(),
        ));
    }
    match req.data_type.as_deref() {
        None | Some("text") => {}
        Some(other) => {
            return Err(unsupported(
                &format!("DataType {other}"),
                "parameters are text.",
            ));
        }
    }
    let overwrite = req.overwrite.unwrap_or(false);
    // Without Type, an overwrite keeps the parameter's type; a new parameter needs one.
    let ty = match ty {
        Some(t) => t,
        None => match state.store.get_param(&name).await? {
            Some(row) if overwrite => ParamType::of(&row),
            Some(_) => {
                return Err(SsmError::new(
                    Code::ParameterAlreadyExists,
                    format!(
                        "The parameter {name} already exists; to replace its value, overwrite it"
                    ),
                ));
            }
            None => {
                return Err(SsmError::new(
                    Code::Validation,
                    "A parameter type is required when you create a parameter.",
                ));
            }
        },
    };
    if let Some(k) = &req.key_id {
        if ty != ParamType::SecureString {
            return Err(SsmError::new(
                Code::Validation,
                "KeyId is required for SecureString type parameter only.",
            ));
        }
        if k != KEY_ID {
            return Err(SsmError::new(
                Code::InvalidKeyId,
                format!(
                    "KeyId {k} is not valid: fleetrun seals SecureString values with its own key; give {KEY_ID} or leave KeyId out."
                ),
            ));
        }
    }
    let put = PutRequest {
        name: &name,
        value: &value,
        ty,
        description: req.description.as_deref(),
        allowed_pattern: req.allowed_pattern.as_deref(),
        overwrite,
        tags: &tags,
    };
    let stored = params::put(state, p.name(), put).await?;
    Ok(json!({ "Version": stored.version, "Tier": "Standard" }))
}

/// A row of `name` at the selected version (the current one when none is).
async fn load(
    state: &AppState,
    name: &str,
    version: Option<i64>,
) -> Result<Option<ParamRow>, SsmError> {
    let Some(current) = state.store.get_param(name).await? else {
        return Ok(None);
    };
    match version {
        None => Ok(Some(current)),
        Some(v) if v == current.version => Ok(Some(current)),
        Some(v) => match state.store.get_param_version(name, v).await? {
            Some(row) => Ok(Some(row)),
            None => Err(SsmError::new(
                Code::ParameterVersionNotFound,
                format!("Systems Manager could not find version {v} of {name}."),
            )),
        },
    }
}

pub async fn get_parameter(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetParameterRequest,
) -> SsmResult {
    state.authz.require(p, Action::List, Resource::Fleet)?;
    let given = required(req.name, "name")?;
    let (name, selector) = parse_selector(&given)?;
    let decrypt = req.with_decryption.unwrap_or(false);
    let row = load(state, &name, selector.as_ref().map(|s| s.0))
        .await?
        .ok_or_else(|| not_found(&given))?;
    authorize_decryption(state, p, &[&row], decrypt)?;
    let sel = selector.as_ref().map(|s| s.1.as_str());
    Ok(json!({ "Parameter": parameter(state, &row, decrypt, sel)? }))
}

fn check_names(names: &[String], member: &str) -> Result<(), SsmError> {
    if names.is_empty() || names.len() > NAMES_MAX {
        return Err(validation(format!(
            "Value at '{member}' failed to satisfy constraint: Member must have length between 1 and {NAMES_MAX} (it has {})",
            names.len()
        )));
    }
    Ok(())
}

pub async fn get_parameters(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetParametersRequest,
) -> SsmResult {
    state.authz.require(p, Action::List, Resource::Fleet)?;
    let names = required(req.names, "names")?;
    check_names(&names, "names")?;
    let decrypt = req.with_decryption.unwrap_or(false);
    let mut found: Vec<(ParamRow, Option<String>)> = Vec::new();
    let mut invalid: Vec<String> = Vec::new();
    let mut seen: Vec<&str> = Vec::with_capacity(names.len());
    for given in &names {
        if seen.contains(&given.as_str()) {
            continue;
        }
        seen.push(given);
        let row = match parse_selector(given) {
            Ok((name, sel)) => match load(state, &name, sel.as_ref().map(|s| s.0)).await {
                Ok(Some(row)) => Some((row, sel.map(|s| s.1))),
                Ok(None) => None,
                Err(e) if e.error.code == Code::ParameterVersionNotFound => None,
                Err(e) => return Err(e),
            },
            Err(_) => None,
        };
        match row {
            Some(r) => found.push(r),
            None => invalid.push(given.clone()),
        }
    }
    let rows: Vec<&ParamRow> = found.iter().map(|(r, _)| r).collect();
    authorize_decryption(state, p, &rows, decrypt)?;
    let parameters = found
        .iter()
        .map(|(r, s)| parameter(state, r, decrypt, s.as_deref()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = json!({ "Parameters": parameters });
    if !invalid.is_empty() {
        out["InvalidParameters"] = json!(invalid);
    }
    Ok(out)
}

/// A checked `ParameterStringFilter`.
struct Filter {
    key: String,
    option: String,
    values: Vec<String>,
}

/// Which filter keys an operation takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listing {
    ByPath,
    Describe,
}

fn check_filters(
    filters: Vec<ParameterStringFilter>,
    listing: Listing,
) -> Result<Vec<Filter>, SsmError> {
    if filters.len() > FILTERS_MAX {
        return Err(validation(format!(
            "Value at 'parameterFilters' failed to satisfy constraint: Member must have length less than or equal to {FILTERS_MAX}"
        )));
    }
    let mut out = Vec::with_capacity(filters.len());
    for f in filters {
        let key = f.key;
        if key.is_empty() || key.chars().count() > 132 || key.chars().any(char::is_control) {
            return Err(validation(
                "Value at 'parameterFilters.member.key' failed to satisfy constraint: Member must have length between 1 and 132".into(),
            ));
        }
        let values = f.values.unwrap_or_default();
        if values.len() > FILTER_VALUES_MAX
            || values
                .iter()
                .any(|v| v.is_empty() || v.chars().count() > FILTER_VALUE_LEN_MAX)
        {
            return Err(SsmError::new(
                Code::InvalidFilterValue,
                format!(
                    "The filter {key} takes 1 to {FILTER_VALUES_MAX} values of 1 to {FILTER_VALUE_LEN_MAX} characters."
                ),
            ));
        }
        let tag = key.starts_with("tag:");
        let options: &[&str] = match key.as_str() {
            "Name" if listing == Listing::Describe => &["Equals", "BeginsWith", "Contains"],
            "Path" if listing == Listing::Describe => &["Recursive", "OneLevel"],
            "Type" | "KeyId" | "Tier" | "DataType" => &["Equals"],
            "Label" if listing == Listing::ByPath => &["Equals"],
            _ if tag => &["Equals"],
            other => {
                return Err(SsmError::new(
                    Code::InvalidFilterKey,
                    format!(
                        "The filter key {other} is not valid here{}.",
                        if listing == Listing::ByPath {
                            ": GetParametersByPath takes Type, KeyId, Label, Tier, DataType and tag:KEY"
                        } else {
                            ": DescribeParameters takes Name, Path, Type, KeyId, Tier, DataType and tag:KEY"
                        }
                    ),
                ));
            }
        };
        let option = f
            .option
            .unwrap_or_else(|| if key == "Path" { "OneLevel" } else { "Equals" }.to_owned());
        if !options.contains(&option.as_str()) {
            return Err(SsmError::new(
                Code::InvalidFilterOption,
                format!(
                    "The filter option {option} is not valid for key {key}: use one of {}.",
                    options.join(", ")
                ),
            ));
        }
        if values.is_empty() && !tag {
            return Err(SsmError::new(
                Code::InvalidFilterValue,
                format!("The filter {key} needs at least one value."),
            ));
        }
        if key == "Type"
            && let Some(v) = values
                .iter()
                .find(|v| !["String", "StringList", "SecureString"].contains(&v.as_str()))
        {
            return Err(SsmError::new(
                Code::InvalidFilterValue,
                format!(
                    "The filter value {v} is not valid for key Type: use String, StringList or SecureString."
                ),
            ));
        }
        if key == "Path"
            && let Some(v) = values.iter().find(|v| !v.starts_with('/'))
        {
            return Err(SsmError::new(
                Code::InvalidFilterValue,
                format!(
                    "The filter value {v} is not valid for key Path: a path begins with a forward slash (/)."
                ),
            ));
        }
        out.push(Filter {
            key,
            option,
            values,
        });
    }
    Ok(out)
}

/// Whether `name` is under `path` (`/a` or `/a/`): anywhere below it when recursive, else directly.
fn under(name: &str, path: &str, recursive: bool) -> bool {
    let prefix = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    match name.strip_prefix(&prefix) {
        Some(rest) => !rest.is_empty() && (recursive || !rest.contains('/')),
        None => false,
    }
}

fn filter_matches(row: &ParamRow, f: &Filter) -> bool {
    let ty = ParamType::of(row);
    let any = |pred: &dyn Fn(&str) -> bool| f.values.iter().any(|v| pred(v));
    match f.key.as_str() {
        "Name" => any(&|v| match f.option.as_str() {
            "BeginsWith" => row.name.starts_with(v),
            "Contains" => row.name.contains(v),
            _ => row.name == v,
        }),
        "Path" => any(&|v| under(&row.name, v, f.option == "Recursive")),
        "Type" => any(&|v| v == ty.as_str()),
        "KeyId" => ty == ParamType::SecureString && any(&|v| v == KEY_ID),
        "Tier" => any(&|v| v == "Standard"),
        "DataType" => any(&|v| v == "text"),
        // tag:KEY: the key with one of the values (any value when none is given).
        k if k.starts_with("tag:") => row
            .tags
            .get(&k["tag:".len()..])
            .is_some_and(|v| f.values.is_empty() || f.values.contains(v)),
        // No labels on parameters: such filters match none.
        _ => false,
    }
}

/// A page token over names: the last name a page held.
fn name_token(name: &str) -> Value {
    json!(format!("frp.{}", hex::encode(name)))
}

fn parse_name_token(token: Option<&str>) -> Result<String, SsmError> {
    let Some(t) = token else {
        return Ok(String::new());
    };
    let bad = || SsmError::new(Code::InvalidNextToken, "The specified token is not valid.");
    let name = t
        .strip_prefix("frp.")
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(bad)?;
    if name_error(&name).is_some() {
        return Err(bad());
    }
    Ok(name)
}

/// One page of the rows under `prefix` (by name, after the token) that `keep` keeps, and the token
/// of the next page when there is more. Reads the store in batches, so a page costs at most a
/// scan of the store's (bounded) rows.
async fn page(
    state: &AppState,
    prefix: &str,
    token: Option<&str>,
    limit: u32,
    keep: impl Fn(&ParamRow) -> bool,
) -> Result<(Vec<ParamRow>, Option<Value>), SsmError> {
    let mut after = parse_name_token(token)?;
    let mut out = Vec::new();
    let mut read = 0;
    loop {
        let batch = state.store.params_page(prefix, &after, SCAN_BATCH).await?;
        let done = (batch.len() as i64) < SCAN_BATCH;
        read += batch.len() as i64;
        for row in batch {
            after.clone_from(&row.name);
            if keep(&row) {
                if out.len() == limit as usize {
                    let token = out.last().map(|r: &ParamRow| name_token(&r.name));
                    return Ok((out, token));
                }
                out.push(row);
            }
        }
        if done || read > PARAMS_MAX {
            return Ok((out, None));
        }
    }
}

pub async fn get_parameters_by_path(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetParametersByPathRequest,
) -> SsmResult {
    state.authz.require(p, Action::List, Resource::Fleet)?;
    let path = required(req.path, "path")?;
    if path.chars().count() > 2048 {
        return Err(validation(
            "Value at 'path' failed to satisfy constraint: Member must have length less than or equal to 2048".into(),
        ));
    }
    if !path.starts_with('/') || (path != "/" && name_error(path.trim_end_matches('/')).is_some()) {
        return Err(SsmError::new(
            Code::Validation,
            format!(
                "The parameter path {path} is not valid: a path begins with a forward slash (/) and holds letters, digits and _ . - /."
            ),
        ));
    }
    let limit = check_max_results(req.max_results, 1, 10, 10)?;
    let filters = check_filters(req.parameter_filters.unwrap_or_default(), Listing::ByPath)?;
    let recursive = req.recursive.unwrap_or(false);
    let decrypt = req.with_decryption.unwrap_or(false);
    let (rows, token) = page(state, &path, req.next_token.as_deref(), limit, |row| {
        under(&row.name, &path, recursive) && filters.iter().all(|f| filter_matches(row, f))
    })
    .await?;
    let refs: Vec<&ParamRow> = rows.iter().collect();
    authorize_decryption(state, p, &refs, decrypt)?;
    let parameters = rows
        .iter()
        .map(|r| parameter(state, r, decrypt, None))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = json!({ "Parameters": parameters });
    if let Some(t) = token {
        out["NextToken"] = t;
    }
    Ok(out)
}

pub async fn describe_parameters(
    state: &Arc<AppState>,
    p: &Principal,
    req: DescribeParametersRequest,
) -> SsmResult {
    state.authz.require(p, Action::List, Resource::Fleet)?;
    if req.shared.unwrap_or(false) {
        return Err(unsupported(
            "Shared",
            "parameters are not shared between accounts.",
        ));
    }
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let mut filters = check_filters(req.parameter_filters.unwrap_or_default(), Listing::Describe)?;
    // The older Filters: Name (names that begin with a value), Type, KeyId.
    let legacy = req.filters.unwrap_or_default();
    if !legacy.is_empty() && !filters.is_empty() {
        return Err(SsmError::new(
            Code::InvalidFilter,
            "Give Filters or ParameterFilters, not both.",
        ));
    }
    for f in legacy {
        let as_new = ParameterStringFilter {
            option: Some(
                if f.key == "Name" {
                    "BeginsWith"
                } else {
                    "Equals"
                }
                .into(),
            ),
            key: f.key.clone(),
            values: Some(f.values),
        };
        if !["Name", "Type", "KeyId"].contains(&f.key.as_str()) {
            return Err(SsmError::new(
                Code::InvalidFilterKey,
                format!(
                    "The filter key {} is not valid: use Name, Type or KeyId.",
                    f.key
                ),
            ));
        }
        filters.extend(check_filters(vec![as_new], Listing::Describe)?);
    }
    let (rows, token) = page(state, "", req.next_token.as_deref(), limit, |row| {
        filters.iter().all(|f| filter_matches(row, f))
    })
    .await?;
    let mut out = json!({ "Parameters": rows.iter().map(metadata).collect::<Vec<_>>() });
    if let Some(t) = token {
        out["NextToken"] = t;
    }
    Ok(out)
}

pub async fn get_parameter_history(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetParameterHistoryRequest,
) -> SsmResult {
    state.authz.require(p, Action::List, Resource::Fleet)?;
    let name = required(req.name, "name")?;
    checked_name(&name, "name")?;
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let decrypt = req.with_decryption.unwrap_or(false);
    let after = match req.next_token.as_deref() {
        None => 0,
        Some(t) => t
            .strip_prefix("frv.")
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|v| *v >= 0)
            .ok_or_else(|| {
                SsmError::new(Code::InvalidNextToken, "The specified token is not valid.")
            })?,
    };
    if state.store.get_param(&name).await?.is_none() {
        return Err(not_found(&name));
    }
    let mut rows = state
        .store
        .param_versions(&name, after, i64::from(limit) + 1)
        .await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let refs: Vec<&ParamRow> = rows.iter().collect();
    authorize_decryption(state, p, &refs, decrypt)?;
    let mut history = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut v = metadata(row);
        v["Value"] = json!(shown_value(state, row, decrypt)?);
        history.push(v);
    }
    let mut out = json!({ "Parameters": history });
    if more && let Some(last) = rows.last() {
        out["NextToken"] = json!(format!("frv.{}", last.version));
    }
    Ok(out)
}

pub async fn delete_parameter(
    state: &Arc<AppState>,
    p: &Principal,
    req: DeleteParameterRequest,
) -> SsmResult {
    state
        .authz
        .require(p, Action::ManageParams, Resource::Fleet)?;
    let name = required(req.name, "name")?;
    checked_name(&name, "name")?;
    if state.store.delete_param(&name).await? {
        Ok(json!({}))
    } else {
        Err(not_found(&name))
    }
}

pub async fn delete_parameters(
    state: &Arc<AppState>,
    p: &Principal,
    req: DeleteParametersRequest,
) -> SsmResult {
    state
        .authz
        .require(p, Action::ManageParams, Resource::Fleet)?;
    let names = required(req.names, "names")?;
    check_names(&names, "names")?;
    let mut deleted = Vec::new();
    let mut invalid = Vec::new();
    for name in names {
        if deleted.contains(&name) || invalid.contains(&name) {
            continue;
        }
        if name_error(&name).is_none() && state.store.delete_param(&name).await? {
            deleted.push(name);
        } else {
            invalid.push(name);
        }
    }
    let mut out = json!({});
    if !deleted.is_empty() {
        out["DeletedParameters"] = json!(deleted);
    }
    if !invalid.is_empty() {
        out["InvalidParameters"] = json!(invalid);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_the_standard_says() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn paths_hold_their_children_one_level_or_all() {
        assert!(under("/a/b", "/a", false) && under("/a/b", "/a/", false));
        assert!(!under("/a/b/c", "/a", false) && under("/a/b/c", "/a", true));
        assert!(!under("/a", "/a", true) && !under("/ab/c", "/a", true));
        assert!(under("/x", "/", false) && !under("x", "/", true));
    }

    #[test]
    fn selectors_name_a_version_or_are_refused() {
        assert_eq!(parse_selector("/a/b").unwrap(), ("/a/b".into(), None));
        assert_eq!(
            parse_selector("/a/b:3").unwrap(),
            ("/a/b".into(), Some((3, ":3".into())))
        );
        assert_eq!(
            parse_selector("arn:aws:ssm:eu-west-1:123456789012:parameter/a/b").unwrap(),
            ("/a/b".into(), None)
        );
        assert_eq!(
            parse_selector("arn:aws:ssm:eu-west-1:123456789012:parameter/top").unwrap(),
            ("top".into(), None)
        );
        let e = parse_selector("/a:prod").err().map(|e| e.error.code);
        assert_eq!(e, Some(Code::ParameterVersionNotFound));
        let e = parse_selector("/a:0").err().map(|e| e.error.code);
        assert_eq!(e, Some(Code::ParameterVersionNotFound));
    }
}
