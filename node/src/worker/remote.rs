//! The worker's CAS client: the few calls an action needs, with REAPI's size rules applied.
//!
//! Small blobs travel in `BatchReadBlobs`/`BatchUpdateBlobs` requests of at most
//! [`BATCH_BUDGET_BYTES`]; a blob over [`SMALL_BLOB_MAX_BYTES`] goes through ByteStream, streamed
//! from or to a file so that a big output or input is never whole in memory. Every byte that
//! comes back is hashed and checked against the digest it was asked for: the worker trusts its
//! cache, so it must never let a wrong byte into it.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest, FindMissingBlobsRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use super::ExecError;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::KilnError;

/// Blob bytes in one batch request. REAPI's usual `max_batch_total_size_bytes` (and Kiln's
/// default) is 4 MiB; [`BATCH_ENTRY_OVERHEAD_BYTES`] per blob is counted on top of the data so
/// that a server counting the whole message (not just the data, as Kiln does) also accepts it.
pub const BATCH_BUDGET_BYTES: u64 = 4 << 20;
/// Allowance per blob in a batch for its digest and framing.
pub const BATCH_ENTRY_OVERHEAD_BYTES: u64 = 256;
/// Largest blob moved by the batch calls; bigger ones are streamed through ByteStream. A
/// quarter of the budget keeps batches well filled and one batch's memory bounded.
pub const SMALL_BLOB_MAX_BYTES: u64 = 1 << 20;
/// Batch or ByteStream calls in flight at once for one action.
pub const TRANSFER_CONCURRENCY: usize = 4;
/// Bytes per ByteStream `WriteRequest`.
const WRITE_CHUNK_BYTES: usize = 256 << 10;
/// `WriteRequest`s buffered between the reader and the network, per upload.
pub const WRITE_PIPE_CHUNKS: usize = 4;
/// Digests per `FindMissingBlobs` request (about 100 bytes each on the wire).
const FIND_MISSING_CHUNK: usize = 10_000;
/// Largest blob read whole into memory (Action, Command, Directory messages).
pub const MAX_IN_MEMORY_BLOB_BYTES: u64 = 64 << 20;
/// Largest response message the worker decodes: a full batch plus framing.
const MAX_DECODING_MESSAGE_BYTES: usize = 16 << 20;

/// Runs `futures`, at most [`TRANSFER_CONCURRENCY`] at a time, and returns their outputs in
/// completion order.
///
/// The futures are boxed, so that one list can mix kinds (batches and streams), and own what
/// they use, so that the action's future stays `Send + 'static` for the bot's `tokio::spawn`.
pub async fn run_bounded<T>(futures: Vec<SendFuture<T>>) -> Vec<T> {
    futures::stream::iter(futures).buffer_unordered(TRANSFER_CONCURRENCY).collect().await
}

/// A boxed, owned, `Send` future, as [`run_bounded`] takes them.
pub type SendFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// A CAS endpoint seen from one action: channel, instance name and digest function.
#[derive(Clone)]
pub struct RemoteCas {
    cas: ContentAddressableStorageClient<Channel>,
    bs: ByteStreamClient<Channel>,
    instance: String,
    function: DigestFunction,
}

/// Splits `digests` into batches within [`BATCH_BUDGET_BYTES`]. Every digest must be at most
/// [`SMALL_BLOB_MAX_BYTES`].
pub fn batches(digests: impl IntoIterator<Item = BlobDigest>) -> Vec<Vec<BlobDigest>> {
    let mut out: Vec<Vec<BlobDigest>> = Vec::new();
    let mut used = BATCH_BUDGET_BYTES; // forces a first batch
    for d in digests {
        let cost = d.size + BATCH_ENTRY_OVERHEAD_BYTES;
        if used + cost > BATCH_BUDGET_BYTES {
            out.push(Vec::new());
            used = 0;
        }
        used += cost;
        out.last_mut().expect("a batch was just pushed").push(d);
    }
    out
}

impl RemoteCas {
    pub fn new(channel: Channel, instance: &str, function: DigestFunction) -> Self {
        Self {
            cas: ContentAddressableStorageClient::new(channel.clone()).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            bs: ByteStreamClient::new(channel).max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES),
            instance: instance.to_string(),
            function,
        }
    }

    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    fn read_resource(&self, d: &BlobDigest) -> String {
        match self.function {
            DigestFunction::Sha256 => format!("{}blobs/{}/{}", self.prefix(), d.hex(), d.size),
            f => format!("{}blobs/{}/{}/{}", self.prefix(), f.name(), d.hex(), d.size),
        }
    }

    fn write_resource(&self, d: &BlobDigest) -> String {
        let uuid = uuid::Uuid::new_v4();
        match self.function {
            DigestFunction::Sha256 => format!("{}uploads/{uuid}/blobs/{}/{}", self.prefix(), d.hex(), d.size),
            f => format!("{}uploads/{uuid}/blobs/{}/{}/{}", self.prefix(), f.name(), d.hex(), d.size),
        }
    }

    fn check(&self, d: &BlobDigest, data: &[u8]) -> Result<(), ExecError> {
        let got = self.function.digest_of(data);
        if got != *d {
            return Err(KilnError::Internal(format!("the CAS returned {got} when asked for blob {d}")).into());
        }
        Ok(())
    }

    /// Reads one batch of small blobs. Returns the found ones (verified) and the missing ones.
    pub async fn batch_read(&self, digests: Vec<BlobDigest>) -> Result<(Vec<(BlobDigest, Vec<u8>)>, Vec<BlobDigest>), ExecError> {
        let req = BatchReadBlobsRequest {
            instance_name: self.instance.clone(),
            digests: digests.iter().map(BlobDigest::to_proto).collect(),
            acceptable_compressors: vec![],
            digest_function: self.function.to_proto(),
        };
        let resp = self
            .cas
            .clone()
            .batch_read_blobs(req)
            .await
            .map_err(|s| ExecError::remote(format!("BatchReadBlobs of {} blobs", digests.len()), &s))?
            .into_inner();
        let asked: HashSet<BlobDigest> = digests.iter().copied().collect();
        let mut answered = HashSet::with_capacity(asked.len());
        let mut found = Vec::with_capacity(digests.len());
        let mut missing = Vec::new();
        for r in resp.responses {
            let d = BlobDigest::from_proto_opt(self.function, r.digest.as_ref())
                .map_err(|e| KilnError::Internal(format!("BatchReadBlobs answered with a bad digest: {e}")))?;
            if !asked.contains(&d) || !answered.insert(d) {
                return Err(KilnError::Internal(format!("BatchReadBlobs answered with blob {d}, which was not asked for")).into());
            }
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code == tonic::Code::NotFound as i32 {
                missing.push(d);
            } else if code != 0 {
                let msg = r.status.map(|s| s.message).unwrap_or_default();
                return Err(ExecError::Remote {
                    context: format!("BatchReadBlobs of blob {d}"),
                    code: tonic::Code::from_i32(code),
                    message: msg,
                });
            } else {
                if r.compressor != 0 {
                    return Err(
                        KilnError::Internal(format!("blob {d} came back compressed ({}) though none was accepted", r.compressor)).into()
                    );
                }
                self.check(&d, &r.data)?;
                found.push((d, r.data));
            }
        }
        // A blob the server left out of its answer is as good as missing.
        missing.extend(asked.difference(&answered).copied());
        Ok((found, missing))
    }

    /// Streams one blob into `path` (created or truncated), verifying it. `Ok(false)` if the
    /// CAS does not have it.
    pub async fn read_to_file(&self, d: &BlobDigest, path: &Path) -> Result<bool, ExecError> {
        let mut file = tokio::fs::File::create(path).await.map_err(|e| KilnError::io(format!("create {}", path.display()), e))?;
        let req = ReadRequest { resource_name: self.read_resource(d), read_offset: 0, read_limit: 0 };
        let context = || format!("ByteStream Read of blob {d}");
        let mut stream = match self.bs.clone().read(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(false),
            Err(s) => return Err(ExecError::remote(context(), &s)),
        };
        let mut hasher = self.function.hasher();
        let mut len = 0u64;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound && len == 0 => return Ok(false),
                Err(s) => return Err(ExecError::remote(context(), &s)),
            };
            len += msg.data.len() as u64;
            if len > d.size {
                return Err(KilnError::Internal(format!("the CAS sent more than {} bytes for blob {d}", d.size)).into());
            }
            hasher.update(&msg.data);
            file.write_all(&msg.data).await.map_err(|e| KilnError::io(format!("write {}", path.display()), e))?;
        }
        file.flush().await.map_err(|e| KilnError::io(format!("write {}", path.display()), e))?;
        let got = BlobDigest { function: self.function, hash: hasher.finalize(), size: len };
        if got != *d {
            return Err(KilnError::Internal(format!("the CAS returned {got} when asked for blob {d}")).into());
        }
        Ok(true)
    }

    /// Streams one blob into memory, verifying it. `Ok(None)` if the CAS does not have it.
    async fn read_to_vec(&self, d: &BlobDigest) -> Result<Option<Vec<u8>>, ExecError> {
        if d.size > MAX_IN_MEMORY_BLOB_BYTES {
            return Err(KilnError::invalid(format!(
                "blob {d} is over {MAX_IN_MEMORY_BLOB_BYTES} bytes, too big for an Action, Command or Directory"
            ))
            .into());
        }
        let req = ReadRequest { resource_name: self.read_resource(d), read_offset: 0, read_limit: 0 };
        let context = || format!("ByteStream Read of blob {d}");
        let mut stream = match self.bs.clone().read(req).await {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(ExecError::remote(context(), &s)),
        };
        let mut out = Vec::with_capacity(d.size as usize);
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    if (out.len() + m.data.len()) as u64 > d.size {
                        return Err(KilnError::Internal(format!("the CAS sent more than {} bytes for blob {d}", d.size)).into());
                    }
                    out.extend_from_slice(&m.data);
                }
                Ok(None) => break,
                Err(s) if s.code() == tonic::Code::NotFound && out.is_empty() => return Ok(None),
                Err(s) => return Err(ExecError::remote(context(), &s)),
            }
        }
        self.check(d, &out)?;
        Ok(Some(out))
    }

    /// Fetches blobs into memory (Action, Command, Directory messages), small ones batched.
    /// `what` names them in the error if some are missing.
    /// Every missing blob is reported at once (`KilnError::MissingBlobs`).
    pub async fn fetch_to_memory(&self, what: &str, digests: &[BlobDigest]) -> Result<HashMap<BlobDigest, Vec<u8>>, ExecError> {
        let mut unique: Vec<BlobDigest> = digests.to_vec();
        unique.sort();
        unique.dedup();
        let mut out = HashMap::with_capacity(unique.len());
        let empty = self.function.empty();
        let (small, big): (Vec<BlobDigest>, Vec<BlobDigest>) =
            unique.into_iter().filter(|d| *d != empty).partition(|d| d.size <= SMALL_BLOB_MAX_BYTES);
        if digests.contains(&empty) {
            out.insert(empty, Vec::new());
        }
        let mut missing = Vec::new();
        let reads: Vec<SendFuture<_>> = batches(small)
            .into_iter()
            .map(|b| {
                let this = self.clone();
                Box::pin(async move { this.batch_read(b).await }) as SendFuture<_>
            })
            .collect();
        for r in run_bounded(reads).await {
            let (found, miss) = r?;
            missing.extend(miss);
            out.extend(found);
        }
        let reads: Vec<SendFuture<_>> = big
            .into_iter()
            .map(|d| {
                let this = self.clone();
                Box::pin(async move { this.read_to_vec(&d).await.map(|v| (d, v)) }) as SendFuture<_>
            })
            .collect();
        let big_results = run_bounded(reads).await.into_iter().collect::<Result<Vec<_>, ExecError>>()?;
        for (d, v) in big_results {
            match v {
                Some(v) => {
                    out.insert(d, v);
                }
                None => missing.push(d),
            }
        }
        if !missing.is_empty() {
            return Err(ExecError::missing(what, missing));
        }
        let fetched: u64 = out.values().map(|v| v.len() as u64).sum();
        metrics::counter!(super::BYTES_FETCHED).increment(fetched);
        Ok(out)
    }

    /// The digests among `digests` that the CAS lacks.
    pub async fn find_missing(&self, digests: &[BlobDigest]) -> Result<Vec<BlobDigest>, ExecError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(FIND_MISSING_CHUNK) {
            let req = FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: chunk.iter().map(BlobDigest::to_proto).collect(),
                digest_function: self.function.to_proto(),
            };
            let resp = self
                .cas
                .clone()
                .find_missing_blobs(req)
                .await
                .map_err(|s| ExecError::remote(format!("FindMissingBlobs of {} blobs", chunk.len()), &s))?
                .into_inner();
            for d in resp.missing_blob_digests {
                let d = BlobDigest::from_proto(self.function, &d)
                    .map_err(|e| KilnError::Internal(format!("FindMissingBlobs answered with a bad digest: {e}")))?;
                missing.push(d);
            }
        }
        Ok(missing)
    }

    /// Uploads one batch of small blobs; every entry must succeed.
    pub async fn batch_update(&self, blobs: Vec<(BlobDigest, Vec<u8>)>) -> Result<(), ExecError> {
        let n = blobs.len();
        let bytes: u64 = blobs.iter().map(|(d, _)| d.size).sum();
        let requests = blobs
            .into_iter()
            .map(|(d, data)| batch_update_blobs_request::Request { digest: Some(d.to_proto()), data, compressor: 0 })
            .collect();
        let req = BatchUpdateBlobsRequest { instance_name: self.instance.clone(), requests, digest_function: self.function.to_proto() };
        let resp = self
            .cas
            .clone()
            .batch_update_blobs(req)
            .await
            .map_err(|s| ExecError::remote(format!("BatchUpdateBlobs of {n} blobs"), &s))?
            .into_inner();
        for r in resp.responses {
            let status = r.status.unwrap_or_default();
            if status.code != 0 {
                let d = r.digest.map(|d| format!("{}/{}", d.hash, d.size_bytes)).unwrap_or_default();
                return Err(ExecError::Remote {
                    context: format!("BatchUpdateBlobs of blob {d}"),
                    code: tonic::Code::from_i32(status.code),
                    message: status.message,
                });
            }
        }
        metrics::counter!(super::BYTES_UPLOADED).increment(bytes);
        Ok(())
    }

    /// [`Self::write`] as a [`SendFuture`].
    pub fn write_boxed(self, d: BlobDigest, source: BlobSource) -> SendFuture<Result<(), ExecError>> {
        Box::pin(self.write(d, source))
    }

    /// Uploads one blob through ByteStream `Write`, streamed: a reader feeds the request
    /// stream through a channel of [`WRITE_PIPE_CHUNKS`] chunks, so a big file is never whole
    /// in memory.
    ///
    /// A channel rather than a `BoxStream` or `stream::unfold`: with those, rustc cannot prove
    /// tonic's client-streaming future `Send` for every lifetime ("higher-ranked lifetime
    /// error"), and the bot loop must `tokio::spawn` the action.
    pub async fn write(self, d: BlobDigest, source: BlobSource) -> Result<(), ExecError> {
        let context = format!("ByteStream Write of blob {d} from {source}");
        let (tx, rx) = tokio::sync::mpsc::channel(WRITE_PIPE_CHUNKS);
        let resource = self.write_resource(&d);
        let producer = async move {
            match source {
                BlobSource::Bytes(b) => pump(std::io::Cursor::new(b), d, resource, tx).await,
                BlobSource::File(path) => {
                    let f = tokio::fs::File::open(&path).await.map_err(|e| KilnError::io(format!("open {}", path.display()), e))?;
                    pump(f, d, resource, tx).await.map_err(|e| KilnError::Internal(format!("{}: {e}", path.display())))
                }
            }
        };
        let mut bs = self.bs.clone();
        let (produced, resp) = tokio::join!(producer, bs.write(tokio_stream::wrappers::ReceiverStream::new(rx)));
        // The reader's error says more than the server's complaint about a short stream.
        produced?;
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(ExecError::remote(context, &s)),
        };
        if resp.committed_size != d.size as i64 {
            return Err(KilnError::Internal(format!("{context} committed {} bytes, not {}", resp.committed_size, d.size)).into());
        }
        metrics::counter!(super::BYTES_UPLOADED).increment(d.size);
        Ok(())
    }
}

/// Reads exactly `d.size` bytes from `r` into write requests. Stops quietly if the receiver
/// is gone (the call failed; its error is reported by the caller).
async fn pump<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    d: BlobDigest,
    resource: String,
    tx: tokio::sync::mpsc::Sender<WriteRequest>,
) -> crate::error::Result<()> {
    let mut offset = 0u64;
    let mut resource = Some(resource);
    while offset < d.size {
        let len = (d.size - offset).min(WRITE_CHUNK_BYTES as u64) as usize;
        let mut data = vec![0u8; len];
        r.read_exact(&mut data).await.map_err(|e| KilnError::io(format!("read {len} bytes at offset {offset} of blob {d}"), e))?;
        let next = offset + len as u64;
        let req = WriteRequest {
            resource_name: resource.take().unwrap_or_default(),
            write_offset: offset as i64,
            finish_write: next == d.size,
            data,
        };
        if tx.send(req).await.is_err() {
            return Ok(());
        }
        offset = next;
    }
    Ok(())
}

/// Where the bytes of a blob to upload are.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// A file in the action directory, read when uploaded.
    File(std::path::PathBuf),
    /// Bytes built by the worker (a `Tree` or `Directory` message).
    Bytes(bytes::Bytes),
}

impl BlobSource {
    /// The bytes of a small blob, checked against its size. Blocking for a file.
    pub fn read_small(&self, d: &BlobDigest) -> crate::error::Result<Vec<u8>> {
        let data = match self {
            BlobSource::Bytes(b) => b.to_vec(),
            BlobSource::File(p) => std::fs::read(p).map_err(|e| KilnError::io(format!("read {}", p.display()), e))?,
        };
        if data.len() as u64 != d.size {
            return Err(KilnError::Internal(format!("{self} now holds {} bytes, not blob {d}", data.len())));
        }
        Ok(data)
    }
}

impl std::fmt::Display for BlobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobSource::File(p) => write!(f, "{}", p.display()),
            BlobSource::Bytes(_) => write!(f, "memory"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_within_the_budget_and_keep_every_digest() {
        let f = DigestFunction::Sha256;
        let ds: Vec<BlobDigest> =
            (0..40u64).map(|i| BlobDigest { function: f, hash: [i as u8; 32], size: (i * 37_000) % SMALL_BLOB_MAX_BYTES + 1 }).collect();
        let bs = batches(ds.clone());
        for b in &bs {
            let cost: u64 = b.iter().map(|d| d.size + BATCH_ENTRY_OVERHEAD_BYTES).sum();
            assert!(cost <= BATCH_BUDGET_BYTES, "{cost}");
            assert!(!b.is_empty());
        }
        assert_eq!(bs.concat(), ds);
        assert!(batches(Vec::new()).is_empty());
    }
}
