//! The server as one replica on its database: its data dir is its own, a command it no longer
//! owns is dispatched no further, and one whose lease is free again is claimed back. Another
//! replica is played through the store, on the server's own database; the agents are scripts on
//! real WebSockets.

mod support;

use fleetrun_proto::InvocationStatus;
use fleetrun_server::ServerConfig;
use fleetrun_server::net::tls::TlsMode;
use fleetrun_store::Fence;
use serde_json::json;
use std::time::Duration;
use support::{DEADLINE, ScriptedAgent, TestServer, within};

/// A second server on a data dir in use is refused, naming the data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let server = TestServer::start().await;
    let mut config = ServerConfig::new(server.data.clone(), "127.0.0.1:0".parse().unwrap());
    config.tls = TlsMode::Insecure;
    let Err(e) = fleetrun_server::start(config).await else {
        panic!("a second server started on {}", server.data.display());
    };
    let e = format!("{e:#}");
    assert!(e.contains("another fleetrun server uses data dir"), "{e}");
    assert!(e.contains(&server.data.display().to_string()), "{e}");
}

/// Once another replica has taken a command (a higher epoch), this server's dispatcher stops at
/// its next write, delivering nothing more, while the result of what it had delivered is still
/// stored. When that replica leaves, the server claims the command at its next heartbeat, at a
/// new epoch, and finishes the fan-out: each node ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_taken_over_is_dispatched_no_further_until_it_is_claimed_back() {
    let server = TestServer::start_with(|c| c.replica_lease = Duration::from_millis(900)).await;
    let replica_id = std::fs::read_to_string(server.data.join("replica.id")).unwrap();
    let replica_id = replica_id.trim();
    let mut a = ScriptedAgent::online(&server, "fence-a").await;
    let mut b = ScriptedAgent::online(&server, "fence-b").await;
    let id = server
        .send(json!({
            "node_ids": [a.node_id, b.node_id], "commands": ["true"], "max_concurrency": "1",
        }))
        .await;
    // One at a time, in the order of the targets.
    a.expect_run().await;

    // Another replica takes the command over: the server's leases are ended (as its clean
    // shutdown would) and the intruder claims. Should the server's own beat claim it back in
    // between, the intruder tries again.
    let db = server.store().await;
    let lease = || async { db.command_lease(&id).await.unwrap().unwrap() };
    assert_eq!(
        lease().await.fence(),
        Fence {
            owner: replica_id.to_owned(),
            epoch: 1
        }
    );
    let taken = within("the intruder's claim", async {
        loop {
            db.remove_replica(replica_id).await.unwrap();
            let claimed = db.claim_commands("intruder", 3_600_000, 10).await.unwrap();
            if let Some((_, epoch)) = claimed.into_iter().find(|(c, _)| c == &id) {
                return epoch;
            }
        }
    })
    .await;

    // The watch stream ends when the dispatcher here stops with the command unfinished.
    let watch = reqwest::Client::new()
        .get(format!("http://{}/v1/commands/{id}/watch", server.addr))
        .bearer_auth(&server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    a.started(&id).await;
    a.finished(&id, 0, 0).await;
    a.expect_result_ack(&id).await;
    within("the dispatcher to stop", watch.bytes())
        .await
        .unwrap();

    let of = |node| {
        let (db, id) = (&db, &id);
        async move { db.get_invocation(id, node).await.unwrap().unwrap().status }
    };
    assert_eq!(of(&a.node_id).await, InvocationStatus::Success);
    assert_eq!(
        of(&b.node_id).await,
        InvocationStatus::Pending,
        "b delivered while fenced"
    );
    assert_eq!(
        lease().await.fence(),
        Fence {
            owner: "intruder".to_owned(),
            epoch: taken
        }
    );

    // The intruder leaves, ending its lease: the server's next beat claims the command.
    db.remove_replica("intruder").await.unwrap();
    let run = b.expect_run().await;
    assert_eq!(run.command_id, id);
    let back = lease().await.fence();
    assert_eq!(
        back,
        Fence {
            owner: replica_id.to_owned(),
            epoch: taken + 1
        }
    );
    b.started(&id).await;
    b.finished(&id, 0, 0).await;
    b.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, DEADLINE).await;
    assert_eq!(done["status"], "Success", "{done}");
    assert_eq!(done["completed_count"], 2, "{done}");
}
