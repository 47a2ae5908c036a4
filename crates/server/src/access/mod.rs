//! Who is calling and what they may do: authentication, authorization (Cedar), the brute-force
//! guard and rate limits, the one request gate both APIs pass, the audit trail and sealed secrets.

pub mod audit;
pub mod authn;
pub mod authz;
pub mod gate;
pub mod guard;
pub mod secrets;
