//! Metric names, described once at start-up. Exported as Prometheus text on `/metrics`.

pub const RPC_DURATION_SECONDS: &str = "kiln_rpc_duration_seconds";
pub const RPC_ERRORS: &str = "kiln_rpc_errors_total";
pub const CAS_STORED_BYTES: &str = "kiln_cas_stored_bytes";
pub const CAS_BLOBS_WRITTEN: &str = "kiln_cas_blobs_written_total";
pub const REPAIR_PASSES: &str = "kiln_repair_passes_total";
pub const REPAIR_SCANNED: &str = "kiln_repair_scanned_blobs_total";
pub const CAS_BYTES_WRITTEN: &str = "kiln_cas_bytes_written_total";
pub const CAS_BYTES_READ: &str = "kiln_cas_bytes_read_total";
pub const CAS_TEE_BYTES: &str = "kiln_cas_tee_bytes_total";
pub const CAS_MEMORY_HITS: &str = "kiln_cas_memory_tier_hits_total";
pub const CAS_EVICTIONS: &str = "kiln_cas_evictions_total";
pub const CAS_CORRUPT_BLOBS: &str = "kiln_cas_corrupt_blobs_total";
pub const CAS_FSYNC_BATCHES: &str = "kiln_cas_fsync_batches_total";
pub const CAS_PACK_RECORDS_MOVED: &str = "kiln_cas_pack_records_moved_total";
pub const CAS_PACK_DIRECT_BYTES: &str = "kiln_cas_pack_direct_bytes_total";
pub const CAS_UPLOAD_DIRECT_BYTES: &str = "kiln_cas_upload_direct_bytes_total";
pub const CAS_READ_BACK_BYTES: &str = "kiln_cas_read_back_bytes_total";
pub const INDEX_FLUSHES: &str = "kiln_index_flushes_total";
pub const AC_HITS: &str = "kiln_ac_hits_total";
pub const AC_MISSES: &str = "kiln_ac_misses_total";
pub const AC_UPDATES: &str = "kiln_ac_updates_total";
pub const SCHEDULER_PROPOSAL_SECONDS: &str = "kiln_scheduler_proposal_seconds";
pub const AC_RESULT_WRITE_SECONDS: &str = "kiln_ac_result_write_seconds";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(RPC_DURATION_SECONDS, Unit::Seconds, "gRPC handler latency by method");
    describe_histogram!(SCHEDULER_PROPOSAL_SECONDS, Unit::Seconds, "scheduling commands from proposal to applied, by command");
    describe_histogram!(kiln_raft::consensus::BATCH_COMMANDS, Unit::Count, "scheduling commands per Raft entry the leader proposed");
    describe_histogram!(AC_RESULT_WRITE_SECONDS, Unit::Seconds, "storing a worker's result in the Action Cache, until durable");
    describe_counter!(RPC_ERRORS, "gRPC calls that ended in an error status, by method and code");
    describe_gauge!(CAS_STORED_BYTES, Unit::Bytes, "bytes of blobs stored on this node");
    describe_counter!(CAS_BLOBS_WRITTEN, "blobs committed to disk");
    describe_counter!(REPAIR_PASSES, "full repair passes (each reads every blob of the node and asks its owners)");
    describe_counter!(REPAIR_SCANNED, "blobs read by repair passes");
    describe_counter!(CAS_BYTES_WRITTEN, Unit::Bytes, "blob bytes committed to disk");
    describe_counter!(CAS_BYTES_READ, Unit::Bytes, "blob bytes served");
    describe_counter!(CAS_TEE_BYTES, Unit::Bytes, "upload bytes forwarded to the blob's other owners while they arrived");
    describe_counter!(CAS_MEMORY_HITS, "blob reads served from the memory tier");
    describe_counter!(CAS_EVICTIONS, "blobs evicted by the size limit");
    describe_counter!(CAS_CORRUPT_BLOBS, "blobs dropped because their bytes no longer matched the digest");
    describe_counter!(CAS_FSYNC_BATCHES, "group-commit fsync batches");
    describe_counter!(CAS_PACK_RECORDS_MOVED, "small blobs moved out of mostly unused packs by compaction");
    describe_counter!(CAS_PACK_DIRECT_BYTES, "bytes of small-blob records appended to packs with O_DIRECT, past the page cache");
    describe_counter!(CAS_UPLOAD_DIRECT_BYTES, "bytes of large uploads written with O_DIRECT, past the page cache");
    describe_counter!(CAS_READ_BACK_BYTES, "bytes of uploads written past the page cache that the kernel was asked to read back into it");
    describe_counter!(INDEX_FLUSHES, "flushes of the index database shared by concurrent durable writes");
    describe_counter!(AC_HITS, "GetActionResult calls answered with a result");
    describe_counter!(AC_MISSES, "GetActionResult calls answered NOT_FOUND");
    describe_counter!(AC_UPDATES, "UpdateActionResult calls that stored a result");
    use kiln_actors::event_stream as es;
    describe_counter!(es::EVENTS_STORED, "build events stored (replicated) and acknowledged");
    describe_counter!(es::EVENTS_RESENT, "build events resent by a client and acknowledged again without storing");
    describe_gauge!(es::STREAMS_ACTIVE, "build-event streams with an actor on this node");
    use crate::completed_actions as ca;
    describe_counter!(ca::SENT, "finished actions acknowledged by the Completed Action Logger receiver");
    describe_counter!(ca::DROPPED, "finished actions dropped because the logger's buffer was full");
    describe_counter!(ca::RECONNECTS, "Completed Action Logger streams that failed and were reopened");
    crate::worker::describe_metrics();
}

/// Records one RPC's latency and, on error, its code. Used by every handler through
/// [`crate::services::observe`].
pub fn record_rpc(method: &'static str, elapsed: std::time::Duration, code: Option<tonic::Code>) {
    metrics::histogram!(RPC_DURATION_SECONDS, "method" => method).record(elapsed.as_secs_f64());
    if let Some(code) = code {
        metrics::counter!(RPC_ERRORS, "method" => method, "code" => format!("{code:?}")).increment(1);
    }
}
