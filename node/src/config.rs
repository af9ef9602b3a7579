//! The one configuration tree of a node.
//!
//! Parsed from TOML with `deny_unknown_fields` (a misspelt key is an error, not a silent
//! default), then [`Config::validate`]d. Every field says its unit and default. `kiln dev` uses
//! [`Config::dev`]; `kiln serve --config FILE` reads a file and lets a few flags override it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's identity and addresses.
    pub node: NodeConfig,
    /// Blob storage (CAS).
    #[serde(default)]
    pub storage: StorageConfig,
    /// Action Cache.
    #[serde(default)]
    pub action_cache: ActionCacheConfig,
    /// Limits advertised to clients and enforced on requests.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Scheduling timeouts and bounds.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Raft timing.
    #[serde(default)]
    pub raft: RaftConfig,
    /// The worker embedded in the node (`kiln dev` turns it on).
    #[serde(default)]
    pub worker: EmbeddedWorkerConfig,
    /// Cluster membership and replication.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The Build Event Service.
    #[serde(default)]
    pub build_events: BuildEventsConfig,
    /// Streaming every finished action to an external receiver.
    #[serde(default)]
    pub completed_action_logger: CompletedActionLoggerConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildEventsConfig {
    /// Largest encoded event accepted, in bytes. Default 2 MiB.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// Streams served at once by one node. Default 10000.
    #[serde(default = "default_max_active_streams")]
    pub max_active_streams: usize,
    /// Streams kept in the index (and their events in the stores); the stream whose last event
    /// is oldest is forgotten first. Default 100000.
    #[serde(default = "default_max_indexed_streams")]
    pub max_indexed_streams: u64,
    /// A stream with no event for this long releases its actor. Default 120.
    #[serde(default = "default_stream_idle_secs")]
    pub stream_idle_secs: u64,
}

impl Default for BuildEventsConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: default_max_event_bytes(),
            max_active_streams: default_max_active_streams(),
            max_indexed_streams: default_max_indexed_streams(),
            stream_idle_secs: default_stream_idle_secs(),
        }
    }
}

fn default_max_event_bytes() -> usize {
    2 << 20
}
fn default_max_active_streams() -> usize {
    10_000
}
fn default_max_indexed_streams() -> u64 {
    100_000
}
fn default_stream_idle_secs() -> u64 {
    120
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletedActionLoggerConfig {
    /// gRPC endpoint of a CompletedActionLogger receiver (`http://host:port`); unset: off.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Finished actions buffered while the receiver is slow or away; past it they are dropped
    /// (and counted), execution never waits. Default 10000.
    #[serde(default = "default_logger_buffer")]
    pub buffer: usize,
}

impl Default for CompletedActionLoggerConfig {
    fn default() -> Self {
        Self { endpoint: None, buffer: default_logger_buffer() }
    }
}

fn default_logger_buffer() -> usize {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Copies of each blob and Action Cache entry, on distinct nodes. Default 2.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    /// The members that form the cluster on its very first start, identical on every node
    /// (a node that was started before never re-forms it; later changes go through
    /// `kiln cluster add/remove`). Empty: a cluster of this node alone.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// This node joins an existing cluster (`kiln cluster add` makes it a member): it never
    /// forms a cluster of its own. Default false.
    #[serde(default)]
    pub join: bool,
    /// Seconds between repair ticks. A tick runs a full pass over this node's blobs
    /// (re-replication, hinted handoff, rebalancing) when one is due: after a start, a ring
    /// change, a replica that could not be pushed or a pass that could not confirm every
    /// replica. Default 30.
    #[serde(default = "default_repair_interval_secs")]
    pub repair_interval_secs: u64,
    /// Seconds after which a full pass runs although nothing asked for one, to find replicas
    /// lost without any node seeing a failure (an owner's disk replaced). Default 600.
    #[serde(default = "default_repair_full_interval_secs")]
    pub repair_full_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The member's node id.
    pub id: u64,
    /// Its gRPC address, as the other nodes reach it (`host:port`).
    pub address: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            replication_factor: default_replication_factor(),
            peers: vec![],
            join: false,
            repair_interval_secs: default_repair_interval_secs(),
            repair_full_interval_secs: default_repair_full_interval_secs(),
        }
    }
}

fn default_repair_interval_secs() -> u64 {
    30
}

fn default_repair_full_interval_secs() -> u64 {
    600
}

fn default_replication_factor() -> usize {
    2
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// An operation no client watched (Execute stream, WaitExecution) for this many seconds is
    /// cancelled and its worker freed. Default 60.
    #[serde(default = "default_orphan_grace_secs")]
    pub orphan_grace_secs: u64,
    /// A queued action whose platform properties no connected worker offers fails with
    /// FAILED_PRECONDITION after this many seconds. Default 60.
    #[serde(default = "default_unmatched_platform_secs")]
    pub unmatched_platform_secs: u64,
    /// A bot session silent for this many seconds is gone; its lease is requeued. Default 30.
    #[serde(default = "default_bot_silence_secs")]
    pub bot_silence_secs: u64,
    /// How many times an action may lose its worker before it fails with UNAVAILABLE. Default 3.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Execution timeout of actions that set none, in seconds. Default 3600.
    #[serde(default = "default_exec_timeout_secs")]
    pub default_exec_timeout_secs: u64,
    /// Finished operations stay queryable this many seconds, then are pruned. Default 3600.
    #[serde(default = "default_operation_retention_secs")]
    pub operation_retention_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat, in milliseconds. Default 250.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Election timeout range, in milliseconds. Defaults 1000 and 2000.
    #[serde(default = "default_election_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Entries between snapshots (the log before a snapshot is purged). Default 5000.
    #[serde(default = "default_snapshot_every_entries")]
    pub snapshot_every_entries: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedWorkerConfig {
    /// Run a worker inside this node, connected to it. Default false (`kiln dev`: true).
    #[serde(default)]
    pub enabled: bool,
    /// Actions run at once. Default: the number of CPUs.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Leases taken ahead while every slot is busy (see `kiln worker --prefetch`). Default 0;
    /// `kiln dev`, whose worker is the only one, takes one per slot.
    #[serde(default)]
    pub prefetch: Option<usize>,
    /// Work directory (action dirs and the local content cache). Default `<data_dir>/worker`.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Platform properties the worker offers, as `key = "value"`.
    #[serde(default)]
    pub platform: std::collections::BTreeMap<String, String>,
    /// Local content cache size, in bytes. Default 4 GiB.
    #[serde(default = "default_worker_cache_bytes")]
    pub cache_max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the cluster and never reused. Default 1.
    #[serde(default = "default_node_id")]
    pub id: u64,
    /// gRPC listen address (every API on one port). Default `127.0.0.1:8980`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP listen address for `/metrics` and the status pages. Default `127.0.0.1:9980`.
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// Data directory: blobs, indexes, logs of this node. One node per directory. Default `./.kiln`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

/// When blob files are fsynced (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Group commit: acknowledge once the blob is renamed into place, fsync it with the other
    /// blobs of the same window shortly after. A `kill -9` loses nothing (the page cache holds
    /// it); a power loss within the window can tear a blob, which verification then drops.
    Batch,
    /// fsync the file and its directory before acknowledging.
    Always,
    /// Never fsync blob files (scratch caches).
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// fsync policy for blob files: `batch` (default), `always` or `never`.
    #[serde(default = "default_fsync")]
    pub fsync: FsyncPolicy,
    /// Group-commit window of the `batch` policy, in milliseconds. Default 10.
    #[serde(default = "default_fsync_batch_window_ms")]
    pub fsync_batch_window_ms: u64,
    /// Size limit of the CAS on disk, in bytes. Least recently used blobs are evicted above it.
    /// Default 10 GiB.
    #[serde(default = "default_max_size_bytes")]
    pub max_size_bytes: u64,
    /// A blob touched (written, read, or reported present by FindMissingBlobs) within this many
    /// seconds is never evicted: a build that was told a blob exists can still read it.
    /// Default 3600.
    #[serde(default = "default_protect_window_secs")]
    pub protect_window_secs: u64,
    /// Bytes of small blobs kept in memory in front of the disk. Default 128 MiB; 0 disables.
    #[serde(default = "default_memory_tier_bytes")]
    pub memory_tier_bytes: u64,
    /// Largest blob the memory tier holds, in bytes. Default 64 KiB.
    #[serde(default = "default_memory_tier_max_blob_bytes")]
    pub memory_tier_max_blob_bytes: u64,
    /// Memory sled may use for its page cache, in bytes. Default 64 MiB.
    #[serde(default = "default_index_cache_bytes")]
    pub index_cache_bytes: u64,
    /// Blobs whose presence is remembered in memory (40 bytes each in two hash tables; the
    /// default, 1,835,008, fills their 2^20 buckets each to 7/8: 82 MiB once full). A presence
    /// check of a remembered blob, or a read of a remembered small one, needs no index read.
    /// Default 1835008.
    #[serde(default = "default_presence_cache_entries")]
    pub presence_cache_entries: usize,
    /// Bulk writes (a pack append of 64 KiB or more, an upload of 8 MiB or more) go past the
    /// page cache (`O_DIRECT`) where the file system allows it: they cost the node's cores
    /// no page-cache copy, and an upload waits for the device instead. Turn off on a disk much
    /// slower than memory (a network volume), where buffered writes absorb bursts, or where
    /// large blobs are mostly read just after they are written. Default true.
    #[serde(default = "default_true")]
    pub direct_writes: bool,
    /// Unfinished ByteStream uploads kept for resumption at most. Default 1024.
    #[serde(default = "default_max_partial_uploads")]
    pub max_partial_uploads: usize,
    /// Seconds an unfinished upload stays resumable without activity. Default 3600.
    #[serde(default = "default_partial_upload_ttl_secs")]
    pub partial_upload_ttl_secs: u64,
    /// Small blobs are appended to pack files of up to this many bytes (a new pack starts
    /// when the current one would grow past it). Default 64 MiB.
    #[serde(default = "default_pack_file_bytes")]
    pub pack_file_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionCacheConfig {
    /// Write-once: the first result stored for an action stays; later updates are ignored
    /// (unless the stored one lost blobs it references). Default false.
    #[serde(default)]
    pub write_once: bool,
    /// Largest total of stdout, stderr and output files inlined into one GetActionResult
    /// response, in bytes. Default 1 MiB.
    #[serde(default = "default_max_inline_bytes")]
    pub max_inline_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `max_batch_total_size_bytes` advertised in Capabilities and enforced on the Batch calls.
    /// Default 4 MiB (gRPC's usual message limit).
    #[serde(default = "default_max_batch_total_size_bytes")]
    pub max_batch_total_size_bytes: u64,
    /// Largest gRPC message the server decodes, in bytes. Kept above the batch limit so an
    /// oversized batch gets a clear INVALID_ARGUMENT rather than a transport error. Default 16 MiB.
    #[serde(default = "default_max_grpc_message_bytes")]
    pub max_grpc_message_bytes: usize,
}

fn default_orphan_grace_secs() -> u64 {
    60
}
fn default_unmatched_platform_secs() -> u64 {
    60
}
fn default_bot_silence_secs() -> u64 {
    30
}
fn default_max_attempts() -> u32 {
    3
}
fn default_exec_timeout_secs() -> u64 {
    3600
}
fn default_operation_retention_secs() -> u64 {
    3600
}
fn default_heartbeat_ms() -> u64 {
    250
}
fn default_election_min_ms() -> u64 {
    1000
}
fn default_election_max_ms() -> u64 {
    2000
}
fn default_snapshot_every_entries() -> u64 {
    5000
}
fn default_worker_cache_bytes() -> u64 {
    4 << 30
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            orphan_grace_secs: default_orphan_grace_secs(),
            unmatched_platform_secs: default_unmatched_platform_secs(),
            bot_silence_secs: default_bot_silence_secs(),
            max_attempts: default_max_attempts(),
            default_exec_timeout_secs: default_exec_timeout_secs(),
            operation_retention_secs: default_operation_retention_secs(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: default_heartbeat_ms(),
            election_timeout_min_ms: default_election_min_ms(),
            election_timeout_max_ms: default_election_max_ms(),
            snapshot_every_entries: default_snapshot_every_entries(),
        }
    }
}

impl Default for EmbeddedWorkerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            concurrency: None,
            prefetch: None,
            work_dir: None,
            platform: Default::default(),
            cache_max_bytes: default_worker_cache_bytes(),
        }
    }
}

fn default_node_id() -> u64 {
    1
}
fn default_listen() -> SocketAddr {
    "127.0.0.1:8980".parse().expect("valid literal")
}
fn default_http() -> SocketAddr {
    "127.0.0.1:9980".parse().expect("valid literal")
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./.kiln")
}
fn default_fsync() -> FsyncPolicy {
    FsyncPolicy::Batch
}
fn default_fsync_batch_window_ms() -> u64 {
    10
}
fn default_max_size_bytes() -> u64 {
    10 << 30
}
fn default_protect_window_secs() -> u64 {
    3600
}
fn default_memory_tier_bytes() -> u64 {
    128 << 20
}
fn default_pack_file_bytes() -> u64 {
    64 << 20
}

fn default_memory_tier_max_blob_bytes() -> u64 {
    64 << 10
}
fn default_index_cache_bytes() -> u64 {
    64 << 20
}
fn default_true() -> bool {
    true
}
fn default_presence_cache_entries() -> usize {
    2 * (7 << 20) / 8
}
fn default_max_partial_uploads() -> usize {
    1024
}
fn default_partial_upload_ttl_secs() -> u64 {
    3600
}
fn default_max_inline_bytes() -> u64 {
    1 << 20
}
fn default_max_batch_total_size_bytes() -> u64 {
    4 << 20
}
fn default_max_grpc_message_bytes() -> usize {
    16 << 20
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { id: default_node_id(), listen: default_listen(), http: default_http(), data_dir: default_data_dir() }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            fsync: default_fsync(),
            fsync_batch_window_ms: default_fsync_batch_window_ms(),
            max_size_bytes: default_max_size_bytes(),
            protect_window_secs: default_protect_window_secs(),
            memory_tier_bytes: default_memory_tier_bytes(),
            memory_tier_max_blob_bytes: default_memory_tier_max_blob_bytes(),
            pack_file_bytes: default_pack_file_bytes(),
            index_cache_bytes: default_index_cache_bytes(),
            presence_cache_entries: default_presence_cache_entries(),
            direct_writes: true,
            max_partial_uploads: default_max_partial_uploads(),
            partial_upload_ttl_secs: default_partial_upload_ttl_secs(),
        }
    }
}

impl Default for ActionCacheConfig {
    fn default() -> Self {
        Self { write_once: false, max_inline_bytes: default_max_inline_bytes() }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_batch_total_size_bytes: default_max_batch_total_size_bytes(),
            max_grpc_message_bytes: default_max_grpc_message_bytes(),
        }
    }
}

/// A configuration that does not make sense, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl Config {
    /// The configuration of `kiln dev`: every default.
    pub fn dev() -> Self {
        Self {
            node: NodeConfig::default(),
            storage: StorageConfig::default(),
            action_cache: ActionCacheConfig::default(),
            limits: LimitsConfig::default(),
            scheduler: SchedulerConfig::default(),
            raft: RaftConfig::default(),
            worker: EmbeddedWorkerConfig { enabled: true, ..Default::default() },
            cluster: ClusterConfig::default(),
            build_events: BuildEventsConfig::default(),
            completed_action_logger: CompletedActionLoggerConfig::default(),
        }
    }

    /// The address other nodes reach this one at: its entry in `cluster.peers`, else `listen`.
    pub fn advertise_address(&self, bound: std::net::SocketAddr) -> String {
        self.cluster
            .peers
            .iter()
            .find(|p| p.id == self.node.id)
            .map(|p| p.address.clone())
            .unwrap_or_else(|| bound.to_string())
    }

    pub fn from_toml(text: &str, origin: &std::path::Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(origin.to_path_buf(), e))?;
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Self::from_toml(&text, path)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, why: &str| Err(ConfigError::Invalid { key, why: why.to_string() });
        if self.node.id == 0 {
            return invalid("node.id", "must be at least 1");
        }
        if self.node.listen == self.node.http && self.node.listen.port() != 0 {
            return invalid("node.http", "must differ from node.listen");
        }
        if self.storage.max_size_bytes < (1 << 20) {
            return invalid("storage.max_size_bytes", "must be at least 1 MiB");
        }
        if self.storage.fsync_batch_window_ms == 0 || self.storage.fsync_batch_window_ms > 10_000 {
            return invalid("storage.fsync_batch_window_ms", "must be between 1 and 10000");
        }
        if self.storage.pack_file_bytes < 1 << 20 {
            return invalid("storage.pack_file_bytes", "must be at least 1 MiB");
        }
        if self.storage.memory_tier_max_blob_bytes > self.storage.memory_tier_bytes && self.storage.memory_tier_bytes > 0 {
            return invalid("storage.memory_tier_max_blob_bytes", "must not exceed storage.memory_tier_bytes");
        }
        if self.build_events.max_event_bytes < 1024 || self.build_events.max_event_bytes > self.limits.max_grpc_message_bytes {
            return invalid("build_events.max_event_bytes", "must be between 1 KiB and limits.max_grpc_message_bytes");
        }
        if self.build_events.max_active_streams == 0 || self.build_events.max_indexed_streams == 0 {
            return invalid("build_events.max_active_streams", "the stream limits must be at least 1");
        }
        if self.completed_action_logger.buffer == 0 {
            return invalid("completed_action_logger.buffer", "must be at least 1");
        }
        if let Some(e) = &self.completed_action_logger.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return invalid("completed_action_logger.endpoint", "must be an http:// or https:// URL");
            }
        }
        if self.storage.max_partial_uploads == 0 {
            return invalid("storage.max_partial_uploads", "must be at least 1");
        }
        if self.limits.max_batch_total_size_bytes < 1024 {
            return invalid("limits.max_batch_total_size_bytes", "must be at least 1024");
        }
        if (self.limits.max_grpc_message_bytes as u64) < self.limits.max_batch_total_size_bytes + (64 << 10) {
            return invalid(
                "limits.max_grpc_message_bytes",
                "must exceed limits.max_batch_total_size_bytes by at least 64 KiB (room for the envelope)",
            );
        }
        if self.raft.election_timeout_min_ms <= self.raft.heartbeat_ms * 2
            || self.raft.election_timeout_max_ms <= self.raft.election_timeout_min_ms
        {
            return invalid(
                "raft.election_timeout_min_ms",
                "must exceed twice raft.heartbeat_ms, and election_timeout_max_ms must exceed it",
            );
        }
        if self.scheduler.max_attempts == 0 {
            return invalid("scheduler.max_attempts", "must be at least 1");
        }
        if self.scheduler.bot_silence_secs == 0 || self.scheduler.orphan_grace_secs == 0 {
            return invalid("scheduler.bot_silence_secs", "bot_silence_secs and orphan_grace_secs must be at least 1");
        }
        if self.cluster.replication_factor == 0 {
            return invalid("cluster.replication_factor", "must be at least 1");
        }
        if !self.cluster.join && !self.cluster.peers.is_empty() && !self.cluster.peers.iter().any(|p| p.id == self.node.id) {
            return invalid("cluster.peers", "must list this node's id (node.id) when it lists any");
        }
        let mut ids: Vec<u64> = self.cluster.peers.iter().map(|p| p.id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != self.cluster.peers.len() || ids.first() == Some(&0) {
            return invalid("cluster.peers", "ids must be distinct and at least 1");
        }
        if self.worker.concurrency == Some(0) {
            return invalid("worker.concurrency", "must be at least 1");
        }
        Ok(())
    }

    pub fn timeouts(&self) -> kiln_actors::Timeouts {
        let s = &self.scheduler;
        kiln_actors::Timeouts {
            orphan_grace: Duration::from_secs(s.orphan_grace_secs),
            unmatched_platform: Duration::from_secs(s.unmatched_platform_secs),
            bot_silence: Duration::from_secs(s.bot_silence_secs),
            max_attempts: s.max_attempts,
            default_exec_timeout: Duration::from_secs(s.default_exec_timeout_secs),
            ..Default::default()
        }
    }

    pub fn raft_settings(&self) -> kiln_raft::RaftSettings {
        kiln_raft::RaftSettings {
            heartbeat: Duration::from_millis(self.raft.heartbeat_ms),
            election_timeout_min: Duration::from_millis(self.raft.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(self.raft.election_timeout_max_ms),
            snapshot_every_entries: self.raft.snapshot_every_entries,
        }
    }

    pub fn protect_window(&self) -> Duration {
        Duration::from_secs(self.storage.protect_window_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_parse_and_validate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("scripts/config exists") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 1, "no example config under {}", dir.display());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = Config::from_toml("[node]\nid = 1\nlisten_addr = \"x\"\n", "t.toml".as_ref()).unwrap_err();
        assert!(e.to_string().contains("listen_addr"), "{e}");
        let mut c = Config::dev();
        c.storage.max_size_bytes = 10;
        assert!(c.validate().unwrap_err().to_string().contains("storage.max_size_bytes"));
        let c: Config = Config::from_toml("[node]\n[storage]\nfsync = \"always\"\n", "t.toml".as_ref()).unwrap();
        assert_eq!(c.storage.fsync, FsyncPolicy::Always);
        assert_eq!(c.node.listen, default_listen());
    }
}
