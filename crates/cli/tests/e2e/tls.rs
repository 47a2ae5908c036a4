//! TLS by default: the server is its own CA and speaks only HTTPS/WSS; clients that do not trust the
//! CA are refused; agents pin the CA by fingerprint on first contact and keep it; plain HTTP only
//! when both sides say `--insecure-http`; an operator's own certificate is served as given.

use crate::support::{Agent, AgentOpts, Server, agent_bin, http, run, wait_until};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn default_server_speaks_only_tls_and_refuses_clients_without_its_ca() {
    let server = Server::start();
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let health = format!("{}/v1/health", server.url);
    assert_eq!(
        http(server.ca.as_deref(), "GET", &health, None, None)
            .expect("trusted")
            .status,
        200
    );

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = health.replacen("https://", "http://", 1);
    let r = http(server.ca.as_deref(), "GET", &plain, None, None);
    assert!(r.is_err(), "plain HTTP answered: {:?}", r.map(|r| r.status));

    // A client that does not trust the CA is refused at the handshake.
    let err = http(None, "GET", &health, Some(&server.token), None)
        .err()
        .expect("an untrusting client must be refused");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );

    // So is the CLI, which says how to trust it.
    let mut c = server.cli_cmd(&["nodes"]);
    c.env_remove("FLEETRUN_CA_CERT");
    let line = run(c, Duration::from_secs(30)).one_line_error();
    assert!(
        line.contains("not trusted")
            && line.contains("--ca-cert")
            && line.contains("FLEETRUN_CA_CERT"),
        "{line}"
    );

    // The CA's key is private to the server; its certificate is for everyone.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    for key in ["tls/ca.key", "tls/server.key"] {
        assert_eq!(mode(&server.data_dir.join(key)), 0o600, "{key}");
    }
    assert!(server.data_dir.join("ca.pem").exists());
}

#[test]
fn agent_pins_the_ca_by_fingerprint_and_keeps_it() {
    let mut server = Server::start();
    let fingerprint = server.ca_fingerprint().expect("own CA");

    // `activation create` prints the fingerprint and the agent command line using it.
    let out = server.cli(&["activation", "create"]).ok();
    assert!(
        out.stderr
            .contains(&format!("--ca-fingerprint {fingerprint}")),
        "{}",
        out.stderr
    );

    // The default agent start pins the CA by the activation answer's fingerprint.
    let mut agent = Agent::start(&server, "pinned", &[]);
    let saved = agent.state_dir.join("ca.pem");
    let der = |p: &std::path::Path| {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    assert_eq!(
        fleetrun_proto::tls::fingerprint(&der(&saved)),
        fingerprint,
        "the agent saved the pinned CA"
    );

    // Later starts trust the saved CA, with no fingerprint given; a server restart too.
    agent.restart();
    server.restart();
    server.wait_online("pinned");
    let id = server.send(&["--targets", "all"], "echo over-tls");
    let cmd = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(cmd["status"], "Success", "{cmd}");
    let logs = agent.all_logs();
    assert!(logs.contains("pinned the server's CA"), "{logs}");
}

#[test]
fn agent_with_a_wrong_fingerprint_is_refused_and_backs_off() {
    let server = Server::start();
    let code = server.activation_code(&[], 1);
    let wrong = "00".repeat(32);
    let agent = Agent::spawn_with_code(
        &server,
        "mismatch",
        AgentOpts::args(&["--ca-fingerprint", &wrong]),
        &code,
    );
    let first = wait_until(
        "the agent to log the fingerprint mismatch",
        Duration::from_secs(15),
        || {
            agent
                .all_logs()
                .contains("CA fingerprint mismatch")
                .then(Instant::now)
        },
    );
    let logs = agent.all_logs();
    assert!(logs.contains(&wrong), "{logs}");
    // Transport errors back off: a few attempts a second at most, not a spin.
    std::thread::sleep(Duration::from_millis(1500));
    let attempts = agent.all_logs().matches("CA fingerprint mismatch").count();
    assert!(
        attempts <= 12,
        "{attempts} attempts in {:?}",
        first.elapsed()
    );
    assert!(server.nodes().is_empty(), "{:?}", server.nodes());
    assert!(!agent.state_dir.join("ca.pem").exists());
}

#[test]
fn agent_refuses_plain_http_unless_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Command::new(agent_bin());
    c.args(["--server", "http://127.0.0.1:9", "--activation-code", "x"])
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("FLEETRUN_CA_CERT")
        .env_remove("FLEETRUN_CA_FINGERPRINT");
    let out = run(c, Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("plain HTTP") && out.stderr.contains("--insecure-http"),
        "{}",
        out.stderr
    );
}

#[test]
fn insecure_http_works_when_both_sides_ask_and_is_loud() {
    let server = Server::start_with(&["--insecure-http"]);
    assert!(server.url.starts_with("http://"), "{}", server.url);
    let agent = Agent::start(&server, "clear", &[]);
    let id = server.send(&["--targets", "all"], "echo in-clear");
    let cmd = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(cmd["status"], "Success", "{cmd}");
    let logs = server.all_logs();
    assert!(
        logs.contains("TLS is OFF") && logs.contains("WARNING"),
        "{logs}"
    );
    assert!(agent.all_logs().contains("TLS is OFF"));
    assert!(!server.data_dir.join("ca.pem").exists());
}

#[test]
fn operator_certificate_and_key_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The operator's own CA and a server certificate for loopback.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "operator CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    let cert = params
        .signed_by(&key, &rcgen::Issuer::new(ca_params, &ca_key))
        .expect("leaf");
    let chain = dir.path().join("chain.pem");
    let key_path = dir.path().join("server.key");
    let ca_path = dir.path().join("operator-ca.pem");
    std::fs::write(&chain, cert.pem() + &ca_cert.pem()).expect("write chain");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    std::fs::write(&ca_path, ca_cert.pem()).expect("write CA");

    let server = Server::start_with(&[
        "--tls-cert",
        chain.to_str().expect("utf-8"),
        "--tls-key",
        key_path.to_str().expect("utf-8"),
    ]);
    // A client trusting only the operator's CA is served; the server made no CA of its own.
    let health = format!("{}/v1/health", server.url);
    let r = http(Some(&ca_path), "GET", &health, None, None).expect("operator CA trusted");
    assert_eq!(r.status, 200);
    assert!(!server.data_dir.join("ca.pem").exists());
    let activation = server.activation(&[], 1);
    assert!(activation.get("ca_fingerprint").is_none(), "{activation}");

    // An agent trusting the operator's CA file works.
    let _agent = Agent::start_opts(
        &server,
        "operator",
        AgentOpts::args(&["--ca-cert", ca_path.to_str().expect("utf-8")]),
    );
    let id = server.send(&["--targets", "all"], "echo operator-cert");
    let cmd = server.wait_terminal(&id, Duration::from_secs(30));
    assert_eq!(cmd["status"], "Success", "{cmd}");
}
