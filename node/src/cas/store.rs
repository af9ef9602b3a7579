//! The blob store of one node: files, sled index, LRU eviction, fsync policy.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::absent::AbsentFilter;
use super::memory::MemoryTier;
use super::presence::{PresenceCache, Seen};
use super::pack::{Loc, Packs, PACK_MAX_BLOB};
use super::upload::UploadState;
use crate::config::{Config, FsyncPolicy};
use crate::digest::{BlobDigest, DigestFunction, HASH_LEN};
use crate::error::{KilnError, Result};
use crate::flush::GroupFlush;
use crate::metrics as m;

type Key = [u8; 1 + HASH_LEN];

/// Format versions of [`IndexEntry`] records: a blob in a file of its own (V1), a packed blob (V2).
const INDEX_ENTRY_V1: u8 = 1;
const INDEX_ENTRY_V2: u8 = 2;
/// Lock stripes serializing commit, eviction and corruption handling of the same blob.
const STRIPES: usize = 64;
/// Eviction frees space down to this fraction of the limit, so it does not run on every write.
const EVICT_LOW_WATERMARK: f64 = 0.9;
/// Above this fraction of the limit a background pass evicts down to the low watermark, so a
/// write rarely waits for eviction.
const EVICT_HIGH_WATERMARK: f64 = 0.95;
/// Access times sampled per eviction round to find the cut-off (exact below this many blobs).
const EVICT_SAMPLE: usize = 1 << 16;
/// Eviction rounds per pass: a round frees nearly all it needs; more cover a poor sample and
/// blobs touched during the round.
const EVICT_ROUNDS: usize = 4;
/// Longest delay between a touch and its record in the index. Touches inside it are not
/// written again: FindMissingBlobs of 10,000 present blobs costs 10,000 index reads, not writes.
const MAX_TOUCH_GRANULARITY: Duration = Duration::from_secs(60);

/// What the index knows of a stored blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    /// Blob size in bytes.
    size: u64,
    /// Last access, milliseconds since the Unix epoch, recorded at most `touch_granularity` late.
    atime: u64,
    /// The boot counter of the last process that hashed the bytes and found them intact.
    verified_boot: u64,
    /// The record of a packed blob; `None` for a blob in a file of its own.
    loc: Option<Loc>,
}

/// [`IndexEntry`] as persisted behind [`INDEX_ENTRY_V1`]: a blob file.
#[derive(Serialize, Deserialize)]
struct EntryV1 {
    size: u64,
    atime: u64,
    verified_boot: u64,
}

/// [`IndexEntry`] as persisted behind [`INDEX_ENTRY_V2`]: a packed blob. Blob files keep V1, so
/// a node downgraded to a build without packs still reads every entry but the packed ones.
#[derive(Serialize, Deserialize)]
struct EntryV2 {
    size: u64,
    atime: u64,
    verified_boot: u64,
    loc: Loc,
}

impl IndexEntry {
    fn encode(&self) -> Vec<u8> {
        let Self { size, atime, verified_boot, loc } = *self;
        match loc {
            None => kiln_raft::codec::encode(INDEX_ENTRY_V1, &EntryV1 { size, atime, verified_boot }),
            Some(loc) => kiln_raft::codec::encode(INDEX_ENTRY_V2, &EntryV2 { size, atime, verified_boot, loc }),
        }
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let (version, body) = kiln_raft::codec::split(bytes).map_err(|e| KilnError::Internal(e.to_string()))?;
        let bad = |e: kiln_raft::codec::CodecError| KilnError::Internal(format!("blob index entry: {e}"));
        match version {
            INDEX_ENTRY_V1 => {
                let EntryV1 { size, atime, verified_boot } = kiln_raft::codec::decode_body(body).map_err(bad)?;
                Ok(Self { size, atime, verified_boot, loc: None })
            }
            INDEX_ENTRY_V2 => {
                let EntryV2 { size, atime, verified_boot, loc } = kiln_raft::codec::decode_body(body).map_err(bad)?;
                Ok(Self { size, atime, verified_boot, loc: Some(loc) })
            }
            v => Err(KilnError::Internal(format!("blob index entry has unknown format version {v}"))),
        }
    }
}

/// A readable blob: bytes already in memory, or an open, verified file.
pub enum OpenBlob {
    Memory(Bytes),
    File(File, u64),
}

/// A job for the group-commit thread of the `batch` fsync policy.
struct SyncJob {
    file: Arc<File>,
    dir: PathBuf,
}

/// An upload parked between two Write calls, waiting to be resumed.
struct ParkedUpload {
    state: UploadState,
    parked_at: Instant,
}

/// The blob store. Cheap to clone; every method that touches disk or index is blocking and must
/// run on a blocking thread (`tokio::task::spawn_blocking`).
#[derive(Clone)]
pub struct BlobStore(Arc<Inner>);

struct Inner {
    dir: PathBuf,
    tmp_dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    flush: GroupFlush,
    boot: u64,
    fsync: FsyncPolicy,
    /// `storage.direct_writes`: large uploads bypass the page cache (packs know it too).
    direct_writes: bool,
    syncer: Option<std::sync::mpsc::SyncSender<SyncJob>>,
    memory: Mutex<MemoryTier>,
    /// Small blobs, appended to shared files.
    packs: Packs,
    /// Blobs recently found or stored, with their size, recorded access time and (packed ones
    /// checked by this process) pack record: a presence check or a small read whose blob is
    /// here, touched within the touch granularity, needs no index read.
    /// Such a blob is inside its protect window, so eviction cannot take it meanwhile; the
    /// paths that drop a blob otherwise (corruption, a copy moved to its owners) remove it.
    presence: parking_lot::RwLock<PresenceCache>,
    /// Keys certainly not indexed (trusted only while the index is complete).
    absent: AbsentFilter,
    total_bytes: AtomicU64,
    max_size: u64,
    protect_ms: u64,
    touch_granularity_ms: u64,
    stripes: Vec<Mutex<()>>,
    partials: Mutex<HashMap<String, ParkedUpload>>,
    max_partials: usize,
    partial_ttl: Duration,
    meta: sled::Tree,
    /// True once the index is known to list every blob file: after a clean shutdown at once,
    /// after a crash once the start-up scan re-indexed what the lost index writes missed.
    /// Until then an index miss is double-checked on disk.
    index_complete: std::sync::atomic::AtomicBool,
    /// A pack compaction pass is running.
    compacting: std::sync::atomic::AtomicBool,
    /// A background eviction pass is running.
    evicting: std::sync::atomic::AtomicBool,
    /// Held by an eviction pass: one at a time.
    eviction: Mutex<()>,
    /// No blob can be evicted before this time (ms since the epoch): when a scan found every
    /// blob protected, the oldest access time plus the protect window. Touches only make
    /// blobs newer, so until then a scan would find nothing either.
    evictable_from: AtomicU64,
    /// When `evictable_from` was found: it is not trusted once the clock reads earlier.
    evictable_checked_at: AtomicU64,
    /// No background eviction pass starts before this time (ms since the epoch): set when one
    /// ended above the high watermark, so a store full of recently used blobs is not scanned
    /// back to back for the few that age out meanwhile.
    background_not_before: AtomicU64,
    /// Set by [`BlobStore::close`]: eviction stops, so nothing changes after the last flush.
    closed: std::sync::atomic::AtomicBool,
}

/// Meta key present while the index is known complete (set at clean shutdown).
const KEY_CLEAN: &[u8] = b"cas_index_clean";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A uniform sample (reservoir sampling) of the access times and sizes of blobs, with which an
/// eviction pass finds how far back it must go.
struct AtimeSample {
    cap: usize,
    seen: u64,
    items: Vec<(u64, u64)>,
    /// xorshift state: the sample need not be unpredictable, only uniform.
    rng: u64,
}

impl AtimeSample {
    fn new(cap: usize, seed: u64) -> Self {
        Self { cap: cap.max(1), seen: 0, items: Vec::new(), rng: seed | 1 }
    }

    fn offer(&mut self, atime: u64, size: u64) {
        self.seen += 1;
        if self.items.len() < self.cap {
            self.items.push((atime, size));
            return;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = (self.rng % self.seen) as usize;
        if j < self.cap {
            self.items[j] = (atime, size);
        }
    }

    /// The access time at or before which the offered blobs hold `need` bytes (estimated
    /// unless every blob offered is in the sample); the newest one if they hold less. `None`
    /// if nothing was offered.
    fn cutoff(mut self, need: u64) -> Option<u64> {
        self.items.sort_unstable();
        let scale = self.seen as f64 / self.items.len().max(1) as f64;
        let mut bytes = 0f64;
        for &(atime, size) in &self.items {
            bytes += size as f64 * scale;
            if bytes >= need as f64 {
                return Some(atime);
            }
        }
        self.items.last().map(|&(atime, _)| atime)
    }
}

impl BlobStore {
    /// Opens (or creates) the store under `<data_dir>/cas`, sharing `db` for its index.
    pub fn open(cfg: &Config, db: &sled::Db) -> Result<Self> {
        let dir = cfg.node.data_dir.join("cas");
        let tmp_dir = dir.join("tmp");
        // Unfinished uploads of an earlier process cannot be resumed (their hash state is
        // gone): clear them. Clients restart such uploads from QueryWriteStatus' size 0.
        let _ = std::fs::remove_dir_all(&tmp_dir);
        std::fs::create_dir_all(&tmp_dir).map_err(|e| KilnError::io(format!("creating {}", tmp_dir.display()), e))?;
        for f in DigestFunction::ALL {
            for shard in 0..=255u8 {
                let d = dir.join(f.name()).join(format!("{shard:02x}"));
                std::fs::create_dir_all(&d).map_err(|e| KilnError::io(format!("creating {}", d.display()), e))?;
            }
        }
        let meta = db.open_tree("meta")?;
        let boot = meta
            .update_and_fetch("boot", |old| {
                let n = old.and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes).unwrap_or(0);
                Some((n + 1).to_be_bytes().to_vec())
            })?
            .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1);
        db.flush()?;
        // A crash can lose the last index writes (sled flushes in the background) while their
        // blob files are in place: unless the last shutdown was clean, scan the files.
        let clean = meta.remove(KEY_CLEAN)?.is_some();
        db.flush()?;
        let index = db.open_tree("cas_index")?;
        // Earlier versions kept the eviction order in a tree of its own; the index's access
        // times are the order now. (A node downgraded to such a version afterwards finds that
        // tree empty and cannot evict the blobs stored meanwhile: upgrades only.)
        db.drop_tree("cas_lru")?;
        let packs = Packs::open(dir.join("packs"), cfg.storage.pack_file_bytes, cfg.storage.direct_writes)?;
        let mut total = 0u64;
        let absent = AbsentFilter::default();
        for item in index.iter() {
            let (k, v) = item?;
            if let Ok(key) = <&Key>::try_from(&k[..]) {
                absent.insert(key);
            }
            if let Ok(e) = IndexEntry::decode(&v) {
                total += e.size;
                if let Some(loc) = e.loc {
                    packs.count_live(loc, e.size);
                }
            }
        }
        if clean {
            let n = packs.delete_unused();
            if n > 0 {
                tracing::info!(packs = n, "deleted packs nothing indexed refers to");
            }
        }
        let syncer = (cfg.storage.fsync == FsyncPolicy::Batch)
            .then(|| spawn_syncer(Duration::from_millis(cfg.storage.fsync_batch_window_ms)));
        let protect_ms = cfg.storage.protect_window_secs * 1000;
        let store = Self(Arc::new(Inner {
            dir,
            tmp_dir,
            db: db.clone(),
            index,
            flush: GroupFlush::new(db.clone()),
            boot,
            fsync: cfg.storage.fsync,
            direct_writes: cfg.storage.direct_writes,
            syncer,
            absent,
            presence: parking_lot::RwLock::new(PresenceCache::new(cfg.storage.presence_cache_entries)),
            memory: Mutex::new(MemoryTier::new(cfg.storage.memory_tier_bytes, cfg.storage.memory_tier_max_blob_bytes)),
            packs,
            total_bytes: AtomicU64::new(total),
            max_size: cfg.storage.max_size_bytes,
            protect_ms,
            touch_granularity_ms: (protect_ms / 16).min(MAX_TOUCH_GRANULARITY.as_millis() as u64),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            partials: Mutex::new(HashMap::new()),
            max_partials: cfg.storage.max_partial_uploads,
            partial_ttl: Duration::from_secs(cfg.storage.partial_upload_ttl_secs),
            meta,
            index_complete: std::sync::atomic::AtomicBool::new(clean),
            compacting: std::sync::atomic::AtomicBool::new(false),
            evicting: std::sync::atomic::AtomicBool::new(false),
            eviction: Mutex::new(()),
            evictable_from: AtomicU64::new(0),
            evictable_checked_at: AtomicU64::new(0),
            background_not_before: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
        }));
        if !clean {
            let s = store.clone();
            std::thread::Builder::new()
                .name("kiln-cas-scan".into())
                .spawn(move || match s.reindex_files().and_then(|n| Ok(n + s.reindex_packs()?)) {
                    Ok(n) => {
                        s.0.index_complete.store(true, Ordering::Release);
                        let unused = s.0.packs.delete_unused();
                        tracing::info!(reindexed = n, unused_packs_deleted = unused, "blob files and packs scanned after an unclean shutdown");
                        s.request_compaction();
                    }
                    Err(e) => tracing::error!(error = %e, "scanning blob files failed; index misses stay double-checked"),
                })
                .map_err(|e| KilnError::io("spawning the blob scan", e))?;
        }
        metrics::gauge!(m::CAS_STORED_BYTES).set(total as f64);
        tracing::info!(boot, stored_bytes = total, "blob store open");
        if clean {
            store.request_compaction();
        }
        Ok(store)
    }

    /// Bytes of blobs currently indexed.
    pub fn stored_bytes(&self) -> u64 {
        self.0.total_bytes.load(Ordering::Relaxed)
    }

    /// This process' boot counter (increments on every start of the node).
    pub fn boot(&self) -> u64 {
        self.0.boot
    }

    /// The index database's group flush (the Action Cache shares the database and the flush).
    pub fn group_flush(&self) -> GroupFlush {
        self.0.flush.clone()
    }

    /// Whether large uploads are written past the page cache (`storage.direct_writes`).
    pub(super) fn direct_writes(&self) -> bool {
        self.0.direct_writes
    }

    pub(super) fn tmp_path(&self) -> PathBuf {
        self.0.tmp_dir.join(uuid::Uuid::new_v4().simple().to_string())
    }

    fn path_of(&self, d: &BlobDigest) -> PathBuf {
        let hex = d.hex();
        self.0.dir.join(d.function.name()).join(&hex[..2]).join(hex)
    }

    fn stripe(&self, key: &Key) -> parking_lot::MutexGuard<'_, ()> {
        self.0.stripes[key[1] as usize % STRIPES].lock()
    }

    /// The index entry of `d`, if the blob is stored with that size. An index miss falls back
    /// to the file system: the index is flushed lazily, so after a `kill -9` a blob can be in
    /// place (it was acknowledged) while its entry is not; such a blob is re-indexed as not yet
    /// verified.
    fn lookup(&self, d: &BlobDigest) -> Result<Option<(IndexEntry, sled::IVec)>> {
        let key = d.key();
        if let Some(raw) = self.0.index.get(key)? {
            let e = IndexEntry::decode(&raw)?;
            return Ok((e.size == d.size).then_some((e, raw)));
        }
        if self.0.index_complete.load(Ordering::Acquire) {
            return Ok(None);
        }
        self.reindex_if_on_disk(d)
    }

    /// Indexes `d` if its file is in place (found after a crash), as not yet verified.
    fn reindex_if_on_disk(&self, d: &BlobDigest) -> Result<Option<(IndexEntry, sled::IVec)>> {
        let key = d.key();
        let path = self.path_of(d);
        match std::fs::metadata(&path) {
            Ok(md) if md.len() == d.size => {
                let _g = self.stripe(&key);
                if let Some(found) = self.index_unverified(&key, d.size, None)? {
                    tracing::info!(digest = %d, "re-indexed a blob found on disk");
                    Ok(Some(found))
                } else {
                    drop(_g);
                    match self.0.index.get(key)? {
                        Some(raw) => {
                            let e = IndexEntry::decode(&raw)?;
                            Ok((e.size == d.size).then_some((e, raw)))
                        }
                        None => Ok(None),
                    }
                }
            }
            _ => Ok(None),
        }
    }

    /// Indexes a blob found on disk (a file, or a pack record at `loc`) as not yet verified,
    /// unless the index has it already. Returns the new entry if it was added. The caller
    /// holds the blob's stripe.
    fn index_unverified(&self, key: &Key, size: u64, loc: Option<Loc>) -> Result<Option<(IndexEntry, sled::IVec)>> {
        let e = IndexEntry { size, atime: now_ms(), verified_boot: 0, loc };
        let raw: sled::IVec = e.encode().into();
        self.0.absent.insert(key);
        if self.0.index.compare_and_swap(key, None as Option<&[u8]>, Some(raw.clone()))?.is_err() {
            return Ok(None);
        }
        if let Some(loc) = loc {
            self.0.packs.count_live(loc, size);
        }
        self.add_total(size as i64);
        Ok(Some((e, raw)))
    }

    /// Frees the bytes of a blob whose index entry was just removed: its pack record, or its file.
    fn free(&self, d: &BlobDigest, e: &IndexEntry) {
        match e.loc {
            Some(loc) => self.0.packs.release(loc, e.size),
            None => {
                let _ = std::fs::remove_file(self.path_of(d));
            }
        }
    }

    /// Hands a written file to the group-commit thread (the `batch` policy); syncs it in place
    /// when the queue is full, i.e. the disk is behind, rather than queue without bound.
    fn queue_sync(&self, file: Arc<File>, dir: PathBuf) {
        if let Some(tx) = &self.0.syncer {
            if let Err(std::sync::mpsc::TrySendError::Full(job)) = tx.try_send(SyncJob { file, dir }) {
                let _ = job.file.sync_data();
                let _ = sync_dir(&job.dir);
            }
        }
    }

    fn add_total(&self, delta: i64) {
        let v = if delta >= 0 {
            self.0.total_bytes.fetch_add(delta as u64, Ordering::Relaxed) + delta as u64
        } else {
            self.0.total_bytes.fetch_sub((-delta) as u64, Ordering::Relaxed) - (-delta) as u64
        };
        metrics::gauge!(m::CAS_STORED_BYTES).set(v as f64);
        if delta > 0 && v as f64 > self.0.max_size as f64 * EVICT_HIGH_WATERMARK {
            self.request_eviction();
        }
    }

    /// Records an access if the recorded one is older than the touch granularity. Returns false
    /// if the entry disappeared meanwhile (evicted): the blob must then be reported missing.
    fn touch(&self, key: &Key, raw: &sled::IVec, e: &IndexEntry) -> Result<bool> {
        let now = now_ms();
        let fresh = |atime: u64| now.saturating_sub(atime) <= self.0.touch_granularity_ms && now >= atime;
        if fresh(e.atime) {
            return Ok(true);
        }
        let (mut expected, mut entry) = (raw.clone(), *e);
        // Compare-and-swap: an eviction that removed the entry between our read and this write
        // must win, or we would report present a blob whose file is being deleted. An entry
        // rewritten meanwhile (marked verified, moved by compaction) is touched as it is now:
        // a blob reported present must carry a recent access time, or eviction could take it
        // inside the protect window.
        for _ in 0..8 {
            let new = IndexEntry { atime: now, ..entry };
            match self.0.index.compare_and_swap(key, Some(&expected), Some(new.encode()))? {
                Ok(()) => return Ok(true),
                Err(cas) => {
                    let Some(current) = cas.current else { return Ok(false) };
                    let Ok(c) = IndexEntry::decode(&current) else { return Ok(false) };
                    if fresh(c.atime) {
                        return Ok(true);
                    }
                    (expected, entry) = (current, c);
                }
            }
        }
        // Lost every race: reported missing (a client uploads it again) rather than present
        // without a recent access time.
        Ok(false)
    }

    /// Whether `d` is stored; refreshes its access time so it stays for the protect window.
    pub fn contains(&self, d: &BlobDigest) -> Result<bool> {
        if d.is_empty_blob() {
            return Ok(true);
        }
        let now = now_ms();
        if self.0.presence.write().get(&d.key()).is_some_and(|c| self.cached_present(&c, d, now)) {
            return Ok(true);
        }
        self.contains_uncached(d, now)
    }

    /// Whether `d` is stored, from memory alone: true if the presence cache vouches for it
    /// (then it needs no touch either), false if that takes the index. Never blocks.
    fn contains_cached(&self, d: &BlobDigest) -> bool {
        d.is_empty_blob() || self.0.presence.read().peek(&d.key()).is_some_and(|c| self.cached_present(&c, d, now_ms()))
    }

    /// A small blob's bytes from memory alone: the memory tier's copy, if the presence cache
    /// vouches for the blob (as [`Self::open_blob`] takes it then, without the index).
    /// Never blocks.
    pub fn read_cached(&self, d: &BlobDigest) -> Option<Bytes> {
        if d.is_empty_blob() {
            return Some(Bytes::new());
        }
        if !self.contains_cached(d) {
            return None;
        }
        self.0.memory.lock().get(&d.key()).filter(|b| b.len() as u64 == d.size)
    }

    /// Whether a presence cache entry vouches for `d` at `now`: same
    /// size, touched within the touch granularity (so inside the protect window).
    fn cached_present(&self, seen: &Seen, d: &BlobDigest, now: u64) -> bool {
        seen.size == d.size && now >= seen.atime && now - seen.atime <= self.0.touch_granularity_ms
    }

    /// [`Self::contains`] past the presence cache: the absent filter, then the index.
    fn contains_uncached(&self, d: &BlobDigest, now: u64) -> Result<bool> {
        let key = d.key();
        if self.0.index_complete.load(Ordering::Acquire) && self.0.absent.certainly_absent(&key) {
            return Ok(false);
        }
        match self.lookup(d)? {
            Some((e, raw)) => {
                let present = self.touch(&key, &raw, &e)?;
                if present {
                    self.remember(d, &e, now);
                }
                Ok(present)
            }
            None => Ok(false),
        }
    }

    /// Puts `d`, just found in the index as `e` and touched at `now`, in the presence cache,
    /// with its pack record if this process has checked its bytes.
    fn remember(&self, d: &BlobDigest, e: &IndexEntry, now: u64) {
        let recorded = if self.cached_present(&Seen::new(e.size, e.atime), d, now) { e.atime } else { now };
        let loc = if e.verified_boot == self.0.boot { e.loc } else { None };
        self.0.presence.write().put(d.key(), Seen::new(e.size, recorded).at(loc));
    }

    /// The digests of `ds` that are not stored, in request order. Present ones are touched.
    /// Large requests are split over a few threads: index reads are independent.
    pub fn find_missing(&self, ds: &[BlobDigest]) -> Result<Vec<BlobDigest>> {
        const PARALLEL_ABOVE: usize = 2048;
        let check = |part: &[BlobDigest]| -> Result<Vec<BlobDigest>> {
            // First the presence cache, under one lock and without reordering it (a hit is
            // cheaper so); the rest through the index.
            let now = now_ms();
            let cached: Vec<bool> = {
                // Shared: the threads of one large request check their parts at once.
                let cache = self.0.presence.read();
                part.iter()
                    .map(|d| {
                        d.is_empty_blob() || cache.peek(&d.key()).is_some_and(|c| self.cached_present(&c, d, now))
                    })
                    .collect()
            };
            let mut missing = Vec::new();
            for (d, hit) in part.iter().zip(cached) {
                if !hit && !self.contains_uncached(d, now)? {
                    missing.push(*d);
                }
            }
            Ok(missing)
        };
        // Asked once: std reads cgroup files on every call, which cost more than a small check.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = (*CORES.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))).min(4);
        if ds.len() <= PARALLEL_ABOVE || threads < 2 {
            return check(ds);
        }
        let chunk = ds.len().div_ceil(threads);
        std::thread::scope(|scope| {
            // The first part on this thread, the others on threads of their own.
            let mut parts = ds.chunks(chunk);
            let first = parts.next().unwrap_or_default();
            let handles: Vec<_> = parts.map(|part| scope.spawn(move || check(part))).collect();
            let mut missing = check(first)?;
            for h in handles {
                missing.extend(h.join().map_err(|_| KilnError::Internal("presence check thread panicked".into()))??);
            }
            Ok(missing)
        })
    }

    /// Opens `d` for reading: from memory, or as a file verified since this boot. `None` if the
    /// blob is not stored (or was found corrupt and dropped).
    pub fn open_blob(&self, d: &BlobDigest) -> Result<Option<OpenBlob>> {
        if d.is_empty_blob() {
            return Ok(Some(OpenBlob::Memory(Bytes::new())));
        }
        let key = d.key();
        let now = now_ms();
        // A presence entry touched within the touch granularity stands for the index entry
        // (as in `contains`): the blob is there and needs no touch.
        let seen = self.0.presence.read().peek(&key).filter(|s| self.cached_present(s, d, now));
        // Bind the lookup first: a guard held across the body would deadlock the `remove`.
        let cached = self.0.memory.lock().get(&key);
        if let Some(b) = cached {
            if b.len() as u64 != d.size {
                // Same hash, other size: that digest does not exist.
                return Ok(None);
            }
            metrics::counter!(m::CAS_MEMORY_HITS).increment(1);
            if seen.is_some() {
                return Ok(Some(OpenBlob::Memory(b)));
            }
            if let Some((e, raw)) = self.lookup(d)? {
                if self.touch(&key, &raw, &e)? {
                    self.remember(d, &e, now);
                }
                return Ok(Some(OpenBlob::Memory(b)));
            }
            self.0.memory.lock().remove(&key);
            return Ok(None);
        }
        // A packed blob this process has checked: its record, whose header names the blob, is
        // read without the index. A record moved by compaction or gone with its pack reads as
        // `None`, and the index says where it is now.
        if let Some(loc) = seen.and_then(|s| s.loc()) {
            if let Some(bytes) = self.0.packs.read(loc, &key, d.size)? {
                self.0.memory.lock().insert(key, bytes.clone());
                return Ok(Some(OpenBlob::Memory(bytes)));
            }
        }
        let Some((e, raw)) = self.lookup(d)? else { return Ok(None) };
        if let Some(loc) = e.loc {
            return self.open_packed(d, e, raw, loc);
        }
        let path = self.path_of(d);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // The index outlived the file (deleted by hand, lost to a crash before fsync).
                self.forget(d, "file missing")?;
                return Ok(None);
            }
            Err(err) => return Err(KilnError::io(format!("opening blob {d}"), err)),
        };
        if e.verified_boot != self.0.boot {
            let ok = verify_file(&mut file, d).map_err(|err| KilnError::io(format!("verifying blob {d}"), err))?;
            if !ok {
                metrics::counter!(m::CAS_CORRUPT_BLOBS).increment(1);
                tracing::error!(digest = %d, path = %path.display(), "blob bytes do not match the digest: dropped");
                self.forget(d, "corrupt")?;
                return Ok(None);
            }
            let verified = IndexEntry { verified_boot: self.0.boot, ..e };
            let _ = self.0.index.compare_and_swap(key, Some(&raw), Some(verified.encode()))?;
            file = File::open(&path).map_err(|err| KilnError::io(format!("opening blob {d}"), err))?;
        }
        if self.touch(&key, &raw, &e)? {
            self.remember(d, &IndexEntry { verified_boot: self.0.boot, ..e }, now);
        }
        Ok(Some(OpenBlob::File(file, d.size)))
    }

    /// Reads a packed blob (hashing it first if this process has not yet) into the memory tier.
    fn open_packed(&self, d: &BlobDigest, e: IndexEntry, raw: sled::IVec, loc: Loc) -> Result<Option<OpenBlob>> {
        let key = d.key();
        let (e, raw, bytes) = match self.0.packs.read(loc, &key, d.size)? {
            Some(b) => (e, raw, b),
            // Compaction may have moved the record since the index read: look once more.
            None => match self.lookup(d)? {
                Some((e2, raw2)) if e2.loc.is_some_and(|l| l != loc) => {
                    match self.0.packs.read(e2.loc.expect("checked"), &key, d.size)? {
                        Some(b) => (e2, raw2, b),
                        None => {
                            self.forget(d, "pack record missing")?;
                            return Ok(None);
                        }
                    }
                }
                Some(_) => {
                    self.forget(d, "pack record missing")?;
                    return Ok(None);
                }
                None => return Ok(None),
            },
        };
        if e.verified_boot != self.0.boot {
            if d.function.digest_of(&bytes).hash != d.hash {
                metrics::counter!(m::CAS_CORRUPT_BLOBS).increment(1);
                tracing::error!(digest = %d, pack = e.loc.map(|l| l.pack), "packed blob bytes do not match the digest: dropped");
                self.forget(d, "corrupt")?;
                return Ok(None);
            }
            let verified = IndexEntry { verified_boot: self.0.boot, ..e };
            let _ = self.0.index.compare_and_swap(key, Some(&raw), Some(verified.encode()))?;
        }
        if self.touch(&key, &raw, &e)? {
            // Checked above if this process had not yet: the next read goes straight to it.
            self.remember(d, &IndexEntry { verified_boot: self.0.boot, ..e }, now_ms());
        }
        self.0.memory.lock().insert(key, bytes.clone());
        Ok(Some(OpenBlob::Memory(bytes)))
    }

    /// Reads a whole blob into memory; for small blobs only (batch reads, inlining).
    pub fn read_all(&self, d: &BlobDigest) -> Result<Option<Bytes>> {
        match self.open_blob(d)? {
            None => Ok(None),
            Some(OpenBlob::Memory(b)) => Ok(Some(b)),
            Some(OpenBlob::File(mut f, size)) => {
                let mut buf = Vec::with_capacity(size as usize);
                f.read_to_end(&mut buf).map_err(|e| KilnError::io(format!("reading blob {d}"), e))?;
                if buf.len() as u64 != size {
                    self.forget(d, "truncated")?;
                    return Ok(None);
                }
                let b = Bytes::from(buf);
                self.0.memory.lock().insert(d.key(), b.clone());
                Ok(Some(b))
            }
        }
    }

    /// Drops a blob whose file is gone or corrupt from index, memory and disk.
    fn forget(&self, d: &BlobDigest, why: &str) -> Result<()> {
        self.drop_blob(d)?;
        tracing::warn!(digest = %d, why, "blob dropped");
        Ok(())
    }

    /// Removes a blob from index, memory and disk.
    fn drop_blob(&self, d: &BlobDigest) -> Result<()> {
        let key = d.key();
        let _g = self.stripe(&key);
        self.0.memory.lock().remove(&key);
        self.0.presence.write().pop(&key);
        match self.0.index.remove(key)?.map(|raw| IndexEntry::decode(&raw)) {
            Some(Ok(e)) => {
                self.add_total(-(e.size as i64));
                self.free(d, &e);
            }
            // No (readable) entry: a file may still be there.
            _ => {
                let _ = std::fs::remove_file(self.path_of(d));
            }
        }
        Ok(())
    }

    /// Stores an in-memory blob after checking its size and hash.
    pub fn put(&self, d: &BlobDigest, data: Bytes) -> Result<()> {
        check_content(d, &data)?;
        self.put_checked(d, data)
    }

    /// Stores in-memory blobs whose sizes and hashes the caller has just checked. One result
    /// per blob, in order.
    pub fn put_checked_many(&self, blobs: Vec<(BlobDigest, Bytes)>) -> Vec<Result<()>> {
        if blobs.iter().all(|(d, _)| d.size <= PACK_MAX_BLOB) {
            return self.put_packed(&blobs);
        }
        let (small, large): (Vec<_>, Vec<_>) = blobs.into_iter().enumerate().partition(|(_, (d, _))| d.size <= PACK_MAX_BLOB);
        let mut out: Vec<Option<Result<()>>> = (0..small.len() + large.len()).map(|_| None).collect();
        let (idx, small): (Vec<usize>, Vec<(BlobDigest, Bytes)>) = small.into_iter().unzip();
        for (i, r) in idx.into_iter().zip(self.put_packed(&small)) {
            out[i] = Some(r);
        }
        for (i, (d, data)) in large {
            out[i] = Some(self.put_file(&d, data));
        }
        out.into_iter().map(|r| r.unwrap_or_else(|| Err(KilnError::Internal("blob result missing".into())))).collect()
    }

    /// Appends small blobs whose sizes and hashes the caller has checked to the active pack,
    /// with one write and at most one sync, then indexes them. One result per blob, in order.
    fn put_packed(&self, blobs: &[(BlobDigest, Bytes)]) -> Vec<Result<()>> {
        let mut out: Vec<Result<()>> = (0..blobs.len()).map(|_| Ok(())).collect();
        let mut todo = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, (d, _)) in blobs.iter().enumerate() {
            if d.is_empty_blob() {
                continue;
            }
            match self.contains(d) {
                Ok(true) => {}
                Ok(false) => {
                    if seen.insert(d.key()) {
                        todo.push(i);
                    }
                }
                Err(e) => out[i] = Err(e),
            }
        }
        if todo.is_empty() {
            return out;
        }
        let fail_all = |out: &mut Vec<Result<()>>, todo: &[usize], e: KilnError| {
            for &i in todo {
                out[i] = Err(match &e {
                    KilnError::ResourceExhausted(m) => KilnError::ResourceExhausted(m.clone()),
                    other => KilnError::Internal(other.to_string()),
                });
            }
        };
        let incoming: u64 = todo.iter().map(|&i| blobs[i].0.size).sum();
        if let Err(e) = self.make_room(incoming) {
            fail_all(&mut out, &todo, e);
            return out;
        }
        let records: Vec<(Key, &[u8])> = todo.iter().map(|&i| (blobs[i].0.key(), &blobs[i].1[..])).collect();
        let app = match self.0.packs.append(&records) {
            Ok(a) => a,
            Err(e) => {
                fail_all(&mut out, &todo, e);
                return out;
            }
        };
        if self.0.fsync == FsyncPolicy::Always {
            let synced = app.file.sync_data().and_then(|()| if app.new_pack { sync_dir(self.0.packs.dir()) } else { Ok(()) });
            if let Err(e) = synced {
                for (&i, loc) in todo.iter().zip(&app.locs) {
                    self.0.packs.release(*loc, blobs[i].0.size);
                }
                fail_all(&mut out, &todo, KilnError::io("fsync of a pack", e));
                return out;
            }
        }
        let now = now_ms();
        for (&i, loc) in todo.iter().zip(&app.locs) {
            let (d, data) = &blobs[i];
            match self.index_packed(d, *loc, now) {
                Ok(()) => self.0.memory.lock().insert(d.key(), data.clone()),
                Err(e) => {
                    self.0.packs.release(*loc, d.size);
                    out[i] = Err(e);
                }
            }
        }
        match self.0.fsync {
            FsyncPolicy::Always => {
                if let Err(e) = self.0.flush.flush() {
                    fail_all(&mut out, &todo, e);
                }
            }
            FsyncPolicy::Batch => self.queue_sync(app.file, self.0.packs.dir().to_path_buf()),
            FsyncPolicy::Never => {}
        }
        metrics::counter!(m::CAS_BLOBS_WRITTEN).increment(todo.len() as u64);
        metrics::counter!(m::CAS_BYTES_WRITTEN).increment(incoming);
        out
    }

    /// Indexes a packed blob at `loc`; a copy it replaces (a racing writer's) is released.
    fn index_packed(&self, d: &BlobDigest, loc: Loc, now: u64) -> Result<()> {
        let _g = self.stripe(&d.key());
        if let Some(old) = self.index_new(d, Some(loc), now)? {
            if old.loc.is_none() {
                let _ = std::fs::remove_file(self.path_of(d));
            }
        }
        Ok(())
    }

    /// Writes the index entry of a blob just stored (at `loc`, or in its file) and its
    /// totals; a packed record the entry replaces is released. Returns the replaced
    /// entry. The caller holds the blob's stripe.
    fn index_new(&self, d: &BlobDigest, loc: Option<Loc>, now: u64) -> Result<Option<IndexEntry>> {
        let key = d.key();
        let e = IndexEntry { size: d.size, atime: now, verified_boot: self.0.boot, loc };
        self.0.absent.insert(&key);
        let mut old = None;
        match self.0.index.insert(key, e.encode())? {
            Some(raw) => {
                if let Ok(o) = IndexEntry::decode(&raw) {
                    self.add_total(d.size as i64 - o.size as i64);
                    if let Some(l) = o.loc {
                        self.0.packs.release(l, o.size);
                    }
                    old = Some(o);
                }
            }
            None => self.add_total(d.size as i64),
        }
        self.0.presence.write().put(key, Seen::new(d.size, now).at(loc));
        Ok(old)
    }

    /// Stores an in-memory blob whose size and hash the caller has just checked: appended to a
    /// pack if small ([`super::pack`]), else in a file of its own.
    ///
    /// The file is created at its final path, not written aside and renamed: a rename costs
    /// as much as the rest of a small blob's write, and the temp directory's lock, shared by
    /// every writer, serialises them. This is safe because the index entry, added once the
    /// bytes are written, is what makes a blob exist; a file a crash left half-written has
    /// none, and the start-up scan indexes it as unverified, so its first read hashes it and
    /// drops it.
    pub fn put_checked(&self, d: &BlobDigest, data: Bytes) -> Result<()> {
        if d.size <= PACK_MAX_BLOB {
            return self.put_packed(&[(*d, data)]).pop().unwrap_or(Ok(()));
        }
        self.put_file(d, data)
    }

    /// Stores a checked in-memory blob in a file of its own.
    fn put_file(&self, d: &BlobDigest, data: Bytes) -> Result<()> {
        if d.is_empty_blob() || self.contains(d)? {
            return Ok(());
        }
        self.make_room(d.size)?;
        let path = self.path_of(d);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                if let Err(e) = f.write_all(&data) {
                    let _ = std::fs::remove_file(&path);
                    return Err(KilnError::io(format!("writing blob {d}"), e));
                }
                self.place_and_index(d, None, f)?;
            }
            // A file is there: another writer of the same blob, or one a crash left. Write
            // aside and rename over it, which is atomic for readers.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let tmp = self.tmp_path();
                let mut f = File::create(&tmp).map_err(|e| KilnError::io(format!("creating {}", tmp.display()), e))?;
                if let Err(e) = f.write_all(&data) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(KilnError::io(format!("writing blob {d}"), e));
                }
                self.place_and_index(d, Some(&tmp), f)?;
            }
            Err(e) => return Err(KilnError::io(format!("creating blob file of {d}"), e)),
        }
        self.0.memory.lock().insert(d.key(), data);
        Ok(())
    }

    /// Moves a fully written, verified temp file into place and indexes it.
    pub(super) fn commit(&self, d: &BlobDigest, tmp: &Path, file: File) -> Result<()> {
        self.make_room(d.size)?;
        self.place_and_index(d, Some(tmp), file)
    }

    /// Renames `tmp` (if any) to the blob's path and indexes it, syncing as the policy says.
    /// The caller has made room.
    fn place_and_index(&self, d: &BlobDigest, tmp: Option<&Path>, file: File) -> Result<()> {
        let path = self.path_of(d);
        if self.0.fsync == FsyncPolicy::Always {
            file.sync_data().map_err(|e| KilnError::io(format!("fsync of blob {d}"), e))?;
        }
        let key = d.key();
        let now = now_ms();
        {
            let _g = self.stripe(&key);
            if let Some(tmp) = tmp {
                std::fs::rename(tmp, &path).map_err(|e| KilnError::io(format!("renaming blob {d} into place"), e))?;
            }
            self.index_new(d, None, now)?;
        }
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        match self.0.fsync {
            FsyncPolicy::Always => {
                sync_dir(&dir).map_err(|e| KilnError::io(format!("fsync of {}", dir.display()), e))?;
                self.0.flush.flush()?;
            }
            FsyncPolicy::Batch => self.queue_sync(Arc::new(file), dir),
            FsyncPolicy::Never => {}
        }
        metrics::counter!(m::CAS_BLOBS_WRITTEN).increment(1);
        metrics::counter!(m::CAS_BYTES_WRITTEN).increment(d.size);
        Ok(())
    }

    /// Makes room for `incoming` bytes, evicting least recently used blobs outside the protect
    /// window. Fails with RESOURCE_EXHAUSTED when the blobs that could go are not enough.
    fn make_room(&self, incoming: u64) -> Result<()> {
        let max = self.0.max_size;
        if self.stored_bytes() + incoming <= max {
            return Ok(());
        }
        // A background pass may be making the room already: wait for it in short steps, and
        // evict here only if it is done and the room is still missing.
        let one = loop {
            if let Some(g) = self.0.eviction.try_lock_for(Duration::from_millis(5)) {
                break g;
            }
            if self.stored_bytes() + incoming <= max {
                return Ok(());
            }
        };
        if self.stored_bytes() + incoming > max {
            let target = ((max as f64 * EVICT_LOW_WATERMARK) as u64).saturating_sub(incoming);
            self.evict_rounds(&one, target)?;
        }
        drop(one);
        if self.stored_bytes() + incoming > max {
            return Err(KilnError::ResourceExhausted(format!(
                "CAS is full: {} of {} bytes stored and every remaining blob was used within the last {} s; \
                 a blob of {} bytes does not fit",
                self.stored_bytes(),
                max,
                self.0.protect_ms / 1000,
                incoming
            )));
        }
        Ok(())
    }

    /// Starts a background eviction pass down to the low watermark unless one is running.
    fn request_eviction(&self) {
        let now = now_ms();
        if self.0.closed.load(Ordering::Acquire)
            || self.nothing_evictable(now)
            || now < self.0.background_not_before.load(Ordering::Relaxed)
            || self.0.evicting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.in_background("kiln-cas-evict", |i| &i.evicting, |s| {
            let target = (s.0.max_size as f64 * EVICT_LOW_WATERMARK) as u64;
            if let Err(e) = s.evict_down_to(target) {
                tracing::warn!(error = %e, "background eviction failed");
            }
            if s.stored_bytes() as f64 > s.0.max_size as f64 * EVICT_HIGH_WATERMARK {
                // What could go went; the next pass waits for more to age out.
                let gap = s.0.touch_granularity_ms.max(1000);
                s.0.background_not_before.store(now_ms() + gap, Ordering::Relaxed);
            }
        });
    }

    /// Runs `job` on a thread of its own; `running` (already set by the caller) is cleared
    /// when it ends, or at once if no thread can be started.
    fn in_background(&self, name: &str, running: fn(&Inner) -> &std::sync::atomic::AtomicBool, job: impl FnOnce(&Self) + Send + 'static) {
        let s = self.clone();
        let spawned = std::thread::Builder::new().name(name.into()).spawn(move || {
            job(&s);
            running(&s.0).store(false, Ordering::Release);
        });
        if spawned.is_err() {
            running(&self.0).store(false, Ordering::Release);
        }
    }

    /// Whether a background eviction pass is running.
    pub fn evicting(&self) -> bool {
        self.0.evicting.load(Ordering::Acquire)
    }

    /// Whether a scan found, not long ago, that no blob can go before a time still ahead.
    /// A clock set back since then voids the finding.
    fn nothing_evictable(&self, now: u64) -> bool {
        now < self.0.evictable_from.load(Ordering::Relaxed) && now >= self.0.evictable_checked_at.load(Ordering::Relaxed)
    }

    /// Evicts least recently used blobs outside the protect window until at most `target`
    /// bytes are stored. Returns how many blobs went.
    ///
    /// The order is the index's own access times; no second tree is kept in that order (it
    /// cost a sled insert per stored blob and two per touch). A round samples the access
    /// times of the evictable blobs in one scan of the index (every one of them, up to
    /// [`EVICT_SAMPLE`]), takes from the sample the cut-off time older than which enough bytes
    /// lie, and evicts in a second scan what is older: exact LRU for a store of up to that
    /// many blobs, within a fraction of a percent of it above.
    pub fn evict_down_to(&self, target: u64) -> Result<usize> {
        let one = self.0.eviction.lock();
        self.evict_rounds(&one, target)
    }

    /// [`Self::evict_down_to`] under the eviction lock, which `_one` shows is held.
    fn evict_rounds(&self, _one: &parking_lot::MutexGuard<'_, ()>, target: u64) -> Result<usize> {
        let mut evicted = 0;
        for _ in 0..EVICT_ROUNDS {
            let stored = self.stored_bytes();
            let now = now_ms();
            if stored <= target || self.nothing_evictable(now) {
                break;
            }
            // A recorded atime may lag the real last touch by up to the granularity, hence the
            // extra margin.
            let margin = self.0.protect_ms + self.0.touch_granularity_ms;
            let protected_from = now.saturating_sub(margin);
            let Some(cutoff) = self.eviction_cutoff(stored - target, protected_from, margin)? else { break };
            let n = self.evict_older(cutoff, protected_from, target)?;
            evicted += n;
            if n == 0 {
                break;
            }
        }
        if evicted > 0 {
            metrics::counter!(m::CAS_EVICTIONS).increment(evicted as u64);
            tracing::info!(evicted, stored_bytes = self.stored_bytes(), "evicted blobs");
            self.request_compaction();
        }
        Ok(evicted)
    }

    /// The access time at or before which the evictable blobs (used before `protected_from`)
    /// hold `need` bytes, estimated from a uniform sample of them; the newest evictable one if
    /// they hold less. `None` if nothing is evictable (then nothing is before the oldest
    /// access time plus `margin`, the protection: recorded in `evictable_from`).
    fn eviction_cutoff(&self, need: u64, protected_from: u64, margin: u64) -> Result<Option<u64>> {
        let mut sample = AtimeSample::new(EVICT_SAMPLE, now_ms());
        let mut oldest = u64::MAX;
        for item in self.0.index.iter() {
            let (_, raw) = item?;
            let Ok(e) = IndexEntry::decode(&raw) else { continue };
            if e.atime >= protected_from {
                // An access time ahead of the clock (set back since) counts as now.
                oldest = oldest.min(e.atime.min(protected_from + margin));
                continue;
            }
            sample.offer(e.atime, e.size);
        }
        let cutoff = sample.cutoff(need);
        if cutoff.is_none() && oldest != u64::MAX {
            self.0.evictable_checked_at.store(now_ms(), Ordering::Relaxed);
            self.0.evictable_from.store(oldest.saturating_add(margin + 1), Ordering::Relaxed);
        }
        Ok(cutoff)
    }

    /// Evicts the blobs used at or before `cutoff` (and before `protected_from`): every one
    /// used before it, those used at it while more than `target` bytes are stored. Returns
    /// how many went.
    fn evict_older(&self, cutoff: u64, protected_from: u64, target: u64) -> Result<usize> {
        let mut evicted = 0;
        for item in self.0.index.iter() {
            let (k, raw) = item?;
            let Ok(e) = IndexEntry::decode(&raw) else { continue };
            if self.0.closed.load(Ordering::Relaxed) {
                break;
            }
            if e.atime >= protected_from || e.atime > cutoff || (e.atime == cutoff && self.stored_bytes() <= target) {
                continue;
            }
            let Ok(key) = <Key>::try_from(&k[..]) else { continue };
            let Some(function) = DigestFunction::from_key_byte(key[0]) else { continue };
            let _g = self.stripe(&key);
            // Touched (or replaced) since the scan read it: it stays.
            if self.0.index.compare_and_swap(key, Some(&raw), None as Option<&[u8]>)?.is_err() {
                continue;
            }
            self.0.memory.lock().remove(&key);
            self.0.presence.write().pop(&key);
            let mut hash = [0u8; HASH_LEN];
            hash.copy_from_slice(&key[1..]);
            self.free(&BlobDigest { function, hash, size: e.size }, &e);
            self.add_total(-(e.size as i64));
            evicted += 1;
        }
        Ok(evicted)
    }

    /// Parks an unfinished upload so a later Write (or QueryWriteStatus) can find it.
    pub fn park_upload(&self, upload_key: String, state: UploadState) {
        let mut p = self.0.partials.lock();
        let ttl = self.0.partial_ttl;
        p.retain(|_, u| u.parked_at.elapsed() < ttl);
        while p.len() >= self.0.max_partials {
            let oldest = p.iter().min_by_key(|(_, u)| u.parked_at).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => p.remove(&k),
                None => break,
            };
        }
        p.insert(upload_key, ParkedUpload { state, parked_at: Instant::now() });
    }

    /// Takes a parked upload to resume it.
    pub fn take_upload(&self, upload_key: &str) -> Option<UploadState> {
        self.0.partials.lock().remove(upload_key).map(|u| u.state)
    }

    /// Bytes committed so far by a parked upload.
    pub fn parked_upload_size(&self, upload_key: &str) -> Option<u64> {
        self.0.partials.lock().get(upload_key).map(|u| u.state.received)
    }

    /// A parked upload's temp file, size received and whether it is compressed (a peer
    /// resuming it elsewhere reads the bytes). The file stays until the upload expires.
    pub fn parked_upload_file(&self, upload_key: &str) -> Option<(PathBuf, u64, bool)> {
        self.0.partials.lock().get(upload_key).map(|u| (u.state.tmp_path().to_path_buf(), u.state.received, u.state.compressed))
    }

    /// Flushes the index (the Action Cache shares its database).
    pub fn flush_index(&self) -> Result<()> {
        self.0.db.flush()?;
        Ok(())
    }

    /// Flushes the index and records that it lists every blob (the next start skips the scan).
    pub fn close(&self) -> Result<()> {
        // A running eviction pass stops at its next blob; held until the flush is done, the
        // lock keeps another from starting.
        self.0.closed.store(true, Ordering::Release);
        let _no_eviction = self.0.eviction.lock();
        if self.0.index_complete.load(Ordering::Acquire) {
            self.0.meta.insert(KEY_CLEAN, &[1])?;
        }
        self.0.db.flush()?;
        Ok(())
    }

    /// Walks every blob file and indexes those the index lacks. Returns how many.
    fn reindex_files(&self) -> Result<usize> {
        let mut n = 0;
        for f in DigestFunction::ALL {
            let fdir = self.0.dir.join(f.name());
            for shard in 0..=255u8 {
                let sdir = fdir.join(format!("{shard:02x}"));
                let Ok(entries) = std::fs::read_dir(&sdir) else { continue };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    let Some(hex) = name.to_str() else { continue };
                    let Ok(md) = entry.metadata() else { continue };
                    let Ok(d) = BlobDigest::parse(f, hex, md.len() as i64) else { continue };
                    if self.0.index.get(d.key())?.is_none() && self.reindex_if_on_disk(&d)?.is_some() {
                        n += 1;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Up to `limit` stored digests after `after` in index order (for repair passes).
    pub fn list_digests(&self, after: Option<BlobDigest>, limit: usize) -> Result<Vec<BlobDigest>> {
        let start = after.map(|d| d.key().to_vec());
        let iter = match &start {
            Some(k) => self.0.index.range::<&[u8], _>((std::ops::Bound::Excluded(k.as_slice()), std::ops::Bound::Unbounded)),
            None => self.0.index.iter(),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            let (Some(f), Ok(e)) = (k.first().and_then(|b| DigestFunction::from_key_byte(*b)), IndexEntry::decode(&v)) else { continue };
            if k.len() != 1 + HASH_LEN {
                continue;
            }
            let mut hash = [0u8; HASH_LEN];
            hash.copy_from_slice(&k[1..]);
            out.push(BlobDigest { function: f, hash, size: e.size });
        }
        Ok(out)
    }

    /// Drops a copy this node no longer needs (its owners hold the blob).
    /// Not logged one by one (a repair pass may drop thousands): the pass logs the count.
    pub fn drop_copy(&self, d: &BlobDigest) -> Result<()> {
        self.drop_blob(d)?;
        self.request_compaction();
        Ok(())
    }

    /// Indexes the records of packs a crash kept out of the index, as not yet verified.
    /// Only packs of earlier processes: this one's records are indexed as they are appended.
    fn reindex_packs(&self) -> Result<usize> {
        let mut n = 0;
        for id in self.0.packs.ids_before_open() {
            for (key, size, loc) in self.0.packs.records(id)? {
                let _g = self.stripe(&key);
                if self.0.index.get(key)?.is_none() && self.index_unverified(&key, size, Some(loc))?.is_some() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Starts a compaction pass in the background unless one is running.
    fn request_compaction(&self) {
        if self.0.compacting.swap(true, Ordering::AcqRel) {
            return;
        }
        self.in_background("kiln-cas-compact", |i| &i.compacting, |s| match s.compact_packs() {
            Ok(0) => {}
            Ok(moved) => tracing::info!(moved, "compacted packs"),
            Err(e) => tracing::warn!(error = %e, "pack compaction failed"),
        });
    }

    /// Rewrites closed packs less than half live: their live records are appended to the
    /// active pack and their index entries moved; once synced, the old pack is deleted.
    /// Returns how many records moved.
    pub fn compact_packs(&self) -> Result<usize> {
        if !self.index_complete() {
            return Ok(0); // what is live is not known yet
        }
        let mut moved_total = 0;
        for id in self.0.packs.compaction_candidates() {
            let mut moved: Vec<(Loc, u64)> = Vec::new();
            let mut files: Vec<Arc<File>> = Vec::new();
            for (key, size, loc) in self.0.packs.records(id)? {
                let _g = self.stripe(&key);
                let still_here = |raw: &sled::IVec| IndexEntry::decode(raw).ok().filter(|e| e.loc == Some(loc));
                if self.0.index.get(key)?.as_ref().and_then(still_here).is_none() {
                    continue;
                }
                let Some(bytes) = self.0.packs.read(loc, &key, size)? else { continue };
                let app = self.0.packs.append(&[(key, &bytes)])?;
                // Touches rewrite entries without the stripe lock (compare-and-swap): retry a few.
                let mut swapped = false;
                for _ in 0..4 {
                    let Some(raw) = self.0.index.get(key)? else { break };
                    let Some(e) = still_here(&raw) else { break };
                    let new = IndexEntry { loc: Some(app.locs[0]), ..e };
                    if self.0.index.compare_and_swap(key, Some(&raw), Some(new.encode()))?.is_ok() {
                        swapped = true;
                        break;
                    }
                }
                if !swapped {
                    self.0.packs.release(app.locs[0], size);
                    continue;
                }
                if !files.iter().any(|f| Arc::ptr_eq(f, &app.file)) {
                    files.push(app.file);
                }
                moved.push((loc, size));
            }
            // The new copies and their entries are durable before the old records can go.
            for f in &files {
                f.sync_data().map_err(|e| KilnError::io("fsync of a pack", e))?;
            }
            sync_dir(self.0.packs.dir()).map_err(|e| KilnError::io("fsync of the pack directory", e))?;
            self.0.flush.flush()?;
            for (loc, size) in &moved {
                self.0.packs.release(*loc, *size);
            }
            self.0.packs.delete_if_unused(id);
            metrics::counter!(m::CAS_PACK_RECORDS_MOVED).increment(moved.len() as u64);
            moved_total += moved.len();
        }
        Ok(moved_total)
    }

    /// Whether the index is known to list every blob file (tests wait for the start-up scan).
    pub fn index_complete(&self) -> bool {
        self.0.index_complete.load(Ordering::Acquire)
    }
}

/// Checks that `data` is the content of `d`.
pub fn check_content(d: &BlobDigest, data: &[u8]) -> Result<()> {
    if data.len() as u64 != d.size {
        return Err(KilnError::invalid(format!(
            "size mismatch for blob {d}: the digest says {} bytes, {} were sent",
            d.size,
            data.len()
        )));
    }
    let actual = d.function.digest_of(data);
    if actual.hash != d.hash {
        return Err(KilnError::invalid(format!(
            "hash mismatch for blob {d}: the data hashes to {} with {}",
            actual.hex(),
            d.function.name()
        )));
    }
    Ok(())
}

fn verify_file(file: &mut File, d: &BlobDigest) -> std::io::Result<bool> {
    let mut h = d.function.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok(total == d.size && h.finalize() == d.hash)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The group-commit thread: collects blob files for one window, then fsyncs them and their
/// directories together. Bounded queue; see [`BlobStore::commit`] for what happens when full.
fn spawn_syncer(window: Duration) -> std::sync::mpsc::SyncSender<SyncJob> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<SyncJob>(4096);
    std::thread::Builder::new()
        .name("kiln-fsync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                std::thread::sleep(window);
                let mut jobs = vec![first];
                while let Ok(j) = rx.try_recv() {
                    jobs.push(j);
                }
                // One syncfs flushes every file and directory of the window at the cost of
                // one device flush; fsyncing each file would cost one flush per blob (this is
                // what makes it a group commit).
                if jobs.len() > 1 {
                    if let Err(e) = nix::unistd::syncfs(&jobs[0].file) {
                        tracing::error!(error = %e, "syncfs of the blob store failed");
                    }
                } else {
                    for j in jobs {
                        if let Err(e) = j.file.sync_data().and_then(|_| sync_dir(&j.dir)) {
                            tracing::error!(error = %e, "fsync of a blob failed");
                        }
                    }
                }
                metrics::counter!(m::CAS_FSYNC_BATCHES).increment(1);
            }
        })
        .expect("spawning the fsync thread");
    tx
}

#[cfg(test)]
mod tests {
    use super::AtimeSample;

    #[test]
    fn the_cutoff_is_exact_while_every_blob_fits_in_the_sample() {
        let mut s = AtimeSample::new(100, 7);
        for t in (0..100u64).rev() {
            s.offer(t, 10 + t);
        }
        // Sizes 10, 11, 12: 33 bytes lie at or before time 2.
        assert_eq!(s.cutoff(33), Some(2));
        let mut s = AtimeSample::new(100, 7);
        s.offer(5, 1);
        assert_eq!(s.cutoff(1_000), Some(5), "less than needed: everything");
        assert_eq!(AtimeSample::new(100, 7).cutoff(1), None);
    }

    #[test]
    fn a_sampled_cutoff_lands_near_the_true_one() {
        // 100,000 blobs of 4 bytes, one per millisecond, offered in a scrambled (key) order.
        let n = 100_000u64;
        for (seed, need_fraction) in [(1u64, 0.1), (2, 0.5), (3, 0.9)] {
            let mut s = AtimeSample::new(4096, seed);
            for i in 0..n {
                s.offer((i * 7919) % n, 4);
            }
            let need = (n as f64 * 4.0 * need_fraction) as u64;
            let cut = s.cutoff(need).unwrap() as f64;
            let truth = n as f64 * need_fraction;
            // The quantile of a 4,096 sample errs by under 1 % of n in all but freak cases.
            assert!((cut - truth).abs() < n as f64 * 0.03, "cut-off {cut} for {truth}");
        }
    }
}
