//! `kiln worker`: executes actions on worker machines.
//!
//! The bot loop (Remote Workers API sessions, leases, fail-over between endpoints) hands each
//! leased action to an [`Executor`], which runs it end to end in four explicit phases, each in
//! its own file:
//!
//! 1. **prepare** ([`materialize`]): fetch the `Action`, the `Command` and the input tree
//!    (directories level by level with `BatchReadBlobs`, so every directory is checked against
//!    its exact digest), validate every name, symlink and path, then build a fresh action
//!    directory `work_dir/actions/<uuid>/root` by hardlinking files out of the local content
//!    [`cache`] (`work_dir/cache/`), fetching what it lacks (`BatchReadBlobs` for small blobs,
//!    ByteStream `Read` for big ones, SHA-256 verified before a file enters the cache);
//! 2. **execute** ([`exec`]): run the command with exactly its environment, in its working
//!    directory, in a process group of its own, stdout and stderr going to files; on timeout or
//!    cancellation the whole group gets `SIGKILL`;
//! 3. **upload** ([`outputs`]): find the outputs (`output_paths`, or the older
//!    `output_files`/`output_directories`), hash them, build `Tree` messages, and upload what
//!    the CAS lacks (`FindMissingBlobs` first, then `BatchUpdateBlobs` or a streamed ByteStream
//!    `Write`), all CAS traffic going through [`remote`];
//! 4. **clean up**: remove the action directory, whatever happened before.
//!
//! Every problem — bad input, a missing blob, a timeout — ends up in the returned
//! `ExecuteResponse.status`, with the REAPI-mandated code; [`Executor::execute`] never fails
//! and never panics on what came off the network.
//!
//! ```no_run
//! # async fn demo(channel: tonic::transport::Channel, digest: kiln_proto::reapi::Digest) -> kiln_node::error::Result<()> {
//! use kiln_node::worker::{Executor, ExecutorConfig};
//! let executor = Executor::new(ExecutorConfig {
//!     work_dir: "/var/lib/kiln-worker".into(),
//!     cache_max_bytes: 10 << 30,
//!     worker_name: "worker-1".into(),
//! })?;
//! let cancel = tokio_util::sync::CancellationToken::new(); // cancel() when the lease goes away
//! let response = executor.execute(channel, "", digest, cancel).await;
//! # let _ = response; Ok(()) }
//! ```
//!
//! Architecture Invariants:
//! - nothing the worker creates, reads or uploads lies outside the action's directory: input
//!   names are single path components, input symlinks must resolve inside the input root,
//!   output paths and the working directory are checked lexically and again on disk, and
//!   output symlinks must point inside the root too (absolute symlink targets are refused
//!   both ways, whatever the server's `symlink_absolute_path_strategy`);
//! - a cache file is only ever created by renaming a fully written, hash-verified temp file,
//!   and is never written again: executable and non-executable copies of the same content
//!   are two cache files, because hardlinks share their mode bits;
//! - a started process group never outlives its action: it is killed on timeout, on
//!   cancellation, when the future is dropped, and (its stragglers) when its leader exits.

pub mod bot;
pub mod cache;
pub mod exec;
pub mod livelog;
pub mod materialize;
pub mod outputs;
pub mod remote;

pub use exec::{Executor, ExecutorConfig, ExecutorStats};

use crate::digest::BlobDigest;
use crate::error::KilnError;

/// Actions run to the end, by `outcome` (`ok`, `timeout`, `cancelled`, `error`).
pub const ACTIONS_EXECUTED: &str = "kiln_worker_actions_total";
/// Time spent in each phase, by `phase` (`prepare`, `execute`, `upload`, `cleanup`).
pub const ACTION_PHASE_SECONDS: &str = "kiln_worker_action_phase_seconds";
/// Input files served from the local content cache, and their bytes.
pub const CACHE_HITS: &str = "kiln_worker_cache_hits_total";
pub const CACHE_HIT_BYTES: &str = "kiln_worker_cache_hit_bytes_total";
/// Input files that were not in the local content cache, and their bytes.
pub const CACHE_MISSES: &str = "kiln_worker_cache_misses_total";
pub const CACHE_MISS_BYTES: &str = "kiln_worker_cache_miss_bytes_total";
/// Cache files removed to stay within `cache_max_bytes`.
pub const CACHE_EVICTIONS: &str = "kiln_worker_cache_evictions_total";
/// Bytes held by the local content cache.
pub const CACHE_BYTES: &str = "kiln_worker_cache_bytes";
/// Blob bytes downloaded from the CAS (inputs, actions, commands, directories).
pub const BYTES_FETCHED: &str = "kiln_worker_bytes_fetched_total";
/// Blob bytes uploaded to the CAS (outputs, stdout, stderr, trees).
pub const BYTES_UPLOADED: &str = "kiln_worker_bytes_uploaded_total";

/// Describes the worker's metrics; the `kiln worker` binary calls it once at start-up.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(ACTIONS_EXECUTED, "actions run to the end by this worker, by outcome");
    describe_histogram!(ACTION_PHASE_SECONDS, Unit::Seconds, "time per action phase, by phase");
    describe_counter!(CACHE_HITS, "input files materialized from the local content cache");
    describe_counter!(CACHE_HIT_BYTES, Unit::Bytes, "bytes of input files materialized from the local content cache");
    describe_counter!(CACHE_MISSES, "input files missing from the local content cache");
    describe_counter!(CACHE_MISS_BYTES, Unit::Bytes, "bytes of input files missing from the local content cache");
    describe_counter!(CACHE_EVICTIONS, "local content cache files evicted by the size limit");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "bytes held by the local content cache");
    describe_counter!(BYTES_FETCHED, Unit::Bytes, "blob bytes downloaded from the CAS");
    describe_counter!(BYTES_UPLOADED, Unit::Bytes, "blob bytes uploaded to the CAS");
}

/// Why an action could not run or finish. Each variant maps to the `google.rpc.Status` that
/// [`exec::Executor::execute`] reports, in [`ExecError::to_rpc_status`], the one place that
/// picks a code.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Bad input (INVALID_ARGUMENT), missing blobs (FAILED_PRECONDITION with a
    /// `PreconditionFailure`, from [`KilnError::MissingBlobs`]), a local I/O failure
    /// (INTERNAL), …: code and details come from [`KilnError`].
    #[error(transparent)]
    Kiln(#[from] KilnError),
    /// A CAS call failed: its code is passed on (UNAVAILABLE stays retryable).
    #[error("{context}: {message}")]
    Remote { context: String, code: tonic::Code, message: String },
    /// The lease was cancelled: CANCELLED.
    #[error("the action was cancelled")]
    Cancelled,
}

impl ExecError {
    pub(crate) fn remote(context: impl Into<String>, status: &tonic::Status) -> Self {
        Self::Remote { context: context.into(), code: status.code(), message: status.message().to_string() }
    }

    pub(crate) fn missing(context: impl Into<String>, mut missing: Vec<BlobDigest>) -> Self {
        missing.sort();
        missing.dedup();
        Self::Kiln(KilnError::MissingBlobs { context: context.into(), missing })
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Kiln(e) => e.code(),
            Self::Remote { code, .. } => *code,
            Self::Cancelled => tonic::Code::Cancelled,
        }
    }

    pub fn to_rpc_status(&self) -> kiln_proto::rpc::Status {
        match self {
            Self::Kiln(e) => e.to_rpc_status(),
            _ => kiln_proto::rpc_status(self.code(), self.to_string(), vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::DigestFunction;
    use kiln_proto::rpc_details::PreconditionFailure;
    use prost::Message;

    #[test]
    fn missing_blobs_become_failed_precondition_with_one_violation_each() {
        let a = DigestFunction::Sha256.digest_of(b"a");
        let b = DigestFunction::Sha256.digest_of(b"bb");
        let s = ExecError::missing("inputs", vec![b, a, b]).to_rpc_status();
        assert_eq!(s.code, tonic::Code::FailedPrecondition as i32);
        assert_eq!(s.details.len(), 1);
        assert_eq!(s.details[0].type_url, "type.googleapis.com/google.rpc.PreconditionFailure");
        let pf = PreconditionFailure::decode(&s.details[0].value[..]).unwrap();
        assert_eq!(pf.violations.len(), 2);
        assert_eq!(pf.violations[0].r#type, "MISSING");
        assert!(pf.violations.iter().any(|v| v.subject == format!("blobs/{}/2", b.hex())));
        assert_eq!(ExecError::Cancelled.to_rpc_status().code, tonic::Code::Cancelled as i32);
    }
}
