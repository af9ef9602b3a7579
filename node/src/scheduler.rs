//! The node's side of scheduling: proposing commands, following operations for clients, and
//! the periodic proposals (keep-alives of watched operations, pruning of finished ones).
//!
//! Clients watch an operation through the local applied state (a watch channel per
//! operation), on any node. While a client watches, this node tells the cluster so with a
//! batched `KeepAlive` command, which is what lets the leader's JobActor tell an orphaned
//! operation (nobody waits for it) from a watched one.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kiln_actors::job::{JobSupervisor, SupervisorMsg};
use kiln_actors::lease::{LeaseSupervisor, LeaseSupervisorMsg};
use kiln_actors::{ActorContext, Proposer, Timeouts};
use kiln_proto::longrunning::{operation, Operation as LroOperation};
use kiln_proto::reapi::{execution_stage, ExecuteOperationMetadata, ExecuteResponse, ExecutedActionMetadata};
use kiln_raft::command::{Command, CommandResult};
use kiln_raft::scheduler::{Operation, Stage};
use kiln_raft::state_machine::SmShared;
use kiln_raft::{Consensus, ProposeError, RaftSettings};
use prost::Message;
use ractor::{Actor, ActorRef};

use crate::error::{KilnError, Result};

pub const EXECUTE_RESPONSE: &str = "build.bazel.remote.execution.v2.ExecuteResponse";
pub const ACTION_RESULT_TYPE: &str = "build.bazel.remote.execution.v2.ActionResult";
pub const EXECUTE_METADATA: &str = "build.bazel.remote.execution.v2.ExecuteOperationMetadata";

fn proposal_error(e: ProposeError) -> KilnError {
    match e {
        ProposeError::NotLeader { leader } => KilnError::Unavailable(format!("this node cannot reach the scheduling leader (leader: {leader:?})")),
        ProposeError::Unavailable(m) | ProposeError::Refused(m) => KilnError::Unavailable(format!("scheduling state unavailable: {m}")),
    }
}

/// Proposes through this node: locally on the leader, forwarded one hop from a follower.
pub struct NodeProposer(pub Consensus);

impl Proposer for NodeProposer {
    fn propose(&self, cmd: Command) -> BoxFuture<'static, Result<CommandResult, ProposeError>> {
        let c = self.0.clone();
        Box::pin(async move { c.propose_anywhere(cmd).await })
    }

    fn is_leader(&self) -> bool {
        self.0.is_leader()
    }
}

pub struct Scheduler {
    pub consensus: Consensus,
    pub shared: Arc<SmShared>,
    pub timeouts: Timeouts,
    pub jobs: ActorRef<SupervisorMsg>,
    pub leases: ActorRef<LeaseSupervisorMsg>,
    proposer: Arc<NodeProposer>,
    watched: Mutex<HashMap<String, usize>>,
    ctx: ActorContext,
}

/// Keeps an operation marked as watched by this node while alive.
pub struct WatchGuard {
    scheduler: Arc<Scheduler>,
    op: String,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut w = self.scheduler.watched.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.op) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.op);
            }
        }
    }
}

impl Scheduler {
    pub async fn start(
        node_id: u64,
        members: BTreeMap<u64, String>,
        db: &sled::Db,
        raft: &RaftSettings,
        timeouts: Timeouts,
        retention: Duration,
    ) -> anyhow::Result<Arc<Self>> {
        let members = members.into_iter().map(|(id, addr)| (id, openraft::BasicNode { addr })).collect();
        let consensus = Consensus::open(node_id, db, raft, members).await?;
        let shared = consensus.shared.clone();
        let proposer = Arc::new(NodeProposer(consensus.clone()));
        let ctx = ActorContext { shared: shared.clone(), proposer: proposer.clone(), timeouts: timeouts.clone() };
        let (jobs, _) = Actor::spawn(None, JobSupervisor, ctx.clone()).await?;
        let (leases, _) = Actor::spawn(None, LeaseSupervisor, ctx.clone()).await?;
        let s = Arc::new(Self { consensus, shared, timeouts, jobs, leases, proposer, watched: Mutex::new(HashMap::new()), ctx });
        tokio::spawn(keep_alive_loop(Arc::downgrade(&s)));
        tokio::spawn(prune_loop(Arc::downgrade(&s), retention));
        Ok(s)
    }

    pub async fn propose(&self, cmd: Command) -> Result<CommandResult> {
        let (kind, started) = (cmd.kind(), std::time::Instant::now());
        let r = self.proposer.propose(cmd).await;
        metrics::histogram!(crate::metrics::SCHEDULER_PROPOSAL_SECONDS, "command" => kind).record(started.elapsed().as_secs_f64());
        r.map_err(proposal_error)
    }

    /// Proposes `cmds` to be applied one after the other, in one Raft entry when the cluster
    /// allows it; their results in order.
    pub async fn propose_together(&self, cmds: Vec<Command>) -> Result<Vec<CommandResult>> {
        let started = std::time::Instant::now();
        let r = self.consensus.propose_together_anywhere(cmds).await;
        metrics::histogram!(crate::metrics::SCHEDULER_PROPOSAL_SECONDS, "command" => "together").record(started.elapsed().as_secs_f64());
        r.map_err(proposal_error)
    }

    /// What this node's actors are given.
    pub fn actor_context(&self) -> ActorContext {
        self.ctx.clone()
    }

    pub fn watch_guard(self: &Arc<Self>, op: &str) -> WatchGuard {
        *self.watched.lock().unwrap_or_else(|p| p.into_inner()).entry(op.to_string()).or_insert(0) += 1;
        WatchGuard { scheduler: self.clone(), op: op.to_string() }
    }

    pub async fn shutdown(&self) {
        self.jobs.stop(None);
        self.leases.stop(None);
        let _ = self.consensus.raft.shutdown().await;
    }
}

async fn keep_alive_loop(s: std::sync::Weak<Scheduler>) {
    let period = match s.upgrade() {
        Some(s) => (s.timeouts.orphan_grace / 4).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(s) = s.upgrade() else { return };
        let ops: Vec<String> = s.watched.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        if ops.is_empty() {
            continue;
        }
        if let Err(e) = s.propose(Command::KeepAlive { ops, now_ms: kiln_actors::context::now_ms() }).await {
            tracing::debug!(error = %e, "keep-alive proposal failed");
        }
    }
}

async fn prune_loop(s: std::sync::Weak<Scheduler>, retention: Duration) {
    let period = (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        tokio::time::sleep(period).await;
        let Some(s) = s.upgrade() else { return };
        if !s.consensus.is_leader() {
            continue;
        }
        let before = kiln_actors::context::now_ms().saturating_sub(retention.as_millis() as u64);
        let any = s.shared.read(|st| st.sched.ops.values().any(|o| o.completed_at_ms.is_some_and(|t| t < before)));
        if any {
            if let Err(e) = s.propose(Command::Prune { completed_before_ms: before }).await {
                tracing::debug!(error = %e, "prune proposal failed");
            }
        }
    }
}

pub fn timestamp(ms: u64) -> kiln_proto::protobuf::Timestamp {
    kiln_proto::protobuf::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

fn stage_of(op: &Operation) -> execution_stage::Value {
    match op.stage {
        Stage::Queued => execution_stage::Value::Queued,
        Stage::Executing => execution_stage::Value::Executing,
        Stage::Completed => execution_stage::Value::Completed,
    }
}

/// The google.longrunning view of an operation, as Execute, WaitExecution and the Operations
/// service return it.
pub fn to_longrunning(op: &Operation) -> LroOperation {
    // Once a worker took the action, its output can be followed live (LogStream).
    let (stdout_stream_name, stderr_stream_name) =
        if op.started_at_ms.is_some() { crate::logstream::stream_names(&op.name) } else { Default::default() };
    let metadata = ExecuteOperationMetadata {
        stage: stage_of(op) as i32,
        action_digest: Some(kiln_proto::reapi::Digest { hash: op.action.hash.clone(), size_bytes: op.action.size }),
        stdout_stream_name,
        stderr_stream_name,
        partial_execution_metadata: Some(ExecutedActionMetadata {
            queued_timestamp: Some(timestamp(op.queued_at_ms)),
            worker_start_timestamp: op.started_at_ms.map(timestamp),
            ..Default::default()
        }),
        digest_function: op.action.digest_function,
    };
    let result = op.response.as_ref().map(|bytes| {
        // Stored responses were encoded by this code; an undecodable one is reported, not hidden.
        let resp = ExecuteResponse::decode(&bytes[..]).unwrap_or_else(|e| ExecuteResponse {
            status: Some(kiln_proto::rpc_status(tonic::Code::Internal, format!("stored result does not decode: {e}"), vec![])),
            ..Default::default()
        });
        operation::Result::Response(kiln_proto::pack_any(EXECUTE_RESPONSE, &resp))
    });
    LroOperation {
        name: op.name.clone(),
        metadata: Some(kiln_proto::pack_any(EXECUTE_METADATA, &metadata)),
        done: op.is_done(),
        result,
    }
}
