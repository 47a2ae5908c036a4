//! Issue 12, "File transfer": `fleetrun cp LOCAL NODE:PATH` and `fleetrun cp NODE:PATH LOCAL`
//! through the real server and agent: a 300 MB file up and down byte-exact (SHA-256 compared),
//! mode and owner set, no temp file left, refusals named, the trail written.

use crate::support::{Agent, Server, run, wait_until};
use sha2::Digest;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

/// Writes `len` bytes of a xorshift stream to `path` in chunks (never whole in memory) and
/// returns their SHA-256.
fn generate(path: &Path, len: usize) -> String {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut hasher = sha2::Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        for b in chunk[..n].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        hasher.update(&chunk[..n]);
        f.write_all(&chunk[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
    hex::encode(hasher.finalize())
}

fn sha_of(path: &Path) -> String {
    let mut f = std::fs::File::open(path).expect("open");
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher).expect("read");
    hex::encode(hasher.finalize())
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

fn audited(server: &Server, action: &str) -> Vec<serde_json::Value> {
    server
        .get_json(&format!("/v1/audit?action={action}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_300_mb_file_goes_up_and_down_byte_exact_with_mode_and_owner() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cp-a", &[]);
    let node = server.wait_online("cp-a")["node_id"]
        .as_str()
        .expect("node id")
        .to_owned();
    let local = tempfile::tempdir().expect("tempdir");
    let remote = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("big.bin");
    let sha = generate(&src, 300 * 1024 * 1024);
    let target = remote.path().join("big.bin");
    let dst = format!("{node}:{}", target.display());
    let out = run(
        server.cli_cmd(&[
            "cp",
            src.to_str().unwrap(),
            &dst,
            "--mode",
            "0750",
            "--owner",
            "nobody:nogroup",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout_str().contains(&sha), "{}", out.stdout_str());
    assert_eq!(sha_of(&target), sha);
    let meta = std::fs::metadata(&target).expect("the file on the node");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "nobody:nogroup");
    assert_eq!(names(remote.path()), ["big.bin"], "no temp file left");

    // Down again, into a directory (the file keeps its name), as JSON.
    let back = tempfile::tempdir().expect("tempdir");
    let out = run(
        server.cli_cmd(&["cp", &dst, back.path().to_str().unwrap(), "-o", "json"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let copied = out.json();
    assert_eq!(copied["sha256"], sha.as_str(), "{copied}");
    assert_eq!(copied["size"], 300 * 1024 * 1024, "{copied}");
    let down = back.path().join("big.bin");
    assert_eq!(sha_of(&down), sha);
    assert_eq!(
        std::fs::metadata(&down).unwrap().permissions().mode() & 0o777,
        0o750
    );
    assert_eq!(names(back.path()), ["big.bin"], "no temp file left");

    // Both are in the trail with path, size and hash.
    let puts = wait_until("the put's audit", LIMIT, || {
        let r = audited(&server, "cp.put");
        (!r.is_empty()).then_some(r)
    });
    let p = &puts[0]["params"];
    assert_eq!(puts[0]["result"], "Done", "{puts:?}");
    assert_eq!(p["path"], target.to_str().unwrap(), "{p}");
    assert_eq!(p["sha256"], sha.as_str(), "{p}");
    assert_eq!(p["owner"], "nobody", "{p}");
    let gets = audited(&server, "cp.get");
    assert_eq!(gets[0]["params"]["sha256"], sha.as_str(), "{gets:?}");
}

#[test]
fn refused_copies_say_why_and_write_nothing() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cp-r", &[]);
    let node = server.wait_online("cp-r")["node_id"]
        .as_str()
        .expect("node id")
        .to_owned();
    let local = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("f");
    std::fs::write(&src, b"hello").unwrap();
    let src = src.to_str().unwrap();
    let remote = tempfile::tempdir().expect("tempdir");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                src.into(),
                format!("{node}:{}/no/such/f", remote.path().display()),
            ],
            "no directory",
        ),
        (vec![src.into(), format!("{node}:relative/f")], "bad path"),
        (
            vec![src.into(), format!("{node}:{}", remote.path().display())],
            "is a directory",
        ),
        (
            vec![
                format!("{node}:{}/missing", remote.path().display()),
                local.path().join("m").to_str().unwrap().into(),
            ],
            "no such file",
        ),
        (
            vec![
                format!("{node}:{}", remote.path().display()),
                local.path().join("d").to_str().unwrap().into(),
            ],
            "is a directory",
        ),
        (
            vec![src.into(), local.path().join("g").to_str().unwrap().into()],
            "one side must be NODE:PATH",
        ),
        (
            vec![
                src.into(),
                format!("{node}:/tmp/x"),
                "--mode".into(),
                "9".into(),
            ],
            "bad --mode",
        ),
        (
            vec![
                src.into(),
                format!("{node}:{}/o", remote.path().display()),
                "--owner".into(),
                "no-such-user-x".into(),
            ],
            "no such user",
        ),
    ];
    for (args, says) in cases {
        let mut all = vec!["cp"];
        all.extend(args.iter().map(String::as_str));
        let out = run(server.cli_cmd(&all), LIMIT);
        assert_eq!(out.code(), Some(1), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(says),
            "{args:?}: {:?} should say {says:?}",
            out.stderr
        );
    }
    assert!(
        names(remote.path()).is_empty(),
        "{:?}",
        names(remote.path())
    );
    assert_eq!(names(local.path()), ["f"]);

    // A user whose policy lacks `cp` is refused.
    let policy = server.dir.path().join("lister.cedar");
    std::fs::write(
        &policy,
        "permit (principal, action == Action::\"shell\", resource);\n",
    )
    .unwrap();
    server
        .cli(&[
            "users",
            "create",
            "sheller",
            "--role",
            "none",
            "--policy",
            policy.to_str().unwrap(),
        ])
        .ok();
    let token = server
        .cli(&["tokens", "create", "--user", "sheller", "-o", "json"])
        .ok()
        .json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let dst = format!("{node}:{}/denied", remote.path().display());
    let mut cmd = server.cli_cmd(&["cp", src, &dst]);
    cmd.env("FLEETRUN_TOKEN", &token);
    let out = run(cmd, LIMIT);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("AccessDenied"), "{}", out.stderr);
    assert!(names(remote.path()).is_empty());
}

/// The agent's link goes down mid-copy, each way: the copy is retried once the node is back and
/// resumes from what was written (the node's temp file for a put, ours for a get) instead of
/// starting over; meanwhile the final name holds nothing, and at the end the whole file, checked.
#[test]
fn a_copy_cut_by_a_network_drop_resumes_and_never_leaves_a_half_file() {
    let ns = match crate::faults_netcut::NetNs::create() {
        Ok(ns) => ns,
        Err(e) => {
            // The cut needs root and `ip netns`; without them there is nothing to cut.
            eprintln!("network namespaces unavailable ({e}); skipping the cut");
            return;
        }
    };
    let server = Server::start_on(&ns.host_ip, &[]);
    let opts = crate::support::AgentOpts {
        netns: Some(ns.name.clone()),
        ..Default::default()
    };
    let _agent = Agent::start_opts(&server, "cp-cut", opts);
    let node = server.node_id("cp-cut");
    let local = tempfile::tempdir().expect("tempdir");
    let remote = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("big.bin");
    let sha = generate(&src, 200 * 1024 * 1024);
    let target = remote.path().join("big.bin");
    let dst = format!("{node}:{}", target.display());

    // The put's temp file is named after its resume key (from the file's identity and times),
    // the get's after the target.
    let partial_in = |dir: &Path, prefix: &str| {
        std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".part"))
            })
        })
    };
    let cut_when = |what: &str, dir: &Path, prefix: &str| {
        wait_until(what, LIMIT, || {
            let file = partial_in(dir, prefix)?;
            let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
            (len > 8 * 1024 * 1024).then_some(())
        });
        ns.link(false);
        server.wait_ping("cp-cut", "ConnectionLost", Duration::from_secs(20));
        ns.link(true);
    };

    let child = server
        .cli_cmd(&["cp", src.to_str().unwrap(), &dst])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cp");
    cut_when(
        "the put to be under way",
        remote.path(),
        ".big.bin.fleetrun-",
    );
    assert!(!target.exists(), "a half file under the final name");
    let out = child.wait_with_output().expect("cp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert_eq!(sha_of(&target), sha);
    assert_eq!(names(remote.path()), ["big.bin"]);
    // The last attempt started past the beginning: it resumed.
    let puts = wait_until("the put's audit", LIMIT, || {
        let r = audited(&server, "cp.put");
        r.iter().any(|r| r["result"] == "Done").then_some(r)
    });
    let done = puts.iter().find(|r| r["result"] == "Done").unwrap();
    assert!(
        done["params"]["offset"].as_u64().unwrap_or(0) > 0,
        "{puts:?}"
    );

    // And down.
    let back = tempfile::tempdir().expect("tempdir");
    let down = back.path().join("down.bin");
    let child = server
        .cli_cmd(&["cp", &dst, down.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cp");
    cut_when(
        "the get to be under way",
        back.path(),
        ".down.bin.fleetrun-get",
    );
    assert!(!down.exists(), "a half file under the final name");
    let out = child.wait_with_output().expect("cp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("retrying"), "{stderr}");
    assert_eq!(sha_of(&down), sha);
    assert_eq!(names(back.path()), ["down.bin"]);
    let gets = audited(&server, "cp.get");
    let done = gets
        .iter()
        .find(|r| r["result"] == "Done")
        .expect("a done get");
    assert!(
        done["params"]["offset"].as_u64().unwrap_or(0) > 0,
        "{gets:?}"
    );
}

/// `cp` by target expression: to each of the 5 nodes tagged `role=web` (not the untagged one),
/// from each into `DIR/<node-id>/NAME`, and with `--max-errors` no more copies start once more
/// than that failed. (The agents share this machine's disk, so the puts go one at a time to the
/// same path; each node's put is in the trail.)
#[test]
fn cp_to_and_from_many_nodes_by_tag() {
    let server = Server::start();
    let agents: Vec<Agent> = (0..5)
        .map(|i| Agent::start(&server, &format!("web-{i}"), &[("role", "web")]))
        .collect();
    let _other = Agent::start(&server, "db-0", &[("role", "db")]);
    let web: Vec<String> = (0..5)
        .map(|i| server.node_id(&format!("web-{i}")))
        .collect();
    for i in 0..5 {
        server.wait_online(&format!("web-{i}"));
    }
    let local = tempfile::tempdir().expect("tempdir");
    let remote = tempfile::tempdir().expect("tempdir");
    let src = local.path().join("tool.bin");
    let sha = generate(&src, 3 * 1024 * 1024 + 1);
    let target = remote.path().join("tool.bin");
    let dst = format!("tag:role=web:{}", target.display());
    let out = run(
        server.cli_cmd(&[
            "cp",
            src.to_str().unwrap(),
            &dst,
            "--max-concurrency",
            "1",
            "--mode",
            "0700",
            "-o",
            "json",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let outcomes = out.json();
    let outcomes = outcomes.as_array().expect("one outcome a node");
    let mut nodes: Vec<&str> = outcomes
        .iter()
        .map(|o| o["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    let mut expected: Vec<&str> = web.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(nodes, expected, "the five web nodes, not db-0");
    assert!(
        outcomes
            .iter()
            .all(|o| o["copied"]["sha256"] == sha.as_str()),
        "{outcomes:?}"
    );
    assert_eq!(sha_of(&target), sha);
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    let puts = wait_until("five puts in the trail", LIMIT, || {
        let r = audited(&server, "cp.put");
        (r.iter().filter(|r| r["result"] == "Done").count() == 5).then_some(r)
    });
    let mut audited_nodes: Vec<String> = puts
        .iter()
        .map(|r| r["node_ids"][0].as_str().unwrap_or_default().to_owned())
        .collect();
    audited_nodes.sort();
    assert_eq!(audited_nodes, expected);

    // From each into DIR/<node-id>/tool.bin.
    let into = tempfile::tempdir().expect("tempdir");
    let out = run(
        server.cli_cmd(&["cp", &dst, into.path().to_str().unwrap()]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("5 of 5 nodes copied"), "{}", out.stderr);
    for id in &web {
        assert_eq!(sha_of(&into.path().join(id).join("tool.bin")), sha, "{id}");
    }
    assert_eq!(names(into.path()).len(), 5);

    // A directory no node has: one at a time, two failures (more than --max-errors 1), then the
    // rest are not started.
    let bad = format!("tag:role=web:{}/missing/f", remote.path().display());
    let out = run(
        server.cli_cmd(&[
            "cp",
            src.to_str().unwrap(),
            &bad,
            "--max-concurrency",
            "1",
            "--max-errors",
            "1",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("no directory").count(),
        2,
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("not started").count(),
        3,
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("0 of 5 nodes copied"), "{}", out.stderr);
    let out = run(
        server.cli_cmd(&["cp", src.to_str().unwrap(), "tag:role=none:/tmp/x"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("no node matches"), "{}", out.stderr);
    drop(agents);
}

/// `cp -r DIR NODE:PATH` puts every file under PATH with its relative path, making the missing
/// directories; without `-r` a directory is refused.
#[test]
fn a_directory_goes_up_with_r() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cp-tree", &[]);
    let node = server.node_id("cp-tree");
    server.wait_online("cp-tree");
    let local = tempfile::tempdir().expect("tempdir");
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), b"a").unwrap();
    std::fs::write(tree.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(tree.join("sub/deeper/c"), b"").unwrap();
    std::os::unix::fs::symlink(tree.join("a.txt"), tree.join("link")).unwrap();
    let remote = tempfile::tempdir().expect("tempdir");
    let dst = format!("{node}:{}/new/place", remote.path().display());
    let out = run(server.cli_cmd(&["cp", tree.to_str().unwrap(), &dst]), LIMIT);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("is a directory (copy it with -r)"),
        "{}",
        out.stderr
    );
    let out = run(
        server.cli_cmd(&["cp", "-r", tree.to_str().unwrap(), &dst]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("4 files, 300002 bytes"),
        "{}",
        out.stderr
    );
    let placed = remote.path().join("new/place");
    assert_eq!(std::fs::read(placed.join("a.txt")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(placed.join("link")).unwrap(),
        b"a",
        "a symlink's file"
    );
    assert_eq!(
        std::fs::read(placed.join("sub/b.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(std::fs::read(placed.join("sub/deeper/c")).unwrap(), b"");
    assert_eq!(names(&placed), ["a.txt", "link", "sub"]);
}

/// `cp -r NODE:DIR LOCAL` gets every regular file under DIR (listed by `find` on the node) into
/// LOCAL with its relative path; symlinks on the node are skipped (one pointing out of the tree
/// brings nothing), a tree deeper than the limit is refused, a path with shell characters is
/// quoted, a missing directory is named.
#[test]
fn a_directory_comes_down_with_r() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cp-down", &[]);
    let node = server.node_id("cp-down");
    server.wait_online("cp-down");
    let remote = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("secret"), b"outside").unwrap();
    let marker = remote.path().join("pwned");
    // The directory's name would run a command if it were not quoted.
    let tree = remote
        .path()
        .join(format!("it's $(touch {})", marker.display()));
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    std::fs::write(tree.join("a.txt"), b"a").unwrap();
    std::fs::write(tree.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    std::fs::write(tree.join("sub/deeper/c"), b"").unwrap();
    std::fs::set_permissions(tree.join("a.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), tree.join("out-file")).unwrap();
    std::os::unix::fs::symlink(outside.path(), tree.join("out-dir")).unwrap();
    let local = tempfile::tempdir().expect("tempdir");
    let into = local.path().join("copy");
    let src = format!("{node}:{}", tree.display());

    let out = run(server.cli_cmd(&["cp", &src, into.to_str().unwrap()]), LIMIT);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("is a directory"), "{}", out.stderr);

    let out = run(
        server.cli_cmd(&["cp", "-r", &src, into.to_str().unwrap()]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("3 files, 300001 bytes"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("out-file: a symlink"), "{}", out.stderr);
    assert!(out.stderr.contains("out-dir: a symlink"), "{}", out.stderr);
    assert!(!marker.exists(), "the path ran as a command");
    assert_eq!(std::fs::read(into.join("a.txt")).unwrap(), b"a");
    assert_eq!(
        std::fs::metadata(into.join("a.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert_eq!(
        std::fs::read(into.join("sub/b.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(std::fs::read(into.join("sub/deeper/c")).unwrap(), b"");
    assert_eq!(names(&into), ["a.txt", "sub"], "no symlink, no empty dir");
    assert_eq!(
        names(&into.join("sub")),
        ["b.bin", "deeper"],
        "no temp file"
    );

    // JSON: one entry a file, and the gets are in the trail.
    let again = local.path().join("again");
    let out = run(
        server.cli_cmd(&["cp", "-r", &src, again.to_str().unwrap(), "-o", "json"]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let files = out.json();
    let mut paths: Vec<&str> = files
        .as_array()
        .expect("an array")
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    paths.sort();
    let base = tree.display().to_string();
    assert_eq!(
        paths,
        [
            format!("{base}/a.txt"),
            format!("{base}/sub/b.bin"),
            format!("{base}/sub/deeper/c")
        ]
    );
    wait_until("the gets in the trail", LIMIT, || {
        let r = audited(&server, "cp.get");
        (r.iter().filter(|r| r["result"] == "Done").count() >= 6).then_some(())
    });

    // Deeper than 32 levels: refused, nothing written.
    let deep = remote.path().join("deep");
    let mut d = deep.clone();
    for _ in 0..33 {
        d.push("d");
    }
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("f"), b"x").unwrap();
    let deep_into = local.path().join("deep");
    let out = run(
        server.cli_cmd(&[
            "cp",
            "-r",
            &format!("{node}:{}", deep.display()),
            deep_into.to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("levels deep: at most 32 are copied"),
        "{}",
        out.stderr
    );
    assert!(!deep_into.exists());

    // A directory the node does not have.
    let out = run(
        server.cli_cmd(&[
            "cp",
            "-r",
            &format!("{node}:{}/nope", remote.path().display()),
            local.path().to_str().unwrap(),
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no directory"), "{}", out.stderr);

    // A local symlink in the way is not written through.
    let trap = local.path().join("trap");
    std::fs::create_dir_all(&trap).unwrap();
    let victim = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(victim.path(), trap.join("sub")).unwrap();
    let out = run(
        server.cli_cmd(&["cp", "-r", &src, trap.to_str().unwrap()]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("not a directory"), "{}", out.stderr);
    assert!(names(victim.path()).is_empty());
}

/// `cp -r` with a target expression: a tree up to each node the expression matches, and each
/// node's tree down into DIR/NODE_ID/.
#[test]
fn a_directory_goes_to_and_from_many_nodes_with_r() {
    let server = Server::start();
    let agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(&server, &format!("tree-{i}"), &[("role", "tree")]))
        .collect();
    let ids: Vec<String> = (0..3)
        .map(|i| server.node_id(&format!("tree-{i}")))
        .collect();
    for i in 0..3 {
        server.wait_online(&format!("tree-{i}"));
    }
    let local = tempfile::tempdir().expect("tempdir");
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("x/y")).unwrap();
    std::fs::write(tree.join("top"), b"top").unwrap();
    let sha = generate(&tree.join("x/y/big"), 2 * 1024 * 1024 + 3);
    let remote = tempfile::tempdir().expect("tempdir");
    let dst = format!("tag:role=tree:{}/placed", remote.path().display());
    // The agents share this disk: one at a time, each writes the same tree.
    let out = run(
        server.cli_cmd(&[
            "cp",
            "-r",
            tree.to_str().unwrap(),
            &dst,
            "--max-concurrency",
            "1",
            "-o",
            "json",
        ]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let outcomes = out.json();
    let outcomes = outcomes.as_array().expect("one outcome a node");
    assert_eq!(outcomes.len(), 3);
    for o in outcomes {
        assert!(o["error"].is_null(), "{o}");
        assert_eq!(o["files"].as_array().map(Vec::len), Some(2), "{o}");
    }
    let placed = remote.path().join("placed");
    assert_eq!(std::fs::read(placed.join("top")).unwrap(), b"top");
    assert_eq!(sha_of(&placed.join("x/y/big")), sha);

    let into = local.path().join("down");
    let out = run(
        server.cli_cmd(&["cp", "-r", &dst, into.to_str().unwrap()]),
        LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("3 of 3 nodes copied"), "{}", out.stderr);
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(names(&into), expected);
    for id in &ids {
        assert_eq!(std::fs::read(into.join(id).join("top")).unwrap(), b"top");
        assert_eq!(sha_of(&into.join(id).join("x/y/big")), sha, "{id}");
    }
    drop(agents);
}

/// Issue 12: copies are authorized by `cp` alone. A user allowed `cp` but not `shell` copies a
/// tree down with `-r` (the agent lists it on a `FileList` stream, audited `cp.list`) and is
/// refused an exec; a user without `cp` is refused the listing (403); a relative path, `..`, a
/// file and a missing directory are each refused naming why, and write nothing.
#[test]
fn cp_alone_lists_and_copies_a_tree_down_and_bad_lists_say_why() {
    let server = Server::start();
    let _agent = Agent::start(&server, "cp-only", &[]);
    let node = server.node_id("cp-only");
    server.wait_online("cp-only");
    let cp_only = crate::authz::user_with_token(
        &server,
        "copier",
        "none",
        Some(r#"permit (principal, action == Action::"cp", resource is Node);"#),
    );
    let shell_only = crate::authz::user_with_token(
        &server,
        "sheller",
        "none",
        Some(r#"permit (principal, action == Action::"shell", resource is Node);"#),
    );
    let as_user = |token: &str, args: &[&str]| {
        let mut c = server.cli_cmd(args);
        c.env("FLEETRUN_TOKEN", token);
        run(c, LIMIT)
    };
    let remote = tempfile::tempdir().expect("tempdir");
    let tree = remote.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).unwrap();
    std::fs::write(tree.join("a.txt"), b"a").unwrap();
    std::fs::write(tree.join("sub/deeper/c"), vec![3u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("sub/etc")).unwrap();
    let local = tempfile::tempdir().expect("tempdir");
    let into = local.path().join("copy");
    let src = format!("{node}:{}", tree.display());

    let out = as_user(&cp_only, &["cp", "-r", &src, into.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("2 files, 200001 bytes"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("sub/etc: a symlink"), "{}", out.stderr);
    assert_eq!(std::fs::read(into.join("a.txt")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(into.join("sub/deeper/c")).unwrap(),
        vec![3u8; 200_000]
    );
    assert_eq!(names(&into.join("sub")), ["deeper"], "no symlink");
    wait_until("the listing in the trail", LIMIT, || {
        let r = audited(&server, "cp.list");
        r.iter()
            .find(|r| r["principal"] == "copier" && r["result"] == "Done")
            .map(|r| assert_eq!(r["params"]["path"], tree.display().to_string()))
    });
    // The same user may not run a command.
    let out = as_user(&cp_only, &["exec", &node, "--", "true"]);
    assert_ne!(out.code(), Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("shell"), "{}", out.stderr);

    // Without `cp` the listing is refused, and nothing is written.
    let denied = local.path().join("denied");
    let out = as_user(&shell_only, &["cp", "-r", &src, denied.to_str().unwrap()]);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("AccessDenied") && out.stderr.contains("cp"),
        "{}",
        out.stderr
    );
    assert!(!denied.exists());

    let base = tree.display().to_string();
    for (path, says) in [
        ("relative/dir".to_owned(), "is not an absolute path"),
        (format!("{base}/sub/../sub"), "without `..`"),
        (format!("{base}/a.txt"), "a.txt is not a directory"),
        (format!("{base}/nope"), "no directory"),
    ] {
        let to = local.path().join("bad");
        let out = as_user(
            &cp_only,
            &["cp", "-r", &format!("{node}:{path}"), to.to_str().unwrap()],
        );
        assert_eq!(out.code(), Some(1), "{path}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{path}: {}", out.stderr);
        assert!(!to.exists(), "{path}: wrote {}", to.display());
    }
}
