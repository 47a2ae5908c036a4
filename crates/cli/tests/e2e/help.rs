//! `--help` snapshots (so a changed flag shows up in review); the tidiness rules are in `tests/house.rs`.
//!
//! Refresh the snapshots with `FLEETRUN_UPDATE_SNAPSHOTS=1 cargo test -p fleetrun-cli --test e2e help`.

use crate::support::{fleetrun_bin, run};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn snapshot(name: &str, args: &[&str]) {
    let mut c = Command::new(fleetrun_bin());
    c.args(args)
        .env_remove("FLEETRUN_SERVER")
        .env_remove("FLEETRUN_TOKEN");
    let out = run(c, Duration::from_secs(30)).ok();
    let got = out.stdout_str();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("FLEETRUN_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &got).expect("write snapshot");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; set FLEETRUN_UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert_eq!(
        got,
        want,
        "`fleetrun {}` changed; set FLEETRUN_UPDATE_SNAPSHOTS=1 if intended",
        args.join(" ")
    );
}

#[test]
fn help_snapshots() {
    snapshot("help", &["--help"]);
    snapshot("send-help", &["send", "--help"]);
    snapshot("server-help", &["server", "--help"]);
    snapshot("documents-help", &["documents", "--help"]);
    snapshot("access-key-help", &["access-key", "--help"]);
    snapshot("shell-help", &["shell", "--help"]);
}
