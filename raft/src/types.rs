//! The openraft type configuration of Kiln.

use std::io::Cursor;

use crate::command::{Command, CommandResult};

openraft::declare_raft_types!(
    /// Kiln's Raft: commands are [`Command`]s, node ids are `u64`, snapshots are in-memory
    /// buffers (the scheduling state is small and bounded by pruning).
    pub TypeConfig:
        D = Command,
        R = CommandResult,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type SnapshotData = Cursor<Vec<u8>>;

pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::read(&e).into()
}

pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::write(&e).into()
}
