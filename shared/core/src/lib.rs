//! Riposte's core: the model, the playbook language, rules, expressions and the engine as a pure
//! state machine. No runtime, no network, no clock: all of that comes in through [`ports`].

pub mod approval;
pub mod callback;
pub mod connector;
pub mod engine;
pub mod event;
pub mod expr;
pub mod guard;
pub mod http;
pub mod model;
pub mod playbook;
pub mod ports;
pub mod rule;
pub mod run;
pub mod service;
pub mod slack;
pub mod store;
