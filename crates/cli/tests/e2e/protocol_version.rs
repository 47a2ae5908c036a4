//! Issue 10, point 7: the channel's protocol version is read from the frozen start of the agent's
//! first frame before the rest is decoded, so an agent of another version (here a scripted client
//! sending version 1's layout, and one claiming a future version) hears `ProtocolVersion`, a fatal
//! code, instead of `BadFrame`; the server names its own version in the upgrade response.

use crate::node_identity::{dial_channel_upgraded, next_frame};
use crate::support::Server;
use fleetrun_proto::channel::{ErrorCode, ServerFrame};
use fleetrun_proto::version::{PROTOCOL_VERSION, PROTOCOL_VERSION_HEADER};
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

/// Postcard string: varint length (short strings: one byte), then the bytes.
fn postcard_str(s: &str) -> Vec<u8> {
    let len = u8::try_from(s.len()).expect("a short string");
    assert!(len < 0x80, "one-byte varint");
    let mut out = vec![len];
    out.extend_from_slice(s.as_bytes());
    out
}

/// Dials the channel, checks the version header and the challenge, sends `first` as the first
/// frame; the server's answer and the header's version.
fn first_frame_answer(server: &Server, first: Vec<u8>) -> (ServerFrame, Option<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (mut ws, upgraded) = dial_channel_upgraded(server)
            .await
            .expect("dial the agent channel");
        let header = upgraded
            .headers()
            .get(PROTOCOL_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let challenge = next_frame(&mut ws).await;
        assert!(
            matches!(challenge, ServerFrame::Challenge { .. }),
            "{challenge:?}"
        );
        ws.send(Message::Binary(first.into()))
            .await
            .expect("send the first frame");
        let answer = next_frame(&mut ws).await;
        let _ = ws.close(None).await;
        (answer, header)
    })
}

#[test]
fn an_agent_of_another_protocol_version_is_refused_with_a_fatal_protocol_version_error() {
    let server = Server::start();
    // Version 1's Hello: variant 0, version 1, then its own layout (a node id and a secret,
    // no key or signature), which does not decode as this version's Hello.
    let mut v1_hello = vec![0x00, 0x01];
    v1_hello.extend(postcard_str("mi-0123456789abcdef0"));
    v1_hello.extend(postcard_str("a-version-1-node-secret"));
    // A future version's Register: variant 1, version 300 (a two-byte varint), anything after.
    let future_register = vec![0x01, 0xac, 0x02, 0xff, 0xff, 0xff];
    for (first, version) in [(v1_hello, 1), (future_register, 300)] {
        let (answer, header) = first_frame_answer(&server, first);
        assert_eq!(header, Some(PROTOCOL_VERSION.to_string()));
        let ServerFrame::Error { code, message } = answer else {
            panic!("expected an Error, got {answer:?}");
        };
        let code = ErrorCode::parse(&code);
        assert_eq!(code, ErrorCode::ProtocolVersion, "{message}");
        assert!(code.is_fatal(), "an agent stops on {code}");
        let both = format!(
            "agent speaks protocol version {version}, this server speaks {PROTOCOL_VERSION}"
        );
        assert!(message.contains(&both), "{message}");
    }
    // A frame of this version that does not decode is still a BadFrame (not fatal: a retry is
    // harmless and the log says why).
    let (answer, _) = first_frame_answer(&server, vec![0x00, 0x02, 0xff]);
    let ServerFrame::Error { code, message } = answer else {
        panic!("expected an Error, got {answer:?}");
    };
    assert_eq!(ErrorCode::parse(&code), ErrorCode::BadFrame, "{message}");
    assert!(!ErrorCode::parse(&code).is_fatal());
}
