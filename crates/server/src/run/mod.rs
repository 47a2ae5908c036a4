//! Commands from acceptance to output: send (check, resolve, authorize, persist), dispatch (rate
//! control, deadlines), output actors, documents and their parameters, retention.

pub mod dispatch;
pub mod document;
pub mod invocations;
pub mod output;
pub mod params;
pub mod retention;
pub mod send;
