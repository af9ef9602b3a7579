//! Shared helpers of the node's integration tests: a real node on 127.0.0.1 (port 0) with its
//! own temp data dir, real tonic clients, digest helpers.
#![allow(dead_code)]

use std::time::Duration;

use kiln_node::config::Config;
use kiln_node::server::RunningNode;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::capabilities_client::CapabilitiesClient;
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest, Digest};
use sha2::Digest as _;
use tonic::transport::Channel;

pub struct TestNode {
    pub node: Option<RunningNode>,
    pub dir: tempfile::TempDir,
    pub channel: Channel,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::dev();
    cfg.node.listen = "127.0.0.1:0".parse().unwrap();
    cfg.node.http = "127.0.0.1:0".parse().unwrap();
    cfg.node.data_dir = dir.to_path_buf();
    cfg
}

pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the test node")
}

impl TestNode {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        // Logs of the node under test, shown for failing tests (RUST_LOG=info to see them).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        tweak(&mut cfg);
        let node = kiln_node::server::start(cfg).await.expect("node starts");
        let channel = connect(node.grpc_addr).await;
        Self { node: Some(node), dir, channel }
    }

    pub fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    pub fn bs(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
    }
    pub fn ac(&self) -> ActionCacheClient<Channel> {
        ActionCacheClient::new(self.channel.clone())
    }
    pub fn caps(&self) -> CapabilitiesClient<Channel> {
        CapabilitiesClient::new(self.channel.clone())
    }

    /// A node on the data of one stopped before (sled releases its lock shortly after close).
    pub async fn restart(dir: tempfile::TempDir) -> Self {
        let mut tries = 0;
        loop {
            match kiln_node::server::start(test_config(dir.path())).await {
                Ok(node) => {
                    let channel = connect(node.grpc_addr).await;
                    return Self { node: Some(node), dir, channel };
                }
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!(error = %e, "restart: retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("node restarts: {e}"),
            }
        }
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(n) = self.node.take() {
            n.shutdown().await;
        }
        self.dir
    }
}

pub fn sha256(data: &[u8]) -> Digest {
    Digest { hash: hex::encode(sha2::Sha256::digest(data)), size_bytes: data.len() as i64 }
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no RNG crate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn blob_resource(instance: &str, d: &Digest) -> String {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    format!("{prefix}blobs/{}/{}", d.hash, d.size_bytes)
}

pub fn upload_resource(instance: &str, uuid: &str, d: &Digest) -> String {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    format!("{prefix}uploads/{uuid}/blobs/{}/{}", d.hash, d.size_bytes)
}

/// Write requests carrying `data` from `offset` in `chunk`-sized pieces, finishing if asked.
pub fn write_requests(resource: &str, data: &[u8], offset: usize, chunk: usize, finish: bool) -> Vec<WriteRequest> {
    let mut reqs = Vec::new();
    let mut pos = offset;
    loop {
        let end = (pos + chunk).min(data.len());
        let last = end == data.len();
        reqs.push(WriteRequest {
            resource_name: if reqs.is_empty() { resource.to_string() } else { String::new() },
            write_offset: pos as i64,
            finish_write: last && finish,
            data: data[pos..end].to_vec(),
        });
        pos = end;
        if last {
            break;
        }
    }
    reqs
}

pub async fn bs_write(node: &TestNode, resource: &str, data: &[u8]) -> Result<i64, tonic::Status> {
    let reqs = write_requests(resource, data, 0, 64 << 10, true);
    node.bs().write(futures::stream::iter(reqs)).await.map(|r| r.into_inner().committed_size)
}

pub async fn bs_read(node: &TestNode, resource: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let mut s = node
        .bs()
        .read(ReadRequest { resource_name: resource.to_string(), read_offset: offset, read_limit: limit })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

pub async fn batch_upload(node: &TestNode, instance: &str, blobs: &[&[u8]]) -> Vec<Digest> {
    let requests = blobs
        .iter()
        .map(|b| batch_update_blobs_request::Request { digest: Some(sha256(b)), data: b.to_vec(), compressor: 0 })
        .collect();
    let resp = node
        .cas()
        .batch_update_blobs(BatchUpdateBlobsRequest { instance_name: instance.into(), requests, digest_function: 0 })
        .await
        .unwrap()
        .into_inner();
    for r in &resp.responses {
        assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
    }
    blobs.iter().map(|b| sha256(b)).collect()
}

/// A loopback port no other caller in this run has been given. Each test process takes
/// ports from its own block below the kernel's ephemeral range (so neither a sibling test
/// process nor an outgoing connection is handed the same one), skipping any already bound.
/// A port a node binds later must stay distinct from every other one it was handed, which
/// asking the kernel for port 0 twice does not promise.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u32 = 10_000;
    const BLOCK: u32 = 40;
    const BLOCKS: u32 = 500; // up to 30_000, under the ephemeral range
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let block = std::process::id() % BLOCKS;
    loop {
        let i = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        // Past its own block a process walks on into the following ones.
        let port = FIRST + (block * BLOCK + i) % (BLOCK * BLOCKS);
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
        assert!(i < BLOCK * BLOCKS, "no free loopback port");
    }
}

/// A real `kiln` process (the binary under test) on free loopback ports.
pub struct KilnProcess {
    child: std::process::Child,
    pub grpc: std::net::SocketAddr,
}

impl KilnProcess {
    /// `kiln dev` on `data`, with its embedded worker.
    pub async fn dev(data: &std::path::Path) -> (Self, ProcessClient) {
        let grpc: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let http = format!("127.0.0.1:{}", free_port());
        let mut args: Vec<String> = vec!["dev".into(), "--listen".into(), grpc.to_string(), "--http".into(), http, "--data".into()];
        args.push(data.display().to_string());
        Self::spawn(&args, grpc).await
    }

    /// `kiln serve --config FILE`; the file must listen on `grpc`.
    pub async fn serve(config: &std::path::Path, grpc: std::net::SocketAddr) -> (Self, ProcessClient) {
        Self::spawn(&["serve".to_string(), "--config".to_string(), config.display().to_string()], grpc).await
    }

    async fn spawn(args: &[String], grpc: std::net::SocketAddr) -> (Self, ProcessClient) {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn kiln");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{grpc}")).unwrap().connect().await {
                return (Self { child, grpc }, ProcessClient { channel: ch });
            }
            assert!(std::time::Instant::now() < deadline, "kiln did not start serving on {grpc}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for KilnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct ProcessClient {
    pub channel: Channel,
}

impl ProcessClient {
    pub async fn write(&self, resource: &str, data: &[u8]) {
        let reqs = write_requests(resource, data, 0, 64 << 10, true);
        ByteStreamClient::new(self.channel.clone()).write(futures::stream::iter(reqs)).await.unwrap();
    }

    pub async fn read(&self, resource: &str) -> Result<Vec<u8>, tonic::Status> {
        let mut s = ByteStreamClient::new(self.channel.clone())
            .read(ReadRequest { resource_name: resource.into(), read_offset: 0, read_limit: 0 })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = s.message().await? {
            out.extend(m.data);
        }
        Ok(out)
    }
}

// ---- Build events ---------------------------------------------------------------------------

pub mod bes {
    use kiln_proto::bes::publish_build_event_client::PublishBuildEventClient;
    use kiln_proto::bes::{
        build_event, BuildEvent, OrderedBuildEvent, PublishBuildToolEventStreamRequest, PublishLifecycleEventRequest, StreamId,
    };
    use kiln_proto::events::build_events_client::BuildEventsClient;
    use kiln_proto::events::{Event, ReadEventsRequest};
    use tonic::transport::Channel;

    pub const TOOL: i32 = 3;
    pub const CONTROLLER: i32 = 1;

    pub fn stream(build: &str, invocation: &str, component: i32) -> StreamId {
        StreamId { build_id: build.into(), invocation_id: invocation.into(), component }
    }

    /// A tool event: a Bazel event (an Any carrying `payload`), or the stream's last event.
    pub fn tool_event(id: &StreamId, seq: i64, payload: &[u8], last: bool) -> PublishBuildToolEventStreamRequest {
        let event = if last {
            build_event::Event::ComponentStreamFinished(build_event::BuildComponentStreamFinished { r#type: 1 })
        } else {
            build_event::Event::BazelEvent(prost_types::Any { type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(), value: payload.to_vec() })
        };
        PublishBuildToolEventStreamRequest {
            ordered_build_event: Some(OrderedBuildEvent {
                stream_id: Some(id.clone()),
                sequence_number: seq,
                event: Some(BuildEvent { event_time: Some(prost_types::Timestamp { seconds: 1_700_000_000 + seq, nanos: 0 }), event: Some(event) }),
            }),
            ..Default::default()
        }
    }

    pub fn lifecycle(id: &StreamId, seq: i64, event: build_event::Event) -> PublishLifecycleEventRequest {
        PublishLifecycleEventRequest {
            service_level: 1,
            build_event: Some(OrderedBuildEvent {
                stream_id: Some(id.clone()),
                sequence_number: seq,
                event: Some(BuildEvent { event_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }), event: Some(event) }),
            }),
            ..Default::default()
        }
    }

    /// Sends `reqs` on one PublishBuildToolEventStream call: the acknowledged sequence numbers,
    /// in the order they came, and the status the call ended with.
    pub async fn publish(ch: &Channel, reqs: Vec<PublishBuildToolEventStreamRequest>) -> (Vec<i64>, Result<(), tonic::Status>) {
        let mut client = PublishBuildEventClient::new(ch.clone());
        let mut acks = Vec::new();
        let mut responses = match client.publish_build_tool_event_stream(futures::stream::iter(reqs)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return (acks, Err(s)),
        };
        loop {
            match responses.message().await {
                Ok(Some(a)) => acks.push(a.sequence_number),
                Ok(None) => return (acks, Ok(())),
                Err(s) => return (acks, Err(s)),
            }
        }
    }

    pub async fn read_all(ch: &Channel, stream_id: &str) -> Result<Vec<Event>, tonic::Status> {
        let mut c = BuildEventsClient::new(ch.clone());
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = c.read_events(ReadEventsRequest { stream_id: stream_id.into(), after_sequence_number: after, page_size: 3 }).await?.into_inner();
            out.extend(page.events.iter().cloned());
            if page.events.is_empty() || page.complete {
                return Ok(out);
            }
            after = page.next_after_sequence_number;
        }
    }
}

/// The body of an HTTP/1.0 GET on the node's HTTP port (metrics, status pages).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text)
}

/// The value of an unlabelled counter or gauge in a Prometheus text page (0 if absent).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

/// A ByteStream Read of a log stream, retried while the stream does not exist yet (the worker
/// creates it as it starts the command).
pub async fn open_log_stream(ch: &Channel, name: &str, deadline: tokio::time::Instant) -> tonic::Streaming<kiln_proto::bytestream::ReadResponse> {
    let mut bs = ByteStreamClient::new(ch.clone());
    loop {
        match bs.read(ReadRequest { resource_name: name.to_string(), read_offset: 0, read_limit: 0 }).await {
            Ok(s) => return s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("reading log stream {name}: {s:?}"),
        }
    }
}
