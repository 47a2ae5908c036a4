//! `fleetrun send`: run a shell script (or a Command document) on nodes, optionally waiting for the
//! result.
//!
//! Everything the proto crate can check is checked here first (the request with the server's own
//! [`send::check`]), so mistakes cost one line and no request, and read as the server would say them.

use super::command::print_command;
use super::{Ctx, parse_node_ids};
use crate::client::Client;
use crate::render::{self, Format};
use anyhow::{Context, bail};
use fleetrun_proto::api::{Command, DOCUMENT_RUN_SHELL_SCRIPT, SendCommand};
use fleetrun_proto::limits;
use fleetrun_proto::send::{self, Field};
use fleetrun_proto::targets::TargetExpr;
use fleetrun_proto::{CommandId, InvocationStatus};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Where and how a command rolls out, and whether to wait for it: the flags `send` and
/// `scripts run` share.
// The doc comments are `--help` text, where `[,VALUE]` means "optional", not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, clap::Args)]
pub struct Rollout {
    /// Run on this node (repeatable)
    #[arg(long = "node", value_name = "NODE_ID")]
    nodes: Vec<String>,
    /// Run on the nodes matching an expression: all, tag:KEY=VALUE[,VALUE], tag-key:KEY, id:NODE_ID[,...]
    #[arg(long, value_name = "EXPR")]
    targets: Option<String>,
    /// Most invocations running at once: N or N% [server default: 50]
    #[arg(long, value_name = "N|N%", allow_negative_numbers = true)]
    max_concurrency: Option<String>,
    /// Errors after which no more invocations start: N or N% [server default: 0]
    #[arg(long, value_name = "N|N%", allow_negative_numbers = true)]
    max_errors: Option<String>,
    /// Seconds the script may run before it is killed [server default: 3600]
    #[arg(long, value_name = "SECS")]
    execution_timeout: Option<u64>,
    /// Seconds a node may take to start it before it times out [server default: 3600]
    #[arg(long, value_name = "SECS")]
    delivery_timeout: Option<u64>,
    /// A note kept with the command (at most 100 characters)
    #[arg(long, value_name = "TEXT")]
    comment: Option<String>,
    /// Run the script as this user (name or uid); the nodes' agents must run as root
    #[arg(long, value_name = "USER")]
    run_as: Option<String>,
    /// Most memory the script may use on each node: 64M, 512MiB, 2G (a bare number is MiB)
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_limit)]
    memory_limit: Option<u64>,
    /// Most CPU the script may use on each node, in percent of one core: 50% or 150 (1.5 cores)
    #[arg(long, value_name = "PCT", value_parser = parse_cpu_limit)]
    cpu_limit: Option<u32>,
    /// Also write each node's full stdout and stderr to this S3 bucket, at SSM's keys
    /// [PREFIX/]COMMAND/NODE/awsrunShellScript/0.awsrunShellScript/{stdout,stderr}
    #[arg(long, value_name = "BUCKET")]
    output_s3_bucket: Option<String>,
    /// The key prefix in --output-s3-bucket
    #[arg(long, value_name = "PREFIX", requires = "output_s3_bucket")]
    output_s3_prefix: Option<String>,
    /// The region of --output-s3-bucket [default: the server's S3 region]
    #[arg(long, value_name = "REGION", requires = "output_s3_bucket")]
    output_s3_region: Option<String>,
    /// Wait for the command to end and show how each node did (exit status 1 unless all succeeded)
    #[arg(long)]
    pub wait: bool,
    /// Key that makes the send idempotent: a send with a key already used (with the same request)
    /// answers the command it made and runs nothing again [default: a new random key; every
    /// retry of this invocation after a lost connection reuses it]
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    rollout: Rollout,
    /// Directory to run the script in
    #[arg(long, value_name = "DIR")]
    working_dir: Option<String>,
    /// Run this document instead of a script (its parameters with --parameter) [default: AWS-RunShellScript]
    #[arg(long, value_name = "NAME")]
    document: Option<String>,
    /// The document's version: a number, $LATEST or $DEFAULT [default: $DEFAULT]
    #[arg(long, value_name = "N|$LATEST|$DEFAULT")]
    document_version: Option<String>,
    /// A document parameter (repeatable; repeat a key to give a list: --parameter names=a --parameter names=b)
    #[arg(long = "parameter", value_name = "KEY=VALUE")]
    parameters: Vec<String>,
    /// Read the script from a file, one command per line (`-` for stdin; AWS-RunShellScript only)
    #[arg(long, value_name = "PATH", conflicts_with = "script")]
    file: Option<PathBuf>,
    /// The script: words after `--`, joined with spaces into one line (AWS-RunShellScript only)
    #[arg(last = true, value_name = "SCRIPT")]
    script: Vec<String>,
}

pub async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<ExitCode> {
    let (key, wait) = (idempotency_key(&args.rollout)?, args.rollout.wait);
    let body = build(args)?;
    let client = ctx.client()?;
    let cmd = client.send_command(&body, &key).await?;
    report(ctx, &client, &cmd, wait).await
}

/// The send's idempotency key: the one given (checked), or a new random one.
pub fn idempotency_key(rollout: &Rollout) -> anyhow::Result<String> {
    Ok(match rollout.idempotency_key.clone() {
        Some(k) => {
            limits::check_idempotency_key(&k)
                .map_err(|e| anyhow::anyhow!("--idempotency-key: {e}"))?;
            k
        }
        None => format!("{:032x}", fleetrun_server::access::secrets::random_u128()),
    })
}

/// Tells what was sent: its id, or with `wait` follows it to its end and shows how each node did
/// (exit status 1 unless all succeeded).
pub async fn report(
    ctx: &Ctx,
    client: &Client,
    cmd: &Command,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    if !wait {
        if ctx.format == Format::Json {
            render::print_json(cmd)?;
        } else {
            render::emit(&format!("{}\n", cmd.command_id))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.format == Format::Table {
        eprintln!(
            "command {} sent to {} node(s)",
            cmd.command_id, cmd.target_count
        );
    }
    follow(client, cmd).await?;
    let done = client.command(&cmd.command_id).await?;
    if ctx.format == Format::Json {
        render::print_json(&done)?;
    } else {
        print_command(&done)?;
    }
    let all_ok = done.status == fleetrun_proto::CommandStatus::Success
        && done
            .invocations
            .iter()
            .all(|i| i.status == InvocationStatus::Success);
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The request's rollout members from the flags, checked as far as they can be alone.
pub fn rollout_request(r: Rollout) -> anyhow::Result<SendCommand> {
    let node_ids = parse_node_ids(&r.nodes)?;
    let targets = r
        .targets
        .map(|t| {
            TargetExpr::parse(&t)
                .map(|e| e.to_string())
                .with_context(|| format!("bad --targets {t:?}"))
        })
        .transpose()?;
    if node_ids.is_empty() && targets.is_none() {
        bail!("say where to run it: --node NODE_ID or --targets EXPR (e.g. --targets all)");
    }
    // What the request's own checks cannot say: an empty flag is a mistake, not "none".
    if r.run_as.as_deref() == Some("") {
        bail!("--run-as needs a user name or uid");
    }
    Ok(SendCommand {
        node_ids,
        targets,
        execution_timeout_secs: r.execution_timeout,
        delivery_timeout_secs: r.delivery_timeout,
        max_concurrency: r.max_concurrency,
        max_errors: r.max_errors,
        comment: r.comment,
        run_as: r.run_as,
        memory_limit_mb: r.memory_limit,
        cpu_limit_percent: r.cpu_limit,
        output_s3_bucket: r.output_s3_bucket,
        output_s3_prefix: r.output_s3_prefix,
        output_s3_region: r.output_s3_region,
        ..SendCommand::default()
    })
}

/// Checks the arguments and builds the request body.
fn build(args: Args) -> anyhow::Result<SendCommand> {
    let base = rollout_request(args.rollout)?;
    if args.working_dir.as_deref() == Some("") {
        bail!("--working-dir needs a directory");
    }
    let parameters = parse_parameters(&args.parameters)?;
    let document = args.document.as_deref().map(str::trim);
    if document.is_some_and(str::is_empty) {
        bail!("--document needs a document name");
    }
    if let Some(name) = document.filter(|d| *d != DOCUMENT_RUN_SHELL_SCRIPT) {
        // Other documents take only their own parameters; the script shorthands are AWS-RunShellScript's.
        for (given, flag) in [
            (!args.script.is_empty(), "a script after `--`"),
            (args.file.is_some(), "--file"),
            (args.working_dir.is_some(), "--working-dir"),
            (base.execution_timeout_secs.is_some(), "--execution-timeout"),
        ] {
            if given {
                bail!(
                    "{flag} is for {DOCUMENT_RUN_SHELL_SCRIPT} only: give the parameters of {name} with --parameter KEY=VALUE"
                );
            }
        }
        return checked(SendCommand {
            document_name: Some(name.to_owned()),
            document_version: args.document_version,
            parameters,
            ..base
        });
    }
    let script_given = args.file.is_some() || !args.script.is_empty();
    if parameters.contains_key("commands") {
        if script_given {
            bail!("the script is given twice: as --parameter commands=... and as a script");
        }
    } else if !script_given {
        bail!(
            "no script given: put it after `--` (e.g. fleetrun send --targets all -- uname -a) or use --file"
        );
    }
    for (key, flag) in [
        ("workingDirectory", args.working_dir.is_some()),
        ("executionTimeout", base.execution_timeout_secs.is_some()),
    ] {
        if flag && parameters.contains_key(key) {
            bail!("{key} is given twice: as --parameter {key}=... and as its flag");
        }
    }
    let commands = match &args.file {
        Some(path) => read_script(path)?,
        None if args.script.is_empty() => Vec::new(),
        None => vec![args.script.join(" ")],
    };
    if script_given && commands.iter().all(|l| l.trim().is_empty()) {
        bail!("the script is empty");
    }
    checked(SendCommand {
        document_name: document.map(str::to_owned),
        document_version: args.document_version,
        parameters,
        commands,
        working_directory: args.working_dir,
        ..base
    })
}

/// The request, if the server's own checks ([`send::check`]) accept it; refused with the server's
/// message, after the flag that gave the field.
pub fn checked(body: SendCommand) -> anyhow::Result<SendCommand> {
    if let Err(e) = send::check(&body) {
        let flag = match e.field {
            // The script comes from the words after `--` or --file: no one flag to name.
            Field::Commands => None,
            Field::WorkingDirectory => Some("--working-dir"),
            Field::ExecutionTimeout => Some("--execution-timeout"),
            Field::DeliveryTimeout => Some("--delivery-timeout"),
            Field::Comment => Some("--comment"),
            Field::MaxConcurrency => Some("--max-concurrency"),
            Field::MaxErrors => Some("--max-errors"),
            Field::RunAs => Some("--run-as"),
            Field::MemoryLimit => Some("--memory-limit"),
            Field::CpuLimit => Some("--cpu-limit"),
            Field::OutputS3Bucket => Some("--output-s3-bucket"),
            Field::OutputS3Prefix => Some("--output-s3-prefix"),
            Field::OutputS3Region => Some("--output-s3-region"),
        };
        match flag {
            Some(flag) => bail!("{flag}: {e}"),
            None => bail!("{e}"),
        }
    }
    Ok(body)
}

/// `--parameter KEY=VALUE` values by key, split on the first `=`; a repeated key gives a list, in order.
fn parse_parameters(given: &[String]) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in given {
        let Some((key, value)) = p.split_once('=') else {
            bail!("--parameter {p:?} must be KEY=VALUE");
        };
        let key = key.trim();
        if key.is_empty() {
            bail!("--parameter {p:?} has no name before `=`");
        }
        out.entry(key.to_owned())
            .or_default()
            .push(value.to_owned());
    }
    Ok(out)
}

/// Parses a `--memory-limit` size into whole MiB: `64M`, `512MiB`, `2G`, `1T`, `65536K`; a bare number
/// is MiB. Units are binary (M = MiB), as the kernel counts memory.
fn parse_memory_limit(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use e.g. 64M, 512MiB or 2G"))?;
    let kib_per_unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "k" | "kb" | "kib" => 1,
        "" | "m" | "mb" | "mib" => 1024,
        "g" | "gb" | "gib" => 1024 * 1024,
        "t" | "tb" | "tib" => 1024 * 1024 * 1024,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit: use K, M, G or T (e.g. 64M)"
            ));
        }
    };
    let kib = n
        .checked_mul(kib_per_unit)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !kib.is_multiple_of(1024) {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    let mb = kib / 1024;
    if !(limits::MEMORY_LIMIT_MIN_MB..=limits::MEMORY_LIMIT_MAX_MB).contains(&mb) {
        return Err(format!(
            "{s:?} is out of range: {} MiB to {} MiB",
            limits::MEMORY_LIMIT_MIN_MB,
            limits::MEMORY_LIMIT_MAX_MB
        ));
    }
    Ok(mb)
}

/// Parses a `--cpu-limit` in percent of one core: `50%`, `150` (1.5 cores).
fn parse_cpu_limit(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let num = t.strip_suffix('%').unwrap_or(t).trim();
    let pct: u32 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage: use e.g. 50% or 150"))?;
    if !(limits::CPU_LIMIT_MIN_PERCENT..=limits::CPU_LIMIT_MAX_PERCENT).contains(&pct) {
        return Err(format!(
            "{s:?} is out of range: {}% to {}% (percent of one core)",
            limits::CPU_LIMIT_MIN_PERCENT,
            limits::CPU_LIMIT_MAX_PERCENT
        ));
    }
    Ok(pct)
}

/// Lines of a script file (`-` is stdin).
fn read_script(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the script from stdin")?;
    } else {
        bytes = std::fs::read(path)
            .with_context(|| format!("cannot read script file {}", path.display()))?;
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("script file {} is not UTF-8", path.display()))?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// Follows the command until it is terminal, with a progress bar when a person is watching.
async fn follow(client: &Client, cmd: &Command) -> anyhow::Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(cmd.target_count);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let show = |c: &Command| {
        if let Some(bar) = &bar {
            bar.set_length(c.target_count);
            bar.set_position(c.completed_count);
            bar.set_message(format!("{}, {} failed", c.status, c.error_count));
        }
    };
    show(cmd);
    let mut terminal = cmd.status.is_terminal();
    if !terminal {
        let mut watch = client.watch(&cmd.command_id).await?;
        while let Some(snap) = watch.next().await? {
            show(&snap);
            if snap.status.is_terminal() {
                terminal = true;
                break;
            }
        }
    }
    if !terminal {
        // The watch ended early (a proxy or the server closed it): poll instead.
        poll_until_terminal(client, &cmd.command_id, &show).await?;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

async fn poll_until_terminal(
    client: &Client,
    id: &CommandId,
    show: &impl Fn(&Command),
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(100);
    loop {
        let c = client.command(id).await?;
        show(&c);
        if c.status.is_terminal() {
            return Ok(());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: Args,
    }

    fn build_from(argv: &[&str]) -> anyhow::Result<SendCommand> {
        let t = T::try_parse_from(std::iter::once("send").chain(argv.iter().copied()))?;
        build(t.args)
    }

    #[test]
    fn joins_words_after_dashes_into_one_line() {
        let b = build_from(&["--targets", "all", "--", "echo", "a b", "-n"]).unwrap();
        assert_eq!(b.commands, vec!["echo a b -n"]);
        assert_eq!(b.targets.as_deref(), Some("all"));
    }

    #[test]
    fn documents_and_parameters() {
        let b = build_from(&[
            "--targets",
            "all",
            "--document",
            "my-doc",
            "--document-version",
            "$LATEST",
            "--parameter",
            "names=a",
            "--parameter",
            "greeting=x=y",
            "--parameter",
            "names=b",
            "--parameter",
            "empty=",
        ])
        .unwrap();
        assert_eq!(b.document_name.as_deref(), Some("my-doc"));
        assert_eq!(b.document_version.as_deref(), Some("$LATEST"));
        assert_eq!(b.parameters["names"], ["a", "b"]);
        assert_eq!(b.parameters["greeting"], ["x=y"], "split on the first `=`");
        assert_eq!(b.parameters["empty"], [""]);
        assert!(b.commands.is_empty());

        // Without --document nothing changes; the default document may take its parameters too.
        let b = build_from(&["--targets", "all", "--", "uptime"]).unwrap();
        assert_eq!(b.document_name, None);
        assert!(b.parameters.is_empty());
        let b = build_from(&["--targets", "all", "--parameter", "commands=uptime"]).unwrap();
        assert_eq!(b.parameters["commands"], ["uptime"]);
        assert!(b.commands.is_empty());
        let b = build_from(&[
            "--targets",
            "all",
            "--document",
            "AWS-RunShellScript",
            "--",
            "uptime",
        ])
        .unwrap();
        assert_eq!(b.commands, ["uptime"]);

        for (argv, needle) in [
            (
                &["--targets", "all", "--document", "my-doc", "--", "x"][..],
                "a script after `--` is for AWS-RunShellScript only",
            ),
            (
                &["--targets", "all", "--document", "my-doc", "--file", "x"],
                "--file is for AWS-RunShellScript only",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--document",
                    "my-doc",
                    "--working-dir",
                    "/",
                ],
                "--working-dir",
            ),
            (
                &["--targets", "all", "--parameter", "greeting", "--", "x"],
                "KEY=VALUE",
            ),
            (
                &["--targets", "all", "--parameter", "=v", "--", "x"],
                "no name",
            ),
            (
                &["--targets", "all", "--parameter", "commands=a", "--", "x"],
                "given twice",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--parameter",
                    "workingDirectory=/",
                    "--working-dir",
                    "/tmp",
                    "--",
                    "x",
                ],
                "given twice",
            ),
            (
                &["--targets", "all", "--document", " ", "--", "x"],
                "--document",
            ),
        ] {
            let err = format!("{:#}", build_from(argv).unwrap_err());
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }

    #[test]
    fn sizes_and_percentages() {
        assert_eq!(parse_memory_limit("64M"), Ok(64));
        assert_eq!(parse_memory_limit("512MiB"), Ok(512));
        assert_eq!(parse_memory_limit("2G"), Ok(2048));
        assert_eq!(parse_memory_limit("2gib"), Ok(2048));
        assert_eq!(parse_memory_limit("100"), Ok(100));
        assert_eq!(parse_memory_limit("8192K"), Ok(8));
        assert_eq!(parse_memory_limit("1T"), Ok(1024 * 1024));
        assert!(parse_memory_limit("2T").is_err());
        assert!(parse_memory_limit("").is_err());
        assert!(parse_memory_limit("-1M").is_err());
        assert_eq!(parse_cpu_limit("50%"), Ok(50));
        assert_eq!(parse_cpu_limit("150"), Ok(150));
        assert!(parse_cpu_limit("102401").is_err());
        let b = build_from(&[
            "--targets",
            "all",
            "--run-as",
            "nobody",
            "--memory-limit",
            "64M",
            "--cpu-limit",
            "50%",
            "--",
            "x",
        ])
        .unwrap();
        assert_eq!(b.run_as.as_deref(), Some("nobody"));
        assert_eq!(b.memory_limit_mb, Some(64));
        assert_eq!(b.cpu_limit_percent, Some(50));
    }

    #[test]
    fn rejects_bad_input_locally() {
        for (argv, needle) in [
            (&["--targets", "color:red", "--", "x"][..], "--targets"),
            (
                &["--targets", "all", "--max-concurrency", "101%", "--", "x"],
                "max-concurrency",
            ),
            (
                &["--targets", "all", "--max-errors", "x", "--", "x"],
                "max-errors",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--execution-timeout",
                    "999999",
                    "--",
                    "x",
                ],
                "out of range",
            ),
            (
                &["--targets", "all", "--delivery-timeout", "0", "--", "x"],
                "out of range",
            ),
            (&["--node", "mi-1", "--", "x"], "invalid node id"),
            (&["--", "x"], "--targets"),
            (&["--targets", "all"], "no script"),
            (
                &["--targets", "all", "--memory-limit", "2M", "--", "x"],
                "out of range",
            ),
            (
                &["--targets", "all", "--memory-limit", "64X", "--", "x"],
                "unknown unit",
            ),
            (
                &["--targets", "all", "--memory-limit", "1500K", "--", "x"],
                "whole number of MiB",
            ),
            (
                &["--targets", "all", "--cpu-limit", "0%", "--", "x"],
                "out of range",
            ),
            (
                &["--targets", "all", "--cpu-limit", "half", "--", "x"],
                "not a percentage",
            ),
            (
                &["--targets", "all", "--run-as", "a b", "--", "x"],
                "--run-as: run-as user \"a b\" is not a valid user name or uid",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--run-as",
                    "u".repeat(33).as_str(),
                    "--",
                    "x",
                ],
                "--run-as: run-as user",
            ),
            (
                &["--targets", "all", "--run-as", "", "--", "x"],
                "--run-as needs a user name or uid",
            ),
            (
                &["--targets", "all", "--working-dir", "tmp", "--", "x"],
                "--working-dir: working directory \"tmp\" must be an absolute path",
            ),
            (
                &["--targets", "all", "--working-dir", "", "--", "x"],
                "--working-dir needs a directory",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--comment",
                    "c".repeat(101).as_str(),
                    "--",
                    "x",
                ],
                "--comment: comment is longer than 100 characters",
            ),
            (
                &["--targets", "all", "--", "x".repeat(64 * 1024).as_str()],
                "the script is 65537 bytes; the limit is 65536",
            ),
            (
                &[
                    "--targets",
                    "all",
                    "--document",
                    "my-doc",
                    "--delivery-timeout",
                    "0",
                ],
                "--delivery-timeout: delivery timeout 0 s",
            ),
        ] {
            let err = format!("{:#}", build_from(argv).unwrap_err());
            assert!(err.contains(needle), "{argv:?}: {err}");
        }
    }
}
