//! The machine's own limits, measured in the same run as the benchmark.
//!
//! A figure such as "ByteStream write: 600 MB/s" means little on its own — it depends on the
//! CPU, the disk and what else the VM host is doing. The same figure as a fraction of what the
//! machine can do at best is comparable across machines and runs. Each probe measures one
//! ceiling a workload cannot beat:
//!
//! - [`sha256_rate`]: one core hashing with SHA-256 (the same `sha2` crate the server uses).
//!   A server must hash every byte it accepts, so a single upload stream cannot go faster.
//! - [`tcp_rate`]: one loopback TCP stream, both ends with `TCP_NODELAY`. A read cannot
//!   leave the server faster than the kernel copies bytes between two sockets.
//! - [`file_send_rate`]: a file in the page cache sent over one loopback TCP stream by a plain
//!   loop (1 MiB `pread` into one buffer, `write` to the socket). A blob read is this plus
//!   framing: unlike [`tcp_rate`]'s one cache-warm buffer, every byte comes from memory the
//!   CPU caches have not seen, which on this kind of VM costs about half the loopback rate.
//! - [`disk_rate`]: sequential 1 MiB writes then one fsync, and the rate of small
//!   write + fdatasync pairs: durable blob writes and Action Cache updates are bound by these.
//!   It also reports the write phase alone (into the page cache, before the fsync): on a VM
//!   whose free memory is handed back to the host (free page reporting), filling *new*
//!   page-cache pages costs host page faults and can be slower than hashing, and every blob
//!   a server stores lands in new pages.
//! - [`spawn_rate`]: starting `/bin/true` and waiting for it, one at a time. A worker that
//!   runs actions as real processes does at least this per action, so a single-action-at-a-time
//!   Execute cannot beat it.
//!
//! Probes report the best of their attempts: a ceiling, not an average.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of one write or hash update in the probes: 1 MiB, as a client streams.
const PROBE_CHUNK_BYTES: usize = 1 << 20;
/// Bytes of one small durable write (the fsync-rate probe).
const FSYNC_PROBE_WRITE_BYTES: usize = 4096;

/// The machine's ceilings; each field is `None` until its probe ran. Several partial records
/// (one per probe invocation) merge into one with [`MachineLimits::merge`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineLimits {
    /// One core's SHA-256 rate, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256_bytes_per_sec: Option<f64>,
    /// One loopback TCP stream, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_loopback_bytes_per_sec: Option<f64>,
    /// A file in the page cache sent over one loopback TCP stream, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_send_bytes_per_sec: Option<f64>,
    /// Sequential file write in 1 MiB writes including the final fsync, bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_write_fsync_bytes_per_sec: Option<f64>,
    /// The same writes into the page cache alone (timed before the fsync), bytes/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_cache_write_bytes_per_sec: Option<f64>,
    /// Small (4 KiB) write + fdatasync pairs per second on one file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsyncs_per_sec: Option<f64>,
    /// `/bin/true` started and waited for, one at a time, per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawns_per_sec: Option<f64>,
}

impl MachineLimits {
    /// `other`'s measured fields replace this one's.
    pub fn merge(self, other: MachineLimits) -> MachineLimits {
        MachineLimits {
            sha256_bytes_per_sec: other.sha256_bytes_per_sec.or(self.sha256_bytes_per_sec),
            tcp_loopback_bytes_per_sec: other
                .tcp_loopback_bytes_per_sec
                .or(self.tcp_loopback_bytes_per_sec),
            file_send_bytes_per_sec: other
                .file_send_bytes_per_sec
                .or(self.file_send_bytes_per_sec),
            disk_write_fsync_bytes_per_sec: other
                .disk_write_fsync_bytes_per_sec
                .or(self.disk_write_fsync_bytes_per_sec),
            page_cache_write_bytes_per_sec: other
                .page_cache_write_bytes_per_sec
                .or(self.page_cache_write_bytes_per_sec),
            fsyncs_per_sec: other.fsyncs_per_sec.or(self.fsyncs_per_sec),
            spawns_per_sec: other.spawns_per_sec.or(self.spawns_per_sec),
        }
    }

    /// Reads and merges JSON files written by the probe subcommands.
    pub fn load_all(paths: &[std::path::PathBuf]) -> anyhow::Result<MachineLimits> {
        let mut limits = MachineLimits::default();
        for p in paths {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let one: MachineLimits = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a machine-limits record", p.display()))?;
            limits = limits.merge(one);
        }
        Ok(limits)
    }
}

fn pattern_buffer(len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    crate::load::blobs::fill(0x5eed, &mut b);
    b
}

/// One core's SHA-256 throughput in bytes/s: `total_bytes` hashed in 1 MiB updates from a
/// cache-warm buffer (as the server hashes chunks just received), best of `attempts`.
pub fn sha256_rate(total_bytes: u64, attempts: u32) -> f64 {
    let buf = pattern_buffer(PROBE_CHUNK_BYTES);
    let chunks = (total_bytes / PROBE_CHUNK_BYTES as u64).max(1);
    let mut best = Duration::MAX;
    for _ in 0..attempts.max(1) {
        let start = Instant::now();
        let mut h = Sha256::new();
        for _ in 0..chunks {
            h.update(&buf);
        }
        std::hint::black_box(h.finalize());
        best = best.min(start.elapsed());
    }
    (chunks * PROBE_CHUNK_BYTES as u64) as f64 / best.as_secs_f64()
}

/// One loopback TCP stream's throughput in bytes/s: a listener on 127.0.0.1:0 reads and
/// discards, a client pushes `total_bytes` in 1 MiB writes, both with `TCP_NODELAY`. The clock
/// stops when the client has the reader's count back, so nothing is left in socket buffers.
pub async fn tcp_rate(total_bytes: u64) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the probe listener")?;
    let addr = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let mut buf = vec![0u8; PROBE_CHUNK_BYTES];
        let mut n = 0u64;
        loop {
            let r = sock.read(&mut buf).await?;
            if r == 0 {
                break;
            }
            n += r as u64;
        }
        sock.write_all(&n.to_le_bytes()).await?;
        anyhow::Ok(n)
    });
    let buf = pattern_buffer(PROBE_CHUNK_BYTES);
    let chunks = (total_bytes / PROBE_CHUNK_BYTES as u64).max(1);
    let start = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr)
        .await
        .context("connecting to the probe listener")?;
    sock.set_nodelay(true)?;
    for _ in 0..chunks {
        sock.write_all(&buf).await?;
    }
    sock.shutdown().await?;
    let mut count = [0u8; 8];
    sock.read_exact(&mut count).await?;
    let elapsed = start.elapsed();
    let received = u64::from_le_bytes(count);
    let read_side = reader.await.context("probe reader task")??;
    anyhow::ensure!(
        received == chunks * PROBE_CHUNK_BYTES as u64 && read_side == received,
        "loopback probe lost bytes"
    );
    Ok(received as f64 / elapsed.as_secs_f64())
}

/// A cached file sent over one loopback TCP stream, bytes/s, best of `attempts`: a file of
/// `file_bytes` is written in `dir` (so its pages are in the page cache), then each attempt
/// sends it `passes` times by 1 MiB `pread` into one buffer and `write_all` to a socket whose
/// reader discards. The clock stops when the sender has the reader's count back. Blocking; the
/// file is removed afterwards.
pub fn file_send_rate(
    dir: &Path,
    file_bytes: u64,
    passes: u32,
    attempts: u32,
) -> anyhow::Result<f64> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("kiln-load-send-probe-{}.tmp", std::process::id()));
    let chunks = (file_bytes / PROBE_CHUNK_BYTES as u64).max(1);
    let run = || -> anyhow::Result<f64> {
        {
            let buf = pattern_buffer(PROBE_CHUNK_BYTES);
            let mut f = std::fs::File::create(&path)?;
            for i in 0..chunks {
                // Distinct chunks, so no two pages of the file hold the same bytes.
                f.write_all(&i.to_le_bytes())?;
                f.write_all(&buf[8..])?;
            }
        }
        let file = std::fs::File::open(&path)?;
        let mut best = Duration::MAX;
        let mut sent_per_attempt = 0u64;
        for _ in 0..attempts.max(1) {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let reader = std::thread::spawn(move || -> std::io::Result<u64> {
                let (mut sock, _) = listener.accept()?;
                sock.set_nodelay(true)?;
                let mut buf = vec![0u8; PROBE_CHUNK_BYTES];
                let mut n = 0u64;
                loop {
                    match sock.read(&mut buf)? {
                        0 => break,
                        r => n += r as u64,
                    }
                }
                sock.write_all(&n.to_le_bytes())?;
                Ok(n)
            });
            let mut buf = vec![0u8; PROBE_CHUNK_BYTES];
            let start = Instant::now();
            let mut sock = std::net::TcpStream::connect(addr)?;
            sock.set_nodelay(true)?;
            for _ in 0..passes.max(1) {
                for i in 0..chunks {
                    file.read_exact_at(&mut buf, i * PROBE_CHUNK_BYTES as u64)?;
                    sock.write_all(&buf)?;
                }
            }
            sock.shutdown(std::net::Shutdown::Write)?;
            let mut count = [0u8; 8];
            sock.read_exact(&mut count)?;
            let elapsed = start.elapsed();
            let received = u64::from_le_bytes(count);
            let read_side = reader
                .join()
                .map_err(|_| anyhow::anyhow!("probe reader panicked"))??;
            sent_per_attempt = chunks * PROBE_CHUNK_BYTES as u64 * u64::from(passes.max(1));
            anyhow::ensure!(
                received == sent_per_attempt && read_side == received,
                "file-send probe lost bytes"
            );
            best = best.min(elapsed);
        }
        Ok(sent_per_attempt as f64 / best.as_secs_f64())
    };
    let r = run();
    let _ = std::fs::remove_file(&path);
    r.with_context(|| format!("file-send probe in {}", dir.display()))
}

/// What [`disk_rate`] measured.
#[derive(Debug, Clone, Copy)]
pub struct DiskRates {
    /// `total_bytes` in 1 MiB writes then one fsync, all timed: bytes/s.
    pub write_fsync_bytes_per_sec: f64,
    /// The writes alone, before the fsync: bytes/s.
    pub page_cache_bytes_per_sec: f64,
    /// 4 KiB append + fdatasync pairs per second.
    pub fsyncs_per_sec: f64,
}

/// Sequential durable write rate of `dir`'s file system and the rate of small durable writes
/// (`fsyncs` 4 KiB append + fdatasync pairs). Blocking; the probe files are removed afterwards.
pub fn disk_rate(dir: &Path, total_bytes: u64, fsyncs: u32) -> anyhow::Result<DiskRates> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let buf = pattern_buffer(PROBE_CHUNK_BYTES);
    let chunks = (total_bytes / PROBE_CHUNK_BYTES as u64).max(1);
    let path = dir.join(format!("kiln-load-disk-probe-{}.tmp", std::process::id()));
    let bytes = (chunks * PROBE_CHUNK_BYTES as u64) as f64;
    let seq = (|| -> anyhow::Result<(f64, f64)> {
        let start = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..chunks {
            f.write_all(&buf)?;
        }
        let written = start.elapsed();
        f.sync_all()?;
        Ok((
            bytes / start.elapsed().as_secs_f64(),
            bytes / written.as_secs_f64(),
        ))
    })();
    let _ = std::fs::remove_file(&path);
    let (durable, buffered) =
        seq.with_context(|| format!("sequential write probe in {}", dir.display()))?;

    let small = (|| -> anyhow::Result<f64> {
        let mut f = std::fs::File::create(&path)?;
        let start = Instant::now();
        for _ in 0..fsyncs.max(1) {
            f.write_all(&buf[..FSYNC_PROBE_WRITE_BYTES])?;
            f.sync_data()?;
        }
        Ok(f64::from(fsyncs.max(1)) / start.elapsed().as_secs_f64())
    })();
    let _ = std::fs::remove_file(&path);
    let small = small.with_context(|| format!("fsync probe in {}", dir.display()))?;
    Ok(DiskRates {
        write_fsync_bytes_per_sec: durable,
        page_cache_bytes_per_sec: buffered,
        fsyncs_per_sec: small,
    })
}

/// The program [`spawn_rate`] starts, as the Execute workload's actions do.
pub const TRIVIAL_PROGRAM: &str = "/bin/true";

/// Processes started and waited for per second, one at a time: `count` runs of
/// [`TRIVIAL_PROGRAM`] (stdio to /dev/null), best of `attempts`. Blocking.
pub fn spawn_rate(count: u32, attempts: u32) -> anyhow::Result<f64> {
    let mut best = Duration::MAX;
    for _ in 0..attempts.max(1) {
        let start = Instant::now();
        for _ in 0..count.max(1) {
            let status = std::process::Command::new(TRIVIAL_PROGRAM)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .with_context(|| format!("starting {TRIVIAL_PROGRAM}"))?;
            anyhow::ensure!(status.success(), "{TRIVIAL_PROGRAM} exited with {status}");
        }
        best = best.min(start.elapsed());
    }
    Ok(f64::from(count.max(1)) / best.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_what_each_probe_measured() {
        let a = MachineLimits {
            sha256_bytes_per_sec: Some(1.0),
            ..Default::default()
        };
        let b = MachineLimits {
            tcp_loopback_bytes_per_sec: Some(2.0),
            ..Default::default()
        };
        let m = a.merge(b);
        assert_eq!(m.sha256_bytes_per_sec, Some(1.0));
        assert_eq!(m.tcp_loopback_bytes_per_sec, Some(2.0));
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            !json.contains("fsyncs_per_sec"),
            "unmeasured limits are left out: {json}"
        );
        assert_eq!(serde_json::from_str::<MachineLimits>(&json).unwrap(), m);
    }

    #[test]
    fn file_send_probe_sends_every_byte_and_removes_its_file() {
        let dir = std::env::temp_dir().join(format!("kiln-load-send-test-{}", std::process::id()));
        let rate = file_send_rate(&dir, 3 * PROBE_CHUNK_BYTES as u64, 2, 2).unwrap();
        let left = std::fs::read_dir(&dir).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(rate.is_finite() && rate > 0.0, "rate {rate}");
        assert_eq!(left, 0, "probe file left behind");
        let b = MachineLimits {
            file_send_bytes_per_sec: Some(rate),
            ..Default::default()
        };
        assert_eq!(MachineLimits::default().merge(b).file_send_bytes_per_sec, Some(rate));
    }
}
