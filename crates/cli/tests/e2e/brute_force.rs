//! Token brute force is rate limited: after 10 failed authentications with one credential in a
//! minute, that credential is refused (429 + Retry-After) before it is looked at (see
//! hostile_api.rs: a valid token from the same address still gets in); after 100 from one address,
//! the address is refused whatever it presents, and the CLI says so in one line. Agents with a bad
//! key signature or activation code count for the address too.

use crate::support::{Server, http};

#[test]
fn failed_authentications_lock_the_source_out() {
    let server = Server::start();
    let url = format!("{}/v1/nodes", server.url);
    // Every guess a different token: only the address limit stops them.
    for i in 0..100 {
        let r = http(
            server.ca.as_deref(),
            "GET",
            &url,
            Some(&format!("frt_wrong_{i}")),
            None,
        )
        .expect("request");
        assert_eq!(
            r.status,
            401,
            "attempt {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = http(
        server.ca.as_deref(),
        "GET",
        &url,
        Some("frt_wrong_again"),
        None,
    )
    .expect("request");
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"]["code"], "TooManyFailedAuthentications");
    // While the address is locked out, even the right token from it waits: guessing must not go on.
    let r = http(server.ca.as_deref(), "GET", &url, Some(&server.token), None).expect("request");
    assert_eq!(r.status, 429);

    let out = server.cli(&["nodes"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("too many failed authentications"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);

    let log = server.logs();
    assert!(
        log.contains("too many failed authentications"),
        "no warning in the server log"
    );
}
