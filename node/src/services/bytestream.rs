//! google.bytestream.ByteStream over the CAS: streamed reads with offset and limit, resumable
//! streamed writes, and `compressed-blobs/zstd` for both.
//!
//! A Write runs as two halves joined by a bounded channel: the async half validates offsets
//! and forwards each chunk; a blocking thread decompresses, hashes and writes it to a temp
//! file. The network and the hashing overlap on two cores, and memory per upload is bounded by
//! the channel, whatever the blob size. A Write that ends without `finish_write` parks its state
//! so that a later Write from `QueryWriteStatus`' committed size resumes it.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};
use bytes::Bytes;
use kiln_proto::bytestream::{QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteResponse};
use kiln_proto::bytestream_server::{ByteStream, WriteRequest};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, observe};
use crate::cas::{stream_blob, BlobChunks, UploadState};
use crate::error::{KilnError, Result};
use crate::metrics as m;
use crate::logstream;
use crate::resource::{parse_read, parse_write, BlobResource};
use crate::server::NodeState;
use crate::digest::BlobDigest;
use crate::storage::Tee;

/// Chunks in flight between the network and the writing thread.
const WRITE_PIPE_CHUNKS: usize = 16;

pub struct ByteStreamService {
    state: Arc<NodeState>,
}

impl ByteStreamService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

enum PipeMsg {
    Data(Bytes),
    Finish,
}

/// How the writing thread ended.
enum PipeEnd {
    Committed(u64),
    Open(UploadState),
    Failed(KilnError),
}

impl ByteStreamService {
    async fn read(&self, req: ReadRequest) -> Result<ReadStream> {
        let chunks = self.open_read(&req).await?;
        let s = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|c| match c {
            Ok(b) => {
                metrics::counter!(m::CAS_BYTES_READ).increment(b.len() as u64);
                Ok(ReadResponse { data: b.to_vec() })
            }
            Err(e) => Err(Status::from(e)),
        });
        Ok(Box::pin(s))
    }

    /// Checks a blob Read and starts streaming the requested range: the chunks, each sent as
    /// one ReadResponse.
    pub(super) async fn open_read(&self, req: &ReadRequest) -> Result<BlobChunks> {
        let res = parse_read(&req.resource_name)?;
        super::check_instance_name(&res.instance_name)?;
        let d = res.digest;
        if req.read_offset < 0 {
            return Err(KilnError::OutOfRange(format!("read_offset {} is negative (blob {d})", req.read_offset)));
        }
        if req.read_limit < 0 {
            return Err(KilnError::invalid(format!("read_limit {} is negative (blob {d})", req.read_limit)));
        }
        // A large blob this node does not hold, read whole, is relayed from an owner; any other
        // is fetched from its owners first.
        let storage = &self.state.storage;
        if !storage.holds_here(&d).await? {
            let whole = req.read_offset == 0 && req.read_limit == 0 && !res.compressed;
            if whole {
                if let Some(chunks) = storage.relay_read(&d).await? {
                    return Ok(chunks);
                }
            }
            if !storage.fetch_here(&d).await? {
                return Err(KilnError::BlobNotFound(d));
            }
        }
        stream_blob(&self.state.cas, d, req.read_offset as u64, req.read_limit as u64, res.compressed)
            .await?
            .ok_or(KilnError::BlobNotFound(d))
    }

    async fn write(&self, mut stream: Streaming<WriteRequest>) -> Result<WriteResponse> {
        let first = stream
            .message()
            .await
            .map_err(|e| KilnError::invalid(format!("write stream failed before its first message: {e}")))?
            .ok_or_else(|| KilnError::invalid("write stream has no message"))?;
        if let Some(is_write_name) = logstream::classify(&first.resource_name) {
            if !is_write_name {
                return Err(KilnError::invalid(format!(
                    "{:?} is a log stream's name; write to its write_resource_name",
                    first.resource_name
                )));
            }
            return self.write_log(first, stream).await;
        }
        let res = parse_write(&first.resource_name)?;
        super::check_instance_name(&res.instance_name)?;
        let d = res.digest;
        let upload_key = res.upload_key.clone().unwrap_or_default();
        tracing::Span::current().record("digest", tracing::field::display(&d));
        let cas = self.state.cas.clone();
        let present = d.is_empty_blob() || self.state.storage.find_missing(vec![d]).await?.is_empty();
        if first.write_offset < 0 {
            return Err(KilnError::OutOfRange(format!("write_offset {} is negative (blob {d})", first.write_offset)));
        }
        if present {
            // Someone already stored this blob: finish at once, as REAPI prescribes.
            drop(cas.take_upload(&upload_key));
            return Ok(WriteResponse { committed_size: full_size(&res) });
        }
        let offset = first.write_offset as u64;
        // A fresh plain upload goes to the blob's other owners as it arrives; one this node
        // does not own needs no copy here at all.
        let mut tee = None;
        if offset == 0 && !res.compressed {
            if let Some(t) = self.state.storage.tee(&d, &upload_key) {
                if t.forwards_only() {
                    drop(cas.take_upload(&upload_key));
                    return self.forward_upload(first, stream, t, d, &upload_key).await;
                }
                tee = Some(t);
            }
        }
        let mut parked = cas.take_upload(&upload_key);
        if parked.is_none() && offset > 0 && !res.compressed {
            // Cut off on another node: continue from what that node received.
            parked = self.state.storage.adopt_remote_upload(&upload_key, d).await?;
        }
        let mut state = match (offset, parked) {
            (0, _) => {
                let cas = cas.clone();
                let compressed = res.compressed;
                blocking(move || UploadState::start(&cas, d, compressed)).await?
            }
            (o, Some(s)) if o <= s.received => s,
            (o, parked) => {
                let committed = parked.as_ref().map_or(0, |s| s.received);
                if let Some(s) = parked {
                    cas.park_upload(upload_key.clone(), s);
                }
                return Err(KilnError::OutOfRange(format!(
                    "write_offset {o} is beyond the committed size {committed} of upload {:?}",
                    first.resource_name
                )));
            }
        };
        // A resumed Write may start before the committed size: skip the bytes we already have.
        let mut skip = state.received - offset;
        let mut expected = offset;
        let (tx, mut rx) = mpsc::channel::<PipeMsg>(WRITE_PIPE_CHUNKS);
        let writer_cas = cas.clone();
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    PipeMsg::Data(b) => {
                        if let Err(e) = state.write_owned(b) {
                            return PipeEnd::Failed(e);
                        }
                    }
                    PipeMsg::Finish => {
                        let received = state.received;
                        return match state.finish(&writer_cas) {
                            Ok(()) => PipeEnd::Committed(received),
                            Err(e) => PipeEnd::Failed(e),
                        };
                    }
                }
            }
            // Parked for a later Write (or dropped): without its hashing thread.
            match state.settle() {
                Ok(()) => PipeEnd::Open(state),
                Err(e) => PipeEnd::Failed(e),
            }
        });
        let mut msg = Some(first);
        let mut stream_error: Option<KilnError> = None;
        while let Some(m) = msg.take() {
            if let Err(e) = check_next(&m, &upload_key, expected, &d) {
                stream_error = Some(e);
                break;
            }
            expected += m.data.len() as u64;
            let mut data = m.data;
            if skip > 0 {
                let s = skip.min(data.len() as u64) as usize;
                bytes::Buf::advance(&mut data, s);
                skip -= s as u64;
            }
            if let (Some(t), false) = (tee.as_mut(), data.is_empty()) {
                t.send(data.clone()).await;
            }
            if !data.is_empty() && tx.send(PipeMsg::Data(data)).await.is_err() {
                break; // the writer failed; its error is collected below
            }
            if m.finish_write {
                if let Some(t) = tee.as_mut() {
                    t.close();
                }
                let _ = tx.send(PipeMsg::Finish).await;
                break;
            }
            match stream.message().await {
                Ok(Some(next)) => msg = Some(next),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "write stream broke; upload parked for resumption");
                    break;
                }
            }
        }
        drop(tx);
        let end = writer.await.map_err(|e| KilnError::Internal(format!("write task failed: {e}")))?;
        match (end, stream_error) {
            (PipeEnd::Committed(n), _) => {
                // Acknowledged only once the owners hold it too.
                let stored = match tee.take() {
                    Some(t) => t.finish().await.stored,
                    None => Vec::new(),
                };
                self.state.storage.replicate_except(&d, &stored).await?;
                Ok(WriteResponse { committed_size: n as i64 })
            }
            (PipeEnd::Failed(e), _) => {
                if let Some(t) = tee.take() {
                    t.abort();
                }
                Err(e)
            }
            (PipeEnd::Open(s), err) => {
                // Parked here (or refused): the owners' part is dropped.
                if let Some(t) = tee.take() {
                    t.abort();
                }
                let received = s.received;
                if err.is_none() && received > 0 {
                    cas.park_upload(upload_key, s);
                }
                match err {
                    Some(e) => Err(e),
                    None => Ok(WriteResponse { committed_size: received as i64 }),
                }
            }
        }
    }

    /// A fresh plain upload of a blob this node does not own, forwarded to its owners as it
    /// arrives ([`Tee`]) without a copy here. Acknowledged once an owner has stored it (owners
    /// that missed it are covered as for any write); cut off, it stays parked on the owners under
    /// its upload key, for a Write through any node to resume.
    async fn forward_upload(
        &self,
        first: WriteRequest,
        mut stream: Streaming<WriteRequest>,
        mut tee: Tee,
        d: BlobDigest,
        upload_key: &str,
    ) -> Result<WriteResponse> {
        let mut expected = 0u64;
        let mut finished = false;
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            if let Err(e) = check_next(&m, upload_key, expected, &d) {
                tee.abort();
                return Err(e);
            }
            expected += m.data.len() as u64;
            if expected > d.size {
                tee.abort();
                return Err(KilnError::invalid(format!("size mismatch for blob {d}: more than {} bytes were sent", d.size)));
            }
            tee.send(m.data).await;
            if tee.live() == 0 {
                break; // every owner answered (stored it, or failed): see below
            }
            if m.finish_write {
                finished = true;
                break;
            }
            match stream.message().await {
                Ok(Some(next)) => msg = Some(next),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "write stream broke; upload parked on the owners"),
            }
        }
        if finished && expected != d.size {
            tee.abort();
            return Err(KilnError::invalid(format!(
                "size mismatch for blob {d}: the digest says {} bytes, {expected} were sent",
                d.size
            )));
        }
        let out = tee.finish().await;
        if !out.stored.is_empty() {
            self.state.storage.cover_missed_owners(&d, &out.stored).await;
            return Ok(WriteResponse { committed_size: d.size as i64 });
        }
        if let Some(e) = out.error {
            return Err(e);
        }
        if finished {
            return Err(KilnError::Unavailable(format!("no owner of blob {d} stored it")));
        }
        Ok(WriteResponse { committed_size: out.parked as i64 })
    }

    async fn query_write_status(&self, req: QueryWriteStatusRequest) -> Result<QueryWriteStatusResponse> {
        if logstream::classify(&req.resource_name) == Some(true) {
            let buf = self.state.logs.for_write(&req.resource_name)?;
            let (size, finished) = *buf.subscribe().borrow();
            return Ok(QueryWriteStatusResponse { committed_size: size as i64, complete: finished });
        }
        let res = parse_write(&req.resource_name)?;
        let d = res.digest;
        if d.is_empty_blob() || self.state.storage.find_missing(vec![d]).await?.is_empty() {
            return Ok(QueryWriteStatusResponse { committed_size: full_size(&res), complete: true });
        }
        let key = res.upload_key.unwrap_or_default();
        let committed = match self.state.cas.parked_upload_size(&key) {
            Some(n) => n,
            None if !res.compressed => self.state.storage.remote_upload_status(&key).await.map_or(0, |(_, n)| n),
            None => 0,
        };
        Ok(QueryWriteStatusResponse { committed_size: committed as i64, complete: false })
    }
}

/// Checks a Write's next message against the stream so far: the same upload, the next offset.
fn check_next(m: &WriteRequest, upload_key: &str, expected: u64, d: &BlobDigest) -> Result<()> {
    if !m.resource_name.is_empty() && !m.resource_name.starts_with(upload_key) {
        return Err(KilnError::invalid(format!("resource_name changed within one Write: {:?}", m.resource_name)));
    }
    if m.write_offset as u64 != expected {
        return Err(KilnError::invalid(format!(
            "write_offset {} does not follow the {} bytes sent so far on this stream (blob {d})",
            m.write_offset, expected
        )));
    }
    Ok(())
}

// ---- Log streams ----------------------------------------------------------------------------

/// Request metadata set on a read forwarded to another node: answer from local state only.
const LOCAL_ONLY: &str = "x-kiln-local-only";
/// Bytes per ReadResponse of a log stream.
const LOG_CHUNK: usize = 64 << 10;

impl ByteStreamService {
    /// A log stream's bytes from `read_offset`, then more as they are written, until the
    /// writer finishes (or `read_limit` bytes were sent).
    async fn read_log(&self, req: ReadRequest, local_only: bool) -> Result<ReadStream> {
        let name = req.resource_name.clone();
        if logstream::classify(&name) == Some(true) {
            return Err(KilnError::invalid(format!("{name:?} is a write resource name; read the log stream's name")));
        }
        if req.read_offset < 0 || req.read_limit < 0 {
            return Err(KilnError::OutOfRange(format!("read_offset and read_limit of {name:?} must not be negative")));
        }
        if let Some(buf) = self.state.logs.get(&name) {
            let (tx, rx) = mpsc::channel(4);
            let (mut offset, limit) = (req.read_offset as usize, if req.read_limit == 0 { usize::MAX } else { req.read_limit as usize });
            let end = offset.saturating_add(limit);
            tokio::spawn(async move {
                let mut progress = buf.subscribe();
                loop {
                    progress.borrow_and_update();
                    let (bytes, finished) = buf.read(offset, LOG_CHUNK.min(end - offset));
                    if !bytes.is_empty() {
                        offset += bytes.len();
                        if tx.send(Ok(ReadResponse { data: bytes })).await.is_err() || offset >= end {
                            return;
                        }
                        continue;
                    }
                    if finished || progress.changed().await.is_err() {
                        return;
                    }
                }
            });
            return Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        }
        if !local_only {
            // Held by the node the worker writes to: ask the others.
            let ring = self.state.placement.ring();
            for (id, addr) in ring.members() {
                if *id == self.state.cfg.node.id {
                    continue;
                }
                let Ok(ch) = self.state.scheduler.consensus.channels.get(addr) else { continue };
                let mut r = Request::new(req.clone());
                r.metadata_mut().insert(LOCAL_ONLY, tonic::metadata::MetadataValue::from_static("1"));
                if let Ok(s) = kiln_proto::bytestream::byte_stream_client::ByteStreamClient::new(ch).read(r).await {
                    return Ok(Box::pin(s.into_inner()));
                }
            }
        }
        Err(KilnError::NotFound(format!("log stream {name:?} not found")))
    }

    /// Appends each message to the log stream at its `write_offset`.
    async fn write_log(&self, first: WriteRequest, mut stream: Streaming<WriteRequest>) -> Result<WriteResponse> {
        let buf = self.state.logs.for_write(&first.resource_name)?;
        let mut msg = first;
        loop {
            if msg.write_offset < 0 {
                return Err(KilnError::OutOfRange(format!("write_offset {} is negative", msg.write_offset)));
            }
            let size = buf.append(msg.write_offset as u64, &msg.data, msg.finish_write)?;
            if msg.finish_write {
                return Ok(WriteResponse { committed_size: size as i64 });
            }
            msg = match stream.message().await {
                Ok(Some(m)) => m,
                // The writer went away without finishing: what it sent stays, it may go on later.
                Ok(None) | Err(_) => return Ok(WriteResponse { committed_size: size as i64 }),
            };
        }
    }
}

/// The `committed_size` of a finished upload: the blob's size, or -1 for a compressed upload
/// whose compressed length the server does not know (REAPI's rule for short-circuited writes).
fn full_size(res: &BlobResource) -> i64 {
    if res.compressed {
        -1
    } else {
        res.digest.size as i64
    }
}

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<Self::ReadStream>, Status> {
        let start = Instant::now();
        let local_only = request.metadata().contains_key(LOCAL_ONLY);
        let req = request.into_inner();
        let r = if logstream::classify(&req.resource_name).is_some() {
            self.read_log(req, local_only).await
        } else {
            self.read(req).await
        };
        let r = r.map(Response::new).map_err(Status::from);
        observe("ByteStream.Read", start, r)
    }

    #[tracing::instrument(skip_all, fields(digest))]
    async fn write(&self, request: Request<Streaming<WriteRequest>>) -> Result<Response<WriteResponse>, Status> {
        let start = Instant::now();
        let r = self.write(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ByteStream.Write", start, r)
    }

    #[tracing::instrument(skip_all, fields(resource = %request.get_ref().resource_name))]
    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let start = Instant::now();
        let r = self.query_write_status(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("ByteStream.QueryWriteStatus", start, r)
    }
}
