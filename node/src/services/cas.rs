//! REAPI ContentAddressableStorage: presence checks, batch transfers of small blobs, GetTree.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kiln_proto::reapi::content_addressable_storage_server::ContentAddressableStorage;
use kiln_proto::reapi::{
    batch_read_blobs_response, batch_update_blobs_response, compressor, BatchReadBlobsRequest, BatchReadBlobsResponse,
    BatchUpdateBlobsRequest, BatchUpdateBlobsResponse, Directory, FindMissingBlobsRequest, FindMissingBlobsResponse,
    GetChunkMappingRequest, GetChunkMappingResponse, GetTreeRequest, GetTreeResponse, RegisterChunkMappingRequest,
    RegisterChunkMappingResponse, SpliceBlobRequest, SpliceBlobResponse, SplitBlobRequest, SplitBlobResponse,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::{blocking, check_instance_name, observe};
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::server::NodeState;

/// Directories per GetTree page when the client sets no page size.
const DEFAULT_TREE_PAGE: usize = 10_000;
/// Encoded bytes of directories per GetTree message: several messages make one page.
const TREE_MESSAGE_BYTES: usize = 2 << 20;
/// Directories one GetTree call visits at most.
const MAX_TREE_DIRECTORIES: usize = 1_000_000;

pub struct CasService {
    state: Arc<NodeState>,
}

impl CasService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }
}

fn parse_all(f: DigestFunction, ds: &[kiln_proto::reapi::Digest], field: &str) -> Result<Vec<BlobDigest>> {
    ds.iter()
        .enumerate()
        .map(|(i, d)| BlobDigest::from_proto(f, d).map_err(|e| KilnError::invalid(format!("{field}[{i}]: {e}"))))
        .collect()
}

impl CasService {
    /// The digests of `digests` no owner holds, in request order.
    pub(super) async fn missing(&self, digests: Vec<BlobDigest>) -> Result<Vec<BlobDigest>> {
        self.state.storage.find_missing(digests).await
    }

    async fn find_missing(&self, req: FindMissingBlobsRequest) -> Result<FindMissingBlobsResponse> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let digests = parse_all(f, &req.blob_digests, "blob_digests")?;
        let missing = self.missing(digests.clone()).await?;
        // The missing ones come back in request order: answer with the request's own messages
        // (they parsed, so they are canonical) rather than hex-encode each hash again.
        let mut next = missing.iter().peekable();
        let taken: Vec<bool> = digests.iter().map(|d| next.next_if_eq(&d).is_some()).collect();
        if next.peek().is_some() {
            // Not a subsequence after all: answer plainly rather than drop a missing digest.
            return Ok(FindMissingBlobsResponse { missing_blob_digests: missing.iter().map(BlobDigest::to_proto).collect() });
        }
        let missing_blob_digests =
            req.blob_digests.into_iter().zip(taken).filter_map(|(p, take)| take.then_some(p)).collect();
        Ok(FindMissingBlobsResponse { missing_blob_digests })
    }

    async fn batch_update(&self, req: BatchUpdateBlobsRequest) -> Result<BatchUpdateBlobsResponse> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let limit = self.state.cfg.limits.max_batch_total_size_bytes;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > limit {
            return Err(KilnError::invalid(format!(
                "batch of {} blobs carries {total} bytes, over max_batch_total_size_bytes {limit}: use ByteStream Write",
                req.requests.len()
            )));
        }
        // Check and decompress first (CPU work, off the async threads), then store and
        // replicate the valid ones concurrently.
        let checked: Vec<(Option<kiln_proto::reapi::Digest>, Result<(BlobDigest, Bytes)>)> = blocking(move || {
            Ok(req
                .requests
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let result = (|| -> Result<(BlobDigest, Bytes)> {
                        let d = BlobDigest::from_proto_opt(f, r.digest.as_ref())
                            .map_err(|e| KilnError::invalid(format!("requests[{i}].digest: {e}")))?;
                        let data = match compressor::Value::try_from(r.compressor) {
                            Ok(compressor::Value::Identity) => Bytes::from(r.data),
                            Ok(compressor::Value::Zstd) => Bytes::from(decompress_bounded(&d, &r.data)?),
                            _ => {
                                return Err(KilnError::invalid(format!(
                                    "requests[{i}]: compressor {} is not supported (Kiln supports IDENTITY and ZSTD)",
                                    r.compressor
                                )))
                            }
                        };
                        crate::cas::check_content(&d, &data)?;
                        Ok((d, data))
                    })();
                    (r.digest, result)
                })
                .collect())
        })
        .await?;
        // Store the valid ones together; answer each in request order.
        let valid: Vec<(BlobDigest, Bytes)> = checked.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()).collect();
        let mut stored = self.state.storage.put_checked_many(valid).await.into_iter();
        let responses = checked
            .into_iter()
            .map(|(digest, r)| {
                let result = r.and_then(|(d, _)| stored.next().unwrap_or_else(|| Err(KilnError::Internal("batch result missing".into()))).map(|()| d));
                match result {
                    Ok(d) => batch_update_blobs_response::Response {
                        digest: Some(d.to_proto()),
                        status: Some(kiln_proto::rpc_status(tonic::Code::Ok, "", vec![])),
                    },
                    Err(e) => batch_update_blobs_response::Response { digest, status: Some(e.to_rpc_status()) },
                }
            })
            .collect();
        Ok(BatchUpdateBlobsResponse { responses })
    }

    async fn batch_read(&self, req: BatchReadBlobsRequest) -> Result<BatchReadBlobsResponse> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let digests = parse_all(f, &req.digests, "digests")?;
        let limit = self.state.cfg.limits.max_batch_total_size_bytes;
        let total: u64 = digests.iter().map(|d| d.size).sum();
        if total > limit {
            return Err(KilnError::invalid(format!(
                "batch read of {} blobs totals {total} bytes, over max_batch_total_size_bytes {limit}: use ByteStream Read",
                digests.len()
            )));
        }
        let read = self.state.storage.read_small_many(digests.clone()).await;
        let responses = digests
            .iter()
            .zip(read)
            .map(|(d, r)| {
                let (data, status) = match r {
                    Ok(Some(b)) => (b.to_vec(), kiln_proto::rpc_status(tonic::Code::Ok, "", vec![])),
                    Ok(None) => (Vec::new(), KilnError::BlobNotFound(*d).to_rpc_status()),
                    Err(e) => (Vec::new(), e.to_rpc_status()),
                };
                batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    compressor: compressor::Value::Identity as i32,
                    status: Some(status),
                }
            })
            .collect();
        Ok(BatchReadBlobsResponse { responses })
    }

    /// Breadth-first walk from the root, each directory once; `skip` directories are passed
    /// over (the page token), at most `take` returned. Directories missing from the CAS are left
    /// out with their subtrees, as REAPI allows. Returns the directories and whether more remain.
    async fn walk_tree(&self, root: BlobDigest, skip: usize, take: usize) -> Result<(Vec<Directory>, bool)> {
        let storage = &self.state.storage;
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        let mut out = Vec::new();
        let mut index = 0usize;
        while let Some(d) = queue.pop_front() {
            let Some(bytes) = storage.read_small(&d).await? else {
                if d == root {
                    return Err(KilnError::BlobNotFound(root));
                }
                continue;
            };
            let dir = Directory::decode(bytes).map_err(|e| KilnError::invalid(format!("directory {d} does not decode: {e}")))?;
            for child in &dir.directories {
                let cd = BlobDigest::from_proto_opt(root.function, child.digest.as_ref())
                    .map_err(|e| KilnError::invalid(format!("directory {d}, child {:?}: {e}", child.name)))?;
                if seen.len() >= MAX_TREE_DIRECTORIES {
                    return Err(KilnError::ResourceExhausted(format!(
                        "tree {root} has over {MAX_TREE_DIRECTORIES} directories"
                    )));
                }
                if seen.insert(cd) {
                    queue.push_back(cd);
                }
            }
            if index >= skip {
                if out.len() == take {
                    return Ok((out, true));
                }
                out.push(dir);
            }
            index += 1;
        }
        Ok((out, false))
    }

    async fn get_tree(&self, req: GetTreeRequest) -> Result<Vec<GetTreeResponse>> {
        check_instance_name(&req.instance_name)?;
        let f = DigestFunction::from_request(req.digest_function)?;
        let root = BlobDigest::from_proto_opt(f, req.root_digest.as_ref())
            .map_err(|e| KilnError::invalid(format!("root_digest: {e}")))?;
        if req.page_size < 0 {
            return Err(KilnError::invalid(format!("page_size {} is negative", req.page_size)));
        }
        let skip = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse::<usize>()
                .map_err(|_| KilnError::invalid(format!("page_token {:?} was not issued by this server", req.page_token)))?
        };
        let take = if req.page_size == 0 { DEFAULT_TREE_PAGE } else { req.page_size as usize };
        let (dirs, more) = self.walk_tree(root, skip, take).await?;
        let next = if more { (skip + dirs.len()).to_string() } else { String::new() };
        // Split the page into messages of bounded size; the token goes on the last one.
        let mut messages = vec![GetTreeResponse::default()];
        let mut size = 0;
        for d in dirs {
            let len = d.encoded_len();
            if size + len > TREE_MESSAGE_BYTES && size > 0 {
                messages.push(GetTreeResponse::default());
                size = 0;
            }
            size += len;
            messages.last_mut().expect("non-empty").directories.push(d);
        }
        messages.last_mut().expect("non-empty").next_page_token = next;
        Ok(messages)
    }
}

/// Decompresses a zstd batch entry, refusing output beyond the digest's size.
fn decompress_bounded(d: &BlobDigest, data: &[u8]) -> Result<Vec<u8>> {
    let out = zstd::bulk::decompress(data, d.size as usize)
        .map_err(|e| KilnError::invalid(format!("zstd data of blob {d} does not decompress within its size: {e}")))?;
    Ok(out)
}

type TreeStream = futures::stream::Iter<std::vec::IntoIter<Result<GetTreeResponse, Status>>>;
type ChunkStream = futures::stream::Empty<Result<GetChunkMappingResponse, Status>>;

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, n = request.get_ref().blob_digests.len()))]
    async fn find_missing_blobs(&self, request: Request<FindMissingBlobsRequest>) -> Result<Response<FindMissingBlobsResponse>, Status> {
        let start = Instant::now();
        let r = self.find_missing(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("CAS.FindMissingBlobs", start, r)
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, n = request.get_ref().requests.len()))]
    async fn batch_update_blobs(&self, request: Request<BatchUpdateBlobsRequest>) -> Result<Response<BatchUpdateBlobsResponse>, Status> {
        let start = Instant::now();
        let r = self.batch_update(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("CAS.BatchUpdateBlobs", start, r)
    }

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name, n = request.get_ref().digests.len()))]
    async fn batch_read_blobs(&self, request: Request<BatchReadBlobsRequest>) -> Result<Response<BatchReadBlobsResponse>, Status> {
        let start = Instant::now();
        let r = self.batch_read(request.into_inner()).await.map(Response::new).map_err(Status::from);
        observe("CAS.BatchReadBlobs", start, r)
    }

    type GetTreeStream = TreeStream;

    #[tracing::instrument(skip_all, fields(instance = %request.get_ref().instance_name))]
    async fn get_tree(&self, request: Request<GetTreeRequest>) -> Result<Response<Self::GetTreeStream>, Status> {
        let start = Instant::now();
        let r = self
            .get_tree(request.into_inner())
            .await
            .map(|msgs| Response::new(futures::stream::iter(msgs.into_iter().map(Ok).collect::<Vec<_>>())))
            .map_err(Status::from);
        observe("CAS.GetTree", start, r)
    }

    async fn split_blob(&self, _: Request<SplitBlobRequest>) -> Result<Response<SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob is not supported: Capabilities reports split_blob_support = false"))
    }

    type GetChunkMappingStream = ChunkStream;

    async fn get_chunk_mapping(&self, _: Request<GetChunkMappingRequest>) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping is not supported: Kiln does not chunk blobs"))
    }

    async fn splice_blob(&self, _: Request<SpliceBlobRequest>) -> Result<Response<SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob is not supported: Capabilities reports splice_blob_support = false"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<RegisterChunkMappingRequest>>,
    ) -> Result<Response<RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("RegisterChunkMapping is not supported: Kiln does not chunk blobs"))
    }
}
