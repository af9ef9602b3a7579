//! Opening a node's Raft and proposing commands to it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};

use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, CommandResult, BATCH_COMMAND_VERSION};
use crate::log_store::LogStore;
use crate::network::{PeerChannels, PeerNetwork};
use kiln_proto::peer::{ProposeRequest, PEER_VERSION};
use crate::state_machine::{SmShared, StateMachine};
use crate::types::{Node, NodeId, Raft};

/// Raft timing and compaction settings.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    /// Leader heartbeat interval. openraft's 50 ms default is too tight for a loaded 2-core box.
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Take a snapshot (and allow purging the log before it) every this many entries.
    pub snapshot_every_entries: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1000),
            election_timeout_max: Duration::from_millis(2000),
            snapshot_every_entries: 5000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; the leader, if known, is named.
    #[error("this node is not the Raft leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, String)> },
    /// No quorum or the Raft core stopped.
    #[error("scheduling state unavailable: {0}")]
    Unavailable(String),
    /// The leader will not take these commands in one entry (a member cannot read it, or the
    /// leader predates forwarded batches): propose them one by one.
    #[error("the leader refused the commands as one entry: {0}")]
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("raft storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
}

/// A node's Raft: the openraft handle plus the state readers share.
#[derive(Clone)]
pub struct Consensus {
    pub raft: Raft,
    pub shared: Arc<SmShared>,
    pub node_id: NodeId,
    /// Channels to the peers, shared with the Raft network.
    pub channels: PeerChannels,
    batcher: mpsc::Sender<(Command, Reply)>,
}

type Reply = oneshot::Sender<Result<(CommandResult, u64), ProposeError>>;

/// Histogram of the commands per proposed entry.
pub const BATCH_COMMANDS: &str = "kiln_raft_batch_commands";

/// How long a proposal waits for a leader to be elected before giving up with UNAVAILABLE.
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// Longest a proposal waits to be committed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Format version of forwarded commands and results.
const FORWARD_V1: u8 = 1;
/// Most commands one Raft entry carries.
const MAX_BATCH: usize = 256;
/// Commands waiting for an entry at most; proposers beyond wait for room.
const MAX_WAITING: usize = 4096;

impl Consensus {
    /// Opens the log and state machine in `db` and starts Raft. `initial_members` forms the
    /// cluster on the very first start; a node that was initialized before ignores it (it never
    /// re-initializes: its log already holds the membership).
    pub async fn open(
        node_id: NodeId,
        db: &sled::Db,
        settings: &RaftSettings,
        initial_members: BTreeMap<NodeId, Node>,
    ) -> Result<Self, OpenError> {
        let config = openraft::Config {
            cluster_name: "kiln".into(),
            heartbeat_interval: settings.heartbeat.as_millis() as u64,
            election_timeout_min: settings.election_timeout_min.as_millis() as u64,
            election_timeout_max: settings.election_timeout_max.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(settings.snapshot_every_entries),
            max_in_snapshot_log_to_keep: settings.snapshot_every_entries / 5,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| OpenError::Raft(e.to_string()))?);
        let log = LogStore::open(db).map_err(|e| OpenError::Storage(e.to_string()))?;
        let sm = StateMachine::open(db).map_err(|e| OpenError::Storage(e.to_string()))?;
        let shared = sm.shared();
        let channels = PeerChannels::default();
        let network = PeerNetwork { channels: channels.clone() };
        let raft = Raft::new(node_id, config, network, log, sm).await.map_err(|e| OpenError::Raft(e.to_string()))?;
        let (batcher, waiting) = mpsc::channel(MAX_WAITING);
        tokio::spawn(run_batcher(raft.clone(), waiting));
        // A node joining an existing cluster has no members to form a cluster with: the
        // leader adds it.
        if !initial_members.is_empty() && !raft.is_initialized().await.map_err(|e| OpenError::Raft(e.to_string()))? {
            match raft.initialize(initial_members).await {
                Ok(()) => tracing::info!(node_id, "raft cluster initialized"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(OpenError::Raft(e.to_string())),
            }
        }
        Ok(Self { raft, shared, node_id, channels, batcher })
    }

    /// Waits until some node is leader (or the timeout passes).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut m = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = m.borrow().current_leader {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, m.changed()).await.is_err() {
                return None;
            }
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Proposes `cmd` to the cluster: locally on the leader, forwarded one hop from a follower;
    /// during an election it waits (bounded) for the new leader. Returns once the command is
    /// committed and applied on the leader. A follower's own applied state catches up shortly
    /// after; callers that read it back wait on its watch channels.
    pub async fn propose_anywhere(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.propose(cmd.clone()).await {
                Err(ProposeError::NotLeader { leader: Some((id, addr)) }) if id != self.node_id => {
                    match self.forward(&addr, &cmd).await {
                        Ok((r, index)) => {
                            self.wait_applied(index, LEADER_WAIT).await;
                            return Ok(r);
                        }
                        // The leader this node knows may just have died: until the election
                        // timeout names a new one, retry (commands are idempotent or refused
                        // harmlessly when applied twice).
                        Err(e) if tokio::time::Instant::now() < deadline => {
                            tracing::debug!(error = %e, "forwarding failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(ProposeError::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    let _ = self.wait_for_leader(Duration::from_millis(500)).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, addr: &str, cmd: &Command) -> Result<(CommandResult, u64), ProposeError> {
        let mut client = self.channels.client(addr).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(ProposeRequest { version: PEER_VERSION, command: crate::codec::encode(FORWARD_V1, cmd) });
        req.set_timeout(LEADER_WAIT);
        let resp = client.propose(req).await.map_err(|s| {
            let why = format!("forwarding to the leader at {addr}: {}", s.message());
            // A batch refused: by a leader whose members do not all read it, or by a leader of
            // the release before forwarded batches, which rejects them as invalid.
            if matches!(cmd, Command::Batch(_)) && matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument) {
                ProposeError::Refused(why)
            } else {
                ProposeError::Unavailable(why)
            }
        })?;
        let resp = resp.into_inner();
        Ok((decode_forwarded(&resp.result).map_err(ProposeError::Unavailable)?, resp.log_index))
    }

    /// Waits (bounded) until this node applied the log up to `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) {
        let _ = self.raft.wait(Some(timeout)).applied_index_at_least(Some(index), "catching up").await;
    }

    /// A read barrier for followers: waits until this node applied everything the leader had
    /// applied when asked. A no-op on the leader.
    pub async fn catch_up(&self, timeout: Duration) {
        let m = self.raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader.filter(|l| *l != self.node_id) else { return };
        let Some(addr) = m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone()) else { return };
        let Ok(mut client) = self.channels.client(&addr) else { return };
        let mut req = tonic::Request::new(kiln_proto::peer::StatusRequest { version: PEER_VERSION });
        req.set_timeout(timeout);
        if let Ok(s) = client.status(req).await {
            self.wait_applied(s.into_inner().last_applied_index, timeout).await;
        }
    }

    /// Proposes locally and returns the result with its log index (for forwarded proposals).
    /// While every member reads batches, concurrent proposals share entries: see [`run_batcher`].
    pub async fn propose_indexed(&self, cmd: Command) -> Result<(CommandResult, u64), ProposeError> {
        // A follower's proposal is refused at once with the leader's name: no batching.
        if !self.is_leader() {
            return write(&self.raft, cmd).await;
        }
        if !self.members_read_batches() {
            if matches!(cmd, Command::Batch(_)) {
                return Err(ProposeError::Refused("a member does not read batched entries yet".into()));
            }
            return write(&self.raft, cmd).await;
        }
        let kind = cmd.kind();
        let (reply, answer) = oneshot::channel();
        self.batcher.send((cmd, reply)).await.map_err(|_| ProposeError::Unavailable("the proposal batcher stopped".into()))?;
        // Bounded like a lone write: behind entries that wait for a lost quorum, a command
        // would otherwise wait for each of them in turn.
        match tokio::time::timeout(COMMIT_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Unavailable("the proposal batcher dropped a command".into())),
            Err(_) => Err(ProposeError::Unavailable(format!("no quorum committed the {kind} command within {} s", COMMIT_TIMEOUT.as_secs()))),
        }
    }

    /// Proposes `cmd` to this node's Raft and waits until it is applied here.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        self.propose_indexed(cmd).await.map(|(r, _)| r)
    }

    /// Proposes `cmds` to be applied one after the other, from any node (see
    /// [`Self::propose_anywhere`]): in one entry when the leader and every member read batches
    /// (one round trip to the leader and one commit instead of one each), else one by one.
    /// Returns their results in order.
    pub async fn propose_together_anywhere(&self, cmds: Vec<Command>) -> Result<Vec<CommandResult>, ProposeError> {
        let n = cmds.len();
        if n > 1 {
            match self.propose_anywhere(Command::Batch(cmds.clone())).await {
                Ok(CommandResult::Batch(results)) if results.len() == n => return Ok(results),
                Ok(other) => return Err(ProposeError::Unavailable(format!("{n} commands proposed together were answered with {other:?}"))),
                Err(ProposeError::Refused(why)) => tracing::debug!(why, "proposing the commands one by one"),
                Err(e) => return Err(e),
            }
        }
        let mut results = Vec::with_capacity(n);
        for cmd in cmds {
            results.push(self.propose_anywhere(cmd).await?);
        }
        Ok(results)
    }

    /// Whether every other member said it reads [`Command::Batch`] entries.
    fn members_read_batches(&self) -> bool {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let all = membership
            .membership()
            .nodes()
            .all(|(id, n)| *id == self.node_id || self.channels.command_version(&n.addr) >= BATCH_COMMAND_VERSION);
        all
    }
}

/// Writes one entry to this node's Raft and waits until it is applied here.
async fn write(raft: &Raft, cmd: Command) -> Result<(CommandResult, u64), ProposeError> {
    let kind = cmd.kind();
    // A leader cut off from its quorum would wait forever: answer UNAVAILABLE instead.
    let Ok(written) = tokio::time::timeout(COMMIT_TIMEOUT, raft.client_write(cmd)).await else {
        return Err(ProposeError::Unavailable(format!("no quorum committed the {kind} command within {} s", COMMIT_TIMEOUT.as_secs())));
    };
    match written {
        Ok(r) => Ok((r.data, r.log_id.index)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)) })
        }
        Err(e) => {
            tracing::warn!(command = kind, error = %e, "proposal failed");
            Err(ProposeError::Unavailable(e.to_string()))
        }
    }
}

/// Group commit of proposals. openraft 0.9 appends and flushes each client write on its own,
/// in its core task, one after the other: under load that serial flush, not the CPU or the
/// network, bounded how many commands a second the cluster took. The batcher keeps one entry
/// in flight; whatever arrives meanwhile goes into the next one, a [`Command::Batch`]. A lone
/// command is proposed as itself, so an idle node adds no latency and writes the format older
/// nodes read.
async fn run_batcher(raft: Raft, mut waiting: mpsc::Receiver<(Command, Reply)>) {
    let mut batch = Vec::new();
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        metrics::histogram!(BATCH_COMMANDS).record(batch.len() as f64);
        if batch.len() == 1 {
            let (cmd, reply) = batch.pop().expect("one command");
            let _ = reply.send(write(&raft, cmd).await);
            continue;
        }
        // Commands proposed together (a forwarded batch) join the entry flat, never nested,
        // and get their results back together.
        let mut cmds = Vec::with_capacity(batch.len());
        let mut groups = Vec::with_capacity(batch.len());
        for (cmd, reply) in batch.drain(..) {
            match cmd {
                Command::Batch(together) => {
                    groups.push((reply, Some(together.len())));
                    cmds.extend(together);
                }
                cmd => {
                    groups.push((reply, None));
                    cmds.push(cmd);
                }
            }
        }
        let n = cmds.len();
        match write(&raft, Command::Batch(cmds)).await {
            Ok((CommandResult::Batch(results), index)) if results.len() == n => {
                let mut results = results.into_iter();
                for (reply, together) in groups {
                    let r = match together {
                        Some(k) => CommandResult::Batch(results.by_ref().take(k).collect()),
                        None => results.next().expect("one result per command"),
                    };
                    let _ = reply.send(Ok((r, index)));
                }
            }
            other => {
                let e = match other {
                    Err(e) => e,
                    Ok((r, _)) => ProposeError::Unavailable(format!("a batch of {n} commands was answered with {r:?}")),
                };
                for (reply, _) in groups {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Encodes a forwarded command's result.
pub fn encode_forwarded(r: &CommandResult) -> Vec<u8> {
    crate::codec::encode(FORWARD_V1, r)
}

/// Decodes a forwarded command.
pub fn decode_forwarded_command(bytes: &[u8]) -> Result<Command, String> {
    let (v, body) = crate::codec::split(bytes).map_err(|e| e.to_string())?;
    if v != FORWARD_V1 {
        return Err(format!("forwarded command has format version {v}"));
    }
    crate::codec::decode_body(body).map_err(|e| e.to_string())
}

fn decode_forwarded(bytes: &[u8]) -> Result<CommandResult, String> {
    let (v, body) = crate::codec::split(bytes).map_err(|e| e.to_string())?;
    if v != FORWARD_V1 {
        return Err(format!("forwarded result has format version {v}"));
    }
    crate::codec::decode_body(body).map_err(|e| e.to_string())
}
