//! `kiln.peer.v1.Peer`: what the nodes of a cluster serve each other — the Raft transport,
//! forwarded proposals, membership and status, and each node's local blob store and Action
//! Cache for the sharded CAS.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use kiln_proto::peer::peer_server::Peer;
use kiln_proto::peer::{
    ActionResultEntry, ActionResultKey, AddMemberRequest, BlobChunk, HasBlobsRequest, HasBlobsResponse, Member,
    ProposeRequest, ProposeResponse, PutBlobsRequest, PutBlobsResponse, GetBlobsRequest, GetBlobsResponse, FoundBlob, RaftRequest, RaftResponse, ReadBlobRequest, RemoveMemberRequest, StatusRequest,
    StatusResponse, UploadKey, UploadStatusResponse, WriteBlobResponse, MIN_PEER_VERSION, PEER_VERSION,
};
use kiln_raft::network::{decode, encode};
use tonic::{Request, Response, Status, Streaming};

use super::blocking;

/// Bytes one GetBlobs call may ask for (held in memory on both sides).
pub const MAX_GET_BLOBS_BYTES: u64 = 16 << 20;
/// Chunks of a pushed blob in flight between the network and the writing thread.
const PUSH_PIPE_CHUNKS: usize = 4;
/// Commands a forwarded batch may hold.
const MAX_FORWARDED_BATCH: usize = 16;
use crate::cas::{check_content, UploadState};
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::server::NodeState;

pub struct PeerService {
    state: Arc<NodeState>,
}

fn check_version(v: u32) -> Result<()> {
    if !(MIN_PEER_VERSION..=PEER_VERSION).contains(&v) {
        return Err(KilnError::FailedPrecondition(format!(
            "peer protocol version {v} is not served here (this node serves {MIN_PEER_VERSION} to {PEER_VERSION})"
        )));
    }
    Ok(())
}

pub fn peer_digest(d: &BlobDigest) -> kiln_proto::peer::BlobDigest {
    kiln_proto::peer::BlobDigest { function: d.function.to_proto(), hash: d.hex(), size: d.size as i64 }
}

pub fn from_peer_digest(d: Option<&kiln_proto::peer::BlobDigest>) -> Result<BlobDigest> {
    let d = d.ok_or_else(|| KilnError::invalid("peer request has no digest"))?;
    Ok(BlobDigest::parse(DigestFunction::from_request(d.function)?, &d.hash, d.size)?)
}

fn raft_response<T: serde::Serialize, E: serde::Serialize>(r: std::result::Result<T, E>) -> RaftResponse {
    match r {
        Ok(v) => RaftResponse { payload: encode(&v), error: vec![], command_version: kiln_raft::command::COMMAND_VERSION },
        Err(e) => RaftResponse { payload: vec![], error: encode(&e), command_version: kiln_raft::command::COMMAND_VERSION },
    }
}

impl PeerService {
    pub fn new(state: Arc<NodeState>) -> Self {
        Self { state }
    }

    fn decode_raft<T: serde::de::DeserializeOwned>(req: &RaftRequest) -> Result<T> {
        check_version(req.version)?;
        decode(&req.payload).map_err(|e| KilnError::invalid(format!("raft payload: {e}")))
    }

    pub fn status(&self) -> StatusResponse {
        let c = &self.state.scheduler.consensus;
        let m = c.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, n)| Member { id: *id, address: n.addr.clone(), voter: voters.contains(id) })
            .collect();
        StatusResponse {
            node_id: c.node_id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            members,
            ring_version: self.state.placement.version(),
            peer_version: PEER_VERSION,
            build_version: env!("CARGO_PKG_VERSION").into(),
            serving: true,
            cas_stored_bytes: self.state.cas.stored_bytes(),
        }
    }

    async fn add_member(&self, req: AddMemberRequest) -> Result<StatusResponse> {
        check_version(req.version)?;
        if req.id == 0 || req.address.is_empty() {
            return Err(KilnError::invalid("a member needs an id of at least 1 and an address"));
        }
        let raft = &self.state.scheduler.consensus.raft;
        let node = openraft::BasicNode { addr: req.address.clone() };
        raft.add_learner(req.id, node, true).await.map_err(|e| KilnError::FailedPrecondition(format!("adding node {} as learner: {e}", req.id)))?;
        let mut voters: std::collections::BTreeSet<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(req.id);
        raft.change_membership(voters, false).await.map_err(|e| KilnError::FailedPrecondition(format!("making node {} a voter: {e}", req.id)))?;
        tracing::info!(node = req.id, address = %req.address, "member added");
        Ok(self.status())
    }

    async fn remove_member(&self, req: RemoveMemberRequest) -> Result<StatusResponse> {
        check_version(req.version)?;
        let raft = &self.state.scheduler.consensus.raft;
        let mut voters: std::collections::BTreeSet<u64> = raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if !voters.remove(&req.id) {
            return Err(KilnError::NotFound(format!("node {} is not a voting member", req.id)));
        }
        if voters.is_empty() {
            return Err(KilnError::FailedPrecondition("cannot remove the last member".into()));
        }
        raft.change_membership(voters, false).await.map_err(|e| KilnError::FailedPrecondition(format!("removing node {}: {e}", req.id)))?;
        tracing::info!(node = req.id, "member removed");
        Ok(self.status())
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<BlobChunk, Status>> + Send>>;

/// Membership changes are served by the leader: a follower answers FAILED_PRECONDITION naming it.
fn leader_hint(state: &NodeState) -> Option<String> {
    let c = &state.scheduler.consensus;
    let m = c.raft.metrics().borrow().clone();
    let leader = m.current_leader?;
    if leader == c.node_id {
        return None;
    }
    m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, request: Request<RaftRequest>) -> std::result::Result<Response<RaftResponse>, Status> {
        let req = Self::decode_raft(request.get_ref())?;
        let r = self.state.scheduler.consensus.raft.append_entries(req).await;
        Ok(Response::new(raft_response(r)))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> std::result::Result<Response<RaftResponse>, Status> {
        let req = Self::decode_raft(request.get_ref())?;
        let r = self.state.scheduler.consensus.raft.vote(req).await;
        Ok(Response::new(raft_response(r)))
    }

    async fn install_snapshot(&self, request: Request<RaftRequest>) -> std::result::Result<Response<RaftResponse>, Status> {
        let req = Self::decode_raft(request.get_ref())?;
        let r = self.state.scheduler.consensus.raft.install_snapshot(req).await;
        Ok(Response::new(raft_response(r)))
    }

    async fn propose(&self, request: Request<ProposeRequest>) -> std::result::Result<Response<ProposeResponse>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let cmd = kiln_raft::consensus::decode_forwarded_command(&req.command).map_err(|e| Status::invalid_argument(format!("command: {e}")))?;
        // Commands a node proposes together (a result and the next claim) come as a batch:
        // flat and short.
        if let kiln_raft::command::Command::Batch(cmds) = &cmd {
            if cmds.len() > MAX_FORWARDED_BATCH || cmds.iter().any(|c| matches!(c, kiln_raft::command::Command::Batch(_))) {
                return Err(Status::invalid_argument(format!(
                    "command: a forwarded batch holds at most {MAX_FORWARDED_BATCH} commands, none of them a batch"
                )));
            }
        }
        // One hop only: the leader proposes locally; a node that lost leadership meanwhile
        // says so and the origin retries.
        let (r, log_index) = self.state.scheduler.consensus.propose_indexed(cmd).await.map_err(|e| match e {
            kiln_raft::ProposeError::Refused(why) => Status::failed_precondition(why),
            e => Status::unavailable(e.to_string()),
        })?;
        Ok(Response::new(ProposeResponse { result: kiln_raft::consensus::encode_forwarded(&r), log_index }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> std::result::Result<Response<StatusResponse>, Status> {
        check_version(request.get_ref().version)?;
        Ok(Response::new(self.status()))
    }

    async fn add_member(&self, request: Request<AddMemberRequest>) -> std::result::Result<Response<StatusResponse>, Status> {
        if let Some(l) = leader_hint(&self.state) {
            return Err(Status::failed_precondition(format!("membership changes go to the leader at {l}")));
        }
        Ok(Response::new(self.add_member(request.into_inner()).await?))
    }

    async fn remove_member(&self, request: Request<RemoveMemberRequest>) -> std::result::Result<Response<StatusResponse>, Status> {
        if let Some(l) = leader_hint(&self.state) {
            return Err(Status::failed_precondition(format!("membership changes go to the leader at {l}")));
        }
        Ok(Response::new(self.remove_member(request.into_inner()).await?))
    }

    async fn has_blobs(&self, request: Request<HasBlobsRequest>) -> std::result::Result<Response<HasBlobsResponse>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let digests: Vec<BlobDigest> = req.digests.iter().map(|d| from_peer_digest(Some(d))).collect::<Result<_>>()?;
        let cas = self.state.cas.clone();
        let missing = blocking(move || {
            let missing = cas.find_missing(&digests)?;
            Ok((digests, missing))
        })
        .await?;
        let (digests, missing) = missing;
        let missing: std::collections::HashSet<BlobDigest> = missing.into_iter().collect();
        let held = digests.iter().enumerate().filter(|(_, d)| !missing.contains(d));
        Ok(Response::new(if req.want_indices {
            HasBlobsResponse { present: Vec::new(), present_indices: held.map(|(i, _)| i as u32).collect() }
        } else {
            HasBlobsResponse { present: held.map(|(_, d)| peer_digest(d)).collect(), present_indices: Vec::new() }
        }))
    }

    async fn put_blobs(&self, request: Request<PutBlobsRequest>) -> std::result::Result<Response<PutBlobsResponse>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let blobs: Vec<(BlobDigest, bytes::Bytes)> = req
            .blobs
            .into_iter()
            .map(|b| from_peer_digest(b.digest.as_ref()).map(|d| (d, bytes::Bytes::from(b.data))))
            .collect::<Result<_>>()?;
        let cas = self.state.cas.clone();
        // Checked here: a replica is stored only if its bytes match its digest.
        let results = blocking(move || {
            let (good, checks): (Vec<_>, Vec<_>) = blobs
                .into_iter()
                .map(|(d, data)| match check_content(&d, &data) {
                    Ok(()) => (Some((d, data)), Ok(())),
                    Err(e) => (None, Err(e)),
                })
                .unzip();
            let mut stored = cas.put_checked_many(good.into_iter().flatten().collect()).into_iter();
            Ok(checks.into_iter().map(|c| c.and_then(|()| stored.next().expect("one result per checked blob"))).collect::<Vec<_>>())
        })
        .await?;
        let errors = results.into_iter().map(|r| r.err().map(|e| e.to_string()).unwrap_or_default()).collect();
        Ok(Response::new(PutBlobsResponse { errors }))
    }

    async fn get_blobs(&self, request: Request<GetBlobsRequest>) -> std::result::Result<Response<GetBlobsResponse>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let digests: Vec<BlobDigest> = req.digests.iter().map(|d| from_peer_digest(Some(d))).collect::<Result<_>>()?;
        let total: u64 = digests.iter().map(|d| d.size).sum();
        if total > MAX_GET_BLOBS_BYTES {
            return Err(Status::invalid_argument(format!(
                "GetBlobs of {} blobs totals {total} bytes, over {MAX_GET_BLOBS_BYTES}: read them with ReadBlob",
                digests.len()
            )));
        }
        let cas = self.state.cas.clone();
        let blobs = blocking(move || {
            digests
                .iter()
                .map(|d| {
                    Ok(match cas.read_all(d)? {
                        Some(b) => FoundBlob { found: true, data: b.to_vec() },
                        None => FoundBlob { found: false, data: Vec::new() },
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        Ok(Response::new(GetBlobsResponse { blobs }))
    }

    async fn write_blob(&self, request: Request<Streaming<BlobChunk>>) -> std::result::Result<Response<WriteBlobResponse>, Status> {
        let mut s = request.into_inner();
        let first = s.message().await?.ok_or_else(|| Status::invalid_argument("empty blob stream"))?;
        check_version(first.version)?;
        let d = from_peer_digest(first.digest.as_ref())?;
        let upload_key = first.upload_key.clone();
        let cas = self.state.cas.clone();
        let present = {
            let cas = cas.clone();
            blocking(move || cas.contains(&d)).await?
        };
        if present {
            return Ok(Response::new(WriteBlobResponse { committed_size: d.size as i64 }));
        }
        let up = {
            let cas = cas.clone();
            blocking(move || UploadState::start(&cas, d, false)).await?
        };
        // One blocking thread writes (and a large blob's own thread hashes) while the next
        // chunks arrive.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PUSH_PIPE_CHUNKS);
        let writer = tokio::task::spawn_blocking(move || {
            let mut up = up;
            while let Some(chunk) = rx.blocking_recv() {
                up.write_owned(chunk)?;
            }
            Ok::<_, KilnError>(up)
        });
        let mut data = first.data;
        let received = loop {
            if !data.is_empty() && tx.send(std::mem::take(&mut data)).await.is_err() {
                break Ok(()); // the writer failed: its error is reported below
            }
            match s.message().await {
                Ok(Some(c)) => data = c.data,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        let mut up = writer.await.map_err(|e| Status::internal(format!("blob write task: {e}")))??;
        received?;
        if up.received < d.size && !upload_key.is_empty() {
            // A client's upload forwarded by the node it sent it to, cut off there: kept for
            // the client to resume through any node.
            let received = up.received;
            up = blocking(move || {
                let mut up = up;
                up.settle()?;
                Ok(up)
            })
            .await?;
            cas.park_upload(upload_key, up);
            return Ok(Response::new(WriteBlobResponse { committed_size: received as i64 }));
        }
        blocking(move || up.finish(&cas)).await?;
        Ok(Response::new(WriteBlobResponse { committed_size: d.size as i64 }))
    }

    type ReadBlobStream = ChunkStream;

    async fn read_blob(&self, request: Request<ReadBlobRequest>) -> std::result::Result<Response<Self::ReadBlobStream>, Status> {
        let req = request.into_inner();
        check_version(req.version)?;
        let d = from_peer_digest(req.digest.as_ref())?;
        let rx = crate::cas::stream_blob(&self.state.cas, d, 0, 0, false).await?.ok_or(KilnError::BlobNotFound(d))?;
        let s = tokio_stream::wrappers::ReceiverStream::new(rx).map(|c| match c {
            Ok(b) => Ok(BlobChunk { version: PEER_VERSION, digest: None, data: b, ..Default::default() }),
            Err(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn upload_status(&self, request: Request<UploadKey>) -> std::result::Result<Response<UploadStatusResponse>, Status> {
        let k = request.into_inner();
        check_version(k.version)?;
        Ok(Response::new(match self.state.cas.parked_upload_file(&k.upload_key) {
            Some((_, size, compressed)) => UploadStatusResponse { found: true, committed_size: size as i64, compressed },
            None => UploadStatusResponse::default(),
        }))
    }

    type ReadUploadStream = ChunkStream;

    async fn read_upload(&self, request: Request<UploadKey>) -> std::result::Result<Response<Self::ReadUploadStream>, Status> {
        let k = request.into_inner();
        check_version(k.version)?;
        let (path, size, compressed) = self
            .state
            .cas
            .parked_upload_file(&k.upload_key)
            .ok_or_else(|| Status::not_found(format!("no unfinished upload {:?} here", k.upload_key)))?;
        if compressed {
            return Err(Status::failed_precondition("a compressed upload resumes only on the node that received it"));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f.take(size),
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::not_found(format!("upload file gone: {e}"))));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; 1 << 20];
                match f.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.blocking_send(Ok(BlobChunk { version: PEER_VERSION, digest: None, data: buf.into(), ..Default::default() })).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn get_action_result(&self, request: Request<ActionResultKey>) -> std::result::Result<Response<ActionResultEntry>, Status> {
        let key = request.into_inner();
        check_version(key.version)?;
        let d = from_peer_digest(key.action.as_ref())?;
        // One index read: in place, as for the node's own lookups (`Storage::ac_load_from`).
        let found = self.state.ac.load_raw(&key.instance_name, &d)?;
        Ok(Response::new(ActionResultEntry {
            version: PEER_VERSION,
            found: found.is_some(),
            action_result: found.unwrap_or_default(),
            key: Some(key),
        }))
    }

    async fn put_action_result(&self, request: Request<ActionResultEntry>) -> std::result::Result<Response<ActionResultEntry>, Status> {
        let e = request.into_inner();
        check_version(e.version)?;
        let key = e.key.clone().ok_or_else(|| Status::invalid_argument("entry has no key"))?;
        let d = from_peer_digest(key.action.as_ref())?;
        // As the node's own writes (`Storage::ac_update`): the insert in place, the flush
        // awaited and shared.
        self.state.ac.store_raw(&key.instance_name, &d, &e.action_result).await?;
        Ok(Response::new(e))
    }

    async fn put_build_events(
        &self,
        request: Request<kiln_proto::peer::PutBuildEventsRequest>,
    ) -> std::result::Result<Response<kiln_proto::peer::BuildEventsResponse>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        if r.stream.is_empty() || r.stream.contains('\0') {
            return Err(Status::invalid_argument(format!("stream {:?} is not a stream id", r.stream)));
        }
        let store = self.state.events.local.clone();
        let events: Vec<(i64, Vec<u8>)> = r.events.into_iter().map(|e| (e.sequence_number, e.ordered_build_event)).collect();
        let last = blocking(move || store.put(&r.stream, &events)).await?;
        Ok(Response::new(kiln_proto::peer::BuildEventsResponse { events: vec![], last_sequence_number: last, event_count: 0 }))
    }

    async fn get_build_events(
        &self,
        request: Request<kiln_proto::peer::GetBuildEventsRequest>,
    ) -> std::result::Result<Response<kiln_proto::peer::BuildEventsResponse>, Status> {
        let r = request.into_inner();
        check_version(r.version)?;
        let store = self.state.events.local.clone();
        let limit = (r.limit as usize).min(5000);
        let (events, last, count) = blocking(move || {
            let count = if r.count_events { store.count(&r.stream)? } else { 0 };
            Ok((store.get(&r.stream, r.after_sequence_number, limit)?, store.last(&r.stream)?, count))
        })
        .await?;
        let events = events
            .into_iter()
            .map(|(s, d)| kiln_proto::peer::StoredBuildEvent { sequence_number: s, ordered_build_event: d })
            .collect();
        Ok(Response::new(kiln_proto::peer::BuildEventsResponse { events, last_sequence_number: last, event_count: count }))
    }
}
