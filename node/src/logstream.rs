//! LogStream v1: live stdout/stderr of running actions, held in memory by the node the
//! worker writes to.
//!
//! Names are derived from the operation, so that every node can put them in the operation's
//! metadata without being told: the worker creates `{operation}/logstreams/stdout` and
//! `.../stderr` with `CreateLogStream(parent = "{operation}/stdout")` (or `/stderr`) and writes
//! to the returned `write_resource_name` (the name plus a secret token) with ByteStream Write.
//! A ByteStream Read of the name streams what is there and then waits for more, until the
//! writer finishes; a node that does not hold the stream asks the other members for it.
//!
//! Bounded: at most `MAX_STREAMS` streams (the oldest finished, else the oldest, goes first),
//! `MAX_STREAM_BYTES` per stream and `MAX_TOTAL_BYTES` for all of them (later bytes are dropped
//! and counted; finished streams go first when a new one is created past half the total).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::error::{KilnError, Result};

pub const MAX_STREAMS: usize = 1024;
pub const MAX_STREAM_BYTES: usize = 16 << 20;
pub const MAX_TOTAL_BYTES: usize = 256 << 20;
pub const LOG_BYTES_DROPPED: &str = "kiln_logstream_bytes_dropped_total";

/// The path segment that marks a log stream's resource name.
pub const SEGMENT: &str = "/logstreams/";

/// The names of an operation's two streams, as ExecuteOperationMetadata carries them.
pub fn stream_names(operation: &str) -> (String, String) {
    (format!("{operation}{SEGMENT}stdout"), format!("{operation}{SEGMENT}stderr"))
}

/// One stream's bytes and whether its writer finished.
pub struct LogBuffer {
    data: Mutex<Vec<u8>>,
    /// `(bytes, finished)`, for readers waiting for more.
    progress: watch::Sender<(usize, bool)>,
    token: String,
    created: Instant,
    /// Bytes held by all streams of the node.
    total: Arc<AtomicUsize>,
}

impl Drop for LogBuffer {
    fn drop(&mut self) {
        let held = self.data.get_mut().map(|d| d.len()).unwrap_or_else(|p| p.into_inner().len());
        self.total.fetch_sub(held, Ordering::Relaxed);
    }
}

impl LogBuffer {
    /// Bytes from `offset`, at most `max`, and whether the stream is finished.
    pub fn read(&self, offset: usize, max: usize) -> (Vec<u8>, bool) {
        let data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let finished = self.progress.borrow().1;
        let end = data.len().min(offset.saturating_add(max));
        (if offset < end { data[offset..end].to_vec() } else { Vec::new() }, finished)
    }

    pub fn subscribe(&self) -> watch::Receiver<(usize, bool)> {
        self.progress.subscribe()
    }

    pub fn finished(&self) -> bool {
        self.progress.borrow().1
    }

    /// Appends at `offset`, which must be the stream's committed size; returns the new size.
    pub fn append(&self, offset: u64, bytes: &[u8], finish: bool) -> Result<u64> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let (committed, finished) = *self.progress.borrow();
        if finished {
            return Err(KilnError::FailedPrecondition("the log stream is finished; it takes no more bytes".into()));
        }
        // The stored size may stop growing at the bound while the writer's offset goes on.
        let logical = committed as u64;
        if offset != logical {
            return Err(KilnError::invalid(format!("write_offset {offset} is not the log stream's committed size {logical}")));
        }
        let node_room = MAX_TOTAL_BYTES.saturating_sub(self.total.load(Ordering::Relaxed));
        let room = MAX_STREAM_BYTES.saturating_sub(data.len()).min(node_room);
        if bytes.len() > room {
            metrics::counter!(LOG_BYTES_DROPPED).increment((bytes.len() - room) as u64);
        }
        let kept = bytes.len().min(room);
        data.extend_from_slice(&bytes[..kept]);
        self.total.fetch_add(kept, Ordering::Relaxed);
        let size = committed + bytes.len();
        drop(data);
        self.progress.send_replace((size, finish));
        Ok(size as u64)
    }
}

#[derive(Clone, Default)]
pub struct LogStreams {
    inner: Arc<Mutex<HashMap<String, Arc<LogBuffer>>>>,
    total: Arc<AtomicUsize>,
}

impl LogStreams {
    /// Creates (or, for a new attempt, replaces) the stream `name`; returns its write token.
    pub fn create(&self, name: &str) -> String {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let buf = Arc::new(LogBuffer {
            data: Mutex::new(Vec::new()),
            progress: watch::channel((0, false)).0,
            token: token.clone(),
            created: Instant::now(),
            total: self.total.clone(),
        });
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = m.get(name) {
            // Readers of the previous attempt see its end.
            old.progress.send_modify(|p| p.1 = true);
        }
        // Past half the byte budget, finished streams make room for the new one, oldest first.
        while self.total.load(Ordering::Relaxed) > MAX_TOTAL_BYTES / 2 {
            let Some(victim) = m.iter().filter(|(_, b)| b.finished()).min_by_key(|(_, b)| b.created).map(|(n, _)| n.clone()) else {
                break;
            };
            m.remove(&victim);
        }
        while m.len() >= MAX_STREAMS && !m.contains_key(name) {
            let victim = m
                .iter()
                .min_by_key(|(_, b)| (!b.finished(), b.created))
                .map(|(n, _)| n.clone())
                .expect("the map is not empty");
            if let Some(b) = m.remove(&victim) {
                b.progress.send_modify(|p| p.1 = true);
            }
        }
        m.insert(name.to_string(), buf);
        token
    }

    pub fn get(&self, name: &str) -> Option<Arc<LogBuffer>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The stream a write resource name (`{name}/{token}`) designates, if the token matches.
    pub fn for_write(&self, write_name: &str) -> Result<Arc<LogBuffer>> {
        let (name, token) = write_name
            .rsplit_once('/')
            .ok_or_else(|| KilnError::invalid(format!("{write_name:?} is not a log stream's write resource name")))?;
        let buf = self.get(name).ok_or_else(|| KilnError::NotFound(format!("log stream {name:?} not found on this node")))?;
        if buf.token != token {
            return Err(KilnError::invalid(format!("{write_name:?} does not carry the write token of log stream {name:?}")));
        }
        Ok(buf)
    }
}

/// Whether a resource name is a log stream's, and which: `Some(true)` for a write resource
/// name (`{op}/logstreams/{id}/{token}`), `Some(false)` for a stream's name.
pub fn classify(resource: &str) -> Option<bool> {
    let (_, rest) = resource.split_once(SEGMENT)?;
    Some(rest.contains('/'))
}

/// `CreateLogStream(parent)`: the name Kiln gives `{operation}/{stdout|stderr}`.
pub fn name_for_parent(parent: &str) -> Result<String> {
    let (op, which) = parent
        .rsplit_once('/')
        .ok_or_else(|| KilnError::invalid(format!("parent {parent:?} is not {{operation}}/stdout or {{operation}}/stderr")))?;
    if op.is_empty() || !(which == "stdout" || which == "stderr") || op.contains(SEGMENT) {
        return Err(KilnError::invalid(format!("parent {parent:?} is not {{operation}}/stdout or {{operation}}/stderr")));
    }
    Ok(format!("{op}{SEGMENT}{which}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_writes_and_bounds() {
        assert_eq!(name_for_parent("op-1/stdout").unwrap(), "op-1/logstreams/stdout");
        assert!(name_for_parent("op-1/other").is_err());
        assert!(name_for_parent("stdout").is_err());
        assert_eq!(stream_names("op-1").1, "op-1/logstreams/stderr");
        assert_eq!(classify("op-1/logstreams/stdout"), Some(false));
        assert_eq!(classify("op-1/logstreams/stdout/tok"), Some(true));
        assert_eq!(classify("blobs/abc/1"), None);

        let s = LogStreams::default();
        let token = s.create("op-1/logstreams/stdout");
        assert!(s.for_write("op-1/logstreams/stdout/wrong").is_err());
        let b = s.for_write(&format!("op-1/logstreams/stdout/{token}")).unwrap();
        assert_eq!(b.append(0, b"hello ", false).unwrap(), 6);
        assert!(b.append(3, b"x", false).is_err(), "offsets must follow the committed size");
        assert_eq!(b.append(6, b"world", true).unwrap(), 11);
        assert_eq!(b.read(6, 100), (b"world".to_vec(), true));
        assert!(b.append(11, b"more", false).is_err());
        assert_eq!(s.total.load(Ordering::Relaxed), 11);
        drop(b);
        s.create("op-1/logstreams/stdout"); // a new attempt replaces the stream and frees its bytes
        assert_eq!(s.total.load(Ordering::Relaxed), 0);
    }
}
