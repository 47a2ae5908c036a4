//! `fleetrun server --database`: a server on PostgreSQL (the tests' own cluster) runs a command,
//! keeps it over a restart and says how big its database is; a second server on the same
//! database, a database that is not one and one that cannot be reached are refused at start with
//! an error naming it, never its password.

use crate::support::{Agent, Server, fleetrun_bin, free_port, run};
use std::process::Command;
use std::time::{Duration, Instant};

/// `fleetrun server` on a fresh data dir with `database`, expected to exit at start: its stderr
/// and how long it took.
fn refused_start(database: &str) -> (String, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(fleetrun_bin());
    cmd.args(["server", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", &format!("127.0.0.1:{}", free_port("127.0.0.1"))])
        .args(["--database", database])
        .env_remove("FLEETRUN_SERVER_CONFIG");
    let start = Instant::now();
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    (out.stderr, start.elapsed())
}

#[test]
fn a_server_on_postgres_runs_commands_and_is_the_only_one_on_its_database() {
    let pg = fleetrun_testkit::shared_postgres();
    let url = pg.create_database();
    let mut server = Server::start_with(&["--database", &url]);
    let _a = Agent::start(&server, "pg-a", &[]);
    let node = server.wait_online("pg-a")["node_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let c = server
        .cli(&[
            "send",
            "--node",
            &node,
            "--wait",
            "-o",
            "json",
            "--",
            "echo on-postgres",
        ])
        .ok()
        .json();
    let id = c["command_id"].as_str().expect("id").to_owned();
    assert_eq!(c["status"], "Success", "{c}");
    // The rows are PostgreSQL's, not a SQLite file's.
    let name = url.rsplit('/').next().expect("name");
    let status = pg.psql(
        name,
        &format!("SELECT status FROM commands WHERE command_id = '{id}'"),
    );
    assert_eq!(status, "Success");
    assert!(!server.data_dir.join("fleetrun.db").exists());
    let storage = server.cli(&["storage", "-o", "json"]).ok().json();
    assert!(
        storage["database_bytes"].as_u64().unwrap_or(0) > 0,
        "{storage}"
    );

    // A second server on the same database is refused, naming it.
    let (err, _) = refused_start(&url);
    assert!(
        err.contains("another fleetrun server uses database") && err.contains(&url),
        "{err}"
    );

    // After a crash the server starts again on the database and has the command and its output.
    server.restart();
    let out = server.cli(&["output", &id, &node]).ok().stdout_str();
    assert_eq!(out, "on-postgres\n");
}

#[test]
fn a_database_that_is_not_one_or_cannot_be_reached_stops_the_start_naming_it() {
    let (err, _) = refused_start("mysql://root:hunter2@db/fleet");
    assert!(
        err.contains("neither a postgres:// URL nor sqlite:PATH") && !err.contains("hunter2"),
        "{err}"
    );
    // Nothing listens on the port: refused within the connect budget, the password not shown.
    let port = free_port("127.0.0.1");
    let (err, took) = refused_start(&format!("postgres://fleet:hunter2@127.0.0.1:{port}/fleet"));
    assert!(
        err.contains(&format!(
            "cannot open database postgres://fleet:***@127.0.0.1:{port}/fleet"
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}
