//! # kiln-node: the `kiln` binary's library
//!
//! Owns everything a client touches: the CLI and [`config`], the gRPC services
//! ([`services`], one file per service), the node's storage ([`cas`] for blobs, [`ac`] for the
//! Action Cache), the HTTP port ([`http`]) and the assembly of a node ([`server`]).
//!
//! Architecture Invariants:
//! - only this crate knows tonic server types; storage modules know nothing of gRPC beyond the
//!   one error mapping in [`error`];
//! - every handler validates its input and maps errors to the REAPI-specified status in one
//!   place; nothing a client sends can panic the node;
//! - storage methods are blocking and run on tokio's blocking pool, never on the async threads.

pub mod ac;
pub mod ac_log;
pub mod build_events;
pub mod cluster_cli;
pub mod cas;
pub mod completed_actions;
pub mod config;
pub mod digest;
pub mod error;
pub mod events_cli;
pub mod flush;
pub mod http;
pub mod logstream;
pub mod metrics;
pub mod placement;
pub mod resource;
pub mod scheduler;
pub mod server;
pub mod services;
pub mod storage;
pub mod worker;
