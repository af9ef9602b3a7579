//! Connections to the server under test, and the REAPI clients over them.
//!
//! Every connection is a `tonic::transport::Endpoint` with `TCP_NODELAY` (without it, Nagle's
//! algorithm holds back the small tail segment of a message until the previous one is
//! acknowledged, which adds up to the delayed-ACK timeout — tens of milliseconds — to small
//! calls). The HTTP/2 windows match the ones Kiln's server sets (4 MiB per stream, 8 MiB per
//! connection), so a large read is not throttled to one default window per round trip, and
//! frames of up to 1 MiB are accepted. ByteStream reads decode each chunk as a slice of the
//! receive buffer ([`ReadChunk`]).
//!
//! Operations are spread round-robin over a small pool of connections, as a build tool with
//! several channels would: one HTTP/2 connection is driven by one task, and at concurrency 16
//! a single connection would measure that task rather than the server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::ReadRequest;
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use tonic::transport::{Channel, Endpoint};

/// Largest gRPC message the clients send or accept: room for a 4 MiB batch and its framing.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
/// HTTP/2 flow-control window per stream, in bytes (Kiln's server uses the same).
const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection, in bytes.
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;
/// Largest HTTP/2 frame the server may send (SETTINGS_MAX_FRAME_SIZE). With the 16 KiB default
/// a server makes one socket write per 16 KiB of a read; Kiln's own worker and peers ask for
/// the same 1 MiB.
const MAX_FRAME_BYTES: u32 = 1 << 20;
/// Time allowed to establish one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `google.bytestream.ReadResponse` with `data` (field 10) as `Bytes`: decoded as a slice of
/// the receive buffer instead of being copied into a `Vec`, as a client that only counts,
/// hashes or writes out the bytes would. Its wire format is `ReadResponse`'s.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadChunk {
    #[prost(bytes = "bytes", tag = "10")]
    pub data: bytes::Bytes,
}

/// A pool of connections to one server and the instance name every request carries.
#[derive(Debug)]
pub struct Clients {
    channels: Vec<Channel>,
    next: AtomicUsize,
    pub instance: String,
}

/// `grpc://host:port` (the REAPI convention, as Bazel writes it), `http://…` or a bare
/// `host:port`, as the `http://` URI tonic wants. TLS is not supported by this tool yet.
pub fn normalize_endpoint(endpoint: &str) -> anyhow::Result<String> {
    if let Some(rest) = endpoint.strip_prefix("grpc://") {
        return Ok(format!("http://{rest}"));
    }
    if endpoint.starts_with("grpcs://") || endpoint.starts_with("https://") {
        bail!("{endpoint}: TLS endpoints are not supported by kiln-load yet");
    }
    if endpoint.starts_with("http://") {
        return Ok(endpoint.to_string());
    }
    if endpoint.contains("://") {
        bail!("{endpoint}: unknown scheme (use grpc://host:port)");
    }
    Ok(format!("http://{endpoint}"))
}

impl Clients {
    /// Opens `connections` connections to `endpoint` (at least one).
    pub async fn connect(
        endpoint: &str,
        connections: usize,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let uri = normalize_endpoint(endpoint)?;
        let ep = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("endpoint {endpoint}"))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .initial_stream_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .max_frame_size(MAX_FRAME_BYTES);
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            channels.push(
                ep.connect()
                    .await
                    .with_context(|| format!("connecting to {uri}"))?,
            );
        }
        Ok(Self {
            channels,
            next: AtomicUsize::new(0),
            instance: instance.to_string(),
        })
    }

    /// The next connection, round-robin.
    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }

    pub fn connections(&self) -> usize {
        self.channels.len()
    }

    pub fn bytestream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// ByteStream.Read, with each response's bytes left in the buffer they were received into
    /// (see [`ReadChunk`]).
    pub async fn read_chunks(&self, req: ReadRequest) -> Result<tonic::Streaming<ReadChunk>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<ReadRequest, ReadChunk>::default();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/google.bytestream.ByteStream/Read");
        Ok(grpc.server_streaming(tonic::Request::new(req), path, codec).await?.into_inner())
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn action_cache(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn execution(&self) -> ExecutionClient<Channel> {
        ExecutionClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn capabilities(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_in_the_forms_build_tools_write() {
        assert_eq!(
            normalize_endpoint("grpc://127.0.0.1:8980").unwrap(),
            "http://127.0.0.1:8980"
        );
        assert_eq!(
            normalize_endpoint("127.0.0.1:8980").unwrap(),
            "http://127.0.0.1:8980"
        );
        assert_eq!(normalize_endpoint("http://h:1").unwrap(), "http://h:1");
        assert!(normalize_endpoint("grpcs://h:1").is_err());
        assert!(normalize_endpoint("ftp://h:1").is_err());
    }
}
