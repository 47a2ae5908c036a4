//! A saved script run's files on each node (issue 12). Around the node's Run, on its session
//! streams (`sessions::transfer`):
//!
//! 1. prepare: the node's private temp dir `/tmp/fleetrun-script-<command>-<node>` is recorded
//!    (`script_run_nodes`, phase `made`) and then made as the run-as user with mode 0700; the
//!    input, staged once per command ([`Inputs`]), is put there; the Run's script is the body in a
//!    fixed wrapper that exports `INPUT` and `OUTPUT` (paths in the dir);
//! 2. collect: once the body succeeded, the output file is checked (a regular file, not a link
//!    or a directory, at most the configured size) and got into the object store at
//!    `results/<command>/<node>/<basename>` with its objects row; otherwise the invocation fails
//!    saying why;
//! 3. clean: once the invocation ended, whatever the outcome, the dir is removed ([`janitor`]),
//!    when the node is connected (again), after a server restart too.

use crate::AppState;
use crate::scripts::inputs::Staged;
use crate::sessions::transfer::{self, GetError, PutTarget};
use fleetrun_proto::{CommandId, NodeId};
use fleetrun_store::{Finish, ObjectRow, ScriptFiles};
use object_store::path::Path as ObjectPath;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

/// Default largest output file a run ships back.
pub const OUTPUT_MAX_DEFAULT: u64 = 5 * 1024 * 1024 * 1024;
/// How long a helper command on the node (mkdir, checks, rm) may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the temp dirs live on nodes, and what every one's name starts with.
pub const DIR_PREFIX: &str = "/tmp/fleetrun-script-";

/// A node's temp dir for a command.
pub fn dir_of(cmd: &CommandId, node: &NodeId) -> String {
    format!("{DIR_PREFIX}{cmd}-{node}")
}

/// A word quoted for `sh`.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The input's file name in the dir: the URI's last segment, or `input`.
fn input_name(uri: &str) -> String {
    let last = uri
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    let ok = !last.is_empty()
        && last != "."
        && last != ".."
        && last
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b));
    if ok {
        last.to_owned()
    } else {
        "input".to_owned()
    }
}

/// The output's path on the node.
pub fn output_path(dir: &str, output: &str) -> String {
    format!("{dir}/{output}")
}

/// The output's basename (the result object's last segment).
fn output_basename(output: &str) -> &str {
    output.rsplit('/').next().unwrap_or(output)
}

/// The object key of a node's result: the output's basename, or `output` when that is not
/// something a key may hold (a space, say).
pub fn result_key(cmd: &CommandId, node: &NodeId, output: &str) -> String {
    let key = format!("results/{cmd}/{node}/{}", output_basename(output));
    if fleetrun_proto::api::check_object_key(&key).is_ok() {
        key
    } else {
        format!("results/{cmd}/{node}/output")
    }
}

/// The Run's script: the body in a subshell (its `exit` ends only it) with `INPUT` and `OUTPUT`
/// exported; the run's status is the body's.
pub fn wrap(body: &str, dir: &str, files: &ScriptFiles) -> String {
    let mut s = String::new();
    if let Some(uri) = &files.input {
        s.push_str(&format!(
            "export INPUT={}\n",
            sq(&format!("{dir}/{}", input_name(uri)))
        ));
    }
    if let Some(out) = &files.output {
        s.push_str(&format!("export OUTPUT={}\n", sq(&output_path(dir, out))));
    }
    s.push_str("(\n");
    s.push_str(body);
    s.push_str("\n)\n");
    s
}

/// The input of a command, staged at most once however many nodes it goes to.
#[derive(Default)]
pub struct Inputs {
    cell: OnceCell<Result<Staged, String>>,
}

impl Inputs {
    async fn get(&self, state: &AppState, cmd: &CommandId, uri: &str) -> Result<Staged, String> {
        self.cell
            .get_or_init(|| async {
                let dest = ObjectPath::from(format!("runs/{cmd}/input"));
                crate::scripts::inputs::stage(
                    uri,
                    &state.store,
                    state.objects.as_ref(),
                    &state.inputs,
                    &dest,
                )
                .await
                .map_err(|e| {
                    format!(
                        "{}: the input {uri} is not available: {}",
                        e.code.native_code(),
                        e.message
                    )
                })
            })
            .await
            .clone()
    }
}

/// Makes the node ready for its Run: the dir made and recorded, the input put into it. Answers
/// the Run's script (the body wrapped).
pub async fn prepare(
    state: &AppState,
    inputs: &Inputs,
    cmd: &CommandId,
    node: &NodeId,
    files: &ScriptFiles,
    body: &str,
    run_as: Option<String>,
) -> Result<String, String> {
    let staged = match &files.input {
        Some(uri) => Some(inputs.get(state, cmd, uri).await?),
        None => None,
    };
    let streams = state
        .hub
        .streams(node)
        .ok_or_else(|| format!("node {node} is not connected"))?;
    let dir = dir_of(cmd, node);
    // Recorded before it exists, so a stop right after leaves nothing unknown behind.
    state
        .store
        .script_node_made(cmd, node, &dir)
        .await
        .map_err(|e| format!("cannot record the temp dir: {e}"))?;
    let mut mk = format!("rm -rf -- {d} && mkdir -m 0700 -- {d}", d = sq(&dir));
    if let Some(out) = &files.output
        && let Some((parent, _)) = out.rsplit_once('/')
    {
        mk.push_str(&format!(
            " && mkdir -p -- {}",
            sq(&format!("{dir}/{parent}"))
        ));
    }
    let made = transfer::exec_oneshot(&streams, mk, run_as.clone(), HELPER_TIMEOUT).await?;
    if made.code != 0 {
        return Err(format!(
            "cannot make the temp dir {dir} on the node: {}",
            made.text()
        ));
    }
    if let (Some(uri), Some(staged)) = (&files.input, staged) {
        let target = PutTarget {
            path: format!("{dir}/{}", input_name(uri)),
            mode: 0o600,
            owner: run_as,
        };
        transfer::put_object(
            &streams,
            state.objects.as_ref(),
            &staged.path,
            staged.size,
            &staged.sha256,
            target,
            state.sessions.idle_timeout,
        )
        .await
        .map_err(|e| format!("the input did not reach the node: {e}"))?;
    }
    Ok(wrap(body, &dir, files))
}

/// After a successful body: ships the output file into the object store. The error says why
/// the invocation fails instead.
pub async fn collect(
    state: &AppState,
    cmd: &CommandId,
    node: &NodeId,
    output: &str,
    by: &str,
) -> Result<ObjectRow, String> {
    let streams = state
        .hub
        .streams(node)
        .ok_or_else(|| format!("node {node} disconnected before its output file was shipped"))?;
    let path = output_path(&dir_of(cmd, node), output);
    let f = sq(&path);
    let check = format!(
        "if [ -L {f} ]; then echo 'is a symbolic link'; exit 1; fi; \
         if [ -d {f} ]; then echo 'is a directory'; exit 1; fi; \
         if [ ! -e {f} ]; then echo missing; exit 1; fi; \
         if [ ! -f {f} ]; then echo 'is not a regular file'; exit 1; fi"
    );
    let checked = transfer::exec_oneshot(&streams, check, None, HELPER_TIMEOUT).await?;
    if checked.code != 0 {
        let why = checked.text();
        return Err(if why == "missing" {
            format!("the script wrote no output file at {path}")
        } else {
            format!("the output {path} {why}; a script's output must be a regular file")
        });
    }
    let key = result_key(cmd, node, output);
    let dest = crate::objects::api::object_path(&key);
    let max = state.script_output_max;
    let got = transfer::get_object(
        &streams,
        state.objects.as_ref(),
        &path,
        &dest,
        max,
        state.sessions.idle_timeout,
    )
    .await;
    let (size, sha256) = got.map_err(|e| match e {
        GetError::TooLarge(n) => format!(
            "the output {path} is {n} bytes, more than the {max} a run ships back (--script-output-max)"
        ),
        GetError::Failed(e) => format!("the output {path} was not shipped: {e}"),
    })?;
    let row = ObjectRow {
        key,
        size,
        sha256,
        created_at: fleetrun_proto::time::now_ms(),
        created_by: by.to_owned(),
    };
    state
        .store
        .put_object(&row)
        .await
        .map_err(|e| format!("cannot record the result object: {e}"))?;
    Ok(row)
}

/// The result of a node's script run with files, before it is stored: a successful body whose
/// output could not be shipped fails, saying why.
pub async fn on_result(state: &AppState, cmd: &CommandId, node: &NodeId, finish: &mut Finish) {
    let files = match state.store.script_files(cmd).await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(%cmd, %node, "cannot read a script run's files: {e}");
            return;
        }
    };
    let Some(output) = files.output else { return };
    if finish.status != fleetrun_proto::InvocationStatus::Success {
        return;
    }
    // The object is the script run's: named after the script.
    let by = match state.store.script_run(cmd).await {
        Ok(Some((name, version))) => format!("script {name} version {version}"),
        _ => "script".to_owned(),
    };
    if let Err(why) = collect(state, cmd, node, &output, &by).await {
        tracing::info!(%cmd, %node, "script output not shipped: {why}");
        finish.status = fleetrun_proto::InvocationStatus::Failed;
        finish.details = fleetrun_proto::status::details::FAILED;
        finish.message = why;
        if finish.exit_code == 0 {
            finish.exit_code = 1;
        }
    }
}

/// Removes the temp dirs of ended invocations on connected nodes; runs until shutdown, woken
/// by ended invocations and nodes coming online (and every minute, for anything missed).
pub async fn janitor(state: Arc<AppState>) {
    let mut online = state.hub.subscribe_online();
    let shutdown = state.shutdown.clone();
    loop {
        match state.store.script_nodes_to_clean().await {
            Ok(rows) => {
                for row in rows {
                    let Some(streams) = state.hub.streams(&row.node_id) else {
                        continue;
                    };
                    if !row.dir.starts_with(DIR_PREFIX) || row.dir.contains("/../") {
                        tracing::error!(dir = %row.dir, "not a script temp dir; left alone");
                        let _ = state
                            .store
                            .script_node_removed(&row.command_id, &row.node_id)
                            .await;
                        continue;
                    }
                    let rm = format!("rm -rf -- {}", sq(&row.dir));
                    match transfer::exec_oneshot(&streams, rm, None, HELPER_TIMEOUT).await {
                        Ok(o) if o.code == 0 => {
                            if let Err(e) = state
                                .store
                                .script_node_removed(&row.command_id, &row.node_id)
                                .await
                            {
                                tracing::error!("cannot record a removed temp dir: {e}");
                            }
                        }
                        Ok(o) => {
                            tracing::warn!(node = %row.node_id, dir = %row.dir, "cannot remove a script temp dir: {}", o.text())
                        }
                        Err(e) => {
                            tracing::warn!(node = %row.node_id, dir = %row.dir, "cannot remove a script temp dir: {e}")
                        }
                    }
                }
            }
            Err(e) => tracing::error!("cannot list script temp dirs to remove: {e}"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = state.dispatchers.cleanup.notified() => {}
            _ = online.recv() => {}
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrapper_exports_quoted_paths_and_runs_the_body_in_a_subshell() {
        let files = ScriptFiles {
            input: Some("https://h.example/a/tool.tar.gz?x=1".into()),
            output: Some("out/it's.txt".into()),
        };
        let w = wrap("exit 3", "/tmp/fleetrun-script-c-n", &files);
        assert_eq!(
            w,
            "export INPUT='/tmp/fleetrun-script-c-n/tool.tar.gz'\n\
             export OUTPUT='/tmp/fleetrun-script-c-n/out/it'\\''s.txt'\n(\nexit 3\n)\n"
        );
        let none = ScriptFiles {
            input: None,
            output: Some("r".into()),
        };
        assert!(!wrap("true", "/d", &none).contains("INPUT"));
    }

    #[test]
    fn an_input_name_is_its_last_segment_when_plain_else_input() {
        assert_eq!(input_name("inputs/collector.tar.gz"), "collector.tar.gz");
        assert_eq!(input_name("s3://b/k/t.bin"), "t.bin");
        for odd in ["https://h/", "https://h/a b", "https://h/..", "x/$(id)"] {
            assert_eq!(input_name(odd), "input", "{odd}");
        }
        let cmd: CommandId = "0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b".parse().unwrap();
        let node: NodeId = "mi-0123456789abcdef0".parse().unwrap();
        assert_eq!(
            result_key(&cmd, &node, "out/logs.tar"),
            "results/0b5c1a8e-9d0f-4a6e-8f3e-2c1d0e9f8a7b/mi-0123456789abcdef0/logs.tar"
        );
        assert!(result_key(&cmd, &node, "a+b=c").ends_with("/a+b=c"));
        assert!(result_key(&cmd, &node, "dir/a b").ends_with("/output"));
    }
}
