//! Live output: while a command runs, its stdout and stderr files are tailed into log streams
//! of the action (LogStream v1), so a client can watch them through ByteStream Read on any
//! node. Best effort: if a stream cannot be written (the node went away), the action goes on
//! and its full output still comes back through the CAS.
//!
//! The streams are created once the command has run for [`LIVE_AFTER`]: most actions end
//! sooner, and for them two stream creations and two writes would cost more than the action
//! (about a fifth of the throughput of trivial actions). Their output is in the result. A
//! reader that comes early gets NOT_FOUND and retries, as it would before the worker started.

use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::logstream::log_stream_service_client::LogStreamServiceClient;
use kiln_proto::logstream::CreateLogStreamRequest;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

/// How often a running command's output files are checked for new bytes.
const POLL: Duration = Duration::from_millis(200);
/// A command that runs this long gets live streams.
pub const LIVE_AFTER: Duration = POLL;
/// Bytes per WriteRequest.
const CHUNK: usize = 64 << 10;
/// Longest the end of a live stream may take once the command ended.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest creating the streams may take before the action runs without them.
const CREATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Output streamed live per stream at most (the node keeps no more).
const MAX_LIVE_BYTES: u64 = crate::logstream::MAX_STREAM_BYTES as u64;

/// Where an action's output may go live: the node to create its streams on, and the operation.
#[derive(Clone)]
pub struct LiveTarget {
    pub channel: Channel,
    pub operation: String,
}

/// Once the command has run for [`LIVE_AFTER`], creates the operation's streams and tails
/// `stdout` and `stderr` into them until `done`; nothing if the command ends sooner.
pub async fn follow(target: LiveTarget, stdout: PathBuf, stderr: PathBuf, mut done: watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(LIVE_AFTER) => {}
        _ = done.wait_for(|d| *d) => return,
    }
    let Some(l) = LiveLogs::create(&target.channel, &target.operation).await else { return };
    let out = tokio::spawn(tail(stdout, l.stdout, l.channel.clone(), done.clone()));
    tail(stderr, l.stderr, l.channel, done).await;
    let _ = out.await;
}

/// The write resource names of an action's two streams.
#[derive(Clone)]
pub struct LiveLogs {
    pub channel: Channel,
    pub stdout: String,
    pub stderr: String,
}

impl LiveLogs {
    /// Creates the streams of `operation` on the node behind `channel`; None if it cannot.
    pub async fn create(channel: &Channel, operation: &str) -> Option<Self> {
        let mut c = LogStreamServiceClient::new(channel.clone());
        let mut names = Vec::new();
        for which in ["stdout", "stderr"] {
            let call = c.create_log_stream(CreateLogStreamRequest { parent: format!("{operation}/{which}") });
            match tokio::time::timeout(CREATE_TIMEOUT, call).await {
                Ok(Ok(r)) => names.push(r.into_inner().write_resource_name),
                Ok(Err(e)) => {
                    tracing::debug!(operation, error = %e, "no live log stream for the action");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(operation, "creating the live log streams timed out");
                    return None;
                }
            }
        }
        let stderr = names.pop()?;
        let stdout = names.pop()?;
        Some(Self { channel: channel.clone(), stdout, stderr })
    }
}

/// Tails `path` into the stream `write_name` until `done` turns true, then sends the rest and
/// finishes the stream.
pub async fn tail(path: PathBuf, write_name: String, channel: Channel, mut done: watch::Receiver<bool>) {
    let (tx, rx) = mpsc::channel::<WriteRequest>(8);
    let call = tokio::spawn(async move { ByteStreamClient::new(channel).write(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let mut offset = 0u64;
    let mut file: Option<tokio::fs::File> = None;
    let mut buf = vec![0u8; CHUNK];
    'outer: loop {
        let finished = *done.borrow_and_update();
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        if let Some(f) = file.as_mut() {
            while offset < MAX_LIVE_BYTES {
                let want = CHUNK.min((MAX_LIVE_BYTES - offset) as usize);
                let n = match f.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let req = WriteRequest { resource_name: write_name.clone(), write_offset: offset as i64, finish_write: false, data: buf[..n].to_vec() };
                if tx.send(req).await.is_err() {
                    break 'outer;
                }
                offset += n as u64;
            }
        }
        if finished {
            let _ = tx.send(WriteRequest { resource_name: write_name.clone(), write_offset: offset as i64, finish_write: true, data: vec![] }).await;
            break;
        }
        tokio::select! {
            _ = done.changed() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    drop(tx);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => tracing::debug!(stream = %write_name, error = %e, "live log stream write failed"),
        _ => tracing::debug!(stream = %write_name, "live log stream write did not finish"),
    }
}
