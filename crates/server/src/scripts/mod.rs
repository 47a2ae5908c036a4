//! Saved scripts (issue 12): the catalogue ([`api`]) and what a run needs of a script's input
//! ([`inputs`]).

pub mod api;
pub mod inputs;
