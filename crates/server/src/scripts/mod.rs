//! Saved scripts (issue 12): the catalogue ([`api`]) and what a run needs of a script's input
//! ([`inputs`]), and the run's files on each node ([`runner`]).

pub mod api;
pub mod inputs;
pub mod runner;
