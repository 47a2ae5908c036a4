//! Following an invocation's output live from another replica than the one holding its agent.
//!
//! The follower's replica (A) subscribes to an inbox, then asks the node's replica (B) on
//! `fleetrun.node.<node>.follow`. B subscribes through the output actor as a local follower
//! would, answers with the stored length and an inbox for acknowledgements, then publishes the
//! bytes it holds past what is stored, then every live chunk, each with its offset. A serves the
//! stored bytes, then the chunks past them: byte-exact, no gap, no duplicate (a gap, an end or
//! a silence sends A back to storage, from where it follows again).
//!
//! Flow control: B publishes at most `WINDOW` (4 MiB) past what A acknowledged; a follower that
//! reads slower makes B's own subscription lag, and B then ends the stream (A resyncs from
//! storage). Both sides time the other out: B heartbeats while there is nothing to send and A
//! acknowledges at least every `KEEPALIVE` (5 s); either silent for `SILENCE` (20 s) ends the
//! stream.

use crate::AppState;
use crate::run::output::{Chunk, OutputMsg};
use bytes::{BufMut, Bytes, BytesMut};
use fleetrun_proto::channel::Pipe;
use fleetrun_proto::{CommandId, NodeId};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

/// Most bytes in flight from B to one follower past its last acknowledgement.
const WINDOW: u64 = 4 * 1024 * 1024;
/// Largest chunk B publishes (below NATS' default 1 MiB payload limit).
const CHUNK_MAX: usize = 256 * 1024;
/// How often the side with nothing else to say says it is still there.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// A side silent this long is taken as gone.
const SILENCE: Duration = Duration::from_secs(20);
/// Most remote followers one replica serves at once; more follow from storage.
const FORWARDERS_MAX: usize = 1024;

const DATA: u8 = 0;
const END: u8 = 1;
const HEARTBEAT: u8 = 2;

/// What A asks B.
#[derive(Serialize, Deserialize)]
pub(crate) struct FollowRequest {
    command_id: CommandId,
    pipe: Pipe,
    /// Where B publishes the bytes.
    inbox: String,
}

/// What B answers.
#[derive(Serialize, Deserialize)]
struct FollowAnswer {
    /// None: no live output here (not started yet, or ended); follow from storage.
    live: Option<Live>,
}

#[derive(Serialize, Deserialize)]
struct Live {
    /// Storage holds `[0, stored)`; the chunks that follow start there.
    stored: u64,
    /// Where A acknowledges what it served.
    acks: String,
}

/// The live part of a remote follow: chunks of one pipe, in order.
pub struct RemoteLive {
    client: async_nats::Client,
    chunks: async_nats::Subscriber,
    acks: String,
    pipe: Pipe,
    /// End of the last chunk handed out (served, once `next` is called again).
    served: u64,
    acked: u64,
    last_ack: Instant,
}

/// Asks the replica holding `node` to stream `pipe` of its invocation of `cmd`: the stored length
/// and the live chunks past it, or None when it cannot (no actor there, no responder, NATS down,
/// too many followers): the caller follows from storage.
pub async fn start(
    state: &AppState,
    cmd: &CommandId,
    node: &NodeId,
    pipe: Pipe,
) -> Option<(u64, RemoteLive)> {
    let bus = state.bus.as_ref()?;
    let client = bus.client().clone();
    let inbox = client.new_inbox();
    // Subscribed before the request, on the same connection: nothing B sends can come first.
    let chunks = client.subscribe(inbox.clone()).await.ok()?;
    let request = FollowRequest {
        command_id: cmd.clone(),
        pipe,
        inbox,
    };
    let payload = serde_json::to_vec(&request).ok()?;
    let subject = format!("fleetrun.node.{node}.follow");
    let reply = client.request(subject, payload.into()).await.ok()?;
    let live = serde_json::from_slice::<FollowAnswer>(&reply.payload)
        .ok()?
        .live?;
    Some((
        live.stored,
        RemoteLive {
            client,
            chunks,
            acks: live.acks,
            pipe,
            served: live.stored,
            acked: live.stored,
            last_ack: Instant::now(),
        },
    ))
}

impl RemoteLive {
    /// The next chunk, or None when the stream ended (the invocation's end, a lag, a silence):
    /// the caller reads storage again. Acknowledges what was handed out before.
    pub async fn next(&mut self) -> Option<Chunk> {
        loop {
            if self.served - self.acked >= WINDOW / 4 || self.last_ack.elapsed() >= KEEPALIVE {
                self.ack().await;
            }
            let keepalive = self.last_ack + KEEPALIVE;
            let msg = tokio::select! {
                m = tokio::time::timeout(SILENCE, self.chunks.next()) => m.ok()??,
                () = tokio::time::sleep_until(keepalive) => continue,
            };
            let (kind, offset, data) = parse(&msg.payload)?;
            match kind {
                DATA => {
                    self.served = offset + data.len() as u64;
                    return Some(Chunk {
                        pipe: self.pipe,
                        offset,
                        data,
                    });
                }
                HEARTBEAT => continue,
                _ => return None,
            }
        }
    }

    async fn ack(&mut self) {
        let payload = Bytes::copy_from_slice(&self.served.to_be_bytes());
        if let Err(e) = self.client.publish(self.acks.clone(), payload).await {
            tracing::debug!("cannot acknowledge followed output: {e}");
        }
        self.acked = self.served;
        self.last_ack = Instant::now();
    }
}

/// A message's kind, offset and bytes; None when it is malformed.
fn parse(payload: &Bytes) -> Option<(u8, u64, Bytes)> {
    if payload.len() < 9 {
        return None;
    }
    let offset = u64::from_be_bytes(payload[1..9].try_into().ok()?);
    Some((payload[0], offset, payload.slice(9..)))
}

fn message(kind: u8, offset: u64, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + data.len());
    b.put_u8(kind);
    b.put_u64(offset);
    b.put_slice(data);
    b.freeze()
}

/// Remote followers served here now.
#[derive(Default)]
pub struct Forwarders(std::sync::atomic::AtomicUsize);

/// B's side: answers a follow request for `node` and, when there is live output here, streams
/// it to the requester until it ends, lags, or the requester goes silent.
pub(crate) async fn serve(
    state: &Arc<AppState>,
    client: &async_nats::Client,
    node: &NodeId,
    msg: async_nats::Message,
) {
    let Some(reply) = msg.reply else { return };
    let answer = |live: Option<Live>| {
        let bytes = serde_json::to_vec(&FollowAnswer { live }).unwrap_or_default();
        Bytes::from(bytes)
    };
    let request = match serde_json::from_slice::<FollowRequest>(&msg.payload) {
        Ok(r) if r.inbox.len() <= 256 && !r.inbox.contains(char::is_whitespace) => r,
        _ => {
            tracing::warn!(%node, "a bad follow request from another replica");
            let _ = client.publish(reply, answer(None)).await;
            return;
        }
    };
    let key = (request.command_id.clone(), node.clone());
    let count = &state.forwarders.0;
    let busy = count.load(std::sync::atomic::Ordering::Relaxed) >= FORWARDERS_MAX;
    if busy || !state.outputs.has(&key) {
        let _ = client.publish(reply, answer(None)).await;
        return;
    }
    let (tx, rx) = oneshot::channel();
    state.outputs.send(
        state,
        &key,
        OutputMsg::Follow {
            pipe: request.pipe,
            reply: tx,
        },
    );
    let Ok(start) = rx.await else {
        let _ = client.publish(reply, answer(None)).await;
        return;
    };
    let acks_inbox = client.new_inbox();
    let Ok(acks) = client.subscribe(acks_inbox.clone()).await else {
        let _ = client.publish(reply, answer(None)).await;
        return;
    };
    let live = Live {
        stored: start.stored,
        acks: acks_inbox,
    };
    if client.publish(reply, answer(Some(live))).await.is_err() {
        return;
    }
    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (state, client) = (state.clone(), client.clone());
    tokio::spawn(async move {
        let forward = Forward {
            client: &client,
            inbox: request.inbox,
            pipe: request.pipe,
            sent: start.stored,
            acked: start.stored,
        };
        forward.run(start.pending, start.live, acks).await;
        state
            .forwarders
            .0
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    });
}

struct Forward<'a> {
    client: &'a async_nats::Client,
    inbox: String,
    pipe: Pipe,
    /// End of what was published.
    sent: u64,
    /// End of what the follower acknowledged.
    acked: u64,
}

impl Forward<'_> {
    async fn run(
        mut self,
        pending: Bytes,
        mut live: broadcast::Receiver<Chunk>,
        mut acks: async_nats::Subscriber,
    ) {
        for part in pending.chunks(CHUNK_MAX) {
            if !self.publish(DATA, part).await {
                return;
            }
        }
        let mut heard = Instant::now();
        let mut said = Instant::now();
        loop {
            let open = self.sent - self.acked < WINDOW;
            tokio::select! {
                chunk = live.recv(), if open => match chunk {
                    Ok(c) if c.pipe == self.pipe && c.offset == self.sent => {
                        for part in c.data.chunks(CHUNK_MAX) {
                            if !self.publish(DATA, part).await {
                                return;
                            }
                        }
                        said = Instant::now();
                    }
                    // The other pipe, or bytes already sent with what was pending.
                    Ok(c) if c.pipe != self.pipe || c.offset + (c.data.len() as u64) <= self.sent => {}
                    // A gap (missed chunks), a lag, or the end of the invocation.
                    _ => break,
                },
                ack = acks.next() => match ack.as_ref().and_then(|m| parse_ack(&m.payload)) {
                    Some(at) => {
                        self.acked = self.acked.max(at.min(self.sent));
                        heard = Instant::now();
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(said + KEEPALIVE) => {
                    if !self.publish(HEARTBEAT, &[]).await {
                        return;
                    }
                    said = Instant::now();
                }
                () = tokio::time::sleep_until(heard + SILENCE) => {
                    tracing::debug!("a remote follower went silent; its stream ends");
                    break;
                }
            }
        }
        let _ = self.publish(END, &[]).await;
    }

    /// Publishes `data` at the current end; false when the bus failed.
    async fn publish(&mut self, kind: u8, data: &[u8]) -> bool {
        let payload = message(kind, self.sent, data);
        if self
            .client
            .publish(self.inbox.clone(), payload)
            .await
            .is_err()
        {
            return false;
        }
        self.sent += data.len() as u64;
        true
    }
}

fn parse_ack(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?))
}
