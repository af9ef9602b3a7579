//! The gRPC services, one file per service, named after it.
//!
//! Handlers are thin: validate the request, call the storage layer on a blocking thread, map
//! the error in one place ([`crate::error`]). Each handler runs in a `tracing` span carrying the
//! instance name and digest, and records its latency through [`observe`].

pub mod action_cache;
pub mod build_events;
pub mod bots;
pub mod bytestream;
pub mod bytestream_read;
pub mod capabilities;
pub mod cas;
pub mod execution;
pub mod fast_path;
pub mod find_missing;
pub mod logstream;
pub mod operations;
pub mod peer;

use std::time::Instant;

use crate::error::{KilnError, Result};

/// Records latency and error code of one call, passing its result through.
pub fn observe<T>(method: &'static str, start: Instant, r: Result<T, tonic::Status>) -> Result<T, tonic::Status> {
    crate::metrics::record_rpc(method, start.elapsed(), r.as_ref().err().map(|s| s.code()));
    r
}

/// Runs blocking storage work off the async threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| KilnError::Internal(format!("storage task failed: {e}")))?
}

/// Any instance name is accepted, except ones that would break key separation or resource
/// names: NUL characters and the reserved path segments.
pub fn check_instance_name(name: &str) -> Result<()> {
    if name.contains('\0') {
        return Err(KilnError::invalid(format!("instance_name {name:?} contains a NUL character")));
    }
    if name.split('/').any(|s| ["blobs", "uploads", "compressed-blobs", "actions", "actionResults", "operations", "capabilities", "logstreams"].contains(&s)) {
        return Err(KilnError::invalid(format!("instance_name {name:?} uses a reserved path segment")));
    }
    Ok(())
}
