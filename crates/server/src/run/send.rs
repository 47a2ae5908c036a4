//! Accepting a command, shared by the native API and the SSM-compatible API, in named steps:
//! check the request (`fleetrun_proto::send`, the CLI's checks too), prepare the document, resolve
//! the targets, authorize, then persist (command and all invocations in one transaction) and
//! dispatch.

use crate::AppState;
use crate::access::authz::{Action, Authz, Denied, Principal, Resource};
use crate::access::secrets::{self, SecretBox};
use crate::errors::{Code, Error};
use crate::run::dispatch;
use crate::run::document;
use fleetrun_proto::api::{
    Command, DOCUMENT_RUN_SHELL_SCRIPT, PLUGIN_RUN_SHELL_SCRIPT, SendCommand,
};
use fleetrun_proto::limits::SCRIPT_MAX;
use fleetrun_proto::send::{self, FieldError};
use fleetrun_proto::status::details;
use fleetrun_proto::targets::TargetExpr;
use fleetrun_proto::time::now_ms;
use fleetrun_proto::{CommandId, CommandStatus, InvocationStatus, NodeId};
use fleetrun_store::{
    CommandExtras, CommandRow, CommandSpec, Finish, IdempotencyKey, InsertError, NewCommand,
    S3Output, Store, StoreError,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// How the caller wants a send handled beyond the request itself.
#[derive(Default)]
pub struct SendOptions {
    /// Targets already parsed (the SSM API builds them from `Targets`); overrides `req.targets`.
    pub target_expr: Option<TargetExpr>,
    /// Accept a target expression that matches no node (SSM does; the native API refuses).
    pub allow_no_targets: bool,
    /// SSM-only members to keep and show back (JSON object).
    pub ssm_extra: Option<serde_json::Value>,
    /// The send's idempotency key (already checked), if the caller gave one.
    pub idempotency: Option<Idempotency>,
    /// Run only on nodes of this platform (a saved script's): the others' invocations are stored
    /// ended, Failed with `InvalidPlatform`, so nothing is ever delivered to them.
    pub platform: Option<String>,
    /// The saved script (name, version) the command runs, recorded with it.
    pub script: Option<(String, i64)>,
    /// The saved script's input and output, recorded with it (the dispatcher moves them).
    pub script_files: fleetrun_store::ScriptFiles,
}

/// An idempotency key as a send gets it from its API.
pub struct Idempotency {
    /// The key, prefixed with its API (`native:` or `ssm:`), so the two never meet.
    pub key: String,
    /// Hex SHA-256 of the request (a canonical form of its body): the same key with another request
    /// is refused.
    pub request_hash: String,
}

/// A send's answer: the command, and whether an earlier send with the same idempotency key made it.
pub struct Sent {
    /// The command (without invocations).
    pub command: Command,
    /// True when this is a retry answered with the command the key already made (nothing new ran).
    pub replayed: bool,
}

/// Why a send was refused.
#[derive(Debug)]
pub enum SendError {
    /// Bad input: its kind and what is wrong.
    Invalid {
        /// `InvalidParameters`, `InvalidDocument`, `MaxDocumentSizeExceeded`, `InvalidTarget`,
        /// `MissingTarget`, `DuplicateNodeId` or `InvalidNodeId`.
        code: Code,
        /// One line naming the problem.
        message: String,
    },
    /// The principal may not send to some of the targets (named in the refusal); nothing was created.
    Denied(Denied),
    /// The idempotency key was used before for another request (nothing was created).
    KeyMismatch {
        /// The command the key made.
        command_id: CommandId,
        /// One line naming the mismatch.
        message: String,
    },
    /// Storage failed.
    Store(StoreError),
}

impl From<StoreError> for SendError {
    fn from(e: StoreError) -> Self {
        SendError::Store(e)
    }
}

impl From<document::DocError> for SendError {
    fn from(e: document::DocError) -> Self {
        // A send naming a document that does not exist has a bad parameter (400), unlike a
        // document route, whose own resource is missing (404).
        let code = match e.code {
            Code::DocumentNotFound => Code::InvalidDocument,
            other => other,
        };
        invalid(code, e.message)
    }
}

impl From<FieldError> for SendError {
    fn from(e: FieldError) -> Self {
        let code = match e.kind {
            send::Kind::TooLarge => Code::MaxDocumentSizeExceeded,
            send::Kind::Invalid => Code::InvalidParameters,
        };
        invalid(code, e.message)
    }
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Invalid { code, message } => Error::new(code, message),
            SendError::Denied(d) => d.into(),
            SendError::KeyMismatch { message, .. } => {
                Error::new(Code::IdempotencyKeyMismatch, message)
            }
            SendError::Store(e) => Error::internal(e),
        }
    }
}

impl<D> From<SendError> for crate::errors::Answered<D> {
    fn from(e: SendError) -> Self {
        Error::from(e).into()
    }
}

fn invalid(code: Code, message: impl Into<String>) -> SendError {
    SendError::Invalid {
        code,
        message: message.into(),
    }
}

/// Accepts a command: checks it, prepares its document, resolves its targets, authorizes it, then
/// persists it with all its invocations and starts its dispatcher. Returns the command (without
/// invocations: for a fleet-wide command they would be a large answer nobody asked for).
pub async fn send_command(
    state: &Arc<AppState>,
    principal: &Principal,
    req: SendCommand,
    opts: SendOptions,
) -> Result<Sent, SendError> {
    // A retry of a send that was stored (its answer may have been lost) gets that command back.
    if let Some(idem) = &opts.idempotency
        && let Some(sent) = replay(&state.store, &state.authz, principal, idem).await?
    {
        return Ok(sent);
    }
    let checked = send::check(&req)?;
    if let Some(s3) = &checked.output_s3 {
        state
            .exports
            .check_allowed(s3)
            .map_err(|m| invalid(Code::AccessDenied, m))?;
        state
            .exports
            .check_not_own(s3)
            .map_err(|m| invalid(Code::InvalidParameters, m))?;
    }
    let doc = prepare_document(&state.store, &req).await?;
    let targets = resolve_targets(&state.store, &req, &opts).await?;
    authorize(
        &state.store,
        &state.authz,
        principal,
        &doc.commands,
        &targets.nodes,
    )
    .await?;
    check_param_references(&state.store, &state.secret_box, &doc.commands).await?;
    persist_and_dispatch(state, principal, req.node_ids, opts, checked, doc, targets).await
}

/// A send's document, loaded and rendered with its parameters.
struct PreparedDocument {
    name: String,
    /// The version that runs.
    version: String,
    /// Every parameter's value (defaults filled in), kept with the command.
    parameters: BTreeMap<String, Vec<String>>,
    /// Step names SSM shows as plugins.
    plugins: Vec<String>,
    /// SSM's directory of the output in S3 (`awsrunShellScript/0.awsrunShellScript`).
    plugin_dir: String,
    /// The script.
    commands: Vec<String>,
    working_dir: String,
    execution_timeout: u64,
}

/// Loads the document (AWS-RunShellScript unless named), checks its parameters and renders the
/// script, which is checked as the request's own fields are (a parameter may have given it).
async fn prepare_document(store: &Store, req: &SendCommand) -> Result<PreparedDocument, SendError> {
    let name = req
        .document_name
        .clone()
        .unwrap_or_else(|| DOCUMENT_RUN_SHELL_SCRIPT.into());
    let given = shorthand_parameters(req, &name)?;
    let prepared = document::prepare(store, &name, req.document_version.as_deref(), &given)
        .await
        .map_err(|e| match e {
            document::Error::Invalid(e) => e.into(),
            document::Error::Store(e) => SendError::Store(e),
        })?;
    let schema_1_2 = prepared.document.content.schema_version == "1.2";
    let plugins: Vec<String> = if schema_1_2 {
        vec![PLUGIN_RUN_SHELL_SCRIPT.to_owned()]
    } else if prepared.rendered.steps.is_empty() {
        prepared
            .document
            .content
            .steps
            .iter()
            .map(|s| s.name.clone())
            .collect()
    } else {
        prepared.rendered.steps.clone()
    };
    let plugin_dir = crate::objects::export::plugin_dir(
        schema_1_2,
        plugins
            .first()
            .map_or(PLUGIN_RUN_SHELL_SCRIPT, String::as_str),
    );
    let rendered = prepared.rendered;
    if rendered.commands.is_empty() {
        return Err(invalid(
            Code::InvalidParameters,
            "commands is empty: give at least one script line",
        ));
    }
    send::check_script(&rendered.commands)?;
    send::check_working_dir(&rendered.working_dir)?;
    send::check_execution_timeout(rendered.execution_timeout)?;
    Ok(PreparedDocument {
        name,
        version: prepared.document.version.version.to_string(),
        parameters: prepared.values,
        plugins,
        plugin_dir,
        commands: rendered.commands,
        working_dir: rendered.working_dir,
        execution_timeout: rendered.execution_timeout,
    })
}

/// A send's targets: as asked for, and resolved to nodes (id, name) in dispatch order.
struct Targets {
    /// The target expression ("" when node ids were given).
    expr: String,
    nodes: Vec<(NodeId, String)>,
}

/// Resolves node ids or a target expression (exactly one of the two) to nodes.
async fn resolve_targets(
    store: &Store,
    req: &SendCommand,
    opts: &SendOptions,
) -> Result<Targets, SendError> {
    let expr = match &opts.target_expr {
        Some(expr) => expr.to_string(),
        None => req
            .targets
            .as_deref()
            .map(str::trim)
            .unwrap_or("")
            .to_owned(),
    };
    let nodes = match (req.node_ids.is_empty(), expr.is_empty()) {
        (true, true) => {
            return Err(invalid(
                Code::MissingTarget,
                "give node ids or a target expression",
            ));
        }
        (false, false) => {
            return Err(invalid(
                Code::InvalidTarget,
                "give node ids or a target expression, not both",
            ));
        }
        (false, true) => resolve_ids(store, &req.node_ids).await?,
        (true, false) => {
            let found = match &opts.target_expr {
                Some(parsed) => {
                    parsed
                        .check_limits()
                        .map_err(|e| invalid(Code::InvalidTarget, e.0))?;
                    store.resolve_targets(parsed).await?
                }
                None => {
                    let parsed =
                        TargetExpr::parse(&expr).map_err(|e| invalid(Code::InvalidTarget, e.0))?;
                    store.resolve_targets(&parsed).await?
                }
            };
            if found.is_empty() && !opts.allow_no_targets {
                return Err(invalid(
                    Code::InvalidTarget,
                    format!("no node matches the target expression {expr:?}"),
                ));
            }
            found
        }
    };
    Ok(Targets { expr, nodes })
}

/// Refuses the whole send unless the principal may use every parameter the script references and
/// send to every target node.
async fn authorize(
    store: &Store,
    authz: &Authz,
    principal: &Principal,
    commands: &[String],
    nodes: &[(NodeId, String)],
) -> Result<(), SendError> {
    authorize_params(authz, principal, commands)?;
    authorize_nodes(store, authz, principal, nodes).await
}

/// Stores the command and all its invocations in one transaction, then starts its dispatcher.
async fn persist_and_dispatch(
    state: &Arc<AppState>,
    principal: &Principal,
    node_ids: Vec<NodeId>,
    opts: SendOptions,
    checked: send::Checked,
    doc: PreparedDocument,
    targets: Targets,
) -> Result<Sent, SendError> {
    let mut ssm_extra = opts
        .ssm_extra
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}));
    ssm_extra["Plugins"] = serde_json::json!(doc.plugins);
    let command_id = CommandId::from_random(secrets::random_u128());
    let idempotency = opts.idempotency.as_ref().map(|i| IdempotencyKey {
        principal: principal.name().to_owned(),
        key: i.key.clone(),
        request_hash: i.request_hash.clone(),
    });
    let new = NewCommand {
        command_id: command_id.clone(),
        document_name: doc.name,
        document_version: doc.version,
        parameters: doc.parameters,
        comment: checked.comment,
        node_ids,
        targets: targets.expr,
        spec: CommandSpec {
            commands: doc.commands,
            working_dir: doc.working_dir,
            execution_timeout: doc.execution_timeout,
            delivery_timeout: checked.delivery_timeout,
            max_concurrency: checked.max_concurrency,
            max_errors: checked.max_errors,
            run_as: checked.run_as,
            memory_limit_mb: checked.memory_limit_mb,
            cpu_limit_percent: checked.cpu_limit_percent,
            // By the database's clock, as every deadline derived from it (`cluster::replica`).
            requested_at: state.replica.now_ms(),
        },
        invocations: targets.nodes,
        ssm_extra: Some(ssm_extra),
        idempotency,
        output_s3: checked.output_s3.map(|target| S3Output {
            target,
            plugin_dir: doc.plugin_dir,
        }),
        owner: Some(state.replica.owner()),
    };
    let extras = CommandExtras {
        ended: match &opts.platform {
            Some(p) => other_platforms(&state.store, &new.invocations, p).await?,
            None => Vec::new(),
        },
        script: opts.script.clone(),
        script_files: opts.script_files.clone(),
    };
    match state.store.insert_command_with(&new, &extras).await {
        Ok(()) => {}
        Err(InsertError::DuplicateKey) => {
            // A concurrent send with the same key committed first: answer as its retry.
            if let Some(idem) = &opts.idempotency
                && let Some(sent) = replay(&state.store, &state.authz, principal, idem).await?
            {
                return Ok(sent);
            }
            return Err(SendError::Store(StoreError::Missing(
                "command of a duplicate idempotency key",
            )));
        }
        Err(InsertError::Store(e)) => return Err(SendError::Store(e)),
    }
    let row = CommandRow {
        command_id: command_id.clone(),
        target_count: new.invocations.len() as u64,
        spec: new.spec,
        status: CommandStatus::Pending,
        error_count: extras.ended.iter().filter(|(_, f)| f.is_error()).count() as u64,
        cancel_requested: false,
    };
    // Its creator holds it at epoch 1 (`Owner`).
    dispatch::spawn(state.clone(), row, state.replica.fence(1));
    let cmd = state
        .store
        .get_command(&command_id)
        .await?
        .ok_or(SendError::Store(StoreError::Missing(
            "command vanished after insert",
        )))?;
    tracing::info!(%command_id, targets = cmd.target_count, "command accepted");
    Ok(Sent {
        command: cmd,
        replayed: false,
    })
}

/// The ends of the invocations on nodes not of `platform`.
async fn other_platforms(
    store: &Store,
    invocations: &[(NodeId, String)],
    platform: &str,
) -> Result<Vec<(NodeId, Finish)>, SendError> {
    let ids: Vec<NodeId> = invocations.iter().map(|(id, _)| id.clone()).collect();
    let platforms = store.node_platforms(&ids).await?;
    let now = now_ms();
    Ok(ids
        .into_iter()
        .filter_map(|id| {
            let theirs = platforms.get(&id).map_or("unknown", String::as_str);
            (theirs != platform).then(|| {
                let why = format!("not run: the node's platform is {theirs}, not {platform}");
                let f = Finish::without_running(
                    InvocationStatus::Failed,
                    details::INVALID_PLATFORM,
                    now,
                    &why,
                );
                (id, f)
            })
        })
        .collect())
}

/// The command an idempotency key of this principal already made, if any: refused when the key came
/// with another request, or when the principal may no longer send to the command's nodes.
async fn replay(
    store: &Store,
    authz: &Authz,
    principal: &Principal,
    idem: &Idempotency,
) -> Result<Option<Sent>, SendError> {
    let Some((cmd, hash)) = store
        .command_by_idempotency_key(principal.name(), &idem.key)
        .await?
    else {
        return Ok(None);
    };
    if !secrets::hashes_equal(&hash, &idem.request_hash) {
        return Err(SendError::KeyMismatch {
            message: format!(
                "this idempotency key was already used for command {} with a different request; use a new key for a new command",
                cmd.command_id
            ),
            command_id: cmd.command_id,
        });
    }
    if authz.on_every_node(principal, Action::SendCommand) != Some(true) {
        let nodes = store.command_node_refs(&cmd.command_id).await?;
        authz
            .require_nodes(principal, Action::SendCommand, &nodes)
            .map_err(SendError::Denied)?;
    }
    tracing::info!(command_id = %cmd.command_id, "idempotent retry answered with the stored command");
    Ok(Some(Sent {
        command: cmd,
        replayed: true,
    }))
}

/// Hex SHA-256 of a request in canonical form (serde_json's serialization of the parsed body).
pub fn request_hash(req: &impl serde::Serialize) -> String {
    secrets::hash(&serde_json::to_string(req).unwrap_or_default())
}

/// Refuses the whole send unless the principal may send to every target node. Tags are loaded only
/// when the answer can depend on them, or to name the refused nodes.
async fn authorize_nodes(
    store: &Store,
    authz: &Authz,
    principal: &Principal,
    targets: &[(NodeId, String)],
) -> Result<(), SendError> {
    if authz.on_every_node(principal, Action::SendCommand) == Some(true) {
        return Ok(());
    }
    let ids: Vec<NodeId> = targets.iter().map(|(id, _)| id.clone()).collect();
    let nodes = store.node_refs(Some(&ids)).await?;
    authz
        .require_nodes(principal, Action::SendCommand, &nodes)
        .map_err(SendError::Denied)
}

/// Every parameter the script references must be one the principal may use (`use-param`): a script
/// could print any value it is given, masking or not.
fn authorize_params(
    authz: &Authz,
    principal: &Principal,
    commands: &[String],
) -> Result<(), SendError> {
    let mut seen = HashSet::new();
    for c in commands {
        for r in fleetrun_proto::params::references(c) {
            if seen.insert(r.name) {
                authz
                    .require(principal, Action::UseParam, Resource::Parameter(r.name))
                    .map_err(SendError::Denied)?;
            }
        }
    }
    Ok(())
}

/// Every `{{param:NAME}}` the script references must exist now, and the script with today's values
/// must fit [`SCRIPT_MAX`]. The values themselves are read again at delivery (see crate::run::params).
async fn check_param_references(
    store: &Store,
    secrets: &SecretBox,
    commands: &[String],
) -> Result<(), SendError> {
    let script = commands.join("\n");
    match crate::run::params::render(store, secrets, &script).await {
        Ok(rendered) if rendered.len() > SCRIPT_MAX => Err(invalid(
            Code::MaxDocumentSizeExceeded,
            format!(
                "the script with its parameters substituted is {} bytes; the limit is {SCRIPT_MAX}",
                rendered.len()
            ),
        )),
        Ok(_) => Ok(()),
        Err(crate::run::params::RenderError::Missing(names)) => Err(invalid(
            Code::InvalidParameters,
            format!(
                "the script references unknown parameter(s): {}",
                names.join(", ")
            ),
        )),
        Err(crate::run::params::RenderError::Store(e)) => Err(SendError::Store(e)),
    }
}

/// The parameters of a send: `parameters`, plus AWS-RunShellScript's shorthands (`commands`,
/// `working_directory`, `execution_timeout_secs`), which other documents do not take.
fn shorthand_parameters(
    req: &SendCommand,
    document_name: &str,
) -> Result<BTreeMap<String, Vec<String>>, SendError> {
    let mut given = req.parameters.clone();
    let has_shorthand = !req.commands.is_empty()
        || req.working_directory.is_some()
        || req.execution_timeout_secs.is_some();
    if document_name != DOCUMENT_RUN_SHELL_SCRIPT {
        if has_shorthand {
            return Err(invalid(
                Code::InvalidParameters,
                format!(
                    "commands, working_directory and execution_timeout_secs are for {DOCUMENT_RUN_SHELL_SCRIPT}; give the parameters of {document_name} in parameters"
                ),
            ));
        }
        return Ok(given);
    }
    let mut put = |key: &str, values: Vec<String>| {
        if given.contains_key(key) {
            return Err(invalid(
                Code::InvalidParameters,
                format!("{key} is given twice: as a field and in parameters"),
            ));
        }
        given.insert(key.to_owned(), values);
        Ok(())
    };
    if !req.commands.is_empty() {
        put("commands", req.commands.clone())?;
    }
    if let Some(wd) = &req.working_directory {
        put("workingDirectory", vec![wd.clone()])?;
    }
    if let Some(t) = req.execution_timeout_secs {
        // In range: send::check saw it first.
        put("executionTimeout", vec![t.to_string()])?;
    }
    if given.get("commands").is_none_or(Vec::is_empty) {
        return Err(invalid(
            Code::InvalidParameters,
            "commands is empty: give at least one script line",
        ));
    }
    Ok(given)
}

/// Node ids given by the caller, each known and given once, with their names, in the caller's order.
async fn resolve_ids(store: &Store, ids: &[NodeId]) -> Result<Vec<(NodeId, String)>, SendError> {
    let mut seen = HashSet::new();
    if let Some(dup) = ids.iter().find(|id| !seen.insert(*id)) {
        return Err(invalid(
            Code::DuplicateNodeId,
            format!("node {dup} is given more than once"),
        ));
    }
    let found = store.node_names(ids).await?;
    let known: HashSet<&NodeId> = found.iter().map(|(id, _)| id).collect();
    let unknown: Vec<&str> = ids
        .iter()
        .filter(|id| !known.contains(id))
        .map(NodeId::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(invalid(
            Code::InvalidNodeId,
            format!("unknown node id(s): {}", unknown.join(", ")),
        ));
    }
    // Keep the order the operator gave.
    let names: std::collections::HashMap<NodeId, String> = found.into_iter().collect();
    Ok(ids
        .iter()
        .map(|id| (id.clone(), names.get(id).cloned().unwrap_or_default()))
        .collect())
}
