//! Connections to the server under test, and the REAPI clients over them.
//!
//! Every connection is a `tonic::transport::Endpoint` with `TCP_NODELAY` (without it, Nagle's
//! algorithm holds back the small tail segment of a message until the previous one is
//! acknowledged, which adds up to the delayed-ACK timeout — tens of milliseconds — to small
//! calls). The HTTP/2 windows match the ones Kiln's server sets (4 MiB per stream, 8 MiB per
//! connection), so a large read is not throttled to one default window per round trip, and
//! frames of up to 1 MiB are accepted. The timed ByteStream reads count the bytes where h2
//! received them ([`Clients::read_counted`]).
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

/// Protobuf key of `ReadResponse.data`: field 10, length-delimited.
const READ_DATA_KEY: u8 = (10 << 3) | 2;

/// Counts the data bytes of a stream of gRPC-framed `ReadResponse` messages fed in pieces of
/// any size (HTTP/2 DATA frames), parsing only the framing: the 5-byte gRPC prefix, the
/// field key and the length of `data`. The bytes themselves are skipped where they lie.
#[derive(Debug, Default)]
pub struct ReadResponseCounter {
    /// Header bytes of the current message gathered so far (they may straddle frames).
    head: Vec<u8>,
    state: CounterState,
    /// Data bytes counted so far.
    pub data_bytes: u64,
    pub messages: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum CounterState {
    /// Gathering the 5-byte gRPC message prefix.
    #[default]
    Prefix,
    /// Gathering the field key and length of a message of this many bytes.
    Field { message: u64 },
    /// Skipping this many data bytes.
    Data { left: u64 },
}

impl ReadResponseCounter {
    pub fn feed(&mut self, mut buf: &[u8]) -> anyhow::Result<()> {
        while !buf.is_empty() {
            match self.state {
                CounterState::Prefix => {
                    let take = (5 - self.head.len()).min(buf.len());
                    self.head.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if self.head.len() < 5 {
                        continue;
                    }
                    if self.head[0] != 0 {
                        bail!("ReadResponse arrived compressed (flag {}) without being asked to", self.head[0]);
                    }
                    let message = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]) as u64;
                    self.head.clear();
                    self.messages += 1;
                    // An empty ReadResponse (no data) is an empty message.
                    if message > 0 {
                        self.state = CounterState::Field { message };
                    }
                }
                CounterState::Field { message } => {
                    self.head.push(buf[0]);
                    buf = &buf[1..];
                    if self.head[0] != READ_DATA_KEY {
                        bail!("ReadResponse holds a field other than data (key {:#x})", self.head[0]);
                    }
                    let Some(&last) = self.head.last() else { continue };
                    if self.head.len() == 1 || last & 0x80 != 0 {
                        if self.head.len() > 11 {
                            bail!("ReadResponse data length is not a varint");
                        }
                        continue;
                    }
                    let mut len = 0u64;
                    for (i, b) in self.head[1..].iter().enumerate() {
                        len |= u64::from(b & 0x7f) << (7 * i);
                    }
                    let header = self.head.len() as u64;
                    if header + len != message {
                        bail!("ReadResponse of {message} bytes holds {len} data bytes after a {header}-byte header: one data field expected");
                    }
                    self.head.clear();
                    self.state = if len == 0 { CounterState::Prefix } else { CounterState::Data { left: len } };
                }
                CounterState::Data { left } => {
                    let take = left.min(buf.len() as u64);
                    buf = &buf[take as usize..];
                    self.data_bytes += take;
                    self.state = if take == left { CounterState::Prefix } else { CounterState::Data { left: left - take } };
                }
            }
        }
        Ok(())
    }

    /// Whether the stream ended between messages.
    pub fn at_boundary(&self) -> bool {
        self.state == CounterState::Prefix && self.head.is_empty()
    }
}

/// The gRPC status carried by `headers` (trailers, or the headers of a trailers-only
/// response), if any: an error unless it is OK.
fn grpc_status(headers: &tonic::codegen::http::HeaderMap) -> Option<Result<(), tonic::Status>> {
    let status = tonic::Status::from_header_map(headers)?;
    Some(if status.code() == tonic::Code::Ok { Ok(()) } else { Err(status) })
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

    /// ByteStream.Read as plain HTTP/2 through one of the connections, returning the number of
    /// data bytes received. The body's frames are walked where h2 received them and only the
    /// `ReadResponse` framing is parsed ([`ReadResponseCounter`]); tonic's decoder would first
    /// copy every frame into a buffer of its own, and that copy, on the machine the server
    /// shares, is measured against the server. The status comes from the trailers (or from
    /// the headers of a trailers-only answer), as gRPC defines it.
    pub async fn read_counted(&self, req: &ReadRequest) -> anyhow::Result<u64> {
        use http_body_util::BodyExt;
        use tonic::codegen::{http, Service};

        let message = prost::Message::encode_to_vec(req);
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri("/google.bytestream.ByteStream/Read")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(framed))))
            .context("building a Read request")?;
        let mut channel = self.channel();
        futures::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .context("connection not ready")?;
        let response = channel.call(request).await.context("sending a Read request")?;
        let (parts, mut body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            bail!("Read answered HTTP status {}", parts.status);
        }
        if let Some(status) = grpc_status(&parts.headers) {
            status?;
            return Ok(0);
        }
        let mut counter = ReadResponseCounter::default();
        let mut status = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(data) => counter.feed(&data)?,
                Err(other) => {
                    if let Some(trailers) = other.trailers_ref() {
                        status = grpc_status(trailers);
                    }
                }
            }
        }
        match status {
            Some(s) => s?,
            None => bail!("Read ended without a gRPC status"),
        }
        if !counter.at_boundary() {
            bail!("Read ended inside a message");
        }
        Ok(counter.data_bytes)
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

    fn framed(data: &[u8]) -> Vec<u8> {
        let message = prost::Message::encode_to_vec(&kiln_proto::bytestream::ReadResponse { data: data.to_vec() });
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(&message);
        out
    }

    #[test]
    fn read_responses_are_counted_whatever_the_frames_they_arrive_in() {
        let sizes = [0usize, 1, 127, 128, 300, 16_384, 70_000];
        let mut wire = Vec::new();
        for n in sizes {
            wire.extend(framed(&vec![7u8; n]));
        }
        let total: usize = sizes.iter().sum();
        for piece in [1usize, 2, 3, 5, 6, 7, 64, 1000, 65_536, wire.len()] {
            let mut c = ReadResponseCounter::default();
            for part in wire.chunks(piece) {
                c.feed(part).unwrap();
            }
            assert_eq!(c.data_bytes, total as u64, "pieces of {piece}");
            assert_eq!(c.messages, sizes.len() as u64);
            assert!(c.at_boundary());
        }
        let mut c = ReadResponseCounter::default();
        c.feed(&wire[..wire.len() - 1]).unwrap();
        assert!(!c.at_boundary(), "a stream cut inside a message is not complete");
    }

    #[test]
    fn other_encodings_of_read_responses_are_refused() {
        let mut compressed = framed(b"abc");
        compressed[0] = 1;
        assert!(ReadResponseCounter::default().feed(&compressed).is_err());
        // Field 1 instead of 10.
        assert!(ReadResponseCounter::default().feed(&[0, 0, 0, 0, 3, 0x0a, 1, b'x']).is_err());
        // A message longer than its one data field.
        assert!(ReadResponseCounter::default().feed(&[0, 0, 0, 0, 4, READ_DATA_KEY, 1, b'x', b'y']).is_err());
    }
}
