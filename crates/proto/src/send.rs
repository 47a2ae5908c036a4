//! The checks of a send request, shared by the server (which enforces them) and the CLI (which runs
//! them before any request, so a mistake costs one line and gets the server's own message).
//!
//! [`check`] checks the fields of a [`SendCommand`] and returns them parsed ([`Checked`]); the
//! script, working directory and execution timeout a document renders are checked again with
//! [`check_script`], [`check_working_dir`] and [`check_execution_timeout`].

use crate::api::SendCommand;
use crate::limits::*;
use crate::targets::Rate;
use std::fmt;

/// A field of a send request, named as in its JSON body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `commands` (the script, given or rendered).
    Commands,
    /// `working_directory`.
    WorkingDirectory,
    /// `execution_timeout_secs`.
    ExecutionTimeout,
    /// `delivery_timeout_secs`.
    DeliveryTimeout,
    /// `comment`.
    Comment,
    /// `max_concurrency`.
    MaxConcurrency,
    /// `max_errors`.
    MaxErrors,
    /// `run_as`.
    RunAs,
    /// `memory_limit_mb`.
    MemoryLimit,
    /// `cpu_limit_percent`.
    CpuLimit,
    /// `output_s3_bucket`.
    OutputS3Bucket,
    /// `output_s3_prefix`.
    OutputS3Prefix,
    /// `output_s3_region`.
    OutputS3Region,
}

impl Field {
    /// The member's name in the JSON body.
    pub fn name(self) -> &'static str {
        match self {
            Field::Commands => "commands",
            Field::WorkingDirectory => "working_directory",
            Field::ExecutionTimeout => "execution_timeout_secs",
            Field::DeliveryTimeout => "delivery_timeout_secs",
            Field::Comment => "comment",
            Field::MaxConcurrency => "max_concurrency",
            Field::MaxErrors => "max_errors",
            Field::RunAs => "run_as",
            Field::MemoryLimit => "memory_limit_mb",
            Field::CpuLimit => "cpu_limit_percent",
            Field::OutputS3Bucket => "output_s3_bucket",
            Field::OutputS3Prefix => "output_s3_prefix",
            Field::OutputS3Region => "output_s3_region",
        }
    }
}

/// What kind of refusal: the server answers [`Kind::TooLarge`] as `MaxDocumentSizeExceeded`, the
/// rest as `InvalidParameters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The value is malformed or out of range.
    Invalid,
    /// The script is over [`SCRIPT_MAX`].
    TooLarge,
}

/// A refused field: which, what kind, and one line saying what is wrong (the same line the server
/// answers and the CLI prints).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field.
    pub field: Field,
    /// What kind of refusal.
    pub kind: Kind,
    /// One line naming the problem and the limit.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

fn invalid(field: Field, message: String) -> FieldError {
    FieldError {
        field,
        kind: Kind::Invalid,
        message,
    }
}

/// The fields of a send that [`check`] accepted, parsed and with their defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checked {
    /// Seconds a node may take to start the command.
    pub delivery_timeout: u64,
    /// Comment ("" when none).
    pub comment: String,
    /// Most invocations in flight at once.
    pub max_concurrency: Rate,
    /// Errors after which no more invocations start.
    pub max_errors: Rate,
    /// Run-as user ("" for the agent's).
    pub run_as: String,
    /// MiB.
    pub memory_limit_mb: Option<u64>,
    /// Percent of one core.
    pub cpu_limit_percent: Option<u32>,
    /// Where output is also written (S3), if asked.
    pub output_s3: Option<crate::api::OutputS3>,
}

/// Checks the fields of a send request, the first refused one named in the error. The script
/// shorthand (`commands`) is checked for size and NUL bytes but may be empty: a document's
/// `commands` parameter can give it.
pub fn check(req: &SendCommand) -> Result<Checked, FieldError> {
    check_script(&req.commands)?;
    if let Some(dir) = &req.working_directory {
        check_working_dir(dir)?;
    }
    if let Some(secs) = req.execution_timeout_secs {
        check_execution_timeout(secs)?;
    }
    let delivery_timeout = req
        .delivery_timeout_secs
        .unwrap_or(DELIVERY_TIMEOUT_DEFAULT);
    if !(DELIVERY_TIMEOUT_MIN..=DELIVERY_TIMEOUT_MAX).contains(&delivery_timeout) {
        return Err(invalid(
            Field::DeliveryTimeout,
            format!(
                "delivery timeout {delivery_timeout} s is out of range: {DELIVERY_TIMEOUT_MIN} to {DELIVERY_TIMEOUT_MAX} s"
            ),
        ));
    }
    let comment = req.comment.clone().unwrap_or_default();
    if comment.chars().count() > COMMENT_MAX {
        return Err(invalid(
            Field::Comment,
            format!("comment is longer than {COMMENT_MAX} characters"),
        ));
    }
    let max_concurrency = match &req.max_concurrency {
        Some(s) => Rate::parse_concurrency(s).map_err(|e| invalid(Field::MaxConcurrency, e.0))?,
        None => Rate::DEFAULT_CONCURRENCY,
    };
    let max_errors = match &req.max_errors {
        Some(s) => Rate::parse_errors(s).map_err(|e| invalid(Field::MaxErrors, e.0))?,
        None => Rate::DEFAULT_ERRORS,
    };
    let run_as = req.run_as.clone().unwrap_or_default();
    check_run_as(&run_as)?;
    if let Some(mb) = req.memory_limit_mb
        && !(MEMORY_LIMIT_MIN_MB..=MEMORY_LIMIT_MAX_MB).contains(&mb)
    {
        return Err(invalid(
            Field::MemoryLimit,
            format!(
                "memory limit {mb} MiB is out of range: {MEMORY_LIMIT_MIN_MB} to {MEMORY_LIMIT_MAX_MB} MiB"
            ),
        ));
    }
    if let Some(pct) = req.cpu_limit_percent
        && !(CPU_LIMIT_MIN_PERCENT..=CPU_LIMIT_MAX_PERCENT).contains(&pct)
    {
        return Err(invalid(
            Field::CpuLimit,
            format!(
                "cpu limit {pct}% is out of range: {CPU_LIMIT_MIN_PERCENT}% to {CPU_LIMIT_MAX_PERCENT}%"
            ),
        ));
    }
    let output_s3 = check_output_s3(req)?;
    Ok(Checked {
        output_s3,
        delivery_timeout,
        comment,
        max_concurrency,
        max_errors,
        run_as,
        memory_limit_mb: req.memory_limit_mb,
        cpu_limit_percent: req.cpu_limit_percent,
    })
}

/// Longest `output_s3_prefix` (SSM's `OutputS3KeyPrefix` limit).
pub const OUTPUT_S3_PREFIX_MAX: usize = 500;

/// The S3 output fields: a bucket named as S3 names them (3 to 63 lowercase letters, digits, dots
/// and hyphens, starting and ending with a letter or digit, no `..`), a prefix of at most
/// [`OUTPUT_S3_PREFIX_MAX`] bytes that makes a valid key (no empty, `.` or `..` segment, no control
/// character), a region of 3 to 20 lowercase letters, digits and hyphens. Prefix and region need a
/// bucket.
pub fn check_output_s3(req: &SendCommand) -> Result<Option<crate::api::OutputS3>, FieldError> {
    let Some(bucket) = &req.output_s3_bucket else {
        if req.output_s3_prefix.is_some() || req.output_s3_region.is_some() {
            let field = if req.output_s3_prefix.is_some() {
                Field::OutputS3Prefix
            } else {
                Field::OutputS3Region
            };
            return Err(invalid(
                field,
                format!("{} needs output_s3_bucket", field.name()),
            ));
        }
        return Ok(None);
    };
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && edge_ok(bucket.as_bytes().first())
        && edge_ok(bucket.as_bytes().last())
        && !bucket.contains("..");
    if !bucket_ok {
        return Err(invalid(
            Field::OutputS3Bucket,
            format!(
                "{:?} is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit",
                bucket.chars().take(80).collect::<String>()
            ),
        ));
    }
    let prefix = req.output_s3_prefix.clone().unwrap_or_default();
    if prefix.len() > OUTPUT_S3_PREFIX_MAX {
        return Err(invalid(
            Field::OutputS3Prefix,
            format!(
                "the S3 key prefix is {} bytes; the limit is {OUTPUT_S3_PREFIX_MAX}",
                prefix.len()
            ),
        ));
    }
    let trimmed = prefix.trim_matches('/');
    if prefix.chars().any(char::is_control)
        || (!trimmed.is_empty()
            && trimmed
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == ".."))
    {
        return Err(invalid(
            Field::OutputS3Prefix,
            format!(
                "{:?} is not a valid S3 key prefix: no control characters and no empty, \".\" or \"..\" path segment",
                prefix.chars().take(80).collect::<String>()
            ),
        ));
    }
    let region = req.output_s3_region.clone().unwrap_or_default();
    let region_ok = (3..=20).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region.is_empty() && !region_ok {
        return Err(invalid(
            Field::OutputS3Region,
            format!(
                "{:?} is not a region name: 3 to 20 lowercase letters, digits and hyphens",
                region.chars().take(40).collect::<String>()
            ),
        ));
    }
    Ok(Some(crate::api::OutputS3 {
        bucket: bucket.clone(),
        // As given (SSM shows it back so); keys are made with its `/`s at either end trimmed.
        prefix,
        region,
    }))
}

/// Script lines: at most [`SCRIPT_MAX`] bytes joined (a newline after each), no NUL byte (the agent
/// hands the script to `sh -c`, which would cut it there).
pub fn check_script(commands: &[String]) -> Result<(), FieldError> {
    let len: usize = commands.iter().map(|c| c.len() + 1).sum();
    if len > SCRIPT_MAX {
        return Err(FieldError {
            field: Field::Commands,
            kind: Kind::TooLarge,
            message: format!("the script is {len} bytes; the limit is {SCRIPT_MAX}"),
        });
    }
    if commands.iter().any(|c| c.contains('\0')) {
        return Err(invalid(
            Field::Commands,
            "commands contain a NUL byte".to_owned(),
        ));
    }
    Ok(())
}

/// A working directory: "" (the agent's default) or an absolute path of at most
/// [`WORKING_DIR_MAX`] bytes without NUL.
pub fn check_working_dir(dir: &str) -> Result<(), FieldError> {
    if dir.len() > WORKING_DIR_MAX {
        return Err(invalid(
            Field::WorkingDirectory,
            format!("working directory is longer than {WORKING_DIR_MAX} bytes"),
        ));
    }
    if !dir.is_empty() && !dir.starts_with('/') {
        return Err(invalid(
            Field::WorkingDirectory,
            format!("working directory {dir:?} must be an absolute path"),
        ));
    }
    if dir.contains('\0') {
        return Err(invalid(
            Field::WorkingDirectory,
            "working directory contains a NUL byte".to_owned(),
        ));
    }
    Ok(())
}

/// An execution timeout: 1 to [`EXECUTION_TIMEOUT_MAX`] seconds.
pub fn check_execution_timeout(secs: u64) -> Result<(), FieldError> {
    if !(1..=EXECUTION_TIMEOUT_MAX).contains(&secs) {
        return Err(invalid(
            Field::ExecutionTimeout,
            format!("execution timeout {secs} s is out of range: 1 to {EXECUTION_TIMEOUT_MAX} s"),
        ));
    }
    Ok(())
}

/// Longest run-as user name accepted (Linux's `LOGIN_NAME_MAX` is 256, but `useradd` takes 32).
pub const RUN_AS_MAX: usize = 32;

/// A run-as user: "" (the agent's own) or a name or uid of at most [`RUN_AS_MAX`] characters of
/// `[A-Za-z0-9._-]`.
pub fn check_run_as(user: &str) -> Result<(), FieldError> {
    if user.len() > RUN_AS_MAX
        || user
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(invalid(
            Field::RunAs,
            format!("run-as user {user:?} is not a valid user name or uid"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> SendCommand {
        SendCommand {
            commands: vec!["true".into()],
            ..SendCommand::default()
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let c = check(&req()).unwrap();
        assert_eq!(
            c,
            Checked {
                delivery_timeout: DELIVERY_TIMEOUT_DEFAULT,
                comment: String::new(),
                max_concurrency: Rate::Count(50),
                max_errors: Rate::Count(0),
                run_as: String::new(),
                memory_limit_mb: None,
                cpu_limit_percent: None,
                output_s3: None,
            }
        );
        // Empty commands pass here: a document's `commands` parameter may give the script.
        assert!(check(&SendCommand::default()).is_ok());
    }

    #[test]
    fn accepted_values_come_back_parsed() {
        let c = check(&SendCommand {
            working_directory: Some("/tmp".into()),
            execution_timeout_secs: Some(EXECUTION_TIMEOUT_MAX),
            delivery_timeout_secs: Some(DELIVERY_TIMEOUT_MIN),
            comment: Some("é".repeat(COMMENT_MAX)),
            max_concurrency: Some("10%".into()),
            max_errors: Some("0%".into()),
            run_as: Some("svc-user_1.x".into()),
            memory_limit_mb: Some(MEMORY_LIMIT_MIN_MB),
            cpu_limit_percent: Some(CPU_LIMIT_MAX_PERCENT),
            ..req()
        })
        .unwrap();
        assert_eq!(c.max_concurrency, Rate::Percent(10));
        assert_eq!(c.max_errors, Rate::Percent(0));
        assert_eq!(c.run_as, "svc-user_1.x");
        assert_eq!(c.comment.chars().count(), COMMENT_MAX);
        assert_eq!(c.delivery_timeout, DELIVERY_TIMEOUT_MIN);
        assert_eq!(c.memory_limit_mb, Some(MEMORY_LIMIT_MIN_MB));
        assert_eq!(c.cpu_limit_percent, Some(CPU_LIMIT_MAX_PERCENT));
        assert!(check_run_as(&"u".repeat(RUN_AS_MAX)).is_ok());
        let s3 = check(&SendCommand {
            output_s3_bucket: Some("fleet.out-1".into()),
            output_s3_prefix: Some("/runs/daily/".into()),
            output_s3_region: Some("eu-west-1".into()),
            ..req()
        })
        .unwrap()
        .output_s3
        .unwrap();
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str(), s3.region.as_str()),
            ("fleet.out-1", "/runs/daily/", "eu-west-1")
        );
        assert!(check_working_dir(&format!("/{}", "d".repeat(WORKING_DIR_MAX - 1))).is_ok());
        assert!(check_script(&["x".repeat(SCRIPT_MAX - 1)]).is_ok());
    }

    #[test]
    fn each_field_is_refused_with_its_name_and_message() {
        use Field::*;
        let table: Vec<(SendCommand, Field, Kind, &str)> = vec![
            (
                SendCommand {
                    commands: vec!["x".repeat(SCRIPT_MAX)],
                    ..req()
                },
                Commands,
                Kind::TooLarge,
                "the script is 65537 bytes; the limit is 65536",
            ),
            (
                SendCommand {
                    commands: vec!["echo a\0b".into()],
                    ..req()
                },
                Commands,
                Kind::Invalid,
                "commands contain a NUL byte",
            ),
            (
                SendCommand {
                    working_directory: Some("tmp".into()),
                    ..req()
                },
                WorkingDirectory,
                Kind::Invalid,
                "working directory \"tmp\" must be an absolute path",
            ),
            (
                SendCommand {
                    working_directory: Some(format!("/{}", "d".repeat(WORKING_DIR_MAX))),
                    ..req()
                },
                WorkingDirectory,
                Kind::Invalid,
                "working directory is longer than 4096 bytes",
            ),
            (
                SendCommand {
                    working_directory: Some("/tmp/a\0b".into()),
                    ..req()
                },
                WorkingDirectory,
                Kind::Invalid,
                "working directory contains a NUL byte",
            ),
            (
                SendCommand {
                    execution_timeout_secs: Some(0),
                    ..req()
                },
                ExecutionTimeout,
                Kind::Invalid,
                "execution timeout 0 s is out of range: 1 to 172800 s",
            ),
            (
                SendCommand {
                    execution_timeout_secs: Some(EXECUTION_TIMEOUT_MAX + 1),
                    ..req()
                },
                ExecutionTimeout,
                Kind::Invalid,
                "execution timeout 172801 s is out of range: 1 to 172800 s",
            ),
            (
                SendCommand {
                    delivery_timeout_secs: Some(0),
                    ..req()
                },
                DeliveryTimeout,
                Kind::Invalid,
                "delivery timeout 0 s is out of range: 1 to 2592000 s",
            ),
            (
                SendCommand {
                    delivery_timeout_secs: Some(DELIVERY_TIMEOUT_MAX + 1),
                    ..req()
                },
                DeliveryTimeout,
                Kind::Invalid,
                "delivery timeout 2592001 s is out of range: 1 to 2592000 s",
            ),
            (
                SendCommand {
                    comment: Some("c".repeat(COMMENT_MAX + 1)),
                    ..req()
                },
                Comment,
                Kind::Invalid,
                "comment is longer than 100 characters",
            ),
            (
                SendCommand {
                    max_concurrency: Some("0".into()),
                    ..req()
                },
                MaxConcurrency,
                Kind::Invalid,
                "max-concurrency \"0\" must be at least 1 or 1%",
            ),
            (
                SendCommand {
                    max_concurrency: Some("101%".into()),
                    ..req()
                },
                MaxConcurrency,
                Kind::Invalid,
                "max-concurrency \"101%\" must be a whole number (e.g. 10) or a percentage from 0% to 100% (e.g. 25%)",
            ),
            (
                SendCommand {
                    max_errors: Some("-1".into()),
                    ..req()
                },
                MaxErrors,
                Kind::Invalid,
                "max-errors \"-1\" must be a whole number (e.g. 10) or a percentage from 0% to 100% (e.g. 25%)",
            ),
            (
                SendCommand {
                    run_as: Some("a b".into()),
                    ..req()
                },
                RunAs,
                Kind::Invalid,
                "run-as user \"a b\" is not a valid user name or uid",
            ),
            (
                SendCommand {
                    run_as: Some("u".repeat(RUN_AS_MAX + 1)),
                    ..req()
                },
                RunAs,
                Kind::Invalid,
                "run-as user \"uuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuuu\" is not a valid user name or uid",
            ),
            (
                SendCommand {
                    run_as: Some("root\0".into()),
                    ..req()
                },
                RunAs,
                Kind::Invalid,
                "run-as user \"root\\0\" is not a valid user name or uid",
            ),
            (
                SendCommand {
                    output_s3_bucket: Some("Bad_Bucket".into()),
                    ..req()
                },
                OutputS3Bucket,
                Kind::Invalid,
                "\"Bad_Bucket\" is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit",
            ),
            (
                SendCommand {
                    output_s3_bucket: Some("-ab".into()),
                    ..req()
                },
                OutputS3Bucket,
                Kind::Invalid,
                "\"-ab\" is not a valid S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit",
            ),
            (
                SendCommand {
                    output_s3_bucket: Some("out".into()),
                    output_s3_prefix: Some("p".repeat(OUTPUT_S3_PREFIX_MAX + 1)),
                    ..req()
                },
                OutputS3Prefix,
                Kind::Invalid,
                "the S3 key prefix is 501 bytes; the limit is 500",
            ),
            (
                SendCommand {
                    output_s3_bucket: Some("out".into()),
                    output_s3_prefix: Some("a/../b".into()),
                    ..req()
                },
                OutputS3Prefix,
                Kind::Invalid,
                "\"a/../b\" is not a valid S3 key prefix: no control characters and no empty, \".\" or \"..\" path segment",
            ),
            (
                SendCommand {
                    output_s3_prefix: Some("p".into()),
                    ..req()
                },
                OutputS3Prefix,
                Kind::Invalid,
                "output_s3_prefix needs output_s3_bucket",
            ),
            (
                SendCommand {
                    output_s3_bucket: Some("out".into()),
                    output_s3_region: Some("EU".into()),
                    ..req()
                },
                OutputS3Region,
                Kind::Invalid,
                "\"EU\" is not a region name: 3 to 20 lowercase letters, digits and hyphens",
            ),
            (
                SendCommand {
                    memory_limit_mb: Some(MEMORY_LIMIT_MIN_MB - 1),
                    ..req()
                },
                MemoryLimit,
                Kind::Invalid,
                "memory limit 3 MiB is out of range: 4 to 1048576 MiB",
            ),
            (
                SendCommand {
                    memory_limit_mb: Some(MEMORY_LIMIT_MAX_MB + 1),
                    ..req()
                },
                MemoryLimit,
                Kind::Invalid,
                "memory limit 1048577 MiB is out of range: 4 to 1048576 MiB",
            ),
            (
                SendCommand {
                    cpu_limit_percent: Some(0),
                    ..req()
                },
                CpuLimit,
                Kind::Invalid,
                "cpu limit 0% is out of range: 1% to 102400%",
            ),
            (
                SendCommand {
                    cpu_limit_percent: Some(CPU_LIMIT_MAX_PERCENT + 1),
                    ..req()
                },
                CpuLimit,
                Kind::Invalid,
                "cpu limit 102401% is out of range: 1% to 102400%",
            ),
        ];
        for (req, field, kind, message) in table {
            let e = check(&req).expect_err(message);
            assert_eq!(
                (e.field, e.kind, e.message.as_str()),
                (field, kind, message)
            );
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn fields_are_named_as_in_the_json_body() {
        let body = serde_json::to_value(SendCommand::default()).unwrap();
        for f in [
            Field::Commands,
            Field::WorkingDirectory,
            Field::ExecutionTimeout,
            Field::DeliveryTimeout,
            Field::Comment,
            Field::MaxConcurrency,
            Field::MaxErrors,
            Field::RunAs,
            Field::MemoryLimit,
            Field::CpuLimit,
        ] {
            assert!(body.get(f.name()).is_some(), "{}", f.name());
        }
    }
}
