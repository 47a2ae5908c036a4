//! The servers start, serve, survive a restart, and each test gets a database of its own.

use fleetrun_testkit::{Nats, Postgres, listening, shared_postgres};

#[test]
fn a_test_gets_a_database_of_its_own_on_the_shared_cluster() {
    let pg = shared_postgres();
    let (a, b) = (pg.create_database(), pg.create_database());
    assert_ne!(a, b);
    let db = |url: &str| url.rsplit('/').next().unwrap_or_default().to_owned();
    pg.psql(
        &db(&a),
        "CREATE TABLE t (x BIGINT); INSERT INTO t VALUES (42)",
    );
    assert_eq!(pg.psql(&db(&a), "SELECT x FROM t"), "42");
    // The other database has no such table.
    assert_eq!(
        pg.psql(
            &db(&b),
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'"
        ),
        "0"
    );
}

#[test]
fn a_cluster_keeps_its_data_across_a_crash_and_a_restart() {
    let mut pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE TABLE kept (v TEXT); INSERT INTO kept VALUES ('before')",
    );
    pg.stop(false);
    assert!(!listening(pg.port()));
    pg.start_again();
    assert_eq!(pg.psql("postgres", "SELECT v FROM kept"), "before");
    pg.stop(true);
    pg.start_again();
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM kept"), "1");
}

#[test]
fn nats_stops_and_comes_back_on_its_port() {
    let mut nats = Nats::start();
    let port = nats.port();
    assert!(listening(port), "{}", nats.logs());
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    nats.stop();
    assert!(!listening(port));
    nats.start_again();
    assert!(listening(port), "{}", nats.logs());
}
