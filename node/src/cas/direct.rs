//! Writes past the page cache (`O_DIRECT`), for the bytes a node writes in bulk: pack appends
//! of whole batches and large uploads.
//!
//! Filling fresh page-cache pages costs the writing core a page allocation and a copy per
//! 4 KiB, and the writeback more work later; a direct write hands an aligned buffer to the
//! device. On this project's benchmark machine, a VM whose host takes back the memory the
//! guest frees, a buffered 1 GiB write into fresh pages took 2.4 s of system time and a direct
//! one 0.11 s. A direct write must start, end and sit in memory on [`ALIGN`] boundaries; where
//! the file system refuses `O_DIRECT` (tmpfs) the callers write through the page cache.
//! Reads stay buffered: the kernel keeps them coherent with direct writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The offset, length and memory alignment of a direct write.
pub(super) const ALIGN: usize = 4096;
/// A [`SequentialWriter`] writes in pieces of this size.
const STAGE: usize = 2 << 20;

/// Opens `path` for direct writes; `None` if the file system does not support them.
pub(super) fn open(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().write(true).custom_flags(nix::fcntl::OFlag::O_DIRECT.bits()).open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if refused(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The alignment of a direct write that must not share a page with bytes written before it:
/// the larger of [`ALIGN`] and the memory page size (64 KiB on some arm64 and ppc64 kernels).
pub(super) fn page_align() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(0);
    (page.max(0) as u64).max(ALIGN as u64)
}

/// Whether a direct open or write failed because direct I/O is not possible there (as
/// opposed to an I/O error).
pub(super) fn refused(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EINVAL)
}

/// `len` bytes of `buf` starting at an [`ALIGN`]-aligned address (`buf` is replaced by a
/// larger one if needed; it is over-allocated so that such a start exists).
pub(super) fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + ALIGN {
        *buf = vec![0u8; len + ALIGN];
    }
    let off = buf.as_ptr().align_offset(ALIGN);
    &mut buf[off..off + len]
}

/// Writes a file from its start, in order, with direct writes of [`STAGE`] bytes assembled in
/// an aligned buffer; [`Self::flush`] writes the rest.
pub(super) struct SequentialWriter {
    file: File,
    buf: Vec<u8>,
    /// File offset of the buffer's first byte (block-aligned).
    at: u64,
    /// Bytes in the buffer.
    fill: usize,
}

impl SequentialWriter {
    /// A writer for the empty file `path`; `None` if the file system refuses direct writes.
    pub fn open(path: &Path) -> std::io::Result<Option<Self>> {
        Ok(open(path)?.map(|file| Self { file, buf: Vec::new(), at: 0, fill: 0 }))
    }

    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            // Allocated on the first write, at full size: never replaced while it holds bytes.
            let stage = aligned(&mut self.buf, STAGE);
            let n = (STAGE - self.fill).min(data.len());
            stage[self.fill..self.fill + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == STAGE {
                self.file.write_all_at(stage, self.at)?;
                metrics::counter!(crate::metrics::CAS_UPLOAD_DIRECT_BYTES).increment(STAGE as u64);
                self.at += STAGE as u64;
                self.fill = 0;
            }
        }
        Ok(())
    }

    /// Writes what is buffered, the last block zero-filled, then cuts the file to the bytes
    /// written: the file then holds exactly them. The last call: what follows is written
    /// through the page cache, since a direct write over the block just written could race
    /// a reader of it (a parked upload's file is read by peers) and leave a stale page. On an
    /// error nothing changes, so [`Self::into_pending`] still has every byte.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.fill > 0 {
            let padded = self.fill.next_multiple_of(ALIGN);
            let stage = aligned(&mut self.buf, padded);
            stage[self.fill..padded].fill(0);
            self.file.write_all_at(&stage[..padded], self.at)?;
            self.file.set_len(self.at + self.fill as u64)?;
            metrics::counter!(crate::metrics::CAS_UPLOAD_DIRECT_BYTES).increment(self.fill as u64);
        }
        Ok(())
    }

    /// Gives up direct writes: the buffered bytes and their offset, for the caller to write
    /// through the page cache.
    pub fn into_pending(mut self) -> (u64, Vec<u8>) {
        let fill = self.fill;
        let pending = if fill == 0 { Vec::new() } else { aligned(&mut self.buf, fill)[..fill].to_vec() };
        (self.at, pending)
    }
}

/// Asks the kernel to read `from..to` of `f` into the page cache, without waiting for it, a
/// step at a time (it reads at most its readahead window per call). Returns where it got to:
/// `to`, or where the kernel refused.
pub(super) fn read_ahead(f: &File, from: u64, to: u64) -> u64 {
    let mut at = from;
    while at < to {
        let n = READ_AHEAD_STEP.min(to - at);
        if nix::fcntl::posix_fadvise(f, at as i64, n as i64, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_err() {
            break;
        }
        at += n;
    }
    at
}

/// Warms up to this many files at once; more are left cold.
const WARMING_MAX: usize = 2;
/// Bytes asked of the kernel's readahead at a time.
const READ_AHEAD_STEP: u64 = 1 << 20;
static WARMING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Has the kernel read a file just written directly back into the page cache, on a thread of
/// its own: a blob just uploaded is often read soon (a worker fetching an action's inputs).
/// The kernel's readahead fills the pages with device reads, not with copies by this node's
/// cores, and the upload does not wait for it.
pub(super) fn warm_page_cache(f: File, len: u64) {
    use std::sync::atomic::Ordering;
    if WARMING.fetch_add(1, Ordering::AcqRel) >= WARMING_MAX {
        WARMING.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let spawned = std::thread::Builder::new().name("kiln-warm".into()).spawn(move || {
        let asked = read_ahead(&f, 0, len);
        metrics::counter!(crate::metrics::CAS_READ_BACK_BYTES).increment(asked);
        WARMING.fetch_sub(1, Ordering::AcqRel);
    });
    if spawned.is_err() {
        WARMING.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_writer_leaves_exactly_the_bytes_written() {
        for total in [0, 1, ALIGN, STAGE, 5 * STAGE + 12_345] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            File::create(&path).unwrap();
            let Some(mut w) = SequentialWriter::open(&path).unwrap() else {
                // No O_DIRECT on this file system: callers write buffered (tested with them).
                return;
            };
            let data: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4099) as u8).collect();
            // Pieces of awkward sizes.
            let mut at = 0;
            for piece in [1, 4095, 3, 1 << 20, STAGE, 777].into_iter().cycle() {
                if at == data.len() {
                    break;
                }
                let end = (at + piece).min(data.len());
                w.write(&data[at..end]).unwrap();
                at = end;
            }
            w.flush().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{total} bytes");
            let (off, pending) = w.into_pending();
            assert_eq!(off + pending.len() as u64, data.len() as u64);
            assert_eq!(&pending[..], &data[off as usize..]);
        }
    }
}
