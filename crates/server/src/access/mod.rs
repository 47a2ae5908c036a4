//! Who is calling and what they may do: authentication, authorization (Cedar), the brute-force
//! guard and rate limits, the audit trail and sealed secrets.

pub mod audit;
pub mod authn;
pub mod authz;
pub mod guard;
pub mod secrets;
