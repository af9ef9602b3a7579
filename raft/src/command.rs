//! The replicated commands and their results.
//!
//! Every command carries the times it needs (`now_ms`), stamped by the proposer: `apply` never
//! reads a clock. Operation names and lease ids are chosen by the proposer too, so applying the
//! same log gives the same state on every node. Commands are serialized through
//! [`crate::codec`] inside openraft entries; add variants at the end only.

use serde::{Deserialize, Serialize};

/// The newest command format this node reads. A node tells its peers in every Raft response;
/// the leader packs commands into a [`Command::Batch`] only when every member reads version 2,
/// so a node of the previous release keeps following the log during a rolling upgrade.
pub const COMMAND_VERSION: u32 = 2;
/// The command format that added [`Command::Batch`].
pub const BATCH_COMMAND_VERSION: u32 = 2;

/// A digest as REAPI spells it, plus the function it was computed with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ActionKey {
    pub instance_name: String,
    pub hash: String,
    pub size: i64,
    pub digest_function: i32,
}

/// Who asked for an operation (REAPI RequestMetadata), for listing and filtering.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestInfo {
    pub tool_name: String,
    pub tool_version: String,
    pub invocation_id: String,
    pub correlated_invocations_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnqueueCmd {
    /// The new operation's name, if this action is not joined to a running one.
    pub name: String,
    pub action: ActionKey,
    /// Platform properties the bot must offer, sorted.
    pub platform: Vec<(String, String)>,
    /// Smaller runs first (REAPI ExecutionPolicy.priority).
    pub priority: i32,
    /// Actions with `do_not_cache` are never joined to another execution.
    pub do_not_cache: bool,
    /// Results of this run go to the Action Cache unless `do_not_cache`.
    pub skip_cache_lookup: bool,
    /// Execution timeout the worker applies, in milliseconds (0 = the worker's default).
    pub timeout_ms: u64,
    pub request: RequestInfo,
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Queue an action, or join the operation already queued or running for it.
    Enqueue(EnqueueCmd),
    /// A bot opened a session; a previous session of the same bot id is replaced at once and
    /// its lease requeued (a restarted bot does not wait for its old session to time out).
    CreateBotSession { name: String, bot_id: String, platform: Vec<(String, String)>, now_ms: u64 },
    /// Hand a queued operation to a bot session. The first valid claim wins; later ones fail.
    Assign { session: String, op: String, now_ms: u64 },
    /// A bot reported the result: the operation completes with this encoded ExecuteResponse.
    Complete { op: String, response: Vec<u8>, now_ms: u64 },
    /// A bot session went away: its lease is requeued (bounded by `max_attempts`).
    BotGone { session: String, reason: String, max_attempts: u32, now_ms: u64 },
    /// Put an executing operation back in the queue (lease lost), bounded by `max_attempts`.
    Requeue { op: String, reason: String, max_attempts: u32, now_ms: u64 },
    /// End an unfinished operation with an error status (a google.rpc.Code) and message.
    Fail { op: String, code: i32, message: String, now_ms: u64 },
    /// A client cancelled: the operation ends CANCELLED; a bot running it is told so.
    Cancel { op: String, now_ms: u64 },
    /// Clients on some node are watching these operations.
    KeepAlive { ops: Vec<String>, now_ms: u64 },
    /// Forget an operation.
    Delete { op: String },
    /// Forget operations completed before this time.
    Prune { completed_before_ms: u64 },
    /// A node serving a build-event stream reports its progress (merged monotonically).
    UpdateStream(crate::streams::StreamUpdate),
    /// Commands proposed together by the leader, applied in order as if they had been
    /// separate entries. Never nested; read by nodes of [`COMMAND_VERSION`] 2 and later.
    Batch(Vec<Command>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The operation that runs the action; `joined` if it was already queued or running.
    Enqueued { name: String, joined: bool },
    /// Whether the command changed anything (a claim won, a completion accepted, ...).
    Applied(bool),
    /// Membership changes and blank entries.
    None,
    /// The results of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResult>),
}

impl Command {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Enqueue(_) => "enqueue",
            Command::CreateBotSession { .. } => "create_bot_session",
            Command::Assign { .. } => "assign",
            Command::Complete { .. } => "complete",
            Command::BotGone { .. } => "bot_gone",
            Command::Requeue { .. } => "requeue",
            Command::Fail { .. } => "fail",
            Command::Cancel { .. } => "cancel",
            Command::KeepAlive { .. } => "keep_alive",
            Command::Delete { .. } => "delete",
            Command::Prune { .. } => "prune",
            Command::UpdateStream(_) => "update_stream",
            Command::Batch(_) => "batch",
        }
    }
}
