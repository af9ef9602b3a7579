//! The Raft log in sled: entries keyed by big-endian index, plus vote, committed index and
//! last purged id. An append is acknowledged to openraft only after sled flushed it, so a
//! vote or entry this node promised is never forgotten in a crash.

use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader};

use crate::codec;
use crate::types::{read_err, write_err, Entry, LogId, StorageError, TypeConfig, Vote};

/// Format version of log entries and meta records.
const LOG_RECORD_V1: u8 = 1;

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DecodeError(String);

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, StorageError> {
    let (v, body) = codec::split(raw).map_err(|e| read_err(DecodeError(e.to_string())))?;
    if v != LOG_RECORD_V1 {
        return Err(read_err(DecodeError(format!("raft record has unknown format version {v}"))));
    }
    codec::decode_body(body).map_err(|e| read_err(DecodeError(e.to_string())))
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(Self { db: db.clone(), log: db.open_tree("raft_log")?, meta: db.open_tree("raft_meta")? })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            Some(raw) => decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    async fn put_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        self.meta.insert(key, codec::encode(LOG_RECORD_V1, v)).map_err(write_err)?;
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for item in self.log.range(start.to_be_bytes()..) {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| read_err(DecodeError("bad log key".into())))?);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta::<Option<LogId>>(KEY_LAST_PURGED)?.flatten();
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => Some(*decode::<Entry>(&v)?.get_log_id()),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: losing it only means re-applying a little more after a crash.
        self.meta.insert(KEY_COMMITTED, codec::encode(LOG_RECORD_V1, &committed)).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            batch.insert(&e.get_log_id().index.to_be_bytes(), codec::encode(LOG_RECORD_V1, &e));
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        // Durability before acknowledgement: one flush covers every entry of this append.
        // openraft 0.9 waits for it before taking the next client write, so concurrent
        // proposals share a flush by sharing an entry (`Consensus`'s batcher).
        let r = self.db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
        callback.log_io_completed(r);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let keys: Vec<sled::IVec> =
            self.log.range(log_id.index.to_be_bytes()..).keys().collect::<Result<_, _>>().map_err(write_err)?;
        for k in keys {
            self.log.remove(k).map_err(write_err)?;
        }
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.put_meta(KEY_LAST_PURGED, &Some(log_id)).await?;
        let keys: Vec<sled::IVec> =
            self.log.range(..=log_id.index.to_be_bytes()).keys().collect::<Result<_, _>>().map_err(write_err)?;
        for k in keys {
            self.log.remove(k).map_err(write_err)?;
        }
        Ok(())
    }
}
