//! The server when a part under it fails and comes back, with the real part (a PostgreSQL
//! cluster of the test's own, crates/testkit): the API says what is wrong and when to try
//! again, and heals without a restart.

mod support;

use fleetrun_store::Database;
use fleetrun_testkit::Postgres;
use support::{ScriptedAgent, TestServer};

/// PostgreSQL down: the API answers 503 with Retry-After and a message naming the database,
/// never a 500 or a hang past the pool's wait; once it is back, the same server answers again
/// and still dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_a_503_and_back_is_served_again() {
    let mut pg = Postgres::start();
    let database = Database::parse(&pg.create_database()).unwrap();
    let server = TestServer::start_with(|c| c.database = Some(database.clone())).await;
    let mut agent = ScriptedAgent::online(&server, "steady").await;

    pg.stop(true);
    let (status, headers, body) = server
        .call(reqwest::Method::GET, "/v1/commands", None, &[])
        .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot reach its database")),
        "{body}"
    );
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );

    pg.start_again();
    let id = server
        .send(serde_json::json!({"node_ids": [agent.node_id], "commands": ["true"]}))
        .await;
    agent.expect_run().await;
    agent.started(&id).await;
    agent.finished(&id, 0, 0).await;
    agent.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, support::DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
}
