//! The server with agents of each protocol version it speaks: version 2 agents (before session
//! streams) are still served, and session-stream frames the server never asked for are refused.

mod support;

use fleetrun_proto::channel::{AgentFrame, ErrorCode, ServerFrame};
use fleetrun_proto::stream::StreamFd;
use fleetrun_proto::version::{
    FILE_TRAILER_SINCE, FILES_SINCE, INSTANCE_IDS_SINCE, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
    SHELLS_AND_TCP_SINCE, STREAMS_SINCE,
};
use serde_json::json;
use std::time::Duration;
use support::{ScriptedAgent, TestServer};

/// A version 2 agent connects and runs a command as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_of_the_previous_version_is_served() {
    assert_eq!(
        (
            PROTOCOL_VERSION_MIN,
            STREAMS_SINCE,
            SHELLS_AND_TCP_SINCE,
            FILES_SINCE,
            FILE_TRAILER_SINCE,
            INSTANCE_IDS_SINCE
        ),
        (2, 3, 4, 5, 6, PROTOCOL_VERSION)
    );
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::register(&server, "v2-node").await;
    agent
        .connect_as_version(&server, &[], PROTOCOL_VERSION_MIN)
        .await;
    let id = server
        .send(json!({"node_ids": [agent.node_id], "commands": ["echo hi"]}))
        .await;
    let run = agent.expect_run().await;
    assert_eq!(run.command_id, id);
    agent.started(&id).await;
    agent.output(&id, 0, b"hi\n").await;
    assert_eq!(agent.expect_ack(&id).await, 3);
    agent.finished(&id, 0, 3).await;
    agent.expect_result_ack(&id).await;
    let done = server.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "Success", "{done}");
    // The version before EC2 instance ids (6) is served too.
    agent
        .connect_as_version(&server, &[], FILE_TRAILER_SINCE)
        .await;
}

/// A stream frame for a stream the server never opened is a protocol error (and no crash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_frame_the_server_did_not_ask_for_is_a_protocol_error() {
    let server = TestServer::start().await;
    let mut agent = ScriptedAgent::online(&server, "streams-node").await;
    agent
        .send(AgentFrame::StreamData {
            stream: 5,
            fd: StreamFd::Stdout,
            bytes: b"unasked".to_vec(),
        })
        .await;
    let (code, message) = agent
        .expect("an Error", |f| match f {
            ServerFrame::Error { code, message } => Some((code, message)),
            _ => None,
        })
        .await;
    assert_eq!(
        ErrorCode::parse(&code),
        ErrorCode::ProtocolError,
        "{message}"
    );
    assert!(message.contains("session stream 5"), "{message}");
    // The server still serves the node on a new connection.
    agent.connect(&server, &[]).await;
}
