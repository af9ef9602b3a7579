//! # The Action Cache entries this node holds
//!
//! Maps `(instance name, digest function, action hash)` to an `ActionResult`, in a sled tree.
//! An acknowledged update survives `kill -9`: it is written to the write-ahead log
//! ([`crate::ac_log`]) before the answer, or, under the `always` fsync policy, sled is flushed.
//! Instance names keep entries apart; the CAS is shared, since content addresses cannot collide.
//!
//! This is the local store only; which nodes hold an entry, and the rule that a result is only
//! handed out while every blob it references is still in the CAS, live in [`crate::storage`].

use kiln_proto::reapi::{self, ActionResult};
use prost::Message;

use crate::ac_log::AcLog;
use crate::config::{Config, FsyncPolicy};
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::flush::GroupFlush;

/// Format version of stored entries: the protobuf encoding of `ActionResult`.
const AC_ENTRY_V1: u8 = 1;

#[derive(Clone)]
pub struct ActionCacheStore {
    tree: sled::Tree,
    flush: GroupFlush,
    /// The write-ahead log; `None` under the `always` policy, where each update flushes sled.
    log: Option<std::sync::Arc<AcLog>>,
}

fn key(instance: &str, d: &BlobDigest) -> Vec<u8> {
    let mut k = Vec::with_capacity(instance.len() + 1 + 33);
    k.extend_from_slice(instance.as_bytes());
    k.push(0); // instance names contain no NUL: the separator keeps "a"+"bc" apart from "ab"+"c"
    k.extend_from_slice(&d.key());
    k
}

impl ActionCacheStore {
    pub fn open(db: &sled::Db, flush: GroupFlush, cfg: &Config) -> Result<Self> {
        let tree = db.open_tree("action_cache")?;
        let dir = cfg.node.data_dir.join("ac-log");
        let log = match cfg.storage.fsync {
            FsyncPolicy::Always => {
                // Replays what a log of an earlier run under another policy left.
                AcLog::open(dir, db, tree.clone(), None)?.checkpoint()?;
                None
            }
            FsyncPolicy::Batch => {
                let window = std::time::Duration::from_millis(cfg.storage.fsync_batch_window_ms);
                Some(std::sync::Arc::new(AcLog::open(dir, db, tree.clone(), Some(window))?))
            }
            FsyncPolicy::Never => Some(std::sync::Arc::new(AcLog::open(dir, db, tree.clone(), None)?)),
        };
        Ok(Self { tree, flush, log })
    }

    /// Makes sled hold everything logged and drops the log files (clean shutdown).
    pub fn close(&self) -> Result<()> {
        match &self.log {
            Some(l) => l.checkpoint(),
            None => Ok(()),
        }
    }

    /// The stored result's protobuf bytes, unchecked (a peer asking for its replica).
    pub fn load_raw(&self, instance: &str, action: &BlobDigest) -> Result<Option<Vec<u8>>> {
        Ok(self.load(instance, action)?.map(|r| r.encode_to_vec()))
    }

    /// Stores a replica a peer sent, after decoding it (garbage is refused, not stored), as
    /// [`Self::put_async`].
    pub async fn store_raw(&self, instance: &str, action: &BlobDigest, bytes: &[u8]) -> Result<()> {
        let r = ActionResult::decode(bytes).map_err(|e| KilnError::invalid(format!("action result replica of {action} does not decode: {e}")))?;
        self.put_async(instance, action, &r).await
    }

    pub fn put(&self, instance: &str, action: &BlobDigest, result: &ActionResult) -> Result<()> {
        if self.insert(instance, action, result)? {
            return Ok(());
        }
        // Durability before acknowledgement: sled buffers writes in-process, so without this
        // flush a kill -9 right after the answer could lose the entry. Concurrent updates
        // share one flush.
        self.flush.flush()
    }

    /// Inserts the entry; true if it is already durable (logged), false if sled must be flushed.
    fn insert(&self, instance: &str, action: &BlobDigest, result: &ActionResult) -> Result<bool> {
        let mut rec = vec![AC_ENTRY_V1];
        result.encode(&mut rec).map_err(|e| KilnError::Internal(e.to_string()))?;
        match &self.log {
            Some(log) => {
                log.insert(&key(instance, action), &rec)?;
                Ok(true)
            }
            None => {
                self.tree.insert(key(instance, action), rec)?;
                Ok(false)
            }
        }
    }

    /// [`Self::put`] for async callers: the insert and the log write run in place (one
    /// `write` call); under the `always` policy the flush is awaited, shared with concurrent
    /// updates.
    pub async fn put_async(&self, instance: &str, action: &BlobDigest, result: &ActionResult) -> Result<()> {
        if self.insert(instance, action, result)? {
            return Ok(());
        }
        self.flush.flush_async().await
    }

    pub fn load(&self, instance: &str, action: &BlobDigest) -> Result<Option<ActionResult>> {
        let Some(raw) = self.tree.get(key(instance, action))? else { return Ok(None) };
        let (version, body) = kiln_raft::codec::split(&raw).map_err(|e| KilnError::Internal(e.to_string()))?;
        if version != AC_ENTRY_V1 {
            return Err(KilnError::Internal(format!("action cache entry of {action} has unknown format version {version}")));
        }
        ActionResult::decode(body)
            .map(Some)
            .map_err(|e| KilnError::Internal(format!("action cache entry of {action} does not decode: {e}")))
    }
}

/// Refuses results whose digests are malformed, naming the field.
pub fn validate_result(f: DigestFunction, r: &ActionResult) -> Result<()> {
    let check = |what: String, d: Option<&reapi::Digest>, required: bool| -> Result<()> {
        match d {
            Some(d) => BlobDigest::from_proto(f, d).map(|_| ()).map_err(|e| KilnError::invalid(format!("{what}: {e}"))),
            None if required => Err(KilnError::invalid(format!("{what}: digest is missing"))),
            None => Ok(()),
        }
    };
    for o in &r.output_files {
        check(format!("output_files[{:?}].digest", o.path), o.digest.as_ref(), true)?;
    }
    for o in &r.output_directories {
        let required = o.root_directory_digest.is_none();
        check(format!("output_directories[{:?}].tree_digest", o.path), o.tree_digest.as_ref(), required)?;
        check(format!("output_directories[{:?}].root_directory_digest", o.path), o.root_directory_digest.as_ref(), false)?;
    }
    check("stdout_digest".into(), r.stdout_digest.as_ref(), false)?;
    check("stderr_digest".into(), r.stderr_digest.as_ref(), false)?;
    Ok(())
}
