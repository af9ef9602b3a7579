//! # The Action Cache's write-ahead log
//!
//! sled buffers writes in the process. Making an Action Cache update survive `kill -9` through
//! sled alone takes a `Db::flush`, which writes sled's log and fsyncs it: a blocking thread, a
//! device flush and a wake-up per group of updates, the largest cost of an update in profiles.
//! Under the `batch` and `never` fsync policies an update instead goes into sled's memory and,
//! as one `write`, into this log: once `write` returns the bytes belong to the kernel, which a
//! killed process cannot lose. Under `batch` the log is also fsynced within the batch window,
//! the same promise blob files get. Under `always` updates keep waiting for a shared sled flush.
//!
//! Checkpoints keep the log short: every few seconds a new log file starts, sled is flushed
//! (which covers every record of the older files: each record was inserted into sled before it
//! was logged), and the older files are deleted. At start, leftover files are replayed into
//! sled in order, flushed and deleted.
//!
//! Record: `len (u32 LE) | crc32 of the payload (u32 LE) | payload`, payload
//! `key length (u32 LE) | key | value`. Replay stops at the first record that is short or whose
//! checksum fails: only a crash in the middle of a write (or a power loss before the sync)
//! leaves one, at the end of the last file.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{KilnError, Result};

/// A checkpoint starts after this long, or once the current file holds [`CHECKPOINT_BYTES`].
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Largest record replay accepts (an `ActionResult` is bounded by gRPC's message limit).
const MAX_RECORD: u32 = 64 << 20;

pub struct AcLog(Arc<Inner>);

struct Inner {
    dir: PathBuf,
    tree: sled::Tree,
    db: sled::Db,
    current: Mutex<Current>,
    /// Serializes checkpoints (the background one and the one at close).
    checkpoint: Mutex<()>,
}

struct Current {
    seq: u64,
    file: Arc<File>,
    len: u64,
    /// Written since the last sync.
    dirty: bool,
}

fn path_of(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.log"))
}

/// The log files in `dir`, oldest first.
fn log_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| KilnError::io(format!("listing {}", dir.display()), e))? {
        let e = e.map_err(|e| KilnError::io(format!("listing {}", dir.display()), e))?;
        let name = e.file_name();
        if let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| u64::from_str_radix(n, 16).ok()) {
            v.push((seq, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

fn create(dir: &Path, seq: u64) -> Result<File> {
    let path = path_of(dir, seq);
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .map_err(|e| KilnError::io(format!("creating {}", path.display()), e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| KilnError::io(format!("fsync of {}", dir.display()), e))?;
    Ok(f)
}

impl AcLog {
    /// Replays what `dir` holds into `tree`, then starts a fresh log. With `sync_every`, a
    /// background thread fsyncs the log that often; checkpoints run in it too.
    pub fn open(dir: PathBuf, db: &sled::Db, tree: sled::Tree, sync_every: Option<Duration>) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| KilnError::io(format!("creating {}", dir.display()), e))?;
        let old = log_files(&dir)?;
        let mut replayed = 0usize;
        for (_, path) in &old {
            replayed += replay(path, &tree)?;
        }
        if !old.is_empty() {
            db.flush()?;
            for (_, path) in &old {
                std::fs::remove_file(path).map_err(|e| KilnError::io(format!("removing {}", path.display()), e))?;
            }
            tracing::info!(files = old.len(), records = replayed, "Action Cache log replayed");
        }
        let seq = old.last().map_or(1, |(s, _)| s + 1);
        let file = Arc::new(create(&dir, seq)?);
        let inner = Arc::new(Inner {
            dir,
            tree,
            db: db.clone(),
            current: Mutex::new(Current { seq, file, len: 0, dirty: false }),
            checkpoint: Mutex::new(()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("kiln-ac-log".into())
            .spawn(move || background(weak, sync_every))
            .map_err(|e| KilnError::io("spawning the Action Cache log thread", e))?;
        Ok(Self(inner))
    }

    /// Inserts `key → value` into the tree and logs it. On return the update survives the
    /// process being killed.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.0.tree.insert(key, value)?;
        let payload_len = 4 + key.len() + value.len();
        let mut rec = Vec::with_capacity(8 + payload_len);
        rec.extend_from_slice(&(payload_len as u32).to_le_bytes());
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
        rec.extend_from_slice(key);
        rec.extend_from_slice(value);
        let crc = crc32fast::hash(&rec[8..]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let mut c = self.0.current.lock();
        // One write of an O_APPEND file: the record is whole in the file or not there at all
        // (short of a full disk, which replay's checksum catches).
        (&*c.file).write_all(&rec).map_err(|e| KilnError::io(format!("writing the Action Cache log {}", path_of(&self.0.dir, c.seq).display()), e))?;
        c.len += rec.len() as u64;
        c.dirty = true;
        Ok(())
    }

    /// Flushes sled and drops the logs it covers (at clean shutdown; also run periodically).
    pub fn checkpoint(&self) -> Result<()> {
        checkpoint(&self.0)
    }
}

fn checkpoint(inner: &Inner) -> Result<()> {
    let _one = inner.checkpoint.lock();
    let old_seq = {
        let mut c = inner.current.lock();
        if c.len == 0 {
            return Ok(());
        }
        let seq = c.seq + 1;
        let file = Arc::new(create(&inner.dir, seq)?);
        let old = std::mem::replace(&mut *c, Current { seq, file, len: 0, dirty: false });
        old.seq
    };
    // Every record of the older files went into sled before it was logged: this covers them.
    inner.db.flush()?;
    for (seq, path) in log_files(&inner.dir)? {
        if seq <= old_seq {
            std::fs::remove_file(&path).map_err(|e| KilnError::io(format!("removing {}", path.display()), e))?;
        }
    }
    Ok(())
}

fn background(inner: Weak<Inner>, sync_every: Option<Duration>) {
    let tick = sync_every.unwrap_or(Duration::from_millis(100)).min(CHECKPOINT_EVERY);
    let mut last_checkpoint = Instant::now();
    loop {
        std::thread::sleep(tick);
        let Some(inner) = inner.upgrade() else { return };
        if sync_every.is_some() {
            let file = {
                let mut c = inner.current.lock();
                std::mem::take(&mut c.dirty).then(|| c.file.clone())
            };
            if let Some(f) = file {
                if let Err(e) = f.sync_data() {
                    tracing::error!(error = %e, "fsync of the Action Cache log failed");
                }
            }
        }
        let len = inner.current.lock().len;
        if len >= CHECKPOINT_BYTES || (len > 0 && last_checkpoint.elapsed() >= CHECKPOINT_EVERY) {
            if let Err(e) = checkpoint(&inner) {
                tracing::error!(error = %e, "Action Cache log checkpoint failed");
            }
            last_checkpoint = Instant::now();
        }
    }
}

/// Applies the records of one log file to `tree`, up to the first damaged one. Returns how many.
fn replay(path: &Path, tree: &sled::Tree) -> Result<usize> {
    let f = File::open(path).map_err(|e| KilnError::io(format!("opening {}", path.display()), e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut n = 0;
    let mut head = [0u8; 8];
    loop {
        if r.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if !(4..=MAX_RECORD).contains(&len) {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        if r.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
            break;
        }
        let klen = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
        if 4 + klen > payload.len() {
            break;
        }
        tree.insert(&payload[4..4 + klen], &payload[4 + klen..])?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replayed_up_to_a_torn_one_and_checkpoints_drop_covered_files() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("log");
        {
            let db = sled::Config::new().path(dir.path().join("db")).open().unwrap();
            let log = AcLog::open(logs.clone(), &db, db.open_tree("t").unwrap(), None).unwrap();
            log.insert(b"a", b"1").unwrap();
            log.insert(b"b", b"2").unwrap();
            log.insert(b"a", b"3").unwrap();
            log.insert(b"c", b"4").unwrap();
            // A crash: sled never flushed (its buffered writes are dropped with the process).
            std::mem::forget(db);
            std::mem::forget(log);
        }
        // Tear the last record.
        let (_, path) = log_files(&logs).unwrap().pop().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1).unwrap();
        // sled's directory lock stays with the forgotten handle: replay into a fresh database.
        let db = sled::Config::new().path(dir.path().join("db2")).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        let log = AcLog::open(logs.clone(), &db, tree.clone(), None).unwrap();
        assert_eq!(tree.get(b"a").unwrap().unwrap(), b"3"[..], "the later record wins");
        assert_eq!(tree.get(b"b").unwrap().unwrap(), b"2"[..]);
        assert!(tree.get(b"c").unwrap().is_none(), "the torn record is not applied");
        assert_eq!(log_files(&logs).unwrap().len(), 1, "replayed files are gone, a fresh one started");
        log.insert(b"d", b"5").unwrap();
        log.checkpoint().unwrap();
        let files = log_files(&logs).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(std::fs::metadata(&files[0].1).unwrap().len(), 0, "the checkpoint dropped the covered file");
    }
}
