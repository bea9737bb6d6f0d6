//! The `riposte` command's library: the local embedded runtime, the dry run, the operator's
//! commands and the timeline view. `main.rs` only parses arguments and calls into it.

pub mod cli;
pub mod dry;
pub mod runtime;
pub mod sandbox;
#[cfg(feature = "aws")]
pub mod sync;
pub mod timeline;
