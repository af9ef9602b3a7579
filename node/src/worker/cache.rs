//! The worker's local content cache: input files kept on disk between actions, so that an
//! input already fetched once is hardlinked into the next action directory instead of fetched
//! again.
//!
//! Layout: one file per `(digest, executable)` key in `work_dir/cache/`, named
//! `<function>-<hash>-<size>` (mode 0444) or `<function>-<hash>-<size>-x` (mode 0555). Two files
//! for the two modes because hardlinks share their inode, hence their mode bits: a `chmod +x` on
//! one link would change every action's copy. Files are read-only, so that an action (not run
//! as root) cannot write through its hardlink into the cache.
//!
//! A cache file only ever appears by a `rename` of a complete temp file from `work_dir/tmp/`
//! whose hash was verified. The files are not fsynced: an fsync per input would cost more than
//! fetching again. After a power loss a file may come back truncated, which the start-up scan
//! catches because the size is in the name (a zero-filled file of the right size would not be
//! caught; re-hashing the whole cache at every start was the rejected, slower alternative).
//!
//! An action could still modify an input in place (as root, or after `chmod`), and with it the
//! cache file. So each entry remembers the file's length, mtime, mode and inode when it was
//! inserted, and a lookup that finds them changed drops the entry and fetches again.
//!
//! The cache is bounded by `max_bytes`, evicting least-recently-used files first. A file an
//! action is using is *pinned* (see [`Pins`]) and not evicted until the action is done:
//! evicting it would not free its space anyway while the action directory still links it.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};

/// Mode of a non-executable cache file.
pub const FILE_MODE: u32 = 0o444;
/// Mode of an executable cache file.
pub const EXECUTABLE_MODE: u32 = 0o555;

/// What the cache stores: content plus the executable bit.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct CacheKey {
    pub digest: BlobDigest,
    pub executable: bool,
}

impl CacheKey {
    pub fn file_name(&self) -> String {
        let x = if self.executable { "-x" } else { "" };
        format!("{}-{}-{}{x}", self.digest.function.name(), self.digest.hex(), self.digest.size)
    }

    /// The inverse of [`Self::file_name`]; `None` for anything else (a stray file).
    pub fn parse(name: &str) -> Option<Self> {
        let (rest, executable) = match name.strip_suffix("-x") {
            Some(r) => (r, true),
            None => (name, false),
        };
        let mut parts = rest.splitn(3, '-');
        let function = match parts.next()? {
            "sha256" => DigestFunction::Sha256,
            "blake3" => DigestFunction::Blake3,
            _ => return None,
        };
        let hash = parts.next()?;
        let size: i64 = parts.next()?.parse().ok()?;
        let digest = BlobDigest::parse(function, hash, size).ok()?;
        Some(Self { digest, executable })
    }

    pub fn mode(&self) -> u32 {
        if self.executable {
            EXECUTABLE_MODE
        } else {
            FILE_MODE
        }
    }

    /// The same content with the other mode.
    pub fn twin(&self) -> Self {
        Self { digest: self.digest, executable: !self.executable }
    }
}

/// What a cache file looked like when it entered the cache; any change means someone wrote it.
/// Hardlinking changes only the link count and ctime, which are not part of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
    mode: u32,
    ino: u64,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self { len: m.len(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec(), mode: m.mode() & 0o7777, ino: m.ino() }
    }
}

struct Entry {
    tick: u64,
    pins: u32,
    stamp: FileStamp,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<CacheKey, Entry>,
    /// Use order: the smallest tick is the least recently used.
    lru: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: u64,
    evictions: u64,
}

impl CacheState {
    fn touch(&mut self, key: &CacheKey) {
        let tick = self.next_tick;
        self.next_tick += 1;
        if let Some(e) = self.entries.get_mut(key) {
            self.lru.remove(&e.tick);
            e.tick = tick;
            self.lru.insert(tick, *key);
        }
    }

    fn remove(&mut self, key: &CacheKey) -> bool {
        match self.entries.remove(key) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.bytes -= key.digest.size;
                true
            }
            None => false,
        }
    }
}

/// See the module documentation.
pub struct ContentCache {
    dir: PathBuf,
    tmp_dir: PathBuf,
    max_bytes: u64,
    state: Mutex<CacheState>,
}

impl ContentCache {
    /// Opens the cache in `dir`, keeping the intact files found there (oldest mtime first to
    /// go) and deleting anything else. `tmp_dir` holds files being fetched; it must be on the
    /// same file system, and is emptied.
    pub fn open(dir: PathBuf, tmp_dir: PathBuf, max_bytes: u64) -> Result<Self> {
        for d in [&dir, &tmp_dir] {
            std::fs::create_dir_all(d).map_err(|e| KilnError::io(format!("create {}", d.display()), e))?;
        }
        super::exec::empty_dir(&tmp_dir)?;
        let mut found = Vec::new();
        let listing = std::fs::read_dir(&dir).map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?;
        for item in listing {
            let item = item.map_err(|e| KilnError::io(format!("list {}", dir.display()), e))?;
            let path = item.path();
            let meta = std::fs::symlink_metadata(&path).map_err(|e| KilnError::io(format!("stat {}", path.display()), e))?;
            let key = item.file_name().to_str().and_then(CacheKey::parse);
            match key {
                Some(key) if meta.is_file() && meta.len() == key.digest.size && meta.mode() & 0o7777 == key.mode() => {
                    found.push((meta.mtime(), meta.mtime_nsec(), key, FileStamp::of(&meta)));
                }
                _ => {
                    tracing::info!(path = %path.display(), "removing a stray or damaged file from the worker cache");
                    super::exec::remove_any(&path)?;
                }
            }
        }
        found.sort_by_key(|(s, ns, key, _)| (*s, *ns, *key));
        let cache = Self { dir, tmp_dir, max_bytes, state: Mutex::new(CacheState::default()) };
        {
            let mut st = cache.state.lock();
            for (_, _, key, stamp) in found {
                let tick = st.next_tick;
                st.next_tick += 1;
                st.entries.insert(key, Entry { tick, pins: 0, stamp });
                st.lru.insert(tick, key);
                st.bytes += key.digest.size;
            }
            cache.evict_locked(&mut st);
            metrics::gauge!(super::CACHE_BYTES).set(st.bytes as f64);
        }
        Ok(cache)
    }

    pub fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// A fresh path in the temp directory, for a file about to enter the cache.
    pub fn tmp_path(&self) -> PathBuf {
        self.tmp_dir.join(uuid::Uuid::new_v4().to_string())
    }

    /// Bytes of the files in the cache.
    pub fn bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    /// Files evicted since the cache was opened.
    pub fn evictions(&self) -> u64 {
        self.state.lock().evictions
    }

    /// Whether the cache holds `key` (without pinning or checking it).
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.state.lock().entries.contains_key(key)
    }

    /// Pins `key` and returns true if the cache holds an intact copy of it. A copy that was
    /// changed since it was inserted is dropped (false).
    pub fn pin_if_present(&self, key: &CacheKey) -> bool {
        let path = self.path(key);
        let mut st = self.state.lock();
        let Some(entry) = st.entries.get(key) else { return false };
        let intact = std::fs::symlink_metadata(&path).map(|m| FileStamp::of(&m) == entry.stamp).unwrap_or(false);
        if !intact {
            tracing::warn!(path = %path.display(), "a worker cache file was modified; dropping it");
            st.remove(key);
            if let Err(e) = super::exec::remove_any(&path) {
                tracing::warn!(error = %e, "cannot remove a modified cache file");
            }
            metrics::gauge!(super::CACHE_BYTES).set(st.bytes as f64);
            return false;
        }
        st.entries.get_mut(key).expect("checked above").pins += 1;
        st.touch(key);
        true
    }

    /// Moves the complete, verified file at `tmp` into the cache as `key`, pinned. Sets its
    /// mode. A copy already there is replaced (its inode lives on in the action directories
    /// that link it). May evict unpinned files to stay within the bound.
    pub fn insert_pinned(&self, key: &CacheKey, tmp: &Path) -> Result<()> {
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(key.mode()))
            .map_err(|e| KilnError::io(format!("chmod {}", tmp.display()), e))?;
        let meta = std::fs::symlink_metadata(tmp).map_err(|e| KilnError::io(format!("stat {}", tmp.display()), e))?;
        if meta.len() != key.digest.size {
            return Err(KilnError::Internal(format!("{} holds {} bytes, not blob {}", tmp.display(), meta.len(), key.digest)));
        }
        let stamp = FileStamp::of(&meta);
        let path = self.path(key);
        let mut st = self.state.lock();
        // Renamed under the lock: eviction deletes under the lock too, so it can never delete
        // a file that was just put in place for a key it thinks it is evicting.
        std::fs::rename(tmp, &path).map_err(|e| KilnError::io(format!("rename {} to {}", tmp.display(), path.display()), e))?;
        let pins = match st.entries.get(key) {
            Some(e) => e.pins,
            None => {
                st.bytes += key.digest.size;
                0
            }
        };
        let tick = st.next_tick;
        st.next_tick += 1;
        if let Some(old) = st.entries.insert(*key, Entry { tick, pins: pins + 1, stamp }) {
            st.lru.remove(&old.tick);
        }
        st.lru.insert(tick, *key);
        self.evict_locked(&mut st);
        metrics::gauge!(super::CACHE_BYTES).set(st.bytes as f64);
        Ok(())
    }

    fn unpin(&self, keys: &[CacheKey]) {
        let mut st = self.state.lock();
        for k in keys {
            if let Some(e) = st.entries.get_mut(k) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }

    /// Evicts unpinned files until the cache is within its bound (or only pinned files are
    /// left). Deletes files: call it off the async threads.
    pub fn trim(&self) {
        let mut st = self.state.lock();
        self.evict_locked(&mut st);
        metrics::gauge!(super::CACHE_BYTES).set(st.bytes as f64);
    }

    fn evict_locked(&self, st: &mut CacheState) {
        if st.bytes <= self.max_bytes {
            return;
        }
        let victims: Vec<CacheKey> = {
            let mut over = st.bytes - self.max_bytes;
            let mut v = Vec::new();
            for key in st.lru.values() {
                if over == 0 {
                    break;
                }
                if st.entries.get(key).is_some_and(|e| e.pins == 0) {
                    v.push(*key);
                    over = over.saturating_sub(key.digest.size.max(1));
                }
            }
            v
        };
        for key in victims {
            st.remove(&key);
            st.evictions += 1;
            metrics::counter!(super::CACHE_EVICTIONS).increment(1);
            let path = self.path(&key);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove an evicted cache file");
                }
            }
        }
        if st.bytes > self.max_bytes {
            tracing::debug!(bytes = st.bytes, max = self.max_bytes, "worker cache over its bound: the rest is in use");
        }
    }
}

/// The cache files one action uses, unpinned when this is dropped. Dropping only updates
/// counters; the eviction it may allow happens at the next [`ContentCache::trim`] or insert.
pub struct Pins {
    cache: Arc<ContentCache>,
    keys: Vec<CacheKey>,
}

impl Pins {
    pub fn new(cache: Arc<ContentCache>) -> Self {
        Self { cache, keys: Vec::new() }
    }

    /// Records a key this action pinned (through [`ContentCache::pin_if_present`] or
    /// [`ContentCache::insert_pinned`]).
    pub fn push(&mut self, key: CacheKey) {
        self.keys.push(key);
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        self.cache.unpin(&self.keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(cache: &ContentCache, data: &[u8], executable: bool) -> CacheKey {
        let key = CacheKey { digest: DigestFunction::Sha256.digest_of(data), executable };
        let tmp = cache.tmp_path();
        std::fs::write(&tmp, data).unwrap();
        cache.insert_pinned(&key, &tmp).unwrap();
        key
    }

    #[test]
    fn names_round_trip_and_strays_are_refused() {
        let key = CacheKey { digest: DigestFunction::Sha256.digest_of(b"x"), executable: true };
        assert_eq!(CacheKey::parse(&key.file_name()), Some(key));
        assert_eq!(CacheKey::parse(&key.twin().file_name()), Some(key.twin()));
        assert_eq!(CacheKey::parse("sha256-zz-1"), None);
        assert_eq!(CacheKey::parse("junk"), None);
    }

    #[test]
    fn evicts_least_recently_used_unpinned_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ContentCache::open(dir.path().join("c"), dir.path().join("t"), 250).unwrap());
        let a = put(&cache, &[1u8; 100], false);
        let b = put(&cache, &[2u8; 100], false);
        // Both pinned: a third file goes over the bound, nothing can go.
        let c = put(&cache, &[3u8; 100], false);
        assert_eq!(cache.bytes(), 300);
        let mut pins = Pins::new(cache.clone());
        pins.push(c);
        cache.unpin(&[a, b]);
        cache.unpin(&[a, b]); // extra unpins are harmless
        assert!(cache.pin_if_present(&b)); // b used again: a is now the oldest
        cache.unpin(&[b]);
        cache.trim();
        assert!(!cache.contains(&a));
        assert!(cache.contains(&b) && cache.contains(&c));
        assert!(!cache.path(&a).exists());
        assert_eq!(cache.evictions(), 1);
        drop(pins);
    }

    #[test]
    fn modified_files_are_dropped_and_reopen_keeps_intact_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (c, t) = (dir.path().join("c"), dir.path().join("t"));
        let cache = ContentCache::open(c.clone(), t.clone(), 1 << 20).unwrap();
        let a = put(&cache, b"hello", false);
        let x = put(&cache, b"tool", true);
        assert_eq!(std::fs::metadata(cache.path(&x)).unwrap().mode() & 0o777, 0o555);
        std::fs::set_permissions(cache.path(&a), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(cache.path(&a), b"HELLO").unwrap();
        assert!(!cache.pin_if_present(&a));
        assert!(!cache.contains(&a));
        std::fs::write(c.join("stray"), b"?").unwrap();
        drop(cache);
        let cache = ContentCache::open(c.clone(), t, 1 << 20).unwrap();
        assert!(cache.contains(&x));
        assert!(!c.join("stray").exists());
        assert_eq!(cache.bytes(), 4);
    }
}
