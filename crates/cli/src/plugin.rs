//! `session-manager-plugin`: what the AWS CLI runs after `aws ssm start-session`. Installed as a
//! link to `fleetrun` under that name, `fleetrun` joins the session StartSession started (the
//! answer's StreamUrl and TokenValue) as `fleetrun shell -t --stream-url` does, so the AWS CLI's
//! `start-session` works against fleetrun unchanged.
//!
//! The AWS CLI calls `session-manager-plugin --version`, then `session-manager-plugin RESPONSE
//! REGION StartSession PROFILE PARAMETERS ENDPOINT`, where RESPONSE is StartSession's answer as
//! JSON, or, for a plugin of version [`PLUGIN_VERSION`] or later, the name of the environment
//! variable holding it (which keeps the token out of the process list).

use std::ffi::OsString;

/// The plugin version this entry point answers `--version` with: one that gets the answer
/// through an environment variable and draws no "outdated plugin" warning from the AWS CLI.
pub const PLUGIN_VERSION: &str = "1.2.764.0";

/// The name this entry point is reached by.
pub const PLUGIN_NAME: &str = "session-manager-plugin";

/// What to do when run as the plugin.
#[derive(Debug, PartialEq, Eq)]
pub enum Plugin {
    /// Print [`PLUGIN_VERSION`].
    Version,
    /// Run `fleetrun` with these arguments.
    Run(Vec<OsString>),
}

/// Whether `argv0` names the plugin.
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == PLUGIN_NAME)
}

/// The `fleetrun` command line for the plugin's arguments (the first is the program), or why
/// they are not what the AWS CLI passes.
pub fn command_line(
    args: &[OsString],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Plugin, String> {
    let args: Vec<&str> = args
        .iter()
        .skip(1)
        .map(|a| a.to_str().ok_or("an argument is not UTF-8"))
        .collect::<Result<_, _>>()?;
    match args.as_slice() {
        ["--version"] => return Ok(Plugin::Version),
        [_, _, "StartSession", ..] => {}
        [_, _, other, ..] => {
            return Err(format!(
                "fleetrun's {PLUGIN_NAME} serves StartSession, not {other}"
            ));
        }
        _ => {
            return Err(format!(
                "usage: {PLUGIN_NAME} RESPONSE REGION StartSession [PROFILE PARAMETERS ENDPOINT] (what `aws ssm start-session` runs)"
            ));
        }
    }
    let given = args[0];
    // An environment variable's name, else the JSON itself.
    let response = if given.trim_start().starts_with('{') {
        given.to_owned()
    } else {
        env(given).ok_or_else(|| format!("the environment variable {given} is not set"))?
    };
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Started {
        stream_url: String,
        token_value: String,
    }
    let started: Started = serde_json::from_str(&response)
        .map_err(|e| format!("StartSession's answer is not what fleetrun hands out: {e}"))?;
    let mut out: Vec<OsString> = vec!["fleetrun".into()];
    // The AWS CLI's trust (the server's own CA) is the plugin's, unless fleetrun's is set.
    if env("FLEETRUN_CA_CERT").is_none()
        && let Some(bundle) = env("AWS_CA_BUNDLE").filter(|b| !b.is_empty())
    {
        out.extend(["--ca-cert".into(), bundle.into()]);
    }
    out.extend(
        ["shell", "-t", "--stream-url", &started.stream_url]
            .into_iter()
            .map(OsString::from),
    );
    // Parsed in this process: no new process's arguments show the token.
    out.push("--session-token".into());
    out.push(started.token_value.into());
    Ok(Plugin::Run(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        std::iter::once(PLUGIN_NAME)
            .chain(a.iter().copied())
            .map(OsString::from)
            .collect()
    }

    const ANSWER: &str =
        r#"{"SessionId":"s","TokenValue":"t0k","StreamUrl":"wss://h:1/v1/sessions/s/stream"}"#;

    #[test]
    fn the_aws_cli_calls_are_understood() {
        let none = |_: &str| None;
        assert_eq!(
            command_line(&args(&["--version"]), none),
            Ok(Plugin::Version)
        );
        let by_env = |k: &str| (k == "AWS_SSM_START_SESSION_RESPONSE").then(|| ANSWER.to_owned());
        let call = [
            "AWS_SSM_START_SESSION_RESPONSE",
            "us-east-1",
            "StartSession",
            "",
            "{}",
            "https://h:1",
        ];
        let Ok(Plugin::Run(run)) = command_line(&args(&call), by_env) else {
            panic!("not a run");
        };
        let run: Vec<_> = run
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            run,
            [
                "fleetrun",
                "shell",
                "-t",
                "--stream-url",
                "wss://h:1/v1/sessions/s/stream",
                "--session-token",
                "t0k"
            ]
        );
        let inline = [ANSWER, "us-east-1", "StartSession"];
        assert!(matches!(
            command_line(&args(&inline), none),
            Ok(Plugin::Run(_))
        ));
    }

    #[test]
    fn other_calls_are_refused_by_name() {
        let none = |_: &str| None;
        let e = command_line(&args(&["X", "r", "StartSsh"]), none).expect_err("refused");
        assert!(e.contains("not StartSsh"), "{e}");
        let e = command_line(&args(&["NOPE", "r", "StartSession"]), none).expect_err("refused");
        assert!(e.contains("NOPE is not set"), "{e}");
        let e =
            command_line(&args(&["{\"x\":1}", "r", "StartSession"]), none).expect_err("refused");
        assert!(e.contains("not what fleetrun hands out"), "{e}");
        assert!(command_line(&args(&[]), none).is_err());
    }
}
