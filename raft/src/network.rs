//! The peer network openraft uses to reach other nodes: Kiln's peer protocol over gRPC.
//!
//! Raft messages travel as payloads of the versioned [`crate::codec`] inside the protobuf
//! envelope of `kiln.peer.v1.Peer`; the server side lives in the node (`services/peer.rs`).
//! Channels are created lazily per target and reused; every call is bounded by openraft's TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::peer::{peer_client::PeerClient as GrpcPeer, RaftRequest, PEER_VERSION};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{de::DeserializeOwned, Serialize};
use tonic::transport::Channel;

use crate::codec;
use crate::types::{Node, NodeId, TypeConfig};

/// Format version of Raft payloads on the wire.
pub const RAFT_PAYLOAD_V1: u8 = 1;
/// Largest peer message (snapshots are sent whole).
pub const MAX_PEER_MESSAGE: usize = 256 << 20;

/// One lazily connected channel per peer address, shared by all users of the network, and
/// the command format each peer last said it reads.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    command_versions: Arc<Mutex<HashMap<String, u32>>>,
}

impl PeerChannels {
    /// The command format the peer at `addr` reads, as of its last Raft response (0 before one).
    pub fn command_version(&self, addr: &str) -> u32 {
        self.command_versions.lock().unwrap_or_else(|p| p.into_inner()).get(addr).copied().unwrap_or(0)
    }

    fn note_command_version(&self, addr: &str, version: u32) {
        let mut m = self.command_versions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(addr) != Some(&version) {
            tracing::info!(peer = addr, command_version = version, "peer command format");
            m.insert(addr.to_string(), version);
        }
    }

    /// A channel to `addr` (`host:port`), created on first use.
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut m = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let c = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(8 << 20)
            .max_frame_size(1 << 20)
            .connect_lazy();
        m.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    pub fn client(&self, addr: &str) -> Result<GrpcPeer<Channel>, tonic::transport::Error> {
        Ok(GrpcPeer::new(self.get(addr)?).max_decoding_message_size(MAX_PEER_MESSAGE).max_encoding_message_size(MAX_PEER_MESSAGE))
    }
}

#[derive(Clone, Default)]
pub struct PeerNetwork {
    pub channels: PeerChannels,
}

pub struct PeerClient {
    target: NodeId,
    node: Node,
    channels: PeerChannels,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient { target, node: node.clone(), channels: self.channels.clone() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

/// Encodes a Raft message for the wire.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    codec::encode(RAFT_PAYLOAD_V1, v)
}

/// Decodes a Raft message from the wire.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (v, body) = codec::split(bytes).map_err(|e| e.to_string())?;
    if v != RAFT_PAYLOAD_V1 {
        return Err(format!("raft payload has format version {v}, this node reads {RAFT_PAYLOAD_V1}"));
    }
    codec::decode_body(body).map_err(|e| e.to_string())
}

enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, E>> {
        let unreachable = |e: &dyn std::error::Error| RPCError::Unreachable(Unreachable::new(&WireError(e.to_string())));
        let mut client = self.channels.client(&self.node.addr).map_err(|e| unreachable(&e))?;
        let mut request = tonic::Request::new(RaftRequest { version: PEER_VERSION, payload: encode(req) });
        request.set_timeout(option.hard_ttl());
        let resp = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) => {
                return Err(unreachable(&s));
            }
            Err(s) => return Err(RPCError::Network(NetworkError::new(&WireError(s.to_string())))),
        };
        self.channels.note_command_version(&self.node.addr, resp.command_version);
        if !resp.error.is_empty() {
            let e: E = decode(&resp.error).map_err(|e| RPCError::Network(NetworkError::new(&WireError(e))))?;
            return Err(RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)));
        }
        decode(&resp.payload).map_err(|e| RPCError::Network(NetworkError::new(&WireError(e))))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
