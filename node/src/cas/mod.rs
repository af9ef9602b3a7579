//! # Content-addressable storage on one node
//!
//! [`BlobStore`] owns the blobs of this node: large ones in files of their own under
//! `<data>/cas/<function>/<xx>/<hash>`, small ones stored whole appended to pack files under
//! `<data>/cas/packs` (see `pack.rs`), a sled index (size, last access, which boot verified it,
//! where a packed blob lies; eviction goes by its access times), a memory tier of small hot
//! blobs, and unfinished uploads kept for resumption. Bulk writes (a batch's pack append, a
//! large upload) go past the page cache (`direct.rs`).
//!
//! Invariants (each enforced in `store.rs` and tested in `node/tests/`):
//! - A blob exists once its index entry does, and the entry is written only after the bytes,
//!   whose hash was checked: readers never see a half-written blob.
//! - A blob whose bytes no longer match its digest is never served: each blob is re-hashed on
//!   its first read after a restart (the only window in which a torn write can exist) and dropped
//!   if it does not match. Blob files and pack records a crash kept out of the index are found
//!   by a start-up scan and indexed as not yet verified.
//! - A blob touched within the protect window is never evicted, so a build told a blob exists
//!   can still read it (REAPI's lifetime rule). When nothing can be evicted a write fails with
//!   RESOURCE_EXHAUSTED rather than breaking that promise.
//! - Memory stays bounded whatever the blob size: uploads are hashed and written chunk by chunk
//!   on a blocking thread, reads are streamed from the file in fixed-size chunks.

mod absent;
mod direct;
mod memory;
mod pack;
mod presence;
mod read;
mod store;
mod upload;

pub use read::{stream_blob, BlobChunks, READ_CHUNK_BYTES};
pub use store::{check_content, BlobStore, OpenBlob};
pub use upload::UploadState;
