//! # kiln-raft: Kiln's replicated and persisted state
//!
//! Owns the state that must survive the loss of any minority of nodes and be the same on all
//! of them: operations, the execution queue, bot sessions ([`scheduler`]), changed only by the
//! typed, versioned [`command`]s that openraft replicates. The log and the snapshots live in sled
//! ([`log_store`], [`state_machine`]); [`codec`] is the one versioned encoding of every record.
//!
//! Architecture Invariants:
//! - [`scheduler::SchedulerState::apply`] is deterministic: no clock, no randomness, no I/O.
//!   Times and names are stamped into commands by the proposer.
//! - the log store acknowledges an append only after sled flushed it to disk;
//! - this crate knows nothing of gRPC servers or REAPI service traits; it depends only on
//!   `kiln-proto` for message types.

pub mod codec;
pub mod command;
pub mod scheduler;
pub mod consensus;
pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod streams;
pub mod types;

pub use consensus::{Consensus, ProposeError, RaftSettings};
