//! SendCommand, ListCommands, ListCommandInvocations, GetCommandInvocation, CancelCommand.

use super::shapes::*;
use super::{
    SsmError, SsmResult, check_command_id, check_instance_id, check_max_results, epoch, next_token,
    parse_token,
};
use crate::AppState;
use crate::access::authz::{Action, Principal};
use crate::errors::Code;
use crate::objects::export;
use crate::run::send::{Idempotency, SendOptions};
use fleetrun_proto::api::{Command, Invocation, OutputS3, PLUGIN_RUN_SHELL_SCRIPT, SendCommand};
use fleetrun_proto::channel::Pipe;
use fleetrun_proto::limits::{INLINE_STDERR_MAX, INLINE_STDOUT_MAX};
use fleetrun_proto::targets::{TargetExpr, TargetTerm};
use fleetrun_proto::time::parse_rfc3339_ms;
use fleetrun_proto::{InvocationStatus, NodeId};
use fleetrun_store::{CommandMeta, CommandQuery};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;

/// SSM's cap on plugin `Output` (the agent's MaximumPluginOutputSize).
const PLUGIN_OUTPUT_MAX: usize = 2400;
/// What SSM appends to truncated output content.
const TRUNCATED: &str = "--output truncated--";

/// The header every AWS SDK sends with one value per operation call, the same across its retries of
/// that call (botocore: `amz-sdk-invocation-id`, a UUID).
const SDK_INVOCATION_ID: &str = "amz-sdk-invocation-id";

/// SendCommand's idempotency key. SSM's SendCommand has no ClientToken member, but SDKs retry it
/// on connection errors: a caller's explicit `Idempotency-Key` header (checked as on the native
/// API), else the SDK's `amz-sdk-invocation-id` (when usable as a key), makes such a retry answer
/// the command its first attempt made. The request hash is over the parsed JSON body.
pub fn idempotency(
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Result<Option<Idempotency>, SsmError> {
    use fleetrun_proto::limits::{IDEMPOTENCY_KEY_HEADER, check_idempotency_key};
    let explicit: Vec<_> = headers.get_all(IDEMPOTENCY_KEY_HEADER).iter().collect();
    let key = match explicit.as_slice() {
        [] => headers
            .get(SDK_INVOCATION_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|k| check_idempotency_key(k).is_ok())
            .map(|k| format!("ssm:sdk:{k}")),
        [one] => {
            let k = one.to_str().map_err(|_| {
                SsmError::new(
                    Code::Validation,
                    "Idempotency-Key must be visible ASCII characters (0x21 to 0x7E)",
                )
            })?;
            check_idempotency_key(k).map_err(|m| SsmError::new(Code::Validation, m))?;
            Some(format!("ssm:key:{k}"))
        }
        _ => {
            return Err(SsmError::new(
                Code::Validation,
                "Idempotency-Key is given more than once",
            ));
        }
    };
    Ok(key.map(|key| Idempotency {
        key,
        request_hash: crate::run::send::request_hash(
            &serde_json::from_slice::<Value>(body).unwrap_or(Value::Null),
        ),
    }))
}

pub async fn send_command(
    state: &Arc<AppState>,
    p: &Principal,
    req: SendCommandRequest,
    idempotency: Option<Idempotency>,
) -> SsmResult {
    let v = |m: String| SsmError::new(Code::Validation, m);
    let name = req.document_name.clone().ok_or_else(|| v("1 validation error detected: Value null at 'documentName' failed to satisfy constraint: Member must not be null".into()))?;
    let name_ok = (3..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
    if !name_ok {
        return Err(v(format!(
            "1 validation error detected: Value '{name}' at 'documentName' failed to satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_\\-.:/]{{3,128}}$"
        )));
    }
    let version = req
        .document_version
        .clone()
        .unwrap_or_else(|| "$DEFAULT".into());
    if let Some(t) = req.timeout_seconds
        && !(30..=2_592_000).contains(&t)
    {
        return Err(v(format!(
            "1 validation error detected: Value '{t}' at 'timeoutSeconds' failed to satisfy constraint: Member must have value between 30 and 2592000"
        )));
    }
    if let Some(c) = &req.comment
        && c.chars().count() > 100
    {
        return Err(v("1 validation error detected: Value at 'comment' failed to satisfy constraint: Member must have length less than or equal to 100".into()));
    }
    check_rate(
        &req.max_concurrency,
        "maxConcurrency",
        "^([1-9][0-9]*|[1-9][0-9]%|[1-9]%|100%)$",
        |s| fleetrun_proto::targets::Rate::parse_concurrency(s).is_ok(),
    )?;
    check_rate(
        &req.max_errors,
        "maxErrors",
        "^([1-9][0-9]*|[0]|[1-9][0-9]%|[0-9]%|100%)$",
        |s| fleetrun_proto::targets::Rate::parse_errors(s).is_ok(),
    )?;
    for (what, value, min, max) in [
        ("outputS3BucketName", &req.output_s3_bucket_name, 3, 63),
        ("outputS3Region", &req.output_s3_region, 3, 20),
        ("outputS3KeyPrefix", &req.output_s3_key_prefix, 0, 500),
    ] {
        if let Some(s) = value
            && !(min..=max).contains(&s.len())
        {
            return Err(v(format!(
                "1 validation error detected: Value '{s}' at '{what}' failed to satisfy constraint: Member must have length between {min} and {max}"
            )));
        }
    }

    // Targets: instance ids, or up to 5 target keys (ANDed).
    let instance_ids = req.instance_ids.clone().unwrap_or_default();
    let targets = req.targets.clone().unwrap_or_default();
    if instance_ids.len() > 50 {
        return Err(v("1 validation error detected: Value at 'instanceIds' failed to satisfy constraint: Member must have length less than or equal to 50".into()));
    }
    if targets.len() > 5 {
        return Err(v("1 validation error detected: Value at 'targets' failed to satisfy constraint: Member must have length less than or equal to 5".into()));
    }
    let mut node_ids = Vec::with_capacity(instance_ids.len());
    let mut seen = HashSet::new();
    for id in &instance_ids {
        if !seen.insert(id) {
            return Err(SsmError::new(
                Code::DuplicateNodeId,
                format!("Instance Id {id} is specified more than once."),
            ));
        }
        node_ids.push(check_instance_id(id)?);
    }
    let target_expr = match (instance_ids.is_empty(), targets.is_empty()) {
        (true, true) => return Err(v("InstanceIds or Targets must be specified.".into())),
        (false, false) => {
            return Err(v("InstanceIds and Targets cannot both be specified.".into()));
        }
        (false, true) => None,
        (true, false) => Some(targets_to_expr(&targets)?),
    };

    let extra = json!({
        "DocumentVersion": version,
        "Targets": targets,
        "TimeoutSeconds": req.timeout_seconds,
        "ServiceRole": req.service_role_arn,
        "NotificationConfig": req.notification_config,
        "CloudWatchOutputConfig": req.cloud_watch_output_config,
    });
    let send = SendCommand {
        node_ids,
        targets: None,
        document_name: Some(name),
        document_version: Some(version.clone()),
        parameters: req.parameters.clone().unwrap_or_default(),
        commands: Vec::new(),
        working_directory: None,
        execution_timeout_secs: None,
        delivery_timeout_secs: req.timeout_seconds.map(|t| t as u64),
        max_concurrency: req.max_concurrency.clone(),
        max_errors: req.max_errors.clone(),
        comment: req.comment.clone(),
        run_as: None,
        memory_limit_mb: None,
        cpu_limit_percent: None,
        // SSM ignores a prefix or region without a bucket.
        output_s3_bucket: req.output_s3_bucket_name.clone(),
        output_s3_prefix: req
            .output_s3_key_prefix
            .clone()
            .filter(|_| req.output_s3_bucket_name.is_some()),
        output_s3_region: req
            .output_s3_region
            .clone()
            .filter(|_| req.output_s3_bucket_name.is_some()),
    };
    let opts = SendOptions {
        target_expr,
        allow_no_targets: true,
        ssm_extra: Some(extra.clone()),
        idempotency,
        platform: None,
        script: None,
        script_files: Default::default(),
    };
    let cmd = crate::run::send::send_command(state, p, send, opts)
        .await
        .map(|sent| sent.command)
        .map_err(SsmError::from)?;
    Ok(json!({ "Command": ssm_command(&cmd, &extra) }))
}

fn check_rate(
    value: &Option<String>,
    member: &str,
    pattern: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<(), SsmError> {
    match value {
        Some(s) if s.is_empty() || s.len() > 7 || !ok(s) => Err(SsmError::new(
            Code::Validation,
            format!(
                "1 validation error detected: Value '{s}' at '{member}' failed to satisfy constraint: Member must satisfy regular expression pattern: {pattern}"
            ),
        )),
        _ => Ok(()),
    }
}

/// SSM `Targets` as a fleetrun target expression (terms ANDed, values of one key ORed).
fn targets_to_expr(targets: &[Target]) -> Result<TargetExpr, SsmError> {
    let bad = |m: String| SsmError::new(Code::InvalidParameters, m);
    let mut terms = Vec::new();
    for t in targets {
        let key = t.key.clone().unwrap_or_default();
        super::check_target_key(
            &key,
            "targets.member.key",
            &t.values,
            "targets.member.values",
        )?;
        if t.values.is_empty() {
            return Err(bad(format!("Target with key {key} has no values.")));
        }
        if t.values.len() > 50 {
            return Err(SsmError::new(
                Code::Validation,
                "1 validation error detected: Value at 'targets.member.values' failed to satisfy constraint: Member must have length less than or equal to 50",
            ));
        }
        if key == "InstanceIds" {
            if t.values.iter().any(|v| v == "*") {
                terms.push(TargetTerm::All);
            } else {
                let ids = t
                    .values
                    .iter()
                    .map(|v| check_instance_id(v))
                    .collect::<Result<Vec<NodeId>, _>>()?;
                terms.push(TargetTerm::Ids(ids));
            }
        } else if key == "tag-key" {
            terms.push(TargetTerm::TagKey(t.values.clone()));
        } else if let Some(k) = key.strip_prefix("tag:") {
            if k.is_empty() {
                return Err(bad("Target key tag: needs a tag name.".into()));
            }
            terms.push(TargetTerm::Tag {
                key: k.to_owned(),
                values: t.values.clone(),
            });
        } else {
            return Err(bad(format!(
                "Target key {key:?} is not supported: use InstanceIds, tag:<key> or tag-key."
            )));
        }
    }
    Ok(TargetExpr(terms))
}

/// A command as SSM shows it: every member present.
fn ssm_command(cmd: &Command, extra: &Value) -> Value {
    let requested = parse_rfc3339_ms(&cmd.requested_at);
    let timeout = extra
        .get("TimeoutSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(cmd.delivery_timeout_secs);
    let s3 = cmd
        .output_s3
        .clone()
        .unwrap_or_else(|| legacy_output_s3(extra));
    let mut parameters = cmd.parameters.clone();
    parameters.retain(|k, v| !(k == "workingDirectory" && v.iter().all(String::is_empty)));
    json!({
        "CommandId": cmd.command_id,
        "DocumentName": cmd.document_name,
        "DocumentVersion": str_or(extra, "DocumentVersion", "$DEFAULT"),
        "Comment": cmd.comment,
        "ExpiresAfter": epoch(requested + ((timeout + cmd.execution_timeout_secs) * 1000) as i64),
        "Parameters": parameters,
        "InstanceIds": cmd.node_ids,
        "Targets": extra.get("Targets").filter(|t| t.is_array()).cloned().unwrap_or_else(|| native_targets(&cmd.targets)),
        "RequestedDateTime": epoch(requested),
        "Status": cmd.status,
        "StatusDetails": cmd.status_details,
        "OutputS3Region": s3.region,
        "OutputS3BucketName": s3.bucket,
        "OutputS3KeyPrefix": s3.prefix,
        "MaxConcurrency": cmd.max_concurrency,
        "MaxErrors": cmd.max_errors,
        "TargetCount": cmd.target_count,
        "CompletedCount": cmd.completed_count,
        "ErrorCount": cmd.error_count,
        "DeliveryTimedOutCount": cmd.delivery_timed_out_count,
        "ServiceRole": str_or(extra, "ServiceRole", ""),
        "NotificationConfig": notification_config(extra),
        "CloudWatchOutputConfig": cloudwatch_config(extra),
        "TimeoutSeconds": timeout,
    })
}

/// OutputS3* of a command stored before they had columns (kept among its SSM-only members).
fn legacy_output_s3(extra: &Value) -> OutputS3 {
    let get = |k: &str| {
        extra
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    OutputS3 {
        bucket: get("OutputS3BucketName"),
        prefix: get("OutputS3KeyPrefix"),
        region: get("OutputS3Region"),
    }
}

fn str_or(extra: &Value, key: &str, default: &str) -> Value {
    json!(extra.get(key).and_then(Value::as_str).unwrap_or(default))
}

fn notification_config(extra: &Value) -> Value {
    let c = extra.get("NotificationConfig").filter(|v| v.is_object());
    let mut v = json!({
        "NotificationArn": c.and_then(|c| c.get("NotificationArn")).and_then(Value::as_str).unwrap_or(""),
        "NotificationEvents": c.and_then(|c| c.get("NotificationEvents")).cloned().unwrap_or_else(|| json!([])),
    });
    // SSM sends "" here when unset, which its own model's enum does not allow; leave it out instead.
    if let Some(t) = c
        .and_then(|c| c.get("NotificationType"))
        .and_then(Value::as_str)
    {
        v["NotificationType"] = json!(t);
    }
    v
}

fn cloudwatch_config(extra: &Value) -> Value {
    let c = extra
        .get("CloudWatchOutputConfig")
        .filter(|v| v.is_object());
    json!({
        "CloudWatchLogGroupName": c.and_then(|c| c.get("CloudWatchLogGroupName")).and_then(Value::as_str).unwrap_or(""),
        "CloudWatchOutputEnabled": c.and_then(|c| c.get("CloudWatchOutputEnabled")).and_then(Value::as_bool).unwrap_or(false),
    })
}

/// A native target expression as SSM `Targets` (for commands sent through the native API).
fn native_targets(expr: &str) -> Value {
    let Ok(expr) = TargetExpr::parse(expr) else {
        return json!([]);
    };
    let targets: Vec<Value> = expr
        .0
        .iter()
        .map(|t| match t {
            TargetTerm::All => json!({"Key": "InstanceIds", "Values": ["*"]}),
            TargetTerm::Tag { key, values } => {
                json!({"Key": format!("tag:{key}"), "Values": values})
            }
            TargetTerm::TagKey(keys) => json!({"Key": "tag-key", "Values": keys}),
            TargetTerm::Ids(ids) => json!({"Key": "InstanceIds", "Values": ids}),
        })
        .collect();
    json!(targets)
}

fn command_query(req: &ListCommandsRequest, on_command: bool) -> Result<CommandQuery, SsmError> {
    let mut q = CommandQuery {
        command_id: req
            .command_id
            .as_deref()
            .map(check_command_id)
            .transpose()?,
        node_id: req
            .instance_id
            .as_deref()
            .map(check_instance_id)
            .transpose()?,
        ..CommandQuery::default()
    };
    let filters = req.filters.as_deref().unwrap_or_default();
    if req.filters.is_some() && !(1..=5).contains(&filters.len()) {
        return Err(SsmError::new(
            Code::Validation,
            "1 validation error detected: Value at 'filters' failed to satisfy constraint: Member must have length between 1 and 5",
        ));
    }
    let bad_value = |f: &CommandFilter| {
        SsmError::new(
            Code::InvalidFilterValue,
            format!("Filter value {:?} is not valid for key {}.", f.value, f.key),
        )
    };
    for f in filters {
        match f.key.as_str() {
            "InvokedAfter" => {
                q.invoked_after = Some(parse_iso(&f.value).ok_or_else(|| bad_value(f))?)
            }
            "InvokedBefore" => {
                q.invoked_before = Some(parse_iso(&f.value).ok_or_else(|| bad_value(f))?)
            }
            "DocumentName" => q.document_name = Some(f.value.clone()),
            "ExecutionStage" => {
                q.complete = Some(match f.value.as_str() {
                    "Executing" => false,
                    "Complete" => true,
                    _ => return Err(bad_value(f)),
                })
            }
            "Status" => {
                let ok = if on_command {
                    fleetrun_proto::CommandStatus::parse(&f.value).is_some()
                } else {
                    InvocationStatus::parse(&f.value).is_some()
                };
                if !ok {
                    return Err(bad_value(f));
                }
                q.status = Some(f.value.clone());
            }
            other => {
                return Err(SsmError::new(
                    Code::InvalidFilterKey,
                    format!(
                        "Filter key {} is not valid.",
                        fleetrun_proto::targets::shown(other)
                    ),
                ));
            }
        }
    }
    Ok(q)
}

/// ISO 8601 date or date-time, as SSM's InvokedAfter/InvokedBefore take them.
fn parse_iso(s: &str) -> Option<i64> {
    let t = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

/// The nodes whose invocations the caller may read, to filter a listing by. Asking for one command
/// or one node it may not read is refused outright (and audited as such), not answered empty.
async fn visible(
    state: &AppState,
    p: &Principal,
    q: &CommandQuery,
) -> Result<Option<HashSet<NodeId>>, SsmError> {
    if let Some(node) = &q.node_id {
        state
            .authz
            .require_node(&state.store, p, Action::ReadOutput, node)
            .await?;
    }
    let scope = match &q.command_id {
        Some(id) => {
            state
                .authz
                .command_scope(&state.store, p, Action::ReadOutput, id)
                .await?
        }
        None => {
            state
                .authz
                .node_scope(&state.store, p, Action::ReadOutput)
                .await?
        }
    };
    Ok(scope.as_filter().cloned())
}

async fn ensure_command_exists(state: &AppState, q: &CommandQuery) -> Result<(), SsmError> {
    if let Some(id) = &q.command_id
        && state.store.get_command(id).await?.is_none()
    {
        return Err(SsmError::new(
            Code::InvalidCommandId,
            format!("Command {id} does not exist."),
        ));
    }
    Ok(())
}

pub async fn list_commands(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListCommandsRequest,
) -> SsmResult {
    let mut q = command_query(&req, true)?;
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let offset = parse_token(req.next_token.as_deref())?;
    ensure_command_exists(state, &q).await?;
    q.visible = visible(state, p, &q).await?;
    // One more than the page says whether a next page exists: no NextToken to an empty page.
    let mut page = state.store.query_commands(&q, offset, limit + 1).await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let commands: Vec<Value> = page
        .iter()
        .map(|(c, extra)| ssm_command(c, extra))
        .collect();
    let mut out = json!({ "Commands": commands });
    let token = next_token(offset, page.len(), limit);
    if more && !token.is_null() {
        out["NextToken"] = token;
    }
    Ok(out)
}

pub async fn list_command_invocations(
    state: &Arc<AppState>,
    p: &Principal,
    req: ListCommandsRequest,
) -> SsmResult {
    let mut q = command_query(&req, false)?;
    let limit = check_max_results(req.max_results, 1, 50, 50)?;
    let offset = parse_token(req.next_token.as_deref())?;
    ensure_command_exists(state, &q).await?;
    q.visible = visible(state, p, &q).await?;
    let mut page = state.store.query_invocations(&q, offset, limit + 1).await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    if req.details {
        crate::run::params::mask_each(&state.store, &state.secret_box, &mut page, |(inv, _)| inv)
            .await?;
    }
    let items: Vec<Value> = page
        .iter()
        .map(|(inv, meta)| ssm_invocation(inv, meta, req.details, state))
        .collect();
    let mut out = json!({ "CommandInvocations": items });
    let token = next_token(offset, page.len(), limit);
    if more && !token.is_null() {
        out["NextToken"] = token;
    }
    Ok(out)
}

/// Where the invocation's full stdout and stderr are: the S3 objects the command asked for (as SSM
/// says), else this server's output routes.
fn output_urls(state: &AppState, inv: &Invocation, meta: &CommandMeta) -> (String, String) {
    if let Some(s3) = &meta.output_s3 {
        let url = |pipe: Pipe| {
            let key = export::key(
                &s3.target,
                &inv.command_id,
                &inv.node_id,
                &s3.plugin_dir,
                pipe,
            );
            state.exports.url(&s3.target, &key)
        };
        return (url(Pipe::Stdout), url(Pipe::Stderr));
    }
    let base = &state.public_url;
    let url = |pipe: &str| {
        format!(
            "{base}/v1/commands/{}/invocations/{}/output/{pipe}",
            inv.command_id, inv.node_id
        )
    };
    (url("stdout"), url("stderr"))
}

fn ssm_invocation(inv: &Invocation, meta: &CommandMeta, details: bool, state: &AppState) -> Value {
    let (stdout_url, stderr_url) = output_urls(state, inv, meta);
    let s3 = meta
        .output_s3
        .as_ref()
        .map(|o| o.target.clone())
        .unwrap_or_else(|| legacy_output_s3(&meta.ssm_extra));
    let plugins = if details {
        let plugin_status = match inv.status {
            InvocationStatus::Pending | InvocationStatus::Delayed => "Pending",
            InvocationStatus::InProgress | InvocationStatus::Cancelling => "InProgress",
            s => s.as_str(),
        };
        let mut p = json!({
            "Name": plugin_names(&meta.ssm_extra)[0],
            "Status": plugin_status,
            "StatusDetails": inv.status_details,
            "ResponseCode": response_code(inv),
            "Output": truncate_output(&inv.stdout, &inv.stderr, PLUGIN_OUTPUT_MAX),
            "StandardOutputUrl": stdout_url,
            "StandardErrorUrl": stderr_url,
            "OutputS3Region": s3.region,
            "OutputS3BucketName": s3.bucket,
            "OutputS3KeyPrefix": s3.prefix,
        });
        if let Some(s) = &inv.started_at {
            p["ResponseStartDateTime"] = epoch(parse_rfc3339_ms(s));
        }
        if let Some(f) = &inv.finished_at {
            p["ResponseFinishDateTime"] = epoch(parse_rfc3339_ms(f));
        }
        json!([p])
    } else {
        json!([])
    };
    json!({
        "CommandId": inv.command_id,
        "InstanceId": inv.node_id,
        "InstanceName": inv.node_name,
        "Comment": meta.comment,
        "DocumentName": meta.document_name,
        "DocumentVersion": str_or(&meta.ssm_extra, "DocumentVersion", "$DEFAULT"),
        "RequestedDateTime": epoch(meta.requested_at),
        "Status": inv.status,
        "StatusDetails": inv.status_details,
        // Where the export of the output to S3 stands while it is not written (SSM's trace of the
        // agent's work, at most 2,500 characters).
        "TraceOutput": inv.output_s3_pending.as_deref().map(|t| t.chars().take(2500).collect::<String>()).unwrap_or_default(),
        "StandardOutputUrl": stdout_url,
        "StandardErrorUrl": stderr_url,
        "CommandPlugins": plugins,
        "ServiceRole": str_or(&meta.ssm_extra, "ServiceRole", ""),
        "NotificationConfig": notification_config(&meta.ssm_extra),
        "CloudWatchOutputConfig": cloudwatch_config(&meta.ssm_extra),
    })
}

/// The plugin (step) names a command's invocations report: the steps that ran (they are reported
/// as one plugin, the first, since the steps run as one script); `aws:runShellScript` for schema 1.2.
fn plugin_names(extra: &Value) -> Vec<String> {
    let names: Vec<String> = extra
        .get("Plugins")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        vec![PLUGIN_RUN_SHELL_SCRIPT.to_owned()]
    } else {
        names
    }
}

/// Exit code once ended; -1 before (SSM's ResponseCode).
fn response_code(inv: &Invocation) -> i32 {
    if inv.status.is_terminal() {
        inv.exit_code
    } else {
        -1
    }
}

pub async fn get_command_invocation(
    state: &Arc<AppState>,
    p: &Principal,
    req: GetCommandInvocationRequest,
) -> SsmResult {
    let missing = |m: &str| {
        SsmError::new(
            Code::Validation,
            format!(
                "1 validation error detected: Value null at '{m}' failed to satisfy constraint: Member must not be null"
            ),
        )
    };
    let cmd_id = check_command_id(
        req.command_id
            .as_deref()
            .ok_or_else(|| missing("commandId"))?,
    )?;
    let node = check_instance_id(
        req.instance_id
            .as_deref()
            .ok_or_else(|| missing("instanceId"))?,
    )?;
    state
        .authz
        .require_node(&state.store, p, Action::ReadOutput, &node)
        .await?;
    let q = CommandQuery {
        command_id: Some(cmd_id.clone()),
        node_id: Some(node.clone()),
        ..CommandQuery::default()
    };
    let mut page = state.store.query_invocations(&q, 0, 1).await?;
    crate::run::params::mask_each(&state.store, &state.secret_box, &mut page, |(inv, _)| inv)
        .await?;
    let found = page.into_iter().next();
    let plugins = found
        .as_ref()
        .map(|(_, meta)| plugin_names(&meta.ssm_extra))
        .unwrap_or_else(|| vec![PLUGIN_RUN_SHELL_SCRIPT.to_owned()]);
    if let Some(p) = &req.plugin_name
        && !plugins.contains(p)
    {
        return Err(SsmError::new(
            Code::InvalidPluginName,
            format!(
                "Plugin {p} is not part of this command's document; its plugins are {}.",
                plugins.join(", ")
            ),
        ));
    }
    let Some((inv, meta)) = found else {
        return Err(SsmError::new(
            Code::InvocationNotFound,
            format!("Command {cmd_id} has no invocation on instance {node}."),
        ));
    };
    let plugin = req
        .plugin_name
        .clone()
        .unwrap_or_else(|| plugins[0].clone());
    let (stdout_url, stderr_url) = output_urls(state, &inv, &meta);
    let elapsed = match (&inv.started_at, &inv.finished_at) {
        (Some(s), Some(f)) => format!(
            "PT{:.3}S",
            (parse_rfc3339_ms(f) - parse_rfc3339_ms(s)).max(0) as f64 / 1000.0
        ),
        _ => String::new(),
    };
    Ok(json!({
        "CommandId": inv.command_id,
        "InstanceId": inv.node_id,
        "Comment": meta.comment,
        "DocumentName": meta.document_name,
        "DocumentVersion": str_or(&meta.ssm_extra, "DocumentVersion", "$DEFAULT"),
        "PluginName": plugin,
        "ResponseCode": response_code(&inv),
        "ExecutionStartDateTime": inv.started_at.clone().unwrap_or_default(),
        "ExecutionElapsedTime": elapsed,
        "ExecutionEndDateTime": inv.finished_at.clone().unwrap_or_default(),
        "Status": inv.status,
        "StatusDetails": inv.status_details,
        "StandardOutputContent": string_prefix(&inv.stdout, inv.stdout_bytes, INLINE_STDOUT_MAX),
        "StandardOutputUrl": stdout_url,
        "StandardErrorContent": string_prefix(&inv.stderr, inv.stderr_bytes, INLINE_STDERR_MAX),
        "StandardErrorUrl": stderr_url,
        "CloudWatchOutputConfig": cloudwatch_config(&meta.ssm_extra),
    }))
}

pub async fn cancel_command(
    state: &Arc<AppState>,
    p: &Principal,
    req: CancelCommandRequest,
) -> SsmResult {
    let id = req.command_id.as_deref().ok_or_else(|| {
        SsmError::new(Code::Validation, "1 validation error detected: Value null at 'commandId' failed to satisfy constraint: Member must not be null")
    })?;
    let id = check_command_id(id)?;
    let Some(cmd) = state.store.get_command(&id).await? else {
        return Err(SsmError::new(
            Code::InvalidCommandId,
            format!("Command {id} does not exist."),
        ));
    };
    let ids = req.instance_ids.unwrap_or_default();
    if ids.len() > 50 {
        return Err(SsmError::new(
            Code::Validation,
            "1 validation error detected: Value at 'instanceIds' failed to satisfy constraint: Member must have length less than or equal to 50",
        ));
    }
    let mut nodes = Vec::with_capacity(ids.len());
    let mut seen = HashSet::new();
    for i in &ids {
        if !seen.insert(i) {
            return Err(SsmError::new(
                Code::DuplicateNodeId,
                format!("Instance Id {i} is specified more than once."),
            ));
        }
        nodes.push(check_instance_id(i)?);
    }
    if !nodes.is_empty() {
        let invs = state.store.list_invocations(&id).await?;
        let known: HashSet<&NodeId> = invs.iter().map(|i| &i.node_id).collect();
        if let Some(n) = nodes.iter().find(|n| !known.contains(n)) {
            return Err(SsmError::new(
                Code::InvalidNodeId,
                format!("Command {id} was not sent to instance {n}."),
            ));
        }
    }
    state
        .authz
        .require_command_nodes(&state.store, p, Action::Cancel, &id, &nodes)
        .await?;
    if !cmd.status.is_terminal() {
        crate::run::dispatch::cancel(state, &id, nodes).await?;
    }
    Ok(json!({}))
}

/// SSM's StringPrefix: content of `total` bytes whose first bytes are `text`, cut to `max` with the
/// truncation suffix when the output is `max` bytes or longer.
fn string_prefix(text: &str, total: u64, max: usize) -> String {
    if (total as usize) < max && text.len() < max {
        return text.to_owned();
    }
    let keep = floor_char_boundary(text, max - TRUNCATED.len());
    format!("{}{TRUNCATED}", &text[..keep])
}

/// SSM's TruncateOutput: stdout, an error title, stderr, cut to `capacity` with markers.
fn truncate_output(stdout: &str, stderr: &str, capacity: usize) -> String {
    const TRUNC_OUT: &str = "\n---Output truncated---";
    const TRUNC_ERR: &str = "\n---Error truncated----";
    let (out_len, err_len) = (stdout.len(), stderr.len());
    let title = if err_len > 0 {
        "\n----------ERROR-------\n"
    } else {
        ""
    };
    let avail = capacity - title.len();
    let cut = |s: &str, n: usize| s[..floor_char_boundary(s, n)].to_owned();
    if out_len + err_len < avail {
        return format!("{stdout}{title}{stderr}");
    }
    if out_len > avail / 2 && err_len > avail / 2 {
        let size = avail - TRUNC_ERR.len() - TRUNC_OUT.len();
        return format!(
            "{}{TRUNC_OUT}{title}{}{TRUNC_ERR}",
            cut(stdout, size / 2),
            cut(stderr, size / 2)
        );
    }
    if out_len < avail / 2 {
        let size = avail - TRUNC_ERR.len();
        return format!("{stdout}{title}{}{TRUNC_ERR}", cut(stderr, size - out_len));
    }
    let size = avail - TRUNC_OUT.len();
    format!("{}{TRUNC_OUT}{title}{stderr}", cut(stdout, size - err_len))
}

fn floor_char_boundary(s: &str, n: usize) -> usize {
    let mut i = n.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_cut_as_ssm_cuts_it() {
        assert_eq!(string_prefix("hi", 2, 24_000), "hi");
        let long = "x".repeat(24_000);
        let cut = string_prefix(&long, 30_000, 24_000);
        assert_eq!(cut.len(), 24_000);
        assert!(cut.ends_with(TRUNCATED));
    }

    #[test]
    fn plugin_output_is_cut_as_ssm_cuts_it() {
        assert_eq!(truncate_output("out", "", 2400), "out");
        assert_eq!(
            truncate_output("out", "err", 2400),
            "out\n----------ERROR-------\nerr"
        );
        let big = "o".repeat(5000);
        let t = truncate_output(&big, "err", 2400);
        assert!(t.len() <= 2400 && t.contains("---Output truncated---") && t.ends_with("err"));
        let t = truncate_output(&big, &"e".repeat(5000), 2400);
        assert!(t.len() <= 2400 && t.ends_with("---Error truncated----"));
    }

    #[test]
    fn targets_map_to_expressions() {
        let t = |k: &str, v: &[&str]| Target {
            key: Some(k.into()),
            values: v.iter().map(|s| s.to_string()).collect(),
        };
        let e =
            targets_to_expr(&[t("tag:env", &["prod", "stage"]), t("tag-key", &["web"])]).unwrap();
        assert_eq!(e.to_string(), "tag:env=prod,stage tag-key:web");
        assert_eq!(
            targets_to_expr(&[t("InstanceIds", &["*"])])
                .unwrap()
                .to_string(),
            "all"
        );
        assert_eq!(
            targets_to_expr(&[t("resource-groups:Name", &["x"])])
                .unwrap_err()
                .code(),
            Code::InvalidParameters
        );
    }
}
