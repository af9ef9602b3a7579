//! A streaming upload: hashes and writes each chunk as it arrives, so memory stays bounded
//! whatever the blob size, and can be parked and resumed at the size it committed.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use bytes::Bytes;

use super::direct::{self, SequentialWriter};
use super::store::BlobStore;
use crate::digest::{BlobDigest, Hasher};
use crate::error::{KilnError, Result};

/// Plain uploads with at least this many bytes still to come hash on a thread of their own.
const HASH_THREAD_ABOVE: u64 = 8 << 20;
/// Chunks queued for the hashing thread at most: bounds the memory an upload holds.
const HASH_THREAD_QUEUE: usize = 4;
/// Uploads of blobs this large are written past the page cache ([`super::direct`]).
const DIRECT_ABOVE: u64 = 8 << 20;

/// The file being written, hashing as it goes and refusing bytes beyond the digest's size
/// (which also bounds what a zstd stream may expand to).
struct HashingFile {
    file: File,
    hasher: Hasher,
    written: u64,
    limit: u64,
    /// For a large plain upload: the thread hashing its chunks, which then holds the hasher.
    hashing: Option<HashThread>,
    /// For a large upload: the file's direct writer (`file` then holds only the result).
    direct: Option<SequentialWriter>,
    /// Some of the file was written directly: worth reading back into the page cache.
    wrote_direct: bool,
}

/// A thread hashing a large upload's chunks while the writer copies them into the file: the
/// two take about as long each, so the upload's critical path is the longer of them instead of
/// their sum.
struct HashThread {
    chunks: std::sync::mpsc::SyncSender<Bytes>,
    /// The hasher once every chunk is hashed; `None` if the thread never received it.
    done: std::thread::JoinHandle<Option<Hasher>>,
}

impl HashingFile {
    fn check_room(&self, n: usize) -> std::io::Result<()> {
        if self.written + n as u64 > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, SizeExceeded));
        }
        Ok(())
    }

    /// Writes `buf` at the end of the file: directly if this upload does, else through the
    /// page cache. The caller counts it as written.
    fn put(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let Some(d) = &mut self.direct else { return self.file.write_all_at(buf, self.written) };
        match d.write(buf) {
            Err(e) if direct::refused(&e) => {
                let done = self.fall_back_to_buffered(&e)?;
                // What of `buf` the direct writer had not taken.
                self.file.write_all_at(&buf[(done - self.written) as usize..], done)
            }
            r => r,
        }
    }

    /// After a refused direct write: writes what the direct writer held through the page
    /// cache, and the rest of the upload too. Returns the file's length.
    fn fall_back_to_buffered(&mut self, e: &std::io::Error) -> std::io::Result<u64> {
        tracing::warn!(error = %e, "a direct write of an upload was refused: writing it through the page cache");
        let (at, pending) = self.direct.take().expect("a direct writer").into_pending();
        self.file.write_all_at(&pending, at)?;
        Ok(at + pending.len() as u64)
    }

    /// Makes the file hold every byte written so far (a direct writer keeps up to a few
    /// MiB in memory). An upload parked and resumed goes on through the page cache.
    fn flush_direct(&mut self) -> std::io::Result<()> {
        let Some(d) = &mut self.direct else { return Ok(()) };
        match d.flush() {
            Ok(()) => {
                self.direct = None;
                Ok(())
            }
            Err(e) if direct::refused(&e) => {
                let len = self.fall_back_to_buffered(&e)?;
                self.file.set_len(len)
            }
            Err(e) => Err(e),
        }
    }

    /// Appends and hashes `buf` on this thread.
    fn append_in_place(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.check_room(buf.len())?;
        self.put(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        Ok(())
    }

    /// Appends a chunk the caller owns: hashed on the hashing thread if the upload is large
    /// (started here on first need), else in place.
    fn write_shared(&mut self, data: Bytes) -> std::io::Result<()> {
        self.check_room(data.len())?;
        if self.hashing.is_none() && self.limit - self.written >= HASH_THREAD_ABOVE {
            self.hashing = self.start_hash_thread();
        }
        let Some(t) = &self.hashing else { return self.append_in_place(&data) };
        t.chunks.send(data.clone()).map_err(|_| std::io::Error::other("the hashing thread stopped"))?;
        self.put(&data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Moves the hasher to a new thread; `None` (hash in place, the hasher kept) if no thread
    /// can be started. The hasher is handed over once the thread runs, so a failed start
    /// cannot take it along.
    fn start_hash_thread(&mut self) -> Option<HashThread> {
        let (chunks, rx) = std::sync::mpsc::sync_channel::<Bytes>(HASH_THREAD_QUEUE);
        let (give, take) = std::sync::mpsc::sync_channel::<Hasher>(1);
        let spawned = std::thread::Builder::new().name("kiln-hash".into()).spawn(move || {
            let mut hasher = take.recv().ok()?;
            for chunk in rx {
                hasher.update(&chunk);
            }
            Some(hasher)
        });
        match spawned {
            Ok(done) => {
                let placeholder = self.hasher.function().hasher();
                // Room for one: does not block; the thread holds `take` until it receives.
                let _ = give.send(std::mem::replace(&mut self.hasher, placeholder));
                Some(HashThread { chunks, done })
            }
            Err(e) => {
                tracing::warn!(error = %e, "no thread for hashing an upload: hashing in place");
                None
            }
        }
    }

    /// Takes the hasher back from the hashing thread, if there is one, once it has hashed
    /// every chunk sent; leaves every byte written so far in the file.
    fn settle(&mut self) -> Result<()> {
        self.flush_direct().map_err(|e| KilnError::io("writing an upload's temp file", e))?;
        if let Some(t) = self.hashing.take() {
            drop(t.chunks);
            self.hasher = t
                .done
                .join()
                .ok()
                .flatten()
                .ok_or_else(|| KilnError::Internal("upload hashing thread failed".into()))?;
        }
        Ok(())
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.hashing {
            // A borrowed chunk of an upload hashed on its own thread: the thread needs a copy.
            Some(_) => self.write_shared(Bytes::copy_from_slice(buf))?,
            None => self.append_in_place(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug)]
struct SizeExceeded;
impl std::fmt::Display for SizeExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("more data than the digest's size")
    }
}
impl std::error::Error for SizeExceeded {}

enum Sink {
    Plain(HashingFile),
    Zstd(Box<zstd::stream::write::Decoder<'static, HashingFile>>),
}

/// One upload in progress. Dropping it deletes its temp file.
pub struct UploadState {
    pub digest: BlobDigest,
    pub compressed: bool,
    /// Bytes received on the wire: ByteStream's `committed_size` (compressed bytes for a
    /// compressed upload).
    pub received: u64,
    sink: Option<Sink>,
    tmp: PathBuf,
}

impl Drop for UploadState {
    fn drop(&mut self) {
        // After a commit the temp path no longer exists (renamed); otherwise this removes it.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl UploadState {
    /// The temp file holding what was received so far.
    pub fn tmp_path(&self) -> &std::path::Path {
        &self.tmp
    }

    pub fn start(store: &BlobStore, digest: BlobDigest, compressed: bool) -> Result<Self> {
        let tmp = store.tmp_path();
        let file = File::create(&tmp).map_err(|e| KilnError::io(format!("creating {}", tmp.display()), e))?;
        let direct = if store.direct_writes() && digest.size >= DIRECT_ABOVE {
            SequentialWriter::open(&tmp).map_err(|e| KilnError::io(format!("opening {} for direct writes", tmp.display()), e))?
        } else {
            None
        };
        let wrote_direct = direct.is_some();
        let hf = HashingFile { file, hasher: digest.function.hasher(), written: 0, limit: digest.size, hashing: None, direct, wrote_direct };
        let sink = if compressed {
            let dec = zstd::stream::write::Decoder::new(hf).map_err(|e| KilnError::io("starting zstd decoder", e))?;
            Sink::Zstd(Box::new(dec))
        } else {
            Sink::Plain(hf)
        };
        Ok(Self { digest, compressed, received: 0, sink: Some(sink), tmp })
    }

    fn map_write_err(&self, e: std::io::Error) -> KilnError {
        let d = self.digest;
        if e.get_ref().is_some_and(|i| i.is::<SizeExceeded>()) {
            KilnError::invalid(format!("size mismatch for blob {d}: more than {} bytes were sent", d.size))
        } else if self.compressed && e.kind() != std::io::ErrorKind::StorageFull {
            KilnError::invalid(format!("zstd data of blob {d} does not decompress: {e}"))
        } else {
            KilnError::io(format!("writing blob {d}"), e)
        }
    }

    /// Appends `data` (compressed bytes for a compressed upload).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let r = match self.sink.as_mut().expect("sink present until finish") {
            Sink::Plain(f) => f.write_all(data),
            Sink::Zstd(d) => d.write_all(data),
        };
        r.map_err(|e| self.map_write_err(e))?;
        self.received += data.len() as u64;
        Ok(())
    }

    /// Appends `data` of a plain upload, or of a compressed one through [`Self::write`]. A large
    /// plain upload is hashed on a thread of its own meanwhile; [`Self::settle`] ends that.
    pub fn write_owned(&mut self, data: Bytes) -> Result<()> {
        let n = data.len() as u64;
        let r = match self.sink.as_mut().expect("sink present until finish") {
            Sink::Plain(f) => f.write_shared(data),
            Sink::Zstd(_) => return self.write(&data),
        };
        r.map_err(|e| self.map_write_err(e))?;
        self.received += n;
        Ok(())
    }

    /// Ends the hashing thread of [`Self::write_owned`], if any, and leaves every byte
    /// written so far in the temp file: for an upload parked between two Write calls, which
    /// must not hold a thread, and whose file a peer may read.
    pub fn settle(&mut self) -> Result<()> {
        match self.sink.as_mut() {
            Some(Sink::Plain(f)) => f.settle(),
            Some(Sink::Zstd(d)) => d.get_mut().settle(),
            None => Ok(()),
        }
    }

    /// Checks size and hash, then moves the blob into place.
    pub fn finish(mut self, store: &BlobStore) -> Result<()> {
        self.settle()?;
        let d = self.digest;
        let mut hf = match self.sink.take().expect("sink present until finish") {
            Sink::Plain(f) => f,
            Sink::Zstd(dec) => match dec.finish() {
                Ok(f) => f,
                Err(e) => return Err(self.map_write_err(e)),
            },
        };
        // What the decoder wrote out as it finished.
        hf.settle()?;
        if hf.written != d.size {
            return Err(KilnError::invalid(format!(
                "size mismatch for blob {d}: the digest says {} bytes, {} were sent",
                d.size, hf.written
            )));
        }
        let actual = hf.hasher.finalize();
        if actual != d.hash {
            return Err(KilnError::invalid(format!(
                "hash mismatch for blob {d}: the data hashes to {} with {}",
                hex::encode(actual),
                d.function.name()
            )));
        }
        let warm = if hf.wrote_direct { hf.file.try_clone().ok() } else { None };
        store.commit(&d, &self.tmp, hf.file)?;
        if let Some(f) = warm {
            direct::warm_page_cache(f, d.size);
        }
        Ok(())
    }
}
