//! The Raft state machine: the [`SchedulerState`] in memory, snapshots in sled, and the
//! notifications readers subscribe to.
//!
//! Applying is the only writer. Readers (gRPC handlers on any node, the actors) read the shared
//! state under a read lock, and subscribe to an operation through a watch channel that apply
//! feeds, so a client watching an operation on a follower sees every stage as that follower
//! applies it.
//!
//! The state is kept in memory and not written per entry: after a restart the latest snapshot is
//! loaded and openraft re-applies the log after it. Snapshots are taken every
//! `snapshot_every_entries` and let the log be purged.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Notify};

use crate::codec;
use crate::command::{Command, CommandResult};
use crate::scheduler::{Operation, SchedulerState};
use crate::types::{
    read_err, write_err, Entry, LogId, Snapshot, SnapshotData, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Format versions of snapshots: 1 had no stream index; 2 appends it.
const SNAPSHOT_V1: u8 = 1;
const SNAPSHOT_V2: u8 = 2;
/// Changed-operation events buffered for slow subscribers; a subscriber that lags rescans.
const EVENT_BUFFER: usize = 4096;

/// What the state machine persists in a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub sched: SchedulerState,
    pub streams: crate::streams::StreamIndex,
}

/// A version-1 snapshot, read by this version after an upgrade.
#[derive(Deserialize)]
struct SmDataV1 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    sched: SchedulerState,
}

/// Everything readers share with the state machine.
pub struct SmShared {
    state: RwLock<SmData>,
    watchers: Mutex<HashMap<String, watch::Sender<Option<Arc<Operation>>>>>,
    /// Signalled whenever work may have become available to bots.
    pub work_available: Notify,
    events: broadcast::Sender<Arc<Vec<String>>>,
}

impl SmShared {
    /// Runs `f` on the current state under the read lock. Keep `f` short.
    pub fn read<R>(&self, f: impl FnOnce(&SmData) -> R) -> R {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The current value of an operation.
    pub fn operation(&self, name: &str) -> Option<Operation> {
        self.read(|s| s.sched.ops.get(name).cloned())
    }

    /// Subscribes to an operation: the receiver holds its current value and sees every change
    /// (None once deleted). None if the operation is unknown.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<Option<Arc<Operation>>>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let op = state.sched.ops.get(name)?;
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = w.entry(name.to_string()).or_insert_with(|| watch::channel(Some(Arc::new(op.clone()))).0);
        Some(tx.subscribe())
    }

    /// Names of changed operations, in apply order, for the actors that follow them.
    pub fn subscribe_events(&self) -> broadcast::Receiver<Arc<Vec<String>>> {
        self.events.subscribe()
    }

    fn notify(&self, changed: Vec<(String, Option<Arc<Operation>>)>, work: bool) {
        if changed.is_empty() && !work {
            return;
        }
        {
            let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            for (name, value) in &changed {
                if let Some(tx) = w.get(name) {
                    if tx.receiver_count() == 0 || value.is_none() {
                        tx.send_replace(value.clone());
                        w.remove(name);
                    } else {
                        tx.send_replace(value.clone());
                    }
                }
            }
        }
        if !changed.is_empty() {
            let _ = self.events.send(Arc::new(changed.into_iter().map(|(n, _)| n).collect()));
        }
        if work {
            self.work_available.notify_waiters();
        }
    }
}

#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<SmShared>,
    snapshots: sled::Tree,
}

impl StateMachine {
    /// Opens the state machine, loading the latest snapshot.
    pub fn open(db: &sled::Db) -> Result<Self, StorageError> {
        let snapshots = db.open_tree("raft_snapshot").map_err(read_err)?;
        let mut data = SmData::default();
        if let Some(raw) = snapshots.get(b"data").map_err(read_err)? {
            data = decode_snapshot(&raw)?;
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(SmShared {
            state: RwLock::new(data),
            watchers: Mutex::new(HashMap::new()),
            work_available: Notify::new(),
            events,
        });
        Ok(Self { shared, snapshots })
    }

    pub fn shared(&self) -> Arc<SmShared> {
        self.shared.clone()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SnapshotError(String);

fn decode_snapshot(raw: &[u8]) -> Result<SmData, StorageError> {
    let (v, body) = codec::split(raw).map_err(|e| read_err(SnapshotError(e.to_string())))?;
    let bad = |e: codec::CodecError| read_err(SnapshotError(e.to_string()));
    match v {
        SNAPSHOT_V1 => {
            let old: SmDataV1 = codec::decode_body(body).map_err(bad)?;
            Ok(SmData { last_applied: old.last_applied, membership: old.membership, sched: old.sched, streams: Default::default() })
        }
        SNAPSHOT_V2 => codec::decode_body(body).map_err(bad),
        v => Err(read_err(SnapshotError(format!("snapshot has unknown format version {v}")))),
    }
}

fn snapshot_id(last: &Option<LogId>) -> String {
    match last {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
        None => "empty".into(),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (bytes, meta) = self.shared.read(|s| {
            let meta = SnapshotMeta {
                last_log_id: s.last_applied,
                last_membership: s.membership.clone(),
                snapshot_id: snapshot_id(&s.last_applied),
            };
            (codec::encode(SNAPSHOT_V2, s), meta)
        });
        self.snapshots.insert(b"data", bytes.clone()).map_err(write_err)?;
        self.snapshots.insert(b"meta", codec::encode(SNAPSHOT_V1, &meta)).map_err(write_err)?;
        self.snapshots.flush_async().await.map_err(write_err)?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = bytes.len(), "raft snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

/// Applies one command (each command of a batch in order); notes the operations it changed and
/// whether it may have made work for the actors.
fn apply_command(s: &mut SmData, cmd: &Command, changed: &mut Vec<String>, work: &mut bool) -> CommandResult {
    *work |= matches!(
        cmd,
        Command::Enqueue(_)
            | Command::Requeue { .. }
            | Command::BotGone { .. }
            | Command::CreateBotSession { .. }
            | Command::Complete { .. }
            | Command::Cancel { .. }
    );
    match cmd {
        Command::UpdateStream(u) => CommandResult::Applied(s.streams.apply(u)),
        Command::Batch(cmds) => CommandResult::Batch(cmds.iter().map(|c| apply_command(s, c, changed, work)).collect()),
        _ => {
            let (r, ch) = s.sched.apply(cmd);
            changed.extend(ch);
            r
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.shared.read(|s| (s.last_applied, s.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        let mut changed: Vec<(String, Option<Arc<Operation>>)> = Vec::new();
        let mut work = false;
        {
            let mut s = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            let mut names = Vec::new();
            for entry in entries {
                s.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(CommandResult::None),
                    EntryPayload::Normal(cmd) => results.push(apply_command(&mut s, &cmd, &mut names, &mut work)),
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(CommandResult::None);
                    }
                }
            }
            names.sort();
            names.dedup();
            for n in names {
                let v = s.sched.ops.get(&n).map(|o| Arc::new(o.clone()));
                changed.push((n, v));
            }
        }
        self.shared.notify(changed, work);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotData>) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let data = decode_snapshot(&bytes)?;
        self.snapshots.insert(b"data", bytes).map_err(write_err)?;
        self.snapshots.insert(b"meta", codec::encode(SNAPSHOT_V1, meta)).map_err(write_err)?;
        self.snapshots.flush_async().await.map_err(write_err)?;
        let changed = {
            let mut s = self.shared.state.write().unwrap_or_else(|p| p.into_inner());
            let mut names: Vec<String> = s.sched.ops.keys().cloned().collect();
            *s = data;
            names.extend(s.sched.ops.keys().cloned());
            names.sort();
            names.dedup();
            names.into_iter().map(|n| {
                let v = s.sched.ops.get(&n).map(|o| Arc::new(o.clone()));
                (n, v)
            }).collect()
        };
        tracing::info!(snapshot = %meta.snapshot_id, "raft snapshot installed");
        self.shared.notify(changed, true);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let (Some(data), Some(meta)) =
            (self.snapshots.get(b"data").map_err(read_err)?, self.snapshots.get(b"meta").map_err(read_err)?)
        else {
            return Ok(None);
        };
        let (v, body) = codec::split(&meta).map_err(|e| read_err(SnapshotError(e.to_string())))?;
        if v != SNAPSHOT_V1 {
            return Err(read_err(SnapshotError(format!("snapshot meta has unknown format version {v}"))));
        }
        let meta: SnapshotMeta = codec::decode_body(body).map_err(|e| read_err(SnapshotError(e.to_string())))?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data.to_vec())) }))
    }
}

#[cfg(test)]
mod snapshot_format_tests {
    use super::*;

    #[test]
    fn a_version_1_snapshot_still_loads_with_an_empty_stream_index() {
        let mut sched = SchedulerState::default();
        sched.apply(&Command::CreateBotSession { name: "s".into(), bot_id: "b".into(), platform: vec![], now_ms: 1 });
        // Version 1 wrote (last_applied, membership, sched); bincode encodes a struct as the tuple of its fields.
        let v1 = codec::encode(SNAPSHOT_V1, &(None::<LogId>, StoredMembership::default(), sched.clone()));
        let data = decode_snapshot(&v1).unwrap();
        assert_eq!(data.sched.bots.len(), 1);
        assert!(data.streams.is_empty());
        let v2 = codec::encode(SNAPSHOT_V2, &data);
        assert_eq!(decode_snapshot(&v2).unwrap().sched.bots.len(), 1);
        assert!(decode_snapshot(&codec::encode(9, &data)).is_err());
    }
}
