//! The house rules that can be checked mechanically, over the whole workspace: every Rust file opens
//! with a `//!` line, the crates keep their layering (what each may depend on, transitively,
//! through normal dependencies), read from `cargo metadata`, and README's table of SSM, EC2 and
//! STS operations is the servers' dispatch.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this crate is `crates/cli`).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .expect("crates/cli is two levels below the root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_file_opens_with_a_doc_line() {
    let crates = workspace_root().join("crates");
    let mut files = Vec::new();
    for krate in std::fs::read_dir(&crates).expect("read crates/").flatten() {
        rust_files(&krate.path().join("src"), &mut files);
        rust_files(&krate.path().join("tests"), &mut files);
    }
    assert!(files.len() > 100, "only {} files found", files.len());
    let missing: Vec<String> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            let first = text.lines().find(|l| !l.starts_with("#![")).unwrap_or("");
            !first.starts_with("//!")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(
        missing.is_empty(),
        "these files must open with a `//!` line:\n{}",
        missing.join("\n")
    );
}

/// Every package each workspace crate pulls in through normal dependencies, transitively, by
/// name (from `cargo metadata`'s resolve graph, for the host's target).
fn normal_closures() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The host's packages only: other platforms' dependencies need not even be downloaded.
    let version = Command::new(&cargo)
        .arg("-vV")
        .output()
        .expect("run cargo -vV");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("cargo -vV names the host");
    let out = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .args(["--filter-platform", host])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    // Each node's normal (not dev, not build) dependencies, by package id.
    let mut normal: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().expect("resolve nodes") {
        let id = node["id"].as_str().expect("node id");
        let deps = node["deps"].as_array().expect("deps").iter().filter(|d| {
            d["dep_kinds"]
                .as_array()
                .is_some_and(|ks| ks.iter().any(|k| k["kind"].is_null()))
        });
        normal.insert(id, deps.filter_map(|d| d["pkg"].as_str()).collect());
    }
    let mut closures = BTreeMap::new();
    for member in meta["workspace_members"].as_array().expect("members") {
        let id = member.as_str().expect("member id");
        let mut seen = BTreeSet::new();
        let mut todo = vec![id];
        while let Some(next) = todo.pop() {
            for dep in normal.get(next).into_iter().flatten() {
                if seen.insert(*dep) {
                    todo.push(dep);
                }
            }
        }
        closures.insert(
            names[id].to_owned(),
            seen.iter().map(|d| names[d].to_owned()).collect(),
        );
    }
    closures
}

#[test]
fn crates_keep_their_layering() {
    let closures = normal_closures();
    let forbidden: [(&str, &[&str]); 3] = [
        // Wire types only: no runtime, no HTTP, no database.
        ("fleetrun-proto", &["tokio", "axum", "sqlx", "hyper"]),
        // The agent never touches a database or serves HTTP.
        (
            "fleetrun-agent",
            &["sqlx", "axum", "fleetrun-server", "fleetrun-store"],
        ),
        // SQL only: no HTTP, no server module.
        ("fleetrun-store", &["axum", "hyper", "fleetrun-server"]),
    ];
    let mut broken = Vec::new();
    for (krate, banned) in forbidden {
        let deps = closures
            .get(krate)
            .unwrap_or_else(|| panic!("{krate} is not a workspace member"));
        assert!(!deps.is_empty(), "{krate} has no dependencies at all?");
        for b in banned {
            if deps.contains(*b) {
                broken.push(format!("{krate} depends on {b}"));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken: {}", broken.join("; "));
    // The check itself sees what it should: the server does pull these in.
    let server = &closures["fleetrun-server"];
    for dep in ["tokio", "axum", "sqlx", "hyper", "fleetrun-store"] {
        assert!(server.contains(dep), "fleetrun-server lacks {dep}");
    }
}

/// Only the store names a database: the server reaches SQL through `fleetrun-store`'s calls, so a
/// second implementation (PostgreSQL) changes no server code.
#[test]
fn only_the_store_depends_on_sqlx_directly() {
    for krate in ["proto", "server", "agent", "cli"] {
        let path = workspace_root()
            .join("crates")
            .join(krate)
            .join("Cargo.toml");
        let text = std::fs::read_to_string(&path).expect("read Cargo.toml");
        let direct = text
            .lines()
            .any(|l| l.trim_start().starts_with("sqlx") && !l.trim_start().starts_with("sqlx-"));
        assert!(!direct, "{} names sqlx", path.display());
    }
}

/// The operation names a dispatch `match` in `file` answers (`"Name" =>` arms).
fn dispatched(file: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix('"')?;
            let (name, after) = rest.split_once('"')?;
            let arm = after.trim_start().starts_with("=>");
            (arm && name.starts_with(|c: char| c.is_ascii_uppercase())
                && name.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| name.to_owned())
        })
        .collect()
}

#[test]
fn the_readme_table_lists_every_ssm_ec2_and_sts_operation_served_and_no_other() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut listed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for line in readme.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, api @ ("SSM" | "EC2" | "STS"), op, ..] = cells[..] {
            listed.entry(api).or_default().insert(op.to_owned());
        }
    }
    let server = root.join("crates/server/src");
    for (api, file) in [
        ("SSM", "ssm/mod.rs"),
        ("EC2", "query/ec2.rs"),
        ("STS", "query/sts.rs"),
    ] {
        let served = dispatched(&server.join(file));
        let table = listed.get(api).cloned().unwrap_or_default();
        assert!(!served.is_empty(), "no operations found in {file}");
        assert_eq!(
            table, served,
            "README.md's operation table ({api} rows) and {file}'s dispatch disagree"
        );
    }
}
