//! Streaming reads: a blocking thread reads fixed-size chunks (zstd-compressing them for
//! `compressed-blobs` reads) into a bounded channel, so a large blob never sits in memory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::store::{BlobStore, OpenBlob};
use crate::digest::BlobDigest;
use crate::error::{KilnError, Result};

/// Size of one ByteStream read chunk: large enough to amortize per-message costs, well under
/// gRPC's 4 MiB default message limit of clients.
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// Chunks buffered between the reading thread and the network: bounds memory per read.
const READ_AHEAD_CHUNKS: usize = 4;
/// How far ahead of the chunk being mapped a blob file's read asks the kernel to read.
const READ_AHEAD_BYTES: u64 = 8 << 20;
/// zstd level for compressed reads: fast, since it runs per read.
const ZSTD_LEVEL: i32 = 1;

pub type BlobChunks = mpsc::Receiver<Result<Bytes>>;

/// Opens `d` and streams bytes `[offset, offset + limit)` (limit 0 = to the end) of the blob,
/// or of its zstd encoding when `compressed`. `Ok(None)` if the blob is not stored.
/// Offset and limit are checked against the size here: OUT_OF_RANGE past the end.
pub async fn stream_blob(
    store: &BlobStore,
    d: BlobDigest,
    offset: u64,
    limit: u64,
    compressed: bool,
) -> Result<Option<BlobChunks>> {
    let s = store.clone();
    let opened = tokio::task::spawn_blocking(move || s.open_blob(&d))
        .await
        .map_err(|e| KilnError::Internal(format!("read task: {e}")))??;
    let Some(blob) = opened else { return Ok(None) };
    if !compressed && offset > d.size {
        return Err(KilnError::OutOfRange(format!(
            "read_offset {offset} is beyond the size {} of blob {d}",
            d.size
        )));
    }
    let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let result = if compressed {
            let reader: Box<dyn Read + Send> = match blob {
                OpenBlob::Memory(b) => Box::new(std::io::Cursor::new(b)),
                OpenBlob::File(f, _) => Box::new(f),
            };
            match zstd::stream::read::Encoder::new(reader, ZSTD_LEVEL) {
                Ok(enc) => pump(enc, &d, offset, limit, true, &tx),
                Err(e) => Err(KilnError::io("starting zstd encoder", e)),
            }
        } else {
            match blob {
                OpenBlob::Memory(b) => {
                    let end = if limit == 0 { b.len() } else { (offset.saturating_add(limit)).min(b.len() as u64) as usize };
                    let mut pos = offset as usize;
                    while pos < end {
                        let next = (pos + READ_CHUNK_BYTES).min(end);
                        if tx.blocking_send(Ok(b.slice(pos..next))).is_err() {
                            return;
                        }
                        pos = next;
                    }
                    Ok(())
                }
                OpenBlob::File(f, size) => pump_mapped(&f, size, &d, offset, limit, &tx),
            }
        };
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(Some(rx))
}

/// Sends bytes `[offset, offset + limit)` of the blob file `f` (`size` bytes) as chunks mapped
/// from the page cache: the bytes go from there to the socket, not through a buffer of ours
/// first (that copy was a sixth of a large read's time).
///
/// Each chunk is mapped, populated with `MADV_POPULATE_READ` (which, unlike `MAP_POPULATE`,
/// reports a failed disk read as an error instead of leaving it to a later access) and
/// unmapped when the network is done with it.
#[allow(unsafe_code)]
fn pump_mapped(f: &File, size: u64, d: &BlobDigest, offset: u64, limit: u64, tx: &mpsc::Sender<Result<Bytes>>) -> Result<()> {
    let end = if limit == 0 { size } else { offset.saturating_add(limit).min(size) };
    let on_disk = f.metadata().map_err(|e| KilnError::io(format!("reading blob {d}"), e))?.len();
    if on_disk < end {
        return Err(KilnError::Internal(format!("blob file of {d} holds {on_disk} bytes, {end} expected")));
    }
    let mut pos = offset;
    let mut advised = offset;
    while pos < end {
        // Large blobs are written past the page cache (`super::direct`): the first read of one
        // comes from the disk, which then reads ahead of the chunk being sent.
        let ahead = end.min(pos + READ_AHEAD_BYTES);
        if advised < ahead {
            super::direct::read_ahead(f, advised, ahead);
            advised = ahead;
        }
        let n = (READ_CHUNK_BYTES as u64).min(end - pos) as usize;
        // SAFETY: a blob file is complete before it can be opened for reading (written under a
        // temporary name and renamed into place, or created at its path before its index entry
        // exists) and from then on is only read, replaced by a rename or unlinked (a mapping
        // keeps the old inode), never truncated or rewritten; its length was checked above. So
        // the mapping stays valid and its bytes unchanged.
        let map = match unsafe { memmap2::MmapOptions::new().offset(pos).len(n).map(f) } {
            Ok(m) => m,
            // A file system that cannot map files: read the rest into buffers.
            Err(e) if pos == offset => {
                tracing::debug!(digest = %d, error = %e, "blob file cannot be mapped: read instead");
                let mut reader = f;
                reader.seek(SeekFrom::Start(pos)).map_err(|e| KilnError::io(format!("seeking in blob {d}"), e))?;
                return pump(reader, d, 0, end - pos, false, tx);
            }
            Err(e) => return Err(KilnError::io(format!("mapping blob {d}"), e)),
        };
        match map.advise(memmap2::Advice::PopulateRead) {
            Ok(()) => {}
            // Kernels before 5.14: the pages come in as the socket write touches them.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {}
            Err(e) => return Err(KilnError::io(format!("reading blob {d}"), e)),
        }
        if tx.blocking_send(Ok(Bytes::from_owner(map))).is_err() {
            return Ok(()); // the client went away
        }
        pos += n as u64;
    }
    Ok(())
}

/// Copies `reader` into the channel in chunks, skipping `skip` bytes first and stopping after
/// `limit` bytes (0 = no limit).
fn pump(
    mut reader: impl Read,
    d: &BlobDigest,
    mut skip: u64,
    limit: u64,
    compressed: bool,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    let mut remaining = if limit == 0 { u64::MAX } else { limit };
    let mut sent_any = false;
    loop {
        let want = (READ_CHUNK_BYTES as u64).min(remaining.saturating_add(skip)) as usize;
        if want == 0 {
            return Ok(());
        }
        // Read into spare capacity: a file fills it without the buffer being zeroed first.
        let mut buf = Vec::with_capacity(want);
        (&mut reader)
            .take(want as u64)
            .read_to_end(&mut buf)
            .map_err(|e| KilnError::io(format!("reading blob {d}"), e))?;
        let filled = buf.len();
        let mut chunk = Bytes::from(buf);
        if skip > 0 {
            let s = skip.min(chunk.len() as u64) as usize;
            chunk = chunk.slice(s..);
            skip -= s as u64;
        }
        if filled == 0 {
            if skip > 0 && compressed && !sent_any {
                return Err(KilnError::OutOfRange(format!(
                    "read_offset is beyond the end of the compressed encoding of blob {d}"
                )));
            }
            return Ok(());
        }
        if !chunk.is_empty() {
            let take = (chunk.len() as u64).min(remaining) as usize;
            remaining -= take as u64;
            sent_any = true;
            if tx.blocking_send(Ok(chunk.slice(..take))).is_err() {
                return Ok(()); // the client went away
            }
        }
        if remaining == 0 {
            return Ok(());
        }
    }
}
