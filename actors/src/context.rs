//! What every actor is given: the replicated state to read, a way to propose, the timeouts.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use kiln_raft::command::{Command, CommandResult};
use kiln_raft::state_machine::SmShared;
use kiln_raft::ProposeError;

/// Proposes commands to the cluster (the node forwards to the leader when it is not).
pub trait Proposer: Send + Sync + 'static {
    fn propose(&self, cmd: Command) -> BoxFuture<'static, Result<CommandResult, ProposeError>>;
    /// Whether this node is the Raft leader: only the leader's actors propose timeouts, so a
    /// cluster does not act on one timeout three times.
    fn is_leader(&self) -> bool;
}

/// Scheduling timeouts and bounds.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// An operation no client watched for this long is cancelled (orphaned work).
    pub orphan_grace: Duration,
    /// A queued action whose platform no connected bot offers fails after this long.
    pub unmatched_platform: Duration,
    /// A bot session with no call for this long is gone; its lease is requeued.
    pub bot_silence: Duration,
    /// Times a lease may be lost before the operation fails with UNAVAILABLE.
    pub max_attempts: u32,
    /// Execution time allowed when the action sets no timeout.
    pub default_exec_timeout: Duration,
    /// Extra time over the execution timeout before the lease is presumed lost (fetching
    /// inputs and uploading outputs count too).
    pub exec_grace: Duration,
    /// How often actors check their timers.
    pub tick: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            orphan_grace: Duration::from_secs(60),
            unmatched_platform: Duration::from_secs(60),
            bot_silence: Duration::from_secs(30),
            max_attempts: 3,
            default_exec_timeout: Duration::from_secs(3600),
            exec_grace: Duration::from_secs(300),
            tick: Duration::from_millis(500),
        }
    }
}

/// Shared by every actor of a node.
#[derive(Clone)]
pub struct ActorContext {
    pub shared: Arc<SmShared>,
    pub proposer: Arc<dyn Proposer>,
    pub timeouts: Timeouts,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
