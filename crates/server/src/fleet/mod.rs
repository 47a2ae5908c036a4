//! The connected agents: the channel each agent holds open and the hub that finds it by node id.

pub mod channel;
pub mod hub;
