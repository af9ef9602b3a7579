//! Pack files: small blobs appended to shared files instead of a file each.
//!
//! A file per 4 KiB blob costs an inode, a directory entry and a share of every sync: in
//! profiles of BatchUpdateBlobs, file creation alone took a third of the time. Blobs of up to
//! [`PACK_MAX_BLOB`] bytes that arrive whole (BatchUpdateBlobs, replicas, copies fetched from
//! peers) are appended to the active pack, `<data>/cas/packs/<id>.pack`, and their index entry
//! records where ([`Loc`]).
//!
//! Record: `magic (4) | blob key (33) | size (u64 LE) | bytes`. The key and size make a pack
//! self-describing, so the start-up scan after a crash can index the records whose index
//! entries the crash lost, and compaction can walk a pack. Appends are serialized by one lock,
//! so a crash can tear only a pack's last record: a scan stops at the first record that does
//! not parse. Records the scan indexes are unverified, hence re-hashed on first read, like any
//! blob file found after a crash. A new process never appends to an older pack.
//!
//! Large appends bypass the page cache: an append of [`DIRECT_MIN`] bytes or more (a
//! BatchUpdateBlobs of a few dozen blobs) is written with `O_DIRECT` ([`super::direct`])
//! through a second handle of the pack. Direct writes must start and end on block
//! boundaries, so one starts at the first block boundary at or after the pack's end and
//! ends zero-filled. It never touches a block that holds a record already written: such a
//! block may be in the page cache, being read, and the kernel can fail to drop a page a
//! reader holds while a direct write replaces it, leaving a stale copy for later reads.
//! Nothing can read where a direct write goes: it is past the file's end until the write
//! completes. So records are contiguous but for runs of zeros that end on a block boundary
//! (the gap before a direct append, or its padding where the next buffered append did not
//! cover it); a scan steps over those. Reads stay buffered; the memory tier holds what was
//! just written. Where the file system refuses `O_DIRECT`, appends are buffered.
//!
//! Space: each pack's live bytes are known from the index (counted at start, updated as
//! blobs are added and dropped). A pack with nothing live is deleted; a closed pack less than
//! half live is compacted by the store ([`super::BlobStore::compact_packs`]): its live records
//! are appended to the active pack, their index entries moved, and the file deleted. So packs
//! take at most about twice the bytes of the small blobs they hold.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::direct::{self, aligned, ALIGN as DIRECT_ALIGN};
use crate::digest::HASH_LEN;
use crate::error::{KilnError, Result};

type Key = [u8; 1 + HASH_LEN];

/// Blobs up to this size, stored whole, go to packs; larger ones get a file of their own.
pub(super) const PACK_MAX_BLOB: u64 = 64 * 1024;
/// Record magic, also the record format version.
const MAGIC: [u8; 4] = *b"KPK1";
/// Bytes of a record before the blob's bytes.
pub(super) const HEADER: u64 = 4 + (1 + HASH_LEN) as u64 + 8;
/// Open read handles kept, least recently used dropped first.
const OPEN_HANDLES: usize = 256;
/// Appends of at least this many bytes are written with `O_DIRECT`.
const DIRECT_MIN: u64 = 64 * 1024;
/// The direct-write buffer is kept between appends up to this size.
const DIRECT_BUF_KEEP: usize = 8 << 20;

/// Where a packed blob's record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Loc {
    pub pack: u32,
    pub offset: u64,
}

/// A pack's size and the bytes of its records still indexed (headers included).
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    len: u64,
    live: u64,
}

struct Active {
    id: u32,
    file: Option<Arc<File>>,
    /// The active pack opened with `O_DIRECT`, while direct writes to it work.
    direct: Option<File>,
    /// Where the next buffered append goes: the end of the last record.
    len: u64,
    /// The buffer direct appends are assembled in (over-allocated by [`DIRECT_ALIGN`] for
    /// alignment).
    buf: Vec<u8>,
}

impl Active {
    fn new(id: u32) -> Self {
        Self { id, file: None, direct: None, len: 0, buf: Vec::new() }
    }
}

/// What an append wrote: one location per blob, and the pack's file for syncing.
pub(super) struct Appended {
    pub locs: Vec<Loc>,
    pub file: Arc<File>,
    /// The append started a new pack file, whose directory entry needs a sync too.
    pub new_pack: bool,
}

pub(super) struct Packs {
    dir: PathBuf,
    /// A new pack starts when an append would grow the active one past this.
    max_pack_bytes: u64,
    /// The first pack of this process: earlier ones are closed for good.
    first_id: u32,
    active: Mutex<Active>,
    handles: Mutex<lru::LruCache<u32, Arc<File>>>,
    usage: Mutex<BTreeMap<u32, Usage>>,
    /// Cleared when the file system refuses `O_DIRECT`.
    direct_ok: AtomicBool,
    /// Where a direct append may start: a multiple of the page size, so that it never
    /// shares a page with records written before it.
    direct_start: u64,
}

fn record_len(size: u64) -> u64 {
    HEADER + size
}

/// Writes the records of `blobs` into `out`, which has exactly their length.
fn encode(blobs: &[(Key, &[u8])], out: &mut [u8]) {
    let mut at = 0;
    for (key, bytes) in blobs {
        let mut put = |b: &[u8]| {
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(&MAGIC);
        put(key);
        put(&(bytes.len() as u64).to_le_bytes());
        put(bytes);
    }
    debug_assert_eq!(at, out.len());
}

impl Packs {
    /// Opens the pack directory. Every existing pack is closed; the first append starts a new
    /// one. Large appends are direct if `direct_writes` and the file system allows.
    pub fn open(dir: PathBuf, max_pack_bytes: u64, direct_writes: bool) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| KilnError::io(format!("creating {}", dir.display()), e))?;
        let mut usage = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| KilnError::io(format!("listing {}", dir.display()), e))? {
            let entry = entry.map_err(|e| KilnError::io(format!("listing {}", dir.display()), e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pack")).and_then(|n| u32::from_str_radix(n, 16).ok()) else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            usage.insert(id, Usage { len, live: 0 });
        }
        let next = usage.keys().next_back().map_or(1, |id| id + 1);
        Ok(Self {
            dir,
            max_pack_bytes,
            first_id: next,
            active: Mutex::new(Active::new(next)),
            handles: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(OPEN_HANDLES).expect("non-zero"))),
            usage: Mutex::new(usage),
            direct_ok: AtomicBool::new(direct_writes),
            direct_start: direct::page_align(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:08x}.pack"))
    }

    /// Counts an indexed record as live (while the store loads or rebuilds its index).
    pub fn count_live(&self, loc: Loc, size: u64) {
        self.usage.lock().entry(loc.pack).or_default().live += record_len(size);
    }

    /// Appends `blobs` as consecutive records of the active pack, with one write. Their bytes
    /// count as live at once: the caller indexes them, or releases those it does not.
    pub fn append(&self, blobs: &[(Key, &[u8])]) -> Result<Appended> {
        let total: u64 = blobs.iter().map(|(_, b)| record_len(b.len() as u64)).sum();
        let want_direct = total >= DIRECT_MIN && self.direct_ok.load(Ordering::Relaxed);
        // A buffered append's records are assembled before taking the lock; a direct one's
        // in the aligned buffer, under it.
        let mut buf = Vec::new();
        if !want_direct {
            buf = vec![0u8; total as usize];
            encode(blobs, &mut buf);
        }
        let mut rel = Vec::with_capacity(blobs.len());
        let mut at = 0;
        for (_, bytes) in blobs {
            rel.push(at);
            at += record_len(bytes.len() as u64);
        }
        let mut a = self.active.lock();
        let mut new_pack = false;
        if a.file.is_none() || (a.len > 0 && a.len + total > self.max_pack_bytes) {
            let id = if a.file.is_some() { a.id + 1 } else { a.id };
            let path = self.path(id);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| KilnError::io(format!("creating pack {}", path.display()), e))?;
            let direct = if self.direct_ok.load(Ordering::Relaxed) {
                // The pack exists now: whatever goes wrong here, appends go on through the page
                // cache rather than fail.
                match direct::open(&path) {
                    Ok(Some(f)) => Some(f),
                    Ok(None) => {
                        if self.direct_ok.swap(false, Ordering::Relaxed) {
                            tracing::info!(dir = %self.dir.display(), "the file system refuses O_DIRECT: pack appends go through the page cache");
                        }
                        None
                    }
                    Err(e) => {
                        tracing::warn!(pack = %path.display(), error = %e, "opening a pack for direct writes failed: its appends go through the page cache");
                        None
                    }
                }
            } else {
                None
            };
            let buf = std::mem::take(&mut a.buf);
            *a = Active { file: Some(Arc::new(f)), direct, buf, ..Active::new(id) };
            new_pack = true;
        }
        let file = a.file.clone().expect("an active pack is open");
        let mut start = a.len;
        let mut direct = false;
        if want_direct && a.direct.is_some() {
            match self.write_direct(&mut a, blobs, total) {
                Ok(at) => {
                    start = at;
                    direct = true;
                }
                // Refused (alignment, file system): no more direct writes; buffered below.
                Err(e) if direct::refused(&e) => {
                    tracing::warn!(error = %e, "a direct pack write was refused: pack appends go through the page cache");
                    self.direct_ok.store(false, Ordering::Relaxed);
                    a.direct = None;
                }
                Err(e) => return Err(self.failed_append(&mut a, &file, e)),
            }
        }
        if !direct {
            if want_direct {
                buf = vec![0u8; total as usize];
                encode(blobs, &mut buf);
            }
            if let Err(e) = file.write_all_at(&buf, start) {
                return Err(self.failed_append(&mut a, &file, e));
            }
            a.len += total;
        }
        let id = a.id;
        {
            let mut u = self.usage.lock();
            let e = u.entry(id).or_default();
            e.len = a.len;
            e.live += total;
        }
        drop(a);
        if direct {
            metrics::counter!(crate::metrics::CAS_PACK_DIRECT_BYTES).increment(total);
        }
        let locs = rel.into_iter().map(|r| Loc { pack: id, offset: start + r }).collect();
        Ok(Appended { locs, file, new_pack })
    }

    /// After an append that may have landed in part: later records go after whatever did.
    fn failed_append(&self, a: &mut Active, file: &File, e: std::io::Error) -> KilnError {
        if let Ok(md) = file.metadata() {
            a.len = a.len.max(md.len());
        }
        self.usage.lock().entry(a.id).or_default().len = a.len;
        KilnError::io(format!("appending to pack {}", self.path(a.id).display()), e)
    }

    /// Writes `blobs` (`total` bytes of records) with one direct write at the first block
    /// boundary at or after the active pack's end, zero-filled to the next one. Returns
    /// where the records start.
    fn write_direct(&self, a: &mut Active, blobs: &[(Key, &[u8])], total: u64) -> std::io::Result<u64> {
        let at = a.len.next_multiple_of(self.direct_start);
        let len = total as usize;
        let padded = len.next_multiple_of(DIRECT_ALIGN);
        let mut buf = std::mem::take(&mut a.buf);
        let out = aligned(&mut buf, padded);
        encode(blobs, &mut out[..len]);
        out[len..].fill(0);
        let written = a.direct.as_ref().expect("checked by the caller").write_all_at(out, at);
        if written.is_ok() {
            a.len = at + total;
        }
        if buf.len() <= DIRECT_BUF_KEEP + DIRECT_ALIGN {
            a.buf = buf;
        }
        written.map(|()| at)
    }

    fn handle(&self, id: u32) -> std::io::Result<Arc<File>> {
        if let Some(f) = self.handles.lock().get(&id) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.path(id))?);
        self.handles.lock().put(id, f.clone());
        Ok(f)
    }

    /// The bytes of the record at `loc` if it is the record of `key` with `size` bytes;
    /// `None` if the pack is gone or the record is not that blob's (torn, overwritten).
    pub fn read(&self, loc: Loc, key: &Key, size: u64) -> Result<Option<Bytes>> {
        let f = match self.handle(loc.pack) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(KilnError::io(format!("opening pack {}", self.path(loc.pack).display()), e)),
        };
        let mut buf = vec![0u8; record_len(size) as usize];
        match f.read_exact_at(&mut buf, loc.offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(KilnError::io(format!("reading pack {}", self.path(loc.pack).display()), e)),
        }
        let header = &buf[..HEADER as usize];
        if header[..4] != MAGIC || &header[4..4 + key.len()] != key || header[4 + key.len()..] != size.to_le_bytes() {
            return Ok(None);
        }
        Ok(Some(Bytes::from(buf).slice(HEADER as usize..)))
    }

    /// A record is no longer indexed. Deletes its pack once nothing in it is, unless it is the
    /// active one.
    pub fn release(&self, loc: Loc, size: u64) {
        let empty = {
            let mut u = self.usage.lock();
            let Some(e) = u.get_mut(&loc.pack) else {
                return;
            };
            e.live = e.live.saturating_sub(record_len(size));
            e.live == 0
        };
        // Lock order: `active` before `usage` (as in `append`), so not inside the block above.
        if empty && !self.is_active(loc.pack) {
            self.delete(loc.pack);
        }
    }

    /// Deletes pack `id` if it is closed and nothing in it is live.
    pub fn delete_if_unused(&self, id: u32) -> bool {
        let unused = self.usage.lock().get(&id).is_some_and(|u| u.live == 0);
        if unused && !self.is_active(id) {
            self.delete(id);
            return true;
        }
        false
    }

    fn is_active(&self, id: u32) -> bool {
        let a = self.active.lock();
        a.id == id && a.file.is_some()
    }

    /// The open pack, if any.
    fn active_id(&self) -> Option<u32> {
        let a = self.active.lock();
        a.file.is_some().then_some(a.id)
    }

    fn delete(&self, id: u32) {
        self.usage.lock().remove(&id);
        self.handles.lock().pop(&id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => tracing::debug!(pack = id, "pack deleted: nothing in it is indexed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pack = id, error = %e, "deleting an unused pack failed"),
        }
    }

    /// Deletes closed packs with nothing live (once the index is known complete).
    pub fn delete_unused(&self) -> usize {
        let unused: Vec<u32> = self.usage.lock().iter().filter(|(_, u)| u.live == 0).map(|(id, _)| *id).collect();
        unused.into_iter().filter(|id| self.delete_if_unused(*id)).count()
    }

    /// Closed packs less than half live, most wasteful first.
    pub fn compaction_candidates(&self) -> Vec<u32> {
        let active = self.active_id();
        let mut c: Vec<(u32, Usage)> =
            self.usage.lock().iter().filter(|(id, u)| u.live * 2 < u.len && Some(**id) != active).map(|(id, u)| (*id, *u)).collect();
        c.sort_by_key(|(_, u)| u.live * 1000 / u.len.max(1));
        c.into_iter().map(|(id, _)| id).collect()
    }

    /// Every pack id, oldest first.
    #[cfg(test)]
    pub fn ids(&self) -> Vec<u32> {
        self.usage.lock().keys().copied().collect()
    }

    /// The packs of earlier processes, oldest first.
    pub fn ids_before_open(&self) -> Vec<u32> {
        self.usage.lock().range(..self.first_id).map(|(id, _)| *id).collect()
    }

    /// The records of pack `id` in order, up to the first that does not parse (a torn tail):
    /// `(key, size, location)`. Zeros up to a block boundary are stepped over, block by block:
    /// the gap before a direct append, or the padding after one.
    pub fn records(&self, id: u32) -> Result<Vec<(Key, u64, Loc)>> {
        let path = self.path(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(KilnError::io(format!("opening pack {}", path.display()), e)),
        };
        let len = f.metadata().map_err(|e| KilnError::io(format!("reading pack {}", path.display()), e))?.len();
        let mut r = BufReader::with_capacity(1 << 20, f);
        let mut out = Vec::new();
        let mut offset = 0u64;
        let mut header = [0u8; HEADER as usize];
        while offset + HEADER <= len {
            if r.read_exact(&mut header).is_err() {
                break;
            }
            if header[..4] != MAGIC {
                // Zeros up to the next block boundary: step over them.
                let next = (offset + 1).next_multiple_of(DIRECT_ALIGN as u64);
                let gap = (next - offset).min(HEADER) as usize;
                if header[..gap].iter().any(|b| *b != 0) || r.seek_relative(next as i64 - (offset + HEADER) as i64).is_err() {
                    break;
                }
                offset = next;
                continue;
            }
            let key: Key = header[4..4 + 1 + HASH_LEN].try_into().expect("key length");
            let size = u64::from_le_bytes(header[4 + 1 + HASH_LEN..].try_into().expect("8 bytes"));
            if size > PACK_MAX_BLOB || offset + record_len(size) > len {
                break;
            }
            if std::io::copy(&mut (&mut r).take(size), &mut std::io::sink()).ok() != Some(size) {
                break;
            }
            out.push((key, size, Loc { pack: id, offset }));
            offset += record_len(size);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_a_torn_tail_ends_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path().join("packs"), 1 << 20, true).unwrap();
        let a = ([1u8; 33], vec![7u8; 100]);
        let b = ([2u8; 33], vec![9u8; 5000]);
        let app = packs.append(&[(a.0, &a.1), (b.0, &b.1)]).unwrap();
        assert!(app.new_pack);
        assert_eq!(&packs.read(app.locs[1], &b.0, 5000).unwrap().unwrap()[..], &b.1[..]);
        assert_eq!(&packs.read(app.locs[0], &a.0, 100).unwrap().unwrap()[..], &a.1[..]);
        assert!(packs.read(app.locs[0], &b.0, 100).unwrap().is_none(), "another key's record");
        assert!(packs.read(app.locs[0], &a.0, 99).unwrap().is_none(), "another size");
        let pack = app.locs[0].pack;
        // A crash in the middle of the next append.
        let c = ([3u8; 33], vec![1u8; 3000]);
        packs.append(&[(c.0, &c.1)]).unwrap();
        let path = dir.path().join("packs").join(format!("{pack:08x}.pack"));
        let full = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(full - 10).unwrap();
        let reopened = Packs::open(dir.path().join("packs"), 1 << 20, true).unwrap();
        let recs = reopened.records(pack).unwrap();
        assert_eq!(recs.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(), vec![(a.0, 100), (b.0, 5000)]);
        assert!(reopened.append(&[(c.0, &c.1)]).unwrap().locs[0].pack > pack, "a new process starts a new pack");
    }

    #[test]
    fn large_appends_bypass_the_page_cache_on_block_boundaries_and_a_scan_steps_over_the_gaps() {
        appends_read_back_and_scan(true);
    }

    #[test]
    fn without_direct_writes_every_append_is_buffered() {
        appends_read_back_and_scan(false);
    }

    /// Small and large appends in turn read back, and a scan after reopening finds them all.
    fn appends_read_back_and_scan(direct_writes: bool) {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path().join("packs"), 64 << 20, direct_writes).unwrap();
        let blob = |i: usize, len: usize| {
            let mut key = [i as u8; 33];
            key[..2].copy_from_slice(&(i as u16).to_le_bytes());
            (key, (0..len).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>())
        };
        // Small (buffered) and large (direct) appends in turn, each ending mid-block.
        let batches: Vec<Vec<([u8; 33], Vec<u8>)>> = vec![
            vec![blob(1, 100)],
            (2..22).map(|i| blob(i, 4096 + i)).collect(),
            vec![blob(22, 7)],
            vec![blob(23, 3000), blob(24, 50)],
            (25..45).map(|i| blob(i, 5000 - i)).collect(),
            (45..65).map(|i| blob(i, 4000)).collect(),
        ];
        let mut written: Vec<(Key, Vec<u8>, Loc)> = Vec::new();
        let append = |batch: &[([u8; 33], Vec<u8>)], written: &mut Vec<(Key, Vec<u8>, Loc)>| {
            let refs: Vec<(Key, &[u8])> = batch.iter().map(|(k, b)| (*k, &b[..])).collect();
            let app = packs.append(&refs).unwrap();
            for ((k, b), loc) in batch.iter().zip(app.locs) {
                written.push((*k, b.clone(), loc));
            }
        };
        for batch in &batches {
            append(batch, &mut written);
        }
        // Gaps before a direct append of every awkward size: shorter than the zeros a scan
        // checks for (4 bytes), than a header (45), and longer.
        // (Where pages are larger than 4 KiB, direct appends start on page boundaries instead.)
        let gaps: &[u64] = if packs.direct_start == DIRECT_ALIGN as u64 { &[1, 2, 3, 4, 16, 44, 45, 46, 4000] } else { &[] };
        let mut gap_at = Vec::new();
        for (g, gap) in gaps.iter().enumerate() {
            let last = written.last().unwrap();
            let end_now = last.2.offset + record_len(last.1.len() as u64);
            let align = packs.direct_start;
            let size = (2 * align - gap - (end_now + HEADER) % align) % align;
            append(&[blob(100 + g, size as usize)], &mut written);
            gap_at.push(written.len());
            append(&(0..17).map(|i| blob(120 + 20 * g + i, 4000)).collect::<Vec<_>>(), &mut written);
        }
        let pack = written[0].2.pack;
        assert!(written.iter().all(|w| w.2.pack == pack), "one pack");
        for (k, b, loc) in &written {
            assert_eq!(&packs.read(*loc, k, b.len() as u64).unwrap().unwrap()[..], &b[..], "record at {loc:?}");
        }
        let end: u64 = written.iter().map(|w| record_len(w.1.len() as u64)).sum();
        if direct_writes && packs.direct_ok.load(Ordering::Relaxed) {
            for (gap, i) in gaps.iter().zip(&gap_at) {
                let before = &written[i - 1];
                assert_eq!(written[*i].2.offset - (before.2.offset + record_len(before.1.len() as u64)), *gap);
            }
        }
        let on_disk = std::fs::metadata(dir.path().join("packs").join(format!("{pack:08x}.pack"))).unwrap().len();
        let last = written.last().unwrap();
        let last_end = last.2.offset + record_len(last.1.len() as u64);
        if direct_writes && packs.direct_ok.load(Ordering::Relaxed) {
            // Each direct append starts on a block boundary, and the last one ends zero-filled
            // on one.
            for batch_start in [1, 24, 44].into_iter().chain(gap_at.iter().copied()) {
                assert_eq!(written[batch_start].2.offset % packs.direct_start, 0, "batch at {batch_start}");
            }
            assert_eq!(on_disk, last_end.next_multiple_of(DIRECT_ALIGN as u64));
        } else {
            assert_eq!(on_disk, end, "every append buffered: records back to back");
            assert_eq!(last_end, end);
        }
        drop(packs);
        let reopened = Packs::open(dir.path().join("packs"), 64 << 20, direct_writes).unwrap();
        let recs = reopened.records(pack).unwrap();
        let want: Vec<(Key, u64, Loc)> = written.iter().map(|(k, b, loc)| (*k, b.len() as u64, *loc)).collect();
        assert_eq!(recs, want, "a scan finds every record, in order, and stops at the padding");
    }

    #[test]
    fn a_closed_pack_goes_when_nothing_in_it_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let packs = Packs::open(dir.path().join("packs"), 1 << 20, true).unwrap();
        let a = ([1u8; 33], vec![7u8; 100]);
        let loc = packs.append(&[(a.0, &a.1)]).unwrap().locs[0];
        packs.release(loc, 100);
        assert!(packs.ids().contains(&loc.pack), "the active pack stays");
        drop(packs);
        let packs = Packs::open(dir.path().join("packs"), 1 << 20, true).unwrap();
        assert_eq!(packs.delete_unused(), 1);
        assert!(packs.ids().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("packs")).unwrap().count(), 0);
    }
}
