//! # kiln-actors: the actors that run jobs, worker leases and build-event streams
//!
//! Owns soft, per-entity state and timers:
//! - [`job::JobActor`], one per unfinished operation (orphan, platform, execution timers),
//!   under [`job::JobSupervisor`];
//! - [`lease::LeaseActor`], one per bot session on the node the bot talks to (keep-alive and
//!   loss detection), under [`lease::LeaseSupervisor`].
//! - [`event_stream::EventStreamActor`], one per build-event stream on the node receiving it
//!   (order, persistence, acks), under [`event_stream::EventStreamSupervisor`].
//!
//! Job and lease actors never await a proposal inside `handle`: they spawn it and get the result back as a
//! message. Supervisors override the default (stop when a child stops): a child that finishes
//! is forgotten, a child that fails is restarted from the replicated state.
//!
//! Architecture Invariant: actors hold nothing that cannot be rebuilt from the Raft state
//! machine; this crate never sees a tonic server type.

pub mod context;
pub mod event_stream;
pub mod job;
pub mod lease;

pub use context::{ActorContext, Proposer, Timeouts};
pub use kiln_raft as raft;
