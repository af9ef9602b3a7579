//! # Storage across the cluster: sharded, replicated CAS and Action Cache
//!
//! Every blob and Action Cache entry has `replication_factor` owners, the first distinct nodes
//! clockwise from its key on the placement ring ([`crate::placement`]). The services talk to
//! [`Storage`]; it talks to the local [`BlobStore`]/[`ActionCacheStore`] for what this node owns
//! and to the owners' `kiln.peer.v1.Peer` local-store calls for the rest. A ring of one node
//! makes every call local.
//!
//! - **Writes** reach every owner in parallel. A fresh plain ByteStream upload is forwarded to
//!   the other owners chunk by chunk as it arrives ([`Tee`]); a node that owns no replica keeps
//!   no copy of it at all, and one cut off mid-way stays parked on the owners under its upload
//!   key, where a Write through any node resumes it. A batch (small blobs: what an action is
//!   made of, which its worker may read through the same node) is stored here while one
//!   `PutBlobs` per other owner carries it. Anything else (compressed or resumed uploads, blobs
//!   an owner could not take) lands in the local store first (hashed and verified while
//!   streaming) and is pushed from there, and by repair. The write is
//!   acknowledged once every reachable owner has the blob in place, and at least one. A copy on
//!   a non-owner (kept for an owner that missed it, or fetched for a read) stays as an
//!   evictable cache.
//! - **Reads** use the local copy if any, else fetch from the owners in ring order, then from
//!   the other members (a blob written before a membership change), into the local store, and
//!   serve from there; owners found lacking it are repaired. A whole read of a large blob is
//!   relayed from an owner as it streams instead ([`Storage::relay_read`]).
//! - **FindMissingBlobs** groups digests by primary owner, one call per node, in parallel; what
//!   a primary lacks or cannot answer is asked of the next owner.
//! - **Action Cache** entries go to every owner; a get returns the first owner's entry, and only
//!   while every blob it references is still in the CAS (else the client would get a hit it
//!   cannot download).
//!
//! Each owner verifies the hash of what it receives on its own, so an upload whose bytes do not
//! match its digest is stored nowhere. The price of keeping no copy on the entry node: with
//! every owner of a blob down, the node it was uploaded through cannot serve it either (it
//! answers UNAVAILABLE, not NOT_FOUND: absence is only reported when an owner said so).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::peer::{
    ActionResultEntry, ActionResultKey, BlobChunk, GetBlobsRequest, HasBlobsRequest, PutBlobsRequest, ReadBlobRequest, UploadKey, WholeBlob,
    PEER_VERSION,
};
use kiln_proto::reapi::{self, ActionResult};
use kiln_raft::network::PeerChannels;
use prost::Message;

use crate::ac::{validate_result, ActionCacheStore};
use crate::cas::{BlobStore, OpenBlob, UploadState};
use crate::config::ActionCacheConfig;
use crate::digest::{BlobDigest, DigestFunction};
use crate::error::{KilnError, Result};
use crate::placement::{Owner, Placement};
use crate::services::blocking;
use crate::services::peer::{from_peer_digest, peer_digest};

/// Chunk size of blob pushes between nodes.
const PEER_CHUNK: usize = 1 << 20;
/// Chunks queued per owner of a [`Tee`] (or per relayed read): bounds what a slow peer makes
/// this node hold.
const TEE_CHUNKS: usize = 4;
/// Whole reads of blobs at least this large that this node does not hold are relayed from an
/// owner rather than fetched into the local store first.
const RELAY_READ_ABOVE: u64 = 4 << 20;
/// A result referencing more blobs than this is refused (it could not be checked quickly).
const MAX_REFERENCED_BLOBS: usize = 100_000;

/// A plain upload forwarded to the blob's other owners while it arrives, one peer `WriteBlob`
/// stream each, so that they hold the blob when the upload ends here rather than receive it
/// from this node afterwards. Each owner hashes and checks what it receives. A branch whose
/// owner fails or answers early (it had the blob) stops taking chunks.
///
/// When this node is not an owner and reaches every owner, the upload needs no local copy
/// ([`Tee::forwards_only`]): the first chunk carries the client's upload key, and an upload
/// cut off mid-way is parked by the owners under it, where a Write through any node resumes
/// it ([`Storage::adopt_remote_upload`]). Dropped, a tee closes its streams as a cut-off
/// upload does; [`Tee::abort`] cancels them (the owners discard what they received).
pub struct Tee {
    digest: BlobDigest,
    upload_key: String,
    first: bool,
    forwards_only: bool,
    branches: Vec<TeeBranch>,
}

struct TeeBranch {
    owner: u64,
    tx: Option<tokio::sync::mpsc::Sender<BlobChunk>>,
    rpc: Option<tokio::task::JoinHandle<std::result::Result<u64, tonic::Status>>>,
}

/// How the owners of a [`Tee`] answered.
pub struct TeeOutcome {
    /// The owners that stored the blob.
    pub stored: Vec<u64>,
    /// The most bytes an owner parked of an upload that ended unfinished.
    pub parked: u64,
    /// What the first owner that failed said.
    pub error: Option<KilnError>,
}

impl Tee {
    /// Whether the upload needs no copy here: this node owns no replica and every owner has a
    /// branch.
    pub fn forwards_only(&self) -> bool {
        self.forwards_only
    }

    /// Branches still taking chunks.
    pub fn live(&self) -> usize {
        self.branches.iter().filter(|b| b.tx.is_some()).count()
    }

    /// Forwards the next bytes of the upload to every owner still taking them.
    pub async fn send(&mut self, data: Bytes) {
        let mut rest = data;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(PEER_CHUNK));
            let digest = self.first.then(|| peer_digest(&self.digest));
            let upload_key = if self.first && self.forwards_only { self.upload_key.clone() } else { String::new() };
            self.first = false;
            for b in &mut self.branches {
                let Some(tx) = &b.tx else { continue };
                let chunk = BlobChunk { version: PEER_VERSION, digest: digest.clone(), data: piece.clone(), upload_key: upload_key.clone() };
                if tx.send(chunk).await.is_err() {
                    b.tx = None;
                } else {
                    metrics::counter!(crate::metrics::CAS_TEE_BYTES).increment(piece.len() as u64);
                }
            }
        }
    }

    /// Ends the streams: every byte received was sent. The owners finish (or park) meanwhile.
    pub fn close(&mut self) {
        for b in &mut self.branches {
            b.tx = None;
        }
    }

    /// Closes the streams and waits for the owners' answers.
    pub async fn finish(mut self) -> TeeOutcome {
        self.close();
        let mut out = TeeOutcome { stored: Vec::new(), parked: 0, error: None };
        for b in &mut self.branches {
            let Some(rpc) = b.rpc.take() else { continue };
            let e = match rpc.await {
                Ok(Ok(n)) if n >= self.digest.size => {
                    out.stored.push(b.owner);
                    continue;
                }
                Ok(Ok(n)) => {
                    out.parked = out.parked.max(n);
                    continue;
                }
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => KilnError::invalid(s.message().to_string()),
                Ok(Err(s)) => KilnError::Unavailable(format!("node {}: {}", b.owner, s.message())),
                Err(e) => KilnError::Internal(format!("forwarding to node {}: {e}", b.owner)),
            };
            tracing::debug!(node = b.owner, digest = %self.digest, error = %e, "an owner did not take a forwarded upload");
            out.error.get_or_insert(e);
        }
        out
    }

    /// Cancels the streams: the owners discard what they received.
    pub fn abort(mut self) {
        for b in &mut self.branches {
            if let Some(rpc) = b.rpc.take() {
                rpc.abort();
            }
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Ends the streams without error (an aborted RPC would be a reset): a forwarded upload
        // cut off here stays parked on its owners.
        self.close();
    }
}

/// Blobs examined per step of a repair pass.
const REPAIR_PAGE: usize = 1000;
/// Presence checks up to this many digests run on the calling task, not a blocking thread.
const INLINE_INDEX_READS: usize = 64;

#[derive(Debug, Default, Clone, Copy)]
pub struct RepairStats {
    pub scanned: usize,
    pub pushed: usize,
    pub dropped: usize,
    pub unreachable: usize,
    /// Blobs whose owners could not be confirmed to hold them (asked or pushed in vain).
    pub unconfirmed: usize,
}

/// When the next full repair pass is due. A pass reads every blob of the node and asks their
/// owners about them: its cost grows with the store, so it runs when something may need
/// repair (this node started, the ring changed, a replica could not be pushed, the last pass
/// could not confirm everything) and otherwise only every `full_every`, to catch what no node
/// saw fail (an owner that lost its disk).
#[derive(Default)]
struct RepairState {
    /// Bumped when a replica could not be pushed.
    wanted: std::sync::atomic::AtomicU64,
    /// `wanted` and the ring version as of the start of the last pass that confirmed every
    /// replica, and when that pass started.
    clean: std::sync::Mutex<Option<(u64, u64, std::time::Instant)>>,
}

/// What a client asked to have inlined into a GetActionResult answer.
pub struct Inline<'a> {
    pub stdout: bool,
    pub stderr: bool,
    pub output_files: &'a [String],
}

#[derive(Clone)]
pub struct Storage {
    pub local: BlobStore,
    pub local_ac: ActionCacheStore,
    pub placement: Placement,
    channels: PeerChannels,
    node_id: u64,
    ac_cfg: Arc<ActionCacheConfig>,
    repair: Arc<RepairState>,
}

impl Storage {
    pub fn new(local: BlobStore, local_ac: ActionCacheStore, placement: Placement, channels: PeerChannels, node_id: u64, ac_cfg: ActionCacheConfig) -> Self {
        Self { local, local_ac, placement, channels, node_id, ac_cfg: Arc::new(ac_cfg), repair: Arc::default() }
    }

    /// A ring of this node alone: every call is local.
    fn is_alone(&self) -> bool {
        let ring = self.placement.ring();
        ring.members().len() == 1 && ring.members().contains_key(&self.node_id)
    }

    fn owners(&self, d: &BlobDigest) -> Vec<Owner> {
        self.placement.owners(&d.key())
    }

    fn client(&self, o: &Owner) -> Result<kiln_proto::peer::peer_client::PeerClient<tonic::transport::Channel>> {
        self.channels.client(&o.addr).map_err(|e| KilnError::Unavailable(format!("node {} at {}: {e}", o.id, o.addr)))
    }

    /// Other members, in ring order of `d` after its owners (for reads during a rebalance).
    fn fallbacks(&self, d: &BlobDigest) -> Vec<Owner> {
        let ring = self.placement.ring();
        ring.owners(&d.key(), ring.members().len())
    }

    // ---- CAS ----------------------------------------------------------------------------

    /// The digests of `ds` no owner holds (in request order).
    pub async fn find_missing(&self, ds: Vec<BlobDigest>) -> Result<Vec<BlobDigest>> {
        if self.is_alone() {
            return self.local_find_missing(ds).await;
        }
        // Round r asks each digest's r-th owner, one batched call per node, all nodes at once;
        // what an owner lacks (or an owner that did not answer) goes on to the next owner: a
        // write may have missed a node that was down, and repair has not caught up yet.
        let mut candidates: Vec<BlobDigest> = ds.iter().filter(|d| !d.is_empty_blob()).copied().collect();
        // Digests no owner has answered for yet (usually none): one that no owner could be asked
        // about is not reported missing (a client would upload it in vain) but fails the call.
        let mut unanswered: std::collections::HashSet<BlobDigest> = std::collections::HashSet::new();
        for rank in 0..self.placement.replication_factor {
            if candidates.is_empty() {
                break;
            }
            let mut by_node: BTreeMap<u64, (Owner, Vec<BlobDigest>)> = BTreeMap::new();
            let mut no_owner = Vec::new();
            for d in candidates {
                match self.owners(&d).into_iter().nth(rank) {
                    Some(o) => by_node.entry(o.id).or_insert_with(|| (o, Vec::new())).1.push(d),
                    None => no_owner.push(d),
                }
            }
            let checks = by_node.into_values().map(|(o, part)| async move {
                match self.missing_at(&o, &part).await {
                    Ok(m) => (m, Some(part)),
                    Err(e) => {
                        tracing::warn!(node = o.id, error = %e, "presence check failed; asking the next owners");
                        (part, None)
                    }
                }
            });
            candidates = Vec::new();
            for (m, asked) in futures::future::join_all(checks).await {
                match asked {
                    Some(part) if !unanswered.is_empty() => part.iter().for_each(|d| {
                        unanswered.remove(d);
                    }),
                    Some(_) => {}
                    None if rank == 0 => unanswered.extend(m.iter().copied()),
                    None => {}
                }
                candidates.extend(m);
            }
            if rank == 0 {
                unanswered.extend(no_owner.iter().copied());
            }
            candidates.extend(no_owner);
        }
        if let Some(d) = unanswered.iter().next() {
            return Err(KilnError::Unavailable(format!("no owner of blob {d} could be asked whether it holds it")));
        }
        let still: std::collections::HashSet<BlobDigest> = candidates.into_iter().collect();
        Ok(ds.into_iter().filter(|d| still.contains(d)).collect())
    }

    /// The digests of `ds` this node lacks. A few index reads run in place: handing them to a
    /// blocking thread and back costs more than the reads (Action Cache hits check a handful).
    async fn local_find_missing(&self, ds: Vec<BlobDigest>) -> Result<Vec<BlobDigest>> {
        if ds.len() <= INLINE_INDEX_READS {
            return self.local.find_missing(&ds);
        }
        let local = self.local.clone();
        blocking(move || local.find_missing(&ds)).await
    }

    async fn missing_at(&self, o: &Owner, part: &[BlobDigest]) -> Result<Vec<BlobDigest>> {
        if o.id == self.node_id || o.addr.is_empty() {
            return self.local_find_missing(part.to_vec()).await;
        }
        let req = HasBlobsRequest { version: PEER_VERSION, digests: part.iter().map(peer_digest).collect(), want_indices: true };
        let r = self.client(o)?.has_blobs(req).await.map_err(|s| KilnError::Unavailable(s.message().to_string()))?.into_inner();
        let mut held = vec![false; part.len()];
        for i in r.present_indices {
            if let Some(h) = held.get_mut(i as usize) {
                *h = true;
            }
        }
        if !r.present.is_empty() {
            // A node that predates `want_indices` names the digests.
            let present: std::collections::HashSet<BlobDigest> = r.present.iter().filter_map(|p| from_peer_digest(Some(p)).ok()).collect();
            for (h, d) in held.iter_mut().zip(part) {
                *h |= present.contains(d);
            }
        }
        Ok(part.iter().zip(held).filter(|(_, h)| !h).map(|(d, _)| *d).collect())
    }

    /// Makes sure the blob is in the local store, fetching it from the owners (then the other
    /// members) if needed. False if no node has it.
    pub async fn ensure_local(&self, d: &BlobDigest) -> Result<bool> {
        Ok(self.holds_here(d).await? || self.fetch_here(d).await?)
    }

    /// Whether the local store holds `d`.
    pub async fn holds_here(&self, d: &BlobDigest) -> Result<bool> {
        // One index read at most: in place, like small presence checks.
        self.local.contains(d)
    }

    /// The fetching half of [`Self::ensure_local`], for a blob the local store lacks.
    pub async fn fetch_here(&self, d: &BlobDigest) -> Result<bool> {
        let owners = self.owners(d);
        // Whether some owner (this node counts) said it lacks the blob: if none could be asked,
        // its absence is unknown, not established.
        let mut owner_answered = owners.iter().any(|o| o.id == self.node_id);
        for o in self.fallbacks(d) {
            if o.id == self.node_id {
                continue;
            }
            let r = self.fetch_from(&o, d).await;
            if matches!(r, Ok(false)) && owners.iter().any(|w| w.id == o.id) {
                owner_answered = true;
            }
            match r {
                Ok(true) => {
                    // Read-repair: owners that lack it get it back.
                    let this = self.clone();
                    let dd = *d;
                    tokio::spawn(async move {
                        if let Err(e) = this.replicate(&dd).await {
                            tracing::debug!(digest = %dd, error = %e, "read-repair failed");
                        }
                    });
                    return Ok(true);
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(node = o.id, digest = %d, error = %e, "fetch from peer failed"),
            }
        }
        if !owner_answered {
            return Err(KilnError::Unavailable(format!("no owner of blob {d} could be reached")));
        }
        Ok(false)
    }

    /// A whole-blob read of a large blob this node does not hold (the caller checked), relayed
    /// from an owner as it streams (`None`: small, or no owner answered; the caller then fetches
    /// it into the local store and serves it from there). The owner verified the blob when it stored
    /// it; the relay checks its size. Nothing is kept here: a large blob read through a node
    /// that does not own it would otherwise be written there first, then read.
    pub async fn relay_read(&self, d: &BlobDigest) -> Result<Option<crate::cas::BlobChunks>> {
        if self.is_alone() || d.size < RELAY_READ_ABOVE {
            return Ok(None);
        }
        for o in self.owners(d).into_iter().filter(|o| o.id != self.node_id) {
            let Ok(mut client) = self.client(&o) else { continue };
            let mut s = match client.read_blob(ReadBlobRequest { version: PEER_VERSION, digest: Some(peer_digest(d)) }).await {
                Ok(r) => r.into_inner(),
                Err(st) => {
                    tracing::debug!(node = o.id, digest = %d, error = %st, "relayed read refused; asking the next owner");
                    continue;
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(TEE_CHUNKS);
            let (dd, id) = (*d, o.id);
            tokio::spawn(async move {
                let mut sent = 0u64;
                loop {
                    let item = match s.message().await {
                        Ok(Some(c)) => {
                            sent += c.data.len() as u64;
                            if sent > dd.size {
                                Err(KilnError::Internal(format!("node {id} sent more than the {} bytes of blob {dd}", dd.size)))
                            } else {
                                Ok(c.data)
                            }
                        }
                        Ok(None) if sent == dd.size => return,
                        Ok(None) => Err(KilnError::Unavailable(format!("node {id} ended blob {dd} after {sent} of {} bytes", dd.size))),
                        Err(st) => Err(KilnError::Unavailable(format!("node {id}, reading blob {dd}: {}", st.message()))),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        return;
                    }
                }
            });
            return Ok(Some(rx));
        }
        Ok(None)
    }

    /// Streams `d` from node `o` into the local store (verified on the way).
    async fn fetch_from(&self, o: &Owner, d: &BlobDigest) -> Result<bool> {
        let resp = self.client(o)?.read_blob(ReadBlobRequest { version: PEER_VERSION, digest: Some(peer_digest(d)) }).await;
        let mut s = match resp {
            Ok(r) => r.into_inner(),
            Err(st) if st.code() == tonic::Code::NotFound => return Ok(false),
            Err(st) => return Err(KilnError::Unavailable(st.message().to_string())),
        };
        let local = self.local.clone();
        let dd = *d;
        let mut up = blocking(move || UploadState::start(&local, dd, false)).await?;
        loop {
            match s.message().await {
                Ok(Some(chunk)) => {
                    up = tokio::task::spawn_blocking(move || up.write_owned(chunk.data).map(|()| up))
                        .await
                        .map_err(|e| KilnError::Internal(e.to_string()))??;
                }
                Ok(None) => break,
                Err(st) if st.code() == tonic::Code::NotFound => return Ok(false),
                Err(st) => return Err(KilnError::Unavailable(st.message().to_string())),
            }
        }
        let local = self.local.clone();
        blocking(move || up.finish(&local)).await?;
        Ok(true)
    }

    /// Pushes a locally stored blob to every owner that is not this node, in parallel. Ok once
    /// every reachable owner has it and at least one node (this one counts if it owns it) does.
    pub async fn replicate(&self, d: &BlobDigest) -> Result<()> {
        self.replicate_except(d, &[]).await
    }

    /// [`Self::replicate`], counting the owners in `stored` (by node id) as holding the blob
    /// already: those a [`Tee`] delivered it to.
    pub async fn replicate_except(&self, d: &BlobDigest, stored: &[u64]) -> Result<()> {
        let owners = self.owners(d);
        let self_owner = owners.iter().any(|o| o.id == self.node_id);
        let already = owners.iter().filter(|o| o.id != self.node_id && stored.contains(&o.id)).count();
        let pushes = owners
            .iter()
            .filter(|o| o.id != self.node_id && !stored.contains(&o.id))
            .map(|o| async move { (o.id, self.push_to(o, d).await) });
        let results = futures::future::join_all(pushes).await;
        let mut ok = usize::from(self_owner) + already;
        for (id, r) in &results {
            match r {
                Ok(()) => ok += 1,
                // The owner may hold it already: this node's copy of a blob written again can
                // be dropped by a repair pass (moved to its owners) before it was pushed.
                Err(e) => match owners.iter().find(|o| o.id == *id) {
                    Some(o) if self.missing_at(o, std::slice::from_ref(d)).await.is_ok_and(|m| m.is_empty()) => ok += 1,
                    _ => {
                        self.repair.wanted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(node = id, digest = %d, error = %e, "owner unreachable; blob kept here for repair")
                    }
                },
            }
        }
        if ok == 0 {
            return Err(KilnError::Unavailable(format!("no owner of blob {d} could store it")));
        }
        Ok(())
    }

    /// A tee of a fresh plain upload of `d` (under the client's `upload_key`) to its owners
    /// other than this node, or `None` if there are none (a ring of one, or this node the only
    /// owner reachable).
    pub fn tee(&self, d: &BlobDigest, upload_key: &str) -> Option<Tee> {
        if self.is_alone() {
            return None;
        }
        let owners = self.owners(d);
        let self_owner = owners.iter().any(|o| o.id == self.node_id);
        let others = owners.iter().filter(|o| o.id != self.node_id).count();
        let mut branches = Vec::new();
        for o in owners.into_iter().filter(|o| o.id != self.node_id) {
            let mut client = match self.client(&o) {
                Ok(c) => c,
                // Pushed from the local copy after the upload, or repaired, like any write.
                Err(e) => {
                    tracing::debug!(node = o.id, error = %e, "no tee to an unreachable owner");
                    continue;
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<BlobChunk>(TEE_CHUNKS);
            let rpc = tokio::spawn(async move {
                client.write_blob(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|r| r.into_inner().committed_size.max(0) as u64)
            });
            branches.push(TeeBranch { owner: o.id, tx: Some(tx), rpc: Some(rpc) });
        }
        let forwards_only = !self_owner && branches.len() == others;
        (!branches.is_empty()).then(|| Tee { digest: *d, upload_key: upload_key.to_string(), first: true, forwards_only, branches })
    }

    /// After a forwarded upload that some owners missed (down during it; `stored` are those
    /// that took it): keeps a copy here, fetched from one that has it, for this node's next
    /// repair pass to push to the others once they are back, as for any write that could not
    /// reach every owner.
    pub async fn cover_missed_owners(&self, d: &BlobDigest, stored: &[u64]) {
        let owners = self.owners(d);
        let missed = owners.iter().filter(|o| o.id != self.node_id && !stored.contains(&o.id)).count();
        if missed == 0 {
            return;
        }
        let Some(from) = owners.iter().find(|o| stored.contains(&o.id)) else { return };
        match self.fetch_from(from, d).await {
            Ok(true) => {
                self.repair.wanted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(digest = %d, missed, "owners missed a forwarded upload; blob kept here for repair");
            }
            Ok(false) => tracing::warn!(digest = %d, node = from.id, "owner lost a blob it just stored"),
            Err(e) => tracing::warn!(digest = %d, error = %e, "owners missed a forwarded upload; left to their repair passes"),
        }
    }

    async fn push_to(&self, o: &Owner, d: &BlobDigest) -> Result<()> {
        let local = self.local.clone();
        let dd = *d;
        let opened = blocking(move || local.open_blob(&dd)).await?.ok_or(KilnError::BlobNotFound(*d))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<BlobChunk>(4);
        let digest = peer_digest(d);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut first = true;
            let mut send = |data: Vec<u8>| {
                let chunk = BlobChunk { version: PEER_VERSION, digest: first.then(|| digest.clone()), data: data.into(), ..Default::default() };
                first = false;
                tx.blocking_send(chunk).is_ok()
            };
            match opened {
                OpenBlob::Memory(b) => {
                    if b.is_empty() {
                        send(vec![]);
                    }
                    for c in b.chunks(PEER_CHUNK) {
                        if !send(c.to_vec()) {
                            return;
                        }
                    }
                }
                OpenBlob::File(mut f, _) => {
                    let mut any = false;
                    loop {
                        let mut buf = Vec::with_capacity(PEER_CHUNK);
                        let n = match (&mut f).take(PEER_CHUNK as u64).read_to_end(&mut buf) {
                            Ok(n) => n,
                            Err(_) => return,
                        };
                        if n == 0 {
                            if !any {
                                send(vec![]);
                            }
                            return;
                        }
                        any = true;
                        if !send(buf) {
                            return;
                        }
                    }
                }
            }
        });
        self.client(o)?
            .write_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| KilnError::Unavailable(format!("node {}: {}", o.id, s.message())))?;
        Ok(())
    }

    /// Stores an in-memory blob (checked) and replicates it.
    pub async fn put(&self, d: BlobDigest, data: Bytes) -> Result<()> {
        let local = self.local.clone();
        blocking(move || local.put(&d, data)).await?;
        if d.is_empty_blob() {
            return Ok(());
        }
        self.replicate(&d).await
    }

    /// Stores checked blobs here while every blob goes to its other owners in one `PutBlobs`
    /// per node. This node keeps a copy of the blobs it does not own too: batches carry the
    /// small blobs an action is made of, and a worker often reads them through the node its
    /// client wrote to; the copy also serves the per-blob path (with its checks) and repair for
    /// an owner that did not take a blob (down, or too old to serve `PutBlobs`). A blob fails
    /// only if no owner holds it. One result per blob, in order.
    pub async fn put_checked_many(&self, blobs: Vec<(BlobDigest, Bytes)>) -> Vec<Result<()>> {
        let n = blobs.len();
        if self.is_alone() {
            return self.put_here(blobs).await;
        }
        let owners: Vec<Vec<Owner>> = blobs.iter().map(|(d, _)| self.owners(d)).collect();
        let mine: Vec<bool> = owners.iter().map(|os| os.iter().any(|o| o.id == self.node_id)).collect();
        let ds: Vec<BlobDigest> = blobs.iter().map(|(d, _)| *d).collect();
        let (here, remote) = futures::future::join(self.put_here(blobs.clone()), self.put_to_other_owners(&blobs, owners)).await;
        let mut stored: Vec<Result<()>> = Vec::with_capacity(n);
        let mut stored_by: Vec<usize> = Vec::with_capacity(n);
        for (i, local) in here.into_iter().enumerate() {
            let (taken, retry) = remote[i];
            if mine[i] {
                stored_by.push(taken + usize::from(local.is_ok()));
                stored.push(local);
            } else {
                stored_by.push(taken);
                // The copy here matters only if an owner missed the blob.
                stored.push(if taken > 0 && !retry { Ok(()) } else { local });
            }
        }
        let retry: Vec<bool> = remote.iter().map(|(_, r)| *r).collect();
        let this = self.clone();
        futures::stream::iter(ds.into_iter().zip(stored).zip(stored_by.into_iter().zip(retry)).map(move |((d, r), (n, again))| {
            let this = this.clone();
            async move {
                r?;
                if d.is_empty_blob() || (n > 0 && !again) {
                    return Ok(());
                }
                let pushed = this.replicate(&d).await;
                if n > 0 {
                    return Ok(());
                }
                pushed
            }
        }))
        .buffered(16)
        .collect::<Vec<_>>()
        .await
    }

    /// Stores checked blobs in the local store, on a blocking thread.
    async fn put_here(&self, blobs: Vec<(BlobDigest, Bytes)>) -> Vec<Result<()>> {
        let n = blobs.len();
        if n == 0 {
            return Vec::new();
        }
        let local = self.local.clone();
        match blocking(move || Ok(local.put_checked_many(blobs))).await {
            Ok(v) => v,
            Err(e) => (0..n).map(|_| Err(KilnError::Internal(e.to_string()))).collect(),
        }
    }

    /// Sends each blob to its owners (`owners[i]` for `blobs[i]`) other than this node, one
    /// `PutBlobs` per node, all at once. Per blob: how many took it, and whether one did not.
    async fn put_to_other_owners(&self, blobs: &[(BlobDigest, Bytes)], owners: Vec<Vec<Owner>>) -> Vec<(usize, bool)> {
        let mut out = vec![(0usize, false); blobs.len()];
        let mut by_node: BTreeMap<u64, (Owner, Vec<usize>)> = BTreeMap::new();
        for (i, ((d, _), os)) in blobs.iter().zip(owners).enumerate() {
            if d.is_empty_blob() {
                continue;
            }
            for o in os.into_iter().filter(|o| o.id != self.node_id) {
                by_node.entry(o.id).or_insert_with(|| (o, Vec::new())).1.push(i);
            }
        }
        let puts = by_node.into_values().map(|(o, idx)| {
            let wire: Vec<WholeBlob> = idx.iter().map(|&i| WholeBlob { digest: Some(peer_digest(&blobs[i].0)), data: blobs[i].1.to_vec() }).collect();
            async move {
                let req = PutBlobsRequest { version: PEER_VERSION, blobs: wire };
                match self.client(&o) {
                    Ok(mut c) => match c.put_blobs(req).await {
                        Ok(r) => idx.into_iter().zip(r.into_inner().errors.into_iter().map(|e| e.is_empty()).chain(std::iter::repeat(false))).collect::<Vec<(usize, bool)>>(),
                        Err(e) => {
                            tracing::debug!(node = o.id, error = %e, "batched replica write failed; writing one by one");
                            idx.into_iter().map(|i| (i, false)).collect()
                        }
                    },
                    Err(_) => idx.into_iter().map(|i| (i, false)).collect(),
                }
            }
        });
        for (i, ok) in futures::future::join_all(puts).await.into_iter().flatten() {
            if ok {
                out[i].0 += 1;
            } else {
                out[i].1 = true;
            }
        }
        out
    }

    /// Whole small blobs: those held here in one pass on a blocking thread, the others from
    /// wherever they are. One result per digest, in order.
    pub async fn read_small_many(&self, ds: Vec<BlobDigest>) -> Vec<Result<Option<Bytes>>> {
        // From memory first; only the rest takes a blocking thread.
        let mut first: Vec<Result<Option<Bytes>>> = ds.iter().map(|d| Ok(self.local.read_cached(d))).collect();
        let rest: Vec<usize> = first.iter().enumerate().filter(|(_, r)| matches!(r, Ok(None))).map(|(i, _)| i).collect();
        if !rest.is_empty() {
            let local = self.local.clone();
            let wanted: Vec<BlobDigest> = rest.iter().map(|&i| ds[i]).collect();
            match blocking(move || Ok(wanted.iter().map(|d| local.read_all(d)).collect::<Vec<_>>())).await {
                Ok(v) => {
                    for (i, r) in rest.into_iter().zip(v) {
                        first[i] = r;
                    }
                }
                Err(e) => return ds.iter().map(|_| Err(KilnError::Internal(e.to_string()))).collect(),
            }
        }
        if self.is_alone() {
            return first;
        }
        let first = self.get_from_owners(&ds, first).await;
        let this = self.clone();
        futures::stream::iter(ds.into_iter().zip(first).map(move |(d, r)| {
            let this = this.clone();
            async move {
                match r {
                    Ok(None) => this.read_small(&d).await,
                    other => other,
                }
            }
        }))
        .buffered(16)
        .collect::<Vec<_>>()
        .await
    }

    /// Fills the blobs `found` lacks from their first owners, with one GetBlobs call per owner,
    /// all at once. Not kept locally: this node does not own them, and a repair pass would drop
    /// the copies again. What an owner lacks, or an owner that does not answer, is left for the
    /// per-blob path (next owners, other members, read-repair).
    async fn get_from_owners(&self, ds: &[BlobDigest], mut found: Vec<Result<Option<Bytes>>>) -> Vec<Result<Option<Bytes>>> {
        let mut by_node: BTreeMap<u64, (Owner, Vec<usize>)> = BTreeMap::new();
        for (i, (d, r)) in ds.iter().zip(&found).enumerate() {
            if !matches!(r, Ok(None)) {
                continue;
            }
            if let Some(o) = self.owners(d).into_iter().find(|o| o.id != self.node_id) {
                by_node.entry(o.id).or_insert_with(|| (o, Vec::new())).1.push(i);
            }
        }
        let gets = by_node.into_values().map(|(o, idx)| async move {
            let req = GetBlobsRequest { version: PEER_VERSION, digests: idx.iter().map(|&i| peer_digest(&ds[i])).collect() };
            let got = match self.client(&o) {
                Ok(mut c) => c.get_blobs(req).await.map(|r| r.into_inner().blobs),
                Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            };
            match got {
                // A short answer leaves the rest to the per-blob path.
                Ok(blobs) => idx.into_iter().zip(blobs).collect::<Vec<_>>(),
                Err(e) => {
                    tracing::debug!(node = o.id, error = %e, "batched blob read failed; reading one by one");
                    Vec::new()
                }
            }
        });
        let got: Vec<(usize, BlobDigest, Vec<u8>)> = futures::future::join_all(gets)
            .await
            .into_iter()
            .flatten()
            .filter(|(_, b)| b.found)
            .map(|(i, b)| (i, ds[i], b.data))
            .collect();
        // Checked (off the async threads): a peer's bytes are served only if they hash to the digest.
        let checked = blocking(move || Ok(got.into_iter().filter(|(_, d, data)| crate::cas::check_content(d, data).is_ok()).collect::<Vec<_>>())).await;
        for (i, _, data) in checked.unwrap_or_default() {
            found[i] = Ok(Some(Bytes::from(data)));
        }
        found
    }

    /// A whole small blob, from wherever it is.
    pub async fn read_small(&self, d: &BlobDigest) -> Result<Option<Bytes>> {
        if let Some(b) = self.local.read_cached(d) {
            return Ok(Some(b));
        }
        if !d.is_empty_blob() && !self.ensure_local(d).await? {
            return Ok(None);
        }
        let local = self.local.clone();
        let dd = *d;
        blocking(move || local.read_all(&dd)).await
    }

    // ---- Repair ---------------------------------------------------------------------------

    /// Runs a full [`Self::repair_pass`] if one is due (see [`RepairState`]); `None` if not.
    pub async fn repair_if_due(&self, full_every: std::time::Duration) -> Result<Option<RepairStats>> {
        use std::sync::atomic::Ordering;
        let wanted = self.repair.wanted.load(Ordering::Relaxed);
        let ring = self.placement.version();
        let last = *self.repair.clean.lock().unwrap_or_else(|p| p.into_inner());
        let due = match last {
            Some((w, r, at)) => w != wanted || r != ring || at.elapsed() >= full_every,
            None => true,
        };
        if !due {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        let stats = self.repair_pass().await?;
        metrics::counter!(crate::metrics::REPAIR_PASSES).increment(1);
        metrics::counter!(crate::metrics::REPAIR_SCANNED).increment(stats.scanned as u64);
        // An unreachable owner leaves its blobs unconfirmed too.
        if stats.unconfirmed == 0 {
            *self.repair.clean.lock().unwrap_or_else(|p| p.into_inner()) = Some((wanted, ring, started));
        }
        Ok(Some(stats))
    }

    /// One pass over the blobs this node holds: every owner that lacks one gets it (a write
    /// that missed an owner, an owner that was down, a new owner after a membership change,
    /// a replica lost with a disk), and a copy this node holds without owning it is dropped
    /// once all its owners confirmed they have it (a rebalance completes). Bounded work per
    /// call; nothing is dropped unless every owner answered.
    pub async fn repair_pass(&self) -> Result<RepairStats> {
        let mut stats = RepairStats::default();
        if self.placement.ring().members().len() < 2 {
            return Ok(stats);
        }
        let mut after = None;
        loop {
            let local = self.local.clone();
            let page = blocking(move || local.list_digests(after, REPAIR_PAGE)).await?;
            let Some(last) = page.last().copied() else { break };
            after = Some(last);
            let mut by_owner: BTreeMap<u64, (Owner, Vec<BlobDigest>)> = BTreeMap::new();
            for d in &page {
                for o in self.owners(d) {
                    if o.id != self.node_id {
                        by_owner.entry(o.id).or_insert_with(|| (o.clone(), Vec::new())).1.push(*d);
                    }
                }
            }
            let mut unconfirmed: std::collections::HashSet<BlobDigest> = std::collections::HashSet::new();
            for (_, (o, ds)) in by_owner {
                match self.missing_at(&o, &ds).await {
                    Ok(missing) => {
                        for d in missing {
                            match self.push_to(&o, &d).await {
                                Ok(()) => stats.pushed += 1,
                                Err(_) => {
                                    unconfirmed.insert(d);
                                }
                            }
                        }
                    }
                    Err(_) => {
                        stats.unreachable += 1;
                        unconfirmed.extend(ds);
                    }
                }
            }
            for d in &page {
                let owners = self.owners(d);
                if !owners.iter().any(|o| o.id == self.node_id) && !unconfirmed.contains(d) {
                    let local = self.local.clone();
                    let dd = *d;
                    blocking(move || local.drop_copy(&dd)).await?;
                    stats.dropped += 1;
                }
            }
            stats.scanned += page.len();
            stats.unconfirmed += unconfirmed.len();
            if page.len() < REPAIR_PAGE {
                break;
            }
        }
        if stats.pushed > 0 || stats.dropped > 0 {
            tracing::info!(?stats, "repair pass");
        }
        Ok(stats)
    }

    // ---- Uploads resumed on another node ---------------------------------------------------

    /// The node (other than this one) holding the furthest parked upload under `key`.
    pub async fn remote_upload_status(&self, key: &str) -> Option<(Owner, u64)> {
        let ring = self.placement.ring();
        let asks = ring.members().iter().filter(|(id, _)| **id != self.node_id).map(|(id, addr)| {
            let o = Owner { id: *id, addr: addr.clone() };
            async move {
                let mut c = self.client(&o).ok()?;
                let mut req = tonic::Request::new(UploadKey { version: PEER_VERSION, upload_key: key.to_string() });
                req.set_timeout(std::time::Duration::from_secs(5));
                let r = c.upload_status(req).await.ok()?.into_inner();
                (r.found && !r.compressed).then_some((o, r.committed_size.max(0) as u64))
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().max_by_key(|(_, n)| *n)
    }

    /// Continues here an upload parked on another node: copies the bytes it received into a
    /// new local upload (hashing them as any upload), which the client's Write then extends.
    pub async fn adopt_remote_upload(&self, key: &str, d: BlobDigest) -> Result<Option<UploadState>> {
        let Some((o, size)) = self.remote_upload_status(key).await else { return Ok(None) };
        let mut s = match self.client(&o)?.read_upload(UploadKey { version: PEER_VERSION, upload_key: key.to_string() }).await {
            Ok(r) => r.into_inner(),
            Err(_) => return Ok(None),
        };
        let local = self.local.clone();
        let mut up = blocking(move || UploadState::start(&local, d, false)).await?;
        while let Some(chunk) = s.message().await.map_err(|st| KilnError::Unavailable(st.message().to_string()))? {
            up = tokio::task::spawn_blocking(move || up.write_owned(chunk.data).map(|()| up))
                .await
                .map_err(|e| KilnError::Internal(e.to_string()))??;
        }
        if up.received != size {
            return Ok(None);
        }
        tracing::info!(upload = key, from = o.id, bytes = size, "resuming an upload started on another node");
        Ok(Some(up))
    }

    // ---- Action Cache ---------------------------------------------------------------------

    fn ac_owners(&self, action: &BlobDigest) -> Vec<Owner> {
        self.placement.owners(&action.key())
    }

    async fn ac_load_from(&self, o: &Owner, instance: &str, action: &BlobDigest) -> Result<Option<ActionResult>> {
        if o.id == self.node_id {
            // One index read: in place, like small presence checks.
            return self.local_ac.load(instance, action);
        }
        let key = ActionResultKey { version: PEER_VERSION, instance_name: instance.to_string(), action: Some(peer_digest(action)) };
        let e = self.client(o)?.get_action_result(key).await.map_err(|s| KilnError::Unavailable(s.message().to_string()))?.into_inner();
        if !e.found {
            return Ok(None);
        }
        ActionResult::decode(&e.action_result[..]).map(Some).map_err(|e| KilnError::Internal(format!("peer's action result does not decode: {e}")))
    }

    /// The stored result of `action`, if every blob it references is present anywhere.
    pub async fn ac_get(&self, instance: &str, action: &BlobDigest, inline: Inline<'_>) -> Result<Option<ActionResult>> {
        let mut found = None;
        for o in self.ac_owners(action) {
            match self.ac_load_from(&o, instance, action).await {
                Ok(Some(r)) => {
                    found = Some(r);
                    break;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(node = o.id, error = %e, "action cache owner did not answer"),
            }
        }
        let Some(mut result) = found else { return Ok(None) };
        if !self.all_blobs_present(action.function, &result).await? {
            tracing::info!(action = %action, "action result references evicted blobs: reported missing");
            return Ok(None);
        }
        self.inline(action.function, &mut result, inline).await?;
        Ok(Some(result))
    }

    /// Stores `result` on every owner. In write-once mode an existing, still complete result
    /// stays and is returned instead.
    pub async fn ac_update(&self, instance: &str, action: &BlobDigest, result: ActionResult) -> Result<ActionResult> {
        validate_result(action.function, &result)?;
        if self.ac_cfg.write_once {
            if let Some(existing) = self.ac_get(instance, action, Inline { stdout: false, stderr: false, output_files: &[] }).await? {
                if existing != result {
                    tracing::info!(action = %action, "write-once action cache kept the first result");
                }
                return Ok(existing);
            }
        }
        let writes = self.ac_owners(action).into_iter().map(|o| {
            let r = result.clone();
            let instance = instance.to_string();
            let action = *action;
            async move {
                if o.id == self.node_id {
                    return self.local_ac.put_async(&instance, &action, &r).await;
                }
                let entry = ActionResultEntry {
                    version: PEER_VERSION,
                    key: Some(ActionResultKey { version: PEER_VERSION, instance_name: instance, action: Some(peer_digest(&action)) }),
                    action_result: r.encode_to_vec(),
                    found: true,
                };
                self.client(&o)?.put_action_result(entry).await.map_err(|s| KilnError::Unavailable(s.message().to_string()))?;
                Ok(())
            }
        });
        let results = futures::future::join_all(writes).await;
        if !results.iter().any(|r| r.is_ok()) {
            return Err(KilnError::Unavailable(format!("no owner of the action cache entry of {action} could store it")));
        }
        Ok(result)
    }

    async fn all_blobs_present(&self, f: DigestFunction, result: &ActionResult) -> Result<bool> {
        fn push(f: DigestFunction, out: &mut Vec<BlobDigest>, d: Option<&reapi::Digest>) -> Result<()> {
            if let Some(d) = d {
                out.push(BlobDigest::from_proto(f, d)?);
            }
            Ok(())
        }
        let mut digests: Vec<BlobDigest> = Vec::new();
        for o in &result.output_files {
            push(f, &mut digests, o.digest.as_ref())?;
        }
        push(f, &mut digests, result.stdout_digest.as_ref())?;
        push(f, &mut digests, result.stderr_digest.as_ref())?;
        for dir in &result.output_directories {
            // DIRECTORY_ONLY results name only the root Directory: its presence is checked,
            // its files are the client's to fetch through GetTree.
            push(f, &mut digests, dir.root_directory_digest.as_ref())?;
            let Some(td) = dir.tree_digest.as_ref() else { continue };
            let td = BlobDigest::from_proto(f, td)?;
            let Some(bytes) = self.read_small(&td).await? else { return Ok(false) };
            let tree = reapi::Tree::decode(bytes).map_err(|e| KilnError::Internal(format!("output tree {td} does not decode: {e}")))?;
            for d in tree.root.iter().chain(tree.children.iter()) {
                for file in &d.files {
                    push(f, &mut digests, file.digest.as_ref())?;
                }
            }
            if digests.len() > MAX_REFERENCED_BLOBS {
                return Err(KilnError::invalid(format!("action result references over {MAX_REFERENCED_BLOBS} blobs")));
            }
        }
        Ok(self.find_missing(digests).await?.is_empty())
    }

    async fn inline(&self, f: DigestFunction, r: &mut ActionResult, want: Inline<'_>) -> Result<()> {
        let mut budget = self.ac_cfg.max_inline_bytes;
        let mut fetched: HashMap<BlobDigest, Bytes> = HashMap::new();
        let mut wanted: Vec<Option<reapi::Digest>> = Vec::new();
        if want.stdout && r.stdout_raw.is_empty() {
            wanted.push(r.stdout_digest.clone());
        }
        if want.stderr && r.stderr_raw.is_empty() {
            wanted.push(r.stderr_digest.clone());
        }
        for o in &r.output_files {
            if want.output_files.contains(&o.path) && o.contents.is_empty() {
                wanted.push(o.digest.clone());
            }
        }
        for d in wanted.into_iter().flatten() {
            let d = BlobDigest::from_proto(f, &d)?;
            if d.size > budget || fetched.contains_key(&d) {
                continue;
            }
            if let Some(b) = self.read_small(&d).await? {
                budget -= d.size;
                fetched.insert(d, b);
            }
        }
        let get = |d: &Option<reapi::Digest>| d.as_ref().and_then(|d| BlobDigest::from_proto(f, d).ok()).and_then(|d| fetched.get(&d)).map(|b| b.to_vec());
        if want.stdout && r.stdout_raw.is_empty() {
            r.stdout_raw = get(&r.stdout_digest).unwrap_or_default();
        }
        if want.stderr && r.stderr_raw.is_empty() {
            r.stderr_raw = get(&r.stderr_digest).unwrap_or_default();
        }
        for o in r.output_files.iter_mut() {
            if want.output_files.contains(&o.path) && o.contents.is_empty() {
                o.contents = get(&o.digest).unwrap_or_default();
            }
        }
        Ok(())
    }
}
