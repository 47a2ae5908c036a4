//! Session tickets: what SSM's StartSession hands out (a session id, a stream URL and a token)
//! before anyone connects. A ticket is good for one connection to its stream URL within
//! [`TICKET_TTL`], for the node, the principal and what to run that StartSession authorized; the
//! connection is then an exec session like any other (`super::exec`), under the ticket's id.
//!
//! Kept in memory only: a ticket outlives neither a restart nor the replica that issued it, which
//! is fine for something used within seconds (the client retries StartSession). Bounded by
//! [`TICKETS_MAX`]; expired tickets are pruned when new ones are issued, so nothing polls.

use crate::access::authz::Principal;
use fleetrun_proto::NodeId;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a ticket waits for its connection.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Most tickets waiting at once on this server.
pub const TICKETS_MAX: usize = 1024;

/// What a ticket's session may run: fixed when the ticket is issued, checked against what the
/// client asks for when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preset {
    /// The login shell, on a PTY (SSM-SessionManagerRunShell).
    Shell,
    /// This command (AWS-StartInteractiveCommand).
    Command(String),
}

/// A redeemed ticket: who may open which session on which node.
#[derive(Clone, Debug)]
pub struct Ticket {
    /// The session's id (its record's, once it runs).
    pub session_id: String,
    /// Where it runs.
    pub node: NodeId,
    /// Who called StartSession.
    pub principal: Principal,
    /// What it may run.
    pub preset: Preset,
}

struct Waiting {
    ticket: Ticket,
    token_hash: [u8; 32],
    expires: Instant,
}

/// The tickets waiting for their connection, by session id.
#[derive(Default)]
pub struct Tickets {
    waiting: Mutex<HashMap<String, Waiting>>,
}

/// The server holds [`TICKETS_MAX`] unexpired tickets already.
#[derive(Debug, thiserror::Error)]
#[error("{TICKETS_MAX} sessions are waiting for their client to connect; try again in a minute")]
pub struct Full;

impl Tickets {
    /// Issues a ticket for a new session: its id and the token that redeems it.
    pub fn issue(
        &self,
        node: NodeId,
        principal: Principal,
        preset: Preset,
    ) -> Result<(String, String), Full> {
        let now = Instant::now();
        let mut waiting = self.waiting.lock();
        if waiting.len() >= TICKETS_MAX {
            waiting.retain(|_, w| w.expires > now);
            if waiting.len() >= TICKETS_MAX {
                return Err(Full);
            }
        }
        let session_id = uuid::Uuid::new_v4().to_string();
        let token = hex::encode(rand::random::<[u8; 32]>());
        let ticket = Ticket {
            session_id: session_id.clone(),
            node,
            principal,
            preset,
        };
        let entry = Waiting {
            ticket,
            token_hash: Sha256::digest(token.as_bytes()).into(),
            expires: now + TICKET_TTL,
        };
        waiting.insert(session_id.clone(), entry);
        Ok((session_id, token))
    }

    /// The node of a waiting, unexpired ticket.
    pub fn node_of(&self, session_id: &str) -> Option<NodeId> {
        let waiting = self.waiting.lock();
        let w = waiting.get(session_id)?;
        (w.expires > Instant::now()).then(|| w.ticket.node.clone())
    }

    /// Drops a waiting ticket (TerminateSession before its client came): whether there was one.
    pub fn cancel(&self, session_id: &str) -> bool {
        self.waiting.lock().remove(session_id).is_some()
    }

    /// Takes the ticket of `session_id` if `token` is its token and it has not expired. Once
    /// taken, it is gone: a second connection with the same token finds nothing. A wrong token
    /// leaves the ticket in place (tokens are 256 random bits; the caller counts the failure in
    /// the brute-force guard).
    pub fn redeem(&self, session_id: &str, token: &str) -> Option<Ticket> {
        let mut waiting = self.waiting.lock();
        let w = waiting.get(session_id)?;
        if w.expires <= Instant::now() {
            waiting.remove(session_id);
            return None;
        }
        // Hashes of equal length compared whole: the comparison says nothing of the token.
        let given: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if given != w.token_hash {
            return None;
        }
        waiting.remove(session_id).map(|w| w.ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetrun_proto::api::Role;
    use fleetrun_store::UserRow;

    fn principal() -> Principal {
        let user = UserRow {
            name: "alice".into(),
            role: Role::Admin,
            policy: String::new(),
        };
        Principal::new(user, "tok_alice".into())
    }

    fn node() -> NodeId {
        "mi-0123456789abcdef0".parse().expect("a node id")
    }

    #[test]
    fn a_ticket_is_redeemed_once_with_its_token_and_a_wrong_token_leaves_it() {
        let tickets = Tickets::default();
        let (id, token) = tickets
            .issue(node(), principal(), Preset::Shell)
            .expect("issued");
        assert!(tickets.redeem(&id, "0".repeat(64).as_str()).is_none());
        assert!(tickets.redeem("another-id", &token).is_none());
        let t = tickets.redeem(&id, &token).expect("redeemed");
        assert_eq!(
            (t.session_id.as_str(), t.preset),
            (id.as_str(), Preset::Shell)
        );
        assert!(tickets.redeem(&id, &token).is_none(), "a second use");
    }

    #[test]
    fn a_cancelled_ticket_cannot_be_redeemed() {
        let tickets = Tickets::default();
        let (id, token) = tickets
            .issue(node(), principal(), Preset::Command("id".into()))
            .expect("issued");
        assert_eq!(tickets.node_of(&id), Some(node()));
        assert!(tickets.cancel(&id));
        assert!(!tickets.cancel(&id));
        assert!(tickets.redeem(&id, &token).is_none());
        assert_eq!(tickets.node_of(&id), None);
    }

    #[test]
    fn the_table_is_bounded() {
        let tickets = Tickets::default();
        for _ in 0..TICKETS_MAX {
            tickets
                .issue(node(), principal(), Preset::Shell)
                .expect("issued");
        }
        assert!(tickets.issue(node(), principal(), Preset::Shell).is_err());
        // An expired ticket is pruned to make room.
        if let Some(w) = tickets.waiting.lock().values_mut().next() {
            w.expires = Instant::now();
        }
        assert!(tickets.issue(node(), principal(), Preset::Shell).is_ok());
    }
}
